//! LayerNorm's launch plans and kernel sequences (kernels/layernorm.cu): how many threads hold a
//! row, how rows are chunked for the parameter gradients, and the scratch those chunks need. The
//! ops in `ops.rs` check operands first and then call these; nothing here checks shapes again.

use anyhow::Result;

use super::launch::{
    int, row_block, Arg, COLUMN_BLOCK, LAYERNORM_MAX_BLOCK, LAYERNORM_ROW_MAX_THREADS,
};
use super::{ptr, tn, CudaBackend, CudaBuf};
use crate::backend::DType;

/// Elements of a row each thread holds in registers: `LN_FORWARD_ELEMS` and `LN_BACKWARD_ELEMS`
/// in kernels/layernorm.cu (whole 16-byte vectors of either dtype).
const FORWARD_ELEMS: usize = 32;
const BACKWARD_ELEMS: usize = 16;
/// Rows per block of the forward when a warp holds a row.
const FORWARD_WARP_ROWS: u32 = 8;
/// Row chunks the backward splits the rows into (at most): enough blocks to fill every SM of a
/// large GPU, few enough that the final fixed-order sum over chunks stays short. A function of the
/// shape only, never of the device, so the sums' order (and the result's bits) is too.
const BACKWARD_CHUNKS: usize = 512;

/// Threads holding one row of `cols` when each holds `elems` elements: a multiple of 32 with every
/// thread's 16-byte slots in use but the last; `None` when the row needs more threads than the
/// kernels are checked for (the `_wide` kernels take it).
fn row_threads(cols: usize, dtype: DType, elems: usize) -> Option<u32> {
    let per_vector = 16 / dtype.size_bytes();
    let slots = elems / per_vector;
    let threads = cols
        .div_ceil(per_vector)
        .div_ceil(slots)
        .div_ceil(32)
        .max(1)
        * 32;
    (threads <= LAYERNORM_ROW_MAX_THREADS as usize).then_some(threads as u32)
}

/// A launch's grid or block dimensions.
type Dims = (u32, u32, u32);

/// Grid and block of the register-resident forward: a warp per row, 8 rows a block, when a warp
/// holds the row (GPT-2's 768 in either dtype), else one block per row.
pub(super) fn forward_geometry(rows: usize, cols: usize, dtype: DType) -> Option<(Dims, Dims)> {
    let threads = row_threads(cols, dtype, FORWARD_ELEMS)?;
    Some(if threads == 32 {
        let blocks = rows.div_ceil(FORWARD_WARP_ROWS as usize) as u32;
        ((blocks, 1, 1), (32, FORWARD_WARP_ROWS, 1))
    } else {
        ((rows as u32, 1, 1), (threads, 1, 1))
    })
}

/// How the register-resident backward covers the rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct BackwardPlan {
    /// Threads of each block (all on one row at a time).
    pub threads: u32,
    pub rows_per_chunk: usize,
    /// Blocks, one per chunk of rows, and partial rows of the parameter gradients.
    pub chunks: usize,
}

impl BackwardPlan {
    /// Bytes of f32 partial sums: dweight's and dbias's, one row of `cols` per chunk each.
    pub(super) fn scratch_bytes(&self, cols: usize) -> usize {
        2 * self.chunks * cols * std::mem::size_of::<f32>()
    }
}

pub(super) fn backward_plan(rows: usize, cols: usize, dtype: DType) -> Option<BackwardPlan> {
    let threads = row_threads(cols, dtype, BACKWARD_ELEMS)?;
    let rows_per_chunk = rows.div_ceil(BACKWARD_CHUNKS).max(1);
    Some(BackwardPlan {
        threads,
        rows_per_chunk,
        chunks: rows.div_ceil(rows_per_chunk),
    })
}

impl CudaBackend {
    /// Queues LayerNorm forward; the caller checked the operands and that `rows > 0`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn queue_layernorm_forward(
        &self,
        out: &CudaBuf,
        mean: &CudaBuf,
        rstd: &CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        bias: &CudaBuf,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let t = tn(out.dtype);
        let args = [
            ptr(out),
            ptr(mean),
            ptr(rstd),
            ptr(inp),
            ptr(weight),
            ptr(bias),
            int("rows", rows)?,
            int("cols", cols)?,
        ];
        match forward_geometry(rows, cols, out.dtype) {
            Some((grid, block)) => self.run(&format!("layernorm_forward_{t}"), grid, block, &args),
            None => self.run(
                &format!("layernorm_forward_wide_{t}"),
                (rows as u32, 1, 1),
                (row_block(cols, LAYERNORM_MAX_BLOCK), 1, 1),
                &args,
            ),
        }
    }

    /// Queues LayerNorm backward (accumulating into `dinp`, `dweight` and `dbias`); the caller
    /// checked the operands and that `rows > 0`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn queue_layernorm_backward(
        &self,
        dinp: &CudaBuf,
        dweight: &CudaBuf,
        dbias: &CudaBuf,
        dout: &CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        mean: &CudaBuf,
        rstd: &CudaBuf,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let (t, g) = (tn(dinp.dtype), tn(dweight.dtype));
        let (rows_i, cols_i) = (int("rows", rows)?, int("cols", cols)?);
        let Some(plan) = backward_plan(rows, cols, dinp.dtype) else {
            return self.queue_layernorm_backward_wide(
                dinp, dweight, dbias, dout, inp, weight, mean, rstd, rows, cols,
            );
        };
        // The partial sums for this rank's stream; the final pass leaves nothing behind in them.
        let bytes = plan.scratch_bytes(cols);
        self.scratch
            .with(&self.stream, &self.stats, bytes, |partial| {
                self.run(
                    &format!("layernorm_backward_{t}"),
                    (plan.chunks as u32, 1, 1),
                    (plan.threads, 1, 1),
                    &[
                        ptr(dinp),
                        Arg::Ptr(partial),
                        ptr(dout),
                        ptr(inp),
                        ptr(weight),
                        ptr(mean),
                        ptr(rstd),
                        rows_i,
                        cols_i,
                        int("rows per chunk", plan.rows_per_chunk)?,
                    ],
                )?;
                self.run(
                    &format!("layernorm_backward_params_total_{g}"),
                    (cols.div_ceil(32) as u32, 2, 1),
                    COLUMN_BLOCK,
                    &[
                        ptr(dweight),
                        ptr(dbias),
                        Arg::Ptr(partial),
                        int("chunks", plan.chunks)?,
                        cols_i,
                    ],
                )
            })
    }

    /// Rows too wide for registers: a block per row for `dinp`, then column-parallel parameter
    /// gradients.
    #[allow(clippy::too_many_arguments)]
    fn queue_layernorm_backward_wide(
        &self,
        dinp: &CudaBuf,
        dweight: &CudaBuf,
        dbias: &CudaBuf,
        dout: &CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        mean: &CudaBuf,
        rstd: &CudaBuf,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let (t, g) = (tn(dinp.dtype), tn(dweight.dtype));
        let (rows_i, cols_i) = (int("rows", rows)?, int("cols", cols)?);
        self.run(
            &format!("layernorm_backward_input_wide_{t}"),
            (rows as u32, 1, 1),
            (row_block(cols, LAYERNORM_MAX_BLOCK), 1, 1),
            &[
                ptr(dinp),
                ptr(dout),
                ptr(inp),
                ptr(weight),
                ptr(mean),
                ptr(rstd),
                rows_i,
                cols_i,
            ],
        )?;
        self.run(
            &format!("layernorm_backward_params_wide_{t}_{g}"),
            (cols.div_ceil(32) as u32, 1, 1),
            COLUMN_BLOCK,
            &[
                ptr(dweight),
                ptr(dbias),
                ptr(dout),
                ptr(inp),
                ptr(mean),
                ptr(rstd),
                rows_i,
                cols_i,
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_warp_holds_gpt2_rows_and_wider_rows_get_a_small_block() {
        // 768 bf16 = 96 vectors of 8, 4 a lane; 768 f32 = 192 vectors of 4, 8 a lane.
        for dtype in [DType::Bf16, DType::F32] {
            assert_eq!(
                forward_geometry(16384, 768, dtype),
                Some(((2048, 1, 1), (32, 8, 1)))
            );
        }
        assert_eq!(
            forward_geometry(3, 1600, DType::Bf16),
            Some(((3, 1, 1), (64, 1, 1)))
        );
        assert_eq!(
            forward_geometry(3, 1, DType::F32),
            Some(((1, 1, 1), (32, 8, 1)))
        );
        // The most the row kernels hold: 512 threads of 32 elements.
        assert!(forward_geometry(1, 16384, DType::F32).is_some());
        assert!(forward_geometry(1, 16385, DType::F32).is_none());
    }

    #[test]
    fn backward_chunks_cover_every_row_and_depend_on_the_shape_only() {
        for rows in [1, 3, 257, 511, 512, 513, 2000, 16384, 100_000] {
            let p = backward_plan(rows, 768, DType::Bf16).unwrap();
            assert!(p.chunks <= BACKWARD_CHUNKS, "{rows}: {p:?}");
            assert!(p.chunks * p.rows_per_chunk >= rows, "{rows}: {p:?}");
            assert!(
                (p.chunks - 1) * p.rows_per_chunk < rows,
                "{rows}: an empty chunk {p:?}"
            );
        }
        let p = backward_plan(16384, 768, DType::Bf16).unwrap();
        assert_eq!((p.threads, p.rows_per_chunk, p.chunks), (64, 32, 512));
        assert_eq!(p.scratch_bytes(768), 2 * 512 * 768 * 4);
        assert!(backward_plan(2, 8192, DType::F32).is_some());
        assert!(backward_plan(2, 8193, DType::F32).is_none());
    }
}
