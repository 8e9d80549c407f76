//! The main job through the executor, as FastVideo runs a video generator:
//! a driver process (the executor) starts one gpu worker per rank; each
//! binds its device, joins the distributed environment, builds the
//! sequence-parallel groups and the attention stack of the main job
//! (`demo_model::usp`) once, and then serves requests. Each request (a
//! different input, a sequence length the group does not divide) is one
//! distributed forward pass with Ulysses all_to_all_4d inside the workers
//! (and ring attention with `--ring-degree` above 1); rank 0's output comes
//! back to the driver, which checks it against the single-process
//! reference. Between requests an adapter-style change (scaling every
//! output projection) is applied to every worker through `collective_rpc`,
//! and the next results are checked against a reference with the same
//! change.
//!
//! ```text
//! cargo run --release -p executor --example video_generator
//! cargo run --release -p executor --example video_generator -- --workers 4 --seq 1021,2045 --device cpu
//! ```
//!
//! It prints, per request, the latency seen by the driver, the forward
//! pass's time on rank 0, and the share of the latency spent in RPC (the
//! latency less the forward pass: sending the input, the reply,
//! scheduling). It exits non-zero when a result differs from the reference
//! in any bit (or by more than `--tolerance`).
//!
//! Two hosts: on host A (the driver and node 0's 4 workers)
//! `DIST_JOB_SECRET=$S video_generator --nnodes 2 --master-addr A --master-port P`,
//! on host B `DIST_JOB_SECRET=$S distrun --nnodes 2 --node-rank 1
//! --master-addr A --master-port P --nproc-per-node 4 -- video_generator --worker`
//! (the same `--workers` on both; the heads must divide by all 8 workers).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use demo_model::usp::{forward_sequence_parallel, UspGroups};
use demo_model::{Config, Model};
use executor::{
    Executor, GpuContext, GpuState, GpuWorker, LaunchConfig, Method, Methods, ParallelConfig,
    ReplyFrom,
};
use parallel_state::Tensor;
use serde::{Deserialize, Serialize};

/// Command line of the driver (and, with `--worker`, of a worker).
#[derive(Parser, Debug, Clone)]
#[command(about = "A small video generator: the main job's attention stack served by the executor")]
pub struct Args {
    /// Run as a worker (the executor passes this to the processes it starts;
    /// give it to `distrun` on other hosts).
    #[arg(long)]
    pub worker: bool,
    /// Workers on this host.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Hosts (this one is node 0; the others run `distrun ... --worker`).
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// Address of this host that the other hosts reach (with --nnodes > 1).
    #[arg(long, default_value = "127.0.0.1")]
    pub master_addr: String,
    /// Rendezvous port (required with --nnodes > 1).
    #[arg(long)]
    pub master_port: Option<u16>,
    /// Sequence length of each request, in order (need not divide by the
    /// number of workers).
    #[arg(long, value_delimiter = ',', default_value = "1021,2045,509,1533")]
    pub seq: Vec<usize>,
    /// Batch size.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Attention heads (must divide by the number of workers).
    #[arg(long, default_value_t = 8)]
    pub heads: usize,
    /// Head dimension.
    #[arg(long, default_value_t = 32)]
    pub head_dim: usize,
    /// Attention layers.
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    /// The adapter change: every output projection is scaled by this
    /// before the request at `--adapter-at`.
    #[arg(long, default_value_t = 0.5)]
    pub scale: f32,
    /// Index of the first request after the adapter change.
    #[arg(long, default_value_t = 2)]
    pub adapter_at: usize,
    /// Ring-attention degree inside the SP group (1: Ulysses only; the
    /// Ulysses degree is workers / ring degree).
    #[arg(long, default_value_t = 1)]
    pub ring_degree: usize,
    /// Largest accepted absolute difference from the reference (0: every
    /// bit must match, which Ulysses alone gives; ring attention adds
    /// rounding, so give e.g. 1e-5 with --ring-degree above 1).
    #[arg(long, default_value_t = 0.0)]
    pub tolerance: f32,
    /// Device of every worker: auto, cpu, cuda (the local rank's GPU, with
    /// the `nccl` feature), cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Host backend of the groups (tcp or shm); default: automatic.
    #[arg(long)]
    pub backend: Option<String>,
    /// Deadline of start-up and of each call, seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

/// The model's shape, sent by the driver to every worker (the sequence
/// length comes with each request).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Batch size.
    pub batch: usize,
    /// Attention heads.
    pub heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Layers.
    pub layers: usize,
}

impl ModelSpec {
    /// The demo model for sequences of `seq`.
    pub fn config(&self, seq: usize) -> Config {
        Config {
            batch: self.batch,
            seq,
            heads: self.heads,
            head_dim: self.head_dim,
            layers: self.layers,
        }
    }
}

/// One generation request: the input `[batch, seq, heads * head_dim]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    /// Sequence length.
    pub seq: usize,
    /// The input, row-major.
    pub input: Vec<f32>,
}

/// Rank 0's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Output {
    /// The output `[batch, seq, hidden]`, gathered and unpadded.
    pub output: Vec<f32>,
    /// The forward pass on rank 0, seconds.
    pub forward_s: f64,
}

/// What each worker reports about itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// Global rank.
    pub rank: usize,
    /// Device bound.
    pub device: String,
    /// Global ranks of its SP group.
    pub sp_ranks: Vec<usize>,
    /// The SP group's host backend.
    pub backend: String,
}

/// One distributed forward pass; rank 0 returns the output.
pub const GENERATE: Method<Request, Output> = Method::with_reply("generate", ReplyFrom::Rank(0));
/// The adapter change: scale every output projection.
pub const SCALE_OUTPUT: Method<f32, ()> = Method::new("scale_output");
/// Each worker's device and group.
pub const DESCRIBE: Method<(), WorkerInfo> = Method::new("describe");

/// A worker's state: the main job's model and its groups, built once.
#[derive(Debug)]
pub struct VideoModel {
    spec: ModelSpec,
    model: Model,
    groups: UspGroups,
}

/// Builds the model from the driver's spec (the same deterministic weights
/// on every worker) over this worker's SP, Ulysses and ring groups.
pub fn build(ctx: &GpuContext, spec: ModelSpec) -> Result<VideoModel, String> {
    let groups = UspGroups {
        sp: ctx.sp_group().map_err(err)?,
        ulysses: ctx.ulysses_group().map_err(err)?,
        ring: ctx.ring_group().map_err(err)?,
    };
    let u = groups.ulysses.world_size();
    if !spec.heads.is_multiple_of(u) {
        return Err(format!(
            "{} heads do not divide over the Ulysses group of {u}",
            spec.heads
        ));
    }
    Ok(VideoModel {
        spec,
        model: Model::new(&spec.config(0)),
        groups,
    })
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// One request on every worker: the main job's sequence-parallel forward
/// (`demo_model::usp`: shard with padding, per layer the projections,
/// Ulysses all_to_all_4d, attention (ring attention with a ring degree
/// above 1), the inverse all_to_all_4d, output projection and residual;
/// then gather and unpad).
pub fn forward(st: &mut GpuState<VideoModel>, req: Request) -> Result<Output, String> {
    let t0 = Instant::now();
    let vm = &mut st.model;
    let (b, hid) = (vm.spec.batch, vm.spec.heads * vm.spec.head_dim);
    if req.input.len() != b * req.seq * hid {
        return Err(format!(
            "input of {} values for [{b}, {}, {hid}]",
            req.input.len(),
            req.seq
        ));
    }
    vm.model.cfg = vm.spec.config(req.seq);
    let full = Tensor::from_vec(req.input, [b, req.seq, hid]).map_err(err)?;
    let run = forward_sequence_parallel(&vm.model, &vm.groups, &full, st.ctx.device(), false)
        .map_err(err)?;
    Ok(Output {
        output: run.output.to_vec::<f32>().map_err(err)?,
        forward_s: t0.elapsed().as_secs_f64(),
    })
}

/// Scales every output projection (the adapter change).
pub fn scale_output(model: &mut Model, factor: f32) {
    for l in &mut model.layers {
        l.wo.iter_mut().for_each(|w| *w *= factor);
    }
}

/// The worker's methods.
pub fn methods() -> Methods<GpuState<VideoModel>> {
    let mut m = Methods::new();
    m.on(&GENERATE, forward)
        .on(&SCALE_OUTPUT, |st, factor: f32| {
            scale_output(&mut st.model.model, factor);
            Ok::<_, String>(())
        })
        .on(&DESCRIBE, |st, ()| {
            let sp = st.ctx.sp_group().map_err(err)?;
            Ok::<_, String>(WorkerInfo {
                rank: st.ctx.rank(),
                device: st.ctx.device().to_string(),
                sp_ranks: sp.ranks().to_vec(),
                backend: sp.host_backend().to_string(),
            })
        });
    m
}

/// A worker process: set up, build the model, serve.
pub fn worker_main() -> parallel_state::Result<()> {
    GpuWorker::from_env()?.run(build, &mut methods())
}

/// One request as the driver saw it.
#[derive(Debug, Clone)]
pub struct RequestReport {
    /// Sequence length.
    pub seq: usize,
    /// Whether the adapter change was in effect.
    pub adapted: bool,
    /// Latency seen by the driver.
    pub latency: Duration,
    /// Forward pass on rank 0.
    pub forward: Duration,
    /// Largest absolute difference from the reference.
    pub max_err: f32,
    /// Bit-identical to the reference.
    pub exact: bool,
    /// Exact, or within the tolerance.
    pub ok: bool,
}

/// Starts the workers `launch` describes, runs the requests of `args`,
/// checks each against the reference, prints the table, shuts down.
pub fn drive(args: &Args, launch: &LaunchConfig) -> Result<Vec<RequestReport>, String> {
    let spec = ModelSpec {
        batch: args.batch,
        heads: args.heads,
        head_dim: args.head_dim,
        layers: args.layers,
    };
    let t = Duration::from_secs(args.timeout);
    let mut parallel = ParallelConfig::default()
        .sp(0)
        .ring_degree(args.ring_degree)
        .device(args.device.clone())
        .timeout(t);
    if let Some(b) = &args.backend {
        parallel = parallel.backend(b.clone());
    }
    let t0 = Instant::now();
    let ex = Executor::start_gpu(launch, &parallel, &spec, t).map_err(err)?;
    let infos = ex.collective_rpc(&DESCRIBE, &(), t).map_err(err)?;
    println!(
        "{} workers ready in {:.2?} (device {}, SP group {:?} on the {} backend: Ulysses degree {} x ring degree {})",
        infos.len(),
        t0.elapsed(),
        infos[0].device,
        infos[0].sp_ranks,
        infos[0].backend,
        infos[0].sp_ranks.len() / args.ring_degree.max(1),
        args.ring_degree
    );
    let mut reference = Model::new(&spec.config(0));
    println!(
        "model: batch {}, {} heads x {}, {} layers; adapter: output projections x{} from request {}",
        spec.batch, spec.heads, spec.head_dim, spec.layers, args.scale, args.adapter_at
    );
    println!("| request | seq | adapter | latency | forward (rank 0) | RPC | RPC share | max abs err | result |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut reports = Vec::new();
    for (i, &seq) in args.seq.iter().enumerate() {
        if i == args.adapter_at {
            ex.collective_rpc(&SCALE_OUTPUT, &args.scale, t)
                .map_err(err)?;
            scale_output(&mut reference, args.scale);
        }
        reference.cfg = spec.config(seq);
        let input = reference.input_seeded(1000 + i as u64);
        let started = Instant::now();
        let out = ex
            .collective_rpc(
                &GENERATE,
                &Request {
                    seq,
                    input: input.clone(),
                },
                t,
            )
            .map_err(err)?;
        let latency = started.elapsed();
        let got = &out[0];
        let want = reference.reference(&input);
        let exact = got.output.len() == want.len()
            && got
                .output
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
        let max_err = got
            .output
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let ok = exact || max_err <= args.tolerance;
        let forward = Duration::from_secs_f64(got.forward_s);
        let rpc = latency.saturating_sub(forward);
        println!(
            "| {i} | {seq} | {} | {:.2} ms | {:.2} ms | {:.3} ms | {:.1}% | {max_err:.1e} | {} |",
            if i >= args.adapter_at { "yes" } else { "no" },
            latency.as_secs_f64() * 1e3,
            forward.as_secs_f64() * 1e3,
            rpc.as_secs_f64() * 1e3,
            100.0 * rpc.as_secs_f64() / latency.as_secs_f64(),
            match (exact, ok) {
                (true, _) => "exact",
                (false, true) => "within tolerance",
                (false, false) => "MISMATCH",
            }
        );
        reports.push(RequestReport {
            seq,
            adapted: i >= args.adapter_at,
            latency,
            forward,
            max_err,
            exact,
            ok,
        });
    }
    ex.shutdown().map_err(err)?;
    Ok(reports)
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.worker {
        return match worker_main() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("worker: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("cannot find this program's path: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut launch = LaunchConfig::new(exe, args.workers).arg("--worker");
    if args.nnodes > 1 {
        launch = launch
            .nodes(args.nnodes, 0)
            .master(args.master_addr.clone(), args.master_port);
    }
    match drive(&args, &launch) {
        Ok(r) if r.iter().all(|r| r.exact) => {
            println!("every result is bit-identical to the single-process reference");
            ExitCode::SUCCESS
        }
        Ok(r) if r.iter().all(|r| r.ok) => {
            println!(
                "every result is within {:e} of the single-process reference",
                args.tolerance
            );
            ExitCode::SUCCESS
        }
        Ok(_) => {
            eprintln!("video_generator: some results differ from the reference");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("video_generator: {e}");
            ExitCode::FAILURE
        }
    }
}
