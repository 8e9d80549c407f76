//! GPU performance figures of comm-nccl, measured in one run (issue 9.8):
//!
//! 1. the device permute behind all_to_all_4D and all_gather(dim) at 64 MiB
//!    and more, as a share of the GPU's memory bandwidth (bytes read +
//!    written per second), next to torch doing the same transposes
//!    (`x.permute(...).contiguous()`, run by `gpu/torch_permute.py` in the
//!    same job) — target: >= 70% of peak;
//! 2. the overhead of `NcclCommunicator::all_reduce` over a raw
//!    `ncclAllReduce` through the raw layer on the same stream, world 1,
//!    per op over many iterations timed with CUDA events — target: <= 5% at
//!    8 B and 64 MiB.
//!
//! `gpu_bench [--quick] [--torch-script PATH] [--skip-torch]`. Exits 2 when a
//! target is missed, 1 on errors, 0 otherwise.

use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

use comm_core::layout::PermutePlan;
use comm_core::{
    BufMut, Call, CallDesc, Collective, DType, DeviceCommunicator, MemMut, ReduceOp, Result,
};
use comm_nccl::raw::{NcclDataType, NcclRedOp, Progress};
use comm_nccl::{CudaDevice, NcclCommunicator, NcclOptions};
use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut};

fn timed(
    stream: &CudaStream,
    iters: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<(f64, f64)> {
    let err = |e| comm_core::CommError::Cuda(format!("timing events: {e:?}"));
    let start = stream
        .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(err)?;
    let t0 = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    let end = stream
        .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(err)?;
    end.synchronize().map_err(err)?;
    let wall = t0.elapsed().as_secs_f64() * 1e6 / iters as f64;
    let gpu = f64::from(start.elapsed_ms(&end).map_err(err)?) * 1e3 / iters as f64;
    Ok((gpu, wall))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Case {
    name: &'static str,
    dtype: DType,
    view: Vec<usize>,
    perm: Vec<usize>,
    gated: bool,
}

fn cases(quick: bool) -> Vec<Case> {
    // Ulysses sequence parallelism with P = 8, bf16 [B, S, H, D] activations.
    let (p, h, d) = (8usize, 32usize, 128usize);
    let mut v = Vec::new();
    let sizes: &[(usize, usize)] = if quick {
        &[(2, 4096)]
    } else {
        &[(2, 4096), (2, 16384)]
    };
    for &(b, s) in sizes {
        let sp = s / p;
        let hp = h / p;
        v.push(Case {
            name: "a2a_4d(2,1) pre",
            dtype: DType::BF16,
            view: vec![b, sp, p, hp, d],
            perm: vec![2, 0, 1, 3, 4],
            gated: true,
        });
        v.push(Case {
            name: "a2a_4d(2,1) post",
            dtype: DType::BF16,
            view: vec![p, b, sp, hp, d],
            perm: vec![1, 0, 2, 3, 4],
            gated: true,
        });
        v.push(Case {
            name: "a2a_4d(1,2) pre",
            dtype: DType::BF16,
            view: vec![b, p, sp, hp, d],
            perm: vec![1, 0, 2, 3, 4],
            gated: true,
        });
        v.push(Case {
            name: "a2a_4d(1,2) post",
            dtype: DType::BF16,
            view: vec![p, b, sp, hp, d],
            perm: vec![1, 2, 0, 3, 4],
            gated: true,
        });
        // all_gather along the last dim of [B*S, H*D / P] shards.
        v.push(Case {
            name: "all_gather(dim=-1)",
            dtype: DType::BF16,
            view: vec![p, b * s, h * d / p],
            perm: vec![1, 0, 2],
            gated: true,
        });
    }
    // A transpose of the innermost dim (tiled kernel), reported, not gated.
    v.push(Case {
        name: "transpose [S,H]->[H,S]",
        dtype: DType::F32,
        view: vec![8192, 4096],
        perm: vec![1, 0],
        gated: false,
    });
    v
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// Peak DRAM bandwidth from the device attributes (bytes/s), if reported.
fn peak_bandwidth(dev: &CudaDevice) -> Option<(f64, i32, i32)> {
    let ctx = dev.context();
    let clock = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)
        .ok()?;
    let bus = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)
        .ok()?;
    (clock > 0 && bus > 0).then(|| {
        (
            2.0 * f64::from(clock) * 1e3 * f64::from(bus) / 8.0,
            clock,
            bus,
        )
    })
}

fn dtype_name(d: DType) -> &'static str {
    d.name()
}

fn list(v: &[usize]) -> String {
    v.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Runs the torch script on the same cases; `name -> us per op`.
fn torch(
    script: &str,
    cases: &[(String, &Case, usize)],
) -> std::result::Result<Vec<(String, f64)>, String> {
    let mut cmd = Command::new(std::env::var("PYTHON").unwrap_or_else(|_| "python3".into()));
    cmd.arg(script);
    for (key, c, iters) in cases {
        cmd.arg(format!(
            "{key}:{}:{}:{}:{iters}",
            dtype_name(c.dtype),
            list(&c.view),
            list(&c.perm)
        ));
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {script}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{script} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut it = l.strip_prefix("RESULT ")?.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect())
}

fn permute_bench(dev: &Arc<CudaDevice>, quick: bool, script: Option<&str>) -> Result<bool> {
    let stream = dev.stream().clone();
    let err = |e| comm_core::CommError::Cuda(format!("{e:?}"));
    let peak = peak_bandwidth(dev);
    // Device-to-device memcpy of 256 MiB as the practical copy ceiling.
    let n = 256usize << 20;
    let src = stream.alloc_zeros::<u8>(n).map_err(err)?;
    let mut dst = stream.alloc_zeros::<u8>(n).map_err(err)?;
    let (memcpy_us, _) = timed(&stream, if quick { 5 } else { 20 }, || {
        stream.memcpy_dtod(&src, &mut dst).map_err(err)
    })?;
    let memcpy_bw = 2.0 * n as f64 / (memcpy_us * 1e-6);
    drop((src, dst));
    match peak {
        Some((p, clock, bus)) => println!(
            "memory: peak {:.0} GB/s (memory clock {} MHz x {} bit x 2), cuMemcpyDtoD {:.0} GB/s ({:.0}% of peak)",
            p / 1e9,
            clock / 1000,
            bus,
            memcpy_bw / 1e9,
            100.0 * memcpy_bw / p
        ),
        None => println!(
            "memory: the device reports no memory clock; cuMemcpyDtoD {:.0} GB/s is the reference",
            memcpy_bw / 1e9
        ),
    }
    let reference = peak.map_or(memcpy_bw, |p| p.0);
    if dev.kernels().is_err() {
        println!(
            "permute: FAIL: the device permute kernels are unavailable (NVRTC): {:?}",
            dev.kernels().err()
        );
        return Ok(false);
    }
    let cases = cases(quick);
    let mut rows = Vec::new();
    let mut torch_cases = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let plan = PermutePlan::new(&c.view, &c.perm, c.dtype.size())?;
        let bytes = plan.numel * plan.elem_size;
        let iters = ((4usize << 30) / bytes).clamp(5, 200) / if quick { 4 } else { 1 };
        let src = stream.alloc_zeros::<u8>(bytes).map_err(err)?;
        let mut dst = stream.alloc_zeros::<u8>(bytes).map_err(err)?;
        for _ in 0..3 {
            if !comm_nccl::permute(&stream, &plan, &src, &mut dst)? {
                println!("permute: FAIL: {} was refused by the kernel", c.name);
                return Ok(false);
            }
        }
        let (us, _) = timed(&stream, iters.max(1), || {
            comm_nccl::permute(&stream, &plan, &src, &mut dst).map(|_| ())
        })?;
        let key = format!("case{i}");
        torch_cases.push((key.clone(), c, iters.max(1)));
        rows.push((key, c, bytes, us));
    }
    let torch_times = match script {
        None => Err("skipped (--skip-torch)".to_string()),
        Some(s) => torch(s, &torch_cases),
    };
    if let Err(e) = &torch_times {
        println!("torch: {e}");
    }
    println!(
        "{:<24} {:<22} {:>5} {:>8} | {:>9} {:>6} | {:>9} {:>6} | {:>8}",
        "permute",
        "view",
        "dtype",
        "MiB",
        "ours GB/s",
        "%peak",
        "torch GB/s",
        "%peak",
        "ours/torch"
    );
    let mut ok = true;
    for (key, c, bytes, us) in &rows {
        let bw = 2.0 * *bytes as f64 / (us * 1e-6);
        let t = torch_times
            .as_ref()
            .ok()
            .and_then(|v| v.iter().find(|(k, _)| k == key).map(|(_, t)| *t));
        let tb = t.map(|t| 2.0 * *bytes as f64 / (t * 1e-6));
        let pass = !c.gated || *bytes < (64 << 20) || bw >= 0.7 * reference;
        ok &= pass;
        println!(
            "{:<24} {:<22} {:>5} {:>8.0} | {:>9.0} {:>5.0}% | {:>10} {:>6} | {:>8} {}",
            c.name,
            format!("{:?}", c.view),
            dtype_name(c.dtype),
            mib(*bytes),
            bw / 1e9,
            100.0 * bw / reference,
            tb.map_or("-".into(), |b| format!("{:.0}", b / 1e9)),
            tb.map_or("-".into(), |b| format!("{:.0}%", 100.0 * b / reference)),
            tb.map_or("-".into(), |b| format!("{:.2}", bw / b)),
            if !c.gated {
                ""
            } else if pass {
                "ok"
            } else {
                "BELOW 70%"
            }
        );
    }
    println!(
        "permute: {} (target: every all_to_all_4D / all_gather(dim) copy of >= 64 MiB at >= 70% of {:.0} GB/s)",
        if ok { "PASS" } else { "FAIL" },
        reference / 1e9
    );
    Ok(ok)
}

fn overhead_bench(quick: bool) -> Result<bool> {
    let store = dist_utils::HashStore::new();
    let opts = NcclOptions::new(0)
        .timeout(Duration::from_secs(120))
        .label("bench");
    let mut comm = NcclCommunicator::new(&store, 0, 1, opts)?;
    let stream = comm.stream().clone();
    let err = |e| comm_core::CommError::Cuda(format!("{e:?}"));
    let lib = comm.library();
    println!(
        "overhead: NCCL {} from {}",
        lib.version(),
        lib.path().to_string_lossy()
    );
    println!(
        "{:<8} {:>12} {:>12} {:>9} | {:>12} {:>12} {:>9} | {:>14}",
        "size",
        "raw us/op",
        "comm us/op",
        "overhead",
        "raw wall",
        "comm wall",
        "overhead",
        "comm, untracked"
    );
    let mut ok = true;
    for (label, count, iters) in [
        ("8 B", 2usize, 20_000usize),
        ("64 MiB", 16usize << 20, 1_000),
    ] {
        let iters = if quick { iters / 10 } else { iters };
        let ctx = stream.context().clone();
        let mut tracked: CudaSlice<f32> = stream.alloc_zeros(count).map_err(err)?;
        // SAFETY: only slices allocated while tracking is off skip cudarc's
        // events; this one is used on `stream` alone.
        unsafe { ctx.disable_event_tracking() };
        let untracked: CudaSlice<f32> = stream.alloc_zeros(count).map_err(err)?;
        // SAFETY: restores the default.
        unsafe { ctx.enable_event_tracking() };
        let mut untracked = untracked;
        let raw_ptr = {
            let (p, _g) = untracked.device_ptr_mut(&stream);
            p
        };
        let h = comm.raw().handle();
        let cs = stream.cu_stream() as comm_nccl::raw::CudaStreamHandle;
        let raw_once = || -> Result<()> {
            // SAFETY: in place over `count` f32 of our own buffer, on the
            // communicator's stream; the handle is live (nothing aborts it
            // while the benchmark runs).
            let mut p = unsafe {
                lib.all_reduce(
                    raw_ptr as *const _,
                    raw_ptr as *mut _,
                    count,
                    NcclDataType::Float32,
                    NcclRedOp::Sum,
                    h,
                    cs,
                )
            }?;
            // A non-blocking communicator may still be enqueueing.
            while p == Progress::InProgress {
                // SAFETY: as above.
                p = match unsafe { lib.comm_get_async_error(h) }? {
                    comm_nccl::raw::NCCL_IN_PROGRESS => Progress::InProgress,
                    comm_nccl::raw::NCCL_SUCCESS => Progress::Done,
                    code => return Err(lib.error(code, "ncclAllReduce")),
                };
            }
            Ok(())
        };
        let desc =
            CallDesc::new(Collective::AllReduce, 0, DType::F32, count).with_reduce(ReduceOp::Sum);
        // Warm-up, then interleaved rounds; medians.
        let mut raw_once = raw_once;
        for _ in 0..50 {
            raw_once()?;
        }
        let (mut rg, mut rw, mut cg, mut cw, mut ug) = (vec![], vec![], vec![], vec![], vec![]);
        for _ in 0..5 {
            let (g, w) = timed(&stream, iters, &mut raw_once)?;
            rg.push(g);
            rw.push(w);
            let (g, w) = timed(&stream, iters, || {
                let call = Call::new(desc, Duration::from_secs(600), "bench");
                let buf = BufMut::new(MemMut::Device(&mut tracked), DType::F32)?;
                comm.all_reduce(&call, buf, ReduceOp::Sum)
            })?;
            cg.push(g);
            cw.push(w);
            let (g, _) = timed(&stream, iters, || {
                let call = Call::new(desc, Duration::from_secs(600), "bench");
                let buf = BufMut::new(MemMut::Device(&mut untracked), DType::F32)?;
                comm.all_reduce(&call, buf, ReduceOp::Sum)
            })?;
            ug.push(g);
        }
        comm.synchronize()?;
        let (rg, rw, cg, cw, ug) = (median(rg), median(rw), median(cg), median(cw), median(ug));
        let over = 100.0 * (cg - rg) / rg;
        let over_wall = 100.0 * (cw - rw) / rw;
        let pass = over <= 5.0;
        ok &= pass;
        println!(
            "{label:<8} {rg:>12.2} {cg:>12.2} {over:>8.1}% | {rw:>12.2} {cw:>12.2} {over_wall:>8.1}% | {ug:>9.2} ({:+.1}%) {}",
            100.0 * (ug - rg) / rg,
            if pass { "ok" } else { "ABOVE 5%" }
        );
    }
    println!(
        "overhead: {} (target: NcclCommunicator::all_reduce per op within 5% of a raw ncclAllReduce, \
         CUDA-event time; 'untracked' = a buffer allocated with cudarc's event tracking off)",
        if ok { "PASS" } else { "FAIL" }
    );
    Ok(ok)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let script = if args.iter().any(|a| a == "--skip-torch") {
        None
    } else {
        Some(
            args.iter()
                .position(|a| a == "--torch-script")
                .and_then(|i| args.get(i + 1).cloned())
                .unwrap_or_else(|| "gpu/torch_permute.py".into()),
        )
    };
    let run = || -> Result<bool> {
        let dev = CudaDevice::get(0)?;
        println!("device: {} (cuda:0)", dev.name()?);
        let a = permute_bench(&dev, quick, script.as_deref())?;
        let b = overhead_bench(quick)?;
        Ok(a && b)
    };
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            println!("gpu_bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}
