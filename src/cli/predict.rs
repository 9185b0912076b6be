//! `shardtrain bench --predict`: the predicted per-op table of one training step on a GPU preset
//! (nothing runs), and with `--measured` a run's profiled per-op table beside it. Every bad input
//! is a usage error (exit code 2) naming its flag, key or file.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Args, ValueEnum};

use crate::backend::OpTime;
use crate::config::{Config, ShardStrategy, EMBEDDED_ORIGIN};
use crate::error::UsageError;
use crate::plan::hardware::{self, GpuKind, HardwareOverrides};
use crate::plan::predict_report::{self, join, Measured, PredictReport, PREDICT_SCHEMA};
use crate::plan::roofline::{predict, KernelProfile, CUDA_CORE, TENSOR_CORE};
use crate::plan::{strategy_name, Workload};

/// The flags `--predict` adds to `shardtrain bench`.
#[derive(Debug, Args)]
pub(super) struct PredictArgs {
    /// Print the PREDICTED per-op table of one training step on a GPU (roofline of every op the
    /// step issues, under the CUDA profiler's names): no training runs. Uses the config, --set,
    /// one --world and one --strategy (default: the config's), --peak-tflops and --json.
    #[arg(long, conflicts_with_all = ["plot", "device", "steps", "warmup"])]
    pub predict: bool,
    /// GPU preset of the prediction (datasheet peaks, HBM bandwidth, SMs).
    #[arg(long, value_enum, default_value_t = PredictGpu::H100, requires = "predict")]
    pub gpu: PredictGpu,
    /// HBM bandwidth in GB/s (overrides the preset's).
    #[arg(long, value_name = "GB/S", requires = "predict")]
    pub hbm_bw: Option<f64>,
    /// Kernel generations to predict, comma-separated: cuda-core (the CUDA-core attention and
    /// column-parallel LayerNorm gradients: f32 and head size 32 today), tensor-core (the bf16
    /// path at head sizes 64 and 128: tensor-core flash attention, full-grid LayerNorm backward).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "cuda-core,tensor-core",
        requires = "predict"
    )]
    pub kernels: Vec<KernelsArg>,
    /// A run's summary.json (trained with logging.profile_ops_steps > 0 on a GPU): its per-op
    /// table per step, beside the first prediction's.
    #[arg(long, value_name = "SUMMARY_JSON", requires = "predict")]
    pub measured: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum PredictGpu {
    H100,
    H200,
    A100,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum KernelsArg {
    CudaCore,
    TensorCore,
}

impl KernelsArg {
    fn profile(self) -> KernelProfile {
        match self {
            KernelsArg::CudaCore => CUDA_CORE,
            KernelsArg::TensorCore => TENSOR_CORE,
        }
    }
}

/// What `bench` hands over: its own flags the prediction uses, and the prediction's.
pub(super) struct PredictRequest<'a> {
    pub config: Option<&'a Path>,
    pub worlds: &'a [usize],
    pub strategies: &'a [ShardStrategy],
    pub sets: &'a [String],
    pub peak_tflops: Option<f64>,
    pub json: bool,
    pub flags: &'a PredictArgs,
}

/// Head sizes the CUDA attention kernels exist for (`attention_head_size` in
/// src/backend/cuda/ops.rs): a step with another could not run, so it is not predicted.
const ATTENTION_HEAD_SIZES: [usize; 3] = [32, 64, 128];

/// The config with the one --world / --strategy applied as `--set`s (so that the config's own
/// checks, which name the keys, see them).
fn load_config(req: &PredictRequest) -> Result<Config> {
    let mut sets = req.sets.to_vec();
    match req.worlds {
        [] => {}
        [w] => sets.push(format!("parallel.world_size={w}")),
        more => {
            return Err(UsageError(format!(
                "--world: --predict takes one world size (got {more:?})"
            ))
            .into())
        }
    }
    match req.strategies {
        [] => {}
        [s] => sets.push(format!("parallel.strategy={}", strategy_name(*s))),
        more => {
            return Err(UsageError(format!(
                "--strategy: --predict takes one strategy (got {})",
                more.iter()
                    .map(|s| strategy_name(*s))
                    .collect::<Vec<_>>()
                    .join(",")
            ))
            .into())
        }
    }
    let cfg = Config::load(req.config, &sets)?;
    let hs = cfg.model.head_dim();
    if !ATTENTION_HEAD_SIZES.contains(&hs) {
        return Err(UsageError(format!(
            "model.n_head: head size d_model / n_head = {} / {} = {hs} has no CUDA attention kernel (32, 64 or 128)",
            cfg.model.d_model, cfg.model.n_head
        ))
        .into());
    }
    Ok(cfg)
}

/// A run's per-op table and the number of op-timed steps it sums (`summary.json`'s op_times;
/// the steps from logging.profile_ops_steps of the run's config.yaml beside it).
fn read_measured(path: &Path) -> Result<(Vec<OpTime>, u64)> {
    let name = path.display().to_string();
    let problem = |what: String| UsageError(format!("--measured {name}: {what}"));
    let text =
        std::fs::read_to_string(path).map_err(|e| problem(format!("cannot read the file: {e}")))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| problem(format!("not JSON ({e})")))?;
    let times = value
        .get("op_times")
        .and_then(|t| t.as_array())
        .ok_or_else(|| problem("has no op_times: not a run's summary.json".into()))?;
    let mut ops = Vec::new();
    for t in times {
        let op = t.get("op").and_then(|v| v.as_str());
        let calls = t.get("calls").and_then(|v| v.as_u64());
        let ms = t.get("total_ms").and_then(|v| v.as_f64());
        match (op, calls, ms) {
            (Some(op), Some(calls), Some(total_ms)) => ops.push(OpTime {
                op: op.to_string(),
                calls,
                total_ms,
            }),
            _ => {
                return Err(problem(format!(
                    "an op_times entry is not {{op, calls, total_ms}}: {t}"
                ))
                .into())
            }
        }
    }
    if ops.is_empty() {
        return Err(problem(
            "op_times is empty: train on a GPU with --set logging.profile_ops_steps=N".into(),
        )
        .into());
    }
    let config = path.with_file_name(crate::train::CONFIG_FILE);
    let cfg = Config::load(Some(&config), &[])
        .map_err(|e| problem(format!("reading the run's {}: {e}", config.display())))?;
    let steps = value.get("steps").and_then(|v| v.as_u64()).unwrap_or(0);
    let timed = cfg.logging.profile_ops_steps.min(steps);
    if timed == 0 {
        return Err(problem(format!(
            "logging.profile_ops_steps of {} is 0 (or the run took no steps): no op-timed steps",
            config.display()
        ))
        .into());
    }
    Ok((ops, timed))
}

pub(super) fn predict_command(req: &PredictRequest) -> Result<()> {
    let flags = req.flags;
    let cfg = load_config(req)?;
    let config_name = req
        .config
        .map_or_else(|| EMBEDDED_ORIGIN.to_string(), |p| p.display().to_string());
    let workload = Workload::from_config(&cfg);
    workload
        .check_plannable()
        .map_err(|e| UsageError(format!("{config_name}: {e}")))?;
    let kind = match flags.gpu {
        PredictGpu::H100 => GpuKind::H100,
        PredictGpu::H200 => GpuKind::H200,
        PredictGpu::A100 => GpuKind::A100,
    };
    let hw = hardware::resolve(
        kind,
        workload.precision.param_dtype,
        // One node holds the world when it can: the collectives ride NVLink.
        cfg.parallel.world_size.clamp(1, 8),
        HardwareOverrides {
            peak_tflops: req.peak_tflops,
            hbm_gb_s: flags.hbm_bw,
            ..HardwareOverrides::default()
        },
    )?;
    let plan = workload.shard_plan(
        cfg.parallel.strategy,
        cfg.parallel.world_size,
        cfg.parallel.shard_group_size,
    );
    let mut profiles: Vec<KernelProfile> = Vec::new();
    for k in &flags.kernels {
        if !profiles.iter().any(|p| p.name == k.profile().name) {
            profiles.push(k.profile());
        }
    }
    let predictions = profiles
        .iter()
        .map(|k| predict(&workload, &plan, &hw, k).map_err(|e| UsageError(format!("--gpu: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let measured = match &flags.measured {
        Some(path) => {
            let (ops, steps) = read_measured(path)?;
            Some(Measured {
                source: path.display().to_string(),
                steps,
                rows: join(&predictions[0].rows, &ops, steps),
            })
        }
        None => None,
    };
    let torch_reference = predict_report::torch_reference(&workload, &predictions[0]);
    let report = PredictReport {
        schema: PREDICT_SCHEMA,
        note: predict_report::NOTE,
        config: config_name,
        world_size: cfg.parallel.world_size,
        strategy: strategy_name(cfg.parallel.strategy).to_string(),
        workload,
        hardware: hw,
        predictions,
        torch_reference,
        measured,
    };
    let text = if req.json {
        serde_json::to_string_pretty(&report)? + "\n"
    } else {
        predict_report::render(&report)
    };
    // A reader that stops early (`| head`) is not an error.
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}
