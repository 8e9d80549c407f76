//! The backend contract: what a transport implements. Backends only move
//! bytes; everything else lives once in the checked front
//! ([`Communicator`](crate::Communicator)).

use std::any::Any;

use crate::buffer::{BufMut, BufRef};
use crate::{Call, CallDesc, CommError, Device, ReduceOp, Result};

/// What a backend can do beyond the minimum. Marked `#[non_exhaustive]`:
/// build it with [`Capabilities::default`] and set the fields you support.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Capabilities {
    /// The backend carries each call's [`CallDesc`] with its messages and
    /// checks it against its peers' ([`CallDesc::check_peer`]). When false,
    /// the front checks descriptions out of band where it has a host plane
    /// to do so ([`crate::FrontOptions::verifier`]).
    pub checks_calls: bool,
    /// The backend computes [`ReduceOp::Avg`] itself. When false the front
    /// asks for `Sum` and divides.
    pub native_avg: bool,
    /// Calls return once the work is enqueued (CUDA streams), not once it is
    /// complete; [`DeviceCommunicator::fence`] tells completion.
    pub asynchronous: bool,
    /// The backend implements [`DeviceCommunicator::all_to_all_strided`]
    /// (blocks read from and written to strided places directly). When
    /// false the front packs blocks into a workspace around a flat
    /// all-to-all.
    pub strided_all_to_all: bool,
}

/// Where each member's block lies in one buffer of a strided all-to-all:
/// block `j` is `runs` runs of `run` elements, run `k` of block `j` starting
/// at element `j * block_step + k * stride`.
///
/// The Ulysses all_to_all_4D of `[B, S/P, H, D]` to `[B, S, H/P, D]` is one
/// such exchange: the block for member `j` is its head slice of every row
/// (`runs = B * S/P`, `run = H/P * D`, `stride = H * D`, `block_step = H/P *
/// D`), and the block from member `i` lands in its sequence slice.
///
/// ```
/// use comm_core::BlockLayout;
/// let l = BlockLayout { block_step: 2, runs: 3, run: 2, stride: 4 };
/// let src: Vec<u8> = (0..12).collect();
/// let mut block = vec![0u8; 6];
/// l.gather(&src, 1, 1, &mut block);
/// assert_eq!(block, [2, 3, 6, 7, 10, 11]);
/// assert!(l.check(12, 2).is_ok() && l.check(11, 2).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockLayout {
    /// Elements between the starts of consecutive blocks.
    pub block_step: usize,
    /// Runs per block.
    pub runs: usize,
    /// Elements per run.
    pub run: usize,
    /// Elements between the starts of consecutive runs of a block.
    pub stride: usize,
}

impl BlockLayout {
    /// Contiguous blocks of `block` elements (a flat all-to-all).
    pub fn contiguous(block: usize) -> Self {
        BlockLayout {
            block_step: block,
            runs: 1,
            run: block,
            stride: block,
        }
    }

    /// Elements per block.
    pub fn block_len(&self) -> usize {
        self.runs * self.run
    }

    /// Errors unless `world` blocks fit in a buffer of `numel` elements.
    pub fn check(&self, numel: usize, world: usize) -> crate::Result<()> {
        let end = (|| {
            if self.runs == 0 || self.run == 0 || world == 0 {
                return Some(0);
            }
            (world - 1)
                .checked_mul(self.block_step)?
                .checked_add((self.runs - 1).checked_mul(self.stride)?)?
                .checked_add(self.run)
        })();
        match end {
            Some(e) if e <= numel => Ok(()),
            _ => Err(CommError::shape(
                "all_to_all (strided)",
                format!("{world} blocks of {self:?} inside the buffer"),
                format!("a buffer of {numel} elements"),
            )),
        }
    }

    /// Byte range of run `k` of block `j`, for elements of `es` bytes.
    pub fn run_bytes(&self, j: usize, k: usize, es: usize) -> std::ops::Range<usize> {
        let start = (j * self.block_step + k * self.stride) * es;
        start..start + self.run * es
    }

    /// Copies block `j` of `src` into the contiguous `dst`
    /// (`block_len() * es` bytes). Panics if out of bounds (see [`check`](Self::check)).
    pub fn gather(&self, src: &[u8], j: usize, es: usize, dst: &mut [u8]) {
        let rb = self.run * es;
        assert_eq!(dst.len(), self.block_len() * es, "gather: destination size");
        for (k, d) in dst.chunks_exact_mut(rb.max(1)).enumerate().take(self.runs) {
            d.copy_from_slice(&src[self.run_bytes(j, k, es)]);
        }
    }

    /// Copies the contiguous `src` into block `j` of `dst`. Panics if out
    /// of bounds (see [`check`](Self::check)).
    pub fn scatter(&self, src: &[u8], j: usize, es: usize, dst: &mut [u8]) {
        let rb = self.run * es;
        assert_eq!(src.len(), self.block_len() * es, "scatter: source size");
        for (k, s) in src.chunks_exact(rb.max(1)).enumerate().take(self.runs) {
            dst[self.run_bytes(j, k, es)].copy_from_slice(s);
        }
    }
}

/// One message of a batched point-to-point exchange
/// ([`DeviceCommunicator::send_recv`]).
#[derive(Debug)]
pub enum P2p<'a> {
    /// Send `buf` to group rank `peer`.
    Send {
        /// Destination (group rank, never this member).
        peer: usize,
        /// What to send.
        buf: BufRef<'a>,
        /// Its description (op `Send`, the pair's sequence number).
        desc: CallDesc,
    },
    /// Receive from group rank `peer` into `buf` (whose size must match).
    Recv {
        /// Source (group rank, never this member).
        peer: usize,
        /// Where to receive.
        buf: BufMut<'a>,
        /// Its description (op `Recv`).
        desc: CallDesc,
    },
}

impl P2p<'_> {
    /// The peer.
    pub fn peer(&self) -> usize {
        match self {
            P2p::Send { peer, .. } | P2p::Recv { peer, .. } => *peer,
        }
    }
    /// The description.
    pub fn desc(&self) -> &CallDesc {
        match self {
            P2p::Send { desc, .. } | P2p::Recv { desc, .. } => desc,
        }
    }
}

/// Completion of work an asynchronous backend has enqueued.
pub trait Fence: Send {
    /// `Ok(true)` once everything enqueued before the fence has completed;
    /// an error when the backend learnt that it failed.
    fn poll(&mut self) -> Result<bool>;
}

/// A transport over one group of ranks: flat primitives on raw buffers.
///
/// Implement this to plug a backend in (see the conformance kit and the
/// "Writing a backend" guide). The checked front
/// ([`Communicator`](crate::Communicator)) calls it only with arguments it
/// has already checked, so an implementation can rely on:
///
/// - ranks are group-local, `root`/`peer` are in range, peers are never the
///   member itself;
/// - `world_size() > 1` and every buffer is non-empty (the front answers
///   one-member groups and empty calls itself);
/// - sizes agree locally: `all_gather` / `gather` outputs hold
///   `world * input` elements, `reduce_scatter` inputs `world * output`,
///   `all_to_all` buffers equal sizes divisible by `world`; all buffers of a
///   call have one dtype;
/// - buffers are in the memory [`device`](Self::device) names: host memory
///   for `Device::Cpu` (the front stages device memory for host backends),
///   that device's memory otherwise;
/// - `op` is never [`ReduceOp::Avg`] unless [`Capabilities::native_avg`];
/// - after an error for which [`CommError::is_fatal`] is true, nothing is
///   called again except [`abort`](Self::abort) and drop.
///
/// What an implementation must do:
/// - finish every call by [`Call::deadline`], else return
///   [`Call::timeout`] naming the ranks that did not arrive;
/// - return [`CommError::PeerLost`] when a peer died or went away, and
///   [`CommError::PeerAborted`] (with the ranks it blamed) when a peer
///   aborted;
/// - when [`Capabilities::checks_calls`], carry `call.desc` to the peers
///   and return [`CommError::CallMismatch`] on a difference;
/// - make the results of reductions identical on every member;
/// - never panic on what a peer sends.
///
/// `&mut self` everywhere: one thread drives a communicator at a time, so
/// it may be `Send` without being `Sync`.
pub trait DeviceCommunicator: Send {
    /// Short backend name (`tcp`, `shm`, `nccl`, ...).
    fn backend(&self) -> &str;
    /// This member's group-local rank.
    fn rank(&self) -> usize;
    /// Number of members.
    fn world_size(&self) -> usize;
    /// Where the memory it moves lives: `Device::Cpu` for host backends.
    fn device(&self) -> Device;
    /// What it supports beyond the minimum.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    /// In place: every member ends with the reduction of all members' `buf`.
    fn all_reduce(&mut self, call: &Call<'_>, buf: BufMut<'_>, op: ReduceOp) -> Result<()>;
    /// `output` (`world * input` elements) receives every member's input in
    /// rank order.
    fn all_gather(&mut self, call: &Call<'_>, input: BufRef<'_>, output: BufMut<'_>) -> Result<()>;
    /// `input` holds `world` blocks; member `r` receives in `output` the
    /// reduction of block `r`.
    fn reduce_scatter(
        &mut self,
        call: &Call<'_>,
        input: BufRef<'_>,
        output: BufMut<'_>,
        op: ReduceOp,
    ) -> Result<()>;
    /// `buf` on every member becomes `root`'s.
    fn broadcast(&mut self, call: &Call<'_>, buf: BufMut<'_>, root: usize) -> Result<()>;
    /// `root`'s `output` receives every member's input in rank order;
    /// `output` is `Some` exactly on the root.
    fn gather(
        &mut self,
        call: &Call<'_>,
        input: BufRef<'_>,
        output: Option<BufMut<'_>>,
        root: usize,
    ) -> Result<()>;
    /// Block `j` of `input` goes to member `j`; block `i` of `output` comes
    /// from member `i`.
    fn all_to_all(&mut self, call: &Call<'_>, input: BufRef<'_>, output: BufMut<'_>) -> Result<()>;
    /// Only with [`Capabilities::strided_all_to_all`]: block `j` of `input`
    /// (at `send`) goes to member `j`, and block `i` of `output` (at `recv`)
    /// comes from member `i`. The front has checked that both layouts fit
    /// their buffers and that the block lengths agree.
    fn all_to_all_strided(
        &mut self,
        call: &Call<'_>,
        input: BufRef<'_>,
        send: &BlockLayout,
        output: BufMut<'_>,
        recv: &BlockLayout,
    ) -> Result<()> {
        let _ = (input, send, output, recv);
        Err(CommError::State(format!(
            "{}: this backend does not implement strided all_to_all",
            call.name()
        )))
    }
    /// Progresses every send and receive of `ops` together (so a ring
    /// exchange cannot deadlock) and returns when all are complete. Messages
    /// between one pair arrive in order and never mix with collectives.
    fn send_recv(&mut self, call: &Call<'_>, ops: &mut [P2p<'_>]) -> Result<()>;
    /// Returns once every member has entered.
    fn barrier(&mut self, call: &Call<'_>) -> Result<()>;

    /// Gives up on the group after `why`: tells the peers (best effort, with
    /// the ranks `why` blames, so they can report the culprit) and releases
    /// what waits on them. Never blocks past a short bound.
    fn abort(&mut self, why: &CommError) {
        let _ = why;
    }
    /// Asynchronous backends: a fence after everything enqueued so far.
    fn fence(&mut self) -> Result<Option<Box<dyn Fence>>> {
        Ok(None)
    }
    /// The concrete backend, for crates that need its own API (streams,
    /// graph capture).
    fn as_any_mut(&mut self) -> Option<&mut dyn Any> {
        None
    }
}
