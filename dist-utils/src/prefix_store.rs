//! Namespacing of a shared store.

use std::sync::Arc;
use std::time::Duration;

use comm_core::{CommError, Result, Store};

/// A view of another store in which every key `k` is stored as `"{prefix}/{k}"`.
///
/// Groups built over one store use distinct prefixes so that their keys never
/// collide. Timeout errors name keys without the prefix, as the caller wrote
/// them. [`Store::num_keys`] counts every key of the underlying store (as in
/// torch.distributed), not only those under the prefix.
///
/// ```
/// use comm_core::Store;
/// use dist_utils::{HashStore, PrefixStore};
/// use std::sync::Arc;
/// let base = Arc::new(HashStore::new());
/// let a = PrefixStore::new("tp:0", base.clone());
/// a.set("k", b"v").unwrap();
/// assert_eq!(base.try_get("tp:0/k").unwrap().as_deref(), Some(&b"v"[..]));
/// ```
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
            } => {
                let p = format!("{}/", self.prefix);
                CommError::Timeout {
                    operation: format!("{operation} (prefix `{}`)", self.prefix),
                    waited,
                    missing: missing
                        .into_iter()
                        .map(|k| k.strip_prefix(&p).map(str::to_string).unwrap_or(k))
                        .collect(),
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
