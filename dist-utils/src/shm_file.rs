//! Shared-memory files other processes of the job can open: an anonymous
//! memfd (the default) or a POSIX object named in `/dev/shm`, and the
//! locator string that tells another process where to find it.
//!
//! A memfd never has a name in `/dev/shm`; the kernel frees it when the
//! last descriptor and mapping go, however the processes end, `SIGKILL`
//! included, so nothing can be left behind. Another process opens it as
//! `/proc/<pid>/fd/<fd>` of its creator (which needs one user, one pid
//! namespace and a dumpable creator, what the shm backend needs anyway:
//! member pids are how peers' deaths are noticed), and checks through its
//! own `/proc/self/fd` link that it got the memfd of the expected label, so
//! a descriptor number closed and reused since is refused, never mapped.
//!
//! `DIST_SHM_BACKING=named` (or a process that is not dumpable, or a kernel
//! refusing `memfd_create`) gives named objects instead, which the creator
//! must unlink and which a process killed at the wrong moment leaves behind
//! (`distrun` removes a job's `dshm.<job>.*` after the job).
//!
//! ```
//! use dist_utils::shm_file::{create, open, Backing, Locator};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mine = create(&format!("/doc.{}", std::process::id()), Backing::Memfd)?;
//! rustix::io::write(&mine.fd, b"hi")?;
//! // Another process of the job gets `mine.locator` (through the store):
//! let theirs = open(Locator::parse(&mine.locator).unwrap(), false)?.unwrap();
//! let mut buf = [0u8; 2];
//! rustix::io::pread(&theirs, &mut buf, 0)?;
//! assert_eq!(&buf, b"hi");
//! # if mine.backing == Backing::Named { rustix::shm::unlink(mine.locator.as_str())?; }
//! # Ok(()) }
//! ```

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};

use comm_core::{CommError, Result};
use rustix::fs::{MemfdFlags, Mode};
use rustix::io::Errno;
use rustix::shm;

/// Environment variable choosing the backing: `memfd` (default) or `named`.
pub const BACKING_ENV: &str = "DIST_SHM_BACKING";

const MEMFD: &str = "memfd:";

/// Where shared-memory files of this process live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Anonymous `memfd_create` files, opened by others through
    /// `/proc/<pid>/fd`.
    Memfd,
    /// POSIX shared-memory objects named in `/dev/shm`.
    Named,
}

impl Backing {
    /// `DIST_SHM_BACKING` (`memfd` or `named`; unset or empty: `memfd`),
    /// with `memfd` turned into `named` where this process is not dumpable
    /// (others could not open its descriptors). An unknown value is an
    /// error, not a silent default.
    ///
    pub fn configured() -> Result<Backing> {
        let want = match std::env::var(BACKING_ENV) {
            Ok(v) => match v.trim() {
                "" | "memfd" => Backing::Memfd,
                "named" => Backing::Named,
                other => {
                    return Err(CommError::invalid(format!(
                        "{BACKING_ENV}={other:?}: expected `memfd` or `named`"
                    )))
                }
            },
            Err(_) => Backing::Memfd,
        };
        if want == Backing::Memfd && !dumpable() {
            tracing::debug!("this process is not dumpable; shared memory uses named objects");
            return Ok(Backing::Named);
        }
        Ok(want)
    }
}

/// True when other processes of this user may open our descriptors through
/// `/proc/<pid>/fd` (the kernel asks the target to be dumpable).
fn dumpable() -> bool {
    matches!(
        rustix::process::dumpable_behavior(),
        Ok(rustix::process::DumpableBehavior::Dumpable)
    )
}

/// A new shared-memory file and its locator.
#[derive(Debug)]
pub struct NewFile {
    /// The file (close-on-exec).
    pub fd: OwnedFd,
    /// What another process passes to [`open`]: `memfd:<pid>:<fd>:<name>`
    /// or `<name>`.
    pub locator: String,
    /// Which backing it got.
    pub backing: Backing,
}

/// Creates a shared-memory file for `name` (a `/`-led name with no other
/// `/`) with `backing`: a memfd labelled `name` (falling back to a named
/// object if the kernel refuses memfds), or the POSIX object `name`, created
/// exclusively with mode `0600`, which the caller must unlink.
pub fn create(name: &str, backing: Backing) -> Result<NewFile> {
    if !valid_name(name) {
        return Err(CommError::invalid(format!(
            "shared-memory name {name:?}: a `/` then no other `/`, under 256 bytes"
        )));
    }
    if backing == Backing::Memfd {
        match rustix::fs::memfd_create(&name[1..], MemfdFlags::CLOEXEC) {
            Ok(fd) => {
                // A memfd starts as 0777; only its creator's pid namespace and
                // ptrace rules guard `/proc/<pid>/fd`. 0600 as for a named one.
                rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o600)).map_err(|e| {
                    CommError::io(format!("restricting shared-memory file {name}"), e.into())
                })?;
                let locator = format!("{MEMFD}{}:{}:{name}", std::process::id(), fd.as_raw_fd());
                return Ok(NewFile {
                    fd,
                    locator,
                    backing,
                });
            }
            Err(e) => tracing::debug!("memfd_create refused ({e}); using a named object"),
        }
    }
    let fd = shm::open(
        name,
        shm::OFlags::CREATE | shm::OFlags::EXCL | shm::OFlags::RDWR,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| CommError::io(format!("creating shared-memory segment {name}"), e.into()))?;
    Ok(NewFile {
        fd,
        locator: name.to_string(),
        backing: Backing::Named,
    })
}

/// A checked locator: a memfd's creator pid, descriptor and name, or a
/// named object's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Locator<'a> {
    /// `memfd:<pid>:<fd>:<name>`.
    Memfd {
        /// The creator's pid.
        pid: u32,
        /// The creator's descriptor.
        fd: i32,
        /// The memfd's label.
        name: &'a str,
    },
    /// A POSIX shared-memory object's name.
    Named(&'a str),
}

impl<'a> Locator<'a> {
    /// Parses what [`create`] published; `None` for anything else.
    pub fn parse(loc: &'a str) -> Option<Locator<'a>> {
        match loc.strip_prefix(MEMFD) {
            Some(rest) => {
                let mut it = rest.splitn(3, ':');
                let pid = it.next()?.parse().ok()?;
                let fd = it.next()?.parse().ok().filter(|&fd: &i32| fd >= 0)?;
                let name = it.next().filter(|n| valid_name(n))?;
                Some(Locator::Memfd { pid, fd, name })
            }
            None => valid_name(loc).then_some(Locator::Named(loc)),
        }
    }

    /// The file's name (a memfd's label).
    pub fn name(&self) -> &'a str {
        match *self {
            Locator::Memfd { name, .. } | Locator::Named(name) => name,
        }
    }
}

fn valid_name(n: &str) -> bool {
    n.starts_with('/') && n.len() < 256 && !n[1..].contains('/')
}

/// Opens the file at `loc`, read-write or read-only. `Ok(None)` when it is
/// gone: a named object unlinked, a memfd whose creator closed it or
/// exited, or a descriptor number that now holds another file.
pub fn open(loc: Locator<'_>, write: bool) -> std::io::Result<Option<OwnedFd>> {
    match loc {
        Locator::Memfd { pid, fd, name } => {
            let path = format!("/proc/{pid}/fd/{fd}");
            let file = match File::options().read(true).write(write).open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            // The file we hold is the creator's memfd only if its link says
            // so; a descriptor number closed and reused since is refused.
            let want = format!("/memfd:{} (deleted)", &name[1..]);
            let link = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()));
            Ok(link
                .is_ok_and(|l| l.as_os_str() == want.as_str())
                .then(|| OwnedFd::from(file)))
        }
        Locator::Named(name) => {
            let flags = if write {
                shm::OFlags::RDWR
            } else {
                shm::OFlags::RDONLY
            };
            match shm::open(name, flags, Mode::empty()) {
                Ok(fd) => Ok(Some(fd)),
                Err(Errno::NOENT) => Ok(None),
                Err(e) => Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locators_parse_strictly() {
        assert_eq!(
            Locator::parse("memfd:12:5:/dshm.j.12.ab"),
            Some(Locator::Memfd {
                pid: 12,
                fd: 5,
                name: "/dshm.j.12.ab"
            })
        );
        assert_eq!(
            Locator::parse("/dshm.j.1.x"),
            Some(Locator::Named("/dshm.j.1.x"))
        );
        for bad in [
            "",
            "dshm",
            "/a/b",
            "memfd:12:5:dshm",
            "memfd:x:5:/d",
            "memfd:1:-1:/d",
            "memfd:1:/d",
            "memfd:1:2:/a/b",
        ] {
            assert!(Locator::parse(bad).is_none(), "{bad}");
        }
        assert!(create("no-slash", Backing::Memfd).is_err());
    }

    #[test]
    fn a_memfd_is_opened_through_its_creators_descriptor_and_checked() {
        if !dumpable() {
            return;
        }
        let name = format!("/dshm.test.{}.shmfile", std::process::id());
        let c = create(&name, Backing::Memfd).unwrap();
        assert_eq!(c.backing, Backing::Memfd);
        assert!(!std::path::Path::new(&format!("/dev/shm{name}")).exists());
        let mode = rustix::fs::fstat(&c.fd).unwrap().st_mode & 0o777;
        assert_eq!(mode, 0o600);
        rustix::io::write(&c.fd, b"hello").unwrap();
        let loc = Locator::parse(&c.locator).unwrap();
        let o = open(loc, false).unwrap().unwrap();
        let mut buf = [0u8; 5];
        rustix::io::pread(&o, &mut buf, 0).unwrap();
        assert_eq!(&buf, b"hello");
        // The same descriptor number under another label: refused.
        let other = c.locator.replace("shmfile", "other");
        assert!(open(Locator::parse(&other).unwrap(), false)
            .unwrap()
            .is_none());
        // Closed by its creator: gone (or, if the number was reused at once
        // by another thread, refused as another file).
        drop(o);
        let loc = c.locator.clone();
        drop(c);
        assert!(open(Locator::parse(&loc).unwrap(), true).unwrap().is_none());
    }
}
