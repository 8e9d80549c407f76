//! The collective conformance suite every backend runs: every primitive x
//! dtype x reduce op, at sizes 0, 1, not a multiple of the world size, and a
//! medium size that crosses the backends' small/large algorithm switch, plus a
//! separate large mode (>= 64 MiB, f32). Every result is checked exactly on
//! every rank (avg on floats within a tolerance).

use std::time::Instant;

use comm_core::{DType, DeviceCommunicator, ReduceOp, Store, Tensor};

use crate::data::{compare, reduced, tolerance, value, Pattern};

/// Which part of the suite to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every primitive x dtype x op at sizes 0, 1, odd and medium.
    Basic,
    /// f32 only, a few primitives at >= 64 MiB.
    Large,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "basic" => Ok(Mode::Basic),
            "large" => Ok(Mode::Large),
            _ => Err(format!("unknown mode `{s}`; expected basic or large")),
        }
    }
}

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

/// What went wrong in one check.
pub type Failure = String;

/// Moves a freshly built host tensor to where the communicator wants it
/// (identity for host backends, a copy to `cuda:N` for device runs).
pub type Place<'a> = &'a dyn Fn(Tensor) -> comm_core::Result<Tensor>;

/// Runs the suite on `comm` with host tensors. `store` (the job's store),
/// when given, lets the barrier check that every rank had arrived. Returns
/// the number of checks that passed, or the first failure, described.
pub fn run(
    comm: &mut dyn DeviceCommunicator,
    store: Option<&dyn Store>,
    mode: Mode,
    log: &mut dyn FnMut(&str),
) -> Result<usize, Failure> {
    run_on(comm, store, mode, &Ok, log)
}

/// [`run`] with every input and output tensor passed through `place` first
/// (e.g. onto a CUDA device); results are copied back to the host to be
/// checked.
pub fn run_on(
    comm: &mut dyn DeviceCommunicator,
    store: Option<&dyn Store>,
    mode: Mode,
    place: Place<'_>,
    log: &mut dyn FnMut(&str),
) -> Result<usize, Failure> {
    let mut s = Suite {
        place,
        rank: comm.rank(),
        world: comm.world_size(),
        comm,
        store,
        salt: 0x5eed,
        checks: 0,
    };
    match mode {
        Mode::Basic => s.basic(log),
        Mode::Large => s.large(log),
    }?;
    Ok(s.checks)
}

struct Suite<'a> {
    place: Place<'a>,
    comm: &'a mut dyn DeviceCommunicator,
    store: Option<&'a dyn Store>,
    rank: usize,
    world: usize,
    salt: u64,
    checks: usize,
}

fn sentinel(dtype: DType) -> f64 {
    // Outside the Reduce patterns' ranges for every dtype (and rare in Unique).
    match dtype {
        DType::U8 => 251.0,
        _ => 123.0,
    }
}

impl Suite<'_> {
    /// A tensor of `n` elements, `t[i] = f(i)`, where the communicator wants it.
    fn filled(&self, dtype: DType, n: usize, f: impl Fn(usize) -> f64) -> Result<Tensor, Failure> {
        (self.place)(crate::data::filled(dtype, n, f))
            .map_err(|e| format!("rank {}: placing a {dtype} tensor of {n}: {e}", self.rank))
    }

    fn next_salt(&mut self) -> u64 {
        self.salt += 1;
        self.salt
    }

    fn section(
        &mut self,
        name: &str,
        log: &mut dyn FnMut(&str),
        f: impl FnOnce(&mut Self) -> Result<(), Failure>,
    ) -> Result<(), Failure> {
        let (start, before) = (Instant::now(), self.checks);
        f(self)?;
        log(&format!(
            "{name}: {} checks passed in {:.2} s",
            self.checks - before,
            start.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    fn basic(&mut self, log: &mut dyn FnMut(&str)) -> Result<(), Failure> {
        let w = self.world;
        let counts = |d: DType| [0, 1, 1000 * w + 3, medium(d)];
        let small_counts = [0, 1, 1000 * w + 3];
        let blocks = |d: DType| [0, 1, 2 * w + 1, medium(d) / w + 1];
        self.section("barrier", log, |s| s.barriers(3))?;
        self.section("all_reduce", log, |s| {
            for dtype in DType::ALL {
                for op in ReduceOp::ALL {
                    for n in counts(dtype) {
                        s.all_reduce(dtype, op, n)?;
                    }
                }
            }
            Ok(())
        })?;
        self.section("reduce_scatter", log, |s| {
            for dtype in DType::ALL {
                for op in ReduceOp::ALL {
                    for b in blocks(dtype) {
                        s.reduce_scatter(dtype, op, b)?;
                    }
                }
            }
            Ok(())
        })?;
        self.section("all_gather", log, |s| {
            for dtype in DType::ALL {
                for n in [0, 1, 1000 * w + 3, medium(dtype) / w + 1] {
                    s.all_gather(dtype, n)?;
                }
            }
            Ok(())
        })?;
        self.section("broadcast", log, |s| {
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
        self.section("gather", log, |s| {
            for dtype in DType::ALL {
                for root in 0..w {
                    for n in small_counts {
                        s.gather(dtype, n, root)?;
                    }
                }
            }
            Ok(())
        })?;
        self.section("all_to_all", log, |s| {
            for dtype in DType::ALL {
                for b in blocks(dtype) {
                    s.all_to_all(dtype, b)?;
                }
            }
            Ok(())
        })?;
        self.section("send_recv ring", log, |s| {
            for dtype in DType::ALL {
                for n in counts(dtype) {
                    s.ring(dtype, n)?;
                }
            }
            Ok(())
        })?;
        self.section("send_recv pairs", log, |s| {
            for dtype in DType::ALL {
                s.pairs(dtype, 1000 * w + 3, 7)?;
                s.pairs(dtype, 0, 1)?;
            }
            Ok(())
        })?;
        // Collectives right after point-to-point traffic must not see it.
        self.section("mixed", log, |s| {
            s.ring(DType::I32, 17)?;
            s.all_reduce(DType::I32, ReduceOp::Sum, 17)?;
            s.barriers(1)
        })?;
        Ok(())
    }

    fn large(&mut self, log: &mut dyn FnMut(&str)) -> Result<(), Failure> {
        let w = self.world;
        let f = DType::F32;
        self.section("large all_reduce sum", log, |s| {
            s.all_reduce(f, ReduceOp::Sum, LARGE)
        })?;
        self.section("large all_reduce max", log, |s| {
            s.all_reduce(f, ReduceOp::Max, LARGE)
        })?;
        self.section("large all_gather", log, |s| s.all_gather(f, LARGE / w + 1))?;
        self.section("large reduce_scatter", log, |s| {
            s.reduce_scatter(f, ReduceOp::Sum, LARGE / w + 1)
        })?;
        self.section("large all_to_all", log, |s| s.all_to_all(f, LARGE / w + 1))?;
        self.section("large broadcast", log, |s| s.broadcast(f, LARGE, w - 1))?;
        self.section("large send_recv ring", log, |s| s.ring(f, LARGE))?;
        self.barriers(1)
    }

    fn passed(&mut self) -> Result<(), Failure> {
        self.checks += 1;
        Ok(())
    }

    fn comm_err(&self, what: &str, e: comm_core::CommError) -> Failure {
        format!(
            "rank {}: {what}: the backend returned an error: {e}",
            self.rank
        )
    }

    fn mismatch(&self, what: &str, m: crate::data::Mismatch) -> Failure {
        format!("rank {}: {what}: WRONG RESULT: {m}", self.rank)
    }

    fn barriers(&mut self, k: usize) -> Result<(), Failure> {
        for _ in 0..k {
            let salt = self.next_salt();
            let key = |r: usize| format!("conformance/barrier/{salt}/{r}");
            if let Some(st) = self.store {
                st.set(&key(self.rank), b"1")
                    .map_err(|e| format!("rank {}: store set before barrier: {e}", self.rank))?;
            }
            self.comm
                .barrier()
                .map_err(|e| self.comm_err("barrier", e))?;
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

    fn all_reduce(&mut self, dtype: DType, op: ReduceOp, n: usize) -> Result<(), Failure> {
        let (salt, rank, world) = (self.next_salt(), self.rank, self.world);
        let what = format!("all_reduce {dtype} {op} n={n} world={world}");
        let mut t = self.filled(dtype, n, |i| {
            value(dtype, Pattern::Reduce(op), salt, rank, i)
        })?;
        self.comm
            .all_reduce(&mut t, op)
            .map_err(|e| self.comm_err(&what, e))?;
        compare(
            &t,
            |i| reduced(dtype, op, salt, world, i),
            |e| tolerance(dtype, op, e),
        )
        .map_err(|m| self.mismatch(&what, m))?;
        self.passed()
    }

    fn reduce_scatter(&mut self, dtype: DType, op: ReduceOp, b: usize) -> Result<(), Failure> {
        let (salt, rank, world) = (self.next_salt(), self.rank, self.world);
        let what = format!("reduce_scatter {dtype} {op} block={b} world={world}");
        let input = self.filled(dtype, world * b, |i| {
            value(dtype, Pattern::Reduce(op), salt, rank, i)
        })?;
        let mut out = self.filled(dtype, b, |_| sentinel(dtype))?;
        self.comm
            .reduce_scatter(&input, &mut out, op)
            .map_err(|e| self.comm_err(&what, e))?;
        compare(
            &out,
            |k| reduced(dtype, op, salt, world, rank * b + k),
            |e| tolerance(dtype, op, e),
        )
        .map_err(|m| self.mismatch(&what, m))?;
        self.passed()
    }

    fn all_gather(&mut self, dtype: DType, n: usize) -> Result<(), Failure> {
        let (salt, rank, world) = (self.next_salt(), self.rank, self.world);
        let what = format!("all_gather {dtype} n={n} world={world}");
        let input = self.filled(dtype, n, |i| value(dtype, Pattern::Unique, salt, rank, i))?;
        let mut out = self.filled(dtype, world * n, |_| sentinel(dtype))?;
        self.comm
            .all_gather(&input, &mut out)
            .map_err(|e| self.comm_err(&what, e))?;
        compare(
            &out,
            |i| value(dtype, Pattern::Unique, salt, i / n, i % n),
            |_| 0.0,
        )
        .map_err(|m| self.mismatch(&what, m))?;
        self.passed()
    }

    fn broadcast(&mut self, dtype: DType, n: usize, root: usize) -> Result<(), Failure> {
        let (salt, rank, world) = (self.next_salt(), self.rank, self.world);
        let what = format!("broadcast {dtype} n={n} root={root} world={world}");
        let mut t = self.filled(dtype, n, |i| value(dtype, Pattern::Unique, salt, rank, i))?;
        self.comm
            .broadcast(&mut t, root)
            .map_err(|e| self.comm_err(&what, e))?;
        compare(
            &t,
            |i| value(dtype, Pattern::Unique, salt, root, i),
            |_| 0.0,
        )
        .map_err(|m| self.mismatch(&what, m))?;
        self.passed()
    }

    fn gather(&mut self, dtype: DType, n: usize, root: usize) -> Result<(), Failure> {
        let (salt, rank, world) = (self.next_salt(), self.rank, self.world);
        let what = format!("gather {dtype} n={n} root={root} world={world}");
        let input = self.filled(dtype, n, |i| value(dtype, Pattern::Unique, salt, rank, i))?;
        if rank == root {
            let mut out = self.filled(dtype, world * n, |_| sentinel(dtype))?;
            self.comm
                .gather(&input, Some(&mut out), root)
                .map_err(|e| self.comm_err(&what, e))?;
            compare(
                &out,
                |i| value(dtype, Pattern::Unique, salt, i / n, i % n),
                |_| 0.0,
            )
            .map_err(|m| self.mismatch(&what, m))?;
        } else {
            self.comm
                .gather(&input, None, root)
                .map_err(|e| self.comm_err(&what, e))?;
        }
        self.passed()
    }

    fn all_to_all(&mut self, dtype: DType, b: usize) -> Result<(), Failure> {
        let (salt, rank, world) = (self.next_salt(), self.rank, self.world);
        let what = format!("all_to_all {dtype} block={b} world={world}");
        let input = self.filled(dtype, world * b, |i| {
            value(dtype, Pattern::Unique, salt, rank, i)
        })?;
        let mut out = self.filled(dtype, world * b, |_| sentinel(dtype))?;
        self.comm
            .all_to_all(&input, &mut out)
            .map_err(|e| self.comm_err(&what, e))?;
        // Block j of the output is block `rank` of member j's input.
        compare(
            &out,
            |i| value(dtype, Pattern::Unique, salt, i / b, rank * b + i % b),
            |_| 0.0,
        )
        .map_err(|m| self.mismatch(&what, m))?;
        self.passed()
    }

    /// Each rank sends to `rank + 1` and receives from `rank - 1`; even ranks
    /// send first, odd ranks receive first, so blocking sends cannot deadlock.
    fn ring(&mut self, dtype: DType, n: usize) -> Result<(), Failure> {
        let (salt, rank, world) = (self.next_salt(), self.rank, self.world);
        if world == 1 {
            return Ok(());
        }
        let what = format!("send/recv ring {dtype} n={n} world={world}");
        let (next, prev) = ((rank + 1) % world, (rank + world - 1) % world);
        let out = self.filled(dtype, n, |i| value(dtype, Pattern::Unique, salt, rank, i))?;
        let mut inp = self.filled(dtype, n, |_| sentinel(dtype))?;
        if rank % 2 == 0 {
            self.comm
                .send(&out, next)
                .map_err(|e| self.comm_err(&what, e))?;
            self.comm
                .recv(&mut inp, prev)
                .map_err(|e| self.comm_err(&what, e))?;
        } else {
            self.comm
                .recv(&mut inp, prev)
                .map_err(|e| self.comm_err(&what, e))?;
            self.comm
                .send(&out, next)
                .map_err(|e| self.comm_err(&what, e))?;
        }
        compare(
            &inp,
            |i| value(dtype, Pattern::Unique, salt, prev, i),
            |_| 0.0,
        )
        .map_err(|m| self.mismatch(&what, m))?;
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
                        let t =
                            self.filled(dtype, n, |i| value(dtype, Pattern::Unique, salt, src, i))?;
                        self.comm
                            .send(&t, dst)
                            .map_err(|e| self.comm_err(&what, e))?;
                    }
                    self.passed()?;
                } else if rank == dst {
                    for (salt, n) in [(s1, n1), (s2, n2)] {
                        let mut t = self.filled(dtype, n, |_| sentinel(dtype))?;
                        self.comm
                            .recv(&mut t, src)
                            .map_err(|e| self.comm_err(&what, e))?;
                        compare(&t, |i| value(dtype, Pattern::Unique, salt, src, i), |_| 0.0)
                            .map_err(|m| self.mismatch(&what, m))?;
                    }
                    self.passed()?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use comm_core::SingleRankCommunicator;

    #[test]
    fn single_rank_passes_the_basic_suite() {
        let store = dist_utils::HashStore::new();
        let mut c = SingleRankCommunicator::new();
        let n = run(&mut c, Some(&store), Mode::Basic, &mut |_| {}).unwrap();
        assert!(n > 400, "{n} checks");
    }

    /// A backend that corrupts one element of every all_reduce: the suite
    /// must notice and say where.
    #[derive(Debug)]
    struct Faulty(SingleRankCommunicator);

    impl DeviceCommunicator for Faulty {
        fn backend(&self) -> &'static str {
            "faulty"
        }
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            1
        }
        fn device(&self) -> comm_core::Device {
            self.0.device()
        }
        fn timeout(&self) -> std::time::Duration {
            self.0.timeout()
        }
        fn set_timeout(&mut self, t: std::time::Duration) {
            self.0.set_timeout(t)
        }
        fn all_reduce(&mut self, t: &mut comm_core::Tensor, op: ReduceOp) -> comm_core::Result<()> {
            self.0.all_reduce(t, op)?;
            if t.numel() > 1 {
                let b = t.as_bytes_mut()?;
                b[b.len() - 1] ^= 0x40;
            }
            Ok(())
        }
        fn all_gather(
            &mut self,
            i: &comm_core::Tensor,
            o: &mut comm_core::Tensor,
        ) -> comm_core::Result<()> {
            self.0.all_gather(i, o)
        }
        fn reduce_scatter(
            &mut self,
            i: &comm_core::Tensor,
            o: &mut comm_core::Tensor,
            op: ReduceOp,
        ) -> comm_core::Result<()> {
            self.0.reduce_scatter(i, o, op)
        }
        fn broadcast(&mut self, t: &mut comm_core::Tensor, root: usize) -> comm_core::Result<()> {
            self.0.broadcast(t, root)
        }
        fn gather(
            &mut self,
            i: &comm_core::Tensor,
            o: Option<&mut comm_core::Tensor>,
            root: usize,
        ) -> comm_core::Result<()> {
            self.0.gather(i, o, root)
        }
        fn all_to_all(
            &mut self,
            i: &comm_core::Tensor,
            o: &mut comm_core::Tensor,
        ) -> comm_core::Result<()> {
            self.0.all_to_all(i, o)
        }
        fn send(&mut self, t: &comm_core::Tensor, dst: usize) -> comm_core::Result<()> {
            self.0.send(t, dst)
        }
        fn recv(&mut self, t: &mut comm_core::Tensor, src: usize) -> comm_core::Result<()> {
            self.0.recv(t, src)
        }
        fn barrier(&mut self) -> comm_core::Result<()> {
            self.0.barrier()
        }
    }

    #[test]
    fn a_wrong_result_is_reported_with_its_index() {
        let mut c = Faulty(SingleRankCommunicator::new());
        let err = run(&mut c, None, Mode::Basic, &mut |_| {}).unwrap_err();
        assert!(err.contains("all_reduce f32 sum n=1003"), "{err}");
        assert!(err.contains("WRONG RESULT: first bad index 1002"), "{err}");
    }
}
