//! The measurement core of `comm-perf`, in the style of nccl-tests.
//!
//! Sizes, counts and bandwidths follow nccl-tests (`doc/PERFORMANCE.md` there):
//! - `size` is the message size in bytes: the buffer of all_reduce, broadcast
//!   and send_recv; the *total* (gathered / scattered) buffer of all_gather
//!   and reduce_scatter; the per-rank send buffer of all_to_all and
//!   all_to_all_4d. Sizes that do not divide into whole elements (or, for
//!   those three, into `world` equal blocks; for all_to_all_4d, into rows of
//!   `heads x head_dim` elements) are rounded down to a valid count.
//! - `algbw = size / time`; `busbw = algbw * factor` with factor
//!   `2(n-1)/n` (all_reduce), `(n-1)/n` (all_gather, reduce_scatter,
//!   all_to_all, all_to_all_4d), `1` (broadcast, send_recv).
//! - `time` is the average per iteration, the maximum over ranks.
//!
//! The all_to_all_4d rows measure the group layer's Ulysses exchange
//! (`GroupCoordinator::all_to_all_4d_into`, into a reused output) of a
//! `[1, S/P, H, D]` tensor to `[1, S, H/P, D]` (`all_to_all_4d_21`) and of
//! `[1, S, H/P, D]` back to `[1, S/P, H, D]` (`all_to_all_4d_12`), with
//! `H = heads`, `D = head_dim`.

use std::time::Instant;

use comm_conformance::data::{
    count_wrong, filled, reduced, tolerance, ulysses_source, value, Pattern,
};
use comm_core::{CommError, Communicator, DType, Device, ReduceOp, Result, Tensor};
use parallel_state::GroupCoordinator;
use serde::Serialize;

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
    /// Ulysses all_to_all_4d, scatter 2 gather 1: `[1, S/P, H, D]` -> `[1, S, H/P, D]`.
    AllToAll4d21,
    /// Ulysses all_to_all_4d, scatter 1 gather 2: `[1, S, H/P, D]` -> `[1, S/P, H, D]`.
    AllToAll4d12,
}

impl Op {
    /// Every op, in report order.
    pub const ALL: [Op; 8] = [
        Op::AllReduce,
        Op::AllGather,
        Op::ReduceScatter,
        Op::Broadcast,
        Op::AllToAll,
        Op::SendRecv,
        Op::AllToAll4d21,
        Op::AllToAll4d12,
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
            Op::AllToAll4d21 => "all_to_all_4d_21",
            Op::AllToAll4d12 => "all_to_all_4d_12",
        }
    }

    /// nccl-tests' bus-bandwidth factor for a group of `n`.
    pub fn bus_factor(self, n: usize) -> f64 {
        let n = n as f64;
        match self {
            Op::AllReduce => 2.0 * (n - 1.0) / n,
            Op::AllGather
            | Op::ReduceScatter
            | Op::AllToAll
            | Op::AllToAll4d21
            | Op::AllToAll4d12 => (n - 1.0) / n,
            Op::Broadcast | Op::SendRecv => 1.0,
        }
    }

    /// True when the op takes a reduce op.
    pub fn reduces(self) -> bool {
        matches!(self, Op::AllReduce | Op::ReduceScatter)
    }

    /// True for the group layer's all_to_all_4d.
    pub fn is_4d(self) -> bool {
        matches!(self, Op::AllToAll4d21 | Op::AllToAll4d12)
    }

    /// The element count measured for `bytes` (see the module docs); `row`
    /// is the elements of one all_to_all_4d row (`heads * head_dim`).
    pub fn count_for(self, bytes: u64, dtype: DType, world: usize, row: usize) -> usize {
        let count = (bytes / dtype.size() as u64) as usize;
        match self {
            Op::AllGather | Op::ReduceScatter | Op::AllToAll => count / world * world,
            Op::AllToAll4d21 | Op::AllToAll4d12 => count / row.max(1) * row,
            _ => count,
        }
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Parses `--op`: a comma-separated list of op names, `all_to_all_4d` for
/// both of its modes, or `all` for every op.
pub fn parse_ops(s: &str) -> std::result::Result<Vec<Op>, String> {
    if s.trim() == "all" {
        return Ok(Op::ALL.to_vec());
    }
    let mut ops = Vec::new();
    for name in s.split(',') {
        let n = name.trim().replace('-', "_");
        if n == "all_to_all_4d" {
            ops.extend([Op::AllToAll4d21, Op::AllToAll4d12]);
            continue;
        }
        let op = Op::ALL
            .into_iter()
            .find(|o| o.name() == n || o.name().replace('_', "") == n)
            .ok_or_else(|| {
                format!(
                    "unknown op `{n}`; expected one of {}, all_to_all_4d (both modes) or `all`",
                    Op::ALL.map(|o| o.name()).join(", ")
                )
            })?;
        ops.push(op);
    }
    Ok(ops)
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
    /// Root of broadcast.
    pub root: usize,
    /// Timed iterations per size.
    pub iters: usize,
    /// Untimed iterations before timing.
    pub warmup: usize,
    /// Compare results against exactly computed values.
    pub check: bool,
    /// Heads of the all_to_all_4d tensor (a multiple of the world size).
    pub heads: usize,
    /// Head dimension of the all_to_all_4d tensor.
    pub head_dim: usize,
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

/// What the measured operations run on: the communicator, the group over
/// it (for all_to_all_4d) and where the buffers live.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The communicator of the backend under test.
    pub comm: &'a Communicator,
    /// A group layer over it, for the all_to_all_4d ops.
    pub group: Option<&'a GroupCoordinator>,
    /// Where the buffers live (`Device::Cuda(n)`: on that GPU).
    pub device: Device,
}

/// Buffers for one size of one op.
struct Buffers {
    input: Tensor,
    output: Tensor,
}

/// The 4-D shapes of an all_to_all_4d of `count` elements per rank:
/// (input, output).
fn shapes_4d(cfg: &PerfConfig, count: usize, world: usize) -> ([usize; 4], [usize; 4]) {
    let (h, d) = (cfg.heads, cfg.head_dim);
    let rows = count / (h * d).max(1);
    let hp = h / world.max(1);
    match cfg.op {
        Op::AllToAll4d12 => ([1, world * rows, hp, d], [1, rows, h, d]),
        _ => ([1, rows, h, d], [1, world * rows, hp, d]),
    }
}

/// Input and output tensors of `op` for a message of `count` elements (as
/// defined by [`Op::count_for`]), input filled with the check pattern, both
/// on `device`.
fn buffers(
    cfg: &PerfConfig,
    count: usize,
    rank: usize,
    world: usize,
    salt: u64,
    device: Device,
) -> Result<Buffers> {
    let d = cfg.dtype;
    let uniq = |r: usize| move |i: usize| value(d, Pattern::Unique, salt, r, i);
    let red = |r: usize| move |i: usize| value(d, Pattern::Reduce(cfg.redop), salt, r, i);
    let b = match cfg.op {
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
        Op::AllToAll | Op::SendRecv => Buffers {
            input: filled(d, count, uniq(rank)),
            output: Tensor::zeros([count], d),
        },
        Op::AllToAll4d21 | Op::AllToAll4d12 => {
            let (i, o) = shapes_4d(cfg, count, world);
            Buffers {
                input: filled(d, count, uniq(rank)).reshape(i)?,
                output: Tensor::zeros(o, d),
            }
        }
    };
    if device == Device::Cpu {
        return Ok(b);
    }
    Ok(Buffers {
        input: b.input.to_device(device)?,
        output: b.output.to_device(device)?,
    })
}

/// Runs `op` once on the buffers. all_reduce and broadcast work in place on
/// `input`.
fn run_once(t: &Target<'_>, cfg: &PerfConfig, b: &mut Buffers) -> Result<()> {
    let comm = t.comm;
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
        Op::AllToAll4d21 | Op::AllToAll4d12 => {
            let g = t.group.ok_or_else(|| {
                CommError::invalid("all_to_all_4d needs the group layer over the communicator")
            })?;
            let (scatter, gather) = if cfg.op == Op::AllToAll4d21 {
                (2, 1)
            } else {
                (1, 2)
            };
            g.all_to_all_4d_into(&b.input, scatter, gather, &mut b.output)
        }
    }
}

/// Wrong elements of this rank's result after one [`run_once`] on fresh
/// buffers (device results are copied to the host first).
fn wrong_here(
    cfg: &PerfConfig,
    b: &Buffers,
    count: usize,
    rank: usize,
    world: usize,
    salt: u64,
) -> Result<usize> {
    let d = cfg.dtype;
    let op = cfg.redop;
    let exact = |_: f64| 0.0;
    let tol = |e: f64| tolerance(d, op, e);
    let uniq = |r: usize, i: usize| value(d, Pattern::Unique, salt, r, i);
    let host = |t: &Tensor| t.to_host();
    let (input, output) = (host(&b.input)?, host(&b.output)?);
    let (inp, out) = (input.as_bytes()?, output.as_bytes()?);
    Ok(match cfg.op {
        Op::AllReduce => count_wrong(inp, d, |i| reduced(d, op, salt, world, i), tol),
        Op::AllGather => {
            let n = count / world;
            count_wrong(out, d, |i| uniq(i / n, i % n), exact)
        }
        Op::ReduceScatter => {
            let n = count / world;
            count_wrong(out, d, |k| reduced(d, op, salt, world, rank * n + k), tol)
        }
        Op::Broadcast => count_wrong(inp, d, |i| uniq(cfg.root, i), exact),
        Op::AllToAll => {
            let n = count / world;
            count_wrong(out, d, |i| uniq(i / n, rank * n + i % n), exact)
        }
        Op::SendRecv => {
            let prev = (rank + world - 1) % world;
            count_wrong(out, d, |i| uniq(prev, i), exact)
        }
        Op::AllToAll4d21 | Op::AllToAll4d12 => {
            let (shape, _) = shapes_4d(cfg, count, world);
            let forward = cfg.op == Op::AllToAll4d21;
            count_wrong(
                out,
                d,
                |i| {
                    let (src, at) = ulysses_source(forward, shape, world, rank, i);
                    uniq(src, at)
                },
                exact,
            )
        }
    })
}

/// Reduces one f64 over the group (max or sum), in the memory the
/// communicator moves (a device backend takes no host buffer).
fn group_f64(comm: &Communicator, v: f64, op: ReduceOp) -> Result<f64> {
    let mut x = Tensor::from_vec1(vec![v]);
    if comm.device() != Device::Cpu {
        x = x.to_device(comm.device())?;
    }
    comm.all_reduce(&mut x, op)?;
    Ok(x.to_vec::<f64>()?[0])
}

/// Measures one size. Every rank must call it with the same arguments;
/// every rank gets the same row.
pub fn measure(t: &Target<'_>, cfg: &PerfConfig, bytes: u64) -> Result<Row> {
    let comm = t.comm;
    let (rank, world) = (comm.rank(), comm.world_size());
    if cfg.op == Op::Broadcast && cfg.root >= world {
        return Err(CommError::invalid(format!(
            "--root {} is out of range for {world} ranks",
            cfg.root
        )));
    }
    if cfg.op.is_4d() && (cfg.heads == 0 || !cfg.heads.is_multiple_of(world) || cfg.head_dim == 0) {
        return Err(CommError::invalid(format!(
            "all_to_all_4d needs --heads a positive multiple of the world size {world} and a \
             positive --head-dim (got {} and {})",
            cfg.heads, cfg.head_dim
        )));
    }
    let count = cfg
        .op
        .count_for(bytes, cfg.dtype, world, cfg.heads * cfg.head_dim);
    let size = (count * cfg.dtype.size()) as u64;
    let salt = 0xC0FFEE ^ bytes;
    let mut b = buffers(cfg, count, rank, world, salt, t.device)?;

    let wrong = if cfg.check {
        run_once(t, cfg, &mut b)?;
        let w = wrong_here(cfg, &b, count, rank, world, salt)?;
        Some(group_f64(comm, w as f64, ReduceOp::Sum)? as u64)
    } else {
        None
    };

    for _ in 0..cfg.warmup {
        run_once(t, cfg, &mut b)?;
    }
    comm.barrier()?;
    let start = Instant::now();
    for _ in 0..cfg.iters {
        run_once(t, cfg, &mut b)?;
    }
    // Asynchronous backends: the time includes the work, not its enqueueing.
    comm.synchronize()?;
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
    use comm_core::{FrontOptions, SingleRank};

    #[test]
    fn sizes_and_ops_parse() {
        let s = sizes(8, 64 << 20, 2).unwrap();
        assert_eq!(s.len(), 24);
        assert_eq!((s[0], *s.last().unwrap()), (8, 64 << 20));
        assert_eq!(
            parse_ops("all_reduce, all_to_all_4d").unwrap(),
            [Op::AllReduce, Op::AllToAll4d21, Op::AllToAll4d12]
        );
        assert_eq!(parse_ops("all").unwrap().len(), Op::ALL.len());
        assert!(parse_ops("all_to_all_5d").is_err());
    }

    #[test]
    fn counts_round_down_like_nccl_tests() {
        assert_eq!(Op::AllReduce.count_for(10, DType::F32, 4, 1), 2);
        assert_eq!(Op::AllGather.count_for(8, DType::F32, 4, 1), 0);
        assert_eq!(Op::AllToAll.count_for(64, DType::F32, 3, 1), 15);
        assert_eq!(
            Op::AllToAll4d21.count_for(4096, DType::F32, 2, 24 * 16),
            768
        );
        assert!((Op::AllReduce.bus_factor(4) - 1.5).abs() < 1e-12);
        assert!((Op::AllGather.bus_factor(4) - 0.75).abs() < 1e-12);
    }

    #[test]
    fn single_rank_rows_check_clean() {
        let comm = Communicator::new(Box::new(SingleRank::new()), FrontOptions::new("perf"));
        let group = GroupCoordinator::from_communicators("perf", vec![0], 0, 0, comm.clone(), None)
            .unwrap();
        let t = Target {
            comm: &comm,
            group: Some(&group),
            device: Device::Cpu,
        };
        for op in Op::ALL.into_iter().filter(|o| *o != Op::SendRecv) {
            let cfg = PerfConfig {
                op,
                dtype: DType::BF16,
                redop: ReduceOp::Avg,
                root: 0,
                iters: 2,
                warmup: 1,
                check: true,
                heads: 4,
                head_dim: 8,
            };
            let r = measure(&t, &cfg, 4096).unwrap();
            assert_eq!(r.wrong, Some(0), "{op}");
            assert_eq!(r.count, 2048, "{op}");
        }
    }
}
