//! FastVideo's `distributed/utils.py` helpers under their Python names:
//! `divide`, `ensure_divisibility`, `split_tensor_along_last_dim` and
//! `compute_padding_for_sp` (from dist-utils), `pad_sequence_tensor` and
//! `unpad_sequence_tensor`.

use comm_core::{bf16, f16, layout, DType, Element, Result, Tensor};

pub use dist_utils::{compute_padding_for_sp, divide, ensure_divisibility};

use crate::coordinator::on_host;

/// Splits `tensor` into `num_partitions` equal tensors along its last
/// dimension, which `num_partitions` must divide (FastVideo's
/// `split_tensor_along_last_dim`). The chunks are always contiguous copies,
/// so FastVideo's `contiguous_split_chunks` flag has no counterpart.
///
/// ```
/// use parallel_state::{split_tensor_along_last_dim, Tensor};
/// let t = Tensor::from_vec((0..6i32).collect(), [2, 3]).unwrap();
/// let p = split_tensor_along_last_dim(&t, 3).unwrap();
/// assert_eq!(p[2].to_vec::<i32>().unwrap(), [2, 5]);
/// assert!(split_tensor_along_last_dim(&t, 2).is_err());
/// ```
pub fn split_tensor_along_last_dim(tensor: &Tensor, num_partitions: usize) -> Result<Vec<Tensor>> {
    if tensor.is_host() {
        return dist_utils::split_tensor_along_last_dim(tensor, num_partitions);
    }
    dist_utils::split_tensor_along_last_dim(&tensor.to_host()?, num_partitions)?
        .iter()
        .map(|h| h.to_device(tensor.device()))
        .collect()
}

/// Pads `tensor` along `seq_dim` (negative counts from the end) with
/// `pad_value` up to `target_seq_len` (FastVideo's `pad_sequence_tensor`;
/// its defaults are `seq_dim = 1`, `pad_value = 0.0`). A tensor already at
/// least that long comes back unchanged (as a copy). `pad_value` is
/// converted to the tensor's dtype as Rust's `as` does (integers truncate
/// toward zero and saturate; NaN becomes 0).
///
/// ```
/// use parallel_state::{pad_sequence_tensor, unpad_sequence_tensor, Tensor};
/// let t = Tensor::from_vec(vec![1i32, 2, 3, 4], [2, 2]).unwrap();
/// let p = pad_sequence_tensor(&t, 3, 1, -1.0).unwrap();
/// assert_eq!(p.to_vec::<i32>().unwrap(), [1, 2, -1, 3, 4, -1]);
/// assert_eq!(unpad_sequence_tensor(&p, 2, 1).unwrap(), t);
/// ```
pub fn pad_sequence_tensor(
    tensor: &Tensor,
    target_seq_len: usize,
    seq_dim: isize,
    pad_value: f64,
) -> Result<Tensor> {
    let d = layout::normalize_dim(seq_dim, tensor.ndim())?;
    let len = tensor.shape()[d];
    if len >= target_seq_len {
        return tensor.try_clone();
    }
    let mut pad_shape = tensor.shape().to_vec();
    pad_shape[d] = target_seq_len - len;
    let padding = filled(pad_shape, tensor.dtype(), pad_value)?;
    on_host(tensor, |t| layout::cat(&[t, &padding], d as isize))
}

/// Trims `tensor` along `seq_dim` back to `original_seq_len` (FastVideo's
/// `unpad_sequence_tensor`; its default is `seq_dim = 1`). Unlike Python's
/// slicing, a length larger than the dimension is an error.
pub fn unpad_sequence_tensor(
    tensor: &Tensor,
    original_seq_len: usize,
    seq_dim: isize,
) -> Result<Tensor> {
    on_host(tensor, |t| {
        dist_utils::unpad_sequence(t, seq_dim, original_seq_len)
    })
}

/// A host tensor of `shape` and `dtype` with every element `value`.
fn filled(shape: Vec<usize>, dtype: DType, value: f64) -> Result<Tensor> {
    fn of<T: Element>(shape: Vec<usize>, value: f64) -> Result<Tensor> {
        let n = shape.iter().product();
        Tensor::from_vec(vec![T::from_f64(value); n], shape)
    }
    match dtype {
        DType::F32 => of::<f32>(shape, value),
        DType::F64 => of::<f64>(shape, value),
        DType::F16 => of::<f16>(shape, value),
        DType::BF16 => of::<bf16>(shape, value),
        DType::I8 => of::<i8>(shape, value),
        DType::U8 => of::<u8>(shape, value),
        DType::I32 => of::<i32>(shape, value),
        DType::I64 => of::<i64>(shape, value),
    }
}
