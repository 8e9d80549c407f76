//! The raw NCCL layer, in cudarc's three layers: libnccl is opened at run
//! time with `libloading`, nothing links against it, so a missing library,
//! a missing symbol or a library older than [`MIN_VERSION`] is
//! `Err(BackendUnavailable)`, never a link or load failure.
//!
//! - [`sys`]: the C types of `nccl.h` and the symbol table;
//! - [`result`]: [`NcclLibrary`], finding and opening the library, and every
//!   NCCL function wrapped once into a `Result` ([`Progress`] for
//!   non-blocking calls, [`comm_core::CommError::Nccl`] with NCCL's own text
//!   for failures);
//! - [`comm`]: [`RawComm`], one communicator's lifecycle (non-blocking init
//!   with a deadline, thread-safe abort, finalize and destroy).
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

pub mod comm;
pub mod result;
pub mod sys;

pub(crate) use comm::Backoff;
pub use comm::RawComm;
pub use result::{NcclLibrary, Progress, DEFAULT_NAMES, LIBRARY_ENV, LIBRARY_ENV_COMPAT};
pub use sys::{
    result_name, version_code, CudaStreamHandle, NcclCommHandle, NcclConfig, NcclDataType,
    NcclRedOp, NcclResultCode, NcclUniqueId, NcclVersion, CONFIG_MAGIC, CONFIG_UNDEF_INT,
    MIN_VERSION, NCCL_IN_PROGRESS, NCCL_SUCCESS, UNIQUE_ID_BYTES,
};
