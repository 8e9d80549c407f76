//! The data plane: two non-blocking TCP connections per peer (data and
//! control) and a poll loop that progresses any number of sends and
//! receives at once.
//!
//! Every data message starts with a 16-byte header (see [`crate::wire`]):
//! magic, kind (the collective's code, or point-to-point), flags, the
//! per-direction sequence number and the payload length. The first message
//! of a call on each directed pair also carries the sender's 64-byte call
//! description, which the receiver compares with its own
//! ([`CallDesc::check_peer`]); [`Mesh::begin`] starts each collective's stream to the right
//! neighbour with a ring frame (a
//! description-only frame to the right neighbour when the algorithm sent it
//! nothing), so in every call each member checks at least one peer and a
//! two-member group always checks both ways.
//!
//! The control connection carries what must get through while a data
//! stream is in the middle of a message: aborts naming the ranks blamed, and
//! "still waiting for ..." notices. A member that times out follows those
//! notices (who waits for whom) to the rank that is really stuck, so a
//! frozen rank is named instead of the peers queued behind it.

use std::io::{IoSlice, IoSliceMut};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use comm_core::{Call, CallDesc, CommError, Missing, Result};
use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;
use rustix::net::{SendAncillaryBuffer, SendFlags};

use crate::wire::{self, Control, Header, FLAG_DESC, HDR, MAX_HDR, P2P_KIND};

/// Header bytes of a message preceded by its call's ring frame.
const RING_HDR: usize = MAX_HDR + HDR;

/// Callback given each arrived payload piece: (receive index, offset, bytes).
type OnRecv<'a> = dyn FnMut(usize, usize, &[u8]) -> Result<()> + 'a;

/// At most this many iovecs per strided read or write.
const MAX_IOV: usize = 64;

/// Where a message's payload lies: one range, or `len / run` runs of `run`
/// bytes, `stride` bytes apart.
#[derive(Debug, Clone, Copy)]
enum Span {
    Contig(*mut u8),
    Strided {
        base: *mut u8,
        run: usize,
        stride: usize,
    },
}

impl Span {
    /// Pushes the payload range `from..to` onto `iov` as slices, at most
    /// `max` of them in all; returns the bytes covered.
    ///
    /// # Safety
    /// The span must describe memory valid for reads for the whole range.
    unsafe fn gather<'a>(
        &self,
        from: usize,
        to: usize,
        iov: &mut [IoSlice<'a>; MAX_IOV + 1],
        n: &mut usize,
    ) -> usize {
        match *self {
            Span::Contig(p) => {
                // SAFETY: guaranteed by the caller.
                iov[*n] =
                    IoSlice::new(unsafe { std::slice::from_raw_parts(p.add(from), to - from) });
                *n += 1;
                to - from
            }
            Span::Strided { base, run, stride } => {
                let mut off = from;
                while off < to && *n < iov.len() {
                    let (k, within) = (off / run, off % run);
                    let take = (run - within).min(to - off);
                    // SAFETY: run `k` lies at `k * stride` (caller's contract).
                    let p = unsafe { base.add(k * stride + within) };
                    // SAFETY: as above.
                    iov[*n] = IoSlice::new(unsafe { std::slice::from_raw_parts(p, take) });
                    *n += 1;
                    off += take;
                }
                off - from
            }
        }
    }

    /// [`Span::gather`] for writing.
    ///
    /// # Safety
    /// The span must describe memory valid for writes, and not accessed by
    /// anyone else, for the whole range.
    unsafe fn scatter<'a>(
        &self,
        from: usize,
        to: usize,
        iov: &mut [IoSliceMut<'a>; MAX_IOV + 1],
        n: &mut usize,
    ) -> usize {
        match *self {
            Span::Contig(p) => {
                // SAFETY: guaranteed by the caller.
                iov[*n] = IoSliceMut::new(unsafe {
                    std::slice::from_raw_parts_mut(p.add(from), to - from)
                });
                *n += 1;
                to - from
            }
            Span::Strided { base, run, stride } => {
                let mut off = from;
                while off < to && *n < iov.len() {
                    let (k, within) = (off / run, off % run);
                    let take = (run - within).min(to - off);
                    // SAFETY: run `k` lies at `k * stride` (caller's contract).
                    let p = unsafe { base.add(k * stride + within) };
                    // SAFETY: as above.
                    iov[*n] = IoSliceMut::new(unsafe { std::slice::from_raw_parts_mut(p, take) });
                    *n += 1;
                    off += take;
                }
                off - from
            }
        }
    }
}

/// A message to send: header + `len` bytes.
#[derive(Debug, Clone)]
pub(crate) struct SendOp {
    pub(crate) peer: usize,
    span: Span,
    len: usize,
    hdr: [u8; RING_HDR],
    hlen: usize,
    /// Bytes written, header included.
    done: usize,
    /// Index of a receive whose payload progress bounds what may be sent
    /// (pipelined forwarding).
    gate: Option<usize>,
    /// A point-to-point message's own description (always carried).
    desc: Option<CallDesc>,
    /// Only the call's ring frame (no message of its own).
    ring_only: bool,
}

impl SendOp {
    fn with(peer: usize, span: Span, len: usize) -> Self {
        SendOp {
            peer,
            span,
            len,
            hdr: [0; RING_HDR],
            hlen: HDR,
            done: 0,
            gate: None,
            desc: None,
            ring_only: false,
        }
    }
    /// A send of `data` to `peer`.
    pub(crate) fn new(peer: usize, data: &[u8]) -> Self {
        Self::with(peer, Span::Contig(data.as_ptr().cast_mut()), data.len())
    }
    /// A send of `len` bytes at `ptr`. The caller keeps them readable and
    /// unwritten by anyone else until the exchange returns.
    pub(crate) fn raw(peer: usize, ptr: *const u8, len: usize) -> Self {
        Self::with(peer, Span::Contig(ptr.cast_mut()), len)
    }
    /// A send of `runs` runs of `run` bytes, `stride` bytes apart from
    /// `base`. The caller keeps them readable until the exchange returns.
    pub(crate) fn strided(
        peer: usize,
        base: *const u8,
        runs: usize,
        run: usize,
        stride: usize,
    ) -> Self {
        let span = Span::Strided {
            base: base.cast_mut(),
            run: run.max(1),
            stride,
        };
        Self::with(peer, span, runs * run)
    }
    /// A point-to-point message carrying its own description.
    pub(crate) fn p2p(mut self, desc: CallDesc) -> Self {
        self.desc = Some(desc);
        self
    }
    /// Forwards bytes only as fast as receive `recv` delivers them.
    pub(crate) fn gated(mut self, recv: usize) -> Self {
        self.gate = Some(recv);
        self
    }
    fn complete(&self) -> bool {
        self.done == self.hlen + self.len
    }
}

/// A message to receive into memory of `len` bytes.
#[derive(Debug, Clone)]
pub(crate) struct RecvOp {
    pub(crate) peer: usize,
    span: Span,
    len: usize,
    hdr: [u8; RING_HDR],
    hlen: usize,
    /// Bytes read, header included.
    done: usize,
    /// Streaming: the span is a reusable buffer of `cap` bytes, each read
    /// lands at its start and is handed to the callback at once.
    cap: Option<usize>,
    /// Streaming: pieces handed on are whole multiples of `unit` bytes (one
    /// element); `carry` bytes of a split element wait at the buffer start.
    unit: usize,
    carry: usize,
    /// A point-to-point receive's own description; a collective's first
    /// message from a peer is checked against the call's.
    desc: Option<CallDesc>,
    /// The description this message must carry.
    expect: Option<CallDesc>,
    kind: u8,
    /// The message is preceded by the call's ring frame (from the left
    /// neighbour), or is only that.
    ring: bool,
    ring_only: bool,
}

impl RecvOp {
    fn with(peer: usize, span: Span, len: usize) -> Self {
        RecvOp {
            peer,
            span,
            len,
            hdr: [0; RING_HDR],
            hlen: HDR,
            done: 0,
            cap: None,
            unit: 1,
            carry: 0,
            desc: None,
            expect: None,
            kind: 0,
            ring: false,
            ring_only: false,
        }
    }
    /// A receive of `len` bytes from `peer` that is never stored whole: each
    /// piece is read into the `cap`-byte buffer at `ptr` (kept hot in cache)
    /// and given to the exchange's callback before the next read.
    pub(crate) fn streaming(
        peer: usize,
        ptr: *mut u8,
        cap: usize,
        len: usize,
        unit: usize,
    ) -> Self {
        let mut r = Self::with(peer, Span::Contig(ptr), len);
        r.cap = Some(cap.max(2 * unit));
        r.unit = unit;
        r
    }
    /// A receive into `buf` from `peer`.
    pub(crate) fn new(peer: usize, buf: &mut [u8]) -> Self {
        Self::with(peer, Span::Contig(buf.as_mut_ptr()), buf.len())
    }
    /// A receive of `len` bytes into `ptr`. The caller keeps them writable
    /// and untouched by anyone else until the exchange returns.
    pub(crate) fn raw(peer: usize, ptr: *mut u8, len: usize) -> Self {
        Self::with(peer, Span::Contig(ptr), len)
    }
    /// A receive into `runs` runs of `run` bytes, `stride` bytes apart from
    /// `base` (disjoint from every other receive's memory); the caller keeps
    /// them writable and untouched until the exchange returns.
    pub(crate) fn strided(
        peer: usize,
        base: *mut u8,
        runs: usize,
        run: usize,
        stride: usize,
    ) -> Self {
        let span = Span::Strided {
            base,
            run: run.max(1),
            stride,
        };
        Self::with(peer, span, runs * run)
    }
    /// A point-to-point message with its own description.
    pub(crate) fn p2p(mut self, desc: CallDesc) -> Self {
        self.desc = Some(desc);
        self
    }
    fn payload_done(&self) -> usize {
        self.done.saturating_sub(self.hlen)
    }
    fn finished(&self) -> bool {
        self.done == self.hlen + self.len
    }
}

/// A peer's notice that it was waiting, and when it came.
#[derive(Debug, Clone)]
struct Notice {
    at: Instant,
    /// The peer's count of data messages sent to this member at the time.
    sent: u32,
    missing: Vec<usize>,
}

/// What a peer's abort frame said.
#[derive(Debug, Clone)]
struct Abort {
    reason: String,
    culprits: Vec<(usize, String)>,
    desc: Option<CallDesc>,
}

/// The connections to one peer.
#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) sock: TcpStream,
    ctl: TcpStream,
    ctl_open: bool,
    ctl_buf: Vec<u8>,
    send_seq: u32,
    recv_seq: u32,
    /// The call description went out to / came in from this peer in the
    /// current call.
    desc_sent: bool,
    desc_recvd: bool,
    notice: Option<Notice>,
    /// The abort this peer sent: its reason, the ranks it blamed and the
    /// call it was in.
    aborted: Option<Abort>,
}

impl Peer {
    pub(crate) fn new(sock: TcpStream, ctl: TcpStream) -> Self {
        Peer {
            sock,
            ctl,
            ctl_open: true,
            ctl_buf: Vec::new(),
            send_seq: 0,
            recv_seq: 0,
            desc_sent: false,
            desc_recvd: false,
            notice: None,
            aborted: None,
        }
    }
}

/// All connections of one member.
#[derive(Debug)]
pub(crate) struct Mesh {
    pub(crate) rank: usize,
    pub(crate) world: usize,
    /// `peers[r]` is `None` for `r == rank`.
    pub(crate) peers: Vec<Option<Peer>>,
    pub(crate) busy_poll: Duration,
    /// Kept so the poll loop allocates nothing per call.
    pollset: Vec<(usize, PollFlags, bool)>,
    /// Per peer, per pass of the poll loop: an earlier receive (bit 0) or
    /// send (bit 1) with that peer is unfinished, so later ones wait.
    busy: Vec<u8>,
    /// This member gave up on the group.
    aborted: bool,
    /// The next exchange is the first of a collective call.
    first: bool,
    /// The collective in progress, for abort frames.
    current: Option<CallDesc>,
    /// Reused lists for first exchanges that gain a ring frame.
    spare_sends: Spare<SendOp>,
    spare_recvs: Spare<RecvOp>,
}

/// The capacity of a list of messages, kept between calls without its
/// contents (it is always empty there).
#[derive(Debug)]
struct Spare<T>(Vec<T>);

// SAFETY: a `Spare` is emptied before it is stored, so the raw pointers of
// the messages it held never outlive the exchange that made them, let alone
// move to another thread with the mesh.
unsafe impl<T> Send for Spare<T> {}

impl<T> Spare<T> {
    fn take(&mut self) -> Vec<T> {
        std::mem::take(&mut self.0)
    }
    fn put(&mut self, mut v: Vec<T>) {
        v.clear();
        self.0 = v;
    }
}

const RECV_BUSY: u8 = 1;
const SEND_BUSY: u8 = 2;

fn is_lost(e: Errno) -> bool {
    matches!(
        e,
        Errno::CONNRESET
            | Errno::PIPE
            | Errno::CONNABORTED
            | Errno::NOTCONN
            | Errno::TIMEDOUT
            | Errno::HOSTUNREACH
    )
}

fn timespec(d: Duration) -> rustix::time::Timespec {
    rustix::time::Timespec {
        tv_sec: d.as_secs() as i64,
        tv_nsec: i64::from(d.subsec_nanos()),
    }
}

/// How often a waiting member tells its peers whom it waits for, given the
/// call's whole deadline: often enough that several notices precede any
/// timeout, rarely enough to cost nothing.
fn notice_every(total: Duration) -> Duration {
    (total / 8).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

impl Mesh {
    pub(crate) fn new(
        rank: usize,
        world: usize,
        peers: Vec<Option<Peer>>,
        busy_poll: Duration,
    ) -> Self {
        Mesh {
            rank,
            world,
            peers,
            busy_poll,
            pollset: Vec::with_capacity(2 * world),
            busy: vec![0; world],
            aborted: false,
            first: false,
            current: None,
            spare_sends: Spare(Vec::new()),
            spare_recvs: Spare(Vec::new()),
        }
    }

    fn peer(&mut self, r: usize) -> &mut Peer {
        assert!(r != self.rank && r < self.world, "peer {r} out of range");
        self.peers[r]
            .as_mut()
            .unwrap_or_else(|| unreachable!("every other rank has a connection"))
    }

    /// Starts a collective call: its description goes with the first
    /// message to each peer, and the first exchange also sends it to the
    /// right neighbour and takes the left one's (a description-only frame
    /// where that exchange has no message for them), so in every call each
    /// member checks at least its left neighbour's call, at once, and a
    /// two-member group always checks both ways.
    pub(crate) fn begin(&mut self, call: &Call<'_>) {
        self.first = true;
        self.current = Some(call.desc);
        for p in self.peers.iter_mut().flatten() {
            p.desc_sent = false;
            p.desc_recvd = false;
        }
    }

    /// Point-to-point traffic: no collective in progress.
    pub(crate) fn end_collective(&mut self) {
        self.current = None;
        self.first = false;
    }

    /// After a call mismatch: makes sure this member's description reaches
    /// every peer it was to reach in this exchange (the rest of each started
    /// or pending first header) and its right neighbour (a ring frame, if
    /// none went yet); best effort. Those peers then see a mismatch
    /// themselves instead of waiting for messages that will not come.
    fn announce(&mut self, call: &Call<'_>, sends: &[SendOp]) {
        let until = Instant::now() + Duration::from_millis(200);
        for s in sends {
            if s.hlen >= MAX_HDR && s.done < s.hlen {
                let blocked = sends
                    .iter()
                    .take_while(|t| !std::ptr::eq(*t, s))
                    .any(|t| t.peer == s.peer && !t.complete());
                if !blocked {
                    write_bounded(&self.peer(s.peer).sock, &s.hdr[s.done..s.hlen], until);
                }
            }
        }
        let right = (self.rank + 1) % self.world;
        let p = self.peer(right);
        if std::mem::replace(&mut p.desc_sent, true) {
            return;
        }
        let h = Header {
            kind: call.desc.op.code(),
            flags: FLAG_DESC,
            seq: p.send_seq,
            len: 0,
        };
        let mut frame = [0u8; MAX_HDR];
        frame[..HDR].copy_from_slice(&h.encode());
        frame[HDR..].copy_from_slice(&call.desc.to_wire());
        write_bounded(&p.sock, &frame, until);
    }

    /// Gives up on the group: tells every peer, over the control
    /// connections, why and whom it blames. Never blocks for long.
    pub(crate) fn abort(&mut self, reason: &str, culprits: &[Missing]) {
        if std::mem::replace(&mut self.aborted, true) {
            return;
        }
        let desc = self.current.map(|d| d.to_wire());
        let frame = Control::abort(reason, culprits, desc).encode();
        let until = Instant::now() + Duration::from_millis(200);
        for p in self.peers.iter_mut().flatten() {
            if p.ctl_open {
                write_bounded(&p.ctl, &frame, until);
            }
        }
    }

    /// Tells every peer that this member waits for `missing`.
    fn notify_waiting(&mut self, missing: Vec<usize>) {
        for p in self.peers.iter_mut().flatten() {
            if p.ctl_open {
                let frame = Control::Waiting {
                    sent: u64::from(p.send_seq),
                    missing: missing.clone(),
                }
                .encode();
                // Best effort and never blocking: a peer that stopped reading
                // its control connection loses notices, nothing else.
                let _ =
                    rustix::net::send(&p.ctl, &frame, SendFlags::NOSIGNAL | SendFlags::DONTWAIT);
            }
        }
    }

    /// Reads whatever peer `r` sent on its control connection.
    fn drain_control(&mut self, r: usize) -> Result<()> {
        let world = self.world;
        let p = self.peer(r);
        let mut buf = [0u8; 4096];
        while p.ctl_open {
            match rustix::io::read(&p.ctl, &mut buf) {
                Ok(0) => p.ctl_open = false,
                Ok(n) => {
                    p.ctl_buf.extend_from_slice(&buf[..n]);
                    loop {
                        match Control::decode(&p.ctl_buf, world) {
                            Ok(Some((c, used))) => {
                                p.ctl_buf.drain(..used);
                                match c {
                                    Control::Abort {
                                        reason,
                                        culprits,
                                        desc,
                                    } => {
                                        if p.aborted.is_none() {
                                            p.aborted = Some(Abort {
                                                reason,
                                                culprits,
                                                desc: desc
                                                    .and_then(|d| CallDesc::from_wire(&d).ok()),
                                            });
                                        }
                                    }
                                    Control::Waiting { sent, missing } => {
                                        p.notice = Some(Notice {
                                            at: Instant::now(),
                                            sent: sent as u32,
                                            missing,
                                        });
                                    }
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                // A peer speaking nonsense on its control
                                // connection: stop listening to it there.
                                tracing::warn!("rank {r}: {e}; ignoring its control connection");
                                p.ctl_open = false;
                                p.ctl_buf.clear();
                                break;
                            }
                        }
                    }
                }
                Err(Errno::AGAIN) => break,
                Err(Errno::INTR) => continue,
                Err(_) => p.ctl_open = false,
            }
        }
        Ok(())
    }

    /// Whether a peer's abort, sent while it was in `theirs`, is compared
    /// with this member's collective `mine` as the same call: only a
    /// collective at the same position of the group's sequence.
    fn abort_is_mismatch(mine: &CallDesc, theirs: &CallDesc) -> bool {
        !theirs.op.is_p2p()
            && theirs.op != comm_core::Collective::SendRecv
            && theirs.seq == mine.seq
    }

    /// The first abort any peer has sent, as the error to report: a
    /// `CallMismatch` when that peer was in a different collective than
    /// `call` (the abort carries its description), else `PeerAborted`.
    fn aborted_error(&self, call: &Call<'_>) -> Option<CommError> {
        self.peers.iter().enumerate().find_map(|(r, p)| {
            let a = p.as_ref()?.aborted.as_ref()?;
            if let (Some(theirs), false) = (
                a.desc,
                call.desc.op.is_p2p() || call.desc.op == comm_core::Collective::SendRecv,
            ) {
                // A different call is a mismatch only at the same point of
                // the sequence: a peer that aborted in a later collective
                // finished this one and moved on (or, in an earlier one,
                // has not got here yet), and the ranks its abort blames are
                // the ones to report (crash trials: a survivor blamed the
                // messenger for a "mismatch" with its next call).
                if Self::abort_is_mismatch(&call.desc, &theirs) {
                    if let Err(e) = call.desc.check_peer(&theirs, r, &call.name()) {
                        return Some(e);
                    }
                }
            }
            Some(CommError::peer_aborted(
                r,
                call.name(),
                a.reason.clone(),
                a.culprits
                    .iter()
                    .map(|(c, d)| Missing::new(*c, d.clone()))
                    .collect(),
            ))
        })
    }

    /// `PeerLost` for `peer`, unless it explained itself with an abort on
    /// its control connection (looked for briefly: an abort and the close
    /// that follows it travel on different connections).
    fn lost(&mut self, peer: usize, call: &Call<'_>, detail: String) -> CommError {
        let until = Instant::now() + Duration::from_millis(200);
        loop {
            let _ = self.drain_control(peer);
            if let Some(e) = self.aborted_error(call) {
                return e;
            }
            let p = self.peer(peer);
            let left = until.saturating_duration_since(Instant::now());
            if !p.ctl_open || left.is_zero() {
                break;
            }
            let mut fds = [PollFd::new(&p.ctl, PollFlags::IN)];
            let _ = rustix::event::poll(&mut fds, Some(&timespec(left)));
        }
        CommError::peer_lost(peer, call.name(), detail)
    }

    /// The ranks really at fault when this member waited for `direct`:
    /// peers that recently said they wait too (and sent nothing since) are
    /// followed to whom they wait for; ranks with no such notice are the
    /// culprits.
    fn culprits(&self, direct: Vec<(usize, String)>, fresh: Duration) -> Vec<Missing> {
        let now = Instant::now();
        let waiting = |r: usize| -> Option<&Vec<usize>> {
            let p = self.peers.get(r)?.as_ref()?;
            let n = p.notice.as_ref()?;
            // More messages arrived from it than it had sent: it moved on.
            let moved_on = (p.recv_seq.wrapping_sub(n.sent) as i32) > 0;
            (!moved_on && now.duration_since(n.at) <= fresh).then_some(&n.missing)
        };
        let mut seen = vec![false; self.world];
        seen[self.rank] = true;
        let mut out: Vec<Missing> = Vec::new();
        let mut queue: std::collections::VecDeque<(usize, String)> =
            direct.iter().cloned().collect();
        while let Some((r, detail)) = queue.pop_front() {
            if std::mem::replace(&mut seen[r], true) {
                continue;
            }
            match waiting(r) {
                Some(next) => {
                    for &n in next {
                        if n < self.world && !seen[n] {
                            queue.push_back((n, format!("rank {r} is waiting for it")));
                        }
                    }
                }
                None => out.push(Missing::new(r, detail)),
            }
        }
        if out.is_empty() {
            // Everyone involved is alive and waiting: a cycle (members in
            // different calls). Name whom this member waits for.
            return direct
                .into_iter()
                .map(|(r, d)| Missing::new(r, d))
                .collect();
        }
        out
    }

    /// Runs every send and receive to completion, concurrently, by the
    /// call's deadline.
    ///
    /// `on_recv(i, off, bytes)` is called as payload of receive `i` arrives,
    /// with each newly arrived range exactly once, in order (ranges are
    /// multiples of `grain` bytes except the last one of each message).
    ///
    /// Several sends to (receives from) one peer go on the stream in the
    /// order of the slice: each starts once the ones before it are complete.
    /// With gates this pipelines a chain of dependent messages (a whole ring
    /// algorithm) through one call.
    pub(crate) fn exchange(
        &mut self,
        call: &Call<'_>,
        sends: &mut [SendOp],
        recvs: &mut [RecvOp],
        grain: usize,
        on_recv: impl FnMut(usize, usize, &[u8]) -> Result<()>,
    ) -> Result<()> {
        self.exchange_idle(call, sends, recvs, grain, on_recv, &mut || false)
    }

    /// [`Mesh::exchange`] that calls `idle()` whenever no socket could
    /// progress, before spinning or sleeping: local work (a copy that is
    /// needed anyway) fills the time the network leaves free. `idle` returns
    /// whether it did anything; once it returns false it is not called again.
    pub(crate) fn exchange_idle(
        &mut self,
        call: &Call<'_>,
        sends: &mut [SendOp],
        recvs: &mut [RecvOp],
        grain: usize,
        mut on_recv: impl FnMut(usize, usize, &[u8]) -> Result<()>,
        idle: &mut dyn FnMut() -> bool,
    ) -> Result<()> {
        if let Some(e) = self.aborted_error(call) {
            return Err(e);
        }
        let first = std::mem::replace(&mut self.first, false);
        let right = (self.rank + 1) % self.world;
        let left = (self.rank + self.world - 1) % self.world;
        let ring_send = first && !sends.iter().any(|s| s.peer == right);
        let ring_recv = first && !recvs.iter().any(|r| r.peer == left);
        if ring_send || ring_recv {
            // The ring frames go after this exchange's own messages: they are
            // the only ones with that neighbour, so the stream order holds.
            let none = std::ptr::NonNull::<u8>::dangling().as_ptr();
            let mut s2 = self.spare_sends.take();
            let mut r2 = self.spare_recvs.take();
            s2.extend(sends.iter().cloned());
            r2.extend(recvs.iter().cloned());
            if ring_send {
                let mut o = SendOp::raw(right, none, 0);
                o.ring_only = true;
                s2.push(o);
            }
            if ring_recv {
                let mut o = RecvOp::raw(left, none, 0);
                o.ring_only = true;
                r2.push(o);
            }
            let own = recvs.len();
            let res = self.run_exchange(
                call,
                &mut s2,
                &mut r2,
                grain,
                &mut |i, off, b| if i < own { on_recv(i, off, b) } else { Ok(()) },
                idle,
            );
            self.spare_sends.put(s2);
            self.spare_recvs.put(r2);
            return res;
        }
        self.run_exchange(call, sends, recvs, grain, &mut on_recv, idle)
    }

    /// Numbers and describes the messages, then runs the poll loop.
    fn run_exchange(
        &mut self,
        call: &Call<'_>,
        sends: &mut [SendOp],
        recvs: &mut [RecvOp],
        grain: usize,
        on_recv: &mut OnRecv<'_>,
        idle: &mut dyn FnMut() -> bool,
    ) -> Result<()> {
        let kind = call.desc.op.code();
        let right = (self.rank + 1) % self.world;
        let left = (self.rank + self.world - 1) % self.world;
        for s in sends.iter_mut() {
            let p = self.peer(s.peer);
            let mut at = 0;
            let (k, desc) = match s.desc {
                Some(d) => (P2P_KIND, Some(d)),
                None if !p.desc_sent => {
                    p.desc_sent = true;
                    if s.peer == right {
                        // The call's ring frame leads this stream.
                        let h = Header {
                            kind,
                            flags: FLAG_DESC,
                            seq: p.send_seq,
                            len: 0,
                        };
                        s.hdr[..HDR].copy_from_slice(&h.encode());
                        s.hdr[HDR..MAX_HDR].copy_from_slice(&call.desc.to_wire());
                        p.send_seq = p.send_seq.wrapping_add(1);
                        at = MAX_HDR;
                        (kind, None)
                    } else {
                        (kind, Some(call.desc))
                    }
                }
                None => (kind, None),
            };
            s.done = 0;
            if s.ring_only {
                s.hlen = at;
                continue;
            }
            let h = Header {
                kind: k,
                flags: if desc.is_some() { FLAG_DESC } else { 0 },
                seq: p.send_seq,
                len: s.len as u64,
            };
            s.hdr[at..at + HDR].copy_from_slice(&h.encode());
            if let Some(d) = desc {
                s.hdr[at + HDR..at + MAX_HDR].copy_from_slice(&d.to_wire());
            }
            s.hlen = at + h.wire_len();
            p.send_seq = p.send_seq.wrapping_add(1);
        }
        for r in recvs.iter_mut() {
            let p = self.peer(r.peer);
            let (k, expect) = match r.desc {
                Some(d) => (P2P_KIND, Some(d)),
                None if !p.desc_recvd => {
                    p.desc_recvd = true;
                    (kind, Some(call.desc))
                }
                None => (kind, None),
            };
            r.kind = k;
            r.expect = expect;
            r.ring = r.desc.is_none() && expect.is_some() && r.peer == left;
            r.hlen = match (r.ring, r.ring_only, expect.is_some()) {
                (true, true, _) => MAX_HDR,
                (true, false, _) => RING_HDR,
                (false, _, true) => MAX_HDR,
                (false, _, false) => HDR,
            };
            r.done = 0;
            r.carry = 0;
        }
        // Payload bytes of each receive already handed to `on_recv`.
        let mut reported: [usize; 64] = [0; 64];
        let mut reported_vec: Vec<usize> = Vec::new();
        let reported: &mut [usize] = if recvs.len() <= 64 {
            &mut reported[..recvs.len()]
        } else {
            reported_vec.resize(recvs.len(), 0);
            &mut reported_vec
        };
        let mut busy = std::mem::take(&mut self.busy);
        busy.resize(self.world, 0);
        let res = self.exchange_loop(
            call,
            sends,
            recvs,
            grain.max(1),
            on_recv,
            reported,
            &mut busy,
            idle,
        );
        self.busy = busy;
        res
    }

    /// The peers this member is waiting for, with what is outstanding: one
    /// entry per peer and direction, for the operation in progress (later
    /// ones with the same peer wait behind it).
    fn outstanding(sends: &[SendOp], recvs: &[RecvOp]) -> Vec<(usize, String)> {
        let mut out: Vec<(usize, String)> = recvs
            .iter()
            .enumerate()
            .filter(|&(i, r)| {
                !r.finished() && !recvs[..i].iter().any(|q| q.peer == r.peer && !q.finished())
            })
            .map(|(_, r)| {
                (
                    r.peer,
                    format!("receive {}/{} bytes", r.payload_done(), r.len),
                )
            })
            .collect();
        for (i, s) in sends.iter().enumerate() {
            if !s.complete() && !sends[..i].iter().any(|t| t.peer == s.peer && !t.complete()) {
                if out.iter().any(|(p, _)| *p == s.peer) {
                    continue;
                }
                out.push((
                    s.peer,
                    format!("send {}/{} bytes", s.done.saturating_sub(s.hlen), s.len),
                ));
            }
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn exchange_loop(
        &mut self,
        call: &Call<'_>,
        sends: &mut [SendOp],
        recvs: &mut [RecvOp],
        grain: usize,
        on_recv: &mut OnRecv<'_>,
        reported: &mut [usize],
        busy: &mut [u8],
        idle: &mut dyn FnMut() -> bool,
    ) -> Result<()> {
        let op = &|| call.name();
        let mut idle_left = true;
        let mut last_progress = Instant::now();
        let total = call.deadline.elapsed() + call.deadline.remaining();
        let every = notice_every(total);
        let mut next_notice: Option<Instant> = None;
        loop {
            let mut progress = false;
            let mut pending = false;
            busy.fill(0);
            // Receives first: draining the kernel buffers lets peers send on.
            for (i, r) in recvs.iter_mut().enumerate() {
                if r.finished() {
                    continue;
                }
                if busy[r.peer] & RECV_BUSY != 0 {
                    pending = true;
                    continue;
                }
                match self.try_recv(call, r, i, on_recv) {
                    Ok(p) => progress |= p,
                    Err(e) => {
                        if matches!(e, CommError::CallMismatch { .. }) && r.desc.is_none() {
                            self.announce(call, sends);
                        }
                        return Err(e);
                    }
                }
                if !r.finished() {
                    busy[r.peer] |= RECV_BUSY;
                }
                if r.cap.is_some() {
                    // The `carry` bytes of a split element were not handed on yet.
                    reported[i] = r.payload_done() - r.carry;
                    if !r.finished() {
                        pending = true;
                    }
                    continue;
                }
                let avail = r.payload_done();
                let rep = reported[i];
                let upto = if r.finished() {
                    avail
                } else {
                    avail - avail % grain
                };
                if upto > rep {
                    if let Span::Contig(p) = r.span {
                        // SAFETY: bytes `rep..upto` of the receive buffer were
                        // written by the kernel and are never written again in
                        // this exchange; the caller keeps the buffer alive
                        // until we return.
                        let bytes = unsafe { std::slice::from_raw_parts(p.add(rep), upto - rep) };
                        on_recv(i, rep, bytes)?;
                    }
                    reported[i] = upto;
                }
                if !r.finished() {
                    pending = true;
                }
            }
            for s in sends.iter_mut() {
                if s.complete() {
                    continue;
                }
                if busy[s.peer] & SEND_BUSY != 0 {
                    pending = true;
                    continue;
                }
                let limit = match s.gate {
                    Some(g) => s.hlen + reported[g].min(s.len),
                    None => s.hlen + s.len,
                };
                if s.done < limit && self.try_send(s, limit, call)? {
                    progress = true;
                }
                if !s.complete() {
                    busy[s.peer] |= SEND_BUSY;
                    pending = true;
                }
            }
            if !pending {
                return Ok(());
            }
            if !progress && idle_left {
                idle_left = idle();
                progress = idle_left;
            }
            let now = Instant::now();
            if progress {
                last_progress = now;
                continue;
            }
            // What the data connections said comes first (a call mismatch
            // seen here, rather than the peer's abort over it).
            if let Some(e) = self.aborted_error(call) {
                return Err(e);
            }
            if now >= call.deadline.instant() {
                return Err(self.timed_out(call, sends, recvs, every));
            }
            if now.duration_since(last_progress) < self.busy_poll {
                // Yield rather than pure spinning: with more ranks than cores
                // the peer we wait for may need this core.
                std::thread::yield_now();
                continue;
            }
            // About to sleep: report long waits, and tell the peers whom we
            // wait for (so whoever times out can find the rank at fault).
            call.waiting(|| {
                Self::outstanding(sends, recvs)
                    .into_iter()
                    .map(|(r, _)| r)
                    .collect()
            });
            let stalled = now.duration_since(last_progress);
            if stalled >= every && next_notice.is_none_or(|t| now >= t) {
                let missing = Self::outstanding(sends, recvs)
                    .into_iter()
                    .map(|(r, _)| r)
                    .collect();
                self.notify_waiting(missing);
                next_notice = Some(now + every);
            }
            let wake = next_notice
                .unwrap_or(last_progress + every)
                .saturating_duration_since(now)
                .max(Duration::from_millis(1));
            self.wait(sends, recvs, reported, call, wake, op)?;
        }
    }

    /// The error of a call whose deadline passed: an abort that arrived in
    /// the meantime, else a timeout naming the ranks really at fault.
    fn timed_out(
        &mut self,
        call: &Call<'_>,
        sends: &[SendOp],
        recvs: &[RecvOp],
        every: Duration,
    ) -> CommError {
        for r in 0..self.world {
            if r != self.rank {
                let _ = self.drain_control(r);
            }
        }
        if let Some(e) = self.aborted_error(call) {
            return e;
        }
        let direct = Self::outstanding(sends, recvs);
        let culprits = self.culprits(direct, every * 3 + Duration::from_millis(200));
        call.timeout(culprits)
    }

    /// Sleeps in poll() until some pending operation can progress, a control
    /// frame arrives, `wake` passes or the deadline.
    #[allow(clippy::too_many_arguments)]
    fn wait(
        &mut self,
        sends: &[SendOp],
        recvs: &[RecvOp],
        reported: &[usize],
        call: &Call<'_>,
        wake: Duration,
        op: &dyn Fn() -> String,
    ) -> Result<()> {
        self.pollset.clear();
        let add = |set: &mut Vec<(usize, PollFlags, bool)>, peer: usize, f: PollFlags| {
            if let Some(e) = set.iter_mut().find(|e| e.0 == peer && !e.2) {
                e.1 |= f;
            } else {
                set.push((peer, f | PollFlags::RDHUP, false));
            }
        };
        for r in recvs.iter().filter(|r| !r.finished()) {
            add(&mut self.pollset, r.peer, PollFlags::IN);
        }
        for (i, s) in sends.iter().enumerate() {
            // Only the first unfinished send to each peer can progress.
            if s.complete() || sends[..i].iter().any(|t| t.peer == s.peer && !t.complete()) {
                continue;
            }
            let limit = match s.gate {
                Some(g) => s.hlen + reported[g].min(s.len),
                None => s.hlen + s.len,
            };
            // A gated send with nothing to forward waits on its receive only.
            let f = if s.done < limit {
                PollFlags::OUT
            } else {
                PollFlags::empty()
            };
            add(&mut self.pollset, s.peer, f);
        }
        for (r, p) in self.peers.iter().enumerate() {
            if p.as_ref().is_some_and(|p| p.ctl_open) {
                self.pollset.push((r, PollFlags::IN, true));
            }
        }
        let mut fds: Vec<PollFd<'_>> = self
            .pollset
            .iter()
            .map(|&(p, f, ctl)| {
                let peer = self.peers[p]
                    .as_ref()
                    .unwrap_or_else(|| unreachable!("polled peers exist"));
                PollFd::new(if ctl { &peer.ctl } else { &peer.sock }, f)
            })
            .collect();
        let rem = call
            .deadline
            .remaining()
            .min(wake)
            .min(Duration::from_secs(1));
        match rustix::event::poll(&mut fds, Some(&timespec(rem))) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(e) => return Err(CommError::io(format!("poll() in {}", op()), e.into())),
        }
        let events: Vec<(usize, PollFlags, bool, PollFlags)> = fds
            .iter()
            .zip(self.pollset.iter())
            .map(|(fd, &(p, f, ctl))| (p, f, ctl, fd.revents()))
            .filter(|e| !e.3.is_empty())
            .collect();
        drop(fds);
        for (p, f, ctl, rev) in events {
            if ctl {
                self.drain_control(p)?;
            } else if !f.contains(PollFlags::IN)
                && rev.intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR)
            {
                // A peer that hung up while we only send to it is gone;
                // receives notice EOF themselves when they read.
                return Err(self.lost(
                    p,
                    call,
                    "the connection was closed while data was still to be sent to it".into(),
                ));
            }
        }
        Ok(())
    }

    /// Non-blocking write of as much of `s` (up to `limit` bytes, header
    /// included) as the kernel takes. True if anything was written.
    fn try_send(&mut self, s: &mut SendOp, limit: usize, call: &Call<'_>) -> Result<bool> {
        let op = &|| call.name();
        let peer = s.peer;
        let mut any = false;
        while s.done < limit {
            let p = self.peer(peer);
            let mut iov = [IoSlice::new(&[]); MAX_IOV + 1];
            let mut n = 0;
            let from = s.done.saturating_sub(s.hlen);
            if s.done < s.hlen {
                iov[0] = IoSlice::new(&s.hdr[s.done..s.hlen]);
                n = 1;
            }
            if limit > s.hlen {
                // SAFETY: the span is readable for the whole exchange (SendOp
                // contract) and `from..limit - hlen` lies inside it.
                unsafe { s.span.gather(from, limit - s.hlen, &mut iov, &mut n) };
            }
            let res = if n == 1 && s.done >= s.hlen {
                rustix::net::send(&p.sock, &iov[0], SendFlags::NOSIGNAL | SendFlags::DONTWAIT)
            } else {
                rustix::net::sendmsg(
                    &p.sock,
                    &iov[..n],
                    &mut SendAncillaryBuffer::default(),
                    SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
                )
            };
            match res {
                Ok(0) => break,
                Ok(k) => {
                    s.done += k;
                    any = true;
                }
                Err(Errno::AGAIN) => break,
                Err(Errno::INTR) => continue,
                Err(e) if is_lost(e) => {
                    return Err(self.lost(peer, call, format!("sending failed: {e}")));
                }
                Err(e) => {
                    return Err(CommError::io(
                        format!("sending to rank {peer} in {}", op()),
                        e.into(),
                    ))
                }
            }
        }
        Ok(any)
    }

    /// Checks a message's header once it is complete: the peer's call
    /// description first (a different call is a `CallMismatch`, whatever the
    /// sizes), then kind, sequence and length.
    fn check_header(&self, call: &Call<'_>, r: &RecvOp, seq: u32) -> Result<u32> {
        let op = || call.name();
        let peer = r.peer;
        let check = |h: &Header, seq: u32, len: u64| -> Result<()> {
            if h.kind != r.kind {
                return Err(CommError::Protocol(format!(
                    "{}: rank {peer} sent a `{}` message where `{}` was expected; members must \
                     call the same operations in the same order",
                    op(),
                    wire::kind_name(h.kind),
                    wire::kind_name(r.kind)
                )));
            }
            if h.seq != seq {
                return Err(CommError::Protocol(format!(
                    "{}: message {} from rank {peer} arrived where message {seq} was expected",
                    op(),
                    h.seq
                )));
            }
            if h.len != len {
                return Err(CommError::Protocol(format!(
                    "{}: rank {peer} sent {} bytes but {len} were expected; sizes must match on \
                     every member",
                    op(),
                    h.len
                )));
            }
            Ok(())
        };
        let first = Header::decode(&r.hdr)?;
        if let Some(mine) = r.expect {
            let theirs = CallDesc::from_wire(&r.hdr[HDR..MAX_HDR])?;
            mine.check_peer(&theirs, peer, &mine.to_string())?;
        }
        if !r.ring {
            check(&first, seq, r.len as u64)?;
            return Ok(1);
        }
        check(&first, seq, 0)?;
        if r.ring_only {
            return Ok(1);
        }
        let h = Header::decode(&r.hdr[MAX_HDR..])?;
        if h.flags != 0 {
            return Err(CommError::Protocol(format!(
                "{}: rank {peer} sent a second call description (members out of step)",
                op()
            )));
        }
        check(&h, seq.wrapping_add(1), r.len as u64)?;
        Ok(2)
    }

    /// Non-blocking read into `r`; checks the header once complete.
    fn try_recv(
        &mut self,
        call: &Call<'_>,
        r: &mut RecvOp,
        idx: usize,
        on_recv: &mut OnRecv<'_>,
    ) -> Result<bool> {
        let op = &|| call.name();
        let peer = r.peer;
        let mut any = false;
        while !r.finished() {
            let p = self.peers[peer]
                .as_mut()
                .unwrap_or_else(|| unreachable!("receives come from other ranks"));
            let res = if let Some(cap) = r.cap {
                let Span::Contig(ptr) = r.span else {
                    unreachable!("streaming receives are contiguous")
                };
                let want = (cap - r.carry).min(r.len - r.payload_done());
                // SAFETY: a streaming receive owns `ptr..ptr+cap` for the whole
                // exchange; every piece but the `carry` bytes before this range
                // was handed on before this read.
                let piece = unsafe { std::slice::from_raw_parts_mut(ptr.add(r.carry), want) };
                if r.done < r.hlen {
                    let mut iov = [
                        IoSliceMut::new(&mut r.hdr[r.done..r.hlen]),
                        IoSliceMut::new(piece),
                    ];
                    rustix::io::readv(&p.sock, &mut iov)
                } else {
                    rustix::io::read(&p.sock, piece)
                }
            } else {
                let from = r.payload_done();
                let span = r.span;
                let mut iov: [IoSliceMut<'_>; MAX_IOV + 1] =
                    std::array::from_fn(|_| IoSliceMut::new(&mut []));
                let mut n = 0;
                if r.done < r.hlen {
                    // The header's rest, then the payload: one call for small
                    // messages.
                    iov[0] = IoSliceMut::new(&mut r.hdr[r.done..r.hlen]);
                    n = 1;
                }
                if r.len > from {
                    // SAFETY: the span is writable and unaliased for the whole
                    // exchange (RecvOp contract); `from..len` lies inside it.
                    unsafe { span.scatter(from, r.len, &mut iov, &mut n) };
                }
                if n == 1 {
                    rustix::io::read(&p.sock, &mut iov[0][..])
                } else {
                    rustix::io::readv(&p.sock, &mut iov[..n])
                }
            };
            match res {
                Ok(0) => {
                    let detail = format!(
                        "connection closed (EOF) after {} of {} bytes of a message",
                        r.payload_done(),
                        r.len
                    );
                    return Err(self.lost(peer, call, detail));
                }
                Ok(n) => {
                    let was = r.done;
                    r.done += n;
                    any = true;
                    if was < HDR && r.done >= HDR {
                        // The fixed part: is a description where we expect one?
                        let h = Header::decode(&r.hdr)?;
                        let want = r.expect.is_some();
                        if (h.flags & FLAG_DESC != 0) != want {
                            return Err(CommError::Protocol(format!(
                                "{}: rank {peer} sent a message {} a call description where \
                                 one was {}expected (members out of step)",
                                op(),
                                if h.flags & FLAG_DESC != 0 {
                                    "with"
                                } else {
                                    "without"
                                },
                                if want { "" } else { "not " }
                            )));
                        }
                    }
                    if was < r.hlen && r.done >= r.hlen {
                        let p = self.peers[peer]
                            .as_ref()
                            .unwrap_or_else(|| unreachable!("receives come from other ranks"));
                        let frames = self.check_header(call, r, p.recv_seq)?;
                        let p = self.peer(peer);
                        p.recv_seq = p.recv_seq.wrapping_add(frames);
                    }
                    if r.cap.is_some() && r.done > r.hlen {
                        let Span::Contig(ptr) = r.span else {
                            unreachable!("streaming receives are contiguous")
                        };
                        let first = was.max(r.hlen);
                        let avail = r.carry + (r.done - first);
                        let hand = avail - avail % r.unit;
                        // SAFETY: the streaming buffer holds `carry` earlier bytes
                        // followed by the `r.done - first` bytes just read.
                        let buf = unsafe { std::slice::from_raw_parts_mut(ptr, avail) };
                        if hand > 0 {
                            on_recv(idx, first - r.hlen - r.carry, &buf[..hand])?;
                        }
                        buf.copy_within(hand..avail, 0);
                        r.carry = avail - hand;
                    }
                }
                Err(Errno::AGAIN) => break,
                Err(Errno::INTR) => continue,
                Err(e) if is_lost(e) => {
                    return Err(self.lost(peer, call, format!("receiving failed: {e}")));
                }
                Err(e) => {
                    return Err(CommError::io(
                        format!("receiving from rank {peer} in {}", op()),
                        e.into(),
                    ))
                }
            }
        }
        Ok(any)
    }
}

/// Writes all of `frame` to a non-blocking socket, giving up at `until`.
fn write_bounded(sock: &TcpStream, frame: &[u8], until: Instant) {
    let mut off = 0;
    while off < frame.len() {
        match rustix::net::send(
            sock,
            &frame[off..],
            SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
        ) {
            Ok(n) => off += n,
            Err(Errno::INTR) => {}
            Err(Errno::AGAIN) => {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return;
                }
                let mut fds = [PollFd::new(sock, PollFlags::OUT)];
                let _ = rustix::event::poll(&mut fds, Some(&timespec(left)));
            }
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use comm_core::{Collective, DType};

    #[test]
    fn only_an_abort_at_the_same_position_is_a_mismatch() {
        let mine = CallDesc::new(Collective::AllReduce, 172, DType::F32, 1024);
        // The peer finished #172 and aborted in #173 (another rank was
        // lost): not a mismatch, its culprits are what to report.
        let later = CallDesc::new(Collective::AllReduce, 173, DType::I64, 1024);
        assert!(!Mesh::abort_is_mismatch(&mine, &later));
        let earlier = CallDesc::new(Collective::Broadcast, 171, DType::F32, 8);
        assert!(!Mesh::abort_is_mismatch(&mine, &earlier));
        // A different call at the same position is one.
        let other = CallDesc::new(Collective::Broadcast, 172, DType::F32, 1024);
        assert!(Mesh::abort_is_mismatch(&mine, &other));
        // Point-to-point numbers are another sequence.
        let p2p = CallDesc::new(Collective::Send, 172, DType::F32, 1024);
        assert!(!Mesh::abort_is_mismatch(&mine, &p2p));
    }
}
