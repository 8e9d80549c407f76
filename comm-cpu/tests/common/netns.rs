//! Network namespaces joined by a bridge, for tests that need separate
//! network stacks ("hosts") on one machine. Built with `ip` (iproute2) as
//! root; every namespace is deleted on drop, even when the test panics.
//!
//! ```text
//!   ns <prefix>-br:  br0 (bridge) -- r0, r1, ... (veth ends)
//!                                    |   |
//!   ns <prefix>-rI:                  eth0 = 10.214.<net>.(I+1)/24, lo up
//! ```

use std::path::Path;
use std::process::{Command, Stdio};

/// Set to 1 to turn a skip into a failure.
pub const REQUIRED_ENV: &str = "DIST_NETNS_REQUIRED";

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

/// The namespaces of one test.
#[derive(Debug)]
pub struct Topology {
    pub ranks: Vec<String>,
    bridge: String,
    net: u8,
    created: Vec<String>,
}

impl Topology {
    /// Builds a bridge and `n` namespaces on `10.214.<net>.0/24`. `Err` says
    /// why namespaces cannot be created here (anything made is removed).
    /// Once namespaces can be created, wiring failures are errors of the
    /// test (`panic`), never skips.
    pub fn build(tag: &str, net: u8, n: usize) -> Result<Topology, String> {
        let prefix = format!("ccnet{}{tag}", std::process::id());
        let mut t = Topology {
            ranks: (0..n).map(|r| format!("{prefix}-r{r}")).collect(),
            bridge: format!("{prefix}-br"),
            net,
            created: Vec::new(),
        };
        let br = t.bridge.clone();
        t.add_ns(&br).map_err(|e| {
            format!("cannot create network namespaces here ({e}); needs root and iproute2")
        })?;
        let wired = (|| {
            ip(&["-n", &br, "link", "set", "lo", "up"])?;
            ip(&["-n", &br, "link", "add", "br0", "type", "bridge"])?;
            ip(&["-n", &br, "link", "set", "br0", "up"])?;
            for r in 0..n {
                let ns = t.ranks[r].clone();
                let port = format!("r{r}");
                let cidr = format!("{}/24", t.addr(r));
                t.add_ns(&ns)?;
                ip(&[
                    "-n", &br, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                    "netns", &ns,
                ])?;
                ip(&["-n", &br, "link", "set", &port, "master", "br0"])?;
                ip(&["-n", &br, "link", "set", &port, "up"])?;
                ip(&["-n", &ns, "link", "set", "lo", "up"])?;
                ip(&["-n", &ns, "addr", "add", &cidr, "dev", "eth0"])?;
                ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            }
            Ok::<(), String>(())
        })();
        if let Err(e) = wired {
            panic!("network namespaces can be created but not wired: {e}");
        }
        Ok(t)
    }

    fn add_ns(&mut self, name: &str) -> Result<(), String> {
        if Path::new("/run/netns").join(name).exists() {
            let _ = ip(&["netns", "del", name]);
        }
        ip(&["netns", "add", name])?;
        self.created.push(name.to_string());
        Ok(())
    }

    /// Rank `r`'s address on the bridge.
    pub fn addr(&self, r: usize) -> String {
        format!("10.214.{}.{}", self.net, r + 1)
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
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// Skips the calling test with a printed reason (or fails it when
/// `DIST_NETNS_REQUIRED=1`).
pub fn skip(test: &str, reason: &str) {
    if std::env::var(REQUIRED_ENV).as_deref() == Ok("1") {
        panic!("{test}: {reason} (and {REQUIRED_ENV}=1 says this test must run)");
    }
    eprintln!("{test}: skipped: {reason}");
}
