//! Deterministic, integer-valued test data and exactly computed expectations.
//!
//! Every value is a function of `(salt, rank, index)` only, so each rank can
//! compute what every other rank contributed, and therefore the exact result
//! of any collective, without communicating.
//!
//! Value ranges are chosen so that every reduction is exact in every dtype
//! (f16 holds integers up to 2048 exactly, bf16 up to 256, i8 up to 127) for
//! groups of up to [`MAX_EXACT_WORLD`] ranks, and integer sums and products
//! never wrap:
//! - `Sum`/`Avg`: values in `-5..=5` (`0..=10` for u8): |sum| <= 5 * world;
//! - `Prod`: values in `{1, 2}` (and `-1` for signed types), with a 2 only on
//!   ranks `< 6`, so |prod| <= 64;
//! - `Min`/`Max`: values in `-100..=100` (`0..=200` for u8);
//! - data movement ([`Pattern::Unique`]): values spread over the largest range
//!   each dtype holds exactly, so misplaced elements are caught.

use comm_core::{DType, HostBuffer, ReduceOp, Tensor};

/// Largest group for which [`Pattern::Reduce`] results stay exact in every
/// dtype (the sum of 20 values of magnitude 5 fits i8 and bf16).
pub const MAX_EXACT_WORLD: usize = 20;

/// Which family of values to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Values whose reduction with the given op is exact (see the module docs).
    Reduce(ReduceOp),
    /// Values spread over the dtype's exact range, for pure data movement.
    Unique,
}

/// A prime just below 2^31: every product below stays inside u64.
const P: u64 = 2_147_483_629;

/// A cheap hash of `(salt, rank, index)` into `0..P`: an affine map followed
/// by two modular squarings, so neighbouring indices, ranks and salts give
/// unrelated values. Written with plain, never-overflowing arithmetic so it
/// stays fast in debug builds (the suite runs there).
#[inline]
fn hash(salt: u64, rank: usize, index: usize) -> u64 {
    let x = ((salt % P) * 48_271 + (rank as u64) * 1_000_003 + (index as u64) % P) % P;
    let x = (x * x + 12_345) % P;
    (x * x + (index as u64 >> 31)) % P
}

/// The half-open range `[lo, lo + span)` of integers that `dtype` holds exactly
/// and that [`Pattern::Unique`] draws from.
fn unique_range(dtype: DType) -> (i64, u64) {
    match dtype {
        DType::I8 => (-128, 256),
        DType::U8 => (0, 256),
        DType::F16 => (-2048, 4096),
        DType::BF16 => (-256, 512),
        DType::F32 => (-(1 << 24), 1 << 25),
        // The hash has 31 bits; centred, and exact in f64 for the comparison.
        DType::I32 | DType::F64 | DType::I64 => (-(1 << 30), 1 << 31),
    }
}

/// The value `rank` contributes at flat `index` (an integer, as f64).
#[inline]
pub fn value(dtype: DType, pattern: Pattern, salt: u64, rank: usize, index: usize) -> f64 {
    let h = hash(salt, rank, index);
    let signed = dtype != DType::U8;
    let v: i64 = match pattern {
        Pattern::Unique => {
            let (lo, span) = unique_range(dtype);
            lo + (h % span) as i64
        }
        Pattern::Reduce(ReduceOp::Sum | ReduceOp::Avg) => {
            let v = (h % 11) as i64;
            if signed {
                v - 5
            } else {
                v
            }
        }
        Pattern::Reduce(ReduceOp::Prod) => {
            if rank < 6 && h.is_multiple_of(3) {
                2
            } else if signed && (h >> 8).is_multiple_of(5) {
                -1
            } else {
                1
            }
        }
        Pattern::Reduce(ReduceOp::Min | ReduceOp::Max) => {
            let v = (h % 201) as i64;
            if signed {
                v - 100
            } else {
                v
            }
        }
    };
    v as f64
}

/// The exact reduction over ranks `0..world` of `value(.., Reduce(op), .., index)`.
///
/// For `Avg` this is the float mean for float dtypes (compare with
/// [`tolerance`]) and the sum divided by `world` truncated toward zero for
/// integers, as comm-core documents.
pub fn reduced(dtype: DType, op: ReduceOp, salt: u64, world: usize, index: usize) -> f64 {
    let p = Pattern::Reduce(op);
    // Plain loops: this runs once per element per rank, in debug builds.
    let mut acc = value(dtype, p, salt, 0, index);
    for r in 1..world {
        let v = value(dtype, p, salt, r, index);
        acc = match op {
            ReduceOp::Sum | ReduceOp::Avg => acc + v,
            ReduceOp::Prod => acc * v,
            ReduceOp::Min => acc.min(v),
            ReduceOp::Max => acc.max(v),
        };
    }
    match op {
        ReduceOp::Sum | ReduceOp::Prod | ReduceOp::Min | ReduceOp::Max => acc,
        ReduceOp::Avg => {
            let s = acc;
            if dtype.is_float() {
                s / world as f64
            } else {
                ((s as i64) / world as i64) as f64
            }
        }
    }
}

/// Allowed absolute error for a result of magnitude `expected`: zero except
/// for `Avg` on floats (the mean is not an integer).
pub fn tolerance(dtype: DType, op: ReduceOp, expected: f64) -> f64 {
    if op != ReduceOp::Avg || !dtype.is_float() {
        return 0.0;
    }
    let rel = match dtype {
        DType::F16 | DType::BF16 => 1e-2,
        DType::F32 => 1e-5,
        _ => 1e-12,
    };
    rel * expected.abs().max(1.0)
}

/// Runs `$body` with `$T` bound to the Rust element type of `$dt`.
#[macro_export]
macro_rules! with_dtype {
    ($dt:expr, $T:ident => $body:expr) => {
        match $dt {
            ::comm_core::DType::F32 => {
                type $T = f32;
                $body
            }
            ::comm_core::DType::F64 => {
                type $T = f64;
                $body
            }
            ::comm_core::DType::F16 => {
                type $T = ::comm_core::f16;
                $body
            }
            ::comm_core::DType::BF16 => {
                type $T = ::comm_core::bf16;
                $body
            }
            ::comm_core::DType::I8 => {
                type $T = i8;
                $body
            }
            ::comm_core::DType::U8 => {
                type $T = u8;
                $body
            }
            ::comm_core::DType::I32 => {
                type $T = i32;
                $body
            }
            ::comm_core::DType::I64 => {
                type $T = i64;
                $body
            }
        }
    };
}

/// Where element `i` of member `rank`'s Ulysses all_to_all_4D output
/// comes from, for `p` members whose inputs have the 4-D shape `input`:
/// `(source member, flat index in the source's input)`.
///
/// - `forward` (scatter 2, gather 1): `[B, S/P, H, D]` -> `[B, S, H/P, D]`;
///   member `r` gets every member's rows of heads `[r*H/P, (r+1)*H/P)`.
/// - otherwise (scatter 1, gather 2): `[B, S, H/P, D]` -> `[B, S/P, H, D]`,
///   the exact inverse.
///
/// ```
/// use comm_conformance::data::ulysses_source;
/// // 2 members, [1, 1, 2, 1] each: member 1 gets head 1 of both members.
/// assert_eq!(ulysses_source(true, [1, 1, 2, 1], 2, 1, 0), (0, 1));
/// assert_eq!(ulysses_source(true, [1, 1, 2, 1], 2, 1, 1), (1, 1));
/// ```
pub fn ulysses_source(
    forward: bool,
    input: [usize; 4],
    p: usize,
    rank: usize,
    i: usize,
) -> (usize, usize) {
    let [b_in, s_in, h_in, d] = input;
    let _ = b_in;
    let (di, rest) = (i % d, i / d);
    if forward {
        // Output [B, S, H/P, D] with S = P * s_in, H/P = h_in / P.
        let (hp, s) = (h_in / p, p * s_in);
        let (hi, rest) = (rest % hp, rest / hp);
        let (si, bi) = (rest % s, rest / s);
        let (src, sli) = (si / s_in, si % s_in);
        (src, ((bi * s_in + sli) * h_in + rank * hp + hi) * d + di)
    } else {
        // Output [B, S/P, H, D] with S/P = s_in / P, H = P * h_in.
        let (sp, h) = (s_in / p, p * h_in);
        let (hi, rest) = (rest % h, rest / h);
        let (sli, bi) = (rest % sp, rest / sp);
        let (src, hpi) = (hi / h_in, hi % h_in);
        (src, ((bi * s_in + rank * sp + sli) * h_in + hpi) * d + di)
    }
}

/// `n` elements of `dtype` with `x[i] = f(i)`, in a 64-byte-aligned host
/// buffer.
pub fn fill(dtype: DType, n: usize, f: impl Fn(usize) -> f64) -> HostBuffer {
    use comm_core::Element;
    let mut b = HostBuffer::zeroed(n * dtype.size());
    with_dtype!(dtype, T => {
        // A fresh HostBuffer is aligned for every dtype and holds exactly
        // `n` elements, so the cast cannot fail.
        if let Ok(s) = bytemuck::try_cast_slice_mut::<u8, T>(b.as_bytes_mut()) {
            for (i, x) in s.iter_mut().enumerate() {
                *x = <T as Element>::from_f64(f(i));
            }
        }
    });
    b
}

/// A 1-D host tensor of `n` elements with `t[i] = f(i)`.
pub fn filled(dtype: DType, n: usize, f: impl Fn(usize) -> f64) -> Tensor {
    let shape = [n];
    match Tensor::from_host_buffer(fill(dtype, n, f), shape, dtype) {
        Ok(t) => t,
        // `fill` makes exactly `n` elements; keep the panic-free contract anyway.
        Err(_) => Tensor::zeros(shape, dtype),
    }
}

/// The first element that differs from what was expected.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    /// Flat index.
    pub index: usize,
    /// Expected value.
    pub expected: f64,
    /// Value found.
    pub actual: f64,
    /// How many elements differ in total.
    pub wrong: usize,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "first bad index {}: expected {}, actual {} ({} wrong element(s))",
            self.index, self.expected, self.actual, self.wrong
        )
    }
}

/// Compares every element of the host bytes `bytes` (elements of `dtype`)
/// with `expected(i)`, allowing an absolute error of `tol(expected)`.
/// Returns the first mismatch (with the total count of wrong elements).
/// A trailing partial element counts as one wrong element.
pub fn compare(
    bytes: &[u8],
    dtype: DType,
    expected: impl Fn(usize) -> f64,
    tol: impl Fn(f64) -> f64,
) -> Result<(), Mismatch> {
    use comm_core::Element;
    let es = dtype.size();
    let mut first: Option<Mismatch> = None;
    let mut wrong = 0usize;
    let mut check = |i: usize, a: f64| {
        let e = expected(i);
        // `==` first so that infinities compare; NaN is always wrong.
        let ok = a == e || (a - e).abs() <= tol(e);
        if !ok {
            wrong += 1;
            if first.is_none() {
                first = Some(Mismatch {
                    index: i,
                    expected: e,
                    actual: a,
                    wrong: 0,
                });
            }
        }
    };
    with_dtype!(dtype, T => {
        let whole = bytes.len() / es * es;
        match bytemuck::try_cast_slice::<u8, T>(&bytes[..whole]) {
            Ok(s) => {
                for (i, x) in s.iter().enumerate() {
                    check(i, <T as Element>::to_f64(*x));
                }
            }
            // Unaligned memory (a borrowed byte buffer): read element by element.
            Err(_) => {
                for (i, c) in bytes[..whole].chunks_exact(es).enumerate() {
                    check(i, <T as Element>::to_f64(bytemuck::pod_read_unaligned::<T>(c)));
                }
            }
        }
        if whole != bytes.len() {
            check(whole / es, f64::NAN);
        }
    });
    match first {
        None => Ok(()),
        Some(mut m) => {
            m.wrong = wrong;
            Err(m)
        }
    }
}

/// Number of elements of `bytes` that differ from `expected` (see [`compare`]).
pub fn count_wrong(
    bytes: &[u8],
    dtype: DType,
    expected: impl Fn(usize) -> f64,
    tol: impl Fn(f64) -> f64,
) -> usize {
    match compare(bytes, dtype, expected, tol) {
        Ok(()) => 0,
        Err(m) => m.wrong,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reductions_are_exact_in_every_dtype() {
        for dtype in DType::ALL {
            for op in ReduceOp::ALL {
                for world in 1..=MAX_EXACT_WORLD {
                    for i in 0..200 {
                        let e = reduced(dtype, op, 7, world, i);
                        // Every expected value must be representable in the dtype.
                        let t = fill(dtype, 1, |_| e);
                        let back = with_dtype!(dtype, T => {
                            comm_core::Element::to_f64(bytemuck::cast_slice::<u8, T>(t.as_bytes())[0])
                        });
                        assert!(
                            (back - e).abs() <= tolerance(dtype, op, e),
                            "{dtype} {op} world {world}: {e} became {back}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn compare_finds_first_mismatch() {
        let t = fill(DType::I32, 5, |i| i as f64);
        let b = t.as_bytes();
        assert!(compare(b, DType::I32, |i| i as f64, |_| 0.0).is_ok());
        let m = compare(
            b,
            DType::I32,
            |i| if i >= 3 { 9.0 } else { i as f64 },
            |_| 0.0,
        )
        .unwrap_err();
        assert_eq!((m.index, m.expected, m.actual, m.wrong), (3, 9.0, 3.0, 2));
        // Unaligned and truncated memory is still read, and the stub counts.
        let mut shifted = vec![0u8; 1];
        shifted.extend_from_slice(b);
        assert!(compare(&shifted[1..], DType::I32, |i| i as f64, |_| 0.0).is_ok());
        let m = compare(&b[..7], DType::I32, |i| i as f64, |_| 0.0).unwrap_err();
        assert_eq!((m.index, m.wrong), (1, 1));
        let nan = fill(DType::F32, 1, |_| f64::NAN);
        assert_eq!(count_wrong(nan.as_bytes(), DType::F32, |_| 0.0, |_| 1.0), 1);
    }
}
