//! The tensor-core attention forward (kernels/attention_tc_forward.cu): which calls it takes, its
//! launch geometry and dynamic shared memory. `ops.rs`'s `attention_forward` tries it first; f32,
//! head size 32 and misaligned buffers keep the CUDA-core kernel of kernels/attention.cu.

use anyhow::Result;

use super::launch::int;
use super::{ptr, CudaBackend, CudaBuf};
use crate::backend::{AttentionShape, DType};

/// Threads per block: 4 warps of 16 query rows (`TC_THREADS` in the kernel).
pub(super) const TC_THREADS: u32 = 128;
/// Query rows per block, and keys per streamed tile (`TC_ROWS`, `TC_KEYS`).
const TC_ROWS: usize = 64;

/// The tensor-core kernel for `dtype` at `head_dim`, if there is one.
pub(super) fn forward_kernel(dtype: DType, head_dim: usize) -> Option<&'static str> {
    match (dtype, head_dim) {
        (DType::Bf16, 64) => Some("attention_tc_forward_bf16_hs64"),
        (DType::Bf16, 128) => Some("attention_tc_forward_bf16_hs128"),
        _ => None,
    }
}

/// Dynamic shared memory of one block: Q, two stages of K and two of V, each 64 rows padded by
/// 8 elements (16 bytes, against ldmatrix bank conflicts) of bf16 (`attention_tc_smem_bytes`).
pub(super) fn smem_bytes(head_dim: usize) -> u32 {
    (5 * TC_ROWS * (head_dim + 8) * 2) as u32
}

/// The kernel `attention_forward` runs on these buffers, if the tensor-core one: it also needs
/// `qkv` 16-byte aligned (cp.async copies 16-byte chunks; every row and head offset is a multiple
/// of 8 elements at these head sizes) and `out` 4-byte aligned (bf16 pairs are stored whole).
pub(super) fn forward_kernel_for(
    dtype: DType,
    head_dim: usize,
    qkv_addr: u64,
    out_addr: u64,
) -> Option<&'static str> {
    forward_kernel(dtype, head_dim)
        .filter(|_| qkv_addr.is_multiple_of(16) && out_addr.is_multiple_of(4))
}

/// Grid: (query tiles of 64, batch x heads); the kernel starts the longest tiles first.
fn grid(shape: AttentionShape) -> (u32, u32, u32) {
    (
        shape.seq.div_ceil(TC_ROWS) as u32,
        (shape.batch * shape.heads) as u32,
        1,
    )
}

impl CudaBackend {
    /// Runs the tensor-core forward if it takes this call (`Ok(false)`: it does not, launch the
    /// CUDA-core kernel). The caller has checked the operands and that there is work to do.
    pub(super) fn attention_forward_tc(
        &self,
        out: &CudaBuf,
        lse: &CudaBuf,
        qkv: &CudaBuf,
        shape: AttentionShape,
    ) -> Result<bool> {
        let Some(name) = forward_kernel_for(out.dtype, shape.head_dim, qkv.ptr(), out.ptr()) else {
            return Ok(false);
        };
        self.run_with_smem(
            name,
            grid(shape),
            (TC_THREADS, 1, 1),
            smem_bytes(shape.head_dim),
            &[
                ptr(out),
                ptr(lse),
                ptr(qkv),
                int("seq", shape.seq)?,
                int("heads", shape.heads)?,
            ],
        )?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::kernels::{resources, CUDA_COMPILED, EXPECTED_ENTRIES};

    #[test]
    fn bf16_at_head_sizes_64_and_128_takes_the_tensor_core_kernel() {
        assert_eq!(
            forward_kernel_for(DType::Bf16, 64, 256, 256),
            Some("attention_tc_forward_bf16_hs64")
        );
        assert_eq!(
            forward_kernel_for(DType::Bf16, 128, 1 << 20, 4),
            Some("attention_tc_forward_bf16_hs128")
        );
        // f32, head size 32, and buffers cp.async or the paired stores cannot take: CUDA cores.
        assert_eq!(forward_kernel_for(DType::F32, 64, 256, 256), None);
        assert_eq!(forward_kernel_for(DType::F32, 128, 256, 256), None);
        assert_eq!(forward_kernel_for(DType::Bf16, 32, 256, 256), None);
        assert_eq!(forward_kernel_for(DType::Bf16, 64, 256 + 8, 256), None);
        assert_eq!(forward_kernel_for(DType::Bf16, 64, 256, 256 + 2), None);
    }

    #[test]
    fn the_tensor_core_kernels_are_loaded_and_fit_their_shared_memory() {
        let listed: Vec<&str> = EXPECTED_ENTRIES
            .iter()
            .flat_map(|(_, entries)| entries.iter().copied())
            .collect();
        for hs in [64, 128] {
            let name = forward_kernel(DType::Bf16, hs).unwrap();
            assert!(listed.contains(&name), "{name} is not in EXPECTED_ENTRIES");
            assert_eq!(
                super::super::launch::max_block_threads(name),
                TC_THREADS,
                "{name}"
            );
            // 227 KiB is the most a block may opt in to (sm_90), static shared memory included.
            let static_smem = if CUDA_COMPILED {
                resources(name).expect("a ptxas report").static_smem_bytes
            } else {
                0
            };
            assert!(smem_bytes(hs) + static_smem <= 227 << 10, "{name}");
        }
        assert_eq!(smem_bytes(64), 46080);
        assert_eq!(smem_bytes(128), 87040);
    }
}
