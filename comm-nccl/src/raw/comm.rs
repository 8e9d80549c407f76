//! The communicator lifecycle: [`RawComm`] owns one `ncclComm_t` from
//! non-blocking init to finalize/destroy or abort, and makes its handle safe
//! to share with a watchdog thread: every use holds the handle's lock and
//! fails once the communicator is closed, and [`RawComm::abort`] (the
//! documented thread-safe way to unblock NCCL) closes it under that lock,
//! so no call can use a freed handle.
//!
//! `ncclCommAbort` itself may block for as long as the device is busy (it
//! frees device memory, which waits for running kernels), so the closing is
//! also announced in an atomic flag before the abort starts: later users
//! fail at once instead of queueing behind it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use comm_core::{CommError, Deadline, Result};

use super::result::{NcclLibrary, Progress};
use super::sys::{
    NcclCommHandle, NcclConfig, NcclResultCode, NcclUniqueId, NCCL_IN_PROGRESS, NCCL_SUCCESS,
};

/// Spin briefly, then yield, then sleep up to 1 ms: cheap for the common
/// sub-millisecond wait, gentle on the CPU for long ones.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    n: u32,
}

impl Backoff {
    pub(crate) fn snooze(&mut self) {
        self.n = self.n.saturating_add(1);
        if self.n < 64 {
            std::hint::spin_loop();
        } else if self.n < 256 {
            std::thread::yield_now();
        } else {
            let us = u64::from((self.n - 255).min(1000));
            std::thread::sleep(Duration::from_micros(us));
        }
    }
}

/// Whether the handle may still be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Life {
    Open,
    Closed,
}

/// One NCCL communicator: aborted, not leaked, when dropped without
/// [`RawComm::shutdown`]; finalized and destroyed by `shutdown`.
///
/// `Send + Sync`: share it (in an `Arc`) between the thread that enqueues
/// work and a watchdog that polls [`RawComm::async_state`] and calls
/// [`RawComm::abort`].
#[derive(Debug)]
pub struct RawComm {
    lib: &'static NcclLibrary,
    handle: NcclCommHandle,
    life: Mutex<Life>,
    /// Set (before taking `life`) by the first abort or shutdown.
    closing: AtomicBool,
}

// SAFETY: an NCCL communicator may be used from any thread; every use of the
// handle holds `life`'s lock and checks that it is still open, so uses are
// serialised and none follows abort/destroy.
unsafe impl Send for RawComm {}
// SAFETY: as above: shared access goes through the lock.
unsafe impl Sync for RawComm {}

fn aborted() -> CommError {
    CommError::Aborted("the NCCL communicator was aborted or destroyed".into())
}

impl RawComm {
    /// Non-blocking `ncclCommInitRankConfig`, polled until ready or
    /// `deadline`. On timeout or error the half-built communicator is
    /// aborted and the error returned (`Timeout` names the operation and
    /// "members of `label`", since NCCL cannot tell who is missing).
    ///
    /// The CUDA device the communicator should use must be current on this
    /// thread (NCCL picks the current device).
    pub fn init(
        lib: &'static NcclLibrary,
        id: &NcclUniqueId,
        rank: usize,
        world: usize,
        deadline: &Deadline,
        label: &str,
    ) -> Result<RawComm> {
        let mut config = NcclConfig::non_blocking();
        // SAFETY: a valid non-blocking config.
        let (handle, progress) =
            match unsafe { lib.comm_init_rank_config(world, id, rank, &mut config) } {
                Ok(ok) => ok,
                Err((handle, e)) => {
                    if !handle.is_null() {
                        // SAFETY: NCCL returned a handle; aborting it is the
                        // documented clean-up, and it is never used again.
                        let _ = unsafe { lib.comm_abort(handle) };
                    }
                    return Err(e);
                }
            };
        if handle.is_null() {
            return Err(CommError::Nccl {
                code: NCCL_SUCCESS,
                name: "ncclSuccess".into(),
                message: format!("ncclCommInitRankConfig ({label}) returned no communicator"),
            });
        }
        let comm = RawComm {
            lib,
            handle,
            life: Mutex::new(Life::Open),
            closing: AtomicBool::new(false),
        };
        let op = || format!("ncclCommInitRankConfig ({label}, rank {rank} of {world})");
        let missing = || {
            vec![format!(
                "one or more of the {world} members of `{label}` (NCCL cannot tell which)"
            )]
        };
        comm.settle(progress, deadline, &op, &missing)?;
        Ok(comm)
    }

    /// The library.
    pub fn lib(&self) -> &'static NcclLibrary {
        self.lib
    }

    fn lock(&self) -> MutexGuard<'_, Life> {
        // Nothing panics while holding it; recover the state anyway.
        self.life.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` with the live handle, holding the lock (so an abort from
    /// another thread waits until `f` returns). `Aborted` once closed, or
    /// once an abort has started (without waiting for it).
    ///
    /// `f` must not block: with a non-blocking communicator NCCL calls
    /// return at once (`ncclInProgress` when not done); wait with
    /// [`settle`](Self::settle) after `f`, not inside it.
    pub fn with<R>(
        &self,
        f: impl FnOnce(&'static NcclLibrary, NcclCommHandle) -> Result<R>,
    ) -> Result<R> {
        if self.closing.load(Ordering::Acquire) {
            return Err(aborted());
        }
        let life = self.lock();
        if *life == Life::Closed {
            return Err(aborted());
        }
        f(self.lib, self.handle)
    }

    /// The raw handle, for calls [`with`](Self::with) does not cover (it
    /// dangles once the communicator is aborted or shut down).
    pub fn handle(&self) -> NcclCommHandle {
        self.handle
    }

    /// `ncclCommGetAsyncError`: the pending state (`ncclSuccess`,
    /// `ncclInProgress` or an error code). `Aborted` once closed.
    pub fn async_state(&self) -> Result<NcclResultCode> {
        // SAFETY: `with` hands out the handle only while it is live.
        self.with(|lib, h| unsafe { lib.comm_get_async_error(h) })
    }

    /// `Err` with the communicator's asynchronous error, if it has one.
    pub fn check_async(&self, function: &str) -> Result<()> {
        self.with(|lib, h| {
            // SAFETY: live handle (inside `with`).
            match unsafe { lib.comm_get_async_error(h) }? {
                NCCL_SUCCESS | NCCL_IN_PROGRESS => Ok(()),
                // SAFETY: live handle (inside `with`).
                code => Err(unsafe { lib.error_of(code, h, function) }),
            }
        })
    }

    /// After a call that returned `progress`: nothing for `Done`; for
    /// `InProgress`, polls [`async_state`](Self::async_state) until it
    /// leaves `ncclInProgress`, an error shows up, or `deadline` passes
    /// (then `Timeout` naming `operation()` and `missing()`). It does not
    /// abort; the caller decides.
    pub fn settle(
        &self,
        progress: Progress,
        deadline: &Deadline,
        operation: &dyn Fn() -> String,
        missing: &dyn Fn() -> Vec<String>,
    ) -> Result<()> {
        if progress == Progress::Done {
            return Ok(());
        }
        let mut backoff = Backoff::default();
        loop {
            match self.async_state()? {
                NCCL_SUCCESS => return Ok(()),
                NCCL_IN_PROGRESS => {}
                code => {
                    // SAFETY: live handle (inside `with`).
                    let e =
                        self.with(|lib, h| Ok(unsafe { lib.error_of(code, h, &operation()) }))?;
                    return Err(e);
                }
            }
            deadline.check(operation, missing)?;
            backoff.snooze();
        }
    }

    /// True once an abort or a shutdown has started (it may still be in
    /// progress on another thread). Never waits.
    pub fn is_closed(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// `ncclCommAbort`: frees everything and unblocks pending work (kernels
    /// waiting for peers exit). Idempotent and callable from any thread;
    /// true when this call did the abort. It may block while the device is
    /// busy (NCCL frees device memory); a second caller returns at once.
    pub fn abort(&self) -> bool {
        if self.closing.swap(true, Ordering::AcqRel) {
            return false;
        }
        let mut life = self.lock();
        if *life == Life::Closed {
            return false;
        }
        *life = Life::Closed;
        // SAFETY: the handle is live (was open) and, now closed under the
        // lock, is never used again.
        if let Err(e) = unsafe { self.lib.comm_abort(self.handle) } {
            tracing::warn!("ncclCommAbort failed: {e}");
        }
        true
    }

    /// `ncclCommFinalize` (polled until done, or `deadline`), then
    /// `ncclCommDestroy`; falls back to `ncclCommAbort` when finalize fails
    /// or times out. Never panics; returns the first error seen.
    pub fn shutdown(&self, deadline: &Deadline) -> Result<()> {
        // SAFETY: live handle (inside `with`).
        let finalized = self
            .with(|lib, h| unsafe { lib.comm_finalize(h) })
            .and_then(|p| self.settle(p, deadline, &|| "ncclCommFinalize".into(), &Vec::new));
        match finalized {
            Ok(()) => {
                if self.closing.swap(true, Ordering::AcqRel) {
                    return Ok(());
                }
                let mut life = self.lock();
                if *life == Life::Closed {
                    return Ok(());
                }
                *life = Life::Closed;
                // SAFETY: live, finalized handle, closed under the lock and
                // never used again.
                unsafe { self.lib.comm_destroy(self.handle) }
            }
            Err(e) => {
                self.abort();
                Err(e)
            }
        }
    }
}

impl Drop for RawComm {
    fn drop(&mut self) {
        // Dropped without an orderly shutdown: abort, never hang.
        self.abort();
    }
}
