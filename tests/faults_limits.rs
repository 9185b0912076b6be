//! Limits, on the command line: absurd sizes are refused with exit 2 naming their key before
//! anything is written (train, `--resume`, `bench`, the simulated GPU's memory), `--dry-run` never
//! prints a wrapped total, unreasonable steps and evaluations are bounded, and a stop signal acts
//! between micro-batches and between evaluation rounds (the partial step abandoned, its resume
//! bit-identical to a run never stopped); a run of 10^12 steps starts and stops.
//!
//! Every test works in its own temporary directory, the child's working directory too, and every
//! wait has a deadline.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::cli::{s, Out, Running};

use shardtrain::config::{sizes, Config};
use shardtrain::model::{GptShape, ParamLayout};

/// A refusal must come at once: well before any allocation could have been tried.
const REFUSAL_LIMIT: Duration = Duration::from_secs(10);
/// The longest a whole run of these tests may take.
const RUN_LIMIT: Duration = Duration::from_secs(120);
/// How long a stopped run may take to end after its signal: the micro-batch in progress (a few
/// milliseconds), the checkpoint, and a busy machine's slack.
const STOP_LIMIT: Duration = Duration::from_secs(10);

/// A small model on the CPU, quiet console.
#[rustfmt::skip]
const SMALL: &[&str] = &[
    "--set", "device=cpu",
    "--set", "model.n_layer=2",
    "--set", "model.d_model=32",
    "--set", "model.n_head=2",
    "--set", "model.seq_len=32",
    "--set", "train.micro_batch_size=8",
    "--set", "train.warmup_steps=1",
    "--set", "logging.progress=plain",
    "--set", "logging.every_steps=1000",
];

/// Steps of 300 micro-batches (about a second each): long enough that a signal lands mid-step.
#[rustfmt::skip]
const LONG_STEPS: &[&str] = &[
    "--set", "train.global_batch_size=2400",
    "--set", "train.eval_every=0",
    "--set", "train.max_steps=3",
];

fn shardtrain(work: &Path, args: &[&str], limit: Duration) -> Out {
    Running::start(work, args).wait(limit)
}

/// Every entry under `dir`, as sorted relative paths.
fn listing(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(dir).unwrap().display().to_string());
            if p.is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

/// `(step, loss)` of every metrics record of `run`, and its val_loss values.
fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .expect("metrics.jsonl exists")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON metrics line"))
        .collect()
}

fn losses(run: &Path) -> Vec<(u64, f64)> {
    metrics(run)
        .iter()
        .map(|r| (r["step"].as_u64().unwrap(), r["loss"].as_f64().unwrap()))
        .collect()
}

/// The four absurd models: each refused at once with exit 2 naming its key, and nothing
/// written: no run directory, no `runs/`, no config.yaml.
#[test]
fn absurd_models_are_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    for (set, key) in [
        ("model.d_model=1000000000", "model.d_model"),
        ("model.vocab_size=4000000000", "model.vocab_size"),
        ("model.n_layer=1000000", "model.n_layer"),
        ("model.d_model=65536", "model.d_model"),
    ] {
        let started = Instant::now();
        let mut args = vec!["train", "--run-dir", s(&run)];
        args.extend_from_slice(SMALL);
        args.extend_from_slice(&["--set", "model.n_head=4", "--set", set]);
        let out = shardtrain(tmp.path(), &args, REFUSAL_LIMIT);
        assert_eq!(out.code, Some(2), "{set}: {}", out.show());
        assert!(
            out.stderr.contains(key),
            "{set}: names {key}: {}",
            out.show()
        );
        assert!(!out.stderr.contains("memory allocation"), "{}", out.show());
        assert!(
            listing(tmp.path()).is_empty(),
            "{set} wrote {:?}",
            listing(tmp.path())
        );
        assert!(started.elapsed() < REFUSAL_LIMIT);
    }
    // The two that overflow nothing are refused by the memory check, with its figures.
    let mut args = vec!["train", "--run-dir", s(&run)];
    args.extend_from_slice(SMALL);
    args.extend_from_slice(&["--set", "model.n_head=4", "--set", "model.d_model=65536"]);
    let out = shardtrain(tmp.path(), &args, REFUSAL_LIMIT);
    for needle in ["does not fit in memory", "TiB per rank", "available"] {
        assert!(out.stderr.contains(needle), "`{needle}`: {}", out.show());
    }
}

/// `--dry-run` of the overflowing model is a config error, not a wrapped number; of a large model
/// that fits the integers, its totals are the exact ones.
#[test]
fn dry_run_never_prints_a_wrapped_total() {
    let tmp = tempfile::tempdir().unwrap();
    let out = shardtrain(
        tmp.path(),
        &["train", "--dry-run", "--set", "model.d_model=1000000000"],
        REFUSAL_LIMIT,
    );
    assert_eq!(out.code, Some(2), "{}", out.show());
    assert!(out.stderr.contains("model.d_model"), "{}", out.show());
    assert!(
        !out.stdout.contains("11106512226580896768"),
        "{}",
        out.show()
    );

    let out = shardtrain(
        tmp.path(),
        &["train", "--dry-run", "--set", "model.d_model=65536"],
        REFUSAL_LIMIT,
    );
    assert_eq!(out.code, Some(0), "{}", out.show());
    let cfg = Config::from_yaml_str(
        shardtrain::config::EMBEDDED_DEFAULT,
        "tiny",
        &["model.d_model=65536".to_string()],
    )
    .unwrap();
    let params = sizes::param_count(&cfg).unwrap();
    let total_line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("total"))
        .expect("a total line");
    assert_eq!(
        total_line.split_whitespace().nth(1),
        Some(params.to_string().as_str()),
        "{}",
        out.stdout
    );
    let peak = shardtrain::train::admission::peak_per_rank(&cfg).total();
    assert!(
        out.stdout.contains(&format!("({peak} bytes)")),
        "{}",
        out.stdout
    );
    assert!(peak > 3 << 40, "3 TiB of f32 model state: {peak}");
}

/// The config side's parameter count is the layout's, exactly.
#[test]
fn the_checked_parameter_count_is_the_layouts() {
    for (l, c, v, t) in [(4, 128, 256, 64), (12, 768, 50257, 1024), (1, 8, 11, 5)] {
        let mut cfg = Config::default();
        cfg.model.n_layer = l;
        cfg.model.d_model = c;
        cfg.model.vocab_size = v;
        cfg.model.block_size = t;
        let shape = GptShape {
            n_layer: l,
            n_head: 1,
            d_model: c,
            vocab_size: v,
            block_size: t,
        };
        let numel = ParamLayout::gpt(shape, 0.02).numel() as u128;
        assert_eq!(sizes::param_count(&cfg), Some(numel));
    }
}

/// Steps and evaluations that would never end are refused naming their key and the bound.
#[test]
fn unbounded_steps_and_evaluations_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for (set, key) in [
        (
            "train.global_batch_size=800000000",
            "train.global_batch_size",
        ),
        ("train.eval_tokens=100000000000000", "train.eval_tokens"),
    ] {
        let out = shardtrain(
            tmp.path(),
            &["train", "--run-dir", "run", "--set", set],
            REFUSAL_LIMIT,
        );
        assert_eq!(out.code, Some(2), "{set}: {}", out.show());
        assert!(out.stderr.contains(key), "{}", out.show());
        assert!(
            out.stderr.contains("134217728"),
            "the bound: {}",
            out.show()
        );
        assert!(listing(tmp.path()).is_empty(), "{set} wrote something");
    }
}

/// `bench` admits every row before running any; `--resume` with a micro-batch that cannot fit is
/// refused before the run directory changes.
#[test]
fn bench_and_resume_are_admitted_too() {
    let tmp = tempfile::tempdir().unwrap();
    let bench = shardtrain(
        tmp.path(),
        &[
            "bench",
            "--world",
            "1",
            "--steps",
            "1",
            "--set",
            "device=cpu",
            "--set",
            "model.d_model=65536",
        ],
        REFUSAL_LIMIT,
    );
    assert_eq!(bench.code, Some(2), "{}", bench.show());
    assert!(
        bench.stderr.contains("does not fit in memory") && bench.stderr.contains("model.d_model"),
        "{}",
        bench.show()
    );

    let run = tmp.path().join("run");
    let mut args = vec!["train", "--run-dir", s(&run)];
    args.extend_from_slice(SMALL);
    args.extend_from_slice(&[
        "--set",
        "train.global_batch_size=16",
        "--set",
        "train.max_steps=1",
        "--set",
        "train.eval_every=0",
        "--set",
        "checkpoint.every_steps=1",
    ]);
    let first = shardtrain(tmp.path(), &args, RUN_LIMIT);
    assert_eq!(first.code, Some(0), "{}", first.show());
    let before = listing(&run);
    // 2^21 sequences of 32 tokens: 2^26 tokens a step (within the bound), hundreds of GiB of
    // activations (beyond any test machine).
    let out = shardtrain(
        tmp.path(),
        &[
            "train",
            "--resume",
            s(&run),
            "--set",
            "train.max_steps=2",
            "--set",
            "train.micro_batch_size=2097152",
            "--set",
            "train.global_batch_size=2097152",
        ],
        REFUSAL_LIMIT,
    );
    assert_eq!(out.code, Some(2), "{}", out.show());
    assert!(
        out.stderr.contains("does not fit in memory")
            && out.stderr.contains("train.micro_batch_size"),
        "{}",
        out.show()
    );
    assert_eq!(listing(&run), before, "the refused resume changed the run");
}

/// SIGINT in the middle of a long step: the step is abandoned at the next micro-batch (no update,
/// data rewound), the checkpoint is the previous step's, exit 0 within moments; resuming it gives
/// the losses of a run never stopped, bit for bit.
#[test]
fn a_signal_mid_step_abandons_it_and_the_resume_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let whole = tmp.path().join("whole");
    let mut args = vec!["train", "--run-dir", s(&whole)];
    args.extend_from_slice(SMALL);
    args.extend_from_slice(LONG_STEPS);
    let out = shardtrain(tmp.path(), &args, RUN_LIMIT);
    assert_eq!(out.code, Some(0), "{}", out.show());

    let stopped = tmp.path().join("stopped");
    let mut args = vec!["train", "--run-dir", s(&stopped)];
    args.extend_from_slice(SMALL);
    args.extend_from_slice(LONG_STEPS);
    let mut running = Running::start(tmp.path(), &args);
    running.wait_for_metrics(&stopped, 1);
    running.interrupt();
    let signalled = Instant::now();
    let out = running.wait(STOP_LIMIT);
    let took = signalled.elapsed();
    assert_eq!(out.code, Some(0), "{}", out.show());
    assert!(
        out.stdout.contains("stop: step 2 abandoned after")
            && out.stdout.contains("of 300 micro-batches"),
        "{}",
        out.show()
    );
    assert!(
        out.stdout.contains("stopped after step 1"),
        "{}",
        out.show()
    );
    eprintln!("stopped {took:?} after the signal");
    assert_eq!(losses(&stopped).len(), 1, "no record of the abandoned step");

    // Stopped again in the resumed run's first step: the checkpoint it resumed from is the one
    // the stop leaves (not written twice).
    let mut running = Running::start(tmp.path(), &["train", "--resume", s(&stopped)]);
    running.wait_for_stdout("training ");
    running.interrupt();
    let out = running.wait(STOP_LIMIT);
    assert_eq!(out.code, Some(0), "{}", out.show());
    assert!(
        out.stdout.contains("stop: step 2 abandoned after")
            && out.stdout.contains("stopped after step 1"),
        "{}",
        out.show()
    );

    let resumed = shardtrain(tmp.path(), &["train", "--resume", s(&stopped)], RUN_LIMIT);
    assert_eq!(resumed.code, Some(0), "{}", resumed.show());
    assert!(resumed.stdout.contains("(step 1)"), "{}", resumed.show());
    assert_eq!(losses(&stopped), losses(&whole), "bit-identical losses");
}

/// SIGINT during a long evaluation: the evaluation is abandoned between rounds, the step it
/// followed is checkpointed (it was complete), exit 0.
#[test]
fn a_signal_during_evaluation_abandons_it() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let mut args = vec!["train", "--run-dir", s(&run)];
    args.extend_from_slice(SMALL);
    // Steps of one micro-batch, evaluations of 400 rounds after every step: the signal lands in
    // the second step's evaluation, or in the step itself, whose stop (agreed at its end) then
    // reaches the evaluation at its second round.
    args.extend_from_slice(&[
        "--set",
        "train.global_batch_size=8",
        "--set",
        "train.eval_every=1",
        "--set",
        "train.eval_tokens=102400",
        "--set",
        "train.max_steps=100",
    ]);
    let mut running = Running::start(tmp.path(), &args);
    running.wait_for_metrics(&run, 1);
    running.interrupt();
    let out = running.wait(STOP_LIMIT);
    assert_eq!(out.code, Some(0), "{}", out.show());
    assert!(
        out.stdout
            .contains("stop: the evaluation after step 2 abandoned"),
        "{}",
        out.show()
    );
    assert!(
        out.stdout.contains("stopped after step 2"),
        "{}",
        out.show()
    );
    let records = metrics(&run);
    assert_eq!(records.len(), 2, "{records:?}");
    assert!(records[0]["val_loss"].is_f64(), "{records:?}");
    assert!(records[1]["val_loss"].is_null(), "{records:?}");
    assert!(run.join("checkpoints/step-00000002/meta.json").is_file());
}

/// A run of 10^12 steps (one meant to be stopped) starts training instead of failing to reserve
/// room for every step's figures, and stops on a signal.
#[test]
fn a_trillion_step_run_trains_and_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let mut args = vec!["train", "--run-dir", s(&run)];
    args.extend_from_slice(SMALL);
    args.extend_from_slice(&[
        "--set",
        "train.global_batch_size=16",
        "--set",
        "train.eval_every=0",
        "--set",
        "train.max_steps=1000000000000",
    ]);
    let mut running = Running::start(tmp.path(), &args);
    running.wait_for_metrics(&run, 1);
    running.interrupt();
    let out = running.wait(STOP_LIMIT);
    assert_eq!(out.code, Some(0), "{}", out.show());
    assert!(out.stdout.contains("stopped after step"), "{}", out.show());
}

/// On the simulated GPU the memory that counts is its device memory (16 GiB): a 190 GiB job is
/// refused naming it, with nothing written.
#[test]
fn the_simulated_gpus_memory_is_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let out = shardtrain(
        tmp.path(),
        &[
            "train",
            "--run-dir",
            "run",
            "--set",
            "device=sim",
            "--set",
            "model.d_model=16384",
            "--set",
            "model.n_head=128",
        ],
        REFUSAL_LIMIT,
    );
    assert_eq!(out.code, Some(2), "{}", out.show());
    for needle in [
        "does not fit in memory",
        "simulated GPU",
        "model.d_model 16384",
    ] {
        assert!(out.stderr.contains(needle), "`{needle}`: {}", out.show());
    }
    assert!(listing(tmp.path()).is_empty(), "{:?}", listing(tmp.path()));
}
