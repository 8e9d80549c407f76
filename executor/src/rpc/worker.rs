//! The worker side: [`Worker`] joins the executor, reports READY (or the
//! initialisation error), then serves typed calls until shut down.

use std::collections::VecDeque;
use std::fmt;
use std::io::Write;
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use comm_core::{CommError, Result};
use rustix::net::RecvFlags;

use super::method::Methods;
use super::wire::{self, Down, FrameReader, Outcome, RecvError, Up, LEN_BYTES, MAX_FRAME};

/// Environment variable naming a local worker's control file descriptor.
pub const EXECUTOR_FD_ENV: &str = "DIST_EXECUTOR_FD";

/// Set once the control connection was taken in this process.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// Frames up to this size are written with one `write` (header and value
/// copied together); larger ones as header, then value, without a copy.
const COALESCE: usize = 64 * 1024;

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
        match std::env::var(EXECUTOR_FD_ENV) {
            Ok(v) => Self::local(&v),
            Err(_) => Self::remote(),
        }
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
        Ok(Self::with_link(
            Link::Unix(UnixStream::from(owned)),
            rank,
            world_size,
            false,
        ))
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
        }
    }

    /// The next request frame: polls the socket for up to the spin budget,
    /// then sleeps in `recv`.
    fn next_frame(&mut self) -> Result<Vec<u8>> {
        let start = Instant::now();
        let mut got = Vec::new();
        loop {
            if let Some(f) = self.frames.pop_front() {
                return Ok(f);
            }
            let flags = if !self.spin.is_zero() && start.elapsed() < self.spin {
                RecvFlags::DONTWAIT
            } else {
                RecvFlags::empty()
            };
            match self.reader.recv(self.link.as_fd(), flags, &mut got) {
                Ok(0) => {
                    return Err(CommError::State(format!(
                        "rank {}: the executor went away (its connection ended)",
                        self.rank
                    )))
                }
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
        // TODO(phase 2): local workers read requests from the host's one
        // comm_shm::MessageQueue instead of their socket; replies stay here.
        loop {
            let body = self.next_frame()?;
            let (header, args) = wire::decode_down(&body)?;
            match header {
                Down::Shutdown => return Ok(()),
                Down::Call {
                    id,
                    method,
                    reply_rank,
                } => {
                    let mine = reply_rank.is_none_or(|r| r as usize == self.rank);
                    out.clear();
                    let res = methods.call(state, &method, args, mine.then_some(&mut out));
                    let outcome = match &res {
                        Ok(()) if mine => Outcome::Value,
                        Ok(()) => Outcome::Ack,
                        Err(f) => Outcome::Failed {
                            kind: f.kind,
                            message: f.message.as_str().into(),
                        },
                    };
                    let value = if matches!(outcome, Outcome::Value) {
                        &out[..]
                    } else {
                        &[]
                    };
                    self.send(&Up::Reply { id, outcome }, value)?;
                    self.reader.recycle(body);
                }
                other => {
                    return Err(CommError::Protocol(format!(
                        "unexpected message from the executor: {other:?}"
                    )))
                }
            }
        }
    }
}
