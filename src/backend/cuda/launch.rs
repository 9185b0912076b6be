//! Kernel launches: arguments as plain values (device addresses, ints, floats) and the launch
//! geometries the kernels in `kernels/` are written for.

use std::sync::Arc;

use anyhow::{anyhow, Result};
use cudarc::driver::{CudaStream, LaunchConfig, PushKernelArg};

use super::device::CudaDevice;

/// One kernel argument, as the kernel's C signature takes it.
#[derive(Clone, Copy, Debug)]
pub(super) enum Arg {
    /// A device address (`T*`); 0 is `nullptr`.
    Ptr(u64),
    Int(i32),
    Long(i64),
    Float(f32),
}

/// Threads per block of the one-dimensional (grid-stride) kernels.
pub(super) const BLOCK: u32 = 256;

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

/// Launches `name` on `stream`; the error names the kernel.
pub(super) fn launch(
    device: &CudaDevice,
    stream: &Arc<CudaStream>,
    name: &str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    args: &[Arg],
) -> Result<()> {
    let f = device
        .kernels
        .get(name)
        .ok_or_else(|| anyhow!("kernel `{name}` is not among the loaded kernels"))?;
    let mut builder = stream.launch_builder(f);
    for arg in args {
        match arg {
            Arg::Ptr(p) => builder.arg(p),
            Arg::Int(x) => builder.arg(x),
            Arg::Long(x) => builder.arg(x),
            Arg::Float(x) => builder.arg(x),
        };
    }
    let cfg = LaunchConfig {
        grid_dim: grid,
        block_dim: block,
        shared_mem_bytes: 0,
    };
    // SAFETY: every kernel's argument list is built by its launcher in `mod.rs` to match the C
    // signature in kernels/*.cu, with device addresses of live buffers whose lengths were checked.
    unsafe { builder.launch(cfg) }.map_err(|e| anyhow!("launching kernel `{name}`: {e:?}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
