//! The main job: Ulysses sequence-parallel attention over N processes.
//!
//! ```text
//! cargo run --release --example ulysses_attention -- --nproc 4
//! ```
//!
//! Without `RANK` in the environment it launches `--nproc` copies of itself
//! (through the project's launcher) and exits with their status. Each rank
//! shards a `[B, S, H*D]` sequence (S not divisible by N, so it is padded),
//! runs demo-model's stack of attention layers (matrixmultiply GEMMs) with
//! an all_to_all_4D before attention and one after it, gathers the output
//! with unpad, and compares it with the same layers run in one process. It
//! exits with 2 if the max abs error exceeds the tolerance (1e-5).
//!
//! `--ring R` runs USP: Ulysses over N / R ranks and ring attention over R
//! (the K/V block travels around the ring while the current one is
//! attended), and prints how much of the ring exchange was hidden behind
//! the attention compute.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use demo_model::usp::{forward_sequence_parallel, ring_wait_breakdown, UspGroups};
use demo_model::{max_abs_diff, Config, Model};
use parallel_state::{CommError, InitOptions, ParallelState, ReduceOp, Tensor};

#[derive(Parser, Debug, Clone)]
#[command(about = "Ulysses sequence-parallel attention, checked against one process")]
struct Args {
    /// Number of processes to launch (ignored inside a launch).
    #[arg(long, default_value_t = 4)]
    nproc: usize,
    /// Batch size.
    #[arg(long, default_value_t = 2)]
    batch: usize,
    /// Sequence length (need not divide by the number of processes).
    #[arg(long, default_value_t = 1022)]
    seq: usize,
    /// Attention heads (must divide by the Ulysses degree, processes / --ring).
    #[arg(long, default_value_t = 8)]
    heads: usize,
    /// Head dimension.
    #[arg(long, default_value_t = 32)]
    head_dim: usize,
    /// Number of attention layers.
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Ring degree R: ring attention over groups of R ranks, Ulysses over
    /// the other processes / R (USP). 1 is pure Ulysses.
    #[arg(long, default_value_t = 1)]
    ring: usize,
    /// `auto` (the local GPU when CUDA is visible), `cpu`, `cuda` (the
    /// local rank's GPU; needs the `nccl` feature) or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Force a host backend (`tcp` or `shm`); default: automatic.
    #[arg(long)]
    backend: Option<String>,
    /// Maximum allowed abs error against the single-process reference.
    #[arg(long, default_value_t = 1e-5)]
    tolerance: f32,
    /// Deadline of the whole launch, seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

fn run_rank(a: &Args) -> parallel_state::Result<bool> {
    let request: parallel_state::DeviceRequest = a.device.parse()?;
    let mut opts = InitOptions::default().with_device(request);
    opts.backend = a.backend.clone();
    let ps = ParallelState::init_from_env(opts)?;
    let device = ps.local_device();
    let p = ps.world_size();
    let (b, s, h, d) = (a.batch, a.seq, a.heads, a.head_dim);
    let hid = h * d;
    if a.ring == 0 || p % a.ring != 0 {
        return Err(CommError::invalid(format!(
            "--ring {} must divide the {p} processes",
            a.ring
        )));
    }
    let u = p / a.ring;
    if h % u != 0 {
        return Err(CommError::invalid(format!(
            "--heads {h} must divide by the Ulysses degree {u} (processes / --ring)"
        )));
    }
    ps.initialize_model_parallel(1, p, None)?;
    ps.initialize_ulysses_ring(u)?;
    let groups = UspGroups {
        sp: ps.sp_group()?,
        ulysses: ps.ulysses_group()?,
        ring: ps.ring_group()?,
    };
    let sp = groups.sp.clone();
    let cfg = Config {
        batch: b,
        seq: s,
        heads: h,
        head_dim: d,
        layers: a.layers,
    };
    let model = Model::new(&cfg);
    let input = model.input();
    let full = Tensor::from_vec(input.clone(), [b, s, hid])?;
    let ring_mode = a.ring > 1;
    let run = forward_sequence_parallel(&model, &groups, &full, device, ring_mode)?;
    let sl = run.shard_len;
    if sp.rank_in_group() == 0 {
        println!(
            "world {p}, sp group {:?} on {} backend, device {device}; x [{b}, {s}, {h}x{d}] sharded to [{b}, {sl}, {hid}] (padded {s} -> {})",
            sp.ranks(),
            sp.host_backend(),
            sl * p,
        );
        if ring_mode {
            println!(
                "USP: ulysses degree {u} (all_to_all_4d over {:?}) x ring degree {} (ring attention over {:?}, K/V blocks [{b}, {}, {}, 2x{d}] passed with ring_pass)",
                groups.ulysses.ranks(),
                a.ring,
                groups.ring.ranks(),
                u * sl,
                h / u,
            );
        }
    }
    // Per layer: the slowest rank's communication and compute (max over the
    // group), and the ring's exposed wait and standalone exchange summed
    // over ranks.
    let mut per_layer = Vec::new();
    for t in &run.layers {
        let mut max = Tensor::from_vec1(vec![
            t.communication().as_secs_f64(),
            t.compute().as_secs_f64(),
            t.all_to_all.as_secs_f64(),
        ]);
        sp.all_reduce(&mut max, ReduceOp::Max)?;
        let mut sum = Tensor::from_vec1(vec![
            t.ring.exposed.as_secs_f64(),
            t.standalone.unwrap_or_default().as_secs_f64(),
            t.ring.starting.as_secs_f64(),
        ]);
        sp.all_reduce(&mut sum, ReduceOp::Sum)?;
        let mut v = max.to_vec::<f64>()?;
        v.extend(sum.to_vec::<f64>()?);
        per_layer.push(v);
    }
    // Where the exposed ring wait went (stamps compare only on one host).
    let one_host = ps.node_group()?.world_size() == p;
    let breakdown = if ring_mode && one_host {
        let b = ring_wait_breakdown(&groups.ring, &run.layers)?;
        let mut sum = Tensor::from_vec1(vec![
            b.neighbour_late.as_secs_f64(),
            b.transfer.as_secs_f64(),
        ]);
        sp.all_reduce(&mut sum, ReduceOp::Sum)?;
        Some(sum.to_vec::<f64>()?)
    } else {
        None
    };
    let ok = if sp.rank_in_group() == 0 {
        for (i, t) in per_layer.iter().enumerate() {
            let ring = if ring_mode {
                format!(
                    "   (all_to_all_4d {:.3} ms; ring: starting {:.3} ms + exposed wait {:.3} ms of {:.3} ms standalone, rank mean)",
                    t[2] * 1e3,
                    t[5] / p as f64 * 1e3,
                    t[3] / p as f64 * 1e3,
                    t[4] / p as f64 * 1e3
                )
            } else {
                String::new()
            };
            println!(
                "layer {i}: communication {:8.3} ms   compute {:8.3} ms{ring}",
                t[0] * 1e3,
                t[1] * 1e3
            );
        }
        if ring_mode {
            let sum = |k: usize| per_layer.iter().map(|t| t[k]).sum::<f64>();
            let (wait, standalone, starting) = (sum(3), sum(4), sum(5));
            let hidden = |e: f64| {
                if standalone > 0.0 {
                    (1.0 - e / standalone) * 100.0
                } else {
                    0.0
                }
            };
            println!(
                "ring communication hidden behind compute: {:.1}% = 1 - (starting {:.3} ms + exposed wait {:.3} ms) / \
                 standalone exchange {:.3} ms; counting the wait alone: {:.1}% \
                 (sums over layers and ranks; starting: queueing each exchange, including getting a core back after \
                 waking the progress engine; exposed wait: waiting for the next K/V block after attending the current \
                 one; standalone: the same blocks passed around the ring with no compute, after a barrier, in every \
                 layer of this run)",
                hidden(starting + wait),
                starting * 1e3,
                wait * 1e3,
                standalone * 1e3,
                hidden(wait),
            );
            if let Some(b) = &breakdown {
                println!(
                    "  from the ring neighbours' step stamps: {:.3} ms waiting for a neighbour still computing its \
                     previous step (load imbalance), {:.3} ms after both neighbours had started the exchange",
                    b[0] * 1e3,
                    b[1] * 1e3,
                );
            }
        }
        let reference = model.reference(&input);
        let got = run.output.to_vec::<f32>()?;
        let err = max_abs_diff(&got, &reference);
        let ok = err <= a.tolerance;
        println!(
            "output [{b}, {}, {hid}] vs single-process reference: max abs error {err:.3e} (tolerance {:.0e}) -> {}",
            run.output.shape()[1],
            a.tolerance,
            if ok { "OK" } else { "FAILED" }
        );
        ok
    } else {
        true
    };
    // Everyone learns the verdict, so a failure exits non-zero on every rank.
    let verdict = sp.broadcast_object(Some(&ok), 0)?;
    ps.destroy();
    Ok(verdict)
}

fn main() -> ExitCode {
    let a = Args::parse();
    if std::env::var_os("RANK").is_none() {
        return executor::launch_self(
            "ulysses_attention",
            a.nproc,
            Duration::from_secs(a.timeout),
            |c| c,
        );
    }
    // Each group logs its backend choice and the reason once (RUST_LOG overrides).
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("parallel_state=info,warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .without_time()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    match run_rank(&a) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
