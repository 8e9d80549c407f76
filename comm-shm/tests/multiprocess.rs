//! Multi-process tests: real processes (this test binary re-executed with an
//! environment marker) rendezvous through a file store in a temp dir.
//!
//! * the MessageQueue stress test (4 processes, writer not rank 0, 4 KiB ring,
//!   10,000 messages of 1 B .. 16 KiB, random sleeps, every message checked);
//!   `COMM_SHM_SEED` sets the seed, `COMM_SHM_MSGS` the count;
//! * crash tests: a member killed with SIGKILL mid-collective (or a queue
//!   writer killed while readers wait) makes the others fail with PeerLost
//!   within the deadline, and no segment of the job is left in /dev/shm.

mod common;

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use comm_core::{CommError, DeviceCommunicator, ReduceOp, Store, Tensor};
use comm_shm::{list_segments, MessageQueue, MqOptions, ShmCommunicator, ShmOptions};
use common::*;

const ROLE: &str = "COMM_SHM_CHILD";

fn var(k: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| panic!("{k} unset"))
}

fn spawn(test: &str, role: &str, rank: usize, store: &Path, job: &str, seed: u64) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1", "-q"])
        .env(ROLE, role)
        .env("COMM_SHM_RANK", rank.to_string())
        .env("COMM_SHM_STORE", store)
        .env("COMM_SHM_JOB", job)
        .env("COMM_SHM_SEED", seed.to_string())
        .spawn()
        .unwrap()
}

/// In a child: runs the role and exits with its code. In the parent: returns.
fn child_dispatch() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let rank: usize = var("COMM_SHM_RANK").parse().unwrap();
    let store = FileStore::new(var("COMM_SHM_STORE"));
    let job = var("COMM_SHM_JOB");
    let seed: u64 = var("COMM_SHM_SEED").parse().unwrap();
    let code = match role.as_str() {
        "stress" => stress_child(rank, &store, &job, seed),
        "crash" => crash_child(rank, &store, &job),
        "mqcrash" => mq_crash_child(rank, &store, &job),
        other => panic!("unknown role {other}"),
    };
    std::process::exit(code);
}

fn exit_code_for(e: &CommError, lost: usize) -> i32 {
    eprintln!("child got: {e}");
    match e {
        CommError::PeerLost { rank, .. } if *rank == lost => 42,
        _ => 43,
    }
}

// ---------------------------------------------------------------- stress

const RING: usize = 4096;
const WRITER: usize = 2;
const READERS: [usize; 3] = [0, 1, 3];

fn stress_msg(seed: u64, i: u64) -> Vec<u8> {
    let mut rng = Rng(seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let n = 1 + rng.below(4 * RING as u64) as usize;
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        v.extend_from_slice(&rng.next().to_le_bytes());
    }
    v.truncate(n);
    v
}

fn maybe_sleep(rng: &mut Rng) {
    if rng.below(100) == 0 {
        std::thread::sleep(Duration::from_micros(rng.below(200)));
    }
}

fn stress_child(rank: usize, store: &FileStore, job: &str, seed: u64) -> i32 {
    let n: u64 = std::env::var("COMM_SHM_MSGS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let o = MqOptions {
        timeout: Duration::from_secs(60),
        job_id: job.into(),
        name: "stress".into(),
        ..Default::default()
    };
    let mut rng = Rng(seed.wrapping_add(rank as u64 * 1000));
    if rank == WRITER {
        let mut q =
            MessageQueue::create_writer(store, "stress", WRITER, &READERS, RING, o).unwrap();
        for i in 0..n {
            maybe_sleep(&mut rng);
            if let Err(e) = q.enqueue(&stress_msg(seed, i)) {
                eprintln!("writer: message {i}: {e}");
                return 1;
            }
        }
        // Wait until every reader confirms, so the queue outlives their reads.
        for r in READERS {
            store
                .get(&format!("stress/done/{r}"), Duration::from_secs(60))
                .unwrap();
        }
        0
    } else {
        let mut q = MessageQueue::open_reader(store, "stress", rank, o).unwrap();
        let mut buf = Vec::new();
        for i in 0..n {
            if let Err(e) = q.dequeue_into(&mut buf, Duration::from_secs(60)) {
                eprintln!("reader {rank}: message {i}: {e}");
                return 1;
            }
            let want = stress_msg(seed, i);
            if buf.len() != want.len() || checksum(&buf) != checksum(&want) {
                eprintln!(
                    "reader {rank}: message {i} corrupt: {} bytes, expected {}",
                    buf.len(),
                    want.len()
                );
                return 2;
            }
            maybe_sleep(&mut rng);
        }
        store.set(&format!("stress/done/{rank}"), b"1").unwrap();
        0
    }
}

#[test]
fn mq_stress_four_processes() {
    child_dispatch();
    let seed: u64 = std::env::var("COMM_SHM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("mq stress seed: {seed} (set COMM_SHM_SEED to replay)");
    let dir = tempfile::tempdir().unwrap();
    let job = job("stress");
    let t0 = Instant::now();
    let mut kids: Vec<Child> = (0..4)
        .map(|r| {
            spawn(
                "mq_stress_four_processes",
                "stress",
                r,
                dir.path(),
                &job,
                seed,
            )
        })
        .collect();
    let codes: Vec<i32> = kids
        .iter_mut()
        .map(|k| k.wait().unwrap().code().unwrap_or(-1))
        .collect();
    println!("mq stress: {:?} in {:.2?}", codes, t0.elapsed());
    assert_eq!(codes, [0, 0, 0, 0], "seed {seed}");
    assert!(list_segments(&job).is_empty());
}

// ---------------------------------------------------------------- crash

fn crash_child(rank: usize, store: &FileStore, job: &str) -> i32 {
    let o = ShmOptions {
        timeout: Duration::from_secs(30),
        job_id: job.into(),
        ..Default::default()
    };
    let mut c = ShmCommunicator::new(store, rank, 3, o).unwrap();
    let mut t = Tensor::from_vec1(vec![1f32; 64 << 10]);
    let mut i = 0u64;
    loop {
        if let Err(e) = c.all_reduce(&mut t, ReduceOp::Max) {
            return exit_code_for(&e, 1);
        }
        i += 1;
        if i == 1 {
            store.set(&format!("ready/{rank}"), b"1").unwrap();
        }
    }
}

fn wait_exit(k: &mut Child, limit: Duration) -> Option<i32> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if let Some(s) = k.try_wait().unwrap() {
            return s.code();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = k.kill();
    let _ = k.wait();
    None
}

#[test]
fn sigkill_mid_collective_is_peer_lost_and_leaves_nothing() {
    child_dispatch();
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path());
    let job = job("crash");
    let mut kids: Vec<Child> = (0..3)
        .map(|r| {
            spawn(
                "sigkill_mid_collective_is_peer_lost_and_leaves_nothing",
                "crash",
                r,
                dir.path(),
                &job,
                0,
            )
        })
        .collect();
    store
        .wait(&["ready/0", "ready/1", "ready/2"], Duration::from_secs(30))
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    kids[1].kill().unwrap(); // SIGKILL
    let killed = Instant::now();
    kids[1].wait().unwrap();
    let c0 = wait_exit(&mut kids[0], Duration::from_secs(10));
    let c2 = wait_exit(&mut kids[2], Duration::from_secs(10));
    let took = killed.elapsed();
    println!("survivors exited with {c0:?} {c2:?} {took:.2?} after the kill (deadline 30 s)");
    assert_eq!((c0, c2), (Some(42), Some(42)));
    assert!(took < Duration::from_secs(5));
    assert!(
        list_segments(&job).is_empty(),
        "leaked {:?}",
        list_segments(&job)
    );
}

fn mq_crash_child(rank: usize, store: &FileStore, job: &str) -> i32 {
    let o = MqOptions {
        timeout: Duration::from_secs(30),
        job_id: job.into(),
        ..Default::default()
    };
    if rank == 1 {
        let mut q = MessageQueue::create_writer(store, "mq", 1, &[0, 2], 4096, o).unwrap();
        q.enqueue(b"one").unwrap();
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    let mut q = MessageQueue::open_reader(store, "mq", rank, o).unwrap();
    assert_eq!(q.dequeue().unwrap(), b"one");
    store.set(&format!("ready/{rank}"), b"1").unwrap();
    match q.dequeue() {
        Ok(_) => 44,
        Err(e) => exit_code_for(&e, 1),
    }
}

#[test]
fn sigkill_of_queue_writer_is_peer_lost_for_readers() {
    child_dispatch();
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path());
    let job = job("mqcrash");
    let mut kids: Vec<Child> = (0..3)
        .map(|r| {
            spawn(
                "sigkill_of_queue_writer_is_peer_lost_for_readers",
                "mqcrash",
                r,
                dir.path(),
                &job,
                0,
            )
        })
        .collect();
    store
        .wait(&["ready/0", "ready/2"], Duration::from_secs(30))
        .unwrap();
    std::thread::sleep(Duration::from_millis(200)); // readers are asleep in the futex by now
    kids[1].kill().unwrap();
    let killed = Instant::now();
    kids[1].wait().unwrap();
    let c0 = wait_exit(&mut kids[0], Duration::from_secs(10));
    let c2 = wait_exit(&mut kids[2], Duration::from_secs(10));
    println!(
        "readers exited with {c0:?} {c2:?} {:.2?} after the kill",
        killed.elapsed()
    );
    assert_eq!((c0, c2), (Some(42), Some(42)));
    assert!(killed.elapsed() < Duration::from_secs(5));
    assert!(list_segments(&job).is_empty());
}
