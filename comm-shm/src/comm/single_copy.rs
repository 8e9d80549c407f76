//! The single-copy path: receivers read straight from the peer's own
//! buffers with `process_vm_readv` (Linux cross-memory attach) instead of
//! through the shared workspace.
//!
//! A call is one step whose arrival also publishes the address of the
//! rank's source buffer (and, for all-to-all, a digest of its block layout,
//! which every rank must share). Readers copy their part straight from the
//! peer process into their destination and publish `done`; a source
//! returns only once its readers are done, so its buffer is never reused or
//! freed while read. all_reduce reads slice `r` of every peer into scratch
//! and reduces in rank order, then reads the owners' reduced slices, so
//! results are bit-identical to the two-copy path.
//!
//! Used when every member enabled it and its set-up probe succeeded (see
//! [`ShmOptions::single_copy`](super::ShmOptions::single_copy)), for blocks
//! of at least the agreed threshold.

use comm_core::reduce::reduce_into;
use comm_core::{BlockLayout, Call, CommError, DType, ReduceOp, Result};

use super::blocks::{copy_between, scatter_range, Pieces};
use super::steps::{Exchange, StepCtx};
use super::{align_up, ShmCommunicator};
use crate::wire::Algo;

/// Default [`ShmOptions::single_copy_min_bytes`](super::ShmOptions) (mode
/// `On`).
pub(super) const DEFAULT_MIN: usize = 64 << 10;

/// Mode `Auto`, a core per rank: all_to_all blocks in this range go by
/// single copy. Measured on a 2-core VM at world 2 (SCHED_FIFO, best of 5
/// batches): blocks of 32 KiB 5.4 us vs 5.8 two-copy, 64 KiB 8.2 vs 11.3,
/// 128 KiB 17.5 vs 18.1; from 256 KiB two copies win (21 vs 28 us), as
/// `process_vm_readv` copies 4 KiB pages at about half of `memcpy`'s speed
/// while the two-copy path streams through cache-sized chunks.
pub(super) const AUTO_CORE_PER_RANK: (usize, usize) = (32 << 10, 256 << 10);

/// Mode `Auto`, more ranks than cores: all_to_all blocks from this size go
/// by single copy (one step, instead of one per chunk that needs every rank
/// on a core). Measured at world 4 on 2 cores: blocks of 512 KiB 307 us vs
/// 461 two-copy, 1 MiB 676 vs 1123, 16 MiB 23.8 ms vs 46.3; below 512 KiB
/// two copies win (256 KiB: 170 vs 242 us).
pub(super) const AUTO_OVERSUBSCRIBED: usize = 512 << 10;

/// Mode `Auto`: an all_to_all with a strided input goes by single copy only
/// for blocks from this size: its blocks are packed first (peers reading
/// many short runs straight from it pin every page once per run), an extra
/// pass that the two-copy path (which walks the rows once) does not need.
/// Measured at world 4 on 2 cores, `[1, S/4, 24, 128]` f32: 4 MiB per rank
/// 2.27 ms packed single copy vs about 1.1 ms two copies; 16 MiB 9.5-10 ms
/// vs 11.6.
pub(super) const AUTO_STAGED_MIN: usize = 2 << 20;

/// Pieces per `process_vm_readv` call (the kernel takes up to 1024 iovecs
/// per side).
const BATCH: usize = 512;

/// The group's agreed single-copy settings and the peers' pids.
#[derive(Debug)]
pub(super) struct SingleCopy {
    /// Every collective.
    pub ops: bool,
    /// all_to_all blocks of `a2a.0 <= bytes < a2a.1` (empty: never).
    pub a2a: (usize, usize),
    /// Smallest block moved by single copy.
    pub min: usize,
    pub pids: Vec<libc::pid_t>,
    /// all_reduce scratch (reused).
    scratch: Vec<u8>,
    /// Packed blocks of a strided all_to_all input (reused).
    stage: Vec<u8>,
}

/// What a member publishes for the set-up probe.
pub(super) fn probe_pattern(r: usize) -> [u64; 8] {
    std::array::from_fn(|i| 0x5ca1_ab1e_0000_0000 ^ ((r as u64) << 16) ^ i as u64)
}

fn layout_digest(l: &BlockLayout) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in [l.block_step, l.runs, l.run, l.stride] {
        for b in (v as u64).to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h | 1
}

impl SingleCopy {
    pub(super) fn off(world: usize) -> Self {
        SingleCopy {
            ops: false,
            a2a: (usize::MAX, 0),
            min: usize::MAX,
            pids: vec![0; world],
            scratch: Vec::new(),
            stage: Vec::new(),
        }
    }

    /// Whether a block of `bytes` (what a reader reads from one peer) goes
    /// by single copy.
    #[inline]
    pub(super) fn use_for(&self, bytes: usize) -> bool {
        self.ops && bytes >= self.min
    }

    /// [`use_for`](Self::use_for) for an all_to_all block; `strided_in`:
    /// the input's blocks are strided (they are packed before peers read
    /// them, an extra pass that auto mode pays only for large blocks).
    #[inline]
    pub(super) fn use_for_all_to_all(&self, bytes: usize, strided_in: bool) -> bool {
        self.use_for(bytes)
            || ((self.a2a.0..self.a2a.1).contains(&bytes)
                && (!strided_in || bytes >= AUTO_STAGED_MIN))
    }

    /// Reads `len` bytes at `remote` of member `p`'s process into `dst`,
    /// looping over partial reads.
    ///
    /// # Safety
    /// `dst..dst + len` must be writable memory of this process that nothing
    /// else accesses during the call.
    pub(super) unsafe fn read(
        &self,
        p: usize,
        dst: *mut u8,
        remote: u64,
        len: usize,
        op: &str,
    ) -> Result<()> {
        let mut done = 0usize;
        while done < len {
            let local = libc::iovec {
                // SAFETY: `done < len`, inside the caller's range.
                iov_base: unsafe { dst.add(done) }.cast(),
                iov_len: len - done,
            };
            let rem = libc::iovec {
                iov_base: (remote as usize).wrapping_add(done) as *mut libc::c_void,
                iov_len: len - done,
            };
            // SAFETY: `local` is the caller's memory (see # Safety); the
            // kernel checks the remote range against the peer's mappings
            // (a bad one is EFAULT, not undefined behaviour here).
            let r = unsafe { libc::process_vm_readv(self.pids[p], &local, 1, &rem, 1, 0) };
            if r > 0 {
                done += r as usize;
                continue;
            }
            let e = std::io::Error::last_os_error();
            if r < 0 && e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(self.read_error(p, r, e, remote as usize + done, len - done, op));
        }
        Ok(())
    }

    fn read_error(
        &self,
        p: usize,
        r: isize,
        e: std::io::Error,
        at: usize,
        len: usize,
        op: &str,
    ) -> CommError {
        let pid = self.pids[p];
        let what =
            format!("{op}: single-copy read of {len} bytes from rank {p} (pid {pid}) at {at:#x}");
        if r == 0 {
            return CommError::Protocol(format!(
                "{what}: the kernel read 0 bytes (the peer's buffer shrank or was unmapped?)"
            ));
        }
        match e.raw_os_error() {
            Some(libc::ESRCH) => {
                CommError::peer_lost(p, what, format!("process {pid} no longer exists"))
            }
            Some(libc::EFAULT) => CommError::Protocol(format!(
                "{what}: EFAULT, the peer's published buffer (or ours) is not mapped; \
                 was the buffer freed or resized during the call?"
            )),
            _ => CommError::io(what, e),
        }
    }

    /// Reads each `(local, remote, len)` piece from member `p`, batching
    /// pieces into one system call; adjacent pieces on either side are
    /// merged into one iovec of that side (the kernel pins the remote pages
    /// of each remote iovec, so a contiguous side must not be cut into the
    /// other side's pieces).
    ///
    /// # Safety
    /// Every local range must be writable memory of this process that
    /// nothing else accesses during the call.
    unsafe fn read_pieces(
        &self,
        p: usize,
        mut pieces: impl Iterator<Item = (*mut u8, u64, usize)>,
        op: &str,
    ) -> Result<()> {
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        // The pieces of a batch, and each side merged.
        let mut pairs = [(std::ptr::null_mut::<u8>(), 0u64, 0usize); BATCH];
        let mut local = [empty; BATCH];
        let mut remote = [empty; BATCH];
        let push = |v: &mut [libc::iovec; BATCH], k: &mut usize, at: usize, len: usize| {
            if *k > 0 && v[*k - 1].iov_base as usize + v[*k - 1].iov_len == at {
                v[*k - 1].iov_len += len;
            } else {
                v[*k] = libc::iovec {
                    iov_base: at as *mut libc::c_void,
                    iov_len: len,
                };
                *k += 1;
            }
        };
        loop {
            let (mut n, mut nl, mut nr, mut total) = (0, 0, 0, 0usize);
            for (l, r, len) in pieces.by_ref().take(BATCH) {
                pairs[n] = (l, r, len);
                push(&mut local, &mut nl, l as usize, len);
                push(&mut remote, &mut nr, r as usize, len);
                n += 1;
                total += len;
            }
            if n == 0 {
                return Ok(());
            }
            // SAFETY: local ranges per # Safety; the kernel checks remote ones.
            let r = unsafe {
                libc::process_vm_readv(
                    self.pids[p],
                    local.as_ptr(),
                    nl as libc::c_ulong,
                    remote.as_ptr(),
                    nr as libc::c_ulong,
                    0,
                )
            };
            if r as usize != total {
                // Partial or failed: redo this batch piece by piece (copying
                // the same bytes again is harmless) for exact errors.
                for &(l, rm, len) in &pairs[..n] {
                    // SAFETY: as above.
                    unsafe { self.read(p, l, rm, len, op)? };
                }
            }
        }
    }
}

impl ShmCommunicator {
    /// all_reduce by single copy (see the module docs).
    pub(super) fn all_reduce_single(
        &mut self,
        call: &Call<'_>,
        data: &mut [u8],
        dt: DType,
        op: ReduceOp,
    ) -> Result<()> {
        let half = (self.payload.ws / 2).max(64);
        let mut scratch = std::mem::take(&mut self.single.scratch);
        scratch.resize(2 * half, 0);
        let mut ex = AllReduceSingle {
            base: data.as_mut_ptr(),
            len: data.len(),
            _data: std::marker::PhantomData,
            dt,
            op,
            half,
            scratch: &mut scratch,
            world: self.world,
        };
        let r = self.run(call, &mut ex);
        self.single.scratch = scratch;
        r
    }

    /// all_gather / gather by single copy.
    pub(super) fn gather_single(
        &mut self,
        call: &Call<'_>,
        inp: &[u8],
        out: Option<&mut [u8]>,
        root: Option<usize>,
    ) -> Result<()> {
        let lends = root != Some(self.rank);
        let n = inp.len();
        let out = out.map(|o| (o.as_mut_ptr(), o.len()));
        let mut ex = Sources {
            source: inp.as_ptr() as u64,
            lends,
            take: |x: &StepCtx<'_, '_>| {
                let Some((base, len)) = out else {
                    return Ok(());
                };
                for p in x.comm.others() {
                    assert!((p + 1) * n <= len, "gather output too small");
                    // SAFETY: block p of the caller's output (inside it, as
                    // asserted), which only this call writes.
                    unsafe {
                        let dst = base.add(p * n);
                        x.comm
                            .single
                            .read(p, dst, x.source_of(p), n, &x.call.name())?
                    };
                }
                Ok(())
            },
            layout: 0,
        };
        self.run(call, &mut ex)
    }

    /// broadcast by single copy.
    pub(super) fn broadcast_single(
        &mut self,
        call: &Call<'_>,
        data: &mut [u8],
        root: usize,
    ) -> Result<()> {
        let me = self.rank;
        let (ptr, n) = (data.as_mut_ptr(), data.len());
        let mut ex = Sources {
            source: ptr as u64,
            lends: me == root,
            take: |x: &StepCtx<'_, '_>| {
                if me == root {
                    return Ok(());
                }
                // SAFETY: the caller's buffer, which only this call writes.
                unsafe {
                    x.comm
                        .single
                        .read(root, ptr, x.source_of(root), n, &x.call.name())
                }
            },
            layout: 0,
        };
        self.run(call, &mut ex)
    }

    /// Strided all-to-all by single copy: each rank reads block `me` of
    /// every peer's input (in the shared send layout) straight into its
    /// places in `out`.
    pub(super) fn exchange_single(
        &mut self,
        call: &Call<'_>,
        inp: &[u8],
        send: &BlockLayout,
        out: &mut [u8],
        recv: &BlockLayout,
        es: usize,
    ) -> Result<()> {
        // A strided input is packed into a private staging buffer first
        // (one pass over its rows), so peers read contiguous blocks: a
        // remote read of many short runs pins every page once per reader.
        let m = send.block_len() * es;
        let staged = send.runs > 1;
        let mut stage = std::mem::take(&mut self.single.stage);
        if staged {
            let need = m * self.world;
            if stage.len() < need {
                stage.resize(need, 0);
            }
        }
        let packed = BlockLayout::contiguous(send.block_len());
        let mut ex = BlocksSingle {
            inp,
            send,
            out,
            recv,
            es,
            block: m,
            me: self.rank,
            world: self.world,
            stage: if staged {
                Some(&mut stage[..m * self.world])
            } else {
                None
            },
            packed,
        };
        let r = self.run(call, &mut ex);
        self.single.stage = stage;
        r
    }
}

/// Strided all-to-all by single copy: each peer's block is read straight
/// from it as soon as it has arrived, then the own block is copied (after
/// `done`, so peers waiting to reuse their memory are released first). With a strided input,
/// the blocks for the peers are first packed into `stage` (and the own
/// block copied in the same pass over the rows).
struct BlocksSingle<'d> {
    inp: &'d [u8],
    send: &'d BlockLayout,
    out: &'d mut [u8],
    recv: &'d BlockLayout,
    es: usize,
    block: usize,
    me: usize,
    world: usize,
    stage: Option<&'d mut [u8]>,
    /// The layout of `stage`.
    packed: BlockLayout,
}

impl BlocksSingle<'_> {
    /// Where peers read: the staging buffer, or the input itself.
    fn remote_layout(&self) -> &BlockLayout {
        if self.stage.is_some() {
            &self.packed
        } else {
            self.send
        }
    }
}

impl Exchange for BlocksSingle<'_> {
    fn algo(&self) -> Algo {
        Algo::SingleCopy
    }
    fn chunks(&self) -> usize {
        1
    }
    fn source(&self) -> u64 {
        match &self.stage {
            Some(s) => s.as_ptr() as u64,
            None => self.inp.as_ptr() as u64,
        }
    }
    fn source_layout(&self) -> u64 {
        layout_digest(self.remote_layout())
    }
    fn lends_source(&self) -> bool {
        true
    }
    fn fill(&mut self, _: usize, _: &mut [u8]) -> Result<()> {
        let (me, w, es, m) = (self.me, self.world, self.es, self.block);
        let Some(stage) = self.stage.as_deref_mut() else {
            return Ok(());
        };
        let step = self.send.block_step * es;
        let mut at = 0;
        for (pos, n) in Pieces::new(self.send, 0, es, 0, m) {
            for q in 0..w {
                let src = &self.inp[pos + q * step..pos + q * step + n];
                if q == me {
                    scatter_range(src, self.recv, me, es, at, self.out);
                } else {
                    stage[q * m + at..q * m + at + n].copy_from_slice(src);
                }
            }
            at += n;
        }
        Ok(())
    }
    fn after_done(&mut self, _: usize) -> Result<()> {
        // After the reads: the peers waiting for this rank's `done` (to
        // reuse the memory it read) go on while it copies its own block.
        if self.stage.is_none() {
            let (me, es, m) = (self.me, self.es, self.block);
            copy_between(self.inp, self.send, me, self.out, self.recv, me, es, 0, m);
        }
        Ok(())
    }
    fn per_peer(&self) -> bool {
        true
    }
    fn take(&mut self, _: usize, _: &StepCtx<'_, '_>) -> Result<()> {
        Ok(())
    }
    fn take_from(&mut self, _: usize, p: usize, x: &StepCtx<'_, '_>) -> Result<()> {
        let (me, es, m) = (self.me, self.es, self.block);
        let src = x.source_of(p);
        let remote_layout = *self.remote_layout();
        let out_len = self.out.len();
        let base = self.out.as_mut_ptr();
        let mut local = Pieces::new(self.recv, p, es, 0, m);
        let mut remote = Pieces::new(&remote_layout, me, es, 0, m);
        let (mut a, mut b) = (local.next(), remote.next());
        let pairs = std::iter::from_fn(|| {
            let ((la, na), (rb, nb)) = (a?, b?);
            let n = na.min(nb);
            assert!(la + n <= out_len, "strided output piece out of bounds");
            a = if n == na {
                local.next()
            } else {
                Some((la + n, na - n))
            };
            b = if n == nb {
                remote.next()
            } else {
                Some((rb + n, nb - n))
            };
            // SAFETY: `la + n <= out_len` (asserted).
            Some((unsafe { base.add(la) }, src + rb as u64, n))
        });
        // SAFETY: pieces of block p of the caller's output, which only this
        // call writes (bounds asserted above).
        unsafe { x.comm.single.read_pieces(p, pairs, &x.call.name()) }
    }
}

/// A single-copy step whose work is all in `take`.
struct Sources<F> {
    source: u64,
    lends: bool,
    take: F,
    layout: u64,
}

impl<F: FnMut(&StepCtx<'_, '_>) -> Result<()>> Exchange for Sources<F> {
    fn algo(&self) -> Algo {
        Algo::SingleCopy
    }
    fn chunks(&self) -> usize {
        1
    }
    fn source(&self) -> u64 {
        self.source
    }
    fn source_layout(&self) -> u64 {
        self.layout
    }
    fn lends_source(&self) -> bool {
        self.lends
    }
    fn fill(&mut self, _: usize, _: &mut [u8]) -> Result<()> {
        Ok(())
    }
    fn take(&mut self, _: usize, x: &StepCtx<'_, '_>) -> Result<()> {
        (self.take)(x)
    }
}

/// all_reduce by single copy over the caller's buffer at `base`.
struct AllReduceSingle<'d> {
    base: *mut u8,
    len: usize,
    _data: std::marker::PhantomData<&'d mut [u8]>,
    dt: DType,
    op: ReduceOp,
    /// Bytes of each half of `scratch`.
    half: usize,
    scratch: &'d mut [u8],
    world: usize,
}

impl Exchange for AllReduceSingle<'_> {
    fn algo(&self) -> Algo {
        Algo::SingleCopy
    }
    fn chunks(&self) -> usize {
        1
    }
    fn source(&self) -> u64 {
        self.base as u64
    }
    fn lends_source(&self) -> bool {
        true
    }
    fn fill(&mut self, _: usize, _: &mut [u8]) -> Result<()> {
        Ok(())
    }
    fn take(&mut self, _: usize, x: &StepCtx<'_, '_>) -> Result<()> {
        let (w, me, es, dt, op) = (self.world, x.me(), self.dt.size(), self.dt, self.op);
        let name = x.call.name();
        let elems = self.len / es;
        let per = align_up(elems.div_ceil(w), (64 / es).max(1));
        let range = |r: usize| ((r * per).min(elems) * es, ((r + 1) * per).min(elems) * es);
        let sc = &x.comm.single;
        let (a, b) = range(me);
        let half = (self.half / es).max(1) * es;
        let (acc, tmp) = self.scratch.split_at_mut(self.half);
        let mut at = a;
        while at < b {
            let c = half.min(b - at);
            let (acc, tmp) = (&mut acc[..c], &mut tmp[..c]);
            for p in 0..w {
                if p == me {
                    // SAFETY: bytes at..at+c of my slice, inside the
                    // caller's buffer (b <= len), read by no peer.
                    let own = unsafe { std::slice::from_raw_parts(self.base.add(at), c) };
                    if p == 0 {
                        acc.copy_from_slice(own);
                    } else {
                        reduce_into(acc, own, dt, op)?;
                    }
                } else {
                    let remote = x.source_of(p) + at as u64;
                    let dst = if p == 0 {
                        acc.as_mut_ptr()
                    } else {
                        tmp.as_mut_ptr()
                    };
                    // SAFETY: `dst` is c bytes of this call's scratch.
                    unsafe { sc.read(p, dst, remote, c, &name)? };
                    if p != 0 {
                        reduce_into(acc, tmp, dt, op)?;
                    }
                }
            }
            // SAFETY: my slice of the caller's buffer (at + c <= b <= len);
            // peers read it only after my `reduced`.
            unsafe { std::ptr::copy_nonoverlapping(acc.as_ptr(), self.base.add(at), c) };
            at += c;
        }
        x.publish_reduced();
        for p in x.comm.others() {
            let (a, b) = range(p);
            if b > a {
                x.wait_reduced(p)?;
                // SAFETY: slice p of the caller's buffer: p finished reading
                // it (its `reduced`) and nobody else reads it.
                unsafe { sc.read(p, self.base.add(a), x.source_of(p) + a as u64, b - a, &name)? };
            }
        }
        Ok(())
    }
}
