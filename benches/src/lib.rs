//! comm-perf and criterion benchmarks for the distributed layer.
//!
//! [`perf`] holds the measurement loop and the nccl-tests-style reporting of
//! the `comm-perf` binary; backends come from the registry of the `tests`
//! crate ([`tests::registry::make_communicator`]), so the conformance suite
//! and comm-perf always cover the same set.

#![warn(missing_docs)]

pub mod perf;
pub mod threads;
