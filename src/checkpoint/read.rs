//! Reading checkpoints: finding the newest complete one, checking that it fits the model, and
//! reading any range of any unit's state from the rank files that hold it (resharding: a reader's
//! range may span several files written by another world size). A rank reads only the files that
//! overlap its own ranges, each verified against its size and CRC-32 before use. Opening a
//! checkpoint validates it in full first (`validate`).

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

use super::meta::{tensor_names, CheckpointMeta, META_FILE};
use super::validate::damaged;
use crate::error::UsageError;
use crate::model::ParamLayout;

/// A finished checkpoint: its directory and metadata.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub meta: CheckpointMeta,
}

/// Finished checkpoints under `root` (directories `step-N` holding `meta.json`), oldest first.
pub fn list_checkpoints(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", root.display())),
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        if entry.path().join(META_FILE).is_file() {
            found.push((step, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

impl Checkpoint {
    /// Opens the checkpoint at `path`: a checkpoint directory, a directory of checkpoints (the
    /// newest is taken) or a run directory (its `checkpoints/`).
    pub fn resolve(path: &Path) -> Result<Checkpoint> {
        if path.join(META_FILE).is_file() {
            return Checkpoint::open(path);
        }
        if !path.is_dir() {
            return Err(UsageError(format!(
                "{}: no such checkpoint or run directory",
                path.display()
            ))
            .into());
        }
        for root in [path.to_path_buf(), path.join("checkpoints")] {
            if let Some((_, dir)) = list_checkpoints(&root)?.pop() {
                return Checkpoint::open(&dir);
            }
        }
        Err(UsageError(format!(
            "{}: holds no finished checkpoint (a checkpoint is a step-N directory with {META_FILE}; \
             .partial-* directories are unfinished saves)",
            path.display()
        ))
        .into())
    }

    /// Opens the checkpoint directory `dir` and validates all of it (see `validate`): nothing
    /// is used from a checkpoint that has not passed.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let ckpt = Checkpoint::read_meta(dir)?;
        ckpt.validate()?;
        Ok(ckpt)
    }

    /// Reads and parses `meta.json`, checking nothing else.
    pub(super) fn read_meta(dir: &Path) -> Result<Checkpoint> {
        let meta_path = dir.join(META_FILE);
        let text = std::fs::read_to_string(&meta_path)
            .map_err(|e| damaged(format!("reading {}: {e}", meta_path.display())))?;
        let meta: CheckpointMeta = serde_json::from_str(&text).map_err(|e| {
            damaged(format!(
                "{} is not a shardtrain checkpoint's metadata: {e}",
                meta_path.display()
            ))
        })?;
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            meta,
        })
    }

    /// Fails unless the checkpoint was written for a model with `layout`'s units (a
    /// [`UsageError`]: the config or the path is to fix).
    pub fn check_layout(&self, layout: &ParamLayout) -> Result<()> {
        self.layout_mismatch(layout)
            .map_or(Ok(()), |msg| Err(UsageError(msg).into()))
    }

    fn layout_mismatch(&self, layout: &ParamLayout) -> Option<String> {
        let saved = &self.meta.units;
        if saved.len() != layout.units.len() {
            return Some(format!(
                "{}: a model of {} units, this config's model has {} (model.n_layer differs?)",
                self.dir.display(),
                saved.len(),
                layout.units.len()
            ));
        }
        saved
            .iter()
            .zip(&layout.units)
            .find(|(s, u)| s.name != u.name || s.numel != u.numel)
            .map(|(s, u)| {
                format!(
                    "{}: unit `{}` has {} parameters, this config's `{}` has {} (the model shape \
                     differs: compare model.* with the checkpoint's config)",
                    self.dir.display(),
                    s.name,
                    s.numel,
                    u.name,
                    u.numel
                )
            })
    }

    /// The run's config as the checkpoint saved it, with `overrides` (`key=value`) applied.
    pub fn config(&self, overrides: &[String]) -> Result<crate::config::Config> {
        let origin = self.dir.join(META_FILE).display().to_string();
        Ok(crate::config::Config::from_yaml_str(
            &self.meta.config_yaml,
            &origin,
            overrides,
        )?)
    }

    /// Every unit's full f32 master weights (for export and sampling; the whole model in memory).
    pub fn full_weights(&self, layout: &ParamLayout) -> Result<Vec<Vec<f32>>> {
        self.check_layout(layout)?;
        let mut reader = self.reader();
        layout
            .units
            .iter()
            .enumerate()
            .map(|(u, spec)| {
                let [master, _, _] = reader.read(u, 0..spec.numel)?;
                Ok(master)
            })
            .collect()
    }

    /// A reader of this checkpoint's state.
    pub fn reader(&self) -> ShardReader<'_> {
        ShardReader {
            ckpt: self,
            files: HashMap::new(),
        }
    }
}

/// Reads ranges of unit state from a checkpoint, loading each rank file at most once.
pub struct ShardReader<'a> {
    ckpt: &'a Checkpoint,
    files: HashMap<usize, Vec<u8>>,
}

impl ShardReader<'_> {
    /// File `i`'s bytes, read and checked against its recorded size and CRC-32.
    fn file(&mut self, i: usize) -> Result<&[u8]> {
        if !self.files.contains_key(&i) {
            let f = &self.ckpt.meta.files[i];
            let path = self.ckpt.dir.join(&f.file);
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            if bytes.len() as u64 != f.bytes || crc32fast::hash(&bytes) != f.crc32 {
                return Err(damaged(format!(
                    "{}: checksum mismatch (the file is corrupted or not the one this checkpoint \
                     wrote)",
                    path.display()
                )));
            }
            self.files.insert(i, bytes);
        }
        Ok(&self.files[&i])
    }

    /// Master weights, first and second moments of elements `range` of `unit`'s flat buffer
    /// (padded coordinates: elements at or past the unit's size read as zero).
    pub fn read(&mut self, unit: usize, range: Range<usize>) -> Result<[Vec<f32>; 3]> {
        let mut out = [
            vec![0.0f32; range.len()],
            vec![0.0f32; range.len()],
            vec![0.0f32; range.len()],
        ];
        let holders: Vec<(usize, Range<usize>)> = self
            .ckpt
            .meta
            .files
            .iter()
            .enumerate()
            .flat_map(|(i, f)| {
                f.pieces
                    .iter()
                    .filter(|p| p.unit == unit)
                    .map(move |p| (i, p.range()))
            })
            .filter(|(_, r)| r.start < range.end && range.start < r.end)
            .collect();
        let dir = self.ckpt.dir.clone();
        for (i, piece) in holders {
            let name = self.ckpt.meta.files[i].file.clone();
            let bytes = self.file(i)?;
            let st = SafeTensors::deserialize(bytes).map_err(|e| {
                damaged(format!(
                    "{}: not a valid safetensors file: {e}",
                    dir.join(&name).display()
                ))
            })?;
            let (lo, hi) = (piece.start.max(range.start), piece.end.min(range.end));
            for (k, tensor) in tensor_names(unit).iter().enumerate() {
                let view = st.tensor(tensor).map_err(|_| {
                    damaged(format!(
                        "{}: tensor `{tensor}` is missing",
                        dir.join(&name).display()
                    ))
                })?;
                if view.dtype() != Dtype::F32 || view.shape() != [piece.len()] {
                    return Err(damaged(format!(
                        "{}: tensor `{tensor}` is {:?} {:?}, the metadata says F32 [{}]",
                        dir.join(&name).display(),
                        view.dtype(),
                        view.shape(),
                        piece.len()
                    )));
                }
                let data = view.data();
                for (j, o) in out[k][lo - range.start..hi - range.start]
                    .iter_mut()
                    .enumerate()
                {
                    let at = (lo - piece.start + j) * 4;
                    *o = f32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]);
                }
            }
        }
        Ok(out)
    }
}
