//! Host backends moving device memory (feature `nccl`, which installs the
//! CUDA allocator): 2 and 3 processes sharing GPU 0, every
//! buffer a CUDA tensor that the front stages through host memory. Skipped
//! with a message where no GPU is visible (`COMM_CONFORMANCE_REQUIRE=1`
//! makes that a failure).
#![cfg(feature = "nccl")]

use std::sync::Arc;

use comm_conformance::{Kit, Mode};
use comm_core::{BackendFactory, Device};

fn on_gpu(factory: Arc<dyn BackendFactory>, world: usize) -> Kit {
    comm_nccl::install();
    Kit::new(factory)
        .world(world)
        .mode(Mode::Basic)
        .device(Device::Cuda(0))
}

#[test]
fn tcp_staged_world_2() {
    on_gpu(Arc::new(comm_cpu::TcpFactory::default()), 2).run_processes();
}

#[test]
fn shm_staged_world_3() {
    on_gpu(Arc::new(comm_shm::ShmFactory::default()), 3).run_processes();
}
