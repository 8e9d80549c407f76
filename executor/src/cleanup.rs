//! Removing what a job's ranks left in `/dev/shm`.
//!
//! comm-shm's segments are anonymous memfds by default and never appear
//! here. Named ones (`DIST_SHM_BACKING=named`, or a kernel refusing memfds)
//! and the same-host probes are `dshm.<DIST_JOB_ID>.<creator pid>.<random>`,
//! unlinked once every member has attached, so a healthy job leaves
//! nothing. A job stopped during set-up (a member killed while the others
//! wait to attach, a member that exits before joining, Ctrl-C) leaves the
//! segments whose creator was stopped before it could unlink them. The
//! launcher, which outlives its ranks, removes them once every rank has
//! exited, on every kind of stop.
//!
//! Two launchers of one job on one host (a multi-node job tried on one
//! machine) share the job id; a segment whose creator is still alive and is
//! not one of this launcher's ranks belongs to the other launcher's ranks
//! and is kept.

use std::path::{Path, PathBuf};

use comm_shm::SHM_DIR;

/// True for a job id that comm-shm puts into segment names unchanged (so
/// the prefix removed here is the one its segments carry): letters, digits,
/// `-` and `_`, at most 32.
pub(crate) fn valid_job_id(id: &str) -> bool {
    !id.is_empty() && comm_shm::sanitize_job(id) == id
}

/// Removes this job's segments from `/dev/shm` (see the module docs);
/// `ours` are the pids of the ranks this launcher started (all exited);
/// this process counts as ours too (an executor creates the segment of the
/// queue its workers read). Returns the paths removed. Failures are
/// logged, never fatal.
pub(crate) fn remove_job_segments(job_id: &str, ours: &[u32]) -> Vec<PathBuf> {
    let mut ours = ours.to_vec();
    ours.push(std::process::id());
    remove_job_segments_in(Path::new(SHM_DIR), job_id, &ours)
}

fn remove_job_segments_in(dir: &Path, job_id: &str, ours: &[u32]) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    if !valid_job_id(job_id) {
        return removed;
    }
    let prefix = comm_shm::segment_prefix(job_id);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return removed;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with(&prefix) {
            continue;
        }
        if let Some(pid) = comm_shm::creator_pid(name) {
            if !ours.contains(&pid) && process_alive(pid) {
                continue;
            }
        }
        let path = e.path();
        match std::fs::remove_file(&path) {
            Ok(()) => {
                tracing::info!("removed {} left by a stopped rank", path.display());
                removed.push(path);
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => tracing::warn!("could not remove {}: {err}", path.display()),
        }
    }
    removed
}

/// True while `pid` exists and is not a zombie.
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => match s.rfind(')') {
            Some(i) => !matches!(
                s[i + 1..].trim_start().as_bytes().first(),
                Some(b'Z' | b'X')
            ),
            None => true,
        },
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_only_this_jobs_orphans() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let files = [
            "dshm.abc.x".to_string(),                  // no pid: removed
            "dshm.abc.1.rand".to_string(),             // pid 1 alive but ours: removed
            format!("dshm.abc.{me}.rand"),             // alive, not ours: kept
            format!("dshm.abc.{}.rand", u32::MAX - 1), // dead creator: removed
            "dshm.abcd.x".to_string(),                 // other job: kept
            "other".to_string(),
        ];
        for f in &files {
            std::fs::write(dir.path().join(f), b"").unwrap();
        }
        let mut got: Vec<String> = remove_job_segments_in(dir.path(), "abc", &[1])
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        got.sort();
        let mut want = vec![files[0].clone(), files[1].clone(), files[3].clone()];
        want.sort();
        assert_eq!(got, want);
        assert!(dir.path().join(&files[2]).exists());
        assert!(dir.path().join(&files[4]).exists());
        // A pattern character in the id is refused, not expanded.
        assert!(remove_job_segments_in(dir.path(), "*", &[]).is_empty());
        assert!(!valid_job_id("a/b") && !valid_job_id("") && valid_job_id("0123abcd"));
        // Longer than comm-shm keeps in names: refused, not cut.
        assert!(valid_job_id(&"a".repeat(32)) && !valid_job_id(&"a".repeat(33)));
    }
}
