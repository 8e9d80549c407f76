//! Sequence sharding over a group: `shard` (exact blocks), `shard_with_pad`
//! (FastVideo's `sequence_model_parallel_shard`: pad, then shard) and
//! `all_gather_with_unpad`, its inverse.

use comm_core::{layout, CommError, Result, Tensor};

use super::{on_host, GroupCoordinator};

impl GroupCoordinator {
    /// This member's block of `input` along `dim` (negative counts from the
    /// end): rows `[r * len / P, (r + 1) * len / P)` for group rank `r` of `P`
    /// members, as FastVideo's `GroupCoordinator.shard`. Also returns `len`,
    /// the size of `dim` before sharding, so that `shard` and
    /// [`shard_with_pad`](Self::shard_with_pad) are interchangeable where the
    /// length divides.
    ///
    /// A length the group size does not divide is an error (FastVideo's
    /// `shard` silently drops the last `len % P` rows); pad with
    /// [`shard_with_pad`](Self::shard_with_pad) /
    /// [`sequence_model_parallel_shard`](crate::sequence_model_parallel_shard)
    /// instead. A one-member group returns a copy of `input`.
    pub fn shard(&self, input: &Tensor, dim: isize) -> Result<(Tensor, usize)> {
        let d = layout::normalize_dim(dim, input.ndim())?;
        let p = self.world_size();
        let len = input.shape()[d];
        if !len.is_multiple_of(p) {
            return Err(CommError::shape(
                format!("shard over group `{}`", self.name),
                format!("dimension {d} divisible by the group size {p}"),
                format!(
                    "size {len} (shard would drop the last {} row(s); shard_with_pad / \
                     sequence_model_parallel_shard pad it instead)",
                    len % p
                ),
            ));
        }
        Ok((self.block(input, d, len / p)?, len))
    }

    /// FastVideo's `sequence_model_parallel_shard` on this group: pads
    /// `input` along `dim` with zeros at the end to a multiple of the group
    /// size (`compute_padding_for_sp`), then returns this member's block and
    /// the original length, which
    /// [`all_gather_with_unpad`](Self::all_gather_with_unpad) trims back to.
    pub fn shard_with_pad(&self, input: &Tensor, dim: isize) -> Result<(Tensor, usize)> {
        let d = layout::normalize_dim(dim, input.ndim())?;
        let p = self.world_size();
        let len = input.shape()[d];
        let (padded, pad) = dist_utils::compute_padding_for_sp(len, p);
        let per = padded / p;
        let r = self.rank_in_group;
        let out = on_host(input, |t| {
            let t = layout::pad(t, d as isize, pad)?;
            layout::narrow(&t, d as isize, r * per, per)
        })?;
        Ok((out, len))
    }

    /// Block `rank_in_group` of `per` rows along `d` (a copy of the whole
    /// input on a one-member group).
    fn block(&self, input: &Tensor, d: usize, per: usize) -> Result<Tensor> {
        if self.world_size() == 1 {
            return input.try_clone();
        }
        let r = self.rank_in_group;
        on_host(input, |t| layout::narrow(t, d as isize, r * per, per))
    }

    /// All-gathers shards made by [`shard_with_pad`](Self::shard_with_pad)
    /// (or [`shard`](Self::shard)) and trims the padding back to
    /// `original_len`.
    pub fn all_gather_with_unpad(
        &self,
        input: &Tensor,
        dim: isize,
        original_len: usize,
    ) -> Result<Tensor> {
        let d = layout::normalize_dim(dim, input.ndim())?;
        let g = self.all_gather(input, dim)?;
        if original_len > g.shape()[d] {
            return Err(CommError::invalid(format!(
                "all_gather_with_unpad: original length {original_len} exceeds the gathered length {}",
                g.shape()[d]
            )));
        }
        let extra = g.shape()[d] - original_len;
        on_host(&g, |t| layout::unpad(t, d as isize, extra))
    }
}
