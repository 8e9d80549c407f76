//! One rank of the conformance suite. Started by `executor::launch` (or
//! `distrun`), it joins the job, builds the backend named by `--backend NAME`
//! (or `CONFORMANCE_BACKEND`), runs the suite (`--mode basic|large`, or
//! `CONFORMANCE_MODE`) and prints `rank R: N checks passed`. On the first
//! wrong result or backend error it prints what and where and exits 1.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use tests::suite::{self, Mode};

/// Environment fallback for `--backend`.
const BACKEND_ENV: &str = "CONFORMANCE_BACKEND";
/// Environment fallback for `--mode`.
const MODE_ENV: &str = "CONFORMANCE_MODE";

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
    let mut comm =
        tests::registry::make_communicator(&backend, job.store.clone(), rank, job.world, timeout)
            .map_err(|e| format!("rank {rank}: creating the {backend} communicator: {e}"))?;
    let setup = start.elapsed().as_secs_f64();
    let mut log = |line: &str| {
        if rank == 0 {
            println!("rank {rank}: {line}");
        }
    };
    let checks = suite::run(comm.as_mut(), Some(job.store.as_ref()), mode, &mut log)?;
    // Leave together, so that no rank tears its connections down while
    // another is still in its last operation.
    comm.barrier()
        .map_err(|e| format!("rank {rank}: final barrier: {e}"))?;
    println!(
        "rank {rank}: {checks} checks passed ({backend}, world {}, {mode:?}, set-up {setup:.2} s, total {:.2} s)",
        job.world,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
