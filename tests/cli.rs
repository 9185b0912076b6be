//! The command line as a user meets it: a short training run end to end (loss falls, run directory
//! complete, sampling works and is reproducible), `--print-config` round trips, and every kind of
//! bad input ends with exit code 2, a message naming the file, key and line, and nothing written.

use std::path::Path;

mod common;
use common::{shardtrain, text};

/// A smaller, faster variant of the tiny job (the full one is the README's first command).
#[rustfmt::skip]
const QUICK: &[&str] = &[
    "--set", "model.n_layer=2",
    "--set", "model.d_model=64",
    "--set", "model.seq_len=32",
    "--set", "train.micro_batch_size=8",
    "--set", "train.global_batch_size=16",
    "--set", "train.max_steps=60",
    "--set", "train.warmup_steps=10",
    "--set", "train.eval_every=30",
    "--set", "train.eval_tokens=2048",
    "--set", "logging.every_steps=20",
];

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn quick_run_trains_writes_its_run_dir_and_samples() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let run_s = run.to_str().unwrap();
    let mut args = vec!["train", "--run-dir", run_s];
    args.extend_from_slice(QUICK);
    let out = shardtrain(&args);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        text(&out.stderr)
    );
    assert!(
        stdout.contains("done: 60 steps") && stdout.contains("tokens/s"),
        "{stdout}"
    );

    let records = metrics(&run);
    assert_eq!(records.len(), 60);
    for key in [
        "step",
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "elapsed_s",
    ] {
        assert!(
            records[0].get(key).is_some(),
            "metrics lack `{key}`: {}",
            records[0]
        );
    }
    let first = records[0]["loss"].as_f64().unwrap();
    let val = records[59]["val_loss"]
        .as_f64()
        .expect("val_loss on the last step");
    assert!(records[29]["val_loss"].is_number() && records[30].get("val_loss").is_none());
    assert!(
        val <= 0.6 * first,
        "val loss {val} is not below 60% of the first loss {first}"
    );
    for file in ["config.yaml", "model.safetensors", "summary.json"] {
        assert!(
            run.join(file).exists(),
            "{file} missing from the run directory"
        );
    }

    let sample = |seed: &str| {
        let out = shardtrain(&[
            "sample",
            "--run-dir",
            run_s,
            "--prompt",
            "12+3",
            "--max-tokens",
            "24",
            "--seed",
            seed,
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let a = sample("1");
    assert!(a.starts_with("12+3") && a.len() > 4, "{a:?}");
    assert_eq!(a, sample("1"), "the same seed gives the same text");
}

fn losses(dir: &Path) -> Vec<f64> {
    metrics(dir)
        .iter()
        .map(|r| r["loss"].as_f64().unwrap())
        .collect()
}

#[test]
fn four_ranks_full_shard_train_to_the_losses_of_one() {
    let tmp = tempfile::tempdir().unwrap();
    let mut runs = Vec::new();
    for world in ["1", "4"] {
        let dir = tmp.path().join(format!("world{world}"));
        let mut args = vec![
            "train",
            "--run-dir",
            dir.to_str().unwrap(),
            "--world",
            world,
        ];
        args.extend_from_slice(QUICK);
        args.extend_from_slice(&[
            "--set",
            "train.micro_batch_size=4",
            "--set",
            "train.max_steps=10",
            "--set",
            "parallel.strategy=full_shard",
        ]);
        let out = shardtrain(&args);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let stdout = text(&out.stdout);
        assert!(stdout.contains("memory of rank 0"), "{stdout}");
        runs.push(losses(&dir));
    }
    for (a, b) in runs[0].iter().zip(&runs[1]) {
        assert!(
            (a - b).abs() <= 1e-5 * a.abs(),
            "{:?} vs {:?}",
            runs[0],
            runs[1]
        );
    }
}

#[test]
fn dry_run_prints_the_layout_and_memory_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let out = shardtrain(&[
        "train",
        "--dry-run",
        "--world",
        "4",
        "--run-dir",
        run.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for needle in ["embed_head", "h.3", "per rank", "ZeRO", "(4+4+8)Ψ/4"] {
        assert!(
            stdout.contains(needle),
            "`{needle}` missing from:\n{stdout}"
        );
    }
    assert!(!run.exists());
}

#[test]
fn print_config_round_trips_and_shows_overrides() {
    let tmp = tempfile::tempdir().unwrap();
    let out = shardtrain(&[
        "train",
        "--print-config",
        "--set",
        "train.lr=0.001",
        "--world",
        "1",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed = text(&out.stdout);
    assert!(printed.contains("lr: 0.001"), "{printed}");
    let file = tmp.path().join("printed.yaml");
    std::fs::write(&file, &printed).unwrap();
    let again = shardtrain(&[
        "train",
        "--config",
        file.to_str().unwrap(),
        "--print-config",
    ]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert_eq!(text(&again.stdout), printed);
    assert!(
        std::fs::read_dir(tmp.path()).unwrap().count() == 1,
        "print-config wrote nothing else"
    );
}

/// Writes `yaml` as a config file, runs `train` on it, and checks the failure: exit code 2, the
/// message names the file, every `expected` fragment, and the run directory was never created.
fn expect_config_error(yaml: &str, expected: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("bad.yaml");
    std::fs::write(&file, yaml).unwrap();
    let run = tmp.path().join("run");
    let out = shardtrain(&[
        "train",
        "--config",
        file.to_str().unwrap(),
        "--run-dir",
        run.to_str().unwrap(),
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{yaml}\n{stderr}");
    assert!(stderr.contains("bad.yaml"), "no file name in: {stderr}");
    for e in expected {
        assert!(stderr.contains(e), "`{e}` missing from: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        !run.exists(),
        "a run directory was created for a bad config"
    );
}

#[test]
fn bad_configs_exit_2_naming_file_key_and_line() {
    expect_config_error("model:\n  n_layer: 2\n  n_layers: 3\n", &["n_layers", "3"]);
    expect_config_error("train:\n  lr: fast\n", &["lr", "2"]);
    expect_config_error(
        "model:\n  d_model: 130\n  n_head: 4\n",
        &["model.d_model", ":2"],
    );
    expect_config_error(
        "model:\n  block_size: 32\n  seq_len: 64\n",
        &["model.seq_len", ":3"],
    );
    expect_config_error(
        "train:\n  micro_batch_size: 16\n  global_batch_size: 40\n",
        &["train.global_batch_size", ":3"],
    );
    expect_config_error("train:\n  lr: -0.1\n", &["train.lr", ":2"]);
    expect_config_error("model: [1, 2\n", &["bad.yaml"]);
}

#[test]
fn missing_config_file_and_bad_override_exit_2() {
    let out = shardtrain(&["train", "--config", "no/such/config.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("no/such/config.yaml"));

    let out = shardtrain(&["train", "--set", "train.no_such_key=1", "--print-config"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("train.no_such_key"));

    let out = shardtrain(&["train", "--set", "model.n_head=abc", "--print-config"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("model.n_head"));
}

#[test]
fn a_nonempty_run_dir_is_never_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let keep = tmp.path().join("metrics.jsonl");
    std::fs::write(&keep, "precious\n").unwrap();
    let out = shardtrain(&["train", "--run-dir", tmp.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("not empty"));
    assert_eq!(std::fs::read_to_string(&keep).unwrap(), "precious\n");
}

#[test]
fn sample_without_a_finished_run_explains_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = shardtrain(&["sample", "--run-dir", tmp.path().to_str().unwrap()]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("config.yaml"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_bad_sampling_argument_exits_2() {
    let tmp = tempfile::tempdir().unwrap();
    let out = shardtrain(&[
        "sample",
        "--run-dir",
        tmp.path().to_str().unwrap(),
        "--temperature",
        "nan",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("--temperature"));
}

#[test]
fn help_names_the_commands() {
    let out = shardtrain(&["--help"]);
    let help = text(&out.stdout);
    assert!(out.status.success());
    for word in ["train", "sample", "print-config"] {
        assert!(help.contains(word), "{help}");
    }
}

#[test]
fn an_empty_config_file_says_it_sets_no_keys() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.yaml");
    std::fs::write(&empty, "# nothing yet\n\n").unwrap();
    let out = shardtrain(&["train", "--config", empty.to_str().unwrap(), "--dry-run"]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("empty.yaml sets no keys"), "{stderr}");
}

#[test]
fn a_huge_value_is_refused_without_echoing_it_whole() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let huge = format!("model.init_from={}", "x".repeat(100_000));
    let out = shardtrain(&["train", "--run-dir", run.to_str().unwrap(), "--set", &huge]);
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        &stderr[..stderr.len().min(2000)]
    );
    assert!(
        stderr.contains("model.init_from") && stderr.contains("100000 bytes"),
        "{}",
        &stderr[..stderr.len().min(2000)]
    );
    assert!(
        stderr.len() < 2000,
        "the error echoes {} bytes",
        stderr.len()
    );
    assert!(!run.exists(), "nothing written");
}
