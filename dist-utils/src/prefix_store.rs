//! Namespacing of a shared store: [`PrefixStore`] lives in comm-core (the
//! checked front and the registry use it) and is re-exported here.

pub use comm_core::PrefixStore;
