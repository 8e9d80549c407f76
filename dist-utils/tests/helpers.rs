//! divide / padding / splitting helpers and same-host detection.

use std::sync::Arc;
use std::time::Duration;

use comm_core::{CommError, Store, Tensor};
use dist_utils::{
    compute_padding_for_sp, divide, ensure_divisibility, pad_sequence, same_host_ranks,
    split_tensor_along_last_dim, unpad_sequence, HashStore,
};

#[test]
fn divide_and_divisibility() {
    assert_eq!(divide(12, 4).unwrap(), 3);
    assert_eq!(divide(0, 4).unwrap(), 0);
    assert!(
        matches!(divide(10, 4), Err(CommError::InvalidArgument(m)) if m.contains("10") && m.contains('4'))
    );
    assert!(divide(1, 0).is_err());
    assert!(ensure_divisibility(8, 2).is_ok());
    assert!(ensure_divisibility(7, 2).is_err());
}

#[test]
fn padding_for_sequence_parallelism() {
    assert_eq!(compute_padding_for_sp(7, 2), (8, 1));
    assert_eq!(compute_padding_for_sp(13, 4), (16, 3));
    assert_eq!(compute_padding_for_sp(8, 4), (8, 0));
    assert_eq!(compute_padding_for_sp(0, 4), (0, 0));
    assert_eq!(compute_padding_for_sp(5, 1), (5, 0));
    for len in 0..50 {
        for p in 1..9 {
            let (padded, pad) = compute_padding_for_sp(len, p);
            assert_eq!(padded % p, 0);
            assert_eq!(padded, len + pad);
            assert!(pad < p);
        }
    }
}

#[test]
fn split_along_last_dim() {
    let t = Tensor::from_vec((0..12i32).collect(), [2, 6]).unwrap();
    let parts = split_tensor_along_last_dim(&t, 3).unwrap();
    assert_eq!(parts.len(), 3);
    assert_eq!(parts[0].shape(), &[2, 2]);
    assert_eq!(parts[0].to_vec::<i32>().unwrap(), [0, 1, 6, 7]);
    assert_eq!(parts[2].to_vec::<i32>().unwrap(), [4, 5, 10, 11]);
    assert!(split_tensor_along_last_dim(&t, 4).is_err());
    assert!(split_tensor_along_last_dim(&t, 0).is_err());
    let scalar = Tensor::from_vec(vec![1.0f32], Vec::<usize>::new()).unwrap();
    assert!(split_tensor_along_last_dim(&scalar, 1).is_err());
}

#[test]
fn pad_and_unpad_sequence() {
    // [B=2, S=3, D=2], sequence dim 1, 2 ranks: one zero row appended.
    let t = Tensor::from_vec((1..=12i64).collect(), [2, 3, 2]).unwrap();
    let (p, pad) = pad_sequence(&t, 1, 2).unwrap();
    assert_eq!(pad, 1);
    assert_eq!(p.shape(), &[2, 4, 2]);
    assert_eq!(
        p.to_vec::<i64>().unwrap(),
        [1, 2, 3, 4, 5, 6, 0, 0, 7, 8, 9, 10, 11, 12, 0, 0]
    );
    let back = unpad_sequence(&p, 1, 3).unwrap();
    assert_eq!(back, t);
    // Negative dims and no-op padding.
    let (same, pad) = pad_sequence(&t, -2, 3).unwrap();
    assert_eq!((pad, &same), (0, &t));
    assert_eq!(unpad_sequence(&t, -2, 3).unwrap(), t);
    // Errors.
    assert!(pad_sequence(&t, 3, 2).is_err());
    assert!(pad_sequence(&t, 1, 0).is_err());
    assert!(unpad_sequence(&t, 1, 4).is_err());
}

/// The shm tests look at /dev/shm names of this process: run them one at a time.
static SHM_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn shm_entries() -> Vec<String> {
    let me = format!("dist-samehost-{}-", std::process::id());
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&me))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn same_host_ranks_over_threads() {
    let _serial = SHM_TESTS.lock().unwrap_or_else(|e| e.into_inner());
    let world = 4;
    let store = Arc::new(HashStore::new());
    for _round in 0..2 {
        let handles: Vec<_> = (0..world)
            .map(|r| {
                let s = store.clone();
                std::thread::spawn(move || {
                    same_host_ranks(s.as_ref(), r, world, Duration::from_secs(10))
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap().unwrap(), [0, 1, 2, 3]);
        }
        assert!(
            shm_entries().is_empty(),
            "left in /dev/shm: {:?}",
            shm_entries()
        );
    }
    assert!(!dist_utils::hostname().is_empty());
}

#[test]
fn same_host_ranks_times_out_naming_the_missing_rank() {
    let _serial = SHM_TESTS.lock().unwrap_or_else(|e| e.into_inner());
    let store = HashStore::new();
    // Rank 1 of 2 never arrives.
    match same_host_ranks(&store, 0, 2, Duration::from_millis(200)) {
        Err(CommError::Timeout { missing, .. }) => assert_eq!(
            missing.iter().map(|m| m.rank.group).collect::<Vec<_>>(),
            [1]
        ),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(
        shm_entries().is_empty(),
        "left in /dev/shm: {:?}",
        shm_entries()
    );
    assert!(same_host_ranks(&store, 2, 2, Duration::from_millis(10)).is_err());
}

/// A rank frozen between publishing its probe and finishing its own
/// probing is named by the barrier's timeout (found by the crash trials:
/// the barrier used to be a counter that named nobody).
#[test]
fn a_rank_that_never_finishes_probing_is_named() {
    let _serial = SHM_TESTS.lock().unwrap_or_else(|e| e.into_inner());
    let store = HashStore::new();
    // Rank 1 published a probe (of a segment that does not exist here),
    // then stopped.
    store
        .set("same_host/1/1", b"/dist-samehost-1-r1-0 token")
        .unwrap();
    match same_host_ranks(&store, 0, 2, Duration::from_millis(300)) {
        Err(e @ CommError::Timeout { .. }) => {
            let CommError::Timeout { missing, .. } = &e else {
                unreachable!()
            };
            assert_eq!(
                missing.iter().map(|m| m.rank.group).collect::<Vec<_>>(),
                [1],
                "{e}"
            );
            assert!(e.to_string().contains("did not finish probing"), "{e}");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(
        shm_entries().is_empty(),
        "left in /dev/shm: {:?}",
        shm_entries()
    );
}

#[test]
fn a_segment_that_cannot_be_opened_means_another_host() {
    let _serial = SHM_TESTS.lock().unwrap_or_else(|e| e.into_inner());
    // Rank 1 publishes a name nobody can open (as a rank on another host would).
    let store = Arc::new(HashStore::new());
    let s = store.clone();
    let h = std::thread::spawn(move || same_host_ranks(s.as_ref(), 0, 2, Duration::from_secs(10)));
    store.add("same_host/calls/1", 1).unwrap();
    store
        .set("same_host/1/1", b"/dist-samehost-0-r1-elsewhere 00")
        .unwrap();
    store.set("same_host/1/done/1", b"1").unwrap();
    assert_eq!(h.join().unwrap().unwrap(), [0]);
    assert!(shm_entries().is_empty());
}
