//! Measures the shm backend the way `benches/peers/mpi_bench.c` measures
//! Open MPI and `benches/peers/vllm_mq_bench.py` measures vLLM's queue, with
//! ranks as real processes (this program re-executed per rank; `--threads`
//! runs them as threads instead).
//!
//! Collectives (through the checked front, as users call them): for each op
//! and size (bytes of one rank's buffer: all_reduce / broadcast the tensor,
//! all_gather the gathered output, all_to_all one rank's input), f32, it
//! prints `op bytes time_us algbw_GBps busbw_GBps` where time is the mean per
//! call of the slowest rank in the best of 5 timed batches, like mpi_bench.
//! `all_to_all_4d` is the Ulysses exchange `[1, S/P, H, D] -> [1, S, H/P, D]`
//! (H = 24 heads, D = 128) as one strided all-to-all with no permute, and
//! `all_to_all_4d_inv` its inverse; their bytes are the largest such tensor
//! not above the size.
//!
//! MessageQueue (`--mq`): one writer and N reader processes, per size:
//! `pipelined` (the writer enqueues back to back; time per message until
//! every reader has read the last one) and `round trip` (the writer
//! enqueues one message, each reader answers with 8 bytes on its own queue;
//! one-way = half the round trip).
//!
//! ```text
//! cargo run --release -p comm-shm --example shm_perf -- --world 4 [--op all_to_all] [-b 64K] [-e 64M] [--check]
//! cargo run --release -p comm-shm --example shm_perf -- --world 2 --op all_to_all_4d,all_to_all -b 1M -e 128M
//! cargo run --release -p comm-shm --example shm_perf -- --mq --readers 3 [-b 4] [-e 64M]
//! ```
//! Tuning: `--ws-kib`, `--one-shot-kib`, `--spin`, `--single-copy MIN_BYTES`
//! (on for every collective), `--single-copy-mode off|auto|on`, `--pin`
//! (rank r on core r % cores).

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use comm_core::{
    BlockLayout, Collective, Communicator, GroupContext, Layout, ReduceOp, Registry, Store,
};
use comm_shm::{MessageQueue, MqOptions, ShmFactory, ShmOptions, SingleCopyMode, SpinPolicy};
use dist_utils::{FileStore, HashStore};

const OPS: [&str; 7] = [
    "all_reduce",
    "all_gather",
    "all_to_all",
    "all_to_all_4d",
    "all_to_all_4d_inv",
    "broadcast",
    "reduce_scatter",
];
const HEADS: usize = 24;
const BATCHES: usize = 5;
const HEAD_DIM: usize = 128;

#[derive(Debug, Clone)]
struct Args {
    world: usize,
    ops: Vec<String>,
    min: usize,
    max: usize,
    check: bool,
    threads: bool,
    mq: bool,
    readers: usize,
    pin: bool,
    opts: ShmOptions,
    raw: Vec<String>,
}

fn size(s: &str) -> usize {
    let s = s.trim();
    let (num, mul) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<usize>().expect("a size like 64K") * mul
}

fn parse() -> Args {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let get = |n: &str| {
        raw.iter()
            .position(|a| a == n)
            .and_then(|i| raw.get(i + 1).cloned())
    };
    let has = |n: &str| raw.iter().any(|a| a == n);
    let mut opts = ShmOptions::default().timeout(Duration::from_secs(120));
    if let Some(v) = get("--ws-kib") {
        opts = opts.workspace_bytes(v.parse::<usize>().unwrap() << 10);
    }
    if let Some(v) = get("--one-shot-kib") {
        opts = opts.one_shot_max_bytes(v.parse::<usize>().unwrap() << 10);
    }
    if let Some(v) = get("--spin") {
        opts = opts.spin(SpinPolicy {
            spin_iters: v.parse().unwrap(),
            ..SpinPolicy::default()
        });
    }
    if let Some(v) = get("--single-copy") {
        opts = opts.single_copy(SingleCopyMode::On, size(&v));
    }
    if let Some(v) = get("--single-copy-mode") {
        let mode = match v.as_str() {
            "off" => SingleCopyMode::Off,
            "on" => SingleCopyMode::On,
            _ => SingleCopyMode::Auto,
        };
        let min = opts.single_copy_min_bytes;
        opts = opts.single_copy(mode, min);
    }
    let mq = has("--mq");
    Args {
        world: get("--world").map_or(2, |v| v.parse().unwrap()),
        ops: get("--op").map_or(OPS.iter().map(|s| s.to_string()).collect(), |v| {
            v.split(',').map(str::to_string).collect()
        }),
        min: get("-b").map_or(if mq { 4 } else { 8 }, |v| size(&v)),
        max: get("-e").map_or(64 << 20, |v| size(&v)),
        check: has("--check"),
        threads: has("--threads"),
        mq,
        readers: get("--readers").map_or(1, |v| v.parse().unwrap()),
        pin: has("--pin"),
        opts,
        raw,
    }
}

fn sizes(a: &Args) -> Vec<usize> {
    let mut v = Vec::new();
    let mut s = a.min.max(1);
    while s <= a.max {
        v.push(s);
        s *= if a.mq { 4 } else { 2 };
    }
    v
}

fn iters_for(bytes: usize) -> usize {
    if bytes <= 64 {
        return 20_000;
    }
    (400_000_000 / bytes).clamp(5, 20_000)
}

fn pin(rank: usize) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut set = rustix::thread::CpuSet::new();
    set.set(rank % cores);
    let _ = rustix::thread::sched_setaffinity(None, &set);
}

const CHILD: &str = "SHM_PERF_RANK";
const STORE: &str = "SHM_PERF_STORE";

fn main() {
    let a = parse();
    if let Ok(r) = std::env::var(CHILD) {
        let rank: usize = r.parse().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(FileStore::new(std::env::var(STORE).unwrap()).unwrap());
        if a.pin {
            pin(rank);
        }
        if a.mq {
            mq_rank(&a, rank, store);
        } else {
            collectives_rank(&a, rank, store);
        }
        return;
    }
    let n = if a.mq { a.readers + 1 } else { a.world };
    if a.threads {
        let store: Arc<dyn Store> = Arc::new(HashStore::new());
        std::thread::scope(|s| {
            for r in 0..n {
                let (a, store) = (a.clone(), store.clone());
                s.spawn(move || {
                    if a.pin {
                        pin(r);
                    }
                    if a.mq {
                        mq_rank(&a, r, store)
                    } else {
                        collectives_rank(&a, r, store)
                    }
                });
            }
        });
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("store");
    FileStore::new(&path).unwrap();
    let kids: Vec<_> = (0..n)
        .map(|r| {
            Command::new(std::env::current_exe().unwrap())
                .args(&a.raw)
                .env(CHILD, r.to_string())
                .env(STORE, &path)
                .spawn()
                .unwrap()
        })
        .collect();
    let mut ok = true;
    for mut k in kids {
        ok &= k.wait().unwrap().success();
    }
    assert!(ok, "a rank failed");
}

fn comm_for(a: &Args, rank: usize, store: Arc<dyn Store>) -> Communicator {
    let reg = Registry::new().with(ShmFactory::with_options(a.opts.clone()));
    let ctx = GroupContext::new(store, rank, a.world)
        .timeout(Duration::from_secs(120))
        .group_name("perf");
    reg.create("shm", &ctx).unwrap()
}

/// The Ulysses layouts of `[1, S/P, H, D]` f32 of at most `bytes` (mode 1,
/// to `[1, S, H/P, D]`), or of `[1, S, H/P, D]` back (`inverse`, mode 2),
/// with the element count and shape: `(send, recv, elements, shape)`.
fn ulysses(
    bytes: usize,
    p: usize,
    inverse: bool,
) -> Option<(BlockLayout, BlockLayout, usize, [usize; 4])> {
    let (h, d) = (HEADS, HEAD_DIM);
    if h % p != 0 {
        return None;
    }
    let sp = bytes / 4 / (h * d);
    if sp == 0 {
        return None;
    }
    let hp = h / p;
    let heads = BlockLayout {
        block_step: hp * d,
        runs: sp,
        run: hp * d,
        stride: h * d,
    };
    let rows = BlockLayout::contiguous(sp * hp * d);
    Some(if inverse {
        (rows, heads, sp * h * d, [1, sp * p, hp, d])
    } else {
        (heads, rows, sp * h * d, [1, sp, h, d])
    })
}

fn collectives_rank(a: &Args, rank: usize, store: Arc<dyn Store>) {
    let c = comm_for(a, rank, store);
    let w = a.world;
    let max = a.max;
    let mut x: Vec<f32> = (0..max / 4).map(|i| (i % 7) as f32).collect();
    let mut y = vec![0f32; max / 4];
    if rank == 0 {
        println!(
            "# comm-shm world {w} ({}), single copy {}\n# op bytes time_us algbw_GBps busbw_GBps",
            if a.threads {
                "ranks are threads"
            } else {
                "ranks are processes"
            },
            format!("{:?}", a.opts.single_copy).to_lowercase()
        );
    }
    for op in &a.ops {
        for bytes in sizes(a) {
            let mut n = bytes / 4;
            let mut shape4 = None;
            match op.as_str() {
                "all_gather" | "all_to_all" | "reduce_scatter" => {
                    n -= n % w;
                    if n == 0 {
                        continue;
                    }
                }
                "all_to_all_4d" | "all_to_all_4d_inv" => {
                    match ulysses(bytes, w, op.ends_with("inv")) {
                        Some(u) => {
                            n = u.2;
                            shape4 = Some(u);
                        }
                        None => continue,
                    }
                }
                _ => {}
            }
            let it = iters_for(bytes);
            let warm = it / 10 + 2;
            let mut call = |i: usize| {
                match op.as_str() {
                    "all_reduce" => c.all_reduce(&mut x[..n], ReduceOp::Sum).unwrap(),
                    "all_gather" => c.all_gather(&x[..n / w], &mut y[..n]).unwrap(),
                    "reduce_scatter" => c
                        .reduce_scatter(&x[..n], &mut y[..n / w], ReduceOp::Sum)
                        .unwrap(),
                    "all_to_all" => c.all_to_all(&x[..n], &mut y[..n]).unwrap(),
                    "all_to_all_4d" | "all_to_all_4d_inv" => {
                        let (send, recv, _, shape) = shape4.as_ref().unwrap();
                        let l = Layout {
                            op: Collective::AllToAll4d,
                            shape,
                            arg: if op.ends_with("inv") {
                                16 + 2
                            } else {
                                2 * 16 + 1
                            },
                        };
                        c.all_to_all_strided(&x[..n], *send, &mut y[..n], *recv, Some(l))
                            .unwrap()
                    }
                    "broadcast" => c.broadcast(&mut x[..n], 0).unwrap(),
                    other => panic!("unknown op {other}"),
                }
                if op == "all_reduce" && i.is_multiple_of(4) {
                    x[0] = 1.0;
                }
            };
            for i in 0..warm {
                call(i);
            }
            // BATCHES timed batches; per batch the slowest rank's mean per
            // call; the best batch is reported (as mpi_bench does).
            let per = (it / BATCHES).max(1);
            let ctx0 = ctx_switches();
            let cpu0 = cpu_seconds();
            let mut tm = [f64::MAX];
            for _ in 0..BATCHES {
                c.barrier().unwrap();
                let t0 = Instant::now();
                for i in 0..per {
                    call(i);
                }
                let mut el = [t0.elapsed().as_secs_f64() / per as f64];
                c.all_reduce(&mut el, ReduceOp::Max).unwrap();
                tm[0] = tm[0].min(el[0]);
            }
            if std::env::var_os("SHM_PERF_PCT").is_some() && rank == 0 {
                // Per-call latency percentiles on rank 0 (diagnostics).
                let mut v: Vec<f64> = (0..per.min(2000))
                    .map(|i| {
                        let t = Instant::now();
                        call(i);
                        t.elapsed().as_secs_f64() * 1e6
                    })
                    .collect();
                v.sort_by(f64::total_cmp);
                let q = |f: f64| v[((v.len() - 1) as f64 * f) as usize];
                eprintln!(
                    "rank 0 {op} {}: p10 {:.2} p50 {:.2} p90 {:.2} p99 {:.2} max {:.0} us",
                    n * 4,
                    q(0.1),
                    q(0.5),
                    q(0.9),
                    q(0.99),
                    q(1.0)
                );
            } else if std::env::var_os("SHM_PERF_PCT").is_some() {
                for i in 0..per.min(2000) {
                    call(i);
                }
            }
            // CPU time of all ranks per call (spinning and yielding included).
            let mut cpu = [(cpu_seconds() - cpu0) / (per * BATCHES) as f64];
            c.all_reduce(&mut cpu, ReduceOp::Sum).unwrap();
            if rank == 0 {
                let alg = (n * 4) as f64 / tm[0] / 1e9;
                let wf = w as f64;
                let f = match op.as_str() {
                    "all_reduce" => 2.0 * (wf - 1.0) / wf,
                    "broadcast" => 1.0,
                    _ => (wf - 1.0) / wf,
                };
                if std::env::var_os("SHM_PERF_CTX").is_some() {
                    let (v, i) = ctx_switches();
                    let calls = (per * BATCHES) as f64;
                    eprintln!(
                        "rank 0 {op} {}: {:.1} voluntary + {:.1} involuntary context switches, \
                         {:.1} us of CPU (all ranks) per call",
                        n * 4,
                        (v - ctx0.0) as f64 / calls,
                        (i - ctx0.1) as f64 / calls,
                        cpu[0] * 1e6
                    );
                }
                println!(
                    "{op} {} {:.2} {:.3} {:.3}",
                    n * 4,
                    tm[0] * 1e6,
                    alg,
                    alg * f
                );
            }
            if a.check {
                verify(&c, op, n, rank, w, shape4.as_ref());
            }
        }
    }
}

/// CPU time (user + system) of this thread so far, in seconds.
fn cpu_seconds() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

/// (voluntary, involuntary) context switches of this thread so far.
fn ctx_switches() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/thread-self/status").unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    (
        get("voluntary_ctxt_switches:"),
        get("nonvoluntary_ctxt_switches:"),
    )
}

/// One checked call per size (values that are exact in f32).
fn verify(
    c: &Communicator,
    op: &str,
    n: usize,
    r: usize,
    w: usize,
    u: Option<&(BlockLayout, BlockLayout, usize, [usize; 4])>,
) {
    let val = |rank: usize, i: usize| ((rank * 3 + i) % 5) as f32;
    let x: Vec<f32> = (0..n).map(|i| val(r, i)).collect();
    let m = n / w;
    let ok = match op {
        "all_reduce" => {
            let mut t = x;
            c.all_reduce(&mut t, ReduceOp::Sum).unwrap();
            t.iter()
                .enumerate()
                .all(|(i, v)| *v == (0..w).map(|q| val(q, i)).sum::<f32>())
        }
        "broadcast" => {
            let mut t = x;
            c.broadcast(&mut t, 0).unwrap();
            t.iter().enumerate().all(|(i, v)| *v == val(0, i))
        }
        "all_gather" => {
            let mut y = vec![0f32; m * w];
            c.all_gather(&x[..m], &mut y).unwrap();
            y.iter().enumerate().all(|(j, v)| *v == val(j / m, j % m))
        }
        "reduce_scatter" => {
            let mut y = vec![0f32; m];
            c.reduce_scatter(&x, &mut y, ReduceOp::Sum).unwrap();
            y.iter()
                .enumerate()
                .all(|(j, v)| *v == (0..w).map(|q| val(q, r * m + j)).sum::<f32>())
        }
        "all_to_all_4d_inv" => {
            let (send, recv, _, shape) = u.unwrap();
            let mut y = vec![0f32; n];
            let l = Layout {
                op: Collective::AllToAll4d,
                shape,
                arg: 16 + 2,
            };
            c.all_to_all_strided(&x, *send, &mut y, *recv, Some(l))
                .unwrap();
            // Output [1, S/P, H, D]: row s, head h of it = rank h / hp's
            // input row r * sp + s, head h % hp.
            let (hp, d) = (HEADS / w, HEAD_DIM);
            let sp = shape[1] / w;
            y.iter().enumerate().all(|(j, v)| {
                let (row, hh, dd) = (j / (HEADS * d), (j / d) % HEADS, j % d);
                let (q, hl) = (hh / hp, hh % hp);
                *v == val(q, ((r * sp + row) * hp + hl) * d + dd)
            })
        }
        "all_to_all_4d" => {
            let (send, recv, _, shape) = u.unwrap();
            let mut y = vec![0f32; n];
            let l = Layout {
                op: Collective::AllToAll4d,
                shape,
                arg: 2 * 16 + 1,
            };
            c.all_to_all_strided(&x, *send, &mut y, *recv, Some(l))
                .unwrap();
            // Output [1, S, H/P, D]: row s, head h of it = rank s / sp's
            // input row s % sp, head r * hp + h.
            let (sp, hp, d) = (shape[1], HEADS / w, HEAD_DIM);
            y.iter().enumerate().all(|(j, v)| {
                let (row, hh, dd) = (j / (hp * d), (j / d) % hp, j % d);
                let (q, sl) = (row / sp, row % sp);
                *v == val(q, (sl * HEADS + r * hp + hh) * d + dd)
            })
        }
        _ => {
            let mut y = vec![0f32; n];
            c.all_to_all(&x, &mut y).unwrap();
            y.iter()
                .enumerate()
                .all(|(j, v)| *v == val(j / m, r * m + j % m))
        }
    };
    assert!(ok, "{op} of {n} elements wrong on rank {r}");
}

/// MessageQueue: rank 0 writes, ranks 1..=N read.
fn mq_rank(a: &Args, rank: usize, store: Arc<dyn Store>) {
    let n = a.readers;
    let readers: Vec<usize> = (1..=n).collect();
    let ring = a
        .raw
        .iter()
        .position(|x| x == "--ring-kib")
        .and_then(|i| a.raw.get(i + 1))
        .map_or(4 << 20, |v| v.parse::<usize>().unwrap() << 10);
    let o = MqOptions::default()
        .timeout(Duration::from_secs(120))
        .max_message_bytes(a.max.max(8));
    let sizes = sizes(a);
    let dl = Duration::from_secs(120);
    if rank == 0 {
        println!(
            "# comm-shm MessageQueue, 1 writer + {n} reader {} (ring {} KiB)\n# mode bytes time_us",
            if a.threads { "threads" } else { "processes" },
            ring >> 10
        );
        let mut q =
            MessageQueue::create_writer(&*store, "fwd", 0, &readers, ring, o.clone()).unwrap();
        let mut backs: Vec<MessageQueue> = readers
            .iter()
            .map(|r| MessageQueue::open_reader(&*store, &format!("back{r}"), 0, o.clone()).unwrap())
            .collect();
        let msg = vec![7u8; a.max.max(8)];
        let mut buf = Vec::with_capacity(64);
        for &s in &sizes {
            let it = (200_000_000 / s.max(1024)).clamp(20, 20_000);
            let warm = it / 10 + 1;
            // Pipelined: back to back; readers answer once, after the last.
            let mut t0 = Instant::now();
            for i in 0..warm + it {
                if i == warm {
                    t0 = Instant::now();
                }
                q.enqueue(&msg[..s]).unwrap();
            }
            for b in &mut backs {
                b.dequeue_into(&mut buf, dl).unwrap();
            }
            let pipe = t0.elapsed().as_secs_f64() / it as f64;
            // Round trip.
            let rt_it = (it / 4).max(10);
            let mut t0 = Instant::now();
            for i in 0..warm + rt_it {
                if i == warm {
                    t0 = Instant::now();
                }
                q.enqueue(&msg[..s]).unwrap();
                for b in &mut backs {
                    b.dequeue_into(&mut buf, dl).unwrap();
                }
            }
            let rtt = t0.elapsed().as_secs_f64() / rt_it as f64;
            println!("pipelined {s} {:.3}", pipe * 1e6);
            println!("round_trip {s} {:.3} (one-way {:.3})", rtt * 1e6, rtt * 5e5);
        }
    } else {
        let mut q = MessageQueue::open_reader(&*store, "fwd", rank, o.clone()).unwrap();
        let mut back =
            MessageQueue::create_writer(&*store, &format!("back{rank}"), rank, &[0], 1 << 16, o)
                .unwrap();
        let mut buf = Vec::with_capacity(a.max);
        for &s in &sizes {
            let it = (200_000_000 / s.max(1024)).clamp(20, 20_000);
            let warm = it / 10 + 1;
            for _ in 0..warm + it {
                q.dequeue_into(&mut buf, dl).unwrap();
            }
            assert_eq!(buf.len(), s);
            back.enqueue(&buf[..8.min(s)]).unwrap();
            for _ in 0..warm + (it / 4).max(10) {
                q.dequeue_into(&mut buf, dl).unwrap();
                back.enqueue(&buf[..8.min(s)]).unwrap();
            }
        }
    }
}
