//! The launcher with real processes (`sh -c ...`).

use std::collections::{BTreeSet, HashMap};
use std::process::Command;
use std::time::{Duration, Instant};

use executor::{launch, LaunchConfig, StopReason};

fn sh(nproc: usize, script: &str) -> LaunchConfig {
    LaunchConfig::new("sh", nproc)
        .args(["-c", script])
        .capture(true)
        .timeout(Duration::from_secs(30))
        .grace(Duration::from_secs(2))
}

/// True while `pid` exists as a non-zombie process.
fn alive(pid: u32) -> bool {
    let p = rustix::process::Pid::from_raw(pid as i32).unwrap();
    if rustix::process::test_kill_process(p).is_err() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s[s.rfind(')').unwrap() + 1..].trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

/// Pids of live (non-zombie) processes in process group `pgid`.
fn group_members(pgid: u32) -> Vec<u32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 1..]
            .split_whitespace()
            .collect();
        if f[2].parse::<u32>().ok() == Some(pgid) && f[0] != "Z" {
            v.push(pid);
        }
    }
    v
}

fn assert_nothing_left(pids: &[u32]) {
    for &pid in pids {
        assert!(!alive(pid), "rank process {pid} is still alive");
        assert!(
            group_members(pid).is_empty(),
            "process group {pid} still has members: {:?}",
            group_members(pid)
        );
    }
}

#[test]
fn four_distinct_ranks() {
    let out = launch(&sh(4, "echo $RANK/$WORLD_SIZE")).unwrap();
    assert!(out.success(), "{out:?}");
    assert_eq!(out.exit_codes(), vec![0; 4]);
    let lines: Vec<String> = out.stdout.iter().map(|l| l.join("|")).collect();
    assert_eq!(lines, ["0/4", "1/4", "2/4", "3/4"]);
    let distinct: BTreeSet<_> = lines.iter().collect();
    assert_eq!(distinct.len(), 4);
    assert_nothing_left(&out.pids());
}

#[test]
fn stdout_and_stderr_are_captured_separately() {
    let out = launch(&sh(
        2,
        "echo out$RANK; echo err$RANK >&2; printf 'no-newline'",
    ))
    .unwrap();
    assert!(out.success());
    assert_eq!(out.stdout[1], ["out1", "no-newline"]);
    assert_eq!(out.stderr[1], ["err1"]);
    assert_eq!(out.stderr[0], ["err0"]);
}

#[test]
fn failing_rank_stops_the_others_with_its_code() {
    let t0 = Instant::now();
    let out = launch(&sh(3, r#"[ "$RANK" = 1 ] && exit 7; sleep 60"#)).unwrap();
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_eq!(out.exit_code, 7);
    assert_eq!(out.first_failure, Some((1, 7)));
    assert_eq!(
        out.stop_reason,
        Some(StopReason::RankFailed { rank: 1, code: 7 })
    );
    assert_eq!(out.ranks[1].code, 7);
    assert!(!out.ranks[1].stopped_by_launcher);
    for r in [0, 2] {
        assert!(out.ranks[r].stopped_by_launcher);
        assert_ne!(out.ranks[r].code, 0);
    }
    // The ranks, and the `sleep 60` they started, are gone.
    assert_nothing_left(&out.pids());
}

#[test]
fn rank_ignoring_sigterm_is_killed_after_the_grace_period() {
    let grace = Duration::from_millis(500);
    // Rank 1 fails only once rank 0 has installed its trap.
    let dir = std::env::temp_dir().join(format!("distrun-trap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = format!(
        r#"D={}; if [ "$RANK" = 1 ]; then while [ ! -e $D/ready ]; do sleep 0.01; done; exit 3; fi
           trap '' TERM; touch $D/ready; while :; do sleep 0.05; done"#,
        dir.display()
    );
    let cfg = sh(2, &script).grace(grace);
    let t0 = Instant::now();
    let out = launch(&cfg).unwrap();
    let took = t0.elapsed();
    assert_eq!(out.exit_code, 3);
    assert_eq!(out.ranks[0].signal, Some(9), "{out:?}");
    assert_eq!(out.ranks[0].code, 137);
    assert!(
        took >= grace && took < Duration::from_secs(10),
        "took {took:?}"
    );
    assert_nothing_left(&out.pids());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn signal_deaths_map_to_128_plus_signal() {
    let out = launch(&sh(2, r#"[ "$RANK" = 0 ] && kill -KILL $$; sleep 60"#)).unwrap();
    assert_eq!(out.exit_code, 137);
    assert_eq!(out.ranks[0].signal, Some(9));
    assert_eq!(out.first_failure, Some((0, 137)));

    let out = launch(&sh(1, "kill -TERM $$; sleep 5")).unwrap();
    assert_eq!(out.exit_code, 143);
    assert_eq!(out.ranks[0].signal, Some(15));
}

#[test]
fn overall_timeout_kills_a_hanging_job() {
    let cfg = sh(2, r#"[ "$RANK" = 0 ] && exit 0; sleep 60"#).timeout(Duration::from_millis(800));
    let t0 = Instant::now();
    let out = launch(&cfg).unwrap();
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(10),
        "took {took:?}"
    );
    assert_eq!(out.exit_code, executor::TIMEOUT_EXIT_CODE);
    match &out.stop_reason {
        Some(StopReason::Timeout { still_running, .. }) => assert_eq!(still_running, &vec![1]),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(out.first_failure, None);
    assert_eq!(out.ranks[0].code, 0);
    assert_nothing_left(&out.pids());
}

fn env_of(lines: &[String]) -> HashMap<String, String> {
    lines
        .iter()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn rendezvous_environment_is_set() {
    let out = launch(&sh(3, "env").env("EXTRA_VAR", "x")).unwrap();
    assert!(out.success());
    assert_ne!(out.master_port, 0);
    let envs: Vec<_> = out.stdout.iter().map(|l| env_of(l)).collect();
    for (r, e) in envs.iter().enumerate() {
        let r = r.to_string();
        assert_eq!(e["RANK"], r);
        assert_eq!(e["LOCAL_RANK"], r);
        assert_eq!(e["WORLD_SIZE"], "3");
        assert_eq!(e["LOCAL_WORLD_SIZE"], "3");
        assert_eq!(e["GROUP_RANK"], "0");
        assert_eq!(e["NODE_RANK"], "0");
        assert_eq!(e["MASTER_ADDR"], "127.0.0.1");
        assert_eq!(e["MASTER_PORT"], out.master_port.to_string());
        assert_eq!(e["DIST_STORE_HOSTED"], "1");
        assert_eq!(e["EXTRA_VAR"], "x");
        let s = &e["DIST_JOB_SECRET"];
        assert_eq!(s.len(), 32);
        assert!(s.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(s, &envs[0]["DIST_JOB_SECRET"]);
        assert_eq!(e["DIST_JOB_ID"], envs[0]["DIST_JOB_ID"]);
        // 16 hex digits derived from the secret (nothing about it
        // revealed), as comm-shm derives it when DIST_JOB_ID is unset.
        assert_eq!(
            e["DIST_JOB_ID"],
            dist_utils::job_id(&comm_core::auth::from_hex("s", s).unwrap())
        );
    }
    // The launcher hosted a store on that port while the job ran; it is gone now.
    // A fresh job gets a fresh secret.
    let again = launch(&sh(1, "echo $DIST_JOB_SECRET")).unwrap();
    assert_ne!(again.stdout[0][0], envs[0]["DIST_JOB_SECRET"]);
}

#[test]
fn explicit_master_port_is_passed_through_and_not_hosted() {
    let out = launch(
        &sh(2, "env")
            .master("10.1.2.3", Some(29511))
            .job_secret("00ff"),
    )
    .unwrap();
    assert!(out.success());
    for e in out.stdout.iter().map(|l| env_of(l)) {
        assert_eq!(e["MASTER_ADDR"], "10.1.2.3");
        assert_eq!(e["MASTER_PORT"], "29511");
        assert_eq!(e["DIST_JOB_SECRET"], "00ff");
        assert!(!e.contains_key("DIST_STORE_HOSTED"));
    }
}

#[test]
fn multi_node_ranks_and_missing_secret() {
    if std::env::var_os("DIST_JOB_SECRET").is_some() {
        return;
    }
    let cfg = sh(2, "true").nodes(2, 1).master("127.0.0.1", Some(29512));
    let err = launch(&cfg).unwrap_err().to_string();
    assert!(
        err.contains("DIST_JOB_SECRET") && err.contains("every node"),
        "{err}"
    );

    // Node 1 of 2 (node 0 hosts the store elsewhere): global ranks 2 and 3.
    let cfg = sh(2, "echo $RANK $WORLD_SIZE $GROUP_RANK $DIST_STORE_HOSTED")
        .nodes(2, 1)
        .master("127.0.0.1", Some(29512))
        .job_secret("abcd");
    let out = launch(&cfg).unwrap();
    assert_eq!(out.stdout, [["2 4 1 1"], ["3 4 1 1"]]);
}

#[test]
fn bad_configuration_is_an_error() {
    assert!(launch(&sh(0, "true")).is_err());
    assert!(launch(&sh(1, "true").nodes(2, 2).job_secret("ab")).is_err());
    let e = launch(&LaunchConfig::new("/nonexistent/program", 2))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/program"), "{e}");
}

#[test]
fn distrun_binary_exits_with_the_failing_code() {
    let t0 = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_distrun"))
        .args([
            "--nproc-per-node",
            "3",
            "--grace",
            "2",
            "--",
            "sh",
            "-c",
            r#"[ "$RANK" = 1 ] && exit 7; sleep 60"#,
        ])
        .output()
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rank 1") && err.contains("exit code 7"),
        "{err}"
    );
}

#[test]
fn distrun_binary_prefixes_output() {
    let out = Command::new(env!("CARGO_BIN_EXE_distrun"))
        .args([
            "--nproc-per-node",
            "4",
            "--",
            "sh",
            "-c",
            "echo $RANK/$WORLD_SIZE",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect();
    lines.sort();
    assert_eq!(
        lines,
        [
            "[rank 0] 0/4",
            "[rank 1] 1/4",
            "[rank 2] 2/4",
            "[rank 3] 3/4"
        ]
    );

    let out = Command::new(env!("CARGO_BIN_EXE_distrun"))
        .args([
            "--no-prefix",
            "--nproc-per-node",
            "1",
            "--",
            "echo",
            "plain",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "plain\n");
}

#[test]
fn distrun_forwards_sigterm_and_workers_die_with_it() {
    let dir = std::env::temp_dir().join(format!("distrun-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = format!("echo $$ > {}/pid.$RANK; exec sleep 60", dir.display());
    let read_pids = || -> Option<Vec<u32>> {
        (0..2)
            .map(|r| {
                std::fs::read_to_string(dir.join(format!("pid.{r}")))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()
            })
            .collect()
    };
    let wait_pids = || {
        let t = Instant::now();
        loop {
            if let Some(p) = read_pids() {
                return p;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "ranks did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let wait_dead = |pids: &[u32]| {
        let t = Instant::now();
        while pids.iter().any(|&p| alive(p)) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "workers {pids:?} outlived the launcher"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    // SIGTERM to distrun: it stops the ranks and exits 128+15.
    let mut child = Command::new(env!("CARGO_BIN_EXE_distrun"))
        .args(["--nproc-per-node", "2", "--", "sh", "-c", &script])
        .spawn()
        .unwrap();
    let pids = wait_pids();
    let p = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(p, rustix::process::Signal::TERM).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(143));
    wait_dead(&pids);

    // SIGKILL to distrun: the workers die through PR_SET_PDEATHSIG.
    for r in 0..2 {
        let _ = std::fs::remove_file(dir.join(format!("pid.{r}")));
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_distrun"))
        .args(["--nproc-per-node", "2", "--", "sh", "-c", &script])
        .spawn()
        .unwrap();
    let pids = wait_pids();
    child.kill().unwrap();
    child.wait().unwrap();
    wait_dead(&pids);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Worker half of `ranks_rendezvous_through_the_store`: does nothing unless
/// started by that test (through the launcher) with DISTRUN_TEST_WORKER=1.
#[test]
fn rendezvous_worker() {
    if std::env::var_os("DISTRUN_TEST_WORKER").is_none() {
        return;
    }
    let t = Duration::from_secs(20);
    let info = dist_utils::RankInfo::from_env().unwrap();
    let store = dist_utils::init_store("env://", &info, t).unwrap();
    store
        .set(
            &format!("rank/{}", info.rank),
            info.local_rank.to_string().as_bytes(),
        )
        .unwrap();
    let keys: Vec<String> = (0..info.world_size).map(|r| format!("rank/{r}")).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    store.wait(&refs, t).unwrap();
    let local = dist_utils::same_host_ranks(store.as_ref(), info.rank, info.world_size, t).unwrap();
    // The store lives in rank 0 (or, hosted, in node 0's launcher, which
    // waits for rank 0): rank 0 leaves only once every rank is done with it.
    store.add("done", 1).unwrap();
    if info.rank == 0 {
        let d = Instant::now() + t;
        while store.get("done", t).unwrap() != info.world_size.to_string().as_bytes() {
            assert!(Instant::now() < d);
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    println!(
        "RESULT rank={} world={} hosted={} local={local:?}",
        info.rank, info.world_size, info.store_hosted
    );
}

#[test]
fn ranks_rendezvous_through_the_store() {
    let exe = std::env::current_exe().unwrap();
    let args = [
        "--exact",
        "rendezvous_worker",
        "--nocapture",
        "--test-threads=1",
    ];
    let free_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // Launcher-hosted store, then rank 0 hosting it on an explicit port.
    for port in [None, Some(free_port)] {
        let cfg = LaunchConfig::new(&exe, 4)
            .args(args)
            .env("DISTRUN_TEST_WORKER", "1")
            .master("127.0.0.1", port)
            .capture(true)
            .timeout(Duration::from_secs(60));
        let out = launch(&cfg).unwrap();
        assert!(out.success(), "{out:?}");
        for r in 0..4 {
            let line = out.stdout[r]
                .iter()
                .find_map(|l| l.find("RESULT").map(|i| &l[i..]));
            assert_eq!(
                line.unwrap_or_else(|| panic!("{out:?}")),
                format!(
                    "RESULT rank={r} world=4 hosted={} local=[0, 1, 2, 3]",
                    port.is_none()
                )
            );
        }
    }
}

#[test]
fn two_nodes_rendezvous_through_node_0s_store() {
    let exe = std::env::current_exe().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let node = move |node_rank: usize| {
        LaunchConfig::new(&exe, 2)
            .args([
                "--exact",
                "rendezvous_worker",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("DISTRUN_TEST_WORKER", "1")
            .nodes(2, node_rank)
            .master("127.0.0.1", Some(port))
            .job_secret("0123456789abcdef0123456789abcdef")
            .capture(true)
            .timeout(Duration::from_secs(60))
    };
    // Node 1 first: its ranks retry until node 0's launcher hosts the store.
    let (cfg0, cfg1) = (node(0), node(1));
    let n1 = std::thread::spawn(move || launch(&cfg1).unwrap());
    let n0 = launch(&cfg0).unwrap();
    let n1 = n1.join().unwrap();
    for (out, ranks) in [(n0, [0, 1]), (n1, [2, 3])] {
        assert!(out.success(), "{out:?}");
        for (local, r) in ranks.into_iter().enumerate() {
            let line = out.stdout[local]
                .iter()
                .find_map(|l| l.find("RESULT").map(|i| &l[i..]));
            // Same host here, so same_host_ranks sees all four.
            assert_eq!(
                line.unwrap_or_else(|| panic!("{out:?}")),
                format!("RESULT rank={r} world=4 hosted=true local=[0, 1, 2, 3]")
            );
        }
    }
}

/// Creates a FIFO at `path` (for the crash trials).
fn mkfifo(path: &std::path::Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
        0,
    )
    .unwrap();
}

/// Waits (bounded) until every path exists.
/// Waits until every file exists. The scripts write a file's content under
/// a temporary name and rename it into place, so a file that exists is
/// complete (a shell redirect creates the file before writing to it).
fn wait_files(paths: &[std::path::PathBuf]) {
    let t = Instant::now();
    while !paths.iter().all(|p| p.exists()) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "ranks did not start: {paths:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The script of one crash trial: the victim holds the write end of a
/// FIFO and sleeps; every other rank reads it and exits 1 the moment it
/// sees end-of-file, that is as soon as the kernel closes the victim's
/// descriptors, which is before the victim's exit is reported. A launcher
/// that guesses the order from a polling pass names one of the survivors.
fn crash_script(dir: &std::path::Path, victim: usize) -> String {
    format!(
        r#"D={d}; if [ "$RANK" = {victim} ]; then exec 3>"$D/fifo"; echo $$ > "$D/victim.pid.tmp"; mv "$D/victim.pid.tmp" "$D/victim.pid"; exec sleep 60
           else exec 4<"$D/fifo"; touch "$D/ready.$RANK"; read x <&4; exit 1; fi"#,
        d = dir.display()
    )
}

fn kill_victim(dir: &std::path::Path, nproc: usize, victim: usize) {
    let mut files: Vec<_> = (0..nproc)
        .filter(|&r| r != victim)
        .map(|r| dir.join(format!("ready.{r}")))
        .collect();
    files.push(dir.join("victim.pid"));
    wait_files(&files);
    let pid: i32 = std::fs::read_to_string(dir.join("victim.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
}

/// Issue 15 item 2: a SIGKILLed rank must be the one named, with 137, even
/// though the others fail (exit 1) right after it. `DISTRUN_CRASH_TRIALS`
/// sets the number of trials (default 30).
#[test]
fn the_first_rank_to_fail_is_named_in_every_crash_trial() {
    let trials: usize = std::env::var("DISTRUN_CRASH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let nproc = 4;
    let mut named = 0;
    for trial in 0..trials {
        let victim = comm_core::auth::random_bytes::<1>().unwrap()[0] as usize % nproc;
        let dir = tempfile::tempdir().unwrap();
        mkfifo(&dir.path().join("fifo"));
        let cfg = sh(nproc, &crash_script(dir.path(), victim));
        let job = std::thread::spawn(move || launch(&cfg).unwrap());
        kill_victim(dir.path(), nproc, victim);
        let out = job.join().unwrap();
        assert_eq!(
            out.first_failure,
            Some((victim, 137)),
            "trial {trial}: rank {victim} was killed; {out:?}"
        );
        assert_eq!(out.exit_code, 137);
        assert_eq!(out.ranks[victim].signal, Some(9));
        // The others exited 1 on their own, or were stopped before they could.
        for r in (0..nproc).filter(|&r| r != victim) {
            assert!(
                [1, 143].contains(&out.ranks[r].code),
                "trial {trial}: {out:?}"
            );
        }
        assert_nothing_left(&out.pids());
        named += 1;
    }
    println!("crash trials: killed rank named in {named}/{trials}");
}

#[test]
fn distrun_names_the_killed_rank_and_exits_137() {
    let dir = tempfile::tempdir().unwrap();
    mkfifo(&dir.path().join("fifo"));
    let victim = 2;
    let child = Command::new(env!("CARGO_BIN_EXE_distrun"))
        .args(["--nproc-per-node", "4", "--grace", "2", "--", "sh", "-c"])
        .arg(crash_script(dir.path(), victim))
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    kill_victim(dir.path(), 4, victim);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(137), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rank 2 (pid") && err.contains("failed with exit code 137 (SIGKILL)"),
        "{err}"
    );
    assert!(
        !err.contains("rank 0 (pid") && !err.contains("rank 1 (pid"),
        "{err}"
    );
}

/// The fake segment a rank "creates" during shm set-up.
fn fake_segment(job_id: &str, rank: usize) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/dev/shm/dshm.{job_id}.x{rank}"))
}

/// Issue 15 item 1 (launcher side): whatever stops the job, the segments
/// named after its job id are gone once the launcher returns.
#[test]
fn job_segments_are_removed_on_every_stop() {
    if !std::path::Path::new("/dev/shm").is_dir() {
        println!("skipped: no /dev/shm");
        return;
    }
    let create = r#"touch "/dev/shm/dshm.$DIST_JOB_ID.x$RANK""#;
    let cases = [
        // Success.
        ("success", format!("{create}; exit 0"), None),
        // One rank fails while the other waits (as in a set-up that never completes).
        (
            "failure",
            format!(r#"{create}; [ "$RANK" = 1 ] && exit 4; sleep 60"#),
            None,
        ),
        // The overall timeout.
        (
            "timeout",
            format!("{create}; sleep 60"),
            Some(Duration::from_secs(2)),
        ),
    ];
    for (what, script, timeout) in cases {
        let id = format!("test{}{what}", std::process::id());
        let mut cfg = sh(2, &script).job_id(id.clone());
        if let Some(t) = timeout {
            cfg = cfg.timeout(t);
        }
        let out = launch(&cfg).unwrap();
        for r in 0..2 {
            assert!(
                !fake_segment(&id, r).exists(),
                "{what}: {} left behind; {out:?}",
                fake_segment(&id, r).display()
            );
        }
        assert_nothing_left(&out.pids());
    }
}

/// Ctrl-C (SIGINT) and SIGTERM on distrun while the ranks wait in set-up:
/// the ranks are stopped and their segments removed.
#[test]
fn distrun_interrupted_during_setup_stops_ranks_and_removes_segments() {
    if !std::path::Path::new("/dev/shm").is_dir() {
        println!("skipped: no /dev/shm");
        return;
    }
    for (sig, code) in [
        (rustix::process::Signal::INT, 130),
        (rustix::process::Signal::TERM, 143),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let script = format!(
            r#"touch "/dev/shm/dshm.$DIST_JOB_ID.x$RANK"; echo $$ > "{d}/pid.$RANK.tmp"; mv "{d}/pid.$RANK.tmp" "{d}/pid.$RANK"; echo "$DIST_JOB_ID" > "{d}/id.$RANK.tmp"; mv "{d}/id.$RANK.tmp" "{d}/id"; exec sleep 60"#,
            d = dir.path().display()
        );
        let mut child = Command::new(env!("CARGO_BIN_EXE_distrun"))
            .args([
                "--nproc-per-node",
                "2",
                "--grace",
                "2",
                "--",
                "sh",
                "-c",
                &script,
            ])
            .spawn()
            .unwrap();
        let files: Vec<_> = (0..2)
            .map(|r| dir.path().join(format!("pid.{r}")))
            .chain([dir.path().join("id")])
            .collect();
        wait_files(&files);
        let pids: Vec<u32> = (0..2)
            .map(|r| {
                std::fs::read_to_string(dir.path().join(format!("pid.{r}")))
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap()
            })
            .collect();
        let id = std::fs::read_to_string(dir.path().join("id"))
            .unwrap()
            .trim()
            .to_string();
        assert_eq!(id.len(), 16, "DIST_JOB_ID `{id}`");
        for r in 0..2 {
            assert!(fake_segment(&id, r).exists());
        }
        let p = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
        rustix::process::kill_process(p, sig).unwrap();
        assert_eq!(child.wait().unwrap().code(), Some(code));
        for r in 0..2 {
            assert!(!fake_segment(&id, r).exists(), "{sig:?}: segment left");
        }
        assert!(pids.iter().all(|&p| !alive(p)), "{sig:?}: ranks left");
    }
}

/// Issue 15 item 11: ranks that write each line in two pieces (two
/// `write`s), four at once, with and without the prefix: every line that
/// reaches distrun's stderr is whole. (With `--inherit-output` the same
/// ranks' pieces can mix.)
#[test]
fn forwarded_lines_are_never_cut() {
    let script = r#"i=0; while [ $i -lt 300 ]; do printf "$RANK:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" >&2; printf "|bbbbbbbbbbbbbbbbbbbbbbbbbbbbbb$RANK\n" >&2; i=$((i+1)); done"#;
    for prefix in [true, false] {
        let mut args = vec!["--nproc-per-node", "4"];
        if !prefix {
            args.push("--no-prefix");
        }
        args.extend(["--", "sh", "-c", script]);
        let out = Command::new(env!("CARGO_BIN_EXE_distrun"))
            .args(&args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        let mut per_rank = [0usize; 4];
        for line in err.lines() {
            let body = if prefix {
                let (p, rest) = line.split_at(line.find("] ").map(|i| i + 2).unwrap_or(0));
                assert!(p.starts_with("[rank "), "cut line: {line:?}");
                rest
            } else {
                line
            };
            let r = body.as_bytes()[0] - b'0';
            let want = format!("{r}:{}|{}{r}", "a".repeat(30), "b".repeat(30));
            assert_eq!(body, want, "cut line: {line:?}");
            if prefix {
                assert!(line.starts_with(&format!("[rank {r}] ")), "{line:?}");
            }
            per_rank[r as usize] += 1;
        }
        assert_eq!(per_rank, [300; 4]);
    }
}
