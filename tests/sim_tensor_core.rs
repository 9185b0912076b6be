//! The tensor-core fragments on the simulated GPU: every variant of kernels/tensor_core_check.cu
//! matches the f64 reference with two seeds, and planted bugs make the check fail.
//!
//! The planted bugs: a check kernel with two A registers swapped (a kernel whose fragments are
//! wrong), a pipeline that waits for too few cp.async groups (it reads tiles still in flight), and
//! the sim's mma emulation reading A from the wrong register (an emulation off the PTX layout).

mod common;
use common::sim::{rebuild_with, sim_built, sim_env, Flavor};
use common::text;

use std::path::Path;
use std::process::Command;

use shardtrain::backend::cuda::CudaDevice;
use shardtrain::check::tensor_core::{
    check_tensor_cores, fragment_failures, render_fragment_report,
};

const CHILD_ENV: &str = "SHARDTRAIN_TENSOR_CORE_CHILD";

/// Runs the check on a fresh sim device and fails (panics) unless every variant passes.
fn check_passes(seed: u64) {
    let device = CudaDevice::open_sim().unwrap();
    let cases = check_tensor_cores(&device, seed).unwrap();
    let report = render_fragment_report(&cases, &device.describe());
    println!("{report}");
    assert!(cases.len() >= 7, "too few variants ran:\n{report}");
    assert_eq!(fragment_failures(&cases), 0, "seed {seed}:\n{report}");
}

#[test]
fn every_fragment_variant_passes_on_the_sim() {
    if !sim_built() {
        return;
    }
    for seed in [1, 2] {
        check_passes(seed);
    }
}

#[test]
fn tensor_core_child() {
    // Only as the child of the planted-bug tests, which set the variable and the sim library.
    if std::env::var_os(CHILD_ENV).is_some() {
        check_passes(1);
    }
}

/// Runs [`tensor_core_child`] in a child process on the library at `lib`: (passed, output).
fn check_with(lib: &Path) -> (bool, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "tensor_core_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .envs(sim_env(Flavor::Plain, lib))
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    (
        out.status.success(),
        format!("{}\n{}", text(&out.stdout), text(&out.stderr)),
    )
}

/// `kernels/tensor_core_check.cu` with the direct A load's registers 1 and 2 swapped (rows 8-15,
/// k 0-7 and rows 0-7, k 8-15 exchanged): the classic misreading of the A fragment.
fn swapped_a_registers(src: &str) -> String {
    let (one, two) = (
        "    a[1] = pack_bf16x2(bottom[0], bottom[1]);\n",
        "    a[2] = pack_bf16x2(top[8], top[9]);\n",
    );
    assert!(
        src.contains(one) && src.contains(two),
        "tensor_core_check.cu changed: update the planted bug"
    );
    src.replacen(one, "    a[1] = pack_bf16x2(top[8], top[9]);\n", 1)
        .replacen(two, "    a[2] = pack_bf16x2(bottom[0], bottom[1]);\n", 1)
}

/// `kernels/tensor_core_check.cu` with the pipeline leaving two groups in flight instead of one, so
/// each step multiplies a stage whose copies have not completed.
fn waits_for_too_few_groups(src: &str) -> String {
    let line = "        cp_async_wait<1>();\n";
    assert!(
        src.contains(line),
        "tensor_core_check.cu changed: update the planted bug"
    );
    src.replacen(line, "        cp_async_wait<2>();\n", 1)
}

/// `kernels/tensor_core.cuh` with the mma emulation taking rows 8-15 of A from the register of
/// columns 8-15 (register 2 instead of 1).
fn emulation_misreads_a(src: &str) -> String {
    let line = "const int reg = (row >= 8 ? 1 : 0) + (col >= 8 ? 2 : 0);";
    assert!(
        src.contains(line),
        "tensor_core.cuh changed: update the planted bug"
    );
    src.replacen(
        line,
        "const int reg = (row >= 8 ? 2 : 0) + (col >= 8 ? 1 : 0);",
        1,
    )
}

#[test]
fn a_kernel_with_its_a_fragment_wrong_fails_on_the_sim() {
    if !sim_built() {
        return;
    }
    // The real library passes in the same child setup, so the failure below is the planted bug.
    let (ok, out) = check_with(Path::new(Flavor::Plain.library()));
    assert!(ok, "the unchanged kernels fail:\n{out}");
    let tmp = tempfile::tempdir().unwrap();
    let lib = rebuild_with(
        Flavor::Plain,
        "tensor_core_check.cu",
        "tensor_core_check",
        swapped_a_registers,
        tmp.path(),
    );
    let (ok, out) = check_with(&lib);
    let failed_line = out
        .lines()
        .find(|l| l.starts_with("tensor_core_check_direct "))
        .unwrap_or_default();
    assert!(
        !ok && failed_line.contains("FAIL"),
        "the swapped A registers went unnoticed:\n{out}"
    );
    // Variants that load A by ldmatrix do not use the broken load and still pass.
    let ldmatrix_line = out
        .lines()
        .find(|l| l.starts_with("tensor_core_check_a_cp_async_x4 "))
        .unwrap_or_default();
    assert!(ldmatrix_line.contains(" ok"), "{out}");
}

#[test]
fn a_pipeline_reading_tiles_still_in_flight_fails_on_the_sim() {
    if !sim_built() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let lib = rebuild_with(
        Flavor::Plain,
        "tensor_core_check.cu",
        "tensor_core_check",
        waits_for_too_few_groups,
        tmp.path(),
    );
    let (ok, out) = check_with(&lib);
    let line = |variant: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("{variant} ")))
            .unwrap_or_default()
            .to_string()
    };
    // The sim performs a copy only when a wait covers its group: the early reads see stale tiles.
    assert!(
        !ok && line("tensor_core_check_pipeline").contains("FAIL"),
        "the pipeline's missing wait went unnoticed:\n{out}"
    );
    assert!(line("tensor_core_check_direct").contains(" ok"), "{out}");
}

#[test]
fn an_mma_emulation_off_the_ptx_layout_fails_on_the_sim() {
    if !sim_built() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let lib = rebuild_with(
        Flavor::Plain,
        "tensor_core.cuh",
        "tensor_core_check",
        emulation_misreads_a,
        tmp.path(),
    );
    let (ok, out) = check_with(&lib);
    // Every variant multiplies through the emulated mma, so every one fails.
    let failed = out
        .lines()
        .filter(|l| l.starts_with("tensor_core_check_") && l.contains("FAIL"))
        .count();
    assert!(
        !ok && failed >= 7,
        "the misplaced A registers went unnoticed:\n{out}"
    );
}
