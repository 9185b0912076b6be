//! CPU causal multi-head attention, forward and backward, flash-style: only the log-sum-exp of
//! each query row is kept; the backward recomputes the probabilities one row at a time.
//!
//! Each (batch, head) pair is an independent task computing into its own scratch, then scattered
//! into the interleaved `[batch, seq, 3, heads, head_dim]` layout, so threads never share a write.

use rayon::prelude::*;

use super::real::Real;
use crate::backend::AttentionShape;

/// Dot product with eight independent partial sums, so the compiler can vectorise it (a single
/// running sum is a dependency chain it may not reorder).
fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut lanes = [T::zero(); 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: T = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(&x, &y)| x * y)
        .sum();
    for (ca, cb) in a8.zip(b8) {
        for i in 0..8 {
            lanes[i] += ca[i] * cb[i];
        }
    }
    lanes.iter().copied().sum::<T>() + tail
}

/// `y += alpha * x`.
fn axpy<T: Real>(y: &mut [T], alpha: T, x: &[T]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

/// Column offsets of query, key and value of head `h` within one token's fused QKV row.
fn qkv_cols(s: &AttentionShape, h: usize) -> [usize; 3] {
    let c = s.channels();
    let base = h * s.head_dim;
    [base, c + base, 2 * c + base]
}

/// Scaled scores of query `t` against keys `0..=t`, and their log-sum-exp.
fn row_scores<T: Real>(
    s: &AttentionShape,
    qkv: &[T],
    b: usize,
    h: usize,
    t: usize,
    scores: &mut Vec<T>,
) -> T {
    let row = 3 * s.channels();
    let [qc, kc, _] = qkv_cols(s, h);
    let hd = s.head_dim;
    let scale = T::one() / T::from(hd).unwrap().sqrt();
    let q = &qkv[(b * s.seq + t) * row + qc..][..hd];
    scores.clear();
    let mut max = T::neg_infinity();
    for j in 0..=t {
        let k = &qkv[(b * s.seq + j) * row + kc..][..hd];
        let sc = dot(q, k) * scale;
        max = max.max(sc);
        scores.push(sc);
    }
    let sum: T = scores.iter().map(|&sc| (sc - max).exp()).sum();
    max + sum.ln()
}

/// Overwrites `out [B, T, C]` and `lse [B, NH, T]`.
pub fn attention_forward<T: Real>(out: &mut [T], lse: &mut [T], qkv: &[T], s: AttentionShape) {
    let (seq, hd, c) = (s.seq, s.head_dim, s.channels());
    let row = 3 * c;
    // Each task: (output rows [seq, hd], lse [seq]) of one (batch, head).
    let parts: Vec<(Vec<T>, Vec<T>)> = (0..s.batch * s.heads)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / s.heads, bh % s.heads);
            let [_, _, vc] = qkv_cols(&s, h);
            let mut o = vec![T::zero(); seq * hd];
            let mut l = vec![T::zero(); seq];
            let mut scores = Vec::with_capacity(seq);
            for t in 0..seq {
                let lse_t = row_scores(&s, qkv, b, h, t, &mut scores);
                l[t] = lse_t;
                let ot = &mut o[t * hd..(t + 1) * hd];
                for (j, &sc) in scores.iter().enumerate() {
                    let p = (sc - lse_t).exp();
                    axpy(ot, p, &qkv[(b * seq + j) * row + vc..][..hd]);
                }
            }
            (o, l)
        })
        .collect();
    for (bh, (o, l)) in parts.into_iter().enumerate() {
        let (b, h) = (bh / s.heads, bh % s.heads);
        for t in 0..seq {
            out[(b * seq + t) * c + h * hd..][..hd].copy_from_slice(&o[t * hd..(t + 1) * hd]);
        }
        lse[bh * seq..(bh + 1) * seq].copy_from_slice(&l);
    }
}

/// Overwrites `dqkv [B, T, 3C]`.
pub fn attention_backward<T: Real>(
    dqkv: &mut [T],
    dout: &[T],
    qkv: &[T],
    out: &[T],
    lse: &[T],
    s: AttentionShape,
) {
    let (seq, hd, c) = (s.seq, s.head_dim, s.channels());
    let row = 3 * c;
    let scale = T::one() / T::from(hd).unwrap().sqrt();
    // Each task: gradients [seq, 3, hd] (dq, dk, dv per token) of one (batch, head).
    let parts: Vec<Vec<T>> = (0..s.batch * s.heads)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / s.heads, bh % s.heads);
            let [qc, kc, vc] = qkv_cols(&s, h);
            let mut g = vec![T::zero(); seq * 3 * hd];
            let mut scores = Vec::with_capacity(seq);
            for t in 0..seq {
                let lse_t = lse[bh * seq + t];
                // Scores are recomputed; lse_t from the forward normalises them.
                row_scores(&s, qkv, b, h, t, &mut scores);
                let dy = &dout[(b * seq + t) * c + h * hd..][..hd];
                let y = &out[(b * seq + t) * c + h * hd..][..hd];
                let q = &qkv[(b * seq + t) * row + qc..][..hd];
                // D = Σ_j P_j (dy · v_j) = dy · y
                let big_d = dot(dy, y);
                for (j, &sc) in scores.iter().enumerate() {
                    let p = (sc - lse_t).exp();
                    let k = &qkv[(b * seq + j) * row + kc..][..hd];
                    let v = &qkv[(b * seq + j) * row + vc..][..hd];
                    let dp = dot(dy, v);
                    let ds = p * (dp - big_d) * scale;
                    axpy(&mut g[t * 3 * hd..][..hd], ds, k); // dq_t
                    axpy(&mut g[j * 3 * hd + hd..][..hd], ds, q); // dk_j
                    axpy(&mut g[j * 3 * hd + 2 * hd..][..hd], p, dy); // dv_j
                }
            }
            g
        })
        .collect();
    for (bh, g) in parts.into_iter().enumerate() {
        let (b, h) = (bh / s.heads, bh % s.heads);
        for t in 0..seq {
            for (part, col) in qkv_cols(&s, h).into_iter().enumerate() {
                dqkv[(b * seq + t) * row + col..][..hd]
                    .copy_from_slice(&g[t * 3 * hd + part * hd..][..hd]);
            }
        }
    }
}
