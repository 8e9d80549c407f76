//! Choosing and building a group's communicators.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use comm_core::{CommError, Device, DeviceCommunicator, Result, SingleRankCommunicator, Store};

/// Environment variable that forces the host backend of every group
/// (`tcp` or `shm`), or `nccl` for the device plane.
pub const BACKEND_ENV: &str = "DIST_BACKEND";

/// The backends a group can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// One-member group: every collective is the identity.
    Single,
    /// TCP sockets (any hosts).
    Tcp,
    /// Shared memory (one host).
    Shm,
    /// NCCL (CUDA tensors).
    Nccl,
}

impl Backend {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Single => "single",
            Backend::Tcp => "tcp",
            Backend::Shm => "shm",
            Backend::Nccl => "nccl",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Backend {
    type Err = CommError;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "single" => Ok(Backend::Single),
            "tcp" | "gloo" | "cpu" => Ok(Backend::Tcp),
            "shm" => Ok(Backend::Shm),
            "nccl" | "cuda" => Ok(Backend::Nccl),
            other => Err(CommError::invalid(format!(
                "unknown backend `{other}`; expected tcp, shm or nccl (from {BACKEND_ENV} or the backend argument)"
            ))),
        }
    }
}

/// The forced backend from [`BACKEND_ENV`], if any.
pub fn backend_from_env() -> Result<Option<Backend>> {
    match std::env::var(BACKEND_ENV) {
        Ok(s) if !s.trim().is_empty() => s.parse().map(Some),
        _ => Ok(None),
    }
}

/// Picks the host (CPU-plane) backend of a group and says why.
///
/// Every member reaches the same decision: `all_on_this_host` is true on
/// every member or on none (a group that spans hosts has, on every member, a
/// rank that is elsewhere).
pub fn choose_host_backend(
    world_size: usize,
    all_on_this_host: bool,
    forced: Option<Backend>,
) -> Result<(Backend, String)> {
    if world_size == 1 {
        return Ok((Backend::Single, "the group has one member".into()));
    }
    match forced {
        Some(Backend::Shm) if !all_on_this_host => Err(CommError::invalid(
            "shm backend forced, but the group spans several hosts; use tcp",
        )),
        Some(b @ (Backend::Shm | Backend::Tcp)) => Ok((b, "forced by configuration".into())),
        _ if all_on_this_host => Ok((Backend::Shm, "every member is on this host".into())),
        _ => Ok((Backend::Tcp, "members are on different hosts".into())),
    }
}

/// Builds a host communicator of `kind` over `store` (already namespaced).
pub(crate) fn host_communicator(
    kind: Backend,
    store: Arc<dyn Store>,
    rank: usize,
    world: usize,
    timeout: Duration,
    group_name: &str,
) -> Result<Box<dyn DeviceCommunicator>> {
    Ok(match kind {
        Backend::Single => {
            let mut c = SingleRankCommunicator::new();
            c.set_timeout(timeout);
            Box::new(c)
        }
        Backend::Tcp => {
            let opts = comm_cpu::TcpOptions {
                timeout,
                group_name: group_name.to_string(),
                ..Default::default()
            };
            Box::new(comm_cpu::TcpCommunicator::new(store, rank, world, opts)?)
        }
        Backend::Shm => {
            let opts = comm_shm::ShmOptions {
                timeout,
                group_name: group_name.to_string(),
                ..Default::default()
            };
            Box::new(comm_shm::ShmCommunicator::new(&*store, rank, world, opts)?)
        }
        Backend::Nccl => {
            return Err(CommError::invalid(
                "nccl is a device backend, not a host backend",
            ))
        }
    })
}

/// Why NCCL cannot serve CUDA tensors in this process, or `None` when it can.
pub fn nccl_unavailable_reason() -> Option<String> {
    #[cfg(feature = "nccl")]
    {
        match comm_nccl::nccl_available() {
            Ok(_) => None,
            Err(e) => Some(e.to_string()),
        }
    }
    #[cfg(not(feature = "nccl"))]
    {
        Some("parallel-state was built without the `nccl` feature".into())
    }
}

/// Builds the NCCL device communicator for CUDA device `ordinal`.
#[cfg(feature = "nccl")]
pub(crate) fn nccl_communicator(
    store: Arc<dyn Store>,
    rank: usize,
    world: usize,
    ordinal: usize,
    timeout: Duration,
) -> Result<Box<dyn DeviceCommunicator>> {
    let opts = comm_nccl::NcclOptions {
        device: ordinal,
        timeout,
        ..Default::default()
    };
    Ok(Box::new(comm_nccl::NcclCommunicator::new(
        store, rank, world, opts,
    )?))
}

/// Builds the device communicator for `device`, or returns why none is used
/// (then CUDA tensors are staged through host memory on the host backend).
pub(crate) fn device_communicator(
    device: Device,
    store: &Arc<dyn Store>,
    rank: usize,
    world: usize,
    timeout: Duration,
) -> Result<std::result::Result<Box<dyn DeviceCommunicator>, String>> {
    let Device::Cuda(ordinal) = device else {
        return Ok(Err("host tensors use the host backend".into()));
    };
    if world == 1 {
        return Ok(Err("one-member group".into()));
    }
    if let Some(why) = nccl_unavailable_reason() {
        return Ok(Err(format!(
            "NCCL unavailable ({why}); CUDA tensors are staged through host memory"
        )));
    }
    #[cfg(feature = "nccl")]
    {
        let store = Arc::new(dist_utils::PrefixStore::new("nccl", store.clone())) as Arc<dyn Store>;
        nccl_communicator(store, rank, world, ordinal, timeout).map(Ok)
    }
    #[cfg(not(feature = "nccl"))]
    {
        let _ = (store, rank, ordinal, timeout);
        Ok(Err("nccl feature off".into()))
    }
}
