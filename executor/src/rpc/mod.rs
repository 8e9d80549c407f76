//! The executor (control plane) and its workers: typed collective RPCs.
//!
//! * [`Method`] declares a call (name, argument and result types, which
//!   ranks reply) once for both sides.
//! * [`Executor`] (driver) starts one worker per rank, waits for READY or
//!   ERROR from each, submits calls, and shuts down in order.
//! * [`Worker`] (in each worker process) builds its state once, reports
//!   READY, and serves the calls with a [`Methods`] table.
//!
//! Local workers talk to the executor over a Unix socket pair (fd 3 in the
//! worker, named by `DIST_EXECUTOR_FD`); workers on other hosts over TCP,
//! after a challenge–response with the job secret. Messages are the
//! length-prefixed frames of [`dist_utils::codec`] with postcard headers
//! (see `wire.rs`).

mod engine;
mod executor;
mod method;
mod remote;
mod wire;
mod worker;

pub use executor::{Executor, Pending};
pub use method::{Method, Methods, ReplyFrom};
pub use worker::{Worker, EXECUTOR_FD_ENV};
