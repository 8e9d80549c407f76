//! The one error type every crate of the workspace returns.

use std::time::Duration;

/// Result alias used across the workspace.
pub type Result<T, E = CommError> = std::result::Result<T, E>;

/// Everything that can go wrong in the distributed layer.
///
/// Each variant's message says what happened and what to try next, so that
/// the text printed by a failed rank is actionable on its own.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommError {
    /// A blocking operation did not complete before its deadline.
    #[error(
        "timeout: `{operation}` waited {waited:?} and did not complete; still missing: {}. \
         Check that every member reached this call (a rank that crashed, took another branch \
         or is stuck in earlier work), or raise the deadline",
        if missing.is_empty() { "unknown".to_string() } else { missing.join(", ") }
    )]
    Timeout {
        /// What was waiting, e.g. `all_reduce on group tp:0`.
        operation: String,
        /// How long it waited.
        waited: Duration,
        /// The ranks or keys that did not arrive.
        missing: Vec<String>,
    },

    /// A peer closed its connection, died, or was reported dead.
    #[error(
        "peer rank {rank} was lost during `{operation}`: {detail}. Look at that rank's own \
         output for the first error; every other member fails fast after it"
    )]
    PeerLost {
        /// Rank (group-local where a group is known) of the peer that went away.
        rank: usize,
        /// The operation that noticed.
        operation: String,
        /// What was observed (EOF, reset, dead pid, ...).
        detail: String,
    },

    /// A caller passed something the operation cannot accept.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// Tensor shapes or element counts do not fit the operation.
    #[error("shape mismatch in `{operation}`: expected {expected}, got {actual}")]
    ShapeMismatch {
        /// The operation that checked.
        operation: String,
        /// What it needed.
        expected: String,
        /// What it was given.
        actual: String,
    },

    /// Tensor dtypes differ where they must agree.
    #[error("dtype mismatch in `{operation}`: expected {expected}, got {actual}")]
    DTypeMismatch {
        /// The operation that checked.
        operation: String,
        /// The dtype it needed.
        expected: String,
        /// The dtype it was given.
        actual: String,
    },

    /// A backend cannot be used in this process (library missing, feature off, wrong device).
    #[error("backend `{backend}` is unavailable: {reason}")]
    BackendUnavailable {
        /// Backend name (`nccl`, `shm`, `tcp`, ...).
        backend: String,
        /// Why, with a hint how to fix it.
        reason: String,
    },

    /// An operating-system I/O error, with what was being done.
    #[error("I/O error while {context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A peer sent something this side did not expect (version skew, corruption, wrong job).
    #[error("protocol error: {0}. Are all ranks running the same build and the same job?")]
    Protocol(String),

    /// NCCL returned a failure code.
    #[error("NCCL error {code} ({name}): {message}")]
    Nccl {
        /// The raw `ncclResult_t` code.
        code: i32,
        /// The symbolic name of the code.
        name: String,
        /// NCCL's own text plus `ncclGetLastError` where available.
        message: String,
    },

    /// A CUDA driver or runtime call failed.
    #[error("CUDA error: {0}")]
    Cuda(String),

    /// Encoding or decoding an object failed.
    #[error("codec error: {0}")]
    Codec(String),

    /// The communicator or queue was aborted or shut down.
    #[error("aborted: {0}")]
    Aborted(String),

    /// Something used before initialisation, or initialised twice.
    #[error("state error: {0}")]
    State(String),
}

impl CommError {
    /// Builds an [`CommError::Io`] from an error and what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        CommError::Io {
            context: context.into(),
            source,
        }
    }

    /// Builds an [`CommError::InvalidArgument`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        CommError::InvalidArgument(msg.into())
    }

    /// Builds a [`CommError::Timeout`].
    pub fn timeout(
        operation: impl Into<String>,
        waited: Duration,
        missing: impl IntoIterator<Item = impl ToString>,
    ) -> Self {
        CommError::Timeout {
            operation: operation.into(),
            waited,
            missing: missing.into_iter().map(|m| m.to_string()).collect(),
        }
    }

    /// Builds a [`CommError::PeerLost`].
    pub fn peer_lost(rank: usize, operation: impl Into<String>, detail: impl Into<String>) -> Self {
        CommError::PeerLost {
            rank,
            operation: operation.into(),
            detail: detail.into(),
        }
    }

    /// Builds a [`CommError::ShapeMismatch`].
    pub fn shape(
        operation: impl Into<String>,
        expected: impl Into<String>,
        actual: impl Into<String>,
    ) -> Self {
        CommError::ShapeMismatch {
            operation: operation.into(),
            expected: expected.into(),
            actual: actual.into(),
        }
    }

    /// Builds a [`CommError::BackendUnavailable`].
    pub fn unavailable(backend: impl Into<String>, reason: impl Into<String>) -> Self {
        CommError::BackendUnavailable {
            backend: backend.into(),
            reason: reason.into(),
        }
    }

    /// True for errors after which the communicator should be considered broken
    /// (a peer is gone, a deadline passed, the stream is out of sync).
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            CommError::Timeout { .. }
                | CommError::PeerLost { .. }
                | CommError::Protocol(_)
                | CommError::Aborted(_)
                | CommError::Io { .. }
                | CommError::Nccl { .. }
        )
    }
}

impl From<std::io::Error> for CommError {
    fn from(e: std::io::Error) -> Self {
        CommError::io("an I/O call", e)
    }
}
