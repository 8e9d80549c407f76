//! Tensor constructors and views, the single-rank communicator, host staging,
//! and the string forms of DType / ReduceOp / Device.

use std::str::FromStr;
use std::time::Duration;

use comm_core::{
    bf16, f16, CommError, Communicator, DType, Device, Element, FrontOptions, HostBuffer, ReduceOp,
    SingleRank, Storage, Tensor, TensorMetadata,
};

mod common;
use common::FakeDevice;

fn device_tensor<T: Element>(data: &[T], shape: &[usize]) -> Tensor {
    let bytes = bytemuck::cast_slice(data).to_vec();
    Tensor::from_device_storage(Box::new(FakeDevice(bytes)), shape.to_vec(), T::DTYPE).unwrap()
}

fn aligned(t: &Tensor) -> bool {
    (t.as_bytes().unwrap().as_ptr() as usize).is_multiple_of(64)
}

// ---------------------------------------------------------------- constructors

#[test]
fn zeros_every_dtype() {
    for dt in DType::ALL {
        let t = Tensor::zeros([2, 3, 5], dt);
        assert_eq!(t.shape(), &[2, 3, 5]);
        assert_eq!(t.ndim(), 3);
        assert_eq!(t.dtype(), dt);
        assert_eq!(t.numel(), 30);
        assert_eq!(t.nbytes(), 30 * dt.size());
        assert!(t.is_host());
        assert_eq!(t.device(), Device::Cpu);
        assert!(t.as_bytes().unwrap().iter().all(|&b| b == 0));
        assert!(aligned(&t));
        assert!(t.device_storage().is_none());
    }
    let s = Tensor::zeros(Vec::<usize>::new(), DType::F64);
    assert_eq!((s.ndim(), s.numel(), s.nbytes()), (0, 1, 8));
    let e = Tensor::zeros([4, 0], DType::I8);
    assert_eq!((e.numel(), e.nbytes()), (0, 0));
    assert!(aligned(&e));
}

#[test]
fn typed_constructors() {
    let t = Tensor::from_vec(vec![1.5f32, -2.0, 3.0, 4.0, 5.0, 6.0], [3, 2]).unwrap();
    assert_eq!(t.dtype(), DType::F32);
    assert_eq!(
        t.as_slice::<f32>().unwrap(),
        &[1.5, -2.0, 3.0, 4.0, 5.0, 6.0]
    );
    let s = Tensor::from_slice(&[1u8, 2, 3], [3]).unwrap();
    assert_eq!(s.to_vec::<u8>().unwrap(), [1, 2, 3]);
    let v = Tensor::from_vec1(vec![bf16::from_f32(1.0), bf16::from_f32(2.0)]);
    assert_eq!((v.shape(), v.dtype()), (&[2usize][..], DType::BF16));
    let h = Tensor::from_vec1(vec![f16::ONE; 3]);
    assert_eq!(h.dtype(), DType::F16);
    let b = Tensor::from_bytes(&7i64.to_ne_bytes(), [1], DType::I64).unwrap();
    assert_eq!(b.to_vec::<i64>().unwrap(), [7]);
    let hb =
        Tensor::from_host_buffer(HostBuffer::from_bytes(&[1, 2, 3, 4]), [2], DType::BF16).unwrap();
    assert_eq!(hb.as_bytes().unwrap(), &[1, 2, 3, 4]);
    let i = Tensor::from_vec(vec![1i32, 2, 3, 4], [2, 2]).unwrap();
    assert_eq!(i.dtype(), DType::I32);
}

#[test]
fn constructor_errors() {
    let shape_err =
        |r: comm_core::Result<Tensor>| matches!(r, Err(CommError::ShapeMismatch { .. }));
    assert!(shape_err(Tensor::from_vec(vec![1.0f32; 5], [2, 3])));
    assert!(shape_err(Tensor::from_slice(&[1i8; 7], [2, 3])));
    assert!(shape_err(Tensor::from_bytes(&[0; 10], [3], DType::F32)));
    assert!(shape_err(Tensor::from_host_buffer(
        HostBuffer::zeroed(3),
        [2],
        DType::F16
    )));
    let dev = Box::new(FakeDevice(vec![0; 12]));
    assert!(shape_err(Tensor::from_device_storage(dev, [4], DType::F32)));
    // A shape whose element count overflows is an error, not a panic.
    assert!(matches!(
        Tensor::from_slice(&[0u8; 2], [usize::MAX, 2]),
        Err(CommError::InvalidArgument(_))
    ));
    assert!(Tensor::from_bytes(&[], [usize::MAX, 2, 2], DType::U8).is_err());
    let msg = Tensor::from_vec(vec![1.0f32; 5], [2, 3])
        .unwrap_err()
        .to_string();
    assert!(msg.contains('6') && msg.contains('5'), "{msg}");
}

#[test]
fn host_storage_is_64_byte_aligned() {
    for dt in DType::ALL {
        for n in [0usize, 1, 3, 15, 16, 17, 63, 64, 65, 1000, 4097] {
            let t = Tensor::zeros([n], dt);
            assert!(aligned(&t), "zeros {dt} {n}");
            let bytes = vec![0xA5u8; n * dt.size()];
            let t = Tensor::from_bytes(&bytes, [n], dt).unwrap();
            assert!(aligned(&t), "from_bytes {dt} {n}");
            assert_eq!(t.as_bytes().unwrap(), &bytes[..]);
            assert!(aligned(&t.to_host().unwrap()));
            assert!(aligned(&t.try_clone().unwrap()));
            assert!(aligned(&t.zeros_like().unwrap()));
        }
    }
    for n in [0usize, 1, 64, 100] {
        let b = HostBuffer::zeroed(n);
        assert_eq!(b.len(), n);
        assert_eq!(b.is_empty(), n == 0);
        assert_eq!(b.as_bytes().as_ptr() as usize % 64, 0);
        let mut c = HostBuffer::from_bytes(&vec![3u8; n]);
        assert_eq!(c.as_bytes_mut().as_ptr() as usize % 64, 0);
        assert!(c.as_bytes().iter().all(|&x| x == 3));
    }
    // Unaligned source data is copied into aligned storage.
    let raw = [0u8; 65];
    let t = Tensor::from_bytes(&raw[1..], [16], DType::F32).unwrap();
    assert!(aligned(&t));
    assert_eq!(t.as_slice::<f32>().unwrap().len(), 16);
}

// ---------------------------------------------------------------- views

#[test]
fn typed_views_and_dtype_mismatch() {
    let mut t = Tensor::from_vec(vec![1i32, 2, 3, 4], [2, 2]).unwrap();
    t.as_mut_slice::<i32>().unwrap()[3] = 40;
    assert_eq!(t.as_slice::<i32>().unwrap(), &[1, 2, 3, 40]);
    assert_eq!(t.to_vec::<i32>().unwrap(), [1, 2, 3, 40]);
    t.as_bytes_mut().unwrap()[..4].copy_from_slice(&9i32.to_ne_bytes());
    assert_eq!(t.to_vec::<i32>().unwrap()[0], 9);

    let e = t.as_slice::<f32>().unwrap_err();
    match &e {
        CommError::DTypeMismatch {
            expected, actual, ..
        } => {
            assert_eq!((expected.as_str(), actual.as_str()), ("i32", "f32"));
        }
        other => panic!("expected DTypeMismatch, got {other}"),
    }
    assert!(matches!(
        t.as_mut_slice::<f32>(),
        Err(CommError::DTypeMismatch { .. })
    ));
    assert!(matches!(
        t.to_vec::<i64>(),
        Err(CommError::DTypeMismatch { .. })
    ));
    let h = Tensor::zeros([2], DType::F16);
    assert!(h.as_slice::<bf16>().is_err());
    assert!(h.as_slice::<f16>().is_ok());
}

#[test]
fn reshape_and_set_shape() {
    let t = Tensor::from_vec((0..12i64).collect(), [3, 4]).unwrap();
    let r = t.reshape([2, 2, 3]).unwrap();
    assert_eq!(r.shape(), &[2, 2, 3]);
    assert_eq!(r.to_vec::<i64>().unwrap(), (0..12).collect::<Vec<_>>());
    let e = r.reshape([5, 2]).unwrap_err();
    assert!(matches!(e, CommError::ShapeMismatch { .. }), "{e}");
    let t = Tensor::zeros([6], DType::U8);
    assert!(matches!(
        t.reshape([usize::MAX, 3]),
        Err(CommError::InvalidArgument(_))
    ));
    let mut t = Tensor::zeros([6], DType::U8);
    t.set_shape([3, 2]).unwrap();
    assert_eq!(t.shape(), &[3, 2]);
    assert!(t.set_shape([7]).is_err());
    assert_eq!(
        t.shape(),
        &[3, 2],
        "a failed set_shape leaves the shape alone"
    );
    t.set_shape(Vec::<usize>::new()).unwrap_err();
    let mut one = Tensor::zeros([1, 1], DType::U8);
    one.set_shape(Vec::<usize>::new()).unwrap();
    assert_eq!(one.ndim(), 0);
}

#[test]
fn metadata_copies_and_equality() {
    let t = Tensor::from_vec(vec![1.0f64, 2.0, 3.0], [3, 1]).unwrap();
    let m = t.metadata();
    assert_eq!(
        m,
        TensorMetadata {
            device: Device::Cpu,
            dtype: DType::F64,
            shape: vec![3, 1]
        }
    );
    assert_eq!((m.numel(), m.nbytes()), (3, 24));
    let z = Tensor::zeros_on(&m).unwrap();
    assert_eq!(z.metadata(), m);
    assert_eq!(t.zeros_with_shape([5]).unwrap().shape(), &[5]);

    let c = t.try_clone().unwrap();
    assert_eq!(c, t);
    let mut d = t.zeros_like().unwrap();
    assert_ne!(d, t);
    d.copy_from(&t).unwrap();
    assert_eq!(d, t);
    // Same bytes, different shape or dtype: not equal.
    assert_ne!(t.try_clone().unwrap().reshape([3]).unwrap(), t);
    assert!(Tensor::zeros([3], DType::F32).copy_from(&t).is_err());
    assert!(Tensor::zeros([4], DType::F64).copy_from(&t).is_err());
    // copy_from only needs the same element count.
    let mut flat = Tensor::zeros([3], DType::F64);
    flat.copy_from(&t).unwrap();
    assert_eq!(flat.to_vec::<f64>().unwrap(), [1.0, 2.0, 3.0]);
    let buf = t.try_clone().unwrap().into_host_buffer().unwrap();
    assert_eq!(buf.len(), 24);
    assert!(matches!(t.storage(), Storage::Host(_)));
}

#[test]
fn device_storage_paths() {
    let mut dev = device_tensor(&[1.0f32, 2.0, 3.0, 4.0], &[2, 2]);
    assert!(!dev.is_host());
    assert_eq!(dev.device(), Device::Cuda(0));
    assert!(dev.device_storage().is_some());
    assert!(dev.device_storage_mut().is_some());
    // Host-only views refuse with a hint.
    let e = dev.as_bytes().unwrap_err();
    assert!(
        matches!(e, CommError::InvalidArgument(_)) && e.to_string().contains("to_host"),
        "{e}"
    );
    assert!(dev.as_bytes_mut().is_err());
    assert!(dev.as_slice::<f32>().is_err());
    // Copies through the host work.
    assert_eq!(dev.to_vec::<f32>().unwrap(), [1.0, 2.0, 3.0, 4.0]);
    let host = dev.to_host().unwrap();
    assert!(host.is_host() && aligned(&host));
    assert_eq!(dev, host);
    let src = Tensor::from_vec(vec![5.0f32, 6.0, 7.0, 8.0], [2, 2]).unwrap();
    dev.copy_from(&src).unwrap();
    assert_eq!(dev.to_vec::<f32>().unwrap(), [5.0, 6.0, 7.0, 8.0]);
    let other = device_tensor(&[9.0f32; 4], &[4]);
    dev.copy_from(&other).unwrap();
    assert_eq!(dev.to_vec::<f32>().unwrap(), [9.0; 4]);
    let z = dev.zeros_like().unwrap();
    assert_eq!(z.device(), Device::Cuda(0));
    assert_eq!(z.to_vec::<f32>().unwrap(), [0.0; 4]);
    let c = dev.try_clone().unwrap();
    assert_eq!(c, dev);
    assert!(dev.try_clone().unwrap().into_host_buffer().is_err());
    // zeros_on and to_device need an installed allocator for CUDA
    // (this test binary never installs one; tests/allocator.rs does).
    let m = dev.metadata();
    assert!(matches!(
        Tensor::zeros_on(&m),
        Err(CommError::BackendUnavailable { .. })
    ));
    assert!(matches!(
        src.to_device(Device::Cuda(0)),
        Err(CommError::BackendUnavailable { .. })
    ));
}

// ---------------------------------------------------------------- single rank

fn single(device: Device) -> Communicator {
    Communicator::new(
        Box::new(SingleRank::on(device)),
        FrontOptions::new("single-test"),
    )
}

#[test]
fn single_rank_identity() {
    let c = single(Device::Cpu);
    assert_eq!((c.backend(), c.rank(), c.world_size()), ("single", 0, 1));
    assert_eq!(c.device(), Device::Cpu);
    c.set_timeout(Duration::from_millis(1234));
    assert_eq!(c.timeout(), Duration::from_millis(1234));
    assert_eq!(single(Device::Cuda(2)).device(), Device::Cuda(2));
    check_single_rank(&c);
    // Clones share the member.
    check_single_rank(&c.clone());
}

fn check_single_rank(c: &Communicator) {
    let data = vec![-3i32, 0, 5, 7, 11, 2];
    let input = Tensor::from_vec(data.clone(), [2, 3]).unwrap();
    // all_reduce: identity for every op and dtype.
    for op in ReduceOp::ALL {
        let mut t = input.try_clone().unwrap();
        c.all_reduce(&mut t, op).unwrap();
        assert_eq!(t, input, "all_reduce {op}");
        for dt in DType::ALL {
            let bytes: Vec<u8> = (0..6 * dt.size()).map(|i| (i * 37 % 251) as u8).collect();
            let orig = Tensor::from_bytes(&bytes, [6], dt).unwrap();
            let mut t = orig.try_clone().unwrap();
            c.all_reduce(&mut t, op).unwrap();
            assert_eq!(t, orig, "all_reduce {op} {dt}");
        }
    }
    // all_gather / reduce_scatter / all_to_all copy (flat: shapes may differ).
    let mut out = Tensor::zeros([6], DType::I32);
    c.all_gather(&input, &mut out).unwrap();
    assert_eq!(out.to_vec::<i32>().unwrap(), data);
    let mut out = Tensor::zeros([3, 2], DType::I32);
    c.reduce_scatter(&input, &mut out, ReduceOp::Sum).unwrap();
    assert_eq!(out.to_vec::<i32>().unwrap(), data);
    let mut out = Tensor::zeros([6], DType::I32);
    c.all_to_all(&input, &mut out).unwrap();
    assert_eq!(out.to_vec::<i32>().unwrap(), data);
    // gather on the root.
    let mut out = Tensor::zeros([6], DType::I32);
    c.gather(&input, Some(&mut out), 0).unwrap();
    assert_eq!(out.to_vec::<i32>().unwrap(), data);
    // Caller-owned host slices work the same way.
    let mut v = data.clone();
    c.all_reduce(&mut v[..], ReduceOp::Max).unwrap();
    assert_eq!(v, data);
    let mut out = vec![0i32; 6];
    c.all_gather(&data, &mut out).unwrap();
    assert_eq!(out, data);
    // broadcast from 0 leaves the tensor.
    let mut t = input.try_clone().unwrap();
    c.broadcast(&mut t, 0).unwrap();
    assert_eq!(t, input);
    c.barrier().unwrap();

    // Errors.
    let mut wrong_n = Tensor::zeros([5], DType::I32);
    let mut wrong_t = Tensor::zeros([6], DType::F32);
    assert!(matches!(
        c.all_gather(&input, &mut wrong_n),
        Err(CommError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        c.all_gather(&input, &mut wrong_t),
        Err(CommError::DTypeMismatch { .. })
    ));
    assert!(matches!(
        c.reduce_scatter(&input, &mut wrong_n, ReduceOp::Sum),
        Err(CommError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        c.reduce_scatter(&input, &mut wrong_t, ReduceOp::Max),
        Err(CommError::DTypeMismatch { .. })
    ));
    assert!(matches!(
        c.all_to_all(&input, &mut wrong_n),
        Err(CommError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        c.all_to_all(&input, &mut wrong_t),
        Err(CommError::DTypeMismatch { .. })
    ));
    assert!(matches!(
        c.gather(&input, Some(&mut wrong_n), 0),
        Err(CommError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        c.gather(&input, None::<&mut Tensor>, 0),
        Err(CommError::InvalidArgument(_))
    ));
    assert!(matches!(
        c.gather(&input, None::<&mut Tensor>, 1),
        Err(CommError::InvalidArgument(_))
    ));
    let mut t = input.try_clone().unwrap();
    assert!(matches!(
        c.broadcast(&mut t, 1),
        Err(CommError::InvalidArgument(_))
    ));
    // Point to point: no peer exists in a group of one.
    for peer in [0, 1, 5] {
        let e = c.send(&input, peer).unwrap_err();
        assert!(matches!(e, CommError::InvalidArgument(_)), "{e}");
        let e = c.recv(&mut t, peer).unwrap_err();
        assert!(matches!(e, CommError::InvalidArgument(_)), "{e}");
    }
    let msg = c.send(&input, 0).unwrap_err().to_string();
    assert!(msg.contains("itself"), "{msg}");
    let msg = c.send(&input, 3).unwrap_err().to_string();
    assert!(msg.contains("out of range"), "{msg}");
}

#[test]
fn device_backends_refuse_memory_of_another_device() {
    let mut dev = device_tensor(&[1.0f32, 2.0], &[2]);
    let mut host = Tensor::from_vec1(vec![1.0f32]);
    let g = single(Device::Cuda(0));
    let e = g.all_reduce(&mut host, ReduceOp::Sum).unwrap_err();
    assert!(
        e.to_string().contains("cpu") && e.to_string().contains("cuda:0"),
        "{e}"
    );
    g.all_reduce(&mut dev, ReduceOp::Avg).unwrap();
    assert_eq!(dev.to_vec::<f32>().unwrap(), [1.0, 2.0]);
    assert!(single(Device::Cuda(1))
        .all_reduce(&mut dev, ReduceOp::Sum)
        .is_err());
}

#[test]
fn host_backends_take_device_memory_too() {
    let s = single(Device::Cpu);
    let mut dev = device_tensor(&[1i64, -2, 3, 4], &[4]);
    s.all_reduce(&mut dev, ReduceOp::Sum).unwrap();
    assert_eq!(dev.to_vec::<i64>().unwrap(), [1, -2, 3, 4]);
    assert_eq!(dev.device(), Device::Cuda(0));
    let mut out = device_tensor(&[0i64; 4], &[2, 2]);
    s.all_gather(&dev, &mut out).unwrap();
    assert_eq!(out.to_vec::<i64>().unwrap(), [1, -2, 3, 4]);
    let mut out = device_tensor(&[0i64; 4], &[4]);
    s.reduce_scatter(&dev, &mut out, ReduceOp::Prod).unwrap();
    assert_eq!(out.to_vec::<i64>().unwrap(), [1, -2, 3, 4]);
    let mut out = device_tensor(&[0i64; 4], &[4]);
    s.all_to_all(&dev, &mut out).unwrap();
    assert_eq!(out.to_vec::<i64>().unwrap(), [1, -2, 3, 4]);
    let mut out = device_tensor(&[0i64; 4], &[4]);
    s.gather(&dev, Some(&mut out), 0).unwrap();
    assert_eq!(out.to_vec::<i64>().unwrap(), [1, -2, 3, 4]);
    s.broadcast(&mut dev, 0).unwrap();
    // Mixed host input, device output.
    let host = Tensor::from_vec1(vec![8i64, 9, 10, 11]);
    s.all_gather(&host, &mut out).unwrap();
    assert_eq!(out.to_vec::<i64>().unwrap(), [8, 9, 10, 11]);
    let mut bad = device_tensor(&[0i64; 3], &[3]);
    assert!(matches!(
        s.all_gather(&dev, &mut bad),
        Err(CommError::ShapeMismatch { .. })
    ));
    assert!(s.send(&dev, 0).is_err());
    assert!(s.recv(&mut dev, 0).is_err());
}

// ---------------------------------------------------------------- names

#[test]
fn dtype_names_round_trip() {
    for dt in DType::ALL {
        assert_eq!(DType::from_str(dt.name()).unwrap(), dt);
        assert_eq!(dt.to_string().parse::<DType>().unwrap(), dt);
        assert_eq!(DType::from_str(&dt.name().to_uppercase()).unwrap(), dt);
        assert_eq!(DType::from_code(dt.code()).unwrap(), dt);
        assert_eq!(
            dt.is_float(),
            dt.name().starts_with('f') || dt.name() == "bf16"
        );
    }
    let sizes: Vec<usize> = DType::ALL.iter().map(|d| d.size()).collect();
    assert_eq!(sizes, [4, 8, 2, 2, 1, 1, 4, 8]);
    let codes: std::collections::HashSet<u8> = DType::ALL.iter().map(|d| d.code()).collect();
    assert_eq!(codes.len(), DType::ALL.len());
    for bad in ["", "float32", "f8", "i16", " f32"] {
        assert!(
            matches!(DType::from_str(bad), Err(CommError::InvalidArgument(_))),
            "{bad}"
        );
    }
    assert!(matches!(DType::from_code(200), Err(CommError::Protocol(_))));
    assert_eq!(
        [
            f32::DTYPE,
            f64::DTYPE,
            f16::DTYPE,
            bf16::DTYPE,
            i8::DTYPE,
            u8::DTYPE,
            i32::DTYPE,
            i64::DTYPE
        ],
        DType::ALL
    );
}

#[test]
fn reduce_op_names_round_trip() {
    for op in ReduceOp::ALL {
        assert_eq!(ReduceOp::from_str(op.name()).unwrap(), op);
        assert_eq!(op.to_string().parse::<ReduceOp>().unwrap(), op);
        assert_eq!(ReduceOp::from_str(&op.name().to_uppercase()).unwrap(), op);
    }
    let codes: std::collections::HashSet<u8> = ReduceOp::ALL.iter().map(|o| o.code()).collect();
    assert_eq!(codes.len(), 5);
    for bad in ["", "mean", "add", "sum "] {
        assert!(ReduceOp::from_str(bad).is_err(), "{bad}");
    }
}

#[test]
fn device_names_round_trip() {
    for d in [
        Device::Cpu,
        Device::Cuda(0),
        Device::Cuda(1),
        Device::Cuda(17),
    ] {
        assert_eq!(d.to_string().parse::<Device>().unwrap(), d);
        assert_eq!(d.is_cuda(), d != Device::Cpu);
    }
    assert_eq!(Device::from_str("cuda").unwrap(), Device::Cuda(0));
    assert_eq!(Device::Cuda(3).to_string(), "cuda:3");
    for bad in ["", "gpu", "cuda:", "cuda:x", "cuda:-1", "cpu:0"] {
        assert!(
            matches!(Device::from_str(bad), Err(CommError::InvalidArgument(_))),
            "{bad}"
        );
    }
}
