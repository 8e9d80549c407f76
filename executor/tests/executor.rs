//! The multi-process executor, with this test binary re-run as the worker.
//!
//! Deadlines: calls get 30 s (a healthy reply takes milliseconds); the
//! tests that wait for a timeout use 3 s or more of a call that starts after
//! every worker is READY, so process set-up is never inside a deadline that
//! is meant to expire or to be met.

use std::time::{Duration, Instant};

use comm_core::CommError;
use executor::{launch, Executor, LaunchConfig, Method, Methods, ReplyFrom, Worker};
use serde_bytes::ByteBuf;

const RANK: Method<(), usize> = Method::new("rank");
const ECHO: Method<Vec<u8>, Vec<u8>> = Method::new("echo");
const ADD_RANK: Method<u64, u64> = Method::new("add_rank");
/// Every rank computes, only rank 0 replies.
const SUM0: Method<u64, u64> = Method::with_reply("sum0", ReplyFrom::Rank(0));
const FAIL_ON_2: Method<(), ()> = Method::new("fail_on_2");
const PANIC: Method<(), ()> = Method::new("panic");
const DIE_ON_1: Method<(), ()> = Method::new("die_on_1");
const HANG_ON_0: Method<(), ()> = Method::new("hang_on_0");
/// Sleeps the given milliseconds, then returns the rank.
const SLOW: Method<u64, usize> = Method::new("slow");
/// The name of ADD_RANK with the wrong argument type.
const ADD_RANK_WRONG: Method<String, u64> = Method::new("add_rank");
const MISSING: Method<(), ()> = Method::new("not_registered");
/// The given rank exits with code 3; the others return at once.
const DIE_ON: Method<usize, ()> = Method::new("die_on");
/// Creates a file named like a comm-shm segment of this job, as a rank
/// stopped during shared-memory set-up leaves behind.
const FAKE_SEGMENT: Method<(), ()> = Method::new("fake_segment");
/// Handlers that read their argument where it lies (`Methods::on_view`):
/// the length and byte sum (plus the rank) of a byte buffer;
const VIEW_SUM: Method<ByteBuf, (u64, u64)> = Method::new("view_sum");
/// a text and a byte block, described;
const VIEW_PAIR: Method<(String, Vec<u8>), String> = Method::new("view_pair");
/// fails on rank 1 (quoting the argument) and panics on rank 2.
const VIEW_FAIL: Method<String, ()> = Method::new("view_fail");
/// VIEW_SUM's name with the wrong argument type.
const VIEW_SUM_WRONG: Method<u64, (u64, u64)> = Method::new("view_sum");

struct State {
    rank: usize,
    calls: u64,
}

/// Worker half: does nothing unless started by a test of this file
/// (`EXECUTOR_TEST_WORKER`). `WORKER_MODE`: `init_error` makes rank 1's
/// initialisation fail, `exit_early` makes rank 2 exit before READY,
/// `silent` keeps rank 0 from ever reporting.
#[test]
fn worker_main() {
    if std::env::var_os("EXECUTOR_TEST_WORKER").is_none() {
        return;
    }
    let mode = std::env::var("WORKER_MODE").unwrap_or_default();
    let rank: usize = std::env::var("RANK").unwrap().parse().unwrap();
    match (mode.as_str(), rank) {
        ("exit_early", 2) => std::process::exit(5),
        ("silent", 0) => {
            std::thread::sleep(Duration::from_secs(120));
            return;
        }
        _ => {}
    }
    let w = Worker::from_env().unwrap();
    assert_eq!(w.rank(), rank);
    let mut m = Methods::<State>::new();
    m.on(&RANK, |s, ()| Ok::<_, String>(s.rank))
        .on(&ECHO, |s, v: Vec<u8>| {
            s.calls += 1;
            Ok::<_, String>(v)
        })
        .on(&ADD_RANK, |s, x| Ok::<_, String>(x + s.rank as u64))
        .on(&SUM0, |s, x| Ok::<_, String>(x * 10 + s.rank as u64))
        .on(&FAIL_ON_2, |s, ()| {
            if s.rank == 2 {
                Err(format!("rank {} refuses", s.rank))
            } else {
                Ok(())
            }
        })
        .on(&PANIC, |s, ()| -> Result<(), String> {
            panic!("boom on {}", s.rank)
        })
        .on(&DIE_ON_1, |s, ()| {
            if s.rank == 1 {
                std::process::exit(3);
            }
            std::thread::sleep(Duration::from_secs(30));
            Ok::<_, String>(())
        })
        .on(&DIE_ON, |s, r| {
            if s.rank == r {
                std::process::exit(3);
            }
            Ok::<_, String>(())
        })
        .on(&HANG_ON_0, |s, ()| {
            if s.rank == 0 {
                std::thread::sleep(Duration::from_secs(60));
            }
            Ok::<_, String>(())
        })
        .on(&FAKE_SEGMENT, |s, ()| {
            let id = std::env::var("DIST_JOB_ID").map_err(|e| e.to_string())?;
            std::fs::write(format!("/dev/shm/dshm.{id}.fake{}", s.rank), b"")
                .map_err(|e| e.to_string())
        })
        .on(&SLOW, |s, ms| {
            std::thread::sleep(Duration::from_millis(ms));
            Ok::<_, String>(s.rank)
        })
        .on_view(&VIEW_SUM, |s, b: &[u8]| {
            let sum = b.iter().map(|&x| x as u64).sum::<u64>();
            Ok::<_, String>((b.len() as u64, sum + s.rank as u64))
        })
        .on_view(&VIEW_PAIR, |s, (text, b): (&str, &[u8])| {
            Ok::<_, String>(format!("{}:{text}:{}", s.rank, b.len()))
        })
        .on_view(&VIEW_FAIL, |s, text: &str| match s.rank {
            1 => Err(format!("rank 1 refuses {text}")),
            2 => panic!("rank 2 panics on {text}"),
            _ => Ok(()),
        });
    let res = w.run(
        |w| {
            if mode == "init_error" && w.rank() == 1 {
                Err("could not load the model: out of memory".to_string())
            } else {
                Ok(State {
                    rank: w.rank(),
                    calls: 0,
                })
            }
        },
        &mut m,
    );
    if res.is_err() {
        std::process::exit(1);
    }
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

fn shm_left(job_id: &str) -> Vec<String> {
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(&format!("dshm.{job_id}.")))
                .collect()
        })
        .unwrap_or_default()
}

fn ranks_of(e: &CommError) -> Vec<usize> {
    e.culprits().iter().map(|r| r.best()).collect()
}

const T: Duration = Duration::from_secs(30);

#[test]
fn typed_calls_reply_in_rank_order_and_failures_name_their_rank() {
    let ex = Executor::start(&config(3, ""), T).unwrap();
    assert_eq!(ex.world_size(), 3);
    assert_eq!(ex.collective_rpc(&RANK, &(), T).unwrap(), [0, 1, 2]);
    let payload: Vec<u8> = (0..=255).cycle().take(1024).collect();
    assert_eq!(
        ex.collective_rpc(&ECHO, &payload, T).unwrap(),
        vec![payload.clone(); 3]
    );
    assert_eq!(ex.collective_rpc(&ADD_RANK, &10, T).unwrap(), [10, 11, 12]);
    // Only rank 0's result comes back; the others computed and acknowledged.
    assert_eq!(ex.collective_rpc(&SUM0, &4, T).unwrap(), [40]);

    // A handler error names its rank; the workers stay usable.
    let e = ex.collective_rpc(&FAIL_ON_2, &(), T).unwrap_err();
    assert!(matches!(e, CommError::RemoteFailed { .. }), "{e}");
    assert_eq!(ranks_of(&e), [2]);
    assert!(
        e.to_string().contains("rank 2 (error: rank 2 refuses)"),
        "{e}"
    );
    // A panic on every rank names every rank, with its message.
    let e = ex.collective_rpc(&PANIC, &(), T).unwrap_err();
    assert_eq!(ranks_of(&e), [0, 1, 2]);
    assert!(
        e.to_string().contains("rank 1 (panicked: boom on 1)"),
        "{e}"
    );
    // Wrong argument type and unknown method are reported, not fatal.
    let e = ex
        .collective_rpc(&ADD_RANK_WRONG, &"x".to_string(), T)
        .unwrap_err();
    assert_eq!(ranks_of(&e), [0, 1, 2]);
    assert!(e.to_string().contains("bad argument"), "{e}");
    let e = ex.collective_rpc(&MISSING, &(), T).unwrap_err();
    assert!(
        e.to_string().contains("no method `not_registered`") && e.to_string().contains("echo"),
        "{e}"
    );
    assert_eq!(ex.collective_rpc(&ADD_RANK, &1, T).unwrap(), [1, 2, 3]);
    // A reply rank outside the job is refused up front.
    let bad: Method<(), ()> = Method::named("rank", ReplyFrom::Rank(3));
    assert!(matches!(
        ex.submit(&bad, &(), T),
        Err(CommError::InvalidArgument(_))
    ));

    // Several calls in flight, answered in order.
    let pending: Vec<_> = (0..8u64)
        .map(|i| ex.submit(&ADD_RANK, &(i * 100), T).unwrap())
        .collect();
    for (i, p) in pending.into_iter().enumerate().rev() {
        let i = i as u64;
        assert_eq!(p.wait().unwrap(), [i * 100, i * 100 + 1, i * 100 + 2]);
    }

    let pids = ex.pids();
    let job = ex.job_id().to_string();
    let t0 = Instant::now();
    assert_eq!(ex.shutdown().unwrap(), [0, 0, 0]);
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(pids.iter().all(|&p| !alive(p)));
    assert_eq!(shm_left(&job), Vec::<String>::new());
}

/// An argument whose `Serialize` fails: the call fails with a codec error
/// naming its type, before anything is sent, and the workers stay usable.
struct Unencodable;

impl serde::Serialize for Unencodable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("refuses to be encoded"))
    }
}

#[test]
fn an_argument_that_cannot_be_encoded_fails_only_its_call() {
    const BAD: Method<Unencodable, ()> = Method::new("echo");
    let ex = Executor::start(&config(2, ""), T).unwrap();
    match ex.collective_rpc(&BAD, &Unencodable, T).unwrap_err() {
        CommError::Codec(m) => assert!(m.contains("Unencodable"), "{m}"),
        other => panic!("{other}"),
    }
    assert_eq!(
        ex.collective_rpc(&ECHO, &vec![7u8; 300], T).unwrap(),
        vec![vec![7u8; 300]; 2]
    );
    assert_eq!(ex.shutdown().unwrap(), [0, 0]);
}

/// Requests that fit the request ring are encoded straight into it (pad
/// records where one would wrap) and decoded there by every worker; those
/// that find no room, or are larger than the ring, go through a frame and
/// stream. Many in flight at once, of sizes that mix both kinds, every
/// worker answers each exactly and in order.
#[test]
fn requests_in_place_and_streamed_interleave_in_flight() {
    let cfg = config(3, "").env(executor::REQUEST_RING_ENV, "64K");
    let ex = Executor::start(&cfg, T).unwrap();
    let sizes = [100usize, 20_000, 45_000, 70_000, 5, 30_000, 65_529, 12_345];
    let arg = |i: usize| -> Vec<u8> {
        (0..sizes[i % sizes.len()])
            .map(|j| (i * 7 + j) as u8)
            .collect()
    };
    for round in 0..3 {
        let pending: Vec<_> = (0..24)
            .map(|i| ex.submit(&ECHO, &arg(i + round), T).unwrap())
            .collect();
        for (i, p) in pending.into_iter().enumerate() {
            assert_eq!(
                p.wait().unwrap(),
                vec![arg(i + round); 3],
                "round {round} call {i}"
            );
        }
    }
    assert_eq!(ex.shutdown().unwrap(), [0, 0, 0]);
}

/// Handlers registered with `on_view` read their argument where it lies:
/// in the request ring (whole or, for a request larger than the ring,
/// gathered) or in the socket's frame. Many in flight, every worker's
/// result is exact; a failing or panicking view handler is reported with
/// its rank, a wrongly typed argument as such, and the workers stay usable.
#[test]
fn view_handlers_read_arguments_where_they_lie() {
    for queue in ["shm", "socket"] {
        let cfg = config(3, "")
            .env(executor::QUEUE_ENV, queue)
            .env(executor::REQUEST_RING_ENV, "64K");
        let ex = Executor::start(&cfg, T).unwrap();
        let sizes = [0usize, 5, 20_000, 65_529, 300_003, 1_000];
        let arg = |i: usize| -> ByteBuf {
            ByteBuf::from(
                (0..sizes[i % sizes.len()])
                    .map(|j| (i * 13 + j) as u8)
                    .collect::<Vec<u8>>(),
            )
        };
        let expect = |b: &ByteBuf| -> Vec<(u64, u64)> {
            let sum = b.iter().map(|&x| x as u64).sum::<u64>();
            (0..3).map(|r| (b.len() as u64, sum + r)).collect()
        };
        let pending: Vec<_> = (0..18)
            .map(|i| ex.submit(&VIEW_SUM, &arg(i), T).unwrap())
            .collect();
        for (i, p) in pending.into_iter().enumerate() {
            assert_eq!(p.wait().unwrap(), expect(&arg(i)), "{queue} call {i}");
        }
        let pair = ("video".to_string(), vec![7u8; 70_000]);
        assert_eq!(
            ex.collective_rpc(&VIEW_PAIR, &pair, T).unwrap(),
            ["0:video:70000", "1:video:70000", "2:video:70000"]
        );

        let e = ex
            .collective_rpc(&VIEW_FAIL, &"the prompt".to_string(), T)
            .unwrap_err();
        assert_eq!(ranks_of(&e), [1, 2], "{queue}: {e}");
        let text = e.to_string();
        assert!(text.contains("rank 1 refuses the prompt"), "{text}");
        assert!(text.contains("rank 2 panics on the prompt"), "{text}");

        let e = ex.collective_rpc(&VIEW_SUM_WRONG, &7, T).unwrap_err();
        assert_eq!(ranks_of(&e), [0, 1, 2], "{queue}: {e}");
        assert!(e.to_string().contains("ByteBuf"), "{e}");

        assert_eq!(
            ex.collective_rpc(&VIEW_SUM, &arg(2), T).unwrap(),
            expect(&arg(2))
        );
        assert_eq!(ex.shutdown().unwrap(), [0, 0, 0], "{queue}");
    }
}

/// Requests and replies larger than their shared-memory rings stream
/// through them, also with several in flight at once (a request that must
/// wait for room is written while replies keep being read, so workers
/// blocked on full reply rings move on); the socket path gives the same.
#[test]
fn large_requests_and_replies_stream_through_small_rings() {
    for queue in ["shm", "socket"] {
        let cfg = config(3, "")
            .env(executor::QUEUE_ENV, queue)
            .env(executor::REQUEST_RING_ENV, "16K")
            .env(executor::REPLY_RING_ENV, "16K");
        let ex = Executor::start(&cfg, T).unwrap();
        let job = ex.job_id().to_string();
        // 19 rings' worth each way.
        let big: Vec<u8> = (0..300_003).map(|i| (i % 251) as u8).collect();
        assert_eq!(
            ex.collective_rpc(&ECHO, &big, T).unwrap(),
            vec![big.clone(); 3]
        );
        let pending: Vec<_> = (0..6u8)
            .map(|i| {
                let mut b = big.clone();
                b[0] = i;
                ex.submit(&ECHO, &b, T).unwrap()
            })
            .collect();
        for (i, p) in pending.into_iter().enumerate() {
            let r = p.wait().unwrap();
            assert_eq!(r.len(), 3);
            assert!(r.iter().all(|v| v[0] == i as u8 && v[1..] == big[1..]));
        }
        assert_eq!(ex.collective_rpc(&ADD_RANK, &1, T).unwrap(), [1, 2, 3]);
        let pids = ex.pids();
        assert_eq!(ex.shutdown().unwrap(), [0, 0, 0], "{queue}");
        assert!(pids.iter().all(|&p| !alive(p)));
        assert_eq!(shm_left(&job), Vec::<String>::new());
    }
}

#[test]
fn a_dead_worker_is_named_and_the_others_are_stopped() {
    let ex = Executor::start(&config(3, ""), T).unwrap();
    let pids = ex.pids();
    let job = ex.job_id().to_string();
    ex.collective_rpc(&FAKE_SEGMENT, &(), T).unwrap();
    assert_eq!(shm_left(&job).len(), 3);
    let t0 = Instant::now();
    match ex.collective_rpc(&DIE_ON_1, &(), T) {
        Err(CommError::PeerLost { peer, detail, .. }) => {
            assert_eq!(peer.best(), 1);
            assert!(detail.contains("exited with code 3"), "{detail}");
        }
        other => panic!("expected PeerLost, got {other:?}"),
    }
    // Named well within the call's timeout, and by the time the error is
    // back, the other workers (busy in a 30 s sleep) are gone too.
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert!(pids.iter().all(|&p| !alive(p)), "workers left: {pids:?}");
    assert_eq!(shm_left(&job), Vec::<String>::new());
    // Later calls fail at once, naming the same worker.
    match ex.collective_rpc(&ECHO, &vec![], T) {
        Err(CommError::PeerLost { peer, .. }) => assert_eq!(peer.best(), 1),
        other => panic!("expected PeerLost, got {other:?}"),
    }
    let codes = ex.shutdown().unwrap();
    assert_eq!(codes[1], 3);
    assert_eq!(codes[0], 128 + 15);
}

#[test]
fn a_worker_killed_between_calls_is_named_at_the_next_call() {
    let ex = Executor::start(&config(3, ""), T).unwrap();
    let pids = ex.pids();
    assert_eq!(ex.collective_rpc(&RANK, &(), T).unwrap(), [0, 1, 2]);
    let victim = rustix::process::Pid::from_raw(pids[2] as i32).unwrap();
    rustix::process::kill_process(victim, rustix::process::Signal::KILL).unwrap();
    let t0 = Instant::now();
    match ex.collective_rpc(&RANK, &(), T) {
        Err(CommError::PeerLost { peer, detail, .. }) => {
            assert_eq!(peer.best(), 2);
            assert!(detail.contains("killed by signal 9"), "{detail}");
        }
        other => panic!("expected PeerLost, got {other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(pids.iter().all(|&p| !alive(p)));
}

#[test]
fn a_hung_worker_is_named_at_the_timeout() {
    let ex = Executor::start(&config(2, ""), T).unwrap();
    let timeout = Duration::from_secs(3);
    let t0 = Instant::now();
    match ex.collective_rpc(&HANG_ON_0, &(), timeout) {
        Err(CommError::Timeout { missing, .. }) => {
            let ranks: Vec<usize> = missing.iter().map(|m| m.rank.best()).collect();
            assert_eq!(ranks, [0]);
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    let took = t0.elapsed();
    assert!(
        took >= timeout && took < timeout + Duration::from_secs(10),
        "{took:?}"
    );
    let pids = ex.pids();
    drop(ex); // Drop shuts down too (rank 0 needs SIGTERM).
    assert!(pids.iter().all(|&p| !alive(p)));
}

#[test]
fn shutdown_finishes_calls_in_flight_or_fails_them_explicitly() {
    // Grace long enough for both queued calls: they complete.
    let ex = Executor::start(&config(2, "").grace(Duration::from_secs(20)), T).unwrap();
    let a = ex.submit(&SLOW, &200, T).unwrap();
    let b = ex.submit(&SLOW, &200, T).unwrap();
    assert_eq!(ex.shutdown().unwrap(), [0, 0]);
    assert_eq!(a.wait().unwrap(), [0, 1]);
    assert_eq!(b.wait().unwrap(), [0, 1]);

    // A call that cannot finish within the grace period fails explicitly.
    let ex = Executor::start(&config(2, ""), T).unwrap();
    let hung = ex.submit(&HANG_ON_0, &(), T).unwrap();
    let codes = ex.shutdown().unwrap();
    assert_eq!(codes[0], 128 + 15);
    match hung.wait() {
        Err(CommError::Aborted(m)) => assert!(m.contains("shut down"), "{m}"),
        other => panic!("expected Aborted, got {other:?}"),
    }
}

#[test]
fn start_aggregates_worker_errors() {
    let e = Executor::start(&config(3, "init_error"), T).unwrap_err();
    assert!(matches!(e, CommError::RemoteFailed { .. }), "{e}");
    assert_eq!(ranks_of(&e), [1]);
    assert!(e.to_string().contains("out of memory"), "{e}");

    let e = Executor::start(&config(3, "exit_early"), T).unwrap_err();
    assert_eq!(ranks_of(&e), [2]);
    assert!(e.to_string().contains("exited with code 5"), "{e}");

    // Rank 1 reports READY within the 10 s (set-up included); rank 0 never does.
    let t0 = Instant::now();
    match Executor::start(&config(2, "silent"), Duration::from_secs(10)) {
        Err(CommError::Timeout { missing, .. }) => {
            let ranks: Vec<usize> = missing.iter().map(|m| m.rank.best()).collect();
            assert_eq!(ranks, [0]);
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(20));
}

#[test]
fn worker_outside_an_executor_is_an_error() {
    if std::env::var_os("EXECUTOR_TEST_WORKER").is_some() || std::env::var_os("RANK").is_some() {
        return;
    }
    let e = Worker::from_env().unwrap_err().to_string();
    assert!(e.contains("not started by executor::Executor"), "{e}");
}

/// Two "hosts" on loopback: the executor runs node 0 (2 local workers) and
/// a plain `launch` runs node 1 (2 workers that find the executor through
/// the store and authenticate over TCP). One process drives all four.
#[test]
fn one_executor_drives_two_nodes() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let secret = executor::random_hex128().unwrap();
    let node = |rank: usize| {
        config(2, "")
            .nodes(2, rank)
            .master("127.0.0.1", Some(port))
            .job_secret(secret.clone())
            .capture(true)
            .timeout(Duration::from_secs(120))
    };
    let cfg1 = node(1);
    let node1 = std::thread::spawn(move || launch(&cfg1).unwrap());
    let ex = Executor::start(&node(0), Duration::from_secs(60)).unwrap();
    assert_eq!(ex.world_size(), 4);
    assert_eq!(ex.pids().len(), 2);
    assert_eq!(ex.collective_rpc(&RANK, &(), T).unwrap(), [0, 1, 2, 3]);
    assert_eq!(
        ex.collective_rpc(&ADD_RANK, &100, T).unwrap(),
        [100, 101, 102, 103]
    );
    let e = ex.collective_rpc(&FAIL_ON_2, &(), T).unwrap_err();
    assert_eq!(ranks_of(&e), [2]);
    let big = vec![7u8; 3 << 20];
    assert_eq!(ex.collective_rpc(&ECHO, &big, T).unwrap(), vec![big; 4]);
    assert_eq!(ex.shutdown().unwrap(), [0, 0]);
    // The remote workers exited 0 on the shutdown message.
    let out = node1.join().unwrap();
    assert!(out.success(), "{out:?}");
}

/// A remote worker that dies is named (its connection ends), and every
/// other worker, local and remote, is stopped.
#[test]
fn a_dead_remote_worker_is_named() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let secret = executor::random_hex128().unwrap();
    let node = |rank: usize| {
        config(2, "")
            .nodes(2, rank)
            .master("127.0.0.1", Some(port))
            .job_secret(secret.clone())
            .capture(true)
            .timeout(Duration::from_secs(120))
    };
    let cfg1 = node(1);
    let node1 = std::thread::spawn(move || launch(&cfg1).unwrap());
    let ex = Executor::start(&node(0), Duration::from_secs(60)).unwrap();
    let pids = ex.pids();
    let t0 = Instant::now();
    match ex.collective_rpc(&DIE_ON, &3, T) {
        Err(CommError::PeerLost { peer, detail, .. }) => {
            assert_eq!(peer.best(), 3);
            assert!(detail.contains("remote worker"), "{detail}");
        }
        other => panic!("expected PeerLost, got {other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(pids.iter().all(|&p| !alive(p)));
    let out = node1.join().unwrap();
    assert_eq!(out.first_failure, Some((3, 3)), "{out:?}");
    assert_nothing_running(&out.pids());
    drop(ex);
}

fn assert_nothing_running(pids: &[u32]) {
    assert!(pids.iter().all(|&p| !alive(p)), "left running: {pids:?}");
}

/// Node 1's workers with the wrong secret cannot join: the executor names
/// them as never connected.
#[test]
fn remote_workers_with_the_wrong_secret_are_refused() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let node = |rank: usize, secret: &str| {
        config(1, "")
            .nodes(2, rank)
            .master("127.0.0.1", Some(port))
            .job_secret(secret)
            .capture(true)
            .timeout(Duration::from_secs(60))
    };
    let cfg1 = node(1, "00112233445566778899aabbccddeeff");
    let node1 = std::thread::spawn(move || launch(&cfg1).unwrap());
    let e = Executor::start(
        &node(0, "ffeeddccbbaa99887766554433221100"),
        Duration::from_secs(10),
    )
    .unwrap_err();
    match &e {
        CommError::Timeout { missing, .. } => {
            assert_eq!(missing.len(), 1, "{e}");
            assert_eq!(missing[0].rank.best(), 1);
            assert!(missing[0].detail.contains("never connected"), "{e}");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    let out = node1.join().unwrap();
    assert!(!out.success());
}
