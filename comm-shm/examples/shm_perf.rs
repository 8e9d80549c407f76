//! Stand-in for `comm-perf --backend shm` until that tool exists: the same
//! table as `benches/peers/mpi_bench.c` (op, bytes, time_us, algbw, busbw;
//! f32; 8 B .. 64 MiB), plus MessageQueue 1 KiB one-way latency.
//!
//! Ranks are threads of this process, each with its own mapping of the
//! segment (the data path is the same as with processes).
//!
//! ```text
//! cargo run --release -p comm-shm --example shm_perf -- --world 4 [--op all_reduce] [--check]
//! cargo run --release -p comm-shm --example shm_perf -- --mq-readers 3
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use comm_core::{DType, DeviceCommunicator, ReduceOp, Store, Tensor};
use comm_shm::{MessageQueue, MqOptions, ShmCommunicator, ShmOptions};
use dist_utils::HashStore;

const SIZES: [usize; 10] = [
    8,
    64,
    512,
    4096,
    65536,
    262_144,
    1 << 20,
    4 << 20,
    16 << 20,
    64 << 20,
];
const OPS: [&str; 4] = ["all_reduce", "all_gather", "all_to_all", "broadcast"];

fn iters_for(bytes: usize) -> usize {
    if bytes <= 64 {
        return 20_000;
    }
    (400_000_000 / bytes).clamp(5, 20_000)
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(n) = arg(&args, "--mq-readers") {
        mq_latency(n.parse().unwrap());
        return;
    }
    let world: usize = arg(&args, "--world").map_or(2, |v| v.parse().unwrap());
    let only = arg(&args, "--op");
    let check = args.iter().any(|a| a == "--check");
    let mut opts = ShmOptions::default();
    if let Some(v) = arg(&args, "--ws-kib") {
        opts.workspace_bytes = v.parse::<usize>().unwrap() << 10;
    }
    if let Some(v) = arg(&args, "--spin") {
        opts.spin = Some(comm_shm::SpinPolicy {
            spin_iters: v.parse().unwrap(),
            ..Default::default()
        });
    }
    if let Some(v) = arg(&args, "--one-shot-kib") {
        opts.one_shot_max_bytes = v.parse::<usize>().unwrap() << 10;
    }
    let store: Arc<dyn Store> = Arc::new(HashStore::new());
    println!(
        "# comm-shm world {world} (ranks are threads)\n# op bytes time_us algbw_GBps busbw_GBps"
    );
    std::thread::scope(|s| {
        for r in 0..world {
            let store = store.clone();
            let only = only.clone();
            let opts = opts.clone();
            s.spawn(move || {
                let mut c = ShmCommunicator::new(&*store, r, world, opts).unwrap();
                let mut a = Tensor::from_vec1(
                    (0..(64 << 20) / 4)
                        .map(|i| (i % 7) as f32)
                        .collect::<Vec<f32>>(),
                );
                let mut b = Tensor::zeros([(64 << 20) / 4], DType::F32);
                for op in OPS {
                    if only.as_deref().is_some_and(|o| o != op) {
                        continue;
                    }
                    for bytes in SIZES {
                        let mut n = bytes / 4;
                        if op == "all_gather" || op == "all_to_all" {
                            n -= n % world;
                            if n == 0 {
                                continue;
                            }
                        }
                        let mut x =
                            Tensor::from_slice(&a.as_slice::<f32>().unwrap()[..n], [n]).unwrap();
                        let mut y = Tensor::zeros([n], DType::F32);
                        let mut xs = Tensor::from_slice(
                            &a.as_slice::<f32>().unwrap()[..n / world],
                            [n / world],
                        )
                        .unwrap();
                        let it = iters_for(bytes);
                        let warm = it / 10 + 2;
                        let mut t0 = Instant::now();
                        for i in 0..warm + it {
                            if i == warm {
                                c.barrier().unwrap();
                                t0 = Instant::now();
                            }
                            match op {
                                "all_reduce" => c.all_reduce(&mut x, ReduceOp::Sum).unwrap(),
                                "all_gather" => c.all_gather(&xs, &mut y).unwrap(),
                                "all_to_all" => c.all_to_all(&x, &mut y).unwrap(),
                                _ => c.broadcast(&mut x, 0).unwrap(),
                            }
                            if op == "all_reduce" && i % 4 == 0 {
                                x.as_mut_slice::<f32>().unwrap()[0] = 1.0;
                            }
                        }
                        let el = t0.elapsed().as_secs_f64() / it as f64;
                        // slowest rank: all_reduce max of the times
                        let mut tm = Tensor::from_vec1(vec![el]);
                        c.all_reduce(&mut tm, ReduceOp::Max).unwrap();
                        let mx = tm.as_slice::<f64>().unwrap()[0];
                        if r == 0 {
                            let alg = (n * 4) as f64 / mx / 1e9;
                            let w = world as f64;
                            let f = match op {
                                "all_reduce" => 2.0 * (w - 1.0) / w,
                                "broadcast" => 1.0,
                                _ => (w - 1.0) / w,
                            };
                            println!("{op} {} {:.2} {:.3} {:.3}", n * 4, mx * 1e6, alg, alg * f);
                        }
                        if check {
                            // one verified call per size
                            let ok = verify(&mut c, op, n, r, world);
                            assert!(ok, "{op} {bytes} wrong on rank {r}");
                        }
                        drop(xs.as_bytes_mut());
                    }
                }
                let _ = (&mut a, &mut b);
            });
        }
    });
}

fn verify(c: &mut ShmCommunicator, op: &str, n: usize, r: usize, w: usize) -> bool {
    let val = |rank: usize, i: usize| ((rank * 3 + i) % 5) as f32;
    let x = Tensor::from_vec1((0..n).map(|i| val(r, i)).collect::<Vec<f32>>());
    match op {
        "all_reduce" => {
            let mut t = x;
            c.all_reduce(&mut t, ReduceOp::Sum).unwrap();
            t.as_slice::<f32>()
                .unwrap()
                .iter()
                .enumerate()
                .all(|(i, v)| *v == (0..w).map(|q| val(q, i)).sum::<f32>())
        }
        "broadcast" => {
            let mut t = x;
            c.broadcast(&mut t, 0).unwrap();
            t.as_slice::<f32>()
                .unwrap()
                .iter()
                .enumerate()
                .all(|(i, v)| *v == val(0, i))
        }
        "all_gather" => {
            let m = n / w;
            let xs = Tensor::from_vec1((0..m).map(|i| val(r, i)).collect::<Vec<f32>>());
            let mut y = Tensor::zeros([m * w], DType::F32);
            c.all_gather(&xs, &mut y).unwrap();
            y.as_slice::<f32>()
                .unwrap()
                .iter()
                .enumerate()
                .all(|(j, v)| *v == val(j / m, j % m))
        }
        _ => {
            let mut y = Tensor::zeros([n], DType::F32);
            c.all_to_all(&x, &mut y).unwrap();
            let m = n / w;
            // block q of my output = block r of rank q's input
            y.as_slice::<f32>()
                .unwrap()
                .iter()
                .enumerate()
                .all(|(j, v)| *v == val(j / m, r * m + j % m))
        }
    }
}

/// 1 KiB one-way latency = half the round trip: the writer enqueues 1 KiB to
/// N readers; each reader answers on its own return queue; the writer waits
/// for every answer.
fn mq_latency(readers: usize) {
    let store: Arc<dyn Store> = Arc::new(HashStore::new());
    let iters = 20_000;
    let ranks: Vec<usize> = (1..=readers).collect();
    let o = MqOptions {
        timeout: Duration::from_secs(60),
        ..Default::default()
    };
    std::thread::scope(|s| {
        for &r in &ranks {
            let (store, o) = (store.clone(), o.clone());
            s.spawn(move || {
                let mut q = MessageQueue::open_reader(&*store, "fwd", r, o.clone()).unwrap();
                let mut back =
                    MessageQueue::create_writer(&*store, &format!("back{r}"), r, &[0], 1 << 16, o)
                        .unwrap();
                let mut buf = Vec::with_capacity(1024);
                for _ in 0..iters {
                    q.dequeue_into(&mut buf, Duration::from_secs(60)).unwrap();
                    back.enqueue(&buf[..8]).unwrap();
                }
            });
        }
        let mut q =
            MessageQueue::create_writer(&*store, "fwd", 0, &ranks, 1 << 20, o.clone()).unwrap();
        let mut backs: Vec<MessageQueue> = ranks
            .iter()
            .map(|r| MessageQueue::open_reader(&*store, &format!("back{r}"), 0, o.clone()).unwrap())
            .collect();
        let msg = vec![7u8; 1024];
        let mut buf = Vec::with_capacity(64);
        let warm = 1000;
        let mut t0 = Instant::now();
        for i in 0..iters {
            if i == warm {
                t0 = Instant::now();
            }
            q.enqueue(&msg).unwrap();
            for b in &mut backs {
                b.dequeue_into(&mut buf, Duration::from_secs(60)).unwrap();
            }
        }
        let rtt = t0.elapsed().as_secs_f64() / (iters - warm) as f64;
        println!(
            "mq 1KiB readers={readers} one_way_us={:.2} (rtt {:.2} us)",
            rtt * 1e6 / 2.0,
            rtt * 1e6
        );
    });
}
