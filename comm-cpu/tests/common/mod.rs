//! Helpers shared by the integration tests: ranks as threads over one HashStore.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use comm_core::Store;
use comm_cpu::{TcpCommunicator, TcpOptions};
use dist_utils::HashStore;

pub fn opts(timeout_s: f64) -> TcpOptions {
    let mut o = TcpOptions::with_timeout(Duration::from_secs_f64(timeout_s));
    o.addr = Some("127.0.0.1".parse().unwrap());
    // Spinning with many ranks on few cores only slows tests down.
    o.busy_poll = Duration::from_micros(20);
    o
}

/// Runs `f(rank, comm)` on `world` threads, each with its own communicator
/// built over a fresh store; returns the results in rank order.
pub fn run<T: Send + 'static>(
    world: usize,
    o: TcpOptions,
    f: impl Fn(usize, TcpCommunicator) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let store: Arc<dyn Store> = Arc::new(HashStore::new());
    let f = Arc::new(f);
    let hs: Vec<_> = (0..world)
        .map(|r| {
            let (store, f, o) = (store.clone(), f.clone(), o.clone());
            std::thread::Builder::new()
                .name(format!("rank{r}"))
                .spawn(move || {
                    let c = TcpCommunicator::new(store, r, world, o).expect("set-up");
                    f(r, c)
                })
                .unwrap()
        })
        .collect();
    hs.into_iter()
        .map(|h| h.join().expect("rank thread panicked"))
        .collect()
}
