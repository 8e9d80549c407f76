//! MessageQueue tests, writer and readers as threads (`multiprocess.rs`
//! runs them as processes). Set-up always has the generous [`SETUP`]
//! deadline; short deadlines are set on the queue after set-up, and
//! orderings the tests need come from channels between the threads, not
//! from sleeps.

mod common;

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use comm_core::{CommError, Store};
use comm_shm::{MessageQueue, MqOptions};
use common::*;
use dist_utils::HashStore;

fn opts(job: &str) -> MqOptions {
    MqOptions::default().timeout(SETUP).job_id(job)
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
    let job = o.job_id.clone();
    let out = std::thread::scope(|s| {
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
    });
    assert_no_segments(&job);
    out
}

fn msg(i: u64, ring: usize) -> Vec<u8> {
    let mut rng = Rng(i * 7 + 1);
    let n = 1 + rng.below(4 * ring as u64) as usize;
    (0..n).map(|_| rng.next() as u8).collect()
}

#[test]
fn fifo_many_sizes_tiny_ring() {
    let ring = 4096;
    let (_, got) = run(
        2,
        &[0, 1, 3],
        ring,
        opts(&job("fifo")),
        |w| {
            for i in 0..2000 {
                w.enqueue(&msg(i, ring)).unwrap();
            }
        },
        |_, r| {
            let mut buf = Vec::new();
            for i in 0..2000 {
                r.dequeue_into(&mut buf, SETUP).unwrap();
                assert_eq!(buf, msg(i, ring), "message {i}");
            }
            true
        },
    );
    assert!(got.into_iter().all(|x| x));
}

#[test]
fn small_messages_take_little_space() {
    // 200-byte messages: a 4 KiB ring holds 19 of them without a reader;
    // the 20th waits for space and times out while the reader holds back.
    let (tx, rx) = mpsc::channel::<()>();
    let rx = std::sync::Mutex::new(rx);
    run(
        0,
        &[1],
        4096,
        opts(&job("small")),
        move |w| {
            for _ in 0..19 {
                w.enqueue(&[7u8; 200]).unwrap();
            }
            w.set_timeout(Duration::from_millis(300));
            assert!(matches!(
                w.enqueue(&[7u8; 200]),
                Err(CommError::Timeout { .. })
            ));
            tx.send(()).unwrap();
        },
        |_, r| {
            rx.lock().unwrap().recv().unwrap();
            for _ in 0..19 {
                assert_eq!(r.dequeue().unwrap(), vec![7u8; 200]);
            }
        },
    );
}

#[test]
fn free_bytes_and_has_pending_poll_without_blocking() {
    // The writer sees its free space shrink by 8 + len per message and grow
    // back once the reader consumed them; the reader sees a message waiting
    // exactly while one is.
    let (tx, rx) = mpsc::channel::<()>();
    let (back_tx, back_rx) = mpsc::channel::<()>();
    let rx = std::sync::Mutex::new(rx);
    let back_tx = std::sync::Mutex::new(back_tx);
    run(
        0,
        &[1],
        4096,
        opts(&job("poll")),
        move |w| {
            assert_eq!(w.free_bytes(), 4096);
            assert!(!w.has_pending());
            for _ in 0..3 {
                w.enqueue(&[5u8; 100]).unwrap();
            }
            assert_eq!(w.free_bytes(), 4096 - 3 * 108);
            tx.send(()).unwrap();
            back_rx.recv().unwrap();
            assert_eq!(w.free_bytes(), 4096);
        },
        |_, r| {
            assert_eq!(r.free_bytes(), 0);
            rx.lock().unwrap().recv().unwrap();
            for _ in 0..3 {
                assert!(r.has_pending());
                assert_eq!(r.dequeue().unwrap(), vec![5u8; 100]);
            }
            assert!(!r.has_pending());
            back_tx.lock().unwrap().send(()).unwrap();
        },
    );
}

#[test]
fn enqueue_notify_calls_back_before_waiting_for_room() {
    // A reader that only looks when told (as one sleeping in epoll does):
    // a 10 KiB message through a 1 KiB ring streams because the writer
    // notifies each time it published a part and waits for room.
    let (tx, rx) = mpsc::channel::<()>();
    let rx = std::sync::Mutex::new(rx);
    let data: Vec<u8> = (0..10_240).map(|i| (i % 253) as u8).collect();
    let want = data.clone();
    let (calls, _) = run(
        0,
        &[1],
        1024,
        opts(&job("notify")),
        move |w| {
            let calls = std::cell::Cell::new(0);
            let notify = || {
                calls.set(calls.get() + 1);
                let _ = tx.send(());
            };
            w.enqueue_notify(&data, SETUP, &notify).unwrap();
            let _ = tx.send(());
            calls.get()
        },
        |_, r| {
            rx.lock().unwrap().recv().unwrap();
            assert!(r.has_pending());
            assert_eq!(r.dequeue().unwrap(), want);
        },
    );
    assert!(calls >= 9, "notified {calls} times");
}

#[test]
fn message_larger_than_ring() {
    let big: Vec<u8> = (0..(1usize << 20) + 17)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    let b2 = big.clone();
    run(
        1,
        &[0, 2],
        1024,
        opts(&job("large")),
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
    let (tx, rx) = mpsc::channel::<()>();
    let rx = std::sync::Mutex::new(rx);
    let (err, _) = run(
        3,
        &[0, 5],
        1024,
        opts(&job("bp")),
        move |w| {
            w.set_timeout(Duration::from_millis(400));
            let t0 = Instant::now();
            let e = loop {
                if let Err(e) = w.enqueue(&[1u8; 100]) {
                    break e;
                }
            };
            assert!(t0.elapsed() < Duration::from_secs(30));
            tx.send(()).unwrap();
            e
        },
        |rank, r| {
            if rank == 0 {
                // A fast reader: drains until the writer is gone.
                while r.dequeue_into(&mut Vec::new(), SETUP).is_ok() {}
            } else {
                // Reads nothing until the writer has given up.
                rx.lock().unwrap().recv().unwrap();
            }
        },
    );
    match err {
        CommError::Timeout {
            missing, operation, ..
        } => {
            assert_eq!(missing.len(), 1, "{missing:?}");
            assert_eq!(missing[0].rank.group, 5, "{missing:?}");
            assert!(missing[0].detail.contains("behind"), "{missing:?}");
            assert!(operation.contains("writer rank 3"), "{operation}");
        }
        other => panic!("{other}"),
    }
}

#[test]
fn shutdown_wakes_blocked_readers_after_draining() {
    let (tx, rx) = mpsc::channel::<()>();
    let rx = std::sync::Mutex::new(rx);
    run(
        1,
        &[0, 2, 3],
        4096,
        opts(&job("shut")),
        move |w| {
            w.enqueue(b"last words").unwrap();
            // Once every reader has the message and is about to wait again.
            for _ in 0..3 {
                rx.lock().unwrap().recv().unwrap();
            }
            w.shutdown();
        },
        |_, r| {
            assert_eq!(r.dequeue().unwrap(), b"last words");
            tx.send(()).unwrap();
            let t0 = Instant::now();
            let e = r.dequeue().unwrap_err();
            assert!(matches!(e, CommError::Aborted(_)), "{e}");
            assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
        },
    );
}

#[test]
fn objects_round_trip_and_wrong_end_is_an_error() {
    run(
        4,
        &[0],
        256,
        opts(&job("obj")),
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
    let (err, _) = run(
        0,
        &[1],
        256,
        opts(&job("rgone")),
        |w| loop {
            if let Err(e) = w.enqueue(&[0u8; 64]) {
                break e;
            }
        },
        |_, r| {
            let _ = r.dequeue();
            // drop: the reader leaves
        },
    );
    match err {
        CommError::PeerLost { peer, .. } => assert_eq!(peer.group, 1),
        other => panic!("{other}"),
    }
}

#[test]
fn abort_is_reported_to_the_other_end() {
    let (tx, rx) = mpsc::channel::<()>();
    let rx = std::sync::Mutex::new(rx);
    let (_, got) = run(
        2,
        &[0],
        4096,
        opts(&job("mqabort")),
        move |w| {
            rx.lock().unwrap().recv().unwrap();
            w.abort();
        },
        |_, r| {
            tx.send(()).unwrap();
            r.dequeue().unwrap_err()
        },
    );
    match &got[0] {
        CommError::PeerAborted { peer, .. } => assert_eq!(peer.group, 2),
        other => panic!("{other}"),
    }
}

#[test]
fn oversized_record_is_refused_without_allocating() {
    // The reader accepts at most 1 KiB; a 64 KiB message is a protocol
    // error naming the limit (a corrupt length cannot make it allocate).
    let small = MqOptions::default()
        .timeout(SETUP)
        .job_id(job("limit"))
        .max_message_bytes(1024);
    let (_, got) = run(
        0,
        &[1],
        4096,
        small,
        |w| {
            w.set_timeout(Duration::from_millis(200));
            let _ = w.enqueue(&vec![1u8; 64 << 10]);
        },
        |_, r| r.dequeue().unwrap_err(),
    );
    match &got[0] {
        CommError::Protocol(t) => assert!(t.contains("limit of 1024"), "{t}"),
        other => panic!("{other}"),
    }
}
