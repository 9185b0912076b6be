//! Running the real `shardtrain` binary as a user would, for the command-line and fault tests:
//! its output captured in anonymous files (a pipe nobody reads could fill and stall a long run),
//! every wait with a deadline (a child that outlives it is killed and the test fails with what it
//! printed), and the run-directory views the tests compare (names, byte snapshots, metrics).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_shardtrain");

/// The longest any ordinary command of these tests may take (each takes well under a few seconds).
pub const COMMAND_LIMIT: Duration = Duration::from_secs(120);
/// How long a long run may take to write its first metrics lines.
pub const START_LIMIT: Duration = Duration::from_secs(60);

/// A small, fast job (about 20 ms a step on two cores). The warm-up is one step so that one-step
/// runs are valid; plain progress lines are rare so that the captured output stays small.
#[rustfmt::skip]
pub const QUICK: &[&str] = &[
    "--set", "device=cpu",
    "--set", "model.n_layer=2",
    "--set", "model.d_model=32",
    "--set", "model.n_head=2",
    "--set", "model.seq_len=32",
    "--set", "train.micro_batch_size=8",
    "--set", "train.global_batch_size=16",
    "--set", "train.warmup_steps=1",
    "--set", "train.eval_every=0",
    "--set", "logging.progress=plain",
    "--set", "logging.every_steps=1000",
];

/// What a finished command left behind.
pub struct Out {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn show(&self) -> String {
        format!(
            "exit {:?}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.code, self.stdout, self.stderr
        )
    }

    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(self.code, Some(code), "{}", self.show());
        self
    }

    pub fn assert_success(&self) -> &Self {
        self.assert_code(0)
    }
}

/// A running `shardtrain`. Dropping it kills the child if it still runs, so a failing test leaves
/// no process behind.
pub struct Running {
    child: Child,
    stdout: File,
    stderr: File,
    what: String,
}

fn contents(f: &File) -> String {
    let len = f.metadata().map_or(0, |m| m.len()) as usize;
    let mut buf = vec![0u8; len];
    // Positional reads leave the file offset, shared with the child, alone.
    f.read_exact_at(&mut buf, 0)
        .expect("reading captured output");
    String::from_utf8_lossy(&buf).into_owned()
}

impl Running {
    /// `shardtrain args` in the working directory `work` (quiet logs).
    pub fn start(work: &Path, args: &[&str]) -> Running {
        Running::start_with_env(work, args, &[])
    }

    /// [`Running::start`] with variables added to the environment.
    pub fn start_with_env(work: &Path, args: &[&str], env: &[(&str, &str)]) -> Running {
        let stdout = tempfile::tempfile().expect("a file for stdout");
        let stderr = tempfile::tempfile().expect("a file for stderr");
        let child = Command::new(BIN)
            .args(args)
            .current_dir(work)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout.try_clone().unwrap()))
            .stderr(Stdio::from(stderr.try_clone().unwrap()))
            .spawn()
            .expect("the shardtrain binary starts");
        Running {
            child,
            stdout,
            stderr,
            what: format!("shardtrain {}", args.join(" ")),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn has_exited(&mut self) -> bool {
        self.child.try_wait().expect("polling the child").is_some()
    }

    /// Kills the child (SIGKILL) and fails the test with what it printed.
    pub fn fail(&mut self, why: &str) -> ! {
        let _ = self.child.kill();
        let status = self.child.wait();
        panic!(
            "{why}: {}\nstatus {status:?}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.what,
            contents(&self.stdout),
            contents(&self.stderr)
        );
    }

    /// SIGKILL: a crash at an arbitrary point.
    pub fn crash(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaping the child");
    }

    /// Waits for the child to exit, at most `limit`; kills it and fails the test after that.
    pub fn wait(&mut self, limit: Duration) -> Out {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("polling the child") {
                return Out {
                    code: status.code(),
                    stdout: contents(&self.stdout),
                    stderr: contents(&self.stderr),
                };
            }
            if Instant::now() > deadline {
                self.fail(&format!("still running after {limit:?}"));
            }
            sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the run's metrics file has `lines` lines (it is training).
    pub fn wait_for_metrics(&mut self, run: &Path, lines: usize) {
        let deadline = Instant::now() + START_LIMIT;
        while metric_lines(run) < lines {
            if self.has_exited() {
                self.fail("the run ended before training");
            }
            if Instant::now() > deadline {
                self.fail(&format!(
                    "fewer than {lines} metrics lines after {START_LIMIT:?}"
                ));
            }
            sleep(Duration::from_millis(10));
        }
    }
}

impl Running {
    /// Waits until the child has printed `needle` on stdout.
    pub fn wait_for_stdout(&mut self, needle: &str) {
        let stdout = self.stdout.try_clone().unwrap();
        self.wait_until(needle, || contents(&stdout).contains(needle));
    }

    /// Waits until `done`, at most [`COMMAND_LIMIT`]; fails the test if the child exits first.
    pub fn wait_until(&mut self, what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + COMMAND_LIMIT;
        while !done() {
            if self.has_exited() {
                self.fail(&format!("it ended with no {what}"));
            }
            if Instant::now() > deadline {
                self.fail(&format!("no {what} after {COMMAND_LIMIT:?}"));
            }
            sleep(Duration::from_millis(5));
        }
    }

    /// SIGINT, as Ctrl-C at a terminal.
    pub fn interrupt(&self) {
        let sent = Command::new("kill")
            .args(["-INT", &self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "kill -INT failed");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

/// Complete lines of the metrics file (0 while it does not exist).
pub fn metric_lines(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |t| t.matches('\n').count())
}

/// The `step` of every metrics record, in file order.
pub fn metric_steps(run: &Path) -> Vec<u64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .expect("metrics.jsonl exists")
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON metrics line");
            v["step"].as_u64().expect("a step number")
        })
        .collect()
}

/// Names of the entries of `dir`, sorted (empty if it does not exist).
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Every file under `dir` with its bytes; directories count too, empty or not.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                out.insert(p.clone(), Vec::new());
                todo.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// Fails unless `dir` holds exactly the files and bytes of `before`.
pub fn assert_unchanged(before: &BTreeMap<PathBuf, Vec<u8>>, dir: &Path, what: &str) {
    let after = snapshot(dir);
    let keys = |m: &BTreeMap<PathBuf, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(before), keys(&after), "{what} changed the files");
    assert!(before == &after, "{what} changed a file's contents");
}
