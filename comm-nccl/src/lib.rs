//! # comm-nccl
//!
//! The NCCL backend for CUDA tensors, loading `libnccl` and `libcuda` at run
//! time: nothing links against them, so the crate builds and its CPU-side
//! tests run on machines with no CUDA toolkit and no GPU.
//!
//! - [`raw`]: the raw NCCL layer ([`NcclLibrary`]: `libloading`, a symbol
//!   table resolved once, `ncclResult_t` mapped to [`comm_core::CommError::Nccl`],
//!   non-blocking communicator lifecycle in [`RawComm`]). The library is
//!   found through [`raw::LIBRARY_ENV`] (`DIST_NCCL_LIBRARY`; `NCCL_LIBRARY`
//!   is honoured when it is unset), then `libnccl.so.2`, then `libnccl.so`.
//! - [`cuda`]: cudarc contexts and streams, [`CudaStorage`] (comm-core's
//!   device storage), host<->device copies; never panics without libcuda.
//! - [`layout`]: device-side permute copies (NVRTC kernel, host fallback)
//!   for all_gather(dim) and all_to_all_4D.
//! - [`NcclCommunicator`]: the [`comm_core::DeviceCommunicator`].
//! - [`nccl_available`]: the run-time check parallel-state uses to choose it.

#![warn(missing_docs)]

mod comm;
pub mod cuda;
pub mod layout;
pub mod raw;

pub use comm::{GraphCapture, NcclCommunicator, NcclOptions};
pub use cuda::{cuda_device_count, libcuda_present, to_cuda, zeros_cuda, CudaDevice, CudaStorage};
pub use raw::{NcclLibrary, NcclVersion, RawComm};

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
