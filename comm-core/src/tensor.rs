//! A small contiguous, row-major tensor: shape + dtype + storage.
//!
//! Host storage is aligned to 64 bytes (one cache line, and enough for any
//! SIMD width the reduce kernels use). Device storage is a trait object that a
//! GPU backend supplies, so this crate stays free of CUDA.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::buffer::{BufMut, BufRef, Mem, MemMut};
use crate::device::{device_allocator, DeviceStorage};
use crate::{AsBuf, AsBufMut, CommError, DType, Device, Element, Result};

/// One 64-byte, 64-aligned block: the unit host buffers are made of.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Block([u8; 64]);

// SAFETY: `Block` is a plain array of bytes with no padding (size 64, align 64),
// so every bit pattern is valid and it contains no pointers.
unsafe impl bytemuck::Zeroable for Block {}
// SAFETY: as above; `Copy + 'static`, `repr(C)`, no padding bytes.
unsafe impl bytemuck::Pod for Block {}

/// A host byte buffer whose start is aligned to 64 bytes.
#[derive(Clone)]
pub struct HostBuffer {
    blocks: Vec<Block>,
    len: usize,
}

impl HostBuffer {
    /// A zero-filled buffer of `len` bytes. Large buffers come zeroed from
    /// the allocator (fresh pages), so nothing is written twice.
    pub fn zeroed(len: usize) -> Self {
        HostBuffer {
            blocks: bytemuck::zeroed_vec(len.div_ceil(64)),
            len,
        }
    }

    /// A zero-filled buffer of `len` bytes, or an error when the memory
    /// cannot be had (sizes that come from peers go through here: a refused
    /// allocation must be an error, not an abort of the process).
    pub fn try_zeroed(len: usize) -> Result<Self> {
        let blocks = len.div_ceil(64);
        if blocks == 0 {
            return Ok(Self::zeroed(0));
        }
        let too_big =
            || CommError::invalid(format!("cannot allocate a host buffer of {len} bytes"));
        let layout = std::alloc::Layout::array::<Block>(blocks).map_err(|_| too_big())?;
        // SAFETY: `layout` has a non-zero size (blocks > 0).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<Block>();
        if ptr.is_null() {
            return Err(too_big());
        }
        // SAFETY: `ptr` comes from the global allocator with the layout of
        // `blocks` Blocks, and zeroed bytes are valid Blocks, so a Vec may own
        // it with length and capacity `blocks`.
        let blocks = unsafe { Vec::from_raw_parts(ptr, blocks, blocks) };
        Ok(HostBuffer { blocks, len })
    }

    /// A buffer holding a copy of `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let mut b = Self::zeroed(bytes.len());
        b.as_bytes_mut().copy_from_slice(bytes);
        b
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Makes the buffer `len` bytes long for reuse as a workspace: grows the
    /// allocation (zeroed) only when it is too small; the contents are
    /// whatever the buffer held before (never uninitialised).
    pub fn reuse(&mut self, len: usize) {
        let blocks = len.div_ceil(64);
        if blocks > self.blocks.len() {
            self.blocks = bytemuck::zeroed_vec(blocks);
        }
        self.len = len;
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &bytemuck::cast_slice::<Block, u8>(&self.blocks)[..self.len]
    }

    /// The bytes, mutably.
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut bytemuck::cast_slice_mut::<Block, u8>(&mut self.blocks)[..len]
    }
}

impl fmt::Debug for HostBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostBuffer")
            .field("len", &self.len)
            .finish()
    }
}

/// Where a tensor's bytes are.
#[derive(Debug)]
pub enum Storage {
    /// Host memory, 64-byte aligned.
    Host(HostBuffer),
    /// Device memory owned by a backend.
    Device(Box<dyn DeviceStorage>),
}

/// Device kind, dtype and shape: what travels ahead of a tensor's bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorMetadata {
    /// Where the tensor lives.
    pub device: Device,
    /// Element type.
    pub dtype: DType,
    /// Shape (row-major, contiguous).
    pub shape: Vec<usize>,
}

impl TensorMetadata {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Number of bytes.
    pub fn nbytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }
}

/// A contiguous row-major tensor.
///
/// ```
/// use comm_core::Tensor;
/// let t = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], [2, 3]).unwrap();
/// assert_eq!(t.shape(), &[2, 3]);
/// assert_eq!(t.as_slice::<f32>().unwrap()[4], 5.0);
/// ```
#[derive(Debug)]
pub struct Tensor {
    shape: Vec<usize>,
    dtype: DType,
    storage: Storage,
}

fn numel_of(shape: &[usize]) -> Result<usize> {
    shape.iter().try_fold(1usize, |acc, &d| {
        acc.checked_mul(d)
            .ok_or_else(|| CommError::invalid(format!("shape {shape:?} overflows usize")))
    })
}

impl Tensor {
    /// A zero-filled host tensor.
    ///
    /// Panics if the shape's byte size overflows `usize` (as `vec!` does);
    /// use [`Tensor::try_zeros`] for shapes that come from outside.
    pub fn zeros(shape: impl Into<Vec<usize>>, dtype: DType) -> Tensor {
        let shape = shape.into();
        let n: usize = shape.iter().product();
        Tensor {
            storage: Storage::Host(HostBuffer::zeroed(n * dtype.size())),
            shape,
            dtype,
        }
    }

    /// A zero-filled host tensor, or an error when the shape's byte size
    /// overflows (shapes received from peers go through here).
    pub fn try_zeros(shape: impl Into<Vec<usize>>, dtype: DType) -> Result<Tensor> {
        let shape = shape.into();
        let n = numel_of(&shape)?;
        n.checked_mul(dtype.size())
            .filter(|b| *b <= isize::MAX as usize)
            .ok_or_else(|| {
                CommError::invalid(format!(
                    "a {dtype} tensor of shape {shape:?} is too large to allocate"
                ))
            })?;
        let bytes = n * dtype.size();
        Ok(Tensor {
            storage: Storage::Host(HostBuffer::try_zeroed(bytes)?),
            shape,
            dtype,
        })
    }

    /// A host tensor from typed data; `data.len()` must equal the shape's product.
    pub fn from_vec<T: Element>(data: Vec<T>, shape: impl Into<Vec<usize>>) -> Result<Tensor> {
        Self::from_slice(&data, shape)
    }

    /// A host tensor copied from a typed slice.
    pub fn from_slice<T: Element>(data: &[T], shape: impl Into<Vec<usize>>) -> Result<Tensor> {
        let shape = shape.into();
        let n = numel_of(&shape)?;
        if n != data.len() {
            return Err(CommError::shape(
                "Tensor::from_slice",
                format!("{n} elements for shape {shape:?}"),
                format!("{} elements", data.len()),
            ));
        }
        Ok(Tensor {
            storage: Storage::Host(HostBuffer::from_bytes(bytemuck::cast_slice(data))),
            shape,
            dtype: T::DTYPE,
        })
    }

    /// A 1-D host tensor from typed data.
    pub fn from_vec1<T: Element>(data: Vec<T>) -> Tensor {
        let n = data.len();
        Tensor {
            storage: Storage::Host(HostBuffer::from_bytes(bytemuck::cast_slice(&data))),
            shape: vec![n],
            dtype: T::DTYPE,
        }
    }

    /// A host tensor from raw bytes of the given dtype.
    pub fn from_bytes(bytes: &[u8], shape: impl Into<Vec<usize>>, dtype: DType) -> Result<Tensor> {
        let shape = shape.into();
        let n = numel_of(&shape)?;
        if n * dtype.size() != bytes.len() {
            return Err(CommError::shape(
                "Tensor::from_bytes",
                format!("{} bytes for {dtype} shape {shape:?}", n * dtype.size()),
                format!("{} bytes", bytes.len()),
            ));
        }
        Ok(Tensor {
            storage: Storage::Host(HostBuffer::from_bytes(bytes)),
            shape,
            dtype,
        })
    }

    /// Wraps a host buffer.
    pub fn from_host_buffer(
        buf: HostBuffer,
        shape: impl Into<Vec<usize>>,
        dtype: DType,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let n = numel_of(&shape)?;
        if n * dtype.size() != buf.len() {
            return Err(CommError::shape(
                "Tensor::from_host_buffer",
                format!("{} bytes", n * dtype.size()),
                format!("{} bytes", buf.len()),
            ));
        }
        Ok(Tensor {
            storage: Storage::Host(buf),
            shape,
            dtype,
        })
    }

    /// Wraps device storage supplied by a backend.
    pub fn from_device_storage(
        storage: Box<dyn DeviceStorage>,
        shape: impl Into<Vec<usize>>,
        dtype: DType,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let n = numel_of(&shape)?;
        if n * dtype.size() != storage.len_bytes() {
            return Err(CommError::shape(
                "Tensor::from_device_storage",
                format!("{} bytes", n * dtype.size()),
                format!("{} bytes", storage.len_bytes()),
            ));
        }
        Ok(Tensor {
            storage: Storage::Device(storage),
            shape,
            dtype,
        })
    }

    /// A zero-filled tensor described by `meta`, on `meta.device` (device
    /// memory comes from the installed [`DeviceAllocator`](crate::DeviceAllocator)).
    pub fn zeros_on(meta: &TensorMetadata) -> Result<Tensor> {
        match meta.device {
            Device::Cpu => Tensor::try_zeros(meta.shape.clone(), meta.dtype),
            dev => {
                let n = numel_of(&meta.shape)?;
                let bytes = n.checked_mul(meta.dtype.size()).ok_or_else(|| {
                    CommError::invalid(format!("shape {:?} overflows usize", meta.shape))
                })?;
                let s = device_allocator(dev)?.alloc_zeroed(dev, bytes)?;
                Tensor::from_device_storage(s, meta.shape.clone(), meta.dtype)
            }
        }
    }

    /// A copy of this tensor on `device` (a host copy for `Device::Cpu`).
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        match device {
            Device::Cpu => self.to_host(),
            dev => {
                let h;
                let host = if self.is_host() {
                    self
                } else {
                    h = self.to_host()?;
                    &h
                };
                let s = device_allocator(dev)?.upload(dev, host.as_bytes()?)?;
                Tensor::from_device_storage(s, self.shape.clone(), self.dtype)
            }
        }
    }

    /// A zero-filled tensor of the same shape, dtype and device.
    pub fn zeros_like(&self) -> Result<Tensor> {
        self.zeros_with_shape(self.shape.clone())
    }

    /// A zero-filled tensor of this dtype and device with another shape.
    pub fn zeros_with_shape(&self, shape: impl Into<Vec<usize>>) -> Result<Tensor> {
        let shape = shape.into();
        match &self.storage {
            Storage::Host(_) => Ok(Tensor::zeros(shape, self.dtype)),
            Storage::Device(d) => {
                let n = numel_of(&shape)?;
                let s = d.alloc_zeroed(n * self.dtype.size())?;
                Tensor::from_device_storage(s, shape, self.dtype)
            }
        }
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Number of dimensions.
    pub fn ndim(&self) -> usize {
        self.shape.len()
    }
    /// The dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Where the storage lives.
    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::Host(_) => Device::Cpu,
            Storage::Device(d) => d.device(),
        }
    }
    /// True for host tensors.
    pub fn is_host(&self) -> bool {
        matches!(self.storage, Storage::Host(_))
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Number of bytes.
    pub fn nbytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }
    /// Device kind, dtype and shape.
    pub fn metadata(&self) -> TensorMetadata {
        TensorMetadata {
            device: self.device(),
            dtype: self.dtype,
            shape: self.shape.clone(),
        }
    }
    /// The storage.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }
    /// The storage, mutably.
    pub fn storage_mut(&mut self) -> &mut Storage {
        &mut self.storage
    }
    /// Device storage, when the tensor is on a device.
    pub fn device_storage(&self) -> Option<&dyn DeviceStorage> {
        match &self.storage {
            Storage::Device(d) => Some(d.as_ref()),
            Storage::Host(_) => None,
        }
    }
    /// Device storage, mutably.
    pub fn device_storage_mut(&mut self) -> Option<&mut (dyn DeviceStorage + 'static)> {
        match &mut self.storage {
            Storage::Device(d) => Some(d.as_mut()),
            Storage::Host(_) => None,
        }
    }

    fn host_only(&self, op: &str) -> Result<()> {
        if self.is_host() {
            Ok(())
        } else {
            Err(CommError::invalid(format!(
                "{op} needs a host tensor but this one is on {}; copy it with to_host() first",
                self.device()
            )))
        }
    }

    /// The host bytes. Errors for device tensors.
    pub fn as_bytes(&self) -> Result<&[u8]> {
        match &self.storage {
            Storage::Host(b) => Ok(b.as_bytes()),
            Storage::Device(_) => self.host_only("as_bytes").map(|_| &[][..]),
        }
    }

    /// The host bytes, mutably. Errors for device tensors.
    pub fn as_bytes_mut(&mut self) -> Result<&mut [u8]> {
        self.host_only("as_bytes_mut")?;
        match &mut self.storage {
            Storage::Host(b) => Ok(b.as_bytes_mut()),
            Storage::Device(_) => Err(CommError::invalid("as_bytes_mut on a device tensor")),
        }
    }

    fn check_dtype<T: Element>(&self, op: &str) -> Result<()> {
        if T::DTYPE == self.dtype {
            Ok(())
        } else {
            Err(CommError::DTypeMismatch {
                operation: op.into(),
                expected: self.dtype.to_string(),
                actual: T::DTYPE.to_string(),
            })
        }
    }

    /// A typed read view of a host tensor.
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        self.check_dtype::<T>("Tensor::as_slice")?;
        // Host buffers are 64-aligned and sized in whole elements, so the cast cannot fail.
        bytemuck::try_cast_slice(self.as_bytes()?)
            .map_err(|e| CommError::invalid(format!("as_slice: {e}")))
    }

    /// A typed write view of a host tensor.
    pub fn as_mut_slice<T: Element>(&mut self) -> Result<&mut [T]> {
        self.check_dtype::<T>("Tensor::as_mut_slice")?;
        bytemuck::try_cast_slice_mut(self.as_bytes_mut()?)
            .map_err(|e| CommError::invalid(format!("as_mut_slice: {e}")))
    }

    /// The elements as a `Vec`, copying from the device if needed.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        self.check_dtype::<T>("Tensor::to_vec")?;
        match &self.storage {
            Storage::Host(_) => Ok(self.as_slice::<T>()?.to_vec()),
            Storage::Device(_) => self.to_host()?.to_vec(),
        }
    }

    /// A host copy (a plain clone for host tensors).
    pub fn to_host(&self) -> Result<Tensor> {
        match &self.storage {
            Storage::Host(b) => Ok(Tensor {
                storage: Storage::Host(b.clone()),
                shape: self.shape.clone(),
                dtype: self.dtype,
            }),
            Storage::Device(d) => {
                let mut buf = HostBuffer::zeroed(d.len_bytes());
                d.as_memory().copy_to_host(buf.as_bytes_mut())?;
                Tensor::from_host_buffer(buf, self.shape.clone(), self.dtype)
            }
        }
    }

    /// Copies all bytes of `src` (same dtype and element count) into `self`,
    /// across host and device as needed.
    pub fn copy_from(&mut self, src: &Tensor) -> Result<()> {
        if src.dtype != self.dtype || src.numel() != self.numel() {
            return Err(CommError::shape(
                "Tensor::copy_from",
                format!("{} x {}", self.numel(), self.dtype),
                format!("{} x {}", src.numel(), src.dtype),
            ));
        }
        self.mem_mut().copy_from(src.mem())
    }

    /// The memory, for reading.
    pub fn mem(&self) -> Mem<'_> {
        match &self.storage {
            Storage::Host(b) => Mem::Host(b.as_bytes()),
            Storage::Device(d) => Mem::Device(d.as_memory()),
        }
    }

    /// The memory, for writing.
    pub fn mem_mut(&mut self) -> MemMut<'_> {
        match &mut self.storage {
            Storage::Host(b) => MemMut::Host(b.as_bytes_mut()),
            Storage::Device(d) => MemMut::Device(d.as_memory_mut()),
        }
    }

    /// A deep copy on the same device.
    pub fn try_clone(&self) -> Result<Tensor> {
        Ok(Tensor {
            storage: match &self.storage {
                Storage::Host(b) => Storage::Host(b.clone()),
                Storage::Device(d) => Storage::Device(d.try_clone()?),
            },
            shape: self.shape.clone(),
            dtype: self.dtype,
        })
    }

    /// The same storage under another shape with the same element count.
    pub fn reshape(mut self, shape: impl Into<Vec<usize>>) -> Result<Tensor> {
        let shape = shape.into();
        let n = numel_of(&shape)?;
        if n != self.numel() {
            return Err(CommError::shape(
                "Tensor::reshape",
                format!("{} elements", self.numel()),
                format!("shape {shape:?} with {n} elements"),
            ));
        }
        self.shape = shape;
        Ok(self)
    }

    /// Reshapes in place; errors if the element count differs.
    pub fn set_shape(&mut self, shape: impl Into<Vec<usize>>) -> Result<()> {
        let shape = shape.into();
        let n = numel_of(&shape)?;
        if n != self.numel() {
            return Err(CommError::shape(
                "Tensor::set_shape",
                format!("{} elements", self.numel()),
                format!("shape {shape:?} with {n} elements"),
            ));
        }
        self.shape = shape;
        Ok(())
    }

    /// Takes the host buffer out of a host tensor.
    pub fn into_host_buffer(self) -> Result<HostBuffer> {
        match self.storage {
            Storage::Host(b) => Ok(b),
            Storage::Device(_) => Err(CommError::invalid("into_host_buffer on a device tensor")),
        }
    }
}

impl AsBuf for Tensor {
    fn as_buf(&self) -> Result<BufRef<'_>> {
        BufRef::new(self.mem(), self.dtype)
    }
}

impl AsBufMut for Tensor {
    fn as_buf_mut(&mut self) -> Result<BufMut<'_>> {
        let dtype = self.dtype;
        BufMut::new(self.mem_mut(), dtype)
    }
}

impl PartialEq for Tensor {
    /// Bit-exact equality of metadata and contents (device tensors are copied to host).
    fn eq(&self, other: &Tensor) -> bool {
        if self.shape != other.shape || self.dtype != other.dtype {
            return false;
        }
        match (self.to_host(), other.to_host()) {
            (Ok(a), Ok(b)) => a.as_bytes().ok() == b.as_bytes().ok(),
            _ => false,
        }
    }
}
