//! Configuration of the TCP backend and the choice of the address to bind.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use comm_core::{CommError, Result};

/// Environment variable naming the network interface to bind (the counterpart
/// of `GLOO_SOCKET_IFNAME`), e.g. `eth0`. Its first IPv4 address is used.
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
/// `TcpOptions::default()` reads [`SOCKET_ADDR_ENV`] and [`SOCKET_IFNAME_ENV`]
/// (an unset environment gives `127.0.0.1`, which only works on one host; set
/// one of them, or [`TcpOptions::addr`] / [`TcpOptions::interface`], for
/// multi-host groups), [`comm_core::TIMEOUT_ENV`] for the deadline and the
/// tuning overrides of [`TUNING_ENV`].
#[derive(Debug, Clone)]
pub struct TcpOptions {
    /// IP address to bind and advertise. Wins over `interface`.
    pub addr: Option<IpAddr>,
    /// Network interface whose IPv4 address is bound and advertised.
    pub interface: Option<String>,
    /// Port to listen on; 0 (default) picks a free one.
    pub port: u16,
    /// Group identity: part of every store key and of every handshake. Two
    /// communicators on one store need different names.
    pub group_name: String,
    /// Deadline of every operation (changeable later with `set_timeout`).
    pub timeout: Duration,
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
        let timeout = comm_core::default_timeout();
        let [seg, sockbuf, busy, small_ar, small_bc] = TUNING_ENV;
        TcpOptions {
            addr,
            interface,
            port: 0,
            group_name: "tcp".into(),
            timeout,
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
    /// Defaults with one deadline for set-up and operations.
    pub fn with_timeout(timeout: Duration) -> Self {
        TcpOptions {
            timeout,
            connect_timeout: timeout,
            ..Self::default()
        }
    }

    /// The address to bind: `addr`, else the IPv4 address of `interface`,
    /// else `127.0.0.1`.
    pub fn resolve_ip(&self) -> Result<IpAddr> {
        if let Some(a) = self.addr {
            return Ok(a);
        }
        if let Some(name) = &self.interface {
            return interface_ipv4(name).map(IpAddr::V4);
        }
        Ok(IpAddr::V4(Ipv4Addr::LOCALHOST))
    }
}

/// The IPv4 address of network interface `name` (`SIOCGIFADDR`).
pub fn interface_ipv4(name: &str) -> Result<Ipv4Addr> {
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        addr: [u8; 24],
    }
    const SIOCGIFADDR: rustix::ioctl::Opcode = 0x8915;

    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= 16 || bytes.contains(&0) {
        return Err(CommError::invalid(format!(
            "network interface name `{name}` is not a valid interface name (1 to 15 bytes)"
        )));
    }
    let mut req = IfReq {
        name: [0; 16],
        addr: [0; 24],
    };
    req.name[..bytes.len()].copy_from_slice(bytes);
    let sock = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .map_err(|e| CommError::io("opening a socket to query interfaces", e))?;
    // SAFETY: SIOCGIFADDR reads and writes a `struct ifreq` (16-byte name then a
    // 24-byte union whose first member is a `sockaddr`); `IfReq` has that exact
    // layout and lives for the whole call.
    let r = unsafe {
        rustix::ioctl::ioctl(
            &sock,
            rustix::ioctl::Updater::<SIOCGIFADDR, IfReq>::new(&mut req),
        )
    };
    r.map_err(|e| {
        CommError::invalid(format!(
            "network interface `{name}` (from {SOCKET_IFNAME_ENV} or TcpOptions::interface) has no \
             IPv4 address or does not exist: {e}. Set {SOCKET_ADDR_ENV} to an IP address instead"
        ))
    })?;
    // sockaddr_in: family (2 bytes), port (2 bytes), address (4 bytes).
    let a = &req.addr;
    Ok(Ipv4Addr::new(a[4], a[5], a[6], a[7]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_interface_resolves() {
        assert_eq!(interface_ipv4("lo").unwrap(), Ipv4Addr::LOCALHOST);
        assert!(interface_ipv4("no-such-if0").is_err());
        assert!(interface_ipv4("").is_err());
    }
}
