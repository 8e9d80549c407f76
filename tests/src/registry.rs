//! The backend registry shared by the conformance suite and `comm-perf`:
//! one place that turns a backend name into a [`DeviceCommunicator`].
//!
//! | name     | tensors                                  | world  | built            |
//! |----------|------------------------------------------|--------|------------------|
//! | `single` | host, or any device                      | 1      | always           |
//! | `tcp`    | host; device tensors staged through host | any    | always           |
//! | `shm`    | host; device tensors staged through host | any, one host | always    |
//! | `nccl`   | CUDA                                     | any    | feature `nccl`   |
//!
//! A backend that is unknown, not built in, or cannot run here (no libnccl,
//! no GPU) gives [`CommError::BackendUnavailable`] saying why.

use std::sync::Arc;
use std::time::Duration;

use comm_core::{
    CommError, Device, DeviceCommunicator, HostStaged, Result, SingleRankCommunicator, Store,
};

/// Every backend name the registry knows, whether or not it is built in.
pub const KNOWN_BACKENDS: &[&str] = &["single", "tcp", "shm", "nccl"];

/// The backends this build can create (a subset of [`KNOWN_BACKENDS`]).
pub fn available_backends() -> Vec<&'static str> {
    KNOWN_BACKENDS
        .iter()
        .copied()
        .filter(|b| *b != "nccl" || cfg!(feature = "nccl"))
        .collect()
}

/// Creates the communicator of `backend` for member `rank` of a group of
/// `world` ranks, for host tensors, rendezvousing through `store`, with
/// per-operation deadline `timeout`.
///
/// Every member of the group must call this with the same backend, world and
/// store. Unknown or unbuilt backends give [`CommError::BackendUnavailable`].
pub fn make_communicator(
    backend: &str,
    store: Arc<dyn Store>,
    rank: usize,
    world: usize,
    timeout: Duration,
) -> Result<Box<dyn DeviceCommunicator>> {
    make_communicator_on(backend, store, rank, world, timeout, Device::Cpu)
}

/// [`make_communicator`] for tensors on `device`. Host backends (`tcp`,
/// `shm`) given a CUDA device are wrapped in [`HostStaged`], so several
/// processes can share one GPU; `nccl` needs a CUDA device.
pub fn make_communicator_on(
    backend: &str,
    store: Arc<dyn Store>,
    rank: usize,
    world: usize,
    timeout: Duration,
    device: Device,
) -> Result<Box<dyn DeviceCommunicator>> {
    if world == 0 || rank >= world {
        return Err(CommError::invalid(format!(
            "rank {rank} is out of range for a group of {world}"
        )));
    }
    let host: Box<dyn DeviceCommunicator> = match backend {
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
            let mut c = SingleRankCommunicator::on(device);
            c.set_timeout(timeout);
            return Ok(Box::new(c));
        }
        "tcp" => {
            let opts = comm_cpu::TcpOptions::with_timeout(timeout);
            Box::new(comm_cpu::TcpCommunicator::new(store, rank, world, opts)?)
        }
        "shm" => {
            let opts = comm_shm::ShmOptions {
                timeout,
                ..Default::default()
            };
            Box::new(comm_shm::ShmCommunicator::new(
                store.as_ref(),
                rank,
                world,
                opts,
            )?)
        }
        "nccl" => return make_nccl(store, rank, world, timeout, device),
        other => {
            return Err(CommError::unavailable(
                other,
                format!(
                    "unknown backend; this build knows {}",
                    available_backends().join(", ")
                ),
            ))
        }
    };
    Ok(match device {
        Device::Cpu => host,
        Device::Cuda(_) => Box::new(HostStaged::new(host)),
    })
}

#[cfg(feature = "nccl")]
fn make_nccl(
    store: Arc<dyn Store>,
    rank: usize,
    world: usize,
    timeout: Duration,
    device: Device,
) -> Result<Box<dyn DeviceCommunicator>> {
    let Device::Cuda(ordinal) = device else {
        return Err(CommError::unavailable(
            "nccl",
            "NCCL moves CUDA tensors only; run with a cuda device (e.g. --device cuda)",
        ));
    };
    let opts = comm_nccl::NcclOptions {
        device: ordinal,
        timeout,
        ..Default::default()
    };
    Ok(Box::new(comm_nccl::NcclCommunicator::new(
        store, rank, world, opts,
    )?))
}

#[cfg(not(feature = "nccl"))]
fn make_nccl(
    _store: Arc<dyn Store>,
    _rank: usize,
    _world: usize,
    _timeout: Duration,
    _device: Device,
) -> Result<Box<dyn DeviceCommunicator>> {
    Err(CommError::unavailable(
        "nccl",
        "this build has no NCCL support; rebuild with `--features nccl` (a feature of both \
         the tests and the benches crate)",
    ))
}

/// A tensor placement for `device`: identity on the host, a copy to the
/// CUDA device otherwise (needs the `nccl` feature, which brings CUDA).
pub fn placement(
    device: Device,
) -> Result<Box<dyn Fn(comm_core::Tensor) -> Result<comm_core::Tensor>>> {
    match device {
        Device::Cpu => Ok(Box::new(Ok)),
        #[cfg(feature = "nccl")]
        Device::Cuda(ordinal) => {
            let dev = comm_nccl::CudaDevice::get(ordinal)?;
            Ok(Box::new(move |t: comm_core::Tensor| dev.to_device(&t)))
        }
        #[cfg(not(feature = "nccl"))]
        Device::Cuda(_) => Err(CommError::unavailable(
            "cuda",
            "this build has no CUDA support; rebuild the tests crate with `--features nccl`",
        )),
    }
}

/// The CUDA device a rank should use: `LOCAL_RANK` modulo the number of
/// visible devices (several ranks may share one GPU).
#[cfg(feature = "nccl")]
pub fn local_cuda_device(local_rank: usize) -> Result<Device> {
    if !comm_nccl::libcuda_present() {
        return Err(CommError::unavailable(
            "cuda",
            "libcuda could not be loaded: no NVIDIA driver on this machine",
        ));
    }
    let n = comm_nccl::cuda_device_count()?;
    if n == 0 {
        return Err(CommError::unavailable("cuda", "no CUDA device is visible"));
    }
    Ok(Device::Cuda(local_rank % n))
}

/// The CUDA device a rank should use (this build has no CUDA support).
#[cfg(not(feature = "nccl"))]
pub fn local_cuda_device(_local_rank: usize) -> Result<Device> {
    Err(CommError::unavailable(
        "cuda",
        "this build has no CUDA support; rebuild the tests crate with `--features nccl`",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_unbuilt_backends_are_unavailable() {
        let store: Arc<dyn Store> = Arc::new(dist_utils::HashStore::new());
        let t = Duration::from_secs(1);
        let make = |b: &str, world| match make_communicator(b, store.clone(), 0, world, t) {
            Ok(c) => panic!("{b} x {world} gave a {} communicator", c.backend()),
            Err(e) => e,
        };
        let e = make("carrier-pigeon", 1);
        assert!(matches!(e, CommError::BackendUnavailable { .. }), "{e}");
        let e = make("single", 2);
        assert!(matches!(e, CommError::BackendUnavailable { .. }), "{e}");
        // Host tensors are never NCCL's, with or without the feature.
        let e = make("nccl", 1);
        assert!(matches!(e, CommError::BackendUnavailable { .. }), "{e}");
        let c = make_communicator("single", store.clone(), 0, 1, t).unwrap();
        assert_eq!((c.backend(), c.world_size()), ("single", 1));
    }
}
