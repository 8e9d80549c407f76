//! Crash trials (issue 15, "Done when"): `distrun --nproc-per-node 4` runs a
//! workload; at a random moment, set-up included, one random rank gets
//! SIGKILL or SIGSTOP. Every trial must end within a bound (no hang), leave
//! no `/dev/shm` segment and no process behind, and the rank hit must be
//! named:
//!
//! - SIGKILL: distrun's `rank V (pid P) failed with exit code 137 (SIGKILL)`
//!   and exit code 137;
//! - SIGSTOP (`DIST_TIMEOUT_S` short): the error of the first survivor to
//!   fail (the rank distrun names) blames rank V and no other, or, when
//!   every survivor had already finished, distrun's overall timeout names V
//!   as the one still running.
//!
//! Workloads, round robin: the main job (`ulysses_attention`, forced to shm
//! and to tcp) and a collective workload (this test binary as the ranks:
//! rounds of exact all_reduce / all_gather / all_to_all from
//! `common/exact.rs` over the world group, on shm and on tcp).
//!
//! `CRASH_TRIALS` (default 20: trials whose signal hit a running job; those
//! that came after the job ended are run on top and reported as late),
//! `CRASH_TIMEOUT_S` (the ranks'
//! `DIST_TIMEOUT_S`, default 5), `CRASH_SETUP_PERCENT` (the share of
//! moments drawn inside the calibrated set-up, default 33; the others are
//! drawn over the whole run), `CRASH_SEED` (replays a run; the seed is
//! printed), `CRASH_VERBOSE=1` (a line per trial). The figures are printed
//! (`--nocapture`); `benches/peers/crash_trials.sh` runs 120 trials on the
//! release build.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{bins, exact};
use parallel_state::{CommError, Device, InitOptions, ParallelState};
use rustix::process::{Pid, Signal};

/// Ranks per trial.
const NPROC: usize = 4;
/// distrun's grace period between SIGTERM and SIGKILL.
const GRACE_S: u64 = 1;
/// Tells a re-executed test binary it is a rank of the collective workload,
/// and on which backend.
const BACKEND_ENV: &str = "PS_CRASH_BACKEND";
/// Rounds of the collective workload.
const ROUNDS_ENV: &str = "PS_CRASH_ROUNDS";
/// The line a collective-workload rank prints once set up.
const SETUP_MARKER: &str = "CRASH_SETUP_DONE";
/// The line a collective-workload rank prints when an operation failed:
/// `CRASH_FAILED rank R blames [..]: error`.
const FAILED_MARKER: &str = "CRASH_FAILED";

// ---------------------------------------------------------------------------
// The collective workload's ranks

/// A rank of the collective workload, started by distrun: set up the world
/// group on the backend of [`BACKEND_ENV`], then rounds of exact checks. A
/// failure prints the ranks the error blames (as data) and exits 1, as an
/// application would.
#[test]
#[ignore = "a rank of the crash trials' collective workload, started by distrun"]
fn crash_rank() {
    let Ok(backend) = std::env::var(BACKEND_ENV) else {
        return;
    };
    let rounds: u64 = std::env::var(ROUNDS_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let fail = |rank: usize, e: CommError| -> ! {
        let blamed: Vec<usize> = e.culprits().iter().map(|r| r.best()).collect();
        println!("{FAILED_MARKER} rank {rank} blames {blamed:?}: {e}");
        std::process::exit(1)
    };
    let rank: usize = std::env::var("RANK")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    let opts = InitOptions::default()
        .with_backend(backend)
        .with_device(Device::Cpu);
    let ps = ParallelState::init_from_env(opts).unwrap_or_else(|e| fail(rank, e));
    let c = ps
        .world_group()
        .host_communicator()
        .unwrap_or_else(|e| fail(rank, e));
    println!("{SETUP_MARKER} rank {rank}");
    exact::rounds(&c, 0, rounds).unwrap_or_else(|e| fail(rank, e));
    ps.destroy();
}

// ---------------------------------------------------------------------------
// Who an error blames

/// The global ranks a rank's error text blames: the ranks a timeout still
/// missed, the ones an abort blamed (its sender when it blamed none), or the
/// peer that was lost. `None` when the text is none of these.
fn blamed_in(text: &str) -> Option<BTreeSet<usize>> {
    /// Every `global rank N` in `s`, else every `rank N`.
    fn ranks(s: &str) -> BTreeSet<usize> {
        let after = |pat: &str| -> BTreeSet<usize> {
            s.match_indices(pat)
                .filter_map(|(i, _)| {
                    let rest = &s[i + pat.len()..];
                    let end = rest
                        .find(|c: char| !c.is_ascii_digit())
                        .unwrap_or(rest.len());
                    rest[..end].parse().ok()
                })
                .collect()
        };
        let global = after("global rank ");
        if global.is_empty() {
            after("rank ")
        } else {
            global
        }
    }
    /// The last rank named in `s` (`... group rank 2 (global rank 2)`).
    fn last_rank(s: &str) -> Option<usize> {
        let i = s.rfind("global rank ").or_else(|| s.rfind("rank "))?;
        ranks(&s[i..]).into_iter().next()
    }
    if let Some(i) = text.rfind("; it blamed ") {
        return Some(ranks(&text[i..]));
    }
    if let Some(i) = text.find("still missing: ") {
        let rest = &text[i + "still missing: ".len()..];
        let end = rest.find(". ").unwrap_or(rest.len());
        return Some(ranks(&rest[..end]));
    }
    for (pat, before) in [(" was lost during", true), ("was aborted by ", false)] {
        if let Some(i) = text.find(pat) {
            let r = if before {
                last_rank(&text[..i])
            } else {
                ranks(&text[i..]).into_iter().next()
            };
            return r.map(|r| BTreeSet::from([r]));
        }
    }
    None
}

#[test]
fn blame_parser_reads_the_error_kinds() {
    let t = "error: timeout: `all_to_all_4d #8 (f32 x 131072) on shm group `ulysses:0`` waited \
             5.0s and did not complete; still missing: group rank 2 (global rank 2) (has not \
             arrived at step 9 (chunk 1 of 1)). positions: group rank 0 (global rank 0) at x";
    assert_eq!(blamed_in(t), Some(BTreeSet::from([2])));
    let t = "error: group rank 1 (global rank 3) was lost during `all_reduce #2`: eof";
    assert_eq!(blamed_in(t), Some(BTreeSet::from([3])));
    let t = "error: `all_reduce #2` was aborted by group rank 0 (global rank 0): timeout; it \
             blamed group rank 2 (global rank 2) (no data), group rank 3 (global rank 3)";
    assert_eq!(blamed_in(t), Some(BTreeSet::from([2, 3])));
    let t = "error: `barrier` was aborted by group rank 1 (global rank 1): why";
    assert_eq!(blamed_in(t), Some(BTreeSet::from([1])));
    let t = "timeout: `same_host_ranks` waited 5s and did not complete; still missing: rank 3 \
             (no shared-memory probe). Check that";
    assert_eq!(blamed_in(t), Some(BTreeSet::from([3])));
    assert_eq!(blamed_in("error: invalid argument: x"), None);
}

// ---------------------------------------------------------------------------
// The harness

/// splitmix64: reproducible choices from a printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One workload: a program distrun starts on every rank.
struct Workload {
    name: &'static str,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(&'static str, String)>,
    /// True when ranks print [`FAILED_MARKER`] lines (blame as data).
    structured: bool,
    /// A line that says set-up is over (printed by some rank).
    setup_line: &'static str,
}

fn workloads() -> Vec<Workload> {
    let job = bins::path(bins::MAIN_JOB);
    let exe = std::env::current_exe().expect("the test binary");
    // Debug builds compute slowly: a smaller model, fewer rounds.
    let (model, rounds): (&[&str], &str) = if cfg!(debug_assertions) {
        (bins::SMALL_MODEL, "8")
    } else {
        (&[], "60")
    };
    let main_job = |name, backend: &str| Workload {
        name,
        program: job.clone(),
        args: model
            .iter()
            .map(|s| s.to_string())
            .chain(["--backend".into(), backend.into()])
            .collect(),
        env: vec![("RUST_LOG", "warn".into())],
        structured: false,
        setup_line: "sp group [0, 1, 2, 3] on",
    };
    let collectives = |name, backend: &str| Workload {
        name,
        program: exe.clone(),
        args: ["--exact", "crash_rank", "--ignored", "--nocapture"]
            .iter()
            .map(|s| s.to_string())
            .chain(["--test-threads=1".into()])
            .collect(),
        env: vec![(BACKEND_ENV, backend.into()), (ROUNDS_ENV, rounds.into())],
        structured: true,
        setup_line: SETUP_MARKER,
    };
    vec![
        main_job("main job shm", "shm"),
        main_job("main job tcp", "tcp"),
        collectives("collectives shm", "shm"),
        collectives("collectives tcp", "tcp"),
    ]
}

/// A running distrun and the lines it printed, with their arrival times.
struct Job {
    child: Child,
    start: Instant,
    lines: Arc<Mutex<Vec<(Duration, String)>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

fn start_job(w: &Workload, timeout_s: u64, overall_s: u64) -> Job {
    let mut cmd = Command::new(bins::path(bins::DISTRUN));
    cmd.args(["--nproc-per-node", &NPROC.to_string()])
        .args(["--grace", &GRACE_S.to_string()])
        .args(["--timeout", &overall_s.to_string(), "--"])
        .arg(&w.program)
        .args(&w.args)
        .env("DIST_TIMEOUT_S", timeout_s.to_string())
        .env_remove("DIST_BACKEND")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in &w.env {
        cmd.env(k, v);
    }
    let start = Instant::now();
    let mut child = cmd.spawn().expect("starting distrun");
    let lines: Arc<Mutex<Vec<(Duration, String)>>> = Arc::default();
    let mut readers = Vec::new();
    let streams: [Box<dyn Read + Send>; 2] = [
        Box::new(child.stdout.take().expect("piped stdout")),
        Box::new(child.stderr.take().expect("piped stderr")),
    ];
    for s in streams {
        let lines = lines.clone();
        readers.push(std::thread::spawn(move || {
            for l in BufReader::new(s).lines() {
                let Ok(l) = l else { break };
                lines
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((start.elapsed(), l));
            }
        }));
    }
    Job {
        child,
        start,
        lines,
        readers,
    }
}

impl Job {
    /// Waits up to `bound` for distrun to exit; its exit code, `None` on a
    /// hang (distrun and its ranks are then killed).
    fn wait(&mut self, bound: Duration, ranks: &[RankProc]) -> Option<i32> {
        let deadline = Instant::now() + bound;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st.code().unwrap_or(128 + 9));
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                for r in ranks {
                    if let Some(p) = Pid::from_raw(r.pid as i32) {
                        let _ = rustix::process::kill_process_group(p, Signal::KILL);
                    }
                }
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn output(&mut self) -> Vec<(Duration, String)> {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        std::mem::take(&mut *self.lines.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// A rank process of a trial.
#[derive(Debug, Clone)]
struct RankProc {
    rank: usize,
    pid: u32,
    /// Start time (`/proc/<pid>/stat` field 22), so a reused pid is not
    /// mistaken for the rank.
    started: u64,
    job_id: String,
}

/// Fields after the command name in `/proc/<pid>/stat`.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(String::from).collect())
}

/// The rank processes distrun has started so far (exec'd: their
/// environment has `RANK`).
fn ranks_of(distrun: u32) -> Vec<RankProc> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{distrun}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let Ok(children) = std::fs::read_to_string(t.path().join("children")) else {
            continue;
        };
        for pid in children
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
                continue;
            };
            let var = |k: &str| {
                env.split(|&b| b == 0)
                    .filter_map(|kv| std::str::from_utf8(kv).ok())
                    .find_map(|kv| kv.strip_prefix(k).map(String::from))
            };
            let (Some(rank), Some(job_id)) = (var("RANK="), var("DIST_JOB_ID=")) else {
                continue;
            };
            let (Ok(rank), Some(f)) = (rank.parse(), stat_fields(pid)) else {
                continue;
            };
            // Field 22 of stat is the 20th after the name (state is 3rd).
            let started = f.get(19).and_then(|s| s.parse().ok()).unwrap_or(0);
            out.push(RankProc {
                rank,
                pid,
                started,
                job_id,
            });
        }
    }
    out
}

/// True while the rank's process (not a zombie) or any member of its
/// process group is alive.
fn still_alive(r: &RankProc) -> bool {
    let own = stat_fields(r.pid).is_some_and(|f| {
        f.first().map(String::as_str) != Some("Z")
            && f.get(19).and_then(|s| s.parse::<u64>().ok()) == Some(r.started)
    });
    let group = Pid::from_raw(r.pid as i32)
        .is_some_and(|p| rustix::process::test_kill_process_group(p).is_ok());
    own || group
}

/// The names in `/dev/shm`.
fn shm_names() -> BTreeSet<String> {
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The `/dev/shm` entries that appeared during a trial (not in `before`)
/// and are its job's: the job id in the name (every segment of a job
/// distrun started: comm-shm's and the same-host probe's), or a rank's pid.
/// Other programs on the machine may create segments meanwhile; those are
/// not counted.
fn shm_of(ranks: &[RankProc], before: &BTreeSet<String>) -> Vec<String> {
    shm_names()
        .into_iter()
        .filter(|n| !before.contains(n))
        .filter(|n| {
            ranks.iter().any(|r| {
                n.contains(&format!(".{}.", r.job_id))
                    || n.contains(&format!("-{}-", r.pid))
                    || n.contains(&format!(".{}.", r.pid))
            })
        })
        .collect()
}

/// Live processes (not zombies) whose environment carries the job id
/// `job`: every rank of the trial and anything they started, whether or
/// not the harness saw it.
fn job_processes(job: &str) -> Vec<u32> {
    let needle = format!("DIST_JOB_ID={job}");
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|kv| kv == needle.as_bytes()))
                && stat_fields(pid).is_some_and(|f| f.first().map(String::as_str) != Some("Z"))
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sig {
    Kill,
    Stop,
}

/// How a trial went.
#[derive(Debug)]
struct Trial {
    workload: &'static str,
    sig: Sig,
    victim: usize,
    /// Planned moment, from distrun's start.
    at: Duration,
    /// The signal landed before the workload printed its set-up line (the
    /// victim's own where every rank prints one; rank 0's in the main job).
    during_setup: bool,
    /// The job finished (exit 0) or the victim was gone before the signal.
    late: bool,
    /// distrun's exit code; `None`: it hung past the bound.
    code: Option<i32>,
    /// Seconds from the signal to distrun's exit.
    ended_after: f64,
    named: bool,
    /// SIGSTOP: the first failing survivor blamed the victim, maybe with
    /// others (ranks stuck behind it); SIGKILL: as `named`.
    among: bool,
    /// Survivors whose errors blamed another rank than the victim.
    misblamed: Vec<usize>,
    leaked_shm: Vec<String>,
    leaked_procs: Vec<u32>,
    /// What distrun said about the first failure (for the report).
    verdict: String,
}

/// The line distrun prints for the first failing rank: `(rank, code)`.
fn distrun_named(lines: &[(Duration, String)]) -> Option<(usize, i32)> {
    lines.iter().find_map(|(_, l)| {
        let rest = l.split("distrun: rank ").nth(1)?;
        let rank = rest.split_whitespace().next()?.parse().ok()?;
        let code = rest
            .split("failed with exit code ")
            .nth(1)?
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()?;
        Some((rank, code))
    })
}

/// What rank `r`'s error blames, from its lines (`[rank r] ...`).
fn rank_blames(
    lines: &[(Duration, String)],
    r: usize,
    structured: bool,
) -> Option<BTreeSet<usize>> {
    let prefix = format!("[rank {r}] ");
    let own = lines
        .iter()
        .filter_map(|(_, l)| l.strip_prefix(&prefix))
        .collect::<Vec<_>>();
    if structured {
        // libtest's `test crash_rank ... ` may precede the marker.
        let l = own
            .iter()
            .find_map(|l| l.find(FAILED_MARKER).map(|i| &l[i..]))?;
        let list = l.split('[').nth(1)?.split(']').next()?;
        return Some(
            list.split(',')
                .filter_map(|x| x.trim().parse().ok())
                .collect(),
        );
    }
    let l = own.iter().rev().find(|l| l.starts_with("error: "))?;
    blamed_in(l)
}

fn run_trial(
    w: &Workload,
    sig: Sig,
    victim: usize,
    at: Duration,
    timeout_s: u64,
    overall_s: u64,
) -> Trial {
    let before = shm_names();
    let mut job = start_job(w, timeout_s, overall_s);
    let distrun_pid = job.child.id();
    let mut ranks: Vec<RankProc> = Vec::new();
    // Find the ranks until the moment comes (the victim at least).
    let deadline = job.start + at;
    let mut victim_proc: Option<RankProc> = None;
    loop {
        for r in ranks_of(distrun_pid) {
            if !ranks.iter().any(|x| x.pid == r.pid) {
                ranks.push(r);
            }
        }
        victim_proc = victim_proc.or_else(|| ranks.iter().find(|r| r.rank == victim).cloned());
        let exited = matches!(job.child.try_wait(), Ok(Some(_)));
        if exited || (victim_proc.is_some() && Instant::now() >= deadline) {
            break;
        }
        if job.start.elapsed() > Duration::from_secs(60) {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let signalled_at = job.start.elapsed();
    let sent = victim_proc.as_ref().is_some_and(|v| {
        let live = stat_fields(v.pid).is_some_and(|f| f.first().map(String::as_str) != Some("Z"));
        let s = match sig {
            Sig::Kill => Signal::KILL,
            Sig::Stop => Signal::STOP,
        };
        live && Pid::from_raw(v.pid as i32)
            .is_some_and(|p| rustix::process::kill_process(p, s).is_ok())
    });
    // Ranks started after the moment (a trial at the very start).
    for r in ranks_of(distrun_pid) {
        if !ranks.iter().any(|x| x.pid == r.pid) {
            ranks.push(r);
        }
    }
    let bound = Duration::from_secs(overall_s + GRACE_S + 30);
    let code = job.wait(bound, &ranks);
    let ended_after = (job.start.elapsed() - signalled_at).as_secs_f64();
    let lines = job.output();
    // The process table and /dev/shm once distrun is gone: the ranks seen
    // (and their process groups), and any process of the job's id.
    let job_id = ranks.first().map(|r| r.job_id.clone()).unwrap_or_default();
    let leftovers = || {
        let mut v: BTreeSet<u32> = ranks
            .iter()
            .filter(|r| still_alive(r))
            .map(|r| r.pid)
            .collect();
        if !job_id.is_empty() {
            v.extend(job_processes(&job_id));
        }
        v
    };
    let mut leaked_procs: Vec<u32> = leftovers().into_iter().collect();
    if !leaked_procs.is_empty() {
        // Give the kernel a moment to finish exits already under way.
        std::thread::sleep(Duration::from_secs(2));
        leaked_procs = leftovers().into_iter().collect();
        for &p in &leaked_procs {
            if let Some(p) = Pid::from_raw(p as i32) {
                let _ = rustix::process::kill_process_group(p, Signal::KILL);
                let _ = rustix::process::kill_process(p, Signal::KILL);
            }
        }
    }
    let leaked_shm = shm_of(&ranks, &before);
    for n in &leaked_shm {
        let _ = std::fs::remove_file(format!("/dev/shm/{n}"));
    }
    // The victim's own set-up line where every rank prints one.
    let victim_prefix = format!("[rank {victim}] ");
    let setup_at = lines
        .iter()
        .find(|(_, l)| l.contains(w.setup_line) && (!w.structured || l.starts_with(&victim_prefix)))
        .map(|(t, _)| *t);
    let named_line = distrun_named(&lines);
    let late = !sent || code == Some(0);
    let during_setup = !late && setup_at.is_none_or(|t| signalled_at < t);
    let survivors: Vec<usize> = (0..NPROC).filter(|&r| r != victim).collect();
    let misblamed: Vec<usize> = survivors
        .iter()
        .copied()
        .filter(|&r| {
            rank_blames(&lines, r, w.structured).is_some_and(|b| b != BTreeSet::from([victim]))
        })
        .collect();
    let timed_out = code == Some(124)
        && lines.iter().any(|(_, l)| {
            l.contains("overall timeout") && l.contains(&format!("ranks still running: [{victim}]"))
        });
    let first_blames = match named_line {
        Some((first, _)) if first != victim => rank_blames(&lines, first, w.structured),
        _ => None,
    };
    let (named, among) = match sig {
        Sig::Kill => {
            let n = code == Some(137) && named_line == Some((victim, 137));
            (n, n)
        }
        Sig::Stop => (
            timed_out || first_blames.as_ref() == Some(&BTreeSet::from([victim])),
            timed_out || first_blames.is_some_and(|b| b.contains(&victim)),
        ),
    };
    let verdict = lines
        .iter()
        .filter(|(_, l)| l.starts_with("distrun: "))
        .map(|(_, l)| l.as_str())
        .collect::<Vec<_>>()
        .join(" | ");
    let trial = Trial {
        workload: w.name,
        sig,
        victim,
        at,
        during_setup,
        late,
        code,
        ended_after,
        named,
        among,
        misblamed,
        leaked_shm,
        leaked_procs,
        verdict,
    };
    let bad = code.is_none()
        || !trial.leaked_shm.is_empty()
        || !trial.leaked_procs.is_empty()
        || !trial.misblamed.is_empty()
        || (!trial.late && !trial.named);
    if bad {
        eprintln!("---- trial output ({trial:?}):");
        for (t, l) in &lines {
            eprintln!("{:8.3} {l}", t.as_secs_f64());
        }
    }
    trial
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn crash_trials_end_clean_and_name_the_rank() {
    let trials = env_num("CRASH_TRIALS", 20) as usize;
    let timeout_s = env_num("CRASH_TIMEOUT_S", 5);
    let setup_pct = env_num("CRASH_SETUP_PERCENT", 33).min(100);
    let verbose = std::env::var("CRASH_VERBOSE").as_deref() == Ok("1");
    let seed = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            u64::from_le_bytes(parallel_state::core::auth::random_bytes::<8>().expect("random"))
        });
    let mut rng = Rng(seed);
    let ws = workloads();
    // Calibration: each workload once, untouched: it must pass, and its
    // duration spans the moments drawn for it.
    let mut spans = Vec::new();
    for w in &ws {
        let mut job = start_job(w, timeout_s.max(30), 600);
        let code = job.wait(Duration::from_secs(630), &[]);
        let total = job.start.elapsed();
        let lines = job.output();
        assert_eq!(
            code,
            Some(0),
            "workload `{}` fails untouched:\n{}",
            w.name,
            lines
                .iter()
                .map(|(_, l)| l.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
        let setup = lines
            .iter()
            .find(|(_, l)| l.contains(w.setup_line))
            .map(|(t, _)| *t);
        eprintln!(
            "calibration: {} took {:.2} s (set-up done at {})",
            w.name,
            total.as_secs_f64(),
            setup.map_or("?".into(), |t| format!("{:.2} s", t.as_secs_f64()))
        );
        spans.push((total, setup.unwrap_or(total)));
    }
    // The overall timeout names a frozen rank when every other one finished.
    let longest = spans.iter().map(|s| s.0).max().unwrap_or_default();
    let overall_s = longest.as_secs() + 3 * timeout_s + 10;
    let first = rng.below(ws.len() as u64) as usize;
    let first_sig = rng.below(2) as usize;
    let mut done: Vec<Trial> = Vec::with_capacity(trials);
    // `trials` signals that hit a running job; the late ones (the job had
    // ended) are run on top, up to as many again.
    let mut i = 0;
    while done.iter().filter(|t| !t.late).count() < trials && i < 2 * trials + 10 {
        let wi = (first + i) % ws.len();
        // Each workload gets SIGKILL and SIGSTOP in turn.
        let sig = if (i / ws.len() + first_sig).is_multiple_of(2) {
            Sig::Kill
        } else {
            Sig::Stop
        };
        let victim = rng.below(NPROC as u64) as usize;
        // `setup_pct`% of the moments fall in the calibrated set-up (with
        // some margin), the others anywhere in the run but its last tenth
        // (mostly process exits, where a signal often comes too late).
        let (total, setup) = spans[wi];
        let span = if rng.below(100) < setup_pct {
            (setup * 6 / 5).min(total)
        } else {
            total * 9 / 10
        };
        let at = Duration::from_micros(rng.below(span.as_micros() as u64 + 1));
        let t = run_trial(&ws[wi], sig, victim, at, timeout_s, overall_s);
        if verbose {
            eprintln!(
                "trial {i:3}: {:16} {:?} rank {} at {:6.3} s{}: exit {:?}, ended {:.2} s after, named {}{}{} {}",
                t.workload,
                t.sig,
                t.victim,
                t.at.as_secs_f64(),
                if t.during_setup { " (set-up)" } else { "" },
                t.code,
                t.ended_after,
                t.named,
                if t.late { " (late: the job had finished)" } else { "" },
                if t.misblamed.is_empty() {
                    String::new()
                } else {
                    format!(" misblamed by {:?}", t.misblamed)
                },
                t.verdict
            );
        }
        done.push(t);
        i += 1;
    }
    let run = done.len();
    // The figures.
    let count = |f: &dyn Fn(&Trial) -> bool| done.iter().filter(|t| f(t)).count();
    let hangs = count(&|t| t.code.is_none());
    let shm: usize = done.iter().map(|t| t.leaked_shm.len()).sum();
    let procs: usize = done.iter().map(|t| t.leaked_procs.len()).sum();
    let counted = count(&|t| !t.late);
    let named = count(&|t| !t.late && t.named);
    let among = count(&|t| !t.late && t.among);
    let misblamed = count(&|t| !t.misblamed.is_empty());
    let max_end = done
        .iter()
        .filter(|t| t.code.is_some())
        .map(|t| t.ended_after)
        .fold(0.0, f64::max);
    eprintln!(
        "crash trials: {run} (seed {seed}), {NPROC} ranks, DIST_TIMEOUT_S={timeout_s}, \
         distrun --grace {GRACE_S} --timeout {overall_s}, {setup_pct}% of the moments drawn \
         inside the set-up"
    );
    eprintln!(
        "{:18} {:5} {:>6} {:>6} {:>6} {:>6} {:>5} {:>8} {:>8} {:>9}",
        "workload", "sig", "trials", "setup", "late", "named", "hangs", "shm", "procs", "max end s"
    );
    for w in &ws {
        for sig in [Sig::Kill, Sig::Stop] {
            let these: Vec<&Trial> = done
                .iter()
                .filter(|t| t.workload == w.name && t.sig == sig)
                .collect();
            if these.is_empty() {
                continue;
            }
            let c = |f: &dyn Fn(&Trial) -> bool| these.iter().filter(|t| f(t)).count();
            eprintln!(
                "{:18} {:5} {:>6} {:>6} {:>6} {:>6} {:>5} {:>8} {:>8} {:>9.2}",
                w.name,
                format!("{sig:?}").to_uppercase(),
                these.len(),
                c(&|t| t.during_setup),
                c(&|t| t.late),
                format!("{}/{}", c(&|t| !t.late && t.named), c(&|t| !t.late)),
                c(&|t| t.code.is_none()),
                these.iter().map(|t| t.leaked_shm.len()).sum::<usize>(),
                these.iter().map(|t| t.leaked_procs.len()).sum::<usize>(),
                these
                    .iter()
                    .filter(|t| t.code.is_some())
                    .map(|t| t.ended_after)
                    .fold(0.0, f64::max),
            );
        }
    }
    let pct = if counted == 0 {
        100.0
    } else {
        named as f64 * 100.0 / counted as f64
    };
    eprintln!(
        "total: {hangs} hangs, {shm} leaked /dev/shm segments, {procs} leaked processes; the rank \
         hit named in {named}/{counted} ({pct:.1}%), alone or with ranks stuck behind it in \
         {among}/{counted} (+{} late: the job ended before the signal); \
         {} signals during set-up; survivors blaming another rank in {misblamed} trials; every \
         trial ended within {max_end:.2} s of its signal",
        run - counted,
        count(&|t| t.during_setup),
    );
    assert_eq!(hangs, 0, "some trials hung");
    assert_eq!(shm, 0, "segments leaked");
    assert_eq!(procs, 0, "processes leaked");
    // At least 99% of the trials where the signal hit a running job.
    assert!(
        named * 100 >= counted * 99,
        "the rank hit was named in only {named}/{counted} trials"
    );
}
