//! Helpers shared by the integration tests: ranks as threads over one
//! HashStore (`comm_conformance::ranks::threads`, the workspace's one rank
//! runner), ranks as processes of this test binary (the kit's
//! `worker_command`) over one FileStore, every communicator built through
//! the registry and used through the checked front
//! (`comm_core::Communicator`), as users do.

#![allow(dead_code)]

pub mod netns;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use comm_conformance::ranks;
use comm_core::{Communicator, GroupContext, Registry, Store};
use comm_cpu::{TcpFactory, TcpOptions};

/// Set-up deadline of the tests: generous, CI is a loaded 2-core machine.
pub const SETUP: Duration = Duration::from_secs(60);

/// Loopback options, spinning little (many ranks on few cores).
pub fn opts() -> TcpOptions {
    let mut o = TcpOptions::with_timeout(SETUP);
    o.addr = Some("127.0.0.1".parse().unwrap());
    o.busy_poll = Duration::from_micros(20);
    o
}

/// A registry holding the TCP factory with `o`.
pub fn registry(o: TcpOptions) -> Registry {
    Registry::new().with(TcpFactory::with_options(o))
}

/// Member `rank` of group `name` on `store`: set up within [`SETUP`], then
/// each operation bounded by `op_timeout`.
pub fn member(
    store: Arc<dyn Store>,
    rank: usize,
    world: usize,
    name: &str,
    o: TcpOptions,
    op_timeout: Duration,
) -> comm_core::Result<Communicator> {
    let ctx = GroupContext::new(store, rank, world)
        .timeout(SETUP)
        .group_name(name);
    let c = registry(o).create("tcp", &ctx)?;
    c.set_timeout(op_timeout);
    Ok(c)
}

/// Overall deadline of a run of thread ranks: a hang fails the test.
pub const THREADS_DEADLINE: Duration = Duration::from_secs(300);

/// Runs `f(rank, comm)` on `world` threads (`comm_conformance::ranks::threads`),
/// each with its own communicator of one group over a fresh store
/// (operations bounded by `op_timeout_s`); returns the results in rank
/// order.
pub fn run<T: Send + 'static>(
    world: usize,
    o: TcpOptions,
    op_timeout_s: f64,
    f: impl Fn(usize, Communicator) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let t = Duration::from_secs_f64(op_timeout_s);
    ranks::threads(world, THREADS_DEADLINE, move |r| {
        let c = member(r.store, r.rank, world, "tcp", o.clone(), t).expect("set-up");
        f(r.rank, c)
    })
}

/// The global ranks an error blames.
pub fn blamed(e: &comm_core::CommError) -> Vec<usize> {
    e.culprits().iter().map(|r| r.best()).collect()
}

// ------------------------------------------------------------ processes
//
// The process tests control their ranks one by one, which the kit's
// `Processes` (whose launcher owns the children and stops every rank when
// one fails) cannot: frozen.rs SIGSTOPs one chosen rank and reads the
// survivors' exit codes; netns.rs wraps each rank in its own `ip netns
// exec` and rendezvous through a FileStore, since in its second case
// MASTER_ADDR is deliberately loopback in separate network stacks, where a
// store hosted there could not be reached. They start the kit's
// `worker_command` (this test binary re-executed as a rank of an ignored
// entry test) themselves.

/// Ranks run as processes of this test binary, each running the ignored
/// entry test `entry`; killed and reaped on drop.
pub struct Procs {
    pub children: Vec<Child>,
    pub dir: tempfile::TempDir,
}

impl Procs {
    /// Starts `world` processes running the ignored test `entry`, each with
    /// RANK / WORLD_SIZE / the store path / `env`, optionally wrapped in
    /// `prefix` (e.g. `ip netns exec NS`) per rank.
    pub fn start(
        entry: &str,
        world: usize,
        env: &[(&str, String)],
        prefix: impl Fn(usize) -> Vec<String>,
    ) -> Procs {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let children = (0..world)
            .map(|r| {
                let worker = ranks::worker_command(entry).expect("the test binary");
                let pre = prefix(r);
                let mut cmd = match pre.split_first() {
                    Some((p, rest)) => {
                        let mut c = Command::new(p);
                        c.args(rest)
                            .arg(worker.get_program())
                            .args(worker.get_args());
                        for (k, v) in worker.get_envs() {
                            if let Some(v) = v {
                                c.env(k, v);
                            }
                        }
                        c
                    }
                    None => worker,
                };
                cmd.env("RANK", r.to_string())
                    .env("WORLD_SIZE", world.to_string())
                    .env("TEST_DIR", dir.path())
                    .stdin(Stdio::null())
                    .stdout(std::fs::File::create(dir.path().join(format!("out{r}"))).unwrap())
                    .stderr(std::fs::File::create(dir.path().join(format!("err{r}"))).unwrap());
                for (k, v) in env {
                    cmd.env(k, v);
                }
                cmd.spawn().expect("starting a rank process")
            })
            .collect();
        Procs { children, dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Everything the ranks printed, for failure messages.
    pub fn logs(&self) -> String {
        (0..self.children.len())
            .map(|r| {
                let rd = |n: String| std::fs::read_to_string(self.path(&n)).unwrap_or_default();
                format!(
                    "--- rank {r} stdout:\n{}--- rank {r} stderr:\n{}",
                    rd(format!("out{r}")),
                    rd(format!("err{r}"))
                )
            })
            .collect()
    }

    /// Waits until `cond` holds (polled), panicking with the logs after `limit`.
    pub fn wait_for(&self, what: &str, limit: Duration, cond: impl Fn() -> bool) {
        let until = Instant::now() + limit;
        while !cond() {
            assert!(
                Instant::now() < until,
                "{what} did not happen within {limit:?}; logs:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the ranks in `ranks` to exit; their exit codes.
    pub fn wait_exit(&mut self, ranks: &[usize], limit: Duration) -> Vec<Option<i32>> {
        let until = Instant::now() + limit;
        let mut codes = vec![None; ranks.len()];
        let mut done = vec![false; ranks.len()];
        while done.iter().any(|d| !d) {
            for (i, &r) in ranks.iter().enumerate() {
                if !done[i] {
                    if let Ok(Some(st)) = self.children[r].try_wait() {
                        codes[i] = st.code();
                        done[i] = true;
                    }
                }
            }
            if done.iter().any(|d| !d) {
                assert!(
                    Instant::now() < until,
                    "ranks {ranks:?} did not all exit within {limit:?}; logs:\n{}",
                    self.logs()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        codes
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.children {
            // A stopped process must be continued to die of SIGKILL promptly
            // on some kernels; SIGKILL first, then SIGCONT, is harmless.
            let _ = c.kill();
            // SAFETY: plain kill(2) on a child we spawned and have not reaped.
            unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
            let _ = c.wait();
        }
    }
}

/// Inside a rank process of the calling entry test: its rank, world and
/// the shared directory.
pub fn child_env() -> Option<(usize, usize, PathBuf)> {
    if !ranks::is_worker() {
        return None;
    }
    let r = std::env::var("RANK").ok()?.parse().ok()?;
    let w = std::env::var("WORLD_SIZE").ok()?.parse().ok()?;
    let d = PathBuf::from(std::env::var("TEST_DIR").ok()?);
    Some((r, w, d))
}

/// A store shared by the rank processes: a file in `dir`.
pub fn file_store(dir: &Path) -> Arc<dyn Store> {
    Arc::new(dist_utils::FileStore::new(dir.join("store")).expect("the file store"))
}
