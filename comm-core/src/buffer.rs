//! The buffer contract: what a collective reads from and writes to.
//!
//! Collectives take memory the caller owns, with no copy the operation does
//! not need: host slices (`&[T]`, `&mut [T]`, `Vec<T>`), this crate's
//! [`Tensor`](crate::Tensor), and device memory behind [`DeviceMemory`]
//! (with the `cuda` feature, cudarc's `CudaSlice<T>`, `CudaView<T>` and
//! `CudaViewMut<T>`, which is what candle stores). Anything that implements
//! [`AsBuf`] / [`AsBufMut`] can be passed.
//!
//! ```
//! use comm_core::{AsBuf, AsBufMut, DType};
//! let mut v = vec![1.0f32, 2.0, 3.0];
//! assert_eq!(v.as_buf().unwrap().dtype(), DType::F32);
//! assert_eq!(v.as_buf_mut().unwrap().numel(), 3);
//! let s: &[i64] = &[7, 8];
//! assert_eq!(s.as_buf().unwrap().nbytes(), 16);
//! ```

use std::fmt;

use crate::{CommError, DType, Device, Element, Result};

/// Memory on a device (a GPU), supplied by whoever owns it.
///
/// Host backends never see it: the checked front stages it through host
/// memory for them with [`copy_to_host`](Self::copy_to_host) and
/// [`copy_from_host`](Self::copy_from_host). Device backends (NCCL) take
/// the raw address through the `cuda_*` methods, which also order the access
/// after earlier work on the memory (cudarc's event tracking).
pub trait DeviceMemory: fmt::Debug {
    /// The device that holds the memory.
    fn device(&self) -> Device;
    /// Size in bytes.
    fn len_bytes(&self) -> usize;
    /// Copies all of it to `dst` (same length); returns once the bytes are
    /// on the host.
    fn copy_to_host(&self, dst: &mut [u8]) -> Result<()>;
    /// Overwrites all of it from `src` (same length); returns once done.
    fn copy_from_host(&mut self, src: &[u8]) -> Result<()>;
    /// Copies all of `src` (same length, any device) into this memory. The
    /// default goes through the host; device types override it with a
    /// device-to-device copy.
    fn copy_from_device(&mut self, src: &dyn DeviceMemory) -> Result<()> {
        let mut tmp = vec![0u8; src.len_bytes()];
        src.copy_to_host(&mut tmp)?;
        self.copy_from_host(&tmp)
    }
    /// The raw address for reading on `stream`, after `stream` was made to
    /// wait for earlier writes; the guard records the read when dropped.
    /// `None` when this memory is not CUDA memory.
    #[cfg(feature = "cuda")]
    fn cuda_read<'a>(
        &'a self,
        _stream: &'a cudarc::driver::CudaStream,
    ) -> Option<(u64, cudarc::driver::SyncOnDrop<'a>)> {
        None
    }
    /// As [`cuda_read`](Self::cuda_read), for writing (waits for earlier
    /// reads and writes). `None` for read-only views and non-CUDA memory.
    #[cfg(feature = "cuda")]
    fn cuda_write<'a>(
        &'a mut self,
        _stream: &'a cudarc::driver::CudaStream,
    ) -> Option<(u64, cudarc::driver::SyncOnDrop<'a>)> {
        None
    }
}

/// Memory to read: host bytes or device memory.
#[derive(Debug, Clone, Copy)]
pub enum Mem<'a> {
    /// Host bytes.
    Host(&'a [u8]),
    /// Device memory.
    Device(&'a dyn DeviceMemory),
}

/// Memory to write: host bytes or device memory.
#[derive(Debug)]
pub enum MemMut<'a> {
    /// Host bytes.
    Host(&'a mut [u8]),
    /// Device memory.
    Device(&'a mut dyn DeviceMemory),
}

impl Mem<'_> {
    /// Size in bytes.
    pub fn len_bytes(&self) -> usize {
        match self {
            Mem::Host(b) => b.len(),
            Mem::Device(d) => d.len_bytes(),
        }
    }
    /// Where the memory is.
    pub fn device(&self) -> Device {
        match self {
            Mem::Host(_) => Device::Cpu,
            Mem::Device(d) => d.device(),
        }
    }
}

impl MemMut<'_> {
    /// Size in bytes.
    pub fn len_bytes(&self) -> usize {
        match self {
            MemMut::Host(b) => b.len(),
            MemMut::Device(d) => d.len_bytes(),
        }
    }
    /// Where the memory is.
    pub fn device(&self) -> Device {
        match self {
            MemMut::Host(_) => Device::Cpu,
            MemMut::Device(d) => d.device(),
        }
    }
    /// A read-only view of the same memory.
    pub fn as_mem(&self) -> Mem<'_> {
        match self {
            MemMut::Host(b) => Mem::Host(b),
            MemMut::Device(d) => Mem::Device(&**d),
        }
    }
    /// Copies all of `src` (same length) in, across host and device.
    pub fn copy_from(&mut self, src: Mem<'_>) -> Result<()> {
        if self.len_bytes() != src.len_bytes() {
            return Err(CommError::shape(
                "copy",
                format!("{} bytes", self.len_bytes()),
                format!("{} bytes", src.len_bytes()),
            ));
        }
        match (self, src) {
            (MemMut::Host(d), Mem::Host(s)) => {
                d.copy_from_slice(s);
                Ok(())
            }
            (MemMut::Host(d), Mem::Device(s)) => s.copy_to_host(d),
            (MemMut::Device(d), Mem::Host(s)) => d.copy_from_host(s),
            (MemMut::Device(d), Mem::Device(s)) => d.copy_from_device(s),
        }
    }
}

/// A typed buffer to read from: memory and its element type. Its element
/// count is `nbytes / dtype.size()`; shapes do not matter to collectives.
#[derive(Debug, Clone, Copy)]
pub struct BufRef<'a> {
    mem: Mem<'a>,
    dtype: DType,
}

/// A typed buffer to write into.
#[derive(Debug)]
pub struct BufMut<'a> {
    mem: MemMut<'a>,
    dtype: DType,
}

fn whole_elements(bytes: usize, dtype: DType) -> Result<()> {
    if !bytes.is_multiple_of(dtype.size()) {
        return Err(CommError::invalid(format!(
            "a buffer of {bytes} bytes does not hold whole {dtype} elements"
        )));
    }
    Ok(())
}

impl<'a> BufRef<'a> {
    /// A buffer over `mem` of `dtype` elements (its length must be a whole
    /// number of elements).
    pub fn new(mem: Mem<'a>, dtype: DType) -> Result<Self> {
        whole_elements(mem.len_bytes(), dtype)?;
        Ok(BufRef { mem, dtype })
    }
    /// Host bytes as a buffer of `dtype`.
    pub fn host(bytes: &'a [u8], dtype: DType) -> Result<Self> {
        Self::new(Mem::Host(bytes), dtype)
    }
    /// The memory.
    pub fn mem(&self) -> Mem<'a> {
        self.mem
    }
    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.mem.len_bytes() / self.dtype.size()
    }
    /// Number of bytes.
    pub fn nbytes(&self) -> usize {
        self.mem.len_bytes()
    }
    /// Where the memory is.
    pub fn device(&self) -> Device {
        self.mem.device()
    }
    /// The host bytes, or `None` for device memory.
    pub fn host_bytes(&self) -> Option<&'a [u8]> {
        match self.mem {
            Mem::Host(b) => Some(b),
            Mem::Device(_) => None,
        }
    }
    /// The host bytes, or an error naming `op` for device memory (for
    /// backends, which the front only hands host memory they can move).
    pub fn expect_host(&self, op: &str) -> Result<&'a [u8]> {
        self.host_bytes()
            .ok_or_else(|| CommError::invalid(format!("{op}: this backend moves host memory only")))
    }
}

impl<'a> BufMut<'a> {
    /// A buffer over `mem` of `dtype` elements.
    pub fn new(mem: MemMut<'a>, dtype: DType) -> Result<Self> {
        whole_elements(mem.len_bytes(), dtype)?;
        Ok(BufMut { mem, dtype })
    }
    /// Host bytes as a buffer of `dtype`.
    pub fn host(bytes: &'a mut [u8], dtype: DType) -> Result<Self> {
        Self::new(MemMut::Host(bytes), dtype)
    }
    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.mem.len_bytes() / self.dtype.size()
    }
    /// Number of bytes.
    pub fn nbytes(&self) -> usize {
        self.mem.len_bytes()
    }
    /// Where the memory is.
    pub fn device(&self) -> Device {
        self.mem.device()
    }
    /// The memory.
    pub fn mem(&mut self) -> &mut MemMut<'a> {
        &mut self.mem
    }
    /// Consumes the buffer, giving its memory.
    pub fn into_mem(self) -> MemMut<'a> {
        self.mem
    }
    /// A read-only view.
    pub fn as_ref(&self) -> BufRef<'_> {
        BufRef {
            mem: self.mem.as_mem(),
            dtype: self.dtype,
        }
    }
    /// A shorter-lived buffer over the same memory.
    pub fn reborrow(&mut self) -> BufMut<'_> {
        BufMut {
            mem: match &mut self.mem {
                MemMut::Host(b) => MemMut::Host(b),
                MemMut::Device(d) => MemMut::Device(&mut **d),
            },
            dtype: self.dtype,
        }
    }
    /// The host bytes, or `None` for device memory.
    pub fn host_bytes(&mut self) -> Option<&mut [u8]> {
        match &mut self.mem {
            MemMut::Host(b) => Some(b),
            MemMut::Device(_) => None,
        }
    }
    /// The host bytes, or an error naming `op` for device memory.
    pub fn expect_host(&mut self, op: &str) -> Result<&mut [u8]> {
        self.host_bytes()
            .ok_or_else(|| CommError::invalid(format!("{op}: this backend moves host memory only")))
    }
    /// Consumes the buffer into its host bytes (`None` for device memory).
    pub fn into_host_bytes(self) -> Option<&'a mut [u8]> {
        match self.mem {
            MemMut::Host(b) => Some(b),
            MemMut::Device(_) => None,
        }
    }
}

/// Something a collective can read: typed memory the caller owns.
///
/// Implemented for host slices and vectors of every [`Element`] type, for
/// [`Tensor`](crate::Tensor), and (feature `cuda`) for cudarc's device
/// slices and views. Implement it for your own buffer type to pass it
/// straight to collectives.
pub trait AsBuf {
    /// The buffer.
    fn as_buf(&self) -> Result<BufRef<'_>>;
}

/// Something a collective can write into.
pub trait AsBufMut: AsBuf {
    /// The buffer.
    fn as_buf_mut(&mut self) -> Result<BufMut<'_>>;
}

impl<T: Element> AsBuf for [T] {
    fn as_buf(&self) -> Result<BufRef<'_>> {
        Ok(BufRef {
            mem: Mem::Host(bytemuck::cast_slice(self)),
            dtype: T::DTYPE,
        })
    }
}

impl<T: Element> AsBufMut for [T] {
    fn as_buf_mut(&mut self) -> Result<BufMut<'_>> {
        Ok(BufMut {
            mem: MemMut::Host(bytemuck::cast_slice_mut(self)),
            dtype: T::DTYPE,
        })
    }
}

impl<T: Element> AsBuf for Vec<T> {
    fn as_buf(&self) -> Result<BufRef<'_>> {
        self.as_slice().as_buf()
    }
}

impl<T: Element> AsBufMut for Vec<T> {
    fn as_buf_mut(&mut self) -> Result<BufMut<'_>> {
        self.as_mut_slice().as_buf_mut()
    }
}

impl<T: Element, const N: usize> AsBuf for [T; N] {
    fn as_buf(&self) -> Result<BufRef<'_>> {
        self.as_slice().as_buf()
    }
}

impl<T: Element, const N: usize> AsBufMut for [T; N] {
    fn as_buf_mut(&mut self) -> Result<BufMut<'_>> {
        self.as_mut_slice().as_buf_mut()
    }
}

impl<B: AsBuf + ?Sized> AsBuf for &B {
    fn as_buf(&self) -> Result<BufRef<'_>> {
        (**self).as_buf()
    }
}

impl<B: AsBuf + ?Sized> AsBuf for &mut B {
    fn as_buf(&self) -> Result<BufRef<'_>> {
        (**self).as_buf()
    }
}

impl<B: AsBufMut + ?Sized> AsBufMut for &mut B {
    fn as_buf_mut(&mut self) -> Result<BufMut<'_>> {
        (**self).as_buf_mut()
    }
}

impl<'a> AsBuf for BufRef<'a> {
    fn as_buf(&self) -> Result<BufRef<'_>> {
        Ok(*self)
    }
}

impl<'a> AsBuf for BufMut<'a> {
    fn as_buf(&self) -> Result<BufRef<'_>> {
        Ok(BufMut::as_ref(self))
    }
}

impl<'a> AsBufMut for BufMut<'a> {
    fn as_buf_mut(&mut self) -> Result<BufMut<'_>> {
        Ok(self.reborrow())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_vectors_and_arrays_are_buffers() {
        let mut v = vec![1u8, 2, 3];
        let mut b = v.as_buf_mut().unwrap();
        b.expect_host("t").unwrap()[0] = 9;
        assert_eq!(v, [9, 2, 3]);
        let a = [1.5f64; 4];
        assert_eq!(
            (a.as_buf().unwrap().numel(), a.as_buf().unwrap().dtype()),
            (4, DType::F64)
        );
        let mut dst = vec![0u8; 3];
        let src = [4u8, 5, 6];
        let mut m = dst.as_buf_mut().unwrap();
        m.mem().copy_from(src.as_buf().unwrap().mem()).unwrap();
        assert_eq!(dst, src);
        assert!(BufRef::host(&[0u8; 3], DType::I32).is_err());
    }
}
