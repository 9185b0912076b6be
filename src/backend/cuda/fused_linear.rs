//! The fused linear-layer ops of the CUDA backend: one cuBLASLt matmul with an epilogue each
//! (GELU_AUX_BIAS, DGELU_BGRAD, BGRADB, and beta = 1 with C distinct from D for the residual).
//!
//! Each op checks its operands as the CPU reference does, then decides here, in the shared code,
//! whether the epilogue's documented requirements hold (so the sim sees the same choice as a GPU):
//! where they do not, or where a real GPU's heuristic has no algorithm for the descriptor
//! ([`NoAlgorithm`]), it runs the unfused composition of `backend::fused_linear` instead.
//! cuBLASLt's bias-gradient epilogues overwrite their vector while gradients accumulate, so they
//! write a scratch vector that is then added to the gradient. That vector has D's dtype (the
//! documented default), so the bias gradient is fused only where D is f32: a bf16 scratch would
//! round the sum once more before the accumulate (seen failing the op check where the gradient
//! cancels); with a bf16 D the bias gradient is the deterministic column-sum kernel instead.

use std::sync::Arc;

use anyhow::Result;

use super::blas::Fusion;
use super::driver::{Epilogue, NoAlgorithm};
use super::{no_overlap, CudaBackend, CudaBuf};
use crate::backend::{fused_linear as unfused, Backend, DType, MatmulSpec};

/// cuBLASLt's requirement on the auxiliary matrix: its leading dimension (here `n`, the row
/// length) a multiple of 8 elements, its address aligned to 16 bytes.
fn aux_fits(aux: &CudaBuf, spec: &MatmulSpec) -> bool {
    spec.n.is_multiple_of(8) && aux.ptr().is_multiple_of(16)
}

/// What every fused product needs: a non-empty product (cuBLASLt refuses k = 0) of operands of
/// one dtype, into an output the plain matmul could write (f32 operands need an f32 output).
fn product_fits(out: &CudaBuf, a: &CudaBuf, b: &CudaBuf, spec: &MatmulSpec) -> bool {
    spec.m > 0
        && spec.n > 0
        && spec.k > 0
        && a.dtype == b.dtype
        && (a.dtype == DType::Bf16 || out.dtype == DType::F32)
}

impl CudaBackend {
    /// Uninitialised device memory for `len` values the epilogue overwrites entirely.
    fn epilogue_scratch(&self, len: usize, dtype: DType) -> Result<CudaBuf> {
        Ok(CudaBuf {
            mem: Arc::new(self.raw_alloc(len * dtype.size_bytes())?),
            offset: 0,
            len,
            dtype,
        })
    }

    /// Queues the fused product; `Ok(false)` when the GPU's library has no algorithm for it.
    fn fused_gemm(
        &self,
        op: &'static str,
        out: &CudaBuf,
        a: &CudaBuf,
        b: &CudaBuf,
        f: &Fusion<'_>,
        spec: MatmulSpec,
    ) -> Result<bool> {
        let ran = self.timed(op, || {
            self.blas()?.gemm(self.stream.as_ref(), out, a, b, f, spec)
        });
        match ran {
            Ok(()) => Ok(true),
            Err(e) if e.is::<NoAlgorithm>() => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub(super) fn fused_matmul_gelu(
        &self,
        out: &CudaBuf,
        pre: &CudaBuf,
        a: &CudaBuf,
        b: &CudaBuf,
        bias: Option<&CudaBuf>,
        spec: MatmulSpec,
    ) -> Result<()> {
        unfused::check_matmul_gelu(out, pre, a, b, bias, &spec)?;
        let mut ins = vec![("a", a), ("b", b)];
        ins.extend(bias.map(|x| ("bias", x)));
        no_overlap("matmul_gelu", &[("out", out), ("pre", pre)], &ins)?;
        let bias_fits = bias.is_none_or(|x| x.dtype == out.dtype);
        if product_fits(out, a, b, &spec) && aux_fits(pre, &spec) && bias_fits {
            let f = Fusion {
                epilogue: match bias {
                    Some(_) => Epilogue::GeluAuxBias,
                    None => Epilogue::GeluAux,
                },
                bias,
                aux: Some(pre),
                c: None,
            };
            if self.fused_gemm("matmul_gelu", out, a, b, &f, spec)? {
                return Ok(());
            }
        }
        unfused::matmul_gelu(self, out, pre, a, b, bias, spec)
    }

    pub(super) fn fused_matmul_dgelu(
        &self,
        dpre: &CudaBuf,
        dbias: Option<&CudaBuf>,
        a: &CudaBuf,
        b: &CudaBuf,
        pre: &CudaBuf,
        spec: MatmulSpec,
    ) -> Result<()> {
        unfused::check_matmul_dgelu(dpre, dbias, a, b, pre, &spec)?;
        let mut outs = vec![("dpre", dpre)];
        outs.extend(dbias.map(|x| ("dbias", x)));
        no_overlap("matmul_dgelu", &outs, &[("a", a), ("b", b), ("pre", pre)])?;
        if product_fits(dpre, a, b, &spec) && aux_fits(pre, &spec) {
            let fuse_bgrad = dbias.is_some() && dpre.dtype == DType::F32;
            let scratch = match fuse_bgrad {
                true => Some(self.epilogue_scratch(spec.n, dpre.dtype)?),
                false => None,
            };
            let f = Fusion {
                epilogue: match fuse_bgrad {
                    true => Epilogue::DGeluBGrad,
                    false => Epilogue::DGelu,
                },
                bias: scratch.as_ref(),
                aux: Some(pre),
                c: None,
            };
            if self.fused_gemm("matmul_dgelu", dpre, a, b, &f, spec)? {
                return match (dbias, &scratch) {
                    (Some(dbias), Some(s)) => self.accumulate(dbias, s),
                    (Some(dbias), None) => self.bias_backward(dbias, dpre, spec.m, spec.n),
                    (None, _) => Ok(()),
                };
            }
        }
        unfused::matmul_dgelu(self, dpre, dbias, a, b, pre, spec)
    }

    pub(super) fn fused_matmul_bias_grad(
        &self,
        out: &CudaBuf,
        dbias: &CudaBuf,
        a: &CudaBuf,
        b: &CudaBuf,
        spec: MatmulSpec,
    ) -> Result<()> {
        unfused::check_matmul_bias_grad(out, dbias, a, b, &spec)?;
        no_overlap(
            "matmul_bias_grad",
            &[("out", out), ("dbias", dbias)],
            &[("a", a), ("b", b)],
        )?;
        if product_fits(out, a, b, &spec) && out.dtype == DType::F32 {
            // Column-major, `a` is cuBLASLt's B (transposed, as BGRADB needs): the reduction over
            // k gives one value per column of D, our m.
            let scratch = self.epilogue_scratch(spec.m, out.dtype)?;
            let f = Fusion {
                epilogue: Epilogue::BGradB,
                bias: Some(&scratch),
                aux: None,
                c: None,
            };
            if self.fused_gemm("matmul_bias_grad", out, a, b, &f, spec)? {
                return self.accumulate(dbias, &scratch);
            }
        }
        unfused::matmul_bias_grad(self, out, dbias, a, b, spec)
    }

    pub(super) fn fused_matmul_residual(
        &self,
        out: &CudaBuf,
        residual: &CudaBuf,
        a: &CudaBuf,
        b: &CudaBuf,
        bias: Option<&CudaBuf>,
        spec: MatmulSpec,
    ) -> Result<()> {
        unfused::check_matmul_residual(out, residual, a, b, bias, &spec)?;
        let mut ins = vec![("a", a), ("b", b), ("residual", residual)];
        ins.extend(bias.map(|x| ("bias", x)));
        no_overlap("matmul_residual", &[("out", out)], &ins)?;
        let bias_fits = bias.is_none_or(|x| x.dtype == out.dtype);
        if product_fits(out, a, b, &spec) && bias_fits {
            let f = Fusion {
                epilogue: match bias {
                    Some(_) => Epilogue::Bias,
                    None => Epilogue::Default,
                },
                bias,
                aux: None,
                c: Some(residual),
            };
            if self.fused_gemm("matmul_residual", out, a, b, &f, spec)? {
                return Ok(());
            }
        }
        unfused::matmul_residual(self, out, residual, a, b, bias, spec)
    }
}
