//! One rank's training loop: its backend, model, sharding engine, optimizer and data slice; every
//! step's micro-batches, loss and gradient-norm reductions, the sharded AdamW update, evaluation,
//! and on rank 0 the metrics, progress and output files.

use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};

use super::metrics::{MetricsWriter, StepRecord};
use super::optimizer::{AdamW, AdamWConfig};
use super::phases::{Phase, PhaseTimer};
use super::plan_report::planned_memory;
use super::progress::Progress;
use super::schedule::LrSchedule;
use super::{
    checkpoint_root, gpt_shape, initial_weights, stop_requested, weights, Faults, Instruments,
    Start, TrainSummary, WEIGHTS_FILE,
};
use crate::backend::{Backend, Buffer, DType};
use crate::checkpoint::meta::UnitMeta;
use crate::checkpoint::meta::{Piece, FORMAT};
use crate::checkpoint::staging::{discard, staging_dir};
use crate::checkpoint::write::{commit, prepare_staging, write_rank_file, Owner, RankState};
use crate::checkpoint::CheckpointMeta;
use crate::comm::{Communicator, ReduceOp};
use crate::config::Config;
use crate::data::synthetic::Split;
use crate::data::{Batch, DataSource};
use crate::model::{Gpt, ParamLayout};
use crate::shard::memory::{mib, zero_model_state_bytes, MemoryUse};
use crate::shard::{RankComms, ShardPlan, ShardedUnits};

fn data_source(cfg: &Config, split: Split, run_dir: &Path) -> Result<Box<dyn DataSource>> {
    crate::data::source::open_source(cfg, split, run_dir)
}

/// One rank's training state.
pub(super) struct RankTrainer<'a, B: Backend, C: Communicator> {
    be: B,
    rank: usize,
    cfg: &'a Config,
    run_dir: &'a Path,
    model: Gpt<B>,
    units: ShardedUnits<B, C>,
    opt: AdamW<B>,
    /// The first step this run takes (after the checkpoint it resumed from, or 1).
    start_step: u64,
    /// The step of the checkpoint this run resumed from.
    resumed_step: Option<u64>,
    train_data: Box<dyn DataSource>,
    /// Opened at start when the run evaluates (so bad files fail early), else on first use.
    val_data: Option<Box<dyn DataSource>>,
    /// Phase timing of every step (`Instruments::phase_times`); `None` in normal training.
    phases: Option<PhaseTimer<B>>,
    /// No console progress (`Instruments::quiet`).
    quiet: bool,
    /// The job's writer tag, the same on every rank: it names the staging directory of each save.
    writer: String,
}

impl<'a, B: Backend, C: Communicator> RankTrainer<'a, B, C> {
    pub(super) fn new(
        be: B,
        rank: usize,
        cfg: &'a Config,
        run_dir: &'a Path,
        plan: ShardPlan,
        comms: RankComms<C>,
        start: &Start,
        writer: &str,
    ) -> Result<Self> {
        let layout = ParamLayout::gpt(gpt_shape(cfg), cfg.model.init_std);
        let dtype = plan.param_dtype;
        let units = ShardedUnits::new(&be, &layout, plan, comms)?;
        let group_rank = units.group_rank();
        let shards = units.shard_layout().clone();
        let segments = (0..layout.units.len())
            .map(|u| shards.segments(&layout, u, group_rank))
            .collect();
        let mut opt = AdamW::new(
            &be,
            &units.param_shards,
            segments,
            AdamWConfig {
                beta1: cfg.train.beta1,
                beta2: cfg.train.beta2,
                eps: cfg.train.eps,
                weight_decay: cfg.train.weight_decay,
                grad_clip: cfg.train.grad_clip,
            },
        )?;
        let mut train_data = data_source(cfg, Split::Train, run_dir)?;
        let mut start_step = 1;
        match start {
            Start::Resume(ckpt) => {
                // Each rank reads only its own ranges, from whichever files hold them.
                ckpt.check_layout(&layout)?;
                let mut reader = ckpt.reader();
                for u in 0..layout.units.len() {
                    let state = reader.read(u, shards.range(u, group_rank))?;
                    opt.restore_unit(&be, u, &state, &units.param_shards)?;
                }
                opt.set_steps(ckpt.meta.optimizer_steps);
                train_data
                    .seek(&ckpt.meta.data_position)
                    .with_context(|| format!("resuming from {}", ckpt.dir.display()))?;
                start_step = ckpt.meta.step + 1;
            }
            Start::Scratch | Start::Weights(_) => {
                // Every rank draws (or reads) the same full weights and keeps its own range:
                // identical weights whatever the world size.
                let drawn;
                let full = match start {
                    Start::Weights(w) => w.as_slice(),
                    _ => {
                        drawn = initial_weights(&layout, cfg.train.seed);
                        drawn.as_slice()
                    }
                };
                for (u, values) in full.iter().enumerate() {
                    let mine = shards.shard_of(u, group_rank, values);
                    opt.set_master(&be, u, &mine, &units.param_shards)?;
                }
            }
        }
        Ok(RankTrainer {
            model: Gpt::new(layout, dtype),
            units,
            opt,
            start_step,
            resumed_step: matches!(start, Start::Resume(_)).then(|| start_step - 1),
            train_data,
            val_data: if cfg.train.eval_every > 0 {
                Some(data_source(cfg, Split::Val, run_dir)?)
            } else {
                None
            },
            be,
            rank,
            cfg,
            run_dir,
            phases: None,
            quiet: false,
            writer: writer.to_string(),
        })
    }

    /// Turns on what `instruments` asks for (phase timing also makes the engine bracket its
    /// collectives and the backend time its comm lane).
    pub(super) fn instrument(mut self, instruments: Instruments) -> Self {
        if instruments.phase_times {
            self.phases = Some(PhaseTimer::default());
            self.units.time_collectives(true);
            self.be.set_comm_timing(true);
        }
        self.quiet = instruments.quiet;
        self
    }

    /// Ends the timed phase in progress and begins `next`, first handing the timer the
    /// collectives the engine ran meanwhile (no-op unless phases are timed).
    fn phase(&mut self, next: Option<Phase>) -> Result<()> {
        if let Some(timer) = &mut self.phases {
            timer.add_comm(self.units.take_comm_brackets());
            timer.switch(&self.be, next)?;
        }
        Ok(())
    }

    /// Runs `f` (one of the trainer's own collectives), bracketed as communication when phases
    /// are timed.
    fn timed_comm<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let begin = match self.phases {
            Some(_) => Some(self.be.timing_mark()?),
            None => None,
        };
        let out = f(self)?;
        if let (Some(begin), Some(timer)) = (begin, self.phases.as_mut()) {
            timer.add_comm(vec![(begin, self.be.timing_mark()?)]);
        }
        Ok(out)
    }

    fn world_size(&self) -> usize {
        self.cfg.parallel.world_size
    }

    /// Element-wise sum of `values` over every rank.
    fn sum_over_ranks(&self, values: &[f32]) -> Result<Vec<f32>> {
        let buf = self.be.alloc(values.len(), DType::F32)?;
        self.be.upload(&buf, values)?;
        self.units
            .comms()
            .world
            .all_reduce(&self.be, &buf, ReduceOp::Sum)?;
        self.be.download(&buf)
    }

    /// This rank's rows of a global micro-batch of `world × micro` sequences (DistributedSampler
    /// semantics: every rank reads a distinct slice of the same global batch).
    fn my_rows(&self, global: &Batch) -> Batch {
        let micro = self.cfg.train.micro_batch_size;
        global.rows(self.rank * micro, micro)
    }

    /// Runs one micro-batch's forward (and backward when `grad_scale` is given) on `batch`.
    fn forward_backward(
        &mut self,
        batch: &Batch,
        grad_scale: Option<f32>,
        last_of_step: bool,
    ) -> Result<f32> {
        let inputs = self.be.upload_ids(&batch.inputs)?;
        let targets = self.be.upload_ids(&batch.targets)?;
        self.units.start_micro_batch(last_of_step);
        // Only training passes are timed (evaluation's forward passes are not a step's).
        if grad_scale.is_some() {
            self.phase(Some(Phase::Forward))?;
        }
        self.model.forward(
            &self.be,
            &mut self.units,
            &inputs,
            Some(&targets),
            grad_scale,
            batch.batch,
            batch.seq,
        )?;
        if grad_scale.is_some() {
            self.phase(Some(Phase::Backward))?;
            self.units.start_backward();
            self.model.backward(&self.be, &mut self.units, &inputs)?;
            self.phase(None)?;
        }
        self.model.mean_loss(&self.be)
    }

    /// Mean loss over `eval_tokens` held-out tokens (the same tokens at every evaluation, split
    /// across ranks; every rank runs the same number of passes, since gathers are collective), or
    /// `None` when the ranks agreed to stop part way (see [`Self::stop_agreed`]).
    fn evaluate(&mut self) -> Result<Option<f32>> {
        let mut val_data = match self.val_data.take() {
            Some(v) => v,
            None => data_source(self.cfg, Split::Val, self.run_dir)?,
        };
        let result = self.evaluate_on(val_data.as_mut());
        self.val_data = Some(val_data);
        result
    }

    fn evaluate_on(&mut self, val_data: &mut dyn DataSource) -> Result<Option<f32>> {
        let (micro, seq) = (self.cfg.train.micro_batch_size, self.cfg.model.seq_len);
        let total = self.cfg.train.eval_tokens.div_ceil(micro * seq).max(1);
        let world = self.world_size();
        val_data.rewind();
        let (mut sum, mut count) = (0.0f32, 0.0f32);
        let rounds = total.div_ceil(world);
        for round in 0..rounds {
            // Between rounds (every rank runs the same rounds, so every rank asks alike).
            if round > 0 && self.stop_agreed()? {
                self.units.release_all(&self.be)?;
                return Ok(None);
            }
            let mut mine = None;
            for r in 0..world {
                let batch = val_data.next_batch(micro, seq)?;
                if r == self.rank {
                    mine = Some(batch);
                }
            }
            let batch = mine.ok_or_else(|| anyhow!("rank {} is outside the world", self.rank))?;
            // Ranks past the last batch still run (their gathers are collective) but do not count.
            let loss = self.forward_backward(&batch, None, true)?;
            if round * world + self.rank < total {
                sum += loss;
                count += 1.0;
            }
        }
        self.units.release_all(&self.be)?;
        let totals = self.sum_over_ranks(&[sum, count])?;
        Ok(Some(totals[0] / totals[1]))
    }

    /// The checkpoint a stop inside step `last + 1` leaves: the one of `last` when the run has it
    /// already (written by this run at `written`, or the one it resumed from, where this run writes
    /// its checkpoints), else a new one. Every rank decides alike: the checkpoint directory is the
    /// one they all write to.
    fn checkpoint_of_completed(
        &self,
        last: u64,
        written: Option<u64>,
        faults: &Faults,
    ) -> Result<std::path::PathBuf> {
        let dir = checkpoint_root(self.cfg, self.run_dir)
            .join(crate::checkpoint::meta::step_dir_name(last));
        let resumed_here = self.resumed_step == Some(last) && dir.exists();
        if written == Some(last) || resumed_here {
            Ok(dir)
        } else {
            self.save_checkpoint(last, faults)
        }
    }

    /// Whether any rank has been asked to stop: an all-reduce of each rank's flag, so that every
    /// rank gets the same answer at the same point (one stopping while another went on into a
    /// collective would hang it). Asked between micro-batches and between evaluation rounds, each
    /// already several collectives long, so one more reduction of one value costs little: measured
    /// on the CPU with world 2 and 400 micro-batches of about 1 ms a step, four steps took 3.6-4.3 s
    /// asking at every boundary and 4.1-4.8 s not asking (no difference above the noise), so it
    /// asks at every one.
    fn stop_agreed(&mut self) -> Result<bool> {
        let mine = f32::from(u8::from(stop_requested()));
        let totals = self.timed_comm(|me| me.sum_over_ranks(&[mine]))?;
        Ok(totals[0] > 0.0)
    }

    /// Writes the checkpoint of `step` with every rank (see `checkpoint::write` for the protocol);
    /// returns its directory. A save that fails leaves nothing: rank 0 removes its staging.
    fn save_checkpoint(&self, step: u64, faults: &Faults) -> Result<std::path::PathBuf> {
        let root = checkpoint_root(self.cfg, self.run_dir);
        let saved = self.write_checkpoint(&root, step, faults);
        if saved.is_err() && self.rank == 0 {
            discard(&staging_dir(&root, step, &self.writer));
        }
        saved
    }

    fn write_checkpoint(
        &self,
        root: &Path,
        step: u64,
        faults: &Faults,
    ) -> Result<std::path::PathBuf> {
        let cfg = self.cfg;
        let plan = self.units.plan();
        let world = &self.units.comms().world;
        // Which run and model this checkpoint is of (bound into its meta.json; a `step-N` of
        // another is not this run's to keep).
        let (run_id, model_fingerprint) = if self.rank == 0 {
            (
                // Drawn here if the run directory has none yet (a run started from the library).
                Some(crate::checkpoint::binding::ensure_run_id(self.run_dir)?),
                Some(crate::checkpoint::binding::model_fingerprint(
                    cfg,
                    &self.model.layout,
                )),
            )
        } else {
            (None, None)
        };
        if self.rank == 0 {
            let owner = Owner {
                run_id: run_id.as_deref(),
                model_fingerprint: model_fingerprint.as_deref(),
            };
            prepare_staging(root, step, &self.writer, owner)?;
        }
        world.barrier()?;
        // One copy of each shard: the first rank of each replica group writes it.
        let writes = |rank: usize| plan.replica_group(rank).first() == Some(&rank);
        if writes(self.rank) {
            let shards = self.units.shard_layout();
            let master = self.opt.master(&self.units.param_shards);
            let (m, v) = self.opt.moments();
            let mut pieces = Vec::new();
            for (u, unit) in shards.units.iter().enumerate() {
                let range = shards.range(u, self.units.group_rank());
                let end = range.end.min(unit.numel);
                if range.start >= end {
                    continue;
                }
                let len = end - range.start;
                let read = |buf: &B::Buf| -> Result<Vec<f32>> {
                    self.be.download(&self.be.slice(buf, 0, len)?)
                };
                pieces.push((
                    Piece {
                        unit: u,
                        start: range.start,
                        end,
                    },
                    [read(&master[u])?, read(&m[u])?, read(&v[u])?],
                ));
            }
            let state = RankState {
                rank: self.rank,
                pieces,
            };
            write_rank_file(&staging_dir(root, step, &self.writer), &state)?;
        }
        if faults.fail_in_checkpoint_at_step == Some((self.rank, step)) {
            bail!("injected failure while writing the checkpoint of step {step}");
        }
        world.barrier()?;
        let dir = root.join(crate::checkpoint::meta::step_dir_name(step));
        if self.rank == 0 {
            let t = &cfg.train;
            let meta = CheckpointMeta {
                format: FORMAT.to_string(),
                commit: env!("SHARDTRAIN_COMMIT").to_string(),
                step,
                tokens_seen: step * (t.global_batch_size * cfg.model.seq_len) as u64,
                optimizer_steps: self.opt.steps(),
                config_yaml: cfg.to_yaml(),
                world_size: self.world_size(),
                strategy: serde_json::to_value(plan.strategy)?
                    .as_str()
                    .unwrap_or("?")
                    .to_string(),
                shard_group_size: plan.group_size,
                param_dtype: plan.param_dtype.to_string(),
                reduce_dtype: plan.reduce_dtype.to_string(),
                units: self
                    .model
                    .layout
                    .units
                    .iter()
                    .map(|u| UnitMeta {
                        name: u.name.clone(),
                        numel: u.numel,
                    })
                    .collect(),
                data_position: self.train_data.position(),
                files: Vec::new(),
                run_id,
                model_fingerprint,
            };
            let writers: Vec<usize> = (0..self.world_size()).filter(|&r| writes(r)).collect();
            commit(
                root,
                step,
                &self.writer,
                meta,
                &writers,
                cfg.checkpoint.keep_last as usize,
            )?;
        }
        // Nobody goes on (or reports the path) before the checkpoint is visible.
        world.barrier()?;
        Ok(dir)
    }

    /// The validation loss of the current weights (`shardtrain eval`).
    pub(super) fn evaluate_only(mut self) -> Result<f32> {
        self.evaluate()?
            .ok_or_else(|| anyhow!("the evaluation was stopped before it finished"))
    }

    fn memory_use(&self) -> MemoryUse {
        let size = |bufs: &[B::Buf]| {
            bufs.iter()
                .map(|b| b.len() * b.dtype().size_bytes())
                .sum::<usize>()
        };
        let param_bytes = size(&self.units.param_shards);
        let transient = self.units.transient_bytes();
        let f32_params = self.units.plan().param_dtype == DType::F32;
        MemoryUse {
            master_params: if f32_params {
                param_bytes
            } else {
                self.opt.master_bytes()
            },
            param_shards: if f32_params { 0 } else { param_bytes },
            gathered_params_peak: transient.gathered_peak,
            grads: size(&self.units.grad_shards) + transient.grads_peak,
            optimizer: self.opt.moment_bytes(),
            activations: self.model.activations().map_or(0, |a| a.bytes()),
        }
    }

    pub(super) fn run(mut self, faults: &Faults) -> Result<Option<TrainSummary>> {
        let cfg = self.cfg;
        let t = &cfg.train;
        let plan = self.units.plan().clone();
        let (micro, seq, world) = (t.micro_batch_size, cfg.model.seq_len, self.world_size());
        let accum = t.grad_accum_steps(world);
        let tokens_per_step = (t.global_batch_size * seq) as u64;
        // Each micro-batch's loss is a mean over its tokens; scaling every rank's and every
        // micro-batch's gradient by 1/(tokens in the global batch) and summing gives the gradient of
        // the mean loss over the global batch, whatever the world size.
        let token_scale = 1.0 / (micro * seq) as f32;
        let grad_scale = token_scale / (accum * world) as f32;
        let schedule = LrSchedule {
            lr: t.lr,
            min_lr: t.min_lr,
            warmup_steps: t.warmup_steps,
            max_steps: t.max_steps,
        };
        let lead = self.rank == 0;
        let mut metrics = if lead {
            Some(MetricsWriter::open(
                &self.run_dir.join(&cfg.logging.metrics_file),
                (self.start_step > 1).then(|| self.start_step - 1),
            )?)
        } else {
            None
        };
        let progress = (lead && !self.quiet)
            .then(|| Progress::new(cfg.logging.progress, t.max_steps, cfg.logging.every_steps));
        let numel = self.model.layout.numel();
        let zero = zero_model_state_bytes(&plan, numel);
        if let Some(p) = &progress {
            p.message(&format!(
                "training {numel} parameters on {} | world {world}, {} (shard group {}), {} params, {} reduce | {} steps x {tokens_per_step} tokens (micro-batch {micro} x {seq}, {accum} accumulation steps per rank)",
                self.be.name(),
                serde_json::to_value(plan.strategy)?.as_str().unwrap_or("?"),
                plan.group_size,
                plan.param_dtype,
                plan.reduce_dtype,
                t.max_steps,
            ));
            let m = planned_memory(cfg, &plan);
            p.message(&format!(
                "memory per rank: master params {}, param shards {}, grad shards {}, optimizer {}, activations {} (+ gathered parameters and unsharded gradients, measured) | ZeRO model state {} = {}",
                mib(m.master_params),
                mib(m.param_shards),
                mib(m.grads),
                mib(m.optimizer),
                mib(m.activations),
                zero.0,
                mib(zero.1),
            ));
        }

        let mut train_seconds = 0.0f64;
        // Room for the steps up front, but no more than a long run's: max_steps may be huge
        // (a run meant to be stopped), and the vectors grow when needed.
        let expected_steps = t.max_steps.min(1 << 16) as usize;
        let mut step_times = Vec::with_capacity(expected_steps);
        let mut step_phases = Vec::new();
        let profile_from = t.max_steps.saturating_sub(cfg.logging.profile_ops_steps) + 1;
        let started = Instant::now();
        let mut losses = Vec::with_capacity(expected_steps);
        let mut last_val = None;
        let mut last_checkpoint = None;
        let mut last_checkpoint_step = None;
        let mut stopped_at = None;
        let first_step = self.start_step;
        if lead && first_step > 1 {
            if let Some(p) = &progress {
                p.message(&format!(
                    "resuming after step {} (world {world} now)",
                    first_step - 1
                ));
            }
        }
        for step in first_step..=t.max_steps {
            if faults.fail_rank_at_step == Some((self.rank, step)) {
                bail!("injected failure at step {step}");
            }
            if faults.hang_rank_at_step == Some((self.rank, step)) {
                tracing::warn!("rank {}: injected hang at step {step}", self.rank);
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(3600));
                }
            }
            if lead && step == profile_from {
                self.be.synchronize()?;
                self.be.set_op_timing(true);
            }
            let step_start = Instant::now();
            // Where the step's data begins: an abandoned step rewinds here, so that its
            // checkpoint (of the step before) resumes by replaying it.
            let step_data = self.train_data.position();
            self.units.zero_grads(&self.be)?;
            let mut local_loss = 0.0f32;
            let mut abandoned_after = None;
            for k in 0..accum {
                let global = self.train_data.next_batch(micro * world, seq)?;
                let batch = self.my_rows(&global);
                local_loss += self.forward_backward(&batch, Some(grad_scale), k + 1 == accum)?;
                // The last micro-batch's stop rides on the loss reduction below.
                if k + 1 < accum && self.stop_agreed()? {
                    abandoned_after = Some(k + 1);
                    break;
                }
            }
            if let Some(done) = abandoned_after {
                // No update: the gradients so far are dropped and the data rewound.
                self.units.release_all(&self.be)?;
                self.train_data.seek(&step_data)?;
                let last = step - 1;
                if let Some(p) = &progress {
                    p.message(&format!(
                        "stop: step {step} abandoned after {done} of {accum} micro-batches (no \
                         update; a resume replays it)"
                    ));
                }
                let dir = self.checkpoint_of_completed(last, last_checkpoint_step, faults)?;
                if let Some(p) = &progress {
                    p.message(&format!("checkpoint of step {last}: {}", dir.display()));
                }
                last_checkpoint = Some(dir);
                stopped_at = Some(last);
                break;
            }
            // A stop request (a signal, seen by any rank) rides on the loss reduction, so every
            // rank agrees on the step after which the job stops.
            let stop_here = (lead && faults.stop_at_step == Some(step)) || stop_requested();
            let totals = self.timed_comm(|me| {
                me.sum_over_ranks(&[local_loss, f32::from(u8::from(stop_here))])
            })?;
            let loss = totals[0] / (accum * world) as f32;
            let stop = totals[1] > 0.0;
            if !loss.is_finite() {
                bail!("the training loss became {loss} at step {step}; try a lower train.lr");
            }
            self.phase(Some(Phase::Optimizer))?;
            let grad_norm = self.units.grad_norm_squared(&self.be)?.sqrt();
            let clip = self.opt.config().clip_scale(grad_norm);
            let lr = schedule.at(step);
            self.opt.step(
                &self.be,
                &self.units.param_shards,
                &self.units.grad_shards,
                lr,
                clip,
            )?;
            self.phase(None)?;
            self.units.release_all(&self.be)?;
            self.be.synchronize()?;
            let step_seconds = step_start.elapsed().as_secs_f64();
            train_seconds += step_seconds;
            step_times.push(step_seconds);
            // Read after the step's clock stopped: reading the marks is not the step's time.
            if let Some(timer) = &mut self.phases {
                timer.add_comm(self.units.take_comm_brackets());
                step_phases.push(timer.finish_step(&self.be, step_seconds * 1e3)?);
            }

            let eval_due =
                t.eval_every > 0 && (step.is_multiple_of(t.eval_every) || step == t.max_steps);
            let val_loss = if eval_due { self.evaluate()? } else { None };
            // An evaluation the ranks agreed to stop part way ends the run after this step.
            let stop = stop || (eval_due && val_loss.is_none());
            if eval_due && val_loss.is_none() {
                if let Some(p) = &progress {
                    p.message(&format!(
                        "stop: the evaluation after step {step} abandoned (no val_loss)"
                    ));
                }
            }
            last_val = val_loss.or(last_val);
            losses.push(loss);
            let record = StepRecord {
                step,
                loss,
                lr,
                grad_norm,
                tokens_per_s: tokens_per_step as f64 / step_seconds,
                elapsed_s: started.elapsed().as_secs_f64(),
                val_loss,
            };
            if let Some(m) = &mut metrics {
                m.write(&record)?;
            }
            if let Some(p) = &progress {
                p.step(&record);
            }
            let every = cfg.checkpoint.every_steps;
            let periodic = every > 0 && (step.is_multiple_of(every) || step == t.max_steps);
            if stop || periodic {
                let dir = self.save_checkpoint(step, faults)?;
                if let Some(p) = &progress {
                    p.message(&format!("checkpoint of step {step}: {}", dir.display()));
                }
                last_checkpoint = Some(dir);
                last_checkpoint_step = Some(step);
            }
            if stop {
                stopped_at = Some(step);
                break;
            }
        }
        if let Some(p) = &progress {
            p.finish();
        }
        let op_times = self.be.take_op_times()?;
        self.be.set_op_timing(false);

        // Every rank takes part in gathering the final weights; rank 0 writes them.
        let weights = if cfg.checkpoint.save_final && stopped_at.is_none() {
            let master = self.opt.master(&self.units.param_shards);
            let full = self.units.gather_full(&self.be, master)?;
            let path = self.run_dir.join(WEIGHTS_FILE);
            if lead {
                weights::save(&path, &self.model.layout, &full)?;
            }
            Some(path)
        } else {
            None
        };
        if !lead {
            return Ok(None);
        }
        let summary = TrainSummary {
            commit: env!("SHARDTRAIN_COMMIT").to_string(),
            device: self.be.name(),
            world_size: world,
            strategy: serde_json::to_value(plan.strategy)?
                .as_str()
                .unwrap_or("?")
                .to_string(),
            params: numel,
            first_step,
            steps: losses.len() as u64,
            stopped_at,
            checkpoint: last_checkpoint,
            tokens: tokens_per_step * losses.len() as u64,
            train_seconds,
            tokens_per_s: (tokens_per_step * losses.len() as u64) as f64 / train_seconds,
            median_step_seconds: median_step(&step_times, profile_from),
            first_loss: losses.first().copied().unwrap_or(f32::NAN),
            final_loss: losses.last().copied().unwrap_or(f32::NAN),
            final_val_loss: last_val,
            losses,
            memory: self.memory_use(),
            zero_formula: zero,
            device_memory_peak: self.be.memory_in_use().map(|(_, peak)| peak),
            op_times,
            weights,
            step_phases,
        };
        let path = self.run_dir.join("summary.json");
        std::fs::write(&path, serde_json::to_string_pretty(&summary)?)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(Some(summary))
    }
}

/// Median of the step times, leaving out the first step (warm-up: allocations, cuBLAS plans) and
/// the op-timed steps from `profile_from` on, unless nothing would remain.
fn median_step(times: &[f64], profile_from: u64) -> f64 {
    let untimed = (profile_from as usize).saturating_sub(1).min(times.len());
    let mut pick: Vec<f64> = times[..untimed].iter().skip(1).copied().collect();
    if pick.is_empty() {
        pick = times.to_vec();
    }
    if pick.is_empty() {
        return f64::NAN;
    }
    pick.sort_by(f64::total_cmp);
    let mid = pick.len() / 2;
    if pick.len() % 2 == 1 {
        pick[mid]
    } else {
        0.5 * (pick[mid - 1] + pick[mid])
    }
}

#[cfg(test)]
mod tests {
    use super::median_step;

    #[test]
    fn median_leaves_out_warm_up_and_timed_steps() {
        // Steps 1..=5; steps 5 on are timed: the median is over steps 2, 3, 4.
        assert_eq!(median_step(&[9.0, 1.0, 3.0, 2.0, 7.0], 5), 2.0);
        // Nothing timed (profile_from past the end): steps 2..=4 → 1, 2, 3 → 2.
        assert_eq!(median_step(&[9.0, 1.0, 2.0, 3.0], 5), 2.0);
        // Even count averages the middle two.
        assert_eq!(median_step(&[9.0, 1.0, 2.0, 3.0, 4.0], 6), 2.5);
        // A single step is its own median.
        assert_eq!(median_step(&[4.0], 2), 4.0);
    }
}
