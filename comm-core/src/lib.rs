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
