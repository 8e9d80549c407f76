//! The c10d TCPStore wire format: query encoding (client), incremental
//! query parsing (server) and bounded reply readers (client).
//!
//! Facts of the format, as PyTorch documents and implements it: a query is
//! one command byte followed by its fields; strings and byte vectors are a
//! `u64` length then the bytes; integers are native-endian (little-endian on
//! every platform PyTorch ships for). A connection starts with `VALIDATE`
//! and the magic number.

use std::io::Read;

use comm_core::{CommError, Result};

/// The number a client sends after `VALIDATE` as its first query.
pub const VALIDATION_MAGIC: u32 = 0x3C85_F7CE;
/// Longest key accepted (bytes).
pub const MAX_KEY_LEN: usize = 64 * 1024;
/// Largest value accepted (bytes).
pub const MAX_VALUE_LEN: usize = 256 << 20;
/// Most keys in one query.
pub const MAX_KEYS: usize = 128 * 1024;

pub(crate) mod cmd {
    pub const VALIDATE: u8 = 0;
    pub const SET: u8 = 1;
    pub const COMPARE_SET: u8 = 2;
    pub const GET: u8 = 3;
    pub const ADD: u8 = 4;
    pub const CHECK: u8 = 5;
    pub const WAIT: u8 = 6;
    pub const GETNUMKEYS: u8 = 7;
    pub const DELETE_KEY: u8 = 8;
    pub const APPEND: u8 = 9;
    pub const MULTI_GET: u8 = 10;
    pub const MULTI_SET: u8 = 11;
    pub const CANCEL_WAIT: u8 = 12;
    pub const PING: u8 = 13;
}

/// `CHECK` replies.
pub(crate) const READY: u8 = 0;
pub(crate) const NOT_READY: u8 = 1;
/// `WAIT` / `CANCEL_WAIT` replies.
pub(crate) const STOP_WAITING: u8 = 0;
pub(crate) const WAIT_CANCELED: u8 = 1;

/// One query, as the server sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Query {
    Validate(u32),
    Set {
        key: String,
        value: Vec<u8>,
    },
    CompareSet {
        key: String,
        expected: Vec<u8>,
        desired: Vec<u8>,
    },
    Get(String),
    Add {
        key: String,
        delta: i64,
    },
    Check(Vec<String>),
    Wait(Vec<String>),
    NumKeys,
    Delete(String),
    Append {
        key: String,
        value: Vec<u8>,
    },
    MultiGet(Vec<String>),
    MultiSet(Vec<(String, Vec<u8>)>),
    CancelWait,
    Ping(u32),
}

fn push_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u64).to_le_bytes());
    out.extend_from_slice(b);
}

fn push_keys(out: &mut Vec<u8>, keys: &[String]) {
    out.extend_from_slice(&(keys.len() as u64).to_le_bytes());
    for k in keys {
        push_bytes(out, k.as_bytes());
    }
}

impl Query {
    /// Appends the wire bytes of this query to `out`.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Query::Validate(m) => {
                out.push(cmd::VALIDATE);
                out.extend_from_slice(&m.to_le_bytes());
            }
            Query::Set { key, value } => {
                out.push(cmd::SET);
                push_bytes(out, key.as_bytes());
                push_bytes(out, value);
            }
            Query::CompareSet {
                key,
                expected,
                desired,
            } => {
                out.push(cmd::COMPARE_SET);
                push_bytes(out, key.as_bytes());
                push_bytes(out, expected);
                push_bytes(out, desired);
            }
            Query::Get(key) => {
                out.push(cmd::GET);
                push_bytes(out, key.as_bytes());
            }
            Query::Add { key, delta } => {
                out.push(cmd::ADD);
                push_bytes(out, key.as_bytes());
                out.extend_from_slice(&delta.to_le_bytes());
            }
            Query::Check(keys) => {
                out.push(cmd::CHECK);
                push_keys(out, keys);
            }
            Query::Wait(keys) => {
                out.push(cmd::WAIT);
                push_keys(out, keys);
            }
            Query::NumKeys => out.push(cmd::GETNUMKEYS),
            Query::Delete(key) => {
                out.push(cmd::DELETE_KEY);
                push_bytes(out, key.as_bytes());
            }
            Query::Append { key, value } => {
                out.push(cmd::APPEND);
                push_bytes(out, key.as_bytes());
                push_bytes(out, value);
            }
            Query::MultiGet(keys) => {
                out.push(cmd::MULTI_GET);
                push_keys(out, keys);
            }
            Query::MultiSet(pairs) => {
                out.push(cmd::MULTI_SET);
                out.extend_from_slice(&(pairs.len() as u64).to_le_bytes());
                for (k, v) in pairs {
                    push_bytes(out, k.as_bytes());
                    push_bytes(out, v);
                }
            }
            Query::CancelWait => out.push(cmd::CANCEL_WAIT),
            Query::Ping(n) => {
                out.push(cmd::PING);
                out.extend_from_slice(&n.to_le_bytes());
            }
        }
    }
}

/// A read position in a buffer that may not hold the whole query yet.
struct Cur<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// `None` from a cursor: the query is not complete yet.
macro_rules! need {
    ($e:expr) => {
        match $e {
            Some(v) => v,
            None => return Ok(None),
        }
    };
}

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Some(a)
    }
    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }
    /// A length-prefixed field; the length is checked against `max` as soon
    /// as it is known, before anything is buffered for it.
    fn field(&mut self, max: usize, what: &str) -> std::result::Result<Option<&'a [u8]>, String> {
        let len = need!(self.u64());
        if len > max as u64 {
            return Err(format!("{what} of {len} bytes exceeds the limit of {max}"));
        }
        Ok(self.take(len as usize))
    }
    fn key(&mut self) -> std::result::Result<Option<String>, String> {
        let k = need!(self.field(MAX_KEY_LEN, "key")?);
        Ok(Some(String::from_utf8_lossy(k).into_owned()))
    }
    fn value(&mut self) -> std::result::Result<Option<Vec<u8>>, String> {
        Ok(self.field(MAX_VALUE_LEN, "value")?.map(<[u8]>::to_vec))
    }
    fn count(&mut self) -> std::result::Result<Option<usize>, String> {
        let n = need!(self.u64());
        if n > MAX_KEYS as u64 {
            return Err(format!(
                "{n} keys in one query exceed the limit of {MAX_KEYS}"
            ));
        }
        Ok(Some(n as usize))
    }
    fn keys(&mut self) -> std::result::Result<Option<Vec<String>>, String> {
        let n = need!(self.count()?);
        // Grown as keys parse, never preallocated from the declared count.
        let mut keys = Vec::new();
        for _ in 0..n {
            keys.push(need!(self.key()?));
        }
        Ok(Some(keys))
    }
}

/// Parses the query at the start of `buf`: `Ok(None)` when it is not
/// complete yet, `Ok(Some((query, bytes used)))`, or `Err(reason)` for an
/// unknown command or a length over the limits (the connection is closed).
pub(crate) fn parse_query(buf: &[u8]) -> std::result::Result<Option<(Query, usize)>, String> {
    let mut c = Cur { buf, pos: 0 };
    let command = need!(c.take(1))[0];
    let q = match command {
        cmd::VALIDATE => Query::Validate(u32::from_le_bytes(need!(c.array()))),
        cmd::SET => Query::Set {
            key: need!(c.key()?),
            value: need!(c.value()?),
        },
        cmd::COMPARE_SET => Query::CompareSet {
            key: need!(c.key()?),
            expected: need!(c.value()?),
            desired: need!(c.value()?),
        },
        cmd::GET => Query::Get(need!(c.key()?)),
        cmd::ADD => Query::Add {
            key: need!(c.key()?),
            delta: i64::from_le_bytes(need!(c.array())),
        },
        cmd::CHECK => Query::Check(need!(c.keys()?)),
        cmd::WAIT => Query::Wait(need!(c.keys()?)),
        cmd::GETNUMKEYS => Query::NumKeys,
        cmd::DELETE_KEY => Query::Delete(need!(c.key()?)),
        cmd::APPEND => Query::Append {
            key: need!(c.key()?),
            value: need!(c.value()?),
        },
        cmd::MULTI_GET => Query::MultiGet(need!(c.keys()?)),
        cmd::MULTI_SET => {
            let n = need!(c.count()?);
            let mut pairs = Vec::new();
            let mut total = 0usize;
            for _ in 0..n {
                let k = need!(c.key()?);
                let v = need!(c.value()?);
                total = total.saturating_add(v.len());
                if total > MAX_VALUE_LEN {
                    return Err(format!(
                        "MULTI_SET values exceed the limit of {MAX_VALUE_LEN} bytes"
                    ));
                }
                pairs.push((k, v));
            }
            Query::MultiSet(pairs)
        }
        cmd::CANCEL_WAIT => Query::CancelWait,
        cmd::PING => Query::Ping(u32::from_le_bytes(need!(c.array()))),
        other => return Err(format!("unknown c10d command {other}")),
    };
    Ok(Some((q, c.pos)))
}

fn read_array<const N: usize>(r: &mut impl Read, what: &str) -> Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)
        .map_err(|e| CommError::io(format!("reading the c10d store's reply to {what}"), e))?;
    Ok(b)
}

/// Reads a one-byte reply.
pub(crate) fn read_u8(r: &mut impl Read, what: &str) -> Result<u8> {
    Ok(read_array::<1>(r, what)?[0])
}

/// Reads an `i64` reply.
pub(crate) fn read_i64(r: &mut impl Read, what: &str) -> Result<i64> {
    read_array(r, what).map(i64::from_le_bytes)
}

/// Reads a length-prefixed byte vector of at most `max` bytes, growing the
/// buffer only as bytes arrive.
pub(crate) fn read_bytes(r: &mut impl Read, max: usize, what: &str) -> Result<Vec<u8>> {
    let len = u64::from_le_bytes(read_array(r, what)?);
    if len > max as u64 {
        return Err(CommError::Protocol(format!(
            "the c10d store's reply to {what} announces {len} bytes, over the limit of {max}"
        )));
    }
    let mut v = Vec::with_capacity((len as usize).min(64 * 1024));
    let got = r
        .take(len)
        .read_to_end(&mut v)
        .map_err(|e| CommError::io(format!("reading the c10d store's reply to {what}"), e))?;
    if got as u64 != len {
        return Err(CommError::io(
            format!("reading the c10d store's reply to {what}"),
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("stream ended after {got} of {len} byte(s)"),
            ),
        ));
    }
    Ok(v)
}
