//! Bytes per rank, by kind, as this engine allocates them: f32 master shards, the compute-dtype
//! shard copy, gathered units alive at once, gradient shards and unsharded gradients, AdamW
//! moments, and activations (as the trainer keeps them, and as per-layer recomputation would).
//! Also ZeRO's textbook model-state formulas, to compare against.
//!
//! The engine's transient buffers (see `shard::engine`), which ZeRO's formulas leave out:
//! - gathered parameters: with resharding (full_shard, hybrid_shard) the root unit stays gathered
//!   through the micro-batch, plus the unit in use and the one prefetched: root + 2 blocks (root +
//!   1 without prefetch); shard_grad_op keeps every unit from its forward to its backward: the
//!   whole padded model. A shard group of one gathers nothing.
//! - unsharded gradients (reduce dtype, padded): reduced after each unit's backward, so the root
//!   (held until the embedding's backward at the end) + 2 blocks with a shard group (a block's
//!   reduce-scatter runs beside the next block's backward) or + 1 block without; but shard_grad_op
//!   and no_shard accumulate them over the micro-batches of a step (FSDP's no_sync), so with 2 or
//!   more micro-batches every unit's. One rank with f32 reduction writes straight into the
//!   gradient shards: none.

use serde::Serialize;

use super::Workload;
use crate::backend::DType;
use crate::config::ShardStrategy;
use crate::model::activations::activation_bytes;
use crate::model::{GptShape, ParamLayout};
use crate::shard::ShardPlan;

/// Parameter counts of the model's units: the root (embeddings, final norm, tied head) and the
/// blocks, which all have the same size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct UnitSizes {
    pub root: usize,
    pub block: usize,
    pub n_layer: usize,
}

impl UnitSizes {
    /// Sizes from the real parameter layout (one block is enough: every block is alike).
    pub fn of(shape: GptShape) -> Self {
        let one_block = ParamLayout::gpt(
            GptShape {
                n_layer: 1,
                ..shape
            },
            0.02,
        );
        UnitSizes {
            root: one_block.units[ParamLayout::EMBED_HEAD_UNIT].numel,
            block: one_block.units[ParamLayout::block_unit(0)].numel,
            n_layer: shape.n_layer,
        }
    }

    /// Parameters of the whole model.
    pub fn numel(&self) -> usize {
        self.root + self.n_layer * self.block
    }

    /// The root unit's elements, padded to a multiple of `group` (as `shard::flat` pads).
    pub fn padded_root(&self, group: usize) -> usize {
        padded(self.root, group)
    }

    pub fn padded_block(&self, group: usize) -> usize {
        padded(self.block, group)
    }

    /// Every unit's elements, padded.
    pub fn padded_total(&self, group: usize) -> usize {
        self.padded_root(group) + self.n_layer * self.padded_block(group)
    }

    /// Elements of one rank's shard of every unit.
    pub fn shard_total(&self, group: usize) -> usize {
        self.padded_total(group) / group.max(1)
    }
}

/// `numel` rounded up to a multiple of `group`.
fn padded(numel: usize, group: usize) -> usize {
    let g = group.max(1);
    numel.div_ceil(g) * g
}

/// Bytes one rank holds, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RankMemory {
    /// f32 master weights of this rank's shard.
    pub master_params: usize,
    /// The compute-dtype copy of the shard (0 with f32 parameters: the master is that copy).
    pub param_shards: usize,
    /// Peak of gathered units alive at once.
    pub gathered_params_peak: usize,
    /// f32 gradient shards.
    pub grad_shards: usize,
    /// Peak of unsharded gradients alive at once.
    pub unsharded_grads_peak: usize,
    /// AdamW's two f32 moments of the shard.
    pub optimizer: usize,
    /// Activations and backward scratch of one micro-batch, as the trainer keeps them.
    pub activations: usize,
    /// The same with full per-layer recomputation (not implemented by the trainer yet): only each
    /// block's input is kept, plus one block's working set while its backward recomputes it.
    pub activations_recompute: usize,
}

impl RankMemory {
    /// Master weights plus the compute copy.
    pub fn params(&self) -> usize {
        self.master_params + self.param_shards
    }

    /// Gradient shards plus unsharded gradients.
    pub fn grads(&self) -> usize {
        self.grad_shards + self.unsharded_grads_peak
    }

    /// Everything but activations.
    pub fn model_state(&self) -> usize {
        self.params() + self.gathered_params_peak + self.grads() + self.optimizer
    }

    /// What a rank of this trainer holds at its peak.
    pub fn total(&self) -> usize {
        self.model_state() + self.activations
    }

    /// What it would hold with per-layer recomputation.
    pub fn total_with_recompute(&self) -> usize {
        self.model_state() + self.activations_recompute
    }
}

/// Bytes per rank for `w` under `plan`, with `accum` micro-batches per optimizer step.
pub fn rank_memory(plan: &ShardPlan, w: &Workload, accum: usize) -> RankMemory {
    let units = UnitSizes::of(w.shape);
    let group = plan.group_size;
    let shard = units.shard_total(group);
    let f32_params = plan.param_dtype == DType::F32;
    RankMemory {
        master_params: shard * 4,
        param_shards: if f32_params {
            0
        } else {
            shard * plan.param_dtype.size_bytes()
        },
        gathered_params_peak: gathered_peak_elems(&units, plan) * plan.param_dtype.size_bytes(),
        grad_shards: shard * 4,
        unsharded_grads_peak: unsharded_grads_peak_elems(&units, plan, accum)
            * plan.reduce_dtype.size_bytes(),
        optimizer: shard * 8,
        activations: activation_bytes(&w.shape, w.micro_batch, w.seq_len, plan.param_dtype),
        activations_recompute: recompute_activation_bytes(w, plan.param_dtype),
    }
}

/// Elements of gathered units alive at once (see the module doc).
fn gathered_peak_elems(units: &UnitSizes, plan: &ShardPlan) -> usize {
    let group = plan.group_size;
    if group <= 1 {
        return 0;
    }
    if !plan.reshard_after_forward {
        return units.padded_total(group);
    }
    let blocks_alive = if plan.prefetch { 2 } else { 1 };
    units.padded_root(group) + units.n_layer.min(blocks_alive) * units.padded_block(group)
}

/// Elements of unsharded gradients alive at once (see the module doc).
fn unsharded_grads_peak_elems(units: &UnitSizes, plan: &ShardPlan, accum: usize) -> usize {
    let straight_into_shards =
        plan.group_size == 1 && plan.replicas() == 1 && plan.reduce_dtype == DType::F32;
    if straight_into_shards {
        return 0;
    }
    let group = plan.group_size;
    if plan.reduce_every_micro_batch || accum <= 1 {
        // A block's reduce-scatter runs beside the next block's backward, which fills its own
        // gradients meanwhile: two blocks at once when there is a shard group to scatter over.
        let blocks_alive = if group > 1 { 2 } else { 1 };
        units.padded_root(group) + units.n_layer.min(blocks_alive) * units.padded_block(group)
    } else {
        units.padded_total(group)
    }
}

/// Activation bytes with full per-layer recomputation: the buffers outside the blocks (embedding
/// output, final norm, logits, backward scratch), each block's input (N x C), and one block's
/// saved activations, rebuilt for its backward. Derived from the trainer's own accounting
/// (`activation_bytes` at 0 and 1 layers), so both columns count the same buffers.
pub fn recompute_activation_bytes(w: &Workload, dtype: DType) -> usize {
    let shape_with = |n_layer| GptShape { n_layer, ..w.shape };
    let outside_blocks = activation_bytes(&shape_with(0), w.micro_batch, w.seq_len, dtype);
    let one_block =
        activation_bytes(&shape_with(1), w.micro_batch, w.seq_len, dtype) - outside_blocks;
    let block_inputs = w.shape.n_layer * w.micro_batch * w.seq_len * w.shape.d_model;
    outside_blocks + block_inputs * dtype.size_bytes() + w.shape.n_layer.min(1) * one_block
}

/// Bytes per parameter in ZeRO's formulas: p of parameters, g of gradients, k of optimizer state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ZeroBytes {
    pub p: usize,
    pub g: usize,
    pub k: usize,
}

impl ZeroBytes {
    /// This engine's: p the param dtype, g the reduce dtype, k the two f32 moments plus an f32
    /// master when parameters are not f32.
    pub fn of(param: DType, reduce: DType) -> Self {
        let p = param.size_bytes();
        ZeroBytes {
            p,
            g: reduce.size_bytes(),
            k: 8 + if param == DType::F32 { 0 } else { 4 },
        }
    }
}

/// ZeRO's model-state bytes per rank for `psi` parameters: full_shard (p+g+k)Ψ/N, shard_grad_op
/// pΨ + (g+k)Ψ/N, no_shard (p+g+k)Ψ, hybrid_shard (p+g+k)Ψ/G with G the shard group. `group` is
/// N for full_shard and shard_grad_op, G for hybrid_shard (ignored for no_shard).
pub fn zero_model_state_bytes(
    strategy: ShardStrategy,
    psi: f64,
    group: usize,
    b: ZeroBytes,
) -> f64 {
    let (p, g, k) = (b.p as f64, b.g as f64, b.k as f64);
    let n = group.max(1) as f64;
    match strategy {
        ShardStrategy::FullShard | ShardStrategy::HybridShard => (p + g + k) * psi / n,
        ShardStrategy::ShardGradOp => p * psi + (g + k) * psi / n,
        ShardStrategy::NoShard => (p + g + k) * psi,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MixedPrecision, ParallelConfig};

    const MIB: f64 = 1024.0 * 1024.0;

    fn plan(strategy: ShardStrategy, world: usize, group: usize, dtype: DType) -> ShardPlan {
        ShardPlan::new(&ParallelConfig {
            world_size: world,
            strategy,
            shard_group_size: group,
            mixed_precision: MixedPrecision {
                param_dtype: dtype,
                reduce_dtype: dtype,
            },
            ..ParallelConfig::default()
        })
    }

    /// A model whose units all divide by 4, so padding adds nothing.
    fn workload() -> Workload {
        Workload {
            shape: GptShape {
                n_layer: 4,
                n_head: 2,
                d_model: 16,
                vocab_size: 32,
                block_size: 8,
            },
            seq_len: 8,
            micro_batch: 1,
            global_batch: 8,
            precision: MixedPrecision::default(),
            prefetch: true,
        }
    }

    #[test]
    fn zero_formulas_by_hand() {
        // Ψ = 1M parameters (1 MiB of elements), mixed precision as in the ZeRO paper: p = g = 2, k = 12.
        let b = ZeroBytes { p: 2, g: 2, k: 12 };
        let psi = MIB;
        let full = zero_model_state_bytes(ShardStrategy::FullShard, psi, 8, b);
        assert_eq!(full / MIB, 16.0 / 8.0);
        let zero2 = zero_model_state_bytes(ShardStrategy::ShardGradOp, psi, 8, b);
        assert_eq!(zero2 / MIB, 2.0 + 14.0 / 8.0);
        let ddp = zero_model_state_bytes(ShardStrategy::NoShard, psi, 8, b);
        assert_eq!(ddp / MIB, 16.0);
        // Hybrid divides by its shard group, not the world.
        let hybrid = zero_model_state_bytes(ShardStrategy::HybridShard, psi, 4, b);
        assert_eq!(hybrid / MIB, 16.0 / 4.0);
        assert_eq!(
            ZeroBytes::of(DType::Bf16, DType::F32),
            ZeroBytes { p: 2, g: 4, k: 12 }
        );
        assert_eq!(
            ZeroBytes::of(DType::F32, DType::F32),
            ZeroBytes { p: 4, g: 4, k: 8 }
        );
    }

    #[test]
    fn sharded_model_state_is_zeros_formula_plus_the_engines_transient_buffers() {
        let w = workload();
        let units = UnitSizes::of(w.shape);
        assert_eq!(units.numel(), ParamLayout::gpt(w.shape, 0.02).numel());
        assert_eq!(units.padded_total(4), units.numel(), "no padding at 4");
        let psi = units.numel() as f64;
        let f32s = ZeroBytes::of(DType::F32, DType::F32);
        // full_shard, f32: master shard (= param shard) + grad shard + moments = (4+4+8)Ψ/N,
        // exactly ZeRO-3; on top, the transient gathered units and unsharded gradients.
        let p = plan(ShardStrategy::FullShard, 4, 0, DType::F32);
        let m = rank_memory(&p, &w, 2);
        let zero3 = zero_model_state_bytes(ShardStrategy::FullShard, psi, 4, f32s);
        assert_eq!((m.params() + m.grad_shards + m.optimizer) as f64, zero3);
        assert_eq!(m.gathered_params_peak, (units.root + 2 * units.block) * 4);
        // The root's gradients, a block's being reduce-scattered, and the next block's filling.
        assert_eq!(m.unsharded_grads_peak, (units.root + 2 * units.block) * 4);
        // hybrid_shard: the same over its shard group of 2 (world 4).
        let h = rank_memory(&plan(ShardStrategy::HybridShard, 4, 2, DType::F32), &w, 2);
        let hybrid = zero_model_state_bytes(ShardStrategy::HybridShard, psi, 2, f32s);
        assert_eq!((h.params() + h.grad_shards + h.optimizer) as f64, hybrid);
        // shard_grad_op: ZeRO-2's replicated pΨ is the gathered model; the engine also keeps its
        // f32 shard (4Ψ/N) and, accumulating over 2 micro-batches, unsharded gradients (gΨ).
        let s = rank_memory(&plan(ShardStrategy::ShardGradOp, 4, 0, DType::F32), &w, 2);
        let zero2 = zero_model_state_bytes(ShardStrategy::ShardGradOp, psi, 4, f32s);
        assert_eq!(
            (s.gathered_params_peak + s.grad_shards + s.optimizer) as f64,
            zero2
        );
        assert_eq!(s.unsharded_grads_peak as f64, 4.0 * psi);
        // no_shard: (p+g+k)Ψ, plus the unsharded gradients it accumulates before the all-reduce.
        let d = rank_memory(&plan(ShardStrategy::NoShard, 4, 0, DType::F32), &w, 2);
        let ddp = zero_model_state_bytes(ShardStrategy::NoShard, psi, 4, f32s);
        assert_eq!((d.params() + d.grad_shards + d.optimizer) as f64, ddp);
        assert_eq!(d.gathered_params_peak, 0);
        // One rank with f32 reduction: gradients go straight into the shards.
        let one = rank_memory(&plan(ShardStrategy::FullShard, 1, 0, DType::F32), &w, 2);
        assert_eq!(one.unsharded_grads_peak, 0);
        assert_eq!(one.gathered_params_peak, 0);
    }

    #[test]
    fn bf16_adds_a_compute_copy_and_halves_gathers() {
        let w = workload();
        let units = UnitSizes::of(w.shape);
        let m = rank_memory(&plan(ShardStrategy::FullShard, 4, 0, DType::Bf16), &w, 1);
        assert_eq!(m.master_params, units.numel());
        assert_eq!(m.param_shards, units.numel() / 2);
        assert_eq!(m.gathered_params_peak, (units.root + 2 * units.block) * 2);
    }

    #[test]
    fn recomputation_keeps_block_inputs_and_one_block() {
        let w = workload();
        let (n, c) = (w.micro_batch * w.seq_len, w.shape.d_model);
        let full = activation_bytes(&w.shape, 1, 8, DType::F32);
        let rc = recompute_activation_bytes(&w, DType::F32);
        // Per block the trainer keeps 16 N x C values and 4N + NH x N f32 statistics.
        let per_block = 16 * n * c * 4 + (4 * n + 2 * n) * 4;
        assert_eq!(full - rc, (w.shape.n_layer - 1) * per_block - 4 * n * c * 4);
    }
}
