//! A multi-process executor: one worker process per rank, a READY/ERROR
//! handshake, `collective_rpc` with replies in rank order, dead-worker
//! detection, and an orderly shutdown.
//!
//! The executor talks to each worker over a Unix socket pair whose worker end
//! is file descriptor 3 in the worker (named by `DIST_EXECUTOR_FD`); messages
//! are length-prefixed postcard frames ([`dist_utils::codec`]). Workers use
//! [`Worker`].

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use comm_core::{CommError, Deadline, Result};
use dist_utils::codec::{decode, encode, read_msg, write_msg};
use rustix::process::Signal;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::launch::{
    group_alive, prepare_job, rank_command, signal_group, spawn_reader, status_code, JobEnv, Sink,
    KILL_WAIT, POLL,
};
use crate::LaunchConfig;

/// Environment variable naming the worker's control file descriptor.
pub const EXECUTOR_FD_ENV: &str = "DIST_EXECUTOR_FD";
/// The control descriptor's number in the worker.
const WORKER_FD: i32 = 3;
/// Largest control message accepted (1 GiB).
const MAX_MSG: usize = 1 << 30;

#[derive(Debug, Serialize, Deserialize)]
enum ToWorker {
    Call {
        id: u64,
        method: String,
        args: Vec<u8>,
    },
    Shutdown,
}

#[derive(Debug, Serialize, Deserialize)]
enum FromWorker {
    Ready,
    InitError(String),
    Reply {
        id: u64,
        result: std::result::Result<Vec<u8>, String>,
    },
}

enum Event {
    Msg(FromWorker),
    /// The control connection closed or broke (the worker exited).
    Closed(String),
}

struct Handle {
    rank: usize,
    pid: u32,
    child: Child,
    ctl: UnixStream,
    exit: Option<(i32, Option<i32>)>,
    dead: Option<String>,
}

/// One worker process per rank, driven by collective RPCs.
///
/// ```no_run
/// use executor::{Executor, LaunchConfig};
/// use std::time::Duration;
/// // `my-worker` calls `executor::Worker::from_env()?.serve(...)`.
/// let mut ex = Executor::start(&LaunchConfig::new("my-worker", 4), Duration::from_secs(60)).unwrap();
/// let replies = ex.collective_rpc("load_model", b"", Duration::from_secs(600)).unwrap();
/// assert_eq!(replies.len(), 4);
/// ex.shutdown().unwrap();
/// ```
pub struct Executor {
    workers: Vec<Handle>,
    events: mpsc::Receiver<(usize, Event)>,
    next_id: u64,
    grace: Duration,
    closed: bool,
    _job: JobEnv,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("world_size", &self.workers.len())
            .field("pids", &self.pids())
            .finish_non_exhaustive()
    }
}

impl Executor {
    /// Starts `cfg.nproc_per_node` workers (with the same environment as
    /// [`crate::launch`]) and waits up to `ready_timeout` for a READY or an
    /// ERROR from each. If any worker reports an error, exits or stays
    /// silent, every worker is stopped and the error lists each failed rank.
    pub fn start(cfg: &LaunchConfig, ready_timeout: Duration) -> Result<Executor> {
        let job = prepare_job(cfg)?;
        let (tx, rx) = mpsc::channel();
        let mut ex = Executor {
            workers: Vec::with_capacity(cfg.nproc_per_node),
            events: rx,
            next_id: 0,
            grace: cfg.grace,
            closed: false,
            _job: job,
        };
        for local in 0..cfg.nproc_per_node {
            let rank = cfg.node_rank * cfg.nproc_per_node + local;
            let (ours, theirs) = UnixStream::pair()
                .map_err(|e| CommError::io("creating a worker control socket", e))?;
            let mut cmd = rank_command(cfg, &ex._job, local);
            cmd.env(EXECUTOR_FD_ENV, WORKER_FD.to_string());
            if cfg.prefix {
                cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            }
            let fd = theirs.as_raw_fd();
            // SAFETY: runs in the forked child before exec; dup2 and fcntl are
            // async-signal-safe, allocate nothing and touch only descriptors.
            unsafe {
                cmd.pre_exec(move || {
                    if fd == WORKER_FD {
                        // Already in place: only clear close-on-exec.
                        if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                            return Err(std::io::Error::last_os_error());
                        }
                    } else if libc::dup2(fd, WORKER_FD) == -1 {
                        return Err(std::io::Error::last_os_error());
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
            if cfg.prefix {
                let (done, _) = mpsc::channel();
                let p = format!("[rank {rank}] ");
                if let Some(o) = child.stdout.take() {
                    spawn_reader(o, Sink::Stdout(Some(p.clone())), done.clone())?;
                }
                if let Some(e) = child.stderr.take() {
                    spawn_reader(e, Sink::Stderr(Some(p)), done)?;
                }
            }
            let reader = ours
                .try_clone()
                .map_err(|e| CommError::io("cloning a worker control socket", e))?;
            spawn_event_reader(local, reader, tx.clone())?;
            ex.workers.push(Handle {
                rank,
                pid: child.id(),
                child,
                ctl: ours,
                exit: None,
                dead: None,
            });
        }
        drop(tx);

        // READY / ERROR from everyone, or the deadline.
        let deadline = Deadline::after(ready_timeout);
        let mut state: Vec<Option<std::result::Result<(), String>>> = vec![None; ex.workers.len()];
        while state.iter().any(Option::is_none) && !deadline.expired() {
            match ex.events.recv_timeout(deadline.remaining()) {
                Ok((i, Event::Msg(FromWorker::Ready))) => state[i] = Some(Ok(())),
                Ok((i, Event::Msg(FromWorker::InitError(m)))) => {
                    state[i] = Some(Err(format!("reported: {m}")))
                }
                Ok((i, Event::Msg(other))) => {
                    state[i] = Some(Err(format!("sent {other:?} before READY")));
                }
                Ok((i, Event::Closed(why))) => {
                    let code = ex.reap(i, Duration::from_secs(1));
                    let died = format!("{}; {why}", describe_exit(code));
                    state[i] = Some(match state[i].take() {
                        None => Err(format!("exited before READY ({died})")),
                        Some(Ok(())) => Err(format!("exited after READY ({died})")),
                        Some(Err(m)) => Err(m),
                    });
                }
                Err(_) => break,
            }
        }
        let mut problems = Vec::new();
        let mut silent = Vec::new();
        for (i, s) in state.iter().enumerate() {
            let rank = ex.workers[i].rank;
            match s {
                Some(Ok(())) => {}
                Some(Err(m)) => {
                    problems.push(format!("rank {rank} (pid {}): {m}", ex.workers[i].pid))
                }
                None => silent.push(format!("rank {rank}")),
            }
        }
        if problems.is_empty() && silent.is_empty() {
            return Ok(ex);
        }
        let _ = ex.stop();
        if problems.is_empty() {
            return Err(CommError::timeout(
                format!(
                    "executor start: waiting for READY from {} worker(s)",
                    state.len()
                ),
                deadline.elapsed(),
                silent,
            ));
        }
        if !silent.is_empty() {
            problems.push(format!(
                "no READY within {ready_timeout:?} from {}",
                silent.join(", ")
            ));
        }
        Err(CommError::Aborted(format!(
            "executor start failed; every worker was stopped. {}",
            problems.join("; ")
        )))
    }

    /// Number of workers.
    pub fn world_size(&self) -> usize {
        self.workers.len()
    }

    /// Worker process ids in rank order.
    pub fn pids(&self) -> Vec<u32> {
        self.workers.iter().map(|w| w.pid).collect()
    }

    /// Calls `method(args)` on every worker and returns the replies in rank
    /// order. Fails fast with [`CommError::PeerLost`] naming a worker that
    /// died (before or during the call), with [`CommError::Timeout`] naming
    /// the ranks that did not reply within `timeout`, and with
    /// [`CommError::Aborted`] listing every rank whose handler returned an
    /// error. After a timeout, late replies of that call are discarded.
    pub fn collective_rpc(
        &mut self,
        method: &str,
        args: &[u8],
        timeout: Duration,
    ) -> Result<Vec<Vec<u8>>> {
        let op = format!("collective_rpc `{method}`");
        if self.closed {
            return Err(CommError::State(format!(
                "{op}: the executor was shut down"
            )));
        }
        self.drain_closed();
        if let Some(e) = self.dead_error(&op) {
            return Err(e);
        }
        let deadline = Deadline::after(timeout);
        self.next_id += 1;
        let id = self.next_id;
        let msg = ToWorker::Call {
            id,
            method: method.to_string(),
            args: args.to_vec(),
        };
        let frame = encode(&msg)?;
        for i in 0..self.workers.len() {
            let w = &mut self.workers[i];
            // A worker that stops reading cannot block the send past the deadline.
            let budget = deadline.remaining().max(Duration::from_millis(1));
            let sent = w
                .ctl
                .set_write_timeout(Some(budget))
                .map_err(|e| CommError::io("setting a control socket timeout", e))
                .and_then(|()| dist_utils::codec::write_frame(&mut w.ctl, &frame));
            if let Err(e) = sent {
                self.mark_dead(i, format!("control connection broke while sending: {e}"));
                return Err(self.dead_error(&op).unwrap_or(e));
            }
        }
        let mut replies: Vec<Option<std::result::Result<Vec<u8>, String>>> =
            vec![None; self.workers.len()];
        while replies.iter().any(Option::is_none) {
            let left = deadline.remaining();
            if left.is_zero() {
                let missing: Vec<String> = replies
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.is_none())
                    .map(|(i, _)| format!("rank {}", self.workers[i].rank))
                    .collect();
                return Err(CommError::timeout(op, deadline.elapsed(), missing));
            }
            match self.events.recv_timeout(left) {
                Ok((i, Event::Msg(FromWorker::Reply { id: rid, result }))) if rid == id => {
                    replies[i] = Some(result);
                }
                Ok((_, Event::Msg(_))) => {} // a late reply of an earlier call
                Ok((i, Event::Closed(why))) => {
                    self.mark_dead(i, why);
                    return Err(self.dead_error(&op).expect("a worker was just marked dead"));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(CommError::State(format!(
                        "{op}: every worker connection is gone"
                    )));
                }
            }
        }
        let mut out = Vec::with_capacity(replies.len());
        let mut failed = Vec::new();
        for (i, r) in replies.into_iter().enumerate() {
            match r {
                Some(Ok(v)) => out.push(v),
                Some(Err(m)) => failed.push(format!("rank {}: {m}", self.workers[i].rank)),
                None => unreachable!("loop ends only when every reply is in"),
            }
        }
        if !failed.is_empty() {
            return Err(CommError::Aborted(format!(
                "{op} failed on {}",
                failed.join("; ")
            )));
        }
        Ok(out)
    }

    /// [`Executor::collective_rpc`] with serde-encoded arguments and replies.
    pub fn collective_rpc_obj<A: Serialize, R: DeserializeOwned>(
        &mut self,
        method: &str,
        args: &A,
        timeout: Duration,
    ) -> Result<Vec<R>> {
        let replies = self.collective_rpc(method, &encode(args)?, timeout)?;
        replies.iter().map(|b| decode(b)).collect()
    }

    /// Stops every worker: a shutdown message, up to the grace period for
    /// them to exit, then SIGTERM to each worker's process group, the grace
    /// period again, then SIGKILL. Returns the exit codes in rank order
    /// (`128 + signal` for a signal).
    pub fn shutdown(mut self) -> Result<Vec<i32>> {
        self.stop()
    }

    fn stop(&mut self) -> Result<Vec<i32>> {
        if !self.closed {
            self.closed = true;
            let frame = encode(&ToWorker::Shutdown)?;
            for w in &mut self.workers {
                if w.exit.is_none() {
                    let _ = w.ctl.set_write_timeout(Some(Duration::from_millis(200)));
                    let _ = dist_utils::codec::write_frame(&mut w.ctl, &frame);
                    let _ = w.ctl.flush();
                }
            }
            for (sig, wait) in [
                (None, self.grace),
                (Some(Signal::TERM), self.grace),
                (Some(Signal::KILL), KILL_WAIT),
            ] {
                if let Some(sig) = sig {
                    for w in &self.workers {
                        signal_group(w.pid, sig);
                    }
                }
                let t = Instant::now();
                loop {
                    for i in 0..self.workers.len() {
                        self.poll_exit(i);
                    }
                    let all_gone = self
                        .workers
                        .iter()
                        .all(|w| w.exit.is_some() && !group_alive(w.pid));
                    if all_gone || t.elapsed() >= wait {
                        break;
                    }
                    thread::sleep(POLL);
                }
                if self
                    .workers
                    .iter()
                    .all(|w| w.exit.is_some() && !group_alive(w.pid))
                {
                    break;
                }
            }
            for w in &self.workers {
                let _ = w.ctl.shutdown(std::net::Shutdown::Both);
            }
        }
        let stuck: Vec<String> = self
            .workers
            .iter()
            .filter(|w| w.exit.is_none())
            .map(|w| format!("rank {} (pid {})", w.rank, w.pid))
            .collect();
        if !stuck.is_empty() {
            return Err(CommError::timeout(
                "executor shutdown (SIGKILL sent)",
                KILL_WAIT,
                stuck,
            ));
        }
        Ok(self
            .workers
            .iter()
            .map(|w| w.exit.map(|e| e.0).unwrap_or(-1))
            .collect())
    }

    fn poll_exit(&mut self, i: usize) -> Option<(i32, Option<i32>)> {
        let w = &mut self.workers[i];
        if w.exit.is_none() {
            if let Ok(Some(st)) = w.child.try_wait() {
                w.exit = Some(status_code(st));
            }
        }
        w.exit
    }

    /// Waits up to `max` for worker `i` to be reaped.
    fn reap(&mut self, i: usize, max: Duration) -> Option<(i32, Option<i32>)> {
        let t = Instant::now();
        loop {
            if let Some(e) = self.poll_exit(i) {
                return Some(e);
            }
            if t.elapsed() >= max {
                return None;
            }
            thread::sleep(POLL);
        }
    }

    fn mark_dead(&mut self, i: usize, why: String) {
        if self.workers[i].dead.is_none() {
            let code = self.reap(i, Duration::from_secs(1));
            self.workers[i].dead = Some(format!(
                "worker process (pid {}) {}; {why}",
                self.workers[i].pid,
                describe_exit(code)
            ));
        }
    }

    /// Records connections that closed while no call was running.
    fn drain_closed(&mut self) {
        while let Ok((i, ev)) = self.events.try_recv() {
            if let Event::Closed(why) = ev {
                self.mark_dead(i, why);
            }
        }
    }

    fn dead_error(&self, op: &str) -> Option<CommError> {
        self.workers.iter().find_map(|w| {
            w.dead
                .as_ref()
                .map(|d| CommError::peer_lost(w.rank, op.to_string(), d.clone()))
        })
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!("executor shutdown on drop: {e}");
        }
    }
}

fn describe_exit(e: Option<(i32, Option<i32>)>) -> String {
    match e {
        Some((_, Some(sig))) => format!("was killed by signal {sig}"),
        Some((code, None)) => format!("exited with code {code}"),
        None => "closed its control connection".to_string(),
    }
}

fn spawn_event_reader(i: usize, mut s: UnixStream, tx: mpsc::Sender<(usize, Event)>) -> Result<()> {
    thread::Builder::new()
        .name(format!("executor-worker-{i}"))
        .spawn(move || loop {
            match read_msg::<FromWorker>(&mut s, MAX_MSG) {
                Ok(m) => {
                    if tx.send((i, Event::Msg(m))).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send((i, Event::Closed(format!("control connection: {e}"))));
                    return;
                }
            }
        })
        .map(|_| ())
        .map_err(|e| CommError::io("starting a worker reader thread", e))
}

// ---------------------------------------------------------------------------
// Worker side

static TAKEN: AtomicBool = AtomicBool::new(false);

/// The worker end of an [`Executor`]: report READY (or an init error), then
/// serve calls until the executor shuts it down.
#[derive(Debug)]
pub struct Worker {
    ctl: UnixStream,
    ready_sent: bool,
}

impl Worker {
    /// Takes the control connection the executor passed (`DIST_EXECUTOR_FD`).
    /// Works once per process; fails when not started by an [`Executor`].
    pub fn from_env() -> Result<Worker> {
        let fd: i32 = std::env::var(EXECUTOR_FD_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                CommError::State(format!(
                    "{EXECUTOR_FD_ENV} is not set: this process was not started by executor::Executor"
                ))
            })?;
        if TAKEN.swap(true, Ordering::SeqCst) {
            return Err(CommError::State(
                "Worker::from_env was already called in this process".into(),
            ));
        }
        // Check the descriptor is open before taking ownership of it.
        // SAFETY: F_GETFD only queries the descriptor's flags.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            return Err(CommError::io(
                format!("{EXECUTOR_FD_ENV}={fd} is not an open descriptor"),
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: the executor placed its socket at `fd` for this process; it
        // is open (checked above) and, guarded by TAKEN, owned only here.
        let ctl = unsafe { UnixStream::from_raw_fd(fd) };
        Ok(Worker {
            ctl,
            ready_sent: false,
        })
    }

    /// Tells the executor this worker initialised successfully.
    pub fn ready(&mut self) -> Result<()> {
        if !self.ready_sent {
            write_msg(&mut self.ctl, &FromWorker::Ready)?;
            self.ready_sent = true;
        }
        Ok(())
    }

    /// Tells the executor initialisation failed, with a message it reports.
    pub fn init_failed(mut self, message: impl Into<String>) -> Result<()> {
        write_msg(&mut self.ctl, &FromWorker::InitError(message.into()))
    }

    /// Sends READY if not yet sent, then answers calls with `handler(method,
    /// args)` until the executor asks to shut down (returns `Ok`) or goes
    /// away (returns the connection error). A panicking handler is reported
    /// to the executor as that call's error.
    pub fn serve<F>(mut self, mut handler: F) -> Result<()>
    where
        F: FnMut(&str, &[u8]) -> std::result::Result<Vec<u8>, String>,
    {
        self.ready()?;
        loop {
            match read_msg::<ToWorker>(&mut self.ctl, MAX_MSG)? {
                ToWorker::Shutdown => return Ok(()),
                ToWorker::Call { id, method, args } => {
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        handler(&method, &args)
                    }))
                    .unwrap_or_else(|p| {
                        let msg = p
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| p.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "unknown panic".into());
                        Err(format!("handler panicked: {msg}"))
                    });
                    write_msg(&mut self.ctl, &FromWorker::Reply { id, result })?;
                }
            }
        }
    }
}
