//! Device memory that a [`Tensor`](crate::Tensor) owns, and the allocator
//! that makes it.
//!
//! A GPU backend crate (comm-nccl) implements [`DeviceStorage`] and
//! installs a [`DeviceAllocator`] once per process with
//! [`install_device_allocator`]; from then on every layer allocates,
//! uploads and permutes device tensors through comm-core alone
//! ([`Tensor::zeros_on`](crate::Tensor::zeros_on),
//! [`Tensor::to_device`](crate::Tensor::to_device),
//! [`layout::permute_view`](crate::layout::permute_view)), with no
//! `cfg(feature)` branch of its own.

use std::any::Any;
use std::fmt;
use std::sync::{Arc, OnceLock};

use crate::layout::PermutePlan;
use crate::{CommError, Device, DeviceMemory, Result};

/// Device memory owned by a tensor.
pub trait DeviceStorage: DeviceMemory + Send + Sync {
    /// Allocates zeroed storage of `len_bytes` on the same device.
    fn alloc_zeroed(&self, len_bytes: usize) -> Result<Box<dyn DeviceStorage>>;
    /// A deep copy on the same device.
    fn try_clone(&self) -> Result<Box<dyn DeviceStorage>>;
    /// Writes into `dst` (same device and length) the permutation `plan` of
    /// this storage's elements, on the device. `Ok(false)` when this storage
    /// has no device kernel for it (callers then go through the host).
    fn permute_into(&self, _plan: &PermutePlan, _dst: &mut dyn DeviceStorage) -> Result<bool> {
        Ok(false)
    }
    /// This storage as plain device memory.
    fn as_memory(&self) -> &dyn DeviceMemory;
    /// This storage as plain device memory, mutably.
    fn as_memory_mut(&mut self) -> &mut dyn DeviceMemory;
    /// For downcasting by the crate that created it.
    fn as_any(&self) -> &dyn Any;
    /// For downcasting by the crate that created it.
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// Makes device storage: installed once per process by a GPU backend crate.
pub trait DeviceAllocator: Send + Sync + fmt::Debug {
    /// The device kind it serves (`cuda`).
    fn kind(&self) -> &str;
    /// How many devices are visible (0 when none can be used).
    fn device_count(&self) -> Result<usize>;
    /// Zeroed storage of `len_bytes` on `device`.
    fn alloc_zeroed(&self, device: Device, len_bytes: usize) -> Result<Box<dyn DeviceStorage>>;
    /// A stable identifier of the physical device behind `device` in this
    /// process (the GPU's UUID), so processes can tell whether they share
    /// one device whatever their `CUDA_VISIBLE_DEVICES`. The default is the
    /// device's name (`cuda:0`), right only when every process sees the
    /// same devices in the same order.
    fn device_uuid(&self, device: Device) -> Result<String> {
        Ok(device.to_string())
    }
    /// Storage on `device` holding a copy of `bytes`.
    fn upload(&self, device: Device, bytes: &[u8]) -> Result<Box<dyn DeviceStorage>> {
        let mut s = self.alloc_zeroed(device, bytes.len())?;
        s.copy_from_host(bytes)?;
        Ok(s)
    }
}

static ALLOCATOR: OnceLock<Arc<dyn DeviceAllocator>> = OnceLock::new();

/// Installs the process's device allocator. The first one installed stays;
/// installing again is a no-op (every GPU backend crate may call this when
/// its factory is registered).
pub fn install_device_allocator(a: Arc<dyn DeviceAllocator>) {
    let _ = ALLOCATOR.set(a);
}

/// The installed allocator, or `BackendUnavailable` explaining how to get one.
pub fn device_allocator(device: Device) -> Result<&'static dyn DeviceAllocator> {
    ALLOCATOR.get().map(|a| a.as_ref()).ok_or_else(|| {
        CommError::unavailable(
            "cuda",
            format!(
                "cannot allocate on {device}: no device allocator is installed in this process \
                 (build parallel-state with the `nccl` feature, or call \
                 comm_nccl::install() when using comm-nccl directly)"
            ),
        )
    })
}

/// Number of visible devices of the installed allocator (0 when none is
/// installed or none can be used).
pub fn visible_devices() -> usize {
    ALLOCATOR
        .get()
        .and_then(|a| a.device_count().ok())
        .unwrap_or(0)
}
