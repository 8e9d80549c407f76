//! Key-value stores used for rendezvous and the control plane.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{CommError, Result};

/// A shared key-value store (TCP, file or in-memory), as in torch.distributed.
///
/// Every blocking call takes a deadline. Values are opaque bytes; counters
/// created by [`Store::add`] hold the decimal text of an `i64`, as in torch.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Sets `key` to `value`, replacing any old value, and wakes waiters.
    fn set(&self, key: &str, value: &[u8]) -> Result<()>;

    /// Returns the value of `key`, blocking until it exists. After `timeout`
    /// it fails with [`CommError::Timeout`] naming the key.
    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>>;

    /// The value of `key` if present, without blocking.
    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>>;

    /// Atomically adds `delta` to the counter at `key` (created at 0) and
    /// returns the new value.
    fn add(&self, key: &str, delta: i64) -> Result<i64>;

    /// Blocks until every key exists; the Timeout names those still missing.
    fn wait(&self, keys: &[&str], timeout: Duration) -> Result<()>;

    /// Removes `key`; returns whether it existed.
    fn delete(&self, key: &str) -> Result<bool>;

    /// Atomically sets `key` to `desired` if its current value is `expected`
    /// (`None`: the key is absent). Returns the value stored afterwards.
    fn compare_set(&self, key: &str, expected: Option<&[u8]>, desired: &[u8]) -> Result<Vec<u8>>;

    /// Number of keys.
    fn num_keys(&self) -> Result<usize>;
}

impl<S: Store + ?Sized> Store for Arc<S> {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        (**self).set(key, value)
    }
    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        (**self).get(key, timeout)
    }
    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        (**self).try_get(key)
    }
    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        (**self).add(key, delta)
    }
    fn wait(&self, keys: &[&str], timeout: Duration) -> Result<()> {
        (**self).wait(keys, timeout)
    }
    fn delete(&self, key: &str) -> Result<bool> {
        (**self).delete(key)
    }
    fn compare_set(&self, key: &str, expected: Option<&[u8]>, desired: &[u8]) -> Result<Vec<u8>> {
        (**self).compare_set(key, expected, desired)
    }
    fn num_keys(&self) -> Result<usize> {
        (**self).num_keys()
    }
}

/// A point in time by which a blocking operation must finish.
///
/// ```
/// use comm_core::Deadline;
/// use std::time::Duration;
/// let d = Deadline::after(Duration::from_secs(5));
/// assert!(!d.expired());
/// assert!(d.remaining() <= Duration::from_secs(5));
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    start: Instant,
    end: Instant,
}

impl Deadline {
    /// `timeout` from now.
    pub fn after(timeout: Duration) -> Self {
        let start = Instant::now();
        Deadline {
            start,
            end: start
                .checked_add(timeout)
                .unwrap_or(start + Duration::from_secs(86_400 * 365)),
        }
    }
    /// True once the deadline has passed.
    pub fn expired(&self) -> bool {
        Instant::now() >= self.end
    }
    /// Time left (zero once expired).
    pub fn remaining(&self) -> Duration {
        self.end.saturating_duration_since(Instant::now())
    }
    /// Time since the deadline was set.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
    /// The instant it expires.
    pub fn instant(&self) -> Instant {
        self.end
    }
    /// `Err(Timeout)` naming `operation` and `missing` once expired, `Ok` before.
    pub fn check(
        &self,
        operation: impl FnOnce() -> String,
        missing: impl FnOnce() -> Vec<String>,
    ) -> Result<()> {
        if self.expired() {
            Err(CommError::timeout(operation(), self.elapsed(), missing()))
        } else {
            Ok(())
        }
    }
}

/// A view of another store in which every key `k` is stored as `"{prefix}/{k}"`.
///
/// Groups built over one store use distinct prefixes so that their keys never
/// collide. Timeout errors name keys without the prefix, as the caller wrote
/// them. [`Store::num_keys`] counts every key of the underlying store (as in
/// torch.distributed), not only those under the prefix.
#[derive(Debug, Clone)]
pub struct PrefixStore {
    prefix: String,
    inner: Arc<dyn Store>,
}

impl PrefixStore {
    /// Wraps `inner` so that every key lives under `prefix`.
    pub fn new(prefix: impl Into<String>, inner: Arc<dyn Store>) -> Self {
        PrefixStore {
            prefix: prefix.into(),
            inner,
        }
    }

    /// The prefix (without the trailing `/`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The wrapped store.
    pub fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }

    fn key(&self, key: &str) -> String {
        format!("{}/{}", self.prefix, key)
    }

    /// Strips the prefix back off the keys a timeout names.
    fn unprefix(&self, e: CommError) -> CommError {
        match e {
            CommError::Timeout {
                operation,
                waited,
                missing,
                keys,
                note,
            } => {
                let p = format!("{}/", self.prefix);
                CommError::Timeout {
                    operation: format!("{operation} (prefix `{}`)", self.prefix),
                    waited,
                    missing,
                    keys: keys
                        .into_iter()
                        .map(|k| k.strip_prefix(&p).map(str::to_string).unwrap_or(k))
                        .collect(),
                    note,
                }
            }
            other => other,
        }
    }
}

impl Store for PrefixStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.inner.set(&self.key(key), value)
    }
    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        self.inner
            .get(&self.key(key), timeout)
            .map_err(|e| self.unprefix(e))
    }
    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.inner.try_get(&self.key(key))
    }
    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        self.inner.add(&self.key(key), delta)
    }
    fn wait(&self, keys: &[&str], timeout: Duration) -> Result<()> {
        let full: Vec<String> = keys.iter().map(|k| self.key(k)).collect();
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        self.inner
            .wait(&refs, timeout)
            .map_err(|e| self.unprefix(e))
    }
    fn delete(&self, key: &str) -> Result<bool> {
        self.inner.delete(&self.key(key))
    }
    fn compare_set(&self, key: &str, expected: Option<&[u8]>, desired: &[u8]) -> Result<Vec<u8>> {
        self.inner.compare_set(&self.key(key), expected, desired)
    }
    fn num_keys(&self) -> Result<usize> {
        self.inner.num_keys()
    }
}
