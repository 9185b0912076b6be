//! The training loop: builds, for each rank, the backend, model, sharding engine, optimizer and
//! data slice from a validated config, runs the steps (gradient accumulation, global-norm
//! clipping, sharded AdamW, schedule, evaluation) and, on rank 0, writes the run directory:
//! `config.yaml`, the metrics file, `model.safetensors`, `summary.json`. Ranks are threads
//! sharing this process, talking through the `local` communicator.

pub mod admission;
pub mod device;
mod host_memory;
pub mod metrics;
pub mod optimizer;
pub mod phases;
mod plan_report;
pub mod progress;
mod rank;
pub mod schedule;
pub mod weights;

pub use plan_report::{describe_plan, planned_memory};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, Result};
use serde::Serialize;

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::CudaBackend;
use crate::backend::{Backend, OpTime};
use crate::checkpoint::staging::writer_tag;
use crate::checkpoint::Checkpoint;
use crate::comm::local::{run_ranks, LocalComm, LocalWorld};
use crate::comm::tcp::TcpWorld;
use crate::comm::Communicator;
use crate::config::Config;
use crate::error::UsageError;
use crate::model::init::init_tensor;
use crate::model::{GptShape, ParamLayout};
use crate::shard::memory::MemoryUse;
use crate::shard::{RankComms, ShardPlan};
use device::Device;
use rank::RankTrainer;

/// Name of the final weights inside a run directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Name of the resolved config inside a run directory.
pub const CONFIG_FILE: &str = "config.yaml";

/// What a finished run reports (also written as `summary.json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainSummary {
    /// The commit the binary was built from.
    pub commit: String,
    pub device: String,
    pub world_size: usize,
    pub strategy: String,
    pub params: usize,
    /// The first step this run took: 1, or the step after the checkpoint it resumed from.
    pub first_step: u64,
    /// Steps this run took.
    pub steps: u64,
    /// The step after which a stop request ended the run early (a checkpoint was written).
    pub stopped_at: Option<u64>,
    /// The last checkpoint this run wrote.
    pub checkpoint: Option<PathBuf>,
    pub tokens: u64,
    /// Time spent in training steps (evaluation excluded).
    pub train_seconds: f64,
    pub tokens_per_s: f64,
    /// Median duration of one step, the first step (warm-up) and op-timed steps left out when
    /// others remain.
    pub median_step_seconds: f64,
    pub first_loss: f32,
    pub final_loss: f32,
    pub final_val_loss: Option<f32>,
    /// Every step's mean training loss, in order.
    pub losses: Vec<f32>,
    /// Bytes held by rank 0, measured.
    pub memory: MemoryUse,
    /// ZeRO's model-state formula for this strategy, and its value.
    pub zero_formula: (String, usize),
    /// Peak bytes of device memory rank 0's backend held (GPU; `None` on the CPU).
    pub device_memory_peak: Option<usize>,
    /// Where rank 0's device time went over the op-timed steps (`logging.profile_ops_steps`).
    pub op_times: Vec<OpTime>,
    pub weights: Option<PathBuf>,
    /// Rank 0's time per phase of every step, when phase timing was on ([`Instruments`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub step_phases: Vec<phases::StepPhases>,
}

/// How a run is observed, never what it computes: all off for `train`; `bench` turns them on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Instruments {
    /// Time every step's phases on the device's clock (see [`phases`]) into
    /// [`TrainSummary::step_phases`].
    pub phase_times: bool,
    /// No progress output on the console (a caller that prints its own report).
    pub quiet: bool,
}

/// Deliberate faults, for tests of failure handling.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    /// This rank returns an error at the start of this step (rank, step).
    pub fail_rank_at_step: Option<(usize, u64)>,
    /// Rank 0 behaves as if a stop signal arrived during this step.
    pub stop_at_step: Option<u64>,
    /// This rank fails after writing its checkpoint file of this step, before the checkpoint is
    /// committed (rank, step): a crash in the middle of a save.
    pub fail_in_checkpoint_at_step: Option<(usize, u64)>,
    /// This rank stops responding at the start of this step (rank, step): a hung rank.
    pub hang_rank_at_step: Option<(usize, u64)>,
}

impl Faults {
    /// Faults for tests of whole jobs, from `SHARDTRAIN_FAULT` (`fail:RANK:STEP`,
    /// `hang:RANK:STEP`, or `ckpt:RANK:STEP`: a failure in the middle of that step's save): only
    /// for tests of the binary and the launcher, which cannot reach into their processes.
    pub fn from_env() -> Faults {
        let Ok(spec) = std::env::var("SHARDTRAIN_FAULT") else {
            return Faults::default();
        };
        let parts: Vec<&str> = spec.split(':').collect();
        let parsed = match parts.as_slice() {
            [kind, rank, step] => rank
                .parse()
                .ok()
                .zip(step.parse().ok())
                .map(|rs| (*kind, rs)),
            _ => None,
        };
        match parsed {
            Some(("fail", rs)) => Faults {
                fail_rank_at_step: Some(rs),
                ..Faults::default()
            },
            Some(("hang", rs)) => Faults {
                hang_rank_at_step: Some(rs),
                ..Faults::default()
            },
            Some(("ckpt", rs)) => Faults {
                fail_in_checkpoint_at_step: Some(rs),
                ..Faults::default()
            },
            _ => {
                tracing::warn!(
                    "ignoring SHARDTRAIN_FAULT={spec:?} (expected fail|hang|ckpt:RANK:STEP)"
                );
                Faults::default()
            }
        }
    }
}

/// Where a run's weights come from.
#[derive(Debug, Clone)]
pub enum Start {
    /// The seeded random initialisation.
    Scratch,
    /// Full weights per unit (`model.init_from`), read once and shared by the ranks.
    Weights(Arc<Vec<Vec<f32>>>),
    /// Every piece of training state from a checkpoint (resume).
    Resume(Arc<Checkpoint>),
}

static STOP: AtomicBool = AtomicBool::new(false);

/// Whether a stop signal has arrived: the job stops at the next micro-batch, checkpoints and ends.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// Set by the stop signals' handlers (which may do no more); the watcher thread of
/// [`install_stop_signals`] turns it into [`STOP`].
static SIGNALLED: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// For a rank started by `shardtrain launch` (after [`install_stop_signals`]): SIGHUP, its
/// launcher's death (`launch::parent`), asks for the same stop, and never escalates to "quit at
/// once" as a second SIGTERM does, because the kernel may send a dying launcher's ranks several.
/// Not for other processes: it would undo `nohup`.
pub fn stop_on_hangup() -> Result<()> {
    let flag = SIGNALLED.get_or_init(|| Arc::new(AtomicBool::new(false)));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, flag.clone())?;
    Ok(())
}

/// SIGINT and SIGTERM ask the job to stop (with a checkpoint of the last complete step): the ranks
/// agree on it at the next micro-batch or evaluation-round boundary, abandoning a step in progress
/// (no update, its data replayed on resume), or after the step when it is the step's last
/// micro-batch; a second signal ends the process at once (exit 130), leaving the last complete
/// checkpoint as it is.
pub fn install_stop_signals() -> Result<()> {
    let flag = SIGNALLED.get_or_init(|| Arc::new(AtomicBool::new(false)));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // Registered first, so it sees the flag as the previous signal left it.
        signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone())?;
        signal_hook::flag::register(sig, flag.clone())?;
    }
    // The handler may only set an AtomicBool; a watcher thread turns it into the job's flag
    // and says what happens next.
    let flag = flag.clone();
    std::thread::spawn(move || loop {
        if flag.load(Ordering::Relaxed) && !STOP.swap(true, Ordering::Relaxed) {
            eprintln!(
                "stop requested: stopping after this micro-batch (a step in progress is abandoned \
                 and replayed on resume) and writing a checkpoint (signal again to quit at once)"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    });
    Ok(())
}

/// The directory checkpoints of a run go to.
pub fn checkpoint_root(cfg: &Config, run_dir: &Path) -> PathBuf {
    if cfg.checkpoint.dir.is_empty() {
        run_dir.join("checkpoints")
    } else {
        PathBuf::from(&cfg.checkpoint.dir)
    }
}

/// The model shape a config describes.
pub fn gpt_shape(cfg: &Config) -> GptShape {
    GptShape {
        n_layer: cfg.model.n_layer,
        n_head: cfg.model.n_head,
        d_model: cfg.model.d_model,
        vocab_size: cfg.model.vocab_size,
        block_size: cfg.model.block_size,
    }
}

/// Initial weights of every unit, on the host.
pub fn initial_weights(layout: &ParamLayout, seed: u64) -> Vec<Vec<f32>> {
    let mut units: Vec<Vec<f32>> = layout.units.iter().map(|u| vec![0.0; u.numel]).collect();
    for (u, t) in layout.tensors() {
        units[u][t.offset..t.offset + t.numel()].copy_from_slice(&init_tensor(t, seed));
    }
    units
}

/// Runs the training job `cfg` (already validated), writing into the existing, empty `run_dir`.
pub fn train(cfg: &Config, run_dir: &Path) -> Result<TrainSummary> {
    let start = start_of(cfg, None)?;
    train_on(
        &device::resolve(cfg.device)?,
        cfg,
        run_dir,
        &start,
        &Faults::default(),
    )
}

/// [`train`] with injected faults.
pub fn train_with_faults(cfg: &Config, run_dir: &Path, faults: &Faults) -> Result<TrainSummary> {
    let start = start_of(cfg, None)?;
    train_on(&device::resolve(cfg.device)?, cfg, run_dir, &start, faults)
}

/// Where `cfg`'s weights come from: the checkpoint to resume, else `model.init_from`, else the
/// random initialisation. Reading `init_from` happens here, once, before any rank starts.
pub fn start_of(cfg: &Config, resume: Option<Checkpoint>) -> Result<Start> {
    if let Some(ckpt) = resume {
        return Ok(Start::Resume(Arc::new(ckpt)));
    }
    if cfg.model.init_from.is_empty() {
        return Ok(Start::Scratch);
    }
    let layout = ParamLayout::gpt(gpt_shape(cfg), cfg.model.init_std);
    // A missing or unsuitable file is input to fix (exit 2), as a bad config is.
    let weights = crate::checkpoint::hf::import_hf(Path::new(&cfg.model.init_from), &layout)
        .map_err(|e| UsageError(format!("model.init_from: {e:#}")))?;
    Ok(Start::Weights(Arc::new(weights)))
}

/// [`train`] on a device already resolved (so a missing GPU fails before a run directory is made).
pub fn train_on(
    device: &Device,
    cfg: &Config,
    run_dir: &Path,
    start: &Start,
    faults: &Faults,
) -> Result<TrainSummary> {
    train_instrumented(device, cfg, run_dir, start, faults, Instruments::default())
}

/// [`train_on`] with the instruments given (ranks as threads of this process).
pub fn train_instrumented(
    device: &Device,
    cfg: &Config,
    run_dir: &Path,
    start: &Start,
    faults: &Faults,
    instruments: Instruments,
) -> Result<TrainSummary> {
    let plan = ShardPlan::new(&cfg.parallel);
    let world = LocalWorld::new(
        plan.world_size,
        Duration::from_secs_f64(cfg.parallel.collective_timeout_s),
    );
    let comms = rank_comms(&world, &plan);
    // The ranks are threads of this one writer: one tag for all of them.
    let writer = writer_tag();
    let results = run_ranks(&world, |rank, _| {
        let comms = comms[rank]
            .lock()
            .map_err(|_| anyhow!("rank {rank}: communicator lock poisoned"))?
            .take()
            .ok_or_else(|| anyhow!("rank {rank}: communicators already taken"))?;
        match device {
            Device::Cpu => RankTrainer::new(
                CpuBackend::<f32>::new(),
                rank,
                cfg,
                run_dir,
                plan.clone(),
                comms,
                start,
                &writer,
            )?
            .instrument(instruments)
            .run(faults),
            Device::Cuda(gpu) => RankTrainer::new(
                CudaBackend::new(gpu)?,
                rank,
                cfg,
                run_dir,
                plan.clone(),
                comms,
                start,
                &writer,
            )?
            .instrument(instruments)
            .run(faults),
        }
    })?;
    results
        .into_iter()
        .next()
        .flatten()
        .ok_or_else(|| anyhow!("rank 0 returned no summary"))
}

/// This process's rank of a multi-process job (`shardtrain launch`, torchrun, srun, mpirun) over
/// the TCP mesh `world`; returns the summary on rank 0. The device is this process's own (the CPU,
/// or its local GPU, then with data staged through the host: NCCL is the GPU transport). `writer`
/// is the job's writer tag (see [`crate::checkpoint::staging`]), the same in every process.
pub fn train_process(
    device: &Device,
    cfg: &Config,
    run_dir: &Path,
    start: &Start,
    faults: &Faults,
    world: &Arc<TcpWorld>,
    writer: &str,
) -> Result<Option<TrainSummary>> {
    let plan = ShardPlan::new(&cfg.parallel);
    let rank = world.rank();
    if world.size() != plan.world_size {
        anyhow::bail!(
            "the job has {} processes but parallel.world_size is {}",
            world.size(),
            plan.world_size
        );
    }
    let comms = RankComms {
        world: world.group(&(0..plan.world_size).collect::<Vec<_>>())?,
        shard: world.group(&plan.shard_group(rank))?,
        replica: world.group(&plan.replica_group(rank))?,
    };
    match device {
        Device::Cpu => train_rank(
            CpuBackend::<f32>::new(),
            rank,
            cfg,
            run_dir,
            start,
            faults,
            comms,
            writer,
        ),
        Device::Cuda(gpu) => train_rank(
            CudaBackend::new(gpu)?,
            rank,
            cfg,
            run_dir,
            start,
            faults,
            comms,
            writer,
        ),
    }
}

/// The validation loss of weights (`start`: a checkpoint, or full weights), on one rank of
/// `device`, over `train.eval_tokens` tokens of the config's validation data.
pub fn evaluate(device: &Device, cfg: &Config, start: Start, run_dir: &Path) -> Result<f32> {
    let mut cfg = cfg.clone();
    cfg.parallel.world_size = 1;
    cfg.parallel.shard_group_size = 0;
    let plan = ShardPlan::new(&cfg.parallel);
    let world = LocalWorld::new(
        1,
        Duration::from_secs_f64(cfg.parallel.collective_timeout_s),
    );
    let comms = rank_comms(&world, &plan)
        .pop()
        .and_then(|m| m.into_inner().ok().flatten())
        .ok_or_else(|| anyhow!("no communicators for one rank"))?;
    // Nothing is saved: the run directory only locates the tokenized-text cache (data.kind text).
    match device {
        Device::Cpu => RankTrainer::new(
            CpuBackend::<f32>::new(),
            0,
            &cfg,
            run_dir,
            plan,
            comms,
            &start,
            &writer_tag(),
        )?
        .evaluate_only(),
        Device::Cuda(gpu) => RankTrainer::new(
            CudaBackend::new(gpu)?,
            0,
            &cfg,
            run_dir,
            plan,
            comms,
            &start,
            &writer_tag(),
        )?
        .evaluate_only(),
    }
}

/// One rank's training with the backend and communicators given (the building block of every
/// way ranks are run); returns the summary on rank 0. `writer` is the job's writer tag, the same
/// on every rank (see [`crate::checkpoint::staging`]).
pub fn train_rank<B: Backend, C: Communicator>(
    be: B,
    rank: usize,
    cfg: &Config,
    run_dir: &Path,
    start: &Start,
    faults: &Faults,
    comms: RankComms<C>,
    writer: &str,
) -> Result<Option<TrainSummary>> {
    let plan = ShardPlan::new(&cfg.parallel);
    RankTrainer::new(be, rank, cfg, run_dir, plan, comms, start, writer)?.run(faults)
}

/// Every rank's communicators: the whole world, its shard group, its replica group.
fn rank_comms(world: &LocalWorld, plan: &ShardPlan) -> Vec<Mutex<Option<RankComms<LocalComm>>>> {
    let n = plan.world_size;
    let mut world_comms: Vec<Option<LocalComm>> = world
        .group(&(0..n).collect::<Vec<_>>())
        .into_iter()
        .map(Some)
        .collect();
    let mut shard: Vec<Option<LocalComm>> = (0..n).map(|_| None).collect();
    let mut replica: Vec<Option<LocalComm>> = (0..n).map(|_| None).collect();
    for ranks in plan.all_shard_groups() {
        for (rank, comm) in ranks.iter().zip(world.group(&ranks)) {
            shard[*rank] = Some(comm);
        }
    }
    for ranks in plan.all_replica_groups() {
        for (rank, comm) in ranks.iter().zip(world.group(&ranks)) {
            replica[*rank] = Some(comm);
        }
    }
    (0..n)
        .map(|r| {
            Mutex::new(Some(RankComms {
                world: world_comms[r].take().expect("one per rank"),
                shard: shard[r].take().expect("groups partition the ranks"),
                replica: replica[r].take().expect("groups partition the ranks"),
            }))
        })
        .collect()
}
