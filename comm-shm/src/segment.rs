//! The substrate: shared-memory segments and cross-process waiting.
//!
//! # Segments
//! A segment is a shared-memory file created by one member, labelled
//! `/dshm.<job>.<pid>.<random>` (see [`crate::default_job_id`]), sized with
//! `ftruncate` + `fallocate` (so a shortage of memory, or of `/dev/shm`, is
//! an error at set-up, never a `SIGBUS` later) and mapped
//! `MAP_SHARED | MAP_POPULATE`. By default it is an anonymous memfd that
//! never has a name in `/dev/shm`, so nothing can be left behind however a
//! member ends, `SIGKILL` during set-up included; the fallback is a POSIX
//! shared-memory object (mode `0600`, `O_EXCL`) under that name
//! ([`Backing`], `DIST_SHM_BACKING`). Its locator travels through the
//! [`Store`]. Every member maps it, writes its pid into the member table
//! and increments the attach counter. Once the counter reaches the member
//! count the creator closes its descriptor of a memfd, or the member that
//! brought it there unlinks the name, so nothing is left in `/dev/shm` even
//! if every member is later killed with `SIGKILL`. If set-up fails (a
//! member never attaches before the deadline), the creator and every
//! attached member unlink a name too, and while set-up is in progress a
//! terminating signal unlinks it as well (see [`crate::segment_prefix`]).
//!
//! # Layout
//! ```text
//! line 0             header: magic, version, member count, total length, kind, job id
//! line 1             attach counter (a Flag)
//! line 2             abort flag (a Flag): 0 running, 1 aborted, 2 closed; word 0 claims it
//! lines 3..11        abort record: who aborted, why, whom it blamed
//! lines 11..11+n     member table: pid, exited flag (one 128-byte line each)
//! control lines      the owner's Flags, one 128-byte line each
//! payload            page aligned, owner-defined
//! ```
//!
//! # Waiting
//! A wait spins briefly (`spin_loop` hints), then yields the CPU,
//! then sleeps on a *shared* futex (no `FUTEX_PRIVATE_FLAG`, so it works across
//! processes) in slices of [`SpinPolicy::sleep_slice`], checking the abort flag,
//! the deadline and the liveness of the watched members between slices.
//! Publishers wake a flag's futex only when its `sleepers` count says someone
//! sleeps there, so the fast path is one store and one fence.

use std::hint::spin_loop;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, AtomicU8, Ordering::*};
use std::time::{Duration, Instant};

use comm_core::{CommError, Deadline, Result, Store};
use rustix::fs::FallocateFlags;
use rustix::io::Errno;
use rustix::shm;
use rustix::thread::futex;

use crate::backing::{self, Backing};
use crate::names::{new_name, SHM_DIR};
use crate::wire::{AbortRecord, SegmentHeader, ABORT_BYTES};

/// Cache-line size assumed for isolation (128 covers Apple/ARM big cores and
/// x86's adjacent-line prefetcher).
pub const LINE: usize = 128;
const PAGE: usize = 4096;
const MAGIC: u64 = u64::from_le_bytes(*b"DSHMSEG2");
const VERSION: u32 = 2;
const JOB_BYTES: usize = 48;
const ABORT_LINES: usize = ABORT_BYTES / LINE;
/// First line of the member table.
const MEMBERS_AT: usize = 3 + ABORT_LINES;
/// Most members of one segment.
pub const MAX_MEMBERS: usize = 4096;

/// Abort flag value: running.
pub(crate) const RUNNING: u32 = 0;
/// Abort flag value: some member aborted.
pub(crate) const ABORTED: u32 = 1;
/// Abort flag value: the owner closed the object (queue shutdown).
pub(crate) const CLOSED: u32 = 2;

/// Data words of a [`Flag`] line.
pub const FLAG_WORDS: usize = 15;

/// A cross-process flag on its own cache line: a 32-bit sequence word that is
/// also the futex word, a count of sleepers, and data words published with
/// `seq`'s release store (written before it, read after an acquire load of
/// it), so a waiter gets the flag and what it announces in one line.
#[repr(C, align(128))]
#[derive(Debug)]
pub struct Flag {
    /// The sequence / futex word.
    pub seq: AtomicU32,
    /// Number of waiters sleeping (or about to sleep) in `futex_wait` on `seq`.
    pub sleepers: AtomicU32,
    /// Data words, written before `seq` is published.
    pub words: [AtomicU64; FLAG_WORDS],
}

const _: () = assert!(std::mem::size_of::<Flag>() == LINE);

impl Flag {
    /// Release-stores `v` into `seq` and wakes sleepers, if any.
    #[inline]
    pub fn publish(&self, v: u32) {
        self.seq.store(v, Release);
        self.wake_if_sleeping();
    }

    /// Wakes every sleeper on `seq` if the sleepers count is non-zero.
    ///
    /// The SeqCst fence pairs with the one in the waiter (increment sleepers,
    /// fence, re-read): either we see its increment or it sees our store.
    #[inline]
    pub fn wake_if_sleeping(&self) {
        fence(SeqCst);
        if self.sleepers.load(Relaxed) != 0 {
            let _ = futex::wake(&self.seq, futex::Flags::empty(), i32::MAX as u32);
        }
    }

    /// True once `seq` has reached `target` (wrapping comparison), acquire.
    #[inline]
    pub fn reached(&self, target: u32) -> bool {
        (self.seq.load(Acquire).wrapping_sub(target) as i32) >= 0
    }

    /// Stores `w` into the first data words (relaxed: publish with `seq`).
    #[inline]
    pub(crate) fn store_words(&self, w: &[u64]) {
        for (d, s) in self.words.iter().zip(w) {
            d.store(*s, Relaxed);
        }
    }

    /// Loads the first `N` data words (relaxed: after an acquire of `seq`).
    #[inline]
    pub(crate) fn load_words<const N: usize>(&self) -> [u64; N] {
        std::array::from_fn(|i| self.words.get(i).map_or(0, |w| w.load(Relaxed)))
    }
}

#[repr(C, align(128))]
struct Meta {
    magic: AtomicU64,
    total_len: AtomicU64,
    version: AtomicU32,
    members: AtomicU32,
    kind: AtomicU32,
    ctrl_lines: AtomicU32,
    job_len: AtomicU32,
    job: [AtomicU8; JOB_BYTES],
}

#[repr(C, align(128))]
struct Member {
    pid: AtomicU32,
    exited: AtomicU32,
}

/// How a waiter burns (or does not burn) CPU while it waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpinPolicy {
    /// Maximum busy-poll iterations (with a `spin_loop` hint each) before
    /// yielding. The actual budget adapts between 16 and this: it doubles
    /// after a wait the spin satisfied and halves after one that was not.
    pub spin_iters: u32,
    /// How long to poll with `sched_yield` between checks before sleeping.
    /// Oversubscribed groups (more ranks than cores) progress through this.
    pub yield_for: Duration,
    /// Futex sleep slice; between slices the waiter checks abort, deadline
    /// and peer liveness. Bounds how fast a dead peer is noticed.
    pub sleep_slice: Duration,
}

impl Default for SpinPolicy {
    fn default() -> Self {
        SpinPolicy {
            spin_iters: 256,
            yield_for: Duration::from_micros(500),
            sleep_slice: Duration::from_millis(50),
        }
    }
}

impl SpinPolicy {
    /// The policy for `members` processes on this host: up to 4000 spins
    /// (tens of microseconds) when every member can have a core, 16
    /// when the group is oversubscribed; the adaptive budget then shrinks
    /// the spin whenever waits are long, so the member holding the CPU is
    /// the one with work to do.
    ///
    /// `DIST_SHM_SPIN=<iterations>` overrides the spin maximum (for tuning).
    pub fn for_members(members: usize) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let spin_iters = std::env::var("DIST_SHM_SPIN")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(if members <= cores { 4000 } else { 16 });
        SpinPolicy {
            spin_iters,
            ..Self::default()
        }
    }
}

/// Members a waiter checks for liveness while it sleeps.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Watch<'a> {
    /// One member.
    One(usize),
    /// These members (a batch of point-to-point messages watches only the
    /// peers it still exchanges with: a peer that finished its part and
    /// left is no failure).
    Members(&'a [usize]),
    /// Everyone but me.
    Others,
}

/// Why a wait failed; owners turn it into a [`CommError`] with context.
#[derive(Debug)]
pub(crate) enum WaitFail {
    Timeout,
    Aborted(u32),
    Lost { member: usize, detail: String },
}

/// Throttles slow-wait reports of waits that have no [`comm_core::Call`]
/// (set-up, message queues): the first after
/// [`SLOW_WAIT_REPORT`](comm_core::SLOW_WAIT_REPORT), then one per interval.
#[derive(Debug)]
pub(crate) struct SlowWait(std::cell::Cell<Instant>);

impl SlowWait {
    pub(crate) fn new() -> Self {
        SlowWait(std::cell::Cell::new(
            Instant::now() + comm_core::SLOW_WAIT_REPORT,
        ))
    }

    /// Runs `report` when the next report is due.
    pub(crate) fn tick(&self, report: impl FnOnce()) {
        let now = Instant::now();
        if now >= self.0.get() {
            self.0.set(now + comm_core::SLOW_WAIT_REPORT);
            report();
        }
    }
}

/// What one member needs to create or attach a segment.
pub(crate) struct SetupSpec<'a> {
    pub store: &'a dyn Store,
    pub key: String,
    pub member: usize,
    pub members: usize,
    pub ctrl_lines: usize,
    pub payload_bytes: usize,
    pub job_id: &'a str,
    pub kind: u32,
    pub timeout: Duration,
    /// For errors: what is being set up (e.g. `shm communicator `tp``).
    pub what: String,
    /// Rank (as errors name it) of each member.
    pub ranks: Vec<usize>,
    pub policy: SpinPolicy,
}

/// One member's mapping of a segment.
#[derive(Debug)]
pub struct Segment {
    map: memmap2::MmapMut,
    base: *mut u8,
    name: String,
    me: usize,
    n: usize,
    nlines: usize,
    ctrl_off: usize,
    payload_off: usize,
    payload_len: usize,
    my_pid: u32,
    policy: SpinPolicy,
    /// Adaptive spin budget (`16..=policy.spin_iters`): doubled after a wait
    /// that the spin satisfied, halved after one that had to yield or sleep,
    /// so that a loaded or oversubscribed host stops burning the CPU that
    /// the awaited member needs.
    spin_budget: AtomicU32,
}

// SAFETY: `base` points into `map`, which lives as long as the Segment; all
// shared state behind it is accessed through atomics or under the owners'
// acquire/release protocols.
unsafe impl Send for Segment {}
// SAFETY: as above; `&Segment` only hands out atomics and raw pointers.
unsafe impl Sync for Segment {}

fn align_up(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

/// (control lines offset, payload offset, total length), or `None` when the
/// sizes overflow.
fn layout(members: usize, ctrl_lines: usize, payload: usize) -> Option<(usize, usize, usize)> {
    let ctrl = MEMBERS_AT.checked_add(members)?.checked_mul(LINE)?;
    let payload_off = align_up(ctrl.checked_add(ctrl_lines.checked_mul(LINE)?)?, PAGE);
    let total = align_up(payload_off.checked_add(payload)?, PAGE);
    Some((ctrl, payload_off, total))
}

fn grow_hint(bytes: usize) -> String {
    format!(
        "this segment needs {bytes} bytes ({:.1} MiB). Grow /dev/shm (docker: `--shm-size=2g` or more; \
         Kubernetes: an emptyDir with medium Memory mounted at /dev/shm; a host: \
         `mount -o remount,size=8G /dev/shm`) or lower the workspace/ring sizes in the options",
        bytes as f64 / (1024.0 * 1024.0)
    )
}

/// Errors (with what to do) unless a segment of `bytes` fits where this
/// process makes segments: `/dev/shm` must have `bytes` free for a named
/// segment ([`Backing::Named`]); a memfd segment is bounded by memory only,
/// and a shortage of that is an error when it is reserved at set-up.
pub fn check_free_space(bytes: usize) -> Result<()> {
    if Backing::configured()? == Backing::Memfd {
        return Ok(());
    }
    check_named_space(bytes)
}

fn check_named_space(bytes: usize) -> Result<()> {
    let st = rustix::fs::statvfs(SHM_DIR).map_err(|e| {
        CommError::unavailable(
            "shm",
            format!("cannot stat {SHM_DIR} ({e}); POSIX shared memory needs a tmpfs mounted there"),
        )
    })?;
    let avail = st.f_bavail.saturating_mul(st.f_frsize);
    if avail < bytes as u64 {
        return Err(CommError::unavailable(
            "shm",
            format!(
                "{SHM_DIR} has only {avail} bytes free, but {}",
                grow_hint(bytes)
            ),
        ));
    }
    Ok(())
}

fn errno_io(e: Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.raw_os_error())
}

fn map_fd(fd: &rustix::fd::OwnedFd, len: usize, name: &str) -> Result<memmap2::MmapMut> {
    // SAFETY: the file is a shared-memory object of at least `len` bytes that
    // only members of this job map; concurrent access goes through atomics
    // and the owners' acquire/release protocols.
    unsafe { memmap2::MmapOptions::new().len(len).populate().map_mut(fd) }.map_err(|e| {
        CommError::io(
            format!("mapping shared-memory segment {name} ({len} bytes)"),
            e,
        )
    })
}

/// Returns `Some(detail)` if process `pid` is gone (no such process, or a zombie).
pub(crate) fn process_gone(pid: u32) -> Option<String> {
    let p = rustix::process::Pid::from_raw(pid as i32)?;
    if let Err(Errno::SRCH) = rustix::process::test_kill_process(p) {
        return Some(format!("process {pid} no longer exists"));
    }
    if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        if let Some((_, rest)) = s.rsplit_once(')') {
            if let Some(c @ ('Z' | 'X')) = rest.trim_start().chars().next() {
                return Some(format!("process {pid} has exited (state {c})"));
            }
        }
    }
    None
}

impl Segment {
    /// Creates (member 0) or attaches (others) the segment described by
    /// `spec`, returning once every member has attached and the name is
    /// unlinked.
    pub(crate) fn establish(spec: &SetupSpec<'_>) -> Result<Segment> {
        let dl = Deadline::after(spec.timeout);
        if spec.members > MAX_MEMBERS || spec.members < 2 {
            return Err(CommError::invalid(format!(
                "{}: a segment has 2 to {MAX_MEMBERS} members, not {}",
                spec.what, spec.members
            )));
        }
        // Every member reads the setting, so a bad one fails them all at
        // once rather than leaving the others to wait for the creator.
        Backing::configured()?;
        let t0 = Instant::now();
        let seg = if spec.member == 0 {
            Self::create(spec, &dl)?
        } else {
            Self::attach(spec, &dl)?
        };
        tracing::debug!(
            "{}: member {} of {} set up segment {} ({} bytes) in {:.1?}",
            spec.what,
            spec.member,
            spec.members,
            seg.name,
            seg.map.len(),
            t0.elapsed()
        );
        Ok(seg)
    }

    fn expected_header(spec: &SetupSpec<'_>, total: usize) -> SegmentHeader {
        SegmentHeader {
            magic: MAGIC,
            version: VERSION,
            members: spec.members as u32,
            kind: spec.kind,
            ctrl_lines: spec.ctrl_lines as u32,
            total_len: total as u64,
        }
    }

    fn sizes(spec: &SetupSpec<'_>) -> Result<(usize, usize, usize)> {
        layout(spec.members, spec.ctrl_lines, spec.payload_bytes)
            .filter(|&(_, _, t)| t <= isize::MAX as usize && u32::try_from(spec.ctrl_lines).is_ok())
            .ok_or_else(|| {
                CommError::invalid(format!(
                    "{}: a segment of {} members, {} control lines and {} payload bytes is too large",
                    spec.what, spec.members, spec.ctrl_lines, spec.payload_bytes
                ))
            })
    }

    fn new_mapping(
        map: memmap2::MmapMut,
        name: String,
        spec: &SetupSpec<'_>,
        ctrl_off: usize,
        payload_off: usize,
    ) -> Segment {
        let mut map = map;
        let base = map.as_mut_ptr();
        let total = map.len();
        Segment {
            map,
            base,
            name,
            me: spec.member,
            n: spec.members,
            nlines: spec.ctrl_lines,
            ctrl_off,
            payload_off,
            payload_len: total - payload_off,
            my_pid: std::process::id(),
            policy: spec.policy,
            spin_budget: AtomicU32::new(spec.policy.spin_iters),
        }
    }

    fn create(spec: &SetupSpec<'_>, dl: &Deadline) -> Result<Segment> {
        let (ctrl_off, payload_off, total) = Self::sizes(spec)?;
        let name = new_name(spec.job_id)?;
        let file = backing::create(&name)?;
        if file.backing == Backing::Named {
            // Not `check_free_space`: a memfd refused by the kernel falls
            // back to a name whatever the setting.
            check_named_space(total)?;
        }
        let fd = &file.fd;
        let short = |what: &str| {
            format!(
                "{what} {name}: {}",
                match file.backing {
                    Backing::Named => grow_hint(total),
                    Backing::Memfd => format!("not enough memory for its {total} bytes"),
                }
            )
        };
        rustix::fs::ftruncate(fd, total as u64)
            .map_err(|e| CommError::io(short("sizing"), errno_io(e)))?;
        match rustix::fs::fallocate(fd, FallocateFlags::empty(), 0, total as u64) {
            Ok(()) | Err(Errno::OPNOTSUPP) | Err(Errno::NOSYS) => {}
            Err(Errno::NOSPC) | Err(Errno::NOMEM) => {
                return Err(CommError::unavailable(
                    "shm",
                    format!(
                        "{} is full: {}",
                        backing::source(file.backing),
                        short("reserving")
                    ),
                ))
            }
            Err(e) => return Err(CommError::io(format!("reserving {name}"), errno_io(e))),
        }
        let map = map_fd(fd, total, &name)?;
        let seg = Self::new_mapping(map, name, spec, ctrl_off, payload_off);
        let h = Self::expected_header(spec, total);
        let m = seg.meta();
        m.total_len.store(h.total_len, Relaxed);
        m.version.store(h.version, Relaxed);
        m.members.store(h.members, Relaxed);
        m.kind.store(h.kind, Relaxed);
        m.ctrl_lines.store(h.ctrl_lines, Relaxed);
        let jb = spec.job_id.as_bytes();
        let jl = jb.len().min(JOB_BYTES);
        for (d, s) in m.job.iter().zip(&jb[..jl]) {
            d.store(*s, Relaxed);
        }
        m.job_len.store(jl as u32, Relaxed);
        m.magic.store(h.magic, Release);
        seg.member(0).pid.store(seg.my_pid, Release);
        seg.attached().publish(1);
        spec.store.set(&spec.key, file.locator.as_bytes())?;
        seg.await_attach(spec, dl)?;
        // Closes the creator's descriptor (memfd) or unlinks the name.
        drop(file);
        Ok(seg)
    }

    fn attach(spec: &SetupSpec<'_>, dl: &Deadline) -> Result<Segment> {
        // The locator comes from member 0, the creator: a creator that never
        // publishes it (frozen, killed, or elsewhere in its program) is the
        // rank the timeout names, not the store key.
        let raw = spec.store.get(&spec.key, dl.remaining()).map_err(|e| {
            e.blaming(
                spec.ranks.first().copied().unwrap_or(0),
                format!(
                    "did not create the segment (store key `{}` never set)",
                    spec.key
                ),
                format!("{} set-up", spec.what),
            )
        })?;
        let locator = String::from_utf8_lossy(&raw);
        let Some(file) = backing::open(&locator, &spec.key, &spec.what)? else {
            return Err(Self::gone(spec, &locator));
        };
        let name = file.name.clone();
        let st = rustix::fs::fstat(&file.fd)
            .map_err(|e| CommError::io(format!("stat of {name}"), errno_io(e)))?;
        let (ctrl_off, payload_off, total) = Self::sizes(spec)?;
        let file_len = u64::try_from(st.st_size).unwrap_or(0);
        if file_len != total as u64 {
            return Err(CommError::Protocol(format!(
                "{}: segment {name} is {file_len} bytes but member {} expects {total}; do all \
                 members pass the same sizes and options?",
                spec.what, spec.member
            )));
        }
        let map = map_fd(&file.fd, total, &name)?;
        let seg = Self::new_mapping(map, name, spec, ctrl_off, payload_off);
        seg.header()
            .check(&Self::expected_header(spec, total), file_len, &spec.what)?;
        seg.member(spec.member).pid.store(seg.my_pid, Release);
        let a = seg.attached().seq.fetch_add(1, AcqRel) + 1;
        seg.attached().wake_if_sleeping();
        if a as usize == spec.members {
            file.all_attached();
        }
        seg.await_attach(spec, dl)?;
        file.succeeded();
        Ok(seg)
    }

    /// Why the segment at `locator` could not be found: its creator died
    /// before every member attached (a memfd goes with its creator's
    /// descriptor; a name with its signal handler), which names that rank,
    /// or it gave up, or the store key is stale.
    fn gone(spec: &SetupSpec<'_>, locator: &str) -> CommError {
        let loc = backing::Locator::parse(locator);
        let name = loc.as_ref().map_or(locator, |l| l.name());
        if let Some(detail) = loc
            .as_ref()
            .and_then(backing::creator_of)
            .and_then(process_gone)
        {
            return CommError::peer_lost(
                spec.ranks.first().copied().unwrap_or(0),
                format!("{} set-up", spec.what),
                format!(
                    "{detail}: it created segment {name} and ended before every member attached \
                     (or store key `{}` is left over from an earlier group)",
                    spec.key
                ),
            );
        }
        CommError::State(format!(
            "{}: segment {name} (from store key `{}`) no longer exists: its creator gave up \
             (set-up deadline passed, or it was stopped) or the key is left over from an \
             earlier group; use a fresh key prefix per communicator",
            spec.what, spec.key
        ))
    }

    /// The header as found in the mapping.
    fn header(&self) -> SegmentHeader {
        let m = self.meta();
        SegmentHeader {
            magic: m.magic.load(Acquire),
            version: m.version.load(Relaxed),
            members: m.members.load(Relaxed),
            kind: m.kind.load(Relaxed),
            ctrl_lines: m.ctrl_lines.load(Relaxed),
            total_len: m.total_len.load(Relaxed),
        }
    }

    fn await_attach(&self, spec: &SetupSpec<'_>, dl: &Deadline) -> Result<()> {
        let n = spec.members as u32;
        let att = self.attached();
        let rank = |i: usize| spec.ranks.get(i).copied().unwrap_or(i);
        let missing = || -> Vec<usize> {
            (0..spec.members)
                .filter(|&i| self.member(i).pid.load(Acquire) == 0)
                .map(rank)
                .collect()
        };
        let slow = SlowWait::new();
        let on_sleep = || {
            slow.tick(|| {
                tracing::warn!(
                    "{}: still waiting for ranks {:?} to attach ({:.0?} so far)",
                    spec.what,
                    missing(),
                    dl.elapsed()
                )
            })
        };
        let r = self.wait(
            att,
            || att.seq.load(Acquire) >= n,
            Watch::Others,
            dl,
            &on_sleep,
        );
        let Err(fail) = r else { return Ok(()) };
        // Set-up failed: make sure the name is gone and tell the others.
        let _ = shm::unlink(self.name.as_str());
        let absent: Vec<usize> = (0..spec.members)
            .filter(|&i| self.member(i).pid.load(Acquire) == 0)
            .collect();
        let missing: Vec<comm_core::Missing> = absent
            .iter()
            .map(|&i| comm_core::Missing::new(rank(i), "did not attach"))
            .collect();
        let op = format!("{} set-up", spec.what);
        let culprits = match &fail {
            WaitFail::Lost { member, .. } => vec![*member],
            _ => absent,
        };
        let e = match fail {
            WaitFail::Timeout => CommError::timeout_ranks(op, dl.elapsed(), missing),
            WaitFail::Aborted(_) => match self.abort_record() {
                Some(rec) if rec.member != self.me => CommError::peer_aborted(
                    rank(rec.member),
                    op,
                    rec.reason.clone(),
                    rec.missing(rank),
                ),
                _ => CommError::Aborted(format!("{op} was abandoned")),
            },
            WaitFail::Lost { member, detail } => CommError::peer_lost(rank(member), op, detail),
        };
        let rec = AbortRecord {
            member: self.me,
            reason: e.to_string(),
            culprits,
        };
        self.set_abort(ABORTED, Some(&rec));
        Err(e)
    }

    fn meta(&self) -> &Meta {
        // SAFETY: line 0 of a live mapping holds a Meta (all atomics).
        unsafe { &*(self.base as *const Meta) }
    }

    fn attached(&self) -> &Flag {
        // SAFETY: line 1 holds a Flag.
        unsafe { &*(self.base.add(LINE) as *const Flag) }
    }

    fn abort_flag(&self) -> &Flag {
        // SAFETY: line 2 holds a Flag.
        unsafe { &*(self.base.add(2 * LINE) as *const Flag) }
    }

    fn member(&self, i: usize) -> &Member {
        assert!(i < self.n, "member {i} of a segment of {}", self.n);
        // SAFETY: the member table holds `n` Members.
        unsafe { &*(self.base.add((MEMBERS_AT + i) * LINE) as *const Member) }
    }

    /// Control line `i` of the owner's area, as a [`Flag`].
    #[inline]
    pub(crate) fn flag(&self, i: usize) -> &Flag {
        assert!(i < self.nlines, "control line {i} of {}", self.nlines);
        // SAFETY: the control area holds `nlines` Flags.
        unsafe { &*(self.base.add(self.ctrl_off + i * LINE) as *const Flag) }
    }

    /// `len` bytes of the payload area from `off`, as a raw pointer.
    /// Panics when the range is outside the payload.
    #[inline]
    pub(crate) fn payload_at(&self, off: usize, len: usize) -> *mut u8 {
        assert!(
            off.checked_add(len).is_some_and(|e| e <= self.payload_len),
            "payload range {off}+{len} outside {} bytes",
            self.payload_len
        );
        // SAFETY: checked just above to lie inside the mapping.
        unsafe { self.base.add(self.payload_off + off) }
    }

    /// Bytes in the payload area.
    pub fn payload_len(&self) -> usize {
        self.payload_len
    }

    /// The segment's name (already unlinked once set-up finished).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This member's index.
    pub fn member_index(&self) -> usize {
        self.me
    }

    /// Number of members.
    pub fn members(&self) -> usize {
        self.n
    }

    /// Mapping length in bytes.
    pub fn mapped_len(&self) -> usize {
        self.map.len()
    }

    /// Current abort flag value.
    #[inline]
    pub(crate) fn abort_code(&self) -> u32 {
        self.abort_flag().seq.load(Acquire)
    }

    /// Sets the abort flag to `code` with `record` (who, why, whom it
    /// blames) unless another member did first, and wakes every sleeper.
    /// Returns whether this call set it.
    pub(crate) fn set_abort(&self, code: u32, record: Option<&AbortRecord>) -> bool {
        let f = self.abort_flag();
        let claimed = f.words[0]
            .compare_exchange(0, self.me as u64 + 1, AcqRel, Acquire)
            .is_ok();
        if claimed {
            let rec = record.cloned().unwrap_or(AbortRecord {
                member: self.me,
                reason: String::new(),
                culprits: Vec::new(),
            });
            let bytes = rec.encode();
            // SAFETY: the record area (ABORT_BYTES from line 3) is written
            // only by the member that claimed the flag, before the release
            // store below; readers read it only after an acquire load that
            // sees a non-zero code.
            unsafe {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(3 * LINE), ABORT_BYTES)
            };
            f.seq.store(code, Release);
        }
        self.wake_all();
        claimed
    }

    /// The abort record, once the abort flag is set (`None` while running
    /// or when the record is unreadable).
    pub(crate) fn abort_record(&self) -> Option<AbortRecord> {
        if self.abort_code() == RUNNING {
            return None;
        }
        let mut b = [0u8; ABORT_BYTES];
        // SAFETY: written once before the flag's release store, which the
        // acquire load in `abort_code` saw.
        unsafe {
            std::ptr::copy_nonoverlapping(self.base.add(3 * LINE), b.as_mut_ptr(), ABORT_BYTES)
        };
        AbortRecord::decode(&b, self.n)
    }

    /// Wakes every sleeper on any flag of the segment.
    pub(crate) fn wake_all(&self) {
        self.attached().wake_if_sleeping();
        self.abort_flag().wake_if_sleeping();
        for i in 0..self.nlines {
            self.flag(i).wake_if_sleeping();
        }
    }

    /// Pid recorded for member `i` (0 if it never attached).
    pub fn member_pid(&self, i: usize) -> u32 {
        self.member(i).pid.load(Acquire)
    }

    /// `Some(detail)` if member `i` has closed its end or its process is gone.
    pub(crate) fn member_lost(&self, i: usize) -> Option<String> {
        if i == self.me {
            return None;
        }
        let m = self.member(i);
        if m.exited.load(Acquire) != 0 {
            return Some("it closed its end (dropped its communicator/queue)".into());
        }
        let pid = m.pid.load(Acquire);
        if pid == 0 || pid == self.my_pid {
            return None;
        }
        process_gone(pid)
    }

    fn check_watch(&self, watch: Watch<'_>) -> std::result::Result<(), WaitFail> {
        let lost = |i: usize| {
            self.member_lost(i)
                .map(|detail| WaitFail::Lost { member: i, detail })
        };
        let r = match watch {
            Watch::One(i) => lost(i),
            Watch::Members(m) => m.iter().copied().find_map(lost),
            Watch::Others => (0..self.n).find_map(lost),
        };
        r.map_or(Ok(()), Err)
    }

    /// Waits until `cond()` holds. `cond` must become true only through
    /// stores followed by a publish (or `wake_if_sleeping`) on `flag`.
    /// `on_sleep` runs before each futex sleep (slow-wait reports).
    pub(crate) fn wait(
        &self,
        flag: &Flag,
        mut cond: impl FnMut() -> bool,
        watch: Watch<'_>,
        dl: &Deadline,
        on_sleep: &dyn Fn(),
    ) -> std::result::Result<(), WaitFail> {
        let p = self.policy;
        let budget = self.spin_budget.load(Relaxed);
        for _ in 0..budget {
            if cond() {
                let grown = (budget.saturating_mul(2) + 16).min(p.spin_iters);
                self.spin_budget.store(grown, Relaxed);
                return Ok(());
            }
            spin_loop();
        }
        self.spin_budget
            .store((budget / 2).max(16.min(p.spin_iters)), Relaxed);
        let start = Instant::now();
        loop {
            if cond() {
                return Ok(());
            }
            rustix::thread::sched_yield();
            if start.elapsed() >= p.yield_for {
                break;
            }
        }
        let mut last_check: Option<Instant> = None;
        loop {
            if cond() {
                return Ok(());
            }
            let code = self.abort_code();
            if code != RUNNING {
                return if cond() {
                    Ok(())
                } else {
                    Err(WaitFail::Aborted(code))
                };
            }
            if last_check.is_none_or(|t| t.elapsed() >= p.sleep_slice) {
                last_check = Some(Instant::now());
                if let Err(e) = self.check_watch(watch) {
                    // It may have published just before leaving.
                    return if cond() { Ok(()) } else { Err(e) };
                }
            }
            if dl.expired() {
                return if cond() {
                    Ok(())
                } else {
                    Err(WaitFail::Timeout)
                };
            }
            on_sleep();
            let slice = p
                .sleep_slice
                .min(dl.remaining())
                .max(Duration::from_micros(100));
            let ts = rustix::time::Timespec {
                tv_sec: slice.as_secs() as _,
                tv_nsec: slice.subsec_nanos() as _,
            };
            flag.sleepers.fetch_add(1, SeqCst);
            let v = flag.seq.load(SeqCst);
            if !cond() {
                let _ = futex::wait(&flag.seq, futex::Flags::empty(), v, Some(&ts));
            }
            flag.sleepers.fetch_sub(1, SeqCst);
        }
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        // Tell the others we are gone, so that waits on us end with PeerLost
        // at once rather than at the next liveness check.
        self.member(self.me).exited.store(1, Release);
        self.wake_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_overflow_is_refused() {
        assert!(layout(usize::MAX, 1, 1).is_none());
        assert!(layout(4, usize::MAX / 64, 1).is_none());
        assert!(layout(4, 1, usize::MAX - 100).is_none());
        let (c, p, t) = layout(2, 3, 100).unwrap();
        assert_eq!(c, (MEMBERS_AT + 2) * LINE);
        assert_eq!(p % PAGE, 0);
        assert!(t >= p + 100);
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        /// A member attaching to a segment whose header is garbage (a peer
        /// of another build, a corrupt or hostile creator) gets an error,
        /// never a panic or a wait past its deadline.
        #[test]
        fn fuzz_attach_to_garbage(words in proptest::collection::vec(any::<u64>(), 16),
                                  keep_magic in any::<bool>()) {
            let store = dist_utils::HashStore::new();
            let job = format!("fuzzseg{}", std::process::id());
            let spec = SetupSpec {
                store: &store,
                key: "seg".into(),
                member: 1,
                members: 2,
                ctrl_lines: 3,
                payload_bytes: 4096,
                job_id: &job,
                kind: 7,
                timeout: Duration::from_millis(200),
                what: "fuzz".into(),
                ranks: vec![0, 1],
                policy: SpinPolicy::default(),
            };
            let (_, _, total) = Segment::sizes(&spec).unwrap();
            let name = new_name(&job).unwrap();
            let fd = shm::open(
                name.as_str(),
                shm::OFlags::CREATE | shm::OFlags::EXCL | shm::OFlags::RDWR,
                rustix::fs::Mode::from_raw_mode(0o600),
            )
            .unwrap();
            let _gone = crate::backing::UnlinkOnDrop(Some(name.clone()));
            rustix::fs::ftruncate(&fd, total as u64).unwrap();
            let mut head: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            if keep_magic {
                head[..8].copy_from_slice(&MAGIC.to_le_bytes());
            }
            rustix::io::write(&fd, &head).unwrap();
            store.set("seg", name.as_bytes()).unwrap();
            let t0 = Instant::now();
            let r = Segment::establish(&spec);
            prop_assert!(r.is_err());
            prop_assert!(t0.elapsed() < Duration::from_secs(30));
        }
    }
}
