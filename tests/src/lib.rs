//! Multi-process integration tests and the backend conformance suite.
//!
//! - [`registry`]: backend name -> [`comm_core::DeviceCommunicator`], shared
//!   with `comm-perf` in the benches crate.
//! - [`data`]: deterministic integer-valued inputs and exactly computed
//!   expected results.
//! - [`suite`]: the conformance suite itself, run by the
//!   `conformance_worker` binary in every rank of a real multi-process job
//!   (see `tests/conformance.rs`).
//! - [`rendezvous`]: joining the job a launcher started (`env://`).
//!
//! # Running
//!
//! ```text
//! cargo test -p tests                              # whole suite: single, tcp, shm, worlds 1-5, large
//! cargo test -p tests --test conformance shm_      # one backend
//! cargo run -p executor --bin distrun -- --nproc-per-node 3 -- \
//!     target/debug/conformance_worker --backend tcp [--mode large] [--device cuda]
//! ```
//!
//! A new backend joins by adding an arm to [`registry::make_communicator_on`]
//! and a `conformance_tests!` line in `tests/conformance.rs`; `comm-perf`
//! picks it up through the same registry.

#![warn(missing_docs)]

pub mod data;
pub mod registry;
pub mod rendezvous;
pub mod suite;
