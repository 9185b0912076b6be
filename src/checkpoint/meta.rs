//! What a checkpoint's `meta.json` records: where training stood (step, tokens, optimizer steps,
//! data position), how it was run (the config, world size, strategy, dtype policy), the model's
//! unit layout, and for every rank file the pieces of each unit it holds and its checksum.
//!
//! Pieces are ranges of a unit's *unpadded* flat buffer (`0..numel`): padding depends on the
//! shard-group size, the real elements do not, so a reader with any world size and strategy finds
//! its own range in them (resharding).

use std::ops::Range;

use serde::{Deserialize, Serialize};

/// The format tag every `meta.json` carries.
pub const FORMAT: &str = "shardtrain-checkpoint-v1";
/// Name of the metadata file inside a checkpoint directory.
pub const META_FILE: &str = "meta.json";

/// One unit of the model as the checkpoint saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitMeta {
    pub name: String,
    pub numel: usize,
}

/// A range of one unit held by a rank file, as tensors `u{unit}.master`, `u{unit}.exp_avg` and
/// `u{unit}.exp_avg_sq` (f32, `end - start` elements each).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    pub unit: usize,
    pub start: usize,
    pub end: usize,
}

impl Piece {
    pub fn range(&self) -> Range<usize> {
        self.start..self.end
    }
}

/// One rank's file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMeta {
    /// File name inside the checkpoint directory.
    pub file: String,
    /// The global rank that wrote it.
    pub rank: usize,
    pub bytes: u64,
    /// CRC-32 of the whole file.
    pub crc32: u32,
    pub pieces: Vec<Piece>,
}

/// The whole `meta.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format: String,
    /// The commit of the binary that wrote it.
    pub commit: String,
    /// Steps completed.
    pub step: u64,
    pub tokens_seen: u64,
    /// AdamW's step count (bias correction continues from it).
    pub optimizer_steps: u64,
    /// The run's resolved config, as YAML.
    pub config_yaml: String,
    pub world_size: usize,
    pub strategy: String,
    pub shard_group_size: usize,
    pub param_dtype: String,
    pub reduce_dtype: String,
    pub units: Vec<UnitMeta>,
    /// Position of the training data stream after `step` steps.
    pub data_position: serde_json::Value,
    pub files: Vec<FileMeta>,
    /// The id of the run that wrote it (`RUN/run-id`, see `binding`). Checkpoints written
    /// before ids existed lack it (and the fingerprint): they are read with a warning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// The fingerprint of the model it holds (see `binding::model_fingerprint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_fingerprint: Option<String>,
}

/// The name of the checkpoint directory for `step`.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// The name of rank `rank`'s file.
pub fn rank_file_name(rank: usize) -> String {
    format!("rank-{rank:05}.safetensors")
}

/// The tensor names of one piece: master weights, first and second moments.
pub fn tensor_names(unit: usize) -> [String; 3] {
    [
        format!("u{unit}.master"),
        format!("u{unit}.exp_avg"),
        format!("u{unit}.exp_avg_sq"),
    ]
}
