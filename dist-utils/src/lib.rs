//! # dist-utils
//!
//! What every layer needs but is not a collective: stores (TCP with a
//! job secret, PyTorch's c10d protocol, file, in-memory), rendezvous,
//! environment parsing, the object codec and small helpers.

#![warn(missing_docs)]

pub mod c10d;
pub mod codec;
pub mod file_store;
mod hash_store;
mod helpers;
mod job;
mod pool;
mod prefix_store;
pub mod rendezvous;
mod same_host;
mod server;
pub mod shm_file;
mod size;
pub mod slurm;
pub mod spg;
pub mod tcp_store;

#[cfg(test)]
mod fuzz;

pub use c10d::{C10dServer, C10dStore};
pub use file_store::FileStore;
pub use hash_store::{parse_counter, HashStore};
pub use prefix_store::PrefixStore;
pub use server::ServerOptions;
pub use spg::StatelessProcessGroup;
pub use tcp_store::{TcpStore, TcpStoreServer};

pub use helpers::{
    compute_padding_for_sp, divide, ensure_divisibility, pad_sequence, split_tensor_along_last_dim,
    unpad_sequence,
};
pub use job::job_id;
pub use rendezvous::{init_store, EnvSource, InitMethod, RankInfo, StoreProtocol};
pub use same_host::{hostname, same_host_ranks};
pub use size::parse_size;
