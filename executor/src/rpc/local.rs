//! The shared-memory path between the executor and the workers on its own
//! host: requests are written once into one comm-shm [`MessageQueue`] that
//! every local worker reads, and each local worker replies through its own
//! queue that the executor reads. The sockets stay for start-up (INIT,
//! READY, ERROR), for noticing a dead peer, and for remote workers.
//!
//! The executor waits in one `epoll` set (remote sockets, worker exits,
//! other threads), so a reply in shared memory must be able to wake it: the
//! [`Doorbell`] is a page shared with every local worker holding a
//! "sleeping" word, and an `eventfd` in that set. Before it sleeps the
//! executor sets the word and looks at the reply queues once more; a worker
//! that has published a reply rings the eventfd only when it sees the word
//! set (a Dekker pair of SeqCst fences: either the executor sees the reply
//! or the worker sees the word). While the executor polls (a host with
//! cores to spare) a round trip takes no system call at all.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::time::Duration;

use comm_core::{CommError, Result, Store};
use comm_shm::{MessageQueue, MqOptions};

/// Environment variable: the descriptors of a local worker's doorbell
/// (`page,eventfd`), set by the executor.
pub(crate) const DOORBELL_ENV: &str = "DIST_EXECUTOR_DOORBELL";
/// Descriptor numbers of the doorbell page and eventfd in a local worker.
pub(crate) const WORKER_DOORBELL_FDS: [RawFd; 2] = [4, 5];
/// Environment variable: `shm` (default) sends requests to local workers
/// through one shared-memory queue and takes their replies from
/// shared-memory queues; `socket` keeps every message on the workers'
/// sockets (where `/dev/shm` is too small or unavailable).
pub const QUEUE_ENV: &str = "DIST_EXECUTOR_QUEUE";
/// Environment variable: bytes of the request ring (default
/// [`DEFAULT_REQUEST_RING`]; a suffix `K`, `M`, `G` is understood). A
/// request that fits whole is encoded straight into it and decoded there
/// by every worker; a larger one is encoded aside and streams through it.
pub const REQUEST_RING_ENV: &str = "DIST_EXECUTOR_REQUEST_RING";
/// Environment variable: bytes of each local worker's reply ring (default
/// [`DEFAULT_REPLY_RING`]).
pub const REPLY_RING_ENV: &str = "DIST_EXECUTOR_REPLY_RING";
/// Default request ring: 32 MiB, so a 16 MiB request (a latent, a batch of
/// embeddings) is held whole and read in place. Segments are memfds by
/// default, bounded by memory only; where they are named
/// (`DIST_SHM_BACKING=named`) and `/dev/shm` has less than [`ROOMY_SHM`]
/// free (a container's default 64 MiB), the default is
/// [`SMALL_REQUEST_RING`] instead, so the queues still fit.
pub const DEFAULT_REQUEST_RING: usize = 32 << 20;
/// The default request ring on a small `/dev/shm` with named segments (see
/// [`DEFAULT_REQUEST_RING`]): a 16 MiB request then streams through it.
pub const SMALL_REQUEST_RING: usize = 16 << 20;
/// Free `/dev/shm` below which the default request ring is
/// [`SMALL_REQUEST_RING`]: 256 MiB.
pub const ROOMY_SHM: usize = 256 << 20;
/// Default reply ring of each local worker: 4 MiB.
pub const DEFAULT_REPLY_RING: usize = 4 << 20;
/// Bytes of the doorbell page.
const PAGE: usize = 4096;

/// How requests reach local workers and replies come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueueConfig {
    pub(crate) request_ring: usize,
    pub(crate) reply_ring: usize,
}

impl QueueConfig {
    /// From the variables `get` returns: `None` for
    /// `DIST_EXECUTOR_QUEUE=socket`.
    pub(crate) fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<QueueConfig>> {
        match get(QUEUE_ENV).as_deref().map(str::trim) {
            None | Some("") | Some("shm") => {}
            Some("socket") => return Ok(None),
            Some(other) => {
                return Err(CommError::invalid(format!(
                    "{QUEUE_ENV}=`{other}`: expected `shm` or `socket`"
                )))
            }
        }
        let size = |var: &str, default: usize| -> Result<usize> {
            match get(var) {
                Some(v) if !v.trim().is_empty() => {
                    let n = dist_utils::parse_size(var, v.trim())?;
                    usize::try_from(n)
                        .ok()
                        .filter(|&n| n >= 4096)
                        .ok_or_else(|| {
                            CommError::invalid(format!("{var}={v}: at least 4096 bytes"))
                        })
                }
                _ => Ok(default),
            }
        };
        Ok(Some(QueueConfig {
            request_ring: size(REQUEST_RING_ENV, default_request_ring())?,
            reply_ring: size(REPLY_RING_ENV, DEFAULT_REPLY_RING)?,
        }))
    }
}

/// [`DEFAULT_REQUEST_RING`], or [`SMALL_REQUEST_RING`] where segments are
/// named (`DIST_SHM_BACKING=named`) and `/dev/shm` has less than
/// [`ROOMY_SHM`] free.
fn default_request_ring() -> usize {
    if comm_shm::check_free_space(ROOMY_SHM).is_ok() {
        DEFAULT_REQUEST_RING
    } else {
        SMALL_REQUEST_RING
    }
}

/// Store key of the request queue.
pub(crate) fn request_key(prefix: &str) -> String {
    format!("{prefix}/requests")
}

/// Store key of worker `rank`'s reply queue.
pub(crate) fn reply_key(prefix: &str, rank: usize) -> String {
    format!("{prefix}/replies/{rank}")
}

fn options(name: &str, job_id: &str, timeout: Duration) -> MqOptions {
    MqOptions::default()
        .timeout(timeout)
        .job_id(job_id)
        .name(name)
        // A request or reply may be as large as a frame on the sockets.
        .max_message_bytes(super::wire::MAX_FRAME)
}

/// The executor's side: creates the request queue for `ranks` (returns once
/// every one of them opened it), then opens each worker's reply queue, in
/// the order the workers create them (see [`worker_side`]).
pub(crate) fn executor_side(
    store: &dyn Store,
    prefix: &str,
    ranks: &[usize],
    executor_rank: usize,
    request_ring: usize,
    job_id: &str,
    timeout: Duration,
) -> Result<(MessageQueue, Vec<(usize, MessageQueue)>)> {
    let requests = MessageQueue::create_writer(
        store,
        &request_key(prefix),
        executor_rank,
        ranks,
        request_ring,
        options("executor requests", job_id, timeout),
    )?;
    let mut replies = Vec::with_capacity(ranks.len());
    for &r in ranks {
        let q = MessageQueue::open_reader(
            store,
            &reply_key(prefix, r),
            executor_rank,
            options(&format!("replies of rank {r}"), job_id, timeout),
        )?;
        replies.push((r, q));
    }
    Ok((requests, replies))
}

/// A local worker's side: opens the request queue (returns once the
/// executor and every local worker have), then creates its reply queue
/// (returns once the executor opened it). Returns (requests, replies).
pub(crate) fn worker_side(
    store: &dyn Store,
    prefix: &str,
    rank: usize,
    executor_rank: usize,
    reply_ring: usize,
    job_id: &str,
    timeout: Duration,
) -> Result<(MessageQueue, MessageQueue)> {
    let requests = MessageQueue::open_reader(
        store,
        &request_key(prefix),
        rank,
        options("executor requests", job_id, timeout),
    )?;
    let replies = MessageQueue::create_writer(
        store,
        &reply_key(prefix, rank),
        rank,
        &[executor_rank],
        reply_ring,
        options(&format!("replies of rank {rank}"), job_id, timeout),
    )?;
    Ok((requests, replies))
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct Doorbell {
    page: memmap2::MmapMut,
    page_fd: OwnedFd,
    event: OwnedFd,
}

fn io_err(what: &str, e: rustix::io::Errno) -> CommError {
    CommError::io(what.to_string(), std::io::Error::from(e))
}

impl Doorbell {
    /// The executor's doorbell: a fresh page (memfd) and eventfd.
    pub(crate) fn new() -> Result<Doorbell> {
        let page_fd =
            rustix::fs::memfd_create("executor-doorbell", rustix::fs::MemfdFlags::CLOEXEC)
                .map_err(|e| io_err("creating the executor's doorbell page (memfd_create)", e))?;
        rustix::fs::ftruncate(&page_fd, PAGE as u64)
            .map_err(|e| io_err("sizing the executor's doorbell page", e))?;
        let event = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )
        .map_err(|e| io_err("creating the executor's doorbell eventfd", e))?;
        Self::map(page_fd, event)
    }

    /// A local worker's doorbell from the descriptors its executor placed
    /// (`DIST_EXECUTOR_DOORBELL=page,eventfd`); `None` when the variable is
    /// unset (an executor without shared-memory queues).
    pub(crate) fn from_env() -> Result<Option<Doorbell>> {
        let Ok(v) = std::env::var(DOORBELL_ENV) else {
            return Ok(None);
        };
        let fds: Vec<RawFd> = v
            .split(',')
            .map(|s| s.trim().parse::<RawFd>())
            .collect::<std::result::Result<_, _>>()
            .ok()
            .filter(|f: &Vec<RawFd>| f.len() == 2 && f[0] != f[1] && f.iter().all(|&d| d > 2))
            .ok_or_else(|| {
                CommError::invalid(format!(
                    "{DOORBELL_ENV}=`{v}` is not two descriptor numbers `page,eventfd`"
                ))
            })?;
        let mut owned = Vec::with_capacity(2);
        for fd in fds {
            // SAFETY: F_GETFD only queries the descriptor's flags.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
                return Err(CommError::io(
                    format!("{DOORBELL_ENV}: descriptor {fd} is not open"),
                    std::io::Error::last_os_error(),
                ));
            }
            // SAFETY: the executor placed these descriptors for this process
            // (checked open above); `Worker::from_env` runs once per process,
            // so they are owned only here.
            let o = unsafe { OwnedFd::from_raw_fd(fd) };
            // Programs this worker starts must not inherit them.
            rustix::io::fcntl_setfd(&o, rustix::io::FdFlags::CLOEXEC)
                .map_err(|e| io_err("setting close-on-exec", e))?;
            owned.push(o);
        }
        let event = owned
            .pop()
            .ok_or_else(|| CommError::State("doorbell fds".into()))?;
        let page_fd = owned
            .pop()
            .ok_or_else(|| CommError::State("doorbell fds".into()))?;
        let st = rustix::fs::fstat(&page_fd).map_err(|e| io_err("stat of the doorbell page", e))?;
        if u64::try_from(st.st_size).unwrap_or(0) < PAGE as u64 {
            return Err(CommError::Protocol(format!(
                "{DOORBELL_ENV}: descriptor {} is not the executor's doorbell page ({} bytes)",
                page_fd.as_raw_fd(),
                st.st_size
            )));
        }
        Self::map(page_fd, event).map(Some)
    }

    fn map(page_fd: OwnedFd, event: OwnedFd) -> Result<Doorbell> {
        let file = File::from(page_fd.try_clone().map_err(|e| {
            CommError::io("duplicating the doorbell page descriptor".to_string(), e)
        })?);
        // SAFETY: a memfd of at least PAGE bytes (sized by the executor,
        // checked by workers) that only the executor and its local workers
        // map; the one word in it is only accessed atomically.
        let page = unsafe { memmap2::MmapOptions::new().len(PAGE).map_mut(&file) }
            .map_err(|e| CommError::io("mapping the doorbell page".to_string(), e))?;
        Ok(Doorbell {
            page,
            page_fd,
            event,
        })
    }

    fn sleeping(&self) -> &AtomicU32 {
        // SAFETY: the mapping is page aligned, PAGE bytes long and lives as
        // long as `self`; the word is only accessed through this atomic, in
        // every process that maps the page.
        unsafe { &*(self.page.as_ptr() as *const AtomicU32) }
    }

    /// The descriptors a local worker inherits: (page, eventfd).
    pub(crate) fn fds(&self) -> (BorrowedFd<'_>, BorrowedFd<'_>) {
        (self.page_fd.as_fd(), self.event.as_fd())
    }

    /// The eventfd, for the executor's epoll set.
    pub(crate) fn event(&self) -> BorrowedFd<'_> {
        self.event.as_fd()
    }

    /// Executor: about to sleep; look at the reply queues once more after
    /// this (the fence pairs with the one in [`Doorbell::ring`]).
    pub(crate) fn sleep_begin(&self) {
        self.sleeping().store(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    /// Executor: awake again (workers stop ringing).
    pub(crate) fn sleep_end(&self) {
        self.sleeping().store(0, Ordering::Relaxed);
    }

    /// Executor: clears the eventfd after it woke the executor.
    pub(crate) fn drain(&self) {
        let mut b = [0u8; 8];
        let _ = rustix::io::read(&self.event, &mut b);
    }

    /// Worker: after publishing a reply, wakes the executor if it sleeps.
    pub(crate) fn ring(&self) {
        fence(Ordering::SeqCst);
        if self.sleeping().load(Ordering::Relaxed) != 0 {
            // The counter saturates long after anyone could care; EAGAIN
            // (already rung, unread) is fine.
            let _ = rustix::io::write(&self.event, &1u64.to_ne_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doorbell_rings_only_while_the_executor_sleeps() {
        let d = Doorbell::new().unwrap();
        // A second mapping of the same page, as a worker has.
        let (p, e) = d.fds();
        let w = Doorbell::map(
            p.try_clone_to_owned().unwrap(),
            e.try_clone_to_owned().unwrap(),
        )
        .unwrap();
        let pending = |d: &Doorbell| {
            let mut b = [0u8; 8];
            rustix::io::read(&d.event, &mut b).is_ok()
        };
        w.ring();
        assert!(!pending(&d), "rang while the executor was awake");
        d.sleep_begin();
        w.ring();
        d.sleep_end();
        assert!(pending(&d), "no ring while the executor slept");
        assert!(!pending(&d));
    }
}
