//! Small arithmetic and tensor helpers shared by the parallel layers
//! (Megatron's `divide` / `ensure_divisibility`, FastVideo's sequence
//! padding for sequence parallelism).

use comm_core::{layout, CommError, Result, Tensor};

/// `numerator / denominator`, which must divide exactly.
///
/// ```
/// assert_eq!(dist_utils::divide(12, 4).unwrap(), 3);
/// assert!(dist_utils::divide(10, 4).is_err());
/// ```
pub fn divide(numerator: usize, denominator: usize) -> Result<usize> {
    ensure_divisibility(numerator, denominator)?;
    Ok(numerator / denominator)
}

/// `Ok` when `denominator` divides `numerator` (and is not zero).
pub fn ensure_divisibility(numerator: usize, denominator: usize) -> Result<()> {
    if denominator == 0 {
        return Err(CommError::invalid(format!(
            "cannot divide {numerator} by zero"
        )));
    }
    if !numerator.is_multiple_of(denominator) {
        return Err(CommError::invalid(format!(
            "{numerator} is not divisible by {denominator} (remainder {})",
            numerator % denominator
        )));
    }
    Ok(())
}

/// Splits `t` into `parts` equal, contiguous tensors along its last
/// dimension, which `parts` must divide.
///
/// ```
/// use comm_core::Tensor;
/// let t = Tensor::from_vec((0..6i32).collect(), [2, 3]).unwrap();
/// let p = dist_utils::split_tensor_along_last_dim(&t, 3).unwrap();
/// assert_eq!(p[1].to_vec::<i32>().unwrap(), [1, 4]);
/// ```
pub fn split_tensor_along_last_dim(t: &Tensor, parts: usize) -> Result<Vec<Tensor>> {
    let last = *t.shape().last().ok_or_else(|| {
        CommError::invalid("split_tensor_along_last_dim needs a tensor with at least one dimension")
    })?;
    let each = divide(last, parts).map_err(|e| {
        CommError::invalid(format!(
            "split_tensor_along_last_dim: last dimension of shape {:?} into {parts} parts: {e}",
            t.shape()
        ))
    })?;
    layout::split(t, &vec![each; parts], -1)
}

/// Padding that makes a sequence of `len` divisible among `p` ranks:
/// `(len, 0)` when `p` divides `len`, else `(len + pad, pad)` with
/// `pad = p - len % p`. `p == 0` is treated as 1 (no padding).
///
/// ```
/// use dist_utils::compute_padding_for_sp;
/// assert_eq!(compute_padding_for_sp(7, 2), (8, 1));
/// assert_eq!(compute_padding_for_sp(13, 4), (16, 3));
/// assert_eq!(compute_padding_for_sp(8, 4), (8, 0));
/// ```
pub fn compute_padding_for_sp(len: usize, p: usize) -> (usize, usize) {
    if p <= 1 || len.is_multiple_of(p) {
        (len, 0)
    } else {
        let pad = p - len % p;
        (len + pad, pad)
    }
}

/// Appends zeros along `dim` (negative counts from the end) so that its
/// size divides by `p`; returns the padded tensor and the padding added.
///
/// ```
/// use comm_core::Tensor;
/// let t = Tensor::from_vec1(vec![1.0f32, 2.0, 3.0]);
/// let (p, pad) = dist_utils::pad_sequence(&t, 0, 2).unwrap();
/// assert_eq!((p.to_vec::<f32>().unwrap(), pad), (vec![1.0, 2.0, 3.0, 0.0], 1));
/// ```
pub fn pad_sequence(t: &Tensor, dim: isize, p: usize) -> Result<(Tensor, usize)> {
    if p == 0 {
        return Err(CommError::invalid(
            "pad_sequence: the number of ranks must be at least 1",
        ));
    }
    let d = layout::normalize_dim(dim, t.ndim())?;
    let (_, pad) = compute_padding_for_sp(t.shape()[d], p);
    Ok((layout::pad(t, dim, pad)?, pad))
}

/// Trims `dim` back to `orig_len` (the inverse of [`pad_sequence`]).
/// `orig_len` larger than the current size is an error.
pub fn unpad_sequence(t: &Tensor, dim: isize, orig_len: usize) -> Result<Tensor> {
    let d = layout::normalize_dim(dim, t.ndim())?;
    let size = t.shape()[d];
    if orig_len > size {
        return Err(CommError::invalid(format!(
            "unpad_sequence: original length {orig_len} exceeds the size {size} of dimension {d} (shape {:?})",
            t.shape()
        )));
    }
    layout::unpad(t, dim, size - orig_len)
}
