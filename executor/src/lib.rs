//! Process launcher (`distrun`) and multi-process executor.
//!
//! [`launch`] is the library form of the `distrun` binary, a torchrun-compatible
//! launcher: it starts `nproc_per_node` processes with `RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `GROUP_RANK`/`NODE_RANK`, `MASTER_ADDR`,
//! `MASTER_PORT`, `DIST_JOB_SECRET` and `DIST_JOB_ID` set, prefixes their
//! output with `[rank R] `, and when one rank fails stops the others
//! (SIGTERM, a grace period, SIGKILL) and reports the failing rank's exit
//! code (`128 + signal` for a signal).
//!
//! Each rank runs in its own process group (so everything it starts can be
//! stopped with it) and with `PR_SET_PDEATHSIG = SIGKILL` (so it dies if the
//! launcher dies). With a single node and no `master_port`, the launcher
//! hosts the rendezvous `TcpStore` itself on a free port of 127.0.0.1 and
//! sets `DIST_STORE_HOSTED=1`; node 0 of a multi-node job hosts it on
//! `master_addr:master_port`.
//!
//! [`Executor`] keeps one long-lived worker process per rank (the workers use
//! [`Worker`]): it waits for a READY or ERROR from each, runs
//! `collective_rpc(method, args, timeout)` with replies in rank order, names a
//! worker that died, and shuts down with a message, a grace period, SIGTERM,
//! then SIGKILL.

#![warn(missing_docs)]

mod launch;
mod rpc;

pub use launch::{
    install_signal_handlers, launch, random_hex128, LaunchConfig, LaunchOutcome, RankExit,
    StopReason, JOB_ID_ENV, JOB_SECRET_ENV, STORE_HOSTED_ENV, TIMEOUT_EXIT_CODE,
};
pub use rpc::{Executor, Worker, EXECUTOR_FD_ENV};
