//! The fallible layer: [`NcclLibrary`] opens libnccl, resolves its symbols
//! once, and wraps every NCCL function exactly once, turning each
//! `ncclResult_t` into a `Result` ([`Progress`] for calls that may still be
//! in progress on a non-blocking communicator, a readable
//! [`CommError::Nccl`] otherwise).
//!
//! The wrappers that take communicator handles or device pointers are
//! `unsafe fn`: what they point to is the caller's to guarantee. The
//! lifecycle that makes handles safe to use lives in [`super::comm`].

use std::ffi::{c_char, c_int, c_void, CStr, OsStr, OsString};
use std::sync::OnceLock;

use comm_core::{CommError, Result};

use super::sys::{
    result_name, CudaStreamHandle, NcclApi, NcclCommHandle, NcclConfig, NcclDataType, NcclRedOp,
    NcclResultCode, NcclUniqueId, NcclVersion, MIN_VERSION, NCCL_IN_PROGRESS, NCCL_SUCCESS,
    UNIQUE_ID_BYTES,
};

/// Primary override: the full path (or soname) of the NCCL library to load.
pub const LIBRARY_ENV: &str = "DIST_NCCL_LIBRARY";
/// Secondary override, honoured when [`LIBRARY_ENV`] is unset.
pub const LIBRARY_ENV_COMPAT: &str = "NCCL_LIBRARY";
/// Names tried, in order, when no override is set.
pub const DEFAULT_NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

/// How a call on a non-blocking communicator ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "an InProgress call must be waited for (RawComm::settle)"]
pub enum Progress {
    /// `ncclSuccess`: enqueued (collectives) or done (lifecycle calls).
    Done,
    /// `ncclInProgress`: NCCL is still working on it; poll
    /// `ncclCommGetAsyncError` until it leaves this state.
    InProgress,
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

fn rank_int(what: &str, v: usize) -> Result<c_int> {
    c_int::try_from(v).map_err(|_| CommError::invalid(format!("{what} {v} overflows a C int")))
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
        let shown = path.to_string_lossy();
        // SAFETY: loading a shared library runs its initialisers; NCCL's are
        // sound to run at any time. This is the documented way to use NCCL
        // without linking to it.
        let lib = unsafe { libloading::Library::new(path) }.map_err(|e| {
            unavailable(format!(
                "cannot load {shown}: {e}. Install NCCL (e.g. the nvidia-nccl-cu12 wheel or the \
                 libnccl2 package), add its directory to LD_LIBRARY_PATH, or point \
                 {LIBRARY_ENV} at libnccl.so.2"
            ))
        })?;
        // SAFETY: we only ever open NCCL here; a library that merely shares
        // a symbol name with it is the user's explicit override.
        let api = unsafe { NcclApi::resolve(&lib) }.map_err(|(name, e)| {
            unavailable(format!(
                "{shown} lacks the symbol `{name}` ({e}); it is not a usable NCCL >= {MIN_VERSION}"
            ))
        })?;
        let mut code: c_int = 0;
        // SAFETY: `ncclResult_t ncclGetVersion(int*)`; `code` is a valid out pointer.
        let rc = unsafe { (api.get_version)(&mut code) };
        if rc != NCCL_SUCCESS {
            return Err(unavailable(format!(
                "ncclGetVersion in {shown} failed with {rc} ({})",
                result_name(rc)
            )));
        }
        let version = NcclVersion::from_code(code);
        if version < MIN_VERSION {
            return Err(unavailable(format!(
                "{shown} is NCCL {version}, older than the {MIN_VERSION} this backend needs; \
                 install a newer NCCL or point {LIBRARY_ENV} at one"
            )));
        }
        Ok(NcclLibrary {
            api,
            version,
            path: path.to_owned(),
            _lib: lib,
        })
    }

    /// The candidate paths, in the order [`NcclLibrary::load`] tries them:
    /// the override in [`LIBRARY_ENV`] (else [`LIBRARY_ENV_COMPAT`]) alone
    /// when set, so a wrong override is an error rather than silently
    /// replaced; else [`DEFAULT_NAMES`].
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

    /// The [`CommError::Nccl`] for `code` from `function`: its name,
    /// `ncclGetErrorString` and, where non-empty, this thread's
    /// `ncclGetLastError`.
    pub fn error(&self, code: NcclResultCode, function: &str) -> CommError {
        // SAFETY: NULL asks for the thread's last error.
        unsafe { self.error_of(code, std::ptr::null_mut(), function) }
    }

    /// [`error`](Self::error) with `comm`'s last error.
    ///
    /// # Safety
    /// `comm` is NULL or a live communicator.
    pub unsafe fn error_of(
        &self,
        code: NcclResultCode,
        comm: NcclCommHandle,
        function: &str,
    ) -> CommError {
        // SAFETY: both functions take plain values (`comm` is NULL or live,
        // the caller's guarantee) and return NUL-terminated static or
        // thread-local strings, or NULL; they are copied at once.
        let (text, last) = unsafe {
            (
                cstr((self.api.get_error_string)(code)),
                cstr((self.api.get_last_error)(comm)),
            )
        };
        let mut message = format!(
            "{function}: {}",
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

    /// `ncclSuccess` → `Done`, `ncclInProgress` → `InProgress`, else the error.
    ///
    /// # Safety
    /// `comm` is NULL or a live communicator.
    unsafe fn progress(
        &self,
        rc: NcclResultCode,
        comm: NcclCommHandle,
        function: &str,
    ) -> Result<Progress> {
        match rc {
            NCCL_SUCCESS => Ok(Progress::Done),
            NCCL_IN_PROGRESS => Ok(Progress::InProgress),
            // SAFETY: the caller's guarantee.
            code => Err(unsafe { self.error_of(code, comm, function) }),
        }
    }

    /// `Ok` for `ncclSuccess` only.
    ///
    /// # Safety
    /// `comm` is NULL or a live communicator.
    unsafe fn done(&self, rc: NcclResultCode, comm: NcclCommHandle, function: &str) -> Result<()> {
        match rc {
            NCCL_SUCCESS => Ok(()),
            // SAFETY: the caller's guarantee.
            code => Err(unsafe { self.error_of(code, comm, function) }),
        }
    }

    // ------------------------------------------------------------ no handle

    /// `ncclGetUniqueId`: the 128 bytes that rank 0 hands to every member.
    pub fn get_unique_id(&self) -> Result<NcclUniqueId> {
        let mut id = NcclUniqueId {
            internal: [0; UNIQUE_ID_BYTES],
        };
        // SAFETY: `id` is a valid, writable ncclUniqueId.
        let rc = unsafe { (self.api.get_unique_id)(&mut id) };
        // SAFETY: NULL.
        unsafe { self.done(rc, std::ptr::null_mut(), "ncclGetUniqueId") }?;
        Ok(id)
    }

    /// `ncclGroupStart` (thread-local: opens a group on this thread).
    pub fn group_start(&self) -> Result<()> {
        // SAFETY: no arguments.
        let rc = unsafe { (self.api.group_start)() };
        // SAFETY: NULL.
        unsafe { self.done(rc, std::ptr::null_mut(), "ncclGroupStart") }
    }

    /// `ncclGroupEnd`: launches the group opened on this thread.
    pub fn group_end(&self) -> Result<Progress> {
        // SAFETY: no arguments; NCCL reports a group that was never started.
        let rc = unsafe { (self.api.group_end)() };
        // SAFETY: NULL.
        unsafe { self.progress(rc, std::ptr::null_mut(), "ncclGroupEnd") }
    }

    // ------------------------------------------------------------ lifecycle

    /// `ncclCommInitRankConfig`: `Ok((handle, progress))`; on error the
    /// handle NCCL may have returned comes back too, for the caller to abort.
    ///
    /// # Safety
    /// `config` must be a valid config (see [`NcclConfig::non_blocking`]).
    pub unsafe fn comm_init_rank_config(
        &self,
        world: usize,
        id: &NcclUniqueId,
        rank: usize,
        config: &mut NcclConfig,
    ) -> std::result::Result<(NcclCommHandle, Progress), (NcclCommHandle, CommError)> {
        let mut handle: NcclCommHandle = std::ptr::null_mut();
        let (n, r) = match (rank_int("world size", world), rank_int("rank", rank)) {
            (Ok(n), Ok(r)) => (n, r),
            (Err(e), _) | (_, Err(e)) => return Err((handle, e)),
        };
        // SAFETY: `handle` and `config` are valid pointers for the call; the
        // id is passed by value as the C ABI requires.
        let rc = unsafe { (self.api.comm_init_rank_config)(&mut handle, n, *id, r, config) };
        // SAFETY: the handle NCCL just returned (or NULL).
        match unsafe { self.progress(rc, handle, "ncclCommInitRankConfig") } {
            Ok(p) => Ok((handle, p)),
            Err(e) => Err((handle, e)),
        }
    }

    /// `ncclCommGetAsyncError`: the communicator's pending state
    /// (`ncclSuccess`, `ncclInProgress` or an error code).
    ///
    /// # Safety
    /// `comm` is a live communicator.
    pub unsafe fn comm_get_async_error(&self, comm: NcclCommHandle) -> Result<NcclResultCode> {
        let mut state: NcclResultCode = NCCL_SUCCESS;
        // SAFETY: live handle (caller) and a valid out pointer.
        let rc = unsafe { (self.api.comm_get_async_error)(comm, &mut state) };
        // SAFETY: the caller guarantees `comm` is live.
        unsafe { self.done(rc, comm, "ncclCommGetAsyncError") }?;
        Ok(state)
    }

    /// `ncclCommAbort`: frees the communicator and unblocks its pending work.
    ///
    /// # Safety
    /// `comm` is a live communicator, never used again after this.
    pub unsafe fn comm_abort(&self, comm: NcclCommHandle) -> Result<()> {
        // SAFETY: live handle (caller).
        let rc = unsafe { (self.api.comm_abort)(comm) };
        // SAFETY: NULL.
        unsafe { self.done(rc, std::ptr::null_mut(), "ncclCommAbort") }
    }

    /// `ncclCommFinalize`: flushes the communicator's work (may be in
    /// progress on a non-blocking communicator).
    ///
    /// # Safety
    /// `comm` is a live communicator.
    pub unsafe fn comm_finalize(&self, comm: NcclCommHandle) -> Result<Progress> {
        // SAFETY: live handle (caller).
        let rc = unsafe { (self.api.comm_finalize)(comm) };
        // SAFETY: the caller guarantees `comm` is live.
        unsafe { self.progress(rc, comm, "ncclCommFinalize") }
    }

    /// `ncclCommDestroy`.
    ///
    /// # Safety
    /// `comm` is a live, finalized communicator, never used again after this.
    pub unsafe fn comm_destroy(&self, comm: NcclCommHandle) -> Result<()> {
        // SAFETY: live handle (caller).
        let rc = unsafe { (self.api.comm_destroy)(comm) };
        // SAFETY: NULL.
        unsafe { self.done(rc, std::ptr::null_mut(), "ncclCommDestroy") }
    }

    // ------------------------------------------------------------ collectives

    /// `ncclAllReduce` of `count` elements (in place when `send == recv`).
    ///
    /// # Safety
    /// `comm` is live; `send` and `recv` address `count` elements of `dt` in
    /// device memory that stays valid until the work on `stream` completes.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn all_reduce(
        &self,
        send: *const c_void,
        recv: *mut c_void,
        count: usize,
        dt: NcclDataType,
        op: NcclRedOp,
        comm: NcclCommHandle,
        stream: CudaStreamHandle,
    ) -> Result<Progress> {
        // SAFETY: the caller's guarantees are NCCL's preconditions.
        let rc = unsafe { (self.api.all_reduce)(send, recv, count, dt, op, comm, stream) };
        // SAFETY: the caller guarantees `comm` is live.
        unsafe { self.progress(rc, comm, "ncclAllReduce") }
    }

    /// `ncclReduceScatter`: `recv` gets `count` elements, `send` holds
    /// `world * count`.
    ///
    /// # Safety
    /// As [`all_reduce`](Self::all_reduce), with those sizes.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn reduce_scatter(
        &self,
        send: *const c_void,
        recv: *mut c_void,
        count: usize,
        dt: NcclDataType,
        op: NcclRedOp,
        comm: NcclCommHandle,
        stream: CudaStreamHandle,
    ) -> Result<Progress> {
        // SAFETY: the caller's guarantees are NCCL's preconditions.
        let rc = unsafe { (self.api.reduce_scatter)(send, recv, count, dt, op, comm, stream) };
        // SAFETY: the caller guarantees `comm` is live.
        unsafe { self.progress(rc, comm, "ncclReduceScatter") }
    }

    /// `ncclAllGather`: `send` holds `count` elements, `recv` `world * count`.
    ///
    /// # Safety
    /// As [`all_reduce`](Self::all_reduce), with those sizes.
    pub unsafe fn all_gather(
        &self,
        send: *const c_void,
        recv: *mut c_void,
        count: usize,
        dt: NcclDataType,
        comm: NcclCommHandle,
        stream: CudaStreamHandle,
    ) -> Result<Progress> {
        // SAFETY: the caller's guarantees are NCCL's preconditions.
        let rc = unsafe { (self.api.all_gather)(send, recv, count, dt, comm, stream) };
        // SAFETY: the caller guarantees `comm` is live.
        unsafe { self.progress(rc, comm, "ncclAllGather") }
    }

    /// `ncclBroadcast` of `count` elements from `root`.
    ///
    /// # Safety
    /// As [`all_reduce`](Self::all_reduce).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn broadcast(
        &self,
        send: *const c_void,
        recv: *mut c_void,
        count: usize,
        dt: NcclDataType,
        root: usize,
        comm: NcclCommHandle,
        stream: CudaStreamHandle,
    ) -> Result<Progress> {
        let root = rank_int("root", root)?;
        // SAFETY: the caller's guarantees are NCCL's preconditions.
        let rc = unsafe { (self.api.broadcast)(send, recv, count, dt, root, comm, stream) };
        // SAFETY: the caller guarantees `comm` is live.
        unsafe { self.progress(rc, comm, "ncclBroadcast") }
    }

    /// `ncclSend` of `count` elements to `peer`.
    ///
    /// # Safety
    /// `comm` is live; `buf` addresses `count` elements valid until the
    /// work on `stream` completes.
    pub unsafe fn send(
        &self,
        buf: *const c_void,
        count: usize,
        dt: NcclDataType,
        peer: usize,
        comm: NcclCommHandle,
        stream: CudaStreamHandle,
    ) -> Result<Progress> {
        let peer = rank_int("peer", peer)?;
        // SAFETY: the caller's guarantees are NCCL's preconditions.
        let rc = unsafe { (self.api.send)(buf, count, dt, peer, comm, stream) };
        // SAFETY: the caller guarantees `comm` is live.
        unsafe { self.progress(rc, comm, "ncclSend") }
    }

    /// `ncclRecv` of `count` elements from `peer`.
    ///
    /// # Safety
    /// As [`send`](Self::send), for writable memory.
    pub unsafe fn recv(
        &self,
        buf: *mut c_void,
        count: usize,
        dt: NcclDataType,
        peer: usize,
        comm: NcclCommHandle,
        stream: CudaStreamHandle,
    ) -> Result<Progress> {
        let peer = rank_int("peer", peer)?;
        // SAFETY: the caller's guarantees are NCCL's preconditions.
        let rc = unsafe { (self.api.recv)(buf, count, dt, peer, comm, stream) };
        // SAFETY: the caller guarantees `comm` is live.
        unsafe { self.progress(rc, comm, "ncclRecv") }
    }
}
