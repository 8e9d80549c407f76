//! The conformance kit over NCCL (feature `nccl`): device buffers, one GPU
//! per rank. NCCL cannot put two ranks of one communicator on one GPU, and
//! a one-member group never reaches the backend (the front answers it), so
//! these run with as many ranks as there are GPUs (2 to 4) and are skipped
//! with a message on machines with fewer than two; set
//! `COMM_CONFORMANCE_REQUIRE=1` on GPU runners to make a skip a failure.
//! Host backends moving device buffers (several ranks sharing one GPU) are
//! in `device.rs`.
#![cfg(feature = "nccl")]

use std::sync::Arc;

use comm_conformance::{Kit, Mode, REQUIRE_ENV};
use comm_core::Device;

/// The kit over NCCL with one rank per visible GPU, or `None` (and a
/// message) when there are fewer than two.
fn nccl(mode: Mode) -> Option<Kit> {
    comm_nccl::install();
    let gpus = comm_core::visible_devices();
    if gpus < 2 {
        let why = format!("NCCL conformance needs two GPUs or more; {gpus} visible");
        if std::env::var(REQUIRE_ENV).as_deref() == Ok("1") {
            panic!("{why} (and {REQUIRE_ENV}=1 says it must run)");
        }
        eprintln!("skipped: {why}");
        return None;
    }
    let kit = Kit::new(Arc::new(comm_nccl::NcclFactory))
        .world(gpus.min(4))
        .mode(mode)
        .device(Device::Cuda(0));
    Some(kit)
}

#[test]
fn basic_processes_one_rank_per_gpu() {
    if let Some(k) = nccl(Mode::Basic) {
        k.run_processes();
    }
}

#[test]
fn large_processes_one_rank_per_gpu() {
    if let Some(k) = nccl(Mode::Large) {
        k.run_processes();
    }
}

#[test]
fn mismatch_processes_one_rank_per_gpu() {
    if let Some(k) = nccl(Mode::Mismatch) {
        k.run_processes();
    }
}

#[test]
fn failures_processes_one_rank_per_gpu() {
    if let Some(k) = nccl(Mode::Failures) {
        k.run_processes();
    }
}
