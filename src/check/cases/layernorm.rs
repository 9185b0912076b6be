//! Cases of LayerNorm forward and backward: f32, bf16, and the mixed-precision model's bf16
//! activations with f32 parameter gradients. `mean` and `rstd` are always f32.

use anyhow::Result;
use rand::RngExt;
use rand_chacha::ChaCha8Rng;

use crate::backend::cpu::CpuBuf;
use crate::backend::{Backend, Buffer, DType};
use crate::check::harness::{Ctx, Reference};
use crate::check::random::{signed, uniform};

/// (rows, cols): the vector path (cols a multiple of 8) and the scalar one (1, 7, 200 in bf16),
/// a warp per row (up to 1024 f32 or bf16 columns), a small block per row (1600), many rows per
/// backward chunk (2000), and rows too wide for registers (16400: the `_wide` kernels; 9000 takes
/// them in the backward only).
const SHAPES: [(usize, usize); 12] = [
    (3, 2),
    (1, 1),
    (3, 7),
    (257, 8),
    (5, 64),
    (33, 200),
    (64, 768),
    (2000, 64),
    (3, 1000),
    (3, 1600),
    (2, 9000),
    (2, 16400),
];

/// Shapes checked again with every operand a view one element into its allocation: not 16-byte
/// aligned, so the kernels must take their scalar path although the width would allow vectors.
const OFFSET_SHAPES: [(usize, usize); 2] = [(3, 64), (9, 768)];

/// Every shape, then the offset ones: (rows, cols, elements before each operand).
fn shapes() -> impl Iterator<Item = (usize, usize, usize)> {
    let plain = SHAPES.iter().map(|&(r, c)| (r, c, 0));
    plain.chain(OFFSET_SHAPES.iter().map(|&(r, c)| (r, c, 1)))
}

fn label(rows: usize, cols: usize, offset: usize) -> String {
    match offset {
        0 => format!("rows={rows} cols={cols}"),
        o => format!("rows={rows} cols={cols} offset={o}"),
    }
}

/// Rows with their own offset and spread, so the mean and variance matter.
fn rows_of(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Vec<f32> {
    let mut x = Vec::with_capacity(rows * cols);
    for _ in 0..rows {
        let offset = signed(rng, 0.0, 2.0);
        let spread = rng.random_range(0.3f32..3.0);
        x.extend(uniform(rng, cols, spread).into_iter().map(|v| v + offset));
    }
    x
}

pub(super) fn forward<S: Backend>(cx: &mut Ctx<'_, S>) {
    for (rows, cols, offset) in shapes() {
        for dtype in [DType::F32, DType::Bf16] {
            cx.case(
                format!("{} {dtype}", label(rows, cols, offset)),
                |t, rng| {
                    t.offset_views(offset);
                    let inp = t.input("inp", &rows_of(rng, rows, cols), dtype)?;
                    let weight = t.input("weight", &uniform(rng, cols, 1.5), dtype)?;
                    let bias = t.input("bias", &uniform(rng, cols, 0.5), dtype)?;
                    let out = t.overwritten("out", rows * cols, dtype)?;
                    let mean = t.overwritten("mean", rows, DType::F32)?;
                    let rstd = t.overwritten("rstd", rows, DType::F32)?;
                    t.run(
                        |be| {
                            let (o, m, r) = (&out.s, &mean.s, &rstd.s);
                            be.layernorm_forward(o, m, r, &inp.s, &weight.s, &bias.s, rows, cols)
                        },
                        |be| {
                            let (o, m, r) = (&out.r, &mean.r, &rstd.r);
                            be.layernorm_forward(o, m, r, &inp.r, &weight.r, &bias.r, rows, cols)
                        },
                    )
                },
            );
        }
    }
}

/// The reference forward's `mean` and `rstd` of `inp`, the statistics its backward is given.
fn reference_stats(
    be: &Reference,
    inp: &CpuBuf<f64>,
    weight: &CpuBuf<f64>,
    rows: usize,
    cols: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let out = be.alloc(rows * cols, weight.dtype())?;
    let bias = be.alloc(cols, weight.dtype())?;
    let mean = be.alloc(rows, DType::F32)?;
    let rstd = be.alloc(rows, DType::F32)?;
    be.layernorm_forward(&out, &mean, &rstd, inp, weight, &bias, rows, cols)?;
    Ok((be.download(&mean)?, be.download(&rstd)?))
}

pub(super) fn backward<S: Backend>(cx: &mut Ctx<'_, S>) {
    // (activation dtype: dinp, dout, inp, weight; parameter-gradient dtype: dweight, dbias).
    let precisions = [
        (DType::F32, DType::F32, "f32"),
        (DType::Bf16, DType::Bf16, "bf16"),
        (DType::Bf16, DType::F32, "bf16, dweight/dbias f32"),
    ];
    for (rows, cols, offset) in shapes() {
        for (act, grad, precision) in precisions {
            cx.case(
                format!("{} {precision}", label(rows, cols, offset)),
                |t, rng| {
                    t.offset_views(offset);
                    let inp = t.input("inp", &rows_of(rng, rows, cols), act)?;
                    let weight = t.input("weight", &uniform(rng, cols, 1.5), act)?;
                    let dout = t.input("dout", &uniform(rng, rows * cols, 1.0), act)?;
                    let (mean, rstd) =
                        reference_stats(t.reference(), &inp.r, &weight.r, rows, cols)?;
                    let mean = t.input("mean", &mean, DType::F32)?;
                    let rstd = t.input("rstd", &rstd, DType::F32)?;
                    let dinp = t.in_place("dinp", &uniform(rng, rows * cols, 1.0), act)?;
                    let dweight = t.in_place("dweight", &uniform(rng, cols, 1.0), grad)?;
                    let dbias = t.in_place("dbias", &uniform(rng, cols, 1.0), grad)?;
                    t.run(
                        |be| {
                            let (dx, dw, db) = (&dinp.s, &dweight.s, &dbias.s);
                            let (dy, x, w) = (&dout.s, &inp.s, &weight.s);
                            be.layernorm_backward(
                                dx, dw, db, dy, x, w, &mean.s, &rstd.s, rows, cols,
                            )
                        },
                        |be| {
                            let (dx, dw, db) = (&dinp.r, &dweight.r, &dbias.r);
                            let (dy, x, w) = (&dout.r, &inp.r, &weight.r);
                            be.layernorm_backward(
                                dx, dw, db, dy, x, w, &mean.r, &rstd.r, rows, cols,
                            )
                        },
                    )
                },
            );
        }
    }
}
