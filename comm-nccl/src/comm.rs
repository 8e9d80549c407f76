//! [`NcclCommunicator`]: the [`DeviceCommunicator`] for CUDA tensors.

use std::cell::Cell;
use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use comm_core::{
    check, CommError, DType, Deadline, Device, DeviceCommunicator, ReduceOp, Result, Store, Tensor,
};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaEvent, CudaGraph, CudaStream, DevicePtr, DevicePtrMut};

use crate::cuda::{cuda_err, CudaDevice, CudaStorage};
use crate::raw::{
    Backoff, CudaStreamHandle, NcclDataType, NcclLibrary, NcclRedOp, NcclResultCode, NcclUniqueId,
    RawComm, NCCL_IN_PROGRESS, NCCL_SUCCESS,
};

/// How an [`NcclCommunicator`] is set up.
#[derive(Debug, Clone)]
pub struct NcclOptions {
    /// CUDA device ordinal this member uses.
    pub device: usize,
    /// Deadline for set-up and for each blocking operation.
    pub timeout: Duration,
    /// Store key under which rank 0 publishes the unique id. Use a distinct
    /// key (or a prefixed store) per communicator sharing one store.
    pub key: String,
    /// Name used in error messages (e.g. `tp:0`).
    pub label: String,
    /// When true (default) every operation waits, with the deadline, until
    /// its work on the stream is complete, so a missing peer is a `Timeout`.
    /// When false operations only enqueue; ordering with other streams is
    /// kept by cudarc's per-buffer events, and errors surface at the next
    /// blocking call (barrier, copies to host).
    pub synchronous: bool,
}

impl Default for NcclOptions {
    fn default() -> Self {
        NcclOptions {
            device: 0,
            timeout: comm_core::default_timeout(),
            key: "nccl/unique_id".into(),
            label: "nccl".into(),
            synchronous: true,
        }
    }
}

/// A member of an NCCL communicator, moving CUDA tensors made by
/// [`CudaDevice`].
///
/// Operations are enqueued on the communicator's own stream; by default
/// each then waits for completion while polling `ncclCommGetAsyncError`,
/// and aborts the communicator when the deadline passes.
///
/// `Send` but not `Sync`: one thread drives it at a time.
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
    lib: &'static NcclLibrary,
    comm: RawComm,
    dev: Arc<CudaDevice>,
    main_stream: Arc<CudaStream>,
    stream: Arc<CudaStream>,
    done: CudaEvent,
    barrier_buf: Option<Tensor>,
    rank: usize,
    world: usize,
    timeout: Duration,
    synchronous: bool,
    capturing: bool,
    label: String,
    broken: Option<String>,
    _not_sync: PhantomData<Cell<()>>,
}

impl NcclCommunicator {
    /// Joins the communicator: rank 0 creates the unique id and publishes it
    /// in `store` under `opts.key`, every member initialises non-blocking and
    /// polls until ready or `opts.timeout` (then `Timeout`, communicator
    /// aborted), then a warm-up all_reduce runs.
    ///
    /// `BackendUnavailable` when libcuda or libnccl cannot be used.
    /// `store` is any [`Store`] (e.g. an `Arc<dyn Store>`, usually prefixed
    /// per group); it is only used during set-up.
    pub fn new(store: impl Store, rank: usize, world: usize, opts: NcclOptions) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(CommError::invalid(format!(
                "NCCL communicator: rank {rank} is out of range for a group of {world}"
            )));
        }
        let deadline = Deadline::after(opts.timeout);
        let dev = CudaDevice::get(opts.device)?;
        let lib = NcclLibrary::load()?;
        dev.bind()?;
        let id = if rank == 0 {
            let id = lib.get_unique_id()?;
            store.set(&opts.key, id.as_bytes())?;
            id
        } else {
            let bytes = store.get(&opts.key, deadline.remaining())?;
            let id = NcclUniqueId::from_bytes(&bytes)?;
            let readers_key = format!("{}/readers", opts.key);
            if store.add(&readers_key, 1)? == (world - 1) as i64 {
                let _ = store.delete(&opts.key);
                let _ = store.delete(&readers_key);
            }
            id
        };
        let comm = RawComm::init(lib, &id, rank, world, &deadline, &opts.label)?;
        let main_stream = dev
            .context()
            .new_stream()
            .map_err(|e| cuda_err("creating the NCCL stream", e))?;
        let done = dev
            .context()
            .new_event(None)
            .map_err(|e| cuda_err("creating an event", e))?;
        let mut c = NcclCommunicator {
            lib,
            comm,
            dev: dev.clone(),
            stream: main_stream.clone(),
            main_stream,
            done,
            barrier_buf: None,
            rank,
            world,
            timeout: opts.timeout,
            synchronous: opts.synchronous,
            capturing: false,
            label: opts.label,
            broken: None,
            _not_sync: PhantomData,
        };
        c.barrier_buf = Some(dev.zeros([1], DType::F32)?);
        // Warm-up: the first collective sets up NCCL's connections.
        c.barrier()?;
        Ok(c)
    }

    /// The device this member uses.
    pub fn cuda_device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }
    /// The stream operations are enqueued on (the side stream during graph capture).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// The NCCL library in use.
    pub fn library(&self) -> &'static NcclLibrary {
        self.lib
    }
    /// Why the communicator is unusable, after a fatal error.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// Aborts the communicator (`ncclCommAbort`); every later call fails.
    pub fn abort(&mut self, why: &str) {
        self.comm.abort();
        if self.broken.is_none() {
            self.broken = Some(why.to_string());
        }
    }

    /// Blocks until all work enqueued so far has completed, with the deadline.
    pub fn synchronize(&mut self) -> Result<()> {
        self.ready("synchronize")?;
        self.wait_stream("synchronize")
    }

    /// A graph-capture context: operations on this communicator go to a side
    /// stream (forked from the main stream) until the context is dropped, and
    /// [`GraphCapture::begin_capture`] / [`GraphCapture::end_capture`] record
    /// them into a CUDA graph. While capturing, operations do not wait.
    pub fn graph_capture(&mut self) -> Result<GraphCapture<'_>> {
        self.ready("graph_capture")?;
        let side = self
            .main_stream
            .fork()
            .map_err(|e| cuda_err("creating the graph-capture stream", e))?;
        self.stream = side.clone();
        Ok(GraphCapture {
            comm: self,
            side,
            capturing: false,
        })
    }

    fn ready(&self, op: &str) -> Result<()> {
        if let Some(why) = &self.broken {
            return Err(CommError::Aborted(format!(
                "{op} on NCCL communicator {}: it was aborted earlier ({why})",
                self.label
            )));
        }
        self.dev.bind()
    }

    fn op_name(&self, op: &str) -> String {
        format!(
            "{op} on {} (rank {} of {})",
            self.label, self.rank, self.world
        )
    }

    fn fail(&mut self, e: CommError) -> CommError {
        if e.is_fatal() {
            self.abort(&e.to_string());
        }
        e
    }

    /// After an NCCL call: map errors, let a non-blocking call settle, then
    /// (synchronous mode) wait for the stream.
    fn finish(&mut self, op: &str, rc: NcclResultCode) -> Result<()> {
        let name = self.op_name(op);
        if rc != NCCL_SUCCESS && rc != NCCL_IN_PROGRESS {
            let e = self.comm.error(rc, &name);
            return Err(self.fail(e));
        }
        if rc == NCCL_IN_PROGRESS {
            let deadline = Deadline::after(self.timeout);
            let world = self.world;
            let r = self.comm.wait_ready(&deadline, &name, &|| {
                vec![format!("some of the {world} members")]
            });
            if let Err(e) = r {
                return Err(self.fail(e));
            }
        }
        if self.synchronous && !self.capturing {
            self.wait_stream(op)?;
        }
        Ok(())
    }

    fn wait_stream(&mut self, op: &str) -> Result<()> {
        if self.capturing {
            return Ok(());
        }
        let name = self.op_name(op);
        if let Err(e) = self.done.record(&self.stream) {
            let e = cuda_err(&name, e);
            return Err(self.fail(e));
        }
        let deadline = Deadline::after(self.timeout);
        let mut backoff = Backoff::default();
        loop {
            match self.done.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    let e = cuda_err(&name, e);
                    return Err(self.fail(e));
                }
            }
            match self.comm.async_state() {
                Ok(NCCL_SUCCESS) | Ok(NCCL_IN_PROGRESS) => {}
                Ok(code) => {
                    let e = self.comm.error(code, &name);
                    return Err(self.fail(e));
                }
                Err(e) => return Err(self.fail(e)),
            }
            if deadline.expired() {
                let e = CommError::timeout(
                    name,
                    deadline.elapsed(),
                    [format!(
                        "one or more of the {} members of {} (the NCCL communicator was aborted)",
                        self.world, self.label
                    )],
                );
                return Err(self.fail(e));
            }
            backoff.snooze();
        }
    }

    fn check_cuda(&self, op: &str, t: &Tensor) -> Result<()> {
        check::device(op, t, Device::Cuda(self.dev.ordinal()))
    }

    fn cs(stream: &CudaStream) -> CudaStreamHandle {
        stream.cu_stream() as CudaStreamHandle
    }

    /// Runs `body` between ncclGroupStart and ncclGroupEnd; the first
    /// failing code wins, and the group is always closed.
    fn grouped(&self, body: impl FnOnce() -> NcclResultCode) -> NcclResultCode {
        let api = self.lib.api();
        // SAFETY: no arguments; opens a group on this thread.
        let rc = unsafe { (api.group_start)() };
        if rc != NCCL_SUCCESS {
            return rc;
        }
        let rc = body();
        // SAFETY: closes the group opened above.
        let end = unsafe { (api.group_end)() };
        if rc != NCCL_SUCCESS && rc != NCCL_IN_PROGRESS {
            rc
        } else {
            end
        }
    }

    fn copy_dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: both ranges lie inside live allocations whose uses are
        // ordered on `self.stream` by the caller's pointer guards.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream())
        }
        .map_err(|e| cuda_err("device-to-device copy", e))
    }
}

fn dt(t: &Tensor) -> NcclDataType {
    t.dtype().into()
}

impl DeviceCommunicator for NcclCommunicator {
    fn backend(&self) -> &'static str {
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
    fn timeout(&self) -> Duration {
        self.timeout
    }
    fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    fn all_reduce(&mut self, tensor: &mut Tensor, op: ReduceOp) -> Result<()> {
        self.ready("all_reduce")?;
        self.check_cuda("all_reduce", tensor)?;
        if tensor.numel() == 0 {
            return Ok(());
        }
        let (n, d) = (tensor.numel(), dt(tensor));
        let stream = self.stream.clone();
        let (api, h) = (self.lib.api(), self.comm.handle());
        let rc = {
            let buf = CudaStorage::of_mut(tensor)?;
            let (p, _g) = buf.slice_mut().device_ptr_mut(&stream);
            // SAFETY: in-place all-reduce over `n` elements of the buffer
            // `p` (exactly `n * size` bytes), enqueued on `stream`; the guard
            // records the write after the call.
            unsafe {
                (api.all_reduce)(
                    p as *const c_void,
                    p as *mut c_void,
                    n,
                    d,
                    NcclRedOp::from(op),
                    h,
                    Self::cs(&stream),
                )
            }
        };
        self.finish("all_reduce", rc)
    }

    fn all_gather(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()> {
        self.ready("all_gather")?;
        self.check_cuda("all_gather", input)?;
        self.check_cuda("all_gather", output)?;
        check::gathered("all_gather", input, output, self.world)?;
        if input.numel() == 0 {
            return Ok(());
        }
        let (n, d) = (input.numel(), dt(input));
        let stream = self.stream.clone();
        let (api, h) = (self.lib.api(), self.comm.handle());
        let rc = {
            let src = CudaStorage::of(input)?;
            let dst = CudaStorage::of_mut(output)?;
            let (sp, _g1) = src.slice().device_ptr(&stream);
            let (dp, _g2) = dst.slice_mut().device_ptr_mut(&stream);
            // SAFETY: `sp` holds `n` elements and `dp` `world * n` (checked).
            unsafe {
                (api.all_gather)(
                    sp as *const c_void,
                    dp as *mut c_void,
                    n,
                    d,
                    h,
                    Self::cs(&stream),
                )
            }
        };
        self.finish("all_gather", rc)
    }

    fn reduce_scatter(&mut self, input: &Tensor, output: &mut Tensor, op: ReduceOp) -> Result<()> {
        self.ready("reduce_scatter")?;
        self.check_cuda("reduce_scatter", input)?;
        self.check_cuda("reduce_scatter", output)?;
        check::scattered("reduce_scatter", input, output, self.world)?;
        if output.numel() == 0 {
            return Ok(());
        }
        let (n, d) = (output.numel(), dt(output));
        let stream = self.stream.clone();
        let (api, h) = (self.lib.api(), self.comm.handle());
        let rc = {
            let src = CudaStorage::of(input)?;
            let dst = CudaStorage::of_mut(output)?;
            let (sp, _g1) = src.slice().device_ptr(&stream);
            let (dp, _g2) = dst.slice_mut().device_ptr_mut(&stream);
            // SAFETY: `sp` holds `world * n` elements and `dp` `n` (checked).
            unsafe {
                (api.reduce_scatter)(
                    sp as *const c_void,
                    dp as *mut c_void,
                    n,
                    d,
                    NcclRedOp::from(op),
                    h,
                    Self::cs(&stream),
                )
            }
        };
        self.finish("reduce_scatter", rc)
    }

    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<()> {
        self.ready("broadcast")?;
        self.check_cuda("broadcast", tensor)?;
        check::root("broadcast", root, self.world)?;
        if tensor.numel() == 0 {
            return Ok(());
        }
        let (n, d) = (tensor.numel(), dt(tensor));
        let stream = self.stream.clone();
        let (api, h) = (self.lib.api(), self.comm.handle());
        let rc = {
            let buf = CudaStorage::of_mut(tensor)?;
            let (p, _g) = buf.slice_mut().device_ptr_mut(&stream);
            // SAFETY: in-place broadcast of `n` elements of `p`.
            unsafe {
                (api.broadcast)(
                    p as *const c_void,
                    p as *mut c_void,
                    n,
                    d,
                    root as i32,
                    h,
                    Self::cs(&stream),
                )
            }
        };
        self.finish("broadcast", rc)
    }

    fn gather(&mut self, input: &Tensor, output: Option<&mut Tensor>, root: usize) -> Result<()> {
        self.ready("gather")?;
        self.check_cuda("gather", input)?;
        check::root("gather", root, self.world)?;
        let (n, d) = (input.numel(), dt(input));
        let bytes = input.nbytes();
        let stream = self.stream.clone();
        let (api, h) = (self.lib.api(), self.comm.handle());
        let rc = if self.rank == root {
            let out =
                output.ok_or_else(|| CommError::invalid("gather: the root must pass an output"))?;
            self.check_cuda("gather", out)?;
            check::gathered("gather", input, out, self.world)?;
            if n == 0 {
                return Ok(());
            }
            let src = CudaStorage::of(input)?;
            let dst = CudaStorage::of_mut(out)?;
            let (sp, _g1) = src.slice().device_ptr(&stream);
            let (dp, _g2) = dst.slice_mut().device_ptr_mut(&stream);
            self.copy_dtod(dp + (root * bytes) as u64, sp, bytes)?;
            self.grouped(|| {
                for r in (0..self.world).filter(|&r| r != root) {
                    // SAFETY: block `r` of the output (`n` elements) lies
                    // inside `dp`, which holds `world * n` (checked).
                    let rc = unsafe {
                        (api.recv)(
                            (dp + (r * bytes) as u64) as *mut c_void,
                            n,
                            d,
                            r as i32,
                            h,
                            Self::cs(&stream),
                        )
                    };
                    if rc != NCCL_SUCCESS && rc != NCCL_IN_PROGRESS {
                        return rc;
                    }
                }
                NCCL_SUCCESS
            })
        } else {
            if n == 0 {
                return Ok(());
            }
            let src = CudaStorage::of(input)?;
            let (sp, _g1) = src.slice().device_ptr(&stream);
            // SAFETY: sends the `n` elements of `sp` to the root.
            unsafe { (api.send)(sp as *const c_void, n, d, root as i32, h, Self::cs(&stream)) }
        };
        self.finish("gather", rc)
    }

    fn all_to_all(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()> {
        self.ready("all_to_all")?;
        self.check_cuda("all_to_all", input)?;
        self.check_cuda("all_to_all", output)?;
        check::all_to_all(input, output, self.world)?;
        if input.numel() == 0 {
            return Ok(());
        }
        let n = input.numel() / self.world;
        let d = dt(input);
        let bytes = input.nbytes() / self.world;
        let stream = self.stream.clone();
        let (api, h, me) = (self.lib.api(), self.comm.handle(), self.rank);
        let rc = {
            let src = CudaStorage::of(input)?;
            let dst = CudaStorage::of_mut(output)?;
            let (sp, _g1) = src.slice().device_ptr(&stream);
            let (dp, _g2) = dst.slice_mut().device_ptr_mut(&stream);
            self.copy_dtod(dp + (me * bytes) as u64, sp + (me * bytes) as u64, bytes)?;
            self.grouped(|| {
                for p in (0..self.world).filter(|&p| p != me) {
                    let off = (p * bytes) as u64;
                    // SAFETY: block `p` (`n` elements) of both buffers lies
                    // inside them (equal sizes of `world * n`, checked).
                    let rc = unsafe {
                        (api.send)(
                            (sp + off) as *const c_void,
                            n,
                            d,
                            p as i32,
                            h,
                            Self::cs(&stream),
                        )
                    };
                    if rc != NCCL_SUCCESS && rc != NCCL_IN_PROGRESS {
                        return rc;
                    }
                    // SAFETY: as above.
                    let rc = unsafe {
                        (api.recv)(
                            (dp + off) as *mut c_void,
                            n,
                            d,
                            p as i32,
                            h,
                            Self::cs(&stream),
                        )
                    };
                    if rc != NCCL_SUCCESS && rc != NCCL_IN_PROGRESS {
                        return rc;
                    }
                }
                NCCL_SUCCESS
            })
        };
        self.finish("all_to_all", rc)
    }

    fn send(&mut self, tensor: &Tensor, dst: usize) -> Result<()> {
        self.ready("send")?;
        self.check_cuda("send", tensor)?;
        check::peer("send", dst, self.rank, self.world)?;
        if tensor.numel() == 0 {
            return Ok(());
        }
        let (n, d) = (tensor.numel(), dt(tensor));
        let stream = self.stream.clone();
        let (api, h) = (self.lib.api(), self.comm.handle());
        let rc = {
            let src = CudaStorage::of(tensor)?;
            let (sp, _g) = src.slice().device_ptr(&stream);
            // SAFETY: sends the `n` elements of `sp`.
            unsafe { (api.send)(sp as *const c_void, n, d, dst as i32, h, Self::cs(&stream)) }
        };
        self.finish("send", rc)
    }

    fn recv(&mut self, tensor: &mut Tensor, src: usize) -> Result<()> {
        self.ready("recv")?;
        self.check_cuda("recv", tensor)?;
        check::peer("recv", src, self.rank, self.world)?;
        if tensor.numel() == 0 {
            return Ok(());
        }
        let (n, d) = (tensor.numel(), dt(tensor));
        let stream = self.stream.clone();
        let (api, h) = (self.lib.api(), self.comm.handle());
        let rc = {
            let dst = CudaStorage::of_mut(tensor)?;
            let (dp, _g) = dst.slice_mut().device_ptr_mut(&stream);
            // SAFETY: receives `n` elements into `dp`, which holds exactly that.
            unsafe { (api.recv)(dp as *mut c_void, n, d, src as i32, h, Self::cs(&stream)) }
        };
        self.finish("recv", rc)
    }

    fn barrier(&mut self) -> Result<()> {
        self.ready("barrier")?;
        let mut buf = self
            .barrier_buf
            .take()
            .ok_or_else(|| CommError::State("barrier buffer missing".into()))?;
        let sync = std::mem::replace(&mut self.synchronous, true);
        let r = self.all_reduce(&mut buf, ReduceOp::Sum);
        self.synchronous = sync;
        self.barrier_buf = Some(buf);
        r?;
        self.wait_stream("barrier")
    }
}

impl Drop for NcclCommunicator {
    fn drop(&mut self) {
        if self.broken.is_some() || self.comm.is_closed() {
            self.comm.abort();
            return;
        }
        if self.dev.bind().is_err() {
            self.comm.abort();
            return;
        }
        // Let enqueued work drain, with a bounded deadline: a stream stuck on
        // a missing peer makes `wait_stream` time out and abort instead of
        // hanging here.
        let limit = self.timeout.min(Duration::from_secs(30));
        self.timeout = limit;
        self.capturing = false;
        self.stream = self.main_stream.clone();
        if self.wait_stream("drop").is_err() || self.comm.is_closed() {
            self.comm.abort();
            return;
        }
        // Finalize + destroy; aborts by itself when finalize fails or times out.
        let _ = self.comm.shutdown(&Deadline::after(limit));
    }
}

/// Graph-capture context from [`NcclCommunicator::graph_capture`]: the
/// communicator's operations go to [`GraphCapture::stream`] while it lives.
/// Dropping it ends any unfinished capture (discarding the graph), makes the
/// main stream wait for the side stream and restores it.
#[derive(Debug)]
pub struct GraphCapture<'a> {
    comm: &'a mut NcclCommunicator,
    side: Arc<CudaStream>,
    capturing: bool,
}

impl GraphCapture<'_> {
    /// The side stream (for other work to be captured alongside).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.side
    }
    /// The communicator, whose operations now use the side stream.
    pub fn comm(&mut self) -> &mut NcclCommunicator {
        self.comm
    }
    /// Starts capturing the side stream (thread-local capture mode).
    pub fn begin_capture(&mut self) -> Result<()> {
        self.comm.ready("begin_capture")?;
        self.side
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| cuda_err("cuStreamBeginCapture", e))?;
        self.capturing = true;
        self.comm.capturing = true;
        Ok(())
    }
    /// Ends the capture and instantiates the graph (`None` when empty).
    pub fn end_capture(&mut self) -> Result<Option<CudaGraph>> {
        if !self.capturing {
            return Err(CommError::State("end_capture without begin_capture".into()));
        }
        self.capturing = false;
        self.comm.capturing = false;
        self.side
            .end_capture(CUgraphInstantiate_flags(0))
            .map_err(|e| cuda_err("cuStreamEndCapture", e))
    }
}

impl Drop for GraphCapture<'_> {
    fn drop(&mut self) {
        if self.capturing {
            let _ = self.end_capture();
        }
        let _ = self.comm.main_stream.join(&self.side);
        self.comm.stream = self.comm.main_stream.clone();
    }
}
