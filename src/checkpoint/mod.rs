//! Checkpoints: sharded training state that a run can be resumed from on any world size and
//! strategy (`meta`, `write`, `read`, `staging`), and the Hugging Face GPT-2 format for trained
//! weights (`hf`).
//!
//! A checkpoint is a directory `step-N` holding `meta.json` and one safetensors file per rank that
//! holds a distinct shard (replicas of a shard write once): f32 master weights and AdamW moments
//! for the pieces of each unit that rank owns. The training loop drives the save protocol (see
//! `write`) and reads its own ranges back on resume (see `read`).

pub mod binding;
pub mod hf;
pub mod meta;
pub mod read;
pub mod staging;
pub mod validate;
pub mod write;

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

pub use meta::CheckpointMeta;
pub use read::Checkpoint;

/// `shardtrain ckpt inspect`: what a checkpoint holds, after exactly the validation a resume runs
/// (the whole checkpoint, then its data position against the data it continues).
pub fn inspect(path: &Path) -> Result<String> {
    // `resolve` validated all of it, every file's checksum included; only the saved config is
    // still wanted from the metadata checks (cheap), not a second read of every file.
    let ckpt = Checkpoint::resolve(path)?;
    let cfg = ckpt.check_meta()?;
    // The data sits where the run that wrote it found it (a text cache beside its run directory).
    let run_dir = binding::home_run_dir(&ckpt.dir).unwrap_or_else(|| ckpt.dir.clone());
    ckpt.check_data(&cfg, &run_dir)?;
    let m = &ckpt.meta;
    let mut out = String::new();
    let _ = writeln!(out, "checkpoint {} (valid)", ckpt.dir.display());
    let _ = writeln!(
        out,
        "run id {} | model fingerprint {}",
        m.run_id.as_deref().unwrap_or("(not recorded)"),
        m.model_fingerprint.as_deref().unwrap_or("(not recorded)")
    );
    let _ = writeln!(
        out,
        "step {} | {} tokens seen | world size {} | {} (shard group {}) | params {}, reduce {} | written by commit {}",
        m.step, m.tokens_seen, m.world_size, m.strategy, m.shard_group_size, m.param_dtype, m.reduce_dtype, m.commit
    );
    let total: usize = m.units.iter().map(|u| u.numel).sum();
    let _ = writeln!(out, "{} units, {total} parameters:", m.units.len());
    for (i, u) in m.units.iter().enumerate() {
        let _ = writeln!(
            out,
            "  unit {i:>3} {:<14} {:>12} f32 x 3 (master, exp_avg, exp_avg_sq)",
            u.name, u.numel
        );
    }
    let _ = writeln!(out, "{} files, checksums verified:", m.files.len());
    for f in &m.files {
        let pieces: Vec<String> = f
            .pieces
            .iter()
            .map(|p| format!("u{}[{}..{}]", p.unit, p.start, p.end))
            .collect();
        let _ = writeln!(
            out,
            "  {} (rank {}, {} bytes, crc32 {:08x}): {}",
            f.file,
            f.rank,
            f.bytes,
            f.crc32,
            pieces.join(" ")
        );
    }
    Ok(out)
}
