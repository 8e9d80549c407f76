//! The exact-result checks every backend passes on one communicator: every
//! primitive x dtype x reduce op at sizes 0, 1, not a multiple of the world
//! size, a medium size that crosses the backends' small/large algorithm
//! switches, and about 1 MiB (f32); broadcast and gather from every root;
//! send/recv rings, every ordered pair, and batches; then strided
//! all_to_all and non-blocking operations
//! (`Communicator::scope`). A separate large mode moves >= 64 MiB.
//!
//! Every check goes through the checked front ([`Communicator`]) and rotates
//! through the buffer forms of [`Holder`] (tensors, vectors, sub-slices; or
//! device tensors in device mode). Results are checked exactly on every
//! rank (avg on floats within a tolerance).

use std::time::Instant;

use comm_core::{Communicator, DType, P2pOp, ReduceOp, Store};

use crate::bufs::{comm_error, Holder, TestBuf};
use crate::data::{reduced, tolerance, value, Pattern};
use crate::Mode;

/// Bytes of the medium size: above the backends' small-message thresholds
/// (TCP switches algorithms at 64 KiB, shm's all_reduce and point-to-point
/// slots at 256 KiB), so their large-message algorithms (ring, pipelined
/// chain, reduce-scatter + all-gather, chunked slots) run for every dtype x op.
pub const MEDIUM_BYTES: usize = 256 << 10;

/// Elements of the medium size for `dtype`: [`MEDIUM_BYTES`] plus 3
/// elements, so not a multiple of 2, 4 or any power of two.
pub fn medium(dtype: DType) -> usize {
    MEDIUM_BYTES / dtype.size() + 3
}

/// Elements per rank of the large mode: 64 MiB of f32 (+3, so odd).
pub const LARGE: usize = 16 * 1024 * 1024 + 3;

/// What went wrong in one check: rank, operation, sizes and either the
/// communicator's error or the first wrong element.
pub type Failure = String;

/// Runs the exact-result checks of `mode` ([`Mode::Basic`] or
/// [`Mode::Large`]) on `comm`, with buffers on `device` (`Device::Cpu`: host
/// tensors, vectors and sub-slices in turn). `store` (the job's store), when
/// given, lets the barrier check prove that every rank had arrived. `log`
/// receives one line per section. Returns the number of checks that passed,
/// or the first failure.
///
/// Every member of the group must call this with the same arguments.
pub fn check_communicator(
    comm: &Communicator,
    store: Option<&dyn Store>,
    mode: Mode,
    device: comm_core::Device,
    log: &mut dyn FnMut(&str),
) -> Result<usize, Failure> {
    let holders = match device {
        comm_core::Device::Cpu => Holder::HOST.to_vec(),
        dev => vec![Holder::Device(dev)],
    };
    let mut c = Checks::new(comm, store, holders, log);
    match mode {
        Mode::Basic => {
            c.basic()?;
            crate::strided::run(&mut c)?;
            crate::nonblocking::run(&mut c)?;
        }
        Mode::Large => c.large()?,
        other => {
            return Err(format!(
                "check_communicator runs the basic and large modes; {other} needs fresh \
                 communicators: use Kit"
            ))
        }
    }
    // Leave together, so that no member tears its connections down while
    // another is still in its last operation.
    c.comm
        .barrier()
        .map_err(|e| comm_error(c.rank, "final barrier", e))?;
    Ok(c.checks)
}

/// The state of one member's run of the checks.
pub(crate) struct Checks<'a> {
    pub(crate) comm: &'a Communicator,
    store: Option<&'a dyn Store>,
    pub(crate) rank: usize,
    pub(crate) world: usize,
    salt: u64,
    pub(crate) checks: usize,
    holders: Vec<Holder>,
    turn: usize,
    log: &'a mut dyn FnMut(&str),
}

fn sentinel(dtype: DType) -> f64 {
    // Outside the Reduce patterns' ranges for every dtype (and rare in Unique).
    match dtype {
        DType::U8 => 251.0,
        _ => 123.0,
    }
}

impl<'a> Checks<'a> {
    pub(crate) fn new(
        comm: &'a Communicator,
        store: Option<&'a dyn Store>,
        holders: Vec<Holder>,
        log: &'a mut dyn FnMut(&str),
    ) -> Self {
        Checks {
            rank: comm.rank(),
            world: comm.world_size(),
            comm,
            store,
            salt: 0x5eed,
            checks: 0,
            holders,
            turn: 0,
            log,
        }
    }

    /// True when buffers live on a device (only tensors there).
    pub(crate) fn on_device(&self) -> bool {
        self.holders.iter().any(|h| matches!(h, Holder::Device(_)))
    }

    /// `n` elements, `x[i] = f(i)`, in the next buffer form of the rotation.
    pub(crate) fn buf(
        &mut self,
        dtype: DType,
        n: usize,
        f: impl Fn(usize) -> f64,
    ) -> Result<TestBuf, Failure> {
        let holder = self.holders[self.turn % self.holders.len()];
        self.turn += 1;
        TestBuf::new(holder, dtype, n, f).map_err(|e| {
            format!(
                "rank {}: making a {dtype} buffer of {n} as {holder:?}: {e}",
                self.rank
            )
        })
    }

    /// A buffer of `n` sentinels, for outputs.
    pub(crate) fn out(&mut self, dtype: DType, n: usize) -> Result<TestBuf, Failure> {
        self.buf(dtype, n, |_| sentinel(dtype))
    }

    /// `rank`'s unique value at `i` for `salt`.
    pub(crate) fn unique(dtype: DType, salt: u64, rank: usize, i: usize) -> f64 {
        value(dtype, Pattern::Unique, salt, rank, i)
    }

    pub(crate) fn next_salt(&mut self) -> u64 {
        self.salt += 1;
        self.salt
    }

    pub(crate) fn passed(&mut self) -> Result<(), Failure> {
        self.checks += 1;
        Ok(())
    }

    pub(crate) fn err(&self, what: &str, e: comm_core::CommError) -> Failure {
        comm_error(self.rank, what, e)
    }

    /// Checks `b` against `expected`, naming `what` on failure.
    pub(crate) fn expect(
        &self,
        what: &str,
        b: &TestBuf,
        expected: impl Fn(usize) -> f64,
        tol: impl Fn(f64) -> f64,
    ) -> Result<(), Failure> {
        b.check(expected, tol)
            .map_err(|m| format!("rank {}: {what}: {m}", self.rank))
    }

    pub(crate) fn log(&mut self, line: &str) {
        (self.log)(line);
    }

    pub(crate) fn section(
        &mut self,
        name: &str,
        f: impl FnOnce(&mut Self) -> Result<(), Failure>,
    ) -> Result<(), Failure> {
        let (start, before) = (Instant::now(), self.checks);
        f(self)?;
        let line = format!(
            "{name}: {} checks passed in {:.2} s",
            self.checks - before,
            start.elapsed().as_secs_f64()
        );
        self.log(&line);
        Ok(())
    }

    fn basic(&mut self) -> Result<(), Failure> {
        let w = self.world;
        let counts = |d: DType| [0, 1, 1000 * w + 3, medium(d)];
        let small_counts = [0, 1, 1000 * w + 3];
        let blocks = |d: DType| [0, 1, 2 * w + 1, medium(d) / w + 1];
        self.section("barrier", |s| s.barriers(3))?;
        self.section("all_reduce", |s| {
            for dtype in DType::ALL {
                for op in ReduceOp::ALL {
                    for n in counts(dtype) {
                        s.all_reduce(dtype, op, n)?;
                    }
                }
            }
            Ok(())
        })?;
        self.section("reduce_scatter", |s| {
            for dtype in DType::ALL {
                for op in ReduceOp::ALL {
                    for b in blocks(dtype) {
                        s.reduce_scatter(dtype, op, b)?;
                    }
                }
            }
            Ok(())
        })?;
        self.section("all_gather", |s| {
            for dtype in DType::ALL {
                for n in [0, 1, 1000 * w + 3, medium(dtype) / w + 1] {
                    s.all_gather(dtype, n)?;
                }
            }
            Ok(())
        })?;
        self.section("broadcast", |s| {
            for dtype in DType::ALL {
                for root in 0..w {
                    for n in small_counts {
                        s.broadcast(dtype, n, root)?;
                    }
                }
                // The large-message algorithm from the first and the last rank.
                s.broadcast(dtype, medium(dtype), 0)?;
                s.broadcast(dtype, medium(dtype), w - 1)?;
            }
            Ok(())
        })?;
        self.section("gather", |s| {
            for dtype in DType::ALL {
                for root in 0..w {
                    for n in small_counts {
                        s.gather(dtype, n, root)?;
                    }
                }
            }
            Ok(())
        })?;
        self.section("all_to_all", |s| {
            for dtype in DType::ALL {
                for b in blocks(dtype) {
                    s.all_to_all(dtype, b)?;
                }
            }
            Ok(())
        })?;
        self.section("send_recv ring", |s| {
            for dtype in DType::ALL {
                for n in counts(dtype) {
                    s.ring(dtype, n)?;
                }
            }
            Ok(())
        })?;
        self.section("send_recv pairs", |s| {
            for dtype in DType::ALL {
                s.pairs(dtype, 1000 * w + 3, 7)?;
                s.pairs(dtype, 0, 1)?;
            }
            Ok(())
        })?;
        self.section("batch_send_recv", |s| {
            for dtype in [DType::F32, DType::I8, DType::BF16] {
                for n in [0, 1, 1000 * w + 3, medium(dtype)] {
                    s.batch_both_ways(dtype, n)?;
                }
            }
            Ok(())
        })?;
        // Collectives right after point-to-point traffic must not see it.
        self.section("mixed", |s| {
            s.ring(DType::I32, 17)?;
            s.all_reduce(DType::I32, ReduceOp::Sum, 17)?;
            s.barriers(1)
        })?;
        self.section("~1 MiB", |s| s.mib())?;
        Ok(())
    }

    fn large(&mut self) -> Result<(), Failure> {
        let w = self.world;
        let f = DType::F32;
        self.section("large all_reduce sum", |s| {
            s.all_reduce(f, ReduceOp::Sum, LARGE)
        })?;
        self.section("large all_reduce max", |s| {
            s.all_reduce(f, ReduceOp::Max, LARGE)
        })?;
        self.section("large all_gather", |s| s.all_gather(f, LARGE / w + 1))?;
        self.section("large reduce_scatter", |s| {
            s.reduce_scatter(f, ReduceOp::Sum, LARGE / w + 1)
        })?;
        self.section("large all_to_all", |s| s.all_to_all(f, LARGE / w + 1))?;
        self.section("large broadcast", |s| s.broadcast(f, LARGE, w - 1))?;
        self.section("large send_recv ring", |s| s.ring(f, LARGE))?;
        self.barriers(1)
    }

    /// Every primitive at about 1 MiB of f32 per rank (element counts
    /// that are odd and not multiples of the world size), every reduce op.
    fn mib(&mut self) -> Result<(), Failure> {
        let w = self.world;
        let dtype = DType::F32;
        let n = (1 << 20) / dtype.size() + 1;
        let b = n / w + 1;
        for op in ReduceOp::ALL {
            self.all_reduce(dtype, op, n)?;
        }
        self.reduce_scatter(dtype, ReduceOp::Sum, b)?;
        self.all_gather(dtype, b)?;
        self.broadcast(dtype, n, w - 1)?;
        self.gather(dtype, b, w / 2)?;
        self.all_to_all(dtype, b)?;
        self.ring(dtype, n)
    }

    fn barriers(&mut self, k: usize) -> Result<(), Failure> {
        for _ in 0..k {
            let salt = self.next_salt();
            let key = |r: usize| format!("conformance/barrier/{salt}/{r}");
            if let Some(st) = self.store {
                st.set(&key(self.rank), b"1")
                    .map_err(|e| format!("rank {}: store set before barrier: {e}", self.rank))?;
            }
            self.comm.barrier().map_err(|e| self.err("barrier", e))?;
            if let Some(st) = self.store {
                for r in 0..self.world {
                    let got = st
                        .try_get(&key(r))
                        .map_err(|e| format!("rank {}: store get after barrier: {e}", self.rank))?;
                    if got.is_none() {
                        return Err(format!(
                            "rank {}: barrier returned before rank {r} had entered it",
                            self.rank
                        ));
                    }
                }
            }
            self.passed()?;
        }
        Ok(())
    }

    pub(crate) fn all_reduce(
        &mut self,
        dtype: DType,
        op: ReduceOp,
        n: usize,
    ) -> Result<(), Failure> {
        let (salt, rank, world) = (self.next_salt(), self.rank, self.world);
        let what = format!("all_reduce {dtype} {op} n={n} world={world}");
        let mut t = self.buf(dtype, n, |i| {
            value(dtype, Pattern::Reduce(op), salt, rank, i)
        })?;
        self.comm
            .all_reduce(&mut t, op)
            .map_err(|e| self.err(&what, e))?;
        self.expect(
            &what,
            &t,
            |i| reduced(dtype, op, salt, world, i),
            |e| tolerance(dtype, op, e),
        )?;
        self.passed()
    }

    fn reduce_scatter(&mut self, dtype: DType, op: ReduceOp, b: usize) -> Result<(), Failure> {
        let (salt, rank, world) = (self.next_salt(), self.rank, self.world);
        let what = format!("reduce_scatter {dtype} {op} block={b} world={world}");
        let input = self.buf(dtype, world * b, |i| {
            value(dtype, Pattern::Reduce(op), salt, rank, i)
        })?;
        let mut out = self.out(dtype, b)?;
        self.comm
            .reduce_scatter(&input, &mut out, op)
            .map_err(|e| self.err(&what, e))?;
        self.expect(
            &what,
            &out,
            |k| reduced(dtype, op, salt, world, rank * b + k),
            |e| tolerance(dtype, op, e),
        )?;
        self.passed()
    }

    fn all_gather(&mut self, dtype: DType, n: usize) -> Result<(), Failure> {
        let (salt, rank, world) = (self.next_salt(), self.rank, self.world);
        let what = format!("all_gather {dtype} n={n} world={world}");
        let input = self.buf(dtype, n, |i| Self::unique(dtype, salt, rank, i))?;
        let mut out = self.out(dtype, world * n)?;
        self.comm
            .all_gather(&input, &mut out)
            .map_err(|e| self.err(&what, e))?;
        self.expect(
            &what,
            &out,
            |i| Self::unique(dtype, salt, i / n, i % n),
            |_| 0.0,
        )?;
        self.passed()
    }

    fn broadcast(&mut self, dtype: DType, n: usize, root: usize) -> Result<(), Failure> {
        let (salt, rank, world) = (self.next_salt(), self.rank, self.world);
        let what = format!("broadcast {dtype} n={n} root={root} world={world}");
        let mut t = self.buf(dtype, n, |i| Self::unique(dtype, salt, rank, i))?;
        self.comm
            .broadcast(&mut t, root)
            .map_err(|e| self.err(&what, e))?;
        self.expect(&what, &t, |i| Self::unique(dtype, salt, root, i), |_| 0.0)?;
        self.passed()
    }

    fn gather(&mut self, dtype: DType, n: usize, root: usize) -> Result<(), Failure> {
        let (salt, rank, world) = (self.next_salt(), self.rank, self.world);
        let what = format!("gather {dtype} n={n} root={root} world={world}");
        let input = self.buf(dtype, n, |i| Self::unique(dtype, salt, rank, i))?;
        if rank == root {
            let mut out = self.out(dtype, world * n)?;
            self.comm
                .gather(&input, Some(&mut out), root)
                .map_err(|e| self.err(&what, e))?;
            self.expect(
                &what,
                &out,
                |i| Self::unique(dtype, salt, i / n, i % n),
                |_| 0.0,
            )?;
        } else {
            self.comm
                .gather(&input, None::<&mut TestBuf>, root)
                .map_err(|e| self.err(&what, e))?;
        }
        self.passed()
    }

    fn all_to_all(&mut self, dtype: DType, b: usize) -> Result<(), Failure> {
        let (salt, rank, world) = (self.next_salt(), self.rank, self.world);
        let what = format!("all_to_all {dtype} block={b} world={world}");
        let input = self.buf(dtype, world * b, |i| Self::unique(dtype, salt, rank, i))?;
        let mut out = self.out(dtype, world * b)?;
        self.comm
            .all_to_all(&input, &mut out)
            .map_err(|e| self.err(&what, e))?;
        // Block j of the output is block `rank` of member j's input.
        self.expect(
            &what,
            &out,
            |i| Self::unique(dtype, salt, i / b, rank * b + i % b),
            |_| 0.0,
        )?;
        self.passed()
    }

    /// Each rank sends to `rank + 1` and receives from `rank - 1` with
    /// blocking calls; even ranks send first, odd ranks receive first.
    fn ring(&mut self, dtype: DType, n: usize) -> Result<(), Failure> {
        let (salt, rank, world) = (self.next_salt(), self.rank, self.world);
        if world == 1 {
            return Ok(());
        }
        let what = format!("send/recv ring {dtype} n={n} world={world}");
        let (next, prev) = ((rank + 1) % world, (rank + world - 1) % world);
        let out = self.buf(dtype, n, |i| Self::unique(dtype, salt, rank, i))?;
        let mut inp = self.out(dtype, n)?;
        let c = self.comm;
        let r = if rank % 2 == 0 {
            c.send(&out, next).and_then(|()| c.recv(&mut inp, prev))
        } else {
            c.recv(&mut inp, prev).and_then(|()| c.send(&out, next))
        };
        r.map_err(|e| self.err(&what, e))?;
        self.expect(&what, &inp, |i| Self::unique(dtype, salt, prev, i), |_| 0.0)?;
        self.passed()
    }

    /// One batch per rank: send to both neighbours and receive from both,
    /// all progressed together (no ordering needed to avoid a deadlock).
    fn batch_both_ways(&mut self, dtype: DType, n: usize) -> Result<(), Failure> {
        let (s1, s2, rank, world) = (self.next_salt(), self.next_salt(), self.rank, self.world);
        if world == 1 {
            return Ok(());
        }
        let what = format!("batch_send_recv both ways {dtype} n={n} world={world}");
        let (next, prev) = ((rank + 1) % world, (rank + world - 1) % world);
        let to_next = self.buf(dtype, n, |i| Self::unique(dtype, s1, rank, i))?;
        let to_prev = self.buf(dtype, n, |i| Self::unique(dtype, s2, rank, i))?;
        let mut from_prev = self.out(dtype, n)?;
        let mut from_next = self.out(dtype, n)?;
        let comm = self.comm;
        let r = (|| {
            comm.batch_send_recv(vec![
                P2pOp::recv(&mut from_prev, prev)?,
                P2pOp::send(&to_next, next)?,
                P2pOp::send(&to_prev, prev)?,
                P2pOp::recv(&mut from_next, next)?,
            ])
        })();
        r.map_err(|e| self.err(&what, e))?;
        // With two members prev == next: messages between one pair arrive in
        // order, so the first receive gets the first send.
        self.expect(
            &what,
            &from_prev,
            |i| Self::unique(dtype, s1, prev, i),
            |_| 0.0,
        )?;
        self.expect(
            &what,
            &from_next,
            |i| Self::unique(dtype, s2, next, i),
            |_| 0.0,
        )?;
        self.passed()
    }

    /// Every ordered pair (src, dst) in turn: src sends two messages of
    /// different sizes, dst receives them in order.
    fn pairs(&mut self, dtype: DType, n1: usize, n2: usize) -> Result<(), Failure> {
        let (rank, world) = (self.rank, self.world);
        for src in 0..world {
            for dst in 0..world {
                if src == dst {
                    continue;
                }
                let (s1, s2) = (self.next_salt(), self.next_salt());
                let what = format!("send/recv pair {src}->{dst} {dtype} n={n1},{n2} world={world}");
                if rank == src {
                    for (salt, n) in [(s1, n1), (s2, n2)] {
                        let t = self.buf(dtype, n, |i| Self::unique(dtype, salt, src, i))?;
                        self.comm.send(&t, dst).map_err(|e| self.err(&what, e))?;
                    }
                    self.passed()?;
                } else if rank == dst {
                    for (salt, n) in [(s1, n1), (s2, n2)] {
                        let mut t = self.out(dtype, n)?;
                        self.comm
                            .recv(&mut t, src)
                            .map_err(|e| self.err(&what, e))?;
                        self.expect(&what, &t, |i| Self::unique(dtype, salt, src, i), |_| 0.0)?;
                    }
                    self.passed()?;
                }
            }
        }
        Ok(())
    }
}
