//! Kernel launches: the launch geometries the kernels in `kernels/` are written for, and the one
//! place a launch goes down to the driver (real GPU or sim alike).

use anyhow::{anyhow, Result};

pub(super) use super::driver::Arg;
use super::driver::{Geometry, Stream};

/// Dynamic shared memory a kernel gets without the opt-in (`Driver::set_max_dynamic_smem`).
pub(super) const DEFAULT_DYNAMIC_SMEM_LIMIT: u32 = 48 << 10;

/// Threads per block of the one-dimensional (grid-stride) kernels.
pub(super) const BLOCK: u32 = 256;

/// Block of the column-parallel reductions (bias and LayerNorm parameter gradients): 32 columns
/// by 8 row lanes.
pub(super) const COLUMN_BLOCK: (u32, u32, u32) = (32, 8, 1);
/// Largest block of the one-block-per-row LayerNorm kernels for rows too wide for registers.
pub(super) const LAYERNORM_MAX_BLOCK: u32 = 256;
/// Most threads holding one row of the register-resident LayerNorm kernels (`layernorm.rs` picks
/// fewer for narrower rows): what their registers must fit.
pub(super) const LAYERNORM_ROW_MAX_THREADS: u32 = 512;
/// Largest block of the one-block-per-row cross-entropy kernel (vocabularies are wide).
pub(super) const CROSS_ENTROPY_MAX_BLOCK: u32 = 1024;
/// Query (or key) rows per attention block, one thread each: `attention_tile` in
/// kernels/attention.cu (tiles of 32 at head size 128 keep its shared memory under 48 KiB).
pub(super) fn attention_tile(head_dim: usize) -> u32 {
    if head_dim <= 64 {
        64
    } else {
        32
    }
}

/// The most threads per block the launchers in `ops.rs` ever give `kernel`: what its registers
/// must fit (a block needs registers x threads <= 65536 on every GPU since Volta).
pub(super) fn max_block_threads(kernel: &str) -> u32 {
    let family = |prefix: &str| kernel.starts_with(prefix);
    if family("attention_tc_forward") {
        super::attention_tc::TC_THREADS
    } else if family("attention_tc_backward") {
        super::attention_tc_backward::THREADS
    } else if family("layernorm_backward_params") || family("column_partial_sums") {
        COLUMN_BLOCK.0 * COLUMN_BLOCK.1 * COLUMN_BLOCK.2
    } else if family("layernorm_forward_wide") || family("layernorm_backward_input_wide") {
        LAYERNORM_MAX_BLOCK
    } else if family("layernorm_forward") || family("layernorm_backward") {
        LAYERNORM_ROW_MAX_THREADS
    } else if family("cross_entropy") {
        CROSS_ENTROPY_MAX_BLOCK
    } else if family("attention_") && !family("attention_backward_preprocess") {
        attention_tile(if kernel.ends_with("_hs128") { 128 } else { 64 })
    } else {
        BLOCK
    }
}

/// Blocks for a grid-stride loop over `n` elements; the kernels loop, so the grid can be capped.
pub(super) fn grid_for(n: usize) -> u32 {
    n.div_ceil(BLOCK as usize).clamp(1, 1 << 20) as u32
}

/// A block size for one-block-per-row kernels: a multiple of 32, at most 1024, enough threads for
/// `cols` without leaving most of them idle on narrow rows.
pub(super) fn row_block(cols: usize, max: u32) -> u32 {
    (cols.div_ceil(32) * 32).clamp(32, max as usize) as u32
}

/// Converts a size to the `int` the kernels take, or fails naming it.
pub(super) fn int(what: &str, v: usize) -> Result<Arg> {
    i32::try_from(v)
        .map(Arg::Int)
        .map_err(|_| anyhow!("{what} = {v} does not fit the kernels' 32-bit int"))
}

/// Launches `name` on `stream` with no dynamic shared memory; the error names the kernel.
pub(super) fn launch(
    stream: &dyn Stream,
    name: &str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    args: &[Arg],
) -> Result<()> {
    launch_with_smem(stream, name, grid, block, 0, args)
}

/// Launches `name` with `dynamic_smem_bytes` of dynamic shared memory (above 48 KiB the kernel
/// needs the device's opt-in first: `Driver::set_max_dynamic_smem`).
pub(super) fn launch_with_smem(
    stream: &dyn Stream,
    name: &str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    dynamic_smem_bytes: u32,
    args: &[Arg],
) -> Result<()> {
    // The resource check of every kernel (the tests below) assumes these bounds: a launcher that
    // grows a block past them must grow the bound too, and so be checked again.
    let threads = block.0 * block.1 * block.2;
    let bound = max_block_threads(name);
    if threads > bound {
        return Err(anyhow!(
            "launching `{name}` with {threads} threads per block, more than the {bound} its \
             resource check covers (launch.rs: max_block_threads)"
        ));
    }
    let geometry = Geometry {
        grid,
        block,
        dynamic_smem_bytes,
    };
    // SAFETY: every kernel's argument list is built by its launcher in `ops.rs` to match the C
    // signature in kernels/*.cu, with device addresses of live buffers whose lengths were checked
    // (the sim also checks the list against the kernel's signature).
    unsafe { stream.launch(name, &geometry, args) }
}

#[cfg(test)]
/// Registers in one streaming multiprocessor's file, the most one block may use (sm_70 to sm_90).
const REGISTERS_PER_BLOCK: u32 = 65_536;
#[cfg(test)]
/// Static shared memory a kernel may declare (dynamic shared memory above it needs the opt-in).
const STATIC_SMEM_LIMIT: u32 = 48 << 10;

#[cfg(test)]
/// Spill traffic (bytes of spill stores plus loads per thread) each kernel may have: none, except
/// the CUDA-core attention kernels at head sizes 64 and 128, whose per-thread rows of q, o (and
/// k, v, dk, dv) exceed the register file. Measured with nvcc 13.0 for sm_90 (hs64: dkdv 832,
/// dq 136; hs128: forward 356, dq 3080, dkdv 4832), with headroom for compiler versions; the
/// tensor-core kernels of the speed work replace these.
fn spill_budget(kernel: &str) -> u32 {
    let attention = |part: &str, hs: &str| kernel.starts_with(part) && kernel.ends_with(hs);
    if attention("attention_backward_dkdv_", "_hs64") {
        1024
    } else if attention("attention_backward_dq_", "_hs64") {
        256
    } else if attention("attention_forward_", "_hs128") {
        512
    } else if attention("attention_backward_dq_", "_hs128") {
        4096
    } else if attention("attention_backward_dkdv_", "_hs128") {
        6144
    } else {
        0
    }
}

/// Registers a block takes as the GPU allocates them: per thread in steps of 8, for whole warps.
#[cfg(test)]
fn allocated_registers(per_thread: u32, threads: u32) -> u32 {
    per_thread.div_ceil(8) * 8 * threads.div_ceil(32) * 32
}

#[cfg(test)]
/// Why `k` cannot run as its launchers launch it, if it cannot.
fn resource_problem(k: &crate::backend::kernels::KernelResources) -> Option<String> {
    let threads = max_block_threads(k.name);
    let allocated = allocated_registers(k.registers, threads);
    if allocated > REGISTERS_PER_BLOCK {
        return Some(format!(
            "{}: {} registers x {threads} threads take {allocated} > {REGISTERS_PER_BLOCK} as the \
             GPU allocates them: the launch would fail with too many resources requested",
            k.name, k.registers
        ));
    }
    if k.static_smem_bytes > STATIC_SMEM_LIMIT {
        return Some(format!(
            "{}: {} bytes of static shared memory > {STATIC_SMEM_LIMIT}",
            k.name, k.static_smem_bytes
        ));
    }
    let budget = spill_budget(k.name);
    (k.spill_bytes > budget).then(|| {
        format!(
            "{}: {} bytes of spill traffic per thread, its budget is {budget}",
            k.name, k.spill_bytes
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::kernels::{resources, KernelResources, CUDA_COMPILED, EXPECTED_ENTRIES};

    /// Every entry point, as ptxas compiled it for sm_90, fits the block size its launchers use
    /// and its spill budget: a kernel that cannot launch fails here, not on the GPU.
    #[test]
    fn every_kernel_fits_the_blocks_it_is_launched_with() {
        if !CUDA_COMPILED {
            return; // no nvcc at build time: no resource report (CI builds with nvcc)
        }
        let mut problems = Vec::new();
        for (module, entries) in EXPECTED_ENTRIES {
            for entry in *entries {
                match resources(entry) {
                    None => problems.push(format!("{module}: no ptxas report for {entry}")),
                    Some(k) => problems.extend(resource_problem(k)),
                }
            }
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }

    #[test]
    fn the_resource_check_refuses_what_a_gpu_refuses() {
        let k = |name, registers, static_smem_bytes, spill_bytes| KernelResources {
            name,
            registers,
            static_smem_bytes,
            spill_bytes,
        };
        assert!(resource_problem(&k("gelu_forward_f32", 32, 0, 0)).is_none());
        // 1024 threads leave 64 registers each.
        assert!(resource_problem(&k("cross_entropy_f32", 64, 0, 0)).is_none());
        let e = resource_problem(&k("cross_entropy_f32", 72, 0, 0)).unwrap();
        assert!(e.contains("72 registers x 1024 threads"), "{e}");
        // 65 registers are allocated as 72: a block of 1024 cannot launch, though 65 x 1024 fits.
        assert!(resource_problem(&k("cross_entropy_f32", 65, 0, 0)).is_some());
        assert_eq!(allocated_registers(255, 64), 256 * 64);
        assert_eq!(allocated_registers(20, 33), 24 * 64);
        let e = resource_problem(&k("attention_forward_f32_hs128", 128, 64 << 10, 0)).unwrap();
        assert!(e.contains("static shared memory"), "{e}");
        let e = resource_problem(&k("layernorm_forward_f32", 40, 0, 8)).unwrap();
        assert!(e.contains("budget is 0"), "{e}");
        assert!(
            resource_problem(&k("attention_backward_dkdv_bf16_hs64", 255, 33280, 832)).is_none()
        );
    }

    #[test]
    fn grids_cover_every_element_and_stay_bounded() {
        assert_eq!(grid_for(0), 1);
        assert_eq!(grid_for(1), 1);
        assert_eq!(grid_for(256), 1);
        assert_eq!(grid_for(257), 2);
        assert_eq!(grid_for(usize::MAX / 2), 1 << 20);
    }

    #[test]
    fn row_blocks_are_warp_multiples_within_the_limit() {
        assert_eq!(row_block(1, 256), 32);
        assert_eq!(row_block(33, 256), 64);
        assert_eq!(row_block(768, 256), 256);
        assert_eq!(row_block(50304, 1024), 1024);
    }

    #[test]
    fn sizes_beyond_int_are_errors() {
        assert!(matches!(int("rows", 7), Ok(Arg::Int(7))));
        let err = int("rows", 1 << 40).unwrap_err().to_string();
        assert!(err.contains("rows") && err.contains("32-bit"), "{err}");
    }
}
