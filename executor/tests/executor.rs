//! The multi-process executor, with this test binary re-run as the worker.

use std::time::{Duration, Instant};

use comm_core::CommError;
use executor::{Executor, LaunchConfig, Worker};

/// Worker half: does nothing unless started by an Executor of these tests.
/// `WORKER_MODE=init_error` makes rank 1 fail initialisation;
/// `WORKER_MODE=exit_early` makes rank 2 exit before READY.
#[test]
fn worker_main() {
    if std::env::var_os("EXECUTOR_TEST_WORKER").is_none() {
        return;
    }
    let rank: usize = std::env::var("RANK").unwrap().parse().unwrap();
    let mode = std::env::var("WORKER_MODE").unwrap_or_default();
    let w = Worker::from_env().unwrap();
    match (mode.as_str(), rank) {
        ("init_error", 1) => {
            w.init_failed("could not load the model: out of memory")
                .unwrap();
            std::process::exit(1);
        }
        ("exit_early", 2) => std::process::exit(5),
        ("silent", 0) => std::thread::sleep(Duration::from_secs(60)),
        _ => {}
    }
    w.serve(|method, args| match method {
        "rank" => Ok(rank.to_le_bytes().to_vec()),
        "echo" => Ok(args.to_vec()),
        "add_rank" => {
            let x: u64 = dist_utils::codec::decode(args).map_err(|e| e.to_string())?;
            Ok(dist_utils::codec::encode(&(x + rank as u64)).unwrap())
        }
        "fail_on_2" if rank == 2 => Err("rank 2 refuses".into()),
        "fail_on_2" => Ok(vec![]),
        "die_on_1" if rank == 1 => std::process::exit(3),
        "die_on_1" => {
            std::thread::sleep(Duration::from_secs(30));
            Ok(vec![])
        }
        "hang_on_0" if rank == 0 => {
            std::thread::sleep(Duration::from_secs(60));
            Ok(vec![])
        }
        "hang_on_0" => Ok(vec![]),
        "panic" => panic!("boom on {rank}"),
        other => Err(format!("unknown method {other}")),
    })
    .unwrap();
}

fn config(n: usize, mode: &str) -> LaunchConfig {
    LaunchConfig::new(std::env::current_exe().unwrap(), n)
        .args([
            "--exact",
            "worker_main",
            "--nocapture",
            "--test-threads=1",
            "--quiet",
        ])
        .env("EXECUTOR_TEST_WORKER", "1")
        .env("WORKER_MODE", mode)
        .grace(Duration::from_millis(500))
}

fn alive(pid: u32) -> bool {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    !s[s.rfind(')').unwrap() + 1..].trim_start().starts_with('Z')
}

const T: Duration = Duration::from_secs(20);

#[test]
fn collective_rpc_replies_in_rank_order_and_shutdown_is_clean() {
    let mut ex = Executor::start(&config(3, ""), T).unwrap();
    assert_eq!(ex.world_size(), 3);
    let r = ex.collective_rpc("rank", b"", T).unwrap();
    let ranks: Vec<usize> = r
        .iter()
        .map(|b| usize::from_le_bytes(b[..8].try_into().unwrap()))
        .collect();
    assert_eq!(ranks, [0, 1, 2]);
    assert_eq!(
        ex.collective_rpc("echo", b"hi", T).unwrap(),
        vec![b"hi".to_vec(); 3]
    );
    let sums: Vec<u64> = ex.collective_rpc_obj("add_rank", &10u64, T).unwrap();
    assert_eq!(sums, [10, 11, 12]);

    // Handler errors (and panics) are aggregated with their ranks; the workers stay usable.
    let e = ex
        .collective_rpc("fail_on_2", b"", T)
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank 2: rank 2 refuses"), "{e}");
    let e = ex.collective_rpc("panic", b"", T).unwrap_err().to_string();
    assert!(
        e.contains("rank 0: handler panicked: boom on 0") && e.contains("rank 2"),
        "{e}"
    );
    assert_eq!(ex.collective_rpc("echo", b"ok", T).unwrap().len(), 3);

    let pids = ex.pids();
    let t0 = Instant::now();
    assert_eq!(ex.shutdown().unwrap(), [0, 0, 0]);
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(pids.iter().all(|&p| !alive(p)));
}

#[test]
fn a_dead_worker_is_named_within_the_timeout() {
    let mut ex = Executor::start(&config(3, ""), T).unwrap();
    let pids = ex.pids();
    let t0 = Instant::now();
    match ex.collective_rpc("die_on_1", b"", T) {
        Err(CommError::PeerLost { rank, detail, .. }) => {
            assert_eq!(rank, 1);
            assert!(detail.contains("exited with code 3"), "{detail}");
        }
        other => panic!("expected PeerLost, got {other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(5));
    // Later calls fail at once, naming the same worker.
    match ex.collective_rpc("echo", b"", T) {
        Err(CommError::PeerLost { rank: 1, .. }) => {}
        other => panic!("expected PeerLost, got {other:?}"),
    }
    // The others are busy in a 30 s sleep: shutdown escalates to SIGTERM.
    let t0 = Instant::now();
    let codes = ex.shutdown().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert_eq!(codes[1], 3);
    assert_eq!(codes[0], 128 + 15);
    assert!(pids.iter().all(|&p| !alive(p)));
}

#[test]
fn a_hung_call_times_out_naming_the_rank() {
    let mut ex = Executor::start(&config(2, ""), T).unwrap();
    let t0 = Instant::now();
    match ex.collective_rpc("hang_on_0", b"", Duration::from_millis(500)) {
        Err(CommError::Timeout { missing, .. }) => assert_eq!(missing, ["rank 0"]),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(3));
    let pids = ex.pids();
    drop(ex); // Drop shuts down too.
    assert!(pids.iter().all(|&p| !alive(p)));
}

#[test]
fn start_aggregates_worker_errors() {
    let t0 = Instant::now();
    let e = Executor::start(&config(3, "init_error"), T)
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank 1") && e.contains("out of memory"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(10));

    let e = Executor::start(&config(3, "exit_early"), T)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("rank 2") && e.contains("exited with code 5"),
        "{e}"
    );

    match Executor::start(&config(2, "silent"), Duration::from_millis(800)) {
        Err(CommError::Timeout { missing, .. }) => assert_eq!(missing, ["rank 0"]),
        other => panic!("expected a timeout, got {other:?}"),
    }
}

#[test]
fn worker_outside_an_executor_is_an_error() {
    if std::env::var_os("EXECUTOR_TEST_WORKER").is_some() {
        return;
    }
    assert!(Worker::from_env().is_err());
}
