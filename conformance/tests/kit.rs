//! The kit itself: backends that lie (results never move, calls that hang,
//! mismatches not checked, the messenger blamed) must fail it, in thread
//! and in process mode, with a message that says what was wrong.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;

use comm_conformance::{Kit, Mode};
use comm_core::{
    BackendFactory, BufMut, BufRef, Call, Capabilities, CommError, Device, DeviceCommunicator,
    GroupContext, P2p, ReduceOp, Result,
};

/// How a [`Liar`] misbehaves.
#[derive(Debug, Clone, Copy)]
enum Lie {
    /// Every call returns `Ok` at once and moves nothing.
    NoOp,
    /// Every call blocks forever.
    Hangs,
    /// Claims to check call descriptions, but never does (and moves nothing).
    IgnoresMismatch,
    /// Every all_reduce fails blaming group rank 0, whoever is missing.
    BlamesRankZero,
}

#[derive(Debug)]
struct Liar {
    lie: Lie,
    rank: usize,
    world: usize,
}

impl Liar {
    fn op(&self, call: &Call<'_>) -> Result<()> {
        match self.lie {
            Lie::NoOp | Lie::IgnoresMismatch | Lie::BlamesRankZero => Ok(()),
            Lie::Hangs => loop {
                // Nothing ever unparks it: a backend stuck for good.
                std::thread::park_timeout(
                    call.deadline.remaining().max(Duration::from_secs(1)) * 1000,
                );
            },
        }
    }
}

impl DeviceCommunicator for Liar {
    fn backend(&self) -> &str {
        "liar"
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::default();
        c.checks_calls = matches!(self.lie, Lie::IgnoresMismatch);
        c
    }
    fn all_reduce(&mut self, call: &Call<'_>, _: BufMut<'_>, _: ReduceOp) -> Result<()> {
        if let Lie::BlamesRankZero = self.lie {
            return Err(CommError::peer_lost(0, call.name(), "made up"));
        }
        self.op(call)
    }
    fn all_gather(&mut self, call: &Call<'_>, _: BufRef<'_>, _: BufMut<'_>) -> Result<()> {
        self.op(call)
    }
    fn reduce_scatter(
        &mut self,
        call: &Call<'_>,
        _: BufRef<'_>,
        _: BufMut<'_>,
        _: ReduceOp,
    ) -> Result<()> {
        self.op(call)
    }
    fn broadcast(&mut self, call: &Call<'_>, _: BufMut<'_>, _: usize) -> Result<()> {
        self.op(call)
    }
    fn gather(
        &mut self,
        call: &Call<'_>,
        _: BufRef<'_>,
        _: Option<BufMut<'_>>,
        _: usize,
    ) -> Result<()> {
        self.op(call)
    }
    fn all_to_all(&mut self, call: &Call<'_>, _: BufRef<'_>, _: BufMut<'_>) -> Result<()> {
        self.op(call)
    }
    fn send_recv(&mut self, call: &Call<'_>, _: &mut [P2p<'_>]) -> Result<()> {
        self.op(call)
    }
    fn barrier(&mut self, call: &Call<'_>) -> Result<()> {
        self.op(call)
    }
}

#[derive(Debug)]
struct LiarFactory(Lie);

impl BackendFactory for LiarFactory {
    fn name(&self) -> &str {
        "liar"
    }
    fn serves(&self, device: Device) -> bool {
        device == Device::Cpu
    }
    fn create(&self, ctx: &GroupContext) -> Result<Box<dyn DeviceCommunicator>> {
        Ok(Box::new(Liar {
            lie: self.0,
            rank: ctx.rank,
            world: ctx.world,
        }))
    }
}

fn kit(lie: Lie, world: usize, mode: Mode) -> Kit {
    Kit::new(Arc::new(LiarFactory(lie))).world(world).mode(mode)
}

/// The panic message of `f`, which must panic.
fn failure(f: impl FnOnce()) -> String {
    let p = catch_unwind(AssertUnwindSafe(f)).expect_err("the kit passed a lying backend");
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

#[test]
fn results_that_never_move_fail_in_threads() {
    let msg = failure(|| {
        kit(Lie::NoOp, 2, Mode::Basic).run_threads();
    });
    assert!(
        msg.contains("WRONG RESULT") || msg.contains("barrier returned before rank"),
        "{msg}"
    );
    assert!(msg.contains("liar basic world 2 (threads"), "{msg}");
}

#[test]
fn results_that_never_move_fail_in_processes() {
    let msg = failure(|| {
        kit(Lie::NoOp, 2, Mode::Basic).run_processes();
    });
    assert!(msg.contains("the job failed"), "{msg}");
    assert!(
        msg.contains("WRONG RESULT") || msg.contains("barrier returned before rank"),
        "{msg}"
    );
}

#[test]
fn a_hang_fails_at_the_deadline() {
    let msg = failure(|| {
        kit(Lie::Hangs, 2, Mode::Basic)
            .op_timeout(Duration::from_secs(600))
            .deadline(Duration::from_secs(5))
            .run_threads();
    });
    assert!(
        msg.contains("still running after the deadline of 5s"),
        "{msg}"
    );
}

#[test]
fn a_mismatch_that_succeeds_fails() {
    let msg = failure(|| {
        kit(Lie::IgnoresMismatch, 2, Mode::Mismatch).run_threads();
    });
    assert!(msg.contains("the call SUCCEEDED"), "{msg}");
}

#[test]
fn blaming_the_wrong_rank_fails() {
    let msg = failure(|| {
        kit(Lie::BlamesRankZero, 3, Mode::Failures).run_threads();
    });
    assert!(msg.contains("not group rank 2 (global rank 102)"), "{msg}");
}
