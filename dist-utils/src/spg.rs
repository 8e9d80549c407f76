//! A process group that exists only as keys in a [`Store`]: objects sent
//! point to point, broadcast and all-gathered, and a barrier. It needs no
//! communicator, so it works before any backend is set up (vLLM's
//! `StatelessProcessGroup`).
//!
//! # Keys
//!
//! All keys live under `spg/` of the store; give each group its own
//! [`crate::PrefixStore`] when several groups share one store.
//!
//! - `send_obj` / `recv_obj`: `spg/p2p/{src}->{dst}/{seq}` with a sequence
//!   number per ordered pair (sender, receiver). Two senders to one receiver
//!   never collide and repeated sends arrive in order. The receiver deletes
//!   the key it consumed.
//! - `broadcast_obj`: `spg/bcast/{seq}/from/{src}`, one sequence number per
//!   call; every receiver counts itself in `spg/bcast/{seq}/acks` and the last
//!   one deletes both keys.
//! - `all_gather_obj`: `spg/gather/{seq}/{rank}`; the last rank to finish
//!   reading (counter `spg/gather/{seq}/done`) deletes them.
//! - `barrier`: generation `g` counts arrivals in `spg/barrier/{g}/count`; the
//!   last arrival sets `spg/barrier/{g}/done`, which everyone waits for. Each
//!   rank also sets `spg/barrier/{g}/arrived/{rank}` so that a timeout can name
//!   the ranks that never came; the last rank to leave deletes the generation.
//!
//! Deleting consumed keys is best effort: once an operation has its data, a
//! failed delete is logged, not returned.
//!
//! Collectives (`broadcast_obj`, `all_gather_obj`, `barrier`) must be called
//! in the same order on every rank, and not concurrently from several threads
//! of one rank. Point-to-point calls may run from several threads; sends to
//! one receiver (and receives from one sender) are serialised in call order.

use std::collections::HashMap;
use std::fmt;
use std::net::ToSocketAddrs;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use comm_core::{CommError, Deadline, Result, Store};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::{decode, encode};
use crate::TcpStore;

/// Send / recv / broadcast / all-gather of serde objects and a barrier, over
/// any [`Store`]. See the [module documentation](self) for the key layout.
///
/// ```
/// use dist_utils::{HashStore, StatelessProcessGroup};
/// use std::sync::Arc;
/// use std::time::Duration;
/// let store = Arc::new(HashStore::new());
/// let handles: Vec<_> = (0..2)
///     .map(|rank| {
///         let store = store.clone();
///         std::thread::spawn(move || {
///             let g = StatelessProcessGroup::new(rank, 2, store, Duration::from_secs(10)).unwrap();
///             g.all_gather_obj(&format!("hello from {rank}")).unwrap()
///         })
///     })
///     .collect();
/// for h in handles {
///     assert_eq!(h.join().unwrap(), ["hello from 0", "hello from 1"]);
/// }
/// ```
pub struct StatelessProcessGroup {
    rank: usize,
    world_size: usize,
    store: Arc<dyn Store>,
    timeout: Duration,
    /// Next sequence number of a send to each destination.
    send_seq: Vec<Mutex<u64>>,
    /// Next sequence number of a receive from each source.
    recv_seq: Vec<Mutex<u64>>,
    bcast_seq: AtomicU64,
    gather_seq: AtomicU64,
    barrier_gen: AtomicU64,
    /// Made by [`StatelessProcessGroup::create_tcp`]: rank 0 hosts the server
    /// and, when dropped, waits for the other members to drop theirs.
    tcp_hosted: bool,
}

impl fmt::Debug for StatelessProcessGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StatelessProcessGroup")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("timeout", &self.timeout)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

fn lock(m: &Mutex<u64>) -> MutexGuard<'_, u64> {
    // A counter cannot be left half-updated: a poisoned lock is still valid.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl StatelessProcessGroup {
    /// Rank `rank` of a group of `world_size` ranks over `store`; every
    /// blocking call waits at most `timeout`.
    pub fn new(
        rank: usize,
        world_size: usize,
        store: Arc<dyn Store>,
        timeout: Duration,
    ) -> Result<Self> {
        if world_size == 0 {
            return Err(CommError::invalid(
                "StatelessProcessGroup needs world_size >= 1",
            ));
        }
        if rank >= world_size {
            return Err(CommError::invalid(format!(
                "StatelessProcessGroup rank {rank} is out of range for world_size {world_size}"
            )));
        }
        Ok(StatelessProcessGroup {
            rank,
            world_size,
            store,
            timeout,
            send_seq: (0..world_size).map(|_| Mutex::new(0)).collect(),
            recv_seq: (0..world_size).map(|_| Mutex::new(0)).collect(),
            bcast_seq: AtomicU64::new(0),
            gather_seq: AtomicU64::new(0),
            barrier_gen: AtomicU64::new(0),
            tcp_hosted: false,
        })
    }

    /// A group over a [`TcpStore`]: rank 0 serves it on `addr`, the other
    /// ranks connect to `addr`.
    ///
    /// The server lives in rank 0's group. So that a rank 0 that finishes
    /// first (say, right after a final `barrier`) does not pull the store from
    /// under the others, dropping rank 0's group waits, at most `timeout`, until
    /// every other member has dropped its group (each one marks
    /// `spg/dropped/{rank}` when dropped).
    pub fn create_tcp(
        addr: impl ToSocketAddrs + fmt::Debug,
        rank: usize,
        world_size: usize,
        secret: impl AsRef<[u8]>,
        timeout: Duration,
    ) -> Result<Self> {
        let store = if rank == 0 {
            TcpStore::serve(addr, secret, timeout)?
        } else {
            TcpStore::connect(addr, secret, timeout)?
        };
        let mut g = Self::new(rank, world_size, Arc::new(store), timeout)?;
        g.tcp_hosted = true;
        Ok(g)
    }

    /// This member's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of members.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// The deadline of every blocking call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    fn check_peer(&self, peer: usize, op: &str) -> Result<()> {
        if peer >= self.world_size {
            return Err(CommError::invalid(format!(
                "{op}: rank {peer} is out of range for a group of {} rank(s)",
                self.world_size
            )));
        }
        if peer == self.rank {
            return Err(CommError::invalid(format!(
                "{op}: rank {} cannot {op} itself; keep the value locally instead",
                self.rank
            )));
        }
        Ok(())
    }

    fn op_name(&self, op: impl fmt::Display) -> String {
        format!(
            "StatelessProcessGroup {op} on rank {}/{}",
            self.rank, self.world_size
        )
    }

    /// Replaces the keys a store Timeout names by the ranks that own them.
    fn rank_timeout(&self, e: CommError, op: String, owners: &HashMap<String, usize>) -> CommError {
        match e {
            CommError::Timeout { waited, keys, .. } => {
                let mut ranks: Vec<usize> =
                    keys.iter().filter_map(|k| owners.get(k).copied()).collect();
                ranks.sort_unstable();
                ranks.dedup();
                CommError::timeout_ranks(
                    op,
                    waited,
                    ranks
                        .into_iter()
                        .map(|r| comm_core::Missing::new(r, ""))
                        .collect(),
                )
            }
            other => other,
        }
    }

    /// Sends `obj` to rank `dst` (which receives it with [`Self::recv_obj`]).
    /// Does not wait for the receiver.
    pub fn send_obj<T: Serialize + ?Sized>(&self, obj: &T, dst: usize) -> Result<()> {
        self.check_peer(dst, "send_obj to")?;
        let bytes = encode(obj)?;
        let mut seq = lock(&self.send_seq[dst]);
        self.store.set(&p2p_key(self.rank, dst, *seq), &bytes)?;
        *seq += 1;
        Ok(())
    }

    /// Receives the next object rank `src` sent to this rank.
    pub fn recv_obj<T: DeserializeOwned>(&self, src: usize) -> Result<T> {
        self.check_peer(src, "recv_obj from")?;
        let mut seq = lock(&self.recv_seq[src]);
        let key = p2p_key(src, self.rank, *seq);
        let bytes = self.store.get(&key, self.timeout).map_err(|e| {
            let op = self.op_name(format_args!("recv_obj from rank {src} (message #{})", *seq));
            self.rank_timeout(e, op, &HashMap::from([(key.clone(), src)]))
        })?;
        *seq += 1;
        drop(seq);
        cleanup(&*self.store, &[&key]);
        decode(&bytes)
    }

    /// Broadcasts an object from rank `src`: `src` passes `Some(obj)`, the
    /// others `None` (ignored if given); every rank returns the object.
    pub fn broadcast_obj<T: Serialize + DeserializeOwned>(
        &self,
        obj: Option<&T>,
        src: usize,
    ) -> Result<T> {
        if src >= self.world_size {
            return Err(CommError::invalid(format!(
                "broadcast_obj: source rank {src} is out of range for a group of {} rank(s)",
                self.world_size
            )));
        }
        let seq = self.bcast_seq.fetch_add(1, Ordering::SeqCst);
        let key = format!("spg/bcast/{seq}/from/{src}");
        if self.rank == src {
            let obj = obj.ok_or_else(|| {
                CommError::invalid(format!(
                    "broadcast_obj: the source rank {src} must pass Some(object)"
                ))
            })?;
            let bytes = encode(obj)?;
            if self.world_size > 1 {
                self.store.set(&key, &bytes)?;
            }
            return decode(&bytes);
        }
        let bytes = self.store.get(&key, self.timeout).map_err(|e| {
            let op = self.op_name(format_args!("broadcast_obj #{seq} from rank {src}"));
            self.rank_timeout(e, op, &HashMap::from([(key.clone(), src)]))
        })?;
        let acks_key = format!("spg/bcast/{seq}/acks");
        if count_reaches(&*self.store, &acks_key, self.world_size - 1) {
            cleanup(&*self.store, &[&key, &acks_key]);
        }
        decode(&bytes)
    }

    /// Gathers one object from every rank, in rank order, on every rank.
    pub fn all_gather_obj<T: Serialize + DeserializeOwned>(&self, obj: &T) -> Result<Vec<T>> {
        let bytes = encode(obj)?;
        if self.world_size == 1 {
            return Ok(vec![decode(&bytes)?]);
        }
        let seq = self.gather_seq.fetch_add(1, Ordering::SeqCst);
        let keys: Vec<String> = (0..self.world_size)
            .map(|r| format!("spg/gather/{seq}/{r}"))
            .collect();
        self.store.set(&keys[self.rank], &bytes)?;
        let deadline = Deadline::after(self.timeout);
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        self.store.wait(&refs, deadline.remaining()).map_err(|e| {
            let owners = keys.iter().cloned().zip(0..).collect();
            self.rank_timeout(
                e,
                self.op_name(format_args!("all_gather_obj #{seq}")),
                &owners,
            )
        })?;
        let mut out = Vec::with_capacity(self.world_size);
        for (r, k) in keys.iter().enumerate() {
            let b = if r == self.rank {
                bytes.clone()
            } else {
                self.store.get(k, deadline.remaining())?
            };
            out.push(decode(&b)?);
        }
        let done_key = format!("spg/gather/{seq}/done");
        if count_reaches(&*self.store, &done_key, self.world_size) {
            let mut all: Vec<&str> = refs;
            all.push(&done_key);
            cleanup(&*self.store, &all);
        }
        Ok(out)
    }

    /// Returns once every rank has called `barrier` (the same number of times).
    /// A timeout names the ranks that did not arrive.
    pub fn barrier(&self) -> Result<()> {
        if self.world_size == 1 {
            return Ok(());
        }
        let generation = self.barrier_gen.fetch_add(1, Ordering::SeqCst);
        let base = format!("spg/barrier/{generation}");
        let arrived = |r: usize| format!("{base}/arrived/{r}");
        let count_key = format!("{base}/count");
        let done_key = format!("{base}/done");
        let left_key = format!("{base}/left");

        self.store.set(&arrived(self.rank), b"")?;
        if self.store.add(&count_key, 1)? == self.world_size as i64 {
            self.store.set(&done_key, b"")?;
        }
        if let Err(e) = self.store.get(&done_key, self.timeout) {
            let CommError::Timeout { waited, .. } = e else {
                return Err(e);
            };
            let mut missing = Vec::new();
            for r in 0..self.world_size {
                if self.store.try_get(&arrived(r))?.is_none() {
                    missing.push(comm_core::Missing::new(r, "did not reach the barrier"));
                }
            }
            return Err(CommError::timeout_ranks(
                self.op_name(format_args!("barrier #{generation}")),
                waited,
                missing,
            ));
        }
        if count_reaches(&*self.store, &left_key, self.world_size) {
            let mut all: Vec<String> = (0..self.world_size).map(arrived).collect();
            all.extend([count_key, done_key, left_key]);
            let refs: Vec<&str> = all.iter().map(String::as_str).collect();
            cleanup(&*self.store, &refs);
        }
        Ok(())
    }
}

impl Drop for StatelessProcessGroup {
    fn drop(&mut self) {
        if !self.tcp_hosted || self.world_size == 1 {
            return;
        }
        if self.rank != 0 {
            if let Err(e) = self.store.set(&format!("spg/dropped/{}", self.rank), b"") {
                tracing::debug!(rank = self.rank, error = %e, "could not mark the group as dropped");
            }
            return;
        }
        let keys: Vec<String> = (1..self.world_size)
            .map(|r| format!("spg/dropped/{r}"))
            .collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        if let Err(e) = self.store.wait(&refs, self.timeout) {
            tracing::warn!(
                error = %e,
                "rank 0 shuts the TCP store down before every member of its StatelessProcessGroup dropped the group"
            );
        }
    }
}

/// Deletes keys nobody reads any more. The operation already succeeded, so a
/// failure (say, the store's host has exited) is only logged.
fn cleanup(store: &dyn Store, keys: &[&str]) {
    for k in keys {
        if let Err(e) = store.delete(k) {
            tracing::debug!(key = %k, error = %e, "StatelessProcessGroup could not delete a consumed key");
            return;
        }
    }
}

/// `store.add(key, 1) == target`, treating a failure as "not the last one".
fn count_reaches(store: &dyn Store, key: &str, target: usize) -> bool {
    match store.add(key, 1) {
        Ok(n) => n == target as i64,
        Err(e) => {
            tracing::debug!(key = %key, error = %e, "StatelessProcessGroup could not count itself out");
            false
        }
    }
}

fn p2p_key(src: usize, dst: usize, seq: u64) -> String {
    format!("spg/p2p/{src}->{dst}/{seq}")
}
