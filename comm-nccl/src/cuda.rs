//! CUDA through cudarc: availability checks that never panic, one
//! [`CudaDevice`] per ordinal (primary context, a stream for storage, the
//! compiled permute kernels), and device identity ([`device_uuid`]).
//!
//! cudarc (with dynamic loading) panics when libcuda or one of its symbols
//! is missing; every entry point here first checks that the library is
//! present and runs the first driver calls under `catch_unwind`, so the
//! outcome is `Err(BackendUnavailable)` instead. The checks use the dynamic
//! loader directly, so they work with any cudarc linking mode.

use std::any::Any;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, OnceLock};

use comm_core::{CommError, Device, Result};
use cudarc::driver::{CudaContext, CudaStream, DriverError};

use crate::kernel::Kernels;

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

/// Runs a cudarc call that may panic when a CUDA library or a symbol is
/// missing, turning the panic into `BackendUnavailable`.
pub(crate) fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
        unavailable(format!(
            "{what}: a CUDA library failed to load ({})",
            panic_text(p)
        ))
    })
}

/// True when one of `names` can be opened by the dynamic loader (it is
/// closed again). Works whatever linking mode the application chose for
/// cudarc (with `dynamic-linking` the library is already loaded).
pub(crate) fn lib_present(names: &[&str]) -> bool {
    names.iter().any(|n| {
        // SAFETY: opening a CUDA library runs its initialisers, which are
        // sound at any time; nothing from it is called here.
        unsafe { libloading::Library::new(*n) }.is_ok()
    })
}

/// True when the CUDA driver library (libcuda) can be opened. Never panics.
pub fn libcuda_present() -> bool {
    lib_present(&["libcuda.so.1", "libcuda.so"])
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

/// The 16-byte UUID of CUDA device `ordinal` (the same device has the same
/// UUID in every process, whatever `CUDA_VISIBLE_DEVICES` renumbers), so
/// members of a group can tell whether they share a GPU. Creates no context.
pub fn device_uuid(ordinal: usize) -> Result<[u8; 16]> {
    let n = cuda_device_count()?;
    if ordinal >= n {
        return Err(CommError::invalid(format!(
            "cuda:{ordinal} does not exist; this machine has {n} CUDA device(s)"
        )));
    }
    let ord = i32::try_from(ordinal).map_err(|_| CommError::invalid("device ordinal overflows"))?;
    let uuid = guarded("cuDeviceGetUuid", || {
        use cudarc::driver::result;
        result::init()?;
        let dev = result::device::get(ord)?;
        result::device::get_uuid(dev)
    })?
    .map_err(|e| cuda_err(&format!("cuDeviceGetUuid(cuda:{ordinal})"), e))?;
    // `c_char` is i8 or u8 by platform: reinterpret the bytes.
    Ok(uuid.bytes.map(|b| b as u8))
}

/// A UUID as `nvidia-smi -L` prints it: `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
///
/// ```
/// let u = [0x12u8, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 1, 2, 3, 4, 5, 6, 7, 8];
/// assert_eq!(comm_nccl::format_uuid(&u), "GPU-12345678-9abc-def0-0102-030405060708");
/// ```
pub fn format_uuid(u: &[u8; 16]) -> String {
    let h = comm_core::auth::to_hex(u);
    format!(
        "GPU-{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// One CUDA device as this crate uses it: the primary context, a stream on
/// which storage is allocated, copied and permuted, and the permute kernels
/// (compiled with NVRTC on first use).
#[derive(Debug)]
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: OnceLock<std::result::Result<Kernels, String>>,
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
            .map_err(|e| cuda_err("creating the storage stream", e))?;
        let d = Arc::new(CudaDevice {
            ctx,
            stream,
            kernels: OnceLock::new(),
        });
        map.insert(ordinal, d.clone());
        Ok(d)
    }

    /// The device of a `Device::Cuda` (an error for the host).
    pub fn of(device: Device) -> Result<Arc<CudaDevice>> {
        match device {
            Device::Cuda(n) => Self::get(n),
            Device::Cpu => Err(CommError::invalid(
                "a CUDA device was expected, not the host",
            )),
        }
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }
    /// The primary context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    /// The stream storage is allocated, copied and permuted on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// Makes the context current on this thread.
    pub fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_err("cuCtxSetCurrent", e))
    }
    /// The device name (e.g. "NVIDIA H200").
    pub fn name(&self) -> Result<String> {
        self.ctx.name().map_err(|e| cuda_err("cuDeviceGetName", e))
    }

    /// The permute kernels, compiled on first use; `Err(reason)` when NVRTC
    /// is missing or compilation failed (callers then stage through the
    /// host; the reason is logged once).
    pub fn kernels(&self) -> std::result::Result<&Kernels, &str> {
        self.kernels
            .get_or_init(|| {
                let k = Kernels::load(&self.ctx);
                if let Err(e) = &k {
                    tracing::warn!(
                        "cuda:{}: device permute kernels unavailable, layout copies go through \
                         the host: {e}",
                        self.ordinal()
                    );
                }
                k
            })
            .as_ref()
            .map_err(|s| s.as_str())
    }
}
