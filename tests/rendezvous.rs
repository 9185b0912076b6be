//! The rendezvous over TCP on 127.0.0.1: ranks as threads (and, once, as OS processes: this test
//! binary started again as a child), a free port per test, and every failure the module documents,
//! checked on every rank involved, each within the timeout and a second.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::Result;
use shardtrain::comm::auth::Key;
use shardtrain::comm::rendezvous::{rendezvous, Membership, RendezvousConfig};

/// A port nobody listens on now (bound to 0, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn config(port: u16, rank: usize, world_size: usize, timeout: Duration) -> RendezvousConfig {
    RendezvousConfig {
        master_addr: "127.0.0.1".into(),
        master_port: port,
        rank,
        world_size,
        run_id: "run-a".into(),
        timeout,
        key: None,
    }
}

/// The same with job token `key`.
fn keyed(port: u16, rank: usize, world_size: usize, key: &str) -> RendezvousConfig {
    RendezvousConfig {
        key: Some(Key::new(key.as_bytes().to_vec())),
        ..config(port, rank, world_size, LONG)
    }
}

fn data_addr(rank: usize) -> String {
    format!("10.0.0.{rank}:{}", 41000 + rank)
}

/// What rank 0 hands out: an NCCL-id-sized payload using every byte value.
fn nccl_id() -> Vec<u8> {
    (0..128u32).map(|i| (i * 37 % 256) as u8).collect()
}

type Outcome = (Result<Membership>, Duration);

/// Runs one rank on a thread (non-zero ranks pass a payload that must be ignored).
fn start(cfg: RendezvousConfig) -> JoinHandle<Outcome> {
    thread::spawn(move || {
        let t = Instant::now();
        let payload = if cfg.rank == 0 {
            nccl_id()
        } else {
            b"ignored".to_vec()
        };
        let r = rendezvous(&cfg, &data_addr(cfg.rank), &payload);
        (r, t.elapsed())
    })
}

fn finish(h: JoinHandle<Outcome>) -> Outcome {
    h.join().expect("a rank panicked")
}

/// The error of a rank that must fail, with how long it took.
fn error_of(h: JoinHandle<Outcome>) -> (String, Duration) {
    match finish(h) {
        (Err(e), t) => (format!("{e:#}"), t),
        (Ok(m), _) => panic!("expected a failure, got {m:?}"),
    }
}

fn check_success(outcomes: Vec<Outcome>, world: usize, limit: Duration) {
    let want: Vec<String> = (0..world).map(data_addr).collect();
    for (rank, (r, t)) in outcomes.into_iter().enumerate() {
        let m = r.unwrap_or_else(|e| panic!("rank {rank}: {e:#}"));
        assert_eq!(m.rank, rank);
        assert_eq!(m.world_size, world);
        assert_eq!(m.addrs, want, "rank {rank}");
        assert_eq!(m.payload, nccl_id(), "rank {rank}");
        assert!(t < limit, "rank {rank} took {t:?}");
    }
}

/// A frame of the protocol, written by hand: u32 LE length, then the JSON.
fn frame(json: &str) -> Vec<u8> {
    let mut f = (json.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(json.as_bytes());
    f
}

/// Reads one frame's JSON (rank 0's answer to a raw connection).
fn read_answer(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut body).unwrap();
    String::from_utf8(body).unwrap()
}

/// Connects a raw stream to rank 0, retrying while it starts.
fn raw_connect(port: u16) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => return s,
            Err(e) if Instant::now() > deadline => panic!("rank 0 never listened: {e}"),
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

const LONG: Duration = Duration::from_secs(10);

#[test]
fn four_ranks_get_the_same_table_and_payload() {
    let port = free_port();
    let t = Instant::now();
    let ranks: Vec<_> = (0..4).map(|r| start(config(port, r, 4, LONG))).collect();
    check_success(
        ranks.into_iter().map(finish).collect(),
        4,
        Duration::from_secs(2),
    );
    eprintln!("four ranks: {:?}", t.elapsed());
}

#[test]
fn one_rank_needs_nobody() {
    let m = rendezvous(&config(free_port(), 0, 1, LONG), "h:1", b"p").unwrap();
    assert_eq!(m.addrs, ["h:1"]);
    assert_eq!(m.payload, b"p");
}

#[test]
fn rank_0_may_start_last() {
    let port = free_port();
    let t = Instant::now();
    let mut ranks: Vec<_> = (1..4).map(|r| start(config(port, r, 4, LONG))).collect();
    thread::sleep(Duration::from_millis(700));
    ranks.insert(0, start(config(port, 0, 4, LONG)));
    check_success(
        ranks.into_iter().map(finish).collect(),
        4,
        Duration::from_secs(3),
    );
    eprintln!("rank 0 last: {:?}", t.elapsed());
}

#[test]
fn a_duplicate_rank_fails_everyone_who_joined() {
    let port = free_port();
    let r0 = start(config(port, 0, 3, LONG));
    let a = start(config(port, 1, 3, LONG));
    let b = start(config(port, 1, 3, LONG));
    let (e0, t0) = error_of(r0);
    assert!(e0.contains("rank 1 joined twice (from 127.0.0.1:"), "{e0}");
    assert!(t0 < Duration::from_secs(2), "{t0:?}");
    let core = e0.split_once(": ").unwrap().1;
    for h in [a, b] {
        let (e, _) = error_of(h);
        assert!(e.contains("rank 0 failed the rendezvous: "), "{e}");
        assert!(e.ends_with(core), "{e}");
    }
}

#[test]
fn a_different_world_size_is_named() {
    let port = free_port();
    let r0 = start(config(port, 0, 2, LONG));
    let r3 = start(config(port, 3, 4, LONG));
    let want = "rank 3 says WORLD_SIZE=4, rank 0 has 2";
    let (e0, t0) = error_of(r0);
    assert_eq!(e0, format!("rendezvous (rank 0 of 2): {want}"));
    let (e3, _) = error_of(r3);
    assert_eq!(
        e3,
        format!("rendezvous (rank 3 of 4): rank 0 failed the rendezvous: {want}")
    );
    assert!(t0 < Duration::from_secs(2), "{t0:?}");
}

#[test]
fn a_different_run_id_means_two_jobs_on_one_port() {
    let port = free_port();
    let r0 = start(RendezvousConfig {
        run_id: "y".into(),
        ..config(port, 0, 2, LONG)
    });
    let r1 = start(RendezvousConfig {
        run_id: "x".into(),
        ..config(port, 1, 2, LONG)
    });
    let want = format!(
        "rank 1 belongs to run `x`, this is run `y`: two jobs share MASTER_ADDR:MASTER_PORT \
         (127.0.0.1:{port})"
    );
    assert!(error_of(r0).0.ends_with(&want));
    assert!(error_of(r1)
        .0
        .ends_with(&format!("rank 0 failed the rendezvous: {want}")));
}

#[test]
fn a_rank_out_of_range_is_named_to_it() {
    let port = free_port();
    let r0 = start(config(port, 0, 2, LONG));
    let mut raw = raw_connect(port);
    raw.write_all(&frame(
        r#"{"magic":"shardtrain-rdzv-1","type":"hello","run_id":"run-a","world_size":2,
            "rank":5,"data_addr":"x:1","remaining_ms":5000}"#,
    ))
    .unwrap();
    let want = "rank 5 is out of range: WORLD_SIZE=2 has ranks 0..=1";
    let answer = read_answer(&mut raw);
    assert!(answer.contains(r#""type":"error""#), "{answer}");
    assert!(answer.contains(want), "{answer}");
    assert!(error_of(r0).0.ends_with(want));
}

#[test]
fn a_missing_rank_is_named_on_every_rank_that_came() {
    let port = free_port();
    let timeout = Duration::from_millis(1500);
    let r0 = start(config(port, 0, 3, timeout));
    let r1 = start(config(port, 1, 3, timeout));
    let want = "rank 2 did not join within 1.5s";
    for (rank, h) in [(0, r0), (1, r1)] {
        let (e, t) = error_of(h);
        assert!(e.ends_with(want), "rank {rank}: {e}");
        assert!(
            t >= Duration::from_millis(1400) && t < timeout + Duration::from_secs(1),
            "rank {rank} took {t:?}"
        );
        eprintln!("missing rank, rank {rank}: {t:?}: {e}");
    }
}

#[test]
fn several_missing_ranks_are_listed() {
    let port = free_port();
    let (e, _) = error_of(start(config(port, 0, 4, Duration::from_millis(300))));
    assert!(
        e.ends_with("ranks [1, 2, 3] did not join within 300ms"),
        "{e}"
    );
}

/// Rank 1 starts well before rank 0: the rendezvous ends at rank 1's deadline, so rank 1 still
/// learns which rank is missing instead of giving up blindly.
#[test]
fn the_earliest_deadline_of_a_joined_rank_ends_the_wait() {
    let port = free_port();
    let timeout = Duration::from_millis(1500);
    let r1 = start(config(port, 1, 3, timeout));
    thread::sleep(Duration::from_millis(800));
    let r0 = start(config(port, 0, 3, timeout));
    let (e1, t1) = error_of(r1);
    assert!(e1.ends_with("rank 2 did not join within 1.5s"), "{e1}");
    assert!(t1 < timeout + Duration::from_secs(1), "{t1:?}");
    let (e0, t0) = error_of(r0);
    assert!(e0.ends_with("rank 2 did not join within 1.5s"), "{e0}");
    assert!(t0 < Duration::from_millis(1200), "{t0:?}");
}

#[test]
fn rank_0_absent_is_unreachable() {
    let port = free_port();
    let (e, t) = error_of(start(config(port, 1, 2, Duration::from_secs(1))));
    assert!(
        e.contains(&format!(
            "could not reach rank 0 at 127.0.0.1:{port} within 1s (is it running? is the \
             address right?)"
        )),
        "{e}"
    );
    assert!(
        t >= Duration::from_secs(1) && t < Duration::from_secs(2),
        "{t:?}"
    );
    eprintln!("rank 0 absent: {t:?}: {e}");
}

#[test]
fn a_port_in_use_is_named() {
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let t = Instant::now();
    let e = rendezvous(&config(port, 0, 2, LONG), "h:1", &[])
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        format!(
            "rendezvous (rank 0 of 2): MASTER_PORT {port} on 127.0.0.1 is already in use \
             (another job? choose another MASTER_PORT)"
        )
    );
    assert!(t.elapsed() < Duration::from_millis(500));
}

#[test]
fn stray_connections_are_answered_and_ignored() {
    let port = free_port();
    let t = Instant::now();
    let r0 = start(config(port, 0, 3, LONG));
    // An HTTP probe, a frame of another protocol, one of another shardtrain version: each gets
    // an error answer saying why, and the rendezvous goes on.
    let strays: [&[u8]; 3] = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        &frame(r#"{"magic":"something-else","type":"hello"}"#),
        &frame(r#"{"magic":"shardtrain-rdzv-9","type":"hello","rank":1}"#),
    ];
    for (bytes, why) in strays.iter().zip([
        "announce a message of",
        "magic `something-else`",
        "another shardtrain version",
    ]) {
        let mut raw = raw_connect(port);
        raw.write_all(bytes).unwrap();
        let answer = read_answer(&mut raw);
        assert!(answer.contains("not a shardtrain rendezvous"), "{answer}");
        assert!(answer.contains(why), "{answer}");
        // Nothing about the job to a stranger.
        assert!(!answer.contains("run-a"), "{answer}");
    }
    // One that connects and closes at once.
    drop(raw_connect(port));
    // One that connects and says nothing, held open while the real ranks join.
    let _silent = raw_connect(port);
    let others: Vec<_> = (1..3).map(|r| start(config(port, r, 3, LONG))).collect();
    let mut outcomes = vec![finish(r0)];
    outcomes.extend(others.into_iter().map(finish));
    check_success(outcomes, 3, Duration::from_secs(2));
    eprintln!("strays: {:?}", t.elapsed());
}

#[test]
fn ignored_connections_are_reported_if_the_job_times_out() {
    let port = free_port();
    let r0 = start(config(port, 0, 2, Duration::from_secs(1)));
    let mut raw = raw_connect(port);
    raw.write_all(b"\x05\x00\x00\x00hello").unwrap();
    let (e, t) = error_of(r0);
    assert!(e.contains("rank 1 did not join within 1s"), "{e}");
    assert!(
        e.contains("ignored 1 connection(s): from 127.0.0.1:"),
        "{e}"
    );
    assert!(e.contains("not a shardtrain rendezvous (not JSON"), "{e}");
    assert!(t < Duration::from_secs(2), "{t:?}");
}

#[test]
fn ranks_with_one_token_join() {
    let port = free_port();
    let handles: Vec<_> = (0..3).map(|r| start(keyed(port, r, 3, "k1"))).collect();
    let outcomes = handles.into_iter().map(finish).collect();
    check_success(outcomes, 3, Duration::from_secs(3));
}

/// A rank with another token is refused at the handshake and fails at once, naming the cause;
/// rank 0 goes on waiting, and the genuine rank then joins.
#[test]
fn a_rank_with_another_token_is_refused_and_the_genuine_one_joins() {
    let port = free_port();
    let r0 = start(keyed(port, 0, 2, "right"));
    let (e, t) = error_of(start(keyed(port, 1, 2, "wrong")));
    assert!(e.contains("refused this rank's job token"), "{e}");
    assert!(t < Duration::from_secs(2), "{t:?}");
    let r1 = start(keyed(port, 1, 2, "right"));
    check_success(vec![finish(r0), finish(r1)], 2, Duration::from_secs(4));
}

/// One side with a token, the other without: both ways, the joining rank fails with a message
/// pointing at the token, and rank 0 (refusing it) goes on waiting until its own timeout.
#[test]
fn a_token_on_one_side_only_is_named() {
    let short = Duration::from_secs(2);
    let port = free_port();
    let r0 = start(RendezvousConfig {
        timeout: short,
        ..keyed(port, 0, 2, "k")
    });
    let (e, _) = error_of(start(config(port, 1, 2, short)));
    assert!(e.contains("require a job token this rank lacks"), "{e}");
    let (e, _) = error_of(r0);
    assert!(e.contains("rank 1 did not join within 2s"), "{e}");
    assert!(
        e.contains("refused: it did not open the job-token handshake"),
        "{e}"
    );

    let port = free_port();
    let r0 = start(config(port, 0, 2, short));
    let (e, _) = error_of(start(keyed(port, 1, 2, "k")));
    assert!(e.contains("did not answer the job-token handshake"), "{e}");
    assert!(e.contains("started without a job token"), "{e}");
    let (e, _) = error_of(r0);
    assert!(
        e.contains("it opens the job-token handshake: that end has a job token"),
        "{e}"
    );
}

/// An impostor that skips the handshake, or fakes it, gets nothing but the challenge.
#[test]
fn an_impostor_learns_nothing_from_a_rank_0_with_a_token() {
    let port = free_port();
    let r0 = start(RendezvousConfig {
        timeout: Duration::from_secs(2),
        ..keyed(port, 0, 2, "k")
    });
    // Everything until the end (a reset counts: rank 0 closes with the impostor's bytes unread).
    let read_all = |raw: &mut TcpStream| {
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            match raw.read(&mut buf) {
                Ok(0) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
                Err(e) => panic!("{e}"),
            }
        }
    };
    // An old-style hello: closed unanswered.
    let mut raw = raw_connect(port);
    raw.write_all(&frame(
        r#"{"magic":"shardtrain-rdzv-1","type":"hello","run_id":"run-a","world_size":2,
            "rank":1,"data_addr":"x:1","remaining_ms":10000}"#,
    ))
    .unwrap();
    assert_eq!(read_all(&mut raw), b"");
    // A faked handshake: the challenge (magic and a nonce), then the door closes.
    let mut raw = raw_connect(port);
    raw.write_all(b"st-auth1").unwrap();
    raw.write_all(&[7u8; 32]).unwrap();
    raw.write_all(&[0u8; 32]).unwrap();
    let got = read_all(&mut raw);
    assert_eq!(got.len(), 40, "{got:?}");
    assert_eq!(&got[..8], b"st-auth1");
    let (e, _) = error_of(r0);
    assert!(e.contains("ignored 2 connection(s)"), "{e}");
    assert!(e.contains("refused: its proof does not verify"), "{e}");
}

/// A rank that said hello and then died is missing again, and may join anew (no "joined twice").
#[test]
fn a_rank_that_disconnected_may_join_again() {
    let port = free_port();
    let r0 = start(config(port, 0, 3, LONG));
    let mut raw = raw_connect(port);
    raw.write_all(&frame(
        r#"{"magic":"shardtrain-rdzv-1","type":"hello","run_id":"run-a","world_size":3,
            "rank":1,"data_addr":"dead:1","remaining_ms":10000}"#,
    ))
    .unwrap();
    thread::sleep(Duration::from_millis(200));
    drop(raw);
    thread::sleep(Duration::from_millis(100));
    let r1 = start(config(port, 1, 3, LONG));
    thread::sleep(Duration::from_millis(200));
    let r2 = start(config(port, 2, 3, LONG));
    check_success(
        vec![finish(r0), finish(r1), finish(r2)],
        3,
        Duration::from_secs(3),
    );
}

/// Four OS processes: this test binary, started again with `SHARDTRAIN_RDZV_CHILD` set, runs only
/// this test, which then plays one rank and prints its outcome.
#[test]
fn four_os_processes() {
    if let Ok(spec) = std::env::var("SHARDTRAIN_RDZV_CHILD") {
        let [port, rank]: [usize; 2] = spec
            .split(',')
            .map(|x| x.parse().unwrap())
            .collect::<Vec<_>>()
            .try_into()
            .unwrap();
        let cfg = config(port as u16, rank, 4, LONG);
        match rendezvous(&cfg, &data_addr(rank), &nccl_id()) {
            Ok(m) => println!("RDZV-OK {} {:?} {:?}", m.rank, m.addrs, m.payload),
            Err(e) => println!("RDZV-ERR {e:#}"),
        }
        return;
    }
    let port = free_port();
    let t = Instant::now();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..4)
        .rev()
        .map(|rank| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "four_os_processes",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("SHARDTRAIN_RDZV_CHILD", format!("{port},{rank}"))
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let want_tail = format!(
        "{:?} {:?}",
        (0..4).map(data_addr).collect::<Vec<_>>(),
        nccl_id()
    );
    let mut ranks_seen = Vec::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let stdout = String::from_utf8(out.stdout).unwrap();
        // The harness prints `test four_os_processes ... ` before the child's line.
        let at = stdout
            .find("RDZV-")
            .unwrap_or_else(|| panic!("no outcome in {stdout:?}"));
        let line = stdout[at..].lines().next().unwrap();
        let (rank, tail) = line
            .strip_prefix("RDZV-OK ")
            .unwrap_or_else(|| panic!("{line}"))
            .split_once(' ')
            .unwrap();
        assert_eq!(tail, want_tail);
        ranks_seen.push(rank.parse::<usize>().unwrap());
    }
    ranks_seen.sort();
    assert_eq!(ranks_seen, [0, 1, 2, 3]);
    eprintln!("four processes: {:?}", t.elapsed());
}
