//! # comm-shm
//!
//! The shared-memory backend of the distributed layer, for members of a group
//! that live on one host:
//!
//! * [`segment`]: the substrate. Segments are anonymous memfds by default
//!   (never a name in `/dev/shm`, so nothing leaks, even after `SIGKILL`
//!   during set-up; [`Backing`]), or `0600` POSIX objects under unique names
//!   that carry the job id ([`default_job_id`]), unlinked as soon as every
//!   member attached and by a signal handler while members set up; a header
//!   with magic, version and member pids, a free-space check, and
//!   cross-process waits (bounded spin, yield, then a shared futex) that
//!   notice aborts, deadlines and dead members.
//! * [`MessageQueue`]: one writer, many readers, variable-length records in a
//!   byte ring with per-reader cursors; messages of any size stream through
//!   the ring. This is the broadcaster behind `broadcast_object` and RPC.
//! * [`ShmCommunicator`]: a [`comm_core::DeviceCommunicator`] for host
//!   memory, created through [`ShmFactory`] (registered as `shm`) behind the
//!   checked front [`comm_core::Communicator`].
//!
//! Memory ordering: every flag and cursor is an atomic on its own 128-byte
//! line; data is published with release stores and consumed after acquire
//! loads, which is what ARM needs as well as x86.
//!
//! Environment variables: `DIST_JOB_ID` / `DIST_JOB_SECRET` (segment names),
//! `DIST_SHM_BACKING` (`memfd` or `named`, see [`Backing`]),
//! `DIST_SHM_SPIN`, `DIST_SHM_ONE_SHOT_MAX`, `DIST_SHM_SINGLE_COPY`,
//! `DIST_SHM_SINGLE_COPY_MIN` (tuning; see [`ShmOptions`] and [`SpinPolicy`]).

#![warn(missing_docs)]

mod backing;
mod comm;
mod factory;
mod mq;
mod names;
pub mod segment;
mod wire;

pub use backing::{Backing, BACKING_ENV};
pub use comm::{ShmCommunicator, ShmOptions, SingleCopyMode};
pub use factory::ShmFactory;
pub use mq::{MessageQueue, MqOptions, Role};
pub use names::{
    creator_pid, default_job_id, list_segments, remove_job_segments, sanitize_job, segment_prefix,
    JOB_ID_ENV, JOB_SECRET_ENV, MAX_JOB_LEN, NAME_PREFIX, SHM_DIR,
};
pub use segment::{check_free_space, Segment, SpinPolicy};
