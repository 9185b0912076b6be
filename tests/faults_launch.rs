//! Faults around `shardtrain launch` (issue 14, items 1 and 12): a rank that is stopped is the one
//! the launcher names, and the job ends soon after its peers' collective timeout, not after the
//! grace period as well; a launcher killed with SIGKILL takes its ranks with it, through the
//! ranks' normal stop path (a complete checkpoint), not by accident.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, RANKS_JOB};

/// Jobs that train until they are stopped.
const UNTIL_STOPPED: &[&str] = &["--set", "train.max_steps=1000000"];

/// A launcher and its ranks, killed (all of them) when the test ends however it ends.
struct Job {
    launcher: Child,
    ranks: Vec<u32>,
    stderr: PathBuf,
}

impl Drop for Job {
    fn drop(&mut self) {
        let _ = self.launcher.kill();
        let _ = self.launcher.wait();
        for &pid in &self.ranks {
            signal(pid, libc::SIGKILL);
        }
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid this test started.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// The fields of `/proc/PID/stat` after the command name: state, ppid, ...
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// Gone, or a zombie nobody reaped yet (the ranks of a dead launcher belong to init).
fn is_gone(pid: u32) -> bool {
    stat_fields(pid).is_none_or(|f| f[0] == "Z")
}

/// The rank each child process of `parent` was given, by its environment.
fn ranks_of(parent: u32) -> Vec<(usize, u32)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if stat_fields(pid).is_none_or(|f| f[1] != parent.to_string()) {
            continue;
        }
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let rank = environ
            .split(|&b| b == 0)
            .filter_map(|kv| std::str::from_utf8(kv).ok())
            .find_map(|kv| kv.strip_prefix("SHARDTRAIN_RANK="))
            .and_then(|r| r.parse().ok());
        if let Some(rank) = rank {
            found.push((rank, pid));
        }
    }
    found.sort();
    found
}

fn metric_lines(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |t| t.lines().count())
}

/// Starts `launch --nproc-per-node 2 [launch_flags] -- train ...` and waits until both ranks are
/// training (two steps in metrics.jsonl).
fn start(tmp: &Path, launch_flags: &[&str], extra: &[&str]) -> Job {
    let run = tmp.join("run");
    let stderr = tmp.join("launch.stderr");
    let port = free_port().to_string();
    let mut args = vec!["launch", "--nproc-per-node", "2", "--master-port", &port];
    args.extend_from_slice(launch_flags);
    args.extend_from_slice(&["--", "train", "--run-dir", run.to_str().unwrap()]);
    args.extend_from_slice(RANKS_JOB);
    args.extend_from_slice(UNTIL_STOPPED);
    args.extend_from_slice(extra);
    let launcher = Command::new(env!("CARGO_BIN_EXE_shardtrain"))
        .args(&args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let mut job = Job {
        launcher,
        ranks: Vec::new(),
        stderr,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric_lines(&run) < 2 {
        assert!(
            Instant::now() < deadline,
            "the job did not start: {}",
            std::fs::read_to_string(&job.stderr).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let ranks = ranks_of(job.launcher.id());
    assert_eq!(
        ranks.iter().map(|r| r.0).collect::<Vec<_>>(),
        [0, 1],
        "{ranks:?}"
    );
    job.ranks = ranks.into_iter().map(|r| r.1).collect();
    job
}

#[test]
fn a_stopped_rank_is_named_and_the_job_ends_without_waiting_out_the_grace_period() {
    let tmp = tempfile::tempdir().unwrap();
    // A grace period far longer than the test allows: waiting it out would fail the test.
    let mut job = start(
        tmp.path(),
        &["--grace-s", "120"],
        &["--set", "parallel.collective_timeout_s=3"],
    );
    signal(job.ranks[1], libc::SIGSTOP);
    let stopped_at = Instant::now();
    let status = loop {
        if let Some(s) = job.launcher.try_wait().unwrap() {
            break s;
        }
        assert!(
            stopped_at.elapsed() < Duration::from_secs(30),
            "the job did not end after its collective timeout"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = std::fs::read_to_string(&job.stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("launch: rank 1 failed (it was stopped (SIGSTOP or a debugger)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("rank 0 reports: ") && stderr.contains("rank 1 sent nothing within 3s"),
        "{stderr}"
    );
    assert!(!stderr.contains("launch: rank 0 failed"), "{stderr}");
    // The timeout, then moments: not the timeout plus the grace period.
    assert!(
        stopped_at.elapsed() < Duration::from_secs(15),
        "{:?}",
        stopped_at.elapsed()
    );
    assert!(job.ranks.iter().all(|&pid| is_gone(pid)));
}

#[test]
fn ranks_stop_through_their_stop_path_when_the_launcher_is_killed() {
    // Orphans are handed to the nearest subreaper: this test process, which can then see how
    // each rank ended.
    // SAFETY: prctl(2) on this process.
    assert_eq!(
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) },
        0
    );
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    // No periodic checkpoints: a checkpoint after the kill can only be the stop path's.
    let mut job = start(tmp.path(), &[], &["--set", "checkpoint.every_steps=0"]);
    signal(job.launcher.id(), libc::SIGKILL);
    let _ = job.launcher.wait();
    let killed_at = Instant::now();
    // Nothing of the launcher is left to stop them: only the parent-death signal can. (Their
    // output pipes lost their reader too, but these ranks print nothing while training, so a
    // write to a broken pipe is not what ends them.) A dying launcher's threads each send it, so
    // a rank that took the second for "quit at once" would exit 130 without a checkpoint.
    for &pid in &job.ranks {
        let status = loop {
            let mut status = 0;
            // SAFETY: waitpid(2) on a process reparented to this one.
            let got = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
            if got == pid as libc::pid_t {
                break status;
            }
            assert!(
                killed_at.elapsed() < Duration::from_secs(20),
                "rank pid {pid} outlived its launcher"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "rank pid {pid} ended with wait status {status:#x}"
        );
    }
    let checkpoints: Vec<PathBuf> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("step-")
        })
        .collect();
    assert_eq!(checkpoints.len(), 1, "{checkpoints:?}");
    let out = Command::new(env!("CARGO_BIN_EXE_shardtrain"))
        .args(["ckpt", "inspect", checkpoints[0].to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_rank_refused_its_input_is_not_restarted_and_the_run_directory_is_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    // Another job holds the run directory (its lock).
    let mut holder = Command::new(env!("CARGO_BIN_EXE_shardtrain"))
        .args(["train", "--run-dir", run.to_str().unwrap()])
        .args(RANKS_JOB)
        .args(UNTIL_STOPPED)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric_lines(&run) < 1 {
        assert!(Instant::now() < deadline, "the holder did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let port = free_port().to_string();
    let mut args = vec![
        "launch",
        "--nproc-per-node",
        "2",
        "--master-port",
        &port,
        "--max-restarts",
        "2",
        "--",
        "train",
        "--run-dir",
        run.to_str().unwrap(),
    ];
    args.extend_from_slice(RANKS_JOB);
    args.extend_from_slice(UNTIL_STOPPED);
    let out = Command::new(env!("CARGO_BIN_EXE_shardtrain"))
        .args(&args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let still_running = holder.try_wait().unwrap().is_none();
    let _ = holder.kill();
    let _ = holder.wait();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is in use by pid"), "{stderr}");
    assert!(
        stderr.contains("launch: not restarting: rank 0 was refused its input"),
        "{stderr}"
    );
    assert!(!stderr.contains("restart 1 of 2"), "{stderr}");
    // Nothing was set aside: the holder's directory is where it was, and it kept running.
    assert!(still_running);
    let names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["run"], "{names:?}");
}
