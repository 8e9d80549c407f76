//! A process-wide [`ParallelState`] behind FastVideo's / vLLM's function
//! names, for code ported from Python. Each function is a thin call on the
//! explicit state.

use std::sync::{Arc, RwLock};

use comm_core::{CommError, Device, ReduceOp, Result, Tensor};

use crate::coordinator::GroupCoordinator;
use crate::state::{InitOptions, ParallelState};

static STATE: RwLock<Option<Arc<ParallelState>>> = RwLock::new(None);

fn state() -> Result<Arc<ParallelState>> {
    STATE
        .read()
        .map_err(|_| CommError::State("global parallel state lock poisoned".into()))?
        .clone()
        .ok_or_else(|| {
            CommError::State(
                "the distributed environment is not initialized; call init_distributed_environment"
                    .into(),
            )
        })
}

/// The process-wide state, once initialized.
pub fn global_state() -> Result<Arc<ParallelState>> {
    state()
}

/// Installs an explicitly built state as the process-wide one.
pub fn set_global_state(st: ParallelState) -> Result<Arc<ParallelState>> {
    let mut g = STATE
        .write()
        .map_err(|_| CommError::State("global parallel state lock poisoned".into()))?;
    if g.is_some() {
        return Err(CommError::State(
            "the distributed environment is already initialized; call destroy_distributed_environment first".into(),
        ));
    }
    let st = Arc::new(st);
    *g = Some(st.clone());
    Ok(st)
}

/// Joins the world (see [`ParallelState::init`]); `backend` forces a backend.
///
/// Calling it again is a no-op when the arguments agree with the existing
/// environment (as in FastVideo, where `torch.distributed` is then already
/// initialized), except that a node group destroyed by
/// [`destroy_model_parallel`] is built again, as FastVideo does. When they
/// disagree it is an error naming each differing value, the existing one and
/// the requested one (see [`ParallelState::check_environment`]);
/// `init_method` is not compared, since the store already exists.
pub fn init_distributed_environment(
    world_size: usize,
    rank: usize,
    init_method: &str,
    local_rank: Option<usize>,
    backend: Option<&str>,
) -> Result<()> {
    if let Ok(st) = state() {
        st.check_environment(world_size, rank, local_rank, backend)?;
        st.ensure_node_group()?;
        return Ok(());
    }
    let opts = InitOptions {
        backend: backend.map(str::to_string),
        ..InitOptions::default()
    };
    set_global_state(ParallelState::init(
        world_size,
        rank,
        init_method,
        local_rank,
        opts,
    )?)
    .map(|_| ())
}

/// Builds the model-parallel groups on the global state.
pub fn initialize_model_parallel(tp: usize, sp: usize, dp: Option<usize>) -> Result<()> {
    state()?.initialize_model_parallel(tp, sp, dp)
}

/// Initializes from the environment (a world of one when none is set) and
/// the model-parallel groups, unless already done.
///
/// When the model-parallel groups already exist, `tp` and `sp` must equal
/// their sizes (an error naming both otherwise, where FastVideo asserts);
/// the groups are kept. When the environment exists without them (e.g.
/// after [`destroy_model_parallel`]), the node group is built again if
/// needed and the model-parallel groups are built.
pub fn maybe_init_distributed_environment_and_model_parallel(tp: usize, sp: usize) -> Result<()> {
    if state().is_err() {
        set_global_state(ParallelState::init_from_env(InitOptions::default())?)?;
    }
    let st = state()?;
    if st.model_parallel_is_initialized() {
        let m = st.model_groups()?;
        let (have_tp, have_sp) = (m.tp.world_size(), m.sp.world_size());
        let mut diffs = Vec::new();
        if have_tp != tp {
            diffs.push(format!(
                "tensor_parallel_size {tp} requested, but the groups exist with {have_tp}"
            ));
        }
        if have_sp != sp {
            diffs.push(format!(
                "sequence_parallel_size {sp} requested, but the groups exist with {have_sp}"
            ));
        }
        if !diffs.is_empty() {
            return Err(CommError::State(format!(
                "maybe_init_distributed_environment_and_model_parallel: {}; call \
                 destroy_model_parallel first to change them",
                diffs.join("; ")
            )));
        }
        return Ok(());
    }
    st.ensure_node_group()?;
    st.initialize_model_parallel(tp, sp, None)
}

/// True once the model-parallel groups exist.
pub fn model_parallel_is_initialized() -> bool {
    state()
        .map(|s| s.model_parallel_is_initialized())
        .unwrap_or(false)
}

/// FastVideo's `init_world_group(ranks, local_rank, backend)`: a new group
/// over `ranks` named `world`, returned (the global world group stays; see
/// [`ParallelState::init_world_group`]). `local_rank` must be this
/// process's; `backend` forces a backend for the group (`None`: automatic).
pub fn init_world_group(
    ranks: &[usize],
    local_rank: usize,
    backend: Option<&str>,
) -> Result<Arc<GroupCoordinator>> {
    state()?.init_world_group(ranks, local_rank, backend)
}

/// FastVideo's `init_node_group(local_rank, backend)`: builds the group of
/// the ranks on this host and installs it as the node group (see
/// [`ParallelState::init_node_group`]). Collective over this host's ranks.
pub fn init_node_group(local_rank: usize, backend: Option<&str>) -> Result<Arc<GroupCoordinator>> {
    let st = state()?;
    st.check_local_rank("init_node_group", local_rank)?;
    st.init_node_group(backend)
}

/// FastVideo's `init_model_parallel_group(group_ranks, local_rank, backend,
/// use_message_queue_broadcaster, group_name)`: every rank passes every
/// group's ranks; it builds and returns the group containing this rank,
/// registered as `{group_name}:{k}` (`anonymous` without a name).
/// `local_rank` must be this process's; `backend` forces a backend.
pub fn init_model_parallel_group(
    group_ranks: &[Vec<usize>],
    local_rank: usize,
    backend: Option<&str>,
    use_message_queue_broadcaster: bool,
    group_name: Option<&str>,
) -> Result<Arc<GroupCoordinator>> {
    let st = state()?;
    let name = group_name.unwrap_or("anonymous");
    st.check_local_rank(&format!("init_model_parallel_group `{name}`"), local_rank)?;
    st.init_model_parallel_group_with(group_ranks, name, use_message_queue_broadcaster, backend)
}

/// FastVideo's `initialize_tensor_parallel_group`.
pub fn initialize_tensor_parallel_group(
    size: usize,
    suffix: &str,
) -> Result<Arc<GroupCoordinator>> {
    state()?.initialize_tensor_parallel_group(size, suffix)
}

/// FastVideo's `initialize_sequence_parallel_group`.
pub fn initialize_sequence_parallel_group(
    size: usize,
    suffix: &str,
) -> Result<Arc<GroupCoordinator>> {
    state()?.initialize_sequence_parallel_group(size, suffix)
}

/// The world group.
pub fn get_world_group() -> Result<Arc<GroupCoordinator>> {
    Ok(state()?.world_group())
}
/// The group of ranks on this host (an error after
/// [`destroy_model_parallel`], which destroys it, until it is built again).
pub fn get_node_group() -> Result<Arc<GroupCoordinator>> {
    state()?.node_group()
}
/// The tensor-parallel group.
pub fn get_tp_group() -> Result<Arc<GroupCoordinator>> {
    state()?.tp_group()
}
/// The sequence-parallel group.
pub fn get_sp_group() -> Result<Arc<GroupCoordinator>> {
    state()?.sp_group()
}
/// The data-parallel group.
pub fn get_dp_group() -> Result<Arc<GroupCoordinator>> {
    state()?.dp_group()
}

/// Global rank.
pub fn get_world_rank() -> Result<usize> {
    Ok(state()?.rank())
}
/// World size.
pub fn get_world_size() -> Result<usize> {
    Ok(state()?.world_size())
}
/// Rank in the tensor-parallel group.
pub fn get_tp_rank() -> Result<usize> {
    Ok(get_tp_group()?.rank_in_group())
}
/// Size of the tensor-parallel group.
pub fn get_tp_world_size() -> Result<usize> {
    Ok(get_tp_group()?.world_size())
}
/// Rank in the sequence-parallel group (FastVideo: `get_sp_parallel_rank`).
pub fn get_sp_rank() -> Result<usize> {
    Ok(get_sp_group()?.rank_in_group())
}
/// Size of the sequence-parallel group.
pub fn get_sp_world_size() -> Result<usize> {
    Ok(get_sp_group()?.world_size())
}
/// Rank in the data-parallel group.
pub fn get_dp_rank() -> Result<usize> {
    Ok(get_dp_group()?.rank_in_group())
}
/// Size of the data-parallel group.
pub fn get_dp_world_size() -> Result<usize> {
    Ok(get_dp_group()?.world_size())
}
/// FastVideo's name for [`get_sp_rank`].
pub fn get_sp_parallel_rank() -> Result<usize> {
    get_sp_rank()
}
/// vLLM's name for [`get_tp_rank`].
pub fn get_tensor_model_parallel_rank() -> Result<usize> {
    get_tp_rank()
}
/// vLLM's name for [`get_tp_world_size`].
pub fn get_tensor_model_parallel_world_size() -> Result<usize> {
    get_tp_world_size()
}

/// The device this process computes on (`cuda:{local_rank}` when the state
/// was initialized for CUDA, else `cpu`); `cpu` before initialization. See
/// [`get_local_torch_device`] for FastVideo's function.
pub fn get_local_device() -> Device {
    state().map(|s| s.local_device()).unwrap_or(Device::Cpu)
}

/// FastVideo's `get_local_torch_device`: this process's device. Once the
/// environment is initialized, the device its groups use; before, the
/// device it would choose ([`choose_device`](crate::choose_device) with
/// `DIST_DEVICE` and `LOCAL_RANK`: `cuda:{LOCAL_RANK % count}` when CUDA
/// devices are visible, else `cpu`, where FastVideo would answer `mps`).
/// An error only when `DIST_DEVICE` names an unusable device.
pub fn get_local_torch_device() -> Result<Device> {
    if let Ok(s) = state() {
        return Ok(s.local_device());
    }
    // Building the registry installs the CUDA allocator (feature `nccl`),
    // which the device choice looks at.
    let _ = crate::backend::default_registry();
    let local_rank = std::env::var("LOCAL_RANK")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    crate::device::choose_device(crate::device::DeviceRequest::Auto, local_rank)
}

/// FastVideo's `get_same_node_ranks(pg, source_rank)`: the global ranks of
/// `group` on the same host as its member `source_rank` (see
/// [`ParallelState::get_same_node_ranks`]). Collective over `group`.
pub fn get_same_node_ranks(group: &GroupCoordinator, source_rank: usize) -> Result<Vec<usize>> {
    state()?.get_same_node_ranks(group, source_rank)
}

/// FastVideo's deprecated alias of [`get_same_node_ranks`] (it too returns
/// global ranks, not a per-rank mask).
pub fn is_the_same_node_as(group: &GroupCoordinator, source_rank: usize) -> Result<Vec<usize>> {
    get_same_node_ranks(group, source_rank)
}

/// Runs `f` with `group` as the tensor-parallel group, restoring the previous
/// group afterwards, also when `f` panics.
pub fn patch_tensor_parallel_group<R>(
    group: Arc<GroupCoordinator>,
    f: impl FnOnce() -> R,
) -> Result<R> {
    let st = state()?;
    let _guard = st.patch_tensor_parallel_group(group)?;
    Ok(f())
}

/// Destroys the model-parallel groups and the node group of the global
/// state, as FastVideo does (the world group stays).
pub fn destroy_model_parallel() {
    if let Ok(s) = state() {
        s.destroy_model_parallel();
    }
}

/// Destroys every group and forgets the global state.
pub fn destroy_distributed_environment() {
    let taken = STATE.write().map(|mut g| g.take()).unwrap_or(None);
    if let Some(s) = taken {
        s.destroy();
    }
}

/// Both of the above; the Rust counterpart of freeing cached device memory
/// is dropping tensors, which the caller owns.
pub fn cleanup_dist_env_and_memory() {
    destroy_model_parallel();
    destroy_distributed_environment();
}

/// All-reduce (sum) over the group registered under `group_name`
/// (e.g. `tp:0`), as vLLM's custom op does.
pub fn all_reduce(tensor: &mut Tensor, group_name: &str) -> Result<()> {
    state()?
        .group_by_name(group_name)?
        .all_reduce(tensor, ReduceOp::Sum)
}

/// Accepted for compatibility and ignored: every group uses its backend's
/// own all-reduce (see [`ParallelState::set_custom_all_reduce`]).
pub fn set_custom_all_reduce(enable: bool) -> Result<()> {
    state()?.set_custom_all_reduce(enable);
    Ok(())
}

// ------------------------------------------------------- communication_op

/// Sum all-reduce over the tensor-parallel group, in place.
pub fn tensor_model_parallel_all_reduce(tensor: &mut Tensor) -> Result<()> {
    get_tp_group()?.all_reduce(tensor, ReduceOp::Sum)
}

/// All-gather over the tensor-parallel group along `dim`.
pub fn tensor_model_parallel_all_gather(tensor: &Tensor, dim: isize) -> Result<Tensor> {
    get_tp_group()?.all_gather(tensor, dim)
}

/// Ulysses all-to-all over the sequence-parallel group.
#[allow(non_snake_case)]
pub fn sequence_model_parallel_all_to_all_4D(
    x: &Tensor,
    scatter_dim: usize,
    gather_dim: usize,
) -> Result<Tensor> {
    get_sp_group()?.all_to_all_4d(x, scatter_dim, gather_dim)
}

/// All-gather over the sequence-parallel group along `dim`.
pub fn sequence_model_parallel_all_gather(x: &Tensor, dim: isize) -> Result<Tensor> {
    get_sp_group()?.all_gather(x, dim)
}

/// All-gather over the sequence-parallel group, trimmed to `original_len`.
pub fn sequence_model_parallel_all_gather_with_unpad(
    x: &Tensor,
    original_len: usize,
    dim: isize,
) -> Result<Tensor> {
    get_sp_group()?.all_gather_with_unpad(x, dim, original_len)
}

/// Pads along `dim` to a multiple of the SP size and returns this rank's
/// shard and the original length (see [`GroupCoordinator::shard_with_pad`]).
pub fn sequence_model_parallel_shard(x: &Tensor, dim: isize) -> Result<(Tensor, usize)> {
    get_sp_group()?.shard_with_pad(x, dim)
}

/// FastVideo's `warmup_sequence_parallel_communication(device)` on the
/// global state (see [`ParallelState::warmup_sequence_parallel_communication`]);
/// does nothing before initialization.
pub fn warmup_sequence_parallel_communication(device: Option<Device>) -> Result<()> {
    match state() {
        Ok(s) => s.warmup_sequence_parallel_communication(device),
        Err(_) => Ok(()),
    }
}
