//! The device side of a process: which device it uses (FastVideo's choice:
//! `cuda:{local_rank % count}` when CUDA is visible), whether members of a
//! group share one GPU, and graph capture.

use std::sync::Arc;
use std::time::Duration;

use comm_core::{CommError, Device, Result, Store, Tensor};

/// Environment variable overriding the device choice: `cpu`, `cuda` (the
/// local rank's GPU) or `cuda:N`.
pub const DEVICE_ENV: &str = "DIST_DEVICE";

/// Chooses this process's device: `requested` (from `InitOptions::device`)
/// wins, then [`DEVICE_ENV`], then FastVideo's rule: `cuda:{local_rank %
/// count}` when CUDA devices are visible (needs the `nccl` feature, which
/// installs the CUDA allocator), else the CPU. Logs one line saying what was
/// chosen and why.
pub fn choose_device(requested: Option<Device>, local_rank: usize) -> Result<Device> {
    let visible = comm_core::visible_devices();
    let from_env = std::env::var(DEVICE_ENV)
        .ok()
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty());
    let (device, why) = match (requested, from_env) {
        (Some(d), _) => (d, "requested by InitOptions::device".to_string()),
        (None, Some(s)) if s == "cpu" => (Device::Cpu, format!("{DEVICE_ENV}=cpu")),
        (None, Some(s)) if s == "cuda" => {
            if visible == 0 {
                return Err(CommError::unavailable(
                    "cuda",
                    format!(
                        "{DEVICE_ENV}=cuda but no CUDA device is usable in this process (build \
                         with the `nccl` feature and check the NVIDIA driver)"
                    ),
                ));
            }
            (
                Device::Cuda(local_rank % visible),
                format!(
                    "{DEVICE_ENV}=cuda, local rank {local_rank} of {visible} visible device(s)"
                ),
            )
        }
        (None, Some(s)) => (
            s.parse::<Device>().map_err(|_| {
                CommError::invalid(format!(
                    "{DEVICE_ENV}=`{s}` is not a device; expected cpu, cuda or cuda:N"
                ))
            })?,
            format!("{DEVICE_ENV}={s}"),
        ),
        (None, None) if visible > 0 => (
            Device::Cuda(local_rank % visible),
            format!(
                "{visible} CUDA device(s) visible, local rank {local_rank} (FastVideo's \
                 cuda:{{local_rank % count}}; override with {DEVICE_ENV})"
            ),
        ),
        (None, None) => (
            Device::Cpu,
            "no CUDA device visible to this build (override with DIST_DEVICE)".to_string(),
        ),
    };
    if let Device::Cuda(n) = device {
        if visible > 0 && n >= visible {
            return Err(CommError::invalid(format!(
                "{device} does not exist: this process sees {visible} CUDA device(s)"
            )));
        }
    }
    tracing::info!(device = %device, "device chosen: {why}");
    Ok(device)
}

/// This host's identity: hostname and boot id (processes in network
/// namespaces of one machine share both, and also share its GPUs).
fn host_identity() -> String {
    let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_string());
    let host = read("/proc/sys/kernel/hostname").unwrap_or_default();
    let boot = read("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    format!("{host}/{boot}")
}

/// Whether two members of a group (of `world`, this one `rank`) use the
/// same physical GPU. Collective: every member publishes its host and GPU
/// identity in `store` and reads the others', so every member reaches the
/// same answer.
pub(crate) fn members_share_a_device(
    store: &Arc<dyn Store>,
    rank: usize,
    world: usize,
    device: Device,
    timeout: Duration,
) -> Result<Option<(usize, usize)>> {
    let uuid = comm_core::device_allocator(device)?.device_uuid(device)?;
    let me = format!("{}|{uuid}", host_identity());
    store.set(&format!("gpu-id/{rank}"), me.as_bytes())?;
    let mut ids = Vec::with_capacity(world);
    for r in 0..world {
        ids.push(store.get(&format!("gpu-id/{r}"), timeout)?);
    }
    for a in 0..world {
        for b in a + 1..world {
            if ids[a] == ids[b] {
                return Ok(Some((a, b)));
            }
        }
    }
    Ok(None)
}

/// Copies `t` to `device` (a host copy for `Device::Cpu`); CUDA needs the
/// `nccl` feature (its allocator) and a GPU, otherwise a clear error.
pub fn to_device(t: &Tensor, device: Device) -> Result<Tensor> {
    t.to_device(device)
}

/// What `GroupCoordinator::graph_capture` yields.
///
/// On CUDA with NCCL it holds the side stream captured collectives are
/// enqueued on (comm-nccl's `GraphCapture`); on CPU it is an empty marker
/// and capturing does nothing.
#[derive(Debug)]
pub struct GraphCaptureContext {
    local_rank: usize,
    cuda: bool,
}

impl GraphCaptureContext {
    pub(crate) fn new(local_rank: usize, cuda: bool) -> Self {
        GraphCaptureContext { local_rank, cuda }
    }
    /// True when the group's device plane is a CUDA backend whose stream
    /// can be captured; false on CPU (no-op).
    pub fn is_cuda(&self) -> bool {
        self.cuda
    }
    /// The local rank (CUDA ordinal) the context belongs to.
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }
}
