//! The run directory: chosen (or named by the user), checked never to overwrite an earlier run,
//! created and locked (one writer at a time) before training writes anything into it.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

use super::run_lock::{RunLock, LOCK_FILE};
use crate::checkpoint::binding::foreign_reason;
use crate::checkpoint::meta::META_FILE;
use crate::checkpoint::read::list_checkpoints;
use crate::checkpoint::Checkpoint;
use crate::error::UsageError;

/// Creates the run directory and takes its lock (see [`super::run_lock`]), before anything is
/// written into it: `explicit` if given (it must not exist, or be empty but for a stale lock),
/// otherwise a fresh `runs/<name>-<UTC date-time>`. Two runs given one directory at once: one
/// gets it, the other is refused (exit 2) having written nothing.
pub fn prepare(explicit: Option<PathBuf>, name: &str) -> Result<(PathBuf, RunLock)> {
    let Some(dir) = explicit else {
        return claim_fresh(name);
    };
    if dir.exists() && !dir.is_dir() {
        return Err(not_empty(&dir));
    }
    if is_nonempty(&dir)? {
        // Said before anything is created; the lock tells a live writer apart from a finished run.
        drop(RunLock::acquire(&dir)?);
        return Err(not_empty(&dir));
    }
    let created = create_dir(&dir)?;
    let lock = match RunLock::acquire(&dir) {
        Ok(lock) => lock,
        Err(e) => {
            if created {
                // Only if still empty: the holder's lock file keeps it otherwise.
                let _ = std::fs::remove_dir(&dir);
            }
            return Err(e);
        }
    };
    // Checked again under the lock: another run may have filled it since the first look.
    if is_nonempty(&dir)? {
        return Err(not_empty(&dir));
    }
    Ok((dir, lock))
}

fn not_empty(dir: &Path) -> anyhow::Error {
    UsageError(format!(
        "the run directory {} already exists and is not empty; choose another --run-dir (nothing was written)",
        dir.display()
    ))
    .into()
}

/// Creates `dir` (and its parents); says whether this call made `dir` itself.
fn create_dir(dir: &Path) -> Result<bool> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating the run directory {}", dir.display()))?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(false),
        Err(e) => Err(e).with_context(|| format!("creating the run directory {}", dir.display())),
    }
}

/// A new `runs/<name>-<time>` directory, made by this call (two runs started in the same second
/// get different ones), and its lock.
fn claim_fresh(name: &str) -> Result<(PathBuf, RunLock)> {
    loop {
        let dir = fresh_default(name);
        if create_dir(&dir)? {
            return Ok((dir.clone(), RunLock::acquire(&dir)?));
        }
    }
}

/// Whether `dir` holds anything but its lock file (a file in its place counts as content).
fn is_nonempty(dir: &Path) -> Result<bool> {
    if !dir.exists() {
        return Ok(false);
    }
    if !dir.is_dir() {
        return Ok(true);
    }
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        if entry.file_name() != LOCK_FILE {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A new run directory name: `runs/<name>-<UTC date-time>` (with a suffix if taken).
pub fn fresh_default(name: &str) -> PathBuf {
    let base = format!("{name}-{}", utc_stamp(SystemTime::now()));
    let runs = Path::new("runs");
    let mut dir = runs.join(&base);
    let mut n = 2;
    while dir.exists() {
        dir = runs.join(format!("{base}-{n}"));
        n += 1;
    }
    dir
}

/// `YYYYmmdd-HHMMSS` in UTC (civil-from-days, proleptic Gregorian calendar).
pub fn utc_stamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The run directory a checkpoint belongs to: `RUN/checkpoints/step-N` gives `RUN`.
pub fn run_dir_of(checkpoint_dir: &Path) -> Option<PathBuf> {
    crate::checkpoint::binding::home_run_dir(checkpoint_dir)
}

/// `--resume latest`: the most recently written *valid* checkpoint in the run directory `root`,
/// or in any run directory under it (`runs/`). Candidates are tried newest first; each one that
/// fails validation, or lies in a run it does not belong to (copied from another run), is
/// skipped with a line on stderr naming it and why.
pub fn latest_checkpoint(root: &Path) -> Result<Checkpoint> {
    let mut candidates: Vec<(SystemTime, PathBuf)> = Vec::new();
    let mut roots = vec![root.join("checkpoints")];
    if let Ok(entries) = std::fs::read_dir(root) {
        roots.extend(
            entries
                .flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.path().join("checkpoints")),
        );
    }
    for r in roots {
        for (_, dir) in list_checkpoints(&r)? {
            let written = std::fs::metadata(dir.join(META_FILE))
                .and_then(|m| m.modified())
                .unwrap_or(UNIX_EPOCH);
            candidates.push((written, dir));
        }
    }
    candidates.sort();
    let mut skipped = Vec::new();
    for (_, dir) in candidates.into_iter().rev() {
        let reason = match Checkpoint::open(&dir).and_then(|c| Ok((c.config(&[])?, c))) {
            Ok((saved, ckpt)) => match foreign_reason(&ckpt, &saved) {
                None => return Ok(ckpt),
                Some(why) => format!("a foreign checkpoint: {why}"),
            },
            Err(e) => format!("not valid: {e:#}"),
        };
        eprintln!("--resume latest: skipping {}: {reason}", dir.display());
        skipped.push(dir.display().to_string());
    }
    let message = if skipped.is_empty() {
        format!(
            "--resume latest: no checkpoint in {} or the run directories under it",
            root.display()
        )
    } else {
        format!(
            "--resume latest: no valid checkpoint in {} or the run directories under it \
             (skipped, as said above: {})",
            root.display(),
            skipped.join(", ")
        )
    };
    Err(UsageError(message).into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stamps_known_dates() {
        let at = |s| utc_stamp(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "19700101-000000");
        assert_eq!(at(951_782_400), "20000229-000000");
        assert_eq!(at(1_795_691_107), "20261126-110507");
    }

    #[test]
    fn refuses_a_nonempty_directory() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("metrics.jsonl"), "{}").unwrap();
        let err = prepare(Some(tmp.path().to_owned()), "x").unwrap_err();
        assert!(err.downcast_ref::<UsageError>().is_some());
        assert!(!tmp.path().join(LOCK_FILE).exists(), "nothing written");
        let empty = tmp.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let (dir, lock) = prepare(Some(empty.clone()), "x").unwrap();
        assert_eq!(dir, empty);
        // Held: a second run given the same directory is refused, and writes nothing.
        let err = prepare(Some(empty.clone()), "x").unwrap_err();
        assert!(format!("{err:#}").contains("is in use by"), "{err:#}");
        drop(lock);
        assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0);
    }
}
