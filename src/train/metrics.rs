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
    /// A new metrics file, or with `append` the existing one continued (a resumed run).
    pub fn open(path: &Path, append: bool) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(append)
            .write(true)
            .truncate(!append)
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
