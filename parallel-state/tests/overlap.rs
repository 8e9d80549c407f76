//! Overlap and speed for sequence parallelism, with real processes:
//! ring attention and USP against the single-process reference, ring passes
//! and non-blocking handles when a member dies, many non-blocking handles
//! in flight across groups, and steady-state all_to_all_4d without buffer
//! allocations. Every scenario runs over shm and TCP where it says so.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use demo_model::usp::{forward_sequence_parallel, Usp, UspGroups};
use demo_model::{max_abs_diff, Config, Model};
use parallel_state::core::{P2pOp, Scope, Work};
use parallel_state::{
    CommError, Communicator, DType, Device, GroupCoordinator, InitOptions, ParallelState, ReduceOp,
    Tensor,
};

const ENTRY: &str = "overlap_entry";

// ------------------------------------------------------------ allocations

/// Allocations at least this large count as buffers.
const LARGE: usize = 64 << 10;

/// The system allocator, counting allocations while [`COUNTING`] is on
/// (every thread of the process: callers, progress engines, backends).
struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static LARGE_ALLOCS: AtomicUsize = AtomicUsize::new(0);
static LARGE_BYTES: AtomicUsize = AtomicUsize::new(0);
static SMALL_ALLOCS: AtomicUsize = AtomicUsize::new(0);

fn count(size: usize) {
    if COUNTING.load(Relaxed) {
        if size >= LARGE {
            LARGE_ALLOCS.fetch_add(1, Relaxed);
            LARGE_BYTES.fetch_add(size, Relaxed);
        } else {
            SMALL_ALLOCS.fetch_add(1, Relaxed);
        }
    }
}

// SAFETY: every method forwards to the system allocator with the caller's
// arguments unchanged; counting touches only atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count(l.size());
        // SAFETY: forwarded contract.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        count(l.size());
        // SAFETY: forwarded contract.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        count(new);
        // SAFETY: forwarded contract.
        unsafe { System.realloc(p, l, new) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: forwarded contract.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

// ------------------------------------------------------------ entry point

#[test]
#[ignore = "entry point of the processes the other tests launch"]
fn overlap_entry() {
    let scenario = common::scenario().expect("PS_SCENARIO is set by the launching test");
    let ps = ParallelState::init_from_env(
        InitOptions::default().with_timeout(Duration::from_secs(DEADLINE_S)),
    )
    .expect("init");
    let finished = match scenario.as_str() {
        "usp" => usp(&ps),
        "ring_dies" => ring_dies(&ps),
        "nb_many" => nb_many(&ps),
        "nb_dies" => nb_dies(&ps),
        "a2a_alloc" => a2a_alloc(&ps),
        other => panic!("unknown scenario {other}"),
    };
    if finished {
        common::done(&scenario, ps.rank());
    }
}

/// The group deadline in these scenarios; failures must come before it.
const DEADLINE_S: u64 = 30;

/// The rank that dies in the failure scenarios.
const DYING: usize = 2;

fn env_usize(key: &str) -> usize {
    std::env::var(key)
        .unwrap_or_else(|_| panic!("{key} is set by the launching test"))
        .parse()
        .unwrap()
}

/// Ends this process at once, as a crash would: no destructors, no
/// goodbye to the peers (exit code 0 so that the launcher lets the others
/// run on).
fn die() -> ! {
    println!("rank {DYING} exits now");
    std::process::exit(0)
}

/// Asserts that `err` names global rank `dead` as the culprit (PeerLost,
/// or PeerAborted from a member that lost it) and came within the deadline.
fn assert_blames(err: &CommError, dead: usize, took: Duration, what: &str) {
    let text = err.to_string();
    assert!(
        matches!(
            err,
            CommError::PeerLost { .. } | CommError::PeerAborted { .. }
        ),
        "{what}: expected PeerLost/PeerAborted, got {text}"
    );
    assert!(
        err.culprits().iter().any(|r| r.global == Some(dead)),
        "{what}: the error does not blame global rank {dead}: {text}"
    );
    assert!(
        took < Duration::from_secs(DEADLINE_S),
        "{what}: failed after {took:?}, past the {DEADLINE_S} s deadline"
    );
}

// -------------------------------------------------------------- USP / ring

/// Ulysses x ring with `PS_RING` ring degree over the whole world, for
/// shapes whose padding falls into the last ring chunk (or fills whole
/// chunks), against the single-process reference: bit-exact for pure
/// Ulysses (the same GEMMs and one attention block), within 1e-5 with ring
/// attention (the online softmax rescales per block: measured errors are
/// ~1e-7, see the main job).
fn usp(ps: &ParallelState) -> bool {
    let r = env_usize("PS_RING");
    let p = ps.world_size();
    ps.initialize_model_parallel(1, p, None).unwrap();
    ps.initialize_ulysses_ring(p / r).unwrap();
    let groups = UspGroups {
        sp: ps.sp_group().unwrap(),
        ulysses: ps.ulysses_group().unwrap(),
        ring: ps.ring_group().unwrap(),
    };
    let configs = [
        // 37 rows padded to a multiple of the world: padding in the last chunk.
        Config {
            batch: 2,
            seq: 37,
            heads: 4,
            head_dim: 8,
            layers: 2,
        },
        // 2 rows over up to 4 ranks: whole chunks of padding (no valid key).
        Config {
            batch: 1,
            seq: 2,
            heads: 4,
            head_dim: 4,
            layers: 1,
        },
    ];
    for cfg in configs {
        let model = Model::new(&cfg);
        let input = model.input();
        let full = Tensor::from_vec(input.clone(), [cfg.batch, cfg.seq, cfg.hidden()]).unwrap();
        let run = forward_sequence_parallel(&model, &groups, &full, Device::Cpu, true).unwrap();
        let err = max_abs_diff(
            &run.output.to_vec::<f32>().unwrap(),
            &model.reference(&input),
        );
        println!("USP world {p} ring {r} {cfg:?}: max abs error {err:e}");
        if r == 1 {
            assert_eq!(err, 0.0, "pure Ulysses is bit-exact");
        } else {
            assert!(err <= 1e-5, "ring attention off by {err}");
        }
        for t in &run.layers {
            assert_eq!(t.ring.exchanges, r - 1);
            assert_eq!(t.steps.len(), r - 1);
            assert!(t.standalone.is_some());
        }
        // Workspaces are reused: a second forward gives the same bits.
        let (shard, orig) = groups.sp.shard_with_pad(&full, 1).unwrap();
        let mut usp =
            Usp::new(&model, groups.clone(), shard.shape()[1], orig, Device::Cpu).unwrap();
        let (mut a, mut b) = (shard.try_clone().unwrap(), shard);
        usp.forward(&mut a).unwrap();
        usp.forward(&mut b).unwrap();
        assert_eq!(a, b, "a reused Usp gives the same result");
    }
    true
}

/// A ring pass over all 4 ranks works, then global rank 2 dies during the
/// next one (in its first compute, its first exchange queued): the members
/// fail within the deadline, blaming rank 2. A member whose receives did
/// not depend on rank 2 may finish its pass (its sends to rank 2 can end in
/// a socket buffer before the loss shows); its next call on the ring then
/// fails blaming rank 2.
fn ring_dies(ps: &ParallelState) -> bool {
    let p = ps.world_size();
    ps.initialize_model_parallel(1, p, None).unwrap();
    ps.initialize_ulysses_ring(1).unwrap();
    let ring = ps.ring_group().unwrap();
    let (r, me) = (ring.world_size(), ring.rank_in_group());
    let n = 1 << 16;
    let mut block = vec![me as f32; n];
    let mut spare = vec![0f32; n];
    let mut seen = Vec::new();
    ring.ring_pass(&mut block, &mut spare, |step, b| {
        assert!(b.iter().all(|&v| v == b[0]));
        seen.push((step, b[0] as usize));
        Ok(())
    })
    .unwrap();
    let want: Vec<(usize, usize)> = (0..r).map(|s| (s, (me + r - s) % r)).collect();
    assert_eq!(seen, want, "step s attends member k - s's block");
    let start = Instant::now();
    let res = ring.ring_pass(&mut block, &mut spare, |step, _| {
        if step == 0 && ps.rank() == DYING {
            die();
        }
        Ok(())
    });
    let err = match res {
        Err(e) => e,
        Ok(t) => {
            assert_ne!(
                me, 3,
                "rank 3 receives from rank 2: its pass cannot succeed"
            );
            println!("rank {} ring pass finished ({t:?}); next call:", ps.rank());
            ring.barrier().expect_err("a member is gone")
        }
    };
    let took = start.elapsed();
    println!("rank {} failed after {took:?}: {err}", ps.rank());
    assert_blames(&err, DYING, took, "ring pass");
    true
}

// ------------------------------------------------------------ non-blocking

/// Buffers of one group's non-blocking operations.
struct Bufs {
    sums: Vec<Vec<i64>>,
    maxed: Vec<f32>,
    mine: Vec<i32>,
    gathered: Vec<i32>,
    a2a_in: Vec<i64>,
    a2a_out: Vec<i64>,
    bcast: Vec<u8>,
    ring_out: Vec<i32>,
    ring_in: Vec<i32>,
    dropped: Vec<i64>,
}

impl Bufs {
    fn new(g: &GroupCoordinator) -> Self {
        let (w, gr, rank) = (g.world_size(), g.rank_in_group(), g.rank());
        Bufs {
            sums: (0..4)
                .map(|j| vec![(rank * 10 + j) as i64; 1000 + 333 * j])
                .collect(),
            maxed: vec![rank as f32 * 0.5; 77],
            mine: vec![rank as i32; 3],
            gathered: vec![-1; 3 * w],
            a2a_in: (0..w).flat_map(|j| [(rank * 100 + j) as i64; 2]).collect(),
            a2a_out: vec![-1; 2 * w],
            bcast: vec![if gr + 1 == w { rank as u8 } else { 0 }; 4099],
            ring_out: vec![rank as i32; 1 << 15],
            ring_in: vec![0; 1 << 15],
            dropped: vec![1; 7],
        }
    }

    /// Checks every result against the group's members.
    fn check(&self, g: &GroupCoordinator) {
        let (w, gr, ranks) = (g.world_size(), g.rank_in_group(), g.ranks());
        let what = g.name();
        for (j, s) in self.sums.iter().enumerate() {
            let want: i64 = ranks.iter().map(|&m| (m * 10 + j) as i64).sum();
            assert!(s.iter().all(|&v| v == want), "{what}: sum {j}");
        }
        let max = *ranks.iter().max().unwrap() as f32 * 0.5;
        assert!(self.maxed.iter().all(|&v| v == max), "{what}: max");
        let gathered: Vec<i32> = ranks.iter().flat_map(|&m| [m as i32; 3]).collect();
        assert_eq!(self.gathered, gathered, "{what}: all_gather");
        let a2a: Vec<i64> = ranks
            .iter()
            .flat_map(|&m| [(m * 100 + gr) as i64; 2])
            .collect();
        assert_eq!(self.a2a_out, a2a, "{what}: all_to_all");
        let root = ranks[w - 1] as u8;
        assert!(self.bcast.iter().all(|&v| v == root), "{what}: broadcast");
        let prev = ranks[(gr + w - 1) % w] as i32;
        assert!(self.ring_in.iter().all(|&v| v == prev), "{what}: ring");
        assert_eq!(self.dropped, vec![w as i64; 7], "{what}: dropped handle");
    }
}

/// Starts every operation of one group; the handle of the dropped
/// all-reduce is dropped unwaited here.
fn start<'s>(s: &'s Scope<'s, '_>, b: &'s mut Bufs, g: &GroupCoordinator) -> Vec<Work<'s>> {
    let (w, gr) = (g.world_size(), g.rank_in_group());
    let mut works = Vec::new();
    let Bufs {
        sums,
        maxed,
        mine,
        gathered,
        a2a_in,
        a2a_out,
        bcast,
        ring_out,
        ring_in,
        dropped,
    } = b;
    let mut sums = sums.iter_mut();
    works.push(s.iall_reduce(sums.next().unwrap(), ReduceOp::Sum).unwrap());
    works.push(s.iall_gather(mine, gathered).unwrap());
    works.push(s.iall_reduce(sums.next().unwrap(), ReduceOp::Sum).unwrap());
    drop(s.iall_reduce(dropped, ReduceOp::Sum).unwrap());
    works.push(s.iall_reduce(maxed, ReduceOp::Max).unwrap());
    works.push(s.iall_to_all(a2a_in, a2a_out).unwrap());
    works.push(s.ibroadcast(bcast, w - 1).unwrap());
    works.push(
        s.batch_isend_irecv(vec![
            P2pOp::send(ring_out, (gr + 1) % w).unwrap(),
            P2pOp::recv(ring_in, (gr + w - 1) % w).unwrap(),
        ])
        .unwrap(),
    );
    for buf in sums {
        works.push(s.iall_reduce(buf, ReduceOp::Sum).unwrap());
    }
    works
}

/// World 4 as tp=2 x sp=2: handles of the world, tp, sp and dp groups all
/// in flight at once (four communicators, four progress engines), waited
/// in reverse order interleaving the groups, one polled with `test`, one
/// dropped unwaited; every result exact.
fn nb_many(ps: &ParallelState) -> bool {
    ps.initialize_model_parallel(2, 2, None).unwrap();
    let groups: Vec<Arc<GroupCoordinator>> = vec![
        ps.world_group(),
        ps.tp_group().unwrap(),
        ps.sp_group().unwrap(),
        ps.dp_group().unwrap(),
    ];
    let comms: Vec<Communicator> = groups
        .iter()
        .map(|g| g.communicator_for(Device::Cpu).unwrap())
        .collect();
    for round in 0..3 {
        let mut bufs: Vec<Bufs> = groups.iter().map(|g| Bufs::new(g)).collect();
        let [b0, b1, b2, b3] = &mut bufs[..] else {
            unreachable!()
        };
        let (g0, g1, g2, g3) = (&*groups[0], &*groups[1], &*groups[2], &*groups[3]);
        comms[0].scope(|s0| {
            comms[1].scope(|s1| {
                comms[2].scope(|s2| {
                    comms[3].scope(|s3| {
                        let mut w0 = start(s0, b0, g0);
                        let mut w1 = start(s1, b1, g1);
                        let mut w2 = start(s2, b2, g2);
                        let mut w3 = start(s3, b3, g3);
                        // Poll one to completion with `test`.
                        let mut first = w2.remove(0);
                        let until = Instant::now() + Duration::from_secs(DEADLINE_S);
                        while !first.test().unwrap() {
                            assert!(Instant::now() < until, "test() never turned true");
                            std::thread::yield_now();
                        }
                        first.wait().unwrap();
                        // The rest in reverse order, the groups interleaved
                        // (a different rotation each round).
                        loop {
                            let mut any = false;
                            for k in 0..4 {
                                let r = match (k + round) % 4 {
                                    0 => w0.pop().map(Work::wait),
                                    1 => w1.pop().map(Work::wait),
                                    2 => w2.pop().map(Work::wait),
                                    _ => w3.pop().map(Work::wait),
                                };
                                if let Some(r) = r {
                                    r.unwrap();
                                    any = true;
                                }
                            }
                            if !any {
                                break;
                            }
                        }
                    })
                })
            })
        });
        for (b, g) in bufs.iter().zip(&groups) {
            b.check(g);
        }
    }
    // Blocking calls after the scopes keep their place in each group's order.
    for g in &groups {
        let mut t = Tensor::from_vec1(vec![1i32]);
        g.all_reduce(&mut t, ReduceOp::Sum).unwrap();
        assert_eq!(t.to_vec::<i32>().unwrap(), [g.world_size() as i32]);
    }
    true
}

/// Global rank 2 leaves after a barrier; the others start several
/// non-blocking operations on the world group that rank 2 never joins:
/// every pending wait returns an error blaming rank 2 within the deadline.
fn nb_dies(ps: &ParallelState) -> bool {
    let world = ps.world_group();
    world.barrier().unwrap();
    if ps.rank() == DYING {
        die();
    }
    let comm = world.communicator_for(Device::Cpu).unwrap();
    let mut bufs = vec![vec![ps.rank() as f32; 1 << 12]; 4];
    let mine = vec![ps.rank() as i64; 5];
    let mut gathered = vec![0i64; 5 * world.world_size()];
    let start_t = Instant::now();
    let errs: Vec<(CommError, Duration)> = comm.scope(|s| {
        let mut works: Vec<Work<'_>> = bufs
            .iter_mut()
            .map(|b| s.iall_reduce(b, ReduceOp::Sum).unwrap())
            .collect();
        works.push(s.iall_gather(&mine, &mut gathered).unwrap());
        // Waited newest first.
        works
            .into_iter()
            .rev()
            .map(|w| {
                let e = w.wait().expect_err("a member is gone");
                (e, start_t.elapsed())
            })
            .collect()
    });
    assert_eq!(errs.len(), 5);
    for (i, (e, took)) in errs.iter().enumerate() {
        println!(
            "rank {} pending wait {i} failed after {took:?}: {e}",
            ps.rank()
        );
        assert_blames(e, DYING, *took, "pending wait");
    }
    // Later calls are refused at once, quoting the cause.
    let mut t = [0f32; 3];
    let later = world.all_reduce(&mut t[..], ReduceOp::Sum).unwrap_err();
    let text = later.to_string();
    assert!(text.contains("refused"), "{text}");
    assert_blames(&later, DYING, Duration::ZERO, "a refused later call");
    true
}

// ------------------------------------------------------- all_to_all_4d path

/// Steady-state all_to_all_4d_into in both modes, 4 MiB per rank, with
/// reused outputs: after two warm-up calls, no allocation of 64 KiB or more
/// happens in the process (callers, progress engine, backend) during ten
/// calls; results exact.
fn a2a_alloc(ps: &ParallelState) -> bool {
    let p = ps.world_size();
    ps.initialize_model_parallel(1, p, None).unwrap();
    let sp = ps.sp_group().unwrap();
    let r = sp.rank_in_group();
    let (h, d) = (16, 64);
    let sl = (4 << 20) / (h * d * 4); // 4 MiB per rank
    let s = sl * p;
    let n = sl * h * d;
    let x = Tensor::from_vec(
        (0..n).map(|i| (i * 7 + r * 13) as f32).collect::<Vec<_>>(),
        [1, sl, h, d],
    )
    .unwrap();
    let mut y = Tensor::zeros([1, s, h / p, d], DType::F32);
    let mut back = Tensor::zeros([1, sl, h, d], DType::F32);
    let call = |y: &mut Tensor, back: &mut Tensor| {
        sp.all_to_all_4d_into(&x, 2, 1, y).unwrap();
        sp.all_to_all_4d_into(y, 1, 2, back).unwrap();
    };
    call(&mut y, &mut back);
    call(&mut y, &mut back);
    assert_eq!(back, x, "(1,2) inverts (2,1)");
    sp.barrier().unwrap();
    LARGE_ALLOCS.store(0, Relaxed);
    LARGE_BYTES.store(0, Relaxed);
    SMALL_ALLOCS.store(0, Relaxed);
    COUNTING.store(true, Relaxed);
    for _ in 0..10 {
        call(&mut y, &mut back);
    }
    COUNTING.store(false, Relaxed);
    let (large, bytes, small) = (
        LARGE_ALLOCS.load(Relaxed),
        LARGE_BYTES.load(Relaxed),
        SMALL_ALLOCS.load(Relaxed),
    );
    println!(
        "rank {r}: 20 all_to_all_4d_into calls ({} backend) allocated {large} buffers >= 64 KiB \
         ({bytes} bytes) and {small} smaller blocks",
        sp.host_backend()
    );
    assert_eq!(back, x);
    assert_eq!(
        large, 0,
        "steady-state all_to_all_4d_into allocated {large} buffers ({bytes} bytes)"
    );
    true
}

// ------------------------------------------------------------------- tests

#[test]
fn usp_ring2_world4_matches_reference() {
    let out = common::run(ENTRY, "usp", 4, &[("PS_RING", "2")]);
    common::show(&out, "max abs error");
}

#[test]
fn usp_ring4_world4_matches_reference() {
    let out = common::run(ENTRY, "usp", 4, &[("PS_RING", "4")]);
    common::show(&out, "max abs error");
}

#[test]
fn usp_ring2_world2_matches_reference() {
    let out = common::run(ENTRY, "usp", 2, &[("PS_RING", "2")]);
    common::show(&out, "max abs error");
}

#[test]
fn usp_ring1_world4_is_bit_exact() {
    common::run(ENTRY, "usp", 4, &[("PS_RING", "1")]);
}

#[test]
fn usp_ring2_world4_over_tcp() {
    common::run(
        ENTRY,
        "usp",
        4,
        &[("PS_RING", "2"), ("DIST_BACKEND", "tcp")],
    );
}

#[test]
fn ring_pass_member_dies_shm() {
    common::launch_scenario(ENTRY, "ring_dies", 4, &[], &[0, 1, 3]);
}

#[test]
fn ring_pass_member_dies_tcp() {
    common::launch_scenario(
        ENTRY,
        "ring_dies",
        4,
        &[("DIST_BACKEND", "tcp")],
        &[0, 1, 3],
    );
}

#[test]
fn nonblocking_many_in_flight_across_groups_shm() {
    common::run(ENTRY, "nb_many", 4, &[]);
}

#[test]
fn nonblocking_many_in_flight_across_groups_tcp() {
    common::run(ENTRY, "nb_many", 4, &[("DIST_BACKEND", "tcp")]);
}

#[test]
fn nonblocking_pending_waits_name_dead_peer_shm() {
    common::launch_scenario(ENTRY, "nb_dies", 4, &[], &[0, 1, 3]);
}

#[test]
fn nonblocking_pending_waits_name_dead_peer_tcp() {
    common::launch_scenario(ENTRY, "nb_dies", 4, &[("DIST_BACKEND", "tcp")], &[0, 1, 3]);
}

#[test]
fn all_to_all_4d_steady_state_allocates_no_buffer_shm() {
    for world in [2, 4] {
        let out = common::run(ENTRY, "a2a_alloc", world, &[]);
        common::show(&out, "allocated");
    }
}

#[test]
fn all_to_all_4d_steady_state_allocates_no_buffer_tcp() {
    let out = common::run(ENTRY, "a2a_alloc", 2, &[("DIST_BACKEND", "tcp")]);
    common::show(&out, "allocated");
}
