//! Collectives along a dimension: `all_gather(dim)`, `gather(dim)` and
//! `reduce_scatter(dim)`, each with an `_into` form writing into a
//! caller-provided output.
//!
//! Host memory is exchanged with strided blocks (each member's input lands
//! straight in its slice of the output: no copy before or after the
//! exchange). Device memory on a device backend goes through one device
//! permute around the flat primitive.

use comm_core::layout::{self, PermutePlan};
use comm_core::{BlockLayout, Collective, CommError, Layout, ReduceOp, Result, Tensor};

use super::{split_dims, GroupCoordinator};

fn gathered_shape(input: &Tensor, d: usize, w: usize) -> Vec<usize> {
    let mut s = input.shape().to_vec();
    s[d] *= w;
    s
}

fn check_output(op: &str, out: &Tensor, shape: &[usize], input: &Tensor) -> Result<()> {
    if out.shape() != shape || out.dtype() != input.dtype() {
        return Err(CommError::shape(
            op,
            format!("an output of shape {shape:?} and dtype {}", input.dtype()),
            format!("shape {:?} and dtype {}", out.shape(), out.dtype()),
        ));
    }
    Ok(())
}

impl GroupCoordinator {
    /// Concatenation of every member's `input` along `dim` (negative counts
    /// from the end), in group-rank order.
    pub fn all_gather(&self, input: &Tensor, dim: isize) -> Result<Tensor> {
        let d = layout::normalize_dim(dim, input.ndim())?;
        let mut out = input.zeros_with_shape(gathered_shape(input, d, self.world_size()))?;
        self.all_gather_into(input, dim, &mut out)?;
        Ok(out)
    }

    /// [`all_gather`](Self::all_gather) into `output` (shape: `input`'s with
    /// `dim` multiplied by the group size; same dtype; any device).
    pub fn all_gather_into(&self, input: &Tensor, dim: isize, output: &mut Tensor) -> Result<()> {
        let d = layout::normalize_dim(dim, input.ndim())?;
        let w = self.world_size();
        let shape = gathered_shape(input, d, w);
        check_output("all_gather(dim)", output, &shape, input)?;
        let desc = Layout {
            op: Collective::AllGatherDim,
            shape: input.shape(),
            arg: d as u32,
        };
        let (pre, post) = split_dims(input.shape(), d);
        let comm = self.communicator_for(input.device())?;
        if pre == 1 || w == 1 {
            // Rank-major is already the concatenation.
            return comm.all_gather_with(input, output, Some(desc));
        }
        let size = input.shape()[d];
        if self.on_device_plane(input.device())? {
            let mut flat = input.zeros_with_shape([w, pre, size, post])?;
            comm.all_gather_with(input, &mut flat, Some(desc))?;
            let plan =
                PermutePlan::new(&[w, pre, size, post], &[1, 0, 2, 3], input.dtype().size())?;
            return layout::permute_into(&flat, &plan, output);
        }
        // Every member's whole input, landing in its slice of each row.
        let n = input.numel();
        let send = BlockLayout {
            block_step: 0,
            runs: 1,
            run: n,
            stride: n,
        };
        let recv = BlockLayout {
            block_step: size * post,
            runs: pre,
            run: size * post,
            stride: w * size * post,
        };
        comm.all_to_all_strided(input, send, output, recv, Some(desc))
    }

    /// Like [`all_gather`](Self::all_gather) but only group rank `dst` gets
    /// the result; every other member gets `None`.
    pub fn gather(&self, input: &Tensor, dst: usize, dim: isize) -> Result<Option<Tensor>> {
        self.check_member("gather", dst)?;
        let d = layout::normalize_dim(dim, input.ndim())?;
        if self.rank_in_group != dst {
            self.gather_into(input, dst, dim, None)?;
            return Ok(None);
        }
        let mut out = input.zeros_with_shape(gathered_shape(input, d, self.world_size()))?;
        self.gather_into(input, dst, dim, Some(&mut out))?;
        Ok(Some(out))
    }

    /// [`gather`](Self::gather) into `output` on `dst` (pass `None` elsewhere).
    pub fn gather_into(
        &self,
        input: &Tensor,
        dst: usize,
        dim: isize,
        output: Option<&mut Tensor>,
    ) -> Result<()> {
        self.check_member("gather", dst)?;
        let d = layout::normalize_dim(dim, input.ndim())?;
        let w = self.world_size();
        let desc = Layout {
            op: Collective::GatherDim,
            shape: input.shape(),
            arg: d as u32,
        };
        let comm = self.communicator_for(input.device())?;
        let (pre, post) = split_dims(input.shape(), d);
        let Some(output) = output.filter(|_| self.rank_in_group == dst) else {
            if self.rank_in_group == dst {
                return Err(CommError::invalid(
                    "gather: the destination must pass an output",
                ));
            }
            return comm.gather_with(input, None::<&mut Tensor>, dst, Some(desc));
        };
        check_output("gather(dim)", output, &gathered_shape(input, d, w), input)?;
        if pre == 1 || w == 1 {
            return comm.gather_with(input, Some(output), dst, Some(desc));
        }
        let size = input.shape()[d];
        let mut flat = input.zeros_with_shape([w, pre, size, post])?;
        comm.gather_with(input, Some(&mut flat), dst, Some(desc))?;
        let plan = PermutePlan::new(&[w, pre, size, post], &[1, 0, 2, 3], input.dtype().size())?;
        layout::permute_into(&flat, &plan, output)
    }

    /// Reduces `input` over the group and returns this member's block of it
    /// along `dim` (whose size must divide by the group size).
    pub fn reduce_scatter(&self, input: &Tensor, dim: isize, op: ReduceOp) -> Result<Tensor> {
        let d = layout::normalize_dim(dim, input.ndim())?;
        let mut shape = input.shape().to_vec();
        shape[d] /= self.world_size();
        let mut out = input.zeros_with_shape(shape)?;
        self.reduce_scatter_into(input, dim, op, &mut out)?;
        Ok(out)
    }

    /// [`reduce_scatter`](Self::reduce_scatter) into `output` (shape:
    /// `input`'s with `dim` divided by the group size).
    pub fn reduce_scatter_into(
        &self,
        input: &Tensor,
        dim: isize,
        op: ReduceOp,
        output: &mut Tensor,
    ) -> Result<()> {
        let d = layout::normalize_dim(dim, input.ndim())?;
        let w = self.world_size();
        let size = input.shape()[d];
        if !size.is_multiple_of(w) {
            return Err(CommError::shape(
                "reduce_scatter(dim)",
                format!("dim {d} divisible by the group size {w}"),
                format!("size {size}"),
            ));
        }
        let mut shape = input.shape().to_vec();
        shape[d] = size / w;
        check_output("reduce_scatter(dim)", output, &shape, input)?;
        let desc = Layout {
            op: Collective::ReduceScatterDim,
            shape: input.shape(),
            arg: d as u32,
        };
        let comm = self.communicator_for(input.device())?;
        let (pre, post) = split_dims(input.shape(), d);
        if pre == 1 || w == 1 {
            return comm.reduce_scatter_with(input, output, op, Some(desc));
        }
        // [pre, w, size/w, post] -> [w, pre, size/w, post]: rank blocks contiguous.
        let plan = PermutePlan::new(
            &[pre, w, size / w, post],
            &[1, 0, 2, 3],
            input.dtype().size(),
        )?;
        let mut send = input.zeros_with_shape(plan.out_shape.clone())?;
        layout::permute_into(input, &plan, &mut send)?;
        comm.reduce_scatter_with(&send, output, op, Some(desc))
    }
}
