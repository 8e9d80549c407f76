//! What both store clients ([`crate::TcpStore`], [`crate::c10d::C10dStore`])
//! share: connecting with retries until a deadline, a pool of idle
//! authenticated connections, and the mapping of transport errors.
//!
//! Every in-flight request has its own connection (taken from the pool or
//! opened), so a `get` blocked in one thread never delays a `set` from
//! another thread of the same process. A connection that saw any error is
//! dropped rather than put back.

use std::fmt;
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::Duration;

use comm_core::{CommError, Deadline, Result};

/// Idle connections a client keeps for reuse.
pub const MAX_IDLE_CONNECTIONS: usize = 16;
/// Cap of the exponential backoff between connection attempts.
const MAX_BACKOFF: Duration = Duration::from_millis(50);
/// Longest time one connection attempt (connect + handshake) may take.
const ATTEMPT_LIMIT: Duration = Duration::from_secs(10);

/// Why opening a connection failed.
pub(crate) enum OpenError {
    /// Worth retrying: nothing listens yet, a reset, a name not resolvable yet.
    Transient(String),
    /// The server answered and refused us (or speaks another protocol).
    Refused(CommError),
}

/// Sorts a handshake error: refusals are final, transport errors transient.
pub(crate) fn classify(addr: SocketAddr, e: CommError) -> OpenError {
    match e {
        CommError::Io { .. } => OpenError::Transient(format!("handshake with {addr}: {e}")),
        CommError::Protocol(m) => {
            OpenError::Refused(CommError::Protocol(format!("store server at {addr}: {m}")))
        }
        other => OpenError::Refused(other),
    }
}

/// Connects to the first of `addrs` that accepts and passes `handshake`,
/// each attempt bounded by `budget`.
pub(crate) fn open_conn(
    addrs: &[SocketAddr],
    budget: Duration,
    handshake: &dyn Fn(&mut TcpStream) -> Result<()>,
) -> std::result::Result<TcpStream, OpenError> {
    let budget = budget.clamp(Duration::from_millis(1), ATTEMPT_LIMIT);
    let mut last = String::from("no address to connect to");
    for addr in addrs {
        let mut stream = match TcpStream::connect_timeout(addr, budget) {
            Ok(s) => s,
            Err(e) => {
                last = format!("connecting to {addr}: {e}");
                continue;
            }
        };
        let setup = (|| -> Result<()> {
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(budget))?;
            stream.set_write_timeout(Some(budget))?;
            handshake(&mut stream)
        })();
        match setup {
            Ok(()) => return Ok(stream),
            Err(e) => match classify(*addr, e) {
                OpenError::Transient(m) => last = m,
                refused => return Err(refused),
            },
        }
    }
    Err(OpenError::Transient(last))
}

/// Resolves `addr` and opens a first connection, retrying (exponential
/// backoff capped at 50 ms) while the server is not up yet, until `timeout`.
/// A refusal is returned at once.
pub(crate) fn connect_retrying(
    addr: &(impl ToSocketAddrs + fmt::Debug),
    timeout: Duration,
    what: &str,
    handshake: &dyn Fn(&mut TcpStream) -> Result<()>,
) -> Result<(Vec<SocketAddr>, TcpStream)> {
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
                    open_conn(&addrs, deadline.remaining(), handshake).map(|c| (addrs, c))
                }
            }
            Err(e) => Err(OpenError::Transient(format!("resolving {addr:?}: {e}"))),
        };
        match attempt {
            Ok(ok) => return Ok(ok),
            Err(OpenError::Refused(e)) => return Err(e),
            Err(OpenError::Transient(last)) => {
                if deadline.expired() {
                    return Err(CommError::timeout(
                        format!(
                            "connect to the {what} at {addr:?} (last error: {last}); is the \
                             server (usually rank 0) running and reachable?"
                        ),
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

/// Idle authenticated connections of one client and its clones.
#[derive(Debug, Default)]
pub(crate) struct Pool {
    idle: Mutex<Vec<TcpStream>>,
}

impl Pool {
    pub(crate) fn new(first: TcpStream) -> Self {
        Pool {
            idle: Mutex::new(vec![first]),
        }
    }

    /// An idle connection, or `open()` for a new one.
    pub(crate) fn checkout(
        &self,
        open: impl FnOnce() -> std::result::Result<TcpStream, OpenError>,
        what: &str,
        server: SocketAddr,
    ) -> Result<TcpStream> {
        // A connection is only ever pushed whole: a poisoned lock is still valid.
        if let Some(c) = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(c);
        }
        // The server was up when we first connected: one attempt, no retry
        // loop, so that a dead server is reported at once.
        match open() {
            Ok(c) => Ok(c),
            Err(OpenError::Refused(e)) => Err(e),
            Err(OpenError::Transient(e)) => Err(CommError::io(
                format!(
                    "opening another connection to the {what} at {server}; has the server \
                     (usually rank 0) exited?"
                ),
                std::io::Error::other(e),
            )),
        }
    }

    /// Returns a healthy connection to the pool.
    pub(crate) fn checkin(&self, conn: TcpStream) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE_CONNECTIONS {
            idle.push(conn);
        }
    }
}

/// Maps the transport error of a request: a read timeout is a
/// [`CommError::Timeout`] naming the server's reply, other I/O errors say
/// the server may have exited.
pub(crate) fn request_error(
    e: CommError,
    what: &str,
    store: &str,
    server: SocketAddr,
    waited: Duration,
) -> CommError {
    match e {
        CommError::Io { source, .. }
            if matches!(source.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
        {
            CommError::timeout(
                format!("{what}: no reply from the {store} at {server}"),
                waited,
                [format!("reply of store server {server}")],
            )
        }
        CommError::Io { context, source } => CommError::Io {
            context: format!(
                "{what} ({context}) with the {store} at {server}; has the server (usually \
                 rank 0) exited?"
            ),
            source,
        },
        other => other,
    }
}
