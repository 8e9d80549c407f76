//! Call descriptions on the wire: members that call different things get
//! an error at that call, on every member, instead of garbage. And the
//! strided all-to-all against its definition, plus concurrent groups.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use comm_core::{BlockLayout, Collective, CommError, Layout, ReduceOp, Store};
use dist_utils::HashStore;

/// Far longer than any mismatch may take to be reported: a mismatch must
/// never be found by waiting out the deadline.
const OP_TIMEOUT: f64 = 60.0;
const FAST: Duration = Duration::from_secs(20);

fn is_mismatch(e: &CommError) -> bool {
    matches!(e, CommError::CallMismatch { .. })
}

/// A mismatch seen directly, or learnt from the member that saw it.
fn is_mismatch_or_abort(e: &CommError) -> bool {
    is_mismatch(e)
        || matches!(e, CommError::PeerAborted { reason, .. } if reason.contains("call mismatch"))
}

#[test]
fn dtype_mismatch_of_equal_bytes_fails_on_both() {
    let res = common::run(2, common::opts(), OP_TIMEOUT, |r, c| {
        let t = Instant::now();
        let e = if r == 0 {
            let mut v = vec![1.0f32; 4];
            c.all_reduce(&mut v, ReduceOp::Sum).unwrap_err()
        } else {
            let mut v = vec![1i32; 4];
            c.all_reduce(&mut v, ReduceOp::Sum).unwrap_err()
        };
        (e, t.elapsed())
    });
    for (r, (e, t)) in res.iter().enumerate() {
        assert!(is_mismatch(e), "rank {r}: {e}");
        assert!(*t < FAST, "rank {r} took {t:?}");
        let text = e.to_string();
        assert!(text.contains("f32") && text.contains("i32"), "{text}");
    }
}

#[test]
fn each_member_its_own_broadcast_root_fails_at_that_call() {
    for world in [2usize, 3, 4] {
        for n in [16usize, 1 << 20] {
            let res = common::run(world, common::opts(), OP_TIMEOUT, move |r, c| {
                let mut v = vec![r as u8; n];
                let t = Instant::now();
                (c.broadcast(&mut v, r).unwrap_err(), t.elapsed())
            });
            for (r, (e, t)) in res.iter().enumerate() {
                if world == 2 {
                    assert!(is_mismatch(e), "world {world} n {n} rank {r}: {e}");
                } else {
                    assert!(is_mismatch_or_abort(e), "world {world} n {n} rank {r}: {e}");
                }
                assert!(*t < FAST, "world {world} rank {r} took {t:?}");
            }
            assert!(res.iter().any(|(e, _)| is_mismatch(e)));
        }
    }
}

/// With more members, every member whose left neighbour called something
/// else sees the mismatch at that call and aborts the group; the others fail
/// at that call or, if they had already completed it, at their next one.
#[test]
fn mismatched_calls_fail_on_every_member() {
    // (what rank 0 calls differently, world)
    for (case, world) in [
        ("count", 3usize),
        ("op", 3),
        ("root", 5),
        ("gather-root", 4),
    ] {
        let res = common::run(world, common::opts(), OP_TIMEOUT, move |r, c| {
            let odd = r == 0;
            let t = Instant::now();
            let first = match case {
                "count" => {
                    let v = vec![1.0f32; if odd { 6 } else { 5 }];
                    let mut out = vec![0.0f32; v.len() * c.world_size()];
                    c.all_gather(&v, &mut out)
                }
                "op" => {
                    let mut v = vec![2.0f32; 64];
                    let op = if odd { ReduceOp::Max } else { ReduceOp::Sum };
                    c.all_reduce(&mut v, op)
                }
                "root" => {
                    let mut v = vec![7u8; 100];
                    c.broadcast(&mut v, if odd { 1 } else { 2 })
                }
                _ => {
                    let v = vec![1i64; 3];
                    let root = if odd { 0 } else { 3 };
                    let mut out = vec![0i64; 3 * c.world_size()];
                    let o = (r == root).then_some(&mut out);
                    c.gather(&v, o, root)
                }
            };
            let e = match first {
                Err(e) => e,
                Ok(()) => c.barrier().expect_err("the next call must fail"),
            };
            (e, t.elapsed())
        });
        for (r, (e, t)) in res.iter().enumerate() {
            assert!(is_mismatch_or_abort(e), "{case}: rank {r}: {e}");
            assert!(*t < FAST, "{case}: rank {r} took {t:?}");
        }
        // Some member saw it directly (the one whose abort the others
        // report). Which one depends on the algorithm and on timing: where
        // several members compare with rank 0 (a small all_gather talks to
        // every peer), the first to notice aborts the group, and rank 0's
        // right neighbour may learn of it from that abort first.
        assert!(
            res.iter().any(|(e, _)| is_mismatch(e)),
            "{case}: nobody saw the mismatch itself: {:?}",
            res.iter().map(|(e, _)| e.to_string()).collect::<Vec<_>>()
        );
    }
}

#[test]
fn layout_shapes_are_checked() {
    // all_to_all_4d of the same bytes with different 4-D shapes.
    let res = common::run(2, common::opts(), OP_TIMEOUT, |r, c| {
        let shape: &[usize] = if r == 0 { &[1, 4, 4, 8] } else { &[1, 8, 2, 8] };
        let v = vec![1.0f32; 128];
        let mut out = vec![0.0f32; 128];
        let layout = Layout {
            op: Collective::AllToAll4d,
            shape,
            arg: 2 * 16 + 1,
        };
        c.all_to_all_with(&v, &mut out, Some(layout)).unwrap_err()
    });
    for (r, e) in res.iter().enumerate() {
        assert!(is_mismatch(e), "rank {r}: {e}");
        assert!(e.to_string().contains("[1, 4, 4, 8]"), "{e}");
    }
}

/// Point-to-point messages carry their own descriptions: a size mismatch
/// fails the receive at once, and the sender learns it at its next call.
#[test]
fn p2p_mismatch_and_mixing_with_collectives() {
    common::run(2, common::opts(), OP_TIMEOUT, |r, c| {
        if r == 0 {
            c.send(&vec![1.0f32; 4], 1).unwrap();
            let e = c.barrier().unwrap_err();
            assert!(is_mismatch_or_abort(&e), "{e}");
        } else {
            let e = c.recv(&mut vec![0.0f32; 5], 0).unwrap_err();
            assert!(is_mismatch(&e), "{e}");
            assert!(
                e.to_string().contains("x 4") && e.to_string().contains("x 5"),
                "{e}"
            );
        }
    });
    // A receive that meets collective traffic fails instead of taking its bytes.
    common::run(2, common::opts(), OP_TIMEOUT, |r, c| {
        let mut t = vec![1.0f32; 3];
        let e = if r == 0 {
            c.all_reduce(&mut t, ReduceOp::Sum).unwrap_err()
        } else {
            c.recv(&mut t, 0).unwrap_err()
        };
        assert!(is_mismatch_or_abort(&e), "rank {r}: {e}");
    });
}

#[test]
fn matching_calls_keep_working_after_many_calls() {
    // Descriptions carry sequence numbers: many calls of every kind in a row.
    common::run(3, common::opts(), OP_TIMEOUT, |r, c| {
        for i in 0..50i32 {
            let mut v = vec![i as f32 + r as f32; 17];
            c.all_reduce(&mut v, ReduceOp::Sum).unwrap();
            assert_eq!(v[16], 3.0 * i as f32 + 3.0);
            let mut b = vec![r as i32; 5];
            c.broadcast(&mut b, (i as usize) % 3).unwrap();
            assert_eq!(b, vec![i % 3; 5]);
            let mut g = vec![0i32; 15];
            let o = (r == 1).then_some(&mut g);
            c.gather(&b, o, 1).unwrap();
            c.barrier().unwrap();
            if r == 0 {
                c.send(&vec![i; 2], 2).unwrap();
            } else if r == 2 {
                let mut x = vec![0i32; 2];
                c.recv(&mut x, 0).unwrap();
                assert_eq!(x, [i, i]);
            }
        }
    });
}

// ------------------------------------------------------ strided all-to-all

/// The expected output of a strided all-to-all on member `me`, from the
/// definition (`BlockLayout::gather` / `scatter`), over a sentinel output.
fn reference(
    inputs: &[Vec<u8>],
    send: &BlockLayout,
    recv: &BlockLayout,
    out_len: usize,
    me: usize,
) -> Vec<u8> {
    let mut out = vec![0xEEu8; out_len];
    let mut block = vec![0u8; send.block_len()];
    for (i, input) in inputs.iter().enumerate() {
        send.gather(input, me, 1, &mut block);
        recv.scatter(&block, i, 1, &mut out);
    }
    out
}

fn strided_case(world: usize, send: BlockLayout, recv: BlockLayout, in_len: usize, out_len: usize) {
    let inputs: Vec<Vec<u8>> = (0..world)
        .map(|r| {
            (0..in_len)
                .map(|i| (i * 7 + r * 31 + i / 251) as u8)
                .collect()
        })
        .collect();
    let want: Vec<Vec<u8>> = (0..world)
        .map(|me| reference(&inputs, &send, &recv, out_len, me))
        .collect();
    let inputs = Arc::new(inputs);
    let got = common::run(world, common::opts(), OP_TIMEOUT, move |r, c| {
        let mut out = vec![0xEEu8; out_len];
        for _ in 0..3 {
            c.all_to_all_strided(&inputs[r], send, &mut out, recv, None)
                .unwrap();
        }
        out
    });
    for r in 0..world {
        assert!(
            got[r] == want[r],
            "world {world} rank {r} send {send:?} recv {recv:?}: first difference at byte {:?}",
            got[r].iter().zip(&want[r]).position(|(a, b)| a != b)
        );
    }
}

/// The Ulysses exchange of `[b, s/p, h, d]` to `[b, s, h/p, d]` (bytes).
fn ulysses(p: usize, b: usize, s: usize, h: usize, d: usize) -> (BlockLayout, BlockLayout, usize) {
    let send = BlockLayout {
        block_step: h / p * d,
        runs: b * s / p,
        run: h / p * d,
        stride: h * d,
    };
    let recv = BlockLayout {
        block_step: s / p * h / p * d,
        runs: b,
        run: s / p * h / p * d,
        stride: s * h / p * d,
    };
    (send, recv, b * s / p * h * d)
}

#[test]
fn strided_all_to_all_matches_its_definition() {
    for world in [2usize, 3, 4] {
        // Runs of 2 KiB (scatter-gather I/O) and of 24 bytes (packed).
        for (b, s, h, d) in [(2, 8 * world, 2 * world, 1024), (3, 4 * world, world, 24)] {
            let (send, recv, len) = ulysses(world, b, s, h, d);
            strided_case(world, send, recv, len, len);
        }
        // The reverse exchange of the first one.
        let (send, recv, len) = ulysses(world, 2, 8 * world, 2 * world, 1024);
        strided_case(world, recv, send, len, len);
        // Contiguous blocks, and an output wider than the blocks (gaps keep
        // their sentinel).
        let flat = BlockLayout::contiguous(5000);
        let wide = BlockLayout {
            block_step: 1200,
            runs: 5,
            run: 1000,
            stride: 1200 * world,
        };
        strided_case(world, flat, wide, 5000 * world, 1200 * world * 5);
        // Overlapping receive runs are not received in place (packed path).
        let overlap = BlockLayout {
            block_step: 5000,
            runs: 5,
            run: 1000,
            stride: 1000,
        };
        strided_case(world, flat, overlap, 5000 * world, 5000 * world);
    }
}

/// Two groups on one store run collectives at the same time, each with its
/// own connections and secret.
#[test]
fn concurrent_groups_on_one_store() {
    let store: Arc<dyn Store> = Arc::new(HashStore::new());
    let hs: Vec<_> = (0..2)
        .flat_map(|g| (0..3).map(move |r| (g, r)))
        .map(|(g, r)| {
            let store = store.clone();
            std::thread::spawn(move || {
                let name = format!("g{g}");
                let t = Duration::from_secs_f64(OP_TIMEOUT);
                let c = common::member(store, r, 3, &name, common::opts(), t).unwrap();
                for i in 0..20 {
                    let mut v = vec![(g * 100 + r + i) as i64; 1000 + g * 50_000];
                    c.all_reduce(&mut v, ReduceOp::Sum).unwrap();
                    assert!(v.iter().all(|x| *x == (3 * (g * 100 + i) + 3) as i64));
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
}
