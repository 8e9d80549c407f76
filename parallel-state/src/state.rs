//! `ParallelState`: the explicit value holding the world, node and
//! model-parallel groups of one process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use comm_core::{
    BackendFactory, CommError, DType, Device, Missing, Registry, Result, Store, Tensor,
    TensorMetadata,
};
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
    node: RwLock<Option<Arc<GroupCoordinator>>>,
    model: RwLock<Option<ModelGroups>>,
    registry: Mutex<HashMap<String, Weak<GroupCoordinator>>>,
    name_counts: Mutex<HashMap<String, usize>>,
    custom_all_reduce: AtomicBool,
    /// Name of the SP group `warmup_sequence_parallel_communication` last
    /// warmed (a new SP group, after a re-initialization, is warmed again).
    sp_warmed: Mutex<Option<String>>,
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
            node_ranks,
            world: Arc::new(GroupCoordinator::single(rank, local_rank, "world-pending")),
            node: RwLock::new(None),
            opts,
            model: RwLock::new(None),
            registry: Mutex::new(HashMap::new()),
            name_counts: Mutex::new(HashMap::new()),
            custom_all_reduce: AtomicBool::new(true),
            sp_warmed: Mutex::new(None),
        };
        st.world = st.new_group(
            (0..world_size).collect(),
            "world",
            st.opts.use_message_queue_broadcaster,
        )?;
        if let Err(e) = st.init_node_group(None) {
            return Err(st.abandon_world(e));
        }
        Ok(st)
    }

    /// The node group's set-up failed with `e` after the world group was
    /// built: tells the world group's other members (who may already wait
    /// in a call on it) whom `e` blames, instead of letting them find this
    /// rank's connections gone and blame it. Returns `e`.
    fn abandon_world(&self, e: CommError) -> CommError {
        let culprits: Vec<Missing> = e
            .culprits()
            .into_iter()
            .filter_map(|r| r.global.or_else(|| self.node_ranks.get(r.group).copied()))
            .filter(|&g| g != self.rank)
            .map(|g| Missing::new(g, "blamed by the node group's failed set-up"))
            .collect();
        let why = CommError::peer_aborted(
            self.rank,
            "the node group's set-up",
            e.to_string(),
            culprits,
        );
        self.world.abort_for(&why);
        e
    }

    /// `Ok` when `world_size`, `rank`, `local_rank` and `backend` agree with
    /// this state; otherwise an error naming each value that differs, the
    /// state's and the requested one. `None` for `local_rank` or `backend`
    /// means "whatever was chosen". A requested backend agrees when it is the
    /// one forced at initialization, or, when none was forced, one of the
    /// world group's planes (`shm`, `tcp`, `nccl`, `single`; aliases such as
    /// `gloo` and `cuda` count).
    ///
    /// This is what a repeated `init_distributed_environment` checks.
    pub fn check_environment(
        &self,
        world_size: usize,
        rank: usize,
        local_rank: Option<usize>,
        backend: Option<&str>,
    ) -> Result<()> {
        let mut diffs = Vec::new();
        if world_size != self.world_size {
            diffs.push(format!(
                "world_size: initialized with {}, now {world_size}",
                self.world_size
            ));
        }
        if rank != self.rank {
            diffs.push(format!("rank: initialized with {}, now {rank}", self.rank));
        }
        if let Some(l) = local_rank.filter(|&l| l != self.local_rank) {
            diffs.push(format!(
                "local_rank: initialized with {}, now {l}",
                self.local_rank
            ));
        }
        if let Some(b) = backend {
            let want = crate::backend::canonical(b);
            let (agrees, have) = match &self.opts.backend {
                Some(forced) => {
                    let forced = crate::backend::canonical(forced);
                    (forced == want, format!("`{forced}`"))
                }
                None => {
                    let w = &self.world;
                    let planes: Vec<&str> = std::iter::once(w.host_backend())
                        .chain(w.device_backend())
                        .collect();
                    (
                        planes.contains(&want.as_str()),
                        format!(
                            "the automatic choice (world group: {})",
                            planes
                                .iter()
                                .map(|p| format!("`{p}`"))
                                .collect::<Vec<_>>()
                                .join(" + ")
                        ),
                    )
                }
            };
            if !agrees {
                diffs.push(format!("backend: initialized with {have}, now `{want}`"));
            }
        }
        if diffs.is_empty() {
            return Ok(());
        }
        Err(CommError::State(format!(
            "the distributed environment is already initialized differently: {}; call \
             destroy_distributed_environment first to change it",
            diffs.join("; ")
        )))
    }

    /// `Ok` when `local_rank` is this process's (FastVideo's functions take
    /// it as an argument; here it is fixed at initialization).
    pub(crate) fn check_local_rank(&self, what: &str, local_rank: usize) -> Result<()> {
        if local_rank != self.local_rank {
            return Err(CommError::invalid(format!(
                "{what}: local_rank {local_rank} differs from this process's local rank {} (set \
                 when the environment was initialized)",
                self.local_rank
            )));
        }
        Ok(())
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
    /// The group of ranks on this host. An error after
    /// [`destroy_model_parallel`](Self::destroy_model_parallel) (which
    /// destroys it, as FastVideo's does) until
    /// [`init_node_group`](Self::init_node_group) builds a new one.
    pub fn node_group(&self) -> Result<Arc<GroupCoordinator>> {
        self.node.read().map_err(lock_err)?.clone().ok_or_else(|| {
            CommError::State(
                "the node group is not initialized (destroy_model_parallel destroys it); call \
                 init_node_group"
                    .into(),
            )
        })
    }

    /// FastVideo's `init_node_group`: builds the group of the ranks on this
    /// host and installs it as the node group (a previous one is replaced,
    /// not destroyed: holders keep using it). Collective over those ranks.
    ///
    /// Unlike FastVideo, which assumes every host runs the same number of
    /// ranks in consecutive blocks, the members are the ranks found on this
    /// host by the shared-memory probe at initialization, so uneven hosts work.
    /// `backend` forces a backend for this group (`None`: as the state).
    pub fn init_node_group(&self, backend: Option<&str>) -> Result<Arc<GroupCoordinator>> {
        let g = self.new_group_with(self.node_ranks.clone(), "node", false, backend)?;
        *self.node.write().map_err(lock_err)? = Some(g.clone());
        Ok(g)
    }

    /// The node group, built again if `destroy_model_parallel` destroyed it
    /// (what FastVideo's `init_distributed_environment` does). Collective
    /// over this host's ranks when it builds.
    pub fn ensure_node_group(&self) -> Result<Arc<GroupCoordinator>> {
        if let Some(g) = self.node.read().map_err(lock_err)?.clone() {
            return Ok(g);
        }
        self.init_node_group(None)
    }

    /// FastVideo's `init_world_group(ranks, local_rank, backend)`: a new
    /// group over `ranks` named `world` (this rank must be a member), with
    /// `backend` forced when given. It is returned, not installed: the
    /// state's world group stays. `local_rank` must be this process's.
    pub fn init_world_group(
        &self,
        ranks: &[usize],
        local_rank: usize,
        backend: Option<&str>,
    ) -> Result<Arc<GroupCoordinator>> {
        self.check_local_rank("init_world_group", local_rank)?;
        self.new_group_with(ranks.to_vec(), "world", false, backend)
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
        self.new_group_with(ranks, name, use_mq, None)
    }

    /// [`new_group`](Self::new_group) with `backend` forced for this group
    /// (`None`: the state's choice).
    pub fn new_group_with(
        &self,
        ranks: Vec<usize>,
        name: &str,
        use_mq: bool,
        backend: Option<&str>,
    ) -> Result<Arc<GroupCoordinator>> {
        if let Some(bad) = ranks.iter().find(|&&r| r >= self.world_size) {
            return Err(CommError::invalid(format!(
                "group `{name}` names rank {bad}, outside the world of {}",
                self.world_size
            )));
        }
        let unique = self.unique_name(name)?;
        let g = if ranks.len() == 1 && ranks[0] == self.rank {
            GroupCoordinator::single_on(self.rank, self.local_rank, unique.clone(), self.device)
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
            opts.backend = backend
                .map(str::to_string)
                .or_else(|| self.opts.backend.clone());
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
        self.init_model_parallel_group_with(group_ranks, name, use_message_queue_broadcaster, None)
    }

    /// [`init_model_parallel_group`](Self::init_model_parallel_group) with
    /// `backend` forced for the group (`None`: the state's choice).
    pub fn init_model_parallel_group_with(
        &self,
        group_ranks: &[Vec<usize>],
        name: &str,
        use_message_queue_broadcaster: bool,
        backend: Option<&str>,
    ) -> Result<Arc<GroupCoordinator>> {
        let mine = layout::group_of(group_ranks, self.rank).ok_or_else(|| {
            CommError::invalid(format!(
                "rank {} is in none of the `{name}` groups {group_ranks:?}",
                self.rank
            ))
        })?;
        self.new_group_with(mine.clone(), name, use_message_queue_broadcaster, backend)
    }

    /// Builds the tensor-, sequence- and data-parallel groups with FastVideo's
    /// layout (see the crate docs, "Group layouts"). `dp`, when given, must
    /// equal `world / sp`.
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
    /// `size` ranks, named `tp_{suffix}` (`tp` for an empty suffix), so the
    /// first one is registered as `tp_{suffix}:0`; returned, not installed
    /// as the TP group (see
    /// [`patch_tensor_parallel_group`](Self::patch_tensor_parallel_group)).
    /// Uses the message-queue broadcaster when the state does, like the TP
    /// group.
    pub fn initialize_tensor_parallel_group(
        &self,
        size: usize,
        suffix: &str,
    ) -> Result<Arc<GroupCoordinator>> {
        let l = layout::fastvideo_layout(self.world_size, size, 1, None)?;
        let mq = self.opts.use_message_queue_broadcaster;
        self.init_model_parallel_group(&l.tp, &suffixed("tp", suffix), mq)
    }

    /// FastVideo's `initialize_sequence_parallel_group`: consecutive blocks of
    /// `size` ranks, named `sp_{suffix}` (`sp` for an empty suffix).
    pub fn initialize_sequence_parallel_group(
        &self,
        size: usize,
        suffix: &str,
    ) -> Result<Arc<GroupCoordinator>> {
        let l = layout::fastvideo_layout(self.world_size, 1, size, None)?;
        self.init_model_parallel_group(&l.sp, &suffixed("sp", suffix), false)
    }

    /// FastVideo's `warmup_sequence_parallel_communication`: runs both
    /// Ulysses all-to-all modes and an all-gather on small bf16 tensors over
    /// the SP group, on `device` (default: this process's device, where
    /// FastVideo defaults to `cuda`), then waits for them, so the first real
    /// step does not pay for lazy set-up (NCCL communicators, connections,
    /// workspaces). Collective over the SP group.
    ///
    /// Does nothing before `initialize_model_parallel`, on an SP group of
    /// one, or on an SP group it already warmed (a new SP group, after a
    /// re-initialization, is warmed again).
    pub fn warmup_sequence_parallel_communication(&self, device: Option<Device>) -> Result<()> {
        if !self.model_parallel_is_initialized() {
            return Ok(());
        }
        let sp = self.sp_group()?;
        let mut warmed = self.sp_warmed.lock().map_err(lock_err)?;
        if warmed.as_deref() == Some(sp.name()) {
            return Ok(());
        }
        let p = sp.world_size();
        if p > 1 {
            let device = device.unwrap_or(self.device);
            tracing::info!(sp = p, %device, "warming up sequence parallel communication");
            let zeros = |shape: [usize; 4]| {
                Tensor::zeros_on(&TensorMetadata {
                    device,
                    dtype: DType::BF16,
                    shape: shape.to_vec(),
                })
            };
            let (seq, heads, head_dim) = (16, 4 * p, 64);
            sp.all_to_all_4d(&zeros([1, seq, heads, head_dim])?, 2, 1)?;
            sp.all_to_all_4d(&zeros([1, seq * p, heads / p, head_dim])?, 1, 2)?;
            sp.all_gather(&zeros([1, 8, heads / p, head_dim])?, 2)?;
            sp.communicator_for(device)?.synchronize()?;
        }
        *warmed = Some(sp.name().to_string());
        Ok(())
    }

    /// FastVideo's `get_same_node_ranks(pg, source_rank)`: the global ranks
    /// of `group` on the same host as its member `source_rank` (a group
    /// rank), found by the shared-memory probe (a segment created by each
    /// member, opened by the others, unlinked before returning). Collective
    /// over `group`; every member gets the same list, in group order.
    pub fn get_same_node_ranks(
        &self,
        group: &GroupCoordinator,
        source_rank: usize,
    ) -> Result<Vec<usize>> {
        let w = group.world_size();
        if source_rank >= w {
            return Err(CommError::invalid(format!(
                "get_same_node_ranks: source rank {source_rank} is out of range for group `{}` \
                 of size {w}",
                group.name()
            )));
        }
        if w == 1 {
            return Ok(group.ranks().to_vec());
        }
        let key = group
            .ranks()
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let store = PrefixStore::new(
            format!("same-node/{}/{key}", group.name()),
            self.store.clone(),
        );
        let mine = dist_utils::same_host_ranks(&store, group.rank_in_group(), w, group.timeout())?;
        let is_source = group.rank_in_group() == source_rank;
        let theirs: Vec<usize> = group.broadcast_object(is_source.then_some(&mine), source_rank)?;
        theirs
            .iter()
            .map(|&i| {
                group.ranks().get(i).copied().ok_or_else(|| {
                    CommError::Protocol(format!(
                        "get_same_node_ranks: group rank {source_rank} reported member {i} of a \
                         group of {w}"
                    ))
                })
            })
            .collect()
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

    /// Accepted for compatibility with FastVideo / vLLM and otherwise
    /// ignored: there is no custom all-reduce here; every group uses its
    /// backend's own all-reduce (NCCL on CUDA groups, the shm or TCP
    /// backend's algorithms on the host plane), whatever the flag says.
    /// The value is only kept so that [`custom_all_reduce`](Self::custom_all_reduce)
    /// reports what was set (FastVideo also stores the flag and never reads it).
    pub fn set_custom_all_reduce(&self, enable: bool) {
        self.custom_all_reduce.store(enable, Ordering::Relaxed);
    }
    /// The flag last given to [`set_custom_all_reduce`](Self::set_custom_all_reduce)
    /// (initially `true`); it changes nothing.
    pub fn custom_all_reduce(&self) -> bool {
        self.custom_all_reduce.load(Ordering::Relaxed)
    }

    /// Destroys the model-parallel groups and the node group, as FastVideo
    /// does (the world group stays). [`ensure_node_group`](Self::ensure_node_group)
    /// or [`init_node_group`](Self::init_node_group) builds a new node group.
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
        if let Ok(mut n) = self.node.write() {
            if let Some(n) = n.take() {
                n.destroy();
            }
        }
    }

    /// Destroys every group.
    pub fn destroy(&self) {
        self.destroy_model_parallel();
        self.world.destroy();
    }
}

impl Drop for ParallelState {
    fn drop(&mut self) {
        self.destroy();
    }
}

/// FastVideo's group names: `{base}_{suffix}`, or `base` without a suffix.
fn suffixed(base: &str, suffix: &str) -> String {
    if suffix.is_empty() {
        base.to_string()
    } else {
        format!("{base}_{suffix}")
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
