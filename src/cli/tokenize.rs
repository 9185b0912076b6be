//! `shardtrain tokenize`: raw UTF-8 text files into token shards in llm.c's format, ready for
//! `data.kind: shards`. Each input file is one document; documents are separated by the
//! end-of-text token. Tokenizers: `bytes` (one token per UTF-8 byte; end-of-text is byte 0,
//! which text never contains). GPT-2's BPE is not built yet (say so rather than guess).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use rayon::prelude::*;

use crate::data::shards::write_shards;
use crate::data::tokenizer::encode_bytes;
use crate::error::UsageError;

/// End-of-text token of the byte tokenizer.
pub const BYTES_EOT: u32 = 0;

#[derive(Debug, Args)]
pub(super) struct TokenizeArgs {
    /// UTF-8 text files, one document each.
    #[arg(required = true, value_name = "INPUT")]
    inputs: Vec<PathBuf>,
    /// Output prefix: shards are written as PREFIX_train_000000.bin, PREFIX_val_000000.bin, ...
    #[arg(long, short, value_name = "OUT_PREFIX")]
    output: PathBuf,
    /// bytes (GPT-2's BPE is not available yet).
    #[arg(long, default_value = "bytes")]
    tokenizer: String,
    /// Tokens per shard at most.
    #[arg(long, default_value_t = 100_000_000)]
    shard_tokens: usize,
    /// Share of the tokens (the first ones) written as validation shards.
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
}

pub(super) fn tokenize(args: TokenizeArgs) -> Result<()> {
    if args.tokenizer != "bytes" {
        return Err(UsageError(format!(
            "--tokenizer {}: only `bytes` is available in this version (GPT-2 BPE is planned)",
            args.tokenizer
        ))
        .into());
    }
    if !(0.0..1.0).contains(&args.val_fraction) {
        return Err(UsageError(format!(
            "--val-fraction {} must be in [0, 1)",
            args.val_fraction
        ))
        .into());
    }
    if args.shard_tokens == 0 {
        return Err(UsageError("--shard-tokens must be at least 1".into()).into());
    }
    let started = Instant::now();
    let total_bytes: u64 = args
        .inputs
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    let bar = indicatif::ProgressBar::new(total_bytes);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} ({bytes_per_sec})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    // Documents are tokenized in parallel, then joined in input order.
    let docs: Vec<Vec<u32>> = args
        .inputs
        .par_iter()
        .map(|path| -> Result<Vec<u32>> {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("{}: cannot read it as UTF-8 text", path.display()))?;
            bar.inc(text.len() as u64);
            let mut tokens = encode_bytes(&text);
            tokens.push(BYTES_EOT);
            Ok(tokens)
        })
        .collect::<Result<_>>()?;
    bar.finish_and_clear();
    let tokens: Vec<u32> = docs.concat();
    let val = (tokens.len() as f64 * args.val_fraction).ceil() as usize;
    let (val_tokens, train_tokens) = tokens.split_at(val.min(tokens.len()));
    let mut written = write_shards(&args.output, "val", val_tokens, args.shard_tokens)?;
    written.extend(write_shards(
        &args.output,
        "train",
        train_tokens,
        args.shard_tokens,
    )?);
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{} documents, {} bytes -> {} tokens ({} train, {} val) in {:.1}s ({:.1} MB/s)",
        args.inputs.len(),
        total_bytes,
        tokens.len(),
        train_tokens.len(),
        val_tokens.len(),
        secs,
        total_bytes as f64 / secs.max(1e-9) / 1e6
    );
    for p in &written {
        println!("  {}", p.display());
    }
    let prefix = args.output.display();
    println!(
        "train on them with: --set data.kind=shards --set 'data.train={prefix}_train_*.bin' --set 'data.val={prefix}_val_*.bin'"
    );
    Ok(())
}
