//! Size limits of a config: a model and batch whose byte counts the trainer can represent, steps
//! and evaluations of bounded length. Computed in checked `u128` arithmetic from the keys alone, so
//! an absurd value is a problem naming its key, never a wrapped number; once a config passes, every
//! `usize` product the planner and the trainer form from these keys stays far below `2^64`.

use super::schema::Config;

/// The largest job a config may describe: one rank holding the whole model unsharded (26 bytes
/// per parameter: f32 master, gradients and AdamW moments, a gathered copy and a reduce buffer)
/// plus one micro-batch's f32 activations must stay within a pebibyte. Far beyond any machine, and
/// low enough that no byte count derived from the config overflows.
pub const MAX_UNSHARDED_RANK_BYTES: u128 = 1 << 50;

/// Most transformer blocks a model may have: the deepest published GPTs have about 100; beyond
/// this the per-layer bookkeeping (a unit per block) alone would be a burden.
pub const MAX_LAYERS: usize = 4096;

/// Most tokens one optimizer step may train on (train.global_batch_size x model.seq_len): about
/// eight times the largest published batches (16M tokens), so that a step ends in reasonable time.
pub const MAX_TOKENS_PER_STEP: u128 = 1 << 27;

/// Most validation tokens one evaluation may read (train.eval_tokens): as many as the largest
/// step, so that an evaluation costs at most about a third of a step of that size.
pub const MAX_EVAL_TOKENS: u128 = MAX_TOKENS_PER_STEP;

/// Exact parameter count of the GPT the model keys describe (embeddings, positions and final norm,
/// then 12·C² + 13·C per block, as `model::layout` lays them out); `None` past `u128`.
pub fn param_count(cfg: &Config) -> Option<u128> {
    let m = &cfg.model;
    let (l, c, v, t) = (
        m.n_layer as u128,
        m.d_model as u128,
        m.vocab_size as u128,
        m.block_size as u128,
    );
    let root = v.checked_add(t)?.checked_add(2)?.checked_mul(c)?;
    let block = c
        .checked_mul(c)?
        .checked_mul(12)?
        .checked_add(c.checked_mul(13)?)?;
    root.checked_add(l.checked_mul(block)?)
}

/// Bytes of one micro-batch's f32 activations (an upper bound of what `model::activations`
/// allocates: per token 16·C + 4 + NH per block, 17·C + V + 3 outside); `None` past `u128`.
fn activation_bound(cfg: &Config) -> Option<u128> {
    let m = &cfg.model;
    let (l, c, v) = (m.n_layer as u128, m.d_model as u128, m.vocab_size as u128);
    let tokens = (cfg.train.micro_batch_size as u128).checked_mul(m.seq_len as u128)?;
    let per_block = c.checked_mul(16)?.checked_add(4 + m.n_head as u128)?;
    let per_token = l
        .checked_mul(per_block)?
        .checked_add(c.checked_mul(17)?)?
        .checked_add(v)?
        .checked_add(3)?;
    tokens.checked_mul(per_token)?.checked_mul(4)
}

/// The size problems of `cfg` as (dotted key, what is wrong), for `validate`.
pub(super) fn problems(cfg: &Config) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let m = &cfg.model;
    let t = &cfg.train;
    if m.n_layer > MAX_LAYERS {
        out.push((
            "model.n_layer".to_string(),
            format!(
                "at most {MAX_LAYERS} blocks (got {}): far deeper than any GPT trained",
                m.n_layer
            ),
        ));
    }
    let params = param_count(cfg);
    let model_bytes = params.and_then(|p| p.checked_mul(26));
    let acts = activation_bound(cfg);
    let total = model_bytes.zip(acts).and_then(|(a, b)| a.checked_add(b));
    if total.is_none_or(|b| b > MAX_UNSHARDED_RANK_BYTES) {
        let acts_dominate = match (model_bytes, acts) {
            (Some(p), Some(a)) => a > p,
            (Some(_), None) => true,
            _ => false,
        };
        out.push(if acts_dominate {
            (
                "train.micro_batch_size".to_string(),
                format!(
                    "one micro-batch's activations would need {} (train.micro_batch_size {} x \
                     model.seq_len {} tokens, model.d_model {}, model.n_layer {}, \
                     model.vocab_size {}); the trainer stops at {}",
                    about_bytes(acts),
                    t.micro_batch_size,
                    m.seq_len,
                    m.d_model,
                    m.n_layer,
                    m.vocab_size,
                    about_bytes(Some(MAX_UNSHARDED_RANK_BYTES)),
                ),
            )
        } else {
            (
                dominant_model_key(cfg).to_string(),
                format!(
                    "a model of {} parameters (model.n_layer {}, model.d_model {}, \
                     model.vocab_size {}, model.block_size {}) would need {} unsharded; the \
                     trainer stops at {}",
                    match params {
                        Some(p) => format!("{:.3e}", p as f64),
                        None => "more than 2^128".to_string(),
                    },
                    m.n_layer,
                    m.d_model,
                    m.vocab_size,
                    m.block_size,
                    about_bytes(model_bytes),
                    about_bytes(Some(MAX_UNSHARDED_RANK_BYTES)),
                ),
            )
        });
    }
    let step_tokens = (t.global_batch_size as u128) * (m.seq_len as u128);
    if step_tokens > MAX_TOKENS_PER_STEP {
        out.push((
            "train.global_batch_size".to_string(),
            format!(
                "a step of {} x model.seq_len {} = {step_tokens} tokens is more than the \
                 {MAX_TOKENS_PER_STEP} one step may train on (about 8x the largest published \
                 batches)",
                t.global_batch_size, m.seq_len
            ),
        ));
    }
    if t.eval_tokens as u128 > MAX_EVAL_TOKENS {
        out.push((
            "train.eval_tokens".to_string(),
            format!(
                "{} is more than the {MAX_EVAL_TOKENS} tokens one evaluation may read (the \
                 largest step's worth)",
                t.eval_tokens
            ),
        ));
    }
    out
}

/// The model key whose growth dominates the parameter count: the vocabulary (V·C), the position
/// table (T·C), or the blocks (L·12·C², where a wide model blames its width).
fn dominant_model_key(cfg: &Config) -> &'static str {
    let m = &cfg.model;
    let c = m.d_model as f64;
    let vocab = m.vocab_size as f64 * c;
    let positions = m.block_size as f64 * c;
    let blocks = m.n_layer as f64 * 12.0 * c * c;
    if blocks >= vocab && blocks >= positions {
        if m.n_layer as f64 > 12.0 * c {
            "model.n_layer"
        } else {
            "model.d_model"
        }
    } else if vocab >= positions {
        "model.vocab_size"
    } else {
        "model.block_size"
    }
}

/// `bytes` in binary units ("more than 2^128 bytes" when it overflowed).
fn about_bytes(bytes: Option<u128>) -> String {
    match bytes {
        Some(b) => human_bytes(b as f64),
        None => "more than 2^128 bytes".to_string(),
    }
}

/// Bytes as "7.4 TiB", "512 B" (binary units up to EiB, then scientific notation).
pub fn human_bytes(bytes: f64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value >= 1024.0 {
        format!("{bytes:.2e} B")
    } else if unit == 0 {
        format!("{value:.0} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_in_binary_units() {
        assert_eq!(human_bytes(512.0), "512 B");
        assert_eq!(human_bytes(1536.0), "1.5 KiB");
        assert_eq!(human_bytes(7.4 * (1u64 << 40) as f64), "7.4 TiB");
        assert_eq!(human_bytes(1e30), "1.00e30 B");
    }

    #[test]
    fn overflowing_products_are_none_not_wrapped() {
        let mut cfg = Config::default();
        cfg.model.d_model = usize::MAX;
        assert_eq!(param_count(&cfg), None);
        assert!(problems(&cfg)
            .iter()
            .any(|(k, p)| k == "model.d_model" && p.contains("more than 2^128")));
    }
}
