//! Multi-process integration tests and the backend conformance suite.
//!
//! - [`registry`]: backend name -> [`comm_core::DeviceCommunicator`], shared
//!   with `comm-perf` in the benches crate.
//! - [`data`]: deterministic integer-valued inputs and exactly computed
//!   expected results.
//! - [`suite`]: the conformance suite itself, run by the
//!   `conformance_worker` binary in every rank of a real multi-process job
//!   (see `tests/conformance.rs`).

#![warn(missing_docs)]

pub mod data;
pub mod registry;
pub mod rendezvous;
pub mod suite;
