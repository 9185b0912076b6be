//! The `tcp` transport against the `local` one: the same collectives on the same data give the same
//! bits (world sizes 1-4, f32 and bf16, sub-groups), and a rank that dies, hangs or calls another
//! collective makes its peers fail with a message naming it, never hang.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shardtrain::backend::cpu::CpuBackend;
use shardtrain::backend::{Backend, DType};
use shardtrain::comm::auth::Key;
use shardtrain::comm::local::{run_ranks, LocalWorld};
use shardtrain::comm::tcp::TcpWorld;
use shardtrain::comm::{Communicator, ReduceOp};

/// `n` ranks' meshes on loopback, built by `n` threads at once.
fn mesh(n: usize, timeout: Duration) -> Vec<Arc<TcpWorld>> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(r, l)| {
                let addrs = &addrs;
                s.spawn(move || Arc::new(TcpWorld::connect(r, addrs, l, timeout, None).unwrap()))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn data(rank: usize, len: usize) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(rank as u64 * 7 + len as u64);
    (0..len).map(|_| rng.random_range(-2.0f32..2.0)).collect()
}

/// Every collective on every rank; returns each rank's outputs, in a fixed order.
fn run_all<C: Communicator>(comm: &C, rank: usize, n: usize, dtype: DType) -> Vec<Vec<f32>> {
    let be = CpuBackend::<f32>::new();
    let len = 5;
    let up = |v: &[f32]| {
        let b = be.alloc(v.len(), dtype).unwrap();
        be.upload(&b, v).unwrap();
        b
    };
    let mut outs = Vec::new();
    let shard = up(&data(rank, len));
    let gathered = be.alloc(len * n, dtype).unwrap();
    comm.all_gather(&be, &gathered, &shard).unwrap();
    outs.push(be.download(&gathered).unwrap());
    for op in [ReduceOp::Sum, ReduceOp::Avg] {
        let full = up(&data(rank + 10, len * n));
        let piece = be.alloc(len, dtype).unwrap();
        comm.reduce_scatter(&be, &piece, &full, op).unwrap();
        outs.push(be.download(&piece).unwrap());
        let buf = up(&data(rank + 20, 7));
        comm.all_reduce(&be, &buf, op).unwrap();
        outs.push(be.download(&buf).unwrap());
    }
    let b = up(&data(rank + 30, 3));
    comm.broadcast(&be, &b, n - 1).unwrap();
    outs.push(be.download(&b).unwrap());
    comm.barrier().unwrap();
    outs
}

fn bits(v: &[Vec<f32>]) -> Vec<Vec<u32>> {
    v.iter()
        .map(|x| x.iter().map(|f| f.to_bits()).collect())
        .collect()
}

#[test]
fn tcp_collectives_equal_local_ones_bit_for_bit() {
    for n in 1..=4 {
        for dtype in [DType::F32, DType::Bf16] {
            let worlds = mesh(n, Duration::from_secs(10));
            let tcp: Vec<Vec<Vec<f32>>> = std::thread::scope(|s| {
                let hs: Vec<_> = worlds
                    .iter()
                    .enumerate()
                    .map(|(r, w)| {
                        s.spawn(move || {
                            let comm = w.group(&(0..n).collect::<Vec<_>>()).unwrap();
                            run_all(&comm, r, n, dtype)
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let world = LocalWorld::new(n, Duration::from_secs(10));
            let comms: Vec<_> = world
                .group(&(0..n).collect::<Vec<_>>())
                .into_iter()
                .map(|c| std::sync::Mutex::new(Some(c)))
                .collect();
            let local = run_ranks(&world, |r, _| {
                let comm = comms[r].lock().unwrap().take().unwrap();
                Ok(run_all(&comm, r, n, dtype))
            })
            .unwrap();
            for r in 0..n {
                assert_eq!(bits(&tcp[r]), bits(&local[r]), "world {n} {dtype} rank {r}");
            }
        }
    }
}

#[test]
fn groups_over_one_mesh_reduce_only_their_members() {
    let worlds = mesh(4, Duration::from_secs(10));
    let sums: Vec<(f32, f32)> = std::thread::scope(|s| {
        let hs: Vec<_> = worlds
            .iter()
            .enumerate()
            .map(|(r, w)| {
                s.spawn(move || {
                    let be = CpuBackend::<f32>::new();
                    // Shard groups {0,1},{2,3}; replica groups {0,2},{1,3}, used interleaved.
                    let shard = w.group(&[r / 2 * 2, r / 2 * 2 + 1]).unwrap();
                    let replica = w.group(&[r % 2, r % 2 + 2]).unwrap();
                    let a = be.alloc(1, DType::F32).unwrap();
                    be.upload(&a, &[r as f32 + 1.0]).unwrap();
                    shard.all_reduce(&be, &a, ReduceOp::Sum).unwrap();
                    let b = be.alloc(1, DType::F32).unwrap();
                    be.upload(&b, &[(r as f32 + 1.0) * 10.0]).unwrap();
                    replica.all_reduce(&be, &b, ReduceOp::Sum).unwrap();
                    (be.download(&a).unwrap()[0], be.download(&b).unwrap()[0])
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        sums,
        vec![(3.0, 40.0), (3.0, 60.0), (7.0, 40.0), (7.0, 60.0)]
    );
}

#[test]
fn a_rank_that_exits_makes_its_peers_fail_naming_it() {
    let mut worlds = mesh(3, Duration::from_secs(20));
    drop(worlds.pop()); // rank 2 "exits": its sockets close
    let start = Instant::now();
    let errors: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = worlds
            .iter()
            .map(|w| {
                s.spawn(move || {
                    let be = CpuBackend::<f32>::new();
                    let comm = w.group(&[0, 1, 2]).unwrap();
                    let b = be.alloc(4, DType::F32).unwrap();
                    format!("{:#}", comm.all_reduce(&be, &b, ReduceOp::Sum).unwrap_err())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for e in &errors {
        assert!(e.contains("rank 2") && e.contains("all_reduce #0"), "{e}");
    }
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "no waiting for the timeout"
    );
}

#[test]
fn a_silent_rank_trips_the_timeout_and_a_different_collective_is_named() {
    let worlds = mesh(2, Duration::from_millis(800));
    let start = Instant::now();
    let (silent, mismatch) = std::thread::scope(|s| {
        let w0 = &worlds[0];
        let h = s.spawn(move || {
            let be = CpuBackend::<f32>::new();
            let comm = w0.group(&[0, 1]).unwrap();
            let b = be.alloc(2, DType::F32).unwrap();
            let silent = format!("{:#}", comm.all_reduce(&be, &b, ReduceOp::Sum).unwrap_err());
            // Then rank 1 calls a barrier while this rank all-reduces.
            let mismatch = format!("{:#}", comm.all_reduce(&be, &b, ReduceOp::Sum).unwrap_err());
            (silent, mismatch)
        });
        let comm1 = worlds[1].group(&[0, 1]).unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        // Rank 1 skipped the first collective; its barrier is #0 on its side.
        let _ = comm1.barrier();
        h.join().unwrap()
    });
    assert!(silent.contains("rank 1 sent nothing within"), "{silent}");
    assert!(
        mismatch.contains("different collectives") && mismatch.contains("barrier()"),
        "{mismatch}"
    );
    assert!(start.elapsed() < Duration::from_secs(8));
}

/// Two ranks' meshes on loopback with job tokens `keys[r]`: each rank's result.
fn keyed_mesh(
    keys: [&str; 2],
    timeout: Duration,
    stray: &[u8],
) -> (Vec<Result<TcpWorld>>, Vec<u8>) {
    let listeners: Vec<TcpListener> = (0..2)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    // A stranger at rank 0's data port before rank 1 dials: accepted first.
    let mut raw = TcpStream::connect(&addrs[0]).unwrap();
    raw.write_all(stray).unwrap();
    let worlds = std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(r, l)| {
                let (addrs, key) = (&addrs, Key::new(keys[r].as_bytes().to_vec()));
                s.spawn(move || TcpWorld::connect(r, addrs, l, timeout, Some(&key)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while let Ok(n @ 1..) = raw.read(&mut buf) {
        got.extend_from_slice(&buf[..n]);
    }
    (worlds, got)
}

/// With a job token, a data connection that fails the handshake is dropped having had only the
/// challenge, and the genuine rank still connects; a rank with another token is refused at once,
/// even behind a stranger that connected first and says nothing.
#[test]
fn data_connections_are_authenticated() {
    let mut faked = b"st-auth1".to_vec();
    faked.extend_from_slice(&[9u8; 64]);
    let (worlds, got) = keyed_mesh(["k", "k"], Duration::from_secs(10), &faked);
    assert_eq!(got.len(), 40, "the stranger got {got:?}");
    assert_eq!(&got[..8], b"st-auth1");
    let worlds: Vec<Arc<TcpWorld>> = worlds.into_iter().map(|w| Arc::new(w.unwrap())).collect();
    std::thread::scope(|s| {
        for w in &worlds {
            s.spawn(move || w.group(&[0, 1]).unwrap().barrier().unwrap());
        }
    });

    let t = Instant::now();
    let (worlds, _) = keyed_mesh(["k", "other"], Duration::from_secs(2), b"");
    let e0 = format!("{:#}", worlds[0].as_ref().err().expect("rank 0 fails"));
    let e1 = format!("{:#}", worlds[1].as_ref().err().expect("rank 1 fails"));
    assert!(e0.contains("ranks [1] did not connect"), "{e0}");
    assert!(
        e1.contains("the data connection to rank 0") && e1.contains("another job token"),
        "{e1}"
    );
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
}
