//! [`ShmCommunicator`]: collectives over host memory for a group on one host.
//!
//! # Workspace
//! One segment per communicator, created by rank 0 (see [`lines`] for where
//! everything lies). Each rank owns
//! * two collective buffers of `workspace_bytes` each (double buffering:
//!   step `k` uses buffer `k % 2`, so a rank may fill its next buffer while
//!   peers still read the previous one, with no extra barrier per chunk);
//! * for each other rank, an outgoing point-to-point channel of two slots of
//!   `p2p_bytes` each.
//!
//! Per rank: `2 * workspace_bytes + 2 * (W - 1) * p2p_bytes`. With the
//! defaults (1 MiB, 256 KiB) a group of 4 maps 8 MiB + 6 MiB.
//!
//! # Protocol
//! Every collective is a sequence of *steps* ([`steps`]), one per chunk
//! that fits the workspace, with a step number `k` every rank computes
//! identically. At each step a rank fills its buffer, publishes its
//! arrival line for `k` (the call's 64-byte [`CallDesc`](comm_core::CallDesc)
//! and how the step moves data), waits for every other rank's arrival and
//! compares their descriptions with its own (a difference is
//! [`CommError::CallMismatch`](comm_core::CommError) on every member), reads
//! what it needs, and publishes `done`. Before writing its buffer for step
//! `k` it waits until every rank's `done` reached `k - 2`.
//!
//! all_reduce reduces in the fixed rank order `0, 1, ..., W-1` (one-shot:
//! every rank reduces the whole chunk; two-shot: rank `r` reduces slice `r`,
//! then everyone copies every slice), so every rank gets bit-identical
//! results and the algorithms agree bit for bit.
//!
//! Point-to-point messages ([`p2p`]) go through per-pair channels, never
//! the collective buffers, and every send and receive of a batch progresses
//! together.
//!
//! # Single copy (optional)
//! See [`single_copy`]: blocks of at least
//! [`ShmOptions::single_copy_min_bytes`] are read straight from the peer's
//! memory with `process_vm_readv` when every member enabled it and could.

mod blocks;
mod lines;
mod p2p;
mod single_copy;
mod steps;

use std::time::Duration;

use comm_core::{
    BlockLayout, BufMut, BufRef, Call, Capabilities, CommError, Device, DeviceCommunicator,
    Missing, P2p, ReduceOp, Result, Store,
};

use crate::names::default_job_id;
use crate::segment::{Segment, SetupSpec, SpinPolicy, WaitFail, Watch, ABORTED};
use crate::wire::AbortRecord;
use lines::{Lines, Payload};

/// Options of a [`ShmCommunicator`]. Start from [`ShmOptions::default`]
/// and use the builder methods.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ShmOptions {
    /// Deadline of set-up (each call has its own, from the front).
    pub timeout: Duration,
    /// Bytes of each of a rank's two collective buffers (rounded up to 4 KiB,
    /// at least `64 * world`). Larger messages are chunked. Default 1 MiB
    /// (chunks that stay in L2/L3 beat bigger ones).
    pub workspace_bytes: usize,
    /// Bytes of each of the two slots of a point-to-point channel (rounded
    /// up to 4 KiB). Default 256 KiB.
    pub p2p_bytes: usize,
    /// all_reduce of at most this many bytes per chunk is one-shot; larger is
    /// reduce-scatter + all-gather. Default 128 KiB: on a 2-core VM two-shot
    /// was 1.3-1.6x faster at 256 KiB at world 2 and 4 and on par at
    /// 128 KiB, and one-shot 1.5x slower at 512 KiB-1 MiB.
    /// `DIST_SHM_ONE_SHOT_MAX=<bytes>` overrides it; the group uses the
    /// smallest value any member has.
    pub one_shot_max_bytes: usize,
    /// Store key prefix; communicators created with the same prefix on the
    /// same store are told apart by a per-rank instance counter.
    pub key_prefix: String,
    /// Group name used in messages.
    pub group_name: String,
    /// Job id, part of segment names ([`crate::default_job_id`]).
    pub job_id: String,
    /// Spin / yield / sleep policy of waits; `None`:
    /// [`SpinPolicy::for_members`]`(world)`.
    pub spin: Option<SpinPolicy>,
    /// When to move large blocks with one copy (Linux cross-memory attach,
    /// `process_vm_readv` straight from the peer's buffer) instead of two
    /// (see [`SingleCopyMode`]). Used only if every member's set-up probe
    /// read succeeded (it fails with `EPERM` under Yama `ptrace_scope >= 1`,
    /// in containers without `CAP_SYS_PTRACE`, or between users); the group
    /// uses the most restrictive mode any member has.
    /// `DIST_SHM_SINGLE_COPY=off|auto|on` (or `0` / `1`) overrides it.
    pub single_copy: SingleCopyMode,
    /// Single copy is used for blocks of at least this many bytes (what a
    /// receiver reads from one peer). The group uses the largest value any
    /// member has. `DIST_SHM_SINGLE_COPY_MIN=<bytes>` overrides it.
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
            single_copy: SingleCopyMode::Auto,
            single_copy_min_bytes: single_copy::DEFAULT_MIN,
        }
    }
}

impl ShmOptions {
    /// With a set-up deadline.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }
    /// With collective buffers of `b` bytes.
    pub fn workspace_bytes(mut self, b: usize) -> Self {
        self.workspace_bytes = b;
        self
    }
    /// With point-to-point slots of `b` bytes.
    pub fn p2p_bytes(mut self, b: usize) -> Self {
        self.p2p_bytes = b;
        self
    }
    /// With a one-shot all_reduce limit.
    pub fn one_shot_max_bytes(mut self, b: usize) -> Self {
        self.one_shot_max_bytes = b;
        self
    }
    /// With a store key prefix.
    pub fn key_prefix(mut self, p: impl Into<String>) -> Self {
        self.key_prefix = p.into();
        self
    }
    /// With a group name.
    pub fn group_name(mut self, n: impl Into<String>) -> Self {
        self.group_name = n.into();
        self
    }
    /// With a job id.
    pub fn job_id(mut self, j: impl Into<String>) -> Self {
        self.job_id = j.into();
        self
    }
    /// With a spin policy.
    pub fn spin(mut self, s: SpinPolicy) -> Self {
        self.spin = Some(s);
        self
    }
    /// With single copy in `mode` (`true`: [`SingleCopyMode::On`],
    /// `false`: [`SingleCopyMode::Off`]) for blocks of at least `min_bytes`.
    pub fn single_copy(mut self, mode: impl Into<SingleCopyMode>, min_bytes: usize) -> Self {
        self.single_copy = mode.into();
        self.single_copy_min_bytes = min_bytes;
        self
    }
}

/// When a group moves blocks by single copy (cross-memory attach) instead
/// of through the shared workspace.
///
/// Measured on a 2-core VM (see `benches/peers/README.md`): the pipelined
/// two-copy path was as fast or faster for every collective except
/// all_to_all, because `process_vm_readv` copies 4 KiB pages at about half
/// of `memcpy`'s speed; all_to_all by single copy (one step, each rank
/// reading its blocks straight from its peers) won for blocks of 32 to
/// 256 KiB with a core per rank, and from 512 KiB with more ranks than
/// cores (where the two-copy exchange needs every rank on a core at every
/// chunk).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SingleCopyMode {
    /// Never (no probe at set-up).
    Off,
    /// all_to_all blocks where single copy measured faster (the default):
    /// 32 to 256 KiB with a core per rank, 512 KiB and more when the group
    /// has more ranks than some member has cores.
    Auto,
    /// Every collective's blocks of at least the threshold.
    On,
}

impl From<bool> for SingleCopyMode {
    fn from(on: bool) -> Self {
        if on {
            SingleCopyMode::On
        } else {
            SingleCopyMode::Off
        }
    }
}

impl SingleCopyMode {
    fn code(self) -> u64 {
        match self {
            SingleCopyMode::Off => 0,
            SingleCopyMode::Auto => 1,
            SingleCopyMode::On => 2,
        }
    }

    fn from_code(c: u64) -> SingleCopyMode {
        match c {
            2 => SingleCopyMode::On,
            1 => SingleCopyMode::Auto,
            _ => SingleCopyMode::Off,
        }
    }

    /// `DIST_SHM_SINGLE_COPY`, if set to a known value.
    fn from_env() -> Option<SingleCopyMode> {
        match std::env::var("DIST_SHM_SINGLE_COPY").ok()?.trim() {
            "0" | "off" => Some(SingleCopyMode::Off),
            "1" | "on" => Some(SingleCopyMode::On),
            "auto" => Some(SingleCopyMode::Auto),
            _ => None,
        }
    }
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

const KIND_COMM: u32 = 0x434f_4d32; // "COM2"

/// A [`DeviceCommunicator`] for host memory whose members share one host,
/// moving data through one shared-memory segment. Use it behind the checked
/// front ([`comm_core::Communicator`]), e.g. through [`crate::ShmFactory`]:
///
/// ```no_run
/// use comm_core::{GroupContext, ReduceOp, Registry, Store};
/// use comm_shm::ShmFactory;
/// # fn f(store: std::sync::Arc<dyn Store>, rank: usize) -> comm_core::Result<()> {
/// let reg = Registry::new().with(ShmFactory::default());
/// let comm = reg.create("shm", &GroupContext::new(store, rank, 4))?;
/// let mut v = vec![rank as f32; 1024];
/// comm.all_reduce(&mut v, ReduceOp::Sum)?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct ShmCommunicator {
    seg: Option<Segment>,
    rank: usize,
    world: usize,
    lines: Lines,
    payload: Payload,
    one_shot_max: usize,
    group: String,
    step: u32,
    /// Chunks published to each peer / consumed from each peer.
    tx: Vec<u32>,
    rx: Vec<u32>,
    /// Scratch of the point-to-point progress loop (per message, per peer),
    /// reused from call to call.
    p2p_state: (Vec<p2p::Progress>, Vec<u8>),
    /// Peers not yet read at the current step (reused).
    pending: Vec<usize>,
    single: single_copy::SingleCopy,
}

fn align_up(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

/// Whom a set-up wait for step `target` blames among the members that did
/// not reach it (`late`: each with whether it reached step 1). When some
/// did not even reach the first step, only they are blamed: the others are
/// alive, and step 1 waits for a successor, so they are most likely stuck
/// behind them (the crash trials saw a rank frozen before step 1 blamed
/// together with its predecessor).
fn setup_culprits(late: Vec<(usize, bool)>, target: u32) -> Vec<usize> {
    let never: Vec<usize> = late.iter().filter(|(_, s1)| !s1).map(|(q, _)| *q).collect();
    if target > 1 && !never.is_empty() {
        never
    } else {
        late.into_iter().map(|(q, _)| q).collect()
    }
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
        let payload = Payload { world, ws, p2p };
        let mut c = ShmCommunicator {
            seg: None,
            rank,
            world,
            lines: Lines::new(world),
            payload,
            one_shot_max: env_usize("DIST_SHM_ONE_SHOT_MAX")
                .unwrap_or(opts.one_shot_max_bytes)
                .min(ws),
            group: opts.group_name.clone(),
            step: 0,
            tx: vec![0; world],
            rx: vec![0; world],
            p2p_state: (Vec::new(), Vec::new()),
            pending: Vec::with_capacity(world),
            single: single_copy::SingleCopy::off(world),
        };
        if world == 1 {
            return Ok(c);
        }
        let payload_bytes = payload.bytes().ok_or_else(|| {
            CommError::invalid(format!(
                "shm communicator `{}`: workspace of {ws} and p2p slots of {p2p} bytes overflow \
                 at world {world}",
                opts.group_name
            ))
        })?;
        let instance = store.add(&format!("{}/instance/{rank}", opts.key_prefix), 1)?;
        let spec = SetupSpec {
            store,
            key: format!("{}/{instance}/segment", opts.key_prefix),
            member: rank,
            members: world,
            ctrl_lines: c.lines.count(),
            payload_bytes,
            job_id: &opts.job_id,
            kind: KIND_COMM,
            timeout: opts.timeout,
            what: format!("shm communicator `{}`", opts.group_name),
            ranks: (0..world).collect(),
            policy: opts.spin.unwrap_or_else(|| SpinPolicy::for_members(world)),
        };
        c.seg = Some(Segment::establish(&spec)?);
        let want = SingleCopyMode::from_env().unwrap_or(opts.single_copy);
        let min = env_usize("DIST_SHM_SINGLE_COPY_MIN").unwrap_or(opts.single_copy_min_bytes);
        c.agree_settings(want, min, opts.timeout)?;
        tracing::debug!(
            "shm communicator `{}` rank {rank}/{world}: workspace 2 x {ws} B, p2p slots 2 x {p2p} B, \
             one-shot all_reduce up to {} B, single copy {}",
            c.group,
            c.one_shot_max,
            match (c.single.ops, c.single.a2a) {
                (true, _) => format!("on from {} B", c.single.min),
                (false, (a, b)) if a < b => format!("for all_to_all blocks of {a} to {b} B"),
                _ => "off".into(),
            }
        );
        Ok(c)
    }

    /// The set-up exchange on the probe lines: every member publishes its
    /// settings and a probe buffer, reads its successor's buffer with
    /// `process_vm_readv` (unless its single-copy mode is off), publishes
    /// the verdict, and takes the group's agreed values: single copy only if
    /// every member's probe succeeded, in the most restrictive mode, with
    /// the largest threshold; "oversubscribed" if any member has fewer cores
    /// than the group has ranks; the smallest one-shot limit.
    fn agree_settings(
        &mut self,
        want: SingleCopyMode,
        min: usize,
        timeout: Duration,
    ) -> Result<()> {
        let (w, me) = (self.world, self.rank);
        let dl = comm_core::Deadline::after(timeout);
        let what = format!("shm communicator `{}` set-up (settings)", self.group);
        for p in 0..w {
            self.single.pids[p] = self.seg().member_pid(p) as libc::pid_t;
        }
        let mine = single_copy::probe_pattern(me);
        let line = self.seg().flag(self.lines.probe(me));
        line.store_words(&[0, 0, 0, mine.as_ptr() as u64]);
        line.publish(1);
        let peer = (me + 1) % w;
        self.setup_wait(
            std::iter::once(peer),
            |q| self.lines.probe(q),
            1,
            &what,
            &dl,
        )?;
        let ok = want != SingleCopyMode::Off && {
            let addr = self.seg().flag(self.lines.probe(peer)).load_words::<4>()[3];
            let mut got = [0u64; 8];
            // SAFETY: `got` is 64 writable bytes of this process.
            let r = unsafe {
                self.single
                    .read(peer, got.as_mut_ptr().cast(), addr, 64, &what)
            };
            r.is_ok() && got == single_copy::probe_pattern(peer)
        };
        let one_shot = self.one_shot_max as u64;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let flags = u64::from(ok) | want.code() << 1 | u64::from(w > cores) << 3;
        line.store_words(&[flags, min as u64, one_shot]);
        line.publish(2);
        // Also guarantees my predecessor finished reading `mine`.
        self.setup_wait(self.others(), |q| self.lines.probe(q), 2, &what, &dl)?;
        let (mut all, mut mode, mut over) = (ok, want, w > cores);
        let (mut thr, mut os) = (min as u64, one_shot);
        for p in self.others() {
            let v = self.seg().flag(self.lines.probe(p)).load_words::<3>();
            all &= v[0] & 1 == 1;
            mode = mode.min(SingleCopyMode::from_code((v[0] >> 1) & 3));
            over |= v[0] >> 3 & 1 == 1;
            thr = thr.max(v[1]);
            os = os.min(v[2]);
        }
        std::hint::black_box(&mine);
        self.single.ops = all && mode == SingleCopyMode::On;
        self.single.a2a = match (all, mode, over) {
            (true, SingleCopyMode::Auto, true) => (single_copy::AUTO_OVERSUBSCRIBED, usize::MAX),
            (true, SingleCopyMode::Auto, false) => single_copy::AUTO_CORE_PER_RANK,
            _ => (usize::MAX, 0),
        };
        self.single.min = usize::try_from(thr).unwrap_or(usize::MAX).max(1);
        self.one_shot_max = usize::try_from(os).unwrap_or(0);
        Ok(())
    }

    fn setup_wait(
        &self,
        ranks: impl Iterator<Item = usize> + Clone,
        line: impl Fn(usize) -> usize,
        target: u32,
        what: &str,
        dl: &comm_core::Deadline,
    ) -> Result<()> {
        let seg = self.seg();
        for p in ranks.clone() {
            let f = seg.flag(line(p));
            if let Err(e) = seg.wait(f, || f.reached(target), Watch::One(p), dl, &|| {}) {
                let late = ranks
                    .clone()
                    .filter(|&q| !seg.flag(line(q)).reached(target))
                    .map(|q| (q, seg.flag(line(q)).reached(1)))
                    .collect();
                let blamed = setup_culprits(late, target);
                let missing = blamed
                    .into_iter()
                    .map(|q| Missing::new(q, "did not finish set-up"))
                    .collect();
                return Err(match e {
                    WaitFail::Timeout => CommError::timeout_ranks(what, dl.elapsed(), missing),
                    other => self.wait_error(other, what, missing),
                });
            }
        }
        Ok(())
    }

    /// Whether this group moves large blocks of some collective by single
    /// copy (cross-memory attach), as agreed by every member at set-up.
    pub fn single_copy_active(&self) -> bool {
        self.single.ops || self.single_copy_all_to_all()
    }

    /// Whether this group moves large all_to_all blocks by single copy.
    pub fn single_copy_all_to_all(&self) -> bool {
        self.single.ops || self.single.a2a.0 < self.single.a2a.1
    }

    /// Bytes of the payload area for a group (workspace + p2p channels).
    pub fn payload_bytes(world: usize, workspace_bytes: usize, p2p_bytes: usize) -> usize {
        Payload {
            world,
            ws: workspace_bytes,
            p2p: p2p_bytes,
        }
        .bytes()
        .unwrap_or(usize::MAX)
    }

    /// Bytes of each of the two collective buffers of a rank.
    pub fn workspace_bytes(&self) -> usize {
        self.payload.ws
    }

    /// The all_reduce one-shot limit the group agreed on.
    pub fn one_shot_max_bytes(&self) -> usize {
        self.one_shot_max
    }

    /// The mapped segment, if the group has more than one member.
    pub fn segment(&self) -> Option<&Segment> {
        self.seg.as_ref()
    }

    /// The segment. Only called on paths the front reaches with
    /// `world > 1`, which always have one.
    #[inline]
    fn seg(&self) -> &Segment {
        match &self.seg {
            Some(s) => s,
            None => panic!("shm communicator of world {} has no segment", self.world),
        }
    }

    fn others(&self) -> impl Iterator<Item = usize> + Clone {
        let (me, w) = (self.rank, self.world);
        (1..w).map(move |i| (me + i) % w)
    }

    /// The error for a failed wait in `op`; `missing` for timeouts.
    fn wait_error(&self, f: WaitFail, op: &str, missing: Vec<Missing>) -> CommError {
        match f {
            WaitFail::Timeout => CommError::timeout_ranks(op, Duration::ZERO, missing),
            WaitFail::Aborted(_) => match self.seg().abort_record() {
                Some(rec) if rec.member != self.rank => {
                    let culprits = rec.missing(|m| m);
                    CommError::peer_aborted(rec.member, op, rec.reason, culprits)
                }
                Some(_) => CommError::Aborted(format!(
                    "{op} on shm group `{}`: this rank aborted the group earlier",
                    self.group
                )),
                None => CommError::Aborted(format!(
                    "{op} on shm group `{}`: the group was aborted",
                    self.group
                )),
            },
            WaitFail::Lost { member, detail } => CommError::peer_lost(member, op, detail),
        }
    }

    /// The error for a failed wait of `call`.
    fn call_error(&self, call: &Call<'_>, f: WaitFail, missing: Vec<Missing>) -> CommError {
        match f {
            WaitFail::Timeout => call.timeout(missing),
            other => self.wait_error(other, &call.name(), missing),
        }
    }

    /// Waits until line `line(p)` of every rank `p` in `ranks` reached
    /// `target`; `detail(p)` says what a missing rank still owes.
    fn wait_lines(
        &self,
        call: &Call<'_>,
        ranks: impl Iterator<Item = usize> + Clone,
        line: impl Fn(usize) -> usize,
        target: u32,
        detail: &dyn Fn() -> String,
    ) -> Result<()> {
        self.wait_lines_among(call, ranks.clone(), ranks, line, target, detail)
    }

    /// [`wait_lines`](Self::wait_lines) for the ranks of `wait`, naming every
    /// rank of `among` that has not reached `target` when it fails.
    fn wait_lines_among(
        &self,
        call: &Call<'_>,
        wait: impl Iterator<Item = usize>,
        among: impl Iterator<Item = usize> + Clone,
        line: impl Fn(usize) -> usize,
        target: u32,
        detail: &dyn Fn() -> String,
    ) -> Result<()> {
        let seg = self.seg();
        for p in wait {
            let f = seg.flag(line(p));
            if f.reached(target) {
                continue;
            }
            let missing = || {
                among
                    .clone()
                    .filter(|&q| !seg.flag(line(q)).reached(target))
                    .collect::<Vec<_>>()
            };
            let on_sleep = || call.waiting(missing);
            if let Err(e) = seg.wait(
                f,
                || f.reached(target),
                Watch::One(p),
                &call.deadline,
                &on_sleep,
            ) {
                let m = missing()
                    .into_iter()
                    .map(|q| Missing::new(q, detail()))
                    .collect();
                return Err(self.call_error(call, e, m));
            }
        }
        Ok(())
    }
}

impl DeviceCommunicator for ShmCommunicator {
    fn backend(&self) -> &str {
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
    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::default();
        c.checks_calls = true;
        c.strided_all_to_all = true;
        c
    }

    fn all_reduce(&mut self, call: &Call<'_>, mut buf: BufMut<'_>, op: ReduceOp) -> Result<()> {
        let dt = buf.dtype();
        let data = buf.expect_host("all_reduce")?;
        if self.single.use_for(data.len() / self.world) {
            return self.all_reduce_single(call, data, dt, op);
        }
        self.all_reduce_copy(call, data, dt, op)
    }

    fn all_gather(
        &mut self,
        call: &Call<'_>,
        input: BufRef<'_>,
        mut output: BufMut<'_>,
    ) -> Result<()> {
        let inp = input.expect_host("all_gather")?;
        let out = output.expect_host("all_gather")?;
        self.gather_to(call, inp, Some(out), None)
    }

    fn reduce_scatter(
        &mut self,
        call: &Call<'_>,
        input: BufRef<'_>,
        mut output: BufMut<'_>,
        op: ReduceOp,
    ) -> Result<()> {
        let dt = input.dtype();
        let inp = input.expect_host("reduce_scatter")?;
        let out = output.expect_host("reduce_scatter")?;
        self.reduce_scatter_copy(call, inp, out, dt, op)
    }

    fn broadcast(&mut self, call: &Call<'_>, mut buf: BufMut<'_>, root: usize) -> Result<()> {
        let data = buf.expect_host("broadcast")?;
        self.broadcast_from(call, data, root)
    }

    fn gather(
        &mut self,
        call: &Call<'_>,
        input: BufRef<'_>,
        output: Option<BufMut<'_>>,
        root: usize,
    ) -> Result<()> {
        let inp = input.expect_host("gather")?;
        let out = match output {
            Some(o) => Some(o.into_host_bytes().ok_or_else(|| {
                CommError::invalid("gather: this backend moves host memory only")
            })?),
            None => None,
        };
        self.gather_to(call, inp, out, Some(root))
    }

    fn all_to_all(&mut self, call: &Call<'_>, input: BufRef<'_>, output: BufMut<'_>) -> Result<()> {
        let block = input.numel() / self.world;
        let l = BlockLayout::contiguous(block);
        self.all_to_all_strided(call, input, &l, output, &l)
    }

    fn all_to_all_strided(
        &mut self,
        call: &Call<'_>,
        input: BufRef<'_>,
        send: &BlockLayout,
        mut output: BufMut<'_>,
        recv: &BlockLayout,
    ) -> Result<()> {
        let es = input.dtype().size();
        let inp = input.expect_host("all_to_all")?;
        let out = output.expect_host("all_to_all")?;
        self.exchange_blocks(call, inp, send, out, recv, es)
    }

    fn send_recv(&mut self, call: &Call<'_>, ops: &mut [P2p<'_>]) -> Result<()> {
        self.progress_p2p(call, ops)
    }

    fn barrier(&mut self, call: &Call<'_>) -> Result<()> {
        self.sync_step(call)
    }

    fn abort(&mut self, why: &CommError) {
        let Some(seg) = &self.seg else { return };
        let culprits = why
            .culprits()
            .into_iter()
            .map(|r| r.group)
            .filter(|&r| r < self.world && r != self.rank)
            .collect();
        let rec = AbortRecord {
            member: self.rank,
            reason: why.to_string(),
            culprits,
        };
        if seg.set_abort(ABORTED, Some(&rec)) {
            tracing::debug!(
                "shm group `{}`: rank {} aborted the group: {why}",
                self.group,
                self.rank
            );
        }
    }

    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::setup_culprits;

    #[test]
    fn set_up_blames_the_members_the_others_wait_for() {
        // Rank 0 frozen before step 1; rank 3 (its predecessor) reached
        // step 1 and waits for it: only rank 0 is blamed at step 2.
        assert_eq!(setup_culprits(vec![(3, true), (0, false)], 2), [0]);
        // Everyone late reached step 1: all of them.
        assert_eq!(setup_culprits(vec![(1, true), (2, true)], 2), [1, 2]);
        // Waiting for step 1 itself: whoever is late.
        assert_eq!(setup_culprits(vec![(0, false)], 1), [0]);
    }
}
