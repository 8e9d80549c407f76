//! Store tests: TcpStore under concurrency and failure, FileStore across
//! threads and a child process, PrefixStore isolation, and the semantics
//! every store shares.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use comm_core::{CommError, Store};
use common::{assert_timeout_names, check_add_refuses_text, check_store_semantics, eventually, T};
use dist_utils::codec::{encode, write_frame};
use dist_utils::tcp_store::client_handshake;
use dist_utils::{FileStore, HashStore, PrefixStore, TcpStore, TcpStoreServer};

const SECRET: &[u8] = b"test-job-secret";

fn server() -> TcpStoreServer {
    TcpStoreServer::bind("127.0.0.1:0", SECRET).unwrap()
}

fn client(s: &TcpStoreServer) -> TcpStore {
    TcpStore::connect(s.local_addr(), SECRET, T).unwrap()
}

#[test]
fn semantics_of_every_store() {
    check_store_semantics(&HashStore::new());
    check_add_refuses_text(&HashStore::new());

    let srv = server();
    check_store_semantics(&client(&srv));
    check_add_refuses_text(&client(&srv));

    let dir = tempfile::tempdir().unwrap();
    check_store_semantics(&FileStore::new(dir.path().join("store")).unwrap());
    check_add_refuses_text(&FileStore::new(dir.path().join("store")).unwrap());

    let base: Arc<dyn Store> = Arc::new(HashStore::new());
    check_store_semantics(&PrefixStore::new("p", base.clone()));
    let tcp: Arc<dyn Store> = Arc::new(client(&srv));
    check_store_semantics(&PrefixStore::new("p", tcp));
}

#[test]
fn store_types_are_shareable() {
    fn check<S: Store + Clone + Send + Sync + 'static>() {}
    check::<TcpStore>();
    check::<FileStore>();
    check::<PrefixStore>();
}

#[test]
fn tcp_store_many_concurrent_clients() {
    const CLIENTS: usize = 16;
    const ROUNDS: usize = 40;
    let srv = server();
    let addr = srv.local_addr();
    let handles: Vec<_> = (0..CLIENTS)
        .map(|i| {
            std::thread::spawn(move || {
                // Each thread has its own client (and so its own connections).
                let s = TcpStore::connect(addr, SECRET, T).unwrap();
                for j in 0..ROUNDS {
                    s.set(&format!("c{i}/k{j}"), format!("v{i}-{j}").as_bytes())
                        .unwrap();
                    s.add("counter", (i + 1) as i64).unwrap();
                    // Read a neighbour's key: blocks server-side until it is written.
                    let peer = (i + 1) % CLIENTS;
                    let v = s.get(&format!("c{peer}/k{j}"), T).unwrap();
                    assert_eq!(v, format!("v{peer}-{j}").as_bytes());
                }
                s.add("finished", 1).unwrap();
                let all: Vec<String> = (0..CLIENTS)
                    .map(|c| format!("c{c}/k{}", ROUNDS - 1))
                    .collect();
                let refs: Vec<&str> = all.iter().map(String::as_str).collect();
                s.wait(&refs, T).unwrap();
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let s = client(&srv);
    let expected: i64 = (1..=CLIENTS as i64).sum::<i64>() * ROUNDS as i64;
    assert_eq!(s.add("counter", 0).unwrap(), expected);
    assert_eq!(
        s.get("finished", T).unwrap(),
        CLIENTS.to_string().as_bytes()
    );
    for i in 0..CLIENTS {
        for j in 0..ROUNDS {
            assert_eq!(
                s.get(&format!("c{i}/k{j}"), T).unwrap(),
                format!("v{i}-{j}").as_bytes()
            );
        }
    }
    assert_eq!(s.num_keys().unwrap(), CLIENTS * ROUNDS + 2);
}

#[test]
fn tcp_store_clone_blocking_get_does_not_block_other_threads() {
    let srv = server();
    let s = client(&srv);
    let s2 = s.clone();
    let waiter = std::thread::spawn(move || s2.get("late", T).unwrap());
    // Another thread of the same process sets the key through the same pool.
    let s3 = s.clone();
    std::thread::spawn(move || {
        s3.set("other", b"x").unwrap();
        s3.set("late", b"here").unwrap();
    })
    .join()
    .unwrap();
    assert_eq!(waiter.join().unwrap(), b"here");
    assert_eq!(s.try_get("other").unwrap().as_deref(), Some(&b"x"[..]));
}

#[test]
fn tcp_store_get_past_deadline_names_key() {
    let srv = server();
    let s = client(&srv);
    let started = Instant::now();
    let e = s
        .get("never/written", Duration::from_millis(200))
        .unwrap_err();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(190) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    assert_timeout_names(e, "never/written");
    // The connection is still usable afterwards.
    s.set("k", b"v").unwrap();
    assert_eq!(s.get("k", T).unwrap(), b"v");
}

#[test]
fn tcp_store_wrong_secret_is_refused_and_server_keeps_serving() {
    let srv = server();
    let good = client(&srv);
    good.set("before", b"1").unwrap();

    let started = Instant::now();
    let e = TcpStore::connect(srv.local_addr(), b"wrong", T).unwrap_err();
    // Refused at once, not retried until the deadline.
    assert!(started.elapsed() < Duration::from_secs(3));
    match &e {
        CommError::Protocol(m) => assert!(
            m.contains("refused") && m.contains("wrong job secret"),
            "{m}"
        ),
        other => panic!("expected Protocol, got {other:?}"),
    }
    let e = TcpStore::connect(srv.local_addr(), b"", T).unwrap_err();
    assert!(matches!(e, CommError::Protocol(_)), "{e:?}");

    // A stranger speaking another protocol is refused too.
    let mut raw = TcpStream::connect(srv.local_addr()).unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    drop(raw);

    assert_eq!(good.get("before", T).unwrap(), b"1");
    let fresh = client(&srv);
    fresh.set("after", b"2").unwrap();
    assert_eq!(good.get("after", T).unwrap(), b"2");
}

/// A raw connection that has done the handshake.
fn raw_authenticated(srv: &TcpStoreServer) -> TcpStream {
    let mut raw = TcpStream::connect(srv.local_addr()).unwrap();
    raw.set_read_timeout(Some(T)).unwrap();
    client_handshake(&mut raw, SECRET).unwrap();
    raw
}

/// True once the server has closed `raw` (end of stream or reset); a read
/// that times out means the connection is still open and fails the test.
fn closed_by_server(raw: &mut TcpStream) -> bool {
    raw.set_read_timeout(Some(T)).unwrap();
    let mut buf = [0u8; 64];
    loop {
        match raw.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // a refusal or error reply before the close
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false
            }
            Err(e) => panic!("unexpected error reading from the server: {e}"),
        }
    }
}

#[test]
fn tcp_store_client_killed_mid_request_does_not_affect_others() {
    let srv = server();
    let a = client(&srv);
    let a2 = a.clone();
    let waiter = std::thread::spawn(move || a2.get("after-kill", T).unwrap());

    // Half a handshake, then gone.
    let mut raw = TcpStream::connect(srv.local_addr()).unwrap();
    raw.write_all(&100u64.to_le_bytes()).unwrap();
    raw.write_all(&[1, 2, 3]).unwrap();
    drop(raw);

    // Authenticated, then half a request frame (announces 100 bytes, sends 10), then gone.
    let mut raw = raw_authenticated(&srv);
    raw.write_all(&100u64.to_le_bytes()).unwrap();
    raw.write_all(&[0u8; 10]).unwrap();
    drop(raw);

    // The server ends the threads of both half-dead connections; what is left is
    // `a`'s connection, held by the blocked get.
    assert!(
        eventually(Duration::from_secs(5), || srv.num_connections() == 1),
        "{} connection(s) open",
        srv.num_connections()
    );

    // Authenticated, a whole blocking get (variant 1: key, timeout_ms), then gone
    // while the server blocks on it: the server notices and ends that thread.
    let before = srv.num_connections();
    let mut raw = raw_authenticated(&srv);
    write_frame(&mut raw, &encode(&(1u8, "never", 60_000u64)).unwrap()).unwrap();
    assert!(eventually(Duration::from_secs(5), || srv.num_connections() > before));
    drop(raw);
    assert!(
        eventually(Duration::from_secs(5), || srv.num_connections() <= before),
        "the server kept the dead client's thread: {} connection(s)",
        srv.num_connections()
    );

    let b = client(&srv);
    b.set("after-kill", b"ok").unwrap();
    assert_eq!(waiter.join().unwrap(), b"ok");
    assert_eq!(a.add("n", 3).unwrap(), 3);
    assert_eq!(b.add("n", 4).unwrap(), 7);
}

#[test]
fn tcp_store_oversized_frame_is_a_protocol_error_not_an_allocation() {
    let srv = server();
    let mut raw = raw_authenticated(&srv);
    raw.write_all(&u64::MAX.to_le_bytes()).unwrap();
    // The server closes the connection instead of allocating.
    assert!(
        closed_by_server(&mut raw),
        "the server kept the connection open"
    );
    let s = client(&srv);
    s.set("still", b"alive").unwrap();
}

#[test]
fn tcp_store_connect_retries_until_the_server_is_up() {
    // Reserve a free port, release it, and start the server there a little later.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let a = addr.clone();
    let connecting = std::thread::spawn(move || TcpStore::connect(a.as_str(), SECRET, T));
    std::thread::sleep(Duration::from_millis(150));
    let srv = TcpStoreServer::bind(addr.as_str(), SECRET).unwrap();
    let s = connecting.join().unwrap().unwrap();
    s.set("k", b"v").unwrap();
    assert_eq!(client(&srv).get("k", T).unwrap(), b"v");
}

#[test]
fn tcp_store_connect_to_nothing_times_out() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = Instant::now();
    let e = TcpStore::connect(("127.0.0.1", port), SECRET, Duration::from_millis(200)).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(matches!(e, CommError::Timeout { .. }), "{e:?}");
    assert!(e.to_string().contains(&port.to_string()), "{e}");
}

#[test]
fn tcp_store_server_drop_wakes_blocked_clients_and_joins() {
    let srv = server();
    let s = client(&srv);
    let s2 = s.clone();
    // Whether or not the get has reached the server when it goes away, the
    // client must get an error quickly rather than wait 60 s.
    let blocked = std::thread::spawn(move || s2.get("never", Duration::from_secs(60)));
    assert!(eventually(Duration::from_secs(5), || srv.num_connections() >= 1));
    let started = Instant::now();
    drop(srv);
    let r = blocked.join().unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        matches!(r, Err(CommError::Aborted(_)) | Err(CommError::Io { .. })),
        "{r:?}"
    );
    assert!(s.set("k", b"v").is_err());
}

#[test]
fn tcp_store_serve_hosts_the_server() {
    let host = TcpStore::serve("127.0.0.1:0", SECRET, T).unwrap();
    let addr = host.server().unwrap().local_addr();
    let other = TcpStore::connect(addr, SECRET, T).unwrap();
    other.set("x", b"1").unwrap();
    assert_eq!(host.get("x", T).unwrap(), b"1");
}

const CHILD_ENV: &str = "DIST_UTILS_FILE_STORE_CHILD";
const FILE_ROUNDS: i64 = 40;

/// Runs in a child process spawned by `file_store_threads_and_a_child_process`;
/// a no-op otherwise.
#[test]
fn file_store_child_process_part() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let s = FileStore::new(path).unwrap();
    for j in 0..FILE_ROUNDS {
        s.add("counter", 1).unwrap();
        s.set(&format!("child/{j}"), format!("c{j}").as_bytes())
            .unwrap();
    }
    // Wait for the parent's threads, proving blocking gets see other processes' writes.
    s.get("parent/done", T).unwrap();
    s.set("child/done", b"1").unwrap();
}

#[test]
fn file_store_threads_and_a_child_process() {
    const THREADS: i64 = 4;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let s = FileStore::new(&path).unwrap();

    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "file_store_child_process_part",
            "--test-threads=1",
            "-q",
        ])
        .env(CHILD_ENV, &path)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();

    let handles: Vec<_> = (0..THREADS)
        .map(|i| {
            let s = s.clone();
            std::thread::spawn(move || {
                for j in 0..FILE_ROUNDS {
                    s.add("counter", 1).unwrap();
                    s.set(&format!("t{i}/{j}"), format!("{i}-{j}").as_bytes())
                        .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    s.set("parent/done", b"1").unwrap();
    s.get("child/done", T).unwrap();
    assert!(child.wait().unwrap().success());

    assert_eq!(s.add("counter", 0).unwrap(), (THREADS + 1) * FILE_ROUNDS);
    for j in 0..FILE_ROUNDS {
        assert_eq!(
            s.get(&format!("child/{j}"), T).unwrap(),
            format!("c{j}").as_bytes()
        );
        for i in 0..THREADS {
            assert_eq!(
                s.get(&format!("t{i}/{j}"), T).unwrap(),
                format!("{i}-{j}").as_bytes()
            );
        }
    }
    // A second handle on the same path sees the same keys.
    assert_eq!(
        FileStore::new(&path).unwrap().num_keys().unwrap(),
        s.num_keys().unwrap()
    );
}

#[test]
fn file_store_rejects_a_foreign_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("not-a-store");
    std::fs::write(&path, b"hello world, not a store").unwrap();
    let s = FileStore::new(&path).unwrap();
    assert!(matches!(s.try_get("k"), Err(CommError::Protocol(_))));
}

#[test]
fn prefix_store_isolation() {
    let base: Arc<dyn Store> = Arc::new(HashStore::new());
    let a = PrefixStore::new("a", base.clone());
    let b = PrefixStore::new("b", base.clone());
    a.set("k", b"from a").unwrap();
    b.set("k", b"from b").unwrap();
    assert_eq!(a.get("k", T).unwrap(), b"from a");
    assert_eq!(b.get("k", T).unwrap(), b"from b");
    assert_eq!(
        base.try_get("a/k").unwrap().as_deref(),
        Some(&b"from a"[..])
    );
    assert_eq!(a.add("n", 2).unwrap(), 2);
    assert_eq!(b.add("n", 5).unwrap(), 5);
    assert!(a.delete("k").unwrap());
    assert_eq!(a.try_get("k").unwrap(), None);
    assert_eq!(b.try_get("k").unwrap().as_deref(), Some(&b"from b"[..]));
    // A key set only under `b` is not visible under `a`.
    let e = a.wait(&["n", "only-b"], Duration::from_millis(30));
    b.set("only-b", b"").unwrap();
    assert_timeout_names(e.unwrap_err(), "only-b");
    // Nested prefixes compose.
    let nested = PrefixStore::new("inner", Arc::new(a.clone()));
    nested.set("x", b"1").unwrap();
    assert_eq!(
        base.try_get("a/inner/x").unwrap().as_deref(),
        Some(&b"1"[..])
    );
}
