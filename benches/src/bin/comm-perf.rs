//! `comm-perf`: nccl-tests-style bandwidth and latency table for any backend
//! of the registry.
//!
//! ```text
//! cargo run --release -p benches --bin comm-perf -- --backend tcp --nproc 4 \
//!     --op all_reduce -b 8 -e 64M -f 2 [--dtype f32] [--iters N] [--warmup N] \
//!     [--check] [--json FILE]
//! ```
//!
//! Started plainly, it launches `--nproc` copies of itself through
//! `executor::launch` (one process per rank). Started inside a launch (`RANK`
//! and `WORLD_SIZE` set, e.g. by `distrun`), it joins that job instead and
//! `--nproc` is ignored. Rank 0 prints the table and writes the JSON.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use benches::perf::{
    format_row, header, measure_on, parse_size, sizes, summary, Op, PerfConfig, Row,
};
use clap::Parser;
use comm_core::{DType, DeviceCommunicator, ReduceOp};

/// Set in the ranks comm-perf launches itself, so a rank that somehow lacks
/// the rendezvous variables fails instead of launching again.
const CHILD_ENV: &str = "COMM_PERF_CHILD";

#[derive(Parser, Debug, Clone)]
#[command(
    name = "comm-perf",
    about = "nccl-tests-style benchmark of the collective backends"
)]
struct Args {
    /// Backend: single, tcp, shm (nccl when built).
    #[arg(long, default_value = "tcp")]
    backend: String,
    /// Ranks to launch (ignored inside an existing launch).
    #[arg(long, short = 'n', default_value_t = 2)]
    nproc: usize,
    /// Op(s): all_reduce, all_gather, reduce_scatter, broadcast, all_to_all,
    /// send_recv; a comma-separated list, or `all`.
    #[arg(long, default_value = "all_reduce")]
    op: String,
    /// Smallest message (bytes; K, M, G suffixes).
    #[arg(short = 'b', long = "minbytes", default_value = "8")]
    minbytes: String,
    /// Largest message.
    #[arg(short = 'e', long = "maxbytes", default_value = "64M")]
    maxbytes: String,
    /// Multiply the size by this factor between rows.
    #[arg(short = 'f', long = "stepfactor", default_value_t = 2)]
    stepfactor: u64,
    /// Tensor device: cpu, or cuda (rank LOCAL_RANK on GPU LOCAL_RANK %
    /// count; needs the `nccl` feature; tcp/shm stage through host memory).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Element type.
    #[arg(long, short = 'd', default_value = "f32")]
    dtype: String,
    /// Reduce op for all_reduce and reduce_scatter.
    #[arg(long, short = 'o', default_value = "sum")]
    redop: String,
    /// Root of broadcast.
    #[arg(long, short = 'r', default_value_t = 0)]
    root: usize,
    /// Timed iterations per size.
    #[arg(long, short = 'i', default_value_t = 20)]
    iters: usize,
    /// Untimed warm-up iterations per size.
    #[arg(long, short = 'w', default_value_t = 5)]
    warmup: usize,
    /// Check results against exactly computed values (#wrong column).
    #[arg(long, short = 'c')]
    check: bool,
    /// Write the rows as JSON records to this file (rank 0).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Per-operation deadline of the communicator, in seconds.
    #[arg(long, default_value_t = 120.0)]
    op_timeout: f64,
    /// Overall deadline of a self-launched job, in seconds.
    #[arg(long, default_value_t = 1800.0)]
    timeout: f64,
}

fn parse_ops(s: &str) -> Result<Vec<Op>, String> {
    if s == "all" {
        return Ok(Op::ALL.to_vec());
    }
    s.split(',').map(|o| o.trim().parse()).collect()
}

fn main() -> ExitCode {
    let args = Args::parse();
    let joined = std::env::var_os("RANK").is_some() && std::env::var_os("WORLD_SIZE").is_some();
    let result = if joined {
        rank_main(&args)
    } else if std::env::var_os(CHILD_ENV).is_some() {
        Err("launched as a comm-perf rank but RANK / WORLD_SIZE are not set".to_string())
    } else {
        return launch_self(&args);
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("comm-perf: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Re-executes this binary `--nproc` times through the launcher.
fn launch_self(args: &Args) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("comm-perf: cannot find my own executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.nproc == 0 {
        eprintln!("comm-perf: --nproc must be at least 1");
        return ExitCode::FAILURE;
    }
    let cfg = executor::LaunchConfig::new(exe, args.nproc)
        .args(std::env::args_os().skip(1))
        .env(CHILD_ENV, "1")
        .timeout(Duration::from_secs_f64(args.timeout))
        .prefix(false);
    match executor::launch(&cfg) {
        Ok(out) if out.success() => ExitCode::SUCCESS,
        Ok(out) => {
            eprintln!(
                "comm-perf: the job failed (exit codes {:?}, {:?})",
                out.exit_codes(),
                out.stop_reason
            );
            ExitCode::from(out.exit_code.clamp(1, 255) as u8)
        }
        Err(e) => {
            eprintln!("comm-perf: launching {} ranks failed: {e}", args.nproc);
            ExitCode::FAILURE
        }
    }
}

fn rank_main(args: &Args) -> Result<(), String> {
    let ops = parse_ops(&args.op)?;
    let dtype: DType = args.dtype.parse().map_err(|e| format!("{e}"))?;
    let redop: ReduceOp = args.redop.parse().map_err(|e| format!("{e}"))?;
    let min = parse_size(&args.minbytes)?;
    let max = parse_size(&args.maxbytes)?;
    let sizes = sizes(min, max, args.stepfactor)?;
    let op_timeout = Duration::from_secs_f64(args.op_timeout);

    let job = tests::rendezvous::join(op_timeout).map_err(|e| format!("rendezvous: {e}"))?;
    let (rank, world) = (job.rank, job.world);
    let device = match args.device.as_str() {
        "cpu" => comm_core::Device::Cpu,
        "cuda" => {
            tests::registry::local_cuda_device(job.info.local_rank).map_err(|e| e.to_string())?
        }
        other => return Err(format!("unknown --device `{other}`; expected cpu or cuda")),
    };
    let place = tests::registry::placement(device).map_err(|e| e.to_string())?;
    let mut comm = tests::registry::make_communicator_on(
        &args.backend,
        job.store.clone(),
        rank,
        world,
        op_timeout,
        device,
    )
    .map_err(|e| format!("creating the {} communicator: {e}", args.backend))?;
    let lead = rank == 0;

    if lead {
        println!(
            "# comm-perf: backend {} | world {world} | device {device} | dtype {dtype} | iters {} | warmup {} | check {}",
            args.backend, args.iters, args.warmup, args.check
        );
    }
    let mut all_rows: Vec<Row> = Vec::new();
    for op in ops {
        if op == Op::SendRecv && world < 2 {
            if lead {
                println!("#\n# op: {op} skipped: it needs at least 2 ranks");
            }
            continue;
        }
        let cfg = PerfConfig {
            op,
            dtype,
            redop,
            root: args.root,
            iters: args.iters,
            warmup: args.warmup,
            check: args.check,
        };
        if lead {
            println!("#\n# op: {op}\n{}", header());
        }
        let mut rows = Vec::new();
        for &bytes in &sizes {
            let row = measure_on(
                comm.as_mut() as &mut dyn DeviceCommunicator,
                &cfg,
                bytes,
                place.as_ref(),
            )
            .map_err(|e| format!("rank {rank}: {op} at {bytes} B: {e}"))?;
            if lead {
                println!("{}", format_row(&row));
            }
            rows.push(row);
        }
        if lead {
            println!("{}", summary(&rows));
        }
        all_rows.extend(rows);
    }
    if lead {
        if all_rows
            .iter()
            .map(|r| r.op.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            > 1
        {
            println!("#\n# all ops:\n{}", summary(&all_rows));
        }
        if let Some(path) = &args.json {
            let text = serde_json::to_string_pretty(&all_rows).map_err(|e| e.to_string())?;
            std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
            println!("# wrote {} records to {}", all_rows.len(), path.display());
        }
    }
    comm.barrier().map_err(|e| format!("final barrier: {e}"))?;
    if all_rows.iter().any(|r| r.wrong.unwrap_or(0) > 0) {
        return Err("some results were wrong".into());
    }
    Ok(())
}
