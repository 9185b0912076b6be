// The rules a config must satisfy before training starts (impossible or unsupported values).
// Pure: returns every problem as (dotted key, what is wrong); report.rs adds file and line.

use super::schema::{Config, DataKind, ShardStrategy};

/// Collects the problems of a config, in section order.
struct Problems(Vec<(String, String)>);

impl Problems {
    fn push(&mut self, key: &str, problem: String) {
        self.0.push((key.to_string(), problem));
    }

    fn at_least_one(&mut self, key: &str, value: u64) {
        if value < 1 {
            self.push(key, format!("must be at least 1 (got {value})"));
        }
    }

    fn positive(&mut self, key: &str, value: f32) {
        if !(value.is_finite() && value > 0.0) {
            self.push(key, format!("must be a finite number > 0 (got {value})"));
        }
    }

    fn non_negative(&mut self, key: &str, value: f32, note: &str) {
        if !(value.is_finite() && value >= 0.0) {
            self.push(
                key,
                format!("must be a finite number >= 0{note} (got {value})"),
            );
        }
    }

    fn below_one(&mut self, key: &str, value: f32) {
        if !(value.is_finite() && (0.0..1.0).contains(&value)) {
            self.push(key, format!("must be in [0, 1) (got {value})"));
        }
    }
}

/// The longest path Linux opens (PATH_MAX): a longer value cannot name a file.
const PATH_MAX: usize = 4096;

/// Every problem of `config`; empty when it is valid.
pub(crate) fn problems(config: &Config) -> Vec<(String, String)> {
    let mut out = Problems(Vec::new());
    for (key, value) in [
        ("model.init_from", &config.model.init_from),
        ("data.train", &config.data.train),
        ("data.val", &config.data.val),
        ("checkpoint.dir", &config.checkpoint.dir),
        ("logging.metrics_file", &config.logging.metrics_file),
    ] {
        if value.len() > PATH_MAX {
            out.push(
                key,
                format!(
                    "a path of {} bytes is longer than any the system opens ({PATH_MAX}): {:?}",
                    value.len(),
                    super::report::capped(value)
                ),
            );
        }
    }
    model(config, &mut out);
    data(config, &mut out);
    train(config, &mut out);
    parallel(config, &mut out);
    checkpoint(config, &mut out);
    logging(config, &mut out);
    out.0.extend(super::sizes::problems(config));
    out.0
}

fn model(config: &Config, out: &mut Problems) {
    let m = &config.model;
    for (key, value) in [
        ("model.n_layer", m.n_layer),
        ("model.n_head", m.n_head),
        ("model.d_model", m.d_model),
        ("model.block_size", m.block_size),
        ("model.seq_len", m.seq_len),
    ] {
        out.at_least_one(key, value as u64);
    }
    if m.n_head >= 1 && !m.d_model.is_multiple_of(m.n_head) {
        out.push(
            "model.d_model",
            format!(
                "{} is not divisible by model.n_head ({})",
                m.d_model, m.n_head
            ),
        );
    }
    if m.seq_len > m.block_size {
        out.push(
            "model.seq_len",
            format!(
                "seq_len above the position table: {} > model.block_size ({})",
                m.seq_len, m.block_size
            ),
        );
    }
    let (min_vocab, tokenizer) = (
        config.data.tokenizer.vocab_size(),
        config.data.tokenizer.name(),
    );
    if m.vocab_size < min_vocab {
        out.push(
            "model.vocab_size",
            format!(
                "must be at least {min_vocab} for the {tokenizer} tokenizer (got {})",
                m.vocab_size
            ),
        );
    }
    out.positive("model.init_std", m.init_std);
}

fn data(config: &Config, out: &mut Problems) {
    let d = &config.data;
    match d.kind {
        DataKind::Synthetic => {}
        DataKind::Shards => {
            if d.train.is_empty() {
                out.push(
                    "data.train",
                    "data.kind is shards: name the training shard files (a path or a glob like \
                     data/my_train_*.bin)"
                        .to_string(),
                );
            }
            if d.val.is_empty() && config.train.eval_every > 0 {
                out.push(
                    "data.val",
                    "data.kind is shards and train.eval_every > 0: name the validation shard \
                     files, or set train.eval_every: 0"
                        .to_string(),
                );
            }
        }
        DataKind::Text => {
            if d.train.is_empty() {
                out.push(
                    "data.train",
                    "data.kind is text: name the training text files (a path or a glob like \
                     corpus/*.txt)"
                        .to_string(),
                );
            }
            // Without validation files the first val_fraction of the text is held out; with
            // them, val_fraction is unused.
            let f = d.val_fraction;
            if d.val.is_empty() && !(0.0..1.0).contains(&f) {
                out.push("data.val_fraction", format!("must be in [0, 1) (got {f})"));
            }
            if d.val.is_empty() && f == 0.0 && config.train.eval_every > 0 {
                out.push(
                    "data.val_fraction",
                    "is 0 and data.val is empty, so there is no validation text: set \
                     data.val_fraction above 0, name data.val, or set train.eval_every: 0"
                        .to_string(),
                );
            }
        }
    }
    let s = &config.data.synthetic;
    out.at_least_one("data.synthetic.max_operand", u64::from(s.max_operand));
    let f = s.val_fraction;
    if !(f.is_finite() && f > 0.0 && f < 1.0) {
        out.push(
            "data.synthetic.val_fraction",
            format!("must be strictly between 0 and 1 (got {f})"),
        );
    }
}

fn train(config: &Config, out: &mut Problems) {
    let t = &config.train;
    let world = config.parallel.world_size;
    out.at_least_one("train.max_steps", t.max_steps);
    out.at_least_one("train.micro_batch_size", t.micro_batch_size as u64);
    if t.micro_batch_size >= 1 && world >= 1 {
        let per_pass = t.micro_batch_size.saturating_mul(world);
        if t.global_batch_size == 0 || !t.global_batch_size.is_multiple_of(per_pass) {
            out.push(
                "train.global_batch_size",
                format!(
                    "batch not divisible into micro-batches: {} is not a positive multiple of \
                     train.micro_batch_size x parallel.world_size ({} x {world} = {per_pass})",
                    t.global_batch_size, t.micro_batch_size
                ),
            );
        }
    } else {
        out.at_least_one("train.global_batch_size", t.global_batch_size as u64);
    }
    out.positive("train.lr", t.lr);
    let lr_ok = t.lr.is_finite() && t.lr > 0.0;
    if !(t.min_lr.is_finite() && t.min_lr >= 0.0 && (!lr_ok || t.min_lr <= t.lr)) {
        out.push(
            "train.min_lr",
            format!(
                "must be between 0 and train.lr ({}) (got {})",
                t.lr, t.min_lr
            ),
        );
    }
    if t.warmup_steps > t.max_steps {
        out.push(
            "train.warmup_steps",
            format!(
                "must not exceed train.max_steps ({}) (got {})",
                t.max_steps, t.warmup_steps
            ),
        );
    }
    out.non_negative("train.weight_decay", t.weight_decay, "");
    out.non_negative("train.grad_clip", t.grad_clip, " (0 disables clipping)");
    out.below_one("train.beta1", t.beta1);
    out.below_one("train.beta2", t.beta2);
    out.positive("train.eps", t.eps);
    let seq_len = config.model.seq_len;
    let needed = t.micro_batch_size.saturating_mul(seq_len);
    if t.eval_every > 0 && t.eval_tokens < needed {
        out.push(
            "train.eval_tokens",
            format!(
                "must be at least train.micro_batch_size x model.seq_len ({} x {seq_len} = \
                 {needed}) when train.eval_every > 0 (got {})",
                t.micro_batch_size, t.eval_tokens
            ),
        );
    }
}

fn parallel(config: &Config, out: &mut Problems) {
    let p = &config.parallel;
    out.at_least_one("parallel.world_size", p.world_size as u64);
    if p.strategy == ShardStrategy::HybridShard {
        let g = p.shard_group_size;
        if g == 0 || !p.world_size.is_multiple_of(g) {
            out.push(
                "parallel.shard_group_size",
                format!(
                    "hybrid_shard needs a shard group size that divides parallel.world_size ({}), got {g}",
                    p.world_size
                ),
            );
        }
    }
    if !(p.collective_timeout_s.is_finite() && p.collective_timeout_s > 0.0) {
        out.push(
            "parallel.collective_timeout_s",
            format!(
                "must be a finite number > 0 (got {})",
                p.collective_timeout_s
            ),
        );
    }
}

fn checkpoint(config: &Config, out: &mut Problems) {
    out.at_least_one("checkpoint.keep_last", config.checkpoint.keep_last);
}

fn logging(config: &Config, out: &mut Problems) {
    let l = &config.logging;
    out.at_least_one("logging.every_steps", l.every_steps);
    let name = l.metrics_file.as_str();
    if name.trim().is_empty() {
        out.push("logging.metrics_file", "must not be empty".to_string());
    } else if name == "." || name.contains("..") || name.contains(['/', '\\', '\0']) {
        out.push(
            "logging.metrics_file",
            format!(
                "must be a plain file name inside the run directory (no '/' or '..'), got {:?}",
                super::report::capped(name)
            ),
        );
    }
}
