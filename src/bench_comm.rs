//! `shardtrain bench comm`: the bandwidth of all_gather, reduce_scatter and all_reduce through a
//! transport, over a range of sizes, reported as nccl-tests does: `size` is the whole array (the
//! gathered output, the reduce-scatter input, the all-reduced buffer), algbw = size / time, and
//! busbw = algbw x (n-1)/n for all_gather and reduce_scatter, x 2(n-1)/n for all_reduce, which is
//! comparable to the link's bandwidth whatever the number of ranks.

use std::fmt::Write as _;
use std::time::Instant;

use anyhow::Result;

use crate::backend::{Backend, DType};
use crate::comm::{Communicator, ReduceOp};

/// What to measure.
#[derive(Debug, Clone)]
pub struct CommBenchOptions {
    pub min_bytes: usize,
    pub max_bytes: usize,
    pub iters: usize,
    pub warmup: usize,
    pub dtype: DType,
}

/// One measured point.
#[derive(Debug, Clone, PartialEq)]
pub struct CommPoint {
    pub op: &'static str,
    pub bytes: usize,
    /// Mean time per call, slowest rank.
    pub seconds: f64,
    pub algbw_gbs: f64,
    pub busbw_gbs: f64,
}

/// The bus-bandwidth factor of `op` for `n` ranks (nccl-tests' definition).
pub fn bus_factor(op: &str, n: usize) -> f64 {
    let n = n as f64;
    match op {
        "all_reduce" => 2.0 * (n - 1.0) / n,
        _ => (n - 1.0) / n,
    }
}

/// Sizes from `min` to `max` bytes, x4 each, each a multiple of `ranks` elements of `elem` bytes.
pub fn sizes(min: usize, max: usize, ranks: usize, elem: usize) -> Vec<usize> {
    let unit = ranks * elem;
    let mut out = Vec::new();
    let mut s = min.max(unit);
    while s <= max {
        out.push(s.div_ceil(unit) * unit);
        s *= 4;
    }
    out
}

/// Runs the benchmark on one rank; every rank of `comm` must call it. Returns the points (the
/// same on every rank: times are the slowest rank's).
pub fn run<B: Backend, C: Communicator>(
    be: &B,
    comm: &C,
    opts: &CommBenchOptions,
) -> Result<Vec<CommPoint>> {
    let n = comm.world_size();
    let elem = opts.dtype.size_bytes();
    let mut points = Vec::new();
    for bytes in sizes(opts.min_bytes, opts.max_bytes, n, elem) {
        let full_len = bytes / elem;
        let shard_len = full_len / n;
        let full = be.alloc(full_len, opts.dtype)?;
        let shard = be.alloc(shard_len, opts.dtype)?;
        be.fill(&full, 1.0)?;
        be.fill(&shard, 1.0)?;
        for op in ["all_gather", "reduce_scatter", "all_reduce"] {
            let call = || -> Result<()> {
                match op {
                    "all_gather" => comm.all_gather(be, &full, &shard),
                    "reduce_scatter" => comm.reduce_scatter(be, &shard, &full, ReduceOp::Sum),
                    _ => comm.all_reduce(be, &full, ReduceOp::Sum),
                }
            };
            for _ in 0..opts.warmup {
                call()?;
            }
            be.synchronize()?;
            comm.barrier()?;
            let t = Instant::now();
            for _ in 0..opts.iters {
                call()?;
            }
            be.synchronize()?;
            let mine = t.elapsed().as_secs_f64() / opts.iters.max(1) as f64;
            // The slowest rank's time: a collective is as fast as its last participant.
            let slowest = max_over_ranks(be, comm, mine)?;
            let algbw = bytes as f64 / slowest / 1e9;
            points.push(CommPoint {
                op,
                bytes,
                seconds: slowest,
                algbw_gbs: algbw,
                busbw_gbs: algbw * bus_factor(op, n),
            });
        }
    }
    Ok(points)
}

fn max_over_ranks<B: Backend, C: Communicator>(be: &B, comm: &C, mine: f64) -> Result<f64> {
    // A max through sums: each rank contributes its time in its own slot.
    let n = comm.world_size();
    let mut slots = vec![0.0f32; n];
    slots[comm.rank()] = mine as f32;
    let buf = be.alloc(n, DType::F32)?;
    be.upload(&buf, &slots)?;
    comm.all_reduce(be, &buf, ReduceOp::Sum)?;
    let all = be.download(&buf)?;
    Ok(all.into_iter().fold(0.0f32, f32::max) as f64)
}

/// The table, nccl-tests style.
pub fn render(points: &[CommPoint], ranks: usize, transport: &str) -> String {
    let mut out = format!(
        "{transport}, {ranks} ranks (size = whole array; busbw = algbw x (n-1)/n, all_reduce x 2(n-1)/n)\n"
    );
    let _ = writeln!(
        out,
        "{:>12} {:>15} {:>12} {:>12} {:>12}",
        "size", "op", "time us", "algbw GB/s", "busbw GB/s"
    );
    for p in points {
        let _ = writeln!(
            out,
            "{:>12} {:>15} {:>12.1} {:>12.3} {:>12.3}",
            p.bytes,
            p.op,
            p.seconds * 1e6,
            p.algbw_gbs,
            p.busbw_gbs
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::comm::local::{run_ranks, LocalWorld};

    #[test]
    fn bus_factors_follow_nccl_tests() {
        assert_eq!(bus_factor("all_gather", 8), 7.0 / 8.0);
        assert_eq!(bus_factor("reduce_scatter", 2), 0.5);
        assert_eq!(bus_factor("all_reduce", 4), 1.5);
        assert_eq!(bus_factor("all_reduce", 1), 0.0);
    }

    #[test]
    fn sizes_grow_by_four_and_divide_among_ranks() {
        assert_eq!(sizes(1024, 65536, 3, 4), vec![1032, 4104, 16392, 65544]);
        assert_eq!(sizes(1024, 1024, 1, 2), vec![1024]);
    }

    #[test]
    fn every_rank_measures_every_op_and_size() {
        let world = LocalWorld::new(2, std::time::Duration::from_secs(10));
        let comms: Vec<_> = world
            .group(&[0, 1])
            .into_iter()
            .map(|c| std::sync::Mutex::new(Some(c)))
            .collect();
        let opts = CommBenchOptions {
            min_bytes: 1024,
            max_bytes: 16 * 1024,
            iters: 2,
            warmup: 1,
            dtype: DType::F32,
        };
        let results = run_ranks(&world, |r, _| {
            let comm = comms[r].lock().unwrap().take().unwrap();
            run(&CpuBackend::<f32>::new(), &comm, &opts)
        })
        .unwrap();
        assert_eq!(results[0].len(), 3 * 3);
        // Both ranks report the same (slowest) times.
        assert_eq!(results[0], results[1]);
        assert!(results[0]
            .iter()
            .all(|p| p.seconds > 0.0 && p.busbw_gbs > 0.0));
        let table = render(&results[0], 2, "local");
        assert!(table.contains("reduce_scatter") && table.contains("16384"));
    }
}
