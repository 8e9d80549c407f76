//! Segment names, the job id in them, and the clean-up of names that a
//! signal would otherwise leave behind while members set up.
//!
//! # Names
//! Every segment is labelled `dshm.<job>.<pid>.<random>`: the label of an
//! anonymous memfd (the default, which never appears in `/dev/shm`, see
//! [`crate::Backing`]) or the name of a POSIX object in `/dev/shm` (the
//! named fallback, which the rest of this module is about). `<job>` is the
//! job id ([`default_job_id`]): `DIST_JOB_ID` (set by `distrun`, whose
//! launcher removes `dshm.<job>.*` once every rank has exited, so even a
//! named segment's creator killed with `SIGKILL` during set-up leaks
//! nothing under it), else an id
//! derived from `DIST_JOB_SECRET` (revealing nothing about it), else
//! `p<pid>`. [`segment_prefix`] gives the prefix a launcher removes, and
//! [`remove_job_segments`] removes them.
//!
//! # Signals during set-up
//! A segment's name exists only while members set up (it is unlinked as soon
//! as every member attached). A launcher that stops a job at that moment
//! (`SIGTERM` after another rank failed, `SIGINT` from Ctrl-C) would kill a
//! waiting member before its own clean-up runs. So while at least one
//! set-up is in progress, this process handles `SIGTERM`, `SIGINT` and
//! `SIGHUP`: the handler unlinks every registered name (`unlink(2)`, which
//! is async-signal-safe, on paths prepared before), puts back the
//! disposition it found and raises the signal again, so the process then
//! dies (or runs the application's own handler) exactly as it would have.
//! When the last set-up ends, the previous dispositions are restored.
//!
//! This is hand-written on `sigaction` rather than on `signal-hook`: that
//! crate cannot restore a previous disposition (its handler stays installed
//! after unregistering and then ignores signals whose disposition was the
//! default), which would leave a rank deaf to the launcher's `SIGTERM` after
//! set-up.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU8, Ordering::*};
use std::sync::Mutex;

use comm_core::{auth, Result};

/// Where POSIX shared memory lives on Linux.
pub const SHM_DIR: &str = "/dev/shm";
/// Every segment name starts with this (after the leading `/`).
pub const NAME_PREFIX: &str = "dshm.";
/// Environment variable naming the job (set by `distrun`).
pub const JOB_ID_ENV: &str = "DIST_JOB_ID";
/// Environment variable holding the job's secret (hex), from which a job
/// id is derived when [`JOB_ID_ENV`] is unset.
pub const JOB_SECRET_ENV: &str = "DIST_JOB_SECRET";
/// Longest job id kept in names.
pub const MAX_JOB_LEN: usize = 32;

/// The job id used in segment names: `DIST_JOB_ID` if set (made safe for a
/// file name by [`sanitize_job`]), else [`dist_utils::job_id`] of the secret
/// in `DIST_JOB_SECRET` (the id `distrun` and the executor give the job, so
/// both name the same segments), else `p<pid>`.
pub fn default_job_id() -> String {
    if let Ok(j) = std::env::var(JOB_ID_ENV) {
        if !j.trim().is_empty() {
            return sanitize_job(j.trim());
        }
    }
    if let Ok(s) = std::env::var(JOB_SECRET_ENV) {
        let s = s.trim();
        if !s.is_empty() {
            let secret = auth::from_hex(JOB_SECRET_ENV, s).unwrap_or_else(|_| s.as_bytes().into());
            return dist_utils::job_id(&secret);
        }
    }
    format!("p{}", std::process::id())
}

/// `job` as it appears in names: ASCII letters, digits, `-` and `_` kept,
/// anything else replaced by `_`, at most [`MAX_JOB_LEN`] characters
/// (`nojob` when nothing is left).
///
/// ```
/// assert_eq!(comm_shm::sanitize_job("job-42"), "job-42");
/// assert_eq!(comm_shm::sanitize_job("a.b/c"), "a_b_c");
/// ```
pub fn sanitize_job(job: &str) -> String {
    let s: String = job
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(MAX_JOB_LEN)
        .collect();
    if s.is_empty() {
        "nojob".into()
    } else {
        s
    }
}

/// The name prefix (in `/dev/shm`, no leading `/`) of job `job`'s segments:
/// `dshm.<job>.`. A launcher removes every file starting with it once all
/// ranks have exited.
pub fn segment_prefix(job: &str) -> String {
    format!("{NAME_PREFIX}{}.", sanitize_job(job))
}

/// Names (as found in `/dev/shm`, without the leading `/`) of the segments
/// of job `job` that currently exist. Used by leak checks.
pub fn list_segments(job: &str) -> Vec<String> {
    let prefix = segment_prefix(job);
    std::fs::read_dir(SHM_DIR)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Unlinks every segment of job `job` (for launchers, once every rank of the
/// job has exited); returns how many were removed.
pub fn remove_job_segments(job: &str) -> usize {
    list_segments(job)
        .into_iter()
        .filter(|n| rustix::shm::unlink(format!("/{n}").as_str()).is_ok())
        .count()
}

/// A fresh segment name for job `job`: `/dshm.<job>.<pid>.<16 hex digits>`.
pub(crate) fn new_name(job: &str) -> Result<String> {
    let r = auth::random_bytes::<8>()?;
    Ok(format!(
        "/{}{}.{}",
        segment_prefix(job),
        std::process::id(),
        auth::to_hex(&r)
    ))
}

/// The creator's pid in a segment name `dshm.<job>.<pid>[.<rest>]` (with or
/// without the leading `/`; job ids have no dots), `None` for other names.
///
/// ```
/// assert_eq!(comm_shm::creator_pid("/dshm.job_1.4242.00ff"), Some(4242));
/// assert_eq!(comm_shm::creator_pid("dshm.job.x"), None);
/// ```
pub fn creator_pid(name: &str) -> Option<u32> {
    let mut it = name.strip_prefix('/').unwrap_or(name).split('.');
    match (it.next(), it.next(), it.next()) {
        (Some("dshm"), Some(_), Some(pid)) => pid.parse().ok(),
        _ => None,
    }
}

// ---------------------------------------------------------------- signals

const SLOTS: usize = 64;
const PATH_BYTES: usize = 160;
const FREE: u8 = 0;
const BUSY: u8 = 1;
const READY: u8 = 2;
const SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// A registered name: `state` says whether `path` (a NUL-terminated
/// `/dev/shm/...` path) may be read by the handler.
struct Slot {
    state: AtomicU8,
    path: UnsafeCell<[u8; PATH_BYTES]>,
}

/// The dispositions found when the handler was installed.
struct Saved(UnsafeCell<[libc::sigaction; SIGNALS.len()]>);

// SAFETY: a slot's `path` is written only by the thread that moved `state`
// from FREE to BUSY, and read (by the handler or that thread) only while
// `state` is READY, which is set with release ordering after the write.
unsafe impl Sync for Slot {}
// SAFETY: written only under `INSTALLED`'s lock before the handler is
// installed (sigaction is a full barrier), read-only while it is installed.
unsafe impl Sync for Saved {}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    state: AtomicU8::new(FREE),
    path: UnsafeCell::new([0; PATH_BYTES]),
};
static REGISTRY: [Slot; SLOTS] = [EMPTY; SLOTS];
static SAVED: Saved = Saved(UnsafeCell::new(
    // SAFETY: `sigaction` is a plain C struct for which all-zero bytes are a
    // valid value (SIG_DFL, empty mask, no flags).
    unsafe { std::mem::zeroed() },
));
/// Number of live registrations; the handler is installed while non-zero.
static INSTALLED: Mutex<usize> = Mutex::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    for slot in &REGISTRY {
        if slot.state.load(Acquire) == READY {
            // SAFETY: READY means `path` holds a NUL-terminated path that is
            // not written until the state leaves READY; unlink is
            // async-signal-safe and a missing file is harmless.
            unsafe { libc::unlink(slot.path.get().cast::<libc::c_char>()) };
        }
    }
    if let Some(i) = SIGNALS.iter().position(|&s| s == sig) {
        // SAFETY: SAVED is read-only while the handler is installed; putting
        // the previous disposition back and raising again (the signal is
        // blocked while this handler runs, so it is delivered on return)
        // makes the process behave as if this handler had not been there.
        unsafe {
            let saved = &(*SAVED.0.get())[i];
            libc::sigaction(sig, saved, std::ptr::null_mut());
            libc::raise(sig);
        }
    }
}

fn handler_address() -> libc::sighandler_t {
    on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t
}

/// Keeps a segment name registered for clean-up on a terminating signal
/// while set-up is in progress; dropping it deregisters the name.
#[derive(Debug)]
pub(crate) struct SetupGuard {
    slot: Option<usize>,
}

impl SetupGuard {
    /// Registers `name` (as passed to `shm_open`, with its leading `/`).
    /// Best effort: with every slot taken (more than 64 set-ups at once in
    /// one process) the name is simply not registered.
    pub(crate) fn register(name: &str) -> Self {
        let path = format!("{SHM_DIR}{name}");
        if path.len() >= PATH_BYTES || path.as_bytes().contains(&0) {
            return SetupGuard { slot: None };
        }
        let Some(i) = REGISTRY.iter().position(|s| {
            s.state
                .compare_exchange(FREE, BUSY, Acquire, Relaxed)
                .is_ok()
        }) else {
            tracing::debug!("shm: too many concurrent set-ups to register {name} for clean-up");
            return SetupGuard { slot: None };
        };
        // SAFETY: this thread owns the slot (state BUSY): nobody reads it.
        let buf = unsafe { &mut *REGISTRY[i].path.get() };
        buf.fill(0);
        buf[..path.len()].copy_from_slice(path.as_bytes());
        install();
        REGISTRY[i].state.store(READY, Release);
        SetupGuard { slot: Some(i) }
    }
}

impl Drop for SetupGuard {
    fn drop(&mut self) {
        if let Some(i) = self.slot.take() {
            REGISTRY[i].state.store(FREE, Release);
            uninstall();
        }
    }
}

/// Installs the handler when the first registration starts.
fn install() {
    let mut n = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if *n == 0 {
        for (i, &sig) in SIGNALS.iter().enumerate() {
            // SAFETY: a zeroed sigaction is valid; `SAVED` is written under
            // the lock while our handler is not installed for `sig`.
            unsafe {
                let mut act: libc::sigaction = std::mem::zeroed();
                act.sa_sigaction = handler_address();
                act.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut act.sa_mask);
                let saved = &mut (*SAVED.0.get())[i];
                if libc::sigaction(sig, &act, saved) != 0 {
                    *saved = std::mem::zeroed();
                }
                // An ignored signal stays ignored.
                if saved.sa_sigaction == libc::SIG_IGN {
                    libc::sigaction(sig, saved, std::ptr::null_mut());
                }
            }
        }
    }
    *n += 1;
}

/// Restores the previous dispositions when the last registration ends
/// (only where our handler is still the one installed).
fn uninstall() {
    let mut n = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    *n = n.saturating_sub(1);
    if *n == 0 {
        for (i, &sig) in SIGNALS.iter().enumerate() {
            // SAFETY: querying and restoring dispositions; SAVED is only
            // read here, under the lock.
            unsafe {
                let mut cur: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, std::ptr::null(), &mut cur) == 0
                    && cur.sa_sigaction == handler_address()
                {
                    libc::sigaction(sig, &(*SAVED.0.get())[i], std::ptr::null_mut());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_job_and_are_unique() {
        let a = new_name("job.1").unwrap();
        let b = new_name("job.1").unwrap();
        assert!(a.starts_with("/dshm.job_1."), "{a}");
        assert_ne!(a, b);
        assert_eq!(segment_prefix("x y"), "dshm.x_y.");
        assert_eq!(sanitize_job(""), "nojob");
        assert_eq!(sanitize_job(&"z".repeat(100)).len(), MAX_JOB_LEN);
    }

    #[test]
    fn guard_installs_and_restores_the_handler() {
        // Dispositions are per process and other tests of this binary create
        // segments (and so guards) concurrently: check in a process of its own.
        const CHILD: &str = "COMM_SHM_GUARD_TEST_CHILD";
        if std::env::var_os(CHILD).is_none() {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "names::tests::guard_installs_and_restores_the_handler",
                    "--test-threads=1",
                ])
                .env(CHILD, "1")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        let current = |sig| {
            // SAFETY: querying a disposition.
            unsafe {
                let mut cur: libc::sigaction = std::mem::zeroed();
                libc::sigaction(sig, std::ptr::null(), &mut cur);
                cur.sa_sigaction
            }
        };
        let before = current(libc::SIGHUP);
        {
            let _g = SetupGuard::register("/dshm.test.guard");
            assert_eq!(current(libc::SIGHUP), handler_address());
        }
        assert_eq!(current(libc::SIGHUP), before);
    }
}
