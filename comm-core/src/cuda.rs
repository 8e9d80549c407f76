//! cudarc's device memory as collective buffers (feature `cuda`).
//!
//! `CudaSlice<T>`, `CudaView<T>` and `CudaViewMut<T>` implement
//! [`DeviceMemory`] and [`AsBuf`] (slices and mutable views also
//! [`AsBufMut`]), so a candle-style engine passes its own GPU buffers to
//! collectives without copies. Accesses go through cudarc's
//! `device_ptr`/`device_ptr_mut`, so a collective on another stream is
//! ordered after earlier kernels that wrote the buffer, and later kernels
//! after the collective (cudarc's per-buffer events).
//!
//! This module only names cudarc types; how cudarc links (dynamic loading or
//! linking) and which CUDA version it targets are the application's choice.

use cudarc::driver::{
    result, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr,
    DeviceSlice, SyncOnDrop,
};

use crate::buffer::{BufMut, BufRef, Mem, MemMut};
use crate::{AsBuf, AsBufMut, CommError, Device, DeviceMemory, Element, Result};

fn cuda_err(op: &str, e: cudarc::driver::DriverError) -> CommError {
    CommError::Cuda(format!("{op}: {e:?}"))
}

fn same_len(op: &str, have: usize, given: usize) -> Result<()> {
    if have != given {
        return Err(CommError::shape(
            op,
            format!("{have} bytes"),
            format!("{given} bytes"),
        ));
    }
    Ok(())
}

/// Copies a device buffer to the host on its own stream and waits.
fn to_host<T, S: DevicePtr<T>>(s: &S, dst: &mut [u8]) -> Result<()> {
    same_len("device-to-host copy", s.num_bytes(), dst.len())?;
    if dst.is_empty() {
        return Ok(());
    }
    let stream = s.stream().clone();
    stream
        .context()
        .bind_to_thread()
        .map_err(|e| cuda_err("binding the CUDA context", e))?;
    {
        let (ptr, _record) = s.device_ptr(&stream);
        // SAFETY: `ptr` addresses `dst.len()` bytes of live device memory
        // (lengths checked above); the copy is ordered on `stream` after
        // earlier writes by `device_ptr`, and `dst` outlives it because we
        // synchronise before returning.
        unsafe { result::memcpy_dtoh_async(dst, ptr, stream.cu_stream()) }
            .map_err(|e| cuda_err("device-to-host copy", e))?;
    }
    stream
        .synchronize()
        .map_err(|e| cuda_err("device-to-host copy", e))
}

/// Overwrites a device buffer from the host on its own stream and waits.
fn from_host<T, S: DevicePtrMut<T>>(s: &mut S, src: &[u8]) -> Result<()> {
    same_len("host-to-device copy", s.num_bytes(), src.len())?;
    if src.is_empty() {
        return Ok(());
    }
    let stream = s.stream().clone();
    stream
        .context()
        .bind_to_thread()
        .map_err(|e| cuda_err("binding the CUDA context", e))?;
    {
        let (ptr, _record) = s.device_ptr_mut(&stream);
        // SAFETY: `ptr` addresses `src.len()` writable bytes (checked); the
        // copy waits for earlier uses, and `src` outlives it (synchronised below).
        unsafe { result::memcpy_htod_async(ptr, src, stream.cu_stream()) }
            .map_err(|e| cuda_err("host-to-device copy", e))?;
    }
    stream
        .synchronize()
        .map_err(|e| cuda_err("host-to-device copy", e))
}

/// Device-to-device copy on the destination's stream (asynchronous: later
/// uses of either buffer are ordered after it by cudarc's events).
fn from_device<T, D: DevicePtrMut<T>>(dst: &mut D, src: &dyn DeviceMemory) -> Result<()> {
    same_len("device-to-device copy", dst.num_bytes(), src.len_bytes())?;
    if dst.num_bytes() == 0 {
        return Ok(());
    }
    let stream = dst.stream().clone();
    let bytes = dst.num_bytes();
    let Some((sp, _read)) = src.cuda_read(&stream) else {
        let mut tmp = vec![0u8; bytes];
        src.copy_to_host(&mut tmp)?;
        return from_host(dst, &tmp);
    };
    stream
        .context()
        .bind_to_thread()
        .map_err(|e| cuda_err("binding the CUDA context", e))?;
    let (dp, _write) = dst.device_ptr_mut(&stream);
    // SAFETY: both ranges hold `bytes` bytes of live device memory (checked),
    // ordered on `stream` after earlier uses by the two guards.
    unsafe { result::memcpy_dtod_async(dp, sp, bytes, stream.cu_stream()) }
        .map_err(|e| cuda_err("device-to-device copy", e))
}

macro_rules! device_memory_read {
    () => {
        fn device(&self) -> Device {
            Device::Cuda(self.stream().context().ordinal())
        }
        fn len_bytes(&self) -> usize {
            self.num_bytes()
        }
        fn copy_to_host(&self, dst: &mut [u8]) -> Result<()> {
            to_host(self, dst)
        }
        fn cuda_read<'a>(&'a self, stream: &'a CudaStream) -> Option<(u64, SyncOnDrop<'a>)> {
            Some(self.device_ptr(stream))
        }
    };
}

impl<T: DeviceRepr + std::fmt::Debug> DeviceMemory for CudaSlice<T> {
    device_memory_read!();
    fn copy_from_host(&mut self, src: &[u8]) -> Result<()> {
        from_host(self, src)
    }
    fn copy_from_device(&mut self, src: &dyn DeviceMemory) -> Result<()> {
        from_device(self, src)
    }
    fn cuda_write<'a>(&'a mut self, stream: &'a CudaStream) -> Option<(u64, SyncOnDrop<'a>)> {
        Some(self.device_ptr_mut(stream))
    }
}

impl<T: DeviceRepr + std::fmt::Debug> DeviceMemory for CudaViewMut<'_, T> {
    device_memory_read!();
    fn copy_from_host(&mut self, src: &[u8]) -> Result<()> {
        from_host(self, src)
    }
    fn copy_from_device(&mut self, src: &dyn DeviceMemory) -> Result<()> {
        from_device(self, src)
    }
    fn cuda_write<'a>(&'a mut self, stream: &'a CudaStream) -> Option<(u64, SyncOnDrop<'a>)> {
        Some(self.device_ptr_mut(stream))
    }
}

impl<T: DeviceRepr + std::fmt::Debug> DeviceMemory for CudaView<'_, T> {
    device_memory_read!();
    fn copy_from_host(&mut self, _src: &[u8]) -> Result<()> {
        Err(CommError::invalid(
            "a CudaView is read-only; pass a CudaSlice or CudaViewMut to receive data",
        ))
    }
}

macro_rules! as_buf {
    ($($ty:ty),*) => {$(
        impl<T: Element + DeviceRepr> AsBuf for $ty {
            fn as_buf(&self) -> Result<BufRef<'_>> {
                BufRef::new(Mem::Device(self), T::DTYPE)
            }
        }
    )*};
}
as_buf!(CudaSlice<T>, CudaView<'_, T>, CudaViewMut<'_, T>);

macro_rules! as_buf_mut {
    ($($ty:ty),*) => {$(
        impl<T: Element + DeviceRepr> AsBufMut for $ty {
            fn as_buf_mut(&mut self) -> Result<BufMut<'_>> {
                BufMut::new(MemMut::Device(self), T::DTYPE)
            }
        }
    )*};
}
as_buf_mut!(CudaSlice<T>, CudaViewMut<'_, T>);
