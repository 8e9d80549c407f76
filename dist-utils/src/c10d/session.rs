//! The server side of one c10d connection, as a transport-free [`Session`]
//! run by the shared event loop, with PyTorch's TCPStore semantics.

use std::time::Instant;

use comm_core::Result;

use super::wire::{
    parse_query, Query, NOT_READY, READY, STOP_WAITING, VALIDATION_MAGIC, WAIT_CANCELED,
};
use crate::server::{Kv, Phase, Protocol, Session};

/// Makes a [`C10dSession`] per connection.
pub(crate) struct C10dProtocol;

impl Protocol for C10dProtocol {
    type S = C10dSession;

    fn open(&self, handshake_deadline: Instant, _greeting: &mut Vec<u8>) -> Result<C10dSession> {
        Ok(C10dSession {
            state: State::AwaitValidate {
                deadline: handshake_deadline,
            },
        })
    }

    fn name(&self) -> &'static str {
        "c10d store"
    }
}

enum State {
    AwaitValidate { deadline: Instant },
    Ready,
    Parked { keys: Vec<String> },
}

/// One connection of the c10d protocol.
pub(crate) struct C10dSession {
    state: State,
}

fn push_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u64).to_le_bytes());
    out.extend_from_slice(b);
}

impl C10dSession {
    /// Runs one query of a validated client.
    fn handle(
        &mut self,
        q: Query,
        kv: &mut Kv,
        out: &mut Vec<u8>,
    ) -> std::result::Result<(), String> {
        match q {
            Query::Validate(m) if m == VALIDATION_MAGIC => {}
            Query::Validate(m) => return Err(format!("wrong validation magic {m:#x}")),
            Query::Set { key, value } => kv.set(key, value),
            Query::CompareSet {
                key,
                expected,
                desired,
            } => {
                // PyTorch's semantics: an absent key is set only when the
                // expected value is empty; otherwise the expected value is
                // returned as if it were current.
                let now = match kv.get(&key) {
                    None if expected.is_empty() => {
                        kv.set(key, desired.clone());
                        desired
                    }
                    None => expected,
                    Some(cur) if *cur == expected => {
                        kv.set(key, desired.clone());
                        desired
                    }
                    Some(cur) => cur.clone(),
                };
                push_bytes(out, &now);
            }
            Query::Get(key) => push_bytes(out, kv.get(&key).map(Vec::as_slice).unwrap_or_default()),
            Query::Add { key, delta } => {
                let v = kv.add(&key, delta).map_err(|e| e.to_string())?;
                out.extend_from_slice(&v.to_le_bytes());
            }
            Query::Check(keys) => out.push(if kv.missing(&keys).is_empty() {
                READY
            } else {
                NOT_READY
            }),
            Query::Wait(keys) => {
                if kv.missing(&keys).is_empty() {
                    out.push(STOP_WAITING);
                } else {
                    self.state = State::Parked { keys };
                }
            }
            Query::NumKeys => out.extend_from_slice(&(kv.len() as i64).to_le_bytes()),
            Query::Delete(key) => out.extend_from_slice(&i64::from(kv.remove(&key)).to_le_bytes()),
            Query::Append { key, value } => kv.append(key, &value),
            Query::MultiGet(keys) => {
                for k in keys {
                    push_bytes(out, kv.get(&k).map(Vec::as_slice).unwrap_or_default());
                }
            }
            Query::MultiSet(pairs) => {
                for (k, v) in pairs {
                    kv.set(k, v);
                }
            }
            Query::CancelWait => out.push(WAIT_CANCELED),
            Query::Ping(n) => out.extend_from_slice(&n.to_le_bytes()),
        }
        Ok(())
    }
}

impl Session for C10dSession {
    fn phase(&self) -> Phase {
        match self.state {
            State::AwaitValidate { .. } => Phase::Handshake,
            State::Ready => Phase::Ready,
            State::Parked { .. } => Phase::Parked,
        }
    }

    fn deadline(&self) -> Option<Instant> {
        match self.state {
            State::AwaitValidate { deadline } => Some(deadline),
            _ => None,
        }
    }

    fn feed(
        &mut self,
        input: &[u8],
        kv: &mut Kv,
        out: &mut Vec<u8>,
    ) -> std::result::Result<usize, String> {
        let mut pos = 0;
        loop {
            let rest = input.get(pos..).unwrap_or_default();
            if rest.is_empty() {
                break;
            }
            if matches!(self.state, State::AwaitValidate { .. })
                && rest[0] != super::wire::cmd::VALIDATE
            {
                // Checked on the first byte, so an unvalidated peer can make
                // the server buffer at most the 5 bytes of a VALIDATE.
                return Err("the first query is not VALIDATE (not a c10d TCPStore client?)".into());
            }
            let Some((q, used)) = parse_query(rest)? else {
                break;
            };
            match &self.state {
                State::AwaitValidate { .. } => match q {
                    Query::Validate(VALIDATION_MAGIC) => self.state = State::Ready,
                    Query::Validate(m) => {
                        return Err(format!(
                            "wrong validation magic {m:#x} (expected {VALIDATION_MAGIC:#x})"
                        ))
                    }
                    _ => return Err("the first query is not VALIDATE".into()),
                },
                State::Parked { .. } => {
                    // Only a cancellation may come while a WAIT is pending;
                    // anything else waits for the reply.
                    if q != Query::CancelWait {
                        break;
                    }
                    self.state = State::Ready;
                    out.push(WAIT_CANCELED);
                }
                State::Ready => self.handle(q, kv, out)?,
            }
            pos += used;
        }
        Ok(pos)
    }

    fn wake(
        &mut self,
        kv: &mut Kv,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> std::result::Result<(), String> {
        match &self.state {
            State::AwaitValidate { deadline } if now >= *deadline => {
                Err("no VALIDATE before the handshake deadline".into())
            }
            State::Parked { keys } if kv.missing(keys).is_empty() => {
                self.state = State::Ready;
                out.push(STOP_WAITING);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn shutdown(&mut self, _out: &mut Vec<u8>) {
        // c10d has no "shutting down" reply: clients see the connection close.
    }
}
