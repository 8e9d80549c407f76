//! # dist-utils
//!
//! What every layer needs but is not a collective: stores, rendezvous,
//! environment parsing, the object codec and small helpers.

#![warn(missing_docs)]

pub mod codec;
pub mod file_store;
mod hash_store;
mod helpers;
mod prefix_store;
pub mod rendezvous;
mod same_host;
pub mod spg;
pub mod tcp_store;

pub use file_store::FileStore;
pub use hash_store::{parse_counter, HashStore};
pub use prefix_store::PrefixStore;
pub use spg::StatelessProcessGroup;
pub use tcp_store::{TcpStore, TcpStoreServer};

pub use helpers::{
    compute_padding_for_sp, divide, ensure_divisibility, pad_sequence, split_tensor_along_last_dim,
    unpad_sequence,
};
pub use rendezvous::{init_store, EnvSource, InitMethod, RankInfo};
pub use same_host::{hostname, same_host_ranks};
