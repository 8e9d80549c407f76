//! Connection set-up through the store: one listen address per rank, a full
//! mesh where the higher rank connects to the lower, and a handshake on every
//! connection carrying the group secret, the group identity and both ranks.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use comm_core::{CommError, Deadline, Result, Store};
use rustix::event::{PollFd, PollFlags};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::mesh::Peer;
use crate::TcpOptions;

const HELLO_MAGIC: &[u8; 8] = b"DISTTCP1";
const SECRET_LEN: usize = 32;
/// magic + secret + group hash + world + from + to.
const HELLO_LEN: usize = 8 + SECRET_LEN + 8 + 4 + 4 + 4;
const ACCEPTED: u8 = 1;
const REFUSED: u8 = 0;
/// Longest a single incoming connection may take to say hello, so a silent
/// stranger cannot hold up the group for long.
const HELLO_TIMEOUT: Duration = Duration::from_secs(2);

/// FNV-1a of the group name: the group identity carried by handshakes.
fn group_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

fn random_secret() -> Result<[u8; SECRET_LEN]> {
    let mut s = [0u8; SECRET_LEN];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut s))
        .map_err(|e| CommError::io("reading /dev/urandom for the group secret", e))?;
    Ok(s)
}

fn hello(secret: &[u8], group: u64, world: usize, from: usize, to: usize) -> [u8; HELLO_LEN] {
    let mut h = [0u8; HELLO_LEN];
    h[..8].copy_from_slice(HELLO_MAGIC);
    h[8..8 + SECRET_LEN].copy_from_slice(secret);
    let mut o = 8 + SECRET_LEN;
    h[o..o + 8].copy_from_slice(&group.to_le_bytes());
    o += 8;
    for v in [world, from, to] {
        h[o..o + 4].copy_from_slice(&(v as u32).to_le_bytes());
        o += 4;
    }
    h
}

fn tune(sock: &Socket, opts: &TcpOptions) -> Result<()> {
    if opts.socket_buffer > 0 {
        // Best effort: the kernel caps these at net.core.{w,r}mem_max.
        let _ = sock.set_send_buffer_size(opts.socket_buffer);
        let _ = sock.set_recv_buffer_size(opts.socket_buffer);
    }
    Ok(())
}

fn finish(stream: &TcpStream) -> Result<()> {
    stream
        .set_nodelay(true)
        .map_err(|e| CommError::io("setting TCP_NODELAY", e))?;
    Ok(())
}

/// Everything `new` needs from set-up.
pub(crate) struct Connected {
    pub(crate) peers: Vec<Option<Peer>>,
    pub(crate) local_addr: SocketAddr,
}

/// Binds, publishes, connects and accepts; returns one connection per peer.
pub(crate) fn connect_mesh(
    store: &Arc<dyn Store>,
    rank: usize,
    world: usize,
    opts: &TcpOptions,
) -> Result<Connected> {
    let deadline = Deadline::after(opts.connect_timeout);
    let g = &opts.group_name;
    let ip = opts.resolve_ip()?;
    let bind = SocketAddr::new(ip, opts.port);
    let lsock = Socket::new(Domain::for_address(bind), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| CommError::io("creating the listening socket", e))?;
    let _ = lsock.set_reuse_address(true);
    tune(&lsock, opts)?;
    lsock.bind(&SockAddr::from(bind)).map_err(|e| {
        CommError::io(
            format!("binding {bind} (see DIST_SOCKET_ADDR / DIST_SOCKET_IFNAME)"),
            e,
        )
    })?;
    lsock
        .listen(world.max(16) as i32 * 2)
        .map_err(|e| CommError::io(format!("listening on {bind}"), e))?;
    let listener: TcpListener = lsock.into();
    let local_addr = listener
        .local_addr()
        .map_err(|e| CommError::io("reading the listening address", e))?;

    let secret_key = format!("{g}/secret");
    if rank == 0 {
        store.set(&secret_key, &random_secret()?)?;
    }
    store.set(
        &format!("{g}/addr/{rank}"),
        local_addr.to_string().as_bytes(),
    )?;
    let secret = store.get(&secret_key, deadline.remaining())?;
    if secret.len() != SECRET_LEN {
        return Err(CommError::Protocol(format!(
            "store key `{secret_key}` holds {} bytes, not a {SECRET_LEN}-byte group secret",
            secret.len()
        )));
    }
    let gh = group_hash(g);
    let mut peers: Vec<Option<Peer>> = (0..world).map(|_| None).collect();

    // Higher ranks connect to lower ones.
    #[allow(clippy::needless_range_loop)]
    for to in 0..rank {
        let key = format!("{g}/addr/{to}");
        let raw = store.get(&key, deadline.remaining())?;
        let addr: SocketAddr = std::str::from_utf8(&raw)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                CommError::Protocol(format!("store key `{key}` does not hold a socket address"))
            })?;
        let stream = connect_one(addr, opts, &deadline, to)?;
        let mut stream = stream;
        stream
            .set_write_timeout(Some(deadline.remaining().max(Duration::from_millis(1))))
            .and_then(|_| {
                stream.set_read_timeout(Some(deadline.remaining().max(Duration::from_millis(1))))
            })
            .map_err(|e| CommError::io("setting handshake timeouts", e))?;
        stream
            .write_all(&hello(&secret, gh, world, rank, to))
            .map_err(|e| {
                CommError::io(format!("sending the handshake to rank {to} at {addr}"), e)
            })?;
        let mut ack = [REFUSED];
        match stream.read_exact(&mut ack) {
            Ok(()) if ack[0] == ACCEPTED => {}
            Ok(()) | Err(_) if deadline.expired() => {
                return Err(CommError::timeout(
                    format!("tcp set-up of group `{g}`: handshake with rank {to} at {addr}"),
                    deadline.elapsed(),
                    [format!("rank {to}")],
                ))
            }
            _ => {
                return Err(CommError::Protocol(format!(
                    "rank {to} at {addr} refused the handshake of rank {rank} in group `{g}` \
                     (different secret, group name or world size: is another job on that port?)"
                )))
            }
        }
        finish(&stream)?;
        peers[to] = Some(Peer::new(stream));
    }

    // Accept the higher ranks, refusing strangers.
    listener
        .set_nonblocking(true)
        .map_err(|e| CommError::io("making the listener non-blocking", e))?;
    let mut expected = world - 1 - rank;
    while expected > 0 {
        let (stream, from_addr) = match listener.accept() {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if deadline.expired() {
                    let missing: Vec<String> = (rank + 1..world)
                        .filter(|&r| peers[r].is_none())
                        .map(|r| format!("rank {r}"))
                        .collect();
                    return Err(CommError::timeout(
                        format!("tcp set-up of group `{g}`: rank {rank} accepting connections on {local_addr}"),
                        deadline.elapsed(),
                        missing,
                    ));
                }
                let rem = deadline.remaining().min(Duration::from_millis(200));
                let ts = rustix::time::Timespec {
                    tv_sec: rem.as_secs() as i64,
                    tv_nsec: rem.subsec_nanos() as i64,
                };
                let mut fds = [PollFd::new(&listener, PollFlags::IN)];
                let _ = rustix::event::poll(&mut fds, Some(&ts));
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CommError::io(format!("accepting on {local_addr}"), e)),
        };
        let Ok(from) = accept_hello(&stream, &secret, gh, world, rank, &deadline) else {
            // A stranger, another job or a stale process: refuse and go on.
            let mut s = &stream;
            let _ = s.write_all(&[REFUSED]);
            let _ = from_addr;
            continue;
        };
        if peers[from].is_some() {
            let mut s = &stream;
            let _ = s.write_all(&[REFUSED]);
            continue;
        }
        let mut s = &stream;
        s.write_all(&[ACCEPTED])
            .map_err(|e| CommError::io(format!("acknowledging rank {from}"), e))?;
        stream
            .set_nonblocking(false)
            .map_err(|e| CommError::io("configuring an accepted socket", e))?;
        finish(&stream)?;
        peers[from] = Some(Peer::new(stream));
        expected -= 1;
    }
    for p in peers.iter().flatten() {
        p.sock
            .set_nonblocking(true)
            .map_err(|e| CommError::io("making a connection non-blocking", e))?;
        p.sock
            .set_read_timeout(None)
            .and_then(|_| p.sock.set_write_timeout(None))
            .map_err(|e| CommError::io("clearing socket timeouts", e))?;
    }
    Ok(Connected { peers, local_addr })
}

fn connect_one(
    addr: SocketAddr,
    opts: &TcpOptions,
    deadline: &Deadline,
    to: usize,
) -> Result<TcpStream> {
    let mut last_err = None;
    while !deadline.expired() {
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .map_err(|e| CommError::io("creating a socket", e))?;
        tune(&sock, opts)?;
        match sock.connect_timeout(
            &SockAddr::from(addr),
            deadline.remaining().max(Duration::from_millis(1)),
        ) {
            Ok(()) => return Ok(sock.into()),
            Err(e) => {
                last_err = Some(e);
                std::thread::sleep(Duration::from_millis(20).min(deadline.remaining()));
            }
        }
    }
    Err(CommError::timeout(
        format!(
            "tcp set-up: connecting to rank {to} at {addr}{}",
            last_err
                .map(|e| format!(" (last error: {e})"))
                .unwrap_or_default()
        ),
        deadline.elapsed(),
        [format!("rank {to}")],
    ))
}

/// Reads and checks one handshake; returns the peer's rank.
fn accept_hello(
    stream: &TcpStream,
    secret: &[u8],
    gh: u64,
    world: usize,
    rank: usize,
    deadline: &Deadline,
) -> std::result::Result<usize, ()> {
    stream.set_nonblocking(false).map_err(|_| ())?;
    let t = deadline
        .remaining()
        .min(HELLO_TIMEOUT)
        .max(Duration::from_millis(1));
    stream.set_read_timeout(Some(t)).map_err(|_| ())?;
    stream.set_write_timeout(Some(t)).map_err(|_| ())?;
    let mut h = [0u8; HELLO_LEN];
    let mut s = stream;
    s.read_exact(&mut h).map_err(|_| ())?;
    let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().expect("4 bytes")) as usize;
    let o = 8 + SECRET_LEN;
    let ok = &h[..8] == HELLO_MAGIC
        && comm_core::secrets_equal(&h[8..o], secret)
        && u64::from_le_bytes(h[o..o + 8].try_into().expect("8 bytes")) == gh
        && u32_at(o + 8) == world
        && u32_at(o + 16) == rank;
    let from = u32_at(o + 12);
    if ok && from > rank && from < world {
        Ok(from)
    } else {
        Err(())
    }
}
