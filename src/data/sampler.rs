//! Distributed sampling of training windows over token shards, DistributedSampler-style, in an
//! order that does not depend on the world size.
//!
//! A *window* is `seq + 1` consecutive tokens of one shard (inputs are its first `seq` tokens,
//! targets the same shifted by one). Windows start at multiples of `seq`, so neighbours overlap by
//! one token (as nanoGPT and llm.c cut their data): a shard of `len` tokens holds
//! `(len - 1) / seq` windows, and a shard shorter than `seq + 1` tokens holds none. The windows of
//! the whole dataset are numbered shard by shard, in order of start token.
//!
//! **The global stream.** Every epoch is one permutation of all windows, drawn from
//! `(seed, epoch)` alone; the stream the trainer consumes is epoch 0's permutation, then epoch 1's,
//! and so on. A request that runs past the end of an epoch takes the rest of that epoch and
//! continues with the start of the next one: nothing is dropped and nothing is padded, so a batch
//! that straddles the boundary may hold one window twice (once per epoch), while within an epoch no
//! window is ever read twice.
//!
//! **Sharding.** Every rank keeps its own [`WindowSampler`] with the same shards, `seq` and seed,
//! so all ranks agree on the stream without communicating. At every micro-step each rank asks for
//! the same global micro-batch of `world * micro` rows and keeps rows
//! `rank * micro .. (rank + 1) * micro` of it ([`WindowSampler::next_rows`], or
//! [`WindowSampler::next_global_batch`] followed by [`rank_slice`]). Every rank thus advances by the
//! same amount, ranks read distinct windows, and the windows of one optimizer step (all its
//! micro-steps, all ranks) are exactly the next `global_batch` windows of the stream, in the order
//! a world-1 run reads them: sharded training sees the same data as unsharded training.
//!
//! **Memory.** The current epoch's permutation is a `Vec<u32>`: 4 bytes per window per sampler
//! (10 billion tokens at `seq = 1024` are 9.8 million windows, 39 MB), plus one `usize` per shard.
//! It is rebuilt (a Fisher–Yates shuffle, linear time) only when the stream enters a new epoch or
//! after a [`WindowSampler::seek`]. Datasets of more than 2^32 windows are refused.
//!
//! **Stability.** The shuffle uses its own bounded draw on ChaCha8's 64-bit output rather than
//! `rand`'s `shuffle`, so the order depends only on this file, not on the `rand` version.

use anyhow::{anyhow, bail, ensure};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The `kind` a saved position carries.
const POSITION_KIND: &str = "windows";

/// One window: (shard index, start token within the shard).
pub type Window = (usize, usize);

/// A deterministic, epoch-reshuffled stream of the windows of a set of token shards.
#[derive(Clone)]
pub struct WindowSampler {
    seq: usize,
    seed: u64,
    /// `first[s]` is the number of the first window of shard `s`; `first[shards]` is the total.
    first: Vec<usize>,
    /// The epoch of the next window to read.
    epoch: u64,
    /// The index into `epoch`'s permutation of the next window to read (`< windows`).
    index: usize,
    /// The permutation of the epoch in `perm_epoch` (built on first use).
    perm: Vec<u32>,
    perm_epoch: Option<u64>,
}

impl std::fmt::Debug for WindowSampler {
    // By hand: the permutation can hold millions of entries.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WindowSampler")
            .field("shards", &(self.first.len() - 1))
            .field("windows", &self.windows())
            .field("seq", &self.seq)
            .field("seed", &self.seed)
            .field("epoch", &self.epoch)
            .field("index", &self.index)
            .finish()
    }
}

/// The number of windows of `seq + 1` tokens, starting at multiples of `seq`, in `len` tokens.
fn windows_in(len: usize, seq: usize) -> usize {
    if len > seq {
        (len - 1) / seq
    } else {
        0
    }
}

/// A uniform draw from `0..n` (`n > 0`) by Lemire's multiply-and-reject method: unbiased, and
/// defined by the generator's 64-bit output alone.
fn below(rng: &mut ChaCha8Rng, n: u64) -> u64 {
    let mut m = u128::from(rng.next_u64()) * u128::from(n);
    if (m as u64) < n {
        let threshold = n.wrapping_neg() % n;
        while (m as u64) < threshold {
            m = u128::from(rng.next_u64()) * u128::from(n);
        }
    }
    (m >> 64) as u64
}

/// The permutation of `0..n` for one epoch: a Fisher–Yates shuffle driven by ChaCha8 keyed with
/// the seed and the epoch (so every epoch can be rebuilt on its own, after a seek too).
fn epoch_permutation(n: usize, seed: u64, epoch: u64) -> Vec<u32> {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    key[16..].copy_from_slice(b"shardtrain:wins\0");
    let mut rng = ChaCha8Rng::from_seed(key);
    // `n - 1` fits in a u32: `new` refuses more windows.
    let mut perm: Vec<u32> = (0..n).map(|w| w as u32).collect();
    for i in (1..n).rev() {
        let j = below(&mut rng, i as u64 + 1) as usize;
        perm.swap(i, j);
    }
    perm
}

impl WindowSampler {
    /// A sampler over shards of `shard_lens` tokens cutting windows of `seq + 1` tokens, shuffled
    /// from `seed`, positioned at the start of epoch 0. An error when `seq` is 0, when no shard
    /// holds a window, or when there are more than 2^32 windows.
    pub fn new(shard_lens: &[usize], seq: usize, seed: u64) -> anyhow::Result<Self> {
        ensure!(seq > 0, "window sampler: seq must be at least 1");
        let mut first = Vec::with_capacity(shard_lens.len() + 1);
        let mut total = 0usize;
        first.push(0);
        for &len in shard_lens {
            total += windows_in(len, seq);
            first.push(total);
        }
        if total == 0 {
            bail!(
                "window sampler: no shard has seq+1 = {} tokens ({} shards, the longest {} tokens)",
                seq + 1,
                shard_lens.len(),
                shard_lens.iter().copied().max().unwrap_or(0)
            );
        }
        ensure!(
            total as u64 <= 1u64 << 32,
            "window sampler: {total} windows, more than the 2^32 a u32 permutation can hold"
        );
        Ok(WindowSampler {
            seq,
            seed,
            first,
            epoch: 0,
            index: 0,
            perm: Vec::new(),
            perm_epoch: None,
        })
    }

    /// The number of windows in the dataset (the length of an epoch).
    pub fn windows(&self) -> usize {
        self.first[self.first.len() - 1]
    }

    /// The number of tokens of a window's inputs (a window spans `seq + 1` tokens).
    pub fn seq(&self) -> usize {
        self.seq
    }

    /// The seed the permutations are drawn from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The epoch of the next window to be read (it becomes 1 once all of epoch 0 has been read).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The index of the next window to be read into its epoch's permutation (`< windows()`).
    pub fn index(&self) -> usize {
        self.index
    }

    /// Window number `w` (`< windows()`) in dataset order: shard by shard, by start token.
    pub fn window(&self, w: usize) -> Window {
        assert!(
            w < self.windows(),
            "window {w} of a dataset of {} windows",
            self.windows()
        );
        // The last shard whose first window is <= w: shards without windows share their
        // successor's `first` and are skipped by taking the last of equal entries.
        let shard = self.first.partition_point(|&f| f <= w) - 1;
        (shard, (w - self.first[shard]) * self.seq)
    }

    /// Moves the position `n` windows forward without reading them.
    fn skip(&mut self, n: usize) {
        let windows = self.windows();
        let to = self.index + n;
        self.epoch += (to / windows) as u64;
        self.index = to % windows;
    }

    /// Reads the next `n` windows of the stream into `out`, crossing into later epochs as needed.
    fn take_into(&mut self, n: usize, out: &mut Vec<Window>) {
        let windows = self.windows();
        let mut left = n;
        while left > 0 {
            if self.perm_epoch != Some(self.epoch) {
                self.perm = epoch_permutation(windows, self.seed, self.epoch);
                self.perm_epoch = Some(self.epoch);
            }
            let count = left.min(windows - self.index);
            for &w in &self.perm[self.index..self.index + count] {
                out.push(self.window(w as usize));
            }
            left -= count;
            self.skip(count);
        }
    }

    /// The windows of the next global batch of `rows` rows, advancing the position by `rows`.
    /// Every rank calls this with the same `rows` (`world * micro`) and keeps its own
    /// [`rank_slice`]. When the epoch ends inside the batch, the batch continues with the start of
    /// the next epoch's permutation.
    pub fn next_global_batch(&mut self, rows: usize) -> Vec<Window> {
        let mut out = Vec::with_capacity(rows);
        self.take_into(rows, &mut out);
        out
    }

    /// Rank `rank`'s `micro` rows of the next global batch of `world * micro` rows: the same as
    /// `rank_slice(&self.next_global_batch(world * micro), rank, micro)`, and advances the
    /// position just as far, but only looks up the rank's own windows. Panics unless
    /// `rank < world`.
    pub fn next_rows(&mut self, rank: usize, world: usize, micro: usize) -> Vec<Window> {
        assert!(rank < world, "rank {rank} of a world of {world}");
        let mut out = Vec::with_capacity(micro);
        self.skip(rank * micro);
        self.take_into(micro, &mut out);
        self.skip((world - rank - 1) * micro);
        out
    }

    /// Where the stream is, as data a checkpoint stores: `epoch` and `index` locate the next
    /// window; `seed`, `seq` and `windows` let [`WindowSampler::seek`] check that it is restored
    /// into the same stream.
    pub fn position(&self) -> serde_json::Value {
        serde_json::json!({
            "kind": POSITION_KIND,
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "seq": self.seq,
            "windows": self.windows(),
        })
    }

    /// Moves to a position from [`WindowSampler::position`] of a sampler with the same seed, `seq`
    /// and number of windows: the windows read next are exactly those the saved sampler would have
    /// read next. An error names what does not fit (both window counts for another dataset).
    pub fn seek(&mut self, pos: &serde_json::Value) -> anyhow::Result<()> {
        let field = |key: &str| {
            pos.get(key)
                .ok_or_else(|| anyhow!("window sampler position: `{key}` is missing"))
        };
        let number = |key: &str| {
            field(key)?.as_u64().ok_or_else(|| {
                anyhow!("window sampler position: `{key}` is not a non-negative integer")
            })
        };
        if field("kind")?.as_str() != Some(POSITION_KIND) {
            bail!("window sampler position: not a position of a window sampler");
        }
        let windows = number("windows")?;
        if windows != self.windows() as u64 {
            bail!(
                "window sampler position: saved over a dataset of {windows} windows, this one has {} \
                 windows",
                self.windows()
            );
        }
        let seq = number("seq")?;
        if seq != self.seq as u64 {
            bail!(
                "window sampler position: saved with seq {seq}, this sampler's seq is {}",
                self.seq
            );
        }
        let seed = number("seed")?;
        if seed != self.seed {
            bail!(
                "window sampler position: saved with seed {seed}, this sampler's seed is {}",
                self.seed
            );
        }
        let epoch = number("epoch")?;
        let index = number("index")?;
        if index >= windows {
            bail!("window sampler position: `index` {index} is not below the {windows} windows");
        }
        self.epoch = epoch;
        self.index = index as usize;
        Ok(())
    }
}

/// Rank `rank`'s rows of a global batch: rows `rank * micro .. (rank + 1) * micro`
/// (DistributedSampler slicing). Panics when the batch has fewer than `(rank + 1) * micro` rows.
pub fn rank_slice<T>(global: &[T], rank: usize, micro: usize) -> &[T] {
    assert!(
        (rank + 1) * micro <= global.len(),
        "rank {rank}'s {micro} rows lie outside a global batch of {} rows",
        global.len()
    );
    &global[rank * micro..(rank + 1) * micro]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_start_at_multiples_of_seq_and_fit_their_shard() {
        assert_eq!(windows_in(4, 4), 0);
        assert_eq!(windows_in(5, 4), 1);
        assert_eq!(windows_in(8, 4), 1);
        assert_eq!(windows_in(9, 4), 2);
        let lens = [9, 3, 0, 13, 5];
        let s = WindowSampler::new(&lens, 4, 1).unwrap();
        assert_eq!(s.windows(), 2 + 3 + 1);
        let all: Vec<_> = (0..s.windows()).map(|w| s.window(w)).collect();
        assert_eq!(all, [(0, 0), (0, 4), (3, 0), (3, 4), (3, 8), (4, 0)]);
        for (shard, start) in all {
            assert!(start + 5 <= lens[shard]);
        }
    }

    #[test]
    fn permutations_are_permutations_and_unbiased_draws_stay_in_range() {
        for n in [1, 2, 3, 17, 1000] {
            let mut p = epoch_permutation(n, 3, 1);
            p.sort_unstable();
            assert_eq!(p, (0..n as u32).collect::<Vec<_>>());
        }
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut seen = [0usize; 3];
        for _ in 0..3000 {
            seen[below(&mut rng, 3) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| (900..1100).contains(&c)), "{seen:?}");
    }

    #[test]
    fn the_permutation_is_pinned() {
        // The order is part of what a saved position means: a checkpoint resumes correctly only
        // while the shuffle stays the same, so changing it must be deliberate.
        assert_eq!(epoch_permutation(10, 42, 0), [7, 4, 0, 2, 8, 6, 9, 5, 1, 3]);
        assert_eq!(epoch_permutation(10, 42, 1), [7, 1, 3, 5, 8, 0, 9, 4, 2, 6]);
    }

    #[test]
    fn next_rows_equals_slicing_the_global_batch() {
        let lens = [100, 37, 3, 64];
        for world in 1..=4 {
            let mut whole = WindowSampler::new(&lens, 8, 9).unwrap();
            let mut ranks: Vec<_> = (0..world)
                .map(|_| WindowSampler::new(&lens, 8, 9).unwrap())
                .collect();
            for _ in 0..20 {
                let global = whole.next_global_batch(world * 3);
                for (rank, s) in ranks.iter_mut().enumerate() {
                    assert_eq!(s.next_rows(rank, world, 3), rank_slice(&global, rank, 3));
                    assert_eq!(s.position(), whole.position());
                }
            }
        }
    }

    #[test]
    fn no_window_at_all_is_an_error() {
        let err = WindowSampler::new(&[3, 4, 0], 4, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no shard has seq+1 = 5 tokens"), "{err}");
        assert!(WindowSampler::new(&[], 4, 0).is_err());
        assert!(WindowSampler::new(&[10], 0, 0).is_err());
    }
}
