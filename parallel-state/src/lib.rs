//! # parallel-state
//!
//! The distributed layer users depend on: a world of ranks, tensor /
//! sequence / data / node parallel groups ([`GroupCoordinator`]), and the
//! collectives those groups run, over shared memory inside one host, TCP
//! between hosts and (with the `nccl` feature) NCCL for CUDA tensors.
//!
//! Two ways to use it:
//! - explicitly, with a [`ParallelState`] value;
//! - through FastVideo / vLLM-style global functions ([`get_tp_group`],
//!   [`sequence_model_parallel_all_to_all_4D`], ...), a thin layer over one
//!   process-wide `ParallelState`.
//!
//! ```no_run
//! use parallel_state as ps;
//! // In every process of `distrun --nproc-per-node 4 -- my-program`:
//! ps::maybe_init_distributed_environment_and_model_parallel(1, 4).unwrap();
//! let sp = ps::get_sp_group().unwrap();
//! println!("rank {} of {} in {}", sp.rank_in_group(), sp.world_size(), sp.name());
//! ```
//!
//! ## Group layouts
//!
//! Which global ranks form each group, for a world of `W` ranks:
//!
//! - **World**: ranks `0..W`.
//! - **Node**: the ranks on this host, sorted, as found at initialization by
//!   a shared-memory probe (each rank creates a small segment; the ranks that
//!   can open each other's share a host). FastVideo instead assumes every
//!   host runs `W / hosts` consecutive ranks; on such clusters both agree.
//! - **Model parallel** ([`ParallelState::initialize_model_parallel`]`(tp,
//!   sp, dp)`, FastVideo's layout, [`LayoutKind::FastVideo`]): tensor-parallel
//!   groups are consecutive blocks of `tp` ranks; sequence-parallel groups are
//!   consecutive blocks of `sp` ranks; data-parallel groups are `{i, i + sp,
//!   i + 2 sp, ...}` for each `i < sp`, of size `W / sp`. For `W = 8, tp = 2,
//!   sp = 2`: TP = SP = `[0,1] [2,3] [4,5] [6,7]`, DP = `[0,2,4,6]
//!   [1,3,5,7]`. For `W = 8, tp = 2, sp = 4`: TP `[0,1] [2,3] [4,5] [6,7]`,
//!   SP `[0..3] [4..7]`, DP `[0,4] [1,5] [2,6] [3,7]`. TP and SP groups
//!   overlap when both sizes exceed 1 (FastVideo treats SP and TP as
//!   alternatives). `tp` and `sp` must divide `W`, and `dp`, when given, must
//!   equal `W / sp`: clear errors here, where FastVideo leaves ranks out or
//!   ignores `dp`.
//! - **Mesh** ([`LayoutKind::Mesh`], via
//!   [`ParallelState::initialize_model_parallel_with`]): an orthogonal
//!   `dp x sp x tp` mesh, tp fastest, global rank `(d * sp + s) * tp + t`;
//!   `tp * sp` must divide `W`.
//! - **Ulysses and ring** ([`ParallelState::initialize_ulysses_ring`]`(u)`,
//!   USP / xDiT): an SP group of `u * r` members splits into Ulysses groups
//!   of `u` consecutive members and ring groups strided by `u`; SP `[0..3]`
//!   with `u = 2` gives Ulysses `[0,1] [2,3]` and ring `[0,2] [1,3]`.
//! - **Extra groups**: [`ParallelState::initialize_tensor_parallel_group`]`(n,
//!   suffix)` and [`ParallelState::initialize_sequence_parallel_group`] build
//!   consecutive blocks of `n` named `tp_{suffix}` / `sp_{suffix}`.
//!
//! Every group is registered under a unique name `{name}:{k}`, `k` counting
//! the groups this process made with that name (`tp:0`, `tp_vae:0`, ...);
//! [`all_reduce`]`(tensor, name)` and [`ParallelState::group_by_name`] look
//! groups up by it. All rank arguments of group operations (`src`, `dst`)
//! are group ranks.
//!
//! ## One-member groups
//!
//! Every operation of a group of one returns its input (copied where the
//! result is a new tensor) without communicating, after the same argument
//! checks as on any group: `all_gather`, `gather`, `all_to_all_4d`, `shard`
//! and `broadcast_tensor_dict` return the input; `send_tensor_dict` sends
//! nothing and `recv_tensor_dict` returns `None`. Point-to-point
//! `send` / `recv` / `send_object` / `recv_object` need a peer, and a group
//! of one has none: they are errors, as FastVideo's assertions are.

#![warn(missing_docs)]

pub mod backend;
mod coordinator;
mod device;
mod global;
pub mod layout;
mod mq;
mod state;
mod tensor_dict;
mod utils;

pub use backend::{default_registry, registry_with, BACKEND_ENV};
pub use coordinator::{GroupCoordinator, GroupOptions, RingTimes, VERIFY_ENV};
pub use device::{choose_device, to_device, DeviceRequest, GraphCaptureContext, DEVICE_ENV};
pub use global::*;
pub use layout::{GroupLayout, LayoutKind};
pub use state::{InitOptions, ModelGroups, ParallelState, TpPatch};
pub use tensor_dict::{TensorDict, Value, MAX_DICT_DEPTH};
pub use utils::{
    compute_padding_for_sp, divide, ensure_divisibility, pad_sequence_tensor,
    split_tensor_along_last_dim, unpad_sequence_tensor,
};

/// The NCCL backend crate (features `nccl` / `nccl-app-cudarc`): its stream,
/// events and graph capture (`nccl::with_nccl`, `nccl::graph_capture`).
#[cfg(feature = "nccl-app-cudarc")]
pub use comm_nccl as nccl;

/// The vocabulary crate, re-exported (tensor layout ops live in `core::layout`).
pub use comm_core as core;
pub use comm_core::{
    AsBuf, AsBufMut, BackendFactory, CommError, Communicator, DType, Device, ReduceOp, Registry,
    Result, Tensor,
};
