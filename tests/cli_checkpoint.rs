//! Checkpoints as a user meets them on the command line, running the real binary: Ctrl-C stops a
//! run after its step with a checkpoint (exit 0), a second signal quits at once (exit 130),
//! `--resume` continues in place, every resume mistake exits with its code and writes nothing,
//! periodic checkpoints are pruned to `keep_last`, `ckpt inspect` verifies (and names a damaged
//! file), `export` writes Hugging Face files once, and `model.init_from` starts from them.
//!
//! Every test works in its own temporary directory (also the child's working directory, so a
//! default `runs/` never lands in the repository), and every wait has a deadline: a child that
//! outlives it is killed and the test fails with what it printed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::cli::*;

/// How long a run may take to stop after a stop signal.
const STOP_LIMIT: Duration = Duration::from_secs(30);

/// Runs `shardtrain args` in `work` to completion (with a deadline).
fn shardtrain(work: &Path, args: &[&str]) -> Out {
    Running::start(work, args).wait(COMMAND_LIMIT)
}

/// `train --run-dir run` with the quick job and `extra` settings.
fn train(work: &Path, run: &Path, extra: &[&str]) -> Out {
    let mut args = vec!["train", "--run-dir", s(run)];
    args.extend_from_slice(QUICK);
    args.extend_from_slice(extra);
    shardtrain(work, &args)
}

/// Sends `kill -SIG pid`; returns whether `kill` succeeded.
fn signal(pid: u32, sig: &str) -> bool {
    Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .expect("kill runs")
        .success()
}

fn summary(run: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(run.join("summary.json")).expect("summary.json exists");
    serde_json::from_str(&text).expect("summary.json is JSON")
}

fn first_loss(run: &Path) -> f64 {
    summary(run)["first_loss"].as_f64().expect("first_loss")
}

/// Starts a run of 100000 steps (no periodic checkpoints unless `extra` asks) and waits until its
/// metrics file has `lines` lines, so that it is training and its stop signals are installed.
fn start_long_run(work: &Path, run: &Path, lines: usize, extra: &[&str]) -> Running {
    let mut args = vec!["train", "--run-dir", s(run)];
    args.extend_from_slice(QUICK);
    args.extend_from_slice(&["--set", "train.max_steps=100000"]);
    args.extend_from_slice(extra);
    let mut running = Running::start(work, &args);
    let deadline = Instant::now() + START_LIMIT;
    while metric_lines(run) < lines {
        if running.has_exited() {
            running.fail("the long run ended before training");
        }
        if Instant::now() > deadline {
            running.fail(&format!(
                "fewer than {lines} metrics lines after {START_LIMIT:?}"
            ));
        }
        sleep(Duration::from_millis(10));
    }
    running
}

/// The N of "stopped after step N" in a stopped run's output.
fn stopped_step(out: &Out) -> u64 {
    let rest = out
        .stdout
        .split("stopped after step ")
        .nth(1)
        .unwrap_or_else(|| panic!("no `stopped after step` in:\n{}", out.show()));
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().expect("a step number")
}

/// Starts a long run, stops it with one SIGINT and checks the stop; returns the step it stopped
/// after.
fn stop_a_long_run(work: &Path, run: &Path) -> u64 {
    let mut running = start_long_run(work, run, 2, &[]);
    assert!(signal(running.pid(), "-INT"), "kill -INT failed");
    let out = running.wait(STOP_LIMIT);
    out.assert_success();
    let n = stopped_step(&out);
    assert!(n >= 2, "{}", out.show());
    n
}

fn step_dir(run: &Path, step: u64) -> PathBuf {
    run.join("checkpoints").join(format!("step-{step:08}"))
}

#[test]
fn ctrl_c_stops_after_the_step_with_a_checkpoint_and_exits_0() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let mut running = start_long_run(tmp.path(), &run, 2, &[]);
    assert!(signal(running.pid(), "-INT"), "kill -INT failed");
    let out = running.wait(STOP_LIMIT);
    out.assert_success();
    let n = stopped_step(&out);
    let ckpt = step_dir(&run, n);
    for needle in [
        format!("stopped after step {n}; checkpoint: {}", ckpt.display()),
        format!(
            "continue with: shardtrain train --resume {}",
            ckpt.display()
        ),
    ] {
        assert!(out.stdout.contains(&needle), "`{needle}`:\n{}", out.show());
    }
    assert!(out.stderr.contains("stop requested"), "{}", out.show());

    // The checkpoint of the last step taken, the only one; no final weights.
    assert_eq!(names(&run.join("checkpoints")), [format!("step-{n:08}")]);
    assert!(ckpt.join("meta.json").is_file());
    assert!(ckpt.join("rank-00000.safetensors").is_file());
    assert!(
        !run.join("model.safetensors").exists(),
        "final weights of a stopped run"
    );
    assert_eq!(metric_steps(&run), (1..=n).collect::<Vec<_>>());
    let sum = summary(&run);
    assert_eq!(sum["stopped_at"].as_u64(), Some(n), "{sum}");
    assert_eq!(sum["weights"], serde_json::Value::Null, "{sum}");

    // The run directory resolves to that checkpoint, verified.
    let inspect = shardtrain(tmp.path(), &["ckpt", "inspect", s(&run)]);
    inspect.assert_success();
    for needle in [
        format!("checkpoint {}", ckpt.display()),
        format!("step {n} | {} tokens seen", n * 16 * 32),
        "world size 1".to_string(),
        "checksums verified".to_string(),
        "rank-00000.safetensors".to_string(),
    ] {
        assert!(
            inspect.stdout.contains(&needle),
            "`{needle}`:\n{}",
            inspect.show()
        );
    }

    // A stopped run's checkpoint exports like a finished run.
    let hf = tmp.path().join("hf");
    let export = shardtrain(tmp.path(), &["export", s(&ckpt), "-o", s(&hf)]);
    export.assert_success();
    assert_eq!(names(&hf), ["config.json", "model.safetensors"]);
}

#[test]
fn resume_continues_a_stopped_run_in_its_run_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let n = stop_a_long_run(tmp.path(), &run);
    let max = (n + 3).to_string();
    let set_max = format!("train.max_steps={max}");
    let out = shardtrain(
        tmp.path(),
        &["train", "--resume", s(&run), "--set", &set_max],
    );
    out.assert_success();
    let needle = format!(
        "resuming {} (step {n}) in {}",
        step_dir(&run, n).display(),
        run.display()
    );
    assert!(out.stdout.contains(&needle), "`{needle}`:\n{}", out.show());
    assert!(out.stdout.contains("done: 3 steps"), "{}", out.show());

    // The metrics continue the same file, step after step; the run now has final weights.
    assert_eq!(metric_steps(&run), (1..=n + 3).collect::<Vec<_>>());
    assert!(run.join("model.safetensors").is_file());
    let sum = summary(&run);
    assert_eq!(sum["first_step"].as_u64(), Some(n + 1), "{sum}");
    assert_eq!(sum["steps"].as_u64(), Some(3), "{sum}");
    assert_eq!(sum["stopped_at"], serde_json::Value::Null, "{sum}");
    // No checkpoint was due (checkpoint.every_steps is 0): the stop's checkpoint is the only one.
    assert_eq!(names(&run.join("checkpoints")), [format!("step-{n:08}")]);
}

#[test]
fn resume_from_a_damaged_checkpoint_fails_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    train(
        tmp.path(),
        &run,
        &[
            "--world",
            "2",
            "--set",
            "train.max_steps=2",
            "--set",
            "checkpoint.every_steps=2",
        ],
    )
    .assert_success();
    let file = step_dir(&run, 2).join("rank-00001.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();
    let before = snapshot(tmp.path());
    let out = shardtrain(
        tmp.path(),
        &["train", "--resume", s(&run), "--set", "train.max_steps=4"],
    );
    assert_eq!(out.code, Some(2), "{}", out.show());
    assert!(out.stderr.contains("checksum"), "{}", out.show());
    assert!(
        out.stderr.contains("rank-00001.safetensors"),
        "{}",
        out.show()
    );
    // The finished run's weights, metrics and summary are as they were.
    assert_unchanged(&before, tmp.path(), "a resume from a damaged checkpoint");
}

// Guards a fixed bug: `latest` took every entry of the run directory (metrics.jsonl too) for a
// directory of checkpoints and failed with "Not a directory".
#[test]
fn resume_latest_in_a_run_dir_continues_that_run() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let n = stop_a_long_run(tmp.path(), &run);
    let set_max = format!("train.max_steps={}", n + 3);
    let out = shardtrain(
        tmp.path(),
        &[
            "train",
            "--resume",
            "latest",
            "--run-dir",
            s(&run),
            "--set",
            &set_max,
        ],
    );
    out.assert_success();
    let needle = format!("resuming {} (step {n})", step_dir(&run, n).display());
    assert!(out.stdout.contains(&needle), "`{needle}`:\n{}", out.show());
    assert_eq!(metric_steps(&run), (1..=n + 3).collect::<Vec<_>>());
    assert!(run.join("model.safetensors").is_file());
    assert_eq!(names(tmp.path()), ["run"], "nothing written beside the run");
}

#[test]
fn resume_latest_continues_the_newest_run_under_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    // An older, finished run with a checkpoint of its step 20, then a run stopped after a few
    // steps: `latest` must take the newest checkpoint written, not the highest step or the first
    // directory. (Should the two times tie, the path breaks the tie, also in favour of b-stopped.)
    let old = work.join("runs").join("a-old");
    train(
        work,
        &old,
        &[
            "--set",
            "train.max_steps=20",
            "--set",
            "checkpoint.every_steps=20",
        ],
    )
    .assert_success();
    let old_files = snapshot(&old);
    let run = work.join("runs").join("b-stopped");
    let n = stop_a_long_run(work, &run);
    let set_max = format!("train.max_steps={}", n + 3);
    // Relative to the working directory, as a user types it.
    let out = shardtrain(work, &["train", "--resume", "latest", "--set", &set_max]);
    out.assert_success();
    let needle =
        format!("resuming runs/b-stopped/checkpoints/step-{n:08} (step {n}) in runs/b-stopped");
    assert!(out.stdout.contains(&needle), "`{needle}`:\n{}", out.show());
    assert_eq!(metric_steps(&run), (1..=n + 3).collect::<Vec<_>>());
    assert!(run.join("model.safetensors").is_file());
    assert_eq!(names(&work.join("runs")), ["a-old", "b-stopped"]);
    assert_unchanged(&old_files, &old, "resuming another run");
}

#[test]
fn a_second_signal_quits_at_once_with_exit_130() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let mut running = start_long_run(tmp.path(), &run, 2, &[]);
    let pid = running.pid();
    assert!(signal(pid, "-INT"), "kill -INT failed");
    // The race: the first signal is noticed within 50 ms (the watcher's poll), then the step ends
    // and the checkpoint is written, 20 to 60 ms in all on this job. A second signal 5 ms later
    // almost always lands before that and must end the process at once with 130; if the first
    // signal's checkpoint and exit won, the second `kill` finds no process (or a finished one) and
    // the run must look like a normal stop: exit 0 with a complete checkpoint.
    sleep(Duration::from_millis(5));
    signal(pid, "-INT");
    let out = running.wait(Duration::from_secs(5));
    assert!(!run.join("model.safetensors").exists(), "{}", out.show());
    let root = run.join("checkpoints");
    let mut complete = Vec::new();
    for name in names(&root) {
        let dir = root.join(&name);
        if name.starts_with("step-") {
            // A finished checkpoint is never half written: metadata and every checksum hold.
            assert!(dir.join("meta.json").is_file(), "{name} lacks meta.json");
            let inspect = shardtrain(tmp.path(), &["ckpt", "inspect", s(&dir)]);
            inspect.assert_success();
            complete.push(name);
        } else {
            assert!(
                name.starts_with(".partial-step-"),
                "unexpected {name} in {root:?}"
            );
        }
    }
    // Which side of the race this run took (shown with --nocapture or on failure).
    eprintln!("exit {:?}, finished checkpoints {complete:?}", out.code);
    match out.code {
        Some(130) => {
            assert!(!out.stdout.contains("stopped after step"), "{}", out.show());
            if complete.is_empty() {
                // Nothing to resume from, and the unfinished save is not taken for one.
                let inspect = shardtrain(tmp.path(), &["ckpt", "inspect", s(&run)]);
                assert_eq!(inspect.code, Some(2), "{}", inspect.show());
                assert!(
                    inspect.stderr.contains("no finished checkpoint"),
                    "{}",
                    inspect.show()
                );
            }
        }
        Some(0) => {
            let n = stopped_step(&out);
            assert_eq!(complete, [format!("step-{n:08}")], "{}", out.show());
        }
        _ => panic!(
            "expected exit 130 (or 0 after a finished stop):\n{}",
            out.show()
        ),
    }
}

#[test]
fn resume_errors_exit_with_their_code_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let run = work.join("run");
    // A finished run of 4 steps with checkpoints of steps 2 and 4.
    train(
        work,
        &run,
        &[
            "--set",
            "train.max_steps=4",
            "--set",
            "checkpoint.every_steps=2",
        ],
    )
    .assert_success();
    assert_eq!(
        names(&run.join("checkpoints")),
        ["step-00000002", "step-00000004"]
    );
    let empty = work.join("empty");
    std::fs::create_dir(&empty).unwrap();
    let other = work.join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("notes.txt"), "mine\n").unwrap();
    // A checkpoint outside any run directory.
    let loose = work.join("loose").join("step-00000004");
    std::fs::create_dir_all(&loose).unwrap();
    for f in ["meta.json", "rank-00000.safetensors"] {
        std::fs::copy(step_dir(&run, 4).join(f), loose.join(f)).unwrap();
    }
    let missing = work.join("nonexistent");
    let tiny = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/tiny.yaml");
    let before = snapshot(work);

    #[rustfmt::skip]
    let cases: &[(&[&str], i32, &[&str])] = &[
        // --config with --resume: a usage error that points to --set.
        (&["--resume", s(&run), "--config", tiny, "--set", "train.max_steps=10"], 2,
         &["--resume takes the config from the checkpoint", "--set"]),
        // The checkpoint already reached train.max_steps.
        (&["--resume", s(&run)], 2, &["is at step 4, train.max_steps is 4: nothing to do"]),
        (&["--resume", s(&run), "--set", "train.max_steps=3"], 2, &["nothing to do"]),
        // No such checkpoint: input to fix.
        (&["--resume", s(&missing), "--set", "train.max_steps=10"], 2,
         &[s(&missing), "no such checkpoint or run directory"]),
        // latest finds nothing in an empty run directory, nor in runs/ of the working directory.
        (&["--resume", "latest", "--run-dir", s(&empty), "--set", "train.max_steps=10"], 2,
         &["--resume latest: no checkpoint in", s(&empty)]),
        (&["--resume", "latest", "--set", "train.max_steps=10"], 2,
         &["--resume latest: no checkpoint in runs"]),
        // A checkpoint outside a run directory needs --run-dir.
        (&["--resume", s(&loose), "--set", "train.max_steps=10"], 2,
         &["is not inside a run directory"]),
        // Another run directory must be new or empty.
        (&["--resume", s(&run), "--run-dir", s(&other), "--set", "train.max_steps=10"], 2,
         &["already exists and is not empty"]),
        // Another model shape cannot continue this checkpoint: input to fix.
        (&["--resume", s(&run), "--set", "model.n_layer=3", "--set", "train.max_steps=10"], 2,
         &["a model of 3 units, this config's model has 4"]),
    ];
    for (args, code, needles) in cases {
        let mut all = vec!["train"];
        all.extend_from_slice(args);
        let out = shardtrain(work, &all);
        let what = format!("train {}", args.join(" "));
        assert_eq!(out.code, Some(*code), "{what}\n{}", out.show());
        for needle in *needles {
            assert!(
                out.stderr.contains(needle),
                "{what}: `{needle}`\n{}",
                out.show()
            );
        }
        assert!(!out.stderr.contains("panicked"), "{what}\n{}", out.show());
        assert!(!out.stdout.contains("resuming"), "{what}\n{}", out.show());
        assert_unchanged(&before, work, &what);
    }
}

#[test]
fn periodic_checkpoints_keep_the_last_two_and_always_the_final_step() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let out = train(
        tmp.path(),
        &run,
        &[
            "--set",
            "checkpoint.every_steps=2",
            "--set",
            "checkpoint.keep_last=2",
            "--set",
            "train.max_steps=7",
        ],
    );
    out.assert_success();
    assert!(out.stdout.contains("done: 7 steps"), "{}", out.show());
    // Steps 2, 4, 6 and the last step 7 were saved, each named with its path as it was written.
    for step in [2, 4, 6, 7] {
        let needle = format!(
            "checkpoint of step {step}: {}",
            step_dir(&run, step).display()
        );
        assert!(out.stdout.contains(&needle), "`{needle}`:\n{}", out.show());
    }
    assert_eq!(
        names(&run.join("checkpoints")),
        ["step-00000006", "step-00000007"],
        "keep_last=2 keeps the newest two, and no staging directory is left"
    );
    for step in [6, 7] {
        assert_eq!(
            names(&step_dir(&run, step)),
            ["meta.json", "rank-00000.safetensors"]
        );
    }
    assert!(run.join("model.safetensors").is_file());
    let sum = summary(&run);
    assert!(
        sum["checkpoint"]
            .as_str()
            .is_some_and(|p| p.ends_with("checkpoints/step-00000007")),
        "{sum}"
    );
    let inspect = shardtrain(tmp.path(), &["ckpt", "inspect", s(&run)]);
    inspect.assert_success();
    assert!(inspect.stdout.contains("step 7 |"), "{}", inspect.show());
}

#[test]
fn export_writes_once_and_init_from_starts_from_the_exported_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let trained = work.join("trained");
    // 40 steps at a higher learning rate: the loss falls from ~5.5 to ~2.9; the last step is also
    // checkpointed, so the checkpoint holds exactly the final weights.
    train(
        work,
        &trained,
        &[
            "--set",
            "train.max_steps=40",
            "--set",
            "train.lr=3e-3",
            "--set",
            "checkpoint.every_steps=40",
        ],
    )
    .assert_success();
    let trained_final = summary(&trained)["final_loss"].as_f64().unwrap();

    let hf = work.join("hf");
    let out = shardtrain(work, &["export", s(&trained), "-o", s(&hf)]);
    out.assert_success();
    assert!(
        out.stdout.contains("model.safetensors and config.json"),
        "{}",
        out.show()
    );
    assert_eq!(names(&hf), ["config.json", "model.safetensors"]);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    for (key, want) in [
        ("n_layer", 2),
        ("n_embd", 32),
        ("n_head", 2),
        ("vocab_size", 256),
    ] {
        assert_eq!(config[key].as_u64(), Some(want), "{key} in {config}");
    }
    let weights = std::fs::read(hf.join("model.safetensors")).unwrap();
    let config_text = std::fs::read(hf.join("config.json")).unwrap();

    // A second export into the same directory is refused and changes nothing.
    let again = shardtrain(work, &["export", s(&trained), "-o", s(&hf)]);
    assert_eq!(again.code, Some(1), "{}", again.show());
    assert!(again.stderr.contains("already exists"), "{}", again.show());
    assert!(
        again.stderr.contains("model.safetensors"),
        "{}",
        again.show()
    );
    assert_eq!(names(&hf), ["config.json", "model.safetensors"]);
    assert!(std::fs::read(hf.join("model.safetensors")).unwrap() == weights);
    assert_eq!(std::fs::read(hf.join("config.json")).unwrap(), config_text);

    // The checkpoint of the last step exports the same bytes.
    let from_ckpt = work.join("hf-ckpt");
    let ckpt = step_dir(&trained, 40);
    shardtrain(work, &["export", s(&ckpt), "-o", s(&from_ckpt)]).assert_success();
    assert!(
        std::fs::read(from_ckpt.join("model.safetensors")).unwrap() == weights,
        "the checkpoint's export differs from the final weights' export"
    );
    assert_eq!(
        std::fs::read(from_ckpt.join("config.json")).unwrap(),
        config_text
    );

    // One step from scratch and one from the exported weights (same seed, same first batch):
    // the first loss is the loss of the initial weights.
    let scratch = work.join("scratch");
    train(work, &scratch, &["--set", "train.max_steps=1"]).assert_success();
    let scratch_first = first_loss(&scratch);
    assert!(
        (scratch_first - 256f64.ln()).abs() < 0.3,
        "from scratch the loss starts near ln(256): {scratch_first}"
    );
    let init = work.join("init");
    let init_from = format!("model.init_from={}", s(&hf.join("model.safetensors")));
    train(
        work,
        &init,
        &["--set", "train.max_steps=1", "--set", &init_from],
    )
    .assert_success();
    let init_first = first_loss(&init);
    assert!(
        init_first < scratch_first - 0.5,
        "from the exported weights the first loss {init_first} is not well below {scratch_first}"
    );
    assert!(
        (init_first - trained_final).abs() < 0.5,
        "the first loss {init_first} is far from the trained run's last loss {trained_final}"
    );

    // Weights of another shape are refused before a run directory exists.
    let wrong = work.join("wrong-shape");
    let out = train(
        work,
        &wrong,
        &[
            "--set",
            "train.max_steps=1",
            "--set",
            "model.d_model=64",
            "--set",
            &init_from,
        ],
    );
    assert_eq!(out.code, Some(2), "{}", out.show());
    assert!(out.stderr.contains("wte.weight"), "{}", out.show());
    assert!(!wrong.exists(), "a run directory was created");
}

#[test]
fn init_from_a_missing_file_fails_naming_it_and_creates_no_run_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let missing = tmp.path().join("missing.safetensors");
    let init_from = format!("model.init_from={}", s(&missing));
    let out = train(
        tmp.path(),
        &run,
        &["--set", "train.max_steps=1", "--set", &init_from],
    );
    // A missing weights file is input to fix, as a bad config is: exit 2.
    assert_eq!(out.code, Some(2), "{}", out.show());
    assert!(out.stderr.contains("model.init_from"), "{}", out.show());
    assert!(out.stderr.contains(s(&missing)), "{}", out.show());
    assert!(!run.exists(), "a run directory was created");
    assert!(names(tmp.path()).is_empty(), "something was written");
}

#[test]
fn ckpt_inspect_names_a_damaged_or_truncated_file() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    // Two ranks, two files: the error must name the damaged one.
    train(
        tmp.path(),
        &run,
        &[
            "--world",
            "2",
            "--set",
            "train.max_steps=2",
            "--set",
            "checkpoint.every_steps=2",
        ],
    )
    .assert_success();
    let ckpt = step_dir(&run, 2);
    assert_eq!(
        names(&ckpt),
        [
            "meta.json",
            "rank-00000.safetensors",
            "rank-00001.safetensors"
        ]
    );
    shardtrain(tmp.path(), &["ckpt", "inspect", s(&run)]).assert_success();

    let file = ckpt.join("rank-00001.safetensors");
    let good = std::fs::read(&file).unwrap();
    let mut bad = good.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x40;
    std::fs::write(&file, &bad).unwrap();
    let out = shardtrain(tmp.path(), &["ckpt", "inspect", s(&run)]);
    assert_eq!(out.code, Some(2), "{}", out.show());
    assert!(out.stderr.contains("checksum"), "{}", out.show());
    assert!(
        out.stderr.contains("rank-00001.safetensors"),
        "{}",
        out.show()
    );
    assert!(out.stdout.is_empty(), "{}", out.show());

    // A truncated file is caught by its size.
    std::fs::write(&file, &good[..good.len() - 1]).unwrap();
    let out = shardtrain(tmp.path(), &["ckpt", "inspect", s(&ckpt)]);
    assert_eq!(out.code, Some(2), "{}", out.show());
    assert!(
        out.stderr.contains("rank-00001.safetensors"),
        "{}",
        out.show()
    );
    assert!(out.stderr.contains("truncated"), "{}", out.show());
}

// Guards a fixed bug: the run continued in DIR itself (metrics, checkpoints and weights in runs/).
#[test]
fn resume_latest_with_a_parent_dir_continues_the_run_it_found() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let run = runs.join("a");
    train(
        tmp.path(),
        &run,
        &[
            "--set",
            "train.max_steps=4",
            "--set",
            "checkpoint.every_steps=2",
        ],
    )
    .assert_success();
    let out = shardtrain(
        tmp.path(),
        &[
            "train",
            "--resume",
            "latest",
            "--run-dir",
            s(&runs),
            "--set",
            "train.max_steps=6",
        ],
    );
    out.assert_success();
    // The run found under runs/ continues in its own directory; nothing lands in runs/ itself.
    assert_eq!(names(&runs), ["a"], "{}", out.show());
    assert_eq!(metric_steps(&run), (1..=6).collect::<Vec<_>>());
    assert!(step_dir(&run, 6).join("meta.json").is_file());
}

// Guards a fixed bug: the steps after the checkpoint appeared twice in metrics.jsonl.
#[test]
fn resume_after_a_crash_rewinds_the_metrics_to_the_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    // Checkpoints every 5 steps; a crash (SIGKILL) after step 8 leaves metrics past the newest
    // checkpoint (step 5, or step 10 if the kill came later).
    let mut running = start_long_run(tmp.path(), &run, 8, &["--set", "checkpoint.every_steps=5"]);
    running.crash();
    let lines = metric_lines(&run) as u64;
    let target = lines + 2;
    let set_max = format!("train.max_steps={target}");
    let out = shardtrain(
        tmp.path(),
        &["train", "--resume", s(&run), "--set", &set_max],
    );
    out.assert_success();
    assert_eq!(
        metric_steps(&run),
        (1..=target).collect::<Vec<_>>(),
        "every step once, in order"
    );
}

// Guards a fixed bug: the earlier run's model.safetensors stayed, and `export RUN` (and `sample`)
// took it for the run's weights.
#[test]
fn a_resumed_and_stopped_run_exports_its_newest_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    train(
        tmp.path(),
        &run,
        &[
            "--set",
            "train.max_steps=4",
            "--set",
            "checkpoint.every_steps=4",
        ],
    )
    .assert_success();
    assert!(run.join("model.safetensors").is_file());
    // Continue it for (nearly) ever, then stop it.
    let args = [
        "train",
        "--resume",
        s(&run),
        "--set",
        "train.max_steps=100000",
    ];
    let mut running = Running::start(tmp.path(), &args);
    let deadline = Instant::now() + START_LIMIT;
    while metric_lines(&run) < 6 {
        if running.has_exited() || Instant::now() > deadline {
            running.fail("the resumed run did not train");
        }
        sleep(Duration::from_millis(10));
    }
    assert!(signal(running.pid(), "-INT"));
    let out = running.wait(STOP_LIMIT);
    out.assert_success();
    let n = stopped_step(&out);
    let from_run = tmp.path().join("from-run");
    let from_ckpt = tmp.path().join("from-ckpt");
    shardtrain(tmp.path(), &["export", s(&run), "-o", s(&from_run)]).assert_success();
    shardtrain(
        tmp.path(),
        &["export", s(&step_dir(&run, n)), "-o", s(&from_ckpt)],
    )
    .assert_success();
    assert!(
        std::fs::read(from_run.join("model.safetensors")).unwrap()
            == std::fs::read(from_ckpt.join("model.safetensors")).unwrap(),
        "`export RUN` exported the weights of step 4, not those of step {n}"
    );
}

#[test]
fn resume_with_run_dir_spelling_its_own_run_differently_continues_in_place() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    train(
        tmp.path(),
        &run,
        &[
            "--set",
            "train.max_steps=4",
            "--set",
            "checkpoint.every_steps=2",
        ],
    )
    .assert_success();
    // The checkpoint by its absolute path, the run directory relative to the working directory.
    let out = shardtrain(
        tmp.path(),
        &[
            "train",
            "--resume",
            s(&step_dir(&run, 4)),
            "--run-dir",
            "run",
            "--set",
            "train.max_steps=6",
        ],
    );
    out.assert_success();
    assert_eq!(metric_steps(&run), (1..=6).collect::<Vec<_>>());
}

#[test]
fn unparsable_checkpoint_metadata_is_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    train(
        tmp.path(),
        &run,
        &[
            "--set",
            "train.max_steps=2",
            "--set",
            "checkpoint.every_steps=2",
        ],
    )
    .assert_success();
    let ckpt = step_dir(&run, 2);
    std::fs::write(ckpt.join("meta.json"), "{ not json").unwrap();
    let out = shardtrain(tmp.path(), &["ckpt", "inspect", s(&ckpt)]);
    assert_eq!(out.code, Some(2), "{}", out.show());
    assert!(out.stderr.contains("meta.json"), "{}", out.show());
}
