//! CUDA memory for comm-core's tensors: [`CudaStorage`] (comm-core's
//! [`DeviceStorage`], with the device permute kernel), the
//! [`CudaAllocator`] that [`install`] registers once per process, and
//! [`permute`] for any CUDA memory (borrowed cudarc buffers included).

use std::any::Any;
use std::sync::Arc;

use comm_core::layout::PermutePlan;
use comm_core::{CommError, Device, DeviceAllocator, DeviceMemory, DeviceStorage, Result};
use cudarc::driver::{CudaSlice, CudaStream, SyncOnDrop};

use crate::cuda::{cuda_device_count, cuda_err, CudaDevice};
use crate::kernel::Launch;

/// Device memory owned by a tensor: a cudarc `CudaSlice<u8>` allocated on
/// its device's storage stream. cudarc's per-slice events order its uses
/// across streams (a communicator's stream waits for the last write before
/// reading, and the reverse).
#[derive(Debug)]
pub struct CudaStorage {
    dev: Arc<CudaDevice>,
    slice: CudaSlice<u8>,
}

impl CudaStorage {
    /// `len` zeroed bytes on `dev`.
    pub fn zeroed(dev: &Arc<CudaDevice>, len: usize) -> Result<CudaStorage> {
        dev.bind()?;
        let s = dev.stream();
        let slice = if len == 0 {
            s.null::<u8>()
        } else {
            s.alloc_zeros::<u8>(len)
        }
        .map_err(|e| {
            cuda_err(
                &format!("allocating {len} bytes on cuda:{}", dev.ordinal()),
                e,
            )
        })?;
        Ok(CudaStorage {
            dev: dev.clone(),
            slice,
        })
    }

    /// A copy of `bytes` on `dev` (written once, not zeroed first).
    pub fn upload(dev: &Arc<CudaDevice>, bytes: &[u8]) -> Result<CudaStorage> {
        dev.bind()?;
        let s = dev.stream();
        let slice = if bytes.is_empty() {
            s.null::<u8>()
        } else {
            s.clone_htod(bytes)
        }
        .map_err(|e| {
            cuda_err(
                &format!("uploading {} bytes to cuda:{}", bytes.len(), dev.ordinal()),
                e,
            )
        })?;
        // The host bytes must outlive the asynchronous copy.
        s.synchronize()
            .map_err(|e| cuda_err("host-to-device copy", e))?;
        Ok(CudaStorage {
            dev: dev.clone(),
            slice,
        })
    }

    /// The owning device.
    pub fn cuda_device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }
    /// The slice.
    pub fn slice(&self) -> &CudaSlice<u8> {
        &self.slice
    }
    /// The slice, mutably.
    pub fn slice_mut(&mut self) -> &mut CudaSlice<u8> {
        &mut self.slice
    }
    /// Gives the slice up.
    pub fn into_slice(self) -> CudaSlice<u8> {
        self.slice
    }
}

impl DeviceMemory for CudaStorage {
    fn device(&self) -> Device {
        Device::Cuda(self.dev.ordinal())
    }
    fn len_bytes(&self) -> usize {
        self.slice.len()
    }
    fn copy_to_host(&self, dst: &mut [u8]) -> Result<()> {
        self.slice.copy_to_host(dst)
    }
    fn copy_from_host(&mut self, src: &[u8]) -> Result<()> {
        self.slice.copy_from_host(src)
    }
    fn copy_from_device(&mut self, src: &dyn DeviceMemory) -> Result<()> {
        self.slice.copy_from_device(src)
    }
    fn cuda_read<'a>(&'a self, stream: &'a CudaStream) -> Option<(u64, SyncOnDrop<'a>)> {
        self.slice.cuda_read(stream)
    }
    fn cuda_write<'a>(&'a mut self, stream: &'a CudaStream) -> Option<(u64, SyncOnDrop<'a>)> {
        self.slice.cuda_write(stream)
    }
}

impl DeviceStorage for CudaStorage {
    fn alloc_zeroed(&self, len_bytes: usize) -> Result<Box<dyn DeviceStorage>> {
        Ok(Box::new(CudaStorage::zeroed(&self.dev, len_bytes)?))
    }
    fn try_clone(&self) -> Result<Box<dyn DeviceStorage>> {
        self.dev.bind()?;
        let slice = self
            .slice
            .try_clone()
            .map_err(|e| cuda_err("device-to-device copy", e))?;
        Ok(Box::new(CudaStorage {
            dev: self.dev.clone(),
            slice,
        }))
    }
    fn permute_into(&self, plan: &PermutePlan, dst: &mut dyn DeviceStorage) -> Result<bool> {
        let stream = self.dev.stream().clone();
        permute(&stream, plan, self, dst.as_memory_mut())
    }
    fn as_memory(&self) -> &dyn DeviceMemory {
        self
    }
    fn as_memory_mut(&mut self) -> &mut dyn DeviceMemory {
        self
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// Writes the permutation `plan` of `src` into `dst` with the device kernel,
/// enqueued on `stream` (ordered after earlier uses of both buffers by
/// cudarc's events, and later uses after it). Any CUDA memory works:
/// tensors' storage, a user's `CudaSlice` or views.
///
/// `Ok(false)`, having done nothing, when the kernel cannot run it (no
/// NVRTC, a plan of too many dimensions, memory that is not CUDA memory):
/// the caller then copies through the host. Lengths must be the plan's.
pub fn permute(
    stream: &CudaStream,
    plan: &PermutePlan,
    src: &dyn DeviceMemory,
    dst: &mut dyn DeviceMemory,
) -> Result<bool> {
    let bytes = plan.numel * plan.elem_size;
    if src.len_bytes() != bytes || dst.len_bytes() != bytes {
        return Err(CommError::shape(
            "device permute",
            format!("{bytes} bytes in and out"),
            format!("{} -> {} bytes", src.len_bytes(), dst.len_bytes()),
        ));
    }
    let ordinal = stream.context().ordinal();
    if src.device() != Device::Cuda(ordinal) || dst.device() != Device::Cuda(ordinal) {
        return Ok(false);
    }
    let dev = CudaDevice::get(ordinal)?;
    let Ok(kernels) = dev.kernels() else {
        return Ok(false);
    };
    dev.bind()?;
    let Some((sp, _read)) = src.cuda_read(stream) else {
        return Ok(false);
    };
    let Some((dp, _write)) = dst.cuda_write(stream) else {
        return Ok(false);
    };
    let Some(launch) = Launch::prepare(plan, sp, dp) else {
        return Ok(false);
    };
    // SAFETY: both addresses hold exactly the plan's bytes (checked above),
    // are distinct buffers (a `&` and a `&mut` borrow), and the guards order
    // the kernel after earlier uses and record it for later ones; they live
    // until after the launch.
    unsafe { launch.launch(kernels, stream, sp, dp) }?;
    Ok(true)
}

/// comm-core's [`DeviceAllocator`] for CUDA: tensors on `Device::Cuda(n)`
/// get a [`CudaStorage`].
#[derive(Debug, Clone, Copy, Default)]
pub struct CudaAllocator;

impl DeviceAllocator for CudaAllocator {
    fn kind(&self) -> &str {
        "cuda"
    }
    fn device_count(&self) -> Result<usize> {
        Ok(cuda_device_count().unwrap_or(0))
    }
    fn alloc_zeroed(&self, device: Device, len_bytes: usize) -> Result<Box<dyn DeviceStorage>> {
        Ok(Box::new(CudaStorage::zeroed(
            &CudaDevice::of(device)?,
            len_bytes,
        )?))
    }
    fn upload(&self, device: Device, bytes: &[u8]) -> Result<Box<dyn DeviceStorage>> {
        Ok(Box::new(CudaStorage::upload(
            &CudaDevice::of(device)?,
            bytes,
        )?))
    }
}

/// Installs [`CudaAllocator`] as the process's device allocator, so that
/// `Tensor::zeros_on`, `Tensor::to_device` and layout copies of CUDA tensors
/// work through comm-core alone. Idempotent (the first allocator installed
/// stays); [`NcclFactory`](crate::NcclFactory) calls it too.
pub fn install() {
    comm_core::install_device_allocator(Arc::new(CudaAllocator));
}
