//! Where a process learns its rank: from the launcher that started it.
//!
//! A multi-process job is started by some launcher: shardtrain's own, `torchrun`, Slurm's `srun`
//! or Open MPI's `mpirun`. Each tells its processes their place in the job through environment
//! variables of its own naming; this module reads whichever set is present, lets explicit
//! command-line flags override it field by field, fills the defaults and checks the result, so
//! that the rest of the program sees one [`RankEnv`] whatever started it. When nothing says this
//! is a multi-process job, [`from_env`] answers `Ok(None)` and the caller runs ranks as threads.
//!
//! Which launcher is read, first match wins (only that launcher's variables are read, plus the
//! shared `MASTER_ADDR` / `MASTER_PORT`):
//!
//! 1. shardtrain's own launcher: any of `SHARDTRAIN_RANK`, `SHARDTRAIN_WORLD_SIZE`,
//!    `SHARDTRAIN_LOCAL_RANK`, `SHARDTRAIN_LOCAL_WORLD_SIZE`; run id `SHARDTRAIN_RUN_ID`.
//! 2. torchrun: any of `RANK`, `WORLD_SIZE`, `LOCAL_WORLD_SIZE` (`LOCAL_RANK` alone is set by too
//!    many other tools to count); run id `TORCHELASTIC_RUN_ID`.
//! 3. Open MPI's `mpirun`: `OMPI_COMM_WORLD_RANK` or `OMPI_COMM_WORLD_SIZE`; run id
//!    `OMPI_MCA_orte_ess_jobid`, else `PMIX_NAMESPACE`, else `"mpi"`. Open MPI comes before Slurm
//!    because `mpirun` inside a Slurm job starts its processes through an `srun` step of its own
//!    daemons (one task per node), so they also carry `SLURM_PROCID`, `SLURM_NTASKS` and
//!    `SLURM_STEP_ID` describing the daemons, not the ranks: the inner launcher's variables are
//!    the true ones, as with torchrun run under `srun`.
//! 4. Slurm's `srun`: only inside an `srun` step of more than one task, that is `SLURM_STEP_ID`
//!    (or the older `SLURM_STEPID`) names a real step and `SLURM_NTASKS` > 1. Slurm variables are
//!    also present where a user runs one process by hand: the shell of `salloc` (no step), a batch
//!    script of `sbatch` (the batch step, which may carry `SLURM_PROCID=0` and `SLURM_NTASKS` of
//!    the whole allocation; its step id, if any, is one of Slurm's special ids, not a number
//!    below 0xFFFFFFF0), `srun --pty bash` (a step of one task). Treating any of those as rank 0
//!    of an N-rank job would wait forever for ranks that were never started, so they read as "no
//!    multi-process job" and the process can still run ranks as threads. A one-task `srun` step
//!    is one process either way.
//!
//! After the launcher, [`RankFlags`] override field by field; flags alone (`--rank` and
//! `--world`, with `--master-addr` / `--master-port` as needed) describe a job by hand
//! ([`Launcher::Flags`]).
//!
//! Defaults: `MASTER_PORT` 29500 (under Slurm 29500 + `SLURM_JOB_ID` % 1000, so two jobs sharing
//! a node do not collide); `MASTER_ADDR` the first host of the step's node list under Slurm, else
//! `127.0.0.1` only when the whole job fits on this node (local world size equal to the world
//! size, local rank equal to rank), else an error naming `MASTER_ADDR`; run id `"default"`.
//! Every error is a [`UsageError`] that names the variable (or flag) and the value at fault.

use crate::error::UsageError;
use std::fmt::Display;

/// Rendezvous port when nothing sets one (torchrun's default).
const DEFAULT_PORT: u16 = 29500;
/// Rendezvous address when the whole job runs on this node and nothing sets one.
const LOOPBACK: &str = "127.0.0.1";
/// Run id when the launcher gives none.
const DEFAULT_RUN_ID: &str = "default";
/// Most hosts [`expand_hostlist`] will produce, so a typo like `n[0-999999999]` is an error rather
/// than gigabytes of names.
const MAX_HOSTS: usize = 1 << 20;
/// Slurm step ids from here up are special steps (batch script, extern, interactive, pending),
/// not `srun` steps.
const SLURM_SPECIAL_STEP_IDS: u64 = 0xFFFF_FFF0;

/// Which launcher's variables were read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// Command-line flags alone, no launcher variables.
    Flags,
    /// shardtrain's own launcher (`SHARDTRAIN_*`).
    Shardtrain,
    /// PyTorch's `torchrun` (`RANK`, `WORLD_SIZE`, ...).
    Torchrun,
    /// Slurm's `srun` (`SLURM_PROCID`, `SLURM_NTASKS`, ...).
    Slurm,
    /// Open MPI's `mpirun` (`OMPI_COMM_WORLD_*`).
    OpenMpi,
}

/// One process's place in a multi-process job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankEnv {
    /// This process's rank, `0..world_size`.
    pub rank: usize,
    /// Number of ranks in the job.
    pub world_size: usize,
    /// This process's index among the ranks on its node, `0..local_world_size`.
    pub local_rank: usize,
    /// Number of ranks on this node.
    pub local_world_size: usize,
    /// Host of rank 0, where the ranks meet.
    pub master_addr: String,
    /// Port on `master_addr` where the ranks meet.
    pub master_port: u16,
    /// Identifies the job so that ranks of two jobs sharing a port never join each other.
    pub run_id: String,
    /// Whose variables this came from.
    pub launcher: Launcher,
}

/// Explicit values from the command line; each one given wins over the environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RankFlags {
    /// `--rank`.
    pub rank: Option<usize>,
    /// `--world`.
    pub world_size: Option<usize>,
    /// `--local-rank`.
    pub local_rank: Option<usize>,
    /// `--master-addr`.
    pub master_addr: Option<String>,
    /// `--master-port`.
    pub master_port: Option<u16>,
}

impl RankFlags {
    fn is_empty(&self) -> bool {
        *self == RankFlags::default()
    }
}

/// `Ok(None)` when nothing says this is a multi-process job (no flags, no launcher variables): the
/// caller then runs ranks as threads.
///
/// `env` looks a variable up (`None` when unset); values are trimmed of surrounding whitespace.
/// See the module documentation for the launchers, their order and the defaults.
pub fn from_env(
    flags: &RankFlags,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<RankEnv>, UsageError> {
    let found = match detect(env)? {
        Some(mut found) => {
            found.apply(flags);
            found
        }
        None if flags.is_empty() => return Ok(None),
        None => {
            let mut found = Found::new(Launcher::Flags, FLAG_NAMES, DEFAULT_PORT, DEFAULT_RUN_ID);
            found.apply(flags);
            let missing: Vec<&str> = [
                ("--rank", found.rank.is_none()),
                ("--world", found.world_size.is_none()),
            ]
            .into_iter()
            .filter_map(|(name, missing)| missing.then_some(name))
            .collect();
            if !missing.is_empty() {
                return Err(usage(format!(
                    "{} {} missing: no launcher variables were found (torchrun, srun, mpirun or \
                     shardtrain's own), so flags alone must give both --rank and --world",
                    missing.join(" and "),
                    if missing.len() == 1 { "is" } else { "are" },
                )));
            }
            found
        }
    };
    found.finish().map(Some)
}

/// The same, reading the process environment.
pub fn from_process_env(flags: &RankFlags) -> Result<Option<RankEnv>, UsageError> {
    from_env(flags, &|name| {
        std::env::var_os(name).map(|v| v.to_string_lossy().into_owned())
    })
}

/// Expands a Slurm hostlist (SLURM_JOB_NODELIST) and returns its hosts in order:
/// `"node[01-03,07],gpu5"` -> `["node01","node02","node03","node07","gpu5"]`; also `"a,b"`,
/// `"n[1-2]-ib"`, `"host"` plain, zero-padded ranges keep width. Errors on malformed input.
///
/// A host may hold several bracket groups (`"r[1-2]n[1-2]"`): the leftmost varies slowest, as in
/// Slurm. A range's numbers are padded to the width of its first number (`"[08-10]"` -> `08 09
/// 10`, `"[8-10]"` -> `8 9 10`). Unbalanced or nested brackets, empty hosts or ranges, non-digits
/// inside brackets, backwards ranges and lists of more than 2^20 hosts are errors.
pub fn expand_hostlist(list: &str) -> Result<Vec<String>, String> {
    let list = list.trim();
    if list.is_empty() {
        return Err("the hostlist is empty".into());
    }
    let mut hosts = Vec::new();
    for item in split_top_level(list)? {
        if item.is_empty() {
            return Err(format!("hostlist {list:?} has an empty host name"));
        }
        expand_host(item, &mut hosts).map_err(|e| format!("hostlist {list:?}: {e}"))?;
    }
    Ok(hosts)
}

// ---------------------------------------------------------------------------------------------
// Values and the names they are shown by.

fn usage(message: impl Into<String>) -> UsageError {
    UsageError(message.into())
}

/// A value together with where it came from, for messages: `name` alone (`RANK`, `--rank`) and
/// `shown` with its value (`RANK=3`, `--rank 3`).
#[derive(Debug, Clone)]
struct Val<T> {
    value: T,
    name: String,
    shown: String,
}

impl<T> Val<T> {
    fn from_env(name: &str, raw: &str, value: T) -> Self {
        Val {
            value,
            name: name.to_string(),
            shown: format!("{name}={raw}"),
        }
    }

    fn from_flag(name: &str, value: T) -> Self
    where
        T: Display,
    {
        Val {
            shown: format!("{name} {value}"),
            name: name.to_string(),
            value,
        }
    }

    fn derived(value: T, name: impl Into<String>, shown: impl Into<String>) -> Self {
        Val {
            value,
            name: name.into(),
            shown: shown.into(),
        }
    }
}

/// A variable's trimmed value, `None` when unset.
fn var(env: &dyn Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    env(name).map(|v| v.trim().to_string())
}

/// A count or index (`RANK`, `WORLD_SIZE`, ...).
fn count(
    env: &dyn Fn(&str) -> Option<String>,
    name: &str,
) -> Result<Option<Val<usize>>, UsageError> {
    let Some(raw) = var(env, name) else {
        return Ok(None);
    };
    match raw.parse::<usize>() {
        Ok(value) => Ok(Some(Val::from_env(name, &raw, value))),
        Err(_) if raw.is_empty() => Err(usage(format!(
            "{name} is set but empty: expected a whole number"
        ))),
        Err(_) => Err(usage(format!("{name}={raw} is not a whole number"))),
    }
}

/// A TCP port, 1 to 65535 (`MASTER_PORT`).
fn port(env: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<Option<Val<u16>>, UsageError> {
    let Some(raw) = var(env, name) else {
        return Ok(None);
    };
    match raw.parse::<u16>() {
        Ok(value) if value > 0 => Ok(Some(Val::from_env(name, &raw, value))),
        _ => Err(usage(format!(
            "{name}={raw} is not a TCP port (a whole number from 1 to 65535)"
        ))),
    }
}

fn master_addr(env: &dyn Fn(&str) -> Option<String>) -> Option<Val<String>> {
    var(env, "MASTER_ADDR").map(|raw| Val::from_env("MASTER_ADDR", &raw, raw.clone()))
}

/// The first of `names` that is set and not empty, else `default`.
fn run_id(env: &dyn Fn(&str) -> Option<String>, names: &[&str], default: &str) -> String {
    names
        .iter()
        .filter_map(|name| var(env, name))
        .find(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

// ---------------------------------------------------------------------------------------------
// What a launcher's variables say, before flags, defaults and checks.

/// The names a launcher gives to the four counts, for messages about missing ones.
#[derive(Debug, Clone, Copy)]
struct Names {
    rank: &'static str,
    world_size: &'static str,
    local_rank: &'static str,
    local_world_size: &'static str,
}

const SHARDTRAIN_NAMES: Names = Names {
    rank: "SHARDTRAIN_RANK",
    world_size: "SHARDTRAIN_WORLD_SIZE",
    local_rank: "SHARDTRAIN_LOCAL_RANK",
    local_world_size: "SHARDTRAIN_LOCAL_WORLD_SIZE",
};
const TORCHRUN_NAMES: Names = Names {
    rank: "RANK",
    world_size: "WORLD_SIZE",
    local_rank: "LOCAL_RANK",
    local_world_size: "LOCAL_WORLD_SIZE",
};
const SLURM_NAMES: Names = Names {
    rank: "SLURM_PROCID",
    world_size: "SLURM_NTASKS",
    local_rank: "SLURM_LOCALID",
    local_world_size: "SLURM_NTASKS_PER_NODE",
};
const MPI_NAMES: Names = Names {
    rank: "OMPI_COMM_WORLD_RANK",
    world_size: "OMPI_COMM_WORLD_SIZE",
    local_rank: "OMPI_COMM_WORLD_LOCAL_RANK",
    local_world_size: "OMPI_COMM_WORLD_LOCAL_SIZE",
};
const FLAG_NAMES: Names = Names {
    rank: "--rank",
    world_size: "--world",
    local_rank: "--local-rank",
    local_world_size: "the local world size",
};

/// One launcher's reading, each field `None` where it said nothing.
#[derive(Debug)]
struct Found {
    launcher: Launcher,
    names: Names,
    rank: Option<Val<usize>>,
    world_size: Option<Val<usize>>,
    local_rank: Option<Val<usize>>,
    local_world_size: Option<Val<usize>>,
    master_addr: Option<Val<String>>,
    master_port: Option<Val<u16>>,
    /// Port when neither `MASTER_PORT` nor `--master-port` gives one.
    default_port: u16,
    run_id: String,
    /// Added to the message when `MASTER_ADDR` is needed and missing.
    master_hint: &'static str,
}

impl Found {
    fn new(launcher: Launcher, names: Names, default_port: u16, run_id: &str) -> Self {
        Found {
            launcher,
            names,
            rank: None,
            world_size: None,
            local_rank: None,
            local_world_size: None,
            master_addr: None,
            master_port: None,
            default_port,
            run_id: run_id.to_string(),
            master_hint: "",
        }
    }

    /// Reads the four counts under `names`, and `MASTER_ADDR` / `MASTER_PORT`.
    fn read(
        launcher: Launcher,
        names: Names,
        env: &dyn Fn(&str) -> Option<String>,
        run_id: String,
    ) -> Result<Self, UsageError> {
        let mut found = Found::new(launcher, names, DEFAULT_PORT, &run_id);
        found.rank = count(env, names.rank)?;
        found.world_size = count(env, names.world_size)?;
        found.local_rank = count(env, names.local_rank)?;
        found.local_world_size = count(env, names.local_world_size)?;
        found.master_addr = master_addr(env);
        found.master_port = port(env, "MASTER_PORT")?;
        Ok(found)
    }

    /// Flags win over the environment, field by field.
    fn apply(&mut self, flags: &RankFlags) {
        if let Some(v) = flags.rank {
            self.rank = Some(Val::from_flag("--rank", v));
        }
        if let Some(v) = flags.world_size {
            self.world_size = Some(Val::from_flag("--world", v));
        }
        if let Some(v) = flags.local_rank {
            self.local_rank = Some(Val::from_flag("--local-rank", v));
        }
        if let Some(v) = &flags.master_addr {
            let v = v.trim().to_string();
            self.master_addr = Some(Val::from_flag("--master-addr", v));
        }
        if let Some(v) = flags.master_port {
            self.master_port = Some(Val::from_flag("--master-port", v));
        }
    }

    /// Fills the defaults and checks the whole.
    fn finish(self) -> Result<RankEnv, UsageError> {
        let names = self.names;
        let missing = |name: &str, flag: &str, what: &str| {
            if self.launcher == Launcher::Flags {
                usage(format!("{flag} is missing: cannot tell {what}"))
            } else {
                usage(format!(
                    "{name} is not set (and {flag} was not given): cannot tell {what}"
                ))
            }
        };
        let rank = self
            .rank
            .clone()
            .ok_or_else(|| missing(names.rank, "--rank", "this process's rank"))?;
        let world = self
            .world_size
            .clone()
            .ok_or_else(|| missing(names.world_size, "--world", "how many ranks the job has"))?;
        if world.value == 0 {
            return Err(usage(format!(
                "{}: the world size must be at least 1",
                world.shown
            )));
        }
        if rank.value >= world.value {
            return Err(usage(format!(
                "{} is not below {}",
                rank.shown, world.shown
            )));
        }

        let from_rank = || {
            Val::derived(
                rank.value,
                names.local_rank,
                format!("local rank {} (taken from {})", rank.value, rank.shown),
            )
        };
        let from_world = || {
            Val::derived(
                world.value,
                names.local_world_size,
                format!(
                    "local world size {} (taken from {})",
                    world.value, world.shown
                ),
            )
        };
        let (local_rank, local_world) = match (self.local_rank, self.local_world_size) {
            (Some(lr), Some(lw)) => (lr, lw),
            (None, None) => (from_rank(), from_world()),
            (None, Some(lw)) if lw.value == world.value => (from_rank(), lw),
            (None, Some(lw)) => {
                return Err(usage(format!(
                    "{} is not set (and --local-rank was not given), and {} is below {}: cannot \
                     tell this process's place on its node",
                    names.local_rank, lw.shown, world.shown
                )))
            }
            // Flags cannot say how many ranks share a node: take the most there can be.
            (Some(lr), None) if self.launcher == Launcher::Flags || lr.value == rank.value => {
                (lr, from_world())
            }
            (Some(lr), None) => {
                return Err(usage(format!(
                    "{} is not set, and {} differs from {} so the ranks span nodes: cannot tell \
                     how many ranks run on this node",
                    names.local_world_size, lr.shown, rank.shown
                )))
            }
        };
        if local_world.value == 0 {
            return Err(usage(format!(
                "{}: the local world size must be at least 1",
                local_world.shown
            )));
        }
        if local_world.value > world.value {
            return Err(usage(format!(
                "{} exceeds {}",
                local_world.shown, world.shown
            )));
        }
        if local_rank.value >= local_world.value {
            return Err(usage(format!(
                "{} is not below {}",
                local_rank.shown, local_world.shown
            )));
        }

        let one_node = local_world.value == world.value && local_rank.value == rank.value;
        let master_addr = match self.master_addr {
            Some(addr) if addr.value.is_empty() => {
                return Err(usage(format!(
                    "{} is set but empty: give the host name or IP address of rank 0",
                    addr.name
                )))
            }
            Some(addr) => addr.value,
            None if one_node => LOOPBACK.to_string(),
            None => {
                return Err(usage(format!(
                    "MASTER_ADDR is not set (and --master-addr was not given), and the job spans \
                     nodes ({} of {}): set it to the host of rank 0{}",
                    local_world.shown, world.shown, self.master_hint
                )))
            }
        };
        let master_port = match self.master_port {
            Some(p) if p.value == 0 => {
                return Err(usage(format!(
                    "{} is not a TCP port (a whole number from 1 to 65535)",
                    p.shown
                )))
            }
            Some(p) => p.value,
            None => self.default_port,
        };
        Ok(RankEnv {
            rank: rank.value,
            world_size: world.value,
            local_rank: local_rank.value,
            local_world_size: local_world.value,
            master_addr,
            master_port,
            run_id: self.run_id,
            launcher: self.launcher,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Detection, one launcher at a time.

fn detect(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<Found>, UsageError> {
    if let Some(found) = shardtrain(env)? {
        return Ok(Some(found));
    }
    if let Some(found) = torchrun(env)? {
        return Ok(Some(found));
    }
    if let Some(found) = open_mpi(env)? {
        return Ok(Some(found));
    }
    slurm(env)
}

fn any_set(env: &dyn Fn(&str) -> Option<String>, names: &[&str]) -> bool {
    names.iter().any(|name| env(name).is_some())
}

fn shardtrain(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<Found>, UsageError> {
    let n = SHARDTRAIN_NAMES;
    if !any_set(
        env,
        &[n.rank, n.world_size, n.local_rank, n.local_world_size],
    ) {
        return Ok(None);
    }
    let id = run_id(env, &["SHARDTRAIN_RUN_ID"], DEFAULT_RUN_ID);
    Found::read(Launcher::Shardtrain, n, env, id).map(Some)
}

fn torchrun(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<Found>, UsageError> {
    let n = TORCHRUN_NAMES;
    if !any_set(env, &[n.rank, n.world_size, n.local_world_size]) {
        return Ok(None);
    }
    let id = run_id(env, &["TORCHELASTIC_RUN_ID"], DEFAULT_RUN_ID);
    Found::read(Launcher::Torchrun, n, env, id).map(Some)
}

fn open_mpi(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<Found>, UsageError> {
    let n = MPI_NAMES;
    if !any_set(env, &[n.rank, n.world_size]) {
        return Ok(None);
    }
    let id = run_id(env, &["OMPI_MCA_orte_ess_jobid", "PMIX_NAMESPACE"], "mpi");
    let mut found = Found::read(Launcher::OpenMpi, n, env, id)?;
    found.master_hint = "; mpirun does not say where rank 0 runs, so pass it to every rank, e.g. \
                         `mpirun -x MASTER_ADDR=host -x MASTER_PORT=29500 ...`";
    Ok(Some(found))
}

/// Whether this process is a task of an `srun` step: `SLURM_STEP_ID` (or `SLURM_STEPID`) is a
/// step number, not one of the special ids of a batch script, extern or interactive step (which
/// Slurm may print as large unsigned or as negative numbers).
fn in_srun_step(env: &dyn Fn(&str) -> Option<String>) -> bool {
    var(env, "SLURM_STEP_ID")
        .or_else(|| var(env, "SLURM_STEPID"))
        .and_then(|id| id.parse::<u64>().ok())
        .is_some_and(|id| id < SLURM_SPECIAL_STEP_IDS)
}

fn slurm(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<Found>, UsageError> {
    let n = SLURM_NAMES;
    if !in_srun_step(env) {
        return Ok(None);
    }
    let world = count(env, n.world_size)?;
    if world.as_ref().is_none_or(|w| w.value <= 1) {
        return Ok(None);
    }
    let job = var(env, "SLURM_JOB_ID");
    let job_number = match &job {
        Some(raw) => Some(
            raw.parse::<u64>()
                .map_err(|_| usage(format!("SLURM_JOB_ID={raw} is not a whole number")))?,
        ),
        None => None,
    };
    // 29500..=30499: jobs with different ids usually differ here, so two jobs on one node do
    // not meet on one port; the run id tells them apart when they do.
    let default_port = job_number.map_or(DEFAULT_PORT, |id| DEFAULT_PORT + (id % 1000) as u16);
    let id = job.unwrap_or_else(|| DEFAULT_RUN_ID.to_string());
    let mut found = Found::new(Launcher::Slurm, n, default_port, &id);
    found.rank = count(env, n.rank)?;
    found.world_size = world;
    found.local_rank = count(env, n.local_rank)?;
    found.local_world_size = slurm_local_world(env)?;
    found.master_port = port(env, "MASTER_PORT")?;
    found.master_addr = match master_addr(env) {
        Some(addr) => Some(addr),
        None => slurm_first_host(env)?,
    };
    Ok(Some(found))
}

/// Rank 0 runs on the first node of the step, so that is where the ranks meet. The step's own
/// list comes first: a step may run on part of the job's nodes.
fn slurm_first_host(
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Val<String>>, UsageError> {
    for name in [
        "SLURM_STEP_NODELIST",
        "SLURM_JOB_NODELIST",
        "SLURM_NODELIST",
    ] {
        let Some(raw) = var(env, name) else { continue };
        let hosts = expand_hostlist(&raw).map_err(|e| usage(format!("{name}={raw}: {e}")))?;
        let first = hosts[0].clone();
        return Ok(Some(Val::derived(
            first.clone(),
            name,
            format!("{first} (the first host of {name}={raw})"),
        )));
    }
    Ok(None)
}

/// How many tasks of the step run on this node: the first of `SLURM_STEP_TASKS_PER_NODE` (set
/// by `srun` for the step itself), `SLURM_NTASKS_PER_NODE` and `SLURM_TASKS_PER_NODE` (which may
/// describe the whole allocation); each is a list like `4(x2),3` of counts per node, indexed by
/// `SLURM_NODEID` when they differ. Without any, `SLURM_NTASKS / SLURM_NNODES` when that divides.
fn slurm_local_world(
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Val<usize>>, UsageError> {
    for name in [
        "SLURM_STEP_TASKS_PER_NODE",
        "SLURM_NTASKS_PER_NODE",
        "SLURM_TASKS_PER_NODE",
    ] {
        let Some(raw) = var(env, name) else { continue };
        let per_node =
            parse_tasks_per_node(&raw).map_err(|e| usage(format!("{name}={raw}: {e}")))?;
        let value = if per_node.iter().all(|&c| c == per_node[0]) {
            per_node[0]
        } else {
            let node = count(env, "SLURM_NODEID")?.ok_or_else(|| {
                usage(format!(
                    "{name}={raw} gives different task counts per node, and SLURM_NODEID (this \
                     node's index) is not set: cannot tell how many tasks run on this node"
                ))
            })?;
            *per_node.get(node.value).ok_or_else(|| {
                usage(format!(
                    "{} is out of range for {name}={raw}, which lists {} nodes",
                    node.shown,
                    per_node.len()
                ))
            })?
        };
        return Ok(Some(Val::from_env(name, &raw, value)));
    }
    let Some(tasks) = count(env, "SLURM_NTASKS")? else {
        return Ok(None);
    };
    let Some(nodes) = count(env, "SLURM_NNODES")? else {
        return Ok(None);
    };
    if nodes.value == 0 || tasks.value % nodes.value != 0 {
        return Err(usage(format!(
            "{} is not divisible by {}, so the tasks on this node cannot be counted: set \
             SLURM_NTASKS_PER_NODE (srun --ntasks-per-node=N)",
            tasks.shown, nodes.shown
        )));
    }
    let value = tasks.value / nodes.value;
    Ok(Some(Val::derived(
        value,
        "SLURM_NTASKS_PER_NODE",
        format!("{value} tasks per node ({} / {})", tasks.shown, nodes.shown),
    )))
}

/// `"4(x2),3"` -> `[4, 4, 3]`.
fn parse_tasks_per_node(list: &str) -> Result<Vec<usize>, String> {
    let mut per_node = Vec::new();
    for item in list.split(',') {
        let item = item.trim();
        let (tasks, times) = match item.split_once('(') {
            Some((tasks, rest)) => {
                let times = rest
                    .strip_prefix('x')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| format!("{item:?} is not N or N(xM)"))?;
                (tasks, times)
            }
            None => (item, "1"),
        };
        let tasks: usize = tasks
            .parse()
            .map_err(|_| format!("{item:?} is not N or N(xM)"))?;
        let times: usize = times
            .parse()
            .map_err(|_| format!("{item:?} is not N or N(xM)"))?;
        if per_node.len().saturating_add(times) > MAX_HOSTS {
            return Err(format!("more than {MAX_HOSTS} nodes"));
        }
        per_node.extend(std::iter::repeat_n(tasks, times));
    }
    if per_node.is_empty() {
        return Err("no nodes listed".into());
    }
    Ok(per_node)
}

// ---------------------------------------------------------------------------------------------
// Hostlists.

/// Splits on the commas outside brackets, checking the brackets pair up and do not nest.
fn split_top_level(list: &str) -> Result<Vec<&str>, String> {
    let mut items = Vec::new();
    let mut start = 0;
    let mut open = false;
    for (i, c) in list.char_indices() {
        match c {
            '[' if open => return Err(format!("hostlist {list:?} nests brackets")),
            '[' => open = true,
            ']' if !open => return Err(format!("hostlist {list:?} has a ']' without its '['")),
            ']' => open = false,
            ',' if !open => {
                items.push(&list[start..i]);
                start = i + 1;
            }
            c if c.is_whitespace() => {
                return Err(format!("hostlist {list:?} has a space in a host name"))
            }
            _ => {}
        }
    }
    if open {
        return Err(format!("hostlist {list:?} has a '[' that is never closed"));
    }
    items.push(&list[start..]);
    Ok(items)
}

/// One part of a host pattern: literal text, or the numbers of one bracket group.
enum Part<'a> {
    Text(&'a str),
    Numbers(Vec<String>),
}

/// Appends the hosts of one pattern (`"n[1-2]-ib"`) to `hosts`.
fn expand_host(item: &str, hosts: &mut Vec<String>) -> Result<(), String> {
    let mut parts = Vec::new();
    let mut rest = item;
    let mut total: usize = 1;
    while let Some(open) = rest.find('[') {
        if open > 0 {
            parts.push(Part::Text(&rest[..open]));
        }
        // split_top_level checked every '[' has its ']'.
        let close = open + rest[open..].find(']').ok_or("unclosed '['")?;
        let numbers = expand_ranges(&rest[open + 1..close])?;
        total = total
            .checked_mul(numbers.len())
            .filter(|&t| t <= MAX_HOSTS)
            .ok_or_else(|| format!("{item:?} names more than {MAX_HOSTS} hosts"))?;
        parts.push(Part::Numbers(numbers));
        rest = &rest[close + 1..];
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest));
    }
    if hosts.len() + total > MAX_HOSTS {
        return Err(format!("more than {MAX_HOSTS} hosts"));
    }
    let mut names = vec![String::new()];
    for part in &parts {
        names = match part {
            Part::Text(text) => names.into_iter().map(|n| n + text).collect(),
            Part::Numbers(numbers) => names
                .iter()
                .flat_map(|n| numbers.iter().map(move |num| format!("{n}{num}")))
                .collect(),
        };
    }
    hosts.extend(names);
    Ok(())
}

/// The inside of one bracket group: `"01-03,07"` -> `["01","02","03","07"]`.
fn expand_ranges(ranges: &str) -> Result<Vec<String>, String> {
    if ranges.is_empty() {
        return Err("empty brackets \"[]\"".into());
    }
    let mut numbers = Vec::new();
    for range in ranges.split(',') {
        let (lo_text, hi_text) = range.split_once('-').unwrap_or((range, range));
        let number = |text: &str| -> Result<u64, String> {
            if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("range {range:?} is not N or N-M"));
            }
            text.parse()
                .map_err(|_| format!("range {range:?} has a number too large"))
        };
        let (lo, hi) = (number(lo_text)?, number(hi_text)?);
        if lo > hi {
            return Err(format!("range {range:?} runs backwards"));
        }
        if hi - lo >= (MAX_HOSTS - numbers.len()) as u64 {
            return Err(format!("range {range:?} names more than {MAX_HOSTS} hosts"));
        }
        let width = lo_text.len();
        numbers.extend((lo..=hi).map(|n| format!("{n:0width$}")));
    }
    Ok(numbers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        }
    }

    fn read_with(flags: &RankFlags, pairs: &[(&str, &str)]) -> Result<Option<RankEnv>, UsageError> {
        from_env(flags, &lookup(pairs))
    }

    fn read(pairs: &[(&str, &str)]) -> Option<RankEnv> {
        read_with(&RankFlags::default(), pairs).expect("valid environment")
    }

    fn error_with(flags: &RankFlags, pairs: &[(&str, &str)]) -> String {
        match read_with(flags, pairs) {
            Err(e) => e.0,
            Ok(found) => panic!("expected an error, got {found:?}"),
        }
    }

    fn error(pairs: &[(&str, &str)]) -> String {
        error_with(&RankFlags::default(), pairs)
    }

    fn env(
        launcher: Launcher,
        (rank, world_size): (usize, usize),
        (local_rank, local_world_size): (usize, usize),
        (master_addr, master_port): (&str, u16),
        run_id: &str,
    ) -> RankEnv {
        RankEnv {
            rank,
            world_size,
            local_rank,
            local_world_size,
            master_addr: master_addr.to_string(),
            master_port,
            run_id: run_id.to_string(),
            launcher,
        }
    }

    const TORCHRUN: &[(&str, &str)] = &[
        ("RANK", "5"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "4"),
        ("MASTER_ADDR", "10.0.0.7"),
        ("MASTER_PORT", "29400"),
        ("TORCHELASTIC_RUN_ID", "job-42"),
    ];

    const SLURM: &[(&str, &str)] = &[
        ("SLURM_STEP_ID", "0"),
        ("SLURM_PROCID", "6"),
        ("SLURM_NTASKS", "8"),
        ("SLURM_LOCALID", "2"),
        ("SLURM_NNODES", "2"),
        ("SLURM_NODEID", "1"),
        ("SLURM_STEP_TASKS_PER_NODE", "4(x2)"),
        ("SLURM_STEP_NODELIST", "gpu[07-08]"),
        ("SLURM_JOB_NODELIST", "gpu[01-08]"),
        ("SLURM_JOB_ID", "123456"),
    ];

    const MPI: &[(&str, &str)] = &[
        ("OMPI_COMM_WORLD_RANK", "3"),
        ("OMPI_COMM_WORLD_SIZE", "4"),
        ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
        ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
        ("MASTER_ADDR", "head"),
        ("OMPI_MCA_orte_ess_jobid", "1234567"),
    ];

    fn with(
        base: &[(&'static str, &'static str)],
        extra: &[(&'static str, &'static str)],
    ) -> Vec<(&'static str, &'static str)> {
        // Later entries override earlier ones: `lookup` finds the first, so put extras first.
        let mut all = extra.to_vec();
        all.extend_from_slice(base);
        all
    }

    fn without(
        base: &[(&'static str, &'static str)],
        names: &[&str],
    ) -> Vec<(&'static str, &'static str)> {
        base.iter()
            .filter(|(n, _)| !names.contains(n))
            .copied()
            .collect()
    }

    // --- nothing to read ---

    #[test]
    fn no_flags_and_no_launcher_is_none() {
        assert_eq!(read(&[]), None);
        assert_eq!(
            read(&[
                ("PATH", "/usr/bin"),
                ("HOME", "/root"),
                ("MASTER_PORT", "1234")
            ]),
            None
        );
        // LOCAL_RANK alone is set by too many tools to mean torchrun.
        assert_eq!(read(&[("LOCAL_RANK", "0")]), None);
        assert_eq!(read(&[("SHARDTRAIN_RUN_ID", "x")]), None);
    }

    #[test]
    fn salloc_sbatch_and_one_task_srun_shells_are_none() {
        // salloc -N2 -n8: the allocation's variables, no step.
        let salloc = [
            ("SLURM_JOB_ID", "99"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_NNODES", "2"),
            ("SLURM_JOB_NODELIST", "n[1-2]"),
            ("SLURM_TASKS_PER_NODE", "4(x2)"),
        ];
        assert_eq!(read(&salloc), None);
        // The batch script of sbatch -n8: rank-like variables, but no srun step.
        let batch = with(&salloc, &[("SLURM_PROCID", "0"), ("SLURM_LOCALID", "0")]);
        assert_eq!(read(&batch), None);
        // ... nor when the batch step shows one of Slurm's special step ids.
        for special in ["4294967291", "-5", "batch", "extern"] {
            assert_eq!(
                read(&with(&batch, &[("SLURM_STEP_ID", special)])),
                None,
                "{special}"
            );
        }
        // srun --pty bash: a real step, of one task.
        let pty = [
            ("SLURM_STEP_ID", "0"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_JOB_ID", "99"),
        ];
        assert_eq!(read(&pty), None);
    }

    // --- each launcher ---

    #[test]
    fn shardtrain_variables() {
        let vars = [
            ("SHARDTRAIN_RANK", "2"),
            ("SHARDTRAIN_WORLD_SIZE", "4"),
            ("SHARDTRAIN_LOCAL_RANK", "0"),
            ("SHARDTRAIN_LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "node1"),
            ("MASTER_PORT", "31000"),
            ("SHARDTRAIN_RUN_ID", "r-7"),
        ];
        assert_eq!(
            read(&vars),
            Some(env(
                Launcher::Shardtrain,
                (2, 4),
                (0, 2),
                ("node1", 31000),
                "r-7"
            ))
        );
        // One node: address, port and run id default.
        let vars = [
            ("SHARDTRAIN_RANK", "1"),
            ("SHARDTRAIN_WORLD_SIZE", "2"),
            ("SHARDTRAIN_LOCAL_RANK", "1"),
            ("SHARDTRAIN_LOCAL_WORLD_SIZE", "2"),
        ];
        assert_eq!(
            read(&vars),
            Some(env(
                Launcher::Shardtrain,
                (1, 2),
                (1, 2),
                ("127.0.0.1", 29500),
                "default"
            ))
        );
    }

    #[test]
    fn torchrun_variables() {
        assert_eq!(
            read(TORCHRUN),
            Some(env(
                Launcher::Torchrun,
                (5, 8),
                (1, 4),
                ("10.0.0.7", 29400),
                "job-42"
            ))
        );
        let plain = without(TORCHRUN, &["TORCHELASTIC_RUN_ID", "MASTER_PORT"]);
        assert_eq!(
            read(&plain),
            Some(env(
                Launcher::Torchrun,
                (5, 8),
                (1, 4),
                ("10.0.0.7", 29500),
                "default"
            ))
        );
        // Values are trimmed.
        let spaced = [("RANK", " 1 "), ("WORLD_SIZE", "2\n")];
        assert_eq!(
            read(&spaced),
            Some(env(
                Launcher::Torchrun,
                (1, 2),
                (1, 2),
                ("127.0.0.1", 29500),
                "default"
            ))
        );
    }

    #[test]
    fn torchrun_missing_locals() {
        // Without local variables the job is taken to be on one node.
        assert_eq!(
            read(&[("RANK", "3"), ("WORLD_SIZE", "4")]),
            Some(env(
                Launcher::Torchrun,
                (3, 4),
                (3, 4),
                ("127.0.0.1", 29500),
                "default"
            ))
        );
        // LOCAL_RANK differing from RANK says the job spans nodes: LOCAL_WORLD_SIZE is needed.
        let e = error(&[("RANK", "5"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "1")]);
        assert!(e.contains("LOCAL_WORLD_SIZE is not set"), "{e}");
        assert!(e.contains("LOCAL_RANK=1") && e.contains("RANK=5"), "{e}");
        // A local world smaller than the world with no LOCAL_RANK.
        let e = error(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_WORLD_SIZE", "4"),
        ]);
        assert!(e.contains("LOCAL_RANK is not set"), "{e}");
        // A missing world size names its variable, and a flag can supply it.
        let e = error(&[("RANK", "1")]);
        assert!(e.starts_with("WORLD_SIZE is not set"), "{e}");
        let flags = RankFlags {
            world_size: Some(2),
            ..RankFlags::default()
        };
        assert_eq!(
            read_with(&flags, &[("RANK", "1")]).unwrap(),
            Some(env(
                Launcher::Torchrun,
                (1, 2),
                (1, 2),
                ("127.0.0.1", 29500),
                "default"
            ))
        );
        let e = error(&[("WORLD_SIZE", "2")]);
        assert!(e.starts_with("RANK is not set"), "{e}");
    }

    #[test]
    fn slurm_variables() {
        // The step's node list, not the job's, gives rank 0's host; the port comes from the job id.
        assert_eq!(
            read(SLURM),
            Some(env(
                Launcher::Slurm,
                (6, 8),
                (2, 4),
                ("gpu07", 29956),
                "123456"
            ))
        );
        // Without a step list: the job's, then the old name.
        let job_list = without(SLURM, &["SLURM_STEP_NODELIST"]);
        assert_eq!(read(&job_list).unwrap().master_addr, "gpu01");
        let old = with(
            &without(&job_list, &["SLURM_JOB_NODELIST"]),
            &[("SLURM_NODELIST", "a,b")],
        );
        assert_eq!(read(&old).unwrap().master_addr, "a");
        // MASTER_ADDR and MASTER_PORT win over what Slurm implies.
        let set = with(SLURM, &[("MASTER_ADDR", "login"), ("MASTER_PORT", "40000")]);
        assert_eq!(
            read(&set),
            Some(env(
                Launcher::Slurm,
                (6, 8),
                (2, 4),
                ("login", 40000),
                "123456"
            ))
        );
        // The older SLURM_STEPID also marks a step.
        let old_step = with(
            &without(SLURM, &["SLURM_STEP_ID"]),
            &[("SLURM_STEPID", "3")],
        );
        assert_eq!(read(&old_step).unwrap().launcher, Launcher::Slurm);
        // A bad node list is an error naming it.
        let bad = with(SLURM, &[("SLURM_STEP_NODELIST", "gpu[07-")]);
        let e = error(&bad);
        assert!(e.starts_with("SLURM_STEP_NODELIST=gpu[07-:"), "{e}");
    }

    #[test]
    fn slurm_port_from_job_id() {
        let port = |job: &'static str| {
            let vars = with(SLURM, &[("SLURM_JOB_ID", job)]);
            read(&vars).unwrap().master_port
        };
        assert_eq!(port("7"), 29507);
        assert_eq!(port("1000"), 29500);
        assert_eq!(port("123999"), 30499);
        assert_eq!(port("123456"), 29956);
        let no_job = read(&without(SLURM, &["SLURM_JOB_ID"])).unwrap();
        assert_eq!(
            (no_job.master_port, no_job.run_id.as_str()),
            (29500, "default")
        );
        let e = error(&with(SLURM, &[("SLURM_JOB_ID", "12ab")]));
        assert!(e.contains("SLURM_JOB_ID=12ab"), "{e}");
    }

    #[test]
    fn slurm_tasks_per_node() {
        let base = without(SLURM, &["SLURM_STEP_TASKS_PER_NODE"]);
        let local = |extra: &[(&'static str, &'static str)]| {
            read(&with(&base, extra)).unwrap().local_world_size
        };
        assert_eq!(local(&[("SLURM_NTASKS_PER_NODE", "4")]), 4);
        assert_eq!(local(&[("SLURM_NTASKS_PER_NODE", "4(x2)")]), 4);
        assert_eq!(local(&[("SLURM_TASKS_PER_NODE", "4(x2)")]), 4);
        // The step's count wins over the allocation's.
        assert_eq!(
            local(&[
                ("SLURM_STEP_TASKS_PER_NODE", "4(x2)"),
                ("SLURM_TASKS_PER_NODE", "8(x2)")
            ]),
            4
        );
        // Uneven counts: this node's, by SLURM_NODEID (1 here).
        assert_eq!(local(&[("SLURM_TASKS_PER_NODE", "5,3")]), 3);
        assert_eq!(local(&[("SLURM_TASKS_PER_NODE", "1,3(x1)")]), 3);
        let e = error(&with(
            &without(&base, &["SLURM_NODEID"]),
            &[("SLURM_TASKS_PER_NODE", "5,3")],
        ));
        assert!(
            e.contains("SLURM_TASKS_PER_NODE=5,3") && e.contains("SLURM_NODEID"),
            "{e}"
        );
        let e = error(&with(
            &base,
            &[("SLURM_NODEID", "2"), ("SLURM_TASKS_PER_NODE", "5,3")],
        ));
        assert!(e.contains("SLURM_NODEID=2"), "{e}");
        let e = error(&with(&base, &[("SLURM_TASKS_PER_NODE", "4(2)")]));
        assert!(e.starts_with("SLURM_TASKS_PER_NODE=4(2)"), "{e}");
        // None given: SLURM_NTASKS / SLURM_NNODES when it divides.
        assert_eq!(local(&[]), 4);
        let e = error(&with(&base, &[("SLURM_NTASKS", "7")]));
        assert!(
            e.contains("SLURM_NTASKS=7") && e.contains("SLURM_NNODES=2"),
            "{e}"
        );
        // Nothing to count by: one node is assumed only when the local id equals the rank.
        let bare = without(&base, &["SLURM_NNODES"]);
        let e = error(&bare);
        assert!(e.contains("SLURM_NTASKS_PER_NODE is not set"), "{e}");
        let one = with(&bare, &[("SLURM_PROCID", "2")]);
        assert_eq!(read(&one).unwrap().local_world_size, 8);
    }

    #[test]
    fn open_mpi_variables() {
        assert_eq!(
            read(MPI),
            Some(env(
                Launcher::OpenMpi,
                (3, 4),
                (1, 2),
                ("head", 29500),
                "1234567"
            ))
        );
        let pmix = with(
            &without(MPI, &["OMPI_MCA_orte_ess_jobid"]),
            &[("PMIX_NAMESPACE", "prterun-h-1@1")],
        );
        assert_eq!(read(&pmix).unwrap().run_id, "prterun-h-1@1");
        let neither = without(MPI, &["OMPI_MCA_orte_ess_jobid"]);
        assert_eq!(read(&neither).unwrap().run_id, "mpi");
        assert_eq!(
            read(&with(MPI, &[("MASTER_PORT", "1234")]))
                .unwrap()
                .master_port,
            1234
        );
        // Across nodes MASTER_ADDR is required, and the message says how to pass it.
        let e = error(&without(MPI, &["MASTER_ADDR"]));
        assert!(e.starts_with("MASTER_ADDR is not set"), "{e}");
        assert!(e.contains("mpirun -x MASTER_ADDR="), "{e}");
        // On one node it defaults to loopback.
        let one_node = [
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
        ];
        assert_eq!(
            read(&one_node),
            Some(env(
                Launcher::OpenMpi,
                (1, 2),
                (1, 2),
                ("127.0.0.1", 29500),
                "mpi"
            ))
        );
    }

    // --- precedence ---

    #[test]
    fn launchers_in_order() {
        let ours = [("SHARDTRAIN_RANK", "0"), ("SHARDTRAIN_WORLD_SIZE", "2")];
        let all: Vec<_> = [&ours[..], TORCHRUN, SLURM, MPI].concat();
        assert_eq!(read(&all).unwrap().launcher, Launcher::Shardtrain);
        assert_eq!(read(&all).unwrap().rank, 0);
        let no_ours: Vec<_> = [TORCHRUN, SLURM, MPI].concat();
        assert_eq!(read(&no_ours).unwrap().launcher, Launcher::Torchrun);
        assert_eq!(read(&no_ours).unwrap().rank, 5);
        // mpirun inside a Slurm job: its processes inherit the srun step of Open MPI's daemons,
        // whose SLURM_PROCID is the node's index; Open MPI's own variables are the true ones.
        let mpi_in_slurm: Vec<_> = [MPI, SLURM].concat();
        let found = read(&mpi_in_slurm).unwrap();
        assert_eq!(
            (found.launcher, found.rank, found.world_size),
            (Launcher::OpenMpi, 3, 4)
        );
        assert_eq!(read(SLURM).unwrap().launcher, Launcher::Slurm);
    }

    // --- flags ---

    #[test]
    fn flags_alone() {
        let flags = RankFlags {
            rank: Some(1),
            world_size: Some(2),
            ..RankFlags::default()
        };
        assert_eq!(
            read_with(&flags, &[]).unwrap(),
            Some(env(
                Launcher::Flags,
                (1, 2),
                (1, 2),
                ("127.0.0.1", 29500),
                "default"
            ))
        );
        let flags = RankFlags {
            rank: Some(5),
            world_size: Some(8),
            local_rank: Some(1),
            master_addr: Some("node0".into()),
            master_port: Some(4000),
        };
        assert_eq!(
            read_with(&flags, &[]).unwrap(),
            Some(env(
                Launcher::Flags,
                (5, 8),
                (1, 8),
                ("node0", 4000),
                "default"
            ))
        );
        // A local rank other than the rank means several nodes: an address is needed.
        let e = error_with(
            &RankFlags {
                master_addr: None,
                ..flags.clone()
            },
            &[],
        );
        assert!(
            e.starts_with("MASTER_ADDR is not set (and --master-addr was not given)"),
            "{e}"
        );
    }

    #[test]
    fn partial_flags_name_what_is_missing() {
        let e = error_with(
            &RankFlags {
                rank: Some(0),
                ..RankFlags::default()
            },
            &[],
        );
        assert!(e.starts_with("--world is missing"), "{e}");
        let e = error_with(
            &RankFlags {
                world_size: Some(2),
                ..RankFlags::default()
            },
            &[],
        );
        assert!(e.starts_with("--rank is missing"), "{e}");
        let e = error_with(
            &RankFlags {
                master_port: Some(1234),
                ..RankFlags::default()
            },
            &[],
        );
        assert!(e.starts_with("--rank and --world are missing"), "{e}");
    }

    #[test]
    fn flags_win_field_by_field() {
        let flags = RankFlags {
            rank: Some(4),
            master_port: Some(1234),
            ..RankFlags::default()
        };
        assert_eq!(
            read_with(&flags, TORCHRUN).unwrap(),
            Some(env(
                Launcher::Torchrun,
                (4, 8),
                (1, 4),
                ("10.0.0.7", 1234),
                "job-42"
            ))
        );
        let flags = RankFlags {
            local_rank: Some(3),
            master_addr: Some("elsewhere".into()),
            world_size: Some(16),
            ..RankFlags::default()
        };
        assert_eq!(
            read_with(&flags, SLURM).unwrap(),
            Some(env(
                Launcher::Slurm,
                (6, 16),
                (3, 4),
                ("elsewhere", 29956),
                "123456"
            ))
        );
        // A flag that breaks the job is named as the flag.
        let flags = RankFlags {
            rank: Some(9),
            ..RankFlags::default()
        };
        assert_eq!(
            error_with(&flags, TORCHRUN),
            "--rank 9 is not below WORLD_SIZE=8"
        );
        let flags = RankFlags {
            master_port: Some(0),
            ..RankFlags::default()
        };
        assert!(error_with(&flags, TORCHRUN).starts_with("--master-port 0 is not a TCP port"));
        let flags = RankFlags {
            master_addr: Some(" ".into()),
            ..RankFlags::default()
        };
        assert!(error_with(&flags, TORCHRUN).starts_with("--master-addr is set but empty"));
    }

    // --- validation ---

    #[test]
    fn each_error_names_its_variable() {
        let base = [("RANK", "1"), ("WORLD_SIZE", "2")];
        let err = |extra: &[(&'static str, &'static str)]| error(&with(&base, extra));
        assert_eq!(err(&[("RANK", "abc")]), "RANK=abc is not a whole number");
        assert_eq!(err(&[("RANK", "-1")]), "RANK=-1 is not a whole number");
        assert_eq!(
            err(&[("WORLD_SIZE", "")]),
            "WORLD_SIZE is set but empty: expected a whole number"
        );
        assert_eq!(
            err(&[("LOCAL_RANK", "x")]),
            "LOCAL_RANK=x is not a whole number"
        );
        assert_eq!(err(&[("RANK", "3")]), "RANK=3 is not below WORLD_SIZE=2");
        assert_eq!(err(&[("RANK", "2")]), "RANK=2 is not below WORLD_SIZE=2");
        assert_eq!(
            err(&[("RANK", "0"), ("WORLD_SIZE", "0")]),
            "WORLD_SIZE=0: the world size must be at least 1"
        );
        assert_eq!(
            err(&[("LOCAL_RANK", "4"), ("LOCAL_WORLD_SIZE", "2")]),
            "LOCAL_RANK=4 is not below LOCAL_WORLD_SIZE=2"
        );
        assert_eq!(
            err(&[("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "4")]),
            "LOCAL_WORLD_SIZE=4 exceeds WORLD_SIZE=2"
        );
        assert_eq!(
            err(&[("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "0")]),
            "LOCAL_WORLD_SIZE=0: the local world size must be at least 1"
        );
        for bad in ["0", "70000", "-1", "http", ""] {
            assert_eq!(
                err(&[("MASTER_PORT", bad)]),
                format!("MASTER_PORT={bad} is not a TCP port (a whole number from 1 to 65535)")
            );
        }
        assert!(err(&[("MASTER_ADDR", "")]).starts_with("MASTER_ADDR is set but empty"));
        assert!(err(&[("MASTER_ADDR", "  ")]).starts_with("MASTER_ADDR is set but empty"));
        // The same checks under the other launchers' names.
        assert_eq!(
            error(&with(MPI, &[("OMPI_COMM_WORLD_RANK", "4")])),
            "OMPI_COMM_WORLD_RANK=4 is not below OMPI_COMM_WORLD_SIZE=4"
        );
        assert_eq!(
            error(&with(SLURM, &[("SLURM_LOCALID", "4")])),
            "SLURM_LOCALID=4 is not below SLURM_STEP_TASKS_PER_NODE=4(x2)"
        );
        assert_eq!(
            error(&[("SHARDTRAIN_RANK", "1"), ("SHARDTRAIN_WORLD_SIZE", "one")]),
            "SHARDTRAIN_WORLD_SIZE=one is not a whole number"
        );
    }

    #[test]
    fn master_addr_defaults_only_on_one_node() {
        let one_node = [
            ("RANK", "1"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "4"),
        ];
        assert_eq!(read(&one_node).unwrap().master_addr, "127.0.0.1");
        let two_nodes = [
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "4"),
        ];
        let e = error(&two_nodes);
        assert!(e.starts_with("MASTER_ADDR is not set"), "{e}");
        assert!(e.contains("LOCAL_WORLD_SIZE=4 of WORLD_SIZE=8"), "{e}");
        // Rank 0 of a multi-node job is no exception: the others could not reach its loopback.
        let rank0 = [
            ("RANK", "0"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "0"),
            ("LOCAL_WORLD_SIZE", "4"),
        ];
        assert!(error(&rank0).starts_with("MASTER_ADDR is not set"));
        // Slurm without any node list across nodes.
        let slurm = without(SLURM, &["SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST"]);
        assert!(error(&slurm).starts_with("MASTER_ADDR is not set"));
    }

    // --- hostlists ---

    fn hosts(list: &str) -> Vec<String> {
        expand_hostlist(list).unwrap_or_else(|e| panic!("{list}: {e}"))
    }

    #[test]
    fn hostlist_expansion() {
        assert_eq!(
            hosts("node[01-03,07],gpu5"),
            ["node01", "node02", "node03", "node07", "gpu5"]
        );
        assert_eq!(hosts("host"), ["host"]);
        assert_eq!(hosts(" host \n"), ["host"]);
        assert_eq!(hosts("a,b"), ["a", "b"]);
        assert_eq!(hosts("n[1-2]-ib"), ["n1-ib", "n2-ib"]);
        assert_eq!(hosts("n[1-2]-ib,m7"), ["n1-ib", "n2-ib", "m7"]);
        // Zero padding keeps the first number's width, also across a power of ten.
        assert_eq!(hosts("n[08-11]"), ["n08", "n09", "n10", "n11"]);
        assert_eq!(hosts("n[098-101]"), ["n098", "n099", "n100", "n101"]);
        assert_eq!(hosts("n[8-10]"), ["n8", "n9", "n10"]);
        assert_eq!(hosts("n[007]"), ["n007"]);
        // Several ranges and singles in one group, and commas inside brackets.
        assert_eq!(hosts("x[1-2,5,7-8]"), ["x1", "x2", "x5", "x7", "x8"]);
        assert_eq!(hosts("a[1,3],b[2-3],c"), ["a1", "a3", "b2", "b3", "c"]);
        // Several groups in one name: the leftmost varies slowest.
        assert_eq!(hosts("r[1-2]n[1-2]"), ["r1n1", "r1n2", "r2n1", "r2n2"]);
        assert_eq!(hosts("[1-2]"), ["1", "2"]);
        assert_eq!(
            hosts("node-1.cluster,node-2.cluster"),
            ["node-1.cluster", "node-2.cluster"]
        );
    }

    #[test]
    fn malformed_hostlists() {
        for bad in [
            "",
            " ",
            "node[1-",
            "node[3-1]",
            "node[]",
            "node[1-2",
            "node1-2]",
            "node[[1-2]]",
            "node[a-b]",
            "node[1-x]",
            "node[1,]",
            "node[-2]",
            "node[1-2-3]",
            "a,,b",
            "a,",
            ",a",
            "a b",
            "n[0-99999999999999999999]",
            "n[0-9999999]",
            "n[0-1999]m[0-1999]",
        ] {
            assert!(expand_hostlist(bad).is_err(), "{bad:?} should be an error");
        }
        assert!(expand_hostlist("node[3-1]")
            .unwrap_err()
            .contains("backwards"));
        assert!(expand_hostlist("node[1-")
            .unwrap_err()
            .contains("never closed"));
    }

    #[test]
    fn tasks_per_node_lists() {
        assert_eq!(parse_tasks_per_node("4").unwrap(), [4]);
        assert_eq!(parse_tasks_per_node("4(x2)").unwrap(), [4, 4]);
        assert_eq!(parse_tasks_per_node("2(x3),1").unwrap(), [2, 2, 2, 1]);
        for bad in ["", "x", "4(x)", "4(2)", "4(x2", "4,,2", "4(x99999999)"] {
            assert!(parse_tasks_per_node(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn process_environment_is_read() {
        // The test process is not started by a launcher with a world of more than one rank
        // unless someone runs the tests under one; either way reading must not fail on flags.
        let flags = RankFlags {
            rank: Some(0),
            world_size: Some(1),
            ..RankFlags::default()
        };
        let found = from_process_env(&flags);
        if let Ok(Some(found)) = found {
            assert_eq!((found.rank, found.world_size), (0, 1));
        }
    }
}
