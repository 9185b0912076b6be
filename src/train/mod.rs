//! The training loop: builds the backend, model, optimizer and data from a validated config, runs
//! the steps (gradient accumulation, clipping, AdamW, schedule, evaluation) and writes the run
//! directory: `config.yaml`, the metrics file, `model.safetensors`, `summary.json`.

pub mod metrics;
pub mod optimizer;
pub mod progress;
pub mod schedule;
pub mod weights;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, DType};
use crate::config::{Config, DeviceKind};
use crate::data::synthetic::{ArithmeticCorpus, Split};
use crate::data::DataSource;
use crate::model::init::init_tensor;
use crate::model::{Gpt, GptShape, ParamLayout, ResidentParams};
use metrics::{MetricsWriter, StepRecord};
use optimizer::{AdamW, AdamWConfig};
use progress::Progress;
use schedule::LrSchedule;

/// Name of the final weights inside a run directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Name of the resolved config inside a run directory.
pub const CONFIG_FILE: &str = "config.yaml";

/// Bytes per rank, by what they hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemoryUse {
    pub params: usize,
    pub grads: usize,
    pub optimizer: usize,
    pub activations: usize,
}

/// What a finished run reports (also written as `summary.json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainSummary {
    /// The commit the binary was built from.
    pub commit: String,
    pub device: String,
    pub params: usize,
    pub steps: u64,
    pub tokens: u64,
    /// Time spent in training steps (evaluation excluded).
    pub train_seconds: f64,
    pub tokens_per_s: f64,
    pub first_loss: f32,
    pub final_loss: f32,
    pub final_val_loss: Option<f32>,
    pub memory: MemoryUse,
    pub weights: Option<PathBuf>,
}

/// The model shape a config describes.
pub fn gpt_shape(cfg: &Config) -> GptShape {
    GptShape {
        n_layer: cfg.model.n_layer,
        n_head: cfg.model.n_head,
        d_model: cfg.model.d_model,
        vocab_size: cfg.model.vocab_size,
        block_size: cfg.model.block_size,
    }
}

/// Runs the training job `cfg` (already validated), writing into the existing, empty `run_dir`.
pub fn train(cfg: &Config, run_dir: &Path) -> Result<TrainSummary> {
    match cfg.device {
        DeviceKind::Auto | DeviceKind::Cpu => {
            Trainer::new(CpuBackend::<f32>::new(), cfg, run_dir)?.run()
        }
    }
}

fn data_source(cfg: &Config, split: Split) -> ArithmeticCorpus {
    let s = &cfg.data.synthetic;
    ArithmeticCorpus::new(s.max_operand, s.val_fraction, cfg.train.seed, split)
}

/// Initial weights of every unit, on the host.
pub fn initial_weights(layout: &ParamLayout, seed: u64) -> Vec<Vec<f32>> {
    let mut units: Vec<Vec<f32>> = layout.units.iter().map(|u| vec![0.0; u.numel]).collect();
    for (u, t) in layout.tensors() {
        units[u][t.offset..t.offset + t.numel()].copy_from_slice(&init_tensor(t, seed));
    }
    units
}

struct Trainer<'a, B: Backend> {
    be: B,
    cfg: &'a Config,
    run_dir: &'a Path,
    model: Gpt<B>,
    units: ResidentParams<B>,
    opt: AdamW<B>,
    train_data: ArithmeticCorpus,
    val_data: ArithmeticCorpus,
}

impl<'a, B: Backend> Trainer<'a, B> {
    fn new(be: B, cfg: &'a Config, run_dir: &'a Path) -> Result<Self> {
        let layout = ParamLayout::gpt(gpt_shape(cfg), cfg.model.init_std);
        let dtype = DType::F32;
        let units = ResidentParams::alloc(&be, &layout, dtype)?;
        let opt = AdamW::new(
            &be,
            &layout,
            &units.params,
            AdamWConfig {
                beta1: cfg.train.beta1,
                beta2: cfg.train.beta2,
                eps: cfg.train.eps,
                weight_decay: cfg.train.weight_decay,
                grad_clip: cfg.train.grad_clip,
            },
        )?;
        for (u, values) in initial_weights(&layout, cfg.train.seed).iter().enumerate() {
            opt.set_master(&be, u, values, &units.params)?;
        }
        Ok(Trainer {
            model: Gpt::new(layout, dtype),
            units,
            opt,
            train_data: data_source(cfg, Split::Train),
            val_data: data_source(cfg, Split::Val),
            be,
            cfg,
            run_dir,
        })
    }

    /// Mean loss over `eval_tokens` held-out tokens (the same tokens at every evaluation).
    fn evaluate(&mut self) -> Result<f32> {
        let (micro, seq) = (self.cfg.train.micro_batch_size, self.cfg.model.seq_len);
        let batches = self.cfg.train.eval_tokens.div_ceil(micro * seq).max(1);
        self.val_data.rewind();
        let mut sum = 0.0f64;
        for _ in 0..batches {
            let batch = self.val_data.next_batch(micro, seq);
            let inputs = self.be.upload_ids(&batch.inputs)?;
            let targets = self.be.upload_ids(&batch.targets)?;
            self.model.forward(
                &self.be,
                &mut self.units,
                &inputs,
                Some(&targets),
                None,
                micro,
                seq,
            )?;
            sum += f64::from(self.model.mean_loss(&self.be)?);
        }
        Ok((sum / batches as f64) as f32)
    }

    fn run(mut self) -> Result<TrainSummary> {
        let cfg = self.cfg;
        let t = &cfg.train;
        let (micro, seq) = (t.micro_batch_size, cfg.model.seq_len);
        let accum = t.grad_accum_steps(cfg.parallel.world_size);
        let tokens_per_step = (t.global_batch_size * seq) as u64;
        // Each micro-batch's loss is a mean over its tokens; scaling by 1/accum makes the
        // accumulated gradient that of the mean over the whole global batch.
        let grad_scale = 1.0 / (micro * seq * accum) as f32;
        let schedule = LrSchedule {
            lr: t.lr,
            min_lr: t.min_lr,
            warmup_steps: t.warmup_steps,
            max_steps: t.max_steps,
        };
        let mut metrics = MetricsWriter::create(&self.run_dir.join(&cfg.logging.metrics_file))?;
        let progress = Progress::new(cfg.logging.progress, t.max_steps, cfg.logging.every_steps);
        progress.message(&format!(
            "training {} parameters on {} | {} steps x {} tokens (micro-batch {micro} x {seq}, {accum} accumulation steps)",
            self.model.layout.numel(),
            self.be.name(),
            t.max_steps,
            tokens_per_step,
        ));

        let mut train_seconds = 0.0f64;
        let started = Instant::now();
        let (mut first_loss, mut last_loss, mut last_val) = (f32::NAN, f32::NAN, None);
        for step in 1..=t.max_steps {
            let step_start = Instant::now();
            for g in &self.units.grads {
                self.be.fill(g, 0.0)?;
            }
            let mut loss_sum = 0.0f64;
            for _ in 0..accum {
                let batch = self.train_data.next_batch(micro, seq);
                let inputs = self.be.upload_ids(&batch.inputs)?;
                let targets = self.be.upload_ids(&batch.targets)?;
                self.model.forward(
                    &self.be,
                    &mut self.units,
                    &inputs,
                    Some(&targets),
                    Some(grad_scale),
                    micro,
                    seq,
                )?;
                self.model.backward(&self.be, &mut self.units, &inputs)?;
                loss_sum += f64::from(self.model.mean_loss(&self.be)?);
            }
            let loss = (loss_sum / accum as f64) as f32;
            if !loss.is_finite() {
                bail!("the training loss became {loss} at step {step}; try a lower train.lr");
            }
            let lr = schedule.at(step);
            let stats = self.opt.step(
                &self.be,
                &self.model.layout,
                &self.units.params,
                &self.units.grads,
                lr,
            )?;
            self.be.synchronize()?;
            let step_seconds = step_start.elapsed().as_secs_f64();
            train_seconds += step_seconds;

            let eval_due =
                t.eval_every > 0 && (step.is_multiple_of(t.eval_every) || step == t.max_steps);
            let val_loss = if eval_due {
                Some(self.evaluate()?)
            } else {
                None
            };
            if step == 1 {
                first_loss = loss;
            }
            last_loss = loss;
            last_val = val_loss.or(last_val);
            let record = StepRecord {
                step,
                loss,
                lr,
                grad_norm: stats.grad_norm,
                tokens_per_s: tokens_per_step as f64 / step_seconds,
                elapsed_s: started.elapsed().as_secs_f64(),
                val_loss,
            };
            metrics.write(&record)?;
            progress.step(&record);
        }
        progress.finish();

        let weights = if cfg.checkpoint.save_final {
            let path = self.run_dir.join(WEIGHTS_FILE);
            let host = self.download_weights()?;
            weights::save(&path, &self.model.layout, &host)?;
            Some(path)
        } else {
            None
        };
        let summary = TrainSummary {
            commit: env!("SHARDTRAIN_COMMIT").to_string(),
            device: self.be.name(),
            params: self.model.layout.numel(),
            steps: t.max_steps,
            tokens: tokens_per_step * t.max_steps,
            train_seconds,
            tokens_per_s: (tokens_per_step * t.max_steps) as f64 / train_seconds,
            first_loss,
            final_loss: last_loss,
            final_val_loss: last_val,
            memory: self.memory_use(),
            weights,
        };
        let path = self.run_dir.join("summary.json");
        std::fs::write(&path, serde_json::to_string_pretty(&summary)?)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(summary)
    }

    fn download_weights(&self) -> Result<Vec<Vec<f32>>> {
        self.units
            .params
            .iter()
            .map(|p| self.be.download(p))
            .collect()
    }

    fn memory_use(&self) -> MemoryUse {
        use crate::backend::Buffer;
        let size = |bufs: &[B::Buf]| bufs.iter().map(|b| b.len() * b.dtype().size_bytes()).sum();
        MemoryUse {
            params: size(&self.units.params),
            grads: size(&self.units.grads),
            optimizer: self.opt.bytes(),
            activations: self.model.activations().map_or(0, |a| a.bytes()),
        }
    }
}
