//! Test helpers of comm-shm. Ranks run through the workspace's one rank
//! runner, `comm_conformance::ranks` (threads over one `HashStore`, or
//! processes of this test binary started by the launcher), each a
//! [`Communicator`](comm_core::Communicator) made through the registry
//! ([`ShmFactory`]). What stays here is comm-shm's own: options, data
//! builders, reference reductions, the /dev/shm and process-table leak
//! checks, and [`spawn_rank`] for the tests that signal one chosen rank
//! process.
#![allow(dead_code)]

use std::path::Path;
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use comm_conformance::ranks::{self, Processes, RankCtx};
use comm_core::reduce::{finish_avg, reduce_into};
use comm_core::{
    bf16, f16, Communicator, DType, Element, GroupContext, ReduceOp, Registry, Result, Store,
    Tensor,
};
use comm_shm::{list_segments, ShmFactory, ShmOptions};
use dist_utils::FileStore;

/// Deadline of set-up in tests: generous, so a loaded machine never fails
/// a test at set-up; tests that need a short deadline set it on the
/// communicator after set-up ([`Communicator::set_timeout`]).
pub const SETUP: Duration = Duration::from_secs(120);

/// Overall deadline of a run of thread ranks: a hang fails the test.
pub const THREADS_DEADLINE: Duration = Duration::from_secs(300);

/// One rank of a test group.
pub struct Rank {
    pub rank: usize,
    pub world: usize,
    pub comm: Communicator,
    pub store: Arc<dyn Store>,
    pub job: String,
}

/// Options for tests: tiny buffers (so chunking is exercised), the job id
/// `job`, a generous set-up deadline.
pub fn opts(job: &str) -> ShmOptions {
    ShmOptions::default()
        .timeout(SETUP)
        .workspace_bytes(4096)
        .p2p_bytes(4096)
        .job_id(job)
}

/// Member `rank` of a `world`-rank group on `store`, through the registry.
pub fn join(
    store: Arc<dyn Store>,
    rank: usize,
    world: usize,
    o: &ShmOptions,
) -> Result<Communicator> {
    let reg = Registry::new().with(ShmFactory::with_options(o.clone()));
    let ctx = GroupContext::new(store, rank, world)
        .timeout(o.timeout)
        .group_name("test");
    reg.create("shm", &ctx)
}

/// The rank of the kit's `ctx` with its communicator of job `o.job_id`.
fn rank_of(ctx: &RankCtx, o: &ShmOptions) -> Rank {
    Rank {
        rank: ctx.rank,
        world: ctx.world,
        comm: join(ctx.store.clone(), ctx.rank, ctx.world, o).unwrap(),
        store: ctx.store.clone(),
        job: o.job_id.clone(),
    }
}

/// Runs `f` on `world` threads (`comm_conformance::ranks::threads`), each
/// with its own communicator, and returns their results in rank order;
/// afterwards nothing of the job is left in /dev/shm.
pub fn on_threads<R: Send + 'static>(
    world: usize,
    o: ShmOptions,
    f: impl Fn(&Rank) -> R + Send + Sync + 'static,
) -> Vec<R> {
    let job = o.job_id.clone();
    let out = ranks::threads(world, THREADS_DEADLINE, move |ctx| f(&rank_of(&ctx, &o)));
    assert_no_segments(&job);
    out
}

/// `world` rank processes (`comm_conformance::ranks::Processes`: this test
/// binary re-executed by the launcher, which reaps every rank before it
/// returns) that share the parent's job id `job`: each rank re-runs the
/// test function and so makes a job id of its own, [`rank_job`] gives it
/// the parent's.
pub fn processes(world: usize, job: &str) -> Processes {
    Processes::new(world).env(JOB_ENV, job)
}

/// In a rank of [`processes`]: the parent's job id.
pub fn rank_job() -> std::result::Result<String, String> {
    std::env::var(JOB_ENV).map_err(|e| format!("{JOB_ENV}: {e}"))
}

/// Runs `f` as `world` real processes ([`processes`]), each with its own
/// communicator; a rank passes when `f` returns without panicking. In the
/// parent: requires every rank to exit 0 within `limit`, then checks that
/// nothing is left in /dev/shm. In a rank: runs it and exits.
pub fn on_processes(world: usize, o: ShmOptions, limit: Duration, f: impl Fn(&Rank)) {
    let job = o.job_id.clone();
    processes(world, &job).deadline(limit).run(|ctx| {
        f(&rank_of(ctx, &o.clone().job_id(rank_job()?)));
        Ok(())
    });
    assert_no_segments(&job);
}

// ------------------------------------------------- ranks signalled one by one
//
// The crash and set-up-leak tests SIGKILL, SIGTERM or SIGINT one chosen
// rank and then read the others' exit codes (42, 5, 77, ...) and signals.
// The kit's `Processes` cannot: its launcher owns the children and stops
// every rank as soon as one fails. So these tests start each rank
// themselves with the kit's `worker_command` (the re-executed test binary)
// and rendezvous through a `FileStore` they also read.

const RANK_ENV: &str = "COMM_SHM_TEST_RANK";
const WORLD_ENV: &str = "COMM_SHM_TEST_WORLD";
const STORE_ENV: &str = "COMM_SHM_TEST_STORE";
const JOB_ENV: &str = "COMM_SHM_TEST_JOB";

/// In a rank started by [`spawn_rank`] for the calling test: `(rank,
/// world, store, job)`; `None` in the test itself.
pub fn child_of() -> Option<(usize, usize, Arc<dyn Store>, String)> {
    if !ranks::is_worker() {
        return None;
    }
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} unset"));
    let store: Arc<dyn Store> = Arc::new(FileStore::new(var(STORE_ENV)).unwrap());
    Some((
        var(RANK_ENV).parse().unwrap(),
        var(WORLD_ENV).parse().unwrap(),
        store,
        var(JOB_ENV),
    ))
}

/// Starts this test binary as rank `rank` of `world` for test `test`.
pub fn spawn_rank(test: &str, rank: usize, world: usize, store: &Path, job: &str) -> Child {
    spawn_with(test, rank, world, store, job, &[])
}

/// [`spawn_rank`] with extra environment variables.
pub fn spawn_with(
    test: &str,
    rank: usize,
    world: usize,
    store: &Path,
    job: &str,
    env: &[(&str, &str)],
) -> Child {
    let mut c = ranks::worker_command(test).unwrap();
    c.env(RANK_ENV, rank.to_string())
        .env(WORLD_ENV, world.to_string())
        .env(STORE_ENV, store)
        .env(JOB_ENV, job);
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn().unwrap()
}

/// A fresh file store for processes, in `dir`.
pub fn file_store(dir: &Path) -> (std::path::PathBuf, Arc<dyn Store>) {
    let p = dir.join("store");
    let s: Arc<dyn Store> = Arc::new(FileStore::new(&p).unwrap());
    (p, s)
}

/// Waits for every child up to `limit` (then kills the rest); exit codes
/// (`None`: killed by a signal or by this function).
pub fn wait_all(kids: &mut [Child], limit: Duration) -> Vec<Option<i32>> {
    let t0 = Instant::now();
    kids.iter_mut()
        .map(|k| loop {
            if let Some(s) = k.try_wait().unwrap() {
                break s.code();
            }
            if t0.elapsed() > limit {
                let _ = k.kill();
                let _ = k.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(5));
        })
        .collect()
}

/// Every child was waited for: no process and no zombie is left.
pub fn assert_reaped(kids: &[Child]) {
    for k in kids {
        let p = format!("/proc/{}", k.id());
        assert!(
            !Path::new(&p).exists(),
            "process {} is still in the table",
            k.id()
        );
    }
}

/// The memfd segments of job `job` that process `pid` holds open, as their
/// `/proc/<pid>/fd` links (`/memfd:dshm.<job>.<pid>.<random> (deleted)`).
pub fn memfds_held(pid: u32, job: &str) -> Vec<String> {
    let want = format!("/memfd:{}", comm_shm::segment_prefix(job));
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| {
            rd.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .map(|l| l.to_string_lossy().into_owned())
                .filter(|l| l.starts_with(&want))
                .collect()
        })
        .unwrap_or_default()
}

/// Nothing of job `job` is left in /dev/shm, and no process still holds one
/// of its memfd segments open.
pub fn assert_no_segments(job: &str) {
    let left = list_segments(job);
    assert!(left.is_empty(), "leaked segments: {left:?}");
    let pids = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok());
    for pid in pids {
        let held = memfds_held(pid, job);
        assert!(held.is_empty(), "process {pid} still holds {held:?}");
    }
}

/// A tensor of `dt` holding `vals` (converted as `Element::from_f64` does).
pub fn make(dt: DType, vals: &[f64]) -> Tensor {
    fn conv<T: Element>(v: &[f64]) -> Tensor {
        Tensor::from_vec1(v.iter().map(|x| T::from_f64(*x)).collect::<Vec<T>>())
    }
    match dt {
        DType::F32 => conv::<f32>(vals),
        DType::F64 => conv::<f64>(vals),
        DType::F16 => conv::<f16>(vals),
        DType::BF16 => conv::<bf16>(vals),
        DType::I8 => conv::<i8>(vals),
        DType::U8 => conv::<u8>(vals),
        DType::I32 => conv::<i32>(vals),
        DType::I64 => conv::<i64>(vals),
    }
}

/// Deterministic input of `rank` with `n` elements (small values, fractional
/// for floats, so that order of reduction matters for rounding).
pub fn input(dt: DType, rank: usize, n: usize, salt: usize) -> Tensor {
    let v: Vec<f64> = (0..n)
        .map(|i| {
            let x = ((rank * 7919 + i * 104_729 + salt * 31) % 13) as f64 + 1.0;
            if dt.is_float() {
                x / 3.0 + (i % 5) as f64 * 0.001
            } else {
                x
            }
        })
        .collect();
    make(dt, &v)
}

/// Reduction of `inputs` in rank order with comm-core's kernels.
pub fn reference(inputs: &[Tensor], op: ReduceOp) -> Tensor {
    let mut out = inputs[0].try_clone().unwrap();
    let dt = out.dtype();
    for t in &inputs[1..] {
        reduce_into(out.as_bytes_mut().unwrap(), t.as_bytes().unwrap(), dt, op).unwrap();
    }
    if op == ReduceOp::Avg {
        finish_avg(out.as_bytes_mut().unwrap(), dt, inputs.len()).unwrap();
    }
    out
}

/// Concatenation of byte views.
pub fn concat(ts: &[Tensor]) -> Vec<u8> {
    ts.iter()
        .flat_map(|t| t.as_bytes().unwrap().to_vec())
        .collect()
}

/// Small deterministic PRNG (splitmix64).
#[derive(Debug, Clone)]
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// FNV-1a 64.
pub fn checksum(b: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for x in b {
        h ^= *x as u64;
        h = h.wrapping_mul(0x1000_0000_01b3);
    }
    h
}

/// A unique job id for a test, so leak checks see only its segments.
pub fn job(tag: &str) -> String {
    format!(
        "t{}{}{}",
        tag,
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    )
}
