//! Every byte format a member reads from another process, with its encoder
//! and its decoder in one place: data-frame headers, control frames (abort
//! with culprits, "still waiting" notices), the handshake's client header,
//! and the address record published in the store.
//!
//! Decoders take untrusted bytes: they never panic, never allocate more than
//! the input bounds, and report anything unexpected as
//! [`CommError::Protocol`]. They are fuzzed by the property tests below.

use comm_core::{CommError, Missing, Result};

/// Bytes of a data-frame header without a call description.
pub(crate) const HDR: usize = 16;
/// Bytes of a call description ([`comm_core::CallDesc::to_wire`]).
pub(crate) const DESC: usize = 64;
/// Longest header: with a call description.
pub(crate) const MAX_HDR: usize = HDR + DESC;

const DATA_MAGIC: [u8; 2] = [0xD7, 0x5D];
const CTL_MAGIC: [u8; 2] = [0xC7, 0x11];
/// The header is followed by the sender's call description.
pub(crate) const FLAG_DESC: u8 = 1;
/// Kind byte of point-to-point messages (collectives use their
/// [`comm_core::Collective`] code).
pub(crate) const P2P_KIND: u8 = 0x70;

/// A parsed data-frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    /// The operation: a collective's code or [`P2P_KIND`].
    pub kind: u8,
    /// [`FLAG_DESC`] or 0.
    pub flags: u8,
    /// Per-direction message number.
    pub seq: u32,
    /// Payload bytes.
    pub len: u64,
}

impl Header {
    /// The 16-byte form.
    pub(crate) fn encode(&self) -> [u8; HDR] {
        let mut h = [0u8; HDR];
        h[..2].copy_from_slice(&DATA_MAGIC);
        h[2] = self.kind;
        h[3] = self.flags;
        h[4..8].copy_from_slice(&self.seq.to_le_bytes());
        h[8..16].copy_from_slice(&self.len.to_le_bytes());
        h
    }

    /// Parses the first [`HDR`] bytes of `b` (shorter input is an error).
    pub(crate) fn decode(b: &[u8]) -> Result<Header> {
        let h: &[u8; HDR] = b
            .get(..HDR)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| CommError::Protocol("a message header was cut short".into()))?;
        if h[..2] != DATA_MAGIC {
            return Err(CommError::Protocol(
                "bytes that are not a message header arrived (stream out of sync, or not a \
                 member of this group)"
                    .into(),
            ));
        }
        Ok(Header {
            kind: h[2],
            flags: h[3],
            seq: u32::from_le_bytes([h[4], h[5], h[6], h[7]]),
            len: u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]),
        })
    }

    /// Bytes of header this frame has on the wire.
    pub(crate) fn wire_len(&self) -> usize {
        if self.flags & FLAG_DESC != 0 {
            MAX_HDR
        } else {
            HDR
        }
    }
}

/// The name of a data-frame kind, for messages.
pub(crate) fn kind_name(kind: u8) -> &'static str {
    if kind == P2P_KIND {
        return "send/recv";
    }
    comm_core::Collective::from_code(kind).map_or("unknown", |c| c.name())
}

// ---------------------------------------------------------------- control

/// Longest body of a control frame: bounds what a peer can make us buffer.
pub(crate) const MAX_CTL_BODY: usize = 16 << 10;
const CTL_HDR: usize = 8;
const CTL_ABORT: u8 = 0xAB;
const CTL_WAITING: u8 = 0xA7;
/// Longest text kept from a peer (reasons, details).
const MAX_TEXT: usize = 2048;

/// A frame of the control connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Control {
    /// The sender gave up on the group because of `reason`, blaming
    /// `culprits` (group ranks with what each failed to do).
    Abort {
        /// Its error, as text.
        reason: String,
        /// The ranks it blamed.
        culprits: Vec<(usize, String)>,
        /// The collective it was in ([`comm_core::CallDesc::to_wire`]), so a
        /// member whose own call differs reports the mismatch itself.
        desc: Option<[u8; DESC]>,
    },
    /// The sender has been waiting for `missing`.
    Waiting {
        /// Data messages the sender had sent to this receiver when it wrote
        /// the notice: a receiver that has since received more knows the
        /// notice is stale (the sender moved on).
        sent: u64,
        /// The group ranks it waits for.
        missing: Vec<usize>,
    },
}

fn put_text(out: &mut Vec<u8>, s: &str) {
    let mut end = s.len().min(MAX_TEXT);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u32).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..end]);
}

/// Reads little-endian fields from untrusted bytes.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(CommError::Protocol(
                "a control frame from a peer is truncated".into(),
            ));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn text(&mut self) -> Result<String> {
        let n = self.u32()? as usize;
        if n > MAX_TEXT {
            return Err(CommError::Protocol(format!(
                "a control frame from a peer holds a text of {n} bytes (at most {MAX_TEXT})"
            )));
        }
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
    /// A count of items of at least `min_item` bytes each: never more than
    /// the remaining bytes can hold, so nothing is allocated beyond the input.
    fn count(&mut self, min_item: usize) -> Result<usize> {
        let n = self.u32()? as usize;
        if n > self.0.len() / min_item.max(1) {
            return Err(CommError::Protocol(format!(
                "a control frame from a peer announces {n} items in {} bytes",
                self.0.len()
            )));
        }
        Ok(n)
    }
}

impl Control {
    /// The abort frame for `why`, blaming `culprits` (group ranks), sent
    /// from inside collective `desc` (if any).
    pub(crate) fn abort(why: &str, culprits: &[Missing], desc: Option<[u8; DESC]>) -> Control {
        Control::Abort {
            reason: why.to_string(),
            culprits: culprits
                .iter()
                .map(|m| (m.rank.group, m.detail.clone()))
                .collect(),
            desc,
        }
    }

    /// The frame on the wire (header and body).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        let kind = match self {
            Control::Abort {
                reason,
                culprits,
                desc,
            } => {
                match desc {
                    Some(d) => {
                        body.push(1);
                        body.extend_from_slice(d);
                    }
                    None => body.push(0),
                }
                put_text(&mut body, reason);
                // Leave room for the header fields of every culprit.
                let max = (MAX_CTL_BODY - body.len() - 4) / (8 + MAX_TEXT);
                let n = culprits.len().min(max.max(1));
                body.extend_from_slice(&(n as u32).to_le_bytes());
                for (r, d) in &culprits[..n] {
                    body.extend_from_slice(&(*r as u32).to_le_bytes());
                    put_text(&mut body, d);
                }
                CTL_ABORT
            }
            Control::Waiting { sent, missing } => {
                body.extend_from_slice(&sent.to_le_bytes());
                let n = missing.len().min((MAX_CTL_BODY - 12) / 4);
                body.extend_from_slice(&(n as u32).to_le_bytes());
                for r in &missing[..n] {
                    body.extend_from_slice(&(*r as u32).to_le_bytes());
                }
                CTL_WAITING
            }
        };
        let mut out = Vec::with_capacity(CTL_HDR + body.len());
        out.extend_from_slice(&CTL_MAGIC);
        out.push(kind);
        out.push(0);
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Takes one complete frame off the front of `buf`: `Ok(None)` when
    /// more bytes are needed, else the frame and the bytes it used. Ranks in
    /// the frame must be below `world`.
    pub(crate) fn decode(buf: &[u8], world: usize) -> Result<Option<(Control, usize)>> {
        if buf.len() < CTL_HDR {
            if buf.len() >= 2 && buf[..2] != CTL_MAGIC {
                return Err(CommError::Protocol(
                    "a peer's control connection carried bytes that are not a control frame".into(),
                ));
            }
            return Ok(None);
        }
        if buf[..2] != CTL_MAGIC {
            return Err(CommError::Protocol(
                "a peer's control connection carried bytes that are not a control frame".into(),
            ));
        }
        let len = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
        if len > MAX_CTL_BODY {
            return Err(CommError::Protocol(format!(
                "a peer sent a control frame of {len} bytes (at most {MAX_CTL_BODY})"
            )));
        }
        let Some(body) = buf.get(CTL_HDR..CTL_HDR + len) else {
            return Ok(None);
        };
        let mut r = Reader(body);
        let rank = |r: u32| -> Result<usize> {
            let r = r as usize;
            if r < world {
                Ok(r)
            } else {
                Err(CommError::Protocol(format!(
                    "a peer's control frame names rank {r} in a group of {world}"
                )))
            }
        };
        let c = match buf[2] {
            CTL_ABORT => {
                let desc = match r.take(1)?[0] {
                    0 => None,
                    1 => {
                        let mut d = [0u8; DESC];
                        d.copy_from_slice(r.take(DESC)?);
                        Some(d)
                    }
                    _ => {
                        return Err(CommError::Protocol(
                            "a peer's abort frame has a bad description flag".into(),
                        ))
                    }
                };
                let reason = r.text()?;
                let n = r.count(8)?;
                let mut culprits = Vec::with_capacity(n);
                for _ in 0..n {
                    let who = rank(r.u32()?)?;
                    culprits.push((who, r.text()?));
                }
                Control::Abort {
                    reason,
                    culprits,
                    desc,
                }
            }
            CTL_WAITING => {
                let sent = r.u64()?;
                let n = r.count(4)?;
                let mut missing = Vec::with_capacity(n);
                for _ in 0..n {
                    missing.push(rank(r.u32()?)?);
                }
                Control::Waiting { sent, missing }
            }
            k => {
                return Err(CommError::Protocol(format!(
                    "a peer sent a control frame of unknown kind {k:#x}"
                )))
            }
        };
        if !r.0.is_empty() {
            return Err(CommError::Protocol(
                "a peer's control frame has trailing bytes".into(),
            ));
        }
        Ok(Some((c, CTL_HDR + len)))
    }
}

// -------------------------------------------------------------- handshake

/// What the connecting side says first: who it is and which connection this
/// is. It is not secret; the challenge-response that follows binds every
/// field, so a changed field fails authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientHeader {
    /// Group size as the client knows it.
    pub world: u32,
    /// The connecting rank.
    pub from: u32,
    /// The rank it means to reach.
    pub to: u32,
    /// [`CHANNEL_DATA`] or [`CHANNEL_CONTROL`].
    pub channel: u8,
}

/// Magic and version of [`ClientHeader`].
pub const CLIENT_MAGIC: [u8; 8] = *b"DISTTCP2";
/// Bytes of an encoded [`ClientHeader`].
pub const CLIENT_HEADER_LEN: usize = 24;
/// The data connection of a pair.
pub const CHANNEL_DATA: u8 = 0;
/// The control connection of a pair (aborts, waiting notices).
pub const CHANNEL_CONTROL: u8 = 1;
/// The accepting side's verdict byte: accepted (a proof follows).
pub const ACCEPTED: u8 = 1;

impl ClientHeader {
    /// The bytes on the wire.
    pub fn encode(&self) -> [u8; CLIENT_HEADER_LEN] {
        let mut b = [0u8; CLIENT_HEADER_LEN];
        b[..8].copy_from_slice(&CLIENT_MAGIC);
        b[8..12].copy_from_slice(&self.world.to_le_bytes());
        b[12..16].copy_from_slice(&self.from.to_le_bytes());
        b[16..20].copy_from_slice(&self.to.to_le_bytes());
        b[20] = self.channel;
        b
    }

    /// Parses a header; `None` for anything malformed.
    pub fn decode(b: &[u8]) -> Option<ClientHeader> {
        let b: &[u8; CLIENT_HEADER_LEN] = b.try_into().ok()?;
        if b[..8] != CLIENT_MAGIC || b[21..] != [0, 0, 0] || b[20] > CHANNEL_CONTROL {
            return None;
        }
        let u = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Some(ClientHeader {
            world: u(8),
            from: u(12),
            to: u(16),
            channel: b[20],
        })
    }

    /// The authentication context (see [`comm_core::auth`]): the group's
    /// identity, its size, both ranks and the channel, so an answer is valid
    /// for exactly this connection.
    pub fn context(&self, group: &str) -> String {
        format!(
            "comm-cpu tcp group `{group}` world {} from {} to {} channel {}",
            self.world, self.from, self.to, self.channel
        )
    }
}

// ----------------------------------------------------------- address record

/// What each member publishes in the store: where it listens and which
/// network stack it is on (host boot id + network namespace), so members can
/// tell when a group spans hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AddrRecord {
    pub addr: std::net::SocketAddr,
    pub host: String,
}

impl AddrRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        format!("{} {}", self.addr, self.host).into_bytes()
    }

    pub(crate) fn decode(key: &str, b: &[u8]) -> Result<AddrRecord> {
        let bad = || {
            CommError::Protocol(format!(
                "store key `{key}` does not hold `<socket address> <host id>`"
            ))
        };
        if b.len() > 1024 {
            return Err(bad());
        }
        let s = std::str::from_utf8(b).map_err(|_| bad())?;
        let (a, h) = s.split_once(' ').ok_or_else(bad)?;
        Ok(AddrRecord {
            addr: a.parse().map_err(|_| bad())?,
            host: h.to_string(),
        })
    }
}

#[cfg(test)]
mod fuzz {
    //! Property tests of every decoder of peer bytes: arbitrary input never
    //! panics and allocates at most in proportion to the input; valid frames
    //! round-trip. Iterations: `PROPTEST_CASES` (default below).
    use super::*;
    use proptest::prelude::*;

    fn cases() -> u32 {
        std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20_000)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

        #[test]
        fn data_header_never_panics(b in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(h) = Header::decode(&b) {
                prop_assert_eq!(&h.encode()[..], &b[..HDR]);
                prop_assert!(h.wire_len() == HDR || h.wire_len() == MAX_HDR);
            }
        }

        #[test]
        fn call_desc_never_panics(b in proptest::collection::vec(any::<u8>(), 0..80)) {
            if let Ok(d) = comm_core::CallDesc::from_wire(&b) {
                // What decodes re-encodes to a description that decodes the same.
                prop_assert_eq!(comm_core::CallDesc::from_wire(&d.to_wire()).ok(), Some(d));
            }
        }

        #[test]
        fn control_never_panics(
            b in proptest::collection::vec(any::<u8>(), 0..200),
            world in 1usize..70,
            magic in any::<bool>(),
        ) {
            let mut b = b;
            if magic && b.len() >= 8 {
                // Valid magic and a plausible length, so the body parser runs.
                b[..2].copy_from_slice(&CTL_MAGIC);
                b[2] = if b[2] % 2 == 0 { CTL_ABORT } else { CTL_WAITING };
                let len = (b.len() - 8) as u32;
                b[4..8].copy_from_slice(&len.to_le_bytes());
            }
            if let Ok(Some((c, used))) = Control::decode(&b, world) {
                prop_assert!(used <= b.len());
                prop_assert_eq!(Control::decode(&c.encode(), world).unwrap().unwrap().0, c);
            }
        }

        #[test]
        fn control_round_trips(
            desc in proptest::option::of(proptest::array::uniform32(any::<u8>())),
            reason in ".{0,300}",
            culprits in proptest::collection::vec((0usize..8, ".{0,40}"), 0..6),
            seq in any::<u64>(),
            missing in proptest::collection::vec(0usize..8, 0..8),
            split in 0usize..400,
        ) {
            for c in [
                Control::Abort {
                    reason: reason.clone(),
                    culprits: culprits.clone(),
                    desc: desc.map(|h| {
                        let mut d = [0u8; DESC];
                        d[..32].copy_from_slice(&h);
                        d[32..].copy_from_slice(&h);
                        d
                    }),
                },
                Control::Waiting { sent: seq, missing: missing.clone() },
            ] {
                let wire = c.encode();
                // Any prefix is "need more", never an error or a wrong frame.
                let cut = split.min(wire.len());
                if cut < wire.len() {
                    prop_assert_eq!(Control::decode(&wire[..cut], 8).unwrap(), None);
                }
                let (back, used) = Control::decode(&wire, 8).unwrap().unwrap();
                prop_assert_eq!(used, wire.len());
                prop_assert_eq!(back, c);
            }
        }

        #[test]
        fn client_header_never_panics(b in proptest::collection::vec(any::<u8>(), 0..30)) {
            if let Some(h) = ClientHeader::decode(&b) {
                prop_assert_eq!(&h.encode()[..], &b[..]);
            }
        }

        #[test]
        fn addr_record_never_panics(b in proptest::collection::vec(any::<u8>(), 0..80)) {
            if let Ok(r) = AddrRecord::decode("k", &b) {
                prop_assert_eq!(AddrRecord::decode("k", &r.encode()).unwrap(), r);
            }
        }
    }

    #[test]
    fn oversized_control_frames_are_refused_before_buffering() {
        let mut b = vec![0u8; 8];
        b[..2].copy_from_slice(&CTL_MAGIC);
        b[2] = CTL_ABORT;
        b[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Control::decode(&b, 4).is_err());
        // An abort naming a rank outside the group is refused.
        let c = Control::Abort {
            reason: "x".into(),
            culprits: vec![(9, String::new())],
            desc: None,
        };
        assert!(Control::decode(&c.encode(), 4).is_err());
    }
}
