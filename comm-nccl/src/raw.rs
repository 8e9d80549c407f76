//! The raw NCCL layer: `libnccl` opened at run time with `libloading`, its
//! symbols resolved once into a table, and every `ncclResult_t` mapped to a
//! readable [`CommError::Nccl`].
//!
//! Nothing here links against NCCL: a missing library, a missing symbol or a
//! library older than [`MIN_VERSION`] is `Err(BackendUnavailable)`.
//!
//! # Finding the library
//! In order:
//! 1. the path in [`LIBRARY_ENV`] (`DIST_NCCL_LIBRARY`); if unset, the path in
//!    [`LIBRARY_ENV_COMPAT`] (`NCCL_LIBRARY`, the name other tools use);
//! 2. `libnccl.so.2`;
//! 3. `libnccl.so`.
//!
//! When an override is set it is the only candidate: a wrong override is an
//! error, not silently replaced by the system library.

use std::ffi::{c_char, c_int, c_void, CStr, OsStr, OsString};
use std::sync::OnceLock;
use std::time::Duration;

use comm_core::{CommError, DType, Deadline, ReduceOp, Result};

/// Primary override: the full path (or soname) of the NCCL library to load.
pub const LIBRARY_ENV: &str = "DIST_NCCL_LIBRARY";
/// Secondary override, honoured when [`LIBRARY_ENV`] is unset.
pub const LIBRARY_ENV_COMPAT: &str = "NCCL_LIBRARY";
/// Names tried, in order, when no override is set.
pub const DEFAULT_NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];
/// Oldest NCCL accepted: the [`NcclConfig`] layout (with `splitShare`),
/// non-blocking init and `ncclCommSplit` need 2.18.
pub const MIN_VERSION: NcclVersion = NcclVersion {
    major: 2,
    minor: 18,
    patch: 0,
};

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
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let internal: [u8; UNIQUE_ID_BYTES] = b.try_into().map_err(|_| {
            CommError::Protocol(format!(
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
    /// `ncclInProgress`, progress is polled with `ncclCommGetAsyncError`.
    pub fn non_blocking() -> Self {
        NcclConfig {
            blocking: 0,
            ..Self::initializer()
        }
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

type FnGetVersion = unsafe extern "C" fn(*mut c_int) -> NcclResultCode;
type FnGetErrorString = unsafe extern "C" fn(NcclResultCode) -> *const c_char;
type FnGetLastError = unsafe extern "C" fn(NcclCommHandle) -> *const c_char;
type FnGetUniqueId = unsafe extern "C" fn(*mut NcclUniqueId) -> NcclResultCode;
type FnCommInitRank =
    unsafe extern "C" fn(*mut NcclCommHandle, c_int, NcclUniqueId, c_int) -> NcclResultCode;
type FnCommInitRankConfig = unsafe extern "C" fn(
    *mut NcclCommHandle,
    c_int,
    NcclUniqueId,
    c_int,
    *mut NcclConfig,
) -> NcclResultCode;
type FnComm = unsafe extern "C" fn(NcclCommHandle) -> NcclResultCode;
type FnCommGetAsyncError =
    unsafe extern "C" fn(NcclCommHandle, *mut NcclResultCode) -> NcclResultCode;
type FnCommSplit = unsafe extern "C" fn(
    NcclCommHandle,
    c_int,
    c_int,
    *mut NcclCommHandle,
    *mut NcclConfig,
) -> NcclResultCode;
type FnAllReduce = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    NcclDataType,
    NcclRedOp,
    NcclCommHandle,
    CudaStreamHandle,
) -> NcclResultCode;
type FnAllGather = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    NcclDataType,
    NcclCommHandle,
    CudaStreamHandle,
) -> NcclResultCode;
type FnBroadcast = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    NcclDataType,
    c_int,
    NcclCommHandle,
    CudaStreamHandle,
) -> NcclResultCode;
type FnReduce = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    NcclDataType,
    NcclRedOp,
    c_int,
    NcclCommHandle,
    CudaStreamHandle,
) -> NcclResultCode;
type FnSend = unsafe extern "C" fn(
    *const c_void,
    usize,
    NcclDataType,
    c_int,
    NcclCommHandle,
    CudaStreamHandle,
) -> NcclResultCode;
type FnRecv = unsafe extern "C" fn(
    *mut c_void,
    usize,
    NcclDataType,
    c_int,
    NcclCommHandle,
    CudaStreamHandle,
) -> NcclResultCode;
type FnGroup = unsafe extern "C" fn() -> NcclResultCode;

/// The resolved symbol table. The function pointers stay valid while the
/// owning [`NcclLibrary`] (which holds the `dlopen` handle) lives.
#[derive(Debug, Clone, Copy)]
#[allow(missing_docs)]
pub struct NcclApi {
    pub get_version: FnGetVersion,
    pub get_error_string: FnGetErrorString,
    pub get_last_error: FnGetLastError,
    pub get_unique_id: FnGetUniqueId,
    pub comm_init_rank: FnCommInitRank,
    pub comm_init_rank_config: FnCommInitRankConfig,
    pub comm_finalize: FnComm,
    pub comm_destroy: FnComm,
    pub comm_abort: FnComm,
    pub comm_get_async_error: FnCommGetAsyncError,
    /// Optional: absent in builds without it.
    pub comm_split: Option<FnCommSplit>,
    pub all_reduce: FnAllReduce,
    pub all_gather: FnAllGather,
    pub reduce_scatter: FnAllReduce,
    pub broadcast: FnBroadcast,
    pub reduce: FnReduce,
    pub send: FnSend,
    pub recv: FnRecv,
    pub group_start: FnGroup,
    pub group_end: FnGroup,
}

/// An opened NCCL library with its symbol table and version.
#[derive(Debug)]
pub struct NcclLibrary {
    api: NcclApi,
    version: NcclVersion,
    path: OsString,
    // Last: dropped after nothing else can use the pointers above.
    _lib: libloading::Library,
}

fn unavailable(reason: impl Into<String>) -> CommError {
    CommError::unavailable("nccl", reason)
}

impl NcclLibrary {
    /// Opens the library at `path` (a path or a soname for the dynamic
    /// loader), resolves every symbol and checks the version.
    ///
    /// Errors with `BackendUnavailable` when the file cannot be loaded, a
    /// required symbol is missing (named in the message) or the version is
    /// older than [`MIN_VERSION`].
    pub fn open(path: impl AsRef<OsStr>) -> Result<NcclLibrary> {
        let path = path.as_ref();
        // SAFETY: loading a shared library runs its initialisers; NCCL's are
        // sound to run at any time. This is the documented way to use NCCL
        // without linking to it.
        let lib = unsafe { libloading::Library::new(path) }.map_err(|e| {
            unavailable(format!(
                "cannot load {}: {e}. Install NCCL (e.g. the nvidia-nccl-cu12 wheel or the \
                 libnccl2 package), add its directory to LD_LIBRARY_PATH, or point \
                 {LIBRARY_ENV} at libnccl.so.2",
                path.to_string_lossy()
            ))
        })?;
        let api = Self::resolve(&lib, path)?;
        let mut code: c_int = 0;
        // SAFETY: `get_version` has the C signature `ncclResult_t(int*)` and
        // `code` is a valid out pointer.
        let rc = unsafe { (api.get_version)(&mut code) };
        if rc != NCCL_SUCCESS {
            return Err(unavailable(format!(
                "ncclGetVersion in {} failed with {} ({})",
                path.to_string_lossy(),
                rc,
                result_name(rc)
            )));
        }
        let version = NcclVersion::from_code(code);
        if version < MIN_VERSION {
            return Err(unavailable(format!(
                "{} is NCCL {version}, older than the {MIN_VERSION} this backend needs; \
                 install a newer NCCL or point {LIBRARY_ENV} at one",
                path.to_string_lossy()
            )));
        }
        Ok(NcclLibrary {
            api,
            version,
            path: path.to_owned(),
            _lib: lib,
        })
    }

    fn resolve(lib: &libloading::Library, path: &OsStr) -> Result<NcclApi> {
        fn sym<T: Copy>(lib: &libloading::Library, path: &OsStr, name: &str) -> Result<T> {
            // SAFETY: `T` is the function-pointer type matching the C
            // declaration of `name` in nccl.h; the pointer is only used while
            // the library stays loaded (the NcclLibrary owns it).
            unsafe { lib.get::<T>(name.as_bytes()) }
                .map(|s| *s)
                .map_err(|e| {
                    unavailable(format!(
                        "{} lacks the symbol `{name}` ({e}); it is not a usable NCCL >= {MIN_VERSION}",
                        path.to_string_lossy()
                    ))
                })
        }
        Ok(NcclApi {
            get_version: sym(lib, path, "ncclGetVersion")?,
            get_error_string: sym(lib, path, "ncclGetErrorString")?,
            get_last_error: sym(lib, path, "ncclGetLastError")?,
            get_unique_id: sym(lib, path, "ncclGetUniqueId")?,
            comm_init_rank: sym(lib, path, "ncclCommInitRank")?,
            comm_init_rank_config: sym(lib, path, "ncclCommInitRankConfig")?,
            comm_finalize: sym(lib, path, "ncclCommFinalize")?,
            comm_destroy: sym(lib, path, "ncclCommDestroy")?,
            comm_abort: sym(lib, path, "ncclCommAbort")?,
            comm_get_async_error: sym(lib, path, "ncclCommGetAsyncError")?,
            comm_split: sym(lib, path, "ncclCommSplit").ok(),
            all_reduce: sym(lib, path, "ncclAllReduce")?,
            all_gather: sym(lib, path, "ncclAllGather")?,
            reduce_scatter: sym(lib, path, "ncclReduceScatter")?,
            broadcast: sym(lib, path, "ncclBroadcast")?,
            reduce: sym(lib, path, "ncclReduce")?,
            send: sym(lib, path, "ncclSend")?,
            recv: sym(lib, path, "ncclRecv")?,
            group_start: sym(lib, path, "ncclGroupStart")?,
            group_end: sym(lib, path, "ncclGroupEnd")?,
        })
    }

    /// The candidate paths, in the order [`NcclLibrary::load`] tries them.
    pub fn candidates() -> Vec<OsString> {
        for var in [LIBRARY_ENV, LIBRARY_ENV_COMPAT] {
            if let Some(p) = std::env::var_os(var).filter(|p| !p.is_empty()) {
                return vec![p];
            }
        }
        DEFAULT_NAMES.iter().map(OsString::from).collect()
    }

    /// The process-wide library: the first of [`NcclLibrary::candidates`]
    /// that opens, loaded once and cached (the outcome, success or failure,
    /// is cached too).
    pub fn load() -> Result<&'static NcclLibrary> {
        static LIB: OnceLock<std::result::Result<NcclLibrary, String>> = OnceLock::new();
        LIB.get_or_init(|| {
            let mut reasons = Vec::new();
            for c in Self::candidates() {
                match NcclLibrary::open(&c) {
                    Ok(l) => return Ok(l),
                    Err(CommError::BackendUnavailable { reason, .. }) => reasons.push(reason),
                    Err(e) => reasons.push(e.to_string()),
                }
            }
            Err(reasons.join("; "))
        })
        .as_ref()
        .map_err(|r| unavailable(r.clone()))
    }

    /// The symbol table.
    pub fn api(&self) -> &NcclApi {
        &self.api
    }
    /// The library's version.
    pub fn version(&self) -> NcclVersion {
        self.version
    }
    /// The path it was opened from.
    pub fn path(&self) -> &OsStr {
        &self.path
    }

    /// The [`CommError::Nccl`] for `code`: its name, `ncclGetErrorString`
    /// and, where non-empty, `ncclGetLastError`. For errors of a live
    /// communicator prefer [`RawComm::error`].
    pub fn error(&self, code: NcclResultCode, context: &str) -> CommError {
        self.error_with(code, std::ptr::null_mut(), context)
    }

    fn error_with(&self, code: NcclResultCode, comm: NcclCommHandle, context: &str) -> CommError {
        // SAFETY: both functions take plain values (`comm` is NULL or a live
        // communicator) and return NUL-terminated static or thread-local
        // strings, or NULL; they are copied at once.
        let (text, last) = unsafe {
            (
                cstr((self.api.get_error_string)(code)),
                cstr((self.api.get_last_error)(comm)),
            )
        };
        let mut message = format!(
            "{context}: {}",
            text.unwrap_or_else(|| "no description".into())
        );
        if let Some(last) = last.filter(|s| !s.trim().is_empty()) {
            message.push_str("; last error: ");
            message.push_str(last.trim());
        }
        CommError::Nccl {
            code,
            name: result_name(code).to_string(),
            message,
        }
    }

    /// `Ok` for `ncclSuccess`, else [`NcclLibrary::error`].
    pub fn check(&self, code: NcclResultCode, context: &str) -> Result<()> {
        if code == NCCL_SUCCESS {
            Ok(())
        } else {
            Err(self.error(code, context))
        }
    }

    /// `ncclGetUniqueId`: the 128 bytes that rank 0 hands to every member.
    pub fn get_unique_id(&self) -> Result<NcclUniqueId> {
        let mut id = NcclUniqueId {
            internal: [0; UNIQUE_ID_BYTES],
        };
        // SAFETY: `id` is a valid, writable ncclUniqueId.
        let rc = unsafe { (self.api.get_unique_id)(&mut id) };
        self.check(rc, "ncclGetUniqueId")?;
        Ok(id)
    }
}

/// Copies a C string, `None` for NULL.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string valid for this call.
unsafe fn cstr(p: *const c_char) -> Option<String> {
    if p.is_null() {
        None
    } else {
        // SAFETY: guaranteed by the caller.
        Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }
}

/// Spin briefly, then yield, then sleep up to 1 ms: cheap for the common
/// sub-millisecond wait, gentle on the CPU for long ones.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    n: u32,
}

impl Backoff {
    pub(crate) fn snooze(&mut self) {
        self.n = self.n.saturating_add(1);
        if self.n < 64 {
            std::hint::spin_loop();
        } else if self.n < 256 {
            std::thread::yield_now();
        } else {
            let us = (self.n - 255).min(1000) as u64;
            std::thread::sleep(Duration::from_micros(us));
        }
    }
}

/// A raw communicator handle that is aborted, not leaked, when dropped
/// without [`RawComm::shutdown`], and finalized + destroyed by `shutdown`.
///
/// Created by [`RawComm::init`] (non-blocking `ncclCommInitRankConfig` with a
/// deadline). It needs no CUDA of its own beyond what NCCL does, so the
/// lifecycle is exercised in tests against a stub library.
#[derive(Debug)]
pub struct RawComm {
    lib: &'static NcclLibrary,
    handle: NcclCommHandle,
    closed: bool,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls
// are not concurrent; `RawComm` is not `Sync` (raw pointer) and every use goes
// through `&self`/`&mut self` of one owner.
unsafe impl Send for RawComm {}

impl RawComm {
    /// Non-blocking `ncclCommInitRankConfig`, polled until ready or
    /// `deadline`. On timeout or error the half-built communicator is
    /// aborted and the error returned (`Timeout` names the operation).
    ///
    /// The CUDA device the communicator should use must be current on this
    /// thread (NCCL picks the current device).
    pub fn init(
        lib: &'static NcclLibrary,
        id: &NcclUniqueId,
        rank: usize,
        world: usize,
        deadline: &Deadline,
        label: &str,
    ) -> Result<RawComm> {
        let n =
            c_int::try_from(world).map_err(|_| CommError::invalid("world size overflows int"))?;
        let r = c_int::try_from(rank).map_err(|_| CommError::invalid("rank overflows int"))?;
        let mut config = NcclConfig::non_blocking();
        let mut handle: NcclCommHandle = std::ptr::null_mut();
        // SAFETY: `handle` and `config` are valid pointers for the call; the
        // id is passed by value as the C ABI requires.
        let rc = unsafe { (lib.api.comm_init_rank_config)(&mut handle, n, *id, r, &mut config) };
        if rc != NCCL_SUCCESS && rc != NCCL_IN_PROGRESS {
            let err = lib.error_with(rc, handle, &format!("ncclCommInitRankConfig ({label})"));
            if !handle.is_null() {
                // SAFETY: NCCL returned a handle; aborting it is the documented cleanup.
                unsafe { (lib.api.comm_abort)(handle) };
            }
            return Err(err);
        }
        if handle.is_null() {
            return Err(CommError::Nccl {
                code: rc,
                name: result_name(rc).into(),
                message: format!("ncclCommInitRankConfig ({label}) returned no communicator"),
            });
        }
        let mut comm = RawComm {
            lib,
            handle,
            closed: false,
        };
        let op = format!("ncclCommInitRankConfig ({label}, rank {rank} of {world})");
        let missing = || vec![format!("one or more of the {world} members of {label}")];
        if let Err(e) = comm.wait_ready(deadline, &op, &missing) {
            comm.abort();
            return Err(e);
        }
        Ok(comm)
    }

    /// The library.
    pub fn lib(&self) -> &'static NcclLibrary {
        self.lib
    }
    /// The raw handle (null after abort/shutdown).
    pub fn handle(&self) -> NcclCommHandle {
        if self.closed {
            std::ptr::null_mut()
        } else {
            self.handle
        }
    }
    /// The [`CommError::Nccl`] for `code`, with this communicator's last error.
    pub fn error(&self, code: NcclResultCode, context: &str) -> CommError {
        self.lib.error_with(code, self.handle(), context)
    }

    /// `ncclCommGetAsyncError`: the pending state (`ncclSuccess`,
    /// `ncclInProgress` or an error code). `Aborted` once closed.
    pub fn async_state(&self) -> Result<NcclResultCode> {
        if self.closed {
            return Err(CommError::Aborted(
                "the NCCL communicator was aborted or destroyed".into(),
            ));
        }
        let mut state: NcclResultCode = NCCL_SUCCESS;
        // SAFETY: the handle is live (not closed) and `state` a valid out pointer.
        let rc = unsafe { (self.lib.api.comm_get_async_error)(self.handle, &mut state) };
        if rc != NCCL_SUCCESS {
            return Err(self.error(rc, "ncclCommGetAsyncError"));
        }
        Ok(state)
    }

    /// Polls [`RawComm::async_state`] until it leaves `ncclInProgress`, an
    /// error shows up, or `deadline` passes (then `Timeout` naming
    /// `operation` and `missing()`). It does not abort; the caller decides.
    pub fn wait_ready(
        &self,
        deadline: &Deadline,
        operation: &str,
        missing: &dyn Fn() -> Vec<String>,
    ) -> Result<()> {
        let mut backoff = Backoff::default();
        loop {
            match self.async_state()? {
                NCCL_SUCCESS => return Ok(()),
                NCCL_IN_PROGRESS => {}
                code => return Err(self.error(code, operation)),
            }
            deadline.check(|| operation.to_string(), missing)?;
            backoff.snooze();
        }
    }

    /// True once aborted or shut down.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// `ncclCommAbort`: frees everything and unblocks pending work. Idempotent.
    pub fn abort(&mut self) {
        if !self.closed {
            self.closed = true;
            // SAFETY: the handle is live (not yet closed); after this it is never used.
            unsafe { (self.lib.api.comm_abort)(self.handle) };
        }
    }

    /// `ncclCommFinalize` (polled until done, or `deadline`), then
    /// `ncclCommDestroy`; falls back to `ncclCommAbort` when finalize fails
    /// or times out. Never panics; returns the first error seen.
    pub fn shutdown(&mut self, deadline: &Deadline) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        // SAFETY: live handle.
        let rc = unsafe { (self.lib.api.comm_finalize)(self.handle) };
        let finalized = if rc == NCCL_SUCCESS || rc == NCCL_IN_PROGRESS {
            self.wait_ready(deadline, "ncclCommFinalize", &Vec::new)
        } else {
            Err(self.error(rc, "ncclCommFinalize"))
        };
        match finalized {
            Ok(()) => {
                self.closed = true;
                // SAFETY: live, finalized handle; never used again.
                let rc = unsafe { (self.lib.api.comm_destroy)(self.handle) };
                self.lib.check(rc, "ncclCommDestroy")
            }
            Err(e) => {
                self.abort();
                Err(e)
            }
        }
    }
}

impl Drop for RawComm {
    fn drop(&mut self) {
        // Dropped without an orderly shutdown: abort, never hang.
        self.abort();
    }
}
