//! Cases of the fused softmax + cross-entropy: vocabularies of 2 to 1000, f32 and bf16 logits,
//! losses only (`logits` must come back unchanged) and losses with the gradient written in place.

use crate::backend::{Backend, DType};
use crate::check::harness::Ctx;
use crate::check::random::{ids, normal};

/// (rows, vocab).
const SHAPES: [(usize, usize); 4] = [(1, 2), (7, 5), (33, 257), (64, 1000)];

pub(super) fn cross_entropy<S: Backend>(cx: &mut Ctx<'_, S>) {
    for (rows, vocab) in SHAPES {
        for dtype in [DType::F32, DType::Bf16] {
            // The trainer's scale: the mean over a batch (here, over more rows than this one).
            for grad_scale in [None, Some(0.5 / rows as f32)] {
                let grad = match grad_scale {
                    Some(s) => format!("grad_scale={s:.4}"),
                    None => "no grad".to_string(),
                };
                cx.case(
                    format!("rows={rows} vocab={vocab} {dtype} {grad}"),
                    |t, rng| {
                        let targets = t.ids(&ids(rng, rows, vocab))?;
                        let logits =
                            t.in_place("logits", &normal(rng, rows * vocab, 2.0), dtype)?;
                        let losses = t.overwritten("losses", rows, DType::F32)?;
                        t.run(
                            |be| {
                                let (l, g) = (&losses.s, &logits.s);
                                be.cross_entropy(l, g, &targets.s, rows, vocab, grad_scale)
                            },
                            |be| {
                                let (l, g) = (&losses.r, &logits.r);
                                be.cross_entropy(l, g, &targets.r, rows, vocab, grad_scale)
                            },
                        )
                    },
                );
            }
        }
    }
}
