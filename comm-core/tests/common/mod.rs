//! Test helpers shared by comm-core's integration tests.

use std::any::Any;

use comm_core::{Device, DeviceMemory, DeviceStorage};

/// Host memory pretending to be on `cuda:0`, to exercise device code paths.
#[derive(Debug)]
#[allow(dead_code)]
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

#[allow(dead_code)]
pub mod mailbox;

type Shared = std::sync::Arc<(
    std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>,
    std::sync::Condvar,
)>;

/// An in-memory store for tests (comm-core cannot use dist-utils' stores).
#[derive(Debug, Clone, Default)]
pub struct MemStore(Shared);

#[allow(dead_code)]
impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }
}

impl comm_core::Store for MemStore {
    fn set(&self, key: &str, value: &[u8]) -> comm_core::Result<()> {
        self.0 .0.lock().unwrap().insert(key.into(), value.to_vec());
        self.0 .1.notify_all();
        Ok(())
    }
    fn get(&self, key: &str, timeout: std::time::Duration) -> comm_core::Result<Vec<u8>> {
        let end = std::time::Instant::now() + timeout;
        let mut g = self.0 .0.lock().unwrap();
        loop {
            if let Some(v) = g.get(key) {
                return Ok(v.clone());
            }
            let left = end.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(comm_core::CommError::timeout("get", timeout, [key]));
            }
            g = self.0 .1.wait_timeout(g, left).unwrap().0;
        }
    }
    fn try_get(&self, key: &str) -> comm_core::Result<Option<Vec<u8>>> {
        Ok(self.0 .0.lock().unwrap().get(key).cloned())
    }
    fn add(&self, key: &str, delta: i64) -> comm_core::Result<i64> {
        let mut g = self.0 .0.lock().unwrap();
        let v = g
            .get(key)
            .and_then(|b| std::str::from_utf8(b).ok()?.parse::<i64>().ok())
            .unwrap_or(0)
            + delta;
        g.insert(key.into(), v.to_string().into_bytes());
        self.0 .1.notify_all();
        Ok(v)
    }
    fn wait(&self, keys: &[&str], timeout: std::time::Duration) -> comm_core::Result<()> {
        for k in keys {
            self.get(k, timeout)?;
        }
        Ok(())
    }
    fn delete(&self, key: &str) -> comm_core::Result<bool> {
        Ok(self.0 .0.lock().unwrap().remove(key).is_some())
    }
    fn compare_set(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        desired: &[u8],
    ) -> comm_core::Result<Vec<u8>> {
        let mut g = self.0 .0.lock().unwrap();
        let cur = g.get(key).cloned();
        if cur.as_deref() == expected {
            g.insert(key.into(), desired.to_vec());
            return Ok(desired.to_vec());
        }
        Ok(cur.unwrap_or_default())
    }
    fn num_keys(&self) -> comm_core::Result<usize> {
        Ok(self.0 .0.lock().unwrap().len())
    }
}
