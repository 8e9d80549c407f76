//! Connection set-up through the store: each member binds one listener
//! (address chosen by [`crate::addr`]), publishes it with its host identity,
//! and the members connect as a full mesh, the higher rank calling the
//! lower, two connections per pair (data and control). Every connection is
//! authenticated by [`crate::handshake`] with a random secret rank 0
//! publishes in the store. Incoming handshakes run concurrently with the
//! outgoing connections, each bounded on its own, and the outgoing ones run
//! concurrently with each other: a peer that never answers (frozen, killed
//! mid-set-up) holds up only the connection to itself, so every other
//! member completes its part and nobody blames a member that was merely
//! stuck behind the culprit.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use comm_core::{CommError, Deadline, Missing, Result, Store};
use rustix::event::{PollFd, PollFlags};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::addr;
use crate::handshake::{self, ClientError, Pending, Server, Step, HANDSHAKE_TIMEOUT, MAX_PENDING};
use crate::mesh::Peer;
use crate::options::{SOCKET_ADDR_ENV, SOCKET_IFNAME_ENV};
use crate::wire::{AddrRecord, ClientHeader, CHANNEL_CONTROL, CHANNEL_DATA};
use crate::TcpOptions;

const SECRET_LEN: usize = 32;
/// Most outgoing connections made at once (each a thread while it lasts).
const CONNECT_WORKERS: usize = 16;

fn tune(sock: &Socket, opts: &TcpOptions) {
    if opts.socket_buffer > 0 {
        // Best effort: the kernel caps these at net.core.{w,r}mem_max.
        let _ = sock.set_send_buffer_size(opts.socket_buffer);
        let _ = sock.set_recv_buffer_size(opts.socket_buffer);
    }
}

/// Everything `new` needs from set-up.
pub(crate) struct Connected {
    pub(crate) peers: Vec<Option<Peer>>,
    pub(crate) local_addr: SocketAddr,
}

/// Binds, publishes, connects and accepts; returns both connections to
/// every peer.
pub(crate) fn connect_mesh(
    store: &Arc<dyn Store>,
    rank: usize,
    world: usize,
    opts: &TcpOptions,
) -> Result<Connected> {
    let start = Instant::now();
    let deadline = Deadline::after(opts.connect_timeout);
    let g = &opts.group_name;
    let master = opts.master.as_ref().map(|(h, p)| (h.as_str(), *p));
    let chosen = addr::choose(opts.addr, opts.interface.as_deref(), master)?;
    let bind = SocketAddr::new(chosen.ip, opts.port);
    let lsock = Socket::new(Domain::for_address(bind), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| CommError::io("creating the listening socket", e))?;
    let _ = lsock.set_reuse_address(true);
    tune(&lsock, opts);
    lsock.bind(&SockAddr::from(bind)).map_err(|e| {
        CommError::io(
            format!(
                "binding {bind} ({}; see {SOCKET_ADDR_ENV} / {SOCKET_IFNAME_ENV})",
                chosen.why
            ),
            e,
        )
    })?;
    lsock
        .listen((4 * world).max(128) as i32)
        .map_err(|e| CommError::io(format!("listening on {bind}"), e))?;
    let listener: TcpListener = lsock.into();
    let local_addr = listener
        .local_addr()
        .map_err(|e| CommError::io("reading the listening address", e))?;
    tracing::debug!(group = %g, rank, world, "tcp set-up: listening on {local_addr} ({})", chosen.why);

    let secret_key = format!("{g}/secret");
    if rank == 0 {
        store.set(&secret_key, &comm_core::auth::random_bytes::<SECRET_LEN>()?)?;
    }
    let me = AddrRecord {
        addr: local_addr,
        host: addr::host_identity(),
    };
    store.set(&format!("{g}/addr/{rank}"), &me.encode())?;
    let secret = store.get(&secret_key, deadline.remaining()).map_err(|e| {
        e.blaming(
            0,
            "did not publish the group secret (it has not reached this set-up)",
            format!("tcp set-up of group `{g}`"),
        )
    })?;
    if secret.len() != SECRET_LEN {
        return Err(CommError::Protocol(format!(
            "store key `{secret_key}` holds {} bytes, not a {SECRET_LEN}-byte group secret",
            secret.len()
        )));
    }
    let stop = AtomicBool::new(false);
    let srv = Server {
        secret: &secret,
        group: g,
        world,
        rank,
    };
    // Incoming handshakes are served from the start, while this member reads
    // the others' addresses and connects out.
    let (outgoing, incoming) = std::thread::scope(|s| {
        let acceptor = std::thread::Builder::new()
            .name(format!("tcp-accept-{rank}"))
            .spawn_scoped(s, || accept_all(&listener, &srv, &deadline, &stop));
        // Lower ranks first (checked before connecting to them), then all
        // (so a member on loopback in a group spanning hosts fails at once).
        let out = read_records(store, g, rank + 1, &deadline).and_then(|lower| {
            check_reachable(g, rank, &lower)?;
            let pairs = connect_lower(&lower[..rank], rank, world, &secret, g, opts, &deadline)?;
            check_reachable(g, rank, &read_records(store, g, world, &deadline)?)?;
            tracing::debug!(group = %g, rank, "tcp set-up: every member published its address");
            Ok(pairs)
        });
        if out.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        let inc = match acceptor {
            Ok(h) => h.join().unwrap_or_else(|_| {
                Err(CommError::State("the tcp acceptor thread panicked".into()))
            }),
            Err(e) => Err(CommError::io("starting the tcp acceptor thread", e)),
        };
        (out, inc)
    });
    let outgoing = outgoing?;
    let incoming = incoming?;
    let mut peers: Vec<Option<Peer>> = (0..world).map(|_| None).collect();
    for (to, (data, ctl)) in outgoing.into_iter().enumerate() {
        peers[to] = Some(finish(data, ctl)?);
    }
    for (from, slot) in incoming.into_iter().enumerate() {
        if let (Some(data), Some(ctl)) = slot {
            peers[from] = Some(finish(data, ctl)?);
        }
    }
    tracing::debug!(group = %g, rank, world, "tcp set-up done in {:.1?}", start.elapsed());
    Ok(Connected { peers, local_addr })
}

/// The published address and host of members `0..upto`.
fn read_records(
    store: &Arc<dyn Store>,
    g: &str,
    upto: usize,
    deadline: &Deadline,
) -> Result<Vec<AddrRecord>> {
    let keys: Vec<String> = (0..upto).map(|r| format!("{g}/addr/{r}")).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    store
        .wait(&refs, deadline.remaining())
        .map_err(|e| match e {
            CommError::Timeout {
                operation, waited, ..
            } => {
                let missing: Vec<Missing> = keys
                    .iter()
                    .enumerate()
                    .filter(|(_, k)| !matches!(store.try_get(k), Ok(Some(_))))
                    .map(|(r, _)| Missing::new(r, "did not publish its address"))
                    .collect();
                CommError::timeout_ranks(
                    format!("tcp set-up of group `{g}`: {operation}"),
                    waited,
                    missing,
                )
            }
            e => e,
        })?;
    keys.iter()
        .map(|k| AddrRecord::decode(k, &store.get(k, deadline.remaining())?))
        .collect()
}

/// A group whose members sit on different network stacks cannot use
/// loopback addresses: fail now, saying what to set, instead of waiting
/// out the deadline for connections that cannot come.
fn check_reachable(g: &str, rank: usize, records: &[AddrRecord]) -> Result<()> {
    let hosts: Vec<&str> = {
        let mut h: Vec<&str> = records.iter().map(|r| r.host.as_str()).collect();
        h.sort_unstable();
        h.dedup();
        h
    };
    if hosts.len() < 2 {
        return Ok(());
    }
    let on_loopback: Vec<usize> = (0..records.len())
        .filter(|&r| records[r].addr.ip().is_loopback())
        .collect();
    if on_loopback.is_empty() {
        return Ok(());
    }
    let describe = |r: usize| {
        format!(
            "rank {r} on {} at {}",
            addr::host_name(&records[r].host),
            records[r].addr
        )
    };
    let other = (0..records.len())
        .find(|&r| records[r].host != records[on_loopback[0]].host)
        .unwrap_or(0);
    Err(CommError::invalid(format!(
        "tcp set-up of group `{g}` (rank {rank}): the group spans {} hosts or network \
         namespaces, but {} bound a loopback address that the others cannot reach ({} vs {}). \
         Set {SOCKET_IFNAME_ENV} (e.g. `eth0` or `^lo,docker`) or {SOCKET_ADDR_ENV} on every \
         rank, or make MASTER_ADDR an address of the master's host that the other hosts reach",
        hosts.len(),
        on_loopback
            .iter()
            .map(|r| format!("rank {r}"))
            .collect::<Vec<_>>()
            .join(", "),
        describe(on_loopback[0]),
        describe(other),
    )))
}

/// Connects to every lower rank (`lower[to]` is rank `to`'s record), up to
/// [`CONNECT_WORKERS`] at once, this thread being one of the workers. Every
/// connection is attempted whatever happens to the others; a refusal is
/// returned as is, and timeouts are merged into one naming every rank not
/// reached.
#[allow(clippy::too_many_arguments)]
fn connect_lower(
    lower: &[AddrRecord],
    rank: usize,
    world: usize,
    secret: &[u8],
    g: &str,
    opts: &TcpOptions,
    deadline: &Deadline,
) -> Result<Vec<(TcpStream, TcpStream)>> {
    type Slot = Mutex<Option<Result<(TcpStream, TcpStream)>>>;
    let n = lower.len();
    let next = AtomicUsize::new(0);
    let slots: Vec<Slot> = (0..n).map(|_| Mutex::new(None)).collect();
    let work = || loop {
        let to = next.fetch_add(1, Ordering::Relaxed);
        if to >= n {
            break;
        }
        let r = connect_pair(&lower[to].addr, rank, to, world, secret, g, opts, deadline);
        *slots[to].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
    };
    std::thread::scope(|s| {
        for w in 1..n.min(CONNECT_WORKERS) {
            // A worker that cannot be started leaves its share to the others.
            let _ = std::thread::Builder::new()
                .name(format!("tcp-connect-{rank}-{w}"))
                .spawn_scoped(s, work);
        }
        work();
    });
    let mut pairs = Vec::with_capacity(n);
    let mut failed: Option<CommError> = None;
    let mut timeouts: Vec<CommError> = Vec::new();
    for slot in slots {
        match slot.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(Ok(p)) => pairs.push(p),
            Some(Err(e @ CommError::Timeout { .. })) => timeouts.push(e),
            Some(Err(e)) => {
                failed.get_or_insert(e);
            }
            None => {
                failed.get_or_insert(CommError::State(
                    "tcp set-up: a connection was never attempted".into(),
                ));
            }
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    if timeouts.len() > 1 {
        let waited = deadline.elapsed();
        let missing = timeouts
            .into_iter()
            .flat_map(|e| match e {
                CommError::Timeout { missing, .. } => missing,
                _ => Vec::new(),
            })
            .collect();
        return Err(CommError::timeout_ranks(
            format!("tcp set-up of group `{g}`: rank {rank} connecting to the lower ranks"),
            waited,
            missing,
        ));
    }
    match timeouts.pop() {
        Some(e) => Err(e),
        None => Ok(pairs),
    }
}

/// Makes a pair's connections ready for the data plane.
fn finish(data: TcpStream, ctl: TcpStream) -> Result<Peer> {
    for s in [&data, &ctl] {
        s.set_nonblocking(true)
            .and_then(|()| s.set_read_timeout(None))
            .and_then(|()| s.set_write_timeout(None))
            .and_then(|()| s.set_nodelay(true))
            .map_err(|e| CommError::io("configuring a connection", e))?;
    }
    Ok(Peer::new(data, ctl))
}

/// Connects the data then the control connection to lower rank `to`.
#[allow(clippy::too_many_arguments)]
fn connect_pair(
    addr: &SocketAddr,
    rank: usize,
    to: usize,
    world: usize,
    secret: &[u8],
    g: &str,
    opts: &TcpOptions,
    deadline: &Deadline,
) -> Result<(TcpStream, TcpStream)> {
    let one = |channel| {
        let hdr = ClientHeader {
            world: world as u32,
            from: rank as u32,
            to: to as u32,
            channel,
        };
        connect_one(*addr, &hdr, secret, g, opts, deadline)
    };
    let data = one(CHANNEL_DATA)?;
    let ctl = one(CHANNEL_CONTROL)?;
    tracing::debug!(group = %g, rank, "tcp set-up: connected to rank {to} at {addr}");
    Ok((data, ctl))
}

fn connect_one(
    addr: SocketAddr,
    hdr: &ClientHeader,
    secret: &[u8],
    g: &str,
    opts: &TcpOptions,
    deadline: &Deadline,
) -> Result<TcpStream> {
    let mut last_err = String::new();
    while !deadline.expired() {
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .map_err(|e| CommError::io("creating a socket", e))?;
        tune(&sock, opts);
        let bound = deadline.remaining().min(HANDSHAKE_TIMEOUT);
        match sock.connect_timeout(&SockAddr::from(addr), bound.max(Duration::from_millis(1))) {
            Ok(()) => {
                let stream: TcpStream = sock.into();
                match handshake::client(&stream, hdr, secret, g, bound) {
                    Ok(()) => return Ok(stream),
                    Err(ClientError::Refused(e)) => return Err(e),
                    Err(ClientError::Retry(e)) => last_err = e,
                }
            }
            Err(e) => last_err = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(20).min(deadline.remaining()));
    }
    Err(CommError::timeout_ranks(
        format!(
            "tcp set-up of group `{g}`: connecting to rank {} at {addr} (last error: {last_err})",
            hdr.to
        ),
        deadline.elapsed(),
        vec![Missing::new(
            hdr.to as usize,
            "did not accept the connection",
        )],
    ))
}

/// Both connections of each higher rank, indexed by rank.
type Incoming = Vec<(Option<TcpStream>, Option<TcpStream>)>;

/// Accepts and authenticates the higher ranks' connections, any number of
/// handshakes at once, each bounded by [`HANDSHAKE_TIMEOUT`]; at most
/// [`MAX_PENDING`] unauthenticated connections are held (the oldest is
/// dropped for a new one).
fn accept_all(
    listener: &TcpListener,
    srv: &Server<'_>,
    deadline: &Deadline,
    stop: &AtomicBool,
) -> Result<Incoming> {
    let (rank, world) = (srv.rank, srv.world);
    let mut slots: Incoming = (0..world).map(|_| (None, None)).collect();
    let complete =
        |slots: &Incoming| (rank + 1..world).all(|r| slots[r].0.is_some() && slots[r].1.is_some());
    listener
        .set_nonblocking(true)
        .map_err(|e| CommError::io("making the listener non-blocking", e))?;
    let mut pending: Vec<(Pending, PollFlags)> = Vec::new();
    let local = listener.local_addr().ok();
    while !complete(&slots) {
        if stop.load(Ordering::Relaxed) {
            return Ok(slots);
        }
        // New connections: all that are waiting.
        loop {
            match listener.accept() {
                Ok((sock, _)) => {
                    if pending.len() >= MAX_PENDING {
                        let (old, _) = pending.remove(0);
                        tracing::debug!(
                            "tcp set-up: dropping an unauthenticated connection held for {:.1?} \
                             (more than {MAX_PENDING} pending)",
                            old.since.elapsed()
                        );
                    }
                    pending.push((Pending::new(sock)?, PollFlags::IN));
                }
                Err(e) if handshake::accept_error(&e).is_none() => break,
                Err(e) => {
                    return Err(CommError::io(
                        format!(
                            "accepting on {}",
                            local.map_or("?".into(), |a| a.to_string())
                        ),
                        e,
                    ))
                }
            }
        }
        // Progress every handshake; drop the finished, refused and expired.
        let now = Instant::now();
        let mut i = 0;
        while i < pending.len() {
            let expired = now.duration_since(pending[i].0.since) > HANDSHAKE_TIMEOUT;
            match pending[i].0.step(srv) {
                Step::Wait(f) if !expired => {
                    pending[i].1 = f;
                    i += 1;
                }
                Step::Wait(_) => {
                    tracing::debug!(
                        "tcp set-up: dropping a connection whose handshake took too long"
                    );
                    pending.swap_remove(i);
                }
                Step::Done(hdr) => {
                    let (p, _) = pending.swap_remove(i);
                    let from = hdr.from as usize;
                    let slot = &mut slots[from];
                    // A later authenticated connection replaces an earlier one
                    // (a member that retried after its own timeout).
                    if hdr.channel == CHANNEL_DATA {
                        slot.0 = Some(p.sock);
                    } else {
                        slot.1 = Some(p.sock);
                    }
                }
                Step::Drop(why) => {
                    tracing::debug!("tcp set-up: refused a connection: {why}");
                    pending.swap_remove(i);
                }
            }
        }
        if complete(&slots) {
            break;
        }
        if deadline.expired() {
            let missing: Vec<Missing> = (rank + 1..world)
                .filter_map(|r| match &slots[r] {
                    (Some(_), Some(_)) => None,
                    (None, _) => Some(Missing::new(r, "did not connect")),
                    (Some(_), None) => Some(Missing::new(r, "did not open its control connection")),
                })
                .collect();
            return Err(CommError::timeout_ranks(
                format!(
                    "tcp set-up of group `{}`: rank {rank} accepting connections on {}",
                    srv.group,
                    local.map_or("?".into(), |a| a.to_string())
                ),
                deadline.elapsed(),
                missing,
            ));
        }
        let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(pending.len() + 1);
        fds.push(PollFd::new(listener, PollFlags::IN));
        fds.extend(pending.iter().map(|(p, f)| PollFd::new(&p.sock, *f)));
        let rem = deadline.remaining().min(Duration::from_millis(100));
        let ts = rustix::time::Timespec {
            tv_sec: rem.as_secs() as i64,
            tv_nsec: i64::from(rem.subsec_nanos()),
        };
        let _ = rustix::event::poll(&mut fds, Some(&ts));
    }
    Ok(slots)
}
