//! [`C10dStore`]: a client of PyTorch's c10d TCPStore protocol behind our
//! [`Store`] trait.

use std::fmt;
use std::io::Write;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use comm_core::{CommError, Result, Store};

use super::server::C10dServer;
use super::wire::{
    read_bytes, read_i64, read_u8, Query, MAX_VALUE_LEN, NOT_READY, READY, STOP_WAITING,
    VALIDATION_MAGIC, WAIT_CANCELED,
};
use crate::pool::{connect_retrying, open_conn, request_error, Pool};
use crate::tcp_store::loopback_if_unspecified;

/// What error messages call this store.
const NAME: &str = "c10d store";
/// PyTorch's client puts this before every key; so do we, so that keys
/// written by Python ranks and by ours are the same keys.
const KEY_PREFIX: &str = "/";

struct Inner {
    addrs: Vec<SocketAddr>,
    timeout: Duration,
    pool: Pool,
    /// The server, when this client hosts it ([`C10dStore::serve`]); dropped last.
    server: Option<C10dServer>,
}

/// A client of a c10d TCPStore: a real `torch.distributed.TCPStore` (for
/// example the one torchrun's agent hosts on `MASTER_PORT`) or our
/// [`C10dServer`]. `Clone` shares its connection pool.
///
/// The protocol has no secret: anyone who reaches the port can read and
/// write keys, as with PyTorch itself. Where both ends are ours, prefer
/// [`crate::TcpStore`], which authenticates every connection.
///
/// Keys are sent with PyTorch's `/` prefix, so `set("k")` here and
/// `store.set("k", ...)` in Python name the same key. Differences from our
/// other stores, inherent in the protocol: [`Store::num_keys`] counts every
/// key of the server (PyTorch's own included); `compare_set` with
/// `expected: Some(b"")` behaves like `None` on an absent key; `add` on a
/// key that does not hold a counter makes the server close the connection.
///
/// ```
/// use comm_core::Store;
/// use dist_utils::c10d::{C10dServer, C10dStore};
/// use std::time::Duration;
/// let server = C10dServer::bind("127.0.0.1:0").unwrap();
/// let store = C10dStore::connect(server.local_addr(), Duration::from_secs(5)).unwrap();
/// store.set("k", b"v").unwrap();
/// assert_eq!(store.get("k", Duration::from_secs(1)).unwrap(), b"v");
/// assert!(store.check(&["k"]).unwrap());
/// ```
#[derive(Clone)]
pub struct C10dStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for C10dStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("C10dStore")
            .field("server", &self.inner.addrs)
            .field("timeout", &self.inner.timeout)
            .field("hosts_server", &self.inner.server.is_some())
            .finish_non_exhaustive()
    }
}

/// Validates a new connection: `VALIDATE` + magic, then a `CHECK` of no
/// keys whose `READY` proves a c10d server is there and accepted us (it
/// works with every PyTorch version, unlike `PING`).
fn validate(s: &mut TcpStream) -> Result<()> {
    let mut q = Vec::with_capacity(16);
    Query::Validate(VALIDATION_MAGIC).encode(&mut q);
    Query::Check(Vec::new()).encode(&mut q);
    s.write_all(&q)
        .map_err(|e| CommError::io("sending the c10d validation", e))?;
    match read_u8(s, "validation")? {
        READY => Ok(()),
        other => Err(CommError::Protocol(format!(
            "the server answered the c10d validation with {other}; is it a c10d TCPStore?"
        ))),
    }
}

fn prefixed(key: &str) -> String {
    format!("{KEY_PREFIX}{key}")
}

impl C10dStore {
    /// Connects to the c10d store at `addr`, retrying (exponential backoff
    /// capped at 50 ms) while nothing listens yet, until `timeout`. `timeout`
    /// also bounds every later non-blocking request.
    pub fn connect(addr: impl ToSocketAddrs + fmt::Debug, timeout: Duration) -> Result<Self> {
        Self::connect_inner(addr, timeout, None)
    }

    /// Starts a [`C10dServer`] on `bind` and connects to it. The server lives
    /// as long as this store or any clone of it.
    pub fn serve(bind: impl ToSocketAddrs + fmt::Debug, timeout: Duration) -> Result<Self> {
        let server = C10dServer::bind(bind)?;
        Self::connect_inner(
            loopback_if_unspecified(server.local_addr()),
            timeout,
            Some(server),
        )
    }

    fn connect_inner(
        addr: impl ToSocketAddrs + fmt::Debug,
        timeout: Duration,
        server: Option<C10dServer>,
    ) -> Result<Self> {
        let (addrs, first) = connect_retrying(&addr, timeout, NAME, &validate)?;
        Ok(C10dStore {
            inner: Arc::new(Inner {
                addrs,
                timeout,
                pool: Pool::new(first),
                server,
            }),
        })
    }

    /// The server address this client connects to.
    pub fn server_addr(&self) -> SocketAddr {
        self.inner.addrs[0]
    }

    /// The timeout given at connection.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// The server this client hosts, if it was made by [`C10dStore::serve`].
    pub fn server(&self) -> Option<&C10dServer> {
        self.inner.server.as_ref()
    }

    /// True when every key exists (PyTorch's `check`), without blocking.
    pub fn check(&self, keys: &[&str]) -> Result<bool> {
        let q = Query::Check(keys.iter().map(|k| prefixed(k)).collect());
        self.request("check", &q, |c| check_reply(read_u8(c, "check")?))
    }

    fn checkout(&self) -> Result<TcpStream> {
        self.inner.pool.checkout(
            || {
                open_conn(
                    &self.inner.addrs,
                    self.inner.timeout.min(Duration::from_secs(30)),
                    &validate,
                )
            },
            NAME,
            self.server_addr(),
        )
    }

    /// Sends `queries` (pipelined in one write) and reads the replies with
    /// `reply`, all within the client's timeout.
    fn request_many<T>(
        &self,
        what: &str,
        queries: &[&Query],
        reply: impl FnOnce(&mut TcpStream) -> Result<T>,
    ) -> Result<T> {
        let mut conn = self.checkout()?;
        let t = self.inner.timeout.max(Duration::from_millis(1));
        let res = (|| {
            conn.set_read_timeout(Some(t))?;
            conn.set_write_timeout(Some(t))?;
            let mut bytes = Vec::new();
            for q in queries {
                q.encode(&mut bytes);
            }
            conn.write_all(&bytes)
                .map_err(|e| CommError::io("sending a query", e))?;
            reply(&mut conn)
        })();
        match res {
            Ok(v) => {
                self.inner.pool.checkin(conn);
                Ok(v)
            }
            Err(e) => Err(request_error(e, what, NAME, self.server_addr(), t)),
        }
    }

    fn request<T>(
        &self,
        what: &str,
        q: &Query,
        reply: impl FnOnce(&mut TcpStream) -> Result<T>,
    ) -> Result<T> {
        self.request_many(what, &[q], reply)
    }

    /// `WAIT` for `keys` (unprefixed) until `timeout`; on expiry cancels the
    /// wait as the protocol requires and names the keys still missing.
    fn wait_for(&self, keys: &[&str], timeout: Duration, what: &str) -> Result<()> {
        let started = Instant::now();
        let mut conn = self.checkout()?;
        let grace = self.inner.timeout.max(Duration::from_millis(1));
        let res = (|| -> Result<bool> {
            conn.set_write_timeout(Some(grace))?;
            conn.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
            let mut bytes = Vec::new();
            Query::Wait(keys.iter().map(|k| prefixed(k)).collect()).encode(&mut bytes);
            conn.write_all(&bytes)
                .map_err(|e| CommError::io("sending a wait", e))?;
            match read_u8(&mut conn, what) {
                Ok(STOP_WAITING) => return Ok(true),
                Ok(other) => {
                    return Err(CommError::Protocol(format!(
                        "unexpected c10d reply {other} to {what}"
                    )))
                }
                Err(CommError::Io { source, .. })
                    if matches!(
                        source.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e),
            }
            // Deadline passed: cancel. The keys may have arrived meanwhile,
            // in which case STOP_WAITING comes before WAIT_CANCELED.
            conn.set_read_timeout(Some(grace))?;
            conn.write_all(&[super::wire::cmd::CANCEL_WAIT])
                .map_err(|e| CommError::io("cancelling a wait", e))?;
            match read_u8(&mut conn, what)? {
                WAIT_CANCELED => Ok(false),
                STOP_WAITING => match read_u8(&mut conn, what)? {
                    WAIT_CANCELED => Ok(true),
                    other => Err(CommError::Protocol(format!(
                        "unexpected c10d reply {other} after cancelling {what}"
                    ))),
                },
                other => Err(CommError::Protocol(format!(
                    "unexpected c10d reply {other} after cancelling {what}"
                ))),
            }
        })();
        match res {
            Ok(true) => {
                self.inner.pool.checkin(conn);
                Ok(())
            }
            Ok(false) => {
                self.inner.pool.checkin(conn);
                let mut missing = Vec::new();
                for k in keys {
                    if !self.check(&[k])? {
                        missing.push(k.to_string());
                    }
                }
                if missing.is_empty() {
                    // They appeared between the cancellation and the check.
                    return Ok(());
                }
                Err(CommError::timeout(
                    format!("c10d store {what}"),
                    started.elapsed(),
                    missing,
                ))
            }
            Err(e) => Err(request_error(e, what, NAME, self.server_addr(), grace)),
        }
    }
}

fn check_reply(b: u8) -> Result<bool> {
    match b {
        READY => Ok(true),
        NOT_READY => Ok(false),
        other => Err(CommError::Protocol(format!(
            "unexpected c10d reply {other} to check"
        ))),
    }
}

impl Store for C10dStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        // SET has no reply: a CHECK of the key right behind it on the same
        // connection is the acknowledgement, so a later request of this
        // process (on any connection) sees the value.
        let k = prefixed(key);
        let set = Query::Set {
            key: k.clone(),
            value: value.to_vec(),
        };
        let check = Query::Check(vec![k]);
        self.request_many(&format!("set `{key}`"), &[&set, &check], |c| {
            check_reply(read_u8(c, "set")?).map(|_| ())
        })
    }

    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        self.wait_for(&[key], timeout, &format!("get `{key}`"))?;
        self.request(&format!("get `{key}`"), &Query::Get(prefixed(key)), |c| {
            read_bytes(c, MAX_VALUE_LEN, "get")
        })
    }

    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        // CHECK first: PyTorch's classic server closes the connection on a
        // GET of an absent key, so GET only what exists.
        if !self.check(&[key])? {
            return Ok(None);
        }
        self.request(
            &format!("try_get `{key}`"),
            &Query::Get(prefixed(key)),
            |c| read_bytes(c, MAX_VALUE_LEN, "try_get").map(Some),
        )
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let q = Query::Add {
            key: prefixed(key),
            delta,
        };
        self.request(&format!("add `{key}`"), &q, |c| read_i64(c, "add"))
    }

    fn wait(&self, keys: &[&str], timeout: Duration) -> Result<()> {
        self.wait_for(keys, timeout, &format!("wait for {} key(s)", keys.len()))
    }

    fn delete(&self, key: &str) -> Result<bool> {
        self.request(
            &format!("delete `{key}`"),
            &Query::Delete(prefixed(key)),
            |c| Ok(read_i64(c, "delete")? > 0),
        )
    }

    fn compare_set(&self, key: &str, expected: Option<&[u8]>, desired: &[u8]) -> Result<Vec<u8>> {
        let expected = expected.unwrap_or_default();
        let q = Query::CompareSet {
            key: prefixed(key),
            expected: expected.to_vec(),
            desired: desired.to_vec(),
        };
        let v = self.request(&format!("compare_set `{key}`"), &q, |c| {
            read_bytes(c, MAX_VALUE_LEN, "compare_set")
        })?;
        // A c10d server answers an absent key with the expected value. A
        // present key answers either the desired value (swapped) or its own
        // (kept), so `expected` back means "absent" unless the key may also
        // hold exactly `expected` (desired == expected): then ask.
        if !expected.is_empty() && v == expected && (desired != expected || !self.check(&[key])?) {
            return Ok(Vec::new());
        }
        Ok(v)
    }

    fn num_keys(&self) -> Result<usize> {
        self.request("num_keys", &Query::NumKeys, |c| {
            Ok(usize::try_from(read_i64(c, "num_keys")?).unwrap_or(0))
        })
    }
}
