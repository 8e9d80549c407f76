//! Child exits in the order the kernel saw them.
//!
//! Polling `try_wait` over the children in a loop sees every exit that
//! happened within one polling interval at once, and then has to guess the
//! order (the launcher used to take the lowest rank, and so blamed a rank
//! that merely reacted to the one that was killed). Here each child gets a
//! pidfd (Linux 5.3+), registered in an epoll set: the kernel puts a pidfd on
//! the epoll ready list when the process exits, and `epoll_wait` returns
//! ready entries first-in first-out, so [`ExitWatch::wait`] yields exits in
//! true exit order however late the caller looks.
//!
//! Where `pidfd_open` is refused (old kernels, strict seccomp profiles) a
//! thread per child blocks in `waitid(WNOWAIT)` and writes one byte to a
//! socket registered in the same set; that keeps the order of the threads'
//! wake-ups, which is the best available there.
//!
//! The epoll descriptor itself is pollable ([`ExitWatch::as_fd`]), so an
//! event loop (the executor's) can nest it in its own set.

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use comm_core::{CommError, Result};
use rustix::event::epoll;
use rustix::process::{Pid, WaitId, WaitIdOptions};

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ExitInfo {
    /// Exit code; `128 + signal` for a signal death (as shells report it).
    pub code: i32,
    /// The signal that ended it, if any.
    pub signal: Option<i32>,
}

impl ExitInfo {
    /// Human wording: `exited with code 3`, `was killed by signal 9`.
    pub(crate) fn describe(&self) -> String {
        match self.signal {
            Some(s) => format!("was killed by signal {s} ({})", signal_name(s)),
            None => format!("exited with code {}", self.code),
        }
    }
}

/// `SIGKILL` for 9 and so on; the number for the rest.
pub(crate) fn signal_name(sig: i32) -> String {
    let name = match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        _ => return format!("signal {sig}"),
    };
    name.to_string()
}

enum Source {
    /// A pidfd: readable once the process has exited.
    PidFd(OwnedFd),
    /// The read end of a socket a waiter thread writes to on exit.
    Thread(UnixStream),
}

impl Source {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Source::PidFd(fd) => fd.as_fd(),
            Source::Thread(s) => s.as_fd(),
        }
    }
}

struct Watched {
    pid: Pid,
    source: Option<Source>,
    exit: Option<ExitInfo>,
}

/// A set of child processes whose exits are reported in order (module docs).
pub(crate) struct ExitWatch {
    epoll: OwnedFd,
    procs: Vec<Watched>,
}

impl std::fmt::Debug for ExitWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExitWatch")
            .field("children", &self.procs.len())
            .finish_non_exhaustive()
    }
}

fn io_err(what: &str, e: rustix::io::Errno) -> CommError {
    CommError::io(what.to_string(), std::io::Error::from(e))
}

impl ExitWatch {
    /// An empty set.
    pub(crate) fn new() -> Result<Self> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)
            .map_err(|e| io_err("creating an epoll set for child exits", e))?;
        Ok(ExitWatch {
            epoll,
            procs: Vec::new(),
        })
    }

    /// Watches child `pid` (a child of this process, not yet reaped);
    /// returns its token, the index in the order of `add` calls.
    pub(crate) fn add(&mut self, pid: u32) -> Result<usize> {
        let token = self.procs.len();
        let pid = Pid::from_raw(pid as i32)
            .ok_or_else(|| CommError::invalid(format!("not a process id: {pid}")))?;
        let source = match rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
            Ok(fd) => Source::PidFd(fd),
            Err(_) => Source::Thread(spawn_waiter(pid)?),
        };
        epoll::add(
            &self.epoll,
            source.fd(),
            epoll::EventData::new_u64(token as u64),
            epoll::EventFlags::IN,
        )
        .map_err(|e| io_err("watching a child process", e))?;
        self.procs.push(Watched {
            pid,
            source: Some(source),
            exit: None,
        });
        Ok(token)
    }

    /// The exit of child `token`, once reaped.
    pub(crate) fn exit_of(&self, token: usize) -> Option<ExitInfo> {
        self.procs.get(token).and_then(|p| p.exit)
    }

    /// True when every child has been reaped.
    pub(crate) fn all_reaped(&self) -> bool {
        self.procs.iter().all(|p| p.exit.is_some())
    }

    /// Waits up to `timeout` (`None`: until one exits; zero: only look) for
    /// children to exit, reaps them and returns them in the order they
    /// exited. An empty result means the time ran out (or a signal
    /// interrupted the wait).
    pub(crate) fn wait(&mut self, timeout: Option<Duration>) -> Result<Vec<(usize, ExitInfo)>> {
        if self.all_reaped() {
            return Ok(Vec::new());
        }
        let ts = timeout.map(|t| {
            rustix::time::Timespec::try_from(t).unwrap_or(rustix::time::Timespec {
                tv_sec: i32::MAX as i64,
                tv_nsec: 0,
            })
        });
        let mut events: Vec<epoll::Event> = Vec::with_capacity(self.procs.len().max(1));
        match epoll::wait(
            &self.epoll,
            rustix::buffer::spare_capacity(&mut events),
            ts.as_ref(),
        ) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => return Ok(Vec::new()),
            Err(e) => return Err(io_err("waiting for child processes", e)),
        }
        let mut out = Vec::with_capacity(events.len());
        for ev in events {
            let token = ev.data.u64() as usize;
            if let Some(info) = self.reap(token)? {
                out.push((token, info));
            }
        }
        Ok(out)
    }

    /// Reaps child `token` if it has exited; stops watching it then.
    fn reap(&mut self, token: usize) -> Result<Option<ExitInfo>> {
        let Some(p) = self.procs.get_mut(token) else {
            return Ok(None);
        };
        if p.exit.is_some() {
            return Ok(None);
        }
        let status = match rustix::process::waitid(
            WaitId::Pid(p.pid),
            WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
        ) {
            Ok(Some(st)) => st,
            // Not exited yet (a spurious wake-up): keep watching.
            Ok(None) => return Ok(None),
            // Reaped elsewhere in this process (someone called wait(-1)):
            // the status is lost, but the child is certainly gone.
            Err(rustix::io::Errno::CHILD) => {
                tracing::warn!(
                    "child process {} was reaped by other code in this process; its exit status is unknown",
                    p.pid.as_raw_nonzero()
                );
                let info = ExitInfo {
                    code: 255,
                    signal: None,
                };
                self.finish(token, info);
                return Ok(Some(info));
            }
            Err(e) => return Err(io_err("reaping a child process", e)),
        };
        let info = match (status.exit_status(), status.terminating_signal()) {
            (Some(c), _) => ExitInfo {
                code: c,
                signal: None,
            },
            (None, Some(s)) => ExitInfo {
                code: 128 + s,
                signal: Some(s),
            },
            // Stopped/continued are not asked for; treat anything else as a failure.
            (None, None) => ExitInfo {
                code: 1,
                signal: None,
            },
        };
        self.finish(token, info);
        Ok(Some(info))
    }

    fn finish(&mut self, token: usize, info: ExitInfo) {
        let p = &mut self.procs[token];
        p.exit = Some(info);
        if let Some(src) = p.source.take() {
            // An exited pidfd stays readable: stop watching it.
            let _ = epoll::delete(&self.epoll, src.fd());
        }
    }
}

impl AsFd for ExitWatch {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.epoll.as_fd()
    }
}

/// The fallback: a thread that blocks until `pid` has exited (without
/// reaping it) and then writes one byte to the returned socket's peer.
fn spawn_waiter(pid: Pid) -> Result<UnixStream> {
    let (ours, mut theirs) =
        UnixStream::pair().map_err(|e| CommError::io("creating a child-exit socket", e))?;
    std::thread::Builder::new()
        .name(format!("exit-wait-{}", pid.as_raw_nonzero()))
        .spawn(move || {
            // EINTR: try again; anything else (ECHILD) also means "gone".
            while let Err(rustix::io::Errno::INTR) = rustix::process::waitid(
                WaitId::Pid(pid),
                WaitIdOptions::EXITED | WaitIdOptions::NOWAIT,
            ) {}
            // The watcher may be gone already; nothing to tell then.
            let _ = theirs.write_all(&[1]);
        })
        .map_err(|e| CommError::io("starting a child-exit thread", e))?;
    Ok(ours)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::time::Instant;

    #[test]
    fn exits_come_in_exit_order_not_spawn_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ExitWatch::new().unwrap();
        // Spawned 0, 1, 2; child i exits (code 10 + i) once file `go.i`
        // exists. The test releases them in the order 2, 0, 1, each only
        // after the previous one is a zombie, and looks at none of them
        // before all three have exited.
        let mut kids = Vec::new();
        for i in 0..3 {
            let go = dir.path().join(format!("go.{i}"));
            let child = Command::new("sh")
                .args([
                    "-c",
                    &format!(
                        "while [ ! -e '{}' ]; do sleep 0.01; done; exit {}",
                        go.display(),
                        10 + i
                    ),
                ])
                .spawn()
                .unwrap();
            w.add(child.id()).unwrap();
            kids.push(child);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for i in [2, 0, 1] {
            std::fs::write(dir.path().join(format!("go.{i}")), b"").unwrap();
            while !is_zombie(kids[i].id()) {
                assert!(Instant::now() < deadline, "child {i} did not exit");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let mut order = Vec::new();
        while !w.all_reaped() {
            for (t, info) in w.wait(Some(Duration::from_secs(10))).unwrap() {
                assert_eq!(info.code, 10 + t as i32);
                order.push(t);
            }
        }
        assert_eq!(order, [2, 0, 1]);
    }

    fn is_zombie(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s[s.rfind(')').unwrap() + 1..].trim_start().starts_with('Z'))
            .unwrap_or(false)
    }

    #[test]
    fn signal_deaths_and_timeouts() {
        let mut w = ExitWatch::new().unwrap();
        // Reaped by the watch, not by `Child::wait`.
        let pid = Command::new("sleep").arg("30").spawn().unwrap().id();
        let t = w.add(pid).unwrap();
        assert!(w.wait(Some(Duration::ZERO)).unwrap().is_empty());
        rustix::process::kill_process(
            Pid::from_raw(pid as i32).unwrap(),
            rustix::process::Signal::KILL,
        )
        .unwrap();
        let got = w.wait(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(
            got,
            [(
                t,
                ExitInfo {
                    code: 137,
                    signal: Some(9)
                }
            )]
        );
        assert_eq!(
            w.exit_of(t).unwrap().describe(),
            "was killed by signal 9 (SIGKILL)"
        );
    }

    #[test]
    fn the_thread_fallback_reports_exits_too() {
        let mut w = ExitWatch::new().unwrap();
        let raw = Command::new("sh")
            .args(["-c", "exit 4"])
            .spawn()
            .unwrap()
            .id();
        let pid = Pid::from_raw(raw as i32).unwrap();
        let src = Source::Thread(spawn_waiter(pid).unwrap());
        epoll::add(
            &w.epoll,
            src.fd(),
            epoll::EventData::new_u64(0),
            epoll::EventFlags::IN,
        )
        .unwrap();
        w.procs.push(Watched {
            pid,
            source: Some(src),
            exit: None,
        });
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.is_empty() && Instant::now() < deadline {
            got = w.wait(Some(Duration::from_secs(1))).unwrap();
        }
        assert_eq!(got[0].1.code, 4);
    }
}
