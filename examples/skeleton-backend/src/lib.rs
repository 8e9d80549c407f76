//! # skeleton-backend
//!
//! The skeleton of a backend written outside this repository, using only
//! the public API of `comm-core`: a [`BackendFactory`] that the group layer
//! selects by name (`DIST_BACKEND=skeleton`), and a [`DeviceCommunicator`]
//! whose transport is the group's [`Store`] itself.
//!
//! It is deliberately simple, and slow; it is meant to be read (see
//! `docs/writing-a-backend.md`) and copied, not to be fast:
//!
//! - Every collective is one exchange: each member posts one message to
//!   every other member (the 64-byte [`CallDesc`] of its call, then its
//!   payload, possibly empty), then reads one message from every other
//!   member, in rank order. So every member sees every other member's call
//!   description: any mismatch is a [`CommError::CallMismatch`] on every
//!   member ([`Capabilities::checks_calls`]).
//! - Messages are store keys named by call sequence, sender and receiver
//!   (`coll/{seq}/{src}/{dst}`, `p2p/{src}/{dst}/{seq}`), deleted by their
//!   reader. Reductions run in rank order (`0, 1, ..., world-1`), so every
//!   member gets bit-identical results.
//! - Waits are store reads in short slices up to the call's deadline; between
//!   slices the member looks for abort notices (`abort/{rank}`: the peer's
//!   reason and the ranks it blamed, so survivors blame the culprit, not the
//!   messenger) and departures (`left/{rank}`, posted on drop:
//!   [`CommError::PeerLost`]). A rank that dies without a word is named by
//!   the deadline: the timeout lists exactly the members whose messages are
//!   missing.
//! - Strided all_to_all ([`Capabilities::strided_all_to_all`]) reads and
//!   writes the blocks in place, from and into the caller's buffers.
//!
//! Everything else (argument checks, one-member and empty calls, `Avg`,
//! device staging, sequence numbers, poisoning after a fatal error, error
//! context, non-blocking operations) is the checked front's
//! ([`Communicator`](comm_core::Communicator)).

#![warn(missing_docs)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use comm_core::reduce::reduce_into;
use comm_core::{
    BackendFactory, BlockLayout, BufMut, BufRef, Call, CallDesc, Capabilities, CommError, DType,
    Device, DeviceCommunicator, GroupContext, HostBuffer, Missing, P2p, ReduceOp, Result, Store,
};

/// How long one store read may block before the member looks for aborts
/// and departures again.
const SLICE: Duration = Duration::from_millis(100);

/// Bytes of the call description that heads every message.
const HEADER: usize = 64;

/// Communicators this process has created (for tests that check the
/// group layer picked this backend).
static CREATED: AtomicUsize = AtomicUsize::new(0);

/// How many skeleton communicators this process has created.
pub fn communicators_created() -> usize {
    CREATED.load(Ordering::Relaxed)
}

/// The factory, registered as `skeleton`: host memory, any number of
/// members, across hosts (whatever the store reaches).
#[derive(Debug, Clone, Copy, Default)]
pub struct SkeletonFactory;

impl BackendFactory for SkeletonFactory {
    fn name(&self) -> &str {
        "skeleton"
    }
    fn serves(&self, device: Device) -> bool {
        device == Device::Cpu
    }
    fn create(&self, ctx: &GroupContext) -> Result<Box<dyn DeviceCommunicator>> {
        CREATED.fetch_add(1, Ordering::Relaxed);
        Ok(Box::new(Skeleton {
            store: ctx.store.clone(),
            rank: ctx.rank,
            world: ctx.world,
        }))
    }
}

/// One member of a group whose messages all go through the store.
#[derive(Debug)]
pub struct Skeleton {
    /// Namespaced for this group by whoever built the context.
    store: Arc<dyn Store>,
    rank: usize,
    world: usize,
}

/// A message: the sender's call description and its payload.
struct Message {
    desc: CallDesc,
    payload: Vec<u8>,
}

impl Skeleton {
    fn others(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.world).filter(move |r| *r != self.rank)
    }

    fn post(&self, key: &str, desc: &CallDesc, payload: &[u8]) -> Result<()> {
        let mut v = Vec::with_capacity(HEADER + payload.len());
        v.extend_from_slice(&desc.to_wire());
        v.extend_from_slice(payload);
        self.store.set(key, &v)
    }

    /// Reads and deletes the message at `key` from `from`, by the call's
    /// deadline. `pending` lists the keys (with their senders) this member
    /// still waits for in this call, to name every missing rank on a timeout.
    fn take(
        &self,
        call: &Call<'_>,
        key: &str,
        from: usize,
        pending: &[(usize, String)],
    ) -> Result<Message> {
        loop {
            let left = call.deadline.remaining();
            match self.store.get(key, left.min(SLICE)) {
                Ok(v) => {
                    self.store.delete(key)?;
                    if v.len() < HEADER {
                        return Err(CommError::Protocol(format!(
                            "{}: rank {from} sent a message of {} bytes, shorter than its header",
                            call.name(),
                            v.len()
                        )));
                    }
                    let desc = CallDesc::from_wire(&v[..HEADER])?;
                    return Ok(Message {
                        desc,
                        payload: v[HEADER..].to_vec(),
                    });
                }
                Err(CommError::Timeout { .. }) => {}
                Err(e) => return Err(e),
            }
            self.check_peers(call, key, from)?;
            let missing = || -> Vec<usize> {
                pending
                    .iter()
                    .filter(|(_, k)| !matches!(self.store.try_get(k), Ok(Some(_))))
                    .map(|(r, _)| *r)
                    .collect()
            };
            if call.deadline.expired() {
                let m = missing()
                    .into_iter()
                    .map(|r| Missing::new(r, "no message"))
                    .collect();
                return Err(call.timeout(m));
            }
            call.waiting(missing);
        }
    }

    /// Between slices of a wait: has any peer aborted, or has `from` left
    /// without sending what `key` waits for?
    fn check_peers(&self, call: &Call<'_>, key: &str, from: usize) -> Result<()> {
        for r in self.others() {
            if let Some(notice) = self.store.try_get(&format!("abort/{r}"))? {
                let (culprits, reason) = decode_abort(&notice);
                return Err(CommError::peer_aborted(r, call.name(), reason, culprits));
            }
        }
        if self.store.try_get(&format!("left/{from}"))?.is_some()
            && self.store.try_get(key)?.is_none()
        {
            return Err(CommError::peer_lost(
                from,
                call.name(),
                "it closed its communicator before sending its part",
            ));
        }
        Ok(())
    }

    /// The one collective pattern: post `payload(dst)` to every other
    /// member, then read every other member's message in rank order, check
    /// its call description and hand its payload to `receive(src, payload)`.
    fn exchange<'p>(
        &self,
        call: &Call<'_>,
        payload: impl Fn(usize) -> Result<std::borrow::Cow<'p, [u8]>>,
        mut receive: impl FnMut(usize, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let seq = call.desc.seq;
        for dst in self.others() {
            self.post(
                &format!("coll/{seq}/{}/{dst}", self.rank),
                &call.desc,
                &payload(dst)?,
            )?;
        }
        let mut pending: Vec<(usize, String)> = self
            .others()
            .map(|src| (src, format!("coll/{seq}/{src}/{}", self.rank)))
            .collect();
        while !pending.is_empty() {
            let (src, key) = pending[0].clone();
            let m = self.take(call, &key, src, &pending)?;
            pending.remove(0);
            call.desc.check_peer(&m.desc, src, &call.name())?;
            receive(src, &m.payload)?;
        }
        Ok(())
    }

    /// The payload of `src` in a reduction or block exchange must be
    /// exactly `want` bytes.
    fn sized<'a>(call: &Call<'_>, src: usize, payload: &'a [u8], want: usize) -> Result<&'a [u8]> {
        if payload.len() != want {
            return Err(CommError::Protocol(format!(
                "{}: rank {src} sent {} bytes where {want} were expected",
                call.name(),
                payload.len()
            )));
        }
        Ok(payload)
    }
}

/// Reduces `parts` (one per member, in rank order) into `out`, in rank
/// order, so every member computes the same bits.
fn reduce_in_order(parts: &[HostBuffer], out: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
    // An aligned accumulator: `reduce_into` needs memory aligned for `dtype`.
    let mut acc = HostBuffer::from_bytes(parts[0].as_bytes());
    for p in &parts[1..] {
        reduce_into(acc.as_bytes_mut(), p.as_bytes(), dtype, op)?;
    }
    out.copy_from_slice(acc.as_bytes());
    Ok(())
}

fn encode_abort(why: &CommError) -> Vec<u8> {
    let ranks: Vec<String> = why.culprits().iter().map(|r| r.group.to_string()).collect();
    format!("{}\n{why}", ranks.join(",")).into_bytes()
}

fn decode_abort(b: &[u8]) -> (Vec<Missing>, String) {
    let text = String::from_utf8_lossy(b);
    let (ranks, reason) = text.split_once('\n').unwrap_or(("", &text));
    let culprits = ranks
        .split(',')
        .filter_map(|r| r.trim().parse::<usize>().ok())
        .map(|r| Missing::new(r, ""))
        .collect();
    (culprits, reason.to_string())
}

impl DeviceCommunicator for Skeleton {
    fn backend(&self) -> &str {
        "skeleton"
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
        let dtype = buf.dtype();
        let out = buf.expect_host("all_reduce")?;
        let n = out.len();
        let mut parts: Vec<HostBuffer> = (0..self.world).map(|_| HostBuffer::zeroed(0)).collect();
        parts[self.rank] = HostBuffer::from_bytes(out);
        let mine: &[u8] = out;
        self.exchange(
            call,
            |_| Ok(mine.into()),
            |src, p| {
                parts[src] = HostBuffer::from_bytes(Self::sized(call, src, p, n)?);
                Ok(())
            },
        )?;
        reduce_in_order(&parts, out, dtype, op)
    }

    fn all_gather(
        &mut self,
        call: &Call<'_>,
        input: BufRef<'_>,
        mut output: BufMut<'_>,
    ) -> Result<()> {
        let inp = input.expect_host("all_gather")?;
        let n = inp.len();
        let out = output.expect_host("all_gather")?;
        out[self.rank * n..(self.rank + 1) * n].copy_from_slice(inp);
        self.exchange(
            call,
            |_| Ok(inp.into()),
            |src, p| {
                out[src * n..(src + 1) * n].copy_from_slice(Self::sized(call, src, p, n)?);
                Ok(())
            },
        )
    }

    fn reduce_scatter(
        &mut self,
        call: &Call<'_>,
        input: BufRef<'_>,
        mut output: BufMut<'_>,
        op: ReduceOp,
    ) -> Result<()> {
        let dtype = input.dtype();
        let inp = input.expect_host("reduce_scatter")?;
        let out = output.expect_host("reduce_scatter")?;
        let n = out.len();
        let mut parts: Vec<HostBuffer> = (0..self.world).map(|_| HostBuffer::zeroed(0)).collect();
        parts[self.rank] = HostBuffer::from_bytes(&inp[self.rank * n..(self.rank + 1) * n]);
        self.exchange(
            call,
            |dst| Ok(inp[dst * n..(dst + 1) * n].into()),
            |src, p| {
                parts[src] = HostBuffer::from_bytes(Self::sized(call, src, p, n)?);
                Ok(())
            },
        )?;
        reduce_in_order(&parts, out, dtype, op)
    }

    fn broadcast(&mut self, call: &Call<'_>, mut buf: BufMut<'_>, root: usize) -> Result<()> {
        let b = buf.expect_host("broadcast")?;
        let n = b.len();
        // Everyone posts (the root its data, the others nothing) so that
        // every member checks every other member's call.
        let mine = if self.rank == root {
            b.to_vec()
        } else {
            Vec::new()
        };
        self.exchange(
            call,
            |_| Ok(mine[..].into()),
            |src, p| {
                if src == root {
                    b.copy_from_slice(Self::sized(call, src, p, n)?);
                }
                Ok(())
            },
        )
    }

    fn gather(
        &mut self,
        call: &Call<'_>,
        input: BufRef<'_>,
        output: Option<BufMut<'_>>,
        root: usize,
    ) -> Result<()> {
        let inp = input.expect_host("gather")?;
        let n = inp.len();
        let mut output = output;
        let mut out = match output.as_mut() {
            Some(o) => Some(o.expect_host("gather")?),
            None => None,
        };
        if let Some(o) = out.as_deref_mut() {
            o[self.rank * n..(self.rank + 1) * n].copy_from_slice(inp);
        }
        self.exchange(
            call,
            |dst| {
                Ok(if dst == root {
                    inp.into()
                } else {
                    (&[][..]).into()
                })
            },
            |src, p| {
                if let Some(o) = out.as_deref_mut() {
                    o[src * n..(src + 1) * n].copy_from_slice(Self::sized(call, src, p, n)?);
                }
                Ok(())
            },
        )
    }

    fn all_to_all(
        &mut self,
        call: &Call<'_>,
        input: BufRef<'_>,
        mut output: BufMut<'_>,
    ) -> Result<()> {
        let inp = input.expect_host("all_to_all")?;
        let out = output.expect_host("all_to_all")?;
        let n = inp.len() / self.world;
        let me = self.rank;
        out[me * n..(me + 1) * n].copy_from_slice(&inp[me * n..(me + 1) * n]);
        self.exchange(
            call,
            |dst| Ok(inp[dst * n..(dst + 1) * n].into()),
            |src, p| {
                out[src * n..(src + 1) * n].copy_from_slice(Self::sized(call, src, p, n)?);
                Ok(())
            },
        )
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
        let block = send.block_len() * es;
        let mut own = vec![0u8; block];
        send.gather(inp, self.rank, es, &mut own);
        recv.scatter(&own, self.rank, es, out);
        self.exchange(
            call,
            |dst| {
                let mut b = vec![0u8; block];
                send.gather(inp, dst, es, &mut b);
                Ok(b.into())
            },
            |src, p| {
                recv.scatter(Self::sized(call, src, p, block)?, src, es, out);
                Ok(())
            },
        )
    }

    fn send_recv(&mut self, call: &Call<'_>, ops: &mut [P2p<'_>]) -> Result<()> {
        // Sends never block (the store holds them), so posting every send
        // before reading any receive cannot deadlock.
        for op in ops.iter() {
            if let P2p::Send { peer, buf, desc } = op {
                let key = format!("p2p/{}/{peer}/{}", self.rank, desc.seq);
                self.post(&key, desc, buf.expect_host("send")?)?;
            }
        }
        for op in ops.iter_mut() {
            if let P2p::Recv { peer, buf, desc } = op {
                let peer = *peer;
                let key = format!("p2p/{peer}/{}/{}", self.rank, desc.seq);
                let m = self.take(call, &key, peer, &[(peer, key.clone())])?;
                desc.check_peer(&m.desc, peer, &desc.to_string())?;
                let dst = buf.expect_host("recv")?;
                let n = dst.len();
                dst.copy_from_slice(Self::sized(call, peer, &m.payload, n)?);
            }
        }
        Ok(())
    }

    fn barrier(&mut self, call: &Call<'_>) -> Result<()> {
        self.exchange(call, |_| Ok((&[][..]).into()), |_, _| Ok(()))
    }

    fn abort(&mut self, why: &CommError) {
        // Best effort: tell the peers why and whom this member blames.
        let _ = self
            .store
            .set(&format!("abort/{}", self.rank), &encode_abort(why));
    }
}

impl Drop for Skeleton {
    fn drop(&mut self) {
        // Peers still waiting for this member learn it left (PeerLost)
        // instead of waiting for their deadline.
        let _ = self.store.set(&format!("left/{}", self.rank), b"");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use comm_core::RankId;

    #[test]
    fn abort_notices_carry_the_culprits() {
        let why = CommError::timeout_ranks(
            "all_reduce #3",
            Duration::from_secs(1),
            vec![Missing::new(2, "x")],
        );
        let (culprits, reason) = decode_abort(&encode_abort(&why));
        assert_eq!(
            culprits.iter().map(|m| m.rank).collect::<Vec<_>>(),
            [RankId::local(2)]
        );
        assert!(reason.contains("all_reduce #3"), "{reason}");
        // Whatever a peer wrote, decoding never panics.
        let (c, _) = decode_abort(b"\xff,zz\n");
        assert!(c.is_empty());
    }
}
