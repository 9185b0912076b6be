// Tests of the distributed window sampler: every window once per epoch across all ranks and
// micro-steps, determinism from (seed, epoch), the same global order for every world size, epoch
// rollover inside a batch, exact resumption from a saved position, and the windows that odd and
// short shards contribute.

use shardtrain::data::sampler::{rank_slice, Window, WindowSampler};
use std::collections::{BTreeSet, HashSet};

/// Shards of uneven (and some odd, some too short) lengths: 3 + 0 + 12 + 0 + 1 + 8 = 24 windows
/// at seq 8.
const LENS: [usize; 6] = [25, 7, 100, 8, 9, 71];
const SEQ: usize = 8;

fn sampler(seed: u64) -> WindowSampler {
    WindowSampler::new(&LENS, SEQ, seed).unwrap()
}

/// Every window of the dataset, in dataset order.
fn all_windows(s: &WindowSampler) -> Vec<Window> {
    (0..s.windows()).map(|w| s.window(w)).collect()
}

/// What `world` ranks read over `steps` optimizer steps of `global_batch` rows in micro-batches
/// of `micro` rows: `[step][micro_step][rank]` -> that rank's rows. Each rank has its own sampler,
/// as in the trainer.
fn run(
    seed: u64,
    world: usize,
    micro: usize,
    global_batch: usize,
    steps: usize,
) -> Vec<Vec<Vec<Vec<Window>>>> {
    assert_eq!(global_batch % (world * micro), 0);
    let accum = global_batch / (world * micro);
    let mut ranks: Vec<_> = (0..world).map(|_| sampler(seed)).collect();
    (0..steps)
        .map(|_| {
            (0..accum)
                .map(|_| {
                    ranks
                        .iter_mut()
                        .enumerate()
                        .map(|(rank, s)| s.next_rows(rank, world, micro))
                        .collect()
                })
                .collect()
        })
        .collect()
}

/// The windows of each step in global order (micro-step by micro-step, rank by rank).
fn step_order(run: &[Vec<Vec<Vec<Window>>>]) -> Vec<Vec<Window>> {
    run.iter()
        .map(|step| step.iter().flatten().flatten().copied().collect())
        .collect()
}

#[test]
fn one_epoch_reads_every_window_exactly_once_across_all_ranks() {
    let s = sampler(1);
    assert_eq!(s.windows(), 24);
    let every: BTreeSet<Window> = all_windows(&s).into_iter().collect();
    for world in 1..=4 {
        for micro in [1, 2, 3] {
            for global_batch in [world * micro, 2 * world * micro, 24] {
                if global_batch % (world * micro) != 0 || 24 % global_batch != 0 {
                    continue;
                }
                let steps = 24 / global_batch;
                let read = run(1, world, micro, global_batch, steps);
                let flat: Vec<Window> = step_order(&read).into_iter().flatten().collect();
                assert_eq!(flat.len(), 24);
                let distinct: BTreeSet<Window> = flat.iter().copied().collect();
                assert_eq!(
                    distinct, every,
                    "world {world}, micro {micro}, batch {global_batch}"
                );
                // Within every micro-step, ranks read disjoint windows.
                for micro_step in read.iter().flatten() {
                    let mut seen = HashSet::new();
                    for rows in micro_step {
                        assert_eq!(rows.len(), micro);
                        for w in rows {
                            assert!(seen.insert(*w), "{w:?} read by two ranks");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn the_order_is_deterministic_in_the_seed() {
    let a = sampler(7).next_global_batch(24);
    assert_eq!(a, sampler(7).next_global_batch(24));
    assert_ne!(a, sampler(8).next_global_batch(24));
    // A shuffle, not dataset order.
    assert_ne!(a, all_windows(&sampler(7)));
}

#[test]
fn every_epoch_is_a_different_permutation() {
    let mut s = sampler(7);
    let epochs: Vec<Vec<Window>> = (0..4).map(|_| s.next_global_batch(24)).collect();
    assert_eq!(s.epoch(), 4);
    let every: BTreeSet<Window> = all_windows(&s).into_iter().collect();
    for (e, order) in epochs.iter().enumerate() {
        assert_eq!(order.iter().copied().collect::<BTreeSet<_>>(), every);
        for later in &epochs[e + 1..] {
            assert_ne!(order, later);
        }
    }
}

#[test]
fn the_global_order_does_not_depend_on_the_world_size() {
    // Global batch 24 over 5 steps (five epochs' worth, so rollover is included).
    let reference = run(3, 1, 2, 24, 5);
    let reference_steps = step_order(&reference);
    for world in 1..=4 {
        for micro in [1, 2, 3, 6] {
            if 24 % (world * micro) != 0 {
                continue;
            }
            let read = run(3, world, micro, 24, 5);
            assert_eq!(
                step_order(&read),
                reference_steps,
                "world {world}, micro {micro}"
            );
            // Rank r at micro-step k reads rows (k * world + r) * micro .. of the step's batch,
            // which is what a world-1 run reads there.
            for (step, global) in read.iter().zip(&reference_steps) {
                for (k, micro_step) in step.iter().enumerate() {
                    let batch = &global[k * world * micro..(k + 1) * world * micro];
                    for (rank, rows) in micro_step.iter().enumerate() {
                        assert_eq!(rows.as_slice(), rank_slice(batch, rank, micro));
                    }
                }
            }
        }
    }
}

#[test]
fn an_epoch_that_ends_inside_a_batch_continues_with_the_next_permutation() {
    let mut s = sampler(5);
    let epoch0 = sampler(5).next_global_batch(24);
    let mut next = sampler(5);
    next.next_global_batch(24);
    let epoch1 = next.next_global_batch(24);
    assert_eq!(next.epoch(), 2);

    let first = s.next_global_batch(20);
    assert_eq!(first, epoch0[..20]);
    assert_eq!((s.epoch(), s.index()), (0, 20));
    let straddling = s.next_global_batch(10);
    assert_eq!(straddling[..4], epoch0[20..]);
    assert_eq!(straddling[4..], epoch1[..6]);
    assert_eq!((s.epoch(), s.index()), (1, 6));

    // Ranks see the same straddling batch.
    let mut r = sampler(5);
    r.next_global_batch(20);
    let rank1 = r.next_rows(1, 2, 5);
    assert_eq!(rank1, straddling[5..]);
    assert_eq!((r.epoch(), r.index()), (1, 6));

    // A batch larger than the dataset spans several epochs.
    let mut big = sampler(5);
    let rows = big.next_global_batch(50);
    assert_eq!(rows[..24], epoch0);
    assert_eq!(rows[24..48], epoch1);
    assert_eq!((big.epoch(), big.index()), (2, 2));
}

#[test]
fn a_saved_position_continues_exactly() {
    for (before, after) in [(0, 10), (5, 7), (20, 30), (24, 3), (47, 60)] {
        let mut a = sampler(11);
        a.next_global_batch(before);
        let saved = a.position();
        let expected = a.next_global_batch(after);
        // Through JSON text, as a checkpoint stores it.
        let text = serde_json::to_string(&saved).unwrap();
        let mut b = sampler(11);
        b.next_global_batch(3); // somewhere else, with another epoch's permutation built
        b.seek(&serde_json::from_str(&text).unwrap()).unwrap();
        assert_eq!(b.next_global_batch(after), expected, "after {before}");
        assert_eq!(b.position(), a.position());
    }
    let mut a = sampler(11);
    a.next_global_batch(30);
    let pos = a.position();
    assert_eq!(pos["epoch"], 1);
    assert_eq!(pos["index"], 6);
    assert_eq!(pos["seed"], 11);
    assert_eq!(pos["windows"], 24);
}

#[test]
fn seeking_into_another_stream_is_an_error() {
    let saved = sampler(11).position();
    let mut other = WindowSampler::new(&[1000], SEQ, 11).unwrap();
    let err = other.seek(&saved).unwrap_err().to_string();
    assert!(err.contains("24") && err.contains("124"), "{err}");
    let err = sampler(12).seek(&saved).unwrap_err().to_string();
    assert!(err.contains("seed"), "{err}");
    let mut bad = saved.clone();
    bad["index"] = 24.into();
    assert!(sampler(11).seek(&bad).is_err());
    let mut bad = saved.clone();
    bad.as_object_mut().unwrap().remove("epoch");
    let err = sampler(11).seek(&bad).unwrap_err().to_string();
    assert!(err.contains("epoch"), "{err}");
}

#[test]
fn short_shards_contribute_nothing_and_odd_lengths_lose_their_tail() {
    let s = sampler(0);
    let every = all_windows(&s);
    // Shards 1 (7 tokens) and 3 (8 tokens) are shorter than seq + 1 = 9.
    assert!(every.iter().all(|&(shard, _)| shard != 1 && shard != 3));
    for (shard, &len) in LENS.iter().enumerate() {
        let starts: Vec<usize> = every.iter().filter(|w| w.0 == shard).map(|w| w.1).collect();
        let expected: Vec<usize> = (0..)
            .map(|k| k * SEQ)
            .take_while(|start| start + SEQ < len)
            .collect();
        assert_eq!(starts, expected, "shard {shard} of {len} tokens");
    }
    // 25 = 3 * 8 + 1 tokens: exactly three windows, the last ending on the last token.
    assert_eq!(every[..3], [(0, 0), (0, 8), (0, 16)]);
    // 71 tokens: windows at 0..=56 (the last covers 56..65), 6 tokens left over.
    assert_eq!(
        every[16..],
        [
            (5, 0),
            (5, 8),
            (5, 16),
            (5, 24),
            (5, 32),
            (5, 40),
            (5, 48),
            (5, 56)
        ]
    );
    let err = WindowSampler::new(&[8, 3], SEQ, 0).unwrap_err().to_string();
    assert!(err.contains("no shard has seq+1 = 9 tokens"), "{err}");
}

#[test]
fn millions_of_windows_shuffle_quickly() {
    // 4 M windows (a 4 G-token dataset at seq 1024): a 16 MB permutation.
    let lens = vec![1024 * 4096 + 1; 1024];
    let mut s = WindowSampler::new(&lens, 1024, 1).unwrap();
    assert_eq!(s.windows(), 4096 * 1024);
    let started = std::time::Instant::now();
    let batch = s.next_global_batch(512);
    assert!(started.elapsed().as_secs_f64() < 10.0);
    assert_eq!(batch.iter().collect::<HashSet<_>>().len(), 512);
    for &(shard, start) in &batch {
        assert!(start + 1025 <= lens[shard]);
    }
}
