//! Cases of causal attention forward and backward: head sizes 32, 64 and 128, sequences of 1 to 130
//! (one token, odd, a tile, a tile plus one, two tiles plus two; head size 128 has tiles of 32),
//! f32 and bf16, and for the backward the tensor-core kernels' tiles of 64 (sequences 64 to 257 at
//! head sizes 64 and 128). `lse` is f32.

use anyhow::Result;

use crate::backend::cpu::CpuBuf;
use crate::backend::{AttentionShape, Backend, DType};
use crate::check::harness::{Ctx, Reference};
use crate::check::random::{normal, uniform};

/// (batch, seq, heads, head_dim).
const SHAPES: [(usize, usize, usize, usize); 13] = [
    (1, 1, 1, 32),
    (1, 1, 2, 64),
    (2, 17, 3, 32),
    (1, 17, 1, 64),
    (1, 64, 2, 32),
    (2, 64, 1, 64),
    (2, 65, 2, 32),
    (1, 65, 3, 64),
    (1, 130, 1, 32),
    (2, 130, 2, 64),
    (1, 1, 1, 128),
    (1, 33, 2, 128),
    (2, 66, 1, 128),
];

/// Backward only, for the tensor-core kernels' tiles of 64 (bf16 at head sizes 64 and 128): one
/// tile, one short of two, two, two plus one, a partial third, four plus one.
const BACKWARD_TILE_SHAPES: [(usize, usize, usize, usize); 12] = [
    (2, 64, 2, 64),
    (2, 127, 2, 64),
    (2, 128, 2, 64),
    (2, 129, 2, 64),
    (2, 200, 2, 64),
    (2, 257, 2, 64),
    (2, 64, 2, 128),
    (2, 127, 2, 128),
    (2, 128, 2, 128),
    (2, 129, 2, 128),
    (2, 200, 2, 128),
    (2, 257, 2, 128),
];

fn shapes() -> impl Iterator<Item = (AttentionShape, DType)> {
    with_dtypes(&SHAPES)
}

fn with_dtypes(
    list: &'static [(usize, usize, usize, usize)],
) -> impl Iterator<Item = (AttentionShape, DType)> {
    list.iter()
        .copied()
        .flat_map(|(batch, seq, heads, head_dim)| {
            let shape = AttentionShape {
                batch,
                seq,
                heads,
                head_dim,
            };
            [(shape, DType::F32), (shape, DType::Bf16)]
        })
}

/// Forward only: the tiling of the tensor-core kernel (bf16 at head sizes 64 and 128; query and key
/// tiles of 64, double-buffered): one whole tile, one short of and one past a tile, two tiles,
/// partial last tiles of 8 and 1 rows, five tiles (both pipeline stages reused twice).
const FORWARD_TILING_SHAPES: [(usize, usize, usize, usize); 12] = [
    (2, 64, 2, 64),
    (2, 127, 2, 64),
    (2, 128, 2, 64),
    (2, 129, 2, 64),
    (2, 200, 2, 64),
    (2, 257, 2, 64),
    (2, 64, 2, 128),
    (2, 127, 2, 128),
    (2, 128, 2, 128),
    (2, 129, 2, 128),
    (2, 200, 2, 128),
    (2, 257, 2, 128),
];

fn forward_tiling_shapes() -> impl Iterator<Item = (AttentionShape, DType)> {
    FORWARD_TILING_SHAPES
        .into_iter()
        .flat_map(|(batch, seq, heads, head_dim)| {
            let shape = AttentionShape {
                batch,
                seq,
                heads,
                head_dim,
            };
            [(shape, DType::F32), (shape, DType::Bf16)]
        })
}

fn describe(s: &AttentionShape, dtype: DType) -> String {
    format!(
        "batch={} seq={} heads={} head_dim={} {dtype}",
        s.batch, s.seq, s.heads, s.head_dim
    )
}

/// Elements of `qkv`, of `out`, and of `lse`.
fn sizes(s: &AttentionShape) -> (usize, usize, usize) {
    let tokens = s.batch * s.seq;
    (
        tokens * 3 * s.channels(),
        tokens * s.channels(),
        tokens * s.heads,
    )
}

// Queries and keys N(0, 1): scaled scores then have unit spread, so the softmax is neither uniform
// nor one-hot.

pub(super) fn forward<S: Backend>(cx: &mut Ctx<'_, S>) {
    for (shape, dtype) in shapes().chain(forward_tiling_shapes()) {
        cx.case(describe(&shape, dtype), |t, rng| {
            let (n_qkv, n_out, n_lse) = sizes(&shape);
            let qkv = t.input("qkv", &normal(rng, n_qkv, 1.0), dtype)?;
            let out = t.overwritten("out", n_out, dtype)?;
            let lse = t.overwritten("lse", n_lse, DType::F32)?;
            t.run(
                |be| be.attention_forward(&out.s, &lse.s, &qkv.s, shape),
                |be| be.attention_forward(&out.r, &lse.r, &qkv.r, shape),
            )
        });
    }
}

/// The reference forward's `out` and `lse` for `qkv`: the backward's inputs on both backends, so
/// only the backward is compared.
fn reference_forward(
    be: &Reference,
    qkv: &CpuBuf<f64>,
    shape: AttentionShape,
    dtype: DType,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (_, n_out, n_lse) = sizes(&shape);
    let out = be.alloc(n_out, dtype)?;
    let lse = be.alloc(n_lse, DType::F32)?;
    be.attention_forward(&out, &lse, qkv, shape)?;
    Ok((be.download(&out)?, be.download(&lse)?))
}

pub(super) fn backward<S: Backend>(cx: &mut Ctx<'_, S>) {
    for (shape, dtype) in shapes().chain(with_dtypes(&BACKWARD_TILE_SHAPES)) {
        cx.case(describe(&shape, dtype), |t, rng| {
            let (n_qkv, n_out, _) = sizes(&shape);
            let qkv = t.input("qkv", &normal(rng, n_qkv, 1.0), dtype)?;
            let (out, lse) = reference_forward(t.reference(), &qkv.r, shape, dtype)?;
            let out = t.input("out", &out, dtype)?;
            let lse = t.input("lse", &lse, DType::F32)?;
            let dout = t.input("dout", &uniform(rng, n_out, 1.0), dtype)?;
            let dqkv = t.overwritten("dqkv", n_qkv, dtype)?;
            t.run(
                |be| be.attention_backward(&dqkv.s, &dout.s, &qkv.s, &out.s, &lse.s, shape),
                |be| be.attention_backward(&dqkv.r, &dout.r, &qkv.r, &out.r, &lse.r, shape),
            )
        });
    }
}
