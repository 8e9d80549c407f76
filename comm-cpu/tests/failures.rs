//! Deadlines, lost peers, strangers, bad arguments and the large two-way exchange.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use comm_core::{CommError, DType, DeviceCommunicator, ReduceOp, Store, Tensor};
use comm_cpu::TcpCommunicator;
use dist_utils::HashStore;

/// Two ranks exchange 256 MiB each way at once: must finish (no deadlock) and
/// arrive intact.
#[test]
fn exchange_256_mib_each_way() {
    const N: usize = (256 << 20) / 8;
    let res = common::run(2, common::opts(120.0), |r, mut c| {
        let key = 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(r as u64 + 1);
        let data: Vec<i64> = (0..N as u64).map(|i| (i ^ key) as i64).collect();
        let send = Tensor::from_vec1(data);
        let mut recv = Tensor::zeros([N], DType::I64);
        let peer = 1 - r;
        let t = Instant::now();
        c.send_recv(&send, peer, &mut recv, peer).unwrap();
        let el = t.elapsed();
        let pkey = 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(peer as u64 + 1);
        let got = recv.as_slice::<i64>().unwrap();
        let bad = (0..N)
            .step_by(4093)
            .find(|&i| got[i] as u64 != (i as u64 ^ pkey));
        assert_eq!(bad, None, "rank {r}: wrong word");
        assert_eq!(got[N - 1] as u64, (N as u64 - 1) ^ pkey);
        el
    });
    eprintln!("256 MiB each way took {:?}", res);
}

fn expect_error_within(err: &CommError, t: Duration, limit: Duration) {
    assert!(
        t <= limit,
        "error `{err}` came after {t:?}, later than {limit:?}"
    );
}

/// A member drops its communicator while the others are inside an
/// all_reduce: they get PeerLost naming it, within the deadline, and can be
/// dropped afterwards.
#[test]
fn peer_dropped_mid_collective_gives_peer_lost() {
    for n in [16usize, 1 << 20] {
        let res = common::run(3, common::opts(10.0), move |r, mut c| {
            if r == 2 {
                std::thread::sleep(Duration::from_millis(300));
                drop(c);
                return None;
            }
            let mut t = Tensor::zeros([n], DType::F32);
            let start = Instant::now();
            let e = c.all_reduce(&mut t, ReduceOp::Sum).unwrap_err();
            let el = start.elapsed();
            // Unusable afterwards, and dropping is clean.
            assert!(matches!(c.barrier(), Err(CommError::Aborted(_))));
            drop(c);
            Some((e, el))
        });
        for (r, x) in res.into_iter().enumerate().take(2) {
            let (e, el) = x.unwrap();
            expect_error_within(&e, el, Duration::from_secs(5));
            match e {
                CommError::PeerLost { rank: 2, .. } => {}
                other => panic!("n {n} rank {r}: expected PeerLost naming rank 2, got {other}"),
            }
        }
    }
}

/// A member that never calls the collective makes the others time out
/// within the (short) deadline, and the error names it.
#[test]
fn absent_member_gives_timeout_naming_it() {
    for world in [2usize, 3] {
        let res = common::run(world, common::opts(2.0), move |r, mut c| {
            if r == world - 1 {
                // Alive but busy elsewhere until the others gave up.
                std::thread::sleep(Duration::from_millis(3000));
                return None;
            }
            let mut t = Tensor::zeros([8], DType::I32);
            let start = Instant::now();
            let e = c.all_reduce(&mut t, ReduceOp::Sum).unwrap_err();
            Some((e, start.elapsed()))
        });
        let absent = format!("rank {}", world - 1);
        let mut named = false;
        for (e, el) in res.into_iter().flatten() {
            expect_error_within(&e, el, Duration::from_millis(2900));
            match &e {
                CommError::Timeout { missing, .. } => {
                    named |= missing.iter().any(|m| m.starts_with(&absent));
                }
                // A member that timed out tells the others, who then fail at once.
                CommError::PeerLost { .. } => {}
                other => panic!("world {world}: expected Timeout, got {other}"),
            }
        }
        assert!(named, "world {world}: no member named the absent {absent}");
    }
}

/// A stranger connecting to a member's port with the wrong secret is refused,
/// and the group still forms and works.
#[test]
fn stranger_with_wrong_secret_is_refused() {
    let store: Arc<dyn Store> = Arc::new(HashStore::new());
    let s0 = store.clone();
    let h0 = std::thread::spawn(move || {
        let mut c = TcpCommunicator::new(s0, 0, 2, common::opts(10.0)).unwrap();
        let mut t = Tensor::from_vec1(vec![1i32, 2]);
        c.all_reduce(&mut t, ReduceOp::Sum).unwrap();
        t.to_vec::<i32>().unwrap()
    });
    // The stranger: speaks the handshake format with a wrong secret.
    let addr =
        String::from_utf8(store.get("tcp/addr/0", Duration::from_secs(10)).unwrap()).unwrap();
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut hello = Vec::new();
    hello.extend_from_slice(b"DISTTCP1");
    hello.extend_from_slice(&[0x55; 32]);
    hello.extend_from_slice(&0u64.to_le_bytes());
    for v in [2u32, 1, 0] {
        hello.extend_from_slice(&v.to_le_bytes());
    }
    s.write_all(&hello).unwrap();
    let mut ack = [0xFFu8; 1];
    match s.read(&mut ack) {
        Ok(0) => {}
        Ok(_) => assert_eq!(ack[0], 0, "a stranger must be refused"),
        Err(e) => panic!("no answer to the stranger: {e}"),
    }
    // Only now does the real rank 1 join.
    let s1 = store.clone();
    let h1 = std::thread::spawn(move || {
        let mut c = TcpCommunicator::new(s1, 1, 2, common::opts(10.0)).unwrap();
        let mut t = Tensor::from_vec1(vec![10i32, 20]);
        c.all_reduce(&mut t, ReduceOp::Sum).unwrap();
        t.to_vec::<i32>().unwrap()
    });
    assert_eq!(h0.join().unwrap(), [11, 22]);
    assert_eq!(h1.join().unwrap(), [11, 22]);
}

#[test]
fn bad_arguments_are_errors() {
    common::run(2, common::opts(10.0), |r, mut c| {
        let f = Tensor::zeros([4], DType::F32);
        let mut i = Tensor::zeros([8], DType::I32);
        assert!(matches!(
            c.all_gather(&f, &mut i),
            Err(CommError::DTypeMismatch { .. })
        ));
        let mut f7 = Tensor::zeros([7], DType::F32);
        assert!(matches!(
            c.all_gather(&f, &mut f7),
            Err(CommError::ShapeMismatch { .. })
        ));
        assert!(matches!(
            c.reduce_scatter(&f7, &mut Tensor::zeros([3], DType::F32), ReduceOp::Sum),
            Err(CommError::ShapeMismatch { .. })
        ));
        assert!(matches!(
            c.all_to_all(&f7, &mut Tensor::zeros([7], DType::F32)),
            Err(CommError::ShapeMismatch { .. })
        ));
        assert!(matches!(c.send(&f, r), Err(CommError::InvalidArgument(_))));
        assert!(matches!(
            c.recv(&mut f7, 2),
            Err(CommError::InvalidArgument(_))
        ));
        assert!(matches!(
            c.broadcast(&mut f7, 2),
            Err(CommError::InvalidArgument(_))
        ));
        assert!(matches!(
            c.gather(&f, None, 5),
            Err(CommError::InvalidArgument(_))
        ));
        if r == 0 {
            assert!(matches!(
                c.gather(&f, None, 0),
                Err(CommError::InvalidArgument(_))
            ));
        }
        // None of those broke the communicator.
        let mut t = Tensor::from_vec1(vec![1.0f32; 3]);
        c.all_reduce(&mut t, ReduceOp::Sum).unwrap();
        assert_eq!(t.to_vec::<f32>().unwrap(), [2.0; 3]);
        // A size mismatch between sender and receiver is a protocol error.
        if r == 0 {
            c.send(&Tensor::zeros([4], DType::F32), 1).unwrap();
        } else {
            let e = c.recv(&mut Tensor::zeros([5], DType::F32), 0).unwrap_err();
            assert!(matches!(e, CommError::Protocol(_)), "{e}");
        }
    });
}

/// Point-to-point traffic never mixes with a collective: a receive that meets
/// collective traffic fails with a protocol error instead of taking its bytes.
#[test]
fn p2p_and_collective_traffic_do_not_mix() {
    common::run(2, common::opts(5.0), |r, mut c| {
        let mut t = Tensor::from_vec1(vec![1.0f32; 3]);
        if r == 0 {
            // Rank 0 runs a collective while rank 1 waits for a point-to-point message.
            let _ = c.all_reduce(&mut t, ReduceOp::Sum);
        } else {
            let e = c.recv(&mut t, 0).unwrap_err();
            assert!(matches!(e, CommError::Protocol(_)), "{e}");
        }
    });
}
