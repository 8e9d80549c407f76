//! Rank information from launcher environments, and init methods.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use comm_core::{CommError, Store};
use dist_utils::{init_store, EnvSource, InitMethod, RankInfo, StoreProtocol};

fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn parse(pairs: &[(&str, &str)]) -> Result<RankInfo, CommError> {
    RankInfo::from_map(&vars(pairs))
}

/// Parsing fails with InvalidArgument and the message names every `names`.
fn assert_err(pairs: &[(&str, &str)], names: &[&str]) {
    match parse(pairs) {
        Err(CommError::InvalidArgument(msg)) => {
            for n in names {
                assert!(msg.contains(n), "message {msg:?} does not name {n}");
            }
        }
        other => panic!("expected InvalidArgument naming {names:?} for {pairs:?}, got {other:?}"),
    }
}

const TORCHRUN: &[(&str, &str)] = &[
    ("RANK", "5"),
    ("WORLD_SIZE", "8"),
    ("LOCAL_RANK", "1"),
    ("LOCAL_WORLD_SIZE", "4"),
    ("GROUP_RANK", "1"),
    ("MASTER_ADDR", "node0"),
    ("MASTER_PORT", "29500"),
    ("DIST_JOB_SECRET", "00ff10"),
    ("DIST_STORE_HOSTED", "1"),
];

fn with(base: &[(&str, &str)], changes: &[(&str, Option<&str>)]) -> Vec<(String, String)> {
    let mut m: Vec<(String, String)> = base
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for (k, v) in changes {
        m.retain(|(n, _)| n != k);
        if let Some(v) = v {
            m.push((k.to_string(), v.to_string()));
        }
    }
    m
}

fn assert_err_with(base: &[(&str, &str)], changes: &[(&str, Option<&str>)], names: &[&str]) {
    let m = with(base, changes);
    let refs: Vec<(&str, &str)> = m.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_err(&refs, names);
}

#[test]
fn torchrun_variables() {
    let i = parse(TORCHRUN).unwrap();
    assert_eq!(i.source, EnvSource::Torchrun);
    assert_eq!(
        (
            i.rank,
            i.world_size,
            i.local_rank,
            i.local_world_size,
            i.node_rank
        ),
        (5, 8, 1, 4, 1)
    );
    assert_eq!(i.master_addr.as_deref(), Some("node0"));
    assert_eq!(i.master_port, Some(29500));
    assert_eq!(i.job_secret.as_deref(), Some(&[0x00, 0xff, 0x10][..]));
    assert!(i.store_hosted);
    assert_eq!(i.num_nodes(), 2);
    // The secret never shows in Debug output.
    assert!(!format!("{i:?}").contains("255"));

    // Plain env:// as torch documents it: only RANK and WORLD_SIZE (+ master).
    let i = parse(&[("RANK", "2"), ("WORLD_SIZE", "3")]).unwrap();
    assert_eq!((i.local_rank, i.local_world_size, i.node_rank), (2, 3, 0));
    assert_eq!(
        (i.master_addr, i.master_port, i.job_secret, i.store_hosted),
        (None, None, None, false)
    );

    // NODE_RANK when GROUP_RANK is absent; derived when both are.
    let m = with(TORCHRUN, &[("GROUP_RANK", None), ("NODE_RANK", Some("7"))]);
    let i = RankInfo::from_vars(&|k: &str| m.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
        .unwrap();
    assert_eq!(i.node_rank, 7);
    let m = with(TORCHRUN, &[("GROUP_RANK", None)]);
    let i = RankInfo::from_vars(&|k: &str| m.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
        .unwrap();
    assert_eq!(i.node_rank, 1);
}

#[test]
fn torchrun_errors_name_the_variable() {
    assert_err_with(TORCHRUN, &[("RANK", None)], &["RANK"]);
    assert_err_with(TORCHRUN, &[("WORLD_SIZE", None)], &["WORLD_SIZE"]);
    assert_err_with(
        TORCHRUN,
        &[("RANK", Some("8"))],
        &["RANK=8", "WORLD_SIZE=8"],
    );
    assert_err_with(TORCHRUN, &[("RANK", Some("-1"))], &["RANK"]);
    assert_err_with(TORCHRUN, &[("RANK", Some("two"))], &["RANK", "two"]);
    assert_err_with(TORCHRUN, &[("WORLD_SIZE", Some("0"))], &["WORLD_SIZE"]);
    assert_err_with(TORCHRUN, &[("WORLD_SIZE", Some(""))], &["WORLD_SIZE"]);
    assert_err_with(
        TORCHRUN,
        &[("LOCAL_RANK", Some("4"))],
        &["LOCAL_RANK=4", "LOCAL_WORLD_SIZE=4"],
    );
    assert_err_with(TORCHRUN, &[("LOCAL_RANK", Some("x"))], &["LOCAL_RANK"]);
    assert_err_with(
        TORCHRUN,
        &[("LOCAL_WORLD_SIZE", Some("0"))],
        &["LOCAL_WORLD_SIZE"],
    );
    assert_err_with(
        TORCHRUN,
        &[("LOCAL_WORLD_SIZE", Some("9"))],
        &["LOCAL_WORLD_SIZE", "WORLD_SIZE"],
    );
    assert_err_with(
        TORCHRUN,
        &[("LOCAL_WORLD_SIZE", None)],
        &["LOCAL_WORLD_SIZE"],
    );
    assert_err_with(TORCHRUN, &[("LOCAL_RANK", None)], &["LOCAL_RANK"]);
    assert_err_with(TORCHRUN, &[("GROUP_RANK", Some("a"))], &["GROUP_RANK"]);
    assert_err_with(TORCHRUN, &[("MASTER_PORT", Some("0"))], &["MASTER_PORT"]);
    assert_err_with(
        TORCHRUN,
        &[("MASTER_PORT", Some("70000"))],
        &["MASTER_PORT"],
    );
    assert_err_with(TORCHRUN, &[("MASTER_PORT", Some("http"))], &["MASTER_PORT"]);
    assert_err_with(
        TORCHRUN,
        &[("DIST_JOB_SECRET", Some("abc"))],
        &["DIST_JOB_SECRET"],
    );
    assert_err_with(
        TORCHRUN,
        &[("DIST_JOB_SECRET", Some("zz"))],
        &["DIST_JOB_SECRET"],
    );
    assert_err_with(
        TORCHRUN,
        &[("DIST_STORE_HOSTED", Some("yes"))],
        &["DIST_STORE_HOSTED"],
    );
}

#[test]
fn nothing_set_is_a_clear_error() {
    assert_err(&[("PATH", "/bin")], &["RANK", "WORLD_SIZE", "distrun"]);
    let one = RankInfo::single_process();
    assert_eq!(
        (one.rank, one.world_size, one.source),
        (0, 1, EnvSource::Manual)
    );
}

const SLURM: &[(&str, &str)] = &[
    ("SLURM_PROCID", "6"),
    ("SLURM_NTASKS", "10"),
    ("SLURM_LOCALID", "2"),
    ("SLURM_NODEID", "1"),
    ("SLURM_TASKS_PER_NODE", "4(x2),2"),
    ("SLURM_LAUNCH_NODE_IPADDR", "10.0.0.1"),
    ("MASTER_PORT", "29400"),
];

#[test]
fn slurm_variables() {
    let i = parse(SLURM).unwrap();
    assert_eq!(i.source, EnvSource::Slurm);
    assert_eq!(
        (
            i.rank,
            i.world_size,
            i.local_rank,
            i.local_world_size,
            i.node_rank
        ),
        (6, 10, 2, 4, 1)
    );
    assert_eq!(i.master_addr.as_deref(), Some("10.0.0.1"));
    assert_eq!(i.master_port, Some(29400));

    // The last node of "4(x2),2" runs 2 tasks.
    let m = with(
        SLURM,
        &[
            ("SLURM_NODEID", Some("2")),
            ("SLURM_PROCID", Some("9")),
            ("SLURM_LOCALID", Some("1")),
        ],
    );
    let refs: Vec<(&str, &str)> = m.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(parse(&refs).unwrap().local_world_size, 2);

    // SLURM_NTASKS_PER_NODE wins; an explicit MASTER_ADDR wins over the launch node.
    let m = with(
        SLURM,
        &[
            ("SLURM_NTASKS_PER_NODE", Some("5")),
            ("MASTER_ADDR", Some("head")),
        ],
    );
    let refs: Vec<(&str, &str)> = m.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let i = parse(&refs).unwrap();
    assert_eq!(i.local_world_size, 5);
    assert_eq!(i.master_addr.as_deref(), Some("head"));

    // torchrun inside a Slurm allocation: torchrun's variables take precedence.
    let mut m = with(SLURM, &[]);
    m.extend(TORCHRUN.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let refs: Vec<(&str, &str)> = m.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(parse(&refs).unwrap().source, EnvSource::Torchrun);

    let tpn = dist_utils::slurm::parse_tasks_per_node("V", "2(x3),1,3").unwrap();
    assert_eq!(tpn, [2, 2, 2, 1, 3]);
}

#[test]
fn slurm_errors_name_the_variable() {
    assert_err_with(
        SLURM,
        &[("SLURM_PROCID", Some("10"))],
        &["SLURM_PROCID=10", "SLURM_NTASKS=10"],
    );
    assert_err_with(SLURM, &[("SLURM_NTASKS", Some("0"))], &["SLURM_NTASKS"]);
    assert_err_with(SLURM, &[("SLURM_NTASKS", Some("ten"))], &["SLURM_NTASKS"]);
    assert_err_with(SLURM, &[("SLURM_LOCALID", None)], &["SLURM_LOCALID"]);
    assert_err_with(
        SLURM,
        &[("SLURM_LOCALID", Some("4"))],
        &["SLURM_LOCALID", "SLURM_TASKS_PER_NODE"],
    );
    assert_err_with(SLURM, &[("SLURM_NODEID", None)], &["SLURM_NODEID"]);
    assert_err_with(
        SLURM,
        &[("SLURM_NODEID", Some("3"))],
        &["SLURM_NODEID", "SLURM_TASKS_PER_NODE"],
    );
    assert_err_with(
        SLURM,
        &[("SLURM_TASKS_PER_NODE", None)],
        &["SLURM_TASKS_PER_NODE"],
    );
    assert_err_with(
        SLURM,
        &[("SLURM_TASKS_PER_NODE", Some("4(x"))],
        &["SLURM_TASKS_PER_NODE"],
    );
    assert_err_with(
        SLURM,
        &[("SLURM_TASKS_PER_NODE", Some("4(x0)"))],
        &["SLURM_TASKS_PER_NODE"],
    );
    assert_err_with(
        SLURM,
        &[("SLURM_NTASKS_PER_NODE", Some("0"))],
        &["SLURM_NTASKS_PER_NODE"],
    );
    assert_err_with(SLURM, &[("MASTER_PORT", Some("99999"))], &["MASTER_PORT"]);
}

const OMPI: &[(&str, &str)] = &[
    ("OMPI_COMM_WORLD_RANK", "3"),
    ("OMPI_COMM_WORLD_SIZE", "4"),
    ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
    ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
    ("OMPI_COMM_WORLD_NODE_RANK", "1"),
    ("MASTER_ADDR", "10.0.0.2"),
    ("MASTER_PORT", "1234"),
];

#[test]
fn openmpi_variables() {
    let i = parse(OMPI).unwrap();
    assert_eq!(i.source, EnvSource::OpenMpi);
    assert_eq!(
        (
            i.rank,
            i.world_size,
            i.local_rank,
            i.local_world_size,
            i.node_rank
        ),
        (3, 4, 1, 2, 1)
    );
    assert_eq!(
        (i.master_addr.as_deref(), i.master_port),
        (Some("10.0.0.2"), Some(1234))
    );
    let m = with(OMPI, &[("OMPI_COMM_WORLD_NODE_RANK", None)]);
    let refs: Vec<(&str, &str)> = m.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(parse(&refs).unwrap().node_rank, 1);
}

#[test]
fn openmpi_errors_name_the_variable() {
    assert_err_with(
        OMPI,
        &[("OMPI_COMM_WORLD_RANK", Some("4"))],
        &["OMPI_COMM_WORLD_RANK=4", "OMPI_COMM_WORLD_SIZE=4"],
    );
    assert_err_with(
        OMPI,
        &[("OMPI_COMM_WORLD_RANK", None)],
        &["OMPI_COMM_WORLD_RANK"],
    );
    assert_err_with(
        OMPI,
        &[("OMPI_COMM_WORLD_SIZE", Some("0"))],
        &["OMPI_COMM_WORLD_SIZE"],
    );
    assert_err_with(
        OMPI,
        &[("OMPI_COMM_WORLD_LOCAL_RANK", Some("2"))],
        &["OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"],
    );
    assert_err_with(
        OMPI,
        &[("OMPI_COMM_WORLD_LOCAL_SIZE", None)],
        &["OMPI_COMM_WORLD_LOCAL_SIZE"],
    );
    assert_err_with(
        OMPI,
        &[("OMPI_COMM_WORLD_LOCAL_SIZE", Some("8"))],
        &["OMPI_COMM_WORLD_LOCAL_SIZE", "OMPI_COMM_WORLD_SIZE"],
    );
    assert_err_with(
        OMPI,
        &[("OMPI_COMM_WORLD_NODE_RANK", Some("n1"))],
        &["OMPI_COMM_WORLD_NODE_RANK"],
    );
}

const PMI: &[(&str, &str)] = &[
    ("PMI_RANK", "5"),
    ("PMI_SIZE", "8"),
    ("MPI_LOCALRANKID", "1"),
    ("MPI_LOCALNRANKS", "4"),
];

#[test]
fn pmi_variables_and_errors() {
    let i = parse(PMI).unwrap();
    assert_eq!(i.source, EnvSource::Pmi);
    assert_eq!(
        (
            i.rank,
            i.world_size,
            i.local_rank,
            i.local_world_size,
            i.node_rank
        ),
        (5, 8, 1, 4, 1)
    );
    assert_err_with(
        PMI,
        &[("PMI_RANK", Some("8"))],
        &["PMI_RANK=8", "PMI_SIZE=8"],
    );
    assert_err_with(PMI, &[("PMI_SIZE", None)], &["PMI_SIZE"]);
    assert_err_with(PMI, &[("PMI_SIZE", Some("0"))], &["PMI_SIZE"]);
    assert_err_with(PMI, &[("MPI_LOCALRANKID", None)], &["MPI_LOCALRANKID"]);
    assert_err_with(
        PMI,
        &[("MPI_LOCALRANKID", Some("4"))],
        &["MPI_LOCALRANKID", "MPI_LOCALNRANKS"],
    );
    assert_err_with(PMI, &[("MPI_LOCALNRANKS", Some("x"))], &["MPI_LOCALNRANKS"]);
}

#[test]
fn init_method_parsing() {
    let info = parse(&[
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("MASTER_ADDR", "h"),
        ("MASTER_PORT", "9"),
    ])
    .unwrap();
    assert_eq!(
        InitMethod::parse("env://", &info).unwrap(),
        InitMethod::Tcp {
            host: "h".into(),
            port: 9,
            store: StoreProtocol::Dist
        }
    );
    assert_eq!(
        InitMethod::parse("tcp://10.1.1.1:29500", &info).unwrap(),
        InitMethod::Tcp {
            host: "10.1.1.1".into(),
            port: 29500,
            store: StoreProtocol::Dist
        }
    );
    assert_eq!(
        InitMethod::parse("tcp://[::1]:80", &info).unwrap(),
        InitMethod::Tcp {
            host: "::1".into(),
            port: 80,
            store: StoreProtocol::Dist
        }
    );
    assert_eq!(
        InitMethod::parse("file:///tmp/x", &info).unwrap(),
        InitMethod::File("/tmp/x".into())
    );
    // The store protocol: explicit option, else the agent's c10d store.
    assert_eq!(
        InitMethod::parse("env://?store=c10d", &info).unwrap(),
        InitMethod::Tcp {
            host: "h".into(),
            port: 9,
            store: StoreProtocol::C10d
        }
    );
    assert_eq!(
        InitMethod::parse("tcp://[::1]:80?store=c10d", &info).unwrap(),
        InitMethod::Tcp {
            host: "::1".into(),
            port: 80,
            store: StoreProtocol::C10d
        }
    );
    let mut agent = info.clone();
    agent.agent_store = true;
    assert!(matches!(
        InitMethod::parse("env://", &agent).unwrap(),
        InitMethod::Tcp {
            store: StoreProtocol::C10d,
            ..
        }
    ));
    assert!(matches!(
        InitMethod::parse("env://?store=dist", &agent).unwrap(),
        InitMethod::Tcp {
            store: StoreProtocol::Dist,
            ..
        }
    ));
    for bad in ["env://?store=gloo", "env://?backend=x", "tcp://h:1?store"] {
        let e = InitMethod::parse(bad, &info).unwrap_err().to_string();
        assert!(
            e.contains("store=dist|c10d") || e.contains("store protocol"),
            "{bad}: {e}"
        );
    }
    for bad in [
        "tcp://host",
        "tcp://host:0",
        "tcp://:80",
        "tcp://h:port",
        "file://",
        "nccl://x",
        "",
    ] {
        assert!(
            matches!(
                InitMethod::parse(bad, &info),
                Err(CommError::InvalidArgument(_))
            ),
            "{bad}"
        );
    }
    let no_master = parse(&[("RANK", "0"), ("WORLD_SIZE", "1")]).unwrap();
    let e = InitMethod::parse("env://", &no_master)
        .unwrap_err()
        .to_string();
    assert!(e.contains("MASTER_ADDR"), "{e}");
    let mut no_port = no_master.clone();
    no_port.master_addr = Some("h".into());
    let e = InitMethod::parse("env://", &no_port)
        .unwrap_err()
        .to_string();
    assert!(e.contains("MASTER_PORT"), "{e}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn info(rank: usize, world: usize, port: u16, secret: Option<&str>, hosted: bool) -> RankInfo {
    let mut p = vec![
        ("RANK".to_string(), rank.to_string()),
        ("WORLD_SIZE".into(), world.to_string()),
        ("MASTER_ADDR".into(), "127.0.0.1".into()),
        ("MASTER_PORT".into(), port.to_string()),
    ];
    if let Some(s) = secret {
        p.push(("DIST_JOB_SECRET".into(), s.into()));
    }
    if hosted {
        p.push(("DIST_STORE_HOSTED".into(), "1".into()));
    }
    RankInfo::from_map(&p.into_iter().collect()).unwrap()
}

#[test]
fn env_init_rank0_hosts_and_others_connect() {
    let port = free_port();
    let world = 4;
    let t = Duration::from_secs(10);
    let handles: Vec<_> = (0..world)
        .map(|r| {
            std::thread::spawn(move || {
                let store =
                    init_store("env://", &info(r, world, port, Some("a1b2"), false), t).unwrap();
                store
                    .set(&format!("hello/{r}"), r.to_string().as_bytes())
                    .unwrap();
                let keys: Vec<String> = (0..world).map(|q| format!("hello/{q}")).collect();
                let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
                store.wait(&refs, t).unwrap();
                // Keep rank 0's server alive until everyone is done.
                store.add("done", 1).unwrap();
                if r == 0 {
                    let deadline = std::time::Instant::now() + t;
                    while store.get("done", t).unwrap() != world.to_string().as_bytes() {
                        assert!(std::time::Instant::now() < deadline);
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                store
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn hosted_store_means_clients_only_and_secret_is_checked() {
    let server = dist_utils::TcpStoreServer::bind("127.0.0.1:0", [0xa1u8, 0xb2]).unwrap();
    let port = server.local_addr().port();
    let t = Duration::from_secs(5);
    // Rank 0 with DIST_STORE_HOSTED=1 connects to the launcher's server.
    let s0 = init_store(
        &format!("tcp://127.0.0.1:{port}"),
        &info(0, 2, port, Some("a1b2"), true),
        t,
    )
    .unwrap();
    let s1 = init_store("env://", &info(1, 2, port, Some("A1B2"), true), t).unwrap();
    s0.set("k", b"v").unwrap();
    assert_eq!(s1.get("k", t).unwrap(), b"v");
    // The wrong secret is refused.
    assert!(init_store("env://", &info(1, 2, port, Some("ffff"), true), t).is_err());
}

#[test]
fn file_init_method() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let m = format!("file://{}", path.display());
    let one = RankInfo::single_process();
    let a: Arc<dyn Store> = init_store(&m, &one, Duration::from_secs(1)).unwrap();
    let b = init_store(&m, &one, Duration::from_secs(1)).unwrap();
    a.set("x", b"1").unwrap();
    assert_eq!(b.get("x", Duration::from_secs(1)).unwrap(), b"1");
}

#[test]
fn slurm_store_address_from_the_node_list_and_port_from_the_job_id() {
    // srun's variables for task 3 of 2 nodes x 2 tasks, no MASTER_*.
    let srun = [
        ("SLURM_PROCID", "3"),
        ("SLURM_NTASKS", "4"),
        ("SLURM_LOCALID", "1"),
        ("SLURM_NODEID", "1"),
        ("SLURM_TASKS_PER_NODE", "2(x2)"),
        ("SLURM_NODELIST", "node[01-02]"),
        ("SLURM_JOB_ID", "123456"),
        ("SLURM_LAUNCH_NODE_IPADDR", "10.9.9.9"),
    ];
    let i = parse(&srun).unwrap();
    assert_eq!(i.source, EnvSource::Slurm);
    assert_eq!(
        (
            i.rank,
            i.world_size,
            i.local_rank,
            i.local_world_size,
            i.node_rank
        ),
        (3, 4, 1, 2, 1)
    );
    assert_eq!(i.master_addr.as_deref(), Some("node01"));
    assert_eq!(i.master_port, Some(15000 + 3456));
    assert_eq!(i.num_nodes(), 2);

    // The step's lists win over the job's; MASTER_* win over both.
    let m = with(
        &srun,
        &[
            ("SLURM_STEP_NODELIST", Some("gpu[7-8]")),
            ("SLURM_STEP_TASKS_PER_NODE", Some("3,2")),
            ("SLURM_NTASKS", Some("5")),
            ("SLURM_PROCID", Some("4")),
        ],
    );
    let refs: Vec<(&str, &str)> = m.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let i = parse(&refs).unwrap();
    assert_eq!(i.master_addr.as_deref(), Some("gpu7"));
    assert_eq!(i.local_world_size, 2);
    let m = with(
        &srun,
        &[
            ("MASTER_ADDR", Some("head")),
            ("MASTER_PORT", Some("29400")),
        ],
    );
    let refs: Vec<(&str, &str)> = m.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let i = parse(&refs).unwrap();
    assert_eq!(i.master_addr.as_deref(), Some("head"));
    assert_eq!(i.master_port, Some(29400));

    // No node list: the launch node, as before.
    let m = with(&srun, &[("SLURM_NODELIST", None)]);
    let refs: Vec<(&str, &str)> = m.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(
        parse(&refs).unwrap().master_addr.as_deref(),
        Some("10.9.9.9")
    );

    // Bad lists name their variable.
    assert_err_with(
        &srun,
        &[("SLURM_NODELIST", Some("node[01-"))],
        &["SLURM_NODELIST"],
    );
    assert_err_with(&srun, &[("SLURM_JOB_ID", Some("x1"))], &["SLURM_JOB_ID"]);
}

#[test]
fn hostlist_expansion() {
    use dist_utils::slurm::{expand_hostlist, first_host};
    let ok = |s: &str| expand_hostlist("V", s).unwrap();
    assert_eq!(ok("node[01-02]"), ["node01", "node02"]);
    assert_eq!(ok("n[8-11]"), ["n8", "n9", "n10", "n11"]);
    assert_eq!(ok("n[098-101]"), ["n098", "n099", "n100", "n101"]);
    assert_eq!(ok("a,b[1,3],c"), ["a", "b1", "b3", "c"]);
    assert_eq!(ok("r[1-2]-n[1-2]"), ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]);
    assert_eq!(ok("10.0.0.[1-2]"), ["10.0.0.1", "10.0.0.2"]);
    assert_eq!(ok(" single "), ["single"]);
    assert_eq!(first_host("V", "gpu[3-900],cpu1").unwrap(), "gpu3");
    for bad in [
        "",
        "a,,b",
        "n[1-",
        "n]1[",
        "n[2-1]",
        "n[x]",
        "n[1-2",
        "n[[1]]",
        "n[]",
        "n[1-99999999999]",
    ] {
        let e = expand_hostlist("SLURM_NODELIST", bad).unwrap_err();
        assert!(e.to_string().contains("SLURM_NODELIST"), "{bad:?}: {e}");
    }
}

#[test]
fn torchrun_agent_store_variables() {
    let m = with(
        TORCHRUN,
        &[
            ("TORCHELASTIC_USE_AGENT_STORE", Some("True")),
            ("TORCHELASTIC_RESTART_COUNT", Some("2")),
        ],
    );
    let refs: Vec<(&str, &str)> = m.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let i = parse(&refs).unwrap();
    assert!(i.agent_store);
    assert_eq!(i.restart_count, 2);
    assert!(!parse(TORCHRUN).unwrap().agent_store);
    assert_err_with(
        TORCHRUN,
        &[("TORCHELASTIC_USE_AGENT_STORE", Some("yes please"))],
        &["TORCHELASTIC_USE_AGENT_STORE"],
    );
    assert_err_with(
        TORCHRUN,
        &[("TORCHELASTIC_RESTART_COUNT", Some("-1"))],
        &["TORCHELASTIC_RESTART_COUNT"],
    );
}

#[test]
fn agent_store_means_c10d_clients_under_the_attempt_prefix() {
    // torchrun's agent already listens on MASTER_PORT: every rank connects,
    // rank 0 included (binding the port would fail).
    let agent = dist_utils::C10dServer::bind("127.0.0.1:0").unwrap();
    let port = agent.local_addr().port();
    let t = Duration::from_secs(10);
    let mk = |rank: usize| {
        let mut i = info(rank, 2, port, None, false);
        i.agent_store = true;
        i.restart_count = 3;
        i
    };
    let s0 = init_store("env://", &mk(0), t).unwrap();
    let s1 = init_store("env://", &mk(1), t).unwrap();
    s0.set("k", b"v").unwrap();
    assert_eq!(s1.get("k", t).unwrap(), b"v");
    // Where a Python rank's PrefixStore("/worker/attempt_3", TCPStore) finds it.
    let raw = dist_utils::C10dStore::connect(agent.local_addr(), t).unwrap();
    assert_eq!(raw.get("/worker/attempt_3/k", t).unwrap(), b"v");
}

#[test]
fn c10d_option_makes_rank0_host_a_c10d_server() {
    let port = free_port();
    let t = Duration::from_secs(10);
    let handles: Vec<_> = (0..3)
        .map(|r| {
            std::thread::spawn(move || {
                let s = init_store("env://?store=c10d", &info(r, 3, port, None, false), t).unwrap();
                s.add("n", 1).unwrap();
                s.set(&format!("r{r}"), b"x").unwrap();
                s.wait(&["r0", "r1", "r2"], t).unwrap();
                let n = s.get("n", t).unwrap();
                if r == 0 {
                    // Keep the server up until the others have read.
                    let end = std::time::Instant::now() + t;
                    while s.try_get("done").unwrap().as_deref() != Some(b"2") {
                        assert!(std::time::Instant::now() < end);
                        std::thread::sleep(Duration::from_millis(5));
                    }
                } else {
                    s.add("done", 1).unwrap();
                }
                n
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), b"3");
    }
}
