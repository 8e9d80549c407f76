//! Criterion benches of the TCP backend: all_reduce (f32 sum) and all_to_all
//! at 4 KiB, 1 MiB and 16 MiB, for world 2 and 4.
//!
//! The ranks are threads of the bench process (each with its own
//! `TcpCommunicator` and real loopback TCP connections), which criterion
//! needs to drive one measurement loop; production runs one process per rank.
//! For nccl-tests style tables over 8 B..64 MiB use the `comm-perf` binary.
//! Throughput is the per-rank buffer size (algbw); busbw = algbw * 2(n-1)/n
//! for all_reduce and algbw * (n-1)/n for all_to_all.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use comm_core::{DType, DeviceCommunicator, ReduceOp, Store, Tensor};
use comm_cpu::{TcpCommunicator, TcpOptions};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

#[derive(Clone, Copy)]
enum Op {
    AllReduce,
    AllToAll,
}

struct Cmd {
    op: Op,
    bytes: usize,
    iters: u64,
}

/// `world` ranks as threads, each waiting for commands.
struct Group {
    cmds: Vec<Sender<Option<Cmd>>>,
    done: Receiver<Duration>,
    threads: Vec<JoinHandle<()>>,
}

impl Group {
    fn new(world: usize) -> Group {
        let store: Arc<dyn Store> = Arc::new(dist_utils::HashStore::new());
        let (done_tx, done) = channel();
        let mut cmds = Vec::new();
        let mut threads = Vec::new();
        for rank in 0..world {
            let (tx, rx) = channel::<Option<Cmd>>();
            cmds.push(tx);
            let (store, done_tx) = (store.clone(), done_tx.clone());
            threads.push(std::thread::spawn(move || {
                let mut opts = TcpOptions::with_timeout(Duration::from_secs(60));
                opts.addr = Some("127.0.0.1".parse().unwrap());
                let mut c = TcpCommunicator::new(store, rank, world, opts).unwrap();
                let mut bufs: Option<(usize, Tensor, Tensor)> = None;
                while let Ok(Some(cmd)) = rx.recv() {
                    let n = cmd.bytes / 4;
                    if bufs.as_ref().map(|b| b.0) != Some(n) {
                        bufs = Some((
                            n,
                            Tensor::zeros([n], DType::F32),
                            Tensor::zeros([n], DType::F32),
                        ));
                    }
                    let (_, a, b) = bufs.as_mut().unwrap();
                    c.barrier().unwrap();
                    let t = Instant::now();
                    for _ in 0..cmd.iters {
                        match cmd.op {
                            Op::AllReduce => c.all_reduce(a, ReduceOp::Sum).unwrap(),
                            Op::AllToAll => c.all_to_all(a, b).unwrap(),
                        }
                    }
                    done_tx.send(t.elapsed()).unwrap();
                }
            }));
        }
        Group {
            cmds,
            done,
            threads,
        }
    }

    /// Runs `iters` operations on every rank; the slowest rank's time.
    fn run(&self, op: Op, bytes: usize, iters: u64) -> Duration {
        for c in &self.cmds {
            c.send(Some(Cmd { op, bytes, iters })).unwrap();
        }
        (0..self.cmds.len())
            .map(|_| self.done.recv().unwrap())
            .max()
            .unwrap()
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        for c in &self.cmds {
            let _ = c.send(None);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn bench(c: &mut Criterion) {
    for world in [2usize, 4] {
        let g = Group::new(world);
        for (op, name) in [(Op::AllReduce, "all_reduce"), (Op::AllToAll, "all_to_all")] {
            let mut grp = c.benchmark_group(format!("tcp_{name}_w{world}"));
            grp.sample_size(10)
                .warm_up_time(Duration::from_millis(500))
                .measurement_time(Duration::from_secs(2));
            for bytes in [4usize << 10, 1 << 20, 16 << 20] {
                grp.throughput(Throughput::Bytes(bytes as u64));
                grp.bench_with_input(BenchmarkId::from_parameter(bytes), &bytes, |b, &bytes| {
                    b.iter_custom(|iters| g.run(op, bytes, iters))
                });
            }
            grp.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
