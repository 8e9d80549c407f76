//! [`MessageQueue`]: one writer, many readers on one host.
//!
//! A byte ring in shared memory. The writer appends records (an 8-byte
//! little-endian length, then the payload) at its cursor; each reader has its
//! own cursor. A 200-byte message takes 208 bytes of ring. The writer may
//! overwrite bytes once every reader's cursor has passed them, so the ring is
//! a stream: a message larger than the ring goes through in pieces, the
//! writer publishing what it wrote and waiting for space, readers consuming
//! and publishing their cursors, with no socket involved. Order is strict
//! FIFO. When the slowest reader is a whole ring behind, the writer waits
//! (back-pressure); a timeout names the lagging reader(s).
//!
//! Cursors are 64-bit byte positions, each on its own cache line (the
//! first data word of a [`Flag`](crate::segment::Flag)), published with release
//! stores; the low 32 bits double as the futex word.

use std::sync::atomic::Ordering::*;
use std::time::Duration;

use comm_core::{CommError, Deadline, Missing, Result, Store};
use serde::{de::DeserializeOwned, Serialize};

use crate::names::default_job_id;
use crate::segment::{Segment, SetupSpec, SpinPolicy, WaitFail, Watch, ABORTED, CLOSED};
use crate::wire::{record_len, AbortRecord};

const KIND_MQ: u32 = 0x4d51_5545; // "MQUE"

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
        if ring_bytes < 64 {
            return Err(CommError::invalid(format!(
                "message queue `{}`: ring of {ring_bytes} bytes is too small (min 64)",
                opts.name
            )));
        }
        let instance = store.add(&format!("{key}/instance/{writer_rank}"), 1)?;
        let desc = format!(
            "{ring_bytes};{writer_rank};{}",
            reader_ranks
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
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
        let bad = || {
            CommError::Protocol(format!(
                "message queue `{}`: malformed descriptor at `{key}`",
                opts.name
            ))
        };
        let s = String::from_utf8(raw).map_err(|_| bad())?;
        let mut it = s.split(';');
        let ring: usize = it.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
        let writer: usize = it.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
        let readers: Vec<usize> = match it.next() {
            Some("") | None => vec![],
            Some(l) => l
                .split(',')
                .map(|v| v.parse().map_err(|_| bad()))
                .collect::<Result<_>>()?,
        };
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
            ring: ring as u64,
            writer_rank,
            reader_ranks,
            pos: 0,
            published: 0,
            cached: 0,
            timeout: opts.timeout,
            name: opts.name,
            max_message: opts.max_message_bytes,
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
    /// without waiting for a reader (a message takes its length plus 8).
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

    fn write_stream(&mut self, mut src: &[u8], dl: &Deadline, notify: &dyn Fn()) -> Result<()> {
        let stream_pub = (self.ring / 4).max(1);
        while !src.is_empty() {
            let mut free = self.ring - (self.pos - self.cached);
            if free == 0 {
                self.cached = self.min_reader().map_or(self.pos, |(_, p)| p);
                free = self.ring - (self.pos - self.cached);
            }
            if free == 0 {
                if self.published != self.pos {
                    self.publish();
                }
                notify();
                self.wait_space(dl)?;
                continue;
            }
            let n = (free as usize).min(src.len());
            self.ring_copy_in(self.pos, &src[..n]);
            self.pos += n as u64;
            src = &src[n..];
            if self.pos - self.published >= stream_pub {
                self.publish();
            }
        }
        Ok(())
    }

    fn wait_space(&mut self, dl: &Deadline) -> Result<()> {
        let Some((i, _)) = self.min_reader() else {
            return Ok(());
        };
        let f = self.seg.flag(1 + i);
        let (pos, ring) = (self.pos, self.ring);
        if let Err(e) = self.seg.wait(
            f,
            || f.words[0].load(Acquire) + ring > pos,
            Watch::One(1 + i),
            dl,
            &|| {},
        ) {
            let lagging = (0..self.reader_ranks.len())
                .filter_map(|j| {
                    let p = self.seg.flag(1 + j).words[0].load(Acquire);
                    (pos - p >= ring).then(|| {
                        Missing::new(
                            self.reader_ranks[j],
                            format!("reader, {} bytes behind", pos - p),
                        )
                    })
                })
                .collect();
            return Err(self.fail(e, "enqueue", dl, lagging));
        }
        self.cached = self.min_reader().map_or(self.pos, |(_, p)| p);
        Ok(())
    }

    fn wait_data(&mut self, dl: &Deadline) -> Result<()> {
        let f = self.seg.flag(0);
        let pos = self.pos;
        if let Err(e) = self.seg.wait(
            f,
            || f.words[0].load(Acquire) > pos,
            Watch::One(0),
            dl,
            &|| {},
        ) {
            let writer = vec![Missing::new(self.writer_rank, "writer")];
            return Err(self.fail(e, "dequeue", dl, writer));
        }
        self.cached = f.words[0].load(Acquire);
        Ok(())
    }

    fn read_stream(&mut self, dst: &mut [u8], dl: &Deadline) -> Result<()> {
        let stream_pub = (self.ring / 4).max(1);
        let mut got = 0;
        while got < dst.len() {
            let mut avail = self.cached - self.pos;
            if avail == 0 {
                self.cached = self.seg.flag(0).words[0].load(Acquire);
                avail = self.cached - self.pos;
            }
            if avail == 0 {
                if self.published != self.pos {
                    self.publish();
                }
                self.wait_data(dl)?;
                continue;
            }
            let n = (avail as usize).min(dst.len() - got);
            self.ring_copy_out(self.pos, &mut dst[got..got + n]);
            self.pos += n as u64;
            got += n;
            if self.pos - self.published >= stream_pub {
                self.publish();
            }
        }
        Ok(())
    }

    fn need(&self, role: Role, op: &str) -> Result<()> {
        let ok = matches!(
            (self.role, role),
            (Role::Writer, Role::Writer) | (Role::Reader(_), Role::Reader(_))
        );
        if ok {
            Ok(())
        } else {
            Err(CommError::invalid(format!(
                "{}: not allowed on this end of the queue",
                self.what(op)
            )))
        }
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
    pub fn enqueue_notify(
        &mut self,
        data: &[u8],
        timeout: Duration,
        notify: &dyn Fn(),
    ) -> Result<()> {
        self.need(Role::Writer, "enqueue")?;
        let code = self.seg.abort_code();
        if code != 0 {
            return Err(self.fail(
                WaitFail::Aborted(code),
                "enqueue",
                &Deadline::after(timeout),
                vec![],
            ));
        }
        let dl = Deadline::after(timeout);
        self.write_stream(&(data.len() as u64).to_le_bytes(), &dl, notify)?;
        self.write_stream(data, &dl, notify)?;
        self.publish();
        Ok(())
    }

    /// Reader: the next message.
    pub fn dequeue(&mut self) -> Result<Vec<u8>> {
        let mut v = Vec::new();
        self.dequeue_into(&mut v, self.timeout)?;
        Ok(v)
    }

    /// Reader: the next message into `out` (cleared and resized; reuse it to
    /// avoid allocating), waiting at most `timeout`.
    pub fn dequeue_into(&mut self, out: &mut Vec<u8>, timeout: Duration) -> Result<()> {
        self.need(Role::Reader(0), "dequeue")?;
        let dl = Deadline::after(timeout);
        let mut hdr = [0u8; 8];
        self.read_stream(&mut hdr, &dl)?;
        let len = record_len(hdr, self.max_message, &self.what("dequeue"))?;
        out.clear();
        out.reserve(len);
        // Straight into the vector's spare capacity: no zero-fill of bytes
        // about to be overwritten (64 MiB of memset per message otherwise).
        let spare = &mut out.spare_capacity_mut()[..len];
        // SAFETY: MaybeUninit<u8> and u8 have the same layout; `read_stream`
        // only writes into the slice (never reads it) and fills all of it
        // or fails, and the length is set only after it succeeded.
        let dst = unsafe { std::slice::from_raw_parts_mut(spare.as_mut_ptr().cast::<u8>(), len) };
        self.read_stream(dst, &dl)?;
        // SAFETY: the first `len` bytes were written just above.
        unsafe { out.set_len(len) };
        self.publish();
        Ok(())
    }

    /// Writer: serialises `value` with postcard and enqueues it.
    pub fn enqueue_obj<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<()> {
        let bytes = postcard::to_allocvec(value).map_err(|e| {
            CommError::Codec(format!("{}: encoding: {e}", self.what("enqueue_obj")))
        })?;
        self.enqueue(&bytes)
    }

    /// Reader: dequeues a message and deserialises it with postcard.
    pub fn dequeue_obj<T: DeserializeOwned>(&mut self) -> Result<T> {
        let bytes = self.dequeue()?;
        postcard::from_bytes(&bytes)
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
