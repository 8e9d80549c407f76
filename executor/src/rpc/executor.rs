//! The driver side: [`Executor`] starts the workers, runs typed collective
//! RPCs on them, notices dead and hung workers, and shuts down in order.
//!
//! Concurrency: the engine (sockets, exits) sits behind one mutex and the
//! call table behind another. Whoever waits drives the engine itself (no
//! I/O thread, so a reply reaches the waiting caller with no hand-off);
//! other waiters sleep on a condition variable and take over when it is
//! released, and a caller that needs the engine while another thread waits
//! in it kicks it out through an eventfd.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use comm_core::{CommError, Missing, Result, Store};
use comm_shm::MessageQueue;
use rustix::process::Signal;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::engine::{Engine, Event, Kicker, Stream};
use super::local::{self, Doorbell, QueueConfig, DOORBELL_ENV, WORKER_DOORBELL_FDS};
use super::method::{Method, ReplyFrom};
use super::remote::{Acceptor, ADDR_KEY};
use super::wire::{self, Down, Outcome, Up, LEN_BYTES, MAX_FRAME};
use super::worker::EXECUTOR_FD_ENV;
use crate::cleanup;
use crate::launch::{
    group_alive, prepare_job, rank_command, signal_group, JobEnv, KILL_WAIT, POLL,
};
use crate::output::{spawn_reader, Sink};
use crate::LaunchConfig;

/// The control descriptor's number in a local worker.
const WORKER_FD: i32 = 3;
/// How long a local worker whose connection closed may take to be reaped
/// before it is reported without its exit status.
const EXIT_AFTER_CLOSE: Duration = Duration::from_secs(1);
/// Send buffer of the local workers' sockets (both directions).
const LOCAL_SOCKET_BUFFER: usize = 4 << 20;
/// Longest single wait of the start-up loop (it also looks at joins).
const START_SLICE: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Starting,
    Running,
    Stopping,
    Stopped,
}

#[derive(Debug, Default)]
struct WorkerState {
    pid: Option<u32>,
    host: Option<String>,
    ready: bool,
    init_error: Option<String>,
    /// Why it is gone, and in which phase that was noticed.
    gone: Option<(String, Phase)>,
}

impl WorkerState {
    fn who(&self) -> String {
        match (&self.host, self.pid) {
            (Some(h), Some(p)) => format!("remote worker (pid {p} on {h})"),
            (None, Some(p)) => format!("worker process (pid {p})"),
            _ => "worker".into(),
        }
    }
}

enum Got {
    /// The reply frame's body and where the value starts in it.
    Value(Vec<u8>, usize),
    Ack,
    Failed(String),
}

/// A call's name in messages ("collective_rpc `name` #id"), formatted
/// only when a message needs it: a call that succeeds formats nothing.
#[derive(Clone)]
struct CallName {
    method: Cow<'static, str>,
    id: u64,
}

impl fmt::Display for CallName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "collective_rpc `{}` #{}", self.method, self.id)
    }
}

struct Slot {
    op: CallName,
    reply_rank: Option<usize>,
    got: Vec<Option<Got>>,
    left: usize,
    error: Option<CommError>,
}

impl Slot {
    fn finished(&self) -> bool {
        self.error.is_some() || self.left == 0
    }
}

struct State {
    workers: Vec<WorkerState>,
    calls: HashMap<u64, Slot>,
    next_id: u64,
    /// The first worker lost while running, and how.
    fatal: Option<(usize, String)>,
    phase: Phase,
    /// Exit codes of the local workers once stopped.
    codes: Vec<i32>,
    /// Local workers still running after SIGKILL.
    stuck: Vec<Missing>,
    /// Threads waiting on the condition variable (a notification costs a
    /// system call, so it is made only when someone waits).
    sleepers: usize,
}

struct Shared {
    io: Mutex<Engine>,
    st: Mutex<State>,
    cv: Condvar,
    kick: Kicker,
    world: usize,
    local: usize,
    grace: Duration,
    job_id: String,
    /// The queue every local worker reads requests from, once attached
    /// (`None`: they read their sockets). Locked after `io`, never before.
    requests: Mutex<Option<MessageQueue>>,
}

impl Shared {
    fn lock_requests(&self) -> MutexGuard<'_, Option<MessageQueue>> {
        self.requests.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_st(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn try_io(&self) -> Option<MutexGuard<'_, Engine>> {
        match self.io.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// The engine, kicking out a thread that waits in it.
    fn lock_io(&self) -> MutexGuard<'_, Engine> {
        if let Some(g) = self.try_io() {
            return g;
        }
        self.kick.kick();
        self.io.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self) {
        let st = self.lock_st();
        self.wake(&st);
    }

    /// Wakes the threads waiting on the condition variable, if any (`st`
    /// is held, so none can be about to wait unseen).
    fn wake(&self, st: &State) {
        if st.sleepers > 0 {
            self.cv.notify_all();
        }
    }

    /// Runs the engine until `done`, the deadline, or (with `yield_on_kick`)
    /// another thread asking for it.
    fn drive(
        &self,
        io: &mut Engine,
        deadline: Instant,
        yield_on_kick: bool,
        done: impl Fn(&State, &Engine) -> bool,
    ) -> Result<()> {
        let mut events = Vec::new();
        loop {
            if done(&self.lock_st(), io) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            io.poll(left, &mut events)?;
            let kicked = {
                let mut st = self.lock_st();
                let k = self.apply(&mut st, io, &mut events);
                self.wake(&st);
                k
            };
            if kicked && yield_on_kick {
                return Ok(());
            }
        }
    }

    /// Applies engine events to the state; true when kicked.
    fn apply(&self, st: &mut State, io: &mut Engine, events: &mut Vec<Event>) -> bool {
        let mut kicked = false;
        for ev in events.drain(..) {
            match ev {
                Event::Kicked => kicked = true,
                Event::Frame(w, body) => self.on_frame(st, io, w, body),
                Event::Closed(w, why) => {
                    let who = st.workers[w].who();
                    let detail = if io.is_local(w) {
                        let exit = if matches!(st.phase, Phase::Starting | Phase::Running) {
                            io.await_exit(w, EXIT_AFTER_CLOSE)
                        } else {
                            io.exit_of(w)
                        };
                        match exit {
                            Some(e) => format!("{who} {}", e.describe()),
                            None => format!("{who}: {why}, and the process is still running"),
                        }
                    } else {
                        format!("{who}: {why}")
                    };
                    self.lost(st, w, detail);
                }
                Event::Exited(w) => {
                    if st.workers[w].gone.is_none() {
                        let how = io
                            .exit_of(w)
                            .map(|e| e.describe())
                            .unwrap_or_else(|| "exited".into());
                        let who = st.workers[w].who();
                        self.lost(st, w, format!("{who} {how}"));
                    }
                }
            }
        }
        kicked
    }

    fn on_frame(&self, st: &mut State, io: &mut Engine, w: usize, body: Vec<u8>) {
        let parsed = match wire::decode_up(&body) {
            Ok((Up::Ready, _)) => {
                st.workers[w].ready = true;
                return;
            }
            Ok((Up::InitError(m), _)) => {
                st.workers[w].init_error = Some(m.into_owned());
                return;
            }
            Ok((Up::Reply { id, outcome }, rest)) => {
                let at = body.len() - rest.len();
                let got = match outcome {
                    Outcome::Value => None,
                    Outcome::Ack => Some(Got::Ack),
                    Outcome::Failed { kind, message } => Some(Got::Failed(kind.describe(&message))),
                };
                Ok((id, got, at))
            }
            Ok((other, _)) => Err(format!("it sent a message out of place ({other:?})")),
            Err(e) => Err(format!("it sent an undecodable message ({e})")),
        };
        match parsed {
            Ok((id, got, at)) => {
                let got = got.unwrap_or(Got::Value(body, at));
                // A late reply of a call that timed out has no slot: dropped.
                if let Some(slot) = st.calls.get_mut(&id) {
                    if slot.got[w].is_none() {
                        slot.got[w] = Some(got);
                        slot.left -= 1;
                    }
                }
            }
            Err(why) => {
                io.close(w);
                let who = st.workers[w].who();
                self.lost(st, w, format!("{who}: {why}; its connection was closed"));
            }
        }
    }

    /// Worker `w` is gone: while running, every call waiting for it fails
    /// naming it (and the executor stops, see `Pending::wait`); while
    /// stopping, those calls fail as cut short by the shutdown.
    fn lost(&self, st: &mut State, w: usize, detail: String) {
        if st.workers[w].gone.is_some() {
            return;
        }
        let phase = st.phase;
        st.workers[w].gone = Some((detail.clone(), phase));
        let running = matches!(phase, Phase::Starting | Phase::Running);
        if running && st.fatal.is_none() {
            st.fatal = Some((w, detail.clone()));
        }
        for slot in st.calls.values_mut() {
            if slot.got[w].is_some() || slot.error.is_some() {
                continue;
            }
            slot.error = Some(if running {
                CommError::peer_lost(w, slot.op.to_string(), detail.clone())
            } else {
                CommError::Aborted(format!(
                    "{}: the executor shut down before rank {w} replied",
                    slot.op
                ))
            });
        }
    }

    /// Ok while calls may be made.
    fn usable(&self, st: &State, op: &dyn fmt::Display) -> Result<()> {
        if let Some((w, d)) = &st.fatal {
            return Err(CommError::peer_lost(
                *w,
                op.to_string(),
                format!("{d} (the executor then stopped every worker)"),
            ));
        }
        match st.phase {
            Phase::Running => Ok(()),
            Phase::Starting => Err(CommError::State(format!("{op}: the executor is starting"))),
            Phase::Stopping | Phase::Stopped => Err(CommError::State(format!(
                "{op}: the executor was shut down"
            ))),
        }
    }

    /// Stops every worker (idempotent; concurrent callers wait for the
    /// first): a shutdown message queued behind the calls in flight (which
    /// the workers answer first), up to the grace period for them to exit,
    /// SIGTERM (local) or closing the connection (remote), the grace period
    /// again, SIGKILL; then leftovers in the workers' process groups, the
    /// job's `/dev/shm` segments, and an explicit error for every call still
    /// unanswered. Returns the local workers' exit codes in rank order.
    fn stop(&self) -> Result<Vec<i32>> {
        {
            let mut st = self.lock_st();
            loop {
                match st.phase {
                    Phase::Stopped => return self.stop_result(&st),
                    Phase::Stopping => {
                        st.sleepers += 1;
                        st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
                        st.sleepers -= 1;
                    }
                    Phase::Starting | Phase::Running => {
                        st.phase = Phase::Stopping;
                        break;
                    }
                }
            }
        }
        let mut io = self.lock_io();
        let mut events = Vec::new();
        if let Ok(f) = wire::frame(&Down::Shutdown) {
            let f = Arc::new(f);
            let mut rq = self.lock_requests();
            let first_socket = if rq.is_some() { self.local } else { 0 };
            for w in first_socket..self.world {
                io.send(w, &f, &mut events);
            }
            if let Some(q) = rq.as_mut() {
                // Queued behind the calls in flight when it fits; closing the
                // queue ends the workers' reads once they drained it either way.
                let body = &f[LEN_BYTES..];
                // Its length, its header and up to 7 bytes of alignment.
                if q.free_bytes() >= body.len() + 16 {
                    let _ = q.enqueue_timeout(body, Duration::ZERO);
                }
                q.shutdown();
            }
        }
        {
            let mut st = self.lock_st();
            self.apply(&mut st, &mut io, &mut events);
        }
        let all_gone = |_: &State, io: &Engine| io.all_gone();
        let pids: Vec<Option<u32>> = {
            let st = self.lock_st();
            (0..self.world)
                .map(|w| {
                    if w < self.local {
                        st.workers[w].pid
                    } else {
                        None
                    }
                })
                .collect()
        };
        let signal_running = |io: &Engine, sig: Signal| {
            for (w, pid) in pids.iter().enumerate() {
                if let Some(p) = pid {
                    if io.exit_of(w).is_none() {
                        signal_group(*p, sig);
                    }
                }
            }
        };
        let _ = self.drive(&mut io, Instant::now() + self.grace, false, all_gone);
        if !io.all_gone() {
            signal_running(&io, Signal::TERM);
            for w in self.local..self.world {
                if io.connected(w) {
                    io.close(w);
                    let mut st = self.lock_st();
                    let who = st.workers[w].who();
                    self.lost(
                        &mut st,
                        w,
                        format!("{who}: closed by the executor's shutdown"),
                    );
                }
            }
            let _ = self.drive(&mut io, Instant::now() + self.grace, false, all_gone);
        }
        if !io.all_gone() {
            signal_running(&io, Signal::KILL);
            let local = self.local;
            let _ = self.drive(&mut io, Instant::now() + KILL_WAIT, false, |_, io| {
                (0..local).all(|w| io.exit_of(w).is_some())
            });
        }
        // Whatever the workers started in their process groups.
        let groups: Vec<u32> = pids.iter().flatten().copied().collect();
        stop_leftovers(&groups, self.grace);
        for w in 0..self.world {
            io.close(w);
        }
        io.detach_replies();
        drop(self.lock_requests().take());
        let codes: Vec<i32> = (0..self.local)
            .map(|w| io.exit_of(w).map(|e| e.code).unwrap_or(-1))
            .collect();
        let stuck: Vec<Missing> = (0..self.local)
            .filter(|&w| io.exit_of(w).is_none())
            .map(|w| Missing::new(w, format!("pid {:?} survived SIGKILL", pids[w])))
            .collect();
        drop(io);
        cleanup::remove_job_segments(&self.job_id, &groups);
        let mut st = self.lock_st();
        for slot in st.calls.values_mut() {
            if !slot.finished() {
                slot.error = Some(CommError::Aborted(format!(
                    "{}: the executor shut down before every worker replied",
                    slot.op
                )));
            }
        }
        st.phase = Phase::Stopped;
        st.codes = codes;
        st.stuck = stuck;
        self.wake(&st);
        self.stop_result(&st)
    }

    fn stop_result(&self, st: &State) -> Result<Vec<i32>> {
        if st.stuck.is_empty() {
            Ok(st.codes.clone())
        } else {
            Err(CommError::timeout_ranks(
                "executor shutdown (SIGKILL sent)",
                KILL_WAIT,
                st.stuck.clone(),
            ))
        }
    }
}

/// SIGTERM, grace, SIGKILL to process groups that still have members after
/// their leader (a worker) exited.
fn stop_leftovers(groups: &[u32], grace: Duration) {
    let alive = |g: &u32| group_alive(*g);
    if !groups.iter().any(alive) {
        return;
    }
    for sig in [Signal::TERM, Signal::KILL] {
        for g in groups.iter().filter(|g| alive(g)) {
            signal_group(*g, sig);
        }
        let deadline = Instant::now() + grace.max(Duration::from_millis(100));
        while groups.iter().any(alive) && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
        if !groups.iter().any(alive) {
            return;
        }
    }
}

/// One worker process per rank, driven by typed collective RPCs.
///
/// ```no_run
/// use executor::{Executor, LaunchConfig, Method, ReplyFrom};
/// use std::time::Duration;
/// const LOAD: Method<String, ()> = Method::new("load_model");
/// const GENERATE: Method<String, Vec<f32>> = Method::with_reply("generate", ReplyFrom::Rank(0));
/// // `my-worker` calls `executor::Worker::from_env()?.run(...)` with these methods.
/// let ex = Executor::start(&LaunchConfig::new("my-worker", 4), Duration::from_secs(60)).unwrap();
/// ex.collective_rpc(&LOAD, &"weights.safetensors".to_string(), Duration::from_secs(600)).unwrap();
/// let video = ex.collective_rpc(&GENERATE, &"a cat".to_string(), Duration::from_secs(60)).unwrap();
/// assert_eq!(video.len(), 1); // rank 0's result only
/// ex.shutdown().unwrap();
/// ```
///
/// Across hosts: start the executor on node 0 with
/// `LaunchConfig::nodes(K, 0)` and `master(addr, Some(port))` (and a
/// `DIST_JOB_SECRET`); on node I run
/// `distrun --nnodes K --node-rank I --master-addr addr --master-port port
/// --nproc-per-node N -- my-worker` with the same secret. Those workers find
/// the executor through the rendezvous store, authenticate, and are driven
/// from this one process.
pub struct Executor {
    shared: Arc<Shared>,
    _job: JobEnv,
    /// The local workers' doorbell (shared-memory replies).
    doorbell: Option<Arc<Doorbell>>,
    /// How local workers get requests (`None`: their sockets).
    queues: Option<QueueConfig>,
    /// A store hosted for the queues' set-up when the job's store is not
    /// hosted by this process.
    queue_store: Option<dist_utils::TcpStoreServer>,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("world_size", &self.shared.world)
            .field("local_workers", &self.shared.local)
            .field("job_id", &self.shared.job_id)
            .finish_non_exhaustive()
    }
}

/// A call submitted with [`Executor::submit`]; [`Pending::wait`] for its
/// replies. Dropping it abandons the call (late replies are discarded).
pub struct Pending<R> {
    shared: Arc<Shared>,
    id: u64,
    started: Instant,
    deadline: Instant,
    _result: PhantomData<fn() -> R>,
}

impl<R> std::fmt::Debug for Pending<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending").field("id", &self.id).finish()
    }
}

impl<R> Drop for Pending<R> {
    fn drop(&mut self) {
        self.shared.lock_st().calls.remove(&self.id);
    }
}

impl<R: DeserializeOwned> Pending<R> {
    /// The call's number (as in error messages: ``collective_rpc `m` #id``).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Waits for the call's replies, until the deadline given to
    /// [`Executor::submit`]. Returns the results in rank order (one per
    /// worker), or only the replying rank's for a
    /// [`ReplyFrom::Rank`] method. Errors:
    /// - [`CommError::RemoteFailed`]: the handler returned an error or
    ///   panicked on the listed ranks (with their messages); every worker
    ///   stays usable.
    /// - [`CommError::PeerLost`]: a worker died (or its connection broke)
    ///   before replying; it is named, and every other worker is stopped
    ///   before this returns (the executor is unusable afterwards).
    /// - [`CommError::Timeout`]: the ranks that did not reply in time; the
    ///   executor stays usable and their late replies are discarded.
    /// - [`CommError::Aborted`]: the executor was shut down before the call
    ///   was answered.
    pub fn wait(self) -> Result<Vec<R>> {
        let sh = &self.shared;
        loop {
            let mut st = sh.lock_st();
            if st.calls.get(&self.id).is_some_and(Slot::finished) {
                let slot = st
                    .calls
                    .remove(&self.id)
                    .ok_or_else(|| CommError::State(format!("call #{} vanished", self.id)))?;
                let fatal = st.fatal.is_some() && st.phase == Phase::Running;
                drop(st);
                if fatal {
                    // The first to see a dead worker stops the others.
                    let _ = sh.stop();
                }
                return finish::<R>(slot, sh.world);
            }
            let Some(slot) = st.calls.get(&self.id) else {
                return Err(CommError::State(format!(
                    "call #{} is no longer known to the executor",
                    self.id
                )));
            };
            let now = Instant::now();
            if now >= self.deadline {
                let missing: Vec<Missing> = (0..sh.world)
                    .filter(|&w| slot.got[w].is_none())
                    .map(|w| Missing::new(w, "no reply"))
                    .collect();
                let op = slot.op.to_string();
                st.calls.remove(&self.id);
                return Err(CommError::timeout_ranks(op, now - self.started, missing));
            }
            match sh.try_io() {
                Some(mut io) => {
                    drop(st);
                    let id = self.id;
                    let res = sh.drive(&mut io, self.deadline, true, |st, _| {
                        st.calls.get(&id).is_none_or(Slot::finished)
                    });
                    drop(io);
                    sh.notify();
                    res?;
                }
                None => {
                    let left = self.deadline - now;
                    st.sleepers += 1;
                    let (mut st, _) = sh
                        .cv
                        .wait_timeout(st, left)
                        .unwrap_or_else(|p| p.into_inner());
                    st.sleepers -= 1;
                }
            }
        }
    }
}

fn finish<R: DeserializeOwned>(slot: Slot, world: usize) -> Result<Vec<R>> {
    if let Some(e) = slot.error {
        return Err(e);
    }
    let failures: Vec<Missing> = slot
        .got
        .iter()
        .enumerate()
        .filter_map(|(w, g)| match g {
            Some(Got::Failed(m)) => Some(Missing::new(w, m.clone())),
            _ => None,
        })
        .collect();
    if !failures.is_empty() {
        return Err(CommError::RemoteFailed {
            operation: slot.op.to_string(),
            failures,
        });
    }
    let value = |w: usize| -> Result<R> {
        match &slot.got[w] {
            Some(Got::Value(body, at)) => dist_utils::codec::decode(&body[*at..])
                .map_err(|e| CommError::Codec(format!("{}: the result of rank {w}: {e}", slot.op))),
            _ => Err(CommError::Protocol(format!(
                "{}: rank {w} acknowledged instead of sending its result",
                slot.op
            ))),
        }
    };
    match slot.reply_rank {
        None => (0..world).map(value).collect(),
        Some(r) => Ok(vec![value(r)?]),
    }
}

// An executor is shared between the driver's threads (one submits while
// another waits): keep it Send + Sync.
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<Executor>();
};

impl Executor {
    /// Starts the workers of `cfg` and waits up to `ready_timeout` for a
    /// READY or an ERROR from each: `cfg.nproc_per_node` local processes
    /// (with the same environment as [`crate::launch`]) and, for a
    /// multi-node `cfg` (this must be node 0), the workers `distrun` starts
    /// on the other nodes. If any worker reports an error, exits or stays
    /// silent, every worker is stopped and the error lists each failed rank
    /// ([`CommError::RemoteFailed`], or [`CommError::Timeout`] when the
    /// only problem is silence).
    ///
    /// Once every worker is READY, the local ones switch to shared memory:
    /// each request is written once into a queue they all read, and each
    /// replies through its own queue (`DIST_EXECUTOR_QUEUE=socket` keeps
    /// them on their sockets; ring sizes: `DIST_EXECUTOR_REQUEST_RING`,
    /// `DIST_EXECUTOR_REPLY_RING`; these are read from `cfg.env`, then from
    /// this process's environment). Remote workers keep their TCP
    /// connection.
    pub fn start(cfg: &LaunchConfig, ready_timeout: Duration) -> Result<Executor> {
        Self::start_with(cfg, ready_timeout, &())
    }

    /// [`Executor::start`], handing every worker `init` (what
    /// [`Worker::init_value`](crate::Worker::init_value) returns there,
    /// before it builds its state): the configuration the workers set
    /// themselves up from, as the [`GpuWorker`](crate::GpuWorker) does.
    pub fn start_with<I: Serialize + ?Sized>(
        cfg: &LaunchConfig,
        ready_timeout: Duration,
        init: &I,
    ) -> Result<Executor> {
        if cfg.nnodes > 1 && cfg.node_rank != 0 {
            return Err(CommError::invalid(format!(
                "the executor drives the job from node 0 (it was given --node-rank {}); start the \
                 workers of the other nodes with `distrun --nnodes {} --node-rank I ...`",
                cfg.node_rank, cfg.nnodes
            )));
        }
        // The job's environment (as the workers get it), then this process's.
        let queues = QueueConfig::from_vars(|k| {
            cfg.env
                .iter()
                .rev()
                .find(|(key, _)| key.as_os_str() == k)
                .map(|(_, v)| v.to_string_lossy().into_owned())
                .or_else(|| std::env::var(k).ok())
        })?;
        let init = Arc::new(wire::frame_with(&Down::Init, Some(init))?);
        let job = prepare_job(cfg)?;
        let world = cfg.world_size();
        let local = cfg.nproc_per_node;
        let mut engine = Engine::new(world, super::spin_budget(local + 1))?;
        let doorbell = match queues {
            Some(_) if local > 0 => {
                let d = Arc::new(Doorbell::new()?);
                engine.set_doorbell(d.clone())?;
                Some(d)
            }
            _ => None,
        };
        let kick = engine.kicker();
        let shared = Arc::new(Shared {
            io: Mutex::new(engine),
            st: Mutex::new(State {
                workers: (0..world).map(|_| WorkerState::default()).collect(),
                calls: HashMap::new(),
                next_id: 0,
                fatal: None,
                phase: Phase::Starting,
                codes: Vec::new(),
                stuck: Vec::new(),
                sleepers: 0,
            }),
            cv: Condvar::new(),
            kick: kick.clone(),
            world,
            local,
            grace: cfg.grace,
            job_id: job.job_id.clone(),
            requests: Mutex::new(None),
        });
        // From here on, dropping `ex` stops whatever was started.
        let mut ex = Executor {
            shared,
            _job: job,
            doorbell,
            queues: queues.filter(|_| local > 0),
            queue_store: None,
        };
        let deadline = Instant::now() + ready_timeout;

        let acceptor = if world > local {
            let acc = Acceptor::start(
                &cfg.master_addr,
                &ex._job.secret_bytes,
                (local..world).collect(),
                world,
                kick,
            )?;
            let server = ex._job.server.as_ref().ok_or_else(|| {
                CommError::State("node 0 of a multi-node executor hosts no store".into())
            })?;
            let store = dist_utils::TcpStore::connect(
                server.connect_addr(),
                &ex._job.secret_bytes,
                ready_timeout,
            )?;
            store.set(ADDR_KEY, acc.addr().to_string().as_bytes())?;
            Some(acc)
        } else {
            None
        };

        for l in 0..local {
            ex.spawn_local(cfg, l, &init)?;
        }
        ex.await_ready(acceptor.as_ref(), deadline, ready_timeout, &init)?;
        ex.attach_local(deadline, ready_timeout)?;
        ex.shared.lock_st().phase = Phase::Running;
        Ok(ex)
    }

    fn spawn_local(&self, cfg: &LaunchConfig, local: usize, init: &Arc<Vec<u8>>) -> Result<()> {
        let rank = cfg.node_rank * cfg.nproc_per_node + local;
        let (ours, theirs) =
            UnixStream::pair().map_err(|e| CommError::io("creating a worker control socket", e))?;
        // A large request then crosses in a few wake-ups instead of one per
        // ~200 KiB (the kernel caps the size at net.core.wmem_max).
        for s in [&ours, &theirs] {
            let _ = rustix::net::sockopt::set_socket_send_buffer_size(s, LOCAL_SOCKET_BUFFER);
        }
        let mut cmd = rank_command(cfg, &self._job, local);
        cmd.env(EXECUTOR_FD_ENV, WORKER_FD.to_string());
        let forward = !cfg.inherit_output;
        if forward {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        // (source, target) descriptors the worker inherits: its socket and,
        // with shared-memory queues, the doorbell page and eventfd.
        let mut place: [(i32, i32); 3] = [(theirs.as_raw_fd(), WORKER_FD), (-1, -1), (-1, -1)];
        if let Some(d) = &self.doorbell {
            let (page, event) = d.fds();
            place[1] = (page.as_raw_fd(), WORKER_DOORBELL_FDS[0]);
            place[2] = (event.as_raw_fd(), WORKER_DOORBELL_FDS[1]);
            cmd.env(
                DOORBELL_ENV,
                format!("{},{}", WORKER_DOORBELL_FDS[0], WORKER_DOORBELL_FDS[1]),
            );
        } else {
            cmd.env_remove(DOORBELL_ENV);
        }
        // SAFETY: runs in the forked child before exec; fcntl and dup2 are
        // async-signal-safe, allocate nothing and touch only descriptors.
        // Every source is first copied above the targets, so placing one
        // never overwrites another still to be placed.
        unsafe {
            cmd.pre_exec(move || {
                let mut high = [-1i32; 3];
                for (i, &(src, _)) in place.iter().enumerate() {
                    if src >= 0 {
                        high[i] = libc::fcntl(src, libc::F_DUPFD_CLOEXEC, 16);
                        if high[i] == -1 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                }
                for (i, &(_, dst)) in place.iter().enumerate() {
                    // dup2 clears close-on-exec on the copy.
                    if high[i] >= 0 && libc::dup2(high[i], dst) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| {
            CommError::io(
                format!(
                    "starting worker rank {rank}: `{}`",
                    cfg.program.to_string_lossy()
                ),
                e,
            )
        })?;
        drop(theirs);
        let pid = child.id();
        self.shared.lock_st().workers[rank].pid = Some(pid);
        {
            let mut io = self.shared.lock_io();
            io.watch_exit(rank, pid)?;
            io.add_conn(rank, Stream::Unix(ours), MAX_FRAME)?;
            let mut events = Vec::new();
            io.send(rank, init, &mut events);
            let mut st = self.shared.lock_st();
            self.shared.apply(&mut st, &mut io, &mut events);
        }
        if forward {
            // Nobody waits for these readers: they end with the pipes.
            let (done, _) = std::sync::mpsc::channel();
            let p = cfg.prefix.then(|| format!("[rank {rank}] "));
            if let Some(o) = child.stdout.take() {
                spawn_reader(o, Sink::Stdout(p.clone()), done.clone())?;
            }
            if let Some(e) = child.stderr.take() {
                spawn_reader(e, Sink::Stderr(p), done)?;
            }
        }
        Ok(())
    }

    /// True once a worker failed or left during start-up.
    fn start_failed(st: &State) -> bool {
        st.workers
            .iter()
            .any(|w| w.init_error.is_some() || w.gone.is_some())
    }

    /// Waits for READY from everyone (admitting remote workers meanwhile
    /// and sending them `init`); on any failure stops everything and
    /// reports every failed rank.
    fn await_ready(
        &self,
        acceptor: Option<&Acceptor>,
        deadline: Instant,
        ready_timeout: Duration,
        init: &Arc<Vec<u8>>,
    ) -> Result<()> {
        let sh = &self.shared;
        let mut events = Vec::new();
        let timed_out = loop {
            {
                let st = sh.lock_st();
                if st.workers.iter().all(|w| w.ready) {
                    return Ok(());
                }
                if Self::start_failed(&st) {
                    break false;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break true;
            }
            let mut io = sh.lock_io();
            io.poll(left.min(START_SLICE), &mut events)?;
            let mut st = sh.lock_st();
            sh.apply(&mut st, &mut io, &mut events);
            if let Some(acc) = acceptor {
                for j in acc.joined.try_iter() {
                    st.workers[j.rank].pid = Some(j.pid);
                    st.workers[j.rank].host = Some(j.host);
                    io.add_conn(j.rank, Stream::Tcp(j.stream), MAX_FRAME)?;
                    io.send(j.rank, init, &mut events);
                }
                sh.apply(&mut st, &mut io, &mut events);
            }
        };
        Err(self.start_error(timed_out, ready_timeout, None))
    }

    /// Stops everything after a failed start and names every failed rank
    /// (`setup`: the error of the shared-memory set-up, when that failed).
    fn start_error(
        &self,
        timed_out: bool,
        ready_timeout: Duration,
        setup: Option<CommError>,
    ) -> CommError {
        let sh = &self.shared;
        // Stopping lets late init errors of the others arrive too.
        let _ = sh.stop();
        let st = sh.lock_st();
        let mut failures = Vec::new();
        let mut silent = Vec::new();
        for (w, ws) in st.workers.iter().enumerate() {
            let before_stop = ws
                .gone
                .as_ref()
                .filter(|(_, ph)| matches!(ph, Phase::Starting | Phase::Running));
            if let Some(m) = &ws.init_error {
                failures.push(Missing::new(w, format!("initialisation failed: {m}")));
            } else if let Some((d, _)) = before_stop {
                let when = if ws.ready { "after" } else { "before" };
                failures.push(Missing::new(w, format!("exited {when} READY: {d}")));
            } else if !ws.ready {
                silent.push(Missing::new(
                    w,
                    if w >= sh.local && ws.pid.is_none() {
                        "never connected (is `distrun --nnodes ... --node-rank ...` running on \
                         its node, with the same --master-addr, --master-port and \
                         DIST_JOB_SECRET?)"
                            .to_string()
                    } else {
                        format!("no READY within {ready_timeout:?}")
                    },
                ));
            }
        }
        if failures.is_empty() {
            if let Some(e) = setup {
                return e;
            }
        }
        if failures.is_empty() && timed_out {
            return CommError::timeout_ranks(
                "executor start: waiting for READY (every worker was stopped)",
                ready_timeout,
                silent,
            );
        }
        if timed_out {
            failures.extend(silent);
        }
        CommError::RemoteFailed {
            operation: "executor start (every worker was stopped)".into(),
            failures,
        }
    }

    /// Moves the local workers (all READY) to the shared-memory queues: tells
    /// each to attach, sets up the executor's ends on a helper thread while
    /// this one keeps watching the workers, and installs the queues.
    fn attach_local(&mut self, deadline: Instant, ready_timeout: Duration) -> Result<()> {
        let Some(qc) = self.queues else {
            return Ok(());
        };
        let sh = self.shared.clone();
        let local = sh.local;
        let store_addr = match &self._job.server {
            Some(s) => s.connect_addr(),
            None => {
                let s = dist_utils::TcpStoreServer::bind("127.0.0.1:0", &self._job.secret_bytes)?;
                let a = s.connect_addr();
                self.queue_store = Some(s);
                a
            }
        };
        // Not earlier than the READY deadline, but never a rushed set-up.
        let timeout = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(10));
        let prefix = format!(
            "executor/{}",
            comm_core::auth::to_hex(&comm_core::auth::random_bytes::<8>()?)
        );
        let attach = Arc::new(wire::frame(&Down::Attach {
            store: store_addr.to_string().into(),
            prefix: prefix.as_str().into(),
            executor_rank: sh.world as u32,
            reply_ring: qc.reply_ring as u64,
            timeout_ms: timeout.as_millis() as u64,
        })?);
        {
            let mut io = sh.lock_io();
            let mut events = Vec::new();
            for w in 0..local {
                io.send(w, &attach, &mut events);
            }
            let mut st = sh.lock_st();
            sh.apply(&mut st, &mut io, &mut events);
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let secret = self._job.secret_bytes.clone();
        let job_id = sh.job_id.clone();
        let (world, kick) = (sh.world, sh.kick.clone());
        let ranks: Vec<usize> = (0..local).collect();
        // Not joined: if a worker fails before it opened its queue, the
        // set-up waits out its deadline on its own while start() reports
        // the failure at once.
        std::thread::Builder::new()
            .name("executor-queues".into())
            .spawn(move || {
                let res =
                    dist_utils::TcpStore::connect(store_addr, &secret, timeout).and_then(|store| {
                        local::executor_side(
                            &store,
                            &prefix,
                            &ranks,
                            world,
                            qc.request_ring,
                            &job_id,
                            timeout,
                        )
                    });
                let _ = tx.send(res);
                kick.kick();
            })
            .map_err(|e| CommError::io("starting the queue set-up thread", e))?;
        let until = Instant::now() + timeout;
        let mut events = Vec::new();
        let outcome = loop {
            match rx.try_recv() {
                Ok(r) => break Some(r),
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    break Some(Err(CommError::State(
                        "the queue set-up thread ended without a result".into(),
                    )))
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => {}
            }
            if Self::start_failed(&sh.lock_st()) {
                break None;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break None;
            }
            let mut io = sh.lock_io();
            io.poll(left.min(START_SLICE), &mut events)?;
            let mut st = sh.lock_st();
            sh.apply(&mut st, &mut io, &mut events);
        };
        match outcome {
            Some(Ok((requests, replies))) => {
                let mut io = sh.lock_io();
                io.attach_replies(replies, comm_core::default_timeout());
                *sh.lock_requests() = Some(requests);
                Ok(())
            }
            Some(Err(e)) => {
                let e = CommError::State(format!(
                    "executor start: setting up the shared-memory queues of the local workers \
                     failed (every worker was stopped; {}=socket avoids them): {e}",
                    local::QUEUE_ENV
                ));
                Err(self.start_error(false, ready_timeout, Some(e)))
            }
            None => {
                let timed_out = !Self::start_failed(&sh.lock_st());
                let e = timed_out.then(|| {
                    CommError::timeout(
                        "executor start: setting up the shared-memory queues of the local workers \
                         (every worker was stopped)",
                        timeout,
                        ["the request queue and the workers' reply queues"],
                    )
                });
                Err(self.start_error(false, ready_timeout, e))
            }
        }
    }

    /// Number of workers (all hosts).
    pub fn world_size(&self) -> usize {
        self.shared.world
    }

    /// Process ids of the workers on this host, in rank order.
    pub fn pids(&self) -> Vec<u32> {
        let st = self.shared.lock_st();
        st.workers[..self.shared.local]
            .iter()
            .filter_map(|w| w.pid)
            .collect()
    }

    /// The job id (`DIST_JOB_ID` of every worker).
    pub fn job_id(&self) -> &str {
        &self.shared.job_id
    }

    /// Sends `method(args)` to every worker and returns at once (after the
    /// request was handed to every connection; a large request is written
    /// while replies keep being read). The argument is encoded once. Calls
    /// are answered in the order they were submitted.
    pub fn submit<A: Serialize, R: DeserializeOwned>(
        &self,
        method: &Method<A, R>,
        args: &A,
        timeout: Duration,
    ) -> Result<Pending<R>> {
        let sh = &self.shared;
        let reply_rank = match method.reply_from() {
            ReplyFrom::All => None,
            ReplyFrom::Rank(r) if r < sh.world => Some(r),
            ReplyFrom::Rank(r) => {
                return Err(CommError::invalid(format!(
                    "method `{}` replies from rank {r}, but there are {} workers",
                    method.name(),
                    sh.world
                )))
            }
        };
        let started = Instant::now();
        let deadline = started + timeout;
        let id = {
            let mut st = sh.lock_st();
            sh.usable(&st, &format_args!("collective_rpc `{}`", method.name()))?;
            st.next_id += 1;
            st.next_id
        };
        let op = CallName {
            method: method.name.clone(),
            id,
        };
        let header = Down::Call {
            id,
            method: method.name().into(),
            reply_rank: reply_rank.map(|r| r as u32),
        };
        // With every worker on the request queue, the request is encoded
        // straight into its ring when it has room now (one copy in all);
        // otherwise, and for sockets, into a frame first. Sizing it here
        // also reports an argument that cannot be encoded before anything
        // was sent.
        let sized = wire::SizedMessage::new(&header, args)?;
        let mut frame: Option<Arc<Vec<u8>>> = None;
        let frame_of = |frame: &mut Option<Arc<Vec<u8>>>| -> Result<Arc<Vec<u8>>> {
            if let Some(f) = frame {
                return Ok(f.clone());
            }
            let f = Arc::new(sized.frame()?);
            *frame = Some(f.clone());
            Ok(f)
        };
        {
            let mut st = sh.lock_st();
            sh.usable(&st, &op)?;
            st.calls.insert(
                id,
                Slot {
                    op: op.clone(),
                    reply_rank,
                    got: (0..sh.world).map(|_| None).collect(),
                    left: sh.world,
                    error: None,
                },
            );
        }
        let pending = Pending {
            shared: sh.clone(),
            id,
            started,
            deadline,
            _result: PhantomData,
        };
        {
            let mut io = sh.lock_io();
            let mut events = Vec::new();
            // Deaths already reported are taken in before sending.
            io.poll(Duration::ZERO, &mut events)?;
            let mut rq = sh.lock_requests();
            // Remote workers (and local ones without a queue): their
            // connections, written as they accept while replies are read.
            let first_socket = if rq.is_some() { sh.local } else { 0 };
            if first_socket < sh.world {
                let f = match frame_of(&mut frame) {
                    Ok(f) => f,
                    Err(e) => {
                        drop(rq);
                        sh.lock_st().calls.remove(&id);
                        return Err(e);
                    }
                };
                for w in first_socket..sh.world {
                    io.send(w, &f, &mut events);
                }
            }
            {
                let mut st = sh.lock_st();
                sh.apply(&mut st, &mut io, &mut events);
                sh.wake(&st);
            }
            // Local workers: the one copy into the queue they all read, in
            // the same critical section as the sends, so every worker sees
            // calls in the same order.
            if let Some(q) = rq.as_mut() {
                let direct = match frame {
                    Some(_) => Ok(false),
                    None => sized.try_enqueue(q),
                };
                // An encoding failure writes nothing: the queue stays
                // usable, and only this call fails.
                let body = match direct {
                    Ok(true) => Ok(None),
                    Ok(false) => frame_of(&mut frame).map(Some),
                    Err(e) => Err(e),
                };
                let body = match body {
                    Ok(b) => b,
                    Err(e) => {
                        drop(rq);
                        sh.lock_st().calls.remove(&id);
                        return Err(e);
                    }
                };
                let res = match body {
                    None => Ok(()),
                    Some(f) => Self::enqueue_request(sh, &mut io, q, &f[LEN_BYTES..], deadline),
                };
                if let Err(e) = res {
                    drop(rq);
                    return Err(self.request_queue_failed(io, &op.to_string(), id, e));
                }
            }
            drop(rq);
            sh.drive(&mut io, deadline, false, |_, io| !io.pending_out())?;
        }
        sh.notify();
        let fatal = {
            let st = sh.lock_st();
            st.fatal.is_some() && st.phase == Phase::Running
        };
        if fatal {
            // A worker was found dead while sending: report it like `wait`.
            return match pending.wait() {
                Err(e) => Err(e),
                Ok(_) => Err(sh
                    .usable(&sh.lock_st(), &op)
                    .err()
                    .unwrap_or_else(|| CommError::State(format!("{op}: a worker died")))),
            };
        }
        Ok(pending)
    }

    /// Writes a request `body` into the request queue: at once when it has
    /// room, else on a helper thread while this one keeps reading replies
    /// (a worker blocked on a full reply queue then moves on).
    fn enqueue_request(
        sh: &Shared,
        io: &mut Engine,
        q: &mut MessageQueue,
        body: &[u8],
        deadline: Instant,
    ) -> Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        // Its length, its header and up to 7 bytes of alignment.
        if q.free_bytes() >= body.len() + 16 {
            return q.enqueue_timeout(body, left);
        }
        let written = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let (kick, written) = (sh.kick.clone(), &written);
            let h = s.spawn(move || {
                let r = q.enqueue_timeout(body, left);
                // Set before the kick, so the kicked drive below sees it
                // (the thread itself may still be returning).
                written.store(true, std::sync::atomic::Ordering::Release);
                kick.kick();
                r
            });
            let _ = sh.drive(io, deadline, false, |_, _| {
                written.load(std::sync::atomic::Ordering::Acquire)
            });
            h.join()
                .unwrap_or_else(|_| Err(CommError::State("the request writer panicked".into())))
        })
    }

    /// The request queue refused a request (a reader died, or stayed a whole
    /// ring behind until the call's deadline). A partial request may be in
    /// the queue, so no later request can be read correctly: the executor
    /// stops every worker and the error names the workers at fault.
    fn request_queue_failed(
        &self,
        mut io: MutexGuard<'_, Engine>,
        op: &str,
        id: u64,
        e: CommError,
    ) -> CommError {
        let sh = &self.shared;
        let culprits: Vec<usize> = e.culprits().iter().map(|r| r.best()).collect();
        // A dead worker's exit is described better by the engine.
        if let Some(&w) = culprits.first() {
            let _ = sh.drive(
                &mut io,
                Instant::now() + EXIT_AFTER_CLOSE,
                false,
                |st, _| st.workers[w].gone.is_some(),
            );
        }
        {
            let mut st = sh.lock_st();
            st.calls.remove(&id);
            if st.fatal.is_none() {
                let w = culprits.first().copied().unwrap_or(0);
                st.fatal = Some((
                    w,
                    format!(
                        "{op}: the request queue failed, so no later request could be read: {e}"
                    ),
                ));
            }
        }
        drop(io);
        let _ = sh.stop();
        match e {
            CommError::PeerLost { .. } => {
                let st = sh.lock_st();
                culprits
                    .first()
                    .and_then(|&w| st.workers[w].gone.as_ref().map(|(d, _)| (w, d.clone())))
                    .map(|(w, d)| CommError::peer_lost(w, op, d))
                    .unwrap_or(e)
            }
            other => other,
        }
    }

    /// Calls `method(args)` on every worker and waits for the replies:
    /// [`Executor::submit`] then [`Pending::wait`] (see there for results
    /// and errors).
    pub fn collective_rpc<A: Serialize, R: DeserializeOwned>(
        &self,
        method: &Method<A, R>,
        args: &A,
        timeout: Duration,
    ) -> Result<Vec<R>> {
        self.submit(method, args, timeout)?.wait()
    }

    /// Stops every worker: a shutdown message queued behind the calls in
    /// flight (the workers answer those first, and their [`Pending`]s get
    /// the replies), up to the grace period for them to exit, then SIGTERM
    /// to each local worker's process group (remote workers: the
    /// connection is closed, and their `distrun` ends them), the grace
    /// period again, then SIGKILL. Calls still unanswered then fail with
    /// [`CommError::Aborted`]. The job's `/dev/shm` segments are removed.
    /// Returns the local workers' exit codes in rank order (`128 + signal`
    /// for a signal).
    pub fn shutdown(self) -> Result<Vec<i32>> {
        self.shared.stop()
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        if let Err(e) = self.shared.stop() {
            tracing::warn!("executor shutdown on drop: {e}");
        }
    }
}
