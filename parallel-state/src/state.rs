//! `ParallelState`: the explicit value holding the world, node and
//! model-parallel groups of one process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use comm_core::{BackendFactory, CommError, Device, Registry, Result, Store};
use dist_utils::rendezvous::RankInfo;
use dist_utils::{HashStore, PrefixStore};

use crate::coordinator::{GroupCoordinator, GroupOptions};
use crate::device::DeviceRequest;
use crate::layout::{self, GroupLayout, LayoutKind};

/// Options of [`ParallelState::init`]. `#[non_exhaustive]`: start from
/// [`InitOptions::default`] and use the `with_*` methods.
///
/// ```
/// use parallel_state::{Device, InitOptions};
/// let o = InitOptions::default().with_device(Device::Cpu).with_backend("tcp");
/// assert_eq!(o.backend.as_deref(), Some("tcp"));
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct InitOptions {
    /// Deadline of every blocking operation (set-up and collectives).
    pub timeout: Duration,
    /// Forces a backend by name for every group (`None`: automatic, or
    /// `DIST_BACKEND`); any registered backend can be named.
    pub backend: Option<String>,
    /// Device whose tensors the data planes move. `Auto` (the default)
    /// chooses as FastVideo does: `cuda:{local_rank % count}` when CUDA
    /// devices are visible (feature `nccl`), else the CPU; `DIST_DEVICE`
    /// overrides it.
    pub device: DeviceRequest,
    /// Use the shared-memory message queue for `broadcast_object` from rank 0
    /// of groups that live on one host.
    pub use_message_queue_broadcaster: bool,
    /// Extra backends, registered next to the built-in ones (a factory with
    /// a built-in's name replaces it).
    pub backends: Vec<Arc<dyn BackendFactory>>,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            timeout: comm_core::default_timeout(),
            backend: None,
            device: DeviceRequest::Auto,
            use_message_queue_broadcaster: false,
            backends: Vec::new(),
        }
    }
}

impl InitOptions {
    /// With a deadline for every blocking operation.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
    /// Forcing the backend `name` for every group.
    pub fn with_backend(mut self, name: impl Into<String>) -> Self {
        self.backend = Some(name.into());
        self
    }
    /// With a device (`Device::Cuda(1)`, or a [`DeviceRequest`] such as
    /// `"cuda".parse()?` for the local rank's GPU) instead of the automatic
    /// choice.
    pub fn with_device(mut self, device: impl Into<DeviceRequest>) -> Self {
        self.device = device.into();
        self
    }
    /// With the message-queue broadcaster on host groups.
    pub fn with_message_queue(mut self, yes: bool) -> Self {
        self.use_message_queue_broadcaster = yes;
        self
    }
    /// Registering an extra backend factory.
    pub fn with_factory(mut self, f: Arc<dyn BackendFactory>) -> Self {
        self.backends.push(f);
        self
    }
}

/// The model-parallel groups created by `initialize_model_parallel`.
#[derive(Debug, Clone)]
pub struct ModelGroups {
    /// Tensor-parallel group of this rank.
    pub tp: Arc<GroupCoordinator>,
    /// Sequence-parallel group of this rank.
    pub sp: Arc<GroupCoordinator>,
    /// Data-parallel group of this rank.
    pub dp: Arc<GroupCoordinator>,
    /// Ulysses sub-group of the SP group, after `initialize_ulysses_ring`.
    pub ulysses: Option<Arc<GroupCoordinator>>,
    /// Ring sub-group of the SP group, after `initialize_ulysses_ring`.
    pub ring: Option<Arc<GroupCoordinator>>,
    /// Every group of the layout (all ranks), for inspection.
    pub layout: GroupLayout,
    /// The layout kind used.
    pub kind: LayoutKind,
}

/// Everything distributed about one process: its rank, the store, and its
/// groups. Create one with [`ParallelState::init`]; the global functions of
/// this crate are a thin layer over a process-wide instance.
///
/// ```no_run
/// use parallel_state::{ParallelState, InitOptions};
/// // Every rank of a `distrun --nproc-per-node 4` launch runs:
/// let ps = ParallelState::init_from_env(InitOptions::default()).unwrap();
/// ps.initialize_model_parallel(2, 2, None).unwrap();
/// let tp = ps.tp_group().unwrap();
/// assert_eq!(tp.world_size(), 2);
/// ```
#[derive(Debug)]
pub struct ParallelState {
    rank: usize,
    world_size: usize,
    local_rank: usize,
    store: Arc<dyn Store>,
    node_ranks: Vec<usize>,
    opts: InitOptions,
    device: Device,
    backends: Arc<Registry>,
    world: Arc<GroupCoordinator>,
    node: Arc<GroupCoordinator>,
    model: RwLock<Option<ModelGroups>>,
    registry: Mutex<HashMap<String, Weak<GroupCoordinator>>>,
    name_counts: Mutex<HashMap<String, usize>>,
    custom_all_reduce: AtomicBool,
}

fn lock_err<T>(_: T) -> CommError {
    CommError::State("parallel state lock poisoned by a panic on another thread".into())
}

impl ParallelState {
    /// Joins the world: `init_method` is `env://`, `tcp://host:port` or
    /// `file://path`. A world of one needs no store or network.
    pub fn init(
        world_size: usize,
        rank: usize,
        init_method: &str,
        local_rank: Option<usize>,
        opts: InitOptions,
    ) -> Result<Self> {
        if world_size == 0 {
            return Err(CommError::invalid("world_size must be at least 1"));
        }
        if rank >= world_size {
            return Err(CommError::invalid(format!(
                "rank {rank} is out of range for world_size {world_size}"
            )));
        }
        // The environment supplies the store address, secret and node layout;
        // the arguments override rank, world size and local rank.
        let mut info = RankInfo::from_env().unwrap_or_else(|_| RankInfo::single_process());
        let local_rank = local_rank.unwrap_or(if info.world_size == world_size {
            info.local_rank
        } else {
            rank
        });
        if info.world_size != world_size {
            info.local_world_size = world_size;
            info.node_rank = 0;
        }
        info.rank = rank;
        info.world_size = world_size;
        info.local_rank = local_rank;
        let store: Arc<dyn Store> = if world_size == 1 {
            Arc::new(HashStore::new())
        } else {
            dist_utils::rendezvous::init_store(init_method, &info, opts.timeout)?
        };
        Self::with_store(store, rank, world_size, local_rank, opts)
    }

    /// Joins the world described by the environment (torchrun, distrun,
    /// Slurm, Open MPI or PMI variables); a process with none is a world of 1.
    pub fn init_from_env(opts: InitOptions) -> Result<Self> {
        match RankInfo::from_env() {
            Ok(info) => Self::init(
                info.world_size,
                info.rank,
                "env://",
                Some(info.local_rank),
                opts,
            ),
            Err(e) => {
                if std::env::var_os("RANK").is_some() || std::env::var_os("WORLD_SIZE").is_some() {
                    return Err(e);
                }
                Self::init(1, 0, "env://", Some(0), opts)
            }
        }
    }

    /// Builds the state over an existing store (every rank passes a store
    /// reaching the same keys).
    pub fn with_store(
        store: Arc<dyn Store>,
        rank: usize,
        world_size: usize,
        local_rank: usize,
        opts: InitOptions,
    ) -> Result<Self> {
        let node_ranks = if world_size == 1 {
            vec![rank]
        } else {
            let probe = PrefixStore::new("same-host", store.clone());
            dist_utils::same_host_ranks(&probe, rank, world_size, opts.timeout)?
        };
        // The registry first: building it installs the device allocator
        // (feature `nccl`), which the device choice looks at.
        let registry = Arc::new(crate::backend::registry_with(&opts.backends));
        let device = crate::device::choose_device(opts.device, local_rank)?;
        let mut st = ParallelState {
            rank,
            world_size,
            local_rank,
            store,
            device,
            backends: registry,
            node_ranks: node_ranks.clone(),
            world: Arc::new(GroupCoordinator::single(rank, local_rank, "world-pending")),
            node: Arc::new(GroupCoordinator::single(rank, local_rank, "node-pending")),
            opts,
            model: RwLock::new(None),
            registry: Mutex::new(HashMap::new()),
            name_counts: Mutex::new(HashMap::new()),
            custom_all_reduce: AtomicBool::new(true),
        };
        st.world = st.new_group(
            (0..world_size).collect(),
            "world",
            st.opts.use_message_queue_broadcaster,
        )?;
        st.node = st.new_group(node_ranks, "node", false)?;
        Ok(st)
    }

    /// This process's global rank.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// Number of processes.
    pub fn world_size(&self) -> usize {
        self.world_size
    }
    /// Rank on this host.
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }
    /// Global ranks on this host, sorted.
    pub fn node_ranks(&self) -> &[usize] {
        &self.node_ranks
    }
    /// The store every group's set-up goes through.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }
    /// The device this process's data planes move.
    pub fn local_device(&self) -> Device {
        self.device
    }
    /// The backends groups are built from.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.backends
    }
    /// The world group.
    pub fn world_group(&self) -> Arc<GroupCoordinator> {
        self.world.clone()
    }
    /// The group of ranks on this host.
    pub fn node_group(&self) -> Arc<GroupCoordinator> {
        self.node.clone()
    }

    fn unique_name(&self, name: &str) -> Result<String> {
        let mut c = self.name_counts.lock().map_err(lock_err)?;
        let n = c.entry(name.to_string()).or_insert(0);
        let u = format!("{name}:{n}");
        *n += 1;
        Ok(u)
    }

    /// Creates the group `ranks` (this rank must be a member), collectively
    /// with its other members. The group gets a unique name `{name}:{k}` and
    /// is registered under it.
    pub fn new_group(
        &self,
        ranks: Vec<usize>,
        name: &str,
        use_mq: bool,
    ) -> Result<Arc<GroupCoordinator>> {
        if let Some(bad) = ranks.iter().find(|&&r| r >= self.world_size) {
            return Err(CommError::invalid(format!(
                "group `{name}` names rank {bad}, outside the world of {}",
                self.world_size
            )));
        }
        let unique = self.unique_name(name)?;
        let g = if ranks.len() == 1 && ranks[0] == self.rank {
            GroupCoordinator::single(self.rank, self.local_rank, unique.clone())
        } else {
            let key = ranks
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(",");
            let store: Arc<dyn Store> = Arc::new(PrefixStore::new(
                format!("pg/{unique}/{key}"),
                self.store.clone(),
            ));
            let on_host = ranks.iter().all(|r| self.node_ranks.contains(r));
            let mut opts = GroupOptions::default();
            opts.timeout = self.opts.timeout;
            opts.backend = self.opts.backend.clone();
            opts.device = self.device;
            opts.use_message_queue_broadcaster = use_mq;
            opts.registry = self.backends.clone();
            GroupCoordinator::new(
                ranks,
                self.rank,
                self.local_rank,
                unique.clone(),
                store,
                on_host,
                opts,
            )?
        };
        let g = Arc::new(g);
        self.registry
            .lock()
            .map_err(lock_err)?
            .insert(unique, Arc::downgrade(&g));
        Ok(g)
    }

    /// vLLM's `init_model_parallel_group`: every rank passes every group's
    /// ranks; it builds and returns the one containing this rank.
    pub fn init_model_parallel_group(
        &self,
        group_ranks: &[Vec<usize>],
        name: &str,
        use_message_queue_broadcaster: bool,
    ) -> Result<Arc<GroupCoordinator>> {
        let mine = layout::group_of(group_ranks, self.rank).ok_or_else(|| {
            CommError::invalid(format!(
                "rank {} is in none of the `{name}` groups {group_ranks:?}",
                self.rank
            ))
        })?;
        self.new_group(mine.clone(), name, use_message_queue_broadcaster)
    }

    /// Builds the tensor-, sequence- and data-parallel groups with FastVideo's
    /// layout (see DESIGN.md). `dp`, when given, must equal `world / sp`.
    /// Calling it twice without `destroy_model_parallel` is an error.
    pub fn initialize_model_parallel(&self, tp: usize, sp: usize, dp: Option<usize>) -> Result<()> {
        self.initialize_model_parallel_with(tp, sp, dp, LayoutKind::FastVideo)
    }

    /// [`initialize_model_parallel`](Self::initialize_model_parallel) with a
    /// chosen layout (e.g. the orthogonal [`LayoutKind::Mesh`]).
    pub fn initialize_model_parallel_with(
        &self,
        tp: usize,
        sp: usize,
        dp: Option<usize>,
        kind: LayoutKind,
    ) -> Result<()> {
        if self.model.read().map_err(lock_err)?.is_some() {
            return Err(CommError::State(
                "model parallel groups are already initialized; call destroy_model_parallel first"
                    .into(),
            ));
        }
        let l = match kind {
            LayoutKind::FastVideo => layout::fastvideo_layout(self.world_size, tp, sp, dp)?,
            LayoutKind::Mesh => layout::mesh_layout(self.world_size, tp, sp, dp)?,
        };
        let mq = self.opts.use_message_queue_broadcaster;
        let tp_g = self.init_model_parallel_group(&l.tp, "tp", mq)?;
        let sp_g = self.init_model_parallel_group(&l.sp, "sp", false)?;
        let dp_g = self.init_model_parallel_group(&l.dp, "dp", false)?;
        let mut m = self.model.write().map_err(lock_err)?;
        if m.is_some() {
            return Err(CommError::State(
                "model parallel groups were initialized concurrently".into(),
            ));
        }
        *m = Some(ModelGroups {
            tp: tp_g,
            sp: sp_g,
            dp: dp_g,
            ulysses: None,
            ring: None,
            layout: l,
            kind,
        });
        Ok(())
    }

    /// Splits this rank's SP group into Ulysses sub-groups of `ulysses`
    /// consecutive members and strided ring groups (USP).
    pub fn initialize_ulysses_ring(&self, ulysses: usize) -> Result<()> {
        let sp = self.sp_group()?;
        let (u, r) = layout::ulysses_ring_split(sp.ranks(), ulysses)?;
        let ug = self.init_model_parallel_group(&u, "ulysses", false)?;
        let rg = self.init_model_parallel_group(&r, "ring", false)?;
        let mut m = self.model.write().map_err(lock_err)?;
        let m = m.as_mut().ok_or_else(not_initialized)?;
        m.ulysses = Some(ug);
        m.ring = Some(rg);
        Ok(())
    }

    /// FastVideo's `initialize_tensor_parallel_group`: consecutive blocks of
    /// `size` ranks, named `tp{suffix}`, returned (not installed as the TP group).
    pub fn initialize_tensor_parallel_group(
        &self,
        size: usize,
        suffix: &str,
    ) -> Result<Arc<GroupCoordinator>> {
        let l = layout::fastvideo_layout(self.world_size, size, 1, None)?;
        self.init_model_parallel_group(&l.tp, &format!("tp{suffix}"), false)
    }

    /// FastVideo's `initialize_sequence_parallel_group`: consecutive blocks of
    /// `size` ranks, named `sp{suffix}`.
    pub fn initialize_sequence_parallel_group(
        &self,
        size: usize,
        suffix: &str,
    ) -> Result<Arc<GroupCoordinator>> {
        let l = layout::fastvideo_layout(self.world_size, 1, size, None)?;
        self.init_model_parallel_group(&l.sp, &format!("sp{suffix}"), false)
    }

    /// True once `initialize_model_parallel` has run.
    pub fn model_parallel_is_initialized(&self) -> bool {
        self.model.read().map(|m| m.is_some()).unwrap_or(false)
    }

    /// The model-parallel groups.
    pub fn model_groups(&self) -> Result<ModelGroups> {
        self.model
            .read()
            .map_err(lock_err)?
            .clone()
            .ok_or_else(not_initialized)
    }
    /// The tensor-parallel group.
    pub fn tp_group(&self) -> Result<Arc<GroupCoordinator>> {
        Ok(self.model_groups()?.tp)
    }
    /// The sequence-parallel group.
    pub fn sp_group(&self) -> Result<Arc<GroupCoordinator>> {
        Ok(self.model_groups()?.sp)
    }
    /// The data-parallel group.
    pub fn dp_group(&self) -> Result<Arc<GroupCoordinator>> {
        Ok(self.model_groups()?.dp)
    }
    /// The Ulysses sub-group (after `initialize_ulysses_ring`).
    pub fn ulysses_group(&self) -> Result<Arc<GroupCoordinator>> {
        self.model_groups()?
            .ulysses
            .ok_or_else(|| CommError::State("initialize_ulysses_ring has not run".into()))
    }
    /// The ring sub-group (after `initialize_ulysses_ring`).
    pub fn ring_group(&self) -> Result<Arc<GroupCoordinator>> {
        self.model_groups()?
            .ring
            .ok_or_else(|| CommError::State("initialize_ulysses_ring has not run".into()))
    }

    /// Replaces the TP group until the returned guard drops (also during a
    /// panic's unwinding), then restores the previous one.
    pub fn patch_tensor_parallel_group(&self, group: Arc<GroupCoordinator>) -> Result<TpPatch<'_>> {
        let mut m = self.model.write().map_err(lock_err)?;
        let m = m.as_mut().ok_or_else(not_initialized)?;
        let previous = std::mem::replace(&mut m.tp, group);
        Ok(TpPatch {
            state: self,
            previous: Some(previous),
        })
    }

    /// A group registered under its unique name (e.g. `tp:0`), if alive.
    pub fn group_by_name(&self, name: &str) -> Result<Arc<GroupCoordinator>> {
        self.registry
            .lock()
            .map_err(lock_err)?
            .get(name)
            .and_then(Weak::upgrade)
            .ok_or_else(|| CommError::invalid(format!("no live group is registered as `{name}`")))
    }

    /// Records whether a custom (non-NCCL) all-reduce may be used on CUDA
    /// groups. Host groups always use their backend's own algorithms.
    pub fn set_custom_all_reduce(&self, enable: bool) {
        self.custom_all_reduce.store(enable, Ordering::Relaxed);
    }
    /// The flag set by [`set_custom_all_reduce`](Self::set_custom_all_reduce).
    pub fn custom_all_reduce(&self) -> bool {
        self.custom_all_reduce.load(Ordering::Relaxed)
    }

    /// Destroys the model-parallel groups (world and node stay).
    pub fn destroy_model_parallel(&self) {
        if let Ok(mut m) = self.model.write() {
            if let Some(m) = m.take() {
                for g in [Some(m.tp), Some(m.sp), Some(m.dp), m.ulysses, m.ring]
                    .into_iter()
                    .flatten()
                {
                    g.destroy();
                }
            }
        }
    }

    /// Destroys every group.
    pub fn destroy(&self) {
        self.destroy_model_parallel();
        self.node.destroy();
        self.world.destroy();
    }
}

impl Drop for ParallelState {
    fn drop(&mut self) {
        self.destroy();
    }
}

fn not_initialized() -> CommError {
    CommError::State(
        "model parallel groups are not initialized; call initialize_model_parallel first".into(),
    )
}

/// Restores the previous tensor-parallel group when dropped.
#[derive(Debug)]
pub struct TpPatch<'a> {
    state: &'a ParallelState,
    previous: Option<Arc<GroupCoordinator>>,
}

impl Drop for TpPatch<'_> {
    fn drop(&mut self) {
        // A poisoned lock still holds valid groups: restore through it.
        let mut m = match self.state.model.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let (Some(m), Some(prev)) = (m.as_mut(), self.previous.take()) {
            m.tp = prev;
        }
    }
}
