//! Slurm's `srun`: `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID` and the tasks per node, read
//! only inside an `srun` step of more than one task (see the parent module for why); rank 0's
//! host is the first of the step's node list, the port 29500 + job id % 1000.

use super::found::{count, master_addr, port, usage, var, Found, Names, Val};
use super::hostlist::{expand_hostlist, MAX_HOSTS};
use super::{Launcher, DEFAULT_PORT, DEFAULT_RUN_ID};
use crate::error::UsageError;

/// Slurm step ids from here up are special steps (batch script, extern, interactive, pending),
/// not `srun` steps.
const SLURM_SPECIAL_STEP_IDS: u64 = 0xFFFF_FFF0;

const SLURM_NAMES: Names = Names {
    rank: "SLURM_PROCID",
    world_size: "SLURM_NTASKS",
    local_rank: "SLURM_LOCALID",
    local_world_size: "SLURM_NTASKS_PER_NODE",
};

/// Whether this process is a task of an `srun` step: `SLURM_STEP_ID` (or `SLURM_STEPID`) is a
/// step number, not one of the special ids of a batch script, extern or interactive step (which
/// Slurm may print as large unsigned or as negative numbers).
fn in_srun_step(env: &dyn Fn(&str) -> Option<String>) -> bool {
    var(env, "SLURM_STEP_ID")
        .or_else(|| var(env, "SLURM_STEPID"))
        .and_then(|id| id.parse::<u64>().ok())
        .is_some_and(|id| id < SLURM_SPECIAL_STEP_IDS)
}

pub(super) fn detect(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<Found>, UsageError> {
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

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::super::*;
    use super::parse_tasks_per_node;

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
    fn tasks_per_node_lists() {
        assert_eq!(parse_tasks_per_node("4").unwrap(), [4]);
        assert_eq!(parse_tasks_per_node("4(x2)").unwrap(), [4, 4]);
        assert_eq!(parse_tasks_per_node("2(x3),1").unwrap(), [2, 2, 2, 1]);
        for bad in ["", "x", "4(x)", "4(2)", "4(x2", "4,,2", "4(x99999999)"] {
            assert!(parse_tasks_per_node(bad).is_err(), "{bad:?}");
        }
    }
}
