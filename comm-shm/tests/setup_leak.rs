//! Nothing is left in /dev/shm when a job stops while its members set up
//! (issue 15.1), with real processes: the creator (rank 0) waits for
//! members that will never come and is stopped the way a launcher stops it
//! (SIGTERM after another rank failed, SIGINT from Ctrl-C forwarded to the
//! ranks), or killed with SIGKILL. Every test checks /dev/shm, the
//! descriptors of every process and the process table afterwards.
//!
//! Segments are anonymous (memfd) by default, and nothing can be left
//! whatever stops the creator, SIGKILL included. The signal tests run the
//! ranks with `DIST_SHM_BACKING=named`, the fallback whose names the
//! signal handler has to unlink.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use comm_core::{CommError, Store};
use comm_shm::{list_segments, BACKING_ENV};
use common::*;

/// The environment of a rank on named segments.
const NAMED: (&str, &str) = (BACKING_ENV, "named");
/// The environment of a rank on memfd segments (the default, said
/// explicitly: CI also runs this suite with `DIST_SHM_BACKING=named`).
const MEMFD: (&str, &str) = (BACKING_ENV, "memfd");

/// What a child does: joins a group of `world` (and is expected to be
/// stopped while it waits), or exits at once without joining.
fn child() {
    let Some((rank, world, store, job)) = child_of() else {
        return;
    };
    match std::env::var("LEAK_ROLE").as_deref() {
        Ok("exit") => std::process::exit(3),
        Ok("late") => {
            // Never joins: waits for a key nobody sets until it is killed.
            let _ = store.wait(&["never"], SETUP);
            std::process::exit(4);
        }
        Ok("own-handler") => install_exit_handler(),
        _ => {}
    }
    store.set(&format!("joining/{rank}"), b"1").unwrap();
    let r = join(store.clone(), rank, world, &opts(&job));
    eprintln!("rank {rank}: set-up returned {:?}", r.as_ref().err());
    if let Err(e) = r {
        let _ = store.set(&format!("error/{rank}"), e.to_string().as_bytes());
    }
    std::process::exit(5);
}

/// An application's own SIGTERM handler: exits with 77.
fn install_exit_handler() {
    extern "C" fn on_term(_: libc::c_int) {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(77) };
    }
    // SAFETY: installing a handler that only calls _exit.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_term as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaction(libc::SIGTERM, &act, std::ptr::null_mut());
    }
}

/// Waits until the job's segment exists (the creator is in set-up): its
/// name in /dev/shm, or a memfd of the job held by one of `kids`.
fn wait_for_segment(job: &str, kids: &mut [Child]) {
    let t0 = Instant::now();
    while list_segments(job).is_empty() && kids.iter().all(|k| memfds_held(k.id(), job).is_empty())
    {
        for k in kids.iter_mut() {
            assert!(
                k.try_wait().unwrap().is_none(),
                "a rank exited before set-up began"
            );
        }
        assert!(t0.elapsed() < SETUP, "the segment never appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn signal(k: &Child, sig: i32) {
    // SAFETY: sending a signal to our own child.
    assert_eq!(unsafe { libc::kill(k.id() as libc::pid_t, sig) }, 0);
}

/// Waits for a child and returns how it ended: (exit code, signal).
fn ended(k: &mut Child) -> (Option<i32>, Option<i32>) {
    let t0 = Instant::now();
    loop {
        if let Some(s) = k.try_wait().unwrap() {
            return (s.code(), s.signal());
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = k.kill();
            let _ = k.wait();
            panic!("child {} did not end within 60 s of its signal", k.id());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Rank 0 alone in a group of 2, with the environment `env`, stopped by
/// `sig` while it waits.
fn creator_stopped_by(test: &str, sig: i32, env: &[(&str, &str)]) {
    child();
    let dir = tempfile::tempdir().unwrap();
    let (path, store) = file_store(dir.path());
    let job = job("leak");
    let mut kids = vec![spawn_with(test, 0, 2, &path, &job, env)];
    wait_for_segment(&job, &mut kids);
    signal(&kids[0], sig);
    assert_eq!(
        ended(&mut kids[0]),
        (None, Some(sig)),
        "dies of the signal as before"
    );
    assert_reaped(&kids);
    assert_no_segments(&job);
    assert_late_member_names_rank_0(store, &job);
}

/// A member that joins after the creator died finds the locator in the
/// store but not the segment: at once, not at its deadline, an error naming
/// rank 0 as the member that ended.
fn assert_late_member_names_rank_0(store: Arc<dyn Store>, job: &str) {
    let late = join(store, 1, 2, &opts(job)).err().unwrap();
    assert!(
        matches!(&late, CommError::PeerLost { peer, .. } if peer.group == 0),
        "{late}"
    );
    assert!(
        late.to_string()
            .contains("ended before every member attached"),
        "{late}"
    );
    assert_no_segments(job);
}

#[test]
fn creator_killed_by_sigterm_in_set_up_leaves_nothing() {
    creator_stopped_by(
        "creator_killed_by_sigterm_in_set_up_leaves_nothing",
        libc::SIGTERM,
        &[NAMED],
    );
}

#[test]
fn creator_interrupted_by_sigint_in_set_up_leaves_nothing() {
    creator_stopped_by(
        "creator_interrupted_by_sigint_in_set_up_leaves_nothing",
        libc::SIGINT,
        &[NAMED],
    );
}

/// The default (memfd) segment: SIGKILL, which no handler sees, during
/// set-up. Under no launcher at all, nothing is left: the segment never had
/// a name, and the kernel freed it with the creator's descriptor.
#[test]
fn creator_killed_by_sigkill_in_set_up_leaves_nothing() {
    let test = "creator_killed_by_sigkill_in_set_up_leaves_nothing";
    child();
    let dir = tempfile::tempdir().unwrap();
    let (path, store) = file_store(dir.path());
    let job = job("leakkill");
    let mut kids = vec![spawn_with(test, 0, 2, &path, &job, &[MEMFD])];
    wait_for_segment(&job, &mut kids);
    assert!(
        list_segments(&job).is_empty(),
        "a memfd segment has no name in /dev/shm"
    );
    assert_eq!(memfds_held(kids[0].id(), &job).len(), 1);
    kids[0].kill().unwrap();
    assert_eq!(ended(&mut kids[0]), (None, Some(libc::SIGKILL)));
    assert_reaped(&kids);
    assert_no_segments(&job);
    assert_late_member_names_rank_0(store, &job);
}

/// An unknown backing is refused by every member at once, the attaching
/// ones included (they would otherwise wait for a creator that refused).
#[test]
fn an_unknown_backing_is_an_error_on_every_member() {
    let test = "an_unknown_backing_is_an_error_on_every_member";
    child();
    let dir = tempfile::tempdir().unwrap();
    let (path, store) = file_store(dir.path());
    let job = job("leakbad");
    let mut kids: Vec<Child> = (0..2)
        .map(|r| spawn_with(test, r, 2, &path, &job, &[(BACKING_ENV, "shmem")]))
        .collect();
    for (r, k) in kids.iter_mut().enumerate() {
        assert_eq!(ended(k), (Some(5), None), "rank {r}");
        let e = store.get(&format!("error/{r}"), SETUP).unwrap();
        let e = String::from_utf8_lossy(&e);
        assert!(
            e.contains(r#"DIST_SHM_BACKING="shmem": expected `memfd` or `named`"#),
            "rank {r}: {e}"
        );
    }
    assert_reaped(&kids);
    assert_no_segments(&job);
}

/// A member exits before joining; the launcher then stops the creator.
#[test]
fn member_exiting_before_joining_leaves_nothing() {
    let test = "member_exiting_before_joining_leaves_nothing";
    child();
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = file_store(dir.path());
    let job = job("leakexit");
    let mut quitter = spawn_with(test, 1, 2, &path, &job, &[("LEAK_ROLE", "exit"), NAMED]);
    assert_eq!(ended(&mut quitter), (Some(3), None));
    let mut kids = vec![spawn_with(test, 0, 2, &path, &job, &[NAMED])];
    wait_for_segment(&job, &mut kids);
    signal(&kids[0], libc::SIGTERM);
    assert_eq!(ended(&mut kids[0]), (None, Some(libc::SIGTERM)));
    kids.push(quitter);
    assert_reaped(&kids);
    assert_no_segments(&job);
}

/// Ranks 0 and 1 set up (1 attached), rank 2 starts late and is killed
/// before joining; then Ctrl-C reaches the others (SIGINT to every rank,
/// as a terminal's process group gets it).
#[test]
fn late_member_killed_then_ctrl_c_leaves_nothing() {
    let test = "late_member_killed_then_ctrl_c_leaves_nothing";
    child();
    let dir = tempfile::tempdir().unwrap();
    let (path, store) = file_store(dir.path());
    let job = job("leaklate");
    let mut kids = vec![
        spawn_with(test, 0, 3, &path, &job, &[NAMED]),
        spawn_with(test, 1, 3, &path, &job, &[NAMED]),
        spawn_with(test, 2, 3, &path, &job, &[("LEAK_ROLE", "late"), NAMED]),
    ];
    wait_for_segment(&job, &mut kids);
    store.wait(&["joining/1"], SETUP).unwrap();
    kids[2].kill().unwrap();
    assert_eq!(ended(&mut kids[2]), (None, Some(libc::SIGKILL)));
    signal(&kids[0], libc::SIGINT);
    signal(&kids[1], libc::SIGINT);
    for k in &mut kids[..2] {
        let (code, sig) = ended(k);
        // Rank 1 may see the segment vanish first and fail its set-up (5)
        // before the signal arrives; either way it ends.
        assert!(
            sig == Some(libc::SIGINT) || code == Some(5),
            "{code:?} {sig:?}"
        );
    }
    assert_reaped(&kids);
    assert_no_segments(&job);
}

/// An application's own SIGTERM handler still runs (after the clean-up).
#[test]
fn application_handler_runs_after_the_clean_up() {
    let test = "application_handler_runs_after_the_clean_up";
    child();
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = file_store(dir.path());
    let job = job("leakown");
    let mut kids = vec![spawn_with(
        test,
        0,
        2,
        &path,
        &job,
        &[("LEAK_ROLE", "own-handler"), NAMED],
    )];
    wait_for_segment(&job, &mut kids);
    signal(&kids[0], libc::SIGTERM);
    assert_eq!(ended(&mut kids[0]), (Some(77), None));
    assert_reaped(&kids);
    assert_no_segments(&job);
}

/// After set-up the previous dispositions are back: a rank still dies of
/// SIGTERM (the launcher's stop), and there is nothing to clean; on both
/// backings.
#[test]
fn after_set_up_sigterm_still_kills() {
    after_set_up_sigterm_still_kills_on("after_set_up_sigterm_still_kills", &[MEMFD]);
}

#[test]
fn after_set_up_sigterm_still_kills_named() {
    after_set_up_sigterm_still_kills_on("after_set_up_sigterm_still_kills_named", &[NAMED]);
}

fn after_set_up_sigterm_still_kills_on(test: &str, env: &[(&str, &str)]) {
    if let Some((rank, world, store, job)) = child_of() {
        let c = join(store.clone(), rank, world, &opts(&job)).unwrap();
        c.barrier().unwrap();
        store.set(&format!("up/{rank}"), b"1").unwrap();
        let _ = store.wait(&["never"], SETUP);
        std::process::exit(6);
    }
    let dir = tempfile::tempdir().unwrap();
    let (path, store) = file_store(dir.path());
    let job = job("leakafter");
    let mut kids: Vec<Child> = (0..2)
        .map(|r| spawn_with(test, r, 2, &path, &job, env))
        .collect();
    store.wait(&["up/0", "up/1"], SETUP).unwrap();
    for k in &kids {
        signal(k, libc::SIGTERM);
    }
    for k in &mut kids {
        assert_eq!(ended(k), (None, Some(libc::SIGTERM)));
    }
    assert_reaped(&kids);
    assert_no_segments(&job);
}

/// A creator that is not dumpable (other processes could not open its
/// descriptors through `/proc`) makes a named segment instead, set-up
/// completes, and nothing is left.
#[test]
fn an_undumpable_creator_falls_back_to_a_named_segment() {
    let test = "an_undumpable_creator_falls_back_to_a_named_segment";
    if let Some((rank, world, store, job)) = child_of() {
        if rank == 0 {
            // SAFETY: prctl with integer arguments only.
            assert_eq!(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) }, 0);
        } else {
            store.wait(&["go"], SETUP).unwrap();
        }
        let c = join(store.clone(), rank, world, &opts(&job)).unwrap();
        c.barrier().unwrap();
        std::process::exit(0);
    }
    let dir = tempfile::tempdir().unwrap();
    let (path, store) = file_store(dir.path());
    let job = job("leakundump");
    let mut kids: Vec<Child> = (0..2)
        .map(|r| spawn_with(test, r, 2, &path, &job, &[MEMFD]))
        .collect();
    wait_for_segment(&job, &mut kids);
    assert_eq!(
        list_segments(&job).len(),
        1,
        "the creator fell back to a name"
    );
    store.set("go", b"1").unwrap();
    for k in &mut kids {
        assert_eq!(ended(k), (Some(0), None));
    }
    assert_reaped(&kids);
    assert_no_segments(&job);
}
