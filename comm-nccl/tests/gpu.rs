//! GPU tests. Each one checks for a usable GPU (and NCCL where needed)
//! first and prints `skipped: no GPU (reason)` when there is none, so they
//! pass on CPU-only machines and CI; with `DIST_GPU_REQUIRED=1` (what
//! `gpu/check.sh` sets) a missing GPU, NCCL or NVRTC is a failure instead.
//!
//! Results are compared with values computed independently on the host:
//! out-of-place outputs start as a sentinel and sit between guard bytes, so
//! a call that writes nothing, writes the wrong place or too much fails.
//! One GPU allows NCCL groups of one member only (NCCL refuses two ranks on
//! one device); reductions across members are the conformance suite's job
//! on machines with several GPUs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use comm_core::layout::PermutePlan;
use comm_core::{
    AsBufMut, BufMut, BufRef, Call, CallDesc, Collective, CommError, DType, Device,
    DeviceCommunicator, DeviceMemory, Element, GroupContext, Mem, MemMut, ReduceOp, Registry,
    Tensor,
};
use comm_nccl::{CudaDevice, NcclCommunicator, NcclFactory, NcclOptions};
use cudarc::driver::{CudaSlice, CudaStream};

fn required() -> bool {
    std::env::var("DIST_GPU_REQUIRED").is_ok_and(|v| v == "1")
}

fn skipped(what: &str, why: impl std::fmt::Display) {
    assert!(
        !required(),
        "DIST_GPU_REQUIRED=1 but {what} is unavailable: {why}"
    );
    eprintln!("skipped: no {what} ({why})");
}

fn gpu() -> Option<Arc<CudaDevice>> {
    match comm_nccl::cuda_device_count().and_then(|_| CudaDevice::get(0)) {
        Ok(d) => {
            eprintln!("GPU: {}", d.name().unwrap_or_else(|e| e.to_string()));
            Some(d)
        }
        Err(e) => {
            skipped("GPU", e);
            None
        }
    }
}

fn nccl1() -> Option<(Arc<CudaDevice>, NcclCommunicator)> {
    let dev = gpu()?;
    if let Err(e) = comm_nccl::nccl_available() {
        skipped("NCCL", e);
        return None;
    }
    let store = dist_utils::HashStore::new();
    let opts = NcclOptions::new(0)
        .timeout(Duration::from_secs(60))
        .label("gpu-test");
    let c = NcclCommunicator::new(&store, 0, 1, opts).expect("world-1 NCCL communicator");
    Some((dev, c))
}

fn call(op: Collective, dtype: DType, n: usize, timeout: Duration) -> Call<'static> {
    Call::new(CallDesc::new(op, 0, dtype, n), timeout, "gpu-test")
}

fn call60(op: Collective, dtype: DType, n: usize) -> Call<'static> {
    call(op, dtype, n, Duration::from_secs(60))
}

/// Distinct values of `dtype`, as bytes.
fn sample(dtype: DType, n: usize, salt: usize) -> Vec<u8> {
    fn mk<T: Element>(n: usize, salt: usize) -> Vec<u8> {
        let v: Vec<T> = (0..n)
            .map(|i| T::from_f64(((i * 7 + salt * 13) % 101) as f64 - 37.0))
            .collect();
        Tensor::from_vec1(v).as_bytes().unwrap().to_vec()
    }
    match dtype {
        DType::F32 => mk::<f32>(n, salt),
        DType::F64 => mk::<f64>(n, salt),
        DType::F16 => mk::<comm_core::f16>(n, salt),
        DType::BF16 => mk::<comm_core::bf16>(n, salt),
        DType::I8 => mk::<i8>(n, salt),
        DType::U8 => (0..n).map(|i| ((i * 7 + salt * 13) % 251) as u8).collect(),
        DType::I32 => mk::<i32>(n, salt),
        DType::I64 => mk::<i64>(n, salt),
    }
}

const SENTINEL: u8 = 0xA5;
const GUARD: usize = 64;

fn upload(dev: &CudaDevice, bytes: &[u8]) -> CudaSlice<u8> {
    let s = dev.stream();
    let d = s.clone_htod(bytes).expect("upload");
    s.synchronize().expect("upload");
    d
}

fn download(m: &dyn DeviceMemory) -> Vec<u8> {
    let mut v = vec![0u8; m.len_bytes()];
    m.copy_to_host(&mut v).expect("download");
    v
}

/// A sentinel-filled buffer of `len` bytes between guards: returns it and
/// the byte range callers may write.
fn guarded(dev: &CudaDevice, len: usize) -> (CudaSlice<u8>, std::ops::Range<usize>) {
    (
        upload(dev, &vec![SENTINEL; len + 2 * GUARD]),
        GUARD..GUARD + len,
    )
}

/// `inside` between sentinel guards.
fn framed(inside: &[u8]) -> Vec<u8> {
    let mut v = vec![SENTINEL; GUARD];
    v.extend_from_slice(inside);
    v.extend_from_slice(&[SENTINEL; GUARD]);
    v
}

fn rd<'a>(m: &'a dyn DeviceMemory, d: DType) -> BufRef<'a> {
    BufRef::new(Mem::Device(m), d).unwrap()
}

fn wr<'a>(m: &'a mut dyn DeviceMemory, d: DType) -> BufMut<'a> {
    BufMut::new(MemMut::Device(m), d).unwrap()
}

#[test]
fn tensors_allocate_upload_and_clone_on_the_device() {
    let Some(_dev) = gpu() else { return };
    comm_nccl::install();
    assert!(comm_core::visible_devices() > 0);
    for d in DType::ALL {
        for n in [0usize, 1, 17, 4099] {
            let h = Tensor::from_bytes(&sample(d, n, 3), [n], d).unwrap();
            let g = h.to_device(Device::Cuda(0)).unwrap();
            assert_eq!(g.device(), Device::Cuda(0));
            assert_eq!(g.to_host().unwrap(), h, "{d} x {n}");
            assert_eq!(g.try_clone().unwrap().to_host().unwrap(), h);
            let z = Tensor::zeros_on(&g.metadata()).unwrap();
            assert_eq!(z.to_host().unwrap(), Tensor::zeros([n], d));
        }
    }
}

#[test]
fn device_uuid_is_stable_and_nonzero() {
    let Some(_dev) = gpu() else { return };
    let a = comm_nccl::device_uuid(0).unwrap();
    assert_eq!(a, comm_nccl::device_uuid(0).unwrap());
    assert!(a.iter().any(|b| *b != 0));
    eprintln!("cuda:0 is {}", comm_nccl::format_uuid(&a));
}

/// Every collective and dtype through the raw backend at world 1 (the
/// front answers one-member groups itself): out-of-place results land in
/// the right place, in-place results are the member's own contribution.
#[test]
fn world1_every_op_and_dtype_against_host_values() {
    let Some((dev, mut c)) = nccl1() else { return };
    let n = 1000;
    for d in DType::ALL {
        let nb = n * d.size();
        let x = sample(d, n, 1);
        for op in ReduceOp::ALL {
            let mut b = upload(&dev, &x);
            c.all_reduce(&call60(Collective::AllReduce, d, n), wr(&mut b, d), op)
                .unwrap();
            c.synchronize().unwrap();
            assert_eq!(download(&b), x, "all_reduce {d} {op}");
        }
        // Three gathers of distinct inputs into consecutive thirds of one
        // output: each call writes exactly its own third.
        let inputs: Vec<Vec<u8>> = (0..3).map(|k| sample(d, n, 10 + k)).collect();
        let (mut out, range) = guarded(&dev, 3 * nb);
        for (k, x) in inputs.iter().enumerate() {
            let src = upload(&dev, x);
            let at = range.start + k * nb;
            let mut view = out.slice_mut(at..at + nb);
            c.all_gather(
                &call60(Collective::AllGather, d, n),
                rd(&src, d),
                wr(&mut view, d),
            )
            .unwrap();
        }
        c.synchronize().unwrap();
        assert_eq!(download(&out), framed(&inputs.concat()), "all_gather {d}");

        let src = upload(&dev, &x);
        for (name, op) in [
            ("reduce_scatter", Collective::ReduceScatter),
            ("gather", Collective::Gather),
            ("all_to_all", Collective::AllToAll),
        ] {
            let (mut out, range) = guarded(&dev, nb);
            {
                let mut view = out.slice_mut(range);
                let o = wr(&mut view, d);
                let cl = call60(op, d, n);
                match op {
                    Collective::ReduceScatter => {
                        c.reduce_scatter(&cl, rd(&src, d), o, ReduceOp::Sum)
                    }
                    Collective::Gather => c.gather(&cl, rd(&src, d), Some(o), 0),
                    _ => c.all_to_all(&cl, rd(&src, d), o),
                }
                .unwrap();
            }
            c.synchronize().unwrap();
            assert_eq!(download(&out), framed(&x), "{name} {d}");
        }
        let mut b = upload(&dev, &x);
        c.broadcast(&call60(Collective::Broadcast, d, n), wr(&mut b, d), 0)
            .unwrap();
        c.barrier(&call60(Collective::Barrier, DType::F32, 1))
            .unwrap();
        c.synchronize().unwrap();
        assert_eq!(download(&b), x, "broadcast {d}");
    }
    // Host memory is refused by the backend itself, not moved.
    let mut host = vec![1f32; 4];
    let e = c
        .all_reduce(
            &call60(Collective::AllReduce, DType::F32, 4),
            host.as_buf_mut().unwrap(),
            ReduceOp::Sum,
        )
        .unwrap_err();
    assert!(matches!(e, CommError::InvalidArgument(_)), "{e}");
}

/// A user's own cudarc buffers (typed slices and views), through the
/// checked front built by the registry.
#[test]
fn front_takes_borrowed_cudarc_buffers() {
    let Some((dev, _)) = nccl1() else { return };
    let store: Arc<dyn comm_core::Store> = Arc::new(dist_utils::HashStore::new());
    let ctx = GroupContext::new(store, 0, 1)
        .device(Device::Cuda(0))
        .timeout(Duration::from_secs(60))
        .group_name("front");
    let comm = Registry::new()
        .with(NcclFactory)
        .create("nccl", &ctx)
        .unwrap();
    assert_eq!(comm.backend(), "nccl");
    let s = dev.stream();
    let x: Vec<comm_core::bf16> = (0..300)
        .map(|i| comm_core::bf16::from_f32(i as f32 - 7.5))
        .collect();
    let input = s.clone_htod(&x).unwrap();
    let mut out = s.alloc_zeros::<comm_core::bf16>(300).unwrap();
    comm.all_gather(&input, &mut out).unwrap();
    let mut sum = s.clone_htod(&[1.5f32, -2.0, 4.0]).unwrap();
    comm.all_reduce(&mut sum, ReduceOp::Avg).unwrap();
    // A view of part of a buffer.
    let mut big = s.alloc_zeros::<comm_core::bf16>(600).unwrap();
    {
        let mut view = big.slice_mut(300..600);
        comm.all_gather(&input, &mut view).unwrap();
    }
    comm.synchronize().unwrap();
    assert_eq!(s.clone_dtoh(&out).unwrap(), x);
    assert_eq!(s.clone_dtoh(&sum).unwrap(), [1.5f32, -2.0, 4.0]);
    let back = s.clone_dtoh(&big).unwrap();
    assert!(back[..300].iter().all(|v| v.to_f32() == 0.0));
    assert_eq!(back[300..], x[..]);
    // Host memory on a CUDA communicator is an argument error, not a copy.
    let host = vec![0f32; 3];
    let mut hout = vec![0f32; 3];
    assert!(matches!(
        comm.all_gather(&host, &mut hout),
        Err(CommError::InvalidArgument(_))
    ));
    // The NCCL communicator behind the front.
    let event = comm_nccl::with_nccl(&comm, |n| n.record_event())
        .unwrap()
        .unwrap();
    s.wait(&event).unwrap();
}

/// A one-thread kernel that occupies a stream until the test releases it
/// (a flag in pinned, device-mapped host memory that it polls) or until
/// its own limit passes on the GPU's clock: GPU work that blocks the stream
/// without blocking any driver thread. (A host function that waits for the
/// test would also block the driver's callback thread, and CUDA forbids
/// host functions to wait on anything that depends on other CUDA work:
/// what the test observes then is undefined.)
struct Spin {
    /// Host address of the flags: `[release, started, finished]`.
    flags: *mut u32,
    stream: Arc<CudaStream>,
    _kernel: cudarc::driver::CudaFunction,
}

const SPIN_SRC: &str = r#"
extern "C" __global__ void spin(volatile unsigned int* flags, unsigned long long limit_ns) {
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  flags[1] = 1;
  __threadfence_system();
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  } while (flags[0] == 0 && t - t0 < limit_ns);
  flags[2] = 1;
  __threadfence_system();
}
"#;

impl Spin {
    /// Launches the kernel on `stream`; `None` (skipped) without NVRTC.
    fn start(dev: &CudaDevice, stream: &Arc<CudaStream>, limit: Duration) -> Option<Spin> {
        use cudarc::driver::{sys, LaunchConfig, PushKernelArg};
        let ctx = dev.context();
        let mut opts = cudarc::nvrtc::CompileOptions::default();
        if let Ok((a, b)) = ctx.compute_capability() {
            opts.options
                .push(format!("--gpu-architecture=compute_{a}{b}"));
        }
        // cudarc panics when libnvrtc cannot be loaded.
        let ptx =
            match std::panic::catch_unwind(|| cudarc::nvrtc::compile_ptx_with_opts(SPIN_SRC, opts))
            {
                Ok(Ok(ptx)) => ptx,
                Ok(Err(e)) => panic!("NVRTC failed on the spin kernel: {e:?}"),
                Err(_) => {
                    skipped("NVRTC (the test's spin kernel)", "libnvrtc did not load");
                    return None;
                }
            };
        let module = ctx.load_module(ptx).expect("loading the spin kernel");
        let kernel = module.load_function("spin").expect("spin entry point");
        let flags = {
            // SAFETY: 16 bytes of pinned host memory, mapped for the device.
            let p = unsafe {
                cudarc::driver::result::malloc_host(
                    16,
                    sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE,
                )
            }
            .expect("cuMemHostAlloc") as *mut u32;
            for i in 0..4 {
                // SAFETY: inside the 16-byte allocation.
                unsafe { p.add(i).write_volatile(0) };
            }
            p
        };
        let mut dflags: sys::CUdeviceptr = 0;
        // SAFETY: `flags` is mapped pinned memory of this context.
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dflags, flags.cast(), 0) }
            .result()
            .expect("cuMemHostGetDevicePointer");
        let limit_ns = limit.as_nanos() as u64;
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(&kernel);
        b.arg(&dflags).arg(&limit_ns);
        // SAFETY: the kernel reads and writes the three flags only; the
        // memory stays allocated until `Drop` has synchronised the stream.
        unsafe { b.launch(cfg) }.expect("launching the spin kernel");
        let spin = Spin {
            flags,
            stream: stream.clone(),
            _kernel: kernel,
        };
        let t0 = Instant::now();
        while !spin.flag(1) {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the spin kernel did not start"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        Some(spin)
    }
    fn flag(&self, i: usize) -> bool {
        // SAFETY: inside the live allocation; the device writes it.
        unsafe { self.flags.add(i).read_volatile() != 0 }
    }
    /// Whether the kernel has returned.
    fn finished(&self) -> bool {
        self.flag(2)
    }
    fn release(&self) {
        // SAFETY: inside the live allocation; the kernel polls it.
        unsafe { self.flags.write_volatile(1) };
    }
}

impl Drop for Spin {
    fn drop(&mut self) {
        self.release();
        // The kernel must be gone before its flags are freed; if the stream
        // cannot be synchronised, leak them instead.
        if self.stream.synchronize().is_ok() {
            // SAFETY: allocated by cuMemHostAlloc; no kernel uses it now.
            let _ = unsafe { cudarc::driver::result::free_host(self.flags.cast()) };
        }
    }
}

fn within(what: &str, limit: Duration, cond: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < limit,
            "{what} did not happen within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Calls return once enqueued; fences and synchronize tell completion.
#[test]
fn calls_return_before_completion_and_fences_tell_when_done() {
    let Some((dev, mut c)) = nccl1() else { return };
    let x = sample(DType::F32, 1 << 20, 4);
    let src = upload(&dev, &x);
    let (mut out, range) = guarded(&dev, x.len());
    let stream = c.stream().clone();
    let Some(spin) = Spin::start(&dev, &stream, Duration::from_secs(60)) else {
        return;
    };
    let t0 = Instant::now();
    {
        let mut view = out.slice_mut(range);
        c.all_gather(
            &call60(Collective::AllGather, DType::F32, 1 << 20),
            rd(&src, DType::F32),
            wr(&mut view, DType::F32),
        )
        .unwrap();
    }
    let enqueue = t0.elapsed();
    let mut fence = c.fence().unwrap().expect("NCCL gives fences");
    assert!(
        !fence.poll().unwrap(),
        "the work cannot be done: its stream is busy"
    );
    assert!(!spin.finished());
    spin.release();
    c.synchronize().unwrap();
    assert!(spin.finished());
    assert!(fence.poll().unwrap());
    assert_eq!(download(&out), framed(&x));
    eprintln!("enqueue returned in {enqueue:?} while the stream was busy");
}

/// A call whose work cannot finish by its deadline (its stream is busy
/// with a kernel the test holds): the watchdog stores the Timeout while the
/// stream is still blocked, the next call fails at once, and the
/// communicator is aborted. (`gpu/check.sh` runs this one in a process of
/// its own.)
#[test]
fn watchdog_times_out_a_blocked_stream() {
    let Some((dev, mut c)) = nccl1() else { return };
    let x = sample(DType::F32, 1 << 20, 5);
    let src = upload(&dev, &x);
    let mut out = upload(&dev, &vec![0u8; x.len()]);
    let stream = c.stream().clone();
    let Some(spin) = Spin::start(&dev, &stream, Duration::from_secs(60)) else {
        return;
    };
    let t0 = Instant::now();
    // World 1: NCCL copies the input behind the kernel.
    c.all_gather(
        &call(
            Collective::AllGather,
            DType::F32,
            1 << 20,
            Duration::from_secs(1),
        ),
        rd(&src, DType::F32),
        wr(&mut out, DType::F32),
    )
    .unwrap();
    within("the watchdog timeout", Duration::from_secs(20), || {
        c.error().is_some()
    });
    let waited = t0.elapsed();
    assert!(
        !spin.finished(),
        "the timeout must come while the stream is still blocked"
    );
    match c.error() {
        Some(CommError::Timeout { keys, .. }) => {
            assert!(
                keys.iter()
                    .any(|k| k.contains("members of group `gpu-test`")),
                "{keys:?}"
            );
        }
        other => panic!("expected a Timeout, got {other:?}"),
    }
    assert!(waited >= Duration::from_secs(1), "{waited:?}");
    let t1 = Instant::now();
    let next = c.barrier(&call60(Collective::Barrier, DType::F32, 1));
    let refused = t1.elapsed();
    assert!(matches!(next, Err(CommError::Timeout { .. })), "{next:?}");
    assert!(refused < Duration::from_secs(1), "{refused:?}");
    within("the abort", Duration::from_secs(10), || c.raw().is_closed());
    let held = t0.elapsed();
    spin.release();
    let t2 = Instant::now();
    drop(c);
    drop(spin);
    eprintln!(
        "watchdog fired after {waited:?} with the stream blocked (held {held:?}); \
         the next call was refused in {refused:?}; dropping the aborted communicator took {:?}",
        t2.elapsed()
    );
}

/// `[r, c]` read as row-major and written transposed, as host bytes.
fn transpose_host(plan: &PermutePlan, x: &[u8]) -> Vec<u8> {
    let mut y = vec![0u8; x.len()];
    plan.run_host(&mut y, x);
    y
}

/// A captured NCCL call plus a kernel, replayed N times: the data shows
/// the N-fold effect (so a capture that recorded nothing, or a replay that
/// does nothing, fails).
#[test]
fn graph_capture_replays_n_fold() {
    let Some((dev, mut c)) = nccl1() else { return };
    let (r, cols) = (24usize, 40usize);
    let d = DType::F32;
    let plan = PermutePlan::new(&[r, cols], &[1, 0], 4).unwrap();
    let x0 = sample(d, r * cols, 6);
    let mut x = upload(&dev, &x0);
    let mut y = upload(&dev, &vec![0u8; x0.len()]);
    let capture = c.begin_capture().unwrap();
    // y <- x through NCCL, then x <- transpose(y) with the permute kernel.
    c.all_gather(
        &call60(Collective::AllGather, d, r * cols),
        rd(&x, d),
        wr(&mut y, d),
    )
    .unwrap();
    assert!(
        comm_nccl::permute(&capture, &plan, &y, &mut x).unwrap(),
        "no permute kernel"
    );
    let graph = c.end_capture().unwrap();
    capture.synchronize().unwrap();
    assert_eq!(download(&x), x0, "capturing must not run the work");
    const N: usize = 3;
    for _ in 0..N {
        graph.launch().unwrap();
    }
    capture.synchronize().unwrap();
    let mut want = x0.clone();
    for _ in 0..N {
        want = transpose_host(&plan, &want);
    }
    assert_ne!(want, x0, "the test needs a permutation that moves data");
    assert_ne!(
        want,
        transpose_host(&plan, &x0),
        "N-fold must differ from one replay"
    );
    assert_eq!(download(&x), want, "{N} replays");
    assert_eq!(download(&y), {
        let mut prev = x0.clone();
        for _ in 0..N - 1 {
            prev = transpose_host(&plan, &prev);
        }
        prev
    });
    // The communicator works normally after the capture.
    c.barrier(&call60(Collective::Barrier, d, 1)).unwrap();
    c.synchronize().unwrap();
}

/// The front-level capture API: capture the step's own kernel on the
/// stream `graph_capture` returns.
#[test]
fn graph_capture_through_the_front() {
    let Some((dev, _)) = nccl1() else { return };
    let store: Arc<dyn comm_core::Store> = Arc::new(dist_utils::HashStore::new());
    let ctx = GroupContext::new(store, 0, 1)
        .device(Device::Cuda(0))
        .group_name("g");
    let comm = Registry::new()
        .with(NcclFactory)
        .create("nccl", &ctx)
        .unwrap();
    let plan = PermutePlan::new(&[8, 12], &[1, 0], 2).unwrap();
    let x0 = sample(DType::BF16, 96, 2);
    let x = upload(&dev, &x0);
    let mut y = upload(&dev, &vec![0u8; x0.len()]);
    let cap = comm_nccl::graph_capture(&comm).unwrap();
    assert!(comm_nccl::permute(cap.stream(), &plan, &x, &mut y).unwrap());
    let stream = cap.stream().clone();
    let graph = cap.finish().unwrap();
    stream.synchronize().unwrap();
    assert!(
        download(&y).iter().all(|b| *b == 0),
        "nothing runs before launch"
    );
    graph.launch().unwrap();
    stream.synchronize().unwrap();
    assert_eq!(download(&y), transpose_host(&plan, &x0));
}

/// The layouts all_gather(dim) and all_to_all_4D use, transposes, and
/// misaligned views, bit-exact on the device against the host plan, for
/// every dtype; through `comm_nccl::permute` and through tensors.
///
/// parallel-state's device all_to_all_4D / all_gather(dim) tests run these
/// same kernels through its group layer (gpu/check.sh runs them).
#[test]
fn device_permute_matches_host_bit_exact() {
    let Some(dev) = gpu() else { return };
    comm_nccl::install();
    if let Err(e) = dev.kernels() {
        skipped("NVRTC (device permute kernels)", e);
        return;
    }
    let cases: [(&[usize], &[usize]); 10] = [
        (&[4, 6, 10], &[1, 0, 2]),             // all_gather dim 1, P = 4
        (&[2, 8, 4, 3, 64], &[2, 0, 1, 3, 4]), // a2a 4D (2, 1) before
        (&[4, 2, 8, 3, 64], &[1, 0, 2, 3, 4]), // a2a 4D (2, 1) after
        (&[2, 4, 8, 3, 64], &[1, 0, 2, 3, 4]), // a2a 4D (1, 2) before
        (&[4, 2, 8, 3, 64], &[1, 2, 0, 3, 4]), // a2a 4D (1, 2) after
        (&[3, 5, 7, 2, 3, 2], &[5, 3, 1, 0, 2, 4]),
        (&[9, 13], &[1, 0]),
        (&[33, 65, 3], &[2, 1, 0]),
        (&[2, 3, 4, 5, 6, 3], &[4, 2, 0, 3, 1, 5]),
        (&[2, 3, 4, 5], &[2, 1, 0, 3]),
    ];
    let s = dev.stream().clone();
    for d in DType::ALL {
        let es = d.size();
        for (view, perm) in cases {
            let plan = PermutePlan::new(view, perm, es).unwrap();
            let x = sample(d, plan.numel, 5);
            let want = transpose_host(&plan, &x);
            // Aligned buffers, then both misaligned by one element.
            for shift in [0, es] {
                let src_all = upload(&dev, &[vec![0u8; shift], x.clone()].concat());
                let (mut out, range) = guarded(&dev, x.len() + shift);
                {
                    let src = src_all.slice(shift..);
                    let mut dst = out.slice_mut(range.start + shift..range.end);
                    assert!(
                        comm_nccl::permute(&s, &plan, &src, &mut dst).unwrap(),
                        "kernel refused {view:?}"
                    );
                }
                let mut expect = vec![SENTINEL; shift];
                expect.extend_from_slice(&want);
                assert_eq!(
                    download(&out),
                    framed(&expect),
                    "{d} {view:?} {perm:?} shift {shift}"
                );
            }
            let t = Tensor::from_bytes(&x, view.to_vec(), d).unwrap();
            let g = t.to_device(Device::Cuda(0)).unwrap();
            let p = comm_core::layout::permute_view(&g, view, perm).unwrap();
            assert_eq!(p.device(), Device::Cuda(0));
            assert_eq!(
                p.to_host().unwrap(),
                comm_core::layout::permute_view(&t, view, perm).unwrap()
            );
        }
    }
}
