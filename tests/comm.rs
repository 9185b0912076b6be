//! The `local` communicator: every collective against a naive host-side computation, and its
//! failure behaviour (errors, panics, missing ranks, mismatched calls), on `CpuBackend<f32>`.
//!
//! Ranks are threads started by `run_ranks`. Data is seeded random and never zero; shard lengths
//! are not divisible by the world sizes. Results are compared exactly: the references add in
//! group-rank order and round every partial sum to the destination dtype, as documented.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use half::bf16;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shardtrain::backend::cpu::{CpuBackend, CpuBuf};
use shardtrain::backend::{Backend, DType};
use shardtrain::comm::{run_ranks, Communicator, LocalComm, LocalWorld, ReduceOp};

type Cpu = CpuBackend<f32>;
type Buf = CpuBuf<f32>;

const LONG: Duration = Duration::from_secs(10);
const DTYPES: [DType; 2] = [DType::F32, DType::Bf16];
const OPS: [ReduceOp; 2] = [ReduceOp::Sum, ReduceOp::Avg];

// ---- helpers --------------------------------------------------------------------------------

/// Rounds `x` to what a buffer of `dtype` stores.
fn round(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::F32 => x,
        DType::Bf16 => bf16::from_f32(x).to_f32(),
    }
}

/// `n` values in `±(0.01..1)`, already rounded to `dtype` (what the buffer will hold).
fn rand_vec(rng: &mut ChaCha8Rng, n: usize, dtype: DType) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let x: f32 = rng.random_range(0.01f32..1.0);
            let sign = if rng.random::<bool>() { 1.0 } else { -1.0 };
            round(dtype, sign * x)
        })
        .collect()
}

/// One vector of `n` values per rank.
fn per_rank(seed: u64, world: usize, n: usize, dtype: DType) -> Vec<Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..world).map(|_| rand_vec(&mut rng, n, dtype)).collect()
}

fn upload(be: &Cpu, data: &[f32], dtype: DType) -> Buf {
    let buf = be.alloc(data.len(), dtype).unwrap();
    be.upload(&buf, data).unwrap();
    buf
}

/// The documented reduction: in rank order, each partial sum rounded to `dtype`; Avg then
/// multiplies by `1 / world` (rounded again).
fn reference_reduce(pieces: &[&[f32]], dtype: DType, op: ReduceOp) -> Vec<f32> {
    let mut acc = pieces[0].to_vec();
    for p in &pieces[1..] {
        for (a, &x) in acc.iter_mut().zip(p.iter()) {
            *a = round(dtype, *a + x);
        }
    }
    if op == ReduceOp::Avg {
        let alpha = 1.0 / pieces.len() as f32;
        for a in &mut acc {
            *a = round(dtype, *a * alpha);
        }
    }
    acc
}

/// Communicators indexed by global rank for a partition of the world into groups.
fn partition(world: &LocalWorld, groups: &[&[usize]]) -> Vec<LocalComm> {
    let mut slots: Vec<Option<LocalComm>> = (0..world.world_size()).map(|_| None).collect();
    for g in groups {
        for (comm, &r) in world.group(g).into_iter().zip(g.iter()) {
            slots[r] = Some(comm);
        }
    }
    slots
        .into_iter()
        .map(|c| c.expect("partition covers every rank"))
        .collect()
}

/// Runs `f(rank, comm)` on every rank of a fresh world with one group of all ranks.
fn on_world<T: Send>(
    world_size: usize,
    f: impl Fn(usize, &LocalComm) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let world = LocalWorld::new(world_size, LONG);
    let all: Vec<usize> = (0..world_size).collect();
    let comms = world.group(&all);
    run_ranks(&world, |rank, _| f(rank, &comms[rank]))
}

fn err_text<T>(r: Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

// ---- each collective against the reference ------------------------------------------------

#[test]
fn accessors_and_values_in_rank_order() {
    let world = LocalWorld::new(4, LONG);
    assert_eq!(world.world_size(), 4);
    let comms = partition(&world, &[&[3, 1], &[0, 2]]);
    let got = run_ranks(&world, |rank, _| {
        let c = &comms[rank];
        Ok((rank, c.rank(), c.world_size(), c.ranks().to_vec()))
    })
    .unwrap();
    assert_eq!(got[0], (0, 0, 2, vec![0, 2]));
    assert_eq!(got[1], (1, 1, 2, vec![3, 1]));
    assert_eq!(got[2], (2, 1, 2, vec![0, 2]));
    assert_eq!(got[3], (3, 0, 2, vec![3, 1]));
    assert!(world.failure().is_none());
}

#[test]
fn all_gather_matches_concatenation() {
    for world_size in 1..=4 {
        for n in [1, 7, 13] {
            for dtype in DTYPES {
                let shards = per_rank(11 + n as u64, world_size, n, dtype);
                let expected: Vec<f32> = shards.concat();
                let got = on_world(world_size, |rank, comm| {
                    let be = Cpu::new();
                    let shard = upload(&be, &shards[rank], dtype);
                    let out = be.alloc(n * world_size, dtype)?;
                    be.fill(&out, 123.0)?;
                    comm.all_gather(&be, &out, &shard)?;
                    // The input is left alone.
                    assert_eq!(be.download(&shard)?, shards[rank]);
                    be.download(&out)
                })
                .unwrap();
                for (rank, out) in got.iter().enumerate() {
                    assert_eq!(
                        out, &expected,
                        "world {world_size}, n {n}, {dtype}, rank {rank}"
                    );
                }
            }
        }
    }
}

#[test]
fn reduce_scatter_matches_rank_ordered_sum() {
    for world_size in 1..=4 {
        for n in [1, 7, 13] {
            for dtype in DTYPES {
                for op in OPS {
                    let fulls = per_rank(29 + n as u64, world_size, n * world_size, dtype);
                    let got = on_world(world_size, |rank, comm| {
                        let be = Cpu::new();
                        let full = upload(&be, &fulls[rank], dtype);
                        let out = be.alloc(n, dtype)?;
                        be.fill(&out, 123.0)?;
                        comm.reduce_scatter(&be, &out, &full, op)?;
                        assert_eq!(be.download(&full)?, fulls[rank]);
                        be.download(&out)
                    })
                    .unwrap();
                    for (rank, out) in got.iter().enumerate() {
                        let pieces: Vec<&[f32]> =
                            fulls.iter().map(|f| &f[rank * n..(rank + 1) * n]).collect();
                        let expected = reference_reduce(&pieces, dtype, op);
                        assert_eq!(
                            out, &expected,
                            "world {world_size}, n {n}, {dtype}, {op}, rank {rank}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn bf16_rounds_each_partial_sum_not_the_total() {
    // 1 + 2^-8 + 2^-8: the exact sum 1 + 2^-7 is a bf16 value, but 1 + 2^-8 rounds (to even)
    // down to 1 at every partial sum, so the documented result is 1.
    let tiny = 1.0 / 256.0;
    let got = on_world(3, |rank, comm| {
        let be = Cpu::new();
        let v = if rank == 0 { 1.0 } else { tiny };
        let buf = upload(&be, &[v], DType::Bf16);
        comm.all_reduce(&be, &buf, ReduceOp::Sum)?;
        be.download(&buf)
    })
    .unwrap();
    for out in got {
        assert_eq!(out, vec![1.0]);
    }
}

#[test]
fn reduce_scatter_sums_in_the_dtype_of_out() {
    // bf16 gradients reduced into an f32 shard: the partial sums are f32.
    let (world_size, n) = (3, 7);
    let fulls = per_rank(5, world_size, n * world_size, DType::Bf16);
    let got = on_world(world_size, |rank, comm| {
        let be = Cpu::new();
        let full = upload(&be, &fulls[rank], DType::Bf16);
        let out = be.alloc(n, DType::F32)?;
        comm.reduce_scatter(&be, &out, &full, ReduceOp::Sum)?;
        be.download(&out)
    })
    .unwrap();
    for (rank, out) in got.iter().enumerate() {
        let pieces: Vec<&[f32]> = fulls.iter().map(|f| &f[rank * n..(rank + 1) * n]).collect();
        assert_eq!(out, &reference_reduce(&pieces, DType::F32, ReduceOp::Sum));
    }
}

#[test]
fn all_reduce_gives_every_rank_the_same_sum() {
    for world_size in 1..=4 {
        // 40_000 takes the backend's multithreaded paths.
        for n in [1, 7, 13, 40_000] {
            for dtype in DTYPES {
                for op in OPS {
                    let inputs = per_rank(47 + n as u64, world_size, n, dtype);
                    let got = on_world(world_size, |rank, comm| {
                        let be = Cpu::new();
                        let buf = upload(&be, &inputs[rank], dtype);
                        comm.all_reduce(&be, &buf, op)?;
                        be.download(&buf)
                    })
                    .unwrap();
                    let pieces: Vec<&[f32]> = inputs.iter().map(|v| v.as_slice()).collect();
                    let expected = reference_reduce(&pieces, dtype, op);
                    for (rank, out) in got.iter().enumerate() {
                        assert!(
                            out == &expected,
                            "world {world_size}, n {n}, {dtype}, {op}, rank {rank}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn broadcast_from_every_root() {
    for world_size in 1..=4 {
        for root in 0..world_size {
            for dtype in DTYPES {
                let n = 13;
                let inputs = per_rank(61 + root as u64, world_size, n, dtype);
                let got = on_world(world_size, |rank, comm| {
                    let be = Cpu::new();
                    let buf = upload(&be, &inputs[rank], dtype);
                    comm.broadcast(&be, &buf, root)?;
                    be.download(&buf)
                })
                .unwrap();
                for (rank, out) in got.iter().enumerate() {
                    assert_eq!(
                        out, &inputs[root],
                        "world {world_size}, root {root}, {dtype}, rank {rank}"
                    );
                }
            }
        }
    }
}

#[test]
fn barrier_waits_for_every_rank() {
    let before = AtomicUsize::new(0);
    on_world(4, |rank, comm| {
        for round in 1..=20 {
            if rank == round % 4 {
                std::thread::sleep(Duration::from_millis(2));
            }
            before.fetch_add(1, Ordering::SeqCst);
            comm.barrier()?;
            // Nobody passes the barrier before everyone has counted this round.
            assert!(before.load(Ordering::SeqCst) >= 4 * round);
            comm.barrier()?;
        }
        Ok(())
    })
    .unwrap();
}

// ---- groups and sequences -------------------------------------------------------------------

#[test]
fn overlapping_subgroups_interleaved() {
    let world = LocalWorld::new(4, LONG);
    // Shard groups and replica groups, one in a non-sorted order (group rank 0 is global rank 3).
    let shard_groups: [&[usize]; 2] = [&[0, 1], &[3, 2]];
    let replica_groups: [&[usize]; 2] = [&[0, 2], &[1, 3]];
    let shard = partition(&world, &shard_groups);
    let replica = partition(&world, &replica_groups);
    let n = 7;
    let dtype = DType::F32;
    let rounds = 5;
    let data: Vec<Vec<Vec<f32>>> = (0..rounds)
        .map(|r| per_rank(100 + r as u64, 4, 2 * n, dtype))
        .collect();

    let got = run_ranks(&world, |rank, _| {
        let be = Cpu::new();
        let (s, p) = (&shard[rank], &replica[rank]);
        let mut outs = Vec::new();
        for round_data in &data {
            // reduce_scatter within the shard group, all_reduce of the shard across replicas,
            // all_gather back within the shard group, broadcast within the replica group.
            let full = upload(&be, &round_data[rank], dtype);
            let piece = be.alloc(n, dtype)?;
            s.reduce_scatter(&be, &piece, &full, ReduceOp::Sum)?;
            p.all_reduce(&be, &piece, ReduceOp::Avg)?;
            let gathered = be.alloc(2 * n, dtype)?;
            s.all_gather(&be, &gathered, &piece)?;
            p.broadcast(&be, &gathered, 1)?;
            outs.push(be.download(&gathered)?);
        }
        Ok(outs)
    })
    .unwrap();

    for (round, round_data) in data.iter().enumerate() {
        // Host reference, step by step, in group-rank order.
        let mut pieces = vec![Vec::new(); 4];
        for g in shard_groups {
            for (i, &r) in g.iter().enumerate() {
                let parts: Vec<&[f32]> = g
                    .iter()
                    .map(|&q| &round_data[q][i * n..(i + 1) * n])
                    .collect();
                pieces[r] = reference_reduce(&parts, dtype, ReduceOp::Sum);
            }
        }
        let mut averaged = vec![Vec::new(); 4];
        for g in replica_groups {
            let parts: Vec<&[f32]> = g.iter().map(|&q| pieces[q].as_slice()).collect();
            for &r in g {
                averaged[r] = reference_reduce(&parts, dtype, ReduceOp::Avg);
            }
        }
        let mut gathered = vec![Vec::new(); 4];
        for g in shard_groups {
            let all: Vec<f32> = g.iter().flat_map(|&q| averaged[q].clone()).collect();
            for &r in g {
                gathered[r] = all.clone();
            }
        }
        for g in replica_groups {
            for &r in g {
                assert_eq!(got[r][round], gathered[g[1]], "round {round}, rank {r}");
            }
        }
    }
}

#[test]
fn hundred_consecutive_all_reduces() {
    let world_size = 3;
    let iters = 100;
    // Lengths vary by iteration, so two collectives mixing up would be caught as a mismatch too.
    let len = |i: usize| 5 + i % 7;
    let data: Vec<Vec<Vec<f32>>> = (0..iters)
        .map(|i| per_rank(1000 + i as u64, world_size, len(i), DType::F32))
        .collect();
    let got = on_world(world_size, |rank, comm| {
        let be = Cpu::new();
        let mut outs = Vec::new();
        for (i, d) in data.iter().enumerate() {
            let buf = upload(&be, &d[rank], DType::F32);
            let op = if i % 2 == 0 {
                ReduceOp::Sum
            } else {
                ReduceOp::Avg
            };
            comm.all_reduce(&be, &buf, op)?;
            outs.push(be.download(&buf)?);
        }
        Ok(outs)
    })
    .unwrap();
    for (i, d) in data.iter().enumerate() {
        let op = if i % 2 == 0 {
            ReduceOp::Sum
        } else {
            ReduceOp::Avg
        };
        let parts: Vec<&[f32]> = d.iter().map(|v| v.as_slice()).collect();
        let expected = reference_reduce(&parts, DType::F32, op);
        for (rank, outs) in got.iter().enumerate() {
            assert_eq!(outs[i], expected, "iteration {i}, rank {rank}");
        }
    }
}

// ---- failures -------------------------------------------------------------------------------

/// What each surviving rank saw: (rank, seconds its collective took, the error text).
type Seen = Mutex<Vec<(usize, f64, String)>>;

fn record(seen: &Seen, rank: usize, start: Instant, r: Result<()>) -> Result<()> {
    let msg = match &r {
        Ok(()) => "no error".to_string(),
        Err(e) => format!("{e:#}"),
    };
    seen.lock()
        .unwrap()
        .push((rank, start.elapsed().as_secs_f64(), msg));
    r
}

/// Rank 2 of 4 fails (through `fail_rank_2`) after one good all_reduce; ranks 1 and 3 are already
/// waiting in the next all_reduce, rank 0 calls it only after the failure.
fn failing_rank_case(
    fail_rank_2: impl Fn() -> Result<()> + Sync,
) -> (String, Vec<(usize, f64, String)>) {
    let world = LocalWorld::new(4, LONG);
    let comms = world.group(&[0, 1, 2, 3]);
    let seen: Seen = Mutex::new(Vec::new());
    let err = run_ranks(&world, |rank, _| {
        let be = Cpu::new();
        let buf = upload(&be, &[1.0, 2.0, 3.0], DType::F32);
        comms[rank].all_reduce(&be, &buf, ReduceOp::Sum)?;
        match rank {
            2 => {
                std::thread::sleep(Duration::from_millis(100));
                fail_rank_2()
            }
            _ => {
                if rank == 0 {
                    std::thread::sleep(Duration::from_millis(300));
                }
                let start = Instant::now();
                let r = comms[rank].all_reduce(&be, &buf, ReduceOp::Sum);
                record(&seen, rank, start, r)
            }
        }
    })
    .map(|_| ())
    .map_err(|e| format!("{e:#}"))
    .expect_err("the job must fail");
    (err, seen.into_inner().unwrap())
}

fn check_survivors(seen: &[(usize, f64, String)], cause: &str) {
    assert_eq!(seen.len(), 3, "{seen:?}");
    for (rank, secs, msg) in seen {
        assert!(
            msg.contains("all_reduce #1") && msg.contains("rank 2 failed") && msg.contains(cause),
            "rank {rank}: {msg}"
        );
        assert!(*secs < 1.0, "rank {rank} took {secs} s to see the failure");
    }
}

#[test]
fn a_rank_returning_err_fails_every_peer_fast() {
    let (err, seen) = failing_rank_case(|| bail!("data file unreadable"));
    check_survivors(&seen, "data file unreadable");
    assert!(
        err.starts_with("rank 2 failed: data file unreadable"),
        "{err}"
    );
}

#[test]
fn a_panicking_rank_fails_every_peer_fast() {
    let (err, seen) = failing_rank_case(|| panic!("index out of bounds (test)"));
    check_survivors(&seen, "panicked: index out of bounds (test)");
    assert!(
        err.starts_with("rank 2 failed: panicked: index out of bounds (test)"),
        "{err}"
    );
}

#[test]
fn a_failure_reaches_every_group() {
    // Rank 3 fails; ranks 0 and 1 share no group with it, but their later collective fails too.
    let world = LocalWorld::new(4, LONG);
    let comms = partition(&world, &[&[0, 1], &[2, 3]]);
    let seen: Seen = Mutex::new(Vec::new());
    let err = run_ranks(&world, |rank, world| {
        let be = Cpu::new();
        let buf = upload(&be, &[1.0; 5], DType::F32);
        if rank == 3 {
            bail!("out of memory (test)");
        }
        if rank < 2 {
            // Call only once the failure is recorded (rank 2 is waiting for rank 3 meanwhile).
            let start = Instant::now();
            while world.failure().is_none() && start.elapsed() < LONG {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let start = Instant::now();
        let r = comms[rank].all_reduce(&be, &buf, ReduceOp::Sum);
        record(&seen, rank, start, r)
    })
    .map(|_| ())
    .unwrap_err();
    assert!(
        format!("{err:#}").starts_with("rank 3 failed: out of memory (test)"),
        "{err:#}"
    );
    let seen = seen.into_inner().unwrap();
    assert_eq!(seen.len(), 3);
    for (rank, secs, msg) in seen {
        assert!(
            msg.contains("rank 3 failed: out of memory (test)"),
            "rank {rank}: {msg}"
        );
        assert!(secs < 1.0);
    }
}

#[test]
fn a_missing_rank_times_out_its_peers() {
    let timeout = Duration::from_millis(200);
    let world = LocalWorld::new(3, timeout);
    let comms = world.group(&[0, 1, 2]);
    let seen: Seen = Mutex::new(Vec::new());
    let err = run_ranks(&world, |rank, _| {
        if rank == 1 {
            return Ok(()); // never calls the collective
        }
        let be = Cpu::new();
        let buf = upload(&be, &[1.0; 4], DType::F32);
        let start = Instant::now();
        let r = comms[rank].all_reduce(&be, &buf, ReduceOp::Sum);
        record(&seen, rank, start, r)
    })
    .unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.starts_with("rank 1 failed: did not arrive at all_reduce #0 on ranks [0, 1, 2]"),
        "{err}"
    );
    let seen = seen.into_inner().unwrap();
    assert_eq!(seen.len(), 2);
    for (rank, secs, msg) in seen {
        // The rank that timed out says whom it waited for; the other one learns it from the
        // failure record. Either way the missing rank is named.
        assert!(
            msg.contains("waiting for ranks [1]") || msg.contains("rank 1 failed: did not arrive"),
            "rank {rank}: {msg}"
        );
        assert!(msg.contains("all_reduce #0"), "rank {rank}: {msg}");
        assert!((0.19..2.0).contains(&secs), "rank {rank} waited {secs} s");
    }
}

#[test]
fn mismatched_calls_fail_on_every_rank_and_the_group_goes_on() {
    let world_size = 3;
    let texts = on_world(world_size, |rank, comm| {
        let be = Cpu::new();
        let mut errors = Vec::new();
        // #0: lengths differ on rank 1.
        let n = if rank == 1 { 8 } else { 7 };
        let buf = upload(&be, &vec![1.0; n], DType::F32);
        errors.push(err_text(comm.all_reduce(&be, &buf, ReduceOp::Sum)));
        // #1: dtypes differ on rank 2.
        let dtype = if rank == 2 { DType::Bf16 } else { DType::F32 };
        let buf = upload(&be, &[1.0; 7], dtype);
        errors.push(err_text(comm.all_reduce(&be, &buf, ReduceOp::Sum)));
        // #2: rank 0 calls a barrier, the others a broadcast.
        let buf = upload(&be, &[1.0; 7], DType::F32);
        errors.push(err_text(if rank == 0 {
            comm.barrier()
        } else {
            comm.broadcast(&be, &buf, 0)
        }));
        // #3: rank 2 gives an `out` of the wrong length.
        let shard = upload(&be, &[1.0; 7], DType::F32);
        let out = be.alloc(if rank == 2 { 20 } else { 21 }, DType::F32)?;
        errors.push(err_text(comm.all_gather(&be, &out, &shard)));
        // #4: the roots differ; #5: a root outside the group.
        errors.push(err_text(comm.broadcast(&be, &buf, rank.min(1))));
        errors.push(err_text(comm.broadcast(&be, &buf, 3)));
        // #6: the group still works.
        let buf = upload(&be, &[rank as f32; 7], DType::F32);
        comm.all_reduce(&be, &buf, ReduceOp::Sum)?;
        assert_eq!(be.download(&buf)?, vec![3.0; 7]);
        Ok(errors)
    })
    .unwrap();
    for (rank, errors) in texts.iter().enumerate() {
        let expect_in = |i: usize, parts: &[&str]| {
            for p in parts {
                assert!(
                    errors[i].contains(p),
                    "rank {rank}, case {i}: {:?} lacks {p:?}",
                    errors[i]
                );
            }
        };
        expect_in(
            0,
            &[
                "all_reduce #0 on ranks [0, 1, 2]",
                "rank 1: all_reduce(buf: 8 x f32, sum)",
                "rank 0: all_reduce(buf: 7 x f32, sum)",
            ],
        );
        expect_in(
            1,
            &["all_reduce #1", "rank 2: all_reduce(buf: 7 x bf16, sum)"],
        );
        expect_in(
            2,
            &[
                "#2 on ranks [0, 1, 2]",
                "rank 0: barrier()",
                "rank 1: broadcast(buf: 7 x f32, root 0)",
            ],
        );
        expect_in(
            2,
            &[if rank == 0 {
                "barrier #2"
            } else {
                "broadcast #2"
            }],
        );
        expect_in(
            3,
            &[
                "all_gather #3",
                "rank 2: all_gather: `out` has 20 elements, 3 ranks x a shard of 7 need 21",
            ],
        );
        expect_in(
            4,
            &[
                "broadcast #4",
                "rank 0: broadcast(buf: 7 x f32, root 0)",
                "rank 2: broadcast(buf: 7 x f32, root 1)",
            ],
        );
        expect_in(
            5,
            &[
                "broadcast #5",
                "rank 0: broadcast: root 3 is not a group rank",
            ],
        );
    }
}

#[test]
#[should_panic(expected = "appears twice")]
fn a_group_cannot_repeat_a_rank() {
    LocalWorld::new(3, LONG).group(&[0, 1, 1]);
}

#[test]
#[should_panic(expected = "outside the world")]
fn a_group_stays_inside_the_world() {
    LocalWorld::new(3, LONG).group(&[0, 3]);
}
