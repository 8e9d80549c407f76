//! One round of exactness checks over a group's host communicator:
//! all_reduce (f32 sum, i64 max), all_gather and all_to_all of values whose
//! results are exact integers in f32, at a small and a ~1 MiB size (the
//! backends' small-message and ring/pipelined paths). Used by the netns test
//! (the TCP part across two "hosts") and as the collective workload of the
//! crash trials.

use parallel_state::{CommError, Communicator, ReduceOp, Result};

/// Elements of the large messages: 1 MiB of f32.
pub const LARGE: usize = 256 * 1024;
/// Elements of the small messages.
pub const SMALL: usize = 1000;

fn expect_eq<T: PartialEq + std::fmt::Debug>(what: &str, got: &[T], want: &[T]) -> Result<()> {
    if let Some(i) = (0..want.len()).find(|&i| got.get(i) != want.get(i)) {
        return Err(CommError::invalid(format!(
            "{what}: element {i} is {:?}, expected {:?} ({} elements)",
            got.get(i),
            want[i],
            want.len()
        )));
    }
    Ok(())
}

/// One round (`round` varies the values) at `n` elements per rank; returns
/// the number of checks passed. Every value stays below 2^24, so every f32
/// result is exact.
pub fn round(c: &Communicator, round: u64, n: usize) -> Result<usize> {
    let (r, w) = (c.rank(), c.world_size());
    let shift = (round % 5) as f32;
    // all_reduce sum: rank r holds (r + 1) * (i % 7 + 1) + shift.
    let mut v: Vec<f32> = (0..n)
        .map(|i| (r as f32 + 1.0) * ((i % 7) as f32 + 1.0) + shift)
        .collect();
    c.all_reduce(&mut v, ReduceOp::Sum)?;
    let tri = (w * (w + 1) / 2) as f32;
    let want: Vec<f32> = (0..n)
        .map(|i| tri * ((i % 7) as f32 + 1.0) + shift * w as f32)
        .collect();
    expect_eq(&format!("all_reduce f32 sum x{n}"), &v, &want)?;
    // all_reduce max of i64: rank r holds r * 1000 + i.
    let mut m: Vec<i64> = (0..n).map(|i| (r * 1000 + i) as i64).collect();
    c.all_reduce(&mut m, ReduceOp::Max)?;
    let want: Vec<i64> = (0..n).map(|i| ((w - 1) * 1000 + i) as i64).collect();
    expect_eq(&format!("all_reduce i64 max x{n}"), &m, &want)?;
    // all_gather: rank r holds r * n + i, so the result is 0, 1, 2, ...
    let input: Vec<f32> = (0..n).map(|i| (r * n + i) as f32).collect();
    let mut out = vec![0f32; n * w];
    c.all_gather(&input, &mut out)?;
    let want: Vec<f32> = (0..n * w).map(|j| j as f32).collect();
    expect_eq(&format!("all_gather f32 x{n}"), &out, &want)?;
    // all_to_all: block d of rank s holds (s * w + d) * k + i (k = n / w).
    let k = n / w;
    let input: Vec<f32> = (0..k * w)
        .map(|j| ((r * w + j / k) * k + j % k) as f32)
        .collect();
    let mut out = vec![0f32; k * w];
    c.all_to_all(&input, &mut out)?;
    let want: Vec<f32> = (0..k * w)
        .map(|j| ((j / k * w + r) * k + j % k) as f32)
        .collect();
    expect_eq(&format!("all_to_all f32 {k} per rank"), &out, &want)?;
    Ok(4)
}

/// Rounds at the small and the large size; returns the checks passed.
pub fn rounds(c: &Communicator, first: u64, count: u64) -> Result<usize> {
    let mut checks = 0;
    for i in first..first + count {
        checks += round(c, i, SMALL)?;
        checks += round(c, i, LARGE)?;
    }
    Ok(checks)
}
