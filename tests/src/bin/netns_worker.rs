//! One rank of the network-namespace tests (`tests/netns.rs`): a TCP
//! communicator whose ranks sit in separate network namespaces, so every byte
//! crosses a veth pair and a bridge instead of loopback.
//!
//! ```text
//! netns_worker suite                      # the conformance suite + ~1 MiB checks
//! netns_worker loop --dir DIR [--max-secs S]
//! ```
//!
//! The rank joins the job from the environment (`RANK`, `WORLD_SIZE`,
//! `MASTER_ADDR`, `MASTER_PORT`, `DIST_JOB_SECRET`; rank 0 hosts the store
//! unless `DIST_STORE_HOSTED=1`) and binds the address in `DIST_SOCKET_ADDR`
//! (or `DIST_SOCKET_IFNAME`). `DIST_TIMEOUT_S` is the per-operation deadline;
//! set-up (rendezvous and connecting the mesh) gets at least
//! [`MIN_SETUP_TIMEOUT`].
//!
//! - `suite` runs the basic conformance suite (every primitive x dtype x op,
//!   sizes 0, 1, odd and medium) and then every primitive at about 1 MiB, and
//!   prints `rank R: netns suite passed: N checks (bound ADDR, ...)`.
//! - `loop` runs checked collectives until an error, until a stop request or
//!   until `--max-secs` (default 120) pass. After its first iterations it
//!   writes `DIR/started.R`. A rank that finds `DIR/stop` asks the others
//!   (a max all_reduce of a flag each iteration, so every rank stops at the same
//!   iteration) and all exit 0 with `rank R: stopped on request`. On an error it
//!   prints `rank R: FAILED in OP (iteration K) after T s in that operation:
//!   KIND: MESSAGE` and exits 1; `KIND` is the `CommError` variant (`Timeout`,
//!   `PeerLost`, ...).
//!
//! Exit codes: 0 success, 1 a collective failed or gave a wrong result,
//! 2 bad usage or set-up failure, 3 `loop` ran `--max-secs` without an error.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use comm_core::{CommError, DType, DeviceCommunicator, ReduceOp, Store, Tensor};
use comm_cpu::{TcpCommunicator, TcpOptions};
use tests::data::{compare, filled, reduced, tolerance, value, Pattern};
use tests::suite::{self, Mode};

/// The least time given to rendezvous and connection set-up, whatever
/// `DIST_TIMEOUT_S` says: ranks start one after another on a loaded machine.
const MIN_SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Default of `loop --max-secs`.
const DEFAULT_MAX_SECS: f64 = 120.0;
/// Iterations `loop` completes before it writes its started marker.
const WARM_ITERATIONS: u64 = 3;
/// Elements of the all_reduce `loop` runs every iteration (64 KiB of f32,
/// the small-message algorithm).
const LOOP_SMALL: usize = 16 * 1024;
/// Elements per rank of the all_gather `loop` runs every fourth iteration
/// (1 MiB of f32 per rank: the ring).
const LOOP_LARGE: usize = 256 * 1024;

enum Failure {
    /// Bad usage or set-up: exit 2.
    Setup(String),
    /// A collective failed or gave a wrong result: exit 1.
    Run(String),
    /// `loop` never saw an error: exit 3.
    NoError(String),
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Setup(e)) => {
            eprintln!("netns_worker: {e}");
            ExitCode::from(2)
        }
        Err(Failure::Run(e)) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
        Err(Failure::NoError(e)) => {
            eprintln!("{e}");
            ExitCode::from(3)
        }
    }
}

fn usage() -> Failure {
    Failure::Setup(
        "usage: netns_worker suite | netns_worker loop --dir DIR [--max-secs S]".to_string(),
    )
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

struct Rank {
    rank: usize,
    world: usize,
    addr: IpAddr,
    store: Arc<dyn Store>,
    comm: TcpCommunicator,
    setup: Duration,
}

/// Joins the job and connects the TCP mesh on this namespace's address.
fn join() -> Result<Rank, Failure> {
    let start = Instant::now();
    let timeout = comm_core::default_timeout();
    let setup_timeout = timeout.max(MIN_SETUP_TIMEOUT);
    let job = tests::rendezvous::join(setup_timeout)
        .map_err(|e| Failure::Setup(format!("rendezvous: {e}")))?;
    let opts = TcpOptions {
        connect_timeout: setup_timeout,
        ..TcpOptions::with_timeout(timeout)
    };
    let rank = job.rank;
    let addr = opts
        .resolve_ip()
        .map_err(|e| Failure::Setup(format!("rank {rank}: choosing the address to bind: {e}")))?;
    let comm = TcpCommunicator::new(job.store.clone(), rank, job.world, opts).map_err(|e| {
        Failure::Setup(format!(
            "rank {rank}: connecting the tcp mesh from {addr}: {e}"
        ))
    })?;
    Ok(Rank {
        rank,
        world: job.world,
        addr,
        store: job.store,
        comm,
        setup: start.elapsed(),
    })
}

fn run() -> Result<(), Failure> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("suite") => run_suite(),
        Some("loop") => {
            let dir = flag(&args, "--dir").ok_or_else(usage)?;
            let max_secs = match flag(&args, "--max-secs") {
                None => DEFAULT_MAX_SECS,
                Some(s) => s
                    .parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s > 0.0)
                    .ok_or_else(|| {
                        Failure::Setup(format!("--max-secs {s:?} is not a positive number"))
                    })?,
            };
            run_loop(Path::new(&dir), Duration::from_secs_f64(max_secs))
        }
        _ => Err(usage()),
    }
}

// ---------------------------------------------------------------------------
// suite

fn run_suite() -> Result<(), Failure> {
    let start = Instant::now();
    let mut r = join()?;
    let rank = r.rank;
    let mut log = |line: &str| {
        if rank == 0 {
            println!("rank {rank}: {line}");
        }
    };
    let mut checks = suite::run(&mut r.comm, Some(r.store.as_ref()), Mode::Basic, &mut log)
        .map_err(Failure::Run)?;
    let mib_start = Instant::now();
    checks += mib_checks(&mut r.comm).map_err(Failure::Run)?;
    log(&format!(
        "~1 MiB section: passed in {:.2} s",
        mib_start.elapsed().as_secs_f64()
    ));
    r.comm
        .barrier()
        .map_err(|e| Failure::Run(format!("rank {rank}: final barrier: {e}")))?;
    println!(
        "rank {rank}: netns suite passed: {checks} checks (bound {}, world {}, set-up {:.2} s, total {:.2} s)",
        r.addr,
        r.world,
        r.setup.as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Every primitive at about 1 MiB per rank (element counts that are odd and
/// not multiples of the world size), for three dtypes, every reduce op.
fn mib_checks(c: &mut dyn DeviceCommunicator) -> Result<usize, String> {
    let (rank, world) = (c.rank(), c.world_size());
    let mut checks = 0usize;
    let mut salt = 0x0e75_0000u64;
    let mut next = || {
        salt += 1;
        salt
    };
    let err = |what: &str, e: CommError| {
        format!("rank {rank}: {what}: the backend returned an error: {e}")
    };
    let wrong =
        |what: &str, m: tests::data::Mismatch| format!("rank {rank}: {what}: WRONG RESULT: {m}");
    let unique = |d: DType, s: u64, r: usize, i: usize| value(d, Pattern::Unique, s, r, i);

    for dtype in [DType::F32, DType::BF16, DType::I64] {
        let n = (1 << 20) / dtype.size() + 1;
        let b = n / world + 1;

        for op in ReduceOp::ALL {
            let s = next();
            let what = format!("~1 MiB all_reduce {dtype} {op} n={n}");
            let mut t = filled(dtype, n, |i| value(dtype, Pattern::Reduce(op), s, rank, i));
            c.all_reduce(&mut t, op).map_err(|e| err(&what, e))?;
            compare(
                &t,
                |i| reduced(dtype, op, s, world, i),
                |e| tolerance(dtype, op, e),
            )
            .map_err(|m| wrong(&what, m))?;
            checks += 1;
        }

        let (s, op) = (next(), ReduceOp::Sum);
        let what = format!("~1 MiB reduce_scatter {dtype} sum block={b}");
        let input = filled(dtype, world * b, |i| {
            value(dtype, Pattern::Reduce(op), s, rank, i)
        });
        let mut out = Tensor::zeros([b], dtype);
        c.reduce_scatter(&input, &mut out, op)
            .map_err(|e| err(&what, e))?;
        compare(
            &out,
            |k| reduced(dtype, op, s, world, rank * b + k),
            |_| 0.0,
        )
        .map_err(|m| wrong(&what, m))?;
        checks += 1;

        let s = next();
        let what = format!("~1 MiB all_gather {dtype} n={b}");
        let input = filled(dtype, b, |i| unique(dtype, s, rank, i));
        let mut out = Tensor::zeros([world * b], dtype);
        c.all_gather(&input, &mut out).map_err(|e| err(&what, e))?;
        compare(&out, |i| unique(dtype, s, i / b, i % b), |_| 0.0).map_err(|m| wrong(&what, m))?;
        checks += 1;

        let (s, root) = (next(), world - 1);
        let what = format!("~1 MiB broadcast {dtype} n={n} root={root}");
        let mut t = filled(dtype, n, |i| unique(dtype, s, rank, i));
        c.broadcast(&mut t, root).map_err(|e| err(&what, e))?;
        compare(&t, |i| unique(dtype, s, root, i), |_| 0.0).map_err(|m| wrong(&what, m))?;
        checks += 1;

        let (s, root) = (next(), world / 2);
        let what = format!("~1 MiB gather {dtype} n={b} root={root}");
        let input = filled(dtype, b, |i| unique(dtype, s, rank, i));
        if rank == root {
            let mut out = Tensor::zeros([world * b], dtype);
            c.gather(&input, Some(&mut out), root)
                .map_err(|e| err(&what, e))?;
            compare(&out, |i| unique(dtype, s, i / b, i % b), |_| 0.0)
                .map_err(|m| wrong(&what, m))?;
        } else {
            c.gather(&input, None, root).map_err(|e| err(&what, e))?;
        }
        checks += 1;

        let s = next();
        let what = format!("~1 MiB all_to_all {dtype} block={b}");
        let input = filled(dtype, world * b, |i| unique(dtype, s, rank, i));
        let mut out = Tensor::zeros([world * b], dtype);
        c.all_to_all(&input, &mut out).map_err(|e| err(&what, e))?;
        compare(&out, |i| unique(dtype, s, i / b, rank * b + i % b), |_| 0.0)
            .map_err(|m| wrong(&what, m))?;
        checks += 1;

        if world > 1 {
            // A ring: even ranks send first, odd ranks receive first.
            let s = next();
            let what = format!("~1 MiB send/recv ring {dtype} n={n}");
            let (to, from) = ((rank + 1) % world, (rank + world - 1) % world);
            let out = filled(dtype, n, |i| unique(dtype, s, rank, i));
            let mut inp = Tensor::zeros([n], dtype);
            if rank % 2 == 0 {
                c.send(&out, to).map_err(|e| err(&what, e))?;
                c.recv(&mut inp, from).map_err(|e| err(&what, e))?;
            } else {
                c.recv(&mut inp, from).map_err(|e| err(&what, e))?;
                c.send(&out, to).map_err(|e| err(&what, e))?;
            }
            compare(&inp, |i| unique(dtype, s, from, i), |_| 0.0).map_err(|m| wrong(&what, m))?;
            checks += 1;
        }
    }
    Ok(checks)
}

// ---------------------------------------------------------------------------
// loop

/// The `CommError` variant's name (`Timeout`, `PeerLost`, ...).
fn kind(e: &CommError) -> String {
    let dbg = format!("{e:?}");
    dbg.split([' ', '(', '{'])
        .next()
        .unwrap_or("Unknown")
        .to_string()
}

/// Writes `dir/name` atomically (a temporary file renamed into place), so a
/// poller never sees it half written.
fn write_marker(dir: &Path, name: &str, body: &str) -> Result<(), String> {
    let tmp: PathBuf = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, body)
        .and_then(|()| std::fs::rename(&tmp, dir.join(name)))
        .map_err(|e| format!("writing the marker {}: {e}", dir.join(name).display()))
}

fn run_loop(dir: &Path, max: Duration) -> Result<(), Failure> {
    let mut r = join()?;
    let (rank, world) = (r.rank, r.world);
    let start = Instant::now();
    let tri = (world * (world + 1) / 2) as f64;
    let stop_file = dir.join("stop");
    let mut iteration = 0u64;
    loop {
        if start.elapsed() >= max {
            return Err(Failure::NoError(format!(
                "rank {rank}: no error and no stop request within {max:?} ({iteration} iterations); \
                 giving up"
            )));
        }
        let k = iteration as usize;
        // Each step: (name, the operation); timed so a failure says how long
        // the failing operation waited.
        let op_start = Instant::now();
        let step = (|| -> Result<bool, (&'static str, Result<CommError, String>)> {
            let what = "all_reduce f32 sum (64 KiB)";
            let mut t = filled(DType::F32, LOOP_SMALL, |i| {
                (rank + 1) as f64 * ((k + i) % 7) as f64
            });
            r.comm
                .all_reduce(&mut t, ReduceOp::Sum)
                .map_err(|e| (what, Ok(e)))?;
            compare(&t, |i| tri * ((k + i) % 7) as f64, |_| 0.0)
                .map_err(|m| (what, Err(format!("WRONG RESULT: {m}"))))?;
            if iteration % 4 == 3 {
                let what = "all_gather f32 (1 MiB per rank)";
                let input = filled(DType::F32, LOOP_LARGE, |i| {
                    ((rank * 31 + k + i) % 1000) as f64
                });
                let mut out = Tensor::zeros([world * LOOP_LARGE], DType::F32);
                r.comm
                    .all_gather(&input, &mut out)
                    .map_err(|e| (what, Ok(e)))?;
                compare(
                    &out,
                    |i| (((i / LOOP_LARGE) * 31 + k + i % LOOP_LARGE) % 1000) as f64,
                    |_| 0.0,
                )
                .map_err(|m| (what, Err(format!("WRONG RESULT: {m}"))))?;
            }
            let what = "all_reduce i32 max (stop flag)";
            let mut flag = Tensor::from_vec1(vec![i32::from(stop_file.exists())]);
            r.comm
                .all_reduce(&mut flag, ReduceOp::Max)
                .map_err(|e| (what, Ok(e)))?;
            let stop = flag
                .to_vec::<i32>()
                .map_err(|e| (what, Err(format!("reading the flag: {e}"))))?;
            Ok(stop.first() == Some(&1))
        })();
        match step {
            Ok(true) => {
                println!("rank {rank}: stopped on request after {iteration} iterations");
                return Ok(());
            }
            Ok(false) => {}
            Err((what, Ok(e))) => {
                return Err(Failure::Run(format!(
                    "rank {rank}: FAILED in {what} (iteration {iteration}) after {:.2} s in that operation: {}: {e}",
                    op_start.elapsed().as_secs_f64(),
                    kind(&e)
                )))
            }
            Err((what, Err(msg))) => {
                return Err(Failure::Run(format!(
                    "rank {rank}: FAILED in {what} (iteration {iteration}): {msg}"
                )))
            }
        }
        iteration += 1;
        if iteration == WARM_ITERATIONS {
            write_marker(
                dir,
                &format!("started.{rank}"),
                &format!("pid {} addr {}\n", std::process::id(), r.addr),
            )
            .map_err(|e| Failure::Setup(format!("rank {rank}: {e}")))?;
            println!(
                "rank {rank}: started (bound {}, set-up {:.2} s)",
                r.addr,
                r.setup.as_secs_f64()
            );
        }
    }
}
