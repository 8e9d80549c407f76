//! Quick nccl-tests style table for the TCP backend with ranks as threads,
//! through the checked front as users call it:
//! `cargo run --release -p comm-cpu --example tcp_perf -- <world> <all_reduce|all_to_all> [max_bytes]`.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use comm_core::{GroupContext, ReduceOp, Registry, Store};
use comm_cpu::{TcpFactory, TcpOptions};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let world: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    let op = args.get(2).cloned().unwrap_or_else(|| "all_reduce".into());
    let max: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(64 << 20);
    let store: Arc<dyn Store> = Arc::new(dist_utils::HashStore::new());
    let bar = Arc::new(Barrier::new(world));
    println!("# tcp {op} world {world} (ranks as threads)");
    println!(
        "{:>12} {:>12} {:>6} {:>6} {:>10} {:>8} {:>8}",
        "bytes", "count", "type", "redop", "time_us", "algbw", "busbw"
    );
    let hs: Vec<_> = (0..world)
        .map(|rank| {
            let (store, bar, op) = (store.clone(), bar.clone(), op.clone());
            std::thread::spawn(move || {
                let mut o = TcpOptions::with_timeout(Duration::from_secs(60));
                o.addr = Some("127.0.0.1".parse().unwrap());
                let registry = Registry::new().with(TcpFactory::with_options(o));
                let ctx = GroupContext::new(store, rank, world).timeout(Duration::from_secs(60));
                let c = registry.create("tcp", &ctx).unwrap();
                let mut bytes = 8usize;
                while bytes <= max {
                    let n = (bytes / 4).max(world);
                    let n = if op == "all_to_all" {
                        n / world * world
                    } else {
                        n
                    };
                    let mut a = vec![0.0f32; n];
                    let mut b = vec![0.0f32; n];
                    let iters = ((200 << 20) / bytes).clamp(5, 2000);
                    let mut run = |k: usize| {
                        for _ in 0..k {
                            if op == "all_to_all" {
                                c.all_to_all(&a, &mut b).unwrap();
                            } else {
                                c.all_reduce(&mut a, ReduceOp::Sum).unwrap();
                            }
                        }
                    };
                    run(iters / 5 + 1);
                    bar.wait();
                    let t = Instant::now();
                    run(iters);
                    let us = t.elapsed().as_secs_f64() * 1e6 / iters as f64;
                    bar.wait();
                    if rank == 0 {
                        let nb = n * 4;
                        let alg = nb as f64 / us / 1e3;
                        let f = if op == "all_to_all" {
                            (world - 1) as f64 / world as f64
                        } else {
                            2.0 * (world - 1) as f64 / world as f64
                        };
                        println!(
                            "{nb:>12} {n:>12} {:>6} {:>6} {us:>10.1} {alg:>8.3} {:>8.3}",
                            "f32",
                            if op == "all_to_all" { "none" } else { "sum" },
                            alg * f
                        );
                    }
                    bytes *= 2;
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
}
