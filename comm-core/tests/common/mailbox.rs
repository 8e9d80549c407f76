//! A tiny in-process backend for testing the checked front: members are
//! threads, messages go through shared mailboxes. Deliberately naive (every
//! collective is built from whole-buffer messages) but exact, with
//! deadlines, call-description checks and lost peers, so the front's
//! behaviour (shortcuts, staging, Avg, poisoning, non-blocking scopes,
//! verification, error context) can be tested without a real transport.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use comm_core::{
    reduce, BufMut, BufRef, Call, CallDesc, Capabilities, CommError, Communicator, Device,
    DeviceCommunicator, FrontOptions, Missing, P2p, ReduceOp, Result,
};

type Key = (usize, usize, u8); // (from, to, channel: 0 collectives, 1 p2p)

#[derive(Default)]
struct Boxes {
    queues: HashMap<Key, VecDeque<Vec<u8>>>,
    dead: Vec<usize>,
    aborted: Option<(usize, String, Vec<Missing>)>,
}

/// The shared mailboxes of one group.
#[derive(Clone, Default)]
pub struct Mailboxes(Arc<(Mutex<Boxes>, Condvar)>);

impl Mailboxes {
    pub fn new() -> Self {
        Self::default()
    }
    /// Marks `rank` dead: waits on it fail with PeerLost.
    pub fn kill(&self, rank: usize) {
        self.0 .0.lock().unwrap().dead.push(rank);
        self.0 .1.notify_all();
    }
}

/// One member.
pub struct Mailbox {
    boxes: Mailboxes,
    rank: usize,
    world: usize,
    checks: bool,
    pub device: Device,
}

impl Mailbox {
    pub fn new(boxes: Mailboxes, rank: usize, world: usize, checks: bool) -> Self {
        Mailbox {
            boxes,
            rank,
            world,
            checks,
            device: Device::Cpu,
        }
    }

    fn put(&self, to: usize, ch: u8, msg: Vec<u8>) {
        let (m, cv) = &*self.boxes.0;
        m.lock()
            .unwrap()
            .queues
            .entry((self.rank, to, ch))
            .or_default()
            .push_back(msg);
        cv.notify_all();
    }

    fn take(&self, call: &Call<'_>, from: usize, ch: u8) -> Result<Vec<u8>> {
        let (m, cv) = &*self.boxes.0;
        let mut g = m.lock().unwrap();
        loop {
            if let Some((by, reason, culprits)) = &g.aborted {
                if *by != self.rank {
                    return Err(CommError::peer_aborted(
                        *by,
                        call.name(),
                        reason.clone(),
                        culprits.clone(),
                    ));
                }
            }
            if let Some(msg) = g
                .queues
                .get_mut(&(from, self.rank, ch))
                .and_then(|q| q.pop_front())
            {
                return Ok(msg);
            }
            if g.dead.contains(&from) {
                return Err(CommError::peer_lost(from, call.name(), "the peer died"));
            }
            let left = call.deadline.remaining();
            if left.is_zero() {
                return Err(call.timeout(vec![Missing::new(from, "no message")]));
            }
            g = cv
                .wait_timeout(g, left.min(Duration::from_millis(20)))
                .unwrap()
                .0;
        }
    }

    /// Sends the description and data to `to`; the receiver checks it.
    fn send_msg(&self, call: &Call<'_>, desc: &CallDesc, to: usize, ch: u8, data: &[u8]) {
        let mut msg = if self.checks {
            desc.to_wire().to_vec()
        } else {
            Vec::new()
        };
        msg.extend_from_slice(data);
        self.put(to, ch, msg);
        let _ = call;
    }

    fn recv_msg(&self, call: &Call<'_>, desc: &CallDesc, from: usize, ch: u8) -> Result<Vec<u8>> {
        let mut msg = self.take(call, from, ch)?;
        if self.checks {
            if msg.len() < 64 {
                return Err(CommError::Protocol("short message".into()));
            }
            let theirs = CallDesc::from_wire(&msg[..64])?;
            desc.check_peer(&theirs, from, &call.name())?;
            msg.drain(..64);
        }
        Ok(msg)
    }

    /// Everyone sends `mine` to everyone; returns all members' bytes in rank order.
    fn exchange_all(&self, call: &Call<'_>, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        for p in (0..self.world).filter(|&p| p != self.rank) {
            self.send_msg(call, &call.desc, p, 0, mine);
        }
        let mut all = Vec::with_capacity(self.world);
        for p in 0..self.world {
            all.push(if p == self.rank {
                mine.to_vec()
            } else {
                self.recv_msg(call, &call.desc, p, 0)?
            });
        }
        Ok(all)
    }
}

fn len_check(got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(CommError::Protocol(format!(
            "got {got} bytes, expected {want}"
        )));
    }
    Ok(())
}

impl DeviceCommunicator for Mailbox {
    fn backend(&self) -> &str {
        "mailbox"
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn device(&self) -> Device {
        self.device
    }
    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::default();
        c.checks_calls = self.checks;
        c
    }
    fn all_reduce(&mut self, call: &Call<'_>, mut buf: BufMut<'_>, op: ReduceOp) -> Result<()> {
        let dt = buf.dtype();
        let b = buf.expect_host("all_reduce")?;
        let all = self.exchange_all(call, b)?;
        // Fixed rank order: identical results everywhere.
        b.copy_from_slice(&all[0]);
        for other in &all[1..] {
            len_check(other.len(), b.len())?;
            reduce::reduce_into(b, other, dt, op)?;
        }
        Ok(())
    }
    fn all_gather(
        &mut self,
        call: &Call<'_>,
        input: BufRef<'_>,
        mut output: BufMut<'_>,
    ) -> Result<()> {
        let all = self.exchange_all(call, input.expect_host("all_gather")?)?;
        let out = output.expect_host("all_gather")?;
        for (chunk, part) in out.chunks_exact_mut(input.nbytes()).zip(&all) {
            len_check(part.len(), chunk.len())?;
            chunk.copy_from_slice(part);
        }
        Ok(())
    }
    fn reduce_scatter(
        &mut self,
        call: &Call<'_>,
        input: BufRef<'_>,
        mut output: BufMut<'_>,
        op: ReduceOp,
    ) -> Result<()> {
        let dt = input.dtype();
        let all = self.exchange_all(call, input.expect_host("reduce_scatter")?)?;
        let n = output.nbytes();
        let out = output.expect_host("reduce_scatter")?;
        let me = self.rank;
        out.copy_from_slice(&all[0][me * n..(me + 1) * n]);
        for other in &all[1..] {
            reduce::reduce_into(out, &other[me * n..(me + 1) * n], dt, op)?;
        }
        Ok(())
    }
    fn broadcast(&mut self, call: &Call<'_>, mut buf: BufMut<'_>, root: usize) -> Result<()> {
        let b = buf.expect_host("broadcast")?;
        if self.rank == root {
            for p in (0..self.world).filter(|&p| p != root) {
                self.send_msg(call, &call.desc, p, 0, b);
            }
            // Receivers acknowledge with their description, so a root also
            // learns of a member that disagrees (another root, say).
            for p in (0..self.world).filter(|&p| p != root) {
                self.recv_msg(call, &call.desc, p, 0)?;
            }
        } else {
            let m = self.recv_msg(call, &call.desc, root, 0)?;
            len_check(m.len(), b.len())?;
            b.copy_from_slice(&m);
            self.send_msg(call, &call.desc, root, 0, &[]);
        }
        Ok(())
    }
    fn gather(
        &mut self,
        call: &Call<'_>,
        input: BufRef<'_>,
        output: Option<BufMut<'_>>,
        root: usize,
    ) -> Result<()> {
        let i = input.expect_host("gather")?;
        match output {
            Some(mut o) => {
                let n = i.len();
                let out = o.expect_host("gather")?;
                for p in 0..self.world {
                    let part = if p == root {
                        i.to_vec()
                    } else {
                        self.recv_msg(call, &call.desc, p, 0)?
                    };
                    len_check(part.len(), n)?;
                    out[p * n..(p + 1) * n].copy_from_slice(&part);
                }
            }
            None => self.send_msg(call, &call.desc, root, 0, i),
        }
        Ok(())
    }
    fn all_to_all(
        &mut self,
        call: &Call<'_>,
        input: BufRef<'_>,
        mut output: BufMut<'_>,
    ) -> Result<()> {
        let i = input.expect_host("all_to_all")?;
        let n = i.len() / self.world;
        for p in (0..self.world).filter(|&p| p != self.rank) {
            self.send_msg(call, &call.desc, p, 0, &i[p * n..(p + 1) * n]);
        }
        let out = output.expect_host("all_to_all")?;
        let me = self.rank;
        out[me * n..(me + 1) * n].copy_from_slice(&i[me * n..(me + 1) * n]);
        for p in (0..self.world).filter(|&p| p != me) {
            let part = self.recv_msg(call, &call.desc, p, 0)?;
            len_check(part.len(), n)?;
            out[p * n..(p + 1) * n].copy_from_slice(&part);
        }
        Ok(())
    }
    fn send_recv(&mut self, call: &Call<'_>, ops: &mut [P2p<'_>]) -> Result<()> {
        // Mailboxes never block a sender: post every send, then receive.
        for op in ops.iter() {
            if let P2p::Send { peer, buf, desc } = op {
                self.send_msg(call, desc, *peer, 1, buf.expect_host("send")?);
            }
        }
        for op in ops.iter_mut() {
            if let P2p::Recv { peer, buf, desc } = op {
                let m = self.recv_msg(call, desc, *peer, 1)?;
                let b = buf.expect_host("recv")?;
                len_check(m.len(), b.len())?;
                b.copy_from_slice(&m);
            }
        }
        Ok(())
    }
    fn barrier(&mut self, call: &Call<'_>) -> Result<()> {
        self.exchange_all(call, &[]).map(|_| ())
    }
    fn abort(&mut self, why: &CommError) {
        let (m, cv) = &*self.boxes.0;
        let mut g = m.lock().unwrap();
        if g.aborted.is_none() {
            let culprits = why
                .culprits()
                .into_iter()
                .map(|r| Missing {
                    rank: comm_core::RankId::local(r.group),
                    detail: String::new(),
                })
                .collect();
            g.aborted = Some((self.rank, why.to_string(), culprits));
        }
        cv.notify_all();
    }
}

/// Runs `f(rank, communicator)` on `world` threads over one mailbox group
/// and returns each rank's result in rank order.
pub fn run<R: Send + 'static>(
    world: usize,
    checks: bool,
    timeout: Duration,
    f: impl Fn(usize, Communicator) -> R + Send + Sync + 'static,
) -> Vec<R> {
    let boxes = Mailboxes::new();
    let f = Arc::new(f);
    let handles: Vec<_> = (0..world)
        .map(|r| {
            let boxes = boxes.clone();
            let f = f.clone();
            std::thread::spawn(move || {
                let backend = Mailbox::new(boxes, r, world, checks);
                let opts = FrontOptions::new("mbox:0")
                    .global_ranks((0..world).map(|g| g + 10).collect())
                    .timeout(timeout);
                f(r, Communicator::new(Box::new(backend), opts))
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("rank thread panicked"))
        .collect()
}
