//! `GroupCoordinator`: one group of ranks with a host (CPU) plane and an
//! optional device plane, and every collective users call on a group.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use comm_core::layout;
use comm_core::{
    CommError, DType, Device, DeviceCommunicator, HostStaged, ReduceOp, Result, Store, Tensor,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::backend::{self, Backend};
use crate::tensor_dict::{MetaValue, TensorDict, Value};

/// Options for building a group.
#[derive(Debug, Clone)]
pub struct GroupOptions {
    /// Deadline of every blocking operation of the group.
    pub timeout: Duration,
    /// Forces the host backend (`tcp` / `shm`); `None` chooses automatically.
    pub backend: Option<Backend>,
    /// Device of the data plane (`Cuda(n)` builds an NCCL communicator when
    /// NCCL is available, else CUDA tensors are staged through host memory).
    pub device: Device,
    /// Route `broadcast_object` from group rank 0 through the shared-memory
    /// message queue when every member is on this host.
    pub use_message_queue_broadcaster: bool,
}

impl Default for GroupOptions {
    fn default() -> Self {
        GroupOptions {
            timeout: comm_core::default_timeout(),
            backend: None,
            device: Device::Cpu,
            use_message_queue_broadcaster: false,
        }
    }
}

type HostComm = HostStaged<Box<dyn DeviceCommunicator>>;

/// One process group: its ranks, its planes, and the collectives over them.
///
/// All rank arguments (`src`, `dst`, `root`) are group-local
/// (`0..world_size()`); [`GroupCoordinator::ranks`] maps them to global ranks.
/// The coordinator is `Send + Sync`; each plane is used by one thread at a time.
pub struct GroupCoordinator {
    name: String,
    ranks: Vec<usize>,
    rank: usize,
    rank_in_group: usize,
    local_rank: usize,
    host_backend: Backend,
    device_backend: Option<Backend>,
    timeout: Duration,
    host: Mutex<Option<HostComm>>,
    device: Mutex<Option<Box<dyn DeviceCommunicator>>>,
    mq: Option<crate::mq::MqBroadcaster>,
}

impl std::fmt::Debug for GroupCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCoordinator")
            .field("name", &self.name)
            .field("ranks", &self.ranks)
            .field("rank", &self.rank)
            .field("rank_in_group", &self.rank_in_group)
            .field("host_backend", &self.host_backend)
            .field("device_backend", &self.device_backend)
            .finish()
    }
}

fn poisoned<T>(_: T) -> CommError {
    CommError::State("a group's communicator lock was poisoned by a panic on another thread".into())
}

impl GroupCoordinator {
    /// Builds the group `ranks` (global ranks in group order) on the member
    /// with global rank `rank`. Every member calls this concurrently with the
    /// same `ranks`, `name` and a `store` namespaced for this group instance.
    /// `all_on_this_host` must be true iff every member runs on this host.
    pub fn new(
        ranks: Vec<usize>,
        rank: usize,
        local_rank: usize,
        name: impl Into<String>,
        store: Arc<dyn Store>,
        all_on_this_host: bool,
        opts: GroupOptions,
    ) -> Result<Self> {
        let name = name.into();
        let rank_in_group = ranks.iter().position(|&r| r == rank).ok_or_else(|| {
            CommError::invalid(format!(
                "rank {rank} is not a member of group `{name}` {ranks:?}"
            ))
        })?;
        let mut sorted = ranks.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != ranks.len() {
            return Err(CommError::invalid(format!(
                "group `{name}` lists a rank twice: {ranks:?}"
            )));
        }
        let world = ranks.len();
        let forced = match opts.backend {
            Some(b) => Some(b),
            None => backend::backend_from_env()?,
        };
        let host_forced = forced.filter(|b| *b != Backend::Nccl);
        let (host_backend, why) =
            backend::choose_host_backend(world, all_on_this_host, host_forced)?;
        let host_store: Arc<dyn Store> =
            Arc::new(dist_utils::PrefixStore::new("host", store.clone()));
        let host = backend::host_communicator(
            host_backend,
            host_store,
            rank_in_group,
            world,
            opts.timeout,
            &name,
        )?;
        let (device, device_backend, dev_why) = match backend::device_communicator(
            opts.device,
            &store,
            rank_in_group,
            world,
            opts.timeout,
        )? {
            Ok(c) => (
                Some(c),
                Some(Backend::Nccl),
                "NCCL for CUDA tensors".to_string(),
            ),
            Err(why) => (None, None, why),
        };
        if forced == Some(Backend::Nccl) && device.is_none() && world > 1 {
            return Err(CommError::unavailable(
                "nccl",
                format!("forced for group `{name}`, but {dev_why}"),
            ));
        }
        if rank_in_group == 0 {
            tracing::info!(
                group = %name, ranks = ?ranks, host_backend = %host_backend, reason = %why,
                device_plane = %dev_why, "group created"
            );
        }
        let mq = if opts.use_message_queue_broadcaster && host_backend == Backend::Shm {
            let mq_store: Arc<dyn Store> = Arc::new(dist_utils::PrefixStore::new("mq", store));
            Some(crate::mq::MqBroadcaster::new(
                mq_store,
                rank_in_group,
                world,
                opts.timeout,
            )?)
        } else {
            None
        };
        Ok(GroupCoordinator {
            name,
            ranks,
            rank,
            rank_in_group,
            local_rank,
            host_backend,
            device_backend,
            timeout: opts.timeout,
            host: Mutex::new(Some(HostStaged::new(host))),
            device: Mutex::new(device),
            mq,
        })
    }

    /// A one-member group that needs no store (every op is the identity).
    pub fn single(rank: usize, local_rank: usize, name: impl Into<String>) -> Self {
        GroupCoordinator {
            name: name.into(),
            ranks: vec![rank],
            rank,
            rank_in_group: 0,
            local_rank,
            host_backend: Backend::Single,
            device_backend: None,
            timeout: comm_core::default_timeout(),
            host: Mutex::new(Some(HostStaged::new(Box::new(
                comm_core::SingleRankCommunicator::new(),
            )))),
            device: Mutex::new(None),
            mq: None,
        }
    }

    /// The group's unique name (e.g. `tp:0`).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Global ranks of the members, in group-rank order.
    pub fn ranks(&self) -> &[usize] {
        &self.ranks
    }
    /// This process's global rank.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// This process's rank inside the group.
    pub fn rank_in_group(&self) -> usize {
        self.rank_in_group
    }
    /// Number of members.
    pub fn world_size(&self) -> usize {
        self.ranks.len()
    }
    /// This process's local rank (on its host).
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }
    /// Global rank of group rank 0.
    pub fn first_rank(&self) -> usize {
        self.ranks[0]
    }
    /// Global rank of the last member.
    pub fn last_rank(&self) -> usize {
        self.ranks[self.ranks.len() - 1]
    }
    /// True on group rank 0.
    pub fn is_first_rank(&self) -> bool {
        self.rank_in_group == 0
    }
    /// True on the last member.
    pub fn is_last_rank(&self) -> bool {
        self.rank_in_group + 1 == self.ranks.len()
    }
    /// Global rank of the next member (wrapping).
    pub fn next_rank(&self) -> usize {
        self.ranks[(self.rank_in_group + 1) % self.ranks.len()]
    }
    /// Global rank of the previous member (wrapping).
    pub fn prev_rank(&self) -> usize {
        let n = self.ranks.len();
        self.ranks[(self.rank_in_group + n - 1) % n]
    }
    /// The host-plane backend.
    pub fn host_backend(&self) -> Backend {
        self.host_backend
    }
    /// The device-plane backend, when one was built.
    pub fn device_backend(&self) -> Option<Backend> {
        self.device_backend
    }
    /// The per-operation deadline.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
    /// True when `broadcast_object` from rank 0 goes through the message queue.
    pub fn uses_message_queue(&self) -> bool {
        self.mq.is_some()
    }

    fn destroyed(&self) -> CommError {
        CommError::State(format!("group `{}` was destroyed", self.name))
    }

    /// Adds the group's name and global ranks to errors raised below it.
    fn ctx(&self, e: CommError) -> CommError {
        match e {
            CommError::Timeout {
                operation,
                waited,
                missing,
            } => CommError::Timeout {
                operation: format!(
                    "{operation}{} (global ranks {:?})",
                    self.unless_named(&operation),
                    self.ranks
                ),
                waited,
                missing: missing
                    .into_iter()
                    .map(|m| self.with_global_rank(m))
                    .collect(),
            },
            CommError::PeerLost {
                rank,
                operation,
                detail,
            } => CommError::PeerLost {
                rank,
                operation: format!(
                    "{operation}{} (group rank {rank} = global rank {})",
                    self.unless_named(&operation),
                    self.ranks.get(rank).copied().unwrap_or(rank)
                ),
                detail,
            },
            other => other,
        }
    }

    /// ` in group NAME`, unless the backend's text already names the group.
    fn unless_named(&self, operation: &str) -> String {
        if operation.contains(&format!("`{}`", self.name)) {
            String::new()
        } else {
            format!(" in group `{}`", self.name)
        }
    }

    /// `rank N ...` (group-local, as backends write it) gains `= global rank G`.
    fn with_global_rank(&self, m: String) -> String {
        let local = m.strip_prefix("rank ").unwrap_or(&m);
        let digits: String = local.chars().take_while(char::is_ascii_digit).collect();
        match digits.parse::<usize>().ok().and_then(|r| self.ranks.get(r)) {
            Some(g) => format!("group {m} (global rank {g})"),
            None => m,
        }
    }

    fn host_guard(&self) -> Result<MutexGuard<'_, Option<HostComm>>> {
        self.host.lock().map_err(poisoned)
    }

    /// Runs `f` on the plane that moves tensors on `device`.
    fn with_plane<R>(
        &self,
        device: Device,
        f: impl FnOnce(&mut dyn DeviceCommunicator) -> Result<R>,
    ) -> Result<R> {
        if device.is_cuda() {
            let mut g = self.device.lock().map_err(poisoned)?;
            if let Some(c) = g.as_mut() {
                return f(c.as_mut()).map_err(|e| self.ctx(e));
            }
        }
        let mut g = self.host_guard()?;
        let c = g.as_mut().ok_or_else(|| self.destroyed())?;
        f(c).map_err(|e| self.ctx(e))
    }

    fn with_host<R>(&self, f: impl FnOnce(&mut dyn DeviceCommunicator) -> Result<R>) -> Result<R> {
        self.with_plane(Device::Cpu, f)
    }

    fn check_member(&self, what: &str, r: usize) -> Result<()> {
        if r >= self.world_size() {
            return Err(CommError::invalid(format!(
                "{what}: group rank {r} is out of range for group `{}` of size {}",
                self.name,
                self.world_size()
            )));
        }
        Ok(())
    }

    fn check_peer(&self, what: &str, r: usize) -> Result<()> {
        self.check_member(what, r)?;
        if r == self.rank_in_group {
            return Err(CommError::invalid(format!(
                "{what}: group rank {r} is this process itself (group `{}`); a rank cannot {what} to or from itself",
                self.name
            )));
        }
        Ok(())
    }

    // ---------------------------------------------------------------- tensors

    /// In-place all-reduce. A one-member group leaves the tensor unchanged.
    pub fn all_reduce(&self, tensor: &mut Tensor, op: ReduceOp) -> Result<()> {
        if self.world_size() == 1 {
            return Ok(());
        }
        self.with_plane(tensor.device(), |c| c.all_reduce(tensor, op))
    }

    /// Concatenation of every member's `input` along `dim` (negative counts
    /// from the end), in group-rank order.
    pub fn all_gather(&self, input: &Tensor, dim: isize) -> Result<Tensor> {
        let d = layout::normalize_dim(dim, input.ndim())?;
        let w = self.world_size();
        if w == 1 {
            return input.try_clone();
        }
        let mut flat = input.zeros_with_shape([w * input.numel()])?;
        self.with_plane(input.device(), |c| c.all_gather(input, &mut flat))?;
        interleave_blocks(flat, input.shape(), d, w)
    }

    /// Like [`all_gather`](Self::all_gather) but only `dst` gets the result;
    /// every other member gets `None`.
    pub fn gather(&self, input: &Tensor, dst: usize, dim: isize) -> Result<Option<Tensor>> {
        self.check_member("gather", dst)?;
        let d = layout::normalize_dim(dim, input.ndim())?;
        let w = self.world_size();
        if w == 1 {
            return input.try_clone().map(Some);
        }
        if self.rank_in_group == dst {
            let mut flat = input.zeros_with_shape([w * input.numel()])?;
            self.with_plane(input.device(), |c| c.gather(input, Some(&mut flat), dst))?;
            interleave_blocks(flat, input.shape(), d, w).map(Some)
        } else {
            self.with_plane(input.device(), |c| c.gather(input, None, dst))?;
            Ok(None)
        }
    }

    /// Reduces `input` over the group and returns this member's block of it
    /// along `dim` (whose size must divide by the group size).
    pub fn reduce_scatter(&self, input: &Tensor, dim: isize, op: ReduceOp) -> Result<Tensor> {
        let d = layout::normalize_dim(dim, input.ndim())?;
        let w = self.world_size();
        if w == 1 {
            return input.try_clone();
        }
        let size = input.shape()[d];
        if size % w != 0 {
            return Err(CommError::shape(
                "reduce_scatter",
                format!("dim {d} divisible by the group size {w}"),
                format!("size {size}"),
            ));
        }
        let (pre, post) = split_dims(input.shape(), d);
        // [pre, w, size/w, post] -> [w, pre, size/w, post]: rank blocks contiguous.
        let send = view_permute(input, &[pre, w, size / w, post], &[1, 0, 2, 3])?;
        let mut out_shape = input.shape().to_vec();
        out_shape[d] = size / w;
        let mut out = input.zeros_with_shape(out_shape)?;
        self.with_plane(input.device(), |c| c.reduce_scatter(&send, &mut out, op))?;
        Ok(out)
    }

    /// `tensor` on every member becomes group rank `src`'s.
    pub fn broadcast(&self, tensor: &mut Tensor, src: usize) -> Result<()> {
        self.check_member("broadcast", src)?;
        if self.world_size() == 1 {
            return Ok(());
        }
        self.with_plane(tensor.device(), |c| c.broadcast(tensor, src))
    }

    /// Sends `tensor` to group rank `dst` (default: the next rank).
    pub fn send(&self, tensor: &Tensor, dst: Option<usize>) -> Result<()> {
        let dst = dst.unwrap_or((self.rank_in_group + 1) % self.world_size());
        self.check_peer("send", dst)?;
        self.with_plane(tensor.device(), |c| c.send(tensor, dst))
    }

    /// Receives a host tensor of `shape` and `dtype` from group rank `src`
    /// (default: the previous rank).
    pub fn recv(&self, shape: &[usize], dtype: DType, src: Option<usize>) -> Result<Tensor> {
        let mut t = Tensor::try_zeros(shape.to_vec(), dtype)?;
        self.recv_into(&mut t, src)?;
        Ok(t)
    }

    /// Receives into `tensor` (host or device) from group rank `src`
    /// (default: the previous rank).
    pub fn recv_into(&self, tensor: &mut Tensor, src: Option<usize>) -> Result<()> {
        let w = self.world_size();
        let src = src.unwrap_or((self.rank_in_group + w - 1) % w);
        self.check_peer("recv", src)?;
        self.with_plane(tensor.device(), |c| c.recv(tensor, src))
    }

    /// Returns once every member has entered the barrier (host plane).
    pub fn barrier(&self) -> Result<()> {
        if self.world_size() == 1 {
            return Ok(());
        }
        self.with_host(|c| c.barrier())
    }

    // ---------------------------------------------------------- all_to_all_4D

    /// Ulysses all-to-all over a 4-D `[B, S, H, D]` tensor.
    ///
    /// - `(2, 1)`: `[B, S/P, H, D]` -> `[B, S, H/P, D]`; member `r` gets the full
    ///   sequence (group-rank order) and heads `[r*H/P, (r+1)*H/P)`.
    /// - `(1, 2)`: the exact inverse.
    ///
    /// Any other pair is an error, as are `H % P != 0` (mode 2,1) and
    /// `S % P != 0` (mode 1,2). Pure data movement: bit-exact.
    pub fn all_to_all_4d(
        &self,
        x: &Tensor,
        scatter_dim: usize,
        gather_dim: usize,
    ) -> Result<Tensor> {
        let p = self.world_size();
        let [b, s, h, dd] = shape4(x)?;
        let mode = a2a_mode(scatter_dim, gather_dim)?;
        if p == 1 {
            return x.try_clone();
        }
        match mode {
            A2aMode::SeqToHead => {
                if h % p != 0 {
                    return Err(CommError::shape(
                        "all_to_all_4D(2,1)",
                        format!("a head count divisible by the group size {p}"),
                        format!("{h} heads (use all_to_all_4d_uneven)"),
                    ));
                }
                let hp = h / p;
                // [B, S/P, P, H/P, D] -> [P, B, S/P, H/P, D]: block j goes to rank j.
                let send = view_permute(x, &[b, s, p, hp, dd], &[2, 0, 1, 3, 4])?;
                let mut recv = x.zeros_with_shape([p, b, s, hp, dd])?;
                self.with_plane(x.device(), |c| c.all_to_all(&send, &mut recv))?;
                // [P(src), B, S/P, H/P, D] -> [B, P, S/P, H/P, D] = [B, S, H/P, D].
                view_permute(&recv, &[p, b, s, hp, dd], &[1, 0, 2, 3, 4])?.reshape([
                    b,
                    p * s,
                    hp,
                    dd,
                ])
            }
            A2aMode::HeadToSeq => {
                if s % p != 0 {
                    return Err(CommError::shape(
                        "all_to_all_4D(1,2)",
                        format!("a sequence length divisible by the group size {p}"),
                        format!("{s} (use all_to_all_4d_uneven)"),
                    ));
                }
                let sp = s / p;
                // [B, P, S/P, H/P, D] -> [P, B, S/P, H/P, D]: sequence block j to rank j.
                let send = view_permute(x, &[b, p, sp, h, dd], &[1, 0, 2, 3, 4])?;
                let mut recv = x.zeros_with_shape([p, b, sp, h, dd])?;
                self.with_plane(x.device(), |c| c.all_to_all(&send, &mut recv))?;
                // [P(head block), B, S/P, H/P, D] -> [B, S/P, P, H/P, D] = [B, S/P, H, D].
                view_permute(&recv, &[p, b, sp, h, dd], &[1, 2, 0, 3, 4])?.reshape([
                    b,
                    sp,
                    p * h,
                    dd,
                ])
            }
        }
    }

    /// [`all_to_all_4d`](Self::all_to_all_4d) for sequence lengths and head
    /// counts that do not divide by the group size.
    ///
    /// - `(2, 1)`: member `r` holds `[B, S_r, H, D]` (any `S_r`, same `H`);
    ///   it receives `[B, sum(S), h_r, D]` where heads are split as evenly as
    ///   possible, the first `H % P` members taking one extra head.
    /// - `(1, 2)`: member `r` holds `[B, S, h_r, D]`; it receives
    ///   `[B, s_r, sum(h), D]` where `seq_splits` gives each member's share of
    ///   `S` (default: as even as possible, the first `S % P` taking one more).
    ///   `(1, 2)` with the splits of a `(2, 1)` call is its exact inverse.
    pub fn all_to_all_4d_uneven(
        &self,
        x: &Tensor,
        scatter_dim: usize,
        gather_dim: usize,
        seq_splits: Option<&[usize]>,
    ) -> Result<Tensor> {
        let p = self.world_size();
        let [b, s, h, dd] = shape4(x)?;
        let mode = a2a_mode(scatter_dim, gather_dim)?;
        if p == 1 {
            return x.try_clone();
        }
        // Everyone's (seq, heads): one tiny all-gather, so shapes need not be known in advance.
        let mine = Tensor::from_vec1(vec![s as i64, h as i64]);
        let mut all = Tensor::zeros([2 * p], DType::I64);
        self.with_host(|c| c.all_gather(&mine, &mut all))?;
        let all = all.to_vec::<i64>()?;
        let seqs: Vec<usize> = (0..p).map(|i| all[2 * i] as usize).collect();
        let heads: Vec<usize> = (0..p).map(|i| all[2 * i + 1] as usize).collect();
        let r = self.rank_in_group;
        let (send_splits, send_dim, keep): (Vec<usize>, usize, Vec<usize>) = match mode {
            A2aMode::SeqToHead => {
                if heads.iter().any(|&x| x != h) {
                    return Err(CommError::shape(
                        "all_to_all_4d_uneven(2,1)",
                        "the same head count on every member",
                        format!("{heads:?}"),
                    ));
                }
                (even_splits(h, p), 2usize, seqs.clone())
            }
            A2aMode::HeadToSeq => {
                if seqs.iter().any(|&x| x != s) {
                    return Err(CommError::shape(
                        "all_to_all_4d_uneven(1,2)",
                        "the same sequence length on every member",
                        format!("{seqs:?}"),
                    ));
                }
                let splits = match seq_splits {
                    Some(v) if v.len() == p && v.iter().sum::<usize>() == s => v.to_vec(),
                    Some(v) => {
                        return Err(CommError::invalid(format!(
                        "seq_splits {v:?} must have {p} entries summing to the sequence length {s}"
                    )))
                    }
                    None => even_splits(s, p),
                };
                (splits, 1usize, heads.clone())
            }
        };
        // Pad every block to the largest one so the exchange has equal splits.
        let (smax, hmax) = match mode {
            A2aMode::SeqToHead => (
                *seqs.iter().max().unwrap_or(&0),
                *send_splits.iter().max().unwrap_or(&0),
            ),
            A2aMode::HeadToSeq => (
                *send_splits.iter().max().unwrap_or(&0),
                *heads.iter().max().unwrap_or(&0),
            ),
        };
        let send = on_host(x, |t| {
            let mut blocks = Vec::with_capacity(p);
            let mut off = 0;
            for &n in &send_splits {
                let blk = layout::narrow(t, send_dim as isize, off, n)?;
                off += n;
                let blk = layout::pad(&blk, 1, smax - blk.shape()[1])?;
                let blk = layout::pad(&blk, 2, hmax - blk.shape()[2])?;
                blocks.push(blk.reshape([1, b, smax, hmax, dd])?);
            }
            layout::cat(&blocks.iter().collect::<Vec<_>>(), 0)
        })?;
        let mut recv = x.zeros_with_shape([p, b, smax, hmax, dd])?;
        self.with_plane(x.device(), |c| c.all_to_all(&send, &mut recv))?;
        on_host(&recv, |t| {
            let mut parts = Vec::with_capacity(p);
            for (i, &k) in keep.iter().enumerate() {
                let blk = layout::narrow(t, 0, i, 1)?.reshape([b, smax, hmax, dd])?;
                // Trim the padding: the sender's real extent on one dim, ours on the other.
                let (sn, hn, cat_dim) = match mode {
                    A2aMode::SeqToHead => (k, send_splits[r], 1),
                    A2aMode::HeadToSeq => (send_splits[r], k, 2),
                };
                let blk = layout::narrow(&blk, 1, 0, sn)?;
                let blk = layout::narrow(&blk, 2, 0, hn)?;
                parts.push((blk, cat_dim));
            }
            let dim = parts.first().map(|(_, d)| *d).unwrap_or(1);
            layout::cat(&parts.iter().map(|(t, _)| t).collect::<Vec<_>>(), dim)
        })
    }

    // ------------------------------------------------------------ sequences

    /// Pads `input` along `dim` to a multiple of the group size with zeros at
    /// the end and returns this member's block plus the original length.
    pub fn shard(&self, input: &Tensor, dim: isize) -> Result<(Tensor, usize)> {
        let d = layout::normalize_dim(dim, input.ndim())?;
        let p = self.world_size();
        let len = input.shape()[d];
        let (padded, pad) = dist_utils::compute_padding_for_sp(len, p);
        let per = padded / p;
        let r = self.rank_in_group;
        let out = on_host(input, |t| {
            let t = layout::pad(t, d as isize, pad)?;
            layout::narrow(&t, d as isize, r * per, per)
        })?;
        Ok((out, len))
    }

    /// All-gathers shards made by [`shard`](Self::shard) and trims the
    /// padding back to `original_len`.
    pub fn all_gather_with_unpad(
        &self,
        input: &Tensor,
        dim: isize,
        original_len: usize,
    ) -> Result<Tensor> {
        let d = layout::normalize_dim(dim, input.ndim())?;
        let g = self.all_gather(input, dim)?;
        if original_len > g.shape()[d] {
            return Err(CommError::invalid(format!(
                "all_gather_with_unpad: original length {original_len} exceeds the gathered length {}",
                g.shape()[d]
            )));
        }
        let extra = g.shape()[d] - original_len;
        on_host(&g, |t| layout::unpad(t, d as isize, extra))
    }

    // -------------------------------------------------------------- objects

    /// Broadcasts a serde value from group rank `src` (`obj` is read only there).
    pub fn broadcast_object<T: Serialize + DeserializeOwned>(
        &self,
        obj: Option<&T>,
        src: usize,
    ) -> Result<T> {
        let bytes = self.broadcast_encoded("broadcast_object", obj, src)?;
        dist_utils::codec::decode(&bytes)
    }

    /// Broadcasts a list of serde values from group rank `src`.
    pub fn broadcast_object_list<T: Serialize + DeserializeOwned>(
        &self,
        list: Option<&[T]>,
        src: usize,
    ) -> Result<Vec<T>> {
        let bytes = self.broadcast_encoded("broadcast_object_list", list.as_ref(), src)?;
        dist_utils::codec::decode(&bytes)
    }

    fn broadcast_encoded<T: Serialize + ?Sized>(
        &self,
        what: &str,
        obj: Option<&T>,
        src: usize,
    ) -> Result<Vec<u8>> {
        self.check_member(what, src)?;
        if self.rank_in_group != src {
            return self.broadcast_bytes(None, src);
        }
        let obj = obj.ok_or_else(|| {
            CommError::invalid(format!("{what}: the source rank must pass a value"))
        })?;
        let bytes = dist_utils::codec::encode(obj)?;
        if self.world_size() > 1 {
            self.broadcast_bytes(Some(&bytes), src)?;
        }
        Ok(bytes)
    }

    fn broadcast_bytes(&self, bytes: Option<&[u8]>, src: usize) -> Result<Vec<u8>> {
        if let (Some(mq), 0) = (&self.mq, src) {
            return mq.broadcast(bytes).map_err(|e| self.ctx(e));
        }
        let mut len = Tensor::from_vec1(vec![bytes.map_or(0, |b| b.len()) as i64]);
        self.with_host(|c| c.broadcast(&mut len, src))?;
        let n = len.to_vec::<i64>()?[0];
        let n = usize::try_from(n)
            .map_err(|_| CommError::Protocol(format!("negative object length {n}")))?;
        let mut buf = match bytes {
            Some(b) => Tensor::from_slice(b, [b.len()])?,
            None => Tensor::try_zeros([n], DType::U8)?,
        };
        if n > 0 {
            self.with_host(|c| c.broadcast(&mut buf, src))?;
        }
        Ok(buf.as_slice::<u8>()?.to_vec())
    }

    /// Sends a serde value to group rank `dst`. Sending to oneself is an error.
    pub fn send_object<T: Serialize>(&self, obj: &T, dst: usize) -> Result<()> {
        self.check_peer("send_object", dst)?;
        let bytes = dist_utils::codec::encode(obj)?;
        let len = Tensor::from_vec1(vec![bytes.len() as i64]);
        self.with_host(|c| c.send(&len, dst))?;
        if !bytes.is_empty() {
            let t = Tensor::from_slice(&bytes, [bytes.len()])?;
            self.with_host(|c| c.send(&t, dst))?;
        }
        Ok(())
    }

    /// Receives a serde value from group rank `src`.
    pub fn recv_object<T: DeserializeOwned>(&self, src: usize) -> Result<T> {
        self.check_peer("recv_object", src)?;
        let mut len = Tensor::zeros([1], DType::I64);
        self.with_host(|c| c.recv(&mut len, src))?;
        let n = len.to_vec::<i64>()?[0];
        let n = usize::try_from(n)
            .map_err(|_| CommError::Protocol(format!("negative object length {n}")))?;
        let mut t = Tensor::try_zeros([n], DType::U8)?;
        if n > 0 {
            self.with_host(|c| c.recv(&mut t, src))?;
        }
        dist_utils::codec::decode(t.as_slice::<u8>()?)
    }

    // ---------------------------------------------------------- tensor dicts

    /// Broadcasts an ordered dict of tensors and plain values from group rank
    /// `src`: the metadata (keys, plain values, tensor device/dtype/shape)
    /// first over the host plane, then each non-empty tensor in order over the
    /// plane matching its device. Receivers allocate and fill.
    ///
    /// The source passes its dict by value and gets it back unchanged, so no
    /// tensor is copied on the source.
    pub fn broadcast_tensor_dict(
        &self,
        dict: Option<TensorDict>,
        src: usize,
    ) -> Result<TensorDict> {
        self.check_member("broadcast_tensor_dict", src)?;
        if self.rank_in_group == src {
            let mut dict = dict.ok_or_else(|| {
                CommError::invalid("broadcast_tensor_dict: the source rank must pass a dict")
            })?;
            if self.world_size() > 1 {
                self.broadcast_encoded("broadcast_tensor_dict", Some(&dict.metadata()), src)?;
                for (_, v) in dict.entries_mut().iter_mut() {
                    if let Value::Tensor(t) = v {
                        if t.numel() > 0 {
                            self.broadcast(t, src)?;
                        }
                    }
                }
            }
            return Ok(dict);
        }
        let meta: Vec<(String, MetaValue)> =
            dist_utils::codec::decode(&self.broadcast_bytes(None, src)?)?;
        let mut out = TensorDict::new();
        for (k, m) in meta {
            let v = match m {
                MetaValue::Tensor(tm) => {
                    let mut t = self.alloc(&tm)?;
                    if t.numel() > 0 {
                        self.broadcast(&mut t, src)?;
                    }
                    Value::Tensor(t)
                }
                other => meta_plain(other),
            };
            out.insert(k, v);
        }
        Ok(out)
    }

    /// Sends a dict to group rank `dst` (default: next rank). With an
    /// `all_gather_group` of size G > 1, a tensor whose element count divides
    /// by G travels as slice `all_gather_group.rank_in_group()` of its
    /// flattened data, and the receiver all-gathers it over its own
    /// all-gather group (which must mirror the sender's).
    pub fn send_tensor_dict(
        &self,
        dict: &TensorDict,
        dst: Option<usize>,
        all_gather_group: Option<&GroupCoordinator>,
    ) -> Result<()> {
        let dst = dst.unwrap_or((self.rank_in_group + 1) % self.world_size());
        self.check_peer("send_tensor_dict", dst)?;
        self.send_object(&dict.metadata(), dst)?;
        for (_, v) in dict.iter() {
            if let Value::Tensor(t) = v {
                if t.numel() == 0 {
                    continue;
                }
                match slice_plan(t.numel(), all_gather_group) {
                    Some((g, r)) => {
                        let n = t.numel() / g;
                        let es = t.dtype().size();
                        let part = on_host(t, |h| {
                            Tensor::from_bytes(
                                &h.as_bytes()?[r * n * es..(r + 1) * n * es],
                                [n],
                                h.dtype(),
                            )
                        })?;
                        self.send(&part, Some(dst))?;
                    }
                    None => self.send(t, Some(dst))?,
                }
            }
        }
        Ok(())
    }

    /// Receives a dict sent by [`send_tensor_dict`](Self::send_tensor_dict)
    /// from group rank `src` (default: previous rank).
    pub fn recv_tensor_dict(
        &self,
        src: Option<usize>,
        all_gather_group: Option<&GroupCoordinator>,
    ) -> Result<TensorDict> {
        let w = self.world_size();
        let src = src.unwrap_or((self.rank_in_group + w - 1) % w);
        self.check_peer("recv_tensor_dict", src)?;
        let meta: Vec<(String, MetaValue)> = self.recv_object(src)?;
        let mut out = TensorDict::new();
        for (k, m) in meta {
            let v = match m {
                MetaValue::Tensor(tm) => {
                    let mut t = self.alloc(&tm)?;
                    if t.numel() > 0 {
                        match slice_plan(t.numel(), all_gather_group) {
                            Some((g, _)) => {
                                let mut part = t.zeros_with_shape([t.numel() / g])?;
                                self.recv_into(&mut part, Some(src))?;
                                let ag = all_gather_group.ok_or_else(|| {
                                    CommError::State("all-gather group vanished".into())
                                })?;
                                let full = ag.all_gather(&part, 0)?;
                                t = full.reshape(tm.shape.clone())?;
                            }
                            None => self.recv_into(&mut t, Some(src))?,
                        }
                    }
                    Value::Tensor(t)
                }
                other => meta_plain(other),
            };
            out.insert(k, v);
        }
        Ok(out)
    }

    /// Allocates a zeroed tensor for incoming metadata on the right device.
    fn alloc(&self, meta: &comm_core::TensorMetadata) -> Result<Tensor> {
        match meta.device {
            Device::Cpu => Tensor::try_zeros(meta.shape.clone(), meta.dtype),
            Device::Cuda(_) => crate::device::alloc_cuda(meta),
        }
    }

    // ------------------------------------------------------------ lifecycle

    /// A graph-capture context: on CUDA it carries the side stream that
    /// captured collectives run on; on CPU it does nothing.
    pub fn graph_capture(&self) -> Result<crate::device::GraphCaptureContext> {
        crate::device::GraphCaptureContext::new(self.local_rank, self.device_backend)
    }

    /// Releases the group's communicators; later calls return a clear error.
    pub fn destroy(&self) {
        if let Ok(mut g) = self.device.lock() {
            g.take();
        }
        if let Ok(mut g) = self.host.lock() {
            g.take();
        }
    }
}

fn meta_plain(m: MetaValue) -> Value {
    match m {
        MetaValue::Int(i) => Value::Int(i),
        MetaValue::Float(f) => Value::Float(f),
        MetaValue::Bool(b) => Value::Bool(b),
        MetaValue::Str(s) => Value::Str(s),
        MetaValue::Bytes(b) => Value::Bytes(b),
        MetaValue::None | MetaValue::Tensor(_) => Value::None,
    }
}

/// `(G, rank in the all-gather group)` when a tensor of `numel` elements
/// travels sliced, else `None`.
fn slice_plan(numel: usize, ag: Option<&GroupCoordinator>) -> Option<(usize, usize)> {
    let ag = ag?;
    let g = ag.world_size();
    (g > 1 && numel % g == 0).then_some((g, ag.rank_in_group()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum A2aMode {
    /// (scatter 2, gather 1): sequence-sharded in, head-sharded out.
    SeqToHead,
    /// (scatter 1, gather 2): the inverse.
    HeadToSeq,
}

fn a2a_mode(scatter_dim: usize, gather_dim: usize) -> Result<A2aMode> {
    match (scatter_dim, gather_dim) {
        (2, 1) => Ok(A2aMode::SeqToHead),
        (1, 2) => Ok(A2aMode::HeadToSeq),
        other => Err(CommError::invalid(format!(
            "all_to_all_4D supports (scatter_dim, gather_dim) = (2, 1) or (1, 2), got {other:?}"
        ))),
    }
}

fn shape4(x: &Tensor) -> Result<[usize; 4]> {
    match *x.shape() {
        [b, s, h, d] => Ok([b, s, h, d]),
        _ => Err(CommError::shape(
            "all_to_all_4D",
            "a 4-D [B, S, H, D] tensor",
            format!("shape {:?}", x.shape()),
        )),
    }
}

/// `n` split into `p` parts as evenly as possible, the first `n % p` one larger.
pub(crate) fn even_splits(n: usize, p: usize) -> Vec<usize> {
    (0..p).map(|i| n / p + usize::from(i < n % p)).collect()
}

/// Products of the dims before and after `d`.
fn split_dims(shape: &[usize], d: usize) -> (usize, usize) {
    (shape[..d].iter().product(), shape[d + 1..].iter().product())
}

/// Runs a host layout function on `t`, staging device tensors through host
/// memory and returning a tensor on `t`'s device.
fn on_host(t: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    if t.is_host() {
        return f(t);
    }
    let h = f(&t.to_host()?)?;
    let mut out = t.zeros_with_shape(h.shape().to_vec())?;
    out.copy_from(&h)?;
    Ok(out)
}

/// Turns `w` gathered blocks of `shape` (flat, rank-major) into their
/// concatenation along `d`.
fn interleave_blocks(flat: Tensor, shape: &[usize], d: usize, w: usize) -> Result<Tensor> {
    let (pre, post) = split_dims(shape, d);
    let size = shape[d];
    let mut out_shape = shape.to_vec();
    out_shape[d] = size * w;
    if pre == 1 {
        // Rank-major is already the concatenation along the leading dims.
        return flat.reshape(out_shape);
    }
    view_permute(&flat, &[w, pre, size, post], &[1, 0, 2, 3])?.reshape(out_shape)
}

/// `t.view(view).permute(perm).contiguous()` on `t`'s device: the host copy
/// for host tensors, comm-nccl's device kernel for CUDA tensors when built
/// with `nccl`, else staged through host memory.
fn view_permute(t: &Tensor, view: &[usize], perm: &[usize]) -> Result<Tensor> {
    if t.is_host() {
        return layout::permute_view(t, view, perm);
    }
    #[cfg(feature = "nccl")]
    {
        comm_nccl::layout::permute(t, view, perm)
    }
    #[cfg(not(feature = "nccl"))]
    {
        on_host(t, |h| layout::permute_view(h, view, perm))
    }
}
