//! The largest model of a shape that fits: grow n_layer at fixed width, heads, sequence length
//! and batch until a rank's bytes exceed the budget.

use serde::Serialize;

use super::memory::{rank_memory, RankMemory, UnitSizes};
use super::Workload;
use crate::shard::ShardPlan;

/// The search stops here (memory grows with every layer, so only an absurd budget reaches it).
pub const MAX_LAYERS_SEARCHED: usize = 1 << 20;

/// The deepest model that fits, or `n_layer` 0 when not even one block does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LargestModel {
    pub n_layer: usize,
    pub params: usize,
    /// The search stopped at its limit ([`MAX_LAYERS_SEARCHED`], or fewer for wide models):
    /// deeper models fit too.
    pub at_search_limit: bool,
}

/// The largest `n` in `1..=limit` with `fits(n)`, or 0 when `fits(1)` is false; `fits` must be
/// true up to some point and false after it. Doubling, then bisection: O(log n) calls.
pub fn largest_fitting(fits: impl Fn(usize) -> bool, limit: usize) -> usize {
    if limit == 0 || !fits(1) {
        return 0;
    }
    let (mut fitting, mut too_big) = (1, 2);
    while too_big <= limit && fits(too_big) {
        fitting = too_big;
        too_big *= 2;
    }
    if too_big > limit {
        if fits(limit) {
            return limit;
        }
        too_big = limit;
    }
    while too_big - fitting > 1 {
        let mid = fitting + (too_big - fitting) / 2;
        if fits(mid) {
            fitting = mid;
        } else {
            too_big = mid;
        }
    }
    fitting
}

/// Bytes the search may reach: far above any GPU's memory, far below integer overflow.
const MAX_BYTES_SEARCHED: usize = 1 << 52;

/// The deepest model of `w`'s shape whose `bytes_of(memory)` per rank stays within `budget`.
pub fn largest_model(
    plan: &ShardPlan,
    w: &Workload,
    accum: usize,
    budget: f64,
    bytes_of: impl Fn(&RankMemory) -> usize,
) -> LargestModel {
    let bytes_at = |n_layer| bytes_of(&rank_memory(plan, &w.with_layers(n_layer), accum));
    // From 2 layers on, every layer adds the same bytes (the transient peaks stop growing), so
    // this limit keeps every count the search computes below MAX_BYTES_SEARCHED + bytes_at(2).
    let per_layer = bytes_at(3).saturating_sub(bytes_at(2)).max(1);
    let limit = MAX_LAYERS_SEARCHED
        .min(MAX_BYTES_SEARCHED / per_layer)
        .max(1);
    let n_layer = largest_fitting(|n| bytes_at(n) as f64 <= budget, limit);
    LargestModel {
        n_layer,
        params: UnitSizes::of(w.with_layers(n_layer).shape).numel(),
        at_search_limit: n_layer == limit,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MixedPrecision, ParallelConfig, ShardStrategy};
    use crate::model::GptShape;

    #[test]
    fn search_finds_the_boundary() {
        for boundary in [0, 1, 2, 3, 7, 8, 9, 100, 1000] {
            assert_eq!(largest_fitting(|n| n <= boundary, 10_000), boundary);
        }
        assert_eq!(largest_fitting(|_| true, 37), 37);
        assert_eq!(largest_fitting(|n| n <= 40, 37), 37);
        assert_eq!(largest_fitting(|n| n <= 20, 37), 20);
    }

    /// A shape small enough to count by hand: C = 16, V = 32, T = 8, one sequence, f32, one rank.
    #[test]
    fn largest_model_on_a_hand_checked_case() {
        let w = Workload {
            shape: GptShape {
                n_layer: 1,
                n_head: 2,
                d_model: 16,
                vocab_size: 32,
                block_size: 8,
            },
            seq_len: 8,
            micro_batch: 1,
            global_batch: 1,
            precision: MixedPrecision::default(),
            prefetch: true,
        };
        let plan = ShardPlan::new(&ParallelConfig {
            world_size: 1,
            strategy: ShardStrategy::NoShard,
            ..ParallelConfig::default()
        });
        // Parameters: root 32*16 + 8*16 + 2*16 = 672; block 12*16^2 + 13*16 = 3280.
        // One f32 rank holds 16 bytes per parameter (master 4, gradient 4, moments 8; gradients
        // go straight into the shards): 10752 + 52480 per block.
        // Activations (N = 8 tokens, f32): per block 16 N C values + (4 + NH) N statistics =
        // 8192 + 192 = 8384; outside the blocks 17 N C + N V values + 3 N statistics = 9824.
        let fixed = 10752 + 9824;
        let per_layer = 52480 + 8384;
        for n in [1, 2, 5, 10] {
            assert_eq!(
                rank_memory(&plan, &w.with_layers(n), 1).total(),
                fixed + n * per_layer
            );
        }
        let budget = (fixed + 10 * per_layer) as f64;
        let at = |budget: f64| largest_model(&plan, &w, 1, budget, RankMemory::total);
        assert_eq!(at(budget).n_layer, 10);
        assert_eq!(at(budget).params, 672 + 10 * 3280);
        assert_eq!(at(budget - 1.0).n_layer, 9);
        assert_eq!(at((fixed + per_layer - 1) as f64).n_layer, 0);
        // Recomputation keeps 1 N x C input per block instead of 16 N x C + statistics.
        let rc = largest_model(&plan, &w, 1, budget, RankMemory::total_with_recompute);
        assert!(rc.n_layer > 10);
    }
}
