//! One rank of the conformance suite. Started by `executor::launch` (or
//! `distrun`), it joins the job, builds the backend named by `--backend NAME`
//! (or `CONFORMANCE_BACKEND`), runs the suite (`--mode basic|large`, or
//! `CONFORMANCE_MODE`) and prints `rank R: N checks passed`. On the first
//! wrong result or backend error it prints what and where and exits 1.
//!
//! `--device cuda` (or `CONFORMANCE_DEVICE=cuda`; needs the tests crate's
//! `nccl` feature) runs it on CUDA tensors, rank `LOCAL_RANK` on GPU
//! `LOCAL_RANK % device_count`: `nccl` natively, `tcp` / `shm` staged
//! through host memory (several processes sharing one GPU).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use tests::suite::{self, Mode};

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
    let timeout = comm_core::default_timeout().min(Duration::from_secs(60));
    let start = Instant::now();
    let job = tests::rendezvous::join(timeout).map_err(|e| format!("rendezvous: {e}"))?;
    let rank = job.rank;
    let device = match arg_or_env("--device", DEVICE_ENV).as_deref() {
        None | Some("cpu") => comm_core::Device::Cpu,
        Some("cuda") => tests::registry::local_cuda_device(job.info.local_rank)
            .map_err(|e| format!("rank {rank}: {e}"))?,
        Some(other) => return Err(format!("unknown device `{other}`; expected cpu or cuda")),
    };
    let place = tests::registry::placement(device).map_err(|e| format!("rank {rank}: {e}"))?;
    let mut comm = tests::registry::make_communicator_on(
        &backend,
        job.store.clone(),
        rank,
        job.world,
        timeout,
        device,
    )
    .map_err(|e| format!("rank {rank}: creating the {backend} communicator: {e}"))?;
    let setup = start.elapsed().as_secs_f64();
    let mut log = |line: &str| {
        if rank == 0 {
            println!("rank {rank}: {line}");
        }
    };
    let checks = suite::run_on(
        comm.as_mut(),
        Some(job.store.as_ref()),
        mode,
        place.as_ref(),
        &mut log,
    )?;
    // Leave together, so that no rank tears its connections down while
    // another is still in its last operation.
    comm.barrier()
        .map_err(|e| format!("rank {rank}: final barrier: {e}"))?;
    println!(
        "rank {rank}: {checks} checks passed ({backend}, world {}, {mode:?}, {device}, set-up {setup:.2} s, total {:.2} s)",
        job.world,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
