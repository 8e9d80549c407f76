//! The messages of the dist-utils TCP store protocol and the client side of
//! its handshake. Every message is one [`crate::codec`] frame holding a
//! postcard value; the enums' variant order is part of the wire format.

use std::io::{Read, Write};
use std::time::Duration;

use comm_core::auth::{self, respond};
use comm_core::{CommError, Result};
use serde::{Deserialize, Serialize};

use crate::codec::{read_msg, write_msg};

/// First field of both handshake messages, so that a peer speaking another
/// protocol is refused with a clear message.
pub const TCP_STORE_MAGIC: u32 = 0x4453_5453; // "DSTS"
/// Protocol version; client and server must agree. Version 2: mutual
/// challenge–response (the secret never crosses the wire).
pub const TCP_STORE_VERSION: u32 = 2;
/// Largest request or response frame (and so the largest value) accepted: 1 GiB.
pub const MAX_FRAME_LEN: usize = 1 << 30;
/// Largest handshake frame either side reads from a not yet authenticated peer.
pub const HANDSHAKE_MAX_LEN: usize = 4 * 1024;
/// What the handshake authenticates (the `context` of [`comm_core::auth`]).
pub(crate) const AUTH_CONTEXT: &str = "dist-utils tcp store";

/// Server → client, at once on accept: who we are, and a fresh challenge.
#[derive(Serialize, Deserialize, Debug)]
pub(crate) struct ServerHello {
    pub magic: u32,
    pub version: u32,
    pub challenge: Vec<u8>,
}

/// Client → server: the answer to the challenge (nonce and MAC, never the secret).
#[derive(Serialize, Deserialize, Debug)]
pub(crate) struct ClientAnswer {
    pub magic: u32,
    pub version: u32,
    pub answer: Vec<u8>,
}

/// Server → client: the verdict. `Accepted` carries the server's proof that
/// it knows the secret too.
#[derive(Serialize, Deserialize, Debug)]
pub(crate) enum HelloReply {
    Accepted { proof: Vec<u8> },
    Refused(String),
}

/// One request of an authenticated client.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub(crate) enum Request {
    Set {
        key: String,
        value: Vec<u8>,
    },
    Get {
        key: String,
        timeout_ms: u64,
    },
    TryGet {
        key: String,
    },
    Add {
        key: String,
        delta: i64,
    },
    Wait {
        keys: Vec<String>,
        timeout_ms: u64,
    },
    Delete {
        key: String,
    },
    CompareSet {
        key: String,
        expected: Option<Vec<u8>>,
        desired: Vec<u8>,
    },
    NumKeys,
}

/// The server's answer to one request.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub(crate) enum Response {
    Done,
    Value(Vec<u8>),
    MaybeValue(Option<Vec<u8>>),
    Counter(i64),
    Deleted(bool),
    Count(u64),
    Timeout {
        operation: String,
        waited_ms: u64,
        missing: Vec<String>,
    },
    Invalid(String),
    ShuttingDown,
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Runs the client side of the handshake on a connected `stream`: reads the
/// server's challenge, answers it with `secret` (which never crosses the
/// wire), and checks the server's proof that it knows the secret too.
///
/// [`crate::TcpStore`] calls it for every connection it opens; it is public
/// for tools and tests that speak the protocol on a raw stream. A refusal,
/// a server of another protocol or version, or a server that cannot prove
/// the secret gives [`CommError::Protocol`]; transport failures give
/// [`CommError::Io`] (the caller's read/write timeouts bound each step).
pub fn client_handshake(stream: &mut (impl Read + Write), secret: &[u8]) -> Result<()> {
    let hello: ServerHello = read_msg(stream, HANDSHAKE_MAX_LEN).map_err(not_a_store)?;
    if hello.magic != TCP_STORE_MAGIC {
        return Err(CommError::Protocol(
            "the server's greeting has the wrong magic (not a dist-utils TCP store?)".into(),
        ));
    }
    if hello.version != TCP_STORE_VERSION {
        return Err(CommError::Protocol(format!(
            "the TCP store server speaks protocol version {} and this client version \
             {TCP_STORE_VERSION}; run the same build on every rank",
            hello.version
        )));
    }
    let (answer, expected) = respond(secret, AUTH_CONTEXT, &hello.challenge)?;
    write_msg(
        stream,
        &ClientAnswer {
            magic: TCP_STORE_MAGIC,
            version: TCP_STORE_VERSION,
            answer: answer.to_vec(),
        },
    )?;
    match read_msg::<HelloReply>(stream, HANDSHAKE_MAX_LEN).map_err(not_a_store)? {
        HelloReply::Accepted { proof } => expected.verify(&proof),
        HelloReply::Refused(reason) => Err(CommError::Protocol(format!(
            "the TCP store refused the connection: {reason}"
        ))),
    }
}

/// A handshake reply that does not decode means another protocol.
fn not_a_store(e: CommError) -> CommError {
    match e {
        CommError::Codec(m) | CommError::Protocol(m) => CommError::Protocol(format!(
            "the server answered the handshake with something unexpected ({m}); is it a \
             dist-utils TCP store of the same version?"
        )),
        other => other,
    }
}

/// The bytes a server sends first: its hello with a fresh challenge.
pub(crate) fn server_hello(challenge: &auth::Challenge) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    write_msg(
        &mut out,
        &ServerHello {
            magic: TCP_STORE_MAGIC,
            version: TCP_STORE_VERSION,
            challenge: challenge.hello().to_vec(),
        },
    )?;
    Ok(out)
}
