//! Communication overlap, proven on the CPU: the sharding engine and the local transport order
//! their work so that, on a device with a second queue, every all-gather runs beside compute.
//!
//! The CPU backend finishes every op before it returns, so overlap cannot be timed here; instead
//! [`Lanes`] models the two queues of one rank. It wraps `CpuBackend<f32>` (every op delegates
//! unchanged) and logs, into one log shared by every rank, each op with the queue it was issued
//! on ("compute", or "comm": the instance `comm_lane()` returns), each `record_event` with the
//! fresh id it returns, and each `wait_event` with the id waited for. Ops of one queue run in
//! issue order, and a queue's work after `Wait{id}` starts only after the work before
//! `Record{id}`: from the log alone we can tell what a GPU could run concurrently.
//!
//! Which log entries belong to which unit: the model reaches its parameters only through
//! `UnitAccess`, so the tests hand it a wrapper ([`Marked`]) that writes a marker into the same log
//! when each `params`/`grads`/`*_done` call is entered and left, plus the engine's own schedule
//! steps (its `record_trace` events, drained after each call). Every collective the engine issues
//! inside `params(u)` is an all-gather (nothing else calls `all_gather_start`), and the engine
//! logs `Gather(x)` right after each one is issued, so the k-th comm-lane block inside a `params`
//! call is the gather of the k-th `Gather(x)` drained after that call (the counts must agree).
//! A unit's compute is the compute-queue ops between `params(u)` returning and the next `params`
//! call.
//! Both the markers and the entries of one rank are pushed by that rank's thread, so their order
//! in the log is that rank's program order.
//!
//! A collective is identified across ranks by the set of ready events its lanes wait for; its
//! done events are the ones those lanes record.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

mod common;

use anyhow::Result;
use common::small_config;
use shardtrain::backend::cpu::{CpuBackend, CpuBuf, CpuIds};
use shardtrain::backend::{AdamWStep, AttentionShape, Backend, DType, MatmulSpec};
use shardtrain::comm::local::{run_ranks, LocalComm, LocalWorld};
use shardtrain::comm::Communicator;
use shardtrain::config::{Config, ShardStrategy};
use shardtrain::data::synthetic::{ArithmeticCorpus, Split};
use shardtrain::data::DataSource;
use shardtrain::model::{Gpt, ParamLayout, UnitAccess};
use shardtrain::shard::{Event, RankComms, ShardPlan, ShardedUnits};
use shardtrain::train::optimizer::{AdamW, AdamWConfig};
use shardtrain::train::{gpt_shape, initial_weights};

const COMPUTE: &str = "compute";
const COMM: &str = "comm";
const WORLD: usize = 2;
/// Blocks of the test model: units 0 (embeddings/head) and 1..=3.
const LAYERS: usize = 3;
const STEPS: usize = 2;

// ---- the log ------------------------------------------------------------------------------------

/// Which `UnitAccess` method a marker is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    Params,
    Grads,
    ForwardDone,
    BackwardDone,
}

/// Positions in the model's run, written by the test (not by the backend).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mark {
    /// The model starts its "forward" or "backward" pass, or the "optimizer" part of the step.
    Pass(&'static str),
    /// A `UnitAccess` call was entered.
    Enter(Access, usize),
    /// A step of the engine's schedule that happened during the call being left.
    Engine(Event),
    /// A `UnitAccess` call returned.
    Leave(Access, usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    Record {
        queue: &'static str,
        rank: usize,
        id: u64,
    },
    Wait {
        queue: &'static str,
        rank: usize,
        id: u64,
    },
    Op {
        queue: &'static str,
        rank: usize,
        name: &'static str,
    },
    Mark {
        rank: usize,
        mark: Mark,
    },
}

impl Entry {
    fn rank(&self) -> usize {
        match *self {
            Entry::Record { rank, .. }
            | Entry::Wait { rank, .. }
            | Entry::Op { rank, .. }
            | Entry::Mark { rank, .. } => rank,
        }
    }

    fn queue(&self) -> Option<&'static str> {
        match *self {
            Entry::Record { queue, .. } | Entry::Wait { queue, .. } | Entry::Op { queue, .. } => {
                Some(queue)
            }
            Entry::Mark { .. } => None,
        }
    }

    fn is_compute_op(&self) -> bool {
        matches!(self, Entry::Op { queue, .. } if *queue == COMPUTE)
    }
}

type Log = Arc<Mutex<Vec<Entry>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Event ids, unique across every rank and test of this binary.
static NEXT_EVENT: AtomicU64 = AtomicU64::new(1);

// ---- the two-queue backend ----------------------------------------------------------------------

/// `CpuBackend<f32>` seen as two queues of one rank: this instance is the compute queue and its
/// `lane` the comm queue (whose own `comm_lane()` is itself). Every op delegates unchanged; ops,
/// event records and event waits are logged with their queue and rank.
struct Lanes {
    inner: CpuBackend<f32>,
    queue: &'static str,
    rank: usize,
    log: Log,
    lane: Option<Box<Lanes>>,
}

type Buf = CpuBuf<f32>;

impl Lanes {
    /// Rank `rank`'s compute queue, with its comm lane.
    fn new(rank: usize, log: &Log) -> Self {
        let lane = Lanes {
            inner: CpuBackend::new(),
            queue: COMM,
            rank,
            log: log.clone(),
            lane: None,
        };
        Lanes {
            lane: Some(Box::new(lane)),
            ..Lanes::single_queue(rank, log)
        }
    }

    /// A backend without a comm lane (`comm_lane()` is the compute queue itself): what the checks
    /// must reject.
    fn single_queue(rank: usize, log: &Log) -> Self {
        Lanes {
            inner: CpuBackend::new(),
            queue: COMPUTE,
            rank,
            log: log.clone(),
            lane: None,
        }
    }

    fn push(&self, e: Entry) {
        lock(&self.log).push(e);
    }

    fn op(&self, name: &'static str) {
        self.push(Entry::Op {
            queue: self.queue,
            rank: self.rank,
            name,
        });
    }
}

impl Backend for Lanes {
    type Buf = Buf;
    type Ids = CpuIds;
    type Event = u64;

    fn name(&self) -> String {
        format!("{} queue of {}", self.queue, self.inner.name())
    }

    fn alloc(&self, len: usize, dtype: DType) -> Result<Buf> {
        self.inner.alloc(len, dtype)
    }

    fn slice(&self, buf: &Buf, offset: usize, len: usize) -> Result<Buf> {
        self.inner.slice(buf, offset, len)
    }

    fn upload(&self, dst: &Buf, src: &[f32]) -> Result<()> {
        self.inner.upload(dst, src)
    }

    fn download(&self, src: &Buf) -> Result<Vec<f32>> {
        self.inner.download(src)
    }

    fn upload_ids(&self, ids: &[u32]) -> Result<CpuIds> {
        self.inner.upload_ids(ids)
    }

    fn synchronize(&self) -> Result<()> {
        self.inner.synchronize()
    }

    fn record_event(&self) -> Result<u64> {
        self.inner.record_event()?;
        let id = NEXT_EVENT.fetch_add(1, Ordering::Relaxed);
        self.push(Entry::Record {
            queue: self.queue,
            rank: self.rank,
            id,
        });
        Ok(id)
    }

    fn wait_event(&self, event: &u64) -> Result<()> {
        self.push(Entry::Wait {
            queue: self.queue,
            rank: self.rank,
            id: *event,
        });
        self.inner.wait_event(&())
    }

    fn comm_lane(&self) -> &Self {
        self.lane.as_deref().unwrap_or(self)
    }

    fn fill(&self, dst: &Buf, value: f32) -> Result<()> {
        self.op("fill");
        self.inner.fill(dst, value)
    }

    fn copy(&self, dst: &Buf, src: &Buf) -> Result<()> {
        self.op("copy");
        self.inner.copy(dst, src)
    }

    fn scale(&self, dst: &Buf, alpha: f32) -> Result<()> {
        self.op("scale");
        self.inner.scale(dst, alpha)
    }

    fn add(&self, out: &Buf, a: &Buf, b: &Buf) -> Result<()> {
        self.op("add");
        self.inner.add(out, a, b)
    }

    fn accumulate(&self, dst: &Buf, src: &Buf) -> Result<()> {
        self.op("accumulate");
        self.inner.accumulate(dst, src)
    }

    fn matmul(
        &self,
        out: &Buf,
        a: &Buf,
        b: &Buf,
        bias: Option<&Buf>,
        spec: MatmulSpec,
    ) -> Result<()> {
        self.op("matmul");
        self.inner.matmul(out, a, b, bias, spec)
    }

    fn bias_backward(&self, dbias: &Buf, dout: &Buf, rows: usize, cols: usize) -> Result<()> {
        self.op("bias_backward");
        self.inner.bias_backward(dbias, dout, rows, cols)
    }

    fn layernorm_forward(
        &self,
        out: &Buf,
        mean: &Buf,
        rstd: &Buf,
        inp: &Buf,
        weight: &Buf,
        bias: &Buf,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        self.op("layernorm_forward");
        self.inner
            .layernorm_forward(out, mean, rstd, inp, weight, bias, rows, cols)
    }

    fn layernorm_backward(
        &self,
        dinp: &Buf,
        dweight: &Buf,
        dbias: &Buf,
        dout: &Buf,
        inp: &Buf,
        weight: &Buf,
        mean: &Buf,
        rstd: &Buf,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        self.op("layernorm_backward");
        self.inner.layernorm_backward(
            dinp, dweight, dbias, dout, inp, weight, mean, rstd, rows, cols,
        )
    }

    fn gelu_forward(&self, out: &Buf, inp: &Buf) -> Result<()> {
        self.op("gelu_forward");
        self.inner.gelu_forward(out, inp)
    }

    fn gelu_backward(&self, dinp: &Buf, inp: &Buf, dout: &Buf) -> Result<()> {
        self.op("gelu_backward");
        self.inner.gelu_backward(dinp, inp, dout)
    }

    fn attention_forward(
        &self,
        out: &Buf,
        lse: &Buf,
        qkv: &Buf,
        shape: AttentionShape,
    ) -> Result<()> {
        self.op("attention_forward");
        self.inner.attention_forward(out, lse, qkv, shape)
    }

    fn attention_backward(
        &self,
        dqkv: &Buf,
        dout: &Buf,
        qkv: &Buf,
        out: &Buf,
        lse: &Buf,
        shape: AttentionShape,
    ) -> Result<()> {
        self.op("attention_backward");
        self.inner
            .attention_backward(dqkv, dout, qkv, out, lse, shape)
    }

    fn embedding_forward(
        &self,
        out: &Buf,
        ids: &CpuIds,
        wte: &Buf,
        wpe: &Buf,
        batch: usize,
        seq: usize,
        channels: usize,
    ) -> Result<()> {
        self.op("embedding_forward");
        self.inner
            .embedding_forward(out, ids, wte, wpe, batch, seq, channels)
    }

    fn embedding_backward(
        &self,
        dwte: &Buf,
        dwpe: &Buf,
        dout: &Buf,
        ids: &CpuIds,
        batch: usize,
        seq: usize,
        channels: usize,
    ) -> Result<()> {
        self.op("embedding_backward");
        self.inner
            .embedding_backward(dwte, dwpe, dout, ids, batch, seq, channels)
    }

    fn cross_entropy(
        &self,
        losses: &Buf,
        logits: &Buf,
        targets: &CpuIds,
        rows: usize,
        vocab: usize,
        grad_scale: Option<f32>,
    ) -> Result<()> {
        self.op("cross_entropy");
        self.inner
            .cross_entropy(losses, logits, targets, rows, vocab, grad_scale)
    }

    fn adamw(
        &self,
        param: &Buf,
        grad: &Buf,
        m: &Buf,
        v: &Buf,
        param_copy: Option<&Buf>,
        hp: &AdamWStep,
    ) -> Result<()> {
        self.op("adamw");
        self.inner.adamw(param, grad, m, v, param_copy, hp)
    }

    fn sum_squares(&self, acc: &Buf, x: &Buf) -> Result<()> {
        self.op("sum_squares");
        self.inner.sum_squares(acc, x)
    }
}

// ---- running a few sharded steps ----------------------------------------------------------------

/// The engine as the model sees it, writing markers (see the module docs) into `log`, if any.
struct Marked<'a, B: Backend, C: Communicator> {
    units: &'a mut ShardedUnits<B, C>,
    log: Option<&'a Log>,
    rank: usize,
}

impl<B: Backend, C: Communicator> Marked<'_, B, C> {
    fn mark(&self, mark: Mark) {
        if let Some(log) = self.log {
            lock(log).push(Entry::Mark {
                rank: self.rank,
                mark,
            });
        }
    }

    fn call<T>(
        &mut self,
        access: Access,
        unit: usize,
        f: impl FnOnce(&mut ShardedUnits<B, C>) -> Result<T>,
    ) -> Result<T> {
        self.mark(Mark::Enter(access, unit));
        let value = f(self.units)?;
        for e in self.units.take_trace() {
            self.mark(Mark::Engine(e));
        }
        self.mark(Mark::Leave(access, unit));
        Ok(value)
    }
}

impl<B: Backend, C: Communicator> UnitAccess<B> for Marked<'_, B, C> {
    fn params(&mut self, be: &B, unit: usize) -> Result<B::Buf> {
        self.call(Access::Params, unit, |u| u.params(be, unit))
    }

    fn grads(&mut self, be: &B, unit: usize) -> Result<B::Buf> {
        self.call(Access::Grads, unit, |u| u.grads(be, unit))
    }

    fn forward_done(&mut self, be: &B, unit: usize) -> Result<()> {
        self.call(Access::ForwardDone, unit, |u| u.forward_done(be, unit))
    }

    fn backward_done(&mut self, be: &B, unit: usize) -> Result<()> {
        self.call(Access::BackwardDone, unit, |u| u.backward_done(be, unit))
    }
}

/// World 2, full_shard, f32, 3 blocks.
fn config(prefetch: bool) -> Config {
    let mut cfg = small_config(WORLD, ShardStrategy::FullShard, STEPS as u64);
    cfg.model.n_layer = LAYERS;
    cfg.parallel.prefetch = prefetch;
    cfg.validate().expect("the test config is valid");
    cfg
}

/// What one rank ends with.
#[derive(Debug, PartialEq)]
struct RankResult {
    /// This rank's mean loss of each step.
    losses: Vec<f32>,
    /// This rank's parameter shards after the last step, per unit.
    shards: Vec<Vec<f32>>,
}

/// [`STEPS`] training steps (one micro-batch each: forward, backward, reduce-scatter, grad-norm
/// all-reduce, AdamW) on [`WORLD`] ranks running as threads, rank `r` on `make(r)`; markers go to
/// `log` when given.
fn run_steps<B: Backend>(
    cfg: &Config,
    make: impl Fn(usize) -> B + Sync,
    log: Option<&Log>,
) -> Vec<RankResult> {
    let plan = ShardPlan::new(&cfg.parallel);
    assert_eq!(plan.group_size, WORLD, "full_shard shards over the world");
    let world = LocalWorld::new(WORLD, Duration::from_secs(20));
    let whole = world.group(&[0, 1]);
    let shard = world.group(&plan.shard_group(0));
    let replicas = world.group(&[0]).into_iter().chain(world.group(&[1]));
    let comms: Vec<Mutex<Option<RankComms<LocalComm>>>> = whole
        .into_iter()
        .zip(shard)
        .zip(replicas)
        .map(|((world, shard), replica)| {
            Mutex::new(Some(RankComms {
                world,
                shard,
                replica,
            }))
        })
        .collect();
    let (micro, seq) = (cfg.train.micro_batch_size, cfg.model.seq_len);
    run_ranks(&world, |rank, _| {
        let be = make(rank);
        let comms = lock(&comms[rank]).take().expect("taken once");
        let layout = ParamLayout::gpt(gpt_shape(cfg), cfg.model.init_std);
        let mut units = ShardedUnits::new(&be, &layout, plan.clone(), comms)?;
        let group_rank = units.group_rank();
        let segments = (0..layout.units.len())
            .map(|u| units.shard_layout().segments(&layout, u, group_rank))
            .collect();
        let t = &cfg.train;
        let mut opt = AdamW::new(
            &be,
            &units.param_shards,
            segments,
            AdamWConfig {
                beta1: t.beta1,
                beta2: t.beta2,
                eps: t.eps,
                weight_decay: t.weight_decay,
                grad_clip: t.grad_clip,
            },
        )?;
        for (u, full) in initial_weights(&layout, t.seed).iter().enumerate() {
            let mine = units.shard_layout().shard_of(u, group_rank, full);
            opt.set_master(&be, u, &mine, &units.param_shards)?;
        }
        let mut model = Gpt::new(layout, plan.param_dtype);
        let mut data = ArithmeticCorpus::new(99, 0.1, t.seed, Split::Train);
        let grad_scale = 1.0 / (micro * seq * WORLD) as f32;
        units.record_trace();
        let mut losses = Vec::new();
        for _ in 0..STEPS {
            units.zero_grads(&be)?;
            let batch = data
                .next_batch(micro * WORLD, seq)
                .unwrap()
                .rows(rank * micro, micro);
            let inputs = be.upload_ids(&batch.inputs)?;
            let targets = be.upload_ids(&batch.targets)?;
            units.start_micro_batch(true);
            let mut access = Marked {
                units: &mut units,
                log,
                rank,
            };
            access.mark(Mark::Pass("forward"));
            model.forward(
                &be,
                &mut access,
                &inputs,
                Some(&targets),
                Some(grad_scale),
                micro,
                seq,
            )?;
            access.units.start_backward();
            access.mark(Mark::Pass("backward"));
            model.backward(&be, &mut access, &inputs)?;
            access.mark(Mark::Pass("optimizer"));
            losses.push(model.mean_loss(&be)?);
            let norm = units.grad_norm_squared(&be)?.sqrt();
            let clip = opt.config().clip_scale(norm);
            opt.step(&be, &units.param_shards, &units.grad_shards, t.lr, clip)?;
            units.release_all(&be)?;
        }
        let shards = units
            .param_shards
            .iter()
            .map(|b| be.download(b))
            .collect::<Result<_>>()?;
        Ok(RankResult { losses, shards })
    })
    .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Runs [`STEPS`] steps with a [`Lanes`] pair per rank (or a single-queue one); returns the log.
fn logged_run(prefetch: bool, two_queues: bool) -> (Vec<Entry>, Vec<RankResult>) {
    let log: Log = Arc::default();
    let results = run_steps(
        &config(prefetch),
        |rank| {
            if two_queues {
                Lanes::new(rank, &log)
            } else {
                Lanes::single_queue(rank, &log)
            }
        },
        Some(&log),
    );
    let entries = lock(&log).clone();
    (entries, results)
}

// ---- reading the log ----------------------------------------------------------------------------

/// A run of consecutive comm-lane entries of one rank: the lane's share of one collective.
#[derive(Clone, Debug)]
struct LaneBlock {
    /// Positions of its first and last entries in the rank's log.
    start: usize,
    end: usize,
    /// Events the lane waited for, before any of its ops.
    waits: Vec<u64>,
    /// Its ops, in order.
    ops: Vec<&'static str>,
    /// The event it recorded after its ops.
    done: u64,
    /// The rank's last compute-queue record before the block (position, id): its ready event.
    ready: Option<(usize, u64)>,
}

/// One `params(unit)` call.
#[derive(Clone, Debug)]
struct ParamsCall {
    unit: usize,
    pass: &'static str,
    enter: usize,
    leave: usize,
}

/// One all-gather, as one rank saw it.
#[derive(Clone, Debug)]
struct Gather {
    /// The unit it gathers (from the engine's `Gather(unit)`).
    unit: usize,
    /// The `params` call it was issued in (index into [`RankView::calls`]).
    call: usize,
    /// This rank's lane block for it.
    block: LaneBlock,
    /// The ready events of every rank of the collective (their lanes' blocks' `ready`).
    readies: BTreeSet<u64>,
    /// The done events of every rank of the collective.
    dones: BTreeSet<u64>,
    /// Positions of this rank's compute-queue waits on those done events.
    done_waits: Vec<usize>,
}

/// One rank's log, parsed.
struct RankView {
    rank: usize,
    entries: Vec<Entry>,
    calls: Vec<ParamsCall>,
    gathers: Vec<Gather>,
}

impl RankView {
    /// Positions of compute-queue ops in `from..to`.
    fn compute_ops(&self, from: usize, to: usize) -> Vec<usize> {
        (from..to.min(self.entries.len()))
            .filter(|&i| self.entries[i].is_compute_op())
            .collect()
    }

    fn op_name(&self, i: usize) -> &'static str {
        match self.entries[i] {
            Entry::Op { name, .. } => name,
            _ => "?",
        }
    }

    fn excerpt(&self, from: usize, to: usize) -> String {
        excerpt(&self.entries, from, to)
    }
}

/// Entries `from..to` of one rank's log, one per line, for failure messages.
fn excerpt(entries: &[Entry], from: usize, to: usize) -> String {
    (from..to.min(entries.len()))
        .map(|i| format!("  {i:4}: {:?}", entries[i]))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Splits one rank's entries into its lane blocks.
fn lane_blocks(rank: usize, entries: &[Entry]) -> Result<Vec<LaneBlock>, String> {
    let mut blocks = Vec::new();
    let mut ready = None;
    let mut i = 0;
    while i < entries.len() {
        match entries[i] {
            Entry::Record { queue, id, .. } if queue == COMPUTE => ready = Some((i, id)),
            e if e.queue() == Some(COMM) => {
                let start = i;
                let (mut waits, mut ops) = (Vec::new(), Vec::new());
                let done = loop {
                    match entries.get(i) {
                        Some(Entry::Wait { queue, id, .. }) if *queue == COMM => {
                            if !ops.is_empty() {
                                return Err(format!(
                                    "rank {rank}: the comm lane waits for event {id} at {i} after \
                                     starting its work {ops:?}"
                                ));
                            }
                            waits.push(*id);
                        }
                        Some(Entry::Op { queue, name, .. }) if *queue == COMM => ops.push(*name),
                        Some(Entry::Record { queue, id, .. }) if *queue == COMM => break *id,
                        other => {
                            return Err(format!(
                                "rank {rank}: the comm lane's block from {start} is interrupted \
                                 at {i} by {other:?} before it records its done event"
                            ))
                        }
                    }
                    i += 1;
                };
                blocks.push(LaneBlock {
                    start,
                    end: i,
                    waits,
                    ops,
                    done,
                    ready,
                });
            }
            _ => {}
        }
        i += 1;
    }
    Ok(blocks)
}

/// Parses the whole log: every rank's `params` calls, lane blocks and gathers, with each gather's
/// collective resolved across ranks. Fails where the log cannot be read as the module docs say
/// (which is itself a finding: for example, gathers the engine issued without a comm-lane block).
fn analyze(log: &[Entry]) -> Result<Vec<RankView>, String> {
    // Every wait is for an event recorded before it (the log's order is a real-time order).
    let mut recorded = HashSet::new();
    for (i, e) in log.iter().enumerate() {
        match *e {
            // (`insert` is false for an id already recorded.)
            Entry::Record { id, .. } if !recorded.insert(id) => {
                return Err(format!("event {id} recorded twice"));
            }
            Entry::Wait { id, .. } if !recorded.contains(&id) => {
                return Err(format!(
                    "{e:?} (global entry {i}) waits for an unrecorded event"
                ));
            }
            _ => {}
        }
    }
    let per_rank: Vec<Vec<Entry>> = (0..WORLD)
        .map(|r| log.iter().filter(|e| e.rank() == r).copied().collect())
        .collect();
    let blocks = per_rank
        .iter()
        .enumerate()
        .map(|(r, entries)| lane_blocks(r, entries))
        .collect::<Result<Vec<_>, _>>()?;
    // One collective = the lane blocks (one per rank) that wait for the same ready events.
    let mut collectives: HashMap<BTreeSet<u64>, Vec<&LaneBlock>> = HashMap::new();
    for b in blocks.iter().flatten() {
        let key: BTreeSet<u64> = b.waits.iter().copied().collect();
        collectives.entry(key).or_default().push(b);
    }
    let mut views = Vec::new();
    for (rank, entries) in per_rank.into_iter().enumerate() {
        let mut calls = Vec::new();
        let mut pass = "";
        let mut open: Option<(usize, usize)> = None;
        let mut gathered_units = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            let Entry::Mark { mark, .. } = *e else {
                continue;
            };
            match mark {
                Mark::Pass(p) => pass = p,
                Mark::Enter(Access::Params, unit) => open = Some((unit, i)),
                Mark::Engine(Event::Gather(u)) => {
                    if open.is_none() {
                        return Err(format!(
                            "rank {rank}: the engine gathered unit {u} outside a params call"
                        ));
                    }
                    gathered_units.push((calls.len(), u));
                }
                Mark::Leave(Access::Params, unit) => {
                    let (u, enter) = open.take().expect("params calls do not nest");
                    assert_eq!(u, unit);
                    calls.push(ParamsCall {
                        unit,
                        pass,
                        enter,
                        leave: i,
                    });
                }
                _ => {}
            }
        }
        let mut gathers = Vec::new();
        for (c, call) in calls.iter().enumerate() {
            let mine: Vec<&LaneBlock> = blocks[rank]
                .iter()
                .filter(|b| call.enter < b.start && b.end < call.leave)
                .collect();
            let units: Vec<usize> = gathered_units
                .iter()
                .filter(|(cc, _)| *cc == c)
                .map(|&(_, u)| u)
                .collect();
            if mine.len() != units.len() {
                return Err(format!(
                    "rank {rank}: params({}) issued the gathers of units {units:?} (engine trace) \
                     but the log shows {} comm-lane blocks in it:\n{}",
                    call.unit,
                    mine.len(),
                    excerpt(&entries, call.enter, call.leave + 1)
                ));
            }
            for (block, unit) in mine.into_iter().zip(units) {
                let key: BTreeSet<u64> = block.waits.iter().copied().collect();
                let group = &collectives[&key];
                let readies: BTreeSet<u64> =
                    group.iter().filter_map(|b| b.ready.map(|r| r.1)).collect();
                let dones: BTreeSet<u64> = group.iter().map(|b| b.done).collect();
                let done_waits = (0..entries.len())
                    .filter(|&i| {
                        matches!(entries[i], Entry::Wait { queue, id, .. }
                            if queue == COMPUTE && dones.contains(&id))
                    })
                    .collect();
                gathers.push(Gather {
                    unit,
                    call: c,
                    block: block.clone(),
                    readies,
                    dones,
                    done_waits,
                });
            }
        }
        views.push(RankView {
            rank,
            entries,
            calls,
            gathers,
        });
    }
    Ok(views)
}

// ---- the properties -----------------------------------------------------------------------------

/// Property 1: every gather's copies run on the comm lane, never on the compute queue, after the
/// lane waited for the ready event of every rank of that collective; the compute queue waits for
/// the done event of every rank before using the unit. Returns the violations.
fn gathers_run_on_the_lane(v: &RankView) -> Vec<String> {
    let mut bad = Vec::new();
    let r = v.rank;
    if v.gathers.is_empty() {
        bad.push(format!("rank {r}: no gathers in the log"));
    }
    for call in &v.calls {
        for i in v.compute_ops(call.enter, call.leave) {
            bad.push(format!(
                "rank {r}: compute-queue op {} at {i} inside params({}): a gather's work must run \
                 on the comm lane",
                v.op_name(i),
                call.unit
            ));
        }
    }
    for g in &v.gathers {
        let what = format!("rank {r}: gather of unit {} at {}", g.unit, g.block.start);
        let b = &g.block;
        if b.ops != vec!["copy"; WORLD] {
            bad.push(format!(
                "{what}: lane ops {:?}, expected {WORLD} copies",
                b.ops
            ));
        }
        let Some((ready_at, ready)) = b.ready else {
            bad.push(format!(
                "{what}: no ready event recorded on the compute queue"
            ));
            continue;
        };
        // The compute queue issued nothing between its ready event and the lane's work.
        if let Some(&i) = v.compute_ops(ready_at, b.start).first() {
            bad.push(format!(
                "{what}: compute op {} at {i} inside the gather",
                v.op_name(i)
            ));
        }
        let waits: BTreeSet<u64> = b.waits.iter().copied().collect();
        if waits.len() != WORLD || g.readies.len() != WORLD || waits != g.readies {
            bad.push(format!(
                "{what}: the lane waits for {:?}, the ready events of the {WORLD} ranks are {:?}",
                b.waits, g.readies
            ));
        }
        if !waits.contains(&ready) {
            bad.push(format!(
                "{what}: the lane does not wait for this rank's ready event {ready}"
            ));
        }
        if g.dones.len() != WORLD || g.done_waits.len() != WORLD {
            bad.push(format!(
                "{what}: the compute queue waits {} times for the done events {:?} of the {WORLD} \
                 ranks",
                g.done_waits.len(),
                g.dones
            ));
        }
        // The unit is handed to the model only after the compute queue waited for its gather.
        if let Some(used) = v.calls[g.call..].iter().find(|c| c.unit == g.unit) {
            if g.done_waits.iter().any(|&w| w > used.leave) {
                bad.push(format!(
                    "{what}: the compute queue waits for it only after params({}) returned",
                    g.unit
                ));
            }
        }
    }
    bad
}

/// Property 2 (prefetch on): for consecutive `params` calls `a`, `b` of one pass, the gather of `b`
/// that `params(b)` hands over is issued inside `params(a)` (its lane copies logged) before any
/// compute op of `a`, and the compute queue waits for its done events after the last compute op of
/// `a` and before the first of `b`. Returns, per pair of calls, its violations.
fn prefetch_overlaps(v: &RankView) -> Vec<Vec<String>> {
    (0..v.calls.len())
        .zip(1..v.calls.len())
        .filter(|&(ia, ib)| {
            let (a, b) = (&v.calls[ia], &v.calls[ib]);
            a.pass == b.pass && matches!(a.pass, "forward" | "backward")
        })
        .map(|(ia, ib)| pair_overlaps(v, ia, ib))
        .collect()
}

/// The violations of property 2 for the `params` calls `ia` then `ib`.
fn pair_overlaps(v: &RankView, ia: usize, ib: usize) -> Vec<String> {
    let (a, b) = (&v.calls[ia], &v.calls[ib]);
    let what = format!(
        "rank {}, {} params({}) -> params({})",
        v.rank, a.pass, a.unit, b.unit
    );
    let mut bad = Vec::new();
    // The gather whose result params(b) hands over: the last one of unit b issued by then.
    let Some(g) = v
        .gathers
        .iter()
        .rfind(|g| g.unit == b.unit && g.block.start < b.leave)
    else {
        return vec![format!("{what}: unit {} was never gathered", b.unit)];
    };
    if g.call != ia {
        bad.push(format!(
            "{what}: the gather of unit {} was issued in params({}) (call {}), not in params({})",
            b.unit, v.calls[g.call].unit, g.call, a.unit
        ));
    }
    let a_ops = v.compute_ops(a.leave, b.enter);
    let Some((&a_first, &a_last)) = a_ops.first().zip(a_ops.last()) else {
        bad.push(format!("{what}: unit {} has no compute ops", a.unit));
        return bad;
    };
    if a.unit != 0 && !a_ops.iter().any(|&i| v.op_name(i) == "matmul") {
        bad.push(format!("{what}: block {} has no matmul", a.unit));
    }
    if g.block.end > a_first {
        bad.push(format!(
            "{what}: the gather's lane copies end at {}, after unit {}'s first compute op at \
             {a_first}",
            g.block.end, a.unit
        ));
    }
    let Some(&b_first) = v.compute_ops(b.leave, v.entries.len()).first() else {
        bad.push(format!("{what}: unit {} has no compute ops", b.unit));
        return bad;
    };
    let (first_wait, last_wait) = match (g.done_waits.iter().min(), g.done_waits.iter().max()) {
        (Some(&f), Some(&l)) => (f, l),
        _ => (usize::MAX, usize::MAX),
    };
    if first_wait < a_last || last_wait > b_first {
        bad.push(format!(
            "{what}: the compute queue waits for the gather of unit {} at {:?}; unit {}'s \
             compute is {a_first}..={a_last}, unit {}'s starts at {b_first}:\n{}",
            b.unit,
            g.done_waits,
            a.unit,
            b.unit,
            v.excerpt(a.enter, b_first + 1)
        ));
    }
    bad
}

/// Property 3 (prefetch off): each `params(u)` call issues at most one gather, of `u`, and the
/// compute queue waits for it with no compute op between issuing it and waiting. Returns the
/// violations.
fn gathers_are_waited_at_once(v: &RankView) -> Vec<String> {
    let mut bad = Vec::new();
    let r = v.rank;
    for (c, call) in v.calls.iter().enumerate() {
        let issued: Vec<&Gather> = v.gathers.iter().filter(|g| g.call == c).collect();
        if issued.len() > 1 || issued.iter().any(|g| g.unit != call.unit) {
            let units: Vec<usize> = issued.iter().map(|g| g.unit).collect();
            bad.push(format!(
                "rank {r}: params({}) gathered units {units:?}",
                call.unit
            ));
        }
    }
    for g in &v.gathers {
        let what = format!("rank {r}: gather of unit {} at {}", g.unit, g.block.start);
        let from = g.block.ready.map_or(g.block.start, |(i, _)| i);
        let Some(&last_wait) = g.done_waits.iter().max() else {
            bad.push(format!("{what}: never waited for"));
            continue;
        };
        let between = v.compute_ops(from, last_wait);
        if !between.is_empty() || last_wait > v.calls[g.call].leave {
            bad.push(format!(
                "{what}: compute ops {:?} between issuing it at {from} and waiting at {last_wait}",
                between.iter().map(|&i| v.op_name(i)).collect::<Vec<_>>()
            ));
        }
    }
    bad
}

fn assert_none(what: &str, bad: &[String]) {
    assert!(bad.is_empty(), "{what}:\n{}", bad.join("\n"));
}

// ---- the tests ----------------------------------------------------------------------------------

#[test]
fn gathers_copy_on_the_comm_lane_after_every_ranks_ready_event() {
    for prefetch in [true, false] {
        let (log, _) = logged_run(prefetch, true);
        let views = analyze(&log).unwrap_or_else(|e| panic!("prefetch {prefetch}: {e}"));
        for v in &views {
            assert_none(
                &format!("prefetch {prefetch}, rank {}", v.rank),
                &gathers_run_on_the_lane(v),
            );
            // Forward gathers every unit, backward every block again (the root is kept).
            assert_eq!(v.gathers.len(), STEPS * (2 * LAYERS + 1), "rank {}", v.rank);
        }
        // Nothing but collectives runs on the lane: copy, accumulate, scale.
        for e in &log {
            if let Entry::Op { queue, name, .. } = e {
                if *queue == COMM {
                    assert!(matches!(*name, "copy" | "accumulate" | "scale"), "{e:?}");
                }
            }
        }
    }
}

#[test]
fn with_prefetch_the_next_gather_is_issued_before_and_waited_after_the_current_compute() {
    let (log, _) = logged_run(true, true);
    for v in &analyze(&log).unwrap_or_else(|e| panic!("{e}")) {
        if v.rank == 0 {
            // The first step's forward up to block 2's first op, for `--nocapture`.
            let to = v.compute_ops(v.calls[2].leave, v.entries.len())[0];
            println!("rank 0, step 1:\n{}", v.excerpt(0, to + 1));
        }
        let pairs = prefetch_overlaps(v);
        assert_none(&format!("rank {}", v.rank), &pairs.concat());
        // Per step: forward 0->1->2->3, backward 0->3->2->1.
        assert_eq!(pairs.len(), STEPS * 2 * LAYERS, "rank {}", v.rank);
    }
}

#[test]
fn without_prefetch_compute_waits_for_each_gather_right_after_issuing_it() {
    let (log, _) = logged_run(false, true);
    let views = analyze(&log).unwrap_or_else(|e| panic!("{e}"));
    for v in &views {
        assert_none(&format!("rank {}", v.rank), &gathers_are_waited_at_once(v));
        // The overlap check has teeth: without prefetch there is nothing to overlap.
        let pairs = prefetch_overlaps(v);
        assert_eq!(pairs.len(), STEPS * 2 * LAYERS);
        for bad in &pairs {
            assert!(
                bad.iter().any(|b| b.contains("was issued in params")),
                "rank {}: a pair passes the overlap check without prefetch: {bad:?}",
                v.rank
            );
        }
    }
    // And the no-prefetch check fails on a prefetching run.
    let (log, _) = logged_run(true, true);
    for v in &analyze(&log).unwrap_or_else(|e| panic!("{e}")) {
        assert!(!gathers_are_waited_at_once(v).is_empty(), "rank {}", v.rank);
    }
}

#[test]
fn the_checks_reject_gathers_on_the_compute_queue() {
    // A backend whose comm lane is its compute queue: the engine's gathers leave no lane block.
    let (log, _) = logged_run(true, false);
    let err = match analyze(&log) {
        Ok(_) => panic!("a single-queue log passed the analysis"),
        Err(e) => e,
    };
    assert!(err.contains("comm-lane blocks"), "{err}");
}

#[test]
fn two_queues_change_no_result_bit_for_bit() {
    for prefetch in [true, false] {
        let cfg = config(prefetch);
        let plain = run_steps(&cfg, |_| CpuBackend::<f32>::new(), None);
        let (_, lanes) = logged_run(prefetch, true);
        assert_eq!(plain.len(), WORLD);
        for (r, (p, l)) in plain.iter().zip(&lanes).enumerate() {
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&p.losses), bits(&l.losses), "rank {r} losses");
            assert_eq!(p.shards.len(), l.shards.len());
            for (u, (a, b)) in p.shards.iter().zip(&l.shards).enumerate() {
                assert_eq!(bits(a), bits(b), "rank {r} unit {u} shard");
            }
            assert!(p.losses.iter().all(|x| x.is_finite()));
        }
        // The steps did train: the parameters moved.
        let cfg_layout = ParamLayout::gpt(gpt_shape(&cfg), cfg.model.init_std);
        let init = initial_weights(&cfg_layout, cfg.train.seed);
        assert_ne!(plain[0].shards[1][..4], init[1][..4]);
    }
}

/// A block's gradient reduce-scatter, issued when its backward is done, runs on the comm lane
/// beside the next block's backward: the compute queue waits for it only inside the next unit's
/// `backward_done`, after that unit's compute was issued. The root's, the last of the backward,
/// is waited for in its own call.
#[test]
fn a_blocks_reduce_scatter_is_waited_for_after_the_next_units_backward() {
    let (log, _) = logged_run(true, true);
    for rank in 0..WORLD {
        let entries: Vec<Entry> = log.iter().copied().filter(|e| e.rank() == rank).collect();
        let blocks = lane_blocks(rank, &entries).unwrap_or_else(|e| panic!("{e}"));
        // Every backward_done call: (unit, enter, leave).
        let mut calls = Vec::new();
        let mut open = None;
        for (i, e) in entries.iter().enumerate() {
            match *e {
                Entry::Mark {
                    mark: Mark::Enter(Access::BackwardDone, u),
                    ..
                } => open = Some((u, i)),
                Entry::Mark {
                    mark: Mark::Leave(Access::BackwardDone, u),
                    ..
                } => {
                    let (unit, enter) = open.take().expect("a call was entered");
                    assert_eq!(unit, u);
                    calls.push((u, enter, i));
                }
                _ => {}
            }
        }
        assert_eq!(calls.len(), STEPS * (LAYERS + 1), "rank {rank}");
        for (k, &(unit, enter, leave)) in calls.iter().enumerate() {
            let issued: Vec<&LaneBlock> = blocks
                .iter()
                .filter(|b| b.start > enter && b.end < leave)
                .collect();
            assert_eq!(
                issued.len(),
                1,
                "rank {rank}: backward_done({unit}) should issue one reduce-scatter:\n{}",
                excerpt(&entries, enter, leave + 1)
            );
            let (scatter_end, done) = (issued[0].end, issued[0].done);
            let wait = entries
                .iter()
                .position(|e| matches!(*e, Entry::Wait { queue, id, .. } if queue == COMPUTE && id == done))
                .unwrap_or_else(|| panic!("rank {rank}: unit {unit}'s reduce-scatter is never waited for"));
            let (waiter, waiter_enter, waiter_leave) = if unit == ParamLayout::EMBED_HEAD_UNIT {
                (unit, enter, leave)
            } else {
                calls[k + 1]
            };
            assert!(
                wait > waiter_enter && wait < waiter_leave,
                "rank {rank}: unit {unit}'s reduce-scatter is waited for at {wait}, not inside \
                 backward_done({waiter}) ({waiter_enter}..{waiter_leave})"
            );
            if unit != ParamLayout::EMBED_HEAD_UNIT {
                assert!(
                    entries[scatter_end..wait].iter().any(Entry::is_compute_op),
                    "rank {rank}: nothing computes beside unit {unit}'s reduce-scatter:\n{}",
                    excerpt(&entries, scatter_end, wait + 1)
                );
            }
        }
    }
}
