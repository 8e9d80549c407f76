//! The checked front: the one wrapper every backend passes through.
//!
//! [`Communicator`] owns what used to be repeated in each backend: argument
//! checks, the one-member and empty shortcuts, `Avg` for backends without
//! it, host staging of device memory for host backends, call descriptions
//! and their sequence numbers, refusal after a fatal error (and telling the
//! peers), group context on every error (global ranks, group name), the
//! flight recorder, and asynchronous operations ([`Communicator::scope`]).
//! Backends ([`DeviceCommunicator`]) only move bytes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::backend::{BlockLayout, Capabilities, DeviceCommunicator, Fence, P2p};
use crate::buffer::{BufMut, BufRef, Mem, MemMut};
use crate::engine::Engine;
use crate::recorder::{CallState, Recorder, FLIGHT_RECORDER_ENV};
use crate::stage::{finish_avg, with_in, with_out};
use crate::{
    check, AsBuf, AsBufMut, Call, CallDesc, Collective, CommError, DType, Deadline, Device,
    HostBuffer, ReduceOp, Result, Store,
};

/// How a [`Communicator`] wraps its backend. `#[non_exhaustive]`: start
/// from [`FrontOptions::new`] and use the builder methods.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct FrontOptions {
    /// The group's name, used in every error and log line (`tp:0`).
    pub group_name: String,
    /// Global rank of each group rank (empty: unknown, errors show group ranks).
    pub global_ranks: Vec<usize>,
    /// Deadline of each operation.
    pub timeout: Duration,
    /// A store namespaced for this communicator: on a timeout the members
    /// exchange their positions through it, so the error says where their
    /// call sequences diverge.
    pub store: Option<Arc<dyn Store>>,
    /// A host communicator of the same members, used to cross-check call
    /// descriptions when the backend does not carry them itself.
    pub verifier: Option<Communicator>,
    /// Asynchronous backends: wait for completion after every call.
    pub synchronous: bool,
}

impl FrontOptions {
    /// Options for the group `group_name` with the default deadline.
    pub fn new(group_name: impl Into<String>) -> Self {
        FrontOptions {
            group_name: group_name.into(),
            global_ranks: Vec::new(),
            timeout: crate::default_timeout(),
            store: None,
            verifier: None,
            synchronous: false,
        }
    }
    /// With the global rank of each group rank.
    pub fn global_ranks(mut self, ranks: Vec<usize>) -> Self {
        self.global_ranks = ranks;
        self
    }
    /// With a deadline per operation.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
    /// With a store for the timeout diagnosis.
    pub fn store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }
    /// With a host communicator to cross-check call descriptions.
    pub fn verifier(mut self, verifier: Communicator) -> Self {
        self.verifier = Some(verifier);
        self
    }
    /// Asynchronous backends wait after every call when `yes`.
    pub fn synchronous(mut self, yes: bool) -> Self {
        self.synchronous = yes;
        self
    }
}

/// What a group-level layout operation adds to the description of the flat
/// call that carries it, so members also cross-check shapes and modes.
#[derive(Debug, Clone, Copy)]
pub struct Layout<'a> {
    /// The group-level operation (`AllToAll4d`, `AllGatherDim`, ...).
    pub op: Collective,
    /// The caller's shape.
    pub shape: &'a [usize],
    /// Mode or dimension (see [`CallDesc::arg`]).
    pub arg: u32,
}

/// One message of a batch ([`Communicator::batch_send_recv`],
/// [`Scope::batch_isend_irecv`](crate::Scope::batch_isend_irecv)).
#[derive(Debug)]
pub enum P2pOp<'a> {
    /// Send to a group rank.
    Send(BufRef<'a>, usize),
    /// Receive from a group rank.
    Recv(BufMut<'a>, usize),
}

impl<'a> P2pOp<'a> {
    /// Sends `buf` to group rank `peer`.
    pub fn send<B: AsBuf + ?Sized>(buf: &'a B, peer: usize) -> Result<Self> {
        Ok(P2pOp::Send(buf.as_buf()?, peer))
    }
    /// Receives from group rank `peer` into `buf`.
    pub fn recv<B: AsBufMut + ?Sized>(buf: &'a mut B, peer: usize) -> Result<Self> {
        Ok(P2pOp::Recv(buf.as_buf_mut()?, peer))
    }
}

/// A call ready to run: checked, with its arguments.
#[derive(Debug)]
pub(crate) enum Op<'a> {
    AllReduce(BufMut<'a>, ReduceOp),
    AllGather(BufRef<'a>, BufMut<'a>),
    ReduceScatter(BufRef<'a>, BufMut<'a>, ReduceOp),
    Broadcast(BufMut<'a>, usize),
    Gather(BufRef<'a>, Option<BufMut<'a>>, usize),
    AllToAll(BufRef<'a>, BufMut<'a>),
    AllToAllStrided(BufRef<'a>, BlockLayout, BufMut<'a>, BlockLayout),
    SendRecv(Vec<P2p<'a>>),
    Barrier,
}

/// The backend and what only the thread driving it touches, behind one
/// lock held for the length of a call.
pub(crate) struct State {
    pub(crate) comm: Box<dyn DeviceCommunicator>,
    recorder: Recorder,
    stage: [HostBuffer; 2],
    p2p_stage: Vec<HostBuffer>,
}

/// Call numbering, behind its own short lock so that starting an operation
/// never waits for one that is running.
struct Numbers {
    seq: u64,
    sent: Vec<u64>,
    received: Vec<u64>,
}

pub(crate) struct Inner {
    pub(crate) name: String,
    pub(crate) backend: String,
    pub(crate) rank: usize,
    pub(crate) world: usize,
    pub(crate) device: Device,
    pub(crate) caps: Capabilities,
    global: Vec<usize>,
    label: String,
    store: Option<Arc<dyn Store>>,
    verifier: Option<Communicator>,
    timeout_ns: AtomicU64,
    synchronous: AtomicBool,
    numbers: Mutex<Numbers>,
    poisoned: Mutex<Option<CommError>>,
    pub(crate) state: Mutex<State>,
    pub(crate) engine: Engine,
}

/// A member of a group: a backend behind the checked front.
///
/// Every collective takes buffers the caller owns (anything [`AsBuf`] /
/// [`AsBufMut`]: slices, vectors, [`Tensor`](crate::Tensor)s, cudarc
/// device memory with the `cuda` feature). It is `Send + Sync` and cheap to
/// clone (clones share the member); calls from several threads are
/// serialised, and every member must make the same calls in the same order.
///
/// ```
/// use comm_core::{Communicator, FrontOptions, ReduceOp, SingleRank};
/// let c = Communicator::new(Box::new(SingleRank::new()), FrontOptions::new("demo"));
/// let mut v = vec![1.0f32, 2.0];
/// c.all_reduce(&mut v, ReduceOp::Avg).unwrap();
/// let mut out = vec![0.0f32; 2];
/// c.all_gather(&v, &mut out).unwrap();
/// assert_eq!(out, v);
/// ```
#[derive(Clone)]
pub struct Communicator {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Communicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Communicator")
            .field("group", &self.inner.name)
            .field("backend", &self.inner.backend)
            .field("rank", &self.inner.rank)
            .field("world", &self.inner.world)
            .field("device", &self.inner.device)
            .finish()
    }
}

fn poisoned_lock<T>(_: T) -> CommError {
    CommError::State("a communicator's lock was poisoned by a panic on another thread".into())
}

impl Communicator {
    /// Wraps `backend`.
    pub fn new(backend: Box<dyn DeviceCommunicator>, opts: FrontOptions) -> Self {
        let world = backend.world_size();
        let label = format!("{} group `{}`", backend.backend(), opts.group_name);
        let state = State {
            recorder: Recorder::from_env(),
            stage: [HostBuffer::zeroed(0), HostBuffer::zeroed(0)],
            p2p_stage: Vec::new(),
            comm: backend,
        };
        Communicator {
            inner: Arc::new(Inner {
                name: opts.group_name,
                backend: state.comm.backend().to_string(),
                rank: state.comm.rank(),
                world,
                device: state.comm.device(),
                caps: state.comm.capabilities(),
                global: opts.global_ranks,
                label,
                store: opts.store,
                verifier: opts.verifier,
                timeout_ns: AtomicU64::new(duration_ns(opts.timeout)),
                synchronous: AtomicBool::new(opts.synchronous),
                numbers: Mutex::new(Numbers {
                    seq: 0,
                    sent: vec![0; world],
                    received: vec![0; world],
                }),
                poisoned: Mutex::new(None),
                state: Mutex::new(state),
                engine: Engine::default(),
            }),
        }
    }

    /// The backend's name.
    pub fn backend(&self) -> &str {
        &self.inner.backend
    }
    /// The group's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }
    /// This member's group rank.
    pub fn rank(&self) -> usize {
        self.inner.rank
    }
    /// Number of members.
    pub fn world_size(&self) -> usize {
        self.inner.world
    }
    /// The memory the backend moves (`Device::Cpu` for host backends, which
    /// also accept device buffers by staging them).
    pub fn device(&self) -> Device {
        self.inner.device
    }
    /// The backend's capabilities.
    pub fn capabilities(&self) -> Capabilities {
        self.inner.caps
    }
    /// Global rank of each group rank (empty when not given).
    pub fn global_ranks(&self) -> &[usize] {
        &self.inner.global
    }
    /// The deadline of each operation.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout()
    }
    /// Changes the deadline of each operation.
    pub fn set_timeout(&self, timeout: Duration) {
        self.inner
            .timeout_ns
            .store(duration_ns(timeout), Ordering::Relaxed);
    }
    /// Asynchronous backends: whether each call waits for completion.
    pub fn set_synchronous(&self, yes: bool) {
        self.inner.synchronous.store(yes, Ordering::Relaxed);
    }
    /// The error that made this member unusable, if any.
    pub fn poisoned(&self) -> Option<CommError> {
        self.inner.poisoned()
    }
    /// The flight record: the last calls and how they ended.
    pub fn flight_record(&self) -> String {
        match self.inner.lock() {
            Ok(s) => s.recorder.dump(&self.inner.label),
            Err(e) => e.to_string(),
        }
    }

    /// Runs `f` on the backend itself (after every queued asynchronous
    /// operation has finished), e.g. to reach a CUDA stream through
    /// [`DeviceCommunicator::as_any_mut`].
    pub fn with_backend<R>(&self, f: impl FnOnce(&mut dyn DeviceCommunicator) -> R) -> Result<R> {
        let mut st = self.inner.idle_state()?;
        Ok(f(st.comm.as_mut()))
    }

    /// Gives up on the group: peers are told (with `reason`) and every later
    /// call fails.
    pub fn abort(&self, reason: &str) -> Result<()> {
        self.abort_for(&CommError::Aborted(format!(
            "{} aborted by this rank: {reason}",
            self.inner.label
        )))
    }

    /// Gives up on the group because of `why`, an error this rank met
    /// outside it (the set-up of another group, say). Peers are told, with
    /// the ranks `why` blames read as this group's ranks, so that a peer
    /// waiting in a call here reports those ranks rather than this one; every
    /// later call here fails with `why`.
    pub fn abort_for(&self, why: &CommError) -> Result<()> {
        if self.inner.poison(why) {
            self.inner.lock()?.comm.abort(why);
        }
        Ok(())
    }

    // ------------------------------------------------------------ collectives

    /// In place: every member ends with the reduction of all members' `buf`.
    pub fn all_reduce<B: AsBufMut + ?Sized>(&self, buf: &mut B, op: ReduceOp) -> Result<()> {
        let b = buf.as_buf_mut()?;
        self.inner.on_device("all_reduce", b.device())?;
        let desc = (Collective::AllReduce, b.dtype(), b.numel(), None, Some(op));
        let run = self.inner.world > 1 && b.numel() > 0;
        self.inner
            .run_blocking(desc, None, run.then_some(Op::AllReduce(b, op)))
    }

    /// `output` (`world * input` elements) receives every member's `input`,
    /// in group-rank order.
    pub fn all_gather<I: AsBuf + ?Sized, O: AsBufMut + ?Sized>(
        &self,
        input: &I,
        output: &mut O,
    ) -> Result<()> {
        self.all_gather_with(input, output, None)
    }

    /// [`all_gather`](Self::all_gather) described as a layout operation.
    pub fn all_gather_with<I: AsBuf + ?Sized, O: AsBufMut + ?Sized>(
        &self,
        input: &I,
        output: &mut O,
        layout: Option<Layout<'_>>,
    ) -> Result<()> {
        let (i, mut o) = (input.as_buf()?, output.as_buf_mut()?);
        let (desc, run) = self
            .inner
            .prepare_copying(Collective::AllGather, None, &i, &mut o)?;
        self.inner
            .run_blocking(desc, layout, run.then_some(Op::AllGather(i, o)))
    }

    /// `input` holds `world` blocks; member `r` gets in `output` the
    /// reduction of block `r` over all members.
    pub fn reduce_scatter<I: AsBuf + ?Sized, O: AsBufMut + ?Sized>(
        &self,
        input: &I,
        output: &mut O,
        op: ReduceOp,
    ) -> Result<()> {
        self.reduce_scatter_with(input, output, op, None)
    }

    /// [`reduce_scatter`](Self::reduce_scatter) described as a layout operation.
    pub fn reduce_scatter_with<I: AsBuf + ?Sized, O: AsBufMut + ?Sized>(
        &self,
        input: &I,
        output: &mut O,
        op: ReduceOp,
        layout: Option<Layout<'_>>,
    ) -> Result<()> {
        let (i, mut o) = (input.as_buf()?, output.as_buf_mut()?);
        self.inner.on_device("reduce_scatter", i.device())?;
        self.inner.on_device("reduce_scatter", o.device())?;
        check::scattered("reduce_scatter", &i, &o, self.inner.world)?;
        let desc = (
            Collective::ReduceScatter,
            i.dtype(),
            i.numel(),
            None,
            Some(op),
        );
        if self.inner.world == 1 {
            o.mem().copy_from(i.mem())?;
        }
        let run = self.inner.world > 1 && o.numel() > 0;
        self.inner
            .run_blocking(desc, layout, run.then_some(Op::ReduceScatter(i, o, op)))
    }

    /// `buf` on every member becomes group rank `root`'s.
    pub fn broadcast<B: AsBufMut + ?Sized>(&self, buf: &mut B, root: usize) -> Result<()> {
        self.broadcast_with(buf, root, None)
    }

    /// [`broadcast`](Self::broadcast) described as a group-level operation.
    pub fn broadcast_with<B: AsBufMut + ?Sized>(
        &self,
        buf: &mut B,
        root: usize,
        layout: Option<Layout<'_>>,
    ) -> Result<()> {
        let b = buf.as_buf_mut()?;
        self.inner.on_device("broadcast", b.device())?;
        check::root("broadcast", root, self.inner.world)?;
        let desc = (
            Collective::Broadcast,
            b.dtype(),
            b.numel(),
            Some(root),
            None,
        );
        let run = self.inner.world > 1 && b.numel() > 0;
        self.inner
            .run_blocking(desc, layout, run.then_some(Op::Broadcast(b, root)))
    }

    /// Group rank `root`'s `output` (`world * input` elements) receives every
    /// member's `input` in rank order; the other members pass `None`.
    pub fn gather<I: AsBuf + ?Sized, O: AsBufMut + ?Sized>(
        &self,
        input: &I,
        output: Option<&mut O>,
        root: usize,
    ) -> Result<()> {
        self.gather_with(input, output, root, None)
    }

    /// [`gather`](Self::gather) described as a layout operation.
    pub fn gather_with<I: AsBuf + ?Sized, O: AsBufMut + ?Sized>(
        &self,
        input: &I,
        output: Option<&mut O>,
        root: usize,
        layout: Option<Layout<'_>>,
    ) -> Result<()> {
        let i = input.as_buf()?;
        self.inner.on_device("gather", i.device())?;
        check::root("gather", root, self.inner.world)?;
        let is_root = self.inner.rank == root;
        let o = match (output, is_root) {
            (Some(o), true) => {
                let o = o.as_buf_mut()?;
                self.inner.on_device("gather", o.device())?;
                check::gathered("gather", &i, &o, self.inner.world)?;
                Some(o)
            }
            (None, true) => {
                return Err(CommError::invalid(
                    "gather: the root must pass an output buffer",
                ))
            }
            (_, false) => None,
        };
        let desc = (Collective::Gather, i.dtype(), i.numel(), Some(root), None);
        if self.inner.world == 1 {
            if let Some(mut o) = o {
                o.mem().copy_from(i.mem())?;
            }
            return self.inner.run_blocking(desc, layout, None);
        }
        let run = i.numel() > 0;
        self.inner
            .run_blocking(desc, layout, run.then_some(Op::Gather(i, o, root)))
    }

    /// Equal splits: block `j` of `input` goes to group rank `j`; block `i`
    /// of `output` comes from group rank `i`.
    pub fn all_to_all<I: AsBuf + ?Sized, O: AsBufMut + ?Sized>(
        &self,
        input: &I,
        output: &mut O,
    ) -> Result<()> {
        self.all_to_all_with(input, output, None)
    }

    /// [`all_to_all`](Self::all_to_all) described as a layout operation
    /// (all_to_all_4d carries its shape and mode this way).
    pub fn all_to_all_with<I: AsBuf + ?Sized, O: AsBufMut + ?Sized>(
        &self,
        input: &I,
        output: &mut O,
        layout: Option<Layout<'_>>,
    ) -> Result<()> {
        let (i, mut o) = (input.as_buf()?, output.as_buf_mut()?);
        let (desc, run) = self
            .inner
            .prepare_copying(Collective::AllToAll, None, &i, &mut o)?;
        self.inner
            .run_blocking(desc, layout, run.then_some(Op::AllToAll(i, o)))
    }

    /// All-to-all of strided blocks (see [`BlockLayout`]): block `j` of
    /// `input` at `send` goes to group rank `j`; block `i` of `output` at
    /// `recv` comes from group rank `i`. Backends that can read and write
    /// strided places directly do so (no extra copy); for the others the
    /// front packs blocks into reused workspaces around a flat all-to-all.
    pub fn all_to_all_strided<I: AsBuf + ?Sized, O: AsBufMut + ?Sized>(
        &self,
        input: &I,
        send: BlockLayout,
        output: &mut O,
        recv: BlockLayout,
        layout: Option<Layout<'_>>,
    ) -> Result<()> {
        let (i, o) = (input.as_buf()?, output.as_buf_mut()?);
        let world = self.inner.world;
        self.inner.on_device("all_to_all", i.device())?;
        self.inner.on_device("all_to_all", o.device())?;
        if i.dtype() != o.dtype() {
            return Err(CommError::DTypeMismatch {
                operation: "all_to_all (strided)".into(),
                expected: i.dtype().to_string(),
                actual: o.dtype().to_string(),
            });
        }
        send.check(i.numel(), world)?;
        recv.check(o.numel(), world)?;
        if send.block_len() != recv.block_len() {
            return Err(CommError::shape(
                "all_to_all (strided)",
                format!("receive blocks of {} elements", send.block_len()),
                format!("{} elements", recv.block_len()),
            ));
        }
        let n = world * send.block_len();
        let desc = (Collective::AllToAll, i.dtype(), n, None, None);
        if world == 1 || n == 0 {
            if n > 0 {
                // One member: its own block, moved in place.
                let es = i.dtype().size();
                let mut st = self.inner.lock()?;
                let State {
                    stage: [a, b],
                    p2p_stage,
                    ..
                } = &mut *st;
                if p2p_stage.is_empty() {
                    p2p_stage.push(HostBuffer::zeroed(0));
                }
                // A reused workspace: nothing is allocated per call.
                let ws = &mut p2p_stage[0];
                ws.reuse(send.block_len() * es);
                crate::stage::with_in(true, i, a, |i| {
                    send.gather(i.expect_host("all_to_all")?, 0, es, ws.as_bytes_mut());
                    crate::stage::with_out(true, o, b, true, |mut o| {
                        recv.scatter(ws.as_bytes(), 0, es, o.expect_host("all_to_all")?);
                        Ok(())
                    })
                })?;
            }
            return self.inner.run_blocking(desc, layout, None);
        }
        self.inner
            .run_blocking(desc, layout, Some(Op::AllToAllStrided(i, send, o, recv)))
    }

    /// Sends `buf` to group rank `dst`; it arrives in order with other
    /// messages to `dst` and never mixes with collectives.
    pub fn send<B: AsBuf + ?Sized>(&self, buf: &B, dst: usize) -> Result<()> {
        self.batch_send_recv(vec![P2pOp::send(buf, dst)?])
    }

    /// Receives from group rank `src` into `buf` (the sizes must match).
    pub fn recv<B: AsBufMut + ?Sized>(&self, buf: &mut B, src: usize) -> Result<()> {
        self.batch_send_recv(vec![P2pOp::recv(buf, src)?])
    }

    /// Runs every send and receive of `ops` together (a ring exchange
    /// cannot deadlock) and returns when all are done.
    pub fn batch_send_recv(&self, ops: Vec<P2pOp<'_>>) -> Result<()> {
        let (desc, ops) = self.inner.p2p(ops)?;
        self.inner.run_prepared(desc, ops.map(Op::SendRecv))
    }

    /// Returns once every member has entered.
    pub fn barrier(&self) -> Result<()> {
        let desc = (Collective::Barrier, DType::U8, 0, None, None);
        let run = self.inner.world > 1;
        self.inner
            .run_blocking(desc, None, run.then_some(Op::Barrier))
    }

    /// Waits, with the deadline, until every operation issued so far has
    /// completed (asynchronous backends and queued operations).
    pub fn synchronize(&self) -> Result<()> {
        let mut st = self.inner.idle_state()?;
        if let Some(e) = self.inner.poisoned() {
            return Err(e);
        }
        if !self.inner.caps.asynchronous {
            return Ok(());
        }
        let desc = CallDesc::new(Collective::Barrier, 0, DType::U8, 0);
        let deadline = Deadline::after(self.inner.timeout());
        let r = self.inner.fence_and_wait(&mut st, &desc, &deadline);
        r.map_err(|e| self.inner.failed(&mut st, &desc, e))
    }
}

pub(crate) type DescParts = (Collective, DType, usize, Option<usize>, Option<ReduceOp>);

impl Inner {
    pub(crate) fn lock(&self) -> Result<MutexGuard<'_, State>> {
        self.state.lock().map_err(poisoned_lock)
    }

    /// The state, once no queued asynchronous operation is pending (so a
    /// blocking call keeps its place in the order of calls).
    pub(crate) fn idle_state(&self) -> Result<MutexGuard<'_, State>> {
        loop {
            let st = self.lock()?;
            if self.engine.is_idle() {
                return Ok(st);
            }
            drop(st);
            self.engine.wait_idle(self.timeout())?;
        }
    }

    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_nanos(self.timeout_ns.load(Ordering::Relaxed))
    }

    pub(crate) fn poisoned(&self) -> Option<CommError> {
        self.poisoned.lock().ok().and_then(|p| p.clone())
    }

    /// Marks the member unusable; true when this was the first error.
    fn poison(&self, e: &CommError) -> bool {
        match self.poisoned.lock() {
            Ok(mut p) if p.is_none() => {
                *p = Some(e.clone());
                true
            }
            _ => false,
        }
    }

    pub(crate) fn on_device(&self, op: &str, have: Device) -> Result<()> {
        check::device(op, have, self.device)
    }

    /// The checks of a call with an input and an output whose one-member
    /// result is a copy (all_gather, reduce_scatter, all_to_all): devices
    /// and sizes, and at world 1 the copy itself. Returns the description's
    /// parts and whether the backend has anything to do.
    pub(crate) fn prepare_copying(
        &self,
        op: Collective,
        reduce: Option<ReduceOp>,
        i: &BufRef<'_>,
        o: &mut BufMut<'_>,
    ) -> Result<(DescParts, bool)> {
        let name = op.name();
        self.on_device(name, i.device())?;
        self.on_device(name, o.device())?;
        match op {
            Collective::AllGather => check::gathered(name, i, o, self.world)?,
            Collective::ReduceScatter => check::scattered(name, i, o, self.world)?,
            _ => check::all_to_all(i, o, self.world)?,
        }
        if self.world == 1 {
            o.mem().copy_from(i.mem())?;
        }
        let desc = (op, i.dtype(), i.numel(), None, reduce);
        Ok((desc, self.world > 1 && i.numel() > 0))
    }

    /// The description of the next collective.
    pub(crate) fn describe(
        &self,
        parts: DescParts,
        layout: Option<Layout<'_>>,
    ) -> Result<CallDesc> {
        let (op, dtype, count, root, reduce) = parts;
        let mut n = self.numbers.lock().map_err(poisoned_lock)?;
        let mut d = CallDesc::new(op, n.seq, dtype, count);
        n.seq += 1;
        drop(n);
        if let Some(r) = root {
            d = d.with_root(r);
        }
        if let Some(r) = reduce {
            d = d.with_reduce(r);
        }
        if let Some(l) = layout {
            d.op = l.op;
            d = d.with_shape(l.shape).with_arg(l.arg);
        }
        Ok(d)
    }

    fn run_blocking(
        &self,
        parts: DescParts,
        layout: Option<Layout<'_>>,
        op: Option<Op<'_>>,
    ) -> Result<()> {
        let desc = self.describe(parts, layout)?;
        match op {
            Some(op) => self.execute(&mut *self.idle_state()?, desc, op),
            None => match self.poisoned() {
                Some(e) => Err(self.refused(&desc, &e)),
                None => Ok(()),
            },
        }
    }

    fn run_prepared(&self, desc: CallDesc, op: Option<Op<'_>>) -> Result<()> {
        let mut st = self.idle_state()?;
        match op {
            Some(op) => self.execute(&mut st, desc, op),
            None => Ok(()),
        }
    }

    /// Checks a batch of point-to-point messages and numbers each with its
    /// pair's sequence. `None` when nothing needs to move.
    pub(crate) fn p2p<'a>(&self, ops: Vec<P2pOp<'a>>) -> Result<(CallDesc, Option<Vec<P2p<'a>>>)> {
        let mut out = Vec::with_capacity(ops.len());
        let mut dtype = DType::U8;
        for op in ops {
            match op {
                P2pOp::Send(buf, peer) => {
                    check::peer("send", peer, self.rank, self.world)?;
                    self.on_device("send", buf.device())?;
                    dtype = buf.dtype();
                    let desc = CallDesc::new(Collective::Send, 0, buf.dtype(), buf.numel())
                        .with_root(peer);
                    out.push(P2p::Send { peer, buf, desc });
                }
                P2pOp::Recv(buf, peer) => {
                    check::peer("recv", peer, self.rank, self.world)?;
                    self.on_device("recv", buf.device())?;
                    dtype = buf.dtype();
                    let desc = CallDesc::new(Collective::Recv, 0, buf.dtype(), buf.numel())
                        .with_root(peer);
                    out.push(P2p::Recv { peer, buf, desc });
                }
            }
        }
        // Numbered only once every message passed its checks.
        let mut st = self.numbers.lock().map_err(poisoned_lock)?;
        let st_seq = st.seq;
        for p in &mut out {
            match p {
                P2p::Send { peer, desc, .. } => {
                    desc.seq = st.sent[*peer];
                    st.sent[*peer] += 1;
                }
                P2p::Recv { peer, desc, .. } => {
                    desc.seq = st.received[*peer];
                    st.received[*peer] += 1;
                }
            }
        }
        // Numbered with the group's next collective (not consumed): the
        // flight recorder then places the batch in the call sequence.
        let batch = CallDesc::new(Collective::SendRecv, st_seq, dtype, out.len());
        let nonempty = out.iter().any(|p| match p {
            P2p::Send { buf, .. } => buf.numel() > 0,
            P2p::Recv { buf, .. } => buf.numel() > 0,
        });
        drop(st);
        Ok((batch, (nonempty && !out.is_empty()).then_some(out)))
    }

    /// The error a call gets once the member is unusable.
    pub(crate) fn refused(&self, desc: &CallDesc, why: &CommError) -> CommError {
        why.clone().refused_as(&format!(
            "{desc} on {} (refused: the communicator is unusable after this earlier error)",
            self.label
        ))
    }

    /// Runs a checked call: verification, staging, `Avg`, the backend,
    /// completion for synchronous use of asynchronous backends, and error
    /// handling. The one path of every blocking and queued operation.
    pub(crate) fn execute(&self, st: &mut State, desc: CallDesc, op: Op<'_>) -> Result<()> {
        if let Some(e) = self.poisoned() {
            return Err(self.refused(&desc, &e));
        }
        let call = Call::new(desc, self.timeout(), &self.name);
        st.recorder.start(desc);
        let sync = self.synchronous.load(Ordering::Relaxed);
        let wait = self.caps.asynchronous && (sync || matches!(op, Op::Barrier));
        let r = self
            .verify(&desc, &op)
            .and_then(|()| self.run(st, &call, op))
            .and_then(|()| {
                if wait {
                    self.fence_and_wait(st, &desc, &call.deadline)
                } else {
                    Ok(())
                }
            });
        match r {
            Ok(()) => {
                let done = if self.caps.asynchronous && !wait {
                    CallState::Enqueued
                } else {
                    CallState::Completed
                };
                st.recorder.finish(&desc, done);
                Ok(())
            }
            Err(e) => Err(self.failed(st, &desc, e)),
        }
    }

    /// Adds group context; on a fatal error diagnoses, tells the peers,
    /// poisons the member and dumps the flight record.
    pub(crate) fn failed(&self, st: &mut State, desc: &CallDesc, e: CommError) -> CommError {
        let global = &self.global;
        let e = e.in_group(&self.label, &|r| global.get(r).copied());
        st.recorder.finish(desc, CallState::Failed(e.to_string()));
        if !e.is_fatal() {
            return e;
        }
        let e = match e {
            e @ CommError::Timeout { .. } => self.diagnose(st, e),
            e => e,
        };
        tracing::warn!(group = %self.name, rank = self.rank, "fatal error, aborting the communicator: {e}");
        if self.poison(&e) {
            st.comm.abort(&e);
            self.dump(st, &e);
        }
        e
    }

    /// Cross-checks the description out of band when the backend does not.
    fn verify(&self, desc: &CallDesc, op: &Op<'_>) -> Result<()> {
        let Some(v) = &self.verifier else {
            return Ok(());
        };
        if self.caps.checks_calls || self.world == 1 {
            return Ok(());
        }
        if let Op::SendRecv(ops) = op {
            return verify_p2p(v, ops);
        }
        let mine = desc.to_wire();
        let mut all = vec![0u8; 64 * self.world];
        v.all_gather(&mine[..], &mut all[..])?;
        for (r, w) in all.chunks_exact(64).enumerate() {
            if r != self.rank {
                desc.check_peer(&CallDesc::from_wire(w)?, r, &desc.to_string())?;
            }
        }
        Ok(())
    }

    /// Staging, `Avg` and the backend call.
    fn run(&self, st: &mut State, call: &Call<'_>, op: Op<'_>) -> Result<()> {
        let host = self.device == Device::Cpu;
        let world = self.world;
        let native_avg = self.caps.native_avg;
        let State {
            comm,
            stage: [s0, s1],
            p2p_stage,
            ..
        } = st;
        let reduce_op = |op: ReduceOp| {
            if op == ReduceOp::Avg && !native_avg {
                ReduceOp::Sum
            } else {
                op
            }
        };
        match op {
            Op::AllReduce(buf, op) => with_out(host, buf, s0, true, |mut b| {
                comm.all_reduce(call, b.reborrow(), reduce_op(op))?;
                if reduce_op(op) != op {
                    finish_avg(&mut b, world, s1)?;
                }
                Ok(())
            }),
            Op::AllGather(i, o) => with_in(host, i, s0, |i| {
                with_out(host, o, s1, false, |o| comm.all_gather(call, i, o))
            }),
            Op::ReduceScatter(i, o, op) => with_in(host, i, s0, |i| {
                with_out(host, o, s1, false, |mut o| {
                    comm.reduce_scatter(call, i, o.reborrow(), reduce_op(op))?;
                    if reduce_op(op) != op {
                        let mut tmp = HostBuffer::zeroed(0);
                        finish_avg(&mut o, world, &mut tmp)?;
                    }
                    Ok(())
                })
            }),
            Op::Broadcast(buf, root) => {
                let copy_in = self.rank == root;
                with_out(host, buf, s0, copy_in, |b| comm.broadcast(call, b, root))
            }
            Op::Gather(i, o, root) => with_in(host, i, s0, |i| match o {
                Some(o) => with_out(host, o, s1, false, |o| comm.gather(call, i, Some(o), root)),
                None => comm.gather(call, i, None, root),
            }),
            Op::AllToAll(i, o) => with_in(host, i, s0, |i| {
                with_out(host, o, s1, false, |o| comm.all_to_all(call, i, o))
            }),
            Op::AllToAllStrided(i, send, o, recv) => {
                if !host {
                    return Err(CommError::invalid(format!(
                        "{}: strided all_to_all of device memory needs a backend that \
                         implements it; permute on the device and use all_to_all",
                        call.name()
                    )));
                }
                with_in(host, i, s0, |i| {
                    with_out(host, o, s1, true, |o| {
                        if self.caps.strided_all_to_all {
                            return comm.all_to_all_strided(call, i, &send, o, &recv);
                        }
                        packed_all_to_all(comm.as_mut(), call, i, &send, o, &recv, p2p_stage, world)
                    })
                })
            }
            Op::SendRecv(ops) => {
                if !host || ops.iter().all(|p| p_is_host(p)) {
                    let mut ops = ops;
                    return comm.send_recv(call, &mut ops);
                }
                stage_p2p(comm.as_mut(), call, ops, p2p_stage)
            }
            Op::Barrier => comm.barrier(call),
        }
    }

    /// Asynchronous backends: waits for everything enqueued so far, with
    /// the deadline (aborting the backend when it passes).
    pub(crate) fn fence_and_wait(
        &self,
        st: &mut State,
        desc: &CallDesc,
        deadline: &Deadline,
    ) -> Result<()> {
        let Some(mut fence) = st.comm.fence()? else {
            return Ok(());
        };
        wait_fence(fence.as_mut(), deadline, &desc.to_string())
    }

    /// On a timeout: publishes this member's position in the call sequence
    /// and reads the others', so the error says where the sequences diverge.
    fn diagnose(&self, st: &State, e: CommError) -> CommError {
        let (Some(store), Some(pos)) = (&self.store, st.recorder.position()) else {
            return e;
        };
        let grace = (self.timeout() / 4).min(Duration::from_secs(2));
        let (store, rank, world, desc) = (store.clone(), self.rank, self.world, pos.desc);
        let (tx, rx) = std::sync::mpsc::channel();
        // The store may be out of reach (a cut link: the very failure being
        // diagnosed), and its calls can then block far past the grace; they
        // run on a helper thread that is abandoned after it.
        let spawned = std::thread::Builder::new()
            .name("comm-diagnose".into())
            .spawn(move || {
                let _ = tx.send(exchange_positions(store.as_ref(), rank, world, desc, grace));
            });
        let answer = spawned
            .ok()
            .and_then(|_| rx.recv_timeout(grace + Duration::from_secs(1)).ok())
            .flatten();
        match answer {
            Some(positions) => e.with_note(self.divergence(&positions, grace)),
            None => e.with_note(format!(
                "positions unknown: the group's store did not answer within {grace:?}"
            )),
        }
    }

    fn who(&self, r: usize) -> String {
        match self.global.get(r) {
            Some(g) => format!("group rank {r} (global rank {g})"),
            None => format!("rank {r}"),
        }
    }

    fn divergence(&self, positions: &[Option<CallDesc>], grace: Duration) -> String {
        let mut groups: Vec<(CallDesc, Vec<usize>)> = Vec::new();
        let mut silent = Vec::new();
        for (r, p) in positions.iter().enumerate() {
            match p {
                Some(d) => match groups.iter_mut().find(|(g, _)| g == d) {
                    Some((_, rs)) => rs.push(r),
                    None => groups.push((*d, vec![r])),
                },
                None => silent.push(r),
            }
        }
        groups.sort_by_key(|(d, _)| d.seq);
        let mut parts: Vec<String> = groups
            .iter()
            .map(|(d, rs)| {
                let names: Vec<String> = rs.iter().map(|r| self.who(*r)).collect();
                format!("{} at {d}", names.join(", "))
            })
            .collect();
        if !silent.is_empty() {
            let names: Vec<String> = silent.iter().map(|r| self.who(*r)).collect();
            parts.push(format!(
                "{} did not report a position within {grace:?} (frozen, dead, or busy outside this group)",
                names.join(", ")
            ));
        }
        let head = match groups.first() {
            Some((d, _)) if groups.len() > 1 => {
                format!("call sequences diverge at call #{}: ", d.seq)
            }
            _ => "positions: ".into(),
        };
        format!("{head}{}", parts.join("; "))
    }

    /// With [`FLIGHT_RECORDER_ENV`] set, writes the flight record to a file.
    fn dump(&self, st: &State, e: &CommError) {
        let Ok(dir) = std::env::var(FLIGHT_RECORDER_ENV) else {
            return;
        };
        let me = self.global.get(self.rank).copied().unwrap_or(self.rank);
        let safe: String = self
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let path = std::path::Path::new(&dir).join(format!("flight-{safe}-rank{me}.txt"));
        let text = format!("{}# error: {e}\n", st.recorder.dump(&self.label));
        if let Err(err) = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, text)) {
            tracing::warn!(
                "could not write the flight record to {}: {err}",
                path.display()
            );
        }
    }
}

/// Publishes this member's position (`desc`) under `flight/{rank}` and
/// reads the others' for up to `grace`; `None` when the store refuses.
fn exchange_positions(
    store: &dyn Store,
    rank: usize,
    world: usize,
    desc: CallDesc,
    grace: Duration,
) -> Option<Vec<Option<CallDesc>>> {
    let key = |r: usize| format!("flight/{r}");
    store.set(&key(rank), &desc.to_wire()).ok()?;
    let start = Instant::now();
    let mut positions: Vec<Option<CallDesc>> = vec![None; world];
    positions[rank] = Some(desc);
    for (r, p) in positions.iter_mut().enumerate() {
        if r == rank {
            continue;
        }
        let left = grace
            .saturating_sub(start.elapsed())
            .max(Duration::from_millis(1));
        if let Ok(b) = store.get(&key(r), left) {
            *p = CallDesc::from_wire(&b).ok();
        }
    }
    Some(positions)
}

/// Strided all-to-all on a backend without it: pack the blocks into one
/// workspace, exchange flat, unpack (workspaces reused between calls).
#[allow(clippy::too_many_arguments)]
fn packed_all_to_all(
    comm: &mut dyn DeviceCommunicator,
    call: &Call<'_>,
    input: BufRef<'_>,
    send: &BlockLayout,
    mut output: BufMut<'_>,
    recv: &BlockLayout,
    pool: &mut Vec<HostBuffer>,
    world: usize,
) -> Result<()> {
    let es = input.dtype().size();
    let dtype = input.dtype();
    let block = send.block_len() * es;
    while pool.len() < 2 {
        pool.push(HostBuffer::zeroed(0));
    }
    let (a, b) = pool.split_at_mut(1);
    let (packed, exchanged) = (&mut a[0], &mut b[0]);
    packed.reuse(world * block);
    exchanged.reuse(world * block);
    let src = input.expect_host("all_to_all")?;
    for (j, dst) in packed
        .as_bytes_mut()
        .chunks_exact_mut(block.max(1))
        .enumerate()
    {
        send.gather(src, j, es, dst);
    }
    comm.all_to_all(
        call,
        BufRef::host(packed.as_bytes(), dtype)?,
        BufMut::host(exchanged.as_bytes_mut(), dtype)?,
    )?;
    let dst = output.expect_host("all_to_all")?;
    for (i, s) in exchanged.as_bytes().chunks_exact(block.max(1)).enumerate() {
        recv.scatter(s, i, es, dst);
    }
    Ok(())
}

/// Out-of-band check of point-to-point messages: each pair swaps the
/// descriptions of the messages it has for the other, and every message must
/// find its mirror (our send #n to them, their receive #n from us).
fn verify_p2p(v: &Communicator, ops: &[P2p<'_>]) -> Result<()> {
    let mut peers: Vec<usize> = ops.iter().map(P2p::peer).collect();
    peers.sort_unstable();
    peers.dedup();
    let mine: Vec<Vec<u8>> = peers
        .iter()
        .map(|&p| {
            ops.iter()
                .filter(|o| o.peer() == p)
                .flat_map(|o| o.desc().to_wire())
                .collect()
        })
        .collect();
    let counts: Vec<[i64; 1]> = mine.iter().map(|m| [(m.len() / 64) as i64]).collect();
    let mut their_counts = vec![[0i64; 1]; peers.len()];
    let mut batch = Vec::new();
    for ((&p, c), t) in peers.iter().zip(&counts).zip(their_counts.iter_mut()) {
        batch.push(P2pOp::send(&c[..], p)?);
        batch.push(P2pOp::recv(&mut t[..], p)?);
    }
    v.batch_send_recv(batch)?;
    let mut theirs: Vec<Vec<u8>> = Vec::with_capacity(peers.len());
    for t in &their_counts {
        let n = usize::try_from(t[0])
            .ok()
            .filter(|&n| n <= 1 << 20)
            .ok_or_else(|| CommError::Protocol(format!("a peer announced {} messages", t[0])))?;
        theirs.push(vec![0u8; 64 * n]);
    }
    let mut batch = Vec::new();
    for ((&p, m), t) in peers.iter().zip(&mine).zip(theirs.iter_mut()) {
        batch.push(P2pOp::send(&m[..], p)?);
        batch.push(P2pOp::recv(&mut t[..], p)?);
    }
    v.batch_send_recv(batch)?;
    for (&p, t) in peers.iter().zip(&theirs) {
        let descs = t
            .chunks_exact(64)
            .map(CallDesc::from_wire)
            .collect::<Result<Vec<_>>>()?;
        for o in ops.iter().filter(|o| o.peer() == p) {
            let d = o.desc();
            let mirror = if d.op == Collective::Send {
                Collective::Recv
            } else {
                Collective::Send
            };
            let found = descs.iter().find(|t| t.op == mirror && t.seq == d.seq);
            match found {
                Some(t) => d.check_peer(t, p, &d.to_string())?,
                None => {
                    return Err(CommError::CallMismatch {
                        operation: d.to_string(),
                        peer: crate::RankId::local(p),
                        mine: d.to_string(),
                        theirs: format!(
                            "no matching {mirror} #{} (its messages for us: {})",
                            d.seq,
                            descs
                                .iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    })
                }
            }
        }
    }
    Ok(())
}

fn p_is_host(p: &P2p<'_>) -> bool {
    match p {
        P2p::Send { buf, .. } => buf.device() == Device::Cpu,
        P2p::Recv { buf, .. } => buf.device() == Device::Cpu,
    }
}

/// Point-to-point messages with device buffers on a host backend: each one
/// through its own host workspace from `pool` (reused from call to call).
fn stage_p2p(
    comm: &mut dyn DeviceCommunicator,
    call: &Call<'_>,
    ops: Vec<P2p<'_>>,
    pool: &mut Vec<HostBuffer>,
) -> Result<()> {
    while pool.len() < ops.len() {
        pool.push(HostBuffer::zeroed(0));
    }
    // (send?, peer, dtype, desc) per message; receive buffers kept aside.
    let mut plan = Vec::with_capacity(ops.len());
    let mut outs = Vec::new();
    for (p, ws) in ops.into_iter().zip(pool.iter_mut()) {
        match p {
            P2p::Send { peer, buf, desc } => {
                ws.reuse(buf.nbytes());
                MemMut::Host(ws.as_bytes_mut()).copy_from(buf.mem())?;
                plan.push((true, peer, buf.dtype(), desc));
            }
            P2p::Recv { peer, buf, desc } => {
                ws.reuse(buf.nbytes());
                plan.push((false, peer, buf.dtype(), desc));
                outs.push(buf);
            }
        }
    }
    let mut host_ops = Vec::with_capacity(plan.len());
    for (&(send, peer, dtype, desc), ws) in plan.iter().zip(pool.iter_mut()) {
        host_ops.push(if send {
            P2p::Send {
                peer,
                buf: BufRef::host(ws.as_bytes(), dtype)?,
                desc,
            }
        } else {
            P2p::Recv {
                peer,
                buf: BufMut::host(ws.as_bytes_mut(), dtype)?,
                desc,
            }
        });
    }
    comm.send_recv(call, &mut host_ops)?;
    drop(host_ops);
    let received = plan.iter().zip(pool.iter()).filter(|((send, ..), _)| !send);
    for (mut out, (_, ws)) in outs.into_iter().zip(received) {
        out.mem().copy_from(Mem::Host(ws.as_bytes()))?;
    }
    Ok(())
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Polls `fence` until it completes or `deadline` passes.
pub(crate) fn wait_fence(fence: &mut dyn Fence, deadline: &Deadline, what: &str) -> Result<()> {
    let mut spins = 0u32;
    loop {
        if fence.poll()? {
            return Ok(());
        }
        if deadline.expired() {
            return Err(CommError::timeout(
                what.to_string(),
                deadline.elapsed(),
                ["the device work enqueued so far (a member may be missing)"],
            ));
        }
        spins += 1;
        if spins < 64 {
            std::hint::spin_loop();
        } else if spins < 256 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}
