//! The checked front over an in-process backend: exact results through
//! borrowed buffers, call mismatches on every member, errors naming global
//! ranks, poisoning, non-blocking scopes (in flight, out of order, dropped,
//! a peer dying), out-of-band verification, strided packing and staging.

mod common;

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use comm_core::{
    BlockLayout, CommError, Communicator, DType, FrontOptions, P2pOp, RankId, ReduceOp, Tensor,
};
use common::mailbox::{run, Mailbox, Mailboxes};
use common::{FakeDevice, MemStore};

const T: Duration = Duration::from_secs(20);

#[test]
fn every_op_is_exact_through_borrowed_buffers() {
    let world = 3;
    run(world, true, T, move |r, c| {
        // all_reduce on a host slice: sums, products, avg of integers.
        let mut v: Vec<i64> = (0..5).map(|i| (r as i64 + 1) * 10 + i).collect();
        c.all_reduce(&mut v[..], ReduceOp::Sum).unwrap();
        let want: Vec<i64> = (0..5).map(|i| 60 + 3 * i).collect();
        assert_eq!(v, want);
        let mut a = vec![(r + 1) as i32 * 3; 4];
        c.all_reduce(&mut a, ReduceOp::Avg).unwrap();
        assert_eq!(a, [6; 4], "integer avg = sum / world, truncated");
        let mut f = [r as f32 + 0.5; 2];
        c.all_reduce(&mut f, ReduceOp::Avg).unwrap();
        assert_eq!(f, [1.5; 2]);
        // all_gather into a caller-owned vector.
        let mine = [r as u8; 2];
        let mut out = vec![0u8; 6];
        c.all_gather(&mine, &mut out).unwrap();
        assert_eq!(out, [0, 0, 1, 1, 2, 2]);
        // reduce_scatter with avg.
        let input: Vec<f64> = (0..6).map(|i| (i * (r + 1)) as f64).collect();
        let mut o = [0.0f64; 2];
        c.reduce_scatter(&input, &mut o, ReduceOp::Avg).unwrap();
        let k = 2 * r;
        assert_eq!(o, [k as f64 * 2.0, (k + 1) as f64 * 2.0]);
        // broadcast from 2, gather at 1, all_to_all, barrier.
        let mut b = [r as i32; 3];
        c.broadcast(&mut b, 2).unwrap();
        assert_eq!(b, [2; 3]);
        let mut g = vec![0i32; 3];
        c.gather(
            &[r as i32 * 7],
            if r == 1 { Some(&mut g[..]) } else { None },
            1,
        )
        .unwrap();
        if r == 1 {
            assert_eq!(g, [0, 7, 14]);
        }
        let send: Vec<i32> = (0..3).map(|j| (r * 10 + j) as i32).collect();
        let mut recv = vec![0i32; 3];
        c.all_to_all(&send, &mut recv).unwrap();
        assert_eq!(recv, [r as i32, 10 + r as i32, 20 + r as i32]);
        c.barrier().unwrap();
        // send/recv ring, twice (pair sequence numbers advance).
        for round in 0..2 {
            let next = (r + 1) % world;
            let prev = (r + world - 1) % world;
            let out = [r as i64 + round];
            let mut inp = [0i64];
            c.batch_send_recv(vec![
                P2pOp::send(&out, next).unwrap(),
                P2pOp::recv(&mut inp, prev).unwrap(),
            ])
            .unwrap();
            assert_eq!(inp, [prev as i64 + round]);
        }
        // Empty calls return without communicating.
        c.all_reduce(&mut Vec::<f32>::new(), ReduceOp::Sum).unwrap();
    });
}

#[test]
fn mismatched_calls_fail_on_every_member() {
    // Same byte count, different dtypes: never garbage, an error on both.
    let errs = run(2, true, T, |r, c| {
        if r == 0 {
            let mut v = [1.0f32; 4];
            c.all_reduce(&mut v, ReduceOp::Sum).unwrap_err()
        } else {
            let mut v = [1i32; 4];
            c.all_reduce(&mut v, ReduceOp::Sum).unwrap_err()
        }
    });
    for (r, e) in errs.iter().enumerate() {
        // The first member to notice reports the mismatch; one that hears
        // of it from that member's abort first reports it through that.
        assert!(
            matches!(
                e,
                CommError::CallMismatch { .. } | CommError::PeerAborted { .. }
            ),
            "rank {r}: {e}"
        );
        let text = e.to_string();
        assert!(
            text.contains("f32") && text.contains("i32"),
            "rank {r}: {text}"
        );
    }
    // Each member names itself as the broadcast root.
    let errs = run(2, true, T, |r, c| {
        let mut v = [r as u8; 8];
        c.broadcast(&mut v, r).unwrap_err()
    });
    for e in &errs {
        // Rank 0 (root 0) sends to 1, which expects root 1: both fail.
        assert!(e.is_fatal(), "{e}");
    }
    assert!(errs
        .iter()
        .any(|e| matches!(e, CommError::CallMismatch { .. })));
}

#[test]
fn timeouts_name_global_ranks_and_poison() {
    let errs = run(2, true, Duration::from_millis(1500), |r, c| {
        if r == 1 {
            // Never joins the collective; waits until rank 0 gave up.
            std::thread::sleep(Duration::from_secs(3));
            return None;
        }
        let mut v = [1u8; 4];
        let e = c.all_reduce(&mut v, ReduceOp::Sum).unwrap_err();
        let later = c.barrier().unwrap_err();
        Some((e, later, c.poisoned()))
    });
    let (e, later, poisoned) = errs.into_iter().next().unwrap().unwrap();
    assert!(matches!(e, CommError::Timeout { .. }), "{e}");
    assert_eq!(e.culprits(), vec![RankId::local(1).with_global(11)]);
    let text = e.to_string();
    assert!(
        text.contains("group rank 1 (global rank 11)") && text.contains("mbox:0"),
        "{text}"
    );
    // Refused later calls keep the cause's variant, so the culprit is still data.
    assert!(later.to_string().contains("refused"), "{later}");
    assert_eq!(later.culprits(), e.culprits());
    assert!(poisoned.is_some());
}

#[test]
fn a_peer_abort_names_the_culprit_not_the_messenger() {
    // Rank 2 never arrives; rank 0 times out and aborts; rank 1, still
    // waiting, is told by rank 0 and blames rank 2.
    let out = run(3, true, Duration::from_millis(1500), |r, c| {
        if r == 2 {
            std::thread::sleep(Duration::from_secs(4));
            return None;
        }
        if r == 1 {
            // Arrives later, so rank 0's deadline passes first.
            std::thread::sleep(Duration::from_millis(300));
            c.set_timeout(Duration::from_secs(20));
        }
        let mut v = [1u8; 4];
        Some(c.all_reduce(&mut v, ReduceOp::Sum).unwrap_err())
    });
    let e1 = out[1].as_ref().unwrap();
    assert!(matches!(e1, CommError::PeerAborted { .. }), "{e1}");
    assert_eq!(
        e1.culprits(),
        vec![RankId::local(2).with_global(12)],
        "{e1}"
    );
}

#[test]
fn nonblocking_handles_in_flight_out_of_order_and_dropped() {
    run(3, true, T, |r, c| {
        let mut a = vec![r as i64; 1000];
        let mut b = vec![(r * 2) as f32; 7];
        let mine = [r as i32; 3];
        let mut gathered = vec![0i32; 9];
        let send: Vec<i32> = (0..3).map(|j| (r * 3 + j) as i32).collect();
        let mut recv = vec![0i32; 3];
        let mut dropped = vec![1u8; 5];
        c.scope(|s| {
            let w1 = s.iall_reduce(&mut a, ReduceOp::Sum).unwrap();
            let w2 = s.iall_reduce(&mut b, ReduceOp::Max).unwrap();
            let w3 = s.iall_gather(&mine, &mut gathered).unwrap();
            let w4 = s.iall_to_all(&send, &mut recv).unwrap();
            // Dropped unwaited: still completes before the scope ends.
            drop(s.iall_reduce(&mut dropped, ReduceOp::Sum).unwrap());
            // Out of order.
            w4.wait().unwrap();
            w2.wait().unwrap();
            let mut w3 = w3;
            while !w3.test().unwrap() {
                std::thread::yield_now();
            }
            w3.wait().unwrap();
            w1.wait().unwrap();
        });
        assert_eq!(a, vec![3i64; 1000]);
        assert_eq!(b, vec![4.0f32; 7]);
        assert_eq!(gathered, [0, 0, 0, 1, 1, 1, 2, 2, 2]);
        assert_eq!(recv, [r as i32, 3 + r as i32, 6 + r as i32]);
        assert_eq!(dropped, vec![3u8; 5]);
        // A blocking call after the scope keeps its place in the order.
        let mut z = [1i32];
        c.all_reduce(&mut z, ReduceOp::Sum).unwrap();
        assert_eq!(z, [3]);
    });
}

#[test]
fn nonblocking_ring_exchange_overlaps_compute() {
    let world = 4;
    run(world, true, T, move |r, c| {
        let next = (r + 1) % world;
        let prev = (r + world - 1) % world;
        let mut cur = vec![r as i32; 256];
        let mut seen = vec![r as i32];
        for _ in 1..world {
            let mut incoming = vec![0i32; 256];
            c.scope(|s| {
                let w = s
                    .batch_isend_irecv(vec![
                        P2pOp::send(&cur, next).unwrap(),
                        P2pOp::recv(&mut incoming, prev).unwrap(),
                    ])
                    .unwrap();
                // "Compute" on the current block while it travels.
                let _sum: i64 = cur.iter().map(|&x| i64::from(x)).sum();
                w.wait().unwrap();
            });
            cur = incoming;
            seen.push(cur[0]);
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..world as i32).collect::<Vec<_>>());
    });
}

#[test]
fn pending_waits_all_report_the_dead_peer() {
    let boxes = Mailboxes::new();
    let start = Arc::new(Barrier::new(2));
    let b2 = boxes.clone();
    let s2 = start.clone();
    // Rank 1 joins, then dies without sending anything.
    let dead = std::thread::spawn(move || {
        let _c = Communicator::new(
            Box::new(Mailbox::new(b2.clone(), 1, 2, true)),
            FrontOptions::new("g").timeout(T),
        );
        s2.wait();
        b2.kill(1);
    });
    let c = Communicator::new(
        Box::new(Mailbox::new(boxes, 0, 2, true)),
        FrontOptions::new("g").global_ranks(vec![0, 5]).timeout(T),
    );
    start.wait();
    let began = Instant::now();
    let mut bufs = vec![vec![0u8; 16]; 4];
    let errs: Vec<CommError> = c.scope(|s| {
        let works: Vec<_> = bufs
            .iter_mut()
            .map(|b| s.iall_reduce(b, ReduceOp::Sum).unwrap())
            .collect();
        works.into_iter().map(|w| w.wait().unwrap_err()).collect()
    });
    dead.join().unwrap();
    assert!(began.elapsed() < Duration::from_secs(10));
    for e in &errs {
        assert!(matches!(e, CommError::PeerLost { .. }), "{e}");
        assert_eq!(e.culprits(), vec![RankId::local(1).with_global(5)]);
    }
}

#[test]
fn backends_without_checks_are_verified_out_of_band() {
    // Data on an unchecked backend, descriptions checked over a checked one.
    let data = Mailboxes::new();
    let host = Mailboxes::new();
    let hs: Vec<_> = (0..2)
        .map(|r| {
            let (data, host) = (data.clone(), host.clone());
            std::thread::spawn(move || {
                let verifier = Communicator::new(
                    Box::new(Mailbox::new(host, r, 2, true)),
                    FrontOptions::new("host").timeout(T),
                );
                let c = Communicator::new(
                    Box::new(Mailbox::new(data, r, 2, false)),
                    FrontOptions::new("dev").timeout(T).verifier(verifier),
                );
                let mut ok = [r as i32 + 1; 2];
                c.all_reduce(&mut ok, ReduceOp::Prod).unwrap();
                assert_eq!(ok, [2, 2]);
                let out = [7u8];
                let mut inp = [0u8];
                c.batch_send_recv(vec![
                    P2pOp::send(&out, 1 - r).unwrap(),
                    P2pOp::recv(&mut inp, 1 - r).unwrap(),
                ])
                .unwrap();
                assert_eq!(inp, [7]);
                let e = if r == 0 {
                    c.all_reduce(&mut [0.0f64; 2], ReduceOp::Sum).unwrap_err()
                } else {
                    c.all_reduce(&mut [0i64; 2], ReduceOp::Sum).unwrap_err()
                };
                assert!(matches!(e, CommError::CallMismatch { .. }), "rank {r}: {e}");
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
}

fn ulysses_blocks(b: usize, s: usize, h: usize, d: usize, p: usize) -> (BlockLayout, BlockLayout) {
    let hp = h / p;
    (
        BlockLayout {
            block_step: hp * d,
            runs: b * s,
            run: hp * d,
            stride: h * d,
        },
        BlockLayout {
            block_step: s * hp * d,
            runs: b,
            run: s * hp * d,
            stride: p * s * hp * d,
        },
    )
}

#[test]
fn strided_all_to_all_is_packed_for_backends_without_it() {
    let (b, s, h, d, p) = (2, 3, 4, 5, 2);
    run(p, true, T, move |r, c| {
        // x[b][s][h][d] = unique value per (rank, position).
        let x: Vec<i32> = (0..b * s * h * d)
            .map(|i| (r * 10_000 + i) as i32)
            .collect();
        let (send, recv) = ulysses_blocks(b, s, h, d, p);
        let mut out = vec![-1i32; b * s * p * (h / p) * d];
        c.all_to_all_strided(&x, send, &mut out, recv, None)
            .unwrap();
        // Reference: out[bb][src*s + ss][hh][dd] = x_src[bb][ss][r*hp + hh][dd].
        let hp = h / p;
        for bb in 0..b {
            for src in 0..p {
                for ss in 0..s {
                    for hh in 0..hp {
                        for dd in 0..d {
                            let o = ((bb * p * s + src * s + ss) * hp + hh) * d + dd;
                            let i = ((bb * s + ss) * h + r * hp + hh) * d + dd;
                            assert_eq!(out[o], (src * 10_000 + i) as i32);
                        }
                    }
                }
            }
        }
    });
}

#[test]
fn device_memory_is_staged_for_host_backends() {
    run(2, true, T, |r, c| {
        let bytes = bytemuck::cast_slice(&[r as f32 + 1.0, 10.0]).to_vec();
        let mut dev =
            Tensor::from_device_storage(Box::new(FakeDevice(bytes)), [2], DType::F32).unwrap();
        c.all_reduce(&mut dev, ReduceOp::Sum).unwrap();
        assert_eq!(dev.to_vec::<f32>().unwrap(), [3.0, 20.0]);
        let mut out =
            Tensor::from_device_storage(Box::new(FakeDevice(vec![0; 16])), [4], DType::F32)
                .unwrap();
        c.all_gather(&dev, &mut out).unwrap();
        assert_eq!(out.to_vec::<f32>().unwrap(), [3.0, 20.0, 3.0, 20.0]);
        // And in a scope.
        let mut dev2 =
            Tensor::from_device_storage(Box::new(FakeDevice(vec![1; 4])), [4], DType::U8).unwrap();
        c.scope(|s| s.iall_reduce(&mut dev2, ReduceOp::Sum).unwrap().wait())
            .unwrap();
        assert_eq!(dev2.to_vec::<u8>().unwrap(), [2; 4]);
    });
}

#[test]
fn timeouts_say_where_sequences_diverge() {
    let store = MemStore::new();
    let boxes = Mailboxes::new();
    let hs: Vec<_> = (0..3)
        .map(|r| {
            let (store, boxes) = (store.clone(), boxes.clone());
            std::thread::spawn(move || {
                let c = Communicator::new(
                    Box::new(Mailbox::new(boxes, r, 3, true)),
                    FrontOptions::new("div")
                        .timeout(Duration::from_secs(2))
                        .store(Arc::new(store)),
                );
                let mut v = [1u8];
                c.all_reduce(&mut v, ReduceOp::Sum).unwrap();
                if r == 2 {
                    // Rank 2 takes another branch: it waits for a message
                    // nobody sends instead of entering the barrier.
                    let mut b = [0u8; 4];
                    return c.recv(&mut b, 0).unwrap_err();
                }
                c.barrier().unwrap_err()
            })
        })
        .collect();
    let errs: Vec<CommError> = hs.into_iter().map(|h| h.join().unwrap()).collect();
    for e in &errs {
        assert!(matches!(e, CommError::Timeout { .. }), "{e}");
    }
    let text = errs[0].to_string();
    assert!(text.contains("diverge at call #1"), "{text}");
    assert!(
        text.contains("barrier #1") && text.contains("send_recv #1"),
        "{text}"
    );
}
