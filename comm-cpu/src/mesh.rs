//! The data plane: one non-blocking TCP connection per peer and a poll loop
//! that progresses any number of sends and receives at once.
//!
//! Every message starts with a 16-byte header: magic, operation kind, the
//! per-direction sequence number and the payload length. The receiver knows
//! what it expects and checks all four, so messages of different operations
//! (a point-to-point send versus a collective) can never be confused: a
//! mismatch is a [`CommError::Protocol`] naming both sides' view.

use std::io::{IoSlice, IoSliceMut};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use comm_core::{CommError, Deadline, Result};
use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;
use rustix::net::{SendAncillaryBuffer, SendFlags};

pub(crate) const HDR: usize = 16;

/// Callback given each arrived payload piece: (receive index, offset, bytes).
type OnRecv<'a> = dyn FnMut(usize, usize, &[u8]) -> Result<()> + 'a;
const MAGIC: [u8; 2] = [0xD7, 0x5C];

/// Which operation a message belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    AllReduce = 1,
    AllGather = 2,
    ReduceScatter = 3,
    Broadcast = 4,
    Gather = 5,
    AllToAll = 6,
    P2p = 7,
    Barrier = 8,
    /// Sent by a member that fails, so others report the root cause.
    Abort = 0xAB,
}

impl Kind {
    fn name(code: u8) -> &'static str {
        match code {
            1 => "all_reduce",
            2 => "all_gather",
            3 => "reduce_scatter",
            4 => "broadcast",
            5 => "gather",
            6 => "all_to_all",
            7 => "send/recv",
            8 => "barrier",
            0xAB => "abort",
            _ => "unknown",
        }
    }
}

fn header(kind: Kind, seq: u32, len: u64) -> [u8; HDR] {
    let mut h = [0u8; HDR];
    h[..2].copy_from_slice(&MAGIC);
    h[2] = kind as u8;
    h[4..8].copy_from_slice(&seq.to_le_bytes());
    h[8..16].copy_from_slice(&len.to_le_bytes());
    h
}

/// One connection to a peer.
#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) sock: TcpStream,
    send_seq: u32,
    recv_seq: u32,
    /// A message is partly written: nothing else may be put on the stream.
    mid_send: bool,
}

impl Peer {
    pub(crate) fn new(sock: TcpStream) -> Self {
        Peer {
            sock,
            send_seq: 0,
            recv_seq: 0,
            mid_send: false,
        }
    }
}

/// A message to send: header + `len` bytes at `ptr`.
#[derive(Debug)]
pub(crate) struct SendOp {
    pub(crate) peer: usize,
    ptr: *const u8,
    len: usize,
    hdr: [u8; HDR],
    /// Bytes written, header included.
    done: usize,
    /// Index of a receive whose payload progress bounds what may be sent
    /// (pipelined forwarding).
    gate: Option<usize>,
}

impl SendOp {
    /// A send of `data` to `peer`.
    pub(crate) fn new(peer: usize, data: &[u8]) -> Self {
        SendOp {
            peer,
            ptr: data.as_ptr(),
            len: data.len(),
            hdr: [0; HDR],
            done: 0,
            gate: None,
        }
    }
    /// A send of `len` bytes at `ptr`. The caller keeps them readable and
    /// unwritten by anyone else until the exchange returns.
    pub(crate) fn raw(peer: usize, ptr: *const u8, len: usize) -> Self {
        SendOp {
            peer,
            ptr,
            len,
            hdr: [0; HDR],
            done: 0,
            gate: None,
        }
    }
    /// Forwards bytes only as fast as receive `recv` delivers them.
    pub(crate) fn gated(mut self, recv: usize) -> Self {
        self.gate = Some(recv);
        self
    }
}

/// A message to receive: `len` bytes into `ptr`.
#[derive(Debug)]
pub(crate) struct RecvOp {
    pub(crate) peer: usize,
    ptr: *mut u8,
    len: usize,
    hdr: [u8; HDR],
    /// Bytes read, header included.
    done: usize,
    /// Streaming: `ptr` is a reusable buffer of `cap` bytes, each read lands
    /// at its start and is handed to the callback at once.
    cap: Option<usize>,
    /// Streaming: pieces handed on are whole multiples of `unit` bytes (one
    /// element); `carry` bytes of a split element wait at the buffer start.
    unit: usize,
    carry: usize,
}

impl RecvOp {
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
        RecvOp {
            peer,
            ptr,
            len,
            hdr: [0; HDR],
            done: 0,
            cap: Some(cap.max(2 * unit)),
            unit,
            carry: 0,
        }
    }
    /// A receive into `buf` from `peer`.
    pub(crate) fn new(peer: usize, buf: &mut [u8]) -> Self {
        RecvOp {
            peer,
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            hdr: [0; HDR],
            done: 0,
            cap: None,
            unit: 1,
            carry: 0,
        }
    }
    /// A receive of `len` bytes into `ptr`. The caller keeps them writable
    /// and untouched by anyone else until the exchange returns.
    pub(crate) fn raw(peer: usize, ptr: *mut u8, len: usize) -> Self {
        RecvOp {
            peer,
            ptr,
            len,
            hdr: [0; HDR],
            done: 0,
            cap: None,
            unit: 1,
            carry: 0,
        }
    }
    fn payload_done(&self) -> usize {
        self.done.saturating_sub(HDR)
    }
    fn finished(&self) -> bool {
        self.done == HDR + self.len
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
    pollset: Vec<(usize, PollFlags)>,
    /// Per peer, per pass of the poll loop: an earlier receive (bit 0) or
    /// send (bit 1) with that peer is unfinished, so later ones wait.
    busy: Vec<u8>,
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
            pollset: Vec::with_capacity(world),
            busy: vec![0; world],
        }
    }

    fn peer(&mut self, r: usize) -> &mut Peer {
        self.peers[r]
            .as_mut()
            .expect("no connection to oneself: callers never address their own rank")
    }

    /// Best effort, never blocking: tells every peer whose stream is at a
    /// message boundary that this member is failing because of `lost`
    /// (`None`: a deadline or a local error).
    pub(crate) fn send_abort(&mut self, lost: Option<usize>) {
        let code = lost.map(|r| r as u32 + 1).unwrap_or(0);
        let h = header(Kind::Abort, code, 0);
        for p in self.peers.iter_mut().flatten() {
            if !p.mid_send {
                let _ = rustix::net::send(&p.sock, &h, SendFlags::NOSIGNAL | SendFlags::DONTWAIT);
            }
        }
    }

    /// Runs every send and receive to completion, concurrently, by `deadline`.
    ///
    /// `on_recv(i, off, bytes)` is called as payload of receive `i` arrives,
    /// with each newly arrived range exactly once, in order (ranges are
    /// multiples of `grain` bytes except the last one of each message).
    ///
    /// Several sends to (receives from) one peer go on the stream in the
    /// order of the slice: each starts once the ones before it are complete.
    /// With gates this pipelines a chain of dependent messages (a whole ring
    /// algorithm) through one call.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn exchange(
        &mut self,
        kind: Kind,
        op: &dyn Fn() -> String,
        sends: &mut [SendOp],
        recvs: &mut [RecvOp],
        deadline: &Deadline,
        grain: usize,
        on_recv: impl FnMut(usize, usize, &[u8]) -> Result<()>,
    ) -> Result<()> {
        self.exchange_idle(
            kind,
            op,
            sends,
            recvs,
            deadline,
            grain,
            on_recv,
            &mut || false,
        )
    }

    /// [`Mesh::exchange`] that calls `idle()` whenever no socket could
    /// progress, before spinning or sleeping: local work (a copy that is
    /// needed anyway) fills the time the network leaves free. `idle` returns
    /// whether it did anything; once it returns false it is not called again.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn exchange_idle(
        &mut self,
        kind: Kind,
        op: &dyn Fn() -> String,
        sends: &mut [SendOp],
        recvs: &mut [RecvOp],
        deadline: &Deadline,
        grain: usize,
        mut on_recv: impl FnMut(usize, usize, &[u8]) -> Result<()>,
        idle: &mut dyn FnMut() -> bool,
    ) -> Result<()> {
        for s in sends.iter_mut() {
            let p = self.peer(s.peer);
            s.hdr = header(kind, p.send_seq, s.len as u64);
            p.send_seq = p.send_seq.wrapping_add(1);
            s.done = 0;
        }
        for r in recvs.iter_mut() {
            r.done = 0;
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
        let grain = grain.max(1);
        let mut last_progress = Instant::now();
        let mut busy = std::mem::take(&mut self.busy);
        busy.resize(self.world, 0);
        let res = self.exchange_loop(
            kind,
            op,
            sends,
            recvs,
            deadline,
            grain,
            &mut on_recv,
            reported,
            &mut busy,
            &mut last_progress,
            idle,
        );
        self.busy = busy;
        res
    }

    #[allow(clippy::too_many_arguments)]
    fn exchange_loop(
        &mut self,
        kind: Kind,
        op: &dyn Fn() -> String,
        sends: &mut [SendOp],
        recvs: &mut [RecvOp],
        deadline: &Deadline,
        grain: usize,
        on_recv: &mut OnRecv<'_>,
        reported: &mut [usize],
        busy: &mut [u8],
        last_progress: &mut Instant,
        idle: &mut dyn FnMut() -> bool,
    ) -> Result<()> {
        let mut idle_left = true;
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
                if self.try_recv(kind, r, i, op, on_recv)? {
                    progress = true;
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
                    // SAFETY: bytes `rep..upto` of the receive buffer were written
                    // by the kernel and are never written again in this exchange;
                    // the caller keeps the buffer alive until we return.
                    let bytes = unsafe { std::slice::from_raw_parts(r.ptr.add(rep), upto - rep) };
                    on_recv(i, rep, bytes)?;
                    reported[i] = upto;
                }
                if !r.finished() {
                    pending = true;
                }
            }
            for s in sends.iter_mut() {
                if s.done == HDR + s.len {
                    continue;
                }
                if busy[s.peer] & SEND_BUSY != 0 {
                    pending = true;
                    continue;
                }
                let limit = match s.gate {
                    Some(g) => HDR + reported[g].min(s.len),
                    None => HDR + s.len,
                };
                if s.done < limit && self.try_send(s, limit, op)? {
                    progress = true;
                }
                if s.done < HDR + s.len {
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
                *last_progress = now;
                continue;
            }
            if now >= deadline.instant() {
                // One entry per peer and direction: the operation in progress
                // (later ones with the same peer wait behind it).
                let mut missing: Vec<String> = recvs
                    .iter()
                    .enumerate()
                    .filter(|&(i, r)| {
                        !r.finished()
                            && !recvs[..i].iter().any(|q| q.peer == r.peer && !q.finished())
                    })
                    .map(|(_, r)| {
                        format!(
                            "rank {} (receive {}/{} bytes)",
                            r.peer,
                            r.payload_done(),
                            r.len
                        )
                    })
                    .collect();
                missing.extend(
                    sends
                        .iter()
                        .enumerate()
                        .filter(|&(i, s)| {
                            s.done < HDR + s.len
                                && !sends[..i]
                                    .iter()
                                    .any(|t| t.peer == s.peer && t.done < HDR + t.len)
                        })
                        .map(|(_, s)| {
                            format!(
                                "rank {} (send {}/{} bytes)",
                                s.peer,
                                s.done.saturating_sub(HDR),
                                s.len
                            )
                        }),
                );
                return Err(CommError::timeout(op(), deadline.elapsed(), missing));
            }
            if now.duration_since(*last_progress) < self.busy_poll {
                // Yield rather than pure spinning: with more ranks than cores
                // the peer we wait for may need this core.
                std::thread::yield_now();
                continue;
            }
            self.wait(sends, recvs, reported, deadline, op)?;
            *last_progress = Instant::now();
        }
    }

    /// Sleeps in poll() until some pending operation can progress or the deadline.
    fn wait(
        &mut self,
        sends: &[SendOp],
        recvs: &[RecvOp],
        reported: &[usize],
        deadline: &Deadline,
        op: &dyn Fn() -> String,
    ) -> Result<()> {
        self.pollset.clear();
        let add = |set: &mut Vec<(usize, PollFlags)>, peer: usize, f: PollFlags| {
            if let Some(e) = set.iter_mut().find(|e| e.0 == peer) {
                e.1 |= f;
            } else {
                set.push((peer, f | PollFlags::RDHUP));
            }
        };
        for r in recvs.iter().filter(|r| !r.finished()) {
            add(&mut self.pollset, r.peer, PollFlags::IN);
        }
        for (i, s) in sends.iter().enumerate() {
            // Only the first unfinished send to each peer can progress.
            if s.done == HDR + s.len
                || sends[..i]
                    .iter()
                    .any(|t| t.peer == s.peer && t.done < HDR + t.len)
            {
                continue;
            }
            let limit = match s.gate {
                Some(g) => HDR + reported[g].min(s.len),
                None => HDR + s.len,
            };
            // A gated send with nothing to forward waits on its receive only.
            let f = if s.done < limit {
                PollFlags::OUT
            } else {
                PollFlags::empty()
            };
            add(&mut self.pollset, s.peer, f);
        }
        let mut fds: Vec<PollFd<'_>> = self
            .pollset
            .iter()
            .map(|&(p, f)| PollFd::new(&self.peers[p].as_ref().expect("peer exists").sock, f))
            .collect();
        let rem = deadline.remaining().min(Duration::from_secs(1));
        let ts = rustix::time::Timespec {
            tv_sec: rem.as_secs() as i64,
            tv_nsec: rem.subsec_nanos() as i64,
        };
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(e) => return Err(CommError::io(format!("poll() in {}", op()), e.into())),
        }
        // A peer that hung up while we only send to it is gone; receives
        // notice EOF themselves when they read.
        for (fd, &(p, f)) in fds.iter().zip(self.pollset.iter()) {
            let rev = fd.revents();
            if !f.contains(PollFlags::IN)
                && rev.intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR)
            {
                return Err(CommError::peer_lost(
                    p,
                    op(),
                    "the connection was closed while data was still to be sent to it",
                ));
            }
        }
        Ok(())
    }

    /// Non-blocking write of as much of `s` (up to `limit` bytes, header
    /// included) as the kernel takes. True if anything was written.
    fn try_send(&mut self, s: &mut SendOp, limit: usize, op: &dyn Fn() -> String) -> Result<bool> {
        let peer = s.peer;
        let p = self.peer(peer);
        let mut any = false;
        while s.done < limit {
            let res = if s.done < HDR {
                // SAFETY: `ptr..ptr+len` is readable for the whole exchange (SendOp contract).
                let payload = unsafe { std::slice::from_raw_parts(s.ptr, limit - HDR) };
                let iov = [IoSlice::new(&s.hdr[s.done..]), IoSlice::new(payload)];
                rustix::net::sendmsg(
                    &p.sock,
                    &iov,
                    &mut SendAncillaryBuffer::default(),
                    SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
                )
            } else {
                let off = s.done - HDR;
                // SAFETY: as above; `off < limit - HDR <= len`.
                let payload =
                    unsafe { std::slice::from_raw_parts(s.ptr.add(off), limit - HDR - off) };
                rustix::net::send(&p.sock, payload, SendFlags::NOSIGNAL | SendFlags::DONTWAIT)
            };
            match res {
                Ok(0) => break,
                Ok(n) => {
                    s.done += n;
                    any = true;
                    p.mid_send = s.done < HDR + s.len;
                }
                Err(Errno::AGAIN) => break,
                Err(Errno::INTR) => continue,
                Err(e) => return Err(socket_error(e, peer, "sending", "to", op)),
            }
        }
        Ok(any)
    }

    /// Non-blocking read into `r`; checks the header once complete.
    fn try_recv(
        &mut self,
        kind: Kind,
        r: &mut RecvOp,
        idx: usize,
        op: &dyn Fn() -> String,
        on_recv: &mut OnRecv<'_>,
    ) -> Result<bool> {
        let peer = r.peer;
        let world = self.world;
        let p = self.peer(peer);
        let mut any = false;
        while !r.finished() {
            let res = if let Some(cap) = r.cap {
                let want = (cap - r.carry).min(r.len - r.payload_done());
                // SAFETY: a streaming receive owns `ptr..ptr+cap` for the whole
                // exchange; every piece but the `carry` bytes before this range
                // was handed on before this read.
                let piece = unsafe { std::slice::from_raw_parts_mut(r.ptr.add(r.carry), want) };
                if r.done < HDR {
                    let mut iov = [
                        IoSliceMut::new(&mut r.hdr[r.done..]),
                        IoSliceMut::new(piece),
                    ];
                    rustix::io::readv(&p.sock, &mut iov)
                } else {
                    rustix::io::read(&p.sock, piece)
                }
            } else if r.done < HDR {
                // SAFETY: `ptr..ptr+len` is writable and unaliased for the whole
                // exchange (RecvOp contract).
                let payload = unsafe { std::slice::from_raw_parts_mut(r.ptr, r.len) };
                let (h, _) = r.hdr.split_at_mut(HDR);
                let mut iov = [IoSliceMut::new(&mut h[r.done..]), IoSliceMut::new(payload)];
                rustix::io::readv(&p.sock, &mut iov)
            } else {
                let off = r.done - HDR;
                // SAFETY: as above; `off < len`.
                let payload =
                    unsafe { std::slice::from_raw_parts_mut(r.ptr.add(off), r.len - off) };
                rustix::io::read(&p.sock, payload)
            };
            match res {
                Ok(0) => {
                    return Err(CommError::peer_lost(
                        peer,
                        op(),
                        format!(
                            "connection closed (EOF) after {} of {} bytes of a message",
                            r.payload_done(),
                            r.len
                        ),
                    ));
                }
                Ok(n) => {
                    let was = r.done;
                    r.done += n;
                    any = true;
                    if was < HDR && r.done >= HDR {
                        check_header(&r.hdr, kind, p.recv_seq, r.len, peer, world, op)?;
                        p.recv_seq = p.recv_seq.wrapping_add(1);
                    }
                    if r.cap.is_some() && r.done > HDR {
                        let first = was.max(HDR);
                        let avail = r.carry + (r.done - first);
                        let hand = avail - avail % r.unit;
                        // SAFETY: the streaming buffer holds `carry` earlier bytes
                        // followed by the `r.done - first` bytes just read.
                        let buf = unsafe { std::slice::from_raw_parts_mut(r.ptr, avail) };
                        if hand > 0 {
                            on_recv(idx, first - HDR - r.carry, &buf[..hand])?;
                        }
                        buf.copy_within(hand..avail, 0);
                        r.carry = avail - hand;
                    }
                }
                Err(Errno::AGAIN) => break,
                Err(Errno::INTR) => continue,
                Err(e) => return Err(socket_error(e, peer, "receiving", "from", op)),
            }
        }
        Ok(any)
    }
}

/// A failed socket call: `PeerLost` when the peer went away, else an I/O
/// error naming the peer and the operation.
fn socket_error(
    e: Errno,
    peer: usize,
    verb: &str,
    prep: &str,
    op: impl Fn() -> String,
) -> CommError {
    if is_lost(e) {
        CommError::peer_lost(peer, op(), format!("{verb} failed: {e}"))
    } else {
        CommError::io(format!("{verb} {prep} rank {peer} in {}", op()), e.into())
    }
}

fn check_header(
    h: &[u8; HDR],
    kind: Kind,
    seq: u32,
    len: usize,
    peer: usize,
    world: usize,
    op: &dyn Fn() -> String,
) -> Result<()> {
    if h[..2] != MAGIC {
        return Err(CommError::Protocol(format!(
            "{}: rank {peer} sent bytes that are not a message header (stream out of sync)",
            op()
        )));
    }
    let got_seq = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
    let got_len = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
    if h[2] == Kind::Abort as u8 {
        return Err(
            match got_seq
                .checked_sub(1)
                .map(|r| r as usize)
                .filter(|&r| r < world)
            {
                Some(lost) => CommError::peer_lost(
                    lost,
                    op(),
                    format!("rank {peer} aborted after losing rank {lost}"),
                ),
                None => CommError::peer_lost(
                    peer,
                    op(),
                    "that rank aborted after a timeout or local error",
                ),
            },
        );
    }
    if h[2] != kind as u8 {
        return Err(CommError::Protocol(format!(
            "{}: rank {peer} sent a `{}` message where `{}` was expected; members must call \
             the same operations in the same order",
            op(),
            Kind::name(h[2]),
            Kind::name(kind as u8)
        )));
    }
    if got_seq != seq {
        return Err(CommError::Protocol(format!(
            "{}: message {got_seq} from rank {peer} arrived where message {seq} was expected",
            op()
        )));
    }
    if got_len != len as u64 {
        return Err(CommError::Protocol(format!(
            "{}: rank {peer} sent {got_len} bytes but {len} were expected; sizes must match on \
             every member",
            op()
        )));
    }
    Ok(())
}
