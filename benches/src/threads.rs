//! Ranks as threads of one process, for the criterion benches: criterion
//! drives one measurement loop, so every rank runs in a thread with its own
//! communicator (real sockets or a real shared segment), waiting for
//! commands. Production runs one process per rank; `comm-perf` measures that.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use comm_core::{
    BackendFactory, CommError, DType, GroupContext, ReduceOp, Registry, Result, Store, Tensor,
};

/// The operations the benches time.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    /// f32 sum all-reduce in place.
    AllReduce,
    /// Equal-split all-to-all of f32.
    AllToAll,
}

#[derive(Debug)]
struct Cmd {
    op: Op,
    bytes: usize,
    iters: u64,
}

/// `world` ranks as threads sharing an in-process store.
#[derive(Debug)]
pub struct ThreadGroup {
    cmds: Vec<Sender<Option<Cmd>>>,
    done: Receiver<Result<Duration>>,
    threads: Vec<JoinHandle<()>>,
}

/// Deadline of set-up and of each operation of the bench communicators.
const TIMEOUT: Duration = Duration::from_secs(60);

impl ThreadGroup {
    /// Starts `world` ranks, each building its communicator with `factory`
    /// through a registry and the checked front, as the group layer does.
    pub fn new(world: usize, factory: Arc<dyn BackendFactory>) -> Self {
        let store: Arc<dyn Store> = Arc::new(dist_utils::HashStore::new());
        let (done_tx, done) = channel();
        let mut cmds = Vec::new();
        let mut threads = Vec::new();
        for rank in 0..world {
            let (tx, rx) = channel::<Option<Cmd>>();
            cmds.push(tx);
            let (store, done_tx, factory) = (store.clone(), done_tx.clone(), factory.clone());
            threads.push(std::thread::spawn(move || {
                let mut registry = Registry::new();
                registry.register_arc(factory.clone());
                let ctx = GroupContext::new(store, rank, world)
                    .timeout(TIMEOUT)
                    .group_name("bench");
                let comm = match registry.create(factory.name(), &ctx) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = done_tx.send(Err(e));
                        return;
                    }
                };
                let mut bufs: Option<(usize, Tensor, Tensor)> = None;
                while let Ok(Some(cmd)) = rx.recv() {
                    let n = cmd.bytes / 4;
                    let (_, a, b) = match &mut bufs {
                        Some(b) if b.0 == n => b,
                        slot => slot.insert((
                            n,
                            Tensor::zeros([n], DType::F32),
                            Tensor::zeros([n], DType::F32),
                        )),
                    };
                    let r = (|| {
                        comm.barrier()?;
                        let t = Instant::now();
                        for _ in 0..cmd.iters {
                            match cmd.op {
                                Op::AllReduce => comm.all_reduce(a, ReduceOp::Sum)?,
                                Op::AllToAll => comm.all_to_all(a, b)?,
                            }
                        }
                        Ok(t.elapsed())
                    })();
                    let _ = done_tx.send(r);
                }
            }));
        }
        ThreadGroup {
            cmds,
            done,
            threads,
        }
    }

    /// Runs `iters` operations of `bytes` per rank on every rank and returns
    /// the slowest rank's time.
    pub fn run(&self, op: Op, bytes: usize, iters: u64) -> Result<Duration> {
        for c in &self.cmds {
            c.send(Some(Cmd { op, bytes, iters }))
                .map_err(|_| CommError::Aborted("a bench rank thread has exited".into()))?;
        }
        let mut slowest = Duration::ZERO;
        for _ in 0..self.cmds.len() {
            let t = self
                .done
                .recv_timeout(Duration::from_secs(600))
                .map_err(|_| {
                    CommError::timeout(
                        "bench iteration",
                        Duration::from_secs(600),
                        ["a rank thread"],
                    )
                })??;
            slowest = slowest.max(t);
        }
        Ok(slowest)
    }
}

impl Drop for ThreadGroup {
    fn drop(&mut self) {
        for c in &self.cmds {
            let _ = c.send(None);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
