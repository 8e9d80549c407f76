//! [`NcclFactory`]: the NCCL backend in comm-core's open registry.

use comm_core::{BackendFactory, CommError, Device, DeviceCommunicator, GroupContext, Result};

use crate::{install, nccl_available, NcclCommunicator, NcclOptions};

/// Makes [`NcclCommunicator`]s: registered as `nccl`, serves CUDA devices.
/// Using it installs the CUDA device allocator ([`install`]).
///
/// ```
/// use comm_core::{BackendFactory, Device};
/// let f = comm_nccl::NcclFactory;
/// assert_eq!(f.name(), "nccl");
/// assert!(f.serves(Device::Cuda(0)) && !f.serves(Device::Cpu));
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct NcclFactory;

fn ordinal(device: Device) -> Result<usize> {
    match device {
        Device::Cuda(n) => Ok(n),
        Device::Cpu => Err(CommError::unavailable(
            "nccl",
            "NCCL moves CUDA memory; host groups use tcp or shm",
        )),
    }
}

impl BackendFactory for NcclFactory {
    fn name(&self) -> &str {
        "nccl"
    }
    fn serves(&self, device: Device) -> bool {
        matches!(device, Device::Cuda(_))
    }
    fn available(&self, device: Device) -> Result<()> {
        install();
        let n = ordinal(device)?;
        let info = nccl_available()?;
        if n >= info.cuda_devices {
            return Err(CommError::unavailable(
                "nccl",
                format!(
                    "cuda:{n} does not exist; {} CUDA device(s) visible",
                    info.cuda_devices
                ),
            ));
        }
        Ok(())
    }
    fn create(&self, ctx: &GroupContext) -> Result<Box<dyn DeviceCommunicator>> {
        install();
        let opts = NcclOptions::new(ordinal(ctx.device)?)
            .timeout(ctx.timeout)
            .key("unique_id")
            .label(ctx.group_name.clone());
        Ok(Box::new(NcclCommunicator::new(
            ctx.store.as_ref(),
            ctx.rank,
            ctx.world,
            opts,
        )?))
    }
}
