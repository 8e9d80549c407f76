//! Ulysses sequence parallelism: `all_to_all_4d` (and its `_into` and
//! uneven forms).
//!
//! Host memory (and device memory staged through a host backend) is
//! exchanged as strided blocks: each member's head slice of every row goes
//! straight from the input to its peer's sequence slice of the output, with
//! no permute before or after. On a device backend one device permute on
//! each side wraps the flat all-to-all.

use comm_core::layout::{self, PermutePlan};
use comm_core::{BlockLayout, Collective, CommError, Layout, Result, Tensor};

use super::{on_host, GroupCoordinator};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// (scatter 2, gather 1): sequence-sharded in, head-sharded out.
    SeqToHead,
    /// (scatter 1, gather 2): the inverse.
    HeadToSeq,
}

fn mode_of(scatter_dim: usize, gather_dim: usize) -> Result<Mode> {
    match (scatter_dim, gather_dim) {
        (2, 1) => Ok(Mode::SeqToHead),
        (1, 2) => Ok(Mode::HeadToSeq),
        other => Err(CommError::invalid(format!(
            "all_to_all_4D supports (scatter_dim, gather_dim) = (2, 1) or (1, 2), got {other:?}"
        ))),
    }
}

fn shape4(x: &Tensor) -> Result<[usize; 4]> {
    match *x.shape() {
        [b, s, h, d] => Ok([b, s, h, d]),
        _ => Err(CommError::shape(
            "all_to_all_4D",
            "a 4-D [B, S, H, D] tensor",
            format!("shape {:?}", x.shape()),
        )),
    }
}

/// `n` split into `p` parts as evenly as possible, the first `n % p` one larger.
pub(crate) fn even_splits(n: usize, p: usize) -> Vec<usize> {
    (0..p).map(|i| n / p + usize::from(i < n % p)).collect()
}

/// The output shape of an all_to_all_4d, checking divisibility.
fn out_shape(mode: Mode, [b, s, h, d]: [usize; 4], p: usize) -> Result<[usize; 4]> {
    match mode {
        Mode::SeqToHead if h % p != 0 => Err(CommError::shape(
            "all_to_all_4D(2,1)",
            format!("a head count divisible by the group size {p}"),
            format!("{h} heads (use all_to_all_4d_uneven)"),
        )),
        Mode::SeqToHead => Ok([b, s * p, h / p, d]),
        Mode::HeadToSeq if s % p != 0 => Err(CommError::shape(
            "all_to_all_4D(1,2)",
            format!("a sequence length divisible by the group size {p}"),
            format!("{s} (use all_to_all_4d_uneven)"),
        )),
        Mode::HeadToSeq => Ok([b, s / p, h * p, d]),
    }
}

/// The send and receive block layouts of one exchange of `x` (`[b, s, h,
/// d]` on each member).
fn blocks(mode: Mode, [b, s, h, d]: [usize; 4], p: usize) -> (BlockLayout, BlockLayout) {
    match mode {
        Mode::SeqToHead => {
            // Send each member its head slice of every row; receive each
            // member's rows into its sequence slice.
            let hp = h / p;
            let send = BlockLayout {
                block_step: hp * d,
                runs: b * s,
                run: hp * d,
                stride: h * d,
            };
            let recv = BlockLayout {
                block_step: s * hp * d,
                runs: b,
                run: s * hp * d,
                stride: p * s * hp * d,
            };
            (send, recv)
        }
        Mode::HeadToSeq => {
            let sp = s / p;
            let send = BlockLayout {
                block_step: sp * h * d,
                runs: b,
                run: sp * h * d,
                stride: s * h * d,
            };
            let recv = BlockLayout {
                block_step: h * d,
                runs: b * sp,
                run: h * d,
                stride: p * h * d,
            };
            (send, recv)
        }
    }
}

impl GroupCoordinator {
    /// Ulysses all-to-all over a 4-D `[B, S, H, D]` tensor.
    ///
    /// - `(2, 1)`: `[B, S/P, H, D]` -> `[B, S, H/P, D]`; member `r` gets the full
    ///   sequence (group-rank order) and heads `[r*H/P, (r+1)*H/P)`.
    /// - `(1, 2)`: the exact inverse.
    ///
    /// Any other pair is an error, as are `H % P != 0` (mode 2,1) and
    /// `S % P != 0` (mode 1,2). Pure data movement: bit-exact. Members
    /// cross-check their shapes and modes: different shapes with the same
    /// byte count are an error on every member.
    pub fn all_to_all_4d(
        &self,
        x: &Tensor,
        scatter_dim: usize,
        gather_dim: usize,
    ) -> Result<Tensor> {
        let mode = mode_of(scatter_dim, gather_dim)?;
        let shape = out_shape(mode, shape4(x)?, self.world_size())?;
        let mut out = x.zeros_with_shape(shape)?;
        self.all_to_all_4d_into(x, scatter_dim, gather_dim, &mut out)?;
        Ok(out)
    }

    /// [`all_to_all_4d`](Self::all_to_all_4d) into a caller-provided
    /// `output` of the result's shape: nothing is allocated per call on the
    /// host path, so a reused output makes steady-state calls allocation-free.
    pub fn all_to_all_4d_into(
        &self,
        x: &Tensor,
        scatter_dim: usize,
        gather_dim: usize,
        output: &mut Tensor,
    ) -> Result<()> {
        let p = self.world_size();
        let mode = mode_of(scatter_dim, gather_dim)?;
        let s4 = shape4(x)?;
        let shape = out_shape(mode, s4, p)?;
        if output.shape() != shape || output.dtype() != x.dtype() {
            return Err(CommError::shape(
                "all_to_all_4D",
                format!("an output of shape {shape:?} and dtype {}", x.dtype()),
                format!("shape {:?} and dtype {}", output.shape(), output.dtype()),
            ));
        }
        if p == 1 {
            // The exchange is the identity: a copy (the front's one-member
            // path would stage it through a fresh workspace).
            return output.copy_from(x);
        }
        let desc = Layout {
            op: Collective::AllToAll4d,
            shape: x.shape(),
            arg: (scatter_dim * 16 + gather_dim) as u32,
        };
        let comm = self.communicator_for(x.device())?;
        if self.on_device_plane(x.device())? {
            return self.all_to_all_4d_device(x, mode, s4, output, desc);
        }
        let (send, recv) = blocks(mode, s4, p);
        comm.all_to_all_strided(x, send, output, recv, Some(desc))
    }

    /// Device backends: one device permute on each side of a flat exchange.
    fn all_to_all_4d_device(
        &self,
        x: &Tensor,
        mode: Mode,
        [b, s, h, d]: [usize; 4],
        output: &mut Tensor,
        desc: Layout<'_>,
    ) -> Result<()> {
        let p = self.world_size();
        let es = x.dtype().size();
        let comm = self.communicator_for(x.device())?;
        let (send_plan, recv_plan) = match mode {
            Mode::SeqToHead => {
                let hp = h / p;
                (
                    // [B, S/P, P, H/P, D] -> [P, B, S/P, H/P, D]: block j to rank j.
                    PermutePlan::new(&[b, s, p, hp, d], &[2, 0, 1, 3, 4], es)?,
                    // [P(src), B, S/P, H/P, D] -> [B, P, S/P, H/P, D] = [B, S, H/P, D].
                    PermutePlan::new(&[p, b, s, hp, d], &[1, 0, 2, 3, 4], es)?,
                )
            }
            Mode::HeadToSeq => {
                let sp = s / p;
                (
                    // [B, P, S/P, H/P, D] -> [P, B, S/P, H/P, D]: sequence block j to rank j.
                    PermutePlan::new(&[b, p, sp, h, d], &[1, 0, 2, 3, 4], es)?,
                    // [P(head block), B, S/P, H/P, D] -> [B, S/P, P, H/P, D] = [B, S/P, H, D].
                    PermutePlan::new(&[p, b, sp, h, d], &[1, 2, 0, 3, 4], es)?,
                )
            }
        };
        let mut send = x.zeros_with_shape(send_plan.out_shape.clone())?;
        layout::permute_into(x, &send_plan, &mut send)?;
        let mut recv = x.zeros_with_shape(send_plan.out_shape.clone())?;
        comm.all_to_all_with(&send, &mut recv, Some(desc))?;
        layout::permute_into(&recv, &recv_plan, output)
    }

    /// [`all_to_all_4d`](Self::all_to_all_4d) for sequence lengths and head
    /// counts that do not divide by the group size.
    ///
    /// - `(2, 1)`: member `r` holds `[B, S_r, H, D]` (any `S_r`, same `H`);
    ///   it receives `[B, sum(S), h_r, D]` where heads are split as evenly as
    ///   possible, the first `H % P` members taking one extra head.
    /// - `(1, 2)`: member `r` holds `[B, S, h_r, D]`; it receives
    ///   `[B, s_r, sum(h), D]` where `seq_splits` gives each member's share of
    ///   `S` (default: as even as possible, the first `S % P` taking one more).
    ///   `(1, 2)` with the splits of a `(2, 1)` call is its exact inverse.
    pub fn all_to_all_4d_uneven(
        &self,
        x: &Tensor,
        scatter_dim: usize,
        gather_dim: usize,
        seq_splits: Option<&[usize]>,
    ) -> Result<Tensor> {
        let p = self.world_size();
        let [b, s, h, dd] = shape4(x)?;
        let mode = mode_of(scatter_dim, gather_dim)?;
        if p == 1 {
            return x.try_clone();
        }
        // Everyone's (seq, heads): one tiny all-gather, so shapes need not be known in advance.
        let mine = [s as i64, h as i64];
        let mut all = vec![0i64; 2 * p];
        self.host_communicator()?.all_gather(&mine, &mut all)?;
        let seqs: Vec<usize> = (0..p).map(|i| all[2 * i] as usize).collect();
        let heads: Vec<usize> = (0..p).map(|i| all[2 * i + 1] as usize).collect();
        let r = self.rank_in_group;
        let (send_splits, send_dim, keep): (Vec<usize>, usize, Vec<usize>) = match mode {
            Mode::SeqToHead => {
                if heads.iter().any(|&x| x != h) {
                    return Err(CommError::shape(
                        "all_to_all_4d_uneven(2,1)",
                        "the same head count on every member",
                        format!("{heads:?}"),
                    ));
                }
                (even_splits(h, p), 2usize, seqs.clone())
            }
            Mode::HeadToSeq => {
                if seqs.iter().any(|&x| x != s) {
                    return Err(CommError::shape(
                        "all_to_all_4d_uneven(1,2)",
                        "the same sequence length on every member",
                        format!("{seqs:?}"),
                    ));
                }
                let splits = match seq_splits {
                    Some(v) if v.len() == p && v.iter().sum::<usize>() == s => v.to_vec(),
                    Some(v) => {
                        return Err(CommError::invalid(format!(
                        "seq_splits {v:?} must have {p} entries summing to the sequence length {s}"
                    )))
                    }
                    None => even_splits(s, p),
                };
                (splits, 1usize, heads.clone())
            }
        };
        // Pad every block to the largest one so the exchange has equal splits.
        let max = |v: &[usize]| v.iter().copied().max().unwrap_or(0);
        let (smax, hmax) = match mode {
            Mode::SeqToHead => (max(&seqs), max(&send_splits)),
            Mode::HeadToSeq => (max(&send_splits), max(&heads)),
        };
        let send = on_host(x, |t| {
            let mut blocks = Vec::with_capacity(p);
            let mut off = 0;
            for &n in &send_splits {
                let blk = layout::narrow(t, send_dim as isize, off, n)?;
                off += n;
                let blk = layout::pad(&blk, 1, smax - blk.shape()[1])?;
                let blk = layout::pad(&blk, 2, hmax - blk.shape()[2])?;
                blocks.push(blk.reshape([1, b, smax, hmax, dd])?);
            }
            layout::cat(&blocks.iter().collect::<Vec<_>>(), 0)
        })?;
        let mut recv = x.zeros_with_shape([p, b, smax, hmax, dd])?;
        self.communicator_for(x.device())?
            .all_to_all(&send, &mut recv)?;
        on_host(&recv, |t| {
            let mut parts = Vec::with_capacity(p);
            for (i, &k) in keep.iter().enumerate() {
                let blk = layout::narrow(t, 0, i, 1)?.reshape([b, smax, hmax, dd])?;
                // Trim the padding: the sender's real extent on one dim, ours on the other.
                let (sn, hn, cat_dim) = match mode {
                    Mode::SeqToHead => (k, send_splits[r], 1),
                    Mode::HeadToSeq => (send_splits[r], k, 2),
                };
                let blk = layout::narrow(&blk, 1, 0, sn)?;
                let blk = layout::narrow(&blk, 2, 0, hn)?;
                parts.push((blk, cat_dim));
            }
            let dim = parts.first().map(|(_, d)| *d).unwrap_or(1);
            layout::cat(&parts.iter().map(|(t, _)| t).collect::<Vec<_>>(), dim)
        })
    }
}
