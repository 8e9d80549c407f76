//! [`TcpStoreServer`]: the dist-utils store protocol served by the shared
//! event loop.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use comm_core::Result;

use super::session::DistProtocol;
use crate::server::{ServerHandle, ServerOptions};

/// The server side of the TCP store: owns the keys, serves any number of
/// [`crate::TcpStore`] clients that prove they know the job secret.
///
/// One thread runs an event loop over non-blocking sockets (see
/// [`ServerOptions`] for the limits that protect it from hostile or idle
/// connections).
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
    handle: ServerHandle,
}

impl fmt::Debug for TcpStoreServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpStoreServer")
            .field("addr", &self.local_addr())
            .finish_non_exhaustive()
    }
}

impl TcpStoreServer {
    /// Binds `addr` (port 0 picks a free port, see [`Self::local_addr`]) and
    /// starts serving clients that know `secret`, with default limits.
    pub fn bind(addr: impl ToSocketAddrs + fmt::Debug, secret: impl AsRef<[u8]>) -> Result<Self> {
        Self::bind_with(addr, secret, ServerOptions::default())
    }

    /// [`Self::bind`] with explicit limits.
    pub fn bind_with(
        addr: impl ToSocketAddrs + fmt::Debug,
        secret: impl AsRef<[u8]>,
        opts: ServerOptions,
    ) -> Result<Self> {
        let protocol = DistProtocol {
            secret: Arc::new(secret.as_ref().to_vec()),
        };
        Ok(TcpStoreServer {
            handle: ServerHandle::spawn(addr, protocol, opts)?,
        })
    }

    /// The address the server listens on (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.handle.local_addr()
    }

    /// An address a client on this host can connect to: the listen address,
    /// with an unspecified IP (`0.0.0.0`, `::`) replaced by loopback.
    pub fn connect_addr(&self) -> SocketAddr {
        loopback_if_unspecified(self.local_addr())
    }

    /// Number of client connections currently open (authenticated or not).
    pub fn num_connections(&self) -> usize {
        self.handle.num_connections()
    }

    /// Number of connections still in their handshake.
    pub fn num_unauthenticated(&self) -> usize {
        self.handle.num_unauthenticated()
    }

    /// Stops serving: answers blocked requests with "shutting down", closes
    /// every connection and joins the server thread. Dropping the server
    /// does the same.
    pub fn shutdown(mut self) {
        self.handle.stop();
    }
}

/// `a` with an unspecified IP (`0.0.0.0`, `::`) replaced by loopback.
pub(crate) fn loopback_if_unspecified(mut a: SocketAddr) -> SocketAddr {
    if a.ip().is_unspecified() {
        a.set_ip(match a.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    a
}
