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

use crate::{FileStore, TcpStore};

/// Environment variable with the per-job secret, as hex (set by `distrun`).
pub const JOB_SECRET_ENV: &str = "DIST_JOB_SECRET";
/// Environment variable that is `1` when the launcher hosts the store, so
/// rank 0 connects as a client instead of serving.
pub const STORE_HOSTED_ENV: &str = "DIST_STORE_HOSTED";

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

fn non_empty(get: Lookup<'_>, var: &str) -> Option<String> {
    get(var)
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Decodes a hex secret; `var` names it in the error.
pub fn decode_hex_secret(var: &str, s: &str) -> Result<Vec<u8>> {
    let s = s.trim();
    let bad = || {
        CommError::invalid(format!(
            "environment variable {var} must be an even-length hex string (e.g. 32 hex digits), \
             as distrun sets it; got {} characters",
            s.len()
        ))
    };
    if s.len() % 2 != 0 {
        return Err(bad());
    }
    (0..s.len() / 2)
        .map(|i| {
            s.get(2 * i..2 * i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(bad)
        })
        .collect()
}

/// Expands Slurm's compressed task counts, e.g. `"4(x2),3"` to `[4, 4, 3]`.
pub fn parse_slurm_tasks_per_node(var: &str, s: &str) -> Result<Vec<usize>> {
    let bad = || {
        CommError::invalid(format!(
            "environment variable {var}={s:?} is not a Slurm task list like \"4\", \"4(x2)\" or \"4(x2),3\""
        ))
    };
    let mut out = Vec::new();
    for part in s.trim().split(',') {
        let (count, reps) = match part.split_once("(x") {
            Some((c, r)) => (c, r.strip_suffix(')').ok_or_else(bad)?),
            None => (part, "1"),
        };
        let count: usize = count.trim().parse().map_err(|_| bad())?;
        let reps: usize = reps.trim().parse().map_err(|_| bad())?;
        if reps == 0 || reps > 1 << 20 {
            return Err(bad());
        }
        out.resize(out.len() + reps, count);
    }
    if out.is_empty() {
        return Err(bad());
    }
    Ok(out)
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
    /// `SLURM_NTASKS_PER_NODE` or `SLURM_TASKS_PER_NODE`, `SLURM_NODEID`),
    /// Open MPI (`OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE,NODE_RANK}`)
    /// and PMI (`PMI_RANK`, `PMI_SIZE`, `MPI_LOCALRANKID`, `MPI_LOCALNRANKS`).
    /// `MASTER_ADDR` / `MASTER_PORT` (Slurm: else `SLURM_LAUNCH_NODE_IPADDR`),
    /// `DIST_JOB_SECRET` and `DIST_STORE_HOSTED` are read for every source.
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
        info.master_port = parse_port(get, "MASTER_PORT")?;
        info.job_secret = match get(JOB_SECRET_ENV) {
            Some(s) if !s.trim().is_empty() => Some(decode_hex_secret(JOB_SECRET_ENV, &s)?),
            _ => None,
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
        let (local_world, lw_var) = if let Some(n) = parse_num(get, "SLURM_NTASKS_PER_NODE")? {
            (n, "SLURM_NTASKS_PER_NODE")
        } else if let Some(list) = get("SLURM_TASKS_PER_NODE") {
            let per_node = parse_slurm_tasks_per_node("SLURM_TASKS_PER_NODE", &list)?;
            let n = *per_node.get(node_rank).ok_or_else(|| {
                CommError::invalid(format!(
                    "SLURM_NODEID={node_rank} is out of range for SLURM_TASKS_PER_NODE={list:?} ({} nodes)",
                    per_node.len()
                ))
            })?;
            (n, "SLURM_TASKS_PER_NODE")
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
        // An explicit MASTER_ADDR wins; else the node srun was started from.
        info.master_addr =
            non_empty(get, "MASTER_ADDR").or_else(|| non_empty(get, "SLURM_LAUNCH_NODE_IPADDR"));
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

/// How a [`init_store`] call reaches its store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitMethod {
    /// A TCP store at `host:port`.
    Tcp {
        /// Host name or IP.
        host: String,
        /// Port.
        port: u16,
    },
    /// A [`FileStore`] at this path.
    File(std::path::PathBuf),
}

impl InitMethod {
    /// Parses `env://` (using `info.master_addr` / `master_port`),
    /// `tcp://host:port` (IPv6 as `tcp://[::1]:port`) or `file://path`.
    pub fn parse(init_method: &str, info: &RankInfo) -> Result<Self> {
        if init_method == "env://" {
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
            Ok(InitMethod::Tcp { host, port })
        } else if let Some(rest) = init_method.strip_prefix("tcp://") {
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
            })
        } else if let Some(path) = init_method.strip_prefix("file://") {
            if path.is_empty() {
                return Err(CommError::invalid(
                    "init method file:// needs a path, e.g. file:///shared/job/store",
                ));
            }
            Ok(InitMethod::File(path.into()))
        } else {
            Err(CommError::invalid(format!(
                "unsupported init method {init_method:?}; use env://, tcp://host:port or file://path"
            )))
        }
    }
}

/// Opens the rendezvous store named by `init_method` for this rank.
///
/// - `env://` and `tcp://host:port`: a [`TcpStore`]. When the launcher hosts
///   the store (`info.store_hosted`, from `DIST_STORE_HOSTED=1`), every rank
///   connects as a client; otherwise rank 0 starts the server on that port
///   (listening on every interface) and connects to it, and the others
///   connect, retrying until `timeout`.
/// - `file://path`: a [`FileStore`] (the file's directory must exist and be
///   shared by every rank).
///
/// Connections present `info.job_secret`; without one (no
/// `DIST_JOB_SECRET`) an empty secret is used and a warning is logged once,
/// since any process that reaches the port could then join.
pub fn init_store(init_method: &str, info: &RankInfo, timeout: Duration) -> Result<Arc<dyn Store>> {
    match InitMethod::parse(init_method, info)? {
        InitMethod::File(path) => Ok(Arc::new(FileStore::new(path)?)),
        InitMethod::Tcp { host, port } => {
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
            let store = if info.rank == 0 && !info.store_hosted {
                let bind_ip = match host.parse::<IpAddr>() {
                    Ok(IpAddr::V6(_)) => "::",
                    _ => "0.0.0.0",
                };
                TcpStore::serve((bind_ip, port), &secret, timeout).map_err(|e| match e {
                    CommError::Io { context, source } => CommError::Io {
                        context: format!(
                            "{context} (rank 0 hosts the rendezvous store on port {port}; is the port \
                             already in use, e.g. by an earlier job?)"
                        ),
                        source,
                    },
                    other => other,
                })?
            } else {
                TcpStore::connect((host.as_str(), port), &secret, timeout)?
            };
            Ok(Arc::new(store))
        }
    }
}
