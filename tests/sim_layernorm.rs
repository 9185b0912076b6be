//! LayerNorm and cross-entropy kernels on the simulated GPU beyond the op check's accuracy: the
//! backward's parameter gradients are bit-identical from run to run and device to device (fixed
//! chunking, fixed-order sums, scratch reused or grown between calls), and planted bugs in the
//! kernels' new paths (a skipped chunk, a vector load one element short, a sum not rescaled, a
//! vector access at an unaligned row) fail the op check.

mod common;
use common::sim::{rebuild_with, shardtrain_on, sim_built, Flavor};
use common::text;

use std::path::Path;

use shardtrain::backend::cuda::{CudaBackend, CudaDevice};
use shardtrain::backend::{Backend, DType};

/// Deterministic values in [-scale, scale) with an offset per row, so rows have their own mean.
fn values(n: usize, cols: usize, seed: u32, scale: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let u = (state >> 8) as f32 / (1u32 << 24) as f32;
            (2.0 * u - 1.0) * scale + ((i / cols) % 7) as f32 * 0.25
        })
        .collect()
}

/// The bits of dinp, dweight and dbias after one LayerNorm forward and backward on `be`.
fn backward_bits(be: &CudaBackend, rows: usize, cols: usize) -> Vec<u32> {
    let act = DType::Bf16;
    let upload = |v: &[f32], dtype| {
        let b = be.alloc(v.len(), dtype).unwrap();
        be.upload(&b, v).unwrap();
        b
    };
    let inp = upload(&values(rows * cols, cols, 1, 2.0), act);
    let weight = upload(&values(cols, cols, 2, 1.5), act);
    let bias = upload(&values(cols, cols, 3, 0.5), act);
    let dout = upload(&values(rows * cols, cols, 4, 1.0), act);
    let dinp = upload(&values(rows * cols, cols, 5, 1.0), act);
    let dweight = upload(&values(cols, cols, 6, 1.0), DType::F32);
    let dbias = upload(&values(cols, cols, 7, 1.0), DType::F32);
    let out = be.alloc(rows * cols, act).unwrap();
    let mean = be.alloc(rows, DType::F32).unwrap();
    let rstd = be.alloc(rows, DType::F32).unwrap();
    be.layernorm_forward(&out, &mean, &rstd, &inp, &weight, &bias, rows, cols)
        .unwrap();
    be.layernorm_backward(
        &dinp, &dweight, &dbias, &dout, &inp, &weight, &mean, &rstd, rows, cols,
    )
    .unwrap();
    let mut bits = Vec::new();
    for b in [&dinp, &dweight, &dbias] {
        bits.extend(be.download(b).unwrap().iter().map(|x| x.to_bits()));
    }
    bits
}

#[test]
fn layernorm_backward_is_bit_identical_across_runs_devices_and_scratch_sizes() {
    if !sim_built() {
        return;
    }
    // 2000 rows: 500 chunks of 4 rows, so the final sum adds many partial rows.
    let (rows, cols) = (2000, 768);
    let a = CudaBackend::new(&CudaDevice::open_sim().unwrap()).unwrap();
    let first = backward_bits(&a, rows, cols);
    // A smaller call in between reuses the scratch; a larger one grows it.
    backward_bits(&a, 3, 64);
    backward_bits(&a, 4000, 1024);
    assert!(
        first == backward_bits(&a, rows, cols),
        "a second run differs"
    );
    let b = CudaBackend::new(&CudaDevice::open_sim().unwrap()).unwrap();
    assert!(
        first == backward_bits(&b, rows, cols),
        "another device differs"
    );
}

/// `shardtrain check --filter <op>` with `file` planted by `mutate`: whether it passed, and its
/// output.
fn check_planted(file: &str, mutate: impl Fn(&str) -> String, op: &str) -> (bool, String) {
    let tmp = tempfile::tempdir().unwrap();
    let module = file.trim_end_matches(".cu");
    let lib = rebuild_with(Flavor::Plain, file, module, mutate, tmp.path());
    let out = shardtrain_on(
        Flavor::Plain,
        &lib,
        &["check", "--device", "sim", "--filter", op],
    );
    let all = format!("{}\n{}", text(&out.stdout), text(&out.stderr));
    (out.status.success(), all)
}

/// `src` with `from` replaced by `to`, which must occur (else the plant is stale).
fn plant(src: &str, from: &str, to: &str) -> String {
    assert!(
        src.contains(from),
        "the kernel changed: update the planted bug `{from}`"
    );
    src.replacen(from, to, 1)
}

#[test]
fn planted_layernorm_bugs_fail_the_op_check() {
    if !sim_built() {
        return;
    }
    // The real kernels pass.
    for op in ["layernorm_forward", "layernorm_backward"] {
        let out = shardtrain_on(
            Flavor::Plain,
            Path::new(Flavor::Plain.library()),
            &["check", "--device", "sim", "--filter", op],
        );
        assert!(out.status.success(), "{}", text(&out.stdout));
    }
    // The final sum skips the last chunk of partial parameter gradients.
    let skip_chunk = |s: &str| {
        let total = "for (int k = threadIdx.y; k < chunks; k += 8)";
        plant(
            s,
            total,
            "for (int k = threadIdx.y; k < chunks - 1; k += 8)",
        )
    };
    let (ok, out) = check_planted("layernorm.cu", skip_chunk, "layernorm_backward");
    assert!(
        !ok && out.contains("FAIL"),
        "a skipped chunk went unnoticed:\n{out}"
    );
    // A 16-byte slot load drops its last element.
    let short_vector = |s: &str| {
        let load = "        load_vec(p + c, v);\n        return;";
        plant(
            s,
            load,
            "        load_vec(p + c, v);\n        v[N - 1] = 0.0f;\n        return;",
        )
    };
    let (ok, out) = check_planted("layernorm.cu", short_vector, "layernorm_forward");
    assert!(
        !ok && out.contains("FAIL"),
        "a short vector load went unnoticed:\n{out}"
    );
    // Vector accesses chosen by width alone: the offset views are not 16-byte aligned.
    let ignore_alignment = |s: &str| {
        let cond = "const bool vec = cols % N == 0 && aligned16(inp) && aligned16(out) && aligned16(weight) && aligned16(bias);";
        plant(s, cond, "const bool vec = cols % N == 0;")
    };
    let (ok, out) = check_planted("layernorm.cu", ignore_alignment, "layernorm_forward");
    assert!(
        !ok && out.contains("not 16-byte aligned"),
        "an unaligned vector access went unnoticed:\n{out}"
    );
}

#[test]
fn planted_cross_entropy_bugs_fail_the_op_check() {
    if !sim_built() {
        return;
    }
    // The running sum is not rescaled when a thread's maximum grows.
    let no_rescale = |s: &str| plant(s, "    a.s *= rescale;\n    a.sx *= rescale;\n", "");
    let (ok, out) = check_planted("classifier.cu", no_rescale, "cross_entropy");
    assert!(
        !ok && out.contains("FAIL"),
        "a missing rescale went unnoticed:\n{out}"
    );
    // No scalar head: rows of odd vocabularies are read with unaligned vector loads.
    let no_head = |s: &str| {
        let head = "const int head = min(n, (N - misaligned) % N);";
        plant(s, head, "const int head = 0 * misaligned;")
    };
    let (ok, out) = check_planted("classifier.cu", no_head, "cross_entropy");
    assert!(
        !ok && out.contains("not 16-byte aligned"),
        "an unaligned row went unnoticed:\n{out}"
    );
}
