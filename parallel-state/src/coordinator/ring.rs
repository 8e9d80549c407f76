//! Ring attention's exchange: blocks travel around the group while the
//! current one is computed on.

use std::time::{Duration, Instant};

use comm_core::{AsBufMut, P2pOp, Result};

use super::GroupCoordinator;

/// Timings of one [`GroupCoordinator::ring_pass`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingTimes {
    /// Exchanges made (members - 1).
    pub exchanges: usize,
    /// Time spent in `compute`.
    pub compute: Duration,
    /// Time spent waiting for a block after `compute` returned: the part of
    /// the communication that compute did not hide.
    pub exposed: Duration,
    /// Time spent starting the exchanges (queueing each batched
    /// send/receive; on an oversubscribed host this includes waiting for a
    /// core after waking the progress engine). Not part of `exposed` or
    /// `compute`.
    pub starting: Duration,
    /// Wall time of the whole pass.
    pub total: Duration,
}

impl GroupCoordinator {
    /// Ring attention's exchange over this group: calls `compute(step,
    /// block)` once per member; step 0 sees this member's own `block`, step
    /// `i` the block of the member `i` places before it in the ring. While
    /// `compute` runs on one block, the next travels from the previous
    /// member into `spare` (a non-blocking batched send/receive), so the
    /// communication hides behind the compute.
    ///
    /// `block` and `spare` must have the same size on every member; on
    /// return `block` holds the last block computed on. Host and device
    /// buffers both work (device ones through the device plane, or staged).
    pub fn ring_pass<B, F>(&self, block: &mut B, spare: &mut B, mut compute: F) -> Result<RingTimes>
    where
        B: AsBufMut,
        F: FnMut(usize, &B) -> Result<()>,
    {
        let start = Instant::now();
        let w = self.world_size();
        let comm = self.communicator_for(block.as_buf()?.device())?;
        let (next, prev) = (self.default_dst(), self.default_src());
        let mut t = RingTimes::default();
        for step in 0..w {
            if step + 1 == w {
                let c = Instant::now();
                compute(step, block)?;
                t.compute += c.elapsed();
                break;
            }
            let cur: &B = block;
            let incoming: &mut B = spare;
            let posting = Instant::now();
            comm.scope(|s| {
                let work = s.batch_isend_irecv(vec![
                    P2pOp::send(cur, next)?,
                    P2pOp::recv(incoming, prev)?,
                ])?;
                let c = Instant::now();
                t.starting += c - posting;
                let r = compute(step, cur);
                t.compute += c.elapsed();
                let waited = Instant::now();
                let done = work.wait();
                t.exposed += waited.elapsed();
                r.and(done)
            })?;
            t.exchanges += 1;
            std::mem::swap(block, spare);
        }
        t.total = start.elapsed();
        Ok(t)
    }
}
