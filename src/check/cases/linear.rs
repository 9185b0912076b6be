//! Cases of the matrix product (every transpose, with and without bias, overwriting and
//! accumulating, at the model's three precisions) and of the bias gradient.

use crate::backend::{Backend, DType, MatmulSpec};
use crate::check::harness::Ctx;
use crate::check::random::uniform;

/// (m, n, k): unit, small primes, tile-sized and not-quite-tile-sized.
const MATMUL_SHAPES: [(usize, usize, usize); 4] =
    [(1, 1, 1), (7, 13, 5), (64, 96, 80), (130, 200, 65)];

/// Operand precisions of a product as the model issues them.
struct Precision {
    /// Dtype of `a` and `b`.
    ab: DType,
    /// Dtype of `out` and `bias`.
    out: DType,
    /// Whether this precision comes with a bias (weight-gradient products have none).
    bias: bool,
    label: &'static str,
}

const PRECISIONS: [Precision; 3] = [
    Precision {
        ab: DType::F32,
        out: DType::F32,
        bias: true,
        label: "f32",
    },
    Precision {
        ab: DType::Bf16,
        out: DType::Bf16,
        bias: true,
        label: "bf16",
    },
    Precision {
        ab: DType::Bf16,
        out: DType::F32,
        bias: false,
        label: "a,b bf16 out f32",
    },
];

pub(super) fn matmul<S: Backend>(cx: &mut Ctx<'_, S>) {
    for (m, n, k) in MATMUL_SHAPES {
        for p in &PRECISIONS {
            for (trans_a, trans_b) in [(false, false), (false, true), (true, false), (true, true)] {
                for bias in [false, true] {
                    if bias && !p.bias {
                        continue;
                    }
                    for accumulate in [false, true] {
                        let spec = MatmulSpec {
                            m,
                            n,
                            k,
                            trans_a,
                            trans_b,
                            accumulate,
                        };
                        cx.case(describe(&spec, bias, p.label), |t, rng| {
                            let a = t.input("a", &uniform(rng, m * k, 1.0), p.ab)?;
                            let b = t.input("b", &uniform(rng, k * n, 1.0), p.ab)?;
                            let bias = match bias {
                                true => Some(t.input("bias", &uniform(rng, n, 1.0), p.out)?),
                                false => None,
                            };
                            let out = match accumulate {
                                true => t.in_place("out", &uniform(rng, m * n, 1.0), p.out)?,
                                false => t.overwritten("out", m * n, p.out)?,
                            };
                            t.run(
                                |be| {
                                    be.matmul(&out.s, &a.s, &b.s, bias.as_ref().map(|x| &x.s), spec)
                                },
                                |be| {
                                    be.matmul(&out.r, &a.r, &b.r, bias.as_ref().map(|x| &x.r), spec)
                                },
                            )
                        });
                    }
                }
            }
        }
    }
}

/// For example `m=7 n=13 k=5 aT*b+bias acc, f32`.
fn describe(spec: &MatmulSpec, bias: bool, precision: &str) -> String {
    format!(
        "m={} n={} k={} {}*{}{}{}, {precision}",
        spec.m,
        spec.n,
        spec.k,
        if spec.trans_a { "aT" } else { "a" },
        if spec.trans_b { "bT" } else { "b" },
        if bias { "+bias" } else { "" },
        if spec.accumulate { " acc" } else { "" },
    )
}

/// (rows, cols).
const BIAS_SHAPES: [(usize, usize); 4] = [(1, 1), (5, 7), (64, 96), (300, 769)];

pub(super) fn bias_backward<S: Backend>(cx: &mut Ctx<'_, S>) {
    for (rows, cols) in BIAS_SHAPES {
        // (dbias, dout) dtypes.
        for (dbias_dtype, dout_dtype) in [
            (DType::F32, DType::F32),
            (DType::F32, DType::Bf16),
            (DType::Bf16, DType::Bf16),
        ] {
            let case = format!("rows={rows} cols={cols}, dbias {dbias_dtype} dout {dout_dtype}");
            cx.case(case, |t, rng| {
                let dout = t.input("dout", &uniform(rng, rows * cols, 1.0), dout_dtype)?;
                let dbias = t.in_place("dbias", &uniform(rng, cols, 1.0), dbias_dtype)?;
                t.run(
                    |be| be.bias_backward(&dbias.s, &dout.s, rows, cols),
                    |be| be.bias_backward(&dbias.r, &dout.r, rows, cols),
                )
            });
        }
    }
}
