//! Helpers shared by the store test files.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use comm_core::{CommError, Store};

/// Deadline of every store call that is expected to succeed.
pub const T: Duration = Duration::from_secs(10);

/// Polls `cond` until it holds or `limit` passes (the state it observes lives
/// in another thread or process, so there is nothing to wait on directly).
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond()
}

/// `e` is a Timeout naming exactly `key` among the things it missed.
pub fn assert_timeout_names(e: CommError, key: &str) {
    let text = e.to_string();
    match e {
        CommError::Timeout { keys, missing, .. } => {
            assert_eq!(keys, vec![key.to_string()], "{text}");
            assert!(missing.is_empty(), "{text}");
            assert!(text.contains(key), "{text}");
        }
        other => panic!("expected a Timeout naming `{key}`, got {other:?}"),
    }
}

/// Semantics every store shares (set/get/try_get, counters, waits and their
/// timeouts, delete, num_keys, compare_set).
pub fn check_store_semantics(s: &dyn Store) {
    assert_eq!(s.try_get("sem/a").unwrap(), None);
    s.set("sem/a", b"1").unwrap();
    assert_eq!(s.get("sem/a", T).unwrap(), b"1");
    s.set("sem/a", b"22").unwrap();
    assert_eq!(s.try_get("sem/a").unwrap().as_deref(), Some(&b"22"[..]));
    s.set("sem/empty", b"").unwrap();
    assert_eq!(s.get("sem/empty", T).unwrap(), b"");
    assert_eq!(s.try_get("sem/empty").unwrap().as_deref(), Some(&b""[..]));

    assert_eq!(s.add("sem/n", 5).unwrap(), 5);
    assert_eq!(s.add("sem/n", -7).unwrap(), -2);
    assert_eq!(s.get("sem/n", T).unwrap(), b"-2");

    s.wait(&["sem/a", "sem/n"], T).unwrap();
    let e = s
        .wait(&["sem/a", "sem/missing"], Duration::from_millis(50))
        .unwrap_err();
    assert_timeout_names(e, "sem/missing");
    let started = Instant::now();
    let e = s.get("sem/absent", Duration::from_millis(100)).unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(90));
    assert_timeout_names(e, "sem/absent");

    let n = s.num_keys().unwrap();
    assert!(s.delete("sem/a").unwrap());
    assert!(!s.delete("sem/a").unwrap());
    assert_eq!(s.num_keys().unwrap(), n - 1);
    assert_eq!(s.try_get("sem/a").unwrap(), None);

    check_compare_set(s);
}

/// `add` on a key holding text is refused with InvalidArgument (our stores;
/// a c10d server closes the connection instead, as PyTorch's does).
pub fn check_add_refuses_text(s: &dyn Store) {
    s.set("sem/text", b"not a number").unwrap();
    assert!(matches!(
        s.add("sem/text", 1),
        Err(CommError::InvalidArgument(_))
    ));
}

pub fn check_compare_set(s: &dyn Store) {
    // Absent key, expected absent: set.
    assert_eq!(s.compare_set("cs", None, b"one").unwrap(), b"one");
    assert_eq!(s.try_get("cs").unwrap().as_deref(), Some(&b"one"[..]));
    // Present key, expected absent: unchanged, current value returned.
    assert_eq!(s.compare_set("cs", None, b"two").unwrap(), b"one");
    // Wrong expectation: unchanged.
    assert_eq!(s.compare_set("cs", Some(b"nope"), b"two").unwrap(), b"one");
    assert_eq!(s.try_get("cs").unwrap().as_deref(), Some(&b"one"[..]));
    // Right expectation: swapped.
    assert_eq!(s.compare_set("cs", Some(b"one"), b"two").unwrap(), b"two");
    assert_eq!(s.try_get("cs").unwrap().as_deref(), Some(&b"two"[..]));
    // Right expectation, same value: unchanged, value returned.
    assert_eq!(s.compare_set("cs", Some(b"two"), b"two").unwrap(), b"two");
    // Absent key, expected present: nothing stored, empty value returned.
    assert_eq!(s.compare_set("cs-absent", Some(b"x"), b"y").unwrap(), b"");
    assert_eq!(s.try_get("cs-absent").unwrap(), None);
    assert_eq!(s.compare_set("cs-absent", Some(b"x"), b"x").unwrap(), b"");
    assert_eq!(s.try_get("cs-absent").unwrap(), None);
    s.delete("cs").unwrap();
}

/// Runs `f(rank)` on `world` threads and returns their results in rank order.
pub fn on_threads<R: Send + 'static>(
    world: usize,
    f: impl Fn(usize) -> R + Send + Sync + 'static,
) -> Vec<R> {
    let f = std::sync::Arc::new(f);
    let hs: Vec<_> = (0..world)
        .map(|r| {
            let f = f.clone();
            std::thread::spawn(move || f(r))
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}

/// A small rendezvous over `store` for `rank` of `world`: every rank
/// publishes its address-like value, waits for all, checks them, and counts
/// itself in; returns the gathered values.
pub fn rendezvous(store: &dyn Store, rank: usize, world: usize, tag: &str) -> Vec<String> {
    store
        .set(
            &format!("{tag}/addr/{rank}"),
            format!("rank-{rank}").as_bytes(),
        )
        .unwrap();
    let keys: Vec<String> = (0..world).map(|r| format!("{tag}/addr/{r}")).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    store.wait(&refs, Duration::from_secs(60)).unwrap();
    let all: Vec<String> = keys
        .iter()
        .map(|k| String::from_utf8(store.get(k, T).unwrap()).unwrap())
        .collect();
    store.add(&format!("{tag}/joined"), 1).unwrap();
    all
}
