//! The common reading of every launcher: a value with the variable or flag it came from (for
//! messages), the parsers of counts, ports and run ids, and [`Found`], one launcher's reading
//! before command-line flags, defaults and checks turn it into a [`RankEnv`].

use std::fmt::Display;

use super::{Launcher, RankEnv, RankFlags, DEFAULT_PORT, LOOPBACK};
use crate::error::UsageError;

pub(super) fn usage(message: impl Into<String>) -> UsageError {
    UsageError(message.into())
}

/// A value together with where it came from, for messages: `name` alone (`RANK`, `--rank`) and
/// `shown` with its value (`RANK=3`, `--rank 3`).
#[derive(Debug, Clone)]
pub(super) struct Val<T> {
    pub(super) value: T,
    pub(super) name: String,
    pub(super) shown: String,
}

impl<T> Val<T> {
    pub(super) fn from_env(name: &str, raw: &str, value: T) -> Self {
        Val {
            value,
            name: name.to_string(),
            shown: format!("{name}={raw}"),
        }
    }

    pub(super) fn from_flag(name: &str, value: T) -> Self
    where
        T: Display,
    {
        Val {
            shown: format!("{name} {value}"),
            name: name.to_string(),
            value,
        }
    }

    pub(super) fn derived(value: T, name: impl Into<String>, shown: impl Into<String>) -> Self {
        Val {
            value,
            name: name.into(),
            shown: shown.into(),
        }
    }
}

/// A variable's trimmed value, `None` when unset.
pub(super) fn var(env: &dyn Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    env(name).map(|v| v.trim().to_string())
}

/// A count or index (`RANK`, `WORLD_SIZE`, ...).
pub(super) fn count(
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
pub(super) fn port(
    env: &dyn Fn(&str) -> Option<String>,
    name: &str,
) -> Result<Option<Val<u16>>, UsageError> {
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

pub(super) fn master_addr(env: &dyn Fn(&str) -> Option<String>) -> Option<Val<String>> {
    var(env, "MASTER_ADDR").map(|raw| Val::from_env("MASTER_ADDR", &raw, raw.clone()))
}

/// The first of `names` that is set and not empty, else `default`.
pub(super) fn run_id(
    env: &dyn Fn(&str) -> Option<String>,
    names: &[&str],
    default: &str,
) -> String {
    names
        .iter()
        .filter_map(|name| var(env, name))
        .find(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// The names a launcher gives to the four counts, for messages about missing ones.
#[derive(Debug, Clone, Copy)]
pub(super) struct Names {
    pub(super) rank: &'static str,
    pub(super) world_size: &'static str,
    pub(super) local_rank: &'static str,
    pub(super) local_world_size: &'static str,
}

pub(super) const FLAG_NAMES: Names = Names {
    rank: "--rank",
    world_size: "--world",
    local_rank: "--local-rank",
    local_world_size: "the local world size",
};

/// One launcher's reading, each field `None` where it said nothing.
#[derive(Debug)]
pub(super) struct Found {
    pub(super) launcher: Launcher,
    pub(super) names: Names,
    pub(super) rank: Option<Val<usize>>,
    pub(super) world_size: Option<Val<usize>>,
    pub(super) local_rank: Option<Val<usize>>,
    pub(super) local_world_size: Option<Val<usize>>,
    pub(super) master_addr: Option<Val<String>>,
    pub(super) master_port: Option<Val<u16>>,
    /// Port when neither `MASTER_PORT` nor `--master-port` gives one.
    pub(super) default_port: u16,
    pub(super) run_id: String,
    /// Added to the message when `MASTER_ADDR` is needed and missing.
    pub(super) master_hint: &'static str,
}

impl Found {
    pub(super) fn new(launcher: Launcher, names: Names, default_port: u16, run_id: &str) -> Self {
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
    pub(super) fn read(
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
    pub(super) fn apply(&mut self, flags: &RankFlags) {
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
    pub(super) fn finish(self) -> Result<RankEnv, UsageError> {
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
