//! Per-step metrics as JSON lines in the run directory: one object per step, flushed as written so
//! a crashed or interrupted run keeps everything up to its last step.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

/// One line of the metrics file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepRecord {
    pub step: u64,
    /// Mean training loss over the step's global batch.
    pub loss: f32,
    pub lr: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    /// Validation loss, on steps where it was measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f32>,
}

pub struct MetricsWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl MetricsWriter {
    /// A new metrics file, or, for a run resumed after step `resumed_after`, the existing one
    /// continued: records of later steps (written before a crash, and about to be run again) are
    /// dropped first, so every step appears once, in order.
    pub fn open(path: &Path, resumed_after: Option<u64>) -> Result<Self> {
        if let Some(step) = resumed_after {
            rewind(path, step)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(resumed_after.is_some())
            .write(true)
            .truncate(resumed_after.is_none())
            .open(path)
            .with_context(|| format!("opening the metrics file {}", path.display()))?;
        Ok(MetricsWriter {
            path: path.to_owned(),
            out: BufWriter::new(file),
        })
    }

    pub fn write(&mut self, record: &StepRecord) -> Result<()> {
        let line = serde_json::to_string(record)?;
        writeln!(self.out, "{line}")
            .and_then(|()| self.out.flush())
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

/// Keeps the records of steps up to `step` (rewritten beside, then renamed: atomic).
fn rewind(path: &Path, step: u64) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let step_of = |line: &str| {
        serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v["step"].as_u64())
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| step_of(l).is_some_and(|s| s <= step))
        .collect();
    if kept.len() == text.lines().count() {
        return Ok(());
    }
    let tmp = path.with_extension("jsonl.partial");
    let mut body = kept.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    std::fs::write(&tmp, body).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resuming_drops_records_after_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        let lines: String = (1..=8).map(|s| format!("{{\"step\":{s}}}\n")).collect();
        std::fs::write(&path, lines).unwrap();
        let mut w = MetricsWriter::open(&path, Some(5)).unwrap();
        let record = StepRecord {
            step: 6,
            loss: 1.0,
            lr: 0.1,
            grad_norm: 1.0,
            tokens_per_s: 1.0,
            elapsed_s: 1.0,
            val_loss: None,
        };
        w.write(&record).unwrap();
        let steps: Vec<u64> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(steps, vec![1, 2, 3, 4, 5, 6]);
    }
}
