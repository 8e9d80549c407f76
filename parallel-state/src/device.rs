//! The CUDA side of a group, present only with the `nccl` feature.

#[cfg(not(feature = "nccl"))]
use comm_core::CommError;
use comm_core::{Result, Tensor, TensorMetadata};

use crate::backend::Backend;

/// Allocates a zeroed CUDA tensor for incoming data.
pub(crate) fn alloc_cuda(meta: &TensorMetadata) -> Result<Tensor> {
    #[cfg(feature = "nccl")]
    {
        comm_nccl::zeros_cuda(meta)
    }
    #[cfg(not(feature = "nccl"))]
    {
        Err(CommError::unavailable(
            "cuda",
            format!(
                "received a CUDA tensor ({:?} {}) but parallel-state was built without the `nccl` feature",
                meta.shape, meta.dtype
            ),
        ))
    }
}

/// What `GroupCoordinator::graph_capture` yields.
///
/// On CUDA with NCCL it holds a side stream on which captured collectives are
/// enqueued; on CPU it is an empty marker and capturing does nothing.
#[derive(Debug)]
pub struct GraphCaptureContext {
    local_rank: usize,
    cuda: bool,
}

impl GraphCaptureContext {
    pub(crate) fn new(local_rank: usize, device_backend: Option<Backend>) -> Result<Self> {
        Ok(GraphCaptureContext {
            local_rank,
            cuda: device_backend == Some(Backend::Nccl),
        })
    }
    /// True when a CUDA side stream is captured; false on CPU (no-op).
    pub fn is_cuda(&self) -> bool {
        self.cuda
    }
    /// The local rank (CUDA ordinal) the context belongs to.
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }
}

/// Copies a host tensor to `device` (a host copy for `Device::Cpu`). CUDA
/// needs the `nccl` feature and a GPU; otherwise this is a clear error.
pub fn to_device(t: &Tensor, device: comm_core::Device) -> Result<Tensor> {
    match device {
        comm_core::Device::Cpu => t.to_host(),
        comm_core::Device::Cuda(ordinal) => {
            #[cfg(feature = "nccl")]
            {
                comm_nccl::to_cuda(t, ordinal)
            }
            #[cfg(not(feature = "nccl"))]
            {
                Err(CommError::unavailable(
                    "cuda",
                    format!("cannot move a tensor to cuda:{ordinal}: parallel-state was built without the `nccl` feature (rebuild with --features nccl)"),
                ))
            }
        }
    }
}
