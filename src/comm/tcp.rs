//! The `tcp` transport: ranks are processes (one per device, or CPU ranks on one machine) joined by
//! a full mesh of TCP connections, one per pair of ranks. Data goes through host memory: a rank
//! downloads its buffer, sends it to the peers that need it, and uploads what it receives. It is
//! the CPU path of `shardtrain launch` and a fallback for tests; it is not meant for production
//! (NCCL is the GPU transport).
//!
//! Semantics are exactly those of the `local` transport (see [`Communicator`]): reductions add in
//! group-rank order, each partial sum rounded to the destination's dtype, so a job gives the same
//! bits whichever transport runs it. Every message carries the group, the collective's sequence
//! number and its signature; a rank receiving something else fails naming both sides. Every read
//! and write has the collective timeout; a peer that dies closes its sockets, and every rank
//! waiting on it fails naming it. A failing rank exits, which closes its sockets: no rank hangs.
//!
//! With a job token, every mesh connection passes the job-token handshake ([`super::auth`])
//! before a rank says who it is; a connection that fails it is dropped and logged. A message whose
//! header announces a length other than what the collective being run expects is refused before
//! its body is read or any memory is set aside for it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use half::bf16;

use super::auth::{self, Key};
use super::deadline::Timed;
use super::{all_gather_problem, reduce_scatter_problem, Communicator, PeerFailed, ReduceOp};
use crate::backend::{Backend, Buffer, DType};

/// Longest collective signature in a message header (a guard against garbage on the socket).
const MAX_SIGNATURE: u64 = 4096;
/// What the job-token handshake of the mesh is bound to (see [`crate::comm::auth`]).
const AUTH_CONTEXT: &[u8] = b"mesh";
/// How often a listening rank looks for new connections and for the deadline.
const POLL: Duration = Duration::from_millis(10);

/// One connection to a peer: separate handles for reading and writing, so a rank can send to all
/// its peers (from helper threads) while it reads.
struct Link {
    reader: Mutex<TcpStream>,
    writer: Mutex<TcpStream>,
}

/// The mesh of one process: its rank and a link to every other rank.
pub struct TcpWorld {
    rank: usize,
    size: usize,
    links: Vec<Option<Link>>,
    timeout: Duration,
}

/// The first bytes on a mesh connection: who is calling.
const HELLO: &[u8; 8] = b"st-mesh1";

impl TcpWorld {
    /// Connects this rank to every other: it dials the ranks below it (at `addrs[j]`, retrying
    /// until `timeout`) and accepts the ranks above it on `listener` (the socket behind
    /// `addrs[rank]`). With a job token, each connection passes the job-token handshake (the
    /// dialer dials, the listener accepts) before a rank says who it is; a connection that fails
    /// it is logged and dropped, and the rank keeps waiting for the genuine one.
    pub fn connect(
        rank: usize,
        addrs: &[String],
        listener: TcpListener,
        timeout: Duration,
        key: Option<&Key>,
    ) -> Result<TcpWorld> {
        let size = addrs.len();
        let deadline = Instant::now() + timeout;
        let mut links: Vec<Option<Link>> = (0..size).map(|_| None).collect();
        for (j, addr) in addrs.iter().enumerate().take(rank) {
            let mut stream = loop {
                match TcpStream::connect(addr) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() < deadline => {
                        tracing::debug!("rank {rank}: connecting to rank {j} at {addr}: {e}");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => bail!(
                        "rank {rank} could not connect to rank {j} at {addr} within {timeout:?}: {e}"
                    ),
                }
            };
            if let Some(key) = key {
                // Rank j may still be dialing ranks below it: wait for it up to the deadline.
                let mut timed = Timed {
                    stream: &stream,
                    deadline,
                };
                auth::dial(&mut timed, key, AUTH_CONTEXT).map_err(|e| {
                    anyhow!("rank {rank}: the data connection to rank {j} at {addr}: {e}")
                })?;
            }
            stream.write_all(HELLO)?;
            stream.write_all(&(rank as u64).to_le_bytes())?;
            links[j] = Some(link(stream, timeout)?);
        }
        // Each accepted connection is authenticated and identified on a thread of its own, so a
        // stranger that connects and stalls delays nobody.
        listener.set_nonblocking(true)?;
        let (tx, rx) = mpsc::channel();
        let mut pending = size - rank - 1;
        while pending > 0 {
            if Instant::now() >= deadline {
                let missing: Vec<usize> =
                    (rank + 1..size).filter(|&j| links[j].is_none()).collect();
                bail!("rank {rank}: ranks {missing:?} did not connect within {timeout:?}");
            }
            loop {
                match listener.accept() {
                    Ok((stream, from)) => greet(stream, from, key, deadline, &tx),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e).context("accepting a mesh connection"),
                }
            }
            match rx.recv_timeout(POLL) {
                Ok(Greeted {
                    stream,
                    from,
                    rank: Ok(j),
                }) => {
                    if j <= rank || j >= size || links[j].is_some() {
                        bail!("rank {rank}: a connection from {from} claims to be rank {j}");
                    }
                    links[j] = Some(link(stream, timeout)?);
                    pending -= 1;
                }
                Ok(Greeted {
                    from,
                    rank: Err(why),
                    ..
                }) => tracing::warn!("rank {rank}: refused a data connection from {from}: {why}"),
                Err(_) => {}
            }
        }
        Ok(TcpWorld {
            rank,
            size,
            links,
            timeout,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// A communicator for the group of global ranks `ranks` (which must contain this rank).
    pub fn group(self: &Arc<Self>, ranks: &[usize]) -> Result<TcpComm> {
        let me = ranks
            .iter()
            .position(|&r| r == self.rank)
            .ok_or_else(|| anyhow!("rank {} is not in the group {ranks:?}", self.rank))?;
        // The group's tag: every member computes the same one from the member list.
        let tag = ranks.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &r| {
            (h ^ r as u64).wrapping_mul(0x100_0000_01b3)
        });
        Ok(TcpComm {
            world: self.clone(),
            ranks: ranks.to_vec(),
            me,
            tag,
            seq: AtomicU64::new(0),
        })
    }

    fn link(&self, peer: usize) -> Result<&Link> {
        self.links
            .get(peer)
            .and_then(Option::as_ref)
            .ok_or_else(|| anyhow!("rank {} has no connection to rank {peer}", self.rank))
    }
}

/// An accepted connection and who it says it is (or why it was refused).
struct Greeted {
    stream: TcpStream,
    from: SocketAddr,
    rank: Result<usize, String>,
}

/// Authenticates and identifies an accepted connection on a thread of its own (which ends by
/// `deadline`), then hands it to `tx`.
fn greet(
    stream: TcpStream,
    from: SocketAddr,
    key: Option<&Key>,
    deadline: Instant,
    tx: &mpsc::Sender<Greeted>,
) {
    let (key, tx) = (key.cloned(), tx.clone());
    let spawned = std::thread::Builder::new()
        .name("mesh-greet".into())
        .spawn(move || {
            let rank = identify(&stream, key.as_ref(), deadline);
            // The mesh may be complete (or failed) meanwhile: then the connection is dropped.
            let _ = tx.send(Greeted { stream, from, rank });
        });
    if let Err(e) = spawned {
        tracing::warn!("dropped a data connection from {from}: cannot start a thread: {e}");
    }
}

/// The rank an accepted connection says it is, after the job-token handshake if there is a key.
fn identify(stream: &TcpStream, key: Option<&Key>, deadline: Instant) -> Result<usize, String> {
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    let mut timed = Timed { stream, deadline };
    if let Some(key) = key {
        auth::accept(&mut timed, key, AUTH_CONTEXT)
            .map_err(|e| format!("{e} (not a rank of this job)"))?;
    }
    let mut hello = [0u8; 16];
    timed
        .read_exact(&mut hello)
        .map_err(|e| format!("it sent no mesh hello ({e})"))?;
    if &hello[..8] != HELLO {
        return Err(format!(
            "not a shardtrain mesh connection (its first bytes are `{}`)",
            hello[..8].escape_ascii()
        ));
    }
    Ok(u64::from_le_bytes(hello[8..].try_into().expect("8 bytes")) as usize)
}

fn link(stream: TcpStream, timeout: Duration) -> Result<Link> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(Link {
        writer: Mutex::new(stream.try_clone()?),
        reader: Mutex::new(stream),
    })
}

/// One rank's communicator for one group over the mesh.
pub struct TcpComm {
    world: Arc<TcpWorld>,
    ranks: Vec<usize>,
    me: usize,
    tag: u64,
    seq: AtomicU64,
}

/// What precedes every message: which collective it belongs to.
struct Header {
    tag: u64,
    seq: u64,
    signature: String,
    len: u64,
}

fn write_message(stream: &mut TcpStream, h: &Header, body: &[u8]) -> std::io::Result<()> {
    let sig = h.signature.as_bytes();
    let mut head = Vec::with_capacity(32 + sig.len());
    head.extend_from_slice(&h.tag.to_le_bytes());
    head.extend_from_slice(&h.seq.to_le_bytes());
    head.extend_from_slice(&(sig.len() as u64).to_le_bytes());
    head.extend_from_slice(sig);
    head.extend_from_slice(&h.len.to_le_bytes());
    stream.write_all(&head)?;
    stream.write_all(body)?;
    stream.flush()
}

fn read_u64(stream: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    stream.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Reads a message's header, leaving its body on the stream: the caller checks the header (and
/// above all the length) against the collective it runs before reading or allocating the body.
fn read_header(stream: &mut impl Read) -> std::io::Result<Header> {
    let tag = read_u64(stream)?;
    let seq = read_u64(stream)?;
    let sig_len = read_u64(stream)?;
    if sig_len > MAX_SIGNATURE {
        return Err(std::io::Error::other(format!(
            "a message header is corrupt (a signature of {sig_len} bytes)"
        )));
    }
    let mut sig = vec![0u8; sig_len as usize];
    stream.read_exact(&mut sig)?;
    let len = read_u64(stream)?;
    Ok(Header {
        tag,
        seq,
        signature: String::from_utf8_lossy(&sig).into_owned(),
        len,
    })
}

/// Reads the body of a message whose header announced `len` bytes (already checked).
fn read_body(stream: &mut impl Read, len: u64) -> std::io::Result<Vec<u8>> {
    let mut body = vec![0u8; len as usize];
    stream.read_exact(&mut body)?;
    Ok(body)
}

/// Bytes on the wire of `n` values (every dtype travels as f32: see [`to_bytes`]).
fn wire_len(n: usize) -> u64 {
    n as u64 * 4
}

fn to_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn from_bytes(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Rounds like a store into a buffer of `dtype` (what the backends do).
fn round(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::F32 => x,
        DType::Bf16 => bf16::from_f32(x).to_f32(),
    }
}

/// Sums `pieces` in order, each partial sum rounded to `dtype` (the `local` transport's order and
/// rounding: copy the first, accumulate the others, then scale for Avg).
fn reduce(dtype: DType, pieces: &[Vec<f32>], op: ReduceOp) -> Vec<f32> {
    let mut acc: Vec<f32> = pieces[0].iter().map(|&x| round(dtype, x)).collect();
    for p in &pieces[1..] {
        for (a, &x) in acc.iter_mut().zip(p) {
            *a = round(dtype, *a + x);
        }
    }
    if op == ReduceOp::Avg {
        let alpha = 1.0 / pieces.len() as f32;
        for a in &mut acc {
            *a = round(dtype, alpha * *a);
        }
    }
    acc
}

fn desc<Buf: Buffer>(b: &Buf) -> String {
    format!("{} x {}", b.len(), b.dtype())
}

impl TcpComm {
    fn label(&self, op: &str, seq: u64) -> String {
        format!("{op} #{seq} on ranks {:?}", self.ranks)
    }

    /// One exchange: sends `outgoing[i]` to group rank `i` (none to itself) and returns what
    /// each group rank sent this one (its own entry is `own`), checking every header.
    fn exchange(
        &self,
        op: &str,
        signature: &str,
        outgoing: Vec<Option<Vec<u8>>>,
        expect_from: &[usize],
        expect_len: u64,
    ) -> Result<Vec<Option<Vec<u8>>>> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let label = self.label(op, seq);
        let world = &self.world;
        let timeout = world.timeout;
        let received = std::thread::scope(|s| -> Result<Vec<Option<Vec<u8>>>> {
            let mut senders = Vec::new();
            for (i, body) in outgoing.into_iter().enumerate() {
                let Some(body) = body else { continue };
                if i == self.me {
                    continue;
                }
                let peer = self.ranks[i];
                let link = world.link(peer)?;
                let header = Header {
                    tag: self.tag,
                    seq,
                    signature: signature.to_string(),
                    len: body.len() as u64,
                };
                let label = &label;
                senders.push(s.spawn(move || -> Result<()> {
                    let mut w = link.writer.lock().unwrap_or_else(PoisonError::into_inner);
                    write_message(&mut w, &header, &body).map_err(|e| {
                        PeerFailed {
                            rank: peer,
                            message: format!(
                                "{label}: sending to rank {peer} failed ({e}): it has failed or \
                                 exited"
                            ),
                        }
                        .into()
                    })
                }));
            }
            let mut got: Vec<Option<Vec<u8>>> = (0..self.ranks.len()).map(|_| None).collect();
            for &i in expect_from {
                if i == self.me {
                    continue;
                }
                let peer = self.ranks[i];
                let link = world.link(peer)?;
                let mut r = link.reader.lock().unwrap_or_else(PoisonError::into_inner);
                let blame = |message: String| -> anyhow::Error {
                    PeerFailed {
                        rank: peer,
                        message,
                    }
                    .into()
                };
                let read_failed = |e: std::io::Error| match e.kind() {
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                        blame(format!(
                        "{label}: rank {peer} sent nothing within {timeout:?} (it is stuck, or \
                         called a different collective)"
                    ))
                    }
                    std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe => blame(format!(
                        "{label}: rank {peer} closed its connection (it failed or exited)"
                    )),
                    _ => anyhow!("{label}: reading from rank {peer}: {e}"),
                };
                let h = read_header(&mut *r).map_err(&read_failed)?;
                if h.tag != self.tag || h.seq != seq || h.signature != signature {
                    bail!(
                        "{label}: the ranks called different collectives or gave buffers of \
                         different lengths or dtypes: rank {peer} sent `{}` (#{}), rank {} called \
                         `{signature}`",
                        h.signature,
                        h.seq,
                        world.rank
                    );
                }
                if h.len != expect_len {
                    bail!(
                        "{label}: rank {peer} announced a message of {} bytes where this \
                         collective expects {expect_len}: refused unread (a corrupt stream, or \
                         not a shardtrain rank)",
                        h.len
                    );
                }
                let body = read_body(&mut *r, h.len).map_err(&read_failed)?;
                got[i] = Some(body);
            }
            for t in senders {
                t.join()
                    .map_err(|_| anyhow!("{label}: a sending thread panicked"))??;
            }
            Ok(got)
        })?;
        Ok(received)
    }

    fn everyone(&self) -> Vec<usize> {
        (0..self.ranks.len()).collect()
    }
}

impl Communicator for TcpComm {
    fn rank(&self) -> usize {
        self.me
    }

    fn world_size(&self) -> usize {
        self.ranks.len()
    }

    fn ranks(&self) -> &[usize] {
        &self.ranks
    }

    fn all_gather<B: Backend>(&self, be: &B, out: &B::Buf, shard: &B::Buf) -> Result<()> {
        let n = shard.len();
        let world = self.ranks.len();
        if let Some(problem) = all_gather_problem(out.len(), n, world) {
            bail!("{problem}");
        }
        let signature = format!("all_gather(out: {}, shard: {})", desc(out), desc(shard));
        let mine = be.download(shard)?;
        let bytes = to_bytes(&mine);
        let outgoing = (0..world).map(|_| Some(bytes.clone())).collect();
        let got = self.exchange(
            "all_gather",
            &signature,
            outgoing,
            &self.everyone(),
            wire_len(n),
        )?;
        let mut full = Vec::with_capacity(n * world);
        for (i, g) in got.into_iter().enumerate() {
            match g {
                Some(b) => full.extend(from_bytes(&b)),
                None if i == self.me => full.extend_from_slice(&mine),
                None => bail!("all_gather: nothing from group rank {i}"),
            }
        }
        be.upload(out, &full)
    }

    fn reduce_scatter<B: Backend>(
        &self,
        be: &B,
        out: &B::Buf,
        full: &B::Buf,
        op: ReduceOp,
    ) -> Result<()> {
        let n = out.len();
        let world = self.ranks.len();
        if let Some(problem) = reduce_scatter_problem(full.len(), n, world) {
            bail!("{problem}");
        }
        let signature = format!(
            "reduce_scatter(out: {}, full: {}, {op})",
            desc(out),
            desc(full)
        );
        let values = be.download(full)?;
        let outgoing = (0..world)
            .map(|i| Some(to_bytes(&values[i * n..(i + 1) * n])))
            .collect();
        let got = self.exchange(
            "reduce_scatter",
            &signature,
            outgoing,
            &self.everyone(),
            wire_len(n),
        )?;
        let pieces: Vec<Vec<f32>> = got
            .into_iter()
            .map(|g| match g {
                Some(b) => from_bytes(&b),
                None => values[self.me * n..(self.me + 1) * n].to_vec(),
            })
            .collect();
        be.upload(out, &reduce(out.dtype(), &pieces, op))
    }

    fn all_reduce<B: Backend>(&self, be: &B, buf: &B::Buf, op: ReduceOp) -> Result<()> {
        let world = self.ranks.len();
        let signature = format!("all_reduce(buf: {}, {op})", desc(buf));
        let mine = be.download(buf)?;
        let bytes = to_bytes(&mine);
        let outgoing = (0..world).map(|_| Some(bytes.clone())).collect();
        let got = self.exchange(
            "all_reduce",
            &signature,
            outgoing,
            &self.everyone(),
            wire_len(buf.len()),
        )?;
        let pieces: Vec<Vec<f32>> = got
            .into_iter()
            .map(|g| g.map_or_else(|| mine.clone(), |b| from_bytes(&b)))
            .collect();
        be.upload(buf, &reduce(buf.dtype(), &pieces, op))
    }

    fn broadcast<B: Backend>(&self, be: &B, buf: &B::Buf, root: usize) -> Result<()> {
        let world = self.ranks.len();
        if root >= world {
            bail!("broadcast: root {root} is not a group rank (the group has {world})");
        }
        let signature = format!("broadcast(buf: {}, root {root})", desc(buf));
        if self.me == root {
            let bytes = to_bytes(&be.download(buf)?);
            let outgoing = (0..world).map(|_| Some(bytes.clone())).collect();
            self.exchange("broadcast", &signature, outgoing, &[], wire_len(buf.len()))?;
            Ok(())
        } else {
            let outgoing = (0..world).map(|_| None).collect();
            let got = self.exchange(
                "broadcast",
                &signature,
                outgoing,
                &[root],
                wire_len(buf.len()),
            )?;
            let bytes = got[root]
                .as_ref()
                .ok_or_else(|| anyhow!("broadcast: nothing from the root"))?;
            be.upload(buf, &from_bytes(bytes))
        }
    }

    fn barrier(&self) -> Result<()> {
        let world = self.ranks.len();
        let outgoing = (0..world).map(|_| Some(Vec::new())).collect();
        self.exchange("barrier", "barrier()", outgoing, &self.everyone(), 0)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    /// Rank 0's world of two, whose rank 1 is a raw socket written by the test.
    fn world_with_raw_peer(timeout: Duration) -> (Arc<TcpWorld>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addrs = vec![
            listener.local_addr().unwrap().to_string(),
            "127.0.0.1:1".to_string(),
        ];
        let mut raw = TcpStream::connect(&addrs[0]).unwrap();
        raw.write_all(HELLO).unwrap();
        raw.write_all(&1u64.to_le_bytes()).unwrap();
        let world = TcpWorld::connect(0, &addrs, listener, timeout, None).unwrap();
        (Arc::new(world), raw)
    }

    #[test]
    fn a_length_other_than_the_collectives_is_refused_unread() {
        let (world, mut raw) = world_with_raw_peer(Duration::from_secs(5));
        let comm = world.group(&[0, 1]).unwrap();
        let be = CpuBackend::<f32>::new();
        let buf = be.alloc(4, DType::F32).unwrap();
        let signature = format!("all_reduce(buf: {}, {})", desc(&buf), ReduceOp::Sum);
        // A header that matches the collective in all but its length: 32 GiB, and no body. The
        // peer keeps the connection open, so only the length check can end the read at once.
        let header = Header {
            tag: comm.tag,
            seq: 0,
            signature,
            len: 32 << 30,
        };
        write_message(&mut raw, &header, &[]).unwrap();
        let t = Instant::now();
        let e = comm.all_reduce(&be, &buf, ReduceOp::Sum).unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains(
                "rank 1 announced a message of 34359738368 bytes where this collective \
                        expects 16"
            ),
            "{e}"
        );
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }

    #[test]
    fn a_corrupt_signature_length_is_refused_unread() {
        let mut bytes = Vec::new();
        for v in [1u64, 0, 1 << 40] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        let e = read_header(&mut &bytes[..]).err().expect("refused");
        assert!(e.to_string().contains("corrupt"), "{e}");
    }
}
