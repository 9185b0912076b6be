//! The data source a config names: the synthetic corpus, or token shard files read through the
//! window sampler (`data.kind: shards`, `data.train` / `data.val` globs; `data.kind: text` reads
//! the shards its text was tokenized into).

use std::path::Path;

use anyhow::{Context, Result};

use super::sampler::WindowSampler;
use super::shards::{open_glob, Shard};
use super::synthetic::{ArithmeticCorpus, Split};
use super::{Batch, DataSource};
use crate::config::{Config, DataKind};

/// Opens the `split` stream of `cfg`'s data for a run in `run_dir` (whose parent holds the
/// tokenized-text cache).
pub fn open_source(cfg: &Config, split: Split, run_dir: &Path) -> Result<Box<dyn DataSource>> {
    match cfg.data.kind {
        DataKind::Synthetic => {
            let s = &cfg.data.synthetic;
            Ok(Box::new(ArithmeticCorpus::new(
                s.max_operand,
                s.val_fraction,
                cfg.train.seed,
                split,
            )))
        }
        DataKind::Shards => {
            let (key, pattern) = match split {
                Split::Train => ("data.train", &cfg.data.train),
                Split::Val => ("data.val", &cfg.data.val),
            };
            Ok(Box::new(
                open_shards(cfg, pattern).with_context(|| format!("{key}: {pattern}"))?,
            ))
        }
        DataKind::Text => {
            let cached = super::text_cache::ensure_text_cache(cfg, run_dir)?;
            let (key, pattern) = match split {
                Split::Train => ("data.train", &cached.train),
                Split::Val => ("data.val", &cached.val),
            };
            let source = open_shards(cfg, pattern)
                .with_context(|| format!("{key} (tokenized into {})", cached.dir.display()))?;
            Ok(Box::new(source))
        }
    }
}

fn open_shards(cfg: &Config, pattern: &str) -> Result<ShardSource> {
    ShardSource::open(
        pattern,
        cfg.model.vocab_size,
        cfg.model.seq_len,
        cfg.train.seed,
    )
}

/// Batches of windows from token shards, in the sampler's seeded order (reshuffled each epoch).
pub struct ShardSource {
    shards: Vec<Shard>,
    sampler: WindowSampler,
    seed: u64,
}

impl ShardSource {
    /// Every shard matching `pattern`, validated against the vocabulary, cut into windows of
    /// `seq + 1` tokens.
    pub fn open(pattern: &str, vocab_size: usize, seq: usize, seed: u64) -> Result<ShardSource> {
        let shards = open_glob(pattern, vocab_size)?;
        let lens: Vec<usize> = shards.iter().map(Shard::len).collect();
        let sampler = WindowSampler::new(&lens, seq, seed)?;
        Ok(ShardSource {
            shards,
            sampler,
            seed,
        })
    }

    /// Number of windows in one epoch.
    pub fn windows(&self) -> usize {
        self.sampler.windows()
    }
}

impl DataSource for ShardSource {
    fn next_batch(&mut self, batch: usize, seq: usize) -> Result<Batch> {
        if seq != self.sampler.seq() {
            anyhow::bail!(
                "a shard source cuts windows of {} tokens, {seq} were asked for",
                self.sampler.seq()
            );
        }
        let windows = self.sampler.next_global_batch(batch);
        let mut inputs = Vec::with_capacity(batch * seq);
        let mut targets = Vec::with_capacity(batch * seq);
        for (shard, start) in windows {
            // The sampler only hands out windows inside their shard, and the shard was checked
            // when it was opened: a failure here is a file changed under the run.
            let tokens = self.shards[shard].tokens(start, seq + 1)?;
            inputs.extend_from_slice(&tokens[..seq]);
            targets.extend_from_slice(&tokens[1..]);
        }
        Ok(Batch {
            inputs,
            targets,
            batch,
            seq,
        })
    }

    fn rewind(&mut self) {
        // Back to the first window of the first epoch: the same tokens at every evaluation.
        let fresh = WindowSampler::new(
            &self.shards.iter().map(Shard::len).collect::<Vec<_>>(),
            self.sampler.seq(),
            self.seed,
        );
        if let Ok(s) = fresh {
            self.sampler = s;
        }
    }

    fn position(&self) -> serde_json::Value {
        serde_json::json!({ "kind": "shards", "sampler": self.sampler.position() })
    }

    fn seek(&mut self, position: &serde_json::Value) -> Result<()> {
        if position.get("kind").and_then(|k| k.as_str()) != Some("shards") {
            anyhow::bail!("data position: not a position of a shard source (data.kind changed?)");
        }
        self.sampler.seek(&position["sampler"])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::shards::write_shard;

    #[test]
    fn batches_are_windows_of_the_shards_and_a_stream_resumes_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let a: Vec<u32> = (0..50).collect();
        let b: Vec<u32> = (100..137).collect();
        write_shard(&dir.path().join("d_train_000000.bin"), &a).unwrap();
        write_shard(&dir.path().join("d_train_000001.bin"), &b).unwrap();
        let pattern = dir.path().join("d_train_*.bin");
        let mut src = ShardSource::open(pattern.to_str().unwrap(), 256, 8, 7).unwrap();
        // Windows start at multiples of 8 and need 9 tokens: 6 in the first shard, 4 in the second.
        assert_eq!(src.windows(), 10);
        let batch = src.next_batch(3, 8).unwrap();
        for row in 0..3 {
            let inp = &batch.inputs[row * 8..(row + 1) * 8];
            let tgt = &batch.targets[row * 8..(row + 1) * 8];
            // Consecutive tokens, targets shifted by one.
            assert!(inp.windows(2).all(|w| w[1] == w[0] + 1), "{inp:?}");
            assert_eq!(tgt[0], inp[1]);
            assert_eq!(tgt[7], inp[7] + 1);
        }
        let saved = src.position();
        let next = src.next_batch(4, 8).unwrap();
        let mut again = ShardSource::open(pattern.to_str().unwrap(), 256, 8, 7).unwrap();
        again.seek(&saved).unwrap();
        assert_eq!(again.next_batch(4, 8).unwrap(), next);
        // Rewind gives the first batch again.
        again.rewind();
        assert_eq!(again.next_batch(3, 8).unwrap(), batch);
    }
}
