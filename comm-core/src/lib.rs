//! # comm-core
//!
//! The vocabulary every other crate of the distributed layer speaks, with no
//! backend dependency:
//!
//! - types: [`DType`], [`ReduceOp`], [`Device`], a contiguous row-major
//!   [`Tensor`], host [`reduce`] kernels and [`layout`] operations;
//! - the buffer contract ([`AsBuf`], [`AsBufMut`], [`DeviceMemory`]):
//!   collectives take memory the caller owns, host slices and (feature
//!   `cuda`) cudarc device memory as well as tensors;
//! - the backend contract [`DeviceCommunicator`] (flat primitives on raw
//!   buffers) and the checked front [`Communicator`] every backend passes
//!   through (checks, shortcuts, `Avg`, staging, call descriptions, poisoning,
//!   flight recorder, non-blocking [`Scope`]s);
//! - the open [`Registry`] of [`BackendFactory`]s;
//! - the [`Store`] trait used for rendezvous, and the one error type
//!   [`CommError`], whose blamed ranks are data ([`RankId`], [`Missing`]).

#![warn(missing_docs)]

pub mod auth;
mod backend;
mod buffer;
mod call;
pub mod check;
#[cfg(feature = "cuda")]
mod cuda;
mod device;
mod dtype;
mod engine;
mod error;
mod front;
pub mod layout;
pub mod recorder;
pub mod reduce;
mod registry;
mod stage;
mod store;
mod tensor;

pub use backend::{BlockLayout, Capabilities, DeviceCommunicator, Fence, P2p};
pub use buffer::{AsBuf, AsBufMut, BufMut, BufRef, DeviceMemory, Mem, MemMut};
pub use call::{Call, CallDesc, Collective, DESC_DIMS, SLOW_WAIT_REPORT};
pub use device::{
    device_allocator, install_device_allocator, visible_devices, DeviceAllocator, DeviceStorage,
};
pub use dtype::{DType, Device, Element, ReduceOp};
pub use engine::{Scope, Work};
pub use error::{CommError, Missing, RankId, Result};
pub use front::{Communicator, FrontOptions, Layout, P2pOp};
pub use registry::{BackendFactory, GroupContext, Registry, SingleFactory, SingleRank};
pub use store::{Deadline, PrefixStore, Store};
pub use tensor::{HostBuffer, Storage, Tensor, TensorMetadata};

pub use half::{bf16, f16};

use std::time::Duration;

/// Environment variable that sets the default deadline, in seconds, for every
/// blocking operation that is not given one explicitly.
pub const TIMEOUT_ENV: &str = "DIST_TIMEOUT_S";

/// Default deadline when [`TIMEOUT_ENV`] is unset: long enough for a slow
/// first step on a loaded machine, short enough that a hang is reported.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// The default deadline: [`TIMEOUT_ENV`] if set to a positive number of
/// seconds (fractions allowed), else [`DEFAULT_TIMEOUT`].
pub fn default_timeout() -> Duration {
    std::env::var(TIMEOUT_ENV)
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(DEFAULT_TIMEOUT)
}

/// Compares two secrets in time that depends only on their lengths, so a
/// stranger probing a handshake learns nothing from how fast it is refused.
///
/// ```
/// assert!(comm_core::secrets_equal(b"abc", b"abc"));
/// assert!(!comm_core::secrets_equal(b"abc", b"abd"));
/// assert!(!comm_core::secrets_equal(b"abc", b"abcd"));
/// ```
pub fn secrets_equal(a: &[u8], b: &[u8]) -> bool {
    let n = a.len().max(b.len());
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..n {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    // Keeps the compiler from turning the loop into an early exit.
    std::hint::black_box(diff) == 0
}
