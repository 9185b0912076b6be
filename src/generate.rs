//! Text generation from a finished run: loads the run's resolved config and final weights, then
//! samples one token at a time (temperature, top-k) with a seeded RNG, so a sample is reproducible.

use std::path::Path;

use anyhow::{bail, Context, Result};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, DType};
use crate::config::{Config, DataKind};
use crate::data::tokenizer::Tokenizer;
use crate::error::UsageError;
use crate::model::{Gpt, ParamLayout, ResidentParams};
use crate::train::{gpt_shape, weights, CONFIG_FILE, WEIGHTS_FILE};

/// How to sample.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleOptions {
    pub prompt: String,
    pub max_tokens: usize,
    /// 0 picks the most likely token every time.
    pub temperature: f32,
    /// Sample among the `top_k` most likely tokens; 0 means all.
    pub top_k: usize,
    pub seed: u64,
}

/// Generates a continuation of `opts.prompt` from the final weights in `run_dir`; returns only
/// the generated text.
pub fn sample_from_run(run_dir: &Path, opts: &SampleOptions) -> Result<String> {
    check_options(opts)?;
    let cfg = Config::load(Some(&run_dir.join(CONFIG_FILE)), &[])?;
    let weights_path = run_dir.join(WEIGHTS_FILE);
    if !weights_path.exists() {
        bail!(
            "{} does not exist: the run has no final weights (did it finish, with checkpoint.save_final: true? a stopped run: use --checkpoint)",
            weights_path.display()
        );
    }
    let layout = ParamLayout::gpt(gpt_shape(&cfg), cfg.model.init_std);
    let host = weights::load(&weights_path, &layout)?;
    sample(&cfg, layout, &host, opts)
}

/// [`sample_from_run`] from the master weights of a checkpoint (a `step-N` directory, or the
/// newest checkpoint of a run directory).
pub fn sample_from_checkpoint(path: &Path, opts: &SampleOptions) -> Result<String> {
    check_options(opts)?;
    let ckpt = crate::checkpoint::Checkpoint::resolve(path)?;
    let cfg = ckpt.config(&[])?;
    let layout = ParamLayout::gpt(gpt_shape(&cfg), cfg.model.init_std);
    let host = ckpt.full_weights(&layout)?;
    sample(&cfg, layout, &host, opts)
}

fn check_options(opts: &SampleOptions) -> Result<()> {
    if !(opts.temperature >= 0.0 && opts.temperature.is_finite()) {
        return Err(UsageError(format!(
            "--temperature must be a finite number >= 0, got {}",
            opts.temperature
        ))
        .into());
    }
    Ok(())
}

/// Generates from full weights `host` (one buffer per unit of `layout`).
fn sample(
    cfg: &Config,
    layout: ParamLayout,
    host: &[Vec<f32>],
    opts: &SampleOptions,
) -> Result<String> {
    let be = CpuBackend::<f32>::new();
    let mut units = ResidentParams::alloc(&be, &layout, DType::F32)?;
    for (buf, values) in units.params.iter().zip(host) {
        be.upload(buf, values)?;
    }
    let mut model = Gpt::new(layout, DType::F32);
    let vocab = cfg.model.vocab_size;
    let tokenizer = Tokenizer::new(cfg.data.tokenizer);
    // Rows of a padded embedding table past the tokenizer's vocabulary are never sampled.
    let sample_vocab = vocab.min(tokenizer.vocab_size());

    // An empty prompt starts where documents start: after an end-of-text token, or, for the
    // synthetic corpus (one problem per line), at a line boundary.
    let mut tokens = match (opts.prompt.is_empty(), cfg.data.kind) {
        (false, _) => tokenizer.encode(&opts.prompt),
        (true, DataKind::Synthetic) => tokenizer.encode("\n"),
        (true, _) => vec![tokenizer.eot()],
    };
    let prompt_len = tokens.len();
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    for _ in 0..opts.max_tokens {
        let context = &tokens[tokens.len().saturating_sub(cfg.model.block_size)..];
        let seq = context.len();
        let ids = be.upload_ids(context)?;
        model
            .forward(&be, &mut units, &ids, None, None, 1, seq)
            .context("running the model")?;
        let acts = model.activations().expect("forward ran");
        let logits = be.download(&be.slice(&acts.logits, (seq - 1) * vocab, vocab)?)?;
        let next = pick(&logits[..sample_vocab], opts, &mut rng);
        // A document's end ends the sample (the synthetic corpus never produces one).
        if next == tokenizer.eot() && cfg.data.kind != DataKind::Synthetic {
            break;
        }
        tokens.push(next);
    }
    Ok(tokenizer.decode(&tokens[prompt_len..]))
}

/// Chooses the next token from one row of logits.
fn pick(logits: &[f32], opts: &SampleOptions, rng: &mut ChaCha8Rng) -> u32 {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if opts.temperature == 0.0 {
        return order[0] as u32;
    }
    if opts.top_k > 0 {
        order.truncate(opts.top_k);
    }
    let max = logits[order[0]];
    let weights: Vec<f64> = order
        .iter()
        .map(|&i| f64::from((logits[i] - max) / opts.temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut r = rng.random::<f64>() * total;
    for (&i, w) in order.iter().zip(&weights) {
        if r < *w {
            return i as u32;
        }
        r -= w;
    }
    order[order.len() - 1] as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(temperature: f32, top_k: usize) -> SampleOptions {
        SampleOptions {
            prompt: String::new(),
            max_tokens: 1,
            temperature,
            top_k,
            seed: 0,
        }
    }

    #[test]
    fn zero_temperature_is_greedy_and_top_k_restricts() {
        let logits = [0.1, 3.0, 2.9, -1.0];
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        assert_eq!(pick(&logits, &opts(0.0, 0), &mut rng), 1);
        for _ in 0..200 {
            let t = pick(&logits, &opts(1.0, 2), &mut rng);
            assert!(t == 1 || t == 2, "{t}");
        }
    }
}
