//! The handshake that opens every connection of the mesh, on
//! [`comm_core::auth`]'s challenge-response: the group secret never crosses
//! the wire and a recorded handshake cannot be replayed.
//!
//! ```text
//! connecting side                         accepting side
//!   ClientHeader (world, from, to, channel) ->
//!                                         <- challenge (fresh nonce), or a refusal byte
//!   answer (HMAC over both nonces and      ->
//!   the header's fields)
//!                                         <- ACCEPTED + proof, or a refusal byte
//!   checks the proof
//! ```
//!
//! The accepting side runs any number of handshakes at once as non-blocking
//! state machines, each bounded by its own deadline, so idle
//! or slow strangers on the port never delay the real members.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use comm_core::auth::{self, Challenge, ANSWER_LEN, HELLO_LEN, PROOF_LEN};
use comm_core::{CommError, Result};
use rustix::event::PollFlags;
use rustix::io::Errno;

pub use crate::wire::{
    ClientHeader, ACCEPTED, CHANNEL_CONTROL, CHANNEL_DATA, CLIENT_HEADER_LEN, CLIENT_MAGIC,
};

/// Longest one incoming handshake may take.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most unauthenticated connections held at once; beyond, the oldest is
/// dropped (a real member whose attempt is dropped connects again).
pub(crate) const MAX_PENDING: usize = 64;
const REFUSED: u8 = 0;

/// What the accepting side checks a header against.
#[derive(Debug, Clone)]
pub(crate) struct Server<'a> {
    pub secret: &'a [u8],
    pub group: &'a str,
    pub world: usize,
    pub rank: usize,
}

#[derive(Debug)]
enum State {
    Header {
        buf: [u8; CLIENT_HEADER_LEN],
        n: usize,
    },
    Hello {
        ch: Box<Challenge>,
        hdr: ClientHeader,
        sent: usize,
    },
    Answer {
        ch: Box<Challenge>,
        hdr: ClientHeader,
        buf: [u8; ANSWER_LEN],
        n: usize,
    },
    Verdict {
        hdr: ClientHeader,
        out: [u8; 1 + PROOF_LEN],
        sent: usize,
    },
}

/// One incoming connection being authenticated.
#[derive(Debug)]
pub(crate) struct Pending {
    pub sock: TcpStream,
    pub since: Instant,
    state: State,
}

/// What a step of a handshake came to.
#[derive(Debug)]
pub(crate) enum Step {
    /// Needs the socket to become ready for these events.
    Wait(PollFlags),
    /// Authenticated: the peer's rank and channel.
    Done(ClientHeader),
    /// Refused or broken; drop the connection (the reason is for logs).
    Drop(String),
}

impl Pending {
    /// A fresh connection (made non-blocking here).
    pub(crate) fn new(sock: TcpStream) -> Result<Self> {
        sock.set_nonblocking(true)
            .map_err(|e| CommError::io("configuring an accepted connection", e))?;
        Ok(Pending {
            sock,
            since: Instant::now(),
            state: State::Header {
                buf: [0; CLIENT_HEADER_LEN],
                n: 0,
            },
        })
    }

    /// Progresses as far as the socket allows.
    pub(crate) fn step(&mut self, srv: &Server<'_>) -> Step {
        loop {
            let io: std::io::Result<()> = match &mut self.state {
                State::Header { buf, n } => match read_some(&self.sock, &mut buf[*n..]) {
                    Ok(0) => return Step::Wait(PollFlags::IN),
                    Ok(k) => {
                        *n += k;
                        if *n < CLIENT_HEADER_LEN {
                            continue;
                        }
                        let Some(hdr) = ClientHeader::decode(buf) else {
                            return self.refuse("not a comm-cpu handshake");
                        };
                        let from = hdr.from as usize;
                        if hdr.world as usize != srv.world
                            || hdr.to as usize != srv.rank
                            || from <= srv.rank
                            || from >= srv.world
                        {
                            return self.refuse(&format!(
                                "a connection for rank {} of {} from rank {from}, but this is \
                                 rank {} of {}",
                                hdr.to, hdr.world, srv.rank, srv.world
                            ));
                        }
                        match Challenge::new(srv.secret, &hdr.context(srv.group)) {
                            Ok(ch) => {
                                self.state = State::Hello {
                                    ch: Box::new(ch),
                                    hdr,
                                    sent: 0,
                                };
                                continue;
                            }
                            Err(e) => return Step::Drop(e.to_string()),
                        }
                    }
                    Err(e) => Err(e),
                },
                State::Hello { ch, hdr, sent } => {
                    match write_some(&self.sock, &ch.hello()[*sent..]) {
                        Ok(0) => return Step::Wait(PollFlags::OUT),
                        Ok(k) => {
                            *sent += k;
                            if *sent == HELLO_LEN {
                                let (ch, hdr) = (ch.clone(), *hdr);
                                self.state = State::Answer {
                                    ch,
                                    hdr,
                                    buf: [0; ANSWER_LEN],
                                    n: 0,
                                };
                            }
                            continue;
                        }
                        Err(e) => Err(e),
                    }
                }
                State::Answer { ch, hdr, buf, n } => match read_some(&self.sock, &mut buf[*n..]) {
                    Ok(0) => return Step::Wait(PollFlags::IN),
                    Ok(k) => {
                        *n += k;
                        if *n < ANSWER_LEN {
                            continue;
                        }
                        match ch.verify(buf) {
                            Ok(proof) => {
                                let mut out = [0u8; 1 + PROOF_LEN];
                                out[0] = ACCEPTED;
                                out[1..].copy_from_slice(&proof);
                                self.state = State::Verdict {
                                    hdr: *hdr,
                                    out,
                                    sent: 0,
                                };
                                continue;
                            }
                            Err(e) => return self.refuse(&e.to_string()),
                        }
                    }
                    Err(e) => Err(e),
                },
                State::Verdict { hdr, out, sent } => match write_some(&self.sock, &out[*sent..]) {
                    Ok(0) => return Step::Wait(PollFlags::OUT),
                    Ok(k) => {
                        *sent += k;
                        if *sent == out.len() {
                            return Step::Done(*hdr);
                        }
                        continue;
                    }
                    Err(e) => Err(e),
                },
            };
            if let Err(e) = io {
                return Step::Drop(format!("connection failed during the handshake: {e}"));
            }
        }
    }

    fn refuse(&self, why: &str) -> Step {
        let _ = (&self.sock).write(&[REFUSED]);
        Step::Drop(why.to_string())
    }
}

/// Non-blocking read: `Ok(0)` means "nothing yet"; EOF is an error.
fn read_some(mut s: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match s.read(buf) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Non-blocking write: `Ok(0)` means "not now".
fn write_some(mut s: &TcpStream, buf: &[u8]) -> std::io::Result<usize> {
    loop {
        match s.write(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// How a connecting handshake ended when it did not succeed.
#[derive(Debug)]
pub(crate) enum ClientError {
    /// The accepting side refused (another job, world size or secret):
    /// trying again cannot help.
    Refused(CommError),
    /// The connection failed or timed out: worth another attempt.
    Retry(String),
}

/// The connecting side's handshake on a blocking `sock`, within `bound`.
pub(crate) fn client(
    sock: &TcpStream,
    hdr: &ClientHeader,
    secret: &[u8],
    group: &str,
    bound: Duration,
) -> std::result::Result<(), ClientError> {
    let retry = |what: &str, e: std::io::Error| ClientError::Retry(format!("{what}: {e}"));
    let t = Some(bound.max(Duration::from_millis(1)));
    sock.set_read_timeout(t)
        .and_then(|()| sock.set_write_timeout(t))
        .map_err(|e| retry("setting handshake timeouts", e))?;
    let mut s = sock;
    s.write_all(&hdr.encode())
        .map_err(|e| retry("sending the handshake header", e))?;
    let refused = |why: &str| {
        ClientError::Refused(CommError::Protocol(format!(
            "rank {} refused the connection of rank {} in group `{group}`: {why} (a different \
             job secret, group or world size: is another job on that port?)",
            hdr.to, hdr.from
        )))
    };
    let mut hello = [0u8; HELLO_LEN];
    s.read_exact(&mut hello[..1])
        .map_err(|e| retry("reading the challenge", e))?;
    if hello[0] == REFUSED {
        return Err(refused("it did not accept the handshake header"));
    }
    s.read_exact(&mut hello[1..])
        .map_err(|e| retry("reading the challenge", e))?;
    let (answer, expected) =
        auth::respond(secret, &hdr.context(group), &hello).map_err(ClientError::Refused)?;
    s.write_all(&answer)
        .map_err(|e| retry("sending the answer", e))?;
    let mut verdict = [0u8; 1 + PROOF_LEN];
    s.read_exact(&mut verdict[..1])
        .map_err(|e| retry("reading the verdict", e))?;
    if verdict[0] != ACCEPTED {
        return Err(refused("wrong answer to its challenge"));
    }
    s.read_exact(&mut verdict[1..])
        .map_err(|e| retry("reading the proof", e))?;
    expected
        .verify(&verdict[1..])
        .map_err(ClientError::Refused)?;
    Ok(())
}

/// Maps a non-blocking accept error: `None` when there is nothing to accept.
pub(crate) fn accept_error(e: &std::io::Error) -> Option<()> {
    match e.raw_os_error().map(Errno::from_raw_os_error) {
        Some(Errno::AGAIN) | Some(Errno::INTR) | Some(Errno::CONNABORTED) => None,
        _ => Some(()),
    }
}
