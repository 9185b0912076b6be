//! Cases of the tanh-GELU forward and backward, f32 and bf16, inputs up to |x| = 6 (both tails).

use crate::backend::{Backend, DType};
use crate::check::harness::Ctx;
use crate::check::random::uniform;

const LENS: [usize; 3] = [1, 1000, 4099];
const DTYPES: [DType; 2] = [DType::F32, DType::Bf16];

pub(super) fn forward<S: Backend>(cx: &mut Ctx<'_, S>) {
    for n in LENS {
        for dtype in DTYPES {
            cx.case(format!("n={n} {dtype}"), |t, rng| {
                let inp = t.input("inp", &uniform(rng, n, 6.0), dtype)?;
                let out = t.overwritten("out", n, dtype)?;
                t.run(
                    |be| be.gelu_forward(&out.s, &inp.s),
                    |be| be.gelu_forward(&out.r, &inp.r),
                )
            });
        }
    }
}

pub(super) fn backward<S: Backend>(cx: &mut Ctx<'_, S>) {
    for n in LENS {
        for dtype in DTYPES {
            cx.case(format!("n={n} {dtype}"), |t, rng| {
                let inp = t.input("inp", &uniform(rng, n, 6.0), dtype)?;
                let dout = t.input("dout", &uniform(rng, n, 1.0), dtype)?;
                let dinp = t.overwritten("dinp", n, dtype)?;
                t.run(
                    |be| be.gelu_backward(&dinp.s, &inp.s, &dout.s),
                    |be| be.gelu_backward(&dinp.r, &inp.r, &dout.r),
                )
            });
        }
    }
}
