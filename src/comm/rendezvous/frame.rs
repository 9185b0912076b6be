//! The rendezvous's messages and their framing: a u32 little-endian length, then that many bytes
//! of JSON carrying the protocol's magic. Reading checks the length against the bound before
//! reading (or allocating) anything more.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Instant;

use serde::{Deserialize, Serialize};

#[cfg(test)]
use super::MAX_HELLO;
use super::{MAGIC, MAX_MESSAGE};
use crate::comm::auth::{self, AuthError};
use crate::comm::deadline::Timed;

/// The messages of the protocol (the `type` field); every one also carries `magic`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(super) enum Message {
    /// A joining rank introduces itself to rank 0.
    Hello {
        run_id: String,
        world_size: usize,
        rank: usize,
        data_addr: String,
        /// What is left of the sender's timeout when it sent this.
        remaining_ms: u64,
    },
    /// Rank 0's answer when every rank has joined.
    Welcome {
        world_size: usize,
        addrs: Vec<String>,
        payload: Vec<u8>,
    },
    /// Rank 0's answer when the job cannot proceed (or to a connection it ignores).
    Error { message: String },
}

impl Message {
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Welcome { .. } => "welcome",
            Message::Error { .. } => "error",
        }
    }
}

/// What goes on the wire: the message with the magic beside its fields.
#[derive(Serialize)]
struct Envelope<'a> {
    magic: &'a str,
    #[serde(flatten)]
    message: &'a Message,
}

/// Why a message could not be read or written.
#[derive(Debug)]
pub(super) enum FrameError {
    /// The peer closed the connection (or reset it); `mid_message` if some bytes had come.
    Closed {
        mid_message: bool,
    },
    /// The deadline passed.
    TimedOut,
    Io(io::Error),
    /// Bytes that are not a message of this protocol (the reason).
    Foreign(String),
    /// A message of ours too large to send (its size).
    TooLarge(usize),
    /// The peer failed the job-token handshake: it is not a rank of this job.
    Unauthenticated(AuthError),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Closed { mid_message: false } => f.write_str("the connection was closed"),
            FrameError::Closed { mid_message: true } => {
                f.write_str("the connection was closed in the middle of a message")
            }
            FrameError::TimedOut => f.write_str("timed out"),
            FrameError::Io(e) => write!(f, "{e}"),
            FrameError::Foreign(why) => write!(f, "not a shardtrain rendezvous ({why})"),
            FrameError::TooLarge(n) => write!(
                f,
                "a message of {n} bytes is over the limit of {} MiB",
                MAX_MESSAGE >> 20
            ),
            FrameError::Unauthenticated(e) => write!(f, "not a rank of this job: {e}"),
        }
    }
}

impl FrameError {
    pub(super) fn from_io(e: io::Error, mid_message: bool) -> FrameError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => FrameError::TimedOut,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof => FrameError::Closed { mid_message },
            _ => FrameError::Io(e),
        }
    }
}

/// The frame of `msg`: its length (u32 LE) and its JSON.
pub(super) fn encode(msg: &Message) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(&Envelope {
        magic: MAGIC,
        message: msg,
    })
    .map_err(|e| FrameError::Io(io::Error::other(e)))?;
    if body.len() > MAX_MESSAGE {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Parses a frame's JSON, checking the magic first.
fn decode(body: &[u8]) -> Result<Message, FrameError> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|_| {
        let head = &body[..body.len().min(16)];
        FrameError::Foreign(format!("not JSON: `{}`", head.escape_ascii()))
    })?;
    match value.get("magic").and_then(serde_json::Value::as_str) {
        Some(MAGIC) => {}
        Some(m) if m.starts_with("shardtrain-rdzv-") => {
            return Err(FrameError::Foreign(format!(
                "protocol `{m}`, this is `{MAGIC}`: another shardtrain version?"
            )))
        }
        Some(m) => return Err(FrameError::Foreign(format!("magic `{m}`"))),
        None => return Err(FrameError::Foreign("no magic".into())),
    }
    serde_json::from_value(value)
        .map_err(|e| FrameError::Foreign(format!("a malformed {MAGIC} message: {e}")))
}

pub(super) fn write_frame(w: &mut impl Write, msg: &Message) -> Result<(), FrameError> {
    let frame = encode(msg)?;
    w.write_all(&frame)
        .and_then(|()| w.flush())
        .map_err(|e| FrameError::from_io(e, false))
}

/// Reads one message of at most `limit` bytes (the JSON after the length).
pub(super) fn read_frame(r: &mut impl Read, limit: usize) -> Result<Message, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) => {
                return Err(FrameError::Closed {
                    mid_message: got > 0,
                })
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::from_io(e, got > 0)),
        }
    }
    if len[..] == auth::MAGIC[..4] {
        return Err(FrameError::Foreign(
            "it opens the job-token handshake: that end has a job token and this one has none; \
             give every rank the same SHARDTRAIN_JOB_TOKEN or --job-token-file"
                .into(),
        ));
    }
    let n = u32::from_le_bytes(len) as usize;
    if n > limit {
        return Err(FrameError::Foreign(format!(
            "its first bytes `{}` announce a message of {n} bytes, over the limit of {limit} \
             bytes",
            len.escape_ascii(),
        )));
    }
    let mut body = Vec::with_capacity(n.min(1 << 16));
    r.take(n as u64)
        .read_to_end(&mut body)
        .map_err(|e| FrameError::from_io(e, true))?;
    if body.len() < n {
        return Err(FrameError::Closed { mid_message: true });
    }
    decode(&body)
}

/// Sends `frame` by `deadline`, then closes the stream; errors are only reported.
pub(super) fn send_and_close(
    stream: &TcpStream,
    frame: &[u8],
    deadline: Instant,
) -> Result<(), FrameError> {
    let result = Timed { stream, deadline }
        .write_all(frame)
        .map_err(|e| FrameError::from_io(e, false));
    let _ = stream.shutdown(Shutdown::Write);
    result
}

/// Whether the peer has closed `stream` (it sends nothing after its hello, so any readable end of
/// file or error means it is gone).
pub(super) fn is_closed(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return true;
    }
    let peeked = stream.peek(&mut [0u8; 1]);
    let _ = stream.set_nonblocking(false);
    match peeked {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Message {
        Message::Hello {
            run_id: "run-1".into(),
            world_size: 4,
            rank: 3,
            data_addr: "10.0.0.3:40000".into(),
            remaining_ms: 1234,
        }
    }

    fn frame_of(body: &[u8]) -> Vec<u8> {
        let mut frame = (body.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(body);
        frame
    }

    fn foreign(bytes: &[u8]) -> String {
        match read_frame(&mut &bytes[..], MAX_MESSAGE) {
            Err(e @ FrameError::Foreign(_)) => e.to_string(),
            other => panic!("expected a foreign-bytes error, got {other:?}"),
        }
    }

    #[test]
    fn frames_round_trip() {
        let payload: Vec<u8> = (0..=255).collect();
        let msgs = [
            hello(),
            Message::Welcome {
                world_size: 2,
                addrs: vec!["127.0.0.1:1".into(), "[::1]:2".into()],
                payload,
            },
            Message::Error {
                message: "rank 2 did not join within 10s \u{2014} `quoted`".into(),
            },
        ];
        let mut wire = Vec::new();
        for m in &msgs {
            write_frame(&mut wire, m).unwrap();
        }
        let mut r = &wire[..];
        for m in &msgs {
            assert_eq!(&read_frame(&mut r, MAX_MESSAGE).unwrap(), m);
        }
        // The stream ends cleanly between messages.
        assert!(matches!(
            read_frame(&mut r, MAX_MESSAGE),
            Err(FrameError::Closed { mid_message: false })
        ));
    }

    #[test]
    fn frame_layout_is_length_then_json_with_magic() {
        let frame = encode(&hello()).unwrap();
        let n = u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize;
        assert_eq!(n, frame.len() - 4);
        let v: serde_json::Value = serde_json::from_slice(&frame[4..]).unwrap();
        assert_eq!(v["magic"], MAGIC);
        assert_eq!(v["type"], "hello");
        assert_eq!(v["rank"], 3);
        assert_eq!(v["data_addr"], "10.0.0.3:40000");
        // A hand-written frame of the documented form decodes.
        let body = br#"{"magic":"shardtrain-rdzv-1","type":"error","message":"m"}"#;
        assert_eq!(
            read_frame(&mut &frame_of(body)[..], MAX_MESSAGE).unwrap(),
            Message::Error {
                message: "m".into()
            }
        );
    }

    #[test]
    fn oversize_is_refused_both_ways() {
        // Reading: the length alone is enough, nothing more is read.
        let mut bytes = ((MAX_MESSAGE + 1) as u32).to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        let e = foreign(&bytes);
        assert!(e.contains("over the limit of 16777216 bytes"), "{e}");
        // Exactly the limit is allowed through the length check (and then fails as not JSON).
        let mut bytes = (MAX_MESSAGE as u32).to_le_bytes().to_vec();
        bytes.extend(std::iter::repeat_n(b' ', MAX_MESSAGE));
        assert!(foreign(&bytes).contains("not JSON"));
        // Writing: a message too large to send.
        let big = Message::Error {
            message: "x".repeat(MAX_MESSAGE),
        };
        assert!(matches!(
            write_frame(&mut Vec::new(), &big),
            Err(FrameError::TooLarge(_))
        ));
    }

    #[test]
    fn a_hello_has_a_small_bound_and_a_token_handshake_is_named() {
        // What rank 0 reads from a connection it knows nothing of: a length over the hello's
        // bound is refused with nothing more read (a reader that only has the length suffices).
        let len = ((MAX_HELLO + 1) as u32).to_le_bytes();
        match read_frame(&mut &len[..], MAX_HELLO) {
            Err(e @ FrameError::Foreign(_)) => {
                assert!(
                    e.to_string().contains("over the limit of 65536 bytes"),
                    "{e}"
                )
            }
            other => panic!("{other:?}"),
        }
        // A genuine hello fits.
        let frame = encode(&hello()).unwrap();
        assert_eq!(read_frame(&mut &frame[..], MAX_HELLO).unwrap(), hello());
        // The opening of the job-token handshake where a frame was expected.
        let e = foreign(b"st-auth1 and a nonce");
        assert!(e.contains("job-token handshake"), "{e}");
    }

    #[test]
    fn garbage_is_not_ours() {
        let http = foreign(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(http.starts_with("not a shardtrain rendezvous"), "{http}");
        assert!(http.contains("`GET `"), "{http}");
        let e = foreign(&frame_of(b"\x00\xffnot json at all"));
        assert!(e.contains("not JSON"), "{e}");
        let e = foreign(&frame_of(br#"{"magic":"other-proto","type":"hello"}"#));
        assert!(e.contains("magic `other-proto`"), "{e}");
        let e = foreign(&frame_of(br#"{"type":"error","message":"m"}"#));
        assert!(e.contains("no magic"), "{e}");
        let e = foreign(&frame_of(
            br#"{"magic":"shardtrain-rdzv-2","type":"hello"}"#,
        ));
        assert!(e.contains("another shardtrain version"), "{e}");
        let e = foreign(&frame_of(
            br#"{"magic":"shardtrain-rdzv-1","type":"hello"}"#,
        ));
        assert!(e.contains("malformed"), "{e}");
        let e = foreign(&frame_of(br#"{"magic":"shardtrain-rdzv-1","type":"bye"}"#));
        assert!(e.contains("malformed"), "{e}");
    }

    #[test]
    fn truncated_frames_are_closed_mid_message() {
        let frame = encode(&hello()).unwrap();
        for cut in [1, 3, 4, 10, frame.len() - 1] {
            assert!(
                matches!(
                    read_frame(&mut &frame[..cut], MAX_MESSAGE),
                    Err(FrameError::Closed { mid_message: true })
                ),
                "cut at {cut}"
            );
        }
        assert!(matches!(
            read_frame(&mut &[][..], MAX_MESSAGE),
            Err(FrameError::Closed { mid_message: false })
        ));
    }
}
