//! The executor's I/O: one epoll set over every worker connection (Unix
//! socket pairs to local workers, authenticated TCP to remote ones), the
//! local workers' exits ([`ExitWatch`], nested), a kick eventfd that
//! lets another thread take the engine over, and the local workers' reply
//! queues in shared memory with their [`Doorbell`] (see `local.rs`).
//!
//! Everything is non-blocking: requests are queued per connection and
//! flushed as sockets accept them while replies keep being read, so a
//! large request and a large reply in flight at once cannot deadlock.
//! Events come out in the order the kernel reported them, so the first
//! worker to die is the one named.

use std::collections::VecDeque;
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use comm_core::{CommError, Result};
use comm_shm::MessageQueue;
use rustix::event::epoll;

use rustix::net::RecvFlags;

use super::local::Doorbell;
use super::wire::{FrameReader, RecvError};
use crate::reap::{ExitInfo, ExitWatch};

const TOKEN_KICK: u64 = u64::MAX;
const TOKEN_EXITS: u64 = u64::MAX - 1;
const TOKEN_DOORBELL: u64 = u64::MAX - 2;
/// While polling shared-memory replies, how often the epoll set (sockets,
/// exits, kicks) is polled too.
const EPOLL_EVERY: Duration = Duration::from_micros(5);

/// A connection to one worker.
#[derive(Debug)]
pub(crate) enum Stream {
    /// A local worker's socket pair end.
    Unix(UnixStream),
    /// A remote worker's TCP connection.
    Tcp(TcpStream),
}

impl Stream {
    fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_nonblocking(on),
            Stream::Tcp(s) => s.set_nonblocking(on),
        }
    }
    fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Unix(s) => s.as_fd(),
            Stream::Tcp(s) => s.as_fd(),
        }
    }
}

/// What the engine saw, in the order it happened.
#[derive(Debug)]
pub(crate) enum Event {
    /// A complete frame body from worker `w`.
    Frame(usize, Vec<u8>),
    /// Worker `w`'s connection ended (end of stream, error, bad frame).
    Closed(usize, String),
    /// Local worker `w`'s process exited (see [`Engine::exit_of`]).
    Exited(usize),
    /// Another thread asked for the engine.
    Kicked,
}

struct Chunk {
    data: Arc<Vec<u8>>,
    off: usize,
}

struct Conn {
    stream: Stream,
    reader: FrameReader,
    out: VecDeque<Chunk>,
    out_armed: bool,
}

/// Wakes a thread blocked in [`Engine::poll`] so that it hands the engine
/// over.
#[derive(Debug, Clone)]
pub(crate) struct Kicker(Arc<OwnedFd>);

impl Kicker {
    pub(crate) fn kick(&self) {
        // The counter saturates long after anyone could care; EAGAIN is fine.
        let _ = rustix::io::write(&*self.0, &1u64.to_ne_bytes());
    }
}

/// See the module docs.
pub(crate) struct Engine {
    epoll: OwnedFd,
    kick: Arc<OwnedFd>,
    conns: Vec<Option<Conn>>,
    exits: ExitWatch,
    /// Exit-watch token to worker index.
    exit_owner: Vec<usize>,
    /// Worker index to exit-watch token.
    exit_token: Vec<Option<usize>>,
    /// How long [`Engine::poll`] polls before it sleeps.
    spin: Duration,
    /// Without a polling budget: how long it yields the CPU, looking at
    /// the reply queues between yields, before it sleeps.
    yield_for: Duration,
    /// Exits reaped by [`Engine::await_exit`] on behalf of other workers,
    /// reported by the next [`Engine::poll`].
    deferred: Vec<usize>,
    /// Rung by local workers that replied while the executor slept.
    doorbell: Option<Arc<Doorbell>>,
    /// The local workers' reply queues, by worker (`None` once failed).
    replies: Vec<(usize, Option<MessageQueue>)>,
    /// Deadline of reading one reply that streams through its ring.
    reply_timeout: Duration,
    /// When the epoll set was last looked at.
    last_epoll: Option<Instant>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("workers", &self.conns.len())
            .finish_non_exhaustive()
    }
}

fn io_err(what: &str, e: rustix::io::Errno) -> CommError {
    CommError::io(what.to_string(), std::io::Error::from(e))
}

impl Engine {
    /// An engine for `workers` workers, none connected yet, polling up to
    /// `spin` before sleeping.
    pub(crate) fn new(workers: usize, spin: Duration) -> Result<Self> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)
            .map_err(|e| io_err("creating the executor's epoll set", e))?;
        let kick = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )
        .map_err(|e| io_err("creating the executor's eventfd", e))?;
        epoll::add(
            &epoll,
            &kick,
            epoll::EventData::new_u64(TOKEN_KICK),
            epoll::EventFlags::IN,
        )
        .map_err(|e| io_err("watching the executor's eventfd", e))?;
        let exits = ExitWatch::new()?;
        epoll::add(
            &epoll,
            &exits,
            epoll::EventData::new_u64(TOKEN_EXITS),
            epoll::EventFlags::IN,
        )
        .map_err(|e| io_err("watching worker exits", e))?;
        Ok(Engine {
            epoll,
            kick: Arc::new(kick),
            conns: (0..workers).map(|_| None).collect(),
            exits,
            exit_owner: Vec::new(),
            exit_token: vec![None; workers],
            spin,
            yield_for: std::env::var("DIST_EXECUTOR_YIELD_US")
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .map_or(Duration::from_micros(200), Duration::from_micros),
            deferred: Vec::new(),
            doorbell: None,
            replies: Vec::new(),
            reply_timeout: comm_core::default_timeout(),
            last_epoll: None,
        })
    }

    /// Watches `doorbell` (rung by local workers whose replies arrive in
    /// shared memory while this engine sleeps).
    pub(crate) fn set_doorbell(&mut self, doorbell: Arc<Doorbell>) -> Result<()> {
        epoll::add(
            &self.epoll,
            doorbell.event(),
            epoll::EventData::new_u64(TOKEN_DOORBELL),
            epoll::EventFlags::IN,
        )
        .map_err(|e| io_err("watching the executor's doorbell", e))?;
        self.doorbell = Some(doorbell);
        Ok(())
    }

    /// From now on the replies of these local workers come from their
    /// queues; reading one that streams through its ring may take up to
    /// `timeout` (a dead writer is noticed sooner).
    pub(crate) fn attach_replies(&mut self, queues: Vec<(usize, MessageQueue)>, timeout: Duration) {
        self.replies = queues.into_iter().map(|(w, q)| (w, Some(q))).collect();
        self.reply_timeout = timeout;
    }

    /// Closes the reply queues (shutdown).
    pub(crate) fn detach_replies(&mut self) {
        self.replies.clear();
    }

    /// Takes every complete reply waiting in the local reply queues; true
    /// when something happened. A queue that fails (its writer died in the
    /// middle of a reply) is dropped and reported as `Closed`.
    fn take_replies(&mut self, events: &mut Vec<Event>) -> bool {
        let mut got = false;
        for (w, slot) in self.replies.iter_mut() {
            let mut failed = None;
            if let Some(q) = slot.as_mut() {
                while q.has_pending() {
                    let mut body = Vec::new();
                    match q.dequeue_into(&mut body, self.reply_timeout) {
                        Ok(()) => events.push(Event::Frame(*w, body)),
                        Err(e) => {
                            failed = Some(format!("its reply queue failed: {e}"));
                            break;
                        }
                    }
                    got = true;
                }
            }
            if let Some(why) = failed {
                *slot = None;
                events.push(Event::Closed(*w, why));
                got = true;
            }
        }
        got
    }

    /// A handle that interrupts [`Engine::poll`].
    pub(crate) fn kicker(&self) -> Kicker {
        Kicker(self.kick.clone())
    }

    /// Connects worker `w` through `stream`, accepting frames up to `max`.
    pub(crate) fn add_conn(&mut self, w: usize, stream: Stream, max: usize) -> Result<()> {
        stream
            .set_nonblocking(true)
            .map_err(|e| CommError::io("making a worker connection non-blocking", e))?;
        epoll::add(
            &self.epoll,
            &stream,
            epoll::EventData::new_u64(w as u64),
            epoll::EventFlags::IN | epoll::EventFlags::RDHUP,
        )
        .map_err(|e| io_err("watching a worker connection", e))?;
        self.conns[w] = Some(Conn {
            stream,
            reader: FrameReader::new(max),
            out: VecDeque::new(),
            out_armed: false,
        });
        Ok(())
    }

    /// Watches local worker `w`'s process.
    pub(crate) fn watch_exit(&mut self, w: usize, pid: u32) -> Result<()> {
        let token = self.exits.add(pid)?;
        debug_assert_eq!(token, self.exit_owner.len());
        self.exit_owner.push(w);
        self.exit_token[w] = Some(token);
        Ok(())
    }

    /// How local worker `w` exited, once it has.
    pub(crate) fn exit_of(&self, w: usize) -> Option<ExitInfo> {
        self.exit_token[w].and_then(|t| self.exits.exit_of(t))
    }

    /// True for a local worker (one whose process this engine watches).
    pub(crate) fn is_local(&self, w: usize) -> bool {
        self.exit_token[w].is_some()
    }

    /// True while worker `w`'s connection is open.
    pub(crate) fn connected(&self, w: usize) -> bool {
        self.conns[w].is_some()
    }

    /// True when every local worker has exited and every connection is closed.
    pub(crate) fn all_gone(&self) -> bool {
        self.exits.all_reaped() && self.conns.iter().all(Option::is_none)
    }

    /// True while some request bytes wait to be written.
    pub(crate) fn pending_out(&self) -> bool {
        self.conns.iter().flatten().any(|c| !c.out.is_empty())
    }

    /// Waits up to `max` for local worker `w` to exit (its connection just
    /// closed, and the exit follows within microseconds).
    pub(crate) fn await_exit(&mut self, w: usize, max: Duration) -> Option<ExitInfo> {
        let t = self.exit_token[w]?;
        let deadline = Instant::now() + max;
        while self.exits.exit_of(t).is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match self.exits.wait(Some(left)) {
                Ok(reaped) => self
                    .deferred
                    .extend(reaped.into_iter().map(|(token, _)| self.exit_owner[token])),
                Err(_) => break,
            }
        }
        self.exits.exit_of(t)
    }

    /// Closes worker `w`'s connection (queued output is dropped).
    pub(crate) fn close(&mut self, w: usize) {
        if let Some(c) = self.conns[w].take() {
            let _ = epoll::delete(&self.epoll, &c.stream);
            c.stream.shutdown();
        }
    }

    /// Queues `data` (a whole frame) for worker `w` and writes as much as
    /// the socket takes now. A broken connection becomes a `Closed` event.
    pub(crate) fn send(&mut self, w: usize, data: &Arc<Vec<u8>>, events: &mut Vec<Event>) {
        let Some(c) = self.conns[w].as_mut() else {
            return;
        };
        c.out.push_back(Chunk {
            data: data.clone(),
            off: 0,
        });
        if c.out.len() == 1 {
            self.flush(w, events);
        }
    }

    fn flush(&mut self, w: usize, events: &mut Vec<Event>) {
        let Some(c) = self.conns[w].as_mut() else {
            return;
        };
        let mut broken = None;
        while let Some(front) = c.out.front_mut() {
            let rest = &front.data[front.off..];
            // MSG_NOSIGNAL: a dead peer is an EPIPE here, never a SIGPIPE
            // for the whole process.
            match rustix::net::send(&c.stream, rest, rustix::net::SendFlags::NOSIGNAL) {
                Ok(n) => {
                    front.off += n;
                    if front.off == front.data.len() {
                        c.out.pop_front();
                    }
                }
                Err(rustix::io::Errno::AGAIN) => break,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    broken = Some(format!("sending a request failed: {e}"));
                    break;
                }
            }
        }
        if let Some(why) = broken {
            self.close(w);
            events.push(Event::Closed(w, why));
            return;
        }
        let want = !c.out.is_empty();
        if want != c.out_armed {
            let mut flags = epoll::EventFlags::IN | epoll::EventFlags::RDHUP;
            if want {
                flags |= epoll::EventFlags::OUT;
            }
            if epoll::modify(
                &self.epoll,
                &c.stream,
                epoll::EventData::new_u64(w as u64),
                flags,
            )
            .is_ok()
            {
                c.out_armed = want;
            }
        }
    }

    /// Reads everything worker `w`'s socket has now.
    fn read_conn(&mut self, w: usize, events: &mut Vec<Event>) {
        let mut frames = Vec::new();
        let mut ended: Option<String> = None;
        {
            let Some(c) = self.conns[w].as_mut() else {
                return;
            };
            loop {
                match c
                    .reader
                    .recv(c.stream.as_fd(), RecvFlags::DONTWAIT, &mut frames)
                {
                    Ok(0) => {
                        ended = Some(if c.reader.idle() {
                            "its connection closed".into()
                        } else {
                            "its connection closed in the middle of a message".into()
                        });
                        break;
                    }
                    // A short read emptied the socket: saves the `recv`
                    // that would say so (epoll is level-triggered and
                    // reports the socket again if more has come).
                    Ok(_) if c.reader.last_short() => break,
                    Ok(_) => {}
                    Err(RecvError::Os(rustix::io::Errno::AGAIN)) => break,
                    Err(RecvError::Os(rustix::io::Errno::INTR)) => {}
                    Err(RecvError::Os(e)) => {
                        ended = Some(format!("its connection failed: {e}"));
                        break;
                    }
                    Err(RecvError::Frame(e)) => {
                        ended = Some(format!("it sent a malformed frame: {e}"));
                        break;
                    }
                }
            }
        }
        events.extend(frames.into_iter().map(|f| Event::Frame(w, f)));
        if let Some(why) = ended {
            self.close(w);
            events.push(Event::Closed(w, why));
        }
    }

    fn epoll_wait(&mut self, timeout: Duration, ready: &mut Vec<epoll::Event>) -> Result<()> {
        let ts = rustix::time::Timespec::try_from(timeout).unwrap_or(rustix::time::Timespec {
            tv_sec: i32::MAX as i64,
            tv_nsec: 0,
        });
        ready.clear();
        let res = epoll::wait(
            &self.epoll,
            rustix::buffer::spare_capacity(ready),
            Some(&ts),
        );
        self.last_epoll = Some(Instant::now());
        match res {
            Ok(_) | Err(rustix::io::Errno::INTR) => Ok(()),
            Err(e) => Err(io_err("waiting for workers", e)),
        }
    }

    /// Waits up to `timeout` for something to happen and appends what
    /// happened to `events`, in order. Returns at once when something is
    /// ready; an empty result means the time ran out.
    pub(crate) fn poll(&mut self, timeout: Duration, events: &mut Vec<Event>) -> Result<()> {
        let mut timeout = if self.deferred.is_empty() {
            timeout
        } else {
            events.extend(self.deferred.drain(..).map(Event::Exited));
            Duration::ZERO
        };
        if self.take_replies(events) {
            timeout = Duration::ZERO;
        }
        let mut ready: Vec<epoll::Event> = Vec::with_capacity(self.conns.len() + 3);
        // Poll without sleeping for a while first (when the host has cores
        // to spare): a reply that arrives within microseconds then costs no
        // wake-up.
        if !self.spin.is_zero() && !timeout.is_zero() {
            let start = Instant::now();
            let budget = self.spin.min(timeout);
            let mut got = false;
            let mut last_epoll: Option<Instant> = None;
            loop {
                got = got || self.take_replies(events);
                // The reply queues are plain memory reads; the epoll set
                // (a system call) is looked at every few microseconds.
                if self.replies.is_empty() || last_epoll.is_none_or(|t| t.elapsed() >= EPOLL_EVERY)
                {
                    self.epoll_wait(Duration::ZERO, &mut ready)?;
                    last_epoll = self.last_epoll;
                }
                if got || !ready.is_empty() || start.elapsed() >= budget {
                    break;
                }
                std::hint::spin_loop();
            }
            timeout = if ready.is_empty() && !got {
                timeout.saturating_sub(start.elapsed())
            } else {
                Duration::ZERO
            };
        }
        // On a host without cores to spare, give the CPU to the workers for
        // a moment instead of sleeping at once: replies from shared memory
        // that arrive meanwhile cost neither a doorbell nor a wake-up.
        if ready.is_empty() && self.spin.is_zero() && !timeout.is_zero() && !self.replies.is_empty()
        {
            let start = Instant::now();
            let budget = self.yield_for.min(timeout);
            let mut got = false;
            while !budget.is_zero() {
                rustix::thread::sched_yield();
                got = self.take_replies(events);
                // As while polling: the epoll set (a system call) only
                // every EPOLL_EVERY, the reply queues after every yield.
                if self.last_epoll.is_none_or(|t| t.elapsed() >= EPOLL_EVERY) {
                    self.epoll_wait(Duration::ZERO, &mut ready)?;
                }
                if got || !ready.is_empty() || start.elapsed() >= budget {
                    break;
                }
            }
            timeout = if ready.is_empty() && !got {
                timeout.saturating_sub(start.elapsed())
            } else {
                Duration::ZERO
            };
        }
        // A look that must not wait, just after another: the epoll set (a
        // system call) is looked at again only every EPOLL_EVERY, as while
        // polling, so a round trip whose replies come from the queues
        // takes no system call at all.
        let just_looked = timeout.is_zero()
            && !self.replies.is_empty()
            && self.last_epoll.is_some_and(|t| t.elapsed() < EPOLL_EVERY);
        if ready.is_empty() && !just_looked {
            // About to sleep: tell the local workers to ring, then look at
            // their queues once more (a reply published before they could
            // see the flag is found here; one after it rings).
            let sleeping = !timeout.is_zero() && !self.replies.is_empty();
            let bell = self.doorbell.clone().filter(|_| sleeping);
            if let Some(b) = &bell {
                b.sleep_begin();
                if self.take_replies(events) {
                    timeout = Duration::ZERO;
                }
            }
            let res = self.epoll_wait(timeout, &mut ready);
            if let Some(b) = &bell {
                b.sleep_end();
            }
            res?;
        }
        for ev in ready {
            match ev.data.u64() {
                TOKEN_KICK => {
                    let mut b = [0u8; 8];
                    let _ = rustix::io::read(&*self.kick, &mut b);
                    events.push(Event::Kicked);
                }
                TOKEN_DOORBELL => {
                    if let Some(b) = &self.doorbell {
                        b.drain();
                    }
                    self.take_replies(events);
                }
                TOKEN_EXITS => {
                    // A worker's last reply comes before its exit.
                    self.take_replies(events);
                    for (token, _) in self.exits.wait(Some(Duration::ZERO))? {
                        events.push(Event::Exited(self.exit_owner[token]));
                    }
                }
                w => {
                    let w = w as usize;
                    let flags = ev.flags;
                    if flags.contains(epoll::EventFlags::OUT) {
                        self.flush(w, events);
                    }
                    if flags.intersects(
                        epoll::EventFlags::IN
                            | epoll::EventFlags::HUP
                            | epoll::EventFlags::RDHUP
                            | epoll::EventFlags::ERR,
                    ) {
                        self.read_conn(w, events);
                    }
                }
            }
        }
        Ok(())
    }
}
