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

/// Rank 0, before the first barrier: the empty staging directory of `writer` for `step`. Fails
/// if the checkpoint for `step` already exists, or if this writer's staging directory does (a
/// writer stages each step once; another writer's staging is never touched).
pub fn prepare_staging(root: &Path, step: u64, writer: &str) -> Result<PathBuf> {
    let done = root.join(step_dir_name(step));
    if done.exists() {
        bail!(
            "a checkpoint for step {step} already exists at {}; it is left as it is (resume from \
             it, or write checkpoints elsewhere with checkpoint.dir)",
            done.display()
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
    prune(root, keep_last, &meta)?;
    Ok(done)
}

/// Deletes all but the newest `keep_last` valid checkpoints of the run that wrote `ours` under
/// `root`. A checkpoint that fails validation, or holds another run or model (copied here), is
/// neither counted nor deleted: it is reported and left for the user, so a damaged or foreign
/// newer checkpoint never costs a good one.
fn prune(root: &Path, keep_last: usize, ours: &CheckpointMeta) -> Result<()> {
    let mut valid = Vec::new();
    for (_, dir) in list_checkpoints(root)? {
        let same_run = |m: &CheckpointMeta| {
            (m.run_id.is_none() || m.run_id == ours.run_id)
                && (m.model_fingerprint.is_none() || m.model_fingerprint == ours.model_fingerprint)
        };
        match Checkpoint::open(&dir) {
            Ok(c) if same_run(&c.meta) => valid.push(dir),
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
