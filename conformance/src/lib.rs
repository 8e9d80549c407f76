//! # comm-conformance
//!
//! The conformance kit for backends of the distributed layer: the
//! exact-result checks every built-in backend passes, packaged so that a
//! backend written outside this repository runs them with its own
//! [`BackendFactory`](comm_core::BackendFactory), as threads of one test
//! process or as real processes.
//!
//! ```no_run
//! use std::sync::Arc;
//! use comm_conformance::{run_processes, run_threads, Mode};
//! use comm_core::{BackendFactory, Device, SingleFactory};
//!
//! // In your backend crate's tests/conformance.rs:
//! fn factory() -> Arc<dyn BackendFactory> {
//!     Arc::new(SingleFactory) // your factory here
//! }
//!
//! #[test]
//! fn basic_threads() {
//!     run_threads(factory(), 1, Mode::Basic, Device::Cpu);
//! }
//!
//! #[test]
//! fn basic_processes() {
//!     run_processes(factory(), 1, Mode::Basic, Device::Cpu);
//! }
//! ```
//!
//! or, for a whole table of worlds and modes, the [`conformance_tests!`]
//! macro.
//!
//! ## What it checks
//!
//! Every rank creates its communicator the way the group layer does,
//! through a [`Registry`](comm_core::Registry) and the checked front
//! ([`Communicator`](comm_core::Communicator)), so the kit tests the
//! backend behind the same front users get. The [`Mode`]s:
//!
//! - [`Mode::Basic`]: every primitive x dtype x reduce op at sizes 0, 1,
//!   not a multiple of the world size, past the small-message thresholds,
//!   and about 1 MiB; broadcast and gather from every root; send/recv rings,
//!   every ordered pair, batches; strided all_to_all (the Ulysses
//!   all_to_all_4D as [`BlockLayout`](comm_core::BlockLayout)s) against an
//!   index-by-index reference; non-blocking operations (many handles in
//!   flight, waits out of order, `test`, dropped handles, `isend`/`irecv`).
//!   Buffers rotate through [`Tensor`](comm_core::Tensor)s, `Vec<T>` and
//!   borrowed sub-slices. Data is integer-valued ([`data`]), so every result
//!   is checked exactly on every rank.
//! - [`Mode::Large`]: >= 64 MiB per rank.
//! - [`Mode::Mismatch`]: members calling different dtypes, counts, roots,
//!   reduce ops, collectives or shapes all get an error, at least one a
//!   `CommError::CallMismatch` (backends with `checks_calls`; skipped with a
//!   message for others).
//! - [`Mode::Failures`]: a member that stays away, aborts or drops its
//!   communicator is named, as data (`CommError::culprits`), by every other
//!   member within its deadline.
//!
//! ## Thread mode and process mode
//!
//! [`Kit::run_threads`] runs the ranks as threads over an in-memory store.
//! [`Kit::run_processes`] re-executes the current test binary once per
//! rank (see [`ranks`]): real processes, a real TCP store, the launcher of
//! this workspace with an overall deadline. Both fail the test unless every
//! rank passed, and print what was skipped and why.
//!
//! ## Device mode
//!
//! With [`Kit::device`]`(Device::Cuda(n))` the buffers are tensors on the
//! GPU ([`Tensor::to_device`](comm_core::Tensor::to_device)); the process
//! needs an installed device allocator (e.g. `comm_nccl::install()`), and
//! the run is skipped with a message without one (as is a run whose
//! backend says it is unavailable here); set [`REQUIRE_ENV`]`=1` on
//! machines where such runs must happen.
//!
//! ## Running N ranks in any test
//!
//! [`ranks::threads`] and [`ranks::Processes`] are the one helper to run N
//! ranks (threads or processes) for tests that are not conformance runs.

#![warn(missing_docs)]

mod bufs;
pub mod data;
mod failures;
mod kit;
mod member;
mod mismatch;
mod nonblocking;
pub mod ranks;
mod strided;
pub mod suite;

pub use bufs::{Holder, TestBuf};
pub use failures::GLOBAL_OFFSET;
pub use kit::{run_processes, run_threads, Kit, Mode, RankReport, Report, REQUIRE_ENV};
pub use member::meet;
pub use ranks::{join, Processes, RankCtx};
pub use suite::check_communicator;

/// The vocabulary crate, re-exported so that a backend's tests and the kit
/// agree on its version.
pub use comm_core;

/// Writes one `#[test]` per line: a kit run of `factory` with a world size
/// and a [`Mode`], as threads (`run_threads`) or processes
/// (`run_processes`). Attributes before a line (`#[ignore = "slow"]`) go
/// on its test.
///
/// ```no_run
/// use comm_core::SingleFactory;
/// comm_conformance::conformance_tests! { SingleFactory;
///     basic_threads: run_threads(1, Basic),
///     basic_processes: run_processes(1, Basic),
///     #[ignore = "64 MiB per rank"]
///     large_threads: run_threads(1, Large),
/// }
/// ```
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr; $($(#[$attr:meta])* $name:ident: $how:ident($world:expr, $mode:ident)),* $(,)?) => {
        $(
            #[test]
            $(#[$attr])*
            fn $name() {
                let factory: ::std::sync::Arc<dyn $crate::comm_core::BackendFactory> =
                    ::std::sync::Arc::new($factory);
                $crate::Kit::new(factory)
                    .world($world)
                    .mode($crate::Mode::$mode)
                    .$how();
            }
        )*
    };
}
