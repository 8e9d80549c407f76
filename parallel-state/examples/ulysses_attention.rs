//! The main job: Ulysses sequence-parallel attention over N processes.
//!
//! ```text
//! cargo run --release --example ulysses_attention -- --nproc 4
//! ```
//!
//! Without `RANK` in the environment it launches `--nproc` copies of itself
//! (through the project's launcher) and exits with their status. Each rank
//! shards a `[B, S, H*D]` sequence (S not divisible by N, so it is padded),
//! runs a stack of attention layers with an all_to_all_4D before attention
//! and one after it, gathers the output with unpad, and compares it with the
//! same layers run in one process. It exits non-zero if the max abs error
//! exceeds 1e-5.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use parallel_state::{Device, InitOptions, ParallelState, ReduceOp, Tensor};

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
    /// Attention heads (must divide by the number of processes).
    #[arg(long, default_value_t = 8)]
    heads: usize,
    /// Head dimension.
    #[arg(long, default_value_t = 32)]
    head_dim: usize,
    /// Number of attention layers.
    #[arg(long, default_value_t = 4)]
    layers: usize,
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

/// A small deterministic generator, so every rank builds identical weights.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

struct Layer {
    wq: Vec<f32>,
    wk: Vec<f32>,
    wv: Vec<f32>,
    wo: Vec<f32>,
}

fn layers(n: usize, hidden: usize) -> Vec<Layer> {
    let mut g = Lcg(0x5eed);
    let s = 1.0 / (hidden as f32).sqrt();
    (0..n)
        .map(|_| Layer {
            wq: g.vec(hidden * hidden, s),
            wk: g.vec(hidden * hidden, s),
            wv: g.vec(hidden * hidden, s),
            wo: g.vec(hidden * hidden, s),
        })
        .collect()
}

/// `x [rows, k] @ w [k, n]`, i-k-j order so the inner loop vectorises.
fn matmul(x: &[f32], w: &[f32], rows: usize, k: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * n];
    for r in 0..rows {
        let o = &mut out[r * n..(r + 1) * n];
        for (kk, &xv) in x[r * k..(r + 1) * k].iter().enumerate() {
            for (ov, wv) in o.iter_mut().zip(&w[kk * n..(kk + 1) * n]) {
                *ov += xv * wv;
            }
        }
    }
    out
}

/// Softmax attention over `[B, S, h, D]` q/k/v, keys limited to the first
/// `valid` positions (the rest is sequence padding).
fn attention(q: &[f32], k: &[f32], v: &[f32], [b, s, h, d]: [usize; 4], valid: usize) -> Vec<f32> {
    let mut out = vec![0f32; b * s * h * d];
    let scale = 1.0 / (d as f32).sqrt();
    let idx = |bb: usize, ss: usize, hh: usize| ((bb * s + ss) * h + hh) * d;
    let mut scores = vec![0f32; valid];
    for bb in 0..b {
        for hh in 0..h {
            for i in 0..s {
                let qi = &q[idx(bb, i, hh)..idx(bb, i, hh) + d];
                let mut max = f32::NEG_INFINITY;
                for (j, sc) in scores.iter_mut().enumerate() {
                    let kj = &k[idx(bb, j, hh)..idx(bb, j, hh) + d];
                    *sc = qi.iter().zip(kj).map(|(a, c)| a * c).sum::<f32>() * scale;
                    max = max.max(*sc);
                }
                let mut sum = 0f32;
                for sc in scores.iter_mut() {
                    *sc = (*sc - max).exp();
                    sum += *sc;
                }
                let o = &mut out[idx(bb, i, hh)..idx(bb, i, hh) + d];
                for (j, sc) in scores.iter().enumerate() {
                    let w = sc / sum;
                    for (ov, vv) in o.iter_mut().zip(&v[idx(bb, j, hh)..idx(bb, j, hh) + d]) {
                        *ov += w * vv;
                    }
                }
            }
        }
    }
    out
}

/// One process: all layers over the full sequence.
fn reference(x: &[f32], a: &Args, ls: &[Layer]) -> Vec<f32> {
    let (b, s, h, d) = (a.batch, a.seq, a.heads, a.head_dim);
    let hid = h * d;
    let mut x = x.to_vec();
    for l in ls {
        let q = matmul(&x, &l.wq, b * s, hid, hid);
        let k = matmul(&x, &l.wk, b * s, hid, hid);
        let v = matmul(&x, &l.wv, b * s, hid, hid);
        let o = attention(&q, &k, &v, [b, s, h, d], s);
        let o = matmul(&o, &l.wo, b * s, hid, hid);
        x.iter_mut().zip(&o).for_each(|(xv, ov)| *xv += ov);
    }
    x
}

fn to_device(t: Tensor, device: Device) -> parallel_state::Result<Tensor> {
    match device {
        Device::Cpu => Ok(t),
        Device::Cuda(_) => parallel_state::to_device(&t, device),
    }
}

fn run_rank(a: &Args) -> parallel_state::Result<bool> {
    let request: parallel_state::DeviceRequest = a.device.parse()?;
    let mut opts = InitOptions::default().with_device(request);
    opts.backend = a.backend.clone();
    let ps = ParallelState::init_from_env(opts)?;
    let device = ps.local_device();
    let p = ps.world_size();
    ps.initialize_model_parallel(1, p, None)?;
    let sp = ps.sp_group()?;
    let (b, s, h, d) = (a.batch, a.seq, a.heads, a.head_dim);
    let hid = h * d;
    if h % p != 0 {
        return Err(parallel_state::CommError::invalid(format!(
            "--heads {h} must divide by the {p} processes"
        )));
    }
    let ls = layers(a.layers, hid);
    let input = Lcg(42).vec(b * s * hid, 1.0);
    let full = Tensor::from_vec(input.clone(), [b, s, hid])?;
    let (mut x, orig_len) = sp.shard_with_pad(&full, 1)?;
    let sl = x.shape()[1];
    let padded = sl * p;
    if sp.rank_in_group() == 0 {
        println!(
            "world {p}, sp group {:?} on {} backend, device {device}; x [{b}, {s}, {h}x{d}] sharded to [{b}, {sl}, {hid}] (padded {s} -> {padded})",
            sp.ranks(),
            sp.host_backend(),
        );
    }
    let mut per_layer = Vec::new();
    for l in &ls {
        let mut comm = Duration::ZERO;
        let t0 = Instant::now();
        let xv = x.as_slice::<f32>()?;
        let mut qkv = Vec::new();
        for w in [&l.wq, &l.wk, &l.wv] {
            let y = Tensor::from_vec(matmul(xv, w, b * sl, hid, hid), [b, sl, h, d])?;
            let y = to_device(y, device)?;
            let c = Instant::now();
            let y = sp.all_to_all_4d(&y, 2, 1)?; // [B, S_pad, H/P, D]
            comm += c.elapsed();
            qkv.push(y.to_vec::<f32>()?);
        }
        let o = attention(&qkv[0], &qkv[1], &qkv[2], [b, padded, h / p, d], orig_len);
        let o = to_device(Tensor::from_vec(o, [b, padded, h / p, d])?, device)?;
        let c = Instant::now();
        let o = sp.all_to_all_4d(&o, 1, 2)?; // [B, S_pad/P, H, D]
        comm += c.elapsed();
        let o = matmul(&o.to_vec::<f32>()?, &l.wo, b * sl, hid, hid);
        let xs = x.as_mut_slice::<f32>()?;
        xs.iter_mut().zip(&o).for_each(|(xv, ov)| *xv += ov);
        let total = t0.elapsed();
        // The slowest rank sets the pace: report the max over the group.
        let mut t = Tensor::from_vec1(vec![comm.as_secs_f64(), (total - comm).as_secs_f64()]);
        sp.all_reduce(&mut t, ReduceOp::Max)?;
        per_layer.push(t.to_vec::<f64>()?);
    }
    let out = sp.all_gather_with_unpad(&x, 1, orig_len)?;
    let ok = if sp.rank_in_group() == 0 {
        for (i, t) in per_layer.iter().enumerate() {
            println!(
                "layer {i}: communication {:8.3} ms   compute {:8.3} ms",
                t[0] * 1e3,
                t[1] * 1e3
            );
        }
        let r = reference(&input, a, &ls);
        let got = out.to_vec::<f32>()?;
        let err = got
            .iter()
            .zip(&r)
            .map(|(g, e)| (g - e).abs())
            .fold(0f32, f32::max);
        let ok = got.len() == r.len() && err <= a.tolerance;
        println!(
            "output [{b}, {}, {hid}] vs single-process reference: max abs error {err:.3e} (tolerance {:.0e}) -> {}",
            out.shape()[1],
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
        let exe = match std::env::current_exe() {
            Ok(e) => e,
            Err(e) => {
                eprintln!("cannot find this program's path: {e}");
                return ExitCode::FAILURE;
            }
        };
        let cfg = executor::LaunchConfig::new(exe, a.nproc)
            .args(std::env::args_os().skip(1))
            .timeout(Duration::from_secs(a.timeout));
        return match executor::launch(&cfg) {
            Ok(o) if o.success() => ExitCode::SUCCESS,
            Ok(o) => {
                eprintln!(
                    "ulysses_attention: launch failed (exit code {})",
                    o.exit_code
                );
                ExitCode::from(o.exit_code.clamp(1, 255) as u8)
            }
            Err(e) => {
                eprintln!("ulysses_attention: {e}");
                ExitCode::FAILURE
            }
        };
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
