//! # comm-cpu
//!
//! The TCP backend of the distributed layer: [`TcpCommunicator`], a
//! [`comm_core::DeviceCommunicator`] for host tensors whose ranks may sit on
//! different hosts. It is also the fallback wherever shared memory is not
//! available.
//!
//! Set-up goes through a [`comm_core::Store`]: each rank binds one listener
//! (address from [`TcpOptions`], `DIST_SOCKET_ADDR` or `DIST_SOCKET_IFNAME`),
//! publishes it, and the ranks connect as a full mesh, the higher rank calling
//! the lower. Every connection opens with a handshake carrying a random
//! per-group secret that rank 0 publishes in the store, the group name and
//! both ranks; anything else on the port is refused.
//!
//! The data plane is non-blocking: one poll loop progresses all sends and
//! receives of a step at once (so two ranks exchanging hundreds of MiB cannot
//! deadlock), spinning briefly on non-blocking calls before it sleeps in
//! `poll()`, and every wait is bounded by the operation's deadline. A peer
//! that closes or dies surfaces as [`comm_core::CommError::PeerLost`] naming
//! it; a member that fails tells the others (an abort message) so they report
//! the root cause rather than each other.
//!
//! ```
//! use std::sync::Arc;
//! use comm_core::{DeviceCommunicator, ReduceOp, Store, Tensor};
//! use comm_cpu::{TcpCommunicator, TcpOptions};
//!
//! let store: Arc<dyn Store> = Arc::new(dist_utils::HashStore::new());
//! let handles: Vec<_> = (0..2)
//!     .map(|rank| {
//!         let store = store.clone();
//!         std::thread::spawn(move || {
//!             let mut c = TcpCommunicator::new(store, rank, 2, TcpOptions::default()).unwrap();
//!             let mut t = Tensor::from_vec1(vec![rank as f32 + 1.0; 4]);
//!             c.all_reduce(&mut t, ReduceOp::Sum).unwrap();
//!             t.to_vec::<f32>().unwrap()
//!         })
//!     })
//!     .collect();
//! for h in handles {
//!     assert_eq!(h.join().unwrap(), vec![3.0; 4]);
//! }
//! ```

#![warn(missing_docs)]

mod comm;
mod mesh;
mod options;
mod setup;

pub use comm::TcpCommunicator;
pub use options::{interface_ipv4, TcpOptions, SOCKET_ADDR_ENV, SOCKET_IFNAME_ENV, TUNING_ENV};
