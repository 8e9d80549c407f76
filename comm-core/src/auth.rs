//! Secrets that never cross the wire: random bytes, hex, a challenge–response
//! handshake (HMAC-SHA256 over fresh nonces from both sides, mutual), and
//! identifiers derived from a secret that reveal nothing about it.
//!
//! The handshake is transport-free (byte arrays in, byte arrays out), so the
//! store server's event loop and the TCP backend's blocking set-up use the
//! same code:
//!
//! ```
//! use comm_core::auth::{Challenge, respond};
//! let secret = b"job secret";
//! // Server: a fresh challenge per connection.
//! let challenge = Challenge::new(secret, "store").unwrap();
//! // Client: answers it, and learns what the server must prove in return.
//! let (answer, expect) = respond(secret, "store", challenge.hello()).unwrap();
//! // Server: checks the answer and proves it knows the secret too.
//! let proof = challenge.verify(&answer).unwrap();
//! assert!(expect.verify(&proof).is_ok());
//! // A recorded answer is useless against a new challenge.
//! let other = Challenge::new(secret, "store").unwrap();
//! assert!(other.verify(&answer).is_err());
//! ```

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::{CommError, Result};

type HmacSha256 = Hmac<Sha256>;

/// Bytes of a nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes of a MAC.
pub const MAC_LEN: usize = 32;
/// Bytes of a server hello ([`Challenge::hello`]).
pub const HELLO_LEN: usize = 8 + NONCE_LEN;
/// Bytes of a client answer ([`respond`]).
pub const ANSWER_LEN: usize = NONCE_LEN + MAC_LEN;
/// Bytes of the server's proof ([`Challenge::verify`]).
pub const PROOF_LEN: usize = MAC_LEN;

const MAGIC: &[u8; 8] = b"DISTAUT1";

/// `n` random bytes from the operating system.
pub fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b)
        .map_err(|e| CommError::io("reading random bytes", std::io::Error::other(e.to_string())))?;
    Ok(b)
}

/// Lower-case hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

/// Decodes hex; `what` names the value in the error (bad hex is an error,
/// never silently zeros).
pub fn from_hex(what: &str, s: &str) -> Result<Vec<u8>> {
    hex::decode(s.trim())
        .map_err(|e| CommError::invalid(format!("{what} is not valid hex ({e}): `{}`", s.trim())))
}

fn mac(secret: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    // HMAC accepts keys of any length, the empty key included.
    let mut m = <HmacSha256 as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    for p in parts {
        m.update(&(p.len() as u64).to_le_bytes());
        m.update(p);
    }
    m
}

fn refused(context: &str, why: &str) -> CommError {
    CommError::Protocol(format!(
        "authentication failed for `{context}`: {why} (a different job secret, another job on \
         this port, or a stranger)"
    ))
}

/// The server side of one handshake: a fresh nonce, sent as
/// [`hello`](Self::hello).
#[derive(Debug, Clone)]
pub struct Challenge {
    secret: Vec<u8>,
    context: String,
    hello: [u8; HELLO_LEN],
}

impl Challenge {
    /// A new challenge for `context` (what is being joined: `store`,
    /// `tcp group tp:0`, ...; both sides must use the same).
    pub fn new(secret: &[u8], context: &str) -> Result<Self> {
        let mut hello = [0u8; HELLO_LEN];
        hello[..8].copy_from_slice(MAGIC);
        hello[8..].copy_from_slice(&random_bytes::<NONCE_LEN>()?);
        Ok(Challenge {
            secret: secret.to_vec(),
            context: context.to_string(),
            hello,
        })
    }

    /// The bytes to send to the client.
    pub fn hello(&self) -> &[u8; HELLO_LEN] {
        &self.hello
    }

    /// Checks the client's answer ([`ANSWER_LEN`] bytes); on success returns
    /// the proof ([`PROOF_LEN`] bytes) to send back.
    pub fn verify(&self, answer: &[u8]) -> Result<[u8; PROOF_LEN]> {
        if answer.len() != ANSWER_LEN {
            return Err(refused(&self.context, "malformed answer"));
        }
        let (client_nonce, tag) = answer.split_at(NONCE_LEN);
        let server_nonce = &self.hello[8..];
        mac(
            &self.secret,
            &[
                b"client",
                self.context.as_bytes(),
                server_nonce,
                client_nonce,
            ],
        )
        .verify_slice(tag)
        .map_err(|_| refused(&self.context, "wrong answer to the challenge"))?;
        let proof = mac(
            &self.secret,
            &[
                b"server",
                self.context.as_bytes(),
                client_nonce,
                server_nonce,
            ],
        )
        .finalize()
        .into_bytes();
        Ok(proof.into())
    }
}

/// What a client expects the server to prove after its answer.
#[derive(Debug, Clone)]
pub struct Expected {
    secret: Vec<u8>,
    context: String,
    server_nonce: [u8; NONCE_LEN],
    client_nonce: [u8; NONCE_LEN],
}

impl Expected {
    /// Checks the server's proof.
    pub fn verify(&self, proof: &[u8]) -> Result<()> {
        mac(
            &self.secret,
            &[
                b"server",
                self.context.as_bytes(),
                &self.client_nonce,
                &self.server_nonce,
            ],
        )
        .verify_slice(proof)
        .map_err(|_| {
            refused(
                &self.context,
                "the server could not prove it knows the secret",
            )
        })
    }
}

/// The client side: answers a server `hello` for `context`, returning the
/// answer to send and what the server's proof must be.
pub fn respond(secret: &[u8], context: &str, hello: &[u8]) -> Result<([u8; ANSWER_LEN], Expected)> {
    if hello.len() != HELLO_LEN || &hello[..8] != MAGIC {
        return Err(refused(context, "the server did not send a challenge"));
    }
    let mut server_nonce = [0u8; NONCE_LEN];
    server_nonce.copy_from_slice(&hello[8..]);
    let client_nonce = random_bytes::<NONCE_LEN>()?;
    let tag = mac(
        secret,
        &[b"client", context.as_bytes(), &server_nonce, &client_nonce],
    )
    .finalize()
    .into_bytes();
    let mut answer = [0u8; ANSWER_LEN];
    answer[..NONCE_LEN].copy_from_slice(&client_nonce);
    answer[NONCE_LEN..].copy_from_slice(&tag);
    Ok((
        answer,
        Expected {
            secret: secret.to_vec(),
            context: context.to_string(),
            server_nonce,
            client_nonce,
        },
    ))
}

/// A public identifier derived from `secret` for `label` (e.g. the job id
/// in `/dev/shm` names): 16 hex digits of HMAC(secret, label). The same on
/// every host and toolchain, and it reveals nothing about the secret.
///
/// ```
/// let a = comm_core::auth::derive_id(b"s1", "shm-job");
/// assert_eq!(a.len(), 16);
/// assert_eq!(a, comm_core::auth::derive_id(b"s1", "shm-job"));
/// assert_ne!(a, comm_core::auth::derive_id(b"s2", "shm-job"));
/// ```
pub fn derive_id(secret: &[u8], label: &str) -> String {
    let d = mac(secret, &[b"derive", label.as_bytes()])
        .finalize()
        .into_bytes();
    to_hex(&d[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_secrets_and_tampering_are_refused() {
        let c = Challenge::new(b"right", "ctx").unwrap();
        let (answer, _) = respond(b"wrong", "ctx", c.hello()).unwrap();
        assert!(c.verify(&answer).is_err());
        let (answer, _) = respond(b"right", "other context", c.hello()).unwrap();
        assert!(c.verify(&answer).is_err());
        let (mut answer, expect) = respond(b"right", "ctx", c.hello()).unwrap();
        let proof = c.verify(&answer).unwrap();
        expect.verify(&proof).unwrap();
        // A server without the secret cannot fake the proof.
        assert!(expect.verify(&[0u8; PROOF_LEN]).is_err());
        answer[40] ^= 1;
        assert!(c.verify(&answer).is_err());
        assert!(c.verify(&answer[..10]).is_err());
        assert!(respond(b"right", "ctx", &[0u8; HELLO_LEN]).is_err());
        assert!(from_hex("DIST_JOB_SECRET", "zz").is_err());
        assert_eq!(from_hex("x", "0aff").unwrap(), [10, 255]);
    }
}
