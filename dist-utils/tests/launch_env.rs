//! Ranks as real processes started with the variables a launcher sets
//! (torchrun, torchrun with its agent store, Slurm's srun with several
//! nodes and no MASTER_*): each reads its *process* environment with
//! `RankInfo::from_env`, compares it with the values its layout implies,
//! and joins a store with `init_store("env://")`.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use comm_core::Store;
use dist_utils::{init_store, EnvSource, RankInfo};

const ROLE: &str = "DIST_UTILS_LAUNCH_CHILD";
/// The values the child must find: "source rank world local_rank
/// local_world node_rank master_addr master_port agent restart".
const EXPECT: &str = "DIST_UTILS_LAUNCH_EXPECT";
const T: Duration = Duration::from_secs(30);

/// The rank process; a no-op unless started by a test below.
#[test]
fn launched_rank() {
    if std::env::var(ROLE).is_err() {
        return;
    }
    let expect = std::env::var(EXPECT).unwrap();
    let f: Vec<&str> = expect.split(' ').collect();
    let info = RankInfo::from_env().unwrap();
    let source = match info.source {
        EnvSource::Torchrun => "torchrun",
        EnvSource::Slurm => "slurm",
        other => panic!("unexpected source {other:?}"),
    };
    let n = |i: usize| f[i].parse::<usize>().unwrap();
    assert_eq!(source, f[0]);
    assert_eq!(
        (
            info.rank,
            info.world_size,
            info.local_rank,
            info.local_world_size,
            info.node_rank
        ),
        (n(1), n(2), n(3), n(4), n(5)),
        "{info:?}"
    );
    assert_eq!(info.master_addr.as_deref(), Some(f[6]));
    assert_eq!(info.master_port, Some(f[7].parse::<u16>().unwrap()));
    assert_eq!(info.agent_store, f[8] == "true");
    assert_eq!(info.restart_count, f[9].parse::<u64>().unwrap());
    assert!(info.job_secret.is_some() || info.agent_store);

    let store = init_store("env://", &info, T).unwrap();
    let (rank, world) = (info.rank, info.world_size);
    store
        .set(
            &format!("launch/{rank}"),
            format!("node{}", info.node_rank).as_bytes(),
        )
        .unwrap();
    let keys: Vec<String> = (0..world).map(|r| format!("launch/{r}")).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    store.wait(&refs, T).unwrap();
    store.add("launch/done", 1).unwrap();
    // The host of the store (rank 0, unless a launcher hosts it) stays up
    // until every rank has finished with it.
    if rank == 0 {
        let end = Instant::now() + T;
        while store.get("launch/done", T).unwrap() != world.to_string().as_bytes() {
            assert!(Instant::now() < end, "not every rank finished");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn free_port_in(lo: u16, hi: u16) -> u16 {
    (lo..hi)
        .step_by(7)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .unwrap()
}

fn spawn(vars: &HashMap<String, String>, expect: String) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "launched_rank", "--test-threads=1", "-q"])
        // Only what a launcher would set: nothing inherited can make the
        // test pass by accident.
        .env_clear()
        .envs(vars)
        .env(ROLE, "1")
        .env(EXPECT, expect)
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

fn wait_all(children: Vec<Child>) {
    let end = Instant::now() + Duration::from_secs(120);
    for (rank, mut c) in children.into_iter().enumerate() {
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                assert!(st.success(), "rank {rank} failed: {st}");
                break;
            }
            if Instant::now() > end {
                let _ = c.kill();
                let _ = c.wait();
                panic!("rank {rank} did not finish");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn vars(pairs: &[(&str, String)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

#[test]
fn torchrun_ranks_two_nodes_of_two() {
    let port = free_port_in(20000, 30000);
    let children = (0..4)
        .map(|r| {
            let v = vars(&[
                ("RANK", r.to_string()),
                ("WORLD_SIZE", "4".into()),
                ("LOCAL_RANK", (r % 2).to_string()),
                ("LOCAL_WORLD_SIZE", "2".into()),
                ("GROUP_RANK", (r / 2).to_string()),
                ("MASTER_ADDR", "127.0.0.1".into()),
                ("MASTER_PORT", port.to_string()),
                ("DIST_JOB_SECRET", "00112233445566778899aabbccddeeff".into()),
            ]);
            let expect = format!(
                "torchrun {r} 4 {} 2 {} 127.0.0.1 {port} false 0",
                r % 2,
                r / 2
            );
            spawn(&v, expect)
        })
        .collect();
    wait_all(children);
}

#[test]
fn torchrun_agent_store_ranks_use_the_agents_c10d_store() {
    // Stands in for torchrun's agent: a c10d store on MASTER_PORT.
    let agent = dist_utils::C10dServer::bind("127.0.0.1:0").unwrap();
    let port = agent.local_addr().port();
    let children = (0..3)
        .map(|r| {
            let v = vars(&[
                ("RANK", r.to_string()),
                ("WORLD_SIZE", "3".into()),
                ("LOCAL_RANK", r.to_string()),
                ("LOCAL_WORLD_SIZE", "3".into()),
                ("GROUP_RANK", "0".into()),
                ("MASTER_ADDR", "127.0.0.1".into()),
                ("MASTER_PORT", port.to_string()),
                ("TORCHELASTIC_USE_AGENT_STORE", "True".into()),
                ("TORCHELASTIC_RESTART_COUNT", "1".into()),
            ]);
            spawn(
                &v,
                format!("torchrun {r} 3 {r} 3 0 127.0.0.1 {port} true 1"),
            )
        })
        .collect();
    wait_all(children);
    let c = dist_utils::C10dStore::connect(agent.local_addr(), T).unwrap();
    assert_eq!(c.get("/worker/attempt_1/launch/done", T).unwrap(), b"3");
}

#[test]
fn slurm_ranks_two_nodes_without_master_variables() {
    // srun's layout for 2 nodes x 2 tasks; no MASTER_ADDR / MASTER_PORT: the
    // store host is the first node of the list, the port comes from the job id.
    let port = free_port_in(15000, 25000);
    let job_id = 7_000_000 + u64::from(port - 15000);
    let children = (0..4)
        .map(|r| {
            let v = vars(&[
                ("SLURM_PROCID", r.to_string()),
                ("SLURM_NTASKS", "4".into()),
                ("SLURM_LOCALID", (r % 2).to_string()),
                ("SLURM_NODEID", (r / 2).to_string()),
                ("SLURM_TASKS_PER_NODE", "2(x2)".into()),
                ("SLURM_JOB_NODELIST", "127.0.0.[1-2]".into()),
                ("SLURM_JOB_ID", job_id.to_string()),
                ("DIST_JOB_SECRET", "a1b2c3d4".into()),
            ]);
            let expect = format!("slurm {r} 4 {} 2 {} 127.0.0.1 {port} false 0", r % 2, r / 2);
            spawn(&v, expect)
        })
        .collect();
    wait_all(children);
}

#[test]
fn from_env_reads_the_real_environment_not_a_copy() {
    // The child would pass with from_vars over any map; only from_env over
    // the process environment finds these exact values.
    let port = free_port_in(30000, 40000);
    let v = vars(&[
        ("RANK", "0".into()),
        ("WORLD_SIZE", "1".into()),
        ("MASTER_ADDR", "127.0.0.1".into()),
        ("MASTER_PORT", port.to_string()),
        ("DIST_JOB_SECRET", "ff".into()),
    ]);
    wait_all(vec![spawn(
        &v,
        format!("torchrun 0 1 0 1 0 127.0.0.1 {port} false 0"),
    )]);
    // And a mismatch is caught (the child fails), so the check can fail.
    let c = spawn(
        &v,
        format!("torchrun 0 1 0 1 0 127.0.0.1 {} false 0", port + 1),
    );
    let st = { c }.wait().unwrap();
    assert!(!st.success(), "the child accepted a wrong expectation");
}
