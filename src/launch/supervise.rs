//! `shardtrain launch`: starts one process per local rank with the environment of [`super::env`],
//! prefixes their output with the rank, forwards stop signals, and when a rank ends abnormally
//! stops the others and reports which rank it was and how it ended. With `--max-restarts K`, a
//! failed `train` job is started again from its newest checkpoint, up to K times.
//!
//! Children get their own process group, so a Ctrl-C at the terminal reaches them once, through
//! the launcher (which turns it into the trainer's "checkpoint and stop"); a second Ctrl-C kills
//! them at once.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::status::{Blame, StatusDir};
use crate::checkpoint::read::list_checkpoints;
use crate::comm::PeerFailed;
use crate::error::UsageError;

/// What `shardtrain launch` was asked to do.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    pub nproc_per_node: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    pub max_restarts: usize,
    /// On a restart after a failure, go on without the failed rank's slot (its GPU) while at
    /// least this many ranks remain; 0 keeps every slot.
    pub min_nproc: usize,
    /// The shardtrain command every rank runs, e.g. `train --config configs/tiny.yaml`.
    pub command: Vec<String>,
    /// How long ranks get to stop on their own before they are killed.
    pub grace: Duration,
}

/// How one attempt of the job ended.
#[derive(Debug)]
enum Outcome {
    Success,
    /// A rank ended abnormally: (rank, how, whether it refused its input with exit status 2).
    RankFailed(usize, String, bool),
    /// The user asked to stop (signals).
    Interrupted(u32),
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("signal {s}{}", signal_name(s)),
        _ => "an unknown status".to_string(),
    }
}

fn signal_name(s: i32) -> &'static str {
    match s {
        libc::SIGKILL => " (SIGKILL: killed, out of memory?)",
        libc::SIGSEGV => " (SIGSEGV)",
        libc::SIGABRT => " (SIGABRT)",
        libc::SIGTERM => " (SIGTERM)",
        libc::SIGINT => " (SIGINT)",
        _ => "",
    }
}

fn send_signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on a pid we spawned (and have not reaped) has no memory effects.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

/// The value of `--flag VALUE` or `--flag=VALUE` in `args`.
fn flag_value(args: &[String], flag: &str) -> Option<String> {
    let eq = format!("{flag}=");
    args.iter().enumerate().find_map(|(i, a)| {
        if a == flag {
            args.get(i + 1).cloned()
        } else {
            a.strip_prefix(&eq).map(str::to_string)
        }
    })
}

/// `args` without `--flag VALUE` / `--flag=VALUE`.
fn without_flag(args: &[String], flag: &str) -> Vec<String> {
    let eq = format!("{flag}=");
    let mut out = Vec::new();
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
        } else if a == flag {
            skip = true;
        } else if !a.starts_with(&eq) {
            out.push(a.clone());
        }
    }
    out
}

/// A `train` command gets an explicit run directory, so every rank and every restart agree on it.
fn with_run_dir(command: &[String]) -> (Vec<String>, Option<PathBuf>) {
    if command.first().map(String::as_str) != Some("train") {
        return (command.to_vec(), None);
    }
    if let Some(dir) = flag_value(command, "--run-dir") {
        return (command.to_vec(), Some(PathBuf::from(dir)));
    }
    if let Some(r) = flag_value(command, "--resume") {
        if r != "latest" {
            return (command.to_vec(), None);
        }
    }
    let name = flag_value(command, "--config")
        .and_then(|c| {
            Path::new(&c)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "tiny".to_string());
    let dir = crate::cli::run_dir::fresh_default(&name);
    let mut cmd = command.to_vec();
    cmd.push("--run-dir".into());
    cmd.push(dir.display().to_string());
    (cmd, Some(dir))
}

/// The command of a restart: resume from the newest checkpoint of `run_dir`, or start again from
/// scratch (the failed attempt's directory set aside) when there is none.
fn restart_command(command: &[String], run_dir: &Path, attempt: usize) -> Result<Vec<String>> {
    let has_checkpoint = !list_checkpoints(&run_dir.join("checkpoints"))?.is_empty();
    if has_checkpoint {
        let mut cmd = without_flag(&without_flag(command, "--config"), "--resume");
        cmd.push("--resume".into());
        cmd.push(run_dir.display().to_string());
        return Ok(cmd);
    }
    if run_dir.exists() {
        let aside = PathBuf::from(format!("{}.failed-{attempt}", run_dir.display()));
        std::fs::rename(run_dir, &aside)
            .with_context(|| format!("setting aside {}", run_dir.display()))?;
        eprintln!(
            "launch: no checkpoint yet: starting again from scratch ({} kept as {})",
            run_dir.display(),
            aside.display()
        );
    }
    Ok(command.to_vec())
}

/// Forwards each line of `from` to our stdout or stderr, prefixed with the rank.
fn relay(from: impl std::io::Read + Send + 'static, rank: usize, to_stderr: bool) {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            if to_stderr {
                let _ = writeln!(std::io::stderr().lock(), "[rank {rank}] {line}");
            } else {
                let _ = writeln!(std::io::stdout().lock(), "[rank {rank}] {line}");
            }
        }
    });
}

/// Runs the job, restarting it as allowed; returns the process exit code.
pub fn launch(opts: &LaunchOptions) -> Result<i32> {
    if opts.nproc_per_node == 0 || opts.nnodes == 0 {
        return Err(UsageError("--nproc-per-node and --nnodes must be at least 1".into()).into());
    }
    if opts.node_rank >= opts.nnodes {
        return Err(UsageError(format!(
            "--node-rank {} is not below --nnodes {}",
            opts.node_rank, opts.nnodes
        ))
        .into());
    }
    if opts.command.is_empty() {
        return Err(UsageError(
            "nothing to launch: give the command after `--`, e.g. `shardtrain launch \
             --nproc-per-node 2 -- train`"
                .into(),
        )
        .into());
    }
    if opts.max_restarts > 0 && opts.nnodes > 1 {
        return Err(UsageError(
            "--max-restarts works on one node (--nnodes 1) for now: with several nodes, restart \
             the job with `train --resume latest` on every node"
                .into(),
        )
        .into());
    }
    let signals = Arc::new(AtomicUsize::new(0));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let s = signals.clone();
        // SAFETY: the handler only increments an atomic counter.
        unsafe {
            signal_hook::low_level::register(sig, move || {
                s.fetch_add(1, Ordering::SeqCst);
            })
        }
        .context("installing the signal handler")?;
    }
    let (mut command, run_dir) = with_run_dir(&opts.command);
    let run_id = format!(
        "{:x}-{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    // Where ranks that fail because of another say which (see `super::status`).
    let status = StatusDir::create().context("creating the launcher's status directory")?;
    let mut attempt = 0;
    // The device slot (GPU ordinal) of each local rank; a restart may drop the failed one.
    let mut slots: Vec<usize> = (0..opts.nproc_per_node).collect();
    loop {
        status.clear();
        match run_attempt(opts, &slots, &command, &run_id, attempt, &signals, &status)? {
            Outcome::Success => return Ok(0),
            Outcome::Interrupted(n) => {
                return Ok(if n > 1 { 130 } else { 0 });
            }
            Outcome::RankFailed(rank, how, refused) => {
                eprintln!("launch: rank {rank} failed ({how}); the other ranks were stopped");
                if refused {
                    // Bad input (a config error, a run directory another job holds): starting
                    // again would be refused again, and setting the run directory aside for a
                    // fresh start would take it from the job that holds it.
                    if attempt < opts.max_restarts {
                        eprintln!("launch: not restarting: rank {rank} was refused its input");
                    }
                    return Ok(2);
                }
                if attempt >= opts.max_restarts {
                    if opts.max_restarts > 0 {
                        eprintln!("launch: no restarts left ({} used)", opts.max_restarts);
                    }
                    return Ok(1);
                }
                attempt += 1;
                let Some(dir) = &run_dir else {
                    bail!("launch: only `train` jobs can be restarted");
                };
                command = restart_command(&opts.command_with(dir), dir, attempt)?;
                if opts.min_nproc > 0 && slots.len() > opts.min_nproc.max(1) {
                    let local = rank - opts.node_rank * slots.len();
                    let lost = slots.remove(local.min(slots.len() - 1));
                    eprintln!(
                        "launch: continuing on {} ranks without slot {lost} (rank {rank} ended with \
                         {how}); the checkpoint reshards to the new world size",
                        slots.len()
                    );
                }
                eprintln!(
                    "launch: restart {attempt} of {}: {}",
                    opts.max_restarts,
                    command.join(" ")
                );
            }
        }
    }
}

impl LaunchOptions {
    /// The original command with the run directory made explicit.
    fn command_with(&self, run_dir: &Path) -> Vec<String> {
        let mut cmd = without_flag(&self.command, "--run-dir");
        cmd.push("--run-dir".into());
        cmd.push(run_dir.display().to_string());
        cmd
    }
}

/// Starts every local rank and supervises them until all succeed, one fails, or a signal.
fn run_attempt(
    opts: &LaunchOptions,
    slots: &[usize],
    command: &[String],
    run_id: &str,
    attempt: usize,
    signals: &AtomicUsize,
    status: &StatusDir,
) -> Result<Outcome> {
    let exe = std::env::current_exe().context("finding the shardtrain executable")?;
    let nproc = slots.len();
    let world = nproc * opts.nnodes;
    // A fresh job token per attempt for the ranks to authenticate each other, unless they have
    // one already (see `super::token`).
    let token_file = flag_value(command, super::token::FILE_FLAG);
    let token =
        super::token::for_launched_ranks(token_file.as_deref().map(Path::new), opts.nnodes)?;
    let mut children: Vec<(usize, Child)> = Vec::new();
    for (local, slot) in slots.iter().enumerate() {
        let rank = opts.node_rank * nproc + local;
        let mut cmd = Command::new(&exe);
        cmd.args(command)
            .env("SHARDTRAIN_RANK", rank.to_string())
            .env("SHARDTRAIN_WORLD_SIZE", world.to_string())
            .env("SHARDTRAIN_LOCAL_RANK", local.to_string())
            .env("SHARDTRAIN_LOCAL_WORLD_SIZE", nproc.to_string())
            .env("SHARDTRAIN_DEVICE_ORDINAL", slot.to_string())
            .env("MASTER_ADDR", &opts.master_addr)
            .env("MASTER_PORT", opts.master_port.to_string())
            .env("SHARDTRAIN_RUN_ID", format!("{run_id}-{attempt}"))
            .env(super::status::DIR_VAR, status.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some(token) = &token {
            cmd.env(super::token::ENV_VAR, token);
        }
        // Spawned from this (the main) thread, which lives as long as the job.
        super::parent::tie_to_launcher(&mut cmd);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting rank {rank} ({})", exe.display()))?;
        if let Some(out) = child.stdout.take() {
            relay(out, rank, false);
        }
        if let Some(err) = child.stderr.take() {
            relay(err, rank, true);
        }
        children.push((rank, child));
    }
    let mut forwarded = 0;
    // Every rank that ended abnormally, in the order seen.
    let mut failures: Vec<Failure> = Vec::new();
    // Ranks found stopped (SIGSTOP, a debugger) once the job was failing.
    let mut stopped: Vec<bool> = vec![false; children.len()];
    // After a failure: when the survivors get SIGKILL, and whether they had their SIGTERM.
    let mut stopping: Option<(Instant, bool)> = None;
    let mut running: Vec<bool> = vec![true; children.len()];
    let signal_running = |children: &[(usize, Child)], running: &[bool], sig: i32| {
        for (i, (_, c)) in children.iter().enumerate() {
            if running[i] {
                send_signal(c, sig);
            }
        }
    };
    loop {
        let seen = signals.load(Ordering::SeqCst);
        if seen > forwarded {
            forwarded = seen;
            // The first signal asks for a checkpoint and a clean stop; the next ones kill.
            let sig = if seen == 1 {
                libc::SIGINT
            } else {
                libc::SIGKILL
            };
            signal_running(&children, &running, sig);
        }
        for (i, (rank, c)) in children.iter_mut().enumerate() {
            if !running[i] {
                continue;
            }
            if let Some(status) = c.try_wait()? {
                running[i] = false;
                if !status.success() {
                    // Killed by a signal we sent: a consequence, not a cause.
                    let ours = status.signal().is_some()
                        && (forwarded > 0 || stopping.is_some_and(|(_, termed)| termed));
                    failures.push(Failure {
                        rank: *rank,
                        status,
                        after_our_signal: ours,
                        was_stopped: stopped[i],
                    });
                    if stopping.is_none() {
                        stopping = Some((Instant::now() + opts.grace, false));
                    }
                }
            }
        }
        if stopping.is_some() {
            // A stopped rank cannot act on SIGTERM and would hold the job for the whole grace
            // period; it is also, most likely, why the others failed.
            for (i, (_, c)) in children.iter().enumerate() {
                if running[i] && !stopped[i] && is_stopped(c.id()) {
                    stopped[i] = true;
                    send_signal(c, libc::SIGKILL);
                }
            }
        }
        if let Some((kill_at, termed)) = &mut stopping {
            // The survivors usually fail on their own (their collectives with the dead rank
            // break); SIGTERM asks the rest to stop, SIGKILL ends whoever is left.
            if !*termed {
                signal_running(&children, &running, libc::SIGTERM);
                *termed = true;
            } else if Instant::now() >= *kill_at {
                signal_running(&children, &running, libc::SIGKILL);
            }
        }
        if running.iter().all(|r| !r) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Let the relay threads print the last lines.
    std::thread::sleep(Duration::from_millis(100));
    let reports: Vec<Blame> = failures
        .iter()
        .filter_map(|f| status.read(f.rank))
        .collect();
    Ok(match root_cause(&failures, &reports) {
        Some(_) if forwarded > 1 => Outcome::Interrupted(forwarded as u32),
        Some((rank, how)) => {
            let refused = failures
                .iter()
                .any(|f| f.rank == rank && !f.after_our_signal && f.status.code() == Some(2));
            Outcome::RankFailed(rank, how, refused)
        }
        None if forwarded > 0 => Outcome::Interrupted(forwarded as u32),
        None => Outcome::Success,
    })
}

/// One rank that ended abnormally.
#[derive(Debug, Clone, Copy)]
struct Failure {
    rank: usize,
    status: ExitStatus,
    /// Killed by a signal the launcher sent: a consequence, not a cause.
    after_our_signal: bool,
    /// Found stopped (and then killed) while the job was failing.
    was_stopped: bool,
}

/// Whether process `pid` is stopped (state `T`, or `t` under a tracer), from `/proc/PID/stat`.
fn is_stopped(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // `pid (comm) state ...`: comm may hold spaces and parentheses, the state follows the last ')'.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| state == "T" || state == "t")
}

/// The rank to blame among those that ended abnormally, and how:
/// 1. the first that failed on its own (not with [`PeerFailed::EXIT_CODE`], "another rank
///    failed", not after the launcher's own stop signal);
/// 2. else the first found stopped, which could not answer its peers;
/// 3. else the rank a victim's report (`super::status`) blames: a rank stuck in a loop, or one
///    on another node;
/// 4. else the first one seen.
fn root_cause(failures: &[Failure], reports: &[Blame]) -> Option<(usize, String)> {
    let report_on = |rank: usize| {
        reports
            .iter()
            .find(|r| r.blames == rank && r.rank != rank)
            .map(|r| format!("rank {} reports: {}", r.rank, r.reason))
    };
    let own = failures.iter().find(|f| {
        !f.after_our_signal
            && !f.was_stopped
            && f.status.code() != Some(i32::from(PeerFailed::EXIT_CODE))
    });
    if let Some(f) = own {
        return Some((f.rank, describe(f.status)));
    }
    if let Some(f) = failures.iter().find(|f| f.was_stopped) {
        let mut how =
            "it was stopped (SIGSTOP or a debugger) and could not answer; killed".to_string();
        if let Some(report) = report_on(f.rank) {
            how = format!("{how}; {report}");
        }
        return Some((f.rank, how));
    }
    if let Some(r) = reports.iter().find(|r| r.blames != r.rank) {
        let victim = failures.iter().find(|f| f.rank == r.rank);
        let how = match victim {
            Some(v) => format!(
                "rank {} failed because of it ({}): {}",
                r.rank,
                describe(v.status),
                r.reason
            ),
            None => format!("rank {} reports: {}", r.rank, r.reason),
        };
        return Some((r.blames, how));
    }
    failures.first().map(|f| (f.rank, describe(f.status)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exited(code: i32) -> ExitStatus {
        ExitStatus::from_raw(code << 8)
    }

    fn failure(rank: usize, status: ExitStatus, after_our_signal: bool) -> Failure {
        Failure {
            rank,
            status,
            after_our_signal,
            was_stopped: false,
        }
    }

    fn blame(rank: usize, blames: usize) -> Blame {
        Blame {
            rank,
            blames,
            reason: format!("all_reduce: rank {blames} sent nothing within 2s"),
        }
    }

    #[test]
    fn the_cause_is_who_failed_on_its_own_then_who_was_stopped_then_who_is_blamed() {
        let victim = failure(0, exited(3), false);
        let killed = failure(1, ExitStatus::from_raw(libc::SIGKILL), true);
        // A rank that failed on its own is the cause, whatever the others report.
        let own = failure(2, exited(1), false);
        let (rank, how) = root_cause(&[victim, own, killed], &[blame(0, 1)]).unwrap();
        assert_eq!((rank, how.as_str()), (2, "exit status 1"));
        // A rank found stopped is the cause, with its victim's account.
        let stopped = Failure {
            was_stopped: true,
            ..killed
        };
        let (rank, how) = root_cause(&[victim, stopped], &[blame(0, 1)]).unwrap();
        assert_eq!(rank, 1);
        assert!(how.starts_with("it was stopped"), "{how}");
        assert!(
            how.contains("rank 0 reports: all_reduce: rank 1 sent nothing"),
            "{how}"
        );
        // A rank stuck in a loop, killed by the launcher, is named by its victim's report...
        let (rank, how) = root_cause(&[victim, killed], &[blame(0, 1)]).unwrap();
        assert_eq!(rank, 1);
        assert!(
            how.starts_with("rank 0 failed because of it (exit status 3)"),
            "{how}"
        );
        // ...also when it runs on another node, out of this launcher's sight.
        let (rank, _) = root_cause(&[victim], &[blame(0, 7)]).unwrap();
        assert_eq!(rank, 7);
        // With nothing to go on, the first rank seen; with no failure, none.
        assert_eq!(root_cause(&[victim, killed], &[]).unwrap().0, 0);
        assert_eq!(root_cause(&[], &[]), None);
    }

    #[test]
    fn a_stopped_process_is_seen_as_stopped() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        assert!(!is_stopped(child.id()));
        send_signal(&child, libc::SIGSTOP);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !is_stopped(child.id()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(is_stopped(child.id()));
        send_signal(&child, libc::SIGKILL);
        child.wait().unwrap();
        assert!(!is_stopped(child.id()));
    }

    fn v(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn flags_are_found_and_removed_in_both_spellings() {
        let a = v(&["train", "--config", "c.yaml", "--run-dir=r", "--set", "x=1"]);
        assert_eq!(flag_value(&a, "--config").as_deref(), Some("c.yaml"));
        assert_eq!(flag_value(&a, "--run-dir").as_deref(), Some("r"));
        assert_eq!(
            without_flag(&without_flag(&a, "--config"), "--run-dir"),
            v(&["train", "--set", "x=1"])
        );
    }

    #[test]
    fn a_train_command_gets_one_run_directory() {
        let (cmd, dir) = with_run_dir(&v(&["train", "--config", "configs/gpt2-124m.yaml"]));
        let dir = dir.unwrap();
        assert!(dir.starts_with("runs") && dir.to_string_lossy().contains("gpt2-124m"));
        assert_eq!(
            flag_value(&cmd, "--run-dir"),
            Some(dir.display().to_string())
        );
        let (cmd, dir) = with_run_dir(&v(&["check", "--device", "cpu"]));
        assert_eq!((cmd, dir), (v(&["check", "--device", "cpu"]), None));
    }

    #[test]
    fn a_restart_resumes_from_the_newest_checkpoint_or_starts_again() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        std::fs::create_dir_all(run.join("checkpoints/step-00000004")).unwrap();
        std::fs::write(run.join("checkpoints/step-00000004/meta.json"), "{}").unwrap();
        let cmd = v(&[
            "train",
            "--config",
            "c.yaml",
            "--set",
            "a=1",
            "--run-dir",
            "R",
        ]);
        let r = restart_command(&cmd, &run, 1).unwrap();
        assert_eq!(flag_value(&r, "--config"), None);
        assert_eq!(flag_value(&r, "--resume"), Some(run.display().to_string()));
        assert!(r.contains(&"a=1".to_string()));

        let fresh = tmp.path().join("fresh");
        std::fs::create_dir_all(&fresh).unwrap();
        std::fs::write(fresh.join("metrics.jsonl"), "").unwrap();
        let r = restart_command(&cmd, &fresh, 2).unwrap();
        assert_eq!(r, cmd);
        assert!(!fresh.exists());
        assert!(tmp.path().join("fresh.failed-2/metrics.jsonl").exists());
    }
}
