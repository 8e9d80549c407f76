//! MessageQueue unit tests (writer and readers as threads).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use comm_core::{CommError, Store};
use comm_shm::{list_segments, MessageQueue, MqOptions};
use common::*;
use dist_utils::HashStore;

fn opts(job: &str, timeout_ms: u64) -> MqOptions {
    MqOptions {
        timeout: Duration::from_millis(timeout_ms),
        job_id: job.into(),
        ..MqOptions::default()
    }
}

/// Runs the writer (rank `writer`) and readers on threads.
fn run<W: Send, R: Send>(
    writer: usize,
    readers: &[usize],
    ring: usize,
    o: MqOptions,
    w: impl FnOnce(&mut MessageQueue) -> W + Send,
    r: impl Fn(usize, &mut MessageQueue) -> R + Sync,
) -> (W, Vec<R>) {
    let store: Arc<dyn Store> = Arc::new(HashStore::new());
    std::thread::scope(|s| {
        let hs: Vec<_> = readers
            .iter()
            .map(|&rank| {
                let (store, o, r) = (store.clone(), o.clone(), &r);
                s.spawn(move || {
                    let mut q = MessageQueue::open_reader(&*store, "q", rank, o).unwrap();
                    r(rank, &mut q)
                })
            })
            .collect();
        let mut q = MessageQueue::create_writer(&*store, "q", writer, readers, ring, o).unwrap();
        let wr = w(&mut q);
        drop(q);
        (wr, hs.into_iter().map(|h| h.join().unwrap()).collect())
    })
}

fn msg(i: u64, ring: usize) -> Vec<u8> {
    let mut rng = Rng(i * 7 + 1);
    let n = 1 + rng.below(4 * ring as u64) as usize;
    (0..n).map(|_| rng.next() as u8).collect()
}

#[test]
fn fifo_many_sizes_tiny_ring() {
    let job = job("fifo");
    let ring = 4096;
    let (_, got) = run(
        2,
        &[0, 1, 3],
        ring,
        opts(&job, 20_000),
        |w| {
            for i in 0..2000 {
                w.enqueue(&msg(i, ring)).unwrap();
            }
        },
        |_, r| {
            let mut buf = Vec::new();
            for i in 0..2000 {
                r.dequeue_into(&mut buf, Duration::from_secs(20)).unwrap();
                assert_eq!(buf, msg(i, ring), "message {i}");
            }
            true
        },
    );
    assert!(got.into_iter().all(|x| x));
    assert!(list_segments(&job).is_empty());
}

#[test]
fn small_messages_take_little_space() {
    // 200-byte messages: a 4 KiB ring holds 19 of them without a reader.
    let job = job("small");
    run(
        0,
        &[1],
        4096,
        opts(&job, 300),
        |w| {
            for _ in 0..19 {
                w.enqueue(&[7u8; 200]).unwrap();
            }
            assert!(matches!(
                w.enqueue(&[7u8; 200]),
                Err(CommError::Timeout { .. })
            ));
        },
        |_, r| {
            std::thread::sleep(Duration::from_millis(600));
            for _ in 0..19 {
                assert_eq!(r.dequeue().unwrap(), vec![7u8; 200]);
            }
        },
    );
}

#[test]
fn message_larger_than_ring() {
    let job = job("large");
    let big: Vec<u8> = (0..(1usize << 20) + 17)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    let b2 = big.clone();
    run(
        1,
        &[0, 2],
        1024,
        opts(&job, 20_000),
        move |w| {
            w.enqueue(&b2).unwrap();
            w.enqueue(b"after").unwrap();
        },
        |_, r| {
            assert_eq!(r.dequeue().unwrap(), big);
            assert_eq!(r.dequeue().unwrap(), b"after");
        },
    );
}

#[test]
fn back_pressure_timeout_names_the_lagging_reader() {
    let job = job("bp");
    let (err, _) = run(
        3,
        &[0, 5],
        1024,
        opts(&job, 400),
        |w| {
            let t0 = Instant::now();
            loop {
                if let Err(e) = w.enqueue(&[1u8; 100]) {
                    assert!(t0.elapsed() < Duration::from_secs(5));
                    return e;
                }
            }
        },
        |rank, r| {
            if rank == 0 {
                // a fast reader: drains until the writer is gone
                while r
                    .dequeue_into(&mut Vec::new(), Duration::from_secs(5))
                    .is_ok()
                {}
            } else {
                std::thread::sleep(Duration::from_millis(1200));
            }
        },
    );
    match err {
        CommError::Timeout {
            missing, operation, ..
        } => {
            assert_eq!(missing.len(), 1, "{missing:?}");
            assert!(missing[0].starts_with("reader rank 5"), "{missing:?}");
            assert!(operation.contains("writer rank 3"), "{operation}");
        }
        other => panic!("{other}"),
    }
}

#[test]
fn shutdown_wakes_blocked_readers_after_draining() {
    let job = job("shut");
    run(
        1,
        &[0, 2, 3],
        4096,
        opts(&job, 30_000),
        |w| {
            w.enqueue(b"last words").unwrap();
            std::thread::sleep(Duration::from_millis(300));
            w.shutdown();
        },
        |_, r| {
            assert_eq!(r.dequeue().unwrap(), b"last words");
            let t0 = Instant::now();
            let e = r.dequeue().unwrap_err();
            assert!(matches!(e, CommError::Aborted(_)), "{e}");
            assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        },
    );
}

#[test]
fn objects_round_trip_and_wrong_end_is_an_error() {
    let job = job("obj");
    run(
        4,
        &[0],
        256,
        opts(&job, 5000),
        |w| {
            w.enqueue_obj(&("hello".to_string(), vec![1u64, 2, 3], Some(-5i32)))
                .unwrap();
            assert!(w.dequeue().is_err());
        },
        |_, r| {
            let v: (String, Vec<u64>, Option<i32>) = r.dequeue_obj().unwrap();
            assert_eq!(v, ("hello".to_string(), vec![1, 2, 3], Some(-5)));
            assert!(r.enqueue(b"x").is_err());
        },
    );
}

#[test]
fn reader_gone_is_peer_lost_for_a_blocked_writer() {
    let job = job("rgone");
    let (err, _) = run(
        0,
        &[1],
        256,
        opts(&job, 10_000),
        |w| {
            let t0 = Instant::now();
            let e = loop {
                if let Err(e) = w.enqueue(&[0u8; 64]) {
                    break e;
                }
            };
            assert!(t0.elapsed() < Duration::from_secs(3));
            e
        },
        |_, r| {
            let _ = r.dequeue();
            // drop: the reader leaves
        },
    );
    assert!(matches!(err, CommError::PeerLost { rank: 1, .. }), "{err}");
}
