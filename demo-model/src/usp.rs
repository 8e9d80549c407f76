//! The model over sequence-parallel groups: Ulysses × ring attention (USP).
//!
//! The sequence is sharded over the SP group (`sp.shard_with_pad`). Each layer:
//! projections on the local shard (Q, and K/V packed per head in one
//! buffer), one Ulysses `all_to_all_4d` each over the Ulysses group (this
//! rank then holds its Ulysses group's chunk of the sequence for `H / U`
//! heads), ring attention over the ring group (the packed K/V block travels
//! around the ring with [`GroupCoordinator::ring_pass`] while the block at
//! hand is attended with [`OnlineSoftmax`]), the inverse `all_to_all_4d`,
//! the output projection and the residual.
//!
//! Rank layout (from `ParallelState::initialize_ulysses_ring(U)`): SP rank
//! `k * U + j` is member `j` of Ulysses group `k` and member `k` of ring
//! group `j`, so ring member `k` holds sequence chunk `k` (rows
//! `[k * U * Sl, (k + 1) * U * Sl)` of the padded sequence). Keys at or
//! beyond the original length are padding and are masked.
//!
//! Steady state allocates nothing per layer: every buffer is a workspace of
//! [`Usp`], and the all-to-alls write into them (`all_to_all_4d_into`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use parallel_state::{CommError, DType, Device, GroupCoordinator, Result, RingTimes, Tensor};

use crate::gemm::matmul_into;
use crate::{Model, OnlineSoftmax};

/// The three groups of a USP run.
#[derive(Debug, Clone)]
pub struct UspGroups {
    /// The sequence-parallel group the input is sharded over.
    pub sp: Arc<GroupCoordinator>,
    /// The Ulysses sub-group (consecutive SP ranks).
    pub ulysses: Arc<GroupCoordinator>,
    /// The ring sub-group (SP ranks strided by the Ulysses degree).
    pub ring: Arc<GroupCoordinator>,
}

/// Timings of one layer on one rank.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayerTimes {
    /// Time in the layer's Ulysses `all_to_all_4d` calls.
    pub all_to_all: Duration,
    /// The ring pass: attention compute, exposed wait, exchanges.
    pub ring: RingTimes,
    /// One entry per ring exchange of the pass.
    pub steps: Vec<StepStamps>,
    /// The same K/V blocks passed around the ring with no compute, after a
    /// barrier of the ring group, right after the overlapped pass (when
    /// measured; not part of `total`).
    pub standalone: Option<Duration>,
    /// Wall time of the layer (without the standalone measurement).
    pub total: Duration,
}

/// When one ring exchange was started, its compute finished and its block
/// had arrived: `CLOCK_MONOTONIC` nanoseconds, comparable between the
/// processes of one host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepStamps {
    /// The exchange was queued (the block at hand started travelling).
    pub posted: u64,
    /// Attention on the block at hand finished.
    pub computed: u64,
    /// The next step began: the block had arrived and the next exchange
    /// was queued.
    pub received: u64,
}

/// `CLOCK_MONOTONIC` now, in nanoseconds.
fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Where a rank's exposed ring wait went (see [`ring_wait_breakdown`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingWaitBreakdown {
    /// Waiting for a ring neighbour that had not yet started the exchange
    /// when this rank's compute ended (it was still computing the step
    /// before: load imbalance, not data movement).
    pub neighbour_late: Duration,
    /// Waiting after both neighbours had started the exchange: moving the
    /// block, the part of the data movement compute did not hide.
    pub transfer: Duration,
}

impl LayerTimes {
    /// Communication not hidden behind compute: the all-to-alls, starting
    /// the ring's exchanges and its exposed wait.
    pub fn communication(&self) -> Duration {
        self.all_to_all + self.ring.starting + self.ring.exposed
    }
    /// Everything else: projections, attention, residual.
    pub fn compute(&self) -> Duration {
        self.total.saturating_sub(self.communication())
    }
}

/// One rank's USP forward pass with its workspaces (reused layer after
/// layer and call after call).
#[derive(Debug)]
pub struct Usp<'m> {
    model: &'m Model,
    groups: UspGroups,
    /// Per layer: `[hidden, H * 2D]`, each head's key columns then its value
    /// columns, so one GEMM gives the packed K/V block.
    wkv: Vec<Vec<f32>>,
    /// Local (padded) shard length.
    sl: usize,
    /// Original sequence length (keys from here on are padding).
    orig_len: usize,
    q: Mirror,
    kv: Mirror,
    qu: Mirror,
    kvu: Mirror,
    /// Where the next K/V block arrives (on the communication device).
    spare: Tensor,
    /// Host copy of a device K/V block for the attention.
    kv_stage: Tensor,
    ou: Mirror,
    o: Mirror,
    proj: Vec<f32>,
    att: OnlineSoftmax,
    probe: Option<(Tensor, Tensor)>,
}

/// A host workspace and, when the groups move device memory, its device
/// twin that the collectives read and write (compute stays on the host).
#[derive(Debug)]
struct Mirror {
    host: Tensor,
    dev: Option<Tensor>,
}

impl Mirror {
    fn new(shape: [usize; 4], device: Device) -> Result<Self> {
        let host = Tensor::zeros(shape, DType::F32);
        let dev = match device {
            Device::Cpu => None,
            d => Some(host.to_device(d)?),
        };
        Ok(Mirror { host, dev })
    }
    /// The tensor the collectives move.
    fn comm(&self) -> &Tensor {
        self.dev.as_ref().unwrap_or(&self.host)
    }
    fn comm_mut(&mut self) -> &mut Tensor {
        self.dev.as_mut().unwrap_or(&mut self.host)
    }
    /// Host to device, before a collective reads it.
    fn push(&mut self) -> Result<()> {
        match &mut self.dev {
            Some(d) => d.copy_from(&self.host),
            None => Ok(()),
        }
    }
    /// Device to host, after a collective wrote it.
    fn pull(&mut self) -> Result<()> {
        match &self.dev {
            Some(d) => self.host.copy_from(d),
            None => Ok(()),
        }
    }
    fn f32(&self) -> Result<&[f32]> {
        self.host.as_slice()
    }
    fn f32_mut(&mut self) -> Result<&mut [f32]> {
        self.host.as_mut_slice()
    }
}

/// The result of [`forward_sequence_parallel`].
#[derive(Debug)]
pub struct UspOutput {
    /// The full output `[B, S, H*D]` (gathered and unpadded), on every rank.
    pub output: Tensor,
    /// Per-layer timings of this rank.
    pub layers: Vec<LayerTimes>,
    /// Local shard length (padded sequence / SP size).
    pub shard_len: usize,
}

fn invalid(msg: String) -> CommError {
    CommError::invalid(msg)
}

impl<'m> Usp<'m> {
    /// Workspaces for `model` over `groups`, for shards of `shard_len` rows
    /// of a sequence of `orig_len` (before padding). The collectives move
    /// memory on `device` (CUDA tensors go through the groups' device plane,
    /// or are staged by the host backend); compute runs on the host.
    pub fn new(
        model: &'m Model,
        groups: UspGroups,
        shard_len: usize,
        orig_len: usize,
        device: Device,
    ) -> Result<Self> {
        let c = model.cfg;
        let (b, h, d) = (c.batch, c.heads, c.head_dim);
        let (u, r) = (groups.ulysses.world_size(), groups.ring.world_size());
        let (sp, ur, rr) = (
            groups.sp.rank_in_group(),
            groups.ulysses.rank_in_group(),
            groups.ring.rank_in_group(),
        );
        if groups.sp.world_size() != u * r || sp != rr * u + ur {
            return Err(invalid(format!(
                "USP groups do not match: SP rank {sp} of {}, Ulysses rank {ur} of {u}, ring rank \
                 {rr} of {r} (expected SP rank = ring rank * {u} + Ulysses rank; build them with \
                 initialize_ulysses_ring)",
                groups.sp.world_size()
            )));
        }
        if h % u != 0 {
            return Err(invalid(format!(
                "{h} heads do not divide by the Ulysses degree {u}"
            )));
        }
        if orig_len > shard_len * u * r {
            return Err(invalid(format!(
                "sequence length {orig_len} exceeds {} shards of {shard_len}",
                u * r
            )));
        }
        let hid = h * d;
        let wkv = model
            .layers
            .iter()
            .map(|l| {
                let mut w = vec![0f32; hid * 2 * hid];
                for i in 0..hid {
                    for hh in 0..h {
                        let dst = i * 2 * hid + hh * 2 * d;
                        let src = i * hid + hh * d;
                        w[dst..dst + d].copy_from_slice(&l.wk[src..src + d]);
                        w[dst + d..dst + 2 * d].copy_from_slice(&l.wv[src..src + d]);
                    }
                }
                w
            })
            .collect();
        let (chunk, hu) = (u * shard_len, h / u);
        let m = |s: [usize; 4]| Mirror::new(s, device);
        let kvu = m([b, chunk, hu, 2 * d])?;
        Ok(Usp {
            model,
            wkv,
            sl: shard_len,
            orig_len,
            q: m([b, shard_len, h, d])?,
            kv: m([b, shard_len, h, 2 * d])?,
            qu: m([b, chunk, hu, d])?,
            spare: kvu.comm().try_clone()?,
            kv_stage: kvu.host.try_clone()?,
            kvu,
            ou: m([b, chunk, hu, d])?,
            o: m([b, shard_len, h, d])?,
            proj: vec![0f32; b * shard_len * hid],
            att: OnlineSoftmax::new(b, chunk, hu, d),
            probe: None,
            groups,
        })
    }

    /// Also pass the same K/V blocks around the ring with no compute in
    /// every layer (after a barrier), to measure how much of the exchange
    /// the overlapped pass hides ([`LayerTimes::standalone`]).
    pub fn measure_standalone(&mut self, yes: bool) -> Result<()> {
        self.probe = match yes {
            true => Some((self.spare.try_clone()?, self.spare.try_clone()?)),
            false => None,
        };
        Ok(())
    }

    /// Runs every layer on this rank's shard `x` (`[B, Sl, H*D]`, f32) in place.
    pub fn forward(&mut self, x: &mut Tensor) -> Result<Vec<LayerTimes>> {
        let c = self.model.cfg;
        let want = [c.batch, self.sl, c.hidden()];
        if x.shape() != want || x.dtype() != DType::F32 {
            return Err(CommError::shape(
                "USP forward",
                format!("an f32 shard of shape {want:?}"),
                format!("{} of shape {:?}", x.dtype(), x.shape()),
            ));
        }
        (0..self.model.layers.len())
            .map(|i| self.layer(i, x.as_mut_slice::<f32>()?))
            .collect()
    }

    fn layer(&mut self, i: usize, x: &mut [f32]) -> Result<LayerTimes> {
        let start = Instant::now();
        let c = self.model.cfg;
        let (rows, hid) = (c.batch * self.sl, c.hidden());
        let l = &self.model.layers[i];
        let mut t = LayerTimes::default();
        matmul_into(x, &l.wq, rows, hid, hid, self.q.f32_mut()?);
        matmul_into(x, &self.wkv[i], rows, hid, 2 * hid, self.kv.f32_mut()?);
        self.q.push()?;
        self.kv.push()?;
        let ul = &self.groups.ulysses;
        let a = Instant::now();
        ul.all_to_all_4d_into(self.q.comm(), 2, 1, self.qu.comm_mut())?;
        ul.all_to_all_4d_into(self.kv.comm(), 2, 1, self.kvu.comm_mut())?;
        t.all_to_all += a.elapsed();
        self.qu.pull()?;

        // Ring member `k` holds sequence chunk `k`; at step `s` the block
        // at hand is the one of member `k - s`.
        let ring = &self.groups.ring;
        let (r, me) = (ring.world_size(), ring.rank_in_group());
        let chunk = self.qu.host.shape()[1];
        let orig_len = self.orig_len;
        let (att, qu, stage) = (&mut self.att, self.qu.f32()?, &mut self.kv_stage);
        let steps = &mut t.steps;
        att.reset();
        t.ring = ring.ring_pass(self.kvu.comm_mut(), &mut self.spare, |step, blk| {
            // Called right after the exchange of this step was queued; the
            // previous step's block has arrived.
            let now = monotonic_ns();
            if let Some(prev) = steps.last_mut() {
                prev.received = now;
            }
            let src = (me + r - step % r) % r;
            let valid = orig_len.saturating_sub(src * chunk).min(chunk);
            let kv = if blk.is_host() {
                blk.as_slice::<f32>()?
            } else {
                stage.copy_from(blk)?;
                stage.as_slice::<f32>()?
            };
            att.update_packed(qu, kv, chunk, valid);
            if step + 1 < r {
                steps.push(StepStamps {
                    posted: now,
                    computed: monotonic_ns(),
                    received: 0,
                });
            }
            Ok(())
        })?;
        att.finish_into(self.ou.f32_mut()?);
        self.ou.push()?;
        // The same exchange without compute, measured after the overlapped
        // pass so that its barrier does not line the ranks up for it.
        let mut excluded = Duration::ZERO;
        if let Some((p0, p1)) = &mut self.probe {
            let e = Instant::now();
            ring.barrier()?;
            t.standalone = Some(ring.ring_pass(p0, p1, |_, _| Ok(()))?.exposed);
            excluded = e.elapsed();
        }

        let a = Instant::now();
        ul.all_to_all_4d_into(self.ou.comm(), 1, 2, self.o.comm_mut())?;
        t.all_to_all += a.elapsed();
        self.o.pull()?;
        matmul_into(self.o.f32()?, &l.wo, rows, hid, hid, &mut self.proj);
        x.iter_mut().zip(&self.proj).for_each(|(xv, p)| *xv += p);
        t.total = start.elapsed().saturating_sub(excluded);
        Ok(t)
    }
}

/// Splits this rank's exposed ring wait over `layers` into waiting for a
/// late neighbour and moving data, from the [`StepStamps`] of its ring
/// neighbours (one small all-gather over the ring group; every member
/// calls it). Only meaningful when the ring's members share a host (their
/// monotonic clocks agree).
///
/// For exchange `i` of this rank `k` (`k - 1` sends to it, `k + 1`
/// receives from it), the time from `computed` to `received` (the wait and
/// starting the next exchange) is cut at `ready`, when both neighbours had
/// queued their exchange `i` (capped at `received`: a backend may finish a
/// send before its receiver posts): before it, a neighbour was still
/// computing its previous step; after it, the block was moving (or the
/// next exchange starting: [`RingTimes::starting`] of every exchange but
/// the first of each pass falls in these intervals).
pub fn ring_wait_breakdown(
    ring: &GroupCoordinator,
    layers: &[LayerTimes],
) -> Result<RingWaitBreakdown> {
    let (r, me) = (ring.world_size(), ring.rank_in_group());
    let mine: Vec<i64> = layers
        .iter()
        .flat_map(|l| l.steps.iter().map(|s| s.posted as i64))
        .collect();
    let n = mine.len();
    let mut all = vec![0i64; n * r];
    ring.host_communicator()?.all_gather(&mine, &mut all)?;
    let posted = |member: usize, i: usize| all[member * n + i] as u64;
    let (prev, next) = ((me + r - 1) % r, (me + 1) % r);
    let mut b = RingWaitBreakdown::default();
    for (i, s) in layers.iter().flat_map(|l| &l.steps).enumerate() {
        let ready = posted(prev, i).max(posted(next, i)).min(s.received);
        let ready = ready.max(s.computed);
        b.neighbour_late += Duration::from_nanos(ready - s.computed);
        b.transfer += Duration::from_nanos(s.received.saturating_sub(ready));
    }
    Ok(b)
}

/// The whole sequence-parallel forward on one rank: shards `input`
/// (`[B, S, H*D]`, the same on every rank) over `groups.sp` (padding the
/// sequence), runs every layer with [`Usp`], and gathers the output with
/// the padding removed.
/// `device`: where the collectives move memory (see [`Usp::new`]);
/// `measure_standalone`: see [`Usp::measure_standalone`].
pub fn forward_sequence_parallel(
    model: &Model,
    groups: &UspGroups,
    input: &Tensor,
    device: Device,
    measure_standalone: bool,
) -> Result<UspOutput> {
    let (mut x, orig_len) = groups.sp.shard_with_pad(input, 1)?;
    let shard_len = x.shape()[1];
    let mut usp = Usp::new(model, groups.clone(), shard_len, orig_len, device)?;
    usp.measure_standalone(measure_standalone)?;
    let layers = usp.forward(&mut x)?;
    let output = groups.sp.all_gather_with_unpad(&x, 1, orig_len)?;
    Ok(UspOutput {
        output,
        layers,
        shard_len,
    })
}
