//! [`MessageQueue`]: one writer, many readers on one host.
//!
//! A byte ring in shared memory. The writer appends records (an 8-byte
//! little-endian length, then the payload) at its cursor; each reader has its
//! own cursor. Records start at multiples of 8 bytes, so a 200-byte message
//! takes 208 bytes of ring and a header never wraps. The writer may
//! overwrite bytes once every reader's cursor has passed them, so the ring is
//! a stream: a message larger than the ring goes through in pieces, the
//! writer publishing what it wrote and waiting for space, readers consuming
//! and publishing their cursors, with no socket involved. Order is strict
//! FIFO. When the slowest reader is a whole ring behind, the writer waits
//! (back-pressure); a timeout names the lagging reader(s).
//!
//! A message written with [`MessageQueue::enqueue_with`] (or
//! [`MessageQueue::enqueue_obj`]) is encoded straight into the ring and lies
//! there whole and contiguous: when it would wrap round the end, a pad
//! record (length `u64::MAX`) fills the rest of the lap and the message
//! starts the next. A reader's [`MessageQueue::dequeue_with`] then decodes it
//! where it lies, so a large broadcast costs the writer one copy and each
//! reader one (its decode), with no staging buffer on either side.
//!
//! A call's deadline counts from its first wait, so one that finds its
//! message (or its room) already there reads no clock.
//!
//! Cursors are 64-bit byte positions, each on its own cache line (the
//! first data word of a [`Flag`](crate::segment::Flag)), published with release
//! stores; the low 32 bits double as the futex word.

use std::borrow::Cow;
use std::sync::atomic::Ordering::*;
use std::time::Duration;

use comm_core::{CommError, Deadline, Missing, Result, Store};
use serde::{de::DeserializeOwned, Serialize};

use crate::names::default_job_id;
use crate::segment::{
    Segment, SetupSpec, SlowWait, SpinPolicy, WaitFail, Watch, ABORTED, CLOSED, MAX_MEMBERS,
};
use crate::wire::{record_len, AbortRecord, QueueDesc, MAX_RING, MIN_RING};

const KIND_MQ: u32 = 0x4d51_5545; // "MQUE"
/// Most bytes between two cursor publications within one message.
const STREAM_PUBLISH: u64 = 64 << 10;
/// Length word of a pad record: the rest of the lap is unused and the next
/// record starts the next lap.
const PAD: u64 = u64::MAX;

/// Where the next record may start at or after `pos`.
#[inline]
fn align8(pos: u64) -> u64 {
    pos.next_multiple_of(8)
}

/// A deadline that starts at the first wait: a call that finds its message
/// (or its room) already there reads no clock.
struct Due {
    timeout: Duration,
    dl: std::cell::OnceCell<Deadline>,
}

impl Due {
    fn new(timeout: Duration) -> Self {
        Due {
            timeout,
            dl: std::cell::OnceCell::new(),
        }
    }

    fn get(&self) -> &Deadline {
        self.dl.get_or_init(|| Deadline::after(self.timeout))
    }
}

/// How a writer's step gets ring space.
enum Room<'a> {
    /// Waits for readers until the deadline; the callback runs before each
    /// wait (see [`MessageQueue::enqueue_notify`]).
    Wait(&'a Due, &'a dyn Fn()),
    /// Takes what is free now.
    Now,
}

/// Options of a [`MessageQueue`]. Start from [`MqOptions::default`] and use
/// the builder methods.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MqOptions {
    /// Deadline of set-up and the default deadline of enqueue / dequeue.
    pub timeout: Duration,
    /// Job id, part of the segment name.
    pub job_id: String,
    /// Name used in error messages.
    pub name: String,
    /// Spin / yield / sleep policy of waits; `None`:
    /// [`SpinPolicy::for_members`]`(1 + readers)`.
    pub spin: Option<SpinPolicy>,
    /// Largest message a reader accepts (default 1 GiB): a record header
    /// announcing more is a protocol error, so a corrupt ring cannot make a
    /// reader allocate without bound.
    pub max_message_bytes: usize,
}

impl MqOptions {
    /// With a deadline.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }
    /// With a job id.
    pub fn job_id(mut self, j: impl Into<String>) -> Self {
        self.job_id = j.into();
        self
    }
    /// With a name.
    pub fn name(mut self, n: impl Into<String>) -> Self {
        self.name = n.into();
        self
    }
    /// With a spin policy.
    pub fn spin(mut self, s: SpinPolicy) -> Self {
        self.spin = Some(s);
        self
    }
    /// With a message size limit.
    pub fn max_message_bytes(mut self, n: usize) -> Self {
        self.max_message_bytes = n;
        self
    }
}

impl Default for MqOptions {
    fn default() -> Self {
        MqOptions {
            timeout: comm_core::default_timeout(),
            job_id: default_job_id(),
            name: "mq".into(),
            spin: None,
            max_message_bytes: 1 << 30,
        }
    }
}

/// The side of a queue this handle is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The one writer.
    Writer,
    /// Reader with this index (position in the reader list).
    Reader(usize),
}

/// One end of a shared-memory broadcast queue (see the module docs).
///
/// ```no_run
/// use comm_shm::{MessageQueue, MqOptions};
/// # fn f(store: &dyn comm_core::Store, rank: usize) -> comm_core::Result<()> {
/// if rank == 1 {
///     let mut w = MessageQueue::create_writer(store, "rpc", 1, &[0, 2, 3], 1 << 20, MqOptions::default())?;
///     w.enqueue(b"hello")?;
/// } else {
///     let mut r = MessageQueue::open_reader(store, "rpc", rank, MqOptions::default())?;
///     assert_eq!(r.dequeue()?, b"hello");
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct MessageQueue {
    seg: Segment,
    role: Role,
    ring: u64,
    writer_rank: usize,
    reader_ranks: Vec<usize>,
    /// My cursor (writer: write position; reader: read position).
    pos: u64,
    /// Last published value of my cursor.
    published: u64,
    /// Writer: last seen minimum reader cursor. Reader: last seen write cursor.
    cached: u64,
    timeout: Duration,
    name: String,
    max_message: usize,
    /// Reader: the buffer a message that cannot be read in place is copied
    /// into by [`MessageQueue::dequeue_with`], kept for the next one.
    scratch: Vec<u8>,
    /// Why the queue can no longer be used (a call failed in the middle of
    /// a message, so the stream is out of step).
    broken: Option<Cow<'static, str>>,
}

impl MessageQueue {
    /// Creates the queue as its writer (`writer_rank`, used in messages) for
    /// readers `reader_ranks`, with a ring of `ring_bytes` (at least 64).
    /// Returns once every reader has opened it ([`MessageQueue::open_reader`]
    /// with the same `key`).
    pub fn create_writer(
        store: &dyn Store,
        key: &str,
        writer_rank: usize,
        reader_ranks: &[usize],
        ring_bytes: usize,
        opts: MqOptions,
    ) -> Result<Self> {
        if !(MIN_RING..=MAX_RING).contains(&ring_bytes) {
            return Err(CommError::invalid(format!(
                "message queue `{}`: a ring of {ring_bytes} bytes is out of range \
                 ({MIN_RING} bytes to 1 TiB)",
                opts.name
            )));
        }
        let instance = store.add(&format!("{key}/instance/{writer_rank}"), 1)?;
        if reader_ranks.len() >= MAX_MEMBERS {
            return Err(CommError::invalid(format!(
                "message queue `{}`: {} readers, at most {}",
                opts.name,
                reader_ranks.len(),
                MAX_MEMBERS - 1
            )));
        }
        let desc = QueueDesc {
            ring: ring_bytes,
            writer: writer_rank,
            readers: reader_ranks.to_vec(),
        }
        .encode();
        store.set(&format!("{key}/{instance}/desc"), desc.as_bytes())?;
        Self::establish(
            store,
            key,
            instance,
            Role::Writer,
            ring_bytes,
            writer_rank,
            reader_ranks.to_vec(),
            opts,
        )
    }

    /// Opens the queue at `key` as reader `reader_rank` (which must be in the
    /// writer's reader list).
    pub fn open_reader(
        store: &dyn Store,
        key: &str,
        reader_rank: usize,
        opts: MqOptions,
    ) -> Result<Self> {
        let instance = store.add(&format!("{key}/instance/{reader_rank}"), 1)?;
        let raw = store.get(&format!("{key}/{instance}/desc"), opts.timeout)?;
        let QueueDesc {
            ring,
            writer,
            readers,
        } = QueueDesc::decode(&raw, MAX_MEMBERS - 1).map_err(|e| {
            CommError::Protocol(format!("message queue `{}` at `{key}`: {e}", opts.name))
        })?;
        let idx = readers
            .iter()
            .position(|&r| r == reader_rank)
            .ok_or_else(|| {
                CommError::invalid(format!(
                    "message queue `{}`: rank {reader_rank} is not among its readers {readers:?}",
                    opts.name
                ))
            })?;
        Self::establish(
            store,
            key,
            instance,
            Role::Reader(idx),
            ring,
            writer,
            readers,
            opts,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn establish(
        store: &dyn Store,
        key: &str,
        instance: i64,
        role: Role,
        ring: usize,
        writer_rank: usize,
        reader_ranks: Vec<usize>,
        opts: MqOptions,
    ) -> Result<Self> {
        let n = reader_ranks.len();
        let mut ranks = vec![writer_rank];
        ranks.extend(&reader_ranks);
        let spec = SetupSpec {
            store,
            key: format!("{key}/{instance}/segment"),
            member: match role {
                Role::Writer => 0,
                Role::Reader(i) => 1 + i,
            },
            members: 1 + n,
            ctrl_lines: 1 + n,
            payload_bytes: ring,
            job_id: &opts.job_id,
            kind: KIND_MQ,
            timeout: opts.timeout,
            what: format!("message queue `{}`", opts.name),
            ranks,
            policy: opts.spin.unwrap_or_else(|| SpinPolicy::for_members(1 + n)),
        };
        let seg = Segment::establish(&spec)?;
        Ok(MessageQueue {
            seg,
            role,
            // Records start at multiples of 8, and so does every lap.
            ring: (ring & !7) as u64,
            writer_rank,
            reader_ranks,
            pos: 0,
            published: 0,
            cached: 0,
            timeout: opts.timeout,
            name: opts.name,
            max_message: opts.max_message_bytes,
            scratch: Vec::new(),
            broken: None,
        })
    }

    /// This handle's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Ring size in bytes.
    pub fn ring_bytes(&self) -> usize {
        self.ring as usize
    }

    /// The default deadline of enqueue / dequeue.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Changes the default deadline.
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    /// Writer: how many bytes an [`MessageQueue::enqueue`] can write now
    /// without waiting for a reader (a message takes its length plus 8, and
    /// starts at a multiple of 8: up to 7 bytes more).
    /// Lets a caller that must not block (it also drains other channels)
    /// decide whether to enqueue inline. Readers get 0.
    pub fn free_bytes(&self) -> usize {
        if self.role != Role::Writer {
            return 0;
        }
        let slowest = self.min_reader().map_or(self.pos, |(_, p)| p);
        (self.ring - (self.pos - slowest)) as usize
    }

    /// Reader: true when the writer has published bytes this reader has
    /// not consumed yet, i.e. a message (or its first part) is waiting and
    /// [`MessageQueue::dequeue_into`] will not wait for the writer to start
    /// one. Lets a reader poll several queues without blocking. The writer
    /// gets `false`.
    pub fn has_pending(&self) -> bool {
        match self.role {
            Role::Writer => false,
            Role::Reader(_) => self.seg.flag(0).words[0].load(Acquire) > self.pos,
        }
    }

    /// Writer: marks the queue closed. Readers drain what was written, then
    /// get [`CommError::Aborted`]; blocked readers wake at once.
    pub fn shutdown(&self) {
        self.seg.set_abort(CLOSED, None);
    }

    /// Marks the queue aborted for every member (writer or reader): their
    /// blocked and later calls fail with [`CommError::PeerAborted`] naming
    /// this end.
    pub fn abort(&self) {
        let rec = AbortRecord {
            member: self.seg.member_index(),
            reason: format!("message queue `{}` aborted", self.name),
            culprits: Vec::new(),
        };
        self.seg.set_abort(ABORTED, Some(&rec));
    }

    fn what(&self, op: &str) -> String {
        match self.role {
            Role::Writer => format!(
                "{op} on message queue `{}` (writer rank {})",
                self.name, self.writer_rank
            ),
            Role::Reader(i) => format!(
                "{op} on message queue `{}` (reader rank {})",
                self.name, self.reader_ranks[i]
            ),
        }
    }

    fn member_rank(&self, member: usize) -> usize {
        if member == 0 {
            self.writer_rank
        } else {
            self.reader_ranks[member - 1]
        }
    }

    fn fail(&self, f: WaitFail, op: &str, dl: &Deadline, missing: Vec<Missing>) -> CommError {
        let what = self.what(op);
        match f {
            WaitFail::Timeout => CommError::timeout_ranks(what, dl.elapsed(), missing),
            WaitFail::Aborted(CLOSED) => {
                CommError::Aborted(format!("{what}: the writer shut the queue down"))
            }
            WaitFail::Aborted(_) => match self.seg.abort_record() {
                Some(rec) if rec.member != self.seg.member_index() => {
                    let culprits = rec.missing(|m| self.member_rank(m));
                    CommError::peer_aborted(
                        self.member_rank(rec.member),
                        what,
                        rec.reason,
                        culprits,
                    )
                }
                _ => CommError::Aborted(format!("{what}: the queue was aborted")),
            },
            WaitFail::Lost { member, detail } => {
                CommError::peer_lost(self.member_rank(member), what, detail)
            }
        }
    }

    /// How many bytes of a long stream go between two publications of the
    /// cursor: small enough that the other side starts copying while this
    /// side still copies (pipelining within a message), large enough that
    /// the publication costs nothing.
    #[inline]
    fn stream_publish(&self) -> u64 {
        (self.ring / 4).clamp(1, STREAM_PUBLISH)
    }

    #[inline]
    fn ring_ptr(&self) -> *mut u8 {
        self.seg.payload_at(0, self.ring as usize)
    }

    fn ring_copy_in(&self, pos: u64, src: &[u8]) {
        let off = (pos % self.ring) as usize;
        let first = src.len().min(self.ring as usize - off);
        // SAFETY: [pos, pos + len) is free ring space owned by the writer
        // (every reader's cursor is past pos + len - ring); offsets are in range.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.ring_ptr().add(off), first);
            std::ptr::copy_nonoverlapping(
                src.as_ptr().add(first),
                self.ring_ptr(),
                src.len() - first,
            );
        }
    }

    fn ring_copy_out(&self, pos: u64, dst: &mut [u8]) {
        let off = (pos % self.ring) as usize;
        let first = dst.len().min(self.ring as usize - off);
        // SAFETY: [pos, pos + len) was published by the writer and is not
        // rewritten until this reader's cursor passes it.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ring_ptr().add(off), dst.as_mut_ptr(), first);
            std::ptr::copy_nonoverlapping(
                self.ring_ptr(),
                dst.as_mut_ptr().add(first),
                dst.len() - first,
            );
        }
    }

    #[inline]
    fn publish(&mut self) {
        let f = match self.role {
            Role::Writer => self.seg.flag(0),
            Role::Reader(i) => self.seg.flag(1 + i),
        };
        f.words[0].store(self.pos, Release);
        f.publish(self.pos as u32);
        self.published = self.pos;
    }

    fn min_reader(&self) -> Option<(usize, u64)> {
        (0..self.reader_ranks.len())
            .map(|i| (i, self.seg.flag(1 + i).words[0].load(Acquire)))
            .min_by_key(|&(_, p)| p)
    }

    /// Writer: makes the ring free up to position `upto` (every reader's
    /// cursor at least `upto - ring`), waiting for readers with
    /// [`Room::Wait`] (after publishing what was written, so they can move
    /// on); with [`Room::Now`] returns `false` instead of waiting.
    fn room(&mut self, upto: u64, how: &Room<'_>) -> Result<bool> {
        loop {
            if self.cached + self.ring >= upto {
                return Ok(true);
            }
            self.cached = self.min_reader().map_or(self.pos, |(_, p)| p);
            if self.cached + self.ring >= upto {
                return Ok(true);
            }
            let Room::Wait(dl, notify) = how else {
                return Ok(false);
            };
            if self.published != self.pos {
                self.publish();
            }
            notify();
            self.wait_space(dl, upto)?;
        }
    }

    fn write_stream(&mut self, mut src: &[u8], dl: &Due, notify: &dyn Fn()) -> Result<()> {
        let stream_pub = self.stream_publish();
        let how = Room::Wait(dl, notify);
        while !src.is_empty() {
            self.room(self.pos + 1, &how)?;
            let free = self.cached + self.ring - self.pos;
            let n = usize::try_from(free).map_or(src.len(), |f| f.min(src.len()));
            self.ring_copy_in(self.pos, &src[..n]);
            self.pos += n as u64;
            src = &src[n..];
            if self.pos - self.published >= stream_pub {
                self.publish();
            }
        }
        Ok(())
    }

    /// Writer: waits until the slowest reader's cursor is at least
    /// `upto - ring`.
    fn wait_space(&mut self, dl: &Due, upto: u64) -> Result<()> {
        let Some((i, _)) = self.min_reader() else {
            return Ok(());
        };
        let dl = dl.get();
        let f = self.seg.flag(1 + i);
        let ring = self.ring;
        let slow = SlowWait::new();
        let on_sleep = || {
            slow.tick(|| {
                tracing::warn!(
                    "{}: still waiting for reader rank {} to free ring space ({:.0?} so far)",
                    self.what("enqueue"),
                    self.reader_ranks[i],
                    dl.elapsed()
                )
            })
        };
        if let Err(e) = self.seg.wait(
            f,
            || f.words[0].load(Acquire) + ring >= upto,
            Watch::One(1 + i),
            dl,
            &on_sleep,
        ) {
            let lagging = (0..self.reader_ranks.len())
                .filter_map(|j| {
                    let p = self.seg.flag(1 + j).words[0].load(Acquire);
                    (p + ring < upto).then(|| {
                        Missing::new(
                            self.reader_ranks[j],
                            format!("reader, {} bytes behind", self.pos - p),
                        )
                    })
                })
                .collect();
            return Err(self.fail(e, "enqueue", dl, lagging));
        }
        self.cached = self.min_reader().map_or(self.pos, |(_, p)| p);
        Ok(())
    }

    /// Writer: moves the cursor to where the next record starts (the next
    /// multiple of 8); `false` when that needs room [`Room::Now`] lacks.
    fn begin_record(&mut self, how: &Room<'_>) -> Result<bool> {
        let start = align8(self.pos);
        if start != self.pos {
            if !self.room(start, how)? {
                return Ok(false);
            }
            self.pos = start;
        }
        Ok(true)
    }

    /// Writer: one whole record of `len` body bytes (`8 + len` at most the
    /// ring), contiguous in the ring, written in place by `fill` and
    /// published at once, so a reader can decode it where it lies. A record
    /// that would wrap round the end of the ring starts the next lap
    /// instead, after a pad record. `false` (with [`Room::Now`]): no room
    /// now; nothing of the record was written (a pad record may have
    /// been), and neither was anything when `fill` fails.
    fn write_whole(
        &mut self,
        len: usize,
        how: &Room<'_>,
        fill: impl FnOnce(&mut [u8]) -> Result<()>,
    ) -> Result<bool> {
        let total = 8 + len as u64;
        if !self.begin_record(how)? {
            return Ok(false);
        }
        let off = self.pos % self.ring;
        if off + total > self.ring {
            let next_lap = self.pos - off + self.ring;
            if !self.room(next_lap, how)? {
                return Ok(false);
            }
            self.ring_copy_in(self.pos, &PAD.to_le_bytes());
            self.pos = next_lap;
            // Readers skip the pad and so free its bytes, which the record
            // may need.
            self.publish();
        }
        if !self.room(self.pos + total, how)? {
            return Ok(false);
        }
        let at = self.pos;
        let body_off = (at % self.ring) as usize + 8;
        // SAFETY: [at, at + total) is free ring space (room above) that no
        // reader reads before the publication below, and it is contiguous
        // (off + total <= ring, or the record starts the lap), so the slice
        // lies inside the ring's mapping, which `self` keeps alive.
        let body = unsafe { std::slice::from_raw_parts_mut(self.ring_ptr().add(body_off), len) };
        fill(body)?;
        self.ring_copy_in(at, &(len as u64).to_le_bytes());
        self.pos = at + total;
        self.publish();
        Ok(true)
    }

    /// Reader: waits until the writer has published at least position
    /// `min` (publishing this reader's cursor first, so a writer waiting
    /// for room can go on).
    fn wait_published(&mut self, min: u64, dl: &Due) -> Result<()> {
        if self.cached >= min {
            return Ok(());
        }
        self.cached = self.seg.flag(0).words[0].load(Acquire);
        if self.cached >= min {
            return Ok(());
        }
        if self.published != self.pos {
            self.publish();
        }
        let dl = dl.get();
        let f = self.seg.flag(0);
        // Readers of a request queue wait idle for long stretches by
        // design: reported at debug level only.
        let slow = SlowWait::new();
        let on_sleep = || {
            slow.tick(|| {
                tracing::debug!(
                    "{}: no message from writer rank {} for {:.0?}",
                    self.what("dequeue"),
                    self.writer_rank,
                    dl.elapsed()
                )
            })
        };
        if let Err(e) = self.seg.wait(
            f,
            || f.words[0].load(Acquire) >= min,
            Watch::One(0),
            dl,
            &on_sleep,
        ) {
            let writer = vec![Missing::new(self.writer_rank, "writer")];
            return Err(self.fail(e, "dequeue", dl, writer));
        }
        self.cached = f.words[0].load(Acquire);
        Ok(())
    }

    fn read_stream(&mut self, dst: &mut [u8], dl: &Due) -> Result<()> {
        let stream_pub = self.stream_publish();
        let mut got = 0;
        while got < dst.len() {
            self.wait_published(self.pos + 1, dl)?;
            let avail = self.cached - self.pos;
            let n = usize::try_from(avail).map_or(dst.len() - got, |a| a.min(dst.len() - got));
            self.ring_copy_out(self.pos, &mut dst[got..got + n]);
            self.pos += n as u64;
            got += n;
            if self.pos - self.published >= stream_pub {
                self.publish();
            }
        }
        Ok(())
    }

    /// Reader: consumes the next message's header (and the pad records
    /// before it) and returns the message's length. A failure consumes
    /// nothing but pad records, so a timeout can be retried.
    fn next_header(&mut self, dl: &Due) -> Result<usize> {
        loop {
            let start = align8(self.pos);
            self.wait_published(start + 8, dl)?;
            let mut hdr = [0u8; 8];
            self.ring_copy_out(start, &mut hdr);
            if u64::from_le_bytes(hdr) == PAD {
                // The writer publishes a pad record together with the rest
                // of its lap.
                let next_lap = start - start % self.ring + self.ring;
                self.cached = self.seg.flag(0).words[0].load(Acquire);
                if self.cached < next_lap {
                    return Err(CommError::Protocol(format!(
                        "{}: a pad record was published without the rest of its lap; \
                         the queue is corrupt or the writer runs another build",
                        self.what("dequeue")
                    )));
                }
                self.pos = next_lap;
                continue;
            }
            let len = record_len(hdr, self.max_message, || self.what("dequeue"))?;
            self.pos = start + 8;
            return Ok(len);
        }
    }

    /// Reader: reads a body of `len` bytes into `out` (cleared), streaming.
    fn read_body(&mut self, len: usize, out: &mut Vec<u8>, dl: &Due) -> Result<()> {
        out.clear();
        out.reserve(len);
        // Straight into the vector's spare capacity: no zero-fill of bytes
        // about to be overwritten (64 MiB of memset per message otherwise).
        let spare = &mut out.spare_capacity_mut()[..len];
        // SAFETY: MaybeUninit<u8> and u8 have the same layout; `read_stream`
        // only writes into the slice (never reads it) and fills all of it
        // or fails, and the length is set only after it succeeded.
        let dst = unsafe { std::slice::from_raw_parts_mut(spare.as_mut_ptr().cast::<u8>(), len) };
        self.read_stream(dst, dl)?;
        // SAFETY: the first `len` bytes were written just above.
        unsafe { out.set_len(len) };
        Ok(())
    }

    fn need(&self, role: Role, op: &str) -> Result<()> {
        let ok = matches!(
            (self.role, role),
            (Role::Writer, Role::Writer) | (Role::Reader(_), Role::Reader(_))
        );
        if !ok {
            return Err(CommError::invalid(format!(
                "{}: not allowed on this end of the queue",
                self.what(op)
            )));
        }
        if let Some(why) = &self.broken {
            return Err(CommError::State(format!(
                "{}: the queue is unusable: {why}",
                self.what(op)
            )));
        }
        Ok(())
    }

    /// Writer: the checks before a write (role, a broken or aborted queue).
    fn writable(&self, op: &str, timeout: Duration) -> Result<()> {
        self.need(Role::Writer, op)?;
        let code = self.seg.abort_code();
        if code != 0 {
            return Err(self.fail(
                WaitFail::Aborted(code),
                op,
                &Deadline::after(timeout),
                vec![],
            ));
        }
        Ok(())
    }

    /// Runs `step`; when it fails after `self.pos` moved past `mark` (part
    /// of a record is consumed or published), marks the queue unusable: a
    /// later call could only read or write the stream out of step.
    fn or_break<T>(&mut self, mark: u64, step: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let r = step(self);
        if let Err(e) = &r {
            if self.pos > mark {
                self.broken = Some(Cow::Owned(format!(
                    "a call failed in the middle of a message ({e})"
                )));
            }
        }
        r
    }

    /// Writer: appends `data` as one message. The bytes are copied into the
    /// ring before this returns; it blocks while the slowest reader is a ring
    /// behind (up to the default deadline).
    pub fn enqueue(&mut self, data: &[u8]) -> Result<()> {
        self.enqueue_timeout(data, self.timeout)
    }

    /// [`MessageQueue::enqueue`] with an explicit deadline.
    pub fn enqueue_timeout(&mut self, data: &[u8], timeout: Duration) -> Result<()> {
        self.enqueue_notify(data, timeout, &|| {})
    }

    /// [`MessageQueue::enqueue_timeout`] that calls `notify` whenever it has
    /// published part of the message and is about to wait for room: a
    /// reader that sleeps elsewhere than on this queue (an `epoll` set with
    /// other sources) can be woken there, so a message larger than the
    /// free space streams instead of waiting for a reader that does not
    /// know it started.
    ///
    /// A failure after part of the message was written (a deadline, a lost
    /// reader) leaves the queue unusable: later calls fail.
    pub fn enqueue_notify(
        &mut self,
        data: &[u8],
        timeout: Duration,
        notify: &dyn Fn(),
    ) -> Result<()> {
        self.writable("enqueue", timeout)?;
        let dl = Due::new(timeout);
        // Waits for room, so never `false`.
        self.begin_record(&Room::Wait(&dl, notify))?;
        let mark = self.pos;
        self.or_break(mark, |q| {
            q.write_stream(&(data.len() as u64).to_le_bytes(), &dl, notify)?;
            q.write_stream(data, &dl, notify)
        })?;
        self.publish();
        Ok(())
    }

    /// True when a message of `len` bytes can be held whole by the ring
    /// (what [`MessageQueue::try_enqueue_with`] needs).
    fn holds_whole(&self, len: usize) -> bool {
        (len as u64).saturating_add(8) <= self.ring
    }

    /// Writer: appends a message of exactly `len` bytes that `fill` writes
    /// straight into the ring, with no staging buffer (serialise into it).
    /// The message lies contiguously in the ring, so a reader's
    /// [`MessageQueue::dequeue_with`] reads it in place. Waits for room up
    /// to `timeout`; a message larger than the ring is filled into a
    /// temporary buffer and streamed. When `fill` fails, nothing is
    /// written and its error is returned.
    pub fn enqueue_with(
        &mut self,
        len: usize,
        timeout: Duration,
        fill: impl FnOnce(&mut [u8]) -> Result<()>,
    ) -> Result<()> {
        self.writable("enqueue", timeout)?;
        if !self.holds_whole(len) {
            let mut tmp = vec![0u8; len];
            fill(&mut tmp)?;
            return self.enqueue_timeout(&tmp, timeout);
        }
        let dl = Due::new(timeout);
        self.write_whole(len, &Room::Wait(&dl, &|| {}), fill)
            .map(|_| ())
    }

    /// [`MessageQueue::enqueue_with`] that never waits: `Ok(false)`, with
    /// `fill` not called and no message written, when the ring has no room
    /// for the whole message now, or could never hold it whole (`8 + len`
    /// more than the ring). A caller that must not block (it also drains
    /// other channels) falls back to a blocking enqueue elsewhere then.
    pub fn try_enqueue_with(
        &mut self,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<()>,
    ) -> Result<bool> {
        self.writable("enqueue", Duration::ZERO)?;
        if !self.holds_whole(len) {
            return Ok(false);
        }
        self.write_whole(len, &Room::Now, fill)
    }

    /// Reader: the next message.
    pub fn dequeue(&mut self) -> Result<Vec<u8>> {
        let mut v = Vec::new();
        self.dequeue_into(&mut v, self.timeout)?;
        Ok(v)
    }

    /// Reader: the next message into `out` (cleared and resized; reuse it to
    /// avoid allocating), waiting at most `timeout` for it to start. A
    /// timeout consumes nothing, so the call can be repeated; once a
    /// message has started, the rest of it is awaited up to the longer of
    /// `timeout` and the queue's deadline, and a failure there leaves the
    /// queue unusable.
    pub fn dequeue_into(&mut self, out: &mut Vec<u8>, timeout: Duration) -> Result<()> {
        self.need(Role::Reader(0), "dequeue")?;
        let len = self.next_header(&Due::new(timeout))?;
        self.take_body(len, out, timeout)
    }

    /// Reader, its header just consumed: copies the `len`-byte body into
    /// `out` and releases it, awaiting it up to the longer of `timeout` and
    /// the queue's deadline; any failure now breaks the stream.
    fn take_body(&mut self, len: usize, out: &mut Vec<u8>, timeout: Duration) -> Result<()> {
        let body_dl = Due::new(timeout.max(self.timeout));
        let mark = self.pos - 8;
        self.or_break(mark, |q| q.read_body(len, out, &body_dl))?;
        self.publish();
        Ok(())
    }

    /// Reader: the next message, handed to `f` as a slice, and `f`'s
    /// result. A message written whole ([`MessageQueue::enqueue_with`],
    /// [`MessageQueue::enqueue_obj`]) is read in place, in the ring,
    /// without a copy: decode it inside `f`. Others are copied into a
    /// buffer the queue keeps for the next one. The ring space is released
    /// when `f` returns, so keep `f` short (decode, do not compute).
    /// Deadlines as in [`MessageQueue::dequeue_into`].
    pub fn dequeue_with<T>(&mut self, timeout: Duration, f: impl FnOnce(&[u8]) -> T) -> Result<T> {
        self.need(Role::Reader(0), "dequeue")?;
        let len = self.next_header(&Due::new(timeout))?;
        let at = self.pos;
        let end = at + len as u64;
        let off = at % self.ring;
        if off + len as u64 <= self.ring {
            if self.cached < end {
                self.cached = self.seg.flag(0).words[0].load(Acquire);
            }
            if self.cached >= end {
                // SAFETY: [at, end) is published and contiguous in the
                // ring; the writer does not rewrite it before this reader's
                // cursor passes `end`, which happens only after `f`
                // returns. The slice borrows `self`, so it cannot outlive
                // the mapping.
                let body =
                    unsafe { std::slice::from_raw_parts(self.ring_ptr().add(off as usize), len) };
                // A panic in `f` leaves the header consumed and the body not.
                self.broken = Some(Cow::Borrowed("a dequeue_with callback panicked"));
                let r = f(body);
                self.broken = None;
                self.pos = end;
                self.publish();
                return Ok(r);
            }
        }
        let mut buf = std::mem::take(&mut self.scratch);
        self.take_body(len, &mut buf, timeout)?;
        let r = f(&buf);
        self.scratch = buf;
        Ok(r)
    }

    /// Writer: serialises `value` with postcard straight into the ring
    /// (see [`MessageQueue::enqueue_with`]).
    pub fn enqueue_obj<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<()> {
        // Messages are named only on failure (formatting them costs more
        // than a small message's copy).
        let len =
            match postcard::serialize_with_flavor(value, postcard::ser_flavors::Size::default()) {
                Ok(n) => n,
                Err(e) => {
                    return Err(CommError::Codec(format!(
                        "{}: sizing: {e}",
                        self.what("enqueue_obj")
                    )))
                }
            };
        let res = self.enqueue_with(len, self.timeout, |buf| {
            match postcard::to_slice(value, buf) {
                Ok(used) if used.len() == len => Ok(()),
                Ok(used) => Err(CommError::Codec(format!(
                    "encoded {} bytes after sizing {len} (a Serialize implementation that \
                     is not deterministic)",
                    used.len()
                ))),
                Err(e) => Err(CommError::Codec(format!("encoding: {e}"))),
            }
        });
        res.map_err(|e| match e {
            CommError::Codec(m) => CommError::Codec(format!("{}: {m}", self.what("enqueue_obj"))),
            other => other,
        })
    }

    /// Reader: dequeues a message and deserialises it with postcard,
    /// in place when it was written whole.
    pub fn dequeue_obj<T: DeserializeOwned>(&mut self) -> Result<T> {
        let decoded = self.dequeue_with(self.timeout, |bytes| postcard::from_bytes(bytes))?;
        decoded
            .map_err(|e| CommError::Codec(format!("{}: decoding: {e}", self.what("dequeue_obj"))))
    }
}

impl Drop for MessageQueue {
    fn drop(&mut self) {
        if self.role == Role::Writer {
            self.seg.set_abort(CLOSED, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    impl MessageQueue {
        /// Writes `bytes` into the ring as they are (no length header), as a
        /// corrupt or hostile writer would.
        fn enqueue_raw(&mut self, bytes: &[u8]) -> Result<()> {
            let dl = Due::new(self.timeout);
            self.write_stream(bytes, &dl, &|| {})?;
            self.publish();
            Ok(())
        }
    }

    fn pair(max: usize, job: &str) -> (MessageQueue, MessageQueue) {
        let store = dist_utils::HashStore::new();
        let o = MqOptions::default()
            .timeout(Duration::from_secs(60))
            .job_id(job)
            .max_message_bytes(max);
        std::thread::scope(|s| {
            let r = s.spawn(|| MessageQueue::open_reader(&store, "f", 1, o.clone()).unwrap());
            let w = MessageQueue::create_writer(&store, "f", 0, &[1], 4096, o.clone()).unwrap();
            (w, r.join().unwrap())
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        /// Whatever bytes a writer puts in the ring, a reader returns a
        /// message within the limit or an error within its deadline: no
        /// panic, no allocation past the limit, no hang.
        #[test]
        fn fuzz_ring_records(raw in proptest::collection::vec(any::<u8>(), 0..3000),
                             max in 0usize..2048) {
            let job = format!("fuzzmq{}", std::process::id());
            let (mut w, mut r) = pair(max, &job);
            w.enqueue_raw(&raw).unwrap();
            let mut out = Vec::new();
            for _ in 0..4 {
                let t0 = std::time::Instant::now();
                match r.dequeue_into(&mut out, Duration::from_millis(20)) {
                    Ok(()) => prop_assert!(out.len() <= max && out.capacity() <= max.max(8) * 2 + 64),
                    Err(CommError::Protocol(_)) | Err(CommError::Timeout { .. }) => break,
                    Err(e) => prop_assert!(false, "unexpected error {e}"),
                }
                prop_assert!(t0.elapsed() < Duration::from_secs(10));
            }
            prop_assert!(crate::list_segments(&job).is_empty());
        }
    }
}
