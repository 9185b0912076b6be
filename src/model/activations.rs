//! Buffers the forward pass saves for the backward pass, and the backward pass's scratch, for one
//! micro-batch shape. Shapes use N = batch·seq tokens, C channels, V vocabulary, NH heads.

use anyhow::Result;

use super::layout::GptShape;

use crate::backend::{Backend, Buffer, DType};

/// Bytes [`Activations::alloc`] allocates for this shape, without allocating (for planning).
pub fn activation_bytes(s: &GptShape, batch: usize, seq: usize, dtype: DType) -> usize {
    let n = batch * seq;
    let c = s.d_model;
    let act = dtype.size_bytes();
    // Per block: ln1, atty, residual2, ln2, residual3 (N x C); qkv (N x 3C); fch, fch_gelu (N x 4C);
    // f32 statistics: 4 x N (LayerNorm mean/rstd) + NH x N (attention lse).
    let per_block = (5 * n * c + 3 * n * c + 8 * n * c) * act + (4 * n + s.n_head * n) * 4;
    // encoded, lnf, branch_out, dresidual, dln, datty (N x C); dqkv (N x 3C); dfch_gelu, dfch
    // (N x 4C); logits (N x V); f32: lnf mean/rstd, losses (3 x N).
    let top = (6 * n * c + 3 * n * c + 8 * n * c + n * s.vocab_size) * act + 3 * n * 4;
    s.n_layer * per_block + top
}

/// Saved activations of one transformer block.
pub struct BlockActs<B: Backend> {
    /// (N, C) LayerNorm 1 output, with its (N) mean and reciprocal std (f32).
    pub ln1: B::Buf,
    pub ln1_mean: B::Buf,
    pub ln1_rstd: B::Buf,
    /// (N, 3C) fused query/key/value projections.
    pub qkv: B::Buf,
    /// (N, C) attention output before the output projection.
    pub atty: B::Buf,
    /// (B, NH, T) log-sum-exp of each query's attention scores (f32).
    pub lse: B::Buf,
    /// (N, C) residual stream after the attention branch.
    pub residual2: B::Buf,
    /// (N, C) LayerNorm 2 output, with its mean and reciprocal std.
    pub ln2: B::Buf,
    pub ln2_mean: B::Buf,
    pub ln2_rstd: B::Buf,
    /// (N, 4C) MLP hidden layer before and after GELU.
    pub fch: B::Buf,
    pub fch_gelu: B::Buf,
    /// (N, C) residual stream after the block (the next block's input).
    pub residual3: B::Buf,
}

/// Everything one forward + backward of a (batch, seq) micro-batch needs.
pub struct Activations<B: Backend> {
    pub batch: usize,
    pub seq: usize,
    /// (N, C) token + position embeddings: the first block's input.
    pub encoded: B::Buf,
    pub blocks: Vec<BlockActs<B>>,
    /// (N, C) final LayerNorm output, with its mean and reciprocal std.
    pub lnf: B::Buf,
    pub lnf_mean: B::Buf,
    pub lnf_rstd: B::Buf,
    /// (N, V) logits; overwritten in place by their gradient during backward.
    pub logits: B::Buf,
    /// (N) per-token loss (f32).
    pub losses: B::Buf,
    /// (N, C) output of a projection before it joins the residual stream (forward scratch).
    pub branch_out: B::Buf,
    /// Backward scratch: (N, C) gradient of the residual stream, (N, C) gradient of a LayerNorm
    /// output, (N, C) gradient of the attention output, (N, 3C) of qkv, (N, 4C) of the MLP hidden
    /// layer after and before GELU.
    pub dresidual: B::Buf,
    pub dln: B::Buf,
    pub datty: B::Buf,
    pub dqkv: B::Buf,
    pub dfch_gelu: B::Buf,
    pub dfch: B::Buf,
}

impl<B: Backend> Activations<B> {
    pub fn alloc(be: &B, s: &GptShape, batch: usize, seq: usize, dtype: DType) -> Result<Self> {
        let n = batch * seq;
        let c = s.d_model;
        let act = |len: usize| be.alloc(len, dtype);
        let stat = |len: usize| be.alloc(len, DType::F32);
        let blocks = (0..s.n_layer)
            .map(|_| {
                Ok(BlockActs {
                    ln1: act(n * c)?,
                    ln1_mean: stat(n)?,
                    ln1_rstd: stat(n)?,
                    qkv: act(n * 3 * c)?,
                    atty: act(n * c)?,
                    lse: stat(batch * s.n_head * seq)?,
                    residual2: act(n * c)?,
                    ln2: act(n * c)?,
                    ln2_mean: stat(n)?,
                    ln2_rstd: stat(n)?,
                    fch: act(n * 4 * c)?,
                    fch_gelu: act(n * 4 * c)?,
                    residual3: act(n * c)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Activations {
            batch,
            seq,
            encoded: act(n * c)?,
            blocks,
            lnf: act(n * c)?,
            lnf_mean: stat(n)?,
            lnf_rstd: stat(n)?,
            logits: act(n * s.vocab_size)?,
            losses: stat(n)?,
            branch_out: act(n * c)?,
            dresidual: act(n * c)?,
            dln: act(n * c)?,
            datty: act(n * c)?,
            dqkv: act(n * 3 * c)?,
            dfch_gelu: act(n * 4 * c)?,
            dfch: act(n * 4 * c)?,
        })
    }

    /// Bytes these buffers occupy on a device (for memory accounting).
    pub fn bytes(&self) -> usize {
        let size = |b: &B::Buf| b.len() * b.dtype().size_bytes();
        let per_block: usize = self
            .blocks
            .iter()
            .map(|a| {
                [
                    &a.ln1,
                    &a.ln1_mean,
                    &a.ln1_rstd,
                    &a.qkv,
                    &a.atty,
                    &a.lse,
                    &a.residual2,
                    &a.ln2,
                    &a.ln2_mean,
                    &a.ln2_rstd,
                    &a.fch,
                    &a.fch_gelu,
                    &a.residual3,
                ]
                .into_iter()
                .map(size)
                .sum::<usize>()
            })
            .sum();
        per_block
            + [
                &self.encoded,
                &self.lnf,
                &self.lnf_mean,
                &self.lnf_rstd,
                &self.logits,
                &self.losses,
                &self.branch_out,
                &self.dresidual,
                &self.dln,
                &self.datty,
                &self.dqkv,
                &self.dfch_gelu,
                &self.dfch,
            ]
            .into_iter()
            .map(size)
            .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    #[test]
    fn planned_bytes_match_the_allocation() {
        let s = GptShape {
            n_layer: 3,
            n_head: 2,
            d_model: 8,
            vocab_size: 19,
            block_size: 9,
        };
        let be = CpuBackend::<f32>::new();
        for dtype in [DType::F32, DType::Bf16] {
            let acts = Activations::alloc(&be, &s, 3, 7, dtype).unwrap();
            assert_eq!(acts.bytes(), activation_bytes(&s, 3, 7, dtype));
        }
    }
}
