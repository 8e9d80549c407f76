//! Element types, reduce operations and devices.

use half::{bf16, f16};
use serde::{Deserialize, Serialize};
use std::fmt;

use crate::{CommError, Result};

/// The element types every backend supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    /// 32-bit IEEE float.
    F32,
    /// 64-bit IEEE float.
    F64,
    /// 16-bit IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// Signed 8-bit integer.
    I8,
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 32-bit integer.
    I32,
    /// Signed 64-bit integer.
    I64,
}

impl DType {
    /// Every dtype, in a fixed order (handy for exhaustive tests).
    pub const ALL: [DType; 8] = [
        DType::F32,
        DType::F64,
        DType::F16,
        DType::BF16,
        DType::I8,
        DType::U8,
        DType::I32,
        DType::I64,
    ];

    /// Size of one element in bytes.
    pub const fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I8 | DType::U8 => 1,
        }
    }

    /// Short lower-case name (`f32`, `bf16`, ...), as printed by tools.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I8 => "i8",
            DType::U8 => "u8",
            DType::I32 => "i32",
            DType::I64 => "i64",
        }
    }

    /// True for floating-point dtypes.
    pub const fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
    }

    /// Stable one-byte code used on the wire.
    pub const fn code(self) -> u8 {
        match self {
            DType::F32 => 0,
            DType::F64 => 1,
            DType::F16 => 2,
            DType::BF16 => 3,
            DType::I8 => 4,
            DType::U8 => 5,
            DType::I32 => 6,
            DType::I64 => 7,
        }
    }

    /// Inverse of [`DType::code`].
    pub fn from_code(code: u8) -> Result<DType> {
        DType::ALL
            .into_iter()
            .find(|d| d.code() == code)
            .ok_or_else(|| CommError::Protocol(format!("unknown dtype code {code}")))
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = CommError;
    fn from_str(s: &str) -> Result<Self> {
        DType::ALL
            .into_iter()
            .find(|d| d.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                CommError::invalid(format!(
                    "unknown dtype `{s}`; expected one of f32, f64, f16, bf16, i8, u8, i32, i64"
                ))
            })
    }
}

/// Maps a Rust element type to its [`DType`].
///
/// ```
/// use comm_core::{Element, DType};
/// assert_eq!(<half::bf16 as Element>::DTYPE, DType::BF16);
/// ```
pub trait Element:
    bytemuck::Pod + Copy + Send + Sync + PartialEq + fmt::Debug + Default + 'static
{
    /// The matching dtype.
    const DTYPE: DType;
    /// Converts from f64 (rounding as `as` does); used to build test data.
    fn from_f64(v: f64) -> Self;
    /// Converts to f64.
    fn to_f64(self) -> f64;
}

macro_rules! impl_element_prim {
    ($t:ty, $d:expr) => {
        impl Element for $t {
            const DTYPE: DType = $d;
            #[inline]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline]
            fn to_f64(self) -> f64 {
                self as f64
            }
        }
    };
}
impl_element_prim!(f32, DType::F32);
impl_element_prim!(f64, DType::F64);
impl_element_prim!(i8, DType::I8);
impl_element_prim!(u8, DType::U8);
impl_element_prim!(i32, DType::I32);
impl_element_prim!(i64, DType::I64);

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    fn from_f64(v: f64) -> Self {
        f16::from_f64(v)
    }
    fn to_f64(self) -> f64 {
        f16::to_f64(self)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    fn from_f64(v: f64) -> Self {
        bf16::from_f64(v)
    }
    fn to_f64(self) -> f64 {
        bf16::to_f64(self)
    }
}

/// Reduction operators.
///
/// `Avg` is the sum divided by the number of contributors. For floats it is the
/// usual mean (f16/bf16 computed in f32). For integers it is the integer sum
/// divided by the world size with truncation toward zero (Rust's `/`), the same
/// as NCCL's `ncclAvg` on integer types; the intermediate sum wraps on overflow
/// like every integer `Sum`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReduceOp {
    /// Element-wise sum (integers wrap).
    Sum,
    /// Element-wise product (integers wrap).
    Prod,
    /// Element-wise minimum. Floats follow IEEE `minNum` (like C's `fmin`):
    /// a NaN operand yields the other operand; only NaN vs NaN gives NaN.
    Min,
    /// Element-wise maximum; NaN as for [`ReduceOp::Min`] (`maxNum`, like `fmax`).
    Max,
    /// Mean over contributors; see the type docs for integers.
    Avg,
}

impl ReduceOp {
    /// Every op.
    pub const ALL: [ReduceOp; 5] = [
        ReduceOp::Sum,
        ReduceOp::Prod,
        ReduceOp::Min,
        ReduceOp::Max,
        ReduceOp::Avg,
    ];

    /// Lower-case name.
    pub const fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Prod => "prod",
            ReduceOp::Min => "min",
            ReduceOp::Max => "max",
            ReduceOp::Avg => "avg",
        }
    }

    /// Stable wire code.
    pub const fn code(self) -> u8 {
        match self {
            ReduceOp::Sum => 0,
            ReduceOp::Prod => 1,
            ReduceOp::Min => 2,
            ReduceOp::Max => 3,
            ReduceOp::Avg => 4,
        }
    }

    /// The op of a wire code from [`ReduceOp::code`].
    pub fn from_code(code: u8) -> Result<ReduceOp> {
        ReduceOp::ALL
            .into_iter()
            .find(|o| o.code() == code)
            .ok_or_else(|| CommError::Protocol(format!("unknown reduce-op code {code}")))
    }
}

impl fmt::Display for ReduceOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ReduceOp {
    type Err = CommError;
    fn from_str(s: &str) -> Result<Self> {
        ReduceOp::ALL
            .into_iter()
            .find(|d| d.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                CommError::invalid(format!(
                    "unknown reduce op `{s}`; expected sum, prod, min, max or avg"
                ))
            })
    }
}

/// Where a tensor's storage lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Device {
    /// Host memory.
    #[default]
    Cpu,
    /// A CUDA device with its ordinal.
    Cuda(usize),
}

impl Device {
    /// True for [`Device::Cuda`].
    pub const fn is_cuda(self) -> bool {
        matches!(self, Device::Cuda(_))
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = CommError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| {
                    CommError::invalid(format!(
                        "unknown device `{s}`; expected cpu, cuda or cuda:N"
                    ))
                }),
        }
    }
}
