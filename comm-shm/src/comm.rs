//! [`ShmCommunicator`]: collectives for host tensors of a group on one host.
//!
//! # Workspace
//! One segment per communicator, created by rank 0. Each rank owns
//! * two collective buffers of `workspace_bytes` each (double buffering:
//!   step `k` uses buffer `k % 2`, so a rank may fill its next buffer while
//!   peers still read the previous one, with no extra barrier per chunk);
//! * for each other rank, an outgoing point-to-point channel of two slots of
//!   `p2p_bytes` each.
//!
//! Per rank: `2 * workspace_bytes + 2 * (W - 1) * p2p_bytes`; per group `W`
//! times that plus `(3W + 2W(W-1))` 128-byte control lines. With the defaults
//! (1 MiB, 256 KiB) a group of 4 maps 8 MiB + 6 MiB.
//!
//! # Protocol
//! Every collective is split into chunks that fit the workspace; each chunk
//! is one *step* with a sequence number `k` that every rank computes
//! identically (it depends only on the sizes, which must match). Each rank has
//! three flags on their own cache lines: `arrive` (my input for step `k` is in
//! my buffer), `reduced` (my reduced slice for step `k` is in my buffer) and
//! `done` (I have finished reading everyone's buffers for step `k`). Before a
//! rank writes its buffer for step `k` it waits until its readers' `done`
//! reached `k - 2`. The flags carry a description of the call (operation,
//! dtype, op, root, size) so mismatched calls fail with a protocol error
//! instead of mixing data.
//!
//! all_reduce reduces in the fixed rank order `0, 1, ..., W-1` (one-shot: every
//! rank reduces the whole chunk; two-shot: rank `r` reduces slice `r`, then
//! everyone copies every slice), so every rank gets bit-identical results and
//! one-shot and two-shot agree bit for bit.
//!
//! # Single copy (optional)
//! With [`ShmOptions::single_copy`], and if every member's set-up probe could
//! `process_vm_readv` a peer, blocks of at least
//! [`ShmOptions::single_copy_min_bytes`] skip the workspace: a call is one
//! step whose `arrive` also publishes (on the rank's *address* line, by step
//! parity) the address of the rank's own tensor; readers copy their block
//! straight from the peer process into their destination, publish `done`,
//! and a source returns only once its readers are done, so the tensor is
//! never reused or freed while read. all_reduce reads slice `r` of every
//! peer into scratch (the rank's free workspace buffer) and reduces in rank
//! order, then reads the owners' reduced slices; results are bit-identical
//! to the two-copy path.

use std::time::Duration;

use comm_core::reduce::{finish_avg, reduce_into, reduce_pair_into};
use comm_core::{
    check, CommError, DType, Deadline, Device, DeviceCommunicator, ReduceOp, Result, Store, Tensor,
};

use crate::segment::{default_job_id, Segment, SetupSpec, SpinPolicy, WaitFail, Watch, ABORTED};

/// Options of a [`ShmCommunicator`].
#[derive(Debug, Clone)]
pub struct ShmOptions {
    /// Deadline of every blocking operation (set-up included).
    pub timeout: Duration,
    /// Bytes of each of a rank's two collective buffers (rounded up to 4 KiB,
    /// at least `64 * world`). Larger tensors are chunked. Default 1 MiB
    /// (chunks that stay in L2/L3 beat bigger ones).
    pub workspace_bytes: usize,
    /// Bytes of each of the two slots of a point-to-point channel (rounded
    /// up to 4 KiB). Default 256 KiB.
    pub p2p_bytes: usize,
    /// all_reduce of at most this many bytes per chunk is one-shot; larger is
    /// reduce-scatter + all-gather. Default 128 KiB: on a 2-core VM two-shot
    /// was 1.3-1.6x faster at 256 KiB at world 2 and 4 and on par at
    /// 128 KiB, and one-shot 1.5x slower at 512 KiB-1 MiB.
    /// `DIST_SHM_ONE_SHOT_MAX=<bytes>` in the environment overrides this (for
    /// tuning; every member must see the same value).
    pub one_shot_max_bytes: usize,
    /// Store key prefix; communicators created with the same prefix on the
    /// same store are told apart by a per-rank instance counter.
    pub key_prefix: String,
    /// Group name used in error messages.
    pub group_name: String,
    /// Job id, part of segment names (leak checks look for it).
    pub job_id: String,
    /// Spin / yield / sleep policy of waits; `None`:
    /// [`SpinPolicy::for_members`]`(world)`.
    pub spin: Option<SpinPolicy>,
    /// Move medium and large messages with one copy (Linux cross-memory
    /// attach, `process_vm_readv` straight from the peer's tensor) instead
    /// of two (into the shared workspace, then out). Probed collectively at
    /// set-up: used only if every member asked for it and every member's
    /// probe read succeeded (it fails with `EPERM` under Yama
    /// `ptrace_scope >= 1`, in containers without `CAP_SYS_PTRACE`, or
    /// between different users, and with `ENOSYS` where CMA is compiled
    /// out); otherwise the two-copy path is used.
    /// `DIST_SHM_SINGLE_COPY=0` / `=1` in the environment overrides this.
    ///
    /// Default **false**: measured on a 2-core VM, `process_vm_readv` copies
    /// at about 9 GB/s from cache-resident and 5.8 GB/s from DRAM-resident
    /// buffers, against 26-35 and 10 GB/s for `memcpy`, so the pipelined
    /// two-copy path (its chunks stay in L2) was faster at every size from
    /// 64 KiB to 64 MiB for every collective. Turn it on where the kernel's
    /// CMA copy is close to `memcpy` speed (measure with `comm-perf`).
    ///
    /// `DIST_SHM_SINGLE_COPY_MIN=<bytes>` overrides
    /// [`single_copy_min_bytes`](Self::single_copy_min_bytes) (for tuning).
    pub single_copy: bool,
    /// Single copy is used for blocks of at least this many bytes (the
    /// block a receiver reads from one peer: the whole tensor for
    /// broadcast, one input for all_gather/gather, one block for
    /// all_to_all, one 1/W slice for all_reduce). The group uses the
    /// largest value any member passed.
    pub single_copy_min_bytes: usize,
}

impl Default for ShmOptions {
    fn default() -> Self {
        ShmOptions {
            timeout: comm_core::default_timeout(),
            workspace_bytes: 1 << 20,
            p2p_bytes: 256 << 10,
            one_shot_max_bytes: 128 << 10,
            key_prefix: "shm".into(),
            group_name: "shm".into(),
            job_id: default_job_id(),
            spin: None,
            single_copy: false,
            single_copy_min_bytes: DEFAULT_SINGLE_COPY_MIN,
        }
    }
}

/// Default [`ShmOptions::single_copy_min_bytes`]: blocks large enough that
/// both paths stream from DRAM, where CMA's per-page cost matters least
/// (below this the two-copy path's L2-resident chunks win clearly).
const DEFAULT_SINGLE_COPY_MIN: usize = 4 << 20;
/// Bit of the call description set when the call moves data by single copy.
const META_CMA: u64 = 1 << 62;

const KIND_COMM: u32 = 0x434f_4d4d; // "COMM"

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    AllReduce = 1,
    AllGather = 2,
    ReduceScatter = 3,
    Broadcast = 4,
    Gather = 5,
    AllToAll = 6,
    Barrier = 7,
}

const OP_NAMES: [&str; 8] = [
    "?",
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "broadcast",
    "gather",
    "all_to_all",
    "barrier",
];

fn meta(op: Op, dt: DType, rop: Option<ReduceOp>, root: usize, bytes: usize) -> u64 {
    ((op as u64) << 56)
        | ((dt.code() as u64) << 52)
        | ((rop.map_or(15, |r| r.code()) as u64 & 15) << 48)
        | (((root & 0xff) as u64) << 40)
        | (bytes as u64 & ((1 << 40) - 1))
}

fn describe(m: u64) -> String {
    let op = OP_NAMES
        .get(((m >> 56) & 0x0f) as usize)
        .copied()
        .unwrap_or("?");
    let dt = DType::from_code(((m >> 52) & 15) as u8)
        .map(|d| d.name())
        .unwrap_or("?");
    format!(
        "{op}(dtype {dt}, op code {}, root {}, {} bytes{})",
        (m >> 48) & 15,
        (m >> 40) & 0xff,
        m & ((1 << 40) - 1),
        if m & META_CMA != 0 {
            ", single copy"
        } else {
            ""
        }
    )
}

/// A [`DeviceCommunicator`] for host tensors whose members share one host,
/// moving data through one shared-memory segment.
///
/// ```no_run
/// use comm_core::{DeviceCommunicator, ReduceOp, Tensor, Store};
/// use comm_shm::{ShmCommunicator, ShmOptions};
/// # fn f(store: &dyn Store, rank: usize) -> comm_core::Result<()> {
/// let mut c = ShmCommunicator::new(store, rank, 4, ShmOptions::default())?;
/// let mut t = Tensor::from_vec1(vec![rank as f32; 1024]);
/// c.all_reduce(&mut t, ReduceOp::Sum)?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct ShmCommunicator {
    seg: Option<Segment>,
    rank: usize,
    world: usize,
    ws: usize,
    p2p: usize,
    one_shot_max: usize,
    timeout: Duration,
    group: String,
    step: u32,
    tx: Vec<u32>,
    rx: Vec<u32>,
    /// Single copy agreed by every member at set-up.
    cma: bool,
    /// Smallest block moved by single copy (agreed by every member).
    cma_min: usize,
    /// Pid of each member's process (for `process_vm_readv`).
    pids: Vec<libc::pid_t>,
}

fn align_up(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

#[inline]
fn copy(dst: *mut u8, src: *const u8, n: usize) {
    // SAFETY: callers pass ranges inside a live mapping or a tensor, which
    // the step protocol guarantees no other member writes concurrently.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, n) }
}

impl ShmCommunicator {
    /// Joins (rank 0: creates) the shared-memory group `0..world` through
    /// `store`. Every member must call this concurrently with the same
    /// `world` and sizes in `opts`.
    pub fn new(store: &dyn Store, rank: usize, world: usize, opts: ShmOptions) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(CommError::invalid(format!(
                "shm communicator: rank {rank} is out of range for world {world}"
            )));
        }
        let ws = align_up(opts.workspace_bytes.max(64 * world).max(4096), 4096);
        let p2p = align_up(opts.p2p_bytes.max(4096), 4096);
        let mut c = ShmCommunicator {
            seg: None,
            rank,
            world,
            ws,
            p2p,
            one_shot_max: std::env::var("DIST_SHM_ONE_SHOT_MAX")
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(opts.one_shot_max_bytes)
                .min(ws),
            timeout: opts.timeout,
            group: opts.group_name.clone(),
            step: 0,
            tx: vec![0; world],
            rx: vec![0; world],
            cma: false,
            cma_min: usize::MAX,
            pids: vec![0; world],
        };
        if world == 1 {
            return Ok(c);
        }
        let instance = store.add(&format!("{}/instance/{rank}", opts.key_prefix), 1)?;
        let spec = SetupSpec {
            store,
            key: format!("{}/{instance}/segment", opts.key_prefix),
            member: rank,
            members: world,
            ctrl_flags: Self::cma_base(world) + 2 * world,
            payload_bytes: Self::payload_bytes(world, ws, p2p),
            job_id: &opts.job_id,
            kind: KIND_COMM,
            timeout: opts.timeout,
            what: format!("shm communicator `{}`", opts.group_name),
            labels: (0..world).map(|r| format!("rank {r}")).collect(),
            policy: opts.spin.unwrap_or_else(|| SpinPolicy::for_members(world)),
        };
        c.seg = Some(Segment::establish(&spec)?);
        let want = match std::env::var("DIST_SHM_SINGLE_COPY")
            .as_deref()
            .map(str::trim)
        {
            Ok("0") => false,
            Ok("1") => true,
            _ => opts.single_copy,
        };
        let dl = Deadline::after(opts.timeout);
        let min = std::env::var("DIST_SHM_SINGLE_COPY_MIN")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(opts.single_copy_min_bytes);
        c.probe_single_copy(want, min, &dl)?;
        Ok(c)
    }

    /// First control line after the p2p flags: `W` address lines (the
    /// source address a member publishes per step, by parity), then `W`
    /// probe lines.
    fn cma_base(world: usize) -> usize {
        3 * world + 2 * world * (world - 1)
    }

    #[inline]
    fn addr_line(&self, r: usize) -> usize {
        Self::cma_base(self.world) + r
    }

    #[inline]
    fn probe_line(&self, r: usize) -> usize {
        Self::cma_base(self.world) + self.world + r
    }

    fn probe_pattern(r: usize) -> [u64; 8] {
        std::array::from_fn(|i| 0x5ca1_ab1e_0000_0000 ^ ((r as u64) << 16) ^ i as u64)
    }

    /// The collective single-copy probe: every member publishes a small
    /// buffer, reads its successor's with `process_vm_readv`, publishes
    /// whether that worked (and its threshold), and waits for everyone's
    /// verdict. Single copy is on only if every member succeeded.
    fn probe_single_copy(&mut self, want: bool, min: usize, dl: &Deadline) -> Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        let (w, me) = (self.world, self.rank);
        for p in 0..w {
            self.pids[p] = self.seg().member_pid(p) as libc::pid_t;
        }
        let mine = Self::probe_pattern(me);
        let line = self.seg().flag(self.probe_line(me));
        line.aux[0].store(mine.as_ptr() as u64, Relaxed);
        line.publish(1);
        let peer = (me + 1) % w;
        let what = "single-copy probe";
        self.wait_flags(std::iter::once(peer), |q| self.probe_line(q), 1, what, dl)?;
        let ok = want && {
            let addr = self.seg().flag(self.probe_line(peer)).aux[0].load(Relaxed);
            let mut got = [0u64; 8];
            self.cma_read(peer, got.as_mut_ptr().cast(), addr, 64, what)
                .is_ok()
                && got == Self::probe_pattern(peer)
        };
        let thr = (min as u64).min((1 << 62) - 1);
        line.aux[1].store(((ok as u64) << 63) | thr, Relaxed);
        line.publish(2);
        // Also guarantees my predecessor finished reading `mine`.
        self.wait_flags(self.others(), |q| self.probe_line(q), 2, what, dl)?;
        let (mut all, mut thr) = (ok, thr);
        for p in self.others() {
            let v = self.seg().flag(self.probe_line(p)).aux[1].load(Relaxed);
            all &= v >> 63 == 1;
            thr = thr.max(v & ((1 << 62) - 1));
        }
        std::hint::black_box(&mine);
        self.cma = all;
        self.cma_min = usize::try_from(thr).unwrap_or(usize::MAX).max(1);
        Ok(())
    }

    /// Whether this group moves medium/large messages by single copy
    /// (cross-memory attach), as agreed by every member at set-up.
    pub fn single_copy_active(&self) -> bool {
        self.cma
    }

    /// Reads `len` bytes at address `remote` of member `p`'s process into
    /// `dst` with `process_vm_readv`, looping over partial reads.
    fn cma_read(&self, p: usize, dst: *mut u8, remote: u64, len: usize, op: &str) -> Result<()> {
        let mut done = 0usize;
        while done < len {
            let local = libc::iovec {
                // SAFETY: `done < len` and dst..dst+len is a valid range.
                iov_base: unsafe { dst.add(done) }.cast(),
                iov_len: len - done,
            };
            let rem = libc::iovec {
                iov_base: (remote as usize).wrapping_add(done) as *mut libc::c_void,
                iov_len: len - done,
            };
            // SAFETY: `local` describes memory this process owns and nothing
            // else touches during the call (the caller's destination); the
            // kernel validates the remote range against the peer's mappings
            // (a bad one is EFAULT, not undefined behaviour here).
            let r = unsafe { libc::process_vm_readv(self.pids[p], &local, 1, &rem, 1, 0) };
            if r > 0 {
                done += r as usize;
                continue;
            }
            let e = std::io::Error::last_os_error();
            let what = format!(
                "{op} on shm group `{}` (rank {} of {}): single-copy read of {} bytes from rank {p} \
                 (pid {}) at {:#x}",
                self.group,
                self.rank,
                self.world,
                len - done,
                self.pids[p],
                remote as usize + done
            );
            if r == 0 {
                return Err(CommError::Protocol(format!(
                    "{what}: the kernel read 0 bytes (the peer's buffer shrank or was unmapped?)"
                )));
            }
            return Err(match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ESRCH) => CommError::peer_lost(
                    p,
                    what,
                    format!("process {} no longer exists", self.pids[p]),
                ),
                Some(libc::EFAULT) => CommError::Protocol(format!(
                    "{what}: EFAULT, the peer's published buffer (or ours) is not mapped; \
                     was the tensor freed or resized during the call?"
                )),
                _ => CommError::io(what, e),
            });
        }
        Ok(())
    }

    /// Publishes `addr` (my source for step `k`) and arrives with `m`.
    #[inline]
    fn cma_publish(&self, k: u32, m: u64, addr: *const u8) {
        let f = self.seg().flag(self.addr_line(self.rank));
        f.aux[(k & 1) as usize].store(addr as u64, std::sync::atomic::Ordering::Relaxed);
        // The release store of `arrive` publishes the address too.
        self.arrive(k, m);
    }

    /// The source address `p` published for step `k` (after `wait_arrive`).
    #[inline]
    fn cma_addr(&self, p: usize, k: u32) -> u64 {
        self.seg().flag(self.addr_line(p)).aux[(k & 1) as usize]
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until every rank in `ranks` is done with step `k` (they read
    /// my source, which must not be reused or freed before).
    fn cma_wait_readers(
        &self,
        ranks: impl Iterator<Item = usize> + Clone,
        k: u32,
        op: &str,
        dl: &Deadline,
    ) -> Result<()> {
        self.wait_flags(ranks, |p| 3 * p + 2, k, op, dl)
    }

    #[inline]
    fn use_cma(&self, block: usize) -> bool {
        self.cma && block >= self.cma_min
    }

    /// Bytes of the payload area for a group (workspace + p2p channels).
    pub fn payload_bytes(world: usize, workspace_bytes: usize, p2p_bytes: usize) -> usize {
        2 * world * workspace_bytes + 2 * world * (world - 1) * p2p_bytes
    }

    /// Bytes of each of the two collective buffers of a rank.
    pub fn workspace_bytes(&self) -> usize {
        self.ws
    }

    /// The mapped segment, if the group has more than one member.
    pub fn segment(&self) -> Option<&Segment> {
        self.seg.as_ref()
    }

    /// Marks the group aborted: every member's current and later blocking
    /// calls fail with [`CommError::Aborted`].
    pub fn abort(&self) {
        if let Some(s) = &self.seg {
            s.set_abort(ABORTED);
        }
    }

    #[inline]
    fn seg(&self) -> &Segment {
        self.seg.as_ref().expect("world > 1 has a segment")
    }

    #[inline]
    fn buf(&self, r: usize, parity: u32) -> *mut u8 {
        // SAFETY: 2 * world buffers of ws bytes lie at the start of the payload.
        unsafe {
            self.seg()
                .payload()
                .add((2 * r + parity as usize) * self.ws)
        }
    }

    #[inline]
    fn slot(&self, s: usize, d: usize, j: u32) -> *mut u8 {
        let pair = self.pair(s, d);
        let off = 2 * self.world * self.ws + (2 * pair + j as usize) * self.p2p;
        // SAFETY: the p2p slots follow the buffers inside the payload.
        unsafe { self.seg().payload().add(off) }
    }

    #[inline]
    fn pair(&self, s: usize, d: usize) -> usize {
        s * (self.world - 1) + if d > s { d - 1 } else { d }
    }

    fn fail(&self, f: WaitFail, op: &str, dl: &Deadline, missing: Vec<String>) -> CommError {
        let what = format!(
            "{op} on shm group `{}` (rank {} of {})",
            self.group, self.rank, self.world
        );
        match f {
            WaitFail::Timeout => CommError::timeout(what, dl.elapsed(), missing),
            WaitFail::Aborted(_) => CommError::Aborted(format!("{what}: the group was aborted")),
            WaitFail::Lost { member, detail } => CommError::peer_lost(member, what, detail),
        }
    }

    /// Waits until flag `idx(p)` of every rank `p` in `ranks` reached `target`.
    fn wait_flags(
        &self,
        ranks: impl Iterator<Item = usize> + Clone,
        idx: impl Fn(usize) -> usize,
        target: u32,
        op: &str,
        dl: &Deadline,
    ) -> Result<()> {
        let seg = self.seg();
        for p in ranks.clone() {
            let f = seg.flag(idx(p));
            if f.reached(target) {
                continue;
            }
            if let Err(e) = seg.wait(f, || f.reached(target), Watch::One(p), dl) {
                let missing = ranks
                    .clone()
                    .filter(|&q| !seg.flag(idx(q)).reached(target))
                    .map(|q| format!("rank {q}"))
                    .collect();
                return Err(self.fail(e, op, dl, missing));
            }
        }
        Ok(())
    }

    fn others(&self) -> impl Iterator<Item = usize> + Clone {
        let (me, w) = (self.rank, self.world);
        (1..w).map(move |i| (me + i) % w)
    }

    #[inline]
    fn next_step(&mut self) -> u32 {
        self.step = self.step.wrapping_add(1);
        self.step
    }

    /// Before writing my buffer (or my `arrive` metadata) for step `k`:
    /// every other rank finished step `k - 2`. All ranks, not only this
    /// step's readers: whoever read my buffer at step `k - 2` may be anyone.
    fn wait_buffer_free(&self, k: u32, op: &str, dl: &Deadline) -> Result<()> {
        self.wait_flags(self.others(), |p| 3 * p + 2, k.wrapping_sub(2), op, dl)
    }

    #[inline]
    fn arrive(&self, k: u32, m: u64) {
        let f = self.seg().flag(3 * self.rank);
        f.aux[(k & 1) as usize].store(m, std::sync::atomic::Ordering::Relaxed);
        f.publish(k);
    }

    #[inline]
    fn done(&self, k: u32) {
        self.seg().flag(3 * self.rank + 2).publish(k);
    }

    fn wait_arrive(&self, p: usize, k: u32, m: u64, op: &str, dl: &Deadline) -> Result<()> {
        self.wait_flags(std::iter::once(p), |q| 3 * q, k, op, dl)?;
        let theirs =
            self.seg().flag(3 * p).aux[(k & 1) as usize].load(std::sync::atomic::Ordering::Relaxed);
        if theirs != m {
            return Err(CommError::Protocol(format!(
                "shm group `{}`: rank {} called {} while rank {p} called {}; every member must make \
                 the same calls with the same sizes in the same order",
                self.group,
                self.rank,
                describe(m),
                describe(theirs)
            )));
        }
        Ok(())
    }

    fn all_reduce_bytes(
        &mut self,
        bytes: &mut [u8],
        dt: DType,
        op: ReduceOp,
        dl: &Deadline,
    ) -> Result<()> {
        let (w, me, es) = (self.world, self.rank, dt.size());
        let n = bytes.len();
        let one_shot = n <= self.one_shot_max;
        let m = meta(Op::AllReduce, dt, Some(op), 0, n) | ((one_shot as u64) << 63);
        let chunk = (self.ws / es) * es;
        let name = "all_reduce";
        let mut off = 0;
        while off < n {
            let c = chunk.min(n - off);
            let k = self.next_step();
            let par = k & 1;
            self.wait_buffer_free(k, name, dl)?;
            let mine = self.buf(me, par);
            copy(mine, bytes[off..].as_ptr(), c);
            self.arrive(k, m);
            let dst = &mut bytes[off..off + c];
            if one_shot {
                for p in self.others() {
                    self.wait_arrive(p, k, m, name, dl)?;
                }
                // SAFETY: every buffer's first c bytes were published for step k
                // and are not rewritten before everyone's done reaches k.
                let src = |p: usize| unsafe { std::slice::from_raw_parts(self.buf(p, par), c) };
                reduce_pair_into(dst, src(0), src(1), dt, op)?;
                for p in 2..w {
                    reduce_into(dst, src(p), dt, op)?;
                }
            } else {
                let elems = c / es;
                let align = (64 / es).max(1);
                let per = align_up(elems.div_ceil(w), align);
                let range = |r: usize| {
                    let a = (r * per).min(elems) * es;
                    let b = ((r + 1) * per).min(elems) * es;
                    (a, b)
                };
                for p in self.others() {
                    self.wait_arrive(p, k, m, name, dl)?;
                }
                let (a, b) = range(me);
                if b > a {
                    // SAFETY: as above; slice `me` of every buffer is read only here.
                    let src = |p: usize| unsafe {
                        std::slice::from_raw_parts(self.buf(p, par).add(a), b - a)
                    };
                    let d = &mut dst[a..b];
                    reduce_pair_into(d, src(0), src(1), dt, op)?;
                    for p in 2..w {
                        reduce_into(d, src(p), dt, op)?;
                    }
                    // SAFETY: slice `me` of my own buffer is read by no one
                    // else until I publish `reduced`.
                    copy(unsafe { mine.add(a) }, d.as_ptr(), b - a);
                }
                self.seg().flag(3 * me + 1).publish(k);
                for p in self.others() {
                    let (a, b) = range(p);
                    if b > a {
                        self.wait_flags(std::iter::once(p), |q| 3 * q + 1, k, name, dl)?;
                        // SAFETY: published by p's `reduced` for step k.
                        copy(
                            dst[a..b].as_mut_ptr(),
                            unsafe { self.buf(p, par).add(a) },
                            b - a,
                        );
                    }
                }
            }
            self.done(k);
            off += c;
        }
        Ok(())
    }

    /// all_reduce by single copy, one step for the whole tensor: every rank
    /// publishes its tensor's address; rank `r` reads slice `r` of every
    /// peer's input straight from the peer (`process_vm_readv`) into
    /// scratch (its own free workspace buffer) and reduces in the fixed rank
    /// order `0..W`, writes the result into slice `r` of its tensor and
    /// publishes `reduced`; then every rank reads each owner's reduced slice
    /// from the owner's tensor. Rank `p`'s `reduced` also says it finished
    /// reading slice `p` of everyone's input, so that slice may then be
    /// overwritten. Each slice is reduced by one rank in rank order, so all
    /// ranks get the same bits as the two-copy path.
    fn all_reduce_cma(
        &mut self,
        bytes: &mut [u8],
        dt: DType,
        op: ReduceOp,
        dl: &Deadline,
    ) -> Result<()> {
        let (w, me, es) = (self.world, self.rank, dt.size());
        let n = bytes.len();
        let name = "all_reduce";
        let m = meta(Op::AllReduce, dt, Some(op), 0, n) | META_CMA;
        let elems = n / es;
        let align = (64 / es).max(1);
        let per = align_up(elems.div_ceil(w), align);
        let range = |r: usize| {
            let a = (r * per).min(elems) * es;
            let b = ((r + 1) * per).min(elems) * es;
            (a, b)
        };
        let k = self.next_step();
        // Also frees my buffer of this parity, used as scratch below.
        self.wait_buffer_free(k, name, dl)?;
        let base = bytes.as_mut_ptr();
        self.cma_publish(k, m, base);
        for p in self.others() {
            self.wait_arrive(p, k, m, name, dl)?;
        }
        let (a, b) = range(me);
        let half = self.ws / 2; // a multiple of 2048, so of every dtype size
        let scratch = self.buf(me, k & 1);
        // SAFETY: the second half of my ws-byte buffer.
        let tmp = unsafe { scratch.add(half) };
        let mut x = a;
        while x < b {
            let c = half.min(b - x);
            // Rank 0 accumulates in place (its own input is the first term).
            let acc = if me == 0 {
                // SAFETY: x + c <= b <= n, inside my tensor.
                unsafe { base.add(x) }
            } else {
                scratch
            };
            // SAFETY: `acc` is `c` bytes of my tensor's slice `me` (which no
            // peer reads before I publish `reduced`) or of my scratch half
            // (which no peer reads at this step); `tmp` is the other half.
            let (accs, tmps) = unsafe {
                (
                    std::slice::from_raw_parts_mut(acc, c),
                    std::slice::from_raw_parts_mut(tmp, c),
                )
            };
            for p in 0..w {
                let remote = self.cma_addr(p, k) + x as u64;
                if p == me {
                    if p != 0 {
                        // SAFETY: bytes x..x+c of my slice, not yet overwritten.
                        let own = unsafe { std::slice::from_raw_parts(base.add(x), c) };
                        reduce_into(accs, own, dt, op)?;
                    }
                } else if p == 0 {
                    self.cma_read(p, acc, remote, c, name)?;
                } else {
                    self.cma_read(p, tmp, remote, c, name)?;
                    reduce_into(accs, tmps, dt, op)?;
                }
            }
            if me != 0 {
                // SAFETY: as above; my slice `me`, read by no peer yet.
                copy(unsafe { base.add(x) }, acc, c);
            }
            x += c;
        }
        self.seg().flag(3 * me + 1).publish(k);
        for p in self.others() {
            let (a, b) = range(p);
            if b > a {
                self.wait_flags(std::iter::once(p), |q| 3 * q + 1, k, name, dl)?;
                // SAFETY: slice p of my tensor; p finished reading it (its
                // `reduced`), and no one else reads it.
                let dst = unsafe { base.add(a) };
                self.cma_read(p, dst, self.cma_addr(p, k) + a as u64, b - a, name)?;
            }
        }
        self.done(k);
        self.cma_wait_readers(self.others(), k, name, dl)
    }

    /// reduce_scatter and all_to_all share the "publish W blocks" layout.
    fn blocks_exchange(
        &mut self,
        input: &[u8],
        out: &mut [u8],
        dt: DType,
        op: Option<ReduceOp>,
        dl: &Deadline,
    ) -> Result<()> {
        let (w, me, es) = (self.world, self.rank, dt.size());
        // reduce_scatter: out is one block; all_to_all: out is w blocks.
        let mblk = input.len() / w;
        let (kind, name) = if op.is_some() {
            (Op::ReduceScatter, "reduce_scatter")
        } else {
            (Op::AllToAll, "all_to_all")
        };
        let m = meta(kind, dt, op, 0, input.len());
        let cb = (self.ws / w / es) * es;
        let mut off = 0;
        while off < mblk {
            let c = cb.min(mblk - off);
            let k = self.next_step();
            let par = k & 1;
            self.wait_buffer_free(k, name, dl)?;
            let mine = self.buf(me, par);
            for q in self.others() {
                // SAFETY: sub-block q of my buffer lies within ws bytes.
                copy(
                    unsafe { mine.add(q * cb) },
                    input[q * mblk + off..].as_ptr(),
                    c,
                );
            }
            self.arrive(k, m);
            let src = |p: usize| -> &[u8] {
                if p == me {
                    &input[me * mblk + off..me * mblk + off + c]
                } else {
                    // SAFETY: sub-block `me` of p's buffer was published for
                    // step k and is not rewritten before my done reaches k.
                    unsafe { std::slice::from_raw_parts(self.buf(p, par).add(me * cb), c) }
                }
            };
            match op {
                Some(op) => {
                    for p in self.others() {
                        self.wait_arrive(p, k, m, name, dl)?;
                    }
                    let dst = &mut out[off..off + c];
                    reduce_pair_into(dst, src(0), src(1), dt, op)?;
                    for p in 2..w {
                        reduce_into(dst, src(p), dt, op)?;
                    }
                }
                None => {
                    out[me * mblk + off..me * mblk + off + c].copy_from_slice(src(me));
                    for p in self.others() {
                        self.wait_arrive(p, k, m, name, dl)?;
                        out[p * mblk + off..p * mblk + off + c].copy_from_slice(src(p));
                    }
                }
            }
            self.done(k);
            off += c;
        }
        Ok(())
    }

    fn deadline(&self) -> Deadline {
        Deadline::after(self.timeout)
    }
}

impl DeviceCommunicator for ShmCommunicator {
    fn backend(&self) -> &'static str {
        "shm"
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn timeout(&self) -> Duration {
        self.timeout
    }
    fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    fn all_reduce(&mut self, tensor: &mut Tensor, op: ReduceOp) -> Result<()> {
        check::device("all_reduce", tensor, Device::Cpu)?;
        let dt = tensor.dtype();
        let bytes = tensor.as_bytes_mut()?;
        if self.world > 1 && !bytes.is_empty() {
            let dl = self.deadline();
            if self.use_cma(bytes.len() / self.world) {
                self.all_reduce_cma(bytes, dt, op, &dl)?;
            } else {
                self.all_reduce_bytes(bytes, dt, op, &dl)?;
            }
        }
        if op == ReduceOp::Avg {
            finish_avg(bytes, dt, self.world)?;
        }
        Ok(())
    }

    fn all_gather(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()> {
        check::device("all_gather", input, Device::Cpu)?;
        check::device("all_gather", output, Device::Cpu)?;
        check::gathered("all_gather", input, output, self.world)?;
        let dt = input.dtype();
        let inp = input.as_bytes()?;
        let out = output.as_bytes_mut()?;
        let (n, me) = (inp.len(), self.rank);
        out[me * n..(me + 1) * n].copy_from_slice(inp);
        if self.world == 1 || n == 0 {
            return Ok(());
        }
        let dl = self.deadline();
        let m = meta(Op::AllGather, dt, None, 0, n);
        if self.use_cma(n) {
            let (m, name) = (m | META_CMA, "all_gather");
            let k = self.next_step();
            self.wait_buffer_free(k, name, &dl)?;
            self.cma_publish(k, m, inp.as_ptr());
            for p in self.others() {
                self.wait_arrive(p, k, m, name, &dl)?;
                let dst = out[p * n..(p + 1) * n].as_mut_ptr();
                self.cma_read(p, dst, self.cma_addr(p, k), n, name)?;
            }
            self.done(k);
            return self.cma_wait_readers(self.others(), k, name, &dl);
        }
        let mut off = 0;
        while off < n {
            let c = self.ws.min(n - off);
            let k = self.next_step();
            let par = k & 1;
            self.wait_buffer_free(k, "all_gather", &dl)?;
            copy(self.buf(me, par), inp[off..].as_ptr(), c);
            self.arrive(k, m);
            for p in self.others() {
                self.wait_arrive(p, k, m, "all_gather", &dl)?;
                copy(out[p * n + off..].as_mut_ptr(), self.buf(p, par), c);
            }
            self.done(k);
            off += c;
        }
        Ok(())
    }

    fn reduce_scatter(&mut self, input: &Tensor, output: &mut Tensor, op: ReduceOp) -> Result<()> {
        check::device("reduce_scatter", input, Device::Cpu)?;
        check::device("reduce_scatter", output, Device::Cpu)?;
        check::scattered("reduce_scatter", input, output, self.world)?;
        let dt = input.dtype();
        let inp = input.as_bytes()?;
        let out = output.as_bytes_mut()?;
        if self.world == 1 {
            out.copy_from_slice(inp);
        } else if !out.is_empty() {
            let dl = self.deadline();
            self.blocks_exchange(inp, out, dt, Some(op), &dl)?;
        }
        if op == ReduceOp::Avg {
            finish_avg(out, dt, self.world)?;
        }
        Ok(())
    }

    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<()> {
        check::device("broadcast", tensor, Device::Cpu)?;
        check::root("broadcast", root, self.world)?;
        let dt = tensor.dtype();
        let bytes = tensor.as_bytes_mut()?;
        let n = bytes.len();
        if self.world == 1 || n == 0 {
            return Ok(());
        }
        let dl = self.deadline();
        let m = meta(Op::Broadcast, dt, None, root, n);
        if self.use_cma(n) {
            let (m, name) = (m | META_CMA, "broadcast");
            let k = self.next_step();
            if self.rank == root {
                self.wait_buffer_free(k, name, &dl)?;
                self.cma_publish(k, m, bytes.as_ptr());
                self.done(k);
                return self.cma_wait_readers(self.others(), k, name, &dl);
            }
            self.wait_arrive(root, k, m, name, &dl)?;
            self.cma_read(root, bytes.as_mut_ptr(), self.cma_addr(root, k), n, name)?;
            self.done(k);
            return Ok(());
        }
        let mut off = 0;
        while off < n {
            let c = self.ws.min(n - off);
            let k = self.next_step();
            let par = k & 1;
            if self.rank == root {
                self.wait_buffer_free(k, "broadcast", &dl)?;
                copy(self.buf(root, par), bytes[off..].as_ptr(), c);
                self.arrive(k, m);
            } else {
                self.wait_arrive(root, k, m, "broadcast", &dl)?;
                copy(bytes[off..].as_mut_ptr(), self.buf(root, par), c);
            }
            self.done(k);
            off += c;
        }
        Ok(())
    }

    fn gather(&mut self, input: &Tensor, output: Option<&mut Tensor>, root: usize) -> Result<()> {
        check::device("gather", input, Device::Cpu)?;
        check::root("gather", root, self.world)?;
        let dt = input.dtype();
        let inp = input.as_bytes()?;
        let n = inp.len();
        let me = self.rank;
        let mut out = if me == root {
            let o =
                output.ok_or_else(|| CommError::invalid("gather: the root must pass an output"))?;
            check::device("gather", o, Device::Cpu)?;
            check::gathered("gather", input, o, self.world)?;
            let out = o.as_bytes_mut()?;
            out[me * n..(me + 1) * n].copy_from_slice(inp);
            Some(out)
        } else {
            None
        };
        if self.world == 1 || n == 0 {
            return Ok(());
        }
        let dl = self.deadline();
        let m = meta(Op::Gather, dt, None, root, n);
        if self.use_cma(n) {
            let (m, name) = (m | META_CMA, "gather");
            let k = self.next_step();
            match out.as_deref_mut() {
                None => {
                    self.wait_buffer_free(k, name, &dl)?;
                    self.cma_publish(k, m, inp.as_ptr());
                    self.done(k);
                    return self.cma_wait_readers(std::iter::once(root), k, name, &dl);
                }
                Some(out) => {
                    for p in self.others() {
                        self.wait_arrive(p, k, m, name, &dl)?;
                        let dst = out[p * n..(p + 1) * n].as_mut_ptr();
                        self.cma_read(p, dst, self.cma_addr(p, k), n, name)?;
                    }
                    self.done(k);
                    return Ok(());
                }
            }
        }
        let mut off = 0;
        while off < n {
            let c = self.ws.min(n - off);
            let k = self.next_step();
            let par = k & 1;
            match out.as_deref_mut() {
                None => {
                    self.wait_buffer_free(k, "gather", &dl)?;
                    copy(self.buf(me, par), inp[off..].as_ptr(), c);
                    self.arrive(k, m);
                }
                Some(out) => {
                    for p in self.others() {
                        self.wait_arrive(p, k, m, "gather", &dl)?;
                        copy(out[p * n + off..].as_mut_ptr(), self.buf(p, par), c);
                    }
                }
            }
            self.done(k);
            off += c;
        }
        Ok(())
    }

    fn all_to_all(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()> {
        check::device("all_to_all", input, Device::Cpu)?;
        check::device("all_to_all", output, Device::Cpu)?;
        check::all_to_all(input, output, self.world)?;
        let dt = input.dtype();
        let inp = input.as_bytes()?;
        let out = output.as_bytes_mut()?;
        if self.world == 1 {
            out.copy_from_slice(inp);
            return Ok(());
        }
        if inp.is_empty() {
            return Ok(());
        }
        let dl = self.deadline();
        let (w, me, mblk) = (self.world, self.rank, inp.len() / self.world);
        if self.use_cma(mblk) {
            let name = "all_to_all";
            let m = meta(Op::AllToAll, dt, None, 0, inp.len()) | META_CMA;
            let k = self.next_step();
            self.wait_buffer_free(k, name, &dl)?;
            self.cma_publish(k, m, inp.as_ptr());
            out[me * mblk..(me + 1) * mblk].copy_from_slice(&inp[me * mblk..(me + 1) * mblk]);
            for p in self.others() {
                self.wait_arrive(p, k, m, name, &dl)?;
                let dst = out[p * mblk..(p + 1) * mblk].as_mut_ptr();
                let src = self.cma_addr(p, k) + (me * mblk) as u64;
                self.cma_read(p, dst, src, mblk, name)?;
            }
            debug_assert_eq!(out.len(), w * mblk);
            self.done(k);
            return self.cma_wait_readers(self.others(), k, name, &dl);
        }
        self.blocks_exchange(inp, out, dt, None, &dl)
    }

    fn send(&mut self, tensor: &Tensor, dst: usize) -> Result<()> {
        check::device("send", tensor, Device::Cpu)?;
        check::peer("send", dst, self.rank, self.world)?;
        let bytes = tensor.as_bytes()?;
        let n = bytes.len();
        let dl = self.deadline();
        let (sent, acked) = {
            let base = 3 * self.world + 2 * self.pair(self.rank, dst);
            (base, base + 1)
        };
        let chunks = n.div_ceil(self.p2p).max(1);
        for i in 0..chunks {
            let c = self.tx[dst];
            let a = acked;
            self.wait_flags(std::iter::once(dst), |_| a, c.wrapping_sub(1), "send", &dl)?;
            let (lo, hi) = (i * self.p2p, ((i + 1) * self.p2p).min(n));
            copy(
                self.slot(self.rank, dst, c & 1),
                bytes[lo..].as_ptr(),
                hi - lo,
            );
            let f = self.seg().flag(sent);
            f.aux[(c & 1) as usize].store(n as u64, std::sync::atomic::Ordering::Relaxed);
            f.publish(c.wrapping_add(1));
            self.tx[dst] = c.wrapping_add(1);
        }
        Ok(())
    }

    fn recv(&mut self, tensor: &mut Tensor, src: usize) -> Result<()> {
        check::device("recv", tensor, Device::Cpu)?;
        check::peer("recv", src, self.rank, self.world)?;
        let bytes = tensor.as_bytes_mut()?;
        let n = bytes.len();
        let dl = self.deadline();
        let (sent, acked) = {
            let base = 3 * self.world + 2 * self.pair(src, self.rank);
            (base, base + 1)
        };
        let chunks = n.div_ceil(self.p2p).max(1);
        for i in 0..chunks {
            let c = self.rx[src];
            self.wait_flags(
                std::iter::once(src),
                |_| sent,
                c.wrapping_add(1),
                "recv",
                &dl,
            )?;
            let total = self.seg().flag(sent).aux[(c & 1) as usize]
                .load(std::sync::atomic::Ordering::Relaxed);
            if total != n as u64 {
                return Err(CommError::shape(
                    "recv",
                    format!("{n} bytes (the receiving tensor)"),
                    format!("a message of {total} bytes from rank {src}"),
                ));
            }
            let (lo, hi) = (i * self.p2p, ((i + 1) * self.p2p).min(n));
            copy(
                bytes[lo..].as_mut_ptr(),
                self.slot(src, self.rank, c & 1),
                hi - lo,
            );
            self.seg().flag(acked).publish(c.wrapping_add(1));
            self.rx[src] = c.wrapping_add(1);
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let dl = self.deadline();
        let m = meta(Op::Barrier, DType::U8, None, 0, 0);
        let k = self.next_step();
        self.wait_buffer_free(k, "barrier", &dl)?;
        self.arrive(k, m);
        for p in self.others() {
            self.wait_arrive(p, k, m, "barrier", &dl)?;
        }
        self.done(k);
        Ok(())
    }
}
