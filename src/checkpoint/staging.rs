//! Where an unfinished checkpoint lives, and what is left of unfinished ones.
//!
//! Every save stages into a directory named after its writer,
//! `.partial-step-N-<host>-<pid>-<nonce>` (the writer tag is drawn once per job by the process
//! that owns the run directory and shared with the other ranks), so two writers never share,
//! recreate or remove each other's staging. A failed save removes its own staging directory
//! ([`discard`]), giving a full disk its space back; what a writer that died leaves behind is
//! removed at the next start, under the run directory's lock, by [`sweep_debris`]. Nothing
//! holding `meta.json` is ever removed here: a finished checkpoint is not debris, whatever state
//! its files are in.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::meta::{step_dir_name, META_FILE};

/// The prefix of every staging directory.
pub const STAGING_PREFIX: &str = ".partial-";

/// This machine's host name, reduced to characters safe in a file name (`unknown-host` if the
/// system does not say).
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the buffer we own.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let raw = if rc == 0 {
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    let safe: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if safe.is_empty() {
        "unknown-host".to_string()
    } else {
        safe
    }
}

/// A writer tag unique to this writer: `<host>-<pid>-<nonce>` (the nonce tells apart two jobs of
/// one process, and a pid reused after a crash).
pub fn writer_tag() -> String {
    format!(
        "{}-{}-{:08x}",
        host_name(),
        std::process::id(),
        rand::random::<u32>()
    )
}

/// The staging directory of the checkpoint for `step` under `root`, written by `writer`.
pub fn staging_dir(root: &Path, step: u64, writer: &str) -> PathBuf {
    root.join(format!("{STAGING_PREFIX}{}-{writer}", step_dir_name(step)))
}

/// A failed save's own staging directory, removed (if it was made). Best effort: the failure
/// being reported matters more than this one, which is logged; the next start sweeps what stays.
pub fn discard(staging: &Path) {
    match std::fs::remove_dir_all(staging) {
        Ok(()) => tracing::warn!(
            "removed {} (the unfinished checkpoint of the failed save)",
            staging.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(
            "could not remove the unfinished checkpoint {}: {e} (the next start removes it)",
            staging.display()
        ),
    }
}

/// Whether `name` (an entry of a checkpoint root) is the leftover of a writer, not a checkpoint:
/// a staging directory, or a `step-N` directory without `meta.json` (an interrupted prune strips
/// `meta.json` first; an interrupted copy or a crash can leave one empty).
fn is_checkpoint_debris(dir: &Path, name: &str) -> bool {
    if name.starts_with(STAGING_PREFIX) {
        return true;
    }
    let is_step = name
        .strip_prefix("step-")
        .is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()));
    is_step && dir.is_dir() && !dir.join(META_FILE).exists()
}

/// Whether `name` (an entry of a run directory) is an atomic write that never got its rename:
/// `model.safetensors.partial`, `metrics.jsonl.partial` and the like.
fn is_run_dir_debris(name: &str) -> bool {
    name.ends_with(".partial")
}

/// Removes the leftovers of writers that are gone from the run directory `run_dir` and the
/// checkpoint root `ckpt_root` (usually `run_dir/checkpoints`), each named in a log line; returns
/// what it removed. Call it only while holding the lock of the run directory (and of `ckpt_root`
/// where that lies elsewhere): then no live writer owns any of it.
pub fn sweep_debris(run_dir: &Path, ckpt_root: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    sweep_dir(run_dir, |_, name| is_run_dir_debris(name), &mut removed)?;
    sweep_dir(ckpt_root, is_checkpoint_debris, &mut removed)?;
    Ok(removed)
}

/// Removes the entries of `dir` that `is_debris` picks (not already in `removed`), adding them
/// to `removed`. A missing `dir` holds nothing.
fn sweep_dir(
    dir: &Path,
    is_debris: impl Fn(&Path, &str) -> bool,
    removed: &mut Vec<PathBuf>,
) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_debris(&path, &name) || removed.contains(&path) {
            continue;
        }
        let kind = entry
            .file_type()
            .with_context(|| path.display().to_string())?;
        let gone = if kind.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        gone.with_context(|| {
            format!(
                "removing {} (left by a writer that is gone)",
                path.display()
            )
        })?;
        tracing::warn!(
            "removed {} (left unfinished by a writer that is gone)",
            path.display()
        );
        removed.push(path);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_names_differ_by_writer_and_keep_the_prefix() {
        let root = Path::new("ck");
        let (a, b) = (writer_tag(), writer_tag());
        assert_ne!(a, b);
        let dir = staging_dir(root, 7, &a);
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with(".partial-step-00000007-"), "{name}");
        assert!(name.ends_with(&a), "{name}");
        assert!(!host_name().is_empty());
    }

    #[test]
    fn sweeps_debris_and_keeps_checkpoints() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        let root = run.join("checkpoints");
        let keep = root.join("step-00000004");
        std::fs::create_dir_all(&keep).unwrap();
        std::fs::write(keep.join(META_FILE), "{}").unwrap();
        let staging = staging_dir(&root, 8, "h-1-0");
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::write(staging.join("rank-00000.safetensors"), b"x").unwrap();
        std::fs::create_dir(root.join("step-00000007")).unwrap();
        std::fs::create_dir(root.join("step-notes")).unwrap();
        std::fs::write(run.join("model.safetensors.partial"), b"x").unwrap();
        std::fs::write(run.join("metrics.jsonl"), b"{}").unwrap();

        let mut removed = sweep_debris(run, &root).unwrap();
        removed.sort();
        let mut expected = vec![
            run.join("model.safetensors.partial"),
            staging,
            root.join("step-00000007"),
        ];
        expected.sort();
        assert_eq!(removed, expected);
        assert!(keep.join(META_FILE).is_file());
        assert!(root.join("step-notes").is_dir(), "not a step directory");
        assert!(run.join("metrics.jsonl").is_file());
        assert!(sweep_debris(run, &root).unwrap().is_empty());
    }
}
