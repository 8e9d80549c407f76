//! Who am I in the job: rank information from the launcher's environment
//! (torchrun / `distrun`, Slurm, Open MPI, PMI), and the rendezvous store
//! named by an init method (`env://`, `tcp://host:port`, `file://path`).

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use comm_core::{CommError, Result, Store};

use crate::slurm::{first_host, parse_tasks_per_node};
use crate::{C10dStore, FileStore, PrefixStore, TcpStore};

/// Environment variable with the per-job secret, as hex (set by `distrun`).
pub const JOB_SECRET_ENV: &str = "DIST_JOB_SECRET";
/// Environment variable that is `1` when the launcher hosts the store, so
/// rank 0 connects as a client instead of serving.
pub const STORE_HOSTED_ENV: &str = "DIST_STORE_HOSTED";
/// Set to `True` by torchrun (torch 2.x) when its agent hosts a c10d
/// TCPStore on `MASTER_PORT` for the ranks.
pub const AGENT_STORE_ENV: &str = "TORCHELASTIC_USE_AGENT_STORE";
/// torchrun's restart attempt (keys of each attempt live under
/// `/worker/attempt_{n}` of the agent's store, as in PyTorch).
pub const RESTART_COUNT_ENV: &str = "TORCHELASTIC_RESTART_COUNT";
/// Under Slurm without `MASTER_PORT`, the store port is
/// `SLURM_BASE_PORT + SLURM_JOB_ID % 10000`, the same on every node.
pub const SLURM_BASE_PORT: u16 = 15000;

/// Which launcher's variables a [`RankInfo`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvSource {
    /// torchrun / `distrun` (`RANK`, `WORLD_SIZE`, ...).
    Torchrun,
    /// Slurm `srun` (`SLURM_PROCID`, `SLURM_NTASKS`, ...).
    Slurm,
    /// Open MPI `mpirun` (`OMPI_COMM_WORLD_*`).
    OpenMpi,
    /// MPICH / Intel MPI hydra (`PMI_RANK`, `PMI_SIZE`, `MPI_LOCALRANKID`, ...).
    Pmi,
    /// Built by hand ([`RankInfo::single_process`] or a struct literal).
    Manual,
}

/// This process's place in the job, plus what rendezvous needs.
#[derive(Clone, PartialEq, Eq)]
pub struct RankInfo {
    /// Global rank, `0..world_size`.
    pub rank: usize,
    /// Number of processes in the job.
    pub world_size: usize,
    /// Rank among the processes on this node, `0..local_world_size`.
    pub local_rank: usize,
    /// Number of processes on this node.
    pub local_world_size: usize,
    /// This node's index (torchrun's `GROUP_RANK`).
    pub node_rank: usize,
    /// Host of the rendezvous store (`MASTER_ADDR`), when known.
    pub master_addr: Option<String>,
    /// Port of the rendezvous store (`MASTER_PORT`), when known.
    pub master_port: Option<u16>,
    /// The per-job secret (`DIST_JOB_SECRET`, hex-decoded), if set.
    pub job_secret: Option<Vec<u8>>,
    /// True when the launcher hosts the store (`DIST_STORE_HOSTED=1`).
    pub store_hosted: bool,
    /// True when torchrun's agent hosts a c10d store on `MASTER_PORT`
    /// (`TORCHELASTIC_USE_AGENT_STORE=True`).
    pub agent_store: bool,
    /// torchrun's restart attempt (`TORCHELASTIC_RESTART_COUNT`, default 0).
    pub restart_count: u64,
    /// Where the values came from.
    pub source: EnvSource,
}

impl fmt::Debug for RankInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RankInfo")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("local_rank", &self.local_rank)
            .field("local_world_size", &self.local_world_size)
            .field("node_rank", &self.node_rank)
            .field("master_addr", &self.master_addr)
            .field("master_port", &self.master_port)
            .field(
                "job_secret",
                &self.job_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("store_hosted", &self.store_hosted)
            .field("agent_store", &self.agent_store)
            .field("restart_count", &self.restart_count)
            .field("source", &self.source)
            .finish()
    }
}

/// A variable lookup: the process environment, a map, or a closure.
type Lookup<'a> = &'a dyn Fn(&str) -> Option<String>;

fn parse_num(get: Lookup<'_>, var: &str) -> Result<Option<usize>> {
    match get(var) {
        None => Ok(None),
        Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| {
            CommError::invalid(format!(
                "environment variable {var}={v:?} is not a non-negative integer"
            ))
        }),
    }
}

fn require_num(get: Lookup<'_>, var: &str, launcher: &str) -> Result<usize> {
    parse_num(get, var)?.ok_or_else(|| {
        CommError::invalid(format!(
            "environment variable {var} is missing; the {launcher} launcher sets it for every process. \
             Start the program through the launcher or set {var} yourself"
        ))
    })
}

fn parse_port(get: Lookup<'_>, var: &str) -> Result<Option<u16>> {
    match get(var) {
        None => Ok(None),
        Some(v) => match v.trim().parse::<u16>() {
            Ok(p) if p != 0 => Ok(Some(p)),
            _ => Err(CommError::invalid(format!(
                "environment variable {var}={v:?} is not a valid TCP port (1..65535)"
            ))),
        },
    }
}

fn has_value(get: Lookup<'_>, var: &str) -> bool {
    get(var).is_some_and(|v| !v.trim().is_empty())
}

fn non_empty(get: Lookup<'_>, var: &str) -> Option<String> {
    get(var)
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

impl RankInfo {
    /// A world of one: rank 0 of 1, no store address.
    pub fn single_process() -> Self {
        RankInfo {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            local_world_size: 1,
            node_rank: 0,
            master_addr: None,
            master_port: None,
            job_secret: None,
            store_hosted: false,
            agent_store: false,
            restart_count: 0,
            source: EnvSource::Manual,
        }
    }

    /// Reads the process environment; see [`RankInfo::from_vars`].
    pub fn from_env() -> Result<Self> {
        Self::from_vars(&|k: &str| std::env::var(k).ok())
    }

    /// Reads the variables in `map`; see [`RankInfo::from_vars`].
    pub fn from_map(map: &HashMap<String, String>) -> Result<Self> {
        Self::from_vars(&|k: &str| map.get(k).cloned())
    }

    /// Parses rank information from the variables `get` returns, looking for
    /// (in this order of precedence) torchrun / `distrun` (`RANK`,
    /// `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `GROUP_RANK`), Slurm
    /// (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`,
    /// `SLURM_NTASKS_PER_NODE`, `SLURM_STEP_TASKS_PER_NODE` or
    /// `SLURM_TASKS_PER_NODE`, `SLURM_NODEID`),
    /// Open MPI (`OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE,NODE_RANK}`)
    /// and PMI (`PMI_RANK`, `PMI_SIZE`, `MPI_LOCALRANKID`, `MPI_LOCALNRANKS`).
    /// `MASTER_ADDR` / `MASTER_PORT`, `DIST_JOB_SECRET`, `DIST_STORE_HOSTED`,
    /// `TORCHELASTIC_USE_AGENT_STORE` and `TORCHELASTIC_RESTART_COUNT` are
    /// read for every source. Under Slurm, without `MASTER_ADDR` the store
    /// host is the first host of `SLURM_STEP_NODELIST` / `SLURM_JOB_NODELIST`
    /// / `SLURM_NODELIST` (where rank 0 runs), else `SLURM_LAUNCH_NODE_IPADDR`;
    /// without `MASTER_PORT` the port is [`SLURM_BASE_PORT`] plus
    /// `SLURM_JOB_ID % 10000`.
    ///
    /// With torchrun variables, `LOCAL_RANK` and `LOCAL_WORLD_SIZE` may both
    /// be absent (plain `env://` as torch documents it): the job is then taken
    /// to be on one node. Missing, malformed or contradictory variables give
    /// [`CommError::InvalidArgument`] naming the variable.
    ///
    /// ```
    /// use dist_utils::RankInfo;
    /// let vars = [("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "29500")];
    /// let info = RankInfo::from_vars(&|k: &str| {
    ///     vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    /// }).unwrap();
    /// assert_eq!((info.rank, info.world_size, info.local_rank), (1, 2, 1));
    /// ```
    pub fn from_vars(get: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        let has = |k: &str| get(k).is_some();
        let mut info = if has("RANK") || has("WORLD_SIZE") {
            Self::torchrun(get)?
        } else if has("SLURM_PROCID") && has("SLURM_NTASKS") {
            Self::slurm(get)?
        } else if has("OMPI_COMM_WORLD_RANK") || has("OMPI_COMM_WORLD_SIZE") {
            Self::openmpi(get)?
        } else if has("PMI_RANK") || has("PMI_SIZE") {
            Self::pmi(get)?
        } else {
            return Err(CommError::invalid(
                "no launcher environment found: RANK and WORLD_SIZE are not set (nor the Slurm, \
                 Open MPI or PMI equivalents). Start the program with `distrun --nproc-per-node N -- ...`, \
                 torchrun, srun or mpirun, or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT",
            ));
        };
        if info.master_addr.is_none() {
            info.master_addr = non_empty(get, "MASTER_ADDR");
        }
        let slurm_port = info.master_port;
        info.master_port = parse_port(get, "MASTER_PORT")?.or(slurm_port);
        info.job_secret = match get(JOB_SECRET_ENV) {
            Some(s) if !s.trim().is_empty() => Some(comm_core::auth::from_hex(
                &format!("environment variable {JOB_SECRET_ENV}"),
                &s,
            )?),
            _ => None,
        };
        info.agent_store = match get(AGENT_STORE_ENV).as_deref().map(str::trim) {
            None | Some("") => false,
            Some(v) if v.eq_ignore_ascii_case("true") || v == "1" => true,
            Some(v) if v.eq_ignore_ascii_case("false") || v == "0" => false,
            Some(v) => {
                return Err(CommError::invalid(format!(
                    "environment variable {AGENT_STORE_ENV}={v:?} must be True or False"
                )))
            }
        };
        info.restart_count = match get(RESTART_COUNT_ENV) {
            None => 0,
            Some(v) => v.trim().parse::<u64>().map_err(|_| {
                CommError::invalid(format!(
                    "environment variable {RESTART_COUNT_ENV}={v:?} is not a non-negative integer"
                ))
            })?,
        };
        info.store_hosted = match get(STORE_HOSTED_ENV).as_deref().map(str::trim) {
            None | Some("") | Some("0") => false,
            Some("1") => true,
            Some(v) => {
                return Err(CommError::invalid(format!(
                    "environment variable {STORE_HOSTED_ENV}={v:?} must be 0 or 1"
                )))
            }
        };
        Ok(info)
    }

    fn torchrun(get: Lookup<'_>) -> Result<Self> {
        let l = "torchrun/distrun";
        let (rank, world) = rank_and_world(get, "RANK", "WORLD_SIZE", l)?;
        let (local_rank, local_world) = match (
            parse_num(get, "LOCAL_RANK")?,
            parse_num(get, "LOCAL_WORLD_SIZE")?,
        ) {
            (None, None) => (rank, world),
            (Some(lr), Some(lw)) => (lr, lw),
            (Some(_), None) => (0, require_num(get, "LOCAL_WORLD_SIZE", l)?),
            (None, Some(_)) => (require_num(get, "LOCAL_RANK", l)?, 0),
        };
        check_local(
            local_rank,
            "LOCAL_RANK",
            local_world,
            "LOCAL_WORLD_SIZE",
            world,
            "WORLD_SIZE",
        )?;
        let node_rank = match parse_num(get, "GROUP_RANK")? {
            Some(n) => n,
            None => parse_num(get, "NODE_RANK")?.unwrap_or(rank / local_world),
        };
        Ok(Self::base(
            rank,
            world,
            local_rank,
            local_world,
            node_rank,
            EnvSource::Torchrun,
        ))
    }

    fn slurm(get: Lookup<'_>) -> Result<Self> {
        let l = "Slurm (srun)";
        let (rank, world) = rank_and_world(get, "SLURM_PROCID", "SLURM_NTASKS", l)?;
        let local_rank = require_num(get, "SLURM_LOCALID", l)?;
        let node_rank = require_num(get, "SLURM_NODEID", l)?;
        let list_var = ["SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"]
            .into_iter()
            .find(|v| has_value(get, v));
        let (local_world, lw_var) = if let Some(n) = parse_num(get, "SLURM_NTASKS_PER_NODE")? {
            (n, "SLURM_NTASKS_PER_NODE")
        } else if let Some(var) = list_var {
            let list = get(var).unwrap_or_default();
            let per_node = parse_tasks_per_node(var, &list)?;
            let n = *per_node.get(node_rank).ok_or_else(|| {
                CommError::invalid(format!(
                    "SLURM_NODEID={node_rank} is out of range for {var}={list:?} ({} nodes)",
                    per_node.len()
                ))
            })?;
            (n, var)
        } else {
            return Err(CommError::invalid(
                "environment variables SLURM_NTASKS_PER_NODE and SLURM_TASKS_PER_NODE are both missing; \
                 srun sets SLURM_TASKS_PER_NODE for every task",
            ));
        };
        check_local(
            local_rank,
            "SLURM_LOCALID",
            local_world,
            lw_var,
            world,
            "SLURM_NTASKS",
        )?;
        let mut info = Self::base(
            rank,
            world,
            local_rank,
            local_world,
            node_rank,
            EnvSource::Slurm,
        );
        // An explicit MASTER_ADDR wins; else the first node of the step
        // (rank 0's node under block distribution; srun may have been started
        // from a login node, so not SLURM_LAUNCH_NODE_IPADDR first).
        info.master_addr = match non_empty(get, "MASTER_ADDR") {
            Some(a) => Some(a),
            None => match [
                "SLURM_STEP_NODELIST",
                "SLURM_JOB_NODELIST",
                "SLURM_NODELIST",
            ]
            .into_iter()
            .find(|v| has_value(get, v))
            {
                Some(var) => Some(first_host(var, &get(var).unwrap_or_default())?),
                None => non_empty(get, "SLURM_LAUNCH_NODE_IPADDR"),
            },
        };
        // A port every task derives alike; MASTER_PORT overrides it.
        info.master_port = match get("SLURM_JOB_ID") {
            Some(id) => {
                let id: u64 = id.trim().parse().map_err(|_| {
                    CommError::invalid(format!(
                        "environment variable SLURM_JOB_ID={id:?} is not a non-negative integer"
                    ))
                })?;
                Some(SLURM_BASE_PORT + (id % 10_000) as u16)
            }
            None => None,
        };
        Ok(info)
    }

    fn openmpi(get: Lookup<'_>) -> Result<Self> {
        let l = "Open MPI (mpirun)";
        let (rank, world) = rank_and_world(get, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", l)?;
        let local_rank = require_num(get, "OMPI_COMM_WORLD_LOCAL_RANK", l)?;
        let local_world = require_num(get, "OMPI_COMM_WORLD_LOCAL_SIZE", l)?;
        check_local(
            local_rank,
            "OMPI_COMM_WORLD_LOCAL_RANK",
            local_world,
            "OMPI_COMM_WORLD_LOCAL_SIZE",
            world,
            "OMPI_COMM_WORLD_SIZE",
        )?;
        let node_rank = parse_num(get, "OMPI_COMM_WORLD_NODE_RANK")?.unwrap_or(rank / local_world);
        Ok(Self::base(
            rank,
            world,
            local_rank,
            local_world,
            node_rank,
            EnvSource::OpenMpi,
        ))
    }

    fn pmi(get: Lookup<'_>) -> Result<Self> {
        let l = "PMI (MPICH / Intel MPI hydra)";
        let (rank, world) = rank_and_world(get, "PMI_RANK", "PMI_SIZE", l)?;
        let local_rank = require_num(get, "MPI_LOCALRANKID", l)?;
        let local_world = require_num(get, "MPI_LOCALNRANKS", l)?;
        check_local(
            local_rank,
            "MPI_LOCALRANKID",
            local_world,
            "MPI_LOCALNRANKS",
            world,
            "PMI_SIZE",
        )?;
        // Hydra places ranks in blocks by default.
        Ok(Self::base(
            rank,
            world,
            local_rank,
            local_world,
            rank / local_world,
            EnvSource::Pmi,
        ))
    }

    fn base(
        rank: usize,
        world: usize,
        local_rank: usize,
        local_world: usize,
        node: usize,
        src: EnvSource,
    ) -> Self {
        RankInfo {
            rank,
            world_size: world,
            local_rank,
            local_world_size: local_world,
            node_rank: node,
            master_addr: None,
            master_port: None,
            job_secret: None,
            store_hosted: false,
            agent_store: false,
            restart_count: 0,
            source: src,
        }
    }

    /// Number of nodes, assuming every node runs `local_world_size` ranks.
    pub fn num_nodes(&self) -> usize {
        self.world_size.div_ceil(self.local_world_size.max(1))
    }
}

fn check_world(world: usize, var: &str) -> Result<()> {
    if world == 0 {
        return Err(CommError::invalid(format!(
            "environment variable {var}=0: a job has at least one process"
        )));
    }
    Ok(())
}

fn check_below(v: usize, var: &str, bound: usize, bound_var: &str) -> Result<()> {
    if v >= bound {
        return Err(CommError::invalid(format!(
            "environment variables contradict each other: {var}={v} must be below {bound_var}={bound}"
        )));
    }
    Ok(())
}

/// Reads a (rank, world size) pair of one launcher's variables and checks
/// that the world is non-empty and the rank inside it.
fn rank_and_world(
    get: Lookup<'_>,
    rank_var: &str,
    world_var: &str,
    launcher: &str,
) -> Result<(usize, usize)> {
    let rank = require_num(get, rank_var, launcher)?;
    let world = require_num(get, world_var, launcher)?;
    check_world(world, world_var)?;
    check_below(rank, rank_var, world, world_var)?;
    Ok((rank, world))
}

fn check_local(
    lr: usize,
    lr_var: &str,
    lw: usize,
    lw_var: &str,
    world: usize,
    world_var: &str,
) -> Result<()> {
    if lw == 0 {
        return Err(CommError::invalid(format!(
            "environment variable {lw_var}=0: a node runs at least one process"
        )));
    }
    if lw > world {
        return Err(CommError::invalid(format!(
            "environment variables contradict each other: {lw_var}={lw} exceeds {world_var}={world}"
        )));
    }
    check_below(lr, lr_var, lw, lw_var)
}

static WARNED_NO_SECRET: AtomicBool = AtomicBool::new(false);

/// Which wire protocol a TCP rendezvous store speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreProtocol {
    /// Ours ([`TcpStore`]): every connection proves the job secret.
    Dist,
    /// PyTorch's c10d TCPStore ([`C10dStore`]): torchrun's agent store, or
    /// a store shared with Python ranks. No secret.
    C10d,
}

/// How a [`init_store`] call reaches its store.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum InitMethod {
    /// A TCP store at `host:port`.
    Tcp {
        /// Host name or IP.
        host: String,
        /// Port.
        port: u16,
        /// The protocol: `?store=dist|c10d` when given, else c10d when
        /// torchrun's agent hosts the store (`TORCHELASTIC_USE_AGENT_STORE`),
        /// else ours.
        store: StoreProtocol,
    },
    /// A [`FileStore`] at this path.
    File(std::path::PathBuf),
}

/// Splits `url?k=v&k2=v2` and returns the `store` option (the only one).
fn split_options(init_method: &str) -> Result<(&str, Option<StoreProtocol>)> {
    let Some((base, query)) = init_method.split_once('?') else {
        return Ok((init_method, None));
    };
    let mut store = None;
    for opt in query.split('&').filter(|o| !o.is_empty()) {
        match opt.split_once('=') {
            Some(("store", "c10d")) => store = Some(StoreProtocol::C10d),
            Some(("store", "dist")) => store = Some(StoreProtocol::Dist),
            Some(("store", other)) => {
                return Err(CommError::invalid(format!(
                    "init method {init_method:?}: store={other:?} is not a store protocol; use \
                     store=dist (ours, with the job secret) or store=c10d (PyTorch's TCPStore)"
                )))
            }
            _ => {
                return Err(CommError::invalid(format!(
                    "init method {init_method:?}: unknown option {opt:?}; the only option is \
                     store=dist|c10d"
                )))
            }
        }
    }
    Ok((base, store))
}

impl InitMethod {
    /// Parses `env://` (using `info.master_addr` / `master_port`),
    /// `tcp://host:port` (IPv6 as `tcp://[::1]:port`) or `file://path`.
    /// `env://` and `tcp://` take the option `?store=dist` or `?store=c10d`.
    ///
    /// ```
    /// use dist_utils::{InitMethod, RankInfo, StoreProtocol};
    /// let one = RankInfo::single_process();
    /// assert_eq!(
    ///     InitMethod::parse("tcp://node0:29500?store=c10d", &one).unwrap(),
    ///     InitMethod::Tcp { host: "node0".into(), port: 29500, store: StoreProtocol::C10d }
    /// );
    /// ```
    pub fn parse(init_method: &str, info: &RankInfo) -> Result<Self> {
        if let Some(path) = init_method.strip_prefix("file://") {
            if path.is_empty() {
                return Err(CommError::invalid(
                    "init method file:// needs a path, e.g. file:///shared/job/store",
                ));
            }
            return Ok(InitMethod::File(path.into()));
        }
        let (base, explicit) = split_options(init_method)?;
        let store = explicit.unwrap_or(if info.agent_store {
            StoreProtocol::C10d
        } else {
            StoreProtocol::Dist
        });
        if base == "env://" {
            let host = info.master_addr.clone().ok_or_else(|| {
                CommError::invalid(
                    "init method env:// needs environment variable MASTER_ADDR (the host of rank 0), which is not set",
                )
            })?;
            let port = info.master_port.ok_or_else(|| {
                CommError::invalid(
                    "init method env:// needs environment variable MASTER_PORT (a free port on MASTER_ADDR), which is not set",
                )
            })?;
            Ok(InitMethod::Tcp { host, port, store })
        } else if let Some(rest) = base.strip_prefix("tcp://") {
            let bad = || {
                CommError::invalid(format!(
                    "init method {init_method:?} is not of the form tcp://host:port (IPv6: tcp://[addr]:port)"
                ))
            };
            let (host, port) = rest
                .trim_end_matches('/')
                .rsplit_once(':')
                .ok_or_else(bad)?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port: u16 = port.parse().map_err(|_| bad())?;
            if host.is_empty() || port == 0 {
                return Err(bad());
            }
            Ok(InitMethod::Tcp {
                host: host.to_string(),
                port,
                store,
            })
        } else {
            Err(CommError::invalid(format!(
                "unsupported init method {init_method:?}; use env://, tcp://host:port or file://path"
            )))
        }
    }
}

/// Adds what rank 0 hosting the store on `port` means to a bind error.
fn explain_bind(e: CommError, port: u16) -> CommError {
    match e {
        CommError::Io { context, source } => CommError::Io {
            context: format!(
                "{context} (rank 0 hosts the rendezvous store on port {port}; is the port \
                 already in use, e.g. by an earlier job or by torchrun's agent? Under torchrun, \
                 TORCHELASTIC_USE_AGENT_STORE=True makes every rank use the agent's store)"
            ),
            source,
        },
        other => other,
    }
}

/// Opens the rendezvous store named by `init_method` for this rank.
///
/// - `env://` and `tcp://host:port` with our protocol: a [`TcpStore`]. When
///   the launcher hosts the store (`info.store_hosted`, from
///   `DIST_STORE_HOSTED=1`), every rank connects as a client; otherwise rank
///   0 starts the server on that port (listening on every interface) and
///   connects to it, and the others connect, retrying until `timeout`.
///   Connections prove `info.job_secret`; without one (no `DIST_JOB_SECRET`)
///   an empty secret is used and a warning is logged once, since any process
///   that reaches the port could then join.
/// - With the c10d protocol (`?store=c10d`, or torchrun's agent store): a
///   [`C10dStore`]. Under torchrun's agent (`info.agent_store`) every rank
///   connects to the agent's store, under the key prefix
///   `/worker/attempt_{restart_count}` as PyTorch's own ranks do; otherwise
///   rank 0 hosts a [`crate::C10dServer`] unless the launcher hosts one.
/// - `file://path`: a [`FileStore`] (the file's directory must exist and be
///   shared by every rank).
pub fn init_store(init_method: &str, info: &RankInfo, timeout: Duration) -> Result<Arc<dyn Store>> {
    match InitMethod::parse(init_method, info)? {
        InitMethod::File(path) => Ok(Arc::new(FileStore::new(path)?)),
        InitMethod::Tcp { host, port, store } => {
            let bind_ip = match host.parse::<IpAddr>() {
                Ok(IpAddr::V6(_)) => "::",
                _ => "0.0.0.0",
            };
            let hosts = info.rank == 0 && !info.store_hosted && !info.agent_store;
            if store == StoreProtocol::C10d {
                let c10d = if hosts {
                    C10dStore::serve((bind_ip, port), timeout).map_err(|e| explain_bind(e, port))?
                } else {
                    C10dStore::connect((host.as_str(), port), timeout)?
                };
                if info.agent_store {
                    let prefix = format!("/worker/attempt_{}", info.restart_count);
                    return Ok(Arc::new(PrefixStore::new(prefix, Arc::new(c10d))));
                }
                return Ok(Arc::new(c10d));
            }
            let secret = match &info.job_secret {
                Some(s) => s.clone(),
                None => {
                    if !WARNED_NO_SECRET.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            "{JOB_SECRET_ENV} is not set: the TCP store is unauthenticated and any process \
                             that reaches {host}:{port} can join. Launch with distrun, or set {JOB_SECRET_ENV} \
                             to the same hex value for every rank"
                        );
                    }
                    Vec::new()
                }
            };
            let store = if hosts {
                TcpStore::serve((bind_ip, port), &secret, timeout)
                    .map_err(|e| explain_bind(e, port))?
            } else {
                TcpStore::connect((host.as_str(), port), &secret, timeout)?
            };
            Ok(Arc::new(store))
        }
    }
}
