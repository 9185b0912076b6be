//! `shardtrain bench comm`: collective bandwidth with ranks as threads (`--world N`, the `local`
//! transport) or, under a launcher, as processes (TCP on the CPU, NCCL on GPUs).

use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, Result};
use clap::Args;

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::CudaBackend;
use crate::backend::DType;
use crate::bench_comm::{render, run, CommBenchOptions};
use crate::comm::local::{run_ranks, LocalWorld};
use crate::comm::nccl::{new_unique_id, NcclComm};
use crate::config::DeviceKind;
use crate::error::UsageError;
use crate::launch::env::{from_process_env, RankFlags};
use crate::train::device::{resolve_on, Device};

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
    /// cpu, cuda, or auto (a GPU when one is usable).
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
        _ => Err(format!("`{s}`: expected auto, cpu or cuda")),
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
        let joined = crate::launch::join(&env, &payload, timeout)?;
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
    use super::parse_bytes;

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("64K"), Ok(65536));
        assert_eq!(parse_bytes("16M"), Ok(16 << 20));
        assert_eq!(parse_bytes("1G"), Ok(1 << 30));
        assert!(parse_bytes("1X").is_err() && parse_bytes("").is_err());
    }
}
