//! Sequence sharding over a group: `shard` and `all_gather_with_unpad`.

use comm_core::{layout, CommError, Result, Tensor};

use super::{on_host, GroupCoordinator};

impl GroupCoordinator {
    /// Pads `input` along `dim` to a multiple of the group size with zeros at
    /// the end and returns this member's block plus the original length.
    pub fn shard(&self, input: &Tensor, dim: isize) -> Result<(Tensor, usize)> {
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

    /// All-gathers shards made by [`shard`](Self::shard) and trims the
    /// padding back to `original_len`.
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
