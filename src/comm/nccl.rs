//! The `nccl` transport: one process per GPU, collectives by NCCL on the rank's comm lane (its
//! second CUDA stream), ordered against compute by events like the `local` transport, so the next
//! unit's all-gather runs beside the current unit's kernels.
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

use std::any::Any;
use std::collections::VecDeque;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use cudarc::nccl::{result as nccl, sys};

use super::{
    all_gather_problem, reduce_scatter_problem, Communicator, PeerFailed, Pending, ReduceOp,
};
use crate::backend::cuda::{CudaBackend, CudaBuf, CudaMark};
use crate::backend::{Backend, Buffer, DType};

/// Whether the NCCL library can be loaded; the error says how to make it loadable.
pub fn check_library() -> Result<()> {
    // SAFETY: is_culib_present only tries to open the library.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        bail!(
            "NCCL could not be loaded: shardtrain looks for libnccl.so on the loader path \
             (LD_LIBRARY_PATH, ldconfig). pip's nvidia-nccl wheels ship only libnccl.so.2: link \
             libnccl.so to it in a directory on LD_LIBRARY_PATH"
        )
    }
}

/// A fresh NCCL unique id (on rank 0), as bytes to hand out at the rendezvous.
pub fn new_unique_id() -> Result<Vec<u8>> {
    check_library()?;
    let id = nccl::get_uniqueid().map_err(|e| anyhow!("ncclGetUniqueId: {e:?}"))?;
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

/// A communicator handle that can be aborted from the watchdog thread.
struct RawComm(sys::ncclComm_t);
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
    /// Joins the group `ranks` (global ranks, this rank among them) with the unique id its first
    /// rank drew. Every member must call this; the GPU is `backend`'s.
    pub fn init(
        backend: &CudaBackend,
        ranks: &[usize],
        global_rank: usize,
        unique_id: &[u8],
        timeout: Duration,
    ) -> Result<NcclComm> {
        check_library()?;
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
        backend.bind_context()?;
        let mut comm = std::ptr::null_mut();
        // SAFETY: a valid out-pointer and id; every member of the group makes the same call.
        unsafe {
            nccl::comm_init_rank(
                &mut comm,
                ranks.len() as i32,
                sys::ncclUniqueId { internal },
                me as i32,
            )
        }
        .map_err(|e| anyhow!("ncclCommInitRank for ranks {ranks:?} (rank {global_rank}): {e:?}"))?;
        let comm = Arc::new(RawComm(comm));
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
        op: impl FnOnce(&CudaBackend, sys::cudaStream_t) -> Result<()>,
    ) -> Result<Pending<B>> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let label = format!("{name} #{seq} on ranks {:?}", self.ranks);
        let cuda = (be as &dyn Any)
            .downcast_ref::<CudaBackend>()
            .ok_or_else(|| anyhow!("{label}: NCCL needs the CUDA backend"))?;
        let ready = cuda.record_event()?;
        let lane = cuda.comm_lane();
        lane.wait_event(&ready)?;
        op(lane, lane.raw_stream() as sys::cudaStream_t).map_err(|e| anyhow!("{label}: {e:#}"))?;
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

    fn finish<B: Backend>(&self, be: &B, pending: Pending<B>) -> Result<()> {
        pending.wait(be)
    }
}

fn cuda_buf<'a, B: Backend>(b: &'a B::Buf, what: &str) -> Result<&'a CudaBuf> {
    (b as &dyn Any)
        .downcast_ref::<CudaBuf>()
        .ok_or_else(|| anyhow!("NCCL: `{what}` is not a CUDA buffer"))
}

fn nccl_type(d: DType) -> sys::ncclDataType_t {
    match d {
        DType::F32 => sys::ncclDataType_t::ncclFloat32,
        DType::Bf16 => sys::ncclDataType_t::ncclBfloat16,
    }
}

fn nccl_op(op: ReduceOp) -> sys::ncclRedOp_t {
    match op {
        ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
        ReduceOp::Avg => sys::ncclRedOp_t::ncclAvg,
    }
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

fn nccl_err(e: nccl::NcclError) -> anyhow::Error {
    anyhow!("NCCL: {e:?}")
}

/// Watches the done events in order; past a deadline, aborts the communicator and ends the
/// process (the rank cannot go on: NCCL would wait forever on the dead or hung peer).
fn spawn_watchdog(w: Arc<Watchdog>, comm: Arc<RawComm>, rank: usize) {
    std::thread::Builder::new()
        .name(format!("nccl-watchdog-{rank}"))
        .spawn(move || loop {
            let mut q = w.queue.lock().unwrap_or_else(PoisonError::into_inner);
            while q.is_empty() {
                q = w.wake.wait(q).unwrap_or_else(PoisonError::into_inner);
            }
            let front = q.front().expect("not empty");
            if front.done.is_complete() {
                q.pop_front();
                continue;
            }
            if Instant::now() >= front.deadline {
                let label = front.label.clone();
                eprintln!(
                    "error: rank {rank}: {label} did not complete within its collective timeout \
                     (a peer died or hung); aborting the NCCL communicator"
                );
                // SAFETY: aborting a live communicator from another thread is what NCCL's abort
                // is for; the process ends right after.
                unsafe {
                    let _ = nccl::comm_abort(comm.0);
                }
                std::process::exit(i32::from(PeerFailed::EXIT_CODE));
            }
            drop(q);
            std::thread::sleep(Duration::from_millis(5));
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
        let comm = self.comm.0;
        self.issue(be, "all_gather", |_, stream| {
            // SAFETY: device addresses of live buffers of the checked lengths, on this rank's GPU.
            unsafe {
                nccl::all_gather(
                    s.device_address() as *const c_void,
                    o.device_address() as *mut c_void,
                    s.len(),
                    nccl_type(s.dtype()),
                    comm,
                    stream,
                )
            }
            .map(|_| ())
            .map_err(nccl_err)
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
        let comm = self.comm.0;
        self.issue(be, "reduce_scatter", |_, stream| {
            // SAFETY: as in all_gather.
            unsafe {
                nccl::reduce_scatter(
                    f.device_address() as *const c_void,
                    o.device_address() as *mut c_void,
                    o.len(),
                    nccl_type(o.dtype()),
                    nccl_op(op),
                    comm,
                    stream,
                )
            }
            .map(|_| ())
            .map_err(nccl_err)
        })
    }

    fn all_reduce<B: Backend>(&self, be: &B, buf: &B::Buf, op: ReduceOp) -> Result<()> {
        let b = cuda_buf::<B>(buf, "buf")?;
        let comm = self.comm.0;
        let pending = self.issue(be, "all_reduce", |_, stream| {
            // SAFETY: in place on a live buffer (NCCL allows send == recv for all_reduce).
            unsafe {
                nccl::all_reduce(
                    b.device_address() as *const c_void,
                    b.device_address() as *mut c_void,
                    b.len(),
                    nccl_type(b.dtype()),
                    nccl_op(op),
                    comm,
                    stream,
                )
            }
            .map(|_| ())
            .map_err(nccl_err)
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
        let comm = self.comm.0;
        let pending = self.issue(be, "broadcast", |_, stream| {
            // SAFETY: in place on a live buffer (NCCL allows send == recv for broadcast).
            unsafe {
                nccl::broadcast(
                    b.device_address() as *const c_void,
                    b.device_address() as *mut c_void,
                    b.len(),
                    nccl_type(b.dtype()),
                    root as i32,
                    comm,
                    stream,
                )
            }
            .map(|_| ())
            .map_err(nccl_err)
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
                let _ = nccl::comm_destroy(self.comm.0);
            }
        }
    }
}
