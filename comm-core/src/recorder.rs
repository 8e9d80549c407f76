//! The flight recorder: each communicator keeps its last calls (what, when,
//! how it ended), so a timeout can say where the members' call sequences
//! diverge and, with [`FLIGHT_RECORDER_ENV`] set, each rank dumps its record
//! to a file.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::time::{Duration, Instant, SystemTime};

use crate::CallDesc;

/// Environment variable naming a directory: on a fatal error (timeout,
/// lost or aborting peer, mismatch) every rank writes its flight record there
/// as `flight-<group>-rank<global rank>.txt`.
pub const FLIGHT_RECORDER_ENV: &str = "DIST_FLIGHT_RECORDER_DIR";

/// Environment variable setting how many calls each communicator remembers
/// (default [`DEFAULT_CAPACITY`]).
pub const FLIGHT_RECORDER_SIZE_ENV: &str = "DIST_FLIGHT_RECORDER_SIZE";

/// Calls remembered by default.
pub const DEFAULT_CAPACITY: usize = 64;

/// How a recorded call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallState {
    /// Started (or queued) and not finished.
    Started,
    /// Enqueued on an asynchronous backend's stream.
    Enqueued,
    /// Finished successfully.
    Completed,
    /// Failed, with the error text.
    Failed(String),
}

/// One recorded call.
#[derive(Debug, Clone)]
pub struct Record {
    /// What was called.
    pub desc: CallDesc,
    /// When it started.
    pub started: Instant,
    /// How long it took, once finished.
    pub took: Option<Duration>,
    /// How it ended.
    pub state: CallState,
}

/// The last calls of one communicator.
#[derive(Debug)]
pub struct Recorder {
    calls: VecDeque<Record>,
    capacity: usize,
}

impl Recorder {
    /// A recorder keeping the last `capacity` calls (at least one).
    pub fn new(capacity: usize) -> Self {
        Recorder {
            calls: VecDeque::with_capacity(capacity.max(1)),
            capacity: capacity.max(1),
        }
    }

    /// A recorder sized from [`FLIGHT_RECORDER_SIZE_ENV`].
    pub fn from_env() -> Self {
        let cap = std::env::var(FLIGHT_RECORDER_SIZE_ENV)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(DEFAULT_CAPACITY);
        Self::new(cap)
    }

    /// Records the start of `desc`.
    pub fn start(&mut self, desc: CallDesc) {
        if self.calls.len() == self.capacity {
            self.calls.pop_front();
        }
        self.calls.push_back(Record {
            desc,
            started: Instant::now(),
            took: None,
            state: CallState::Started,
        });
    }

    /// Records how the call `desc` ended (the most recent with that
    /// description, usually the last one).
    pub fn finish(&mut self, desc: &CallDesc, state: CallState) {
        if let Some(r) = self.calls.iter_mut().rev().find(|r| r.desc == *desc) {
            r.took = Some(r.started.elapsed());
            r.state = state;
        }
    }

    /// The recorded calls, oldest first.
    pub fn calls(&self) -> impl Iterator<Item = &Record> {
        self.calls.iter()
    }

    /// The oldest call that has not completed, else the last one.
    pub fn position(&self) -> Option<&Record> {
        self.calls
            .iter()
            .find(|r| r.state != CallState::Completed)
            .or_else(|| self.calls.back())
    }

    /// A readable dump: one line per call.
    pub fn dump(&self, header: &str) -> String {
        let mut out = format!(
            "# flight record: {header}\n# written {:?}\n",
            SystemTime::now()
        );
        let now = Instant::now();
        for r in &self.calls {
            let _ = writeln!(
                out,
                "{}  started {:.3?} ago  {}  {:?}",
                r.desc,
                now.saturating_duration_since(r.started),
                r.took
                    .map_or("running".to_string(), |t| format!("took {t:.3?}")),
                r.state
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Collective, DType};

    #[test]
    fn keeps_the_last_calls_and_finds_the_position() {
        let mut r = Recorder::new(2);
        for s in 0..3 {
            let d = CallDesc::new(Collective::AllReduce, s, DType::F32, 4);
            r.start(d);
            if s < 2 {
                r.finish(&d, CallState::Completed);
            }
        }
        assert_eq!(r.calls().count(), 2);
        assert_eq!(r.position().map(|p| p.desc.seq), Some(2));
        assert!(r.dump("test").contains("all_reduce #2"));
    }
}
