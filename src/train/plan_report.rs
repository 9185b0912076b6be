//! What a plan means before anything runs: the unit layout, how each unit is sharded, and the
//! persistent bytes per rank next to ZeRO's formula (`train --dry-run`, and the run's first lines).

use std::fmt::Write;

use super::gpt_shape;
use crate::config::Config;
use crate::model::ParamLayout;
use crate::plan::memory::rank_memory;
use crate::plan::Workload;
use crate::shard::flat::ShardLayout;
use crate::shard::memory::{mib, zero_model_state_bytes, MemoryUse};
use crate::shard::ShardPlan;

/// Per-rank bytes of persistent state (shards and optimizer) that a plan implies, before running:
/// what `--dry-run` shows, and what a run must then measure. The formulas are `shardtrain plan`'s
/// (`plan::memory`); its transient peaks (gathered units, unsharded gradients) are left out here.
pub fn planned_memory(cfg: &Config, plan: &ShardPlan) -> MemoryUse {
    let accum = cfg.train.grad_accum_steps(plan.world_size);
    let m = rank_memory(plan, &Workload::from_config(cfg), accum);
    MemoryUse {
        master_params: m.master_params,
        param_shards: m.param_shards,
        gathered_params_peak: 0,
        grads: m.grad_shards,
        optimizer: m.optimizer,
        activations: m.activations,
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
    let peak = super::admission::peak_per_rank(cfg).total();
    let ranks = plan.world_size;
    let _ = writeln!(
        out,
        "planned peak per rank, with gathered parameters and unsharded gradients: {} ({peak} bytes); {ranks} rank(s) in one process: {}",
        mib(peak),
        mib(peak.saturating_mul(ranks)),
    );
    let _ = writeln!(
        out,
        "(gathered parameters and unsharded gradients are transient: their peaks are measured during a run, see summary.json)"
    );
    out
}
