//! The one error type every crate of the workspace returns.
//!
//! Ranks that were missing, died or aborted travel as data ([`RankId`],
//! [`Missing`]), never as text to be parsed: the checked front
//! ([`crate::Communicator`]) fills in global ranks and the group's name, and
//! launchers and tests read [`CommError::culprits`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Result alias used across the workspace.
pub type Result<T, E = CommError> = std::result::Result<T, E>;

/// A member of a group as errors name it: its group-local rank and, once
/// the group layer knows it, its global rank.
///
/// ```
/// use comm_core::RankId;
/// assert_eq!(RankId::local(2).to_string(), "rank 2");
/// assert_eq!(RankId::local(1).with_global(5).to_string(), "group rank 1 (global rank 5)");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RankId {
    /// Rank inside the group (`0..world`).
    pub group: usize,
    /// Rank in the whole job, when known.
    pub global: Option<usize>,
}

impl RankId {
    /// A group-local rank whose global rank is not known here.
    pub const fn local(group: usize) -> Self {
        RankId {
            group,
            global: None,
        }
    }
    /// The same member with its global rank filled in.
    pub const fn with_global(self, global: usize) -> Self {
        RankId {
            group: self.group,
            global: Some(global),
        }
    }
    /// The global rank when known, else the group rank.
    pub fn best(&self) -> usize {
        self.global.unwrap_or(self.group)
    }
}

impl fmt::Display for RankId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.global {
            Some(g) => write!(f, "group rank {} (global rank {g})", self.group),
            None => write!(f, "rank {}", self.group),
        }
    }
}

/// A rank that did not do its part of an operation, and what was still
/// outstanding with it (`receive 0/1048576 bytes`, `not attached`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Missing {
    /// Who.
    pub rank: RankId,
    /// What was outstanding; may be empty.
    pub detail: String,
}

impl Missing {
    /// `rank` with `detail`.
    pub fn new(rank: usize, detail: impl Into<String>) -> Self {
        Missing {
            rank: RankId::local(rank),
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.detail.is_empty() {
            write!(f, "{}", self.rank)
        } else {
            write!(f, "{} ({})", self.rank, self.detail)
        }
    }
}

fn list<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn missing_text(ranks: &[Missing], keys: &[String]) -> String {
    let mut parts: Vec<String> = ranks.iter().map(ToString::to_string).collect();
    parts.extend(keys.iter().cloned());
    if parts.is_empty() {
        "unknown".into()
    } else {
        parts.join(", ")
    }
}

fn note_text(note: &Option<String>) -> String {
    note.as_ref().map(|n| format!(". {n}")).unwrap_or_default()
}

/// Everything that can go wrong in the distributed layer.
///
/// Each variant's message says what happened and what to try next, so that
/// the text printed by a failed rank is actionable on its own. Errors are
/// `Clone` so that a communicator poisoned by one can return it again.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CommError {
    /// A blocking operation did not complete before its deadline.
    #[error(
        "timeout: `{operation}` waited {waited:?} and did not complete; still missing: {}{}. \
         Check that every member reached this call (a rank that crashed, took another branch \
         or is stuck in earlier work), or raise the deadline (DIST_TIMEOUT_S)",
        missing_text(missing, keys),
        note_text(note)
    )]
    Timeout {
        /// What was waiting, e.g. `all_reduce #57 (f32 x 1024) on shm group tp:0`.
        operation: String,
        /// How long it waited.
        waited: Duration,
        /// The ranks that did not arrive.
        missing: Vec<Missing>,
        /// Other things that did not arrive (store keys, ...).
        keys: Vec<String>,
        /// Extra diagnosis: where the ranks' call sequences diverge.
        note: Option<String>,
    },

    /// A peer closed its connection, died, or was reported dead.
    #[error(
        "{peer} was lost during `{operation}`: {detail}. Look at that rank's own output for \
         the first error; every other member fails fast after it"
    )]
    PeerLost {
        /// The peer that went away.
        peer: RankId,
        /// The operation that noticed.
        operation: String,
        /// What was observed (EOF, reset, dead pid, ...).
        detail: String,
    },

    /// A peer gave up on the group and told the others why. `culprits` are
    /// the ranks it blamed (e.g. the ones it timed out waiting for), so the
    /// survivors name the rank at fault, not the messenger.
    #[error(
        "`{operation}` was aborted by {peer}: {reason}{}",
        if culprits.is_empty() { String::new() } else { format!("; it blamed {}", list(culprits)) }
    )]
    PeerAborted {
        /// Who sent the abort.
        peer: RankId,
        /// The operation that noticed.
        operation: String,
        /// The aborting rank's reason.
        reason: String,
        /// The ranks the aborting peer blamed.
        culprits: Vec<Missing>,
    },

    /// Members called different collectives (or the same one with different
    /// arguments) at the same point of the group's call sequence.
    #[error(
        "call mismatch in `{operation}`: this rank called {mine} but {peer} called {theirs}. \
         Every member must make the same collective calls, in the same order, with the same \
         dtype, element count, root, reduce op and shape"
    )]
    CallMismatch {
        /// The operation that noticed.
        operation: String,
        /// The member whose call differs.
        peer: RankId,
        /// This rank's call.
        mine: String,
        /// The peer's call.
        theirs: String,
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
        source: Arc<std::io::Error>,
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

    /// The communicator or queue was aborted or shut down locally.
    #[error("aborted: {0}")]
    Aborted(String),

    /// Something used before initialisation, or initialised twice.
    #[error("state error: {0}")]
    State(String),

    /// A remote procedure (an executor's collective RPC, a worker's
    /// start-up) failed on some members: there the handler returned an
    /// error or panicked. The members themselves are still usable, so this
    /// is not fatal.
    #[error("`{operation}` failed on {}", list(failures))]
    RemoteFailed {
        /// The call, e.g. ``collective_rpc `generate` #12``.
        operation: String,
        /// Each member where it failed, with that member's message.
        failures: Vec<Missing>,
    },
}

impl CommError {
    /// Builds an [`CommError::Io`] from an error and what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        CommError::Io {
            context: context.into(),
            source: Arc::new(source),
        }
    }

    /// Builds an [`CommError::InvalidArgument`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        CommError::InvalidArgument(msg.into())
    }

    /// A [`CommError::Timeout`] for things that are not ranks (store keys,
    /// "some of the members" where a library cannot tell).
    pub fn timeout(
        operation: impl Into<String>,
        waited: Duration,
        missing: impl IntoIterator<Item = impl ToString>,
    ) -> Self {
        CommError::Timeout {
            operation: operation.into(),
            waited,
            missing: Vec::new(),
            keys: missing.into_iter().map(|m| m.to_string()).collect(),
            note: None,
        }
    }

    /// A [`CommError::Timeout`] naming the ranks that did not arrive.
    pub fn timeout_ranks(
        operation: impl Into<String>,
        waited: Duration,
        missing: Vec<Missing>,
    ) -> Self {
        CommError::Timeout {
            operation: operation.into(),
            waited,
            missing,
            keys: Vec::new(),
            note: None,
        }
    }

    /// Builds a [`CommError::PeerLost`] for group-local rank `rank`.
    pub fn peer_lost(rank: usize, operation: impl Into<String>, detail: impl Into<String>) -> Self {
        CommError::PeerLost {
            peer: RankId::local(rank),
            operation: operation.into(),
            detail: detail.into(),
        }
    }

    /// Builds a [`CommError::PeerAborted`]: group-local rank `rank` aborted
    /// for `reason`, blaming `culprits`.
    pub fn peer_aborted(
        rank: usize,
        operation: impl Into<String>,
        reason: impl Into<String>,
        culprits: Vec<Missing>,
    ) -> Self {
        CommError::PeerAborted {
            peer: RankId::local(rank),
            operation: operation.into(),
            reason: reason.into(),
            culprits,
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
                | CommError::PeerAborted { .. }
                | CommError::CallMismatch { .. }
                | CommError::Protocol(_)
                | CommError::Aborted(_)
                | CommError::Io { .. }
                | CommError::Nccl { .. }
        )
    }

    /// The ranks this error holds responsible, most specific first: the
    /// missing ranks of a timeout, the lost peer, the ranks an aborting peer
    /// blamed (or the aborting peer itself when it blamed nobody), the peer
    /// whose call differs, the members where a remote call failed. Empty for
    /// local errors.
    pub fn culprits(&self) -> Vec<RankId> {
        match self {
            CommError::Timeout { missing, .. } => missing.iter().map(|m| m.rank).collect(),
            CommError::PeerLost { peer, .. } | CommError::CallMismatch { peer, .. } => vec![*peer],
            CommError::RemoteFailed { failures, .. } => failures.iter().map(|m| m.rank).collect(),
            CommError::PeerAborted { peer, culprits, .. } => {
                if culprits.is_empty() {
                    vec![*peer]
                } else {
                    culprits.iter().map(|m| m.rank).collect()
                }
            }
            _ => Vec::new(),
        }
    }

    /// Rewrites every group-local rank this error carries with `map`
    /// (group rank -> global rank) and prefixes the operation text with
    /// `context` unless it is already there. The checked front calls this
    /// once per error, so backends only ever deal in group ranks.
    pub fn in_group(self, context: &str, map: &dyn Fn(usize) -> Option<usize>) -> Self {
        let fix = |r: RankId| match (r.global, map(r.group)) {
            (None, Some(g)) => r.with_global(g),
            _ => r,
        };
        let fix_all = |v: Vec<Missing>| {
            v.into_iter()
                .map(|m| Missing {
                    rank: fix(m.rank),
                    detail: m.detail,
                })
                .collect::<Vec<_>>()
        };
        let op = |o: String| {
            if context.is_empty() || o.contains(context) {
                o
            } else if o.is_empty() {
                context.to_string()
            } else {
                format!("{o} on {context}")
            }
        };
        match self {
            CommError::Timeout {
                operation,
                waited,
                missing,
                keys,
                note,
            } => CommError::Timeout {
                operation: op(operation),
                waited,
                missing: fix_all(missing),
                keys,
                note,
            },
            CommError::PeerLost {
                peer,
                operation,
                detail,
            } => CommError::PeerLost {
                peer: fix(peer),
                operation: op(operation),
                detail,
            },
            CommError::PeerAborted {
                peer,
                operation,
                reason,
                culprits,
            } => CommError::PeerAborted {
                peer: fix(peer),
                operation: op(operation),
                reason,
                culprits: fix_all(culprits),
            },
            CommError::CallMismatch {
                operation,
                peer,
                mine,
                theirs,
            } => CommError::CallMismatch {
                operation: op(operation),
                peer: fix(peer),
                mine,
                theirs,
            },
            CommError::RemoteFailed {
                operation,
                failures,
            } => CommError::RemoteFailed {
                operation: op(operation),
                failures: fix_all(failures),
            },
            other => other,
        }
    }

    /// The same error reported again for a later call `operation` that was
    /// refused because of it: the variant (and so the blamed ranks, as data)
    /// stays; the text says which call was refused. Errors without an
    /// operation become [`CommError::Aborted`] naming both.
    pub fn refused_as(self, operation: &str) -> Self {
        let op = |o: String| format!("{operation}; the earlier call: `{o}`");
        match self {
            CommError::Timeout {
                operation: o,
                waited,
                missing,
                keys,
                note,
            } => CommError::Timeout {
                operation: op(o),
                waited,
                missing,
                keys,
                note,
            },
            CommError::PeerLost {
                peer,
                operation: o,
                detail,
            } => CommError::PeerLost {
                peer,
                operation: op(o),
                detail,
            },
            CommError::PeerAborted {
                peer,
                operation: o,
                reason,
                culprits,
            } => CommError::PeerAborted {
                peer,
                operation: op(o),
                reason,
                culprits,
            },
            CommError::CallMismatch {
                operation: o,
                peer,
                mine,
                theirs,
            } => CommError::CallMismatch {
                operation: op(o),
                peer,
                mine,
                theirs,
            },
            other => CommError::Aborted(format!("{operation}: {other}")),
        }
    }

    /// A store wait that timed out on a key only `rank` sets (a group
    /// secret, a segment name, an NCCL id, which member 0 publishes),
    /// restated as a timeout of `operation` naming that rank, so the
    /// waiters blame the member that never got there rather than a key.
    /// Other errors are returned unchanged.
    ///
    /// ```
    /// use comm_core::CommError;
    /// use std::time::Duration;
    /// let e = CommError::timeout("store get `g/secret`", Duration::from_secs(5), ["g/secret"])
    ///     .blaming(0, "did not publish the group secret", "tcp set-up of group `g`");
    /// assert_eq!(e.culprits().iter().map(|r| r.group).collect::<Vec<_>>(), [0]);
    /// ```
    pub fn blaming(
        self,
        rank: usize,
        detail: impl Into<String>,
        operation: impl Into<String>,
    ) -> Self {
        match self {
            CommError::Timeout { waited, .. } => {
                CommError::timeout_ranks(operation, waited, vec![Missing::new(rank, detail)])
            }
            other => other,
        }
    }

    /// Attaches a diagnosis (e.g. the flight recorder's divergence report)
    /// to a timeout; other errors are returned unchanged.
    pub fn with_note(self, text: impl Into<String>) -> Self {
        match self {
            CommError::Timeout {
                operation,
                waited,
                missing,
                keys,
                note,
            } => {
                let text = text.into();
                CommError::Timeout {
                    operation,
                    waited,
                    missing,
                    keys,
                    note: Some(match note {
                        Some(n) => format!("{n}; {text}"),
                        None => text,
                    }),
                }
            }
            other => other,
        }
    }
}

impl From<std::io::Error> for CommError {
    fn from(e: std::io::Error) -> Self {
        CommError::io("an I/O call", e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_group_maps_ranks_and_names_the_group() {
        let e = CommError::timeout_ranks(
            "all_reduce #3",
            Duration::from_secs(1),
            vec![Missing::new(1, "receive 0/8 bytes")],
        )
        .in_group("shm group `dp:0`", &|r| [1, 3].get(r).copied());
        let text = e.to_string();
        assert!(
            text.contains("group rank 1 (global rank 3) (receive 0/8 bytes)"),
            "{text}"
        );
        assert!(text.contains("all_reduce #3 on shm group `dp:0`"), "{text}");
        assert_eq!(e.culprits(), vec![RankId::local(1).with_global(3)]);
    }

    #[test]
    fn aborts_blame_the_culprit_not_the_messenger() {
        let e = CommError::peer_aborted(0, "barrier", "timed out", vec![Missing::new(2, "")]);
        assert_eq!(e.culprits(), vec![RankId::local(2)]);
        let e = CommError::peer_aborted(0, "barrier", "user abort", vec![]);
        assert_eq!(e.culprits(), vec![RankId::local(0)]);
        assert!(e.is_fatal());
    }

    #[test]
    fn remote_failures_name_each_member_and_are_not_fatal() {
        let e = CommError::RemoteFailed {
            operation: "collective_rpc `load` #2".into(),
            failures: vec![
                Missing::new(0, "panicked: boom"),
                Missing::new(2, "error: no GPU"),
            ],
        };
        assert_eq!(
            e.to_string(),
            "`collective_rpc `load` #2` failed on rank 0 (panicked: boom), rank 2 (error: no GPU)"
        );
        assert_eq!(e.culprits(), vec![RankId::local(0), RankId::local(2)]);
        assert!(!e.is_fatal());
    }
}
