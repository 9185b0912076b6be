//! A joining rank's side of the rendezvous: connects to rank 0 (retrying while it starts),
//! proves its job token if it has one, says hello and waits for the answer.

use std::net::{TcpStream, ToSocketAddrs};
use std::thread;
use std::time::Instant;

use super::frame::{read_frame, write_frame, FrameError, Message};
use super::{
    Membership, RendezvousConfig, AUTH_CONTEXT, CONNECT_ATTEMPT, GRACE, MAX_MESSAGE, RETRY,
};
use crate::comm::auth::{self, AuthError};
use crate::comm::deadline::Timed;

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
pub(super) fn join(
    cfg: &RendezvousConfig,
    data_addr: &str,
    deadline: Instant,
) -> Result<Membership, String> {
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
    if let Some(key) = &cfg.key {
        auth::dial(&mut timed, key, AUTH_CONTEXT).map_err(|e| refused(&endpoint, e))?;
    }
    write_frame(&mut timed, &hello)
        .map_err(|e| format!("could not send the hello to rank 0 at {endpoint}: {e}"))?;
    let reply = read_frame(&mut timed, MAX_MESSAGE).map_err(|e| match e {
        FrameError::TimedOut => format!(
            "rank 0 at {endpoint} took this rank's hello but gave no answer within {:?}",
            cfg.timeout
        ),
        FrameError::Closed { .. } => format!(
            "rank 0 at {endpoint} closed the connection without an answer (did it fail{}? see \
             its log)",
            if cfg.key.is_none() {
                ", or does it require a job token this rank lacks"
            } else {
                ""
            }
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

/// Why the handshake with rank 0 failed, said for the user.
fn refused(endpoint: &str, e: AuthError) -> String {
    match e {
        AuthError::Closed { after_proof: true } => format!(
            "rank 0 at {endpoint} refused this rank's job token: the ranks hold different tokens \
             (give every rank the same SHARDTRAIN_JOB_TOKEN or --job-token-file)"
        ),
        AuthError::BadProof => format!(
            "{endpoint} answered the job-token handshake but its proof does not verify: it does \
             not hold this job's token (another job on this port, or not a rank of this job)"
        ),
        AuthError::Foreign { .. } => format!(
            "{endpoint} did not answer the job-token handshake: {e}; it may be a rank 0 started \
             without a job token (give every rank the same one), or not shardtrain"
        ),
        e => format!("the job-token handshake with rank 0 at {endpoint} failed: {e}"),
    }
}
