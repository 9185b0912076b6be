//! `shardtrain plan`: for a model config on N GPUs and each sharding strategy, predicts the bytes
//! per GPU, the step time (compute plus the communication this engine cannot hide), the scaling
//! efficiency from 1 to N GPUs, and the deepest model of the same shape that still fits. The
//! formulas follow this engine's own allocations and schedule (`shard::engine`), so on the CPU
//! backend the predicted memory is what a run measures (tests/plan.rs).
//!
//! One job per module: `hardware` (GPU presets, memory budget), `rate` (the compute rate, assumed
//! or calibrated), `comm` (ring costs, which link), `memory` (bytes per rank), `step` (step time),
//! `capacity` (largest model), `report` (the table and the JSON); and, op by op, `ops` (every op
//! of a step with its FLOPs and bytes), `roofline` (their predicted times per kernel generation),
//! `predict_report` (that table, and the measured one beside it): `shardtrain bench --predict`.

pub mod capacity;
pub mod comm;
pub mod hardware;
pub mod memory;
pub mod ops;
pub mod predict_report;
pub mod rate;
pub mod report;
pub mod roofline;
pub mod step;

use serde::Serialize;

use crate::config::{Config, MixedPrecision, ParallelConfig, ShardStrategy};
use crate::model::GptShape;
use crate::shard::ShardPlan;
use capacity::{largest_model, LargestModel};
use hardware::Hardware;
use memory::{rank_memory, RankMemory, UnitSizes};
use rate::ComputeRate;
use step::{step_time, StepTime};

/// What one training job computes, independent of how many GPUs run it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Workload {
    pub shape: GptShape,
    pub seq_len: usize,
    /// Sequences per forward/backward on one rank.
    pub micro_batch: usize,
    /// Sequences per optimizer step, over every rank and micro-batch.
    pub global_batch: usize,
    pub precision: MixedPrecision,
    /// `parallel.prefetch`: gather the next unit beside the current one's compute.
    pub prefetch: bool,
}

impl Workload {
    pub fn from_config(cfg: &Config) -> Self {
        Workload {
            shape: GptShape {
                n_layer: cfg.model.n_layer,
                n_head: cfg.model.n_head,
                d_model: cfg.model.d_model,
                vocab_size: cfg.model.vocab_size,
                block_size: cfg.model.block_size,
            },
            seq_len: cfg.model.seq_len,
            micro_batch: cfg.train.micro_batch_size,
            global_batch: cfg.train.global_batch_size,
            precision: cfg.parallel.mixed_precision.clone(),
            prefetch: cfg.parallel.prefetch,
        }
    }

    /// The same job with `n_layer` blocks.
    pub fn with_layers(&self, n_layer: usize) -> Self {
        Workload {
            shape: GptShape {
                n_layer,
                ..self.shape
            },
            ..self.clone()
        }
    }

    pub fn params(&self) -> usize {
        UnitSizes::of(self.shape).numel()
    }

    /// Refuses jobs whose byte counts could overflow the planner's integers: a rough upper bound
    /// of one unsharded rank (24 bytes per parameter, f32 activations), computed in floating point,
    /// must stay under [`MAX_PLANNABLE_BYTES`].
    pub fn check_plannable(&self) -> Result<(), String> {
        let s = &self.shape;
        let (l, c, v) = (s.n_layer as f64, s.d_model as f64, s.vocab_size as f64);
        let params = (v + s.block_size as f64 + 2.0) * c + l * (12.0 * c * c + 13.0 * c);
        let tokens = (self.micro_batch * self.seq_len) as f64;
        let per_token = l * (16.0 * c + 4.0 + s.n_head as f64) + 17.0 * c + v + 3.0;
        let bytes = 24.0 * params + 4.0 * tokens * per_token;
        if bytes < MAX_PLANNABLE_BYTES {
            Ok(())
        } else {
            Err(format!(
                "too large to plan: about {bytes:.1e} bytes on one rank (the planner stops at {MAX_PLANNABLE_BYTES:.1e})"
            ))
        }
    }

    /// FLOPs per trained token: 6N (forward 2N, backward 4N) + 12·L·d·T of attention.
    pub fn flops_per_token(&self) -> f64 {
        let s = &self.shape;
        6.0 * self.params() as f64 + 12.0 * (s.n_layer * s.d_model * self.seq_len) as f64
    }

    /// What `strategy` means for one rank of `world` with shard groups of `group` (hybrid only).
    pub fn shard_plan(&self, strategy: ShardStrategy, world: usize, group: usize) -> ShardPlan {
        ShardPlan::new(&ParallelConfig {
            world_size: world,
            strategy,
            shard_group_size: group,
            mixed_precision: self.precision.clone(),
            prefetch: self.prefetch,
            ..ParallelConfig::default()
        })
    }
}

/// The largest job (bytes of one unsharded rank) the planner accepts: a pebibyte.
pub const MAX_PLANNABLE_BYTES: f64 = (1u64 << 50) as f64;

/// The strategies every plan compares.
pub const STRATEGIES: [ShardStrategy; 4] = [
    ShardStrategy::FullShard,
    ShardStrategy::ShardGradOp,
    ShardStrategy::NoShard,
    ShardStrategy::HybridShard,
];

pub fn strategy_name(s: ShardStrategy) -> &'static str {
    match s {
        ShardStrategy::FullShard => "full_shard",
        ShardStrategy::ShardGradOp => "shard_grad_op",
        ShardStrategy::NoShard => "no_shard",
        ShardStrategy::HybridShard => "hybrid_shard",
    }
}

/// How the global batch splits over `gpus` GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BatchSplit {
    pub micro_batch: usize,
    /// Micro-batches per rank per optimizer step.
    pub accum: usize,
    /// Sequences per step actually used: accum x gpus x micro_batch.
    pub global_batch: usize,
    /// The config's global batch; differs from `global_batch` when it does not divide.
    pub requested_global_batch: usize,
}

impl BatchSplit {
    pub fn adjusted(&self) -> bool {
        self.global_batch != self.requested_global_batch
    }
}

/// The config's global and micro batch on `gpus` GPUs; when the global batch is not a multiple
/// of gpus x micro, the smallest accumulation that covers it (so a larger global batch).
pub fn batch_split(w: &Workload, gpus: usize) -> BatchSplit {
    let per_pass = (w.micro_batch * gpus).max(1);
    let accum = w.global_batch.div_ceil(per_pass).max(1);
    BatchSplit {
        micro_batch: w.micro_batch,
        accum,
        global_batch: accum * per_pass,
        requested_global_batch: w.global_batch,
    }
}

/// Shard group of hybrid_shard: one node's GPUs (the whole job when it fits in one node).
pub fn hybrid_group(gpus: usize, gpus_per_node: usize) -> Result<usize, String> {
    if gpus <= gpus_per_node {
        Ok(gpus)
    } else if gpus.is_multiple_of(gpus_per_node) {
        Ok(gpus_per_node)
    } else {
        Err(format!(
            "{gpus} GPUs are not whole nodes of {gpus_per_node}: no node-sized shard group"
        ))
    }
}

/// One strategy's prediction on N GPUs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StrategyPlan {
    pub strategy: ShardStrategy,
    pub shard_group: usize,
    pub replicas: usize,
    pub memory: RankMemory,
    pub total_bytes: usize,
    pub total_with_recompute_bytes: usize,
    /// total_bytes within the budget (memory less headroom).
    pub fits: bool,
    pub fits_with_recompute: bool,
    pub time: StepTime,
    pub tokens_per_s: f64,
    pub tokens_per_s_per_gpu: f64,
    /// tokens/s per GPU here over tokens/s on one GPU.
    pub scaling_efficiency: f64,
    pub largest: LargestModel,
    pub largest_with_recompute: LargestModel,
}

/// A strategy's row: planned, or why it cannot run on this many GPUs.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum StrategyRow {
    Planned(StrategyPlan),
    NotApplicable {
        strategy: ShardStrategy,
        reason: String,
    },
}

/// Everything predicted for one GPU count.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Section {
    pub gpus: usize,
    pub nodes: usize,
    pub batch: BatchSplit,
    /// tokens/s of one GPU alone (no communication): the base of the scaling efficiency.
    pub single_gpu_tokens_per_s: f64,
    pub rows: Vec<StrategyRow>,
}

/// What a plan is asked about.
#[derive(Debug, Clone)]
pub struct PlanRequest {
    /// How the config is named in the output.
    pub config_name: String,
    pub workload: Workload,
    pub hardware: Hardware,
    pub rate: ComputeRate,
    pub gpu_counts: Vec<usize>,
}

/// The whole prediction (what `--json` prints).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanReport {
    pub schema: &'static str,
    pub config: String,
    pub workload: Workload,
    pub params: usize,
    pub flops_per_token: f64,
    pub hardware: Hardware,
    pub budget_bytes: f64,
    pub rate: ComputeRate,
    /// What the step times assume hidden and exposed.
    pub overlap: Vec<&'static str>,
    pub sections: Vec<Section>,
}

pub const PLAN_SCHEMA: &str = "shardtrain.plan/1";

/// Predicts every strategy for every GPU count of `req`.
pub fn plan(req: &PlanRequest) -> PlanReport {
    let w = &req.workload;
    PlanReport {
        schema: PLAN_SCHEMA,
        config: req.config_name.clone(),
        workload: w.clone(),
        params: w.params(),
        flops_per_token: w.flops_per_token(),
        hardware: req.hardware.clone(),
        budget_bytes: req.hardware.budget_bytes(),
        rate: req.rate.clone(),
        overlap: step::OVERLAP_ASSUMPTION.to_vec(),
        sections: req
            .gpu_counts
            .iter()
            .map(|&gpus| plan_section(req, gpus))
            .collect(),
    }
}

/// tokens/s of one GPU training `w` alone: pure compute.
fn single_gpu_tokens_per_s(req: &PlanRequest) -> f64 {
    let w = &req.workload;
    let batch = batch_split(w, 1);
    let plan = w.shard_plan(ShardStrategy::FullShard, 1, 1);
    let t = step_time(
        &plan,
        w,
        batch.accum,
        req.rate.flops_per_s,
        &req.hardware.topology,
    );
    (batch.global_batch * w.seq_len) as f64 / t.step_s
}

fn plan_section(req: &PlanRequest, gpus: usize) -> Section {
    let per_node = req.hardware.topology.gpus_per_node;
    let single = single_gpu_tokens_per_s(req);
    let rows = STRATEGIES
        .iter()
        .map(|&strategy| {
            // Only hybrid_shard reads the group size; the others derive theirs from the world.
            let group = match strategy {
                ShardStrategy::HybridShard => hybrid_group(gpus, per_node),
                _ => Ok(0),
            };
            match group {
                Ok(group) => {
                    StrategyRow::Planned(plan_strategy(req, strategy, gpus, group, single))
                }
                Err(reason) => StrategyRow::NotApplicable { strategy, reason },
            }
        })
        .collect();
    Section {
        gpus,
        nodes: gpus.div_ceil(per_node),
        batch: batch_split(&req.workload, gpus),
        single_gpu_tokens_per_s: single,
        rows,
    }
}

fn plan_strategy(
    req: &PlanRequest,
    strategy: ShardStrategy,
    gpus: usize,
    group: usize,
    single_gpu_tokens_per_s: f64,
) -> StrategyPlan {
    let w = &req.workload;
    let batch = batch_split(w, gpus);
    let plan = w.shard_plan(strategy, gpus, group);
    let budget = req.hardware.budget_bytes();
    let memory = rank_memory(&plan, w, batch.accum);
    let time = step_time(
        &plan,
        w,
        batch.accum,
        req.rate.flops_per_s,
        &req.hardware.topology,
    );
    let tokens_per_s = (batch.global_batch * w.seq_len) as f64 / time.step_s;
    let tokens_per_s_per_gpu = tokens_per_s / gpus as f64;
    StrategyPlan {
        strategy,
        shard_group: plan.group_size,
        replicas: plan.replicas(),
        total_bytes: memory.total(),
        total_with_recompute_bytes: memory.total_with_recompute(),
        fits: memory.total() as f64 <= budget,
        fits_with_recompute: memory.total_with_recompute() as f64 <= budget,
        memory,
        time,
        tokens_per_s,
        tokens_per_s_per_gpu,
        scaling_efficiency: tokens_per_s_per_gpu / single_gpu_tokens_per_s,
        largest: largest_model(&plan, w, batch.accum, budget, RankMemory::total),
        largest_with_recompute: largest_model(
            &plan,
            w,
            batch.accum,
            budget,
            RankMemory::total_with_recompute,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(global: usize, micro: usize) -> Workload {
        Workload {
            shape: GptShape {
                n_layer: 2,
                n_head: 2,
                d_model: 16,
                vocab_size: 32,
                block_size: 8,
            },
            seq_len: 8,
            micro_batch: micro,
            global_batch: global,
            precision: MixedPrecision::default(),
            prefetch: true,
        }
    }

    #[test]
    fn batches_that_do_not_divide_take_the_smallest_covering_accumulation() {
        let even = batch_split(&workload(512, 16), 8);
        assert_eq!(
            (even.accum, even.global_batch, even.adjusted()),
            (4, 512, false)
        );
        let odd = batch_split(&workload(512, 16), 24);
        assert_eq!(
            (odd.accum, odd.global_batch, odd.adjusted()),
            (2, 768, true)
        );
        let too_many = batch_split(&workload(512, 16), 512);
        assert_eq!((too_many.accum, too_many.global_batch), (1, 8192));
    }

    #[test]
    fn hybrid_groups_are_nodes() {
        assert_eq!(hybrid_group(64, 8), Ok(8));
        assert_eq!(hybrid_group(4, 8), Ok(4));
        assert!(hybrid_group(12, 8).is_err());
    }
}
