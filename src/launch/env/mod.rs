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
//!
//! One module per launcher (`shardtrain`, `torchrun`, `open_mpi`, `slurm`, with Slurm's
//! hostlists in `hostlist`) says when its variables are present and reads them; `found` holds the
//! reading they share and the checks that turn it into a [`RankEnv`].

mod found;
mod hostlist;
mod open_mpi;
mod shardtrain;
mod slurm;
#[cfg(test)]
mod tests;
mod torchrun;

pub use hostlist::expand_hostlist;

use crate::error::UsageError;
use found::{usage, Found, FLAG_NAMES};

/// Rendezvous port when nothing sets one (torchrun's default).
const DEFAULT_PORT: u16 = 29500;
/// Rendezvous address when the whole job runs on this node and nothing sets one.
const LOOPBACK: &str = "127.0.0.1";
/// Run id when the launcher gives none.
const DEFAULT_RUN_ID: &str = "default";

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

fn detect(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<Found>, UsageError> {
    if let Some(found) = shardtrain::detect(env)? {
        return Ok(Some(found));
    }
    if let Some(found) = torchrun::detect(env)? {
        return Ok(Some(found));
    }
    if let Some(found) = open_mpi::detect(env)? {
        return Ok(Some(found));
    }
    slurm::detect(env)
}

fn any_set(env: &dyn Fn(&str) -> Option<String>, names: &[&str]) -> bool {
    names.iter().any(|name| env(name).is_some())
}
