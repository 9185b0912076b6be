//! The rendezvous of a multi-process job: every rank learns every rank's data address and a
//! payload chosen by rank 0 (the NCCL unique id, the run directory), over one TCP port,
//! MASTER_ADDR:MASTER_PORT, before any transport is built. [`rendezvous`] is the whole API; every
//! rank calls it once.
//!
//! Protocol (`shardtrain-rdzv-1`). A message is a u32 little-endian length, then that many bytes of
//! a JSON object with `"magic": "shardtrain-rdzv-1"` and a `"type"`; a length over the bound is
//! refused unread, so garbage costs nothing: [`MAX_HELLO`] (64 KiB) for what rank 0 reads,
//! [`MAX_MESSAGE`] (16 MiB) for rank 0's answer, which only grows with the world size.
//!
//! With a job token ([`RendezvousConfig::key`]), every connection begins with the job-token
//! handshake of [`crate::comm::auth`] (the joining rank dials, rank 0 accepts), before any message:
//! a connection that fails it is closed having received nothing but rank 0's random challenge,
//! is logged as refused, and does not fail the job (rank 0 keeps waiting for the genuine rank).
//! Without a token the protocol is as below, open to anyone who can connect.
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
//! message saying only why (nothing about the job: no run id, no world size), closes it, logs `ignored a connection from PEER: not a shardtrain rendezvous (...)` as
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

mod frame;
mod join;
mod serve;

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::comm::auth::Key;

/// The protocol's name and version, in every message.
pub const MAGIC: &str = "shardtrain-rdzv-1";
/// Largest message sent or accepted, in bytes (the JSON after the length).
pub const MAX_MESSAGE: usize = 16 << 20;
/// Largest message rank 0 reads (a hello: a run id, a rank, an address), in bytes.
pub const MAX_HELLO: usize = 64 << 10;
/// What the job-token handshake of the rendezvous is bound to (see [`crate::comm::auth`]).
const AUTH_CONTEXT: &[u8] = b"rendezvous";
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
    /// The job token: with one, every connection is authenticated before any message; without,
    /// any process that can connect may join.
    pub key: Option<Key>,
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
        serve::serve(cfg, data_addr, payload, deadline)
    } else {
        join::join(cfg, data_addr, deadline)
    };
    result.map_err(|e| anyhow::anyhow!("{who}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_config_fails_at_once() {
        let cfg = |rank, world_size, master_port| RendezvousConfig {
            master_addr: "127.0.0.1".into(),
            master_port,
            rank,
            world_size,
            run_id: "r".into(),
            timeout: Duration::from_secs(60),
            key: None,
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
