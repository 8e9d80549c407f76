//! `collective_rpc` against FastVideo's executor mechanism (a Python driver
//! with `multiprocessing` pipes and pickle, `benches/peers/mp_rpc.py`), side
//! by side in one run on the same machine:
//!
//! * round trip of a call with a 1 KiB argument and a 1 KiB result from
//!   each of 4 local workers (issue 13 target: ours >= 10x faster);
//! * a 16 MiB argument to 4 local workers, each replying with its length,
//!   against one 16 MiB `memcpy` (target: <= 1.5x per reader). Each worker
//!   takes its own copy of the argument: a handler registered with
//!   `Methods::on_view` copies it from the request ring into a buffer the
//!   worker keeps (as a worker stages a tensor for its device); a second
//!   figure decodes it into a fresh `ByteBuf` per call (`Methods::on`),
//!   which adds the kernel's zeroing of 16 MiB of new pages per reader.
//!
//! Ours runs twice: local workers reading requests from the shared-memory
//! queue and replying through their queues (the default), and on their
//! sockets (`DIST_EXECUTOR_QUEUE=socket`). The last line (`RESULT ...`) is
//! for scripts that repeat the run (`benches/peers/run_rpc.sh`).
//!
//! ```text
//! cargo bench -p executor --bench rpc            # EXECUTOR_BENCH_QUICK=1 for a short run
//!                                                 # EXECUTOR_BENCH_SHM_ONLY=1: ours on shm only
//!                                                 # EXECUTOR_BENCH_RT_ONLY=1: no broadcast
//! ```
//!
//! The bench binary re-runs itself as the workers.

use std::hint::black_box;
use std::process::Command;
use std::time::{Duration, Instant};

use executor::{Executor, LaunchConfig, Method, Methods, Worker};
use serde_bytes::ByteBuf;

const ECHO: Method<ByteBuf, ByteBuf> = Method::new("echo");
const SIZE: Method<ByteBuf, u64> = Method::new("size");
const TAKE: Method<ByteBuf, u64> = Method::new("take");
const WORKER_ENV: &str = "EXECUTOR_BENCH_WORKER";
/// Local workers (`EXECUTOR_BENCH_WORKERS` overrides the issue's 4, to see
/// how the round trip scales).
fn workers() -> usize {
    std::env::var("EXECUTOR_BENCH_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
}
const SMALL: usize = 1024;
const BIG: usize = 16 << 20;
const T: Duration = Duration::from_secs(120);

fn worker() {
    let w = Worker::from_env().expect("started by the bench's executor");
    // The state: the buffer TAKE copies each argument into.
    let mut m = Methods::<Vec<u8>>::new();
    m.on(&ECHO, |_, b: ByteBuf| Ok::<_, String>(b))
        .on(&SIZE, |_, b: ByteBuf| Ok::<_, String>(b.len() as u64))
        .on_view(&TAKE, |kept, b: &[u8]| {
            kept.clear();
            kept.extend_from_slice(b);
            Ok::<_, String>(black_box(kept).len() as u64)
        });
    if w.run(|_| Ok::<_, String>(Vec::new()), &mut m).is_err() {
        std::process::exit(1);
    }
}

/// Median over `nbatch` batches of the mean time of `f` in a batch.
fn median_per_call(iters: usize, nbatch: usize, mut f: impl FnMut()) -> Duration {
    let per = (iters / nbatch).max(1);
    let mut v: Vec<Duration> = (0..nbatch)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..per {
                f();
            }
            t.elapsed() / per as u32
        })
        .collect();
    v.sort();
    v[v.len() / 2]
}

fn python_peer(iters: usize, big_iters: usize) -> Option<(f64, f64)> {
    // EXECUTOR_BENCH_PEER: the script's path when the binary runs elsewhere.
    let script = std::env::var("EXECUTOR_BENCH_PEER").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../benches/peers/mp_rpc.py").into()
    });
    let out = Command::new(std::env::var("PYTHON").unwrap_or_else(|_| "python3".into()))
        .args([
            script.as_str(),
            "--workers",
            &workers().to_string(),
            "--size",
            &SMALL.to_string(),
            "--iters",
            &iters.to_string(),
            "--big",
            &BIG.to_string(),
            "--big-iters",
            &big_iters.to_string(),
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "python peer failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> Option<f64> {
        let at = text.find(&format!("\"{name}\": "))? + name.len() + 4;
        let rest = &text[at..];
        let end = rest.find([',', '}'])?;
        rest[..end].trim().parse().ok()
    };
    Some((field("rt_us")?, field("bcast_ms")?))
}

/// Our figures in one configuration.
struct Ours {
    rt: Duration,
    /// 16 MiB broadcast, each worker copying it into its kept buffer.
    bcast: Duration,
    /// The same, each worker decoding it into a fresh buffer.
    bcast_owned: Duration,
}

/// Round trip and 16 MiB broadcast of our executor with local workers
/// getting requests through `queue` (`shm`: one shared-memory queue and
/// reply queues; `socket`: their sockets).
fn measure(queue: &str, iters: usize, big_iters: usize) -> Ours {
    let exe = std::env::current_exe().expect("own executable");
    let cfg = LaunchConfig::new(exe, workers())
        .env(WORKER_ENV, "1")
        .env(executor::QUEUE_ENV, queue);
    let ex = Executor::start(&cfg, T).expect("workers start");

    let small = ByteBuf::from((0..SMALL).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    for _ in 0..500 {
        let r = ex.collective_rpc(&ECHO, &small, T).expect("echo");
        assert!(r.len() == workers() && r.iter().all(|b| *b == small));
    }
    let rt = median_per_call(iters, 10, || {
        black_box(ex.collective_rpc(&ECHO, &small, T).expect("echo"));
    });

    if std::env::var_os("EXECUTOR_BENCH_RT_ONLY").is_some() {
        // Profiling the round trip alone.
        ex.shutdown().expect("shutdown");
        return Ours {
            rt,
            bcast: Duration::ZERO,
            bcast_owned: Duration::ZERO,
        };
    }
    let big = ByteBuf::from(vec![1u8; BIG]);
    let bcast_with = |m: &Method<ByteBuf, u64>| {
        assert_eq!(
            ex.collective_rpc(m, &big, T).expect("broadcast"),
            vec![BIG as u64; workers()]
        );
        median_per_call(big_iters, big_iters, || {
            black_box(ex.collective_rpc(m, &big, T).expect("broadcast"));
        })
    };
    let bcast = bcast_with(&TAKE);
    let bcast_owned = bcast_with(&SIZE);
    ex.shutdown().expect("shutdown");
    Ours {
        rt,
        bcast,
        bcast_owned,
    }
}

fn main() {
    if std::env::var_os(WORKER_ENV).is_some() {
        worker();
        return;
    }
    let quick = std::env::var_os("EXECUTOR_BENCH_QUICK").is_some();
    let (iters, big_iters) = if quick { (2_000, 5) } else { (20_000, 20) };
    let shm = measure("shm", iters, big_iters);
    if std::env::var_os("EXECUTOR_BENCH_SHM_ONLY").is_some() {
        // For profiling the shared-memory path alone.
        println!(
            "shm only: round trip {:.2} us, 16 MiB broadcast {:.3} ms (fresh buffers: {:.3} ms)",
            shm.rt.as_secs_f64() * 1e6,
            shm.bcast.as_secs_f64() * 1e3,
            shm.bcast_owned.as_secs_f64() * 1e3
        );
        return;
    }
    let sock = measure("socket", iters, big_iters);
    let (rt, bcast, bcast_owned) = (shm.rt, shm.bcast, shm.bcast_owned);
    let (rt_sock, bcast_sock) = (sock.rt, sock.bcast);

    // The yardstick: one 16 MiB memcpy from one source into one buffer per
    // reader in turn (buffers touched before, as the readers' kept buffers
    // are), i.e. the copies the broadcast makes, done by one process.
    // Repeating the copy into the same buffer instead (`memcpy_hot`) keeps
    // source and destination in a 32 MiB last-level cache, which no
    // reader's copy enjoys; it is printed too.
    let n = workers();
    let src = vec![3u8; BIG];
    let mut dst: Vec<Vec<u8>> = (0..n).map(|_| vec![0u8; BIG]).collect();
    let mut next = 0;
    let memcpy = median_per_call(big_iters * 4, big_iters * 4, || {
        dst[next].copy_from_slice(black_box(&src));
        black_box(&mut dst[next]);
        next = (next + 1) % n;
    });
    let memcpy_hot = median_per_call(big_iters * 4, big_iters * 4, || {
        dst[0].copy_from_slice(black_box(&src));
        black_box(&mut dst[0]);
    });

    let py = python_peer(iters / 4, big_iters.min(10));
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().next().unwrap_or("?");
    println!("executor collective_rpc, {n} local workers, {cores} cores, load {load}");
    println!("| case | ours (shm queues) | ours (sockets) | python multiprocessing+pickle | shm vs python | target |");
    println!("|---|---|---|---|---|---|");
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let (py_rt, py_bc) = match py {
        Some((r, b)) => (format!("{r:.1} us"), format!("{b:.2} ms")),
        None => ("(python3 not run)".into(), "(python3 not run)".into()),
    };
    let ratio = |py: Option<f64>, ours: f64| {
        py.map(|p| format!("{:.1}x faster", p / ours))
            .unwrap_or_default()
    };
    println!(
        "| round trip, 1 KiB arg, 1 KiB replies | {:.1} us | {:.1} us | {py_rt} | {} | >= 10x |",
        us(rt),
        us(rt_sock),
        ratio(py.map(|p| p.0), us(rt))
    );
    println!(
        "| 16 MiB broadcast, copied into each worker's kept buffer | {:.2} ms | {:.2} ms | {py_bc} | {} | |",
        ms(bcast),
        ms(bcast_sock),
        ratio(py.map(|p| p.1), ms(bcast))
    );
    println!(
        "| 16 MiB broadcast, decoded into a fresh buffer per call | {:.2} ms | | {py_bc} | {} | |",
        ms(bcast_owned),
        ratio(py.map(|p| p.1), ms(bcast_owned))
    );
    let per_reader = |d: Duration, m: Duration| d.as_secs_f64() / m.as_secs_f64() / n as f64;
    println!(
        "16 MiB broadcast (shm) per reader ({n} readers) / one 16 MiB memcpy into {n} buffers in turn ({:.2} ms): {:.2}x into kept buffers, {:.2}x into fresh ones (target <= 1.5x)",
        ms(memcpy),
        per_reader(bcast, memcpy),
        per_reader(bcast_owned, memcpy)
    );
    println!(
        "  against one 16 MiB memcpy repeated into one cached buffer ({:.2} ms): {:.2}x into kept buffers, {:.2}x into fresh ones",
        ms(memcpy_hot),
        per_reader(bcast, memcpy_hot),
        per_reader(bcast_owned, memcpy_hot)
    );
    println!(
        "RESULT rt_us={:.2} rt_sock_us={:.2} py_rt_us={} bcast_ms={:.3} bcast_owned_ms={:.3} bcast_sock_ms={:.3} py_bcast_ms={} memcpy_ms={:.3} memcpy_hot_ms={:.3} load={load}",
        us(rt),
        us(rt_sock),
        py.map_or("nan".into(), |p| format!("{:.2}", p.0)),
        ms(bcast),
        ms(bcast_owned),
        ms(bcast_sock),
        py.map_or("nan".into(), |p| format!("{:.3}", p.1)),
        ms(memcpy),
        ms(memcpy_hot)
    );
}
