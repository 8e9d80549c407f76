//! The event loop both store servers run ([`crate::TcpStoreServer`] and
//! [`crate::c10d::C10dServer`]): one thread, non-blocking sockets, no thread
//! per connection.
//!
//! A connection's protocol is a [`Session`]: bytes in, replies out, no I/O of
//! its own, so the loop, not the protocol, owns every socket and deadline.
//! What the loop guarantees, whatever a peer does:
//!
//! - **One deadline for the whole handshake** ([`ServerOptions::handshake_timeout`]),
//!   not one per read: a peer trickling a byte every few seconds is closed
//!   when it expires.
//! - **Unauthenticated connections are capped** ([`ServerOptions::max_unauthenticated`]).
//!   A new connection over the cap closes the *oldest* unauthenticated one at
//!   once, so a flood of idle connections can delay an honest client by at
//!   most its own handshake, never shut it out; authenticated connections
//!   are never closed for it. Running out of descriptors (`EMFILE`) closes the
//!   oldest unauthenticated connection too, or retries accepting shortly.
//! - **Blocking requests are parked**, not served by a blocked thread: a
//!   parked session is asked again whenever a key changes and when its
//!   deadline passes. A client that goes away while parked is noticed at once
//!   (its socket becomes readable at end of stream).
//! - **Bounded buffering**: a session refuses oversized messages before
//!   buffering them (the loop only ever holds bytes that arrived), a parked
//!   session may not queue more than [`PARKED_INPUT_LIMIT`] bytes, and no new
//!   request is read while [`OUTPUT_HIGH_WATER`] bytes of replies wait for a
//!   client that does not read them.
//!
//! `mio` provides the readiness API (epoll on Linux, kqueue on macOS) and the
//! waker that shutdown uses.

pub(crate) mod kv;

use std::collections::HashMap;
use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use comm_core::{CommError, Result};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

pub(crate) use kv::Kv;

/// A parked session may receive at most this many bytes before it is closed
/// (a c10d client sends one `CANCEL_WAIT` byte; ours send nothing).
pub const PARKED_INPUT_LIMIT: usize = 64 * 1024;
/// No further request of a connection is read while this many reply bytes
/// wait to be sent to it.
pub const OUTPUT_HIGH_WATER: usize = 4 << 20;

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_CONN: usize = 2;
/// How soon accepting is retried after the process ran out of descriptors.
const ACCEPT_RETRY: Duration = Duration::from_millis(20);
/// Upper bound of one poll, so a missed wake-up can never stall the loop long.
const MAX_POLL: Duration = Duration::from_secs(1);
/// Bytes read from one connection before its buffered requests are run, so
/// a client streaming requests cannot grow the input buffer without end.
const READ_ROUND: usize = 1 << 20;

/// Limits of a store server (both protocols).
///
/// ```
/// use dist_utils::ServerOptions;
/// use std::time::Duration;
/// let o = ServerOptions::default()
///     .handshake_timeout(Duration::from_secs(2))
///     .max_unauthenticated(32);
/// assert_eq!(o.max_unauthenticated, 32);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerOptions {
    /// Time from accept to the end of the handshake, for the whole handshake.
    pub handshake_timeout: Duration,
    /// Most connections allowed to be in their handshake at once.
    pub max_unauthenticated: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            handshake_timeout: Duration::from_secs(10),
            max_unauthenticated: 128,
        }
    }
}

impl ServerOptions {
    /// Sets [`ServerOptions::handshake_timeout`].
    pub fn handshake_timeout(mut self, t: Duration) -> Self {
        self.handshake_timeout = t;
        self
    }
    /// Sets [`ServerOptions::max_unauthenticated`] (at least 1).
    pub fn max_unauthenticated(mut self, n: usize) -> Self {
        self.max_unauthenticated = n.max(1);
        self
    }
}

/// Where a session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Not authenticated (or validated) yet; counts against the cap.
    Handshake,
    /// Serving requests.
    Ready,
    /// A blocking request waits for keys; the loop calls [`Session::wake`].
    Parked,
}

/// One connection's protocol, transport-free.
pub(crate) trait Session: Send + 'static {
    fn phase(&self) -> Phase;
    /// When [`Session::wake`] must be called even if no key changes: the end
    /// of the handshake, or a parked request's deadline.
    fn deadline(&self) -> Option<Instant>;
    /// Consumes complete messages at the start of `input`, appending replies
    /// to `out`; returns the bytes consumed. `Err(reason)`: send what is in
    /// `out` (best effort) and close.
    fn feed(
        &mut self,
        input: &[u8],
        kv: &mut Kv,
        out: &mut Vec<u8>,
    ) -> std::result::Result<usize, String>;
    /// Keys changed, or the deadline passed: a parked request may answer now.
    /// `Err(reason)`: close (e.g. the handshake deadline passed).
    fn wake(
        &mut self,
        kv: &mut Kv,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> std::result::Result<(), String>;
    /// The server is stopping: what to tell a parked client.
    fn shutdown(&mut self, out: &mut Vec<u8>);
}

/// Makes a session for each accepted connection.
pub(crate) trait Protocol: Send + 'static {
    type S: Session;
    /// A fresh session; `greeting` receives bytes to send at once.
    fn open(&self, handshake_deadline: Instant, greeting: &mut Vec<u8>) -> Result<Self::S>;
    /// For logs: `TCP store`, `c10d store`.
    fn name(&self) -> &'static str;
}

struct Conn<S> {
    stream: TcpStream,
    session: S,
    /// Accept order, to find the oldest unauthenticated connection.
    seq: u64,
    peer: Option<SocketAddr>,
    input: Vec<u8>,
    output: Vec<u8>,
    written: usize,
}

impl<S> Conn<S> {
    fn pending_output(&self) -> usize {
        self.output.len() - self.written
    }
}

/// Why a connection ended (for the debug log).
enum End {
    Eof,
    Io(std::io::Error),
    Closed(String),
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::Eof => write!(f, "the peer closed the connection"),
            End::Io(e) => write!(f, "{e}"),
            End::Closed(r) => write!(f, "{r}"),
        }
    }
}

/// Counters the owning handle reads.
#[derive(Debug, Default)]
struct Counts {
    connections: AtomicUsize,
    unauthenticated: AtomicUsize,
}

struct Loop<P: Protocol> {
    protocol: P,
    opts: ServerOptions,
    poll: Poll,
    listener: TcpListener,
    conns: HashMap<Token, Conn<P::S>>,
    kv: Kv,
    next_token: usize,
    next_seq: u64,
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
    /// Accepting paused until then after running out of descriptors.
    accept_retry: Option<Instant>,
}

/// A running server loop; dropping it stops the loop and joins its thread.
pub(crate) struct ServerHandle {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    counts: Arc<Counts>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerHandle")
            .field("addr", &self.addr)
            .field("connections", &self.num_connections())
            .finish_non_exhaustive()
    }
}

impl ServerHandle {
    /// Binds `addr` and starts the loop thread.
    pub(crate) fn spawn<P: Protocol>(
        addr: impl std::net::ToSocketAddrs + fmt::Debug,
        protocol: P,
        opts: ServerOptions,
    ) -> Result<Self> {
        let name = protocol.name();
        let std_listener = std::net::TcpListener::bind(&addr)
            .map_err(|e| CommError::io(format!("binding the {name} server to {addr:?}"), e))?;
        let local = std_listener
            .local_addr()
            .map_err(|e| CommError::io(format!("reading the {name} server's address"), e))?;
        std_listener
            .set_nonblocking(true)
            .map_err(|e| CommError::io(format!("making the {name} server non-blocking"), e))?;
        let mut listener = TcpListener::from_std(std_listener);
        let poll =
            Poll::new().map_err(|e| CommError::io(format!("creating the {name} poller"), e))?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(|e| CommError::io(format!("registering the {name} listener"), e))?;
        let waker = Arc::new(
            Waker::new(poll.registry(), WAKER)
                .map_err(|e| CommError::io(format!("creating the {name} waker"), e))?,
        );
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        let mut lp = Loop {
            protocol,
            opts,
            poll,
            listener,
            conns: HashMap::new(),
            kv: Kv::default(),
            next_token: FIRST_CONN,
            next_seq: 0,
            stop: stop.clone(),
            counts: counts.clone(),
            accept_retry: None,
        };
        let thread = std::thread::Builder::new()
            .name(format!("{name} server"))
            .spawn(move || lp.run())
            .map_err(|e| CommError::io(format!("spawning the {name} server thread"), e))?;
        tracing::debug!(addr = %local, "{name} server listening");
        Ok(ServerHandle {
            addr: local,
            stop,
            waker,
            counts,
            thread: Some(thread),
        })
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub(crate) fn num_connections(&self) -> usize {
        self.counts.connections.load(Ordering::SeqCst)
    }

    pub(crate) fn num_unauthenticated(&self) -> usize {
        self.counts.unauthenticated.load(Ordering::SeqCst)
    }

    /// Stops the loop (parked clients are told), closes every connection
    /// and joins the thread. Idempotent.
    pub(crate) fn stop(&mut self) {
        let Some(t) = self.thread.take() else {
            return;
        };
        self.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.waker.wake() {
            // The loop still sees the flag within MAX_POLL.
            tracing::warn!(error = %e, "could not wake the store server loop");
        }
        if t.join().is_err() {
            tracing::warn!(addr = %self.addr, "the store server loop panicked");
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

fn interrupted(e: &std::io::Error) -> bool {
    e.kind() == ErrorKind::Interrupted
}

fn out_of_descriptors(e: &std::io::Error) -> bool {
    // EMFILE (process) / ENFILE (system).
    matches!(e.raw_os_error(), Some(24) | Some(23))
}

impl<P: Protocol> Loop<P> {
    fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.next_timeout();
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if !interrupted(&e) {
                    tracing::error!(error = %e, "{} server: poll failed; stopping", self.protocol.name());
                    break;
                }
            }
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept_all(),
                    WAKER => {}
                    t => self.drive(t),
                }
            }
            if self.accept_retry.is_some_and(|t| Instant::now() >= t) {
                self.accept_retry = None;
                self.accept_all();
            }
            self.expire();
            self.wake_parked();
            self.publish_counts();
        }
        self.shutdown();
    }

    fn next_timeout(&self) -> Duration {
        let now = Instant::now();
        self.conns
            .values()
            .filter_map(|c| c.session.deadline())
            .chain(self.accept_retry)
            .map(|d| d.saturating_duration_since(now))
            .min()
            .unwrap_or(MAX_POLL)
            .min(MAX_POLL)
    }

    fn publish_counts(&self) {
        let unauth = self
            .conns
            .values()
            .filter(|c| c.session.phase() == Phase::Handshake)
            .count();
        self.counts
            .connections
            .store(self.conns.len(), Ordering::SeqCst);
        self.counts.unauthenticated.store(unauth, Ordering::SeqCst);
    }

    /// Closes the oldest connection still in its handshake; false if none.
    fn evict_oldest_unauthenticated(&mut self, why: &str) -> bool {
        let oldest = self
            .conns
            .iter()
            .filter(|(_, c)| c.session.phase() == Phase::Handshake)
            .min_by_key(|(_, c)| c.seq)
            .map(|(t, _)| *t);
        match oldest {
            Some(t) => {
                self.close(t, End::Closed(why.to_string()));
                true
            }
            None => false,
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, peer)) => self.admit(stream, peer),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if interrupted(&e) => continue,
                Err(e) if out_of_descriptors(&e) => {
                    if !self.evict_oldest_unauthenticated(
                        "closed to free a descriptor for a new connection",
                    ) {
                        tracing::warn!(
                            error = %e,
                            "{} server is out of file descriptors; retrying shortly",
                            self.protocol.name()
                        );
                        self.accept_retry = Some(Instant::now() + ACCEPT_RETRY);
                        return;
                    }
                }
                // ECONNABORTED and the like concern that one connection only.
                Err(e) => {
                    tracing::debug!(error = %e, "{} server: accept failed", self.protocol.name())
                }
            }
        }
    }

    fn admit(&mut self, mut stream: TcpStream, peer: SocketAddr) {
        let unauth = self
            .conns
            .values()
            .filter(|c| c.session.phase() == Phase::Handshake)
            .count();
        if unauth >= self.opts.max_unauthenticated {
            self.evict_oldest_unauthenticated(
                "too many unauthenticated connections; closing the oldest",
            );
        }
        let _ = stream.set_nodelay(true);
        let mut greeting = Vec::new();
        let now = Instant::now();
        let deadline = now
            .checked_add(self.opts.handshake_timeout)
            .unwrap_or(now + Duration::from_secs(86_400));
        let session = match self.protocol.open(deadline, &mut greeting) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "{} server could not start a session", self.protocol.name());
                return;
            }
        };
        let token = Token(self.next_token);
        self.next_token += 1;
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            token,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            tracing::warn!(error = %e, "{} server could not register a connection", self.protocol.name());
            return;
        }
        self.next_seq += 1;
        self.conns.insert(
            token,
            Conn {
                stream,
                session,
                seq: self.next_seq,
                peer: Some(peer),
                input: Vec::new(),
                output: greeting,
                written: 0,
            },
        );
        self.drive(token);
    }

    fn close(&mut self, token: Token, why: End) {
        if let Some(mut c) = self.conns.remove(&token) {
            let _ = self.poll.registry().deregister(&mut c.stream);
            tracing::debug!(peer = ?c.peer, "{} connection ended: {why}", self.protocol.name());
            // Dropping the stream closes it.
        }
    }

    /// Moves bytes both ways and runs the session until nothing more can
    /// happen without the peer (or a key change).
    fn drive(&mut self, token: Token) {
        let end = match self.conns.get_mut(&token) {
            Some(c) => pump(c, &mut self.kv),
            None => return,
        };
        if let Some(why) = end {
            self.close(token, why);
        }
    }

    /// Handshake deadlines and parked requests' deadlines.
    fn expire(&mut self) {
        let now = Instant::now();
        let due: Vec<Token> = self
            .conns
            .iter()
            .filter(|(_, c)| c.session.deadline().is_some_and(|d| d <= now))
            .map(|(t, _)| *t)
            .collect();
        for t in due {
            self.wake_one(t, now);
        }
    }

    /// Re-examines parked sessions while keys keep changing (answering one
    /// may let its connection run requests that change keys again).
    fn wake_parked(&mut self) {
        while self.kv.take_changed() {
            let now = Instant::now();
            let parked: Vec<Token> = self
                .conns
                .iter()
                .filter(|(_, c)| c.session.phase() == Phase::Parked)
                .map(|(t, _)| *t)
                .collect();
            for t in parked {
                self.wake_one(t, now);
            }
        }
    }

    fn wake_one(&mut self, token: Token, now: Instant) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        if let Err(why) = c.session.wake(&mut self.kv, now, &mut c.output) {
            let _ = flush(c);
            self.close(token, End::Closed(why));
            return;
        }
        self.drive(token);
    }

    fn shutdown(&mut self) {
        for c in self.conns.values_mut() {
            c.session.shutdown(&mut c.output);
            // Best effort: a client that does not read loses the notice and
            // sees the connection close instead.
            let _ = flush(c);
        }
        let tokens: Vec<Token> = self.conns.keys().copied().collect();
        for t in tokens {
            self.close(t, End::Closed("the server is shutting down".into()));
        }
        self.publish_counts();
    }
}

/// Writes pending output until done or the socket is full. `Err` on a
/// broken connection.
fn flush<S>(c: &mut Conn<S>) -> std::io::Result<()> {
    while c.written < c.output.len() {
        match c.stream.write(&c.output[c.written..]) {
            Ok(0) => return Err(std::io::Error::from(ErrorKind::WriteZero)),
            Ok(n) => c.written += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) if interrupted(&e) => {}
            Err(e) => return Err(e),
        }
    }
    c.output.clear();
    c.written = 0;
    Ok(())
}

/// One connection's progress; `Some(why)` when it must be closed.
fn pump<S: Session>(c: &mut Conn<S>, kv: &mut Kv) -> Option<End> {
    let mut scratch = [0u8; 16 * 1024];
    loop {
        let mut progress = false;
        // Requests already buffered, unless replies are backing up.
        if !c.input.is_empty() && c.pending_output() < OUTPUT_HIGH_WATER {
            match c.session.feed(&c.input, kv, &mut c.output) {
                Ok(0) => {}
                Ok(n) => {
                    c.input.drain(..n.min(c.input.len()));
                    progress = true;
                }
                Err(why) => {
                    let _ = flush(c);
                    return Some(End::Closed(why));
                }
            }
        }
        if c.session.phase() == Phase::Parked && c.input.len() > PARKED_INPUT_LIMIT {
            return Some(End::Closed(format!(
                "sent {} bytes while its blocking request was pending",
                c.input.len()
            )));
        }
        if let Err(e) = flush(c) {
            return Some(End::Io(e));
        }
        // Read while replies are not backing up; when they are, the
        // writable event that drains them drives this connection again.
        if c.pending_output() < OUTPUT_HIGH_WATER {
            let mut round = 0usize;
            while round < READ_ROUND {
                match c.stream.read(&mut scratch) {
                    Ok(0) => return Some(End::Eof),
                    Ok(n) => {
                        c.input.extend_from_slice(&scratch[..n]);
                        round += n;
                        progress = true;
                        if c.session.phase() == Phase::Parked && c.input.len() > PARKED_INPUT_LIMIT
                        {
                            break;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if interrupted(&e) => {}
                    Err(e) => return Some(End::Io(e)),
                }
            }
        }
        if !progress {
            return None;
        }
    }
}
