//! Real processes (this test binary re-executed per rank, by
//! `comm_conformance::ranks::Processes` through `common::on_processes`, or
//! one by one with `common::spawn_rank` where a test signals one chosen
//! rank and rendezvous through dist-utils' `FileStore`):
//!
//! * every primitive across processes, both data paths (single copy reads
//!   another process's memory here, which threads cannot show);
//! * the MessageQueue stress test (4 processes, writer not rank 0, 4 KiB
//!   ring, 10,000 messages of 1 B .. 16 KiB, random pauses, every message
//!   checked); `COMM_SHM_SEED` sets the seed, `COMM_SHM_MSGS` the count;
//! * crashes: a member killed with SIGKILL mid-collective (or a queue writer
//!   killed while readers wait) makes the others fail naming it, within the
//!   deadline, and nothing is left in /dev/shm or the process table.

mod common;

use std::process::Child;
use std::time::{Duration, Instant};

use comm_conformance::ranks::is_worker;
use comm_core::{CommError, DType, ReduceOp, Tensor};
use comm_shm::{MessageQueue, MqOptions};
use common::*;

fn exit_code_for(e: &CommError, lost: usize) -> i32 {
    eprintln!("child got: {e}");
    if e.culprits().iter().map(|r| r.group).eq([lost]) {
        42
    } else {
        43
    }
}

#[test]
fn every_primitive_across_processes() {
    on_processes(3, opts(&job("mpprim")), Duration::from_secs(300), |r| {
        for sc in [false, true] {
            let (me, w) = (r.rank, r.world);
            let n = 3001;
            let inputs: Vec<Tensor> = (0..w).map(|q| input(DType::F32, q, n, 1)).collect();
            let mut t = inputs[me].try_clone().unwrap();
            r.comm.all_reduce(&mut t, ReduceOp::Sum).unwrap();
            assert_eq!(t, reference(&inputs, ReduceOp::Sum), "single copy {sc}");
            let mut g = Tensor::zeros([n * w], DType::F32);
            r.comm.all_gather(&inputs[me], &mut g).unwrap();
            assert_eq!(g.as_bytes().unwrap(), concat(&inputs));
            let a2a: Vec<Tensor> = (0..w).map(|q| input(DType::F32, q, n * w, 2)).collect();
            let mut a = Tensor::zeros([n * w], DType::F32);
            r.comm.all_to_all(&a2a[me], &mut a).unwrap();
            let bs = 4 * n;
            let expect: Vec<u8> = (0..w)
                .flat_map(|i| a2a[i].as_bytes().unwrap()[me * bs..(me + 1) * bs].to_vec())
                .collect();
            assert_eq!(a.as_bytes().unwrap(), expect);
            let mut b = if me == 1 {
                inputs[1].try_clone().unwrap()
            } else {
                Tensor::zeros([n], DType::F32)
            };
            r.comm.broadcast(&mut b, 1).unwrap();
            assert_eq!(b, inputs[1]);
            let (next, prev) = ((me + 1) % w, (me + w - 1) % w);
            let mut got = Tensor::zeros([n * 5], DType::F32);
            r.comm
                .batch_send_recv(vec![
                    comm_core::P2pOp::send(&input(DType::F32, me, n * 5, 3), next).unwrap(),
                    comm_core::P2pOp::recv(&mut got, prev).unwrap(),
                ])
                .unwrap();
            assert_eq!(got, input(DType::F32, prev, n * 5, 3));
            if !sc {
                // Second round in a fresh group with single copy on.
                let o = opts(&r.job).single_copy(true, 1).key_prefix("sc");
                let c = join(r.store.clone(), me, w, &o).unwrap();
                let active = c
                    .with_backend(|b| {
                        b.as_any_mut()
                            .and_then(|a| a.downcast_mut::<comm_shm::ShmCommunicator>())
                            .map(|s| s.single_copy_active())
                    })
                    .unwrap()
                    .unwrap();
                eprintln!("rank {me}: single copy across processes active: {active}");
                let mut t = inputs[me].try_clone().unwrap();
                c.all_reduce(&mut t, ReduceOp::Sum).unwrap();
                assert_eq!(t, reference(&inputs, ReduceOp::Sum));
                let mut a = Tensor::zeros([n * w], DType::F32);
                c.all_to_all(&a2a[me], &mut a).unwrap();
                assert_eq!(a.as_bytes().unwrap(), expect);
                let mut g = Tensor::zeros([n * w], DType::F32);
                c.all_gather(&inputs[me], &mut g).unwrap();
                assert_eq!(g.as_bytes().unwrap(), concat(&inputs));
                c.barrier().unwrap();
            }
        }
    });
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

/// A random short pause now and then, so the writer and readers overtake
/// each other in every way (the scenario, not synchronisation).
fn maybe_pause(rng: &mut Rng) {
    if rng.below(100) == 0 {
        std::thread::sleep(Duration::from_micros(rng.below(200)));
    }
}

#[test]
fn mq_stress_four_processes() {
    let seed: u64 = std::env::var("COMM_SHM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed);
    let n: u64 = std::env::var("COMM_SHM_MSGS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let job = job("stress");
    if !is_worker() {
        println!("mq stress seed: {seed} (set COMM_SHM_SEED to replay)");
    }
    let out = processes(4, &job).run_unchecked(|ctx| {
        let (rank, store) = (ctx.rank, &ctx.store);
        let o = MqOptions::default()
            .timeout(SETUP)
            .job_id(rank_job()?)
            .name("stress");
        let mut rng = Rng(seed.wrapping_add(rank as u64 * 1000));
        if rank == WRITER {
            let mut q =
                MessageQueue::create_writer(&**store, "stress", WRITER, &READERS, RING, o).unwrap();
            for i in 0..n {
                maybe_pause(&mut rng);
                q.enqueue(&stress_msg(seed, i)).unwrap();
            }
            // The queue outlives the readers' last reads.
            let keys: Vec<String> = READERS.iter().map(|r| format!("stress/done/{r}")).collect();
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            store.wait(&keys, SETUP).unwrap();
        } else {
            let mut q = MessageQueue::open_reader(&**store, "stress", rank, o).unwrap();
            let mut buf = Vec::new();
            for i in 0..n {
                q.dequeue_into(&mut buf, SETUP).unwrap();
                let want = stress_msg(seed, i);
                assert!(
                    buf.len() == want.len() && checksum(&buf) == checksum(&want),
                    "reader {rank}: message {i} corrupt ({} bytes, expected {})",
                    buf.len(),
                    want.len()
                );
                maybe_pause(&mut rng);
            }
            store.set(&format!("stress/done/{rank}"), b"1").unwrap();
        }
        Ok(())
    });
    println!("mq stress: {:?} in {:.2?}", out.exit_codes, out.elapsed);
    assert!(
        out.success(),
        "seed {seed}: exit codes {:?}, finished {:?}, {:?}\n{}",
        out.exit_codes,
        out.finished,
        out.stopped,
        out.logs()
    );
    assert_no_segments(&job);
}

// ---------------------------------------------------------------- crashes

#[test]
fn sigkill_mid_collective_is_peer_lost_and_leaves_nothing() {
    let test = "sigkill_mid_collective_is_peer_lost_and_leaves_nothing";
    if let Some((rank, world, store, job)) = child_of() {
        let comm = join(
            store.clone(),
            rank,
            world,
            &opts(&job).workspace_bytes(1 << 20),
        )
        .unwrap();
        comm.set_timeout(Duration::from_secs(60));
        let mut t = vec![1f32; 64 << 10];
        let mut i = 0u64;
        let code = loop {
            if let Err(e) = comm.all_reduce(&mut t, ReduceOp::Max) {
                break exit_code_for(&e, 1);
            }
            i += 1;
            if i == 1 {
                store.set(&format!("ready/{rank}"), b"1").unwrap();
            }
        };
        std::process::exit(code);
    }
    let dir = tempfile::tempdir().unwrap();
    let (path, store) = file_store(dir.path());
    let job = job("crash");
    let mut kids: Vec<Child> = (0..3)
        .map(|r| spawn_rank(test, r, 3, &path, &job))
        .collect();
    store
        .wait(&["ready/0", "ready/1", "ready/2"], SETUP)
        .unwrap();
    kids[1].kill().unwrap(); // SIGKILL, mid-collective: they run all_reduce in a loop
    let killed = Instant::now();
    kids[1].wait().unwrap();
    let codes = wait_all(&mut kids[..], Duration::from_secs(60));
    let took = killed.elapsed();
    println!(
        "survivors exited with {:?} {took:.2?} after the kill (deadline 60 s)",
        codes
    );
    assert_eq!((codes[0], codes[2]), (Some(42), Some(42)));
    assert!(took < Duration::from_secs(30), "{took:?}");
    assert_reaped(&kids);
    assert_no_segments(&job);
}

#[test]
fn sigkill_of_queue_writer_is_peer_lost_for_readers() {
    let test = "sigkill_of_queue_writer_is_peer_lost_for_readers";
    if let Some((rank, _, store, job)) = child_of() {
        let o = MqOptions::default().timeout(SETUP).job_id(job);
        if rank == 1 {
            let mut q = MessageQueue::create_writer(&*store, "mq", 1, &[0, 2], 4096, o).unwrap();
            q.enqueue(b"one").unwrap();
            // Stays alive until killed.
            store.wait(&["never"], SETUP).unwrap_or(());
            std::process::exit(1);
        }
        let mut q = MessageQueue::open_reader(&*store, "mq", rank, o).unwrap();
        assert_eq!(q.dequeue().unwrap(), b"one");
        store.set(&format!("ready/{rank}"), b"1").unwrap();
        let code = match q.dequeue() {
            Ok(_) => 44,
            Err(e) => exit_code_for(&e, 1),
        };
        std::process::exit(code);
    }
    let dir = tempfile::tempdir().unwrap();
    let (path, store) = file_store(dir.path());
    let job = job("mqcrash");
    let mut kids: Vec<Child> = (0..3)
        .map(|r| spawn_rank(test, r, 3, &path, &job))
        .collect();
    store.wait(&["ready/0", "ready/2"], SETUP).unwrap();
    kids[1].kill().unwrap();
    let killed = Instant::now();
    kids[1].wait().unwrap();
    let codes = wait_all(&mut kids[..], Duration::from_secs(60));
    println!(
        "readers exited with {codes:?} {:.2?} after the kill",
        killed.elapsed()
    );
    assert_eq!((codes[0], codes[2]), (Some(42), Some(42)));
    assert!(killed.elapsed() < Duration::from_secs(30));
    assert_reaped(&kids);
    assert_no_segments(&job);
}
