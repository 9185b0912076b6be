//! Training data: token streams cut into (input, target) windows, behind one small trait so the
//! trainer does not care where tokens come from: the built-in synthetic corpus, token shard files,
//! or raw text tokenized into a cache of shards.

pub mod corpus;
pub mod sampler;
pub mod shards;
pub mod source;
pub mod synthetic;
pub mod text_cache;
pub mod tokenizer;

/// One micro-batch: `batch` rows of `seq` tokens, targets shifted by one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub batch: usize,
    pub seq: usize,
}

impl Batch {
    /// Cuts `batch` windows of `seq + 1` consecutive tokens from `next_token` into inputs and
    /// targets (each window's last token is only a target).
    pub fn from_stream(batch: usize, seq: usize, mut next_token: impl FnMut() -> u32) -> Batch {
        let mut inputs = Vec::with_capacity(batch * seq);
        let mut targets = Vec::with_capacity(batch * seq);
        for _ in 0..batch {
            let mut prev = next_token();
            for _ in 0..seq {
                let tok = next_token();
                inputs.push(prev);
                targets.push(tok);
                prev = tok;
            }
        }
        Batch {
            inputs,
            targets,
            batch,
            seq,
        }
    }

    /// `count` rows starting at row `start` (a rank's slice of a global batch).
    pub fn rows(&self, start: usize, count: usize) -> Batch {
        let range = start * self.seq..(start + count) * self.seq;
        Batch {
            inputs: self.inputs[range.clone()].to_vec(),
            targets: self.targets[range].to_vec(),
            batch: count,
            seq: self.seq,
        }
    }
}

/// A deterministic source of batches.
pub trait DataSource: Send {
    /// The next `batch x seq` micro-batch of this stream.
    fn next_batch(&mut self, batch: usize, seq: usize) -> anyhow::Result<Batch>;
    /// Rewinds to the first batch (validation reads the same held-out tokens at every evaluation).
    fn rewind(&mut self);
    /// Where the stream is, as data a checkpoint stores: restoring it continues with exactly the
    /// batches that would have come next.
    fn position(&self) -> serde_json::Value;
    /// Moves the stream to a position from [`DataSource::position`] of the same source and
    /// settings; an error names what does not fit.
    fn seek(&mut self, position: &serde_json::Value) -> anyhow::Result<()>;
}
