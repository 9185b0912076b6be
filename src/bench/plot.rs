//! The bench's plot, as a hand-written SVG (no plotting dependency): two panels side by side,
//! tokens/s against world size and peak memory per rank against world size, one line with
//! markers per strategy, axes with ticks and labels, and a legend.

use std::fmt::Write as _;

use super::report::BenchReport;
use crate::numbers::thousands;

const PANEL_W: f64 = 470.0;
const PANEL_H: f64 = 360.0;
const TITLE_H: f64 = 44.0;
const LEGEND_H: f64 = 40.0;
/// Plot-area margins inside a panel: left (tick labels and axis title), right, top, bottom.
const MARGIN: (f64, f64, f64, f64) = (78.0, 18.0, 34.0, 52.0);
/// Colour-blind-safe colours (Okabe-Ito); strategies also differ by marker shape.
const COLORS: [&str; 6] = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9",
];

/// One strategy's points: (world size, value).
struct Series {
    name: String,
    points: Vec<(f64, f64)>,
}

/// The SVG document for `r`.
pub fn render_svg(r: &BenchReport) -> String {
    let width = 2.0 * PANEL_W;
    let height = TITLE_H + PANEL_H + LEGEND_H;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let title = format!(
        "shardtrain bench: {} ({} params) on {} ({})",
        r.config,
        thousands(r.params as f64),
        r.card,
        r.device
    );
    let _ = writeln!(svg, "<title>{}</title>", esc(&title));
    let _ = writeln!(
        svg,
        r#"<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>"#
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="26" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        width / 2.0,
        esc(&title)
    );
    let throughput = series(r, |row| row.tokens_per_s);
    let memory = series(r, |row| row.memory_bytes.total as f64 / (1024.0 * 1024.0));
    panel(&mut svg, 0.0, "Throughput", "tokens/s", &throughput);
    panel(
        &mut svg,
        PANEL_W,
        "Peak memory per rank",
        "MiB per rank (params + grads + optimizer + activations)",
        &memory,
    );
    legend(&mut svg, &throughput, TITLE_H + PANEL_H);
    svg.push_str("</svg>\n");
    svg
}

/// The rows' values by strategy (in the order strategies first appear), sorted by world size.
fn series(r: &BenchReport, value: impl Fn(&super::BenchRow) -> f64) -> Vec<Series> {
    let mut out: Vec<Series> = Vec::new();
    for row in &r.rows {
        let point = (row.world_size as f64, value(row));
        match out.iter_mut().find(|s| s.name == row.strategy) {
            Some(s) => s.points.push(point),
            None => out.push(Series {
                name: row.strategy.clone(),
                points: vec![point],
            }),
        }
    }
    for s in &mut out {
        s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

/// One panel at horizontal offset `x0`: frame, grid, ticks, axis titles, a line per series.
fn panel(svg: &mut String, x0: f64, title: &str, y_label: &str, data: &[Series]) {
    let (ml, mr, mt, mb) = MARGIN;
    let (left, right) = (x0 + ml, x0 + PANEL_W - mr);
    let (top, bottom) = (TITLE_H + mt, TITLE_H + PANEL_H - mb);
    let mut worlds: Vec<f64> = data
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    worlds.sort_by(f64::total_cmp);
    worlds.dedup();
    let (wmin, wmax) = match (worlds.first(), worlds.last()) {
        (Some(&a), Some(&b)) if b > a => (a, b),
        (Some(&a), _) => (a - 1.0, a + 1.0),
        _ => (0.0, 1.0),
    };
    // A little room on both sides so end markers are not cut by the frame.
    let pad = 0.06 * (wmax - wmin);
    let x = |w: f64| left + (w - (wmin - pad)) / ((wmax + pad) - (wmin - pad)) * (right - left);
    let vmax = data
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    let (step, ticks) = nice_ticks(vmax);
    let ymax = step * ticks as f64;
    let y = |v: f64| bottom - v / ymax * (bottom - top);

    let _ = writeln!(svg, r#"<g class="panel">"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle" font-size="13" font-weight="bold">{}</text>"#,
        (left + right) / 2.0,
        top - 12.0,
        esc(title)
    );
    for i in 0..=ticks {
        let v = step * i as f64;
        let yy = y(v);
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" y1="{yy:.1}" x2="{right}" y2="{yy:.1}" stroke="#e4e4e4"/>"##
        );
        let _ = writeln!(
            svg,
            r##"<line x1="{}" y1="{yy:.1}" x2="{left}" y2="{yy:.1}" stroke="#333"/>"##,
            left - 5.0
        );
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            left - 8.0,
            yy + 4.0,
            tick_label(v, step, ymax)
        );
    }
    for &w in &worlds {
        let xx = x(w);
        let _ = writeln!(
            svg,
            r##"<line x1="{xx:.1}" y1="{bottom}" x2="{xx:.1}" y2="{}" stroke="#333"/>"##,
            bottom + 5.0
        );
        let _ = writeln!(
            svg,
            r#"<text x="{xx:.1}" y="{}" text-anchor="middle">{w}</text>"#,
            bottom + 18.0
        );
    }
    let _ = writeln!(
        svg,
        r##"<polyline points="{left},{top} {left},{bottom} {right},{bottom}" fill="none" stroke="#333"/>"##
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">world size (ranks)</text>"#,
        (left + right) / 2.0,
        bottom + 38.0
    );
    let (lx, ly) = (x0 + 18.0, (top + bottom) / 2.0);
    let _ = writeln!(
        svg,
        r#"<text x="{lx}" y="{ly}" text-anchor="middle" transform="rotate(-90 {lx} {ly})">{}</text>"#,
        esc(y_label)
    );
    for (i, s) in data.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<String> = s
            .points
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|&(w, v)| format!("{:.1},{:.1}", x(w), y(v)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline class="series" data-strategy="{}" points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            esc(&s.name),
            pts.join(" ")
        );
        for &(w, v) in s.points.iter().filter(|p| p.1.is_finite()) {
            marker(svg, i, x(w), y(v), color);
        }
    }
    let _ = writeln!(svg, "</g>");
}

/// The legend under the panels: a line and marker per strategy.
fn legend(svg: &mut String, data: &[Series], y0: f64) {
    let _ = writeln!(svg, r#"<g class="legend">"#);
    let item_w = 150.0;
    let start = (2.0 * PANEL_W - item_w * data.len() as f64) / 2.0;
    let yy = y0 + LEGEND_H / 2.0;
    for (i, s) in data.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let x = start + item_w * i as f64;
        let _ = writeln!(
            svg,
            r#"<line x1="{x}" y1="{yy}" x2="{}" y2="{yy}" stroke="{color}" stroke-width="2"/>"#,
            x + 28.0
        );
        marker(svg, i, x + 14.0, yy, color);
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}">{}</text>"#,
            x + 36.0,
            yy + 4.0,
            esc(&s.name)
        );
    }
    let _ = writeln!(svg, "</g>");
}

/// Marker `i` (circle, square, triangle, diamond, ...) centred at (x, y).
fn marker(svg: &mut String, i: usize, x: f64, y: f64, color: &str) {
    let r = 4.5;
    let _ = match i % 4 {
        0 => writeln!(
            svg,
            r#"<circle cx="{x:.1}" cy="{y:.1}" r="{r}" fill="{color}"/>"#
        ),
        1 => writeln!(
            svg,
            r#"<rect x="{:.1}" y="{:.1}" width="{}" height="{}" fill="{color}"/>"#,
            x - r,
            y - r,
            2.0 * r,
            2.0 * r
        ),
        2 => writeln!(
            svg,
            r#"<path d="M {x:.1} {:.1} L {:.1} {:.1} L {:.1} {:.1} Z" fill="{color}"/>"#,
            y - r - 1.0,
            x + r + 1.0,
            y + r,
            x - r - 1.0,
            y + r
        ),
        _ => writeln!(
            svg,
            r#"<path d="M {x:.1} {:.1} L {:.1} {y:.1} L {x:.1} {:.1} L {:.1} {y:.1} Z" fill="{color}"/>"#,
            y - r - 1.0,
            x + r + 1.0,
            y + r + 1.0,
            x - r - 1.0
        ),
    };
}

/// A round tick step (1, 2 or 5 × 10^k) and how many ticks cover `max` from 0 (about five).
fn nice_ticks(max: f64) -> (f64, usize) {
    if !(max.is_finite() && max > 0.0) {
        return (1.0, 1);
    }
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|f| f * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    (step, (max / step).ceil().max(1.0) as usize)
}

/// A tick value of an axis up to `top` with ticks `step` apart, compact: `12k`, `1.5M`, `0.25`.
fn tick_label(v: f64, step: f64, top: f64) -> String {
    if v == 0.0 {
        return "0".to_string();
    }
    let (scaled, suffix, unit) = if top >= 1e6 {
        (v / 1e6, "M", step / 1e6)
    } else if top >= 1e4 {
        (v / 1e3, "k", step / 1e3)
    } else {
        (v, "", step)
    };
    // Enough decimals to tell neighbouring ticks apart.
    let decimals = if unit >= 1.0 {
        0
    } else {
        (-unit.log10()).ceil() as usize
    };
    format!("{scaled:.decimals$}{suffix}")
}

/// Escapes text for SVG content and attribute values.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_data() {
        assert_eq!(nice_ticks(9_500.0), (2000.0, 5));
        assert_eq!(nice_ticks(33.5), (10.0, 4));
        assert_eq!(nice_ticks(0.0), (1.0, 1));
        assert_eq!(tick_label(12_000.0, 2000.0, 20_000.0), "12k");
        assert_eq!(tick_label(1_500_000.0, 500_000.0, 2e6), "1.5M");
        assert_eq!(tick_label(0.25, 0.05, 0.3), "0.25");
        assert_eq!(tick_label(30.0, 10.0, 40.0), "30");
        assert_eq!(tick_label(6000.0, 2000.0, 8000.0), "6000");
        assert_eq!(esc("a<b & \"c\""), "a&lt;b &amp; &quot;c&quot;");
    }
}
