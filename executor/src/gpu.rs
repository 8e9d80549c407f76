//! The gpu worker: FastVideo's `gpu_worker` in Rust. Its start-up chooses
//! and binds the rank's device, initialises the distributed environment and
//! the model-parallel groups from the configuration the executor sends
//! ([`ParallelConfig`]), builds the user's state (the model) once, reports
//! READY or the error (with its rank), and then serves typed calls until
//! the executor shuts it down.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use comm_core::{CommError, Device, Result};
use parallel_state::{choose_device, DeviceRequest, GroupCoordinator, InitOptions, ParallelState};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{Executor, LaunchConfig, Methods, Worker};

/// The distributed set-up of every gpu worker, decided by the driver and
/// sent by the executor (FastVideo's `tp_size`, `sp_size`, ring degree,
/// device and backend arguments).
///
/// ```
/// use executor::ParallelConfig;
/// let c = ParallelConfig::default().tp(2).sp(4).ring_degree(2).device("cuda");
/// assert!(c.check(8).is_ok());
/// assert!(c.check(6).is_err()); // 6 workers do not split into SP groups of 4
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ParallelConfig {
    /// Tensor-parallel degree (consecutive blocks of workers).
    pub tp: usize,
    /// Sequence-parallel degree (consecutive blocks of workers); 0: every
    /// worker in one SP group.
    pub sp: usize,
    /// Ring-attention degree inside each SP group (1: Ulysses only): the SP
    /// group splits into Ulysses groups of `sp / ring_degree` consecutive
    /// members and strided ring groups (USP; both always built, see
    /// [`GpuContext::ulysses_group`]).
    pub ring_degree: usize,
    /// The device each worker binds: `auto` (the local rank's GPU when
    /// CUDA is visible, else the CPU), `cpu`, `cuda` (the local rank's GPU)
    /// or `cuda:N` (parallel-state's `DeviceRequest`).
    pub device: String,
    /// Host backend forced for every group (`tcp`, `shm`, or any
    /// registered name); `None`: chosen per group.
    pub backend: Option<String>,
    /// Deadline of every blocking distributed operation (set-up included).
    pub timeout: Duration,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        ParallelConfig {
            tp: 1,
            sp: 0,
            ring_degree: 1,
            device: "auto".into(),
            backend: None,
            timeout: comm_core::default_timeout(),
        }
    }
}

impl ParallelConfig {
    /// With a tensor-parallel degree.
    pub fn tp(mut self, tp: usize) -> Self {
        self.tp = tp;
        self
    }
    /// With a sequence-parallel degree (0: all workers).
    pub fn sp(mut self, sp: usize) -> Self {
        self.sp = sp;
        self
    }
    /// With a ring-attention degree inside the SP groups.
    pub fn ring_degree(mut self, r: usize) -> Self {
        self.ring_degree = r;
        self
    }
    /// With a device request (`auto`, `cpu`, `cuda`, `cuda:N`).
    pub fn device(mut self, d: impl Into<String>) -> Self {
        self.device = d.into();
        self
    }
    /// Forcing a host backend.
    pub fn backend(mut self, b: impl Into<String>) -> Self {
        self.backend = Some(b.into());
        self
    }
    /// With a deadline for distributed operations.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// The SP degree for `world` workers (0 means all of them).
    pub fn sp_degree(&self, world: usize) -> usize {
        if self.sp == 0 {
            world
        } else {
            self.sp
        }
    }

    /// Checks the configuration against a job of `world` workers (the
    /// driver does before starting any, every worker again).
    pub fn check(&self, world: usize) -> Result<()> {
        self.device.parse::<DeviceRequest>()?;
        let sp = self.sp_degree(world);
        let bad = |why: String| Err(CommError::invalid(format!("parallel configuration: {why}")));
        if self.tp == 0 || sp == 0 || self.ring_degree == 0 {
            return bad(format!(
                "degrees must be at least 1 (tp {}, sp {sp}, ring {})",
                self.tp, self.ring_degree
            ));
        }
        if !world.is_multiple_of(self.tp) || !world.is_multiple_of(sp) {
            return bad(format!(
                "{world} workers do not split into TP groups of {} and SP groups of {sp}",
                self.tp
            ));
        }
        if !sp.is_multiple_of(self.ring_degree) {
            return bad(format!(
                "the SP degree {sp} does not divide by the ring degree {}",
                self.ring_degree
            ));
        }
        Ok(())
    }
}

/// What a gpu worker's start-up made: its device, its distributed state
/// with the model-parallel groups, and the configuration they came from.
#[derive(Debug)]
pub struct GpuContext {
    config: ParallelConfig,
    device: Device,
    parallel: ParallelState,
}

impl GpuContext {
    /// Chooses and binds the device, joins the world and builds the groups.
    fn set_up(worker: &Worker, config: ParallelConfig) -> Result<GpuContext> {
        let world = worker.world_size();
        config.check(world)?;
        let local_rank = std::env::var("LOCAL_RANK")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .ok_or_else(|| {
                CommError::invalid("LOCAL_RANK is not set: the executor or distrun sets it")
            })?;
        let request: DeviceRequest = config.device.parse()?;
        // Building the backend registry installs the CUDA allocator (with
        // the `nccl` feature), which the device choice looks at.
        drop(parallel_state::default_registry());
        let device = choose_device(request, local_rank)
            .map_err(|e| CommError::State(format!("choosing the device: {e}")))?;
        if let Device::Cuda(_) = device {
            // Bind: create the device's context now, so a broken GPU is an
            // initialisation error of this rank rather than of a later call.
            comm_core::device_allocator(device)
                .and_then(|a| a.device_uuid(device))
                .map_err(|e| CommError::State(format!("binding {device}: {e}")))?;
        }
        let mut opts = InitOptions::default()
            .with_device(device)
            .with_timeout(config.timeout);
        if let Some(b) = &config.backend {
            opts = opts.with_backend(b.clone());
        }
        let parallel = ParallelState::init_from_env(opts).map_err(|e| {
            CommError::State(format!("initialising the distributed environment: {e}"))
        })?;
        if parallel.rank() != worker.rank() || parallel.world_size() != world {
            return Err(CommError::State(format!(
                "the distributed environment says rank {} of {}, the executor rank {} of {world}",
                parallel.rank(),
                parallel.world_size(),
                worker.rank()
            )));
        }
        let sp = config.sp_degree(world);
        // The Ulysses and ring sub-groups always exist (ring degree 1: one
        // Ulysses group per SP group and rings of one), as in the main job.
        parallel
            .initialize_model_parallel(config.tp, sp, None)
            .and_then(|()| parallel.initialize_ulysses_ring(sp / config.ring_degree))
            .map_err(|e| CommError::State(format!("building the model-parallel groups: {e}")))?;
        Ok(GpuContext {
            config,
            device,
            parallel,
        })
    }

    /// The configuration the executor sent.
    pub fn config(&self) -> &ParallelConfig {
        &self.config
    }
    /// The device this worker bound.
    pub fn device(&self) -> Device {
        self.device
    }
    /// The distributed state: world, node and model-parallel groups.
    pub fn parallel(&self) -> &ParallelState {
        &self.parallel
    }
    /// This worker's global rank.
    pub fn rank(&self) -> usize {
        self.parallel.rank()
    }
    /// Number of workers.
    pub fn world_size(&self) -> usize {
        self.parallel.world_size()
    }
    /// The sequence-parallel group of this worker.
    pub fn sp_group(&self) -> Result<Arc<GroupCoordinator>> {
        self.parallel.sp_group()
    }
    /// The tensor-parallel group of this worker.
    pub fn tp_group(&self) -> Result<Arc<GroupCoordinator>> {
        self.parallel.tp_group()
    }
    /// The Ulysses sub-group of this worker's SP group (`sp / ring_degree`
    /// consecutive members).
    pub fn ulysses_group(&self) -> Result<Arc<GroupCoordinator>> {
        self.parallel.ulysses_group()
    }
    /// The ring sub-group of this worker's SP group (members strided by the
    /// Ulysses degree; one member with ring degree 1).
    pub fn ring_group(&self) -> Result<Arc<GroupCoordinator>> {
        self.parallel.ring_group()
    }
}

/// What every handler of a gpu worker gets: the start-up's context and the
/// user's state (the model), built once.
#[derive(Debug)]
pub struct GpuState<S> {
    /// Device and groups.
    pub ctx: GpuContext,
    /// The user's state.
    pub model: S,
}

/// The worker end of [`Executor::start_gpu`]: FastVideo's gpu_worker.
/// Its start-up chooses and binds the rank's device, initialises the
/// distributed environment and the model-parallel groups from the
/// [`ParallelConfig`] the executor sends, builds the user's state (the
/// model) once, reports READY or the error (with its rank), and then serves
/// typed calls until the executor shuts it down.
///
/// ```no_run
/// use executor::{Executor, GpuState, GpuWorker, LaunchConfig, Method, Methods, ParallelConfig};
/// use std::time::Duration;
///
/// /// The model's configuration, sent by the driver to every worker.
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct ModelConfig { hidden: usize }
/// struct Model { weights: Vec<f32> }
/// const SUM: Method<Vec<f32>, f32> = Method::new("sum");
///
/// fn worker_main() -> comm_core::Result<()> {
///     let mut methods = Methods::<GpuState<Model>>::new();
///     methods.on(&SUM, |st, x: Vec<f32>| {
///         // st.ctx: device and groups; st.model: the state built below.
///         let sp = st.ctx.parallel().sp_group().map_err(|e| e.to_string())?;
///         let local: f32 = x.iter().zip(&st.model.weights).map(|(a, b)| a * b).sum();
///         let mut t = comm_core::Tensor::from_vec1(vec![local]);
///         sp.all_reduce(&mut t, comm_core::ReduceOp::Sum).map_err(|e| e.to_string())?;
///         Ok::<_, String>(t.to_vec::<f32>().map_err(|e| e.to_string())?[0])
///     });
///     GpuWorker::from_env()?.run(
///         |_ctx, cfg: ModelConfig| Ok::<_, String>(Model { weights: vec![1.0; cfg.hidden] }),
///         &mut methods,
///     )
/// }
///
/// fn driver() -> comm_core::Result<()> {
///     let launch = LaunchConfig::new("my-worker", 4);
///     let parallel = ParallelConfig::default().sp(4).device("auto");
///     let ex = Executor::start_gpu(&launch, &parallel, &ModelConfig { hidden: 64 },
///                                  Duration::from_secs(300))?;
///     let sums = ex.collective_rpc(&SUM, &vec![0.5; 64], Duration::from_secs(60))?;
///     ex.shutdown()?;
///     Ok(())
/// }
/// ```
#[derive(Debug)]
pub struct GpuWorker {
    worker: Worker,
}

impl GpuWorker {
    /// Joins the executor that started this process ([`Worker::from_env`]).
    pub fn from_env() -> Result<GpuWorker> {
        Ok(GpuWorker {
            worker: Worker::from_env()?,
        })
    }

    /// This worker's global rank.
    pub fn rank(&self) -> usize {
        self.worker.rank()
    }

    /// Number of workers.
    pub fn world_size(&self) -> usize {
        self.worker.world_size()
    }

    /// Sets up from the executor's configuration (device, distributed
    /// environment, model-parallel groups), builds the model with
    /// `build(context, model_config)` once, reports READY (or the error of
    /// any step, or a panic, which the executor reports with this rank),
    /// then serves `methods` until the executor shuts down. The groups are
    /// destroyed on the way out.
    pub fn run<M, S, E>(
        self,
        build: impl FnOnce(&GpuContext, M) -> std::result::Result<S, E>,
        methods: &mut Methods<GpuState<S>>,
    ) -> Result<()>
    where
        M: DeserializeOwned,
        E: fmt::Display,
    {
        self.worker.run(
            |w| -> std::result::Result<GpuState<S>, String> {
                let (parallel, model): (ParallelConfig, M) =
                    w.init_value().map_err(|e| e.to_string())?;
                let ctx = GpuContext::set_up(w, parallel).map_err(|e| e.to_string())?;
                let model =
                    build(&ctx, model).map_err(|e| format!("building the model failed: {e}"))?;
                Ok(GpuState { ctx, model })
            },
            methods,
        )
    }
}

impl Executor {
    /// Starts gpu workers ([`GpuWorker::run`] in `cfg.program`): each
    /// binds its device and builds its groups from `parallel`, then builds
    /// its model from `model`. The configuration is checked against the
    /// job's size first; otherwise as [`Executor::start`].
    pub fn start_gpu<M: Serialize>(
        cfg: &LaunchConfig,
        parallel: &ParallelConfig,
        model: &M,
        ready_timeout: Duration,
    ) -> Result<Executor> {
        parallel.check(cfg.world_size())?;
        Self::start_with(cfg, ready_timeout, &(parallel, model))
    }
}
