//! Deadlines for work that is only enqueued: one watchdog thread per
//! [`NcclCommunicator`](crate::NcclCommunicator).
//!
//! A call enqueues its NCCL work on the stream and tells the watchdog its
//! sequence number and deadline (a push under a short lock: no CUDA call on
//! the caller's path). The watchdog records a CUDA event on the stream now
//! and then, covering every call enqueued so far, polls those events and
//! `ncclCommGetAsyncError`, and when the oldest unfinished call passes its
//! deadline, or NCCL reports an error, it stores the error and aborts the
//! communicator (`ncclCommAbort`, the documented thread-safe way to make
//! kernels waiting on absent peers exit). The next call or fence returns
//! the stored error.
//!
//! Graph capture happens on a stream of its own
//! ([`NcclCommunicator::begin_capture`](crate::NcclCommunicator::begin_capture)),
//! never on the tracked one, and captured calls are not watched: they run
//! when the graph is launched, under the launcher's ordering. The watchdog
//! thread runs in relaxed capture mode, so its event calls cannot disturb
//! a capture another thread makes in global mode.
//! [`Watchdog::set_capturing`] stops marks for users who capture the
//! tracked stream itself.
//!
//! Completion is learnt through a [`Tracker`] ([`StreamTracker`]: CUDA
//! events), so the watchdog's logic is tested without a GPU against a stub
//! libnccl and a tracker the test controls.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use comm_core::{CallDesc, CommError, Deadline, Fence, Result};

use cudarc::driver::sys::CUstreamCaptureMode;
use cudarc::driver::{CudaEvent, CudaStream};

use crate::cuda::cuda_err;
use crate::raw::RawComm;

/// How often an idle watchdog still asks NCCL for asynchronous errors.
const IDLE_POLL: Duration = Duration::from_millis(100);
/// Sleep between polls while work is pending: from the first to the
/// longest, doubling. Deadlines are seconds; finer polling would only add
/// event records to a busy stream.
const BUSY_POLL_MIN: Duration = Duration::from_micros(100);
const BUSY_POLL_MAX: Duration = Duration::from_millis(1);

/// One enqueued call the watchdog has not yet seen complete.
#[derive(Debug)]
struct Pending {
    seq: u64,
    desc: CallDesc,
    deadline: Deadline,
}

#[derive(Debug, Default)]
struct Watch {
    pending: VecDeque<Pending>,
    /// Sequence number of the last enqueued call (calls are numbered from 1).
    enqueued: u64,
    error: Option<CommError>,
    capturing: bool,
    stop: bool,
    parked: bool,
}

/// Where the watchdog learns that enqueued work has completed: CUDA events
/// on a stream in production ([`StreamTracker`]), anything else in tests.
pub trait Tracker: Send + 'static {
    /// A point in the stream of enqueued work.
    type Mark: Send;
    /// Called once on the watchdog thread before anything else.
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
        // calling (watchdog) thread's capture mode.
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

/// What a communicator, its fences and its watchdog share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) raw: RawComm,
    pub(crate) group: String,
    pub(crate) world: usize,
    state: Mutex<Watch>,
    wake: Condvar,
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
        self.lock().error.clone()
    }

    /// `Err` with that error.
    pub(crate) fn check(&self) -> Result<()> {
        match self.error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Stores `e` (the first error wins) and aborts the communicator.
    pub(crate) fn fail(&self, e: CommError) {
        {
            let mut w = self.lock();
            if w.error.is_none() {
                tracing::warn!(group = %self.group, "NCCL watchdog: {e}; aborting the communicator");
                w.error = Some(e);
            }
        }
        self.raw.abort();
        self.wake.notify_all();
    }
}

/// The watchdog of one communicator: its thread, and the handle calls use
/// to register their work. Dropping it stops the thread (it does not abort
/// the communicator).
#[derive(Debug)]
pub struct Watchdog {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
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
            state: Mutex::new(Watch::default()),
            wake: Condvar::new(),
        });
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("nccl-watchdog-{}", shared.group))
            .spawn(move || run(&sh, tracker))
            .map_err(|e| CommError::io("starting the NCCL watchdog thread", e))?;
        Ok(Watchdog {
            shared,
            thread: Some(thread),
        })
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The communicator it watches.
    pub fn raw(&self) -> &RawComm {
        &self.shared.raw
    }

    /// The error that made the communicator unusable, if any.
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
        if w.parked {
            w.parked = false;
            self.shared.wake.notify_one();
        }
    }

    /// Calls registered and not yet seen complete.
    pub fn pending(&self) -> usize {
        self.shared.lock().pending.len()
    }

    /// Starts or ends a graph capture of the tracked stream itself: no marks
    /// are made meanwhile (an event recorded on a capturing stream would
    /// join the graph). Taken under the lock marks are made under, so none
    /// lands on the stream after its capture began.
    pub fn set_capturing(&self, yes: bool) {
        self.shared.lock().capturing = yes;
    }

    /// Stores `e` (the first error wins) and aborts the communicator.
    pub fn fail(&self, e: CommError) {
        self.shared.fail(e);
    }

    /// Records `why` as the error later calls get (unless one is stored),
    /// without aborting (the caller does).
    pub fn set_error(&self, why: CommError) {
        let mut w = self.shared.lock();
        if w.error.is_none() {
            w.error = Some(why);
        }
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Marks made, each covering the calls up to its number.
struct Marks<M> {
    made: VecDeque<(M, u64)>,
    covered: u64,
    completed: u64,
}

fn run<T: Tracker>(sh: &Shared, mut tracker: T) {
    if let Err(e) = tracker.start() {
        sh.fail(e);
        return;
    }
    let mut marks = Marks {
        made: VecDeque::new(),
        covered: 0,
        completed: 0,
    };
    let mut nap = BUSY_POLL_MIN;
    loop {
        {
            let mut w = sh.lock();
            if w.stop || w.error.is_some() {
                return;
            }
            if w.pending.is_empty() {
                w.parked = true;
                w = sh
                    .wake
                    .wait_timeout(w, IDLE_POLL)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
                w.parked = false;
                if w.stop || w.error.is_some() {
                    return;
                }
                nap = BUSY_POLL_MIN;
            }
            if !w.capturing && w.enqueued > marks.covered {
                let upto = w.enqueued;
                match tracker.mark() {
                    Ok(m) => {
                        marks.made.push_back((m, upto));
                        marks.covered = upto;
                    }
                    Err(e) => {
                        drop(w);
                        sh.fail(e);
                        return;
                    }
                }
            }
        }
        // Retire the marks that were reached.
        while let Some((m, upto)) = marks.made.front() {
            match tracker.reached(m) {
                Ok(true) => {
                    marks.completed = *upto;
                    if let Some((m, _)) = marks.made.pop_front() {
                        tracker.recycle(m);
                    }
                }
                Ok(false) => break,
                Err(e) => {
                    sh.fail(e);
                    return;
                }
            }
        }
        if let Err(e) = sh
            .raw
            .check_async("the NCCL communicator (asynchronous error)")
        {
            if !sh.raw.is_closed() {
                sh.fail(e);
            }
            return;
        }
        {
            let mut w = sh.lock();
            let done = marks.completed;
            let before = w.pending.len();
            while w.pending.front().is_some_and(|p| p.seq <= done) {
                w.pending.pop_front();
            }
            if w.pending.len() < before {
                nap = BUSY_POLL_MIN;
            }
            if let Some(p) = w.pending.front().filter(|p| p.deadline.expired()) {
                let e = CommError::timeout(
                    p.desc.to_string(),
                    p.deadline.elapsed(),
                    [members(&sh.group, sh.world)],
                );
                drop(w);
                sh.fail(e);
                return;
            }
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
                    .check_async("the NCCL communicator (asynchronous error)")?;
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
