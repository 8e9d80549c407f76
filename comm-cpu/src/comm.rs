//! [`TcpCommunicator`]: the collectives, built on [`Mesh::exchange`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use comm_core::reduce::{finish_avg, reduce_into, reduce_pair_into};
use comm_core::{
    check, CommError, DType, Deadline, Device, DeviceCommunicator, HostBuffer, ReduceOp, Result,
    Store, Tensor,
};

use crate::mesh::{Kind, Mesh, RecvOp, SendOp};
use crate::setup::connect_mesh;
use crate::TcpOptions;

/// A [`DeviceCommunicator`] for host tensors over TCP, for ranks on one or
/// many hosts.
///
/// Device tensors are refused with an error; wrap the communicator in
/// [`comm_core::HostStaged`] to move them through host memory.
///
/// Algorithms (any world size):
/// - all_reduce: recursive doubling (with the usual fold of the extra ranks
///   for non powers of two) up to [`TcpOptions::small_all_reduce`] bytes, else
///   a ring reduce-scatter + ring all-gather whose received data is reduced in
///   [`TcpOptions::segment`] pieces while the rest arrives. Every member ends
///   with bit-identical bytes: each pairwise combination is computed in a fixed
///   (lower rank first) order, and in the ring each block is reduced by one
///   owner whose bytes are then distributed.
/// - all_gather and reduce_scatter: rings.
/// - broadcast: binomial tree up to [`TcpOptions::small_broadcast`] bytes, else
///   a chain that forwards each piece as soon as it arrives.
/// - gather: every member sends straight to the root.
/// - all_to_all: every pair exchanges at once (pairwise exchange, all steps
///   progressed together by the poll loop).
/// - barrier: dissemination (log2 rounds of empty messages).
#[derive(Debug)]
pub struct TcpCommunicator {
    mesh: Mesh,
    opts: TcpOptions,
    local_addr: SocketAddr,
    /// Receive buffer of reductions, reused across calls.
    scratch: HostBuffer,
    /// Accumulators of reduce_scatter, reused across calls.
    acc: [HostBuffer; 2],
    /// Set by the first fatal error; later calls fail at once.
    broken: Option<String>,
}

/// Grows `b` to at least `len` bytes (contents are not kept).
fn ensure(b: &mut HostBuffer, len: usize) {
    if b.len() < len {
        *b = HostBuffer::zeroed(len.next_power_of_two());
    }
}

/// Elements `[start, start+count)` of block `b` when `n` elements are split
/// into `w` nearly equal blocks (the first `n % w` get one more).
fn block(n: usize, w: usize, b: usize) -> (usize, usize) {
    let base = n / w;
    let extra = n % w;
    (b * base + b.min(extra), base + usize::from(b < extra))
}

fn prev_pow2(w: usize) -> usize {
    1 << (usize::BITS - 1 - w.leading_zeros())
}

/// `mine = lower op higher`, where `theirs` came from `peer`: the same bytes
/// on both members of the pair whatever the op's edge cases.
fn combine_ordered(
    mine: &mut [u8],
    theirs: &mut [u8],
    i_am_lower: bool,
    dt: DType,
    op: ReduceOp,
) -> Result<()> {
    if i_am_lower {
        reduce_into(mine, theirs, dt, op)
    } else {
        reduce_into(theirs, mine, dt, op)?;
        mine.copy_from_slice(theirs);
        Ok(())
    }
}

impl TcpCommunicator {
    /// Joins group `opts.group_name` as `rank` of `world_size`: binds a
    /// listener, publishes its address and (rank 0) a random group secret in
    /// `store`, and connects to every other member, all within
    /// `opts.connect_timeout`.
    pub fn new(
        store: Arc<dyn Store>,
        rank: usize,
        world_size: usize,
        opts: TcpOptions,
    ) -> Result<Self> {
        if world_size == 0 || rank >= world_size {
            return Err(CommError::invalid(format!(
                "TcpCommunicator: rank {rank} is out of range for a group of {world_size}"
            )));
        }
        if opts.segment == 0 {
            return Err(CommError::invalid("TcpOptions::segment must be positive"));
        }
        let c = connect_mesh(&store, rank, world_size, &opts)?;
        Ok(TcpCommunicator {
            mesh: Mesh::new(rank, world_size, c.peers, opts.busy_poll),
            local_addr: c.local_addr,
            opts,
            scratch: HostBuffer::zeroed(0),
            acc: [HostBuffer::zeroed(0), HostBuffer::zeroed(0)],
            broken: None,
        })
    }

    /// The address this member listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The options in force.
    pub fn options(&self) -> &TcpOptions {
        &self.opts
    }

    fn name(&self, what: &str) -> String {
        format!(
            "{what} on tcp group `{}` (rank {} of {})",
            self.opts.group_name, self.mesh.rank, self.mesh.world
        )
    }

    fn usable(&self, what: &str) -> Result<()> {
        match &self.broken {
            None => Ok(()),
            Some(e) => Err(CommError::Aborted(format!(
                "{}: this communicator is unusable after an earlier error ({e}); drop it and \
                 build a new group",
                self.name(what)
            ))),
        }
    }

    /// Records a fatal error and tells the peers, so they fail fast too.
    fn fail(&mut self, e: CommError) -> CommError {
        if e.is_fatal() && self.broken.is_none() {
            let lost = match &e {
                CommError::PeerLost { rank, .. } => Some(*rank),
                _ => None,
            };
            self.mesh.send_abort(lost);
            self.broken = Some(e.to_string());
        }
        e
    }

    fn host(&self, what: &str, t: &Tensor) -> Result<()> {
        check::device(what, t, Device::Cpu)
    }

    /// Sends `send` to `dst` while receiving `recv` from `src`, both at once
    /// (so two members exchanging large buffers cannot deadlock). Uses the
    /// point-to-point channel: it pairs with [`DeviceCommunicator::send`] /
    /// [`DeviceCommunicator::recv`] on the peers.
    pub fn send_recv(
        &mut self,
        send: &Tensor,
        dst: usize,
        recv: &mut Tensor,
        src: usize,
    ) -> Result<()> {
        let (r, w) = (self.mesh.rank, self.mesh.world);
        check::peer("send", dst, r, w)?;
        check::peer("recv", src, r, w)?;
        self.host("send_recv", send)?;
        self.host("send_recv", recv)?;
        self.usable("send_recv")?;
        let sb = send.as_bytes()?;
        let rb = recv.as_bytes_mut()?;
        self.p2p(
            "send_recv",
            &mut [SendOp::new(dst, sb)],
            &mut [RecvOp::new(src, rb)],
        )
    }

    /// One point-to-point exchange on the p2p channel, with the op deadline.
    fn p2p(&mut self, what: &str, sends: &mut [SendOp], recvs: &mut [RecvOp]) -> Result<()> {
        let deadline = Deadline::after(self.opts.timeout);
        let name = self.name(what);
        let res = self.mesh.exchange(
            Kind::P2p,
            &|| name.clone(),
            sends,
            recvs,
            &deadline,
            usize::MAX,
            |_, _, _| Ok(()),
        );
        res.map_err(|e| self.fail(e))
    }

    fn all_reduce_small(
        &mut self,
        buf: &mut [u8],
        dt: DType,
        op: ReduceOp,
        deadline: &Deadline,
    ) -> Result<()> {
        let (r, w) = (self.mesh.rank, self.mesh.world);
        let n = buf.len();
        ensure(&mut self.scratch, n);
        let scratch = &mut self.scratch.as_bytes_mut()[..n];
        let name = format!(
            "all_reduce on tcp group `{}` (rank {r} of {w})",
            self.opts.group_name
        );
        let name = &|| name.clone();
        let p = prev_pow2(w);
        let rem = w - p;
        let k = Kind::AllReduce;
        let nop = |_: usize, _: usize, _: &[u8]| Ok(());
        // Fold: in the first 2*rem ranks, even ranks hand their data to the next odd one.
        let newrank = if r < 2 * rem {
            if r % 2 == 0 {
                self.mesh.exchange(
                    k,
                    name,
                    &mut [SendOp::new(r + 1, buf)],
                    &mut [],
                    deadline,
                    usize::MAX,
                    nop,
                )?;
                None
            } else {
                self.mesh.exchange(
                    k,
                    name,
                    &mut [],
                    &mut [RecvOp::new(r - 1, scratch)],
                    deadline,
                    usize::MAX,
                    nop,
                )?;
                combine_ordered(buf, scratch, false, dt, op)?;
                Some(r / 2)
            }
        } else {
            Some(r - rem)
        };
        if let Some(nr) = newrank {
            let mut mask = 1;
            while mask < p {
                let pn = nr ^ mask;
                let partner = if pn < rem { pn * 2 + 1 } else { pn + rem };
                self.mesh.exchange(
                    k,
                    name,
                    &mut [SendOp::new(partner, buf)],
                    &mut [RecvOp::new(partner, scratch)],
                    deadline,
                    usize::MAX,
                    nop,
                )?;
                combine_ordered(buf, scratch, r < partner, dt, op)?;
                mask <<= 1;
            }
        }
        // Unfold: odd ranks return the result to their even neighbour.
        if r < 2 * rem {
            if r % 2 == 0 {
                self.mesh.exchange(
                    k,
                    name,
                    &mut [],
                    &mut [RecvOp::new(r + 1, buf)],
                    deadline,
                    usize::MAX,
                    nop,
                )?;
            } else {
                self.mesh.exchange(
                    k,
                    name,
                    &mut [SendOp::new(r - 1, buf)],
                    &mut [],
                    deadline,
                    usize::MAX,
                    nop,
                )?;
            }
        }
        if op == ReduceOp::Avg {
            finish_avg(buf, dt, w)?;
        }
        Ok(())
    }

    /// Ring all-reduce of `buf` in place, as one pipelined exchange: the
    /// reduce-scatter steps (each block's partial travels right, reduced
    /// into the receiver's own data in [`TcpOptions::segment`] pieces as it
    /// streams in) followed by the all-gather steps. Every send after the
    /// first is gated on the receive it forwards, so a segment leaves as soon
    /// as it has been reduced (or has arrived), across step boundaries and
    /// from the reduce-scatter straight into the all-gather: no step waits
    /// for the slowest member to finish the previous one.
    ///
    /// After step `s` of the reduce-scatter, block `r - s - 1` holds the
    /// partial of `s + 2` members; the last one, block `r + 1`, is complete
    /// (and averaged here for Avg) and starts the all-gather.
    fn all_reduce_ring(
        &mut self,
        buf: &mut [u8],
        dt: DType,
        op: ReduceOp,
        deadline: &Deadline,
    ) -> Result<()> {
        let (r, w) = (self.mesh.rank, self.mesh.world);
        let name = self.name("all_reduce");
        let name = &|| name.clone();
        let es = dt.size();
        let n = buf.len() / es;
        let right = (r + 1) % w;
        let left = (r + w - 1) % w;
        let seg = (self.opts.segment / es).max(1) * es;
        ensure(&mut self.scratch, seg);
        let base = buf.as_mut_ptr();
        let sp = self.scratch.as_bytes_mut().as_mut_ptr();
        let at = |b: usize| {
            let (o, c) = block(n, w, b);
            (base.wrapping_add(o * es), c * es)
        };
        let steps = w - 1;
        let mut sends: Vec<SendOp> = Vec::with_capacity(2 * steps);
        let mut recvs: Vec<RecvOp> = Vec::with_capacity(2 * steps);
        // Send k forwards what receive k - 1 produced (the same block).
        let send = |sends: &mut Vec<SendOp>, b: usize| {
            let (p, len) = at(b);
            let op = SendOp::raw(right, p, len);
            let k = sends.len();
            sends.push(if k == 0 { op } else { op.gated(k - 1) });
        };
        // Reduce-scatter step s: send block r - s, reduce block r - s - 1.
        for s in 0..steps {
            send(&mut sends, (r + w - s) % w);
            let (_, len) = at((r + 2 * w - s - 1) % w);
            recvs.push(RecvOp::streaming(left, sp, seg, len, es));
        }
        // All-gather step s: send block r + 1 - s, receive block r - s.
        for s in 0..steps {
            send(&mut sends, (r + 1 + w - s) % w);
            let (p, len) = at((r + w - s) % w);
            recvs.push(RecvOp::raw(left, p, len));
        }
        // Aliasing: the reduce-scatter receive of step s writes block
        // r - s - 1 only through the callback, and that block is read only by
        // send s + 1, gated on it. The all-gather receive of step s overwrites
        // block r - s, which send s (this member's partial of that block) read
        // earlier: the complete block cannot arrive before every member's
        // partial of it was sent, and sent bytes are never read again.
        self.mesh.exchange(
            Kind::AllReduce,
            name,
            &mut sends,
            &mut recvs,
            deadline,
            seg,
            |i, off, bytes| {
                if i >= steps {
                    return Ok(());
                }
                let (p, len) = at((r + 2 * w - i - 1) % w);
                debug_assert!(off + bytes.len() <= len);
                // SAFETY: `off + bytes.len() <= len`, inside block r - i - 1,
                // which nothing else touches while this piece is reduced (above).
                let dst = unsafe { std::slice::from_raw_parts_mut(p.add(off), bytes.len()) };
                reduce_into(dst, bytes, dt, op)?;
                if i == steps - 1 && op == ReduceOp::Avg {
                    finish_avg(dst, dt, w)?;
                }
                Ok(())
            },
        )
    }

    /// Ring all-gather over `buf` in place, where this member holds block
    /// `(rank + shift) % world` and the others arrive; one pipelined exchange
    /// whose sends forward each segment as soon as it has arrived.
    fn ring_all_gather_inplace(
        &mut self,
        kind: Kind,
        name: &dyn Fn() -> String,
        buf: &mut [u8],
        es: usize,
        shift: usize,
        deadline: &Deadline,
    ) -> Result<()> {
        let (r, w) = (self.mesh.rank, self.mesh.world);
        let n = buf.len() / es;
        let right = (r + 1) % w;
        let left = (r + w - 1) % w;
        let base = buf.as_mut_ptr();
        let seg = self.opts.segment.max(1);
        let mut sends: Vec<SendOp> = Vec::with_capacity(w - 1);
        let mut recvs: Vec<RecvOp> = Vec::with_capacity(w - 1);
        for s in 0..w - 1 {
            let sb = (r + shift + w - s) % w;
            let rb = (r + shift + 2 * w - s - 1) % w;
            let (s0, sc) = block(n, w, sb);
            let (r0, rc) = block(n, w, rb);
            // All blocks are disjoint ranges of `buf`; block `rb` is written by
            // receive s and read by send s + 1, gated on that receive.
            let send = SendOp::raw(right, base.wrapping_add(s0 * es), sc * es);
            sends.push(if s == 0 { send } else { send.gated(s - 1) });
            recvs.push(RecvOp::raw(left, base.wrapping_add(r0 * es), rc * es));
        }
        self.mesh.exchange(
            kind,
            name,
            &mut sends,
            &mut recvs,
            deadline,
            seg,
            |_, _, _| Ok(()),
        )
    }

    fn reduce_scatter_ring(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        dt: DType,
        op: ReduceOp,
        deadline: &Deadline,
    ) -> Result<()> {
        let (r, w) = (self.mesh.rank, self.mesh.world);
        let m = output.len();
        let right = (r + 1) % w;
        let left = (r + w - 1) % w;
        let es = dt.size();
        let seg = (self.opts.segment / es).max(1) * es;
        ensure(&mut self.scratch, seg);
        ensure(&mut self.acc[0], m);
        ensure(&mut self.acc[1], m);
        let name = self.name("reduce_scatter");
        let name = &|| name.clone();
        let sp = self.scratch.as_bytes_mut().as_mut_ptr();
        let accp = [
            self.acc[0].as_bytes_mut().as_mut_ptr(),
            self.acc[1].as_bytes_mut().as_mut_ptr(),
        ];
        let outp = output.as_mut_ptr();
        // Step s sends the partial of block (r - s - 1) and builds that of
        // block (r - s - 2) = own input op incoming; the last step's is block r.
        for s in 0..w - 1 {
            let sb = (r + 2 * w - s - 1) % w;
            let rb = (r + 2 * w - s - 2) % w;
            let send_ptr: *const u8 = if s == 0 {
                input[sb * m..].as_ptr()
            } else {
                accp[(s - 1) % 2]
            };
            let dst0: *mut u8 = if s == w - 2 { outp } else { accp[s % 2] };
            let own = &input[rb * m..(rb + 1) * m];
            let mut sends = [SendOp::raw(right, send_ptr, m)];
            let mut recvs = [RecvOp::streaming(left, sp, seg, m, es)];
            self.mesh.exchange(
                Kind::ReduceScatter,
                name,
                &mut sends,
                &mut recvs,
                deadline,
                seg,
                |_, off, bytes| {
                    // SAFETY: `dst0` is `output` or the accumulator not being sent in
                    // this step, `m` bytes long; `off + bytes.len() <= m`.
                    let dst = unsafe { std::slice::from_raw_parts_mut(dst0.add(off), bytes.len()) };
                    reduce_pair_into(dst, &own[off..off + bytes.len()], bytes, dt, op)
                },
            )?;
        }
        if op == ReduceOp::Avg {
            finish_avg(output, dt, w)?;
        }
        Ok(())
    }

    fn broadcast_tree(&mut self, buf: &mut [u8], root: usize, deadline: &Deadline) -> Result<()> {
        let (r, w) = (self.mesh.rank, self.mesh.world);
        let vr = (r + w - root) % w;
        let name = self.name("broadcast");
        let name = &|| name.clone();
        let nop = |_: usize, _: usize, _: &[u8]| Ok(());
        let mut mask = 1;
        while mask < w {
            if vr & mask != 0 {
                let parent = (vr - mask + root) % w;
                self.mesh.exchange(
                    Kind::Broadcast,
                    name,
                    &mut [],
                    &mut [RecvOp::new(parent, buf)],
                    deadline,
                    usize::MAX,
                    nop,
                )?;
                break;
            }
            mask <<= 1;
        }
        let mut sends: Vec<SendOp> = Vec::new();
        mask >>= 1;
        while mask > 0 {
            if vr + mask < w {
                sends.push(SendOp::new((vr + mask + root) % w, buf));
            }
            mask >>= 1;
        }
        if !sends.is_empty() {
            self.mesh.exchange(
                Kind::Broadcast,
                name,
                &mut sends,
                &mut [],
                deadline,
                usize::MAX,
                nop,
            )?;
        }
        Ok(())
    }

    fn broadcast_chain(&mut self, buf: &mut [u8], root: usize, deadline: &Deadline) -> Result<()> {
        let (r, w) = (self.mesh.rank, self.mesh.world);
        let vr = (r + w - root) % w;
        let next = (r + 1) % w;
        let prev = (r + w - 1) % w;
        let name = self.name("broadcast");
        let name = &|| name.clone();
        let seg = self.opts.segment;
        let nop = |_: usize, _: usize, _: &[u8]| Ok(());
        let p = buf.as_mut_ptr();
        let len = buf.len();
        if vr == 0 {
            self.mesh.exchange(
                Kind::Broadcast,
                name,
                &mut [SendOp::raw(next, p, len)],
                &mut [],
                deadline,
                seg,
                nop,
            )
        } else if vr == w - 1 {
            self.mesh.exchange(
                Kind::Broadcast,
                name,
                &mut [],
                &mut [RecvOp::raw(prev, p, len)],
                deadline,
                seg,
                nop,
            )
        } else {
            // Forward each piece as soon as it has arrived: the send reads only
            // bytes the receive has completed (gate).
            self.mesh.exchange(
                Kind::Broadcast,
                name,
                &mut [SendOp::raw(next, p, len).gated(0)],
                &mut [RecvOp::raw(prev, p, len)],
                deadline,
                seg,
                nop,
            )
        }
    }
}

impl DeviceCommunicator for TcpCommunicator {
    fn backend(&self) -> &'static str {
        "tcp"
    }
    fn rank(&self) -> usize {
        self.mesh.rank
    }
    fn world_size(&self) -> usize {
        self.mesh.world
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn timeout(&self) -> Duration {
        self.opts.timeout
    }
    fn set_timeout(&mut self, timeout: Duration) {
        self.opts.timeout = timeout;
    }

    fn all_reduce(&mut self, tensor: &mut Tensor, op: ReduceOp) -> Result<()> {
        self.host("all_reduce", tensor)?;
        self.usable("all_reduce")?;
        let w = self.mesh.world;
        let dt = tensor.dtype();
        let buf = tensor.as_bytes_mut()?;
        if w == 1 {
            if op == ReduceOp::Avg {
                finish_avg(buf, dt, 1)?;
            }
            return Ok(());
        }
        if buf.is_empty() {
            return Ok(());
        }
        let deadline = Deadline::after(self.opts.timeout);
        let res = if buf.len() <= self.opts.small_all_reduce || buf.len() / dt.size() < w {
            self.all_reduce_small(buf, dt, op, &deadline)
        } else {
            self.all_reduce_ring(buf, dt, op, &deadline)
        };
        res.map_err(|e| self.fail(e))
    }

    fn all_gather(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()> {
        let w = self.mesh.world;
        check::gathered("all_gather", input, output, w)?;
        self.host("all_gather", input)?;
        self.host("all_gather", output)?;
        self.usable("all_gather")?;
        let n = input.nbytes();
        let r = self.mesh.rank;
        let out = output.as_bytes_mut()?;
        out[r * n..(r + 1) * n].copy_from_slice(input.as_bytes()?);
        if w == 1 || n == 0 {
            return Ok(());
        }
        let deadline = Deadline::after(self.opts.timeout);
        let name = self.name("all_gather");
        // Blocks of `n` bytes: treat the output as `w * n` one-byte elements
        // split evenly, which `block` does exactly.
        let res =
            self.ring_all_gather_inplace(Kind::AllGather, &|| name.clone(), out, 1, 0, &deadline);
        res.map_err(|e| self.fail(e))
    }

    fn reduce_scatter(&mut self, input: &Tensor, output: &mut Tensor, op: ReduceOp) -> Result<()> {
        let w = self.mesh.world;
        check::scattered("reduce_scatter", input, output, w)?;
        self.host("reduce_scatter", input)?;
        self.host("reduce_scatter", output)?;
        self.usable("reduce_scatter")?;
        let dt = input.dtype();
        if w == 1 {
            output.copy_from(input)?;
            if op == ReduceOp::Avg {
                finish_avg(output.as_bytes_mut()?, dt, 1)?;
            }
            return Ok(());
        }
        if output.numel() == 0 {
            return Ok(());
        }
        let deadline = Deadline::after(self.opts.timeout);
        let res =
            self.reduce_scatter_ring(input.as_bytes()?, output.as_bytes_mut()?, dt, op, &deadline);
        res.map_err(|e| self.fail(e))
    }

    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<()> {
        let w = self.mesh.world;
        check::root("broadcast", root, w)?;
        self.host("broadcast", tensor)?;
        self.usable("broadcast")?;
        let buf = tensor.as_bytes_mut()?;
        if w == 1 || buf.is_empty() {
            return Ok(());
        }
        let deadline = Deadline::after(self.opts.timeout);
        let res = if buf.len() <= self.opts.small_broadcast || w == 2 {
            self.broadcast_tree(buf, root, &deadline)
        } else {
            self.broadcast_chain(buf, root, &deadline)
        };
        res.map_err(|e| self.fail(e))
    }

    fn gather(&mut self, input: &Tensor, output: Option<&mut Tensor>, root: usize) -> Result<()> {
        let (r, w) = (self.mesh.rank, self.mesh.world);
        check::root("gather", root, w)?;
        self.host("gather", input)?;
        let n = input.nbytes();
        let deadline = Deadline::after(self.opts.timeout);
        let name = self.name("gather");
        let nop = |_: usize, _: usize, _: &[u8]| Ok(());
        if r == root {
            let out =
                output.ok_or_else(|| CommError::invalid("gather: the root must pass an output"))?;
            check::gathered("gather", input, out, w)?;
            self.host("gather", out)?;
            self.usable("gather")?;
            let ob = out.as_bytes_mut()?;
            ob[r * n..(r + 1) * n].copy_from_slice(input.as_bytes()?);
            if w == 1 || n == 0 {
                return Ok(());
            }
            let mut recvs: Vec<RecvOp> = ob
                .chunks_mut(n)
                .enumerate()
                .filter(|(i, _)| *i != r)
                .map(|(i, c)| RecvOp::new(i, c))
                .collect();
            let res = self.mesh.exchange(
                Kind::Gather,
                &|| name.clone(),
                &mut [],
                &mut recvs,
                &deadline,
                usize::MAX,
                nop,
            );
            res.map_err(|e| self.fail(e))
        } else {
            self.usable("gather")?;
            if n == 0 {
                return Ok(());
            }
            let res = self.mesh.exchange(
                Kind::Gather,
                &|| name.clone(),
                &mut [SendOp::new(root, input.as_bytes()?)],
                &mut [],
                &deadline,
                usize::MAX,
                nop,
            );
            res.map_err(|e| self.fail(e))
        }
    }

    fn all_to_all(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()> {
        let (r, w) = (self.mesh.rank, self.mesh.world);
        check::all_to_all(input, output, w)?;
        self.host("all_to_all", input)?;
        self.host("all_to_all", output)?;
        self.usable("all_to_all")?;
        let m = input.nbytes() / w;
        let ib = input.as_bytes()?;
        let ob = output.as_bytes_mut()?;
        if w == 1 || m == 0 {
            ob[r * m..(r + 1) * m].copy_from_slice(&ib[r * m..(r + 1) * m]);
            return Ok(());
        }
        let deadline = Deadline::after(self.opts.timeout);
        let name = self.name("all_to_all");
        // Pairwise exchange: step k sends to r+k and receives from r-k; the
        // poll loop runs every step at once.
        let mut sends: Vec<SendOp> = (1..w)
            .map(|k| {
                let to = (r + k) % w;
                SendOp::new(to, &ib[to * m..(to + 1) * m])
            })
            .collect();
        let obp = ob.as_mut_ptr();
        let mut recvs: Vec<RecvOp> = (1..w)
            .map(|k| {
                let from = (r + w - k) % w;
                // The blocks `from` (all different) are disjoint ranges of `ob`.
                RecvOp::raw(from, obp.wrapping_add(from * m), m)
            })
            .collect();
        // This member's own block is copied in pieces while the sockets have
        // nothing to do (for large messages that copy is a good part of the
        // work), the rest after.
        let own = &ib[r * m..(r + 1) * m];
        let own_dst = obp.wrapping_add(r * m);
        let piece = self.opts.segment.max(1);
        let mut copied = 0;
        let mut copy_some = |upto: usize| {
            let end = upto.min(m);
            if copied < end {
                // SAFETY: block `r` of `ob` is a range that no receive writes
                // (receives fill the blocks of the other members).
                let dst =
                    unsafe { std::slice::from_raw_parts_mut(own_dst.add(copied), end - copied) };
                dst.copy_from_slice(&own[copied..end]);
                copied = end;
            }
        };
        let mut done = 0;
        let res = self.mesh.exchange_idle(
            Kind::AllToAll,
            &|| name.clone(),
            &mut sends,
            &mut recvs,
            &deadline,
            usize::MAX,
            |_, _, _| Ok(()),
            &mut || {
                if done >= m {
                    return false;
                }
                done = (done + piece).min(m);
                copy_some(done);
                true
            },
        );
        copy_some(m);
        res.map_err(|e| self.fail(e))
    }

    fn send(&mut self, tensor: &Tensor, dst: usize) -> Result<()> {
        check::peer("send", dst, self.mesh.rank, self.mesh.world)?;
        self.host("send", tensor)?;
        self.usable("send")?;
        self.p2p("send", &mut [SendOp::new(dst, tensor.as_bytes()?)], &mut [])
    }

    fn recv(&mut self, tensor: &mut Tensor, src: usize) -> Result<()> {
        check::peer("recv", src, self.mesh.rank, self.mesh.world)?;
        self.host("recv", tensor)?;
        self.usable("recv")?;
        self.p2p(
            "recv",
            &mut [],
            &mut [RecvOp::new(src, tensor.as_bytes_mut()?)],
        )
    }

    fn barrier(&mut self) -> Result<()> {
        self.usable("barrier")?;
        let (r, w) = (self.mesh.rank, self.mesh.world);
        if w == 1 {
            return Ok(());
        }
        let deadline = Deadline::after(self.opts.timeout);
        let name = self.name("barrier");
        let mut k = 1;
        while k < w {
            let res = self.mesh.exchange(
                Kind::Barrier,
                &|| name.clone(),
                &mut [SendOp::new((r + k) % w, &[])],
                &mut [RecvOp::new((r + w - k) % w, &mut [])],
                &deadline,
                usize::MAX,
                |_, _, _| Ok(()),
            );
            res.map_err(|e| self.fail(e))?;
            k <<= 1;
        }
        Ok(())
    }
}
