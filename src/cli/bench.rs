//! `shardtrain bench`: the training benchmark's arguments, output (table, `--json`, `--plot`)
//! and checks of its own flags (the measuring is in `crate::bench`); and `shardtrain bench comm`:
//! collective bandwidth with ranks as threads (`--world N`, the `local` transport) or, under a
//! launcher, as processes (TCP on the CPU, NCCL on GPUs).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, Context, Result};
use clap::Args;

use super::predict::{predict_command, PredictArgs, PredictRequest};
use super::run_dir::utc_stamp;
use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::CudaBackend;
use crate::backend::DType;
use crate::bench::{self as train_bench, BenchOptions};
use crate::bench_comm::{render, run, CommBenchOptions};
use crate::comm::local::{run_ranks, LocalWorld};
use crate::comm::nccl::{new_unique_id, NcclComm};
use crate::config::{DeviceKind, ShardStrategy};
use crate::error::UsageError;
use crate::launch::env::{from_process_env, RankFlags};
use crate::train::device::{resolve_on, Device};

/// `shardtrain bench` (without a subcommand): one training run per world size and strategy.
#[derive(Debug, Args)]
pub(super) struct BenchArgs {
    /// YAML config of the job to measure (default: the built-in configs/tiny.yaml).
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
    /// World sizes (ranks as threads sharing the device), comma-separated [default: 1,2,4;
    /// with --predict: the config's parallel.world_size].
    #[arg(long, value_name = "N,...", value_delimiter = ',', value_parser = parse_world)]
    world: Vec<usize>,
    /// Sharding strategies, comma-separated: full_shard, shard_grad_op, no_shard, hybrid_shard
    /// [default: full_shard,shard_grad_op,no_shard; with --predict: the config's parallel.strategy].
    #[arg(long, value_name = "S,...", value_delimiter = ',', value_parser = parse_strategy)]
    strategy: Vec<ShardStrategy>,
    /// Timed steps per row.
    #[arg(long, default_value_t = 10, value_name = "N")]
    steps: u64,
    /// Untimed steps before them (allocations, first-use costs).
    #[arg(long, default_value_t = 2, value_name = "N")]
    warmup: u64,
    /// The device's peak TFLOP/s for MFU (default: the datasheet figure for known GPUs in bf16;
    /// none for CPUs).
    #[arg(long, value_name = "X")]
    peak_tflops: Option<f64>,
    /// Print the report as JSON (schema shardtrain.bench/1) instead of the table.
    #[arg(long)]
    json: bool,
    /// Also write a plot of tokens/s and memory per rank against world size (SVG).
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Override one config key, e.g. `--set model.n_layer=2` (repeatable, applied in order).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// cpu, cuda, sim (the simulated GPU) or auto (a GPU when one is usable); default: the
    /// config's `device`.
    #[arg(long, value_parser = parse_device)]
    device: Option<DeviceKind>,
    #[command(flatten)]
    predict: PredictArgs,
}

/// The default rows of a measuring bench (when --world / --strategy are not given).
const DEFAULT_WORLDS: [usize; 3] = [1, 2, 4];
const DEFAULT_STRATEGIES: [ShardStrategy; 3] = [
    ShardStrategy::FullShard,
    ShardStrategy::ShardGradOp,
    ShardStrategy::NoShard,
];

fn parse_world(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("world sizes must be at least 1".to_string()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{s}` is not a world size (a whole number >= 1)")),
    }
}

fn parse_strategy(s: &str) -> Result<ShardStrategy, String> {
    train_bench::parse_strategy(s)
}

pub(super) fn bench_train(args: BenchArgs) -> Result<()> {
    if args.predict.predict {
        return predict_command(&PredictRequest {
            config: args.config.as_deref(),
            worlds: &args.world,
            strategies: &args.strategy,
            sets: &args.set,
            peak_tflops: args.peak_tflops,
            json: args.json,
            flags: &args.predict,
        });
    }
    let mut args = args;
    if args.world.is_empty() {
        args.world = DEFAULT_WORLDS.to_vec();
    }
    if args.strategy.is_empty() {
        args.strategy = DEFAULT_STRATEGIES.to_vec();
    }
    if let Some(plot) = &args.plot {
        check_plot_path(plot)?;
    }
    let mut worlds = Vec::new();
    for w in args.world {
        if !worlds.contains(&w) {
            worlds.push(w);
        }
    }
    let mut strategies = Vec::new();
    for s in args.strategy {
        if !strategies.contains(&s) {
            strategies.push(s);
        }
    }
    let opts = BenchOptions {
        config: args.config,
        worlds,
        strategies,
        steps: args.steps,
        warmup: args.warmup,
        peak_tflops: args.peak_tflops,
        sets: args.set,
        device: args.device,
    };
    // Progress goes to stderr: stdout is the report (JSON with --json).
    let mut report = train_bench::run(&opts, |line| eprintln!("{line}"))?;
    report.date = iso_date(&utc_stamp(SystemTime::now()));
    report.command = std::env::args().collect::<Vec<_>>().join(" ");
    if let Some(plot) = &args.plot {
        std::fs::write(plot, train_bench::plot::render_svg(&report))
            .with_context(|| format!("writing the plot {}", plot.display()))?;
        eprintln!("bench: plot written to {}", plot.display());
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", train_bench::render_table(&report));
    }
    Ok(())
}

/// The plot's directory must exist: found out before the runs, not after them.
fn check_plot_path(plot: &Path) -> Result<()> {
    let dir = match plot.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(UsageError(format!(
            "--plot {}: the directory {} does not exist",
            plot.display(),
            dir.display()
        ))
        .into());
    }
    if plot.is_dir() {
        return Err(UsageError(format!(
            "--plot {}: is a directory; name the SVG file to write",
            plot.display()
        ))
        .into());
    }
    Ok(())
}

/// `20261126-104122` as `2026-11-26T10:41:22Z`.
fn iso_date(stamp: &str) -> String {
    match (
        stamp.get(0..4),
        stamp.get(4..6),
        stamp.get(6..8),
        stamp.get(9..11),
        stamp.get(11..13),
        stamp.get(13..15),
    ) {
        (Some(y), Some(mo), Some(d), Some(h), Some(mi), Some(s)) => {
            format!("{y}-{mo}-{d}T{h}:{mi}:{s}Z")
        }
        _ => stamp.to_string(),
    }
}

#[derive(Debug, Args)]
pub(super) struct BenchCommArgs {
    /// Smallest array size (bytes; K, M, G suffixes allowed).
    #[arg(long, default_value = "1K", value_parser = parse_bytes)]
    min_bytes: usize,
    /// Largest array size (bytes; K, M, G suffixes allowed).
    #[arg(long, default_value = "64M", value_parser = parse_bytes)]
    max_bytes: usize,
    /// Timed calls per size and collective.
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Untimed calls first.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Element type moved.
    #[arg(long, default_value = "bf16", value_parser = parse_dtype)]
    dtype: DType,
    /// cpu, cuda, sim (the simulated GPU) or auto (a GPU when one is usable).
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    device: DeviceKind,
    /// Ranks as threads of this process (ignored under a launcher, which decides).
    #[arg(long, default_value_t = 2)]
    world: usize,
    /// Deadline of each collective, in seconds.
    #[arg(long, default_value_t = 120.0)]
    timeout_s: f64,
}

fn parse_bytes(s: &str) -> Result<usize, String> {
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1usize << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<usize>()
        .map(|n| n * mult)
        .map_err(|_| format!("`{s}` is not a size in bytes (like 4096, 64K, 16M, 1G)"))
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::Bf16),
        _ => Err(format!("`{s}`: expected f32 or bf16")),
    }
}

fn parse_device(s: &str) -> Result<DeviceKind, String> {
    match s {
        "auto" => Ok(DeviceKind::Auto),
        "cpu" => Ok(DeviceKind::Cpu),
        "cuda" => Ok(DeviceKind::Cuda),
        "sim" => Ok(DeviceKind::Sim),
        _ => Err(format!("`{s}`: expected auto, cpu, cuda or sim")),
    }
}

pub(super) fn bench_comm(args: BenchCommArgs) -> Result<()> {
    if args.min_bytes > args.max_bytes {
        return Err(UsageError("--min-bytes is larger than --max-bytes".into()).into());
    }
    let opts = CommBenchOptions {
        min_bytes: args.min_bytes,
        max_bytes: args.max_bytes,
        iters: args.iters.max(1),
        warmup: args.warmup,
        dtype: args.dtype,
    };
    let timeout = Duration::from_secs_f64(args.timeout_s);
    if let Some(env) = from_process_env(&RankFlags::default())? {
        let device = resolve_on(args.device, crate::launch::device_ordinal(&env))?;
        let all: Vec<usize> = (0..env.world_size).collect();
        let payload = match (&device, env.rank) {
            (Device::Cuda(_), 0) => new_unique_id()?,
            _ => Vec::new(),
        };
        let key = crate::launch::token::for_rank(None, env.rank)?;
        let joined = crate::launch::join(&env, key.as_ref(), &payload, timeout)?;
        let (points, transport) = match &device {
            Device::Cuda(gpu) => {
                let be = CudaBackend::new(gpu)?;
                let comm = NcclComm::init(&be, &all, env.rank, &joined.payload, timeout)?;
                (
                    run(&be, &comm, &opts)?,
                    format!("nccl on {}", be_name(&device)),
                )
            }
            Device::Cpu => {
                let comm = joined.world.group(&all)?;
                (
                    run(&CpuBackend::<f32>::new(), &comm, &opts)?,
                    "tcp (cpu)".to_string(),
                )
            }
        };
        if env.rank == 0 {
            print!("{}", render(&points, env.world_size, &transport));
        }
        return Ok(());
    }
    let n = args.world.max(1);
    let device = resolve_on(args.device, 0)?;
    let world = LocalWorld::new(n, timeout);
    let comms: Vec<Mutex<Option<_>>> = world
        .group(&(0..n).collect::<Vec<_>>())
        .into_iter()
        .map(|c| Mutex::new(Some(c)))
        .collect();
    let results = run_ranks(&world, |rank, _| {
        let comm = comms[rank]
            .lock()
            .map_err(|_| anyhow!("rank {rank}: lock poisoned"))?
            .take()
            .ok_or_else(|| anyhow!("rank {rank}: communicator taken"))?;
        match &device {
            Device::Cpu => run(&CpuBackend::<f32>::new(), &comm, &opts),
            Device::Cuda(gpu) => run(&CudaBackend::new(gpu)?, &comm, &opts),
        }
    })?;
    let transport = format!("local (threads on {})", be_name(&device));
    print!("{}", render(&results[0], n, &transport));
    Ok(())
}

fn be_name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(gpu) => gpu.describe(),
    }
}

#[cfg(test)]
mod tests {
    use super::{iso_date, parse_bytes, parse_world};

    #[test]
    fn world_sizes_are_positive_and_dates_are_iso() {
        assert_eq!(parse_world("4"), Ok(4));
        assert!(parse_world("0").is_err() && parse_world("x").is_err());
        assert_eq!(iso_date("20261126-104122"), "2026-11-26T10:41:22Z");
    }

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("64K"), Ok(65536));
        assert_eq!(parse_bytes("16M"), Ok(16 << 20));
        assert_eq!(parse_bytes("1G"), Ok(1 << 30));
        assert!(parse_bytes("1X").is_err() && parse_bytes("").is_err());
    }
}
