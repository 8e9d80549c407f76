//! What the executor and its workers send each other, and every decoder of
//! it (the fuzz harness at the bottom covers each one).
//!
//! Every message is a frame of [`dist_utils::codec`]: a `u64` little-endian
//! byte count, then the body. A body is a postcard header ([`Down`] towards
//! workers, [`Up`] towards the executor) followed, for calls and values, by
//! the postcard bytes of the argument or result. The argument is encoded
//! once, straight after its header, into the one buffer every worker's
//! copy is sent from.

use std::borrow::Cow;
use std::os::fd::BorrowedFd;

use comm_core::{CommError, Result};
use comm_shm::MessageQueue;
use rustix::buffer::spare_capacity;
use rustix::net::RecvFlags;
use serde::{Deserialize, Serialize};

/// Largest frame either side accepts (4 GiB). Buffers grow with the bytes
/// that actually arrive, so a hostile length costs nothing.
pub(crate) const MAX_FRAME: usize = u32::MAX as usize;
/// Largest frame before a remote worker is admitted (its join request).
pub(crate) const MAX_JOIN_FRAME: usize = 64 * 1024;
/// Bytes of the frame length prefix.
pub(crate) const LEN_BYTES: usize = 8;

/// Executor to worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Down<'a> {
    /// Run `method`; its postcard-encoded argument follows the header.
    Call {
        /// Call number (per executor, increasing).
        id: u64,
        /// Registered method name.
        #[serde(borrow)]
        method: Cow<'a, str>,
        /// `None`: every worker sends its result; `Some(r)`: only rank `r`
        /// does, the others acknowledge.
        reply_rank: Option<u32>,
    },
    /// Finish (every call before this one was answered) and exit.
    Shutdown,
    /// The first message to every worker: the executor's initialisation
    /// value (postcard bytes, possibly empty) follows the header (the gpu
    /// worker's parallel configuration and model configuration).
    Init,
    /// Local workers, once every worker is READY: from now on read
    /// requests from the host's request queue and send replies through an
    /// own reply queue (both comm-shm `MessageQueue`s, set up through the
    /// store at `store` under `prefix`).
    Attach {
        /// Address of the store the queues are set up through.
        #[serde(borrow)]
        store: Cow<'a, str>,
        /// Key prefix of this executor's queues.
        #[serde(borrow)]
        prefix: Cow<'a, str>,
        /// The rank the executor has in the queues' messages (the world size).
        executor_rank: u32,
        /// Bytes of the worker's reply ring.
        reply_ring: u64,
        /// Deadline of the set-up, milliseconds.
        timeout_ms: u64,
    },
    /// A remote worker was admitted.
    Welcome,
    /// A remote worker was refused, and why.
    Refused(Cow<'a, str>),
}

/// Worker to executor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Up<'a> {
    /// Initialised; ready for calls.
    Ready,
    /// Initialisation failed.
    InitError(Cow<'a, str>),
    /// The answer to call `id`; for [`Outcome::Value`] the postcard-encoded
    /// result follows the header.
    Reply {
        /// The call answered.
        id: u64,
        /// How it went.
        outcome: Outcome<'a>,
    },
    /// A remote worker's first message after authentication.
    Join {
        /// Its global rank.
        rank: u32,
        /// The world size it was started with.
        world_size: u32,
        /// Its process id (on its host).
        pid: u32,
        /// Its host name.
        #[serde(borrow)]
        host: Cow<'a, str>,
    },
}

/// How a call went on one worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Outcome<'a> {
    /// The result follows.
    Value,
    /// Done; this worker is not the one that replies.
    Ack,
    /// The method failed here.
    Failed {
        /// Why, in classes the executor reports differently.
        kind: FailKind,
        /// The worker's message.
        #[serde(borrow)]
        message: Cow<'a, str>,
    },
}

/// Classes of a failed call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum FailKind {
    /// The handler returned an error.
    Error,
    /// The handler panicked.
    Panic,
    /// No handler of that name is registered.
    UnknownMethod,
    /// The argument did not decode as the handler's type.
    BadArgument,
    /// The result could not be encoded.
    BadResult,
}

impl FailKind {
    /// How the executor words it.
    pub(crate) fn describe(self, message: &str) -> String {
        match self {
            FailKind::Error => format!("error: {message}"),
            FailKind::Panic => format!("panicked: {message}"),
            FailKind::UnknownMethod => message.to_string(),
            FailKind::BadArgument => format!("bad argument: {message}"),
            FailKind::BadResult => format!("could not encode the result: {message}"),
        }
    }
}

fn codec_err(what: &str, e: postcard::Error) -> CommError {
    CommError::Codec(format!("{what}: {e}"))
}

/// A value of type `V` that could not be sized or encoded.
fn value_err<V: ?Sized>(e: impl std::fmt::Display) -> CommError {
    CommError::Codec(format!(
        "encoding a value of type `{}`: {e}",
        std::any::type_name::<V>()
    ))
}

/// A frame (length prefix included) holding `header` and, after it, `value`
/// (if any), both postcard-encoded into one buffer.
pub(crate) fn frame_with<H: Serialize, V: Serialize + ?Sized>(
    header: &H,
    value: Option<&V>,
) -> Result<Vec<u8>> {
    // Sized exactly up front: a large argument is then copied once, with
    // no reallocation on the way (the size pass only adds up lengths).
    let mut body = encoded_len(header)?;
    if let Some(v) = value {
        body += encoded_len(v)?;
    }
    frame_of_len(header, value, body)
}

/// [`frame_with`] for a body already sized at `body_len` bytes.
fn frame_of_len<H: Serialize, V: Serialize + ?Sized>(
    header: &H,
    value: Option<&V>,
    body_len: usize,
) -> Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(LEN_BYTES + body_len);
    buf.extend_from_slice(&[0u8; LEN_BYTES]);
    buf = postcard::to_extend(header, buf).map_err(|e| codec_err("encoding a header", e))?;
    if let Some(v) = value {
        buf = postcard::to_extend(v, buf).map_err(value_err::<V>)?;
    }
    let body = (buf.len() - LEN_BYTES) as u64;
    buf[..LEN_BYTES].copy_from_slice(&body.to_le_bytes());
    Ok(buf)
}

/// A header and a value, sized once, to be encoded either into a frame
/// ([`SizedMessage::frame`]) or straight into a shared-memory queue's ring
/// ([`SizedMessage::try_enqueue`]), with the same bytes either way.
pub(crate) struct SizedMessage<'a, H, V: ?Sized> {
    header: &'a H,
    value: &'a V,
    header_len: usize,
    value_len: usize,
}

impl<'a, H: Serialize, V: Serialize + ?Sized> SizedMessage<'a, H, V> {
    /// Sizes both (an argument that cannot be encoded fails here).
    pub(crate) fn new(header: &'a H, value: &'a V) -> Result<Self> {
        Ok(SizedMessage {
            header,
            value,
            header_len: encoded_len(header)?,
            value_len: encoded_len(value).map_err(value_err::<V>)?,
        })
    }

    /// The frame (length prefix included).
    pub(crate) fn frame(&self) -> Result<Vec<u8>> {
        frame_of_len(
            self.header,
            Some(self.value),
            self.header_len + self.value_len,
        )
    }

    /// Encodes the message (a frame's body) straight into `q`'s ring when
    /// it has room for it now; `false`: it has not, nothing was written.
    pub(crate) fn try_enqueue(&self, q: &mut MessageQueue) -> Result<bool> {
        let (h, v) = (self.header_len, self.value_len);
        q.try_enqueue_with(h + v, |buf| {
            let (hb, vb) = buf.split_at_mut(h);
            let wrote_h = postcard::to_slice(self.header, hb)
                .map_err(|e| codec_err("encoding a header", e))?
                .len();
            let wrote_v = postcard::to_slice(self.value, vb)
                .map_err(value_err::<V>)?
                .len();
            if (wrote_h, wrote_v) != (h, v) {
                return Err(CommError::Codec(format!(
                    "a value of type `{}` encoded to another length than it was sized \
                     (its Serialize implementation is not deterministic)",
                    std::any::type_name::<V>()
                )));
            }
            Ok(())
        })
    }
}

/// Counts the bytes postcard would write (O(1) per byte slice).
struct Count(usize);

impl Extend<u8> for Count {
    fn extend<I: IntoIterator<Item = u8>>(&mut self, bytes: I) {
        // postcard hands over copied slice iterators, whose count is their
        // length.
        self.0 += bytes.into_iter().count();
    }
}

fn encoded_len<T: Serialize + ?Sized>(value: &T) -> Result<usize> {
    postcard::to_extend(value, Count(0))
        .map(|c| c.0)
        .map_err(|e| codec_err("sizing a message", e))
}

/// A frame holding only `header`.
pub(crate) fn frame<H: Serialize>(header: &H) -> Result<Vec<u8>> {
    frame_with::<H, ()>(header, None)
}

/// Splits a frame body into its [`Down`] header and the bytes after it.
pub(crate) fn decode_down(body: &[u8]) -> Result<(Down<'_>, &[u8])> {
    postcard::take_from_bytes(body).map_err(|e| codec_err("decoding a request header", e))
}

/// Splits a frame body into its [`Up`] header and the bytes after it.
pub(crate) fn decode_up(body: &[u8]) -> Result<(Up<'_>, &[u8])> {
    postcard::take_from_bytes(body).map_err(|e| codec_err("decoding a worker message", e))
}

/// Reassembles frames from a byte stream read in arbitrary pieces
/// (non-blocking sockets). Memory grows with the bytes received (at most
/// about twice them plus [`GROW_STEP`]), never with the length a peer
/// announces; a buffer handed back with [`FrameReader::recycle`] is reused
/// for the next large frame.
#[derive(Debug)]
pub(crate) struct FrameReader {
    max: usize,
    header: [u8; LEN_BYTES],
    header_got: usize,
    /// Announced body length of the frame being read (valid once the
    /// header is complete).
    want: usize,
    body: Vec<u8>,
    scratch: Vec<u8>,
    spare: Option<Vec<u8>>,
    /// The last `recv` returned less than it asked for.
    short: bool,
}

/// The most the reader reserves ahead of the data actually received.
const GROW_STEP: usize = 1 << 20;
/// Bodies with at least this much still to come are received straight into
/// their buffer; smaller reads go through the staging buffer (one `recv`
/// can then bring several small frames).
const DIRECT_MIN: usize = 64 * 1024;
/// Size of the staging buffer.
const SCRATCH: usize = 64 * 1024;

impl FrameReader {
    /// A reader refusing frames longer than `max`.
    pub(crate) fn new(max: usize) -> Self {
        FrameReader {
            max,
            header: [0; LEN_BYTES],
            header_got: 0,
            want: 0,
            body: Vec::new(),
            scratch: vec![0; SCRATCH],
            spare: None,
            short: false,
        }
    }

    /// True between frames (nothing partial buffered).
    pub(crate) fn idle(&self) -> bool {
        self.header_got == 0
    }

    /// True when the last [`FrameReader::recv`] got less than it had room
    /// for: the socket had nothing more at that moment.
    pub(crate) fn last_short(&self) -> bool {
        self.short
    }

    /// Bytes currently allocated for a partial body.
    #[cfg(test)]
    pub(crate) fn buffered_capacity(&self) -> usize {
        self.body.capacity()
    }

    /// Hands a frame body back for reuse by a later frame (saves page
    /// faults on large messages).
    pub(crate) fn recycle(&mut self, mut buf: Vec<u8>) {
        if buf.capacity() >= DIRECT_MIN {
            buf.clear();
            self.spare = Some(buf);
        }
    }

    fn start_body(&mut self) {
        self.body = if self.want >= DIRECT_MIN {
            self.spare.take().unwrap_or_default()
        } else {
            Vec::new()
        };
    }

    fn end_body(&mut self, out: &mut Vec<Vec<u8>>) {
        out.push(std::mem::take(&mut self.body));
        self.header_got = 0;
        self.want = 0;
    }

    /// Consumes `data`, pushing each completed frame body to `out`.
    pub(crate) fn feed(&mut self, mut data: &[u8], out: &mut Vec<Vec<u8>>) -> Result<()> {
        while !data.is_empty() {
            if self.header_got < LEN_BYTES {
                let n = (LEN_BYTES - self.header_got).min(data.len());
                self.header[self.header_got..self.header_got + n].copy_from_slice(&data[..n]);
                self.header_got += n;
                data = &data[n..];
                if self.header_got < LEN_BYTES {
                    break;
                }
                let len = u64::from_le_bytes(self.header);
                if len > self.max as u64 {
                    return Err(CommError::Protocol(format!(
                        "frame of {len} byte(s) exceeds the limit of {} byte(s)",
                        self.max
                    )));
                }
                self.want = len as usize;
                self.start_body();
            }
            let need = self.want - self.body.len();
            let n = need.min(data.len());
            if self.body.capacity() - self.body.len() < n {
                // Reserve for what is here plus a bounded step of what is
                // announced (geometric, at most what was received so far),
                // never the whole announcement up front.
                let extra = n + (need - n).min(GROW_STEP.max(self.body.len()));
                self.body.reserve_exact(extra);
            }
            self.body.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.body.len() == self.want {
                self.end_body(out);
            }
        }
        Ok(())
    }

    /// One `recv` from socket `fd` (with `flags`, e.g. `DONTWAIT`), pushing
    /// each completed frame body to `out`. Returns the bytes received (0 at
    /// end of stream). A large body is received straight into its buffer
    /// (no staging copy, no zero-fill); bytes past its end are fed on.
    pub(crate) fn recv(
        &mut self,
        fd: BorrowedFd<'_>,
        flags: RecvFlags,
        out: &mut Vec<Vec<u8>>,
    ) -> std::result::Result<usize, RecvError> {
        let direct = self.header_got == LEN_BYTES && self.want - self.body.len() >= DIRECT_MIN;
        if !direct {
            let (n, _) = rustix::net::recv(fd, &mut self.scratch[..], flags)?;
            self.short = n < self.scratch.len();
            let mut scratch = std::mem::take(&mut self.scratch);
            let fed = self.feed(&scratch[..n], out);
            std::mem::swap(&mut self.scratch, &mut scratch);
            fed.map_err(RecvError::Frame)?;
            return Ok(n);
        }
        let need = self.want - self.body.len();
        let step = need.min(GROW_STEP.max(self.body.len()));
        if self.body.capacity() - self.body.len() < step {
            self.body.reserve(step);
        }
        let room = self.body.capacity() - self.body.len();
        let (n, _) = rustix::net::recv(fd, spare_capacity(&mut self.body), flags)?;
        self.short = n < room;
        if self.body.len() >= self.want {
            // The spare capacity may have taken the start of the next frames.
            let rest = self.body.split_off(self.want);
            self.end_body(out);
            self.feed(&rest, out).map_err(RecvError::Frame)?;
        }
        Ok(n)
    }
}

/// Why [`FrameReader::recv`] failed.
#[derive(Debug)]
pub(crate) enum RecvError {
    /// The socket failed (or would block: `Errno::AGAIN`).
    Os(rustix::io::Errno),
    /// The peer sent a frame over the limit.
    Frame(CommError),
}

impl From<rustix::io::Errno> for RecvError {
    fn from(e: rustix::io::Errno) -> Self {
        RecvError::Os(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_roundtrip_through_dist_utils_reader() {
        let f = frame_with(
            &Down::Call {
                id: 7,
                method: "echo".into(),
                reply_rank: Some(0),
            },
            Some(&vec![1u32, 2, 3]),
        )
        .unwrap();
        // Sized exactly: no reallocation while encoding.
        assert_eq!(f.capacity(), f.len());
        let body = dist_utils::codec::read_frame(&mut &f[..], MAX_FRAME).unwrap();
        let (h, rest) = decode_down(&body).unwrap();
        assert_eq!(
            h,
            Down::Call {
                id: 7,
                method: "echo".into(),
                reply_rank: Some(0)
            }
        );
        let v: Vec<u32> = dist_utils::codec::decode(rest).unwrap();
        assert_eq!(v, [1, 2, 3]);
        let f = frame(&Up::Ready).unwrap();
        let (h, rest) = decode_up(&f[LEN_BYTES..]).unwrap();
        assert_eq!((h, rest.len()), (Up::Ready, 0));
    }

    #[test]
    fn reader_splits_and_joins_frames() {
        let a = frame(&Up::Ready).unwrap();
        let b = frame_with(
            &Up::Reply {
                id: 1,
                outcome: Outcome::Value,
            },
            Some(&vec![9u8; 300_000]),
        )
        .unwrap();
        let mut all = a.clone();
        all.extend_from_slice(&b);
        for chunk in [1, 3, 8, 4096, all.len()] {
            let mut r = FrameReader::new(MAX_FRAME);
            let mut out = Vec::new();
            for piece in all.chunks(chunk) {
                r.feed(piece, &mut out).unwrap();
            }
            assert_eq!(out, [a[8..].to_vec(), b[8..].to_vec()]);
            assert!(r.idle());
        }
        // Through a socket: direct receives into the body for the large
        // frame, with the next frame's start taken along and fed on.
        let (tx, rx) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut r = FrameReader::new(MAX_FRAME);
        r.recycle(Vec::with_capacity(1 << 22));
        let mut out = Vec::new();
        let data = [b.clone(), a.clone(), b.clone()].concat();
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            (&tx).write_all(&data).unwrap();
        });
        while out.len() < 3 {
            use std::os::fd::AsFd;
            let n = r.recv(rx.as_fd(), RecvFlags::empty(), &mut out).unwrap();
            assert!(n > 0);
        }
        writer.join().unwrap();
        assert_eq!(out, [b[8..].to_vec(), a[8..].to_vec(), b[8..].to_vec()]);
        assert!(r.idle());
    }
}

/// Property-based fuzzing of every decoder of bytes a peer sends (issue 15
/// item 9): no input may panic, allocate beyond what arrived plus a fixed
/// step, or loop without consuming input. `EXECUTOR_FUZZ_CASES` sets the
/// number of cases per property (default 4096; the report's long run used
/// 1,000,000).
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn cases() -> u32 {
        std::env::var("EXECUTOR_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(4096)
    }

    /// Valid messages of every kind, to mutate.
    fn seeds() -> Vec<Vec<u8>> {
        let mut v = vec![
            frame(&Up::Ready).unwrap(),
            frame(&Up::InitError("no GPU".into())).unwrap(),
            frame_with(
                &Up::Reply {
                    id: 3,
                    outcome: Outcome::Value,
                },
                Some(&(1u64, "x".to_string())),
            )
            .unwrap(),
            frame(&Up::Reply {
                id: u64::MAX,
                outcome: Outcome::Failed {
                    kind: FailKind::Panic,
                    message: "boom".into(),
                },
            })
            .unwrap(),
            frame(&Up::Join {
                rank: 3,
                world_size: 4,
                pid: 77,
                host: "h".into(),
            })
            .unwrap(),
            frame(&Down::Shutdown).unwrap(),
            frame(&Down::Refused("no".into())).unwrap(),
            frame_with(&Down::Init, Some(&(1u32, "model".to_string()))).unwrap(),
            frame(&Down::Attach {
                store: "127.0.0.1:5".into(),
                prefix: "executor/00ff".into(),
                executor_rank: 4,
                reply_ring: 1 << 20,
                timeout_ms: 1000,
            })
            .unwrap(),
        ];
        v.push(
            frame_with(
                &Down::Call {
                    id: 9,
                    method: "generate".into(),
                    reply_rank: None,
                },
                Some(&vec![0.5f32; 16]),
            )
            .unwrap(),
        );
        v
    }

    fn mutated() -> impl Strategy<Value = Vec<u8>> {
        let seeds = seeds();
        (
            0..seeds.len(),
            proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
            any::<Option<usize>>(),
        )
            .prop_map(move |(i, flips, cut)| {
                let mut s = seeds[i].clone();
                for (at, b) in flips {
                    let n = s.len();
                    s[at % n] = b;
                }
                if let Some(c) = cut {
                    s.truncate(c % (s.len() + 1));
                }
                s
            })
    }

    fn bytes() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![proptest::collection::vec(any::<u8>(), 0..512), mutated(),]
    }

    /// Decodes like the executor and the worker do, including the value
    /// after the header, as types the tests use.
    fn decode_everything(body: &[u8]) {
        if let Ok((h, rest)) = decode_up(body) {
            if let Up::Reply {
                outcome: Outcome::Failed { kind, message },
                ..
            } = &h
            {
                let _ = kind.describe(message);
            }
            if matches!(h, Up::Reply { .. }) {
                let _ = dist_utils::codec::decode::<(u64, String)>(rest);
                let _ = dist_utils::codec::decode::<Vec<u8>>(rest);
            }
        }
        if let Ok((_, rest)) = decode_down(body) {
            let _ = dist_utils::codec::decode::<Vec<f32>>(rest);
            let _ = dist_utils::codec::decode::<String>(rest);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

        /// Headers and values: no panic; every decoded string or vector is
        /// no longer than the input (postcard reads lengths from the input
        /// and fails when they run past it).
        #[test]
        fn message_decoders_never_panic(body in bytes()) {
            decode_everything(&body);
            if body.len() > LEN_BYTES {
                decode_everything(&body[LEN_BYTES..]);
            }
        }

        /// The frame reassembler: any bytes in any pieces end in frames or
        /// a protocol error, consume all input, and never hold more than
        /// the bytes received plus one growth step.
        #[test]
        fn frame_reader_is_bounded(stream in bytes(), cuts in proptest::collection::vec(1usize..64, 1..16), max in prop_oneof![Just(MAX_FRAME), 0usize..1024]) {
            let mut r = FrameReader::new(max);
            let mut out = Vec::new();
            let mut pos = 0;
            let mut i = 0;
            while pos < stream.len() {
                let n = cuts[i % cuts.len()].min(stream.len() - pos);
                i += 1;
                if r.feed(&stream[pos..pos + n], &mut out).is_err() {
                    break;
                }
                pos += n;
                prop_assert!(r.buffered_capacity() <= 2 * pos + GROW_STEP + 64);
            }
            for f in &out {
                prop_assert!(f.len() <= max);
                decode_everything(f);
            }
        }

        /// The socket path (direct receives into a body, spare capacity
        /// taking the next frames along): the same frames as `feed`, all
        /// input consumed, memory bounded by what was received.
        #[test]
        fn socket_receive_matches_feed(stream in bytes(), recycled in any::<bool>()) {
            use std::io::Write;
            use std::os::fd::AsFd;
            let mut want = Vec::new();
            let want_err = FrameReader::new(MAX_FRAME).feed(&stream, &mut want).is_err();
            let (mut tx, rx) = std::os::unix::net::UnixStream::pair().unwrap();
            tx.write_all(&stream).unwrap();
            drop(tx);
            let mut r = FrameReader::new(MAX_FRAME);
            if recycled {
                r.recycle(Vec::with_capacity(DIRECT_MIN * 2));
            }
            let mut got = Vec::new();
            let mut received = 0;
            let mut failed = false;
            // Each call consumes input or reports the end: bounded.
            for _ in 0..stream.len() + 2 {
                match r.recv(rx.as_fd(), RecvFlags::empty(), &mut got) {
                    Ok(0) => break,
                    Ok(n) => received += n,
                    Err(_) => { failed = true; break; }
                }
                prop_assert!(r.buffered_capacity() <= 2 * received + 2 * GROW_STEP + DIRECT_MIN * 2);
            }
            prop_assert_eq!(failed, want_err);
            prop_assert_eq!(got, want);
        }

        /// The remote handshake's inputs (server hello, client answer,
        /// server proof) as a hostile peer may send them: refused, never a
        /// panic.
        #[test]
        fn handshake_inputs_are_refused_not_panicked_on(hello in bytes(), answer in bytes()) {
            use comm_core::auth::{respond, Challenge};
            let c = Challenge::new(b"secret", "executor rpc").unwrap();
            prop_assert!(c.verify(&answer).is_err());
            if let Ok((_, expect)) = respond(b"secret", "executor rpc", &hello) {
                prop_assert!(expect.verify(&answer).is_err());
            }
        }

        /// A hostile length prefix followed by few bytes allocates little.
        #[test]
        fn huge_announced_lengths_allocate_little(len in any::<u64>(), tail in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut data = len.to_le_bytes().to_vec();
            data.extend_from_slice(&tail);
            let mut r = FrameReader::new(MAX_FRAME);
            let mut out = Vec::new();
            let _ = r.feed(&data, &mut out);
            prop_assert!(r.buffered_capacity() <= tail.len() + GROW_STEP);
        }
    }
}
