//! The worker side: [`Worker`] joins the executor, gets its
//! initialisation value, reports READY (or the initialisation error), then
//! serves typed calls until shut down: from its socket, or (a local worker
//! once attached) from the host's request queue, replying through its own
//! queue.

use std::collections::VecDeque;
use std::fmt;
use std::io::Write;
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use comm_core::{CommError, Result};
use comm_shm::MessageQueue;
use rustix::net::RecvFlags;
use serde::de::DeserializeOwned;

use super::local::{self, Doorbell};
use super::method::{Decoded, Failure, Methods};
use super::wire::{self, Down, FrameReader, Outcome, RecvError, Up, LEN_BYTES, MAX_FRAME};

/// Environment variable naming a local worker's control file descriptor.
pub const EXECUTOR_FD_ENV: &str = "DIST_EXECUTOR_FD";

/// Set once the control connection was taken in this process.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// Frames up to this size are written with one `write` (header and value
/// copied together); larger ones as header, then value, without a copy.
const COALESCE: usize = 64 * 1024;
/// Room left in front of an encoded result for its reply header (an `Up`
/// tag, a varint call id and the outcome tag take at most 12 bytes), so a
/// reply goes into its queue as one piece without copying the result.
const HEAD_ROOM: usize = 16;
/// How long one wait for the next request lasts before it is renewed (a
/// dead executor is noticed sooner, by the queue's liveness checks).
const IDLE_WAIT: Duration = Duration::from_secs(3600);

/// A local worker's shared-memory queues, once attached.
#[derive(Debug)]
struct Queues {
    requests: MessageQueue,
    replies: MessageQueue,
    /// How long a reply may wait for room in its ring.
    reply_timeout: Duration,
}

#[derive(Debug)]
enum Link {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl AsFd for Link {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Link::Unix(s) => s.as_fd(),
            Link::Tcp(s) => s.as_fd(),
        }
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Link::Unix(s) => s.write(buf),
            Link::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The worker end of an [`Executor`](crate::Executor).
///
/// A worker started by the executor on its own host finds its control
/// socket through `DIST_EXECUTOR_FD`; a worker started by `distrun` on
/// another host (`--nnodes K --node-rank I`, same `--master-addr`,
/// `--master-port` and `DIST_JOB_SECRET` as the executor's node) finds the
/// executor through the job's rendezvous store and authenticates with the
/// job secret. Either way [`Worker::from_env`] is all a worker program
/// calls:
///
/// ```no_run
/// use executor::{Method, Methods, Worker};
/// const ADD: Method<u64, u64> = Method::new("add");
/// fn main() -> comm_core::Result<()> {
///     let worker = Worker::from_env()?;
///     let rank = worker.rank() as u64;
///     let mut methods = Methods::new();
///     methods.on(&ADD, move |_: &mut (), x: u64| Ok::<_, String>(x + rank));
///     // Builds the state once (here: nothing), reports READY, serves.
///     worker.run(|_| Ok::<_, String>(()), &mut methods)
/// }
/// ```
#[derive(Debug)]
pub struct Worker {
    link: Link,
    rank: usize,
    world_size: usize,
    remote: bool,
    ready_sent: bool,
    reader: FrameReader,
    frames: VecDeque<Vec<u8>>,
    /// How long to poll for the next request before sleeping.
    spin: Duration,
    /// The executor's initialisation value (postcard bytes).
    init: Vec<u8>,
    /// The local executor's doorbell (shared-memory replies).
    doorbell: Option<Doorbell>,
    /// Requests and replies in shared memory, once attached.
    queues: Option<Queues>,
}

impl Worker {
    /// Joins the executor that started this process (see the type docs).
    /// Works once per process; fails when the process was not started by
    /// an executor (or by `distrun` as part of an executor's job).
    pub fn from_env() -> Result<Worker> {
        if TAKEN.swap(true, Ordering::SeqCst) {
            return Err(CommError::State(
                "Worker::from_env was already called in this process".into(),
            ));
        }
        let res = Self::connect();
        if res.is_err() {
            TAKEN.store(false, Ordering::SeqCst);
        }
        res
    }

    fn connect() -> Result<Worker> {
        let mut w = match std::env::var(EXECUTOR_FD_ENV) {
            Ok(v) => Self::local(&v)?,
            Err(_) => Self::remote()?,
        };
        // The executor's first message: the initialisation value.
        let body = w.next_socket_frame()?.ok_or_else(|| {
            CommError::State(format!(
                "rank {}: the executor went away before sending its initialisation",
                w.rank
            ))
        })?;
        match wire::decode_down(&body)? {
            (Down::Init, value) => w.init = value.to_vec(),
            (other, _) => {
                return Err(CommError::Protocol(format!(
                    "rank {}: expected the executor's initialisation, got {other:?}",
                    w.rank
                )))
            }
        }
        Ok(w)
    }

    fn local(fd_text: &str) -> Result<Worker> {
        let fd: i32 = fd_text.trim().parse().map_err(|_| {
            CommError::invalid(format!(
                "{EXECUTOR_FD_ENV}=`{fd_text}` is not a descriptor number"
            ))
        })?;
        let number = |var: &str| -> Result<usize> {
            std::env::var(var)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| {
                    CommError::invalid(format!(
                        "{var} is not set to a number: a local worker gets it from the executor"
                    ))
                })
        };
        let (rank, world_size) = (number("RANK")?, number("WORLD_SIZE")?);
        // SAFETY: F_GETFD only queries the descriptor's flags.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            return Err(CommError::io(
                format!("{EXECUTOR_FD_ENV}={fd} is not an open descriptor"),
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: the executor placed its socket at `fd` for this process; it
        // is open (checked above) and, guarded by TAKEN, owned only here.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // Programs this worker starts must not inherit the control socket
        // (they would keep it open after the worker died).
        rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC)
            .map_err(|e| CommError::io("setting close-on-exec", e.into()))?;
        let mut w = Self::with_link(Link::Unix(UnixStream::from(owned)), rank, world_size, false);
        w.doorbell = Doorbell::from_env()?;
        Ok(w)
    }

    fn remote() -> Result<Worker> {
        let not_ours = |why: String| {
            CommError::State(format!(
                "{EXECUTOR_FD_ENV} is not set and {why}: this process was not started by \
                 executor::Executor, nor by distrun as part of an executor's job"
            ))
        };
        let info = dist_utils::RankInfo::from_env().map_err(|e| not_ours(e.to_string()))?;
        if info.master_addr.is_none() || info.master_port.is_none() {
            return Err(not_ours("MASTER_ADDR/MASTER_PORT are not set".into()));
        }
        let secret = info.job_secret.clone().ok_or_else(|| {
            CommError::invalid(
                "a remote worker needs DIST_JOB_SECRET: give every node's distrun the same value",
            )
        })?;
        let timeout = comm_core::default_timeout();
        let store = dist_utils::init_store("env://", &info, timeout)?;
        let s = super::remote::join(store.as_ref(), &secret, info.rank, info.world_size, timeout)?;
        Ok(Self::with_link(
            Link::Tcp(s),
            info.rank,
            info.world_size,
            true,
        ))
    }

    fn with_link(link: Link, rank: usize, world_size: usize, remote: bool) -> Worker {
        let on_host = std::env::var("LOCAL_WORLD_SIZE")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(1);
        Worker {
            link,
            rank,
            world_size,
            remote,
            ready_sent: false,
            reader: FrameReader::new(MAX_FRAME),
            frames: VecDeque::new(),
            spin: super::spin_budget(on_host + 1),
            init: Vec::new(),
            doorbell: None,
            queues: None,
        }
    }

    /// The next request: from the request queue once attached (decoded
    /// where it lies in the ring), else from the socket. `None`: the
    /// executor closed the queue (shut down) or the connection.
    fn next_request<S>(
        &mut self,
        state: &mut S,
        methods: &mut Methods<S>,
    ) -> Result<Option<Request>> {
        let Some(q) = self.queues.as_mut() else {
            let Some(body) = self.next_socket_frame()? else {
                return Ok(None);
            };
            let req = Request::parse(&body, state, methods);
            self.reader.recycle(body);
            return req.map(Some);
        };
        loop {
            match q
                .requests
                .dequeue_with(IDLE_WAIT, |body| Request::parse(body, state, methods))
            {
                Ok(req) => return req.map(Some),
                Err(CommError::Timeout { .. }) => continue,
                // Closed by the executor's shutdown, after every request
                // before it was read.
                Err(CommError::Aborted(_)) => return Ok(None),
                Err(e) => {
                    return Err(CommError::State(format!(
                        "rank {}: the executor went away: {e}",
                        self.rank
                    )))
                }
            }
        }
    }

    /// The next frame from the socket: polls for up to the spin budget,
    /// then sleeps in `recv`. `None`: end of stream.
    fn next_socket_frame(&mut self) -> Result<Option<Vec<u8>>> {
        let start = Instant::now();
        let mut got = Vec::new();
        loop {
            if let Some(f) = self.frames.pop_front() {
                return Ok(Some(f));
            }
            let flags = if !self.spin.is_zero() && start.elapsed() < self.spin {
                RecvFlags::DONTWAIT
            } else {
                RecvFlags::empty()
            };
            match self.reader.recv(self.link.as_fd(), flags, &mut got) {
                Ok(0) => return Ok(None),
                Ok(_) => self.frames.extend(got.drain(..)),
                Err(RecvError::Os(rustix::io::Errno::AGAIN)) => std::hint::spin_loop(),
                Err(RecvError::Os(rustix::io::Errno::INTR)) => {}
                Err(RecvError::Os(e)) => {
                    return Err(CommError::io(
                        format!("rank {}: receiving from the executor", self.rank),
                        e.into(),
                    ))
                }
                Err(RecvError::Frame(e)) => return Err(e),
            }
        }
    }

    /// This worker's global rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of workers in the job.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// True when this worker reached the executor over TCP (another host).
    pub fn is_remote(&self) -> bool {
        self.remote
    }

    /// The value the executor was started with
    /// ([`Executor::start_with`](crate::Executor::start_with); `()` for
    /// [`Executor::start`](crate::Executor::start)), decoded as `T`: what
    /// this worker sets itself up from.
    pub fn init_value<T: DeserializeOwned>(&self) -> Result<T> {
        dist_utils::codec::decode(&self.init).map_err(|e| {
            CommError::Codec(format!(
                "rank {}: the executor's initialisation value is not a `{}` ({e}); do the driver \
                 and the worker agree on its type?",
                self.rank,
                std::any::type_name::<T>()
            ))
        })
    }

    /// Sets up the shared-memory queues the executor asked for.
    fn attach(
        &mut self,
        store: &str,
        prefix: &str,
        executor_rank: usize,
        reply_ring: usize,
        timeout: Duration,
    ) -> Result<()> {
        if self.doorbell.is_none() {
            return Err(CommError::Protocol(format!(
                "rank {}: the executor asked for shared-memory queues but gave no doorbell",
                self.rank
            )));
        }
        let secret_hex = std::env::var(crate::JOB_SECRET_ENV).map_err(|_| {
            CommError::invalid(format!(
                "rank {}: {} is not set (a local worker gets it from the executor)",
                self.rank,
                crate::JOB_SECRET_ENV
            ))
        })?;
        let secret = comm_core::auth::from_hex(crate::JOB_SECRET_ENV, secret_hex.trim())?;
        let job_id = comm_shm::default_job_id();
        let st = dist_utils::TcpStore::connect(store, &secret, timeout)?;
        let (requests, replies) = local::worker_side(
            &st,
            prefix,
            self.rank,
            executor_rank,
            reply_ring,
            &job_id,
            timeout,
        )?;
        self.queues = Some(Queues {
            requests,
            replies,
            reply_timeout: comm_core::default_timeout(),
        });
        Ok(())
    }

    /// Sends a reply whose result (if any) was encoded into `out` after
    /// [`HEAD_ROOM`] bytes: through the reply queue as one piece (ringing
    /// the doorbell), or on the socket.
    fn reply(&mut self, header: &Up<'_>, out: &mut [u8], with_value: bool) -> Result<()> {
        let value_len = if with_value { out.len() - HEAD_ROOM } else { 0 };
        let Some(q) = self.queues.as_mut() else {
            let value = if with_value {
                &out[HEAD_ROOM..]
            } else {
                &[][..]
            };
            return self.send(header, value);
        };
        // A reply larger than the free room streams: the executor is woken
        // each time a part of it is ready.
        let bell = self.doorbell.as_ref();
        let ring = || {
            if let Some(d) = bell {
                d.ring();
            }
        };
        let mut head = [0u8; HEAD_ROOM];
        let res = match postcard::to_slice(header, &mut head) {
            Ok(h) if with_value => {
                let n = h.len();
                let start = HEAD_ROOM - n;
                out[start..HEAD_ROOM].copy_from_slice(&head[..n]);
                q.replies
                    .enqueue_notify(&out[start..HEAD_ROOM + value_len], q.reply_timeout, &ring)
            }
            Ok(h) => q.replies.enqueue_notify(h, q.reply_timeout, &ring),
            // A header that does not fit the room (a failure's message).
            Err(_) => {
                let body = postcard::to_stdvec(header)
                    .map_err(|e| CommError::Codec(format!("encoding a reply header: {e}")))?;
                q.replies.enqueue_notify(&body, q.reply_timeout, &ring)
            }
        };
        res.map_err(|e| {
            CommError::State(format!(
                "rank {}: the executor went away (its reply queue failed: {e})",
                self.rank
            ))
        })?;
        ring();
        Ok(())
    }

    fn send(&mut self, header: &Up<'_>, value: &[u8]) -> Result<()> {
        let head = postcard::to_stdvec(header)
            .map_err(|e| CommError::Codec(format!("encoding a reply header: {e}")))?;
        let len = ((head.len() + value.len()) as u64).to_le_bytes();
        let res = if head.len() + value.len() <= COALESCE {
            let mut buf = Vec::with_capacity(LEN_BYTES + head.len() + value.len());
            buf.extend_from_slice(&len);
            buf.extend_from_slice(&head);
            buf.extend_from_slice(value);
            self.link.write_all(&buf)
        } else {
            let mut first = Vec::with_capacity(LEN_BYTES + head.len());
            first.extend_from_slice(&len);
            first.extend_from_slice(&head);
            self.link
                .write_all(&first)
                .and_then(|()| self.link.write_all(value))
        };
        res.map_err(|e| CommError::io("sending to the executor", e))
    }

    /// Tells the executor this worker initialised successfully (done by
    /// [`Worker::serve`] if not yet).
    pub fn ready(&mut self) -> Result<()> {
        if !self.ready_sent {
            self.send(&Up::Ready, &[])?;
            self.ready_sent = true;
        }
        Ok(())
    }

    /// Tells the executor initialisation failed, with a message it reports
    /// together with this worker's rank.
    pub fn init_failed(mut self, message: impl Into<String>) -> Result<()> {
        let m: String = message.into();
        self.send(&Up::InitError(m.as_str().into()), &[])
    }

    /// Builds the user state with `init` (once), reports READY, or the
    /// error (or panic) of `init`, and then serves calls like
    /// [`Worker::serve`].
    pub fn run<S, E: fmt::Display>(
        self,
        init: impl FnOnce(&Worker) -> std::result::Result<S, E>,
        methods: &mut Methods<S>,
    ) -> Result<()> {
        let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| init(&self)));
        let mut state = match built {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let msg = e.to_string();
                self.init_failed(msg.clone())?;
                return Err(CommError::State(format!(
                    "worker initialisation failed: {msg}"
                )));
            }
            Err(p) => {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into());
                self.init_failed(format!("initialisation panicked: {msg}"))?;
                return Err(CommError::State(format!(
                    "worker initialisation panicked: {msg}"
                )));
            }
        };
        self.serve(&mut state, methods)
    }

    /// Sends READY if not yet sent, then answers calls with `methods` on
    /// `state`, in the order they were submitted, until the executor asks
    /// to shut down (returns `Ok`, after every earlier call was answered)
    /// or goes away (returns the connection error). A handler error or
    /// panic is reported to the executor as that call's failure on this
    /// rank; the worker keeps serving.
    pub fn serve<S>(mut self, state: &mut S, methods: &mut Methods<S>) -> Result<()> {
        if !methods.duplicates().is_empty() {
            let msg = format!(
                "methods registered more than once: {}",
                methods.duplicates().join(", ")
            );
            self.init_failed(msg.clone())?;
            return Err(CommError::invalid(msg));
        }
        self.ready()?;
        let mut out = Vec::new();
        loop {
            let Some(req) = self.next_request(state, methods)? else {
                if self.queues.is_some() {
                    // The executor closed the request queue: shut down.
                    return Ok(());
                }
                return Err(CommError::State(format!(
                    "rank {}: the executor went away (its connection ended)",
                    self.rank
                )));
            };
            match req {
                Request::Shutdown => return Ok(()),
                Request::Call {
                    id,
                    reply_rank,
                    decoded,
                } => {
                    let mine = reply_rank.is_none_or(|r| r as usize == self.rank);
                    out.clear();
                    out.resize(HEAD_ROOM, 0);
                    let res = decoded.and_then(|d| methods.run(state, d, mine.then_some(&mut out)));
                    let outcome = match &res {
                        Ok(()) if mine => Outcome::Value,
                        Ok(()) => Outcome::Ack,
                        Err(f) => Outcome::Failed {
                            kind: f.kind,
                            message: f.message.as_str().into(),
                        },
                    };
                    let with_value = matches!(outcome, Outcome::Value);
                    self.reply(&Up::Reply { id, outcome }, &mut out, with_value)?;
                }
                Request::Attach {
                    store,
                    prefix,
                    executor_rank,
                    reply_ring,
                    timeout_ms,
                } if self.queues.is_none() && !self.remote => {
                    let attached = self.attach(
                        &store,
                        &prefix,
                        executor_rank as usize,
                        reply_ring as usize,
                        Duration::from_millis(timeout_ms),
                    );
                    if let Err(e) = attached {
                        let msg = format!("setting up the shared-memory queues: {e}");
                        let _ = self.send(&Up::InitError(msg.as_str().into()), &[]);
                        return Err(CommError::State(format!("rank {}: {msg}", self.rank)));
                    }
                }
                Request::Attach { .. } => {
                    return Err(CommError::Protocol(
                        "unexpected message from the executor: a second Attach, or one to a \
                         remote worker"
                            .into(),
                    ))
                }
            }
        }
    }
}

/// A request, parsed while its bytes are at hand (a call's argument
/// decoded into its handler's slot).
enum Request {
    Call {
        id: u64,
        reply_rank: Option<u32>,
        decoded: std::result::Result<Decoded, Failure>,
    },
    Shutdown,
    Attach {
        store: String,
        prefix: String,
        executor_rank: u32,
        reply_ring: u64,
        timeout_ms: u64,
    },
}

impl Request {
    fn parse<S>(body: &[u8], state: &mut S, methods: &mut Methods<S>) -> Result<Request> {
        let (header, args) = wire::decode_down(body)?;
        Ok(match header {
            Down::Shutdown => Request::Shutdown,
            Down::Call {
                id,
                method,
                reply_rank,
            } => Request::Call {
                id,
                reply_rank,
                decoded: methods.decode(state, &method, args),
            },
            Down::Attach {
                store,
                prefix,
                executor_rank,
                reply_ring,
                timeout_ms,
            } => Request::Attach {
                store: store.into_owned(),
                prefix: prefix.into_owned(),
                executor_rank,
                reply_ring,
                timeout_ms,
            },
            other => {
                return Err(CommError::Protocol(format!(
                    "unexpected message from the executor: {other:?}"
                )))
            }
        })
    }
}
