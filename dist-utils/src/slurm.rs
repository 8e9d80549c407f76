//! Slurm's compressed lists: host lists (`node[01-04,07],login1`) and task
//! counts per node (`4(x2),3`).

use comm_core::{CommError, Result};

/// Most hosts (and tasks-per-node entries) a list may expand to; a longer
/// list is an error rather than an allocation the size of a typo.
pub const MAX_EXPANDED: usize = 1 << 20;

/// Expands a Slurm host list, as in `SLURM_JOB_NODELIST`: comma-separated
/// items, each with any number of bracket groups of numbers and ranges
/// (`node[01-03,7]`, `rack[1-2]-n[1-2]`, the cartesian product in order).
/// A range keeps the zero padding of its first number. `var` names the
/// variable in errors.
///
/// ```
/// use dist_utils::slurm::expand_hostlist;
/// assert_eq!(expand_hostlist("V", "node[01-02]").unwrap(), ["node01", "node02"]);
/// assert_eq!(
///     expand_hostlist("V", "a[1,3-4],b").unwrap(),
///     ["a1", "a3", "a4", "b"]
/// );
/// assert_eq!(
///     expand_hostlist("V", "r[1-2]-n[8-9]").unwrap(),
///     ["r1-n8", "r1-n9", "r2-n8", "r2-n9"]
/// );
/// assert!(expand_hostlist("V", "node[3-1]").is_err());
/// ```
pub fn expand_hostlist(var: &str, list: &str) -> Result<Vec<String>> {
    let bad = |why: &str| {
        CommError::invalid(format!(
            "environment variable {var}={list:?} is not a Slurm host list like \
             \"node[01-04],login1\": {why}"
        ))
    };
    let mut hosts = Vec::new();
    for item in split_top_level(list.trim()).map_err(|w| bad(&w))? {
        if item.is_empty() {
            return Err(bad("empty item"));
        }
        // Each item: literal text and bracket groups, expanded as a product.
        let mut partial: Vec<String> = vec![String::new()];
        let mut rest = item;
        while !rest.is_empty() {
            match rest.find('[') {
                None => {
                    if rest.contains(']') {
                        return Err(bad("`]` without `[`"));
                    }
                    partial.iter_mut().for_each(|p| p.push_str(rest));
                    rest = "";
                }
                Some(open) => {
                    let (lit, tail) = rest.split_at(open);
                    if lit.contains(']') {
                        return Err(bad("`]` without `[`"));
                    }
                    let close = tail.find(']').ok_or_else(|| bad("`[` without `]`"))?;
                    let alternatives = expand_group(&tail[1..close]).map_err(|w| bad(&w))?;
                    let total = partial
                        .len()
                        .checked_mul(alternatives.len())
                        .filter(|n| hosts.len() + n <= MAX_EXPANDED)
                        .ok_or_else(|| bad("expands to too many hosts"))?;
                    let mut next = Vec::with_capacity(total);
                    for p in &partial {
                        for a in &alternatives {
                            next.push(format!("{p}{lit}{a}"));
                        }
                    }
                    partial = next;
                    rest = &tail[close + 1..];
                }
            }
        }
        if hosts.len() + partial.len() > MAX_EXPANDED {
            return Err(bad("expands to too many hosts"));
        }
        hosts.extend(partial);
    }
    if hosts.is_empty() {
        return Err(bad("no host"));
    }
    Ok(hosts)
}

/// The first host of a Slurm host list (where rank 0 runs with Slurm's
/// default block distribution).
pub fn first_host(var: &str, list: &str) -> Result<String> {
    // Only the first item matters; expanding it alone keeps this cheap.
    let first = split_top_level(list.trim())
        .ok()
        .and_then(|items| items.into_iter().next())
        .unwrap_or_default();
    expand_hostlist(var, first)
        .map_err(|_| {
            CommError::invalid(format!(
                "environment variable {var}={list:?} is not a Slurm host list like \
                 \"node[01-04],login1\""
            ))
        })?
        .into_iter()
        .next()
        .ok_or_else(|| CommError::invalid(format!("environment variable {var} lists no host")))
}

/// Splits at commas outside brackets.
fn split_top_level(s: &str) -> std::result::Result<Vec<&str>, String> {
    let mut items = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '[' if depth == 0 => depth = 1,
            '[' => return Err("nested `[`".into()),
            ']' if depth == 1 => depth = 0,
            ']' => return Err("`]` without `[`".into()),
            ',' if depth == 0 => {
                items.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("`[` without `]`".into());
    }
    items.push(&s[start..]);
    Ok(items)
}

/// `01-03,7` → `["01", "02", "03", "7"]`.
fn expand_group(g: &str) -> std::result::Result<Vec<String>, String> {
    let mut out = Vec::new();
    for part in g.split(',') {
        let part = part.trim();
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let num = |s: &str| -> std::result::Result<u64, String> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("`{part}` is not a number or a range"));
            }
            s.parse::<u64>()
                .map_err(|_| format!("`{part}` is out of range"))
        };
        let (a, b) = (num(lo)?, num(hi)?);
        if a > b {
            return Err(format!("range `{part}` runs backwards"));
        }
        let n = (b - a)
            .checked_add(1)
            .and_then(|n| usize::try_from(n).ok())
            .filter(|n| out.len() + n <= MAX_EXPANDED)
            .ok_or_else(|| "expands to too many hosts".to_string())?;
        let width = lo.len();
        out.extend((0..n as u64).map(|i| format!("{:0width$}", a + i)));
    }
    Ok(out)
}

/// Expands Slurm's compressed task counts, e.g. `"4(x2),3"` to `[4, 4, 3]`
/// (`SLURM_TASKS_PER_NODE`, `SLURM_STEP_TASKS_PER_NODE`).
pub fn parse_tasks_per_node(var: &str, s: &str) -> Result<Vec<usize>> {
    let bad = || {
        CommError::invalid(format!(
            "environment variable {var}={s:?} is not a Slurm task list like \"4\", \"4(x2)\" or \"4(x2),3\""
        ))
    };
    let mut out = Vec::new();
    for part in s.trim().split(',') {
        let (count, reps) = match part.split_once("(x") {
            Some((c, r)) => (c, r.strip_suffix(')').ok_or_else(bad)?),
            None => (part, "1"),
        };
        let count: usize = count.trim().parse().map_err(|_| bad())?;
        let reps: usize = reps.trim().parse().map_err(|_| bad())?;
        if reps == 0 || out.len() + reps > MAX_EXPANDED {
            return Err(bad());
        }
        out.resize(out.len() + reps, count);
    }
    if out.is_empty() {
        return Err(bad());
    }
    Ok(out)
}
