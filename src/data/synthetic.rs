//! The built-in corpus: written arithmetic (`"482+17=499\n"`, `"17-482=-465\n"`) as byte tokens,
//! generated deterministically from a seed, so the default run needs no files and no network.
//!
//! Each problem belongs to exactly one split, decided by a hash of the problem itself, so no
//! validation problem ever appears in training: validation loss measures generalisation.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{Batch, DataSource};

/// Which side of the held-out split a stream draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

/// An endless stream of arithmetic problems from one split.
#[derive(Debug, Clone)]
pub struct ArithmeticCorpus {
    max_operand: u32,
    /// Problems whose hash falls below this threshold (out of 2^32) are validation problems.
    val_threshold: u64,
    split: Split,
    seed: u64,
    rng: ChaCha8Rng,
    line: Vec<u8>,
    pos: usize,
}

/// Mixes the seed into a per-split stream so train and val draw independently.
fn stream_seed(seed: u64, split: Split) -> u64 {
    match split {
        Split::Train => seed,
        Split::Val => seed ^ 0x9E37_79B9_7F4A_7C15,
    }
}

/// A fixed hash of a problem (SplitMix64 finaliser), independent of the seed: the split of a
/// problem never changes between runs.
fn problem_hash(a: u32, b: u32, op: u8) -> u64 {
    let mut z = (u64::from(a) << 32 | u64::from(b)) ^ (u64::from(op) << 56);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl ArithmeticCorpus {
    /// `val_fraction` of all problems (by hash) form the validation split.
    pub fn new(max_operand: u32, val_fraction: f32, seed: u64, split: Split) -> Self {
        ArithmeticCorpus {
            max_operand,
            val_threshold: (f64::from(val_fraction) * (1u64 << 32) as f64) as u64,
            split,
            seed,
            rng: ChaCha8Rng::seed_from_u64(stream_seed(seed, split)),
            line: Vec::new(),
            pos: 0,
        }
    }

    fn in_split(&self, a: u32, b: u32, op: u8) -> bool {
        let is_val = (problem_hash(a, b, op) & 0xFFFF_FFFF) < self.val_threshold;
        is_val == (self.split == Split::Val)
    }

    /// The next problem of this split, as text.
    pub fn next_problem(&mut self) -> String {
        loop {
            let a = self.rng.random_range(0..=self.max_operand);
            let b = self.rng.random_range(0..=self.max_operand);
            let op = if self.rng.random_bool(0.5) {
                b'+'
            } else {
                b'-'
            };
            if !self.in_split(a, b, op) {
                continue;
            }
            let result = match op {
                b'+' => i64::from(a) + i64::from(b),
                _ => i64::from(a) - i64::from(b),
            };
            return format!("{a}{}{b}={result}\n", op as char);
        }
    }

    fn next_token(&mut self) -> u32 {
        if self.pos == self.line.len() {
            self.line = self.next_problem().into_bytes();
            self.pos = 0;
        }
        self.pos += 1;
        u32::from(self.line[self.pos - 1])
    }
}

impl DataSource for ArithmeticCorpus {
    fn next_batch(&mut self, batch: usize, seq: usize) -> anyhow::Result<Batch> {
        Ok(Batch::from_stream(batch, seq, || self.next_token()))
    }

    fn rewind(&mut self) {
        self.rng = ChaCha8Rng::seed_from_u64(stream_seed(self.seed, self.split));
        self.line.clear();
        self.pos = 0;
    }

    fn position(&self) -> serde_json::Value {
        // The generator's word position (a u128, kept as a string: JSON numbers are doubles) and
        // the unread rest of the current problem.
        serde_json::json!({
            "kind": "synthetic",
            "seed": self.seed,
            "rng_word_pos": self.rng.get_word_pos().to_string(),
            "line": String::from_utf8_lossy(&self.line),
            "pos": self.pos,
        })
    }

    fn seek(&mut self, position: &serde_json::Value) -> anyhow::Result<()> {
        use anyhow::{anyhow, bail};
        let field = |key: &str| {
            position
                .get(key)
                .ok_or_else(|| anyhow!("data position: `{key}` is missing"))
        };
        if field("kind")?.as_str() != Some("synthetic") {
            bail!("data position: not a position of the synthetic corpus");
        }
        if field("seed")?.as_u64() != Some(self.seed) {
            bail!(
                "data position: saved with seed {}, this run's train.seed is {}",
                field("seed")?,
                self.seed
            );
        }
        let word_pos: u128 = field("rng_word_pos")?
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("data position: `rng_word_pos` is not a number"))?;
        let line = field("line")?
            .as_str()
            .ok_or_else(|| anyhow!("data position: `line` is not text"))?
            .as_bytes()
            .to_vec();
        let pos = field("pos")?
            .as_u64()
            .filter(|&p| p as usize <= line.len())
            .ok_or_else(|| anyhow!("data position: `pos` is not inside `line`"))?;
        self.rewind();
        self.rng.set_word_pos(word_pos);
        self.line = line;
        self.pos = pos as usize;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn problems(split: Split, n: usize) -> Vec<String> {
        let mut c = ArithmeticCorpus::new(99, 0.2, 7, split);
        (0..n).map(|_| c.next_problem()).collect()
    }

    #[test]
    fn a_stream_continues_exactly_from_its_saved_position() {
        let mut a = ArithmeticCorpus::new(999, 0.1, 5, Split::Train);
        a.next_batch(3, 17).unwrap(); // leaves a problem half read
        let saved = a.position();
        let expected = a.next_batch(4, 33).unwrap();
        let mut b = ArithmeticCorpus::new(999, 0.1, 5, Split::Train);
        b.seek(&saved).unwrap();
        assert_eq!(b.next_batch(4, 33).unwrap(), expected);
        let mut other_seed = ArithmeticCorpus::new(999, 0.1, 6, Split::Train);
        assert!(other_seed
            .seek(&saved)
            .unwrap_err()
            .to_string()
            .contains("seed"));
    }

    #[test]
    fn problems_are_correct_arithmetic() {
        for p in problems(Split::Train, 200) {
            let (lhs, rhs) = p.trim_end().split_once('=').unwrap();
            let value: i64 = rhs.parse().unwrap();
            let expected = if let Some((a, b)) = lhs.split_once('+') {
                a.parse::<i64>().unwrap() + b.parse::<i64>().unwrap()
            } else {
                let (a, b) = lhs.split_once('-').unwrap();
                a.parse::<i64>().unwrap() - b.parse::<i64>().unwrap()
            };
            assert_eq!(value, expected, "{p}");
        }
    }

    #[test]
    fn splits_are_disjoint_and_deterministic() {
        let train: HashSet<String> = problems(Split::Train, 3000).into_iter().collect();
        let val = problems(Split::Val, 500);
        assert!(val.iter().all(|p| !train.contains(p)));
        assert_eq!(problems(Split::Val, 50), problems(Split::Val, 50));
        assert_ne!(problems(Split::Train, 50), problems(Split::Val, 50));
    }

    #[test]
    fn batches_are_shifted_windows_and_rewind_repeats() {
        let mut c = ArithmeticCorpus::new(999, 0.1, 1, Split::Val);
        let b1 = c.next_batch(3, 16).unwrap();
        assert_eq!(b1.inputs.len(), 48);
        assert_eq!(&b1.inputs[1..16], &b1.targets[..15]);
        let b2 = c.next_batch(3, 16).unwrap();
        assert_ne!(b1, b2);
        c.rewind();
        assert_eq!(c.next_batch(3, 16).unwrap(), b1);
    }
}
