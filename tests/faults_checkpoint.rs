//! Checkpoints that must not be used, met on the command line (issue 14, items 3-6 and 9): a
//! checkpoint of another run copied into this one, metadata that cannot load, a resume that fails
//! or changes the model, and `eval` of a run whose newest checkpoint is damaged. Each is bad input
//! (exit 2) naming what is wrong, and leaves every file as it was.
//!
//! Every test trains its tiny runs once, in its own temporary directory (also the child's working
//! directory), and every command has a deadline.

mod common;

use std::path::{Path, PathBuf};
use std::time::Instant;

use common::cli::{assert_unchanged, names, s, snapshot, Out, Running, COMMAND_LIMIT};
use serde_json::{json, Value};

/// A small, fast job (a 2-layer model of width 32; tens of milliseconds a step).
#[rustfmt::skip]
const QUICK: &[&str] = &[
    "--set", "device=cpu",
    "--set", "model.n_layer=2",
    "--set", "model.d_model=32",
    "--set", "model.n_head=2",
    "--set", "model.seq_len=32",
    "--set", "train.micro_batch_size=8",
    "--set", "train.global_batch_size=16",
    "--set", "train.warmup_steps=1",
    "--set", "train.eval_every=0",
    "--set", "train.eval_tokens=1024",
    "--set", "logging.progress=plain",
    "--set", "logging.every_steps=1000",
    "--set", "checkpoint.every_steps=1000",
];

impl Out {
    /// Exit 2 with `needles` in the error output.
    fn assert_bad_input(&self, needles: &[&str]) {
        assert_eq!(self.code, Some(2), "{}", self.show());
        for n in needles {
            assert!(self.stderr.contains(n), "`{n}` missing:\n{}", self.show());
        }
    }
}

/// Runs `shardtrain args` in `work` to completion (with a deadline).
fn shardtrain(work: &Path, args: &[&str]) -> Out {
    Running::start(work, args).wait(COMMAND_LIMIT)
}

/// `train --run-dir run` with the quick job and `extra` settings, which must succeed.
fn train(work: &Path, run: &Path, extra: &[&str]) -> Out {
    let mut args = vec!["train", "--run-dir", s(run)];
    args.extend_from_slice(QUICK);
    args.extend_from_slice(extra);
    let out = shardtrain(work, &args);
    out.assert_success();
    out
}

fn step_dir(run: &Path, step: u64) -> PathBuf {
    run.join("checkpoints").join(format!("step-{step:08}"))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn read_meta(ckpt: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(ckpt.join("meta.json")).unwrap()).unwrap()
}

fn write_meta(ckpt: &Path, meta: &Value) {
    std::fs::write(ckpt.join("meta.json"), serde_json::to_string(meta).unwrap()).unwrap();
}

#[test]
fn a_foreign_checkpoint_is_skipped_by_resume_latest_refused_in_place_and_never_costs_a_good_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (run, other) = (tmp.path().join("run"), tmp.path().join("other"));
    // This run: 4 layers, checkpoints of steps 2 and 3 kept.
    #[rustfmt::skip]
    let ours = ["--set", "model.n_layer=4", "--set", "checkpoint.every_steps=1",
                "--set", "checkpoint.keep_last=2"];
    let mut first = ours.to_vec();
    first.extend(["--set", "train.max_steps=3"]);
    train(tmp.path(), &run, &first);
    // Another run's (2 layers) step 1 copied in as a newer step.
    train(tmp.path(), &other, &["--set", "train.max_steps=1"]);
    let foreign = step_dir(&run, 40);
    copy_dir(&step_dir(&other, 1), &foreign);

    // Explicitly, into the run it lies in: refused, nothing changes.
    let before = snapshot(&run);
    let out = shardtrain(
        tmp.path(),
        &[
            "train",
            "--resume",
            s(&foreign),
            "--set",
            "train.max_steps=41",
        ],
    );
    out.assert_bad_input(&["step-00000040", "does not belong", "--run-dir NEW"]);
    assert_unchanged(&before, &run, "an in-place resume of a foreign checkpoint");

    // `latest` skips it, naming it, and continues this run from its step 3.
    let out = shardtrain(
        tmp.path(),
        &[
            "train",
            "--resume",
            "latest",
            "--run-dir",
            s(&run),
            "--set",
            "train.max_steps=5",
        ],
    );
    out.assert_success();
    assert!(
        out.stderr
            .contains(&format!("skipping {}", foreign.display()))
            && out.stderr.contains("foreign"),
        "{}",
        out.show()
    );
    let resumed = format!("resuming {} (step 3)", step_dir(&run, 3).display());
    assert!(out.stdout.contains(&resumed), "{}", out.show());
    // Pruning kept the newest two of this run's checkpoints and left the foreign one alone.
    assert_eq!(
        names(&run.join("checkpoints")),
        ["step-00000004", "step-00000005", "step-00000040"]
    );

    // A damaged newest checkpoint of the run is skipped too, saying why.
    let rank_file = step_dir(&run, 5).join("rank-00000.safetensors");
    let mut bytes = std::fs::read(&rank_file).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&rank_file, &bytes).unwrap();
    let out = shardtrain(
        tmp.path(),
        &[
            "train",
            "--resume",
            "latest",
            "--run-dir",
            s(&run),
            "--dry-run",
        ],
    );
    out.assert_success();
    let skipped = format!("skipping {}: not valid", step_dir(&run, 5).display());
    assert!(
        out.stderr.contains(&skipped) && out.stderr.contains("checksum"),
        "{}",
        out.show()
    );
    // Resumed from step 4, the run reaches step 5 again: the damaged step-5 is kept aside (never
    // deleted), the run writes its own, and pruning still keeps the foreign one.
    let out = shardtrain(
        tmp.path(),
        &[
            "train",
            "--resume",
            "latest",
            "--run-dir",
            s(&run),
            "--set",
            "train.max_steps=6",
        ],
    );
    out.assert_success();
    let ckpts = names(&run.join("checkpoints"));
    assert_eq!(ckpts.len(), 4, "{ckpts:?}");
    assert_eq!(
        [&ckpts[0], &ckpts[2], &ckpts[3]],
        ["step-00000005", "step-00000006", "step-00000040"]
    );
    assert!(
        ckpts[1].starts_with("step-00000005.set-aside-"),
        "{ckpts:?}"
    );
    let aside = run.join("checkpoints").join(&ckpts[1]);
    assert_eq!(
        std::fs::read(aside.join("rank-00000.safetensors")).unwrap(),
        bytes
    );
    shardtrain(tmp.path(), &["ckpt", "inspect", s(&step_dir(&run, 5))]).assert_success();

    // Into a new run directory it is a new run from it.
    let fresh = tmp.path().join("fresh");
    let out = shardtrain(
        tmp.path(),
        &[
            "train",
            "--resume",
            s(&foreign),
            "--run-dir",
            s(&fresh),
            "--set",
            "train.max_steps=2",
        ],
    );
    out.assert_success();
    assert!(fresh.join("model.safetensors").is_file(), "{}", out.show());
}

/// A 9-level alias bomb: 9^9 scalars if expanded.
fn alias_bomb() -> String {
    let mut y = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x]\n");
    for i in 1..9 {
        let refs = vec![format!("*a{}", i - 1); 9].join(", ");
        y.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
    }
    y
}

#[test]
fn ckpt_inspect_refuses_every_checkpoint_that_cannot_load() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    train(tmp.path(), &run, &["--set", "train.max_steps=1"]);
    let good = step_dir(&run, 1);
    let out = shardtrain(tmp.path(), &["ckpt", "inspect", s(&good)]);
    out.assert_success();
    assert!(out.stdout.contains("run id "), "{}", out.show());
    let meta = read_meta(&good);
    let numel = meta["units"][0]["numel"].as_u64().unwrap();
    let other_shape = meta["config_yaml"]
        .as_str()
        .unwrap()
        .replace("n_layer: 2", "n_layer: 3");
    assert_ne!(other_shape, meta["config_yaml"].as_str().unwrap());

    // A checkpoint written before run ids and fingerprints is read, with a warning.
    let old = tmp.path().join("old");
    copy_dir(&good, &old);
    let mut m = meta.clone();
    let fields = m.as_object_mut().unwrap();
    assert!(fields.remove("run_id").is_some() && fields.remove("model_fingerprint").is_some());
    write_meta(&old, &m);
    let out = shardtrain(tmp.path(), &["ckpt", "inspect", s(&old)]);
    out.assert_success();
    assert!(
        out.stderr.contains("without those checks"),
        "{}",
        out.show()
    );

    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Edit, &[&str])> = vec![
        (
            "piece-beyond-the-unit",
            Box::new(move |m| m["files"][0]["pieces"][0]["end"] = json!(numel + 1)),
            &["`pieces`", "inside 0.."],
        ),
        (
            "empty-piece",
            // An extra piece holding nothing, beside the real ones.
            Box::new(|m| {
                let pieces = m["files"][0]["pieces"].as_array_mut().unwrap();
                pieces.push(json!({"unit": 0, "start": 5, "end": 5}));
            }),
            &["`pieces`", "non-empty"],
        ),
        (
            "no-units",
            Box::new(|m| {
                m["units"] = json!([]);
                m["files"][0]["pieces"] = json!([]);
            }),
            &["`units`"],
        ),
        (
            "alias-bomb",
            Box::new(|m| m["config_yaml"] = json!(alias_bomb())),
            &["`config_yaml`", "aliases"],
        ),
        (
            "invalid-config",
            Box::new(|m| m["config_yaml"] = json!("model:\n  n_layer: [unclosed\n")),
            &["`config_yaml`"],
        ),
        (
            "invalid-config-value",
            Box::new(|m| {
                let y = m["config_yaml"]
                    .as_str()
                    .unwrap()
                    .replace("n_head: 2", "n_head: 0");
                m["config_yaml"] = json!(y);
            }),
            &["`config_yaml`", "model.n_head"],
        ),
        (
            "another-shape",
            Box::new(move |m| m["config_yaml"] = json!(other_shape.clone())),
            &["`units`"],
        ),
        (
            "data-position-out-of-range",
            Box::new(|m| m["data_position"]["pos"] = json!(1_000_000_000u64)),
            &["`data_position`", "pos"],
        ),
        (
            "world-size-0",
            Box::new(|m| m["world_size"] = json!(0)),
            &["`world_size`", "0 is outside"],
        ),
        (
            "world-size-2^64-1",
            Box::new(|m| m["world_size"] = json!(u64::MAX)),
            &["`world_size`", "is outside"],
        ),
        (
            "foreign-file-name",
            Box::new(|m| m["files"][0]["file"] = json!("../../run/model.safetensors")),
            &["`files`"],
        ),
    ];
    for (name, edit, needles) in cases {
        let dir = tmp.path().join("cases").join(name);
        copy_dir(&good, &dir);
        let mut m = meta.clone();
        edit(&mut m);
        write_meta(&dir, &m);
        let started = Instant::now();
        let out = shardtrain(tmp.path(), &["ckpt", "inspect", s(&dir)]);
        let seconds = started.elapsed().as_secs_f64();
        assert_eq!(out.code, Some(2), "{name}: {}", out.show());
        for n in needles {
            assert!(
                out.stderr.contains(n),
                "{name}: `{n}` missing:\n{}",
                out.show()
            );
        }
        assert!(out.stderr.contains(s(&dir)), "{name}: {}", out.show());
        if name == "alias-bomb" {
            // Refused before it expands (the whole command, process start included).
            assert!(seconds < 2.0, "the bomb took {seconds:.1}s");
        }
        // A resume runs the same validation.
        let fresh = tmp.path().join("cases").join(format!("{name}-resumed"));
        let out = shardtrain(
            tmp.path(),
            &[
                "train",
                "--resume",
                s(&dir),
                "--run-dir",
                s(&fresh),
                "--set",
                "train.max_steps=2",
            ],
        );
        assert_eq!(out.code, Some(2), "{name} (resume): {}", out.show());
        assert!(
            !fresh.exists(),
            "{name}: a refused resume made its run directory"
        );
    }
}

#[test]
fn a_failed_resume_leaves_the_run_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    train(tmp.path(), &run, &["--set", "train.max_steps=2"]);
    assert!(run.join("model.safetensors").is_file());
    let ckpt = step_dir(&run, 2);
    let resume = |extra: &[&str]| {
        let mut args = vec!["train", "--resume", s(&ckpt), "--set", "train.max_steps=4"];
        args.extend_from_slice(extra);
        shardtrain(tmp.path(), &args)
    };

    // The data does not fit the saved position (another seed draws another stream).
    let before = snapshot(&run);
    resume(&["--set", "train.seed=99"]).assert_bad_input(&["`data_position`", "seed"]);
    assert_unchanged(&before, &run, "a resume whose data does not fit");

    // A model change, even one that keeps every tensor's shape.
    resume(&["--set", "model.n_head=4"]).assert_bad_input(&["model.n_head", "cannot change"]);
    assert_unchanged(&before, &run, "a resume that changes the model");

    // A piece range in meta.json beyond its unit.
    let mut m = read_meta(&ckpt);
    let numel = m["units"][0]["numel"].as_u64().unwrap();
    m["files"][0]["pieces"][0]["end"] = json!(numel + 5);
    write_meta(&ckpt, &m);
    let before = snapshot(&run);
    resume(&[]).assert_bad_input(&["`pieces`", s(&ckpt)]);
    assert_unchanged(&before, &run, "a resume from a bad piece range");
}

#[test]
fn eval_of_a_run_says_what_it_evaluates_and_a_damaged_newest_checkpoint_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    #[rustfmt::skip]
    train(tmp.path(), &run, &["--set", "train.max_steps=2", "--set", "checkpoint.every_steps=1",
                               "--set", "checkpoint.keep_last=2"]);
    let eval = || shardtrain(tmp.path(), &["eval", "--checkpoint", s(&run)]);
    let newest = step_dir(&run, 2);
    let out = eval();
    out.assert_success();
    let said = format!("evaluating checkpoint {} at step 2", newest.display());
    assert!(out.stdout.contains(&said), "{}", out.show());

    let pristine = tmp.path().join("pristine");
    copy_dir(&newest, &pristine);
    let rank_file = newest.join("rank-00000.safetensors");
    type Damage = Box<dyn Fn()>;
    let rf = rank_file.clone();
    let rf2 = rank_file.clone();
    let rf3 = rank_file.clone();
    let nm = newest.clone();
    let cases: Vec<(&str, Damage, &str)> = vec![
        (
            "truncated",
            Box::new(move || {
                let bytes = std::fs::read(&rf).unwrap();
                std::fs::write(&rf, &bytes[..bytes.len() / 2]).unwrap();
            }),
            "truncated",
        ),
        (
            "deleted rank file",
            Box::new(move || std::fs::remove_file(&rf2).unwrap()),
            "missing",
        ),
        (
            "corrupt byte",
            Box::new(move || {
                let mut bytes = std::fs::read(&rf3).unwrap();
                let at = bytes.len() - 3;
                bytes[at] ^= 0x40;
                std::fs::write(&rf3, &bytes).unwrap();
            }),
            "checksum mismatch",
        ),
        (
            "bad meta.json",
            Box::new(move || std::fs::write(nm.join("meta.json"), "{\"format\": 1").unwrap()),
            "meta.json",
        ),
    ];
    for (name, damage, needle) in cases {
        damage();
        let out = eval();
        out.assert_bad_input(&[needle, s(&newest)]);
        assert!(!out.stdout.contains("val_loss"), "{name}: {}", out.show());
        std::fs::remove_dir_all(&newest).unwrap();
        copy_dir(&pristine, &newest);
    }

    // A run without checkpoints evaluates its final weights, and says so.
    std::fs::remove_dir_all(run.join("checkpoints")).unwrap();
    let out = eval();
    out.assert_success();
    assert!(out.stdout.contains("final weights"), "{}", out.show());
}
