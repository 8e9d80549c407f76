//! [`Kit`]: a backend factory, a world size and a [`Mode`], run as threads
//! or as processes, every rank creating its communicator through the
//! registry and the checked front, and every rank's result asserted.

use std::sync::Arc;
use std::time::Duration;

use comm_core::{BackendFactory, Device, Registry, Result};

use crate::member::Member;
use crate::ranks::{self, Processes, RankCtx};
use crate::suite::{check_communicator, Failure};

/// Which part of the kit to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Mode {
    /// Every primitive x dtype x reduce op at sizes 0, 1, odd, medium
    /// (past the small-message thresholds) and about 1 MiB; every root;
    /// send/recv rings, pairs and batches; strided all_to_all against a
    /// reference; non-blocking operations. Buffers rotate through tensors,
    /// vectors and sub-slices (device tensors in device mode).
    Basic,
    /// f32 at >= 64 MiB per rank: all_reduce, all_gather, reduce_scatter,
    /// all_to_all, broadcast, send/recv ring.
    Large,
    /// Members calling different dtypes, counts, roots, reduce ops,
    /// collectives or 4-D shapes all get an error, at least one a
    /// `CallMismatch` (needs `Capabilities::checks_calls`; skipped
    /// otherwise).
    Mismatch,
    /// The last rank stays away, aborts, or drops its communicator: every
    /// other rank gets a fatal error within its deadline whose
    /// `culprits()` name that rank (group and global rank).
    Failures,
}

impl Mode {
    /// Every mode, in the order a full run takes them.
    pub const ALL: [Mode; 4] = [Mode::Basic, Mode::Large, Mode::Mismatch, Mode::Failures];

    /// Its name (`basic`, `large`, `mismatch`, `failures`).
    pub const fn name(self) -> &'static str {
        match self {
            Mode::Basic => "basic",
            Mode::Large => "large",
            Mode::Mismatch => "mismatch",
            Mode::Failures => "failures",
        }
    }

    /// Default overall deadline of a job of this mode (debug builds on a
    /// loaded two-core machine; a hang is what it catches).
    pub fn default_deadline(self) -> Duration {
        Duration::from_secs(match self {
            Mode::Basic => 300,
            Mode::Large => 480,
            Mode::Mismatch => 300,
            Mode::Failures => 240,
        })
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Mode::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                format!("unknown mode `{s}`; expected basic, large, mismatch or failures")
            })
    }
}

/// What a passing run did.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Report {
    /// The backend's name.
    pub backend: String,
    /// Number of ranks.
    pub world: usize,
    /// The mode run.
    pub mode: Mode,
    /// True for real processes, false for threads.
    pub processes: bool,
    /// Checks passed, per rank.
    pub checks: Vec<usize>,
    /// What was skipped and why (empty when everything ran).
    pub skipped: Vec<String>,
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl Report {
    /// Checks passed over every rank.
    pub fn total_checks(&self) -> usize {
        self.checks.iter().sum()
    }
}

/// One rank's outcome ([`Kit::run_rank`]).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct RankReport {
    /// Checks this rank passed.
    pub checks: usize,
    /// What was skipped and why.
    pub skipped: Vec<String>,
}

/// The conformance kit for one backend: a factory, a world size, a
/// [`Mode`] and a device, run as threads ([`Kit::run_threads`]) or as real
/// processes ([`Kit::run_processes`]).
///
/// Both panic (failing the calling test) unless every rank passed, naming
/// the first wrong element or the backend's error and where; both have an
/// overall deadline, so a hang fails instead of stalling.
///
/// ```no_run
/// use std::sync::Arc;
/// use comm_conformance::{Kit, Mode};
/// use comm_core::SingleFactory;
///
/// #[test]
/// fn single_rank_basic() {
///     Kit::new(Arc::new(SingleFactory)).world(1).mode(Mode::Basic).run_threads();
/// }
/// ```
#[derive(Debug, Clone)]
pub struct Kit {
    factory: Arc<dyn BackendFactory>,
    world: usize,
    mode: Mode,
    device: Device,
    op_timeout: Duration,
    deadline: Option<Duration>,
    processes: Processes,
}

impl Kit {
    /// The kit for `factory`: world 2, [`Mode::Basic`], host buffers, a
    /// per-operation deadline of `min(DIST_TIMEOUT_S, 60 s)`.
    pub fn new(factory: Arc<dyn BackendFactory>) -> Self {
        Kit {
            factory,
            world: 2,
            mode: Mode::Basic,
            device: Device::Cpu,
            op_timeout: comm_core::default_timeout().min(Duration::from_secs(60)),
            deadline: None,
            processes: Processes::new(2),
        }
    }

    /// The kit for the factory registered as `name` in `registry`.
    pub fn from_registry(registry: &Registry, name: &str) -> Result<Self> {
        Ok(Self::new(registry.get(name)?))
    }

    /// Number of ranks.
    pub fn world(mut self, world: usize) -> Self {
        self.world = world;
        self
    }

    /// What to run.
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Where the buffers live. `Device::Cuda(n)` puts rank `r`'s buffers on
    /// `cuda:((n + local rank) % visible devices)` with
    /// [`Tensor::to_device`](comm_core::Tensor::to_device); it needs a
    /// device allocator installed in the process
    /// ([`comm_core::install_device_allocator`], e.g. `comm_nccl::install()`),
    /// and the run is skipped with a message without one. Backends that
    /// serve the device get it in their context; host backends get
    /// `Device::Cpu` and the front stages the buffers.
    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// Deadline of set-up and of each operation of the communicators.
    pub fn op_timeout(mut self, t: Duration) -> Self {
        self.op_timeout = t;
        self
    }

    /// Overall deadline of the run (default: [`Mode::default_deadline`]).
    pub fn deadline(mut self, t: Duration) -> Self {
        self.deadline = Some(t);
        self
    }

    /// How [`run_processes`](Self::run_processes) starts its ranks (a
    /// wrapper command, the store's address, extra environment); its world
    /// size and deadline are the kit's.
    pub fn processes(mut self, p: Processes) -> Self {
        self.processes = p;
        self
    }

    fn job_deadline(&self) -> Duration {
        self.deadline
            .unwrap_or_else(|| self.mode.default_deadline())
    }

    fn label(&self, how: &str) -> String {
        format!(
            "conformance {} {} world {} ({how}, {})",
            self.factory.name(),
            self.mode,
            self.world,
            self.device
        )
    }

    /// Runs the ranks as threads of this process over one in-memory store.
    pub fn run_threads(&self) -> Report {
        let kit = self.clone();
        let results = ranks::timed_threads(self.world, self.job_deadline(), move |ctx| {
            let rank = ctx.rank;
            kit.member(&ctx, &mut |line: &str| {
                if rank == 0 {
                    println!("[rank 0] {line}");
                }
            })
        });
        let label = self.label("threads");
        let (results, elapsed) = match results {
            Ok(r) => r,
            Err(e) => panic!("{label}: {e}"),
        };
        let mut failures = Vec::new();
        let mut report = self.report(false);
        for (r, res) in results.into_iter().enumerate() {
            match res {
                Ok(rr) => {
                    report.checks[r] = rr.checks;
                    merge(&mut report.skipped, rr.skipped);
                }
                Err(f) => failures.push(f),
            }
        }
        if !failures.is_empty() {
            panic!("{label}: FAILED:\n{}", failures.join("\n"));
        }
        report.elapsed = elapsed;
        self.announce(&report, &label);
        report
    }

    /// Runs the ranks as real processes: the current test binary is
    /// re-executed once per rank (see [`ranks`](crate::ranks)), the ranks
    /// meet through the launcher's store, and every rank must pass.
    pub fn run_processes(&self) -> Report {
        let procs = self
            .processes
            .clone()
            .ranks(self.world)
            .deadline(self.job_deadline());
        let out = procs.run(|ctx| {
            let rank = ctx.rank;
            let r = self.member(ctx, &mut |line: &str| {
                if rank == 0 {
                    println!("{line}");
                }
            })?;
            for s in &r.skipped {
                println!("{SKIPPED}{rank}: {s}");
            }
            println!("{PASSED}{rank}: {} checks", r.checks);
            Ok(())
        });
        let label = self.label("processes");
        let mut report = self.report(true);
        for (r, lines) in out.stdout.iter().enumerate() {
            for l in lines {
                // libtest may have started the line ("test name ... ").
                let find = |p: &str| l.find(p).map(|i| &l[i + p.len()..]);
                if let Some(rest) = find(&format!("{PASSED}{r}: ")) {
                    report.checks[r] = rest
                        .split_whitespace()
                        .next()
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0);
                } else if let Some(s) = find(&format!("{SKIPPED}{r}: ")) {
                    merge(&mut report.skipped, vec![s.to_string()]);
                }
            }
        }
        print!("{}", out.logs());
        report.elapsed = out.elapsed;
        self.announce(&report, &label);
        report
    }

    fn report(&self, processes: bool) -> Report {
        Report {
            backend: self.factory.name().to_string(),
            world: self.world,
            mode: self.mode,
            processes,
            checks: vec![0; self.world],
            skipped: Vec::new(),
            elapsed: Duration::ZERO,
        }
    }

    fn announce(&self, report: &Report, label: &str) {
        // Straight to stderr, past libtest's capture: skips must be seen.
        for s in &report.skipped {
            eprintln!("{label}: skipped: {s}");
        }
        eprintln!(
            "{label}: passed, {} checks in {:.1} s",
            report.total_checks(),
            report.elapsed.as_secs_f64()
        );
    }

    /// Runs this rank's part of the kit in a job started elsewhere (a
    /// launcher such as `distrun`, Slurm or mpirun; see [`crate::join`]):
    /// every rank of the job calls it with its own context, and the kit's
    /// world size must be the job's. `log` receives one line per section.
    /// A failure is also recorded in the job's store, so that the other
    /// ranks stop at their next meeting point instead of at their deadline.
    pub fn run_rank(
        &self,
        ctx: &RankCtx,
        log: &mut dyn FnMut(&str),
    ) -> std::result::Result<RankReport, Failure> {
        if ctx.world != self.world {
            return Err(format!(
                "rank {}: the job has {} ranks but the kit was set up for {}",
                ctx.rank, ctx.world, self.world
            ));
        }
        self.member(ctx, log)
    }

    /// One rank's whole run; a failure is also recorded in the store, so
    /// that the other ranks stop at their next meeting point.
    fn member(
        &self,
        ctx: &RankCtx,
        log: &mut dyn FnMut(&str),
    ) -> std::result::Result<RankReport, Failure> {
        let r = self.member_run(ctx, log);
        if let Err(e) = &r {
            crate::member::fail(ctx.store.as_ref(), ctx.rank, e);
        }
        r
    }

    fn member_run(
        &self,
        ctx: &RankCtx,
        log: &mut dyn FnMut(&str),
    ) -> std::result::Result<RankReport, Failure> {
        let rank = ctx.rank;
        let buffers = match buffer_device(self.device, ctx.local_rank) {
            Ok(d) => d,
            Err(why) => return unavailable(rank, why),
        };
        let comm_device = if self.factory.serves(buffers) {
            buffers
        } else {
            Device::Cpu
        };
        if let Err(e) = self.factory.available(comm_device) {
            return unavailable(
                rank,
                format!("{} on {comm_device}: {e}", self.factory.name()),
            );
        }
        let mut registry = Registry::new();
        registry.register_arc(self.factory.clone());
        let mut m = Member {
            registry: &registry,
            backend: self.factory.name(),
            store: ctx.store.clone(),
            rank,
            world: ctx.world,
            comm_device,
            buffers,
            timeout: self.op_timeout,
            skipped: Vec::new(),
        };
        let checks = match self.mode {
            Mode::Basic | Mode::Large => {
                let comm = m.communicator(self.mode.name(), None)?;
                check_communicator(&comm, Some(ctx.store.as_ref()), self.mode, buffers, log)?
            }
            Mode::Mismatch => crate::mismatch::run(&mut m, log)?,
            Mode::Failures => crate::failures::run(&mut m, log)?,
        };
        Ok(RankReport {
            checks,
            skipped: m.skipped,
        })
    }
}

/// Set to `1` to make a run that cannot happen here (no device, backend
/// unavailable) fail instead of being skipped with a message: for CI
/// machines that must run it (a GPU runner).
pub const REQUIRE_ENV: &str = "COMM_CONFORMANCE_REQUIRE";

/// A whole run that cannot happen here: skipped with `why`, or a failure
/// with [`REQUIRE_ENV`]` = 1`.
fn unavailable(rank: usize, why: String) -> std::result::Result<RankReport, Failure> {
    if std::env::var(REQUIRE_ENV).as_deref() == Ok("1") {
        return Err(format!(
            "rank {rank}: {why} (and {REQUIRE_ENV}=1 says it must run)"
        ));
    }
    Ok(RankReport {
        checks: 0,
        skipped: vec![why],
    })
}

/// Line prefixes a rank of a process run reports with.
const PASSED: &str = "comm-conformance: passed: rank ";
const SKIPPED: &str = "comm-conformance: skipped: rank ";

fn merge(into: &mut Vec<String>, from: Vec<String>) {
    for s in from {
        if !into.contains(&s) {
            into.push(s);
        }
    }
}

/// Where rank `local_rank`'s buffers go for `requested`, or why device
/// mode cannot run here.
fn buffer_device(requested: Device, local_rank: usize) -> std::result::Result<Device, String> {
    let Device::Cuda(first) = requested else {
        return Ok(Device::Cpu);
    };
    if let Err(e) = comm_core::device_allocator(requested) {
        return Err(format!("device mode ({requested}): {e}"));
    }
    match comm_core::visible_devices() {
        0 => Err(format!(
            "device mode ({requested}): the installed device allocator sees no device"
        )),
        n => Ok(Device::Cuda((first + local_rank) % n)),
    }
}

/// [`Kit::run_threads`] for `factory`: `world` ranks as threads.
pub fn run_threads(
    factory: Arc<dyn BackendFactory>,
    world: usize,
    mode: Mode,
    device: Device,
) -> Report {
    Kit::new(factory)
        .world(world)
        .mode(mode)
        .device(device)
        .run_threads()
}

/// [`Kit::run_processes`] for `factory`: `world` ranks as processes of
/// the current test binary.
pub fn run_processes(
    factory: Arc<dyn BackendFactory>,
    world: usize,
    mode: Mode,
    device: Device,
) -> Report {
    Kit::new(factory)
        .world(world)
        .mode(mode)
        .device(device)
        .run_processes()
}
