//! The bind address across real network stacks: two network namespaces on
//! a bridge stand for two hosts.
//!
//! - With `MASTER_ADDR` at the first namespace's bridge address and no
//!   socket variable, each member binds the address of its route towards
//!   the master (not loopback) and the group works; one member also selects
//!   its interface with an exclusion list (`DIST_SOCKET_IFNAME=^lo,docker`).
//! - With `MASTER_ADDR=127.0.0.1` in both, both members end up on loopback:
//!   set-up fails at once on both, naming `DIST_SOCKET_IFNAME` and
//!   `DIST_SOCKET_ADDR`, long before the deadline.
//!
//! Skips with a printed reason where namespaces cannot be created.

mod common;

use std::time::{Duration, Instant};

use comm_core::ReduceOp;
use comm_cpu::{TcpCommunicator, TcpOptions};

/// A member in a namespace: options from the environment, as users get
/// them; writes `result.<rank>` with `ok <bound address>` or
/// `err <ms> <error>`.
#[test]
#[ignore = "entry point of the rank processes of the tests below"]
fn netns_rank() {
    let Some((rank, world, dir)) = common::child_env() else {
        return;
    };
    let store = common::file_store(&dir);
    let start = Instant::now();
    let mut o = TcpOptions::default();
    o.busy_poll = Duration::from_micros(20);
    let res = common::member(store, rank, world, "tcp", o, Duration::from_secs(30)).and_then(|c| {
        let mut v = vec![rank as f32 + 1.0; 1000];
        c.all_reduce(&mut v, ReduceOp::Sum)?;
        assert_eq!(v, vec![3.0f32; 1000]);
        c.with_backend(|b| {
            b.as_any_mut()
                .and_then(|a| a.downcast_mut::<TcpCommunicator>())
                .map(|t| t.local_addr())
        })
    });
    let line = match res {
        Ok(addr) => format!("ok {}", addr.map_or("?".into(), |a| a.ip().to_string())),
        Err(e) => format!("err {} {e}", start.elapsed().as_millis()),
    };
    std::fs::write(dir.join(format!("result.{rank}")), line).unwrap();
}

fn results(p: &mut common::Procs) -> Vec<String> {
    p.wait_exit(&[0, 1], Duration::from_secs(120));
    (0..2)
        .map(|r| {
            std::fs::read_to_string(p.path(&format!("result.{r}")))
                .unwrap_or_else(|_| panic!("rank {r} wrote no result; logs:\n{}", p.logs()))
        })
        .collect()
}

#[test]
fn bind_address_across_network_namespaces() {
    const TEST: &str = "bind_address_across_network_namespaces";
    let topo = match common::netns::Topology::build("b", 1, 2) {
        Ok(t) => t,
        Err(why) => return common::netns::skip(TEST, why),
    };
    // 1. The route towards the master, and an exclusion list.
    let mut p = common::Procs::start(
        "netns_rank",
        2,
        &[
            ("MASTER_ADDR", topo.addr(0)),
            ("MASTER_PORT", "29500".into()),
            ("DIST_TIMEOUT_S", "60".into()),
        ],
        |r| {
            let mut pre = topo.exec(r);
            if r == 1 {
                pre = ["env", "DIST_SOCKET_IFNAME=^lo,docker"]
                    .iter()
                    .map(|s| s.to_string())
                    .chain(pre)
                    .collect();
            }
            pre
        },
    );
    let got = results(&mut p);
    for (r, line) in got.iter().enumerate() {
        assert_eq!(
            line,
            &format!("ok {}", topo.addr(r)),
            "rank {r} did not bind its namespace's address; logs:\n{}",
            p.logs()
        );
    }
    drop(p);
    // 2. Both on loopback although on different stacks: a clear error, fast.
    let mut p = common::Procs::start(
        "netns_rank",
        2,
        &[
            ("MASTER_ADDR", "127.0.0.1".into()),
            ("MASTER_PORT", "29500".into()),
        ],
        |r| topo.exec(r),
    );
    let got = results(&mut p);
    for (r, line) in got.iter().enumerate() {
        let rest = line
            .strip_prefix("err ")
            .unwrap_or_else(|| panic!("rank {r} should have failed: {line}"));
        let (ms, text) = rest.split_once(' ').unwrap();
        let ms: u64 = ms.parse().unwrap();
        assert!(
            text.contains("DIST_SOCKET_IFNAME") && text.contains("DIST_SOCKET_ADDR"),
            "rank {r}: {text}"
        );
        assert!(text.contains("loopback"), "rank {r}: {text}");
        // The set-up deadline is 60 s: the error must not wait it out.
        assert!(ms < 20_000, "rank {r} took {ms} ms to fail: {text}");
    }
    eprintln!(
        "{TEST}: route and exclusion list bound {} and {}; loopback across stacks: {}",
        topo.addr(0),
        topo.addr(1),
        got[0]
    );
}
