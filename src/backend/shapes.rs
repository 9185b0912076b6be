//! The shape and dtype checks of each op, shared by every backend so that a mistake gets the same
//! error on the CPU and on a GPU: lengths against the shapes given, the dtypes the contract fixes
//! (statistics and losses are f32), token ids in range. Overlap and dtype-combination checks are
//! the backends' own (they depend on what each can compute).

use anyhow::{anyhow, bail, Result};

use super::{expect_dtype, expect_len, AdamWSegment, AttentionShape, Buffer, DType, MatmulSpec};

pub fn matmul<B: Buffer>(out: &B, a: &B, b: &B, bias: Option<&B>, s: MatmulSpec) -> Result<()> {
    expect_len("matmul", "out", out, s.m * s.n)?;
    expect_len("matmul", "a", a, s.m * s.k)?;
    expect_len("matmul", "b", b, s.k * s.n)?;
    if let Some(bias) = bias {
        expect_len("matmul", "bias", bias, s.n)?;
    }
    Ok(())
}

pub fn layernorm_forward<B: Buffer>(
    out: &B,
    mean: &B,
    rstd: &B,
    inp: &B,
    weight: &B,
    bias: &B,
    rows: usize,
    cols: usize,
) -> Result<()> {
    let op = "layernorm_forward";
    if cols == 0 {
        bail!("{op}: cols must be at least 1");
    }
    expect_len(op, "out", out, rows * cols)?;
    expect_len(op, "inp", inp, rows * cols)?;
    expect_len(op, "mean", mean, rows)?;
    expect_len(op, "rstd", rstd, rows)?;
    expect_len(op, "weight", weight, cols)?;
    expect_len(op, "bias", bias, cols)?;
    expect_dtype(op, "mean", mean, DType::F32)?;
    expect_dtype(op, "rstd", rstd, DType::F32)
}

pub fn layernorm_backward<B: Buffer>(
    dinp: &B,
    dweight: &B,
    dbias: &B,
    dout: &B,
    inp: &B,
    weight: &B,
    mean: &B,
    rstd: &B,
    rows: usize,
    cols: usize,
) -> Result<()> {
    let op = "layernorm_backward";
    if cols == 0 {
        bail!("{op}: cols must be at least 1");
    }
    expect_len(op, "dinp", dinp, rows * cols)?;
    expect_len(op, "dout", dout, rows * cols)?;
    expect_len(op, "inp", inp, rows * cols)?;
    expect_len(op, "dweight", dweight, cols)?;
    expect_len(op, "dbias", dbias, cols)?;
    expect_len(op, "weight", weight, cols)?;
    expect_len(op, "mean", mean, rows)?;
    expect_len(op, "rstd", rstd, rows)?;
    // The forward's statistics, which the kernels read as f32 whatever the activations' dtype.
    expect_dtype(op, "mean", mean, DType::F32)?;
    expect_dtype(op, "rstd", rstd, DType::F32)
}

pub fn attention_forward<B: Buffer>(
    out: &B,
    lse: &B,
    qkv: &B,
    shape: AttentionShape,
) -> Result<()> {
    let op = "attention_forward";
    let tokens = shape.batch * shape.seq;
    expect_len(op, "out", out, tokens * shape.channels())?;
    expect_len(op, "qkv", qkv, tokens * 3 * shape.channels())?;
    expect_len(op, "lse", lse, tokens * shape.heads)?;
    expect_dtype(op, "lse", lse, DType::F32)
}

pub fn attention_backward<B: Buffer>(
    dqkv: &B,
    dout: &B,
    qkv: &B,
    out: &B,
    lse: &B,
    shape: AttentionShape,
) -> Result<()> {
    let op = "attention_backward";
    let tokens = shape.batch * shape.seq;
    expect_len(op, "dqkv", dqkv, tokens * 3 * shape.channels())?;
    expect_len(op, "qkv", qkv, tokens * 3 * shape.channels())?;
    expect_len(op, "dout", dout, tokens * shape.channels())?;
    expect_len(op, "out", out, tokens * shape.channels())?;
    expect_len(op, "lse", lse, tokens * shape.heads)?;
    // Saved by the forward as f32 and read as f32 by the kernels.
    expect_dtype(op, "lse", lse, DType::F32)
}

/// `ids` has `expected` entries, each below `bound`.
pub fn ids(op: &str, what: &str, ids: &[u32], expected: usize, bound: usize) -> Result<()> {
    if ids.len() != expected {
        bail!(
            "{op}: `{what}` has {} ids, the shapes given need {expected}",
            ids.len()
        );
    }
    if let Some((i, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= bound) {
        bail!("{op}: `{what}`[{i}] = {id} is outside the vocabulary of {bound}");
    }
    Ok(())
}

/// The tables are rows of `channels`, the position table covers `seq`, the ids fit, and the
/// activation (`out`, or `dout` in the backward) is `[batch, seq, channels]`.
pub fn embedding<B: Buffer>(
    op: &str,
    token_ids: &[u32],
    wte: &B,
    wpe: &B,
    activation: (&str, &B),
    batch: usize,
    seq: usize,
    channels: usize,
) -> Result<()> {
    expect_len(op, activation.0, activation.1, batch * seq * channels)?;
    if channels == 0 || !wte.len().is_multiple_of(channels) || !wpe.len().is_multiple_of(channels) {
        bail!(
            "{op}: tables of {} and {} elements are not rows of {channels} channels",
            wte.len(),
            wpe.len()
        );
    }
    if wpe.len() / channels < seq {
        bail!(
            "{op}: sequence length {seq} exceeds the {} positions of the position table",
            wpe.len() / channels
        );
    }
    ids(op, "ids", token_ids, batch * seq, wte.len() / channels)
}

pub fn cross_entropy<B: Buffer>(
    losses: &B,
    logits: &B,
    targets: &[u32],
    rows: usize,
    vocab: usize,
) -> Result<()> {
    let op = "cross_entropy";
    if vocab == 0 {
        bail!("{op}: vocab must be at least 1");
    }
    expect_len(op, "losses", losses, rows)?;
    expect_len(op, "logits", logits, rows * vocab)?;
    expect_dtype(op, "losses", losses, DType::F32)?;
    ids(op, "targets", targets, rows, vocab)
}

/// [`adamw`]'s checks, and segments in increasing order, not overlapping, inside the buffers.
pub fn adamw_segments<B: Buffer>(
    param: &B,
    grad: &B,
    m: &B,
    v: &B,
    param_copy: Option<&B>,
    segments: &[AdamWSegment],
) -> Result<()> {
    adamw(param, grad, m, v, param_copy)?;
    let mut end = 0;
    for (i, seg) in segments.iter().enumerate() {
        if seg.offset < end {
            bail!(
                "adamw_segments: segment {i} starts at {} before the previous one ends ({end}); \
                 segments must be in increasing order without overlap",
                seg.offset
            );
        }
        end = seg
            .offset
            .checked_add(seg.len)
            .filter(|&e| e <= param.len())
            .ok_or_else(|| {
                anyhow!(
                    "adamw_segments: segment {i} ({} elements from {}) runs past the {} elements \
                     of `param`",
                    seg.len,
                    seg.offset,
                    param.len()
                )
            })?;
    }
    Ok(())
}

pub fn adamw<B: Buffer>(param: &B, grad: &B, m: &B, v: &B, param_copy: Option<&B>) -> Result<()> {
    let op = "adamw";
    let n = param.len();
    expect_len(op, "grad", grad, n)?;
    expect_len(op, "m", m, n)?;
    expect_len(op, "v", v, n)?;
    for (what, buf) in [("param", param), ("m", m), ("v", v)] {
        expect_dtype(op, what, buf, DType::F32)?;
    }
    if let Some(c) = param_copy {
        expect_len(op, "param_copy", c, n)?;
    }
    Ok(())
}
