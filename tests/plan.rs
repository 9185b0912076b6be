//! `shardtrain plan`: its memory prediction against what real CPU training runs measure (every
//! world size 1..4, strategy and dtype policy), the shipped configs it plans for, and the command
//! line: tables, JSON, calibration from a bench file, and bad input exiting 2 naming the flag or file.

use std::path::{Path, PathBuf};
use std::process::Output;

mod common;

use common::{small_config, text, STRATEGIES};
use shardtrain::backend::DType;
use shardtrain::config::{Config, DeviceKind, ShardStrategy};
use shardtrain::plan::memory::{rank_memory, RankMemory};
use shardtrain::plan::Workload;
use shardtrain::shard::memory::MemoryUse;
use shardtrain::shard::ShardPlan;
use shardtrain::train::train;

// ------------------------------------------------------------ predicted vs measured memory

/// The small job with 4 blocks, so "root + 2 blocks gathered" differs from "every unit gathered".
fn job(world: usize, strategy: ShardStrategy, param: DType, reduce: DType) -> Config {
    let mut cfg = small_config(world, strategy, 1);
    cfg.model.n_layer = 4;
    cfg.device = DeviceKind::Cpu;
    cfg.checkpoint.save_final = false;
    cfg.parallel.mixed_precision.param_dtype = param;
    cfg.parallel.mixed_precision.reduce_dtype = reduce;
    cfg.validate().expect("the test job is valid");
    cfg
}

fn measured(cfg: &Config) -> MemoryUse {
    let dir = tempfile::tempdir().expect("tempdir");
    train(cfg, dir.path())
        .unwrap_or_else(|e| panic!("{e:#}"))
        .memory
}

fn predicted(cfg: &Config) -> RankMemory {
    let accum = cfg.train.grad_accum_steps(cfg.parallel.world_size);
    rank_memory(
        &ShardPlan::new(&cfg.parallel),
        &Workload::from_config(cfg),
        accum,
    )
}

/// Each major kind and the total, predicted against measured: within 10% (zero must be zero).
fn mismatches(what: &str, p: &RankMemory, m: &MemoryUse) -> Vec<String> {
    let pairs = [
        ("params", p.params(), m.master_params + m.param_shards),
        ("gathered", p.gathered_params_peak, m.gathered_params_peak),
        ("grads", p.grads(), m.grads),
        ("optimizer", p.optimizer, m.optimizer),
        ("activations", p.activations, m.activations),
        ("total", p.total(), m.total()),
    ];
    pairs
        .iter()
        .filter(|(_, pred, meas)| (*pred as f64 - *meas as f64).abs() > 0.10 * *meas as f64)
        .map(|(kind, pred, meas)| format!("{what}: {kind} predicted {pred} B, measured {meas} B"))
        .collect()
}

#[test]
fn predicted_memory_is_within_10_percent_of_measured_runs() {
    let policies = [
        (DType::F32, DType::F32),
        (DType::Bf16, DType::F32),
        (DType::Bf16, DType::Bf16),
    ];
    let mut problems = Vec::new();
    let mut exact = 0;
    let mut runs = 0;
    for (param, reduce) in policies {
        for world in 1..=4 {
            for strategy in STRATEGIES {
                let cfg = job(world, strategy, param, reduce);
                let (p, m) = (predicted(&cfg), measured(&cfg));
                let what = format!(
                    "world {world} {strategy:?} (group {}) params {param} reduce {reduce}",
                    ShardPlan::new(&cfg.parallel).group_size
                );
                problems.extend(mismatches(&what, &p, &m));
                exact += usize::from(p.total() == m.total());
                runs += 1;
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The model follows the engine's allocations, so it should be exact, not merely close.
    assert_eq!(
        exact, runs,
        "totals exactly equal in {exact} of {runs} runs"
    );
}

#[test]
fn predicted_memory_without_prefetch_matches_too() {
    for strategy in [ShardStrategy::FullShard, ShardStrategy::HybridShard] {
        let mut cfg = job(4, strategy, DType::Bf16, DType::F32);
        let with_prefetch = measured(&cfg);
        cfg.parallel.prefetch = false;
        let (p, m) = (predicted(&cfg), measured(&cfg));
        let problems = mismatches(&format!("{strategy:?} without prefetch"), &p, &m);
        assert!(problems.is_empty(), "{}", problems.join("\n"));
        assert_eq!(p.gathered_params_peak, m.gathered_params_peak);
        // One block fewer alive: the case tells the two schedules apart.
        assert!(m.gathered_params_peak < with_prefetch.gathered_params_peak);
    }
}

// ------------------------------------------------------------ shipped configs

fn configs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("configs")
}

#[test]
fn every_shipped_config_loads_and_validates() {
    let mut seen = 0;
    for entry in std::fs::read_dir(configs_dir()).expect("configs/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.extension().and_then(|e| e.to_str()) == Some("yaml") {
            Config::load(Some(&path), &[]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
    }
    assert!(seen >= 4, "only {seen} configs found");
}

/// The keys of `written`, nested, must be exactly the schema's.
fn same_keys(written: &serde_json::Value, schema: &serde_json::Value, path: &str) {
    if let (Some(a), Some(b)) = (written.as_object(), schema.as_object()) {
        let ka: Vec<_> = a.keys().collect();
        let kb: Vec<_> = b.keys().collect();
        assert_eq!(ka, kb, "keys under {path:?}");
        for (k, v) in a {
            same_keys(v, &b[k], &format!("{path}.{k}"));
        }
    }
}

#[test]
fn the_large_configs_write_every_key_and_have_their_published_shapes() {
    let schema = serde_json::to_value(Config::default()).expect("config serializes");
    let shapes = [
        ("gpt2-1.5b.yaml", (48, 1600, 25, 1024, 50304), 1_557_686_400),
        ("gpt-7b.yaml", (32, 4096, 32, 2048, 50304), 6_658_596_864),
    ];
    for (name, shape, params) in shapes {
        let path = configs_dir().join(name);
        let text = std::fs::read_to_string(&path).expect("the config is readable");
        let written: serde_json::Value = serde_saphyr::from_str(&text).expect("plain YAML");
        same_keys(&written, &schema, name);
        let cfg = Config::load(Some(&path), &[]).expect("loads");
        let m = &cfg.model;
        assert_eq!(
            (m.n_layer, m.d_model, m.n_head, m.seq_len, m.vocab_size),
            shape,
            "{name}"
        );
        assert_eq!(cfg.parallel.mixed_precision.param_dtype, DType::Bf16);
        assert_eq!(Workload::from_config(&cfg).params(), params, "{name}");
    }
}

// ------------------------------------------------------------ the command line

fn shardtrain(args: &[&str]) -> Output {
    common::shardtrain_in(Path::new(env!("CARGO_MANIFEST_DIR")), args)
}

fn success(args: &[&str]) -> String {
    let out = shardtrain(args);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "{args:?}\nstdout:\n{stdout}\nstderr:\n{}",
        text(&out.stderr)
    );
    stdout
}

/// Exit code 2 and a message containing every one of `expected`.
fn usage_error(args: &[&str], expected: &[&str]) {
    let out = shardtrain(args);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}\nstderr:\n{stderr}");
    for e in expected {
        assert!(stderr.contains(e), "{args:?}: expected {e:?} in\n{stderr}");
    }
}

const GPT2: &str = "configs/gpt2-124m.yaml";

#[test]
fn plan_prints_a_row_per_strategy_and_its_assumptions() {
    let out = success(&["plan", "--config", GPT2, "--gpus", "8"]);
    for strategy in ["full_shard", "shard_grad_op", "no_shard", "hybrid_shard"] {
        let rows = out.lines().filter(|l| l.starts_with(strategy)).count();
        assert_eq!(
            rows, 2,
            "{strategy}: a memory row and a speed row in\n{out}"
        );
    }
    for expected in [
        "== 8 GPUs",
        "ASSUMED",
        "370 GB/s",
        "HIDDEN",
        "EXPOSED",
        "recompute",
    ] {
        assert!(out.contains(expected), "{expected:?} in\n{out}");
    }
}

#[test]
fn plan_json_parses_with_one_section_per_gpu_count() {
    let out = success(&["plan", "--config", GPT2, "--gpus", "8,64,512", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("the output is JSON");
    assert_eq!(v["schema"], "shardtrain.plan/1");
    let sections = v["sections"].as_array().expect("sections");
    let gpus: Vec<_> = sections.iter().map(|s| s["gpus"].as_u64()).collect();
    assert_eq!(gpus, vec![Some(8), Some(64), Some(512)]);
    let rows = sections[0]["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 4);
    let full = &rows[0];
    assert_eq!(
        (full["status"].as_str(), full["strategy"].as_str()),
        (Some("planned"), Some("full_shard"))
    );
    assert_eq!(full["fits"], true);
    let efficiency = full["scaling_efficiency"].as_f64().expect("efficiency");
    assert!(efficiency > 0.0 && efficiency <= 1.0, "{efficiency}");
    // 512 x 16 sequences exceed the global batch of 512: the plan says what it used.
    let big = &sections[2]["batch"];
    assert_eq!(
        (
            big["requested_global_batch"].as_u64(),
            big["global_batch"].as_u64()
        ),
        (Some(512), Some(8192))
    );
}

#[test]
fn seven_b_full_shard_fits_eight_h100s_and_no_shard_does_not() {
    let out = success(&[
        "plan",
        "--config",
        "configs/gpt-7b.yaml",
        "--gpus",
        "8",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let rows = v["sections"][0]["rows"].as_array().expect("rows").clone();
    let row = |name: &str| {
        rows.iter()
            .find(|r| r["strategy"] == name)
            .unwrap_or_else(|| panic!("{name} row"))
            .clone()
    };
    assert_eq!(row("full_shard")["fits"], true);
    assert_eq!(row("no_shard")["fits"], false);
}

fn write_bench(dir: &Path, schema: &str) -> PathBuf {
    let path = dir.join("bench.json");
    let bench = serde_json::json!({
        "schema": schema, "device": "cuda", "card": "NVIDIA H200", "config": "configs/gpt2-124m.yaml",
        "params": 124475904, "flops_per_token": 8.6e8, "peak_flops": 9.89e14,
        "rows": [
            {"world_size": 2, "strategy": "full_shard", "micro_batch_size": 16, "global_batch_size": 512,
             "steps": 10, "ms_per_step": {"median": 70.0, "min": 69.0, "max": 72.0},
             "tokens_per_s": 480000.0, "tokens_per_s_per_rank": 240000.0, "mfu": 0.21,
             "memory_bytes": {"params": 1, "grads": 1, "optimizer": 1, "activations": 1, "total": 4},
             "phases_ms": {"forward": 20.0, "backward": 40.0, "optimizer": 5.0, "comm_exposed": 3.0, "comm_overlapped": 2.0}},
            {"world_size": 1, "strategy": "full_shard", "micro_batch_size": 16, "global_batch_size": 512,
             "steps": 10, "ms_per_step": {"median": 62.5, "min": 62.0, "max": 63.0},
             "tokens_per_s": 262200.0, "tokens_per_s_per_rank": 262200.0, "mfu": 0.23,
             "memory_bytes": {"params": 1, "grads": 1, "optimizer": 1, "activations": 1, "total": 4},
             "phases_ms": {"forward": 20.0, "backward": 40.0, "optimizer": 2.5, "comm_exposed": 0.0, "comm_overlapped": 0.0}}
        ]
    });
    std::fs::write(&path, bench.to_string()).expect("write the bench file");
    path
}

#[test]
fn calibrate_uses_the_world_one_row_of_a_bench_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bench = write_bench(dir.path(), "shardtrain.bench/1");
    let bench = bench.to_str().expect("utf-8 path");
    let out = success(&[
        "plan",
        "--config",
        GPT2,
        "--gpus",
        "8",
        "--calibrate",
        bench,
    ]);
    assert!(
        out.contains("CALIBRATED") && out.contains("row world 1"),
        "{out}"
    );
    let json = success(&[
        "plan",
        "--config",
        GPT2,
        "--gpus",
        "1",
        "--calibrate",
        bench,
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    let rate = v["rate"]["flops_per_s"].as_f64().expect("rate");
    assert!((rate - 262200.0 * 8.6e8).abs() < 1.0, "{rate}");
    // One GPU runs at the measured tokens/s, scaled by the FLOPs per token of the config.
    let single = v["sections"][0]["single_gpu_tokens_per_s"]
        .as_f64()
        .expect("tokens/s");
    let fpt = v["flops_per_token"].as_f64().expect("flops per token");
    assert!((single - rate / fpt).abs() / single < 1e-9);
}

#[test]
fn bad_input_exits_2_naming_the_flag_or_file() {
    usage_error(
        &["plan", "--config", GPT2, "--gpus", "8", "--gpu", "tpu"],
        &["--gpu"],
    );
    usage_error(&["plan", "--config", GPT2, "--gpus", "0"], &["--gpus"]);
    usage_error(&["plan", "--config", GPT2, "--gpus", "8,0"], &["--gpus"]);
    usage_error(
        &["plan", "--config", GPT2, "--gpus", "8", "--gpu", "custom"],
        &["--memory-gib"],
    );
    usage_error(
        &[
            "plan",
            "--config",
            GPT2,
            "--gpus",
            "8",
            "--gpu",
            "custom",
            "--memory-gib",
            "40",
        ],
        &["--peak-tflops"],
    );
    usage_error(
        &[
            "plan",
            "--config",
            GPT2,
            "--gpus",
            "8",
            "--gpus-per-node",
            "0",
        ],
        &["--gpus-per-node"],
    );
    usage_error(
        &["plan", "--config", GPT2, "--gpus", "8", "--inter-bw", "0"],
        &["--inter-bw"],
    );
    usage_error(
        &[
            "plan",
            "--config",
            GPT2,
            "--gpus",
            "8",
            "--calibrate",
            "no/such/bench.json",
        ],
        &["--calibrate", "no/such/bench.json"],
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let wrong = write_bench(dir.path(), "something.else/2");
    let wrong = wrong.to_str().expect("utf-8 path");
    usage_error(
        &[
            "plan",
            "--config",
            GPT2,
            "--gpus",
            "8",
            "--calibrate",
            wrong,
        ],
        &[wrong, "schema"],
    );
    usage_error(
        &["plan", "--config", "configs/nope.yaml", "--gpus", "8"],
        &["configs/nope.yaml"],
    );
    usage_error(
        &[
            "plan",
            "--config",
            GPT2,
            "--gpus",
            "8",
            "--set",
            "model.n_head=7",
        ],
        &["model.d_model"],
    );
    usage_error(
        &[
            "plan",
            "--config",
            GPT2,
            "--gpus",
            "8",
            "--set",
            "model.d_model=120000000",
        ],
        // Refused by the config's own size limit, before the planner's.
        &["model.d_model=120000000", "the trainer stops at 1.0 PiB"],
    );
}

#[test]
fn custom_gpus_and_overrides_show_in_the_header() {
    let out = success(&[
        "plan",
        "--config",
        GPT2,
        "--gpus",
        "16",
        "--gpu",
        "custom",
        "--memory-gib",
        "24",
        "--peak-tflops",
        "100",
        "--intra-bw",
        "100",
        "--inter-bw",
        "12.5",
    ]);
    assert!(out.contains("custom GPU: 24.0 GiB"), "{out}");
    assert!(out.contains("peak 100.0 TFLOP/s"), "{out}");
    assert!(
        out.contains("intra-node 100 GB/s") && out.contains("inter-node 12.5 GB/s"),
        "{out}"
    );
}
