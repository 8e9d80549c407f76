//! The conformance suite over real multi-process jobs: every backend of the
//! registry, world sizes 1 to 5, plus one >= 64 MiB run per backend.
//!
//! Each test launches `conformance_worker` with `executor::launch` under an
//! overall deadline (a hang fails the test instead of stalling CI), and
//! asserts that every rank exited 0 and printed its `checks passed` line.
//! The tests of this file run one at a time (a shared lock): CI machines have
//! two cores, and oversubscribing them further only makes timings noisy.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use executor::{launch, LaunchConfig};

static SERIAL: Mutex<()> = Mutex::new(());

/// Overall deadline of one basic job.
const BASIC_TIMEOUT: Duration = Duration::from_secs(120);
/// Overall deadline of one large job (debug builds move 64 MiB slowly).
const LARGE_TIMEOUT: Duration = Duration::from_secs(240);

fn conformance(backend: &str, world: usize, mode: &str) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let timeout = if mode == "large" {
        LARGE_TIMEOUT
    } else {
        BASIC_TIMEOUT
    };
    let cfg = LaunchConfig::new(env!("CARGO_BIN_EXE_conformance_worker"), world)
        .args(["--backend", backend, "--mode", mode])
        // Per-operation deadline inside the ranks: a lost peer or a hang is
        // reported by the ranks themselves well before the job deadline.
        .env("DIST_TIMEOUT_S", "60")
        .timeout(timeout)
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
        "{backend} world {world} {mode}: the job failed after {secs:.1} s: exit codes {:?}, {:?}",
        out.exit_codes(),
        out.stop_reason
    );
    for r in 0..world {
        let prefix = format!("rank {r}: ");
        assert!(
            out.stdout[r]
                .iter()
                .any(|l| l.starts_with(&prefix) && l.contains(" checks passed")),
            "{backend} world {world} {mode}: rank {r} exited 0 but did not print its passed line"
        );
    }
    eprintln!("conformance {backend} world {world} {mode}: passed in {secs:.1} s");
}

macro_rules! conformance_tests {
    ($backend:literal => $($name:ident: $world:literal $mode:literal),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                conformance($backend, $world, $mode);
            }
        )*
    };
}

conformance_tests!("single" => single_world1: 1 "basic");

/// The harness itself: a backend the registry does not have makes every rank
/// exit non-zero with a BackendUnavailable message, quickly.
#[test]
fn unknown_backend_fails_every_rank() {
    let cfg = LaunchConfig::new(env!("CARGO_BIN_EXE_conformance_worker"), 2)
        .args(["--backend", "carrier-pigeon"])
        .timeout(Duration::from_secs(30))
        .grace(Duration::from_secs(1))
        .capture(true);
    let out = launch(&cfg).expect("the launcher itself failed");
    assert!(!out.success());
    let all: String = out
        .stderr
        .iter()
        .flatten()
        .cloned()
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        all.contains("backend `carrier-pigeon` is unavailable"),
        "stderr was:\n{all}"
    );
}

conformance_tests!("tcp" =>
    tcp_world1: 1 "basic",
    tcp_world2: 2 "basic",
    tcp_world3: 3 "basic",
    tcp_world4: 4 "basic",
    tcp_world5: 5 "basic",
    tcp_large_world2: 2 "large",
);

conformance_tests!("shm" =>
    shm_world1: 1 "basic",
    shm_world2: 2 "basic",
    shm_world3: 3 "basic",
    shm_world4: 4 "basic",
    shm_world5: 5 "basic",
    shm_large_world2: 2 "large",
);
