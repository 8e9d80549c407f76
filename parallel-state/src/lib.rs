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

#![warn(missing_docs)]

pub mod backend;
mod coordinator;
mod device;
mod global;
pub mod layout;
mod mq;
mod state;
mod tensor_dict;

pub use backend::{default_registry, registry_with, BACKEND_ENV};
pub use coordinator::{GroupCoordinator, GroupOptions, RingTimes, VERIFY_ENV};
pub use device::{choose_device, to_device, DeviceRequest, GraphCaptureContext, DEVICE_ENV};
pub use global::*;
pub use layout::{GroupLayout, LayoutKind};
pub use state::{InitOptions, ModelGroups, ParallelState, TpPatch};
pub use tensor_dict::{TensorDict, Value};

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
