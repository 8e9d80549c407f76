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

/// A signal between the writer's thread and the readers' closure, which is
/// `Fn + Sync`: the receiving end sits in a mutex (a `Sender` is `Sync`).
fn signal() -> (mpsc::Sender<()>, std::sync::Mutex<mpsc::Receiver<()>>) {
    let (tx, rx) = mpsc::channel();
    (tx, std::sync::Mutex::new(rx))
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
    let (tx, rx) = signal();
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
    // The writer sees its free space shrink by 8 + len per message (each
    // starting at a multiple of 8) and grow back once the reader consumed
    // them; the reader sees a message waiting exactly while one is.
    let (tx, rx) = signal();
    let (back_tx, back_rx) = signal();
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
            assert_eq!(w.free_bytes(), 4096 - (112 + 112 + 108));
            tx.send(()).unwrap();
            back_rx.lock().unwrap().recv().unwrap();
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
            back_tx.send(()).unwrap();
        },
    );
}

#[test]
fn enqueue_notify_calls_back_before_waiting_for_room() {
    // A reader that only looks when told (as one sleeping in epoll does):
    // a 10 KiB message through a 1 KiB ring streams because the writer
    // notifies each time it published a part and waits for room.
    let (tx, rx) = signal();
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
    let (tx, rx) = signal();
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
    let (tx, rx) = signal();
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
    let (tx, rx) = signal();
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

/// Fills `buf` with message `i`'s bytes (as [`msg`] would build them).
fn fill_msg(i: u64, buf: &mut [u8]) {
    let mut rng = Rng(i * 7 + 1);
    let _ = rng.below(1);
    for b in buf.iter_mut() {
        *b = rng.next() as u8;
    }
}

#[test]
fn whole_messages_read_in_place_mixed_with_streamed_ones() {
    // Messages written in place (enqueue_with: pad records where one would
    // wrap) and streamed ones (enqueue), of sizes from 1 byte to 4 rings,
    // through a small ring to 3 readers, read with dequeue_with and
    // dequeue_into alternately: every reader gets every message exactly,
    // in order. The second ring is not a multiple of 8 (it is used as 4008
    // bytes) nor a power of two.
    for ring in [4096, 4013] {
        in_place_and_streamed(ring);
    }
}

fn in_place_and_streamed(ring: usize) {
    let n = 1500u64;
    let want = |i: u64| {
        let mut v = vec![0u8; msg(i, ring).len()];
        fill_msg(i, &mut v);
        v
    };
    let (_, got) = run(
        1,
        &[0, 2, 3],
        ring,
        opts(&job(&format!("inplace{ring}"))),
        |w| {
            for i in 0..n {
                let len = msg(i, ring).len();
                if i % 3 == 0 {
                    w.enqueue(&want(i)).unwrap();
                } else {
                    w.enqueue_with(len, SETUP, |buf| {
                        fill_msg(i, buf);
                        Ok(())
                    })
                    .unwrap();
                }
            }
        },
        |rank, r| {
            let mut buf = Vec::new();
            for i in 0..n {
                if (i + rank as u64).is_multiple_of(2) {
                    let same = r.dequeue_with(SETUP, |b| b == want(i).as_slice()).unwrap();
                    assert!(same, "ring {ring} rank {rank} message {i} (in place)");
                } else {
                    r.dequeue_into(&mut buf, SETUP).unwrap();
                    assert_eq!(buf, want(i), "ring {ring} rank {rank} message {i}");
                }
            }
            true
        },
    );
    assert!(got.into_iter().all(|x| x));
}

#[test]
fn objects_go_through_the_ring_without_staging() {
    let (_, got) = run(
        0,
        &[1, 2],
        1 << 16,
        opts(&job("objs")),
        |w| {
            for i in 0..200u32 {
                let v: Vec<u32> = (0..i * 37).collect();
                w.enqueue_obj(&(i, v)).unwrap();
            }
            // Larger than the ring: filled aside, then streamed.
            w.enqueue_obj(&vec![9u64; 20_000]).unwrap();
        },
        |_, r| {
            for i in 0..200u32 {
                let (j, v): (u32, Vec<u32>) = r.dequeue_obj().unwrap();
                assert_eq!(j, i);
                assert_eq!(v, (0..i * 37).collect::<Vec<u32>>());
            }
            r.dequeue_obj::<Vec<u64>>().unwrap()
        },
    );
    assert!(got.iter().all(|v| *v == vec![9u64; 20_000]));
}

#[test]
fn try_enqueue_with_never_waits_and_a_failed_fill_writes_nothing() {
    let (tx, rx) = signal();
    let (back_tx, back_rx) = signal();
    run(
        0,
        &[1],
        4096,
        opts(&job("trywith")),
        move |w| {
            // Too large to be held whole: refused, `fill` never called.
            assert!(!w.try_enqueue_with(4089, |_| panic!("not called")).unwrap());
            // A fill that fails: its error, and nothing written.
            let e = w
                .try_enqueue_with(100, |_| Err(CommError::Codec("no".into())))
                .unwrap_err();
            assert!(matches!(e, CommError::Codec(_)), "{e}");
            assert_eq!(w.free_bytes(), 4096);
            // 3500 bytes, then 1000 would wrap: a pad record fills the
            // lap, and the message does not fit at the start of the next
            // until the reader has taken the first.
            assert!(w
                .try_enqueue_with(3500, |b| {
                    b.fill(1);
                    Ok(())
                })
                .unwrap());
            let t0 = Instant::now();
            assert!(!w.try_enqueue_with(1000, |_| panic!("not called")).unwrap());
            assert!(t0.elapsed() < Duration::from_secs(5));
            tx.send(()).unwrap();
            back_rx.lock().unwrap().recv().unwrap();
            assert!(w
                .try_enqueue_with(1000, |b| {
                    b.fill(2);
                    Ok(())
                })
                .unwrap());
        },
        |_, r| {
            rx.lock().unwrap().recv().unwrap();
            let first = r.dequeue_with(SETUP, |b| b.to_vec()).unwrap();
            assert_eq!(first, vec![1u8; 3500]);
            back_tx.send(()).unwrap();
            // The second wrapped: it starts the next lap after a pad
            // record, whole.
            assert_eq!(
                r.dequeue_with(SETUP, |b| b.to_vec()).unwrap(),
                vec![2u8; 1000]
            );
        },
    );
}

#[test]
fn a_dequeue_timeout_consumes_nothing_and_a_broken_stream_is_refused() {
    // A reader's timeout before a message starts can be retried; a writer
    // that times out in the middle of a message leaves a queue that refuses
    // further writes instead of writing out of step.
    let (tx, rx) = signal();
    let (done_tx, done_rx) = signal();
    run(
        0,
        &[1],
        1024,
        opts(&job("broken")),
        move |w| {
            rx.lock().unwrap().recv().unwrap();
            w.enqueue(b"first").unwrap();
            w.set_timeout(Duration::from_millis(200));
            // 4 KiB through a 1 KiB ring the reader does not drain.
            let e = w.enqueue(&[3u8; 4096]).unwrap_err();
            assert!(matches!(e, CommError::Timeout { .. }), "{e}");
            let e = w.enqueue(b"late").unwrap_err();
            match e {
                CommError::State(t) => assert!(t.contains("middle of a message"), "{t}"),
                other => panic!("{other}"),
            }
            done_tx.send(()).unwrap();
        },
        |_, r| {
            let e = r
                .dequeue_with(Duration::from_millis(50), |b| b.len())
                .unwrap_err();
            assert!(matches!(e, CommError::Timeout { .. }), "{e}");
            tx.send(()).unwrap();
            assert_eq!(r.dequeue_with(SETUP, |b| b.to_vec()).unwrap(), b"first");
            // Stays (without reading) until the writer has given up.
            done_rx.lock().unwrap().recv().unwrap();
        },
    );
}
