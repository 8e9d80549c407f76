//! [`NcclCommunicator`]: comm-core's raw [`DeviceCommunicator`] over NCCL.
//!
//! It only moves bytes: the checked front (`comm_core::Communicator`) owns
//! argument checks, shortcuts, poisoning and call cross-checks. Calls
//! enqueue on the communicator's stream and return; a watchdog enforces
//! each call's deadline ([`crate::watchdog`]).

use std::any::Any;
use std::cell::Cell;
use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use comm_core::{
    BufMut, BufRef, Call, Capabilities, CommError, Deadline, Device, DeviceCommunicator, Fence,
    Mem, MemMut, P2p, ReduceOp, Result, Store,
};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaEvent, CudaGraph, CudaSlice, CudaStream, DevicePtrMut, SyncOnDrop};

use crate::cuda::{cuda_err, CudaDevice};
use crate::raw::{
    CudaStreamHandle, NcclCommHandle, NcclDataType, NcclLibrary, NcclRedOp, NcclUniqueId, Progress,
    RawComm,
};
use crate::watchdog::{self, members, NcclFence, StreamTracker, Watchdog};

/// How an [`NcclCommunicator`] is set up. Start from [`NcclOptions::new`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct NcclOptions {
    /// CUDA device ordinal this member uses.
    pub device: usize,
    /// Deadline of set-up, and the default of [`NcclCommunicator::synchronize`].
    pub timeout: Duration,
    /// Store key under which rank 0 publishes the unique id. Use a distinct
    /// key (or a prefixed store) per communicator sharing one store.
    pub key: String,
    /// The group's name, used in errors (`tp:0`).
    pub label: String,
}

impl NcclOptions {
    /// Options for device `device` with the default deadline.
    pub fn new(device: usize) -> Self {
        NcclOptions {
            device,
            timeout: comm_core::default_timeout(),
            key: "nccl/unique_id".into(),
            label: "nccl".into(),
        }
    }
    /// With a deadline.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
    /// With a store key for the unique id.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = key.into();
        self
    }
    /// With a group name for errors.
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }
}

/// A graph capture in progress.
#[derive(Debug)]
struct Capture {
    stream: Arc<CudaStream>,
    tracking_was_on: bool,
}

/// A member of an NCCL communicator: comm-core's raw
/// [`DeviceCommunicator`] for CUDA memory (cudarc slices and views, CUDA
/// tensors), asynchronous.
///
/// Every call enqueues its work on [`stream`](Self::stream) and returns;
/// cudarc's per-buffer events order it after earlier work on the buffers
/// and later work after it. A watchdog thread aborts the communicator when
/// a call passes its deadline or NCCL reports an error, and the next call
/// returns that error. Wait with [`synchronize`](Self::synchronize) (or the
/// front's `Communicator::synchronize`), or order other streams after
/// [`record_event`](Self::record_event).
///
/// `Send` but not `Sync`: one thread drives it at a time.
///
/// # What a call costs on the host
///
/// Besides the NCCL call itself: one atomic load (a stored error?), making
/// the context current when it is not, the handle's lock (so the watchdog
/// cannot abort in the middle of the call), and the registration of the
/// deadline (a push under a short lock; no CUDA call, no system call, no
/// event per call: the watchdog's poller records one event now and then for
/// all the calls so far).
///
/// And cudarc's event tracking, which is the price of cross-stream safety:
/// for a buffer allocated while the context tracks events (cudarc's
/// default), cudarc makes the stream wait for the buffer's last read and
/// write events (`cuStreamWaitEvent`) and records a new one after the call
/// (`cuEventRecord`): two or three driver calls per buffer, whatever stream
/// the buffer was allocated on. An application that orders its streams
/// itself (one compute stream that waits for [`record_event`](Self::record_event),
/// or work on [`stream`](Self::stream) only) avoids them by allocating its
/// communication buffers with tracking off:
///
/// ```no_run
/// # fn demo(ctx: &std::sync::Arc<cudarc::driver::CudaContext>,
/// #         stream: &std::sync::Arc<cudarc::driver::CudaStream>) {
/// // SAFETY (the application's): uses of `buf` on several streams are
/// // ordered by the application, and it is not freed while in use.
/// unsafe { ctx.disable_event_tracking() };
/// let buf = stream.alloc_zeros::<f32>(1 << 20);
/// unsafe { ctx.enable_event_tracking() };
/// # let _ = buf; }
/// ```
///
/// `gpu/check.sh`'s benchmark (`gpu_bench`) measures both.
///
/// ```
/// fn needs_send<T: Send>() {}
/// needs_send::<comm_nccl::NcclCommunicator>();
/// ```
///
/// ```compile_fail
/// fn needs_sync<T: Sync>() {}
/// needs_sync::<comm_nccl::NcclCommunicator>();
/// ```
#[derive(Debug)]
pub struct NcclCommunicator {
    watchdog: Watchdog,
    dev: Arc<CudaDevice>,
    stream: Arc<CudaStream>,
    capture: Option<Capture>,
    barrier: CudaSlice<f32>,
    rank: usize,
    world: usize,
    timeout: Duration,
    _not_sync: PhantomData<Cell<()>>,
}

fn not_cuda(op: &str) -> CommError {
    CommError::invalid(format!(
        "{op}: the NCCL backend moves CUDA memory (cudarc slices and views, CUDA tensors); \
         this buffer is not"
    ))
}

/// The address of a buffer to read on `stream`, ordered after its writes.
fn read_ptr<'a>(op: &str, b: &BufRef<'a>, stream: &'a CudaStream) -> Result<(u64, SyncOnDrop<'a>)> {
    match b.mem() {
        Mem::Device(d) => d.cuda_read(stream).ok_or_else(|| not_cuda(op)),
        Mem::Host(_) => Err(not_cuda(op)),
    }
}

/// The address of a buffer to write on `stream`, ordered after its uses.
fn write_ptr<'a>(
    op: &str,
    b: &'a mut BufMut<'_>,
    stream: &'a CudaStream,
) -> Result<(u64, SyncOnDrop<'a>)> {
    match b.mem() {
        MemMut::Device(d) => d.cuda_write(stream).ok_or_else(|| not_cuda(op)),
        MemMut::Host(_) => Err(not_cuda(op)),
    }
}

fn cs(stream: &CudaStream) -> CudaStreamHandle {
    stream.cu_stream() as CudaStreamHandle
}

/// Runs `body` between `ncclGroupStart` and `ncclGroupEnd`; the group is
/// closed even when `body` fails (NCCL requires it), and the first error wins.
fn grouped(lib: &NcclLibrary, body: impl FnOnce() -> Result<Progress>) -> Result<Progress> {
    lib.group_start()?;
    let r = body();
    let end = lib.group_end();
    let inner = r?;
    let end = end?;
    Ok(
        if inner == Progress::InProgress || end == Progress::InProgress {
            Progress::InProgress
        } else {
            Progress::Done
        },
    )
}

/// Merges the progress of calls made inside one group.
fn both(a: Progress, b: Result<Progress>) -> Result<Progress> {
    let b = b?;
    Ok(if a == Progress::InProgress || b == Progress::InProgress {
        Progress::InProgress
    } else {
        Progress::Done
    })
}

impl NcclCommunicator {
    /// Joins the communicator: rank 0 creates the unique id and publishes it
    /// in `store` under `opts.key`, every member initialises a non-blocking
    /// communicator and polls until ready or `opts.timeout` (then `Timeout`,
    /// communicator aborted), then a warm-up all_reduce runs and completes.
    ///
    /// `BackendUnavailable` when libcuda or libnccl cannot be used.
    pub fn new(store: &dyn Store, rank: usize, world: usize, opts: NcclOptions) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(CommError::invalid(format!(
                "NCCL communicator: rank {rank} is out of range for a group of {world}"
            )));
        }
        let deadline = Deadline::after(opts.timeout);
        let dev = CudaDevice::get(opts.device)?;
        let lib = NcclLibrary::load()?;
        dev.bind()?;
        let id = exchange_id(lib, store, &opts.key, rank, world, &deadline)?;
        let raw = RawComm::init(lib, &id, rank, world, &deadline, &opts.label)?;
        let stream = dev
            .context()
            .new_stream()
            .map_err(|e| cuda_err("creating the NCCL stream", e))?;
        let barrier = stream
            .alloc_zeros::<f32>(1)
            .map_err(|e| cuda_err("allocating the barrier buffer", e))?;
        let watchdog = Watchdog::start(raw, opts.label, world, StreamTracker::new(stream.clone()))?;
        let mut c = NcclCommunicator {
            watchdog,
            dev,
            stream,
            capture: None,
            barrier,
            rank,
            world,
            timeout: opts.timeout,
            _not_sync: PhantomData,
        };
        // Warm-up: the first collective sets up NCCL's connections.
        let group = c.watchdog.shared().group.clone();
        let call = Call::new(
            comm_core::CallDesc::new(comm_core::Collective::Barrier, 0, comm_core::DType::F32, 1),
            deadline.remaining(),
            &group,
        );
        let desc = call.desc;
        c.barrier_enqueue(&call)?;
        let mut fence = NcclFence::new(c.watchdog.shared().clone(), &c.stream)?;
        if let Err(e) = watchdog::wait(&mut fence, &deadline, &format!("warm-up {desc}")) {
            c.watchdog.fail(e.clone());
            return Err(e);
        }
        Ok(c)
    }

    /// The device this member uses.
    pub fn cuda_device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }
    /// The stream calls are enqueued on (outside graph capture).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// The stream calls go to now: the capture stream while capturing.
    pub fn active_stream(&self) -> &Arc<CudaStream> {
        self.capture.as_ref().map_or(&self.stream, |c| &c.stream)
    }
    /// The NCCL library in use.
    pub fn library(&self) -> &'static NcclLibrary {
        self.watchdog.raw().lib()
    }
    /// The raw communicator (for direct NCCL calls on [`stream`](Self::stream)).
    pub fn raw(&self) -> &RawComm {
        self.watchdog.raw()
    }
    /// The group's name.
    pub fn label(&self) -> &str {
        &self.watchdog.shared().group
    }
    /// The default deadline of [`synchronize`](Self::synchronize).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
    /// Changes that deadline.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }
    /// The error that made the communicator unusable (a deadline that
    /// passed, an NCCL asynchronous error, an abort), if any.
    pub fn error(&self) -> Option<CommError> {
        self.watchdog.error()
    }

    /// An event recorded on the active stream after everything enqueued so
    /// far: make another stream wait on it (`stream.wait(&event)`) to order
    /// work after the collectives.
    pub fn record_event(&self) -> Result<CudaEvent> {
        self.active_stream()
            .record_event(None)
            .map_err(|e| cuda_err("recording an event on the NCCL stream", e))
    }

    /// Waits, with the deadline ([`timeout`](Self::timeout)), until
    /// everything enqueued so far has completed. A passed deadline aborts the
    /// communicator.
    pub fn synchronize(&mut self) -> Result<()> {
        self.watchdog.check()?;
        if self.capture.is_some() {
            return Err(CommError::State(
                "synchronize during graph capture: end the capture first".into(),
            ));
        }
        self.dev.bind()?;
        let mut fence = NcclFence::new(self.watchdog.shared().clone(), &self.stream)?;
        let r = watchdog::wait(&mut fence, &Deadline::after(self.timeout), "synchronize");
        if let Err(e) = &r {
            self.watchdog.fail(e.clone());
        }
        r
    }

    /// Starts capturing this communicator's calls into a CUDA graph and
    /// returns the stream they now go to: capture other work on it too (or
    /// order it with events recorded during the capture). The capture is
    /// thread-local (`CU_STREAM_CAPTURE_MODE_THREAD_LOCAL`): drive the
    /// communicator from this thread until [`end_capture`](Self::end_capture).
    ///
    /// While capturing, cudarc's event tracking is turned off on this
    /// device's context (a capturing stream must not wait on events recorded
    /// outside the capture), so order other streams' work on the same
    /// buffers yourself until the capture ends, and allocate nothing during
    /// the capture. Captured calls are not watched by the deadline (they run
    /// when the graph is launched).
    pub fn begin_capture(&mut self) -> Result<Arc<CudaStream>> {
        self.watchdog.check()?;
        if self.capture.is_some() {
            return Err(CommError::State(
                "a graph capture is already in progress".into(),
            ));
        }
        self.dev.bind()?;
        // Compile and load the permute kernels now: loading a module during
        // the capture would invalidate it.
        let _ = self.dev.kernels();
        let side = self
            .stream
            .fork()
            .map_err(|e| cuda_err("creating the graph-capture stream", e))?;
        let ctx = self.dev.context();
        let tracking_was_on = ctx.is_event_tracking();
        // SAFETY: turning tracking off only skips cudarc's automatic
        // cross-stream waits and records; the documented contract above
        // hands that ordering to the caller until `end_capture` restores it.
        unsafe { ctx.disable_event_tracking() };
        if let Err(e) = side.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        {
            self.restore_tracking(tracking_was_on);
            return Err(cuda_err("cuStreamBeginCapture", e));
        }
        self.capture = Some(Capture {
            stream: side.clone(),
            tracking_was_on,
        });
        Ok(side)
    }

    /// Ends the capture and instantiates the graph. An empty capture or a
    /// failed one is an error (the capture is over either way).
    pub fn end_capture(&mut self) -> Result<CudaGraph> {
        let cap = self
            .capture
            .take()
            .ok_or_else(|| CommError::State("end_capture without begin_capture".into()))?;
        self.dev.bind()?;
        let r = cap.stream.end_capture(CUgraphInstantiate_flags(0));
        self.restore_tracking(cap.tracking_was_on);
        let _ = self.stream.join(&cap.stream);
        match r {
            Ok(Some(g)) => Ok(g),
            Ok(None) => Err(CommError::State(
                "the graph capture recorded nothing".into(),
            )),
            Err(e) => Err(cuda_err("cuStreamEndCapture", e)),
        }
    }

    /// True between [`begin_capture`](Self::begin_capture) and
    /// [`end_capture`](Self::end_capture).
    pub fn is_capturing(&self) -> bool {
        self.capture.is_some()
    }

    fn restore_tracking(&self, was_on: bool) {
        if was_on {
            // SAFETY: restores the state `begin_capture` found.
            unsafe { self.dev.context().enable_event_tracking() };
        }
    }

    /// Before a call: the stored error (one atomic load when there is
    /// none), the context, the stream to use.
    fn begin(&self) -> Result<&CudaStream> {
        self.watchdog.check()?;
        self.dev.bind()?;
        Ok(self.active_stream())
    }

    /// [`enqueue`] for this communicator.
    fn enqueue(
        &self,
        call: &Call<'_>,
        stream: &CudaStream,
        f: impl FnOnce(&'static NcclLibrary, NcclCommHandle, CudaStreamHandle) -> Result<Progress>,
    ) -> Result<()> {
        enqueue(&self.watchdog, self.capture.is_some(), call, stream, f)
    }

    fn barrier_enqueue(&mut self, call: &Call<'_>) -> Result<()> {
        self.watchdog.check()?;
        self.dev.bind()?;
        // The fields, not `active_stream()`: the barrier buffer is borrowed
        // mutably at the same time.
        let stream = self.capture.as_ref().map_or(&self.stream, |c| &c.stream);
        let (p, _w) = self.barrier.device_ptr_mut(stream);
        // SAFETY: in-place sum of the one f32 of our own barrier buffer,
        // ordered on `stream` by its guard.
        enqueue(
            &self.watchdog,
            self.capture.is_some(),
            call,
            stream,
            |lib, h, s| unsafe {
                lib.all_reduce(
                    p as *const c_void,
                    p as *mut c_void,
                    1,
                    NcclDataType::Float32,
                    NcclRedOp::Sum,
                    h,
                    s,
                )
            },
        )
    }

    /// A device-to-device copy on `stream`.
    ///
    /// # Safety
    /// Both ranges hold `bytes` bytes of live device memory ordered on `stream`.
    unsafe fn copy(stream: &CudaStream, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: the caller's guarantees.
        unsafe { cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, stream.cu_stream()) }
            .map_err(|e| cuda_err("device-to-device copy", e))
    }
}

/// Runs `f` with the live handle and the stream, lets a non-blocking call
/// settle within the call's deadline, and (outside graph capture) hands the
/// call to the watchdog.
fn enqueue(
    watchdog: &Watchdog,
    capturing: bool,
    call: &Call<'_>,
    stream: &CudaStream,
    f: impl FnOnce(&'static NcclLibrary, NcclCommHandle, CudaStreamHandle) -> Result<Progress>,
) -> Result<()> {
    let raw = watchdog.raw();
    let sh = watchdog.shared();
    let (group, world) = (&sh.group, sh.world);
    // When the watchdog aborted meanwhile, its error says why.
    let why = |e: CommError| watchdog.error().unwrap_or(e);
    let progress = raw.with(|lib, h| f(lib, h, cs(stream))).map_err(why)?;
    raw.settle(progress, &call.deadline, &|| call.name(), &|| {
        vec![members(group, world)]
    })
    .map_err(why)?;
    if !capturing {
        watchdog.watch(call.desc, call.deadline);
    }
    Ok(())
}

/// Rank 0 creates the unique id and publishes it; the others read it (the
/// last reader deletes the key, so a store can serve the next group).
fn exchange_id(
    lib: &NcclLibrary,
    store: &dyn Store,
    key: &str,
    rank: usize,
    world: usize,
    deadline: &Deadline,
) -> Result<NcclUniqueId> {
    if rank == 0 {
        let id = lib.get_unique_id()?;
        store.set(key, id.as_bytes())?;
        return Ok(id);
    }
    let bytes = store.get(key, deadline.remaining()).map_err(|e| {
        e.blaming(
            0,
            "did not publish the NCCL unique id (it has not reached this set-up)",
            format!("nccl set-up: waiting for `{key}`"),
        )
    })?;
    let id = NcclUniqueId::from_bytes(&bytes)?;
    let readers = format!("{key}/readers");
    if store.add(&readers, 1)? == (world - 1) as i64 {
        let _ = store.delete(key);
        let _ = store.delete(&readers);
    }
    Ok(id)
}

impl DeviceCommunicator for NcclCommunicator {
    fn backend(&self) -> &str {
        "nccl"
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn device(&self) -> Device {
        Device::Cuda(self.dev.ordinal())
    }
    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::default();
        c.native_avg = true;
        c.asynchronous = true;
        c.checks_calls = false;
        c
    }

    fn all_reduce(&mut self, call: &Call<'_>, mut buf: BufMut<'_>, op: ReduceOp) -> Result<()> {
        let stream = self.begin()?;
        let (n, dt) = (buf.numel(), NcclDataType::from(buf.dtype()));
        let (p, _w) = write_ptr("all_reduce", &mut buf, stream)?;
        // SAFETY: in place over the buffer's `n` elements, ordered on
        // `stream` by the guard, which records the write after the call.
        self.enqueue(call, stream, |lib, h, s| unsafe {
            lib.all_reduce(p as *const c_void, p as *mut c_void, n, dt, op.into(), h, s)
        })
    }

    fn all_gather(
        &mut self,
        call: &Call<'_>,
        input: BufRef<'_>,
        mut output: BufMut<'_>,
    ) -> Result<()> {
        let stream = self.begin()?;
        let (n, dt) = (input.numel(), NcclDataType::from(input.dtype()));
        let (sp, _r) = read_ptr("all_gather", &input, stream)?;
        let (dp, _w) = write_ptr("all_gather", &mut output, stream)?;
        // SAFETY: the input holds `n` elements, the output `world * n` (the
        // front checked), both ordered on `stream` by their guards.
        self.enqueue(call, stream, |lib, h, s| unsafe {
            lib.all_gather(sp as *const c_void, dp as *mut c_void, n, dt, h, s)
        })
    }

    fn reduce_scatter(
        &mut self,
        call: &Call<'_>,
        input: BufRef<'_>,
        mut output: BufMut<'_>,
        op: ReduceOp,
    ) -> Result<()> {
        let stream = self.begin()?;
        let (n, dt) = (output.numel(), NcclDataType::from(output.dtype()));
        let (sp, _r) = read_ptr("reduce_scatter", &input, stream)?;
        let (dp, _w) = write_ptr("reduce_scatter", &mut output, stream)?;
        // SAFETY: the input holds `world * n` elements, the output `n`.
        self.enqueue(call, stream, |lib, h, s| unsafe {
            lib.reduce_scatter(
                sp as *const c_void,
                dp as *mut c_void,
                n,
                dt,
                op.into(),
                h,
                s,
            )
        })
    }

    fn broadcast(&mut self, call: &Call<'_>, mut buf: BufMut<'_>, root: usize) -> Result<()> {
        let stream = self.begin()?;
        let (n, dt) = (buf.numel(), NcclDataType::from(buf.dtype()));
        let (p, _w) = write_ptr("broadcast", &mut buf, stream)?;
        // SAFETY: in place over the buffer's `n` elements.
        self.enqueue(call, stream, |lib, h, s| unsafe {
            lib.broadcast(p as *const c_void, p as *mut c_void, n, dt, root, h, s)
        })
    }

    fn gather(
        &mut self,
        call: &Call<'_>,
        input: BufRef<'_>,
        output: Option<BufMut<'_>>,
        root: usize,
    ) -> Result<()> {
        let stream = self.begin()?;
        let (n, dt) = (input.numel(), NcclDataType::from(input.dtype()));
        let bytes = input.nbytes();
        let (world, me) = (self.world, self.rank);
        let (sp, _r) = read_ptr("gather", &input, stream)?;
        match output {
            Some(mut out) => {
                let (dp, _w) = write_ptr("gather", &mut out, stream)?;
                // SAFETY: the output holds `world` blocks of `bytes` (the
                // front checked); this member's block is a copy of its input.
                unsafe { Self::copy(stream, dp + (me * bytes) as u64, sp, bytes) }?;
                self.enqueue(call, stream, |lib, h, s| {
                    grouped(lib, || {
                        let mut p = Progress::Done;
                        for r in (0..world).filter(|&r| r != me) {
                            let at = dp + (r * bytes) as u64;
                            // SAFETY: block `r` of the output lies inside it.
                            p = both(p, unsafe { lib.recv(at as *mut c_void, n, dt, r, h, s) })?;
                        }
                        Ok(p)
                    })
                })
            }
            // SAFETY: sends the input's `n` elements to the root.
            None => self.enqueue(call, stream, |lib, h, s| unsafe {
                lib.send(sp as *const c_void, n, dt, root, h, s)
            }),
        }
    }

    fn all_to_all(
        &mut self,
        call: &Call<'_>,
        input: BufRef<'_>,
        mut output: BufMut<'_>,
    ) -> Result<()> {
        let stream = self.begin()?;
        let (world, me) = (self.world, self.rank);
        let n = input.numel() / world;
        let dt = NcclDataType::from(input.dtype());
        let bytes = input.nbytes() / world;
        let (sp, _r) = read_ptr("all_to_all", &input, stream)?;
        let (dp, _w) = write_ptr("all_to_all", &mut output, stream)?;
        let own = (me * bytes) as u64;
        // SAFETY: both buffers hold `world` blocks of `bytes` (the front checked).
        unsafe { Self::copy(stream, dp + own, sp + own, bytes) }?;
        self.enqueue(call, stream, |lib, h, s| {
            grouped(lib, || {
                let mut p = Progress::Done;
                for peer in (0..world).filter(|&q| q != me) {
                    let off = (peer * bytes) as u64;
                    // SAFETY: block `peer` of both buffers lies inside them.
                    p = both(p, unsafe {
                        lib.send((sp + off) as *const c_void, n, dt, peer, h, s)
                    })?;
                    // SAFETY: as above.
                    p = both(p, unsafe {
                        lib.recv((dp + off) as *mut c_void, n, dt, peer, h, s)
                    })?;
                }
                Ok(p)
            })
        })
    }

    fn send_recv(&mut self, call: &Call<'_>, ops: &mut [P2p<'_>]) -> Result<()> {
        let stream = self.begin()?;
        // (send?, peer, address, count, dtype) per message; the guards order
        // each buffer and record its use after the group is enqueued.
        let mut plan = Vec::with_capacity(ops.len());
        let mut guards = Vec::with_capacity(ops.len());
        for op in ops.iter_mut() {
            match op {
                P2p::Send { peer, buf, .. } => {
                    let (p, g) = read_ptr("send", buf, stream)?;
                    plan.push((true, *peer, p, buf.numel(), NcclDataType::from(buf.dtype())));
                    guards.push(g);
                }
                P2p::Recv { peer, buf, .. } => {
                    let (n, dt) = (buf.numel(), NcclDataType::from(buf.dtype()));
                    let (p, g) = write_ptr("recv", buf, stream)?;
                    plan.push((false, *peer, p, n, dt));
                    guards.push(g);
                }
            }
        }
        let r = self.enqueue(call, stream, |lib, h, s| {
            grouped(lib, || {
                let mut p = Progress::Done;
                for &(send, peer, at, n, dt) in &plan {
                    // SAFETY: each address holds its message's `n` elements,
                    // ordered on `s` by the guards kept alive below.
                    let r = unsafe {
                        if send {
                            lib.send(at as *const c_void, n, dt, peer, h, s)
                        } else {
                            lib.recv(at as *mut c_void, n, dt, peer, h, s)
                        }
                    };
                    p = both(p, r)?;
                }
                Ok(p)
            })
        });
        drop(guards);
        r
    }

    fn barrier(&mut self, call: &Call<'_>) -> Result<()> {
        self.barrier_enqueue(call)
    }

    /// Stores `why` for later calls and has the watchdog thread run
    /// `ncclCommAbort`: it returns at once, while the abort itself may wait
    /// for kernels still running on the device.
    fn abort(&mut self, why: &CommError) {
        self.watchdog.abort(why.clone());
    }

    fn fence(&mut self) -> Result<Option<Box<dyn Fence>>> {
        self.watchdog.check()?;
        if self.capture.is_some() {
            // Captured work runs when the graph is launched.
            return Ok(None);
        }
        self.dev.bind()?;
        Ok(Some(Box::new(NcclFence::new(
            self.watchdog.shared().clone(),
            &self.stream,
        )?)))
    }

    fn as_any_mut(&mut self) -> Option<&mut dyn Any> {
        Some(self)
    }
}

impl Drop for NcclCommunicator {
    fn drop(&mut self) {
        if let Some(cap) = self.capture.take() {
            let _ = cap.stream.end_capture(CUgraphInstantiate_flags(0));
            self.restore_tracking(cap.tracking_was_on);
        }
        self.watchdog.stop();
        let raw = self.watchdog.raw();
        if self.watchdog.error().is_some() || raw.is_closed() || self.dev.bind().is_err() {
            raw.abort();
            return;
        }
        // Let enqueued work drain within a bounded deadline (a stream stuck
        // on a missing peer times out and aborts instead of hanging here),
        // then finalize + destroy (which aborts by itself on failure).
        let limit = Deadline::after(self.timeout.min(Duration::from_secs(30)));
        let drained = NcclFence::new(self.watchdog.shared().clone(), &self.stream)
            .and_then(|mut f| watchdog::wait(&mut f, &limit, "dropping the NCCL communicator"));
        if drained.is_err() {
            raw.abort();
            return;
        }
        if let Err(e) = raw.shutdown(&limit) {
            tracing::warn!(group = %self.label(), "NCCL communicator shutdown: {e}");
        }
    }
}
