//! # comm-nccl
//!
//! The NCCL backend for CUDA memory, loading `libnccl`, `libcuda` and
//! `libnvrtc` at run time: nothing links against them, so the crate builds
//! and its CPU-side tests run on machines with no CUDA toolkit and no GPU.
//!
//! - [`NcclCommunicator`]: comm-core's raw `DeviceCommunicator` over NCCL,
//!   asynchronous (calls enqueue on its stream; a watchdog enforces
//!   deadlines and aborts on errors), made by [`NcclFactory`] (`nccl` in
//!   comm-core's registry). Users call it through the checked front
//!   (`comm_core::Communicator`); [`with_nccl`] and [`graph_capture`] reach
//!   its stream, events and CUDA-graph capture from there.
//! - [`install`]: CUDA tensors for comm-core ([`CudaStorage`], with the
//!   device permute kernel of [`kernel`] driven by comm-core's
//!   `layout::PermutePlan`); [`permute`] runs it on any CUDA memory.
//! - [`raw`]: the raw NCCL layer (C types, each FFI call wrapped once,
//!   communicator lifecycle).
//! - [`cuda`]: devices and contexts, [`device_uuid`] to tell whether ranks
//!   share a GPU, availability checks that never panic.
//!
//! # Cargo features and the application's cudarc
//!
//! cudarc needs exactly one CUDA-version feature in the whole build, and one
//! linking mode. comm-nccl names no linking mode (cudarc's
//! `fallback-dynamic-loading` applies unless the application picks
//! `dynamic-linking` or `dynamic-loading`), and selects a CUDA version only
//! through its default feature `cuda-12080`, for standalone use. An
//! application that sets cudarc's features itself (candle:
//! `cuda-12080` + `dynamic-linking`) depends on comm-nccl with
//! `default-features = false`; its own version feature then applies. Two
//! version features at once (say `cuda-12080` from here and `cuda-13000`
//! from the application) do not compile: cudarc's bindings clash.
//! `cuda-13000` is offered for standalone builds against CUDA 13.

#![warn(missing_docs)]

mod capture;
mod comm;
pub mod cuda;
mod factory;
pub mod kernel;
pub mod raw;
mod storage;
pub mod watchdog;

/// The cudarc this crate is built against (for applications without their
/// own cudarc dependency).
pub use cudarc;

pub use capture::{graph_capture, with_nccl, GraphCapture};
pub use comm::{NcclCommunicator, NcclOptions};
pub use cuda::{cuda_device_count, device_uuid, format_uuid, libcuda_present, CudaDevice};
pub use factory::NcclFactory;
pub use raw::{NcclLibrary, NcclVersion, RawComm};
pub use storage::{install, permute, CudaAllocator, CudaStorage};

use comm_core::{CommError, Result};

/// What [`nccl_available`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NcclInfo {
    /// NCCL's version.
    pub version: NcclVersion,
    /// Where libnccl was loaded from.
    pub library: String,
    /// Number of CUDA devices.
    pub cuda_devices: usize,
}

/// Whether the NCCL backend can run in this process: libcuda loads and
/// reports at least one device, and libnccl loads with a good version.
/// Otherwise `BackendUnavailable { backend: "nccl", reason }` with a
/// one-line reason fit for a log.
pub fn nccl_available() -> Result<NcclInfo> {
    let cuda_devices = cuda_device_count().map_err(|e| match e {
        CommError::BackendUnavailable { reason, .. } => {
            CommError::unavailable("nccl", format!("no usable CUDA: {reason}"))
        }
        e => e,
    })?;
    let lib = NcclLibrary::load()?;
    Ok(NcclInfo {
        version: lib.version(),
        library: lib.path().to_string_lossy().into_owned(),
        cuda_devices,
    })
}
