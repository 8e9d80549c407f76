//! Layout copies for CUDA tensors: a generic "view as `shape`, permute the
//! axes, make contiguous" copy, the one data-movement primitive that
//! all_gather(dim) and all_to_all_4D need around the flat collectives.
//!
//! The copy is first simplified on the host (size-1 axes dropped, axes that
//! stay adjacent merged, elements widened to 16/8/4/2 bytes where the inner
//! run allows), then run by a small NVRTC kernel (one thread per output
//! element, 32-bit index math when it fits). Without NVRTC it falls back to
//! staging through host memory; [`permute_host`] is the same plan on the host.
//!
//! Patterns (P = group size), with `permute(x, view, perm)`:
//! - all_gather along `dim`: the flat result `[P, outer, rest]` (outer = the
//!   product of the dims before `dim`) becomes `[outer, P, rest]` with perm
//!   `[1, 0, 2]`.
//! - all_to_all_4D (2, 1), `[B, S/P, H, D]`: before the exchange
//!   view `[B, S/P, P, H/P, D]`, perm `[2, 0, 1, 3, 4]`; after it view
//!   `[P, B, S/P, H/P, D]`, perm `[1, 0, 2, 3, 4]` gives `[B, S, H/P, D]`.
//! - all_to_all_4D (1, 2), `[B, S, H/P, D]`: before, view
//!   `[B, P, S/P, H/P, D]`, perm `[1, 0, 2, 3, 4]`; after, view
//!   `[P, B, S/P, H/P, D]`, perm `[1, 2, 0, 3, 4]` gives `[B, S/P, H, D]`.

use std::sync::Arc;

use comm_core::{CommError, Result, Tensor};
use cudarc::driver::{CudaContext, CudaFunction, DeviceRepr, LaunchConfig, PushKernelArg};

use crate::cuda::{cuda_err, guarded, CudaStorage};

/// Most axes a simplified permute may have on the device.
pub const MAX_DIMS: usize = 6;

/// A simplified strided copy: `dst[i] = src[offset(i)]` over `shape`, with
/// `elem`-byte elements and source strides in elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PermutePlan {
    /// Element size in bytes after widening (1, 2, 4, 8 or 16).
    pub elem: usize,
    /// Output shape (row-major), outer to inner.
    pub shape: Vec<usize>,
    /// Source stride of each output axis, in elements of `elem` bytes.
    pub strides: Vec<usize>,
}

impl PermutePlan {
    /// Plans `dst = src.view(view).permute(perm).contiguous()` for
    /// elements of `elem_size` bytes. Output axis `k` is source axis `perm[k]`.
    pub fn new(elem_size: usize, view: &[usize], perm: &[usize]) -> Result<PermutePlan> {
        let nd = view.len();
        if perm.len() != nd {
            return Err(CommError::invalid(format!(
                "permute: perm {perm:?} has {} axes but the view {view:?} has {nd}",
                perm.len()
            )));
        }
        let mut seen = vec![false; nd];
        for &p in perm {
            if p >= nd || std::mem::replace(&mut seen[p], true) {
                return Err(CommError::invalid(format!(
                    "permute: {perm:?} is not a permutation of 0..{nd}"
                )));
            }
        }
        let mut src_strides = vec![1usize; nd];
        for k in (0..nd.saturating_sub(1)).rev() {
            src_strides[k] = src_strides[k + 1] * view[k + 1];
        }
        // Output axes, dropping size-1 ones, merging those that stay adjacent.
        let mut shape: Vec<usize> = Vec::with_capacity(nd);
        let mut strides: Vec<usize> = Vec::with_capacity(nd);
        for &p in perm {
            let (n, s) = (view[p], src_strides[p]);
            if n == 1 {
                continue;
            }
            match (shape.last_mut(), strides.last_mut()) {
                (Some(ln), Some(ls)) if *ls == n * s => {
                    *ln *= n;
                    *ls = s;
                }
                _ => {
                    shape.push(n);
                    strides.push(s);
                }
            }
        }
        if shape.is_empty() {
            shape.push(1);
            strides.push(1);
        }
        let mut plan = PermutePlan {
            elem: elem_size,
            shape,
            strides,
        };
        plan.widen();
        Ok(plan)
    }

    /// Widens elements while the contiguous inner run and every stride allow.
    fn widen(&mut self) {
        let last = self.shape.len() - 1;
        if self.strides[last] != 1 {
            return;
        }
        let e = self.elem;
        for w in [16usize, 8, 4, 2] {
            if w <= e {
                break;
            }
            let ok = (self.shape[last] * e) % w == 0
                && self.strides[..last].iter().all(|s| (s * e) % w == 0);
            if ok {
                self.shape[last] = self.shape[last] * e / w;
                for s in &mut self.strides[..last] {
                    *s = *s * e / w;
                }
                self.elem = w;
                return;
            }
        }
    }

    /// Number of (widened) elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Host version of the permute copy on raw bytes (`src` and `dst` of equal
/// length, row-major `view` of `elem_size`-byte elements).
pub fn permute_host_bytes(
    src: &[u8],
    dst: &mut [u8],
    elem_size: usize,
    view: &[usize],
    perm: &[usize],
) -> Result<()> {
    let n: usize = view.iter().product();
    if src.len() != n * elem_size || dst.len() != src.len() {
        return Err(CommError::shape(
            "permute",
            format!("{} bytes for view {view:?}", n * elem_size),
            format!("{} and {} bytes", src.len(), dst.len()),
        ));
    }
    if n == 0 {
        return Ok(());
    }
    let plan = PermutePlan::new(elem_size, view, perm)?;
    let e = plan.elem;
    let nd = plan.shape.len();
    let inner = plan.shape[nd - 1];
    let (run, inner_step) = if plan.strides[nd - 1] == 1 {
        (inner * e, 0)
    } else {
        (e, plan.strides[nd - 1])
    };
    let mut idx = vec![0usize; nd - 1];
    let mut out = 0usize;
    loop {
        let base: usize = idx.iter().zip(&plan.strides).map(|(i, s)| i * s).sum();
        if inner_step == 0 {
            let o = base * e;
            dst[out..out + run].copy_from_slice(&src[o..o + run]);
            out += run;
        } else {
            for j in 0..inner {
                let o = (base + j * inner_step) * e;
                dst[out..out + e].copy_from_slice(&src[o..o + e]);
                out += e;
            }
        }
        // Odometer over the outer axes.
        let mut k = nd - 1;
        loop {
            if k == 0 {
                return Ok(());
            }
            k -= 1;
            idx[k] += 1;
            if idx[k] < plan.shape[k] {
                break;
            }
            idx[k] = 0;
        }
    }
}

fn permuted_shape(t: &Tensor, view: &[usize], perm: &[usize]) -> Result<Vec<usize>> {
    let n: usize = view.iter().product();
    if n != t.numel() {
        return Err(CommError::shape(
            "permute",
            format!("a view of {} elements", t.numel()),
            format!("view {view:?} with {n}"),
        ));
    }
    perm.iter()
        .map(|&p| {
            view.get(p)
                .copied()
                .ok_or_else(|| CommError::invalid(format!("permute: axis {p} out of range")))
        })
        .collect()
}

/// Host tensor version: `t.view(view).permute(perm).contiguous()`.
pub fn permute_host(t: &Tensor, view: &[usize], perm: &[usize]) -> Result<Tensor> {
    let shape = permuted_shape(t, view, perm)?;
    let mut out = Tensor::zeros(shape, t.dtype());
    permute_host_bytes(
        t.as_bytes()?,
        out.as_bytes_mut()?,
        t.dtype().size(),
        view,
        perm,
    )?;
    Ok(out)
}

/// `t.view(view).permute(perm).contiguous()` on `t`'s device: the NVRTC
/// kernel for CUDA tensors (host staging when NVRTC is missing), the host
/// copy for host tensors. The result has shape `view[perm[k]]`.
pub fn permute(t: &Tensor, view: &[usize], perm: &[usize]) -> Result<Tensor> {
    if t.is_host() {
        return permute_host(t, view, perm);
    }
    let shape = permuted_shape(t, view, perm)?;
    let mut out = t.zeros_with_shape(shape)?;
    permute_into(t, view, perm, &mut out)?;
    Ok(out)
}

/// Like [`permute`] into an existing tensor of the same dtype and element
/// count (its shape is left as it is).
pub fn permute_into(t: &Tensor, view: &[usize], perm: &[usize], out: &mut Tensor) -> Result<()> {
    permuted_shape(t, view, perm)?;
    if out.numel() != t.numel() || out.dtype() != t.dtype() {
        return Err(CommError::shape(
            "permute_into",
            format!("{} x {}", t.numel(), t.dtype()),
            format!("{} x {}", out.numel(), out.dtype()),
        ));
    }
    if t.is_host() && out.is_host() {
        let e = t.dtype().size();
        return permute_host_bytes(t.as_bytes()?, out.as_bytes_mut()?, e, view, perm);
    }
    if t.is_host() || out.is_host() || t.device() != out.device() {
        let h = permute_host(&t.to_host()?, view, perm)?;
        return out.copy_from(&h);
    }
    if t.numel() == 0 {
        return Ok(());
    }
    let plan = PermutePlan::new(t.dtype().size(), view, perm)?;
    let src = CudaStorage::of(t)?;
    let dev = src.cuda_device().clone();
    let kernels = match dev.kernels() {
        Ok(k) if plan.shape.len() <= MAX_DIMS => k,
        _ => {
            // No NVRTC (or too many axes): stage through the host.
            let h = permute_host(&t.to_host()?, view, perm)?;
            return out.copy_from(&h);
        }
    };
    let f = kernels.get(plan.elem, plan.numel())?;
    let mut p = PermuteParams {
        ndim: plan.shape.len() as u64,
        shape: [1; MAX_DIMS],
        strides: [0; MAX_DIMS],
    };
    for (k, (&n, &s)) in plan.shape.iter().zip(&plan.strides).enumerate() {
        p.shape[k] = n as u64;
        p.strides[k] = s as u64;
    }
    let n = plan.numel() as u64;
    let threads = 256u32;
    let blocks = (n.div_ceil(threads as u64)).clamp(1, 65_535 * 8) as u32;
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    dev.bind()?;
    let dst = CudaStorage::of_mut(out)?;
    let stream = dev.stream().clone();
    let mut b = stream.launch_builder(f);
    b.arg(src.slice()).arg(dst.slice_mut()).arg(&n).arg(&p);
    // SAFETY: the kernel reads `n` elements of `plan.elem` bytes from `src`
    // at offsets below its length (the plan covers exactly the view) and
    // writes `n` elements to `dst`, which has the same byte length; both
    // allocations are 256-byte aligned, enough for 16-byte elements.
    unsafe { b.launch(cfg) }.map_err(|e| cuda_err("permute kernel launch", e))?;
    Ok(())
}

/// Kernel parameters, passed by value (`struct Params` in the source).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct PermuteParams {
    ndim: u64,
    shape: [u64; MAX_DIMS],
    strides: [u64; MAX_DIMS],
}

// SAFETY: plain `repr(C)` integers matching `struct Params` in KERNEL_SRC
// (8-byte fields, no padding, no pointers).
unsafe impl DeviceRepr for PermuteParams {}

const KERNEL_SRC: &str = r#"
struct Params { unsigned long long ndim; unsigned long long shape[6]; unsigned long long stride[6]; };
struct alignas(16) V16 { unsigned long long a, b; };
template <typename T, typename I>
__device__ __forceinline__ void permute(const T* __restrict__ src, T* __restrict__ dst,
                                        unsigned long long n, const Params& p) {
  const I total = (I)n;
  const I step = (I)gridDim.x * (I)blockDim.x;
  const int nd = (int)p.ndim;
  for (I i = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; i < total; i += step) {
    I rem = i, off = 0;
    for (int k = nd - 1; k >= 0; --k) {
      const I s = (I)p.shape[k];
      const I c = rem % s;
      rem /= s;
      off += c * (I)p.stride[k];
    }
    dst[i] = src[off];
  }
}
#define DEF(N, T) \
  extern "C" __global__ void permute_##N##_32(const T* s, T* d, unsigned long long n, Params p) { permute<T, unsigned int>(s, d, n, p); } \
  extern "C" __global__ void permute_##N##_64(const T* s, T* d, unsigned long long n, Params p) { permute<T, unsigned long long>(s, d, n, p); }
DEF(1, unsigned char)
DEF(2, unsigned short)
DEF(4, unsigned int)
DEF(8, unsigned long long)
DEF(16, V16)
"#;

/// The compiled permute kernels of one device.
#[derive(Debug)]
pub(crate) struct Kernels {
    f32: [CudaFunction; 5],
    f64: [CudaFunction; 5],
}

const WIDTHS: [usize; 5] = [1, 2, 4, 8, 16];

impl Kernels {
    pub(crate) fn compile(ctx: &Arc<CudaContext>) -> std::result::Result<Kernels, String> {
        // SAFETY: only tries to dlopen libnvrtc by name.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err("libnvrtc was not found".into());
        }
        let ptx = guarded("nvrtcCompileProgram", || {
            cudarc::nvrtc::compile_ptx(KERNEL_SRC)
        })
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("compiling the permute kernel: {e:?}"))?;
        let module = ctx
            .load_module(ptx)
            .map_err(|e| format!("loading the permute kernel: {e:?}"))?;
        let load = |w: usize, bits: u32| {
            module
                .load_function(&format!("permute_{w}_{bits}"))
                .map_err(|e| format!("permute_{w}_{bits}: {e:?}"))
        };
        let mut f32 = Vec::with_capacity(5);
        let mut f64 = Vec::with_capacity(5);
        for w in WIDTHS {
            f32.push(load(w, 32)?);
            f64.push(load(w, 64)?);
        }
        Ok(Kernels {
            f32: f32.try_into().map_err(|_| "kernel table".to_string())?,
            f64: f64.try_into().map_err(|_| "kernel table".to_string())?,
        })
    }

    fn get(&self, elem: usize, n: usize) -> Result<&CudaFunction> {
        let i = WIDTHS
            .iter()
            .position(|&w| w == elem)
            .ok_or_else(|| CommError::invalid(format!("permute: element width {elem}")))?;
        // 32-bit indices while index + grid stride cannot wrap.
        Ok(if n < (1usize << 31) {
            &self.f32[i]
        } else {
            &self.f64[i]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_merges_and_widens() {
        // all_gather dim 1 of [2, 3] f32 with P = 4: [4, 2, 3] -> [2, 4, 3].
        let p = PermutePlan::new(4, &[4, 2, 3], &[1, 0, 2]).unwrap();
        assert_eq!(p.shape, vec![2, 4, 3]);
        assert_eq!(p.elem, 4);
        // Identity collapses to one contiguous run, widened to 16 bytes.
        let p = PermutePlan::new(2, &[2, 4, 8], &[0, 1, 2]).unwrap();
        assert_eq!(
            (p.shape.clone(), p.strides.clone(), p.elem),
            (vec![8], vec![1], 16)
        );
        // all_to_all_4D block: inner D of 64 bf16 = 128 bytes -> 8 x 16 B.
        let p = PermutePlan::new(2, &[2, 8, 4, 16, 64], &[2, 0, 1, 3, 4]).unwrap();
        assert_eq!(p.elem, 16);
        assert_eq!(p.shape, vec![4, 16, 128]);
        assert!(PermutePlan::new(4, &[2, 2], &[0, 0]).is_err());
    }

    #[test]
    fn host_permute_matches_naive() {
        let view = [2usize, 3, 4, 5];
        let perm = [2usize, 0, 3, 1];
        let n: usize = view.iter().product();
        let src: Vec<u16> = (0..n as u16).collect();
        let t = Tensor::from_vec(
            src.iter()
                .map(|&v| comm_core::f16::from_f32(v as f32))
                .collect::<Vec<_>>(),
            view.to_vec(),
        )
        .unwrap();
        let out = permute_host(&t, &view, &perm).unwrap();
        assert_eq!(out.shape(), &[4, 2, 5, 3]);
        let got = out.to_vec::<comm_core::f16>().unwrap();
        let mut i = 0;
        for c in 0..4 {
            for a in 0..2 {
                for d in 0..5 {
                    for b in 0..3 {
                        let idx = ((a * 3 + b) * 4 + c) * 5 + d;
                        assert_eq!(got[i].to_f32() as usize, idx);
                        i += 1;
                    }
                }
            }
        }
    }

    /// The plan (merging, widening, odometer) agrees bit for bit with
    /// comm-core's host `layout::permute` on the collective patterns.
    #[test]
    fn host_plan_matches_comm_core_layout() {
        let cases: [(&[usize], &[usize]); 8] = [
            (&[4, 6, 10], &[1, 0, 2]),
            (&[4, 1, 60], &[1, 0, 2]),
            (&[2, 8, 4, 3, 64], &[2, 0, 1, 3, 4]),
            (&[4, 2, 8, 3, 64], &[1, 0, 2, 3, 4]),
            (&[2, 4, 8, 3, 64], &[1, 0, 2, 3, 4]),
            (&[4, 2, 8, 3, 64], &[1, 2, 0, 3, 4]),
            (&[3, 5, 7, 2, 3, 2], &[5, 3, 1, 0, 2, 4]),
            (&[9, 13], &[1, 0]),
        ];
        for dtype in comm_core::DType::ALL {
            for (view, perm) in cases {
                let n: usize = view.iter().product();
                let bytes: Vec<u8> = (0..n * dtype.size())
                    .map(|i| (i * 31 % 251) as u8)
                    .collect();
                let t = Tensor::from_bytes(&bytes, view.to_vec(), dtype).unwrap();
                let ours = permute_host(&t, view, perm).unwrap();
                let core = comm_core::layout::permute(&t, perm).unwrap();
                assert_eq!(ours, core, "{dtype} {view:?} {perm:?}");
            }
        }
    }
}
