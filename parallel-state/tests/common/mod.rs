//! The multi-process harness shared by parallel-state's test files: a test
//! launches N copies of its own test binary through the project's launcher;
//! each copy re-enters the binary through an ignored entry test, reads its
//! scenario from [`SCENARIO_ENV`], runs it, and prints [`done`]'s marker.

#![allow(dead_code)] // each test file uses part of it

pub mod bins;
pub mod exact;

use std::sync::Mutex;
use std::time::Duration;

use executor::{launch, LaunchConfig, LaunchOutcome};

/// Environment variable carrying the scenario to the launched processes.
pub const SCENARIO_ENV: &str = "PS_SCENARIO";

/// One launch at a time per test binary: the machine has 2 cores.
static SERIAL: Mutex<()> = Mutex::new(());

/// The scenario a launched process runs (`None` outside a launch).
pub fn scenario() -> Option<String> {
    std::env::var(SCENARIO_ENV).ok()
}

/// The marker a rank prints when it finished `scenario`.
pub fn done(scenario: &str, rank: usize) {
    println!("PS_OK {scenario} rank {rank}");
}

/// Every rank's output, for failure messages.
fn dump(out: &LaunchOutcome, nproc: usize) -> String {
    (0..nproc)
        .map(|r| {
            format!(
                "--- rank {r}\n{}\n{}",
                out.stdout[r].join("\n"),
                out.stderr[r].join("\n")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Launches `nproc` processes of this test binary running `scenario`
/// through the ignored test `entry`, with `env` added; asserts that the
/// job succeeded and that every rank of `finishing` printed its marker
/// (ranks left out may end early, e.g. a rank that plays a crash). Returns
/// the outcome (stdout and stderr captured per rank).
pub fn launch_scenario(
    entry: &str,
    scenario: &str,
    nproc: usize,
    env: &[(&str, &str)],
    finishing: &[usize],
) -> LaunchOutcome {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut cfg = LaunchConfig::new(exe, nproc)
        .args([
            "--ignored",
            "--exact",
            entry,
            "--nocapture",
            "--test-threads=1",
        ])
        .env(SCENARIO_ENV, scenario)
        .env("DIST_TIMEOUT_S", "60")
        .timeout(Duration::from_secs(240))
        .capture(true);
    for (k, v) in env {
        cfg = cfg.env(*k, *v);
    }
    let out = launch(&cfg).expect("launching the scenario");
    assert!(
        out.success(),
        "scenario {scenario} failed: exit codes {:?}\n{}",
        out.exit_codes(),
        dump(&out, nproc)
    );
    for &r in finishing {
        let marker = format!("PS_OK {scenario} rank {r}");
        assert!(
            out.stdout[r].iter().any(|l| l.contains(&marker)),
            "rank {r} did not finish {scenario}\n{}",
            dump(&out, nproc)
        );
    }
    out
}

/// Launches `scenario` on `nproc` ranks that must all finish.
pub fn run(entry: &str, scenario: &str, nproc: usize, env: &[(&str, &str)]) -> LaunchOutcome {
    let all: Vec<usize> = (0..nproc).collect();
    launch_scenario(entry, scenario, nproc, env, &all)
}

/// Prints every rank's stdout lines containing `needle` (shown with
/// `--nocapture`: the figures a scenario measured).
pub fn show(out: &LaunchOutcome, needle: &str) {
    for (r, lines) in out.stdout.iter().enumerate() {
        for l in lines.iter().filter(|l| l.contains(needle)) {
            println!("[rank {r}] {l}");
        }
    }
}
