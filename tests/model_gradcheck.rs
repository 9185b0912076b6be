//! Finite-difference check, in f64, of the whole model's loss gradient: every parameter of a small
//! GPT (2 blocks, 2 heads) against central differences of the mean cross-entropy loss. This covers
//! the hand-written backward end to end: the tied head, the residual stream, every layer.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shardtrain::backend::cpu::{CpuBackend, CpuBuf};
use shardtrain::backend::{Backend, DType};
use shardtrain::model::{Gpt, GptShape, ParamLayout, ResidentParams};

type Be = CpuBackend<f64>;

const SHAPE: GptShape = GptShape {
    n_layer: 2,
    n_head: 2,
    d_model: 8,
    vocab_size: 11,
    block_size: 6,
};
const BATCH: usize = 2;
const SEQ: usize = 5;

struct Setup {
    be: Be,
    model: Gpt<Be>,
    units: ResidentParams<Be>,
    inputs: <Be as Backend>::Ids,
    targets: <Be as Backend>::Ids,
}

fn setup() -> Setup {
    let be = Be::new();
    let layout = ParamLayout::gpt(SHAPE, 0.02);
    let units = ResidentParams::alloc(&be, &layout, DType::F32).unwrap();
    // Random values everywhere (norm gains around 1, biases non-zero) so no gradient is trivially 0.
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    for (u, unit) in layout.units.iter().enumerate() {
        let values: Vec<f64> = (0..unit.numel)
            .map(|_| rng.random_range(-0.5..0.5))
            .collect();
        units.params[u].set(&values).unwrap();
    }
    for (u, t) in layout.tensors() {
        if t.name.contains("ln") && t.name.ends_with("weight") {
            let view = be.slice(&units.params[u], t.offset, t.numel()).unwrap();
            let gains: Vec<f64> = (0..t.numel()).map(|_| rng.random_range(0.5..1.5)).collect();
            view.set(&gains).unwrap();
        }
    }
    let ids: Vec<u32> = (0..BATCH * SEQ + 1)
        .map(|_| rng.random_range(0..SHAPE.vocab_size as u32))
        .collect();
    let inputs = be.upload_ids(&ids[..BATCH * SEQ]).unwrap();
    let targets = be.upload_ids(&ids[1..]).unwrap();
    Setup {
        model: Gpt::new(layout, DType::F32),
        be,
        units,
        inputs,
        targets,
    }
}

fn mean_loss(s: &mut Setup) -> f64 {
    s.model
        .forward(
            &s.be,
            &mut s.units,
            &s.inputs,
            Some(&s.targets),
            None,
            BATCH,
            SEQ,
        )
        .unwrap();
    let losses = s.model.activations().unwrap().losses.to_vec();
    losses.iter().sum::<f64>() / losses.len() as f64
}

#[test]
fn whole_model_gradient_matches_finite_differences() {
    let mut s = setup();
    let n = (BATCH * SEQ) as f32;
    s.model
        .forward(
            &s.be,
            &mut s.units,
            &s.inputs,
            Some(&s.targets),
            Some(1.0 / n),
            BATCH,
            SEQ,
        )
        .unwrap();
    s.model.backward(&s.be, &mut s.units, &s.inputs).unwrap();
    let analytic: Vec<Vec<f64>> = s.units.grads.iter().map(CpuBuf::to_vec).collect();

    let h = 1e-6;
    let mut worst = (0.0f64, String::new());
    let layout = s.model.layout.clone();
    for (u, t) in layout.tensors() {
        for i in 0..t.numel() {
            let idx = t.offset + i;
            let param = s.be.slice(&s.units.params[u], idx, 1).unwrap();
            let x = param.to_vec()[0];
            param.set(&[x + h]).unwrap();
            let up = mean_loss(&mut s);
            param.set(&[x - h]).unwrap();
            let down = mean_loss(&mut s);
            param.set(&[x]).unwrap();
            let numeric = (up - down) / (2.0 * h);
            let a = analytic[u][idx];
            // Relative error, floored for gradients that are exactly zero (the key bias: softmax is
            // shift-invariant) where only finite-difference noise (~1e-10) remains.
            let err = (a - numeric).abs() / a.abs().max(numeric.abs()).max(1e-3);
            if err > worst.0 {
                worst = (
                    err,
                    format!("{}[{i}]: analytic {a:e} numeric {numeric:e}", t.name),
                );
            }
        }
    }
    assert!(
        worst.0 < 1e-5,
        "worst relative error {:e} at {}",
        worst.0,
        worst.1
    );
}

#[test]
fn gradients_accumulate_across_micro_batches() {
    // Two backward passes without zeroing give twice the gradient of one: the contract gradient
    // accumulation relies on.
    let mut s = setup();
    let run = |s: &mut Setup| {
        s.model
            .forward(
                &s.be,
                &mut s.units,
                &s.inputs,
                Some(&s.targets),
                Some(0.1),
                BATCH,
                SEQ,
            )
            .unwrap();
        s.model.backward(&s.be, &mut s.units, &s.inputs).unwrap();
    };
    run(&mut s);
    let once: Vec<Vec<f64>> = s.units.grads.iter().map(CpuBuf::to_vec).collect();
    run(&mut s);
    for (g1, g2) in once.iter().zip(&s.units.grads) {
        for (a, b) in g1.iter().zip(g2.to_vec()) {
            assert!((2.0 * a - b).abs() <= 1e-12 * a.abs().max(1.0), "{a} {b}");
        }
    }
}
