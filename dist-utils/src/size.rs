//! Byte sizes written by people (`64K`, `1MiB`, `2G`).

use comm_core::{CommError, Result};

/// Parses a byte size: digits with an optional binary suffix `K`, `M`, `G`
/// or `T` (powers of 1024, any case), optionally followed by `B` or `iB`;
/// a plain trailing `B` means bytes. `what` names the value (a variable or
/// a flag) in the error.
///
/// ```
/// use dist_utils::parse_size;
/// assert_eq!(parse_size("X", "8").unwrap(), 8);
/// assert_eq!(parse_size("X", "64k").unwrap(), 64 << 10);
/// assert_eq!(parse_size("X", "1MiB").unwrap(), 1 << 20);
/// assert_eq!(parse_size("X", " 2G ").unwrap(), 2 << 30);
/// assert_eq!(parse_size("X", "512B").unwrap(), 512);
/// let e = parse_size("DIST_TCP_SEGMENT", "lots").unwrap_err();
/// assert!(e.to_string().contains("DIST_TCP_SEGMENT"));
/// ```
pub fn parse_size(what: &str, s: &str) -> Result<u64> {
    let bad = || {
        CommError::invalid(format!(
            "{what}={s:?} is not a size; use e.g. 8, 64K, 1M, 2G (powers of 1024)"
        ))
    };
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix("ib"))
        .or_else(|| t.strip_suffix(['B', 'b']))
        .unwrap_or(t);
    let (num, shift) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 30),
        Some('t' | 'T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = num.trim().parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}
