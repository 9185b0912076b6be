//! `shardtrain bench` as a user meets it: the table, the JSON report (every schema key with its
//! type: other tools read it), the SVG plot, bad input refused with exit code 2 before anything
//! runs, and `bench comm` still there. Also: timing phases changes no loss, and the phases fit
//! inside the step. Everything on a very small model, so a debug build stays fast.

use std::path::Path;
use std::process::{Command, Output};

mod common;

use common::{shardtrain, small_config, text};
use serde_json::Value;
use shardtrain::config::ShardStrategy;
use shardtrain::train::device::Device;
use shardtrain::train::{train_instrumented, train_on, Faults, Instruments, Start};

/// configs/tiny.yaml (added by `bench_in`) made very small; global batch 8 in micro-batches of 2 suits worlds 1, 2, 4.
#[rustfmt::skip]
const SMALL: &[&str] = &[
    "--set", "model.n_layer=1",
    "--set", "model.d_model=32",
    "--set", "model.n_head=2",
    "--set", "model.seq_len=16",
    "--set", "train.micro_batch_size=2",
    "--set", "train.global_batch_size=8",
    "--set", "device=cpu",
];

/// `bench` with the small model, worlds 1 and 2, full_shard and no_shard, plus `extra`.
fn bench(extra: &[&str]) -> Output {
    let tmp = tempfile::tempdir().unwrap();
    bench_in(tmp.path(), extra)
}

/// [`bench`] run in the directory `dir`, with `dir/tmp` as the system's temporary directory.
fn bench_in(dir: &Path, extra: &[&str]) -> Output {
    let tmp = dir.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let mut args = vec![
        "bench",
        "--world",
        "1,2",
        "--strategy",
        "full_shard,no_shard",
        "--steps",
        "2",
        "--warmup",
        "1",
    ];
    args.extend_from_slice(SMALL);
    args.extend_from_slice(extra);
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/tiny.yaml");
    args.extend_from_slice(&["--config", config]);
    let out = Command::new(env!("CARGO_BIN_EXE_shardtrain"))
        .args(&args)
        .current_dir(dir)
        .env("TMPDIR", &tmp)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the shardtrain binary runs");
    assert!(
        out.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

#[test]
fn the_table_has_a_header_and_a_row_per_world_and_strategy() {
    let dir = tempfile::tempdir().unwrap();
    let out = bench_in(dir.path(), &[]);
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("bench | device cpu | card "), "{stdout}");
    assert!(stdout.contains("configs/tiny.yaml"), "{stdout}");
    // Nothing left behind: no runs/ in the working directory, the scratch runs removed.
    let left = |d: &Path| std::fs::read_dir(d).unwrap().count();
    assert_eq!(left(dir.path()), 1, "only tmp/ should exist");
    assert_eq!(
        left(&dir.path().join("tmp")),
        0,
        "the scratch runs were removed"
    );
    let head = stdout
        .lines()
        .find(|l| l.starts_with("world"))
        .unwrap_or_else(|| panic!("no column header:\n{stdout}"));
    for col in [
        "ms/step median [min-max]",
        "tok/s/rank",
        "MFU",
        "optim MiB",
        "fwd ms",
    ] {
        assert!(head.contains(col), "{head}");
    }
    assert!(head.contains("comm exposed ms") && head.contains("comm overlapped ms"));
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .map(|l| l.split_whitespace().collect())
        .collect();
    let keys: Vec<(&str, &str)> = rows.iter().map(|r| (r[0], r[1])).collect();
    assert_eq!(
        keys,
        [
            ("1", "full_shard"),
            ("1", "no_shard"),
            ("2", "full_shard"),
            ("2", "no_shard")
        ],
        "{stdout}"
    );
    // No peak for a CPU unless given: MFU is "-".
    assert!(rows.iter().all(|r| r.contains(&"-")), "{stdout}");
    // Progress went to stderr, one line per row.
    assert_eq!(text(&out.stderr).matches("bench: row ").count(), 4);
}

fn expect_number(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("`{key}` is not a number in {v}"))
}

fn expect_int(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("`{key}` is not a non-negative integer in {v}"))
}

/// The schema-stability test: every key `plan --calibrate` and other readers rely on, with its
/// type. Renaming or removing one breaks them; adding keys does not.
#[test]
fn json_has_every_schema_key_with_its_type() {
    let out = bench(&["--json", "--peak-tflops", "0.5"]);
    let doc: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)));
    assert_eq!(doc["schema"], "shardtrain.bench/1");
    assert_eq!(doc["device"], "cpu");
    assert!(doc["card"].as_str().is_some_and(|c| !c.is_empty()));
    assert!(doc["config"]
        .as_str()
        .is_some_and(|c| c.ends_with("configs/tiny.yaml")));
    let params = expect_int(&doc, "params");
    assert!(params > 0);
    let fpt = expect_number(&doc, "flops_per_token");
    // 6N + 12·L·d·T with L=1, d=32, T=16.
    assert_eq!(fpt, 6.0 * params as f64 + 12.0 * 32.0 * 16.0);
    assert_eq!(expect_number(&doc, "peak_flops"), 0.5e12);
    let rows = doc["rows"].as_array().expect("rows is an array");
    assert_eq!(rows.len(), 4);
    for row in rows {
        let world = expect_int(row, "world_size");
        assert!(row["strategy"].as_str().is_some());
        assert_eq!(expect_int(row, "micro_batch_size"), 2);
        assert_eq!(expect_int(row, "global_batch_size"), 8);
        assert_eq!(expect_int(row, "steps"), 2);
        let spread = &row["ms_per_step"];
        let (median, min, max) = (
            expect_number(spread, "median"),
            expect_number(spread, "min"),
            expect_number(spread, "max"),
        );
        assert!(0.0 < min && min <= median && median <= max, "{spread}");
        let tps = expect_number(row, "tokens_per_s");
        assert!((tps - 8.0 * 16.0 / (median / 1e3)).abs() < 1e-6 * tps);
        let per_rank = expect_number(row, "tokens_per_s_per_rank");
        assert!((per_rank * world as f64 - tps).abs() < 1e-6 * tps);
        let mfu = expect_number(row, "mfu");
        assert!((mfu - tps * fpt / 0.5e12).abs() < 1e-9, "{row}");
        let mem = &row["memory_bytes"];
        let parts: u64 = ["params", "grads", "optimizer", "activations"]
            .iter()
            .map(|k| expect_int(mem, k))
            .sum();
        assert_eq!(expect_int(mem, "total"), parts);
        let ph = &row["phases_ms"];
        let phases: Vec<f64> = [
            "forward",
            "backward",
            "optimizer",
            "comm_exposed",
            "comm_overlapped",
        ]
        .iter()
        .map(|k| expect_number(ph, k))
        .collect();
        assert!(phases.iter().all(|&p| p >= 0.0), "{ph}");
        // Forward, backward and optimizer are parts of the step (means vs the slowest step).
        assert!(
            phases[0] + phases[1] + phases[2] <= max * 1.05 + 0.5,
            "{row}"
        );
        assert!(phases[0] > 0.0 && phases[1] > 0.0, "{ph}");
        // On the CPU collectives run on the compute thread: nothing overlaps.
        assert_eq!(phases[4], 0.0, "{ph}");
    }
    // The memory story: full_shard's optimizer state per rank halves at world 2, no_shard's
    // stays the same.
    let optim = |world: u64, s: &str| {
        rows.iter()
            .find(|r| r["world_size"] == world && r["strategy"] == s)
            .map(|r| expect_int(&r["memory_bytes"], "optimizer"))
            .unwrap()
    };
    assert!(optim(2, "full_shard") * 2 <= optim(1, "full_shard") + 64);
    assert_eq!(optim(2, "no_shard"), optim(1, "no_shard"));
    // With one rank there is only the loss's all-reduce to expose; with two, the gathers too.
    let exposed = |world: u64| {
        rows.iter()
            .find(|r| r["world_size"] == world && r["strategy"] == "full_shard")
            .map(|r| expect_number(&r["phases_ms"], "comm_exposed"))
            .unwrap()
    };
    assert!(exposed(2) > exposed(1), "{}", text(&out.stdout));
}

/// Whether `svg` is well-formed as far as tags go: every element closed in order.
fn tags_balance(svg: &str) -> bool {
    let mut stack: Vec<String> = Vec::new();
    let mut rest = svg;
    while let Some(start) = rest.find('<') {
        let Some(len) = rest[start..].find('>') else {
            return false;
        };
        let tag = &rest[start + 1..start + len];
        rest = &rest[start + len + 1..];
        if tag.starts_with('?') || tag.starts_with('!') {
            continue;
        }
        if let Some(name) = tag.strip_prefix('/') {
            if stack.pop().as_deref() != Some(name.trim()) {
                return false;
            }
        } else if !tag.ends_with('/') {
            let name = tag.split_whitespace().next().unwrap_or("");
            stack.push(name.to_string());
        }
    }
    stack.is_empty()
}

#[test]
fn plot_writes_an_svg_with_a_line_per_strategy_in_each_panel() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.svg");
    let out = bench(&["--plot", path.to_str().unwrap()]);
    assert!(text(&out.stdout).contains("full_shard"));
    let svg = std::fs::read_to_string(&path).unwrap();
    assert!(
        svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""),
        "{svg}"
    );
    assert!(svg.trim_end().ends_with("</svg>"));
    assert!(tags_balance(&svg), "{svg}");
    for s in ["full_shard", "no_shard"] {
        let lines = svg
            .matches(&format!("<polyline class=\"series\" data-strategy=\"{s}\""))
            .count();
        assert_eq!(lines, 2, "one line per panel for {s}");
    }
    for label in ["world size (ranks)", "tokens/s", "MiB per rank"] {
        assert!(svg.contains(label), "{label}");
    }
}

/// Bad input: exit code 2, a message naming the flag, and no row started.
fn refused(args: &[&str], says: &[&str]) {
    let mut all = vec!["bench"];
    all.extend_from_slice(args);
    let out = shardtrain(&all);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    for s in says {
        assert!(stderr.contains(s), "{args:?}: expected {s:?} in {stderr}");
    }
    assert!(
        !stderr.contains("bench: row"),
        "{args:?} started a row: {stderr}"
    );
}

#[test]
fn bad_input_is_refused_before_any_run_with_exit_code_2() {
    refused(&["--world", "1,0"], &["--world", "at least 1"]);
    refused(
        &["--strategy", "full_shard,zero4"],
        &["--strategy", "zero4"],
    );
    // tiny.yaml: 32 sequences in micro-batches of 8; world 3 needs a multiple of 24.
    refused(
        &["--config", "configs/tiny.yaml", "--world", "1,2,3"],
        &["--world 3", "train.global_batch_size=48"],
    );
    refused(
        &["--config", "configs/no-such.yaml"],
        &["configs/no-such.yaml"],
    );
    refused(&["--steps", "0"], &["--steps"]);
    refused(&["--peak-tflops", "0"], &["--peak-tflops"]);
    refused(
        &["--plot", "/no/such/dir/x.svg"],
        &["--plot", "/no/such/dir"],
    );
    refused(&["--set", "model.n_layers=2"], &["model.n_layers"]);
}

#[test]
fn bench_comm_still_runs() {
    let out = shardtrain(&[
        "bench",
        "comm",
        "--world",
        "2",
        "--device",
        "cpu",
        "--min-bytes",
        "1K",
        "--max-bytes",
        "4K",
        "--iters",
        "1",
        "--warmup",
        "0",
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("all_gather") && stdout.contains("busbw"),
        "{stdout}"
    );
}

#[test]
fn timing_phases_changes_no_loss() {
    for strategy in [ShardStrategy::FullShard, ShardStrategy::NoShard] {
        let cfg = small_config(2, strategy, 3);
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let plain = train_on(
            &Device::Cpu,
            &cfg,
            a.path(),
            &Start::Scratch,
            &Faults::default(),
        )
        .unwrap();
        let timed = train_instrumented(
            &Device::Cpu,
            &cfg,
            b.path(),
            &Start::Scratch,
            &Faults::default(),
            Instruments {
                phase_times: true,
                quiet: true,
            },
        )
        .unwrap();
        let bits = |s: &shardtrain::train::TrainSummary| -> Vec<u32> {
            s.losses.iter().map(|l| l.to_bits()).collect()
        };
        assert_eq!(bits(&plain), bits(&timed));
        assert!(plain.step_phases.is_empty());
        assert_eq!(timed.step_phases.len(), 3);
        for p in &timed.step_phases {
            let parts = p.forward_ms + p.backward_ms + p.optimizer_ms + p.comm_exposed_ms;
            assert!(parts <= p.step_ms * 1.001 + 0.05, "{p:?}");
            assert!(p.comm_exposed_ms > 0.0, "two ranks communicate: {p:?}");
        }
        // summary.json is unchanged when phases are not timed.
        let json = std::fs::read_to_string(a.path().join("summary.json")).unwrap();
        assert!(!json.contains("step_phases"));
    }
}
