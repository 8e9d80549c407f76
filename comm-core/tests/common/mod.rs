//! Test helpers shared by comm-core's integration tests.

use std::any::Any;

use comm_core::{Device, DeviceMemory, DeviceStorage};

/// Host memory pretending to be on `cuda:0`, to exercise device code paths.
#[derive(Debug)]
pub struct FakeDevice(pub Vec<u8>);

impl DeviceMemory for FakeDevice {
    fn device(&self) -> Device {
        Device::Cuda(0)
    }
    fn len_bytes(&self) -> usize {
        self.0.len()
    }
    fn copy_to_host(&self, dst: &mut [u8]) -> comm_core::Result<()> {
        dst.copy_from_slice(&self.0);
        Ok(())
    }
    fn copy_from_host(&mut self, src: &[u8]) -> comm_core::Result<()> {
        self.0.copy_from_slice(src);
        Ok(())
    }
}

impl DeviceStorage for FakeDevice {
    fn alloc_zeroed(&self, len_bytes: usize) -> comm_core::Result<Box<dyn DeviceStorage>> {
        Ok(Box::new(FakeDevice(vec![0; len_bytes])))
    }
    fn try_clone(&self) -> comm_core::Result<Box<dyn DeviceStorage>> {
        Ok(Box::new(FakeDevice(self.0.clone())))
    }
    fn as_memory(&self) -> &dyn DeviceMemory {
        self
    }
    fn as_memory_mut(&mut self) -> &mut dyn DeviceMemory {
        self
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
