//! Every op of the `Backend` trait on `CpuBackend<f32>`, checked against naive references.
//!
//! Each reference below is a plain f64 loop written from the op's maths (not from the kernels in
//! `src/backend/cpu`): the matrix product as a triple loop, LayerNorm's backward through its full
//! Jacobian, attention with every probability materialised, AdamW in PyTorch's "shrink, then step"
//! order, and so on. Inputs are seeded random values (never zero) over several shapes, including
//! odd and prime sizes and the edge cases batch 1, seq 1, k 1, cols 1 and vocab 1, plus sizes large
//! enough to take the multithreaded paths. Tolerances fit f32 arithmetic: a relative 1e-5 plus an
//! absolute term that grows with the length of the reduction behind each value.
//!
//! Also checked: the accumulate-vs-overwrite semantics of every output (prior contents of
//! accumulating outputs must be added to), bf16 casts and bf16 outputs (every value an op stores
//! in a Bf16 buffer is exactly bf16-representable and equals the rounded f32 result), and the
//! contract's error paths: wrong lengths name the operand, outputs overlapping another operand,
//! wrong dtypes for fixed-precision outputs and for the saved statistics the backwards read,
//! out-of-vocabulary ids, out-of-range slices, and degenerate zero-sized shapes (errors or no-ops,
//! never panics).

use anyhow::Result;
use half::bf16;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shardtrain::backend::cpu::{CpuBackend, CpuBuf};
use shardtrain::backend::{
    AdamWStep, AttentionShape, Backend, Buffer, DType, MatmulSpec, LAYERNORM_EPS,
};

type Cpu = CpuBackend<f32>;
type Buf = CpuBuf<f32>;

// ---- helpers --------------------------------------------------------------------------------

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `n` values uniform in `(-scale, scale)`, never (close to) zero.
fn rand_vec(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let x: f32 = rng.random_range(0.01f32..1.0);
            let sign = if rng.random::<bool>() { 1.0 } else { -1.0 };
            sign * x * scale
        })
        .collect()
}

fn rand_ids(rng: &mut ChaCha8Rng, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
}

fn upload(be: &Cpu, data: &[f32], dtype: DType) -> Buf {
    let buf = be.alloc(data.len(), dtype).unwrap();
    be.upload(&buf, data).unwrap();
    buf
}

fn f32buf(be: &Cpu, data: &[f32]) -> Buf {
    upload(be, data, DType::F32)
}

fn get(be: &Cpu, buf: &Buf) -> Vec<f32> {
    be.download(buf).unwrap()
}

fn wide(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn round_bf16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// Absolute tolerance for values that are sums of `len` products of O(1) f32 numbers.
fn atol(len: usize) -> f64 {
    1e-5 * (len.max(1) as f64).sqrt()
}

fn mm(m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool, accumulate: bool) -> MatmulSpec {
    MatmulSpec {
        m,
        n,
        k,
        trans_a,
        trans_b,
        accumulate,
    }
}

fn att(batch: usize, seq: usize, heads: usize, head_dim: usize) -> AttentionShape {
    AttentionShape {
        batch,
        seq,
        heads,
        head_dim,
    }
}

/// Plain AdamW hyper-parameters, for tests that do not check the update's values.
fn plain_hp() -> AdamWStep {
    AdamWStep {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: 0.0,
        step: 1,
        grad_scale: 1.0,
    }
}

#[track_caller]
fn assert_close(what: &str, got: &[f32], want: &[f64], rtol: f64, atol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(
            err <= atol + rtol * w.abs(),
            "{what}[{i}]: got {g}, want {w} (error {err:e})"
        );
    }
}

#[track_caller]
fn assert_err<T: std::fmt::Debug>(result: Result<T>, needle: &str) {
    match result {
        Ok(v) => panic!("expected an error mentioning {needle:?}, got Ok({v:?})"),
        Err(e) => {
            let msg = format!("{e:#}");
            assert!(
                msg.contains(needle),
                "error {msg:?} does not mention {needle:?}"
            );
        }
    }
}

#[track_caller]
fn assert_bf16_exact(what: &str, values: &[f32]) {
    for (i, &v) in values.iter().enumerate() {
        assert_eq!(
            v.to_bits(),
            round_bf16(v).to_bits(),
            "{what}[{i}] = {v} is not a bf16 value"
        );
    }
}

// ---- references (f64, from the maths) -------------------------------------------------------

/// `op(a)[m, k] · op(b)[k, n] + bias` as a triple loop.
#[allow(clippy::too_many_arguments)]
fn ref_matmul(
    a: &[f32],
    b: &[f32],
    bias: Option<&[f32]>,
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = bias.map_or(0.0, |bias| bias[j] as f64);
            for p in 0..k {
                let aip = if trans_a { a[p * m + i] } else { a[i * k + p] };
                let bpj = if trans_b { b[j * k + p] } else { b[p * n + j] };
                s += aip as f64 * bpj as f64;
            }
            out[i * n + j] = s;
        }
    }
    out
}

fn ref_bias_backward(dout: &[f32], rows: usize, cols: usize) -> Vec<f64> {
    (0..cols)
        .map(|c| (0..rows).map(|r| dout[r * cols + c] as f64).sum())
        .collect()
}

/// LayerNorm forward: (out, mean, rstd) with the biased variance.
fn ref_layernorm(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    rows: usize,
    cols: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut out, mut means, mut rstds) = (vec![0.0; rows * cols], vec![], vec![]);
    for r in 0..rows {
        let row = &x[r * cols..(r + 1) * cols];
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / cols as f64;
        let rstd = 1.0 / (var + LAYERNORM_EPS as f64).sqrt();
        for c in 0..cols {
            out[r * cols + c] = (row[c] as f64 - mean) * rstd * w[c] as f64 + b[c] as f64;
        }
        means.push(mean);
        rstds.push(rstd);
    }
    (out, means, rstds)
}

/// LayerNorm backward through the explicit Jacobian of `xhat = (x - mean) * rstd`:
/// `d xhat_i / d x_j = rstd (δ_ij - 1/N) - rstd³ (x_i - mean)(x_j - mean) / N`.
fn ref_layernorm_backward(
    dout: &[f32],
    x: &[f32],
    w: &[f32],
    rows: usize,
    cols: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (_, means, rstds) = ref_layernorm(x, w, w, rows, cols);
    let n = cols as f64;
    let (mut dx, mut dw, mut db) = (vec![0.0; rows * cols], vec![0.0; cols], vec![0.0; cols]);
    for r in 0..rows {
        let (mean, rstd) = (means[r], rstds[r]);
        let xc = |i: usize| x[r * cols + i] as f64 - mean;
        let dy = |i: usize| dout[r * cols + i] as f64;
        for j in 0..cols {
            let jacobian = |i: usize| {
                let delta = if i == j { 1.0 } else { 0.0 };
                rstd * (delta - 1.0 / n) - rstd.powi(3) * xc(i) * xc(j) / n
            };
            dx[r * cols + j] = (0..cols).map(|i| dy(i) * w[i] as f64 * jacobian(i)).sum();
        }
        for i in 0..cols {
            dw[i] += dy(i) * xc(i) * rstd;
            db[i] += dy(i);
        }
    }
    (dx, dw, db)
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;

fn ref_gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x.powi(3))).tanh())
}

/// d/dx of `ref_gelu`: product rule, with tanh' = 1 - tanh².
fn ref_gelu_grad(x: f64) -> f64 {
    let u = SQRT_2_OVER_PI * (x + 0.044715 * x.powi(3));
    let du = SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x);
    0.5 * (1.0 + u.tanh()) + 0.5 * x * (1.0 - u.tanh().powi(2)) * du
}

/// Index of element `d` of head `h` of part `part` (0 = q, 1 = k, 2 = v) of token `(b, t)` in qkv.
fn qkv_index(s: &AttentionShape, b: usize, t: usize, part: usize, h: usize, d: usize) -> usize {
    (b * s.seq + t) * 3 * s.channels() + part * s.channels() + h * s.head_dim + d
}

/// Causal softmax probabilities `p[t][j]` (j <= t) of one (batch, head), and the log-sum-exps.
fn ref_attention_probs(
    qkv: &[f32],
    s: &AttentionShape,
    b: usize,
    h: usize,
) -> (Vec<Vec<f64>>, Vec<f64>) {
    let scale = 1.0 / (s.head_dim as f64).sqrt();
    let (mut probs, mut lses) = (vec![], vec![]);
    for t in 0..s.seq {
        let scores: Vec<f64> = (0..=t)
            .map(|j| {
                let dot: f64 = (0..s.head_dim)
                    .map(|d| {
                        qkv[qkv_index(s, b, t, 0, h, d)] as f64
                            * qkv[qkv_index(s, b, j, 1, h, d)] as f64
                    })
                    .sum();
                dot * scale
            })
            .collect();
        let lse = scores.iter().map(|&x| x.exp()).sum::<f64>().ln();
        probs.push(scores.iter().map(|&x| (x - lse).exp()).collect());
        lses.push(lse);
    }
    (probs, lses)
}

/// (out [B, T, C], lse [B, NH, T]).
fn ref_attention_forward(qkv: &[f32], s: &AttentionShape) -> (Vec<f64>, Vec<f64>) {
    let c = s.channels();
    let mut out = vec![0.0; s.batch * s.seq * c];
    let mut lse = vec![0.0; s.batch * s.heads * s.seq];
    for b in 0..s.batch {
        for h in 0..s.heads {
            let (probs, lses) = ref_attention_probs(qkv, s, b, h);
            for t in 0..s.seq {
                lse[(b * s.heads + h) * s.seq + t] = lses[t];
                for d in 0..s.head_dim {
                    out[(b * s.seq + t) * c + h * s.head_dim + d] = (0..=t)
                        .map(|j| probs[t][j] * qkv[qkv_index(s, b, j, 2, h, d)] as f64)
                        .sum();
                }
            }
        }
    }
    (out, lse)
}

/// dqkv from the chain rule through out = P V, P = softmax(S), S = Q Kᵀ / √d.
fn ref_attention_backward(dout: &[f32], qkv: &[f32], s: &AttentionShape) -> Vec<f64> {
    let (c, hd) = (s.channels(), s.head_dim);
    let scale = 1.0 / (hd as f64).sqrt();
    let mut dqkv = vec![0.0; qkv.len()];
    for b in 0..s.batch {
        for h in 0..s.heads {
            let (probs, _) = ref_attention_probs(qkv, s, b, h);
            let dy = |t: usize, d: usize| dout[(b * s.seq + t) * c + h * hd + d] as f64;
            let x = |t: usize, part: usize, d: usize| qkv[qkv_index(s, b, t, part, h, d)] as f64;
            for t in 0..s.seq {
                // dP[t][j] = dy_t · v_j; dS = P ⊙ (dP - Σ_j P dP).
                let dp: Vec<f64> = (0..=t)
                    .map(|j| (0..hd).map(|d| dy(t, d) * x(j, 2, d)).sum())
                    .collect();
                let pdp: f64 = (0..=t).map(|j| probs[t][j] * dp[j]).sum();
                for j in 0..=t {
                    let ds = probs[t][j] * (dp[j] - pdp);
                    for d in 0..hd {
                        dqkv[qkv_index(s, b, t, 0, h, d)] += ds * x(j, 1, d) * scale;
                        dqkv[qkv_index(s, b, j, 1, h, d)] += ds * x(t, 0, d) * scale;
                        dqkv[qkv_index(s, b, j, 2, h, d)] += probs[t][j] * dy(t, d);
                    }
                }
            }
        }
    }
    dqkv
}

fn ref_embedding_forward(ids: &[u32], wte: &[f32], wpe: &[f32], seq: usize, ch: usize) -> Vec<f64> {
    let mut out = vec![0.0; ids.len() * ch];
    for (i, &id) in ids.iter().enumerate() {
        let t = i % seq;
        for c in 0..ch {
            out[i * ch + c] = wte[id as usize * ch + c] as f64 + wpe[t * ch + c] as f64;
        }
    }
    out
}

/// (dwte, dwpe) added onto the given prior contents.
fn ref_embedding_backward(
    dwte0: &[f32],
    dwpe0: &[f32],
    dout: &[f32],
    ids: &[u32],
    seq: usize,
    ch: usize,
) -> (Vec<f64>, Vec<f64>) {
    let (mut dwte, mut dwpe) = (wide(dwte0), wide(dwpe0));
    for (i, &id) in ids.iter().enumerate() {
        for c in 0..ch {
            dwte[id as usize * ch + c] += dout[i * ch + c] as f64;
            dwpe[(i % seq) * ch + c] += dout[i * ch + c] as f64;
        }
    }
    (dwte, dwpe)
}

/// (losses, softmax - onehot) per row.
fn ref_cross_entropy(logits: &[f32], targets: &[u32], vocab: usize) -> (Vec<f64>, Vec<f64>) {
    let (mut losses, mut grad) = (vec![], vec![0.0; logits.len()]);
    for (r, &target) in targets.iter().enumerate() {
        let row = &logits[r * vocab..(r + 1) * vocab];
        let z: f64 = row.iter().map(|&x| (x as f64).exp()).sum();
        losses.push(z.ln() - row[target as usize] as f64);
        for j in 0..vocab {
            let onehot = if j == target as usize { 1.0 } else { 0.0 };
            grad[r * vocab + j] = (row[j] as f64).exp() / z - onehot;
        }
    }
    (losses, grad)
}

/// One AdamW step, PyTorch order: decay the weight, update the moments, take the Adam step.
fn ref_adamw(p: &mut [f64], g: &[f32], m: &mut [f64], v: &mut [f64], hp: &AdamWStep) {
    let (b1, b2) = (hp.beta1 as f64, hp.beta2 as f64);
    let (lr, eps, wd) = (hp.lr as f64, hp.eps as f64, hp.weight_decay as f64);
    for i in 0..p.len() {
        let g = g[i] as f64 * hp.grad_scale as f64;
        p[i] *= 1.0 - lr * wd;
        m[i] = b1 * m[i] + (1.0 - b1) * g;
        v[i] = b2 * v[i] + (1.0 - b2) * g * g;
        let m_hat = m[i] / (1.0 - b1.powi(hp.step as i32));
        let v_hat = v[i] / (1.0 - b2.powi(hp.step as i32));
        p[i] -= lr * m_hat / (v_hat.sqrt() + eps);
    }
}

// ---- elementwise ----------------------------------------------------------------------------

const LENGTHS: [usize; 6] = [1, 3, 7, 17, 33, 40_001];

#[test]
fn fill_and_copy() {
    let be = Cpu::new();
    let mut r = rng(1);
    for n in LENGTHS {
        let x = rand_vec(&mut r, n, 3.0);
        let dst = f32buf(&be, &rand_vec(&mut r, n, 1.0));
        be.fill(&dst, 0.3).unwrap();
        assert!(get(&be, &dst).iter().all(|&v| v == 0.3), "fill f32");
        let dst16 = be.alloc(n, DType::Bf16).unwrap();
        be.fill(&dst16, 0.3).unwrap();
        assert!(
            get(&be, &dst16).iter().all(|&v| v == round_bf16(0.3)),
            "fill bf16"
        );

        // f32 -> f32 is exact, f32 -> bf16 rounds to nearest even, bf16 -> f32 is exact.
        let src = f32buf(&be, &x);
        let dst = f32buf(&be, &rand_vec(&mut r, n, 1.0));
        be.copy(&dst, &src).unwrap();
        assert_eq!(get(&be, &dst), x, "copy f32 -> f32");
        let half: Vec<f32> = x.iter().map(|&v| round_bf16(v)).collect();
        be.copy(&dst16, &src).unwrap();
        assert_eq!(get(&be, &dst16), half, "copy f32 -> bf16");
        let back = f32buf(&be, &rand_vec(&mut r, n, 1.0));
        be.copy(&back, &dst16).unwrap();
        assert_eq!(get(&be, &back), half, "copy bf16 -> f32");
        assert_eq!(get(&be, &src), x, "copy leaves its source alone");
    }
    // Ties round to even: 1 + 2^-8 lies halfway between two bf16 values.
    let be16 = be.alloc(2, DType::Bf16).unwrap();
    let src = f32buf(&be, &[1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0]);
    be.copy(&be16, &src).unwrap();
    assert_eq!(get(&be, &be16), vec![1.0, 1.0 + 4.0 / 256.0]);
}

#[test]
fn scale_add_accumulate() {
    let be = Cpu::new();
    let mut r = rng(2);
    for n in LENGTHS {
        let (x, y, z) = (
            rand_vec(&mut r, n, 2.0),
            rand_vec(&mut r, n, 2.0),
            rand_vec(&mut r, n, 2.0),
        );
        let buf = f32buf(&be, &x);
        be.scale(&buf, -1.7).unwrap();
        let want: Vec<f64> = x.iter().map(|&v| v as f64 * -1.7f32 as f64).collect();
        assert_close("scale", &get(&be, &buf), &want, 1e-7, 0.0);

        let out = f32buf(&be, &z); // overwritten, so prior contents must not show
        be.add(&out, &f32buf(&be, &x), &f32buf(&be, &y)).unwrap();
        let want: Vec<f64> = x
            .iter()
            .zip(&y)
            .map(|(&a, &b)| a as f64 + b as f64)
            .collect();
        assert_close("add", &get(&be, &out), &want, 1e-7, 0.0);

        let dst = f32buf(&be, &z);
        be.accumulate(&dst, &f32buf(&be, &x)).unwrap();
        be.accumulate(&dst, &f32buf(&be, &y)).unwrap();
        let want: Vec<f64> = (0..n)
            .map(|i| z[i] as f64 + x[i] as f64 + y[i] as f64)
            .collect();
        assert_close("accumulate", &get(&be, &dst), &want, 1e-7, 1e-6);
    }
}

#[test]
fn gelu_forward_backward() {
    let be = Cpu::new();
    let mut r = rng(3);
    for n in LENGTHS {
        let x = rand_vec(&mut r, n, 5.0);
        let dy = rand_vec(&mut r, n, 1.0);
        let out = f32buf(&be, &rand_vec(&mut r, n, 1.0));
        be.gelu_forward(&out, &f32buf(&be, &x)).unwrap();
        let want: Vec<f64> = x.iter().map(|&v| ref_gelu(v as f64)).collect();
        assert_close("gelu_forward", &get(&be, &out), &want, 2e-6, 1e-7);

        let dinp = f32buf(&be, &rand_vec(&mut r, n, 1.0)); // overwritten
        be.gelu_backward(&dinp, &f32buf(&be, &x), &f32buf(&be, &dy))
            .unwrap();
        let want: Vec<f64> = (0..n)
            .map(|i| ref_gelu_grad(x[i] as f64) * dy[i] as f64)
            .collect();
        assert_close("gelu_backward", &get(&be, &dinp), &want, 2e-6, 1e-7);
    }
}

// ---- linear layers --------------------------------------------------------------------------

#[test]
fn matmul_all_transposes_bias_accumulate() {
    let be = Cpu::new();
    let mut r = rng(4);
    let shapes = [
        (1, 1, 1),
        (3, 7, 17),
        (17, 3, 1),
        (33, 17, 7),
        (1, 33, 3),
        (7, 1, 33),
        (65, 129, 257), // large enough for the multithreaded path
    ];
    for (m, n, k) in shapes {
        for trans_a in [false, true] {
            for trans_b in [false, true] {
                for with_bias in [false, true] {
                    for accumulate in [false, true] {
                        let a = rand_vec(&mut r, m * k, 1.0);
                        let b = rand_vec(&mut r, k * n, 1.0);
                        let bias = rand_vec(&mut r, n, 1.0);
                        let prior = rand_vec(&mut r, m * n, 1.0);
                        let out = f32buf(&be, &prior);
                        let bias_buf = f32buf(&be, &bias);
                        let spec = mm(m, n, k, trans_a, trans_b, accumulate);
                        be.matmul(
                            &out,
                            &f32buf(&be, &a),
                            &f32buf(&be, &b),
                            with_bias.then_some(&bias_buf),
                            spec,
                        )
                        .unwrap();
                        let bias_ref = with_bias.then_some(&bias[..]);
                        let mut want = ref_matmul(&a, &b, bias_ref, m, n, k, trans_a, trans_b);
                        if accumulate {
                            for (w, &p) in want.iter_mut().zip(&prior) {
                                *w += p as f64;
                            }
                        }
                        let what = format!("matmul {spec:?} bias {with_bias}");
                        assert_close(&what, &get(&be, &out), &want, 1e-5, atol(k + 2));
                    }
                }
            }
        }
    }
    // k = 0 is an empty sum: out = 0 + bias, or out += bias when accumulating.
    let (out, empty) = (f32buf(&be, &[5.0; 6]), be.alloc(0, DType::F32).unwrap());
    let bias = f32buf(&be, &[1.0, 2.0, 3.0]);
    for (accumulate, want) in [(false, [1.0, 2.0, 3.0]), (true, [2.0, 4.0, 6.0])] {
        let spec = mm(2, 3, 0, false, true, accumulate);
        be.matmul(&out, &empty, &empty, Some(&bias), spec).unwrap();
        assert_eq!(get(&be, &out), [want, want].concat(), "k = 0, {spec:?}");
    }
}

#[test]
fn bias_backward_accumulates() {
    let be = Cpu::new();
    let mut r = rng(5);
    for (rows, cols) in [(1, 1), (1, 7), (3, 17), (33, 1), (33, 7), (257, 33)] {
        let dout = rand_vec(&mut r, rows * cols, 1.0);
        let prior = rand_vec(&mut r, cols, 1.0);
        let dbias = f32buf(&be, &prior);
        be.bias_backward(&dbias, &f32buf(&be, &dout), rows, cols)
            .unwrap();
        let want: Vec<f64> = ref_bias_backward(&dout, rows, cols)
            .iter()
            .zip(&prior)
            .map(|(&s, &p)| s + p as f64)
            .collect();
        assert_close("bias_backward", &get(&be, &dbias), &want, 1e-5, atol(rows));
    }
}

// ---- layer norm -----------------------------------------------------------------------------

#[test]
fn layernorm_forward_backward() {
    let be = Cpu::new();
    let mut r = rng(6);
    for (rows, cols) in [(1, 1), (1, 7), (3, 3), (17, 33), (7, 129), (2, 768)] {
        // An offset per row makes the mean matter.
        let mut x = rand_vec(&mut r, rows * cols, 2.0);
        for (i, v) in x.iter_mut().enumerate() {
            *v += (i / cols) as f32 * 0.75 - 1.0;
        }
        let w = rand_vec(&mut r, cols, 1.5);
        let b = rand_vec(&mut r, cols, 1.0);
        let dy = rand_vec(&mut r, rows * cols, 1.0);
        let (xb, wb) = (f32buf(&be, &x), f32buf(&be, &w));
        let out = f32buf(&be, &rand_vec(&mut r, rows * cols, 1.0));
        let mean = f32buf(&be, &rand_vec(&mut r, rows, 1.0));
        let rstd = f32buf(&be, &rand_vec(&mut r, rows, 1.0));
        be.layernorm_forward(&out, &mean, &rstd, &xb, &wb, &f32buf(&be, &b), rows, cols)
            .unwrap();
        let (want_out, want_mean, want_rstd) = ref_layernorm(&x, &w, &b, rows, cols);
        let what = format!("layernorm {rows}x{cols}");
        assert_close(
            &format!("{what} out"),
            &get(&be, &out),
            &want_out,
            1e-5,
            atol(cols),
        );
        assert_close(
            &format!("{what} mean"),
            &get(&be, &mean),
            &want_mean,
            1e-5,
            atol(cols),
        );
        assert_close(
            &format!("{what} rstd"),
            &get(&be, &rstd),
            &want_rstd,
            1e-5,
            0.0,
        );

        // Backward accumulates into all three outputs: start from random prior contents.
        let (dx0, dw0, db0) = (
            rand_vec(&mut r, rows * cols, 1.0),
            rand_vec(&mut r, cols, 1.0),
            rand_vec(&mut r, cols, 1.0),
        );
        let (dx, dw, db) = (f32buf(&be, &dx0), f32buf(&be, &dw0), f32buf(&be, &db0));
        let dyb = f32buf(&be, &dy);
        be.layernorm_backward(&dx, &dw, &db, &dyb, &xb, &wb, &mean, &rstd, rows, cols)
            .unwrap();
        let (gx, gw, gb) = ref_layernorm_backward(&dy, &x, &w, rows, cols);
        let plus = |g: Vec<f64>, p: &[f32]| -> Vec<f64> {
            g.iter().zip(p).map(|(&g, &p)| g + p as f64).collect()
        };
        // dinp is a difference of O(cols) sums scaled by rstd (up to 1/sqrt(eps) when cols = 1).
        let dx_tol = atol(cols) * want_rstd.iter().fold(1.0f64, |a, &b| a.max(b));
        assert_close(
            &format!("{what} dinp"),
            &get(&be, &dx),
            &plus(gx, &dx0),
            1e-5,
            dx_tol,
        );
        assert_close(
            &format!("{what} dweight"),
            &get(&be, &dw),
            &plus(gw, &dw0),
            1e-5,
            atol(rows),
        );
        assert_close(
            &format!("{what} dbias"),
            &get(&be, &db),
            &plus(gb, &db0),
            1e-5,
            atol(rows),
        );
    }
}

// ---- attention ------------------------------------------------------------------------------

#[test]
fn attention_forward_backward() {
    let be = Cpu::new();
    let mut r = rng(7);
    // (batch, seq, heads, head_dim, scale of the qkv values: 4 gives peaked softmaxes).
    let shapes = [
        (1, 1, 1, 1, 1.5),
        (1, 3, 1, 8, 1.5),
        (2, 1, 3, 3, 1.5),
        (2, 7, 2, 3, 1.5),
        (3, 17, 3, 7, 1.5),
        (1, 33, 4, 16, 1.5),
        (2, 5, 2, 1, 1.5),
        (1, 9, 2, 33, 4.0),
    ];
    for (batch, seq, heads, head_dim, scale) in shapes {
        let s = att(batch, seq, heads, head_dim);
        let (tokens, c) = (batch * seq, s.channels());
        let qkv = rand_vec(&mut r, tokens * 3 * c, scale);
        let dy = rand_vec(&mut r, tokens * c, 1.0);
        let qkvb = f32buf(&be, &qkv);
        let out = f32buf(&be, &rand_vec(&mut r, tokens * c, 1.0));
        let lse = f32buf(&be, &rand_vec(&mut r, tokens * heads, 1.0));
        be.attention_forward(&out, &lse, &qkvb, s).unwrap();
        let (want_out, want_lse) = ref_attention_forward(&qkv, &s);
        let what = format!("attention {s:?}");
        let tol = atol(seq * head_dim);
        assert_close(
            &format!("{what} out"),
            &get(&be, &out),
            &want_out,
            1e-5,
            tol,
        );
        assert_close(
            &format!("{what} lse"),
            &get(&be, &lse),
            &want_lse,
            1e-5,
            tol,
        );

        let dqkv = f32buf(&be, &rand_vec(&mut r, qkv.len(), 1.0)); // overwritten
        be.attention_backward(&dqkv, &f32buf(&be, &dy), &qkvb, &out, &lse, s)
            .unwrap();
        let want = ref_attention_backward(&dy, &qkv, &s);
        assert_close(&format!("{what} dqkv"), &get(&be, &dqkv), &want, 1e-5, tol);
    }
}

// ---- embeddings -----------------------------------------------------------------------------

#[test]
fn embedding_forward_backward() {
    let be = Cpu::new();
    let mut r = rng(8);
    for (batch, seq, ch, vocab) in [
        (1, 1, 1, 1),
        (1, 5, 3, 7),
        (2, 7, 17, 3),
        (3, 1, 7, 33),
        (4, 33, 16, 50),
    ] {
        let max_seq = seq + 2;
        let ids = rand_ids(&mut r, batch * seq, vocab);
        let (wte, wpe) = (
            rand_vec(&mut r, vocab * ch, 1.0),
            rand_vec(&mut r, max_seq * ch, 1.0),
        );
        let idb = be.upload_ids(&ids).unwrap();
        let out = f32buf(&be, &rand_vec(&mut r, batch * seq * ch, 1.0));
        be.embedding_forward(
            &out,
            &idb,
            &f32buf(&be, &wte),
            &f32buf(&be, &wpe),
            batch,
            seq,
            ch,
        )
        .unwrap();
        let what = format!("embedding b{batch} t{seq} c{ch} v{vocab}");
        let want = ref_embedding_forward(&ids, &wte, &wpe, seq, ch);
        assert_close(&format!("{what} out"), &get(&be, &out), &want, 1e-7, 0.0);

        let dy = rand_vec(&mut r, batch * seq * ch, 1.0);
        let (dwte0, dwpe0) = (
            rand_vec(&mut r, wte.len(), 1.0),
            rand_vec(&mut r, wpe.len(), 1.0),
        );
        let (dwte, dwpe) = (f32buf(&be, &dwte0), f32buf(&be, &dwpe0));
        be.embedding_backward(&dwte, &dwpe, &f32buf(&be, &dy), &idb, batch, seq, ch)
            .unwrap();
        let (want_te, want_pe) = ref_embedding_backward(&dwte0, &dwpe0, &dy, &ids, seq, ch);
        assert_close(
            &format!("{what} dwte"),
            &get(&be, &dwte),
            &want_te,
            1e-6,
            atol(batch * seq),
        );
        assert_close(
            &format!("{what} dwpe"),
            &get(&be, &dwpe),
            &want_pe,
            1e-6,
            atol(batch),
        );
    }
}

// ---- loss -----------------------------------------------------------------------------------

#[test]
fn cross_entropy_losses_and_gradient() {
    let be = Cpu::new();
    let mut r = rng(9);
    // (rows, vocab, an offset of every logit: exp(100) overflows f32 without max-subtraction).
    let shapes = [
        (1, 1, 0.0),
        (1, 7, 0.0),
        (3, 3, 0.0),
        (17, 33, 0.0),
        (5, 257, 0.0),
        (33, 1000, 0.0),
        (4, 50, 100.0),
    ];
    for (rows, vocab, offset) in shapes {
        let logits: Vec<f32> = rand_vec(&mut r, rows * vocab, 4.0)
            .iter()
            .map(|&x| x + offset)
            .collect();
        let targets = rand_ids(&mut r, rows, vocab);
        let tb = be.upload_ids(&targets).unwrap();
        let (want_loss, want_grad) = ref_cross_entropy(&logits, &targets, vocab);
        let what = format!("cross_entropy {rows}x{vocab} offset {offset}");

        // No gradient: losses only, logits untouched.
        let (losses, lb) = (
            f32buf(&be, &rand_vec(&mut r, rows, 1.0)),
            f32buf(&be, &logits),
        );
        be.cross_entropy(&losses, &lb, &tb, rows, vocab, None)
            .unwrap();
        assert_close(
            &format!("{what} losses"),
            &get(&be, &losses),
            &want_loss,
            1e-5,
            atol(vocab),
        );
        assert_eq!(
            get(&be, &lb),
            logits,
            "{what}: grad_scale None must leave the logits alone"
        );

        // With a gradient: the same losses, and s * (softmax - onehot) in place.
        let grad_scale = 0.37f32;
        be.cross_entropy(&losses, &lb, &tb, rows, vocab, Some(grad_scale))
            .unwrap();
        assert_close(
            &format!("{what} losses"),
            &get(&be, &losses),
            &want_loss,
            1e-5,
            atol(vocab),
        );
        let want: Vec<f64> = want_grad.iter().map(|&g| g * grad_scale as f64).collect();
        assert_close(&format!("{what} grad"), &get(&be, &lb), &want, 1e-5, 1e-6);
    }
}

// ---- optimizer ------------------------------------------------------------------------------

#[test]
fn adamw_several_steps() {
    let be = Cpu::new();
    let mut r = rng(10);
    for n in [1, 17, 1000] {
        for weight_decay in [0.0, 0.1] {
            for copy_dtype in [None, Some(DType::F32), Some(DType::Bf16)] {
                let p0 = rand_vec(&mut r, n, 1.0);
                let (param, m, v) = (
                    f32buf(&be, &p0),
                    be.alloc(n, DType::F32).unwrap(),
                    be.alloc(n, DType::F32).unwrap(),
                );
                let copy = copy_dtype.map(|d| be.alloc(n, d).unwrap());
                let (mut rp, mut rm, mut rv) = (wide(&p0), vec![0.0; n], vec![0.0; n]);
                for step in [1, 2, 3, 4, 5, 1000] {
                    let g = rand_vec(&mut r, n, 2.0);
                    let hp = AdamWStep {
                        lr: 1e-2,
                        beta1: 0.9,
                        beta2: 0.95,
                        eps: 1e-8,
                        weight_decay,
                        step,
                        grad_scale: 0.5,
                    };
                    be.adamw(&param, &f32buf(&be, &g), &m, &v, copy.as_ref(), &hp)
                        .unwrap();
                    ref_adamw(&mut rp, &g, &mut rm, &mut rv, &hp);
                    let what =
                        format!("adamw n{n} wd{weight_decay} copy {copy_dtype:?} step {step}");
                    let got = get(&be, &param);
                    assert_close(&format!("{what} param"), &got, &rp, 1e-5, 1e-6);
                    assert_close(&format!("{what} m"), &get(&be, &m), &rm, 1e-5, 1e-6);
                    assert_close(&format!("{what} v"), &get(&be, &v), &rv, 1e-5, 1e-7);
                    if let Some(c) = &copy {
                        let want: Vec<f32> = match c.dtype() {
                            DType::F32 => got.clone(),
                            DType::Bf16 => got.iter().map(|&x| round_bf16(x)).collect(),
                        };
                        assert_eq!(get(&be, c), want, "{what} param_copy");
                    }
                }
            }
        }
    }
}

#[test]
fn sum_squares_accumulates() {
    let be = Cpu::new();
    let mut r = rng(11);
    for n in [1, 7, 33, 40_001] {
        let (x, y) = (rand_vec(&mut r, n, 1.0), rand_vec(&mut r, n, 1.0));
        let acc = f32buf(&be, &[1.25]);
        be.sum_squares(&acc, &f32buf(&be, &x)).unwrap();
        // A bf16 input is read as its (exact) bf16 values.
        be.sum_squares(&acc, &upload(&be, &y, DType::Bf16)).unwrap();
        let sq = |v: &[f32], round: bool| -> f64 {
            v.iter()
                .map(|&v| if round { round_bf16(v) } else { v } as f64)
                .map(|v| v * v)
                .sum()
        };
        let want = 1.25 + sq(&x, false) + sq(&y, true);
        assert_close(
            &format!("sum_squares n{n}"),
            &get(&be, &acc),
            &[want],
            1e-6,
            0.0,
        );
    }
}

// ---- bf16 outputs ---------------------------------------------------------------------------

/// Every op writing a Bf16 output stores bf16-representable values: exactly the rounded f32
/// result of the same op on an f32 output with the same prior contents.
#[test]
fn bf16_outputs_are_rounded() {
    let be = Cpu::new();
    let mut r = rng(12);
    let (rows, cols) = (5, 17);
    let n = rows * cols;
    let s = att(2, 5, 2, 3);
    let x = f32buf(&be, &rand_vec(&mut r, n, 2.0));
    let y = f32buf(&be, &rand_vec(&mut r, n, 2.0));
    let wt = f32buf(&be, &rand_vec(&mut r, cols * cols, 1.0));
    let w = f32buf(&be, &rand_vec(&mut r, cols, 1.0));
    let bias = f32buf(&be, &rand_vec(&mut r, cols, 1.0));
    let qkv = f32buf(&be, &rand_vec(&mut r, 10 * 3 * s.channels(), 1.0));
    let dy_att = f32buf(&be, &rand_vec(&mut r, 10 * s.channels(), 1.0));
    let ids = be.upload_ids(&rand_ids(&mut r, rows, 7)).unwrap();
    let wte = f32buf(&be, &rand_vec(&mut r, 7 * cols, 1.0));
    let wpe = f32buf(&be, &rand_vec(&mut r, cols, 1.0));
    let targets = be.upload_ids(&rand_ids(&mut r, rows, cols)).unwrap();
    let f32s = |len: usize| be.alloc(len, DType::F32).unwrap();
    let (mean, rstd) = (f32s(rows), f32s(rows));
    be.layernorm_forward(&f32s(n), &mean, &rstd, &x, &w, &bias, rows, cols)
        .unwrap();
    let (att_out, lse) = (f32s(10 * s.channels()), f32s(10 * s.heads));
    be.attention_forward(&att_out, &lse, &qkv, s).unwrap();

    // Each case: (name, output length, the op writing into the given output).
    type Op<'a> = Box<dyn Fn(&Buf) -> Result<()> + 'a>;
    let spec = mm(rows, cols, cols, false, true, true);
    let lnb = |dinp: &Buf, dweight: &Buf| {
        let dbias = f32s(cols);
        be.layernorm_backward(dinp, dweight, &dbias, &y, &x, &w, &mean, &rstd, rows, cols)
    };
    let cases: Vec<(&str, usize, Op)> = vec![
        ("fill", n, Box::new(|o| be.fill(o, 0.1))),
        ("copy", n, Box::new(|o| be.copy(o, &x))),
        ("scale", n, Box::new(|o| be.scale(o, 1.37))),
        ("add", n, Box::new(|o| be.add(o, &x, &y))),
        ("accumulate", n, Box::new(|o| be.accumulate(o, &x))),
        (
            "matmul",
            n,
            Box::new(|o| be.matmul(o, &x, &wt, Some(&bias), spec)),
        ),
        (
            "bias_backward",
            cols,
            Box::new(|o| be.bias_backward(o, &x, rows, cols)),
        ),
        (
            "layernorm_forward",
            n,
            Box::new(|o| {
                be.layernorm_forward(o, &f32s(rows), &f32s(rows), &x, &w, &bias, rows, cols)
            }),
        ),
        (
            "layernorm_backward dinp",
            n,
            Box::new(|o| lnb(o, &f32s(cols))),
        ),
        (
            "layernorm_backward dweight",
            cols,
            Box::new(|o| lnb(&f32s(n), o)),
        ),
        ("gelu_forward", n, Box::new(|o| be.gelu_forward(o, &x))),
        (
            "gelu_backward",
            n,
            Box::new(|o| be.gelu_backward(o, &x, &y)),
        ),
        (
            "attention_forward",
            att_out.len(),
            Box::new(|o| be.attention_forward(o, &f32s(lse.len()), &qkv, s)),
        ),
        (
            "attention_backward",
            qkv.len(),
            Box::new(|o| be.attention_backward(o, &dy_att, &qkv, &att_out, &lse, s)),
        ),
        (
            "embedding_forward",
            n,
            Box::new(|o| be.embedding_forward(o, &ids, &wte, &wpe, rows, 1, cols)),
        ),
        (
            "embedding_backward dwte",
            wte.len(),
            Box::new(|o| be.embedding_backward(o, &f32s(cols), &x, &ids, rows, 1, cols)),
        ),
        (
            "cross_entropy logits",
            n,
            Box::new(|o| be.cross_entropy(&f32s(rows), o, &targets, rows, cols, Some(0.3))),
        ),
    ];
    for (name, len, op) in cases {
        // The same prior contents for both (bf16 values, so both start equal).
        let prior: Vec<f32> = rand_vec(&mut r, len, 2.0)
            .iter()
            .map(|&v| round_bf16(v))
            .collect();
        let (o16, o32) = (upload(&be, &prior, DType::Bf16), f32buf(&be, &prior));
        op(&o16).unwrap();
        op(&o32).unwrap();
        let got = get(&be, &o16);
        assert_bf16_exact(name, &got);
        let want: Vec<f32> = get(&be, &o32).iter().map(|&v| round_bf16(v)).collect();
        assert_eq!(
            got, want,
            "{name}: bf16 output is not the rounded f32 result"
        );
    }

    // AdamW's bf16 compute copy (its master weights stay f32).
    let (param, m, v) = (f32buf(&be, &rand_vec(&mut r, n, 1.0)), f32s(n), f32s(n));
    let copy = be.alloc(n, DType::Bf16).unwrap();
    let hp = plain_hp();
    be.adamw(&param, &x, &m, &v, Some(&copy), &hp).unwrap();
    assert_bf16_exact("adamw param_copy", &get(&be, &copy));
}

// ---- error paths ----------------------------------------------------------------------------

#[test]
fn wrong_lengths_name_the_operand() {
    let be = Cpu::new();
    let buf = |len: usize| be.alloc(len, DType::F32).unwrap();
    let ids = |n: usize| be.upload_ids(&vec![0; n]).unwrap();
    let spec = mm(2, 3, 4, false, false, false);
    let s = att(1, 2, 2, 3);
    let hp = plain_hp();

    assert_err(be.upload(&buf(3), &[1.0, 2.0]), "`dst`");
    assert_err(be.copy(&buf(3), &buf(4)), "`dst`");
    assert_err(be.add(&buf(3), &buf(2), &buf(3)), "`a`");
    assert_err(be.add(&buf(3), &buf(3), &buf(4)), "`b`");
    assert_err(be.accumulate(&buf(3), &buf(4)), "`src`");
    assert_err(be.matmul(&buf(5), &buf(8), &buf(12), None, spec), "`out`");
    assert_err(be.matmul(&buf(6), &buf(9), &buf(12), None, spec), "`a`");
    assert_err(be.matmul(&buf(6), &buf(8), &buf(11), None, spec), "`b`");
    assert_err(
        be.matmul(&buf(6), &buf(8), &buf(12), Some(&buf(2)), spec),
        "`bias`",
    );
    assert_err(be.bias_backward(&buf(2), &buf(6), 2, 3), "`dbias`");
    assert_err(be.bias_backward(&buf(3), &buf(7), 2, 3), "`dout`");
    let (r, c) = (2, 3);
    let ln = |out: usize, mean: usize, rstd: usize, inp: usize, w: usize, b: usize| {
        be.layernorm_forward(
            &buf(out),
            &buf(mean),
            &buf(rstd),
            &buf(inp),
            &buf(w),
            &buf(b),
            r,
            c,
        )
    };
    assert_err(ln(5, 2, 2, 6, 3, 3), "`out`");
    assert_err(ln(6, 3, 2, 6, 3, 3), "`mean`");
    assert_err(ln(6, 2, 1, 6, 3, 3), "`rstd`");
    assert_err(ln(6, 2, 2, 7, 3, 3), "`inp`");
    assert_err(ln(6, 2, 2, 6, 4, 3), "`weight`");
    assert_err(ln(6, 2, 2, 6, 3, 2), "`bias`");
    let lnb = |dinp: usize, dw: usize, dout: usize, mean: usize| {
        be.layernorm_backward(
            &buf(dinp),
            &buf(dw),
            &buf(3),
            &buf(dout),
            &buf(6),
            &buf(3),
            &buf(mean),
            &buf(2),
            r,
            c,
        )
    };
    assert_err(lnb(7, 3, 6, 2), "`dinp`");
    assert_err(lnb(6, 2, 6, 2), "`dweight`");
    assert_err(lnb(6, 3, 5, 2), "`dout`");
    assert_err(lnb(6, 3, 6, 1), "`mean`");
    assert_err(be.gelu_forward(&buf(3), &buf(4)), "`inp`");
    assert_err(be.gelu_backward(&buf(3), &buf(3), &buf(2)), "`dout`");
    assert_err(
        be.attention_forward(&buf(11), &buf(4), &buf(36), s),
        "`out`",
    );
    assert_err(
        be.attention_forward(&buf(12), &buf(3), &buf(36), s),
        "`lse`",
    );
    assert_err(
        be.attention_forward(&buf(12), &buf(4), &buf(35), s),
        "`qkv`",
    );
    assert_err(
        be.attention_backward(&buf(37), &buf(12), &buf(36), &buf(12), &buf(4), s),
        "`dqkv`",
    );
    assert_err(
        be.attention_backward(&buf(36), &buf(13), &buf(36), &buf(12), &buf(4), s),
        "`dout`",
    );
    assert_err(
        be.attention_backward(&buf(36), &buf(12), &buf(36), &buf(11), &buf(4), s),
        "`out`",
    );
    assert_err(
        be.attention_backward(&buf(36), &buf(12), &buf(36), &buf(12), &buf(5), s),
        "`lse`",
    );
    assert_err(
        be.embedding_forward(&buf(11), &ids(4), &buf(15), &buf(6), 2, 2, 3),
        "`out`",
    );
    assert_err(
        be.embedding_forward(&buf(12), &ids(3), &buf(15), &buf(6), 2, 2, 3),
        "`ids`",
    );
    assert_err(
        be.embedding_backward(&buf(15), &buf(6), &buf(13), &ids(4), 2, 2, 3),
        "`dout`",
    );
    assert_err(
        be.cross_entropy(&buf(3), &buf(10), &ids(2), 2, 5, None),
        "`losses`",
    );
    assert_err(
        be.cross_entropy(&buf(2), &buf(11), &ids(2), 2, 5, None),
        "`logits`",
    );
    assert_err(
        be.cross_entropy(&buf(2), &buf(10), &ids(3), 2, 5, None),
        "`targets`",
    );
    assert_err(
        be.adamw(&buf(4), &buf(3), &buf(4), &buf(4), None, &hp),
        "`grad`",
    );
    assert_err(
        be.adamw(&buf(4), &buf(4), &buf(5), &buf(4), None, &hp),
        "`m`",
    );
    assert_err(
        be.adamw(&buf(4), &buf(4), &buf(4), &buf(3), None, &hp),
        "`v`",
    );
    assert_err(
        be.adamw(&buf(4), &buf(4), &buf(4), &buf(4), Some(&buf(5)), &hp),
        "`param_copy`",
    );
    assert_err(be.sum_squares(&buf(2), &buf(4)), "`acc`");
    // A position table shorter than the sequence, and slices past the end of their buffer.
    assert_err(
        be.embedding_forward(&buf(12), &ids(4), &buf(15), &buf(3), 2, 2, 3),
        "sequence length",
    );
    assert!(be.slice(&buf(10), 8, 3).is_err());
    assert!(be.slice(&buf(10), usize::MAX, 2).is_err());
}

#[test]
fn wrong_dtypes_of_fixed_precision_outputs() {
    let be = Cpu::new();
    let f = |len: usize| be.alloc(len, DType::F32).unwrap();
    let h = |len: usize| be.alloc(len, DType::Bf16).unwrap();
    let s = att(1, 2, 2, 3);
    let hp = plain_hp();
    let ids = be.upload_ids(&[0, 1]).unwrap();
    assert_err(
        be.layernorm_forward(&f(6), &h(2), &f(2), &f(6), &f(3), &f(3), 2, 3),
        "`mean`",
    );
    assert_err(
        be.layernorm_forward(&f(6), &f(2), &h(2), &f(6), &f(3), &f(3), 2, 3),
        "`rstd`",
    );
    assert_err(be.attention_forward(&f(12), &h(4), &f(36), s), "`lse`");
    assert_err(
        be.cross_entropy(&h(2), &f(10), &ids, 2, 5, None),
        "`losses`",
    );
    assert_err(be.adamw(&h(4), &f(4), &f(4), &f(4), None, &hp), "`param`");
    assert_err(be.adamw(&f(4), &f(4), &h(4), &f(4), None, &hp), "`m`");
    assert_err(be.adamw(&f(4), &f(4), &f(4), &h(4), None, &hp), "`v`");
    assert_err(be.sum_squares(&h(1), &f(4)), "`acc`");
}

#[test]
fn wrong_dtypes_of_saved_statistics() {
    // The backwards read the forward's f32 statistics as f32: a bf16 one must be refused by name,
    // not reinterpreted.
    let be = Cpu::new();
    let f = |len: usize| be.alloc(len, DType::F32).unwrap();
    let h = |len: usize| be.alloc(len, DType::Bf16).unwrap();
    let s = att(1, 2, 2, 3);
    let (rows, cols) = (2, 3);
    let ln_backward = |mean: &Buf, rstd: &Buf| {
        let (dx, dw, db) = (f(rows * cols), f(cols), f(cols));
        let (dy, x, w) = (f(rows * cols), f(rows * cols), f(cols));
        be.layernorm_backward(&dx, &dw, &db, &dy, &x, &w, mean, rstd, rows, cols)
    };
    assert_err(ln_backward(&h(rows), &f(rows)), "`mean`");
    assert_err(ln_backward(&f(rows), &h(rows)), "`rstd`");
    assert_err(
        be.attention_backward(&f(36), &f(12), &f(36), &f(12), &h(4), s),
        "`lse`",
    );
    // The same shapes with f32 statistics are accepted.
    ln_backward(&f(rows), &f(rows)).unwrap();
    be.attention_backward(&f(36), &f(12), &f(36), &f(12), &f(4), s)
        .unwrap();
}

#[test]
fn overlapping_outputs_are_errors() {
    let be = Cpu::new();
    let all = be.alloc(40, DType::F32).unwrap();
    be.upload(&all, &rand_vec(&mut rng(13), 40, 1.0)).unwrap();
    let sl = |off: usize, len: usize| be.slice(&all, off, len).unwrap();
    let other = be.alloc(10, DType::F32).unwrap();
    let ids = be.upload_ids(&[0, 1]).unwrap();
    let hp = plain_hp();
    let spec = mm(2, 5, 5, false, false, false);

    // Partial and full overlaps between an output and an input.
    assert_err(be.copy(&sl(0, 10), &sl(5, 10)), "overlaps");
    assert_err(be.copy(&other, &other), "overlaps");
    assert_err(be.add(&sl(0, 10), &other, &sl(9, 10)), "overlaps");
    assert_err(be.accumulate(&sl(10, 10), &sl(1, 10)), "overlaps");
    assert_err(be.gelu_forward(&sl(0, 10), &sl(0, 10)), "overlaps");
    assert_err(
        be.matmul(
            &sl(0, 10),
            &sl(5, 10),
            &be.alloc(25, DType::F32).unwrap(),
            None,
            spec,
        ),
        "overlaps",
    );
    assert_err(
        be.matmul(&sl(0, 10), &other, &sl(10, 25), Some(&sl(9, 5)), spec),
        "overlaps",
    );
    assert_err(be.sum_squares(&sl(3, 1), &sl(0, 10)), "overlaps");
    // Two outputs of one op overlapping each other.
    let x = be.alloc(6, DType::F32).unwrap();
    let w = be.alloc(3, DType::F32).unwrap();
    assert_err(
        be.layernorm_forward(&sl(0, 6), &sl(6, 2), &sl(7, 2), &x, &w, &w, 2, 3),
        "overlaps",
    );
    assert_err(
        be.embedding_backward(&sl(0, 6), &sl(3, 6), &x, &ids, 1, 2, 3),
        "overlaps",
    );
    assert_err(
        be.adamw(
            &sl(0, 4),
            &be.alloc(4, DType::F32).unwrap(),
            &sl(4, 4),
            &sl(7, 4),
            None,
            &hp,
        ),
        "overlaps",
    );
    assert_err(
        be.cross_entropy(&sl(0, 2), &sl(1, 6), &ids, 2, 3, Some(1.0)),
        "overlaps",
    );

    // Adjacent, disjoint slices of one allocation are fine, and inputs may alias each other.
    be.copy(&sl(0, 10), &sl(10, 10)).unwrap();
    be.add(&sl(0, 10), &sl(10, 10), &sl(10, 10)).unwrap();
    let got = get(&be, &all);
    for i in 0..10 {
        assert_eq!(got[i], 2.0 * got[10 + i]);
    }
}

#[test]
fn out_of_vocab_ids_are_errors() {
    let be = Cpu::new();
    let (vocab, ch, seq) = (5, 3, 2);
    let f = |len: usize| be.alloc(len, DType::F32).unwrap();
    let bad = be.upload_ids(&[0, 5]).unwrap();
    let msg = "vocabulary";
    assert_err(
        be.embedding_forward(&f(6), &bad, &f(vocab * ch), &f(seq * ch), 1, seq, ch),
        msg,
    );
    assert_err(
        be.embedding_backward(&f(vocab * ch), &f(seq * ch), &f(6), &bad, 1, seq, ch),
        msg,
    );
    assert_err(
        be.cross_entropy(&f(2), &f(2 * vocab), &bad, 2, vocab, Some(1.0)),
        msg,
    );
    // The largest valid id is fine.
    let ok = be.upload_ids(&[4, 4]).unwrap();
    be.embedding_forward(&f(6), &ok, &f(vocab * ch), &f(seq * ch), 1, seq, ch)
        .unwrap();
    be.cross_entropy(&f(2), &f(2 * vocab), &ok, 2, vocab, Some(1.0))
        .unwrap();
}

/// Zero-sized dimensions must give `Ok` (nothing to do) or `Err`, never a panic ("every op
/// returns `Result` ... never panics").
#[test]
fn zero_sized_shapes_do_not_panic() {
    let be = Cpu::new();
    let f = |len: usize| be.alloc(len, DType::F32).unwrap();
    let no_ids = be.upload_ids(&[]).unwrap();
    let spec = |m, n, k| mm(m, n, k, true, true, false);
    let s = att(2, 0, 2, 3);
    type Op<'a> = Box<dyn Fn() -> Result<()> + 'a>;
    let cases: Vec<(&str, Op)> = vec![
        (
            "matmul m=0",
            Box::new(|| be.matmul(&f(0), &f(0), &f(12), None, spec(0, 3, 4))),
        ),
        (
            "bias_backward cols=0",
            Box::new(|| be.bias_backward(&f(0), &f(0), 3, 0)),
        ),
        ("gelu n=0", Box::new(|| be.gelu_forward(&f(0), &f(0)))),
        (
            "embedding seq=0",
            Box::new(|| be.embedding_forward(&f(0), &no_ids, &f(6), &f(6), 2, 0, 3)),
        ),
        (
            "attention seq=0",
            Box::new(|| be.attention_forward(&f(0), &f(0), &f(0), s)),
        ),
        (
            "layernorm_forward cols=0",
            Box::new(|| be.layernorm_forward(&f(0), &f(2), &f(2), &f(0), &f(0), &f(0), 2, 0)),
        ),
        (
            "layernorm_backward cols=0",
            Box::new(|| {
                be.layernorm_backward(&f(0), &f(0), &f(0), &f(0), &f(0), &f(0), &f(2), &f(2), 2, 0)
            }),
        ),
        (
            "cross_entropy rows=0 vocab=0",
            Box::new(|| be.cross_entropy(&f(0), &f(0), &no_ids, 0, 0, Some(1.0))),
        ),
    ];
    let panicked: Vec<&str> = cases
        .into_iter()
        .filter(|(_, op)| std::panic::catch_unwind(std::panic::AssertUnwindSafe(op)).is_err())
        .map(|(name, _)| name)
        .collect();
    assert!(
        panicked.is_empty(),
        "panicked instead of returning a Result: {panicked:?}"
    );
}
