//! Which ranks share this host, found by probing shared memory rather than
//! trusting host names (containers, aliases and multi-homed hosts make names
//! unreliable; shared memory is what the shm backend actually needs).

use std::fs::File;
use std::io::{Read, Write};
use std::time::Duration;

use comm_core::{CommError, Deadline, Result, Store};
use rustix::shm;

use crate::shm_file;

/// Store key prefix used by [`same_host_ranks`].
const KEY: &str = "same_host";
/// Environment variable naming the job (set by `distrun`); its launcher
/// removes `/dev/shm/dshm.<job>.*` once every rank has exited.
const JOB_ID_ENV: &str = "DIST_JOB_ID";

/// The name of rank `rank`'s probe segment: with a job id (`DIST_JOB_ID`,
/// letters, digits, `-`, `_`, at most 64) one of the job's
/// (`/dshm.<job>.<pid>.samehost-r<rank>-<random>`, the names distrun
/// removes after the job), else `/dist-samehost-<pid>-r<rank>-<random>`.
/// It is a memfd's label unless shared memory is named
/// ([`shm_file::Backing`]); only then is it a name in `/dev/shm`, which a
/// rank killed while it probes would leave behind outside distrun.
fn probe_name(job: Option<&str>, rank: usize) -> Result<String> {
    let pid = std::process::id();
    let tag = random_hex::<8>()?;
    let valid = |j: &&str| {
        !j.is_empty()
            && j.len() <= 64
            && j.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    };
    Ok(match job.filter(valid) {
        Some(j) => format!("/dshm.{j}.{pid}.samehost-r{rank}-{tag}"),
        None => format!("/dist-samehost-{pid}-r{rank}-{tag}"),
    })
}

/// This rank's probe: a shared-memory file holding its token, unlinked on
/// drop when it is named.
struct Segment {
    /// Kept open: a memfd lives as long as a descriptor of it does.
    file: File,
    locator: String,
    named: bool,
}

impl Segment {
    fn create(rank: usize, token: &str) -> Result<Self> {
        let job = std::env::var(JOB_ID_ENV).ok();
        let name = probe_name(job.as_deref().map(str::trim), rank)?;
        let f = shm_file::create(&name, shm_file::Backing::configured()?)?;
        let mut seg = Segment {
            file: File::from(f.fd),
            locator: f.locator,
            named: f.backing == shm_file::Backing::Named,
        };
        seg.file
            .write_all(token.as_bytes())
            .map_err(|e| CommError::io(format!("writing the shared-memory probe {name}"), e))?;
        Ok(seg)
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        if !self.named {
            return;
        }
        if let Err(e) = shm::unlink(self.locator.as_str()) {
            tracing::warn!(name = %self.locator, error = %e, "could not unlink the same-host probe segment");
        }
    }
}

/// `N` random bytes as hex.
fn random_hex<const N: usize>() -> Result<String> {
    Ok(comm_core::auth::to_hex(
        &comm_core::auth::random_bytes::<N>()?,
    ))
}

/// True when the probe at `locator` exists, can be opened by this process
/// and holds `token`.
fn probe(locator: &str, token: &str) -> bool {
    let Some(loc) = shm_file::Locator::parse(locator) else {
        return false;
    };
    let name = loc.name();
    if !(name.starts_with("/dist-samehost-")
        || name.starts_with("/dshm.") && name.contains(".samehost-r"))
    {
        return false;
    }
    let Ok(Some(fd)) = shm_file::open(loc, false) else {
        return false;
    };
    let mut buf = Vec::with_capacity(token.len());
    let read = File::from(fd)
        .take(token.len() as u64 + 1)
        .read_to_end(&mut buf);
    read.is_ok() && buf == token.as_bytes()
}

/// The sorted global ranks running on this host, this rank included.
///
/// Every rank of `0..world` must call it (collectively) with the same store.
/// Each creates a small shared-memory file ([`shm_file`]: a memfd by
/// default, labelled with its pid and random bits) holding a random token,
/// and publishes its locator and the token in `store`; each then opens every
/// other rank's file the way the shm backend opens its segments, and the
/// ranks whose file it can open with the right content share its host (same
/// kernel, same user, and one pid namespace for memfds or one `/dev/shm`
/// for named files). After a store barrier every rank closes (or unlinks)
/// its own, so nothing is left behind, also on error; a memfd cannot be
/// left behind even by a rank killed while it probes.
/// Every wait is bounded by `timeout`; a rank that never arrives gives a
/// [`CommError::Timeout`] naming it. Calling it again on the same store is fine.
pub fn same_host_ranks(
    store: &dyn Store,
    rank: usize,
    world: usize,
    timeout: Duration,
) -> Result<Vec<usize>> {
    if rank >= world {
        return Err(CommError::invalid(format!(
            "same_host_ranks: rank {rank} is not below world size {world}"
        )));
    }
    let deadline = Deadline::after(timeout);
    // Per-rank call counter: the n-th call of every rank uses generation n,
    // so repeated calls never read a stale segment name.
    let gen = store.add(&format!("{KEY}/calls/{rank}"), 1)?;
    let prefix = format!("{KEY}/{gen}");

    let token = random_hex::<16>()?;
    let seg = Segment::create(rank, &token)?;
    store.set(
        &format!("{prefix}/{rank}"),
        format!("{} {token}", seg.locator).as_bytes(),
    )?;

    let keys: Vec<String> = (0..world).map(|r| format!("{prefix}/{r}")).collect();
    let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    store.wait(&key_refs, deadline.remaining()).map_err(|e| {
        name_missing_ranks(
            e,
            &prefix,
            "same_host_ranks: waiting for every rank's shared-memory probe",
            "no shared-memory probe",
        )
    })?;

    let mut local = Vec::new();
    for (r, key) in keys.iter().enumerate() {
        if r == rank {
            local.push(r);
            continue;
        }
        let v = store.get(key, deadline.remaining())?;
        let v = String::from_utf8_lossy(&v);
        let (locator, tok) = v.split_once(' ').ok_or_else(|| {
            CommError::Protocol(format!(
                "same_host_ranks: malformed entry for rank {r} in the store: {v:?}"
            ))
        })?;
        if probe(locator, tok) {
            local.push(r);
        }
    }

    // Barrier: nobody unlinks before everyone has probed. One key per
    // rank, so a rank that never finishes (frozen, killed) is named.
    let done = format!("{prefix}/done");
    store.set(&format!("{done}/{rank}"), b"1")?;
    let keys: Vec<String> = (0..world).map(|r| format!("{done}/{r}")).collect();
    let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    store.wait(&key_refs, deadline.remaining()).map_err(|e| {
        name_missing_ranks(
            e,
            &done,
            "same_host_ranks: waiting for every rank to finish probing",
            "did not finish probing",
        )
    })?;
    drop(seg);
    Ok(local)
}

/// A store wait's timeout on the keys `<prefix>/<rank>` as a timeout of
/// `operation` naming those ranks (each with `detail`).
fn name_missing_ranks(e: CommError, prefix: &str, operation: &str, detail: &str) -> CommError {
    match e {
        CommError::Timeout { waited, keys, .. } => {
            let mut ranks = Vec::new();
            let mut other = Vec::new();
            for k in keys {
                match k
                    .strip_prefix(&format!("{prefix}/"))
                    .and_then(|r| r.parse::<usize>().ok())
                {
                    Some(r) => ranks.push(comm_core::Missing::new(r, detail)),
                    None => other.push(k),
                }
            }
            let mut e = CommError::timeout_ranks(operation, waited, ranks);
            if let CommError::Timeout { keys, .. } = &mut e {
                *keys = other;
            }
            e
        }
        other => other,
    }
}

/// This machine's host name (metadata only; [`same_host_ranks`] does not rely on it).
pub fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_names_fall_under_the_launchers_clean_up() {
        let pid = std::process::id();
        let n = probe_name(Some("0123abcd"), 3).unwrap();
        assert!(
            n.starts_with(&format!("/dshm.0123abcd.{pid}.samehost-r3-")),
            "{n}"
        );
        // No id, or one that cannot be part of a name: the plain name.
        for job in [None, Some(""), Some("a/b"), Some("*")] {
            let n = probe_name(job, 1).unwrap();
            assert!(n.starts_with(&format!("/dist-samehost-{pid}-r1-")), "{n}");
        }
        // Names from the store must be probe names.
        assert!(!probe("/dshm.job.1.other", "t"));
        assert!(!probe("/etc/passwd", "t"));
    }
}
