//! A frozen rank (SIGSTOP) is named by every survivor: the member that times
//! out waiting follows the others' "still waiting for ..." notices to the
//! rank really stuck, and its abort carries that culprit, so no survivor
//! blames a peer that was merely queued behind the frozen one. Real
//! processes; the stopped one is continued and killed afterwards.

mod common;

use std::time::{Duration, Instant};

use comm_core::ReduceOp;

/// Per-operation deadline inside the ranks.
const OP_TIMEOUT: Duration = Duration::from_secs(5);

/// The rank processes: loop collectives until one fails, then write what
/// they blamed to `error.<rank>` and exit 1.
#[test]
#[ignore = "entry point of the rank processes of the tests below"]
fn rank_process() {
    let Some((rank, world, dir)) = common::child_env() else {
        return;
    };
    let store = common::file_store(&dir);
    let c = common::member(store, rank, world, "tcp", common::opts(), OP_TIMEOUT).expect("set-up");
    let until = Instant::now() + Duration::from_secs(150);
    let mut i = 0usize;
    let err = loop {
        let n = if i.is_multiple_of(2) { 16 } else { 300_000 };
        let mut v = vec![1.0f32; n];
        if let Err(e) = c.all_reduce(&mut v, ReduceOp::Sum) {
            break e;
        }
        let mut out = vec![0.0f32; n * world];
        if let Err(e) = c.all_gather(&v[..], &mut out[..]) {
            break e;
        }
        if i == 3 {
            std::fs::write(dir.join(format!("started.{rank}")), b"").unwrap();
        }
        i += 1;
        assert!(Instant::now() < until, "rank {rank}: nothing failed");
    };
    let blamed: Vec<String> = common::blamed(&err).iter().map(|r| r.to_string()).collect();
    std::fs::write(
        dir.join(format!("error.{rank}")),
        format!("{}\n{err}\n", blamed.join(",")),
    )
    .unwrap();
    std::process::exit(1);
}

fn frozen(world: usize, stop: usize) {
    let mut p = common::Procs::start("rank_process", world, &[], |_| Vec::new());
    p.wait_for(
        "every rank running collectives",
        Duration::from_secs(120),
        || (0..world).all(|r| p.path(&format!("started.{r}")).exists()),
    );
    // SAFETY: kill(2) on a child process we started and have not reaped.
    let rc = unsafe { libc::kill(p.children[stop].id() as i32, libc::SIGSTOP) };
    assert_eq!(rc, 0, "SIGSTOP failed");
    let survivors: Vec<usize> = (0..world).filter(|&r| r != stop).collect();
    let codes = p.wait_exit(&survivors, OP_TIMEOUT * 2 + Duration::from_secs(30));
    let mut report = Vec::new();
    for (&r, code) in survivors.iter().zip(codes) {
        let text = std::fs::read_to_string(p.path(&format!("error.{r}")))
            .unwrap_or_else(|_| panic!("rank {r} wrote no error; logs:\n{}", p.logs()));
        let (blamed, err) = text.split_once('\n').unwrap();
        assert_eq!(code, Some(1), "rank {r}: {err}");
        assert_eq!(
            blamed,
            stop.to_string(),
            "rank {r} blamed {blamed} instead of the frozen rank {stop}: {err}"
        );
        report.push(format!("  rank {r}: {}", err.trim()));
    }
    eprintln!(
        "world {world}, rank {stop} stopped; every survivor named it:\n{}",
        report.join("\n")
    );
    // Procs' drop kills the stopped rank (SIGKILL, then SIGCONT) and reaps it.
}

#[test]
fn frozen_last_rank_is_named_by_every_survivor() {
    frozen(3, 2);
}

#[test]
fn frozen_middle_rank_is_named_by_every_survivor() {
    frozen(4, 1);
}
