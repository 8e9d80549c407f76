//! Thread-based tests of every ShmCommunicator primitive: each rank is a
//! thread with its own mapping of the segment (as separate processes would).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use comm_core::{CommError, DType, DeviceCommunicator, ReduceOp, Store, Tensor};
use comm_shm::{list_segments, ShmCommunicator, ShmOptions};
use common::*;
use dist_utils::HashStore;

fn opts(job_id: &str) -> ShmOptions {
    ShmOptions {
        timeout: Duration::from_secs(60),
        workspace_bytes: 4096, // tiny, so chunking is exercised
        p2p_bytes: 4096,
        job_id: job_id.into(),
        ..ShmOptions::default()
    }
}

/// `o` with single copy (cross-memory attach) on for every non-empty block,
/// or off (the two-copy path).
fn with_sc(o: ShmOptions, single_copy: bool) -> ShmOptions {
    ShmOptions {
        single_copy,
        single_copy_min_bytes: 1,
        ..o
    }
}

/// Runs `f(rank, comm)` on `world` threads, each with its own communicator.
fn run_group<R: Send>(
    world: usize,
    o: ShmOptions,
    f: impl Fn(usize, &mut ShmCommunicator) -> R + Sync,
) -> Vec<R> {
    let store: Arc<dyn Store> = Arc::new(HashStore::new());
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..world)
            .map(|r| {
                let (store, o, f) = (store.clone(), o.clone(), &f);
                s.spawn(move || {
                    let mut c = ShmCommunicator::new(&*store, r, world, o).unwrap();
                    f(r, &mut c)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

const SIZES: [usize; 5] = [0, 1, 7, 1500, 3001];

#[test]
fn every_primitive_dtype_op_world_1_to_5() {
    let job = job("prim");
    for (sc, world) in [false, true]
        .into_iter()
        .flat_map(|sc| (1..=5).map(move |w| (sc, w)))
    {
        run_group(world, with_sc(opts(&job), sc), |me, c| {
            assert_eq!(c.single_copy_active(), sc && world > 1);
            assert_eq!(c.world_size(), world);
            assert_eq!(c.rank(), me);
            for (salt, dt) in DType::ALL.into_iter().enumerate() {
                for &n in &SIZES {
                    let inputs: Vec<Tensor> = (0..world).map(|r| input(dt, r, n, salt)).collect();
                    // all_reduce and reduce_scatter for every op
                    for op in ReduceOp::ALL {
                        let mut t = inputs[me].try_clone().unwrap();
                        c.all_reduce(&mut t, op).unwrap();
                        assert_eq!(
                            t.as_bytes().unwrap(),
                            reference(&inputs, op).as_bytes().unwrap(),
                            "all_reduce {dt} {op} n={n} world={world} rank={me}"
                        );
                        let big: Vec<Tensor> = (0..world)
                            .map(|r| input(dt, r, n * world, salt + 1))
                            .collect();
                        let mut out = Tensor::zeros([n], dt);
                        c.reduce_scatter(&big[me], &mut out, op).unwrap();
                        let full = reference(&big, op);
                        let es = dt.size();
                        assert_eq!(
                            out.as_bytes().unwrap(),
                            &full.as_bytes().unwrap()[me * n * es..(me + 1) * n * es],
                            "reduce_scatter {dt} {op} n={n} world={world} rank={me}"
                        );
                    }
                    // all_gather
                    let mut out = Tensor::zeros([n * world], dt);
                    c.all_gather(&inputs[me], &mut out).unwrap();
                    assert_eq!(
                        out.as_bytes().unwrap(),
                        concat(&inputs),
                        "all_gather {dt} n={n} w={world}"
                    );
                    // broadcast and gather from every root
                    for root in 0..world {
                        let mut t = if me == root {
                            inputs[me].try_clone().unwrap()
                        } else {
                            Tensor::zeros([n], dt)
                        };
                        c.broadcast(&mut t, root).unwrap();
                        assert_eq!(
                            t.as_bytes().unwrap(),
                            inputs[root].as_bytes().unwrap(),
                            "broadcast {dt} n={n} root={root}"
                        );
                        let mut out = Tensor::zeros([n * world], dt);
                        c.gather(
                            &inputs[me],
                            if me == root { Some(&mut out) } else { None },
                            root,
                        )
                        .unwrap();
                        if me == root {
                            assert_eq!(
                                out.as_bytes().unwrap(),
                                concat(&inputs),
                                "gather {dt} n={n} root={root}"
                            );
                        }
                    }
                    // all_to_all: block j of rank i's input goes to rank j
                    let a2a: Vec<Tensor> = (0..world)
                        .map(|r| input(dt, r, n * world, salt + 2))
                        .collect();
                    let mut out = Tensor::zeros([n * world], dt);
                    c.all_to_all(&a2a[me], &mut out).unwrap();
                    let es = dt.size() * n;
                    let expect: Vec<u8> = (0..world)
                        .flat_map(|i| a2a[i].as_bytes().unwrap()[me * es..(me + 1) * es].to_vec())
                        .collect();
                    assert_eq!(
                        out.as_bytes().unwrap(),
                        expect,
                        "all_to_all {dt} n={n} w={world}"
                    );
                    // send / recv between every ordered pair, in a global order
                    for s in 0..world {
                        for d in 0..world {
                            if s == d {
                                continue;
                            }
                            let msg = input(dt, s * 10 + d, n * 3, salt);
                            if me == s {
                                c.send(&msg, d).unwrap();
                            } else if me == d {
                                let mut t = Tensor::zeros([n * 3], dt);
                                c.recv(&mut t, s).unwrap();
                                assert_eq!(t, msg, "send/recv {s}->{d} {dt} n={n}");
                            }
                        }
                    }
                    c.barrier().unwrap();
                }
            }
        });
    }
    assert!(
        list_segments(&job).is_empty(),
        "leaked: {:?}",
        list_segments(&job)
    );
}

#[test]
fn all_reduce_bit_identical_across_ranks_and_algorithms() {
    // Random-looking floats where summation order changes the rounding.
    let job = job("bits");
    for world in [2, 3, 4, 5] {
        for (one_shot_max, sc) in [
            (0usize, false),
            (1 << 30, false),
            (0, true),
            (1 << 30, true),
        ] {
            let o = with_sc(
                ShmOptions {
                    workspace_bytes: 64 << 10,
                    one_shot_max_bytes: one_shot_max,
                    ..opts(&job)
                },
                sc,
            );
            let res = run_group(world, o, |me, c| {
                let mut rng = Rng(1234 + me as u64);
                let v: Vec<f32> = (0..50_001)
                    .map(|_| (rng.next() as f64 / u64::MAX as f64 * 2e4 - 1e4) as f32)
                    .collect();
                let mut t = Tensor::from_vec1(v);
                c.all_reduce(&mut t, ReduceOp::Sum).unwrap();
                t.as_bytes().unwrap().to_vec()
            });
            for r in &res[1..] {
                assert!(r == &res[0], "ranks disagree at world {world}");
            }
            // and equal to the rank-order reference
            let inputs: Vec<Tensor> = (0..world)
                .map(|me| {
                    let mut rng = Rng(1234 + me as u64);
                    Tensor::from_vec1(
                        (0..50_001)
                            .map(|_| (rng.next() as f64 / u64::MAX as f64 * 2e4 - 1e4) as f32)
                            .collect::<Vec<f32>>(),
                    )
                })
                .collect();
            assert_eq!(
                res[0],
                reference(&inputs, ReduceOp::Sum).as_bytes().unwrap()
            );
        }
    }
}

#[test]
fn consecutive_large_ops_and_mixed_sequence() {
    let job = job("mix");
    for (sc, min) in [(false, 1), (true, 1), (true, 16 << 10)] {
        let o = ShmOptions {
            workspace_bytes: 8192,
            one_shot_max_bytes: 4096,
            single_copy: sc,
            single_copy_min_bytes: min,
            ..opts(&job)
        };
        run_group(3, o, |me, c| {
            for it in 0..50 {
                let n = 1 + (it * 997) % 20_000;
                let inputs: Vec<Tensor> = (0..3).map(|r| input(DType::F32, r, n, it)).collect();
                let mut t = inputs[me].try_clone().unwrap();
                c.all_reduce(&mut t, ReduceOp::Sum).unwrap();
                assert_eq!(t, reference(&inputs, ReduceOp::Sum));
                let mut b = if me == it % 3 {
                    inputs[me].try_clone().unwrap()
                } else {
                    Tensor::zeros([n], DType::F32)
                };
                c.broadcast(&mut b, it % 3).unwrap();
                assert_eq!(b, inputs[it % 3]);
                let mut g = Tensor::zeros([3 * n], DType::F32);
                c.all_gather(&inputs[me], &mut g).unwrap();
                assert_eq!(g.as_bytes().unwrap(), concat(&inputs));
                let mut a = Tensor::zeros([3 * n], DType::F32);
                let a2a: Vec<Tensor> = (0..3).map(|r| input(DType::F32, r, 3 * n, it)).collect();
                c.all_to_all(&a2a[me], &mut a).unwrap();
                let bs = 4 * n;
                let expect: Vec<u8> = (0..3)
                    .flat_map(|i| a2a[i].as_bytes().unwrap()[me * bs..(me + 1) * bs].to_vec())
                    .collect();
                assert_eq!(a.as_bytes().unwrap(), expect);
            }
        });
    }
}

#[test]
fn single_copy_is_agreed_by_every_member() {
    let job = job("scagree");
    // Every member asks for it: on (threads of one process can always read
    // their own process).
    let on = run_group(3, with_sc(opts(&job), true), |_, c| c.single_copy_active());
    assert_eq!(on, [true; 3]);
    // Off everywhere.
    let off = run_group(3, with_sc(opts(&job), false), |_, c| c.single_copy_active());
    assert_eq!(off, [false; 3]);
    // One member opts out: nobody uses it, and the collectives still agree.
    let store: Arc<dyn Store> = Arc::new(HashStore::new());
    let res: Vec<bool> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3)
            .map(|r| {
                let (store, o) = (store.clone(), with_sc(opts(&job), r != 1));
                s.spawn(move || {
                    let mut c = ShmCommunicator::new(&*store, r, 3, o).unwrap();
                    let inputs: Vec<Tensor> =
                        (0..3).map(|q| input(DType::F32, q, 5000, 1)).collect();
                    let mut g = Tensor::zeros([15000], DType::F32);
                    c.all_gather(&inputs[r], &mut g).unwrap();
                    assert_eq!(g.as_bytes().unwrap(), concat(&inputs));
                    c.single_copy_active()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(res, [false; 3]);
}

#[test]
fn mismatched_calls_are_a_protocol_error() {
    let job = job("mism");
    let res = run_group(
        2,
        ShmOptions {
            timeout: Duration::from_secs(5),
            ..opts(&job)
        },
        |me, c| {
            let mut t = Tensor::from_vec1(vec![1f32; if me == 0 { 10 } else { 11 }]);
            c.all_reduce(&mut t, ReduceOp::Sum)
        },
    );
    for r in res {
        let e = r.unwrap_err();
        assert!(matches!(e, CommError::Protocol(_)), "{e}");
    }
}

#[test]
fn missing_rank_times_out_naming_it() {
    let job = job("tmo");
    let o = ShmOptions {
        timeout: Duration::from_millis(400),
        ..opts(&job)
    };
    let res = run_group(3, o, |me, c| {
        if me == 2 {
            // arrive late: after the others gave up
            std::thread::sleep(Duration::from_millis(1500));
            return Ok(());
        }
        let mut t = Tensor::from_vec1(vec![1f32; 4]);
        let t0 = Instant::now();
        let r = c.all_reduce(&mut t, ReduceOp::Sum);
        assert!(t0.elapsed() < Duration::from_secs(3));
        r
    });
    for r in &res[..2] {
        match r {
            Err(CommError::Timeout { missing, .. }) => {
                assert_eq!(missing, &vec!["rank 2".to_string()])
            }
            other => panic!("expected timeout, got {other:?}"),
        }
    }
}

#[test]
fn dropped_rank_is_peer_lost_and_abort_wakes_everyone() {
    let job = job("drop");
    let res = run_group(3, opts(&job), |me, c| {
        if me == 1 {
            return Ok(()); // drops its communicator at once
        }
        c.barrier()
    });
    for r in [&res[0], &res[2]] {
        assert!(
            matches!(r, Err(CommError::PeerLost { rank: 1, .. })),
            "{r:?}"
        );
    }
    let res = run_group(3, opts(&job), |me, c| {
        if me == 0 {
            std::thread::sleep(Duration::from_millis(200));
            c.abort();
        }
        let t0 = Instant::now();
        let mut t = Tensor::from_vec1(vec![1f32; 4]);
        let r = if me == 0 {
            Ok(())
        } else {
            c.broadcast(&mut t, 0)
        };
        (r, t0.elapsed())
    });
    for (r, el) in &res[1..] {
        assert!(matches!(r, Err(CommError::Aborted(_))), "{r:?}");
        assert!(*el < Duration::from_secs(2));
    }
}

#[test]
fn member_that_never_attaches_times_out_and_nothing_leaks() {
    let job = job("noatt");
    let store = HashStore::new();
    let o = ShmOptions {
        timeout: Duration::from_millis(300),
        ..opts(&job)
    };
    let e = ShmCommunicator::new(&store, 0, 3, o).unwrap_err();
    match e {
        CommError::Timeout { missing, .. } => assert_eq!(missing, ["rank 1", "rank 2"]),
        other => panic!("{other}"),
    }
    assert!(list_segments(&job).is_empty());
}

#[test]
fn segments_are_unlinked_once_everyone_attached() {
    let job = job("unl");
    run_group(4, opts(&job), |_, c| {
        assert!(c.segment().is_some());
        assert!(list_segments(&job).is_empty(), "{:?}", list_segments(&job));
        c.barrier().unwrap();
    });
}

#[test]
fn errors_on_bad_arguments() {
    let job = job("args");
    run_group(2, opts(&job), |me, c| {
        let t = Tensor::from_vec1(vec![1f32; 4]);
        assert!(c.send(&t, me).is_err());
        let mut out = Tensor::zeros([3], DType::F32);
        assert!(matches!(
            c.all_gather(&t, &mut out),
            Err(CommError::ShapeMismatch { .. })
        ));
        let mut out = Tensor::zeros([8], DType::I32);
        assert!(matches!(
            c.all_gather(&t, &mut out),
            Err(CommError::DTypeMismatch { .. })
        ));
        assert!(c.broadcast(&mut t.try_clone().unwrap(), 5).is_err());
        // a recv of the wrong size is reported, not silently truncated
        if me == 0 {
            c.send(&t, 1).unwrap();
        } else {
            let mut small = Tensor::zeros([2], DType::F32);
            assert!(matches!(
                c.recv(&mut small, 0),
                Err(CommError::ShapeMismatch { .. })
            ));
        }
    });
}

#[test]
fn idle_waiter_uses_little_cpu() {
    let job = job("idle");
    run_group(2, opts(&job), |me, c| {
        if me == 0 {
            let before = thread_cpu();
            let t0 = Instant::now();
            c.barrier().unwrap();
            let cpu = thread_cpu() - before;
            let wall = t0.elapsed().as_secs_f64();
            eprintln!("idle barrier: {cpu:.4}s CPU over {wall:.2}s (waiting thread)");
            assert!(
                cpu / wall < 0.01,
                "waiting used {:.1}% of a core",
                100.0 * cpu / wall
            );
        } else {
            std::thread::sleep(Duration::from_secs(2));
            c.barrier().unwrap();
        }
    });
}

/// This thread's CPU time (user + system) in seconds.
fn thread_cpu() -> f64 {
    let s = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    let rest = s.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // fields after ')' start at index 2 (state); utime = 14th field overall -> index 11 here
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[test]
fn mismatched_single_copy_calls_are_a_protocol_error() {
    let job = job("mismsc");
    let o = ShmOptions {
        timeout: Duration::from_secs(5),
        ..with_sc(opts(&job), true)
    };
    let res = run_group(2, o, |me, c| {
        let n = if me == 0 { 10 } else { 11 };
        let t = Tensor::from_vec1(vec![1f32; n]);
        let mut out = Tensor::zeros([2 * n], DType::F32);
        c.all_gather(&t, &mut out)
    });
    for r in res {
        let e = r.unwrap_err();
        assert!(matches!(e, CommError::Protocol(_)), "{e}");
    }
}
