//! Backend: device buffers and every op the model and optimizer need, on one device.
//!
//! The model and the trainer are written only against the [`Backend`] trait; the CPU backend is the
//! reference and the CUDA backend (a later layer) implements the same contract. Backends know nothing
//! about ranks, sharding or models: they see flat buffers and explicit shapes, as llm.c's launchers do.
//!
//! Buffer semantics follow device memory, not Rust values: a [`Backend::Buf`] is a cheap handle to a
//! range of device memory (cloning it does not copy data, [`Backend::slice`] makes a view), and ops
//! write through handles passed by shared reference. The contract every op keeps:
//! - ops on one backend instance run in issue order; outputs never alias inputs unless an op says so
//!   (the CPU backend checks this and returns an error rather than computing garbage);
//! - every length is checked against the shapes given; a mismatch is an error naming the operand;
//! - a buffer's [`DType`] is its storage precision: an op computes in f32 (or better) and rounds each
//!   value it stores to the destination's dtype, so bf16 numerics on the CPU match the GPU's.
//! - "accumulates" means `dst += result` and "overwrites" means `dst = result`; each op's doc says
//!   which for every output.

pub mod cpu;
pub mod cuda;
pub mod fused_linear;
pub mod kernels;
pub mod shapes;

use std::fmt::Debug;
use std::time::Instant;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Storage precision of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    Bf16,
}

impl DType {
    /// Bytes one element occupies on a real device (used for memory accounting).
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
        })
    }
}

/// What every backend buffer handle can tell about itself.
pub trait Buffer: Clone + Send + Sync + Debug + 'static {
    /// Number of elements in this view.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn dtype(&self) -> DType;
}

/// A row-major matrix product: `out[m, n] (+)= op(a)[m, k] · op(b)[k, n] (+ bias[n])`.
///
/// `a` is stored `[m, k]`, or `[k, m]` when `trans_a`; `b` is stored `[k, n]`, or `[n, k]` when
/// `trans_b` (the PyTorch `nn.Linear` weight layout `[out_features, in_features]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatmulSpec {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    /// `out += product` instead of `out = product` (gradient accumulation).
    pub accumulate: bool,
}

/// Shape of causal self-attention over a fused QKV activation.
///
/// `qkv` is `[batch, seq, 3 * heads * head_dim]`: for each token, all query heads, then all key
/// heads, then all value heads; head `h` occupies columns `h*head_dim .. (h+1)*head_dim` of its part.
/// The attention output is `[batch, seq, heads * head_dim]` in the same head order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    pub fn channels(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// Hyper-parameters of one AdamW update (decoupled weight decay, bias-corrected moments).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step count, for bias correction.
    pub step: u64,
    /// Multiplies every gradient before use (global-norm clipping, loss scaling).
    pub grad_scale: f32,
}

/// One tensor's piece of a flat buffer, for [`Backend::adamw_segments`]: `len` elements from
/// `offset`, with or without weight decay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AdamWSegment {
    pub offset: usize,
    pub len: usize,
    pub decay: bool,
}

/// Device time spent in one op, summed over its calls (see [`Backend::take_op_times`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OpTime {
    pub op: String,
    pub calls: u64,
    pub total_ms: f64,
}

/// A point in time on a backend's queue, for phase timing (see [`Backend::timing_mark`]).
#[derive(Clone, Debug)]
pub enum TimingMark<E> {
    /// The host clock when the mark was taken: also the device's time on a backend whose ops have
    /// finished when they return (the CPU).
    Host(Instant),
    /// A device event recorded, with timing enabled, after the work issued so far (CUDA).
    Device(E),
}

impl<E> TimingMark<E> {
    /// Milliseconds from `self` to `end` when both are host marks (0 if `end` is earlier).
    pub fn host_ms_to(&self, end: &TimingMark<E>) -> Option<f64> {
        match (self, end) {
            (TimingMark::Host(a), TimingMark::Host(b)) => {
                Some(b.saturating_duration_since(*a).as_secs_f64() * 1e3)
            }
            _ => None,
        }
    }
}

/// LayerNorm epsilon, as in GPT-2 and PyTorch's default.
pub const LAYERNORM_EPS: f32 = 1e-5;

/// The ops of one device. Every op returns `Result`: shape or dtype mismatches and device failures
/// are errors, never panics.
pub trait Backend: Send + Sync + 'static {
    /// Handle to a range of device memory (see the module docs for its semantics).
    type Buf: Buffer;
    /// Token ids on the device (u32).
    type Ids: Send + Sync + Debug;
    /// A point in this backend's queue of work (a CUDA event), used to order work between
    /// queues without blocking the host: see [`Backend::record_event`].
    type Event: Clone + Send + Sync + Debug + 'static;

    /// Human-readable device name, for logs and summaries.
    fn name(&self) -> String;

    // ---- memory -------------------------------------------------------------------------------

    /// A new zero-filled buffer of `len` elements.
    fn alloc(&self, len: usize, dtype: DType) -> Result<Self::Buf>;
    /// A view of `len` elements of `buf` starting at `offset`, sharing its memory.
    fn slice(&self, buf: &Self::Buf, offset: usize, len: usize) -> Result<Self::Buf>;
    /// Host f32 values into `dst` (same length), rounded to `dst`'s dtype.
    fn upload(&self, dst: &Self::Buf, src: &[f32]) -> Result<()>;
    /// The buffer's values, widened to f32.
    fn download(&self, src: &Self::Buf) -> Result<Vec<f32>>;
    /// Token ids onto the device.
    fn upload_ids(&self, ids: &[u32]) -> Result<Self::Ids>;
    /// Waits until every op issued so far has finished.
    fn synchronize(&self) -> Result<()>;

    // ---- ordering between queues (communication overlap) --------------------------------------

    /// Marks the work issued so far on this backend; another backend of the same device can wait
    /// for it with [`Backend::wait_event`]. (On the CPU every op has finished when it returns, so
    /// events are empty.)
    fn record_event(&self) -> Result<Self::Event>;
    /// Work issued on this backend from now on starts only after `event`'s work has finished; the
    /// host does not wait.
    fn wait_event(&self, event: &Self::Event) -> Result<()>;
    /// The backend collectives issue their copies and reductions on: on a GPU, a second stream of
    /// the same device and rank, so communication runs beside compute; on the CPU, itself.
    /// Buffers a collective writes are allocated on the compute backend before it starts; the lane
    /// allocates nothing that outlives the collective.
    fn comm_lane(&self) -> &Self;

    // ---- instrumentation (optional) -----------------------------------------------------------

    /// Bytes of device memory held through this backend, now and at most since it was made;
    /// `None` where the backend does not track it (the CPU).
    fn memory_in_use(&self) -> Option<(usize, usize)> {
        None
    }
    /// Turns per-op device timing on or off (off by default: it costs time of its own).
    fn set_op_timing(&self, _on: bool) {}
    /// The per-op times gathered since the last call, largest first (empty when never timed).
    fn take_op_times(&self) -> Result<Vec<OpTime>> {
        Ok(Vec::new())
    }
    /// Marks the work issued so far on this backend's queue, so that the time between two marks
    /// can be read with [`Backend::elapsed_ms`] once that work has finished (phase timing). The
    /// default reads the host clock, which is the device's time only on a backend whose ops have
    /// finished when they return (the CPU); a backend with an asynchronous queue records a device
    /// event with timing enabled.
    fn timing_mark(&self) -> Result<TimingMark<Self::Event>> {
        Ok(TimingMark::Host(Instant::now()))
    }
    /// Milliseconds between two marks of this backend taken with [`Backend::timing_mark`],
    /// `start` before `end`; call it after [`Backend::synchronize`] (it may wait for the marks).
    fn elapsed_ms(
        &self,
        start: &TimingMark<Self::Event>,
        end: &TimingMark<Self::Event>,
    ) -> Result<f64> {
        match start.host_ms_to(end) {
            Some(ms) => Ok(ms),
            None => bail!("elapsed_ms: this backend records no timed device events"),
        }
    }
    /// Turns on or off measuring how long the comm lane is busy running collectives' copies and
    /// reductions (phase timing; off by default). Nothing to do where the comm lane is the
    /// compute queue itself (the CPU).
    fn set_comm_timing(&self, _on: bool) {}
    /// Milliseconds the comm lane spent running collectives' work since the last call, with comm
    /// timing on. `None` where the comm lane is the compute queue itself (the CPU): collectives
    /// there cannot run beside compute, so their whole time is what a caller measures around them.
    fn take_comm_busy_ms(&self) -> Result<Option<f64>> {
        Ok(None)
    }

    // ---- elementwise --------------------------------------------------------------------------

    /// Overwrites every element of `dst` with `value`.
    fn fill(&self, dst: &Self::Buf, value: f32) -> Result<()>;
    /// Overwrites `dst` with `src` (same length), casting between dtypes with round-to-nearest-even.
    /// The backward of a cast is a cast of the gradient the other way: the same op.
    fn copy(&self, dst: &Self::Buf, src: &Self::Buf) -> Result<()>;
    /// `dst *= alpha`, in place.
    fn scale(&self, dst: &Self::Buf, alpha: f32) -> Result<()>;
    /// Residual forward: overwrites `out = a + b`. Its backward hands the same gradient to both
    /// inputs (see [`Backend::accumulate`]).
    fn add(&self, out: &Self::Buf, a: &Self::Buf, b: &Self::Buf) -> Result<()>;
    /// `dst += src` (gradient accumulation, residual backward).
    fn accumulate(&self, dst: &Self::Buf, src: &Self::Buf) -> Result<()>;

    // ---- linear layers ------------------------------------------------------------------------

    /// `out (+)= op(a) · op(b) (+ bias)`; see [`MatmulSpec`]. `bias` has `n` elements and is added
    /// once per output row (also when accumulating).
    fn matmul(
        &self,
        out: &Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        bias: Option<&Self::Buf>,
        spec: MatmulSpec,
    ) -> Result<()>;
    /// Bias gradient of a linear layer: accumulates `dbias[c] += Σ_r dout[r, c]` over `rows`.
    fn bias_backward(
        &self,
        dbias: &Self::Buf,
        dout: &Self::Buf,
        rows: usize,
        cols: usize,
    ) -> Result<()>;

    // ---- linear layers fused with what follows them (cuBLASLt epilogues) ----------------------
    // The defaults compose the plain ops (`fused_linear`): a backend overriding one must compute
    // what that composition computes, within its dtype's rounding.

    /// A linear layer and its GELU (`CUBLASLT_EPILOGUE_GELU_AUX_BIAS`): overwrites
    /// `pre = op(a) · op(b) (+ bias)` (kept for the backward) and `out = gelu(pre)`, both
    /// `[m, n]` of one dtype. `spec.accumulate` must be false.
    fn matmul_gelu(
        &self,
        out: &Self::Buf,
        pre: &Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        bias: Option<&Self::Buf>,
        spec: MatmulSpec,
    ) -> Result<()> {
        fused_linear::matmul_gelu(self, out, pre, a, b, bias, spec)
    }
    /// The backward through a GELU (`CUBLASLT_EPILOGUE_DGELU_BGRAD`): overwrites
    /// `dpre = (op(a) · op(b)) ∘ gelu'(pre)` (`[m, n]`, the dtype of `pre`) and, with `dbias`,
    /// accumulates its bias gradient `dbias[c] += Σ_r dpre[r, c]` (`n` elements). `spec.accumulate`
    /// must be false.
    fn matmul_dgelu(
        &self,
        dpre: &Self::Buf,
        dbias: Option<&Self::Buf>,
        a: &Self::Buf,
        b: &Self::Buf,
        pre: &Self::Buf,
        spec: MatmulSpec,
    ) -> Result<()> {
        fused_linear::matmul_dgelu(self, dpre, dbias, a, b, pre, spec)
    }
    /// A weight gradient and its bias gradient (`CUBLASLT_EPILOGUE_BGRADB`): `out (+)= aᵀ · op(b)`
    /// as [`Backend::matmul`] (`spec.trans_a` must be true: `a` is the layer's output gradient,
    /// stored `[k, m]`), and accumulates `dbias[i] += Σ_p a[p, i]` (`m` elements).
    fn matmul_bias_grad(
        &self,
        out: &Self::Buf,
        dbias: &Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        spec: MatmulSpec,
    ) -> Result<()> {
        fused_linear::matmul_bias_grad(self, out, dbias, a, b, spec)
    }
    /// A linear layer writing the residual stream (cuBLASLt's `beta = 1` with `C = residual` distinct
    /// from `D = out`): overwrites `out = residual + op(a) · op(b) (+ bias)`, `[m, n]` of one dtype.
    /// `spec.accumulate` must be false; `out` must not overlap `residual`.
    fn matmul_residual(
        &self,
        out: &Self::Buf,
        residual: &Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        bias: Option<&Self::Buf>,
        spec: MatmulSpec,
    ) -> Result<()> {
        fused_linear::matmul_residual(self, out, residual, a, b, bias, spec)
    }

    // ---- layer norm ---------------------------------------------------------------------------

    /// LayerNorm over the last dimension of `inp [rows, cols]`, eps [`LAYERNORM_EPS`].
    /// Overwrites `out [rows, cols]`, and `mean [rows]`, `rstd [rows]` (f32, kept for backward).
    fn layernorm_forward(
        &self,
        out: &Self::Buf,
        mean: &Self::Buf,
        rstd: &Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        bias: &Self::Buf,
        rows: usize,
        cols: usize,
    ) -> Result<()>;
    /// Backward of [`Backend::layernorm_forward`]: accumulates into `dinp [rows, cols]` (it sits on
    /// the residual stream), `dweight [cols]` and `dbias [cols]`.
    fn layernorm_backward(
        &self,
        dinp: &Self::Buf,
        dweight: &Self::Buf,
        dbias: &Self::Buf,
        dout: &Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        mean: &Self::Buf,
        rstd: &Self::Buf,
        rows: usize,
        cols: usize,
    ) -> Result<()>;

    // ---- activations --------------------------------------------------------------------------

    /// GELU, tanh approximation: overwrites `out = 0.5 x (1 + tanh(√(2/π)(x + 0.044715 x³)))`.
    fn gelu_forward(&self, out: &Self::Buf, inp: &Self::Buf) -> Result<()>;
    /// Overwrites `dinp = gelu'(inp) * dout`.
    fn gelu_backward(&self, dinp: &Self::Buf, inp: &Self::Buf, dout: &Self::Buf) -> Result<()>;

    // ---- attention ----------------------------------------------------------------------------

    /// Causal multi-head attention, scale `1/√head_dim`, see [`AttentionShape`] for layouts.
    /// Overwrites `out [batch, seq, channels]` and `lse [batch, heads, seq]` (f32: the log-sum-exp
    /// of each query's scaled scores, all the backward needs: the `seq × seq` probabilities are
    /// recomputed, never stored, as flash attention does).
    fn attention_forward(
        &self,
        out: &Self::Buf,
        lse: &Self::Buf,
        qkv: &Self::Buf,
        shape: AttentionShape,
    ) -> Result<()>;
    /// Backward of [`Backend::attention_forward`]: overwrites `dqkv [batch, seq, 3 * channels]`.
    fn attention_backward(
        &self,
        dqkv: &Self::Buf,
        dout: &Self::Buf,
        qkv: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        shape: AttentionShape,
    ) -> Result<()>;

    // ---- embeddings ---------------------------------------------------------------------------

    /// Overwrites `out[b, t, :] = wte[ids[b, t], :] + wpe[t, :]`; `ids` holds `batch * seq` ids,
    /// `wte` is `[vocab, channels]`, `wpe` is `[max_seq >= seq, channels]`. An id `>= vocab` is an error.
    fn embedding_forward(
        &self,
        out: &Self::Buf,
        ids: &Self::Ids,
        wte: &Self::Buf,
        wpe: &Self::Buf,
        batch: usize,
        seq: usize,
        channels: usize,
    ) -> Result<()>;
    /// Backward of [`Backend::embedding_forward`]: accumulates into `dwte` and the first `seq`
    /// rows of `dwpe`.
    fn embedding_backward(
        &self,
        dwte: &Self::Buf,
        dwpe: &Self::Buf,
        dout: &Self::Buf,
        ids: &Self::Ids,
        batch: usize,
        seq: usize,
        channels: usize,
    ) -> Result<()>;

    // ---- loss ---------------------------------------------------------------------------------

    /// Fused softmax + cross-entropy over `logits [rows, vocab]` against `targets` (`rows` ids).
    /// Overwrites `losses [rows]` (f32) with `-log softmax(logits)[target]`. With
    /// `grad_scale = Some(s)`, also overwrites `logits` in place with its gradient
    /// `s * (softmax(logits) - onehot(target))`, so the full logits never exist twice.
    fn cross_entropy(
        &self,
        losses: &Self::Buf,
        logits: &Self::Buf,
        targets: &Self::Ids,
        rows: usize,
        vocab: usize,
        grad_scale: Option<f32>,
    ) -> Result<()>;

    // ---- optimizer ----------------------------------------------------------------------------

    /// One AdamW update of `param` (the f32 master weights) from `grad`, with f32 moments `m` and
    /// `v`, all the same length; all three are overwritten. When `param_copy` is given (the compute
    /// copy, for example bf16), it is overwritten with the new weights in the same pass.
    fn adamw(
        &self,
        param: &Self::Buf,
        grad: &Self::Buf,
        m: &Self::Buf,
        v: &Self::Buf,
        param_copy: Option<&Self::Buf>,
        hp: &AdamWStep,
    ) -> Result<()>;
    /// [`Backend::adamw`] over several tensors of one flat buffer at once (the tensors of a unit's
    /// shard): each segment's range of every buffer gets exactly the update `adamw` gives it, with
    /// `hp.weight_decay` where the segment decays and none where it does not; elements outside
    /// every segment are not touched. Segments are in increasing order and do not overlap. The
    /// default issues one `adamw` per segment; a GPU backend does it in one launch.
    fn adamw_segments(
        &self,
        param: &Self::Buf,
        grad: &Self::Buf,
        m: &Self::Buf,
        v: &Self::Buf,
        param_copy: Option<&Self::Buf>,
        segments: &[AdamWSegment],
        hp: &AdamWStep,
    ) -> Result<()> {
        shapes::adamw_segments(param, grad, m, v, param_copy, segments)?;
        for seg in segments {
            let view = |buf: &Self::Buf| self.slice(buf, seg.offset, seg.len);
            let piece_hp = AdamWStep {
                weight_decay: if seg.decay { hp.weight_decay } else { 0.0 },
                ..*hp
            };
            let copy = param_copy.map(view).transpose()?;
            self.adamw(
                &view(param)?,
                &view(grad)?,
                &view(m)?,
                &view(v)?,
                copy.as_ref(),
                &piece_hp,
            )?;
        }
        Ok(())
    }
    /// Accumulates `acc[0] += Σ x²` (`acc` is a one-element f32 buffer), summing in f32 or better.
    /// Global-norm clipping sums this over every gradient buffer (and, sharded, over ranks).
    fn sum_squares(&self, acc: &Self::Buf, x: &Self::Buf) -> Result<()>;
}

/// Fails unless `buf` has exactly `expected` elements; `what` names the operand for the message.
pub fn expect_len<B: Buffer>(op: &str, what: &str, buf: &B, expected: usize) -> Result<()> {
    if buf.len() != expected {
        bail!(
            "{op}: `{what}` has {} elements, the shapes given need {expected}",
            buf.len()
        );
    }
    Ok(())
}

/// Fails unless `buf` has the given dtype (for outputs whose precision the contract fixes).
pub fn expect_dtype<B: Buffer>(op: &str, what: &str, buf: &B, dtype: DType) -> Result<()> {
    if buf.dtype() != dtype {
        bail!("{op}: `{what}` must be {dtype}, it is {}", buf.dtype());
    }
    Ok(())
}
