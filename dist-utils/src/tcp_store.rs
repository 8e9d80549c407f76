//! A key-value store served over TCP, for ranks on different hosts.
//!
//! [`TcpStoreServer`] holds the keys (usually started by rank 0, or run on
//! its own); every rank talks to it through a [`TcpStore`] client.
//!
//! # Protocol
//!
//! Every message is one frame of [`crate::codec`] (a `u64` little-endian
//! length, then a postcard value). A connection opens with a handshake: the
//! client sends `(TCP_STORE_MAGIC, TCP_STORE_VERSION, secret)` and the server
//! answers *accepted* or *refused* with a reason, then closes refused
//! connections. The secret is the per-job secret: it is compared in constant
//! time, so a process of another job (or a stranger on the port) is refused.
//! After the handshake the client sends one request and waits for its
//! response, again and again; the server blocks `get` and `wait` itself
//! until the keys exist or the client's deadline passes.
//!
//! # Connection model
//!
//! A [`TcpStore`] and all its clones share a small pool of connections. A
//! request takes an idle connection from the pool (or opens a new one),
//! runs, and puts it back. So every in-flight request has its own connection:
//! a `get` blocked in one thread never delays a `set` from another thread of
//! the same process. Up to [`MAX_IDLE_CONNECTIONS`] idle connections are
//! kept; a connection that saw any error is closed rather than reused.
//!
//! The server runs one thread per connection plus an accept thread. A client
//! that disconnects, even in the middle of a request, only ends its own
//! thread; a client that disappears while blocked in `get` is noticed within
//! about half a second. Dropping the server (or [`TcpStoreServer::shutdown`])
//! wakes every blocked request (its client sees [`CommError::Aborted`]),
//! closes every connection and joins every thread.

use std::collections::HashMap;
use std::fmt;
use std::io::ErrorKind;
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs,
};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use comm_core::{secrets_equal, CommError, Deadline, Result, Store};
use serde::{Deserialize, Serialize};

use crate::codec::{read_frame, read_msg, write_msg};
use crate::hash_store::parse_counter;

/// First field of the handshake, so that a stray client of another protocol is refused.
pub const TCP_STORE_MAGIC: u32 = 0x4453_5453; // "DSTS"
/// Protocol version; client and server must agree.
pub const TCP_STORE_VERSION: u32 = 1;
/// Largest request or response frame (and so the largest value) accepted: 1 GiB.
pub const MAX_FRAME_LEN: usize = 1 << 30;
/// Idle connections a [`TcpStore`] keeps for reuse.
pub const MAX_IDLE_CONNECTIONS: usize = 16;

/// The handshake must arrive this quickly after connecting.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest handshake frame the server reads from a not yet authenticated peer.
const HANDSHAKE_MAX_LEN: usize = 64 * 1024;
/// How often a server thread blocked in get/wait checks that its client is still there.
const LIVENESS_PERIOD: Duration = Duration::from_millis(500);
/// Extra time a client waits for the reply of a blocking request beyond its deadline.
const REPLY_GRACE: Duration = Duration::from_secs(5);
/// Cap of the exponential backoff between connection attempts.
const MAX_BACKOFF: Duration = Duration::from_millis(50);

#[derive(Serialize, Deserialize)]
struct Hello {
    magic: u32,
    version: u32,
    secret: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
enum HelloReply {
    Accepted,
    Refused(String),
}

#[derive(Serialize, Deserialize, Debug)]
enum Request {
    Set {
        key: String,
        value: Vec<u8>,
    },
    Get {
        key: String,
        timeout_ms: u64,
    },
    TryGet {
        key: String,
    },
    Add {
        key: String,
        delta: i64,
    },
    Wait {
        keys: Vec<String>,
        timeout_ms: u64,
    },
    Delete {
        key: String,
    },
    CompareSet {
        key: String,
        expected: Option<Vec<u8>>,
        desired: Vec<u8>,
    },
    NumKeys,
}

#[derive(Serialize, Deserialize, Debug)]
enum Response {
    Done,
    Value(Vec<u8>),
    MaybeValue(Option<Vec<u8>>),
    Counter(i64),
    Deleted(bool),
    Count(u64),
    Timeout {
        operation: String,
        waited_ms: u64,
        missing: Vec<String>,
    },
    Invalid(String),
    ShuttingDown,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------

struct State {
    map: HashMap<String, Vec<u8>>,
    shutting_down: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    secret: Vec<u8>,
    stopping: AtomicBool,
    /// Clones of open connections, so that shutdown can unblock their reads.
    conns: Mutex<HashMap<u64, TcpStream>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update of the map is a single insert/remove: a panic elsewhere
        // cannot leave it half-modified, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn conns(&self) -> MutexGuard<'_, HashMap<u64, TcpStream>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The server side of the TCP store: owns the keys, serves any number of
/// [`TcpStore`] clients that present the job secret.
///
/// ```
/// use comm_core::Store;
/// use dist_utils::{TcpStore, TcpStoreServer};
/// use std::time::Duration;
/// let server = TcpStoreServer::bind("127.0.0.1:0", b"job-secret").unwrap();
/// let store = TcpStore::connect(server.local_addr(), b"job-secret", Duration::from_secs(5)).unwrap();
/// store.set("k", b"v").unwrap();
/// assert_eq!(store.get("k", Duration::from_secs(1)).unwrap(), b"v");
/// ```
pub struct TcpStoreServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl fmt::Debug for TcpStoreServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpStoreServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl TcpStoreServer {
    /// Binds `addr` (port 0 picks a free port, see [`Self::local_addr`]) and
    /// starts serving clients that present `secret`.
    pub fn bind(addr: impl ToSocketAddrs + fmt::Debug, secret: impl AsRef<[u8]>) -> Result<Self> {
        let listener = TcpListener::bind(&addr)
            .map_err(|e| CommError::io(format!("binding the TCP store server to {addr:?}"), e))?;
        let local = listener
            .local_addr()
            .map_err(|e| CommError::io("reading the TCP store server's address", e))?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                map: HashMap::new(),
                shutting_down: false,
            }),
            changed: Condvar::new(),
            secret: secret.as_ref().to_vec(),
            stopping: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
        });
        let sh = shared.clone();
        let accept = std::thread::Builder::new()
            .name("tcp-store-accept".into())
            .spawn(move || accept_loop(listener, sh))
            .map_err(|e| CommError::io("spawning the TCP store accept thread", e))?;
        tracing::debug!(addr = %local, "TCP store server listening");
        Ok(TcpStoreServer {
            addr: local,
            shared,
            accept: Some(accept),
        })
    }

    /// The address the server listens on (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// An address a client on this host can connect to: the listen address,
    /// with an unspecified IP (`0.0.0.0`, `::`) replaced by loopback.
    pub fn connect_addr(&self) -> SocketAddr {
        let mut a = self.addr;
        if a.ip().is_unspecified() {
            a.set_ip(match a.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
        }
        a
    }

    /// Number of client connections currently open.
    pub fn num_connections(&self) -> usize {
        self.shared.conns().len()
    }

    /// Stops serving: wakes blocked requests, closes every connection and
    /// joins every server thread. Dropping the server does the same.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.lock().shutting_down = true;
        self.shared.changed.notify_all();
        // Wake the accept thread out of accept(2) with a connection of our own.
        let woke = TcpStream::connect_timeout(&self.connect_addr(), Duration::from_secs(2)).is_ok();
        if woke {
            let _ = accept.join();
        } else {
            tracing::warn!(addr = %self.addr, "could not wake the TCP store accept thread; leaving it detached");
        }
    }
}

impl Drop for TcpStoreServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut workers: Vec<JoinHandle<()>> = Vec::new();
    let next_id = AtomicU64::new(0);
    loop {
        let accepted = listener.accept();
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE, ECONNABORTED, ...: keep serving the clients we have.
                tracing::warn!(error = %e, "TCP store accept failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        match stream.try_clone() {
            Ok(c) => {
                shared.conns().insert(id, c);
            }
            Err(e) => {
                tracing::warn!(error = %e, "TCP store could not register a connection");
                continue;
            }
        }
        let sh = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("tcp-store-conn-{id}"))
            .spawn(move || {
                let peer = stream.peer_addr().ok();
                if let Err(e) = serve_conn(&stream, &sh) {
                    tracing::debug!(?peer, error = %e, "TCP store connection ended");
                }
                let _ = stream.shutdown(Shutdown::Both);
                sh.conns().remove(&id);
            });
        match spawned {
            Ok(h) => workers.push(h),
            Err(e) => {
                tracing::warn!(error = %e, "TCP store could not spawn a connection thread");
                if let Some(s) = shared.conns().remove(&id) {
                    let _ = s.shutdown(Shutdown::Both);
                }
            }
        }
        // Finished threads need no join; forget them so the list stays short.
        workers.retain(|h| !h.is_finished());
    }
    for s in shared.conns().values() {
        let _ = s.shutdown(Shutdown::Both);
    }
    for h in workers {
        let _ = h.join();
    }
}

fn serve_conn(stream: &TcpStream, shared: &Shared) -> Result<()> {
    let mut rw = stream;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let hello = read_frame(&mut rw, HANDSHAKE_MAX_LEN)?;
    let refusal = match crate::codec::decode::<Hello>(&hello) {
        Err(_) => Some("malformed handshake (not a dist-utils TCP store client?)".to_string()),
        Ok(h) if h.magic != TCP_STORE_MAGIC => Some("bad handshake magic (not a dist-utils TCP store client?)".to_string()),
        Ok(h) if h.version != TCP_STORE_VERSION => Some(format!(
            "protocol version {} is not the server's version {TCP_STORE_VERSION}; run the same build on every rank",
            h.version
        )),
        Ok(h) if !secrets_equal(&h.secret, &shared.secret) => Some(
            "wrong job secret; every rank of a job must use the same secret".to_string(),
        ),
        Ok(_) => None,
    };
    if let Some(reason) = refusal {
        let _ = write_msg(&mut rw, &HelloReply::Refused(reason.clone()));
        return Err(CommError::Protocol(format!("refused a client: {reason}")));
    }
    write_msg(&mut rw, &HelloReply::Accepted)?;
    stream.set_read_timeout(None)?;
    loop {
        let frame = read_frame(&mut rw, MAX_FRAME_LEN)?;
        let req: Request = crate::codec::decode(&frame)?;
        match handle(shared, stream, req) {
            Some(resp) => write_msg(&mut rw, &resp)?,
            None => return Ok(()), // the client went away while we waited for it
        }
    }
}

/// Runs one request. `None` when the client disconnected during a blocking wait.
fn handle(shared: &Shared, stream: &TcpStream, req: Request) -> Option<Response> {
    let resp = match req {
        Request::Set { key, value } => {
            let mut g = shared.lock();
            if g.shutting_down {
                return Some(Response::ShuttingDown);
            }
            g.map.insert(key, value);
            drop(g);
            shared.changed.notify_all();
            Response::Done
        }
        Request::Get { key, timeout_ms } => {
            let op = || format!("TCP store get `{key}`");
            let keys = std::slice::from_ref(&key);
            match block_until_present(shared, stream, keys, timeout_ms, op)? {
                Ok(g) => match g.map.get(&key) {
                    Some(v) => Response::Value(v.clone()),
                    None => Response::Invalid(format!("key `{key}` vanished")),
                },
                Err(r) => r,
            }
        }
        Request::TryGet { key } => Response::MaybeValue(shared.lock().map.get(&key).cloned()),
        Request::Add { key, delta } => {
            let mut g = shared.lock();
            let cur = match g.map.get(&key) {
                None => 0,
                Some(v) => match parse_counter(&key, v) {
                    Ok(c) => c,
                    Err(e) => return Some(Response::Invalid(e.to_string())),
                },
            };
            let new = cur.wrapping_add(delta);
            g.map.insert(key, new.to_string().into_bytes());
            drop(g);
            shared.changed.notify_all();
            Response::Counter(new)
        }
        Request::Wait { keys, timeout_ms } => {
            let op = || format!("TCP store wait for {} key(s)", keys.len());
            match block_until_present(shared, stream, &keys, timeout_ms, op)? {
                Ok(_) => Response::Done,
                Err(r) => r,
            }
        }
        Request::Delete { key } => Response::Deleted(shared.lock().map.remove(&key).is_some()),
        Request::CompareSet {
            key,
            expected,
            desired,
        } => {
            let mut g = shared.lock();
            let cur = g.map.get(&key);
            if cur.map(|v| v.as_slice()) == expected.as_deref() {
                g.map.insert(key, desired.clone());
                drop(g);
                shared.changed.notify_all();
                Response::Value(desired)
            } else {
                Response::Value(cur.cloned().unwrap_or_default())
            }
        }
        Request::NumKeys => Response::Count(shared.lock().map.len() as u64),
    };
    Some(resp)
}

/// Waits until every key exists. Outer `None`: the client is gone. Inner
/// `Err`: the response to send instead (timeout, shutdown).
fn block_until_present<'a>(
    shared: &'a Shared,
    stream: &TcpStream,
    keys: &[String],
    timeout_ms: u64,
    op: impl Fn() -> String,
) -> Option<std::result::Result<MutexGuard<'a, State>, Response>> {
    let deadline = Deadline::after(Duration::from_millis(timeout_ms));
    let mut next_probe = Instant::now() + LIVENESS_PERIOD;
    let mut g = shared.lock();
    loop {
        if g.shutting_down {
            return Some(Err(Response::ShuttingDown));
        }
        let missing: Vec<String> = keys
            .iter()
            .filter(|k| !g.map.contains_key(*k))
            .cloned()
            .collect();
        if missing.is_empty() {
            return Some(Ok(g));
        }
        if deadline.expired() {
            return Some(Err(Response::Timeout {
                operation: op(),
                waited_ms: millis(deadline.elapsed()),
                missing,
            }));
        }
        let now = Instant::now();
        if now >= next_probe {
            drop(g);
            if !client_alive(stream) {
                return None;
            }
            next_probe = Instant::now() + LIVENESS_PERIOD;
            g = shared.lock();
            continue;
        }
        let slice = deadline.remaining().min(next_probe - now);
        g = shared
            .changed
            .wait_timeout(g, slice)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// True unless the client closed its side (or the socket failed). A client
/// waits for its reply, so readable data here can only be an end of stream.
fn client_alive(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return false;
    }
    let r = stream.peek(&mut [0u8; 1]);
    let alive = match r {
        Ok(0) => false,
        Ok(_) => true,
        Err(e) => matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted),
    };
    stream.set_nonblocking(false).is_ok() && alive
}

// ---------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------

struct ClientInner {
    addrs: Vec<SocketAddr>,
    secret: Vec<u8>,
    timeout: Duration,
    idle: Mutex<Vec<TcpStream>>,
    /// The server, when this client hosts it ([`TcpStore::serve`]); dropped last.
    server: Option<TcpStoreServer>,
}

/// A client of a [`TcpStoreServer`]; `Clone` shares its connection pool.
///
/// See the [module documentation](self) for the connection model. `timeout`
/// bounds connecting and every non-blocking request; `get` and `wait` use
/// the deadline they are given.
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

enum OpenError {
    /// Worth retrying: nothing listens yet, a reset, a name not resolvable yet.
    Transient(String),
    /// The server answered and refused us.
    Refused(CommError),
}

impl TcpStore {
    /// Connects to the server at `addr` with the job `secret`, retrying
    /// (exponential backoff capped at 50 ms) while the server is not up yet,
    /// until `timeout` has passed. `timeout` also bounds every later
    /// non-blocking request.
    ///
    /// A server that refuses the handshake (wrong secret, other version)
    /// gives [`CommError::Protocol`] at once, without retrying.
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
        let deadline = Deadline::after(timeout);
        let mut backoff = Duration::from_millis(1);
        loop {
            let attempt = match addr.to_socket_addrs() {
                Ok(a) => {
                    let addrs: Vec<SocketAddr> = a.collect();
                    if addrs.is_empty() {
                        Err(OpenError::Transient(format!(
                            "{addr:?} resolved to no address"
                        )))
                    } else {
                        open_conn(&addrs, secret, deadline.remaining()).map(|c| (addrs, c))
                    }
                }
                Err(e) => Err(OpenError::Transient(format!("resolving {addr:?}: {e}"))),
            };
            match attempt {
                Ok((addrs, conn)) => {
                    return Ok(TcpStore {
                        inner: Arc::new(ClientInner {
                            addrs,
                            secret: secret.to_vec(),
                            timeout,
                            idle: Mutex::new(vec![conn]),
                            server,
                        }),
                    })
                }
                Err(OpenError::Refused(e)) => return Err(e),
                Err(OpenError::Transient(last)) => {
                    if deadline.expired() {
                        return Err(CommError::timeout(
                            format!("connect to the TCP store at {addr:?} (last error: {last}); is the server (usually rank 0) running and reachable?"),
                            deadline.elapsed(),
                            [format!("store server {addr:?}")],
                        ));
                    }
                    std::thread::sleep(backoff.min(deadline.remaining()));
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
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
        if let Some(c) = self
            .inner
            .idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
        {
            return Ok(c);
        }
        // The server was up when we first connected: one attempt, no retry loop,
        // so that a dead server is reported at once.
        match open_conn(&self.inner.addrs, &self.inner.secret, self.inner.timeout.min(Duration::from_secs(30))) {
            Ok(c) => Ok(c),
            Err(OpenError::Refused(e)) => Err(e),
            Err(OpenError::Transient(e)) => Err(CommError::io(
                format!(
                    "opening another connection to the TCP store at {}; has the server (usually rank 0) exited?",
                    self.server_addr()
                ),
                std::io::Error::other(e),
            )),
        }
    }

    fn checkin(&self, conn: TcpStream) {
        let mut idle = self.inner.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE_CONNECTIONS {
            idle.push(conn);
        }
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
                self.checkin(conn);
                Ok(r)
            }
            Err(CommError::Io { source, .. })
                if matches!(source.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
            {
                Err(CommError::timeout(
                    format!("{}: no reply from the TCP store at {} ", what(), self.server_addr()),
                    reply_timeout,
                    [format!("reply of store server {}", self.server_addr())],
                ))
            }
            Err(CommError::Io { context, source }) => Err(CommError::Io {
                context: format!(
                    "{} ({context}) with the TCP store at {}; has the server (usually rank 0) exited?",
                    what(),
                    self.server_addr()
                ),
                source,
            }),
            Err(e) => Err(e),
        }
    }
}

fn open_conn(
    addrs: &[SocketAddr],
    secret: &[u8],
    budget: Duration,
) -> std::result::Result<TcpStream, OpenError> {
    let budget = budget.clamp(Duration::from_millis(1), HANDSHAKE_TIMEOUT);
    let mut last = String::new();
    for addr in addrs {
        let stream = match TcpStream::connect_timeout(addr, budget) {
            Ok(s) => s,
            Err(e) => {
                last = format!("connecting to {addr}: {e}");
                continue;
            }
        };
        let hs = (|| -> Result<HelloReply> {
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(budget))?;
            stream.set_write_timeout(Some(budget))?;
            let mut rw = &stream;
            write_msg(
                &mut rw,
                &Hello {
                    magic: TCP_STORE_MAGIC,
                    version: TCP_STORE_VERSION,
                    secret: secret.to_vec(),
                },
            )?;
            read_msg::<HelloReply>(&mut rw, HANDSHAKE_MAX_LEN)
        })();
        match hs {
            Ok(HelloReply::Accepted) => return Ok(stream),
            Ok(HelloReply::Refused(reason)) => {
                return Err(OpenError::Refused(CommError::Protocol(format!(
                    "the TCP store at {addr} refused the connection: {reason}"
                ))))
            }
            Err(CommError::Codec(e)) => {
                return Err(OpenError::Refused(CommError::Protocol(format!(
                    "the server at {addr} answered the handshake with something unexpected ({e}); is it a dist-utils TCP store?"
                ))))
            }
            Err(e) => last = format!("handshake with {addr}: {e}"),
        }
    }
    Err(OpenError::Transient(last))
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
            Response::Count(n) => Ok(n as usize),
            r => Err(common("num_keys", r)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_compare() {
        assert!(secrets_equal(b"abc", b"abc"));
        assert!(secrets_equal(b"", b""));
        assert!(!secrets_equal(b"abc", b"abd"));
        assert!(!secrets_equal(b"abc", b"abcd"));
        assert!(!secrets_equal(b"", b"\0"));
    }
}
