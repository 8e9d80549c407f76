//! Host reduction kernels: `dst = dst op src`, element-wise.
//!
//! The loops are plain zips over slices so LLVM vectorises them; f16 and bf16
//! are widened to f32, reduced and narrowed back (round to nearest even) in
//! one fused, branch-free pass, so they accumulate in f32 per step.

use crate::{CommError, DType, ReduceOp, Result};

macro_rules! zip_apply {
    ($dst:expr, $src:expr, |$a:ident, $b:ident| $e:expr) => {
        for (d, s) in $dst.iter_mut().zip($src.iter()) {
            let $a = *d;
            let $b = *s;
            *d = $e;
        }
    };
}

#[inline(always)]
fn reduce_f32(dst: &mut [f32], src: &[f32], op: ReduceOp) {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => zip_apply!(dst, src, |a, b| a + b),
        ReduceOp::Prod => zip_apply!(dst, src, |a, b| a * b),
        ReduceOp::Min => zip_apply!(dst, src, |a, b| a.min(b)),
        ReduceOp::Max => zip_apply!(dst, src, |a, b| a.max(b)),
    }
}

#[inline(always)]
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
        #[inline(always)]
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

// f16 / bf16 <-> f32 conversions written branch-free (selects only), so the
// fused widen-reduce-narrow loops below vectorise with plain SSE2 / NEON.
// Rounding is to nearest, ties to even, bit-identical to `half`'s
// conversions for every non-NaN value; NaNs stay NaN (quieted, payload kept).

#[inline(always)]
fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

#[inline(always)]
fn f32_to_bf16(f: f32) -> u16 {
    let x = f.to_bits();
    let nan = (x >> 16) | 0x0040;
    let rounded = x.wrapping_add(0x7FFF + ((x >> 16) & 1)) >> 16;
    (if x & 0x7FFF_FFFF > 0x7F80_0000 {
        nan
    } else {
        rounded
    }) as u16
}

#[inline(always)]
fn f16_to_f32(h: u16) -> f32 {
    let h = h as u32;
    // Exponent and mantissa moved into f32 position, exponent re-biased.
    let o = ((h & 0x7FFF) << 13) + (112 << 23);
    let exp = h & 0x7C00;
    // Inf / NaN: exponent all ones (and the quiet bit for NaN).
    let inf_nan = (o + (112 << 23)) | (((h & 0x03FF) != 0) as u32) << 22;
    // Zero / subnormal: renormalise through one exact float subtraction.
    let sub = (f32::from_bits(o + (1 << 23)) - f32::from_bits(113 << 23)).to_bits();
    let bits = if exp == 0x7C00 {
        inf_nan
    } else if exp == 0 {
        sub
    } else {
        o
    };
    f32::from_bits(bits | ((h & 0x8000) << 16))
}

#[inline(always)]
fn f32_to_f16(f: f32) -> u16 {
    let x = f.to_bits();
    let sign = (x >> 16) & 0x8000;
    let a = x & 0x7FFF_FFFF;
    // NaN (quieted, top mantissa bits kept), or Inf for Inf and overflow.
    let special = if a > 0x7F80_0000 {
        0x7E00 | ((a >> 13) & 0x03FF)
    } else {
        0x7C00
    };
    // Results below the smallest normal: adding 0.5 makes the FPU round the
    // mantissa into the low bits (ties to even).
    const MAGIC: u32 = 126 << 23;
    let sub = (f32::from_bits(a) + f32::from_bits(MAGIC))
        .to_bits()
        .wrapping_sub(MAGIC);
    // Normal results: re-bias, round to nearest even, shift.
    let norm = a
        .wrapping_sub(112 << 23)
        .wrapping_add(0x0FFF + ((a >> 13) & 1))
        >> 13;
    let r = if a >= 0x4780_0000 {
        special
    } else if a < 0x3880_0000 {
        sub
    } else {
        norm
    };
    (r | sign) as u16
}

/// `dst = narrow(widen(dst) op widen(src))` in one fused pass.
macro_rules! half_apply {
    ($dst:expr, $src:expr, $wide:ident, $narrow:ident, |$a:ident, $b:ident| $e:expr) => {
        for (d, s) in $dst.iter_mut().zip($src.iter()) {
            let $a = $wide(*d);
            let $b = $wide(*s);
            *d = $narrow($e);
        }
    };
}

/// `f32::min` written as selects: inside the runtime-dispatched kernels LLVM
/// otherwise lowers `minnum` to a `fminf` call per element.
#[inline(always)]
fn min_sel(a: f32, b: f32) -> f32 {
    let m = if b < a { b } else { a };
    if a.is_nan() {
        b
    } else {
        m
    }
}

/// `f32::max` as selects; see [`min_sel`].
#[inline(always)]
fn max_sel(a: f32, b: f32) -> f32 {
    let m = if b > a { b } else { a };
    if a.is_nan() {
        b
    } else {
        m
    }
}

macro_rules! reduce_half {
    ($name:ident, $wide:ident, $narrow:ident) => {
        #[inline(always)]
        fn $name(dst: &mut [u16], src: &[u16], op: ReduceOp) {
            match op {
                ReduceOp::Sum | ReduceOp::Avg => {
                    half_apply!(dst, src, $wide, $narrow, |a, b| a + b)
                }
                ReduceOp::Prod => half_apply!(dst, src, $wide, $narrow, |a, b| a * b),
                ReduceOp::Min => half_apply!(dst, src, $wide, $narrow, |a, b| min_sel(a, b)),
                ReduceOp::Max => half_apply!(dst, src, $wide, $narrow, |a, b| max_sel(a, b)),
            }
        }
    };
}
reduce_half!(reduce_f16, f16_to_f32, f32_to_f16);
reduce_half!(reduce_bf16, bf16_to_f32, f32_to_bf16);

fn check_lens(dst: &[u8], src: &[u8], dtype: DType) -> Result<()> {
    if dst.len() != src.len() || !dst.len().is_multiple_of(dtype.size()) {
        return Err(CommError::shape(
            "reduce_into",
            format!(
                "two buffers of equal length, a multiple of {} bytes",
                dtype.size()
            ),
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
    if dst.is_empty() {
        // Empty slices may have a dangling pointer that is not aligned for
        // `dtype`; there is nothing to do anyway.
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    {
        if dtype == DType::F16
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            let (d, s) = (cast_mut(dst)?, cast(src)?);
            // SAFETY: `f16c::reduce` requires AVX2 and F16C, detected just above.
            unsafe { f16c::reduce(d, s, op) };
            return Ok(());
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: `reduce_avx2` only requires AVX2, detected on this CPU just above.
            return unsafe { reduce_avx2(dst, src, dtype, op) };
        }
    }
    reduce_typed(dst, src, dtype, op)
}

/// f16 with the F16C conversion instructions (8 lanes at a time); the
/// arithmetic itself stays plain Rust on `[f32; 8]`, so every op keeps exactly
/// the semantics of the portable kernel (`f32::min`/`max` included).
#[cfg(target_arch = "x86_64")]
mod f16c {
    use std::arch::x86_64::{
        _mm256_cvtph_ps, _mm256_cvtps_ph, _mm256_loadu_ps, _mm256_storeu_ps, _mm_loadu_si128,
        _mm_storeu_si128, _MM_FROUND_TO_NEAREST_INT,
    };

    use crate::ReduceOp;

    #[inline(always)]
    fn apply(dst: &mut [u16], src: &[u16], f: impl Fn(f32, f32) -> f32) {
        let mut d8 = dst.chunks_exact_mut(8);
        for (d, s) in (&mut d8).zip(src.chunks_exact(8)) {
            let (mut a, mut b) = ([0f32; 8], [0f32; 8]);
            // SAFETY: `d` and `s` hold exactly 8 u16 (16 bytes) and `a`, `b`
            // 8 f32 (32 bytes); all loads and stores are the unaligned forms.
            // The caller runs this only on CPUs with AVX2 and F16C.
            unsafe {
                _mm256_storeu_ps(
                    a.as_mut_ptr(),
                    _mm256_cvtph_ps(_mm_loadu_si128(d.as_ptr().cast())),
                );
                _mm256_storeu_ps(
                    b.as_mut_ptr(),
                    _mm256_cvtph_ps(_mm_loadu_si128(s.as_ptr().cast())),
                );
            }
            for (x, y) in a.iter_mut().zip(b) {
                *x = f(*x, y);
            }
            // SAFETY: as above.
            unsafe {
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(a.as_ptr()));
                _mm_storeu_si128(d.as_mut_ptr().cast(), h);
            }
        }
        let n = src.len() / 8 * 8;
        for (d, s) in d8.into_remainder().iter_mut().zip(&src[n..]) {
            *d = super::f32_to_f16(f(super::f16_to_f32(*d), super::f16_to_f32(*s)));
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and F16C.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn reduce(dst: &mut [u16], src: &[u16], op: ReduceOp) {
        match op {
            ReduceOp::Sum | ReduceOp::Avg => apply(dst, src, |a, b| a + b),
            ReduceOp::Prod => apply(dst, src, |a, b| a * b),
            ReduceOp::Min => apply(dst, src, super::min_sel),
            ReduceOp::Max => apply(dst, src, super::max_sel),
        }
    }
}

/// The same kernels compiled with AVX2 enabled and chosen at run time, so the
/// f16/bf16 conversions and the integer loops use 256-bit vectors without
/// requiring `-C target-cpu` at build time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn reduce_avx2(dst: &mut [u8], src: &[u8], dtype: DType, op: ReduceOp) -> Result<()> {
    reduce_typed(dst, src, dtype, op)
}

#[inline(always)]
fn reduce_typed(dst: &mut [u8], src: &[u8], dtype: DType, op: ReduceOp) -> Result<()> {
    match dtype {
        DType::F32 => reduce_f32(cast_mut(dst)?, cast(src)?, op),
        DType::F64 => reduce_f64(cast_mut(dst)?, cast(src)?, op),
        DType::F16 => reduce_f16(cast_mut(dst)?, cast(src)?, op),
        DType::BF16 => reduce_bf16(cast_mut(dst)?, cast(src)?, op),
        DType::I8 => reduce_i8(cast_mut(dst)?, cast(src)?, op),
        DType::U8 => reduce_u8(dst, src, op),
        DType::I32 => reduce_i32(cast_mut(dst)?, cast(src)?, op),
        DType::I64 => reduce_i64(cast_mut(dst)?, cast(src)?, op),
    }
    Ok(())
}

/// `dst = a op b` without first copying `a` into `dst` (saves one pass in
/// one-shot reductions).
pub fn reduce_pair_into(
    dst: &mut [u8],
    a: &[u8],
    b: &[u8],
    dtype: DType,
    op: ReduceOp,
) -> Result<()> {
    check_lens(dst, a, dtype)?;
    check_lens(dst, b, dtype)?;
    // Block-wise copy + reduce keeps the working set in L1 while staying one
    // logical pass over memory.
    const BLOCK: usize = 16 * 1024;
    for ((d, a), b) in dst
        .chunks_mut(BLOCK)
        .zip(a.chunks(BLOCK))
        .zip(b.chunks(BLOCK))
    {
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
    if !buf.len().is_multiple_of(dtype.size()) {
        return Err(CommError::invalid(
            "finish_avg: buffer is not whole elements",
        ));
    }
    if buf.is_empty() {
        return Ok(());
    }
    let c = count;
    match dtype {
        DType::F32 => cast_mut::<f32>(buf)?
            .iter_mut()
            .for_each(|x| *x /= c as f32),
        DType::F64 => cast_mut::<f64>(buf)?
            .iter_mut()
            .for_each(|x| *x /= c as f64),
        DType::F16 => cast_mut::<u16>(buf)?
            .iter_mut()
            .for_each(|x| *x = f32_to_f16(f16_to_f32(*x) / c as f32)),
        DType::BF16 => cast_mut::<u16>(buf)?
            .iter_mut()
            .for_each(|x| *x = f32_to_bf16(bf16_to_f32(*x) / c as f32)),
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
