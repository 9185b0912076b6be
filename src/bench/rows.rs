//! The bench's rows: one training job per (world size, strategy), each the user's config with the
//! bench's settings on top. Everything a row needs is checked here, before any row runs, so bad
//! input ends the command at once (exit 2) instead of after minutes of measuring.

use anyhow::{Context, Result};

use super::BenchOptions;
use crate::config::{Config, ShardStrategy};
use crate::error::UsageError;

/// One row's job.
pub(super) struct Job {
    pub world: usize,
    pub strategy: ShardStrategy,
    /// The validated config the row trains with.
    pub cfg: Config,
}

/// The user's config (on one rank: what every row shares) and each row's job, in table order:
/// world sizes as given, strategies as given within each.
pub(super) struct Prepared {
    pub base: Config,
    pub jobs: Vec<Job>,
}

/// The name a strategy has in configs (`full_shard`).
pub fn strategy_name(s: ShardStrategy) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{s:?}"))
}

/// A strategy from its config name, or what the names are.
pub fn parse_strategy(name: &str) -> Result<ShardStrategy, String> {
    serde_json::from_value(serde_json::Value::String(name.trim().to_string())).map_err(|_| {
        format!(
            "unknown strategy `{name}` (expected full_shard, shard_grad_op, no_shard or \
             hybrid_shard)"
        )
    })
}

pub(super) fn prepare(opts: &BenchOptions) -> Result<Prepared> {
    check_flags(opts)?;
    // Loaded on one rank with evaluation off, so the file is judged on what every row shares and
    // not on its own world size, strategy or evaluation settings, which the bench replaces.
    let mut overrides = opts.sets.clone();
    overrides.extend(
        [
            "parallel.world_size=1",
            "parallel.strategy=full_shard",
            "train.eval_every=0",
        ]
        .map(String::from),
    );
    let mut base = Config::load(opts.config.as_deref(), &overrides)?;
    if let Some(device) = opts.device {
        base.device = device;
    }
    check_batches(&base, &opts.worlds)?;
    let max_steps = opts.warmup + opts.steps;
    let mut jobs = Vec::new();
    for &world in &opts.worlds {
        for &strategy in &opts.strategies {
            let cfg = row_config(&base, world, strategy, max_steps)
                .with_context(|| format!("the row world {world}, {}", strategy_name(strategy)))?;
            jobs.push(Job {
                world,
                strategy,
                cfg,
            });
        }
    }
    Ok(Prepared { base, jobs })
}

fn check_flags(opts: &BenchOptions) -> Result<()> {
    let usage = |msg: String| -> Result<()> { Err(UsageError(msg).into()) };
    if opts.worlds.is_empty() {
        return usage("--world: give at least one world size (like --world 1,2,4)".into());
    }
    if let Some(w) = opts.worlds.iter().find(|&&w| w == 0) {
        return usage(format!("--world: world sizes must be at least 1 (got {w})"));
    }
    if opts.strategies.is_empty() {
        return usage("--strategy: give at least one strategy (like --strategy full_shard)".into());
    }
    if opts.steps == 0 {
        return usage("--steps: at least one timed step is needed (got 0)".into());
    }
    if let Some(p) = opts.peak_tflops {
        if !(p.is_finite() && p > 0.0) {
            return usage(format!("--peak-tflops: must be a number > 0 (got {p})"));
        }
    }
    Ok(())
}

/// Every world size must split the global batch into micro-batches; the first that does not is
/// named, with a global batch size that suits every world size asked for.
fn check_batches(base: &Config, worlds: &[usize]) -> Result<()> {
    let (micro, global) = (base.train.micro_batch_size, base.train.global_batch_size);
    let per_pass = |w: usize| micro.checked_mul(w).filter(|&p| p > 0);
    let Some(&bad) = worlds
        .iter()
        .find(|&&w| per_pass(w).is_none_or(|p| !global.is_multiple_of(p)))
    else {
        return Ok(());
    };
    let all = worlds
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let lcm = worlds
        .iter()
        .try_fold(1usize, |acc, &w| per_pass(w).and_then(|p| lcm(acc, p)));
    let hint = match lcm.and_then(|l| global.div_ceil(l).max(1).checked_mul(l)) {
        Some(fit) => format!(
            "; --set train.global_batch_size={fit} fits every --world value ({all}) with \
             micro-batches of {micro}"
        ),
        None => String::new(),
    };
    Err(UsageError(format!(
        "--world {bad}: train.global_batch_size {global} is not divisible by \
         train.micro_batch_size x world size ({micro} x {bad} = {}), so the rows with world {bad} \
         cannot run{hint}",
        micro.saturating_mul(bad)
    ))
    .into())
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn lcm(a: usize, b: usize) -> Option<usize> {
    (a / gcd(a, b)).checked_mul(b)
}

/// `base` as one row runs it: the row's world size and strategy, `max_steps` steps, the
/// learning-rate warm-up cut to fit, and nothing written but the run's own small files (no
/// evaluation, checkpoints, final weights or per-op profile: none of them is a training step).
fn row_config(
    base: &Config,
    world: usize,
    strategy: ShardStrategy,
    max_steps: u64,
) -> Result<Config> {
    let mut cfg = base.clone();
    cfg.parallel.world_size = world;
    cfg.parallel.strategy = strategy;
    cfg.train.max_steps = max_steps;
    cfg.train.warmup_steps = cfg.train.warmup_steps.min(max_steps);
    cfg.train.eval_every = 0;
    cfg.checkpoint.every_steps = 0;
    cfg.checkpoint.save_final = false;
    cfg.logging.profile_ops_steps = 0;
    // A metrics file named by an absolute path would land outside the row's scratch directory.
    cfg.logging.metrics_file = "metrics.jsonl".to_string();
    cfg.validate().map_err(|problems| {
        let lines: Vec<String> = problems
            .iter()
            .map(|(key, problem)| format!("{key}: {problem}"))
            .collect();
        UsageError(lines.join("; "))
    })?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(worlds: &[usize]) -> BenchOptions {
        BenchOptions {
            config: None,
            worlds: worlds.to_vec(),
            strategies: vec![ShardStrategy::FullShard, ShardStrategy::NoShard],
            steps: 2,
            warmup: 1,
            peak_tflops: None,
            sets: vec!["device=cpu".to_string()],
            device: None,
        }
    }

    #[test]
    fn rows_are_worlds_by_strategies_with_the_bench_settings() {
        let p = prepare(&opts(&[1, 2])).unwrap();
        let rows: Vec<(usize, ShardStrategy)> =
            p.jobs.iter().map(|j| (j.world, j.strategy)).collect();
        use ShardStrategy::*;
        assert_eq!(
            rows,
            [(1, FullShard), (1, NoShard), (2, FullShard), (2, NoShard)]
        );
        let c = &p.jobs[3].cfg;
        assert_eq!(c.parallel.world_size, 2);
        assert_eq!(c.train.max_steps, 3);
        assert!(c.train.warmup_steps <= 3);
        assert_eq!(c.train.eval_every, 0);
        assert!(!c.checkpoint.save_final);
    }

    #[test]
    fn an_indivisible_batch_names_the_world_and_a_batch_that_fits() {
        // tiny.yaml: micro-batch 8, global batch 32: world 3 needs a multiple of 24, and with 1
        // and 2 as well the smallest fitting batch >= 32 is 48.
        let err = prepare(&opts(&[1, 2, 3])).err().unwrap();
        let msg = format!("{err:#}");
        assert!(err.downcast_ref::<UsageError>().is_some(), "{msg}");
        assert!(msg.starts_with("--world 3:"), "{msg}");
        assert!(msg.contains("train.global_batch_size=48"), "{msg}");
    }

    #[test]
    fn flags_are_checked_first() {
        let mut o = opts(&[1, 0]);
        assert!(format!("{:#}", prepare(&o).err().unwrap()).starts_with("--world"));
        o.worlds = vec![1];
        o.steps = 0;
        assert!(format!("{:#}", prepare(&o).err().unwrap()).starts_with("--steps"));
        assert_eq!(parse_strategy("no_shard"), Ok(ShardStrategy::NoShard));
        assert!(parse_strategy("zero4").unwrap_err().contains("zero4"));
        assert_eq!(strategy_name(ShardStrategy::ShardGradOp), "shard_grad_op");
    }
}
