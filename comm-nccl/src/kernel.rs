//! The device permute: comm-core's [`PermutePlan`] (the one planner, shared
//! with the host copy) run by NVRTC-compiled kernels. This is the copy
//! all_gather(dim) and all_to_all_4D need around the flat collectives.
//!
//! How a plan runs on the device ([`Launch::prepare`]):
//! - identity plans are one `cuMemcpyDtoDAsync`;
//! - when the innermost output dimension is the input's innermost
//!   (every all_gather(dim) and all_to_all_4D pattern), elements are widened
//!   to 16/8/4/2-byte vectors as far as the run, the strides and both
//!   addresses allow, and a gather kernel copies them: each thread moves 4
//!   vectors with coalesced loads and stores, the source offset decoded with
//!   multiply-shift division (no hardware divide) by a kernel specialised for
//!   3, 4 or 5 dimensions (a permutation that keeps the innermost run never
//!   merges to 2), or looping over up to [`MAX_DIMS`];
//! - when the innermost dimension moves (a transpose), 32x32 tiles go
//!   through shared memory so reads and writes are both coalesced.
//!
//! [`Launch::emulate`] runs exactly the index math of the kernels on the
//! host; the CPU tests compare it with [`PermutePlan::run_host`] for every
//! dtype and pattern, so the device arithmetic is checked without a GPU.

use std::sync::Arc;

use comm_core::layout::PermutePlan;
use comm_core::{CommError, Result};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg,
};

use crate::cuda::{cuda_err, guarded};

/// Most merged dimensions a plan may have on the device (more fall back to
/// the host; merged plans of real layouts have 2 to 4).
pub const MAX_DIMS: usize = 8;
/// Most dimensions besides the two tiled ones in a transpose.
pub const MAX_REST: usize = 6;
/// Vectors per thread in the gather kernels.
const UNROLL: u32 = 4;
/// Threads per block of the gather kernels.
const THREADS: u32 = 256;
/// The 32-bit kernels index vectors below this bound (with room for the
/// unrolled lanes), so no index or offset can wrap.
const LIMIT32: u64 = (1 << 31) - (1 << 16);
/// Vector widths, in bytes, of the gather kernels.
pub const WIDTHS: [usize; 5] = [1, 2, 4, 8, 16];
/// Element sizes of the transpose kernels.
pub const TILED_SIZES: [usize; 4] = [1, 2, 4, 8];

/// The CUDA C++ source of every permute kernel.
pub const KERNEL_SRC: &str = r#"
typedef unsigned int u32;
typedef unsigned long long u64;
struct alignas(8) V8 { u32 a, b; };
struct alignas(16) V16 { u64 a, b; };
#define MAXD 8
#define UNROLL 4

// Source offset of output vector i: dims outermost first, sizes/strides in
// vectors; n / size[k] = (umulhi(n, magic[k]) + n) >> shift[k] for n < 2^31.
struct Runs32 { u32 nd, total; u32 size[MAXD], stride[MAXD], magic[MAXD], shift[MAXD]; };
struct Runs64 { u64 nd, total; u64 size[MAXD], stride[MAXD]; };
struct Tile {
  u64 n_p, n_l, in_l, out_p, tiles_p, tiles_l, tiles, nrest;
  u64 rest_size[6], rest_in[6], rest_out[6];
};

__device__ __forceinline__ u32 fdiv(u32 n, u32 m, u32 s) { return (__umulhi(n, m) + n) >> s; }

template <int ND>
__device__ __forceinline__ u32 offset32(u32 i, const Runs32& p) {
  u32 off = 0;
  if (ND > 0) {
#pragma unroll
    for (int k = ND - 1; k > 0; --k) {
      const u32 q = fdiv(i, p.magic[k], p.shift[k]);
      off += (i - q * p.size[k]) * p.stride[k];
      i = q;
    }
  } else {
    for (int k = (int)p.nd - 1; k > 0; --k) {
      const u32 q = fdiv(i, p.magic[k], p.shift[k]);
      off += (i - q * p.size[k]) * p.stride[k];
      i = q;
    }
  }
  return off + i * p.stride[0];
}

template <typename V, int ND>
__device__ __forceinline__ void runs32(const V* __restrict__ src, V* __restrict__ dst, const Runs32& p) {
  const u32 per_block = blockDim.x * UNROLL;
  for (u32 base = blockIdx.x * per_block + threadIdx.x; base < p.total; base += gridDim.x * per_block) {
    V v[UNROLL];
#pragma unroll
    for (int j = 0; j < UNROLL; ++j) {
      const u32 i = base + j * blockDim.x;
      if (i < p.total) v[j] = src[offset32<ND>(i, p)];
    }
#pragma unroll
    for (int j = 0; j < UNROLL; ++j) {
      const u32 i = base + j * blockDim.x;
      if (i < p.total) dst[i] = v[j];
    }
  }
}

template <typename V>
__device__ __forceinline__ void runs64(const V* __restrict__ src, V* __restrict__ dst, const Runs64& p) {
  for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < p.total; i += (u64)gridDim.x * blockDim.x) {
    u64 r = i, off = 0;
    for (int k = (int)p.nd - 1; k > 0; --k) {
      const u64 q = r / p.size[k];
      off += (r - q * p.size[k]) * p.stride[k];
      r = q;
    }
    dst[i] = src[off + r * p.stride[0]];
  }
}

// The input-contiguous dim p and the output's last dim l in 32x32 tiles.
template <typename T>
__device__ __forceinline__ void tiled(const T* __restrict__ src, T* __restrict__ dst, const Tile& p) {
  __shared__ T tile[32][33];
  for (u64 t = blockIdx.x; t < p.tiles; t += gridDim.x) {
    const u64 tl = t % p.tiles_l;
    u64 r = t / p.tiles_l;
    const u64 tp = r % p.tiles_p;
    r /= p.tiles_p;
    u64 in_off = 0, out_off = 0;
    for (int k = (int)p.nrest - 1; k >= 0; --k) {
      const u64 c = r % p.rest_size[k];
      r /= p.rest_size[k];
      in_off += c * p.rest_in[k];
      out_off += c * p.rest_out[k];
    }
    const u64 i0 = tp * 32, j0 = tl * 32;
    for (u32 y = threadIdx.y; y < 32; y += blockDim.y) {
      const u64 i = i0 + threadIdx.x, j = j0 + y;
      if (i < p.n_p && j < p.n_l) tile[y][threadIdx.x] = src[in_off + i + j * p.in_l];
    }
    __syncthreads();
    for (u32 y = threadIdx.y; y < 32; y += blockDim.y) {
      const u64 i = i0 + y, j = j0 + threadIdx.x;
      if (i < p.n_p && j < p.n_l) dst[out_off + i * p.out_p + j] = tile[threadIdx.x][y];
    }
    __syncthreads();
  }
}

#define RUNS(W, V) \
  extern "C" __global__ void __launch_bounds__(256) permute_runs_##W##_3(const V* s, V* d, Runs32 p) { runs32<V, 3>(s, d, p); } \
  extern "C" __global__ void __launch_bounds__(256) permute_runs_##W##_4(const V* s, V* d, Runs32 p) { runs32<V, 4>(s, d, p); } \
  extern "C" __global__ void __launch_bounds__(256) permute_runs_##W##_5(const V* s, V* d, Runs32 p) { runs32<V, 5>(s, d, p); } \
  extern "C" __global__ void __launch_bounds__(256) permute_runs_##W##_n(const V* s, V* d, Runs32 p) { runs32<V, 0>(s, d, p); } \
  extern "C" __global__ void permute_runs64_##W(const V* s, V* d, Runs64 p) { runs64<V>(s, d, p); }
RUNS(1, unsigned char)
RUNS(2, unsigned short)
RUNS(4, u32)
RUNS(8, V8)
RUNS(16, V16)
#define TILED(E, T) \
  extern "C" __global__ void __launch_bounds__(256) permute_tiled_##E(const T* s, T* d, Tile p) { tiled<T>(s, d, p); }
TILED(1, unsigned char)
TILED(2, unsigned short)
TILED(4, u32)
TILED(8, u64)
"#;

/// Gather-kernel parameters for 32-bit indexing (`struct Runs32`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Runs32 {
    nd: u32,
    total: u32,
    size: [u32; MAX_DIMS],
    stride: [u32; MAX_DIMS],
    magic: [u32; MAX_DIMS],
    shift: [u32; MAX_DIMS],
}

/// Gather-kernel parameters for 64-bit indexing (`struct Runs64`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Runs64 {
    nd: u64,
    total: u64,
    size: [u64; MAX_DIMS],
    stride: [u64; MAX_DIMS],
}

/// Transpose-kernel parameters (`struct Tile`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tile {
    n_p: u64,
    n_l: u64,
    in_l: u64,
    out_p: u64,
    tiles_p: u64,
    tiles_l: u64,
    tiles: u64,
    nrest: u64,
    rest_size: [u64; MAX_REST],
    rest_in: [u64; MAX_REST],
    rest_out: [u64; MAX_REST],
}

// SAFETY: plain `repr(C)` integers matching the C structs of KERNEL_SRC
// field for field (4-byte fields then 8-byte fields, no padding, no pointers).
unsafe impl DeviceRepr for Runs32 {}
// SAFETY: as above, all 8-byte fields.
unsafe impl DeviceRepr for Runs64 {}
// SAFETY: as above, all 8-byte fields.
unsafe impl DeviceRepr for Tile {}

/// The multiply-shift pair with `n / d == (umulhi(n, m) + n) >> s` for every
/// `n < 2^31` (the method of PyTorch's `IntDivider`).
pub fn magic(d: u32) -> (u32, u32) {
    assert!(d >= 1, "division by zero in a permute plan");
    let mut s = 0u32;
    while s < 32 && (1u64 << s) < u64::from(d) {
        s += 1;
    }
    let m = ((1u64 << 32) * ((1u64 << s) - u64::from(d))) / u64::from(d) + 1;
    (u32::try_from(m).unwrap_or(u32::MAX), s)
}

/// The device division: `(umulhi(n, m) + n) >> s`.
pub fn fdiv(n: u32, m: u32, s: u32) -> u32 {
    let hi = ((u64::from(n) * u64::from(m)) >> 32) as u32;
    ((u64::from(hi) + u64::from(n)) >> s) as u32
}

/// How one plan runs on the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launch {
    /// A plain copy of this many bytes.
    Copy(usize),
    /// The gather kernel on `width`-byte vectors, 32-bit indices.
    Runs32 {
        /// Vector width in bytes.
        width: usize,
        /// Parameters.
        params: Runs32,
    },
    /// The gather kernel on `width`-byte vectors, 64-bit indices.
    Runs64 {
        /// Vector width in bytes.
        width: usize,
        /// Parameters.
        params: Runs64,
    },
    /// The tiled transpose on `elem`-byte elements.
    Tiled {
        /// Element size in bytes.
        elem: usize,
        /// Parameters.
        params: Tile,
    },
}

impl Launch {
    /// How to run `plan` between buffers at byte addresses `src` and `dst`
    /// (their alignment bounds the vector width). `None` when the plan has
    /// more dimensions than the kernels take, or an address is not aligned
    /// to the element size (the caller goes through the host).
    pub fn prepare(plan: &PermutePlan, src: u64, dst: u64) -> Option<Launch> {
        let es = plan.elem_size;
        if plan.numel == 0 || plan.is_identity() {
            return Some(Launch::Copy(plan.numel * es));
        }
        let dims = &plan.dims;
        let nd = dims.len();
        let &(run, last_stride) = dims.last()?;
        if last_stride != 1 {
            return Self::tiled(plan);
        }
        if nd > MAX_DIMS {
            return None;
        }
        let width = WIDTHS.iter().rev().copied().find(|&w| {
            w >= es
                && (run * es).is_multiple_of(w)
                && dims[..nd - 1]
                    .iter()
                    .all(|&(_, s)| (s * es).is_multiple_of(w))
                && src.is_multiple_of(w as u64)
                && dst.is_multiple_of(w as u64)
        })?;
        let mut size = [1u64; MAX_DIMS];
        let mut stride = [0u64; MAX_DIMS];
        for (k, &(n, s)) in dims.iter().enumerate() {
            size[k] = n as u64;
            stride[k] = (s * es / width) as u64;
        }
        size[nd - 1] = (run * es / width) as u64;
        stride[nd - 1] = 1;
        let total = (plan.numel * es / width) as u64;
        let fits = total < LIMIT32
            && size[..nd]
                .iter()
                .zip(&stride[..nd])
                .all(|(&n, &s)| n.saturating_mul(s.max(1)) < LIMIT32);
        if fits {
            let mut p = Runs32 {
                nd: nd as u32,
                total: total as u32,
                ..Default::default()
            };
            for k in 0..nd {
                p.size[k] = size[k] as u32;
                p.stride[k] = stride[k] as u32;
                (p.magic[k], p.shift[k]) = magic(p.size[k]);
            }
            Some(Launch::Runs32 { width, params: p })
        } else {
            Some(Launch::Runs64 {
                width,
                params: Runs64 {
                    nd: nd as u64,
                    total,
                    size,
                    stride,
                },
            })
        }
    }

    fn tiled(plan: &PermutePlan) -> Option<Launch> {
        let dims = &plan.dims;
        let nd = dims.len();
        let l = nd - 1;
        let p = dims.iter().position(|&(_, s)| s == 1)?;
        if nd - 2 > MAX_REST || !TILED_SIZES.contains(&plan.elem_size) {
            return None;
        }
        // Output strides (elements).
        let mut out = vec![0u64; nd];
        let mut s = 1u64;
        for k in (0..nd).rev() {
            out[k] = s;
            s *= dims[k].0 as u64;
        }
        let (n_p, n_l) = (dims[p].0 as u64, dims[l].0 as u64);
        let mut t = Tile {
            n_p,
            n_l,
            in_l: dims[l].1 as u64,
            out_p: out[p],
            tiles_p: n_p.div_ceil(32),
            tiles_l: n_l.div_ceil(32),
            ..Default::default()
        };
        let mut rest = 1u64;
        for k in (0..nd).filter(|&k| k != p && k != l) {
            let i = t.nrest as usize;
            t.rest_size[i] = dims[k].0 as u64;
            t.rest_in[i] = dims[k].1 as u64;
            t.rest_out[i] = out[k];
            t.nrest += 1;
            rest *= dims[k].0 as u64;
        }
        t.tiles = rest * t.tiles_p * t.tiles_l;
        Some(Launch::Tiled {
            elem: plan.elem_size,
            params: t,
        })
    }

    /// The kernel's name (`None` for a plain copy).
    pub fn kernel_name(&self) -> Option<String> {
        match self {
            Launch::Copy(_) => None,
            Launch::Runs32 { width, params } => Some(match params.nd {
                n @ 3..=5 => format!("permute_runs_{width}_{n}"),
                _ => format!("permute_runs_{width}_n"),
            }),
            Launch::Runs64 { width, .. } => Some(format!("permute_runs64_{width}")),
            Launch::Tiled { elem, .. } => Some(format!("permute_tiled_{elem}")),
        }
    }

    /// Grid and block sizes.
    fn config(&self) -> LaunchConfig {
        let (grid, block) = match self {
            Launch::Copy(_) => (1, (1, 1, 1)),
            Launch::Runs32 { params, .. } => (
                u64::from(params.total).div_ceil(u64::from(THREADS * UNROLL)),
                (THREADS, 1, 1),
            ),
            Launch::Runs64 { params, .. } => (
                params.total.div_ceil(u64::from(THREADS)).min(1 << 20),
                (THREADS, 1, 1),
            ),
            Launch::Tiled { params, .. } => (params.tiles.min(1 << 20), (32, 8, 1)),
        };
        LaunchConfig {
            grid_dim: (grid.clamp(1, u64::from(u32::MAX >> 1)) as u32, 1, 1),
            block_dim: block,
            shared_mem_bytes: 0,
        }
    }

    /// Runs the kernels' index arithmetic on the host (for tests): `dst`
    /// and `src` hold the plan's bytes.
    pub fn emulate(&self, dst: &mut [u8], src: &[u8]) {
        assert_eq!(dst.len(), src.len(), "permute buffers differ in length");
        match self {
            Launch::Copy(n) => dst[..*n].copy_from_slice(&src[..*n]),
            Launch::Runs32 {
                width: w,
                params: p,
            } => {
                let nd = p.nd as usize;
                for i in 0..p.total {
                    let (mut r, mut off) = (i, 0u32);
                    for k in (1..nd).rev() {
                        let q = fdiv(r, p.magic[k], p.shift[k]);
                        off += (r - q * p.size[k]) * p.stride[k];
                        r = q;
                    }
                    let off = (off + r * p.stride[0]) as usize * w;
                    let i = i as usize * w;
                    dst[i..i + w].copy_from_slice(&src[off..off + w]);
                }
            }
            Launch::Runs64 {
                width: w,
                params: p,
            } => {
                let nd = p.nd as usize;
                for i in 0..p.total {
                    let (mut r, mut off) = (i, 0u64);
                    for k in (1..nd).rev() {
                        let q = r / p.size[k];
                        off += (r - q * p.size[k]) * p.stride[k];
                        r = q;
                    }
                    let off = (off + r * p.stride[0]) as usize * w;
                    let i = i as usize * w;
                    dst[i..i + w].copy_from_slice(&src[off..off + w]);
                }
            }
            Launch::Tiled { elem: e, params: p } => {
                for t in 0..p.tiles {
                    let tl = t % p.tiles_l;
                    let mut r = t / p.tiles_l;
                    let tp = r % p.tiles_p;
                    r /= p.tiles_p;
                    let (mut in_off, mut out_off) = (0u64, 0u64);
                    for k in (0..p.nrest as usize).rev() {
                        let c = r % p.rest_size[k];
                        r /= p.rest_size[k];
                        in_off += c * p.rest_in[k];
                        out_off += c * p.rest_out[k];
                    }
                    for y in 0..32u64 {
                        for x in 0..32u64 {
                            let (i, j) = (tp * 32 + x, tl * 32 + y);
                            if i < p.n_p && j < p.n_l {
                                let s = (in_off + i + j * p.in_l) as usize * e;
                                let d = (out_off + i * p.out_p + j) as usize * e;
                                dst[d..d + e].copy_from_slice(&src[s..s + e]);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Enqueues the permute on `stream`.
    ///
    /// # Safety
    /// `src` and `dst` are device addresses of the plan's bytes (the ones
    /// passed to [`prepare`](Self::prepare)), not overlapping, valid and
    /// ordered on `stream` until the work completes.
    pub unsafe fn launch(
        &self,
        kernels: &Kernels,
        stream: &CudaStream,
        src: u64,
        dst: u64,
    ) -> Result<()> {
        let f = match self {
            Launch::Copy(0) => return Ok(()),
            Launch::Copy(n) => {
                // SAFETY: both ranges hold `n` bytes (caller), ordered on `stream`.
                return unsafe {
                    cudarc::driver::result::memcpy_dtod_async(dst, src, *n, stream.cu_stream())
                }
                .map_err(|e| cuda_err("permute copy", e));
            }
            _ => kernels.function(self)?,
        };
        let mut b = stream.launch_builder(f);
        b.arg(&src).arg(&dst);
        match self {
            Launch::Runs32 { params, .. } => b.arg(params),
            Launch::Runs64 { params, .. } => b.arg(params),
            Launch::Tiled { params, .. } => b.arg(params),
            Launch::Copy(_) => &mut b,
        };
        // SAFETY: the kernel reads only inside the plan's source bytes (its
        // offsets are a permutation of them) and writes each destination
        // vector once; addresses are aligned to the vector width (checked by
        // `prepare`); validity and ordering are the caller's.
        unsafe { b.launch(self.config()) }.map_err(|e| cuda_err("permute kernel launch", e))?;
        Ok(())
    }
}

/// Every kernel entry point of [`KERNEL_SRC`].
pub fn entry_point_names() -> Vec<String> {
    let mut v = Vec::new();
    for w in WIDTHS {
        for n in ["3", "4", "5", "n"] {
            v.push(format!("permute_runs_{w}_{n}"));
        }
        v.push(format!("permute_runs64_{w}"));
    }
    for e in TILED_SIZES {
        v.push(format!("permute_tiled_{e}"));
    }
    v
}

/// The names NVRTC is looked for under (cudarc's loader tries its own list
/// and reports what it cannot find).
const NVRTC_NAMES: [&str; 5] = [
    "libnvrtc.so",
    "libnvrtc.so.13",
    "libnvrtc.so.12",
    "libnvrtc.so.11.2",
    "libnvrtc.so.11",
];

/// Compiles [`KERNEL_SRC`] to PTX with NVRTC (no GPU needed), for `arch`
/// (`compute_90`; `None`: NVRTC's default).
pub fn compile_ptx(arch: Option<&str>) -> Result<String> {
    if !crate::cuda::lib_present(&NVRTC_NAMES) {
        return Err(CommError::unavailable(
            "nvrtc",
            "libnvrtc was not found (install the CUDA toolkit's NVRTC or the \
             nvidia-cuda-nvrtc wheel and add its lib directory to LD_LIBRARY_PATH)",
        ));
    }
    let mut opts = cudarc::nvrtc::CompileOptions::default();
    if let Some(a) = arch {
        opts.options.push(format!("--gpu-architecture={a}"));
    }
    let ptx = guarded("nvrtcCompileProgram", || {
        cudarc::nvrtc::compile_ptx_with_opts(KERNEL_SRC, opts)
    })?
    .map_err(|e| CommError::Cuda(format!("compiling the permute kernels: {e:?}")))?;
    Ok(ptx.to_src())
}

/// The `.entry` names of a PTX module.
pub fn ptx_entry_points(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let rest = l
                .strip_prefix(".visible .entry ")
                .or_else(|| l.strip_prefix(".entry "))?;
            Some(rest.split(['(', ' ']).next().unwrap_or(rest).to_string())
        })
        .collect()
}

/// The compiled permute kernels of one device.
#[derive(Debug)]
pub struct Kernels {
    functions: Vec<(String, CudaFunction)>,
}

impl Kernels {
    /// Compiles (for the device's architecture, or NVRTC's default when
    /// that fails) and loads every kernel; `Err(reason)` when NVRTC is
    /// missing or anything fails.
    pub(crate) fn load(ctx: &Arc<CudaContext>) -> std::result::Result<Kernels, String> {
        let arch = ctx
            .compute_capability()
            .ok()
            .map(|(a, b)| format!("compute_{a}{b}"));
        let ptx = match compile_ptx(arch.as_deref()) {
            Ok(p) => p,
            Err(CommError::BackendUnavailable { reason, .. }) => return Err(reason),
            Err(_) => compile_ptx(None).map_err(|e| e.to_string())?,
        };
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
            .map_err(|e| format!("loading the permute kernels: {e:?}"))?;
        let mut functions = Vec::new();
        for name in entry_point_names() {
            let f = module
                .load_function(&name)
                .map_err(|e| format!("{name}: {e:?}"))?;
            functions.push((name, f));
        }
        Ok(Kernels { functions })
    }

    fn function(&self, launch: &Launch) -> Result<&CudaFunction> {
        let name = launch.kernel_name().unwrap_or_default();
        self.functions
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, f)| f)
            .ok_or_else(|| CommError::State(format!("no permute kernel `{name}`")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_division_is_exact() {
        let divisors = (1..=300u32)
            .chain([511, 512, 513, 1000, 4095, 65_535, 65_536, 1 << 20, 999_983])
            .chain([(1 << 30) + 7, (1 << 31) - 1]);
        for d in divisors {
            let (m, s) = magic(d);
            let mut n = 0u32;
            // Dense near 0, then geometric steps up to 2^31.
            while n < (1 << 31) {
                assert_eq!(fdiv(n, m, s), n / d, "{n} / {d}");
                let near = (n / d).saturating_mul(d);
                for k in [near.saturating_sub(1), near, near + d - 1, near + d] {
                    if k < (1 << 31) {
                        assert_eq!(fdiv(k, m, s), k / d, "{k} / {d}");
                    }
                }
                n = if n < 4096 { n + 1 } else { n + n / 7 + 1 };
            }
            assert_eq!(fdiv((1 << 31) - 1, m, s), ((1u32 << 31) - 1) / d);
        }
    }

    fn bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 131 + i / 251) as u8).collect()
    }

    /// The patterns of all_gather(dim) and all_to_all_4D plus general
    /// permutations and transposes; every dtype size.
    const CASES: [(&[usize], &[usize]); 16] = [
        (&[4, 6, 10], &[1, 0, 2]),
        (&[4, 1, 60], &[1, 0, 2]),
        (&[2, 8, 4, 3, 64], &[2, 0, 1, 3, 4]),
        (&[4, 2, 8, 3, 64], &[1, 0, 2, 3, 4]),
        (&[2, 4, 8, 3, 64], &[1, 0, 2, 3, 4]),
        (&[4, 2, 8, 3, 64], &[1, 2, 0, 3, 4]),
        (&[3, 5, 7, 2, 3, 2], &[5, 3, 1, 0, 2, 4]),
        (&[9, 13], &[1, 0]),
        (&[33, 65, 3], &[2, 1, 0]),
        (&[2, 3, 4, 5, 6, 7, 2, 3, 2], &[8, 6, 4, 2, 0, 1, 3, 5, 7]),
        (
            &[2, 2, 2, 2, 2, 2, 2, 2, 2, 3],
            &[1, 0, 3, 2, 5, 4, 7, 6, 8, 9],
        ),
        (&[5, 1, 1, 7], &[3, 1, 2, 0]),
        (&[2, 3, 4, 5, 6, 3], &[4, 2, 0, 3, 1, 5]),
        (&[2, 3, 4, 5, 6, 8], &[4, 2, 0, 3, 1, 5]),
        (&[2, 3, 4, 5, 6], &[3, 1, 0, 2, 4]),
        (&[2, 3, 4, 5], &[2, 1, 0, 3]),
    ];

    #[test]
    fn emulated_kernels_match_the_host_plan() {
        let mut kinds = std::collections::BTreeSet::new();
        for es in [1usize, 2, 4, 8] {
            for (view, perm) in CASES {
                let plan = PermutePlan::new(view, perm, es).unwrap();
                let n = plan.numel * es;
                let src = bytes(n);
                let mut want = vec![0u8; n];
                plan.run_host(&mut want, &src);
                // Aligned buffers, then misaligned ones (narrower vectors).
                let e = es as u64;
                for (sa, da) in [(0u64, 0u64), (e, 2 * e), (4 * e, 0)] {
                    let Some(l) = Launch::prepare(&plan, sa, da) else {
                        assert!(plan.dims.len() > MAX_DIMS || plan.dims.len() - 2 > MAX_REST);
                        continue;
                    };
                    if let Launch::Runs32 { width, .. } | Launch::Runs64 { width, .. } = &l {
                        assert_eq!(sa % *width as u64, 0);
                        assert_eq!(da % *width as u64, 0);
                    }
                    kinds.insert(l.kernel_name().unwrap_or_else(|| "copy".into()));
                    let mut got = vec![0u8; n];
                    l.emulate(&mut got, &src);
                    assert_eq!(
                        got, want,
                        "es {es} view {view:?} perm {perm:?} align {sa}/{da}"
                    );
                }
            }
        }
        let names = entry_point_names();
        for k in &kinds {
            assert!(
                k == "copy" || names.contains(k),
                "{k} is not an entry point"
            );
        }
        // The cases reach the specialised, generic and tiled kernels.
        for want in [
            "permute_runs_16_3",
            "permute_runs_4_3",
            "permute_runs_8_4",
            "permute_runs_16_5",
            "permute_runs_2_n",
            "permute_runs_16_n",
            "permute_tiled_8",
        ] {
            assert!(kinds.contains(want), "{want} not exercised: {kinds:?}");
        }
    }

    #[test]
    fn collective_patterns_get_wide_vectors() {
        // all_to_all_4D, bf16 [B=2, S/P=8, P=4, H/P=16, D=64]: 128-byte runs.
        let plan = PermutePlan::new(&[2, 8, 4, 16, 64], &[2, 0, 1, 3, 4], 2).unwrap();
        match Launch::prepare(&plan, 0, 0).unwrap() {
            Launch::Runs32 { width, params } => {
                assert_eq!(width, 16);
                assert_eq!(params.nd, 3);
                assert_eq!(params.size[..3], [4, 16, 128]);
            }
            other => panic!("{other:?}"),
        }
        // Addresses not aligned to the element go through the host.
        assert_eq!(Launch::prepare(&plan, 1, 0), None);
        // Identity is a copy.
        let plan = PermutePlan::new(&[3, 4], &[0, 1], 4).unwrap();
        assert_eq!(Launch::prepare(&plan, 0, 0), Some(Launch::Copy(48)));
        // Large plans switch to 64-bit indices.
        let plan = PermutePlan::new(&[1 << 20, 1 << 12], &[1, 0], 1).unwrap();
        assert!(matches!(
            Launch::prepare(&plan, 0, 0),
            Some(Launch::Tiled { .. })
        ));
        let plan = PermutePlan::new(&[4, 1 << 30, 16], &[1, 0, 2], 2).unwrap();
        assert!(matches!(
            Launch::prepare(&plan, 0, 0),
            Some(Launch::Runs64 { width: 16, .. })
        ));
    }

    #[test]
    fn ptx_entry_points_are_parsed() {
        let ptx = ".version 8.0\n.visible .entry permute_runs_16_3(\n\t.param .u64 a\n)\n.entry permute_tiled_8(\n";
        assert_eq!(
            ptx_entry_points(ptx),
            ["permute_runs_16_3", "permute_tiled_8"]
        );
        assert_eq!(entry_point_names().len(), 29);
    }
}
