//! Deadlines for work that is only enqueued: the watchdog of one
//! [`NcclCommunicator`](crate::NcclCommunicator), two threads.
//!
//! A call enqueues its NCCL work on the stream and registers its sequence
//! number and deadline ([`Watchdog::watch`]: a push under a short lock; no
//! CUDA call, no system call, no thread woken).
//!
//! - The **poller** (`nccl-poll-<group>`) learns completion: it records a
//!   CUDA event on the stream now and then, covering every call enqueued so
//!   far, queries those events, and polls `ncclCommGetAsyncError`. An NCCL
//!   error becomes the communicator's error.
//! - The **deadline thread** (`nccl-watchdog-<group>`) makes no CUDA or
//!   NCCL call until it aborts: when a registered call is not known to be
//!   complete by its deadline it stores the `Timeout`, then aborts the
//!   communicator (`ncclCommAbort`, the documented thread-safe way to make
//!   kernels waiting on absent peers exit). Every abort (a timeout, an NCCL
//!   error, the front's [`abort`](comm_core::DeviceCommunicator::abort)) is
//!   run here, so the thread that asks never blocks in `ncclCommAbort`
//!   (which frees device memory, and so waits while kernels still run).
//!
//! The two are separate because any CUDA or NCCL call may block for reasons
//! outside this crate: CUDA documents that any API call may block on
//! internal resources, a host function (`cuLaunchHostFunc`) runs on a driver
//! thread and must not wait on other CUDA work, and NCCL's own calls take
//! locks. With the deadline check behind those calls (one watchdog thread
//! that polled and checked in turn, as before), a stuck query meant no
//! timeout at all; now the deadline holds whatever the polls do, and the
//! error is stored before the abort starts, so the next call, fence or
//! [`Watchdog::error`] sees it even while `ncclCommAbort` is still running.
//! The price: when completion cannot be learnt by the deadline (the poller
//! is stuck), the call counts as timed out.
//!
//! Graph capture happens on a stream of its own
//! ([`NcclCommunicator::begin_capture`](crate::NcclCommunicator::begin_capture)),
//! never on the tracked one, and captured calls are not watched: they run
//! when the graph is launched, under the launcher's ordering. The poller
//! runs in relaxed capture mode, so its event calls cannot disturb a capture
//! another thread makes in global mode. [`Watchdog::set_capturing`] stops
//! marks for users who capture the tracked stream itself.
//!
//! Completion is learnt through a [`Tracker`] ([`StreamTracker`]: CUDA
//! events), so the watchdog's logic is tested without a GPU against a stub
//! libnccl and a tracker the test controls (including one whose queries
//! never return).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use comm_core::{CallDesc, CommError, Deadline, Fence, Result};

use cudarc::driver::sys::CUstreamCaptureMode;
use cudarc::driver::{CudaEvent, CudaStream};

use crate::cuda::cuda_err;
use crate::raw::RawComm;

/// How often an idle poller looks for new calls and asks NCCL for
/// asynchronous errors (calls do not wake it: that would cost them a system
/// call; completion is then learnt up to this much later).
const IDLE_POLL: Duration = Duration::from_millis(20);
/// Sleep between polls while work is pending: from the first to the
/// longest, doubling. Deadlines are seconds; finer polling would only add
/// event records to a busy stream.
const BUSY_POLL_MIN: Duration = Duration::from_micros(100);
const BUSY_POLL_MAX: Duration = Duration::from_millis(1);
/// Longest sleep of the deadline thread between looks at the pending calls
/// (a call registered meanwhile is seen at the next look, so deadlines are
/// enforced to within this).
const DEADLINE_TICK: Duration = Duration::from_millis(50);
/// How long dropping a watchdog waits for its threads; one stuck in a CUDA
/// call past this is left to finish on its own (it owns what it uses).
const STOP_WAIT: Duration = Duration::from_secs(10);

/// One enqueued call not yet known to be complete.
#[derive(Debug)]
struct Pending {
    seq: u64,
    desc: CallDesc,
    deadline: Deadline,
}

#[derive(Debug, Default)]
struct Watch {
    pending: VecDeque<Pending>,
    /// Sequence number of the last registered call (numbered from 1).
    enqueued: u64,
    /// Every call up to this number has completed (learnt by the poller).
    completed: u64,
    error: Option<CommError>,
    /// An abort was asked for (with `error` stored) and not yet started.
    abort_asked: bool,
    stop: bool,
    poller_exited: bool,
    deadline_exited: bool,
}

impl Watch {
    /// Drops the calls known to be complete; whether any was.
    fn retire(&mut self) -> bool {
        let before = self.pending.len();
        while self
            .pending
            .front()
            .is_some_and(|p| p.seq <= self.completed)
        {
            self.pending.pop_front();
        }
        self.pending.len() < before
    }
}

/// Where the watchdog learns that enqueued work has completed: CUDA events
/// on a stream in production ([`StreamTracker`]), anything else in tests.
/// Its calls may block; the deadlines do not depend on them returning.
pub trait Tracker: Send + 'static {
    /// A point in the stream of enqueued work.
    type Mark: Send;
    /// Called once on the polling thread before anything else.
    fn start(&mut self) -> Result<()> {
        Ok(())
    }
    /// A mark after everything enqueued so far.
    fn mark(&mut self) -> Result<Self::Mark>;
    /// Whether everything before `mark` has completed.
    fn reached(&mut self, mark: &Self::Mark) -> Result<bool>;
    /// Takes back a mark that was reached, for reuse.
    fn recycle(&mut self, mark: Self::Mark) {
        drop(mark);
    }
}

/// [`Tracker`] of a CUDA stream: marks are events recorded on it (reused
/// once reached).
#[derive(Debug)]
pub struct StreamTracker {
    stream: Arc<CudaStream>,
    free: Vec<CudaEvent>,
}

impl StreamTracker {
    /// Tracks work enqueued on `stream`.
    pub fn new(stream: Arc<CudaStream>) -> Self {
        StreamTracker {
            stream,
            free: Vec::new(),
        }
    }
}

impl Tracker for StreamTracker {
    type Mark = CudaEvent;
    fn start(&mut self) -> Result<()> {
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| cuda_err("NCCL watchdog: binding the CUDA context", e))?;
        // Relaxed capture mode for this thread: its event records and
        // queries must neither fail nor invalidate a graph another thread
        // captures in global mode (what PyTorch's NCCL watchdog does too).
        let mut mode = CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED;
        // SAFETY: `mode` is a valid in/out pointer; this only changes the
        // calling (polling) thread's capture mode.
        unsafe { cudarc::driver::sys::cuThreadExchangeStreamCaptureMode(&mut mode) }
            .result()
            .map_err(|e| cuda_err("NCCL watchdog: cuThreadExchangeStreamCaptureMode", e))
    }
    fn mark(&mut self) -> Result<CudaEvent> {
        let ev = match self.free.pop() {
            Some(ev) => ev,
            None => self
                .stream
                .context()
                .new_event(None)
                .map_err(|e| cuda_err("NCCL watchdog: creating an event", e))?,
        };
        ev.record(&self.stream)
            .map_err(|e| cuda_err("NCCL watchdog: recording an event", e))?;
        Ok(ev)
    }
    fn reached(&mut self, mark: &CudaEvent) -> Result<bool> {
        mark.try_is_complete()
            .map_err(|e| cuda_err("NCCL watchdog: querying an event", e))
    }
    fn recycle(&mut self, mark: CudaEvent) {
        self.free.push(mark);
    }
}

/// What a communicator, its fences and its watchdog threads share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) raw: RawComm,
    pub(crate) group: String,
    pub(crate) world: usize,
    /// Set once `error` is stored: the calls' check without the lock.
    failed: AtomicBool,
    state: Mutex<Watch>,
    /// Wakes the deadline thread (an abort asked for, stop).
    wake_deadline: Condvar,
    /// Wakes the idle poller (stop) and `stop` (a thread exited).
    wake_poller: Condvar,
    /// Whether the tracked stream itself is being captured; held while the
    /// poller records a mark, so none lands on the stream after a capture
    /// began. Never held with `state`.
    capturing: Mutex<bool>,
}

/// What a timeout blames when NCCL cannot tell who is missing.
pub(crate) fn members(group: &str, world: usize) -> String {
    format!(
        "one or more of the {world} members of group `{group}` (NCCL cannot tell which; \
         the NCCL communicator was aborted to release the stream)"
    )
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Watch> {
        // No code panics while holding it; recover the state anyway.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The error the watchdog (or an abort) left, if any.
    pub(crate) fn error(&self) -> Option<CommError> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        self.lock().error.clone()
    }

    /// `Err` with that error. One atomic load when there is none (the
    /// check every call makes).
    pub(crate) fn check(&self) -> Result<()> {
        match self.error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Stores `e` (the first error wins) and has the deadline thread abort
    /// the communicator; never blocks on NCCL or CUDA. `log`: warn about it
    /// (callers that already did pass false).
    pub(crate) fn fail(&self, e: CommError, log: bool) {
        let mut w = self.lock();
        if w.error.is_none() {
            if log {
                tracing::warn!(group = %self.group, "NCCL watchdog: {e}; aborting the communicator");
            }
            w.error = Some(e);
            self.failed.store(true, Ordering::Release);
        }
        w.abort_asked = !self.raw.is_closed();
        drop(w);
        self.wake_deadline.notify_all();
        self.wake_poller.notify_all();
    }
}

/// The watchdog of one communicator: its two threads, and the handle calls
/// use to register their work. Dropping it stops the threads, after an
/// abort that was asked for has run (it does not abort otherwise).
#[derive(Debug)]
pub struct Watchdog {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts watching `raw` (a group `group` of `world` members), learning
    /// completion from `tracker`.
    pub fn start<T: Tracker>(
        raw: RawComm,
        group: String,
        world: usize,
        tracker: T,
    ) -> Result<Watchdog> {
        let shared = Arc::new(Shared {
            raw,
            group,
            world,
            failed: AtomicBool::new(false),
            state: Mutex::new(Watch::default()),
            wake_deadline: Condvar::new(),
            wake_poller: Condvar::new(),
            capturing: Mutex::new(false),
        });
        let mut wd = Watchdog {
            shared: shared.clone(),
            threads: Vec::with_capacity(2),
        };
        let sh = shared.clone();
        let t = std::thread::Builder::new()
            .name(format!("nccl-watchdog-{}", shared.group))
            .spawn(move || deadlines(&sh))
            .map_err(|e| {
                let mut w = shared.lock();
                (w.deadline_exited, w.poller_exited) = (true, true);
                CommError::io("starting the NCCL watchdog thread", e)
            })?;
        wd.threads.push(t);
        let sh = shared.clone();
        let t = std::thread::Builder::new()
            .name(format!("nccl-poll-{}", shared.group))
            .spawn(move || poll(&sh, tracker))
            .map_err(|e| {
                shared.lock().poller_exited = true;
                CommError::io("starting the NCCL polling thread", e)
            })?;
        wd.threads.push(t);
        Ok(wd)
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The communicator it watches.
    pub fn raw(&self) -> &RawComm {
        &self.shared.raw
    }

    /// The error that made the communicator unusable, if any. Never waits
    /// for CUDA or NCCL.
    pub fn error(&self) -> Option<CommError> {
        self.shared.error()
    }

    /// `Err` with that error.
    pub fn check(&self) -> Result<()> {
        self.shared.check()
    }

    /// Registers a call whose work was just enqueued (after the enqueue,
    /// so every mark recorded later covers it).
    pub fn watch(&self, desc: CallDesc, deadline: Deadline) {
        let mut w = self.shared.lock();
        w.enqueued += 1;
        let seq = w.enqueued;
        w.pending.push_back(Pending {
            seq,
            desc,
            deadline,
        });
    }

    /// Calls registered and not yet seen complete.
    pub fn pending(&self) -> usize {
        self.shared.lock().pending.len()
    }

    /// Starts or ends a graph capture of the tracked stream itself: no marks
    /// are made meanwhile (an event recorded on a capturing stream would
    /// join the graph). Waits for a mark being recorded, so none lands on
    /// the stream after the capture began.
    pub fn set_capturing(&self, yes: bool) {
        *self
            .shared
            .capturing
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = yes;
    }

    /// Stores `e` (the first error wins, with a warning) and has the
    /// watchdog abort the communicator. Returns at once: the abort runs on
    /// the watchdog's thread.
    pub fn fail(&self, e: CommError) {
        self.shared.fail(e, true);
    }

    /// [`fail`](Self::fail) without the warning, for callers that already
    /// reported `why` (the front aborting after a fatal error).
    pub fn abort(&self, why: CommError) {
        self.shared.fail(why, false);
    }

    /// Stops the threads: the deadline thread first runs an abort that was
    /// asked for. Waits up to 10 s for them; a thread still inside a CUDA
    /// or NCCL call then is left to finish on its own (it owns what it
    /// uses), with a warning.
    pub fn stop(&mut self) {
        let sh = &self.shared;
        let mut w = sh.lock();
        w.stop = true;
        sh.wake_deadline.notify_all();
        sh.wake_poller.notify_all();
        let limit = Instant::now() + STOP_WAIT;
        while !(w.poller_exited && w.deadline_exited) {
            let left = limit.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            w = sh
                .wake_poller
                .wait_timeout(w, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        let all = w.poller_exited && w.deadline_exited;
        drop(w);
        if all {
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        } else if !self.threads.is_empty() {
            tracing::warn!(
                group = %sh.group,
                "NCCL watchdog: a thread is still inside a CUDA or NCCL call after {STOP_WAIT:?}; \
                 leaving it to finish on its own"
            );
            self.threads.clear();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The deadline thread: no CUDA or NCCL call but the aborts it runs.
fn deadlines(sh: &Shared) {
    let mut w = sh.lock();
    loop {
        if w.abort_asked {
            w.abort_asked = false;
            drop(w);
            sh.raw.abort();
            w = sh.lock();
            continue;
        }
        if w.stop {
            break;
        }
        let mut nap = DEADLINE_TICK;
        if w.error.is_none() {
            w.retire();
            let now = Instant::now();
            match w.pending.iter().find(|p| p.deadline.instant() <= now) {
                Some(p) => {
                    let e = CommError::timeout(
                        p.desc.to_string(),
                        p.deadline.elapsed(),
                        [members(&sh.group, sh.world)],
                    );
                    tracing::warn!(group = %sh.group, "NCCL watchdog: {e}; aborting the communicator");
                    w.error = Some(e);
                    sh.failed.store(true, Ordering::Release);
                    w.abort_asked = !sh.raw.is_closed();
                    continue;
                }
                None => {
                    if let Some(first) = w.pending.iter().map(|p| p.deadline.instant()).min() {
                        nap = nap.min(first.saturating_duration_since(now));
                    }
                }
            }
        }
        w = sh
            .wake_deadline
            .wait_timeout(w, nap)
            .map(|(g, _)| g)
            .unwrap_or_else(|p| p.into_inner().0);
    }
    w.deadline_exited = true;
    drop(w);
    sh.wake_poller.notify_all();
}

/// Marks made, each covering the calls up to its number.
struct Marks<M> {
    made: VecDeque<(M, u64)>,
    covered: u64,
}

/// The poller: every CUDA and NCCL query, none under the state lock.
fn poll<T: Tracker>(sh: &Shared, mut tracker: T) {
    let r = tracker.start();
    if let Err(e) = r {
        sh.fail(e, true);
    } else {
        poll_loop(sh, &mut tracker);
    }
    sh.lock().poller_exited = true;
    sh.wake_poller.notify_all();
}

fn poll_loop<T: Tracker>(sh: &Shared, tracker: &mut T) {
    let mut marks = Marks {
        made: VecDeque::new(),
        covered: 0,
    };
    let mut nap = BUSY_POLL_MIN;
    loop {
        let enqueued = {
            let mut w = sh.lock();
            if w.stop || w.error.is_some() {
                return;
            }
            if w.pending.is_empty() {
                w = sh
                    .wake_poller
                    .wait_timeout(w, IDLE_POLL)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
                if w.stop || w.error.is_some() {
                    return;
                }
                nap = BUSY_POLL_MIN;
            }
            w.enqueued
        };
        if enqueued > marks.covered {
            let capturing = sh.capturing.lock().unwrap_or_else(|p| p.into_inner());
            if !*capturing {
                match tracker.mark() {
                    Ok(m) => {
                        marks.made.push_back((m, enqueued));
                        marks.covered = enqueued;
                    }
                    Err(e) => {
                        drop(capturing);
                        sh.fail(e, true);
                        return;
                    }
                }
            }
        }
        // Retire the marks that were reached.
        let mut done = None;
        while let Some((m, upto)) = marks.made.front() {
            match tracker.reached(m) {
                Ok(true) => {
                    done = Some(*upto);
                    if let Some((m, _)) = marks.made.pop_front() {
                        tracker.recycle(m);
                    }
                }
                Ok(false) => break,
                Err(e) => {
                    sh.fail(e, true);
                    return;
                }
            }
        }
        if let Some(upto) = done {
            let mut w = sh.lock();
            w.completed = w.completed.max(upto);
            if w.retire() {
                nap = BUSY_POLL_MIN;
            }
        }
        if let Err(e) = sh
            .raw
            .check_async("the NCCL communicator (asynchronous error)")
        {
            if !sh.raw.is_closed() {
                sh.fail(e, true);
            }
            return;
        }
        std::thread::sleep(nap);
        nap = (nap * 2).min(BUSY_POLL_MAX);
    }
}

/// Completion of everything enqueued on a stream before the fence was
/// made, and the communicator's errors meanwhile.
#[derive(Debug)]
pub(crate) struct NcclFence {
    event: CudaEvent,
    shared: Arc<Shared>,
}

impl NcclFence {
    /// A fence after everything enqueued on `stream` so far.
    pub(crate) fn new(shared: Arc<Shared>, stream: &CudaStream) -> Result<Self> {
        let event = stream
            .record_event(None)
            .map_err(|e| cuda_err("recording a fence event", e))?;
        Ok(NcclFence { event, shared })
    }
}

impl Fence for NcclFence {
    fn poll(&mut self) -> Result<bool> {
        self.shared.check()?;
        match self.event.try_is_complete() {
            Ok(true) => Ok(true),
            Ok(false) => {
                self.shared
                    .raw
                    .check_async("the NCCL communicator (asynchronous error)")
                    .map_err(|e| self.shared.error().unwrap_or(e))?;
                Ok(false)
            }
            Err(e) => Err(cuda_err("querying a fence event", e)),
        }
    }
}

/// Polls `fence` until it completes, failing with a `Timeout` blaming
/// "members of `group`" when `deadline` passes.
pub(crate) fn wait(fence: &mut NcclFence, deadline: &Deadline, what: &str) -> Result<()> {
    let mut backoff = crate::raw::Backoff::default();
    loop {
        if fence.poll()? {
            return Ok(());
        }
        if deadline.expired() {
            let sh = &fence.shared;
            return Err(CommError::timeout(
                what.to_string(),
                deadline.elapsed(),
                [members(&sh.group, sh.world)],
            ));
        }
        backoff.snooze();
    }
}
