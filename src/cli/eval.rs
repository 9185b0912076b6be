//! `shardtrain eval`: the validation loss of a checkpoint, or of a finished run's final weights,
//! over `train.eval_tokens` of the validation data its config names.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use clap::Args;

use super::run_dir::run_dir_of;
use crate::checkpoint::Checkpoint;
use crate::config::Config;
use crate::model::ParamLayout;
use crate::train::{self, gpt_shape, weights, Start, CONFIG_FILE, WEIGHTS_FILE};

#[derive(Debug, Args)]
pub(super) struct EvalArgs {
    /// A checkpoint (a step-N directory), or a run directory: its newest checkpoint, else its
    /// final weights.
    #[arg(long, value_name = "PATH")]
    checkpoint: PathBuf,
    /// Override a key of the run's config, e.g. `--set train.eval_tokens=1048576` or another
    /// `data.val` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

pub(super) fn eval_command(args: EvalArgs) -> Result<()> {
    let (cfg, start, run_dir, what) = match Checkpoint::resolve(&args.checkpoint) {
        Ok(ckpt) => {
            let cfg = ckpt.config(&args.set)?;
            let what = format!("step {}, {}", ckpt.meta.step, ckpt.dir.display());
            let run_dir = run_dir_of(&ckpt.dir).unwrap_or_else(|| ckpt.dir.clone());
            (cfg, Start::Resume(Arc::new(ckpt)), run_dir, what)
        }
        Err(no_checkpoint) if has_final_weights(&args.checkpoint) => {
            tracing::debug!("no checkpoint: {no_checkpoint:#}");
            let dir = &args.checkpoint;
            let cfg = Config::load(Some(&dir.join(CONFIG_FILE)), &args.set)?;
            let layout = ParamLayout::gpt(gpt_shape(&cfg), cfg.model.init_std);
            let weights = weights::load(&dir.join(WEIGHTS_FILE), &layout)?;
            let what = format!("final weights, {}", dir.join(WEIGHTS_FILE).display());
            (cfg, Start::Weights(Arc::new(weights)), dir.clone(), what)
        }
        Err(e) => return Err(e),
    };
    let device = train::device::resolve(cfg.device)?;
    let loss = train::evaluate(&device, &cfg, start, &run_dir)?;
    println!(
        "val_loss {loss:.4} ({what}; {} tokens of validation data)",
        cfg.train.eval_tokens
    );
    Ok(())
}

fn has_final_weights(dir: &Path) -> bool {
    dir.join(WEIGHTS_FILE).is_file() && dir.join(CONFIG_FILE).is_file()
}
