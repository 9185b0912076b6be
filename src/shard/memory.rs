//! Memory per rank: what each kind of state occupies, measured from the buffers a rank holds, and
//! ZeRO's model-state formula for the same strategy to compare against.

use serde::Serialize;

use super::plan::ShardPlan;
use crate::config::ShardStrategy;

/// Bytes one rank holds, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MemoryUse {
    /// f32 master weights of this rank's shard.
    pub master_params: usize,
    /// The bf16 compute copy of this rank's shard (0 with f32 parameters: the master is used).
    pub param_shards: usize,
    /// Peak of gathered (unsharded) parameters alive at once.
    pub gathered_params_peak: usize,
    /// f32 gradient shards plus the peak of unsharded gradients alive at once.
    pub grads: usize,
    /// AdamW moments of this rank's shard.
    pub optimizer: usize,
    /// Activations and backward scratch of one micro-batch.
    pub activations: usize,
}

impl MemoryUse {
    pub fn total(&self) -> usize {
        self.master_params
            + self.param_shards
            + self.gathered_params_peak
            + self.grads
            + self.optimizer
            + self.activations
    }
}

/// ZeRO's model-state bytes per rank (parameters + gradients + optimizer state, no activations)
/// for `numel` parameters: with p bytes per parameter, g per gradient and k of optimizer state
/// (8 for the moments, + 4 for an f32 master when parameters are bf16):
/// full_shard / hybrid_shard (p+g+k)Ψ/G, shard_grad_op pΨ + (g+k)Ψ/G, no_shard (p+g+k)Ψ.
pub fn zero_model_state_bytes(plan: &ShardPlan, numel: usize) -> (String, usize) {
    let p = plan.param_dtype.size_bytes();
    let g = plan.reduce_dtype.size_bytes();
    let k = 8 + if p == 4 { 0 } else { 4 };
    let n = plan.group_size;
    let psi = numel;
    match plan.strategy {
        ShardStrategy::FullShard | ShardStrategy::HybridShard => {
            (format!("({p}+{g}+{k})Ψ/{n}"), (p + g + k) * psi / n)
        }
        ShardStrategy::ShardGradOp => (
            format!("{p}Ψ + ({g}+{k})Ψ/{n}"),
            p * psi + (g + k) * psi / n,
        ),
        ShardStrategy::NoShard => (format!("({p}+{g}+{k})Ψ"), (p + g + k) * psi),
    }
}

/// `bytes` in MiB with one decimal, for tables.
pub fn mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}
