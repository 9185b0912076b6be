//! Launches of the tensor-core attention backward (kernels/attention_tc_backward.cu): bf16 at head
//! sizes 64 and 128, after attention.cu's preprocess has written D = rowsum(dO * O). Which
//! backward runs is decided here ([`takes`]); f32, head size 32 and unaligned views stay on the
//! CUDA-core kernels in `ops.rs`.

use anyhow::Result;

use super::launch::Arg;
use super::{CudaBackend, CudaBuf};
use crate::backend::{AttentionShape, DType};

/// Threads per block of both kernels (4 warps of 16 rows).
pub(super) const THREADS: u32 = 128;
/// Keys (dK/dV) or queries (dQ) per block, and rows per streamed tile.
const TILE: usize = 64;

/// Dynamic shared memory of the dK/dV and the dQ kernel at head size `hs`: six bf16 tiles of 64
/// rows padded by 8 elements (K, V and two stages of Q, dO; or Q, dO and two stages of K, V), and
/// for dK/dV two stages of 64 lse and D values. Mirrors tc_dkdv_smem_bytes / tc_dq_smem_bytes.
fn smem_bytes(hs: usize) -> (u32, u32) {
    let tiles = (6 * TILE * (hs + 8) * 2) as u32;
    (tiles + (2 * 2 * TILE * 4) as u32, tiles)
}

/// Whether the tensor-core kernels take this backward: bf16 at head size 64 or 128, with every
/// operand 16-byte aligned (cp.async moves 16 bytes; a view at an odd offset takes the CUDA-core
/// kernels instead).
pub(super) fn takes(dtype: DType, hs: usize, bufs: &[&CudaBuf]) -> bool {
    takes_at(dtype, hs, &bufs.iter().map(|b| b.ptr()).collect::<Vec<_>>())
}

fn takes_at(dtype: DType, hs: usize, addresses: &[u64]) -> bool {
    dtype == DType::Bf16 && matches!(hs, 64 | 128) && addresses.iter().all(|a| a % 16 == 0)
}

impl CudaBackend {
    /// dK, dV then dQ into `dqkv` (overwritten); `args` is the CUDA-core backward's argument
    /// list (dqkv, dout, qkv, lse, D, seq, heads), which both kernels share.
    pub(super) fn attention_backward_tc(
        &self,
        args: &[Arg],
        shape: AttentionShape,
        hs: usize,
    ) -> Result<()> {
        let grid = (
            shape.seq.div_ceil(TILE) as u32,
            (shape.batch * shape.heads) as u32,
            1,
        );
        let (dkdv_smem, dq_smem) = smem_bytes(hs);
        for (part, smem) in [("dkdv", dkdv_smem), ("dq", dq_smem)] {
            let name = format!("attention_tc_backward_{part}_bf16_hs{hs}");
            self.run_with_smem(&name, grid, (THREADS, 1, 1), smem, args)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_at_64_and_128_takes_the_tensor_cores_when_aligned() {
        let aligned = [256, 4096, 1 << 20];
        assert!(takes_at(DType::Bf16, 64, &aligned));
        assert!(takes_at(DType::Bf16, 128, &aligned));
        assert!(!takes_at(DType::F32, 64, &aligned));
        assert!(!takes_at(DType::Bf16, 32, &aligned));
        assert!(!takes_at(DType::Bf16, 64, &[256, 4098, 1 << 20]));
    }

    #[test]
    fn shared_memory_matches_the_kernels_layout() {
        // 6 x 64 x 72 x 2 bytes of tiles at head size 64, 6 x 64 x 136 x 2 at 128.
        assert_eq!(smem_bytes(64), (55_296 + 1_024, 55_296));
        assert_eq!(smem_bytes(128), (104_448 + 1_024, 104_448));
        // Within the 227 KiB an sm_90 block may opt in to.
        assert!(smem_bytes(128).0 <= 227 << 10);
    }
}
