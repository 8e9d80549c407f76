//! comm-perf as users run it: results checked over real processes for every
//! op (the Ulysses all_to_all_4d included), any registered backend by name,
//! and deadlines that agree with the rest of the layer (`DIST_TIMEOUT_S`
//! unless `--op-timeout` is given).

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const EXE: &str = env!("CARGO_BIN_EXE_comm-perf");

fn run(args: &[&str], env: &[(&str, &str)]) -> (Output, Duration) {
    let start = Instant::now();
    let mut cmd = Command::new(EXE);
    cmd.args(args).stdin(Stdio::null());
    for var in [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "DIST_TIMEOUT_S",
        "DIST_BACKEND",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("running comm-perf");
    (out, start.elapsed())
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn every_op_checks_clean_on_tcp_and_shm() {
    for backend in ["tcp", "shm"] {
        let (out, _) = run(
            &[
                "--backend",
                backend,
                "--nproc",
                "3",
                "--op",
                "all",
                "-b",
                "1K",
                "-e",
                "256K",
                "-f",
                "16",
                "--check",
                "--iters",
                "2",
                "--warmup",
                "1",
                "--heads",
                "6",
                "--head-dim",
                "16",
                "--timeout",
                "240",
            ],
            &[],
        );
        let t = text(&out);
        assert!(out.status.success(), "{backend}: comm-perf failed:\n{t}");
        for op in [
            "all_reduce",
            "send_recv",
            "all_to_all_4d_21",
            "all_to_all_4d_12",
        ] {
            assert!(
                t.contains(&format!("# op: {op}")),
                "{backend}: no {op} table:\n{t}"
            );
        }
        let wrong: Vec<&str> = t
            .lines()
            .filter(|l| l.starts_with("# Wrong total"))
            .collect();
        // One per op and one over all of them.
        assert_eq!(wrong.len(), 9, "{backend}: {t}");
        assert!(
            wrong.iter().all(|l| l.ends_with(": 0")),
            "{backend}: {wrong:?}"
        );
    }
}

#[test]
fn unknown_backends_are_refused_naming_the_registered_ones() {
    let (out, _) = run(&["--backend", "carrier-pigeon", "--nproc", "1"], &[]);
    let t = text(&out);
    assert!(!out.status.success());
    assert!(t.contains("registered: single, tcp, shm"), "{t}");
}

/// Rank 0 of a world of 2 whose rank 1 never comes: comm-perf must give up
/// after the deadline the user asked for.
fn lonely_rank_0(op_timeout: Option<&str>, dist_timeout: &str) -> (String, Duration) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
        .to_string();
    let secret = executor::random_hex128().expect("a job secret");
    let mut args = vec![
        "--backend",
        "tcp",
        "--op",
        "all_reduce",
        "-b",
        "8",
        "-e",
        "8",
    ];
    if let Some(t) = op_timeout {
        args.extend(["--op-timeout", t]);
    }
    let (out, took) = run(
        &args,
        &[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "0"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", &port),
            ("DIST_JOB_SECRET", &secret),
            ("DIST_TIMEOUT_S", dist_timeout),
        ],
    );
    assert!(
        !out.status.success(),
        "rank 0 alone succeeded:\n{}",
        text(&out)
    );
    (text(&out), took)
}

#[test]
fn set_up_deadline_is_dist_timeout_s() {
    let (t, took) = lonely_rank_0(None, "3");
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(30),
        "with DIST_TIMEOUT_S=3 comm-perf gave up after {took:?}:\n{t}"
    );
    // The tcp set-up waited its deadline for the rank that never came.
    assert!(
        t.contains("timeout") && t.contains("still missing: rank 1"),
        "{t}"
    );
}

#[test]
fn op_timeout_flag_overrides_dist_timeout_s() {
    let (t, took) = lonely_rank_0(Some("4"), "600");
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(30),
        "with --op-timeout 4 and DIST_TIMEOUT_S=600 comm-perf gave up after {took:?}:\n{t}"
    );
}
