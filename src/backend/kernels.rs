//! The CUDA kernels compiled at build time (see build.rs): one module per `kernels/*.cu` file, as
//! portable PTX (compute_80, JIT-compiled by the driver on Ampere and newer) and an sm_90 cubin.
//! Kernel entry points are named `op_dtype` (for example `gelu_forward_bf16`). A build without nvcc
//! has no modules and says so through [`CUDA_COMPILED`].

/// One compiled `kernels/<name>.cu`.
#[derive(Debug, Clone, Copy)]
pub struct KernelModule {
    pub name: &'static str,
    pub ptx: &'static str,
    pub cubin_sm90: &'static [u8],
}

/// ptxas's resource usage of one kernel entry point, compiled for sm_90 (from `nvcc -Xptxas -v`
/// at build time): what decides whether a launch of a given block size can run at all.
#[derive(Debug, Clone, Copy)]
pub struct KernelResources {
    pub name: &'static str,
    pub registers: u32,
    pub static_smem_bytes: u32,
    /// Spill stores plus spill loads, in bytes (local-memory traffic per thread).
    pub spill_bytes: u32,
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The resource usage of `name`, in a build with kernels.
pub fn resources(name: &str) -> Option<&'static KernelResources> {
    KERNEL_RESOURCES.iter().find(|k| k.name == name)
}

/// The compiled module named `name`, if this build has CUDA kernels.
pub fn module(name: &str) -> Option<&'static KernelModule> {
    KERNEL_MODULES.iter().find(|m| m.name == name)
}

/// Why this build cannot run CUDA kernels, if it cannot: the message a CUDA run should show.
pub fn missing_kernels_reason() -> Option<&'static str> {
    (!CUDA_COMPILED).then_some(
        "this shardtrain was built without CUDA kernels (nvcc was not found at build time); \
         rebuild with a CUDA toolkit installed, or NVCC=/path/to/nvcc (SHARDTRAIN_REQUIRE_CUDA=1 \
         makes a missing nvcc a build error)",
    )
}

/// Entry points every module must export, module by module: exactly what the CUDA backend loads.
pub const EXPECTED_ENTRIES: &[(&str, &[&str])] = &[
    (
        "elementwise",
        &[
            "fill_f32",
            "fill_bf16",
            "scale_f32",
            "scale_bf16",
            "add_f32",
            "add_bf16",
            "accumulate_f32_f32",
            "accumulate_f32_bf16",
            "accumulate_bf16_f32",
            "accumulate_bf16_bf16",
            "copy_f32_f32",
            "copy_f32_bf16",
            "copy_bf16_f32",
            "copy_bf16_bf16",
        ],
    ),
    (
        "gelu",
        &[
            "gelu_forward_f32",
            "gelu_forward_bf16",
            "gelu_backward_f32",
            "gelu_backward_bf16",
        ],
    ),
    (
        "layernorm",
        &[
            "layernorm_forward_f32",
            "layernorm_forward_bf16",
            "layernorm_backward_f32",
            "layernorm_backward_bf16",
            "layernorm_backward_params_total_f32",
            "layernorm_backward_params_total_bf16",
            "layernorm_forward_wide_f32",
            "layernorm_forward_wide_bf16",
            "layernorm_backward_input_wide_f32",
            "layernorm_backward_input_wide_bf16",
            "layernorm_backward_params_wide_f32_f32",
            "layernorm_backward_params_wide_bf16_f32",
            "layernorm_backward_params_wide_bf16_bf16",
            "layernorm_backward_params_wide_f32_bf16",
        ],
    ),
    (
        "embedding",
        &[
            "embedding_forward_f32",
            "embedding_forward_bf16",
            "embedding_backward_positions_f32_f32",
            "embedding_backward_tokens_f32_f32",
            "embedding_backward_positions_f32_bf16",
            "embedding_backward_tokens_f32_bf16",
            "embedding_backward_positions_bf16_bf16",
            "embedding_backward_tokens_bf16_bf16",
            "embedding_backward_positions_bf16_f32",
            "embedding_backward_tokens_bf16_f32",
        ],
    ),
    (
        "attention",
        &[
            "attention_forward_f32_hs32",
            "attention_forward_f32_hs64",
            "attention_forward_bf16_hs32",
            "attention_forward_bf16_hs64",
            "attention_forward_f32_hs128",
            "attention_forward_bf16_hs128",
            "attention_backward_preprocess_f32_hs32",
            "attention_backward_preprocess_f32_hs64",
            "attention_backward_preprocess_bf16_hs32",
            "attention_backward_preprocess_bf16_hs64",
            "attention_backward_preprocess_f32_hs128",
            "attention_backward_preprocess_bf16_hs128",
            "attention_backward_dkdv_f32_hs32",
            "attention_backward_dkdv_f32_hs64",
            "attention_backward_dkdv_bf16_hs32",
            "attention_backward_dkdv_bf16_hs64",
            "attention_backward_dkdv_f32_hs128",
            "attention_backward_dkdv_bf16_hs128",
            "attention_backward_dq_f32_hs32",
            "attention_backward_dq_f32_hs64",
            "attention_backward_dq_bf16_hs32",
            "attention_backward_dq_bf16_hs64",
            "attention_backward_dq_f32_hs128",
            "attention_backward_dq_bf16_hs128",
        ],
    ),
    (
        "attention_tc_forward",
        &[
            "attention_tc_forward_bf16_hs64",
            "attention_tc_forward_bf16_hs128",
        ],
    ),
    (
        "attention_tc_backward",
        &[
            "attention_tc_backward_dkdv_bf16_hs64",
            "attention_tc_backward_dq_bf16_hs64",
            "attention_tc_backward_dkdv_bf16_hs128",
            "attention_tc_backward_dq_bf16_hs128",
        ],
    ),
    ("classifier", &["cross_entropy_f32", "cross_entropy_bf16"]),
    (
        "adamw",
        &[
            "adamw_f32_f32",
            "adamw_f32_bf16",
            "adamw_bf16_f32",
            "adamw_bf16_bf16",
            "adamw_segments_f32_f32",
            "adamw_segments_f32_bf16",
            "adamw_segments_bf16_f32",
            "adamw_segments_bf16_bf16",
            "sum_squares_f32",
            "sum_squares_bf16",
        ],
    ),
    (
        "reduce",
        &[
            "column_partial_sums_f32",
            "column_partial_sums_bf16",
            "accumulate_column_sums_f32",
            "accumulate_column_sums_bf16",
        ],
    ),
    // The tensor-core fragment tests `shardtrain check` runs on CUDA devices (src/check/tensor_core.rs).
    (
        "tensor_core_check",
        &[
            "tensor_core_check_direct",
            "tensor_core_check_a_cp_async_x4",
            "tensor_core_check_a_x4_trans",
            "tensor_core_check_b_x2_trans",
            "tensor_core_check_b_x2",
            "tensor_core_check_x1",
            "tensor_core_check_pipeline",
        ],
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    /// CI builds with SHARDTRAIN_REQUIRE_CUDA=1: there the kernels must have been compiled, and
    /// every entry point the backend needs must be in its module's PTX.
    #[test]
    fn every_expected_kernel_is_compiled_when_cuda_is_required() {
        let required = std::env::var("SHARDTRAIN_REQUIRE_CUDA").is_ok_and(|v| v == "1");
        let compiled = CUDA_COMPILED;
        assert!(
            compiled || !required,
            "SHARDTRAIN_REQUIRE_CUDA=1 but no kernels were compiled"
        );
        if !compiled {
            assert!(missing_kernels_reason().is_some());
            return;
        }
        for (name, entries) in EXPECTED_ENTRIES {
            let m = module(name).unwrap_or_else(|| panic!("kernels/{name}.cu was not compiled"));
            assert!(!m.cubin_sm90.is_empty(), "{name}: empty cubin");
            for entry in *entries {
                // PTX declares each kernel as `.entry <name>(`.
                assert!(
                    m.ptx.contains(&format!(".entry {entry}(")),
                    "{name}: no kernel `{entry}` in the PTX"
                );
            }
        }
        assert_eq!(
            KERNEL_MODULES.len(),
            EXPECTED_ENTRIES.len(),
            "a kernels/*.cu file is not listed"
        );
    }
}
