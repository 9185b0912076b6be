//! The command line: argument definitions, turning them into validated settings, and mapping
//! failures to exit codes (2: bad input, the user must change something; 1: the run failed).
//! Knows which subcommand calls which layer, and nothing of how training works.

mod bench;
mod eval;
mod nccl_ids;
mod plan;
mod predict;
pub mod run_dir;
pub mod run_lock;
mod tokenize;
mod train_job;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{CudaBackend, CudaDevice};
use crate::backend::OpTime;
use crate::check::{check_ops, tensor_core, CheckOptions};
use crate::checkpoint::{self, Checkpoint};
use crate::config::{Config, ConfigError};
use crate::error::UsageError;
use crate::generate::{sample_from_checkpoint, sample_from_run, SampleOptions};
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
    /// Run a command as a multi-process job: one process per rank on this node (CPU ranks, or
    /// one per GPU), e.g. `shardtrain launch --nproc-per-node 2 -- train --config c.yaml`.
    Launch(LaunchArgs),
    /// The validation loss of a checkpoint or a finished run (over train.eval_tokens of its
    /// validation data).
    Eval(eval::EvalArgs),
    /// Turn UTF-8 text files into token shards for `data.kind: shards`.
    Tokenize(tokenize::TokenizeArgs),
    /// Predict memory per GPU, step time and scaling of a config on N GPUs for every sharding
    /// strategy, and the largest model of its shape that fits (no GPU needed).
    Plan(plan::PlanArgs),
    /// Benchmarks: `shardtrain bench --config FILE` trains at each --world size and --strategy
    /// and reports step time, tokens/s, MFU, memory per rank and time per phase;
    /// `shardtrain bench comm` measures collective bandwidth (nccl-tests style).
    #[command(args_conflicts_with_subcommands = true)]
    Bench {
        #[command(subcommand)]
        command: Option<BenchCommand>,
        #[command(flatten)]
        args: bench::BenchArgs,
    },
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

#[derive(Debug, Args)]
struct LaunchArgs {
    /// Processes (ranks) on this node: one per GPU, or CPU ranks.
    #[arg(long, value_name = "N")]
    nproc_per_node: usize,
    /// Nodes in the job.
    #[arg(long, default_value_t = 1, value_name = "M")]
    nnodes: usize,
    /// This node's index (0 on the node whose first rank is rank 0).
    #[arg(long, default_value_t = 0, value_name = "R")]
    node_rank: usize,
    /// Rank 0's address, reachable from every node.
    #[arg(long, default_value = "127.0.0.1", value_name = "HOST")]
    master_addr: String,
    /// The rendezvous port on MASTER_ADDR.
    #[arg(long, default_value_t = 29500, value_name = "PORT")]
    master_port: u16,
    /// When a rank fails, start every rank again from the newest checkpoint, up to K times.
    #[arg(long, default_value_t = 0, value_name = "K")]
    max_restarts: usize,
    /// With --max-restarts: after a failure, go on without the failed rank (and its GPU) while at
    /// least M ranks remain; the checkpoint reshards to the smaller world (global_batch_size must
    /// still divide).
    #[arg(long, default_value_t = 0, value_name = "M")]
    min_nproc: usize,
    /// Seconds the surviving ranks get to stop on their own after one fails, before SIGKILL.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    grace_s: f64,
    /// The shardtrain command every rank runs (after `--`).
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// all_gather, reduce_scatter and all_reduce bandwidth over sizes: with ranks as threads
    /// (`--world N`), or under `shardtrain launch` / torchrun / srun as processes (TCP on the
    /// CPU, NCCL on GPUs).
    Comm(bench::BenchCommArgs),
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
    /// The backend to check against the CPU reference: `cuda` (a GPU), `sim` (the CUDA backend on
    /// the simulated GPU) or `cpu` (the f32 CPU backend itself).
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
    Sim,
    Cpu,
}

#[derive(Debug, Args)]
pub(crate) struct TrainArgs {
    /// YAML config file. Without it, the built-in default job (configs/tiny.yaml) runs.
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Override one config key, for example `--set train.lr=1e-3` (repeatable; applied in order).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Number of ranks: short for `--set parallel.world_size=N`.
    #[arg(long, value_name = "N")]
    world: Option<usize>,
    /// The device: short for `--set device=D` (auto, cpu, cuda, or sim: the simulated GPU).
    #[arg(long, value_name = "D")]
    device: Option<String>,
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
    /// This process's rank in a multi-process job started by hand (with --world as the number of
    /// processes); wins over launcher variables (RANK, SLURM_PROCID, ...).
    #[arg(long, value_name = "R")]
    rank: Option<usize>,
    /// Rank 0's address for a multi-process job (wins over MASTER_ADDR).
    #[arg(long, value_name = "HOST")]
    master_addr: Option<String>,
    /// Rank 0's rendezvous port (wins over MASTER_PORT).
    #[arg(long, value_name = "PORT")]
    master_port: Option<u16>,
    /// The job token for a multi-process job, from a file only its owner may read (wins over
    /// SHARDTRAIN_JOB_TOKEN): every rank of the job must have the same one. The file holds hex,
    /// e.g. from `openssl rand -hex 32`; on a shared filesystem, one file serves every node.
    #[arg(long, value_name = "FILE")]
    job_token_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("weights").required(true).args(["run_dir", "checkpoint"])))]
struct SampleArgs {
    /// Run directory of a finished training run (holds config.yaml and model.safetensors).
    #[arg(long, value_name = "DIR")]
    run_dir: Option<PathBuf>,
    /// Or a checkpoint (a step-N directory, or a run directory: its newest checkpoint).
    #[arg(long, value_name = "PATH")]
    checkpoint: Option<PathBuf>,
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
            // Anywhere in the chain: bad input found deep inside a step (a damaged checkpoint
            // file met while resuming) is still the user's to fix.
            if err
                .chain()
                .any(|e| e.is::<ConfigError>() || e.is::<UsageError>())
            {
                ExitCode::from(2)
            } else if err.chain().any(|e| e.is::<crate::comm::PeerFailed>()) {
                // Another rank failed first: say so to the launcher, and which.
                crate::launch::status::report_peer_failure(&err);
                ExitCode::from(crate::comm::PeerFailed::EXIT_CODE)
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
        Command::Train(args) => train_job::train_command(args),
        Command::Launch(args) => launch_command(args),
        Command::Sample(args) => sample_command(args),
        Command::Check(args) => check_command(args),
        Command::Ckpt {
            command: CkptCommand::Inspect { path },
        } => {
            print!("{}", checkpoint::inspect(&path)?);
            Ok(())
        }
        Command::Export(args) => export_command(args),
        Command::Tokenize(args) => tokenize::tokenize(args),
        Command::Plan(args) => plan::plan_command(args),
        Command::Eval(args) => eval::eval_command(args),
        Command::Bench {
            command: Some(BenchCommand::Comm(args)),
            ..
        } => bench::bench_comm(args),
        Command::Bench {
            command: None,
            args,
        } => bench::bench_train(args),
    }
}

fn launch_command(args: LaunchArgs) -> Result<()> {
    let opts = crate::launch::supervise::LaunchOptions {
        nproc_per_node: args.nproc_per_node,
        nnodes: args.nnodes,
        node_rank: args.node_rank,
        master_addr: args.master_addr,
        master_port: args.master_port,
        max_restarts: args.max_restarts,
        min_nproc: args.min_nproc,
        command: args.command,
        grace: std::time::Duration::from_secs_f64(args.grace_s.max(0.0)),
    };
    let code = crate::launch::supervise::launch(&opts)?;
    if code != 0 {
        std::process::exit(code);
    }
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
        let cfg = ckpt.config(&[])?;
        let layout = crate::model::ParamLayout::gpt(train::gpt_shape(&cfg), cfg.model.init_std);
        let units = ckpt.full_weights(&layout)?;
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
    let cuda = match args.device {
        CheckDevice::Cuda => Some(train::device::require_cuda()?),
        CheckDevice::Sim => Some(CudaDevice::open_sim()?),
        CheckDevice::Cpu => None,
    };
    let report = match &cuda {
        Some(device) => check_ops(&CudaBackend::new(device)?, &opts)?,
        None => check_ops(&CpuBackend::<f32>::new(), &opts)?,
    };
    print!("{}", report.render());
    let (mut failed, mut total) = (report.failures(), report.cases.len());
    // CUDA devices also verify the tensor-core fragments the kernels build on; a --filter run is
    // about the ops it names, so it skips them.
    if let (Some(device), None) = (&cuda, &opts.filter) {
        let cases = tensor_core::check_tensor_cores(device, opts.seed)?;
        let rendered = tensor_core::render_fragment_report(&cases, &device.describe());
        print!("{rendered}");
        failed += tensor_core::fragment_failures(&cases);
        total += cases.len();
    }
    if failed > 0 {
        bail!("{failed} of {total} checks failed on {}", report.subject);
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
    let text = match (&args.run_dir, &args.checkpoint) {
        (_, Some(ckpt)) => sample_from_checkpoint(ckpt, &opts)?,
        (Some(run), None) => sample_from_run(run, &opts)?,
        (None, None) => bail!("give --run-dir or --checkpoint"),
    };
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
