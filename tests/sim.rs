//! The CUDA backend on the simulated GPU (CI has no GPU): every op case against the CPU reference
//! with two seeds, the tiny job against the CPU at world 1 and at world 4 (ranks sharing the
//! simulated GPU, collectives on the comm lane), and the sim refusing what a GPU refuses.

mod common;
use common::sim::sim_built;
use common::{shardtrain, text};

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use shardtrain::backend::cuda::driver::{Arg, Geometry};
use shardtrain::backend::cuda::{CudaBackend, CudaDevice};
use shardtrain::backend::kernels::EXPECTED_ENTRIES;
use shardtrain::backend::{Backend, DType, MatmulSpec};

#[test]
fn every_op_case_passes_on_the_sim_with_two_seeds() {
    if !sim_built() {
        return;
    }
    for seed in ["1", "2"] {
        let started = Instant::now();
        let out = shardtrain(&["check", "--device", "sim", "--seed", seed]);
        let stdout = text(&out.stdout);
        assert!(
            out.status.success(),
            "seed {seed}:\n{stdout}\n{}",
            text(&out.stderr)
        );
        let cases = stdout.lines().filter(|l| l.contains(" ok")).count();
        eprintln!(
            "check --device sim --seed {seed}: {cases} cases in {:.1}s",
            started.elapsed().as_secs_f64()
        );
        assert!(cases > 300, "too few cases ran:\n{stdout}");
    }
}

/// The per-step losses of a finished run.
fn losses(run: &Path) -> Vec<f64> {
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    summary["losses"]
        .as_array()
        .expect("summary.json has losses")
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

fn train_tiny(dir: &Path, name: &str, args: &[&str]) -> Vec<f64> {
    let run = dir.join(name);
    let mut all = vec![
        "train",
        "--run-dir",
        run.to_str().unwrap(),
        "--set",
        "train.max_steps=20",
        "--set",
        "train.warmup_steps=5",
        "--set",
        "train.eval_every=0",
        "--set",
        "checkpoint.save_final=false",
        "--set",
        "logging.progress=plain",
    ];
    all.extend_from_slice(args);
    let started = Instant::now();
    let out = shardtrain(&all);
    assert!(out.status.success(), "{name}: {}", text(&out.stderr));
    eprintln!("{name}: {:.1}s", started.elapsed().as_secs_f64());
    losses(&run)
}

/// Largest relative difference of the first `n` losses.
fn max_rel(a: &[f64], b: &[f64], n: usize) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .take(n)
        .map(|(x, y)| (x - y).abs() / y.abs())
        .fold(0.0, f64::max)
}

/// The tiny job on the sim against the CPU (f32): within 1e-5 relative at every one of 20 steps.
fn tiny_f32_matches_the_cpu(label: &str, sim_args: &[&str]) {
    if !sim_built() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cpu = train_tiny(tmp.path(), "cpu", &["--device", "cpu"]);
    let sim = train_tiny(
        tmp.path(),
        label,
        &[&["--device", "sim"][..], sim_args].concat(),
    );
    assert_eq!(cpu.len(), 20);
    let d = max_rel(&sim, &cpu, 20);
    eprintln!("{label} vs cpu: max relative loss difference {d:.2e}");
    assert!(
        d <= 1e-5,
        "{label} vs cpu: {d:.2e}\nsim {sim:?}\ncpu {cpu:?}"
    );
}

#[test]
fn the_tiny_job_on_the_sim_equals_the_cpu_at_world_1() {
    tiny_f32_matches_the_cpu("sim world 1", &[]);
}

/// Four ranks sharing the simulated GPU: every collective's copies and sums on the comm lanes.
#[test]
fn the_tiny_job_on_the_sim_equals_the_cpu_at_world_4() {
    tiny_f32_matches_the_cpu("sim world 4", &["--world", "4"]);
}

/// The bf16 policy: gpu-check.sh's tolerances (bf16 rounding of different summation orders).
#[test]
fn the_tiny_job_on_the_sim_follows_the_cpu_with_bf16_params() {
    if !sim_built() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let bf16 = ["--set", "parallel.mixed_precision.param_dtype=bf16"];
    let cpu = train_tiny(
        tmp.path(),
        "cpu-bf16",
        &[&["--device", "cpu"][..], &bf16].concat(),
    );
    let sim = train_tiny(
        tmp.path(),
        "sim-bf16",
        &[&["--device", "sim"][..], &bf16].concat(),
    );
    let (d10, d20) = (max_rel(&sim, &cpu, 10), max_rel(&sim, &cpu, 20));
    eprintln!("sim bf16 vs cpu bf16: steps 1-10 {d10:.2e}, all {d20:.2e}");
    assert!(d10 <= 1e-2 && d20 <= 3e-2, "bf16: {d10:.2e} / {d20:.2e}");
}

#[test]
fn the_sim_has_every_kernel_the_backend_loads() {
    if !sim_built() {
        return;
    }
    let names = shardtrain::backend::cuda::driver::sim::kernel_names().unwrap();
    for (module, entries) in EXPECTED_ENTRIES {
        for e in *entries {
            assert!(
                names.iter().any(|n| n == e),
                "kernels/{module}.cu: no `{e}` on the sim"
            );
        }
    }
}

/// Launches `gelu_forward_f32` over 256 elements directly through the driver with `geometry`.
fn raw_launch(geometry: Geometry) -> anyhow::Result<()> {
    let device = CudaDevice::open_sim()?;
    let be = CudaBackend::new(&device)?;
    let buf = be.alloc(256, DType::F32)?;
    let out = be.alloc(256, DType::F32)?;
    be.upload(&buf, &vec![0.5; 256])?;
    let stream = device.driver().new_stream()?;
    let args = [
        Arg::Ptr(out.device_address()),
        Arg::Ptr(buf.device_address()),
        Arg::Long(256),
    ];
    // SAFETY: the argument list matches gelu_forward_f32(float*, const float*, int64_t) and both
    // buffers hold 256 floats; the stream is synchronized before they are dropped.
    unsafe { stream.launch("gelu_forward_f32", &geometry, &args)? };
    stream.synchronize()?;
    be.synchronize()
}

fn geometry(grid: (u32, u32, u32), block: (u32, u32, u32), smem: u32) -> Geometry {
    Geometry {
        grid,
        block,
        dynamic_smem_bytes: smem,
    }
}

#[test]
fn the_sim_refuses_launches_a_gpu_refuses() {
    if !sim_built() {
        return;
    }
    raw_launch(geometry((1, 1, 1), (256, 1, 1), 0)).expect("a plain launch runs");
    let refused = [
        (geometry((1, 1, 1), (1025, 1, 1), 0), "1024"),
        (geometry((1, 1, 1), (32, 32, 2), 0), "1024"),
        (geometry((1, 1, 1), (1, 1, 65), 0), "64"),
        (geometry((1, 65536, 1), (32, 1, 1), 0), "65535"),
        (geometry((0, 1, 1), (32, 1, 1), 0), "zero"),
        (geometry((1, 1, 1), (32, 1, 1), 49 << 10), "opt-in"),
    ];
    for (g, says) in refused {
        let err = format!("{:#}", raw_launch(g).unwrap_err());
        assert!(
            err.contains("gelu_forward_f32") && err.to_lowercase().contains(says),
            "{g:?}: {err}"
        );
    }
}

#[test]
fn dynamic_shared_memory_above_48_kib_needs_the_opt_in_and_stops_at_227_kib() {
    if !sim_built() {
        return;
    }
    let device = CudaDevice::open_sim().unwrap();
    let stream = device.driver().new_stream().unwrap();
    let args = [Arg::Ptr(0), Arg::Ptr(0), Arg::Long(0)];
    let launch = |bytes: u32| {
        // SAFETY: n = 0: the kernel touches no memory.
        unsafe {
            stream.launch(
                "gelu_forward_f32",
                &geometry((1, 1, 1), (32, 1, 1), bytes),
                &args,
            )
        }
    };
    assert!(launch(64 << 10).is_err());
    device
        .driver()
        .set_max_dynamic_smem("gelu_forward_f32", 100 << 10)
        .unwrap();
    launch(64 << 10).expect("within the opt-in");
    assert!(launch(101 << 10).is_err(), "above the opt-in");
    assert!(device
        .driver()
        .set_max_dynamic_smem("gelu_forward_f32", 228 << 10)
        .is_err());
    stream.synchronize().unwrap();
}

#[test]
fn a_wrong_argument_list_is_refused_naming_the_kernel() {
    if !sim_built() {
        return;
    }
    let device = CudaDevice::open_sim().unwrap();
    let stream = device.driver().new_stream().unwrap();
    // gelu_forward_f32 takes (float*, const float*, int64_t): an int for the count is wrong.
    let args = [Arg::Ptr(0), Arg::Ptr(0), Arg::Int(256)];
    let g = geometry((1, 1, 1), (32, 1, 1), 0);
    // SAFETY: the sim checks the list before anything runs; nothing is queued.
    let err = unsafe { stream.launch("gelu_forward_f32", &g, &args) }.unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains("gelu_forward_f32") && err.contains("param"),
        "{err}"
    );
}

#[test]
fn two_sim_devices_are_independent() {
    if !sim_built() {
        return;
    }
    let a = Arc::new(CudaBackend::new(&CudaDevice::open_sim().unwrap()).unwrap());
    let b = CudaBackend::new(&CudaDevice::open_sim().unwrap()).unwrap();
    let x = a.alloc(1000, DType::F32).unwrap();
    let values: Vec<f32> = (0..1000).map(|i| i as f32 * 0.25 - 3.0).collect();
    a.upload(&x, &values).unwrap();
    let y = b.alloc(1000, DType::Bf16).unwrap();
    b.upload(&y, &values).unwrap();
    assert_eq!(a.download(&x).unwrap(), values);
    assert!(a.name().starts_with("sim"));
    assert!(b.memory_in_use().unwrap().0 >= 2000);
}

#[test]
fn the_sim_refuses_a_block_whose_registers_do_not_fit() {
    if !sim_built() || !shardtrain::backend::kernels::CUDA_COMPILED {
        return; // the register counts come from ptxas at build time
    }
    let device = CudaDevice::open_sim().unwrap();
    let stream = device.driver().new_stream().unwrap();
    // 255 registers per thread: 64 threads fit a block's 65536, 512 do not.
    let args = [
        Arg::Ptr(0),
        Arg::Ptr(0),
        Arg::Ptr(0),
        Arg::Ptr(0),
        Arg::Ptr(0),
        Arg::Int(0),
        Arg::Int(1),
    ];
    let name = "attention_backward_dkdv_f32_hs64";
    // SAFETY: refused before anything is queued.
    let err =
        unsafe { stream.launch(name, &geometry((1, 1, 1), (512, 1, 1), 0), &args) }.unwrap_err();
    let err = format!("{err:#}");
    assert!(err.contains(name) && err.contains("registers"), "{err}");
}

/// The ops each fused linear op issued on the sim, by the names the op timing records.
fn fused_ops_issued(n: usize) -> Vec<String> {
    let be = CudaBackend::new(&CudaDevice::open_sim().unwrap()).unwrap();
    let (m, k) = (5, 7);
    let buf = |len: usize| {
        let b = be.alloc(len, DType::F32).unwrap();
        let values: Vec<f32> = (0..len)
            .map(|i| ((i * 7) % 11) as f32 / 11.0 - 0.5)
            .collect();
        be.upload(&b, &values).unwrap();
        b
    };
    let (x, w, bias, out, pre, dy, res) = (
        buf(m * k),
        buf(n * k),
        buf(n),
        buf(m * n),
        buf(m * n),
        buf(m * k),
        buf(m * n),
    );
    let spec = |trans_a, trans_b, m, n, k| MatmulSpec {
        m,
        n,
        k,
        trans_a,
        trans_b,
        accumulate: false,
    };
    be.set_op_timing(true);
    be.matmul_gelu(&out, &pre, &x, &w, Some(&bias), spec(false, true, m, n, k))
        .unwrap();
    be.matmul_residual(&out, &res, &x, &w, Some(&bias), spec(false, true, m, n, k))
        .unwrap();
    let (dpre, dw, db) = (buf(m * n), buf(n * k), buf(n));
    let w_t = buf(k * n);
    be.matmul_dgelu(
        &dpre,
        Some(&db),
        &dy,
        &w_t,
        &pre,
        spec(false, false, m, n, k),
    )
    .unwrap();
    be.matmul_bias_grad(&dw, &db, &dpre, &x, spec(true, false, n, k, m))
        .unwrap();
    be.synchronize().unwrap();
    let mut ops: Vec<String> = be
        .take_op_times()
        .unwrap()
        .into_iter()
        .map(|t| t.op)
        .collect();
    ops.sort();
    ops
}

#[test]
fn fused_linear_ops_are_one_cublaslt_call_where_the_epilogue_fits() {
    if !sim_built() {
        return;
    }
    // n = 16: the GELU epilogues' auxiliary matrix has a leading dimension that is a multiple of 8.
    assert_eq!(
        fused_ops_issued(16),
        [
            "accumulate",
            "matmul_bias_grad",
            "matmul_dgelu",
            "matmul_gelu",
            "matmul_residual"
        ],
        "the bias gradients are written to scratch by the epilogue, then accumulated"
    );
    // n = 17 does not fit: the GELU ops fall back to a matmul and the GELU kernels.
    let ops = fused_ops_issued(17);
    for op in ["gelu_forward", "gelu_backward", "bias_backward", "matmul"] {
        assert!(ops.iter().any(|o| o == op), "{op} missing from {ops:?}");
    }
    assert!(
        !ops.iter()
            .any(|o| o == "matmul_gelu" || o == "matmul_dgelu"),
        "{ops:?}"
    );
}
