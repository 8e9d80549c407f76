//! The torchrun-compatible launcher behind `distrun`: start one process per
//! local rank with the rendezvous environment, prefix their output, stop the
//! whole job when one rank fails, on a signal, or at an overall deadline,
//! name the rank that failed first, and remove what the ranks left in
//! `/dev/shm`.

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use comm_core::{auth, CommError, Result};
use dist_utils::TcpStoreServer;
use rustix::process::{Pid, Signal};

use crate::cleanup;
use crate::output::{say, spawn_reader, Lines, Sink};
use crate::reap::{ExitInfo, ExitWatch};

/// Environment variable carrying the per-job secret (hex) that store
/// connections must present.
pub const JOB_SECRET_ENV: &str = "DIST_JOB_SECRET";
/// Environment variable carrying the job id.
pub const JOB_ID_ENV: &str = "DIST_JOB_ID";
/// Set to `1` when the launcher hosts the rendezvous store itself, so that
/// rank 0 only connects as a client.
pub const STORE_HOSTED_ENV: &str = "DIST_STORE_HOSTED";

/// Exit code of the launcher when the overall timeout expired (as `timeout(1)`).
pub const TIMEOUT_EXIT_CODE: i32 = 124;

/// How often the supervisor looks at signals, deadlines and (while stopping)
/// process groups; exits themselves wake it at once.
pub(crate) const POLL: Duration = Duration::from_millis(20);
/// How long to wait for SIGKILLed processes to disappear before giving up.
pub(crate) const KILL_WAIT: Duration = Duration::from_secs(10);
/// How long output readers may take to drain after every process is gone.
const DRAIN_WAIT: Duration = Duration::from_secs(3);

/// What to launch and how. Build it with [`LaunchConfig::new`] and the
/// chained setters.
///
/// ```
/// use executor::LaunchConfig;
/// use std::time::Duration;
/// let cfg = LaunchConfig::new("sh", 2)
///     .args(["-c", "echo $RANK"])
///     .timeout(Duration::from_secs(30))
///     .capture(true);
/// assert_eq!(cfg.nproc_per_node, 2);
/// ```
#[derive(Debug, Clone)]
pub struct LaunchConfig {
    /// The program each rank runs.
    pub program: OsString,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Processes on this node.
    pub nproc_per_node: usize,
    /// Nodes in the job.
    pub nnodes: usize,
    /// This node's index in `0..nnodes`.
    pub node_rank: usize,
    /// Address of the rendezvous store (node 0).
    pub master_addr: String,
    /// Port of the rendezvous store; `None` with one node: the launcher hosts
    /// the store on a free port of 127.0.0.1.
    pub master_port: Option<u16>,
    /// Extra environment for every rank, applied after the launcher's own
    /// variables (so it can override them).
    pub env: Vec<(OsString, OsString)>,
    /// Overall deadline for the job; `None`: none.
    pub timeout: Option<Duration>,
    /// Time between SIGTERM and SIGKILL when stopping ranks.
    pub grace: Duration,
    /// Capture each rank's output lines into the outcome instead of
    /// forwarding them.
    pub capture: bool,
    /// Prefix forwarded lines with `[rank R] `.
    pub prefix: bool,
    /// Let the ranks write to the launcher's stdout/stderr directly instead
    /// of forwarding their output line by line. Their lines may then be cut
    /// by other processes' output mid-line (a `write` per fragment), but
    /// they see the terminal itself (colours, progress bars).
    pub inherit_output: bool,
    /// The job secret (hex); `None`: a fresh random one on a single node,
    /// `DIST_JOB_SECRET` from the environment on several (required there).
    pub job_secret: Option<String>,
    /// The job id (`DIST_JOB_ID`, part of every `/dev/shm` segment name);
    /// `None`: [`dist_utils::job_id`] of the secret (16 hex digits), the
    /// same on every node and revealing nothing about the secret; comm-shm
    /// derives the same id when `DIST_JOB_ID` is unset. An explicit id may
    /// hold letters, digits, `-` and `_`, at most 32 of them (it is part of
    /// `/dev/shm` names as it is).
    pub job_id: Option<String>,
}

impl LaunchConfig {
    /// `nproc` copies of `program` on one node, no timeout, a 5 s grace
    /// period, prefixed forwarded output.
    pub fn new(program: impl Into<OsString>, nproc: usize) -> Self {
        LaunchConfig {
            program: program.into(),
            args: Vec::new(),
            nproc_per_node: nproc,
            nnodes: 1,
            node_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: None,
            env: Vec::new(),
            timeout: None,
            grace: Duration::from_secs(5),
            capture: false,
            prefix: true,
            inherit_output: false,
            job_secret: None,
            job_id: None,
        }
    }
    /// Appends one argument.
    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }
    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }
    /// Adds an environment variable for every rank.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
    /// Sets the overall deadline.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(t);
        self
    }
    /// Sets the SIGTERM-to-SIGKILL grace period.
    pub fn grace(mut self, g: Duration) -> Self {
        self.grace = g;
        self
    }
    /// Captures output into the outcome (true) or forwards it (false).
    pub fn capture(mut self, on: bool) -> Self {
        self.capture = on;
        self
    }
    /// Prefixes forwarded lines with the rank (default true).
    pub fn prefix(mut self, on: bool) -> Self {
        self.prefix = on;
        self
    }
    /// Gives the ranks the launcher's stdout/stderr instead of forwarding
    /// whole lines (default false; see [`LaunchConfig::inherit_output`]).
    pub fn inherit_output(mut self, on: bool) -> Self {
        self.inherit_output = on;
        self
    }
    /// Multi-node: `nnodes` nodes, this one being `node_rank`.
    pub fn nodes(mut self, nnodes: usize, node_rank: usize) -> Self {
        self.nnodes = nnodes;
        self.node_rank = node_rank;
        self
    }
    /// Rendezvous address and port.
    pub fn master(mut self, addr: impl Into<String>, port: Option<u16>) -> Self {
        self.master_addr = addr.into();
        self.master_port = port;
        self
    }
    /// Sets the job secret (hex).
    pub fn job_secret(mut self, hex: impl Into<String>) -> Self {
        self.job_secret = Some(hex.into());
        self
    }
    /// Sets the job id (letters, digits, `-`, `_`; at most 32).
    pub fn job_id(mut self, id: impl Into<String>) -> Self {
        self.job_id = Some(id.into());
        self
    }

    pub(crate) fn world_size(&self) -> usize {
        self.nproc_per_node * self.nnodes
    }

    fn validate(&self) -> Result<()> {
        if self.nproc_per_node == 0 {
            return Err(CommError::invalid("--nproc-per-node must be at least 1"));
        }
        if self.nnodes == 0 {
            return Err(CommError::invalid("--nnodes must be at least 1"));
        }
        if self.node_rank >= self.nnodes {
            return Err(CommError::invalid(format!(
                "--node-rank {} is out of range for --nnodes {} (valid: 0..{})",
                self.node_rank, self.nnodes, self.nnodes
            )));
        }
        if self.nnodes > 1 && self.master_port.is_none() {
            return Err(CommError::invalid(
                "a multi-node job (--nnodes > 1) needs --master-addr and --master-port, the same on every node",
            ));
        }
        if self.program.is_empty() {
            return Err(CommError::invalid("no program to launch was given"));
        }
        Ok(())
    }
}

/// How one rank ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankExit {
    /// Global rank.
    pub rank: usize,
    /// Local rank on this node.
    pub local_rank: usize,
    /// Process id (also its process-group id).
    pub pid: u32,
    /// Exit code; `128 + signal` when it died from a signal.
    pub code: i32,
    /// The signal that ended it, if any.
    pub signal: Option<i32>,
    /// True when the launcher had already begun stopping the job (the rank
    /// did not fail on its own).
    pub stopped_by_launcher: bool,
}

/// Why the launcher stopped the job early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// A rank failed (non-zero exit or signal).
    RankFailed {
        /// The first rank to fail, in the order the kernel reported the
        /// exits.
        rank: usize,
        /// Its exit code (`128 + signal` for a signal).
        code: i32,
    },
    /// The overall timeout expired.
    Timeout {
        /// The configured timeout.
        after: Duration,
        /// Global ranks still running when it expired.
        still_running: Vec<usize>,
    },
    /// The launcher received a signal (Ctrl-C / SIGTERM).
    Signal(i32),
}

/// The result of [`launch`].
#[derive(Debug, Clone)]
pub struct LaunchOutcome {
    /// One entry per local rank, in local-rank order.
    pub ranks: Vec<RankExit>,
    /// The first rank that failed on its own, and its code.
    pub first_failure: Option<(usize, i32)>,
    /// Why the job was stopped early, if it was.
    pub stop_reason: Option<StopReason>,
    /// What the launcher should exit with: 0 when every rank succeeded, the
    /// first failing rank's code, 124 on timeout, `128 + signal` when
    /// interrupted.
    pub exit_code: i32,
    /// With `capture`: each local rank's stdout lines (without newline).
    pub stdout: Vec<Vec<String>>,
    /// With `capture`: each local rank's stderr lines (without newline).
    pub stderr: Vec<Vec<String>>,
    /// The port the rendezvous store was on.
    pub master_port: u16,
}

impl LaunchOutcome {
    /// True when every rank exited with 0 and nothing stopped the job.
    pub fn success(&self) -> bool {
        self.exit_code == 0
    }
    /// Exit codes in local-rank order.
    pub fn exit_codes(&self) -> Vec<i32> {
        self.ranks.iter().map(|r| r.code).collect()
    }
    /// Process ids in local-rank order.
    pub fn pids(&self) -> Vec<u32> {
        self.ranks.iter().map(|r| r.pid).collect()
    }
}

// ---------------------------------------------------------------------------
// Signals

/// Last SIGINT/SIGTERM received by the launcher (0: none).
static PENDING_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    PENDING_SIGNAL.store(sig, Ordering::SeqCst);
}

/// Installs SIGINT, SIGTERM and SIGHUP handlers that make a running
/// [`launch`] stop every rank (SIGTERM, grace, SIGKILL) and return
/// `128 + signal`. A second signal skips the grace period. Meant for the
/// `distrun` binary; library users (tests) normally leave signals alone.
pub fn install_signal_handlers() -> Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: `sigaction` is called with a zeroed, then fully initialised
        // `sigaction` struct; the handler only performs an atomic store, which
        // is async-signal-safe; the old-action pointer is null (not wanted).
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(CommError::io(
                format!("installing the handler for signal {sig}"),
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

fn take_signal() -> Option<i32> {
    match PENDING_SIGNAL.swap(0, Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

// ---------------------------------------------------------------------------
// Secrets and ids

/// 16 random bytes from the OS, as 32 lowercase hex digits (a job secret).
pub fn random_hex128() -> Result<String> {
    Ok(auth::to_hex(&auth::random_bytes::<16>()?))
}

/// The job secret: the configured one; for a multi-node job
/// `DIST_JOB_SECRET` from the environment (every node must agree); else a
/// fresh random one (a single-node job never reuses an inherited secret).
/// Returns the hex form and the bytes.
fn resolve_secret(cfg: &LaunchConfig) -> Result<(String, Vec<u8>)> {
    let given = cfg.job_secret.clone().or_else(|| {
        (cfg.nnodes > 1)
            .then(|| std::env::var(JOB_SECRET_ENV).ok())
            .flatten()
            .filter(|s| !s.is_empty())
    });
    let hex = match given {
        Some(s) => s.trim().to_ascii_lowercase(),
        None if cfg.nnodes > 1 => {
            return Err(CommError::invalid(format!(
                "a multi-node job needs a shared secret: set {JOB_SECRET_ENV} to the same hex value \
                 (e.g. `export {JOB_SECRET_ENV}=$(openssl rand -hex 16)`, then copy it) on every node \
                 before starting distrun"
            )))
        }
        None => random_hex128()?,
    };
    let bytes = auth::from_hex(JOB_SECRET_ENV, &hex).map_err(|_| {
        CommError::invalid(format!(
            "{JOB_SECRET_ENV} must be a non-empty, even-length hex string (e.g. 32 hex digits); \
             generate one with `openssl rand -hex 16` and give the same value to every node"
        ))
    })?;
    if bytes.is_empty() {
        return Err(CommError::invalid(format!(
            "{JOB_SECRET_ENV} must not be empty"
        )));
    }
    Ok((hex, bytes))
}

/// The job id: the configured one, else [`dist_utils::job_id`] of the
/// secret, which every node of the job shares without revealing it.
fn resolve_job_id(cfg: &LaunchConfig, secret: &[u8]) -> Result<String> {
    let id = cfg
        .job_id
        .clone()
        .unwrap_or_else(|| dist_utils::job_id(secret));
    if !cleanup::valid_job_id(&id) {
        return Err(CommError::invalid(format!(
            "job id `{id}` may only hold letters, digits, `-` and `_` (at most 32): it becomes \
             part of /dev/shm names as it is"
        )));
    }
    Ok(id)
}

// ---------------------------------------------------------------------------
// Process groups

fn pid_of(raw: u32) -> Option<Pid> {
    Pid::from_raw(raw as i32)
}

/// True when some non-zombie process is still in process group `pgid`.
pub(crate) fn group_alive(pgid: u32) -> bool {
    let Some(p) = pid_of(pgid) else { return false };
    if rustix::process::test_kill_process_group(p).is_err() {
        return false;
    }
    // kill(-pgid, 0) also succeeds for zombies; look for a live member.
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return true;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the parenthesised command: state ppid pgrp ...
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut it = rest.split_whitespace();
        let state = it.next().unwrap_or("");
        let _ppid = it.next();
        let pgrp = it.next().and_then(|s| s.parse::<u32>().ok());
        if pgrp == Some(pgid) && state != "Z" && state != "X" {
            return true;
        }
    }
    false
}

pub(crate) fn signal_group(pgid: u32, sig: Signal) {
    if let Some(p) = pid_of(pgid) {
        // ESRCH (group already empty) is fine.
        let _ = rustix::process::kill_process_group(p, sig);
    }
}

// ---------------------------------------------------------------------------
// The launcher

/// What every rank of one job shares: secret, id, store address, and the
/// store server when this launcher hosts it (kept alive by holding this).
pub(crate) struct JobEnv {
    pub(crate) secret: String,
    pub(crate) secret_bytes: Vec<u8>,
    pub(crate) job_id: String,
    pub(crate) master_port: u16,
    pub(crate) hosted: bool,
    /// Held so the store lives as long as the job.
    pub(crate) server: Option<TcpStoreServer>,
}

/// Validates `cfg`, resolves secret and id, and hosts the store if needed.
pub(crate) fn prepare_job(cfg: &LaunchConfig) -> Result<JobEnv> {
    cfg.validate()?;
    let (secret, secret_bytes) = resolve_secret(cfg)?;
    let job_id = resolve_job_id(cfg, &secret_bytes)?;
    let (server, master_port, hosted) = host_store(cfg, &secret_bytes)?;
    Ok(JobEnv {
        secret,
        secret_bytes,
        job_id,
        master_port,
        hosted,
        server,
    })
}

/// The command for local rank `local`: program, arguments, the rendezvous
/// environment, stdin from /dev/null, its own process group, and
/// `PR_SET_PDEATHSIG = SIGKILL` (the rank dies with the thread that spawns it).
pub(crate) fn rank_command(cfg: &LaunchConfig, job: &JobEnv, local: usize) -> Command {
    let rank = cfg.node_rank * cfg.nproc_per_node + local;
    let world = cfg.world_size();
    let mut cmd = Command::new(&cfg.program);
    cmd.args(&cfg.args)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", local.to_string())
        .env("LOCAL_WORLD_SIZE", cfg.nproc_per_node.to_string())
        .env("GROUP_RANK", cfg.node_rank.to_string())
        .env("NODE_RANK", cfg.node_rank.to_string())
        .env("GROUP_WORLD_SIZE", cfg.nnodes.to_string())
        .env("ROLE_RANK", rank.to_string())
        .env("ROLE_WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", &cfg.master_addr)
        .env("MASTER_PORT", job.master_port.to_string())
        .env(JOB_SECRET_ENV, &job.secret)
        .env(JOB_ID_ENV, &job.job_id)
        .env("TORCHELASTIC_RUN_ID", &job.job_id);
    if job.hosted {
        cmd.env(STORE_HOSTED_ENV, "1");
    } else {
        cmd.env_remove(STORE_HOSTED_ENV);
    }
    for (k, v) in &cfg.env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null());
    // Own process group: the whole tree a rank starts can be signalled at
    // once, and a terminal's Ctrl-C reaches only the launcher, which then
    // stops the ranks in order.
    cmd.process_group(0);
    let parent = rustix::process::getpid();
    // SAFETY: the closure runs in the forked child before exec and only
    // makes raw system calls (prctl, getppid) through rustix, which are
    // async-signal-safe; it allocates nothing and touches no locks.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
            // The launcher may have died before prctl took effect.
            if rustix::process::getppid() != Some(parent) {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    cmd
}

/// The launch half of a program that starts its own ranks (the examples,
/// benches and `comm-perf`): runs `nproc` copies of this program, with the
/// arguments it was given, under [`launch`] within `timeout`
/// (`configure` adds to that configuration), and returns the exit code for
/// `main`: success, the job's own code, or failure with a line on stderr
/// prefixed with `name`. The caller decides when it is itself a rank
/// instead (typically: `RANK` is set).
///
/// ```no_run
/// use std::process::ExitCode;
/// use std::time::Duration;
///
/// fn main() -> ExitCode {
///     if std::env::var_os("RANK").is_none() {
///         return executor::launch_self("my_job", 4, Duration::from_secs(60), |c| c);
///     }
///     // ... this process is one rank ...
///     ExitCode::SUCCESS
/// }
/// ```
pub fn launch_self(
    name: &str,
    nproc: usize,
    timeout: Duration,
    configure: impl FnOnce(LaunchConfig) -> LaunchConfig,
) -> std::process::ExitCode {
    use std::process::ExitCode;
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("{name}: cannot find this program's path: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cfg = configure(
        LaunchConfig::new(exe, nproc)
            .args(std::env::args_os().skip(1))
            .timeout(timeout),
    );
    match launch(&cfg) {
        Ok(o) if o.success() => ExitCode::SUCCESS,
        Ok(o) => {
            eprintln!(
                "{name}: the job failed (exit codes {:?}, {:?})",
                o.exit_codes(),
                o.stop_reason
            );
            ExitCode::from(o.exit_code.clamp(1, 255) as u8)
        }
        Err(e) => {
            eprintln!("{name}: launching {nproc} ranks failed: {e}");
            ExitCode::FAILURE
        }
    }
}

struct Running {
    rank: usize,
    pid: u32,
    /// How it ended, and whether the launcher was already stopping the job.
    exit: Option<(ExitInfo, bool)>,
}

/// Starts `nproc_per_node` ranks as described by `cfg`, supervises them and
/// returns how they ended. See the crate docs for the exact behaviour.
///
/// Errors are returned only for problems of the launcher itself (bad
/// configuration, a program that cannot be started, a store that cannot be
/// hosted); failures of the ranks are reported in the [`LaunchOutcome`].
/// On every path, once the ranks are gone, the job's segments left in
/// `/dev/shm` (`dshm.<job id>.*`) are removed.
pub fn launch(cfg: &LaunchConfig) -> Result<LaunchOutcome> {
    let job = prepare_job(cfg)?;
    let mut watch = ExitWatch::new()?;

    let (done_tx, done_rx) = mpsc::channel::<()>();
    let mut readers = 0usize;
    let mut procs: Vec<Running> = Vec::with_capacity(cfg.nproc_per_node);
    let mut out_lines: Vec<Lines> = Vec::new();
    let mut err_lines: Vec<Lines> = Vec::new();
    let piped = cfg.capture || !cfg.inherit_output;

    for local in 0..cfg.nproc_per_node {
        let rank = cfg.node_rank * cfg.nproc_per_node + local;
        let mut cmd = rank_command(cfg, &job, local);
        if piped {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                // Stop what was already started, then report.
                abandon(&procs, &mut watch, &job.job_id);
                return Err(CommError::io(
                    format!("starting rank {rank}: `{}`", cfg.program.to_string_lossy()),
                    e,
                ));
            }
        };
        let pid = child.id();
        // Reaped through `watch` (not `Child::wait`), in exit order.
        let (so, se) = (child.stdout.take(), child.stderr.take());
        procs.push(Running {
            rank,
            pid,
            exit: None,
        });
        if let Err(e) = watch.add(pid) {
            abandon(&procs, &mut watch, &job.job_id);
            return Err(e);
        }
        if piped {
            let prefix = cfg.prefix.then(|| format!("[rank {rank}] "));
            let (o_sink, e_sink) = if cfg.capture {
                let o: Lines = Arc::default();
                let e: Lines = Arc::default();
                out_lines.push(o.clone());
                err_lines.push(e.clone());
                (Sink::Capture(o), Sink::Capture(e))
            } else {
                (Sink::Stdout(prefix.clone()), Sink::Stderr(prefix))
            };
            let srcs: [(Option<Box<dyn Read + Send>>, Sink); 2] = [
                (so.map(|x| Box::new(x) as Box<dyn Read + Send>), o_sink),
                (se.map(|x| Box::new(x) as Box<dyn Read + Send>), e_sink),
            ];
            for (src, sink) in srcs {
                let Some(src) = src else { continue };
                if let Err(e) = spawn_reader(src, sink, done_tx.clone()) {
                    abandon(&procs, &mut watch, &job.job_id);
                    return Err(e);
                }
                readers += 1;
            }
        }
    }
    drop(done_tx);

    let stop_reason = supervise(&mut procs, &mut watch, cfg);

    // Drain the output readers (pipes close once every process of the rank's
    // group is gone, which supervise() made sure of).
    let drain_deadline = Instant::now() + DRAIN_WAIT;
    for _ in 0..readers {
        let left = drain_deadline.saturating_duration_since(Instant::now());
        if done_rx.recv_timeout(left).is_err() {
            tracing::warn!(
                "some rank output was still open after the job ended; not waiting for it"
            );
            break;
        }
    }
    let pids: Vec<u32> = procs.iter().map(|p| p.pid).collect();
    cleanup::remove_job_segments(&job.job_id, &pids);
    let master_port = job.master_port;
    drop(job);

    let stopping_started = stop_reason.is_some();
    let ranks: Vec<RankExit> = procs
        .iter()
        .enumerate()
        .map(|(local, p)| {
            let (info, by_launcher) = p.exit.unwrap_or((
                ExitInfo {
                    code: 128 + 9,
                    signal: Some(9),
                },
                true,
            ));
            RankExit {
                rank: p.rank,
                local_rank: local,
                pid: p.pid,
                code: info.code,
                signal: info.signal,
                stopped_by_launcher: stopping_started && by_launcher,
            }
        })
        .collect();
    let first_failure = match &stop_reason {
        Some(StopReason::RankFailed { rank, code }) => Some((*rank, *code)),
        _ => None,
    };
    let exit_code = match &stop_reason {
        None => 0,
        Some(StopReason::RankFailed { code, .. }) => *code,
        Some(StopReason::Timeout { .. }) => TIMEOUT_EXIT_CODE,
        Some(StopReason::Signal(s)) => 128 + s,
    };
    let take = |v: &[Lines]| -> Vec<Vec<String>> {
        v.iter()
            .map(|l| l.lock().map(|g| g.clone()).unwrap_or_default())
            .collect()
    };
    Ok(LaunchOutcome {
        ranks,
        first_failure,
        stop_reason,
        exit_code,
        stdout: take(&out_lines),
        stderr: take(&err_lines),
        master_port,
    })
}

/// Waits for the ranks until all have ended and their process groups are
/// empty, taking exits in the order they happened. Starts stopping the job
/// on the first failure, a signal or the timeout.
fn supervise(
    procs: &mut [Running],
    watch: &mut ExitWatch,
    cfg: &LaunchConfig,
) -> Option<StopReason> {
    let start = Instant::now();
    let mut reason: Option<StopReason> = None;
    // When the stop began and whether SIGKILL was already sent.
    let mut stop_at: Option<Instant> = None;
    let mut killed_at: Option<Instant> = None;
    let mut skip_grace = false;

    loop {
        // Exits, in the order the kernel saw them.
        match watch.wait(Some(POLL)) {
            Ok(exits) => {
                let mut failed = Vec::new();
                for (token, info) in exits {
                    procs[token].exit = Some((info, stop_at.is_some()));
                    if info.code != 0 && stop_at.is_none() && reason.is_none() {
                        failed.push(token);
                    }
                }
                if !failed.is_empty() {
                    let token = first_to_fail(procs, watch, failed);
                    let p = &procs[token];
                    let Some((info, _)) = p.exit else {
                        unreachable!("candidates have exited")
                    };
                    say(format!(
                        "rank {} (pid {}) failed with exit code {}{}; stopping the other ranks",
                        p.rank,
                        p.pid,
                        info.code,
                        info.signal
                            .map(|s| format!(" ({})", crate::reap::signal_name(s)))
                            .unwrap_or_default()
                    ));
                    reason = Some(StopReason::RankFailed {
                        rank: p.rank,
                        code: info.code,
                    });
                }
            }
            Err(e) => {
                tracing::warn!("waiting for the ranks: {e}");
                std::thread::sleep(POLL);
            }
        }
        if reason.is_none() {
            if let Some(sig) = take_signal() {
                say(format!("received signal {sig}; stopping every rank"));
                reason = Some(StopReason::Signal(sig));
            } else if let Some(t) = cfg.timeout.filter(|t| start.elapsed() >= *t) {
                let still: Vec<usize> = procs
                    .iter()
                    .filter(|p| p.exit.is_none())
                    .map(|p| p.rank)
                    .collect();
                say(format!(
                    "overall timeout of {t:?} expired; ranks still running: {still:?}; killing the job"
                ));
                reason = Some(StopReason::Timeout {
                    after: t,
                    still_running: still,
                });
            }
        } else if killed_at.is_none() && take_signal().is_some() {
            // A second Ctrl-C: no more grace.
            skip_grace = true;
        }

        let all_reaped = procs.iter().all(|p| p.exit.is_some());
        // Every rank ended on its own: clean up whatever they left in their
        // process groups (background children) with the same TERM/grace/KILL.
        if all_reaped && reason.is_none() && stop_at.is_none() {
            if procs.iter().all(|p| !group_alive(p.pid)) {
                return None;
            }
            stop_at = Some(Instant::now());
            for p in procs.iter() {
                signal_group(p.pid, Signal::TERM);
            }
        }

        if reason.is_some() && stop_at.is_none() {
            stop_at = Some(Instant::now());
            for p in procs.iter() {
                signal_group(p.pid, Signal::TERM);
            }
        }

        if let Some(s) = stop_at {
            let groups_empty = procs.iter().all(|p| !group_alive(p.pid));
            if all_reaped && groups_empty {
                return reason;
            }
            if killed_at.is_none() && (skip_grace || s.elapsed() >= cfg.grace) {
                for p in procs.iter() {
                    signal_group(p.pid, Signal::KILL);
                }
                killed_at = Some(Instant::now());
            }
            if let Some(k) = killed_at {
                if k.elapsed() >= KILL_WAIT {
                    let stuck: Vec<u32> = procs
                        .iter()
                        .filter(|p| p.exit.is_none())
                        .map(|p| p.pid)
                        .collect();
                    say(format!(
                        "processes {stuck:?} survived SIGKILL for {KILL_WAIT:?} \
                         (uninterruptible sleep?); giving up on them"
                    ));
                    return reason;
                }
                if all_reaped && k.elapsed() >= Duration::from_millis(500) {
                    // Leftovers outside our reach (e.g. zombies of another parent).
                    return reason;
                }
            }
        }
    }
}

/// How long the launcher waits for ranks that were already exiting when
/// the first failure was reported (they are inside the kernel's exit path,
/// which takes microseconds unless they are descheduled).
const EXITING_WAIT: Duration = Duration::from_secs(1);

/// Picks the rank to blame among the failures `failed` (tokens, in the
/// order the kernel reported their exits), none blamed before.
///
/// Exit order alone is not causal order. A rank killed by a signal closes
/// its sockets and pipes early in its exit, before its exit is reported;
/// its peers see end-of-file, exit 1, and with the wake-up preempting the
/// dying rank (two cores are enough) their exits can be reported first.
/// So the ranks that were dying at the same moment are gathered too: exits
/// already reported but not yet read, and ranks inside the kernel's exit
/// path (`PF_EXITING` in `/proc/<pid>/stat`), which are waited for. Among
/// those, a rank killed by a signal is named first (no peer's exit code
/// caused it; the launcher has sent no signal yet), then the earliest exit.
fn first_to_fail(procs: &mut [Running], watch: &mut ExitWatch, mut failed: Vec<usize>) -> usize {
    let deadline = Instant::now() + EXITING_WAIT;
    loop {
        // Exits already reported (zero wait), in order.
        if let Ok(more) = watch.wait(Some(Duration::ZERO)) {
            for (token, info) in more {
                procs[token].exit = Some((info, false));
                if info.code != 0 {
                    failed.push(token);
                }
            }
        }
        let dying = procs
            .iter()
            .any(|p| p.exit.is_none() && process_exiting(p.pid));
        if !dying || Instant::now() >= deadline {
            break;
        }
        if let Ok(more) = watch.wait(Some(Duration::from_millis(5))) {
            for (token, info) in more {
                procs[token].exit = Some((info, false));
                if info.code != 0 {
                    failed.push(token);
                }
            }
        }
    }
    failed
        .iter()
        .copied()
        .find(|&t| procs[t].exit.is_some_and(|(i, _)| i.signal.is_some()))
        .unwrap_or(failed[0])
}

/// True while `pid` is inside the kernel's exit path (`PF_EXITING`, flag
/// 0x4 of the ninth field of `/proc/<pid>/stat`), before it is a zombie.
fn process_exiting(pid: u32) -> bool {
    const PF_EXITING: u64 = 0x4;
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return false;
    };
    // state ppid pgrp session tty_nr tpgid flags
    rest.split_whitespace()
        .nth(6)
        .and_then(|f| f.parse::<u64>().ok())
        .is_some_and(|f| f & PF_EXITING != 0)
}

/// Kills everything started so far and removes the job's segments (used
/// when a later spawn fails).
fn abandon(procs: &[Running], watch: &mut ExitWatch, job_id: &str) {
    for p in procs {
        signal_group(p.pid, Signal::KILL);
    }
    let deadline = Instant::now() + KILL_WAIT;
    while !watch.all_reaped() && Instant::now() < deadline {
        if watch.wait(Some(POLL)).is_err() {
            break;
        }
    }
    let pids: Vec<u32> = procs.iter().map(|p| p.pid).collect();
    cleanup::remove_job_segments(job_id, &pids);
}

/// Hosts the rendezvous store when the launcher is responsible for it:
/// single node without `--master-port` (127.0.0.1, free port), or node 0 of a
/// multi-node job (`master_addr:master_port`). Returns the server (kept alive
/// for the job), the port ranks must use, and whether it is hosted here or on
/// node 0 (so ranks only connect).
fn host_store(cfg: &LaunchConfig, secret: &[u8]) -> Result<(Option<TcpStoreServer>, u16, bool)> {
    match (cfg.nnodes, cfg.master_port) {
        (1, None) => {
            let server = TcpStoreServer::bind("127.0.0.1:0", secret)?;
            let port = server.local_addr().port();
            Ok((Some(server), port, true))
        }
        (1, Some(port)) => Ok((None, port, false)),
        (_, Some(port)) if cfg.node_rank == 0 => {
            let addr = format!("{}:{port}", cfg.master_addr);
            let server = TcpStoreServer::bind(addr.as_str(), secret).map_err(|e| {
                CommError::invalid(format!(
                    "node 0 could not host the rendezvous store on {addr} (is --master-addr an \
                     address of this machine and the port free?): {e}"
                ))
            })?;
            Ok((Some(server), port, true))
        }
        (_, Some(port)) => Ok((None, port, true)),
        (_, None) => Err(CommError::invalid("multi-node jobs need --master-port")),
    }
}
