//! Matrix products as cuBLASLt descriptors: bf16 or f32 inputs, f32 accumulation (never TF32: the
//! f32 path must match the CPU reference to 1e-5), the bias added by the GEMM's epilogue.
//!
//! Row-major `out[m, n] = op(a) · op(b)` is computed as the column-major product
//! `outᵀ[n, m] = op(b)ᵀ · op(a)ᵀ`: a row-major matrix is its own transpose in column-major, so no
//! data moves, and the bias (one value per output column) becomes cuBLASLt's per-row bias. This
//! module only chooses the descriptor's values; the driver below carries them out (cuBLASLt on a
//! GPU, the library's documented contract on the sim), so a wrong layout is wrong on both.

use anyhow::{bail, Result};

use super::driver::{Epilogue, GemmCall, GemmDesc, MatrixLayout, NoAlgorithm, Stream};
use super::memory::{CudaBuf, DeviceMemory, MemoryStats};
use crate::backend::{DType, MatmulSpec};
use std::sync::Arc;

/// cuBLASLt workspace: NVIDIA recommends 32 MiB on Hopper.
pub(super) const WORKSPACE_BYTES: usize = 32 << 20;

/// Largest power of two (up to 256) dividing the address.
fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        256
    } else {
        (1u64 << ptr.trailing_zeros().min(8)) as u32
    }
}

/// The descriptor values for row-major `out (+)= op(a) · op(b) (+ bias)`.
pub(super) fn row_major_desc(
    s: &MatmulSpec,
    inputs: DType,
    out: DType,
    bias: Option<DType>,
    align: [u32; 4],
) -> GemmDesc {
    let (m, n, k) = (s.m as u64, s.n as u64, s.k as u64);
    // cuBLASLt's A is our b as stored: [k, n] row-major = (n x k, ld n) column-major, or [n, k]
    // row-major = (k x n, ld k), transposed to n x k. Its B is our a, likewise.
    let a = if s.trans_b {
        MatrixLayout {
            dtype: inputs,
            rows: k,
            cols: n,
            ld: k,
        }
    } else {
        MatrixLayout {
            dtype: inputs,
            rows: n,
            cols: k,
            ld: n,
        }
    };
    let b = if s.trans_a {
        MatrixLayout {
            dtype: inputs,
            rows: m,
            cols: k,
            ld: m,
        }
    } else {
        MatrixLayout {
            dtype: inputs,
            rows: k,
            cols: m,
            ld: k,
        }
    };
    GemmDesc {
        trans_a: s.trans_b,
        trans_b: s.trans_a,
        a,
        b,
        d: MatrixLayout {
            dtype: out,
            rows: n,
            cols: m,
            ld: n,
        },
        epilogue: if bias.is_some() {
            Epilogue::Bias
        } else {
            Epilogue::Default
        },
        bias,
        aux_ld: 0,
        align,
        accumulate: s.accumulate,
        out_of_place: false,
    }
}

/// What a fused product adds to [`Blas::matmul`]'s operands (see `fused_linear.rs`).
pub(super) struct Fusion<'a> {
    pub epilogue: Epilogue,
    /// The bias the epilogue adds, or the vector its bias gradient overwrites.
    pub bias: Option<&'a CudaBuf>,
    /// The auxiliary `[m, n]` row-major matrix (GELU's input), leading dimension `n`.
    pub aux: Option<&'a CudaBuf>,
    /// C when distinct from `out` (beta = 1 with C = this, the residual).
    pub c: Option<&'a CudaBuf>,
}

/// One rank's matmul state: the cuBLASLt workspace, allocated at the first product.
pub(super) struct Blas {
    workspace: DeviceMemory,
}

impl Blas {
    pub(super) fn new(stream: &Arc<dyn Stream>, stats: &Arc<MemoryStats>) -> Result<Blas> {
        Ok(Blas {
            workspace: DeviceMemory::new(stream, stats, WORKSPACE_BYTES)?,
        })
    }

    /// `out (+)= op(a) · op(b) (+ bias)` on `stream`; the caller checked lengths and overlap.
    pub(super) fn matmul(
        &self,
        stream: &dyn Stream,
        out: &CudaBuf,
        a: &CudaBuf,
        b: &CudaBuf,
        bias: Option<&CudaBuf>,
        s: MatmulSpec,
    ) -> Result<()> {
        let epilogue = if bias.is_some() {
            Epilogue::Bias
        } else {
            Epilogue::Default
        };
        let fusion = Fusion {
            epilogue,
            bias,
            aux: None,
            c: None,
        };
        self.gemm(stream, out, a, b, &fusion, s)
    }

    /// A product with an epilogue; the caller checked lengths, overlap, dtypes of the fused
    /// operands and the epilogue's requirements (`fused_linear.rs`). A [`NoAlgorithm`] error
    /// (`super::driver::NoAlgorithm`) comes back unwrapped, so the caller can fall back.
    pub(super) fn gemm(
        &self,
        stream: &dyn Stream,
        out: &CudaBuf,
        a: &CudaBuf,
        b: &CudaBuf,
        f: &Fusion<'_>,
        s: MatmulSpec,
    ) -> Result<()> {
        if a.dtype != b.dtype {
            bail!(
                "matmul: `a` is {} and `b` is {}; the CUDA backend multiplies operands of one dtype",
                a.dtype,
                b.dtype
            );
        }
        if a.dtype == DType::F32 && out.dtype != DType::F32 {
            bail!(
                "matmul: f32 operands need an f32 `out` on CUDA, it is {}",
                out.dtype
            );
        }
        if let Some(bias) = f.bias {
            if bias.dtype != out.dtype {
                bail!(
                    "matmul: `bias` is {} and `out` is {}; cuBLASLt's bias epilogues need them equal",
                    bias.dtype,
                    out.dtype
                );
            }
        }
        let align = [
            alignment(b.ptr()),
            alignment(a.ptr()),
            alignment(out.ptr()).min(f.c.map_or(256, |c| alignment(c.ptr()))),
            f.bias.map_or(256, |x| alignment(x.ptr())),
        ];
        let mut desc = row_major_desc(&s, a.dtype, out.dtype, f.bias.map(|x| x.dtype), align);
        desc.epilogue = f.epilogue;
        // Row-major [m, n] is column-major n x m with leading dimension n, like D.
        desc.aux_ld = if f.aux.is_some() { s.n as u64 } else { 0 };
        desc.accumulate = s.accumulate || f.c.is_some();
        desc.out_of_place = f.c.is_some();
        let call = GemmCall {
            desc,
            // Column-major: the first operand is b, the second a (see the module docs).
            a: b.ptr(),
            b: a.ptr(),
            c: f.c.map_or(out.ptr(), |c| c.ptr()),
            d: out.ptr(),
            bias: f.bias.map_or(0, |x| x.ptr()),
            aux: f.aux.map_or(0, |x| x.ptr()),
            workspace: self.workspace.ptr(),
            workspace_bytes: WORKSPACE_BYTES,
        };
        // SAFETY: every address is a live buffer of the lengths the caller checked against the
        // shapes the layouts describe; the workspace lives as long as this Blas.
        unsafe { stream.gemm(&call) }.map_err(|e| {
            if e.is::<NoAlgorithm>() {
                return e;
            }
            anyhow::anyhow!(
                "matmul m={} n={} k={} (trans_a {}, trans_b {}, {} -> {}, epilogue {:?}): {e:#}",
                s.m,
                s.n,
                s.k,
                s.trans_a,
                s.trans_b,
                a.dtype,
                out.dtype,
                f.epilogue
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_is_the_largest_power_of_two_up_to_256() {
        assert_eq!(alignment(0x1000), 256);
        assert_eq!(alignment(0x1002), 2);
        assert_eq!(alignment(0x1010), 16);
        assert_eq!(alignment(0x1080), 128);
    }

    #[test]
    fn a_row_major_product_is_the_transposed_column_major_one() {
        let s = MatmulSpec {
            m: 3,
            n: 5,
            k: 7,
            trans_a: false,
            trans_b: true,
            accumulate: false,
        };
        let d = row_major_desc(&s, DType::Bf16, DType::F32, None, [256; 4]);
        // b is [n, k] = [5, 7] row-major: column-major 7 x 5, transposed to 5 x 7 = n x k.
        assert!(d.trans_a && !d.trans_b);
        assert_eq!((d.a.rows, d.a.cols, d.a.ld), (7, 5, 7));
        // a is [m, k] = [3, 7] row-major: column-major 7 x 3 = k x m.
        assert_eq!((d.b.rows, d.b.cols, d.b.ld), (7, 3, 7));
        assert_eq!((d.d.rows, d.d.cols, d.d.ld), (5, 3, 5));
    }
}
