//! Every primitive of the shm backend through the checked front
//! ([`comm_core::Communicator`], made by `ShmFactory` through the registry),
//! ranks as threads (each with its own mapping of the segment, as separate
//! processes would have); `multiprocess.rs` runs the same data paths across
//! processes.

mod common;

use comm_core::{BlockLayout, Collective, DType, Layout, P2pOp, ReduceOp, Tensor};
use comm_shm::ShmOptions;
use common::*;

/// `o` with single copy (cross-memory attach) on for every non-empty block,
/// or off (the two-copy path).
fn with_sc(o: ShmOptions, single_copy: bool) -> ShmOptions {
    o.single_copy(single_copy, 1)
}

const SIZES: [usize; 5] = [0, 1, 7, 1500, 3001];

fn check_every_primitive(r: &Rank, salt0: usize) {
    let (me, world, c) = (r.rank, r.world, &r.comm);
    for (salt, dt) in DType::ALL.into_iter().enumerate() {
        let salt = salt + salt0;
        for &n in &SIZES {
            let inputs: Vec<Tensor> = (0..world).map(|q| input(dt, q, n, salt)).collect();
            for op in ReduceOp::ALL {
                let mut t = inputs[me].try_clone().unwrap();
                c.all_reduce(&mut t, op).unwrap();
                assert_eq!(
                    t.as_bytes().unwrap(),
                    reference(&inputs, op).as_bytes().unwrap(),
                    "all_reduce {dt} {op} n={n} world={world} rank={me}"
                );
                let big: Vec<Tensor> = (0..world)
                    .map(|q| input(dt, q, n * world, salt + 1))
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
            let mut out = Tensor::zeros([n * world], dt);
            c.all_gather(&inputs[me], &mut out).unwrap();
            assert_eq!(
                out.as_bytes().unwrap(),
                concat(&inputs),
                "all_gather {dt} n={n}"
            );
            for root in 0..world {
                let mut t = if me == root {
                    inputs[me].try_clone().unwrap()
                } else {
                    Tensor::zeros([n], dt)
                };
                c.broadcast(&mut t, root).unwrap();
                assert_eq!(t.as_bytes().unwrap(), inputs[root].as_bytes().unwrap());
                let mut out = Tensor::zeros([n * world], dt);
                c.gather(&inputs[me], (me == root).then_some(&mut out), root)
                    .unwrap();
                if me == root {
                    assert_eq!(
                        out.as_bytes().unwrap(),
                        concat(&inputs),
                        "gather root={root}"
                    );
                }
            }
            // all_to_all: block j of rank i's input goes to rank j.
            let a2a: Vec<Tensor> = (0..world)
                .map(|q| input(dt, q, n * world, salt + 2))
                .collect();
            let mut out = Tensor::zeros([n * world], dt);
            c.all_to_all(&a2a[me], &mut out).unwrap();
            let bs = dt.size() * n;
            let expect: Vec<u8> = (0..world)
                .flat_map(|i| a2a[i].as_bytes().unwrap()[me * bs..(me + 1) * bs].to_vec())
                .collect();
            assert_eq!(out.as_bytes().unwrap(), expect, "all_to_all {dt} n={n}");
            // send / recv between every ordered pair, in a global order.
            for s in 0..world {
                for d in (0..world).filter(|&d| d != s) {
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
}

#[test]
fn every_primitive_dtype_op_world_1_to_5() {
    for sc in [false, true] {
        for world in 1..=5 {
            let job = job("prim");
            on_threads(world, with_sc(opts(&job), sc), move |r| {
                check_every_primitive(r, world);
            });
        }
    }
}

#[test]
fn all_reduce_bit_identical_across_ranks_and_algorithms() {
    // Random-looking floats where summation order changes the rounding.
    let data = |me: usize| -> Vec<f32> {
        let mut rng = Rng(1234 + me as u64);
        (0..50_001)
            .map(|_| (rng.next() as f64 / u64::MAX as f64 * 2e4 - 1e4) as f32)
            .collect()
    };
    for world in [2, 3, 4, 5] {
        let inputs: Vec<Tensor> = (0..world).map(|q| Tensor::from_vec1(data(q))).collect();
        let want = reference(&inputs, ReduceOp::Sum);
        for (one_shot_max, sc) in [
            (0usize, false),
            (1 << 30, false),
            (0, true),
            (1 << 30, true),
        ] {
            let job = job("bits");
            let o = with_sc(
                opts(&job)
                    .workspace_bytes(64 << 10)
                    .one_shot_max_bytes(one_shot_max),
                sc,
            );
            let res = on_threads(world, o, move |r| {
                let mut v = data(r.rank);
                r.comm.all_reduce(&mut v, ReduceOp::Sum).unwrap();
                v
            });
            for v in &res {
                assert_eq!(
                    bytemuck_bytes(v),
                    want.as_bytes().unwrap(),
                    "world {world} one_shot_max {one_shot_max} sc {sc}"
                );
            }
        }
    }
}

fn bytemuck_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn consecutive_large_ops_and_mixed_sequence() {
    for (sc, min) in [(false, 1), (true, 1), (true, 16 << 10)] {
        let job = job("mix");
        let o = opts(&job)
            .workspace_bytes(8192)
            .one_shot_max_bytes(4096)
            .single_copy(sc, min);
        on_threads(3, o, |r| {
            let (me, c) = (r.rank, &r.comm);
            for it in 0..50 {
                let n = 1 + (it * 997) % 20_000;
                let inputs: Vec<Tensor> = (0..3).map(|q| input(DType::F32, q, n, it)).collect();
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
                let a2a: Vec<Tensor> = (0..3).map(|q| input(DType::F32, q, 3 * n, it)).collect();
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

/// Strided all_to_all against comm-core's reference gather/scatter: the
/// Ulysses exchanges `[1, S/P, H, D] <-> [1, S, H/P, D]` both ways, a
/// multi-batch input with packed output, and layouts with gaps, on both
/// data paths and with chunks smaller than a block.
#[test]
fn strided_all_to_all_is_exact() {
    for (sc, world) in [(false, 2), (false, 3), (false, 4), (true, 2), (true, 4)] {
        let job = job("strided");
        let o = opts(&job).workspace_bytes(4096).single_copy(sc, 1);
        on_threads(world, o, move |r| check_strided(r, sc));
    }
}

/// The layouts of one test case: (send, recv, input len, output len, shape).
fn strided_cases(p: usize) -> Vec<(BlockLayout, BlockLayout, usize, usize, [usize; 4])> {
    let (s, h, d) = (6 * p, 2 * p, 5);
    let (sp, hp) = (s / p, h / p);
    let mut v = Vec::new();
    // Mode 1: [1, S/P, H, D] -> [1, S, H/P, D].
    v.push((
        BlockLayout {
            block_step: hp * d,
            runs: sp,
            run: hp * d,
            stride: h * d,
        },
        BlockLayout::contiguous(sp * hp * d),
        sp * h * d,
        s * hp * d,
        [1, sp, h, d],
    ));
    // Mode 2: [1, S, H/P, D] -> [1, S/P, H, D].
    v.push((
        BlockLayout::contiguous(sp * hp * d),
        BlockLayout {
            block_step: hp * d,
            runs: sp,
            run: hp * d,
            stride: h * d,
        },
        s * hp * d,
        sp * h * d,
        [1, s, hp, d],
    ));
    // Three batches on the send side, packed on the receive side.
    let b = 3;
    v.push((
        BlockLayout {
            block_step: hp * d,
            runs: b * sp,
            run: hp * d,
            stride: h * d,
        },
        BlockLayout::contiguous(b * sp * hp * d),
        b * sp * h * d,
        p * b * sp * hp * d,
        [b, sp, h, d],
    ));
    // Gaps everywhere: runs of 3 with stride 7, blocks 40 apart.
    v.push((
        BlockLayout {
            block_step: 40,
            runs: 5,
            run: 3,
            stride: 7,
        },
        BlockLayout {
            block_step: 33,
            runs: 3,
            run: 5,
            stride: 11,
        },
        40 * p,
        33 * p + 10,
        [p, 40, 0, 0],
    ));
    v
}

fn check_strided(r: &Rank, sc: bool) {
    let (me, p) = (r.rank, r.world);
    for (case, (send, recv, n_in, n_out, shape)) in strided_cases(p).into_iter().enumerate() {
        let inp_of =
            |q: usize| -> Vec<i32> { (0..n_in).map(|i| (q * 1_000_000 + i) as i32).collect() };
        let mut out = vec![i32::MIN; n_out];
        let layout = Layout {
            op: Collective::AllToAll4d,
            shape: &shape,
            arg: 2 * 16 + 1,
        };
        r.comm
            .all_to_all_strided(&inp_of(me), send, &mut out, recv, Some(layout))
            .unwrap();
        let mut want = vec![i32::MIN; n_out];
        let mut block = vec![0u8; send.block_len() * 4];
        for q in 0..p {
            let src: Vec<u8> = inp_of(q).iter().flat_map(|x| x.to_le_bytes()).collect();
            send.gather(&src, me, 4, &mut block);
            let mut dst: Vec<u8> = want.iter().flat_map(|x| x.to_le_bytes()).collect();
            recv.scatter(&block, q, 4, &mut dst);
            want = dst
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
                .collect();
        }
        assert_eq!(
            out, want,
            "case {case} world {p} single copy {sc} rank {me}"
        );
    }
}

/// A ring exchange (every rank sends to the next and receives from the
/// previous in one batch) with messages many times larger than the two
/// slots of a channel, plus several messages to one peer and empty ones in
/// the same batch: everything progresses together and arrives in order.
#[test]
fn batched_ring_exchange_larger_than_the_slots() {
    for world in 2..=5 {
        let job = job("ring");
        on_threads(world, opts(&job), |r| {
            let (me, w) = (r.rank, r.world);
            let (next, prev) = ((me + 1) % w, (me + w - 1) % w);
            let n = 10 * 4096 / 4 + 3; // ten slots and a bit, in f32
            let msg = |from: usize, tag: usize| input(DType::F32, from * 10 + tag, n, tag);
            for round in 0..3 {
                let a = msg(me, round);
                let b = msg(me, round + 5);
                let empty: Vec<f32> = Vec::new();
                let mut ra = Tensor::zeros([n], DType::F32);
                let mut rb = Tensor::zeros([n], DType::F32);
                let mut re: Vec<f32> = Vec::new();
                r.comm
                    .batch_send_recv(vec![
                        P2pOp::send(&a, next).unwrap(),
                        P2pOp::send(&empty, next).unwrap(),
                        P2pOp::recv(&mut ra, prev).unwrap(),
                        P2pOp::send(&b, next).unwrap(),
                        P2pOp::recv(&mut re, prev).unwrap(),
                        P2pOp::recv(&mut rb, prev).unwrap(),
                    ])
                    .unwrap();
                assert_eq!(ra, msg(prev, round), "ring round {round} world {w}");
                assert_eq!(rb, msg(prev, round + 5));
            }
            r.comm.barrier().unwrap();
        });
    }
}

#[test]
fn single_copy_is_agreed_by_every_member() {
    use comm_shm::ShmCommunicator;
    let active = |r: &Rank| {
        r.comm
            .with_backend(|b| {
                b.as_any_mut()
                    .and_then(|a| a.downcast_mut::<ShmCommunicator>())
                    .map(|s| s.single_copy_active())
            })
            .unwrap()
            .unwrap()
    };
    let j = job("scagree");
    assert_eq!(on_threads(3, with_sc(opts(&j), true), active), [true; 3]);
    assert_eq!(on_threads(3, with_sc(opts(&j), false), active), [false; 3]);
    // One member opts out: nobody uses it, and the collectives still agree.
    let store: std::sync::Arc<dyn comm_core::Store> =
        std::sync::Arc::new(dist_utils::HashStore::new());
    let res: Vec<bool> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3)
            .map(|q| {
                let (store, o, j) = (store.clone(), with_sc(opts(&j), q != 1), j.clone());
                s.spawn(move || {
                    let comm = join(store.clone(), q, 3, &o).unwrap();
                    let r = Rank {
                        rank: q,
                        world: 3,
                        comm,
                        store,
                        job: j.clone(),
                    };
                    let inputs: Vec<Tensor> =
                        (0..3).map(|x| input(DType::F32, x, 5000, 1)).collect();
                    let mut g = Tensor::zeros([15000], DType::F32);
                    r.comm.all_gather(&inputs[q], &mut g).unwrap();
                    assert_eq!(g.as_bytes().unwrap(), concat(&inputs));
                    active(&r)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(res, [false; 3]);
    assert_no_segments(&j);
}

#[test]
fn segments_are_unlinked_once_everyone_attached() {
    let j = job("unl");
    on_threads(4, opts(&j), |r| {
        assert!(comm_shm::list_segments(&r.job).is_empty());
        r.comm.barrier().unwrap();
    });
}

#[test]
fn factory_serves_host_memory_on_one_host() {
    use comm_core::{BackendFactory, Device};
    let f = comm_shm::ShmFactory::default();
    assert_eq!(f.name(), "shm");
    assert!(f.serves(Device::Cpu) && !f.serves(Device::Cuda(0)));
    assert!(f.same_host_only());
    f.available(Device::Cpu).unwrap();
    let j = job("caps");
    let caps = on_threads(2, opts(&j), |r| r.comm.capabilities());
    assert!(caps
        .iter()
        .all(|c| c.checks_calls && c.strided_all_to_all && !c.native_avg));
}

/// The default single-copy mode (auto) moves all_to_all blocks by single
/// copy in the measured ranges (and nothing else), and results are exact on
/// both sides of each range's edges.
#[test]
fn auto_single_copy_all_to_all_is_exact_around_its_thresholds() {
    use comm_shm::{ShmCommunicator, SingleCopyMode};
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let modes = |r: &Rank| {
        r.comm
            .with_backend(|b| {
                b.as_any_mut()
                    .and_then(|a| a.downcast_mut::<ShmCommunicator>())
                    .map(|s| (s.single_copy_active(), s.single_copy_all_to_all()))
            })
            .unwrap()
            .unwrap()
    };
    // A core per rank, and (on small machines) more ranks than cores.
    let mut worlds = vec![2];
    if cores < 4 {
        worlds.push(cores + 1);
    }
    for world in worlds {
        let j = job("auto");
        let o = opts(&j)
            .workspace_bytes(64 << 10)
            .single_copy(SingleCopyMode::Auto, 1);
        let res = on_threads(world, o, move |r| {
            for block in [16 << 10, 32 << 10, 200 << 10, 256 << 10, 512 << 10] {
                let n = block / 4 * r.world;
                let inputs: Vec<Tensor> = (0..r.world)
                    .map(|q| input(DType::I32, q, n, block))
                    .collect();
                let mut out = Tensor::zeros([n], DType::I32);
                r.comm.all_to_all(&inputs[r.rank], &mut out).unwrap();
                let expect: Vec<u8> = (0..r.world)
                    .flat_map(|i| {
                        inputs[i].as_bytes().unwrap()[r.rank * block..(r.rank + 1) * block].to_vec()
                    })
                    .collect();
                assert_eq!(
                    out.as_bytes().unwrap(),
                    expect,
                    "block {block} world {}",
                    r.world
                );
            }
            modes(r)
        });
        assert!(
            res.iter().all(|&m| m == (true, true)),
            "world {world}: {res:?}"
        );
    }
    // Off means off.
    let j = job("off");
    let res = on_threads(2, opts(&j).single_copy(SingleCopyMode::Off, 1), modes);
    assert_eq!(res, [(false, false); 2]);
}
