//! Cases of the fused softmax + cross-entropy: vocabularies of 1 to GPT-2's padded 50304, f32 and
//! bf16 logits, losses only (`logits` must come back unchanged) and losses with the gradient
//! written in place.

use crate::backend::{Backend, DType};
use crate::check::harness::Ctx;
use crate::check::random::{ids, normal};

/// (rows, vocab, elements before the logits in their allocation). Odd vocabularies start each row
/// at a different 16-byte phase (the kernel reads a scalar head, vectors, a scalar tail); vocab 1
/// is all head; the offset case misaligns rows that would otherwise all be aligned. The first four
/// come first so that they keep the random values they always had (the cases share one stream).
const SHAPES: [(usize, usize, usize); 8] = [
    (1, 2, 0),
    (7, 5, 0),
    (33, 257, 0),
    (64, 1000, 0),
    (1, 1, 0),
    (5, 17, 0),
    (5, 1000, 3),
    (3, 50304, 0),
];

pub(super) fn cross_entropy<S: Backend>(cx: &mut Ctx<'_, S>) {
    for (rows, vocab, offset) in SHAPES {
        for dtype in [DType::F32, DType::Bf16] {
            // The trainer's scale: the mean over a batch (here, over more rows than this one).
            for grad_scale in [None, Some(0.5 / rows as f32)] {
                let grad = match grad_scale {
                    Some(s) => format!("grad_scale={s:.4}"),
                    None => "no grad".to_string(),
                };
                let at = if offset > 0 {
                    format!(" offset={offset}")
                } else {
                    String::new()
                };
                cx.case(
                    format!("rows={rows} vocab={vocab}{at} {dtype} {grad}"),
                    |t, rng| {
                        t.offset_views(offset);
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
