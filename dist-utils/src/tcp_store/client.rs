//! [`TcpStore`]: the client of a [`crate::TcpStoreServer`].

use std::fmt;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use comm_core::{CommError, Result, Store};

use super::proto::{client_handshake, millis, Request, Response, MAX_FRAME_LEN};
use super::server::TcpStoreServer;
use crate::codec::{read_msg, write_msg};
use crate::pool::{connect_retrying, open_conn, request_error, Pool};

/// Extra time a client waits for the reply of a blocking request beyond its deadline.
const REPLY_GRACE: Duration = Duration::from_secs(5);
/// What error messages call this store.
const NAME: &str = "TCP store";

struct ClientInner {
    addrs: Vec<SocketAddr>,
    secret: Vec<u8>,
    timeout: Duration,
    pool: Pool,
    /// The server, when this client hosts it ([`TcpStore::serve`]); dropped last.
    server: Option<TcpStoreServer>,
}

/// A client of a [`TcpStoreServer`]; `Clone` shares its connection pool.
///
/// Every connection opens with a mutual challenge–response handshake over
/// the job secret (see [`super::client_handshake`]): the secret never
/// crosses the wire and a recorded handshake cannot be replayed. `timeout`
/// bounds connecting and every non-blocking request; `get` and `wait` use
/// the deadline they are given (the server parks them until the keys exist
/// or the deadline passes).
#[derive(Clone)]
pub struct TcpStore {
    inner: Arc<ClientInner>,
}

impl fmt::Debug for TcpStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpStore")
            .field("server", &self.inner.addrs)
            .field("timeout", &self.inner.timeout)
            .field("hosts_server", &self.inner.server.is_some())
            .finish_non_exhaustive()
    }
}

impl TcpStore {
    /// Connects to the server at `addr` with the job `secret`, retrying
    /// (exponential backoff capped at 50 ms) while the server is not up yet,
    /// until `timeout` has passed. `timeout` also bounds every later
    /// non-blocking request.
    ///
    /// A server that refuses the handshake (wrong secret, other version), or
    /// cannot prove it knows the secret, gives [`CommError::Protocol`] at
    /// once, without retrying.
    pub fn connect(
        addr: impl ToSocketAddrs + fmt::Debug,
        secret: impl AsRef<[u8]>,
        timeout: Duration,
    ) -> Result<Self> {
        Self::connect_inner(addr, secret.as_ref(), timeout, None)
    }

    /// Starts a server on `bind` and connects to it: the usual call of rank 0.
    /// The server lives as long as this store or any clone of it.
    pub fn serve(
        bind: impl ToSocketAddrs + fmt::Debug,
        secret: impl AsRef<[u8]>,
        timeout: Duration,
    ) -> Result<Self> {
        let server = TcpStoreServer::bind(bind, secret.as_ref())?;
        Self::connect_inner(
            server.connect_addr(),
            secret.as_ref(),
            timeout,
            Some(server),
        )
    }

    fn connect_inner(
        addr: impl ToSocketAddrs + fmt::Debug,
        secret: &[u8],
        timeout: Duration,
        server: Option<TcpStoreServer>,
    ) -> Result<Self> {
        let hs = |s: &mut TcpStream| client_handshake(s, secret);
        let (addrs, first) = connect_retrying(&addr, timeout, NAME, &hs)?;
        Ok(TcpStore {
            inner: Arc::new(ClientInner {
                addrs,
                secret: secret.to_vec(),
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

    /// The server this client hosts, if it was made by [`TcpStore::serve`].
    pub fn server(&self) -> Option<&TcpStoreServer> {
        self.inner.server.as_ref()
    }

    fn checkout(&self) -> Result<TcpStream> {
        let secret = &self.inner.secret;
        let hs = |s: &mut TcpStream| client_handshake(s, secret);
        self.inner.pool.checkout(
            || {
                open_conn(
                    &self.inner.addrs,
                    self.inner.timeout.min(Duration::from_secs(30)),
                    &hs,
                )
            },
            NAME,
            self.server_addr(),
        )
    }

    /// Sends one request and reads its response. `wait` is the server-side
    /// blocking time of get/wait requests.
    fn call(
        &self,
        req: &Request,
        wait: Option<Duration>,
        what: impl Fn() -> String,
    ) -> Result<Response> {
        let conn = self.checkout()?;
        let reply_timeout = match wait {
            Some(w) => w.saturating_add(REPLY_GRACE),
            None => self.inner.timeout,
        }
        .max(Duration::from_millis(1));
        let res = (|| {
            conn.set_read_timeout(Some(reply_timeout))?;
            conn.set_write_timeout(Some(self.inner.timeout.max(Duration::from_millis(1))))?;
            let mut rw = &conn;
            write_msg(&mut rw, req)?;
            read_msg::<Response>(&mut rw, MAX_FRAME_LEN)
        })();
        match res {
            Ok(Response::ShuttingDown) => Err(CommError::Aborted(format!(
                "{}: the TCP store server at {} is shutting down",
                what(),
                self.server_addr()
            ))),
            Ok(r) => {
                self.inner.pool.checkin(conn);
                Ok(r)
            }
            Err(e) => Err(request_error(
                e,
                &what(),
                NAME,
                self.server_addr(),
                reply_timeout,
            )),
        }
    }
}

fn unexpected(what: &str, r: Response) -> CommError {
    CommError::Protocol(format!("unexpected TCP store response to {what}: {r:?}"))
}

fn common(what: &str, r: Response) -> CommError {
    match r {
        Response::Timeout {
            operation,
            waited_ms,
            missing,
        } => CommError::timeout(operation, Duration::from_millis(waited_ms), missing),
        Response::Invalid(m) => CommError::InvalidArgument(m),
        other => unexpected(what, other),
    }
}

impl Store for TcpStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        let req = Request::Set {
            key: key.into(),
            value: value.to_vec(),
        };
        match self.call(&req, None, || format!("set `{key}`"))? {
            Response::Done => Ok(()),
            r => Err(common("set", r)),
        }
    }

    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        let req = Request::Get {
            key: key.into(),
            timeout_ms: millis(timeout),
        };
        match self.call(&req, Some(timeout), || format!("get `{key}`"))? {
            Response::Value(v) => Ok(v),
            r => Err(common("get", r)),
        }
    }

    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        match self.call(&Request::TryGet { key: key.into() }, None, || {
            format!("try_get `{key}`")
        })? {
            Response::MaybeValue(v) => Ok(v),
            r => Err(common("try_get", r)),
        }
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let req = Request::Add {
            key: key.into(),
            delta,
        };
        match self.call(&req, None, || format!("add `{key}`"))? {
            Response::Counter(v) => Ok(v),
            r => Err(common("add", r)),
        }
    }

    fn wait(&self, keys: &[&str], timeout: Duration) -> Result<()> {
        let req = Request::Wait {
            keys: keys.iter().map(|k| k.to_string()).collect(),
            timeout_ms: millis(timeout),
        };
        match self.call(&req, Some(timeout), || {
            format!("wait for {} key(s)", keys.len())
        })? {
            Response::Done => Ok(()),
            r => Err(common("wait", r)),
        }
    }

    fn delete(&self, key: &str) -> Result<bool> {
        match self.call(&Request::Delete { key: key.into() }, None, || {
            format!("delete `{key}`")
        })? {
            Response::Deleted(b) => Ok(b),
            r => Err(common("delete", r)),
        }
    }

    fn compare_set(&self, key: &str, expected: Option<&[u8]>, desired: &[u8]) -> Result<Vec<u8>> {
        let req = Request::CompareSet {
            key: key.into(),
            expected: expected.map(|e| e.to_vec()),
            desired: desired.to_vec(),
        };
        match self.call(&req, None, || format!("compare_set `{key}`"))? {
            Response::Value(v) => Ok(v),
            r => Err(common("compare_set", r)),
        }
    }

    fn num_keys(&self) -> Result<usize> {
        match self.call(&Request::NumKeys, None, || "num_keys".to_string())? {
            Response::Count(n) => Ok(usize::try_from(n).unwrap_or(usize::MAX)),
            r => Err(common("num_keys", r)),
        }
    }
}
