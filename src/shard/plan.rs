//! What a sharding strategy means for one rank: its shard group and replica group, when gathered
//! parameters are freed, and when gradients are reduced. FSDP / ZeRO semantics:
//!
//! | strategy      | shard group | params freed after forward | grads reduced every micro-batch |
//! | ------------- | ----------- | -------------------------- | ------------------------------- |
//! | full_shard    | all ranks   | yes (gathered again)       | yes (reduce-scatter)            |
//! | shard_grad_op | all ranks   | no (kept for backward)     | no: last micro-batch (no_sync)  |
//! | no_shard      | itself      | never gathered             | no: last micro-batch (no_sync)  |
//! | hybrid_shard  | G ranks     | yes                        | yes (reduce-scatter, all-reduce)|

use crate::backend::DType;
use crate::config::{ParallelConfig, ShardStrategy};

#[derive(Debug, Clone, PartialEq)]
pub struct ShardPlan {
    pub strategy: ShardStrategy,
    pub world_size: usize,
    /// Ranks that split each unit between them.
    pub group_size: usize,
    /// Parameters gathered for a unit's forward are freed after it (and gathered again for its
    /// backward). The root unit (embeddings, final norm, tied head) is never freed between
    /// forward and backward: the backward starts with it, as FSDP treats its root module.
    pub reshard_after_forward: bool,
    /// Gradients are reduced after every micro-batch; otherwise full gradients accumulate locally
    /// and are reduced once, after the last micro-batch (FSDP's `no_sync`).
    pub reduce_every_micro_batch: bool,
    pub param_dtype: DType,
    pub reduce_dtype: DType,
    /// Gather the next unit before the current one computes.
    pub prefetch: bool,
}

impl ShardPlan {
    pub fn new(p: &ParallelConfig) -> Self {
        let world = p.world_size;
        let (group_size, reshard, reduce_every) = match p.strategy {
            ShardStrategy::FullShard => (world, true, true),
            ShardStrategy::ShardGradOp => (world, false, false),
            ShardStrategy::NoShard => (1, false, false),
            ShardStrategy::HybridShard => (p.shard_group_size, true, true),
        };
        ShardPlan {
            strategy: p.strategy,
            world_size: world,
            group_size,
            reshard_after_forward: reshard,
            reduce_every_micro_batch: reduce_every,
            param_dtype: p.mixed_precision.param_dtype,
            reduce_dtype: p.mixed_precision.reduce_dtype,
            prefetch: p.prefetch,
        }
    }

    /// Number of groups that hold a full replica of the model.
    pub fn replicas(&self) -> usize {
        self.world_size / self.group_size
    }

    /// Global ranks of the shard group of `rank` (consecutive ranks, as on one node).
    pub fn shard_group(&self, rank: usize) -> Vec<usize> {
        let first = rank / self.group_size * self.group_size;
        (first..first + self.group_size).collect()
    }

    /// Global ranks holding the same shard as `rank`, one per replica.
    pub fn replica_group(&self, rank: usize) -> Vec<usize> {
        let pos = rank % self.group_size;
        (0..self.replicas())
            .map(|g| g * self.group_size + pos)
            .collect()
    }

    /// Every shard group, then every replica group: each a partition of the ranks.
    pub fn all_shard_groups(&self) -> Vec<Vec<usize>> {
        (0..self.replicas())
            .map(|g| self.shard_group(g * self.group_size))
            .collect()
    }

    pub fn all_replica_groups(&self) -> Vec<Vec<usize>> {
        (0..self.group_size)
            .map(|p| self.replica_group(p))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(strategy: ShardStrategy, world: usize, group: usize) -> ShardPlan {
        ShardPlan::new(&ParallelConfig {
            world_size: world,
            strategy,
            shard_group_size: group,
            ..ParallelConfig::default()
        })
    }

    #[test]
    fn groups_partition_the_world() {
        let p = plan(ShardStrategy::HybridShard, 6, 3);
        assert_eq!(p.shard_group(4), vec![3, 4, 5]);
        assert_eq!(p.replica_group(4), vec![1, 4]);
        assert_eq!(p.all_shard_groups(), vec![vec![0, 1, 2], vec![3, 4, 5]]);
        assert_eq!(
            p.all_replica_groups(),
            vec![vec![0, 3], vec![1, 4], vec![2, 5]]
        );
        let d = plan(ShardStrategy::NoShard, 3, 0);
        assert_eq!((d.group_size, d.replicas()), (1, 3));
        assert_eq!(d.replica_group(2), vec![0, 1, 2]);
        let f = plan(ShardStrategy::FullShard, 4, 0);
        assert_eq!((f.group_size, f.replicas()), (4, 1));
    }
}
