//! Linear layers fused with what follows them (as cuBLASLt's epilogues do): the shape checks of
//! the four fused ops of [`Backend`] and their compositions of the plain ops, which are the trait's
//! default implementations (the CPU reference keeps them, so its numbers are those of the unfused
//! ops to the bit) and the CUDA backend's fallback where an epilogue cannot be used.
//!
//! Nothing here knows about devices: only the contract of each op, in row-major terms.

use anyhow::{bail, Result};

use super::{expect_len, shapes, Backend, Buffer, MatmulSpec};

fn no_accumulate(op: &str, spec: &MatmulSpec) -> Result<()> {
    if spec.accumulate {
        bail!("{op}: `spec.accumulate` must be false (this op overwrites its outputs)");
    }
    Ok(())
}

fn same_dtype<B: Buffer>(op: &str, what: &str, buf: &B, other: &str, of: &B) -> Result<()> {
    if buf.dtype() != of.dtype() {
        bail!(
            "{op}: `{what}` is {} but `{other}` is {}; they must have one dtype",
            buf.dtype(),
            of.dtype()
        );
    }
    Ok(())
}

/// Checks of [`Backend::matmul_gelu`].
pub fn check_matmul_gelu<B: Buffer>(
    out: &B,
    pre: &B,
    a: &B,
    b: &B,
    bias: Option<&B>,
    spec: &MatmulSpec,
) -> Result<()> {
    let op = "matmul_gelu";
    no_accumulate(op, spec)?;
    shapes::matmul(pre, a, b, bias, *spec)?;
    expect_len(op, "out", out, spec.m * spec.n)?;
    same_dtype(op, "pre", pre, "out", out)
}

/// Checks of [`Backend::matmul_dgelu`].
pub fn check_matmul_dgelu<B: Buffer>(
    dpre: &B,
    dbias: Option<&B>,
    a: &B,
    b: &B,
    pre: &B,
    spec: &MatmulSpec,
) -> Result<()> {
    let op = "matmul_dgelu";
    no_accumulate(op, spec)?;
    shapes::matmul(dpre, a, b, None, *spec)?;
    expect_len(op, "pre", pre, spec.m * spec.n)?;
    same_dtype(op, "pre", pre, "dpre", dpre)?;
    if let Some(dbias) = dbias {
        expect_len(op, "dbias", dbias, spec.n)?;
    }
    Ok(())
}

/// Checks of [`Backend::matmul_bias_grad`].
pub fn check_matmul_bias_grad<B: Buffer>(
    out: &B,
    dbias: &B,
    a: &B,
    b: &B,
    spec: &MatmulSpec,
) -> Result<()> {
    let op = "matmul_bias_grad";
    if !spec.trans_a {
        bail!(
            "{op}: `a` must be transposed (stored [k, m], the layer's output gradient): the bias \
             gradient sums its columns"
        );
    }
    shapes::matmul(out, a, b, None, *spec)?;
    expect_len(op, "dbias", dbias, spec.m)
}

/// Checks of [`Backend::matmul_residual`].
pub fn check_matmul_residual<B: Buffer>(
    out: &B,
    residual: &B,
    a: &B,
    b: &B,
    bias: Option<&B>,
    spec: &MatmulSpec,
) -> Result<()> {
    let op = "matmul_residual";
    no_accumulate(op, spec)?;
    shapes::matmul(out, a, b, bias, *spec)?;
    expect_len(op, "residual", residual, spec.m * spec.n)?;
    same_dtype(op, "residual", residual, "out", out)
}

/// [`Backend::matmul_gelu`] as a matmul into `pre`, then GELU into `out`.
pub fn matmul_gelu<B: Backend + ?Sized>(
    be: &B,
    out: &B::Buf,
    pre: &B::Buf,
    a: &B::Buf,
    b: &B::Buf,
    bias: Option<&B::Buf>,
    spec: MatmulSpec,
) -> Result<()> {
    check_matmul_gelu(out, pre, a, b, bias, &spec)?;
    be.matmul(pre, a, b, bias, spec)?;
    be.gelu_forward(out, pre)
}

/// [`Backend::matmul_dgelu`] as a matmul into a temporary, the GELU backward into `dpre`, then the
/// bias gradient of `dpre`. The temporary is allocated per call: a backend on the step path
/// overrides this (the CPU computes in place, CUDA in one cuBLASLt call).
pub fn matmul_dgelu<B: Backend + ?Sized>(
    be: &B,
    dpre: &B::Buf,
    dbias: Option<&B::Buf>,
    a: &B::Buf,
    b: &B::Buf,
    pre: &B::Buf,
    spec: MatmulSpec,
) -> Result<()> {
    check_matmul_dgelu(dpre, dbias, a, b, pre, &spec)?;
    let dout = be.alloc(spec.m * spec.n, dpre.dtype())?;
    be.matmul(&dout, a, b, None, spec)?;
    be.gelu_backward(dpre, pre, &dout)?;
    match dbias {
        Some(dbias) => be.bias_backward(dbias, dpre, spec.m, spec.n),
        None => Ok(()),
    }
}

/// [`Backend::matmul_bias_grad`] as a matmul, then the column sums of `a` (stored `[k, m]`).
pub fn matmul_bias_grad<B: Backend + ?Sized>(
    be: &B,
    out: &B::Buf,
    dbias: &B::Buf,
    a: &B::Buf,
    b: &B::Buf,
    spec: MatmulSpec,
) -> Result<()> {
    check_matmul_bias_grad(out, dbias, a, b, &spec)?;
    be.matmul(out, a, b, None, spec)?;
    be.bias_backward(dbias, a, spec.k, spec.m)
}

/// [`Backend::matmul_residual`] as a matmul into `out`, then `out += residual` (the same sum as
/// `add(out, residual, branch)`: IEEE addition is commutative, so the bits are those of the
/// unfused residual add).
pub fn matmul_residual<B: Backend + ?Sized>(
    be: &B,
    out: &B::Buf,
    residual: &B::Buf,
    a: &B::Buf,
    b: &B::Buf,
    bias: Option<&B::Buf>,
    spec: MatmulSpec,
) -> Result<()> {
    check_matmul_residual(out, residual, a, b, bias, &spec)?;
    be.matmul(out, a, b, bias, spec)?;
    be.accumulate(out, residual)
}

#[cfg(test)]
mod tests {
    //! The CPU reference's fused ops are the unfused ops the model called before, to the bit.
    use crate::backend::cpu::CpuBackend;
    use crate::backend::{Backend, DType, MatmulSpec};

    fn filled(
        be: &CpuBackend,
        len: usize,
        dtype: DType,
        seed: usize,
    ) -> crate::backend::cpu::CpuBuf<f32> {
        let b = be.alloc(len, dtype).unwrap();
        let v: Vec<f32> = (0..len)
            .map(|i| (((i * 37 + seed * 101) % 97) as f32 / 97.0 - 0.5) * 3.0)
            .collect();
        be.upload(&b, &v).unwrap();
        b
    }

    fn bits(be: &CpuBackend, b: &crate::backend::cpu::CpuBuf<f32>) -> Vec<u32> {
        be.download(b)
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    }

    #[test]
    fn cpu_fused_ops_equal_the_unfused_sequence_bit_for_bit() {
        let be = CpuBackend::<f32>::new();
        let (m, n, k) = (13, 24, 9);
        for dtype in [DType::F32, DType::Bf16] {
            // The MLP backward: dpre = (dy · w) ∘ gelu'(pre), db += Σ dpre.
            let (dy, w, pre) = (
                filled(&be, m * k, dtype, 1),
                filled(&be, k * n, dtype, 2),
                filled(&be, m * n, dtype, 3),
            );
            let spec = MatmulSpec {
                m,
                n,
                k,
                trans_a: false,
                trans_b: false,
                accumulate: false,
            };
            let (fused, fused_db) = (
                be.alloc(m * n, dtype).unwrap(),
                filled(&be, n, DType::F32, 4),
            );
            be.matmul_dgelu(&fused, Some(&fused_db), &dy, &w, &pre, spec)
                .unwrap();
            let (tmp, plain, plain_db) = (
                be.alloc(m * n, dtype).unwrap(),
                be.alloc(m * n, dtype).unwrap(),
                filled(&be, n, DType::F32, 4),
            );
            be.matmul(&tmp, &dy, &w, None, spec).unwrap();
            be.gelu_backward(&plain, &pre, &tmp).unwrap();
            be.bias_backward(&plain_db, &plain, m, n).unwrap();
            assert_eq!(bits(&be, &fused), bits(&be, &plain), "{dtype} dpre");
            assert_eq!(bits(&be, &fused_db), bits(&be, &plain_db), "{dtype} dbias");

            // The residual branch: out = x + (a · wᵀ + b), before as a matmul and an add.
            let (x, a, wt, bias) = (
                filled(&be, m * n, dtype, 5),
                filled(&be, m * k, dtype, 6),
                filled(&be, n * k, dtype, 7),
                filled(&be, n, dtype, 8),
            );
            let spec = MatmulSpec {
                trans_b: true,
                ..spec
            };
            let fused = be.alloc(m * n, dtype).unwrap();
            be.matmul_residual(&fused, &x, &a, &wt, Some(&bias), spec)
                .unwrap();
            let (branch, plain) = (
                be.alloc(m * n, dtype).unwrap(),
                be.alloc(m * n, dtype).unwrap(),
            );
            be.matmul(&branch, &a, &wt, Some(&bias), spec).unwrap();
            be.add(&plain, &x, &branch).unwrap();
            assert_eq!(bits(&be, &fused), bits(&be, &plain), "{dtype} residual");
        }
    }
}
