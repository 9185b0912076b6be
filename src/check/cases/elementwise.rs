//! Cases of fill, copy, scale, add and accumulate: every dtype and dtype pair, lengths 1, odd and
//! a few thousand.

use crate::backend::{Backend, DType};
use crate::check::harness::Ctx;
use crate::check::random::{signed, uniform};

const LENS: [usize; 3] = [1, 1000, 4099];
const DTYPES: [DType; 2] = [DType::F32, DType::Bf16];
/// (destination, source) dtypes.
const PAIRS: [(DType, DType); 4] = [
    (DType::F32, DType::F32),
    (DType::F32, DType::Bf16),
    (DType::Bf16, DType::F32),
    (DType::Bf16, DType::Bf16),
];

pub(super) fn fill<S: Backend>(cx: &mut Ctx<'_, S>) {
    for n in LENS {
        for dtype in DTYPES {
            let value = signed(cx.rng(), 0.1, 3.0);
            cx.case(format!("n={n} {dtype} value={value:.4}"), |t, _| {
                let dst = t.overwritten("dst", n, dtype)?;
                t.run(|be| be.fill(&dst.s, value), |be| be.fill(&dst.r, value))
            });
        }
    }
}

pub(super) fn copy<S: Backend>(cx: &mut Ctx<'_, S>) {
    for n in LENS {
        for (dst_dtype, src_dtype) in PAIRS {
            cx.case(format!("n={n} {src_dtype} -> {dst_dtype}"), |t, rng| {
                let src = t.input("src", &uniform(rng, n, 2.0), src_dtype)?;
                let dst = t.overwritten("dst", n, dst_dtype)?;
                t.run(|be| be.copy(&dst.s, &src.s), |be| be.copy(&dst.r, &src.r))
            });
        }
    }
}

pub(super) fn scale<S: Backend>(cx: &mut Ctx<'_, S>) {
    for n in LENS {
        for dtype in DTYPES {
            let alpha = signed(cx.rng(), 0.05, 2.0);
            cx.case(format!("n={n} {dtype} alpha={alpha:.4}"), |t, rng| {
                let dst = t.in_place("dst", &uniform(rng, n, 1.0), dtype)?;
                t.run(|be| be.scale(&dst.s, alpha), |be| be.scale(&dst.r, alpha))
            });
        }
    }
}

pub(super) fn add<S: Backend>(cx: &mut Ctx<'_, S>) {
    for n in LENS {
        for dtype in DTYPES {
            cx.case(format!("n={n} {dtype}"), |t, rng| {
                let a = t.input("a", &uniform(rng, n, 1.0), dtype)?;
                let b = t.input("b", &uniform(rng, n, 1.0), dtype)?;
                let out = t.overwritten("out", n, dtype)?;
                t.run(
                    |be| be.add(&out.s, &a.s, &b.s),
                    |be| be.add(&out.r, &a.r, &b.r),
                )
            });
        }
    }
}

pub(super) fn accumulate<S: Backend>(cx: &mut Ctx<'_, S>) {
    for n in LENS {
        for (dst_dtype, src_dtype) in PAIRS {
            cx.case(format!("n={n} {dst_dtype} += {src_dtype}"), |t, rng| {
                let src = t.input("src", &uniform(rng, n, 1.0), src_dtype)?;
                let dst = t.in_place("dst", &uniform(rng, n, 1.0), dst_dtype)?;
                t.run(
                    |be| be.accumulate(&dst.s, &src.s),
                    |be| be.accumulate(&dst.r, &src.r),
                )
            });
        }
    }
}
