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
//! the host) cannot collide with them.
//!
//! - `tcp_suite_across_network_namespaces` runs the conformance suite plus
//!   ~1 MiB checks of every primitive with 3 ranks through `executor::launch`
//!   (a `sh` wrapper enters the namespace of `$RANK`).
//! - `cut_link_fails_every_rank_within_its_deadline` starts 3 ranks looping
//!   collectives, waits until each has written its `started` marker, takes
//!   rank 2's link down on the bridge side and checks that every rank exits
//!   non-zero with a `Timeout` or `PeerLost` naming a rank, within a bound.
//!
//! Where namespaces cannot be created (not root, no `ip`, an unprivileged
//! container) the tests print `skipped: <reason>` and pass; set
//! `DIST_NETNS_REQUIRED=1` to make that a failure instead.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use executor::{launch, LaunchConfig};

/// The two tests run one at a time: CI machines have two cores, and the
/// cut-link test measures how long ranks take to fail.
static SERIAL: Mutex<()> = Mutex::new(());

const WORLD: usize = 3;
/// The store's port in rank 0's namespace: always free there, since the
/// namespace is new.
const MASTER_PORT: u16 = 29_500;
/// Set to 1 to turn a skip into a failure (e.g. on CI machines that must run
/// these tests).
const REQUIRED_ENV: &str = "DIST_NETNS_REQUIRED";
/// Every condition poll re-checks this often; each has its own deadline.
const POLL: Duration = Duration::from_millis(10);

/// Writes a line straight to the process's stderr, past the test harness's
/// output capture, so skips and timings show in CI logs.
fn report(line: &str) {
    let mut e = std::io::stderr().lock();
    let _ = writeln!(e, "{line}");
}

/// Skips the calling test (or fails it when `DIST_NETNS_REQUIRED=1`).
fn skip(test: &str, reason: &str) {
    if std::env::var(REQUIRED_ENV).as_deref() == Ok("1") {
        panic!("{test}: {reason} (and {REQUIRED_ENV}=1 says this test must run)");
    }
    report(&format!("{test}: skipped: {reason}"));
}

// ---------------------------------------------------------------------------
// Topology

/// Runs `ip ARGS`; on failure the error says which command and what it printed.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("`ip {}` could not be run: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The namespaces of one test; deleting them (on drop) deletes the bridge,
/// the veth pairs and the addresses with them.
#[derive(Debug)]
struct Topology {
    prefix: String,
    bridge: String,
    ranks: Vec<String>,
    net: u8,
    /// Every namespace created so far, deleted on drop.
    created: Vec<String>,
}

impl Topology {
    /// Builds the bridge namespace and `world` rank namespaces on
    /// `10.213.<net>.0/24`. `Err` carries why it cannot be done here; what was
    /// already made is removed.
    fn build(tag: &str, net: u8, world: usize) -> Result<Topology, String> {
        match Command::new("ip").arg("-V").stdin(Stdio::null()).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                return Err(format!(
                    "`ip -V` failed ({}); iproute2 looks broken here",
                    o.status
                ))
            }
            Err(e) => {
                return Err(format!(
                    "the `ip` command (iproute2) is not available: {e}; install iproute2"
                ))
            }
        }
        let prefix = format!("dlnet{}{tag}", std::process::id());
        let mut t = Topology {
            bridge: format!("{prefix}-br"),
            ranks: (0..world).map(|r| format!("{prefix}-r{r}")).collect(),
            prefix,
            net,
            created: Vec::new(),
        };
        t.add_ns(&t.bridge.clone()).map_err(|e| {
            format!(
                "cannot create network namespaces here ({e}); this test needs root (or \
                 CAP_SYS_ADMIN and CAP_NET_ADMIN) outside an unprivileged container"
            )
        })?;
        t.wire(world).map_err(|e| {
            format!("network namespaces can be created, but not wired together here: {e}")
        })?;
        Ok(t)
    }

    fn add_ns(&mut self, name: &str) -> Result<(), String> {
        // The name embeds this process's id, so one that exists is left over
        // from a dead process that had the same id: remove it.
        if Path::new("/run/netns").join(name).exists() {
            let _ = ip(&["netns", "del", name]);
        }
        ip(&["netns", "add", name])?;
        self.created.push(name.to_string());
        Ok(())
    }

    fn wire(&mut self, world: usize) -> Result<(), String> {
        let br = self.bridge.clone();
        ip(&["-n", &br, "link", "set", "lo", "up"])?;
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &br, "link", "set", "br0", "up"])?;
        for r in 0..world {
            let ns = self.ranks[r].clone();
            let port = Self::bridge_port(r);
            let cidr = format!("{}/24", self.addr(r));
            self.add_ns(&ns)?;
            ip(&[
                "-n", &br, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            ip(&["-n", &br, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &br, "link", "set", &port, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &ns, "addr", "add", &cidr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        // `ip netns exec` also needs a private mount namespace and /sys.
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ranks[0], "true"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("`ip netns exec` could not be run: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "`ip netns exec {} true` failed ({}): {}",
                self.ranks[0],
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(())
    }

    /// Rank `r`'s address.
    fn addr(&self, r: usize) -> String {
        format!("10.213.{}.{}", self.net, r + 1)
    }

    /// The bridge-side end of rank `r`'s veth pair (in the bridge namespace).
    fn bridge_port(r: usize) -> String {
        format!("r{r}")
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            if let Err(e) = ip(&["netns", "del", ns]) {
                report(&format!("warning: cleaning up namespace {ns}: {e}"));
            }
        }
    }
}

/// A directory for markers and logs, removed on drop.
#[derive(Debug)]
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------
// The suite across namespaces

#[test]
fn tcp_suite_across_network_namespaces() {
    const TEST: &str = "tcp_suite_across_network_namespaces";
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let topo = match Topology::build("s", 1, WORLD) {
        Ok(t) => t,
        Err(reason) => return skip(TEST, &reason),
    };
    // The launcher sets RANK; the wrapper picks that rank's namespace and
    // address, then becomes the worker (exec all the way down).
    let script = r#"export DIST_SOCKET_ADDR="$DLNET_SUBNET.$((RANK + 1))"; exec ip netns exec "$DLNET_PREFIX$RANK" "$0" "$@""#;
    let cfg = LaunchConfig::new("sh", WORLD)
        .args(["-c", script, env!("CARGO_BIN_EXE_netns_worker"), "suite"])
        .master(topo.addr(0), Some(MASTER_PORT))
        .env("DLNET_PREFIX", format!("{}-r", topo.prefix))
        .env("DLNET_SUBNET", format!("10.213.{}", topo.net))
        .env("DIST_TIMEOUT_S", "20")
        .timeout(Duration::from_secs(240))
        .grace(Duration::from_secs(2))
        .capture(true);
    let start = Instant::now();
    let out = launch(&cfg).expect("the launcher itself failed");
    let secs = start.elapsed().as_secs_f64();
    for (r, (so, se)) in out.stdout.iter().zip(&out.stderr).enumerate() {
        for l in so {
            println!("[rank {r}] {l}");
        }
        for l in se {
            eprintln!("[rank {r}] {l}");
        }
    }
    assert!(
        out.success(),
        "the job failed after {secs:.1} s: exit codes {:?}, {:?}",
        out.exit_codes(),
        out.stop_reason
    );
    for r in 0..WORLD {
        let passed = format!("rank {r}: netns suite passed: ");
        let bound = format!("(bound {}, ", topo.addr(r));
        let line = out.stdout[r].iter().find(|l| l.starts_with(&passed));
        let line = line.unwrap_or_else(|| {
            panic!(
                "rank {r} exited 0 but did not print `{passed}...`: {:?}",
                out.stdout[r]
            )
        });
        assert!(
            line.contains(&bound),
            "rank {r} did not bind its namespace's address {}: {line}",
            topo.addr(r)
        );
    }
    report(&format!(
        "{TEST}: {WORLD} ranks in 3 network namespaces passed in {secs:.1} s"
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

/// The rank a `Timeout` or `PeerLost` error names: the first rank of its
/// "still missing" list, or the lost peer.
fn named_rank(err: &str, world: usize) -> Option<usize> {
    (0..world).find(|r| {
        err.contains(&format!("still missing: rank {r} "))
            || err.contains(&format!("peer rank {r} was lost"))
    })
}

#[test]
fn cut_link_fails_every_rank_within_its_deadline() {
    const TEST: &str = "cut_link_fails_every_rank_within_its_deadline";
    /// Per-operation deadline inside the ranks.
    const OP_TIMEOUT_S: u64 = 5;
    /// Every rank must have exited this long after the cut.
    const FAIL_WITHIN: Duration = Duration::from_secs(20);
    /// Rendezvous, mesh set-up and the first iterations (debug build, 2 cores).
    const START_WITHIN: Duration = Duration::from_secs(90);
    const CUT: usize = 2;

    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let topo = match Topology::build("c", 2, WORLD) {
        Ok(t) => t,
        Err(reason) => return skip(TEST, &reason),
    };
    let dir = TempDir::new("dlnet-cut");
    let secret = executor::random_hex128().expect("a job secret");

    let mut ranks = Ranks {
        children: Vec::new(),
        ended: vec![None; WORLD],
    };
    for r in 0..WORLD {
        let log = |s: &str| {
            let p = dir.0.join(format!("rank{r}.{s}"));
            fs::File::create(&p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()))
        };
        let child = Command::new("ip")
            .args(["netns", "exec", &topo.ranks[r]])
            .arg(env!("CARGO_BIN_EXE_netns_worker"))
            .args(["loop", "--dir"])
            .arg(&dir.0)
            .args(["--max-secs", "150"])
            .env("RANK", r.to_string())
            .env("WORLD_SIZE", WORLD.to_string())
            .env("LOCAL_RANK", "0")
            .env("LOCAL_WORLD_SIZE", "1")
            .env("MASTER_ADDR", topo.addr(0))
            .env("MASTER_PORT", MASTER_PORT.to_string())
            .env(executor::JOB_SECRET_ENV, &secret)
            .env_remove(executor::STORE_HOSTED_ENV)
            .env("DIST_SOCKET_ADDR", topo.addr(r))
            .env("DIST_TIMEOUT_S", OP_TIMEOUT_S.to_string())
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
            .filter(|r| !dir.0.join(format!("started.{r}")).exists())
            .collect();
        if missing.is_empty() {
            break;
        }
        ranks.poll();
        if let Some(r) = (0..WORLD).find(|&r| ranks.ended[r].is_some()) {
            panic!(
                "rank {r} exited ({:?}) before every rank had started; logs:\n{}",
                ranks.ended[r].map(|e| e.1),
                logs(&dir.0, WORLD)
            );
        }
        assert!(
            Instant::now() < deadline,
            "ranks {missing:?} did not write their started marker within {START_WITHIN:?}; logs:\n{}",
            logs(&dir.0, WORLD)
        );
        std::thread::sleep(POLL);
    }

    // Pull rank 2's cable at the switch.
    let port = Topology::bridge_port(CUT);
    ip(&["-n", &topo.bridge, "link", "set", &port, "down"])
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
            logs(&dir.0, WORLD)
        );
        std::thread::sleep(POLL);
    }

    let mut summary = Vec::new();
    for r in 0..WORLD {
        let (at, code) = ranks.ended[r].expect("every rank was reaped");
        let after = at.duration_since(cut_at).as_secs_f64();
        let err = read_log(&dir.0, r, "err");
        let failed = err
            .lines()
            .find(|l| l.starts_with(&format!("rank {r}: FAILED in ")))
            .unwrap_or_else(|| {
                panic!(
                    "rank {r} (exit {code:?}, {after:.2} s after the cut) printed no FAILED line; \
                     logs:\n{}",
                    logs(&dir.0, WORLD)
                )
            });
        assert!(
            code.is_some_and(|c| c != 0),
            "rank {r} exited with {code:?} after the cut, expected a non-zero exit code: {failed}"
        );
        let kind_ok =
            failed.contains(": Timeout: timeout: ") || failed.contains(": PeerLost: peer rank ");
        assert!(
            kind_ok,
            "rank {r} failed with something other than Timeout or PeerLost: {failed}"
        );
        let named = named_rank(failed, WORLD);
        assert!(
            named.is_some(),
            "rank {r}'s error does not name the rank it lost or waited for: {failed}"
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
