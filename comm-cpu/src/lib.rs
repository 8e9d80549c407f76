//! # comm-cpu
//!
//! The TCP backend of the distributed layer: [`TcpCommunicator`], a raw
//! [`comm_core::DeviceCommunicator`] over host memory whose ranks may sit on
//! different hosts, registered as `tcp` by [`TcpFactory`]. Users reach it
//! through [`comm_core::Communicator`] (the checked front); it is also the
//! fallback wherever shared memory is not available.
//!
//! Set-up goes through a [`comm_core::Store`]: each rank binds one listener
//! (address chosen by the rules of [`addr`]: `DIST_SOCKET_ADDR`,
//! `DIST_SOCKET_IFNAME`, else the route towards `MASTER_ADDR`), publishes it
//! with its host identity, and the ranks connect as a full mesh, the higher
//! rank calling the lower, with a data and a control connection per pair.
//! Every connection is authenticated by an HMAC challenge-response over a
//! random group secret rank 0 publishes in the store ([`handshake`]): the
//! secret never crosses the wire and a recorded handshake cannot be
//! replayed. Handshakes are served concurrently, each with its own
//! deadline, so strangers on the port cannot stall set-up.
//!
//! The data plane is non-blocking: one poll loop progresses all sends and
//! receives of a step at once (so two ranks exchanging hundreds of MiB cannot
//! deadlock), spinning briefly on non-blocking calls before it sleeps in
//! `poll()`, and every wait is bounded by the call's deadline. Each call's
//! description travels with its first message to each peer and is checked
//! there, so members that call different things get
//! [`comm_core::CommError::CallMismatch`]. A peer that closes or dies
//! surfaces as [`comm_core::CommError::PeerLost`] naming it; a member that
//! fails tells the others over the control connections whom it blames, and
//! waiting members tell each other whom they wait for, so a frozen rank is
//! named by every survivor ([`comm_core::CommError::PeerAborted`] with its
//! culprits) rather than the peers stuck behind it.
//!
//! ```
//! use std::sync::Arc;
//! use comm_core::{Communicator, GroupContext, ReduceOp, Store};
//! use comm_cpu::{TcpCommunicator, TcpOptions};
//!
//! let store: Arc<dyn Store> = Arc::new(dist_utils::HashStore::new());
//! let handles: Vec<_> = (0..2)
//!     .map(|rank| {
//!         let store = store.clone();
//!         std::thread::spawn(move || {
//!             let ctx = GroupContext::new(store.clone(), rank, 2);
//!             let tcp = TcpCommunicator::new(store, rank, 2, TcpOptions::default()).unwrap();
//!             let comm = Communicator::new(Box::new(tcp), ctx.front_options());
//!             let mut v = vec![rank as f32 + 1.0; 4];
//!             comm.all_reduce(&mut v, ReduceOp::Sum).unwrap();
//!             v
//!         })
//!     })
//!     .collect();
//! for h in handles {
//!     assert_eq!(h.join().unwrap(), vec![3.0; 4]);
//! }
//! ```

#![warn(missing_docs)]

pub mod addr;
mod comm;
mod factory;
pub mod handshake;
mod mesh;
mod options;
mod setup;
mod wire;

pub use addr::IfnameSpec;
pub use comm::TcpCommunicator;
pub use factory::TcpFactory;
pub use options::{TcpOptions, SOCKET_ADDR_ENV, SOCKET_IFNAME_ENV, TUNING_ENV};
