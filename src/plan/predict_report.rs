//! `shardtrain bench --predict`'s output: the predicted per-op table of each kernel profile with
//! its totals (step time, tokens/s, MFU, the ratio to torch.compile's reference step), as text or
//! JSON; and [`join`], which sets a measured per-op table (the CUDA profiler's, from a run's
//! summary.json) beside the prediction, op name by op name.

use serde::Serialize;

use super::hardware::Hardware;
use super::roofline::{Bound, OpRow, Prediction};
use super::Workload;
use crate::backend::{DType, OpTime};

pub const PREDICT_SCHEMA: &str = "shardtrain.predict/1";

/// PyTorch 2.11 + torch.compile on one H200, GPT-2 124M at micro-batch 16 x 1024, bf16, fused
/// AdamW: 32.6 ms per step (one micro-batch and an optimizer step), /work/shared/FACTS.md.
pub const TORCH_COMPILE_H200_MS: f64 = 32.6;
pub const TORCH_COMPILE_H200_TOKENS_PER_S: f64 = 502_500.0;

/// The reference the prediction is set against, when the job is the one it measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TorchReference {
    pub system: &'static str,
    pub ms_per_step: f64,
    pub tokens_per_s: f64,
    /// Predicted time for the reference's tokens over its time (> 1: slower than torch.compile).
    pub predicted_over_reference: f64,
}

/// GPT-2 124M at micro-batch 16 x 1024 in bf16, as FACTS.md measured torch.compile on.
fn is_reference_job(w: &Workload) -> bool {
    let s = &w.shape;
    (
        s.n_layer,
        s.n_head,
        s.d_model,
        s.vocab_size,
        w.seq_len,
        w.micro_batch,
    ) == (12, 12, 768, 50304, 1024, 16)
        && w.precision.param_dtype == DType::Bf16
}

pub fn torch_reference(w: &Workload, p: &Prediction) -> Option<TorchReference> {
    is_reference_job(w).then(|| TorchReference {
        system: "PyTorch 2.11 + torch.compile, fused AdamW, one H200 (FACTS.md)",
        ms_per_step: TORCH_COMPILE_H200_MS,
        tokens_per_s: TORCH_COMPILE_H200_TOKENS_PER_S,
        predicted_over_reference: TORCH_COMPILE_H200_TOKENS_PER_S / p.tokens_per_s,
    })
}

/// One op of the predicted and measured tables, per optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JoinedRow {
    pub op: String,
    pub predicted_calls: Option<u64>,
    pub measured_calls: Option<f64>,
    pub predicted_ms: Option<f64>,
    pub measured_ms: Option<f64>,
    /// measured / predicted time.
    pub ratio: Option<f64>,
}

/// The predicted rows beside `measured` totals over `steps` op-timed steps, by op name: the
/// prediction's order, then ops only the measurement has.
pub fn join(predicted: &[OpRow], measured: &[OpTime], steps: u64) -> Vec<JoinedRow> {
    let per_step = steps.max(1) as f64;
    let find = |op: &str| measured.iter().find(|m| m.op == op);
    let mut rows: Vec<JoinedRow> = predicted
        .iter()
        .map(|p| {
            let m = find(p.op);
            let measured_ms = m.map(|m| m.total_ms / per_step);
            JoinedRow {
                op: p.op.to_string(),
                predicted_calls: Some(p.calls),
                measured_calls: m.map(|m| m.calls as f64 / per_step),
                predicted_ms: Some(p.predicted_ms),
                measured_ms,
                ratio: measured_ms.map(|ms| ms / p.predicted_ms),
            }
        })
        .collect();
    for m in measured {
        if !predicted.iter().any(|p| p.op == m.op) {
            rows.push(JoinedRow {
                op: m.op.clone(),
                predicted_calls: None,
                measured_calls: Some(m.calls as f64 / per_step),
                predicted_ms: None,
                measured_ms: Some(m.total_ms / per_step),
                ratio: None,
            });
        }
    }
    rows
}

/// Everything `--predict --json` prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PredictReport {
    pub schema: &'static str,
    pub note: &'static str,
    pub config: String,
    pub workload: Workload,
    pub world_size: usize,
    pub strategy: String,
    pub hardware: Hardware,
    pub predictions: Vec<Prediction>,
    pub torch_reference: Option<TorchReference>,
    /// The measured table beside the first prediction, when one was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measured: Option<Measured>,
}

/// A measured per-op table and where it comes from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Measured {
    pub source: String,
    pub steps: u64,
    pub rows: Vec<JoinedRow>,
}

pub const NOTE: &str =
    "a PREDICTION from datasheet roofs and assumed efficiencies: no GPU has run these kernels yet";

fn bound_name(b: Bound) -> &'static str {
    match b {
        Bound::Compute => "compute",
        Bound::Memory => "memory",
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_string(), |x| format!("{x:.digits$}"))
}

/// One profile's table and totals.
fn render_prediction(r: &PredictReport, p: &Prediction) -> String {
    let k = &p.profile;
    let hw = &r.hardware;
    let mut out = format!(
        "kernels: {} ({})\nroofs: tensor {:.0} TFLOP/s (matmul x{:.2}, attention x{:.2} of {}), CUDA-core f32 {:.0} TFLOP/s, HBM {:.0} GB/s (memory-bound x{:.2}), launch gap {:.1} us per kernel\n",
        k.name,
        k.description,
        hw.peak_flops / 1e12,
        k.matmul_efficiency,
        k.attention.efficiency,
        match k.attention.units {
            super::roofline::ComputeUnits::TensorCore => "tensor",
            super::roofline::ComputeUnits::CudaCoreF32 => "CUDA-core f32",
        },
        hw.cuda_core_f32_flops.unwrap_or(0.0) / 1e12,
        hw.hbm_bytes_per_s.unwrap_or(0.0) / 1e9,
        k.memory_efficiency,
        k.launch_gap_us,
    );
    out.push_str(&format!(
        "{:<20} {:>7} {:>8} {:>10} {:>9} {:>8} {:>10} {:>5} {:>12} {:>6}\n",
        "op", "calls", "kernels", "GFLOP", "GB", "bound", "peak ms", "eff", "predicted ms", "share"
    ));
    for row in &p.rows {
        out.push_str(&format!(
            "{:<20} {:>7} {:>8} {:>10.1} {:>9.3} {:>8} {:>10.3} {:>5.2} {:>12.3} {:>5.1}%\n",
            row.op,
            row.calls,
            row.kernel_launches,
            row.flops / 1e9,
            row.bytes / 1e9,
            bound_name(row.bound),
            row.at_peak_ms,
            row.efficiency,
            row.predicted_ms,
            100.0 * row.predicted_ms / p.compute_ms.max(f64::MIN_POSITIVE),
        ));
    }
    let sum = |f: fn(&OpRow) -> f64| p.rows.iter().map(f).sum::<f64>();
    out.push_str(&format!(
        "{:<20} {:>7} {:>8} {:>10.1} {:>9.3} {:>8} {:>10.3} {:>5} {:>12.3}\n",
        "total",
        p.rows.iter().map(|r| r.calls).sum::<u64>(),
        p.rows.iter().map(|r| r.kernel_launches).sum::<u64>(),
        sum(|r| r.flops) / 1e9,
        sum(|r| r.bytes) / 1e9,
        "",
        sum(|r| r.at_peak_ms),
        "",
        p.compute_ms,
    ));
    out.push_str(&format!(
        "step: {:.2} ms predicted (compute {:.2} + exposed communication {:.2}) for {} tokens ({} micro-batch{} per rank) | {:.0} tokens/s | MFU {:.3} ({:.3} GFLOP/token = 6N + 12·L·d·T, of {:.0} TFLOP/s)\n",
        p.step_ms,
        p.compute_ms,
        p.comm_exposed_ms,
        p.tokens_per_step,
        p.accum,
        if p.accum == 1 { "" } else { "es" },
        p.tokens_per_s,
        p.mfu,
        p.flops_per_token / 1e9,
        hw.peak_flops / 1e12,
    ));
    if let Some(t) = torch_reference(&r.workload, p) {
        out.push_str(&format!(
            "vs {}: {:.1} ms per 16 x 1024 step, {:.0} tokens/s; predicted/reference time {:.2}x\n",
            t.system, t.ms_per_step, t.tokens_per_s, t.predicted_over_reference
        ));
    }
    out
}

/// The measured table beside the prediction.
pub fn render_joined(m: &Measured) -> String {
    let mut out = format!(
        "measured ({}, per step over {} op-timed steps) beside predicted:\n{:<20} {:>10} {:>10} {:>12} {:>12} {:>9}\n",
        m.source, m.steps, "op", "calls pred", "calls meas", "predicted ms", "measured ms", "meas/pred"
    );
    for row in &m.rows {
        out.push_str(&format!(
            "{:<20} {:>10} {:>10} {:>12} {:>12} {:>9}\n",
            row.op,
            row.predicted_calls
                .map_or_else(|| "-".to_string(), |c| c.to_string()),
            opt(row.measured_calls, 1),
            opt(row.predicted_ms, 3),
            opt(row.measured_ms, 3),
            opt(row.ratio, 2),
        ));
    }
    out
}

/// The text report: a header, each profile's table, and the measured table if any.
pub fn render(r: &PredictReport) -> String {
    let w = &r.workload;
    let s = &w.shape;
    let mut out = format!(
        "PREDICTED per-op step ({}) for {}: L{} d{} h{} V{}, micro-batch {} x {}, {} params / {} reduce, world {} {}, on {}\n",
        NOTE,
        r.config,
        s.n_layer,
        s.d_model,
        s.n_head,
        s.vocab_size,
        w.micro_batch,
        w.seq_len,
        w.precision.param_dtype,
        w.precision.reduce_dtype,
        r.world_size,
        r.strategy,
        r.hardware.description,
    );
    out.push_str("calls and times are per optimizer step on rank 0's compute stream, under the CUDA profiler's op names (collectives run on the comm lane: only their exposed time is added)\n");
    for p in &r.predictions {
        out.push('\n');
        out.push_str(&render_prediction(r, p));
    }
    if let Some(m) = &r.measured {
        out.push('\n');
        out.push_str(&render_joined(m));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(op: &'static str, calls: u64, ms: f64) -> OpRow {
        OpRow {
            op,
            calls,
            kernel_launches: calls,
            flops: 0.0,
            model_flops: 0.0,
            bytes: 0.0,
            bound: Bound::Memory,
            at_peak_ms: ms,
            efficiency: 0.8,
            predicted_ms: ms,
        }
    }

    #[test]
    fn join_lines_up_by_op_name_and_divides_by_the_steps() {
        let predicted = [
            row("matmul", 10, 2.0),
            row("adamw", 4, 0.5),
            row("fill", 1, 0.1),
        ];
        // A synthetic profiler table over 2 steps: largest first, as take_op_times returns it,
        // with an op the prediction lacks and one it has missing.
        let measured = [
            OpTime {
                op: "matmul".into(),
                calls: 20,
                total_ms: 6.0,
            },
            OpTime {
                op: "copy".into(),
                calls: 2,
                total_ms: 0.4,
            },
            OpTime {
                op: "adamw".into(),
                calls: 8,
                total_ms: 0.5,
            },
        ];
        let rows = join(&predicted, &measured, 2);
        let ops: Vec<&str> = rows.iter().map(|r| r.op.as_str()).collect();
        assert_eq!(ops, ["matmul", "adamw", "fill", "copy"]);
        assert_eq!(rows[0].measured_calls, Some(10.0));
        assert_eq!(rows[0].measured_ms, Some(3.0));
        assert_eq!(rows[0].ratio, Some(1.5));
        assert_eq!(rows[1].ratio, Some(0.5));
        assert_eq!((rows[2].measured_ms, rows[2].ratio), (None, None));
        assert_eq!(
            (rows[3].predicted_calls, rows[3].measured_ms),
            (None, Some(0.2))
        );
        let text = render_joined(&Measured {
            source: "s.json".into(),
            steps: 2,
            rows,
        });
        assert!(text.contains("matmul") && text.contains("1.50"), "{text}");
    }
}
