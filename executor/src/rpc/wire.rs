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

use comm_core::{CommError, Result};
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

/// A frame (length prefix included) holding `header` and, after it, `value`
/// (if any), both postcard-encoded into one buffer.
pub(crate) fn frame_with<H: Serialize, V: Serialize + ?Sized>(
    header: &H,
    value: Option<&V>,
) -> Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(256);
    buf.extend_from_slice(&[0u8; LEN_BYTES]);
    buf = postcard::to_extend(header, buf).map_err(|e| codec_err("encoding a header", e))?;
    if let Some(v) = value {
        buf = postcard::to_extend(v, buf).map_err(|e| {
            codec_err(
                &format!("encoding a value of type `{}`", std::any::type_name::<V>()),
                e,
            )
        })?;
    }
    let body = (buf.len() - LEN_BYTES) as u64;
    buf[..LEN_BYTES].copy_from_slice(&body.to_le_bytes());
    Ok(buf)
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
/// twice them plus [`GROW_STEP`]), never with the length a peer announces.
#[derive(Debug)]
pub(crate) struct FrameReader {
    max: usize,
    header: [u8; LEN_BYTES],
    header_got: usize,
    /// Announced body length of the frame being read (valid once the
    /// header is complete).
    want: usize,
    body: Vec<u8>,
}

/// The most the reader reserves ahead of the data actually received.
const GROW_STEP: usize = 1 << 20;

impl FrameReader {
    /// A reader refusing frames longer than `max`.
    pub(crate) fn new(max: usize) -> Self {
        FrameReader {
            max,
            header: [0; LEN_BYTES],
            header_got: 0,
            want: 0,
            body: Vec::new(),
        }
    }

    /// True between frames (nothing partial buffered).
    pub(crate) fn idle(&self) -> bool {
        self.header_got == 0
    }

    /// Bytes currently allocated for a partial body.
    #[cfg(test)]
    pub(crate) fn buffered_capacity(&self) -> usize {
        self.body.capacity()
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
                self.body = Vec::new();
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
                out.push(std::mem::take(&mut self.body));
                self.header_got = 0;
                self.want = 0;
            }
        }
        Ok(())
    }

    /// For large bodies: a buffer to `read` into directly (no staging copy),
    /// of at most `cap` bytes, or `None` when a small read through a
    /// staging buffer is better (header pending or little left).
    pub(crate) fn direct_buf(&mut self, cap: usize) -> Option<&mut [u8]> {
        if self.header_got < LEN_BYTES {
            return None;
        }
        let need = self.want - self.body.len();
        if need < 64 * 1024 {
            return None;
        }
        let n = need.min(cap).min(GROW_STEP.max(self.body.len()));
        let len = self.body.len();
        // Zero-fill is the price of safe code here; it is a memset of at
        // most GROW_STEP bytes that the read then overwrites.
        self.body.resize(len + n, 0);
        Some(&mut self.body[len..])
    }

    /// After a direct read of `got` bytes into [`FrameReader::direct_buf`]'s
    /// buffer of `offered` bytes: keeps the bytes read, and emits the frame
    /// if it is complete.
    pub(crate) fn commit_direct(&mut self, offered: usize, got: usize, out: &mut Vec<Vec<u8>>) {
        assert!(got <= offered && offered <= self.body.len());
        let keep = self.body.len() - offered + got;
        self.body.truncate(keep);
        if self.body.len() == self.want {
            out.push(std::mem::take(&mut self.body));
            self.header_got = 0;
            self.want = 0;
        }
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
        // Direct reads for the large body.
        let mut r = FrameReader::new(MAX_FRAME);
        let mut out = Vec::new();
        r.feed(&b[..100], &mut out).unwrap();
        let mut pos = 100;
        while pos < b.len() {
            match r.direct_buf(70_000) {
                Some(buf) => {
                    let offered = buf.len();
                    let n = offered.min(b.len() - pos).min(50_000);
                    buf[..n].copy_from_slice(&b[pos..pos + n]);
                    pos += n;
                    r.commit_direct(offered, n, &mut out);
                }
                None => {
                    let n = (b.len() - pos).min(1000);
                    r.feed(&b[pos..pos + n], &mut out).unwrap();
                    pos += n;
                }
            }
        }
        assert_eq!(out, [b[8..].to_vec()]);
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
