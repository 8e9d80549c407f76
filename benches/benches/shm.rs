//! Criterion benches of the shared-memory backend: all_reduce (f32 sum) and
//! all_to_all at 4 KiB, 1 MiB and 16 MiB for world 2 and 4, and the
//! MessageQueue 1 KiB enqueue -> dequeue round trip (one reader).
//!
//! The ranks are threads of the bench process, each with its own shm
//! communicator from `ShmFactory` and its own mapping of the shared segment (the data path
//! is the one processes use); criterion needs one process to drive the loop.
//! For nccl-tests style tables over 8 B..64 MiB use `comm-perf --backend shm`.
//! Throughput is the per-rank buffer size (algbw).

use std::sync::Arc;
use std::time::Duration;

use comm_core::Store;
use comm_shm::{MessageQueue, MqOptions, ShmFactory};
use criterion::{criterion_group, criterion_main, Criterion};

mod common;

fn collectives(c: &mut Criterion) {
    common::collectives(c, Arc::new(ShmFactory::default()));
}

/// 1 KiB enqueue -> dequeue -> 8-byte answer; criterion reports the round
/// trip (one-way latency is half of it).
fn message_queue(c: &mut Criterion) {
    let store: Arc<dyn Store> = Arc::new(dist_utils::HashStore::new());
    let o = MqOptions::default().timeout(Duration::from_secs(60));
    let (s2, o2) = (store.clone(), o.clone());
    let echo = std::thread::spawn(move || {
        let mut q = MessageQueue::open_reader(&*s2, "fwd", 1, o2.clone()).unwrap();
        let mut back = MessageQueue::create_writer(&*s2, "back", 1, &[0], 1 << 16, o2).unwrap();
        let mut buf = Vec::with_capacity(1024);
        loop {
            if q.dequeue_into(&mut buf, Duration::from_secs(60)).is_err() || buf.is_empty() {
                return;
            }
            back.enqueue(&buf[..8]).unwrap();
        }
    });
    let mut fwd = MessageQueue::create_writer(&*store, "fwd", 0, &[1], 1 << 20, o.clone()).unwrap();
    let mut back = MessageQueue::open_reader(&*store, "back", 0, o).unwrap();
    let msg = vec![7u8; 1024];
    let mut buf = Vec::with_capacity(64);
    let mut grp = c.benchmark_group("shm_mq");
    grp.sample_size(20).measurement_time(Duration::from_secs(2));
    grp.bench_function("1KiB_round_trip_1_reader", |b| {
        b.iter(|| {
            fwd.enqueue(&msg).unwrap();
            back.dequeue_into(&mut buf, Duration::from_secs(60))
                .unwrap();
        })
    });
    grp.finish();
    fwd.enqueue(&[]).unwrap(); // stop the echo thread
    echo.join().unwrap();
}

criterion_group!(benches, collectives, message_queue);
criterion_main!(benches);
