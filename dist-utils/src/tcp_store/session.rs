//! The server side of one dist-utils TCP store connection, as a
//! transport-free [`Session`] run by the shared event loop.

use std::sync::Arc;
use std::time::{Duration, Instant};

use comm_core::auth::Challenge;
use comm_core::Result;

use super::proto::{
    millis, server_hello, ClientAnswer, HelloReply, Request, Response, AUTH_CONTEXT,
    HANDSHAKE_MAX_LEN, MAX_FRAME_LEN, TCP_STORE_MAGIC, TCP_STORE_VERSION,
};
use crate::codec::{decode, split_frame, write_msg};
use crate::server::{Kv, Phase, Protocol, Session};

/// Makes a [`DistSession`] per connection; holds the job secret.
pub(crate) struct DistProtocol {
    pub(crate) secret: Arc<Vec<u8>>,
}

impl Protocol for DistProtocol {
    type S = DistSession;

    fn open(&self, handshake_deadline: Instant, greeting: &mut Vec<u8>) -> Result<DistSession> {
        let challenge = Challenge::new(&self.secret, AUTH_CONTEXT)?;
        greeting.extend_from_slice(&server_hello(&challenge)?);
        Ok(DistSession {
            state: State::Handshake {
                challenge: Box::new(challenge),
                deadline: handshake_deadline,
            },
        })
    }

    fn name(&self) -> &'static str {
        "TCP store"
    }
}

enum Blocking {
    Get(String),
    Wait(Vec<String>),
}

enum State {
    Handshake {
        challenge: Box<Challenge>,
        deadline: Instant,
    },
    Ready,
    Parked {
        request: Blocking,
        since: Instant,
        deadline: Instant,
    },
}

/// One connection of the dist-utils protocol.
pub(crate) struct DistSession {
    state: State,
}

/// `now + ms`, saturating far in the future.
fn after(now: Instant, ms: u64) -> Instant {
    now.checked_add(Duration::from_millis(ms))
        .unwrap_or(now + Duration::from_secs(86_400 * 365))
}

fn reply(out: &mut Vec<u8>, r: &impl serde::Serialize) {
    // Encoding our own enums into a Vec cannot fail.
    if let Err(e) = write_msg(out, r) {
        tracing::error!(error = %e, "TCP store server could not encode a reply");
    }
}

impl DistSession {
    /// Checks the client's answer; on success the session is Ready.
    fn handshake(&mut self, input: &[u8], out: &mut Vec<u8>) -> std::result::Result<usize, String> {
        let State::Handshake { challenge, .. } = &self.state else {
            return Ok(0);
        };
        let (frame, used) = match split_frame(input, HANDSHAKE_MAX_LEN) {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(0),
            Err(_) => {
                return Err(
                    "handshake frame too long (not a dist-utils TCP store client?)".to_string(),
                )
            }
        };
        let refusal = match decode::<ClientAnswer>(frame) {
            Err(_) => "malformed handshake (not a dist-utils TCP store client?)".to_string(),
            Ok(a) if a.magic != TCP_STORE_MAGIC => {
                "bad handshake magic (not a dist-utils TCP store client?)".to_string()
            }
            Ok(a) if a.version != TCP_STORE_VERSION => format!(
                "protocol version {} is not the server's version {TCP_STORE_VERSION}; run the \
                 same build on every rank",
                a.version
            ),
            Ok(a) => match challenge.verify(&a.answer) {
                Ok(proof) => {
                    reply(
                        out,
                        &HelloReply::Accepted {
                            proof: proof.to_vec(),
                        },
                    );
                    self.state = State::Ready;
                    return Ok(used);
                }
                Err(_) => "wrong job secret (the answer to the challenge does not match); every \
                           rank of a job must use the same secret"
                    .to_string(),
            },
        };
        reply(out, &HelloReply::Refused(refusal.clone()));
        Err(format!("refused a client: {refusal}"))
    }

    /// Runs one request; parks it when it must wait for keys.
    fn handle(&mut self, req: Request, kv: &mut Kv, out: &mut Vec<u8>) {
        let now = Instant::now();
        let resp = match req {
            Request::Set { key, value } => {
                kv.set(key, value);
                Response::Done
            }
            Request::Get { key, timeout_ms } => match kv.get(&key) {
                Some(v) => Response::Value(v.clone()),
                None => {
                    self.state = State::Parked {
                        request: Blocking::Get(key),
                        since: now,
                        deadline: after(now, timeout_ms),
                    };
                    return;
                }
            },
            Request::TryGet { key } => Response::MaybeValue(kv.get(&key).cloned()),
            Request::Add { key, delta } => match kv.add(&key, delta) {
                Ok(v) => Response::Counter(v),
                Err(e) => Response::Invalid(e.to_string()),
            },
            Request::Wait { keys, timeout_ms } => {
                if kv.missing(&keys).is_empty() {
                    Response::Done
                } else {
                    self.state = State::Parked {
                        request: Blocking::Wait(keys),
                        since: now,
                        deadline: after(now, timeout_ms),
                    };
                    return;
                }
            }
            Request::Delete { key } => Response::Deleted(kv.remove(&key)),
            Request::CompareSet {
                key,
                expected,
                desired,
            } => {
                let cur = kv.get(&key).map(Vec::as_slice);
                if cur == expected.as_deref() {
                    kv.set(key, desired.clone());
                    Response::Value(desired)
                } else {
                    Response::Value(cur.map(<[u8]>::to_vec).unwrap_or_default())
                }
            }
            Request::NumKeys => Response::Count(kv.len() as u64),
        };
        reply(out, &resp);
    }
}

impl Session for DistSession {
    fn phase(&self) -> Phase {
        match self.state {
            State::Handshake { .. } => Phase::Handshake,
            State::Ready => Phase::Ready,
            State::Parked { .. } => Phase::Parked,
        }
    }

    fn deadline(&self) -> Option<Instant> {
        match &self.state {
            State::Handshake { deadline, .. } | State::Parked { deadline, .. } => Some(*deadline),
            State::Ready => None,
        }
    }

    fn feed(
        &mut self,
        input: &[u8],
        kv: &mut Kv,
        out: &mut Vec<u8>,
    ) -> std::result::Result<usize, String> {
        let mut pos = 0;
        if matches!(self.state, State::Handshake { .. }) {
            pos = self.handshake(input, out)?;
            if pos == 0 {
                return Ok(0);
            }
        }
        while matches!(self.state, State::Ready) {
            let rest = input.get(pos..).unwrap_or_default();
            let (frame, used) = match split_frame(rest, MAX_FRAME_LEN) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(e.to_string()),
            };
            let req: Request = decode(frame).map_err(|e| format!("malformed request: {e}"))?;
            pos += used;
            self.handle(req, kv, out);
        }
        Ok(pos)
    }

    fn wake(
        &mut self,
        kv: &mut Kv,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> std::result::Result<(), String> {
        let resp = match &self.state {
            State::Ready => return Ok(()),
            State::Handshake { deadline, .. } => {
                if now >= *deadline {
                    return Err("the handshake did not complete before its deadline".into());
                }
                return Ok(());
            }
            State::Parked {
                request,
                since,
                deadline,
            } => {
                let (keys, op): (&[String], String) = match request {
                    Blocking::Get(k) => (std::slice::from_ref(k), format!("TCP store get `{k}`")),
                    Blocking::Wait(ks) => (ks, format!("TCP store wait for {} key(s)", ks.len())),
                };
                let missing = kv.missing(keys);
                if missing.is_empty() {
                    match request {
                        Blocking::Get(k) => Response::Value(kv.get(k).cloned().unwrap_or_default()),
                        Blocking::Wait(_) => Response::Done,
                    }
                } else if now >= *deadline {
                    Response::Timeout {
                        operation: op,
                        waited_ms: millis(now.saturating_duration_since(*since)),
                        missing: missing.into_iter().cloned().collect(),
                    }
                } else {
                    return Ok(());
                }
            }
        };
        self.state = State::Ready;
        reply(out, &resp);
        Ok(())
    }

    fn shutdown(&mut self, out: &mut Vec<u8>) {
        if matches!(self.state, State::Parked { .. }) {
            reply(out, &Response::ShuttingDown);
        }
    }
}
