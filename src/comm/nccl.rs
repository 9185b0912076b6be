//! The `nccl` transport: one process per GPU, collectives by NCCL on the rank's comm lane (its
//! second CUDA stream), ordered against compute by events like the `local` transport, so the next
//! unit's all-gather runs beside the current unit's kernels.
//!
//! NCCL itself is called through [`nccl_lib`], which finds libnccl.so.2 by full path (cudarc's
//! loader asks for names pip's wheels and many distributions do not ship). Communicators are
//! non-blocking ([`nccl_init`]): creating one waits at most the collective timeout for the peers,
//! and a collective NCCL is still enqueueing is waited for before its done event is recorded.
//!
//! Communicators: one for the world and one per shard group and replica group this rank is in,
//! each created from a unique id rank 0 draws and hands out at the rendezvous (NCCL's own id
//! exchange through NCCL_COMM_ID fails opaquely; see FACTS.md). Reductions are NCCL's (ring or
//! tree order), so sums are not bit-identical to the `local` and `tcp` transports, which add in
//! rank order.
//!
//! Watchdog: every collective has the job's `collective_timeout_s`. A thread per communicator
//! watches the done event of each issued collective; one that has not finished by its deadline
//! (a rank died or hung: NCCL itself would wait forever) makes the watchdog abort the communicator
//! (ncclCommAbort) and end the process with the collective's name, sequence number and group, and
//! [`PeerFailed::EXIT_CODE`], so the launcher stops the job and names the first rank that failed.
//! A done event that reports a CUDA error is this rank's own failure: the watchdog says so, with
//! the error, aborts, and exits with the ordinary failure code, so the launcher blames this rank.

use std::any::Any;
use std::collections::VecDeque;
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use cudarc::nccl::sys;

use super::nccl_init::{self, Stalled};
use super::nccl_lib::{self, NcclLib};
use super::{
    all_gather_problem, reduce_scatter_problem, Communicator, PeerFailed, Pending, ReduceOp,
};
use crate::backend::cuda::{CudaBackend, CudaBuf, CudaMark};
use crate::backend::{Backend, Buffer, DType};

/// Whether the NCCL library can be loaded; the error says where it was looked for and how to
/// make it loadable.
pub fn check_library() -> Result<()> {
    nccl_lib::get().map(|_| ())
}

/// A fresh NCCL unique id (on rank 0), as bytes to hand out at the rendezvous.
pub fn new_unique_id() -> Result<Vec<u8>> {
    let lib = nccl_lib::get()?;
    let mut id = sys::ncclUniqueId { internal: [0; 128] };
    // SAFETY: a valid out-pointer.
    let code = unsafe { (lib.get_unique_id)(&mut id) };
    lib.check(code, "ncclGetUniqueId")?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

/// One issued collective the watchdog watches.
struct Watched {
    label: String,
    done: CudaMark,
    deadline: Instant,
}

struct Watchdog {
    queue: Mutex<VecDeque<Watched>>,
    wake: Condvar,
}

/// A communicator handle that can be aborted from the watchdog thread, with the library it
/// belongs to.
struct RawComm {
    comm: sys::ncclComm_t,
    lib: &'static NcclLib,
}
// SAFETY: NCCL communicators may be used from another thread for ncclCommAbort, which is what
// the watchdog does; every other use is from the rank's own thread.
unsafe impl Send for RawComm {}
// SAFETY: as above.
unsafe impl Sync for RawComm {}

/// One rank's NCCL communicator for one group.
pub struct NcclComm {
    comm: Arc<RawComm>,
    ranks: Vec<usize>,
    me: usize,
    seq: AtomicU64,
    timeout: Duration,
    watchdog: Arc<Watchdog>,
    /// A stream of its own and a one-element buffer, for host-side barriers.
    barrier_backend: CudaBackend,
    barrier_buf: CudaBuf,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclComm(ranks {:?}, me {})", self.ranks, self.me)
    }
}

impl NcclComm {
    /// Joins the group `ranks` (global ranks, this rank among them) with the unique id drawn for
    /// this communicator. Every member must call this; the GPU is `backend`'s. Waits at most
    /// `timeout` for the other members (see [`nccl_init`]).
    pub fn init(
        backend: &CudaBackend,
        ranks: &[usize],
        global_rank: usize,
        unique_id: &[u8],
        timeout: Duration,
    ) -> Result<NcclComm> {
        let lib = nccl_lib::get()?;
        let me = ranks
            .iter()
            .position(|&r| r == global_rank)
            .ok_or_else(|| anyhow!("rank {global_rank} is not in the group {ranks:?}"))?;
        if unique_id.len() != 128 {
            bail!("an NCCL unique id has 128 bytes, got {}", unique_id.len());
        }
        let mut internal = [0 as std::ffi::c_char; 128];
        for (d, &s) in internal.iter_mut().zip(unique_id) {
            *d = s as std::ffi::c_char;
        }
        // NCCL takes the calling thread's current device.
        backend.bind_context()?;
        let comm = nccl_init::init_comm(lib, ranks, me, sys::ncclUniqueId { internal }, timeout)?;
        let comm = Arc::new(RawComm { comm, lib });
        let watchdog = Arc::new(Watchdog {
            queue: Mutex::new(VecDeque::new()),
            wake: Condvar::new(),
        });
        spawn_watchdog(watchdog.clone(), comm.clone(), global_rank);
        let barrier_backend = CudaBackend::new(backend.device())?;
        let barrier_buf = barrier_backend.alloc(1, DType::F32)?;
        Ok(NcclComm {
            comm,
            ranks: ranks.to_vec(),
            me,
            seq: AtomicU64::new(0),
            timeout,
            watchdog,
            barrier_backend,
            barrier_buf,
        })
    }

    /// Issues `op` on the comm lane after the compute's work so far, and returns its completion.
    fn issue<B: Backend>(
        &self,
        be: &B,
        name: &str,
        op: impl FnOnce(&CudaBackend, sys::cudaStream_t) -> c_int,
    ) -> Result<Pending<B>> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let label = format!("{name} #{seq} on ranks {:?}", self.ranks);
        let cuda = (be as &dyn Any)
            .downcast_ref::<CudaBackend>()
            .ok_or_else(|| anyhow!("{label}: NCCL needs the CUDA backend"))?;
        let ready = cuda.record_event()?;
        let lane = cuda.comm_lane();
        lane.wait_event(&ready)?;
        let code = op(lane, lane.raw_stream()? as sys::cudaStream_t);
        self.enqueued(code, &label)?;
        // Only now are NCCL's kernels on the lane: the done event must come after them.
        let done = lane.record_event()?;
        let mut q = self
            .watchdog
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        q.push_back(Watched {
            label,
            done: done.clone(),
            deadline: Instant::now() + self.timeout,
        });
        self.watchdog.wake.notify_one();
        drop(q);
        // The caller's backend type is CudaBackend (checked above), so its events are CudaMarks.
        let done: Box<dyn Any> = Box::new(done);
        let done = *done
            .downcast::<B::Event>()
            .map_err(|_| anyhow!("NCCL: the backend's event type is not CUDA's"))?;
        Ok(Pending::after(vec![done]))
    }

    /// Handles a collective's return code. A non-blocking communicator may answer ncclInProgress
    /// before the kernels are on the stream: wait for NCCL to finish enqueueing, up to the
    /// collective timeout (it may be connecting to peers). Past it, or on an error NCCL reports
    /// meanwhile, the communicator is in an unknown state: abort it and end the process, as the
    /// watchdog does.
    fn enqueued(&self, code: c_int, label: &str) -> Result<()> {
        let lib = self.comm.lib;
        match code {
            nccl_lib::NCCL_SUCCESS => Ok(()),
            nccl_lib::NCCL_IN_PROGRESS => {
                let deadline = Instant::now() + self.timeout;
                // SAFETY: our live communicator.
                match unsafe { nccl_init::wait_ready(lib, self.comm.comm, deadline) } {
                    Ok(()) => Ok(()),
                    Err(Stalled::TimedOut) => abort_and_exit(
                        &self.comm,
                        self.ranks[self.me],
                        &format!(
                            "{label} was not enqueued within its collective timeout (a peer did \
                             not connect)"
                        ),
                        PeerFailed::EXIT_CODE,
                    ),
                    Err(Stalled::Failed(e)) => abort_and_exit(
                        &self.comm,
                        self.ranks[self.me],
                        &format!("{label}: {}: {}", lib.describe(e), lib.last_error()),
                        if e == nccl_lib::NCCL_REMOTE_ERROR {
                            PeerFailed::EXIT_CODE
                        } else {
                            LOCAL_FAILURE_EXIT_CODE
                        },
                    ),
                }
            }
            failed => lib.check(failed, label),
        }
    }

    fn finish<B: Backend>(&self, be: &B, pending: Pending<B>) -> Result<()> {
        pending.wait(be)
    }
}

fn cuda_buf<'a, B: Backend>(b: &'a B::Buf, what: &str) -> Result<&'a CudaBuf> {
    (b as &dyn Any)
        .downcast_ref::<CudaBuf>()
        .ok_or_else(|| anyhow!("NCCL: `{what}` is not a CUDA buffer"))
}

/// ncclDataType_t, as the int the entry points take.
fn nccl_type(d: DType) -> c_int {
    (match d {
        DType::F32 => sys::ncclDataType_t::ncclFloat32,
        DType::Bf16 => sys::ncclDataType_t::ncclBfloat16,
    }) as c_int
}

/// ncclRedOp_t, likewise.
fn nccl_op(op: ReduceOp) -> c_int {
    (match op {
        ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
        ReduceOp::Avg => sys::ncclRedOp_t::ncclAvg,
    }) as c_int
}

fn same_dtype(op: &str, a: &CudaBuf, b: &CudaBuf) -> Result<()> {
    if a.dtype() != b.dtype() {
        bail!(
            "{op}: NCCL moves one dtype: {} and {} (cast first)",
            a.dtype(),
            b.dtype()
        );
    }
    Ok(())
}

/// The exit code of a rank whose own GPU failed a collective: the CLI's "the run failed" (1), a
/// root cause, so never [`PeerFailed::EXIT_CODE`], which tells the launcher to blame another rank.
const LOCAL_FAILURE_EXIT_CODE: u8 = 1;

/// What the watchdog does about the oldest collective it watches.
#[derive(Debug, PartialEq)]
enum Verdict {
    /// Finished: stop watching it.
    Done,
    /// Not finished, within its deadline: look again shortly.
    Wait,
    /// Not finished by its deadline: a peer died or hung (NCCL would wait forever).
    TimedOut,
    /// The done event reports a CUDA error: the collective, or work before it, failed on this
    /// rank's GPU. Checked before the deadline, so a local fault is never blamed on a peer.
    LocalError(String),
}

/// Judges one query of a collective's done event (see [`CudaMark::query`]).
fn judge(query: Result<bool>, now: Instant, deadline: Instant) -> Verdict {
    match query {
        Ok(true) => Verdict::Done,
        Err(e) => Verdict::LocalError(format!("{e:#}")),
        Ok(false) if now >= deadline => Verdict::TimedOut,
        Ok(false) => Verdict::Wait,
    }
}

/// Says why, aborts the communicator and ends the process with `code`: the rank cannot go on.
fn abort_and_exit(comm: &RawComm, rank: usize, message: &str, code: u8) -> ! {
    eprintln!("error: rank {rank}: {message}; aborting the NCCL communicator");
    // SAFETY: aborting a live communicator, from any thread, is what NCCL's abort is for; the
    // process ends right after, so nothing uses it again.
    unsafe {
        let _ = (comm.lib.comm_abort)(comm.comm);
    }
    std::process::exit(i32::from(code))
}

/// Watches the done events in order; past a deadline, or on a CUDA error, aborts the
/// communicator and ends the process (the rank cannot go on: NCCL would wait forever on the dead
/// or hung peer, and a failed GPU context takes every later call down with it).
fn spawn_watchdog(w: Arc<Watchdog>, comm: Arc<RawComm>, rank: usize) {
    std::thread::Builder::new()
        .name(format!("nccl-watchdog-{rank}"))
        .spawn(move || loop {
            let mut q = w.queue.lock().unwrap_or_else(PoisonError::into_inner);
            while q.is_empty() {
                q = w.wake.wait(q).unwrap_or_else(PoisonError::into_inner);
            }
            let front = q.front().expect("not empty");
            let (message, code) = match judge(front.done.query(), Instant::now(), front.deadline) {
                Verdict::Done => {
                    q.pop_front();
                    continue;
                }
                Verdict::Wait => {
                    drop(q);
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Verdict::TimedOut => (
                    format!(
                        "{} did not complete within its collective timeout (a peer died or hung)",
                        front.label
                    ),
                    PeerFailed::EXIT_CODE,
                ),
                Verdict::LocalError(e) => (
                    format!("{} failed on this rank's GPU: {e}", front.label),
                    LOCAL_FAILURE_EXIT_CODE,
                ),
            };
            abort_and_exit(&comm, rank, &message, code)
        })
        .expect("spawning the NCCL watchdog thread");
}

impl Communicator for NcclComm {
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
        let pending = self.all_gather_start(be, out, shard)?;
        self.finish(be, pending)
    }

    fn all_gather_start<B: Backend>(
        &self,
        be: &B,
        out: &B::Buf,
        shard: &B::Buf,
    ) -> Result<Pending<B>> {
        let (o, s) = (cuda_buf::<B>(out, "out")?, cuda_buf::<B>(shard, "shard")?);
        same_dtype("all_gather", o, s)?;
        if let Some(problem) = all_gather_problem(o.len(), s.len(), self.ranks.len()) {
            bail!("{problem}");
        }
        let c = &self.comm;
        self.issue(be, "all_gather", |_, stream| {
            // SAFETY: device addresses of live buffers of the checked lengths, on this rank's GPU.
            unsafe {
                (c.lib.all_gather)(
                    s.device_address() as *const c_void,
                    o.device_address() as *mut c_void,
                    s.len(),
                    nccl_type(s.dtype()),
                    c.comm,
                    stream,
                )
            }
        })
    }

    fn reduce_scatter<B: Backend>(
        &self,
        be: &B,
        out: &B::Buf,
        full: &B::Buf,
        op: ReduceOp,
    ) -> Result<()> {
        let pending = self.reduce_scatter_start(be, out, full, op)?;
        self.finish(be, pending)
    }

    fn reduce_scatter_start<B: Backend>(
        &self,
        be: &B,
        out: &B::Buf,
        full: &B::Buf,
        op: ReduceOp,
    ) -> Result<Pending<B>> {
        let (o, f) = (cuda_buf::<B>(out, "out")?, cuda_buf::<B>(full, "full")?);
        same_dtype("reduce_scatter", o, f)?;
        if let Some(problem) = reduce_scatter_problem(f.len(), o.len(), self.ranks.len()) {
            bail!("{problem}");
        }
        let c = &self.comm;
        self.issue(be, "reduce_scatter", |_, stream| {
            // SAFETY: as in all_gather.
            unsafe {
                (c.lib.reduce_scatter)(
                    f.device_address() as *const c_void,
                    o.device_address() as *mut c_void,
                    o.len(),
                    nccl_type(o.dtype()),
                    nccl_op(op),
                    c.comm,
                    stream,
                )
            }
        })
    }

    fn all_reduce<B: Backend>(&self, be: &B, buf: &B::Buf, op: ReduceOp) -> Result<()> {
        let b = cuda_buf::<B>(buf, "buf")?;
        let c = &self.comm;
        let pending = self.issue(be, "all_reduce", |_, stream| {
            // SAFETY: in place on a live buffer (NCCL allows send == recv for all_reduce).
            unsafe {
                (c.lib.all_reduce)(
                    b.device_address() as *const c_void,
                    b.device_address() as *mut c_void,
                    b.len(),
                    nccl_type(b.dtype()),
                    nccl_op(op),
                    c.comm,
                    stream,
                )
            }
        })?;
        self.finish(be, pending)
    }

    fn broadcast<B: Backend>(&self, be: &B, buf: &B::Buf, root: usize) -> Result<()> {
        if root >= self.ranks.len() {
            bail!(
                "broadcast: root {root} is not a group rank (the group has {})",
                self.ranks.len()
            );
        }
        let b = cuda_buf::<B>(buf, "buf")?;
        let c = &self.comm;
        let pending = self.issue(be, "broadcast", |_, stream| {
            // SAFETY: in place on a live buffer (NCCL allows send == recv for broadcast).
            unsafe {
                (c.lib.broadcast)(
                    b.device_address() as *const c_void,
                    b.device_address() as *mut c_void,
                    b.len(),
                    nccl_type(b.dtype()),
                    root as c_int,
                    c.comm,
                    stream,
                )
            }
        })?;
        self.finish(be, pending)
    }

    fn barrier(&self) -> Result<()> {
        // NCCL has no barrier: a one-element all-reduce on a stream of the communicator's own,
        // waited for by the host (the watchdog covers a peer that never comes).
        let be = &self.barrier_backend;
        self.all_reduce(be, &self.barrier_buf, ReduceOp::Sum)?;
        be.synchronize()
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // Only the last handle destroys the communicator; the watchdog thread holds another.
        if Arc::strong_count(&self.comm) <= 2 {
            // SAFETY: no collective is issued after the owner drops its handle.
            unsafe {
                let _ = (self.comm.lib.comm_destroy)(self.comm.comm);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_tells_a_local_error_from_a_late_peer() {
        let now = Instant::now();
        let later = now + Duration::from_secs(1);
        assert_eq!(judge(Ok(true), now, later), Verdict::Done);
        assert_eq!(judge(Ok(true), later, now), Verdict::Done);
        assert_eq!(judge(Ok(false), now, later), Verdict::Wait);
        assert_eq!(judge(Ok(false), later, now), Verdict::TimedOut);
        assert_eq!(judge(Ok(false), now, now), Verdict::TimedOut);
        // A device error is this rank's own, before and after the deadline alike.
        for (at, deadline) in [(now, later), (later, now)] {
            let v = judge(Err(anyhow!("CUDA_ERROR_ILLEGAL_ADDRESS")), at, deadline);
            assert_eq!(
                v,
                Verdict::LocalError("CUDA_ERROR_ILLEGAL_ADDRESS".to_string())
            );
        }
        // The launcher blames the first rank that did not exit with PeerFailed's code.
        assert_ne!(LOCAL_FAILURE_EXIT_CODE, PeerFailed::EXIT_CODE);
    }
}
