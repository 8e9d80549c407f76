//! One helper to run N ranks in a test, as threads of the test process
//! ([`threads`]) or as real processes ([`Processes`]), each rank getting its
//! [`RankCtx`]: rank, world size and a store every rank shares.
//!
//! # Process mode: the test binary is the worker
//!
//! [`Processes::run`] re-executes the *current test binary* once per rank,
//! asking libtest to run only the calling test (libtest runs each test on a
//! thread named after it), with [`WORKER_ENV`] naming that test. In each
//! rank, the same test function runs again, reaches the same
//! `Processes::run` call, sees the variable, runs the closure as that rank
//! and exits. So a multi-process test is written once, with no separate
//! worker binary:
//!
//! ```no_run
//! use comm_conformance::ranks::Processes;
//! use std::time::Duration;
//!
//! #[test]
//! fn three_processes_meet() {
//!     Processes::new(3).run(|rank| {
//!         rank.meet("hello", Duration::from_secs(30)).map_err(|e| e.to_string())?;
//!         println!("rank {} of {} is here", rank.rank, rank.world);
//!         Ok(())
//!     });
//! }
//! ```
//!
//! The ranks are started by `executor::launch` (the launcher behind
//! `distrun`): it hosts the job's store, sets the torchrun variables, stops
//! every rank when one fails, and enforces the overall deadline, so a hang
//! fails the test instead of stalling CI. One test function makes at most
//! one process job. A test binary with `harness = false` must name the test
//! itself ([`Processes::test_name`]) and pass its arguments on.

use std::cell::Cell;
use std::ffi::OsString;
use std::io::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::Command;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use comm_core::{CommError, GroupContext, PrefixStore, Result, Store};
use dist_utils::{init_store, HashStore, RankInfo};

/// Names the test a re-executed test binary runs as a rank (set by
/// [`Processes`] and [`worker_command`]).
pub const WORKER_ENV: &str = "COMM_CONFORMANCE_WORKER";

/// What a worker prints once its closure returned `Ok`; the parent checks
/// for it, so a worker that ran nothing (a filter that matched no test)
/// cannot pass.
const FINISHED: &str = "comm-conformance worker finished: rank ";

/// Default overall deadline of a job.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(300);

/// Kit runs of one test process go one at a time: CI machines have two
/// cores, and oversubscribing them only makes deadlines race.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

thread_local! {
    /// Whether this test thread has already made its process job.
    static LAUNCHED: Cell<bool> = const { Cell::new(false) };
}

/// What a rank knows about its job.
#[derive(Debug, Clone)]
pub struct RankCtx {
    /// This rank, `0..world`.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
    /// Rank on this host (the index among the processes of one launch).
    pub local_rank: usize,
    /// The job's store, shared by every rank.
    pub store: Arc<dyn Store>,
}

impl RankCtx {
    /// The context a [`BackendFactory`](comm_core::BackendFactory) gets to
    /// build this rank's member of a group of every rank named `name`, over
    /// a store namespaced for that group.
    pub fn group(&self, name: &str) -> GroupContext {
        let store: Arc<dyn Store> = Arc::new(PrefixStore::new(
            format!("group/{name}"),
            self.store.clone(),
        ));
        GroupContext::new(store, self.rank, self.world).group_name(name)
    }

    /// A barrier through the store: returns once every rank has called it
    /// with `tag`, or a Timeout after `timeout`.
    pub fn meet(&self, tag: &str, timeout: Duration) -> Result<()> {
        crate::member::meet(self.store.as_ref(), tag, self.rank, self.world, timeout)
    }
}

// ---------------------------------------------------------------------------
// Threads

/// Runs `f` for ranks `0..world`, each on its own thread, sharing one
/// in-memory store ([`HashStore`]), and returns their results in rank
/// order.
///
/// Panics (failing the test) when a rank panics, naming it, or when some
/// ranks are still running after `deadline`, naming them; a hang never
/// stalls the test run. Runs of one process go one at a time.
///
/// ```
/// use comm_conformance::ranks::threads;
/// use std::time::Duration;
/// let sums = threads(3, Duration::from_secs(30), |r| {
///     r.store.add("sum", r.rank as i64 + 1).unwrap();
///     r.meet("added", Duration::from_secs(10)).unwrap();
///     r.store.add("sum", 0).unwrap()
/// });
/// assert_eq!(sums, vec![6, 6, 6]);
/// ```
pub fn threads<R, F>(world: usize, deadline: Duration, f: F) -> Vec<R>
where
    F: Fn(RankCtx) -> R + Send + Sync + 'static,
    R: Send + 'static,
{
    match try_threads(world, deadline, f) {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    }
}

/// [`threads`] returning what went wrong instead of panicking.
pub fn try_threads<R, F>(
    world: usize,
    deadline: Duration,
    f: F,
) -> std::result::Result<Vec<R>, String>
where
    F: Fn(RankCtx) -> R + Send + Sync + 'static,
    R: Send + 'static,
{
    timed_threads(world, deadline, f).map(|(v, _)| v)
}

/// [`try_threads`] with the run's wall time (not counting the wait for
/// another run of this process to finish).
pub(crate) fn timed_threads<R, F>(
    world: usize,
    deadline: Duration,
    f: F,
) -> std::result::Result<(Vec<R>, Duration), String>
where
    F: Fn(RankCtx) -> R + Send + Sync + 'static,
    R: Send + 'static,
{
    if world == 0 {
        return Err("a job needs at least one rank".into());
    }
    let _serial = serial();
    let start = Instant::now();
    let store: Arc<dyn Store> = Arc::new(HashStore::new());
    let f = Arc::new(f);
    let (tx, rx) = mpsc::channel();
    for rank in 0..world {
        let ctx = RankCtx {
            rank,
            world,
            local_rank: rank,
            store: store.clone(),
        };
        let (f, tx) = (f.clone(), tx.clone());
        // Detached on purpose: a rank that hangs past the deadline is
        // reported and left behind; the test process ends with the run.
        std::thread::Builder::new()
            .name(format!("rank {rank}"))
            .spawn(move || {
                let r = catch_unwind(AssertUnwindSafe(|| f(ctx)));
                let _ = tx.send((rank, r));
            })
            .map_err(|e| format!("starting the thread of rank {rank}: {e}"))?;
    }
    drop(tx);
    let end = Instant::now() + deadline;
    let mut results: Vec<Option<R>> = (0..world).map(|_| None).collect();
    let mut panicked = Vec::new();
    for _ in 0..world {
        match rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
            Ok((rank, Ok(r))) => results[rank] = Some(r),
            Ok((rank, Err(p))) => panicked.push((rank, panic_text(p.as_ref()))),
            Err(_) => {
                let running: Vec<usize> = (0..world)
                    .filter(|r| results[*r].is_none() && !panicked.iter().any(|(p, _)| p == r))
                    .collect();
                return Err(format!(
                    "ranks {running:?} of {world} were still running after the deadline of \
                     {deadline:?} (a hang){}",
                    panics_text(&panicked)
                ));
            }
        }
    }
    if !panicked.is_empty() {
        return Err(format!("a rank thread panicked{}", panics_text(&panicked)));
    }
    Ok((results.into_iter().flatten().collect(), start.elapsed()))
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(a panic without a message)".into())
}

fn panics_text(panicked: &[(usize, String)]) -> String {
    panicked
        .iter()
        .map(|(r, m)| format!("; rank {r} panicked: {m}"))
        .collect()
}

// ---------------------------------------------------------------------------
// Processes

/// How to run ranks as real processes of the current test binary (see the
/// [module docs](self)).
#[derive(Debug, Clone)]
pub struct Processes {
    world: usize,
    deadline: Duration,
    setup_timeout: Duration,
    env: Vec<(OsString, OsString)>,
    wrapper: Vec<OsString>,
    master: Option<(String, u16)>,
    test: Option<String>,
}

/// How the ranks of a [`Processes`] job ended.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ProcessOutcome {
    /// Exit code of each rank (`128 + signal` when killed).
    pub exit_codes: Vec<i32>,
    /// Each rank's stdout lines.
    pub stdout: Vec<Vec<String>>,
    /// Each rank's stderr lines.
    pub stderr: Vec<Vec<String>>,
    /// Whether each rank's closure returned `Ok`.
    pub finished: Vec<bool>,
    /// Why the launcher stopped the job early, if it did.
    pub stopped: Option<String>,
    /// Wall time of the job.
    pub elapsed: Duration,
}

impl ProcessOutcome {
    /// True when every rank exited 0 after its closure returned `Ok`.
    pub fn success(&self) -> bool {
        self.stopped.is_none()
            && self.exit_codes.iter().all(|c| *c == 0)
            && self.finished.iter().all(|f| *f)
    }

    /// Every rank's output, prefixed `[rank R]`, stdout then stderr.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for (r, (o, e)) in self.stdout.iter().zip(&self.stderr).enumerate() {
            for l in o.iter().chain(e) {
                s.push_str(&format!("[rank {r}] {l}\n"));
            }
        }
        s
    }
}

impl Processes {
    /// `world` ranks on this host, the default overall deadline
    /// ([`DEFAULT_DEADLINE`]), a store hosted by the launcher.
    pub fn new(world: usize) -> Self {
        Processes {
            world,
            deadline: DEFAULT_DEADLINE,
            setup_timeout: Duration::from_secs(60),
            env: Vec::new(),
            wrapper: Vec::new(),
            master: None,
            test: None,
        }
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Sets the number of ranks.
    pub fn ranks(mut self, world: usize) -> Self {
        self.world = world;
        self
    }

    /// The overall deadline of the job: ranks still running then are
    /// stopped and the test fails.
    pub fn deadline(mut self, d: Duration) -> Self {
        self.deadline = d;
        self
    }

    /// How long a rank may take to reach the store.
    pub fn setup_timeout(mut self, d: Duration) -> Self {
        self.setup_timeout = d;
        self
    }

    /// An environment variable for every rank.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Starts each rank through `program args...`, which is given the test
    /// binary and its arguments after `args` (e.g. `sh -c 'exec ip netns
    /// exec ns$RANK "$0" "$@"'` to put each rank in its own network
    /// namespace).
    pub fn wrapper<I, S>(mut self, program: impl Into<OsString>, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.wrapper = std::iter::once(program.into())
            .chain(args.into_iter().map(Into::into))
            .collect();
        self
    }

    /// Rank 0 hosts the store at `addr:port` (instead of the launcher on a
    /// free loopback port): for ranks that cannot reach this process's
    /// loopback, such as ranks in other network namespaces.
    pub fn master(mut self, addr: impl Into<String>, port: u16) -> Self {
        self.master = Some((addr.into(), port));
        self
    }

    /// The test to run in the ranks. By default the name of the calling
    /// thread, which libtest sets to the test's path.
    pub fn test_name(mut self, name: impl Into<String>) -> Self {
        self.test = Some(name.into());
        self
    }

    fn test(&self) -> String {
        match self.test.clone().or_else(current_test) {
            Some(t) => t,
            None => panic!(
                "comm-conformance: cannot tell which test is running (the thread has no test \
                 name); call Processes::test_name"
            ),
        }
    }

    /// Runs `f` as every rank of a job of real processes and asserts that
    /// every rank finished with `Ok` and exited 0; panics with every rank's
    /// output otherwise. In the parent, returns how the ranks ended (their
    /// output included); in a rank, never returns.
    pub fn run<F>(&self, f: F) -> ProcessOutcome
    where
        F: FnOnce(&RankCtx) -> std::result::Result<(), String>,
    {
        let out = self.run_unchecked(f);
        if !out.success() {
            panic!(
                "{} ranks of `{}`: the job failed after {:.1} s: exit codes {:?}, finished {:?}{}\n{}",
                self.world,
                self.test(),
                out.elapsed.as_secs_f64(),
                out.exit_codes,
                out.finished,
                out.stopped
                    .as_deref()
                    .map(|s| format!(", {s}"))
                    .unwrap_or_default(),
                out.logs()
            );
        }
        out
    }

    /// [`run`](Self::run) without the assertion: for tests of failures.
    pub fn run_unchecked<F>(&self, f: F) -> ProcessOutcome
    where
        F: FnOnce(&RankCtx) -> std::result::Result<(), String>,
    {
        let test = self.test();
        if let Some(w) = worker_for() {
            if w != test {
                panic!(
                    "comm-conformance: this process was started as a rank of test `{w}` but \
                     is running `{test}`"
                );
            }
            let timeout = self.setup_timeout;
            worker_exit(move || {
                let ctx = join(timeout).map_err(|e| format!("joining the job: {e}"))?;
                f(&ctx)?;
                leave(&ctx, timeout)
            });
        }
        if LAUNCHED.with(|l| l.replace(true)) {
            panic!(
                "comm-conformance: test `{test}` starts a second process job; a test function \
                 may make only one (its ranks re-run the whole test up to that call)"
            );
        }
        let _serial = serial();
        let start = Instant::now();
        match self.launch(&test) {
            Ok(o) => {
                let finished = (0..self.world)
                    .map(|r| {
                        let mark = format!("{FINISHED}{r}");
                        o.stdout
                            .get(r)
                            .is_some_and(|l| l.iter().any(|x| x.ends_with(&mark)))
                    })
                    .collect();
                ProcessOutcome {
                    exit_codes: o.exit_codes(),
                    stopped: o.stop_reason.as_ref().map(|s| format!("{s:?}")),
                    stdout: o.stdout,
                    stderr: o.stderr,
                    finished,
                    elapsed: start.elapsed(),
                }
            }
            Err(e) => ProcessOutcome {
                exit_codes: Vec::new(),
                stdout: Vec::new(),
                stderr: Vec::new(),
                finished: vec![false; self.world],
                stopped: Some(format!("the launcher failed: {e}")),
                elapsed: start.elapsed(),
            },
        }
    }

    fn launch(&self, test: &str) -> Result<executor::LaunchOutcome> {
        let exe = std::env::current_exe()
            .map_err(|e| CommError::io("finding the test binary to re-execute", e))?;
        let (program, mut args) = match self.wrapper.split_first() {
            Some((p, rest)) => {
                let mut a = rest.to_vec();
                a.push(exe.into_os_string());
                (p.clone(), a)
            }
            None => (exe.into_os_string(), Vec::new()),
        };
        args.extend(worker_args(test));
        let mut cfg = executor::LaunchConfig::new(program, self.world)
            .args(args)
            .env(WORKER_ENV, test)
            .timeout(self.deadline)
            .grace(Duration::from_secs(2))
            .capture(true);
        if let Some((addr, port)) = &self.master {
            cfg = cfg.master(addr.clone(), Some(*port));
        }
        for (k, v) in &self.env {
            cfg = cfg.env(k.clone(), v.clone());
        }
        executor::launch(&cfg)
    }
}

/// The name libtest gave the running test (its thread's name).
fn current_test() -> Option<String> {
    std::thread::current()
        .name()
        .filter(|n| *n != "main")
        .map(str::to_string)
}

/// True in a process started as a rank of the calling test (by
/// [`Processes`] or [`worker_command`]): a test with set-up that only the
/// parent should do (building network namespaces, say) skips it then.
pub fn is_worker() -> bool {
    matches!((worker_for(), current_test()), (Some(w), Some(t)) if w == t)
}

/// The test this process runs as a rank, if it is a rank.
fn worker_for() -> Option<String> {
    std::env::var(WORKER_ENV).ok().filter(|s| !s.is_empty())
}

/// libtest arguments that run exactly `test`, ignored or not, output
/// uncaptured.
fn worker_args(test: &str) -> Vec<OsString> {
    [
        test,
        "--exact",
        "--include-ignored",
        "--nocapture",
        "--test-threads=1",
    ]
    .into_iter()
    .map(OsString::from)
    .collect()
}

/// A command that re-executes the current test binary as a rank of `test`
/// (the rendezvous variables are the caller's to add): for tests that start
/// and control their ranks themselves. In the rank, the test calls
/// [`if_worker`].
pub fn worker_command(test: &str) -> Result<Command> {
    let exe = std::env::current_exe()
        .map_err(|e| CommError::io("finding the test binary to re-execute", e))?;
    let mut cmd = Command::new(exe);
    cmd.args(worker_args(test)).env(WORKER_ENV, test);
    Ok(cmd)
}

/// In a process started by [`worker_command`] for the calling test: runs
/// `f`, prints the finished mark on `Ok`, and exits (0 on `Ok`, 1 on `Err`,
/// 101 on a panic). Elsewhere returns at once without calling `f`.
pub fn if_worker(f: impl FnOnce() -> std::result::Result<(), String>) {
    if let (Some(w), Some(t)) = (worker_for(), current_test()) {
        if w == t {
            worker_exit(f);
        }
    }
}

/// Tells the job this rank is done with the store; rank 0 waits until
/// every rank is, since the store may live in its process (when it hosts
/// it: [`Processes::master`]).
fn leave(ctx: &RankCtx, timeout: Duration) -> std::result::Result<(), String> {
    let key = |r: usize| format!("ranks/left/{r}");
    let told = ctx.store.set(&key(ctx.rank), b"");
    if ctx.rank != 0 {
        // Rank 0 may stop its store between storing the key and replying:
        // the work is done either way, and rank 0 checks every key arrived.
        return Ok(());
    }
    told.map_err(|e| format!("telling the job this rank is done: {e}"))?;
    {
        let keys: Vec<String> = (0..ctx.world).map(key).collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        ctx.store
            .wait(&refs, timeout)
            .map_err(|e| format!("waiting for every rank to be done with the store: {e}"))?;
    }
    Ok(())
}

/// Runs a rank's body and ends the process with its outcome.
fn worker_exit(f: impl FnOnce() -> std::result::Result<(), String>) -> ! {
    let rank = std::env::var("RANK").unwrap_or_else(|_| "?".into());
    // End the line libtest started ("test name ... ").
    println!();
    let code = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            println!("{FINISHED}{rank}");
            0
        }
        Ok(Err(e)) => {
            eprintln!("rank {rank} FAILED: {e}");
            1
        }
        Err(p) => {
            eprintln!("rank {rank} panicked: {}", panic_text(p.as_ref()));
            101
        }
    };
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    std::process::exit(code)
}

/// Joins the job a launcher started (`distrun`, `executor::launch`, or the
/// torchrun / Slurm / Open MPI variables): this rank's place from the
/// environment ([`RankInfo::from_env`]) and the job's store (`env://`),
/// reached within `timeout`.
pub fn join(timeout: Duration) -> Result<RankCtx> {
    let info = RankInfo::from_env()?;
    let store = init_store("env://", &info, timeout)?;
    Ok(RankCtx {
        rank: info.rank,
        world: info.world_size,
        local_rank: info.local_rank,
        store,
    })
}
