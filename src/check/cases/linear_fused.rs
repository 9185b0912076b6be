//! Cases of the linear layers fused with what follows them (cuBLASLt epilogues on CUDA): the
//! matmul + GELU forward, the matmul + GELU backward with the bias gradient, the weight gradient
//! with the bias gradient, and the matmul writing the residual stream. Shapes mix sizes of 1, 3,
//! 17, 65 and 130 with row lengths that are multiples of 8 (where the GELU epilogues' auxiliary
//! matrix fits, so the fused path runs) and that are not (where CUDA falls back to unfused ops).

use crate::backend::{Backend, DType, MatmulSpec};
use crate::check::harness::Ctx;
use crate::check::random::uniform;

/// (m, n, k).
const SHAPES: [(usize, usize, usize); 7] = [
    (1, 1, 1),
    (3, 17, 65),
    (17, 8, 3),
    (65, 136, 17),
    (130, 64, 130),
    (1, 24, 17),
    (130, 3, 1),
];

/// (label, dtype of a and b, dtype of the outputs).
const PRECISIONS: [(&str, DType, DType); 2] = [
    ("f32", DType::F32, DType::F32),
    ("bf16", DType::Bf16, DType::Bf16),
];

/// The product of a linear layer's forward, `inp [m, k] · wᵀ` with `w` stored `[n, k]`.
fn forward_spec(m: usize, n: usize, k: usize) -> MatmulSpec {
    MatmulSpec {
        m,
        n,
        k,
        trans_a: false,
        trans_b: true,
        accumulate: false,
    }
}

pub(super) fn matmul_gelu<S: Backend>(cx: &mut Ctx<'_, S>) {
    for (m, n, k) in SHAPES {
        for (label, ab, out_dtype) in PRECISIONS {
            for bias in [false, true] {
                let plus = if bias { "+bias" } else { "" };
                cx.case(
                    format!("m={m} n={n} k={k} gelu(a*bT{plus}), {label}"),
                    |t, rng| {
                        let a = t.input("a", &uniform(rng, m * k, 1.0), ab)?;
                        let b = t.input("b", &uniform(rng, n * k, 1.0), ab)?;
                        let bias = match bias {
                            true => Some(t.input("bias", &uniform(rng, n, 1.0), out_dtype)?),
                            false => None,
                        };
                        let out = t.overwritten("out", m * n, out_dtype)?;
                        let pre = t.overwritten("pre", m * n, out_dtype)?;
                        let spec = forward_spec(m, n, k);
                        t.run(
                            |be| {
                                let bias = bias.as_ref().map(|x| &x.s);
                                be.matmul_gelu(&out.s, &pre.s, &a.s, &b.s, bias, spec)
                            },
                            |be| {
                                let bias = bias.as_ref().map(|x| &x.r);
                                be.matmul_gelu(&out.r, &pre.r, &a.r, &b.r, bias, spec)
                            },
                        )
                    },
                );
            }
        }
    }
}

pub(super) fn matmul_dgelu<S: Backend>(cx: &mut Ctx<'_, S>) {
    for (m, n, k) in SHAPES {
        for (label, ab, out_dtype) in PRECISIONS {
            let mut dbias_dtypes = vec![None, Some(DType::F32)];
            if out_dtype != DType::F32 {
                dbias_dtypes.push(Some(out_dtype));
            }
            for dbias_dtype in dbias_dtypes {
                let with = match dbias_dtype {
                    Some(d) => format!(" + dbias {d} acc"),
                    None => String::new(),
                };
                cx.case(
                    format!("m={m} n={n} k={k} dgelu(dy*w){with}, {label}"),
                    |t, rng| {
                        // dy [m, k] · w [k, n]: the input gradient of the layer after the GELU.
                        let a = t.input("a", &uniform(rng, m * k, 1.0), ab)?;
                        let b = t.input("b", &uniform(rng, k * n, 1.0), ab)?;
                        // GELU inputs over both tails.
                        let pre = t.input("pre", &uniform(rng, m * n, 4.0), out_dtype)?;
                        let dbias = match dbias_dtype {
                            Some(d) => Some(t.in_place("dbias", &uniform(rng, n, 1.0), d)?),
                            None => None,
                        };
                        let dpre = t.overwritten("dpre", m * n, out_dtype)?;
                        let spec = MatmulSpec {
                            m,
                            n,
                            k,
                            trans_a: false,
                            trans_b: false,
                            accumulate: false,
                        };
                        t.run(
                            |be| {
                                let dbias = dbias.as_ref().map(|x| &x.s);
                                be.matmul_dgelu(&dpre.s, dbias, &a.s, &b.s, &pre.s, spec)
                            },
                            |be| {
                                let dbias = dbias.as_ref().map(|x| &x.r);
                                be.matmul_dgelu(&dpre.r, dbias, &a.r, &b.r, &pre.r, spec)
                            },
                        )
                    },
                );
            }
        }
    }
}

pub(super) fn matmul_bias_grad<S: Backend>(cx: &mut Ctx<'_, S>) {
    // (label, dtype of a and b, dtype of out and dbias): the model's f32, bf16 and bf16 with f32
    // gradients.
    let precisions = [
        ("f32", DType::F32, DType::F32),
        ("bf16", DType::Bf16, DType::Bf16),
        ("a,b bf16 out f32", DType::Bf16, DType::F32),
    ];
    for (m, n, k) in SHAPES {
        for (label, ab, out_dtype) in precisions {
            for trans_b in [false, true] {
                for accumulate in [false, true] {
                    let spec = MatmulSpec {
                        m,
                        n,
                        k,
                        trans_a: true,
                        trans_b,
                        accumulate,
                    };
                    let bt = if trans_b { "bT" } else { "b" };
                    let acc = if accumulate { " acc" } else { "" };
                    cx.case(
                        format!("m={m} n={n} k={k} aT*{bt}{acc} + dbias, {label}"),
                        |t, rng| {
                            let a = t.input("a", &uniform(rng, k * m, 1.0), ab)?;
                            let b = t.input("b", &uniform(rng, k * n, 1.0), ab)?;
                            let out = match accumulate {
                                true => t.in_place("out", &uniform(rng, m * n, 1.0), out_dtype)?,
                                false => t.overwritten("out", m * n, out_dtype)?,
                            };
                            // Gradients accumulate: dbias always starts from values of its own.
                            let dbias = t.in_place("dbias", &uniform(rng, m, 1.0), out_dtype)?;
                            t.run(
                                |be| be.matmul_bias_grad(&out.s, &dbias.s, &a.s, &b.s, spec),
                                |be| be.matmul_bias_grad(&out.r, &dbias.r, &a.r, &b.r, spec),
                            )
                        },
                    );
                }
            }
        }
    }
}

pub(super) fn matmul_residual<S: Backend>(cx: &mut Ctx<'_, S>) {
    for (m, n, k) in SHAPES {
        for (label, ab, out_dtype) in PRECISIONS {
            for bias in [false, true] {
                let plus = if bias { "+bias" } else { "" };
                cx.case(
                    format!("m={m} n={n} k={k} residual + a*bT{plus}, {label}"),
                    |t, rng| {
                        let a = t.input("a", &uniform(rng, m * k, 1.0), ab)?;
                        let b = t.input("b", &uniform(rng, n * k, 1.0), ab)?;
                        let bias = match bias {
                            true => Some(t.input("bias", &uniform(rng, n, 1.0), out_dtype)?),
                            false => None,
                        };
                        let residual = t.input("residual", &uniform(rng, m * n, 2.0), out_dtype)?;
                        let out = t.overwritten("out", m * n, out_dtype)?;
                        let spec = forward_spec(m, n, k);
                        t.run(
                            |be| {
                                let bias = bias.as_ref().map(|x| &x.s);
                                be.matmul_residual(&out.s, &residual.s, &a.s, &b.s, bias, spec)
                            },
                            |be| {
                                let bias = bias.as_ref().map(|x| &x.r);
                                be.matmul_residual(&out.r, &residual.r, &a.r, &b.r, bias, spec)
                            },
                        )
                    },
                );
            }
        }
    }
}
