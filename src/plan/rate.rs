//! The rate a step's FLOPs run at: the GPU's peak times an assumed model-FLOPs utilisation, or
//! the effective rate a `shardtrain bench --json` file measured (tokens/s per rank x FLOPs per
//! token of its smallest-world row, where there is no communication to blur it).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::UsageError;

/// Model-FLOPs utilisation assumed without a measurement. 0.4 is what well-tuned GPT training
/// reaches on H100-class GPUs in bf16 (PyTorch + torch.compile: 502,500 tokens/s x 0.860 GFLOP
/// = 0.44 of the H200's 989 TFLOP/s, /work/shared/FACTS.md); eager PyTorch reaches 0.31.
pub const ASSUMED_MFU: f64 = 0.40;

/// The schema tag a bench file must carry.
pub const BENCH_SCHEMA: &str = "shardtrain.bench/1";

/// Where a rate comes from.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RateSource {
    /// Peak x an assumed MFU.
    Assumed { peak_flops: f64, mfu: f64 },
    /// Measured by `shardtrain bench --json`: the row used, and what it was measured on.
    Calibrated {
        file: String,
        device: String,
        card: String,
        config: String,
        world_size: usize,
        strategy: String,
        micro_batch_size: usize,
        tokens_per_s_per_rank: f64,
        flops_per_token: f64,
    },
}

/// FLOP/s that the model's FLOPs (6N + 12·L·d·T per token) run at on one GPU.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ComputeRate {
    pub flops_per_s: f64,
    pub source: RateSource,
}

/// The parts of a bench file the planner relies on (other fields are ignored).
#[derive(Debug, Deserialize)]
struct BenchFile {
    device: String,
    card: String,
    config: String,
    flops_per_token: f64,
    rows: Vec<BenchRow>,
}

#[derive(Debug, Deserialize)]
struct BenchRow {
    world_size: usize,
    strategy: String,
    micro_batch_size: usize,
    tokens_per_s_per_rank: f64,
}

impl ComputeRate {
    /// `peak_flops` x [`ASSUMED_MFU`].
    pub fn assumed(peak_flops: f64) -> Self {
        ComputeRate {
            flops_per_s: peak_flops * ASSUMED_MFU,
            source: RateSource::Assumed {
                peak_flops,
                mfu: ASSUMED_MFU,
            },
        }
    }

    /// The rate measured by the bench file at `path`; every problem is a usage error naming it.
    pub fn from_bench_file(path: &Path) -> Result<Self, UsageError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| UsageError(format!("--calibrate {name}: cannot read the file: {e}")))?;
        Self::from_bench_json(&text, &name)
    }

    /// The rate measured by bench JSON `text` (named `origin` in messages).
    pub fn from_bench_json(text: &str, origin: &str) -> Result<Self, UsageError> {
        let problem = |what: String| UsageError(format!("--calibrate {origin}: {what}"));
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| problem(format!("not JSON ({e})")))?;
        let schema = value.get("schema").and_then(|s| s.as_str()).unwrap_or("");
        if schema != BENCH_SCHEMA {
            return Err(problem(format!(
                "not a `shardtrain bench --json` file: schema is {schema:?}, expected {BENCH_SCHEMA:?}"
            )));
        }
        let bench: BenchFile = serde_json::from_value(value)
            .map_err(|e| problem(format!("does not follow {BENCH_SCHEMA}: {e}")))?;
        let row = bench
            .rows
            .iter()
            .min_by_key(|r| r.world_size)
            .ok_or_else(|| problem("has no rows".into()))?;
        let measured = row.tokens_per_s_per_rank * bench.flops_per_token;
        if !(measured.is_finite() && measured > 0.0) {
            return Err(problem(format!(
                "the world-{} row gives no positive rate ({} tokens/s per rank x {} FLOPs per token)",
                row.world_size, row.tokens_per_s_per_rank, bench.flops_per_token
            )));
        }
        Ok(ComputeRate {
            flops_per_s: measured,
            source: RateSource::Calibrated {
                file: origin.to_string(),
                device: bench.device,
                card: bench.card,
                config: bench.config,
                world_size: row.world_size,
                strategy: row.strategy.clone(),
                micro_batch_size: row.micro_batch_size,
                tokens_per_s_per_rank: row.tokens_per_s_per_rank,
                flops_per_token: bench.flops_per_token,
            },
        })
    }

    /// One line: the rate and where it comes from.
    pub fn describe(&self) -> String {
        let tflops = self.flops_per_s / 1e12;
        match &self.source {
            RateSource::Assumed { peak_flops, mfu } => format!(
                "{tflops:.1} TFLOP/s = peak {:.1} TFLOP/s x {mfu:.2} MFU (ASSUMED; measure it with `shardtrain bench --json` and pass --calibrate)",
                peak_flops / 1e12
            ),
            RateSource::Calibrated {
                file,
                device,
                card,
                config,
                world_size,
                strategy,
                micro_batch_size,
                tokens_per_s_per_rank,
                flops_per_token,
            } => format!(
                "{tflops:.1} TFLOP/s CALIBRATED from {file}: row world {world_size} {strategy} micro-batch {micro_batch_size} ({tokens_per_s_per_rank:.0} tokens/s per rank x {:.3} GFLOP/token, {config} on {device} {card})",
                flops_per_token / 1e9
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bench(schema: &str, rows: &str) -> String {
        format!(
            r#"{{"schema": "{schema}", "device": "cuda", "card": "H200", "config": "gpt2-124m",
                "params": 124475904, "flops_per_token": 8.6e8, "peak_flops": 9.89e14, "rows": [{rows}]}}"#
        )
    }

    fn row(world: usize, tokens_per_rank: f64) -> String {
        format!(
            r#"{{"world_size": {world}, "strategy": "full_shard", "micro_batch_size": 16,
                "global_batch_size": 512, "steps": 10,
                "ms_per_step": {{"median": 1, "min": 1, "max": 1}}, "tokens_per_s": 1,
                "tokens_per_s_per_rank": {tokens_per_rank}, "mfu": null,
                "memory_bytes": {{"params": 0, "grads": 0, "optimizer": 0, "activations": 0, "total": 0}},
                "phases_ms": {{"forward": 0, "backward": 0, "optimizer": 0, "comm_exposed": 0, "comm_overlapped": 0}}}}"#
        )
    }

    #[test]
    fn the_smallest_world_row_sets_the_rate() {
        let text = bench(
            BENCH_SCHEMA,
            &[row(4, 100_000.0), row(1, 250_000.0), row(2, 200_000.0)].join(","),
        );
        let rate = ComputeRate::from_bench_json(&text, "b.json").unwrap();
        assert_eq!(rate.flops_per_s, 250_000.0 * 8.6e8);
        assert!(matches!(
            rate.source,
            RateSource::Calibrated { world_size: 1, .. }
        ));
        assert!(rate
            .describe()
            .contains("CALIBRATED from b.json: row world 1"));
    }

    #[test]
    fn a_wrong_schema_or_empty_rows_name_the_file() {
        let err =
            ComputeRate::from_bench_json(&bench("other/1", &row(1, 1.0)), "x.json").unwrap_err();
        assert!(
            err.0.contains("x.json") && err.0.contains("schema"),
            "{}",
            err.0
        );
        let err = ComputeRate::from_bench_json(&bench(BENCH_SCHEMA, ""), "y.json").unwrap_err();
        assert!(
            err.0.contains("y.json") && err.0.contains("no rows"),
            "{}",
            err.0
        );
        let err = ComputeRate::from_bench_json("{", "z.json").unwrap_err();
        assert!(err.0.contains("z.json"), "{}", err.0);
        let err =
            ComputeRate::from_bench_json(&bench(BENCH_SCHEMA, &row(1, 0.0)), "w.json").unwrap_err();
        assert!(err.0.contains("no positive rate"), "{}", err.0);
    }

    #[test]
    fn assumed_rate_is_peak_times_mfu() {
        let r = ComputeRate::assumed(989e12);
        assert!((r.flops_per_s - 395.6e12).abs() < 1e6);
        assert!(r.describe().contains("ASSUMED"));
    }
}
