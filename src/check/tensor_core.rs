//! The tensor-core fragment check: runs the kernels of `kernels/tensor_core_check.cu` on a CUDA device
//! (a GPU or the sim) and compares each D = A * B + C with an f64 GEMM of the same bf16 inputs.
//!
//! A fragment layout wrong anywhere (a load, ldmatrix, cp.async's groups, the mma or its sim
//! emulation) shows as a failed variant before a real kernel builds on it.

use std::sync::Arc;

use anyhow::{bail, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::random;
use crate::backend::cuda::driver::{Arg, Geometry, Stream};
use crate::backend::cuda::{CudaBackend, CudaBuf, CudaDevice};
use crate::backend::{Backend, DType};

/// How one test kernel stores its operands and what it computes: A is `m x k`, B is `k x n`, C and
/// D are `m x n` row-major f32.
#[derive(Clone, Copy, Debug)]
struct Variant {
    /// The part of the entry name after `tensor_core_check_`.
    name: &'static str,
    m: usize,
    n: usize,
    k: usize,
    /// A stored k-major (`a[k][m]`) instead of row-major (`a[m][k]`).
    a_k_major: bool,
    /// B stored n-major (`b[n][k]`) instead of k-major (`b[k][n]`).
    b_n_major: bool,
    /// Threads of the one block (whole warps).
    threads: u32,
}

const fn tile(name: &'static str, a_k_major: bool, b_n_major: bool) -> Variant {
    Variant {
        name,
        m: 16,
        n: 8,
        k: 16,
        a_k_major,
        b_n_major,
        threads: 32,
    }
}

/// Every kernel of `kernels/tensor_core_check.cu`, with its layouts (see the comment of each).
const VARIANTS: &[Variant] = &[
    tile("direct", false, false),
    tile("a_cp_async_x4", false, false),
    tile("a_x4_trans", true, false),
    tile("b_x2_trans", false, false),
    tile("b_x2", false, true),
    tile("x1", false, false),
    Variant {
        name: "pipeline",
        m: 16,
        n: 16,
        k: 64,
        a_k_major: false,
        b_n_major: true,
        threads: 64,
    },
];

/// The kernel entry names, for the module index (`EXPECTED_ENTRIES` lists the same).
pub fn entry_names() -> Vec<String> {
    VARIANTS
        .iter()
        .map(|v| format!("tensor_core_check_{}", v.name))
        .collect()
}

/// The relative tolerance: the largest error allowed, as a fraction of the largest `|C| + sum |A B|`
/// of an output. Products of bf16 values are exact in f32 and at most 64 of them are summed, so an
/// f32 accumulation is off by far less (hardware tensor cores, with their own summation order and
/// internal rounding, by a few f32 ulps per mma); one misplaced fragment element moves an output by
/// a whole product, thousands of times more.
pub const FRAGMENT_TOLERANCE: f64 = 1.0 / 16384.0;

/// How one variant compared.
#[derive(Clone, Debug)]
pub struct FragmentCase {
    /// The kernel, for example `tensor_core_check_b_x2_trans`.
    pub variant: String,
    /// The largest `|D - reference|` over the outputs (NaN when the kernel could not run).
    pub max_abs_err: f64,
    /// The largest `max_abs_err` that passes: [`FRAGMENT_TOLERANCE`] times this case's scale.
    pub tolerance: f64,
    /// What went wrong beyond the error: a launch or device failure, an output not written.
    pub problem: Option<String>,
}

impl FragmentCase {
    pub fn passed(&self) -> bool {
        self.problem.is_none() && self.max_abs_err <= self.tolerance
    }
}

/// Runs every fragment variant on `device` with random inputs drawn from `seed` (never zero) and
/// reports each against the f64 reference. A variant that fails, even with a device error, is a
/// row; an error is returned only when no kernel can be tried at all (no stream, no backend).
pub fn check_tensor_cores(device: &Arc<CudaDevice>, seed: u64) -> Result<Vec<FragmentCase>> {
    let be = CudaBackend::new(device)?;
    let stream = device.driver().new_stream()?;
    let mut cases = Vec::new();
    for (i, v) in VARIANTS.iter().enumerate() {
        let variant = format!("tensor_core_check_{}", v.name);
        // Each variant its own stream of values, the same whichever variants ran before.
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (0x7e45_0000 + i as u64));
        let case = run_variant(&be, stream.as_ref(), &variant, v, &mut rng).unwrap_or_else(|e| {
            FragmentCase {
                variant: variant.clone(),
                max_abs_err: f64::NAN,
                tolerance: f64::NAN,
                problem: Some(format!("{e:#}")),
            }
        });
        cases.push(case);
    }
    Ok(cases)
}

fn upload(be: &CudaBackend, values: &[f32], dtype: DType) -> Result<CudaBuf> {
    let buf = be.alloc(values.len(), dtype)?;
    be.upload(&buf, values)?;
    Ok(buf)
}

fn run_variant(
    be: &CudaBackend,
    stream: &dyn Stream,
    entry: &str,
    v: &Variant,
    rng: &mut ChaCha8Rng,
) -> Result<FragmentCase> {
    let (m, n, k) = (v.m, v.n, v.k);
    let a = upload(be, &random::uniform(rng, m * k, 1.0), DType::Bf16)?;
    let b = upload(be, &random::uniform(rng, k * n, 1.0), DType::Bf16)?;
    let c = upload(be, &random::uniform(rng, m * n, 1.0), DType::F32)?;
    // NaN, so an output the kernel never writes cannot pass.
    let d = upload(be, &vec![f32::NAN; m * n], DType::F32)?;
    // The reference uses the values as the device holds them (rounded to bf16 by the upload).
    let (a_host, b_host, c_host) = (be.download(&a)?, be.download(&b)?, be.download(&c)?);
    be.synchronize()?;
    let geometry = Geometry {
        grid: (1, 1, 1),
        block: (v.threads, 1, 1),
        dynamic_smem_bytes: 0,
    };
    let args = [
        Arg::Ptr(d.device_address()),
        Arg::Ptr(a.device_address()),
        Arg::Ptr(b.device_address()),
        Arg::Ptr(c.device_address()),
    ];
    // SAFETY: every tensor_core_check_* kernel takes (float* d, const bf16* a, const bf16* b,
    // const float* c) and touches exactly the m x n, m x k and k x n elements allocated above; the
    // buffers outlive the stream's synchronize below, and their uploads finished before (the
    // backend's synchronize), so this other stream sees them written.
    unsafe { stream.launch(entry, &geometry, &args)? };
    stream.synchronize()?;
    let got = be.download(&d)?;

    let a_at =
        |i: usize, kk: usize| f64::from(a_host[if v.a_k_major { kk * m + i } else { i * k + kk }]);
    let b_at =
        |kk: usize, j: usize| f64::from(b_host[if v.b_n_major { j * k + kk } else { kk * n + j }]);
    let (mut max_abs_err, mut scale) = (0.0f64, 0.0f64);
    let mut unwritten = None;
    for i in 0..m {
        for j in 0..n {
            let (mut want, mut size) = (
                f64::from(c_host[i * n + j]),
                f64::from(c_host[i * n + j]).abs(),
            );
            for kk in 0..k {
                want += a_at(i, kk) * b_at(kk, j);
                size += (a_at(i, kk) * b_at(kk, j)).abs();
            }
            scale = scale.max(size);
            let out = f64::from(got[i * n + j]);
            if out.is_nan() {
                unwritten.get_or_insert(i * n + j);
                max_abs_err = f64::INFINITY;
            } else {
                max_abs_err = max_abs_err.max((out - want).abs());
            }
        }
    }
    if scale == 0.0 {
        bail!("{entry}: the random inputs are all zero");
    }
    Ok(FragmentCase {
        variant: entry.to_string(),
        max_abs_err,
        tolerance: FRAGMENT_TOLERANCE * scale,
        problem: unwritten.map(|e| {
            format!(
                "element {e} of d (row {}, column {}) was not written",
                e / n,
                e % n
            )
        }),
    })
}

/// The number of cases that did not pass.
pub fn fragment_failures(cases: &[FragmentCase]) -> usize {
    cases.iter().filter(|c| !c.passed()).count()
}

/// An aligned text table (variant, max abs err, tolerance, ok/FAIL, problem) under a title naming
/// the device, ending with `N fragment cases, M failed`.
pub fn render_fragment_report(cases: &[FragmentCase], device: &str) -> String {
    let width = cases
        .iter()
        .map(|c| c.variant.len())
        .max()
        .unwrap_or(0)
        .max("variant".len());
    let mut text = format!(
        "tensor-core fragment check on {device} (mma.m16n8k16 bf16, ldmatrix, cp.async) against an \
         f64 GEMM\n{:<width$}  {:>11}  {:>9}  result  problem\n",
        "variant", "max abs err", "tolerance"
    );
    let number = |x: f64| {
        if x.is_nan() {
            "-".to_string()
        } else {
            format!("{x:.2e}")
        }
    };
    for c in cases {
        let line = format!(
            "{:<width$}  {:>11}  {:>9}  {:<6}  {}",
            c.variant,
            number(c.max_abs_err),
            number(c.tolerance),
            if c.passed() { "ok" } else { "FAIL" },
            c.problem.as_deref().unwrap_or_default()
        );
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text.push_str(&format!(
        "{} fragment cases, {} failed\n",
        cases.len(),
        fragment_failures(cases)
    ));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_is_an_expected_entry() {
        let listed = crate::backend::kernels::EXPECTED_ENTRIES
            .iter()
            .find(|(module, _)| *module == "tensor_core_check")
            .map(|(_, entries)| *entries)
            .expect("tensor_core_check is in EXPECTED_ENTRIES");
        let names = entry_names();
        assert_eq!(names.len(), listed.len());
        for name in &names {
            assert!(
                listed.contains(&name.as_str()),
                "{name} is not in EXPECTED_ENTRIES"
            );
        }
    }

    #[test]
    fn the_report_marks_failures() {
        let cases = vec![
            FragmentCase {
                variant: "tensor_core_check_direct".into(),
                max_abs_err: 1e-7,
                tolerance: 1e-4,
                problem: None,
            },
            FragmentCase {
                variant: "tensor_core_check_x1".into(),
                max_abs_err: 0.5,
                tolerance: 1e-4,
                problem: None,
            },
        ];
        let text = render_fragment_report(&cases, "sim:0");
        assert!(text.contains("tensor_core_check_direct") && text.contains(" ok"));
        assert!(text.contains("FAIL") && text.ends_with("2 fragment cases, 1 failed\n"));
        assert_eq!(fragment_failures(&cases), 1);
    }
}
