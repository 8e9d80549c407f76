//! # comm-core
//!
//! The vocabulary every other crate of the distributed layer speaks, with no
//! backend dependency: [`DType`], [`ReduceOp`], [`Device`], a contiguous
//! row-major [`Tensor`], host [`reduce`] kernels and [`layout`] operations,
//! the [`DeviceCommunicator`] trait that backends implement, the [`Store`]
//! trait used for rendezvous, and the one error type [`CommError`].

#![warn(missing_docs)]

mod comm;
mod dtype;
mod error;
pub mod layout;
pub mod reduce;
mod store;
mod tensor;

pub use comm::{check, DeviceCommunicator, HostStaged, SingleRankCommunicator};
pub use dtype::{DType, Device, Element, ReduceOp};
pub use error::{CommError, Result};
pub use store::{Deadline, Store};
pub use tensor::{DeviceStorage, HostBuffer, Storage, Tensor, TensorMetadata};

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
