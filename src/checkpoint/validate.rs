//! The one validation of a checkpoint, run by every consumer before it uses anything in it
//! (resume, `ckpt inspect`, `eval`, `export`, `sample`, `--resume latest`, pruning): the format
//! tag; bounded, consistent numbers; the saved config parsed (hostile YAML refused) and
//! validated; the units equal to the layout that config's model gives, and the fingerprint to
//! both; pieces inside their unit, non-empty, covering every unit exactly once; every file present
//! with its recorded size and CRC-32 and holding exactly the tensors its pieces name, as F32 of
//! their length; the data position of the config's kind of data. [`Checkpoint::check_data`]
//! adds what needs the data itself (resume and inspect run it).
//!
//! Every failure is bad input (exit 2) naming the checkpoint's `meta.json` or file and the field.

use std::collections::HashSet;
use std::path::Path;

use anyhow::Result;
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

use super::binding;
use super::meta::{rank_file_name, tensor_names, FORMAT, META_FILE};
use super::read::Checkpoint;
use crate::config::{Config, DataKind};
use crate::error::UsageError;
use crate::model::ParamLayout;

/// The largest world size a checkpoint may record (far above any job this trainer runs; it
/// bounds what a hostile `meta.json` makes a reader allocate or loop over).
pub const MAX_WORLD_SIZE: usize = 1 << 16;
/// The largest `config_yaml` a checkpoint may hold (ours are a few kilobytes).
pub const MAX_CONFIG_YAML_BYTES: usize = 1 << 20;

impl Checkpoint {
    /// Everything about the checkpoint that its own directory can tell (see the module header);
    /// returns its config.
    pub fn validate(&self) -> Result<Config> {
        let cfg = self.check_meta()?;
        self.verify_all()?;
        Ok(cfg)
    }

    /// The checks of `meta.json` alone (no rank file read); returns the saved config.
    pub(super) fn check_meta(&self) -> Result<Config> {
        let m = &self.meta;
        if m.format != FORMAT {
            return Err(self.bad(
                "format",
                format!("format `{}`, this shardtrain reads `{FORMAT}`", m.format),
            ));
        }
        if !(1..=MAX_WORLD_SIZE).contains(&m.world_size) {
            return Err(self.bad(
                "world_size",
                format!("{} is outside 1..={MAX_WORLD_SIZE}", m.world_size),
            ));
        }
        if m.shard_group_size == 0 || !m.world_size.is_multiple_of(m.shard_group_size) {
            return Err(self.bad(
                "shard_group_size",
                format!(
                    "{} does not divide world_size {}",
                    m.shard_group_size, m.world_size
                ),
            ));
        }
        if m.step == 0 || m.optimizer_steps > m.step {
            return Err(self.bad(
                "step",
                format!(
                    "step {} with {} optimizer steps (a checkpoint is written after step 1 or \
                     later, with at most one optimizer step per step)",
                    m.step, m.optimizer_steps
                ),
            ));
        }
        let cfg = self.saved_config()?;
        let tokens = (cfg.train.global_batch_size as u64)
            .checked_mul(cfg.model.seq_len as u64)
            .and_then(|per_step| m.step.checked_mul(per_step));
        if tokens != Some(m.tokens_seen) {
            return Err(self.bad(
                "tokens_seen",
                format!(
                    "{} after {} steps of train.global_batch_size {} x model.seq_len {}",
                    m.tokens_seen, m.step, cfg.train.global_batch_size, cfg.model.seq_len
                ),
            ));
        }
        let plan = crate::shard::ShardPlan::new(&cfg.parallel);
        if plan.world_size != m.world_size || plan.group_size != m.shard_group_size {
            return Err(self.bad(
                "world_size",
                format!(
                    "world size {} with shard groups of {}, its config_yaml says {} and {}",
                    m.world_size, m.shard_group_size, plan.world_size, plan.group_size
                ),
            ));
        }
        let layout = ParamLayout::gpt(crate::train::gpt_shape(&cfg), cfg.model.init_std);
        self.check_units(&layout)?;
        let fingerprint = binding::model_fingerprint(&cfg, &layout);
        match &m.model_fingerprint {
            Some(f) if *f != fingerprint => {
                return Err(self.bad(
                    "model_fingerprint",
                    format!("{f}, the model its config_yaml describes is {fingerprint}"),
                ))
            }
            Some(_) => {}
            None => tracing::warn!(
                "{}: written before checkpoints recorded their run and model; it is read \
                 without those checks",
                self.meta_path()
            ),
        }
        if let Some(id) = &m.run_id {
            if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(self.bad("run_id", format!("`{id}` is not a run id")));
            }
        }
        self.check_pieces()?;
        self.check_data_kind(&cfg)?;
        Ok(cfg)
    }

    /// The saved config: plain YAML (no anchors or aliases, which our writer never emits: an
    /// alias bomb is refused before it expands), parsed and validated by the config loader.
    fn saved_config(&self) -> Result<Config> {
        let yaml = &self.meta.config_yaml;
        if yaml.len() > MAX_CONFIG_YAML_BYTES {
            return Err(self.bad(
                "config_yaml",
                format!("{} bytes, more than {MAX_CONFIG_YAML_BYTES}", yaml.len()),
            ));
        }
        let mut budget = serde_saphyr::Budget::default();
        budget.max_aliases = 0;
        budget.max_anchors = 0;
        budget.max_merge_keys = 0;
        budget.max_depth = 16;
        budget.max_nodes = 10_000;
        budget.max_events = 100_000;
        let mut options = serde_saphyr::Options::default();
        options.budget = Some(budget);
        serde_saphyr::from_str_with_options::<serde::de::IgnoredAny>(yaml, options).map_err(
            |e| {
                self.bad(
                    "config_yaml",
                    format!(
                        "not a config this shardtrain wrote (anchors and aliases are refused): {e}"
                    ),
                )
            },
        )?;
        Config::from_yaml_str(yaml, &format!("{} (config_yaml)", self.meta_path()), &[])
            .map_err(|e| self.bad("config_yaml", format!("not a valid config:\n{e}")))
    }

    /// The units are exactly those of the model the saved config describes.
    fn check_units(&self, layout: &ParamLayout) -> Result<()> {
        let saved = &self.meta.units;
        let same = saved.len() == layout.units.len()
            && saved
                .iter()
                .zip(&layout.units)
                .all(|(s, u)| s.name == u.name && s.numel == u.numel);
        if same {
            return Ok(());
        }
        let show = |units: Vec<(&str, usize)>| {
            units
                .iter()
                .map(|(n, k)| format!("{n}:{k}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        Err(self.bad(
            "units",
            format!(
                "[{}], the model of its config_yaml has [{}]",
                show(saved.iter().map(|u| (u.name.as_str(), u.numel)).collect()),
                show(
                    layout
                        .units
                        .iter()
                        .map(|u| (u.name.as_str(), u.numel))
                        .collect()
                )
            ),
        ))
    }

    /// Files named for distinct ranks of the world; pieces non-empty and inside their unit; and
    /// every unit's `0..numel` covered exactly once (the writers together hold one copy).
    fn check_pieces(&self) -> Result<()> {
        let m = &self.meta;
        if m.files.is_empty() || m.files.len() > m.world_size {
            return Err(self.bad(
                "files",
                format!("{} files for a world of {}", m.files.len(), m.world_size),
            ));
        }
        let mut ranks = HashSet::new();
        let mut per_unit: Vec<Vec<(usize, usize)>> = vec![Vec::new(); m.units.len()];
        for f in &m.files {
            if f.rank >= m.world_size || !ranks.insert(f.rank) || f.file != rank_file_name(f.rank) {
                return Err(self.bad(
                    "files",
                    format!(
                        "`{}` of rank {}: not the file of a distinct rank of the world of {}",
                        f.file, f.rank, m.world_size
                    ),
                ));
            }
            for p in &f.pieces {
                let numel = m.units.get(p.unit).map(|u| u.numel);
                if numel.is_none_or(|n| p.start >= p.end || p.end > n) {
                    return Err(self.bad(
                        "pieces",
                        format!(
                            "{} holds unit {} elements {}..{}: {}",
                            f.file,
                            p.unit,
                            p.start,
                            p.end,
                            match numel {
                                None => format!("there are {} units", m.units.len()),
                                Some(n) => format!("not a non-empty range inside 0..{n}"),
                            }
                        ),
                    ));
                }
                per_unit[p.unit].push((p.start, p.end));
            }
        }
        for (u, ranges) in per_unit.iter_mut().enumerate() {
            ranges.sort_unstable();
            let mut covered = 0;
            for &(start, end) in ranges.iter() {
                if start != covered {
                    let what = if start < covered {
                        "held twice"
                    } else {
                        "held by no file"
                    };
                    return Err(self.bad(
                        "pieces",
                        format!(
                            "unit `{}`: elements {}..{} are {what}",
                            m.units[u].name,
                            covered.min(start),
                            covered.max(start)
                        ),
                    ));
                }
                covered = end;
            }
            if covered != m.units[u].numel {
                return Err(self.bad(
                    "pieces",
                    format!(
                        "unit `{}`: elements {covered}..{} are held by no file",
                        m.units[u].name, m.units[u].numel
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The data position is one of the config's kind of data (its details need the data:
    /// [`Checkpoint::check_data`]).
    fn check_data_kind(&self, cfg: &Config) -> Result<()> {
        let want = match cfg.data.kind {
            DataKind::Synthetic => "synthetic",
            DataKind::Shards | DataKind::Text => "shards",
        };
        let kind = self.meta.data_position.get("kind").and_then(|k| k.as_str());
        if kind != Some(want) {
            return Err(self.bad(
                "data_position",
                format!("of kind {kind:?}, its config's data is of kind `{want}`"),
            ));
        }
        Ok(())
    }

    /// Reads every rank file: its recorded size and CRC-32, and exactly the tensors its pieces
    /// name, each F32 of the piece's length.
    pub fn verify_all(&self) -> Result<()> {
        for f in &self.meta.files {
            let path = self.dir.join(&f.file);
            let bytes = std::fs::read(&path).map_err(|e| {
                damaged(format!(
                    "rank {}'s file {} is missing or unreadable: {e}",
                    f.rank,
                    path.display()
                ))
            })?;
            if bytes.len() as u64 != f.bytes {
                return Err(damaged(format!(
                    "{}: {} bytes, the checkpoint recorded {} (truncated or replaced)",
                    path.display(),
                    bytes.len(),
                    f.bytes
                )));
            }
            if crc32fast::hash(&bytes) != f.crc32 {
                return Err(damaged(format!(
                    "{}: checksum mismatch (the file is corrupted or not the one this checkpoint \
                     wrote)",
                    path.display()
                )));
            }
            let st = SafeTensors::deserialize(&bytes).map_err(|e| {
                damaged(format!(
                    "{}: not a valid safetensors file: {e}",
                    path.display()
                ))
            })?;
            let mut expected = HashSet::new();
            for p in &f.pieces {
                for name in tensor_names(p.unit) {
                    let view = st.tensor(&name).map_err(|_| {
                        damaged(format!("{}: tensor `{name}` is missing", path.display()))
                    })?;
                    if view.dtype() != Dtype::F32 || view.shape() != [p.end - p.start] {
                        return Err(damaged(format!(
                            "{}: tensor `{name}` is {:?} {:?}, the metadata says F32 [{}]",
                            path.display(),
                            view.dtype(),
                            view.shape(),
                            p.end - p.start
                        )));
                    }
                    expected.insert(name);
                }
            }
            if st.len() != expected.len() {
                return Err(damaged(format!(
                    "{}: {} tensors, its pieces name {}",
                    path.display(),
                    st.len(),
                    expected.len()
                )));
            }
        }
        Ok(())
    }

    /// The data position fits `cfg`'s training data, opened as the run in `run_dir` would open
    /// it (files present, same dataset, seed and sequence length).
    pub fn check_data(&self, cfg: &Config, run_dir: &Path) -> Result<()> {
        let mut data =
            crate::data::source::open_source(cfg, crate::data::synthetic::Split::Train, run_dir)
                .map_err(|e| {
                    damaged(format!(
                        "{}: the training data it continues cannot be opened: {e:#}",
                        self.dir.display()
                    ))
                })?;
        data.seek(&self.meta.data_position)
            .map_err(|e| self.bad("data_position", format!("{e:#}")))
    }

    fn meta_path(&self) -> String {
        self.dir.join(META_FILE).display().to_string()
    }

    /// The error for a bad `field` of `meta.json`.
    fn bad(&self, field: &str, what: String) -> anyhow::Error {
        damaged(format!("{}: `{field}`: {what}", self.meta_path()))
    }
}

/// A checkpoint that is damaged or not one of ours is bad input, like a bad config: the user must
/// choose another (exit 2), as opposed to a run that failed.
pub(super) fn damaged(message: String) -> anyhow::Error {
    UsageError(message).into()
}
