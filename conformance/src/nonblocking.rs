//! Non-blocking operations ([`Communicator::scope`]): many handles in
//! flight, waits out of order, polling with `test`, handles dropped
//! unwaited, point-to-point handles, and blocking calls after a scope. Every
//! result is checked exactly once the handle (or the scope) is done.

use std::time::Instant;

use comm_core::{CommError, DType, P2pOp, ReduceOp, Result};

use crate::bufs::TestBuf;
use crate::data::{reduced, tolerance, value, Pattern};
use crate::suite::{medium, Checks, Failure};

/// Operations of the "many in flight" check.
const IN_FLIGHT: usize = 12;

pub(crate) fn run(c: &mut Checks<'_>) -> Result<(), Failure> {
    c.section("non-blocking", |c| {
        let w = c.world;
        for dtype in [DType::F32, DType::I32, DType::BF16] {
            for n in [1, 1000 * w + 3, medium(dtype)] {
                mixed(c, dtype, n)?;
            }
        }
        many(c, DType::I64, 999)?;
        dropped(c, DType::F32, 1000 * w + 3)?;
        for n in [0, 5, medium(DType::U8)] {
            p2p(c, DType::U8, n)?;
        }
        Ok(())
    })
}

fn reduce_vals(dtype: DType, op: ReduceOp, salt: u64, rank: usize) -> impl Fn(usize) -> f64 {
    move |i| value(dtype, Pattern::Reduce(op), salt, rank, i)
}

/// One of each operation in flight at once, waited in reverse order, one of
/// them polled with `test` first.
fn mixed(c: &mut Checks<'_>, dtype: DType, n: usize) -> Result<(), Failure> {
    let (rank, w) = (c.rank, c.world);
    let salts: Vec<u64> = (0..5).map(|_| c.next_salt()).collect();
    let what = format!("non-blocking mix {dtype} n={n} world={w}");
    let (next, prev) = ((rank + 1) % w, (rank + w - 1) % w);
    let root = n % w;
    let op = ReduceOp::Sum;

    let mut reduced_buf = c.buf(dtype, n, reduce_vals(dtype, op, salts[0], rank))?;
    let gather_in = c.buf(dtype, n, |i| Checks::unique(dtype, salts[1], rank, i))?;
    let mut gather_out = c.out(dtype, w * n)?;
    let a2a_in = c.buf(dtype, w * n, |i| Checks::unique(dtype, salts[2], rank, i))?;
    let mut a2a_out = c.out(dtype, w * n)?;
    let mut bcast = c.buf(dtype, n, |i| Checks::unique(dtype, salts[3], rank, i))?;
    let ring_out = c.buf(dtype, n, |i| Checks::unique(dtype, salts[4], rank, i))?;
    let mut ring_in = c.out(dtype, n)?;
    let deadline = Instant::now() + c.comm.timeout();

    let r: Result<()> = c.comm.scope(|s| {
        let ar = s.iall_reduce(&mut reduced_buf, op)?;
        let ag = s.iall_gather(&gather_in, &mut gather_out)?;
        let a2a = s.iall_to_all(&a2a_in, &mut a2a_out)?;
        let bc = s.ibroadcast(&mut bcast, root)?;
        let ring = if w > 1 {
            Some(s.batch_isend_irecv(vec![
                P2pOp::send(&ring_out, next)?,
                P2pOp::recv(&mut ring_in, prev)?,
            ])?)
        } else {
            None
        };
        if let Some(ring) = ring {
            ring.wait()?;
        }
        bc.wait()?;
        let mut a2a = a2a;
        // Poll until done; every operation is bounded by the deadline.
        while !a2a.test()? {
            if Instant::now() > deadline {
                return Err(CommError::timeout(
                    "polling a non-blocking all_to_all with test()",
                    c.comm.timeout(),
                    ["its completion"],
                ));
            }
            std::thread::yield_now();
        }
        a2a.wait()?;
        ag.wait()?;
        ar.wait()
    });
    r.map_err(|e| c.err(&what, e))?;

    c.expect(
        &format!("{what}: iall_reduce"),
        &reduced_buf,
        |i| reduced(dtype, op, salts[0], w, i),
        |e| tolerance(dtype, op, e),
    )?;
    c.expect(
        &format!("{what}: iall_gather"),
        &gather_out,
        |i| Checks::unique(dtype, salts[1], i / n, i % n),
        |_| 0.0,
    )?;
    c.expect(
        &format!("{what}: iall_to_all"),
        &a2a_out,
        |i| Checks::unique(dtype, salts[2], i / n, rank * n + i % n),
        |_| 0.0,
    )?;
    c.expect(
        &format!("{what}: ibroadcast from {root}"),
        &bcast,
        |i| Checks::unique(dtype, salts[3], root, i),
        |_| 0.0,
    )?;
    if w > 1 {
        c.expect(
            &format!("{what}: batch_isend_irecv ring"),
            &ring_in,
            |i| Checks::unique(dtype, salts[4], prev, i),
            |_| 0.0,
        )?;
    }
    c.passed()
}

/// [`IN_FLIGHT`] all-reduces started before any is waited, waited in a
/// scrambled order, each with its own reduce op.
fn many(c: &mut Checks<'_>, dtype: DType, n: usize) -> Result<(), Failure> {
    let (rank, w) = (c.rank, c.world);
    let what = format!("{IN_FLIGHT} non-blocking all_reduces {dtype} n={n} world={w}");
    let mut cases = Vec::with_capacity(IN_FLIGHT);
    for k in 0..IN_FLIGHT {
        let op = ReduceOp::ALL[k % ReduceOp::ALL.len()];
        let salt = c.next_salt();
        cases.push((
            op,
            salt,
            c.buf(dtype, n, reduce_vals(dtype, op, salt, rank))?,
        ));
    }
    let r: Result<()> = c.comm.scope(|s| {
        let mut works = Vec::with_capacity(IN_FLIGHT);
        for (op, _, b) in cases.iter_mut() {
            works.push(Some(s.iall_reduce(b, *op)?));
        }
        // 7 is coprime with 12: every handle once, far from start order.
        for k in 0..IN_FLIGHT {
            if let Some(wk) = works[(k * 7 + 5) % IN_FLIGHT].take() {
                wk.wait()?;
            }
        }
        Ok(())
    });
    r.map_err(|e| c.err(&what, e))?;
    for (k, (op, salt, b)) in cases.iter().enumerate() {
        let (op, salt) = (*op, *salt);
        c.expect(
            &format!("{what}: #{k} ({op})"),
            b,
            |i| reduced(dtype, op, salt, w, i),
            |e| tolerance(dtype, op, e),
        )?;
    }
    c.passed()
}

/// Handles dropped without `wait`: the scope still finishes their
/// operations, and a blocking call after the scope sees the group in step.
fn dropped(c: &mut Checks<'_>, dtype: DType, n: usize) -> Result<(), Failure> {
    let (rank, w) = (c.rank, c.world);
    let (s1, s2) = (c.next_salt(), c.next_salt());
    let what = format!("dropped non-blocking handles {dtype} n={n} world={w}");
    let op = ReduceOp::Max;
    let mut a = c.buf(dtype, n, reduce_vals(dtype, op, s1, rank))?;
    let g_in = c.buf(dtype, n, |i| Checks::unique(dtype, s2, rank, i))?;
    let mut g_out = c.out(dtype, w * n)?;
    let r: Result<()> = c.comm.scope(|s| {
        drop(s.iall_reduce(&mut a, op)?);
        let _unwaited = s.iall_gather(&g_in, &mut g_out)?;
        Ok(())
    });
    r.map_err(|e| c.err(&what, e))?;
    c.expect(
        &format!("{what}: iall_reduce"),
        &a,
        |i| reduced(dtype, op, s1, w, i),
        |_| 0.0,
    )?;
    c.expect(
        &format!("{what}: iall_gather"),
        &g_out,
        |i| Checks::unique(dtype, s2, i / n, i % n),
        |_| 0.0,
    )?;
    c.passed()?;
    // The next blocking call follows the scope's operations.
    c.all_reduce(DType::I32, ReduceOp::Sum, 33)
}

/// `isend` / `irecv` around the ring (even ranks send first: operations
/// of one scope run in the order they were started), waited receive first.
fn p2p(c: &mut Checks<'_>, dtype: DType, n: usize) -> Result<(), Failure> {
    let (salt, rank, w) = (c.next_salt(), c.rank, c.world);
    if w == 1 {
        return Ok(());
    }
    let what = format!("isend/irecv ring {dtype} n={n} world={w}");
    let (next, prev) = ((rank + 1) % w, (rank + w - 1) % w);
    let out = c.buf(dtype, n, |i| Checks::unique(dtype, salt, rank, i))?;
    let mut inp: TestBuf = c.out(dtype, n)?;
    let r: Result<()> = c.comm.scope(|s| {
        let (send, recv) = if rank % 2 == 0 {
            let send = s.isend(&out, next)?;
            (send, s.irecv(&mut inp, prev)?)
        } else {
            let recv = s.irecv(&mut inp, prev)?;
            (s.isend(&out, next)?, recv)
        };
        recv.wait()?;
        send.wait()
    });
    r.map_err(|e| c.err(&what, e))?;
    c.expect(
        &what,
        &inp,
        |i| Checks::unique(dtype, salt, prev, i),
        |_| 0.0,
    )?;
    c.passed()
}
