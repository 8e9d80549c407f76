//! A store kept in one file, for hosts that share a file system but have no
//! free port (or no network between ranks before the job starts).
//!
//! # Format and locking
//!
//! The file holds a 8-byte magic `DSTFS\0\0\x01` followed by the postcard
//! encoding of a sorted map from key to value bytes; an empty file is an
//! empty store. Every operation opens the file, takes a `flock` (shared to
//! read, exclusive to modify), reads it, writes it back in place if it
//! changed, and closes it. The lock is taken per open file description, so
//! threads of one process and separate processes exclude each other alike.
//! Blocking `get` / `wait` poll the file with a short backoff (1 ms doubling
//! up to 10 ms) until the keys exist or the deadline passes.
//!
//! Networked file systems must support `flock` (NFSv4 and Lustre do; check
//! yours). The file is not removed when a store is dropped: other processes
//! may still use it. Remove it when the job ends.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use comm_core::{CommError, Deadline, Result, Store};
use rustix::fs::{flock, FlockOperation};

use crate::hash_store::parse_counter;

const MAGIC: &[u8; 8] = b"DSTFS\0\0\x01";
const MAX_BACKOFF: Duration = Duration::from_millis(10);

type Map = BTreeMap<String, Vec<u8>>;

/// A [`Store`] in a file on a (possibly shared) file system; safe for many
/// threads and processes at once. See the [module documentation](self).
///
/// ```
/// use comm_core::Store;
/// use dist_utils::FileStore;
/// use std::time::Duration;
/// let dir = tempfile::tempdir().unwrap();
/// let s = FileStore::new(dir.path().join("store")).unwrap();
/// s.set("k", b"v").unwrap();
/// assert_eq!(s.get("k", Duration::from_secs(1)).unwrap(), b"v");
/// ```
#[derive(Debug, Clone)]
pub struct FileStore {
    path: PathBuf,
}

impl FileStore {
    /// Opens the store in `path`, creating the file (mode 0600) if needed.
    /// The parent directory must exist.
    pub fn new(path: impl Into<PathBuf>) -> Result<Self> {
        let s = FileStore { path: path.into() };
        s.open()?;
        Ok(s)
    }

    /// The file holding the store.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn open(&self) -> Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&self.path)
            .map_err(|e| {
                CommError::io(format!("opening the file store {}", self.path.display()), e)
            })
    }

    /// Runs `f` on the map under the file lock; writes the map back when `f`
    /// reports a change.
    fn locked<R>(
        &self,
        exclusive: bool,
        f: impl FnOnce(&mut Map) -> Result<(R, bool)>,
    ) -> Result<R> {
        let mut file = self.open()?;
        let op = if exclusive {
            FlockOperation::LockExclusive
        } else {
            FlockOperation::LockShared
        };
        flock(&file, op).map_err(|e| {
            CommError::io(
                format!(
                    "locking the file store {} (does the file system support flock?)",
                    self.path.display()
                ),
                e.into(),
            )
        })?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(|e| {
            CommError::io(format!("reading the file store {}", self.path.display()), e)
        })?;
        let mut map = self.parse(&bytes)?;
        let (r, dirty) = f(&mut map)?;
        if dirty {
            debug_assert!(exclusive, "only an exclusive lock may modify the store");
            let mut out = MAGIC.to_vec();
            out.extend_from_slice(&crate::codec::encode(&map)?);
            (|| {
                file.write_all_at(&out, 0)?;
                file.set_len(out.len() as u64)?;
                file.flush()
            })()
            .map_err(|e| {
                CommError::io(format!("writing the file store {}", self.path.display()), e)
            })?;
        }
        // Closing the file releases the lock.
        Ok(r)
    }

    fn parse(&self, bytes: &[u8]) -> Result<Map> {
        if bytes.is_empty() {
            return Ok(Map::new());
        }
        match bytes.strip_prefix(MAGIC) {
            Some(body) => crate::codec::decode(body).map_err(|e| {
                CommError::Protocol(format!("file store {} is corrupt: {e}", self.path.display()))
            }),
            None => Err(CommError::Protocol(format!(
                "{} is not a dist-utils file store (bad magic); was the path given to another program?",
                self.path.display()
            ))),
        }
    }

    /// Polls until `missing(map)` is empty or the deadline passes.
    fn poll(
        &self,
        timeout: Duration,
        op: impl Fn() -> String,
        missing: impl Fn(&Map) -> Vec<String>,
    ) -> Result<Map> {
        let deadline = Deadline::after(timeout);
        let mut backoff = Duration::from_millis(1);
        loop {
            let (map, m) = self.locked(false, |map| {
                let m = missing(map);
                Ok(((std::mem::take(map), m), false))
            })?;
            if m.is_empty() {
                return Ok(map);
            }
            if deadline.expired() {
                return Err(CommError::timeout(op(), deadline.elapsed(), m));
            }
            std::thread::sleep(backoff.min(deadline.remaining()));
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

impl Store for FileStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.locked(true, |m| {
            m.insert(key.to_string(), value.to_vec());
            Ok(((), true))
        })
    }

    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        let mut map = self.poll(
            timeout,
            || format!("file store get `{key}`"),
            |m| {
                if m.contains_key(key) {
                    vec![]
                } else {
                    vec![key.to_string()]
                }
            },
        )?;
        map.remove(key)
            .ok_or_else(|| CommError::State(format!("key `{key}` vanished")))
    }

    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.locked(false, |m| Ok((m.remove(key), false)))
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        self.locked(true, |m| {
            let cur = match m.get(key) {
                None => 0,
                Some(v) => parse_counter(key, v)?,
            };
            let new = cur.wrapping_add(delta);
            m.insert(key.to_string(), new.to_string().into_bytes());
            Ok((new, true))
        })
    }

    fn wait(&self, keys: &[&str], timeout: Duration) -> Result<()> {
        self.poll(
            timeout,
            || format!("file store wait for {} key(s)", keys.len()),
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
        self.locked(true, |m| {
            let existed = m.remove(key).is_some();
            Ok((existed, existed))
        })
    }

    fn compare_set(&self, key: &str, expected: Option<&[u8]>, desired: &[u8]) -> Result<Vec<u8>> {
        self.locked(true, |m| {
            let cur = m.get(key).map(|v| v.as_slice());
            if cur == expected {
                m.insert(key.to_string(), desired.to_vec());
                Ok((desired.to_vec(), true))
            } else {
                Ok((cur.map(|v| v.to_vec()).unwrap_or_default(), false))
            }
        })
    }

    fn num_keys(&self) -> Result<usize> {
        self.locked(false, |m| Ok((m.len(), false)))
    }
}
