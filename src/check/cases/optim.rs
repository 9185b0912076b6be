//! Cases of the AdamW update (f32 and bf16 gradients, no compute copy or an f32 or bf16 one,
//! first and tenth step), of its multi-tensor form (pieces with and without decay, gaps of
//! padding between them that must stay untouched), and of the sum of squares behind global-norm
//! clipping.

use crate::backend::{AdamWSegment, AdamWStep, Backend, DType};
use crate::check::harness::Ctx;
use crate::check::random::{between, uniform};

const ADAMW_LENS: [usize; 3] = [1, 777, 4099];

pub(super) fn adamw<S: Backend>(cx: &mut Ctx<'_, S>) {
    for n in ADAMW_LENS {
        for grad_dtype in [DType::F32, DType::Bf16] {
            for copy_dtype in [None, Some(DType::F32), Some(DType::Bf16)] {
                for (step, grad_scale) in [(1, 0.5), (10, 1.7)] {
                    let hp = AdamWStep {
                        lr: 0.01,
                        beta1: 0.9,
                        beta2: 0.95,
                        eps: 1e-8,
                        weight_decay: 0.1,
                        step,
                        grad_scale,
                    };
                    let copy = copy_dtype.map_or("none".to_string(), |d| d.to_string());
                    let case = format!(
                        "n={n} grad {grad_dtype} param_copy {copy} step={step} grad_scale={grad_scale}"
                    );
                    cx.case(case, |t, rng| {
                        let grad = t.input("grad", &uniform(rng, n, 1.0), grad_dtype)?;
                        let param = t.in_place("param", &uniform(rng, n, 1.0), DType::F32)?;
                        // Moments as after some training: m mostly positive, v >= 0.
                        let m = t.in_place("m", &between(rng, n, -0.02, 0.05), DType::F32)?;
                        let v = t.in_place("v", &between(rng, n, 0.0, 3e-3), DType::F32)?;
                        let copy = match copy_dtype {
                            Some(d) => Some(t.overwritten("param_copy", n, d)?),
                            None => None,
                        };
                        t.run(
                            |be| {
                                let c = copy.as_ref().map(|c| &c.s);
                                be.adamw(&param.s, &grad.s, &m.s, &v.s, c, &hp)
                            },
                            |be| {
                                let c = copy.as_ref().map(|c| &c.r);
                                be.adamw(&param.r, &grad.r, &m.r, &v.r, c, &hp)
                            },
                        )
                    });
                }
            }
        }
    }
}

/// (buffer length, pieces as (offset, len, decays)): one piece, pieces that touch, gaps before,
/// between and after, and a long piece beside short ones (a block's matrices and biases).
type Pieces = &'static [(usize, usize, bool)];
const SEGMENT_CASES: [(usize, Pieces); 4] = [
    (1, &[(0, 1, true)]),
    (300, &[(0, 100, true), (100, 7, false), (107, 193, true)]),
    (
        1000,
        &[
            (3, 250, false),
            (260, 1, true),
            (261, 512, true),
            (900, 99, false),
        ],
    ),
    (
        5000,
        &[(0, 4096, true), (4100, 33, false), (4200, 768, false)],
    ),
];

pub(super) fn adamw_segments<S: Backend>(cx: &mut Ctx<'_, S>) {
    for (n, pieces) in SEGMENT_CASES {
        let segments: Vec<AdamWSegment> = pieces
            .iter()
            .map(|&(offset, len, decay)| AdamWSegment { offset, len, decay })
            .collect();
        for grad_dtype in [DType::F32, DType::Bf16] {
            for copy_dtype in [None, Some(DType::Bf16)] {
                // A large step and decay, so that a piece updated with the wrong decay, or a gap
                // updated at all, is off by more than the bf16 cases' tolerance.
                let hp = AdamWStep {
                    lr: 0.05,
                    beta1: 0.9,
                    beta2: 0.95,
                    eps: 1e-8,
                    weight_decay: 0.5,
                    step: 3,
                    grad_scale: 0.8,
                };
                let copy = copy_dtype.map_or("none".to_string(), |d| d.to_string());
                let case = format!(
                    "n={n} {} pieces grad {grad_dtype} param_copy {copy}",
                    segments.len()
                );
                let segments = segments.clone();
                cx.case(case, move |t, rng| {
                    let grad = t.input("grad", &uniform(rng, n, 1.0), grad_dtype)?;
                    let param = t.in_place("param", &uniform(rng, n, 1.0), DType::F32)?;
                    let m = t.in_place("m", &between(rng, n, -0.02, 0.05), DType::F32)?;
                    let v = t.in_place("v", &between(rng, n, 0.0, 3e-3), DType::F32)?;
                    // In place, not overwritten: the gaps must keep their values.
                    let copy = match copy_dtype {
                        Some(d) => Some(t.in_place("param_copy", &uniform(rng, n, 1.0), d)?),
                        None => None,
                    };
                    t.run(
                        |be| {
                            let c = copy.as_ref().map(|c| &c.s);
                            be.adamw_segments(&param.s, &grad.s, &m.s, &v.s, c, &segments, &hp)
                        },
                        |be| {
                            let c = copy.as_ref().map(|c| &c.r);
                            be.adamw_segments(&param.r, &grad.r, &m.r, &v.r, c, &segments, &hp)
                        },
                    )
                });
            }
        }
    }
}

pub(super) fn sum_squares<S: Backend>(cx: &mut Ctx<'_, S>) {
    for n in [1, 1000, 100_003] {
        for dtype in [DType::F32, DType::Bf16] {
            cx.case(format!("n={n} {dtype}"), |t, rng| {
                let x = t.input("x", &uniform(rng, n, 1.0), dtype)?;
                let acc = t.in_place("acc", &between(rng, 1, 0.5, 5.0), DType::F32)?;
                t.run(
                    |be| be.sum_squares(&acc.s, &x.s),
                    |be| be.sum_squares(&acc.r, &x.r),
                )
            });
        }
    }
}
