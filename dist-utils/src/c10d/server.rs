//! [`C10dServer`]: a c10d TCPStore server on the shared event loop.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};

use comm_core::Result;

use super::session::C10dProtocol;
use crate::server::{ServerHandle, ServerOptions};
use crate::tcp_store::loopback_if_unspecified;

/// A server of PyTorch's c10d TCPStore protocol, so that Python ranks
/// (`torch.distributed.TCPStore(host, port, is_master=False)`) and our
/// [`super::C10dStore`] clients can share one store.
///
/// The protocol has no secret; the server only checks the validation magic.
/// A connection must validate within [`ServerOptions::handshake_timeout`],
/// and at most [`ServerOptions::max_unauthenticated`] connections may be
/// unvalidated at once (the oldest is closed first), as for
/// [`crate::TcpStoreServer`].
pub struct C10dServer {
    handle: ServerHandle,
}

impl fmt::Debug for C10dServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("C10dServer")
            .field("addr", &self.local_addr())
            .finish_non_exhaustive()
    }
}

impl C10dServer {
    /// Binds `addr` (port 0 picks a free port) and starts serving.
    pub fn bind(addr: impl ToSocketAddrs + fmt::Debug) -> Result<Self> {
        Self::bind_with(addr, ServerOptions::default())
    }

    /// [`Self::bind`] with explicit limits.
    pub fn bind_with(addr: impl ToSocketAddrs + fmt::Debug, opts: ServerOptions) -> Result<Self> {
        Ok(C10dServer {
            handle: ServerHandle::spawn(addr, C10dProtocol, opts)?,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.handle.local_addr()
    }

    /// [`Self::local_addr`] with an unspecified IP replaced by loopback.
    pub fn connect_addr(&self) -> SocketAddr {
        loopback_if_unspecified(self.local_addr())
    }

    /// Number of client connections currently open.
    pub fn num_connections(&self) -> usize {
        self.handle.num_connections()
    }

    /// Number of connections that have not validated yet.
    pub fn num_unauthenticated(&self) -> usize {
        self.handle.num_unauthenticated()
    }

    /// Stops serving, closes every connection and joins the server thread.
    /// Dropping the server does the same.
    pub fn shutdown(mut self) {
        self.handle.stop();
    }
}
