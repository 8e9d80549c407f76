//! [`TcpFactory`]: the TCP backend in the [`comm_core::Registry`].

use comm_core::{BackendFactory, Device, DeviceCommunicator, GroupContext, Result};

use crate::{TcpCommunicator, TcpOptions};

/// Builds [`TcpCommunicator`]s for the registry, under the name `tcp`. It
/// moves host memory (device memory is staged by the front) and works
/// across hosts.
///
/// Options come from the environment ([`TcpOptions::default`]: bind
/// address rules, tuning variables); the group's name, size and deadline
/// from the [`GroupContext`]. [`TcpFactory::with_options`] fixes them
/// instead.
///
/// ```
/// use std::sync::Arc;
/// use comm_core::{GroupContext, ReduceOp, Registry, Store};
/// let store: Arc<dyn Store> = Arc::new(dist_utils::HashStore::new());
/// let registry = Registry::new().with(comm_cpu::TcpFactory::default());
/// let handles: Vec<_> = (0..2)
///     .map(|rank| {
///         let (store, registry) = (store.clone(), registry.clone());
///         std::thread::spawn(move || {
///             let ctx = GroupContext::new(store, rank, 2).group_name("demo");
///             let comm = registry.create("tcp", &ctx).unwrap();
///             let mut v = vec![rank as f32 + 1.0; 4];
///             comm.all_reduce(&mut v, ReduceOp::Sum).unwrap();
///             v
///         })
///     })
///     .collect();
/// for h in handles {
///     assert_eq!(h.join().unwrap(), vec![3.0; 4]);
/// }
/// ```
#[derive(Debug, Clone, Default)]
pub struct TcpFactory {
    options: Option<TcpOptions>,
}

impl TcpFactory {
    /// A factory that uses `options` (their group name and set-up deadline
    /// are replaced by the context's).
    pub fn with_options(options: TcpOptions) -> Self {
        TcpFactory {
            options: Some(options),
        }
    }
}

impl BackendFactory for TcpFactory {
    fn name(&self) -> &str {
        "tcp"
    }
    fn serves(&self, device: Device) -> bool {
        device == Device::Cpu
    }
    fn create(&self, ctx: &GroupContext) -> Result<Box<dyn DeviceCommunicator>> {
        let mut o = self.options.clone().unwrap_or_default();
        o.group_name = ctx.group_name.clone();
        o.connect_timeout = ctx.timeout;
        let c = TcpCommunicator::new(ctx.store.clone(), ctx.rank, ctx.world, o)?;
        Ok(Box::new(c))
    }
}
