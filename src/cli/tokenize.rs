//! `shardtrain tokenize`: raw UTF-8 text files into token shards in llm.c's format, ready for
//! `data.kind: shards`. Each input file is one document; documents are separated by the
//! tokenizer's end-of-text token (`<|endoftext|>` = 50256 for gpt2, byte 0 for bytes). The work
//! itself is `data::corpus`; this is its command line and report.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::config::TokenizerKind;
use crate::data::corpus::{refuse_existing_shards, tokenize_corpus, CorpusJob};
use crate::data::tokenizer::{parse_tokenizer, Tokenizer};
use crate::error::UsageError;

#[derive(Debug, Args)]
pub(super) struct TokenizeArgs {
    /// UTF-8 text files, one document each.
    #[arg(required = true, value_name = "INPUT")]
    inputs: Vec<PathBuf>,
    /// Output prefix: shards are written as PREFIX_train_000000.bin, PREFIX_val_000000.bin, ...
    #[arg(long, short, value_name = "OUT_PREFIX")]
    output: PathBuf,
    /// gpt2 (GPT-2's BPE, vocabulary 50,257) or bytes (one token per UTF-8 byte).
    #[arg(long, default_value = "gpt2", value_parser = parse_tokenizer)]
    tokenizer: TokenizerKind,
    /// Tokens per shard at most.
    #[arg(long, default_value_t = 100_000_000)]
    shard_tokens: usize,
    /// Share of the input (its first bytes) written as validation shards.
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
}

pub(super) fn tokenize(args: TokenizeArgs) -> Result<()> {
    if !(0.0..1.0).contains(&args.val_fraction) {
        return Err(UsageError(format!(
            "--val-fraction {} must be in [0, 1)",
            args.val_fraction
        ))
        .into());
    }
    if args.shard_tokens == 0 || i32::try_from(args.shard_tokens).is_err() {
        return Err(UsageError(format!(
            "--shard-tokens {} must be in 1..={}",
            args.shard_tokens,
            i32::MAX
        ))
        .into());
    }
    for input in &args.inputs {
        if !input.is_file() {
            return Err(UsageError(format!("{}: no such text file", input.display())).into());
        }
    }
    refuse_existing_shards(&args.output).map_err(|e| UsageError(format!("{e:#}")))?;
    let tokenizer = Tokenizer::new(args.tokenizer);
    let job = CorpusJob {
        inputs: &args.inputs,
        tokenizer,
        prefix: &args.output,
        shard_tokens: args.shard_tokens,
        val_fraction: args.val_fraction,
    };
    let bar = indicatif::ProgressBar::new(0); // tokenize_corpus sets the length
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "tokenizing {bar:40} {bytes}/{total_bytes} ({bytes_per_sec}, {eta} left)",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let report = tokenize_corpus(&job, &bar);
    bar.finish_and_clear();
    let report = report?;
    let secs = report.seconds.max(1e-9);
    println!(
        "{} documents, {} bytes -> {} tokens ({} train, {} val) with the {} tokenizer in {:.1}s ({:.1} MB/s)",
        report.documents,
        report.bytes,
        report.train_tokens + report.val_tokens,
        report.train_tokens,
        report.val_tokens,
        tokenizer.name(),
        secs,
        report.bytes as f64 / secs / 1e6
    );
    for p in &report.shards {
        println!("  {}", p.display());
    }
    let prefix = args.output.display();
    let vocab = match args.tokenizer {
        TokenizerKind::Gpt2 => " --set model.vocab_size=50304",
        TokenizerKind::Bytes => "",
    };
    println!(
        "train on them with: --set data.kind=shards --set data.tokenizer={} --set 'data.train={prefix}_train_*.bin' --set 'data.val={prefix}_val_*.bin'{vocab}",
        tokenizer.name()
    );
    Ok(())
}
