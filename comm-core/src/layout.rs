//! Host layout operations: narrow / chunk / split / cat along a dimension,
//! permute / transpose into a new contiguous tensor, and pad / unpad.
//!
//! Every function works on raw bytes with the dtype's element size, so one
//! code path serves every [`DType`](crate::DType), and results are bit-exact
//! copies of the input elements. Every function returns a new contiguous host
//! tensor; device tensors are refused with [`CommError::InvalidArgument`]
//! (copy them with [`Tensor::to_host`] first).
//!
//! Dimensions are `isize`: negative values count from the end, as in PyTorch
//! (`-1` is the last dimension). Invalid arguments return errors, never panic.
//!
//! Copies are done as large contiguous runs: a tensor of shape
//! `[outer.., d, inner..]` viewed along `d` is `outer` blocks of
//! `d * inner` elements, and the operations along `d` copy whole sub-blocks
//! with `copy_from_slice`.

use std::borrow::Borrow;

use crate::{CommError, Result, Tensor};

/// Resolves a possibly negative `dim` against `ndim` dimensions.
///
/// Valid values are `-ndim..ndim`; a 0-dimensional tensor has no valid dim.
///
/// ```
/// use comm_core::layout::normalize_dim;
/// assert_eq!(normalize_dim(-1, 4).unwrap(), 3);
/// assert_eq!(normalize_dim(1, 4).unwrap(), 1);
/// assert!(normalize_dim(4, 4).is_err());
/// assert!(normalize_dim(-5, 4).is_err());
/// ```
pub fn normalize_dim(dim: isize, ndim: usize) -> Result<usize> {
    let n = ndim as isize;
    let d = if dim < 0 { dim + n } else { dim };
    if ndim == 0 || d < 0 || d >= n {
        return Err(CommError::invalid(format!(
            "dimension {dim} is out of range for a tensor with {ndim} dimension(s); valid: {}",
            if ndim == 0 {
                "none (a 0-dimensional tensor has no dimensions to index)".to_string()
            } else {
                format!("{}..={}", -n, n - 1)
            }
        )));
    }
    Ok(d as usize)
}

/// The host bytes of `t`, or an error naming `op` for device tensors.
fn host_bytes<'a>(op: &str, t: &'a Tensor) -> Result<&'a [u8]> {
    if !t.is_host() {
        return Err(CommError::invalid(format!(
            "layout::{op} works on host tensors only, but this one is on {}; \
             copy it with Tensor::to_host() first",
            t.device()
        )));
    }
    t.as_bytes()
}

/// `(outer, size, inner_bytes)` of `shape` viewed along `dim`.
fn split_at_dim(shape: &[usize], dim: usize, elem: usize) -> (usize, usize, usize) {
    let outer: usize = shape[..dim].iter().product();
    let inner: usize = shape[dim + 1..].iter().product();
    (outer, shape[dim], inner * elem)
}

/// A fresh zeroed host tensor (64-byte aligned) of `t`'s dtype.
fn new_like(t: &Tensor, shape: Vec<usize>) -> Tensor {
    Tensor::zeros(shape, t.dtype())
}

/// Copies `outer` blocks of `block` bytes: block `o` goes from
/// `src[src_off + o * src_stride..]` to `dst[o * dst_stride..]`.
fn copy_blocks(
    dst: &mut [u8],
    dst_stride: usize,
    src: &[u8],
    src_off: usize,
    src_stride: usize,
    block: usize,
    outer: usize,
) {
    if block == 0 {
        return;
    }
    if block == dst_stride && block == src_stride {
        // Both sides contiguous: one copy.
        let n = block * outer;
        dst[..n].copy_from_slice(&src[src_off..src_off + n]);
        return;
    }
    for o in 0..outer {
        let d = o * dst_stride;
        let s = src_off + o * src_stride;
        dst[d..d + block].copy_from_slice(&src[s..s + block]);
    }
}

/// The slice `[start, start + len)` of `t` along `dim`, as a new tensor.
///
/// ```
/// use comm_core::{layout, Tensor};
/// let t = Tensor::from_vec((0..6i32).collect(), [2, 3]).unwrap();
/// let n = layout::narrow(&t, -1, 1, 2).unwrap();
/// assert_eq!(n.shape(), &[2, 2]);
/// assert_eq!(n.to_vec::<i32>().unwrap(), [1, 2, 4, 5]);
/// assert!(layout::narrow(&t, 1, 2, 2).is_err()); // 2 + 2 > 3
/// ```
pub fn narrow(t: &Tensor, dim: isize, start: usize, len: usize) -> Result<Tensor> {
    let src = host_bytes("narrow", t)?;
    let d = normalize_dim(dim, t.ndim())?;
    let size = t.shape()[d];
    match start.checked_add(len) {
        Some(end) if end <= size => {}
        _ => {
            return Err(CommError::invalid(format!(
                "layout::narrow: start {start} + length {len} exceeds size {size} of dimension \
                 {d} (shape {:?})",
                t.shape()
            )))
        }
    }
    narrow_unchecked(t, src, d, start, len)
}

fn narrow_unchecked(t: &Tensor, src: &[u8], d: usize, start: usize, len: usize) -> Result<Tensor> {
    let (outer, size, inner) = split_at_dim(t.shape(), d, t.dtype().size());
    let mut shape = t.shape().to_vec();
    shape[d] = len;
    let mut out = new_like(t, shape);
    copy_blocks(
        out.as_bytes_mut()?,
        len * inner,
        src,
        start * inner,
        size * inner,
        len * inner,
        outer,
    );
    Ok(out)
}

/// Splits `t` along `dim` into pieces of the given sizes, which must add up
/// to the size of `dim`.
///
/// ```
/// use comm_core::{layout, Tensor};
/// let t = Tensor::from_vec1((0..5u8).collect());
/// let parts = layout::split(&t, &[2, 0, 3], 0).unwrap();
/// assert_eq!(parts[0].to_vec::<u8>().unwrap(), [0, 1]);
/// assert_eq!(parts[1].shape(), &[0]);
/// assert_eq!(parts[2].to_vec::<u8>().unwrap(), [2, 3, 4]);
/// assert!(layout::split(&t, &[2, 2], 0).is_err()); // 4 != 5
/// ```
pub fn split(t: &Tensor, sizes: &[usize], dim: isize) -> Result<Vec<Tensor>> {
    let src = host_bytes("split", t)?;
    let d = normalize_dim(dim, t.ndim())?;
    let size = t.shape()[d];
    let total = sizes.iter().try_fold(0usize, |a, &s| a.checked_add(s));
    if total != Some(size) {
        return Err(CommError::invalid(format!(
            "layout::split: sizes {sizes:?} must add up to {size}, the size of dimension {d} \
             (shape {:?})",
            t.shape()
        )));
    }
    let mut start = 0;
    let mut out = Vec::with_capacity(sizes.len());
    for &len in sizes {
        out.push(narrow_unchecked(t, src, d, start, len)?);
        start += len;
    }
    Ok(out)
}

/// Splits `t` into `chunks` pieces along `dim` with PyTorch's `chunk`
/// semantics: every piece has `ceil(size / chunks)` elements along `dim`
/// except possibly a smaller last one, so fewer than `chunks` pieces may be
/// returned (for a size of 0, `chunks` empty pieces). When `chunks` divides
/// the size, the pieces are equal. `chunks == 0` is an error.
///
/// ```
/// use comm_core::{layout, Tensor};
/// let t = Tensor::from_vec((0..8i64).collect(), [4, 2]).unwrap();
/// let c = layout::chunk(&t, 2, 0).unwrap();
/// assert_eq!(c[1].to_vec::<i64>().unwrap(), [4, 5, 6, 7]);
/// let c = layout::chunk(&t, 3, 0).unwrap(); // sizes 2, 2
/// assert_eq!(c.len(), 2);
/// ```
pub fn chunk(t: &Tensor, chunks: usize, dim: isize) -> Result<Vec<Tensor>> {
    host_bytes("chunk", t)?;
    let d = normalize_dim(dim, t.ndim())?;
    if chunks == 0 {
        return Err(CommError::invalid(
            "layout::chunk: the number of chunks must be at least 1",
        ));
    }
    let size = t.shape()[d];
    let sizes: Vec<usize> = if size == 0 {
        vec![0; chunks]
    } else {
        let step = size.div_ceil(chunks);
        (0..size.div_ceil(step))
            .map(|i| step.min(size - i * step))
            .collect()
    };
    split(t, &sizes, dim)
}

/// Concatenates tensors along `dim`. All must be host tensors of the same
/// dtype and number of dimensions, with equal sizes in every other dimension.
/// An empty list is an error.
///
/// ```
/// use comm_core::{layout, Tensor};
/// let a = Tensor::from_vec(vec![1.0f32, 2.0], [2, 1]).unwrap();
/// let b = Tensor::from_vec(vec![3.0f32, 4.0, 5.0, 6.0], [2, 2]).unwrap();
/// let c = layout::cat(&[&a, &b], 1).unwrap();
/// assert_eq!(c.shape(), &[2, 3]);
/// assert_eq!(c.to_vec::<f32>().unwrap(), [1.0, 3.0, 4.0, 2.0, 5.0, 6.0]);
/// ```
pub fn cat<T: Borrow<Tensor>>(tensors: &[T], dim: isize) -> Result<Tensor> {
    let first = tensors
        .first()
        .ok_or_else(|| CommError::invalid("layout::cat needs at least one tensor"))?
        .borrow();
    let d = normalize_dim(dim, first.ndim())?;
    let dtype = first.dtype();
    let mut srcs = Vec::with_capacity(tensors.len());
    let mut total = 0usize;
    for (i, t) in tensors.iter().enumerate() {
        let t = t.borrow();
        let bytes = host_bytes("cat", t)?;
        if t.dtype() != dtype {
            return Err(CommError::DTypeMismatch {
                operation: format!("layout::cat (tensor {i})"),
                expected: dtype.to_string(),
                actual: t.dtype().to_string(),
            });
        }
        let same_rest = t.ndim() == first.ndim()
            && t.shape()
                .iter()
                .zip(first.shape())
                .enumerate()
                .all(|(k, (a, b))| k == d || a == b);
        if !same_rest {
            return Err(CommError::shape(
                format!("layout::cat along dimension {d} (tensor {i})"),
                format!("shape {:?} in every dimension but {d}", first.shape()),
                format!("{:?}", t.shape()),
            ));
        }
        total = total
            .checked_add(t.shape()[d])
            .ok_or_else(|| CommError::invalid("layout::cat: concatenated size overflows"))?;
        srcs.push((bytes, t.shape()[d]));
    }
    let (outer, _, inner) = split_at_dim(first.shape(), d, dtype.size());
    let mut shape = first.shape().to_vec();
    shape[d] = total;
    let mut out = new_like(first, shape);
    let dst = out.as_bytes_mut()?;
    let row = total * inner;
    if outer == 1 {
        // Concatenation along the outermost non-trivial dim: one copy per input.
        let mut off = 0;
        for (src, n) in &srcs {
            let b = n * inner;
            dst[off..off + b].copy_from_slice(&src[..b]);
            off += b;
        }
    } else {
        // Walk the output sequentially: for each outer index, one run per input.
        for o in 0..outer {
            let mut off = o * row;
            for (src, n) in &srcs {
                let b = n * inner;
                if b > 0 {
                    dst[off..off + b].copy_from_slice(&src[o * b..o * b + b]);
                    off += b;
                }
            }
        }
    }
    Ok(out)
}

/// Reorders dimensions into a new contiguous tensor: output dimension `i`
/// is input dimension `perm[i]`. `perm` must be a permutation of
/// `0..t.ndim()`.
///
/// Dimensions of size 1 are dropped and runs of dimensions that stay adjacent
/// are merged before copying; when the innermost dimension stays in place the
/// copy proceeds in contiguous runs, otherwise in cache-sized 2-D tiles.
///
/// ```
/// use comm_core::{layout, Tensor};
/// let t = Tensor::from_vec((0..6i32).collect(), [1, 2, 3]).unwrap();
/// let p = layout::permute(&t, &[2, 0, 1]).unwrap();
/// assert_eq!(p.shape(), &[3, 1, 2]);
/// assert_eq!(p.to_vec::<i32>().unwrap(), [0, 3, 1, 4, 2, 5]);
/// assert!(layout::permute(&t, &[0, 0, 1]).is_err());
/// ```
pub fn permute(t: &Tensor, perm: &[usize]) -> Result<Tensor> {
    permute_view(t, t.shape(), perm)
}

/// [`permute`] of `t` viewed with shape `view` (same element count), without
/// first reshaping a copy: `t.view(view).permute(perm).contiguous()`.
///
/// ```
/// use comm_core::{layout, Tensor};
/// let t = Tensor::from_vec1((0..6i32).collect());
/// let p = layout::permute_view(&t, &[2, 3], &[1, 0]).unwrap();
/// assert_eq!(p.shape(), &[3, 2]);
/// assert_eq!(p.to_vec::<i32>().unwrap(), [0, 3, 1, 4, 2, 5]);
/// assert!(layout::permute_view(&t, &[4, 2], &[1, 0]).is_err());
/// ```
pub fn permute_view(t: &Tensor, view: &[usize], perm: &[usize]) -> Result<Tensor> {
    let plan = PermutePlan::new(view, perm, t.dtype().size())?;
    if view.iter().product::<usize>() != t.numel() {
        return Err(CommError::shape(
            "layout::permute_view",
            format!("a view of {} elements", t.numel()),
            format!("view {view:?}"),
        ));
    }
    let mut out = t.zeros_with_shape(plan.out_shape.clone())?;
    permute_into(t, &plan, &mut out)?;
    Ok(out)
}

/// Writes the permutation `plan` of `src` into `dst` (same dtype, element
/// count and device): with the device storage's own kernel for device
/// tensors where it has one, else on the host.
pub fn permute_into(src: &Tensor, plan: &PermutePlan, dst: &mut Tensor) -> Result<()> {
    if src.dtype() != dst.dtype() || src.numel() != plan.numel || dst.numel() != plan.numel {
        return Err(CommError::shape(
            "layout::permute_into",
            format!("{} x {} in and out", plan.numel, src.dtype()),
            format!(
                "{} x {} -> {} x {}",
                src.numel(),
                src.dtype(),
                dst.numel(),
                dst.dtype()
            ),
        ));
    }
    if let (Some(s), Some(d)) = (src.device_storage(), dst.device_storage_mut()) {
        if s.permute_into(plan, d)? {
            return Ok(());
        }
    }
    if src.is_host() && dst.is_host() {
        plan.run_host(dst.as_bytes_mut()?, src.as_bytes()?);
        return Ok(());
    }
    let h = src.to_host()?;
    let mut o = Tensor::zeros(dst.shape().to_vec(), dst.dtype());
    plan.run_host(o.as_bytes_mut()?, h.as_bytes()?);
    dst.copy_from(&o)
}

/// A permutation of a row-major array, simplified once and run by the host
/// copy here or by a device kernel (comm-nccl): output dimension `i` is
/// input dimension `perm[i]` of the array viewed with shape `view`.
///
/// Dimensions of size 1 are dropped and neighbours that stay adjacent are
/// merged, so `dims` is the shortest equivalent description: output
/// dimensions, outermost first, each as (size, input stride in elements).
///
/// ```
/// use comm_core::layout::PermutePlan;
/// // [2, 3, 4] -> [3, 2, 4]: the innermost dim stays, so runs of 4 elements move.
/// let p = PermutePlan::new(&[2, 3, 4], &[1, 0, 2], 4).unwrap();
/// assert_eq!(p.out_shape, [3, 2, 4]);
/// assert_eq!(p.dims, [(3, 4), (2, 12), (4, 1)]);
/// assert!(PermutePlan::new(&[2, 3], &[0, 0], 4).is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PermutePlan {
    /// The output's shape (the view permuted).
    pub out_shape: Vec<usize>,
    /// Merged output dimensions: (size, input stride in elements).
    pub dims: Vec<(usize, usize)>,
    /// Bytes per element.
    pub elem_size: usize,
    /// Number of elements.
    pub numel: usize,
}

impl PermutePlan {
    /// Plans `view` permuted by `perm` for elements of `elem_size` bytes.
    pub fn new(view: &[usize], perm: &[usize], elem_size: usize) -> Result<PermutePlan> {
        let n = view.len();
        let mut seen = vec![false; n];
        let valid = perm.len() == n
            && perm
                .iter()
                .all(|&p| p < n && !std::mem::replace(&mut seen[p], true));
        if !valid {
            return Err(CommError::invalid(format!(
                "layout::permute: {perm:?} is not a permutation of 0..{n} (tensor shape {view:?})"
            )));
        }
        if !matches!(elem_size, 1 | 2 | 4 | 8) {
            return Err(CommError::invalid(format!(
                "layout::permute: elements of {elem_size} bytes are not supported"
            )));
        }
        let numel = view
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| CommError::invalid(format!("view {view:?} overflows usize")))?;
        // Input strides in elements.
        let mut in_strides = vec![0usize; n];
        let mut s = 1;
        for k in (0..n).rev() {
            in_strides[k] = s;
            s *= view[k];
        }
        let mut dims: Vec<(usize, usize)> = Vec::with_capacity(n);
        if numel > 0 {
            for &p in perm {
                let (size, stride) = (view[p], in_strides[p]);
                if size == 1 {
                    continue;
                }
                match dims.last_mut() {
                    Some(last) if last.1 == stride * size => *last = (last.0 * size, stride),
                    _ => dims.push((size, stride)),
                }
            }
        }
        Ok(PermutePlan {
            out_shape: perm.iter().map(|&p| view[p]).collect(),
            dims,
            elem_size,
            numel,
        })
    }

    /// True when the permutation leaves the bytes in place (a plain copy).
    pub fn is_identity(&self) -> bool {
        self.dims.len() <= 1
    }

    /// Runs the permutation on host bytes (`dst` and `src` hold `numel`
    /// elements each).
    pub fn run_host(&self, dst: &mut [u8], src: &[u8]) {
        assert!(
            dst.len() == self.numel * self.elem_size && src.len() == dst.len(),
            "permute buffers must hold exactly the planned elements"
        );
        let es = self.elem_size;
        match self.dims.last() {
            _ if self.is_identity() => dst.copy_from_slice(src),
            Some(&(run, 1)) => permute_runs(dst, src, &self.dims, run * es, es),
            _ => match es {
                1 => permute_tiled::<u8>(dst, src, &self.dims),
                2 => permute_tiled::<u16>(dst, src, &self.dims),
                4 => permute_tiled::<u32>(dst, src, &self.dims),
                _ => permute_tiled::<u64>(dst, src, &self.dims),
            },
        }
    }
}

/// Permutation whose innermost output dim is the input's innermost: copy
/// `run_bytes` contiguous runs, walking the outer output dims with an odometer.
fn permute_runs(dst: &mut [u8], src: &[u8], dims: &[(usize, usize)], run_bytes: usize, es: usize) {
    let outer = &dims[..dims.len() - 1];
    let mut idx = vec![0usize; outer.len()];
    let mut in_off = 0usize; // in elements
    for chunk in dst.chunks_exact_mut(run_bytes) {
        let s = in_off * es;
        chunk.copy_from_slice(&src[s..s + run_bytes]);
        for k in (0..outer.len()).rev() {
            idx[k] += 1;
            in_off += outer[k].1;
            if idx[k] < outer[k].0 {
                break;
            }
            in_off -= outer[k].1 * outer[k].0;
            idx[k] = 0;
        }
    }
}

/// Edge of the square tiles used when the innermost dimension moves.
const TILE: usize = 32;

/// General permutation: the input-contiguous dim `p` and the output's last
/// dim are copied in `TILE x TILE` tiles, so both the reads (along `p`) and
/// the writes (along the last dim) touch few cache lines per tile.
fn permute_tiled<E: bytemuck::Pod>(dst: &mut [u8], src: &[u8], dims: &[(usize, usize)]) {
    // Host buffers are 64-byte aligned and hold whole elements.
    let dst: &mut [E] = bytemuck::cast_slice_mut(dst);
    let src: &[E] = bytemuck::cast_slice(src);
    let nd = dims.len();
    // Output strides in elements.
    let mut out_strides = vec![0usize; nd];
    let mut s = 1;
    for k in (0..nd).rev() {
        out_strides[k] = s;
        s *= dims[k].0;
    }
    let last = nd - 1;
    let p = dims
        .iter()
        .position(|&(_, st)| st == 1)
        .expect("the input's innermost dim is among the merged dims");
    let (np, op) = (dims[p].0, out_strides[p]);
    let (nl, il) = (dims[last].0, dims[last].1);
    let rest: Vec<usize> = (0..nd).filter(|&k| k != p && k != last).collect();
    let mut idx = vec![0usize; rest.len()];
    let (mut in_base, mut out_base) = (0usize, 0usize);
    loop {
        for i0 in (0..np).step_by(TILE) {
            let i1 = (i0 + TILE).min(np);
            for j0 in (0..nl).step_by(TILE) {
                let j1 = (j0 + TILE).min(nl);
                for i in i0..i1 {
                    let o = out_base + i * op;
                    let row = &mut dst[o + j0..o + j1];
                    let mut si = in_base + i + j0 * il;
                    for d in row {
                        *d = src[si];
                        si += il;
                    }
                }
            }
        }
        // Advance the odometer over the remaining dims.
        let mut k = rest.len();
        loop {
            if k == 0 {
                return;
            }
            k -= 1;
            let r = rest[k];
            idx[k] += 1;
            in_base += dims[r].1;
            out_base += out_strides[r];
            if idx[k] < dims[r].0 {
                break;
            }
            in_base -= dims[r].1 * dims[r].0;
            out_base -= out_strides[r] * dims[r].0;
            idx[k] = 0;
        }
    }
}

/// Swaps two dimensions into a new contiguous tensor.
///
/// ```
/// use comm_core::{layout, Tensor};
/// let t = Tensor::from_vec((0..6u8).collect(), [2, 3]).unwrap();
/// let tt = layout::transpose(&t, 0, -1).unwrap();
/// assert_eq!(tt.shape(), &[3, 2]);
/// assert_eq!(tt.to_vec::<u8>().unwrap(), [0, 3, 1, 4, 2, 5]);
/// ```
pub fn transpose(t: &Tensor, dim0: isize, dim1: isize) -> Result<Tensor> {
    host_bytes("transpose", t)?;
    let a = normalize_dim(dim0, t.ndim())?;
    let b = normalize_dim(dim1, t.ndim())?;
    let mut perm: Vec<usize> = (0..t.ndim()).collect();
    perm.swap(a, b);
    permute(t, &perm)
}

/// Appends `amount` zero elements at the end of `dim` (zero bytes, which is
/// `0` / `+0.0` for every dtype).
///
/// ```
/// use comm_core::{layout, Tensor};
/// let t = Tensor::from_vec(vec![1i32, 2, 3, 4], [2, 2]).unwrap();
/// let p = layout::pad(&t, 1, 1).unwrap();
/// assert_eq!(p.to_vec::<i32>().unwrap(), [1, 2, 0, 3, 4, 0]);
/// assert_eq!(layout::unpad(&p, 1, 1).unwrap(), t);
/// ```
pub fn pad(t: &Tensor, dim: isize, amount: usize) -> Result<Tensor> {
    let src = host_bytes("pad", t)?;
    let d = normalize_dim(dim, t.ndim())?;
    let (outer, size, inner) = split_at_dim(t.shape(), d, t.dtype().size());
    let new_size = size
        .checked_add(amount)
        .ok_or_else(|| CommError::invalid("layout::pad: padded size overflows"))?;
    let mut shape = t.shape().to_vec();
    shape[d] = new_size;
    let mut out = new_like(t, shape);
    // The output starts zeroed; copy the original rows into place.
    copy_blocks(
        out.as_bytes_mut()?,
        new_size * inner,
        src,
        0,
        size * inner,
        size * inner,
        outer,
    );
    Ok(out)
}

/// Removes the last `amount` elements of `dim`: the inverse of [`pad`].
/// `amount` larger than the size of `dim` is an error.
///
/// ```
/// use comm_core::{layout, Tensor};
/// let t = Tensor::from_vec1(vec![1u8, 2, 0]);
/// assert_eq!(layout::unpad(&t, 0, 1).unwrap().to_vec::<u8>().unwrap(), [1, 2]);
/// assert!(layout::unpad(&t, 0, 4).is_err());
/// ```
pub fn unpad(t: &Tensor, dim: isize, amount: usize) -> Result<Tensor> {
    let src = host_bytes("unpad", t)?;
    let d = normalize_dim(dim, t.ndim())?;
    let size = t.shape()[d];
    if amount > size {
        return Err(CommError::invalid(format!(
            "layout::unpad: cannot remove {amount} elements from dimension {d} of size {size} \
             (shape {:?})",
            t.shape()
        )));
    }
    narrow_unchecked(t, src, d, 0, size - amount)
}
