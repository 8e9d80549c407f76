//! One rank's part of a kit run: how it makes fresh communicators through
//! the registry (every mismatch and failure case needs its own, since those
//! errors leave a communicator unusable), and how ranks meet between cases
//! outside any communicator (through the job's store).

use std::sync::Arc;
use std::time::{Duration, Instant};

use comm_core::{CommError, Communicator, Device, GroupContext, PrefixStore, Registry, Store};

use crate::bufs::Holder;
use crate::suite::Failure;

/// One rank of a kit run.
pub(crate) struct Member<'a> {
    pub(crate) registry: &'a Registry,
    pub(crate) backend: &'a str,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) rank: usize,
    pub(crate) world: usize,
    /// The device the communicators move (`Cpu` for host backends, which
    /// stage device buffers).
    pub(crate) comm_device: Device,
    /// Where the checks' buffers live.
    pub(crate) buffers: Device,
    /// Deadline of set-up and of each operation.
    pub(crate) timeout: Duration,
    /// Notes about what was skipped and why.
    pub(crate) skipped: Vec<String>,
}

impl Member<'_> {
    /// How this member's checks hold their buffers.
    pub(crate) fn holder(&self) -> Holder {
        match self.buffers {
            Device::Cpu => Holder::Tensor,
            dev => Holder::Device(dev),
        }
    }

    /// This member of a fresh group of every rank, named `name`, behind the
    /// checked front, exactly as the group layer builds one
    /// ([`Registry::create`]). `global`: the global rank of each member, for
    /// checking that errors carry both.
    pub(crate) fn communicator(
        &self,
        name: &str,
        global: Option<Vec<usize>>,
    ) -> Result<Communicator, Failure> {
        let store: Arc<dyn Store> =
            Arc::new(PrefixStore::new(format!("kit/{name}"), self.store.clone()));
        let mut ctx = GroupContext::new(store, self.rank, self.world)
            .timeout(self.timeout)
            .group_name(name)
            .device(self.comm_device);
        if let Some(g) = global {
            ctx = ctx.global_ranks(g);
        }
        self.registry.create(self.backend, &ctx).map_err(|e| {
            format!(
                "rank {}: creating the {} communicator of group `{name}`: {e}",
                self.rank, self.backend
            )
        })
    }

    /// Brings a fresh communicator into a known state before a case breaks
    /// it on purpose: a barrier on it (its connections work), then a
    /// [`meet`](Self::meet) through the store, so no member starts the
    /// deliberate fault (an abort, a drop, a mismatched call) while another
    /// is still inside that barrier. Returning from a barrier only says that
    /// every member has *entered* it; without the meet, a fast member's
    /// fault may legitimately fail a slow member's barrier.
    pub(crate) fn settle(&self, comm: &Communicator, tag: &str, what: &str) -> Result<(), Failure> {
        comm.barrier().map_err(|e| {
            format!(
                "rank {}: {what}: the barrier before it failed: {e}",
                self.rank
            )
        })?;
        self.meet(&format!("{tag}-settled"))
    }

    /// Returns once every rank has called it with `tag` (through the store,
    /// so it works while communicators are broken on purpose), or early
    /// with an error once another rank has failed ([`fail`]).
    pub(crate) fn meet(&self, tag: &str) -> Result<(), Failure> {
        let keys: Vec<String> = (0..self.world)
            .map(|r| format!("kit/meet/{tag}/{r}"))
            .collect();
        self.store
            .set(&keys[self.rank], b"1")
            .map_err(|e| format!("rank {}: at `{tag}`: {e}", self.rank))?;
        for k in &keys {
            self.get(k, &format!("waiting for every rank at `{tag}`"))?;
        }
        Ok(())
    }

    /// Publishes this rank's `value` under `tag` and returns every rank's,
    /// in rank order (after all have published).
    pub(crate) fn share(&self, tag: &str, value: &str) -> Result<Vec<String>, Failure> {
        let key = |r: usize| format!("kit/share/{tag}/{r}");
        self.store
            .set(&key(self.rank), value.as_bytes())
            .map_err(|e| format!("rank {}: sharing `{tag}`: {e}", self.rank))?;
        (0..self.world)
            .map(|r| {
                self.get(&key(r), &format!("sharing `{tag}`"))
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
            })
            .collect()
    }

    /// The value of `key`, waiting at most the deadline, and giving up as
    /// soon as another rank has failed.
    fn get(&self, key: &str, what: &str) -> Result<Vec<u8>, Failure> {
        let end = Instant::now() + self.timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.store.get(key, left.min(FAILED_POLL)) {
                Ok(v) => return Ok(v),
                Err(CommError::Timeout { .. }) if !left.is_zero() => {
                    if let Ok(Some(why)) = self.store.try_get(FAILED_KEY) {
                        return Err(format!(
                            "rank {}: {what}: stopped because another rank failed: {}",
                            self.rank,
                            String::from_utf8_lossy(&why)
                        ));
                    }
                }
                Err(e) => return Err(format!("rank {}: {what}: {e}", self.rank)),
            }
        }
    }
}

/// Where a rank that failed says so, so that the others stop waiting for
/// it at the next meeting point instead of at their deadline.
pub(crate) const FAILED_KEY: &str = "kit/failed";
/// How often a waiting rank looks for [`FAILED_KEY`].
const FAILED_POLL: Duration = Duration::from_millis(200);

/// Records in `store` that `rank` failed with `why` (best effort).
pub(crate) fn fail(store: &dyn Store, rank: usize, why: &str) {
    let _ = store.compare_set(FAILED_KEY, None, format!("rank {rank}: {why}").as_bytes());
}

/// A barrier through `store`: every rank sets its key under `tag`, then
/// waits (at most `timeout`) for every other rank's.
pub fn meet(
    store: &dyn Store,
    tag: &str,
    rank: usize,
    world: usize,
    timeout: Duration,
) -> comm_core::Result<()> {
    let keys: Vec<String> = (0..world).map(|r| format!("kit/meet/{tag}/{r}")).collect();
    store.set(&keys[rank], b"1")?;
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    store.wait(&refs, timeout)
}
