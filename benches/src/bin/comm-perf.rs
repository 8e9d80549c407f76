//! `comm-perf`: nccl-tests-style bandwidth and latency table for any backend
//! of the registry (`parallel_state::default_registry()`: single, tcp, shm,
//! nccl with the `nccl` feature).
//!
//! ```text
//! cargo run --release -p benches --bin comm-perf -- --backend tcp --nproc 4 \
//!     --op all_reduce -b 8 -e 64M -f 2 [--dtype f32] [--iters N] [--warmup N] \
//!     [--check] [--json FILE] [--device cpu|cuda] [--op-timeout S]
//! ```
//!
//! Started plainly, it launches `--nproc` copies of itself through
//! `executor::launch` (one process per rank). Started inside a launch (`RANK`
//! and `WORLD_SIZE` set, e.g. by `distrun` or torchrun), it joins that job
//! instead and `--nproc` is ignored. Rank 0 prints the table and writes the
//! JSON.
//!
//! The deadline of set-up and of each operation is `DIST_TIMEOUT_S` (as
//! everywhere in the layer) unless `--op-timeout` is given. With
//! `--device cuda` every buffer is on rank `r`'s GPU, `cuda:(LOCAL_RANK %
//! device count)`: NCCL moves it natively, host backends stage it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use benches::perf::{
    format_row, header, measure, parse_ops, sizes, summary, Op, PerfConfig, Row, Target,
};
use clap::Parser;
use comm_core::{Communicator, DType, Device, GroupContext, ReduceOp};
use parallel_state::GroupCoordinator;

/// Set in the ranks comm-perf launches itself, so a rank that somehow lacks
/// the rendezvous variables fails instead of launching again.
const CHILD_ENV: &str = "COMM_PERF_CHILD";

#[derive(Parser, Debug, Clone)]
#[command(
    name = "comm-perf",
    about = "nccl-tests-style benchmark of the collective backends"
)]
struct Args {
    /// Backend: any registered name (single, tcp, shm; nccl when built).
    #[arg(long, default_value = "tcp")]
    backend: String,
    /// Ranks to launch (ignored inside an existing launch).
    #[arg(long, short = 'n', default_value_t = 2)]
    nproc: usize,
    /// Op(s): all_reduce, all_gather, reduce_scatter, broadcast, all_to_all,
    /// send_recv, all_to_all_4d (both Ulysses modes: all_to_all_4d_21 and
    /// all_to_all_4d_12); a comma-separated list, or `all`.
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
    /// Heads H of the all_to_all_4d tensor [1, S/P, H, D] (a multiple of
    /// the world size).
    #[arg(long, default_value_t = 24)]
    heads: usize,
    /// Head dimension D of the all_to_all_4d tensor.
    #[arg(long, default_value_t = 128)]
    head_dim: usize,
    /// Deadline of set-up and of each operation, in seconds (default:
    /// DIST_TIMEOUT_S, else 300).
    #[arg(long)]
    op_timeout: Option<f64>,
    /// Overall deadline of a self-launched job, in seconds.
    #[arg(long, default_value_t = 1800.0)]
    timeout: f64,
}

/// The deadline of set-up and of each operation: the flag when given,
/// else `DIST_TIMEOUT_S` like every other part of the layer.
fn op_timeout(flag: Option<f64>) -> Result<Duration, String> {
    match flag {
        None => Ok(comm_core::default_timeout()),
        Some(s) if s.is_finite() && s > 0.0 => Ok(Duration::from_secs_f64(s)),
        Some(s) => Err(format!(
            "--op-timeout {s} is not a positive number of seconds"
        )),
    }
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
    if args.nproc == 0 {
        eprintln!("comm-perf: --nproc must be at least 1");
        return ExitCode::FAILURE;
    }
    executor::launch_self(
        "comm-perf",
        args.nproc,
        Duration::from_secs_f64(args.timeout),
        |c| c.env(CHILD_ENV, "1").prefix(false),
    )
}

fn rank_main(args: &Args) -> Result<(), String> {
    let ops = parse_ops(&args.op)?;
    let dtype: DType = args.dtype.parse().map_err(|e| format!("{e}"))?;
    let redop: ReduceOp = args.redop.parse().map_err(|e| format!("{e}"))?;
    let min = dist_utils::parse_size("--minbytes", &args.minbytes).map_err(|e| e.to_string())?;
    let max = dist_utils::parse_size("--maxbytes", &args.maxbytes).map_err(|e| e.to_string())?;
    let sizes = sizes(min, max, args.stepfactor)?;
    let op_timeout = op_timeout(args.op_timeout)?;

    let job = comm_conformance::join(op_timeout).map_err(|e| format!("rendezvous: {e}"))?;
    let (rank, world) = (job.rank, job.world);
    // The one registry of the layer: what DIST_BACKEND can name, comm-perf
    // can measure (the `nccl` feature also installs the CUDA allocator).
    let registry = parallel_state::default_registry();
    let factory = registry.get(&args.backend).map_err(|e| e.to_string())?;
    let device = match args.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => match comm_core::visible_devices() {
            0 => {
                return Err(comm_core::device_allocator(Device::Cuda(0))
                    .err()
                    .map_or_else(
                        || "--device cuda: no CUDA device is visible".into(),
                        |e| format!("--device cuda: {e}"),
                    ))
            }
            n => Device::Cuda(job.local_rank % n),
        },
        other => return Err(format!("unknown --device `{other}`; expected cpu or cuda")),
    };
    // Device backends move the device's memory; host backends stage it.
    let comm_device = if factory.serves(device) {
        device
    } else {
        Device::Cpu
    };
    let group = |name: &str, backend: &str| -> Result<Communicator, String> {
        let ctx = GroupContext::new(
            Arc::new(comm_core::PrefixStore::new(
                format!("comm-perf/{name}"),
                job.store.clone(),
            )),
            rank,
            world,
        )
        .timeout(op_timeout)
        .group_name(name)
        .device(if backend == args.backend {
            comm_device
        } else {
            Device::Cpu
        });
        registry
            .create(backend, &ctx)
            .map_err(|e| format!("creating the {backend} communicator: {e}"))
    };
    let comm = group("perf", &args.backend)?;
    let coordinator = if ops.iter().any(|o| o.is_4d()) {
        // The group layer over the communicator under test; a device
        // backend's group also needs a host plane.
        let (host, dev) = if comm_device == Device::Cpu {
            (comm.clone(), None)
        } else {
            let host = if world == 1 { "single" } else { "tcp" };
            (group("perf-host", host)?, Some(comm.clone()))
        };
        let ranks: Vec<usize> = (0..world).collect();
        Some(
            GroupCoordinator::from_communicators("perf", ranks, rank, job.local_rank, host, dev)
                .map_err(|e| e.to_string())?,
        )
    } else {
        None
    };
    let target = Target {
        comm: &comm,
        group: coordinator.as_ref(),
        device,
    };
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
            heads: args.heads,
            head_dim: args.head_dim,
        };
        if lead {
            println!("#\n# op: {op}\n{}", header());
        }
        let mut rows = Vec::new();
        for &bytes in &sizes {
            let row = measure(&target, &cfg, bytes)
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
