//! `shardtrain eval`: the validation loss of a checkpoint, or of a finished run's final weights,
//! over `train.eval_tokens` of the validation data its config names.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use clap::Args;

use super::run_dir::run_dir_of;
use crate::checkpoint::meta::META_FILE;
use crate::checkpoint::read::list_checkpoints;
use crate::checkpoint::Checkpoint;
use crate::config::Config;
use crate::model::ParamLayout;
use crate::train::{self, gpt_shape, weights, Start, CONFIG_FILE, WEIGHTS_FILE};

#[derive(Debug, Args)]
pub(super) struct EvalArgs {
    /// A checkpoint (a step-N directory), or a run directory: its newest checkpoint (an error if
    /// it is damaged), or, in a run without checkpoints, its final weights.
    #[arg(long, value_name = "PATH")]
    checkpoint: PathBuf,
    /// Override a key of the run's config, e.g. `--set train.eval_tokens=1048576` or another
    /// `data.val` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

pub(super) fn eval_command(args: EvalArgs) -> Result<()> {
    // A finished checkpoint, when there is one, is what is evaluated: a damaged one is an error
    // (exit 2), never a reason to evaluate something else. Only a run without any checkpoint
    // falls back to its final weights.
    let (cfg, start, run_dir, what) =
        if has_checkpoint(&args.checkpoint)? || !has_final_weights(&args.checkpoint) {
            let ckpt = Checkpoint::resolve(&args.checkpoint)?;
            let cfg = ckpt.config(&args.set)?;
            let what = format!(
                "checkpoint {} at step {}",
                ckpt.dir.display(),
                ckpt.meta.step
            );
            let run_dir = run_dir_of(&ckpt.dir).unwrap_or_else(|| ckpt.dir.clone());
            (cfg, Start::Resume(Arc::new(ckpt)), run_dir, what)
        } else {
            let dir = &args.checkpoint;
            let cfg = Config::load(Some(&dir.join(CONFIG_FILE)), &args.set)?;
            let layout = ParamLayout::gpt(gpt_shape(&cfg), cfg.model.init_std);
            let weights = weights::load(&dir.join(WEIGHTS_FILE), &layout)?;
            let what = format!(
                "the run's final weights {} (it has no checkpoint)",
                dir.join(WEIGHTS_FILE).display()
            );
            (cfg, Start::Weights(Arc::new(weights)), dir.clone(), what)
        };
    println!("evaluating {what}");
    let device = train::device::resolve(cfg.device)?;
    let loss = train::evaluate(&device, &cfg, start, &run_dir)?;
    println!(
        "val_loss {loss:.4} ({what}; {} tokens of validation data)",
        cfg.train.eval_tokens
    );
    Ok(())
}

/// `path` is a checkpoint, or holds finished checkpoints itself or in its `checkpoints/`.
fn has_checkpoint(path: &Path) -> Result<bool> {
    if path.join(META_FILE).is_file() {
        return Ok(true);
    }
    for root in [path.to_path_buf(), path.join("checkpoints")] {
        if !list_checkpoints(&root)?.is_empty() {
            return Ok(true);
        }
    }
    Ok(false)
}

fn has_final_weights(dir: &Path) -> bool {
    dir.join(WEIGHTS_FILE).is_file() && dir.join(CONFIG_FILE).is_file()
}
