//! Call mismatches: members that call different collectives, dtypes,
//! element counts, roots, reduce ops or 4-D shapes at the same point of the
//! group's call sequence must all get an error (none may succeed with
//! garbage or hang), and at least one must get [`CommError::CallMismatch`]
//! naming the peer as data and what each called. The others may instead
//! learn it from the member that noticed ([`CommError::PeerAborted`] /
//! [`CommError::PeerLost`]). A receive that does not match its send gets
//! `CallMismatch` on the receiver.
//!
//! Needs a backend with [`Capabilities::checks_calls`](comm_core::Capabilities);
//! for others the section is skipped with a message.

use std::time::Duration;

use comm_core::{Collective, CommError, Communicator, DType, Layout, ReduceOp};

use crate::bufs::{Holder, TestBuf};
use crate::member::Member;
use crate::suite::Failure;

/// Deadline of the mismatched calls: a backend that does not notice shows
/// up as a timeout well before the job's deadline.
const MISMATCH_TIMEOUT: Duration = Duration::from_secs(20);

/// One mismatched call: what this member does, with buffers held as `h`
/// says (device tensors in device mode).
type Call = fn(&Communicator, rank: usize, world: usize, h: Holder) -> comm_core::Result<()>;

fn buf(h: Holder, dtype: DType, n: usize) -> comm_core::Result<TestBuf> {
    TestBuf::new(h, dtype, n, |i| (i % 7) as f64)
}

/// The member that calls something different in the "one differs" cases.
fn odd(rank: usize, world: usize) -> bool {
    rank == world - 1
}

const CASES: [(&str, Call); 6] = [
    ("dtype (f32 vs i32, same bytes)", |c, r, w, h| {
        let dtype = if odd(r, w) { DType::I32 } else { DType::F32 };
        c.all_reduce(&mut buf(h, dtype, 64)?, ReduceOp::Sum)
    }),
    ("element count", |c, r, w, h| {
        let n = if odd(r, w) { 65 } else { 64 };
        c.all_reduce(&mut buf(h, DType::F32, n)?, ReduceOp::Sum)
    }),
    ("reduce op (sum vs max)", |c, r, w, h| {
        let op = if odd(r, w) {
            ReduceOp::Max
        } else {
            ReduceOp::Sum
        };
        c.all_reduce(&mut buf(h, DType::F32, 64)?, op)
    }),
    ("root (every member names itself)", |c, r, _, h| {
        c.broadcast(&mut buf(h, DType::F32, 64)?, r)
    }),
    ("collective (all_reduce vs all_to_all)", |c, r, w, h| {
        let input = buf(h, DType::F32, 16 * w)?;
        let mut out = buf(h, DType::F32, 16 * w)?;
        if odd(r, w) {
            c.all_to_all(&input, &mut out)
        } else {
            let mut b = input;
            c.all_reduce(&mut b, ReduceOp::Sum)
        }
    }),
    ("all_to_all_4d shape (same bytes)", |c, r, w, h| {
        let shape = if odd(r, w) {
            [1, 4 * w, 2, 4]
        } else {
            [1, 2 * w, 4, 4]
        };
        let input = buf(h, DType::F32, 32 * w)?;
        let mut out = buf(h, DType::F32, 32 * w)?;
        let layout = Layout {
            op: Collective::AllToAll4d,
            shape: &shape,
            arg: 2 * 16 + 1,
        };
        c.all_to_all_with(&input, &mut out, Some(layout))
    }),
];

/// The variant name, for the cross-rank summary.
fn kind(e: &CommError) -> &'static str {
    match e {
        CommError::CallMismatch { .. } => "CallMismatch",
        CommError::PeerAborted { .. } => "PeerAborted",
        CommError::PeerLost { .. } => "PeerLost",
        CommError::Timeout { .. } => "Timeout",
        _ => "other",
    }
}

pub(crate) fn run(m: &mut Member<'_>, log: &mut dyn FnMut(&str)) -> Result<usize, Failure> {
    let (rank, world) = (m.rank, m.world);
    if world < 2 {
        m.skipped
            .push("call mismatches: a group of one member cannot disagree".into());
        return Ok(0);
    }
    let mut checks = 0;
    for (k, (name, call)) in CASES.iter().enumerate() {
        let tag = format!("mismatch-{k}");
        let comm = m.communicator(&tag, None)?;
        if k == 0 && !comm.capabilities().checks_calls {
            m.skipped.push(format!(
                "call mismatches: backend `{}` does not carry call descriptions \
                 (Capabilities::checks_calls is false)",
                comm.backend()
            ));
            drop(comm);
            m.meet("mismatch-skip")?;
            return Ok(0);
        }
        let what = format!("mismatched call: {name}, world {world}");
        m.settle(&comm, &tag, &what)?;
        comm.set_timeout(MISMATCH_TIMEOUT);
        let outcome = call(&comm, rank, world, m.holder());
        let mine = match &outcome {
            Ok(()) => "succeeded".to_string(),
            Err(e) => kind(e).to_string(),
        };
        // Every member keeps its communicator until all are out of the
        // call: an early drop would be a departure, not the mismatch.
        let all = m.share(&tag, &mine)?;
        drop(comm);
        match outcome {
            Ok(()) => {
                return Err(format!(
                    "rank {rank}: {what}: the call SUCCEEDED on this rank (every rank: {all:?}); \
                     a mismatch must be an error on every member"
                ))
            }
            Err(e @ CommError::CallMismatch { .. }) => check_mismatch(rank, world, &what, &e)?,
            Err(e @ (CommError::PeerAborted { .. } | CommError::PeerLost { .. })) => {
                if e.culprits().iter().any(|r| r.group >= world) {
                    return Err(format!("rank {rank}: {what}: culprits out of range: {e}"));
                }
            }
            Err(e) => {
                return Err(format!(
                    "rank {rank}: {what}: expected CallMismatch (or PeerAborted from the member \
                     that noticed), got: {e} (every rank: {all:?})"
                ))
            }
        }
        if !all.iter().any(|k| k == "CallMismatch") {
            return Err(format!(
                "rank {rank}: {what}: no member reported CallMismatch (every rank: {all:?})"
            ));
        }
        checks += 1;
        m.meet(&format!("{tag}-done"))?;
    }
    checks += p2p(m)?;
    log(&format!(
        "call mismatches: {checks} cases, each an error on every member"
    ));
    Ok(checks)
}

fn check_mismatch(rank: usize, world: usize, what: &str, e: &CommError) -> Result<(), Failure> {
    let CommError::CallMismatch {
        peer, mine, theirs, ..
    } = e
    else {
        return Ok(());
    };
    if peer.group >= world || peer.group == rank {
        return Err(format!(
            "rank {rank}: {what}: CallMismatch names peer {peer}, not another member: {e}"
        ));
    }
    if mine == theirs {
        return Err(format!(
            "rank {rank}: {what}: CallMismatch shows two equal calls: {e}"
        ));
    }
    if e.culprits().first().map(|r| r.group) != Some(peer.group) {
        return Err(format!(
            "rank {rank}: {what}: culprits() {:?} do not name the peer {peer}",
            e.culprits()
        ));
    }
    Ok(())
}

/// Rank 0 sends 64 f32; rank 1 receives 64 i32 from it.
fn p2p(m: &mut Member<'_>) -> Result<usize, Failure> {
    let (rank, world) = (m.rank, m.world);
    let comm = m.communicator("mismatch-p2p", None)?;
    let what = format!("send f32 x 64 received as i32 x 64, world {world}");
    m.settle(&comm, "mismatch-p2p", &what)?;
    comm.set_timeout(MISMATCH_TIMEOUT);
    let r = match rank {
        0 => comm.send(
            &buf(m.holder(), DType::F32, 64).map_err(|e| e.to_string())?,
            1,
        ),
        1 => comm.recv(
            &mut buf(m.holder(), DType::I32, 64).map_err(|e| e.to_string())?,
            0,
        ),
        _ => Ok(()),
    };
    let checked = if rank == 1 {
        match r {
            Err(e @ CommError::CallMismatch { .. }) => {
                check_mismatch(rank, world, &what, &e)?;
                1
            }
            Ok(()) => {
                return Err(format!(
                    "rank 1: {what}: the receive SUCCEEDED; it must be a CallMismatch"
                ))
            }
            Err(e) => return Err(format!("rank 1: {what}: expected CallMismatch, got: {e}")),
        }
    } else {
        // The sender may or may not hear about it: both are fine.
        0
    };
    // Members not in the exchange keep their communicators until it is
    // over: their departure is not what this case tests.
    m.meet("mismatch-p2p-done")?;
    drop(comm);
    Ok(checked)
}
