//! Reduce kernels against a naive scalar reference, for every dtype x op.

use comm_core::reduce::{finish_avg, reduce_into, reduce_pair_into};
use comm_core::{bf16, f16, CommError, DType, Element, ReduceOp};
use proptest::prelude::*;

/// Small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-r, r).
    fn float(&mut self, r: f64) -> f64 {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * r
    }
}

/// The scalar reference for one element type.
trait Ref: Element {
    /// A random value: full range for integers, moderate finite values for floats.
    fn random(rng: &mut Rng) -> Self;
    /// `a op b` for one element (`Avg` accumulates like `Sum`).
    fn apply(a: Self, b: Self, op: ReduceOp) -> Self;
    /// `x / count` as `finish_avg` defines it.
    fn avg(x: Self, count: usize) -> Self;
    /// Equality that treats NaN == NaN and ignores the sign of zero.
    fn same(a: Self, b: Self) -> bool;
    /// True for NaN.
    fn nan(self) -> bool {
        false
    }
}

macro_rules! ref_int {
    ($t:ty) => {
        impl Ref for $t {
            fn random(rng: &mut Rng) -> Self {
                rng.next() as $t
            }
            fn apply(a: Self, b: Self, op: ReduceOp) -> Self {
                match op {
                    ReduceOp::Sum | ReduceOp::Avg => a.wrapping_add(b),
                    ReduceOp::Prod => a.wrapping_mul(b),
                    ReduceOp::Min => std::cmp::min(a, b),
                    ReduceOp::Max => std::cmp::max(a, b),
                }
            }
            fn avg(x: Self, count: usize) -> Self {
                // Truncation toward zero, computed in i128 so the reference
                // itself cannot overflow.
                (x as i128 / count as i128) as $t
            }
            fn same(a: Self, b: Self) -> bool {
                a == b
            }
        }
    };
}
ref_int!(i8);
ref_int!(u8);
ref_int!(i32);
ref_int!(i64);

fn fop<F: Copy + PartialOrd + std::ops::Add<Output = F> + std::ops::Mul<Output = F>>(
    a: F,
    b: F,
    op: ReduceOp,
    min: fn(F, F) -> F,
    max: fn(F, F) -> F,
) -> F {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => a + b,
        ReduceOp::Prod => a * b,
        ReduceOp::Min => min(a, b),
        ReduceOp::Max => max(a, b),
    }
}

impl Ref for f32 {
    fn random(rng: &mut Rng) -> Self {
        rng.float(100.0) as f32
    }
    fn apply(a: Self, b: Self, op: ReduceOp) -> Self {
        fop(a, b, op, f32::min, f32::max)
    }
    fn avg(x: Self, count: usize) -> Self {
        x / count as f32
    }
    fn same(a: Self, b: Self) -> bool {
        a == b || (a.is_nan() && b.is_nan())
    }
    fn nan(self) -> bool {
        self.is_nan()
    }
}

impl Ref for f64 {
    fn random(rng: &mut Rng) -> Self {
        rng.float(1e6)
    }
    fn apply(a: Self, b: Self, op: ReduceOp) -> Self {
        fop(a, b, op, f64::min, f64::max)
    }
    fn avg(x: Self, count: usize) -> Self {
        x / count as f64
    }
    fn same(a: Self, b: Self) -> bool {
        a == b || (a.is_nan() && b.is_nan())
    }
    fn nan(self) -> bool {
        self.is_nan()
    }
}

macro_rules! ref_half {
    ($t:ty) => {
        impl Ref for $t {
            fn random(rng: &mut Rng) -> Self {
                <$t>::from_f64(rng.float(50.0))
            }
            /// Computed in f32 and rounded once.
            fn apply(a: Self, b: Self, op: ReduceOp) -> Self {
                <$t>::from_f32(f32::apply(a.to_f32(), b.to_f32(), op))
            }
            fn avg(x: Self, count: usize) -> Self {
                <$t>::from_f32(x.to_f32() / count as f32)
            }
            fn same(a: Self, b: Self) -> bool {
                a == b || (a.is_nan() && b.is_nan())
            }
            fn nan(self) -> bool {
                self.is_nan()
            }
        }
    };
}
ref_half!(f16);
ref_half!(bf16);

fn random_vec<T: Ref>(n: usize, seed: u64) -> Vec<T> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| T::random(&mut rng)).collect()
}

fn assert_all_same<T: Ref>(got: &[T], want: &[T], ctx: &str) {
    assert_eq!(got.len(), want.len(), "{ctx}");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(T::same(g, w), "{ctx}: element {i}: got {g:?}, want {w:?}");
    }
}

/// Lengths around the kernels' block sizes (16/32 elements, 256 for halves,
/// 16 KiB in `reduce_pair_into`), odd ones and 0.
const LENGTHS: [usize; 16] = [
    0, 1, 2, 3, 7, 15, 16, 17, 31, 33, 63, 255, 256, 257, 1000, 4099,
];

fn check_reduce_into<T: Ref>(op: ReduceOp, n: usize, seed: u64) {
    let a = random_vec::<T>(n, seed);
    let b = random_vec::<T>(n, seed ^ 0xABCD);
    let want: Vec<T> = a
        .iter()
        .zip(&b)
        .map(|(&x, &y)| T::apply(x, y, op))
        .collect();
    let mut dst = a.clone();
    reduce_into(
        bytemuck::cast_slice_mut(&mut dst),
        bytemuck::cast_slice(&b),
        T::DTYPE,
        op,
    )
    .unwrap();
    assert_all_same(&dst, &want, &format!("reduce_into {} {op} n={n}", T::DTYPE));
}

fn check_pair<T: Ref>(op: ReduceOp, n: usize, seed: u64) {
    let a = random_vec::<T>(n, seed);
    let b = random_vec::<T>(n, seed ^ 0x1234);
    let (a0, b0) = (a.clone(), b.clone());
    let want: Vec<T> = a
        .iter()
        .zip(&b)
        .map(|(&x, &y)| T::apply(x, y, op))
        .collect();
    // Start from garbage: the result must not depend on dst's old contents.
    let mut dst = random_vec::<T>(n, seed ^ 0x5555);
    reduce_pair_into(
        bytemuck::cast_slice_mut(&mut dst),
        bytemuck::cast_slice(&a),
        bytemuck::cast_slice(&b),
        T::DTYPE,
        op,
    )
    .unwrap();
    assert_all_same(
        &dst,
        &want,
        &format!("reduce_pair_into {} {op} n={n}", T::DTYPE),
    );
    assert_eq!(a, a0);
    assert_eq!(b, b0);
}

fn check_avg<T: Ref>(n: usize, seed: u64) {
    for count in [1usize, 2, 3, 7, 200] {
        let x = random_vec::<T>(n, seed + count as u64);
        let want: Vec<T> = x.iter().map(|&v| T::avg(v, count)).collect();
        let mut buf = x.clone();
        finish_avg(bytemuck::cast_slice_mut(&mut buf), T::DTYPE, count).unwrap();
        assert_all_same(
            &buf,
            &want,
            &format!("finish_avg {} count={count} n={n}", T::DTYPE),
        );
    }
}

/// `Avg` over several contributions: accumulate with `reduce_into`, then divide.
fn check_avg_pipeline<T: Ref>(n: usize, seed: u64) {
    let parts: Vec<Vec<T>> = (0..4).map(|k| random_vec::<T>(n, seed + k)).collect();
    let mut want = parts[0].clone();
    for p in &parts[1..] {
        for (w, &v) in want.iter_mut().zip(p) {
            *w = T::apply(*w, v, ReduceOp::Avg);
        }
    }
    let want: Vec<T> = want.into_iter().map(|v| T::avg(v, parts.len())).collect();
    let mut acc = parts[0].clone();
    for p in &parts[1..] {
        reduce_into(
            bytemuck::cast_slice_mut(&mut acc),
            bytemuck::cast_slice(p),
            T::DTYPE,
            ReduceOp::Avg,
        )
        .unwrap();
    }
    finish_avg(bytemuck::cast_slice_mut(&mut acc), T::DTYPE, parts.len()).unwrap();
    assert_all_same(&acc, &want, &format!("avg pipeline {} n={n}", T::DTYPE));
}

fn check_dtype<T: Ref>() {
    for op in ReduceOp::ALL {
        for (i, &n) in LENGTHS.iter().enumerate() {
            check_reduce_into::<T>(op, n, i as u64 + 1);
            check_pair::<T>(op, n, i as u64 + 100);
        }
        // Crosses reduce_pair_into's 16 KiB block for every element size.
        check_pair::<T>(op, 16 * 1024 + 3, 77);
    }
    for &n in &LENGTHS {
        check_avg::<T>(n, n as u64);
        check_avg_pipeline::<T>(n, n as u64 + 9);
    }
}

#[test]
fn f32_every_op() {
    check_dtype::<f32>();
}
#[test]
fn f64_every_op() {
    check_dtype::<f64>();
}
#[test]
fn f16_every_op() {
    check_dtype::<f16>();
}
#[test]
fn bf16_every_op() {
    check_dtype::<bf16>();
}
#[test]
fn i8_every_op() {
    check_dtype::<i8>();
}
#[test]
fn u8_every_op() {
    check_dtype::<u8>();
}
#[test]
fn i32_every_op() {
    check_dtype::<i32>();
}
#[test]
fn i64_every_op() {
    check_dtype::<i64>();
}

/// Every dtype is covered by the tests above; make sure no dtype was forgotten.
#[test]
fn all_dtypes_covered() {
    let covered = [
        f32::DTYPE,
        f64::DTYPE,
        f16::DTYPE,
        bf16::DTYPE,
        i8::DTYPE,
        u8::DTYPE,
        i32::DTYPE,
        i64::DTYPE,
    ];
    for d in DType::ALL {
        assert!(covered.contains(&d), "{d} has no reduce test");
    }
}

#[test]
fn integer_edge_values() {
    // Wrapping and truncation toward zero at the extremes.
    let mut a = vec![i32::MAX, i32::MIN, -7, 7, -1];
    let b = vec![1, -1, 0, 0, 0];
    reduce_into(
        bytemuck::cast_slice_mut(&mut a),
        bytemuck::cast_slice(&b),
        DType::I32,
        ReduceOp::Sum,
    )
    .unwrap();
    assert_eq!(a, [i32::MIN, i32::MAX, -7, 7, -1]);
    finish_avg(bytemuck::cast_slice_mut(&mut a), DType::I32, 2).unwrap();
    assert_eq!(a, [-1_073_741_824, 1_073_741_823, -3, 3, 0]);

    let mut u = vec![250u8, 3];
    reduce_into(&mut u, &[10, 255], DType::U8, ReduceOp::Sum).unwrap();
    assert_eq!(u, [4, 2]);
    let mut u = vec![16u8, 255];
    reduce_into(&mut u, &[16, 2], DType::U8, ReduceOp::Prod).unwrap();
    assert_eq!(u, [0, 254]);

    let mut l = vec![i64::MIN, -9];
    finish_avg(bytemuck::cast_slice_mut(&mut l), DType::I64, 4).unwrap();
    assert_eq!(l, [i64::MIN / 4, -2]);
}

#[test]
fn half_accumulates_in_f32_per_step() {
    // 2048 + 1 is not representable in f16 (spacing 2 there): one step rounds
    // to 2048 (ties to even), exactly as f32-then-round does.
    let mut a = vec![f16::from_f32(2048.0), f16::from_f32(0.1)];
    let b = vec![f16::from_f32(1.0), f16::from_f32(0.2)];
    reduce_into(
        bytemuck::cast_slice_mut(&mut a),
        bytemuck::cast_slice(&b),
        DType::F16,
        ReduceOp::Sum,
    )
    .unwrap();
    assert_eq!(a[0], f16::from_f32(2048.0));
    assert_eq!(
        a[1],
        f16::from_f32(f16::from_f32(0.1).to_f32() + f16::from_f32(0.2).to_f32())
    );
    // bf16 max keeps the value exactly.
    let mut x = vec![bf16::from_f32(-3.5), bf16::from_f32(1e30)];
    let y = vec![bf16::from_f32(-4.0), bf16::from_f32(-1e30)];
    reduce_into(
        bytemuck::cast_slice_mut(&mut x),
        bytemuck::cast_slice(&y),
        DType::BF16,
        ReduceOp::Max,
    )
    .unwrap();
    assert_eq!(x, [bf16::from_f32(-3.5), bf16::from_f32(1e30)]);
}

#[test]
fn float_nan_and_inf() {
    // Sum and Prod propagate NaN; Min and Max follow IEEE minNum / maxNum (as
    // C's fmin / fmax): a NaN operand yields the other operand.
    let nan = f32::NAN;
    for (op, want) in [
        (ReduceOp::Sum, [nan, nan, f32::INFINITY]),
        (ReduceOp::Prod, [nan, nan, f32::INFINITY]),
        (ReduceOp::Min, [1.0, 2.0, 1.0]),
        (ReduceOp::Max, [1.0, 2.0, f32::INFINITY]),
    ] {
        let mut a = vec![nan, 2.0, f32::INFINITY];
        let b = vec![1.0, nan, 1.0];
        reduce_into(
            bytemuck::cast_slice_mut(&mut a),
            bytemuck::cast_slice(&b),
            DType::F32,
            op,
        )
        .unwrap();
        assert_all_same(&a, &want, &format!("{op}"));
    }
}

// ---------------------------------------------------------------- errors

#[test]
fn length_mismatch_errors() {
    for dt in DType::ALL {
        let es = dt.size();
        let mut dst = vec![0u64; 4];
        let src = vec![0u64; 4];
        let d: &mut [u8] = bytemuck::cast_slice_mut(&mut dst);
        let s: &[u8] = bytemuck::cast_slice(&src);
        for op in ReduceOp::ALL {
            let e = reduce_into(&mut d[..16], &s[..16 + es], dt, op).unwrap_err();
            assert!(matches!(e, CommError::ShapeMismatch { .. }), "{e}");
            let e = reduce_into(&mut d[..16 + es], &s[..16], dt, op).unwrap_err();
            assert!(matches!(e, CommError::ShapeMismatch { .. }), "{e}");
            let e = reduce_pair_into(&mut d[..16], &s[..16], &s[..16 + es], dt, op).unwrap_err();
            assert!(matches!(e, CommError::ShapeMismatch { .. }), "{e}");
            let e = reduce_pair_into(&mut d[..16], &s[..8], &s[..16], dt, op).unwrap_err();
            assert!(matches!(e, CommError::ShapeMismatch { .. }), "{e}");
            if es > 1 {
                // Not a whole number of elements.
                assert!(reduce_into(&mut d[..es + 1], &s[..es + 1], dt, op).is_err());
                assert!(finish_avg(&mut d[..es + 1], dt, 2).is_err());
            }
        }
        assert!(matches!(
            finish_avg(&mut d[..16], dt, 0),
            Err(CommError::InvalidArgument(_))
        ));
        // Empty buffers are fine.
        reduce_into(&mut [], &[], dt, ReduceOp::Sum).unwrap();
        reduce_pair_into(&mut [], &[], &[], dt, ReduceOp::Sum).unwrap();
        finish_avg(&mut [], dt, 3).unwrap();
    }
}

#[test]
fn misaligned_buffers_error_instead_of_panicking() {
    let mut dst = vec![0u64; 5];
    let src = vec![0u64; 5];
    let d: &mut [u8] = bytemuck::cast_slice_mut(&mut dst);
    let s: &[u8] = bytemuck::cast_slice(&src);
    for dt in DType::ALL.into_iter().filter(|d| d.size() > 1) {
        let n = 4 * dt.size();
        assert!(reduce_into(&mut d[1..1 + n], &s[..n], dt, ReduceOp::Sum).is_err());
        assert!(reduce_into(&mut d[..n], &s[1..1 + n], dt, ReduceOp::Sum).is_err());
        assert!(finish_avg(&mut d[1..1 + n], dt, 2).is_err());
    }
}

// ---------------------------------------------------------------- random lengths

fn check_any(dt: DType, op: ReduceOp, n: usize, seed: u64) {
    match dt {
        DType::F32 => check_reduce_into::<f32>(op, n, seed),
        DType::F64 => check_reduce_into::<f64>(op, n, seed),
        DType::F16 => check_reduce_into::<f16>(op, n, seed),
        DType::BF16 => check_reduce_into::<bf16>(op, n, seed),
        DType::I8 => check_reduce_into::<i8>(op, n, seed),
        DType::U8 => check_reduce_into::<u8>(op, n, seed),
        DType::I32 => check_reduce_into::<i32>(op, n, seed),
        DType::I64 => check_reduce_into::<i64>(op, n, seed),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_lengths_match_reference(
        dt in prop::sample::select(DType::ALL.to_vec()),
        op in prop::sample::select(ReduceOp::ALL.to_vec()),
        n in 0usize..2000,
        seed in any::<u64>(),
    ) {
        check_any(dt, op, n, seed);
    }
}

// ---------------------------------------------------------------- half conversions

/// Every f16 / bf16 bit pattern as `dst`, against a spread of partners, for
/// every op: the kernels' own widen / narrow code must agree with `half`
/// (round to nearest even, subnormals, overflow to Inf, NaN stays NaN).
fn exhaustive_half<T: Ref>(from_bits: fn(u16) -> T) {
    let all: Vec<T> = (0..=u16::MAX).map(from_bits).collect();
    let mut rng = Rng::new(99);
    for round in 0..4 {
        let partners: Vec<T> = (0..all.len())
            .map(|i| match round {
                // Exact widen/narrow round trip: x op x for min / max.
                0 => all[i],
                // Small values (subnormal results), then random patterns.
                1 => from_bits((rng.next() as u16) & 0x83FF),
                _ => from_bits(rng.next() as u16),
            })
            .collect();
        for op in ReduceOp::ALL {
            let want: Vec<T> = all
                .iter()
                .zip(&partners)
                .map(|(&a, &b)| T::apply(a, b, op))
                .collect();
            let mut dst = all.clone();
            reduce_into(
                bytemuck::cast_slice_mut(&mut dst),
                bytemuck::cast_slice(&partners),
                T::DTYPE,
                op,
            )
            .unwrap();
            for (i, (&g, &w)) in dst.iter().zip(&want).enumerate() {
                // Bit-exact, except that NaN only needs to stay NaN.
                let g_bits: u16 = bytemuck::cast(g);
                let w_bits: u16 = bytemuck::cast(w);
                assert!(
                    g_bits == w_bits || T::same(g, w),
                    "{} {op} round {round}: {:#06x} op {:?}: got {g_bits:#06x}, want {w_bits:#06x}",
                    T::DTYPE,
                    i,
                    partners[i]
                );
                if !w.nan() {
                    assert_eq!(g_bits, w_bits, "{} {op}: element {i}", T::DTYPE);
                }
            }
        }
        // finish_avg's conversions too.
        for count in [3usize, 1000] {
            let want: Vec<T> = all.iter().map(|&v| T::avg(v, count)).collect();
            let mut buf = all.clone();
            finish_avg(bytemuck::cast_slice_mut(&mut buf), T::DTYPE, count).unwrap();
            assert_all_same(&buf, &want, &format!("finish_avg {} /{count}", T::DTYPE));
        }
    }
}

#[test]
fn f16_every_bit_pattern() {
    exhaustive_half::<f16>(f16::from_bits);
}

#[test]
fn bf16_every_bit_pattern() {
    exhaustive_half::<bf16>(bf16::from_bits);
}
