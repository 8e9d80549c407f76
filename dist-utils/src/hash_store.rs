//! An in-process store for threads of one process (unit tests, single-host tools).

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use comm_core::{CommError, Deadline, Result, Store};

/// A [`Store`] held in memory and shared by `Arc` between threads.
///
/// ```
/// use comm_core::Store;
/// use dist_utils::HashStore;
/// use std::time::Duration;
/// let s = HashStore::new();
/// s.set("k", b"v").unwrap();
/// assert_eq!(s.get("k", Duration::from_secs(1)).unwrap(), b"v");
/// assert_eq!(s.add("n", 2).unwrap(), 2);
/// ```
#[derive(Debug, Default)]
pub struct HashStore {
    map: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
}

impl HashStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<MutexGuard<'_, HashMap<String, Vec<u8>>>> {
        self.map
            .lock()
            .map_err(|_| CommError::State("HashStore lock poisoned by a panicking thread".into()))
    }

    /// Blocks until `ready(map)` holds or the deadline passes; returns the guard.
    fn wait_until(
        &self,
        timeout: Duration,
        op: impl Fn() -> String,
        missing: impl Fn(&HashMap<String, Vec<u8>>) -> Vec<String>,
    ) -> Result<MutexGuard<'_, HashMap<String, Vec<u8>>>> {
        let deadline = Deadline::after(timeout);
        let mut g = self.lock()?;
        loop {
            let m = missing(&g);
            if m.is_empty() {
                return Ok(g);
            }
            if deadline.expired() {
                return Err(CommError::timeout(op(), deadline.elapsed(), m));
            }
            g = self
                .changed
                .wait_timeout(g, deadline.remaining())
                .map_err(|_| CommError::State("HashStore lock poisoned".into()))?
                .0;
        }
    }
}

impl Store for HashStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.lock()?.insert(key.to_string(), value.to_vec());
        self.changed.notify_all();
        Ok(())
    }

    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        let g = self.wait_until(
            timeout,
            || format!("store get `{key}`"),
            |m| {
                if m.contains_key(key) {
                    vec![]
                } else {
                    vec![key.to_string()]
                }
            },
        )?;
        g.get(key)
            .cloned()
            .ok_or_else(|| CommError::State(format!("key `{key}` vanished")))
    }

    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.lock()?.get(key).cloned())
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let mut g = self.lock()?;
        let cur = match g.get(key) {
            None => 0,
            Some(v) => parse_counter(key, v)?,
        };
        let new = cur.wrapping_add(delta);
        g.insert(key.to_string(), new.to_string().into_bytes());
        drop(g);
        self.changed.notify_all();
        Ok(new)
    }

    fn wait(&self, keys: &[&str], timeout: Duration) -> Result<()> {
        self.wait_until(
            timeout,
            || format!("store wait for {} key(s)", keys.len()),
            |m| {
                keys.iter()
                    .filter(|k| !m.contains_key(**k))
                    .map(|k| k.to_string())
                    .collect()
            },
        )
        .map(|_| ())
    }

    fn delete(&self, key: &str) -> Result<bool> {
        Ok(self.lock()?.remove(key).is_some())
    }

    fn compare_set(&self, key: &str, expected: Option<&[u8]>, desired: &[u8]) -> Result<Vec<u8>> {
        let mut g = self.lock()?;
        let cur = g.get(key).map(|v| v.as_slice());
        if cur == expected {
            g.insert(key.to_string(), desired.to_vec());
            drop(g);
            self.changed.notify_all();
            return Ok(desired.to_vec());
        }
        Ok(cur.map(|v| v.to_vec()).unwrap_or_default())
    }

    fn num_keys(&self) -> Result<usize> {
        Ok(self.lock()?.len())
    }
}

/// Parses a counter value written by `add` (decimal `i64` text).
pub fn parse_counter(key: &str, v: &[u8]) -> Result<i64> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .ok_or_else(|| {
            CommError::invalid(format!(
                "store key `{key}` holds a non-counter value; add() needs a decimal i64"
            ))
        })
}
