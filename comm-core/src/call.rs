//! What a collective call is: the one list of operations ([`Collective`]),
//! the description every member cross-checks ([`CallDesc`], 64 bytes on the
//! wire), and what a backend receives with each call ([`Call`]).

use std::fmt;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::{CommError, DType, Deadline, ReduceOp, Result};

/// Every operation the layer runs, flat primitives and the group-level
/// layout operations built on them. Errors, the flight recorder and the wire
/// descriptions all use this one list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Collective {
    /// In-place reduction on every member.
    AllReduce,
    /// Flat concatenation on every member.
    AllGather,
    /// Reduction, each member keeping one block.
    ReduceScatter,
    /// Root's buffer to every member.
    Broadcast,
    /// Flat concatenation on the root.
    Gather,
    /// Equal-split exchange.
    AllToAll,
    /// Point-to-point send.
    Send,
    /// Point-to-point receive.
    Recv,
    /// A batch of sends and receives progressed together.
    SendRecv,
    /// Every member arrives before any leaves.
    Barrier,
    /// `all_gather` along a dimension (group layer).
    AllGatherDim,
    /// `gather` along a dimension (group layer).
    GatherDim,
    /// `reduce_scatter` along a dimension (group layer).
    ReduceScatterDim,
    /// Ulysses all-to-all of a `[B, S, H, D]` tensor (group layer).
    AllToAll4d,
    /// An object or tensor-dict broadcast (group layer, length first).
    BroadcastObject,
}

impl Collective {
    /// Every variant, in wire-code order.
    pub const ALL: [Collective; 15] = [
        Collective::AllReduce,
        Collective::AllGather,
        Collective::ReduceScatter,
        Collective::Broadcast,
        Collective::Gather,
        Collective::AllToAll,
        Collective::Send,
        Collective::Recv,
        Collective::SendRecv,
        Collective::Barrier,
        Collective::AllGatherDim,
        Collective::GatherDim,
        Collective::ReduceScatterDim,
        Collective::AllToAll4d,
        Collective::BroadcastObject,
    ];

    /// The name users see (`all_reduce`, `all_to_all_4d`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            Collective::AllReduce => "all_reduce",
            Collective::AllGather => "all_gather",
            Collective::ReduceScatter => "reduce_scatter",
            Collective::Broadcast => "broadcast",
            Collective::Gather => "gather",
            Collective::AllToAll => "all_to_all",
            Collective::Send => "send",
            Collective::Recv => "recv",
            Collective::SendRecv => "send_recv",
            Collective::Barrier => "barrier",
            Collective::AllGatherDim => "all_gather(dim)",
            Collective::GatherDim => "gather(dim)",
            Collective::ReduceScatterDim => "reduce_scatter(dim)",
            Collective::AllToAll4d => "all_to_all_4d",
            Collective::BroadcastObject => "broadcast_object",
        }
    }

    /// Stable one-byte wire code.
    pub fn code(self) -> u8 {
        Collective::ALL
            .iter()
            .position(|c| *c == self)
            .map_or(u8::MAX, |p| p as u8)
    }

    /// The variant of a wire code.
    pub fn from_code(code: u8) -> Result<Collective> {
        Collective::ALL
            .get(usize::from(code))
            .copied()
            .ok_or_else(|| CommError::Protocol(format!("unknown collective code {code}")))
    }

    /// True for point-to-point operations, numbered per pair of ranks
    /// instead of per group.
    pub const fn is_p2p(self) -> bool {
        matches!(self, Collective::Send | Collective::Recv)
    }

    /// True when the operation has a root (broadcast, gather).
    pub const fn has_root(self) -> bool {
        matches!(
            self,
            Collective::Broadcast
                | Collective::Gather
                | Collective::GatherDim
                | Collective::BroadcastObject
        )
    }
}

impl fmt::Display for Collective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// At most this many dimensions of a shape are carried exactly; longer
/// shapes keep their first three dimensions and a digest of the rest.
pub const DESC_DIMS: usize = 4;

/// The description of one call that every member checks against the
/// others': operation, sequence number, dtype, element count, root or peer,
/// reduce op and (for layout operations) shape and mode. Backends carry its
/// 64-byte [`wire`](CallDesc::to_wire) form with their first message of a
/// call and compare it with [`CallDesc::check_peer`], so a mismatch is an
/// error on every member that names what each one called.
///
/// ```
/// use comm_core::{CallDesc, Collective, DType, ReduceOp};
/// let a = CallDesc::new(Collective::AllReduce, 7, DType::F32, 256).with_reduce(ReduceOp::Sum);
/// let b = CallDesc::from_wire(&a.to_wire()).unwrap();
/// assert_eq!(a, b);
/// let c = CallDesc::new(Collective::AllReduce, 7, DType::I32, 256).with_reduce(ReduceOp::Sum);
/// assert!(a.check_peer(&c, 1, "all_reduce").is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CallDesc {
    /// What was called.
    pub op: Collective,
    /// Position in the group's call sequence (collectives) or in the
    /// sequence of messages between one pair of ranks (send / recv).
    pub seq: u64,
    /// Element type.
    pub dtype: DType,
    /// Elements of this member's input (for send / recv: of the message).
    pub count: u64,
    /// Root of rooted operations; peer of send / recv; `u32::MAX` otherwise.
    pub root: u32,
    /// Reduce op of reductions.
    pub reduce: Option<ReduceOp>,
    /// Operation-specific argument: the dimension of `*_dim` operations,
    /// `scatter * 16 + gather` for all_to_all_4d; 0 otherwise.
    pub arg: u32,
    /// Number of dimensions of `dims` in use (0 for flat operations).
    pub ndim: u8,
    /// The shape (see [`DESC_DIMS`]).
    pub dims: [u64; DESC_DIMS],
}

const MAGIC: u16 = 0xD1C5;
const VERSION: u8 = 1;
const NO_REDUCE: u8 = 0xFF;
const FLAG_DIGEST: u8 = 1;

impl CallDesc {
    /// A flat call: no root, no reduce op, no shape.
    pub fn new(op: Collective, seq: u64, dtype: DType, count: usize) -> Self {
        CallDesc {
            op,
            seq,
            dtype,
            count: count as u64,
            root: u32::MAX,
            reduce: None,
            arg: 0,
            ndim: 0,
            dims: [0; DESC_DIMS],
        }
    }

    /// With a root (or, for send / recv, the peer).
    pub fn with_root(mut self, root: usize) -> Self {
        self.root = u32::try_from(root).unwrap_or(u32::MAX - 1);
        self
    }

    /// With a reduce op.
    pub fn with_reduce(mut self, op: ReduceOp) -> Self {
        self.reduce = Some(op);
        self
    }

    /// With an operation-specific argument.
    pub fn with_arg(mut self, arg: u32) -> Self {
        self.arg = arg;
        self
    }

    /// With a shape (layout operations). Shapes of more than
    /// [`DESC_DIMS`] dimensions keep their first three and a digest.
    pub fn with_shape(mut self, shape: &[usize]) -> Self {
        self.ndim = u8::try_from(shape.len()).unwrap_or(u8::MAX);
        self.dims = [0; DESC_DIMS];
        if shape.len() <= DESC_DIMS {
            for (d, s) in self.dims.iter_mut().zip(shape) {
                *d = *s as u64;
            }
        } else {
            for (d, s) in self.dims.iter_mut().zip(&shape[..DESC_DIMS - 1]) {
                *d = *s as u64;
            }
            self.dims[DESC_DIMS - 1] = digest(&shape[DESC_DIMS - 1..]);
        }
        self
    }

    /// The 64-byte wire form.
    pub fn to_wire(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[0..2].copy_from_slice(&MAGIC.to_le_bytes());
        b[2] = VERSION;
        b[3] = self.op.code();
        b[4] = self.dtype.code();
        b[5] = self.reduce.map_or(NO_REDUCE, ReduceOp::code);
        b[6] = self.ndim;
        b[7] = if usize::from(self.ndim) > DESC_DIMS {
            FLAG_DIGEST
        } else {
            0
        };
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.count.to_le_bytes());
        b[24..28].copy_from_slice(&self.root.to_le_bytes());
        b[28..32].copy_from_slice(&self.arg.to_le_bytes());
        for (i, d) in self.dims.iter().enumerate() {
            b[32 + 8 * i..40 + 8 * i].copy_from_slice(&d.to_le_bytes());
        }
        b
    }

    /// Parses [`to_wire`](Self::to_wire)'s form; a `Protocol` error for
    /// anything else (wrong length, magic, version or codes).
    pub fn from_wire(b: &[u8]) -> Result<Self> {
        let b: &[u8; 64] = b.try_into().map_err(|_| {
            CommError::Protocol(format!("a call description has 64 bytes, not {}", b.len()))
        })?;
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |i: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[i..i + 4]);
            u32::from_le_bytes(a)
        };
        if u16::from_le_bytes([b[0], b[1]]) != MAGIC || b[2] != VERSION {
            return Err(CommError::Protocol(
                "a peer sent a call description of another format or version".into(),
            ));
        }
        let mut dims = [0u64; DESC_DIMS];
        for (i, d) in dims.iter_mut().enumerate() {
            *d = u64_at(32 + 8 * i);
        }
        // One encoding per description: the flag must match the dimension
        // count and unused dimensions must be zero, so equal calls always
        // have equal bytes and a corrupted byte cannot pass unnoticed.
        let ndim = usize::from(b[6]);
        let flag = if ndim > DESC_DIMS { FLAG_DIGEST } else { 0 };
        if b[7] != flag || dims.iter().skip(ndim).any(|&d| d != 0) {
            return Err(CommError::Protocol(
                "a peer sent a malformed call description (flags or unused dimensions)".into(),
            ));
        }
        Ok(CallDesc {
            op: Collective::from_code(b[3])?,
            dtype: DType::from_code(b[4])?,
            reduce: match b[5] {
                NO_REDUCE => None,
                c => Some(ReduceOp::from_code(c)?),
            },
            ndim: b[6],
            seq: u64_at(8),
            count: u64_at(16),
            root: u32_at(24),
            arg: u32_at(28),
            dims,
        })
    }

    /// `Ok` when `theirs` (what group rank `peer` called) matches this
    /// member's call, else [`CommError::CallMismatch`] naming both calls.
    ///
    /// For send / recv pass the peer's own description: its peer field names
    /// this member, and its op is the mirror of ours.
    pub fn check_peer(&self, theirs: &CallDesc, peer: usize, operation: &str) -> Result<()> {
        let expected = if self.op.is_p2p() {
            // Our send to `peer` pairs with its recv from us, and the reverse.
            let mut e = *self;
            e.op = if self.op == Collective::Send {
                Collective::Recv
            } else {
                Collective::Send
            };
            e.root = theirs.root;
            e
        } else {
            *self
        };
        let ok = expected == *theirs && (!self.op.is_p2p() || u64::from(self.root) == peer as u64);
        if ok {
            return Ok(());
        }
        Err(CommError::CallMismatch {
            operation: operation.to_string(),
            peer: crate::RankId::local(peer),
            mine: self.to_string(),
            theirs: theirs.to_string(),
        })
    }

    /// The shape as far as it is carried (`None` for flat calls).
    pub fn shape_text(&self) -> Option<String> {
        let n = usize::from(self.ndim);
        if n == 0 {
            return None;
        }
        if n <= DESC_DIMS {
            Some(format!("{:?}", &self.dims[..n]))
        } else {
            Some(format!(
                "[{}, {}, {}, ... ({n} dims, tail digest {:#x})]",
                self.dims[0],
                self.dims[1],
                self.dims[2],
                self.dims[DESC_DIMS - 1]
            ))
        }
    }
}

/// FNV-1a over the dimensions: a stable digest (the same on every host and
/// toolchain) of the part of a long shape not carried exactly.
fn digest(dims: &[usize]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for d in dims {
        for b in (*d as u64).to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

impl fmt::Display for CallDesc {
    /// `all_reduce #7 (f32 x 256, sum)`, `send #3 to rank 1 (u8 x 9)`,
    /// `all_to_all_4d #2 (f32 x 512, shape [1, 4, 4, 8], scatter 2 gather 1)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} #{}", self.op, self.seq)?;
        match self.op {
            Collective::Send => write!(f, " to rank {}", self.root)?,
            Collective::Recv => write!(f, " from rank {}", self.root)?,
            _ => {}
        }
        write!(f, " ({} x {}", self.dtype, self.count)?;
        if self.op.has_root() && self.root != u32::MAX {
            write!(f, ", root {}", self.root)?;
        }
        if let Some(r) = self.reduce {
            write!(f, ", {r}")?;
        }
        if let Some(s) = self.shape_text() {
            write!(f, ", shape {s}")?;
        }
        match self.op {
            Collective::AllToAll4d => {
                write!(f, ", scatter {} gather {}", self.arg / 16, self.arg % 16)?
            }
            Collective::AllGatherDim | Collective::GatherDim | Collective::ReduceScatterDim => {
                write!(f, ", dim {}", self.arg)?
            }
            _ => {}
        }
        f.write_str(")")
    }
}

/// How long a wait may go before backends report it, and how often after.
pub const SLOW_WAIT_REPORT: Duration = Duration::from_secs(10);

/// What a backend receives with every call: the description to carry and
/// check, and the deadline. [`Call::waiting`] lets a backend report long
/// waits (`still waiting for ranks [...] in <op> on group <g>`) without each
/// one writing its own throttled logging.
#[derive(Debug)]
pub struct Call<'a> {
    /// The description of this call.
    pub desc: CallDesc,
    /// When the call must be complete.
    pub deadline: Deadline,
    /// The group's name, for messages (`tp:0`).
    pub group: &'a str,
    next_report: std::cell::Cell<Instant>,
}

impl<'a> Call<'a> {
    /// A call described by `desc` with `timeout` from now.
    pub fn new(desc: CallDesc, timeout: Duration, group: &'a str) -> Self {
        let deadline = Deadline::after(timeout);
        Call {
            desc,
            deadline,
            group,
            next_report: std::cell::Cell::new(Instant::now() + SLOW_WAIT_REPORT),
        }
    }

    /// The text backends put in errors: `all_reduce #7 (f32 x 256, sum)`.
    pub fn name(&self) -> String {
        self.desc.to_string()
    }

    /// Called by backends from their wait loops (when they are about to
    /// sleep, not on every spin). Past [`SLOW_WAIT_REPORT`], and then once
    /// per that interval, logs a warning naming the ranks still missing.
    pub fn waiting(&self, missing: impl FnOnce() -> Vec<usize>) {
        let now = Instant::now();
        if now < self.next_report.get() {
            return;
        }
        self.next_report.set(now + SLOW_WAIT_REPORT);
        tracing::warn!(
            "still waiting for ranks {:?} in {} on group {} ({:.0?} so far, deadline in {:.0?})",
            missing(),
            self.desc,
            self.group,
            self.deadline.elapsed(),
            self.deadline.remaining()
        );
    }

    /// A [`CommError::Timeout`] for this call naming the `missing` ranks.
    pub fn timeout(&self, missing: Vec<crate::Missing>) -> CommError {
        CommError::timeout_ranks(self.name(), self.deadline.elapsed(), missing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_round_trip_and_codes() {
        for (i, c) in Collective::ALL.iter().enumerate() {
            assert_eq!(c.code() as usize, i);
            assert_eq!(Collective::from_code(c.code()).unwrap(), *c);
        }
        let d = CallDesc::new(Collective::AllToAll4d, 9, DType::BF16, 1 << 33)
            .with_shape(&[1, 4, 4, 8])
            .with_arg(2 * 16 + 1);
        assert_eq!(CallDesc::from_wire(&d.to_wire()).unwrap(), d);
        let long =
            CallDesc::new(Collective::AllGatherDim, 1, DType::F32, 5).with_shape(&[1, 2, 3, 4, 5]);
        let other =
            CallDesc::new(Collective::AllGatherDim, 1, DType::F32, 5).with_shape(&[1, 2, 3, 5, 4]);
        assert_ne!(long, other, "the tail digest must tell shapes apart");
        assert!(CallDesc::from_wire(&[0u8; 64]).is_err());
        assert!(CallDesc::from_wire(&[0u8; 12]).is_err());
    }

    #[test]
    fn shapes_and_p2p_pairs_are_checked() {
        let a = CallDesc::new(Collective::AllToAll4d, 3, DType::F32, 128).with_shape(&[1, 4, 4, 8]);
        let b = CallDesc::new(Collective::AllToAll4d, 3, DType::F32, 128).with_shape(&[1, 8, 2, 8]);
        let e = a.check_peer(&b, 1, "all_to_all_4d").unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("[1, 4, 4, 8]") && text.contains("[1, 8, 2, 8]"),
            "{text}"
        );
        // Rank 0 sends to 1; rank 1 receives from 0.
        let send = CallDesc::new(Collective::Send, 0, DType::U8, 9).with_root(1);
        let recv = CallDesc::new(Collective::Recv, 0, DType::U8, 9).with_root(0);
        send.check_peer(&recv, 1, "send").unwrap();
        recv.check_peer(&send, 0, "recv").unwrap();
        let short = CallDesc::new(Collective::Recv, 0, DType::U8, 8).with_root(0);
        assert!(send.check_peer(&short, 1, "send").is_err());
    }
}
