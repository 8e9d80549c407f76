//! The measurement core of `comm-perf`, in the style of nccl-tests.
//!
//! Sizes, counts and bandwidths follow nccl-tests (`doc/PERFORMANCE.md` there):
//! - `size` is the message size in bytes: the buffer of all_reduce, broadcast
//!   and send_recv; the *total* (gathered / scattered) buffer of all_gather
//!   and reduce_scatter; the per-rank send buffer of all_to_all. Sizes that do
//!   not divide into whole elements (or, for those three, into `world` equal
//!   blocks) are rounded down to a valid count.
//! - `algbw = size / time`; `busbw = algbw * factor` with factor
//!   `2(n-1)/n` (all_reduce), `(n-1)/n` (all_gather, reduce_scatter,
//!   all_to_all), `1` (broadcast, send_recv).
//! - `time` is the average per iteration, the maximum over ranks.

use std::time::Instant;

use comm_core::{CommError, DType, DeviceCommunicator, ReduceOp, Result, Tensor};
use serde::Serialize;
use tests::data::{count_wrong, filled, reduced, tolerance, value, Pattern};

/// The operations comm-perf measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// In-place all-reduce.
    AllReduce,
    /// All-gather into a flat buffer.
    AllGather,
    /// Reduce-scatter of equal blocks.
    ReduceScatter,
    /// Broadcast from `root`.
    Broadcast,
    /// All-to-all with equal splits.
    AllToAll,
    /// Ring exchange: each rank sends to the next and receives from the previous.
    SendRecv,
}

impl Op {
    /// Every op, in report order.
    pub const ALL: [Op; 6] = [
        Op::AllReduce,
        Op::AllGather,
        Op::ReduceScatter,
        Op::Broadcast,
        Op::AllToAll,
        Op::SendRecv,
    ];

    /// The command-line name.
    pub const fn name(self) -> &'static str {
        match self {
            Op::AllReduce => "all_reduce",
            Op::AllGather => "all_gather",
            Op::ReduceScatter => "reduce_scatter",
            Op::Broadcast => "broadcast",
            Op::AllToAll => "all_to_all",
            Op::SendRecv => "send_recv",
        }
    }

    /// nccl-tests' bus-bandwidth factor for a group of `n`.
    pub fn bus_factor(self, n: usize) -> f64 {
        let n = n as f64;
        match self {
            Op::AllReduce => 2.0 * (n - 1.0) / n,
            Op::AllGather | Op::ReduceScatter | Op::AllToAll => (n - 1.0) / n,
            Op::Broadcast | Op::SendRecv => 1.0,
        }
    }

    /// True when the op takes a reduce op.
    pub fn reduces(self) -> bool {
        matches!(self, Op::AllReduce | Op::ReduceScatter)
    }

    /// The element count measured for `bytes` (see the module docs).
    pub fn count_for(self, bytes: u64, dtype: DType, world: usize) -> usize {
        let count = (bytes / dtype.size() as u64) as usize;
        match self {
            Op::AllGather | Op::ReduceScatter | Op::AllToAll => count / world * world,
            _ => count,
        }
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Op {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let s = s.replace('-', "_");
        Op::ALL
            .into_iter()
            .find(|o| o.name() == s || o.name().replace('_', "") == s)
            .ok_or_else(|| {
                format!(
                    "unknown op `{s}`; expected one of {} (or `all`)",
                    Op::ALL.map(|o| o.name()).join(", ")
                )
            })
    }
}

/// Parses a size like `8`, `64K`, `1M`, `2G` (powers of 1024; a trailing `B`
/// or `iB` is accepted).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mul) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 1 << 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("bad size `{s}`; use e.g. 8, 64K, 1M, 2G"))
}

/// The sizes from `min` to `max` (inclusive), multiplying by `factor`.
pub fn sizes(min: u64, max: u64, factor: u64) -> std::result::Result<Vec<u64>, String> {
    if factor < 2 {
        return Err("the step factor (-f) must be at least 2".into());
    }
    if min > max {
        return Err(format!(
            "min bytes ({min}) is larger than max bytes ({max})"
        ));
    }
    let mut v = Vec::new();
    let mut s = min;
    while s <= max {
        v.push(s);
        if s == 0 {
            s = 1;
            continue;
        }
        match s.checked_mul(factor) {
            Some(n) => s = n,
            None => break,
        }
    }
    Ok(v)
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct PerfConfig {
    /// The op.
    pub op: Op,
    /// Element type.
    pub dtype: DType,
    /// Reduce op (all_reduce, reduce_scatter).
    pub redop: ReduceOp,
    /// Broadcast root.
    pub root: usize,
    /// Timed iterations per size.
    pub iters: usize,
    /// Untimed iterations before timing.
    pub warmup: usize,
    /// Compare results against exactly computed values.
    pub check: bool,
}

/// One result row (also the JSON record).
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Backend name.
    pub backend: String,
    /// Op name.
    pub op: String,
    /// Number of ranks.
    pub world: usize,
    /// dtype name.
    pub dtype: String,
    /// Reduce op name, or `none`.
    pub redop: String,
    /// Root for broadcast, else -1.
    pub root: i64,
    /// Message size in bytes (see the module docs).
    pub bytes: u64,
    /// Element count matching `bytes`.
    pub count: usize,
    /// Average time per iteration, maximum over ranks, in microseconds.
    pub time_us: f64,
    /// Algorithm bandwidth, GB/s.
    pub algbw_gbps: f64,
    /// Bus bandwidth, GB/s.
    pub busbw_gbps: f64,
    /// Wrong elements summed over ranks; `None` without `--check`.
    pub wrong: Option<u64>,
}

/// Buffers for one size of one op.
struct Buffers {
    input: Tensor,
    output: Tensor,
}

/// Moves a host tensor to where the communicator wants it.
pub type Place<'a> = &'a dyn Fn(Tensor) -> Result<Tensor>;

/// Input and output tensors of `op` for a message of `count` elements (as
/// defined by [`Op::count_for`]), input filled with the check pattern, then
/// placed by `place`.
fn buffers(
    cfg: &PerfConfig,
    count: usize,
    rank: usize,
    world: usize,
    salt: u64,
    place: Place<'_>,
) -> Result<Buffers> {
    let b = host_buffers(cfg, count, rank, world, salt);
    Ok(Buffers {
        input: place(b.input)?,
        output: place(b.output)?,
    })
}

fn host_buffers(cfg: &PerfConfig, count: usize, rank: usize, world: usize, salt: u64) -> Buffers {
    let d = cfg.dtype;
    let uniq = |r: usize| move |i: usize| value(d, Pattern::Unique, salt, r, i);
    let red = |r: usize| move |i: usize| value(d, Pattern::Reduce(cfg.redop), salt, r, i);
    match cfg.op {
        Op::AllReduce => Buffers {
            input: filled(d, count, red(rank)),
            output: Tensor::zeros([0], d),
        },
        Op::AllGather => Buffers {
            input: filled(d, count / world, uniq(rank)),
            output: Tensor::zeros([count], d),
        },
        Op::ReduceScatter => Buffers {
            input: filled(d, count, red(rank)),
            output: Tensor::zeros([count / world], d),
        },
        Op::Broadcast => Buffers {
            input: filled(d, count, uniq(rank)),
            output: Tensor::zeros([0], d),
        },
        Op::AllToAll => Buffers {
            input: filled(d, count, uniq(rank)),
            output: Tensor::zeros([count], d),
        },
        Op::SendRecv => Buffers {
            input: filled(d, count, uniq(rank)),
            output: Tensor::zeros([count], d),
        },
    }
}

/// Runs `op` once on the buffers. all_reduce and broadcast work in place on
/// `input`.
fn run_once(comm: &mut dyn DeviceCommunicator, cfg: &PerfConfig, b: &mut Buffers) -> Result<()> {
    let (rank, world) = (comm.rank(), comm.world_size());
    match cfg.op {
        Op::AllReduce => comm.all_reduce(&mut b.input, cfg.redop),
        Op::AllGather => comm.all_gather(&b.input, &mut b.output),
        Op::ReduceScatter => comm.reduce_scatter(&b.input, &mut b.output, cfg.redop),
        Op::Broadcast => comm.broadcast(&mut b.input, cfg.root),
        Op::AllToAll => comm.all_to_all(&b.input, &mut b.output),
        Op::SendRecv => {
            if world < 2 {
                return Err(CommError::invalid("send_recv needs at least 2 ranks"));
            }
            let (next, prev) = ((rank + 1) % world, (rank + world - 1) % world);
            // Even ranks send first, odd ranks receive first: no cycle of
            // blocking sends, whatever the backend buffers.
            if rank % 2 == 0 {
                comm.send(&b.input, next)?;
                comm.recv(&mut b.output, prev)
            } else {
                comm.recv(&mut b.output, prev)?;
                comm.send(&b.input, next)
            }
        }
    }
}

/// Wrong elements of this rank's result after one [`run_once`] on fresh buffers.
fn wrong_here(
    cfg: &PerfConfig,
    b: &Buffers,
    count: usize,
    rank: usize,
    world: usize,
    salt: u64,
) -> usize {
    let d = cfg.dtype;
    let op = cfg.redop;
    let exact = |_: f64| 0.0;
    let tol = |e: f64| tolerance(d, op, e);
    match cfg.op {
        Op::AllReduce => count_wrong(&b.input, |i| reduced(d, op, salt, world, i), tol),
        Op::AllGather => {
            let n = count / world;
            count_wrong(
                &b.output,
                |i| value(d, Pattern::Unique, salt, i / n, i % n),
                exact,
            )
        }
        Op::ReduceScatter => {
            let n = count / world;
            count_wrong(
                &b.output,
                |k| reduced(d, op, salt, world, rank * n + k),
                tol,
            )
        }
        Op::Broadcast => count_wrong(
            &b.input,
            |i| value(d, Pattern::Unique, salt, cfg.root, i),
            exact,
        ),
        Op::AllToAll => {
            let n = count / world;
            count_wrong(
                &b.output,
                |i| value(d, Pattern::Unique, salt, i / n, rank * n + i % n),
                exact,
            )
        }
        Op::SendRecv => {
            let prev = (rank + world - 1) % world;
            count_wrong(
                &b.output,
                |i| value(d, Pattern::Unique, salt, prev, i),
                exact,
            )
        }
    }
}

/// Reduces one f64 over the group (max or sum).
fn group_f64(comm: &mut dyn DeviceCommunicator, v: f64, op: ReduceOp) -> Result<f64> {
    let mut t = Tensor::from_vec1(vec![v]);
    comm.all_reduce(&mut t, op)?;
    Ok(t.as_slice::<f64>()?[0])
}

/// Measures one size with host tensors. Every rank must call it with the
/// same arguments; every rank gets the same row.
pub fn measure(comm: &mut dyn DeviceCommunicator, cfg: &PerfConfig, bytes: u64) -> Result<Row> {
    measure_on(comm, cfg, bytes, &Ok)
}

/// [`measure`] with the buffers placed by `place` (e.g. on a CUDA device).
/// Device results are copied to the host only for `--check`.
pub fn measure_on(
    comm: &mut dyn DeviceCommunicator,
    cfg: &PerfConfig,
    bytes: u64,
    place: Place<'_>,
) -> Result<Row> {
    let (rank, world) = (comm.rank(), comm.world_size());
    if cfg.op == Op::Broadcast && cfg.root >= world {
        return Err(CommError::invalid(format!(
            "--root {} is out of range for {world} ranks",
            cfg.root
        )));
    }
    let count = cfg.op.count_for(bytes, cfg.dtype, world);
    let size = (count * cfg.dtype.size()) as u64;
    let salt = 0xC0FFEE ^ bytes;
    let mut b = buffers(cfg, count, rank, world, salt, place)?;

    let wrong = if cfg.check {
        run_once(comm, cfg, &mut b)?;
        let w = wrong_here(cfg, &b, count, rank, world, salt);
        Some(group_f64(comm, w as f64, ReduceOp::Sum)? as u64)
    } else {
        None
    };

    for _ in 0..cfg.warmup {
        run_once(comm, cfg, &mut b)?;
    }
    comm.barrier()?;
    let start = Instant::now();
    for _ in 0..cfg.iters {
        run_once(comm, cfg, &mut b)?;
    }
    let local_us = start.elapsed().as_secs_f64() * 1e6 / cfg.iters.max(1) as f64;
    let time_us = group_f64(comm, local_us, ReduceOp::Max)?;

    let algbw = if time_us > 0.0 {
        size as f64 / (time_us * 1e-6) / 1e9
    } else {
        0.0
    };
    Ok(Row {
        backend: comm.backend().to_string(),
        op: cfg.op.name().to_string(),
        world,
        dtype: cfg.dtype.name().to_string(),
        redop: if cfg.op.reduces() {
            cfg.redop.name().to_string()
        } else {
            "none".into()
        },
        root: if cfg.op == Op::Broadcast {
            cfg.root as i64
        } else {
            -1
        },
        bytes: size,
        count,
        time_us,
        algbw_gbps: algbw,
        busbw_gbps: algbw * cfg.op.bus_factor(world),
        wrong,
    })
}

/// The table header, nccl-tests style.
pub fn header() -> String {
    format!(
        "#{:>11} {:>13} {:>7} {:>7} {:>6} {:>11} {:>8} {:>8} {:>7}\n#{:>11} {:>13} {:>7} {:>7} {:>6} {:>11} {:>8} {:>8} {:>7}",
        "size", "count", "type", "redop", "root", "time", "algbw", "busbw", "#wrong",
        "(B)", "(elements)", "", "", "", "(us)", "(GB/s)", "(GB/s)", ""
    )
}

/// One table row.
pub fn format_row(r: &Row) -> String {
    let wrong = r.wrong.map_or_else(|| "N/A".to_string(), |w| w.to_string());
    format!(
        "{:>12} {:>13} {:>7} {:>7} {:>6} {:>11.2} {:>8.3} {:>8.3} {:>7}",
        r.bytes, r.count, r.dtype, r.redop, r.root, r.time_us, r.algbw_gbps, r.busbw_gbps, wrong
    )
}

/// The summary lines for a set of rows.
pub fn summary(rows: &[Row]) -> String {
    let avg = if rows.is_empty() {
        0.0
    } else {
        rows.iter().map(|r| r.busbw_gbps).sum::<f64>() / rows.len() as f64
    };
    let wrong = if rows.iter().all(|r| r.wrong.is_some()) {
        rows.iter()
            .map(|r| r.wrong.unwrap_or(0))
            .sum::<u64>()
            .to_string()
    } else {
        "N/A".into()
    };
    format!("# Avg bus bandwidth    : {avg:.4} GB/s\n# Wrong total          : {wrong}")
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn sizes_and_parsing() {
        assert_eq!(parse_size("8").unwrap(), 8);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("1KiB").unwrap(), 1024);
        assert!(parse_size("x").is_err());
        let s = sizes(8, 64 << 20, 2).unwrap();
        assert_eq!(s.len(), 24);
        assert_eq!((s[0], *s.last().unwrap()), (8, 64 << 20));
    }

    #[test]
    fn counts_round_down_like_nccl_tests() {
        assert_eq!(Op::AllReduce.count_for(10, DType::F32, 4), 2);
        assert_eq!(Op::AllGather.count_for(8, DType::F32, 4), 0);
        assert_eq!(Op::AllToAll.count_for(64, DType::F32, 3), 15);
        assert!((Op::AllReduce.bus_factor(4) - 1.5).abs() < 1e-12);
        assert!((Op::AllGather.bus_factor(4) - 0.75).abs() < 1e-12);
    }

    #[test]
    fn single_rank_rows_check_clean() {
        let mut c = comm_core::SingleRankCommunicator::new();
        for op in [
            Op::AllReduce,
            Op::AllGather,
            Op::ReduceScatter,
            Op::Broadcast,
            Op::AllToAll,
        ] {
            let cfg = PerfConfig {
                op,
                dtype: DType::BF16,
                redop: ReduceOp::Avg,
                root: 0,
                iters: 2,
                warmup: 1,
                check: true,
            };
            let r = measure(&mut c, &cfg, 4096).unwrap();
            assert_eq!(r.wrong, Some(0), "{op}");
            assert_eq!(r.count, 2048);
        }
    }
}
