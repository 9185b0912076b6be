//! The command line: argument definitions, turning them into validated settings, and mapping
//! failures to exit codes (2: bad input, the user must change something; 1: the run failed).
//! Knows which subcommand calls which layer, and nothing of how training works.

mod run_dir;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::CudaBackend;
use crate::backend::OpTime;
use crate::check::{check_ops, CheckOptions};
use crate::checkpoint::{self, Checkpoint};
use crate::config::{Config, ConfigError};
use crate::error::UsageError;
use crate::generate::{sample_from_run, SampleOptions};
use crate::shard::memory::mib;
use crate::train::{self, CONFIG_FILE};

/// shardtrain trains GPT language models, sharding parameters, gradients and optimizer state
/// across devices (FSDP / ZeRO style). With no GPU it trains on the CPU.
#[derive(Debug, Parser)]
#[command(name = "shardtrain", about, long_about = None)]
#[command(version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("SHARDTRAIN_COMMIT"), ")"))]
#[command(
    after_help = "Start here:\n  shardtrain train                      train the built-in tiny job on the synthetic corpus\n  shardtrain train --print-config       show every setting it uses\n  shardtrain sample --run-dir runs/...  generate text from a finished run"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train a model from a YAML config (the built-in configs/tiny.yaml when none is given).
    Train(TrainArgs),
    /// Generate text from the final weights of a finished training run.
    Sample(SampleArgs),
    /// Inspect checkpoints: `shardtrain ckpt inspect PATH`.
    Ckpt {
        #[command(subcommand)]
        command: CkptCommand,
    },
    /// Write a run's or a checkpoint's weights as a Hugging Face GPT-2 model (`model.safetensors`
    /// and `config.json`) that `transformers` loads as GPT2LMHeadModel.
    Export(ExportArgs),
    /// Compare every op of a backend with the CPU reference on fresh random inputs (outputs
    /// poisoned first, so an element left unwritten fails); exits 1 if any case fails.
    Check(CheckArgs),
}

#[derive(Debug, Subcommand)]
enum CkptCommand {
    /// Step, world size, strategy, tensors and files of a checkpoint, every checksum verified.
    Inspect {
        /// A checkpoint directory, a directory of checkpoints or a run directory (newest).
        path: PathBuf,
    },
}

#[derive(Debug, Args)]
struct ExportArgs {
    /// A finished run directory (its final weights), or a checkpoint (or a run directory with
    /// checkpoints but no final weights).
    source: PathBuf,
    /// Output directory; it must not already hold a model.safetensors.
    #[arg(long, short, value_name = "DIR")]
    output: PathBuf,
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// The backend to check against the CPU reference (`cpu` checks the f32 CPU backend itself).
    #[arg(long, value_enum, default_value_t = CheckDevice::Cuda)]
    device: CheckDevice,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Only ops whose name contains this text (for example `attention`).
    #[arg(long, value_name = "TEXT")]
    filter: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CheckDevice {
    Cuda,
    Cpu,
}

#[derive(Debug, Args)]
struct TrainArgs {
    /// YAML config file. Without it, the built-in default job (configs/tiny.yaml) runs.
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Override one config key, for example `--set train.lr=1e-3` (repeatable; applied in order).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Number of ranks: short for `--set parallel.world_size=N`.
    #[arg(long, value_name = "N")]
    world: Option<usize>,
    /// Where this run writes its config, metrics and weights. Must not exist or be empty.
    /// Default: runs/<config name>-<UTC date-time>.
    #[arg(long, value_name = "DIR")]
    run_dir: Option<PathBuf>,
    /// Print the fully resolved config (every default included) and exit without training.
    #[arg(long)]
    print_config: bool,
    /// Print the unit layout, how it is sharded, and the memory per rank; then exit without
    /// training or writing anything.
    #[arg(long)]
    dry_run: bool,
    /// Continue from a checkpoint: a `step-N` directory, a run directory (its newest checkpoint),
    /// or `latest` (the newest checkpoint in --run-dir, or under runs/). The config comes from the
    /// checkpoint; `--set` and `--world` may change it (another world size or strategy reshards).
    /// The run continues in the checkpoint's run directory unless --run-dir names another.
    #[arg(long, value_name = "PATH|latest")]
    resume: Option<String>,
}

#[derive(Debug, Args)]
struct SampleArgs {
    /// Run directory of a finished training run (holds config.yaml and model.safetensors).
    #[arg(long, value_name = "DIR")]
    run_dir: PathBuf,
    /// Text to continue. Empty: start a new line.
    #[arg(long, default_value = "")]
    prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Softmax temperature; 0 always picks the most likely token.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Sample among the k most likely tokens; 0 means all of them.
    #[arg(long, default_value_t = 20)]
    top_k: usize,
    /// Random seed: the same seed gives the same text.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Entry point of the binary: parses arguments, runs, prints errors, picks the exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse(); // exits 2 with clap's own message on bad arguments
    init_logging();
    match try_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            if err.downcast_ref::<ConfigError>().is_some()
                || err.downcast_ref::<UsageError>().is_some()
            {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn try_main(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(args) => train_command(args),
        Command::Sample(args) => sample_command(args),
        Command::Check(args) => check_command(args),
        Command::Ckpt {
            command: CkptCommand::Inspect { path },
        } => {
            print!("{}", checkpoint::inspect(&path)?);
            Ok(())
        }
        Command::Export(args) => export_command(args),
    }
}

fn train_command(args: TrainArgs) -> Result<()> {
    let mut overrides = args.set;
    if let Some(n) = args.world {
        overrides.push(format!("parallel.world_size={n}"));
    }
    if let Some(resume) = &args.resume {
        return resume_command(
            resume,
            args.config.as_deref(),
            args.run_dir,
            &overrides,
            args.print_config,
            args.dry_run,
        );
    }
    // Everything is validated before anything is written.
    let cfg = Config::load(args.config.as_deref(), &overrides)?;
    if args.print_config {
        print!("{}", cfg.to_yaml());
        return Ok(());
    }
    if args.dry_run {
        print!("{}", train::describe_plan(&cfg));
        return Ok(());
    }
    let config_name = args
        .config
        .as_deref()
        .and_then(|p| p.file_stem())
        .map_or_else(|| "tiny".to_string(), |s| s.to_string_lossy().into_owned());
    // The device is opened (and init_from read) before the run directory exists: a missing GPU
    // or weights file leaves nothing behind.
    let device = train::device::resolve(cfg.device)?;
    let start = train::start_of(&cfg, None)?;
    let dir = run_dir::prepare(args.run_dir, &config_name)?;
    std::fs::write(dir.join(CONFIG_FILE), cfg.to_yaml())?;
    println!("run directory: {}", dir.display());
    run_and_report(&device, &cfg, &dir, &start)
}

/// `train --resume`: the checkpoint's config with the overrides, continued in its run directory
/// (or a new one).
fn resume_command(
    resume: &str,
    config: Option<&std::path::Path>,
    run_dir: Option<PathBuf>,
    overrides: &[String],
    print_config: bool,
    dry_run: bool,
) -> Result<()> {
    if config.is_some() {
        return Err(UsageError(
            "--resume takes the config from the checkpoint; change keys with --set (for example \
             --set train.max_steps=N, or --world N to reshard)"
                .to_string(),
        )
        .into());
    }
    let ckpt = if resume == "latest" {
        let root = run_dir.clone().unwrap_or_else(|| PathBuf::from("runs"));
        run_dir::latest_checkpoint(&root)?
    } else {
        Checkpoint::resolve(std::path::Path::new(resume))?
    };
    let origin = ckpt
        .dir
        .join(checkpoint::meta::META_FILE)
        .display()
        .to_string();
    let cfg = Config::from_yaml_str(&ckpt.meta.config_yaml, &origin, overrides)?;
    if print_config {
        print!("{}", cfg.to_yaml());
        return Ok(());
    }
    if dry_run {
        print!("{}", train::describe_plan(&cfg));
        return Ok(());
    }
    let layout = crate::model::ParamLayout::gpt(train::gpt_shape(&cfg), cfg.model.init_std);
    ckpt.check_layout(&layout)?;
    if ckpt.meta.step >= cfg.train.max_steps {
        return Err(UsageError(format!(
            "{} is at step {}, train.max_steps is {}: nothing to do (raise it with --set train.max_steps=N)",
            ckpt.dir.display(),
            ckpt.meta.step,
            cfg.train.max_steps
        ))
        .into());
    }
    let device = train::device::resolve(cfg.device)?;
    let home = run_dir::run_dir_of(&ckpt.dir);
    // `latest` searches --run-dir (a run, or a directory of runs): the run it finds continues.
    let run_dir = if resume == "latest" { None } else { run_dir };
    let same_dir = |a: &std::path::Path, b: &std::path::Path| {
        std::fs::canonicalize(a)
            .ok()
            .is_some_and(|a| std::fs::canonicalize(b).ok() == Some(a))
    };
    let dir = match run_dir {
        Some(d) if home.as_deref().is_some_and(|h| same_dir(h, &d)) => d,
        Some(d) => {
            let d = run_dir::prepare(Some(d), "resumed")?;
            std::fs::write(d.join(CONFIG_FILE), cfg.to_yaml())?;
            d
        }
        None => home.clone().ok_or_else(|| {
            UsageError(format!(
                "{} is not inside a run directory: name one with --run-dir",
                ckpt.dir.display()
            ))
        })?,
    };
    if home.as_deref().is_some_and(|h| same_dir(h, &dir)) {
        // Every file is checked before anything in the run directory changes.
        ckpt.verify_all()?;
        set_aside_final_weights(&dir, ckpt.meta.step)?;
        // The original config.yaml stays; the config this part runs with goes beside it.
        let resumed = dir.join(format!("config.resumed-from-step-{}.yaml", ckpt.meta.step));
        std::fs::write(&resumed, cfg.to_yaml())
            .with_context(|| format!("writing {}", resumed.display()))?;
    }
    println!(
        "resuming {} (step {}) in {}",
        ckpt.dir.display(),
        ckpt.meta.step,
        dir.display()
    );
    let start = train::start_of(&cfg, Some(ckpt))?;
    run_and_report(&device, &cfg, &dir, &start)
}

/// A run continued in place no longer ends with the weights it ended with before: its earlier
/// `model.safetensors` is renamed (never deleted), so that `export` and `sample` do not take it
/// for the run's newest weights.
fn set_aside_final_weights(dir: &std::path::Path, step: u64) -> Result<()> {
    let old = dir.join(train::WEIGHTS_FILE);
    if !old.exists() {
        return Ok(());
    }
    let aside = dir.join(format!("model.before-resume-from-step-{step}.safetensors"));
    if aside.exists() {
        return Err(UsageError(format!(
            "{} exists and so does {}: move one of them away before resuming in place",
            old.display(),
            aside.display()
        ))
        .into());
    }
    std::fs::rename(&old, &aside)
        .with_context(|| format!("renaming {} to {}", old.display(), aside.display()))?;
    println!(
        "the earlier final weights are kept as {} (this run goes on from step {step})",
        aside.display()
    );
    Ok(())
}

/// Trains and prints the end-of-run summary.
fn run_and_report(
    device: &train::device::Device,
    cfg: &Config,
    dir: &std::path::Path,
    start: &train::Start,
) -> Result<()> {
    train::install_stop_signals()?;
    let s = train::train_on(device, cfg, dir, start, &train::Faults::default())?;
    if let Some(step) = s.stopped_at {
        let ckpt = s
            .checkpoint
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        println!("stopped after step {step}; checkpoint: {ckpt}");
        println!("continue with: shardtrain train --resume {ckpt}");
        return Ok(());
    }
    let val = s
        .final_val_loss
        .map(|v| format!(", val_loss {v:.4}"))
        .unwrap_or_default();
    println!(
        "done: {} steps, {} tokens in {:.1}s ({:.0} tokens/s) | loss {:.4} -> {:.4}{val} | {}",
        s.steps,
        s.tokens,
        s.train_seconds,
        s.tokens_per_s,
        s.first_loss,
        s.final_loss,
        dir.display()
    );
    if let Some(peak) = s.device_memory_peak {
        println!(
            "device: {} | median step {:.1} ms | peak device memory of rank 0 {}",
            s.device,
            s.median_step_seconds * 1e3,
            mib(peak)
        );
    }
    if !s.op_times.is_empty() {
        print!("{}", render_op_times(&s.op_times));
    }
    let m = &s.memory;
    println!(
        "memory of rank 0: master params {} | param shards {} | gathered params (peak) {} | grads {} | optimizer {} | activations {} | total {} (ZeRO model state {} = {})",
        mib(m.master_params),
        mib(m.param_shards),
        mib(m.gathered_params_peak),
        mib(m.grads),
        mib(m.optimizer),
        mib(m.activations),
        mib(m.total()),
        s.zero_formula.0,
        mib(s.zero_formula.1),
    );
    Ok(())
}

fn export_command(args: ExportArgs) -> Result<()> {
    let (layout, units) = if args.source.join(train::WEIGHTS_FILE).is_file() {
        let cfg = Config::load(Some(&args.source.join(CONFIG_FILE)), &[])?;
        let layout = crate::model::ParamLayout::gpt(train::gpt_shape(&cfg), cfg.model.init_std);
        let units = train::weights::load(&args.source.join(train::WEIGHTS_FILE), &layout)?;
        (layout, units)
    } else {
        let ckpt = Checkpoint::resolve(&args.source)?;
        let origin = ckpt
            .dir
            .join(checkpoint::meta::META_FILE)
            .display()
            .to_string();
        let cfg = Config::from_yaml_str(&ckpt.meta.config_yaml, &origin, &[])?;
        let layout = crate::model::ParamLayout::gpt(train::gpt_shape(&cfg), cfg.model.init_std);
        ckpt.check_layout(&layout)?;
        let mut reader = ckpt.reader();
        let units = layout
            .units
            .iter()
            .enumerate()
            .map(|(u, spec)| Ok(reader.read(u, 0..spec.numel)?[0].clone()))
            .collect::<Result<Vec<_>>>()?;
        (layout, units)
    };
    checkpoint::hf::export_hf(&args.output, &layout, &units)?;
    println!(
        "wrote {} and config.json (Hugging Face GPT-2 layout)",
        args.output.join("model.safetensors").display()
    );
    Ok(())
}

fn check_command(args: CheckArgs) -> Result<()> {
    let opts = CheckOptions {
        seed: args.seed,
        filter: args.filter,
    };
    let report = match args.device {
        CheckDevice::Cuda => check_ops(&CudaBackend::new(&train::device::require_cuda()?)?, &opts)?,
        CheckDevice::Cpu => check_ops(&CpuBackend::<f32>::new(), &opts)?,
    };
    print!("{}", report.render());
    let failed = report.failures();
    if failed > 0 {
        bail!(
            "{failed} of {} op checks failed on {}",
            report.cases.len(),
            report.subject
        );
    }
    Ok(())
}

fn sample_command(args: SampleArgs) -> Result<()> {
    let opts = SampleOptions {
        prompt: args.prompt,
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        seed: args.seed,
    };
    let text = sample_from_run(&args.run_dir, &opts)?;
    println!("{}{text}", opts.prompt);
    Ok(())
}

/// The per-op timing table: op, calls, total and share of the timed device time.
fn render_op_times(times: &[OpTime]) -> String {
    let total: f64 = times.iter().map(|t| t.total_ms).sum();
    let mut out = format!(
        "{:<22} {:>8} {:>12} {:>7}\n",
        "op (rank 0)", "calls", "total ms", "share"
    );
    for t in times {
        out.push_str(&format!(
            "{:<22} {:>8} {:>12.2} {:>6.1}%\n",
            t.op,
            t.calls,
            t.total_ms,
            100.0 * t.total_ms / total.max(f64::MIN_POSITIVE)
        ));
    }
    out
}
