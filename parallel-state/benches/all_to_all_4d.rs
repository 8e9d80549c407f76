//! all_to_all_4d against the flat all_to_all of the same bytes, with real
//! processes (a bench binary: it launches `--nproc` copies of itself).
//!
//! ```text
//! cargo bench -p parallel-state --bench all_to_all_4d -- --nproc 4
//! cargo bench -p parallel-state --bench all_to_all_4d -- --nproc 2 --shape 1,2048,24,128 --json
//! ```
//!
//! For every size (bytes per rank) it times, in interleaved rounds:
//! - `flat`: `Communicator::all_to_all` of the rank's bytes;
//! - `(2,1)` / `(1,2)`: `all_to_all_4d_into` into a reused output (the
//!   steady state of a model layer);
//! - `(2,1) alloc` / `(1,2) alloc`: `all_to_all_4d`, a fresh output per
//!   call (the form FastVideo's `AllToAll4D` has).
//!
//! Per op and round: `--warmup` calls, a barrier, `--iters` calls; the
//! round's time is the slowest rank's mean per call. The table shows the
//! best round and the spread `(worst - best) / best` over the rounds.
//! Mode (2,1) input is `[B, S/P, H, D]`; mode (1,2) input is its output
//! `[B, S, H/P, D]`: both move the same bytes per rank as `flat`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use parallel_state::{DType, GroupCoordinator, InitOptions, ParallelState, ReduceOp, Tensor};

#[derive(Parser, Debug, Clone)]
#[command(about = "all_to_all_4d vs the flat all_to_all of the same bytes")]
struct Args {
    /// Processes to launch (ignored inside a launch).
    #[arg(long, default_value_t = 2)]
    nproc: usize,
    /// Bytes per rank, comma-separated (K/M/G suffixes).
    #[arg(long, default_value = "1M,4M,16M,64M,128M")]
    sizes: String,
    /// Heads of the sizes' shapes `[1, S/P, H, D]` (f32).
    #[arg(long, default_value_t = 16)]
    heads: usize,
    /// Head dimension of the sizes' shapes.
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    /// One explicit mode-(2,1) input shape `B,S/P,H,D` instead of `--sizes`.
    #[arg(long)]
    shape: Option<String>,
    /// Ops: any of flat, s2h, h2s, s2h-alloc, h2s-alloc.
    #[arg(long, default_value = "flat,s2h,h2s,s2h-alloc,h2s-alloc")]
    ops: String,
    /// Timed calls per op and round (default: about 512 MiB per rank, 3..=50).
    #[arg(long)]
    iters: Option<usize>,
    /// Untimed calls before each op's timed calls.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Interleaved rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Force a host backend (`shm` or `tcp`).
    #[arg(long)]
    backend: Option<String>,
    /// Print one JSON record per size and op (rank 0) instead of the table.
    #[arg(long)]
    json: bool,
    /// Deadline of the whole launch, seconds.
    #[arg(long, default_value_t = 1800)]
    timeout: u64,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim().to_ascii_uppercase();
    let (num, mult) = match s.chars().last() {
        Some('K') => (&s[..s.len() - 1], 1usize << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        _ => (&s[..], 1),
    };
    num.parse::<usize>()
        .map(|n| n * mult)
        .map_err(|e| format!("bad size {s:?}: {e}"))
}

/// Mode-(2,1) input shapes to run: one per size, or the explicit one.
fn shapes(a: &Args, p: usize) -> Result<Vec<[usize; 4]>, String> {
    if let Some(s) = &a.shape {
        let v: Vec<usize> = s
            .split(',')
            .map(|x| x.trim().parse().map_err(|e| format!("--shape {s:?}: {e}")))
            .collect::<Result<_, _>>()?;
        let [b, sl, h, d] = v[..] else {
            return Err(format!("--shape {s:?}: expected B,S/P,H,D"));
        };
        return Ok(vec![[b, sl, h, d]]);
    }
    let row = a.heads * a.head_dim * 4;
    a.sizes
        .split(',')
        .map(|s| {
            let bytes = parse_size(s)?;
            // S/P rows of [H, D] f32; S = P * rows divides by P for mode (1,2).
            let rows = (bytes / row).max(1);
            if !a.heads.is_multiple_of(p) {
                return Err(format!("--heads {} must divide by {p}", a.heads));
            }
            Ok([1, rows, a.heads, a.head_dim])
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Flat,
    SeqToHead,
    HeadToSeq,
    SeqToHeadAlloc,
    HeadToSeqAlloc,
}

impl Op {
    fn parse(s: &str) -> Result<Op, String> {
        Ok(match s.trim() {
            "flat" => Op::Flat,
            "s2h" => Op::SeqToHead,
            "h2s" => Op::HeadToSeq,
            "s2h-alloc" => Op::SeqToHeadAlloc,
            "h2s-alloc" => Op::HeadToSeqAlloc,
            other => return Err(format!("unknown op {other:?}")),
        })
    }
    fn name(self) -> &'static str {
        match self {
            Op::Flat => "all_to_all",
            Op::SeqToHead => "all_to_all_4d(2,1) into",
            Op::HeadToSeq => "all_to_all_4d(1,2) into",
            Op::SeqToHeadAlloc => "all_to_all_4d(2,1)",
            Op::HeadToSeqAlloc => "all_to_all_4d(1,2)",
        }
    }
}

/// The three buffers of one size: `x` mode-(2,1) input (and flat input),
/// `y` its output (mode-(1,2) input, flat output), `z` mode-(1,2) output.
struct Bufs {
    x: Tensor,
    y: Tensor,
    z: Tensor,
}

fn once(g: &GroupCoordinator, op: Op, b: &mut Bufs) -> parallel_state::Result<()> {
    match op {
        Op::Flat => g.host_communicator()?.all_to_all(&b.x, &mut b.y),
        Op::SeqToHead => g.all_to_all_4d_into(&b.x, 2, 1, &mut b.y),
        Op::HeadToSeq => g.all_to_all_4d_into(&b.y, 1, 2, &mut b.z),
        Op::SeqToHeadAlloc => g.all_to_all_4d(&b.x, 2, 1).map(drop),
        Op::HeadToSeqAlloc => g.all_to_all_4d(&b.y, 1, 2).map(drop),
    }
}

/// The slowest rank's mean time per call of `op`, in seconds.
fn time_op(
    g: &GroupCoordinator,
    op: Op,
    b: &mut Bufs,
    warmup: usize,
    iters: usize,
) -> parallel_state::Result<f64> {
    for _ in 0..warmup {
        once(g, op, b)?;
    }
    g.barrier()?;
    let t = Instant::now();
    for _ in 0..iters {
        once(g, op, b)?;
    }
    let mut s = Tensor::from_vec1(vec![t.elapsed().as_secs_f64() / iters as f64]);
    g.all_reduce(&mut s, ReduceOp::Max)?;
    Ok(s.to_vec::<f64>()?[0])
}

fn run_rank(a: &Args) -> Result<(), String> {
    let mut opts = InitOptions::default();
    if let Some(b) = &a.backend {
        opts = opts.with_backend(b.clone());
    }
    let ps = ParallelState::init_from_env(opts).map_err(|e| e.to_string())?;
    let p = ps.world_size();
    ps.initialize_model_parallel(1, p, None)
        .map_err(|e| e.to_string())?;
    let g = ps.sp_group().map_err(|e| e.to_string())?;
    let ops: Vec<Op> = a.ops.split(',').map(Op::parse).collect::<Result<_, _>>()?;
    let lead = g.rank_in_group() == 0;
    if lead && !a.json {
        println!(
            "world {p}, {} backend; best of {} interleaved rounds (slowest rank's mean per call), spread = (worst - best) / best",
            g.host_backend(),
            a.rounds
        );
        println!(
            "{:>12}  {:>18}  {:>26}  {:>9}",
            "bytes/rank", "shape (2,1) in", "op", "ms"
        );
    }
    for [bb, sl, h, d] in shapes(a, p)? {
        if !h.is_multiple_of(p) {
            return Err(format!("{h} heads do not divide by the world {p}"));
        }
        let n = bb * sl * h * d;
        let bytes = n * 4;
        let iters = a
            .iters
            .unwrap_or_else(|| ((512usize << 20) / bytes.max(1)).clamp(3, 50));
        let r = g.rank_in_group() as f32;
        let mut b = Bufs {
            x: Tensor::from_vec(
                (0..n).map(|i| i as f32 + r).collect::<Vec<_>>(),
                [bb, sl, h, d],
            )
            .map_err(|e| e.to_string())?,
            y: Tensor::zeros([bb, sl * p, h / p, d], DType::F32),
            z: Tensor::zeros([bb, sl, h, d], DType::F32),
        };
        let mut times = vec![Vec::new(); ops.len()];
        for _ in 0..a.rounds {
            for (i, &op) in ops.iter().enumerate() {
                times[i].push(time_op(&g, op, &mut b, a.warmup, iters).map_err(|e| e.to_string())?);
            }
        }
        if !lead {
            continue;
        }
        let flat_best = ops
            .iter()
            .position(|&o| o == Op::Flat)
            .map(|i| times[i].iter().copied().fold(f64::INFINITY, f64::min));
        for (i, &op) in ops.iter().enumerate() {
            let best = times[i].iter().copied().fold(f64::INFINITY, f64::min);
            let worst = times[i].iter().copied().fold(0f64, f64::max);
            let spread = (worst - best) / best;
            let vs_flat = flat_best.map(|f| best / f);
            if a.json {
                let rounds: Vec<String> =
                    times[i].iter().map(|t| format!("{:.6}", t * 1e3)).collect();
                println!(
                    "{{\"impl\": \"ours\", \"backend\": \"{}\", \"op\": \"{}\", \"world\": {p}, \"shape\": [{bb}, {sl}, {h}, {d}], \"bytes\": {bytes}, \"iters\": {iters}, \"best_ms\": {:.6}, \"spread\": {spread:.4}, \"rounds_ms\": [{}]{}}}",
                    g.host_backend(),
                    op.name(),
                    best * 1e3,
                    rounds.join(", "),
                    vs_flat.map(|v| format!(", \"vs_flat\": {v:.4}")).unwrap_or_default()
                );
            } else {
                println!(
                    "{bytes:>12}  {:>18}  {:>26}  {:>9.3}  spread {:>5.1}%{}",
                    format!("[{bb},{sl},{h},{d}]"),
                    op.name(),
                    best * 1e3,
                    spread * 100.0,
                    match (op, vs_flat) {
                        (Op::Flat, _) | (_, None) => String::new(),
                        (_, Some(v)) => format!("  {v:.3}x flat"),
                    }
                );
            }
        }
    }
    ps.destroy();
    Ok(())
}

fn main() -> ExitCode {
    let a = Args::parse();
    if std::env::var_os("RANK").is_none() {
        return executor::launch_self(
            "all_to_all_4d bench",
            a.nproc,
            Duration::from_secs(a.timeout),
            |c| c.prefix(false),
        );
    }
    match run_rank(&a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
