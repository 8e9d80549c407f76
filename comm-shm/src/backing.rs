//! A segment's file during set-up: created by member 0 and found by the
//! others through [`dist_utils::shm_file`] (an anonymous memfd by default,
//! or a name in `/dev/shm`), with what set-up must undo when it ends.
//!
//! A memfd never has a name, so a creator killed with `SIGKILL` during
//! set-up, under any launcher (torchrun, Slurm, a shell, or `distrun`
//! itself killed), leaves nothing behind: the leak class that the signal
//! handler of [`crate::names`] and the launcher's sweep of `dshm.<job>.*`
//! could only narrow. The creator keeps its descriptor until every member
//! has attached, then closes it (the moment a named segment is unlinked).
//! A named segment keeps the earlier scheme: its name is registered with
//! the signal handler while set-up runs, and unlinked when it ends.

use std::os::fd::OwnedFd;

use comm_core::{CommError, Result};
use dist_utils::shm_file;
use rustix::shm;

pub use dist_utils::shm_file::{Backing, Locator, BACKING_ENV};

use crate::names::{SetupGuard, SHM_DIR};

/// Unlinks a segment name when dropped unless disarmed (ENOENT ignored:
/// someone beat us to it).
pub(crate) struct UnlinkOnDrop(pub(crate) Option<String>);

impl UnlinkOnDrop {
    pub(crate) fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for UnlinkOnDrop {
    fn drop(&mut self) {
        if let Some(n) = &self.0 {
            let _ = shm::unlink(n.as_str());
        }
    }
}

/// The creator's side of a new segment, held until set-up ends. Dropping it
/// closes the creator's descriptor (memfd) or unlinks the name (named);
/// the mapping stays either way.
pub(crate) struct Created {
    /// The file, to size and map.
    pub fd: OwnedFd,
    /// What the other members get through the store.
    pub locator: String,
    /// Which backing it got.
    pub backing: Backing,
    // Field order is drop order: the name goes before its signal guard.
    _unlink: Option<UnlinkOnDrop>,
    _guard: Option<SetupGuard>,
}

/// Creates a segment file for `name` (`/dshm.<job>.<pid>.<random>`) with the
/// configured backing.
pub(crate) fn create(name: &str) -> Result<Created> {
    let backing = Backing::configured()?;
    // A name is registered before it exists, so no signal can find it
    // unregistered; a memfd that falls back to a name is registered late,
    // which only narrows that fallback's window.
    let mut guard = (backing == Backing::Named).then(|| SetupGuard::register(name));
    let f = shm_file::create(name, backing)?;
    let named = f.backing == Backing::Named;
    if named && guard.is_none() {
        guard = Some(SetupGuard::register(name));
    }
    Ok(Created {
        fd: f.fd,
        locator: f.locator,
        backing: f.backing,
        // From here on a name is unlinked when set-up ends, either way.
        _unlink: named.then(|| UnlinkOnDrop(Some(name.to_string()))),
        _guard: guard,
    })
}

/// A member's side of a segment it opened, held until set-up ends.
pub(crate) struct Opened {
    pub fd: OwnedFd,
    /// The segment's name (for messages; the memfd's label).
    pub name: String,
    // Drop order: the name (if set-up failed) before its guard.
    unlink_on_error: Option<UnlinkOnDrop>,
    _guard: Option<SetupGuard>,
}

impl Opened {
    /// Every member has attached: a named segment's name goes now.
    pub(crate) fn all_attached(&self) {
        if let Some(UnlinkOnDrop(Some(n))) = &self.unlink_on_error {
            let _ = shm::unlink(n.as_str());
        }
    }

    /// Set-up succeeded: nothing to undo when this is dropped.
    pub(crate) fn succeeded(mut self) {
        if let Some(u) = self.unlink_on_error.take() {
            u.disarm();
        }
    }
}

/// Opens the segment at `locator` (from the store key `key`); `what` names
/// the object being set up, for errors. `Ok(None)` when it no longer
/// exists (see [`creator_of`] to tell why).
pub(crate) fn open(locator: &str, key: &str, what: &str) -> Result<Option<Opened>> {
    let loc = Locator::parse(locator).ok_or_else(|| {
        CommError::Protocol(format!(
            "{what}: store key `{key}` holds no segment locator"
        ))
    })?;
    let name = loc.name();
    let named = matches!(loc, Locator::Named(_));
    let guard = named.then(|| SetupGuard::register(name));
    let fd = match shm_file::open(loc, true) {
        Ok(Some(fd)) => fd,
        Ok(None) => return Ok(None),
        Err(e) if named => {
            return Err(CommError::io(
                format!("{what}: opening shared-memory segment {name}"),
                e,
            ))
        }
        Err(e) => {
            return Err(CommError::io(
                format!(
                    "{what}: opening segment {name} through its creator's descriptor \
                     ({locator}); the members must run as one user in one pid namespace, or \
                     set {BACKING_ENV}=named for the job"
                ),
                e,
            ))
        }
    };
    Ok(Some(Opened {
        fd,
        name: name.to_string(),
        unlink_on_error: named.then(|| UnlinkOnDrop(Some(name.to_string()))),
        _guard: guard,
    }))
}

/// The pid of the process that created the segment at `loc`: a memfd
/// locator's own, or the one in a segment's name.
pub(crate) fn creator_of(loc: &Locator<'_>) -> Option<u32> {
    match *loc {
        Locator::Memfd { pid, .. } => Some(pid),
        Locator::Named(name) => crate::creator_pid(name),
    }
}

/// Where a segment of this backing takes its memory from, for messages.
pub(crate) fn source(backing: Backing) -> &'static str {
    match backing {
        Backing::Memfd => "memory",
        Backing::Named => SHM_DIR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_memfd_segment_has_no_name_and_is_checked_when_opened() {
        if Backing::configured().ok() != Some(Backing::Memfd) {
            return;
        }
        let name = format!("/dshm.test.{}.backing", std::process::id());
        let c = create(&name).unwrap();
        assert_eq!(c.backing, Backing::Memfd);
        assert!(!std::path::Path::new(&format!("{SHM_DIR}{name}")).exists());
        let o = open(&c.locator, "k", "test").unwrap().unwrap();
        assert_eq!(o.name, name);
        let loc = Locator::parse(&c.locator).unwrap();
        assert_eq!(creator_of(&loc), Some(std::process::id()));
        let other = c.locator.replace("backing", "other");
        assert!(open(&other, "k", "test").unwrap().is_none());
        let e = open("memfd:1", "k", "test").err().unwrap().to_string();
        assert!(e.contains("holds no segment locator"), "{e}");
        assert_eq!(
            creator_of(&Locator::Named("/dshm.job_1.4242.00ff")),
            Some(4242)
        );
        assert_eq!(creator_of(&Locator::Named("/dist-samehost-1-r0-ab")), None);
    }
}
