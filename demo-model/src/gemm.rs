//! Matrix products through the `matrixmultiply` GEMM.

/// `x [rows, k] @ w [k, n]`, row-major.
pub fn matmul(x: &[f32], w: &[f32], rows: usize, k: usize, n: usize) -> Vec<f32> {
    assert!(
        x.len() == rows * k && w.len() == k * n,
        "matmul: operand sizes"
    );
    let mut out = vec![0f32; rows * n];
    // SAFETY: `x` is `rows x k`, `w` is `k x n` and `out` is `rows x n`, all
    // row-major with the strides given (checked above), and `out` does not
    // alias the inputs.
    unsafe {
        matrixmultiply::sgemm(
            rows,
            k,
            n,
            1.0,
            x.as_ptr(),
            k as isize,
            1,
            w.as_ptr(),
            n as isize,
            1,
            0.0,
            out.as_mut_ptr(),
            n as isize,
            1,
        );
    }
    out
}

/// `c += alpha * a @ b` for strided views (row and column strides in
/// elements), bounds checked against the slices.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_strided(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: (&[f32], usize, isize, isize),
    b: (&[f32], usize, isize, isize),
    beta: f32,
    c: (&mut [f32], usize, isize, isize),
) {
    let extent = |rows: usize, cols: usize, rs: isize, cs: isize| {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * rs as usize + (cols - 1) * cs as usize + 1
        }
    };
    assert!(
        a.1 + extent(m, k, a.2, a.3) <= a.0.len(),
        "gemm: a out of bounds"
    );
    assert!(
        b.1 + extent(k, n, b.2, b.3) <= b.0.len(),
        "gemm: b out of bounds"
    );
    assert!(
        c.1 + extent(m, n, c.2, c.3) <= c.0.len(),
        "gemm: c out of bounds"
    );
    // SAFETY: the three views lie inside their slices (asserted above, with
    // non-negative strides), and `c` is a distinct mutable slice.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.0.as_ptr().add(a.1),
            a.2,
            a.3,
            b.0.as_ptr().add(b.1),
            b.2,
            b.3,
            beta,
            c.0.as_mut_ptr().add(c.1),
            c.2,
            c.3,
        );
    }
}
