//! A key-value store served over TCP, for ranks on different hosts.
//!
//! [`TcpStoreServer`] holds the keys (usually started by rank 0, or by the
//! launcher); every rank talks to it through a [`TcpStore`] client.
//!
//! # Protocol
//!
//! Every message is one frame of [`crate::codec`] (a `u64` little-endian
//! length, then a postcard value). A connection opens with a mutual
//! challenge–response handshake ([`comm_core::auth`]):
//!
//! 1. the server sends `(TCP_STORE_MAGIC, TCP_STORE_VERSION, challenge)`
//!    with a fresh random nonce;
//! 2. the client answers `(magic, version, client nonce + HMAC)`;
//! 3. the server checks the HMAC and answers *accepted* with its own HMAC
//!    (which the client checks), or *refused* with a reason, and closes.
//!
//! The job secret never crosses the wire, and a recorded handshake replayed
//! later is refused (the server's nonce is new each time). The whole
//! handshake must finish within [`ServerOptions::handshake_timeout`].
//! After it the client sends one request and waits for its response, again
//! and again; `get` and `wait` are parked by the server until the keys exist
//! or the client's deadline passes.
//!
//! # Connection model
//!
//! A [`TcpStore`] and all its clones share a small pool of connections
//! (up to [`MAX_IDLE_CONNECTIONS`] idle ones): every in-flight request has
//! its own connection, so a `get` blocked in one thread never delays a
//! `set` from another thread of the same process.
//!
//! The server is one event-loop thread over non-blocking sockets, whatever
//! the number of clients (see [`ServerOptions`] for its limits). A client
//! that disconnects, even in the middle of a request or while parked, only
//! ends its own connection, noticed at once. Dropping the server (or
//! [`TcpStoreServer::shutdown`]) answers parked requests with "shutting
//! down" (the client sees [`comm_core::CommError::Aborted`]), closes every
//! connection and joins the thread.

mod client;
mod proto;
mod server;
mod session;

pub use crate::pool::MAX_IDLE_CONNECTIONS;
pub use crate::server::ServerOptions;
pub use client::TcpStore;
pub use proto::{
    client_handshake, HANDSHAKE_MAX_LEN, MAX_FRAME_LEN, TCP_STORE_MAGIC, TCP_STORE_VERSION,
};
pub use server::TcpStoreServer;

pub(crate) use server::loopback_if_unspecified;
#[cfg(test)]
pub(crate) use {proto::*, session::*};
