//! StatelessProcessGroup with 4 ranks as threads, over a HashStore and a TcpStore.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use comm_core::{CommError, Store};
use dist_utils::{HashStore, StatelessProcessGroup, TcpStore, TcpStoreServer};

const WORLD: usize = 4;
const T: Duration = Duration::from_secs(10);
const SECRET: &[u8] = b"spg-secret";

/// Runs `f(group)` on `WORLD` threads, each with the store `make(rank)` gives.
fn run<R: Send + 'static>(
    make: impl Fn(usize) -> Arc<dyn Store>,
    timeout: Duration,
    f: impl Fn(StatelessProcessGroup) -> R + Send + Sync + 'static,
) -> Vec<R> {
    let f = Arc::new(f);
    let handles: Vec<_> = (0..WORLD)
        .map(|rank| {
            let store = make(rank);
            let f = f.clone();
            std::thread::spawn(move || {
                f(StatelessProcessGroup::new(rank, WORLD, store, timeout).unwrap())
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// The whole protocol: point to point with two senders to one receiver,
/// broadcasts, all-gathers and barriers. Returns nothing; panics on error.
fn scenario(make: impl Fn(usize) -> Arc<dyn Store>) {
    let arrived = Arc::new(AtomicUsize::new(0));
    let a = arrived.clone();
    run(make, T, move |g| {
        let r = g.rank();
        // Ranks 1, 2 and 3 each send three messages to rank 0; no key collides.
        if r == 0 {
            // Read the senders in an order unrelated to their sending order.
            for src in [2, 1, 3] {
                for i in 0..3 {
                    let m: (usize, u32) = g.recv_obj(src).unwrap();
                    assert_eq!(m, (src, i), "message {i} from rank {src}");
                }
            }
        } else {
            for i in 0..3u32 {
                g.send_obj(&(r, i), 0).unwrap();
            }
        }
        // Ring exchange in both directions.
        g.send_obj(&format!("to {}", (r + 1) % WORLD), (r + 1) % WORLD)
            .unwrap();
        let got: String = g.recv_obj((r + WORLD - 1) % WORLD).unwrap();
        assert_eq!(got, format!("to {r}"));

        // Broadcasts from two different sources, back to back.
        let payload = vec![7u8, 8, 9];
        let v = g.broadcast_obj((r == 2).then_some(&payload), 2).unwrap();
        assert_eq!(v, vec![7, 8, 9]);
        let zero = "zero".to_string();
        let v: String = g.broadcast_obj((r == 0).then_some(&zero), 0).unwrap();
        assert_eq!(v, "zero");

        // All-gather returns rank order on every rank, twice.
        for round in 0..2 {
            let all = g.all_gather_obj(&(r * 10 + round)).unwrap();
            assert_eq!(all, (0..WORLD).map(|q| q * 10 + round).collect::<Vec<_>>());
        }

        // Barriers: nobody leaves round k before everyone has arrived at it.
        for round in 1..=3 {
            a.fetch_add(1, Ordering::SeqCst);
            g.barrier().unwrap();
            assert!(a.load(Ordering::SeqCst) >= round * WORLD);
        }
        // One last barrier so that every rank has finished all reads before the
        // key count is checked below.
        g.barrier().unwrap();
    });
    assert_eq!(arrived.load(Ordering::SeqCst), 3 * WORLD);
}

#[test]
fn scenario_over_hash_store() {
    let store: Arc<dyn Store> = Arc::new(HashStore::new());
    let s = store.clone();
    scenario(move |_| s.clone());
    // Every consumed key was deleted.
    assert_eq!(store.num_keys().unwrap(), 0);
}

#[test]
fn scenario_over_tcp_store() {
    let server = TcpStoreServer::bind("127.0.0.1:0", SECRET).unwrap();
    let addr = server.local_addr();
    // Each rank has its own client, as separate processes would.
    scenario(move |_| Arc::new(TcpStore::connect(addr, SECRET, T).unwrap()));
    let check = TcpStore::connect(addr, SECRET, T).unwrap();
    assert_eq!(check.num_keys().unwrap(), 0);
}

#[test]
fn create_tcp_hosts_on_rank_zero() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let handles: Vec<_> = (0..WORLD)
        .map(|rank| {
            std::thread::spawn(move || {
                let g =
                    StatelessProcessGroup::create_tcp(("127.0.0.1", port), rank, WORLD, SECRET, T)
                        .unwrap();
                let all = g.all_gather_obj(&rank).unwrap();
                g.barrier().unwrap();
                // Rank 0 may finish first: its group keeps the server up until
                // every other member has dropped its group.
                let again = g.all_gather_obj(&rank).unwrap();
                assert_eq!(all, again);
                all
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), vec![0, 1, 2, 3]);
    }
}

/// The group ranks a Timeout names as missing.
fn missing_of(e: &CommError) -> Vec<usize> {
    match e {
        CommError::Timeout { missing, .. } => missing.iter().map(|m| m.rank.group).collect(),
        other => panic!("expected a Timeout, got {other:?}"),
    }
}

fn timeouts_name_missing_ranks(make: impl Fn(usize) -> Arc<dyn Store>) {
    // The deadline every expected timeout waits out. It must cover how late a
    // healthy rank may reach the call on a loaded machine (the threads are
    // lined up first, so set-up is not part of it), but the test waits it
    // out three times.
    let short = Duration::from_secs(2);
    // Lines the threads up before each phase, so that neither set-up nor one
    // phase's timeouts eat into the next phase's deadline.
    let phase = Arc::new(std::sync::Barrier::new(WORLD));
    let results = run(make, short, move |g| {
        let r = g.rank();
        let mut errors = Vec::new();
        phase.wait();
        // Rank 3 never joins the barrier.
        if r != 3 {
            let started = Instant::now();
            let e = g.barrier().unwrap_err();
            // It waited out its deadline, not much more.
            let waited = started.elapsed();
            assert!(
                waited >= short && waited < short + Duration::from_secs(8),
                "{waited:?}"
            );
            errors.push(e);
        }
        phase.wait();
        // Rank 2 never contributes to this all-gather.
        if r != 2 {
            errors.push(g.all_gather_obj(&r).unwrap_err());
        }
        phase.wait();
        // Rank 0 waits for a message rank 1 never sends.
        if r == 0 {
            errors.push(g.recv_obj::<u8>(1).unwrap_err());
        }
        // Rank 1 waits for a broadcast from rank 3, which broadcasts nothing.
        if r == 1 {
            errors.push(g.broadcast_obj::<u8>(None, 3).unwrap_err());
        }
        (r, errors)
    });
    for (r, errors) in results {
        let mut it = errors.iter();
        if r != 3 {
            let e = it.next().unwrap();
            assert_eq!(missing_of(e), [3], "barrier on rank {r}: {e}");
            assert!(e.to_string().contains("barrier"), "{e}");
        }
        if r != 2 {
            let e = it.next().unwrap();
            assert_eq!(missing_of(e), [2], "all_gather on rank {r}: {e}");
        }
        if r == 0 {
            let e = it.next().unwrap();
            assert_eq!(missing_of(e), [1], "recv on rank 0: {e}");
            assert!(e.to_string().contains("recv_obj from rank 1"), "{e}");
        }
        if r == 1 {
            let e = it.next().unwrap();
            assert_eq!(missing_of(e), [3], "broadcast on rank 1: {e}");
        }
    }
}

#[test]
fn timeouts_name_missing_ranks_over_hash_store() {
    let store: Arc<dyn Store> = Arc::new(HashStore::new());
    timeouts_name_missing_ranks(move |_| store.clone());
}

#[test]
fn timeouts_name_missing_ranks_over_tcp_store() {
    let server = TcpStoreServer::bind("127.0.0.1:0", SECRET).unwrap();
    let addr = server.local_addr();
    timeouts_name_missing_ranks(move |_| Arc::new(TcpStore::connect(addr, SECRET, T).unwrap()));
}

#[test]
fn argument_errors() {
    let store: Arc<dyn Store> = Arc::new(HashStore::new());
    let g = StatelessProcessGroup::new(1, WORLD, store.clone(), T).unwrap();
    let e = g.send_obj(&1u8, 1).unwrap_err();
    assert!(matches!(e, CommError::InvalidArgument(_)), "{e:?}");
    assert!(e.to_string().contains("itself"), "{e}");
    assert!(matches!(
        g.recv_obj::<u8>(1),
        Err(CommError::InvalidArgument(_))
    ));
    assert!(matches!(
        g.send_obj(&1u8, WORLD),
        Err(CommError::InvalidArgument(_))
    ));
    assert!(matches!(
        g.broadcast_obj::<u8>(None, WORLD),
        Err(CommError::InvalidArgument(_))
    ));
    assert!(matches!(
        StatelessProcessGroup::new(4, 4, store.clone(), T),
        Err(CommError::InvalidArgument(_))
    ));
    assert!(matches!(
        StatelessProcessGroup::new(0, 0, store.clone(), T),
        Err(CommError::InvalidArgument(_))
    ));
    // The source of a broadcast must pass the object.
    let src = StatelessProcessGroup::new(0, WORLD, store.clone(), T).unwrap();
    assert!(matches!(
        src.broadcast_obj::<u8>(None, 0),
        Err(CommError::InvalidArgument(_))
    ));
    // A world of one needs no peers.
    let solo = StatelessProcessGroup::new(0, 1, store.clone(), T).unwrap();
    assert_eq!(solo.broadcast_obj(Some(&5u8), 0).unwrap(), 5);
    assert_eq!(solo.all_gather_obj(&"x".to_string()).unwrap(), ["x"]);
    solo.barrier().unwrap();
    assert_eq!(store.num_keys().unwrap(), 0);
}

#[test]
fn type_mismatch_is_a_codec_error() {
    let store: Arc<dyn Store> = Arc::new(HashStore::new());
    let a = StatelessProcessGroup::new(0, 2, store.clone(), T).unwrap();
    let b = StatelessProcessGroup::new(1, 2, store, T).unwrap();
    a.send_obj(&u64::MAX, 1).unwrap();
    assert!(matches!(b.recv_obj::<String>(0), Err(CommError::Codec(_))));
}
