//! # comm-shm
//!
//! The shared-memory backend of the distributed layer, for members of a group
//! that live on one host:
//!
//! * [`segment`]: the substrate. Segments created `0600` under unique names,
//!   unlinked as soon as every member attached (so nothing leaks, even after
//!   `SIGKILL`), a header with magic, version, job id and member pids, a
//!   free-space check, and cross-process waits (bounded spin, yield, then a
//!   shared futex) that notice aborts, deadlines and dead members.
//! * [`MessageQueue`]: one writer, many readers, variable-length records in a
//!   byte ring with per-reader cursors; messages of any size stream through
//!   the ring. This is the broadcaster behind `broadcast_object` and RPC.
//! * [`ShmCommunicator`]: a [`comm_core::DeviceCommunicator`] for host tensors.
//!
//! Memory ordering: every flag and cursor is an atomic on its own 128-byte
//! line; data is published with release stores and consumed after acquire
//! loads, which is what ARM needs as well as x86.

#![warn(missing_docs)]

mod comm;
mod mq;
pub mod segment;

pub use comm::{ShmCommunicator, ShmOptions};
pub use mq::{MessageQueue, MqOptions, Role};
pub use segment::{check_free_space, default_job_id, list_segments, Segment, SpinPolicy};
