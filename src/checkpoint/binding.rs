//! What ties a checkpoint to its run and to its model: the run id (drawn once per run directory,
//! kept in `RUN/run-id`) and the model fingerprint (a hash of every config key that changes the
//! function the model computes, and of the unit layout those keys give).
//!
//! A checkpoint found in a run's `checkpoints/` whose run id is not that run's was copied there
//! from another run (foreign); a checkpoint whose model is not the run's cannot continue it. The
//! keys of the fingerprint are also the keys a resume may not change.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rand::RngExt;

use super::read::Checkpoint;
use crate::config::Config;
use crate::model::ParamLayout;

/// Name of the file holding a run directory's id.
pub const RUN_ID_FILE: &str = "run-id";

/// The config keys that change what the model computes (or, for `model.init_from`, where its
/// weights come from, which a resume takes from the checkpoint instead), with their values.
///
/// Not here, so free to change on resume: `train.*` (schedule, batch sizes, optimizer, seed,
/// steps: how training goes on, not what the model is), `data.*` (what it learns from next),
/// `parallel.*` (world size, strategy and dtypes: resharding and mixed precision compute the
/// same function), `checkpoint.*`, `logging.*` and `device`; `model.init_std` only draws a fresh
/// model's weights, which a resume reads from the checkpoint.
pub fn model_keys(cfg: &Config) -> Vec<(&'static str, String)> {
    let m = &cfg.model;
    vec![
        ("model.n_layer", m.n_layer.to_string()),
        ("model.n_head", m.n_head.to_string()),
        ("model.d_model", m.d_model.to_string()),
        ("model.vocab_size", m.vocab_size.to_string()),
        ("model.block_size", m.block_size.to_string()),
        ("model.seq_len", m.seq_len.to_string()),
    ]
}

/// The keys a resume refuses to change: the model keys, and `model.init_from` (the checkpoint's
/// weights win over it, so a new value would be silently ignored).
pub fn fixed_on_resume(cfg: &Config) -> Vec<(&'static str, String)> {
    let mut keys = model_keys(cfg);
    keys.push(("model.init_from", cfg.model.init_from.clone()));
    keys
}

/// The first key whose value differs between `saved` and `wanted`, as (key, saved, wanted).
pub fn changed_fixed_key(
    saved: &Config,
    wanted: &Config,
) -> Option<(&'static str, String, String)> {
    fixed_on_resume(saved)
        .into_iter()
        .zip(fixed_on_resume(wanted))
        .find(|((_, a), (_, b))| a != b)
        .map(|((key, a), (_, b))| (key, a, b))
}

/// The fingerprint of `cfg`'s model with `layout` (its units): 16 hex digits of FNV-1a 64 over
/// the model keys and every unit's name and size. Not a security measure: it tells models apart.
pub fn model_fingerprint(cfg: &Config, layout: &ParamLayout) -> String {
    let mut text = String::new();
    for (key, value) in model_keys(cfg) {
        text.push_str(&format!("{key}={value}\n"));
    }
    for u in &layout.units {
        text.push_str(&format!("unit {} {}\n", u.name, u.numel));
    }
    format!("{:016x}", fnv1a64(text.as_bytes()))
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The id of the run in `run_dir`, if it has one (`None` for a run made before ids existed, or
/// an unreadable id file).
pub fn read_run_id(run_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(run_dir.join(RUN_ID_FILE)).ok()?;
    let id = text.trim();
    is_run_id(id).then(|| id.to_string())
}

fn is_run_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The id of the run in `run_dir`, drawn and written (to a temporary file, then renamed, so a
/// crash never leaves a partial id) if it has none yet.
pub fn ensure_run_id(run_dir: &Path) -> Result<String> {
    ensure_run_id_as(run_dir, None)
}

/// [`ensure_run_id`], taking `known` (the id of a checkpoint of this run that is resumed in
/// place) rather than a fresh one when the run directory has lost its id file.
pub fn ensure_run_id_as(run_dir: &Path, known: Option<&str>) -> Result<String> {
    if let Some(id) = read_run_id(run_dir) {
        return Ok(id);
    }
    let id = match known {
        Some(id) if is_run_id(id) => id.to_string(),
        _ => format!("{:032x}", rand::rng().random::<u128>()),
    };
    let path = run_dir.join(RUN_ID_FILE);
    let mut tmp = tempfile::NamedTempFile::new_in(run_dir)
        .with_context(|| format!("creating a temporary file in {}", run_dir.display()))?;
    writeln!(tmp, "{id}")
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    tmp.persist(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
}

/// The run directory a checkpoint belongs to: `RUN/checkpoints/step-N` gives `RUN`.
pub fn home_run_dir(checkpoint_dir: &Path) -> Option<PathBuf> {
    let root = checkpoint_dir.parent()?;
    (root.file_name()? == "checkpoints").then(|| root.parent().map(Path::to_path_buf))?
}

/// Why `ckpt` (validated, with its saved config `saved`) does not belong to the run directory
/// it lies in, if it does not: another run's id, or another model than the run's `config.yaml`
/// (which also catches checkpoints written before run ids). `None` when it belongs, or when it
/// lies outside a run directory.
pub fn foreign_reason(ckpt: &Checkpoint, saved: &Config) -> Option<String> {
    let home = home_run_dir(&ckpt.dir)?;
    if let (Some(theirs), Some(ours)) = (&ckpt.meta.run_id, read_run_id(&home)) {
        if *theirs != ours {
            return Some(format!(
                "it was written by run {theirs}, but {} is run {ours} (copied from another run?)",
                home.display()
            ));
        }
    }
    let home_cfg = Config::load(Some(&home.join(crate::train::CONFIG_FILE)), &[]).ok()?;
    model_keys(saved)
        .into_iter()
        .zip(model_keys(&home_cfg))
        .find(|((_, a), (_, b))| a != b)
        .map(|((key, a), (_, b))| {
            format!(
                "it holds another model ({key} {a}) than the run in {} ({key} {b})",
                home.display()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_id_is_drawn_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_run_id(dir.path()), None);
        let id = ensure_run_id(dir.path()).unwrap();
        assert!(is_run_id(&id), "{id}");
        assert_eq!(ensure_run_id(dir.path()).unwrap(), id);
        assert_eq!(read_run_id(dir.path()), Some(id));
    }

    #[test]
    fn the_fingerprint_follows_the_model_and_not_the_training() {
        let base = Config::load(None, &[]).unwrap();
        let layout = |c: &Config| ParamLayout::gpt(crate::train::gpt_shape(c), c.model.init_std);
        let fp = model_fingerprint(&base, &layout(&base));
        let heads = Config::load(None, &["model.n_head=8".to_string()]).unwrap();
        assert_ne!(model_fingerprint(&heads, &layout(&heads)), fp);
        assert_eq!(
            changed_fixed_key(&base, &heads).map(|c| c.0),
            Some("model.n_head")
        );
        let lr = Config::load(None, &["train.lr=0.5".to_string()]).unwrap();
        assert_eq!(model_fingerprint(&lr, &layout(&lr)), fp);
        assert_eq!(changed_fixed_key(&base, &lr), None);
    }
}
