//! Matrix products through the `matrixmultiply` GEMM.

/// `x [rows, k] @ w [k, n]`, row-major.
pub fn matmul(x: &[f32], w: &[f32], rows: usize, k: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * n];
    matmul_into(x, w, rows, k, n, &mut out);
    out
}

/// `out [rows, n] = x [rows, k] @ w [k, n]`, row-major, into a caller's
/// buffer (steady-state layers allocate nothing).
pub fn matmul_into(x: &[f32], w: &[f32], rows: usize, k: usize, n: usize, out: &mut [f32]) {
    assert!(
        x.len() == rows * k && w.len() == k * n && out.len() == rows * n,
        "matmul: operand sizes"
    );
    gemm_strided(
        rows,
        k,
        n,
        1.0,
        (x, 0, k as isize, 1),
        (w, 0, n as isize, 1),
        0.0,
        (out, 0, n as isize, 1),
    );
}

/// `c = alpha * a @ b + beta * c` for strided views (offset, row and column
/// strides in elements), bounds checked against the slices.
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
        a.2 >= 0 && a.3 >= 0 && b.2 >= 0 && b.3 >= 0 && c.2 >= 0 && c.3 >= 0,
        "gemm: negative strides"
    );
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
    if m == 0 || n == 0 {
        return;
    }
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
