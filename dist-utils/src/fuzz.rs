//! Property-based fuzzing (proptest, stable Rust) of every decoder here that
//! reads bytes from another process: codec frames, the TCP store handshake
//! and requests (server side) and replies (client side), the c10d queries
//! (server side) and replies (client side). Inputs arrive in arbitrary
//! chunks, as from a socket.
//!
//! No input may panic, hang, or allocate without bound: a tracking
//! allocator records the largest single allocation made while decoding,
//! which must stay within a constant plus a multiple of the input size
//! (lengths are capped before allocating; buffers grow only with bytes
//! that arrived).
//!
//! `PROPTEST_CASES=100000 cargo test -p dist-utils --release --lib fuzz`
//! runs them long; CI runs the default (256 cases per property).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use crate::c10d::wire::{self, parse_query, Query};
use crate::c10d::C10dProtocol;
use crate::codec::{decode, read_frame, read_msg, split_frame};
use crate::server::{Kv, Protocol, Session};
use crate::tcp_store::{
    client_handshake, ClientAnswer, DistProtocol, HelloReply, Request, Response, ServerHello,
    MAX_FRAME_LEN,
};

/// Passes every call to the system allocator, noting the largest request
/// made by the current thread.
struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // try_with: no panic while the thread is being torn down.
    let _ = LARGEST.try_with(|c| {
        if c.get() < size {
            c.set(size)
        }
    });
}

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged, so `System`'s guarantees hold; `note` does not allocate.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded as received (see the impl).
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded as received.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: forwarded as received.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as received.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// Runs `f` and returns the largest single allocation it made.
fn largest_allocation(f: impl FnOnce()) -> usize {
    LARGEST.with(|c| c.set(0));
    f();
    LARGEST.with(|c| c.get())
}

/// What decoding `n` hostile bytes may allocate at once: serde's cautious
/// preallocation (1 MiB), read scratch buffers, plus a few times the input.
fn bound(n: usize) -> usize {
    (2 << 20) + 4 * n
}

/// Feeds `chunks` to `session` as the event loop does: append, feed, drop
/// what was consumed, wake it (also past any deadline). Stops at the first
/// close. Returns the replies.
fn drive<S: Session>(mut session: S, chunks: &[Vec<u8>], kv: &mut Kv) -> Vec<u8> {
    let mut input = Vec::new();
    let mut out = Vec::new();
    for c in chunks {
        input.extend_from_slice(c);
        match session.feed(&input, kv, &mut out) {
            Ok(n) => {
                assert!(n <= input.len(), "consumed {n} of {} bytes", input.len());
                input.drain(..n);
            }
            Err(_) => return out,
        }
        let later = Instant::now() + Duration::from_secs(3600);
        if session.wake(kv, later, &mut out).is_err() {
            return out;
        }
    }
    session.shutdown(&mut out);
    out
}

fn chunks() -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..8)
}

fn total(chunks: &[Vec<u8>]) -> usize {
    chunks.iter().map(Vec::len).sum()
}

fn key() -> impl Strategy<Value = String> {
    "[a-z/]{0,12}"
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (key(), prop::collection::vec(any::<u8>(), 0..40))
            .prop_map(|(key, value)| Request::Set { key, value }),
        (key(), 0u64..3).prop_map(|(key, timeout_ms)| Request::Get { key, timeout_ms }),
        key().prop_map(|key| Request::TryGet { key }),
        (key(), any::<i64>()).prop_map(|(key, delta)| Request::Add { key, delta }),
        (prop::collection::vec(key(), 0..4), 0u64..3)
            .prop_map(|(keys, timeout_ms)| Request::Wait { keys, timeout_ms }),
        key().prop_map(|key| Request::Delete { key }),
        (
            key(),
            prop::option::of(prop::collection::vec(any::<u8>(), 0..8)),
            prop::collection::vec(any::<u8>(), 0..8)
        )
            .prop_map(|(key, expected, desired)| Request::CompareSet {
                key,
                expected,
                desired
            }),
        Just(Request::NumKeys),
    ]
}

fn query() -> impl Strategy<Value = Query> {
    let bytes = || prop::collection::vec(any::<u8>(), 0..40);
    let keys = || prop::collection::vec(key(), 0..4);
    prop_oneof![
        any::<u32>().prop_map(Query::Validate),
        (key(), bytes()).prop_map(|(key, value)| Query::Set { key, value }),
        (key(), bytes(), bytes()).prop_map(|(key, expected, desired)| Query::CompareSet {
            key,
            expected,
            desired
        }),
        key().prop_map(Query::Get),
        (key(), any::<i64>()).prop_map(|(key, delta)| Query::Add { key, delta }),
        keys().prop_map(Query::Check),
        keys().prop_map(Query::Wait),
        Just(Query::NumKeys),
        key().prop_map(Query::Delete),
        (key(), bytes()).prop_map(|(key, value)| Query::Append { key, value }),
        keys().prop_map(Query::MultiGet),
        prop::collection::vec((key(), bytes()), 0..3).prop_map(Query::MultiSet),
        Just(Query::CancelWait),
        any::<u32>().prop_map(Query::Ping),
    ]
}

/// A mock connection: reads come from `input`, writes are kept.
struct Mock<'a> {
    input: &'a [u8],
    written: Vec<u8>,
}

impl std::io::Read for Mock<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl std::io::Write for Mock<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.written.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The bytes of a valid client answer to `greeting` (a server hello frame).
fn answer_for(secret: &[u8], greeting: &[u8]) -> Vec<u8> {
    let (payload, _) = split_frame(greeting, 4096).unwrap().unwrap();
    let hello: ServerHello = decode(payload).unwrap();
    let (answer, _) =
        comm_core::auth::respond(secret, "dist-utils tcp store", &hello.challenge).unwrap();
    let mut out = Vec::new();
    crate::codec::write_msg(
        &mut out,
        &ClientAnswer {
            magic: crate::tcp_store::TCP_STORE_MAGIC,
            version: crate::tcp_store::TCP_STORE_VERSION,
            answer: answer.to_vec(),
        },
    )
    .unwrap();
    out
}

fn dist_session(secret: &[u8]) -> (crate::tcp_store::DistSession, Vec<u8>) {
    let p = DistProtocol {
        secret: std::sync::Arc::new(secret.to_vec()),
    };
    let mut greeting = Vec::new();
    let s = p
        .open(Instant::now() + Duration::from_secs(10), &mut greeting)
        .unwrap();
    (s, greeting)
}

proptest! {
    #[test]
    fn codec_frames_and_messages(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let n = bytes.len();
        let big = largest_allocation(|| {
            let _ = split_frame(&bytes, MAX_FRAME_LEN);
            let _ = read_frame(&mut &bytes[..], MAX_FRAME_LEN);
            let _ = read_frame(&mut &bytes[..], usize::MAX);
            let _ = decode::<Request>(&bytes);
            let _ = decode::<Response>(&bytes);
            let _ = decode::<ServerHello>(&bytes);
            let _ = decode::<ClientAnswer>(&bytes);
            let _ = decode::<HelloReply>(&bytes);
            let _ = read_msg::<Response>(&mut &bytes[..], MAX_FRAME_LEN);
        });
        prop_assert!(big <= bound(n), "allocated {big} for {n} input bytes");
    }

    #[test]
    fn store_server_handshake_from_hostile_bytes(input in chunks()) {
        let (s, _) = dist_session(b"secret");
        let mut kv = Kv::default();
        let n = total(&input);
        let big = largest_allocation(|| { drive(s, &input, &mut kv); });
        prop_assert!(big <= bound(n), "allocated {big} for {n} input bytes");
        prop_assert_eq!(kv.len(), 0, "an unauthenticated peer changed the store");
    }

    #[test]
    fn store_server_requests_after_a_valid_handshake(
        reqs in prop::collection::vec(request(), 0..6),
        garbage in chunks(),
        split in any::<prop::sample::Index>(),
    ) {
        let (s, greeting) = dist_session(b"secret");
        let mut stream = answer_for(b"secret", &greeting);
        for r in &reqs {
            crate::codec::write_msg(&mut stream, r).unwrap();
        }
        for g in &garbage {
            stream.extend_from_slice(g);
        }
        // Cut the byte stream at an arbitrary point, as a socket may.
        let at = split.index(stream.len() + 1);
        let parts = vec![stream[..at].to_vec(), stream[at..].to_vec()];
        let n = stream.len();
        let mut kv = Kv::default();
        let big = largest_allocation(|| { drive(s, &parts, &mut kv); });
        prop_assert!(big <= bound(n), "allocated {big} for {n} input bytes");
    }

    #[test]
    fn store_client_handshake_and_replies_from_hostile_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..600)
    ) {
        let n = bytes.len();
        let big = largest_allocation(|| {
            let mut m = Mock { input: &bytes, written: Vec::new() };
            let _ = client_handshake(&mut m, b"secret");
            let _ = read_msg::<Response>(&mut &bytes[..], MAX_FRAME_LEN);
        });
        prop_assert!(big <= bound(n), "allocated {big} for {n} input bytes");
    }

    #[test]
    fn c10d_queries_round_trip(qs in prop::collection::vec(query(), 1..5)) {
        let mut bytes = Vec::new();
        for q in &qs {
            q.encode(&mut bytes);
        }
        let mut pos = 0;
        for q in &qs {
            // Every strict prefix is incomplete, never an error.
            let (got, used) = parse_query(&bytes[pos..]).unwrap().unwrap();
            prop_assert_eq!(&got, q);
            for cut in 0..used {
                prop_assert_eq!(parse_query(&bytes[pos..pos + cut]).unwrap(), None);
            }
            pos += used;
        }
        prop_assert_eq!(pos, bytes.len());
    }

    #[test]
    fn c10d_server_from_hostile_bytes(input in chunks(), validated in any::<bool>()) {
        let mut greeting = Vec::new();
        let s = C10dProtocol.open(Instant::now() + Duration::from_secs(10), &mut greeting).unwrap();
        let mut all = input.clone();
        if validated {
            let mut v = Vec::new();
            Query::Validate(wire::VALIDATION_MAGIC).encode(&mut v);
            all.insert(0, v);
        }
        let n = total(&all);
        let mut kv = Kv::default();
        let big = largest_allocation(|| {
            let _ = parse_query(&all.concat());
            drive(s, &all, &mut kv);
        });
        prop_assert!(big <= bound(n), "allocated {big} for {n} input bytes");
        if !validated {
            prop_assert_eq!(kv.len(), 0, "an unvalidated peer changed the store");
        }
    }

    #[test]
    fn c10d_server_valid_queries_then_garbage(
        qs in prop::collection::vec(query(), 0..6),
        garbage in chunks(),
    ) {
        let mut greeting = Vec::new();
        let s = C10dProtocol.open(Instant::now() + Duration::from_secs(10), &mut greeting).unwrap();
        let mut stream = Vec::new();
        Query::Validate(wire::VALIDATION_MAGIC).encode(&mut stream);
        for q in &qs {
            q.encode(&mut stream);
        }
        let mut parts = vec![stream];
        parts.extend(garbage);
        let n = total(&parts);
        let mut kv = Kv::default();
        let big = largest_allocation(|| { drive(s, &parts, &mut kv); });
        prop_assert!(big <= bound(n), "allocated {big} for {n} input bytes");
    }

    #[test]
    fn c10d_client_replies_from_hostile_bytes(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let n = bytes.len();
        let big = largest_allocation(|| {
            let mut r = &bytes[..];
            let _ = wire::read_u8(&mut r, "fuzz");
            let _ = wire::read_i64(&mut r, "fuzz");
            let _ = wire::read_bytes(&mut &bytes[..], wire::MAX_VALUE_LEN, "fuzz");
            let _ = wire::read_bytes(&mut &bytes[..], usize::MAX, "fuzz");
        });
        prop_assert!(big <= bound(n), "allocated {big} for {n} input bytes");
    }

    #[test]
    fn slurm_lists_from_arbitrary_text(s in "[a-z0-9\\[\\],()x -]{0,40}") {
        let big = largest_allocation(|| {
            let _ = crate::slurm::expand_hostlist("V", &s);
            let _ = crate::slurm::first_host("V", &s);
            let _ = crate::slurm::parse_tasks_per_node("V", &s);
        });
        // Expansion is capped at MAX_EXPANDED entries.
        prop_assert!(big <= 64 * crate::slurm::MAX_EXPANDED, "allocated {big}");
    }
}

#[test]
fn the_tracking_allocator_sees_allocations() {
    let big = largest_allocation(|| {
        let v = vec![0u8; 12345];
        std::hint::black_box(&v);
    });
    assert!(big >= 12345);
}
