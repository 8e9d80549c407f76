//! The backend registry shared by the conformance suite and `comm-perf`:
//! one place that turns a backend name into a [`DeviceCommunicator`].

use std::sync::Arc;
use std::time::Duration;

use comm_core::{CommError, DeviceCommunicator, Result, SingleRankCommunicator, Store};

/// Every backend name the registry knows, whether or not it is built in.
pub const KNOWN_BACKENDS: &[&str] = &["single", "tcp", "shm", "nccl"];

/// The backends this build can create (a subset of [`KNOWN_BACKENDS`]).
pub fn available_backends() -> Vec<&'static str> {
    KNOWN_BACKENDS
        .iter()
        .copied()
        .filter(|b| is_built(b))
        .collect()
}

fn is_built(backend: &str) -> bool {
    matches!(backend, "single" | "tcp" | "shm")
}

/// Creates the communicator of `backend` for member `rank` of a group of
/// `world` ranks, rendezvousing through `store`, with per-operation deadline
/// `timeout`.
///
/// Every member of the group must call this with the same backend, world and
/// store (namespaced as the caller wishes). Unknown or unbuilt backends give
/// [`CommError::BackendUnavailable`].
pub fn make_communicator(
    backend: &str,
    store: Arc<dyn Store>,
    rank: usize,
    world: usize,
    timeout: Duration,
) -> Result<Box<dyn DeviceCommunicator>> {
    if world == 0 || rank >= world {
        return Err(CommError::invalid(format!(
            "rank {rank} is out of range for a group of {world}"
        )));
    }
    match backend {
        "single" => {
            if world != 1 {
                return Err(CommError::unavailable(
                    "single",
                    format!(
                        "the `single` backend only serves groups of one rank, not {world}; \
                         use tcp or shm"
                    ),
                ));
            }
            let mut c = SingleRankCommunicator::new();
            c.set_timeout(timeout);
            Ok(Box::new(c))
        }
        "tcp" => {
            let opts = comm_cpu::TcpOptions::with_timeout(timeout);
            Ok(Box::new(comm_cpu::TcpCommunicator::new(
                store, rank, world, opts,
            )?))
        }
        "shm" => {
            let opts = comm_shm::ShmOptions {
                timeout,
                ..Default::default()
            };
            Ok(Box::new(comm_shm::ShmCommunicator::new(
                store.as_ref(),
                rank,
                world,
                opts,
            )?))
        }
        "nccl" => Err(CommError::unavailable(
            "nccl",
            "the NCCL backend is not wired into this registry yet (it needs CUDA tensors and \
             a GPU); use tcp or shm",
        )),
        other if KNOWN_BACKENDS.contains(&other) => Err(CommError::unavailable(
            other,
            "this backend is not built into the tests crate yet",
        )),
        other => Err(CommError::unavailable(
            other,
            format!(
                "unknown backend; this build knows {}",
                available_backends().join(", ")
            ),
        )),
    }
}
