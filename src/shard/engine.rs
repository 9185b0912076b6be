//! The sharding engine of one rank: owns this rank's parameter and gradient shards, and serves
//! the model's [`UnitAccess`] calls by gathering units before use, freeing them after, and
//! reducing their gradients, as the [`ShardPlan`] says.
//!
//! The schedule is explicit: when the model asks for unit `u`, the engine gathers it (unless a
//! prefetch already did) and then issues the gather of the unit that runs next, *before* handing
//! `u` over, so on a backend with a communication stream that gather overlaps `u`'s compute. On
//! the CPU it runs in that same order, synchronously. Gradients go the other way: when a block's
//! backward is done its reduce-scatter is issued on the comm lane, and the compute queue waits for
//! it (to add it into the gradient shard) only after the next unit's backward has been issued, so
//! the two run side by side; the root's, the last of the backward, is completed at once, so the
//! gradient shards are whole when the backward returns. Every step is recorded in an optional
//! trace.
//!
//! For phase timing (`shardtrain bench`), the engine can also bracket every collective call with
//! timing marks on the compute queue ([`ShardedUnits::time_collectives`]): the time between the
//! two marks is how long the compute queue waited for that communication (see `train::phases`).
//! Off by default, when it costs one branch per collective.

use anyhow::{Context, Result};

use super::flat::ShardLayout;
use super::plan::ShardPlan;
use crate::backend::{Backend, Buffer, DType, TimingMark};
use crate::comm::{Communicator, Pending, ReduceOp};
use crate::model::{ParamLayout, UnitAccess};

/// The communicators one rank needs: everyone, its shard group, its replica group.
pub struct RankComms<C> {
    pub world: C,
    pub shard: C,
    pub replica: C,
}

/// One step of the schedule, for tests and diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// All-gather of a unit's parameters issued.
    Gather(usize),
    /// A unit's full parameters handed to the model (its compute starts).
    Use(usize),
    /// A unit's gathered parameters freed.
    Free(usize),
    /// A unit's gradient reduction issued (added into this rank's gradient shard once the next
    /// unit's backward has been issued, or at the end of the backward).
    ReduceGrads(usize),
}

/// Which pass the model is running: decides what "the next unit" is for prefetching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    Forward,
    Backward,
}

/// Bytes of transient buffers (gathered parameters, unsharded gradients), now and at peak.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransientBytes {
    pub gathered_now: usize,
    pub gathered_peak: usize,
    pub grads_now: usize,
    pub grads_peak: usize,
}

pub struct ShardedUnits<B: Backend, C: Communicator> {
    plan: ShardPlan,
    shards: ShardLayout,
    comms: RankComms<C>,
    /// Per unit: this rank's shard of the parameters in the compute dtype (the all-gather source).
    pub param_shards: Vec<B::Buf>,
    /// Per unit: this rank's f32 gradient shard, accumulated over the micro-batches of a step.
    pub grad_shards: Vec<B::Buf>,
    /// Per unit: the gathered, padded parameters while they are live, with the gather's pending
    /// completion until the first use waits for it.
    gathered: Vec<Option<Gathered<B>>>,
    /// Per unit: unsharded gradients (reduce dtype) while the backward fills them.
    full_grads: Vec<Option<B::Buf>>,
    /// Gradients go straight into the gradient shards: nothing to reduce (one rank, f32 reduce).
    direct_grads: bool,
    /// Reduce gradients at the end of this micro-batch's backward.
    sync: bool,
    /// Gradient reductions issued on the comm lane and not yet added into the gradient shards,
    /// oldest first (at most two: the one running beside a unit's backward, and that unit's).
    in_flight: Vec<InFlight<B>>,
    pass: Pass,
    bytes: TransientBytes,
    trace: Option<Vec<Event>>,
    /// The collectives' brackets since they were last taken, when timing them is on.
    comm_brackets: Option<Vec<CommBracket<B>>>,
}

/// A unit's gathered parameters, with the gather's completion until its first use waits for it.
type Gathered<B> = (<B as Backend>::Buf, Option<Pending<B>>);

/// A unit's gradient reduction in flight: the unsharded gradients it reads (kept alive until it
/// completes), the piece it writes, and its completion.
struct InFlight<B: Backend> {
    unit: usize,
    full: B::Buf,
    piece: B::Buf,
    pending: Pending<B>,
}

/// Timing marks on the compute queue just before and just after one collective call.
pub type CommBracket<B> = (
    TimingMark<<B as Backend>::Event>,
    TimingMark<<B as Backend>::Event>,
);

fn size_of<B: Buffer>(b: &B) -> usize {
    b.len() * b.dtype().size_bytes()
}

impl<B: Backend, C: Communicator> ShardedUnits<B, C> {
    /// Allocates this rank's shards (zeroed; the caller loads initial values).
    pub fn new(be: &B, layout: &ParamLayout, plan: ShardPlan, comms: RankComms<C>) -> Result<Self> {
        let shards = ShardLayout::new(layout, plan.group_size);
        let alloc = |dtype: DType| -> Result<Vec<B::Buf>> {
            shards
                .units
                .iter()
                .map(|u| be.alloc(u.shard_len, dtype))
                .collect()
        };
        let n = shards.units.len();
        let direct_grads =
            plan.group_size == 1 && plan.replicas() == 1 && plan.reduce_dtype == DType::F32;
        Ok(ShardedUnits {
            param_shards: alloc(plan.param_dtype)?,
            grad_shards: alloc(DType::F32)?,
            gathered: (0..n).map(|_| None).collect(),
            full_grads: vec![None; n],
            direct_grads,
            sync: true,
            in_flight: Vec::new(),
            pass: Pass::Forward,
            bytes: TransientBytes::default(),
            trace: None,
            comm_brackets: None,
            plan,
            shards,
            comms,
        })
    }

    pub fn plan(&self) -> &ShardPlan {
        &self.plan
    }

    pub fn shard_layout(&self) -> &ShardLayout {
        &self.shards
    }

    pub fn comms(&self) -> &RankComms<C> {
        &self.comms
    }

    /// This rank's position inside its shard group.
    pub fn group_rank(&self) -> usize {
        self.comms.shard.rank()
    }

    /// Starts recording the schedule.
    pub fn record_trace(&mut self) {
        self.trace = Some(Vec::new());
    }

    pub fn take_trace(&mut self) -> Vec<Event> {
        self.trace.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Starts (or stops) bracketing every collective call with timing marks on the compute queue.
    pub fn time_collectives(&mut self, on: bool) {
        self.comm_brackets = on.then(Vec::new);
    }

    /// The collectives' brackets recorded since the last call, in issue order.
    pub fn take_comm_brackets(&mut self) -> Vec<CommBracket<B>> {
        self.comm_brackets
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// The opening mark of a collective's bracket (`None` when collectives are not timed).
    fn comm_begin(&self, be: &B) -> Result<Option<TimingMark<B::Event>>> {
        match self.comm_brackets {
            Some(_) => be.timing_mark().map(Some),
            None => Ok(None),
        }
    }

    /// Closes a collective's bracket opened by [`Self::comm_begin`].
    fn comm_end(&mut self, be: &B, begin: Option<TimingMark<B::Event>>) -> Result<()> {
        if let (Some(begin), Some(brackets)) = (begin, self.comm_brackets.as_mut()) {
            brackets.push((begin, be.timing_mark()?));
        }
        Ok(())
    }

    pub fn transient_bytes(&self) -> TransientBytes {
        self.bytes
    }

    /// Records a schedule step: in the trace when one is being recorded, and as a debug log line
    /// (`RUST_LOG=shardtrain::shard=debug` shows every rank's schedule).
    fn log(&mut self, e: Event) {
        tracing::debug!(rank = self.comms.world.rank(), event = ?e, "schedule");
        if let Some(t) = &mut self.trace {
            t.push(e);
        }
    }

    /// Before a micro-batch's forward: `sync` says whether its backward reduces gradients (the
    /// last micro-batch of a step always does; others only when the plan reduces every time).
    pub fn start_micro_batch(&mut self, last_of_step: bool) {
        self.sync = last_of_step || self.plan.reduce_every_micro_batch;
        self.pass = Pass::Forward;
    }

    /// Before the backward pass of the current micro-batch.
    pub fn start_backward(&mut self) {
        self.pass = Pass::Backward;
    }

    /// Frees every gathered unit (after an optimizer step they are stale).
    pub fn release_all(&mut self, be: &B) -> Result<()> {
        for u in 0..self.gathered.len() {
            self.free_params(be, u)?;
        }
        Ok(())
    }

    /// Zeroes the gradient shards before a step's first micro-batch.
    pub fn zero_grads(&self, be: &B) -> Result<()> {
        self.grad_shards.iter().try_for_each(|g| be.fill(g, 0.0))
    }

    /// Units run in this order: root (0), blocks 1..n in forward; root (head), blocks n..1, then
    /// root again (embedding) in backward.
    fn next_unit(&self, unit: usize) -> Option<usize> {
        let last = self.shards.units.len() - 1;
        match self.pass {
            Pass::Forward => (unit < last).then_some(unit + 1),
            Pass::Backward => match unit {
                0 => (last >= 1).then_some(last),
                1 => None,
                u => Some(u - 1),
            },
        }
    }

    /// Issues the gather of `unit` unless it is gathered or in flight (one rank: nothing to
    /// gather). The gather runs on the comm lane; [`Self::wait_gathered`] orders its use.
    fn start_gather(&mut self, be: &B, unit: usize) -> Result<()> {
        if self.plan.group_size == 1 || self.gathered[unit].is_some() {
            return Ok(());
        }
        let full = be.alloc(self.shards.units[unit].padded, self.plan.param_dtype)?;
        let timed = self.comm_begin(be)?;
        let pending = self
            .comms
            .shard
            .all_gather_start(be, &full, &self.param_shards[unit])
            .with_context(|| format!("gathering the parameters of unit {unit}"))?;
        self.comm_end(be, timed)?;
        self.bytes.gathered_now += size_of(&full);
        self.bytes.gathered_peak = self.bytes.gathered_peak.max(self.bytes.gathered_now);
        self.gathered[unit] = Some((full, Some(pending)));
        self.log(Event::Gather(unit));
        Ok(())
    }

    /// Orders the compute after `unit`'s gather (the host does not wait).
    fn wait_gathered(&mut self, be: &B, unit: usize) -> Result<()> {
        let pending = self.gathered[unit]
            .as_mut()
            .and_then(|(_, pending)| pending.take());
        if let Some(p) = pending {
            let timed = self.comm_begin(be)?;
            p.wait(be)
                .with_context(|| format!("waiting for the gather of unit {unit}"))?;
            self.comm_end(be, timed)?;
        }
        Ok(())
    }

    fn free_params(&mut self, be: &B, unit: usize) -> Result<()> {
        // A prefetched unit that was never used still has peers reading into it: wait first, so
        // its memory is released after the gather.
        self.wait_gathered(be, unit)?;
        if let Some((buf, _)) = self.gathered[unit].take() {
            self.bytes.gathered_now -= size_of(&buf);
            self.log(Event::Free(unit));
        }
        Ok(())
    }

    /// Issues the reduction of this micro-batch's unsharded gradients of `unit` over the shard
    /// group (a reduce-scatter on the comm lane, which the compute queue does not wait for:
    /// [`Self::finish_reductions`] adds it into the gradient shard later).
    fn start_reduction(&mut self, be: &B, unit: usize) -> Result<()> {
        let Some(full) = self.full_grads[unit].take() else {
            return Ok(());
        };
        let (piece, pending) = if self.plan.group_size > 1 {
            let piece = be.alloc(self.shards.units[unit].shard_len, self.plan.reduce_dtype)?;
            let timed = self.comm_begin(be)?;
            let pending = self
                .comms
                .shard
                .reduce_scatter_start(be, &piece, &full, ReduceOp::Sum)
                .with_context(|| format!("reduce-scattering the gradients of unit {unit}"))?;
            self.comm_end(be, timed)?;
            (piece, pending)
        } else {
            (full.clone(), Pending::complete())
        };
        self.in_flight.push(InFlight {
            unit,
            full,
            piece,
            pending,
        });
        self.log(Event::ReduceGrads(unit));
        Ok(())
    }

    /// Completes every in-flight reduction but the newest `keep`, oldest first: the compute queue
    /// waits for its reduce-scatter, all-reduces it across replicas (hybrid_shard), and adds it
    /// into this rank's f32 gradient shard.
    fn finish_reductions(&mut self, be: &B, keep: usize) -> Result<()> {
        while self.in_flight.len() > keep {
            let r = self.in_flight.remove(0);
            let unit = r.unit;
            let timed = self.comm_begin(be)?;
            r.pending
                .wait(be)
                .with_context(|| format!("waiting for the gradients of unit {unit}"))?;
            self.comm_end(be, timed)?;
            if self.plan.replicas() > 1 {
                let timed = self.comm_begin(be)?;
                self.comms
                    .replica
                    .all_reduce(be, &r.piece, ReduceOp::Sum)
                    .with_context(|| {
                        format!("all-reducing the gradients of unit {unit} across replicas")
                    })?;
                self.comm_end(be, timed)?;
            }
            be.accumulate(&self.grad_shards[unit], &r.piece)?;
            self.bytes.grads_now -= size_of(&r.full);
        }
        Ok(())
    }

    /// Sum of squares of this rank's gradient shards, summed over the shard group: the squared
    /// global gradient norm (replicas hold identical shards, so they are not added again).
    pub fn grad_norm_squared(&mut self, be: &B) -> Result<f32> {
        let acc = be.alloc(1, DType::F32)?;
        for g in &self.grad_shards {
            be.sum_squares(&acc, g)?;
        }
        if self.plan.group_size > 1 {
            let timed = self.comm_begin(be)?;
            self.comms.shard.all_reduce(be, &acc, ReduceOp::Sum)?;
            self.comm_end(be, timed)?;
        }
        Ok(be.download(&acc)?[0])
    }

    /// The full f32 values of every unit from `master` shards (one per unit), on every rank.
    pub fn gather_full(&self, be: &B, master: &[B::Buf]) -> Result<Vec<Vec<f32>>> {
        self.shards
            .units
            .iter()
            .zip(master)
            .map(|(u, shard)| {
                let values = if self.plan.group_size > 1 {
                    let full = be.alloc(u.padded, DType::F32)?;
                    self.comms.shard.all_gather(be, &full, shard)?;
                    be.download(&full)?
                } else {
                    be.download(shard)?
                };
                Ok(values[..u.numel].to_vec())
            })
            .collect()
    }
}

impl<B: Backend, C: Communicator> UnitAccess<B> for ShardedUnits<B, C> {
    fn params(&mut self, be: &B, unit: usize) -> Result<B::Buf> {
        self.start_gather(be, unit)?;
        // The next unit's gather is issued before this unit's compute, so it runs beside it.
        if self.plan.prefetch {
            if let Some(next) = self.next_unit(unit) {
                self.start_gather(be, next)?;
            }
        }
        self.wait_gathered(be, unit)?;
        self.log(Event::Use(unit));
        let numel = self.shards.units[unit].numel;
        let full = match &self.gathered[unit] {
            Some((buf, _)) => buf,
            None => &self.param_shards[unit],
        };
        be.slice(full, 0, numel)
    }

    fn grads(&mut self, be: &B, unit: usize) -> Result<B::Buf> {
        let numel = self.shards.units[unit].numel;
        if self.direct_grads {
            return be.slice(&self.grad_shards[unit], 0, numel);
        }
        if self.full_grads[unit].is_none() {
            let buf = be.alloc(self.shards.units[unit].padded, self.plan.reduce_dtype)?;
            self.bytes.grads_now += size_of(&buf);
            self.bytes.grads_peak = self.bytes.grads_peak.max(self.bytes.grads_now);
            self.full_grads[unit] = Some(buf);
        }
        let full = self.full_grads[unit].as_ref().expect("allocated above");
        be.slice(full, 0, numel)
    }

    fn forward_done(&mut self, be: &B, unit: usize) -> Result<()> {
        // The root unit is needed again as soon as the backward starts: keep it (FSDP's root).
        if self.plan.reshard_after_forward && unit != ParamLayout::EMBED_HEAD_UNIT {
            self.free_params(be, unit)?;
        }
        Ok(())
    }

    fn backward_done(&mut self, be: &B, unit: usize) -> Result<()> {
        if self.sync {
            self.start_reduction(be, unit)?;
            // The previous unit's reduce-scatter ran beside this unit's backward: add it in now,
            // and leave this unit's to run beside the next unit's. Not for the root, the last
            // unit of the backward (after the embedding): nothing is left to run beside it, and
            // the gradient shards must be whole when the backward returns. Nor without a shard
            // group, where there is no reduce-scatter and holding the gradients only costs memory.
            let overlap = unit != ParamLayout::EMBED_HEAD_UNIT && self.plan.group_size > 1;
            let keep = usize::from(overlap);
            self.finish_reductions(be, keep)?;
        }
        self.free_params(be, unit)
    }
}
