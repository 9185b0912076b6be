//! `shardtrain train`: resolving what to run (a new run, or a checkpoint to resume and where),
//! then running it with ranks as threads of this process, or as this process's rank of a
//! multi-process job (launched by `shardtrain launch`, torchrun, srun or mpirun).
//!
//! Resolving writes nothing; making the run directory is a separate step, done by the one process
//! that owns it (rank 0), after every input has been checked.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use super::run_lock::RunLock;
use super::{nccl_ids, render_op_times, run_dir, TrainArgs};
use crate::backend::cuda::CudaBackend;
use crate::checkpoint::{self, Checkpoint};
use crate::comm::nccl::{self, NcclComm};
use crate::config::Config;
use crate::error::UsageError;
use crate::launch::env::{from_process_env, RankEnv, RankFlags};
use crate::shard::memory::mib;
use crate::shard::{RankComms, ShardPlan};
use crate::train::admission::Sharing;
use crate::train::device::Device;
use crate::train::{self, Start, TrainSummary, CONFIG_FILE};

/// Where the run writes, decided before anything is written.
enum RunDir {
    /// A new directory: the one named, or a fresh `runs/<name>-<time>`.
    New {
        explicit: Option<PathBuf>,
        name: String,
    },
    /// Continue the checkpoint's own run directory.
    InPlace(PathBuf),
}

/// A `train` invocation, resolved.
struct Job {
    cfg: Config,
    start: Start,
    dir: RunDir,
    /// The checkpoint resumed from, if any.
    resume: Option<Arc<Checkpoint>>,
}

pub(super) fn train_command(args: TrainArgs) -> Result<()> {
    // Explicit flags win over launcher variables; --world is the process count once --rank is set.
    let flags = RankFlags {
        rank: args.rank,
        world_size: args.rank.and(args.world),
        local_rank: None,
        master_addr: args.master_addr.clone(),
        master_port: args.master_port,
    };
    let rank_env = from_process_env(&flags)?;
    let mut overrides = args.set.clone();
    if let Some(n) = args.world {
        overrides.push(format!("parallel.world_size={n}"));
    }
    if let Some(d) = &args.device {
        overrides.push(format!("device={d}"));
    }
    if let Some(env) = &rank_env {
        // The launcher decides how many ranks there are.
        overrides.push(format!("parallel.world_size={}", env.world_size));
    }
    let Some(job) = resolve(&args, &overrides)? else {
        return Ok(());
    };
    match rank_env {
        None => {
            // The device is opened before the run directory exists: a missing GPU leaves nothing.
            let device = train::device::resolve(job.cfg.device)?;
            train::admission::admit(&job.cfg, &device, Sharing::local(&job.cfg))?;
            // Held until the run ends: no other writer gets the directory meanwhile.
            let (dir, _locks) = make_run_dir(&job)?;
            train::install_stop_signals()?;
            let s = train::train_on(&device, &job.cfg, &dir, &job.start, &faults_of(&job))?;
            report(&s, &dir)
        }
        Some(env) => train_as_process(&job, &env, args.job_token_file.as_deref()),
    }
}

/// Injected faults (tests of whole jobs): only in a run that starts from scratch, so that a restart
/// from a checkpoint does not meet the same fault again.
fn faults_of(job: &Job) -> train::Faults {
    if job.resume.is_some() {
        train::Faults::default()
    } else {
        train::Faults::from_env()
    }
}

/// What rank 0 hands every rank at the rendezvous.
#[derive(serde::Serialize, serde::Deserialize)]
struct JobPayload {
    run_dir: PathBuf,
    /// The job's writer tag, which names its checkpoints' staging directories.
    writer: String,
    /// NCCL unique ids by communicator (see [`nccl_ids::comm_key`]), when the ranks run on GPUs.
    nccl_ids: Option<BTreeMap<String, Vec<u8>>>,
}

/// This process is one rank of a multi-process job: rank 0 makes the run directory, holding its
/// lock for the job's life (the other ranks, maybe on other hosts, never touch the lock), draws the
/// job's writer tag (and, on GPUs, an NCCL id per communicator) and hands them to the others at the
/// rendezvous; every rank then trains its shard, over NCCL on GPUs, over the TCP mesh on the CPU.
fn train_as_process(job: &Job, env: &RankEnv, token_file: Option<&Path>) -> Result<()> {
    // First: a bad token file is bad input found before anything is written.
    let key = crate::launch::token::for_rank(token_file, env.rank)?;
    let device = train::device::resolve_on(job.cfg.device, crate::launch::device_ordinal(env))?;
    train::admission::admit(
        &job.cfg,
        &device,
        Sharing::one_per_process(env.local_world_size),
    )?;
    let timeout = Duration::from_secs_f64(job.cfg.parallel.collective_timeout_s);
    let plan = ShardPlan::new(&job.cfg.parallel);
    // NCCL needs real GPUs; ranks of a multi-process job on the simulated GPU go over TCP.
    let gpu = device.is_real_gpu();
    // Rank 0 holds the run directory's lock until the job ends.
    let (payload, _locks) = if env.rank == 0 {
        let nccl_ids = if gpu {
            Some(nccl_ids::draw_ids(&plan, nccl::new_unique_id)?)
        } else {
            None
        };
        let (run_dir, locks) = make_run_dir(job)?;
        let writer = checkpoint::staging::writer_tag();
        let payload = JobPayload {
            run_dir,
            writer,
            nccl_ids,
        };
        (serde_json::to_vec(&payload)?, locks)
    } else {
        (Vec::new(), Vec::new())
    };
    let joined = crate::launch::join(env, key.as_ref(), &payload, timeout)?;
    let payload: JobPayload = serde_json::from_slice(&joined.payload)
        .context("reading what rank 0 handed out at the rendezvous")?;
    let dir = payload.run_dir;
    train::install_stop_signals()?;
    if crate::launch::parent::launcher_pid().is_some() {
        // Its launcher's death comes as SIGHUP (see `launch::parent`).
        train::stop_on_hangup()?;
        crate::launch::parent::quiet_output_when_orphaned()?;
    }
    let faults = faults_of(job);
    let summary = match (&device, &payload.nccl_ids) {
        (Device::Cuda(gpu), Some(ids)) => {
            let be = CudaBackend::new(gpu)?;
            let rank = env.rank;
            // Created in the same order on every rank, each from its own id; the first failure
            // stops (the others would only wait out their own timeouts).
            let mut made = Vec::with_capacity(3);
            for (role, group) in nccl_ids::rank_communicators(&plan, rank) {
                let id = nccl_ids::id_for(ids, role, &group)?;
                let comm = NcclComm::init(&be, &group, rank, id, timeout)
                    .with_context(|| format!("the {role} communicator"))?;
                made.push(comm);
            }
            let [world, shard, replica]: [NcclComm; 3] =
                made.try_into().expect("a rank makes three communicators");
            let comms = RankComms {
                world,
                shard,
                replica,
            };
            let writer = &payload.writer;
            train::train_rank(be, rank, &job.cfg, &dir, &job.start, &faults, comms, writer)?
        }
        _ => train::train_process(
            &device,
            &job.cfg,
            &dir,
            &job.start,
            &faults,
            &joined.world,
            &payload.writer,
        )?,
    };
    match summary {
        Some(s) => report(&s, &dir),
        None => Ok(()),
    }
}

/// What to run, with every input checked and nothing written. `None` when the invocation only
/// prints (`--print-config`, `--dry-run`).
fn resolve(args: &TrainArgs, overrides: &[String]) -> Result<Option<Job>> {
    if let Some(resume) = &args.resume {
        return resolve_resume(args, resume, overrides);
    }
    let cfg = Config::load(args.config.as_deref(), overrides)?;
    if args.print_config {
        print!("{}", cfg.to_yaml());
        return Ok(None);
    }
    if args.dry_run {
        print!("{}", train::describe_plan(&cfg));
        return Ok(None);
    }
    let name = args
        .config
        .as_deref()
        .and_then(|p| p.file_stem())
        .map_or_else(|| "tiny".to_string(), |s| s.to_string_lossy().into_owned());
    let start = train::start_of(&cfg, None)?;
    Ok(Some(Job {
        cfg,
        start,
        dir: RunDir::New {
            explicit: args.run_dir.clone(),
            name,
        },
        resume: None,
    }))
}

/// `train --resume`: the checkpoint's config with the overrides, continued in its run directory
/// (or a new one).
fn resolve_resume(args: &TrainArgs, resume: &str, overrides: &[String]) -> Result<Option<Job>> {
    if args.config.is_some() {
        return Err(UsageError(
            "--resume takes the config from the checkpoint; change keys with --set (for example \
             --set train.max_steps=N, or --world N to reshard)"
                .to_string(),
        )
        .into());
    }
    // Either way the checkpoint has been validated in full (`Checkpoint::open`).
    let ckpt = if resume == "latest" {
        let root = args
            .run_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("runs"));
        run_dir::latest_checkpoint(&root)?
    } else {
        Checkpoint::resolve(Path::new(resume))?
    };
    let saved = ckpt.config(&[])?;
    let origin = ckpt
        .dir
        .join(checkpoint::meta::META_FILE)
        .display()
        .to_string();
    let cfg = Config::from_yaml_str(&ckpt.meta.config_yaml, &origin, overrides)?;
    let layout = crate::model::ParamLayout::gpt(train::gpt_shape(&cfg), cfg.model.init_std);
    ckpt.check_layout(&layout)?;
    refuse_model_change(&ckpt, &saved, &cfg)?;
    if args.print_config {
        print!("{}", cfg.to_yaml());
        return Ok(None);
    }
    if args.dry_run {
        print!("{}", train::describe_plan(&cfg));
        return Ok(None);
    }
    if ckpt.meta.step >= cfg.train.max_steps {
        return Err(UsageError(format!(
            "{} is at step {}, train.max_steps is {}: nothing to do (raise it with --set train.max_steps=N)",
            ckpt.dir.display(),
            ckpt.meta.step,
            cfg.train.max_steps
        ))
        .into());
    }
    let home = run_dir::run_dir_of(&ckpt.dir);
    // `latest` searches --run-dir (a run, or a directory of runs): the run it finds continues.
    let explicit = if resume == "latest" {
        None
    } else {
        args.run_dir.clone()
    };
    let dir = match explicit {
        Some(d) if home.as_deref().is_some_and(|h| same_dir(h, &d)) => RunDir::InPlace(d),
        Some(d) => RunDir::New {
            explicit: Some(d),
            name: "resumed".to_string(),
        },
        None => RunDir::InPlace(home.ok_or_else(|| {
            UsageError(format!(
                "{} is not inside a run directory: name one with --run-dir",
                ckpt.dir.display()
            ))
        })?),
    };
    let data_dir = match &dir {
        RunDir::InPlace(d) => {
            // Another run's checkpoint continues only as a new run (--run-dir NEW).
            if let Some(why) = checkpoint::binding::foreign_reason(&ckpt, &saved) {
                return Err(UsageError(format!(
                    "{} does not belong to the run it lies in: {why}; resume it as a new run with                      --run-dir NEW (nothing was written)",
                    ckpt.dir.display()
                ))
                .into());
            }
            d.clone()
        }
        RunDir::New { explicit, name } => explicit
            .clone()
            .unwrap_or_else(|| run_dir::fresh_default(name)),
    };
    // The data is the last input a resume reads: checked here, before anything is written.
    ckpt.check_data(&cfg, &data_dir)?;
    let ckpt = Arc::new(ckpt);
    Ok(Some(Job {
        start: Start::Resume(ckpt.clone()),
        cfg,
        dir,
        resume: Some(ckpt),
    }))
}

/// A resume continues the checkpoint's model: a `--set` of a key that changes what the model
/// computes (see `checkpoint::binding::fixed_on_resume`) is refused, naming the key.
fn refuse_model_change(ckpt: &Checkpoint, saved: &Config, wanted: &Config) -> Result<()> {
    match checkpoint::binding::changed_fixed_key(saved, wanted) {
        None => Ok(()),
        Some((key, was, now)) => Err(UsageError(format!(
            "--set {key}={now}: {} holds a model with {key} {was:?}, and a resume cannot change \
             the model (model.* stays; train.*, data.*, parallel.*, checkpoint.*, logging.* and \
             device may change); start a new run for another model (nothing was written)",
            ckpt.dir.display()
        ))
        .into()),
    }
}

fn same_dir(a: &Path, b: &Path) -> bool {
    std::fs::canonicalize(a)
        .ok()
        .is_some_and(|a| std::fs::canonicalize(b).ok() == Some(a))
}

/// Creates (or, resuming in place, prepares) the run directory; the only step that writes. It is
/// claimed first (see [`claim_run_dir`]); under its lock, what writers that died left unfinished
/// is removed once every input has been checked. The locks are held until dropped.
fn make_run_dir(job: &Job) -> Result<(PathBuf, Vec<RunLock>)> {
    let (dir, locks) = claim_run_dir(job)?;
    match &job.dir {
        RunDir::New { .. } => {
            std::fs::write(dir.join(CONFIG_FILE), job.cfg.to_yaml())?;
            checkpoint::binding::ensure_run_id(&dir)?;
        }
        RunDir::InPlace(d) => {
            let ckpt = job
                .resume
                .as_ref()
                .expect("only a resumed run continues in place");
            // Every input was validated in `resolve`; here the run changes, and only here.
            continue_in_place(d, ckpt, &job.cfg)?;
        }
    }
    checkpoint::staging::sweep_debris(&dir, &train::checkpoint_root(&job.cfg, &dir))?;
    match &job.resume {
        Some(ckpt) => println!(
            "resuming {} (step {}) in {}",
            ckpt.dir.display(),
            ckpt.meta.step,
            dir.display()
        ),
        None => println!("run directory: {}", dir.display()),
    }
    Ok((dir, locks))
}

/// The run directory, created if new, and locked before anything in it is created or changed
/// (a second writer is refused, exit 2, having written nothing). An outside `checkpoint.dir` is
/// locked too, first: two runs writing checkpoints into one directory clash as two writers of one
/// run would.
fn claim_run_dir(job: &Job) -> Result<(PathBuf, Vec<RunLock>)> {
    let mut locks = Vec::new();
    let own_dir = match &job.dir {
        RunDir::New { explicit, .. } => explicit.as_deref(),
        RunDir::InPlace(d) => Some(d.as_path()),
    };
    let ckpt_dir = Path::new(&job.cfg.checkpoint.dir);
    let outside =
        !job.cfg.checkpoint.dir.is_empty() && !own_dir.is_some_and(|d| is_inside(ckpt_dir, d));
    if outside {
        std::fs::create_dir_all(ckpt_dir)
            .with_context(|| format!("creating the checkpoint directory {}", ckpt_dir.display()))?;
        locks.push(RunLock::acquire_named(ckpt_dir, "checkpoint directory")?);
    }
    let (dir, lock) = match &job.dir {
        RunDir::New { explicit, name } => run_dir::prepare(explicit.clone(), name)?,
        RunDir::InPlace(d) => (d.clone(), RunLock::acquire(d)?),
    };
    locks.push(lock);
    Ok((dir, locks))
}

/// Whether `inner` is `outer` or lies under it (through symbolic links too, where both exist).
fn is_inside(inner: &Path, outer: &Path) -> bool {
    match (std::fs::canonicalize(inner), std::fs::canonicalize(outer)) {
        (Ok(i), Ok(o)) => i.starts_with(o),
        _ => match (std::path::absolute(inner), std::path::absolute(outer)) {
            (Ok(i), Ok(o)) => i.starts_with(o),
            _ => inner.starts_with(outer),
        },
    }
}

/// Continues the run in `dir` from `ckpt` with `cfg`: the config this part runs with goes beside
/// the original `config.yaml` (written whole or not at all: a temporary file renamed), and the
/// earlier `model.safetensors` is renamed (never deleted), so that `export` and `sample` do not
/// take it for the run's newest weights. A failure leaves the run as it was.
fn continue_in_place(dir: &Path, ckpt: &Checkpoint, cfg: &Config) -> Result<()> {
    let step = ckpt.meta.step;
    let old = dir.join(train::WEIGHTS_FILE);
    let aside = dir.join(format!("model.before-resume-from-step-{step}.safetensors"));
    if old.exists() && aside.exists() {
        return Err(UsageError(format!(
            "{} exists and so does {}: move one of them away before resuming in place",
            old.display(),
            aside.display()
        ))
        .into());
    }
    let resumed = free_name(dir, &format!("config.resumed-from-step-{step}"), "yaml");
    // Named `*.partial`: if this process dies before the rename, the next start sweeps it.
    let mut tmp = tempfile::Builder::new()
        .prefix(".config-resumed-")
        .suffix(".partial")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    std::io::Write::write_all(&mut tmp, cfg.to_yaml().as_bytes())
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("writing {}", resumed.display()))?;
    checkpoint::binding::ensure_run_id_as(dir, ckpt.meta.run_id.as_deref())?;
    if old.exists() {
        std::fs::rename(&old, &aside)
            .with_context(|| format!("renaming {} to {}", old.display(), aside.display()))?;
    }
    if let Err(e) = tmp.persist_noclobber(&resumed) {
        // Put the weights back: the run stays as it was.
        if aside.exists() && !old.exists() {
            let _ = std::fs::rename(&aside, &old);
        }
        return Err(e.error).with_context(|| format!("writing {}", resumed.display()));
    }
    if aside.exists() {
        println!(
            "the earlier final weights are kept as {} (this run goes on from step {step})",
            aside.display()
        );
    }
    Ok(())
}

/// `DIR/STEM.EXT`, or `DIR/STEM-2.EXT`, `-3`, ... if taken (a second resume from the same step
/// keeps the first one's config).
fn free_name(dir: &Path, stem: &str, ext: &str) -> PathBuf {
    let mut path = dir.join(format!("{stem}.{ext}"));
    let mut n = 2;
    while path.exists() {
        path = dir.join(format!("{stem}-{n}.{ext}"));
        n += 1;
    }
    path
}

/// Prints the end-of-run summary.
fn report(s: &TrainSummary, dir: &Path) -> Result<()> {
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
