//! Workers on other hosts: they find the executor's TCP address in the
//! job's rendezvous store, prove they hold the job secret
//! (`comm_core::auth` challenge–response, the secret never crosses the
//! wire, a recorded handshake cannot be replayed), and join with their rank.
//!
//! The executor's side accepts on a thread and authenticates each
//! connection on its own short-lived thread under one overall deadline, with
//! a cap on connections not yet authenticated, so strangers that connect
//! and stay silent can neither stall the accept loop nor exhaust
//! descriptors.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use comm_core::auth::{self, Challenge, ANSWER_LEN, HELLO_LEN, PROOF_LEN};
use comm_core::{CommError, Result, Store};

use super::engine::Kicker;
use super::wire::{self, Down, Up, LEN_BYTES, MAX_JOIN_FRAME};

/// Store key under which the executor publishes its address.
pub(crate) const ADDR_KEY: &str = "executor/rpc_addr";
/// Context string of the handshake (both sides).
const CONTEXT: &str = "executor rpc";
/// The whole handshake (challenge, answer, proof, join) must fit in this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many connections may be authenticating at once.
const MAX_PENDING: usize = 32;
/// How often the accept loop looks at its stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(10);

/// A remote worker that was admitted.
#[derive(Debug)]
pub(crate) struct Joined {
    pub(crate) rank: usize,
    pub(crate) stream: TcpStream,
    pub(crate) pid: u32,
    pub(crate) host: String,
}

/// The executor's accept loop (see the module docs).
#[derive(Debug)]
pub(crate) struct Acceptor {
    pub(crate) joined: mpsc::Receiver<Joined>,
    stop: Arc<AtomicBool>,
    addr: SocketAddr,
}

impl Acceptor {
    /// Listens on `bind` (port 0: any) for the ranks in `expected` of a job
    /// of `world` ranks whose secret is `secret`; each admitted worker is
    /// sent on [`Acceptor::joined`] and `kick` is kicked.
    pub(crate) fn start(
        bind: &str,
        secret: &[u8],
        expected: Vec<usize>,
        world: usize,
        kick: Kicker,
    ) -> Result<Self> {
        let listener = TcpListener::bind((bind, 0)).map_err(|e| {
            CommError::io(
                format!(
                    "binding the executor's RPC listener on {bind} (the --master-addr of node 0)"
                ),
                e,
            )
        })?;
        let addr = listener
            .local_addr()
            .map_err(|e| CommError::io("reading the RPC listener's address", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| CommError::io("making the RPC listener non-blocking", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let ctx = Arc::new(AdmitCtx {
            secret: secret.to_vec(),
            expected: expected.into_iter().collect(),
            admitted: Mutex::new(HashSet::new()),
            world,
            pending: AtomicUsize::new(0),
            tx: Mutex::new(tx),
            kick,
        });
        let stop2 = stop.clone();
        thread::Builder::new()
            .name("executor-accept".into())
            .spawn(move || accept_loop(listener, ctx, stop2))
            .map_err(|e| CommError::io("starting the RPC accept thread", e))?;
        Ok(Acceptor {
            joined: rx,
            stop,
            addr,
        })
    }

    /// The address workers connect to.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

struct AdmitCtx {
    secret: Vec<u8>,
    expected: HashSet<usize>,
    admitted: Mutex<HashSet<usize>>,
    world: usize,
    pending: AtomicUsize,
    tx: Mutex<mpsc::Sender<Joined>>,
    kick: Kicker,
}

fn accept_loop(listener: TcpListener, ctx: Arc<AdmitCtx>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                if ctx.pending.load(Ordering::SeqCst) >= MAX_PENDING {
                    tracing::warn!(
                        "executor: refusing a connection from {peer}: {MAX_PENDING} connections are \
                         already authenticating"
                    );
                    continue;
                }
                ctx.pending.fetch_add(1, Ordering::SeqCst);
                let c = ctx.clone();
                let spawned =
                    thread::Builder::new()
                        .name("executor-admit".into())
                        .spawn(move || {
                            if let Err(e) = admit(stream, &c) {
                                tracing::warn!("executor: refused a connection from {peer}: {e}");
                            }
                            c.pending.fetch_sub(1, Ordering::SeqCst);
                        });
                if spawned.is_err() {
                    ctx.pending.fetch_sub(1, Ordering::SeqCst);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => thread::sleep(ACCEPT_POLL),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!("executor: accepting a worker connection: {e}");
                thread::sleep(ACCEPT_POLL);
            }
        }
    }
}

/// Server side of one connection: authenticate, read the join request,
/// admit or refuse.
fn admit(mut s: TcpStream, ctx: &AdmitCtx) -> Result<()> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    s.set_nonblocking(false)
        .and_then(|()| s.set_nodelay(true))
        .map_err(|e| CommError::io("configuring a worker connection", e))?;
    let challenge = Challenge::new(&ctx.secret, CONTEXT)?;
    write_by(&mut s, challenge.hello(), deadline)?;
    let mut answer = [0u8; ANSWER_LEN];
    read_exact_by(&mut s, &mut answer, deadline)?;
    let proof = challenge.verify(&answer)?;
    write_by(&mut s, &proof, deadline)?;
    let body = read_frame_by(&mut s, MAX_JOIN_FRAME, deadline)?;
    let (rank, world_size, pid, host) = match wire::decode_up(&body)? {
        (
            Up::Join {
                rank,
                world_size,
                pid,
                host,
            },
            _,
        ) => (rank as usize, world_size as usize, pid, host.into_owned()),
        (other, _) => {
            return Err(CommError::Protocol(format!(
                "expected a join request, got {other:?}"
            )))
        }
    };
    let refusal = if world_size != ctx.world {
        Some(format!(
            "rank {rank} was started with WORLD_SIZE {world_size}, the executor's job has {}",
            ctx.world
        ))
    } else if !ctx.expected.contains(&rank) {
        Some(format!(
            "rank {rank} is not a remote rank of this job (expected one of {:?})",
            sorted(&ctx.expected)
        ))
    } else {
        let mut admitted = ctx.admitted.lock().unwrap_or_else(|p| p.into_inner());
        if admitted.insert(rank) {
            None
        } else {
            Some(format!("rank {rank} has already joined"))
        }
    };
    if let Some(why) = refusal {
        let _ = write_by(
            &mut s,
            &wire::frame(&Down::Refused(why.as_str().into()))?,
            deadline,
        );
        return Err(CommError::invalid(why));
    }
    write_by(&mut s, &wire::frame(&Down::Welcome)?, deadline)?;
    s.set_read_timeout(None)
        .and_then(|()| s.set_write_timeout(None))
        .map_err(|e| CommError::io("configuring a worker connection", e))?;
    let tx = ctx.tx.lock().unwrap_or_else(|p| p.into_inner());
    if tx
        .send(Joined {
            rank,
            stream: s,
            pid,
            host,
        })
        .is_ok()
    {
        ctx.kick.kick();
    }
    Ok(())
}

fn sorted(set: &HashSet<usize>) -> Vec<usize> {
    let mut v: Vec<usize> = set.iter().copied().collect();
    v.sort_unstable();
    v
}

/// Worker side: finds the executor through the job's store, authenticates
/// and joins as `rank`. Returns the connection, ready for requests.
pub(crate) fn join(
    store: &dyn Store,
    secret: &[u8],
    rank: usize,
    world_size: usize,
    timeout: Duration,
) -> Result<TcpStream> {
    let raw = store.get(ADDR_KEY, timeout)?;
    let text = String::from_utf8(raw)
        .map_err(|_| CommError::Protocol(format!("store key `{ADDR_KEY}` is not text")))?;
    let addrs: Vec<SocketAddr> = text
        .to_socket_addrs()
        .map_err(|e| CommError::io(format!("resolving the executor address `{text}`"), e))?
        .collect();
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let mut last = None;
    let mut stream = None;
    for a in &addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        match TcpStream::connect_timeout(a, left.max(Duration::from_millis(1))) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let mut s = stream.ok_or_else(|| {
        CommError::io(
            format!("connecting to the executor at {text}"),
            last.unwrap_or_else(|| std::io::Error::other("no address")),
        )
    })?;
    s.set_nodelay(true)
        .map_err(|e| CommError::io("configuring the executor connection", e))?;
    let mut hello = [0u8; HELLO_LEN];
    read_exact_by(&mut s, &mut hello, deadline)?;
    let (answer, expect) = auth::respond(secret, CONTEXT, &hello)?;
    write_by(&mut s, &answer, deadline)?;
    let mut proof = [0u8; PROOF_LEN];
    read_exact_by(&mut s, &mut proof, deadline)?;
    expect.verify(&proof)?;
    let host = dist_utils::hostname();
    let join = Up::Join {
        rank: u32::try_from(rank).map_err(|_| CommError::invalid("rank too large"))?,
        world_size: u32::try_from(world_size)
            .map_err(|_| CommError::invalid("world size too large"))?,
        pid: std::process::id(),
        host: host.as_str().into(),
    };
    write_by(&mut s, &wire::frame(&join)?, deadline)?;
    let body = read_frame_by(&mut s, MAX_JOIN_FRAME, deadline)?;
    match wire::decode_down(&body)?.0 {
        Down::Welcome => {}
        Down::Refused(why) => {
            return Err(CommError::State(format!(
                "the executor at {text} refused rank {rank}: {why}"
            )))
        }
        other => {
            return Err(CommError::Protocol(format!(
                "expected a welcome from the executor, got {other:?}"
            )))
        }
    }
    s.set_read_timeout(None)
        .and_then(|()| s.set_write_timeout(None))
        .map_err(|e| CommError::io("configuring the executor connection", e))?;
    Ok(s)
}

fn left(deadline: Instant, what: &str) -> Result<Duration> {
    let l = deadline.saturating_duration_since(Instant::now());
    if l.is_zero() {
        return Err(CommError::timeout(
            format!("executor handshake: {what}"),
            HANDSHAKE_TIMEOUT,
            ["the peer"],
        ));
    }
    Ok(l)
}

/// `read_exact` where the whole read, however the peer trickles it, ends
/// by `deadline`.
fn read_exact_by(s: &mut TcpStream, mut buf: &mut [u8], deadline: Instant) -> Result<()> {
    while !buf.is_empty() {
        let l = left(deadline, "reading")?;
        s.set_read_timeout(Some(l))
            .map_err(|e| CommError::io("setting a read timeout", e))?;
        match s.read(buf) {
            Ok(0) => {
                return Err(CommError::io(
                    "executor handshake",
                    std::io::ErrorKind::UnexpectedEof.into(),
                ))
            }
            Ok(n) => buf = &mut buf[n..],
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted
                        | std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(CommError::io("executor handshake", e)),
        }
    }
    Ok(())
}

fn write_by(s: &mut TcpStream, data: &[u8], deadline: Instant) -> Result<()> {
    let l = left(deadline, "writing")?;
    s.set_write_timeout(Some(l))
        .map_err(|e| CommError::io("setting a write timeout", e))?;
    s.write_all(data)
        .map_err(|e| CommError::io("executor handshake", e))
}

fn read_frame_by(s: &mut TcpStream, max: usize, deadline: Instant) -> Result<Vec<u8>> {
    let mut len = [0u8; LEN_BYTES];
    read_exact_by(s, &mut len, deadline)?;
    let n = u64::from_le_bytes(len);
    if n > max as u64 {
        return Err(CommError::Protocol(format!(
            "handshake frame of {n} byte(s) exceeds {max}"
        )));
    }
    let mut body = vec![0u8; n as usize];
    read_exact_by(s, &mut body, deadline)?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::engine::Engine;

    const SECRET: &[u8] = b"0123456789abcdef";

    fn acceptor() -> (Acceptor, dist_utils::HashStore, Engine) {
        let engine = Engine::new(3, Duration::ZERO).unwrap();
        let acc = Acceptor::start("127.0.0.1", SECRET, vec![1, 2], 3, engine.kicker()).unwrap();
        let store = dist_utils::HashStore::new();
        store
            .set(ADDR_KEY, acc.addr().to_string().as_bytes())
            .unwrap();
        (acc, store, engine)
    }

    const T: Duration = Duration::from_secs(20);

    #[test]
    fn silent_strangers_do_not_stall_joins_and_bad_joins_are_refused() {
        let (acc, store, _engine) = acceptor();
        // Connections that never say anything.
        let strangers: Vec<TcpStream> = (0..8)
            .map(|_| TcpStream::connect(acc.addr()).unwrap())
            .collect();
        let s = join(&store, SECRET, 1, 3, T).unwrap();
        let j = acc.joined.recv_timeout(T).unwrap();
        assert_eq!((j.rank, j.pid), (1, std::process::id()));
        drop(s);
        // The same rank twice, a rank that is not remote, a wrong world size.
        let e = join(&store, SECRET, 1, 3, T).unwrap_err().to_string();
        assert!(e.contains("already joined"), "{e}");
        let e = join(&store, SECRET, 0, 3, T).unwrap_err().to_string();
        assert!(e.contains("not a remote rank"), "{e}");
        let e = join(&store, SECRET, 2, 4, T).unwrap_err().to_string();
        assert!(e.contains("WORLD_SIZE 4"), "{e}");
        // The wrong secret: refused before the join request.
        assert!(join(&store, b"another secret!!", 2, 3, T).is_err());
        // Rank 2 can still join.
        let _s2 = join(&store, SECRET, 2, 3, T).unwrap();
        assert_eq!(acc.joined.recv_timeout(T).unwrap().rank, 2);
        drop(strangers);
    }

    #[test]
    fn a_recorded_handshake_cannot_be_replayed() {
        let (acc, _store, _engine) = acceptor();
        let deadline = Instant::now() + T;
        // A genuine client's answer, recorded.
        let mut s = TcpStream::connect(acc.addr()).unwrap();
        let mut hello = [0u8; HELLO_LEN];
        read_exact_by(&mut s, &mut hello, deadline).unwrap();
        let (answer, expect) = auth::respond(SECRET, CONTEXT, &hello).unwrap();
        write_by(&mut s, &answer, deadline).unwrap();
        let mut proof = [0u8; PROOF_LEN];
        read_exact_by(&mut s, &mut proof, deadline).unwrap();
        expect.verify(&proof).unwrap();
        drop(s);
        // Replayed on a new connection (a new challenge): refused, the
        // connection closes without a proof.
        let mut s = TcpStream::connect(acc.addr()).unwrap();
        read_exact_by(&mut s, &mut hello, deadline).unwrap();
        write_by(&mut s, &answer, deadline).unwrap();
        assert!(read_exact_by(&mut s, &mut proof, deadline).is_err());
        assert!(acc.joined.try_recv().is_err());
    }
}
