//! The executor (control plane) and its workers: typed collective RPCs.
//!
//! * [`Method`] declares a call (name, argument and result types, which
//!   ranks reply) once for both sides.
//! * [`Executor`] (driver) starts one worker per rank, waits for READY or
//!   ERROR from each, submits calls, and shuts down in order.
//! * [`Worker`] (in each worker process) builds its state once, reports
//!   READY, and serves the calls with a [`Methods`] table.
//!
//! Local workers start on a Unix socket pair (fd 3 in the worker, named by
//! `DIST_EXECUTOR_FD`); once all are READY, requests reach them through one
//! shared-memory queue written once per request, and their replies come
//! back through one queue each (`local.rs`; `DIST_EXECUTOR_QUEUE=socket`
//! keeps everything on the sockets). Workers on other hosts talk over TCP,
//! after a challenge–response with the job secret. Messages are
//! postcard headers followed by the argument or result (see `wire.rs`), in
//! the length-prefixed frames of [`dist_utils::codec`] on sockets.

mod engine;
mod executor;
mod local;
mod method;
mod remote;
mod wire;
mod worker;

pub use executor::{Executor, Pending};
pub use local::{
    DEFAULT_REPLY_RING, DEFAULT_REQUEST_RING, QUEUE_ENV, REPLY_RING_ENV, REQUEST_RING_ENV,
    ROOMY_SHM, SMALL_REQUEST_RING,
};
pub use method::{ArgView, Method, Methods, ReplyFrom};
pub use worker::{Worker, EXECUTOR_FD_ENV};

use std::time::Duration;

/// Environment variable: how many microseconds the executor and its
/// workers poll for a message before they sleep (`0`: never poll). Unset:
/// [`DEFAULT_SPIN_US`] when the host has more cores than the executor's
/// processes on it, else 0 (polling on an oversubscribed host only takes
/// the time the other side needs).
pub const SPIN_ENV: &str = "DIST_EXECUTOR_SPIN_US";
/// Default polling time, microseconds (see [`SPIN_ENV`]).
pub const DEFAULT_SPIN_US: u64 = 50;

/// The polling budget for a side sharing the host with `processes`
/// processes of the executor (itself included).
pub(crate) fn spin_budget(processes: usize) -> Duration {
    if let Some(us) = std::env::var(SPIN_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        return Duration::from_micros(us);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores > processes {
        Duration::from_micros(DEFAULT_SPIN_US)
    } else {
        Duration::ZERO
    }
}
