//! `GroupCoordinator`: one group of ranks with a host plane and an optional
//! device plane (each a [`Communicator`] behind the checked front), and
//! every collective users call on a group.
//!
//! One job per file: construction and backend choice here; collectives
//! along a dimension in [`dims`]; Ulysses all-to-all in [`ulysses`];
//! sequence sharding in [`shard`]; objects and tensor dicts in [`objects`];
//! ring attention's exchange in [`ring`].

mod dims;
mod objects;
mod ring;
mod shard;
mod ulysses;

pub use ring::RingTimes;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use comm_core::{
    AsBuf, AsBufMut, CommError, Communicator, DType, Device, GroupContext, PrefixStore, ReduceOp,
    Registry, Result, Store, Tensor, TensorMetadata,
};

use crate::backend;
use crate::mq::MqBroadcaster;

/// Environment variable: `0` turns off the cross-check of device-plane call
/// descriptions over the host plane (one small host all-gather per device
/// collective; on by default, so a mismatched NCCL call is an error instead
/// of a hang or garbage).
pub const VERIFY_ENV: &str = "DIST_VERIFY_CALLS";

/// Options for building a group. `#[non_exhaustive]`: start from
/// [`GroupOptions::default`] and set fields.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GroupOptions {
    /// Deadline of every blocking operation of the group.
    pub timeout: Duration,
    /// Forces a backend by name (host or device plane, see
    /// [`backend::BACKEND_ENV`]); `None` chooses automatically.
    pub backend: Option<String>,
    /// Device of the data plane (`Cuda(n)` builds a device backend when one
    /// is available, else CUDA tensors are staged through host memory).
    pub device: Device,
    /// Route `broadcast_object` from group rank 0 through the shared-memory
    /// message queue when the host backend is shm.
    pub use_message_queue_broadcaster: bool,
    /// The backends to choose from.
    pub registry: Arc<Registry>,
}

impl Default for GroupOptions {
    fn default() -> Self {
        GroupOptions {
            timeout: comm_core::default_timeout(),
            backend: None,
            device: Device::Cpu,
            use_message_queue_broadcaster: false,
            registry: Arc::new(backend::default_registry()),
        }
    }
}

/// One process group: its ranks, its planes, and the collectives over them.
///
/// All rank arguments (`src`, `dst`) are group-local (`0..world_size()`);
/// [`GroupCoordinator::ranks`] maps them to global ranks, and errors carry
/// both. Buffers may be anything [`AsBuf`]/[`AsBufMut`]: [`Tensor`]s,
/// host slices, cudarc device memory (feature `nccl`). The coordinator is
/// `Send + Sync`.
pub struct GroupCoordinator {
    name: String,
    ranks: Vec<usize>,
    rank: usize,
    rank_in_group: usize,
    local_rank: usize,
    device: Device,
    host_backend: String,
    device_backend: Option<String>,
    timeout: Duration,
    host: RwLock<Option<Communicator>>,
    device_plane: RwLock<Option<Communicator>>,
    mq: Option<MqBroadcaster>,
}

impl std::fmt::Debug for GroupCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCoordinator")
            .field("name", &self.name)
            .field("ranks", &self.ranks)
            .field("rank", &self.rank)
            .field("rank_in_group", &self.rank_in_group)
            .field("host_backend", &self.host_backend)
            .field("device_backend", &self.device_backend)
            .finish()
    }
}

fn lock_err<T>(_: T) -> CommError {
    CommError::State("a group's plane lock was poisoned by a panic on another thread".into())
}

fn verify_calls() -> bool {
    std::env::var(VERIFY_ENV).map_or(true, |v| v.trim() != "0")
}

impl GroupCoordinator {
    /// Builds the group `ranks` (global ranks in group order) on the member
    /// with global rank `rank`. Every member calls this concurrently with the
    /// same `ranks`, `name` and a `store` namespaced for this group instance.
    /// `all_on_this_host` must be true iff every member runs on this host.
    pub fn new(
        ranks: Vec<usize>,
        rank: usize,
        local_rank: usize,
        name: impl Into<String>,
        store: Arc<dyn Store>,
        all_on_this_host: bool,
        opts: GroupOptions,
    ) -> Result<Self> {
        let name = name.into();
        let rank_in_group = member_index(&ranks, rank, &name)?;
        let world = ranks.len();
        let reg = &opts.registry;
        let forced = opts
            .backend
            .as_deref()
            .map(backend::canonical)
            .or_else(backend::backend_from_env);
        let (host_name, why) =
            backend::choose_host_backend(reg, world, all_on_this_host, forced.as_deref())?;
        let ctx = |prefix: &str, device: Device| {
            GroupContext::new(
                Arc::new(PrefixStore::new(prefix, store.clone())),
                rank_in_group,
                world,
            )
            .timeout(opts.timeout)
            .group_name(name.clone())
            .device(device)
            .global_ranks(ranks.clone())
        };
        let host = reg.create(&host_name, &ctx("host", Device::Cpu))?;
        let (device_plane, device_backend, dev_why) =
            Self::device_plane(reg, &host, &ctx("device", opts.device), forced.as_deref())?;
        if rank_in_group == 0 {
            tracing::info!(
                group = %name, ranks = ?ranks, host_backend = %host_name, reason = %why,
                device_plane = %dev_why, "group created"
            );
        }
        let mq = if opts.use_message_queue_broadcaster && host_name == "shm" {
            let mq_store: Arc<dyn Store> = Arc::new(PrefixStore::new("mq", store));
            Some(MqBroadcaster::new(
                mq_store,
                rank_in_group,
                world,
                opts.timeout,
            )?)
        } else {
            None
        };
        Ok(GroupCoordinator {
            name,
            ranks,
            rank,
            rank_in_group,
            local_rank,
            device: opts.device,
            host_backend: host_name,
            device_backend,
            timeout: opts.timeout,
            host: RwLock::new(Some(host)),
            device_plane: RwLock::new(device_plane),
            mq,
        })
    }

    /// The device plane for `ctx.device`, or why there is none: no device,
    /// one member, no available device backend, or members sharing one GPU
    /// (NCCL refuses two ranks on one device; those groups stage device
    /// memory through the host plane instead).
    fn device_plane(
        reg: &Registry,
        host: &Communicator,
        ctx: &GroupContext,
        forced: Option<&str>,
    ) -> Result<(Option<Communicator>, Option<String>, String)> {
        let factory = match backend::choose_device_backend(reg, ctx.device, ctx.world, forced)? {
            Ok(f) => f,
            Err(why) => {
                let forced_device = forced
                    .and_then(|f| reg.get(f).ok())
                    .is_some_and(|f| !f.serves(Device::Cpu));
                if forced_device && ctx.world > 1 {
                    return Err(CommError::unavailable(
                        forced.unwrap_or_default(),
                        format!("forced for group `{}`, but {why}", ctx.group_name),
                    ));
                }
                return Ok((None, None, why));
            }
        };
        if let Some((a, b)) = crate::device::members_share_a_device(
            &ctx.store,
            ctx.rank,
            ctx.world,
            ctx.device,
            ctx.timeout,
        )? {
            let why = format!(
                "group ranks {a} and {b} share one GPU ({} refuses two ranks on one device); \
                 device tensors are staged through the host backend",
                factory.name()
            );
            if ctx.rank == 0 {
                tracing::warn!(group = %ctx.group_name, "{why}");
            }
            return Ok((None, None, why));
        }
        let mut opts = ctx.front_options();
        if verify_calls() {
            opts = opts.verifier(host.clone());
        }
        let comm = Communicator::new(factory.create(ctx)?, opts);
        let name = factory.name().to_string();
        let why = format!("{name} for {} tensors", ctx.device);
        Ok((Some(comm), Some(name), why))
    }

    /// A group over communicators made by hand (a custom transport, a
    /// communicator shared with another library). `host` moves host memory
    /// (and stages device memory); `device`, when given, moves device memory.
    pub fn from_communicators(
        name: impl Into<String>,
        ranks: Vec<usize>,
        rank: usize,
        local_rank: usize,
        host: Communicator,
        device: Option<Communicator>,
    ) -> Result<Self> {
        let name = name.into();
        let rank_in_group = member_index(&ranks, rank, &name)?;
        for c in std::iter::once(&host).chain(device.as_ref()) {
            if c.world_size() != ranks.len() || c.rank() != rank_in_group {
                return Err(CommError::invalid(format!(
                    "group `{name}`: communicator `{}` is rank {} of {}, but this member is group \
                     rank {rank_in_group} of {}",
                    c.name(),
                    c.rank(),
                    c.world_size(),
                    ranks.len()
                )));
            }
        }
        Ok(GroupCoordinator {
            device: device.as_ref().map_or(Device::Cpu, Communicator::device),
            device_backend: device.as_ref().map(|d| d.backend().to_string()),
            host_backend: host.backend().to_string(),
            timeout: host.timeout(),
            name,
            ranks,
            rank,
            rank_in_group,
            local_rank,
            host: RwLock::new(Some(host)),
            device_plane: RwLock::new(device),
            mq: None,
        })
    }

    /// A one-member group that needs no store (every op returns its input).
    pub fn single(rank: usize, local_rank: usize, name: impl Into<String>) -> Self {
        Self::single_on(rank, local_rank, name, Device::Cpu)
    }

    /// [`single`](Self::single) for a process computing on `device`: the
    /// group reports it as its device and [`recv`](Self::recv) allocates
    /// there (its ops move memory of any device without communicating).
    pub fn single_on(
        rank: usize,
        local_rank: usize,
        name: impl Into<String>,
        device: Device,
    ) -> Self {
        let name = name.into();
        let host = Communicator::new(
            Box::new(comm_core::SingleRank::new()),
            comm_core::FrontOptions::new(name.clone()).global_ranks(vec![rank]),
        );
        GroupCoordinator {
            name,
            ranks: vec![rank],
            rank,
            rank_in_group: 0,
            local_rank,
            device,
            host_backend: "single".into(),
            device_backend: None,
            timeout: host.timeout(),
            host: RwLock::new(Some(host)),
            device_plane: RwLock::new(None),
            mq: None,
        }
    }

    /// The group's unique name (e.g. `tp:0`).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Global ranks of the members, in group-rank order.
    pub fn ranks(&self) -> &[usize] {
        &self.ranks
    }
    /// This process's global rank.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// This process's rank inside the group.
    pub fn rank_in_group(&self) -> usize {
        self.rank_in_group
    }
    /// Number of members.
    pub fn world_size(&self) -> usize {
        self.ranks.len()
    }
    /// This process's local rank (on its host).
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }
    /// The device the group's data plane moves (`Device::Cpu` without one).
    pub fn device(&self) -> Device {
        self.device
    }
    /// Global rank of group rank 0.
    pub fn first_rank(&self) -> usize {
        self.ranks[0]
    }
    /// Global rank of the last member.
    pub fn last_rank(&self) -> usize {
        self.ranks[self.ranks.len() - 1]
    }
    /// True on group rank 0.
    pub fn is_first_rank(&self) -> bool {
        self.rank_in_group == 0
    }
    /// True on the last member.
    pub fn is_last_rank(&self) -> bool {
        self.rank_in_group + 1 == self.ranks.len()
    }
    /// Global rank of the next member (wrapping).
    pub fn next_rank(&self) -> usize {
        self.ranks[(self.rank_in_group + 1) % self.ranks.len()]
    }
    /// Global rank of the previous member (wrapping).
    pub fn prev_rank(&self) -> usize {
        let n = self.ranks.len();
        self.ranks[(self.rank_in_group + n - 1) % n]
    }
    /// The host-plane backend's name.
    pub fn host_backend(&self) -> &str {
        &self.host_backend
    }
    /// The device-plane backend's name, when one was built.
    pub fn device_backend(&self) -> Option<&str> {
        self.device_backend.as_deref()
    }
    /// The per-operation deadline.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
    /// True when `broadcast_object` from rank 0 goes through the message queue.
    pub fn uses_message_queue(&self) -> bool {
        self.mq.is_some()
    }

    fn destroyed(&self) -> CommError {
        CommError::State(format!("group `{}` was destroyed", self.name))
    }

    /// The host-plane communicator (host memory; it stages device memory).
    pub fn host_communicator(&self) -> Result<Communicator> {
        self.host
            .read()
            .map_err(lock_err)?
            .clone()
            .ok_or_else(|| self.destroyed())
    }

    /// The device-plane communicator, when the group has one.
    pub fn device_communicator(&self) -> Result<Option<Communicator>> {
        if self.host.read().map_err(lock_err)?.is_none() {
            return Err(self.destroyed());
        }
        Ok(self.device_plane.read().map_err(lock_err)?.clone())
    }

    /// The communicator that moves memory on `device`: the device plane for
    /// its device, else the host plane (which stages device memory). Use it
    /// for non-blocking operations: `group.communicator_for(dev)?.scope(...)`.
    pub fn communicator_for(&self, device: Device) -> Result<Communicator> {
        if device != Device::Cpu {
            if let Some(d) = self.device_communicator()? {
                if d.device() == device {
                    return Ok(d);
                }
            }
        }
        self.host_communicator()
    }

    /// True when tensors on `device` go through a device backend (NCCL),
    /// which needs device-side layout copies.
    fn on_device_plane(&self, device: Device) -> Result<bool> {
        Ok(device != Device::Cpu
            && self
                .device_communicator()?
                .is_some_and(|d| d.device() == device))
    }

    fn check_member(&self, what: &str, r: usize) -> Result<()> {
        if r >= self.world_size() {
            return Err(CommError::invalid(format!(
                "{what}: group rank {r} is out of range for group `{}` of size {}",
                self.name,
                self.world_size()
            )));
        }
        Ok(())
    }

    fn default_dst(&self) -> usize {
        (self.rank_in_group + 1) % self.world_size()
    }

    fn default_src(&self) -> usize {
        let w = self.world_size();
        (self.rank_in_group + w - 1) % w
    }

    // ---------------------------------------------------------------- flat

    /// In-place all-reduce. A one-member group leaves the buffer unchanged.
    pub fn all_reduce<B: AsBufMut + ?Sized>(&self, buf: &mut B, op: ReduceOp) -> Result<()> {
        let dev = buf.as_buf()?.device();
        self.communicator_for(dev)?.all_reduce(buf, op)
    }

    /// `buf` on every member becomes group rank `src`'s.
    pub fn broadcast<B: AsBufMut + ?Sized>(&self, buf: &mut B, src: usize) -> Result<()> {
        self.check_member("broadcast", src)?;
        let dev = buf.as_buf()?.device();
        self.communicator_for(dev)?.broadcast(buf, src)
    }

    /// Sends `buf` to group rank `dst` (default: the next rank).
    pub fn send<B: AsBuf + ?Sized>(&self, buf: &B, dst: Option<usize>) -> Result<()> {
        let dst = dst.unwrap_or_else(|| self.default_dst());
        let dev = buf.as_buf()?.device();
        self.communicator_for(dev)?.send(buf, dst)
    }

    /// Receives a tensor of `shape` and `dtype` from group rank `src`
    /// (default: the previous rank), allocated on the group's device.
    pub fn recv(&self, shape: &[usize], dtype: DType, src: Option<usize>) -> Result<Tensor> {
        let mut t = Tensor::zeros_on(&TensorMetadata {
            device: self.device,
            dtype,
            shape: shape.to_vec(),
        })?;
        self.recv_into(&mut t, src)?;
        Ok(t)
    }

    /// Receives into `buf` from group rank `src` (default: the previous rank).
    pub fn recv_into<B: AsBufMut + ?Sized>(&self, buf: &mut B, src: Option<usize>) -> Result<()> {
        let src = src.unwrap_or_else(|| self.default_src());
        let dev = buf.as_buf()?.device();
        self.communicator_for(dev)?.recv(buf, src)
    }

    /// Returns once every member has entered the barrier (host plane).
    pub fn barrier(&self) -> Result<()> {
        self.host_communicator()?.barrier()
    }

    // ------------------------------------------------------------ lifecycle

    /// A graph-capture context: on CUDA groups it marks that the device
    /// plane's stream is captured (see comm-nccl's `graph_capture` for the
    /// stream itself); on CPU it does nothing.
    pub fn graph_capture(&self) -> Result<crate::device::GraphCaptureContext> {
        Ok(crate::device::GraphCaptureContext::new(
            self.local_rank,
            self.device_communicator()?.is_some(),
        ))
    }

    /// Gives up on the group because of `why`, an error this rank met
    /// outside it, blaming the ranks `why` blames (as this group's ranks; see
    /// [`Communicator::abort_for`]). Members waiting in a call on it fail at
    /// once, naming those ranks; later calls here fail with `why`.
    pub fn abort_for(&self, why: &CommError) {
        for plane in [&self.device_plane, &self.host] {
            if let Ok(g) = plane.read() {
                if let Some(c) = g.as_ref() {
                    let _ = c.abort_for(why);
                }
            }
        }
    }

    /// Releases the group's communicators; later calls return a clear error.
    pub fn destroy(&self) {
        if let Ok(mut g) = self.device_plane.write() {
            g.take();
        }
        if let Ok(mut g) = self.host.write() {
            g.take();
        }
    }

    /// True once [`destroy`](Self::destroy) has run.
    pub fn is_destroyed(&self) -> bool {
        self.host.read().map(|h| h.is_none()).unwrap_or(true)
    }
}

/// Group rank of global `rank` in `ranks`, checking membership and duplicates.
fn member_index(ranks: &[usize], rank: usize, name: &str) -> Result<usize> {
    let idx = ranks.iter().position(|&r| r == rank).ok_or_else(|| {
        CommError::invalid(format!(
            "rank {rank} is not a member of group `{name}` {ranks:?}"
        ))
    })?;
    let mut sorted = ranks.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.len() != ranks.len() {
        return Err(CommError::invalid(format!(
            "group `{name}` lists a rank twice: {ranks:?}"
        )));
    }
    Ok(idx)
}

/// Products of the dims before and after `d`.
pub(crate) fn split_dims(shape: &[usize], d: usize) -> (usize, usize) {
    (shape[..d].iter().product(), shape[d + 1..].iter().product())
}

/// Runs a host layout function on `t`, staging device tensors through host
/// memory and returning a tensor on `t`'s device.
pub(crate) fn on_host(t: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    if t.is_host() {
        return f(t);
    }
    let h = f(&t.to_host()?)?;
    let mut out = t.zeros_with_shape(h.shape().to_vec())?;
    out.copy_from(&h)?;
    Ok(out)
}
