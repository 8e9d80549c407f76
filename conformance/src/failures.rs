//! Failures that name the right rank, as data: one member (the last, `k`)
//! stays out of a collective, aborts, or drops its communicator, and every
//! other member must get a fatal error within its deadline whose
//! [`CommError::culprits`] include `k`, with its group and global rank (the
//! groups of this section map group rank `r` to global rank
//! `GLOBAL_OFFSET + r`). Survivors must blame `k`, not a messenger: a peer
//! that gives up because `k` is missing passes `k` on in its abort.

use std::time::{Duration, Instant};

use comm_core::{CommError, DType, P2pOp, RankId, ReduceOp};

use crate::bufs::TestBuf;
use crate::member::Member;
use crate::suite::Failure;

/// Deadline of the survivors' operations once set-up is done.
const FAIL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long after that deadline a survivor may take to return (the front's
/// diagnosis, aborting the backend, a loaded machine).
const FAIL_SLACK: Duration = Duration::from_secs(30);
/// Global rank of group rank 0 in this section's groups.
pub const GLOBAL_OFFSET: usize = 100;

/// What member `k` does while the others all_reduce.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Never calls it.
    Absent,
    /// Calls `Communicator::abort`.
    Aborts,
    /// Drops its communicator.
    Drops,
}

pub(crate) fn run(m: &mut Member<'_>, log: &mut dyn FnMut(&str)) -> Result<usize, Failure> {
    if m.world < 2 {
        m.skipped
            .push("failures naming ranks: a group of one member has no peer to lose".into());
        return Ok(0);
    }
    let mut checks = 0;
    for fault in [Fault::Absent, Fault::Aborts, Fault::Drops] {
        let start = Instant::now();
        checks += case(m, fault)?;
        log(&format!(
            "failures: last rank {fault:?}: every other rank blamed it in {:.2} s",
            start.elapsed().as_secs_f64()
        ));
    }
    let start = Instant::now();
    let n = finished_peer_leaves(m)?;
    if n > 0 {
        log(&format!(
            "failures: a peer that finished its messages left; the others finished theirs in {:.2} s",
            start.elapsed().as_secs_f64()
        ));
    }
    Ok(checks + n)
}

/// Elements of the message rank 0 sends rank 1 while the last rank leaves:
/// 8 MiB of i32, more than a backend buffers (socket buffers, shm slots),
/// so rank 0 is still blocked on rank 1 when the last rank is gone.
const LEAVE_BIG: usize = 2 << 20;

/// Not a failure: the last rank sends its one message to rank 0 and drops
/// its communicator (a program that finished and exits), while rank 0 is
/// still in the same batch, sending a large message to rank 1, which starts
/// receiving only once the last rank has left. Rank 0 must finish with
/// exact data: a peer that completed its part of a batch and left is no
/// error (a backend that watches every member while it waits fails here,
/// blaming the rank that left).
fn finished_peer_leaves(m: &mut Member<'_>) -> Result<usize, Failure> {
    let (rank, world) = (m.rank, m.world);
    if world < 3 {
        m.skipped.push(
            "failures: a peer that finished its messages leaves: needs 3 members (one leaves, \
             two still exchange)"
                .into(),
        );
        return Ok(0);
    }
    let k = world - 1;
    let what =
        format!("send/recv while group rank {k} finishes its part and leaves, world {world}");
    let mut comm = Some(m.communicator("leave", None)?);
    let c = comm.as_ref().ok_or("no communicator")?;
    m.settle(c, "leave", &what)?;
    let err = |e| crate::bufs::comm_error(rank, &what, e);
    let small = |i: usize| (i * 7 + k) as f64;
    let big = |i: usize| ((i * 13) % 100_003) as f64;
    let gone = "kit/leave/gone";
    if rank == k {
        let msg = TestBuf::new(m.holder(), DType::I32, 16, small).map_err(|e| e.to_string())?;
        c.send(&msg, 0).map_err(err)?;
        comm = None;
        m.store
            .set(gone, b"1")
            .map_err(|e| format!("rank {rank}: {what}: {e}"))?;
    } else if rank == 0 {
        let out =
            TestBuf::new(m.holder(), DType::I32, LEAVE_BIG, big).map_err(|e| e.to_string())?;
        let mut got =
            TestBuf::new(m.holder(), DType::I32, 16, |_| 0.0).map_err(|e| e.to_string())?;
        c.batch_send_recv(vec![
            P2pOp::send(&out, 1).map_err(err)?,
            P2pOp::recv(&mut got, k).map_err(err)?,
        ])
        .map_err(err)?;
        got.check(small, |_| 0.0)
            .map_err(|e| format!("rank {rank}: {what}: {e}"))?;
    } else if rank == 1 {
        m.store
            .wait(&[gone], m.timeout)
            .map_err(|e| format!("rank {rank}: {what}: waiting for rank {k} to leave: {e}"))?;
        // Not synchronisation (the exchange is correct whatever the
        // timing): holding back a little longer lets rank 0's wait look
        // at its peers' liveness while rank k is gone.
        std::thread::sleep(Duration::from_millis(200));
        let mut got =
            TestBuf::new(m.holder(), DType::I32, LEAVE_BIG, |_| 0.0).map_err(|e| e.to_string())?;
        c.recv(&mut got, 0).map_err(err)?;
        got.check(big, |_| 0.0)
            .map_err(|e| format!("rank {rank}: {what}: {e}"))?;
    }
    // The others keep their communicators until everyone is done: an
    // early drop would be a departure of the kind this case allows only
    // for rank k.
    m.meet("leave-done")?;
    drop(comm);
    Ok(1)
}

fn case(m: &Member<'_>, fault: Fault) -> Result<usize, Failure> {
    let (rank, world) = (m.rank, m.world);
    let k = world - 1;
    let tag = format!("fail-{fault:?}").to_lowercase();
    let global: Vec<usize> = (0..world).map(|r| GLOBAL_OFFSET + r).collect();
    let comm = m.communicator(&tag, Some(global))?;
    let what = format!("all_reduce while the last rank (group rank {k}) {fault:?}, world {world}");
    m.settle(&comm, &tag, &what)?;
    let done = format!("{tag}-done");
    if rank == k {
        match fault {
            Fault::Absent => {
                // Stay connected until every survivor has seen its error.
                m.meet(&done)?;
                drop(comm);
            }
            Fault::Aborts => {
                comm.abort("conformance kit: deliberate abort")
                    .map_err(|e| format!("rank {rank}: {what}: abort() failed: {e}"))?;
                m.meet(&done)?;
                drop(comm);
            }
            Fault::Drops => {
                drop(comm);
                m.meet(&done)?;
            }
        }
        return Ok(0);
    }
    comm.set_timeout(FAIL_TIMEOUT);
    let mut buf =
        TestBuf::new(m.holder(), DType::I32, 1024, |i| i as f64).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let r = comm.all_reduce(&mut buf, ReduceOp::Sum);
    let took = start.elapsed();
    let e = match r {
        Ok(()) => {
            return Err(format!(
                "rank {rank}: {what}: the all_reduce SUCCEEDED without group rank {k}"
            ))
        }
        Err(e) => e,
    };
    if !e.is_fatal() {
        return Err(format!(
            "rank {rank}: {what}: expected a fatal error (Timeout, PeerLost, PeerAborted), got: {e}"
        ));
    }
    let want = RankId::local(k).with_global(GLOBAL_OFFSET + k);
    let culprits = e.culprits();
    if !culprits.contains(&want) {
        let hint = if matches!(e, CommError::PeerAborted { .. }) {
            " (a peer that aborts because a rank is missing must pass the missing rank on as \
             its culprits)"
        } else {
            ""
        };
        return Err(format!(
            "rank {rank}: {what}: the error blames {culprits:?}, not {want}{hint}: {e}"
        ));
    }
    if took > FAIL_TIMEOUT + FAIL_SLACK {
        return Err(format!(
            "rank {rank}: {what}: the error took {took:?} with a deadline of {FAIL_TIMEOUT:?}: {e}"
        ));
    }
    // Survivors keep their communicators until all have seen their error:
    // an early drop would be a departure another survivor might report.
    m.meet(&done)?;
    drop(comm);
    Ok(1)
}
