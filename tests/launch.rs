//! `shardtrain launch` with CPU ranks as processes talking over loopback TCP: the job equals the
//! same job with ranks as threads, bit for bit; a rank that fails or hangs ends the job with a
//! message naming it and a non-zero exit; `--max-restarts` continues a failed job from its newest
//! checkpoint to the same result; Ctrl-C stops every rank with a checkpoint.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, RANKS_JOB as SMALL};

fn shardtrain(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shardtrain"));
    cmd.args(args).env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("the shardtrain binary runs")
}

fn launch(
    run: &Path,
    nproc: usize,
    extra: &[&str],
    launch_flags: &[&str],
    env: &[(&str, &str)],
) -> Output {
    let port = free_port().to_string();
    let nproc = nproc.to_string();
    let mut args = vec!["launch", "--nproc-per-node", &nproc, "--master-port", &port];
    args.extend_from_slice(launch_flags);
    args.extend_from_slice(&["--", "train", "--run-dir", run.to_str().unwrap()]);
    args.extend_from_slice(SMALL);
    args.extend_from_slice(extra);
    shardtrain(&args, env)
}

fn losses(run: &Path) -> Vec<f32> {
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    s["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

fn metric_losses(run: &Path) -> Vec<(u64, f32)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64().unwrap() as f32,
            )
        })
        .collect()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn two_processes_equal_two_threads_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    for strategy in ["full_shard", "hybrid_shard"] {
        let procs = tmp.path().join(format!("procs-{strategy}"));
        let set = format!("parallel.strategy={strategy}");
        let extra = [
            "--set",
            "train.max_steps=6",
            "--set",
            &set,
            "--set",
            "parallel.shard_group_size=1",
        ];
        let out = launch(&procs, 2, &extra, &[], &[]);
        assert!(
            out.status.success(),
            "{}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        let stdout = text(&out.stdout);
        assert!(stdout.contains("[rank 0] done: 6 steps"), "{stdout}");
        // The launcher drew a job token for its ranks: they authenticated each other.
        let stderr = text(&out.stderr);
        assert!(!stderr.contains("no job token"), "{stderr}");
        let threads = tmp.path().join(format!("threads-{strategy}"));
        let mut args = vec![
            "train",
            "--world",
            "2",
            "--run-dir",
            threads.to_str().unwrap(),
        ];
        args.extend_from_slice(SMALL);
        args.extend_from_slice(&extra);
        let out = shardtrain(&args, &[]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let (a, b) = (losses(&procs), losses(&threads));
        assert_eq!(a.len(), 6);
        assert_eq!(
            a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            b.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            "{strategy}"
        );
    }
}

#[test]
fn a_failing_rank_stops_the_job_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let start = Instant::now();
    let out = launch(
        &run,
        3,
        &[
            "--set",
            "train.max_steps=50",
            "--set",
            "train.global_batch_size=12",
            "--set",
            "parallel.collective_timeout_s=20",
        ],
        &["--grace-s", "5"],
        &[("SHARDTRAIN_FAULT", "fail:1:3")],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("launch: rank 1 failed (exit status 1)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("[rank 1] error: injected failure at step 3"),
        "{stderr}"
    );
    // The others stop because their collectives with rank 1 break, not after a timeout.
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn a_hung_rank_trips_the_collective_timeout_and_ends_the_job() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let start = Instant::now();
    let out = launch(
        &run,
        2,
        &[
            "--set",
            "train.max_steps=50",
            "--set",
            "parallel.collective_timeout_s=2",
        ],
        &["--grace-s", "2"],
        &[("SHARDTRAIN_FAULT", "hang:1:3")],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("rank 1 sent nothing within 2s"), "{stderr}");
    // The hung rank is the one named, on its victim's report (it never exits on its own).
    assert!(
        stderr.contains("launch: rank 1 failed (rank 0 failed because of it (exit status 3)"),
        "{stderr}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn a_restart_continues_from_the_checkpoint_to_the_uninterrupted_result() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = [
        "--set",
        "train.max_steps=8",
        "--set",
        "checkpoint.every_steps=2",
    ];
    let whole = tmp.path().join("whole");
    let out = launch(&whole, 2, &extra, &[], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let run = tmp.path().join("run");
    let out = launch(
        &run,
        2,
        &extra,
        &["--max-restarts", "1", "--grace-s", "5"],
        &[("SHARDTRAIN_FAULT", "fail:1:5")],
    );
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("launch: rank 1 failed"), "{stderr}");
    assert!(stderr.contains("launch: restart 1 of 1"), "{stderr}");
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("resuming") && stdout.contains("step-00000004"),
        "{stdout}"
    );
    // Every step once, with the losses of the run that never failed.
    assert_eq!(metric_losses(&run), metric_losses(&whole));
}

#[test]
fn ctrl_c_on_the_launcher_checkpoints_every_rank_and_exits_0() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let port = free_port().to_string();
    let mut args: Vec<String> = [
        "launch",
        "--nproc-per-node",
        "2",
        "--master-port",
        &port,
        "--",
        "train",
        "--run-dir",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(run.display().to_string());
    args.extend(SMALL.iter().map(|s| s.to_string()));
    args.extend(
        ["--set", "train.max_steps=100000"]
            .iter()
            .map(|s| s.to_string()),
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_shardtrain"))
        .args(&args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !run.join("metrics.jsonl").exists()
        || std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count()
            < 2
    {
        assert!(Instant::now() < deadline, "the job did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the job did not stop after SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
    let ckpts: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(ckpts.len(), 1, "{ckpts:?}");
    assert!(run
        .join("checkpoints")
        .join(&ckpts[0])
        .join("meta.json")
        .is_file());
    assert!(run
        .join("checkpoints")
        .join(&ckpts[0])
        .join("rank-00001.safetensors")
        .is_file());
}

#[test]
fn bench_comm_runs_under_the_launcher_and_with_threads() {
    let port = free_port().to_string();
    let out = shardtrain(
        &[
            "launch",
            "--nproc-per-node",
            "2",
            "--master-port",
            &port,
            "--",
            "bench",
            "comm",
            "--device",
            "cpu",
            "--max-bytes",
            "64K",
            "--iters",
            "2",
        ],
        &[],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("[rank 0] tcp (cpu), 2 ranks"), "{stdout}");
    for op in ["all_gather", "reduce_scatter", "all_reduce"] {
        // Rows: `[rank 0] SIZE OP TIME ALGBW BUSBW`.
        let rows = stdout
            .lines()
            .filter(|l| l.split_whitespace().nth(3) == Some(op))
            .count();
        assert_eq!(rows, 4, "{op} at 1K, 4K, 16K, 64K: {stdout}");
    }
    let out = shardtrain(
        &[
            "bench",
            "comm",
            "--device",
            "cpu",
            "--world",
            "3",
            "--max-bytes",
            "4K",
        ],
        &[],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("local (threads on cpu), 3 ranks"),
        "{stdout}"
    );
}

#[test]
fn min_nproc_continues_on_fewer_ranks_from_the_resharded_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = [
        "--set",
        "train.max_steps=8",
        "--set",
        "train.global_batch_size=24",
        "--set",
        "checkpoint.every_steps=2",
    ];
    let whole = tmp.path().join("whole");
    let out = launch(&whole, 3, &extra, &[], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let run = tmp.path().join("run");
    let out = launch(
        &run,
        3,
        &extra,
        &["--max-restarts", "1", "--min-nproc", "2", "--grace-s", "5"],
        &[("SHARDTRAIN_FAULT", "fail:2:5")],
    );
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "launch: continuing on 2 ranks without slot 2 (rank 2 ended with exit status 1)"
        ),
        "{stderr}"
    );
    let stdout = text(&out.stdout);
    assert!(stdout.contains("world 2 now"), "{stdout}");
    // Steps 1-4 ran on 3 ranks, 5-8 on 2 from the step-4 checkpoint: every step once, and the
    // losses of the 3-rank run that never failed (sharded = unsharded, to f32 rounding).
    let (a, b) = (metric_losses(&run), metric_losses(&whole));
    assert_eq!(a.len(), 8);
    for ((sa, la), (sb, lb)) in a.iter().zip(&b) {
        assert_eq!(sa, sb);
        assert!(
            (la - lb).abs() <= 1e-5 * lb.abs(),
            "step {sa}: {la} vs {lb}"
        );
    }
}
