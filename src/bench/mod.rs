//! `shardtrain bench`: what a training job costs at each world size and sharding strategy. Each
//! row is a real training run in this process (ranks as threads sharing the device), measured
//! for throughput, MFU, memory per rank and time per phase (forward, backward, optimizer,
//! communication exposed and overlapped: see `train::phases` for how each is measured).
//!
//! Parts: `rows` (the jobs, every input checked before any runs), `run` (one row's run and
//! figures), `hardware` (card name, peak FLOP/s), `report` (the JSON document and the table),
//! `plot` (the SVG).

mod hardware;
pub mod plot;
mod report;
mod rows;
mod run;

use std::path::PathBuf;

use anyhow::Result;

use crate::config::{DeviceKind, ShardStrategy, EMBEDDED_ORIGIN};
use crate::model::ParamLayout;
use crate::train::{self, gpt_shape};

pub use hardware::datasheet_peak;
pub use report::{
    render_table, BenchReport, BenchRow, MemoryBytes, ModelShape, PhasesMs, Spread, SCHEMA,
};
pub use rows::{parse_strategy, strategy_name};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The job's config file (the built-in configs/tiny.yaml when `None`).
    pub config: Option<PathBuf>,
    /// World sizes, in table order.
    pub worlds: Vec<usize>,
    /// Strategies, in table order within each world size.
    pub strategies: Vec<ShardStrategy>,
    /// Timed steps per row.
    pub steps: u64,
    /// Untimed steps before them.
    pub warmup: u64,
    /// The device's peak in TFLOP/s (for MFU), instead of the known figure for the card.
    pub peak_tflops: Option<f64>,
    /// `--set key=value` overrides of the config, in order.
    pub sets: Vec<String>,
    /// Overrides the config's `device`.
    pub device: Option<DeviceKind>,
}

/// FLOPs of training on one token: 6N (forward and backward through the weights) + 12·L·d·T
/// (attention scores and their use, forward and backward), as in the PaLM paper and llm.c.
pub fn flops_per_token(params: usize, n_layer: usize, d_model: usize, seq_len: usize) -> f64 {
    6.0 * params as f64 + 12.0 * (n_layer * d_model * seq_len) as f64
}

/// Runs every row, reporting each as it starts through `progress`. Every input is checked
/// before the first row runs. `date` and `command` of the report are left empty for the caller.
pub fn run(opts: &BenchOptions, mut progress: impl FnMut(&str)) -> Result<BenchReport> {
    let prepared = rows::prepare(opts)?;
    let base = &prepared.base;
    let device = train::device::resolve(base.device)?;
    // Every row is admitted before the first runs: a row too large for this machine is refused
    // up front, not after the smaller rows' minutes.
    for job in &prepared.jobs {
        train::admission::admit(
            &job.cfg,
            &device,
            train::admission::Sharing::local(&job.cfg),
        )?;
    }
    let precision = &base.parallel.mixed_precision;
    let hw = hardware::describe(&device, precision.param_dtype, opts.peak_tflops);
    let m = &base.model;
    let params = ParamLayout::gpt(gpt_shape(base), m.init_std).numel();
    let rates = run::Rates {
        flops_per_token: flops_per_token(params, m.n_layer, m.d_model, m.seq_len),
        peak_flops: hw.peak_flops,
    };
    // `model.init_from` is read once; every row starts from the same weights.
    let start = train::start_of(base, None)?;
    let scratch = run::scratch_dir(&std::env::temp_dir(), "shardtrain-bench-")?;
    let mut rows = Vec::new();
    let mut backend = String::new();
    let total = prepared.jobs.len();
    for (i, job) in prepared.jobs.iter().enumerate() {
        progress(&format!(
            "bench: row {}/{total}: world {}, {} ({} + {} steps)",
            i + 1,
            job.world,
            strategy_name(job.strategy),
            opts.warmup,
            opts.steps
        ));
        let (row, summary) = run::run_row(
            scratch.path(),
            &device,
            &job.cfg,
            &start,
            opts.warmup,
            &rates,
        )?;
        backend = summary.device;
        rows.push(row);
    }
    Ok(BenchReport {
        schema: SCHEMA.to_string(),
        device: hw.device.to_string(),
        card: hw.card,
        config: opts
            .config
            .as_ref()
            .map_or_else(|| EMBEDDED_ORIGIN.to_string(), |p| p.display().to_string()),
        params,
        flops_per_token: rates.flops_per_token,
        peak_flops: hw.peak_flops,
        rows,
        peak_flops_source: hw.peak_source,
        devices: 1,
        backend,
        model: ModelShape {
            n_layer: m.n_layer,
            n_head: m.n_head,
            d_model: m.d_model,
            vocab_size: m.vocab_size,
            seq_len: m.seq_len,
        },
        param_dtype: precision.param_dtype.to_string(),
        reduce_dtype: precision.reduce_dtype.to_string(),
        warmup_steps: opts.warmup,
        date: String::new(),
        commit: env!("SHARDTRAIN_COMMIT").to_string(),
        command: String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::flops_per_token;

    #[test]
    fn gpt2_small_costs_the_flops_facts_quote() {
        // FACTS.md: GPT-2 124M (124,475,904 parameters with the 50304 vocabulary), L=12, d=768,
        // T=1024: 0.860 GFLOP per token.
        let f = flops_per_token(124_475_904, 12, 768, 1024);
        assert!((f / 1e9 - 0.860).abs() < 0.001, "{f}");
    }
}
