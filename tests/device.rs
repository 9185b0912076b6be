//! Device selection as a user meets it on a machine without a usable GPU (every CI machine):
//! `device: cuda` is one clear error and leaves nothing behind, `auto` trains on the CPU, and the
//! op check runs against the CPU backend itself. (On a GPU machine, `scripts/gpu-check.sh` covers
//! the other side; these tests then check only what still applies.)

mod common;
use common::{shardtrain, text};

use shardtrain::backend::cuda::unavailable_reason;
use shardtrain::backend::kernels::CUDA_COMPILED;

/// Whether this machine and build can run the CUDA backend.
fn gpu_usable() -> bool {
    CUDA_COMPILED && unavailable_reason().is_none()
}

#[rustfmt::skip]
const TWO_STEPS: &[&str] = &[
    "--set", "model.n_layer=1",
    "--set", "model.d_model=32",
    "--set", "model.n_head=1",
    "--set", "model.seq_len=16",
    "--set", "train.micro_batch_size=2",
    "--set", "train.global_batch_size=2",
    "--set", "train.max_steps=2",
    "--set", "train.warmup_steps=1",
    "--set", "train.eval_every=0",
    "--set", "checkpoint.save_final=false",
];

#[test]
fn device_cuda_without_a_gpu_is_one_clear_error_and_writes_nothing() {
    if gpu_usable() {
        return; // the GPU script checks this machine's CUDA path
    }
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let mut args = vec!["train", "--run-dir", run.to_str().unwrap()];
    args.extend_from_slice(TWO_STEPS);
    args.extend_from_slice(&["--set", "device=cuda"]);
    let out = shardtrain(&args);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr:\n{stderr}");
    let names_the_cause = if CUDA_COMPILED {
        stderr.contains("libcuda") || stderr.contains("no GPU")
    } else {
        stderr.contains("built without CUDA kernels") && stderr.contains("NVCC")
    };
    assert!(names_the_cause, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "one line, no backtrace: {stderr}"
    );
    assert!(
        !run.exists(),
        "no run directory for a job that cannot start"
    );
}

#[test]
fn device_auto_without_a_gpu_trains_on_the_cpu() {
    if gpu_usable() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let mut args = vec!["train", "--run-dir", run.to_str().unwrap()];
    args.extend_from_slice(TWO_STEPS);
    let out = shardtrain(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    let device = summary["device"].as_str().unwrap();
    assert!(device.starts_with("cpu"), "{device}");
    assert!(summary["device_memory_peak"].is_null());
    assert!(summary["median_step_seconds"].as_f64().unwrap() > 0.0);
}

#[test]
fn op_check_of_the_cpu_backend_passes_and_a_filter_matching_nothing_is_a_usage_error() {
    // "gelu_" and not "gelu": the fused `matmul_gelu` and `matmul_dgelu` contain "gelu" too.
    let out = shardtrain(&["check", "--device", "cpu", "--filter", "gelu_"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("gelu_forward") && stdout.contains("gelu_backward"));
    assert!(
        !stdout.contains("matmul"),
        "the filter keeps only gelu: {stdout}"
    );

    let out = shardtrain(&["check", "--device", "cpu", "--filter", "no_such_op"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("no_such_op"));
}

#[test]
fn op_check_on_cuda_without_a_gpu_says_why() {
    if gpu_usable() {
        return;
    }
    let out = shardtrain(&["check"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("CUDA") && !stderr.contains("panicked"),
        "{stderr}"
    );
}
