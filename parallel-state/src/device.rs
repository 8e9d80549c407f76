//! The device side of a process: which device it uses (FastVideo's choice:
//! `cuda:{local_rank % count}` when CUDA is visible), whether members of a
//! group share one GPU, and graph capture.

use std::sync::Arc;
use std::time::Duration;

use comm_core::{CommError, Device, Result, Store, Tensor};

/// Environment variable overriding the device choice: `cpu`, `cuda` (the
/// local rank's GPU) or `cuda:N`.
pub const DEVICE_ENV: &str = "DIST_DEVICE";

/// A device as users ask for it: by name (`auto`, `cpu`, `cuda` for the
/// local rank's GPU, `cuda:N`), resolved by [`choose_device`].
///
/// ```
/// use parallel_state::{Device, DeviceRequest};
/// assert_eq!("cuda".parse::<DeviceRequest>().unwrap(), DeviceRequest::LocalCuda);
/// assert_eq!("cuda:1".parse::<DeviceRequest>().unwrap(), DeviceRequest::Exact(Device::Cuda(1)));
/// assert!("gpu".parse::<DeviceRequest>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceRequest {
    /// FastVideo's rule: the local rank's GPU when CUDA devices are visible,
    /// else the CPU ([`DEVICE_ENV`] overrides it).
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// `cuda:{local_rank % count}`; an error when no GPU is usable.
    LocalCuda,
    /// Exactly this device.
    Exact(Device),
}

impl std::str::FromStr for DeviceRequest {
    type Err = CommError;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" | "gpu:local" => Ok(DeviceRequest::LocalCuda),
            other => other
                .parse::<Device>()
                .map(DeviceRequest::Exact)
                .map_err(|_| {
                    CommError::invalid(format!(
                        "`{s}` is not a device; expected auto, cpu, cuda or cuda:N"
                    ))
                }),
        }
    }
}

impl From<Device> for DeviceRequest {
    fn from(d: Device) -> Self {
        DeviceRequest::Exact(d)
    }
}

/// Resolves this process's device: an explicit `requested` wins, then
/// [`DEVICE_ENV`] (when `requested` is `Auto`), then FastVideo's rule:
/// `cuda:{local_rank % count}` when CUDA devices are visible (needs the
/// `nccl` feature, which installs the CUDA allocator), else the CPU. Logs one
/// line saying what was chosen and why.
pub fn choose_device(requested: DeviceRequest, local_rank: usize) -> Result<Device> {
    let visible = comm_core::visible_devices();
    let (req, source) = match requested {
        DeviceRequest::Auto => match std::env::var(DEVICE_ENV) {
            Ok(s) if !s.trim().is_empty() => (s.parse()?, format!("{DEVICE_ENV}={s}")),
            _ => (DeviceRequest::Auto, String::new()),
        },
        r => (r, "requested by InitOptions::device".to_string()),
    };
    let local = |why: String| -> Result<(Device, String)> {
        if visible == 0 {
            return Err(CommError::unavailable(
                "cuda",
                format!(
                    "{why} asks for the local GPU, but no CUDA device is usable in this process \
                     (build with the `nccl` feature and check the NVIDIA driver)"
                ),
            ));
        }
        Ok((
            Device::Cuda(local_rank % visible),
            format!("{why}: local rank {local_rank} of {visible} visible device(s)"),
        ))
    };
    let (device, why) = match req {
        DeviceRequest::Cpu => (Device::Cpu, source),
        DeviceRequest::LocalCuda => local(source)?,
        DeviceRequest::Exact(d) => (d, source),
        DeviceRequest::Auto if visible > 0 => local(format!(
            "{visible} CUDA device(s) visible (FastVideo's cuda:{{local_rank % count}}; override \
             with {DEVICE_ENV})"
        ))?,
        DeviceRequest::Auto => (
            Device::Cpu,
            format!("no CUDA device visible to this build (override with {DEVICE_ENV})"),
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
