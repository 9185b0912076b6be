//! Op-by-op check of a backend against the CPU reference computing in f64.
//!
//! [`check_ops`] runs every op of the [`Backend`] trait on a backend under test (the *subject*) and
//! on `CpuBackend<f64>` (the *reference*) over many seeded random cases: odd and unit shapes, f32,
//! bf16 and mixed-precision operands. Both receive the very same host values (each upload rounds to
//! the buffer's dtype, so bf16 inputs are identical), outputs an op overwrites start as NaN on the
//! subject so an element it forgets to write shows up, and every output is judged with a max error
//! scaled by the output's largest reference value (see [`compare`]'s docs). The result is a
//! [`CheckReport`], one row per case, meant to be read by a person porting a backend: which op, which
//! shapes and dtypes, how far off, and what went wrong.
//!
//! Files: `compare` judges one buffer, `random` draws host values, `harness` runs one case on both
//! backends, `cases/` lists the cases of each op, `report` holds the results and renders them;
//! `tensor_core` checks the tensor-core fragments of `kernels/tensor_core.cuh` on CUDA devices.

mod cases;
mod compare;
mod harness;
mod random;
mod report;
pub mod tensor_core;

use anyhow::Result;

use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::error::UsageError;

pub use compare::{BF16_TOLERANCE, F32_TOLERANCE, POISON};
pub use report::{CaseResult, CheckReport};

/// What to check.
#[derive(Clone, Debug, Default)]
pub struct CheckOptions {
    /// Seed of the random inputs; each op draws from its own stream keyed by the seed and its name,
    /// so a filtered run sees the same values as a full one.
    pub seed: u64,
    /// Run only the ops whose name contains this substring (for example `attention` or `matmul`).
    pub filter: Option<String>,
}

/// Runs every op's cases (those matching `opts.filter`) on `subject` and on the f64 CPU reference
/// and reports how each compares. A case that fails, even with an error from the subject, is a row
/// of the report, never an early return; the only error is a filter that matches no op (a [`UsageError`]).
pub fn check_ops<S: Backend>(subject: &S, opts: &CheckOptions) -> Result<CheckReport> {
    let reference = CpuBackend::<f64>::new();
    let ops = cases::all::<S>();
    let selected: Vec<_> = ops
        .iter()
        .filter(|(name, _)| opts.filter.as_deref().is_none_or(|f| name.contains(f)))
        .collect();
    if selected.is_empty() {
        let names: Vec<&str> = ops.iter().map(|(name, _)| *name).collect();
        return Err(UsageError(format!(
            "no op name contains `{}` (ops: {})",
            opts.filter.as_deref().unwrap_or_default(),
            names.join(", ")
        ))
        .into());
    }
    let mut results = Vec::new();
    for (op, run) in selected {
        let mut cx = harness::Ctx::new(subject, &reference, op, opts.seed);
        run(&mut cx);
        results.extend(cx.into_results());
    }
    Ok(CheckReport {
        cases: results,
        subject: subject.name(),
    })
}
