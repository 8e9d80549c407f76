//! The object codec: serde + postcard values in length-prefixed frames.
//!
//! A frame is a `u64` little-endian byte count followed by that many bytes.
//! [`read_frame`] refuses a frame longer than the caller's limit before
//! reading its body, and grows its buffer only as bytes actually arrive, so a
//! corrupt or hostile length never turns into a huge allocation.

use std::io::{Read, Write};

use comm_core::{CommError, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Frames up to this size are written with a single `write` call (header and
/// payload copied together), which keeps small requests in one TCP segment.
const COALESCE_LIMIT: usize = 64 * 1024;

/// Encodes `value` with postcard.
///
/// ```
/// let bytes = dist_utils::codec::encode(&(1u32, "two")).unwrap();
/// let back: (u32, String) = dist_utils::codec::decode(&bytes).unwrap();
/// assert_eq!(back, (1, "two".to_string()));
/// ```
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    postcard::to_stdvec(value).map_err(|e| {
        CommError::Codec(format!(
            "could not encode a value of type `{}`: {e}",
            std::any::type_name::<T>()
        ))
    })
}

/// Decodes a postcard value of type `T`; trailing bytes are an error (they mean
/// the sender and receiver disagree about the type). `T` may borrow from
/// `bytes` (`&str`, `&[u8]`), so a value can be read where it lies.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T> {
    let (value, rest) = postcard::take_from_bytes::<T>(bytes).map_err(|e| {
        CommError::Codec(format!(
            "could not decode {} byte(s) as `{}`: {e}; do sender and receiver use the same type?",
            bytes.len(),
            std::any::type_name::<T>()
        ))
    })?;
    if !rest.is_empty() {
        return Err(CommError::Codec(format!(
            "decoding `{}` left {} of {} byte(s) unread; do sender and receiver use the same type?",
            std::any::type_name::<T>(),
            rest.len(),
            bytes.len()
        )));
    }
    Ok(value)
}

/// Writes one frame: the payload length as `u64` little-endian, then the payload.
pub fn write_frame(w: &mut impl Write, payload: &[u8]) -> Result<()> {
    let header = (payload.len() as u64).to_le_bytes();
    let res = if payload.len() <= COALESCE_LIMIT {
        let mut buf = Vec::with_capacity(8 + payload.len());
        buf.extend_from_slice(&header);
        buf.extend_from_slice(payload);
        w.write_all(&buf)
    } else {
        w.write_all(&header).and_then(|()| w.write_all(payload))
    };
    res.and_then(|()| w.flush())
        .map_err(|e| CommError::io(format!("writing a frame of {} byte(s)", payload.len()), e))
}

/// Reads one frame written by [`write_frame`].
///
/// A length over `max_len` is a [`CommError::Protocol`] error and nothing of
/// the body is read. An end of stream before the header or inside the body is
/// a [`CommError::Io`] error of kind `UnexpectedEof`.
pub fn read_frame(r: &mut impl Read, max_len: usize) -> Result<Vec<u8>> {
    let mut header = [0u8; 8];
    r.read_exact(&mut header)
        .map_err(|e| CommError::io("reading a frame header", e))?;
    let len = u64::from_le_bytes(header);
    if len > max_len as u64 {
        return Err(CommError::Protocol(format!(
            "frame of {len} byte(s) exceeds the limit of {max_len} byte(s)"
        )));
    }
    let len = len as usize;
    // Grow with the data actually received, not with the announced length.
    let mut buf = Vec::with_capacity(len.min(COALESCE_LIMIT));
    let got = r
        .by_ref()
        .take(len as u64)
        .read_to_end(&mut buf)
        .map_err(|e| CommError::io(format!("reading a frame body of {len} byte(s)"), e))?;
    if got != len {
        return Err(CommError::io(
            format!("reading a frame body of {len} byte(s)"),
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("stream ended after {got} byte(s)"),
            ),
        ));
    }
    Ok(buf)
}

/// Finds the first complete frame at the start of `buf`, for readers that
/// collect bytes as they arrive (the store servers' event loop).
///
/// `Ok(None)`: not complete yet (read more). `Ok(Some((payload, used)))`:
/// the payload, and how many bytes of `buf` the frame took. A length over
/// `max_len` is a [`CommError::Protocol`] error as soon as the header is in,
/// so a hostile length is refused before anything is buffered for it.
///
/// ```
/// use dist_utils::codec::{split_frame, write_frame};
/// let mut buf = Vec::new();
/// write_frame(&mut buf, b"abc").unwrap();
/// assert_eq!(split_frame(&buf[..5], 16).unwrap(), None);
/// assert_eq!(split_frame(&buf, 16).unwrap(), Some((&b"abc"[..], 11)));
/// assert!(split_frame(&buf, 2).is_err());
/// ```
pub fn split_frame(buf: &[u8], max_len: usize) -> Result<Option<(&[u8], usize)>> {
    let Some(header) = buf.get(..8) else {
        return Ok(None);
    };
    let mut h = [0u8; 8];
    h.copy_from_slice(header);
    let len = u64::from_le_bytes(h);
    if len > max_len as u64 {
        return Err(CommError::Protocol(format!(
            "frame of {len} byte(s) exceeds the limit of {max_len} byte(s)"
        )));
    }
    // `len <= max_len`, so it fits in usize and 8 + len cannot overflow
    // unless max_len is within 8 of usize::MAX.
    let end = 8usize.saturating_add(len as usize);
    Ok(buf.get(8..end).map(|payload| (payload, end)))
}

/// Encodes `value` and writes it as one frame.
pub fn write_msg<T: Serialize + ?Sized>(w: &mut impl Write, value: &T) -> Result<()> {
    write_frame(w, &encode(value)?)
}

/// Reads one frame and decodes it as `T`.
pub fn read_msg<T: DeserializeOwned>(r: &mut impl Read, max_len: usize) -> Result<T> {
    decode(&read_frame(r, max_len)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_roundtrip_and_limit() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"hello").unwrap();
        write_frame(&mut buf, &[]).unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame(&mut r, 16).unwrap(), b"hello");
        assert_eq!(read_frame(&mut r, 16).unwrap(), b"");
        assert!(matches!(
            read_frame(&mut r, 16),
            Err(CommError::Io { ref source, .. }) if source.kind() == std::io::ErrorKind::UnexpectedEof
        ));

        let mut r = &buf[..];
        assert!(matches!(read_frame(&mut r, 4), Err(CommError::Protocol(_))));

        // A hostile header announcing 2^60 bytes: refused or reported truncated, never allocated.
        let mut evil = (1u64 << 60).to_le_bytes().to_vec();
        evil.extend_from_slice(b"abc");
        assert!(matches!(
            read_frame(&mut &evil[..], usize::MAX),
            Err(CommError::Io { .. })
        ));
        assert!(matches!(
            read_frame(&mut &evil[..], 1 << 20),
            Err(CommError::Protocol(_))
        ));
    }

    #[test]
    fn codec_errors() {
        let b = encode(&7u8).unwrap();
        assert!(matches!(
            decode::<String>(&[5, b'a']),
            Err(CommError::Codec(_))
        ));
        let mut long = b.clone();
        long.push(0);
        assert!(matches!(decode::<u8>(&long), Err(CommError::Codec(_))));
        assert_eq!(decode::<u8>(&b).unwrap(), 7);
    }
}
