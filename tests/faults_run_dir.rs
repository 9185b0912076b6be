//! One writer per run directory, and no debris, running the real binary: two runs given one
//! `--run-dir` at once (one runs, the other exits 2 having written nothing), or one outside
//! `checkpoint.dir` (the same), a launched job (its rank 0 holds the lock for every rank), two
//! resumes in place of one run (the same), a lock left by a killed run (taken over, said so), a
//! save that fails (its staging directory goes with it), and what dead writers left (removed at
//! the next start, complete checkpoints untouched).
//!
//! Every test works in its own temporary directory, and every wait has a deadline: a child that
//! outlives it is killed and the test fails with what it printed.

mod common;

use std::path::Path;
use std::process::Command;

use common::cli::*;

/// The lock file of a run directory (`shardtrain::cli::run_lock::LOCK_FILE`).
const LOCK_FILE: &str = ".shardtrain.lock";

/// `train` with the quick job, `args` and `settings` (`key=value`, each after a `--set`).
fn train_args<'a>(args: &[&'a str], settings: &'a [String]) -> Vec<&'a str> {
    let mut v = vec!["train"];
    v.extend_from_slice(args);
    v.extend_from_slice(QUICK);
    for kv in settings {
        v.extend_from_slice(&["--set", kv]);
    }
    v
}

fn run_to_end(work: &Path, args: &[&str], env: &[(&str, &str)]) -> Out {
    Running::start_with_env(work, args, env).wait(COMMAND_LIMIT)
}

fn step_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Every entry of `run`'s checkpoint directory is a complete checkpoint (`ckpt inspect` verifies
/// each file's checksum): no staging directory, no step directory without its metadata.
fn assert_complete_checkpoints_only(work: &Path, run: &Path) -> Vec<String> {
    let root = run.join("checkpoints");
    let all = names(&root);
    for name in &all {
        assert!(
            name.starts_with("step-"),
            "{name} left in {root:?}: {all:?}"
        );
        let inspect = run_to_end(work, &["ckpt", "inspect", s(&root.join(name))], &[]);
        inspect.assert_code(0);
    }
    all
}

/// Exactly one of two outcomes is a success and the other a refusal (exit 2) naming why; returns
/// them as (winner, loser).
fn one_runs_one_refused(a: Out, b: Out) -> (Out, Out) {
    let (winner, loser) = if a.code == Some(0) { (a, b) } else { (b, a) };
    winner.assert_code(0);
    loser.assert_code(2);
    assert!(
        // "in use by pid P", or "by another process" if it looked before the holder recorded
        // itself; "not empty" if it looked after the holder had finished.
        loser.stderr.contains("is in use by") || loser.stderr.contains("is not empty"),
        "{}",
        loser.show()
    );
    (winner, loser)
}

#[test]
fn two_fresh_runs_given_one_run_dir_one_runs_and_the_other_exits_2_writing_nothing() {
    let tmp = tempfile::tempdir().unwrap();

    // Started together: whichever gets the directory runs, the other is refused.
    let run = tmp.path().join("together");
    let settings = ["train.max_steps=12".to_string()];
    let args = train_args(&["--run-dir", s(&run)], &settings);
    let mut a = Running::start_with_env(tmp.path(), &args, &[]);
    let mut b = Running::start_with_env(tmp.path(), &args, &[]);
    let (a, b) = (a.wait(COMMAND_LIMIT), b.wait(COMMAND_LIMIT));
    let (_, loser) = one_runs_one_refused(a, b);
    assert!(!loser.stdout.contains("run directory:"), "{}", loser.show());
    assert_eq!(
        metric_steps(&run),
        (1..=12).collect::<Vec<_>>(),
        "one writer's steps, once"
    );
    assert!(!run.join(LOCK_FILE).exists(), "the lock goes with the run");

    // While a run trains, a second one given its directory is told who holds it.
    let run = tmp.path().join("busy");
    let settings = ["train.max_steps=100000".to_string()];
    let mut long = Running::start_with_env(
        tmp.path(),
        &train_args(&["--run-dir", s(&run)], &settings),
        &[],
    );
    long.wait_for_metrics(&run, 1);
    let holder = format!("is in use by pid {}", long.pid());
    let settings = ["train.max_steps=3".to_string()];
    let second = run_to_end(
        tmp.path(),
        &train_args(&["--run-dir", s(&run)], &settings),
        &[],
    );
    second.assert_code(2);
    assert!(
        second.stderr.contains(&holder),
        "`{holder}`:\n{}",
        second.show()
    );
    long.crash();
    let steps = metric_steps(&run);
    assert_eq!(
        steps,
        (1..=steps.len() as u64).collect::<Vec<_>>(),
        "not interleaved"
    );
}

#[test]
fn two_runs_given_one_checkpoint_dir_one_runs_and_the_other_exits_2_creating_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let shared = tmp.path().join("ckpts");
    let (first, second) = (tmp.path().join("first"), tmp.path().join("second"));
    let settings = [
        "train.max_steps=100000".to_string(),
        format!("checkpoint.dir={}", shared.display()),
    ];
    let args = train_args(&["--run-dir", s(&first)], &settings);
    let mut long = Running::start_with_env(tmp.path(), &args, &[]);
    long.wait_for_metrics(&first, 1);
    // Short, so that without the lock it would end (and fail this test) quickly.
    let short = [
        "train.max_steps=3".to_string(),
        format!("checkpoint.dir={}", shared.display()),
    ];
    let out = run_to_end(
        tmp.path(),
        &train_args(&["--run-dir", s(&second)], &short),
        &[],
    );
    out.assert_code(2);
    let holder = format!(
        "checkpoint directory {} is in use by pid {}",
        shared.display(),
        long.pid()
    );
    assert!(out.stderr.contains(&holder), "`{holder}`:\n{}", out.show());
    assert!(!second.exists(), "the refused run made no run directory");
}

#[test]
fn a_launched_job_holds_its_run_dir_through_rank_0_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    // Long enough to outlast the checks below by far, short enough that ranks orphaned by a
    // failing test (dropping `job` kills only the launcher) end on their own within seconds.
    let settings = [
        "train.max_steps=500".to_string(),
        "checkpoint.every_steps=2".to_string(),
    ];
    let mut args = vec![
        "launch",
        "--nproc-per-node",
        "2",
        "--master-port",
        &port,
        "--",
    ];
    args.extend(train_args(&["--run-dir", s(&run)], &settings));
    let mut job = Running::start_with_env(tmp.path(), &args, &[]);
    // Both ranks train (rank 1 was not refused), their checkpoints staged and committed together.
    job.wait_for_metrics(&run, 3);
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join(LOCK_FILE)).unwrap()).unwrap();
    let holder = record["pid"].as_u64().unwrap();
    assert_ne!(
        holder,
        u64::from(job.pid()),
        "rank 0 holds it, not the launcher"
    );

    let short = ["train.max_steps=3".to_string()];
    let out = run_to_end(
        tmp.path(),
        &train_args(&["--run-dir", s(&run)], &short),
        &[],
    );
    out.assert_code(2);
    let said = format!("is in use by pid {holder}");
    assert!(out.stderr.contains(&said), "`{said}`:\n{}", out.show());

    // A stop (or, had it already ended, the end of the job): exit 0 either way.
    let _ = Command::new("kill")
        .args(["-INT", &job.pid().to_string()])
        .status();
    job.wait(COMMAND_LIMIT).assert_code(0);
    assert!(!run.join(LOCK_FILE).exists());
    let kept = assert_complete_checkpoints_only(tmp.path(), &run);
    assert!(!kept.is_empty());
}

#[test]
fn two_resumes_in_place_one_runs_and_the_other_exits_2_leaving_complete_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let settings = [
        "train.max_steps=4".to_string(),
        "checkpoint.every_steps=2".to_string(),
    ];
    run_to_end(
        tmp.path(),
        &train_args(&["--run-dir", s(&run)], &settings),
        &[],
    )
    .assert_code(0);

    let resume = [
        "train.max_steps=16".to_string(),
        "checkpoint.every_steps=2".to_string(),
    ];
    let args = train_args(&["--resume", s(&run)], &resume);
    let mut a = Running::start_with_env(tmp.path(), &args, &[]);
    let mut b = Running::start_with_env(tmp.path(), &args, &[]);
    let (a, b) = (a.wait(COMMAND_LIMIT), b.wait(COMMAND_LIMIT));
    let (winner, loser) = one_runs_one_refused(a, b);
    assert!(
        winner.stdout.contains("done: 12 steps"),
        "{}",
        winner.show()
    );
    assert!(!loser.stdout.contains("resuming"), "{}", loser.show());

    assert_eq!(metric_steps(&run), (1..=16).collect::<Vec<_>>());
    let kept = assert_complete_checkpoints_only(tmp.path(), &run);
    assert_eq!(kept, [step_name(14), step_name(16)], "keep_last 2");
    assert!(!run.join(LOCK_FILE).exists());
}

#[test]
fn a_lock_left_by_a_killed_run_is_taken_over_with_a_message() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let settings = [
        "train.max_steps=100000".to_string(),
        "checkpoint.every_steps=2".to_string(),
    ];
    let mut long = Running::start_with_env(
        tmp.path(),
        &train_args(&["--run-dir", s(&run)], &settings),
        &[],
    );
    long.wait_for_metrics(&run, 4);
    let pid = long.pid();
    long.crash();
    assert!(
        run.join(LOCK_FILE).is_file(),
        "SIGKILL leaves the lock file"
    );

    let target = format!("train.max_steps={}", metric_lines(&run) + 4);
    let out = run_to_end(
        tmp.path(),
        &train_args(&["--resume", s(&run)], &[target]),
        &[],
    );
    out.assert_code(0);
    let said = format!(
        "taking over the stale lock of run directory {}: pid {pid}",
        run.display()
    );
    assert!(out.stderr.contains(&said), "`{said}`:\n{}", out.show());
    assert!(!run.join(LOCK_FILE).exists());
    assert_complete_checkpoints_only(tmp.path(), &run);
}

#[test]
fn a_save_that_fails_leaves_no_staging_directory() {
    let tmp = tempfile::tempdir().unwrap();
    // Rank 0 fails writing, and (two ranks) rank 1 fails while rank 0 waits for it.
    for (world, fault) in [("1", "ckpt:0:4"), ("2", "ckpt:1:4")] {
        let run = tmp.path().join(format!("run-{world}"));
        let settings = [
            "train.max_steps=6".to_string(),
            "checkpoint.every_steps=2".to_string(),
        ];
        let args = train_args(&["--run-dir", s(&run), "--world", world], &settings);
        let out = run_to_end(tmp.path(), &args, &[("SHARDTRAIN_FAULT", fault)]);
        out.assert_code(1);
        assert!(out.stderr.contains("injected failure"), "{}", out.show());
        assert_eq!(
            names(&run.join("checkpoints")),
            [step_name(2)],
            "{}",
            out.show()
        );
        assert!(!run.join(LOCK_FILE).exists(), "{}", out.show());
        assert_complete_checkpoints_only(tmp.path(), &run);
    }
}

#[test]
fn debris_of_dead_writers_is_removed_at_the_next_start_and_checkpoints_are_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let settings = [
        "train.max_steps=4".to_string(),
        "checkpoint.every_steps=2".to_string(),
        "checkpoint.keep_last=3".to_string(),
    ];
    run_to_end(
        tmp.path(),
        &train_args(&["--run-dir", s(&run)], &settings),
        &[],
    )
    .assert_code(0);
    let root = run.join("checkpoints");
    let before = [
        snapshot(&root.join(step_name(2))),
        snapshot(&root.join(step_name(4))),
    ];

    // What writers that died leave: staging directories (this layout's and the older one), a step
    // directory without metadata, a weights file that never got its rename.
    let debris = [
        root.join(".partial-step-00000006-elsewhere-4242-0badc0de"),
        root.join(".partial-step-00000005"),
        root.join(step_name(7)),
        run.join("model.safetensors.partial"),
    ];
    for d in &debris[..2] {
        std::fs::create_dir(d).unwrap();
        std::fs::write(d.join("rank-00000.safetensors"), vec![7u8; 4096]).unwrap();
    }
    std::fs::create_dir(&debris[2]).unwrap();
    std::fs::write(&debris[3], b"half").unwrap();

    let resume = ["train.max_steps=5".to_string()];
    let out = run_to_end(
        tmp.path(),
        &train_args(&["--resume", s(&run)], &resume),
        &[],
    );
    out.assert_code(0);
    assert!(out
        .stdout
        .contains(&format!("resuming {}", root.join(step_name(4)).display())));
    for d in &debris {
        assert!(!d.exists(), "{d:?} was left:\n{}", out.show());
        let line = format!("removed {}", d.display());
        assert!(out.stderr.contains(&line), "`{line}`:\n{}", out.show());
    }
    let kept = assert_complete_checkpoints_only(tmp.path(), &run);
    assert_eq!(kept, [step_name(2), step_name(4), step_name(5)]);
    assert_eq!(
        snapshot(&root.join(step_name(2))),
        before[0],
        "step 2 untouched"
    );
    assert_eq!(
        snapshot(&root.join(step_name(4))),
        before[1],
        "step 4 untouched"
    );
}
