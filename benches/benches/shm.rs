//! Criterion benches of the shared-memory backend: all_reduce (f32 sum) and
//! all_to_all at 4 KiB, 1 MiB and 16 MiB for world 2 and 4, and the
//! MessageQueue 1 KiB enqueue -> dequeue round trip (one reader).
//!
//! The ranks are threads of the bench process, each with its own
//! `ShmCommunicator` and its own mapping of the shared segment (the data path
//! is the one processes use); criterion needs one process to drive the loop.
//! For nccl-tests style tables over 8 B..64 MiB use `comm-perf --backend shm`.
//! Throughput is the per-rank buffer size (algbw).

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use comm_core::{DType, DeviceCommunicator, ReduceOp, Store, Tensor};
use comm_shm::{MessageQueue, MqOptions, ShmCommunicator, ShmOptions};
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
                let opts = ShmOptions {
                    timeout: Duration::from_secs(60),
                    ..Default::default()
                };
                let mut c = ShmCommunicator::new(&*store, rank, world, opts).unwrap();
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

fn collectives(c: &mut Criterion) {
    for world in [2usize, 4] {
        let g = Group::new(world);
        for (op, name) in [(Op::AllReduce, "all_reduce"), (Op::AllToAll, "all_to_all")] {
            let mut grp = c.benchmark_group(format!("shm_{name}_w{world}"));
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

/// 1 KiB enqueue -> dequeue -> 8-byte answer; criterion reports the round
/// trip (one-way latency is half of it).
fn message_queue(c: &mut Criterion) {
    let store: Arc<dyn Store> = Arc::new(dist_utils::HashStore::new());
    let o = MqOptions {
        timeout: Duration::from_secs(60),
        ..Default::default()
    };
    let (s2, o2) = (store.clone(), o.clone());
    let echo = std::thread::spawn(move || {
        let mut q = MessageQueue::open_reader(&*s2, "fwd", 1, o2.clone()).unwrap();
        let mut back = MessageQueue::create_writer(&*s2, "back", 1, &[0], 1 << 16, o2).unwrap();
        let mut buf = Vec::with_capacity(1024);
        loop {
            if q.dequeue_into(&mut buf, Duration::from_secs(60)).is_err() || buf.is_empty() {
                return;
            }
            back.enqueue(&buf[..8]).unwrap();
        }
    });
    let mut fwd = MessageQueue::create_writer(&*store, "fwd", 0, &[1], 1 << 20, o.clone()).unwrap();
    let mut back = MessageQueue::open_reader(&*store, "back", 0, o).unwrap();
    let msg = vec![7u8; 1024];
    let mut buf = Vec::with_capacity(64);
    let mut grp = c.benchmark_group("shm_mq");
    grp.sample_size(20).measurement_time(Duration::from_secs(2));
    grp.bench_function("1KiB_round_trip_1_reader", |b| {
        b.iter(|| {
            fwd.enqueue(&msg).unwrap();
            back.dequeue_into(&mut buf, Duration::from_secs(60))
                .unwrap();
        })
    });
    grp.finish();
    fwd.enqueue(&[]).unwrap(); // stop the echo thread
    echo.join().unwrap();
}

criterion_group!(benches, collectives, message_queue);
criterion_main!(benches);
