//! Ranks started the way `srun` starts them (2 nodes x 2 tasks, the
//! SLURM_* task layout, no MASTER_ADDR / MASTER_PORT: the store host is the
//! first node of the node list, the port comes from the job id) bring the
//! whole group layer up: the world, tp / sp / dp groups, and exact
//! collectives over them.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use parallel_state::{InitOptions, ParallelState, ReduceOp};

const ROLE: &str = "PS_SLURM_CHILD";

/// The rank process; a no-op unless started by the test below.
#[test]
fn slurm_rank() {
    if std::env::var(ROLE).is_err() {
        return;
    }
    let ps =
        ParallelState::init_from_env(InitOptions::default().with_timeout(Duration::from_secs(60)))
            .expect("init from the srun variables");
    assert_eq!(ps.world_size(), 4);
    let rank = ps.rank();
    let procid: usize = std::env::var("SLURM_PROCID").unwrap().parse().unwrap();
    assert_eq!(rank, procid, "the rank is SLURM_PROCID");
    assert_eq!(
        ps.local_rank(),
        procid % 2,
        "the local rank is SLURM_LOCALID"
    );
    ps.initialize_model_parallel(2, 2, None)
        .expect("model-parallel groups");
    let (tp, sp, dp) = (
        ps.tp_group().unwrap(),
        ps.sp_group().unwrap(),
        ps.dp_group().unwrap(),
    );
    // FastVideo's layout for W=4, tp=2, sp=2: TP = SP = [0,1] [2,3]; DP = [0,2] [1,3].
    let block = (rank / 2) * 2;
    assert_eq!(tp.ranks(), [block, block + 1]);
    assert_eq!(sp.ranks(), [block, block + 1]);
    assert_eq!(dp.ranks(), [rank % 2, rank % 2 + 2]);
    for (g, want) in [
        (&tp, 2 * block as i64 + 1),
        (&dp, 2 * (rank % 2) as i64 + 2),
    ] {
        let mut v = [rank as i64; 3];
        g.all_reduce(&mut v[..], ReduceOp::Sum).unwrap();
        assert_eq!(v, [want; 3], "all_reduce over {}", g.name());
    }
    let mut w = [1i32];
    ps.world_group()
        .all_reduce(&mut w[..], ReduceOp::Sum)
        .unwrap();
    assert_eq!(w, [4]);
    ps.world_group().barrier().unwrap();
    ps.destroy();
}

fn free_port() -> u16 {
    (15000..25000)
        .step_by(11)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port")
}

fn spawn(r: usize, job_id: u64) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "slurm_rank", "--test-threads=1", "-q"])
        // Only what srun would set (plus PATH for the shm probe's tools):
        // nothing inherited can make the test pass by accident.
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs([
            ("SLURM_PROCID", r.to_string()),
            ("SLURM_NTASKS", "4".into()),
            ("SLURM_LOCALID", (r % 2).to_string()),
            ("SLURM_NODEID", (r / 2).to_string()),
            ("SLURM_STEP_TASKS_PER_NODE", "2(x2)".into()),
            ("SLURM_JOB_NODELIST", "127.0.0.[1-2]".into()),
            ("SLURM_JOB_ID", job_id.to_string()),
            ("DIST_JOB_SECRET", "5eed5eed".into()),
            (ROLE, "1".into()),
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn a rank")
}

#[test]
fn srun_variables_bring_the_groups_up() {
    let port = free_port();
    let job_id = 4_000_000 + u64::from(port - 15000);
    let children: Vec<Child> = (0..4).map(|r| spawn(r, job_id)).collect();
    let end = Instant::now() + Duration::from_secs(180);
    for (rank, mut c) in children.into_iter().enumerate() {
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                assert!(st.success(), "rank {rank} failed: {st}");
                break;
            }
            if Instant::now() > end {
                let _ = c.kill();
                let _ = c.wait();
                panic!("rank {rank} did not finish within the deadline");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
