//! [`TcpCommunicator`]: the collectives, built on [`Mesh::exchange`].

use std::net::SocketAddr;
use std::sync::Arc;

use comm_core::reduce::{reduce_into, reduce_pair_into};
use comm_core::{
    BlockLayout, BufMut, BufRef, Call, Capabilities, CommError, DType, Device, DeviceCommunicator,
    HostBuffer, Missing, P2p, ReduceOp, Result, Store,
};

use crate::mesh::{Mesh, RecvOp, SendOp};
use crate::setup::connect_mesh;
use crate::TcpOptions;

/// Runs of a strided all-to-all shorter than this are packed into a
/// per-peer workspace instead of one iovec each (the kernel's per-iovec cost
/// then outweighs a copy).
const MIN_IOV_RUN: usize = 1024;

/// The raw TCP backend: a [`DeviceCommunicator`] over host memory for ranks
/// on one or many hosts. Build it with [`crate::TcpFactory`] (or
/// [`TcpCommunicator::new`]) and use it through [`comm_core::Communicator`],
/// which checks arguments, answers one-member groups and empty calls,
/// computes `Avg` and stages device memory.
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
/// - all_to_all (flat and strided): every pair exchanges at once (all steps
///   progressed together by the poll loop); strided blocks go straight from
///   and to their places with scatter-gather I/O.
/// - barrier: dissemination (log2 rounds of empty messages).
///
/// Every call's description travels with its first message to each peer
/// and is checked on arrival (a ring of checks: each member checks at
/// least its left neighbour, at once); a member that fails
/// tells the others over the control connections whom it blames.
#[derive(Debug)]
pub struct TcpCommunicator {
    mesh: Mesh,
    opts: TcpOptions,
    local_addr: SocketAddr,
    /// Receive buffer of reductions, reused across calls.
    scratch: HostBuffer,
    /// Accumulators of reduce_scatter, reused across calls.
    acc: [HostBuffer; 2],
    /// Per-peer workspaces of strided all-to-alls with tiny runs.
    stage: Vec<HostBuffer>,
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

/// The ranks `why` holds responsible, with what each did, for an abort.
fn blame(why: &CommError) -> Vec<Missing> {
    match why {
        CommError::Timeout { missing, .. } => missing.clone(),
        CommError::PeerLost { peer, detail, .. } => vec![Missing {
            rank: *peer,
            detail: format!("lost: {detail}"),
        }],
        CommError::PeerAborted { peer, culprits, .. } if culprits.is_empty() => vec![Missing {
            rank: *peer,
            detail: "aborted".into(),
        }],
        CommError::PeerAborted { culprits, .. } => culprits.clone(),
        CommError::CallMismatch { peer, theirs, .. } => vec![Missing {
            rank: *peer,
            detail: format!("called {theirs}"),
        }],
        _ => Vec::new(),
    }
}

/// True when the blocks of `l` (for `world` members) never overlap, so they
/// can be received concurrently: runs apart within a block, and blocks
/// either apart or interleaved row by row.
fn disjoint(l: &BlockLayout, world: usize) -> bool {
    let runs_apart = l.runs <= 1 || l.stride >= l.run;
    let span = (l.runs.saturating_sub(1))
        .saturating_mul(l.stride)
        .saturating_add(l.run);
    let blocks_apart = l.block_step >= span;
    let interleaved = l.block_step >= l.run
        && (world - 1)
            .saturating_mul(l.block_step)
            .saturating_add(l.run)
            <= l.stride;
    world <= 1 || (runs_apart && (blocks_apart || interleaved))
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
            stage: Vec::new(),
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

    /// Runs one collective's algorithm after [`Mesh::begin`] (which sets
    /// up the call-description checks).
    fn collective(
        &mut self,
        call: &Call<'_>,
        f: impl FnOnce(&mut Self) -> Result<()>,
    ) -> Result<()> {
        self.mesh.begin(call);
        f(self)?;
        // Done: an abort from now on is not about this call.
        self.mesh.end_collective();
        Ok(())
    }

    fn all_reduce_small(
        &mut self,
        call: &Call<'_>,
        buf: &mut [u8],
        dt: DType,
        op: ReduceOp,
    ) -> Result<()> {
        let (r, w) = (self.mesh.rank, self.mesh.world);
        let n = buf.len();
        ensure(&mut self.scratch, n);
        let scratch = &mut self.scratch.as_bytes_mut()[..n];
        let p = prev_pow2(w);
        let rem = w - p;
        let nop = |_: usize, _: usize, _: &[u8]| Ok(());
        let mesh = &mut self.mesh;
        // Fold: in the first 2*rem ranks, even ranks hand their data to the next odd one.
        let newrank = if r < 2 * rem {
            if r % 2 == 0 {
                mesh.exchange(
                    call,
                    &mut [SendOp::new(r + 1, buf)],
                    &mut [],
                    usize::MAX,
                    nop,
                )?;
                None
            } else {
                mesh.exchange(
                    call,
                    &mut [],
                    &mut [RecvOp::new(r - 1, scratch)],
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
                mesh.exchange(
                    call,
                    &mut [SendOp::new(partner, buf)],
                    &mut [RecvOp::new(partner, scratch)],
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
                mesh.exchange(
                    call,
                    &mut [],
                    &mut [RecvOp::new(r + 1, buf)],
                    usize::MAX,
                    nop,
                )?;
            } else {
                mesh.exchange(
                    call,
                    &mut [SendOp::new(r - 1, buf)],
                    &mut [],
                    usize::MAX,
                    nop,
                )?;
            }
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
    /// and starts the all-gather.
    fn all_reduce_ring(
        &mut self,
        call: &Call<'_>,
        buf: &mut [u8],
        dt: DType,
        op: ReduceOp,
    ) -> Result<()> {
        let (r, w) = (self.mesh.rank, self.mesh.world);
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
        self.mesh
            .exchange(call, &mut sends, &mut recvs, seg, |i, off, bytes| {
                if i >= steps {
                    return Ok(());
                }
                let (p, len) = at((r + 2 * w - i - 1) % w);
                assert!(off + bytes.len() <= len, "a ring piece past its block");
                // SAFETY: `off + bytes.len() <= len`, inside block r - i - 1,
                // which nothing else touches while this piece is reduced (above).
                let dst = unsafe { std::slice::from_raw_parts_mut(p.add(off), bytes.len()) };
                reduce_into(dst, bytes, dt, op)
            })
    }

    /// Ring all-gather over `buf` in place (`w` blocks of `buf.len() / w`
    /// bytes), where this member holds block `rank`; one pipelined exchange
    /// whose sends forward each segment as soon as it has arrived.
    fn ring_all_gather(&mut self, call: &Call<'_>, buf: &mut [u8]) -> Result<()> {
        let (r, w) = (self.mesh.rank, self.mesh.world);
        let n = buf.len();
        let right = (r + 1) % w;
        let left = (r + w - 1) % w;
        let base = buf.as_mut_ptr();
        let seg = self.opts.segment.max(1);
        let mut sends: Vec<SendOp> = Vec::with_capacity(w - 1);
        let mut recvs: Vec<RecvOp> = Vec::with_capacity(w - 1);
        for s in 0..w - 1 {
            let sb = (r + w - s) % w;
            let rb = (r + 2 * w - s - 1) % w;
            let (s0, sc) = block(n, w, sb);
            let (r0, rc) = block(n, w, rb);
            // All blocks are disjoint ranges of `buf`; block `rb` is written by
            // receive s and read by send s + 1, gated on that receive.
            let send = SendOp::raw(right, base.wrapping_add(s0), sc);
            sends.push(if s == 0 { send } else { send.gated(s - 1) });
            recvs.push(RecvOp::raw(left, base.wrapping_add(r0), rc));
        }
        self.mesh
            .exchange(call, &mut sends, &mut recvs, seg, |_, _, _| Ok(()))
    }

    fn reduce_scatter_ring(
        &mut self,
        call: &Call<'_>,
        input: &[u8],
        output: &mut [u8],
        dt: DType,
        op: ReduceOp,
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
            self.mesh
                .exchange(call, &mut sends, &mut recvs, seg, |_, off, bytes| {
                    assert!(off + bytes.len() <= m, "a ring piece past its block");
                    // SAFETY: `dst0` is `output` or the accumulator not being sent in
                    // this step, `m` bytes long; `off + bytes.len() <= m`.
                    let dst = unsafe { std::slice::from_raw_parts_mut(dst0.add(off), bytes.len()) };
                    reduce_pair_into(dst, &own[off..off + bytes.len()], bytes, dt, op)
                })?;
        }
        Ok(())
    }

    fn broadcast_tree(&mut self, call: &Call<'_>, buf: &mut [u8], root: usize) -> Result<()> {
        let (r, w) = (self.mesh.rank, self.mesh.world);
        let vr = (r + w - root) % w;
        let nop = |_: usize, _: usize, _: &[u8]| Ok(());
        let mut mask = 1;
        while mask < w {
            if vr & mask != 0 {
                let parent = (vr - mask + root) % w;
                self.mesh.exchange(
                    call,
                    &mut [],
                    &mut [RecvOp::new(parent, buf)],
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
            self.mesh
                .exchange(call, &mut sends, &mut [], usize::MAX, nop)?;
        }
        Ok(())
    }

    fn broadcast_chain(&mut self, call: &Call<'_>, buf: &mut [u8], root: usize) -> Result<()> {
        let (r, w) = (self.mesh.rank, self.mesh.world);
        let vr = (r + w - root) % w;
        let next = (r + 1) % w;
        let prev = (r + w - 1) % w;
        let seg = self.opts.segment;
        let nop = |_: usize, _: usize, _: &[u8]| Ok(());
        let p = buf.as_mut_ptr();
        let len = buf.len();
        let mesh = &mut self.mesh;
        if vr == 0 {
            mesh.exchange(call, &mut [SendOp::raw(next, p, len)], &mut [], seg, nop)
        } else if vr == w - 1 {
            mesh.exchange(call, &mut [], &mut [RecvOp::raw(prev, p, len)], seg, nop)
        } else {
            // Forward each piece as soon as it has arrived: the send reads only
            // bytes the receive has completed (gate).
            mesh.exchange(
                call,
                &mut [SendOp::raw(next, p, len).gated(0)],
                &mut [RecvOp::raw(prev, p, len)],
                seg,
                nop,
            )
        }
    }

    /// Pairwise exchange: step k sends block r+k and receives block r-k;
    /// the poll loop runs every step at once, and this member's own block
    /// is copied (`own(done_so_far, piece)`) while the sockets are idle.
    fn pairwise(
        &mut self,
        call: &Call<'_>,
        sends: &mut [SendOp],
        recvs: &mut [RecvOp],
        own_len: usize,
        mut own: impl FnMut(usize, usize),
    ) -> Result<()> {
        let piece = self.opts.segment.max(1);
        let mut done = 0;
        let res = self.mesh.exchange_idle(
            call,
            sends,
            recvs,
            usize::MAX,
            |_, _, _| Ok(()),
            &mut || {
                if done >= own_len {
                    return false;
                }
                let end = (done + piece).min(own_len);
                own(done, end);
                done = end;
                true
            },
        );
        if done < own_len {
            own(done, own_len);
        }
        res
    }
}

impl DeviceCommunicator for TcpCommunicator {
    fn backend(&self) -> &str {
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
    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::default();
        c.checks_calls = true;
        c.strided_all_to_all = true;
        c
    }

    fn all_reduce(&mut self, call: &Call<'_>, buf: BufMut<'_>, op: ReduceOp) -> Result<()> {
        let dt = buf.dtype();
        let w = self.mesh.world;
        let buf = buf
            .into_host_bytes()
            .ok_or_else(|| CommError::invalid("all_reduce: the tcp backend moves host memory"))?;
        let small = buf.len() <= self.opts.small_all_reduce || buf.len() / dt.size() < w;
        tracing::debug!(
            group = call.group,
            "{}: {}",
            call.desc,
            if small {
                "recursive doubling"
            } else {
                "pipelined ring"
            }
        );
        self.collective(call, |me| {
            if small {
                me.all_reduce_small(call, buf, dt, op)
            } else {
                me.all_reduce_ring(call, buf, dt, op)
            }
        })
    }

    fn all_gather(&mut self, call: &Call<'_>, input: BufRef<'_>, output: BufMut<'_>) -> Result<()> {
        let inp = input.expect_host("all_gather")?;
        let mut output = output;
        let out = output.expect_host("all_gather")?;
        let (r, n) = (self.mesh.rank, inp.len());
        out[r * n..(r + 1) * n].copy_from_slice(inp);
        tracing::debug!(group = call.group, "{}: pipelined ring", call.desc);
        self.collective(call, |me| me.ring_all_gather(call, out))
    }

    fn reduce_scatter(
        &mut self,
        call: &Call<'_>,
        input: BufRef<'_>,
        output: BufMut<'_>,
        op: ReduceOp,
    ) -> Result<()> {
        let dt = input.dtype();
        let inp = input.expect_host("reduce_scatter")?;
        let mut output = output;
        let out = output.expect_host("reduce_scatter")?;
        tracing::debug!(group = call.group, "{}: ring", call.desc);
        self.collective(call, |me| me.reduce_scatter_ring(call, inp, out, dt, op))
    }

    fn broadcast(&mut self, call: &Call<'_>, buf: BufMut<'_>, root: usize) -> Result<()> {
        let buf = buf
            .into_host_bytes()
            .ok_or_else(|| CommError::invalid("broadcast: the tcp backend moves host memory"))?;
        let tree = buf.len() <= self.opts.small_broadcast || self.mesh.world == 2;
        tracing::debug!(
            group = call.group,
            "{}: {}",
            call.desc,
            if tree {
                "binomial tree"
            } else {
                "pipelined chain"
            }
        );
        self.collective(call, |me| {
            if tree {
                me.broadcast_tree(call, buf, root)
            } else {
                me.broadcast_chain(call, buf, root)
            }
        })
    }

    fn gather(
        &mut self,
        call: &Call<'_>,
        input: BufRef<'_>,
        output: Option<BufMut<'_>>,
        root: usize,
    ) -> Result<()> {
        let r = self.mesh.rank;
        let inp = input.expect_host("gather")?;
        let n = inp.len();
        let nop = |_: usize, _: usize, _: &[u8]| Ok(());
        tracing::debug!(group = call.group, "{}: direct to the root", call.desc);
        match output {
            Some(mut out) if r == root => {
                let ob = out.expect_host("gather")?;
                ob[r * n..(r + 1) * n].copy_from_slice(inp);
                self.collective(call, |me| {
                    let mut recvs: Vec<RecvOp> = ob
                        .chunks_mut(n)
                        .enumerate()
                        .filter(|(i, _)| *i != r)
                        .map(|(i, c)| RecvOp::new(i, c))
                        .collect();
                    me.mesh.exchange(call, &mut [], &mut recvs, usize::MAX, nop)
                })
            }
            _ => self.collective(call, |me| {
                me.mesh.exchange(
                    call,
                    &mut [SendOp::new(root, inp)],
                    &mut [],
                    usize::MAX,
                    nop,
                )
            }),
        }
    }

    fn all_to_all(&mut self, call: &Call<'_>, input: BufRef<'_>, output: BufMut<'_>) -> Result<()> {
        let (r, w) = (self.mesh.rank, self.mesh.world);
        let ib = input.expect_host("all_to_all")?;
        let mut output = output;
        let ob = output.expect_host("all_to_all")?;
        let m = ib.len() / w;
        tracing::debug!(group = call.group, "{}: pairwise exchange", call.desc);
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
        self.collective(call, |me| {
            me.pairwise(call, &mut sends, &mut recvs, m, |a, b| {
                // SAFETY: block `r` of `ob` is a range that no receive writes
                // (receives fill the blocks of the other members); `b <= m`.
                let dst = unsafe { std::slice::from_raw_parts_mut(own_dst.add(a), b - a) };
                dst.copy_from_slice(&own[a..b]);
            })
        })
    }

    fn all_to_all_strided(
        &mut self,
        call: &Call<'_>,
        input: BufRef<'_>,
        send: &BlockLayout,
        output: BufMut<'_>,
        recv: &BlockLayout,
    ) -> Result<()> {
        let (r, w) = (self.mesh.rank, self.mesh.world);
        let es = input.dtype().size();
        let ib = input.expect_host("all_to_all")?;
        let mut output = output;
        let ob = output.expect_host("all_to_all")?;
        // The front checked both layouts against their buffers; bounds that
        // protect memory are checked again here.
        send.check(ib.len() / es, w)?;
        recv.check(ob.len() / es, w)?;
        let block = send.block_len() * es;
        assert_eq!(
            block,
            recv.block_len() * es,
            "strided all_to_all block sizes"
        );
        let (srun, rrun) = (send.run * es, recv.run * es);
        let stage_send = srun < MIN_IOV_RUN;
        let stage_recv = rrun < MIN_IOV_RUN || !disjoint(recv, w);
        tracing::debug!(
            group = call.group,
            "{}: pairwise exchange of strided blocks (send {}, receive {})",
            call.desc,
            if stage_send {
                "packed"
            } else {
                "scatter-gather"
            },
            if stage_recv {
                "packed"
            } else {
                "scatter-gather"
            }
        );
        // Workspaces: one per peer and direction, reused across calls.
        let mut stage = std::mem::take(&mut self.stage);
        stage.resize_with(stage.len().max(2 * w), || HostBuffer::zeroed(0));
        let (sst, rst) = stage.split_at_mut(w);
        let ibp = ib.as_ptr();
        let obp = ob.as_mut_ptr();
        let mut sends: Vec<SendOp> = Vec::with_capacity(w - 1);
        for k in 1..w {
            let to = (r + k) % w;
            sends.push(if stage_send {
                let ws = &mut sst[to];
                ws.reuse(block);
                send.gather(ib, to, es, ws.as_bytes_mut());
                SendOp::new(to, ws.as_bytes())
            } else {
                let off = to * send.block_step * es;
                SendOp::strided(to, ibp.wrapping_add(off), send.runs, srun, send.stride * es)
            });
        }
        let mut recvs: Vec<RecvOp> = Vec::with_capacity(w - 1);
        for k in 1..w {
            let from = (r + w - k) % w;
            recvs.push(if stage_recv {
                let ws = &mut rst[from];
                ws.reuse(block);
                RecvOp::new(from, ws.as_bytes_mut())
            } else {
                let off = from * recv.block_step * es;
                // Blocks of a disjoint layout never overlap (checked above).
                RecvOp::strided(
                    from,
                    obp.wrapping_add(off),
                    recv.runs,
                    rrun,
                    recv.stride * es,
                )
            });
        }
        // The own block, run by run, while the sockets are idle.
        let (sl, rl) = (*send, *recv);
        let own_len = block;
        let res = self.collective(call, |me| {
            me.pairwise(call, &mut sends, &mut recvs, own_len, |a, b| {
                copy_block_range(ibp, &sl, obp, &rl, r, es, a, b);
            })
        });
        drop(sends);
        drop(recvs);
        if res.is_ok() && stage_recv {
            for k in 1..w {
                let from = (r + w - k) % w;
                recv.scatter(rst[from].as_bytes(), from, es, ob);
            }
        }
        self.stage = stage;
        res
    }

    fn send_recv(&mut self, call: &Call<'_>, ops: &mut [P2p<'_>]) -> Result<()> {
        self.mesh.end_collective();
        let mut sends: Vec<SendOp> = Vec::new();
        let mut recvs: Vec<RecvOp> = Vec::new();
        for p in ops.iter_mut() {
            match p {
                P2p::Send { peer, buf, desc } => {
                    let b = buf.expect_host("send")?;
                    sends.push(SendOp::new(*peer, b).p2p(*desc));
                }
                P2p::Recv { peer, buf, desc } => {
                    let b = buf.expect_host("recv")?;
                    recvs.push(RecvOp::raw(*peer, b.as_mut_ptr(), b.len()).p2p(*desc));
                }
            }
        }
        self.mesh
            .exchange(call, &mut sends, &mut recvs, usize::MAX, |_, _, _| Ok(()))
    }

    fn barrier(&mut self, call: &Call<'_>) -> Result<()> {
        let (r, w) = (self.mesh.rank, self.mesh.world);
        self.collective(call, |me| {
            let mut k = 1;
            while k < w {
                me.mesh.exchange(
                    call,
                    &mut [SendOp::new((r + k) % w, &[])],
                    &mut [RecvOp::new((r + w - k) % w, &mut [])],
                    usize::MAX,
                    |_, _, _| Ok(()),
                )?;
                k <<= 1;
            }
            Ok(())
        })
    }

    fn abort(&mut self, why: &CommError) {
        let culprits = blame(why);
        tracing::debug!("tcp: aborting the group, blaming {culprits:?}: {why}");
        self.mesh.abort(&why.to_string(), &culprits);
    }

    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }
}

/// Copies bytes `a..b` of block `r` from the strided input to the strided
/// output (this member's own block of a strided all-to-all).
#[allow(clippy::too_many_arguments)]
fn copy_block_range(
    src: *const u8,
    sl: &BlockLayout,
    dst: *mut u8,
    rl: &BlockLayout,
    r: usize,
    es: usize,
    a: usize,
    b: usize,
) {
    let (srun, rrun) = (sl.run * es, rl.run * es);
    let mut off = a;
    while off < b {
        let (sk, sw) = (off / srun, off % srun);
        let (rk, rw) = (off / rrun, off % rrun);
        let take = (srun - sw).min(rrun - rw).min(b - off);
        let s = (r * sl.block_step + sk * sl.stride) * es + sw;
        let d = (r * rl.block_step + rk * rl.stride) * es + rw;
        // SAFETY: both layouts were checked against their buffers, so these
        // runs lie inside them; block `r` of the output is written by no
        // receive (receives fill the other members' blocks, which a disjoint
        // layout keeps apart, and a packed one writes only after the
        // exchange).
        unsafe { std::ptr::copy_nonoverlapping(src.add(s), dst.add(d), take) };
        off += take;
    }
}
