//! The CPU backend: the reference every other backend is tested against.
//!
//! Generic over the element type it computes in: `CpuBackend<f32>` trains, `CpuBackend<f64>` runs the
//! same model for finite-difference gradient checks. Each op checks shapes and aliasing here, calls a
//! plain slice kernel from its op-family module, then rounds what it stored to the output's dtype.

mod attention;
mod elementwise;
mod embedding;
mod layernorm;
mod loss;
mod matmul;
mod optim;
mod real;
mod storage;

use std::marker::PhantomData;
use std::sync::Arc;

use anyhow::Result;

pub use real::Real;
pub use storage::CpuBuf;
use storage::{round_to_dtype, Borrows};

use super::{
    expect_dtype, expect_len, fused_linear, shapes, AdamWStep, AttentionShape, Backend, Buffer,
    DType, MatmulSpec, LAYERNORM_EPS,
};

/// Token ids in host memory.
pub type CpuIds = Arc<Vec<u32>>;

/// The CPU backend computing in `T` (f32 or f64). Multithreaded through rayon's global pool.
#[derive(Debug, Default, Clone)]
pub struct CpuBackend<T: Real = f32> {
    _elem: PhantomData<T>,
}

impl<T: Real> CpuBackend<T> {
    pub fn new() -> Self {
        CpuBackend { _elem: PhantomData }
    }
}

impl<T: Real> Backend for CpuBackend<T> {
    type Buf = CpuBuf<T>;
    type Ids = CpuIds;
    type Event = ();

    fn name(&self) -> String {
        // The element type is worth naming only when it is not the usual f32.
        let elem = if T::NAME == "f32" {
            String::new()
        } else {
            format!(", computing in {}", T::NAME)
        };
        format!("cpu ({} threads{elem})", rayon::current_num_threads())
    }

    fn alloc(&self, len: usize, dtype: DType) -> Result<CpuBuf<T>> {
        Ok(CpuBuf::zeros(len, dtype))
    }

    fn slice(&self, buf: &CpuBuf<T>, offset: usize, len: usize) -> Result<CpuBuf<T>> {
        buf.view(offset, len)
    }

    fn upload(&self, dst: &CpuBuf<T>, src: &[f32]) -> Result<()> {
        expect_len("upload", "dst", dst, src.len())?;
        let b = Borrows::check("upload", &[("dst", dst)], &[])?;
        let out = b.output(0);
        for (o, &s) in out.iter_mut().zip(src) {
            *o = T::of_f32(s);
        }
        round_to_dtype(dst.dtype(), out);
        Ok(())
    }

    fn download(&self, src: &CpuBuf<T>) -> Result<Vec<f32>> {
        Ok(src.to_vec().into_iter().map(T::as_f32).collect())
    }

    fn upload_ids(&self, ids: &[u32]) -> Result<CpuIds> {
        Ok(Arc::new(ids.to_vec()))
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn record_event(&self) -> Result<()> {
        Ok(())
    }

    fn wait_event(&self, _event: &()) -> Result<()> {
        Ok(())
    }

    fn comm_lane(&self) -> &Self {
        self
    }

    fn fill(&self, dst: &CpuBuf<T>, value: f32) -> Result<()> {
        let b = Borrows::check("fill", &[("dst", dst)], &[])?;
        let out = b.output(0);
        out.fill(T::of_f32(value));
        round_to_dtype(dst.dtype(), out);
        Ok(())
    }

    fn copy(&self, dst: &CpuBuf<T>, src: &CpuBuf<T>) -> Result<()> {
        expect_len("copy", "dst", dst, src.len())?;
        let b = Borrows::check("copy", &[("dst", dst)], &[("src", src)])?;
        let out = b.output(0);
        out.copy_from_slice(b.input(src));
        round_to_dtype(dst.dtype(), out);
        Ok(())
    }

    fn scale(&self, dst: &CpuBuf<T>, alpha: f32) -> Result<()> {
        let b = Borrows::check("scale", &[("dst", dst)], &[])?;
        let out = b.output(0);
        elementwise::scale(out, T::of_f32(alpha));
        round_to_dtype(dst.dtype(), out);
        Ok(())
    }

    fn add(&self, out: &CpuBuf<T>, a: &CpuBuf<T>, b: &CpuBuf<T>) -> Result<()> {
        expect_len("add", "a", a, out.len())?;
        expect_len("add", "b", b, out.len())?;
        let bw = Borrows::check("add", &[("out", out)], &[("a", a), ("b", b)])?;
        let o = bw.output(0);
        elementwise::add(o, bw.input(a), bw.input(b));
        round_to_dtype(out.dtype(), o);
        Ok(())
    }

    fn accumulate(&self, dst: &CpuBuf<T>, src: &CpuBuf<T>) -> Result<()> {
        expect_len("accumulate", "src", src, dst.len())?;
        let b = Borrows::check("accumulate", &[("dst", dst)], &[("src", src)])?;
        let o = b.output(0);
        elementwise::accumulate(o, b.input(src));
        round_to_dtype(dst.dtype(), o);
        Ok(())
    }

    fn matmul(
        &self,
        out: &CpuBuf<T>,
        a: &CpuBuf<T>,
        b: &CpuBuf<T>,
        bias: Option<&CpuBuf<T>>,
        spec: MatmulSpec,
    ) -> Result<()> {
        shapes::matmul(out, a, b, bias, spec)?;
        let mut ins = vec![("a", a), ("b", b)];
        if let Some(bias) = bias {
            ins.push(("bias", bias));
        }
        let bw = Borrows::check("matmul", &[("out", out)], &ins)?;
        let o = bw.output(0);
        matmul::matmul(o, bw.input(a), bw.input(b), bias.map(|x| bw.input(x)), spec);
        round_to_dtype(out.dtype(), o);
        Ok(())
    }

    fn bias_backward(
        &self,
        dbias: &CpuBuf<T>,
        dout: &CpuBuf<T>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        expect_len("bias_backward", "dbias", dbias, cols)?;
        expect_len("bias_backward", "dout", dout, rows * cols)?;
        let b = Borrows::check("bias_backward", &[("dbias", dbias)], &[("dout", dout)])?;
        let o = b.output(0);
        matmul::bias_backward(o, b.input(dout), cols);
        round_to_dtype(dbias.dtype(), o);
        Ok(())
    }

    fn matmul_dgelu(
        &self,
        dpre: &CpuBuf<T>,
        dbias: Option<&CpuBuf<T>>,
        a: &CpuBuf<T>,
        b: &CpuBuf<T>,
        pre: &CpuBuf<T>,
        spec: MatmulSpec,
    ) -> Result<()> {
        // The default's three ops, with the matmul's output kept in `dpre` instead of a
        // temporary: the same roundings in the same order, so the same bits.
        fused_linear::check_matmul_dgelu(dpre, dbias, a, b, pre, &spec)?;
        let ins = [("a", a), ("b", b), ("pre", pre)];
        let bw = Borrows::check("matmul_dgelu", &[("dpre", dpre)], &ins)?;
        let d = bw.output(0);
        matmul::matmul(d, bw.input(a), bw.input(b), None, spec);
        round_to_dtype(dpre.dtype(), d);
        elementwise::gelu_backward_in_place(d, bw.input(pre));
        round_to_dtype(dpre.dtype(), d);
        match dbias {
            Some(dbias) => self.bias_backward(dbias, dpre, spec.m, spec.n),
            None => Ok(()),
        }
    }

    fn layernorm_forward(
        &self,
        out: &CpuBuf<T>,
        mean: &CpuBuf<T>,
        rstd: &CpuBuf<T>,
        inp: &CpuBuf<T>,
        weight: &CpuBuf<T>,
        bias: &CpuBuf<T>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let op = "layernorm_forward";
        shapes::layernorm_forward(out, mean, rstd, inp, weight, bias, rows, cols)?;
        let b = Borrows::check(
            op,
            &[("out", out), ("mean", mean), ("rstd", rstd)],
            &[("inp", inp), ("weight", weight), ("bias", bias)],
        )?;
        let o = b.output(0);
        layernorm::layernorm_forward(
            o,
            b.output(1),
            b.output(2),
            b.input(inp),
            b.input(weight),
            b.input(bias),
            cols,
            LAYERNORM_EPS,
        );
        round_to_dtype(out.dtype(), o);
        Ok(())
    }

    fn layernorm_backward(
        &self,
        dinp: &CpuBuf<T>,
        dweight: &CpuBuf<T>,
        dbias: &CpuBuf<T>,
        dout: &CpuBuf<T>,
        inp: &CpuBuf<T>,
        weight: &CpuBuf<T>,
        mean: &CpuBuf<T>,
        rstd: &CpuBuf<T>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let op = "layernorm_backward";
        shapes::layernorm_backward(
            dinp, dweight, dbias, dout, inp, weight, mean, rstd, rows, cols,
        )?;
        let b = Borrows::check(
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
        let (dx, dw, db) = (b.output(0), b.output(1), b.output(2));
        layernorm::layernorm_backward(
            dx,
            dw,
            db,
            b.input(dout),
            b.input(inp),
            b.input(weight),
            b.input(mean),
            b.input(rstd),
            cols,
        );
        round_to_dtype(dinp.dtype(), dx);
        round_to_dtype(dweight.dtype(), dw);
        round_to_dtype(dbias.dtype(), db);
        Ok(())
    }

    fn gelu_forward(&self, out: &CpuBuf<T>, inp: &CpuBuf<T>) -> Result<()> {
        expect_len("gelu_forward", "inp", inp, out.len())?;
        let b = Borrows::check("gelu_forward", &[("out", out)], &[("inp", inp)])?;
        let o = b.output(0);
        elementwise::gelu_forward(o, b.input(inp));
        round_to_dtype(out.dtype(), o);
        Ok(())
    }

    fn gelu_backward(&self, dinp: &CpuBuf<T>, inp: &CpuBuf<T>, dout: &CpuBuf<T>) -> Result<()> {
        expect_len("gelu_backward", "inp", inp, dinp.len())?;
        expect_len("gelu_backward", "dout", dout, dinp.len())?;
        let b = Borrows::check(
            "gelu_backward",
            &[("dinp", dinp)],
            &[("inp", inp), ("dout", dout)],
        )?;
        let o = b.output(0);
        elementwise::gelu_backward(o, b.input(inp), b.input(dout));
        round_to_dtype(dinp.dtype(), o);
        Ok(())
    }

    fn attention_forward(
        &self,
        out: &CpuBuf<T>,
        lse: &CpuBuf<T>,
        qkv: &CpuBuf<T>,
        shape: AttentionShape,
    ) -> Result<()> {
        let op = "attention_forward";
        shapes::attention_forward(out, lse, qkv, shape)?;
        let b = Borrows::check(op, &[("out", out), ("lse", lse)], &[("qkv", qkv)])?;
        let o = b.output(0);
        attention::attention_forward(o, b.output(1), b.input(qkv), shape);
        round_to_dtype(out.dtype(), o);
        Ok(())
    }

    fn attention_backward(
        &self,
        dqkv: &CpuBuf<T>,
        dout: &CpuBuf<T>,
        qkv: &CpuBuf<T>,
        out: &CpuBuf<T>,
        lse: &CpuBuf<T>,
        shape: AttentionShape,
    ) -> Result<()> {
        let op = "attention_backward";
        shapes::attention_backward(dqkv, dout, qkv, out, lse, shape)?;
        let b = Borrows::check(
            op,
            &[("dqkv", dqkv)],
            &[("dout", dout), ("qkv", qkv), ("out", out), ("lse", lse)],
        )?;
        let o = b.output(0);
        attention::attention_backward(
            o,
            b.input(dout),
            b.input(qkv),
            b.input(out),
            b.input(lse),
            shape,
        );
        round_to_dtype(dqkv.dtype(), o);
        Ok(())
    }

    fn embedding_forward(
        &self,
        out: &CpuBuf<T>,
        ids: &CpuIds,
        wte: &CpuBuf<T>,
        wpe: &CpuBuf<T>,
        batch: usize,
        seq: usize,
        channels: usize,
    ) -> Result<()> {
        let op = "embedding_forward";
        shapes::embedding(op, ids, wte, wpe, ("out", out), batch, seq, channels)?;
        let b = Borrows::check(op, &[("out", out)], &[("wte", wte), ("wpe", wpe)])?;
        let o = b.output(0);
        embedding::embedding_forward(o, ids, b.input(wte), b.input(wpe), seq, channels);
        round_to_dtype(out.dtype(), o);
        Ok(())
    }

    fn embedding_backward(
        &self,
        dwte: &CpuBuf<T>,
        dwpe: &CpuBuf<T>,
        dout: &CpuBuf<T>,
        ids: &CpuIds,
        batch: usize,
        seq: usize,
        channels: usize,
    ) -> Result<()> {
        let op = "embedding_backward";
        shapes::embedding(op, ids, dwte, dwpe, ("dout", dout), batch, seq, channels)?;
        let b = Borrows::check(op, &[("dwte", dwte), ("dwpe", dwpe)], &[("dout", dout)])?;
        let (dt, dp) = (b.output(0), b.output(1));
        embedding::embedding_backward(dt, dp, b.input(dout), ids, seq, channels);
        round_to_dtype(dwte.dtype(), dt);
        round_to_dtype(dwpe.dtype(), dp);
        Ok(())
    }

    fn cross_entropy(
        &self,
        losses: &CpuBuf<T>,
        logits: &CpuBuf<T>,
        targets: &CpuIds,
        rows: usize,
        vocab: usize,
        grad_scale: Option<f32>,
    ) -> Result<()> {
        let op = "cross_entropy";
        shapes::cross_entropy(losses, logits, targets, rows, vocab)?;
        let b = Borrows::check(op, &[("losses", losses), ("logits", logits)], &[])?;
        let (l, g) = (b.output(0), b.output(1));
        loss::cross_entropy(l, g, targets, vocab, grad_scale.map(T::of_f32));
        if grad_scale.is_some() {
            round_to_dtype(logits.dtype(), g);
        }
        Ok(())
    }

    fn adamw(
        &self,
        param: &CpuBuf<T>,
        grad: &CpuBuf<T>,
        m: &CpuBuf<T>,
        v: &CpuBuf<T>,
        param_copy: Option<&CpuBuf<T>>,
        hp: &AdamWStep,
    ) -> Result<()> {
        let op = "adamw";
        shapes::adamw(param, grad, m, v, param_copy)?;
        let mut outs = vec![("param", param), ("m", m), ("v", v)];
        if let Some(c) = param_copy {
            outs.push(("param_copy", c));
        }
        let b = Borrows::check(op, &outs, &[("grad", grad)])?;
        let copy = param_copy.map(|_| b.output(3));
        let copy_dtype = param_copy.map(|c| c.dtype());
        let (p, mo, vo) = (b.output(0), b.output(1), b.output(2));
        let grad = b.input(grad);
        match copy {
            Some(c) => {
                optim::adamw(p, grad, mo, vo, Some(&mut *c), hp);
                round_to_dtype(copy_dtype.unwrap_or(DType::F32), c);
            }
            None => optim::adamw(p, grad, mo, vo, None, hp),
        }
        Ok(())
    }

    fn sum_squares(&self, acc: &CpuBuf<T>, x: &CpuBuf<T>) -> Result<()> {
        expect_len("sum_squares", "acc", acc, 1)?;
        expect_dtype("sum_squares", "acc", acc, DType::F32)?;
        let b = Borrows::check("sum_squares", &[("acc", acc)], &[("x", x)])?;
        let a = b.output(0);
        a[0] = T::of_f64(a[0].as_f64() + optim::sum_squares(b.input(x)));
        Ok(())
    }
}
