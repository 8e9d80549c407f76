//! GPU tests. Each one checks for a usable GPU (and NCCL where needed) first
//! and prints `skipped: no GPU (reason)` when there is none, so they pass on
//! CPU-only machines and CI. Multi-process conformance with device tensors is
//! the conformance suite's job, not this file's.

use std::sync::Arc;
use std::time::Duration;

use comm_core::{CommError, DType, DeviceCommunicator, Element, ReduceOp, Tensor};
use comm_nccl::layout::{permute, permute_host};
use comm_nccl::{CudaDevice, NcclCommunicator, NcclOptions};

fn gpu() -> Option<Arc<CudaDevice>> {
    match comm_nccl::cuda_device_count().and_then(|_| CudaDevice::get(0)) {
        Ok(d) => {
            eprintln!("GPU: {}", d.name().unwrap_or_else(|e| e.to_string()));
            Some(d)
        }
        Err(e) => {
            eprintln!("skipped: no GPU ({e})");
            None
        }
    }
}

fn nccl_world1() -> Option<(Arc<CudaDevice>, NcclCommunicator)> {
    let dev = gpu()?;
    if let Err(e) = comm_nccl::nccl_available() {
        eprintln!("skipped: no NCCL ({e})");
        return None;
    }
    let store = dist_utils::HashStore::new();
    let opts = NcclOptions {
        timeout: Duration::from_secs(60),
        label: "gpu-test".into(),
        ..Default::default()
    };
    let c = NcclCommunicator::new(Arc::new(store), 0, 1, opts).expect("world-1 NCCL communicator");
    Some((dev, c))
}

fn sample(dtype: DType, n: usize, salt: usize) -> Tensor {
    fn mk<T: Element>(n: usize, salt: usize) -> Tensor {
        Tensor::from_vec1(
            (0..n)
                .map(|i| T::from_f64(((i * 7 + salt) % 23) as f64 - 5.0))
                .collect::<Vec<T>>(),
        )
    }
    match dtype {
        DType::F32 => mk::<f32>(n, salt),
        DType::F64 => mk::<f64>(n, salt),
        DType::F16 => mk::<comm_core::f16>(n, salt),
        DType::BF16 => mk::<comm_core::bf16>(n, salt),
        DType::I8 => mk::<i8>(n, salt),
        DType::U8 => Tensor::from_vec1(
            (0..n)
                .map(|i| ((i * 7 + salt) % 23) as u8)
                .collect::<Vec<u8>>(),
        ),
        DType::I32 => mk::<i32>(n, salt),
        DType::I64 => mk::<i64>(n, salt),
    }
}

#[test]
fn storage_round_trip() {
    let Some(dev) = gpu() else { return };
    for d in DType::ALL {
        for n in [0usize, 1, 17, 4099] {
            let h = sample(d, n, 3);
            let g = dev.to_device(&h).unwrap();
            assert_eq!(g.device(), comm_core::Device::Cuda(0));
            assert_eq!(g.to_host().unwrap(), h, "{d} x {n}");
            let c = g.try_clone().unwrap();
            assert_eq!(c.to_host().unwrap(), h);
        }
    }
}

#[test]
fn world1_every_op_and_dtype_matches_host_reference() {
    let Some((dev, mut c)) = nccl_world1() else {
        return;
    };
    let mut reference = comm_core::SingleRankCommunicator::new();
    for d in DType::ALL {
        let n = 1000;
        for op in ReduceOp::ALL {
            let h = sample(d, n, 1);
            let mut g = dev.to_device(&h).unwrap();
            c.all_reduce(&mut g, op).unwrap();
            let mut want = h.try_clone().unwrap();
            reference.all_reduce(&mut want, op).unwrap();
            assert_eq!(g.to_host().unwrap(), want, "all_reduce {d} {op}");
        }
        let h = sample(d, n, 2);
        let g = dev.to_device(&h).unwrap();
        let mut out = g.zeros_like().unwrap();
        c.all_gather(&g, &mut out).unwrap();
        assert_eq!(out.to_host().unwrap(), h, "all_gather {d}");
        let mut out = g.zeros_like().unwrap();
        c.reduce_scatter(&g, &mut out, ReduceOp::Sum).unwrap();
        assert_eq!(out.to_host().unwrap(), h, "reduce_scatter {d}");
        let mut b = dev.to_device(&h).unwrap();
        c.broadcast(&mut b, 0).unwrap();
        assert_eq!(b.to_host().unwrap(), h, "broadcast {d}");
        let mut out = g.zeros_like().unwrap();
        c.gather(&g, Some(&mut out), 0).unwrap();
        assert_eq!(out.to_host().unwrap(), h, "gather {d}");
        let mut out = g.zeros_like().unwrap();
        c.all_to_all(&g, &mut out).unwrap();
        assert_eq!(out.to_host().unwrap(), h, "all_to_all {d}");
    }
    c.barrier().unwrap();
    assert!(matches!(
        c.send(&dev.zeros([1], DType::F32).unwrap(), 0),
        Err(CommError::InvalidArgument(_))
    ));
    assert!(matches!(
        c.all_reduce(&mut Tensor::from_vec1(vec![1f32]), ReduceOp::Sum),
        Err(CommError::InvalidArgument(_))
    ));
}

#[test]
fn world1_graph_capture_replays() {
    let Some((dev, mut c)) = nccl_world1() else {
        return;
    };
    let mut t = dev
        .to_device(&Tensor::from_vec1(vec![1f32, 2.0, 3.0]))
        .unwrap();
    let graph = {
        let mut g = c.graph_capture().unwrap();
        g.begin_capture().unwrap();
        g.comm().all_reduce(&mut t, ReduceOp::Sum).unwrap();
        g.end_capture().unwrap()
    };
    if let Some(graph) = graph {
        graph.launch().unwrap();
    }
    c.synchronize().unwrap();
    assert_eq!(t.to_vec::<f32>().unwrap(), [1.0, 2.0, 3.0]);
}

/// The layouts all_gather(dim) and all_to_all_4D use, bit-exact on device
/// against the host copy.
#[test]
fn device_permute_matches_host_bit_exact() {
    let Some(dev) = gpu() else { return };
    let cases: Vec<(Vec<usize>, Vec<usize>)> = vec![
        (vec![4, 6, 10], vec![1, 0, 2]),             // all_gather dim 1, P=4
        (vec![4, 1, 60], vec![1, 0, 2]),             // all_gather dim 0
        (vec![2, 8, 4, 3, 64], vec![2, 0, 1, 3, 4]), // a2a 4D (2,1) before
        (vec![4, 2, 8, 3, 64], vec![1, 0, 2, 3, 4]), // a2a 4D (2,1) after
        (vec![2, 4, 8, 3, 64], vec![1, 0, 2, 3, 4]), // a2a 4D (1,2) before
        (vec![4, 2, 8, 3, 64], vec![1, 2, 0, 3, 4]), // a2a 4D (1,2) after
        (vec![3, 5, 7, 2, 3, 2], vec![5, 3, 1, 0, 2, 4]), // odd sizes, 6-D
        (vec![9, 13], vec![1, 0]),
    ];
    for d in DType::ALL {
        for (view, perm) in &cases {
            let n: usize = view.iter().product();
            let h = sample(d, n, 5).reshape(view.clone()).unwrap();
            let want = permute_host(&h, view, perm).unwrap();
            // The host layout module of comm-core agrees with the host plan.
            let core = comm_core::layout::permute(&h, perm).unwrap();
            assert_eq!(
                core, want,
                "comm_core::layout::permute {d} {view:?} {perm:?}"
            );
            let g = dev.to_device(&h).unwrap();
            let got = permute(&g, view, perm).unwrap();
            assert_eq!(got.shape(), want.shape());
            assert_eq!(
                got.to_host().unwrap(),
                want,
                "{d} view {view:?} perm {perm:?}"
            );
        }
    }
}
