//! Tensor-parallel reduction of the application's OWN buffers, with no copy
//! in or out: a plain `Vec<f32>` on the CPU, a cudarc `CudaSlice<f32>` (what
//! candle stores) on a GPU.
//!
//! ```text
//! cargo run --release --example tp_borrowed -- --nproc 2             # CPU
//! cargo run --release --example tp_borrowed --features nccl -- --device cuda
//! ```
//!
//! Each rank computes a partial row-parallel matmul output (as a TP linear
//! layer does), sums the partials across the TP group in place in its own
//! buffer, gathers shards into a caller-provided output with `_into`, and
//! checks the results exactly against what every rank can compute alone.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use parallel_state::{DeviceRequest, InitOptions, ParallelState, ReduceOp, Result, Tensor};

#[derive(Parser, Debug)]
struct Args {
    /// Ranks to launch (ignored inside a launch).
    #[arg(long, default_value_t = 2)]
    nproc: usize,
    /// `cpu`, or `cuda` (the local rank's GPU; needs `--features nccl`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Elements per rank.
    #[arg(long, default_value_t = 1 << 16)]
    n: usize,
}

/// Rank `r`'s partial output: integers, so every sum is exact.
fn partial(r: usize, n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7 + r * 13) % 101) as f32).collect()
}

fn run_rank(a: &Args) -> Result<()> {
    let request: DeviceRequest = a.device.parse()?;
    let ps = ParallelState::init_from_env(InitOptions::default().with_device(request))?;
    let w = ps.world_size();
    ps.initialize_model_parallel(w, 1, None)?;
    let tp = ps.tp_group()?;
    let r = tp.rank_in_group();
    let expected: Vec<f32> = (0..a.n)
        .map(|i| (0..w).map(|q| partial(q, a.n)[i]).sum())
        .collect();

    match ps.local_device() {
        parallel_state::Device::Cpu => {
            // The application's own buffer: reduced in place, no copy.
            let mut out = partial(r, a.n);
            let before = out.as_ptr();
            tp.all_reduce(&mut out, ReduceOp::Sum)?;
            assert_eq!(before, out.as_ptr(), "the buffer was not replaced");
            if out != expected {
                return Err(parallel_state::CommError::invalid(
                    "all_reduce result differs",
                ));
            }
            // Gather every rank's shard into a caller-provided output.
            let shard = Tensor::from_vec(partial(r, 8), [1, 8])?;
            let mut gathered = Tensor::zeros([1, 8 * w], parallel_state::DType::F32);
            tp.all_gather_into(&shard, -1, &mut gathered)?;
            let want: Vec<f32> = (0..w).flat_map(|q| partial(q, 8)).collect();
            if gathered.to_vec::<f32>()? != want {
                return Err(parallel_state::CommError::invalid(
                    "all_gather_into result differs",
                ));
            }
        }
        #[cfg(feature = "nccl-app-cudarc")]
        parallel_state::Device::Cuda(ordinal) => {
            // A candle-style buffer: cudarc memory the application owns.
            use parallel_state::nccl::cudarc;
            let ctx = cudarc::driver::CudaContext::new(ordinal)
                .map_err(|e| parallel_state::CommError::Cuda(format!("{e:?}")))?;
            let stream = ctx.default_stream();
            let mut buf = stream
                .clone_htod(&partial(r, a.n))
                .map_err(|e| parallel_state::CommError::Cuda(format!("{e:?}")))?;
            tp.all_reduce(&mut buf, ReduceOp::Sum)?;
            let back = stream
                .clone_dtoh(&buf)
                .map_err(|e| parallel_state::CommError::Cuda(format!("{e:?}")))?;
            if back != expected {
                return Err(parallel_state::CommError::invalid(
                    "all_reduce result differs",
                ));
            }
        }
        #[cfg(not(feature = "nccl-app-cudarc"))]
        d => {
            return Err(parallel_state::CommError::invalid(format!(
                "{d} needs the `nccl` feature"
            )))
        }
    }
    if tp.is_first_rank() {
        println!(
            "tp group {:?} on {} ({}): all_reduce of {} elements in the caller's own buffer and \
             all_gather_into a caller-provided output: exact",
            tp.ranks(),
            ps.local_device(),
            tp.device_backend().unwrap_or(tp.host_backend()),
            a.n
        );
    }
    ps.destroy();
    Ok(())
}

fn main() -> ExitCode {
    let a = Args::parse();
    if std::env::var_os("RANK").is_none() {
        return executor::launch_self("tp_borrowed", a.nproc, Duration::from_secs(120), |c| c);
    }
    match run_rank(&a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
