//! Rank 0's side of the rendezvous: binds MASTER_ADDR:MASTER_PORT, authenticates and reads each
//! connection on a thread of its own, takes in the ranks, and hands out the membership (or one
//! error to everyone).

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use super::frame::{encode, is_closed, read_frame, send_and_close, FrameError, Message};
use super::{Membership, RendezvousConfig, AUTH_CONTEXT, MAGIC, MAX_HELLO, MAX_NOTES, POLL, SEND};
use crate::comm::auth;
use crate::comm::deadline::Timed;

/// A connection and the first message read from it.
struct Arrival {
    stream: TcpStream,
    peer: SocketAddr,
    hello: Result<Message, FrameError>,
    at: Instant,
}

/// Whether an arrival said a hello (after the handshake, with a token): only such a peer is told
/// how the job ended; any other is closed unanswered.
fn said_hello(a: &Arrival) -> bool {
    matches!(a.hello, Ok(Message::Hello { .. }))
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
pub(super) fn serve(
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
            let key = self.cfg.key.clone();
            let spawned = thread::Builder::new()
                .name("rendezvous-hello".into())
                .spawn(move || {
                    let mut timed = Timed {
                        stream: &stream,
                        deadline,
                    };
                    // With a token, not one byte of a message before the peer has proved it.
                    let authenticated = match &key {
                        Some(key) => auth::accept(&mut timed, key, AUTH_CONTEXT)
                            .map_err(FrameError::Unauthenticated),
                        None => Ok(()),
                    };
                    let hello = authenticated.and_then(|()| read_frame(&mut timed, MAX_HELLO));
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
            Err(FrameError::Unauthenticated(e)) => {
                // Closed unanswered: it has had the challenge, and learns nothing more.
                drop(stream);
                let why = match e {
                    auth::AuthError::Foreign { .. } | auth::AuthError::BadProof => format!(
                        "refused: {e} (a rank with another job token, or none, or not a rank \
                         of this job)"
                    ),
                    e => format!("refused: {e}"),
                };
                self.ignore(peer, why);
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
            // Says why, and nothing about the job: the peer is unknown.
            message: format!("this is a shardtrain rendezvous ({MAGIC}); this connection is {why}"),
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
            .chain(rx.try_iter().filter(said_hello).map(|a| a.stream));
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
            for a in rx.try_iter().filter(said_hello) {
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
