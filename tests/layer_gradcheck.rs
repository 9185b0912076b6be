//! Finite-difference checks, in f64, of every backward op of the `Backend` trait.
//!
//! Runs on `CpuBackend<f64>`, whose f32 buffers keep full f64 precision. For each layer a fixed
//! random weight tensor `w` defines the scalar `L = Σ w ⊙ output`; the analytic gradients come from
//! the backend's backward ops with `dout = w` (composed as the model's backward composes them), and
//! every input element is compared against the central difference `(L(x+h) - L(x-h)) / 2h`,
//! `h ≈ 1e-6`. Elements are perturbed in place through `accumulate` on one-element slices (exact
//! in f64, and restored exactly), and `L` is read back at f64 precision with `CpuBuf::to_vec`.
//!
//! Layers checked, on small shapes (batch 2, seq 5, heads 2, head_dim 3, ...):
//! - linear layer `op(a) · op(b) + bias` for all four transpose combinations: `da`, `db` through
//!   `matmul` with the transposes a linear layer's backward uses, `dbias` through `bias_backward`;
//! - LayerNorm (input, weight, bias);
//! - GELU;
//! - causal attention (the whole fused qkv);
//! - token + position embedding (wte and wpe, with repeated ids and unused positions);
//! - cross-entropy: the in-place gradient of the mean loss with respect to the logits;
//! - residual: `a + b` (accumulate into both inputs) and a pre-LN block `x + gelu(LN(x))`, whose
//!   input gradient sums the residual path and the LayerNorm path.
//!
//! Pass criterion: `|analytic - numeric| <= 1e-6 * max(|analytic|, |numeric|, 1e-3)`, that is a
//! relative error below 1e-6, or an absolute one below 1e-9 for gradients under 1e-3 (the rounding
//! noise of a central difference at this `h` is about 1e-10).

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shardtrain::backend::cpu::{CpuBackend, CpuBuf};
use shardtrain::backend::{AttentionShape, Backend, Buffer, DType, MatmulSpec};

type Cpu = CpuBackend<f64>;
type Buf = CpuBuf<f64>;

const H: f32 = 1e-6;
const REL_TOL: f64 = 1e-6;
const FLOOR: f64 = 1e-3;

// ---- helpers --------------------------------------------------------------------------------

/// `n` values uniform in `(-scale, scale)`, never (close to) zero.
fn rand_vec(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let x: f32 = rng.random_range(0.05f32..1.0);
            if rng.random::<bool>() {
                x * scale
            } else {
                -x * scale
            }
        })
        .collect()
}

fn buf(be: &Cpu, data: &[f32]) -> Buf {
    let b = be.alloc(data.len(), DType::F32).unwrap();
    be.upload(&b, data).unwrap();
    b
}

fn zeros(be: &Cpu, len: usize) -> Buf {
    be.alloc(len, DType::F32).unwrap()
}

/// `Σ w ⊙ out` at full f64 precision.
fn weighted_sum(w: &Buf, out: &Buf) -> f64 {
    w.to_vec()
        .iter()
        .zip(out.to_vec())
        .map(|(a, b)| a * b)
        .sum()
}

/// Compares `analytic` (the gradient of `loss` wrt `x`) with central differences on every element
/// of `x`, and prints the worst relative error (visible with `--nocapture`).
#[track_caller]
fn check(be: &Cpu, what: &str, x: &Buf, analytic: &Buf, loss: &dyn Fn() -> f64) {
    assert_eq!(x.len(), analytic.len(), "{what}: gradient length");
    let original = x.to_vec();
    let analytic = analytic.to_vec();
    let (plus, minus_2h) = (buf(be, &[H]), buf(be, &[-2.0 * H]));
    let h = H as f64;
    let mut worst = 0.0f64;
    for (i, &a) in analytic.iter().enumerate() {
        let xi = be.slice(x, i, 1).unwrap();
        be.accumulate(&xi, &plus).unwrap();
        let l_plus = loss();
        be.accumulate(&xi, &minus_2h).unwrap();
        let l_minus = loss();
        be.accumulate(&xi, &plus).unwrap();
        let numeric = (l_plus - l_minus) / (2.0 * h);
        let rel = (a - numeric).abs() / a.abs().max(numeric.abs()).max(FLOOR);
        assert!(
            rel < REL_TOL,
            "{what}[{i}]: analytic {a:e}, numeric {numeric:e}, relative error {rel:e}"
        );
        worst = worst.max(rel);
    }
    assert_eq!(
        x.to_vec(),
        original,
        "{what}: perturbations were not undone exactly"
    );
    eprintln!(
        "{what}: {} elements, worst relative error {worst:.1e}",
        analytic.len()
    );
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

// ---- linear layers --------------------------------------------------------------------------

/// `out[m, n] = op(a) · op(b) + bias`; the backward of a linear layer:
/// `d op(a) = dout · op(b)ᵀ`, `d op(b) = op(a)ᵀ · dout`, `dbias = Σ_rows dout`, each written
/// in the operand's own storage layout by choosing the transposes.
#[test]
fn matmul_with_bias_all_transposes() {
    let be = Cpu::new();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (m, n, k) = (6, 4, 5);
    for trans_a in [false, true] {
        for trans_b in [false, true] {
            let a = buf(&be, &rand_vec(&mut rng, m * k, 1.0));
            let b = buf(&be, &rand_vec(&mut rng, k * n, 1.0));
            let bias = buf(&be, &rand_vec(&mut rng, n, 1.0));
            let w = buf(&be, &rand_vec(&mut rng, m * n, 1.0));
            let out = zeros(&be, m * n);
            let loss = || {
                let spec = mm(m, n, k, trans_a, trans_b, false);
                be.matmul(&out, &a, &b, Some(&bias), spec).unwrap();
                weighted_sum(&w, &out)
            };

            let (da, db, dbias) = (zeros(&be, m * k), zeros(&be, k * n), zeros(&be, n));
            // da: [m, k] = dout · op(b)ᵀ, or stored [k, m] = op(b) · doutᵀ.
            let spec_a = if trans_a {
                mm(k, m, n, trans_b, true, false)
            } else {
                mm(m, k, n, false, !trans_b, false)
            };
            let (lhs, rhs) = if trans_a { (&b, &w) } else { (&w, &b) };
            be.matmul(&da, lhs, rhs, None, spec_a).unwrap();
            // db: [k, n] = op(a)ᵀ · dout, or stored [n, k] = doutᵀ · op(a); weight gradients
            // accumulate (onto zeros here).
            let spec_b = if trans_b {
                mm(n, k, m, true, trans_a, true)
            } else {
                mm(k, n, m, !trans_a, false, true)
            };
            let (lhs, rhs) = if trans_b { (&w, &a) } else { (&a, &w) };
            be.matmul(&db, lhs, rhs, None, spec_b).unwrap();
            be.bias_backward(&dbias, &w, m, n).unwrap();

            let what = format!("matmul trans_a {trans_a} trans_b {trans_b}");
            check(&be, &format!("{what} da"), &a, &da, &loss);
            check(&be, &format!("{what} db"), &b, &db, &loss);
            check(&be, &format!("{what} dbias"), &bias, &dbias, &loss);
        }
    }
}

// ---- layer norm, GELU -----------------------------------------------------------------------

#[test]
fn layernorm() {
    let be = Cpu::new();
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (rows, cols) = (10, 6);
    let x = buf(&be, &rand_vec(&mut rng, rows * cols, 2.0));
    let weight = buf(&be, &rand_vec(&mut rng, cols, 1.5));
    let bias = buf(&be, &rand_vec(&mut rng, cols, 1.0));
    let w = buf(&be, &rand_vec(&mut rng, rows * cols, 1.0));
    let (out, mean, rstd) = (zeros(&be, rows * cols), zeros(&be, rows), zeros(&be, rows));
    let loss = || {
        be.layernorm_forward(&out, &mean, &rstd, &x, &weight, &bias, rows, cols)
            .unwrap();
        weighted_sum(&w, &out)
    };
    loss();
    let (dx, dweight, dbias) = (zeros(&be, rows * cols), zeros(&be, cols), zeros(&be, cols));
    be.layernorm_backward(
        &dx, &dweight, &dbias, &w, &x, &weight, &mean, &rstd, rows, cols,
    )
    .unwrap();
    check(&be, "layernorm dinp", &x, &dx, &loss);
    check(&be, "layernorm dweight", &weight, &dweight, &loss);
    check(&be, "layernorm dbias", &bias, &dbias, &loss);
}

#[test]
fn gelu() {
    let be = Cpu::new();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let n = 40;
    let x = buf(&be, &rand_vec(&mut rng, n, 4.0));
    let w = buf(&be, &rand_vec(&mut rng, n, 1.0));
    let out = zeros(&be, n);
    let loss = || {
        be.gelu_forward(&out, &x).unwrap();
        weighted_sum(&w, &out)
    };
    let dx = zeros(&be, n);
    be.gelu_backward(&dx, &x, &w).unwrap();
    check(&be, "gelu dinp", &x, &dx, &loss);
}

// ---- attention ------------------------------------------------------------------------------

#[test]
fn attention() {
    let be = Cpu::new();
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for (batch, seq, heads, head_dim) in [(2, 5, 2, 3), (1, 4, 3, 1), (2, 1, 1, 4)] {
        let s = AttentionShape {
            batch,
            seq,
            heads,
            head_dim,
        };
        let tokens = batch * seq;
        let qkv = buf(&be, &rand_vec(&mut rng, tokens * 3 * s.channels(), 1.5));
        let w = buf(&be, &rand_vec(&mut rng, tokens * s.channels(), 1.0));
        let (out, lse) = (
            zeros(&be, tokens * s.channels()),
            zeros(&be, tokens * heads),
        );
        let loss = || {
            be.attention_forward(&out, &lse, &qkv, s).unwrap();
            weighted_sum(&w, &out)
        };
        loss();
        let dqkv = zeros(&be, qkv.len());
        be.attention_backward(&dqkv, &w, &qkv, &out, &lse, s)
            .unwrap();
        check(&be, &format!("attention {s:?} dqkv"), &qkv, &dqkv, &loss);
    }
}

// ---- embeddings -----------------------------------------------------------------------------

#[test]
fn embedding() {
    let be = Cpu::new();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (batch, seq, channels, vocab, max_seq) = (2, 5, 3, 7, 6);
    // Repeated ids (their gradients must add up) and one id never used (zero gradient).
    let ids = be.upload_ids(&[1, 4, 4, 0, 6, 2, 1, 1, 4, 5]).unwrap();
    let wte = buf(&be, &rand_vec(&mut rng, vocab * channels, 1.0));
    let wpe = buf(&be, &rand_vec(&mut rng, max_seq * channels, 1.0));
    let w = buf(&be, &rand_vec(&mut rng, batch * seq * channels, 1.0));
    let out = zeros(&be, batch * seq * channels);
    let loss = || {
        be.embedding_forward(&out, &ids, &wte, &wpe, batch, seq, channels)
            .unwrap();
        weighted_sum(&w, &out)
    };
    let (dwte, dwpe) = (zeros(&be, wte.len()), zeros(&be, wpe.len()));
    be.embedding_backward(&dwte, &dwpe, &w, &ids, batch, seq, channels)
        .unwrap();
    check(&be, "embedding dwte", &wte, &dwte, &loss);
    check(&be, "embedding dwpe", &wpe, &dwpe, &loss);
}

// ---- loss -----------------------------------------------------------------------------------

/// `L = mean loss`, written as `s · Σ losses` with `s` the f32 value of `1 / rows` that the
/// gradient is scaled by.
#[test]
fn cross_entropy_mean_loss() {
    let be = Cpu::new();
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let (rows, vocab) = (10, 7);
    let targets: Vec<u32> = (0..rows)
        .map(|_| rng.random_range(0..vocab as u32))
        .collect();
    let targets = be.upload_ids(&targets).unwrap();
    let logits = buf(&be, &rand_vec(&mut rng, rows * vocab, 2.0));
    let losses = zeros(&be, rows);
    let grad_scale = 1.0 / rows as f32;
    let loss = || {
        be.cross_entropy(&losses, &logits, &targets, rows, vocab, None)
            .unwrap();
        grad_scale as f64 * losses.to_vec().iter().sum::<f64>()
    };
    let dlogits = zeros(&be, logits.len());
    be.copy(&dlogits, &logits).unwrap();
    be.cross_entropy(&losses, &dlogits, &targets, rows, vocab, Some(grad_scale))
        .unwrap();
    check(&be, "cross_entropy dlogits", &logits, &dlogits, &loss);
}

// ---- residual -------------------------------------------------------------------------------

/// `y = a + b`: the same gradient accumulates into both inputs.
#[test]
fn residual_add() {
    let be = Cpu::new();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let n = 30;
    let a = buf(&be, &rand_vec(&mut rng, n, 1.0));
    let b = buf(&be, &rand_vec(&mut rng, n, 1.0));
    let w = buf(&be, &rand_vec(&mut rng, n, 1.0));
    let y = zeros(&be, n);
    let loss = || {
        be.add(&y, &a, &b).unwrap();
        weighted_sum(&w, &y)
    };
    let (da, db) = (zeros(&be, n), zeros(&be, n));
    be.accumulate(&da, &w).unwrap();
    be.accumulate(&db, &w).unwrap();
    check(&be, "add da", &a, &da, &loss);
    check(&be, "add db", &b, &db, &loss);
}

/// A pre-LN block `y = x + gelu(LN(x))`: `dx` starts as the residual gradient (a copy of `dy`)
/// and LayerNorm's backward accumulates the branch's gradient onto it.
#[test]
fn residual_block() {
    let be = Cpu::new();
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let (rows, cols) = (10, 6);
    let n = rows * cols;
    let x = buf(&be, &rand_vec(&mut rng, n, 2.0));
    let weight = buf(&be, &rand_vec(&mut rng, cols, 1.5));
    let bias = buf(&be, &rand_vec(&mut rng, cols, 1.0));
    let w = buf(&be, &rand_vec(&mut rng, n, 1.0));
    let (ln, mean, rstd) = (zeros(&be, n), zeros(&be, rows), zeros(&be, rows));
    let (h, y) = (zeros(&be, n), zeros(&be, n));
    let loss = || {
        be.layernorm_forward(&ln, &mean, &rstd, &x, &weight, &bias, rows, cols)
            .unwrap();
        be.gelu_forward(&h, &ln).unwrap();
        be.add(&y, &x, &h).unwrap();
        weighted_sum(&w, &y)
    };
    loss();
    let (dx, dln) = (zeros(&be, n), zeros(&be, n));
    let (dweight, dbias) = (zeros(&be, cols), zeros(&be, cols));
    be.copy(&dx, &w).unwrap();
    be.gelu_backward(&dln, &ln, &w).unwrap();
    be.layernorm_backward(
        &dx, &dweight, &dbias, &dln, &x, &weight, &mean, &rstd, rows, cols,
    )
    .unwrap();
    check(&be, "residual block dx", &x, &dx, &loss);
    check(&be, "residual block dweight", &weight, &dweight, &loss);
    check(&be, "residual block dbias", &bias, &dbias, &loss);
}
