//! One bench row: a real training run in this process (ranks as threads, as `train` runs them)
//! with phase timing on, in a scratch run directory that is removed afterwards, and its summary
//! turned into the row's figures. The rows' directories sit in one scratch directory of the
//! whole bench, so what a run keeps beside its run directory (the token cache of `data.kind:
//! text`) is shared by the rows and removed with it.

use std::path::Path;

use anyhow::{Context, Result};

use super::report::{BenchRow, MemoryBytes, PhasesMs, Spread};
use super::rows::strategy_name;
use crate::config::Config;
use crate::train::device::Device;
use crate::train::phases::StepPhases;
use crate::train::{self, Faults, Instruments, Start, TrainSummary};

/// What turns a row's times into rates.
pub(super) struct Rates {
    pub flops_per_token: f64,
    /// FLOP/s of all the devices the ranks share; `None`: no MFU.
    pub peak_flops: Option<f64>,
}

/// Trains `cfg` (a row's config) in a fresh directory inside `scratch` and measures it; the first
/// `warmup` steps are not timed.
pub(super) fn run_row(
    scratch: &Path,
    device: &Device,
    cfg: &Config,
    start: &Start,
    warmup: u64,
    rates: &Rates,
) -> Result<(BenchRow, TrainSummary)> {
    let dir = scratch_dir(scratch, "row-")?;
    let instruments = Instruments {
        phase_times: true,
        quiet: true,
    };
    let summary = train::train_instrumented(
        device,
        cfg,
        dir.path(),
        start,
        &Faults::default(),
        instruments,
    )?;
    let row = row_of(cfg, &summary, warmup, rates)?;
    Ok((row, summary))
}

/// The row's figures from a finished run's summary.
pub(super) fn row_of(
    cfg: &Config,
    s: &TrainSummary,
    warmup: u64,
    rates: &Rates,
) -> Result<BenchRow> {
    let timed: &[StepPhases] = s.step_phases.get(warmup as usize..).unwrap_or(&[]);
    anyhow::ensure!(
        !timed.is_empty(),
        "the run of world {} took {} steps with phase times, none after the {warmup} warm-up steps",
        s.world_size,
        s.step_phases.len()
    );
    let world = cfg.parallel.world_size;
    let step_ms: Vec<f64> = timed.iter().map(|p| p.step_ms).collect();
    let spread = Spread::of(&step_ms);
    let tokens_per_step = (cfg.train.global_batch_size * cfg.model.seq_len) as f64;
    let tokens_per_s = tokens_per_step / (spread.median / 1e3);
    let mean = StepPhases::mean(timed);
    let m = &s.memory;
    Ok(BenchRow {
        world_size: world,
        strategy: strategy_name(cfg.parallel.strategy),
        micro_batch_size: cfg.train.micro_batch_size,
        global_batch_size: cfg.train.global_batch_size,
        steps: timed.len() as u64,
        ms_per_step: spread,
        tokens_per_s,
        tokens_per_s_per_rank: tokens_per_s / world as f64,
        mfu: rates
            .peak_flops
            .map(|peak| tokens_per_s * rates.flops_per_token / peak),
        memory_bytes: MemoryBytes {
            params: m.master_params + m.param_shards + m.gathered_params_peak,
            grads: m.grads,
            optimizer: m.optimizer,
            activations: m.activations,
            total: m.total(),
        },
        phases_ms: PhasesMs {
            forward: mean.forward_ms,
            backward: mean.backward_ms,
            optimizer: mean.optimizer_ms,
            comm_exposed: mean.comm_exposed_ms,
            comm_overlapped: mean.comm_overlapped_ms(),
            comm_total: mean.comm_total_ms.max(mean.comm_exposed_ms),
            other: mean.other_ms(),
        },
        grad_accum_steps: cfg.train.grad_accum_steps(world),
        device_memory_peak: s.device_memory_peak,
        first_loss: s.first_loss,
        final_loss: s.final_loss,
    })
}

/// A fresh scratch directory in `base` (removed when dropped): a row's run directory, or the
/// bench's own, which holds every row's and any `data.kind: text` token cache.
pub(super) fn scratch_dir(base: &Path, prefix: &str) -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(base)
        .with_context(|| format!("creating a scratch run directory in {}", base.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_directories_are_fresh_and_removed() {
        let a = scratch_dir(&std::env::temp_dir(), "shardtrain-bench-").unwrap();
        let b = scratch_dir(&std::env::temp_dir(), "shardtrain-bench-").unwrap();
        assert_ne!(a.path(), b.path());
        let row = scratch_dir(a.path(), "row-").unwrap();
        assert_eq!(row.path().parent(), Some(a.path()));
        std::fs::write(row.path().join("f"), "x").unwrap();
        std::fs::write(a.path().join("cache"), "x").unwrap();
        let (path, row_path) = (a.path().to_path_buf(), row.path().to_path_buf());
        drop(row);
        assert!(!row_path.exists() && path.exists());
        drop(a);
        assert!(!path.exists());
    }
}
