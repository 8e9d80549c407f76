//! The TCP store server against hostile and unlucky peers: slow handshakes,
//! floods of idle connections (also under a low descriptor limit), replayed
//! handshakes, and a server that does not know the secret.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use comm_core::auth::Challenge;
use comm_core::{CommError, Store};
use common::{on_threads, rendezvous, T};
use dist_utils::codec::{encode, read_frame, write_frame};
use dist_utils::tcp_store::{client_handshake, TCP_STORE_MAGIC, TCP_STORE_VERSION};
use dist_utils::{ServerOptions, TcpStore, TcpStoreServer};

const SECRET: &[u8] = b"hostile-test-secret";

/// Reads until the server closes the connection; `Err` if it is still open
/// after `limit` (a read timeout is never taken for a close).
fn wait_closed(raw: &mut TcpStream, limit: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    raw.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match raw.read(&mut buf) {
            Ok(0) => return Ok(start.elapsed()),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(start.elapsed()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(format!("still open after {limit:?}"))
            }
            Err(e) => return Err(format!("unexpected error {e}")),
        }
    }
}

#[test]
fn a_handshake_trickled_one_byte_at_a_time_is_cut_at_its_deadline() {
    let deadline = Duration::from_secs(2);
    let srv = TcpStoreServer::bind_with(
        "127.0.0.1:0",
        SECRET,
        ServerOptions::default().handshake_timeout(deadline),
    )
    .unwrap();
    let mut raw = TcpStream::connect(srv.local_addr()).unwrap();
    // The server's challenge arrives first; then we announce a 100-byte answer
    // and send it one byte every 300 ms, each read well within any per-read
    // timeout, so only a deadline for the whole handshake can stop it.
    raw.set_read_timeout(Some(T)).unwrap();
    read_frame(&mut raw, 4096).unwrap();
    let started = Instant::now();
    raw.write_all(&100u64.to_le_bytes()).unwrap();
    let mut sent = 0;
    let closed_after = loop {
        if raw.write_all(&[0u8]).is_err() {
            break started.elapsed();
        }
        sent += 1;
        raw.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        match raw.read(&mut [0u8; 16]) {
            Ok(0) => break started.elapsed(),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break started.elapsed(),
            _ => {}
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "a trickling handshake was kept open for 20 s ({sent} bytes sent)"
        );
    };
    assert!(sent >= 3, "closed after only {sent} byte(s)");
    assert!(
        closed_after >= deadline - Duration::from_millis(100),
        "closed after {closed_after:?}, before the {deadline:?} deadline"
    );
    assert!(
        closed_after < deadline + Duration::from_secs(5),
        "closed after {closed_after:?}, long past the {deadline:?} deadline"
    );
    // Honest clients are served as before.
    let s = TcpStore::connect(srv.local_addr(), SECRET, T).unwrap();
    s.set("k", b"v").unwrap();
}

#[test]
fn idle_connections_over_the_cap_close_the_oldest_and_clients_still_join() {
    const CAP: usize = 16;
    const IDLE: usize = 300;
    let srv = TcpStoreServer::bind_with(
        "127.0.0.1:0",
        SECRET,
        ServerOptions::default().max_unauthenticated(CAP),
    )
    .unwrap();
    let addr = srv.local_addr();
    // An authenticated client connected before the flood is never touched.
    let early = TcpStore::connect(addr, SECRET, T).unwrap();
    let mut idle = Vec::new();
    for i in 0..IDLE {
        let mut c = TcpStream::connect(addr).unwrap();
        if i % 3 == 0 {
            // Some start a handshake and stop.
            c.write_all(&[7, 0, 0]).unwrap();
        }
        idle.push(c);
    }
    assert!(common::eventually(Duration::from_secs(10), || srv
        .num_unauthenticated()
        <= CAP));
    // A rendezvous of 8 clients, each with its own connections, completes
    // while the idle connections stay open on our side.
    let all = on_threads(8, move |rank| {
        let s = TcpStore::connect(addr, SECRET, Duration::from_secs(60)).unwrap();
        rendezvous(&s, rank, 8, "flood")
    });
    for got in all {
        assert_eq!(got, (0..8).map(|r| format!("rank-{r}")).collect::<Vec<_>>());
    }
    assert_eq!(early.get("flood/joined", T).unwrap(), b"8");
    assert!(srv.num_unauthenticated() <= CAP);
    // The oldest idle connections were closed by the server.
    let first_closed = wait_closed(&mut idle[0], T);
    assert!(first_closed.is_ok(), "{first_closed:?}");
}

const FLOOD_CHILD: &str = "DIST_UTILS_FLOOD_SERVER_FD_LIMIT";

/// Child process of `a_server_out_of_descriptors_still_serves_a_rendezvous`:
/// a server with a low descriptor limit and no cap of its own (so it runs
/// into EMFILE), serving until standard input closes. No-op otherwise.
#[test]
fn flood_server_child() {
    let Ok(limit) = std::env::var(FLOOD_CHILD) else {
        return;
    };
    let limit: u64 = limit.parse().unwrap();
    rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(limit),
            maximum: Some(limit),
        },
    )
    .unwrap();
    let srv = TcpStoreServer::bind_with(
        "127.0.0.1:0",
        SECRET,
        ServerOptions::default().max_unauthenticated(100_000),
    )
    .unwrap();
    println!("PORT {}", srv.local_addr().port());
    std::io::stdout().flush().unwrap();
    let mut sink = String::new();
    let _ = std::io::stdin().read_to_string(&mut sink);
    println!(
        "END connections={} unauthenticated={}",
        srv.num_connections(),
        srv.num_unauthenticated()
    );
}

#[test]
fn a_server_out_of_descriptors_still_serves_a_rendezvous() {
    const LIMIT: u64 = 64;
    const IDLE: usize = 200;
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "flood_server_child",
            "--nocapture",
            "--test-threads=1",
            "-q",
        ])
        .env(FLOOD_CHILD, LIMIT.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    // The test harness prints its own lines first.
    let port = loop {
        let mut line = String::new();
        use std::io::BufRead;
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "the child ended early"
        );
        if let Some(p) = line.trim().strip_prefix("PORT ") {
            break p.parse::<u16>().unwrap();
        }
    };
    // More idle connections than the server has descriptors.
    let idle: Vec<TcpStream> = (0..IDLE)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    assert!(idle.len() > LIMIT as usize, "only {} connected", idle.len());
    let started = Instant::now();
    let all = on_threads(4, move |rank| {
        let s = TcpStore::connect(("127.0.0.1", port), SECRET, Duration::from_secs(60)).unwrap();
        rendezvous(&s, rank, 4, "emfile")
    });
    for got in all {
        assert_eq!(got.len(), 4);
    }
    // Served by evicting idle connections, not by waiting out their
    // 10 s handshake deadline.
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the rendezvous took {:?}",
        started.elapsed()
    );
    drop(child.stdin.take());
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert!(child.wait().unwrap().success(), "{rest}");
    // The server ran at its descriptor limit: it held about as many
    // connections as it had descriptors, never more.
    let held: usize = rest
        .split("END connections=")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no END line in {rest:?}"));
    assert!(
        held >= LIMIT as usize / 2 && held <= LIMIT as usize,
        "held {held} connections"
    );
    drop(idle);
}

/// A stream that records what passes through it, both ways.
struct Recorder<'a> {
    inner: &'a TcpStream,
    sent: Vec<u8>,
    received: Vec<u8>,
}

impl Read for Recorder<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.received.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

impl Write for Recorder<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sent.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[test]
fn a_recorded_handshake_replayed_is_refused_and_the_secret_never_crosses_the_wire() {
    let secret = b"0123456789abcdef-the-job-secret".to_vec();
    let srv = TcpStoreServer::bind("127.0.0.1:0", &secret).unwrap();
    // A real client's handshake, recorded.
    let stream = TcpStream::connect(srv.local_addr()).unwrap();
    stream.set_read_timeout(Some(T)).unwrap();
    let mut rec = Recorder {
        inner: &stream,
        sent: Vec::new(),
        received: Vec::new(),
    };
    client_handshake(&mut rec, &secret).unwrap();
    for (dir, bytes) in [("sent", &rec.sent), ("received", &rec.received)] {
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_slice()),
            "the secret was {dir} in clear"
        );
    }
    // The recorded connection works.
    let mut s = &stream;
    write_frame(&mut s, &encode(&(7u8,)).unwrap()).unwrap(); // NumKeys
    assert_eq!(read_frame(&mut s, 64).unwrap()[0], 5, "a Count reply");

    // Replayed on a new connection: the server's challenge is new, the
    // recorded answer does not match it.
    let mut replay = TcpStream::connect(srv.local_addr()).unwrap();
    replay.set_read_timeout(Some(T)).unwrap();
    let fresh = read_frame(&mut replay, 4096).unwrap();
    let first = &rec.received[8..8 + fresh.len()];
    assert_ne!(fresh, first, "the server repeated its challenge");
    replay.write_all(&rec.sent).unwrap();
    let verdict = read_frame(&mut replay, 4096).unwrap();
    assert_eq!(verdict[0], 1, "expected Refused, got {verdict:?}");
    assert!(String::from_utf8_lossy(&verdict).contains("wrong job secret"));
    assert!(wait_closed(&mut replay, T).is_ok());
    // And a request sent anyway gets nothing.
    let _ = write_frame(&mut replay, &encode(&(7u8,)).unwrap());
    assert!(wait_closed(&mut replay, T).is_ok());
}

#[test]
fn a_server_that_does_not_know_the_secret_is_refused_by_the_client() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let fake = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        c.set_read_timeout(Some(T)).unwrap();
        // A well-formed challenge from a server that holds another secret.
        let ch = Challenge::new(b"not the secret", "dist-utils tcp store").unwrap();
        let hello = (TCP_STORE_MAGIC, TCP_STORE_VERSION, ch.hello().to_vec());
        write_frame(&mut c, &encode(&hello).unwrap()).unwrap();
        let answer = read_frame(&mut c, 4096).unwrap();
        seen2.lock().unwrap().extend_from_slice(&answer);
        // "Accepted", with a proof it cannot compute.
        write_frame(&mut c, &encode(&(0u8, vec![0u8; 32])).unwrap()).unwrap();
        let _ = c.read(&mut [0u8; 1]);
    });
    let e = TcpStore::connect(addr, SECRET, T).unwrap_err();
    match &e {
        CommError::Protocol(m) => assert!(m.contains("prove"), "{m}"),
        other => panic!("expected Protocol, got {other:?}"),
    }
    fake.join().unwrap();
    assert!(!seen.lock().unwrap().is_empty());
}

#[test]
fn a_client_of_another_version_is_refused_with_a_reason() {
    let srv = TcpStoreServer::bind("127.0.0.1:0", SECRET).unwrap();
    let mut raw = TcpStream::connect(srv.local_addr()).unwrap();
    raw.set_read_timeout(Some(T)).unwrap();
    read_frame(&mut raw, 4096).unwrap();
    let old = (TCP_STORE_MAGIC, 1u32, vec![0u8; 64]);
    write_frame(&mut raw, &encode(&old).unwrap()).unwrap();
    let verdict = read_frame(&mut raw, 4096).unwrap();
    assert_eq!(verdict[0], 1);
    assert!(String::from_utf8_lossy(&verdict).contains("version 1"));
    // The server stays healthy.
    let s = TcpStore::connect(srv.local_addr(), SECRET, T).unwrap();
    assert_eq!(s.add("n", 1).unwrap(), 1);
}
