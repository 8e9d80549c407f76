//! Strided all_to_all ([`Communicator::all_to_all_strided`]) checked
//! against an index-by-index reference: the Ulysses all_to_all_4D of
//! `[B, S/P, H, D]` into `[B, S, H/P, D]` and its inverse, as
//! [`BlockLayout`]s, carrying the 4-D shape in the call description.

use comm_core::{BlockLayout, Collective, Communicator, DType, Layout};

use crate::data::ulysses_source;
use crate::suite::{Checks, Failure};

/// `(B, S/P, H/P, D)` cases: empty, tiny, odd, and one past the backends'
/// small-message thresholds.
const CASES: [(usize, usize, usize, usize); 4] =
    [(0, 2, 2, 4), (1, 2, 1, 3), (2, 3, 3, 5), (1, 64, 4, 260)];

/// The two layouts of one Ulysses exchange, for P members: where member
/// `j`'s head block lies in the `[B, S/P, H, D]` buffer, and where the block
/// from member `i` lands in the `[B, S, H/P, D]` buffer.
fn layouts(p: usize, b: usize, sl: usize, hp: usize, d: usize) -> (BlockLayout, BlockLayout) {
    let heads = BlockLayout {
        block_step: hp * d,
        runs: b * sl,
        run: hp * d,
        stride: p * hp * d,
    };
    let sequence = BlockLayout {
        block_step: sl * hp * d,
        runs: b,
        run: sl * hp * d,
        stride: p * sl * hp * d,
    };
    (heads, sequence)
}

pub(crate) fn run(c: &mut Checks<'_>) -> Result<(), Failure> {
    let caps = c.comm.capabilities();
    if c.on_device() && c.comm.device() != comm_core::Device::Cpu && !caps.strided_all_to_all {
        c.log("strided all_to_all: skipped (a device backend without strided_all_to_all; the front asks callers to permute on the device)");
        return Ok(());
    }
    c.section("strided all_to_all (Ulysses)", |c| {
        for dtype in [DType::F32, DType::BF16, DType::I8, DType::F64] {
            for case in CASES {
                exchange(c, dtype, case, true)?;
                exchange(c, dtype, case, false)?;
            }
        }
        Ok(())
    })
}

/// One direction of the exchange: `forward` is `[B, S/P, H, D]` ->
/// `[B, S, H/P, D]` (member `r` receives the whole sequence of its head
/// block), otherwise the exact inverse.
fn exchange(
    c: &mut Checks<'_>,
    dtype: DType,
    (b, sl, hp, d): (usize, usize, usize, usize),
    forward: bool,
) -> Result<(), Failure> {
    let (salt, rank, p) = (c.next_salt(), c.rank, c.world);
    let (h, s) = (p * hp, p * sl);
    let (heads, sequence) = layouts(p, b, sl, hp, d);
    // The input's shape, its layout and the output's, and the code of the
    // call (scatter and gather dims) carried in the description.
    let (shape, send, recv, arg, what) = if forward {
        let what = format!(
            "all_to_all_strided [B={b}, S/P={sl}, H={h}, D={d}] -> [B, S, H/P, D] {dtype} world={p}"
        );
        ([b, sl, h, d], heads, sequence, 2 * 16 + 1, what)
    } else {
        let what = format!(
            "all_to_all_strided [B={b}, S={s}, H/P={hp}, D={d}] -> [B, S/P, H, D] {dtype} world={p}"
        );
        ([b, s, hp, d], sequence, heads, 16 + 2, what)
    };
    let n = shape.iter().product();
    let input = c.buf(dtype, n, |i| Checks::unique(dtype, salt, rank, i))?;
    let mut out = c.out(dtype, n)?;
    let layout = Layout {
        op: Collective::AllToAll4d,
        shape: &shape,
        arg,
    };
    strided(c.comm, &input, send, &mut out, recv, layout).map_err(|e| c.err(&what, e))?;
    let expected = |i: usize| {
        let (src, at) = ulysses_source(forward, shape, p, rank, i);
        Checks::unique(dtype, salt, src, at)
    };
    c.expect(&what, &out, expected, |_| 0.0)?;
    c.passed()
}

fn strided(
    comm: &Communicator,
    input: &crate::bufs::TestBuf,
    send: BlockLayout,
    output: &mut crate::bufs::TestBuf,
    recv: BlockLayout,
    layout: Layout<'_>,
) -> comm_core::Result<()> {
    comm.all_to_all_strided(input, send, output, recv, Some(layout))
}
