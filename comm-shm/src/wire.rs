//! What members read from each other's writes in a segment, encoded and
//! decoded in one place: segment headers, step descriptions (the 64-byte
//! [`CallDesc`] of the call plus how this step moves data), point-to-point
//! slot headers, abort records and message-queue record lengths.
//!
//! Everything here comes from another process and is treated as untrusted:
//! decoders check every field, never panic and never size an allocation
//! from a peer's value without a bound (the `fuzz` tests feed them
//! arbitrary input).

use comm_core::{CallDesc, CommError, Missing, Result};

/// Words of a step description in a line ([`StepDesc::WORDS`]).
pub(crate) const STEP_WORDS: usize = 12;
/// Word of a step description holding the (per-rank) source address.
pub(crate) const ADDR_WORD: usize = 10;
/// Words of a point-to-point slot header.
pub(crate) const SLOT_WORDS: usize = 10;

const STEP_TAG: u64 = 0x5354; // "ST"

/// How a step moves data. Members agree on it (it follows from the call
/// and from settings agreed at set-up); a difference means the members
/// run different builds or settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Algo {
    /// Every member arrives; nothing moves (barrier).
    Sync = 1,
    /// Through the shared workspace (copy in, copy out), chunk by chunk.
    Copy = 2,
    /// all_reduce: every member reduces the whole chunk.
    OneShot = 3,
    /// all_reduce: member `r` reduces slice `r`, then everyone copies.
    TwoShot = 4,
    /// Straight from the peer's memory (`process_vm_readv`).
    SingleCopy = 5,
}

impl Algo {
    const ALL: [Algo; 5] = [
        Algo::Sync,
        Algo::Copy,
        Algo::OneShot,
        Algo::TwoShot,
        Algo::SingleCopy,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Algo::Sync => "synchronisation only",
            Algo::Copy => "two copies through the workspace",
            Algo::OneShot => "one-shot reduction",
            Algo::TwoShot => "two-shot reduction",
            Algo::SingleCopy => "single copy (process_vm_readv)",
        }
    }

    fn from_code(c: u8) -> Option<Algo> {
        Algo::ALL.into_iter().find(|a| *a as u8 == c)
    }
}

/// What a member publishes with each step: the call it is in, how the step
/// moves data, which chunk of how many, and (single copy) the address of
/// its source buffer in its own process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StepDesc {
    /// [`CallDesc::to_wire`] of the call.
    pub call: [u8; 64],
    pub algo: Algo,
    pub chunk: u32,
    pub chunks: u32,
    pub addr: u64,
    /// Single copy: digest of the layout of the source at `addr`.
    pub layout: u64,
}

impl StepDesc {
    pub(crate) fn encode(&self) -> [u64; STEP_WORDS] {
        let mut w = [0u64; STEP_WORDS];
        for (i, c) in self.call.chunks_exact(8).enumerate() {
            w[i] = u64::from_le_bytes(c.try_into().unwrap_or_default());
        }
        w[8] = (STEP_TAG << 48) | (u64::from(self.algo as u8) << 32) | u64::from(self.chunk);
        w[9] = u64::from(self.chunks);
        w[10] = self.addr;
        w[11] = self.layout;
        w
    }

    /// Decodes words a peer published (any words: never panics).
    pub(crate) fn decode(w: &[u64; STEP_WORDS]) -> Result<StepDesc> {
        let mut call = [0u8; 64];
        for (c, x) in call.chunks_exact_mut(8).zip(&w[..8]) {
            c.copy_from_slice(&x.to_le_bytes());
        }
        if w[8] >> 48 != STEP_TAG {
            return Err(CommError::Protocol(
                "a peer published a step description of another format".into(),
            ));
        }
        let algo = Algo::from_code((w[8] >> 32) as u8).ok_or_else(|| {
            CommError::Protocol(format!("unknown data-movement code {}", (w[8] >> 32) as u8))
        })?;
        let chunks = u32::try_from(w[9])
            .map_err(|_| CommError::Protocol(format!("a step count of {} is invalid", w[9])))?;
        Ok(StepDesc {
            call,
            algo,
            chunk: w[8] as u32,
            chunks,
            addr: w[10],
            layout: w[11],
        })
    }

    /// The call this step belongs to.
    pub(crate) fn call_desc(&self) -> Result<CallDesc> {
        CallDesc::from_wire(&self.call)
    }

    /// `chunk 2 of 5 by two-shot reduction`.
    pub(crate) fn how(&self) -> String {
        format!(
            "chunk {} of {} by {}",
            u64::from(self.chunk) + 1,
            self.chunks,
            self.algo.name()
        )
    }
}

/// The header of one point-to-point slot: the sender's description of the
/// message and where this chunk lies in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SlotHeader {
    pub desc: [u8; 64],
    pub offset: u64,
    pub len: u64,
}

impl SlotHeader {
    pub(crate) fn encode(&self) -> [u64; SLOT_WORDS] {
        let mut w = [0u64; SLOT_WORDS];
        for (i, c) in self.desc.chunks_exact(8).enumerate() {
            w[i] = u64::from_le_bytes(c.try_into().unwrap_or_default());
        }
        w[8] = self.offset;
        w[9] = self.len;
        w
    }

    /// Decodes a header whose chunk must fit a slot of `slot` bytes.
    pub(crate) fn decode(w: &[u64; SLOT_WORDS], slot: usize) -> Result<SlotHeader> {
        let mut desc = [0u8; 64];
        for (c, x) in desc.chunks_exact_mut(8).zip(&w[..8]) {
            c.copy_from_slice(&x.to_le_bytes());
        }
        if w[9] > slot as u64 || w[8].checked_add(w[9]).is_none() {
            return Err(CommError::Protocol(format!(
                "a peer announced a chunk of {} bytes at offset {} in a slot of {slot}",
                w[9], w[8]
            )));
        }
        Ok(SlotHeader {
            desc,
            offset: w[8],
            len: w[9],
        })
    }
}

/// Bytes of the abort record area of a segment.
pub(crate) const ABORT_BYTES: usize = 1024;
const ABORT_MAGIC: u32 = u32::from_le_bytes(*b"ABRT");
/// Most culprits an abort record carries.
pub(crate) const MAX_CULPRITS: usize = 64;
const REASON_AT: usize = 16 + 4 * MAX_CULPRITS;
/// Longest reason an abort record carries (longer ones are cut).
pub(crate) const MAX_REASON: usize = ABORT_BYTES - REASON_AT;

/// Who aborted a segment, why, and whom it blamed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AbortRecord {
    /// The aborting member (segment member index).
    pub member: usize,
    pub reason: String,
    /// Blamed members (segment member indices).
    pub culprits: Vec<usize>,
}

impl AbortRecord {
    pub(crate) fn encode(&self) -> [u8; ABORT_BYTES] {
        let mut b = [0u8; ABORT_BYTES];
        let culprits = &self.culprits[..self.culprits.len().min(MAX_CULPRITS)];
        let mut reason = self.reason.as_bytes();
        if reason.len() > MAX_REASON {
            // Cut on a character boundary.
            let mut end = MAX_REASON;
            while !self.reason.is_char_boundary(end) {
                end -= 1;
            }
            reason = &reason[..end];
        }
        b[0..4].copy_from_slice(&ABORT_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&(self.member as u32).to_le_bytes());
        b[8..12].copy_from_slice(&(culprits.len() as u32).to_le_bytes());
        b[12..16].copy_from_slice(&(reason.len() as u32).to_le_bytes());
        for (i, c) in culprits.iter().enumerate() {
            b[16 + 4 * i..20 + 4 * i].copy_from_slice(&(*c as u32).to_le_bytes());
        }
        b[REASON_AT..REASON_AT + reason.len()].copy_from_slice(reason);
        b
    }

    /// Decodes a record of a segment of `members` members; `None` when the
    /// bytes are not a valid record (a peer died while writing it, or
    /// garbage).
    pub(crate) fn decode(b: &[u8], members: usize) -> Option<AbortRecord> {
        let u32_at = |i: usize| -> Option<usize> {
            let a: [u8; 4] = b.get(i..i + 4)?.try_into().ok()?;
            Some(u32::from_le_bytes(a) as usize)
        };
        if u32_at(0)? != ABORT_MAGIC as usize {
            return None;
        }
        let member = u32_at(4)?;
        let n = u32_at(8)?;
        let len = u32_at(12)?;
        if member >= members || n > MAX_CULPRITS || len > MAX_REASON {
            return None;
        }
        let culprits = (0..n)
            .map(|i| u32_at(16 + 4 * i).filter(|c| *c < members))
            .collect::<Option<Vec<_>>>()?;
        let reason = String::from_utf8_lossy(b.get(REASON_AT..REASON_AT + len)?).into_owned();
        Some(AbortRecord {
            member,
            reason,
            culprits,
        })
    }

    /// The culprits as [`Missing`] entries, mapping members to ranks.
    pub(crate) fn missing(&self, rank_of: impl Fn(usize) -> usize) -> Vec<Missing> {
        self.culprits
            .iter()
            .map(|&m| Missing::new(rank_of(m), ""))
            .collect()
    }
}

/// The header of a segment as a member reads it before trusting the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SegmentHeader {
    pub magic: u64,
    pub version: u32,
    pub members: u32,
    pub kind: u32,
    pub ctrl_lines: u32,
    pub total_len: u64,
}

impl SegmentHeader {
    /// `Ok` when this header is the one `expected` describes and the object
    /// really is `file_len` bytes long.
    pub(crate) fn check(&self, expected: &SegmentHeader, file_len: u64, what: &str) -> Result<()> {
        if self.magic != expected.magic || self.version != expected.version {
            return Err(CommError::Protocol(format!(
                "{what}: the segment has a foreign header (magic {:#x} version {}, expected \
                 {:#x} version {})",
                self.magic, self.version, expected.magic, expected.version
            )));
        }
        if self != expected || file_len != expected.total_len {
            return Err(CommError::Protocol(format!(
                "{what}: the segment was made for {} members, kind {:#x}, {} control lines, \
                 {} bytes (file {file_len} bytes) but this member expects {} members, kind \
                 {:#x}, {} control lines, {} bytes; do all members pass the same sizes and \
                 options?",
                self.members,
                self.kind,
                self.ctrl_lines,
                self.total_len,
                expected.members,
                expected.kind,
                expected.ctrl_lines,
                expected.total_len
            )));
        }
        Ok(())
    }
}

/// What a queue's writer publishes in the store for its readers: ring size,
/// writer rank and reader ranks (`"<ring>;<writer>;<r0>,<r1>,..."`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QueueDesc {
    pub ring: usize,
    pub writer: usize,
    pub readers: Vec<usize>,
}

/// Smallest ring a queue accepts.
pub(crate) const MIN_RING: usize = 64;
/// Largest ring a queue accepts (1 TiB: far above any /dev/shm).
pub(crate) const MAX_RING: usize = 1 << 40;

impl QueueDesc {
    pub(crate) fn encode(&self) -> String {
        let readers: Vec<String> = self.readers.iter().map(ToString::to_string).collect();
        format!("{};{};{}", self.ring, self.writer, readers.join(","))
    }

    /// Parses and checks a descriptor read from the store: a ring of
    /// [`MIN_RING`]..=[`MAX_RING`] bytes, at most `max_readers` distinct
    /// readers, none of them the writer.
    pub(crate) fn decode(raw: &[u8], max_readers: usize) -> Result<QueueDesc> {
        let bad = |why: &str| CommError::Protocol(format!("malformed queue descriptor: {why}"));
        if raw.len() > 16 * (max_readers + 2) {
            return Err(bad("too long"));
        }
        let s = std::str::from_utf8(raw).map_err(|_| bad("not UTF-8"))?;
        let mut it = s.split(';');
        let num = |v: Option<&str>, what: &str| -> Result<usize> {
            v.and_then(|v| v.parse().ok()).ok_or_else(|| bad(what))
        };
        let ring = num(it.next(), "ring size")?;
        let writer = num(it.next(), "writer rank")?;
        let readers: Vec<usize> = match it.next() {
            Some("") | None => vec![],
            Some(l) => l
                .split(',')
                .map(|v| num(Some(v), "reader rank"))
                .collect::<Result<_>>()?,
        };
        if it.next().is_some() {
            return Err(bad("trailing fields"));
        }
        if !(MIN_RING..=MAX_RING).contains(&ring) {
            return Err(bad("ring size out of range"));
        }
        if readers.len() > max_readers {
            return Err(bad("too many readers"));
        }
        let mut sorted = readers.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != readers.len() || readers.contains(&writer) {
            return Err(bad("repeated ranks"));
        }
        Ok(QueueDesc {
            ring,
            writer,
            readers,
        })
    }
}

/// The length of a message-queue record from its 8-byte header, refused
/// when it exceeds `max` (so a corrupt or hostile header cannot make a
/// reader allocate without bound).
pub(crate) fn record_len(hdr: [u8; 8], max: usize, what: impl FnOnce() -> String) -> Result<usize> {
    let len = u64::from_le_bytes(hdr);
    match usize::try_from(len) {
        Ok(n) if n <= max => Ok(n),
        _ => Err(CommError::Protocol(format!(
            "{}: a record announces {len} bytes, more than the limit of {max} \
             (MqOptions::max_message_bytes); the queue is corrupt or the writer runs \
             another build",
            what()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use comm_core::{Collective, DType};
    use proptest::prelude::*;

    fn desc() -> CallDesc {
        CallDesc::new(Collective::AllToAll4d, 5, DType::F32, 1 << 20).with_shape(&[1, 4, 4, 8])
    }

    #[test]
    fn round_trips() {
        let s = StepDesc {
            call: desc().to_wire(),
            algo: Algo::TwoShot,
            chunk: 3,
            chunks: 9,
            addr: 0xdead_beef,
            layout: 3,
        };
        assert_eq!(StepDesc::decode(&s.encode()).unwrap(), s);
        assert_eq!(s.call_desc().unwrap(), desc());
        let h = SlotHeader {
            desc: desc().to_wire(),
            offset: 4096,
            len: 100,
        };
        assert_eq!(SlotHeader::decode(&h.encode(), 4096).unwrap(), h);
        assert!(SlotHeader::decode(&h.encode(), 99).is_err());
        let a = AbortRecord {
            member: 2,
            reason: "é".repeat(MAX_REASON),
            culprits: vec![0, 1],
        };
        let d = AbortRecord::decode(&a.encode(), 3).unwrap();
        assert_eq!((d.member, d.culprits.clone()), (2, vec![0, 1]));
        assert!(d.reason.len() <= MAX_REASON && d.reason.starts_with('é'));
        assert!(AbortRecord::decode(&a.encode(), 2).is_none());
        assert_eq!(record_len(7u64.to_le_bytes(), 7, || "q".into()).unwrap(), 7);
        assert!(record_len(8u64.to_le_bytes(), 7, || "q".into()).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 20_000, ..ProptestConfig::default() })]

        /// Arbitrary words never panic a step decoder; what decodes
        /// re-encodes to the same words.
        #[test]
        fn fuzz_step_desc(w in proptest::array::uniform12(any::<u64>())) {
            if let Ok(s) = StepDesc::decode(&w) {
                prop_assert_eq!(s.encode(), w);
                let _ = s.call_desc();
                let _ = s.how();
            }
        }

        /// Real step descriptions with any single word corrupted.
        #[test]
        fn fuzz_step_desc_mutated(i in 0usize..STEP_WORDS, x in any::<u64>(), chunk in any::<u32>()) {
            let s = StepDesc { call: desc().to_wire(), algo: Algo::Copy, chunk, chunks: 7, addr: 1, layout: 0 };
            let mut w = s.encode();
            w[i] = x;
            if let Ok(d) = StepDesc::decode(&w) {
                let _ = d.call_desc().map(|c| c.to_string());
            }
        }

        #[test]
        fn fuzz_slot_header(w in proptest::array::uniform10(any::<u64>()), slot in 0usize..1 << 20) {
            if let Ok(h) = SlotHeader::decode(&w, slot) {
                prop_assert!(h.len <= slot as u64);
                prop_assert!(h.offset.checked_add(h.len).is_some());
            }
        }

        #[test]
        fn fuzz_abort_record(b in proptest::collection::vec(any::<u8>(), 0..ABORT_BYTES + 8),
                             members in 0usize..100) {
            if let Some(r) = AbortRecord::decode(&b, members) {
                prop_assert!(r.member < members);
                prop_assert!(r.culprits.iter().all(|c| *c < members));
                prop_assert!(r.reason.len() <= 3 * MAX_REASON);
            }
        }

        /// Valid records with arbitrary fields: the count and length fields
        /// are what a hostile writer would set.
        #[test]
        fn fuzz_abort_record_fields(n in any::<u32>(), len in any::<u32>(), member in any::<u32>()) {
            let mut b = AbortRecord { member: 0, reason: "x".into(), culprits: vec![] }.encode();
            b[4..8].copy_from_slice(&member.to_le_bytes());
            b[8..12].copy_from_slice(&n.to_le_bytes());
            b[12..16].copy_from_slice(&len.to_le_bytes());
            let _ = AbortRecord::decode(&b, 4);
        }

        #[test]
        fn fuzz_queue_desc(raw in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(d) = QueueDesc::decode(&raw, 8) {
                prop_assert!(d.ring >= MIN_RING && d.readers.len() <= 8);
                prop_assert_eq!(QueueDesc::decode(d.encode().as_bytes(), 8).unwrap(), d);
            }
        }

        #[test]
        fn fuzz_queue_desc_text(ring in any::<u64>(), writer in any::<u16>(),
                                readers in proptest::collection::vec(any::<u16>(), 0..12)) {
            let text = format!("{ring};{writer};{}",
                readers.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(","));
            let _ = QueueDesc::decode(text.as_bytes(), 8);
        }

        #[test]
        fn fuzz_record_len(h in any::<[u8; 8]>(), max in any::<usize>()) {
            if let Ok(n) = record_len(h, max, || "q".into()) {
                prop_assert!(n <= max);
            }
        }

        #[test]
        fn fuzz_segment_header(magic in any::<u64>(), version in any::<u32>(), members in any::<u32>(),
                               kind in any::<u32>(), ctrl in any::<u32>(), total in any::<u64>(),
                               file_len in any::<u64>()) {
            let expected = SegmentHeader { magic: 1, version: 1, members: 4, kind: 7, ctrl_lines: 9, total_len: 8192 };
            let h = SegmentHeader { magic, version, members, kind, ctrl_lines: ctrl, total_len: total };
            if h.check(&expected, file_len, "fuzz").is_ok() {
                prop_assert_eq!(h, expected);
                prop_assert_eq!(file_len, 8192);
            }
        }
    }
}
