//! PyTorch's c10d TCPStore protocol: a client behind our [`comm_core::Store`]
//! trait ([`C10dStore`]) and a server ([`C10dServer`]).
//!
//! Under torchrun (torch 2.x) the elastic agent already hosts a c10d
//! `TCPStore` on `MASTER_PORT` and tells the ranks so with
//! `TORCHELASTIC_USE_AGENT_STORE=True`; [`crate::init_store`] then connects
//! to it with [`C10dStore`] instead of starting a server of its own. Ask
//! for this protocol explicitly with `env://?store=c10d` or
//! `tcp://host:port?store=c10d` (rank 0 then hosts a [`C10dServer`]), so a
//! job can mix Python and Rust ranks on one store.
//!
//! Written from PyTorch's documentation of `TCPStore` and from observing a
//! real one (see `benches/peers/c10d_store_check.py`): a query is a command
//! byte and its fields (strings and byte vectors as a `u64` length and the
//! bytes, integers little-endian); a connection starts with `VALIDATE` and
//! [`VALIDATION_MAGIC`]; `WAIT` blocks on the server until the keys exist
//! and is cancelled with `CANCEL_WAIT` when the client's deadline passes.
//!
//! The protocol carries no secret. Where both ends are ours, use
//! [`crate::TcpStore`], which authenticates every connection.

mod client;
mod server;
mod session;
pub(crate) mod wire;

pub use client::C10dStore;
pub use server::C10dServer;
pub use wire::{MAX_KEYS, MAX_KEY_LEN, MAX_VALUE_LEN, VALIDATION_MAGIC};

#[cfg(test)]
pub(crate) use session::C10dProtocol;
