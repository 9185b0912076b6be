//! Collectives between ranks: the [`Communicator`] trait the shard layer is written against, and
//! its transports (`local`: ranks are threads of one process sharing one address space). Data moves
//! only through the Backend's own ops, so a transport serves any backend whose buffers it can reach.

pub mod auth;
pub mod deadline;
pub mod local;
pub mod nccl;
pub mod nccl_init;
pub mod nccl_lib;
pub mod rendezvous;
pub mod tcp;

use anyhow::Result;

use crate::backend::Backend;

pub use local::{run_ranks, LocalComm, LocalWorld};

/// The error of a collective that failed because another rank did (it exited, hung, or called
/// something else): the rank is a victim, not the cause. A process whose error contains one exits
/// with [`PeerFailed::EXIT_CODE`], so a launcher can tell the rank that failed first.
#[derive(Debug, Clone)]
pub struct PeerFailed {
    /// The global rank blamed.
    pub rank: usize,
    pub message: String,
}

impl PeerFailed {
    pub const EXIT_CODE: u8 = 3;
}

impl std::fmt::Display for PeerFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PeerFailed {}

/// A collective that was started but whose results may not be used yet (see
/// [`Communicator::all_gather_start`]). Dropping it without [`Pending::wait`] is a bug: the
/// outputs might be read before they are written.
#[must_use = "wait for a started collective before using its outputs"]
pub struct Pending<B: Backend> {
    /// The work of every rank's comm lane for this collective.
    done: Vec<B::Event>,
}

impl<B: Backend> Pending<B> {
    /// A collective that has already completed.
    pub fn complete() -> Self {
        Pending { done: Vec::new() }
    }

    pub(crate) fn after(done: Vec<B::Event>) -> Self {
        Pending { done }
    }

    /// Orders `be`'s later work after the collective; the host does not wait. After this, the
    /// outputs may be read and the inputs overwritten.
    pub fn wait(self, be: &B) -> Result<()> {
        self.done.iter().try_for_each(|e| be.wait_event(e))
    }
}

/// What is wrong with an all-gather's lengths (`out` must hold `world` shards), if anything: the
/// same message from every transport.
pub fn all_gather_problem(out_len: usize, shard_len: usize, world: usize) -> Option<String> {
    (out_len != shard_len * world).then(|| {
        format!(
            "all_gather: `out` has {out_len} elements, {world} ranks x a shard of {shard_len} need {}",
            shard_len * world
        )
    })
}

/// What is wrong with a reduce-scatter's lengths (`full` must hold `world` pieces), if anything.
pub fn reduce_scatter_problem(full_len: usize, out_len: usize, world: usize) -> Option<String> {
    (full_len != out_len * world).then(|| {
        format!(
            "reduce_scatter: `full` has {full_len} elements, {world} ranks x an `out` of {out_len} need {}",
            out_len * world
        )
    })
}

/// How a reduction combines the ranks' values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    /// The sum over ranks, added in group-rank order 0, 1, 2, ... (deterministic).
    Sum,
    /// The sum (as [`ReduceOp::Sum`]), then scaled by `1 / world_size` (one rounding more).
    Avg,
}

impl std::fmt::Display for ReduceOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Avg => "avg",
        })
    }
}

/// One rank's handle on a group of ranks, through which it takes part in collectives.
///
/// Contract shared by every transport:
/// - every rank of the group calls the same collectives in the same order, with buffers of the
///   same lengths and dtypes (per operand) on every rank; a mismatch, or ranks calling different
///   collectives at the same sequence number, is an error returned on every rank of the group,
///   naming the collective, its sequence number and the ranks;
/// - every collective has a timeout; when a rank fails (an error or a panic reported to the
///   transport, or not arriving in time), every other rank's pending and later collectives return
///   an error naming that rank, never hang;
/// - reductions add in group-rank order, so every rank gets bit-identical results, and a run is
///   reproducible. Each partial sum is stored in the destination buffer's dtype: with bf16 buffers
///   every partial sum is rounded to bf16 (what [`Backend::accumulate`] does on a bf16
///   destination), so `((x0 + x1)_bf16 + x2)_bf16`, not one rounding of the exact sum;
/// - a copy into a destination of another dtype casts, as [`Backend::copy`] does;
/// - outputs must not overlap inputs on the same rank (no in-place all_gather or reduce_scatter;
///   [`Communicator::all_reduce`] and [`Communicator::broadcast`] are in place by definition);
/// - a communicator is used by one thread at a time (the one running its rank).
///
/// The generic methods make the trait not object-safe, on purpose: the shard layer is generic
/// over the communicator type.
pub trait Communicator: Send + Sync {
    /// This rank's index within the group (0-based, in the order of [`Communicator::ranks`]).
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn world_size(&self) -> usize;
    /// Global ranks of the group, in group-rank order.
    fn ranks(&self) -> &[usize];

    /// `shard` has `n` elements on every rank; `out` (`n * world_size` elements) receives group
    /// rank `i`'s shard at `i * n`. `out` must not overlap `shard`.
    fn all_gather<B: Backend>(&self, be: &B, out: &B::Buf, shard: &B::Buf) -> Result<()>;

    /// [`Communicator::all_gather`] that returns once the gather is issued: on a GPU it runs on
    /// the comm lane beside the compute `be` goes on issuing. `out` must not be read, nor `shard`
    /// written, before [`Pending::wait`]. (Transports without async support complete it at once.)
    fn all_gather_start<B: Backend>(
        &self,
        be: &B,
        out: &B::Buf,
        shard: &B::Buf,
    ) -> Result<Pending<B>> {
        self.all_gather(be, out, shard)?;
        Ok(Pending::complete())
    }

    /// `full` has `n * world_size` elements on every rank; `out` (`n` elements) receives the
    /// reduction over ranks of their `full[rank * n .. (rank + 1) * n]` (this rank's piece). Sum
    /// adds in group-rank order, each partial sum stored in `out`'s dtype; Avg is Sum, then a
    /// scale by `1 / world_size`. `out` must not overlap `full`.
    fn reduce_scatter<B: Backend>(
        &self,
        be: &B,
        out: &B::Buf,
        full: &B::Buf,
        op: ReduceOp,
    ) -> Result<()>;

    /// [`Communicator::reduce_scatter`], issued on the comm lane without ordering `be`'s later
    /// work after it: `out` may be read, and `full` overwritten or freed, only after the returned
    /// [`Pending::wait`]. Transports without a comm lane complete it before returning.
    fn reduce_scatter_start<B: Backend>(
        &self,
        be: &B,
        out: &B::Buf,
        full: &B::Buf,
        op: ReduceOp,
    ) -> Result<Pending<B>> {
        self.reduce_scatter(be, out, full, op)?;
        Ok(Pending::complete())
    }

    /// Reduces `buf` over ranks, in place; every rank gets the same result (Sum adds in group-rank
    /// order, each partial sum stored in `buf`'s dtype; Avg is Sum, then a scale by
    /// `1 / world_size`).
    fn all_reduce<B: Backend>(&self, be: &B, buf: &B::Buf, op: ReduceOp) -> Result<()>;

    /// Overwrites `buf` on every rank with `buf` of group rank `root`.
    fn broadcast<B: Backend>(&self, be: &B, buf: &B::Buf, root: usize) -> Result<()>;

    /// Returns once every rank of the group has called it.
    fn barrier(&self) -> Result<()>;
}
