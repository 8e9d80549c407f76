//! The buffers checks hand to a communicator: the same data as a
//! [`Tensor`], as a `Vec<T>`, as a borrowed sub-slice `&mut v[1..]`, or as a
//! tensor on a device, so every form of memory the front accepts goes
//! through every backend.

use std::borrow::Cow;

use comm_core::{
    bf16, f16, AsBuf, AsBufMut, BufMut, BufRef, CommError, DType, Device, Result, Tensor,
};

use crate::data;

/// How a check hands its memory to the communicator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// A host [`Tensor`] (64-byte aligned).
    Tensor,
    /// A `Vec<T>` of the dtype's element type.
    Vec,
    /// `&mut v[1..]` of a `Vec<T>` one element longer: memory that starts
    /// mid-allocation, as a caller's sub-slice does.
    Slice,
    /// A tensor on this device (placed with [`Tensor::to_device`]).
    Device(Device),
}

impl Holder {
    /// The host holders, in the order checks rotate through them.
    pub const HOST: [Holder; 3] = [Holder::Tensor, Holder::Vec, Holder::Slice];
}

/// A typed vector of any dtype.
#[derive(Debug)]
enum HostVec {
    F32(Vec<f32>),
    F64(Vec<f64>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    I8(Vec<i8>),
    U8(Vec<u8>),
    I32(Vec<i32>),
    I64(Vec<i64>),
}

/// Runs `$body` with `$v` bound to the vector inside a `HostVec`.
macro_rules! each_vec {
    ($hv:expr, $v:ident => $body:expr) => {
        match $hv {
            HostVec::F32($v) => $body,
            HostVec::F64($v) => $body,
            HostVec::F16($v) => $body,
            HostVec::BF16($v) => $body,
            HostVec::I8($v) => $body,
            HostVec::U8($v) => $body,
            HostVec::I32($v) => $body,
            HostVec::I64($v) => $body,
        }
    };
}

impl HostVec {
    /// `pad` default elements, then the elements of `bytes`.
    fn from_bytes(dtype: DType, bytes: &[u8], pad: usize) -> HostVec {
        fn make<T: bytemuck::Pod + Default>(bytes: &[u8], pad: usize) -> Vec<T> {
            let mut v = vec![T::default(); pad];
            v.extend(
                bytes
                    .chunks_exact(std::mem::size_of::<T>())
                    .map(bytemuck::pod_read_unaligned::<T>),
            );
            v
        }
        match dtype {
            DType::F32 => HostVec::F32(make(bytes, pad)),
            DType::F64 => HostVec::F64(make(bytes, pad)),
            DType::F16 => HostVec::F16(make(bytes, pad)),
            DType::BF16 => HostVec::BF16(make(bytes, pad)),
            DType::I8 => HostVec::I8(make(bytes, pad)),
            DType::U8 => HostVec::U8(make(bytes, pad)),
            DType::I32 => HostVec::I32(make(bytes, pad)),
            DType::I64 => HostVec::I64(make(bytes, pad)),
        }
    }
}

#[derive(Debug)]
enum Inner {
    Tensor(Tensor),
    Vec(HostVec),
    /// The first element is padding, never handed out.
    Slice(HostVec),
}

/// Test data in one of the [`Holder`] forms.
#[derive(Debug)]
pub struct TestBuf {
    inner: Inner,
}

impl TestBuf {
    /// `n` elements of `dtype`, `x[i] = f(i)`, held as `holder` says.
    pub fn new(holder: Holder, dtype: DType, n: usize, f: impl Fn(usize) -> f64) -> Result<Self> {
        let host = data::fill(dtype, n, f);
        let inner = match holder {
            Holder::Tensor => Inner::Tensor(Tensor::from_host_buffer(host, [n], dtype)?),
            Holder::Vec => Inner::Vec(HostVec::from_bytes(dtype, host.as_bytes(), 0)),
            Holder::Slice => Inner::Slice(HostVec::from_bytes(dtype, host.as_bytes(), 1)),
            Holder::Device(dev) => {
                Inner::Tensor(Tensor::from_host_buffer(host, [n], dtype)?.to_device(dev)?)
            }
        };
        Ok(TestBuf { inner })
    }

    /// The contents as host bytes (copied from the device when needed).
    pub fn host_bytes(&self) -> Result<Cow<'_, [u8]>> {
        match &self.inner {
            Inner::Tensor(t) if t.is_host() => Ok(Cow::Borrowed(t.as_bytes()?)),
            Inner::Tensor(t) => Ok(Cow::Owned(t.to_host()?.as_bytes()?.to_vec())),
            Inner::Vec(v) => Ok(Cow::Borrowed(each_vec!(v, v => bytemuck::cast_slice(v)))),
            Inner::Slice(v) => Ok(Cow::Borrowed(
                each_vec!(v, v => bytemuck::cast_slice(&v[1..])),
            )),
        }
    }

    /// Compares the contents with `expected(i)` (see [`data::compare`]);
    /// the error says what went wrong.
    pub fn check(
        &self,
        expected: impl Fn(usize) -> f64,
        tol: impl Fn(f64) -> f64,
    ) -> std::result::Result<(), String> {
        let dtype = self.as_buf().map_err(|e| e.to_string())?.dtype();
        let bytes = self
            .host_bytes()
            .map_err(|e| format!("reading the result back: {e}"))?;
        data::compare(&bytes, dtype, expected, tol).map_err(|m| format!("WRONG RESULT: {m}"))
    }
}

impl AsBuf for TestBuf {
    fn as_buf(&self) -> Result<BufRef<'_>> {
        match &self.inner {
            Inner::Tensor(t) => t.as_buf(),
            Inner::Vec(v) => each_vec!(v, v => v.as_buf()),
            Inner::Slice(v) => each_vec!(v, v => v[1..].as_buf()),
        }
    }
}

impl AsBufMut for TestBuf {
    fn as_buf_mut(&mut self) -> Result<BufMut<'_>> {
        match &mut self.inner {
            Inner::Tensor(t) => t.as_buf_mut(),
            Inner::Vec(v) => each_vec!(v, v => v.as_buf_mut()),
            Inner::Slice(v) => each_vec!(v, v => v[1..].as_buf_mut()),
        }
    }
}

/// An error of the communicator, described with the check it broke.
pub(crate) fn comm_error(rank: usize, what: &str, e: CommError) -> String {
    format!("rank {rank}: {what}: the backend returned an error: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_holder_holds_the_same_values() {
        for dtype in DType::ALL {
            for holder in Holder::HOST {
                let mut b = TestBuf::new(holder, dtype, 5, |i| i as f64 + 1.0).unwrap();
                assert_eq!(b.as_buf().unwrap().numel(), 5, "{holder:?} {dtype}");
                assert_eq!(b.as_buf_mut().unwrap().dtype(), dtype);
                b.check(|i| i as f64 + 1.0, |_| 0.0).unwrap();
                assert!(b.check(|i| i as f64, |_| 0.0).is_err());
            }
        }
        let b = TestBuf::new(Holder::Slice, DType::F32, 0, |_| 0.0).unwrap();
        assert_eq!(b.as_buf().unwrap().numel(), 0);
    }
}
