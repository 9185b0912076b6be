//! The job-token handshake: both ends of a connection prove they hold the job's secret token
//! before a single byte of the job crosses it (the rendezvous and every data-mesh connection).
//!
//! Mutual challenge-response with HMAC-SHA256 keyed by the token. The dialer is the end that
//! connected, the acceptor the end that listened:
//!
//! 1. dialer → acceptor: `st-auth1` and a fresh 32-byte nonce `Nd`;
//! 2. acceptor → dialer: `st-auth1` and a fresh 32-byte nonce `Na` (the challenge);
//! 3. dialer → acceptor: `HMAC(token, context, 'D', Nd, Na)` (32 bytes);
//! 4. the acceptor verifies it; on failure it closes the connection having sent nothing but its
//!    challenge. Otherwise acceptor → dialer: `HMAC(token, context, 'A', Nd, Na)`, which the
//!    dialer verifies.
//!
//! Why it holds: each proof covers both nonces, so a recorded transcript does not verify against
//! a fresh nonce (replay); each covers its sender's role, so a dialer's own proof sent back to it
//! (reflection, what an echoing impostor does) does not verify as the acceptor's; the context
//! names the channel (rendezvous or mesh), so a proof for one is not one for the other. The
//! acceptor proves nothing until the dialer has: a client without the token learns one random
//! challenge and nothing else. Tags are compared in constant time (`verify_slice`). Nonces come
//! from the operating system's random source.
//!
//! What it does not do: encrypt or authenticate the bytes that follow. An attacker who can rewrite
//! packets between two genuine ranks (on the path, not merely on the network) can still hijack a
//! connection after the handshake; keep a job's traffic on a network you trust.

use std::fmt;
use std::io::{self, Read, Write};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The first bytes of both opening messages: names the handshake and its version.
pub const MAGIC: &[u8; 8] = b"st-auth1";
const NONCE: usize = 32;
const TAG: usize = 32;
/// Separates these MACs from any other use of the same token.
const DOMAIN: &[u8] = b"shardtrain job-token handshake v1";

/// The secret shared by the ranks of one job.
#[derive(Clone, PartialEq, Eq)]
pub struct Key(Vec<u8>);

impl Key {
    pub fn new(bytes: Vec<u8>) -> Key {
        Key(bytes)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never in logs or error messages.
        f.write_str("Key(<secret>)")
    }
}

/// Which end of the connection is proving.
#[derive(Clone, Copy)]
enum Role {
    Dialer,
    Acceptor,
}

impl Role {
    fn label(self) -> u8 {
        match self {
            Role::Dialer => b'D',
            Role::Acceptor => b'A',
        }
    }
}

/// Why a handshake failed.
#[derive(Debug)]
pub enum AuthError {
    /// The peer closed the connection; `after_proof` when it did so right after this end's
    /// proof, i.e. it refused it.
    Closed {
        after_proof: bool,
    },
    TimedOut,
    Io(io::Error),
    /// The peer's first bytes are not this handshake (they are kept, to say what it was).
    Foreign {
        head: Vec<u8>,
    },
    /// The peer's proof does not verify: it does not hold this job's token.
    BadProof,
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::Closed { after_proof: false } => {
                f.write_str("the connection was closed during the job-token handshake")
            }
            AuthError::Closed { after_proof: true } => f.write_str(
                "the peer closed the connection on this process's proof: it holds another job \
                 token",
            ),
            AuthError::TimedOut => f.write_str("the job-token handshake timed out"),
            AuthError::Io(e) => write!(f, "the job-token handshake failed: {e}"),
            AuthError::Foreign { head } => write!(
                f,
                "it did not open the job-token handshake (its first bytes are `{}`)",
                head.escape_ascii()
            ),
            AuthError::BadProof => {
                f.write_str("its proof does not verify: it does not hold this job's token")
            }
        }
    }
}

impl std::error::Error for AuthError {}

/// The dialer's side: proves itself, then checks the acceptor's proof.
pub fn dial(stream: &mut (impl Read + Write), key: &Key, context: &[u8]) -> Result<(), AuthError> {
    let dialer_nonce = nonce()?;
    send(stream, &[&MAGIC[..], &dialer_nonce])?;
    let acceptor_nonce = read_opening(stream)?;
    let nonces = (&dialer_nonce, &acceptor_nonce);
    send(stream, &[&proof(key, context, Role::Dialer, nonces)])?;
    let mut tag = [0u8; TAG];
    read_exact(stream, &mut tag, true)?;
    verify(key, context, Role::Acceptor, nonces, &tag)
}

/// The acceptor's side: challenges the dialer, checks its proof, and only then proves itself.
/// On failure nothing but the challenge has been sent; the caller should close the connection.
pub fn accept(
    stream: &mut (impl Read + Write),
    key: &Key,
    context: &[u8],
) -> Result<(), AuthError> {
    let dialer_nonce = read_opening(stream)?;
    let acceptor_nonce = nonce()?;
    send(stream, &[&MAGIC[..], &acceptor_nonce])?;
    let mut tag = [0u8; TAG];
    read_exact(stream, &mut tag, false)?;
    let nonces = (&dialer_nonce, &acceptor_nonce);
    verify(key, context, Role::Dialer, nonces, &tag)?;
    send(stream, &[&proof(key, context, Role::Acceptor, nonces)])
}

fn nonce() -> Result<[u8; NONCE], AuthError> {
    let mut n = [0u8; NONCE];
    getrandom::fill(&mut n).map_err(|e| {
        AuthError::Io(io::Error::other(format!(
            "the system's random source failed: {e}"
        )))
    })?;
    Ok(n)
}

fn mac(
    key: &Key,
    context: &[u8],
    role: Role,
    nonces: (&[u8; NONCE], &[u8; NONCE]),
) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(&key.0).expect("HMAC takes a key of any length");
    mac.update(DOMAIN);
    // Length-prefixed, so no two (context, role) pairs hash the same bytes.
    mac.update(&(context.len() as u64).to_le_bytes());
    mac.update(context);
    mac.update(&[role.label()]);
    mac.update(nonces.0);
    mac.update(nonces.1);
    mac
}

fn proof(key: &Key, context: &[u8], role: Role, nonces: (&[u8; NONCE], &[u8; NONCE])) -> Vec<u8> {
    mac(key, context, role, nonces)
        .finalize()
        .into_bytes()
        .to_vec()
}

fn verify(
    key: &Key,
    context: &[u8],
    role: Role,
    nonces: (&[u8; NONCE], &[u8; NONCE]),
    tag: &[u8],
) -> Result<(), AuthError> {
    mac(key, context, role, nonces)
        .verify_slice(tag)
        .map_err(|_| AuthError::BadProof)
}

/// Reads the peer's opening message and returns its nonce; the magic is checked on its own first,
/// so bytes of another protocol fail at once instead of waiting for a nonce's worth.
fn read_opening(stream: &mut impl Read) -> Result<[u8; NONCE], AuthError> {
    let mut magic = [0u8; MAGIC.len()];
    read_exact(stream, &mut magic, false)?;
    if &magic != MAGIC {
        return Err(AuthError::Foreign {
            head: magic.to_vec(),
        });
    }
    let mut n = [0u8; NONCE];
    read_exact(stream, &mut n, false)?;
    Ok(n)
}

fn read_exact(stream: &mut impl Read, buf: &mut [u8], after_proof: bool) -> Result<(), AuthError> {
    stream.read_exact(buf).map_err(|e| from_io(e, after_proof))
}

fn send(stream: &mut impl Write, parts: &[&[u8]]) -> Result<(), AuthError> {
    let bytes = parts.concat();
    stream
        .write_all(&bytes)
        .and_then(|()| stream.flush())
        .map_err(|e| from_io(e, false))
}

fn from_io(e: io::Error, after_proof: bool) -> AuthError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => AuthError::TimedOut,
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => AuthError::Closed { after_proof },
        _ => AuthError::Io(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::thread;

    const CTX: &[u8] = b"test";

    fn key(s: &str) -> Key {
        Key::new(s.as_bytes().to_vec())
    }

    /// A stream that keeps a copy of everything written to it.
    struct Tap {
        inner: UnixStream,
        written: Vec<u8>,
    }

    impl Read for Tap {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.inner.read(buf)
        }
    }

    impl Write for Tap {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = self.inner.write(buf)?;
            self.written.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.inner.flush()
        }
    }

    /// One handshake between a dialer with `dk` and an acceptor with `ak`, each recording what it
    /// wrote: (dialer's result and bytes, acceptor's result and bytes).
    #[allow(clippy::type_complexity)]
    fn session(
        dk: Key,
        ak: Key,
    ) -> (
        (Result<(), AuthError>, Vec<u8>),
        (Result<(), AuthError>, Vec<u8>),
    ) {
        let (d, a) = UnixStream::pair().unwrap();
        let acceptor = thread::spawn(move || {
            let mut tap = Tap {
                inner: a,
                written: Vec::new(),
            };
            let r = accept(&mut tap, &ak, CTX);
            (r, tap.written)
        });
        let mut tap = Tap {
            inner: d,
            written: Vec::new(),
        };
        let r = dial(&mut tap, &dk, CTX);
        let dialer = (r, tap.written);
        (dialer, acceptor.join().unwrap())
    }

    #[test]
    fn the_same_key_passes_both_ways() {
        let ((d, dw), (a, aw)) = session(key("secret"), key("secret"));
        d.unwrap();
        a.unwrap();
        // Opening (magic + nonce) and a proof each way.
        assert_eq!(dw.len(), 8 + 32 + 32);
        assert_eq!(aw.len(), 8 + 32 + 32);
        assert_eq!(&dw[..8], MAGIC);
        assert_eq!(&aw[..8], MAGIC);
    }

    #[test]
    fn a_wrong_key_fails_on_both_sides_and_the_acceptor_proves_nothing() {
        let ((d, _), (a, aw)) = session(key("impostor"), key("secret"));
        assert!(matches!(a, Err(AuthError::BadProof)), "{a:?}");
        assert!(
            matches!(d, Err(AuthError::Closed { after_proof: true })),
            "{d:?}"
        );
        // The acceptor sent its challenge and nothing else.
        assert_eq!(aw.len(), 8 + 32);
        let ((d, _), (a, _)) = session(key("secret"), key("impostor"));
        assert!(matches!(d, Err(AuthError::Closed { .. })), "{d:?}");
        assert!(matches!(a, Err(AuthError::BadProof)), "{a:?}");
    }

    #[test]
    fn a_reflected_proof_does_not_verify() {
        // An impostor acceptor echoes everything the dialer sends: its nonce as the challenge,
        // then the dialer's own proof as the acceptor's.
        let (d, mut echo) = UnixStream::pair().unwrap();
        let impostor = thread::spawn(move || {
            let mut buf = [0u8; 8 + 32];
            echo.read_exact(&mut buf).unwrap();
            echo.write_all(&buf).unwrap();
            let mut tag = [0u8; 32];
            echo.read_exact(&mut tag).unwrap();
            echo.write_all(&tag).unwrap();
        });
        let mut d = d;
        let r = dial(&mut d, &key("secret"), CTX);
        impostor.join().unwrap();
        assert!(matches!(r, Err(AuthError::BadProof)), "{r:?}");
    }

    #[test]
    fn a_replayed_transcript_does_not_verify() {
        let ((d, dialer_bytes), (a, acceptor_bytes)) = session(key("secret"), key("secret"));
        d.unwrap();
        a.unwrap();
        // The dialer's recorded bytes, replayed to a fresh acceptor (which draws a new nonce).
        let (mut replay, a) = UnixStream::pair().unwrap();
        let acceptor = thread::spawn(move || {
            let mut a = a;
            accept(&mut a, &key("secret"), CTX)
        });
        replay.write_all(&dialer_bytes).unwrap();
        let r = acceptor.join().unwrap();
        assert!(matches!(r, Err(AuthError::BadProof)), "{r:?}");
        // The acceptor's recorded bytes, replayed to a fresh dialer.
        let (d, mut replay) = UnixStream::pair().unwrap();
        let player = thread::spawn(move || {
            let mut opening = [0u8; 40];
            replay.read_exact(&mut opening).unwrap();
            replay.write_all(&acceptor_bytes[..40]).unwrap();
            let mut tag = [0u8; 32];
            replay.read_exact(&mut tag).unwrap();
            replay.write_all(&acceptor_bytes[40..]).unwrap();
        });
        let mut d = d;
        let r = dial(&mut d, &key("secret"), CTX);
        player.join().unwrap();
        assert!(matches!(r, Err(AuthError::BadProof)), "{r:?}");
    }

    #[test]
    fn a_proof_for_another_channel_does_not_verify() {
        let (d, a) = UnixStream::pair().unwrap();
        let acceptor = thread::spawn(move || {
            let mut a = a;
            accept(&mut a, &key("secret"), b"mesh")
        });
        let mut d = d;
        let r = dial(&mut d, &key("secret"), b"rendezvous");
        assert!(matches!(acceptor.join().unwrap(), Err(AuthError::BadProof)));
        assert!(r.is_err());
    }

    #[test]
    fn foreign_bytes_are_refused_after_the_magic_with_nothing_sent() {
        let (mut client, a) = UnixStream::pair().unwrap();
        client.write_all(b"GET / HTTP/1.1\r\n").unwrap();
        let mut a = a;
        let r = accept(&mut a, &key("secret"), CTX);
        match &r {
            Err(e @ AuthError::Foreign { head }) => {
                assert_eq!(head, b"GET / HT");
                assert!(e.to_string().contains("`GET / HT`"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        drop(a);
        // The end of the stream, or a reset (the rest of its bytes went unread): no data.
        let mut buf = [0u8; 64];
        match client.read(&mut buf) {
            Ok(n) => assert_eq!(n, 0, "{:?}", &buf[..n]),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
        }
    }
}
