//! `distrun`: a torchrun-compatible launcher.
//!
//! ```text
//! distrun --nproc-per-node N [--nnodes K --node-rank I --master-addr A --master-port P] \
//!         [--timeout SECS] [--grace SECS] [--no-prefix] [--inherit-output] -- PROGRAM ARGS...
//! ```

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use executor::{install_signal_handlers, launch, LaunchConfig};

/// Start N copies of PROGRAM with the torchrun rendezvous environment
/// (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR,
/// MASTER_PORT, DIST_JOB_SECRET, DIST_JOB_ID). When one fails, the others are
/// stopped (SIGTERM, grace, SIGKILL) and distrun exits with its code.
#[derive(Debug, Parser)]
#[command(name = "distrun", version)]
struct Args {
    /// Processes to start on this node.
    #[arg(long, alias = "nproc_per_node", value_name = "N")]
    nproc_per_node: usize,
    /// Number of nodes in the job.
    #[arg(long, default_value_t = 1, value_name = "K")]
    nnodes: usize,
    /// This node's index (0..nnodes).
    #[arg(long, alias = "node_rank", default_value_t = 0, value_name = "I")]
    node_rank: usize,
    /// Address of node 0, where the rendezvous store runs.
    #[arg(
        long,
        alias = "master_addr",
        default_value = "127.0.0.1",
        value_name = "A"
    )]
    master_addr: String,
    /// Port of the rendezvous store. Single node without it: distrun hosts
    /// the store on a free port.
    #[arg(long, alias = "master_port", value_name = "P")]
    master_port: Option<u16>,
    /// Kill the whole job after this many seconds (exit code 124).
    #[arg(long, value_name = "SECS")]
    timeout: Option<f64>,
    /// Seconds between SIGTERM and SIGKILL when stopping ranks.
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    grace: f64,
    /// Do not prefix output lines with "[rank R] ".
    #[arg(long)]
    no_prefix: bool,
    /// Let the ranks write to distrun's stdout/stderr directly (they see the
    /// terminal; lines of different ranks may then mix mid-line).
    #[arg(long)]
    inherit_output: bool,
    /// The program to run, then its arguments (after `--`).
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "PROGRAM ARGS"
    )]
    command: Vec<OsString>,
}

fn secs(name: &str, v: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(v)
        .map_err(|_| format!("--{name} must be a non-negative number of seconds, got {v}"))
}

fn run(a: Args) -> Result<i32, String> {
    let mut it = a.command.into_iter();
    let program = it.next().ok_or("no PROGRAM given after --")?;
    let mut cfg = LaunchConfig::new(program, a.nproc_per_node)
        .args(it)
        .nodes(a.nnodes, a.node_rank)
        .master(a.master_addr, a.master_port)
        .grace(secs("grace", a.grace)?)
        .prefix(!a.no_prefix)
        .inherit_output(a.inherit_output);
    if let Some(t) = a.timeout {
        cfg = cfg.timeout(secs("timeout", t)?);
    }
    install_signal_handlers().map_err(|e| e.to_string())?;
    let outcome = launch(&cfg).map_err(|e| e.to_string())?;
    Ok(outcome.exit_code)
}

/// Shows the library's warnings (a rank still waited for, a segment
/// removed, a refused connection) on stderr; `RUST_LOG` overrides the
/// default level (`warn`). Each event is written with one `write`.
fn install_subscriber() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

fn main() -> ExitCode {
    install_subscriber();
    let args = Args::parse();
    match run(args) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(msg) => {
            // One write, so the line cannot interleave with a rank's.
            let line = format!("distrun: error: {msg}\n");
            let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
            ExitCode::from(1)
        }
    }
}
