//! The open registry of backends: a [`BackendFactory`] per backend, the
//! built-in ones registered exactly like a third party's.
//!
//! parallel-state, the conformance kit and `comm-perf` all create
//! communicators through a [`Registry`]; a backend author registers a
//! factory (`InitOptions::backends` in parallel-state) and it can then be
//! named by `DIST_BACKEND`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::{DeviceCommunicator, P2p};
use crate::buffer::{BufMut, BufRef};
use crate::{Call, CommError, Communicator, Device, FrontOptions, ReduceOp, Result, Store};

/// Everything a factory gets to build one member of a group.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GroupContext {
    /// A store namespaced for this group and backend: what members publish
    /// during set-up (addresses, unique ids) goes here.
    pub store: Arc<dyn Store>,
    /// This member's group rank.
    pub rank: usize,
    /// Number of members.
    pub world: usize,
    /// Deadline of set-up and of each operation.
    pub timeout: Duration,
    /// The group's name (`tp:0`), for messages.
    pub group_name: String,
    /// The device whose memory the communicator will move.
    pub device: Device,
    /// Global rank of each group rank.
    pub global_ranks: Vec<usize>,
}

impl GroupContext {
    /// A context for member `rank` of `world`, on the host, with the
    /// default deadline; adjust with the builder methods.
    pub fn new(store: Arc<dyn Store>, rank: usize, world: usize) -> Self {
        GroupContext {
            store,
            rank,
            world,
            timeout: crate::default_timeout(),
            group_name: "group".into(),
            device: Device::Cpu,
            global_ranks: (0..world).collect(),
        }
    }
    /// With a deadline.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
    /// With a group name.
    pub fn group_name(mut self, name: impl Into<String>) -> Self {
        self.group_name = name.into();
        self
    }
    /// With a device.
    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }
    /// With the global rank of each group rank.
    pub fn global_ranks(mut self, ranks: Vec<usize>) -> Self {
        self.global_ranks = ranks;
        self
    }
    /// Front options matching this context (name, ranks, deadline, store).
    pub fn front_options(&self) -> FrontOptions {
        FrontOptions::new(self.group_name.clone())
            .global_ranks(self.global_ranks.clone())
            .timeout(self.timeout)
            .store(Arc::new(crate::PrefixStore::new(
                "front",
                self.store.clone(),
            )))
    }
}

/// Makes the communicators of one backend.
pub trait BackendFactory: Send + Sync + fmt::Debug {
    /// The name users select it by (`tcp`, `shm`, `nccl`, `ucx`, ...).
    fn name(&self) -> &str;
    /// Whether it moves memory of `device` (host backends also accept
    /// device buffers, staged by the front, but do not "serve" the device).
    fn serves(&self, device: Device) -> bool;
    /// True when every member must be on one host (shared memory).
    fn same_host_only(&self) -> bool {
        false
    }
    /// Whether it can run in this process for `device` (libraries present,
    /// devices visible), or why not.
    fn available(&self, device: Device) -> Result<()> {
        let _ = device;
        Ok(())
    }
    /// Builds this member's communicator; every member calls it
    /// concurrently with the same context but its own rank.
    fn create(&self, ctx: &GroupContext) -> Result<Box<dyn DeviceCommunicator>>;
}

/// Backend factories by name.
///
/// ```
/// use comm_core::{Registry, SingleFactory};
/// let r = Registry::new().with(SingleFactory);
/// assert_eq!(r.names(), ["single"]);
/// assert!(r.get("carrier-pigeon").is_err());
/// ```
#[derive(Debug, Clone, Default)]
pub struct Registry {
    factories: Vec<Arc<dyn BackendFactory>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `f`, replacing a factory of the same name.
    pub fn register(&mut self, f: impl BackendFactory + 'static) {
        self.register_arc(Arc::new(f));
    }

    /// [`register`](Self::register) for a shared factory.
    pub fn register_arc(&mut self, f: Arc<dyn BackendFactory>) {
        self.factories.retain(|g| g.name() != f.name());
        self.factories.push(f);
    }

    /// Builder form of [`register`](Self::register).
    pub fn with(mut self, f: impl BackendFactory + 'static) -> Self {
        self.register(f);
        self
    }

    /// Every registered name, in registration order.
    pub fn names(&self) -> Vec<&str> {
        self.factories.iter().map(|f| f.name()).collect()
    }

    /// The factory named `name` (case-insensitive), or `BackendUnavailable`
    /// listing what is registered.
    pub fn get(&self, name: &str) -> Result<Arc<dyn BackendFactory>> {
        let want = name.trim();
        self.factories
            .iter()
            .find(|f| f.name().eq_ignore_ascii_case(want))
            .cloned()
            .ok_or_else(|| {
                CommError::unavailable(
                    want,
                    format!(
                        "no backend of that name is registered; registered: {}",
                        self.names().join(", ")
                    ),
                )
            })
    }

    /// Builds member `ctx.rank` of a group on backend `name`, behind the
    /// checked front.
    pub fn create(&self, name: &str, ctx: &GroupContext) -> Result<Communicator> {
        let f = self.get(name)?;
        f.available(ctx.device)?;
        if ctx.world == 0 || ctx.rank >= ctx.world {
            return Err(CommError::invalid(format!(
                "rank {} is out of range for a group of {}",
                ctx.rank, ctx.world
            )));
        }
        let backend = f.create(ctx)?;
        Ok(Communicator::new(backend, ctx.front_options()))
    }
}

/// The backend of a one-member group. The front answers every call of a
/// one-member group itself, so this backend is never asked to move bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleRank {
    device: Device,
}

impl SingleRank {
    /// For host memory.
    pub fn new() -> Self {
        Self::on(Device::Cpu)
    }
    /// For memory on `device`.
    pub fn on(device: Device) -> Self {
        SingleRank { device }
    }
}

fn unreachable_call() -> Result<()> {
    Err(CommError::State(
        "the single-rank backend was asked to communicate; the front answers one-member groups"
            .into(),
    ))
}

impl DeviceCommunicator for SingleRank {
    fn backend(&self) -> &str {
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
    fn all_reduce(&mut self, _: &Call<'_>, _: BufMut<'_>, _: ReduceOp) -> Result<()> {
        unreachable_call()
    }
    fn all_gather(&mut self, _: &Call<'_>, _: BufRef<'_>, _: BufMut<'_>) -> Result<()> {
        unreachable_call()
    }
    fn reduce_scatter(
        &mut self,
        _: &Call<'_>,
        _: BufRef<'_>,
        _: BufMut<'_>,
        _: ReduceOp,
    ) -> Result<()> {
        unreachable_call()
    }
    fn broadcast(&mut self, _: &Call<'_>, _: BufMut<'_>, _: usize) -> Result<()> {
        unreachable_call()
    }
    fn gather(
        &mut self,
        _: &Call<'_>,
        _: BufRef<'_>,
        _: Option<BufMut<'_>>,
        _: usize,
    ) -> Result<()> {
        unreachable_call()
    }
    fn all_to_all(&mut self, _: &Call<'_>, _: BufRef<'_>, _: BufMut<'_>) -> Result<()> {
        unreachable_call()
    }
    fn send_recv(&mut self, _: &Call<'_>, _: &mut [P2p<'_>]) -> Result<()> {
        unreachable_call()
    }
    fn barrier(&mut self, _: &Call<'_>) -> Result<()> {
        Ok(())
    }
}

/// The factory of [`SingleRank`], registered as `single`: one-member groups
/// of any device.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleFactory;

impl BackendFactory for SingleFactory {
    fn name(&self) -> &str {
        "single"
    }
    fn serves(&self, _device: Device) -> bool {
        true
    }
    fn create(&self, ctx: &GroupContext) -> Result<Box<dyn DeviceCommunicator>> {
        if ctx.world != 1 {
            return Err(CommError::unavailable(
                "single",
                format!(
                    "the `single` backend only serves groups of one rank, not {}; use tcp or shm",
                    ctx.world
                ),
            ));
        }
        Ok(Box::new(SingleRank::on(ctx.device)))
    }
}
