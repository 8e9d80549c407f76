//! CUDA through cudarc: availability checks that never panic, a
//! [`DeviceStorage`] for comm-core's `Tensor`, host<->device copies.
//!
//! cudarc (with `dynamic-loading`) panics when libcuda is missing, or a
//! driver symbol is; every entry point here first checks
//! `is_culib_present()` and runs the first driver calls under
//! `catch_unwind`, so the outcome is `Err(BackendUnavailable)` instead.

use std::any::Any;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, OnceLock};

use comm_core::{CommError, DType, Device, DeviceStorage, Result, Tensor};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DriverError};

pub(crate) fn cuda_err(op: &str, e: DriverError) -> CommError {
    CommError::Cuda(format!("{op}: {e:?}"))
}

fn unavailable(reason: impl Into<String>) -> CommError {
    CommError::unavailable("cuda", reason)
}

fn panic_text(p: Box<dyn Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs a cudarc call that may panic when the driver library or a symbol
/// is missing, turning the panic into `BackendUnavailable`.
pub(crate) fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
        unavailable(format!(
            "{what}: the CUDA driver failed to load ({})",
            panic_text(p)
        ))
    })
}

/// True when the CUDA driver library (libcuda) can be opened. Never panics.
pub fn libcuda_present() -> bool {
    // SAFETY: only tries to dlopen the driver library by name and closes it.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Number of CUDA devices, or `BackendUnavailable` saying why there are none
/// usable (no libcuda, driver init failed, zero devices). Cached.
pub fn cuda_device_count() -> Result<usize> {
    static COUNT: OnceLock<std::result::Result<usize, String>> = OnceLock::new();
    COUNT
        .get_or_init(|| {
            if !libcuda_present() {
                return Err("libcuda.so (the NVIDIA driver library) was not found; \
                            no NVIDIA driver on this machine or not on LD_LIBRARY_PATH"
                    .into());
            }
            match guarded("cuDeviceGetCount", CudaContext::device_count) {
                Err(e) => Err(e.to_string()),
                Ok(Err(e)) => Err(format!("CUDA driver initialisation failed: {e:?}")),
                Ok(Ok(0)) => Err("the CUDA driver reports no devices".into()),
                Ok(Ok(n)) => Ok(n as usize),
            }
        })
        .clone()
        .map_err(unavailable)
}

/// One CUDA device as this crate uses it: the primary context and a stream
/// on which storages are allocated and copied.
#[derive(Debug)]
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: OnceLock<std::result::Result<crate::layout::Kernels, String>>,
}

impl CudaDevice {
    /// The shared handle for device `ordinal` (created once per process).
    pub fn get(ordinal: usize) -> Result<Arc<CudaDevice>> {
        static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<CudaDevice>>>> = OnceLock::new();
        let n = cuda_device_count()?;
        if ordinal >= n {
            return Err(CommError::invalid(format!(
                "cuda:{ordinal} does not exist; this machine has {n} CUDA device(s)"
            )));
        }
        let mut map = DEVICES
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(d) = map.get(&ordinal) {
            return Ok(d.clone());
        }
        let ctx = guarded("cuDevicePrimaryCtxRetain", || CudaContext::new(ordinal))?
            .map_err(|e| cuda_err(&format!("creating the context of cuda:{ordinal}"), e))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| cuda_err("creating the allocation stream", e))?;
        let d = Arc::new(CudaDevice {
            ctx,
            stream,
            kernels: OnceLock::new(),
        });
        map.insert(ordinal, d.clone());
        Ok(d)
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }
    /// The primary context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    /// The stream storages are allocated and copied on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// Makes the context current on this thread.
    pub fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_err("cuCtxSetCurrent", e))
    }
    /// The device name (e.g. "NVIDIA H100 80GB HBM3").
    pub fn name(&self) -> Result<String> {
        self.ctx.name().map_err(|e| cuda_err("cuDeviceGetName", e))
    }

    pub(crate) fn kernels(&self) -> std::result::Result<&crate::layout::Kernels, &str> {
        self.kernels
            .get_or_init(|| crate::layout::Kernels::compile(&self.ctx))
            .as_ref()
            .map_err(|s| s.as_str())
    }

    /// Zeroed device storage of `len` bytes.
    pub fn alloc_zeroed(self: &Arc<Self>, len: usize) -> Result<CudaStorage> {
        self.bind()?;
        let slice = if len == 0 {
            self.stream.null::<u8>()
        } else {
            self.stream.alloc_zeros::<u8>(len)
        }
        .map_err(|e| {
            cuda_err(
                &format!("allocating {len} bytes on cuda:{}", self.ordinal()),
                e,
            )
        })?;
        Ok(CudaStorage {
            dev: self.clone(),
            slice,
        })
    }

    /// Device storage holding a copy of `bytes`.
    pub fn upload(self: &Arc<Self>, bytes: &[u8]) -> Result<CudaStorage> {
        let mut s = self.alloc_zeroed(bytes.len())?;
        s.copy_from_host(bytes)?;
        Ok(s)
    }

    /// A zero-filled CUDA tensor.
    pub fn zeros(self: &Arc<Self>, shape: impl Into<Vec<usize>>, dtype: DType) -> Result<Tensor> {
        let shape = shape.into();
        let n: usize = shape.iter().product();
        let s = self.alloc_zeroed(n * dtype.size())?;
        Tensor::from_device_storage(Box::new(s), shape, dtype)
    }

    /// A CUDA copy of `t` (host or device).
    pub fn to_device(self: &Arc<Self>, t: &Tensor) -> Result<Tensor> {
        let h;
        let host = if t.is_host() {
            t
        } else {
            h = t.to_host()?;
            &h
        };
        let s = self.upload(host.as_bytes()?)?;
        Tensor::from_device_storage(Box::new(s), t.shape().to_vec(), t.dtype())
    }
}

/// Copies a host (or device) tensor onto `cuda:ordinal`.
pub fn to_cuda(t: &Tensor, ordinal: usize) -> Result<Tensor> {
    CudaDevice::get(ordinal)?.to_device(t)
}

/// A zero-filled CUDA tensor with `meta`'s shape and dtype on its device
/// (`meta.device` must be `Device::Cuda`).
pub fn zeros_cuda(meta: &comm_core::TensorMetadata) -> Result<Tensor> {
    match meta.device {
        Device::Cuda(ordinal) => CudaDevice::get(ordinal)?.zeros(meta.shape.clone(), meta.dtype),
        Device::Cpu => Err(CommError::invalid(
            "zeros_cuda: the metadata describes a host tensor",
        )),
    }
}

/// Device memory of one tensor: a cudarc `CudaSlice<u8>` allocated on its
/// device's stream. cudarc's per-slice events order its uses across streams
/// (the communicator's stream waits for the last write before reading).
#[derive(Debug)]
pub struct CudaStorage {
    dev: Arc<CudaDevice>,
    slice: CudaSlice<u8>,
}

impl CudaStorage {
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

    /// Downcasts a tensor's storage, checking it is a CUDA storage of this crate.
    pub fn of(t: &Tensor) -> Result<&CudaStorage> {
        t.device_storage()
            .and_then(|s| s.as_any().downcast_ref::<CudaStorage>())
            .ok_or_else(|| not_ours(t))
    }
    /// Mutable [`CudaStorage::of`].
    pub fn of_mut(t: &mut Tensor) -> Result<&mut CudaStorage> {
        let dev = t.device();
        t.device_storage_mut()
            .and_then(|s| s.as_any_mut().downcast_mut::<CudaStorage>())
            .ok_or_else(|| {
                CommError::invalid(format!(
                    "a tensor on {dev} whose storage was not made by comm-nccl; allocate CUDA \
                     tensors with comm_nccl::CudaDevice"
                ))
            })
    }
}

fn not_ours(t: &Tensor) -> CommError {
    CommError::invalid(format!(
        "a tensor on {} whose storage was not made by comm-nccl; allocate CUDA tensors with \
         comm_nccl::CudaDevice",
        t.device()
    ))
}

impl DeviceStorage for CudaStorage {
    fn device(&self) -> Device {
        Device::Cuda(self.dev.ordinal())
    }
    fn len_bytes(&self) -> usize {
        self.slice.len()
    }
    fn copy_to_host(&self, dst: &mut [u8]) -> Result<()> {
        if dst.len() != self.slice.len() {
            return Err(CommError::shape(
                "CudaStorage::copy_to_host",
                format!("{} bytes", self.slice.len()),
                format!("{} bytes", dst.len()),
            ));
        }
        if dst.is_empty() {
            return Ok(());
        }
        self.dev.bind()?;
        let s = &self.dev.stream;
        s.memcpy_dtoh(&self.slice, dst)
            .and_then(|_| s.synchronize())
            .map_err(|e| cuda_err("device-to-host copy", e))
    }
    fn copy_from_host(&mut self, src: &[u8]) -> Result<()> {
        if src.len() != self.slice.len() {
            return Err(CommError::shape(
                "CudaStorage::copy_from_host",
                format!("{} bytes", self.slice.len()),
                format!("{} bytes", src.len()),
            ));
        }
        if src.is_empty() {
            return Ok(());
        }
        self.dev.bind()?;
        let s = self.dev.stream.clone();
        s.memcpy_htod(src, &mut self.slice)
            .and_then(|_| s.synchronize())
            .map_err(|e| cuda_err("host-to-device copy", e))
    }
    fn alloc_zeroed(&self, len_bytes: usize) -> Result<Box<dyn DeviceStorage>> {
        Ok(Box::new(self.dev.alloc_zeroed(len_bytes)?))
    }
    fn try_clone(&self) -> Result<Box<dyn DeviceStorage>> {
        let mut out = self.dev.alloc_zeroed(self.slice.len())?;
        if !self.slice.is_empty() {
            let s = self.dev.stream.clone();
            s.memcpy_dtod(&self.slice, &mut out.slice)
                .map_err(|e| cuda_err("device-to-device copy", e))?;
        }
        Ok(Box::new(out))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
