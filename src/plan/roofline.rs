//! The predicted time of each op of a training step: a roofline per kernel (the larger of its
//! FLOPs over the compute peak and its bytes over the HBM bandwidth, each derated by a stated
//! efficiency) plus a launch gap per kernel, summed per op name, for one generation of kernels.
//!
//! Nothing here has been measured on this project's kernels yet: every efficiency is an
//! assumption with its source, to be replaced by the per-op table of a GPU run
//! (`predict_report::join` sets the two side by side).

use serde::Serialize;

use super::hardware::Hardware;
use super::ops::{step_calls, OpCall, OpClass};
use super::step::step_time;
use super::{batch_split, Workload};
use crate::shard::ShardPlan;

/// Which units an attention kernel's FLOPs run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ComputeUnits {
    /// bf16 tensor cores (the card's dense peak).
    TensorCore,
    /// f32 FMA on CUDA cores (the card's non-tensor f32 peak).
    CudaCoreF32,
}

/// One kernel of the attention backward after its preprocess.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BackwardPass {
    pub name: &'static str,
    /// FLOPs per visited query-key pair per head dimension: 2 per matrix product it computes.
    pub flops_per_pair_per_dim: f64,
    /// Parts of dqkv (q, k, v) it writes.
    pub dqkv_parts: f64,
}

/// How the attention kernels of a generation work and how fast they run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct AttentionKernels {
    pub units: ComputeUnits,
    /// Share of `units`' peak reached.
    pub efficiency: f64,
    /// Query rows per tile at head sizes up to 64, and at 128.
    pub tile_upto_64: usize,
    pub tile_128: usize,
    pub backward: &'static [BackwardPass],
}

impl AttentionKernels {
    pub fn tile(&self, head_dim: usize) -> usize {
        if head_dim <= 64 {
            self.tile_upto_64
        } else {
            self.tile_128
        }
    }
}

/// One generation of kernels: what each op class reaches of the card's peaks.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct KernelProfile {
    pub name: &'static str,
    pub description: &'static str,
    /// Share of the tensor-core peak cuBLASLt's GEMMs reach.
    pub matmul_efficiency: f64,
    pub attention: AttentionKernels,
    /// Share of the HBM bandwidth the memory-bound kernels reach.
    pub memory_efficiency: f64,
    /// The LayerNorm weight/bias gradient pass runs on a grid that fills the card (else on
    /// `cols / 32` blocks, which bounds its bandwidth to that share of the SMs).
    pub layernorm_column_pass_full_grid: bool,
    /// Microseconds between two dependent kernels on one stream.
    pub launch_gap_us: f64,
}

/// cuBLASLt bf16 GEMMs: 802 TFLOP/s = 0.81 of 989 measured on the H200 at 8192³ (FACTS.md);
/// GPT-2's GEMMs are smaller (k = 768 for most), so a little less.
pub const MATMUL_EFFICIENCY: f64 = 0.75;

/// Streaming kernels reach about 80% of HBM bandwidth on Hopper (the usual STREAM-style
/// figure; e.g. ~2.6-2.9 of the H100's 3.35 TB/s in copy benchmarks).
pub const MEMORY_EFFICIENCY: f64 = 0.80;

/// Gap between dependent kernels on one stream, host kept ahead (CUDA launch latency is a few
/// microseconds; the profiler's two event records per op add to it).
pub const LAUNCH_GAP_US: f64 = 2.0;

/// Today's attention (kernels/attention.cu): one thread per query row in f32 on CUDA cores, 168
/// registers forward and 255 with spills backward (FACTS.md, ptxas), no tensor cores. 0.30 of
/// the 67 TFLOP/s f32 peak is an assumption, in line with the 2026-12-02 review's estimate of
/// ~70 ms of attention per GPT-2 step (FACTS.md); nothing has measured it.
pub const CUDA_CORE_ATTENTION_EFFICIENCY: f64 = 0.30;

/// FlashAttention-2-style kernels on `mma.sync` tensor cores (kernels/tensor_core.cuh) reach
/// about 35% of the H100's bf16 peak: FlashAttention-2's own figure there, quoted by the
/// FlashAttention-3 paper (Shah et al. 2024), which needs wgmma and TMA to reach 75%.
pub const TENSOR_CORE_ATTENTION_EFFICIENCY: f64 = 0.35;

/// Today's backward: dK/dV per key row recomputes S = QKᵀ and dP = dO·Vᵀ, then dV += Pᵀ·dO and
/// dK += dSᵀ·Q (4 products); dQ per query row recomputes S and dP again, then dQ = dS·K (3).
const CUDA_CORE_BACKWARD: [BackwardPass; 2] = [
    BackwardPass {
        name: "dK, dV per key row",
        flops_per_pair_per_dim: 8.0,
        dqkv_parts: 2.0,
    },
    BackwardPass {
        name: "dQ per query row",
        flops_per_pair_per_dim: 6.0,
        dqkv_parts: 1.0,
    },
];

/// The tensor-core backward (kernels/attention_tc_backward.cu): the same two passes as the
/// CUDA-core one, deterministic (no atomics on dQ): dK/dV per 64 keys (S, dP, dV, dK: 4
/// products), then dQ per 64 queries (S, dP, dQ: 3).
const TENSOR_CORE_BACKWARD: [BackwardPass; 2] = [
    BackwardPass {
        name: "dK, dV per key tile",
        flops_per_pair_per_dim: 8.0,
        dqkv_parts: 2.0,
    },
    BackwardPass {
        name: "dQ per query tile",
        flops_per_pair_per_dim: 6.0,
        dqkv_parts: 1.0,
    },
];

/// The CUDA-core kernels: what f32 and head size 32 run today, and what every dtype ran before
/// the tensor-core kernels.
pub const CUDA_CORE: KernelProfile = KernelProfile {
    name: "cuda-core",
    description: "cuBLASLt GEMMs, CUDA-core f32 attention (3-kernel backward), LayerNorm weight gradients on cols/32 blocks",
    matmul_efficiency: MATMUL_EFFICIENCY,
    attention: AttentionKernels {
        units: ComputeUnits::CudaCoreF32,
        efficiency: CUDA_CORE_ATTENTION_EFFICIENCY,
        // attention_tile() in src/backend/cuda/launch.rs.
        tile_upto_64: 64,
        tile_128: 32,
        backward: &CUDA_CORE_BACKWARD,
    },
    memory_efficiency: MEMORY_EFFICIENCY,
    layernorm_column_pass_full_grid: false,
    launch_gap_us: LAUNCH_GAP_US,
};

/// The tensor-core kernels of the bf16 path at head sizes 64 and 128: FlashAttention-2 forward
/// and a two-pass deterministic backward on bf16 `mma.sync`, 64-row tiles, and a LayerNorm
/// backward over a full grid. Same GEMMs, same memory-bound kernels.
pub const TENSOR_CORE: KernelProfile = KernelProfile {
    name: "tensor-core",
    description: "cuBLASLt GEMMs with epilogues, tensor-core FlashAttention-2 (dK/dV then dQ, deterministic), LayerNorm backward on a full grid",
    matmul_efficiency: MATMUL_EFFICIENCY,
    attention: AttentionKernels {
        units: ComputeUnits::TensorCore,
        efficiency: TENSOR_CORE_ATTENTION_EFFICIENCY,
        tile_upto_64: 64,
        tile_128: 64,
        backward: &TENSOR_CORE_BACKWARD,
    },
    memory_efficiency: MEMORY_EFFICIENCY,
    layernorm_column_pass_full_grid: true,
    launch_gap_us: LAUNCH_GAP_US,
};

pub const PROFILES: [KernelProfile; 2] = [CUDA_CORE, TENSOR_CORE];

/// The card's roofs the prediction uses.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Roofs {
    /// Dense tensor-core FLOP/s of the compute dtype.
    pub tensor_flops: f64,
    pub cuda_core_f32_flops: f64,
    pub hbm_bytes_per_s: f64,
    pub sm_count: usize,
}

impl Roofs {
    /// The roofs of `hw`, or the flag that is missing for them.
    pub fn of(hw: &Hardware) -> Result<Roofs, String> {
        Ok(Roofs {
            tensor_flops: hw.peak_flops,
            cuda_core_f32_flops: hw
                .cuda_core_f32_flops
                .ok_or("the card's CUDA-core f32 peak is unknown (use a preset --gpu)")?,
            hbm_bytes_per_s: hw
                .hbm_bytes_per_s
                .ok_or("--hbm-bw is required: the card's HBM bandwidth is unknown")?,
            sm_count: hw
                .sm_count
                .ok_or("the card's SM count is unknown (use a preset --gpu)")?,
        })
    }
}

/// Which roof binds a kernel (or most of an op's time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Bound {
    Compute,
    Memory,
}

/// The times of one call, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
struct CallTime {
    at_peak: f64,
    predicted: f64,
    /// Predicted seconds bound by compute (the rest by memory or launches).
    compute_bound: f64,
}

/// Peak FLOP/s and efficiency of a kernel class under `k`.
fn compute_roof(class: OpClass, k: &KernelProfile, r: &Roofs) -> (f64, f64) {
    match class {
        OpClass::Matmul => (r.tensor_flops, k.matmul_efficiency),
        OpClass::Attention => match k.attention.units {
            ComputeUnits::TensorCore => (r.tensor_flops, k.attention.efficiency),
            ComputeUnits::CudaCoreF32 => (r.cuda_core_f32_flops, k.attention.efficiency),
        },
        // Nominal FLOPs on CUDA cores: they never bind, but they are not free either.
        OpClass::Memory => (r.cuda_core_f32_flops, 1.0),
    }
}

fn call_time(call: &OpCall, k: &KernelProfile, r: &Roofs) -> CallTime {
    let mut t = CallTime {
        at_peak: 0.0,
        predicted: 0.0,
        compute_bound: 0.0,
    };
    for kern in &call.kernels {
        let (peak, eff) = compute_roof(kern.class, k, r);
        // A grid of fewer blocks than SMs streams through only that share of the card.
        let share = kern
            .blocks
            .map_or(1.0, |b| (b as f64 / r.sm_count as f64).min(1.0));
        let bw = r.hbm_bytes_per_s * share;
        let (flop_s, byte_s) = (kern.flops / peak, kern.bytes / bw);
        t.at_peak += flop_s.max(byte_s);
        let (flop_eff, byte_eff) = (flop_s / eff, byte_s / k.memory_efficiency);
        t.predicted += flop_eff.max(byte_eff) + kern.launches as f64 * k.launch_gap_us * 1e-6;
        if flop_eff >= byte_eff {
            t.compute_bound += flop_eff;
        }
    }
    t
}

/// One op name's row of the predicted table (per optimizer step).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OpRow {
    pub op: &'static str,
    pub calls: u64,
    pub kernel_launches: u64,
    pub flops: f64,
    pub model_flops: f64,
    pub bytes: f64,
    /// The roof behind most of the predicted time.
    pub bound: Bound,
    /// Seconds at the card's peaks (no efficiency, no launch gaps).
    pub at_peak_ms: f64,
    /// The efficiency applied to the bound: of the compute peak or of the HBM bandwidth.
    pub efficiency: f64,
    pub predicted_ms: f64,
}

/// The whole prediction for one kernel profile.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    pub profile: KernelProfile,
    /// Micro-batches per optimizer step on each rank.
    pub accum: usize,
    pub tokens_per_step: usize,
    pub rows: Vec<OpRow>,
    /// Sum of the rows: the compute queue's time.
    pub compute_ms: f64,
    /// Communication the compute waits for (the plan's overlap model; 0 on one GPU).
    pub comm_exposed_ms: f64,
    pub step_ms: f64,
    pub tokens_per_s: f64,
    /// Model FLOPs per token (6N + 12·L·d·T) x tokens / step time / tensor peak.
    pub mfu: f64,
    pub flops_per_token: f64,
}

/// Efficiency of the class that binds most of `call`.
fn bound_efficiency(call: &OpCall, bound: Bound, k: &KernelProfile, r: &Roofs) -> f64 {
    match bound {
        Bound::Memory => k.memory_efficiency,
        Bound::Compute => call
            .kernels
            .iter()
            .filter(|kern| kern.class != OpClass::Memory)
            .map(|kern| compute_roof(kern.class, k, r).1)
            .next()
            .unwrap_or(1.0),
    }
}

/// Sums `calls` per op name, in the order each name first appears.
pub fn op_rows(calls: &[OpCall], k: &KernelProfile, r: &Roofs) -> Vec<OpRow> {
    let mut rows: Vec<(OpRow, f64, Option<&OpCall>)> = Vec::new();
    for call in calls {
        let t = call_time(call, k, r);
        let n = call.calls as f64;
        let i = match rows.iter().position(|(row, _, _)| row.op == call.op) {
            Some(i) => i,
            None => {
                rows.push((
                    OpRow {
                        op: call.op,
                        calls: 0,
                        kernel_launches: 0,
                        flops: 0.0,
                        model_flops: 0.0,
                        bytes: 0.0,
                        bound: Bound::Memory,
                        at_peak_ms: 0.0,
                        efficiency: 0.0,
                        predicted_ms: 0.0,
                    },
                    0.0,
                    None,
                ));
                rows.len() - 1
            }
        };
        let (row, compute_ms, first) = &mut rows[i];
        row.calls += call.calls;
        row.kernel_launches +=
            call.calls * call.kernels.iter().map(|k| k.launches as u64).sum::<u64>();
        row.flops += n * call.flops();
        row.model_flops += n * call.model_flops();
        row.bytes += n * call.bytes();
        row.at_peak_ms += n * t.at_peak * 1e3;
        row.predicted_ms += n * t.predicted * 1e3;
        *compute_ms += n * t.compute_bound * 1e3;
        if first.is_none() || t.compute_bound > 0.0 {
            *first = Some(call);
        }
    }
    rows.into_iter()
        .map(|(mut row, compute_ms, call)| {
            row.bound = if compute_ms * 2.0 >= row.predicted_ms {
                Bound::Compute
            } else {
                Bound::Memory
            };
            row.efficiency = call.map_or(1.0, |c| bound_efficiency(c, row.bound, k, r));
            row
        })
        .collect()
}

/// Predicts one optimizer step of `w` on rank 0 of `plan` with kernels `k` on `hw`.
pub fn predict(
    w: &Workload,
    plan: &ShardPlan,
    hw: &Hardware,
    k: &KernelProfile,
) -> Result<Prediction, String> {
    let roofs = Roofs::of(hw)?;
    let batch = batch_split(w, plan.world_size);
    let calls = step_calls(w, plan, batch.accum, k);
    let rows = op_rows(&calls, k, &roofs);
    let compute_ms: f64 = rows.iter().map(|r| r.predicted_ms).sum();
    // Communication at the plan's overlap, with the compute rate this prediction implies.
    let flops_per_token = w.flops_per_token();
    let tokens_per_rank = batch.accum * w.micro_batch * w.seq_len;
    let rate = flops_per_token * tokens_per_rank as f64 / (compute_ms * 1e-3);
    let comm = step_time(plan, w, batch.accum, rate, &hw.topology);
    let step_ms = compute_ms + comm.comm_exposed_s * 1e3;
    let tokens_per_step = batch.global_batch * w.seq_len;
    let tokens_per_s = tokens_per_step as f64 / (step_ms * 1e-3);
    Ok(Prediction {
        profile: *k,
        accum: batch.accum,
        tokens_per_step,
        rows,
        compute_ms,
        comm_exposed_ms: comm.comm_exposed_s * 1e3,
        step_ms,
        tokens_per_s,
        mfu: tokens_per_s / plan.world_size as f64 * flops_per_token / hw.peak_flops,
        flops_per_token,
    })
}
