//! The rendezvous of a multi-process job: every rank learns every rank's data address and a
//! payload chosen by rank 0 (the NCCL unique id, the run directory), over one TCP port,
//! MASTER_ADDR:MASTER_PORT, before any transport is built. [`rendezvous`] is the whole API; every
//! rank calls it once.
//!
//! Protocol (`shardtrain-rdzv-1`). A message is a u32 little-endian length, then that many bytes of
//! a JSON object with `"magic": "shardtrain-rdzv-1"` and a `"type"`; a length over
//! [`MAX_MESSAGE`] (16 MiB) is refused unread, so garbage costs nothing.
//! - Rank 0 binds MASTER_ADDR:MASTER_PORT first (std's default socket options), then registers
//!   itself directly (no connection to itself) and accepts connections until every rank has joined
//!   or the deadline passes. Each accepted connection's hello is read on a short-lived thread of
//!   its own, so a silent connection delays nobody.
//! - Every other rank connects (an attempt of at most 1 s, then a retry every 100 ms: rank 0 may
//!   start later) and sends `hello {run_id, world_size, rank, data_addr, remaining_ms}`, then
//!   waits for the answer. `remaining_ms` is what is left of its own timeout: rank 0 ends the
//!   rendezvous at the earliest deadline of the ranks that joined (and its own), so it can tell
//!   every waiting rank why the job failed before that rank would give up on its own.
//! - When every rank has joined, rank 0 sends each `welcome {world_size, addrs, payload}` (the
//!   data addresses in rank order; the payload as a JSON array of bytes, at most
//!   [`MAX_PAYLOAD`]) and closes the connections; a rank checks that the table has WORLD_SIZE
//!   entries with its own address at its rank. A rank that fails the job makes rank 0 send
//!   `error {message}` to every rank that has joined (and to the offender), and rank 0 returns
//!   the same message: every rank fails with one explanation, no rank times out blindly.
//!
//! What fails the job, on rank 0 and every rank that joined, with the message (every error starts
//! with `rendezvous (rank R of W): `, and a joined rank's with `rank 0 failed the rendezvous: `):
//! - MASTER_PORT taken on rank 0: `MASTER_PORT 29500 on 127.0.0.1 is already in use (another job?
//!   choose another MASTER_PORT)` (rank 0 only; the others cannot reach it, below);
//! - a hello of another run: ``rank 1 belongs to run `x`, this is run `y`: two jobs share
//!   MASTER_ADDR:MASTER_PORT (127.0.0.1:29500)``;
//! - another world size: `rank 3 says WORLD_SIZE=4, rank 0 has 2`;
//! - a rank out of range: `rank 5 is out of range: WORLD_SIZE=4 has ranks 0..=3`;
//! - one rank twice, both connections alive: `rank 1 joined twice (from A and B)` (a rank whose
//!   earlier connection has closed, e.g. one restarted, simply replaces it);
//! - ranks missing at the deadline: `ranks [2, 3] did not join within 10s` (`rank 2 did not ...`
//!   for one), followed by what rank 0 ignored meanwhile, if anything.
//!
//! Failures seen by one rank only: rank 0 unreachable until the deadline (`could not reach rank 0
//! at ADDR:PORT within 10s (is it running? is the address right?)`, with the last connection
//! error); rank 0 closing the connection without an answer (it died, or it failed before this rank
//! joined, then see its log); an answer that is not of this protocol.
//!
//! A connection whose first message is not a hello of this protocol (garbage, an HTTP probe, a
//! port scanner, another protocol version) does not fail the job: rank 0 answers it with an error
//! message, closes it, logs `ignored a connection from PEER: not a shardtrain rendezvous (...)` as
//! a warning, keeps waiting for the real ranks, and adds the note to the missing-ranks error if the
//! job then times out. A rank whose connection closes before the job is complete (it died) counts
//! as missing again until it reconnects.
//!
//! Every read and write has a deadline: rank 0 returns within the timeout plus at most 1 s to hand
//! out the answers; a joined rank waits for the answer until its deadline plus 1 s of grace. A
//! hello-reading thread can outlive the call by no more than rank 0's deadline. Host names are
//! resolved with the system resolver, which has no timeout of its own.
//!
//! There is no second round of acknowledgements: a rank that dies just as rank 0 hands out the
//! welcomes makes rank 0 return an error naming it if sending to it fails (the kernel may still
//! take the bytes), while the other ranks proceed and fail in the transport, which has its own
//! timeouts.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// The protocol's name and version, in every message.
pub const MAGIC: &str = "shardtrain-rdzv-1";
/// Largest message sent or accepted, in bytes (the JSON after the length).
pub const MAX_MESSAGE: usize = 16 << 20;
/// Largest payload rank 0 may hand out (as a JSON array of bytes it takes up to 4 bytes a byte).
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Longest single connection attempt of a joining rank.
const CONNECT_ATTEMPT: Duration = Duration::from_secs(1);
/// Pause between connection attempts.
const RETRY: Duration = Duration::from_millis(100);
/// How often rank 0 looks for new connections and deadlines.
const POLL: Duration = Duration::from_millis(10);
/// How long past its own deadline a joined rank waits for rank 0's answer.
const GRACE: Duration = Duration::from_secs(1);
/// How long rank 0 spends handing out the answers.
const SEND: Duration = Duration::from_secs(1);
/// Notes of ignored connections kept for the error message.
const MAX_NOTES: usize = 3;

/// Where and how to meet the other ranks (the launcher's MASTER_ADDR, MASTER_PORT, RANK,
/// WORLD_SIZE and a run id).
#[derive(Clone, Debug)]
pub struct RendezvousConfig {
    /// Rank 0's host: an IP address or a host name; rank 0 listens on it, so it must name an
    /// address of rank 0's machine.
    pub master_addr: String,
    /// The port rank 0 listens on (not 0).
    pub master_port: u16,
    pub rank: usize,
    pub world_size: usize,
    /// Identifies the job: ranks of another job on the same port are refused.
    pub run_id: String,
    /// Limit of the whole call (see the module doc for the few extra moments).
    pub timeout: Duration,
}

/// What every rank learns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    pub rank: usize,
    pub world_size: usize,
    /// Each rank's data address ("ip:port") in rank order.
    pub addrs: Vec<String>,
    /// Bytes rank 0 handed out.
    pub payload: Vec<u8>,
}

/// Joins the job: `data_addr` is the address this rank's peers should connect to for data (it is
/// only stored and redistributed); `payload` is used only on rank 0 (what every rank receives).
/// Fails with one line saying what went wrong (see the module doc), within `cfg.timeout` and a
/// second or so.
pub fn rendezvous(cfg: &RendezvousConfig, data_addr: &str, payload: &[u8]) -> Result<Membership> {
    let deadline = Instant::now() + cfg.timeout;
    let who = format!("rendezvous (rank {} of {})", cfg.rank, cfg.world_size);
    if cfg.world_size == 0 {
        bail!("{who}: WORLD_SIZE must be at least 1");
    }
    if cfg.rank >= cfg.world_size {
        bail!(
            "{who}: RANK={} is out of range for WORLD_SIZE={} (ranks are 0..={})",
            cfg.rank,
            cfg.world_size,
            cfg.world_size - 1
        );
    }
    if cfg.master_port == 0 {
        bail!("{who}: MASTER_PORT 0 is not a port the other ranks can connect to");
    }
    let result = if cfg.rank == 0 {
        if payload.len() > MAX_PAYLOAD {
            bail!(
                "{who}: the payload of {} bytes is over the limit of {MAX_PAYLOAD} bytes",
                payload.len()
            );
        }
        serve(cfg, data_addr, payload, deadline)
    } else {
        join(cfg, data_addr, deadline)
    };
    result.map_err(|e| anyhow::anyhow!("{who}: {e}"))
}

// ---- messages and framing -------------------------------------------------------------------

/// The messages of the protocol (the `type` field); every one also carries `magic`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Message {
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
    fn kind(&self) -> &'static str {
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
enum FrameError {
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
        }
    }
}

impl FrameError {
    fn from_io(e: io::Error, mid_message: bool) -> FrameError {
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
fn encode(msg: &Message) -> Result<Vec<u8>, FrameError> {
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

fn write_frame(w: &mut impl Write, msg: &Message) -> Result<(), FrameError> {
    let frame = encode(msg)?;
    w.write_all(&frame)
        .and_then(|()| w.flush())
        .map_err(|e| FrameError::from_io(e, false))
}

fn read_frame(r: &mut impl Read) -> Result<Message, FrameError> {
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
    let n = u32::from_le_bytes(len) as usize;
    if n > MAX_MESSAGE {
        return Err(FrameError::Foreign(format!(
            "its first bytes `{}` announce a message of {n} bytes, over the limit of {} MiB",
            len.escape_ascii(),
            MAX_MESSAGE >> 20
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

/// A stream whose every read and write ends by `deadline` (a `TimedOut` error after it).
struct Timed<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
}

impl Timed<'_> {
    fn left(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        Ok(left)
    }
}

impl Read for Timed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.set_read_timeout(Some(self.left()?))?;
        let mut stream = self.stream;
        stream.read(buf)
    }
}

impl Write for Timed<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.set_write_timeout(Some(self.left()?))?;
        let mut stream = self.stream;
        stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut stream = self.stream;
        stream.flush()
    }
}

/// Sends `frame` by `deadline`, then closes the stream; errors are only reported.
fn send_and_close(stream: &TcpStream, frame: &[u8], deadline: Instant) -> Result<(), FrameError> {
    let result = Timed { stream, deadline }
        .write_all(frame)
        .map_err(|e| FrameError::from_io(e, false));
    let _ = stream.shutdown(Shutdown::Write);
    result
}

/// Whether the peer has closed `stream` (it sends nothing after its hello, so any readable end of
/// file or error means it is gone).
fn is_closed(stream: &TcpStream) -> bool {
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

// ---- rank 0 ---------------------------------------------------------------------------------

/// A connection and the first message read from it.
struct Arrival {
    stream: TcpStream,
    peer: SocketAddr,
    hello: Result<Message, FrameError>,
    at: Instant,
}

/// A rank that has joined (not rank 0).
struct Joined {
    stream: TcpStream,
    peer: SocketAddr,
    data_addr: String,
    /// When the rank's own timeout ends, on this clock.
    deadline: Instant,
}

/// Rank 0's state while ranks join.
struct Server<'a> {
    cfg: &'a RendezvousConfig,
    /// MASTER_ADDR:MASTER_PORT as configured.
    endpoint: String,
    /// Rank 0's own deadline.
    deadline: Instant,
    /// By rank; `None` for rank 0 and for ranks not (or no longer) joined.
    joined: Vec<Option<Joined>>,
    /// Connections ignored, for the error message.
    notes: Vec<String>,
    ignored: usize,
    /// The last error from `accept`, if any.
    accept_error: Option<String>,
}

fn bind(cfg: &RendezvousConfig) -> Result<TcpListener, String> {
    let (host, port) = (cfg.master_addr.as_str(), cfg.master_port);
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve MASTER_ADDR `{host}`: {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("MASTER_ADDR `{host}` resolves to no address"));
    }
    TcpListener::bind(&addrs[..]).map_err(|e| match e.kind() {
        io::ErrorKind::AddrInUse => format!(
            "MASTER_PORT {port} on {host} is already in use (another job? choose another \
             MASTER_PORT)"
        ),
        io::ErrorKind::AddrNotAvailable => format!(
            "cannot listen on {host}:{port}: {host} is not an address of this machine \
             (MASTER_ADDR must name rank 0's host): {e}"
        ),
        _ => format!("cannot listen on {host}:{port}: {e}"),
    })
}

/// Rank 0: registers itself, waits for every other rank, hands out the membership.
fn serve(
    cfg: &RendezvousConfig,
    data_addr: &str,
    payload: &[u8],
    deadline: Instant,
) -> Result<Membership, String> {
    let listener = bind(cfg)?;
    let endpoint = format!("{}:{}", cfg.master_addr, cfg.master_port);
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("cannot listen on {endpoint}: {e}"))?;
    let mut server = Server {
        cfg,
        endpoint,
        deadline,
        joined: (0..cfg.world_size).map(|_| None).collect(),
        notes: Vec::new(),
        ignored: 0,
        accept_error: None,
    };
    let (tx, rx) = mpsc::channel();
    loop {
        if server.complete() {
            break;
        }
        if Instant::now() >= server.effective_deadline() {
            server.sweep();
            let missing = server.missing();
            if missing.is_empty() {
                break;
            }
            let who = match missing.as_slice() {
                [one] => format!("rank {one}"),
                many => format!("ranks {many:?}"),
            };
            let mut msg = format!("{who} did not join within {:?}", cfg.timeout);
            if let Some(e) = &server.accept_error {
                msg += &format!(" (accepting connections failed: {e})");
            }
            if server.ignored > 0 {
                msg += &format!(
                    " (meanwhile ignored {} connection(s): {}{})",
                    server.ignored,
                    server.notes.join("; "),
                    if server.ignored > server.notes.len() {
                        "; ..."
                    } else {
                        ""
                    }
                );
            }
            return Err(server.fail(msg, Vec::new(), &rx));
        }
        server.accept(&listener, &tx);
        match rx.recv_timeout(POLL) {
            Ok(arrival) => {
                server.arrive(arrival, &rx)?;
                while let Ok(arrival) = rx.try_recv() {
                    server.arrive(arrival, &rx)?;
                }
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {}
        }
    }
    drop(listener);
    server.welcome(data_addr, payload, &rx)
}

impl Server<'_> {
    /// Accepts the pending connections, each read by a thread of its own.
    fn accept(&mut self, listener: &TcpListener, tx: &Sender<Arrival>) {
        loop {
            let (stream, peer) = match listener.accept() {
                Ok(conn) => conn,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("rendezvous: accepting a connection: {e}");
                    self.accept_error = Some(e.to_string());
                    return;
                }
            };
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_nodelay(true);
            let tx = tx.clone();
            let deadline = self.deadline;
            let spawned = thread::Builder::new()
                .name("rendezvous-hello".into())
                .spawn(move || {
                    let hello = read_frame(&mut Timed {
                        stream: &stream,
                        deadline,
                    });
                    let at = Instant::now();
                    // Rank 0 may have finished meanwhile: then the connection is dropped.
                    let _ = tx.send(Arrival {
                        stream,
                        peer,
                        hello,
                        at,
                    });
                });
            if let Err(e) = spawned {
                self.ignore(peer, format!("could not start a thread to read it: {e}"));
            }
        }
    }

    fn ignore(&mut self, peer: SocketAddr, why: String) {
        let note = format!("from {peer}: {why}");
        tracing::warn!(
            "rendezvous on {}: ignored a connection {note}",
            self.endpoint
        );
        self.ignored += 1;
        if self.notes.len() < MAX_NOTES {
            self.notes.push(note);
        }
    }

    /// Takes in one arrival; an error fails the job (the message was already sent to everyone).
    fn arrive(&mut self, arrival: Arrival, rx: &Receiver<Arrival>) -> Result<(), String> {
        let Arrival {
            stream,
            peer,
            hello,
            at,
        } = arrival;
        let (run_id, world_size, rank, data_addr, remaining_ms) = match hello {
            Ok(Message::Hello {
                run_id,
                world_size,
                rank,
                data_addr,
                remaining_ms,
            }) => (run_id, world_size, rank, data_addr, remaining_ms),
            Ok(other) => {
                let why = format!(
                    "not a shardtrain rendezvous (its first message is a {}, not a hello)",
                    other.kind()
                );
                self.refuse(stream, peer, why);
                return Ok(());
            }
            Err(e @ FrameError::Foreign(_)) => {
                self.refuse(stream, peer, e.to_string());
                return Ok(());
            }
            Err(e) => {
                let why = format!("not a shardtrain rendezvous (it sent no hello: {e})");
                self.refuse(stream, peer, why);
                return Ok(());
            }
        };
        let cfg = self.cfg;
        if run_id != cfg.run_id {
            let msg = format!(
                "rank {rank} belongs to run `{run_id}`, this is run `{}`: two jobs share \
                 MASTER_ADDR:MASTER_PORT ({})",
                cfg.run_id, self.endpoint
            );
            return Err(self.fail(msg, vec![stream], rx));
        }
        if world_size != cfg.world_size {
            let msg = format!(
                "rank {rank} says WORLD_SIZE={world_size}, rank 0 has {}",
                cfg.world_size
            );
            return Err(self.fail(msg, vec![stream], rx));
        }
        if rank >= cfg.world_size {
            let msg = format!(
                "rank {rank} is out of range: WORLD_SIZE={} has ranks 0..={}",
                cfg.world_size,
                cfg.world_size - 1
            );
            return Err(self.fail(msg, vec![stream], rx));
        }
        if rank == 0 {
            let msg = format!(
                "rank 0 joined twice (from this process, listening on {}, and {peer})",
                self.endpoint
            );
            return Err(self.fail(msg, vec![stream], rx));
        }
        if let Some(prev) = &self.joined[rank] {
            if !is_closed(&prev.stream) {
                let msg = format!("rank {rank} joined twice (from {} and {peer})", prev.peer);
                return Err(self.fail(msg, vec![stream], rx));
            }
            tracing::warn!(
                "rendezvous on {}: rank {rank} joined again from {peer} (its connection from {} \
                 had closed)",
                self.endpoint,
                prev.peer
            );
        }
        self.joined[rank] = Some(Joined {
            stream,
            peer,
            data_addr,
            deadline: at
                .checked_add(Duration::from_millis(remaining_ms))
                .unwrap_or(self.deadline),
        });
        Ok(())
    }

    /// Answers a connection that is not a rank of this protocol, and forgets it.
    fn refuse(&mut self, stream: TcpStream, peer: SocketAddr, why: String) {
        let reply = Message::Error {
            message: format!(
                "{} is the rendezvous of shardtrain run `{}` ({MAGIC}); this connection is {why}",
                self.endpoint, self.cfg.run_id
            ),
        };
        if let Ok(frame) = encode(&reply) {
            let _ = send_and_close(&stream, &frame, Instant::now() + POLL);
        }
        self.ignore(peer, why);
    }

    /// Whether every rank is here (and still connected: checked only once none is missing).
    fn complete(&mut self) -> bool {
        if !self.missing().is_empty() {
            return false;
        }
        self.sweep();
        self.missing().is_empty()
    }

    /// Forgets the ranks whose connections have closed (they died, or gave up).
    fn sweep(&mut self) {
        for rank in 1..self.joined.len() {
            let closed = self.joined[rank]
                .as_ref()
                .is_some_and(|j| is_closed(&j.stream));
            if closed {
                let j = self.joined[rank].take().expect("checked");
                tracing::warn!(
                    "rendezvous on {}: rank {rank} (from {}) disconnected before every rank \
                     joined",
                    self.endpoint,
                    j.peer
                );
            }
        }
    }

    fn missing(&self) -> Vec<usize> {
        (1..self.joined.len())
            .filter(|&r| self.joined[r].is_none())
            .collect()
    }

    /// The earliest deadline of rank 0 and the ranks that joined.
    fn effective_deadline(&self) -> Instant {
        self.joined
            .iter()
            .flatten()
            .map(|j| j.deadline)
            .fold(self.deadline, Instant::min)
    }

    /// Fails the job: sends `msg` to every rank that joined, to `also` and to the arrivals not yet
    /// taken in; returns `msg`.
    fn fail(&mut self, msg: String, also: Vec<TcpStream>, rx: &Receiver<Arrival>) -> String {
        tracing::debug!("rendezvous on {}: failing: {msg}", self.endpoint);
        let reply = Message::Error {
            message: msg.clone(),
        };
        let frame = match encode(&reply) {
            Ok(frame) => frame,
            Err(_) => encode(&Message::Error {
                message: "the rendezvous failed (the reason is too long to send)".into(),
            })
            .expect("a short message encodes"),
        };
        let deadline = Instant::now() + SEND;
        let streams = self
            .joined
            .iter_mut()
            .filter_map(Option::take)
            .map(|j| j.stream)
            .chain(also)
            .chain(rx.try_iter().map(|a| a.stream));
        for stream in streams {
            let _ = send_and_close(&stream, &frame, deadline);
        }
        msg
    }

    /// Every rank is here: sends each the membership.
    fn welcome(
        mut self,
        data_addr: &str,
        payload: &[u8],
        rx: &Receiver<Arrival>,
    ) -> Result<Membership, String> {
        let addrs: Vec<String> = self
            .joined
            .iter()
            .enumerate()
            .map(|(r, j)| match j {
                Some(j) => j.data_addr.clone(),
                None if r == 0 => data_addr.to_string(),
                None => unreachable!("every rank has joined"),
            })
            .collect();
        let welcome = Message::Welcome {
            world_size: self.cfg.world_size,
            addrs: addrs.clone(),
            payload: payload.to_vec(),
        };
        let frame = match encode(&welcome) {
            Ok(frame) => frame,
            Err(e) => {
                let msg = format!("cannot hand out the membership: {e}");
                return Err(self.fail(msg, Vec::new(), rx));
            }
        };
        let deadline = Instant::now() + SEND;
        let mut unsent = Vec::new();
        for (rank, j) in self.joined.iter().enumerate() {
            if let Some(j) = j {
                if let Err(e) = send_and_close(&j.stream, &frame, deadline) {
                    unsent.push(format!("rank {rank} at {}: {e}", j.peer));
                }
            }
        }
        // Connections that came in after the last rank: ranks that joined twice.
        let late = Message::Error {
            message: format!(
                "the rendezvous of run `{}` on {} has completed without this connection (a rank \
                 that joined twice?)",
                self.cfg.run_id, self.endpoint
            ),
        };
        if let Ok(late) = encode(&late) {
            for a in rx.try_iter() {
                let _ = send_and_close(&a.stream, &late, Instant::now() + POLL);
            }
        }
        if !unsent.is_empty() {
            return Err(format!(
                "every rank joined, but the membership could not be sent to {} (the other ranks \
                 have it)",
                unsent.join(", ")
            ));
        }
        self.joined.clear();
        Ok(Membership {
            rank: 0,
            world_size: self.cfg.world_size,
            addrs,
            payload: payload.to_vec(),
        })
    }
}

// ---- the other ranks ------------------------------------------------------------------------

/// Connects to rank 0, retrying until `deadline`.
fn connect(cfg: &RendezvousConfig, endpoint: &str, deadline: Instant) -> Result<TcpStream, String> {
    let mut last = String::from("no attempt");
    loop {
        match (cfg.master_addr.as_str(), cfg.master_port).to_socket_addrs() {
            Ok(addrs) => {
                for addr in addrs {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    match TcpStream::connect_timeout(&addr, left.min(CONNECT_ATTEMPT)) {
                        Ok(stream) => return Ok(stream),
                        Err(e) => last = format!("{addr}: {e}"),
                    }
                }
            }
            Err(e) => last = format!("cannot resolve `{}`: {e}", cfg.master_addr),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "could not reach rank 0 at {endpoint} within {:?} (is it running? is the address \
                 right?); last attempt: {last}",
                cfg.timeout
            ));
        }
        thread::sleep(left.min(RETRY));
    }
}

/// A rank other than 0: says hello, waits for the answer.
fn join(cfg: &RendezvousConfig, data_addr: &str, deadline: Instant) -> Result<Membership, String> {
    let endpoint = format!("{}:{}", cfg.master_addr, cfg.master_port);
    let stream = connect(cfg, &endpoint, deadline)?;
    let _ = stream.set_nodelay(true);
    let reply_deadline = deadline + GRACE;
    let hello = Message::Hello {
        run_id: cfg.run_id.clone(),
        world_size: cfg.world_size,
        rank: cfg.rank,
        data_addr: data_addr.to_string(),
        remaining_ms: deadline
            .saturating_duration_since(Instant::now())
            .as_millis()
            .try_into()
            .unwrap_or(u64::MAX),
    };
    let mut timed = Timed {
        stream: &stream,
        deadline: reply_deadline,
    };
    write_frame(&mut timed, &hello)
        .map_err(|e| format!("could not send the hello to rank 0 at {endpoint}: {e}"))?;
    let reply = read_frame(&mut timed).map_err(|e| match e {
        FrameError::TimedOut => format!(
            "rank 0 at {endpoint} took this rank's hello but gave no answer within {:?}",
            cfg.timeout
        ),
        FrameError::Closed { .. } => format!(
            "rank 0 at {endpoint} closed the connection without an answer (did it fail? see its \
             log)"
        ),
        FrameError::Foreign(_) => format!("{endpoint} answered, but it is {e}"),
        e => format!("reading rank 0's answer from {endpoint}: {e}"),
    })?;
    match reply {
        Message::Error { message } => Err(format!("rank 0 failed the rendezvous: {message}")),
        Message::Welcome {
            world_size,
            addrs,
            payload,
        } => {
            if world_size != cfg.world_size
                || addrs.len() != cfg.world_size
                || addrs[cfg.rank] != data_addr
            {
                return Err(format!(
                    "rank 0 at {endpoint} sent a membership that does not fit this rank \
                     (WORLD_SIZE={world_size}, {} addresses, this rank's {:?}; expected \
                     WORLD_SIZE={} and {data_addr:?})",
                    addrs.len(),
                    addrs.get(cfg.rank),
                    cfg.world_size
                ));
            }
            Ok(Membership {
                rank: cfg.rank,
                world_size,
                addrs,
                payload,
            })
        }
        other => Err(format!(
            "{endpoint} answered with a {}, not a welcome: not a shardtrain rendezvous rank 0",
            other.kind()
        )),
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
        match read_frame(&mut &bytes[..]) {
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
            assert_eq!(&read_frame(&mut r).unwrap(), m);
        }
        // The stream ends cleanly between messages.
        assert!(matches!(
            read_frame(&mut r),
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
            read_frame(&mut &frame_of(body)[..]).unwrap(),
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
        assert!(e.contains("over the limit of 16 MiB"), "{e}");
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
                    read_frame(&mut &frame[..cut]),
                    Err(FrameError::Closed { mid_message: true })
                ),
                "cut at {cut}"
            );
        }
        assert!(matches!(
            read_frame(&mut &[][..]),
            Err(FrameError::Closed { mid_message: false })
        ));
    }

    #[test]
    fn bad_config_fails_at_once() {
        let cfg = |rank, world_size, master_port| RendezvousConfig {
            master_addr: "127.0.0.1".into(),
            master_port,
            rank,
            world_size,
            run_id: "r".into(),
            timeout: Duration::from_secs(60),
        };
        let e = rendezvous(&cfg(4, 4, 1), "a", &[]).unwrap_err().to_string();
        assert!(e.contains("RANK=4 is out of range for WORLD_SIZE=4"), "{e}");
        let e = rendezvous(&cfg(0, 0, 1), "a", &[]).unwrap_err().to_string();
        assert!(e.contains("WORLD_SIZE must be at least 1"), "{e}");
        let e = rendezvous(&cfg(1, 2, 0), "a", &[]).unwrap_err().to_string();
        assert!(e.contains("MASTER_PORT 0"), "{e}");
        let e = rendezvous(&cfg(0, 2, 1), "a", &vec![0; MAX_PAYLOAD + 1])
            .unwrap_err()
            .to_string();
        assert!(e.contains("payload"), "{e}");
    }
}
