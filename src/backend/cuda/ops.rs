//! The [`Backend`] ops of the CUDA backend: each checks its operands as the CPU reference does,
//! then queues its kernels (or its matmul) on the rank's stream through the driver.

use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use half::bf16;

use super::launch::{
    attention_tile, grid_for, int, row_block, Arg, BLOCK, COLUMN_BLOCK, CROSS_ENTROPY_MAX_BLOCK,
};
use super::optim::{adamw_outputs, hyper_args};
use super::{
    attention_tc_backward, long, no_overlap, ptr, same_dtype, tn, CudaBackend, CudaBuf, CudaIds,
    CudaMark,
};
use crate::backend::{
    expect_dtype, expect_len, shapes, AdamWSegment, AdamWStep, AttentionShape, Backend, DType,
    MatmulSpec, OpTime, TimingMark,
};

/// Rows of the bias gradient summed by one block before the fixed-order final pass.
const ROWS_PER_CHUNK: usize = 256;

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    type Ids = CudaIds;
    type Event = CudaMark;

    fn name(&self) -> String {
        self.device.describe()
    }

    fn alloc(&self, len: usize, dtype: DType) -> Result<CudaBuf> {
        let bytes = len
            .checked_mul(dtype.size_bytes())
            .ok_or_else(|| anyhow!("alloc: {len} elements of {dtype} overflow"))?;
        let mem = Arc::new(self.raw_alloc(bytes)?);
        self.stream
            .memset_d8(mem.ptr(), 0, bytes)
            .map_err(|e| e.context("zeroing a new device buffer"))?;
        Ok(CudaBuf {
            mem,
            offset: 0,
            len,
            dtype,
        })
    }

    fn slice(&self, buf: &CudaBuf, offset: usize, len: usize) -> Result<CudaBuf> {
        buf.view(offset, len)
    }

    fn upload(&self, dst: &CudaBuf, src: &[f32]) -> Result<()> {
        expect_len("upload", "dst", dst, src.len())?;
        match dst.dtype {
            DType::F32 => self.copy_host_to_device(dst.ptr(), bytemuck::cast_slice(src)),
            DType::Bf16 => {
                let host: Vec<bf16> = src.iter().map(|&x| bf16::from_f32(x)).collect();
                self.copy_host_to_device(dst.ptr(), bytemuck::cast_slice(&host))
            }
        }
    }

    fn download(&self, src: &CudaBuf) -> Result<Vec<f32>> {
        let mut bytes = vec![0u8; src.bytes()];
        // SAFETY: `src` covers `bytes.len()` bytes of a live allocation; the host buffer lives
        // until the synchronize below has waited for the copy.
        unsafe { self.stream.copy_dtoh(&mut bytes, src.ptr())? };
        self.synchronize()?;
        Ok(match src.dtype {
            DType::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::Bf16 => bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        })
    }

    fn upload_ids(&self, ids: &[u32]) -> Result<CudaIds> {
        let mem = Arc::new(self.raw_alloc(std::mem::size_of_val(ids))?);
        self.copy_host_to_device(mem.ptr(), bytemuck::cast_slice(ids))?;
        Ok(CudaIds {
            mem,
            host: Arc::new(ids.to_vec()),
        })
    }

    fn synchronize(&self) -> Result<()> {
        if let Some(lane) = &self.lane {
            lane.synchronize()?;
        }
        self.stream.synchronize()?;
        self.device.driver.check_error()
    }

    fn record_event(&self) -> Result<CudaMark> {
        Ok(CudaMark(self.stream.record(false)?))
    }

    fn wait_event(&self, event: &CudaMark) -> Result<()> {
        self.stream.wait(event.0.as_ref())
    }

    fn comm_lane(&self) -> &Self {
        self.lane.as_deref().unwrap_or(self)
    }

    fn memory_in_use(&self) -> Option<(usize, usize)> {
        Some((self.stats.current(), self.stats.peak()))
    }

    fn set_op_timing(&self, on: bool) {
        self.profiler.set(on);
    }

    fn take_op_times(&self) -> Result<Vec<OpTime>> {
        self.synchronize()?;
        self.profiler.take()
    }

    fn timing_mark(&self) -> Result<TimingMark<CudaMark>> {
        // `record_event`'s events are made without timing (cheaper to wait on); elapsed time
        // needs an event made with timing, so these are made on their own.
        Ok(TimingMark::Device(CudaMark(self.stream.record(true)?)))
    }

    fn elapsed_ms(&self, start: &TimingMark<CudaMark>, end: &TimingMark<CudaMark>) -> Result<f64> {
        match (start, end) {
            // The device's clock between the two points of the stream (the driver waits for both).
            (TimingMark::Device(a), TimingMark::Device(b)) => {
                a.0.elapsed_ms_to(b.0.as_ref()).map(f64::from)
            }
            _ => start.host_ms_to(end).ok_or_else(|| {
                anyhow!("elapsed_ms: a host mark and a CUDA event cannot be compared")
            }),
        }
    }

    fn set_comm_timing(&self, on: bool) {
        // Everything the comm lane runs is collectives' work (copies, reductions), and each op is
        // timed by its own events on the lane's stream, recorded after the lane's waits for the
        // ranks' inputs: their sum is the time the lane was busy, waits excluded.
        if let Some(lane) = &self.lane {
            lane.profiler.set(on);
        }
    }

    fn take_comm_busy_ms(&self) -> Result<Option<f64>> {
        match &self.lane {
            Some(lane) => {
                lane.synchronize()?;
                Ok(Some(lane.profiler.take()?.iter().map(|t| t.total_ms).sum()))
            }
            None => Ok(None),
        }
    }

    fn fill(&self, dst: &CudaBuf, value: f32) -> Result<()> {
        self.timed("fill", || {
            let name = format!("fill_{}", tn(dst.dtype));
            self.run_1d(
                &name,
                dst.len,
                &[ptr(dst), Arg::Float(value), long(dst.len)],
            )
        })
    }

    fn copy(&self, dst: &CudaBuf, src: &CudaBuf) -> Result<()> {
        expect_len("copy", "dst", dst, src.len)?;
        no_overlap("copy", &[("dst", dst)], &[("src", src)])?;
        self.timed("copy", || {
            let name = format!("copy_{}_{}", tn(dst.dtype), tn(src.dtype));
            self.run_1d(&name, dst.len, &[ptr(dst), ptr(src), long(dst.len)])
        })
    }

    fn scale(&self, dst: &CudaBuf, alpha: f32) -> Result<()> {
        self.timed("scale", || {
            let name = format!("scale_{}", tn(dst.dtype));
            self.run_1d(
                &name,
                dst.len,
                &[ptr(dst), Arg::Float(alpha), long(dst.len)],
            )
        })
    }

    fn add(&self, out: &CudaBuf, a: &CudaBuf, b: &CudaBuf) -> Result<()> {
        expect_len("add", "a", a, out.len)?;
        expect_len("add", "b", b, out.len)?;
        same_dtype("add", out.dtype, &[("a", a), ("b", b)])?;
        no_overlap("add", &[("out", out)], &[("a", a), ("b", b)])?;
        self.timed("add", || {
            let name = format!("add_{}", tn(out.dtype));
            self.run_1d(&name, out.len, &[ptr(out), ptr(a), ptr(b), long(out.len)])
        })
    }

    fn accumulate(&self, dst: &CudaBuf, src: &CudaBuf) -> Result<()> {
        expect_len("accumulate", "src", src, dst.len)?;
        no_overlap("accumulate", &[("dst", dst)], &[("src", src)])?;
        self.timed("accumulate", || {
            let name = format!("accumulate_{}_{}", tn(dst.dtype), tn(src.dtype));
            self.run_1d(&name, dst.len, &[ptr(dst), ptr(src), long(dst.len)])
        })
    }

    fn matmul(
        &self,
        out: &CudaBuf,
        a: &CudaBuf,
        b: &CudaBuf,
        bias: Option<&CudaBuf>,
        spec: MatmulSpec,
    ) -> Result<()> {
        shapes::matmul(out, a, b, bias, spec)?;
        let mut ins = vec![("a", a), ("b", b)];
        if let Some(bias) = bias {
            ins.push(("bias", bias));
        }
        no_overlap("matmul", &[("out", out)], &ins)?;
        if spec.m == 0 || spec.n == 0 {
            return Ok(());
        }
        if spec.k == 0 {
            // An empty sum: out = 0 (+ bias). cuBLASLt rejects k = 0.
            if bias.is_some() {
                bail!("matmul: k = 0 with a bias is not supported on CUDA");
            }
            return if spec.accumulate {
                Ok(())
            } else {
                self.fill(out, 0.0)
            };
        }
        self.timed("matmul", || {
            self.blas()?
                .matmul(self.stream.as_ref(), out, a, b, bias, spec)
        })
    }

    fn bias_backward(
        &self,
        dbias: &CudaBuf,
        dout: &CudaBuf,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        expect_len("bias_backward", "dbias", dbias, cols)?;
        expect_len("bias_backward", "dout", dout, rows * cols)?;
        no_overlap("bias_backward", &[("dbias", dbias)], &[("dout", dout)])?;
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        self.timed("bias_backward", || {
            let chunks = rows.div_ceil(ROWS_PER_CHUNK);
            let partial = self.alloc(chunks * cols, DType::F32)?;
            self.run(
                &format!("column_partial_sums_{}", tn(dout.dtype)),
                (cols.div_ceil(32) as u32, chunks as u32, 1),
                COLUMN_BLOCK,
                &[
                    ptr(&partial),
                    ptr(dout),
                    int("rows", rows)?,
                    int("cols", cols)?,
                    int("rows per chunk", ROWS_PER_CHUNK)?,
                ],
            )?;
            self.run_1d(
                &format!("accumulate_column_sums_{}", tn(dbias.dtype)),
                cols,
                &[
                    ptr(dbias),
                    ptr(&partial),
                    int("chunks", chunks)?,
                    int("cols", cols)?,
                ],
            )
        })
    }

    fn matmul_gelu(
        &self,
        out: &CudaBuf,
        pre: &CudaBuf,
        a: &CudaBuf,
        b: &CudaBuf,
        bias: Option<&CudaBuf>,
        spec: MatmulSpec,
    ) -> Result<()> {
        self.fused_matmul_gelu(out, pre, a, b, bias, spec)
    }

    fn matmul_dgelu(
        &self,
        dpre: &CudaBuf,
        dbias: Option<&CudaBuf>,
        a: &CudaBuf,
        b: &CudaBuf,
        pre: &CudaBuf,
        spec: MatmulSpec,
    ) -> Result<()> {
        self.fused_matmul_dgelu(dpre, dbias, a, b, pre, spec)
    }

    fn matmul_bias_grad(
        &self,
        out: &CudaBuf,
        dbias: &CudaBuf,
        a: &CudaBuf,
        b: &CudaBuf,
        spec: MatmulSpec,
    ) -> Result<()> {
        self.fused_matmul_bias_grad(out, dbias, a, b, spec)
    }

    fn matmul_residual(
        &self,
        out: &CudaBuf,
        residual: &CudaBuf,
        a: &CudaBuf,
        b: &CudaBuf,
        bias: Option<&CudaBuf>,
        spec: MatmulSpec,
    ) -> Result<()> {
        self.fused_matmul_residual(out, residual, a, b, bias, spec)
    }

    fn layernorm_forward(
        &self,
        out: &CudaBuf,
        mean: &CudaBuf,
        rstd: &CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        bias: &CudaBuf,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let op = "layernorm_forward";
        shapes::layernorm_forward(out, mean, rstd, inp, weight, bias, rows, cols)?;
        same_dtype(
            op,
            out.dtype,
            &[("inp", inp), ("weight", weight), ("bias", bias)],
        )?;
        no_overlap(
            op,
            &[("out", out), ("mean", mean), ("rstd", rstd)],
            &[("inp", inp), ("weight", weight), ("bias", bias)],
        )?;
        if rows == 0 {
            return Ok(());
        }
        self.timed(op, || {
            self.queue_layernorm_forward(out, mean, rstd, inp, weight, bias, rows, cols)
        })
    }

    fn layernorm_backward(
        &self,
        dinp: &CudaBuf,
        dweight: &CudaBuf,
        dbias: &CudaBuf,
        dout: &CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        mean: &CudaBuf,
        rstd: &CudaBuf,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let op = "layernorm_backward";
        shapes::layernorm_backward(
            dinp, dweight, dbias, dout, inp, weight, mean, rstd, rows, cols,
        )?;
        same_dtype(
            op,
            dinp.dtype,
            &[("dout", dout), ("inp", inp), ("weight", weight)],
        )?;
        same_dtype(op, dweight.dtype, &[("dbias", dbias)])?;
        no_overlap(
            op,
            &[("dinp", dinp), ("dweight", dweight), ("dbias", dbias)],
            &[
                ("dout", dout),
                ("inp", inp),
                ("weight", weight),
                ("mean", mean),
                ("rstd", rstd),
            ],
        )?;
        if rows == 0 {
            return Ok(());
        }
        self.timed(op, || {
            self.queue_layernorm_backward(
                dinp, dweight, dbias, dout, inp, weight, mean, rstd, rows, cols,
            )
        })
    }

    fn gelu_forward(&self, out: &CudaBuf, inp: &CudaBuf) -> Result<()> {
        expect_len("gelu_forward", "inp", inp, out.len)?;
        same_dtype("gelu_forward", out.dtype, &[("inp", inp)])?;
        no_overlap("gelu_forward", &[("out", out)], &[("inp", inp)])?;
        self.timed("gelu_forward", || {
            let name = format!("gelu_forward_{}", tn(out.dtype));
            self.run_1d(&name, out.len, &[ptr(out), ptr(inp), long(out.len)])
        })
    }

    fn gelu_backward(&self, dinp: &CudaBuf, inp: &CudaBuf, dout: &CudaBuf) -> Result<()> {
        expect_len("gelu_backward", "inp", inp, dinp.len)?;
        expect_len("gelu_backward", "dout", dout, dinp.len)?;
        same_dtype("gelu_backward", dinp.dtype, &[("inp", inp), ("dout", dout)])?;
        no_overlap(
            "gelu_backward",
            &[("dinp", dinp)],
            &[("inp", inp), ("dout", dout)],
        )?;
        self.timed("gelu_backward", || {
            let name = format!("gelu_backward_{}", tn(dinp.dtype));
            self.run_1d(
                &name,
                dinp.len,
                &[ptr(dinp), ptr(inp), ptr(dout), long(dinp.len)],
            )
        })
    }

    fn attention_forward(
        &self,
        out: &CudaBuf,
        lse: &CudaBuf,
        qkv: &CudaBuf,
        shape: AttentionShape,
    ) -> Result<()> {
        let op = "attention_forward";
        shapes::attention_forward(out, lse, qkv, shape)?;
        let tokens = shape.batch * shape.seq;
        same_dtype(op, out.dtype, &[("qkv", qkv)])?;
        no_overlap(op, &[("out", out), ("lse", lse)], &[("qkv", qkv)])?;
        let hs = attention_head_size(op, shape)?;
        if tokens == 0 || shape.heads == 0 {
            return Ok(());
        }
        let grid = attention_grid(shape);
        self.timed(op, || {
            // bf16 at head sizes 64 and 128: tensor cores (attention_tc.rs).
            if self.attention_forward_tc(out, lse, qkv, shape)? {
                return Ok(());
            }
            self.run(
                &format!("attention_forward_{}_hs{hs}", tn(out.dtype)),
                grid,
                (attention_tile(hs), 1, 1),
                &[
                    ptr(out),
                    ptr(lse),
                    ptr(qkv),
                    int("seq", shape.seq)?,
                    int("heads", shape.heads)?,
                ],
            )
        })
    }

    fn attention_backward(
        &self,
        dqkv: &CudaBuf,
        dout: &CudaBuf,
        qkv: &CudaBuf,
        out: &CudaBuf,
        lse: &CudaBuf,
        shape: AttentionShape,
    ) -> Result<()> {
        let op = "attention_backward";
        shapes::attention_backward(dqkv, dout, qkv, out, lse, shape)?;
        let tokens = shape.batch * shape.seq;
        same_dtype(
            op,
            dqkv.dtype,
            &[("dout", dout), ("qkv", qkv), ("out", out)],
        )?;
        no_overlap(
            op,
            &[("dqkv", dqkv)],
            &[("dout", dout), ("qkv", qkv), ("out", out), ("lse", lse)],
        )?;
        let hs = attention_head_size(op, shape)?;
        if tokens == 0 || shape.heads == 0 {
            return Ok(());
        }
        let t = tn(dqkv.dtype);
        let (seq, heads) = (int("seq", shape.seq)?, int("heads", shape.heads)?);
        let grid = attention_grid(shape);
        self.timed(op, || {
            let d = self.alloc(tokens * shape.heads, DType::F32)?;
            self.run_1d(
                &format!("attention_backward_preprocess_{t}_hs{hs}"),
                tokens * shape.heads,
                &[
                    ptr(&d),
                    ptr(dout),
                    ptr(out),
                    int("batch", shape.batch)?,
                    seq,
                    heads,
                ],
            )?;
            let args = [
                ptr(dqkv),
                ptr(dout),
                ptr(qkv),
                ptr(lse),
                ptr(&d),
                seq,
                heads,
            ];
            if attention_tc_backward::takes(dqkv.dtype, hs, &[dqkv, dout, qkv]) {
                return self.attention_backward_tc(&args, shape, hs);
            }
            self.run(
                &format!("attention_backward_dkdv_{t}_hs{hs}"),
                grid,
                (attention_tile(hs), 1, 1),
                &args,
            )?;
            self.run(
                &format!("attention_backward_dq_{t}_hs{hs}"),
                grid,
                (attention_tile(hs), 1, 1),
                &args,
            )
        })
    }

    fn embedding_forward(
        &self,
        out: &CudaBuf,
        ids: &CudaIds,
        wte: &CudaBuf,
        wpe: &CudaBuf,
        batch: usize,
        seq: usize,
        channels: usize,
    ) -> Result<()> {
        let op = "embedding_forward";
        shapes::embedding(op, &ids.host, wte, wpe, ("out", out), batch, seq, channels)?;
        same_dtype(op, out.dtype, &[("wte", wte), ("wpe", wpe)])?;
        no_overlap(op, &[("out", out)], &[("wte", wte), ("wpe", wpe)])?;
        self.timed(op, || {
            self.run_1d(
                &format!("embedding_forward_{}", tn(out.dtype)),
                out.len,
                &[
                    ptr(out),
                    Arg::Ptr(ids.ptr()),
                    ptr(wte),
                    ptr(wpe),
                    int("batch", batch)?,
                    int("seq", seq)?,
                    int("channels", channels)?,
                ],
            )
        })
    }

    fn embedding_backward(
        &self,
        dwte: &CudaBuf,
        dwpe: &CudaBuf,
        dout: &CudaBuf,
        ids: &CudaIds,
        batch: usize,
        seq: usize,
        channels: usize,
    ) -> Result<()> {
        let op = "embedding_backward";
        shapes::embedding(
            op,
            &ids.host,
            dwte,
            dwpe,
            ("dout", dout),
            batch,
            seq,
            channels,
        )?;
        same_dtype(op, dwte.dtype, &[("dwpe", dwpe)])?;
        no_overlap(op, &[("dwte", dwte), ("dwpe", dwpe)], &[("dout", dout)])?;
        let kind = format!("{}_{}", tn(dwte.dtype), tn(dout.dtype));
        self.timed(op, || {
            self.run_1d(
                &format!("embedding_backward_positions_{kind}"),
                seq * channels,
                &[
                    ptr(dwpe),
                    ptr(dout),
                    int("batch", batch)?,
                    int("seq", seq)?,
                    int("channels", channels)?,
                ],
            )?;
            self.run_1d(
                &format!("embedding_backward_tokens_{kind}"),
                batch * seq * channels,
                &[
                    ptr(dwte),
                    Arg::Ptr(ids.ptr()),
                    ptr(dout),
                    int("tokens", batch * seq)?,
                    int("channels", channels)?,
                ],
            )
        })
    }

    fn cross_entropy(
        &self,
        losses: &CudaBuf,
        logits: &CudaBuf,
        targets: &CudaIds,
        rows: usize,
        vocab: usize,
        grad_scale: Option<f32>,
    ) -> Result<()> {
        let op = "cross_entropy";
        shapes::cross_entropy(losses, logits, &targets.host, rows, vocab)?;
        no_overlap(op, &[("losses", losses), ("logits", logits)], &[])?;
        if rows == 0 {
            return Ok(());
        }
        self.timed(op, || {
            self.run(
                &format!("cross_entropy_{}", tn(logits.dtype)),
                (rows as u32, 1, 1),
                // A thread per 16-byte vector of the row, up to the largest block.
                (
                    row_block(
                        vocab.div_ceil(16 / logits.dtype.size_bytes()),
                        CROSS_ENTROPY_MAX_BLOCK,
                    ),
                    1,
                    1,
                ),
                &[
                    ptr(losses),
                    ptr(logits),
                    Arg::Ptr(targets.ptr()),
                    int("rows", rows)?,
                    int("vocab", vocab)?,
                    Arg::Float(grad_scale.unwrap_or(0.0)),
                    Arg::Int(grad_scale.is_some() as i32),
                ],
            )
        })
    }

    fn adamw(
        &self,
        param: &CudaBuf,
        grad: &CudaBuf,
        m: &CudaBuf,
        v: &CudaBuf,
        param_copy: Option<&CudaBuf>,
        hp: &AdamWStep,
    ) -> Result<()> {
        let op = "adamw";
        shapes::adamw(param, grad, m, v, param_copy)?;
        no_overlap(
            op,
            &adamw_outputs(param, m, v, param_copy),
            &[("grad", grad)],
        )?;
        let copy_dtype = param_copy.map_or(DType::F32, |c| c.dtype);
        let n = param.len;
        let mut args = vec![
            ptr(param),
            ptr(grad),
            ptr(m),
            ptr(v),
            Arg::Ptr(param_copy.map_or(0, |c| c.ptr())),
            long(n),
        ];
        args.extend(hyper_args(hp));
        self.timed(op, || {
            self.run_1d(
                &format!("adamw_{}_{}", tn(grad.dtype), tn(copy_dtype)),
                n,
                &args,
            )
        })
    }

    fn adamw_segments(
        &self,
        param: &CudaBuf,
        grad: &CudaBuf,
        m: &CudaBuf,
        v: &CudaBuf,
        param_copy: Option<&CudaBuf>,
        segments: &[AdamWSegment],
        hp: &AdamWStep,
    ) -> Result<()> {
        self.adamw_segments_launch(param, grad, m, v, param_copy, segments, hp)
    }

    fn sum_squares(&self, acc: &CudaBuf, x: &CudaBuf) -> Result<()> {
        expect_len("sum_squares", "acc", acc, 1)?;
        expect_dtype("sum_squares", "acc", acc, DType::F32)?;
        no_overlap("sum_squares", &[("acc", acc)], &[("x", x)])?;
        if x.len == 0 {
            return Ok(());
        }
        self.timed("sum_squares", || {
            // One partial sum per block, added atomically: a bounded grid keeps the adds few.
            let blocks = grid_for(x.len).min(1024);
            self.run(
                &format!("sum_squares_{}", tn(x.dtype)),
                (blocks, 1, 1),
                (BLOCK, 1, 1),
                &[ptr(acc), ptr(x), long(x.len)],
            )
        })
    }
}

/// The head sizes the attention kernels are instantiated for.
fn attention_head_size(op: &str, shape: AttentionShape) -> Result<usize> {
    match shape.head_dim {
        32 | 64 | 128 => Ok(shape.head_dim),
        hs => bail!(
            "{op}: head_dim {hs} is not supported by the CUDA attention kernels (32, 64 or 128); \
             choose d_model / n_head accordingly"
        ),
    }
}

/// Grid of the tiled attention kernels: (query or key tiles, batch x heads).
fn attention_grid(shape: AttentionShape) -> (u32, u32, u32) {
    (
        (shape.seq as u32).div_ceil(attention_tile(shape.head_dim)),
        (shape.batch * shape.heads) as u32,
        1,
    )
}
