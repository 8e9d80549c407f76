//! The workspace's programs that multi-process tests run as users do:
//! `distrun` (executor), the main job (`ulysses_attention`, an example of
//! this crate) and comm-perf (benches). Integration tests of one package
//! have no path to another package's binaries, so they are looked up in the
//! target directory of this test binary (`target/<profile>/`), where
//! `cargo test --workspace` has just built them. A program that is missing,
//! or older than a source file of the workspace (a filtered
//! `cargo test -p parallel-state --test X` after an edit builds neither), is
//! built first with the `cargo` running this test, in the same profile.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::SystemTime;

/// A program of the workspace: its package, its target kind and name.
#[derive(Debug, Clone, Copy)]
pub struct Program {
    /// The package that builds it.
    pub package: &'static str,
    /// True for an example, false for a binary.
    pub example: bool,
    /// Its name.
    pub name: &'static str,
}

/// The launcher.
pub const DISTRUN: Program = Program {
    package: "executor",
    example: false,
    name: "distrun",
};
/// The main job.
pub const MAIN_JOB: Program = Program {
    package: "parallel-state",
    example: true,
    name: "ulysses_attention",
};

/// Arguments of a small model of the main job, for debug builds (which
/// compute slowly): the communication is the same, an all_to_all_4d before
/// and after each layer's attention.
pub const SMALL_MODEL: &[&str] = &[
    "--batch",
    "1",
    "--seq",
    "126",
    "--heads",
    "4",
    "--head-dim",
    "16",
    "--layers",
    "2",
];

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("parallel-state lives in the workspace")
        .to_path_buf()
}

/// `target/<profile>/`: the directory above this test binary's `deps/`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    exe.parent()
        .and_then(Path::parent)
        .expect("test binaries live in target/<profile>/deps")
        .to_path_buf()
}

/// The newest modification time of the sources that go into the
/// workspace's programs (`*.rs`, `Cargo.toml`, `Cargo.lock`), skipping
/// `target/`, hidden directories and the test and benchmark directories
/// (`tests/`, `benches/`), which no program is built from.
fn newest_source() -> SystemTime {
    fn walk(dir: &Path, depth: usize, newest: &mut SystemTime) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name();
            let name = name.to_string_lossy();
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                // `benches/` at the top is the benches crate (comm-perf).
                let skip = name == "target"
                    || name == "tests"
                    || (depth > 0 && name == "benches")
                    || name.starts_with('.');
                if !skip {
                    walk(&p, depth + 1, newest);
                }
            } else if name.ends_with(".rs") || name == "Cargo.toml" || name == "Cargo.lock" {
                if let Ok(m) = meta.modified() {
                    *newest = (*newest).max(m);
                }
            }
        }
    }
    let mut newest = SystemTime::UNIX_EPOCH;
    walk(&workspace(), 0, &mut newest);
    newest
}

/// The path of `p`, built first (once per test process) when missing or
/// older than the sources. Panics (failing the test) when it cannot be
/// built.
pub fn path(p: Program) -> PathBuf {
    static FOUND: Mutex<Vec<(&str, PathBuf)>> = Mutex::new(Vec::new());
    let mut found = FOUND.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, path)) = found.iter().find(|(n, _)| *n == p.name) {
        return path.clone();
    }
    let path = locate(p);
    found.push((p.name, path.clone()));
    path
}

fn locate(p: Program) -> PathBuf {
    let dir = profile_dir();
    let bin = if p.example {
        dir.join("examples").join(p.name)
    } else {
        dir.join(p.name)
    };
    let fresh = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .is_ok_and(|m| m >= newest_source());
    if fresh {
        return bin;
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let profile = match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".to_string(),
        Some(other) => other.to_string(),
    };
    let kind = if p.example { "--example" } else { "--bin" };
    eprintln!(
        "building {} ({} {kind} {}, profile {profile}): missing or older than the sources",
        bin.display(),
        p.package,
        p.name
    );
    let status = Command::new(cargo)
        .current_dir(workspace())
        .args([
            "build",
            "--quiet",
            "--profile",
            &profile,
            "-p",
            p.package,
            kind,
            p.name,
        ])
        .status()
        .expect("running cargo build");
    assert!(status.success(), "cargo build of {} failed", p.name);
    assert!(
        bin.exists(),
        "cargo build did not produce {}",
        bin.display()
    );
    bin
}
