//! `shardtrain plan`: the arguments, checked into a [`PlanRequest`], and the report printed as a
//! table or JSON. Every bad input is a usage error (exit code 2) naming its flag or file.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};

use crate::config::Config;
use crate::error::UsageError;
use crate::plan::hardware::{self, GpuKind, HardwareOverrides};
use crate::plan::rate::ComputeRate;
use crate::plan::{plan, report, PlanRequest, Workload};

#[derive(Debug, Args)]
pub(super) struct PlanArgs {
    /// The training config to plan for (its model, batch sizes and mixed precision; its
    /// parallel.world_size, strategy and shard_group_size are replaced by each plan's).
    #[arg(long, short, value_name = "FILE")]
    config: PathBuf,
    /// GPU counts to plan for, comma-separated: `--gpus 8,64,512` gives one section each.
    #[arg(long, value_name = "N[,N...]", value_delimiter = ',', required = true)]
    gpus: Vec<usize>,
    /// GPUs per node: rings within a node use the intra-node link; hybrid_shard shards within a node.
    #[arg(long, default_value_t = 8, value_name = "G")]
    gpus_per_node: usize,
    /// GPU preset (memory, peak rate, links); `custom` needs --memory-gib and --peak-tflops.
    #[arg(long, value_enum, default_value_t = GpuArg::H100)]
    gpu: GpuArg,
    /// Memory of one GPU in GiB (overrides the preset).
    #[arg(long, value_name = "GIB")]
    memory_gib: Option<f64>,
    /// Dense peak TFLOP/s of the compute dtype (the config's param_dtype; overrides the preset).
    #[arg(long, value_name = "TFLOPS")]
    peak_tflops: Option<f64>,
    /// Bus bandwidth of a ring inside a node, GB/s (nccl-tests' busbw).
    #[arg(long, value_name = "GB/S")]
    intra_bw: Option<f64>,
    /// Bandwidth per GPU across nodes, GB/s (50 = one 400 Gb/s NIC per GPU).
    #[arg(long, value_name = "GB/S")]
    inter_bw: Option<f64>,
    /// Use the compute rate measured by `shardtrain bench --json` (its smallest-world row)
    /// instead of an assumed MFU.
    #[arg(long, value_name = "BENCH_JSON")]
    calibrate: Option<PathBuf>,
    /// Override one config key, e.g. `--set train.micro_batch_size=4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Print the plan as JSON (schema shardtrain.plan/1) instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum GpuArg {
    H100,
    H200,
    A100,
    Custom,
}

impl From<GpuArg> for GpuKind {
    fn from(g: GpuArg) -> GpuKind {
        match g {
            GpuArg::H100 => GpuKind::H100,
            GpuArg::H200 => GpuKind::H200,
            GpuArg::A100 => GpuKind::A100,
            GpuArg::Custom => GpuKind::Custom,
        }
    }
}

/// The most GPUs a plan takes (the rank lists it builds stay small).
const MAX_GPUS: usize = 1 << 20;

/// GPU counts from 1 to [`MAX_GPUS`], or a usage error naming --gpus.
fn checked_gpu_counts(counts: &[usize]) -> Result<Vec<usize>, UsageError> {
    let valid = |&n: &usize| (1..=MAX_GPUS).contains(&n);
    if counts.is_empty() || !counts.iter().all(valid) {
        return Err(UsageError(format!(
            "--gpus: every count must be between 1 and {MAX_GPUS} (got {counts:?}); e.g. --gpus 8,64,512"
        )));
    }
    Ok(counts.to_vec())
}

fn request(args: &PlanArgs) -> Result<PlanRequest> {
    let gpu_counts = checked_gpu_counts(&args.gpus)?;
    let cfg = Config::load(Some(&args.config), &args.set)?;
    let workload = Workload::from_config(&cfg);
    workload
        .check_plannable()
        .map_err(|e| UsageError(format!("{}: {e}", args.config.display())))?;
    let hardware = hardware::resolve(
        args.gpu.into(),
        workload.precision.param_dtype,
        args.gpus_per_node,
        HardwareOverrides {
            memory_gib: args.memory_gib,
            peak_tflops: args.peak_tflops,
            intra_bw_gb_s: args.intra_bw,
            inter_bw_gb_s: args.inter_bw,
            hbm_gb_s: None,
        },
    )?;
    let rate = match &args.calibrate {
        Some(path) => ComputeRate::from_bench_file(path)?,
        None => ComputeRate::assumed(hardware.peak_flops),
    };
    Ok(PlanRequest {
        config_name: args.config.display().to_string(),
        workload,
        hardware,
        rate,
        gpu_counts,
    })
}

pub(super) fn plan_command(args: PlanArgs) -> Result<()> {
    let report = plan(&request(&args)?);
    let text = if args.json {
        report::to_json(&report)? + "\n"
    } else {
        report::render(&report)
    };
    // A reader that stops early (`| head`) is not an error.
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}
