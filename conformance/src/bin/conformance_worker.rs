//! One rank of the conformance kit over the built-in backends, for jobs
//! started by a launcher (`distrun`, torchrun, Slurm, mpirun):
//!
//! ```text
//! cargo build -p comm-conformance --features builtin [--features nccl]
//! distrun --nproc-per-node 3 -- target/debug/conformance_worker \
//!     --backend tcp [--mode basic|large|mismatch|failures] [--device cpu|cuda]
//! ```
//!
//! `--backend` (or `CONFORMANCE_BACKEND`): any backend of
//! `parallel_state::default_registry()` (single, tcp, shm, and nccl with the
//! `nccl` feature). `--device cuda` (or `CONFORMANCE_DEVICE`) puts the
//! buffers on `cuda:(LOCAL_RANK % device count)` (needs the `nccl` feature,
//! which installs the CUDA allocator): nccl moves them natively, tcp / shm
//! stage them through host memory. Prints `rank R: N checks passed` and
//! exits 0, or prints the first failure and exits 1.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use comm_conformance::{Kit, Mode};
use comm_core::{Device, Registry};

/// Environment fallback for `--backend`.
const BACKEND_ENV: &str = "CONFORMANCE_BACKEND";
/// Environment fallback for `--mode`.
const MODE_ENV: &str = "CONFORMANCE_MODE";
/// Environment fallback for `--device`.
const DEVICE_ENV: &str = "CONFORMANCE_DEVICE";

fn arg_or_env(flag: &str, env: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| std::env::var(env).ok())
}

/// The built-in backends of this build: the group layer's registry, so the
/// worker runs exactly what `DIST_BACKEND` can name.
fn registry() -> Registry {
    parallel_state::default_registry()
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("conformance FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let backend = arg_or_env("--backend", BACKEND_ENV)
        .ok_or_else(|| format!("no backend: pass --backend NAME or set {BACKEND_ENV}"))?;
    let mode: Mode = arg_or_env("--mode", MODE_ENV)
        .unwrap_or_else(|| "basic".into())
        .parse()?;
    let device = match arg_or_env("--device", DEVICE_ENV).as_deref() {
        None | Some("cpu") => Device::Cpu,
        Some("cuda") => Device::Cuda(0),
        Some(other) => return Err(format!("unknown device `{other}`; expected cpu or cuda")),
    };
    let start = Instant::now();
    let ctx =
        comm_conformance::join(Duration::from_secs(60)).map_err(|e| format!("rendezvous: {e}"))?;
    let rank = ctx.rank;
    let kit = Kit::from_registry(&registry(), &backend)
        .map_err(|e| format!("rank {rank}: {e}"))?
        .world(ctx.world)
        .mode(mode)
        .device(device);
    let report = kit.run_rank(&ctx, &mut |line| {
        if rank == 0 {
            println!("rank {rank}: {line}");
        }
    })?;
    for s in &report.skipped {
        println!("rank {rank}: skipped: {s}");
    }
    println!(
        "rank {rank}: {} checks passed ({backend}, world {}, {mode}, {device}, {:.2} s)",
        report.checks,
        ctx.world,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
