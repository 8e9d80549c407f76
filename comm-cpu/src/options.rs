//! Configuration of the TCP backend (the bind address rules are in [`crate::addr`]).

use std::net::IpAddr;
use std::time::Duration;

/// Environment variable selecting the network interface to bind, with
/// `NCCL_SOCKET_IFNAME`'s rules (see [`crate::IfnameSpec`]): `eth0`, `eth`
/// (prefix), `=eth0` (exact), `eth,ib` (list), `^lo,docker` (exclusions).
pub const SOCKET_IFNAME_ENV: &str = "DIST_SOCKET_IFNAME";

/// Environment variable giving the IP address to bind and advertise directly.
/// Takes precedence over [`SOCKET_IFNAME_ENV`].
pub const SOCKET_ADDR_ENV: &str = "DIST_SOCKET_ADDR";

/// Environment variables overriding the tuning defaults of [`TcpOptions`]
/// (for benchmarking without recompiling): `DIST_TCP_SEGMENT` (bytes),
/// `DIST_TCP_SOCKET_BUFFER` (bytes, 0 = kernel autotuning),
/// `DIST_TCP_BUSY_POLL_US`, `DIST_TCP_SMALL_ALL_REDUCE` (bytes) and
/// `DIST_TCP_SMALL_BROADCAST` (bytes). Sizes take K/M suffixes.
pub const TUNING_ENV: [&str; 5] = [
    "DIST_TCP_SEGMENT",
    "DIST_TCP_SOCKET_BUFFER",
    "DIST_TCP_BUSY_POLL_US",
    "DIST_TCP_SMALL_ALL_REDUCE",
    "DIST_TCP_SMALL_BROADCAST",
];

/// A size from the environment: digits with an optional K/M/G suffix.
fn env_size(name: &str) -> Option<usize> {
    let v = std::env::var(name).ok()?;
    let v = v.trim().to_ascii_uppercase();
    let (num, mult) = match v.chars().last()? {
        'K' => (&v[..v.len() - 1], 1usize << 10),
        'M' => (&v[..v.len() - 1], 1 << 20),
        'G' => (&v[..v.len() - 1], 1 << 30),
        _ => (&v[..], 1),
    };
    num.parse::<usize>().ok()?.checked_mul(mult)
}

/// Options of a [`crate::TcpCommunicator`].
///
/// `TcpOptions::default()` reads [`SOCKET_ADDR_ENV`], [`SOCKET_IFNAME_ENV`]
/// and `MASTER_ADDR` / `MASTER_PORT` (the bind address rules are in
/// [`crate::addr`]: with none of them, `127.0.0.1`, one host only),
/// [`comm_core::TIMEOUT_ENV`] for the deadline and the tuning overrides of
/// [`TUNING_ENV`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TcpOptions {
    /// IP address to bind and advertise. Wins over `interface`.
    pub addr: Option<IpAddr>,
    /// Interface list selecting the address to bind (see
    /// [`crate::IfnameSpec`]). Wins over `master`.
    pub interface: Option<String>,
    /// Host and port of the job's master (`MASTER_ADDR`, `MASTER_PORT`):
    /// with no `addr` or `interface`, the local address of the route towards
    /// it is bound.
    pub master: Option<(String, u16)>,
    /// Port to listen on; 0 (default) picks a free one.
    pub port: u16,
    /// Group identity: part of every store key and of every handshake. Two
    /// communicators on one store need different names.
    pub group_name: String,
    /// Deadline of the connection set-up (store exchange, connect, accept).
    pub connect_timeout: Duration,
    /// SO_SNDBUF / SO_RCVBUF of each connection in bytes; 0 keeps the kernel
    /// default (autotuning). The default, 512 KiB (the kernel doubles it),
    /// covers the bandwidth-delay product of a 10 Gb/s link at 400 µs and
    /// keeps the bytes in flight cache-resident: on loopback, 4 MiB buffers
    /// measured up to 1.5x slower at 8-64 MiB messages than 256-512 KiB ones
    /// (the receiver then copies out skbs already evicted to DRAM).
    pub socket_buffer: usize,
    /// How long a waiting rank keeps retrying non-blocking reads and writes
    /// before it sleeps in `poll()`. Waking a sleeping process costs tens of
    /// microseconds, so short waits are cheaper spun.
    pub busy_poll: Duration,
    /// all_reduce of at most this many bytes uses recursive doubling; larger
    /// ones a ring reduce-scatter + all-gather.
    pub small_all_reduce: usize,
    /// broadcast of at most this many bytes uses a binomial tree; larger ones
    /// a pipelined chain.
    pub small_broadcast: usize,
    /// Granularity, in bytes, at which received ring data is reduced while the
    /// rest of the block is still arriving.
    pub segment: usize,
}

impl Default for TcpOptions {
    fn default() -> Self {
        let addr = std::env::var(SOCKET_ADDR_ENV)
            .ok()
            .and_then(|s| s.trim().parse::<IpAddr>().ok());
        let interface = std::env::var(SOCKET_IFNAME_ENV)
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty());
        let master = std::env::var("MASTER_ADDR")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .map(|h| {
                let port = std::env::var("MASTER_PORT")
                    .ok()
                    .and_then(|p| p.trim().parse().ok())
                    .unwrap_or(29500);
                (h, port)
            });
        let timeout = comm_core::default_timeout();
        let [seg, sockbuf, busy, small_ar, small_bc] = TUNING_ENV;
        TcpOptions {
            addr,
            interface,
            master,
            port: 0,
            group_name: "tcp".into(),
            connect_timeout: timeout,
            socket_buffer: env_size(sockbuf).unwrap_or(512 << 10),
            busy_poll: Duration::from_micros(env_size(busy).unwrap_or(50) as u64),
            small_all_reduce: env_size(small_ar).unwrap_or(64 << 10),
            small_broadcast: env_size(small_bc).unwrap_or(64 << 10),
            segment: env_size(seg).filter(|&s| s > 0).unwrap_or(256 << 10),
        }
    }
}

impl TcpOptions {
    /// Defaults with a set-up deadline of `timeout` (each operation's comes
    /// with the call, from the front).
    pub fn with_timeout(timeout: Duration) -> Self {
        TcpOptions {
            connect_timeout: timeout,
            ..Self::default()
        }
    }

    /// The address a member with these options binds and publishes (the
    /// rules of [`crate::addr`]).
    pub fn bind_ip(&self) -> comm_core::Result<IpAddr> {
        let master = self.master.as_ref().map(|(h, p)| (h.as_str(), *p));
        Ok(crate::addr::choose(self.addr, self.interface.as_deref(), master)?.ip)
    }
}
