//! Host reduction kernels: `dst = dst op src`, element-wise.
//!
//! The loops are plain zips over slices so LLVM vectorises them; f16 and bf16
//! are widened to f32 in small stack blocks (with `half`'s SIMD conversions),
//! reduced there and narrowed back, so they accumulate in f32 per step.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::{CommError, DType, ReduceOp, Result};

/// Elements of f16/bf16 widened per block; fits comfortably in L1.
const HALF_BLOCK: usize = 256;

macro_rules! zip_apply {
    ($dst:expr, $src:expr, |$a:ident, $b:ident| $e:expr) => {
        for (d, s) in $dst.iter_mut().zip($src.iter()) {
            let $a = *d;
            let $b = *s;
            *d = $e;
        }
    };
}

#[inline]
fn reduce_f32(dst: &mut [f32], src: &[f32], op: ReduceOp) {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => zip_apply!(dst, src, |a, b| a + b),
        ReduceOp::Prod => zip_apply!(dst, src, |a, b| a * b),
        ReduceOp::Min => zip_apply!(dst, src, |a, b| a.min(b)),
        ReduceOp::Max => zip_apply!(dst, src, |a, b| a.max(b)),
    }
}

#[inline]
fn reduce_f64(dst: &mut [f64], src: &[f64], op: ReduceOp) {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => zip_apply!(dst, src, |a, b| a + b),
        ReduceOp::Prod => zip_apply!(dst, src, |a, b| a * b),
        ReduceOp::Min => zip_apply!(dst, src, |a, b| a.min(b)),
        ReduceOp::Max => zip_apply!(dst, src, |a, b| a.max(b)),
    }
}

macro_rules! reduce_int {
    ($name:ident, $t:ty) => {
        #[inline]
        fn $name(dst: &mut [$t], src: &[$t], op: ReduceOp) {
            match op {
                ReduceOp::Sum | ReduceOp::Avg => zip_apply!(dst, src, |a, b| a.wrapping_add(b)),
                ReduceOp::Prod => zip_apply!(dst, src, |a, b| a.wrapping_mul(b)),
                ReduceOp::Min => zip_apply!(dst, src, |a, b| a.min(b)),
                ReduceOp::Max => zip_apply!(dst, src, |a, b| a.max(b)),
            }
        }
    };
}
reduce_int!(reduce_i8, i8);
reduce_int!(reduce_u8, u8);
reduce_int!(reduce_i32, i32);
reduce_int!(reduce_i64, i64);

macro_rules! reduce_half {
    ($name:ident, $t:ty) => {
        fn $name(dst: &mut [$t], src: &[$t], op: ReduceOp) {
            let mut a = [0f32; HALF_BLOCK];
            let mut b = [0f32; HALF_BLOCK];
            for (d, s) in dst.chunks_mut(HALF_BLOCK).zip(src.chunks(HALF_BLOCK)) {
                let n = d.len();
                d.convert_to_f32_slice(&mut a[..n]);
                s.convert_to_f32_slice(&mut b[..n]);
                reduce_f32(&mut a[..n], &b[..n], op);
                d.convert_from_f32_slice(&a[..n]);
            }
        }
    };
}
reduce_half!(reduce_f16, f16);
reduce_half!(reduce_bf16, bf16);

fn check_lens(dst: &[u8], src: &[u8], dtype: DType) -> Result<()> {
    if dst.len() != src.len() || dst.len() % dtype.size() != 0 {
        return Err(CommError::shape(
            "reduce_into",
            format!("two buffers of equal length, a multiple of {} bytes", dtype.size()),
            format!("{} and {} bytes", dst.len(), src.len()),
        ));
    }
    Ok(())
}

fn cast<T: bytemuck::Pod>(b: &[u8]) -> Result<&[T]> {
    bytemuck::try_cast_slice(b).map_err(|e| CommError::invalid(format!("reduce buffer: {e}")))
}

fn cast_mut<T: bytemuck::Pod>(b: &mut [u8]) -> Result<&mut [T]> {
    bytemuck::try_cast_slice_mut(b).map_err(|e| CommError::invalid(format!("reduce buffer: {e}")))
}

/// `dst = dst op src` over raw bytes holding `dtype` elements.
///
/// `Avg` accumulates like `Sum`; call [`finish_avg`] once after the last
/// contribution. Both buffers must be aligned for `dtype` (host tensors and
/// the backends' workspaces always are) and of equal length.
///
/// ```
/// use comm_core::{reduce::reduce_into, DType, ReduceOp};
/// let mut a = [1i32, 5].map(i32::to_ne_bytes).concat();
/// let b = [4i32, 2].map(i32::to_ne_bytes).concat();
/// reduce_into(&mut a, &b, DType::I32, ReduceOp::Max).unwrap();
/// assert_eq!(a, [4i32, 5].map(i32::to_ne_bytes).concat());
/// ```
pub fn reduce_into(dst: &mut [u8], src: &[u8], dtype: DType, op: ReduceOp) -> Result<()> {
    check_lens(dst, src, dtype)?;
    match dtype {
        DType::F32 => reduce_f32(cast_mut(dst)?, cast(src)?, op),
        DType::F64 => reduce_f64(cast_mut(dst)?, cast(src)?, op),
        DType::F16 => reduce_f16(cast_mut(dst)?, cast(src)?, op),
        DType::BF16 => reduce_bf16(cast_mut(dst)?, cast(src)?, op),
        DType::I8 => reduce_i8(cast_mut(dst)?, cast(src)?, op),
        DType::U8 => reduce_u8(cast_mut(dst)?, cast(src)?, op),
        DType::I32 => reduce_i32(cast_mut(dst)?, cast(src)?, op),
        DType::I64 => reduce_i64(cast_mut(dst)?, cast(src)?, op),
    }
    Ok(())
}

/// `dst = a op b` without first copying `a` into `dst` (saves one pass in
/// one-shot reductions).
pub fn reduce_pair_into(dst: &mut [u8], a: &[u8], b: &[u8], dtype: DType, op: ReduceOp) -> Result<()> {
    check_lens(dst, a, dtype)?;
    check_lens(dst, b, dtype)?;
    // Block-wise copy + reduce keeps the working set in L1 while staying one
    // logical pass over memory.
    const BLOCK: usize = 16 * 1024;
    for ((d, a), b) in dst.chunks_mut(BLOCK).zip(a.chunks(BLOCK)).zip(b.chunks(BLOCK)) {
        d.copy_from_slice(a);
        reduce_into(d, b, dtype, op)?;
    }
    Ok(())
}

/// Divides every element by `count`, turning an `Avg` accumulation into a mean.
/// Integers truncate toward zero.
pub fn finish_avg(buf: &mut [u8], dtype: DType, count: usize) -> Result<()> {
    if count == 0 {
        return Err(CommError::invalid("finish_avg with count 0"));
    }
    if buf.len() % dtype.size() != 0 {
        return Err(CommError::invalid("finish_avg: buffer is not whole elements"));
    }
    let c = count;
    match dtype {
        DType::F32 => cast_mut::<f32>(buf)?.iter_mut().for_each(|x| *x /= c as f32),
        DType::F64 => cast_mut::<f64>(buf)?.iter_mut().for_each(|x| *x /= c as f64),
        DType::F16 => cast_mut::<f16>(buf)?
            .iter_mut()
            .for_each(|x| *x = f16::from_f32(x.to_f32() / c as f32)),
        DType::BF16 => cast_mut::<bf16>(buf)?
            .iter_mut()
            .for_each(|x| *x = bf16::from_f32(x.to_f32() / c as f32)),
        DType::I8 => cast_mut::<i8>(buf)?
            .iter_mut()
            .for_each(|x| *x = (*x as i64 / c as i64) as i8),
        DType::U8 => cast_mut::<u8>(buf)?
            .iter_mut()
            .for_each(|x| *x = (*x as u64 / c as u64) as u8),
        DType::I32 => cast_mut::<i32>(buf)?
            .iter_mut()
            .for_each(|x| *x = (*x as i64 / c as i64) as i32),
        DType::I64 => cast_mut::<i64>(buf)?
            .iter_mut()
            .for_each(|x| *x /= c as i64),
    }
    Ok(())
}
