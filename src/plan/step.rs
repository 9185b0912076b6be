//! Predicted time of one optimizer step on one rank: the model's FLOPs at the compute rate, plus
//! the communication this engine cannot hide behind them.
//!
//! What the engine overlaps (`shard::engine`, `train::rank`), per micro-batch:
//! - when the model asks for unit k, the all-gather of the unit that runs next is issued before k
//!   computes, on the comm lane: it runs beside k's compute and is exposed only by what it takes
//!   beyond it. Forward order: root (embedding), blocks 1..L, root (head); backward: root (head),
//!   blocks L..1, root (embedding). So in the forward the root's gather has nothing before it and
//!   block 1's runs beside the embedding lookup (no FLOPs): both exposed; block k+1's hides
//!   behind block k. In the backward (full_shard and hybrid_shard gather the blocks again; the
//!   root stays gathered) block L's hides behind the head's backward, block k's behind block
//!   k+1's. Without `parallel.prefetch` every gather is exposed.
//! - a block's gradient reduce-scatter is issued after its backward and waited for after the next
//!   unit's backward is issued: block k's runs beside block k-1's backward, on the same comm lane
//!   as the gather prefetched there (their sum is what hides behind that compute). Block 1's runs
//!   beside the embedding's backward (no FLOPs) and the root's is the last of the backward: both
//!   exposed. Hybrid's all-reduce across replicas, and no_shard's all-reduce (no shard group to
//!   scatter over), are waited for at once: exposed. full_shard and hybrid_shard reduce every
//!   micro-batch; shard_grad_op and no_shard only the last one of a step (no_sync), and they gather
//!   every micro-batch (once, in the forward).
//! - per step, the loss and the gradient norm are all-reduced (a few bytes: latency only).
//!
//! Not modelled: the optimizer update, data loading and kernel launch gaps (a calibrated rate
//! includes them for one GPU), and contention between the comm lane and compute.

use std::ops::{Add, Mul};

use serde::Serialize;

use super::comm::{all_gather_seconds, all_reduce_seconds, reduce_scatter_seconds, Topology};
use super::memory::UnitSizes;
use super::Workload;
use crate::shard::ShardPlan;

/// What the step times assume about overlap, in words (the module doc in short).
pub const OVERLAP_ASSUMPTION: [&str; 5] = [
    "assumed HIDDEN: the all-gather of the next unit (prefetch), beside the current unit's compute, in the forward and, for full_shard / hybrid_shard (which gather again), the backward",
    "assumed HIDDEN: a block's gradient reduce-scatter, beside the next block's backward (sharing the comm lane with the gather prefetched there)",
    "EXPOSED (waited for at once): the forward's first two gathers (root; block 1 beside the FLOP-free embedding lookup), the reduce-scatters of block 1 and the root (nothing left to hide behind), every all-reduce of gradients (across replicas; no_shard's), the per-step loss and grad-norm all-reduces",
    "no_sync: shard_grad_op and no_shard reduce once per step, full_shard and hybrid_shard after every micro-batch; every strategy that shards gathers every micro-batch",
    "not modelled: optimizer update, data loading, kernel launch gaps, comm/compute contention",
];

/// Seconds of one optimizer step on one rank.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct StepTime {
    /// The model's FLOPs at the compute rate.
    pub compute_s: f64,
    /// Every collective, hidden or not.
    pub comm_s: f64,
    /// The part of `comm_s` the compute waits for.
    pub comm_exposed_s: f64,
    /// compute + exposed communication.
    pub step_s: f64,
}

impl StepTime {
    /// Communication that runs beside compute.
    pub fn comm_overlapped_s(&self) -> f64 {
        self.comm_s - self.comm_exposed_s
    }
}

/// Communication time, and how much of it the compute waits for.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Comm {
    total: f64,
    exposed: f64,
}

impl Comm {
    /// Waited for at once: all of it exposed.
    fn waited(seconds: f64) -> Comm {
        Comm {
            total: seconds,
            exposed: seconds,
        }
    }

    /// Running beside `compute` seconds of work: exposed only beyond it.
    fn beside(seconds: f64, compute: f64) -> Comm {
        Comm {
            total: seconds,
            exposed: (seconds - compute).max(0.0),
        }
    }
}

impl Add for Comm {
    type Output = Comm;
    fn add(self, o: Comm) -> Comm {
        Comm {
            total: self.total + o.total,
            exposed: self.exposed + o.exposed,
        }
    }
}

impl Mul<f64> for Comm {
    type Output = Comm;
    fn mul(self, times: f64) -> Comm {
        Comm {
            total: self.total * times,
            exposed: self.exposed * times,
        }
    }
}

/// Seconds of compute per unit and pass, for one micro-batch. FLOPs per token: 2 per parameter
/// in the forward, 4 in the backward, plus attention's 12·d·T per block (4 forward, 8 backward);
/// the root's FLOPs are the tied head's matmul (the embedding lookup has none).
#[derive(Debug, Clone, Copy)]
struct UnitCompute {
    head_forward: f64,
    head_backward: f64,
    block_forward: f64,
    block_backward: f64,
}

fn unit_compute(units: &UnitSizes, w: &Workload, flops_per_s: f64) -> UnitCompute {
    let tokens = (w.micro_batch * w.seq_len) as f64;
    let attention_forward = 4.0 * (w.shape.d_model * w.seq_len) as f64;
    let block_forward = tokens * (2.0 * units.block as f64 + attention_forward) / flops_per_s;
    let head_forward = tokens * 2.0 * units.root as f64 / flops_per_s;
    UnitCompute {
        head_forward,
        head_backward: 2.0 * head_forward,
        block_forward,
        block_backward: 2.0 * block_forward,
    }
}

impl UnitCompute {
    fn micro_batch(&self, n_layer: usize) -> f64 {
        self.head_forward
            + self.head_backward
            + n_layer as f64 * (self.block_forward + self.block_backward)
    }
}

/// Seconds of each collective the step issues.
#[derive(Debug, Clone, Copy)]
struct Collectives {
    gather_root: f64,
    gather_block: f64,
    /// Reduce-scatter of a unit's gradients in the shard group (0 without one).
    scatter_root: f64,
    scatter_block: f64,
    /// All-reduce of a unit's reduced gradients across replicas (0 without replicas).
    replicas_root: f64,
    replicas_block: f64,
    /// Loss (+ stop flag) over the world and gradient norm over the shard group.
    per_step_scalars: f64,
}

fn collectives(units: &UnitSizes, plan: &ShardPlan, topo: &Topology) -> Collectives {
    let (group, replicas) = (plan.group_size, plan.replicas());
    let shard_link = topo.link_for(&plan.all_shard_groups());
    let replica_link = topo.link_for(&plan.all_replica_groups());
    let world_link = topo.link_for(&[(0..plan.world_size).collect()]);
    let param_bytes = plan.param_dtype.size_bytes() as f64;
    let grad_bytes = plan.reduce_dtype.size_bytes() as f64;
    let gather = |padded: usize| all_gather_seconds(padded as f64 * param_bytes, group, shard_link);
    let scatter =
        |padded: usize| reduce_scatter_seconds(padded as f64 * grad_bytes, group, shard_link);
    let across_replicas = |padded: usize| {
        let piece = (padded / group.max(1)) as f64 * grad_bytes;
        all_reduce_seconds(piece, replicas, replica_link)
    };
    let (root, block) = (units.padded_root(group), units.padded_block(group));
    Collectives {
        gather_root: gather(root),
        gather_block: gather(block),
        scatter_root: scatter(root),
        scatter_block: scatter(block),
        replicas_root: across_replicas(root),
        replicas_block: across_replicas(block),
        per_step_scalars: all_reduce_seconds(8.0, plan.world_size, world_link)
            + all_reduce_seconds(4.0, group, shard_link),
    }
}

/// A block's gather issued beside `compute` seconds of work (or exposed without prefetch).
fn block_gather(k: &Collectives, plan: &ShardPlan, compute: f64) -> Comm {
    if plan.prefetch {
        Comm::beside(k.gather_block, compute)
    } else {
        Comm::waited(k.gather_block)
    }
}

/// Gathers of one micro-batch's forward (see the module doc).
fn forward_gathers(c: &UnitCompute, k: &Collectives, plan: &ShardPlan, n_layer: usize) -> Comm {
    if plan.group_size <= 1 {
        return Comm::default();
    }
    let first_block = block_gather(k, plan, 0.0) * n_layer.min(1) as f64;
    let later_blocks = block_gather(k, plan, c.block_forward) * n_layer.saturating_sub(1) as f64;
    Comm::waited(k.gather_root) + first_block + later_blocks
}

/// Communication of one micro-batch's backward (see the module doc): the gathers of strategies
/// that freed blocks after the forward, and, when the micro-batch reduces, the gradients'.
fn backward_comm(
    c: &UnitCompute,
    k: &Collectives,
    plan: &ShardPlan,
    n_layer: usize,
    reducing: bool,
) -> Comm {
    let gathers = plan.group_size > 1 && plan.reshard_after_forward;
    let gather = if gathers { k.gather_block } else { 0.0 };
    let lane_beside = |seconds: f64, compute: f64| {
        if plan.prefetch {
            Comm::beside(seconds, compute)
        } else {
            Comm::waited(seconds)
        }
    };
    // Beside the head's backward: block L's gather.
    let mut comm = lane_beside(gather * n_layer.min(1) as f64, c.head_backward);
    // Beside block j's backward (j = L..1): block j-1's gather and block j+1's reduce-scatter.
    for j in (1..=n_layer).rev() {
        let gather_next = if j > 1 { gather } else { 0.0 };
        let scatter_prev = if reducing && j < n_layer {
            k.scatter_block
        } else {
            0.0
        };
        // The lane runs the prefetched gather too: the scatter hides behind what is left.
        let lane_busy = if plan.prefetch { gather_next } else { 0.0 };
        let scatter = Comm::beside(scatter_prev, (c.block_backward - lane_busy).max(0.0));
        comm = comm + lane_beside(gather_next, c.block_backward) + scatter;
    }
    if reducing {
        // Block 1's and the root's reduce-scatters have nothing left to run beside; every
        // all-reduce across replicas is waited for at once.
        comm = comm
            + Comm::waited(k.scatter_block * n_layer.min(1) as f64 + k.scatter_root)
            + Comm::waited(k.replicas_root + n_layer as f64 * k.replicas_block);
    }
    comm
}

/// Predicted time of one optimizer step of `accum` micro-batches on one rank.
pub fn step_time(
    plan: &ShardPlan,
    w: &Workload,
    accum: usize,
    flops_per_s: f64,
    topo: &Topology,
) -> StepTime {
    let units = UnitSizes::of(w.shape);
    let n_layer = units.n_layer;
    let c = unit_compute(&units, w, flops_per_s);
    let k = collectives(&units, plan, topo);
    let accum = accum.max(1);
    // Micro-batches that reduce their gradients: every one, or (no_sync) the last of the step.
    let reducing = if plan.reduce_every_micro_batch {
        accum
    } else {
        1
    };
    let forward = forward_gathers(&c, &k, plan, n_layer) * accum as f64;
    let backward = backward_comm(&c, &k, plan, n_layer, true) * reducing as f64
        + backward_comm(&c, &k, plan, n_layer, false) * (accum - reducing) as f64;
    let comm = forward + backward + Comm::waited(k.per_step_scalars);
    let compute = c.micro_batch(n_layer) * accum as f64;
    StepTime {
        compute_s: compute,
        comm_s: comm.total,
        comm_exposed_s: comm.exposed,
        step_s: compute + comm.exposed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::DType;
    use crate::config::{MixedPrecision, ParallelConfig, ShardStrategy};
    use crate::model::GptShape;
    use crate::plan::comm::Link;

    fn workload() -> Workload {
        Workload {
            shape: GptShape {
                n_layer: 12,
                n_head: 12,
                d_model: 768,
                vocab_size: 50304,
                block_size: 1024,
            },
            seq_len: 1024,
            micro_batch: 16,
            global_batch: 512,
            precision: MixedPrecision {
                param_dtype: DType::Bf16,
                reduce_dtype: DType::F32,
            },
            prefetch: true,
        }
    }

    fn topo() -> Topology {
        Topology {
            gpus_per_node: 8,
            intra: Link {
                bus_gb_per_s: 370.0,
                hop_latency_us: 2.0,
            },
            inter: Link {
                bus_gb_per_s: 50.0,
                hop_latency_us: 5.0,
            },
        }
    }

    fn plan(strategy: ShardStrategy, world: usize, group: usize) -> ShardPlan {
        ShardPlan::new(&ParallelConfig {
            world_size: world,
            strategy,
            shard_group_size: group,
            mixed_precision: workload().precision,
            ..ParallelConfig::default()
        })
    }

    #[test]
    fn compute_is_six_n_plus_attention_per_token() {
        let w = workload();
        let rate = 400e12;
        let t = step_time(&plan(ShardStrategy::FullShard, 1, 0), &w, 32, rate, &topo());
        let tokens = (512 * 1024) as f64;
        assert!((t.compute_s - tokens * w.flops_per_token() / rate).abs() < 1e-9);
        // One GPU: no communication at all.
        assert_eq!((t.comm_s, t.step_s), (0.0, t.compute_s));
        // FACTS.md: 0.860 GFLOP per token for GPT-2 small at T = 1024.
        assert!((w.flops_per_token() / 1e9 - 0.860).abs() < 0.001);
    }

    #[test]
    fn exposed_comm_follows_the_engines_overlap() {
        let w = workload();
        let units = UnitSizes::of(w.shape);
        let rate = 400e12;
        let p = plan(ShardStrategy::FullShard, 8, 0);
        let t = step_time(&p, &w, 1, rate, &topo());
        let c = unit_compute(&units, &w, rate);
        let k = collectives(&units, &p, &topo());
        // Blocks gather and scatter far faster than they compute: only the root's and block 1's
        // forward gathers, block 1's and the root's reduce-scatters and the scalars are exposed.
        assert!(k.gather_block + k.scatter_block < c.block_backward);
        let exposed =
            k.gather_root + k.gather_block + k.scatter_block + k.scatter_root + k.per_step_scalars;
        assert!((t.comm_exposed_s - exposed).abs() < 1e-12, "{t:?}");
        // 12 + 1 forward gathers, 12 backward gathers, 13 reduce-scatters; no replicas.
        assert_eq!((k.replicas_root, k.replicas_block), (0.0, 0.0));
        let total = k.gather_root
            + 24.0 * k.gather_block
            + k.scatter_root
            + 12.0 * k.scatter_block
            + k.per_step_scalars;
        assert!((t.comm_s - total).abs() < 1e-12);
        // Without prefetch every gather is exposed; blocks 12..2's reduce-scatters still hide.
        let mut no_prefetch = p.clone();
        no_prefetch.prefetch = false;
        let t2 = step_time(&no_prefetch, &w, 1, rate, &topo());
        assert!((t2.comm_exposed_s - (total - 11.0 * k.scatter_block)).abs() < 1e-12);
        // hybrid_shard: the all-reduces across replicas are exposed on top.
        let h = plan(ShardStrategy::HybridShard, 16, 8);
        let kh = collectives(&units, &h, &topo());
        let th = step_time(&h, &w, 1, rate, &topo());
        let hybrid_exposed = kh.gather_root
            + kh.gather_block
            + kh.scatter_block
            + kh.scatter_root
            + kh.replicas_root
            + 12.0 * kh.replicas_block
            + kh.per_step_scalars;
        assert!(kh.replicas_block > 0.0);
        assert!((th.comm_exposed_s - hybrid_exposed).abs() < 1e-12, "{th:?}");
    }

    #[test]
    fn no_sync_strategies_reduce_once_per_step() {
        let w = workload();
        let rate = 400e12;
        let full = step_time(&plan(ShardStrategy::FullShard, 8, 0), &w, 4, rate, &topo());
        let zero2 = step_time(
            &plan(ShardStrategy::ShardGradOp, 8, 0),
            &w,
            4,
            rate,
            &topo(),
        );
        // shard_grad_op gathers once per micro-batch and reduces once per step: less traffic.
        assert!(zero2.comm_s < full.comm_s / 2.0, "{zero2:?} vs {full:?}");
        let ddp1 = step_time(&plan(ShardStrategy::NoShard, 8, 0), &w, 1, rate, &topo());
        let ddp4 = step_time(&plan(ShardStrategy::NoShard, 8, 0), &w, 4, rate, &topo());
        assert!((ddp4.comm_s - ddp1.comm_s).abs() < 1e-12);
    }

    #[test]
    fn rings_across_nodes_cost_more_than_inside_one() {
        let w = workload();
        let rate = 400e12;
        let one_node = step_time(&plan(ShardStrategy::FullShard, 8, 0), &w, 1, rate, &topo());
        let two_nodes = step_time(&plan(ShardStrategy::FullShard, 16, 0), &w, 1, rate, &topo());
        let hybrid = step_time(
            &plan(ShardStrategy::HybridShard, 16, 8),
            &w,
            1,
            rate,
            &topo(),
        );
        assert!(two_nodes.comm_s > 4.0 * one_node.comm_s);
        assert!(hybrid.comm_s < two_nodes.comm_s);
    }
}
