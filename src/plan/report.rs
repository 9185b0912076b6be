//! How a plan reads: a header with every assumption (rate, links, overlap, headroom), then per GPU
//! count a memory table and a speed table with the largest model that fits; or the same as JSON.

use std::fmt::Write;

use super::hardware::GIB;
use super::rate::RateSource;
use super::{strategy_name, PlanReport, Section, StrategyPlan, StrategyRow};
use crate::backend::DType;
use crate::numbers::thousands;

/// The JSON document (`--json`).
pub fn to_json(report: &PlanReport) -> serde_json::Result<String> {
    serde_json::to_string_pretty(report)
}

/// The human-readable report.
pub fn render(report: &PlanReport) -> String {
    let mut out = header(report);
    for section in &report.sections {
        out.push('\n');
        out.push_str(&render_section(report, section));
    }
    out
}

fn header(r: &PlanReport) -> String {
    let w = &r.workload;
    let s = &w.shape;
    let hw = &r.hardware;
    let t = &hw.topology;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "shardtrain plan: {} | {} parameters ({} layers, d_model {}, {} heads, seq {}, vocab {}) | params {}, gradients reduced in {}, prefetch {}",
        r.config,
        human_count(r.params as f64),
        s.n_layer,
        s.d_model,
        s.n_head,
        w.seq_len,
        s.vocab_size,
        w.precision.param_dtype,
        w.precision.reduce_dtype,
        if w.prefetch { "on" } else { "off" },
    );
    let _ = writeln!(
        out,
        "  gpu       {}: {:.1} GiB; budget {:.1} GiB per GPU ({:.0}% kept for the CUDA context, cuBLAS workspaces, NCCL buffers, fragmentation)",
        hw.description,
        hw.memory_bytes / GIB,
        r.budget_bytes / GIB,
        hw.headroom * 100.0,
    );
    let _ = writeln!(
        out,
        "  compute   {:.3} GFLOP/token (6N + 12*L*d*T) at {}",
        r.flops_per_token / 1e9,
        r.rate.describe()
    );
    if let Some(note) = dtype_note(r) {
        let _ = writeln!(out, "            {note}");
    }
    let _ = writeln!(
        out,
        "  links     intra-node {} GB/s bus bandwidth, {} us/hop ({} GPUs per node); inter-node {} GB/s per GPU, {} us/hop; a ring that spans nodes runs at the inter-node rate",
        number(t.intra.bus_gb_per_s),
        number(t.intra.hop_latency_us),
        t.gpus_per_node,
        number(t.inter.bus_gb_per_s),
        number(t.inter.hop_latency_us),
    );
    let _ = writeln!(
        out,
        "  comm      ring all-gather / reduce-scatter: (n-1)/n * S / bw + (n-1) * hop; all-reduce: twice that; S = the full array"
    );
    for (i, line) in r.overlap.iter().enumerate() {
        let label = if i == 0 { "overlap" } else { "" };
        let _ = writeln!(out, "  {label:<9} {line}");
    }
    out
}

/// What the rate means for f32 parameters, or a rate measured on the CPU.
fn dtype_note(r: &PlanReport) -> Option<String> {
    let f32_params = r.workload.precision.param_dtype == DType::F32;
    match &r.rate.source {
        RateSource::Calibrated { device, .. } if device == "cpu" => Some(
            "note: the calibration was measured on the CPU backend: these are CPU rates, not a GPU's"
                .into(),
        ),
        RateSource::Calibrated { .. } if f32_params => Some(
            "note: params are f32: the calibrated rate holds for the dtype the bench measured (see its config)"
                .into(),
        ),
        RateSource::Assumed { .. } if f32_params => Some(
            "note: params are f32: the peak is the GPU's FP32 (non-tensor-core) peak, as the f32 path never uses TF32"
                .into(),
        ),
        _ => None,
    }
}

fn render_section(r: &PlanReport, s: &Section) -> String {
    let b = &s.batch;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "== {} GPU{} ({} node{}) | global batch {} = {} GPU{} x micro-batch {} x {} accumulation step{} | {} tokens/step ==",
        s.gpus,
        plural(s.gpus),
        s.nodes,
        plural(s.nodes),
        b.global_batch,
        s.gpus,
        plural(s.gpus),
        b.micro_batch,
        b.accum,
        plural(b.accum),
        thousands(b.global_batch as f64 * r.workload.seq_len as f64),
    );
    if b.adjusted() {
        let _ = writeln!(
            out,
            "NOTE: the config's global batch {} is not a multiple of {} GPUs x micro-batch {} = {}: planned with the smallest accumulation that covers it ({}), a global batch of {}",
            b.requested_global_batch,
            s.gpus,
            b.micro_batch,
            s.gpus * b.micro_batch,
            b.accum,
            b.global_batch,
        );
    }
    out.push_str(&memory_table(r, s));
    out.push_str(&speed_table(s));
    for row in &s.rows {
        if let StrategyRow::NotApplicable { strategy, reason } = row {
            let _ = writeln!(
                out,
                "{}: not applicable: {reason}",
                strategy_name(*strategy)
            );
        }
    }
    let _ = writeln!(
        out,
        "group: ranks sharing each unit (x replica groups). vs 1 GPU: tokens/s per GPU over one GPU's (the scaling efficiency). max layers/params: the deepest model of this width that fits."
    );
    let _ = writeln!(
        out,
        "* what per-layer activation recomputation would give: only each layer's input kept, plus one layer's working set. The trainer does not recompute yet; `total` and `fits` are what it needs today."
    );
    out
}

fn planned(s: &Section) -> impl Iterator<Item = &StrategyPlan> {
    s.rows.iter().filter_map(|r| match r {
        StrategyRow::Planned(p) => Some(p),
        StrategyRow::NotApplicable { .. } => None,
    })
}

fn memory_table(r: &PlanReport, s: &Section) -> String {
    let budget = format!("fits {:.1}", r.budget_bytes / GIB);
    let header = [
        "GiB per GPU",
        "group",
        "params",
        "gathered",
        "grads",
        "optimizer",
        "activations",
        "total",
        budget.as_str(),
        "act. recompute*",
        "total*",
        "fits*",
    ];
    let rows: Vec<Vec<String>> = planned(s)
        .map(|p| {
            let m = &p.memory;
            vec![
                strategy_name(p.strategy).to_string(),
                group_label(p),
                gib(m.params()),
                gib(m.gathered_params_peak),
                gib(m.grads()),
                gib(m.optimizer),
                gib(m.activations),
                gib(p.total_bytes),
                yes_no(p.fits),
                gib(m.activations_recompute),
                gib(p.total_with_recompute_bytes),
                yes_no(p.fits_with_recompute),
            ]
        })
        .collect();
    table(&header, &rows)
}

fn speed_table(s: &Section) -> String {
    let header = [
        "per step",
        "compute ms",
        "comm ms",
        "exposed ms",
        "step ms",
        "tokens/s",
        "tokens/s/GPU",
        "vs 1 GPU",
        "max layers",
        "max params",
        "max layers*",
        "max params*",
    ];
    let rows: Vec<Vec<String>> = planned(s)
        .map(|p| {
            let t = &p.time;
            vec![
                strategy_name(p.strategy).to_string(),
                ms(t.compute_s),
                ms(t.comm_s),
                ms(t.comm_exposed_s),
                ms(t.step_s),
                thousands(p.tokens_per_s),
                thousands(p.tokens_per_s_per_gpu),
                format!("{:.1}%", 100.0 * p.scaling_efficiency),
                layers(p.largest.n_layer, p.largest.at_search_limit),
                human_count(p.largest.params as f64),
                layers(
                    p.largest_with_recompute.n_layer,
                    p.largest_with_recompute.at_search_limit,
                ),
                human_count(p.largest_with_recompute.params as f64),
            ]
        })
        .collect();
    table(&header, &rows)
}

/// `shard group x replicas` for hybrid, the group alone otherwise.
fn group_label(p: &StrategyPlan) -> String {
    if p.replicas > 1 && p.shard_group > 1 {
        format!("{}x{}", p.shard_group, p.replicas)
    } else {
        p.shard_group.to_string()
    }
}

/// Columns aligned: the first to the left, the others to the right.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == 0 {
                let _ = write!(text, "{cell:<w$}");
            } else {
                let _ = write!(text, "  {cell:>w$}");
            }
        }
        text.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

fn gib(bytes: usize) -> String {
    format!("{:.1}", bytes as f64 / GIB)
}

fn ms(seconds: f64) -> String {
    format!("{:.1}", seconds * 1e3)
}

/// Whole numbers without decimals, others with one: 370, 12.5.
fn number(x: f64) -> String {
    if x.fract() == 0.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "NO" }.to_string()
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn layers(n: usize, at_limit: bool) -> String {
    match (n, at_limit) {
        (0, _) => "none".into(),
        (n, true) => format!(">={n}"),
        (n, false) => n.to_string(),
    }
}

/// A count with a unit: 124.5M, 6.66B.
pub fn human_count(x: f64) -> String {
    match x {
        x if x >= 1e12 => format!("{:.2}T", x / 1e12),
        x if x >= 1e9 => format!("{:.2}B", x / 1e9),
        x if x >= 1e6 => format!("{:.1}M", x / 1e6),
        x if x >= 1e3 => format!("{:.1}K", x / 1e3),
        x => format!("{x:.0}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(human_count(124_475_904.0), "124.5M");
        assert_eq!(human_count(6.66e9), "6.66B");
        assert_eq!(gib(3 << 29), "1.5");
    }

    #[test]
    fn tables_align_columns() {
        let t = table(
            &["name", "n"],
            &[
                vec!["a".into(), "1".into()],
                vec!["long".into(), "100".into()],
            ],
        );
        assert_eq!(t, "name    n\na       1\nlong  100\n");
    }
}
