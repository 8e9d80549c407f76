//! Point-to-point messages: a batch of sends and receives progressed
//! together, so a ring exchange (each rank sends to the next and receives
//! from the previous) cannot deadlock whatever the message sizes.
//!
//! Each ordered pair `s -> d` has a channel of two slots. A message is cut
//! into slot-sized chunks (an empty message is one empty chunk); before
//! publishing a chunk the sender writes the slot's header: the message's
//! [`CallDesc`] and where the chunk lies in it. The receiver checks the
//! description against its own (a difference is
//! [`CommError::CallMismatch`]), copies the chunk out and acknowledges it,
//! posting its own description in the acknowledgement line so the sender
//! can check too (the sender reports a mismatch the receiver flagged).
//!
//! A rank with nothing to do sleeps on its *doorbell*, which every sender
//! and receiver it deals with bumps after publishing, so one futex serves
//! any number of channels.

use std::sync::atomic::{fence, Ordering::*};

use comm_core::{Call, CallDesc, CommError, Missing, P2p, Result};

use super::ShmCommunicator;
use crate::segment::Watch;
use crate::wire::SlotHeader;

/// Progress of one message of a batch.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Progress {
    /// Bytes moved.
    done: usize,
    /// Chunks moved.
    chunks: usize,
    finished: bool,
}

/// Posted-description tag bit: the receiver found a mismatch.
const MISMATCH: u64 = 1 << 63;
/// Word of the acknowledgement line holding the posted tag.
const TAG: usize = 8;

impl ShmCommunicator {
    /// Runs every message of `ops` to completion.
    pub(super) fn progress_p2p(&mut self, call: &Call<'_>, ops: &mut [P2p<'_>]) -> Result<()> {
        let (mut st, mut blocked) = std::mem::take(&mut self.p2p_state);
        st.clear();
        st.resize(ops.len(), Progress::default());
        blocked.resize(self.world, 0);
        let r = self.p2p_loop(call, ops, &mut st, &mut blocked);
        self.p2p_state = (st, blocked);
        r
    }

    fn p2p_loop(
        &mut self,
        call: &Call<'_>,
        ops: &mut [P2p<'_>],
        st: &mut [Progress],
        blocked: &mut [u8],
    ) -> Result<()> {
        loop {
            let bell_line = self.lines.doorbell(self.rank);
            let snapshot = self.seg().flag(bell_line).seq.load(Acquire);
            blocked.fill(0);
            let mut progressed = false;
            let mut remaining = 0;
            for (op, s) in ops.iter_mut().zip(st.iter_mut()) {
                if s.finished {
                    continue;
                }
                let moved = match op {
                    P2p::Send { peer, buf, desc } => {
                        let bytes = buf.expect_host("send")?;
                        self.send_chunks(call, *peer, bytes, desc, s, &mut blocked[*peer])?
                    }
                    P2p::Recv { peer, buf, desc } => {
                        let bytes = buf.expect_host("recv")?;
                        self.recv_chunks(call, *peer, bytes, desc, s, &mut blocked[*peer])?
                    }
                };
                progressed |= moved;
                remaining += usize::from(!s.finished);
            }
            if remaining == 0 {
                return Ok(());
            }
            if progressed {
                continue;
            }
            let missing = || {
                let mut m: Vec<usize> = ops
                    .iter()
                    .zip(st.iter())
                    .filter(|(_, s)| !s.finished)
                    .map(|(o, _)| o.peer())
                    .collect();
                m.dedup();
                m
            };
            // Only the peers this rank still exchanges with: one that
            // finished its part of the batch may already have left.
            let mut peers = missing();
            peers.sort_unstable();
            peers.dedup();
            let seg = self.seg();
            let bell = seg.flag(bell_line);
            let on_sleep = || call.waiting(missing);
            let r = seg.wait(
                bell,
                || bell.seq.load(Acquire) != snapshot,
                Watch::Members(&peers),
                &call.deadline,
                &on_sleep,
            );
            if let Err(e) = r {
                let details = ops
                    .iter()
                    .zip(st.iter())
                    .filter(|(_, s)| !s.finished)
                    .map(|(o, s)| match o {
                        P2p::Send { peer, buf, .. } => Missing::new(
                            *peer,
                            format!(
                                "has received {} of {} bytes sent to it",
                                s.done,
                                buf.nbytes()
                            ),
                        ),
                        P2p::Recv { peer, buf, .. } => Missing::new(
                            *peer,
                            format!(
                                "has sent {} of {} bytes expected from it",
                                s.done,
                                buf.nbytes()
                            ),
                        ),
                    })
                    .collect();
                return Err(self.call_error(call, e, details));
            }
        }
    }

    fn ring(&self, r: usize) {
        let f = self.seg().flag(self.lines.doorbell(r));
        f.seq.fetch_add(1, Release);
        f.wake_if_sleeping();
    }

    /// Sends as many chunks of `bytes` to `d` as free slots allow.
    fn send_chunks(
        &mut self,
        call: &Call<'_>,
        d: usize,
        bytes: &[u8],
        desc: &CallDesc,
        s: &mut Progress,
        blocked: &mut u8,
    ) -> Result<bool> {
        if *blocked & 1 != 0 {
            return Ok(false);
        }
        let me = self.rank;
        let slot_bytes = self.payload.p2p;
        let pair = self.lines.pair(me, d);
        let mut moved = false;
        while !s.finished {
            let c = self.tx[d];
            // At most two chunks in flight: slot c % 2 is free once chunk
            // c - 2 was acknowledged.
            if !self
                .seg()
                .flag(self.lines.acked(me, d))
                .reached(c.wrapping_sub(1))
            {
                self.check_posted(call, d, desc)?;
                *blocked |= 1;
                break;
            }
            let len = slot_bytes.min(bytes.len() - s.done);
            let j = (c & 1) as usize;
            let dst = self.seg().payload_at(self.payload.slot(pair, j), len);
            // SAFETY: slot j of my channel to d (bounds checked by
            // payload_at), free: d acknowledged the chunk that used it.
            unsafe { std::ptr::copy_nonoverlapping(bytes[s.done..].as_ptr(), dst, len) };
            let hdr = SlotHeader {
                desc: desc.to_wire(),
                offset: s.done as u64,
                len: len as u64,
            };
            self.seg()
                .flag(self.lines.slot(me, d, j))
                .store_words(&hdr.encode());
            self.seg()
                .flag(self.lines.sent(me, d))
                .publish(c.wrapping_add(1));
            self.tx[d] = c.wrapping_add(1);
            self.ring(d);
            s.done += len;
            s.chunks += 1;
            moved = true;
            s.finished = s.done == bytes.len();
        }
        if s.finished {
            self.check_posted(call, d, desc)?;
        } else {
            *blocked |= 1;
        }
        Ok(moved)
    }

    /// The sender's side of the description check: what receiver `d`
    /// posted for this message, if it has (a mismatch it flagged is always
    /// reported).
    fn check_posted(&self, call: &Call<'_>, d: usize, desc: &CallDesc) -> Result<()> {
        let line = self.seg().flag(self.lines.acked(self.rank, d));
        let tag = line.words[TAG].load(Acquire);
        let words = line.load_words::<8>();
        fence(Acquire);
        if tag == 0 || line.words[TAG].load(Relaxed) != tag {
            return Ok(());
        }
        if tag & MISMATCH == 0 && tag != desc.seq.wrapping_add(1) {
            return Ok(());
        }
        let mut wire = [0u8; 64];
        for (c, w) in wire.chunks_exact_mut(8).zip(words) {
            c.copy_from_slice(&w.to_le_bytes());
        }
        let theirs = CallDesc::from_wire(&wire)?;
        desc.check_peer(&theirs, d, &call.name())?;
        if tag & MISMATCH != 0 {
            return Err(CommError::Protocol(format!(
                "{}: rank {d} refused this message ({theirs} there)",
                call.name()
            )));
        }
        Ok(())
    }

    /// Posts this rank's description of the message it receives from `s`.
    fn post(&self, s: usize, desc: &CallDesc, mismatch: bool) {
        let line = self.seg().flag(self.lines.acked(s, self.rank));
        line.words[TAG].store(0, Relaxed);
        fence(Release);
        let wire = desc.to_wire();
        for (w, c) in line.words.iter().zip(wire.chunks_exact(8)) {
            w.store(
                u64::from_le_bytes(c.try_into().unwrap_or_default()),
                Relaxed,
            );
        }
        let tag = desc.seq.wrapping_add(1) | if mismatch { MISMATCH } else { 0 };
        line.words[TAG].store(tag, Release);
    }

    /// Receives as many chunks from `src` as have arrived.
    fn recv_chunks(
        &mut self,
        call: &Call<'_>,
        src: usize,
        bytes: &mut [u8],
        desc: &CallDesc,
        s: &mut Progress,
        blocked: &mut u8,
    ) -> Result<bool> {
        if *blocked & 2 != 0 {
            return Ok(false);
        }
        let me = self.rank;
        let slot_bytes = self.payload.p2p;
        let pair = self.lines.pair(src, me);
        let mut moved = false;
        while !s.finished {
            let c = self.rx[src];
            if !self
                .seg()
                .flag(self.lines.sent(src, me))
                .reached(c.wrapping_add(1))
            {
                *blocked |= 2;
                break;
            }
            let j = (c & 1) as usize;
            let words = self.seg().flag(self.lines.slot(src, me, j)).load_words();
            let hdr = SlotHeader::decode(&words, slot_bytes)?;
            let theirs = CallDesc::from_wire(&hdr.desc)?;
            if let Err(e) = desc.check_peer(&theirs, src, &call.name()) {
                self.post(src, desc, true);
                self.ring(src);
                return Err(e);
            }
            let want = slot_bytes.min(bytes.len() - s.done);
            if hdr.offset != s.done as u64 || hdr.len != want as u64 {
                return Err(CommError::Protocol(format!(
                    "{}: rank {src} sent bytes {}..{} of the message where this rank expected \
                     {}..{}",
                    call.name(),
                    hdr.offset,
                    hdr.offset + hdr.len,
                    s.done,
                    s.done + want
                )));
            }
            if s.chunks == 0 {
                self.post(src, desc, false);
            }
            let from = self.seg().payload_at(self.payload.slot(pair, j), want);
            // SAFETY: slot j of src's channel to me (bounds checked), which
            // src published (sent, acquire) and does not rewrite before my
            // acknowledgement; the destination is the caller's buffer.
            unsafe { std::ptr::copy_nonoverlapping(from, bytes[s.done..].as_mut_ptr(), want) };
            self.seg()
                .flag(self.lines.acked(src, me))
                .publish(c.wrapping_add(1));
            self.rx[src] = c.wrapping_add(1);
            self.ring(src);
            s.done += want;
            s.chunks += 1;
            moved = true;
            s.finished = s.done == bytes.len();
        }
        Ok(moved)
    }
}
