//! Cases of the token + position embedding, forward and backward. Ids are random below the
//! vocabulary and always include a repeat; the position table has more rows than the sequence,
//! and the backward must leave the rows past `seq` alone.

use crate::backend::{Backend, DType};
use crate::check::harness::Ctx;
use crate::check::random::{ids, uniform};

/// (batch, seq, channels, vocab, positions in the table).
const SHAPES: [(usize, usize, usize, usize, usize); 4] = [
    (1, 1, 5, 3, 2),
    (2, 17, 64, 50, 20),
    (3, 65, 33, 257, 80),
    (2, 130, 200, 1000, 160),
];

fn describe(shape: (usize, usize, usize, usize, usize)) -> String {
    let (batch, seq, channels, vocab, positions) = shape;
    format!("batch={batch} seq={seq} channels={channels} vocab={vocab} positions={positions}")
}

pub(super) fn forward<S: Backend>(cx: &mut Ctx<'_, S>) {
    for shape in SHAPES {
        let (batch, seq, channels, vocab, positions) = shape;
        for dtype in [DType::F32, DType::Bf16] {
            cx.case(format!("{} {dtype}", describe(shape)), |t, rng| {
                let ids = t.ids(&ids(rng, batch * seq, vocab))?;
                let wte = t.input("wte", &uniform(rng, vocab * channels, 1.0), dtype)?;
                let wpe = t.input("wpe", &uniform(rng, positions * channels, 1.0), dtype)?;
                let out = t.overwritten("out", batch * seq * channels, dtype)?;
                t.run(
                    |be| be.embedding_forward(&out.s, &ids.s, &wte.s, &wpe.s, batch, seq, channels),
                    |be| be.embedding_forward(&out.r, &ids.r, &wte.r, &wpe.r, batch, seq, channels),
                )
            });
        }
    }
}

pub(super) fn backward<S: Backend>(cx: &mut Ctx<'_, S>) {
    for shape in SHAPES {
        let (batch, seq, channels, vocab, positions) = shape;
        // (dwte and dwpe, dout) dtypes.
        for (grad, dout_dtype) in [
            (DType::F32, DType::F32),
            (DType::F32, DType::Bf16),
            (DType::Bf16, DType::Bf16),
            (DType::Bf16, DType::F32),
        ] {
            let case = format!("{}, grads {grad} dout {dout_dtype}", describe(shape));
            cx.case(case, |t, rng| {
                let ids = t.ids(&ids(rng, batch * seq, vocab))?;
                let n_out = batch * seq * channels;
                let dout = t.input("dout", &uniform(rng, n_out, 1.0), dout_dtype)?;
                let dwte = t.in_place("dwte", &uniform(rng, vocab * channels, 1.0), grad)?;
                let dwpe = t.in_place("dwpe", &uniform(rng, positions * channels, 1.0), grad)?;
                t.run(
                    |be| {
                        let (dt, dp) = (&dwte.s, &dwpe.s);
                        be.embedding_backward(dt, dp, &dout.s, &ids.s, batch, seq, channels)
                    },
                    |be| {
                        let (dt, dp) = (&dwte.r, &dwpe.r);
                        be.embedding_backward(dt, dp, &dout.r, &ids.r, batch, seq, channels)
                    },
                )
            });
        }
    }
}
