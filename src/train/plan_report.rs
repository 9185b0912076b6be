//! What a plan means before anything runs: the unit layout, how each unit is sharded, and the
//! persistent bytes per rank next to ZeRO's formula (`train --dry-run`, and the run's first lines).

use std::fmt::Write;

use super::gpt_shape;
use crate::backend::DType;
use crate::config::Config;
use crate::model::activations::activation_bytes;
use crate::model::ParamLayout;
use crate::shard::flat::ShardLayout;
use crate::shard::memory::{mib, zero_model_state_bytes, MemoryUse};
use crate::shard::ShardPlan;

/// Per-rank bytes of persistent state (shards and optimizer) that a plan implies, before running:
/// what `--dry-run` shows, and what a run must then measure.
pub fn planned_memory(cfg: &Config, plan: &ShardPlan) -> MemoryUse {
    let layout = ParamLayout::gpt(gpt_shape(cfg), cfg.model.init_std);
    let shard_elems: usize = ShardLayout::new(&layout, plan.group_size)
        .units
        .iter()
        .map(|u| u.shard_len)
        .sum();
    let bf16 = plan.param_dtype == DType::Bf16;
    MemoryUse {
        master_params: shard_elems * 4,
        param_shards: if bf16 { shard_elems * 2 } else { 0 },
        gathered_params_peak: 0,
        grads: shard_elems * 4,
        optimizer: shard_elems * 8,
        activations: activation_bytes(
            &layout.shape,
            cfg.train.micro_batch_size,
            cfg.model.seq_len,
            plan.param_dtype,
        ),
    }
}

/// The unit layout, how each unit is sharded, and the planned memory per rank: what
/// `train --dry-run` prints.
pub fn describe_plan(cfg: &Config) -> String {
    let plan = ShardPlan::new(&cfg.parallel);
    let layout = ParamLayout::gpt(gpt_shape(cfg), cfg.model.init_std);
    let shards = ShardLayout::new(&layout, plan.group_size);
    let strategy = serde_json::to_value(plan.strategy)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "world {}, {strategy}: shard groups of {}, {} replica(s); params {}, reduce {}, prefetch {}",
        plan.world_size,
        plan.group_size,
        plan.replicas(),
        plan.param_dtype,
        plan.reduce_dtype,
        if plan.prefetch { "on" } else { "off" },
    );
    let _ = writeln!(
        out,
        "{:<12} {:>12} {:>12} {:>12}",
        "unit", "params", "padded", "per rank"
    );
    for (unit, s) in layout.units.iter().zip(&shards.units) {
        let _ = writeln!(
            out,
            "{:<12} {:>12} {:>12} {:>12}",
            unit.name, s.numel, s.padded, s.shard_len
        );
    }
    let per_rank: usize = shards.units.iter().map(|u| u.shard_len).sum();
    let _ = writeln!(
        out,
        "{:<12} {:>12} {:>12} {:>12}",
        "total",
        layout.numel(),
        "",
        per_rank
    );
    let m = planned_memory(cfg, &plan);
    let zero = zero_model_state_bytes(&plan, layout.numel());
    let _ = writeln!(
        out,
        "memory per rank: master params {} | param shards {} | grad shards {} | optimizer {} | activations (micro-batch {} x {}) {}",
        mib(m.master_params),
        mib(m.param_shards),
        mib(m.grads),
        mib(m.optimizer),
        cfg.train.micro_batch_size,
        cfg.model.seq_len,
        mib(m.activations),
    );
    let _ = writeln!(
        out,
        "ZeRO model state per rank: {} = {}",
        zero.0,
        mib(zero.1)
    );
    let _ = writeln!(
        out,
        "(gathered parameters and unsharded gradients are transient: their peaks are measured during a run, see summary.json)"
    );
    out
}
