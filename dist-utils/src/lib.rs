//! # dist-utils
//!
//! What every layer needs but is not a collective: stores, rendezvous,
//! environment parsing, the object codec and small helpers.

#![warn(missing_docs)]

mod hash_store;

pub use hash_store::{parse_counter, HashStore};
