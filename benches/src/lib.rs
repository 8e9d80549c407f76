//! comm-perf and criterion benchmarks for the distributed layer.
//!
//! [`perf`] holds the measurement loop and the nccl-tests-style reporting of
//! the `comm-perf` binary; backends come from the layer's one registry
//! (`parallel_state::default_registry()`), so comm-perf measures exactly
//! what `DIST_BACKEND` can name, and checks results with the conformance
//! kit's exact data (`comm_conformance::data`).

#![warn(missing_docs)]

pub mod perf;
pub mod threads;
