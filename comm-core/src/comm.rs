//! The backend contract: flat collective primitives over [`Tensor`]s.

use std::time::Duration;

use crate::{reduce, CommError, Device, ReduceOp, Result, Tensor};

/// A communicator over one group of ranks, implementing flat primitives only.
///
/// Dimension-aware operations (all_gather along a dim, all_to_all_4D, sharding
/// with padding) live above the backends and are built from these calls, so a
/// new backend gets all of them for free.
///
/// # Rules every implementation follows
/// - Ranks are group-local: `0..world_size()`.
/// - Every tensor passed to one call has the same dtype; mismatches return
///   [`CommError::DTypeMismatch`], wrong element counts
///   [`CommError::ShapeMismatch`]. Only element counts matter, not shapes:
///   buffers are treated as flat row-major arrays.
/// - Every member calls the same collectives in the same order with matching
///   sizes (as in MPI and NCCL). A member that does not arrive makes the others
///   return [`CommError::Timeout`] (naming it) once the communicator's deadline
///   passes; a member that died gives [`CommError::PeerLost`].
/// - After a fatal error ([`CommError::is_fatal`]) the communicator must not be
///   used again except to drop it; dropping never hangs.
/// - `&mut self` everywhere: one communicator is driven by one thread at a
///   time. Communicators are `Send` (they may move between threads) but not
///   necessarily `Sync`.
pub trait DeviceCommunicator: Send {
    /// Short backend name: `single`, `tcp`, `shm`, `nccl`.
    fn backend(&self) -> &'static str;
    /// This member's group-local rank.
    fn rank(&self) -> usize;
    /// Number of members.
    fn world_size(&self) -> usize;
    /// The device whose tensors this communicator moves.
    fn device(&self) -> Device;
    /// The deadline applied to each blocking operation.
    fn timeout(&self) -> Duration;
    /// Changes the per-operation deadline.
    fn set_timeout(&mut self, timeout: Duration);

    /// In place: every member ends with the element-wise reduction of all
    /// members' `tensor`. `Avg` divides by `world_size()` (see [`ReduceOp`]).
    fn all_reduce(&mut self, tensor: &mut Tensor, op: ReduceOp) -> Result<()>;

    /// `output` (`world_size() * input.numel()` elements) receives every
    /// member's `input`, concatenated in rank order.
    fn all_gather(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()>;

    /// `input` holds `world_size()` equal blocks; member `r` receives in
    /// `output` (`input.numel() / world_size()` elements) the reduction of
    /// block `r` over all members.
    fn reduce_scatter(&mut self, input: &Tensor, output: &mut Tensor, op: ReduceOp) -> Result<()>;

    /// `tensor` on every member becomes `root`'s `tensor`.
    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<()>;

    /// `root`'s `output` (`world_size() * input.numel()` elements) receives
    /// every member's `input` in rank order. Non-roots pass `None` (an output
    /// given there is left untouched).
    fn gather(&mut self, input: &Tensor, output: Option<&mut Tensor>, root: usize) -> Result<()>;

    /// Equal splits: `input` and `output` both hold `world_size()` blocks of
    /// `numel / world_size()` elements; block `j` of `input` goes to member
    /// `j`, and block `i` of `output` comes from member `i`.
    fn all_to_all(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()>;

    /// Sends `tensor` to member `dst`. Messages between one pair arrive in
    /// order and never mix with collective traffic. Sending to oneself is an
    /// error.
    fn send(&mut self, tensor: &Tensor, dst: usize) -> Result<()>;

    /// Receives into `tensor` (whose size must match what was sent) from `src`.
    fn recv(&mut self, tensor: &mut Tensor, src: usize) -> Result<()>;

    /// Returns once every member has entered the barrier.
    fn barrier(&mut self) -> Result<()>;
}

/// Argument checks shared by every backend, so errors read the same everywhere.
pub mod check {
    use super::*;
    use crate::DType;

    fn same_dtype(op: &str, a: DType, b: DType) -> Result<()> {
        if a != b {
            return Err(CommError::DTypeMismatch {
                operation: op.into(),
                expected: a.to_string(),
                actual: b.to_string(),
            });
        }
        Ok(())
    }

    /// Errors unless `t` lives on `device`.
    pub fn device(op: &str, t: &Tensor, device: Device) -> Result<()> {
        if t.device() != device {
            return Err(CommError::invalid(format!(
                "{op}: tensor is on {} but this communicator moves {device} tensors",
                t.device()
            )));
        }
        Ok(())
    }

    /// Errors unless `root < world`.
    pub fn root(op: &str, root: usize, world: usize) -> Result<()> {
        if root >= world {
            return Err(CommError::invalid(format!(
                "{op}: root {root} is out of range for a group of {world}"
            )));
        }
        Ok(())
    }

    /// Errors unless `peer` is another member of the group.
    pub fn peer(op: &str, peer: usize, rank: usize, world: usize) -> Result<()> {
        if peer >= world {
            return Err(CommError::invalid(format!(
                "{op}: peer {peer} is out of range for a group of {world}"
            )));
        }
        if peer == rank {
            return Err(CommError::invalid(format!(
                "{op}: rank {rank} cannot {op} to or from itself"
            )));
        }
        Ok(())
    }

    /// `output.numel() == world * input.numel()`, same dtype.
    pub fn gathered(op: &str, input: &Tensor, output: &Tensor, world: usize) -> Result<()> {
        same_dtype(op, input.dtype(), output.dtype())?;
        if output.numel() != world * input.numel() {
            return Err(CommError::shape(
                op,
                format!(
                    "output of {} elements ({world} x {})",
                    world * input.numel(),
                    input.numel()
                ),
                format!("{} elements", output.numel()),
            ));
        }
        Ok(())
    }

    /// `input.numel() == world * output.numel()`, same dtype.
    pub fn scattered(op: &str, input: &Tensor, output: &Tensor, world: usize) -> Result<()> {
        gathered(op, output, input, world)
    }

    /// Equal element counts divisible by `world`, same dtype.
    pub fn all_to_all(input: &Tensor, output: &Tensor, world: usize) -> Result<()> {
        same_dtype("all_to_all", input.dtype(), output.dtype())?;
        if input.numel() != output.numel() || input.numel() % world != 0 {
            return Err(CommError::shape(
                "all_to_all",
                format!("input and output of equal size divisible by {world}"),
                format!("{} and {} elements", input.numel(), output.numel()),
            ));
        }
        Ok(())
    }
}

/// The communicator of a one-member group, always available.
///
/// Every collective is the identity (copies where output is separate), so
/// upper layers and tests have a backend without any set-up.
///
/// ```
/// use comm_core::{DeviceCommunicator, ReduceOp, SingleRankCommunicator, Tensor};
/// let mut c = SingleRankCommunicator::new();
/// let mut t = Tensor::from_vec1(vec![1i32, 2, 3]);
/// c.all_reduce(&mut t, ReduceOp::Avg).unwrap();
/// assert_eq!(t.to_vec::<i32>().unwrap(), [1, 2, 3]);
/// ```
#[derive(Debug)]
pub struct SingleRankCommunicator {
    device: Device,
    timeout: Duration,
}

impl SingleRankCommunicator {
    /// A host communicator.
    pub fn new() -> Self {
        Self::on(Device::Cpu)
    }
    /// A communicator for tensors on `device`.
    pub fn on(device: Device) -> Self {
        SingleRankCommunicator {
            device,
            timeout: crate::default_timeout(),
        }
    }
}

impl Default for SingleRankCommunicator {
    fn default() -> Self {
        Self::new()
    }
}

impl DeviceCommunicator for SingleRankCommunicator {
    fn backend(&self) -> &'static str {
        "single"
    }
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn device(&self) -> Device {
        self.device
    }
    fn timeout(&self) -> Duration {
        self.timeout
    }
    fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }
    fn all_reduce(&mut self, tensor: &mut Tensor, op: ReduceOp) -> Result<()> {
        check::device("all_reduce", tensor, self.device)?;
        if op == ReduceOp::Avg && tensor.is_host() {
            let dt = tensor.dtype();
            reduce::finish_avg(tensor.as_bytes_mut()?, dt, 1)?;
        }
        Ok(())
    }
    fn all_gather(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()> {
        check::gathered("all_gather", input, output, 1)?;
        output.copy_from(input)
    }
    fn reduce_scatter(&mut self, input: &Tensor, output: &mut Tensor, _op: ReduceOp) -> Result<()> {
        check::scattered("reduce_scatter", input, output, 1)?;
        output.copy_from(input)
    }
    fn broadcast(&mut self, _tensor: &mut Tensor, root: usize) -> Result<()> {
        check::root("broadcast", root, 1)
    }
    fn gather(&mut self, input: &Tensor, output: Option<&mut Tensor>, root: usize) -> Result<()> {
        check::root("gather", root, 1)?;
        let out =
            output.ok_or_else(|| CommError::invalid("gather: the root must pass an output"))?;
        check::gathered("gather", input, out, 1)?;
        out.copy_from(input)
    }
    fn all_to_all(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()> {
        check::all_to_all(input, output, 1)?;
        output.copy_from(input)
    }
    fn send(&mut self, _tensor: &Tensor, dst: usize) -> Result<()> {
        check::peer("send", dst, 0, 1)
    }
    fn recv(&mut self, _tensor: &mut Tensor, src: usize) -> Result<()> {
        check::peer("recv", src, 0, 1)
    }
    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Wraps a host communicator so it also accepts device tensors, staging them
/// through host memory. This is how several processes share one GPU over shm
/// or TCP, and how device tensors cross groups that have no NCCL.
#[derive(Debug)]
pub struct HostStaged<C> {
    inner: C,
}

impl<C: DeviceCommunicator> HostStaged<C> {
    /// Wraps `inner`, which must move host tensors.
    pub fn new(inner: C) -> Self {
        HostStaged { inner }
    }
    /// The wrapped communicator.
    pub fn inner_mut(&mut self) -> &mut C {
        &mut self.inner
    }
}

/// A host view of a tensor: borrowed when already on the host, else a copy.
enum Staged<'a> {
    Borrowed(&'a Tensor),
    Owned(Tensor),
}

impl std::ops::Deref for Staged<'_> {
    type Target = Tensor;
    fn deref(&self) -> &Tensor {
        match self {
            Staged::Borrowed(t) => t,
            Staged::Owned(t) => t,
        }
    }
}

fn staged(t: &Tensor) -> Result<Staged<'_>> {
    if t.is_host() {
        Ok(Staged::Borrowed(t))
    } else {
        Ok(Staged::Owned(t.to_host()?))
    }
}

fn with_host_mut(t: &mut Tensor, f: impl FnOnce(&mut Tensor) -> Result<()>) -> Result<()> {
    if t.is_host() {
        return f(t);
    }
    let mut h = t.to_host()?;
    f(&mut h)?;
    t.copy_from(&h)
}

impl<C: DeviceCommunicator> DeviceCommunicator for HostStaged<C> {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn device(&self) -> Device {
        self.inner.device()
    }
    fn timeout(&self) -> Duration {
        self.inner.timeout()
    }
    fn set_timeout(&mut self, timeout: Duration) {
        self.inner.set_timeout(timeout)
    }
    fn all_reduce(&mut self, tensor: &mut Tensor, op: ReduceOp) -> Result<()> {
        let inner = &mut self.inner;
        with_host_mut(tensor, |t| inner.all_reduce(t, op))
    }
    fn all_gather(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()> {
        let i = staged(input)?;
        let inner = &mut self.inner;
        with_host_mut(output, |o| inner.all_gather(&i, o))
    }
    fn reduce_scatter(&mut self, input: &Tensor, output: &mut Tensor, op: ReduceOp) -> Result<()> {
        let i = staged(input)?;
        let inner = &mut self.inner;
        with_host_mut(output, |o| inner.reduce_scatter(&i, o, op))
    }
    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<()> {
        let inner = &mut self.inner;
        with_host_mut(tensor, |t| inner.broadcast(t, root))
    }
    fn gather(&mut self, input: &Tensor, output: Option<&mut Tensor>, root: usize) -> Result<()> {
        let i = staged(input)?;
        match output {
            Some(o) => {
                let inner = &mut self.inner;
                with_host_mut(o, |o| inner.gather(&i, Some(o), root))
            }
            None => self.inner.gather(&i, None, root),
        }
    }
    fn all_to_all(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()> {
        let i = staged(input)?;
        let inner = &mut self.inner;
        with_host_mut(output, |o| inner.all_to_all(&i, o))
    }
    fn send(&mut self, tensor: &Tensor, dst: usize) -> Result<()> {
        let t = staged(tensor)?;
        self.inner.send(&t, dst)
    }
    fn recv(&mut self, tensor: &mut Tensor, src: usize) -> Result<()> {
        let inner = &mut self.inner;
        with_host_mut(tensor, |t| inner.recv(t, src))
    }
    fn barrier(&mut self) -> Result<()> {
        self.inner.barrier()
    }
}

impl<C: DeviceCommunicator + ?Sized> DeviceCommunicator for Box<C> {
    fn backend(&self) -> &'static str {
        (**self).backend()
    }
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn world_size(&self) -> usize {
        (**self).world_size()
    }
    fn device(&self) -> Device {
        (**self).device()
    }
    fn timeout(&self) -> Duration {
        (**self).timeout()
    }
    fn set_timeout(&mut self, timeout: Duration) {
        (**self).set_timeout(timeout)
    }
    fn all_reduce(&mut self, tensor: &mut Tensor, op: ReduceOp) -> Result<()> {
        (**self).all_reduce(tensor, op)
    }
    fn all_gather(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()> {
        (**self).all_gather(input, output)
    }
    fn reduce_scatter(&mut self, input: &Tensor, output: &mut Tensor, op: ReduceOp) -> Result<()> {
        (**self).reduce_scatter(input, output, op)
    }
    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<()> {
        (**self).broadcast(tensor, root)
    }
    fn gather(&mut self, input: &Tensor, output: Option<&mut Tensor>, root: usize) -> Result<()> {
        (**self).gather(input, output, root)
    }
    fn all_to_all(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()> {
        (**self).all_to_all(input, output)
    }
    fn send(&mut self, tensor: &Tensor, dst: usize) -> Result<()> {
        (**self).send(tensor, dst)
    }
    fn recv(&mut self, tensor: &mut Tensor, src: usize) -> Result<()> {
        (**self).recv(tensor, src)
    }
    fn barrier(&mut self) -> Result<()> {
        (**self).barrier()
    }
}
