//! The executor example (`examples/video_generator.rs`, included below) in
//! CI: 4 gpu workers on the CPU, results bit-identical to the
//! single-process reference, the adapter change applied between requests;
//! and the failure cases with real gpu-worker processes: a worker that
//! dies during or between requests, a hung worker, a shutdown with requests
//! in flight. This test binary re-runs itself as the workers.
//!
//! Deadlines: start-up gets 120 s and calls 60 s (healthy ones take
//! milliseconds); the deadline that is meant to expire (3 s) belongs to a
//! call made after every worker is READY.

#[allow(dead_code)]
#[path = "../examples/video_generator.rs"]
mod video_generator;

use std::time::{Duration, Instant};

use comm_core::CommError;
use executor::{Executor, GpuWorker, LaunchConfig, Method, ParallelConfig, ReplyFrom};
use video_generator::{Args, ModelSpec, Output, Request, GENERATE};

/// `GENERATE`, except that rank `.0` exits with code 3 instead of computing
/// (the others block in the forward pass's first all_to_all).
const GENERATE_OR_DIE: Method<(usize, Request), Output> =
    Method::with_reply("generate_or_die", ReplyFrom::Rank(0));
/// Rank `.0` sleeps a minute; the others return at once.
const HANG_ON: Method<usize, ()> = Method::new("hang_on");

const START: Duration = Duration::from_secs(120);
const T: Duration = Duration::from_secs(60);

/// Worker half: does nothing unless started by a test of this file.
#[test]
fn worker_main() {
    if std::env::var_os("VIDEO_TEST_WORKER").is_none() {
        return;
    }
    let mut m = video_generator::methods();
    m.on(&GENERATE_OR_DIE, |st, (victim, req): (usize, Request)| {
        if st.ctx.rank() == victim {
            std::process::exit(3);
        }
        video_generator::forward(st, req)
    })
    .on(&HANG_ON, |st, r: usize| {
        if st.ctx.rank() == r {
            std::thread::sleep(Duration::from_secs(60));
        }
        Ok::<_, String>(())
    });
    let res = GpuWorker::from_env().and_then(|w| w.run(video_generator::build, &mut m));
    if let Err(e) = res {
        eprintln!("worker: {e}");
        std::process::exit(1);
    }
}

fn launch(workers: usize) -> LaunchConfig {
    LaunchConfig::new(std::env::current_exe().unwrap(), workers)
        .args([
            "--exact",
            "worker_main",
            "--nocapture",
            "--test-threads=1",
            "--quiet",
        ])
        .env("VIDEO_TEST_WORKER", "1")
        .grace(Duration::from_millis(500))
}

/// Small enough for a debug build on a loaded 2-core machine.
fn args(seq: &[usize]) -> Args {
    Args {
        worker: false,
        workers: 4,
        nnodes: 1,
        master_addr: "127.0.0.1".into(),
        master_port: None,
        seq: seq.to_vec(),
        batch: 2,
        heads: 4,
        head_dim: 8,
        layers: 2,
        scale: 0.5,
        adapter_at: 2,
        ring_degree: 1,
        tolerance: 0.0,
        device: "cpu".into(),
        backend: None,
        timeout: 120,
    }
}

fn spec() -> ModelSpec {
    let a = args(&[]);
    ModelSpec {
        batch: a.batch,
        heads: a.heads,
        head_dim: a.head_dim,
        layers: a.layers,
    }
}

fn start() -> Executor {
    let parallel = ParallelConfig::default().sp(4).device("cpu").timeout(T);
    Executor::start_gpu(&launch(4), &parallel, &spec(), START).unwrap()
}

/// A request of length `seq` and the reference output.
fn request(seq: usize, seed: u64) -> (Request, Vec<f32>) {
    let mut m = demo_model::Model::new(&spec().config(seq));
    m.cfg = spec().config(seq);
    let input = m.input_seeded(seed);
    let want = m.reference(&input);
    (Request { seq, input }, want)
}

fn alive(pid: u32) -> bool {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    !s[s.rfind(')').unwrap() + 1..].trim_start().starts_with('Z')
}

fn shm_left(job_id: &str) -> Vec<String> {
    comm_shm::list_segments(job_id)
}

fn assert_nothing_left(pids: &[u32], job: &str) {
    assert!(pids.iter().all(|&p| !alive(p)), "workers left: {pids:?}");
    assert_eq!(shm_left(job), Vec::<String>::new());
}

#[test]
fn the_example_serves_exact_results_and_applies_the_adapter() {
    // Lengths 4 does not divide (61 and 99: one pad row; 130: two; 3:
    // fewer rows than workers).
    let seqs = [61, 130, 3, 99];
    let reports = video_generator::drive(&args(&seqs), &launch(4)).unwrap();
    assert_eq!(reports.len(), 4);
    for (r, &s) in reports.iter().zip(&seqs) {
        assert_eq!(r.seq, s);
        assert!(r.exact, "request of {s}: max abs error {}", r.max_err);
        assert!(r.forward <= r.latency);
    }
    assert_eq!(
        reports.iter().map(|r| r.adapted).collect::<Vec<_>>(),
        [false, false, true, true]
    );
    // The same through USP (Ulysses degree 2 x ring degree 2): ring
    // attention rounds differently, within 1e-5.
    let mut a = args(&[61, 130]);
    a.ring_degree = 2;
    a.tolerance = 1e-5;
    a.adapter_at = 1;
    let reports = video_generator::drive(&a, &launch(4)).unwrap();
    assert!(reports.iter().all(|r| r.ok), "{reports:?}");
}

/// The README's two-host set-up on loopback: the driver is node 0 with 2
/// local workers (shared-memory queues); node 1's `launch` (what `distrun
/// --nnodes 2 --node-rank 1 ... -- video_generator --worker` does) starts 2
/// more, which join the driver over authenticated TCP. One driver, one SP
/// group of 4, exact results.
#[test]
fn the_example_drives_workers_on_two_nodes() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let secret = executor::random_hex128().unwrap();
    let node = |rank: usize| {
        launch(2)
            .nodes(2, rank)
            .master("127.0.0.1", Some(port))
            .job_secret(secret.clone())
            .capture(true)
            .timeout(Duration::from_secs(300))
    };
    let cfg1 = node(1);
    let node1 = std::thread::spawn(move || executor::launch(&cfg1).unwrap());
    let mut a = args(&[61, 130]);
    a.adapter_at = 1;
    let reports = video_generator::drive(&a, &node(0)).unwrap();
    assert!(reports.iter().all(|r| r.exact), "{reports:?}");
    // Node 1's workers exited 0 on the driver's shutdown.
    let out = node1.join().unwrap();
    assert!(out.success(), "{out:?}");
}

#[test]
fn shutdown_finishes_requests_in_flight() {
    let ex = Executor::start_gpu(
        &launch(4).grace(Duration::from_secs(60)),
        &ParallelConfig::default().sp(4).device("cpu").timeout(T),
        &spec(),
        START,
    )
    .unwrap();
    let job = ex.job_id().to_string();
    let pids = ex.pids();
    let (a, want_a) = request(77, 1);
    let (b, want_b) = request(45, 2);
    let pa = ex.submit(&GENERATE, &a, T).unwrap();
    let pb = ex.submit(&GENERATE, &b, T).unwrap();
    assert_eq!(ex.shutdown().unwrap(), [0, 0, 0, 0]);
    assert_eq!(pa.wait().unwrap()[0].output, want_a);
    assert_eq!(pb.wait().unwrap()[0].output, want_b);
    assert_nothing_left(&pids, &job);
}

#[test]
fn a_worker_dying_during_a_request_is_named_and_the_others_stop() {
    let ex = start();
    let job = ex.job_id().to_string();
    let pids = ex.pids();
    let (r, want) = request(37, 3);
    assert_eq!(ex.collective_rpc(&GENERATE, &r, T).unwrap()[0].output, want);
    let t0 = Instant::now();
    match ex.collective_rpc(&GENERATE_OR_DIE, &(2, r.clone()), T) {
        Err(CommError::PeerLost { peer, detail, .. }) => {
            assert_eq!(peer.best(), 2);
            assert!(detail.contains("exited with code 3"), "{detail}");
        }
        other => panic!("expected PeerLost, got {other:?}"),
    }
    // Named well within the call's timeout; the others (blocked in an
    // all_to_all with rank 2) are gone by the time the error is back.
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    assert_nothing_left(&pids, &job);
    match ex.collective_rpc(&GENERATE, &r, T) {
        Err(CommError::PeerLost { peer, .. }) => assert_eq!(peer.best(), 2),
        other => panic!("expected PeerLost, got {other:?}"),
    }
    let codes = ex.shutdown().unwrap();
    assert_eq!(codes[2], 3);
}

#[test]
fn a_worker_killed_between_requests_is_named_at_the_next() {
    let ex = start();
    let job = ex.job_id().to_string();
    let pids = ex.pids();
    let (r, want) = request(50, 4);
    assert_eq!(ex.collective_rpc(&GENERATE, &r, T).unwrap()[0].output, want);
    let victim = rustix::process::Pid::from_raw(pids[1] as i32).unwrap();
    rustix::process::kill_process(victim, rustix::process::Signal::KILL).unwrap();
    let t0 = Instant::now();
    match ex.collective_rpc(&GENERATE, &r, T) {
        Err(CommError::PeerLost { peer, detail, .. }) => {
            assert_eq!(peer.best(), 1);
            assert!(detail.contains("killed by signal 9"), "{detail}");
        }
        other => panic!("expected PeerLost, got {other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    assert_nothing_left(&pids, &job);
}

#[test]
fn a_hung_worker_is_named_at_the_timeout() {
    let ex = start();
    let job = ex.job_id().to_string();
    let pids = ex.pids();
    let timeout = Duration::from_secs(3);
    let t0 = Instant::now();
    match ex.collective_rpc(&HANG_ON, &3, timeout) {
        Err(CommError::Timeout { missing, .. }) => {
            let ranks: Vec<usize> = missing.iter().map(|m| m.rank.best()).collect();
            assert_eq!(ranks, [3]);
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    let took = t0.elapsed();
    assert!(
        took >= timeout && took < timeout + Duration::from_secs(10),
        "{took:?}"
    );
    // Shutting down stops the hung worker too (SIGTERM after the grace).
    let codes = ex.shutdown().unwrap();
    assert_eq!(codes, [0, 0, 0, 128 + 15]);
    assert_nothing_left(&pids, &job);
}
