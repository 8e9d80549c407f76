//! Joining the job a launcher (`distrun`, `executor::launch`) started: this
//! rank's place in the world and the job's store.

use std::sync::Arc;
use std::time::Duration;

use comm_core::{Result, Store};
use dist_utils::{init_store, RankInfo};

/// This rank's view of the job.
#[derive(Debug, Clone)]
pub struct Joined {
    /// Global rank.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
    /// Everything the environment said about this rank.
    pub info: RankInfo,
    /// The job's rendezvous store (`env://`).
    pub store: Arc<dyn Store>,
}

/// Reads this rank's place from the environment ([`RankInfo::from_env`]:
/// torchrun / distrun, Slurm or Open MPI variables) and connects to the job's
/// store with `init_store("env://")`.
pub fn join(timeout: Duration) -> Result<Joined> {
    let info = RankInfo::from_env()?;
    let store = init_store("env://", &info, timeout)?;
    Ok(Joined {
        rank: info.rank,
        world: info.world_size,
        info,
        store,
    })
}
