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
