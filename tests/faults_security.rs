//! Only the job's own ranks get in: a hand-started rank 0 with a job token refuses an impostor at
//! the handshake (it learns nothing but a random challenge) and still completes the job with the
//! genuine rank 1; a rank with another token is refused; a bad token source is bad input (exit 2)
//! found before anything is written; a job without a token says so.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, RANKS_JOB};

const TOKEN: &str = "5f1c0ffee5f1c0ffee5f1c0ffee5f1c0ffee5f1c0ffee5f1c0ffee5f1c0ffee0";
const OTHER: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// `shardtrain train` as rank `rank` of 2 started by hand, with `token` (if any) in the
/// environment and rendezvous timeout `timeout_s`.
fn rank_command(
    rank: usize,
    port: u16,
    run: &Path,
    token: Option<&str>,
    timeout_s: u32,
) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shardtrain"));
    let (rank, port, timeout) = (
        rank.to_string(),
        port.to_string(),
        format!("parallel.collective_timeout_s={timeout_s}"),
    );
    cmd.args(["train", "--rank", &rank, "--world", "2"])
        .args(["--master-addr", "127.0.0.1", "--master-port", &port])
        .args(["--run-dir", run.to_str().unwrap(), "--set", &timeout])
        .args(RANKS_JOB)
        .args(["--set", "train.max_steps=2"])
        .env("RUST_LOG", "warn")
        .env_remove("SHARDTRAIN_JOB_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(token) = token {
        cmd.env("SHARDTRAIN_JOB_TOKEN", token);
    }
    cmd
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn both(out: &Output) -> String {
    format!("{}{}", text(&out.stdout), text(&out.stderr))
}

/// Connects to rank 0's rendezvous once it listens (it first makes the run directory).
fn connect(port: u16, rank0: &mut Child) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => return s,
            Err(e) => {
                assert!(
                    rank0.try_wait().unwrap().is_none(),
                    "rank 0 exited before it listened"
                );
                assert!(Instant::now() < deadline, "rank 0 never listened: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Everything the peer sends until it closes (a reset counts as the end: rank 0 closes with the
/// impostor's bytes unread).
fn read_all(s: &mut TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("reading from rank 0: {e}"),
        }
    }
}

#[test]
fn an_impostor_is_refused_at_the_handshake_and_the_genuine_rank_completes_the_job() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let port = free_port();
    let mut rank0 = rank_command(0, port, &run, Some(TOKEN), 60)
        .spawn()
        .unwrap();

    // The impostor of the issue: it plays rank 1 by echoing. It opens the handshake, then sends
    // rank 0's own challenge back as its proof.
    let mut impostor = connect(port, &mut rank0);
    impostor.write_all(b"st-auth1").unwrap();
    impostor.write_all(&[0x42; 32]).unwrap();
    let mut challenge = [0u8; 40];
    impostor.read_exact(&mut challenge).unwrap();
    impostor.write_all(&challenge[8..]).unwrap();
    let rest = read_all(&mut impostor);
    assert_eq!(&challenge[..8], b"st-auth1");
    assert_eq!(rest, b"", "after the challenge, the impostor got {rest:?}");
    // An impostor of the old protocol: a hello as rank 1, answered with nothing at all.
    let mut old = connect(port, &mut rank0);
    old.write_all(&frame(
        r#"{"magic":"shardtrain-rdzv-1","type":"hello","run_id":"default","world_size":2,
            "rank":1,"data_addr":"127.0.0.1:9","remaining_ms":60000}"#,
    ))
    .unwrap();
    assert_eq!(read_all(&mut old), b"");

    // The genuine rank 1, started after both: the job completes.
    let rank1 = rank_command(1, port, &run, Some(TOKEN), 60)
        .output()
        .unwrap();
    let rank0 = rank0.wait_with_output().unwrap();
    assert!(rank1.status.success(), "rank 1: {}", both(&rank1));
    assert!(rank0.status.success(), "rank 0: {}", both(&rank0));
    assert!(
        text(&rank0.stdout).contains("done: 2 steps"),
        "{}",
        both(&rank0)
    );
    // Rank 0 logged both refusals.
    let log = text(&rank0.stderr);
    assert!(
        log.contains("refused: its proof does not verify"),
        "rank 0's log: {log}"
    );
    assert!(
        log.contains("refused: it did not open the job-token handshake"),
        "rank 0's log: {log}"
    );
    assert!(!log.contains("no job token"), "{log}");
}

/// A frame of the rendezvous, written by hand.
fn frame(json: &str) -> Vec<u8> {
    let mut f = (json.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(json.as_bytes());
    f
}

#[test]
fn a_rank_with_the_wrong_token_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let port = free_port();
    let mut rank0 = rank_command(0, port, &run, Some(TOKEN), 3).spawn().unwrap();
    drop(connect(port, &mut rank0));
    let t = Instant::now();
    let rank1 = rank_command(1, port, &run, Some(OTHER), 3)
        .output()
        .unwrap();
    assert_eq!(rank1.status.code(), Some(1), "{}", both(&rank1));
    let e = text(&rank1.stderr);
    assert!(e.contains("refused this rank's job token"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // Rank 0 waited for the genuine rank 1 until its timeout, then said what it had refused.
    let rank0 = rank0.wait_with_output().unwrap();
    assert_eq!(rank0.status.code(), Some(1), "{}", both(&rank0));
    let e = text(&rank0.stderr);
    assert!(e.contains("rank 1 did not join within 3s"), "{e}");
    assert!(e.contains("refused: its proof does not verify"), "{e}");
}

#[test]
fn a_bad_token_source_is_bad_input_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let shared = tmp.path().join("token");
    std::fs::write(&shared, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o644)).unwrap();
    let port = free_port();
    let file = shared.to_str().unwrap();
    // A token file others can read: refused by a rank, and by `launch` before any rank starts.
    let out = rank_command(0, port, &run, None, 3)
        .args(["--job-token-file", file])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", both(&out));
    assert!(text(&out.stderr).contains(&format!("--job-token-file {file}")));
    assert!(text(&out.stderr).contains("chmod 600"), "{}", both(&out));
    assert!(!run.exists());
    let out = Command::new(env!("CARGO_BIN_EXE_shardtrain"))
        .args(["launch", "--nproc-per-node", "2", "--master-port"])
        .arg(port.to_string())
        .args(["--", "train", "--job-token-file", file, "--run-dir"])
        .arg(&run)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", both(&out));
    assert!(text(&out.stderr).contains("chmod 600"), "{}", both(&out));
    assert!(!text(&out.stdout).contains("[rank"), "a rank started");
    assert!(!run.exists());
    // A garbled token in the environment.
    let out = rank_command(0, port, &run, Some("not-a-token"), 3)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", both(&out));
    let e = text(&out.stderr);
    assert!(
        e.contains("SHARDTRAIN_JOB_TOKEN: the token is not hex"),
        "{e}"
    );
    assert!(!e.contains("not-a-token"), "the token leaked: {e}");
    assert!(!run.exists());
}

#[test]
fn a_job_without_a_token_is_warned_about() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let out = rank_command(0, free_port(), &run, None, 1)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    let e = text(&out.stderr);
    assert_eq!(e.matches("no job token").count(), 1, "{e}");
    assert!(e.contains("rank 0: no job token (SHARDTRAIN_JOB_TOKEN or --job-token-file)"));
}
