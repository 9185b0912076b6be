//! One rank's training loop: its backend, model, sharding engine, optimizer and data slice; every
//! step's micro-batches, loss and gradient-norm reductions, the sharded AdamW update, evaluation,
//! and on rank 0 the metrics, progress and output files.

use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};

use super::metrics::{MetricsWriter, StepRecord};
use super::optimizer::{AdamW, AdamWConfig};
use super::plan_report::planned_memory;
use super::progress::Progress;
use super::schedule::LrSchedule;
use super::{gpt_shape, initial_weights, weights, Faults, TrainSummary, WEIGHTS_FILE};
use crate::backend::{Backend, Buffer, DType};
use crate::comm::local::LocalComm;
use crate::comm::{Communicator, ReduceOp};
use crate::config::Config;
use crate::data::synthetic::{ArithmeticCorpus, Split};
use crate::data::{Batch, DataSource};
use crate::model::{Gpt, ParamLayout};
use crate::shard::memory::{mib, zero_model_state_bytes, MemoryUse};
use crate::shard::{RankComms, ShardPlan, ShardedUnits};

fn data_source(cfg: &Config, split: Split) -> ArithmeticCorpus {
    let s = &cfg.data.synthetic;
    ArithmeticCorpus::new(s.max_operand, s.val_fraction, cfg.train.seed, split)
}

/// One rank's training state.
pub(super) struct RankTrainer<'a, B: Backend> {
    be: B,
    rank: usize,
    cfg: &'a Config,
    run_dir: &'a Path,
    model: Gpt<B>,
    units: ShardedUnits<B, LocalComm>,
    opt: AdamW<B>,
    train_data: ArithmeticCorpus,
    val_data: ArithmeticCorpus,
}

impl<'a, B: Backend> RankTrainer<'a, B> {
    pub(super) fn new(
        be: B,
        rank: usize,
        cfg: &'a Config,
        run_dir: &'a Path,
        plan: ShardPlan,
        comms: RankComms<LocalComm>,
    ) -> Result<Self> {
        let layout = ParamLayout::gpt(gpt_shape(cfg), cfg.model.init_std);
        let dtype = plan.param_dtype;
        let units = ShardedUnits::new(&be, &layout, plan, comms)?;
        let group_rank = units.group_rank();
        let shards = units.shard_layout().clone();
        let segments = (0..layout.units.len())
            .map(|u| shards.segments(&layout, u, group_rank))
            .collect();
        let opt = AdamW::new(
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
        // Every rank draws the same full initial weights and keeps its own range: identical
        // weights whatever the world size.
        for (u, full) in initial_weights(&layout, cfg.train.seed).iter().enumerate() {
            let mine = shards.shard_of(u, group_rank, full);
            opt.set_master(&be, u, &mine, &units.param_shards)?;
        }
        Ok(RankTrainer {
            model: Gpt::new(layout, dtype),
            units,
            opt,
            train_data: data_source(cfg, Split::Train),
            val_data: data_source(cfg, Split::Val),
            be,
            rank,
            cfg,
            run_dir,
        })
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
            self.units.start_backward();
            self.model.backward(&self.be, &mut self.units, &inputs)?;
        }
        self.model.mean_loss(&self.be)
    }

    /// Mean loss over `eval_tokens` held-out tokens (the same tokens at every evaluation, split
    /// across ranks; every rank runs the same number of passes, since gathers are collective).
    fn evaluate(&mut self) -> Result<f32> {
        let (micro, seq) = (self.cfg.train.micro_batch_size, self.cfg.model.seq_len);
        let total = self.cfg.train.eval_tokens.div_ceil(micro * seq).max(1);
        let world = self.world_size();
        self.val_data.rewind();
        let (mut sum, mut count) = (0.0f32, 0.0f32);
        for round in 0..total.div_ceil(world) {
            let mut mine = None;
            for r in 0..world {
                let batch = self.val_data.next_batch(micro, seq);
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
        self.units.release_all();
        let totals = self.sum_over_ranks(&[sum, count])?;
        Ok(totals[0] / totals[1])
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
            Some(MetricsWriter::create(
                &self.run_dir.join(&cfg.logging.metrics_file),
            )?)
        } else {
            None
        };
        let progress =
            lead.then(|| Progress::new(cfg.logging.progress, t.max_steps, cfg.logging.every_steps));
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
        let mut step_times = Vec::with_capacity(t.max_steps as usize);
        let profile_from = t.max_steps.saturating_sub(cfg.logging.profile_ops_steps) + 1;
        let started = Instant::now();
        let mut losses = Vec::with_capacity(t.max_steps as usize);
        let mut last_val = None;
        for step in 1..=t.max_steps {
            if faults.fail_rank_at_step == Some((self.rank, step)) {
                bail!("injected failure at step {step}");
            }
            if lead && step == profile_from {
                self.be.synchronize()?;
                self.be.set_op_timing(true);
            }
            let step_start = Instant::now();
            self.units.zero_grads(&self.be)?;
            let mut local_loss = 0.0f32;
            for k in 0..accum {
                let global = self.train_data.next_batch(micro * world, seq);
                let batch = self.my_rows(&global);
                local_loss += self.forward_backward(&batch, Some(grad_scale), k + 1 == accum)?;
            }
            let loss = self.sum_over_ranks(&[local_loss])?[0] / (accum * world) as f32;
            if !loss.is_finite() {
                bail!("the training loss became {loss} at step {step}; try a lower train.lr");
            }
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
            self.units.release_all();
            self.be.synchronize()?;
            let step_seconds = step_start.elapsed().as_secs_f64();
            train_seconds += step_seconds;
            step_times.push(step_seconds);

            let eval_due =
                t.eval_every > 0 && (step.is_multiple_of(t.eval_every) || step == t.max_steps);
            let val_loss = if eval_due {
                Some(self.evaluate()?)
            } else {
                None
            };
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
        }
        if let Some(p) = &progress {
            p.finish();
        }
        let op_times = self.be.take_op_times()?;
        self.be.set_op_timing(false);

        // Every rank takes part in gathering the final weights; rank 0 writes them.
        let weights = if cfg.checkpoint.save_final {
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
            steps: t.max_steps,
            tokens: tokens_per_step * t.max_steps,
            train_seconds,
            tokens_per_s: (tokens_per_step * t.max_steps) as f64 / train_seconds,
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
