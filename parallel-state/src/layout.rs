//! Rank layouts: which global ranks form each tensor-, sequence- and
//! data-parallel group (the rules are in the crate docs, "Group layouts").

use comm_core::{CommError, Result};

/// A list of groups, each the global ranks of one group in group-rank order.
pub type RankGroups = Vec<Vec<usize>>;

/// How ranks are assigned to parallel groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LayoutKind {
    /// FastVideo's layout: TP and SP groups are both consecutive blocks (so
    /// they overlap when `tp > 1` and `sp > 1`); DP groups stride by `sp`.
    #[default]
    FastVideo,
    /// An orthogonal mesh `dp x sp x tp` (tp fastest): every combination is a
    /// valid, non-overlapping decomposition, as in Megatron.
    Mesh,
}

/// The groups of one layout; each inner `Vec` is a group's global ranks in
/// group-rank order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupLayout {
    /// Tensor-parallel groups.
    pub tp: Vec<Vec<usize>>,
    /// Sequence-parallel groups.
    pub sp: Vec<Vec<usize>>,
    /// Data-parallel groups.
    pub dp: Vec<Vec<usize>>,
}

fn check_sizes(world: usize, tp: usize, sp: usize) -> Result<()> {
    if world == 0 || tp == 0 || sp == 0 {
        return Err(CommError::invalid(format!(
            "parallel sizes must be positive: world_size={world}, tensor_parallel_size={tp}, \
             sequence_parallel_size={sp}"
        )));
    }
    if !world.is_multiple_of(tp) {
        return Err(CommError::invalid(format!(
            "world_size {world} is not divisible by tensor_parallel_size {tp}"
        )));
    }
    if !world.is_multiple_of(sp) {
        return Err(CommError::invalid(format!(
            "world_size {world} is not divisible by sequence_parallel_size {sp}"
        )));
    }
    Ok(())
}

fn blocks(world: usize, size: usize) -> Vec<Vec<usize>> {
    (0..world / size)
        .map(|g| (g * size..(g + 1) * size).collect())
        .collect()
}

/// FastVideo's layout (see the crate docs, "Group layouts"): TP =
/// consecutive blocks of `tp`, SP = consecutive blocks of `sp`, DP = `{i,
/// i+sp, i+2sp, ...}` for `i < sp`.
///
/// `dp`, when given, must equal `world / sp` (FastVideo ignores it; here a
/// mismatch is an error).
///
/// ```
/// use parallel_state::layout::fastvideo_layout;
/// let l = fastvideo_layout(8, 2, 4, None).unwrap();
/// assert_eq!(l.sp, vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
/// assert_eq!(l.dp, vec![vec![0, 4], vec![1, 5], vec![2, 6], vec![3, 7]]);
/// ```
pub fn fastvideo_layout(
    world: usize,
    tp: usize,
    sp: usize,
    dp: Option<usize>,
) -> Result<GroupLayout> {
    check_sizes(world, tp, sp)?;
    let dp_size = world / sp;
    if let Some(d) = dp {
        if d != dp_size {
            return Err(CommError::invalid(format!(
                "data_parallel_size {d} is inconsistent with world_size {world} / \
                 sequence_parallel_size {sp} = {dp_size}; pass {dp_size} or leave it unset"
            )));
        }
    }
    Ok(GroupLayout {
        tp: blocks(world, tp),
        sp: blocks(world, sp),
        dp: (0..sp)
            .map(|i| (0..dp_size).map(|k| i + k * sp).collect())
            .collect(),
    })
}

/// An orthogonal `dp x sp x tp` mesh with tp fastest: global rank
/// `r = (d * sp + s) * tp + t`. `tp * sp * dp` must equal `world` (`dp`
/// defaults to `world / (tp * sp)`).
///
/// ```
/// use parallel_state::layout::mesh_layout;
/// let l = mesh_layout(8, 2, 2, None).unwrap();
/// assert_eq!(l.tp[1], vec![2, 3]);
/// assert_eq!(l.sp[0], vec![0, 2]);
/// assert_eq!(l.dp[0], vec![0, 4]);
/// ```
pub fn mesh_layout(world: usize, tp: usize, sp: usize, dp: Option<usize>) -> Result<GroupLayout> {
    check_sizes(world, tp, sp)?;
    if !world.is_multiple_of(tp * sp) {
        return Err(CommError::invalid(format!(
            "world_size {world} is not divisible by tensor_parallel_size x sequence_parallel_size = {}",
            tp * sp
        )));
    }
    let dp_size = world / (tp * sp);
    if let Some(d) = dp {
        if d != dp_size {
            return Err(CommError::invalid(format!(
                "data_parallel_size {d} is inconsistent: world_size {world} / (tp {tp} x sp {sp}) = {dp_size}"
            )));
        }
    }
    let rank = |d: usize, s: usize, t: usize| (d * sp + s) * tp + t;
    let mut l = GroupLayout {
        tp: vec![],
        sp: vec![],
        dp: vec![],
    };
    for d in 0..dp_size {
        for s in 0..sp {
            l.tp.push((0..tp).map(|t| rank(d, s, t)).collect());
        }
        for t in 0..tp {
            l.sp.push((0..sp).map(|s| rank(d, s, t)).collect());
        }
    }
    for s in 0..sp {
        for t in 0..tp {
            l.dp.push((0..dp_size).map(|d| rank(d, s, t)).collect());
        }
    }
    l.sp.sort();
    l.dp.sort();
    Ok(l)
}

/// Splits one sequence-parallel group into Ulysses sub-groups (contiguous
/// blocks of `ulysses`) and ring groups (strided by `ulysses`), as in
/// USP / xDiT: `sp = ulysses x ring`.
///
/// ```
/// use parallel_state::layout::ulysses_ring_split;
/// let (u, r) = ulysses_ring_split(&[0, 1, 2, 3], 2).unwrap();
/// assert_eq!(u, vec![vec![0, 1], vec![2, 3]]);
/// assert_eq!(r, vec![vec![0, 2], vec![1, 3]]);
/// ```
pub fn ulysses_ring_split(sp_group: &[usize], ulysses: usize) -> Result<(RankGroups, RankGroups)> {
    let n = sp_group.len();
    if ulysses == 0 || !n.is_multiple_of(ulysses) {
        return Err(CommError::invalid(format!(
            "ulysses degree {ulysses} must be positive and divide the sequence-parallel size {n}"
        )));
    }
    let ring = n / ulysses;
    let u = (0..ring)
        .map(|g| sp_group[g * ulysses..(g + 1) * ulysses].to_vec())
        .collect();
    let r = (0..ulysses)
        .map(|i| (0..ring).map(|k| sp_group[i + k * ulysses]).collect())
        .collect();
    Ok((u, r))
}

/// The group of `groups` that contains `rank`.
pub fn group_of(groups: &[Vec<usize>], rank: usize) -> Option<&Vec<usize>> {
    groups.iter().find(|g| g.contains(&rank))
}
