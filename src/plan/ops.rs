//! Every op one training step issues on rank 0's compute queue, under the names the CUDA
//! backend's per-op profiler records (`src/backend/cuda/profile.rs`: the [`Backend`] method
//! names), with each call's FLOPs and HBM bytes. It follows `model::gpt` (forward and backward, op
//! by op), `shard::engine` (gradient reduction into the shards) and `train::rank` (zeroing the
//! gradients, the norm for clipping, AdamW per tensor segment), so a step on any backend calls
//! exactly these ops (tests/predict.rs counts them on the CPU backend).
//!
//! Collectives are not here: they run on the comm lane, whose work the per-op table does not
//! show (the plan's `step` module predicts what of them the compute waits for).
//!
//! Byte counts are the HBM traffic of each kernel as written: every operand read once and every
//! output written once (read too when it accumulates), plus the extra passes a kernel makes
//! (bias_backward's partial sums, layernorm_backward's second pass). Re-reads a kernel serves from
//! L2 (attention's key/value tiles, cross-entropy's three passes over a 100 KB row) are not HBM
//! traffic and not counted. FLOPs of the memory-bound kernels are nominal (a few per element):
//! they never decide a time.
//!
//! [`Backend`]: crate::backend::Backend

use serde::Serialize;

use super::roofline::{AttentionKernels, KernelProfile};
use super::Workload;
use crate::backend::DType;
use crate::model::{GptShape, ParamLayout};
use crate::shard::flat::ShardLayout;
use crate::shard::ShardPlan;

/// What limits an op, and so which efficiency applies to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpClass {
    /// cuBLASLt on tensor cores.
    Matmul,
    /// The flash-attention kernels (tensor cores or CUDA cores: see the kernel profile).
    Attention,
    /// Elementwise, normalisation, reduction, embedding, loss and optimizer kernels.
    Memory,
}

/// One kind of call of an op: the same shape every time it is called in a step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OpCall {
    /// The profiler's name (the Backend method).
    pub op: &'static str,
    /// Which call of the op this is ("qkv forward", "lnf", ...).
    pub what: String,
    /// Calls per optimizer step.
    pub calls: u64,
    /// The kernels one call runs, in order.
    pub kernels: Vec<KernelCost>,
}

/// One kernel (or a few tiny ones counted together) of a call.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KernelCost {
    pub kernel: String,
    pub class: OpClass,
    /// Kernel launches (each pays the launch gap).
    pub launches: u32,
    /// FLOPs executed (attention: over its causal tiles, with its recomputation).
    pub flops: f64,
    /// FLOPs counted under the model-FLOPs convention (6N + 12·L·d·T per token): matmuls and
    /// attention only, attention without the causal half.
    pub model_flops: f64,
    /// HBM bytes read and written.
    pub bytes: f64,
    /// Blocks of the grid when they are too few to occupy every SM (a column-parallel pass).
    pub blocks: Option<u64>,
}

impl OpCall {
    fn one(op: &'static str, what: &str, kernel: KernelCost) -> OpCall {
        OpCall {
            op,
            what: what.to_string(),
            calls: 1,
            kernels: vec![kernel],
        }
    }

    pub fn flops(&self) -> f64 {
        self.kernels.iter().map(|k| k.flops).sum()
    }

    pub fn model_flops(&self) -> f64 {
        self.kernels.iter().map(|k| k.model_flops).sum()
    }

    pub fn bytes(&self) -> f64 {
        self.kernels.iter().map(|k| k.bytes).sum()
    }
}

fn kernel(name: &str, class: OpClass, launches: u32, flops: f64, bytes: f64) -> KernelCost {
    KernelCost {
        kernel: name.to_string(),
        class,
        launches,
        flops,
        model_flops: if class == OpClass::Memory { 0.0 } else { flops },
        bytes,
        blocks: None,
    }
}

/// Nominal FLOPs per element of the memory-bound kernels (never the binding limit).
const LAYERNORM_FLOPS_PER_ELEMENT: f64 = 8.0;
const ADAMW_FLOPS_PER_ELEMENT: f64 = 16.0;
const CROSS_ENTROPY_FLOPS_PER_ELEMENT: f64 = 6.0;
/// Rows of the bias gradient one block sums (`ROWS_PER_CHUNK` in src/backend/cuda/ops.rs).
const BIAS_ROWS_PER_CHUNK: usize = 256;
/// Columns per block of the column-parallel passes (`COLUMN_BLOCK` in src/backend/cuda/launch.rs).
const COLUMN_BLOCK_COLS: usize = 32;

/// Sizes in bytes of the step's buffer kinds.
#[derive(Debug, Clone, Copy)]
struct Bytes {
    /// Activations and compute parameters (the param dtype).
    act: f64,
    /// Unsharded weight gradients as the backward writes them: f32 gradient shards when they
    /// are written directly (one rank, f32 reduce), else the reduce dtype.
    grad: f64,
    f32: f64,
    id: f64,
}

/// Matmul `out[m, n] (+)= a[m, k] · b[k, n] (+ bias)`: one call's cost.
fn matmul(
    what: &str,
    m: usize,
    n: usize,
    k: usize,
    bias: bool,
    acc: bool,
    out: f64,
    b: Bytes,
) -> OpCall {
    let (mf, nf, kf) = (m as f64, n as f64, k as f64);
    let flops = 2.0 * mf * nf * kf;
    let inputs = (mf * kf + kf * nf) * b.act + if bias { nf * b.act } else { 0.0 };
    let output = mf * nf * out * if acc { 2.0 } else { 1.0 };
    let k = kernel("cuBLASLt GEMM", OpClass::Matmul, 1, flops, inputs + output);
    OpCall::one("matmul", what, k)
}

/// A matmul with a cuBLASLt epilogue (model::gpt's fused linear ops), profiled under `op`:
/// the product's cost plus what the epilogue reads or writes besides it.
fn fused_matmul(op: &'static str, plain: OpCall, epilogue_bytes: f64) -> OpCall {
    let mut k = plain.kernels[0].clone();
    k.bytes += epilogue_bytes;
    OpCall::one(op, &plain.what, k)
}

/// A call of one memory-bound kernel (or `launches` tiny ones counted together).
fn memory_op(op: &'static str, what: &str, launches: u32, flops: f64, bytes: f64) -> OpCall {
    OpCall::one(
        op,
        what,
        kernel(op, OpClass::Memory, launches, flops, bytes),
    )
}

/// The calls of one step, in issue order (a call of the same shape repeated is one entry).
struct Calls {
    list: Vec<OpCall>,
}

impl Calls {
    fn push(&mut self, times: u64, call: OpCall) {
        if times > 0 {
            self.list.push(OpCall {
                calls: call.calls * times,
                ..call
            });
        }
    }
}

/// Query-key pairs the attention kernels visit per (sequence, head): whole tiles of `tile` rows
/// below and on the diagonal (`tiles·(tiles+1)/2` of them), the causal mask applied inside.
pub fn causal_tile_pairs(seq: usize, tile: usize) -> f64 {
    let tiles = seq.div_ceil(tile.max(1)) as f64;
    let t = tile as f64;
    tiles * (tiles + 1.0) / 2.0 * t * t
}

fn linear_forward(
    c: &mut Calls,
    times: u64,
    what: &str,
    n: usize,
    inf: usize,
    outf: usize,
    bias: bool,
    b: Bytes,
) {
    c.push(
        times,
        matmul(
            &format!("{what} forward"),
            n,
            outf,
            inf,
            bias,
            false,
            b.act,
            b,
        ),
    );
}

/// `linear_backward` of model::gpt: dinp, dW (accumulated), and the bias gradient.
fn linear_backward(
    c: &mut Calls,
    times: u64,
    what: &str,
    n: usize,
    inf: usize,
    outf: usize,
    bias: bool,
    b: Bytes,
) {
    c.push(
        times,
        matmul(
            &format!("{what} dinp"),
            n,
            inf,
            outf,
            false,
            false,
            b.act,
            b,
        ),
    );
    c.push(
        times,
        matmul(
            &format!("{what} dweight"),
            outf,
            inf,
            n,
            false,
            true,
            b.grad,
            b,
        ),
    );
    if bias {
        let (rows, cols) = (n as f64, outf as f64);
        let chunks = n.div_ceil(BIAS_ROWS_PER_CHUNK) as f64;
        // dout read once; per-chunk f32 partial sums written then read by the final pass; dbias
        // read and written.
        let bytes = rows * cols * b.act + 2.0 * chunks * cols * b.f32 + 2.0 * cols * b.grad;
        c.push(
            times,
            memory_op(
                "bias_backward",
                &format!("{what} bias"),
                2,
                rows * cols,
                bytes,
            ),
        );
    }
}

/// A linear layer's input gradient alone: `dinp = dout · w`.
fn input_grad(c: &mut Calls, times: u64, what: &str, n: usize, inf: usize, outf: usize, b: Bytes) {
    let call = matmul(
        &format!("{what} dinp"),
        n,
        inf,
        outf,
        false,
        false,
        b.act,
        b,
    );
    c.push(times, call);
}

/// A weight gradient accumulated with its bias gradient from the same product
/// (`matmul_bias_grad`: the column sums of dout, a vector written and added into dbias).
fn weight_grad_with_bias(
    c: &mut Calls,
    times: u64,
    what: &str,
    n: usize,
    inf: usize,
    outf: usize,
    b: Bytes,
) {
    let dw = matmul(
        &format!("{what} dweight + dbias"),
        outf,
        inf,
        n,
        false,
        true,
        b.grad,
        b,
    );
    let dbias = 3.0 * outf as f64 * b.grad;
    c.push(times, fused_matmul("matmul_bias_grad", dw, dbias));
}

fn layernorm_forward(c: &mut Calls, times: u64, what: &str, n: usize, ch: usize, b: Bytes) {
    let (nf, cf) = (n as f64, ch as f64);
    // inp read, out written, weight and bias read, mean and rstd (f32) written.
    let bytes = 2.0 * nf * cf * b.act + 2.0 * cf * b.act + 2.0 * nf * b.f32;
    c.push(
        times,
        memory_op(
            "layernorm_forward",
            what,
            1,
            LAYERNORM_FLOPS_PER_ELEMENT * nf * cf,
            bytes,
        ),
    );
}

/// Two kernels: the row pass (dinp, accumulated into the residual gradient) and the column pass
/// (dweight, dbias) reading dout and inp again, on `cols / 32` blocks, or on a full grid
/// where the kernel profile says so.
fn layernorm_backward(
    c: &mut Calls,
    times: u64,
    what: &str,
    n: usize,
    ch: usize,
    b: Bytes,
    k: &KernelProfile,
) {
    let (nf, cf) = (n as f64, ch as f64);
    let stats = 2.0 * nf * b.f32;
    let rows = 2.0 * nf * cf * b.act + cf * b.act + stats + 2.0 * nf * cf * b.act;
    let cols = 2.0 * nf * cf * b.act + stats + 4.0 * cf * b.grad;
    let flops = LAYERNORM_FLOPS_PER_ELEMENT * nf * cf;
    let mut column = kernel("column pass", OpClass::Memory, 1, flops, cols);
    if !k.layernorm_column_pass_full_grid {
        column.blocks = Some(ch.div_ceil(COLUMN_BLOCK_COLS) as u64);
    }
    let call = OpCall {
        op: "layernorm_backward",
        what: what.to_string(),
        calls: 1,
        kernels: vec![kernel("row pass", OpClass::Memory, 1, flops, rows), column],
    };
    c.push(times, call);
}

fn attention_forward(
    c: &mut Calls,
    times: u64,
    s: &GptShape,
    batch: usize,
    seq: usize,
    b: Bytes,
    a: &AttentionKernels,
) {
    let hs = s.d_model / s.n_head;
    let heads = (batch * s.n_head) as f64;
    let n = (batch * seq) as f64;
    let ch = s.d_model as f64;
    let pairs = heads * causal_tile_pairs(seq, a.tile(hs));
    // Q·Kᵀ and P·V: 2 FLOPs per multiply-add, head_dim each, per visited pair.
    let flops = 4.0 * hs as f64 * pairs;
    let bytes = 3.0 * n * ch * b.act + n * ch * b.act + heads * seq as f64 * b.f32;
    let mut k = kernel("flash forward", OpClass::Attention, 1, flops, bytes);
    // 4·T·d per token (the 12·L·d·T convention's forward third, no causal half).
    k.model_flops = 4.0 * n * seq as f64 * ch;
    c.push(times, OpCall::one("attention_forward", "causal", k));
}

fn attention_backward(
    c: &mut Calls,
    times: u64,
    s: &GptShape,
    batch: usize,
    seq: usize,
    b: Bytes,
    a: &AttentionKernels,
) {
    let hs = s.d_model / s.n_head;
    let heads = (batch * s.n_head) as f64;
    let n = (batch * seq) as f64;
    let ch = s.d_model as f64;
    let rows_f32 = heads * seq as f64 * b.f32;
    // D = rowsum(dO ∘ O): reads dout and out, writes D (f32).
    let preprocess = 2.0 * n * ch * b.act + rows_f32;
    let mut kernels = vec![kernel(
        "preprocess (D = dO·O)",
        OpClass::Memory,
        1,
        2.0 * n * ch,
        preprocess,
    )];
    let pairs = heads * causal_tile_pairs(seq, a.tile(hs));
    let model_total = 8.0 * n * seq as f64 * ch;
    let weight: f64 = a.backward.iter().map(|p| p.flops_per_pair_per_dim).sum();
    for pass in a.backward {
        // Each pass reads qkv, dout, lse and D, and writes its share of dqkv.
        let bytes = 4.0 * n * ch * b.act + 2.0 * rows_f32 + pass.dqkv_parts * n * ch * b.act;
        let flops = pass.flops_per_pair_per_dim * hs as f64 * pairs;
        let mut k = kernel(pass.name, OpClass::Attention, 1, flops, bytes);
        // 8·T·d per token in all, shared among the passes by their work.
        k.model_flops = model_total * pass.flops_per_pair_per_dim / weight;
        kernels.push(k);
    }
    let call = OpCall {
        op: "attention_backward",
        what: "causal".to_string(),
        calls: 1,
        kernels,
    };
    c.push(times, call);
}

/// Every call of one optimizer step of `accum` micro-batches on rank 0.
pub fn step_calls(w: &Workload, plan: &ShardPlan, accum: usize, k: &KernelProfile) -> Vec<OpCall> {
    let s = w.shape;
    let (batch, seq) = (w.micro_batch, w.seq_len);
    let (n, ch, v) = (batch * seq, s.d_model, s.vocab_size);
    let layers = s.n_layer as u64;
    let accum = accum.max(1) as u64;
    let direct_grads =
        plan.group_size == 1 && plan.replicas() == 1 && plan.reduce_dtype == DType::F32;
    let b = Bytes {
        act: plan.param_dtype.size_bytes() as f64,
        grad: if direct_grads {
            4.0
        } else {
            plan.reduce_dtype.size_bytes() as f64
        },
        f32: 4.0,
        id: 4.0,
    };
    let mut c = Calls { list: Vec::new() };
    let layout = ParamLayout::gpt(s, 0.02);
    let shards = ShardLayout::new(&layout, plan.group_size.max(1));

    // train::rank: the gradient shards (f32) are zeroed before the first micro-batch.
    for unit in &shards.units {
        let bytes = unit.shard_len as f64 * b.f32;
        c.push(1, memory_op("fill", "zero grad shards", 1, 0.0, bytes));
    }

    // ---- forward (model::gpt::forward), every micro-batch ----
    let nf = n as f64;
    let emb = nf * b.id + 2.0 * nf * ch as f64 * b.act + (seq * ch) as f64 * b.act;
    c.push(
        accum,
        memory_op(
            "embedding_forward",
            "wte[ids] + wpe",
            1,
            (n * ch) as f64,
            emb,
        ),
    );
    let per_layer = accum * layers;
    layernorm_forward(&mut c, 2 * per_layer, "ln1, ln2", n, ch, b);
    linear_forward(&mut c, per_layer, "qkv", n, ch, 3 * ch, true, b);
    attention_forward(&mut c, per_layer, &s, batch, seq, b, &k.attention);
    // The projections write the residual stream (beta = 1, C the residual: one more read).
    let residual = nf * ch as f64 * b.act;
    let proj = matmul("attn proj forward", n, ch, ch, true, false, b.act, b);
    c.push(per_layer, fused_matmul("matmul_residual", proj, residual));
    // fc with GELU in its epilogue, the pre-activation kept (one more write).
    let fc = matmul("fc forward + gelu", n, 4 * ch, ch, true, false, b.act, b);
    c.push(
        per_layer,
        fused_matmul("matmul_gelu", fc, nf * (4 * ch) as f64 * b.act),
    );
    let fc_proj = matmul("fc proj forward", n, ch, 4 * ch, true, false, b.act, b);
    c.push(
        per_layer,
        fused_matmul("matmul_residual", fc_proj, residual),
    );
    layernorm_forward(&mut c, accum, "lnf", n, ch, b);
    linear_forward(&mut c, accum, "lm head", n, ch, v, false, b);
    // Fused softmax + cross-entropy: logits read, their gradient written in place.
    let logits = (n * v) as f64;
    let ce = 2.0 * logits * b.act + nf * (b.id + b.f32);
    c.push(
        accum,
        memory_op(
            "cross_entropy",
            "softmax + loss + dlogits",
            1,
            CROSS_ENTROPY_FLOPS_PER_ELEMENT * logits,
            ce,
        ),
    );

    // ---- backward (model::gpt::backward), every micro-batch ----
    linear_backward(&mut c, accum, "lm head", n, ch, v, false, b);
    c.push(
        accum,
        memory_op("fill", "dresidual = 0", 1, 0.0, nf * ch as f64 * b.act),
    );
    layernorm_backward(&mut c, accum, "lnf", n, ch, b, k);
    // fc proj: its input gradient through the GELU backward epilogue (the pre-activation read,
    // fc's bias gradient summed), its weight gradient with its bias gradient (BGRADB).
    let dgelu = matmul(
        "fc proj dinp + dgelu",
        n,
        4 * ch,
        ch,
        false,
        false,
        b.act,
        b,
    );
    c.push(
        per_layer,
        fused_matmul("matmul_dgelu", dgelu, nf * (4 * ch) as f64 * b.act),
    );
    weight_grad_with_bias(&mut c, per_layer, "fc proj", n, 4 * ch, ch, b);
    // fc: plain products (its bias gradient came with the GELU backward).
    linear_backward(&mut c, per_layer, "fc", n, ch, 4 * ch, false, b);
    layernorm_backward(&mut c, 2 * per_layer, "ln2, ln1", n, ch, b, k);
    input_grad(&mut c, per_layer, "attn proj", n, ch, ch, b);
    weight_grad_with_bias(&mut c, per_layer, "attn proj", n, ch, ch, b);
    attention_backward(&mut c, per_layer, &s, batch, seq, b, &k.attention);
    input_grad(&mut c, per_layer, "qkv", n, ch, 3 * ch, b);
    weight_grad_with_bias(&mut c, per_layer, "qkv", n, ch, 3 * ch, b);
    // Positions: dout read, dwpe's first seq rows read and written; tokens: dout and ids read,
    // dwte's rows updated by atomics (a read and a write per element).
    let positions = nf * ch as f64 * b.act + 2.0 * (seq * ch) as f64 * b.grad;
    let tokens = nf * ch as f64 * b.act + nf * b.id + 2.0 * nf * ch as f64 * b.grad;
    c.push(
        accum,
        memory_op(
            "embedding_backward",
            "dwpe + dwte",
            2,
            2.0 * nf * ch as f64,
            positions + tokens,
        ),
    );

    // ---- shard::engine: unsharded gradients added into the f32 shards (not when written
    // directly), after every micro-batch that reduces ----
    if !direct_grads {
        let reducing = if plan.reduce_every_micro_batch {
            accum
        } else {
            1
        };
        for unit in &shards.units {
            let len = unit.shard_len as f64;
            let bytes = len * (2.0 * b.f32 + plan.reduce_dtype.size_bytes() as f64);
            c.push(
                reducing,
                memory_op("accumulate", "reduced grads into shards", 1, len, bytes),
            );
        }
    }

    // ---- train::rank: clipping norm, then AdamW per unit of rank 0's shards ----
    for unit in &shards.units {
        let len = unit.shard_len as f64;
        c.push(
            1,
            memory_op("sum_squares", "grad norm", 1, 2.0 * len, len * b.f32),
        );
    }
    let master = plan.param_dtype != DType::F32;
    for u in 0..shards.units.len() {
        // One multi-tensor launch per unit, over its tensor pieces (padding untouched).
        let len: f64 = shards
            .segments(&layout, u, 0)
            .iter()
            .map(|seg| seg.len as f64)
            .sum();
        // param (f32 master), grad, m, v read; param, m, v written; the compute copy written.
        let copy = if master { b.act } else { 0.0 };
        let bytes = len * (7.0 * b.f32 + copy);
        c.push(
            1,
            memory_op(
                "adamw",
                "per unit, every tensor piece",
                1,
                ADAMW_FLOPS_PER_ELEMENT * len,
                bytes,
            ),
        );
    }
    c.list
}
