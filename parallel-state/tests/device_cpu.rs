//! The GPU-facing decisions of the group layer, tested on a machine without
//! a GPU: a fake CUDA allocator (host memory that says it is on `cuda:N`)
//! and a fake device backend stand in for comm-nccl.
//!
//! - the device choice follows FastVideo (`cuda:{local_rank % count}`);
//! - tensor-dict receivers allocate on their OWN device, not the sender's;
//! - members that share one GPU fall back to host staging (NCCL refuses two
//!   ranks on one device), while members on distinct GPUs get the device
//!   backend.
//!
//! Ranks are threads here (the allocator is per process); the multi-process
//! suites cover the rest.

use std::any::Any;
use std::sync::{Arc, Once};
use std::time::Duration;

use comm_core::{
    BackendFactory, BufMut, BufRef, Call, DeviceAllocator, DeviceCommunicator, DeviceMemory,
    DeviceStorage, GroupContext, P2p, Store,
};
use dist_utils::HashStore;
use parallel_state::{
    choose_device, CommError, DType, Device, DeviceRequest, InitOptions, ParallelState, ReduceOp,
    Result, Tensor, TensorDict, Value,
};

/// Host memory that says it lives on a CUDA device.
#[derive(Debug)]
struct FakeCuda {
    device: Device,
    bytes: Vec<u8>,
}

impl DeviceMemory for FakeCuda {
    fn device(&self) -> Device {
        self.device
    }
    fn len_bytes(&self) -> usize {
        self.bytes.len()
    }
    fn copy_to_host(&self, dst: &mut [u8]) -> Result<()> {
        dst.copy_from_slice(&self.bytes);
        Ok(())
    }
    fn copy_from_host(&mut self, src: &[u8]) -> Result<()> {
        self.bytes.copy_from_slice(src);
        Ok(())
    }
}

impl DeviceStorage for FakeCuda {
    fn alloc_zeroed(&self, len_bytes: usize) -> Result<Box<dyn DeviceStorage>> {
        Ok(Box::new(FakeCuda {
            device: self.device,
            bytes: vec![0; len_bytes],
        }))
    }
    fn try_clone(&self) -> Result<Box<dyn DeviceStorage>> {
        Ok(Box::new(FakeCuda {
            device: self.device,
            bytes: self.bytes.clone(),
        }))
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

/// Two fake GPUs, each with its own UUID.
#[derive(Debug)]
struct FakeAllocator;

impl DeviceAllocator for FakeAllocator {
    fn kind(&self) -> &str {
        "cuda"
    }
    fn device_count(&self) -> Result<usize> {
        Ok(2)
    }
    fn alloc_zeroed(&self, device: Device, len_bytes: usize) -> Result<Box<dyn DeviceStorage>> {
        Ok(Box::new(FakeCuda {
            device,
            bytes: vec![0; len_bytes],
        }))
    }
    fn device_uuid(&self, device: Device) -> Result<String> {
        Ok(format!("GPU-fake-{device}"))
    }
}

fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| comm_core::install_device_allocator(Arc::new(FakeAllocator)));
}

/// A device backend that must never be asked to move bytes: these tests
/// only look at whether the group layer chooses it.
#[derive(Debug)]
struct Unused {
    rank: usize,
    world: usize,
    device: Device,
}

fn unused() -> Result<()> {
    Err(CommError::State("the fake device backend was used".into()))
}

impl DeviceCommunicator for Unused {
    fn backend(&self) -> &str {
        "fakegpu"
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn device(&self) -> Device {
        self.device
    }
    fn all_reduce(&mut self, _: &Call<'_>, _: BufMut<'_>, _: ReduceOp) -> Result<()> {
        unused()
    }
    fn all_gather(&mut self, _: &Call<'_>, _: BufRef<'_>, _: BufMut<'_>) -> Result<()> {
        unused()
    }
    fn reduce_scatter(
        &mut self,
        _: &Call<'_>,
        _: BufRef<'_>,
        _: BufMut<'_>,
        _: ReduceOp,
    ) -> Result<()> {
        unused()
    }
    fn broadcast(&mut self, _: &Call<'_>, _: BufMut<'_>, _: usize) -> Result<()> {
        unused()
    }
    fn gather(
        &mut self,
        _: &Call<'_>,
        _: BufRef<'_>,
        _: Option<BufMut<'_>>,
        _: usize,
    ) -> Result<()> {
        unused()
    }
    fn all_to_all(&mut self, _: &Call<'_>, _: BufRef<'_>, _: BufMut<'_>) -> Result<()> {
        unused()
    }
    fn send_recv(&mut self, _: &Call<'_>, _: &mut [P2p<'_>]) -> Result<()> {
        unused()
    }
    fn barrier(&mut self, _: &Call<'_>) -> Result<()> {
        unused()
    }
}

#[derive(Debug)]
struct FakeGpuFactory;

impl BackendFactory for FakeGpuFactory {
    fn name(&self) -> &str {
        "fakegpu"
    }
    fn serves(&self, device: Device) -> bool {
        device.is_cuda()
    }
    fn create(&self, ctx: &GroupContext) -> Result<Box<dyn DeviceCommunicator>> {
        Ok(Box::new(Unused {
            rank: ctx.rank,
            world: ctx.world,
            device: ctx.device,
        }))
    }
}

/// Runs `f(rank, state)` for `devices.len()` thread ranks, rank `r` on
/// `devices[r]`, over one in-memory store; results in rank order.
fn ranks<R: Send + 'static>(
    devices: Vec<Device>,
    extra: Option<Arc<dyn BackendFactory>>,
    f: impl Fn(usize, ParallelState) -> R + Send + Sync + 'static,
) -> Vec<R> {
    install();
    let world = devices.len();
    let store: Arc<dyn Store> = Arc::new(HashStore::new());
    let f = Arc::new(f);
    let hs: Vec<_> = devices
        .into_iter()
        .enumerate()
        .map(|(r, d)| {
            let (store, f, extra) = (store.clone(), f.clone(), extra.clone());
            std::thread::spawn(move || {
                let mut opts = InitOptions::default()
                    .with_device(d)
                    .with_timeout(Duration::from_secs(30));
                if let Some(x) = extra {
                    opts = opts.with_factory(x);
                }
                let ps = ParallelState::with_store(store, r, world, r, opts).expect("state");
                f(r, ps)
            })
        })
        .collect();
    hs.into_iter()
        .map(|h| h.join().expect("rank panicked"))
        .collect()
}

#[test]
fn device_choice_follows_fastvideo() {
    install();
    // Two GPUs visible: local rank 3 takes cuda:1, as FastVideo's
    // cuda:{local_rank % count}.
    assert_eq!(
        choose_device(DeviceRequest::Auto, 3).unwrap(),
        Device::Cuda(1)
    );
    assert_eq!(
        choose_device(DeviceRequest::LocalCuda, 2).unwrap(),
        Device::Cuda(0)
    );
    assert_eq!(choose_device(DeviceRequest::Cpu, 1).unwrap(), Device::Cpu);
    assert_eq!(
        choose_device(DeviceRequest::Exact(Device::Cuda(1)), 0).unwrap(),
        Device::Cuda(1)
    );
    let e = choose_device(DeviceRequest::Exact(Device::Cuda(5)), 0).unwrap_err();
    assert!(e.to_string().contains("cuda:5"), "{e}");
    assert_eq!(
        "cuda".parse::<DeviceRequest>().unwrap(),
        DeviceRequest::LocalCuda
    );
}

#[test]
fn tensor_dict_receivers_allocate_on_their_own_device() {
    let out = ranks(vec![Device::Cuda(0), Device::Cuda(1)], None, |r, ps| {
        let w = ps.world_group();
        assert_eq!(ps.local_device(), Device::Cuda(r));
        let host = Tensor::from_vec1(vec![1i32, 2, 3]);
        let dict = (r == 0).then(|| {
            let mut d = TensorDict::new();
            let x = Tensor::from_vec(vec![1.5f32, -2.0, 4.0, 8.0], [2, 2]).unwrap();
            d.insert("x", x.to_device(Device::Cuda(0)).unwrap());
            d.insert("host", host.try_clone().unwrap());
            d.insert("step", 7i64);
            d
        });
        let got = w.broadcast_tensor_dict(dict, 0).unwrap();
        let x = got.tensor("x").unwrap();
        let devices = (x.device(), got.tensor("host").unwrap().device());
        let values = x.to_vec::<f32>().unwrap();
        assert_eq!(got.get("step"), Some(&Value::Int(7)));
        // Point to point as well.
        let sent = if r == 0 {
            let mut d = TensorDict::new();
            d.insert(
                "y",
                Tensor::from_vec1(vec![9u8; 5])
                    .to_device(Device::Cuda(0))
                    .unwrap(),
            );
            w.send_tensor_dict(&d, Some(1), None).unwrap();
            None
        } else {
            let d = w.recv_tensor_dict(Some(0), None).unwrap().expect("a dict");
            let y = d.tensor("y").unwrap();
            Some((y.device(), y.to_vec::<u8>().unwrap()))
        };
        (devices, values, sent)
    });
    // The receiver's tensor is on ITS device (cuda:1), never the sender's.
    assert_eq!(out[1].0, (Device::Cuda(1), Device::Cpu));
    assert_eq!(out[0].0, (Device::Cuda(0), Device::Cpu));
    assert_eq!(out[1].1, [1.5, -2.0, 4.0, 8.0]);
    assert_eq!(out[1].2, Some((Device::Cuda(1), vec![9u8; 5])));
}

#[test]
fn members_sharing_a_gpu_fall_back_to_host_staging() {
    let factory: Arc<dyn BackendFactory> = Arc::new(FakeGpuFactory);
    // Both ranks on cuda:0 (one physical GPU): no device backend; device
    // tensors are staged through the host backend and still move.
    let shared = ranks(
        vec![Device::Cuda(0), Device::Cuda(0)],
        Some(factory.clone()),
        |r, ps| {
            let w = ps.world_group();
            let mut t = Tensor::from_vec1(vec![r as f32 + 1.0; 4])
                .to_device(Device::Cuda(0))
                .unwrap();
            w.all_reduce(&mut t, ReduceOp::Sum).unwrap();
            (
                w.device_backend().map(str::to_string),
                t.to_vec::<f32>().unwrap(),
            )
        },
    );
    for (backend, sum) in &shared {
        assert_eq!(
            backend, &None,
            "ranks on one GPU must not get the device backend"
        );
        assert_eq!(sum, &vec![3.0f32; 4]);
    }
    // Distinct GPUs: the device backend is chosen.
    let distinct = ranks(
        vec![Device::Cuda(0), Device::Cuda(1)],
        Some(factory),
        |_, ps| ps.world_group().device_backend().map(str::to_string),
    );
    assert_eq!(
        distinct,
        [Some("fakegpu".to_string()), Some("fakegpu".to_string())]
    );
}

#[test]
fn host_only_ranks_refuse_cuda_tensor_dicts_clearly() {
    let out = ranks(vec![Device::Cuda(0), Device::Cpu], None, |r, ps| {
        let w = ps.world_group();
        let dict = (r == 0).then(|| {
            let mut d = TensorDict::new();
            d.insert(
                "x",
                Tensor::zeros([2], DType::F32)
                    .to_device(Device::Cuda(0))
                    .unwrap(),
            );
            d
        });
        w.broadcast_tensor_dict(dict, 0)
            .err()
            .map(|e| e.to_string())
    });
    let e = out[1]
        .as_ref()
        .expect("the CPU rank must refuse a CUDA tensor");
    assert!(
        e.contains("CUDA tensor") && e.contains("DIST_DEVICE"),
        "{e}"
    );
}
