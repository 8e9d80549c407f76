//! The public id of a job, derived from its secret.

/// The id of the job whose secret is `secret`, for names other processes can
/// see (`/dev/shm` segments, logs): 16 lowercase hex digits of an HMAC of the
/// secret ([`comm_core::auth::derive_id`]). Every node and every toolchain
/// computes the same id (unlike `DefaultHasher`), and the id reveals nothing
/// about the secret.
///
/// ```
/// let id = dist_utils::job_id(b"secret of job 1");
/// assert_eq!(id.len(), 16);
/// assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
/// assert_eq!(id, dist_utils::job_id(b"secret of job 1"));
/// assert_ne!(id, dist_utils::job_id(b"secret of job 2"));
/// ```
pub fn job_id(secret: &[u8]) -> String {
    comm_core::auth::derive_id(secret, "dist-utils job id")
}
