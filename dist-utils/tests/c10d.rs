//! Our c10d client against our c10d server: every operation, timeouts,
//! concurrency, the validation handshake, and PyTorch's wire semantics seen
//! on raw sockets. (Against a real PyTorch TCPStore:
//! `benches/peers/c10d_store_check.py`, run by hand.)

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use comm_core::{CommError, Store};
use common::{assert_timeout_names, check_store_semantics, eventually, on_threads, T};
use dist_utils::c10d::{C10dServer, C10dStore, VALIDATION_MAGIC};
use dist_utils::{PrefixStore, ServerOptions};

fn pair() -> (C10dServer, C10dStore) {
    let srv = C10dServer::bind("127.0.0.1:0").unwrap();
    let c = C10dStore::connect(srv.local_addr(), T).unwrap();
    (srv, c)
}

/// A raw, validated connection.
fn raw(srv: &C10dServer) -> TcpStream {
    let mut s = TcpStream::connect(srv.local_addr()).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut q = vec![0u8];
    q.extend_from_slice(&VALIDATION_MAGIC.to_le_bytes());
    s.write_all(&q).unwrap();
    s
}

fn string(b: &[u8]) -> Vec<u8> {
    let mut v = (b.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(b);
    v
}

fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).unwrap();
    b
}

fn read_vec(s: &mut TcpStream) -> Vec<u8> {
    let len = u64::from_le_bytes(read_n(s, 8).try_into().unwrap());
    read_n(s, len as usize)
}

fn closed(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(T)).unwrap();
    match s.read(&mut [0u8; 16]) {
        Ok(0) => true,
        Err(e) if e.kind() == ErrorKind::ConnectionReset => true,
        Ok(_) => panic!("unexpected reply"),
        Err(e) => panic!("still open (or failed): {e}"),
    }
}

#[test]
fn every_store_operation() {
    let (_srv, c) = pair();
    check_store_semantics(&c);
    // check(), and prefixes compose as PyTorch's PrefixStore does.
    c.set("a", b"1").unwrap();
    assert!(c.check(&["a"]).unwrap());
    assert!(!c.check(&["a", "b"]).unwrap());
    assert!(c.check(&[]).unwrap());
    let p = PrefixStore::new("/worker/attempt_0", std::sync::Arc::new(c.clone()));
    p.set("k", b"v").unwrap();
    assert_eq!(c.get("/worker/attempt_0/k", T).unwrap(), b"v");
    // A large value (beyond one read) travels whole.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    c.set("big", &big).unwrap();
    assert_eq!(c.get("big", T).unwrap(), big);
}

#[test]
fn get_and_wait_time_out_naming_keys_and_the_connection_stays_usable() {
    let (_srv, c) = pair();
    c.set("here", b"1").unwrap();
    let started = Instant::now();
    let e = c.get("never", Duration::from_millis(200)).unwrap_err();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(190) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    assert_timeout_names(e, "never");
    let e = c
        .wait(&["here", "absent"], Duration::from_millis(100))
        .unwrap_err();
    assert_timeout_names(e, "absent");
    // The cancelled waits left every pooled connection in sync.
    for _ in 0..20 {
        assert_eq!(c.get("here", T).unwrap(), b"1");
    }
}

#[test]
fn a_set_wakes_blocked_getters_of_other_clients() {
    let (srv, c) = pair();
    let addr = srv.local_addr();
    let got = on_threads(6, move |i| {
        let s = C10dStore::connect(addr, T).unwrap();
        if i == 0 {
            std::thread::sleep(Duration::from_millis(50));
            s.set("late", b"now").unwrap();
            b"now".to_vec()
        } else {
            s.get("late", T).unwrap()
        }
    });
    assert!(got.iter().all(|v| v == b"now"));
    assert_eq!(c.try_get("late").unwrap().as_deref(), Some(&b"now"[..]));
}

#[test]
fn concurrent_clients_exact_counts() {
    let (srv, c) = pair();
    let addr = srv.local_addr();
    on_threads(8, move |i| {
        let s = C10dStore::connect(addr, T).unwrap();
        for j in 0..50 {
            s.add("total", (i + 1) as i64).unwrap();
            s.set(&format!("k{i}/{j}"), &[i as u8, j as u8]).unwrap();
        }
    });
    c.set("go", b"").unwrap();
    assert_eq!(c.add("total", 0).unwrap(), (1..=8).sum::<i64>() * 50);
    assert_eq!(c.get("k7/49", T).unwrap(), [7, 49]);
    assert_eq!(c.num_keys().unwrap(), 8 * 50 + 2);
}

#[test]
fn wrong_magic_and_strangers_are_closed_at_once() {
    let srv = C10dServer::bind("127.0.0.1:0").unwrap();
    let mut s = TcpStream::connect(srv.local_addr()).unwrap();
    let mut q = vec![0u8];
    q.extend_from_slice(&0xdead_beefu32.to_le_bytes());
    s.write_all(&q).unwrap();
    assert!(closed(&mut s), "wrong magic kept open");
    // A query before VALIDATE.
    let mut s = TcpStream::connect(srv.local_addr()).unwrap();
    s.write_all(&[7]).unwrap();
    assert!(closed(&mut s), "unvalidated query kept open");
    // Another protocol.
    let mut s = TcpStream::connect(srv.local_addr()).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert!(closed(&mut s));
    // Our client to a server of another protocol fails fast with a reason.
    let ours = dist_utils::TcpStoreServer::bind("127.0.0.1:0", b"s").unwrap();
    let started = Instant::now();
    assert!(C10dStore::connect(ours.local_addr(), T).is_err());
    assert!(started.elapsed() < Duration::from_secs(5));
    // Healthy clients are unaffected.
    let c = C10dStore::connect(srv.local_addr(), T).unwrap();
    assert_eq!(c.add("n", 2).unwrap(), 2);
}

#[test]
fn unvalidated_connections_have_a_deadline_and_a_cap() {
    let srv = C10dServer::bind_with(
        "127.0.0.1:0",
        ServerOptions::default()
            .handshake_timeout(Duration::from_secs(1))
            .max_unauthenticated(4),
    )
    .unwrap();
    let mut idle: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(srv.local_addr()).unwrap())
        .collect();
    assert!(eventually(T, || srv.num_unauthenticated() <= 4));
    let c = C10dStore::connect(srv.local_addr(), T).unwrap();
    c.set("k", b"v").unwrap();
    // The newest idle one is cut at the deadline, not kept.
    let last = idle.last_mut().unwrap();
    let started = Instant::now();
    assert!(closed(last));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(eventually(T, || srv.num_unauthenticated() == 0));
    assert_eq!(c.get("k", T).unwrap(), b"v");
}

#[test]
fn raw_protocol_matches_pytorch_semantics() {
    let srv = C10dServer::bind("127.0.0.1:0").unwrap();
    let mut s = raw(&srv);
    // PING echoes its nonce.
    let mut q = vec![13u8];
    q.extend_from_slice(&0x1234_5678u32.to_le_bytes());
    s.write_all(&q).unwrap();
    assert_eq!(read_n(&mut s, 4), 0x1234_5678u32.to_le_bytes());
    // SET has no reply; GET of an absent key answers an empty vector.
    let mut q = vec![1u8];
    q.extend(string(b"/a"));
    q.extend(string(b"xy"));
    q.push(3);
    q.extend(string(b"/a"));
    q.push(3);
    q.extend(string(b"/none"));
    s.write_all(&q).unwrap();
    assert_eq!(read_vec(&mut s), b"xy");
    assert_eq!(read_vec(&mut s), b"");
    // COMPARE_SET on an absent key with an expected value answers it back.
    let mut q = vec![2u8];
    q.extend(string(b"/cs"));
    q.extend(string(b"exp"));
    q.extend(string(b"new"));
    s.write_all(&q).unwrap();
    assert_eq!(read_vec(&mut s), b"exp");
    // APPEND, MULTI_SET, MULTI_GET.
    let mut q = vec![9u8];
    q.extend(string(b"/a"));
    q.extend(string(b"z"));
    q.push(11);
    q.extend(2u64.to_le_bytes());
    q.extend(string(b"/m1"));
    q.extend(string(b"1"));
    q.extend(string(b"/m2"));
    q.extend(string(b"2"));
    q.push(10);
    q.extend(3u64.to_le_bytes());
    for k in [&b"/a"[..], b"/m1", b"/m2"] {
        q.extend(string(k));
    }
    s.write_all(&q).unwrap();
    assert_eq!(read_vec(&mut s), b"xyz");
    assert_eq!(read_vec(&mut s), b"1");
    assert_eq!(read_vec(&mut s), b"2");
    // ADD answers the new value; DELETE_KEY answers the count; GETNUMKEYS.
    let mut q = vec![4u8];
    q.extend(string(b"/n"));
    q.extend(7i64.to_le_bytes());
    q.push(8);
    q.extend(string(b"/n"));
    q.push(7);
    s.write_all(&q).unwrap();
    assert_eq!(read_n(&mut s, 8), 7i64.to_le_bytes());
    assert_eq!(read_n(&mut s, 8), 1i64.to_le_bytes());
    assert_eq!(read_n(&mut s, 8), 3i64.to_le_bytes());
    // WAIT blocks; CANCEL_WAIT answers WAIT_CANCELED (1); a satisfied WAIT
    // answers STOP_WAITING (0).
    let mut q = vec![6u8];
    q.extend(1u64.to_le_bytes());
    q.extend(string(b"/later"));
    s.write_all(&q).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert!(s.read(&mut [0u8; 1]).is_err(), "WAIT answered early");
    s.write_all(&[12]).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    assert_eq!(read_n(&mut s, 1), [1]);
    let mut q = vec![6u8];
    q.extend(1u64.to_le_bytes());
    q.extend(string(b"/later"));
    s.write_all(&q).unwrap();
    let c = C10dStore::connect(srv.local_addr(), T).unwrap();
    c.set("later", b"!").unwrap();
    assert_eq!(read_n(&mut s, 1), [0]);
    // An unknown command closes the connection.
    s.write_all(&[200]).unwrap();
    assert!(closed(&mut s));
    // An over-long key closes it before anything is buffered.
    let mut s = raw(&srv);
    let mut q = vec![3u8];
    q.extend(u64::MAX.to_le_bytes());
    s.write_all(&q).unwrap();
    assert!(closed(&mut s));
}

#[test]
fn a_client_that_leaves_while_waiting_is_forgotten() {
    let srv = C10dServer::bind("127.0.0.1:0").unwrap();
    let c = C10dStore::connect(srv.local_addr(), T).unwrap();
    // The server publishes its counts once per loop turn, possibly after the
    // client already has its reply: wait for the client's one connection.
    assert!(eventually(T, || srv.num_connections() == 1));
    let before = 1;
    let mut s = raw(&srv);
    let mut q = vec![6u8];
    q.extend(1u64.to_le_bytes());
    q.extend(string(b"/never"));
    s.write_all(&q).unwrap();
    assert!(eventually(T, || srv.num_connections() == before + 1));
    drop(s);
    assert!(eventually(T, || srv.num_connections() == before));
    c.set("x", b"1").unwrap();
}

#[test]
fn server_shutdown_fails_clients_fast() {
    let (srv, c) = pair();
    let c2 = c.clone();
    let blocked = std::thread::spawn(move || c2.get("never", Duration::from_secs(60)));
    assert!(eventually(T, || srv.num_connections() >= 1));
    let started = Instant::now();
    srv.shutdown();
    let r = blocked.join().unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(matches!(r, Err(CommError::Io { .. })), "{r:?}");
    assert!(c.set("k", b"v").is_err());
}
