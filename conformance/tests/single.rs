//! The kit over the one-member backend that comm-core registers as
//! `single` (the front answers every call of a one-member group itself):
//! threads and processes, and the sections that need two members say so.

use std::sync::Arc;

use comm_conformance::{run_processes, run_threads, Kit, Mode};
use comm_core::{Device, Registry, SingleFactory};

comm_conformance::conformance_tests! { SingleFactory;
    basic_threads: run_threads(1, Basic),
    basic_processes: run_processes(1, Basic),
}

#[test]
fn sections_that_need_peers_are_skipped_with_a_reason() {
    for mode in [Mode::Mismatch, Mode::Failures] {
        let r = run_threads(Arc::new(SingleFactory), 1, mode, Device::Cpu);
        assert_eq!(r.total_checks(), 0);
        assert_eq!(r.skipped.len(), 1, "{mode}: {:?}", r.skipped);
        assert!(r.skipped[0].contains("one member"), "{:?}", r.skipped);
    }
}

#[test]
fn device_mode_without_an_allocator_is_skipped_with_a_reason() {
    let r = run_processes(Arc::new(SingleFactory), 1, Mode::Basic, Device::Cuda(0));
    assert_eq!(r.total_checks(), 0);
    assert!(
        r.skipped.iter().any(|s| s.contains("no device allocator")),
        "{:?}",
        r.skipped
    );
}

#[test]
fn kit_from_a_registry_by_name() {
    let reg = Registry::new().with(SingleFactory);
    let r = Kit::from_registry(&reg, "SINGLE")
        .unwrap()
        .world(1)
        .run_threads();
    assert_eq!(r.backend, "single");
    assert!(r.total_checks() > 400, "{} checks", r.total_checks());
    let e = Kit::from_registry(&reg, "carrier-pigeon").unwrap_err();
    assert!(e.to_string().contains("registered: single"), "{e}");
}
