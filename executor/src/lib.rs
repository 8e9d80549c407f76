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
//! The launcher reaps its ranks in the order they exited (pidfds in an epoll
//! set), so the rank that failed first is the one named and its code the one
//! returned, even when the others fail microseconds later because of it.
//! Once every rank is gone (success, failure, timeout, Ctrl-C), it removes
//! the job's `/dev/shm/dshm.<DIST_JOB_ID>.*` files, which a stop during
//! set-up would otherwise leave behind where segments are named
//! (`DIST_SHM_BACKING=named`; the default memfd segments have no name). Rank output is
//! forwarded one whole line per `write`.
//!
//! [`Executor`] keeps one long-lived worker process per rank, on this host
//! and (through `distrun`) on other hosts; the workers use [`Worker`].
//! Calls are typed: a [`Method`] names the call and fixes its argument and
//! result types; workers register handlers in [`Methods`], which get the
//! decoded argument or, with [`Methods::on_view`], its borrowed form
//! ([`ArgView`]) where it lies. The executor
//! waits for a READY or ERROR from each worker, runs
//! [`Executor::collective_rpc`] (or [`Executor::submit`] for several calls
//! in flight) with results in rank order or from one rank, reports a
//! handler's error or panic with its rank while every worker stays usable,
//! names a worker that died (and stops the others) or hung, and shuts down
//! with a message queued behind the calls in flight, a grace period,
//! SIGTERM, then SIGKILL.
//!
//! On one host a request is written once, into a shared-memory queue
//! (comm-shm's `MessageQueue`) that every local worker reads; each local
//! worker replies through its own queue, and a doorbell wakes the executor
//! only when it sleeps. Workers on other hosts get requests and send
//! replies over authenticated TCP; one process drives them all.
//!
//! [`GpuWorker`] is FastVideo's gpu_worker: started with
//! [`Executor::start_gpu`], it chooses and binds its device, initialises
//! the distributed environment and the model-parallel groups from the
//! executor's [`ParallelConfig`], builds the model once, and serves calls
//! with a [`GpuState`] (its [`GpuContext`] and the model). The
//! `video_generator` example runs the main job's attention stack this way.

#![warn(missing_docs)]

mod cleanup;
mod gpu;
mod launch;
mod output;
mod reap;
mod rpc;

pub use gpu::{GpuContext, GpuState, GpuWorker, ParallelConfig};
pub use launch::{
    install_signal_handlers, launch, launch_self, random_hex128, LaunchConfig, LaunchOutcome,
    RankExit, StopReason, JOB_ID_ENV, JOB_SECRET_ENV, STORE_HOSTED_ENV, TIMEOUT_EXIT_CODE,
};
pub use rpc::{
    ArgView, Executor, Method, Methods, Pending, ReplyFrom, Worker, DEFAULT_REPLY_RING,
    DEFAULT_REQUEST_RING, DEFAULT_SPIN_US, EXECUTOR_FD_ENV, QUEUE_ENV, REPLY_RING_ENV,
    REQUEST_RING_ENV, ROOMY_SHM, SMALL_REQUEST_RING, SPIN_ENV,
};
