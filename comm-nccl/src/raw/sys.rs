//! NCCL's C types and its symbol table: what `nccl.h` declares, and nothing
//! else. No function here calls into NCCL; [`super::result`] does.

use std::ffi::{c_char, c_int, c_void};

use comm_core::{DType, ReduceOp};

/// `ncclResult_t`.
pub type NcclResultCode = c_int;
/// `ncclComm_t`: an opaque pointer owned by NCCL.
pub type NcclCommHandle = *mut c_void;
/// `cudaStream_t` / `CUstream`.
pub type CudaStreamHandle = *mut c_void;

/// `ncclSuccess`.
pub const NCCL_SUCCESS: NcclResultCode = 0;
/// `ncclInProgress`: a non-blocking call has not finished yet.
pub const NCCL_IN_PROGRESS: NcclResultCode = 7;

/// The symbolic name of an `ncclResult_t`.
pub fn result_name(code: NcclResultCode) -> &'static str {
    match code {
        0 => "ncclSuccess",
        1 => "ncclUnhandledCudaError",
        2 => "ncclSystemError",
        3 => "ncclInternalError",
        4 => "ncclInvalidArgument",
        5 => "ncclInvalidUsage",
        6 => "ncclRemoteError",
        7 => "ncclInProgress",
        _ => "ncclUnknownResult",
    }
}

/// `ncclDataType_t` (NCCL's numbering).
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum NcclDataType {
    Int8 = 0,
    Uint8 = 1,
    Int32 = 2,
    Uint32 = 3,
    Int64 = 4,
    Uint64 = 5,
    Float16 = 6,
    Float32 = 7,
    Float64 = 8,
    Bfloat16 = 9,
}

impl From<DType> for NcclDataType {
    fn from(d: DType) -> Self {
        match d {
            DType::I8 => NcclDataType::Int8,
            DType::U8 => NcclDataType::Uint8,
            DType::I32 => NcclDataType::Int32,
            DType::I64 => NcclDataType::Int64,
            DType::F16 => NcclDataType::Float16,
            DType::F32 => NcclDataType::Float32,
            DType::F64 => NcclDataType::Float64,
            DType::BF16 => NcclDataType::Bfloat16,
        }
    }
}

/// `ncclRedOp_t` (NCCL's numbering: note max = 2, min = 3).
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum NcclRedOp {
    Sum = 0,
    Prod = 1,
    Max = 2,
    Min = 3,
    Avg = 4,
}

impl From<ReduceOp> for NcclRedOp {
    fn from(op: ReduceOp) -> Self {
        match op {
            ReduceOp::Sum => NcclRedOp::Sum,
            ReduceOp::Prod => NcclRedOp::Prod,
            ReduceOp::Max => NcclRedOp::Max,
            ReduceOp::Min => NcclRedOp::Min,
            ReduceOp::Avg => NcclRedOp::Avg,
        }
    }
}

/// Size of `ncclUniqueId`.
pub const UNIQUE_ID_BYTES: usize = 128;

/// `ncclUniqueId`: 128 opaque bytes, passed by value to `ncclCommInitRank*`.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclUniqueId {
    /// The bytes, as NCCL wrote them.
    pub internal: [u8; UNIQUE_ID_BYTES],
}

impl NcclUniqueId {
    /// Rebuilds an id from the bytes that travelled over the CPU plane.
    pub fn from_bytes(b: &[u8]) -> comm_core::Result<Self> {
        let internal: [u8; UNIQUE_ID_BYTES] = b.try_into().map_err(|_| {
            comm_core::CommError::Protocol(format!(
                "an NCCL unique id has {UNIQUE_ID_BYTES} bytes, got {}",
                b.len()
            ))
        })?;
        Ok(NcclUniqueId { internal })
    }
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.internal
    }
}

impl std::fmt::Debug for NcclUniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclUniqueId({:02x?}..)", &self.internal[..8])
    }
}

/// `NCCL_CONFIG_UNDEF_INT` (`INT_MIN`): "let NCCL choose".
pub const CONFIG_UNDEF_INT: c_int = c_int::MIN;
/// The magic NCCL checks in a config built by its initializer.
pub const CONFIG_MAGIC: u32 = 0xcafe_beef;

/// `NCCL_VERSION(X, Y, Z)` as NCCL encodes it.
pub const fn version_code(major: u32, minor: u32, patch: u32) -> u32 {
    if major <= 2 && minor <= 8 {
        major * 1000 + minor * 100 + patch
    } else {
        major * 10000 + minor * 100 + patch
    }
}

/// A decoded NCCL version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct NcclVersion {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Patch.
    pub patch: u32,
}

impl NcclVersion {
    /// Decodes `ncclGetVersion`'s integer (both the <= 2.8 and the newer encodings).
    pub fn from_code(code: i32) -> Self {
        let c = code.max(0) as u32;
        if c >= 10000 {
            NcclVersion {
                major: c / 10000,
                minor: (c % 10000) / 100,
                patch: c % 100,
            }
        } else {
            NcclVersion {
                major: c / 1000,
                minor: (c % 1000) / 100,
                patch: c % 100,
            }
        }
    }
}

impl std::fmt::Display for NcclVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Oldest NCCL accepted: the [`NcclConfig`] layout and non-blocking
/// communicators as used here need 2.18.
pub const MIN_VERSION: NcclVersion = NcclVersion {
    major: 2,
    minor: 18,
    patch: 0,
};

/// `ncclConfig_t` in its NCCL 2.18 layout.
///
/// NCCL reads `size` first and copies only that many bytes, and it uses
/// `version` to default fields an older caller did not know; so this prefix
/// of the newer structs is accepted by every NCCL >= 2.18, with every field
/// added later left at NCCL's default.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct NcclConfig {
    /// `sizeof` this struct.
    pub size: usize,
    /// [`CONFIG_MAGIC`].
    pub magic: u32,
    /// The NCCL version whose layout this is (2.18.0).
    pub version: u32,
    /// 1 blocking, 0 non-blocking.
    pub blocking: c_int,
    /// CGA cluster size.
    pub cga_cluster_size: c_int,
    /// Minimum CTAs.
    pub min_ctas: c_int,
    /// Maximum CTAs.
    pub max_ctas: c_int,
    /// Network name (NULL: default).
    pub net_name: *const c_char,
    /// Share resources with the parent on split.
    pub split_share: c_int,
}

impl NcclConfig {
    /// What `NCCL_CONFIG_INITIALIZER` produces for this layout: every
    /// tunable undefined.
    pub fn initializer() -> Self {
        NcclConfig {
            size: std::mem::size_of::<NcclConfig>(),
            magic: CONFIG_MAGIC,
            version: version_code(MIN_VERSION.major, MIN_VERSION.minor, MIN_VERSION.patch),
            blocking: CONFIG_UNDEF_INT,
            cga_cluster_size: CONFIG_UNDEF_INT,
            min_ctas: CONFIG_UNDEF_INT,
            max_ctas: CONFIG_UNDEF_INT,
            net_name: std::ptr::null(),
            split_share: CONFIG_UNDEF_INT,
        }
    }
    /// The initializer with `blocking = 0`: init and collectives may return
    /// `ncclInProgress`, progress is polled with `ncclCommGetAsyncError`, and
    /// `ncclCommAbort` from another thread unblocks everything.
    pub fn non_blocking() -> Self {
        NcclConfig {
            blocking: 0,
            ..Self::initializer()
        }
    }
}

/// `ncclGetVersion`.
pub type FnGetVersion = unsafe extern "C" fn(*mut c_int) -> NcclResultCode;
/// `ncclGetErrorString`.
pub type FnGetErrorString = unsafe extern "C" fn(NcclResultCode) -> *const c_char;
/// `ncclGetLastError`.
pub type FnGetLastError = unsafe extern "C" fn(NcclCommHandle) -> *const c_char;
/// `ncclGetUniqueId`.
pub type FnGetUniqueId = unsafe extern "C" fn(*mut NcclUniqueId) -> NcclResultCode;
/// `ncclCommInitRankConfig`.
pub type FnCommInitRankConfig = unsafe extern "C" fn(
    *mut NcclCommHandle,
    c_int,
    NcclUniqueId,
    c_int,
    *mut NcclConfig,
) -> NcclResultCode;
/// `ncclCommFinalize`, `ncclCommDestroy`, `ncclCommAbort`.
pub type FnComm = unsafe extern "C" fn(NcclCommHandle) -> NcclResultCode;
/// `ncclCommGetAsyncError`.
pub type FnCommGetAsyncError =
    unsafe extern "C" fn(NcclCommHandle, *mut NcclResultCode) -> NcclResultCode;
/// `ncclAllReduce`, `ncclReduceScatter`.
pub type FnReduce = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    NcclDataType,
    NcclRedOp,
    NcclCommHandle,
    CudaStreamHandle,
) -> NcclResultCode;
/// `ncclAllGather`.
pub type FnAllGather = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    NcclDataType,
    NcclCommHandle,
    CudaStreamHandle,
) -> NcclResultCode;
/// `ncclBroadcast`.
pub type FnBroadcast = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    NcclDataType,
    c_int,
    NcclCommHandle,
    CudaStreamHandle,
) -> NcclResultCode;
/// `ncclSend`.
pub type FnSend = unsafe extern "C" fn(
    *const c_void,
    usize,
    NcclDataType,
    c_int,
    NcclCommHandle,
    CudaStreamHandle,
) -> NcclResultCode;
/// `ncclRecv`.
pub type FnRecv = unsafe extern "C" fn(
    *mut c_void,
    usize,
    NcclDataType,
    c_int,
    NcclCommHandle,
    CudaStreamHandle,
) -> NcclResultCode;
/// `ncclGroupStart`, `ncclGroupEnd`.
pub type FnGroup = unsafe extern "C" fn() -> NcclResultCode;

/// The resolved symbol table. The function pointers stay valid while the
/// owning [`NcclLibrary`](super::NcclLibrary) (which holds the `dlopen`
/// handle) lives.
#[derive(Debug, Clone, Copy)]
#[allow(missing_docs)]
pub struct NcclApi {
    pub get_version: FnGetVersion,
    pub get_error_string: FnGetErrorString,
    pub get_last_error: FnGetLastError,
    pub get_unique_id: FnGetUniqueId,
    pub comm_init_rank_config: FnCommInitRankConfig,
    pub comm_finalize: FnComm,
    pub comm_destroy: FnComm,
    pub comm_abort: FnComm,
    pub comm_get_async_error: FnCommGetAsyncError,
    pub all_reduce: FnReduce,
    pub all_gather: FnAllGather,
    pub reduce_scatter: FnReduce,
    pub broadcast: FnBroadcast,
    pub send: FnSend,
    pub recv: FnRecv,
    pub group_start: FnGroup,
    pub group_end: FnGroup,
}

impl NcclApi {
    /// Resolves every symbol from `lib`; `Err(name, why)` for the first one
    /// missing.
    ///
    /// # Safety
    /// `lib` must be an NCCL library: each symbol is taken to have the C
    /// signature `nccl.h` gives it.
    pub unsafe fn resolve(lib: &libloading::Library) -> Result<NcclApi, (&'static str, String)> {
        fn sym<T: Copy>(
            lib: &libloading::Library,
            name: &'static str,
        ) -> Result<T, (&'static str, String)> {
            // SAFETY: the caller guarantees `lib` is NCCL, whose symbol `name`
            // has the C signature `T` describes.
            unsafe { lib.get::<T>(name.as_bytes()) }
                .map(|s| *s)
                .map_err(|e| (name, e.to_string()))
        }
        Ok(NcclApi {
            get_version: sym(lib, "ncclGetVersion")?,
            get_error_string: sym(lib, "ncclGetErrorString")?,
            get_last_error: sym(lib, "ncclGetLastError")?,
            get_unique_id: sym(lib, "ncclGetUniqueId")?,
            comm_init_rank_config: sym(lib, "ncclCommInitRankConfig")?,
            comm_finalize: sym(lib, "ncclCommFinalize")?,
            comm_destroy: sym(lib, "ncclCommDestroy")?,
            comm_abort: sym(lib, "ncclCommAbort")?,
            comm_get_async_error: sym(lib, "ncclCommGetAsyncError")?,
            all_reduce: sym(lib, "ncclAllReduce")?,
            all_gather: sym(lib, "ncclAllGather")?,
            reduce_scatter: sym(lib, "ncclReduceScatter")?,
            broadcast: sym(lib, "ncclBroadcast")?,
            send: sym(lib, "ncclSend")?,
            recv: sym(lib, "ncclRecv")?,
            group_start: sym(lib, "ncclGroupStart")?,
            group_end: sym(lib, "ncclGroupEnd")?,
        })
    }
}
