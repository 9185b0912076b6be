//! Writing a checkpoint so that it appears complete or not at all.
//!
//! The protocol, for every rank of the job: rank 0 [`prepare_staging`] (an empty staging directory
//! `.partial-step-N-<writer>` beside the finished checkpoints, named after this job's writer tag,
//! see [`super::staging`]), barrier; every rank holding a distinct shard [`write_rank_file`]s its
//! safetensors file and a small JSON sidecar (size, CRC-32, pieces), each fsynced; barrier; rank 0
//! [`commit`]s: it folds the sidecars into `meta.json`, fsyncs it, renames the staging directory
//! to `step-N` and fsyncs the parent, then prunes old checkpoints. A crash at any point before the
//! rename leaves only a staging directory, which no reader considers; the previous checkpoint is
//! untouched.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, TensorView};

use super::meta::{
    rank_file_name, step_dir_name, tensor_names, CheckpointMeta, FileMeta, Piece, META_FILE,
};
use super::read::{list_checkpoints, Checkpoint};
use super::staging::staging_dir;

/// One rank's share of the training state: per piece, master weights and the two moments.
pub struct RankState {
    pub rank: usize,
    pub pieces: Vec<(Piece, [Vec<f32>; 3])>,
}

/// Which run and model a checkpoint must be of to count as this run's (`None` fields: a
/// checkpoint written before run ids and fingerprints, taken as ours).
#[derive(Debug, Clone, Copy)]
pub struct Owner<'a> {
    pub run_id: Option<&'a str>,
    pub model_fingerprint: Option<&'a str>,
}

impl Owner<'_> {
    /// Whether `m` was written by this run for this model.
    fn owns(&self, m: &CheckpointMeta) -> bool {
        let same = |theirs: &Option<String>, ours: Option<&str>| {
            theirs.is_none() || ours.is_none() || theirs.as_deref() == ours
        };
        same(&m.run_id, self.run_id) && same(&m.model_fingerprint, self.model_fingerprint)
    }
}

/// Rank 0, before the first barrier: the empty staging directory of `writer` for `step`. Fails
/// if this run's valid checkpoint for `step` already exists, or if this writer's staging
/// directory does (a writer stages each step once; another writer's staging is never touched).
/// A `step-N` that is damaged or another run's (`--resume latest` skipped it to resume from an
/// older step) is renamed aside, never deleted: this run writes its own step N.
pub fn prepare_staging(root: &Path, step: u64, writer: &str, owner: Owner) -> Result<PathBuf> {
    let done = root.join(step_dir_name(step));
    if done.exists() {
        let why_not_ours = match Checkpoint::open(&done) {
            Ok(c) if owner.owns(&c.meta) => None,
            Ok(_) => Some("a checkpoint of another run or model".to_string()),
            Err(e) => Some(format!("not a valid checkpoint ({e:#})")),
        };
        let Some(why) = why_not_ours else {
            bail!(
                "a checkpoint for step {step} already exists at {}; it is left as it is (resume \
                 from it, or write checkpoints elsewhere with checkpoint.dir)",
                done.display()
            );
        };
        let aside = root.join(format!("{}.set-aside-{writer}", step_dir_name(step)));
        std::fs::rename(&done, &aside)
            .with_context(|| format!("renaming {} to {}", done.display(), aside.display()))?;
        tracing::warn!(
            "{} was {why}: kept as {}, and this run writes its own step {step}",
            done.display(),
            aside.display()
        );
    }
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let staging = staging_dir(root, step, writer);
    std::fs::create_dir(&staging).with_context(|| format!("creating {}", staging.display()))?;
    Ok(staging)
}

/// Writes `bytes` to `path` and fsyncs it.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}

fn sidecar_name(rank: usize) -> String {
    format!("rank-{rank:05}.json")
}

/// Every rank that holds a distinct shard: its safetensors file and its sidecar, both fsynced.
pub fn write_rank_file(staging: &Path, state: &RankState) -> Result<()> {
    let mut data: Vec<(String, Vec<u8>, usize)> = Vec::new();
    for (piece, values) in &state.pieces {
        let len = piece.end - piece.start;
        for (name, v) in tensor_names(piece.unit).into_iter().zip(values) {
            if v.len() != len {
                bail!(
                    "checkpoint: {name} has {} values for a piece of {len}",
                    v.len()
                );
            }
            data.push((name, bytemuck::cast_slice(v).to_vec(), len));
        }
    }
    let views = data
        .iter()
        .map(|(name, bytes, len)| {
            Ok((
                name.clone(),
                TensorView::new(Dtype::F32, vec![*len], bytes)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = HashMap::from([
        ("format".to_string(), super::meta::FORMAT.to_string()),
        ("rank".to_string(), state.rank.to_string()),
    ]);
    let bytes = safetensors::serialize(views, Some(metadata))?;
    let file = rank_file_name(state.rank);
    write_synced(&staging.join(&file), &bytes)?;
    let sidecar = FileMeta {
        file,
        rank: state.rank,
        bytes: bytes.len() as u64,
        crc32: crc32fast::hash(&bytes),
        pieces: state.pieces.iter().map(|(p, _)| p.clone()).collect(),
    };
    write_synced(
        &staging.join(sidecar_name(state.rank)),
        serde_json::to_string(&sidecar)?.as_bytes(),
    )
}

/// Rank 0, after every rank has written into `writer`'s staging directory: `meta.json` from
/// `meta` (its `files` filled in from the sidecars of `writers`), then the rename that makes the
/// checkpoint visible, then pruning to the newest `keep_last`. Returns the checkpoint's directory.
pub fn commit(
    root: &Path,
    step: u64,
    writer: &str,
    mut meta: CheckpointMeta,
    writers: &[usize],
    keep_last: usize,
) -> Result<PathBuf> {
    let staging = staging_dir(root, step, writer);
    meta.files.clear();
    for &rank in writers {
        let path = staging.join(sidecar_name(rank));
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("rank {rank} did not finish its part ({})", path.display()))?;
        meta.files
            .push(serde_json::from_str(&text).with_context(|| path.display().to_string())?);
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    write_synced(
        &staging.join(META_FILE),
        serde_json::to_string_pretty(&meta)?.as_bytes(),
    )?;
    sync_dir(&staging)?;
    let done = root.join(step_dir_name(step));
    std::fs::rename(&staging, &done)
        .with_context(|| format!("renaming {} to {}", staging.display(), done.display()))?;
    sync_dir(root)?;
    remember_verified(&done);
    prune(root, keep_last, &meta)?;
    Ok(done)
}

/// The checkpoints this process wrote or verified in full, with their metadata's modification
/// time: pruning after every save must not read every kept checkpoint again (gigabytes each on a
/// large model). A checkpoint it does not know (copied in, or changed since) is verified in full.
static VERIFIED: std::sync::Mutex<Vec<(PathBuf, std::time::SystemTime)>> =
    std::sync::Mutex::new(Vec::new());

fn meta_written(dir: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(dir.join(META_FILE)).ok()?.modified().ok()
}

fn remember_verified(dir: &Path) {
    if let Some(t) = meta_written(dir) {
        let mut known = VERIFIED.lock().unwrap_or_else(|e| e.into_inner());
        known.retain(|(d, _)| d != dir);
        known.push((dir.to_path_buf(), t));
    }
}

/// Validates `dir` as [`Checkpoint::open`] does, skipping the rank files' checksums where this
/// process verified the same checkpoint already.
fn open_for_pruning(dir: &Path) -> Result<Checkpoint> {
    let known = meta_written(dir).is_some_and(|t| {
        VERIFIED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|(d, seen)| d == dir && *seen == t)
    });
    if known {
        let ckpt = Checkpoint::read_meta(dir)?;
        ckpt.check_meta()?;
        for f in &ckpt.meta.files {
            let len = std::fs::metadata(dir.join(&f.file)).map(|m| m.len());
            if len.as_ref().ok() != Some(&f.bytes) {
                bail!(
                    "{} is missing or not {} bytes",
                    dir.join(&f.file).display(),
                    f.bytes
                );
            }
        }
        return Ok(ckpt);
    }
    let ckpt = Checkpoint::open(dir)?;
    remember_verified(dir);
    Ok(ckpt)
}

/// Deletes all but the newest `keep_last` valid checkpoints of the run that wrote `ours` under
/// `root`. A checkpoint that fails validation, or holds another run or model (copied here), is
/// neither counted nor deleted: it is reported and left for the user, so a damaged or foreign
/// newer checkpoint never costs a good one.
fn prune(root: &Path, keep_last: usize, ours: &CheckpointMeta) -> Result<()> {
    let owner = Owner {
        run_id: ours.run_id.as_deref(),
        model_fingerprint: ours.model_fingerprint.as_deref(),
    };
    let mut valid = Vec::new();
    for (_, dir) in list_checkpoints(root)? {
        match open_for_pruning(&dir) {
            Ok(c) if owner.owns(&c.meta) => valid.push(dir),
            Ok(_) => tracing::warn!(
                "{}: a checkpoint of another run or model; pruning neither counts nor deletes it",
                dir.display()
            ),
            Err(e) => tracing::warn!(
                "{}: not a valid checkpoint ({e:#}); pruning neither counts nor deletes it",
                dir.display()
            ),
        }
    }
    let excess = valid.len().saturating_sub(keep_last.max(1));
    for dir in valid.into_iter().take(excess) {
        // Strip the metadata first: a deletion interrupted half way leaves a directory no reader
        // takes for a checkpoint.
        std::fs::remove_file(dir.join(META_FILE))
            .and_then(|()| std::fs::remove_dir_all(&dir))
            .with_context(|| format!("deleting the old checkpoint {}", dir.display()))?;
    }
    Ok(())
}
