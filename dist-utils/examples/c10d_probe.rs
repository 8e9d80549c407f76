//! Exercises our c10d store against a real PyTorch TCPStore (driven by
//! `benches/peers/c10d_store_check.py`), one line `PASS|FAIL <op>` per check.
//!
//! - `c10d_probe client HOST PORT`: our [`C10dStore`] against the server at
//!   HOST:PORT (a `torch.distributed.TCPStore`, which has set `py/hello` to
//!   `from python` beforehand); leaves `rs/hello` = `from rust` for Python.
//! - `c10d_probe serve`: hosts our [`C10dServer`], prints `PORT <n>`, and
//!   serves until standard input closes (the Python side then connects a
//!   torch client).
//! - `c10d_probe rendezvous`: one rank started by a launcher (torchrun):
//!   reads its environment, opens the rendezvous store with
//!   `init_store("env://")` and gathers every rank's entry.
//!
//! Exits 1 if any check failed.

use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

use comm_core::{CommError, Store};
use dist_utils::c10d::{C10dServer, C10dStore};

const T: Duration = Duration::from_secs(10);

struct Report {
    failed: usize,
}

impl Report {
    fn check(&mut self, op: &str, ok: Result<bool, CommError>) {
        match ok {
            Ok(true) => println!("PASS {op}"),
            Ok(false) => {
                self.failed += 1;
                println!("FAIL {op}");
            }
            Err(e) => {
                self.failed += 1;
                println!("FAIL {op}: {e}");
            }
        }
    }
}

fn client(host: &str, port: u16) -> Result<usize, CommError> {
    let mut r = Report { failed: 0 };
    let s = match C10dStore::connect((host, port), T) {
        Ok(s) => {
            println!("PASS connect+validate");
            s
        }
        Err(e) => {
            println!("FAIL connect+validate: {e}");
            return Ok(1);
        }
    };
    r.check(
        "get of a key Python set",
        s.get("py/hello", T).map(|v| v == b"from python"),
    );
    r.check(
        "set/get",
        s.set("rs/k", b"v1")
            .and_then(|()| s.get("rs/k", T))
            .map(|v| v == b"v1"),
    );
    r.check(
        "try_get present/absent",
        s.try_get("rs/k")
            .and_then(|a| Ok((a, s.try_get("rs/none")?)))
            .map(|(a, b)| a.as_deref() == Some(&b"v1"[..]) && b.is_none()),
    );
    r.check(
        "add",
        s.add("rs/n", 5)
            .and_then(|a| Ok((a, s.add("rs/n", -2)?)))
            .map(|(a, b)| a == 5 && b == 3),
    );
    r.check(
        "add value is decimal text",
        s.get("rs/n", T).map(|v| v == b"3"),
    );
    r.check(
        "compare_set absent/expected absent",
        s.compare_set("rs/cs", None, b"one").map(|v| v == b"one"),
    );
    r.check(
        "compare_set wrong expectation",
        s.compare_set("rs/cs", Some(b"x"), b"two")
            .map(|v| v == b"one"),
    );
    r.check(
        "compare_set swap",
        s.compare_set("rs/cs", Some(b"one"), b"two")
            .map(|v| v == b"two"),
    );
    r.check(
        "compare_set absent/expected present",
        s.compare_set("rs/cs-absent", Some(b"x"), b"y")
            .and_then(|v| Ok(v.is_empty() && s.try_get("rs/cs-absent")?.is_none())),
    );
    r.check(
        "check",
        s.check(&["rs/k", "rs/n"])
            .and_then(|a| Ok(a && !s.check(&["rs/k", "rs/none"])?)),
    );
    r.check(
        "wait present",
        s.wait(&["rs/k", "py/hello"], T).map(|()| true),
    );
    let started = Instant::now();
    r.check(
        "wait timeout names the missing key",
        match s.wait(&["rs/k", "rs/never"], Duration::from_millis(300)) {
            Err(CommError::Timeout { keys, .. }) => {
                Ok(keys == ["rs/never"] && started.elapsed() >= Duration::from_millis(290))
            }
            Ok(()) => Ok(false),
            Err(e) => Err(e),
        },
    );
    r.check(
        "connection usable after a cancelled wait",
        s.get("rs/k", T).map(|v| v == b"v1"),
    );
    r.check(
        "get timeout",
        match s.get("rs/never", Duration::from_millis(200)) {
            Err(CommError::Timeout { keys, .. }) => Ok(keys == ["rs/never"]),
            _ => Ok(false),
        },
    );
    let before = s.num_keys()?;
    r.check(
        "delete",
        s.delete("rs/k")
            .and_then(|a| Ok((a, s.delete("rs/k")?)))
            .map(|(a, b)| a && !b),
    );
    r.check("num_keys", s.num_keys().map(|n| n + 1 == before));
    let other = s.clone();
    let waiter = std::thread::spawn(move || other.get("rs/late", T));
    std::thread::sleep(Duration::from_millis(100));
    r.check("set wakes a blocked get", {
        s.set("rs/late", b"here")?;
        Ok(waiter
            .join()
            .map(|v| v.ok() == Some(b"here".to_vec()))
            .unwrap_or(false))
    });
    r.check(
        "leave a key for Python",
        s.set("rs/hello", b"from rust").map(|()| true),
    );
    Ok(r.failed)
}

fn serve() -> Result<usize, CommError> {
    let server = C10dServer::bind("127.0.0.1:0")?;
    println!("PORT {}", server.local_addr().port());
    std::io::stdout().flush().ok();
    // Serve until the driver closes our standard input.
    let mut line = String::new();
    while std::io::stdin().lock().read_line(&mut line).unwrap_or(0) > 0 {
        line.clear();
    }
    Ok(0)
}

fn rendezvous() -> Result<usize, CommError> {
    let info = dist_utils::RankInfo::from_env()?;
    let store = dist_utils::init_store("env://", &info, T)?;
    let (rank, world) = (info.rank, info.world_size);
    store.set(&format!("probe/{rank}"), rank.to_string().as_bytes())?;
    let keys: Vec<String> = (0..world).map(|r| format!("probe/{r}")).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    store.wait(&refs, T)?;
    let mut seen = Vec::new();
    for k in &keys {
        seen.push(String::from_utf8_lossy(&store.get(k, T)?).into_owned());
    }
    let ok = seen == (0..world).map(|r| r.to_string()).collect::<Vec<_>>();
    println!(
        "{} rendezvous rank {rank}/{world} (agent store: {}, local rank {}/{}): saw {seen:?}",
        if ok { "PASS" } else { "FAIL" },
        info.agent_store,
        info.local_rank,
        info.local_world_size
    );
    Ok(usize::from(!ok))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let res = match args.get(1).map(String::as_str) {
        Some("client") if args.len() == 4 => match args[3].parse::<u16>() {
            Ok(port) => client(&args[2], port),
            Err(_) => Err(CommError::invalid("PORT must be a number")),
        },
        Some("serve") => serve(),
        Some("rendezvous") => rendezvous(),
        _ => Err(CommError::invalid(
            "usage: c10d_probe client HOST PORT | c10d_probe serve | c10d_probe rendezvous",
        )),
    };
    match res {
        Ok(0) => {}
        Ok(n) => {
            eprintln!("{n} check(s) failed");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
