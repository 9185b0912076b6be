// The typed configuration: one struct per YAML section, with defaults equal to configs/tiny.yaml.
// Pure data plus two derived quantities; parsing lives in mod.rs, checks in validate.rs.

use serde::{Deserialize, Serialize};

use crate::backend::DType;

/// A whole training job, as read from a YAML file (see configs/tiny.yaml for every key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Shape of the GPT.
    pub model: ModelConfig,
    /// Where training and validation tokens come from.
    pub data: DataConfig,
    /// Optimisation: steps, batch sizes, learning-rate schedule, AdamW settings, evaluation.
    pub train: TrainConfig,
    /// How the job is split across ranks.
    pub parallel: ParallelConfig,
    /// What is saved to the run directory.
    pub checkpoint: CheckpointConfig,
    /// Console and metrics-file output.
    pub logging: LoggingConfig,
    /// Which backend runs the job.
    pub device: DeviceKind,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            model: ModelConfig::default(),
            data: DataConfig::default(),
            train: TrainConfig::default(),
            parallel: ParallelConfig::default(),
            checkpoint: CheckpointConfig::default(),
            logging: LoggingConfig::default(),
            device: DeviceKind::Auto,
        }
    }
}

/// Shape of the GPT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Number of transformer blocks (at most `sizes::MAX_LAYERS`, 4096). The model keys together
    /// must describe a job one unsharded rank could hold within a pebibyte
    /// (`sizes::MAX_UNSHARDED_RANK_BYTES`); whether it fits this machine is checked before a run
    /// writes anything.
    pub n_layer: usize,
    /// Attention heads per block; must divide d_model.
    pub n_head: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Rows of the token embedding table (at least the tokenizer's vocabulary).
    pub vocab_size: usize,
    /// Rows of the position table: the longest sequence the model can ever see.
    pub block_size: usize,
    /// Tokens per training sequence (at most block_size).
    pub seq_len: usize,
    /// Standard deviation of the normal initialisation of weight matrices.
    pub init_std: f32,
    /// Start from these weights instead of a random initialisation: a Hugging Face GPT-2
    /// `model.safetensors` (ours from `shardtrain export`, or a public GPT-2 checkpoint); empty
    /// means random. The shapes must match the model's (a smaller vocabulary is padded).
    pub init_from: String,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            n_layer: 4,
            n_head: 4,
            d_model: 128,
            vocab_size: 256,
            block_size: 64,
            seq_len: 64,
            init_std: 0.02,
            init_from: String::new(),
        }
    }
}

impl ModelConfig {
    /// Width of one attention head (d_model / n_head; 0 when n_head is 0, which validation rejects).
    pub fn head_dim(&self) -> usize {
        self.d_model.checked_div(self.n_head).unwrap_or(0)
    }
}

/// Source of training data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataKind {
    /// Generated arithmetic problems (see data.synthetic).
    Synthetic,
    /// Token shard files in llm.c's format (data.train, data.val), e.g. from `shardtrain tokenize`.
    Shards,
    /// UTF-8 text files (data.train, data.val), tokenized with data.tokenizer into a cache of
    /// shards next to the run on first use.
    Text,
}

/// How text becomes tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenizerKind {
    /// One token per byte (vocabulary of 256).
    Bytes,
    /// GPT-2's byte-level BPE (r50k_base, vocabulary of 50,257).
    Gpt2,
}

impl TokenizerKind {
    /// Token ids this tokenizer produces: `0..vocab_size()`. The sizes live here, on the config
    /// side, so that validation needs nothing from `data` (which depends on the config).
    pub const fn vocab_size(self) -> usize {
        match self {
            TokenizerKind::Bytes => 256,
            // 50,000 merges, 256 bytes and `<|endoftext|>`.
            TokenizerKind::Gpt2 => 50_257,
        }
    }

    /// The name a config spells it with.
    pub const fn name(self) -> &'static str {
        match self {
            TokenizerKind::Bytes => "bytes",
            TokenizerKind::Gpt2 => "gpt2",
        }
    }
}

/// Where training and validation tokens come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Source of the data.
    pub kind: DataKind,
    /// How text becomes tokens.
    pub tokenizer: TokenizerKind,
    /// Training shards (kind: shards): a path or a glob of the file name, e.g.
    /// `data/fineweb_train_*.bin`; for kind text, the text files, e.g. `corpus/*.txt`.
    pub train: String,
    /// Validation shards (kind: shards), as `train`; for kind text, validation text files, or
    /// empty to hold out `val_fraction` of the training text.
    pub val: String,
    /// Kind text without `val`: the share of the training text (its first bytes) held out for
    /// validation.
    pub val_fraction: f64,
    /// Settings of the synthetic source (used when kind is synthetic).
    pub synthetic: SyntheticConfig,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            kind: DataKind::Synthetic,
            tokenizer: TokenizerKind::Bytes,
            train: String::new(),
            val: String::new(),
            val_fraction: 0.1,
            synthetic: SyntheticConfig::default(),
        }
    }
}

/// Settings of the synthetic addition-problem source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticConfig {
    /// Largest operand of a generated problem.
    pub max_operand: u32,
    /// Share of problems held out for validation (strictly between 0 and 1).
    pub val_fraction: f32,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig {
            max_operand: 999,
            val_fraction: 0.1,
        }
    }
}

/// Optimisation: steps, batch sizes, learning-rate schedule, AdamW settings, evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Number of optimiser steps.
    pub max_steps: u64,
    /// Sequences per forward/backward pass on one rank.
    pub micro_batch_size: usize,
    /// Sequences per optimiser step, over all ranks and accumulation steps. A step trains on at
    /// most 2^27 tokens (global_batch_size x model.seq_len, `sizes::MAX_TOKENS_PER_STEP`), about
    /// eight times the largest published batches, so that a step ends in reasonable time.
    pub global_batch_size: usize,
    /// Peak learning rate (reached after warmup).
    pub lr: f32,
    /// Learning rate at the end of the decay.
    pub min_lr: f32,
    /// Steps of linear warmup from 0 to lr.
    pub warmup_steps: u64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f32,
    /// Clip the global gradient norm to this value; 0 disables clipping.
    pub grad_clip: f32,
    /// AdamW first-moment decay.
    pub beta1: f32,
    /// AdamW second-moment decay.
    pub beta2: f32,
    /// AdamW denominator epsilon.
    pub eps: f32,
    /// Evaluate on the validation split every this many steps; 0 disables evaluation.
    pub eval_every: u64,
    /// Validation tokens per evaluation: at most 2^27 (`sizes::MAX_EVAL_TOKENS`, the largest
    /// step's worth), so that an evaluation ends in reasonable time.
    pub eval_tokens: usize,
    /// Seed of initialisation and data order.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            max_steps: 300,
            micro_batch_size: 8,
            global_batch_size: 32,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 50,
            weight_decay: 0.1,
            grad_clip: 1.0,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            eval_every: 50,
            eval_tokens: 8192,
            seed: 1337,
        }
    }
}

impl TrainConfig {
    /// Micro-batches each rank accumulates per optimiser step:
    /// global_batch_size / (micro_batch_size * world_size), or 0 when the divisor is 0.
    pub fn grad_accum_steps(&self, world_size: usize) -> usize {
        self.micro_batch_size
            .checked_mul(world_size)
            .and_then(|per_pass| self.global_batch_size.checked_div(per_pass))
            .unwrap_or(0)
    }
}

/// How the job is split across ranks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelConfig {
    /// Number of ranks (threads on the CPU backend).
    pub world_size: usize,
    /// What is sharded across ranks (FSDP's sharding strategies / ZeRO stages).
    pub strategy: ShardStrategy,
    /// hybrid_shard only: ranks per shard group (must divide world_size); groups replicate.
    pub shard_group_size: usize,
    /// Precision of gathered parameters and of gradient collectives; master weights are always f32.
    pub mixed_precision: MixedPrecision,
    /// Seconds a rank waits in one collective before the job fails naming the missing ranks.
    pub collective_timeout_s: f64,
    /// Gather the next unit's parameters before computing the current one.
    pub prefetch: bool,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        ParallelConfig {
            world_size: 1,
            strategy: ShardStrategy::FullShard,
            shard_group_size: 0,
            mixed_precision: MixedPrecision::default(),
            collective_timeout_s: 60.0,
            prefetch: true,
        }
    }
}

/// What is sharded across ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShardStrategy {
    /// ZeRO-3: parameters, gradients and optimizer state sharded; parameters gathered per unit
    /// before use and freed after, in forward and again in backward.
    FullShard,
    /// ZeRO-2: gradients and optimizer state sharded; gathered parameters kept from forward to
    /// backward.
    ShardGradOp,
    /// DDP: everything replicated, gradients all-reduced.
    NoShard,
    /// full_shard inside groups of shard_group_size ranks, replicated across groups.
    HybridShard,
}

/// Mixed precision policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MixedPrecision {
    /// Precision of gathered parameters, activations and compute (f32 or bf16).
    pub param_dtype: DType,
    /// Precision of gradients in collectives (f32 or bf16).
    pub reduce_dtype: DType,
}

impl Default for MixedPrecision {
    fn default() -> Self {
        MixedPrecision {
            param_dtype: DType::F32,
            reduce_dtype: DType::F32,
        }
    }
}

/// What is saved to the run directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Write the final weights to the run directory.
    pub save_final: bool,
    /// Write a sharded checkpoint (master weights, AdamW moments, data position) every this many
    /// steps, and at the last step; 0 turns periodic checkpoints off (a stop signal still writes one).
    pub every_steps: u64,
    /// Complete checkpoints kept; older ones are deleted once a newer one is complete.
    pub keep_last: u64,
    /// Where checkpoints go; empty means `checkpoints/` inside the run directory.
    pub dir: String,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            save_final: true,
            every_steps: 0,
            keep_last: 2,
            dir: String::new(),
        }
    }
}

/// Console and metrics-file output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// Log a line (and a metrics record) every this many steps.
    pub every_steps: u64,
    /// Name of the JSON-lines metrics file inside the run directory.
    pub metrics_file: String,
    /// How progress is shown on the console.
    pub progress: ProgressMode,
    /// Time every device op during the last this-many steps (rank 0) and list where the time
    /// went in the summary; 0 turns it off (timing each op costs a little time of its own).
    pub profile_ops_steps: u64,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            every_steps: 10,
            metrics_file: "metrics.jsonl".to_string(),
            progress: ProgressMode::Auto,
            profile_ops_steps: 0,
        }
    }
}

/// How progress is shown on the console.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProgressMode {
    /// A progress bar on a terminal, plain lines otherwise.
    Auto,
    /// Always a progress bar.
    Bar,
    /// Always plain log lines.
    Plain,
}

/// Which backend runs the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// The best backend available on this machine.
    Auto,
    /// The CPU reference backend.
    Cpu,
    /// The CUDA backend on GPU 0 (every rank of a `local` world shares it); an error when no
    /// usable GPU, driver or cuBLAS is found, or the binary was built without kernels.
    Cuda,
    /// The CUDA backend on the simulated GPU: every kernel compiled for the host and run on the
    /// CPU, with race and bounds checks (slow: for verifying the GPU code without a GPU).
    Sim,
}
