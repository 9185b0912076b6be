//! The GPT-2 decoder: forward pass and its hand-written backward, written only against the Backend
//! ops and reaching weights only through [`UnitAccess`].
//!
//! Block (pre-LayerNorm):  x2 = x + proj(attn(ln1(x)));  x3 = x2 + fcproj(gelu(fc(ln2(x2))))
//! Head: logits = lnf(x_L) · wteᵀ (tied), loss = cross-entropy, fused with its gradient.
//! The backward pass runs the same steps in reverse; comments name the forward line each undoes.

use anyhow::{ensure, Result};

use super::activations::Activations;
use super::layout::{GptShape, ParamLayout};
use super::units::{BlockViews, EmbedHeadViews, UnitAccess};
use crate::backend::{AttentionShape, Backend, DType, MatmulSpec};

/// A GPT model: its layout and the activation buffers of the last micro-batch shape it ran.
pub struct Gpt<B: Backend> {
    pub layout: ParamLayout,
    /// Precision of parameters as the layers see them, and of activations.
    pub dtype: DType,
    acts: Option<Activations<B>>,
}

/// The product of a linear layer in PyTorch's weight layout, `inp [rows, in] · wᵀ`.
fn linear_spec(rows: usize, in_features: usize, out_features: usize) -> MatmulSpec {
    MatmulSpec {
        m: rows,
        n: out_features,
        k: in_features,
        trans_a: false,
        trans_b: true,
        accumulate: false,
    }
}

/// `out = inp · wᵀ + b` for `rows` tokens: a linear layer in PyTorch's weight layout.
fn linear_forward<B: Backend>(
    be: &B,
    out: &B::Buf,
    inp: &B::Buf,
    w: &B::Buf,
    b: Option<&B::Buf>,
    rows: usize,
    in_features: usize,
    out_features: usize,
) -> Result<()> {
    be.matmul(out, inp, w, b, linear_spec(rows, in_features, out_features))
}

/// Backward of [`linear_forward`]: overwrites `dinp` (when given: a GELU before the layer takes
/// its input gradient from [`Backend::matmul_dgelu`] instead), accumulates `dw` and `db` (the bias
/// gradient in the weight gradient's call).
fn linear_backward<B: Backend>(
    be: &B,
    dinp: Option<&B::Buf>,
    dw: &B::Buf,
    db: Option<&B::Buf>,
    dout: &B::Buf,
    inp: &B::Buf,
    w: &B::Buf,
    rows: usize,
    in_features: usize,
    out_features: usize,
) -> Result<()> {
    if let Some(dinp) = dinp {
        // dinp (rows, in) = dout (rows, out) · w (out, in)
        be.matmul(
            dinp,
            dout,
            w,
            None,
            input_grad_spec(rows, in_features, out_features),
        )?;
    }
    // dw (out, in) += doutᵀ (out, rows) · inp (rows, in); db (out) += Σ_rows dout
    let spec = MatmulSpec {
        m: out_features,
        n: in_features,
        k: rows,
        trans_a: true,
        trans_b: false,
        accumulate: true,
    };
    match db {
        Some(db) => be.matmul_bias_grad(dw, db, dout, inp, spec),
        None => be.matmul(dw, dout, inp, None, spec),
    }
}

/// The input gradient's product of a linear layer: `dout [rows, out] · w [out, in]`.
fn input_grad_spec(rows: usize, in_features: usize, out_features: usize) -> MatmulSpec {
    MatmulSpec {
        m: rows,
        n: in_features,
        k: out_features,
        trans_a: false,
        trans_b: false,
        accumulate: false,
    }
}

impl<B: Backend> Gpt<B> {
    pub fn new(layout: ParamLayout, dtype: DType) -> Self {
        Gpt {
            layout,
            dtype,
            acts: None,
        }
    }

    pub fn shape(&self) -> &GptShape {
        &self.layout.shape
    }

    /// Activation buffers for this micro-batch shape, reallocated only when the shape changes.
    fn ensure_acts(&mut self, be: &B, batch: usize, seq: usize) -> Result<()> {
        ensure!(
            seq >= 1 && seq <= self.layout.shape.block_size,
            "sequence length {seq} is outside 1..={} (the position table)",
            self.layout.shape.block_size
        );
        let fits = self
            .acts
            .as_ref()
            .is_some_and(|a| a.batch == batch && a.seq == seq);
        if !fits {
            self.acts = None; // free the old buffers before allocating new ones
            self.acts = Some(Activations::alloc(
                be,
                &self.layout.shape,
                batch,
                seq,
                self.dtype,
            )?);
        }
        Ok(())
    }

    /// Activations of the last forward pass (logits, per-token losses), if any ran.
    pub fn activations(&self) -> Option<&Activations<B>> {
        self.acts.as_ref()
    }

    /// Forward pass over `inputs` (`batch × seq` ids). With targets, per-token losses are written to
    /// the activations' `losses`; with `grad_scale` as well, the logits are replaced by the gradient
    /// of `grad_scale · Σ losses` (the start of [`Gpt::backward`]).
    pub fn forward(
        &mut self,
        be: &B,
        units: &mut impl UnitAccess<B>,
        inputs: &B::Ids,
        targets: Option<&B::Ids>,
        grad_scale: Option<f32>,
        batch: usize,
        seq: usize,
    ) -> Result<()> {
        self.ensure_acts(be, batch, seq)?;
        let layout = &self.layout;
        let s = layout.shape;
        let acts = self.acts.as_ref().expect("ensured above");
        let (n, c) = (batch * seq, s.d_model);
        let attn = attention_shape(&s, batch, seq);

        let root_buf = units.params(be, ParamLayout::EMBED_HEAD_UNIT)?;
        let root = EmbedHeadViews::new(be, layout, &root_buf)?;
        be.embedding_forward(&acts.encoded, inputs, &root.wte, &root.wpe, batch, seq, c)?;

        for (l, a) in acts.blocks.iter().enumerate() {
            let unit = ParamLayout::block_unit(l);
            let buf = units.params(be, unit)?;
            let p = BlockViews::new(be, layout, l, &buf)?;
            let x = block_input(acts, l);
            be.layernorm_forward(
                &a.ln1,
                &a.ln1_mean,
                &a.ln1_rstd,
                x,
                &p.ln1_w,
                &p.ln1_b,
                n,
                c,
            )?;
            linear_forward(be, &a.qkv, &a.ln1, &p.qkv_w, Some(&p.qkv_b), n, c, 3 * c)?;
            be.attention_forward(&a.atty, &a.lse, &a.qkv, attn)?;
            // x2 = x + proj(atty), the residual add fused into the projection.
            be.matmul_residual(
                &a.residual2,
                x,
                &a.atty,
                &p.proj_w,
                Some(&p.proj_b),
                linear_spec(n, c, c),
            )?;
            be.layernorm_forward(
                &a.ln2,
                &a.ln2_mean,
                &a.ln2_rstd,
                &a.residual2,
                &p.ln2_w,
                &p.ln2_b,
                n,
                c,
            )?;
            // fch_gelu = gelu(fch), fch = fc(ln2): one call, fch kept for the backward.
            be.matmul_gelu(
                &a.fch_gelu,
                &a.fch,
                &a.ln2,
                &p.fc_w,
                Some(&p.fc_b),
                linear_spec(n, c, 4 * c),
            )?;
            be.matmul_residual(
                &a.residual3,
                &a.residual2,
                &a.fch_gelu,
                &p.fcproj_w,
                Some(&p.fcproj_b),
                linear_spec(n, 4 * c, c),
            )?;
            units.forward_done(be, unit)?;
        }

        let last = block_input(acts, s.n_layer);
        be.layernorm_forward(
            &acts.lnf,
            &acts.lnf_mean,
            &acts.lnf_rstd,
            last,
            &root.lnf_w,
            &root.lnf_b,
            n,
            c,
        )?;
        linear_forward(
            be,
            &acts.logits,
            &acts.lnf,
            &root.wte,
            None,
            n,
            c,
            s.vocab_size,
        )?;
        units.forward_done(be, ParamLayout::EMBED_HEAD_UNIT)?;
        if let Some(targets) = targets {
            be.cross_entropy(
                &acts.losses,
                &acts.logits,
                targets,
                n,
                s.vocab_size,
                grad_scale,
            )?;
        }
        Ok(())
    }

    /// Backward pass after a `forward` with targets and `grad_scale`: accumulates every parameter's
    /// gradient into the units' gradient buffers.
    pub fn backward(
        &mut self,
        be: &B,
        units: &mut impl UnitAccess<B>,
        inputs: &B::Ids,
    ) -> Result<()> {
        let layout = &self.layout;
        let s = layout.shape;
        let acts = self
            .acts
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("backward called before forward"))?;
        let (batch, seq) = (acts.batch, acts.seq);
        let (n, c) = (batch * seq, s.d_model);
        let attn = attention_shape(&s, batch, seq);
        let root_buf = units.params(be, ParamLayout::EMBED_HEAD_UNIT)?;
        let root_grad_buf = units.grads(be, ParamLayout::EMBED_HEAD_UNIT)?;
        let root = EmbedHeadViews::new(be, layout, &root_buf)?;
        let droot = EmbedHeadViews::new(be, layout, &root_grad_buf)?;

        // logits = lnf · wteᵀ  (acts.logits now holds dlogits)
        linear_backward(
            be,
            Some(&acts.dln),
            &droot.wte,
            None,
            &acts.logits,
            &acts.lnf,
            &root.wte,
            n,
            c,
            s.vocab_size,
        )?;
        // lnf = layernorm(x_L): the residual stream's gradient starts here.
        be.fill(&acts.dresidual, 0.0)?;
        let last = block_input(acts, s.n_layer);
        be.layernorm_backward(
            &acts.dresidual,
            &droot.lnf_w,
            &droot.lnf_b,
            &acts.dln,
            last,
            &root.lnf_w,
            &acts.lnf_mean,
            &acts.lnf_rstd,
            n,
            c,
        )?;

        for (l, a) in acts.blocks.iter().enumerate().rev() {
            let unit = ParamLayout::block_unit(l);
            let buf = units.params(be, unit)?;
            let gbuf = units.grads(be, unit)?;
            let p = BlockViews::new(be, layout, l, &buf)?;
            let g = BlockViews::new(be, layout, l, &gbuf)?;
            let x = block_input(acts, l);
            // x3 = x2 + fcproj(..): dresidual flows on unchanged to x2 and into the branch.
            // fch_gelu = gelu(fch): dfch = (dresidual · fcproj_w) ∘ gelu'(fch) in one call, with
            // fc's bias gradient (the column sums of dfch).
            be.matmul_dgelu(
                &acts.dfch,
                Some(&g.fc_b),
                &acts.dresidual,
                &p.fcproj_w,
                &a.fch,
                input_grad_spec(n, 4 * c, c),
            )?;
            linear_backward(
                be,
                None,
                &g.fcproj_w,
                Some(&g.fcproj_b),
                &acts.dresidual,
                &a.fch_gelu,
                &p.fcproj_w,
                n,
                4 * c,
                c,
            )?;
            linear_backward(
                be,
                Some(&acts.dln),
                &g.fc_w,
                None,
                &acts.dfch,
                &a.ln2,
                &p.fc_w,
                n,
                c,
                4 * c,
            )?;
            be.layernorm_backward(
                &acts.dresidual,
                &g.ln2_w,
                &g.ln2_b,
                &acts.dln,
                &a.residual2,
                &p.ln2_w,
                &a.ln2_mean,
                &a.ln2_rstd,
                n,
                c,
            )?;
            // x2 = x + proj(attn(..)): dresidual flows on to x and into the attention branch.
            linear_backward(
                be,
                Some(&acts.datty),
                &g.proj_w,
                Some(&g.proj_b),
                &acts.dresidual,
                &a.atty,
                &p.proj_w,
                n,
                c,
                c,
            )?;
            be.attention_backward(&acts.dqkv, &acts.datty, &a.qkv, &a.atty, &a.lse, attn)?;
            linear_backward(
                be,
                Some(&acts.dln),
                &g.qkv_w,
                Some(&g.qkv_b),
                &acts.dqkv,
                &a.ln1,
                &p.qkv_w,
                n,
                c,
                3 * c,
            )?;
            be.layernorm_backward(
                &acts.dresidual,
                &g.ln1_w,
                &g.ln1_b,
                &acts.dln,
                x,
                &p.ln1_w,
                &a.ln1_mean,
                &a.ln1_rstd,
                n,
                c,
            )?;
            units.backward_done(be, unit)?;
        }

        // encoded = wte[ids] + wpe[t]
        be.embedding_backward(
            &droot.wte,
            &droot.wpe,
            &acts.dresidual,
            inputs,
            batch,
            seq,
            c,
        )?;
        units.backward_done(be, ParamLayout::EMBED_HEAD_UNIT)
    }

    /// Mean of the per-token losses of the last forward pass with targets.
    pub fn mean_loss(&self, be: &B) -> Result<f32> {
        let acts = self
            .acts
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no forward pass has run"))?;
        let losses = be.download(&acts.losses)?;
        let sum: f64 = losses.iter().map(|&x| f64::from(x)).sum();
        Ok((sum / losses.len() as f64) as f32)
    }
}

fn attention_shape(s: &GptShape, batch: usize, seq: usize) -> AttentionShape {
    AttentionShape {
        batch,
        seq,
        heads: s.n_head,
        head_dim: s.d_model / s.n_head,
    }
}

/// The residual stream entering block `l` (`l == n_layer`: the final LayerNorm's input).
fn block_input<B: Backend>(acts: &Activations<B>, l: usize) -> &B::Buf {
    if l == 0 {
        &acts.encoded
    } else {
        &acts.blocks[l - 1].residual3
    }
}
