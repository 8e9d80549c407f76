//! Network namespaces joined by a bridge, for tests that need separate
//! network stacks ("hosts") on one machine. Built with `ip` (iproute2) as
//! root; every namespace is deleted on drop, even when the test panics.
//! The one copy of this helper: comm-cpu's tests use it as
//! `common::netns`, parallel-state's and the conformance kit's tests
//! include this file with `#[path]`.
//!
//! ```text
//!   ns dlnet<pid><tag>-br:  br0 (bridge) -- r0, r1, ... (veth ends, bridge ports)
//!                                           |   |
//!   ns dlnet<pid><tag>-rI:                  eth0 = 10.213.<net>.(I+1)/24, lo up
//! ```
//!
//! The /24 only exists inside these namespaces, and the names embed the
//! test process's id, so tests running in parallel (or other jobs on the
//! host) cannot collide with them.
//!
//! Where namespaces cannot be created (not root, no `ip`, an unprivileged
//! container) a test prints `skipped: <reason>` and passes; set
//! `DIST_NETNS_REQUIRED=1` to make that a failure instead. Where they can
//! be created but not wired (bridge, veth, `ip netns exec`), the test
//! fails: the machine allows the test, so a wiring failure is a real one.

#![allow(dead_code)]

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

/// Set to 1 to turn a skip into a failure.
pub const REQUIRED_ENV: &str = "DIST_NETNS_REQUIRED";

/// Writes a line straight to the process's stderr, past the test harness's
/// output capture, so skips and timings show in CI logs.
pub fn report(line: &str) {
    let mut e = std::io::stderr().lock();
    let _ = writeln!(e, "{line}");
}

/// Why a topology could not be built.
#[derive(Debug)]
pub enum NoTopology {
    /// This machine does not allow network namespaces here (not root, no
    /// `ip`, an unprivileged container): a skip, unless required.
    Unsupported(String),
    /// Namespaces could be created but not wired together: a failure.
    Broken(String),
}

/// What a test does when it gets no topology: `Ok` with the line to print
/// for a skip, `Err` with the failure.
pub fn no_topology(test: &str, why: NoTopology, required: bool) -> Result<String, String> {
    match why {
        NoTopology::Unsupported(r) if !required => Ok(format!("{test}: skipped: {r}")),
        NoTopology::Unsupported(r) => Err(format!(
            "{test}: {r} (and {REQUIRED_ENV}=1 says this test must run)"
        )),
        NoTopology::Broken(r) => Err(format!(
            "{test}: network namespaces can be created here but not wired together: {r}"
        )),
    }
}

/// Skips the calling test, or fails it (see [`no_topology`]).
pub fn skip(test: &str, why: NoTopology) {
    let required = std::env::var(REQUIRED_ENV).as_deref() == Ok("1");
    match no_topology(test, why, required) {
        Ok(line) => report(&line),
        Err(e) => panic!("{e}"),
    }
}

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
pub struct Topology {
    /// Common prefix of the namespace names: rank `r`'s is `{prefix}-r{r}`.
    pub prefix: String,
    /// Each rank's namespace.
    pub ranks: Vec<String>,
    bridge: String,
    net: u8,
    /// Every namespace created so far, deleted on drop.
    created: Vec<String>,
}

impl Topology {
    /// Builds the bridge namespace and `n` rank namespaces on
    /// `10.213.<net>.0/24`. `Err` says why it cannot be done here; what
    /// was already made is removed.
    pub fn build(tag: &str, net: u8, n: usize) -> Result<Topology, NoTopology> {
        match Command::new("ip").arg("-V").stdin(Stdio::null()).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                return Err(NoTopology::Unsupported(format!(
                    "`ip -V` failed ({}); iproute2 looks broken here",
                    o.status
                )))
            }
            Err(e) => {
                return Err(NoTopology::Unsupported(format!(
                    "the `ip` command (iproute2) is not available: {e}; install iproute2"
                )))
            }
        }
        let prefix = format!("dlnet{}{tag}", std::process::id());
        let mut t = Topology {
            bridge: format!("{prefix}-br"),
            ranks: (0..n).map(|r| format!("{prefix}-r{r}")).collect(),
            prefix,
            net,
            created: Vec::new(),
        };
        t.add_ns(&t.bridge.clone()).map_err(|e| {
            NoTopology::Unsupported(format!(
                "cannot create network namespaces here ({e}); this test needs root (or \
                 CAP_SYS_ADMIN and CAP_NET_ADMIN) outside an unprivileged container"
            ))
        })?;
        t.wire(n).map_err(NoTopology::Broken)?;
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

    fn wire(&mut self, n: usize) -> Result<(), String> {
        let br = self.bridge.clone();
        ip(&["-n", &br, "link", "set", "lo", "up"])?;
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &br, "link", "set", "br0", "up"])?;
        for r in 0..n {
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

    /// The /24 of the ranks' addresses, without the last byte.
    pub fn subnet(&self) -> String {
        format!("10.213.{}", self.net)
    }

    /// Rank `r`'s address on the bridge.
    pub fn addr(&self, r: usize) -> String {
        format!("{}.{}", self.subnet(), r + 1)
    }

    /// The bridge-side end of rank `r`'s veth pair (in the bridge namespace).
    fn bridge_port(r: usize) -> String {
        format!("r{r}")
    }

    /// Takes rank `r`'s link down at the bridge ("pulls its cable at the
    /// switch"): its packets stop, its namespace and processes stay.
    pub fn cut(&self, r: usize) -> Result<(), String> {
        ip(&[
            "-n",
            &self.bridge,
            "link",
            "set",
            &Self::bridge_port(r),
            "down",
        ])
    }

    /// The command prefix that runs a program in rank `r`'s namespace.
    pub fn exec(&self, r: usize) -> Vec<String> {
        ["ip", "netns", "exec", &self.ranks[r]]
            .iter()
            .map(|s| s.to_string())
            .collect()
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
