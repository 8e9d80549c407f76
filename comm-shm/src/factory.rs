//! [`ShmFactory`]: the shared-memory backend in the open registry.

use comm_core::{BackendFactory, CommError, Device, DeviceCommunicator, GroupContext, Result};

use crate::names::SHM_DIR;
use crate::{ShmCommunicator, ShmOptions};

/// Builds [`ShmCommunicator`]s for groups whose members share one host,
/// registered as `shm`; it moves host memory (`Device::Cpu`). Each group
/// gets the context's deadline and name; the other settings come from
/// [`ShmFactory::options`].
///
/// ```
/// use comm_core::{BackendFactory, Device, Registry};
/// let r = Registry::new().with(comm_shm::ShmFactory::default());
/// let f = r.get("shm").unwrap();
/// assert!(f.serves(Device::Cpu) && f.same_host_only());
/// ```
#[derive(Debug, Clone, Default)]
pub struct ShmFactory {
    /// Settings of every communicator it builds (the deadline and group name
    /// are taken from each [`GroupContext`]).
    pub options: ShmOptions,
}

impl ShmFactory {
    /// A factory with `options`.
    pub fn with_options(options: ShmOptions) -> Self {
        ShmFactory { options }
    }
}

impl BackendFactory for ShmFactory {
    fn name(&self) -> &str {
        "shm"
    }

    fn serves(&self, device: Device) -> bool {
        device == Device::Cpu
    }

    fn same_host_only(&self) -> bool {
        true
    }

    fn available(&self, _device: Device) -> Result<()> {
        if std::path::Path::new(SHM_DIR).is_dir() {
            Ok(())
        } else {
            Err(CommError::unavailable(
                "shm",
                format!(
                    "{SHM_DIR} does not exist; POSIX shared memory needs a tmpfs mounted there"
                ),
            ))
        }
    }

    fn create(&self, ctx: &GroupContext) -> Result<Box<dyn DeviceCommunicator>> {
        let opts = self
            .options
            .clone()
            .timeout(ctx.timeout)
            .group_name(ctx.group_name.clone());
        Ok(Box::new(ShmCommunicator::new(
            &*ctx.store,
            ctx.rank,
            ctx.world,
            opts,
        )?))
    }
}
