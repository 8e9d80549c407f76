//! The TCP backend across real network stacks: every rank in its own network
//! namespace, joined by veth pairs to a bridge, so every byte crosses a
//! virtual link instead of loopback.
//!
//! Topology, built by each test with `ip` (iproute2) and torn down by a drop
//! guard even when the test panics:
//!
//! ```text
//!   ns dlnet<pid><tag>-br:   br0 (bridge) -- r0, r1, r2 (veth ends, bridge ports)
//!                                             |   |   |
//!   ns dlnet<pid><tag>-rI:                   eth0 = 10.213.<net>.(I+1)/24
//! ```
//!
//! The /24 only exists inside these namespaces, and the port numbers are
//! those of fresh namespaces, so tests running in parallel (or other jobs on
//! the host) cannot collide with them. The ranks are this test binary,
//! re-executed inside the namespaces (`comm_conformance::ranks`).
//!
//! - `tcp_suite_across_network_namespaces` runs the kit's basic mode (which
//!   includes ~1 MiB messages) with 3 ranks, one per namespace.
//! - `cut_link_fails_every_rank_within_its_deadline` starts 3 ranks looping
//!   collectives, waits until each has written its `started` marker, takes
//!   rank 2's link down on the bridge side and checks that every rank exits
//!   non-zero with a fatal error whose culprits (as data) name a rank: rank 2
//!   for the two ranks that can still reach each other.
//!
//! Where namespaces cannot be created (not root, no `ip`, an unprivileged
//! container) the tests print `skipped: <reason>` and pass; set
//! `DIST_NETNS_REQUIRED=1` to make that a failure instead. Where namespaces
//! can be created but not wired (bridge, veth, `ip netns exec`), the tests
//! fail: the machine allows the test, so a wiring failure is a real one.
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use comm_conformance::ranks::{self, Processes};
use comm_conformance::{Kit, Mode};
use comm_core::{CommError, Communicator, DType, ReduceOp, Registry, Tensor};
use comm_cpu::TcpFactory;

// The one network-namespace helper of the workspace's tests.
#[path = "../../comm-cpu/tests/common/netns.rs"]
mod netns;
use netns::{no_topology, report, skip, NoTopology, Topology};

/// The two tests run one at a time: CI machines have two cores, and the
/// cut-link test measures how long ranks take to fail.
static SERIAL: Mutex<()> = Mutex::new(());

const WORLD: usize = 3;
/// The store's port in rank 0's namespace: always free there, since the
/// namespace is new.
const MASTER_PORT: u16 = 29_500;
/// Every condition poll re-checks this often; each has its own deadline.
const POLL: Duration = Duration::from_millis(10);

#[test]
fn only_missing_privileges_skip() {
    let u = || NoTopology::Unsupported("not root".into());
    let b = || NoTopology::Broken("veth: operation not supported".into());
    assert!(no_topology("t", u(), false)
        .unwrap()
        .contains("skipped: not root"));
    assert!(no_topology("t", u(), true).is_err());
    assert!(no_topology("t", b(), false)
        .unwrap_err()
        .contains("not wired"));
    assert!(no_topology("t", b(), true).is_err());
}

// ---------------------------------------------------------------------------
// The suite across namespaces

#[test]
fn tcp_suite_across_network_namespaces() {
    const TEST: &str = "tcp_suite_across_network_namespaces";
    let kit = Kit::new(Arc::new(TcpFactory::default()))
        .world(WORLD)
        .mode(Mode::Basic)
        .op_timeout(Duration::from_secs(60))
        .deadline(Duration::from_secs(300));
    if ranks::is_worker() {
        // A rank, already inside its namespace: only the kit's part.
        kit.run_processes();
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let topo = match Topology::build("s", 1, WORLD) {
        Ok(t) => t,
        Err(why) => return skip(TEST, why),
    };
    // The launcher sets RANK; the wrapper picks that rank's namespace and
    // address, then becomes the rank (exec all the way down).
    let script = r#"export DIST_SOCKET_ADDR="$DLNET_SUBNET.$((RANK + 1))"; exec ip netns exec "$DLNET_PREFIX$RANK" "$0" "$@""#;
    let procs = Processes::new(WORLD)
        .wrapper("sh", ["-c", script])
        .master(topo.addr(0), MASTER_PORT)
        .env("DLNET_PREFIX", format!("{}-r", topo.prefix))
        .env("DLNET_SUBNET", topo.subnet());
    let start = Instant::now();
    let r = kit.processes(procs).run_processes();
    report(&format!(
        "{TEST}: {WORLD} ranks in 3 network namespaces passed {} checks in {:.1} s",
        r.total_checks(),
        start.elapsed().as_secs_f64()
    ));
}

// ---------------------------------------------------------------------------
// Cutting a link mid-run

/// The ranks of the cut-link test, killed (and reaped) on drop if still
/// running, before the namespaces are deleted.
struct Ranks {
    children: Vec<Child>,
    /// When each was seen to exit, and its exit code (`None`: killed by a signal).
    ended: Vec<Option<(Instant, Option<i32>)>>,
}

impl Ranks {
    /// Reaps whatever exited since the last call.
    fn poll(&mut self) {
        for (c, e) in self.children.iter_mut().zip(self.ended.iter_mut()) {
            if e.is_none() {
                if let Ok(Some(st)) = c.try_wait() {
                    *e = Some((Instant::now(), st.code()));
                }
            }
        }
    }

    fn running(&self) -> Vec<usize> {
        (0..self.ended.len())
            .filter(|&r| self.ended[r].is_none())
            .collect()
    }
}

impl Drop for Ranks {
    fn drop(&mut self) {
        for (c, e) in self.children.iter_mut().zip(&self.ended) {
            if e.is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn read_log(dir: &Path, r: usize, stream: &str) -> String {
    fs::read_to_string(dir.join(format!("rank{r}.{stream}"))).unwrap_or_default()
}

fn logs(dir: &Path, world: usize) -> String {
    (0..world)
        .map(|r| {
            format!(
                "--- rank {r} stdout:\n{}--- rank {r} stderr:\n{}",
                read_log(dir, r, "out"),
                read_log(dir, r, "err")
            )
        })
        .collect::<Vec<_>>()
        .join("")
}

/// What a rank of the cut-link test printed when it failed: the error's
/// kind and the group ranks it blamed (`FAILED in OP ... KIND culprits=[..]`).
fn parse_failure(line: &str) -> Option<(String, Vec<usize>)> {
    let kind = ["Timeout", "PeerLost", "PeerAborted"]
        .into_iter()
        .find(|k| line.contains(&format!(": {k} culprits=[")))?;
    let list = line.split("culprits=[").nth(1)?.split(']').next()?;
    let ranks = list
        .split(',')
        .filter_map(|r| r.trim().parse().ok())
        .collect();
    Some((kind.to_string(), ranks))
}

#[test]
fn failure_lines_parse() {
    let l =
        "rank 0 FAILED: FAILED in all_gather (iteration 7) after 5.01 s: Timeout culprits=[2]: ...";
    assert_eq!(parse_failure(l), Some(("Timeout".into(), vec![2])));
    let l = "x: PeerAborted culprits=[0, 1]: y";
    assert_eq!(parse_failure(l), Some(("PeerAborted".into(), vec![0, 1])));
    assert_eq!(parse_failure("x: Codec culprits=[]"), None);
}

/// Per-operation deadline inside the cut-link ranks.
const OP_TIMEOUT_S: u64 = 5;
/// The least time given to rendezvous and connection set-up: ranks start
/// one after another on a loaded machine.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Where the cut-link ranks write their markers (`started.R`) and look for
/// a stop request (`stop`).
const DIR_ENV: &str = "DLNET_DIR";
/// How long a cut-link rank loops at most without an error.
const LOOP_MAX: Duration = Duration::from_secs(150);
/// Iterations a cut-link rank completes before it writes its started marker.
const WARM_ITERATIONS: u64 = 3;
/// Elements of the all_reduce every iteration (64 KiB of f32: the
/// small-message algorithm).
const LOOP_SMALL: usize = 16 * 1024;
/// Elements per rank of the all_gather every fourth iteration (1 MiB of
/// f32 per rank: the ring).
const LOOP_LARGE: usize = 256 * 1024;

/// The `CommError` variant of a rank's failure.
fn kind(e: &CommError) -> &'static str {
    match e {
        CommError::Timeout { .. } => "Timeout",
        CommError::PeerLost { .. } => "PeerLost",
        CommError::PeerAborted { .. } => "PeerAborted",
        CommError::CallMismatch { .. } => "CallMismatch",
        _ => "Other",
    }
}

/// Writes `dir/name` atomically (a temporary file renamed into place), so a
/// poller never sees it half written.
fn write_marker(dir: &Path, name: &str, body: &str) -> Result<(), String> {
    let tmp: PathBuf = dir.join(format!(".{name}.tmp"));
    fs::write(&tmp, body)
        .and_then(|()| fs::rename(&tmp, dir.join(name)))
        .map_err(|e| format!("writing the marker {}: {e}", dir.join(name).display()))
}

fn check(t: &Tensor, what: &str, expected: impl Fn(usize) -> f64) -> Result<(), String> {
    let bytes = t.as_bytes().map_err(|e| format!("{what}: {e}"))?;
    comm_conformance::data::compare(bytes, t.dtype(), expected, |_| 0.0)
        .map_err(|m| format!("{what}: WRONG RESULT: {m}"))
}

/// One rank of the cut-link test: runs checked collectives until an
/// error, a stop request, or [`LOOP_MAX`].
fn loop_rank() -> Result<(), String> {
    let dir = PathBuf::from(std::env::var(DIR_ENV).map_err(|_| format!("{DIR_ENV} is not set"))?);
    let job = ranks::join(SETUP_TIMEOUT).map_err(|e| format!("rendezvous: {e}"))?;
    let (rank, world) = (job.rank, job.world);
    let ctx = job.group("loop").timeout(SETUP_TIMEOUT);
    let comm: Communicator = Registry::new()
        .with(TcpFactory::default())
        .create("tcp", &ctx)
        .map_err(|e| format!("connecting the tcp mesh: {e}"))?;
    comm.set_timeout(Duration::from_secs(OP_TIMEOUT_S));
    let start = Instant::now();
    let tri = (world * (world + 1) / 2) as f64;
    let stop_file = dir.join("stop");
    let mut iteration = 0u64;
    loop {
        if start.elapsed() >= LOOP_MAX {
            return Err(format!(
                "no error and no stop request within {LOOP_MAX:?} ({iteration} iterations)"
            ));
        }
        let k = iteration as usize;
        let op_start = Instant::now();
        let step = (|| -> Result<bool, (&'static str, Result<Box<CommError>, String>)> {
            let what = "all_reduce f32 sum (64 KiB)";
            let mut t = comm_conformance::data::filled(DType::F32, LOOP_SMALL, |i| {
                (rank + 1) as f64 * ((k + i) % 7) as f64
            });
            comm.all_reduce(&mut t, ReduceOp::Sum)
                .map_err(|e| (what, Ok(Box::new(e))))?;
            check(&t, what, |i| tri * ((k + i) % 7) as f64).map_err(|m| (what, Err(m)))?;
            if iteration % 4 == 3 {
                let what = "all_gather f32 (1 MiB per rank)";
                let input = comm_conformance::data::filled(DType::F32, LOOP_LARGE, |i| {
                    ((rank * 31 + k + i) % 1000) as f64
                });
                let mut out = Tensor::zeros([world * LOOP_LARGE], DType::F32);
                comm.all_gather(&input, &mut out)
                    .map_err(|e| (what, Ok(Box::new(e))))?;
                check(&out, what, |i| {
                    (((i / LOOP_LARGE) * 31 + k + i % LOOP_LARGE) % 1000) as f64
                })
                .map_err(|m| (what, Err(m)))?;
            }
            let what = "all_reduce i32 max (stop flag)";
            let mut flag = [i32::from(stop_file.exists())];
            comm.all_reduce(&mut flag, ReduceOp::Max)
                .map_err(|e| (what, Ok(Box::new(e))))?;
            Ok(flag[0] == 1)
        })();
        match step {
            Ok(true) => {
                println!("rank {rank}: stopped on request after {iteration} iterations");
                return Ok(());
            }
            Ok(false) => {}
            Err((what, Ok(e))) => {
                let culprits: Vec<usize> = e.culprits().iter().map(|r| r.group).collect();
                return Err(format!(
                    "FAILED in {what} (iteration {iteration}) after {:.2} s in that operation: \
                     {} culprits={culprits:?}: {e}",
                    op_start.elapsed().as_secs_f64(),
                    kind(e.as_ref())
                ));
            }
            Err((what, Err(msg))) => {
                return Err(format!("FAILED in {what} (iteration {iteration}): {msg}"))
            }
        }
        iteration += 1;
        if iteration == WARM_ITERATIONS {
            write_marker(
                &dir,
                &format!("started.{rank}"),
                &format!("pid {}\n", std::process::id()),
            )?;
            println!("rank {rank}: started");
        }
    }
}

#[test]
fn cut_link_fails_every_rank_within_its_deadline() {
    const TEST: &str = "cut_link_fails_every_rank_within_its_deadline";
    /// Every rank must have exited this long after the cut.
    const FAIL_WITHIN: Duration = Duration::from_secs(20);
    /// Rendezvous, mesh set-up and the first iterations (debug build, 2 cores).
    const START_WITHIN: Duration = Duration::from_secs(90);
    const CUT: usize = 2;

    ranks::if_worker(loop_rank);
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let topo = match Topology::build("c", 2, WORLD) {
        Ok(t) => t,
        Err(why) => return skip(TEST, why),
    };
    let dir = tempfile::Builder::new()
        .prefix("dlnet-cut")
        .tempdir()
        .expect("a directory for the ranks' markers and logs");
    let secret = executor::random_hex128().expect("a job secret");
    let worker = ranks::worker_command(TEST).expect("the test binary");

    let mut ranks = Ranks {
        children: Vec::new(),
        ended: vec![None; WORLD],
    };
    for r in 0..WORLD {
        let log = |s: &str| {
            let p = dir.path().join(format!("rank{r}.{s}"));
            fs::File::create(&p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()))
        };
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &topo.ranks[r]])
            .arg(worker.get_program())
            .args(worker.get_args());
        for (k, v) in worker.get_envs() {
            if let Some(v) = v {
                cmd.env(k, v);
            }
        }
        let child = cmd
            .env(DIR_ENV, dir.path())
            .env("RANK", r.to_string())
            .env("WORLD_SIZE", WORLD.to_string())
            .env("LOCAL_RANK", "0")
            .env("LOCAL_WORLD_SIZE", "1")
            .env("MASTER_ADDR", topo.addr(0))
            .env("MASTER_PORT", MASTER_PORT.to_string())
            .env(executor::JOB_SECRET_ENV, &secret)
            .env_remove(executor::STORE_HOSTED_ENV)
            .env("DIST_SOCKET_ADDR", topo.addr(r))
            .stdin(Stdio::null())
            .stdout(log("out"))
            .stderr(log("err"))
            .spawn()
            .unwrap_or_else(|e| panic!("starting rank {r} with `ip netns exec`: {e}"));
        ranks.children.push(child);
    }

    // Wait until every rank has run collectives across the bridge.
    let deadline = Instant::now() + START_WITHIN;
    loop {
        let missing: Vec<usize> = (0..WORLD)
            .filter(|r| !dir.path().join(format!("started.{r}")).exists())
            .collect();
        if missing.is_empty() {
            break;
        }
        ranks.poll();
        if let Some(r) = (0..WORLD).find(|&r| ranks.ended[r].is_some()) {
            panic!(
                "rank {r} exited ({:?}) before every rank had started; logs:\n{}",
                ranks.ended[r].map(|e| e.1),
                logs(dir.path(), WORLD)
            );
        }
        assert!(
            Instant::now() < deadline,
            "ranks {missing:?} did not write their started marker within {START_WITHIN:?}; logs:\n{}",
            logs(dir.path(), WORLD)
        );
        std::thread::sleep(POLL);
    }

    // Pull rank 2's cable at the switch.
    topo.cut(CUT)
        .unwrap_or_else(|e| panic!("cutting rank {CUT}'s link: {e}"));
    let cut_at = Instant::now();

    let deadline = cut_at + FAIL_WITHIN;
    loop {
        ranks.poll();
        let running = ranks.running();
        if running.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ranks {running:?} were still running {FAIL_WITHIN:?} after rank {CUT}'s link was \
             cut (per-operation deadline {OP_TIMEOUT_S} s); logs:\n{}",
            logs(dir.path(), WORLD)
        );
        std::thread::sleep(POLL);
    }

    let mut summary = Vec::new();
    for r in 0..WORLD {
        let (at, code) = ranks.ended[r].expect("every rank was reaped");
        let after = at.duration_since(cut_at).as_secs_f64();
        let err = read_log(dir.path(), r, "err");
        let failed = err
            .lines()
            .find(|l| l.contains(" FAILED in "))
            .unwrap_or_else(|| {
                panic!(
                    "rank {r} (exit {code:?}, {after:.2} s after the cut) printed no FAILED line; \
                 logs:\n{}",
                    logs(dir.path(), WORLD)
                )
            });
        assert!(
            code.is_some_and(|c| c != 0),
            "rank {r} exited with {code:?} after the cut, expected a non-zero exit code: {failed}"
        );
        let (kind, culprits) = parse_failure(failed).unwrap_or_else(|| {
            panic!("rank {r} failed with something other than Timeout, PeerLost or PeerAborted: {failed}")
        });
        assert!(
            !culprits.is_empty() && culprits.iter().all(|c| *c < WORLD && *c != r),
            "rank {r}'s {kind} does not name another rank as its culprit: {failed}"
        );
        // The two ranks that still reach each other must blame the one cut
        // off, not each other (a messenger).
        assert!(
            r == CUT || culprits.contains(&CUT),
            "rank {r}'s {kind} blames {culprits:?}, not rank {CUT} whose link was cut: {failed}"
        );
        summary.push(format!(
            "  rank {r}: exit {code:?} {after:.2} s after the cut: {failed}"
        ));
    }
    report(&format!(
        "{TEST}: every rank failed after rank {CUT}'s link went down (per-operation deadline \
         {OP_TIMEOUT_S} s):\n{}",
        summary.join("\n")
    ));
}
