//! Non-blocking operations: [`Communicator::scope`], [`Scope`] and
//! [`Work`] handles.
//!
//! Backends whose calls complete before returning (shm, TCP, and any
//! third-party host backend) get a progress engine for free: one worker
//! thread per communicator, started on first use, runs queued operations in
//! order through the same checked path as blocking calls, while the caller
//! computes. Asynchronous backends (NCCL) enqueue on their stream at once
//! and the handle waits on a fence.
//!
//! Borrowed buffers stay borrowed until the scope ends, and the scope does
//! not end before every operation started in it has finished, even if a
//! handle was leaked or the closure panicked. That is what makes lending
//! `&mut [T]` to another thread sound.

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use crate::backend::{Fence, P2p};
use crate::buffer::{BufMut, BufRef, MemMut};
use crate::front::{wait_fence, Op, P2pOp, State};
use crate::{
    check, AsBuf, AsBufMut, CallDesc, Collective, CommError, Communicator, DType, Deadline, Device,
    DeviceMemory, HostBuffer, ReduceOp, Result,
};

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    running: bool,
    shutdown: bool,
    worker: Option<ThreadId>,
}

/// One worker thread per communicator, started on first use.
#[derive(Default)]
pub(crate) struct Engine {
    q: Arc<(Mutex<Queue>, Condvar)>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A job never panics while holding the queue lock; recover anyway.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Engine {
    pub(crate) fn is_idle(&self) -> bool {
        let q = lock(&self.q.0);
        q.jobs.is_empty() && !q.running
    }

    /// Waits until the queue is empty and nothing runs; a generous bound
    /// (each queued job is itself bounded by its deadline).
    pub(crate) fn wait_idle(&self, per_job: Duration) -> Result<()> {
        let (m, cv) = &*self.q;
        let mut q = lock(m);
        let bound = per_job.saturating_mul(q.jobs.len() as u32 + 1) + Duration::from_secs(5);
        let deadline = Instant::now() + bound;
        while !q.jobs.is_empty() || q.running {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(CommError::timeout(
                    "waiting for queued asynchronous operations",
                    bound,
                    ["the communicator's progress engine"],
                ));
            }
            q = cv
                .wait_timeout(q, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    /// Queues `job` (after every earlier one) and returns how many were ahead.
    fn submit(&self, job: Job) -> Result<usize> {
        let (m, cv) = &*self.q;
        let ahead = {
            let mut q = lock(m);
            q.jobs.push_back(job);
            q.jobs.len() - 1 + usize::from(q.running)
        };
        cv.notify_all();
        let mut t = lock(&self.thread);
        if t.is_none() {
            let q = self.q.clone();
            let handle = std::thread::Builder::new()
                .name("comm-progress".into())
                .spawn(move || worker(q))
                .map_err(|e| CommError::io("starting the progress engine thread", e))?;
            lock(&self.q.0).worker = Some(handle.thread().id());
            *t = Some(handle);
        }
        Ok(ahead)
    }
}

fn worker(q: Arc<(Mutex<Queue>, Condvar)>) {
    let (m, cv) = &*q;
    loop {
        let job = {
            let mut g = lock(m);
            loop {
                if let Some(j) = g.jobs.pop_front() {
                    g.running = true;
                    break j;
                }
                if g.shutdown {
                    return;
                }
                g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
            }
        };
        job();
        lock(m).running = false;
        cv.notify_all();
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let (m, cv) = &*self.q;
        let me = std::thread::current().id();
        let on_worker = {
            let mut g = lock(m);
            g.shutdown = true;
            g.worker == Some(me)
        };
        cv.notify_all();
        if let Some(h) = lock(&self.thread).take() {
            // The last reference can be dropped by a job on the worker
            // itself; it then exits on its own.
            if !on_worker {
                let _ = h.join();
            }
        }
    }
}

/// Where a queued operation reports its outcome.
#[derive(Default)]
struct Completion {
    result: Mutex<Option<Result<()>>>,
    cv: Condvar,
}

impl Completion {
    fn set(&self, r: Result<()>) {
        *lock(&self.result) = Some(r);
        self.cv.notify_all();
    }
    fn is_set(&self) -> bool {
        lock(&self.result).is_some()
    }
    /// Waits until set or `until`; `None` on timeout.
    fn wait_until(&self, until: Instant) -> Option<Result<()>> {
        let mut g = lock(&self.result);
        loop {
            if let Some(r) = g.as_ref() {
                return Some(r.clone());
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            g = self
                .cv
                .wait_timeout(g, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// Host memory handed to the worker thread as raw parts.
#[derive(Clone, Copy)]
struct RawHost {
    ptr: *mut u8,
    len: usize,
    dtype: DType,
}

impl RawHost {
    /// # Safety
    /// The memory must stay valid and otherwise untouched for `'a`.
    unsafe fn buf_ref<'a>(self) -> Result<BufRef<'a>> {
        // SAFETY: the caller guarantees `ptr..ptr+len` is live and unaliased
        // by writers for `'a`.
        BufRef::host(unsafe { raw_slice(self.ptr, self.len) }, self.dtype)
    }
    /// # Safety
    /// The memory must stay valid and not be accessed by anyone else for `'a`.
    unsafe fn buf_mut<'a>(self) -> Result<BufMut<'a>> {
        // SAFETY: as above, and nobody else reads or writes it for `'a`.
        BufMut::host(unsafe { raw_slice_mut(self.ptr, self.len) }, self.dtype)
    }
}

/// # Safety
/// `ptr..ptr+len` must be valid for reads for `'a` (any pointer when `len` is 0).
unsafe fn raw_slice<'a>(ptr: *mut u8, len: usize) -> &'a [u8] {
    if len == 0 {
        return &[];
    }
    // SAFETY: guaranteed by the caller.
    unsafe { std::slice::from_raw_parts(ptr, len) }
}

/// # Safety
/// `ptr..ptr+len` must be valid for exclusive writes for `'a`.
unsafe fn raw_slice_mut<'a>(ptr: *mut u8, len: usize) -> &'a mut [u8] {
    if len == 0 {
        return &mut [];
    }
    // SAFETY: guaranteed by the caller.
    unsafe { std::slice::from_raw_parts_mut(ptr, len) }
}

/// A queued operation over raw host memory.
enum RawOp {
    AllReduce(RawHost, ReduceOp),
    AllGather(RawHost, RawHost),
    AllToAll(RawHost, RawHost),
    Broadcast(RawHost, usize),
    SendRecv(Vec<(bool, usize, RawHost, CallDesc)>),
}

// SAFETY: the raw pointers address memory borrowed for the enclosing
// `Scope` (or owned by the `Work`), which outlives the job: the scope waits
// for every job before its borrows end, and a `Work` owning a workspace
// waits before freeing it (a leaked `Work` leaks its workspace).
unsafe impl Send for RawOp {}

impl RawOp {
    /// # Safety
    /// The memory behind the op must be valid and unaliased while the
    /// returned `Op` lives (see the `Send` impl).
    unsafe fn op<'a>(&self) -> Result<Op<'a>> {
        // SAFETY: forwarded to the caller.
        unsafe {
            Ok(match self {
                RawOp::AllReduce(b, op) => Op::AllReduce(b.buf_mut()?, *op),
                RawOp::AllGather(i, o) => Op::AllGather(i.buf_ref()?, o.buf_mut()?),
                RawOp::AllToAll(i, o) => Op::AllToAll(i.buf_ref()?, o.buf_mut()?),
                RawOp::Broadcast(b, root) => Op::Broadcast(b.buf_mut()?, *root),
                RawOp::SendRecv(v) => Op::SendRecv(
                    v.iter()
                        .map(|&(send, peer, raw, desc)| {
                            Ok(if send {
                                P2p::Send {
                                    peer,
                                    buf: raw.buf_ref()?,
                                    desc,
                                }
                            } else {
                                P2p::Recv {
                                    peer,
                                    buf: raw.buf_mut()?,
                                    desc,
                                }
                            })
                        })
                        .collect::<Result<Vec<_>>>()?,
                ),
            })
        }
    }
}

enum Pending {
    /// Finished before the handle was made (empty call, one member, error).
    Done(Result<()>),
    /// Queued on the progress engine.
    Queued {
        done: Arc<Completion>,
        until: Instant,
    },
    /// Enqueued on an asynchronous backend.
    Fenced {
        fence: Box<dyn Fence>,
        deadline: Deadline,
        what: String,
    },
}

/// A device buffer staged through host memory for a host backend: the
/// workspace the engine writes into, and where to copy it back.
struct CopyBack<'s> {
    dst: &'s mut dyn DeviceMemory,
    ws: HostBuffer,
}

/// The handle of a non-blocking operation, made by a [`Scope`].
///
/// [`wait`](Work::wait) returns the operation's outcome (with the
/// communicator's deadline); [`test`](Work::test) tells whether it has
/// finished. Dropping an unwaited handle waits for the operation (its error,
/// if any, is logged); the results of a receive are only guaranteed after
/// `wait`.
#[must_use = "a Work handle should be waited on"]
pub struct Work<'s> {
    pending: Pending,
    copy_back: Vec<CopyBack<'s>>,
    /// Staged inputs the engine reads (freed only after completion).
    _inputs: Vec<HostBuffer>,
    finished: bool,
}

impl std::fmt::Debug for Work<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Work")
            .field("finished", &self.finished)
            .finish()
    }
}

impl Work<'_> {
    fn done(r: Result<()>) -> Self {
        Work {
            pending: Pending::Done(r),
            copy_back: Vec::new(),
            _inputs: Vec::new(),
            finished: false,
        }
    }

    /// True once the operation has finished (successfully or not).
    pub fn test(&mut self) -> Result<bool> {
        match &mut self.pending {
            Pending::Done(_) => Ok(true),
            Pending::Queued { done, .. } => Ok(done.is_set()),
            Pending::Fenced { fence, .. } => fence.poll(),
        }
    }

    /// Waits for the operation and returns its outcome.
    pub fn wait(mut self) -> Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> Result<()> {
        if self.finished {
            return Ok(());
        }
        self.finished = true;
        let r = match &mut self.pending {
            Pending::Done(r) => std::mem::replace(r, Ok(())),
            Pending::Queued { done, until } => done.wait_until(*until).unwrap_or_else(|| {
                Err(CommError::timeout(
                    "a queued asynchronous operation",
                    Duration::ZERO,
                    ["the communicator's progress engine"],
                ))
            }),
            Pending::Fenced {
                fence,
                deadline,
                what,
            } => wait_fence(fence.as_mut(), deadline, what),
        };
        r?;
        for cb in &mut self.copy_back {
            MemMut::Device(&mut *cb.dst).copy_from(crate::buffer::Mem::Host(cb.ws.as_bytes()))?;
        }
        Ok(())
    }
}

impl Drop for Work<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            tracing::warn!("an unwaited asynchronous operation failed: {e}");
        }
    }
}

/// Non-blocking operations on one communicator, all finished before
/// [`Communicator::scope`] returns. Operations run in the order they were
/// started, after earlier blocking calls and before later ones.
///
/// ```
/// use comm_core::{Communicator, FrontOptions, ReduceOp, SingleRank};
/// let c = Communicator::new(Box::new(SingleRank::new()), FrontOptions::new("demo"));
/// let mut a = vec![1i32, 2, 3];
/// let mut gathered = vec![0i32; 3];
/// let b = vec![4i32; 3];
/// c.scope(|s| {
///     let w1 = s.iall_reduce(&mut a, ReduceOp::Sum)?;
///     let w2 = s.iall_gather(&b, &mut gathered)?;
///     w2.wait()?;
///     w1.wait()
/// })
/// .unwrap();
/// assert_eq!(gathered, b);
/// ```
pub struct Scope<'scope, 'env: 'scope> {
    comm: &'env Communicator,
    started: Mutex<Vec<Arc<Completion>>>,
    _scope: PhantomData<&'scope mut &'scope ()>,
    _env: PhantomData<&'env mut &'env ()>,
}

impl std::fmt::Debug for Scope<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scope").field("comm", self.comm).finish()
    }
}

/// Waits for every operation of a scope, also when its closure panics.
struct Drain<'a>(&'a Mutex<Vec<Arc<Completion>>>);

impl Drop for Drain<'_> {
    fn drop(&mut self) {
        for c in lock(self.0).drain(..) {
            // Each job is bounded by its deadline; this bound only guards
            // against a wedged engine.
            let _ = c.wait_until(Instant::now() + Duration::from_secs(86_400));
        }
    }
}

impl Communicator {
    /// Runs `f` with a [`Scope`] for non-blocking operations on borrowed
    /// buffers, and returns once every operation started in it has finished.
    pub fn scope<'env, F, R>(&'env self, f: F) -> R
    where
        F: for<'scope> FnOnce(&'scope Scope<'scope, 'env>) -> R,
    {
        let scope = Scope {
            comm: self,
            started: Mutex::new(Vec::new()),
            _scope: PhantomData,
            _env: PhantomData,
        };
        let _drain = Drain(&scope.started);
        f(&scope)
    }
}

impl<'scope> Scope<'scope, '_> {
    /// Starts an in-place all-reduce of `buf`.
    pub fn iall_reduce<B: AsBufMut + ?Sized>(
        &'scope self,
        buf: &'scope mut B,
        op: ReduceOp,
    ) -> Result<Work<'scope>> {
        let b = buf.as_buf_mut()?;
        let inner = &self.comm.inner;
        check::device("all_reduce", b.device(), inner.device)?;
        let parts = (Collective::AllReduce, b.dtype(), b.numel(), None, Some(op));
        let run = inner.world > 1 && b.numel() > 0;
        self.start(parts, run.then_some(Op::AllReduce(b, op)))
    }

    /// Starts an all-gather of `input` into `output`.
    pub fn iall_gather<I: AsBuf + ?Sized, O: AsBufMut + ?Sized>(
        &'scope self,
        input: &'scope I,
        output: &'scope mut O,
    ) -> Result<Work<'scope>> {
        let (i, mut o) = (input.as_buf()?, output.as_buf_mut()?);
        let (parts, run) =
            self.comm
                .inner
                .prepare_copying(Collective::AllGather, None, &i, &mut o)?;
        self.start(parts, run.then_some(Op::AllGather(i, o)))
    }

    /// Starts an equal-split all-to-all of `input` into `output`.
    pub fn iall_to_all<I: AsBuf + ?Sized, O: AsBufMut + ?Sized>(
        &'scope self,
        input: &'scope I,
        output: &'scope mut O,
    ) -> Result<Work<'scope>> {
        let (i, mut o) = (input.as_buf()?, output.as_buf_mut()?);
        let (parts, run) =
            self.comm
                .inner
                .prepare_copying(Collective::AllToAll, None, &i, &mut o)?;
        self.start(parts, run.then_some(Op::AllToAll(i, o)))
    }

    /// Starts a broadcast of group rank `root`'s `buf`.
    pub fn ibroadcast<B: AsBufMut + ?Sized>(
        &'scope self,
        buf: &'scope mut B,
        root: usize,
    ) -> Result<Work<'scope>> {
        let b = buf.as_buf_mut()?;
        let inner = &self.comm.inner;
        check::device("broadcast", b.device(), inner.device)?;
        check::root("broadcast", root, inner.world)?;
        let parts = (
            Collective::Broadcast,
            b.dtype(),
            b.numel(),
            Some(root),
            None,
        );
        let run = inner.world > 1 && b.numel() > 0;
        self.start(parts, run.then_some(Op::Broadcast(b, root)))
    }

    /// Starts sending `buf` to group rank `dst`.
    pub fn isend<B: AsBuf + ?Sized>(
        &'scope self,
        buf: &'scope B,
        dst: usize,
    ) -> Result<Work<'scope>> {
        self.batch_isend_irecv(vec![P2pOp::send(buf, dst)?])
    }

    /// Starts receiving from group rank `src` into `buf`.
    pub fn irecv<B: AsBufMut + ?Sized>(
        &'scope self,
        buf: &'scope mut B,
        src: usize,
    ) -> Result<Work<'scope>> {
        self.batch_isend_irecv(vec![P2pOp::recv(buf, src)?])
    }

    /// Starts a batch of sends and receives, progressed together (the
    /// building block of ring attention: pass K/V on while computing).
    pub fn batch_isend_irecv(&'scope self, ops: Vec<P2pOp<'scope>>) -> Result<Work<'scope>> {
        let (batch, ops) = self.comm.inner.p2p(ops)?;
        match ops {
            Some(ops) => self.launch(batch, Op::SendRecv(ops)),
            None => Ok(Work::done(Ok(()))),
        }
    }

    /// Numbers a checked call and launches it (`None`: nothing to move).
    fn start(
        &'scope self,
        parts: crate::front::DescParts,
        op: Option<Op<'scope>>,
    ) -> Result<Work<'scope>> {
        let inner = &self.comm.inner;
        let desc = inner.describe(parts, None)?;
        match op {
            Some(op) => self.launch(desc, op),
            None => Ok(Work::done(match inner.poisoned() {
                Some(e) => Err(inner.refused(&desc, &e)),
                None => Ok(()),
            })),
        }
    }

    /// Asynchronous backends run the call now (it only enqueues); host
    /// backends queue it on the progress engine.
    fn launch(&'scope self, desc: CallDesc, op: Op<'scope>) -> Result<Work<'scope>> {
        if self.comm.inner.device != Device::Cpu {
            return Ok(self.enqueue_async(desc, op));
        }
        let mut copy_back = Vec::new();
        let (raw, kept) = to_raw(op, &mut copy_back)?;
        Ok(self.queue(desc, raw, kept)?.with_copy_back(copy_back))
    }

    /// Runs an asynchronous backend's call now and fences it.
    fn enqueue_async(&'scope self, desc: CallDesc, op: Op<'_>) -> Work<'scope> {
        let inner = &self.comm.inner;
        let r = (|| {
            let mut st = inner.idle_state()?;
            inner.execute(&mut st, desc, op)?;
            let deadline = Deadline::after(inner.timeout());
            let fence = st.comm.fence()?;
            Ok::<_, CommError>((fence, deadline))
        })();
        match r {
            Ok((Some(fence), deadline)) => Work {
                pending: Pending::Fenced {
                    fence,
                    deadline,
                    what: desc.to_string(),
                },
                copy_back: Vec::new(),
                _inputs: Vec::new(),
                finished: false,
            },
            Ok((None, _)) => Work::done(Ok(())),
            Err(e) => Work::done(Err(e)),
        }
    }

    /// Hands a host operation to the progress engine.
    fn queue(
        &'scope self,
        desc: CallDesc,
        raw: RawOp,
        kept: Vec<HostBuffer>,
    ) -> Result<Work<'scope>> {
        let inner = self.comm.inner.clone();
        let done = Arc::new(Completion::default());
        let timeout = inner.timeout();
        let job_done = done.clone();
        let job: Job = Box::new(move || {
            let r = (|| {
                if let Some(e) = inner.poisoned() {
                    // Queued before the failure: it shares its cause.
                    return Err(e);
                }
                let mut st: MutexGuard<'_, State> = inner.lock()?;
                // SAFETY: see `RawOp`'s `Send` impl: the memory outlives
                // this job, and the scope or `Work` keeps it unaliased.
                let op = unsafe { raw.op() }?;
                inner.execute(&mut st, desc, op)
            })();
            job_done.set(r);
        });
        lock(&self.started).push(done.clone());
        let ahead = self.comm.inner.engine.submit(job)?;
        let until =
            Instant::now() + timeout.saturating_mul(ahead as u32 + 1) + Duration::from_secs(5);
        Ok(Work {
            pending: Pending::Queued { done, until },
            copy_back: Vec::new(),
            _inputs: kept,
            finished: false,
        })
    }
}

/// The raw host parts of a checked host-backend call, staging device
/// memory through workspaces (inputs kept in the returned vector, outputs
/// in `copy_back`).
fn to_raw<'s>(op: Op<'s>, copy_back: &mut Vec<CopyBack<'s>>) -> Result<(RawOp, Vec<HostBuffer>)> {
    let mut kept = Vec::new();
    let mut input = |b: BufRef<'_>| -> Result<RawHost> {
        let (r, mut k) = stage_in(b)?;
        kept.append(&mut k);
        Ok(r)
    };
    let raw = match op {
        Op::AllReduce(b, op) => RawOp::AllReduce(stage_out(b, true, copy_back)?, op),
        Op::AllGather(i, o) => RawOp::AllGather(input(i)?, stage_out(o, false, copy_back)?),
        Op::AllToAll(i, o) => RawOp::AllToAll(input(i)?, stage_out(o, false, copy_back)?),
        Op::Broadcast(b, root) => RawOp::Broadcast(stage_out(b, true, copy_back)?, root),
        Op::SendRecv(ops) => {
            let mut v = Vec::with_capacity(ops.len());
            for p in ops {
                v.push(match p {
                    P2p::Send { peer, buf, desc } => (true, peer, input(buf)?, desc),
                    P2p::Recv { peer, buf, desc } => {
                        (false, peer, stage_out(buf, false, copy_back)?, desc)
                    }
                });
            }
            RawOp::SendRecv(v)
        }
        other => {
            return Err(CommError::invalid(format!(
                "{other:?} has no non-blocking form"
            )))
        }
    };
    Ok((raw, kept))
}

impl<'s> Work<'s> {
    fn with_copy_back(mut self, cb: Vec<CopyBack<'s>>) -> Self {
        self.copy_back = cb;
        self
    }
}

/// Raw host parts of an input: the caller's host memory, or a host copy of
/// device memory (kept alive by the returned workspace).
fn stage_in(b: BufRef<'_>) -> Result<(RawHost, Vec<HostBuffer>)> {
    match b.host_bytes() {
        Some(h) => Ok((
            RawHost {
                ptr: h.as_ptr().cast_mut(),
                len: h.len(),
                dtype: b.dtype(),
            },
            Vec::new(),
        )),
        None => {
            let mut ws = HostBuffer::zeroed(b.nbytes());
            MemMut::Host(ws.as_bytes_mut()).copy_from(b.mem())?;
            let raw = RawHost {
                ptr: ws.as_bytes_mut().as_mut_ptr(),
                len: ws.len(),
                dtype: b.dtype(),
            };
            Ok((raw, vec![ws]))
        }
    }
}

/// Raw host parts of an output: the caller's host memory, or a workspace
/// (copied in first when `copy_in`) that `copy_back` returns to the device.
fn stage_out<'s>(
    b: BufMut<'s>,
    copy_in: bool,
    copy_back: &mut Vec<CopyBack<'s>>,
) -> Result<RawHost> {
    let dtype = b.dtype();
    match b.into_mem() {
        MemMut::Host(h) => Ok(RawHost {
            ptr: h.as_mut_ptr(),
            len: h.len(),
            dtype,
        }),
        MemMut::Device(d) => {
            let mut staged = HostBuffer::zeroed(d.len_bytes());
            if copy_in {
                d.copy_to_host(staged.as_bytes_mut())?;
            }
            let raw = RawHost {
                ptr: staged.as_bytes_mut().as_mut_ptr(),
                len: staged.len(),
                dtype,
            };
            // The workspace moves into the handle; its heap memory (where
            // `raw` points) does not move with it.
            copy_back.push(CopyBack { dst: d, ws: staged });
            Ok(raw)
        }
    }
}
