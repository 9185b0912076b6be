//! Raw UTF-8 text files into token shards (what `shardtrain tokenize` and `data.kind: text` do):
//! streamed in blocks, so a corpus larger than memory works; cut at points where tokenization
//! does not depend on the cut ([`safe_cuts`]), so one large file still uses every core; written
//! shard by shard in input order.
//!
//! Each input file is one document, followed by the end-of-text token. The first
//! `val_fraction` of the input bytes (counted over all files in order) become validation shards,
//! the rest training shards: a token goes to validation when the input byte it ends on is inside
//! that share. Nothing is ever overwritten, and a failure removes the shards this call wrote.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;
use rayon::prelude::*;

use super::shards::{shard_path, write_shard};
use super::tokenizer::{safe_cuts, Tokenizer};

/// Bytes read from a file at a time.
const READ_BLOCK: usize = 8 << 20;
/// Smallest chunk handed to one thread.
const MIN_CHUNK: usize = 256 << 10;
/// Text tokenized in parallel before its tokens are written (bounds memory).
const BATCH_BYTES: usize = 64 << 20;

/// What to tokenize and where the shards go.
pub struct CorpusJob<'a> {
    pub inputs: &'a [PathBuf],
    pub tokenizer: Tokenizer,
    /// Shards are `{prefix}_train_{i:06}.bin` and `{prefix}_val_{i:06}.bin`.
    pub prefix: &'a Path,
    /// Tokens per shard at most.
    pub shard_tokens: usize,
    /// Share of the input bytes (the first ones) whose tokens become validation shards; 1.0
    /// makes every token a validation token.
    pub val_fraction: f64,
}

/// What a finished job wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct CorpusReport {
    pub documents: usize,
    pub bytes: u64,
    pub train_tokens: usize,
    pub val_tokens: usize,
    /// Every shard written, validation shards first.
    pub shards: Vec<PathBuf>,
    pub seconds: f64,
}

/// Tokenizes `job.inputs` into shards; `progress` counts the input bytes tokenized.
pub fn tokenize_corpus(job: &CorpusJob, progress: &ProgressBar) -> Result<CorpusReport> {
    let started = Instant::now();
    check_job(job)?;
    let total_bytes = input_bytes(job.inputs)?;
    progress.set_length(total_bytes);
    refuse_existing_shards(job.prefix)?;
    let val_bytes = (total_bytes as f64 * job.val_fraction).ceil() as u64;
    let mut out = SplitWriter::new(job.prefix, job.shard_tokens, val_bytes);
    let result = stream_inputs(job, progress, &mut out).and_then(|()| out.finish());
    if let Err(e) = result {
        out.remove_written();
        return Err(e);
    }
    Ok(CorpusReport {
        documents: job.inputs.len(),
        bytes: total_bytes,
        train_tokens: out.train.tokens,
        val_tokens: out.val.tokens,
        shards: out
            .val
            .written
            .iter()
            .chain(&out.train.written)
            .cloned()
            .collect(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn check_job(job: &CorpusJob) -> Result<()> {
    if job.inputs.is_empty() {
        bail!("no input text files");
    }
    if job.shard_tokens == 0 || i32::try_from(job.shard_tokens).is_err() {
        bail!(
            "{} tokens per shard is outside 1..={}",
            job.shard_tokens,
            i32::MAX
        );
    }
    if !(job.val_fraction.is_finite() && (0.0..=1.0).contains(&job.val_fraction)) {
        bail!("validation share {} is outside [0, 1]", job.val_fraction);
    }
    Ok(())
}

/// Total size of the inputs; a missing or unreadable file is an error naming it.
fn input_bytes(inputs: &[PathBuf]) -> Result<u64> {
    let mut total = 0;
    for path in inputs {
        let meta = std::fs::metadata(path)
            .with_context(|| format!("{}: cannot read it", path.display()))?;
        if !meta.is_file() {
            bail!("{}: not a file", path.display());
        }
        total += meta.len();
    }
    Ok(total)
}

/// Refuses to start when shards of either split already exist under `prefix`: a second
/// tokenization into the same prefix would mix two corpora.
pub fn refuse_existing_shards(prefix: &Path) -> Result<()> {
    for split in ["train", "val"] {
        let first = shard_path(prefix, split, 0);
        if first.symlink_metadata().is_ok() {
            bail!(
                "{} already exists; refusing to overwrite it (choose another output prefix)",
                first.display()
            );
        }
    }
    Ok(())
}

/// A run of text to tokenize, or a document's end.
enum Piece {
    Text { text: String, start: u64 },
    EndOfDocument { at: u64 },
}

/// Reads every input in order, cuts it into pieces and hands them on in batches.
fn stream_inputs(job: &CorpusJob, progress: &ProgressBar, out: &mut SplitWriter) -> Result<()> {
    let mut batch = Vec::new();
    let mut batch_bytes = 0;
    let mut offset = 0u64; // over all inputs
    for path in job.inputs {
        let shown = path.display();
        let mut file = File::open(path).with_context(|| format!("{shown}: cannot open it"))?;
        // Bytes read but not yet cut off, starting at byte `file_pos` of the file. Text with no
        // safe cut (no single space between words) accumulates until one comes.
        let mut pending: Vec<u8> = Vec::new();
        let mut file_pos = 0u64;
        let mut eof = false;
        while !eof {
            eof = read_block(&mut file, &mut pending)
                .with_context(|| format!("reading {shown}"))?
                == 0;
            let valid = utf8_prefix(&pending, eof).map_err(|bad| {
                anyhow::anyhow!(
                    "{shown}: not UTF-8 text (invalid bytes at byte {})",
                    file_pos + bad as u64
                )
            })?;
            let text = std::str::from_utf8(&pending[..valid]).expect("checked as UTF-8");
            let mut cuts = safe_cuts(text, MIN_CHUNK);
            if eof {
                cuts.push(text.len());
            }
            let mut start = 0;
            for cut in cuts {
                batch.push(Piece::Text {
                    text: text[start..cut].to_string(),
                    start: offset + start as u64,
                });
                start = cut;
            }
            batch_bytes += start;
            offset += start as u64;
            file_pos += start as u64;
            pending.drain(..start);
            if batch_bytes >= BATCH_BYTES {
                encode_batch(job.tokenizer, std::mem::take(&mut batch), progress, out)?;
                batch_bytes = 0;
            }
        }
        batch.push(Piece::EndOfDocument { at: offset });
    }
    encode_batch(job.tokenizer, batch, progress, out)
}

/// Appends up to one block of `file` to `buf`; returns the bytes read (0 at the end).
fn read_block(file: &mut File, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let old = buf.len();
    buf.resize(old + READ_BLOCK, 0);
    let result = loop {
        match file.read(&mut buf[old..]) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => break other,
        }
    };
    buf.truncate(old + *result.as_ref().unwrap_or(&0));
    result
}

/// Length of the longest UTF-8 prefix of `bytes` that can be decoded now: all of it at the end
/// of the file, otherwise up to a character cut by the block boundary. Invalid bytes give
/// `Err(their position)`.
fn utf8_prefix(bytes: &[u8], eof: bool) -> Result<usize, usize> {
    match std::str::from_utf8(bytes) {
        Ok(_) => Ok(bytes.len()),
        Err(e) if e.error_len().is_none() && !eof => Ok(e.valid_up_to()),
        Err(e) => Err(e.valid_up_to()),
    }
}

/// Tokenizes the text pieces of `batch` in parallel and writes their tokens in order.
fn encode_batch(
    tokenizer: Tokenizer,
    batch: Vec<Piece>,
    progress: &ProgressBar,
    out: &mut SplitWriter,
) -> Result<()> {
    let encoded: Vec<Option<Vec<u32>>> = batch
        .par_iter()
        .map(|piece| match piece {
            Piece::Text { text, .. } => Some(tokenizer.encode(text)),
            Piece::EndOfDocument { .. } => None,
        })
        .collect();
    for (piece, tokens) in batch.iter().zip(encoded) {
        match (piece, tokens) {
            (Piece::Text { text, start }, Some(tokens)) => {
                out.push_text(&tokenizer, &tokens, *start, text.len() as u64)?;
                progress.inc(text.len() as u64);
            }
            (Piece::EndOfDocument { at }, _) => out.push_token(tokenizer.eot(), *at)?,
            (Piece::Text { .. }, None) => unreachable!("every text piece is encoded"),
        }
    }
    Ok(())
}

/// One split's shards being written.
struct SplitShards {
    name: &'static str,
    buf: Vec<u32>,
    next_index: usize,
    tokens: usize,
    written: Vec<PathBuf>,
}

impl SplitShards {
    fn new(name: &'static str) -> SplitShards {
        SplitShards {
            name,
            buf: Vec::new(),
            next_index: 0,
            tokens: 0,
            written: Vec::new(),
        }
    }

    /// Writes every full shard in the buffer (and, with `all`, the rest).
    fn flush(&mut self, prefix: &Path, shard_tokens: usize, all: bool) -> Result<()> {
        while self.buf.len() >= shard_tokens || (all && !self.buf.is_empty()) {
            let n = shard_tokens.min(self.buf.len());
            let path = shard_path(prefix, self.name, self.next_index);
            write_shard(&path, &self.buf[..n])?;
            self.written.push(path);
            self.next_index += 1;
            self.buf.drain(..n);
        }
        Ok(())
    }
}

/// Routes tokens to the validation or training shards by the input byte they end on.
struct SplitWriter<'a> {
    prefix: &'a Path,
    shard_tokens: usize,
    val_bytes: u64,
    val: SplitShards,
    train: SplitShards,
}

impl<'a> SplitWriter<'a> {
    fn new(prefix: &'a Path, shard_tokens: usize, val_bytes: u64) -> SplitWriter<'a> {
        SplitWriter {
            prefix,
            shard_tokens,
            val_bytes,
            val: SplitShards::new("val"),
            train: SplitShards::new("train"),
        }
    }

    fn is_val(&self, end: u64) -> bool {
        self.val_bytes > 0 && end <= self.val_bytes
    }

    /// The tokens of `len` input bytes starting at byte `start`.
    fn push_text(&mut self, tok: &Tokenizer, tokens: &[u32], start: u64, len: u64) -> Result<()> {
        if self.is_val(start + len) {
            self.val.buf.extend_from_slice(tokens);
            self.val.tokens += tokens.len();
        } else if !self.is_val(start + 1) {
            self.train.buf.extend_from_slice(tokens);
            self.train.tokens += tokens.len();
        } else {
            // The piece straddles the boundary: follow each token's bytes.
            let mut end = start;
            for &t in tokens {
                end += tok.token_bytes(t).map_or(0, |b| b.len() as u64);
                self.route(t, end);
            }
        }
        self.flush(false)
    }

    /// One token ending on input byte `end`.
    fn push_token(&mut self, token: u32, end: u64) -> Result<()> {
        self.route(token, end);
        self.flush(false)
    }

    fn route(&mut self, token: u32, end: u64) {
        let split = if self.is_val(end) {
            &mut self.val
        } else {
            &mut self.train
        };
        split.buf.push(token);
        split.tokens += 1;
    }

    fn flush(&mut self, all: bool) -> Result<()> {
        self.val.flush(self.prefix, self.shard_tokens, all)?;
        self.train.flush(self.prefix, self.shard_tokens, all)
    }

    fn finish(&mut self) -> Result<()> {
        self.flush(true)
    }

    /// Removes what this job wrote (after a failure: half a corpus is worse than none).
    fn remove_written(&self) {
        for path in self.val.written.iter().chain(&self.train.written) {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TokenizerKind;
    use crate::data::shards::open_glob;

    fn read_split(prefix: &Path, split: &str) -> Vec<u32> {
        let pattern = format!("{}_{split}_*.bin", prefix.display());
        match open_glob(&pattern, 65_536) {
            Ok(shards) => shards
                .iter()
                .flat_map(|s| s.tokens(0, s.len()).unwrap())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    fn job<'a>(
        inputs: &'a [PathBuf],
        prefix: &'a Path,
        kind: TokenizerKind,
        f: f64,
    ) -> CorpusJob<'a> {
        CorpusJob {
            inputs,
            tokenizer: Tokenizer::new(kind),
            prefix,
            shard_tokens: 1000,
            val_fraction: f,
        }
    }

    #[test]
    fn streams_large_files_to_the_same_tokens_as_one_pass() {
        let dir = tempfile::tempdir().unwrap();
        // Over one read block and many chunks, with multi-byte characters across block ends.
        let line = "Über 9000 naïve words, 東京の夜 🚀 and  spaces.\n";
        let big: String = line.repeat((READ_BLOCK + MIN_CHUNK) / line.len() + 3);
        let small = "A second document.";
        let paths = vec![dir.path().join("big.txt"), dir.path().join("small.txt")];
        std::fs::write(&paths[0], &big).unwrap();
        std::fs::write(&paths[1], small).unwrap();
        let prefix = dir.path().join("out/c");
        let report = tokenize_corpus(
            &job(&paths, &prefix, TokenizerKind::Gpt2, 0.0),
            &ProgressBar::hidden(),
        )
        .unwrap();
        let tok = Tokenizer::new(TokenizerKind::Gpt2);
        let mut expected = tok.encode(&big);
        expected.push(tok.eot());
        expected.extend(tok.encode(small));
        expected.push(tok.eot());
        assert_eq!(read_split(&prefix, "train"), expected);
        assert_eq!(report.train_tokens, expected.len());
        assert_eq!(report.val_tokens, 0);
        assert_eq!(report.bytes, (big.len() + small.len()) as u64);
        assert_eq!(report.shards.len(), expected.len().div_ceil(1000));
    }

    #[test]
    fn the_first_share_of_the_bytes_is_validation() {
        let dir = tempfile::tempdir().unwrap();
        let paths = vec![dir.path().join("a.txt"), dir.path().join("b.txt")];
        std::fs::write(&paths[0], "abcdefgh").unwrap();
        std::fs::write(&paths[1], "ij").unwrap();
        let prefix = dir.path().join("c");
        let r = tokenize_corpus(
            &job(&paths, &prefix, TokenizerKind::Bytes, 0.3),
            &ProgressBar::hidden(),
        )
        .unwrap();
        // ceil(0.3 * 10) = 3 bytes.
        assert_eq!(read_split(&prefix, "val"), vec![97, 98, 99]);
        assert_eq!(
            read_split(&prefix, "train"),
            vec![100, 101, 102, 103, 104, 0, 105, 106, 0]
        );
        assert_eq!((r.val_tokens, r.train_tokens), (3, 9));
        // Everything to validation, with the documents' ends.
        let prefix = dir.path().join("v");
        tokenize_corpus(
            &job(&paths, &prefix, TokenizerKind::Bytes, 1.0),
            &ProgressBar::hidden(),
        )
        .unwrap();
        assert_eq!(read_split(&prefix, "val").len(), 12);
        assert!(read_split(&prefix, "train").is_empty());
    }

    #[test]
    fn bad_input_writes_nothing_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.txt");
        let bad = dir.path().join("bad.txt");
        std::fs::write(&good, "x ".repeat(5000)).unwrap();
        std::fs::write(&bad, b"fine text \xff\xfe then bytes").unwrap();
        let prefix = dir.path().join("c");
        let mut j = job(&[], &prefix, TokenizerKind::Bytes, 0.0);
        let inputs = vec![good.clone(), bad.clone()];
        j.inputs = &inputs;
        j.shard_tokens = 100;
        let err = format!(
            "{:#}",
            tokenize_corpus(&j, &ProgressBar::hidden()).unwrap_err()
        );
        assert!(err.contains("bad.txt") && err.contains("UTF-8"), "{err}");
        assert!(
            read_split(&prefix, "train").is_empty(),
            "shards were left behind"
        );

        let missing = vec![dir.path().join("missing.txt")];
        j.inputs = &missing;
        let err = format!(
            "{:#}",
            tokenize_corpus(&j, &ProgressBar::hidden()).unwrap_err()
        );
        assert!(err.contains("missing.txt"), "{err}");

        // Existing shards are never overwritten.
        let ok = vec![good];
        j.inputs = &ok;
        tokenize_corpus(&j, &ProgressBar::hidden()).unwrap();
        let err = format!(
            "{:#}",
            tokenize_corpus(&j, &ProgressBar::hidden()).unwrap_err()
        );
        assert!(err.contains("refusing to overwrite"), "{err}");
    }
}
