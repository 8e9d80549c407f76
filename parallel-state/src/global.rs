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
/// Initializing twice is an error.
pub fn init_distributed_environment(
    world_size: usize,
    rank: usize,
    init_method: &str,
    local_rank: Option<usize>,
    backend: Option<&str>,
) -> Result<()> {
    if state().is_ok() {
        return Err(CommError::State(
            "init_distributed_environment called twice".into(),
        ));
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
pub fn maybe_init_distributed_environment_and_model_parallel(tp: usize, sp: usize) -> Result<()> {
    if state().is_err() {
        set_global_state(ParallelState::init_from_env(InitOptions::default())?)?;
    }
    let st = state()?;
    if !st.model_parallel_is_initialized() {
        st.initialize_model_parallel(tp, sp, None)?;
    }
    Ok(())
}

/// True once the model-parallel groups exist.
pub fn model_parallel_is_initialized() -> bool {
    state()
        .map(|s| s.model_parallel_is_initialized())
        .unwrap_or(false)
}

/// vLLM's `init_world_group`: the world group of the global state.
pub fn init_world_group() -> Result<Arc<GroupCoordinator>> {
    Ok(state()?.world_group())
}

/// vLLM's `init_model_parallel_group` on the global state.
pub fn init_model_parallel_group(
    group_ranks: &[Vec<usize>],
    name: &str,
    use_message_queue_broadcaster: bool,
) -> Result<Arc<GroupCoordinator>> {
    state()?.init_model_parallel_group(group_ranks, name, use_message_queue_broadcaster)
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
/// The group of ranks on this host.
pub fn get_node_group() -> Result<Arc<GroupCoordinator>> {
    Ok(state()?.node_group())
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
/// was initialized for CUDA, else `cpu`).
pub fn get_local_device() -> Device {
    state().map(|s| s.local_device()).unwrap_or(Device::Cpu)
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

/// Destroys the model-parallel groups of the global state.
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

/// See [`ParallelState::set_custom_all_reduce`].
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
/// shard and the original length.
pub fn sequence_model_parallel_shard(x: &Tensor, dim: isize) -> Result<(Tensor, usize)> {
    get_sp_group()?.shard(x, dim)
}
