//! Planted bugs the simulated GPU must catch, so that its passing checks mean something: a kernel
//! with a `__syncthreads` removed (wrong results on the sim, a data race under ThreadSanitizer),
//! a kernel writing past the end of its buffer (the sim's guard bytes; AddressSanitizer), and a
//! stream that skips its event wait before reading what another stream writes (ThreadSanitizer).
//! Each broken kernel is a copy of the real file with one change, built into its own library.

mod common;
use common::sim::{rebuild_with, sanitizers_built, shardtrain_on, sim_built, sim_env, Flavor};
use common::text;

use std::path::Path;
use std::process::Command;

use shardtrain::backend::cuda::{CudaBackend, CudaDevice};
use shardtrain::backend::{Backend, DType};

/// `kernels/reduce.cu` without the barrier between the row lanes' partial sums and lane 0's total.
fn without_syncthreads(src: &str) -> String {
    let line = "    __syncthreads();\n    if (threadIdx.y == 0 && col < cols) {\n        for (int lane = 1; lane < ROW_LANES; lane++)";
    assert!(
        src.contains(line),
        "reduce.cu changed: update the planted bug"
    );
    src.replacen(line, &line.replacen("    __syncthreads();\n", "", 1), 1)
}

/// `kernels/elementwise.cu` with `fill` writing one element further than it owns.
fn writing_past_the_end(src: &str) -> String {
    let line = "FOR_EACH(i, n) dst[i] = from_f32<T>(value);";
    assert!(
        src.contains(line),
        "elementwise.cu changed: update the planted bug"
    );
    src.replacen(line, "FOR_EACH(i, n) dst[i + 1] = from_f32<T>(value);", 1)
}

fn check_on(flavor: Flavor, lib: &Path, filter: &str) -> (bool, String) {
    let out = shardtrain_on(
        flavor,
        lib,
        &["check", "--device", "sim", "--filter", filter],
    );
    let all = format!("{}\n{}", text(&out.stdout), text(&out.stderr));
    (out.status.success(), all)
}

#[test]
fn a_removed_syncthreads_gives_wrong_sums_on_the_sim() {
    if !sim_built() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let lib = rebuild_with(
        Flavor::Plain,
        "reduce.cu",
        "reduce",
        without_syncthreads,
        tmp.path(),
    );
    let (ok, out) = check_on(Flavor::Plain, &lib, "bias_backward");
    assert!(
        !ok && out.contains("FAIL"),
        "the missing barrier went unnoticed:\n{out}"
    );
    // The real file passes the same check.
    let (ok, out) = check_on(
        Flavor::Plain,
        Path::new(Flavor::Plain.library()),
        "bias_backward",
    );
    assert!(ok, "{out}");
}

#[test]
fn a_removed_syncthreads_is_a_data_race_under_thread_sanitizer() {
    if !sanitizers_built() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let lib = rebuild_with(
        Flavor::Tsan,
        "reduce.cu",
        "reduce",
        without_syncthreads,
        tmp.path(),
    );
    let (ok, out) = check_on(Flavor::Tsan, &lib, "bias_backward");
    assert!(
        !ok && out.contains("ThreadSanitizer: data race") && out.contains("column_partial_sums"),
        "ThreadSanitizer did not report the missing barrier:\n{out}"
    );
}

#[test]
fn a_write_past_the_end_is_caught_by_the_guard_bytes() {
    if !sim_built() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let lib = rebuild_with(
        Flavor::Plain,
        "elementwise.cu",
        "elementwise",
        writing_past_the_end,
        tmp.path(),
    );
    let (ok, out) = check_on(Flavor::Plain, &lib, "fill");
    assert!(
        !ok && out.contains("fill_f32") && out.to_lowercase().contains("out of bounds"),
        "the write past the end went unnoticed:\n{out}"
    );
}

#[test]
fn a_write_past_the_end_is_caught_by_address_sanitizer() {
    if !sanitizers_built() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let lib = rebuild_with(
        Flavor::Asan,
        "elementwise.cu",
        "elementwise",
        writing_past_the_end,
        tmp.path(),
    );
    let (ok, out) = check_on(Flavor::Asan, &lib, "fill");
    assert!(
        !ok && out.contains("heap-buffer-overflow") && out.contains("fill"),
        "AddressSanitizer did not report the write past the end:\n{out}"
    );
}

/// Child half of the event-wait test: the compute stream fills a buffer, the comm lane copies it
/// out, waiting for the fill only when `wait` (run in a child process under ThreadSanitizer).
fn copy_on_the_lane(wait: bool) -> anyhow::Result<()> {
    let be = CudaBackend::new(&CudaDevice::open_sim()?)?;
    let n = 1 << 16;
    let src = be.alloc(n, DType::F32)?;
    let dst = be.alloc(n, DType::F32)?;
    be.synchronize()?;
    be.fill(&src, 1.5)?;
    let lane = be.comm_lane();
    if wait {
        lane.wait_event(&be.record_event()?)?;
    }
    lane.copy(&dst, &src)?;
    be.synchronize()?;
    Ok(())
}

#[test]
fn event_wait_child() {
    // Only as the child of the test below, which sets the variable.
    if let Ok(mode) = std::env::var("SHARDTRAIN_EVENT_WAIT_CHILD") {
        copy_on_the_lane(mode == "wait").unwrap();
    }
}

#[test]
fn a_skipped_event_wait_is_a_data_race_under_thread_sanitizer() {
    if !sanitizers_built() {
        return;
    }
    let run = |mode: &str| {
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "event_wait_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .envs(sim_env(Flavor::Tsan, Path::new(Flavor::Tsan.library())))
            .env("SHARDTRAIN_EVENT_WAIT_CHILD", mode)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!("{}\n{}", text(&out.stdout), text(&out.stderr)),
        )
    };
    let (ok, out) = run("wait");
    assert!(
        ok && !out.contains("ThreadSanitizer"),
        "with the wait:\n{out}"
    );
    let (ok, out) = run("skip");
    assert!(
        !ok && out.contains("ThreadSanitizer: data race"),
        "ThreadSanitizer did not report the skipped event wait:\n{out}"
    );
}
