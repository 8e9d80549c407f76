//! The one chunk-step loop every collective runs, and the collectives that
//! move data through the shared workspace (two copies: in, then out).
//!
//! A collective is an [`Exchange`]: how many steps, what a rank writes into
//! its own buffer before arriving at a step ([`Exchange::fill`]) and what it
//! reads once every rank has arrived ([`Exchange::take`]). [`ShmCommunicator::run`]
//! does the rest for all of them: step numbers, waiting for the buffer of
//! this parity to be free, publishing the step description, waiting for and
//! checking every other rank's, `done`, and (single copy) holding the
//! source until its readers are done.

use comm_core::reduce::{reduce_into, reduce_pair_into};
use comm_core::{BlockLayout, Call, CommError, DType, ReduceOp, Result};

use super::blocks::{copy_between, gather_range, scatter_range, Pieces};
use super::{align_up, ShmCommunicator};
use crate::wire::{Algo, StepDesc, ADDR_WORD, STEP_WORDS};

/// One collective call as a sequence of steps.
pub(super) trait Exchange {
    /// How the steps move data.
    fn algo(&self) -> Algo;
    /// Number of steps (at least 1).
    fn chunks(&self) -> usize;
    /// Single copy: the address (in this process) peers read from.
    fn source(&self) -> u64 {
        0
    }
    /// Single copy: a digest of how this rank's source is laid out, which
    /// every rank must share (peers compute addresses in it).
    fn source_layout(&self) -> u64 {
        0
    }
    /// Single copy: peers read this rank's memory, so the call returns only
    /// once every rank is done with the last step.
    fn lends_source(&self) -> bool {
        false
    }
    /// Before arriving at step `i`: this rank's part into its buffer.
    fn fill(&mut self, i: usize, mine: &mut [u8]) -> Result<()>;
    /// After arriving at step `i`, before reading any peer: this rank's own
    /// part (its own block), which so overlaps the wait for the others.
    fn local(&mut self, i: usize) -> Result<()> {
        let _ = i;
        Ok(())
    }
    /// After this rank published `done` for step `i` (its reads of the
    /// peers are over, so peers lending their memory may go on): local work
    /// that can wait, such as a single-copy exchange's own block.
    fn after_done(&mut self, i: usize) -> Result<()> {
        let _ = i;
        Ok(())
    }
    /// True when [`take_from`](Self::take_from) reads each peer as soon as
    /// that peer arrives (no reduction across ranks), instead of
    /// [`take`](Self::take) after every rank arrived.
    fn per_peer(&self) -> bool {
        false
    }
    /// After every rank arrived at step `i`: what this rank reads.
    fn take(&mut self, i: usize, x: &StepCtx<'_, '_>) -> Result<()>;
    /// With [`per_peer`](Self::per_peer): what this rank reads from `p`
    /// once `p` arrived at step `i`.
    fn take_from(&mut self, i: usize, p: usize, x: &StepCtx<'_, '_>) -> Result<()> {
        let _ = (i, p, x);
        Ok(())
    }
}

/// What [`Exchange::take`] may do during a step.
pub(super) struct StepCtx<'c, 'a> {
    pub(super) comm: &'c ShmCommunicator,
    pub(super) call: &'c Call<'a>,
    k: u32,
}

impl StepCtx<'_, '_> {
    /// This rank.
    pub(super) fn me(&self) -> usize {
        self.comm.rank
    }

    /// `len` bytes at `off` of rank `p`'s buffer of this step, as `p` wrote
    /// them before arriving (or, after [`wait_reduced`](Self::wait_reduced),
    /// its reduced slice).
    pub(super) fn peer(&self, p: usize, off: usize, len: usize) -> &[u8] {
        assert!(
            off + len <= self.comm.payload.ws,
            "read past a workspace buffer"
        );
        let ptr = self
            .comm
            .seg()
            .payload_at(self.comm.payload.buf(p, self.k as usize), len + off);
        // SAFETY: inside p's buffer of this parity (asserted above and by
        // payload_at), which p does not rewrite before every rank's `done`
        // reached this step; ranges p rewrites during the step (its reduced
        // slice) are read only after its `reduced`.
        unsafe { std::slice::from_raw_parts(ptr.add(off), len) }
    }

    /// Writes `src` at `off` of this rank's buffer of this step (two-shot:
    /// the reduced slice, which no peer reads before `publish_reduced`).
    pub(super) fn write_mine(&self, off: usize, src: &[u8]) {
        assert!(
            off + src.len() <= self.comm.payload.ws,
            "write past a workspace buffer"
        );
        let ptr = self.comm.seg().payload_at(
            self.comm.payload.buf(self.me(), self.k as usize),
            off + src.len(),
        );
        // SAFETY: inside my buffer (asserted); the protocol gives this range
        // to me alone until I publish `reduced`.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), ptr.add(off), src.len()) };
    }

    /// Tells the others this rank's reduced slice of this step is ready.
    pub(super) fn publish_reduced(&self) {
        let c = self.comm;
        c.seg().flag(c.lines.reduced(c.rank)).publish(self.k);
    }

    /// Waits for rank `p`'s reduced slice of this step.
    pub(super) fn wait_reduced(&self, p: usize) -> Result<()> {
        let c = self.comm;
        let k = self.k;
        c.wait_lines(
            self.call,
            std::iter::once(p),
            |q| c.lines.reduced(q),
            k,
            &|| format!("reduced slice of step {k}"),
        )
    }

    /// The source address rank `p` published with this step (single copy).
    pub(super) fn source_of(&self, p: usize) -> u64 {
        let c = self.comm;
        c.seg()
            .flag(c.lines.arrive(p, self.k as usize))
            .load_words::<STEP_WORDS>()[ADDR_WORD]
    }
}

impl ShmCommunicator {
    #[inline]
    fn next_step(&mut self) -> u32 {
        self.step = self.step.wrapping_add(1);
        self.step
    }

    /// Runs `ex` as one call: the chunk-step loop of every collective.
    pub(super) fn run(&mut self, call: &Call<'_>, ex: &mut impl Exchange) -> Result<()> {
        let chunks = ex.chunks();
        let mut sd = StepDesc {
            call: call.desc.to_wire(),
            algo: ex.algo(),
            chunk: 0,
            chunks: u32::try_from(chunks).unwrap_or(u32::MAX),
            addr: ex.source(),
            layout: ex.source_layout(),
        };
        tracing::debug!(
            "shm group `{}` rank {}: {} in {chunks} step(s) by {}",
            self.group,
            self.rank,
            call.desc,
            sd.algo.name()
        );
        let mut k = self.step;
        for i in 0..chunks {
            k = self.next_step();
            let me = self.rank;
            self.wait_lines(
                call,
                self.others(),
                |p| self.lines.done(p),
                k.wrapping_sub(2),
                &|| format!("still reading step {}", k.wrapping_sub(2)),
            )?;
            let ws = self.payload.ws;
            let mine = self.seg().payload_at(self.payload.buf(me, k as usize), ws);
            // SAFETY: my buffer of this parity: every other rank finished
            // reading it (done >= k - 2, waited above) and none reads it
            // before I arrive at step k.
            ex.fill(i, unsafe { std::slice::from_raw_parts_mut(mine, ws) })?;
            sd.chunk = i as u32;
            let words = sd.encode();
            let line = self.seg().flag(self.lines.arrive(me, k as usize));
            line.store_words(&words);
            line.publish(k);
            ex.local(i)?;
            if ex.per_peer() {
                self.take_as_they_arrive(call, k, &sd, &words, i, ex)?;
            } else {
                self.check_arrivals(call, k, &sd, &words)?;
                ex.take(
                    i,
                    &StepCtx {
                        comm: self,
                        call,
                        k,
                    },
                )?;
            }
            self.seg().flag(self.lines.done(me)).publish(k);
            ex.after_done(i)?;
        }
        if ex.lends_source() {
            self.wait_lines(call, self.others(), |p| self.lines.done(p), k, &|| {
                format!("still reading this rank's memory at step {k}")
            })?;
        }
        Ok(())
    }

    /// Reads every peer as soon as it arrived at step `k` (checking its
    /// step description first), waiting only when none is ready.
    fn take_as_they_arrive(
        &mut self,
        call: &Call<'_>,
        k: u32,
        mine: &StepDesc,
        words: &[u64; STEP_WORDS],
        i: usize,
        ex: &mut impl Exchange,
    ) -> Result<()> {
        let mut pending = std::mem::take(&mut self.pending);
        pending.clear();
        pending.extend(self.others());
        let r = (|| {
            while let Some(&first) = pending.first() {
                let before = pending.len();
                let mut j = 0;
                while j < pending.len() {
                    let p = pending[j];
                    let line = self.seg().flag(self.lines.arrive(p, k as usize));
                    if !line.reached(k) {
                        j += 1;
                        continue;
                    }
                    self.check_words(call, p, mine, words, &line.load_words())?;
                    ex.take_from(
                        i,
                        p,
                        &StepCtx {
                            comm: self,
                            call,
                            k,
                        },
                    )?;
                    pending.swap_remove(j);
                }
                if pending.len() == before {
                    // Nobody was ready: wait for one (the others are
                    // checked again as soon as it arrives).
                    let p = pending
                        .iter()
                        .copied()
                        .min_by_key(|&q| (q + self.world - self.rank) % self.world)
                        .unwrap_or(first);
                    self.wait_lines_among(
                        call,
                        std::iter::once(p),
                        pending.iter().copied(),
                        |q| self.lines.arrive(q, k as usize),
                        k,
                        &|| format!("has not arrived at step {k} ({})", mine.how()),
                    )?;
                }
            }
            Ok(())
        })();
        self.pending = pending;
        r
    }

    /// `Ok` when rank `p`'s step description `theirs` matches this rank's.
    fn check_words(
        &self,
        call: &Call<'_>,
        p: usize,
        mine: &StepDesc,
        words: &[u64; STEP_WORDS],
        theirs: &[u64; STEP_WORDS],
    ) -> Result<()> {
        // Everything but the source address (each rank has its own) must
        // be equal.
        if theirs[..ADDR_WORD] != words[..ADDR_WORD]
            || theirs[ADDR_WORD + 1..] != words[ADDR_WORD + 1..]
        {
            return Err(self.step_mismatch(call, p, mine, theirs));
        }
        Ok(())
    }

    /// Waits for every other rank's arrival at step `k` and compares its
    /// step description with `mine`.
    fn check_arrivals(
        &self,
        call: &Call<'_>,
        k: u32,
        mine: &StepDesc,
        words: &[u64; STEP_WORDS],
    ) -> Result<()> {
        self.wait_lines(
            call,
            self.others(),
            |p| self.lines.arrive(p, k as usize),
            k,
            &|| format!("has not arrived at step {k} ({})", mine.how()),
        )?;
        for p in self.others() {
            let theirs = self
                .seg()
                .flag(self.lines.arrive(p, k as usize))
                .load_words::<STEP_WORDS>();
            self.check_words(call, p, mine, words, &theirs)?;
        }
        Ok(())
    }

    /// Why rank `p`'s step description differs from this rank's.
    fn step_mismatch(
        &self,
        call: &Call<'_>,
        p: usize,
        mine: &StepDesc,
        theirs: &[u64; STEP_WORDS],
    ) -> CommError {
        let unreadable = |e: CommError| {
            CommError::Protocol(format!(
                "{} on shm group `{}`: rank {p} published an unreadable step description ({e})",
                call.name(),
                self.group
            ))
        };
        let sd = match StepDesc::decode(theirs) {
            Ok(sd) => sd,
            Err(e) => return unreadable(e),
        };
        let desc = match sd.call_desc() {
            Ok(d) => d,
            Err(e) => return unreadable(e),
        };
        if let Err(e) = call.desc.check_peer(&desc, p, &call.name()) {
            return e;
        }
        CommError::Protocol(format!(
            "{} on shm group `{}`: rank {p} moves this call's data as {} but this rank as {}; \
             do all members run the same build with the same DIST_SHM_* settings?",
            call.name(),
            self.group,
            sd.how(),
            mine.how()
        ))
    }

    /// Barrier: one step in which nothing moves.
    pub(super) fn sync_step(&mut self, call: &Call<'_>) -> Result<()> {
        self.run(call, &mut Sync)
    }

    /// all_reduce through the workspace: one-shot up to the agreed limit,
    /// else two-shot, chunk by chunk.
    pub(super) fn all_reduce_copy(
        &mut self,
        call: &Call<'_>,
        data: &mut [u8],
        dt: DType,
        op: ReduceOp,
    ) -> Result<()> {
        let es = dt.size();
        let mut ex = AllReduce {
            one_shot: data.len() <= self.one_shot_max,
            chunk: (self.payload.ws / es) * es,
            data,
            dt,
            op,
            world: self.world,
        };
        self.run(call, &mut ex)
    }

    /// all_gather (`root` None) or gather to `root`: every input lands in
    /// rank order in `out` (present on every rank for all_gather, on the
    /// root for gather).
    pub(super) fn gather_to(
        &mut self,
        call: &Call<'_>,
        inp: &[u8],
        mut out: Option<&mut [u8]>,
        root: Option<usize>,
    ) -> Result<()> {
        let (n, me) = (inp.len(), self.rank);
        if self.single.use_for(n) {
            if let Some(o) = out.as_deref_mut() {
                o[me * n..(me + 1) * n].copy_from_slice(inp);
            }
            return self.gather_single(call, inp, out, root);
        }
        let mut ex = Gather {
            chunk: self.payload.ws,
            inp,
            out,
            root,
            me,
        };
        self.run(call, &mut ex)
    }

    /// broadcast from `root` through the workspace.
    pub(super) fn broadcast_from(
        &mut self,
        call: &Call<'_>,
        data: &mut [u8],
        root: usize,
    ) -> Result<()> {
        if self.single.use_for(data.len()) {
            return self.broadcast_single(call, data, root);
        }
        let mut ex = Broadcast {
            chunk: self.payload.ws,
            data,
            root,
            me: self.rank,
        };
        self.run(call, &mut ex)
    }

    /// reduce_scatter: every rank publishes its blocks for the others, then
    /// reduces its own block over every rank in rank order.
    pub(super) fn reduce_scatter_copy(
        &mut self,
        call: &Call<'_>,
        inp: &[u8],
        out: &mut [u8],
        dt: DType,
        op: ReduceOp,
    ) -> Result<()> {
        let es = dt.size();
        let mut ex = ReduceScatter {
            chunk: (self.payload.ws / (self.world - 1) / es) * es,
            inp,
            out,
            dt,
            op,
            me: self.rank,
            world: self.world,
        };
        self.run(call, &mut ex)
    }

    /// all_to_all of (possibly strided) blocks: each rank copies its blocks
    /// for the others straight from their places in `inp` into its buffer,
    /// and copies what it receives straight into its places in `out`.
    pub(super) fn exchange_blocks(
        &mut self,
        call: &Call<'_>,
        inp: &[u8],
        send: &BlockLayout,
        out: &mut [u8],
        recv: &BlockLayout,
        es: usize,
    ) -> Result<()> {
        let m = send.block_len() * es;
        if self.single.use_for_all_to_all(m, send.runs > 1) {
            return self.exchange_single(call, inp, send, out, recv, es);
        }
        let mut ex = Blocks {
            chunk: (self.payload.ws / (self.world - 1) / es) * es,
            inp,
            send,
            out,
            recv,
            es,
            block: m,
            me: self.rank,
            world: self.world,
        };
        self.run(call, &mut ex)
    }
}

/// `(offset, length)` of chunk `i` of `n` bytes cut in `chunk`-byte pieces.
fn chunk_range(i: usize, chunk: usize, n: usize) -> (usize, usize) {
    let off = i * chunk;
    (off, chunk.min(n - off))
}

/// Where sender `from` puts its part for rank `to` in its buffer: its
/// `world - 1` parts for the others in order after itself (nothing of its
/// own goes through the workspace, so a part may use `1/(world - 1)` of it).
fn slot(from: usize, to: usize, world: usize) -> usize {
    (to + world - from - 1) % world
}

fn chunk_count(n: usize, chunk: usize) -> usize {
    n.div_ceil(chunk.max(1)).max(1)
}

/// Reduces `src(0), src(1), ..., src(world - 1)` into `dst` in rank order.
fn reduce_ranks<'s>(
    dst: &mut [u8],
    world: usize,
    src: impl Fn(usize) -> &'s [u8],
    dt: DType,
    op: ReduceOp,
) -> Result<()> {
    reduce_pair_into(dst, src(0), src(1), dt, op)?;
    for p in 2..world {
        reduce_into(dst, src(p), dt, op)?;
    }
    Ok(())
}

struct Sync;

impl Exchange for Sync {
    fn algo(&self) -> Algo {
        Algo::Sync
    }
    fn chunks(&self) -> usize {
        1
    }
    fn fill(&mut self, _: usize, _: &mut [u8]) -> Result<()> {
        Ok(())
    }
    fn take(&mut self, _: usize, _: &StepCtx<'_, '_>) -> Result<()> {
        Ok(())
    }
}

struct AllReduce<'d> {
    data: &'d mut [u8],
    dt: DType,
    op: ReduceOp,
    one_shot: bool,
    chunk: usize,
    world: usize,
}

impl Exchange for AllReduce<'_> {
    fn algo(&self) -> Algo {
        if self.one_shot {
            Algo::OneShot
        } else {
            Algo::TwoShot
        }
    }
    fn chunks(&self) -> usize {
        chunk_count(self.data.len(), self.chunk)
    }
    fn fill(&mut self, i: usize, mine: &mut [u8]) -> Result<()> {
        let (off, c) = chunk_range(i, self.chunk, self.data.len());
        mine[..c].copy_from_slice(&self.data[off..off + c]);
        Ok(())
    }
    fn take(&mut self, i: usize, x: &StepCtx<'_, '_>) -> Result<()> {
        let (off, c) = chunk_range(i, self.chunk, self.data.len());
        let (w, dt, op) = (self.world, self.dt, self.op);
        let dst = &mut self.data[off..off + c];
        if self.one_shot {
            return reduce_ranks(dst, w, |p| x.peer(p, 0, c), dt, op);
        }
        // Two-shot: slices aligned to 64 bytes; rank r owns slice r.
        let es = dt.size();
        let elems = c / es;
        let per = align_up(elems.div_ceil(w), (64 / es).max(1));
        let range = |r: usize| ((r * per).min(elems) * es, ((r + 1) * per).min(elems) * es);
        let me = x.me();
        let (a, b) = range(me);
        if b > a {
            reduce_ranks(&mut dst[a..b], w, |p| x.peer(p, a, b - a), dt, op)?;
            x.write_mine(a, &dst[a..b]);
        }
        x.publish_reduced();
        for p in (1..w).map(|d| (me + d) % w) {
            let (a, b) = range(p);
            if b > a {
                x.wait_reduced(p)?;
                dst[a..b].copy_from_slice(x.peer(p, a, b - a));
            }
        }
        Ok(())
    }
}

struct Gather<'d> {
    inp: &'d [u8],
    out: Option<&'d mut [u8]>,
    root: Option<usize>,
    chunk: usize,
    me: usize,
}

impl Exchange for Gather<'_> {
    fn algo(&self) -> Algo {
        Algo::Copy
    }
    fn chunks(&self) -> usize {
        chunk_count(self.inp.len(), self.chunk)
    }
    fn fill(&mut self, i: usize, mine: &mut [u8]) -> Result<()> {
        if self.root != Some(self.me) {
            let (off, c) = chunk_range(i, self.chunk, self.inp.len());
            mine[..c].copy_from_slice(&self.inp[off..off + c]);
        }
        Ok(())
    }
    fn local(&mut self, i: usize) -> Result<()> {
        let n = self.inp.len();
        let (off, c) = chunk_range(i, self.chunk, n);
        if let Some(out) = self.out.as_deref_mut() {
            let at = self.me * n + off;
            out[at..at + c].copy_from_slice(&self.inp[off..off + c]);
        }
        Ok(())
    }
    fn per_peer(&self) -> bool {
        true
    }
    fn take(&mut self, _: usize, _: &StepCtx<'_, '_>) -> Result<()> {
        Ok(())
    }
    fn take_from(&mut self, i: usize, p: usize, x: &StepCtx<'_, '_>) -> Result<()> {
        let n = self.inp.len();
        let (off, c) = chunk_range(i, self.chunk, n);
        if let Some(out) = self.out.as_deref_mut() {
            out[p * n + off..p * n + off + c].copy_from_slice(x.peer(p, 0, c));
        }
        Ok(())
    }
}

struct Broadcast<'d> {
    data: &'d mut [u8],
    root: usize,
    chunk: usize,
    me: usize,
}

impl Exchange for Broadcast<'_> {
    fn algo(&self) -> Algo {
        Algo::Copy
    }
    fn chunks(&self) -> usize {
        chunk_count(self.data.len(), self.chunk)
    }
    fn fill(&mut self, i: usize, mine: &mut [u8]) -> Result<()> {
        if self.me == self.root {
            let (off, c) = chunk_range(i, self.chunk, self.data.len());
            mine[..c].copy_from_slice(&self.data[off..off + c]);
        }
        Ok(())
    }
    fn per_peer(&self) -> bool {
        true
    }
    fn take(&mut self, _: usize, _: &StepCtx<'_, '_>) -> Result<()> {
        Ok(())
    }
    fn take_from(&mut self, i: usize, p: usize, x: &StepCtx<'_, '_>) -> Result<()> {
        if p == self.root {
            let (off, c) = chunk_range(i, self.chunk, self.data.len());
            self.data[off..off + c].copy_from_slice(x.peer(self.root, 0, c));
        }
        Ok(())
    }
}

struct ReduceScatter<'d> {
    inp: &'d [u8],
    out: &'d mut [u8],
    dt: DType,
    op: ReduceOp,
    chunk: usize,
    me: usize,
    world: usize,
}

impl Exchange for ReduceScatter<'_> {
    fn algo(&self) -> Algo {
        Algo::Copy
    }
    fn chunks(&self) -> usize {
        chunk_count(self.out.len(), self.chunk)
    }
    fn fill(&mut self, i: usize, mine: &mut [u8]) -> Result<()> {
        let m = self.out.len();
        let (off, c) = chunk_range(i, self.chunk, m);
        for q in (1..self.world).map(|d| (self.me + d) % self.world) {
            let at = slot(self.me, q, self.world) * self.chunk;
            mine[at..at + c].copy_from_slice(&self.inp[q * m + off..q * m + off + c]);
        }
        Ok(())
    }
    fn take(&mut self, i: usize, x: &StepCtx<'_, '_>) -> Result<()> {
        let m = self.out.len();
        let (off, c) = chunk_range(i, self.chunk, m);
        let (me, inp, w, chunk) = (self.me, self.inp, self.world, self.chunk);
        let src = |p: usize| {
            if p == me {
                &inp[me * m + off..me * m + off + c]
            } else {
                x.peer(p, slot(p, me, w) * chunk, c)
            }
        };
        reduce_ranks(
            &mut self.out[off..off + c],
            self.world,
            src,
            self.dt,
            self.op,
        )
    }
}

struct Blocks<'d> {
    inp: &'d [u8],
    send: &'d BlockLayout,
    out: &'d mut [u8],
    recv: &'d BlockLayout,
    es: usize,
    /// Bytes per block.
    block: usize,
    chunk: usize,
    me: usize,
    world: usize,
}

impl Blocks<'_> {
    /// Strided input (runs of a row interleave the blocks): `fill` walks
    /// the rows once, copying every block's piece of a row (its own to the
    /// output) while the row is in cache, instead of one pass per block
    /// that reads each row again (and drags the skipped parts through the
    /// prefetchers).
    fn rows_in(&self) -> bool {
        self.send.runs > 1
    }
    /// Strided output: `take` writes every block's piece of an output row
    /// together, once every peer has arrived.
    fn rows_out(&self) -> bool {
        self.recv.runs > 1
    }
}

impl Exchange for Blocks<'_> {
    fn algo(&self) -> Algo {
        Algo::Copy
    }
    fn chunks(&self) -> usize {
        chunk_count(self.block, self.chunk)
    }
    fn fill(&mut self, i: usize, mine: &mut [u8]) -> Result<()> {
        let (off, c) = chunk_range(i, self.chunk, self.block);
        let (me, w, es) = (self.me, self.world, self.es);
        if !self.rows_in() {
            for q in (1..w).map(|d| (me + d) % w) {
                let at = slot(me, q, w) * self.chunk;
                gather_range(self.inp, self.send, q, es, off, &mut mine[at..at + c]);
            }
            return Ok(());
        }
        let step = self.send.block_step * es;
        let own = !self.rows_out();
        let mut at = 0;
        for (pos, n) in Pieces::new(self.send, 0, es, off, c) {
            for q in 0..w {
                let src = &self.inp[pos + q * step..pos + q * step + n];
                if q != me {
                    let d = slot(me, q, w) * self.chunk + at;
                    mine[d..d + n].copy_from_slice(src);
                } else if own {
                    scatter_range(src, self.recv, me, es, off + at, self.out);
                }
            }
            at += n;
        }
        Ok(())
    }
    fn local(&mut self, i: usize) -> Result<()> {
        if self.rows_in() || self.rows_out() {
            return Ok(()); // done with the rows in `fill` or `take`
        }
        let (off, c) = chunk_range(i, self.chunk, self.block);
        let (me, es) = (self.me, self.es);
        copy_between(self.inp, self.send, me, self.out, self.recv, me, es, off, c);
        Ok(())
    }
    fn per_peer(&self) -> bool {
        !self.rows_out()
    }
    fn take(&mut self, i: usize, x: &StepCtx<'_, '_>) -> Result<()> {
        let (off, c) = chunk_range(i, self.chunk, self.block);
        let (me, w, es) = (self.me, self.world, self.es);
        let step = self.recv.block_step * es;
        let mut at = 0;
        for (pos, n) in Pieces::new(self.recv, 0, es, off, c) {
            for p in 0..w {
                let dst = &mut self.out[pos + p * step..pos + p * step + n];
                if p != me {
                    dst.copy_from_slice(x.peer(p, slot(p, me, w) * self.chunk + at, n));
                } else {
                    gather_range(self.inp, self.send, me, es, off + at, dst);
                }
            }
            at += n;
        }
        Ok(())
    }
    fn take_from(&mut self, i: usize, p: usize, x: &StepCtx<'_, '_>) -> Result<()> {
        let (off, c) = chunk_range(i, self.chunk, self.block);
        let at = slot(p, self.me, self.world) * self.chunk;
        scatter_range(x.peer(p, at, c), self.recv, p, self.es, off, self.out);
        Ok(())
    }
}
