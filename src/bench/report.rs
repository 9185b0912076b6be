//! The bench's results: the `shardtrain.bench/1` JSON document (read by other tools: its field
//! names are a contract, add fields but never rename or remove them) and the aligned table.

use std::fmt::Write as _;

use crate::numbers::thousands;
use serde::{Deserialize, Serialize};

/// The schema name in every report.
pub const SCHEMA: &str = "shardtrain.bench/1";

/// One bench invocation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    pub schema: String,
    /// "cpu" or "cuda".
    pub device: String,
    /// The CPU model or the GPU's name.
    pub card: String,
    /// The config file (or the built-in default's name).
    pub config: String,
    pub params: usize,
    /// 6N + 12·L·d·T.
    pub flops_per_token: f64,
    /// The peak MFU is measured against (FLOP/s of the one device the ranks share); null when
    /// unknown.
    pub peak_flops: Option<f64>,
    pub rows: Vec<BenchRow>,
    // ---- beyond the schema's required fields ----
    /// Where `peak_flops` comes from.
    pub peak_flops_source: String,
    /// Devices the ranks run on: 1, since the bench's ranks are threads sharing one device (MFU
    /// divides by devices × peak).
    pub devices: usize,
    /// The backend's own description (threads, GPU ordinal and compute capability).
    pub backend: String,
    pub model: ModelShape,
    pub param_dtype: String,
    pub reduce_dtype: String,
    /// Untimed steps run first in every row.
    pub warmup_steps: u64,
    /// UTC, `YYYY-MM-DDTHH:MM:SSZ` (set by the command line).
    pub date: String,
    pub commit: String,
    /// The command line that produced the report.
    pub command: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelShape {
    pub n_layer: usize,
    pub n_head: usize,
    pub d_model: usize,
    pub vocab_size: usize,
    pub seq_len: usize,
}

/// One (world size, strategy) run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchRow {
    pub world_size: usize,
    pub strategy: String,
    pub micro_batch_size: usize,
    pub global_batch_size: usize,
    /// Timed steps (warm-up excluded).
    pub steps: u64,
    /// Over the timed steps: each step's wall time from its start to its final synchronize.
    pub ms_per_step: Spread,
    /// Global-batch tokens per median step.
    pub tokens_per_s: f64,
    pub tokens_per_s_per_rank: f64,
    pub mfu: Option<f64>,
    /// Rank 0's, measured at the end of the run.
    pub memory_bytes: MemoryBytes,
    /// Rank 0's, per-step means over the timed steps (see `train::phases`).
    pub phases_ms: PhasesMs,
    // ---- beyond the schema's required fields ----
    /// Micro-batches per rank per step.
    pub grad_accum_steps: usize,
    /// Peak bytes of GPU memory rank 0's backend held (null on the CPU).
    pub device_memory_peak: Option<usize>,
    pub first_loss: f32,
    pub final_loss: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// Median, min and max of `values` (NaN for none).
    pub fn of(values: &[f64]) -> Spread {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let median = match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
        };
        Spread {
            median,
            min: v.first().copied().unwrap_or(f64::NAN),
            max: v.last().copied().unwrap_or(f64::NAN),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MemoryBytes {
    /// Master weights + compute copy of the shard + peak of gathered parameters.
    pub params: usize,
    /// Gradient shards + peak of unsharded gradients.
    pub grads: usize,
    /// AdamW moments.
    pub optimizer: usize,
    /// Activations and backward scratch of one micro-batch.
    pub activations: usize,
    pub total: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PhasesMs {
    pub forward: f64,
    pub backward: f64,
    pub optimizer: f64,
    pub comm_exposed: f64,
    pub comm_overlapped: f64,
    // ---- beyond the schema's required fields ----
    /// All communication: exposed + overlapped.
    pub comm_total: f64,
    /// The step time no phase accounts for.
    pub other: f64,
}

const MIB: f64 = 1024.0 * 1024.0;

/// The header lines and the aligned table.
pub fn render_table(r: &BenchReport) -> String {
    let m = &r.model;
    let peak = match r.peak_flops {
        Some(p) => format!("{:.1} TFLOP/s ({})", p / 1e12, r.peak_flops_source),
        None => format!("unknown, MFU not shown ({})", r.peak_flops_source),
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "bench | device {} | card {} | backend {} | config {}",
        r.device, r.card, r.backend, r.config
    );
    let _ = writeln!(
        out,
        "model {} params (n_layer {}, n_head {}, d_model {}, vocab {}, seq_len {}), {} params / {} reduce | {}FLOP/token | peak {peak}",
        thousands(r.params as f64),
        m.n_layer,
        m.n_head,
        m.d_model,
        m.vocab_size,
        m.seq_len,
        r.param_dtype,
        r.reduce_dtype,
        si(r.flops_per_token),
    );
    let steps = r.rows.first().map_or(0, |row| row.steps);
    let _ = writeln!(
        out,
        "timed: {steps} step(s) per row after {} warm-up step(s) | ranks are threads sharing the \
         device | memory and phases are rank 0's; phases are per-step means on the device clock",
        r.warmup_steps
    );
    let gpu = r.rows.iter().any(|row| row.device_memory_peak.is_some());
    let mut head = vec![
        "world",
        "strategy",
        "ms/step median [min-max]",
        "tok/s",
        "tok/s/rank",
        "MFU",
        "params MiB",
        "grads MiB",
        "optim MiB",
        "act MiB",
    ];
    if gpu {
        head.push("device peak MiB");
    }
    head.extend([
        "fwd ms",
        "bwd ms",
        "opt ms",
        "comm exposed ms",
        "comm overlapped ms",
    ]);
    let mut cells: Vec<Vec<String>> = vec![head.iter().map(|h| h.to_string()).collect()];
    for row in &r.rows {
        let s = &row.ms_per_step;
        let mem = &row.memory_bytes;
        let p = &row.phases_ms;
        let mut line = vec![
            row.world_size.to_string(),
            row.strategy.clone(),
            format!("{} [{}-{}]", ms(s.median), ms(s.min), ms(s.max)),
            thousands(row.tokens_per_s),
            thousands(row.tokens_per_s_per_rank),
            row.mfu
                .map_or_else(|| "-".to_string(), |m| format!("{:.1}%", m * 100.0)),
            format!("{:.1}", mem.params as f64 / MIB),
            format!("{:.1}", mem.grads as f64 / MIB),
            format!("{:.1}", mem.optimizer as f64 / MIB),
            format!("{:.1}", mem.activations as f64 / MIB),
        ];
        if gpu {
            line.push(
                row.device_memory_peak
                    .map_or_else(|| "-".to_string(), |b| format!("{:.1}", b as f64 / MIB)),
            );
        }
        line.extend([
            ms(p.forward),
            ms(p.backward),
            ms(p.optimizer),
            ms(p.comm_exposed),
            ms(p.comm_overlapped),
        ]);
        cells.push(line);
    }
    out.push_str(&align(&cells, &[1]));
    out
}

/// Columns padded to their widest cell, two spaces apart; the columns in `left` left-aligned,
/// the others (numbers) right-aligned.
fn align(cells: &[Vec<String>], left: &[usize]) -> String {
    let cols = cells.iter().map(Vec::len).max().unwrap_or(0);
    let width: Vec<usize> = (0..cols)
        .map(|c| {
            cells
                .iter()
                .filter_map(|row| row.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in cells {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, s)| {
                if left.contains(&c) {
                    format!("{s:<w$}", w = width[c])
                } else {
                    format!("{s:>w$}", w = width[c])
                }
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Milliseconds with about three significant digits.
fn ms(x: f64) -> String {
    if !x.is_finite() {
        "-".to_string()
    } else if x < 10.0 {
        format!("{x:.2}")
    } else if x < 100.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.0}")
    }
}

/// `x` with an SI prefix (`5.43 M`, `860 G`).
fn si(x: f64) -> String {
    let (v, p) = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]
        .into_iter()
        .find(|(scale, _)| x.abs() >= *scale)
        .map_or((x, ""), |(scale, p)| (x / scale, p));
    format!("{v:.3} {p}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_and_numbers() {
        let s = Spread::of(&[3.0, 1.0, 2.0, 10.0]);
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 10.0));
        assert_eq!(Spread::of(&[4.0]).median, 4.0);
        assert!(Spread::of(&[]).median.is_nan());
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(si(5.43e6), "5.430 M");
        assert_eq!(ms(123.4), "123");
        assert_eq!(ms(1.234), "1.23");
    }

    #[test]
    fn columns_line_up() {
        let t = align(
            &[
                vec!["a".into(), "bb".into()],
                vec!["ccc".into(), "d".into()],
            ],
            &[0],
        );
        assert_eq!(t, "a    bb\nccc   d\n");
    }
}
