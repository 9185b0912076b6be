//! The CUDA backend: the [`Backend`] ops on one device, each a kernel from `kernels/` (compiled at
//! build time) or a cuBLASLt product, issued in order on the rank's own stream.
//!
//! The backend decides everything about what runs (launch geometries, kernels per dtype, argument
//! lists, matmul descriptors, stream and event ordering, memory accounting) and hands it to a
//! [`driver`]: the real one (a GPU through cudarc) or the simulated GPU (`device: sim`), which
//! runs the same kernels on the CPU. The code above the driver is the same for both.
//!
//! Every op checks lengths, dtypes and overlap exactly as the CPU reference does, then launches;
//! a launch failure is an error naming the kernel. Ops are asynchronous: [`Backend::download`] and
//! [`Backend::synchronize`] wait, and report any fault of the kernels queued before them. There is
//! no global state: a [`CudaDevice`] (driver and kernels) is shared by the ranks on one device,
//! and each rank's backend owns its streams, its matmul workspace, and its memory counts.

mod attention_tc;
mod attention_tc_backward;
mod blas;
mod device;
pub mod driver;
mod fused_linear;
mod launch;
mod layernorm;
mod memory;
mod ops;
mod optim;
mod profile;
mod scratch;

use std::sync::{Arc, OnceLock};

use anyhow::{anyhow, bail, Result};

pub use device::{device_count, unavailable_reason, CudaDevice};
pub use memory::{CudaBuf, CudaIds, MemoryStats};

use super::{Backend, Buffer};
use blas::Blas;
use driver::{Event, Stream};
use launch::{grid_for, launch, launch_with_smem, Arg, BLOCK, DEFAULT_DYNAMIC_SMEM_LIMIT};
use memory::DeviceMemory;
use profile::OpProfiler;
use scratch::Scratch;

/// One rank's view of a device: its stream, matmul workspace and memory counts, and a second
/// backend on a stream of its own for communication (the comm lane).
pub struct CudaBackend {
    device: Arc<CudaDevice>,
    stream: Arc<dyn Stream>,
    /// Made at the first matmul (the comm lane never needs one).
    blas: OnceLock<Blas>,
    /// Partial sums kept between the passes of multi-kernel ops, grown on demand.
    scratch: Scratch,
    stats: Arc<MemoryStats>,
    profiler: OpProfiler,
    /// The multi-tensor AdamW's device tables of tensor pieces.
    segment_tables: optim::SegmentTables,
    lane: Option<Box<CudaBackend>>,
}

/// A recorded point of a stream.
#[derive(Clone)]
pub struct CudaMark(Arc<dyn Event>);

impl CudaMark {
    /// `Ok(true)` when the work before the mark has finished, `Ok(false)` when not yet, and the
    /// device's error when that work failed.
    pub fn query(&self) -> Result<bool> {
        self.0.query()
    }
}

impl std::fmt::Debug for CudaMark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CudaMark")
    }
}

/// The kernel-name suffix of a dtype.
fn tn(d: super::DType) -> &'static str {
    match d {
        super::DType::F32 => "f32",
        super::DType::Bf16 => "bf16",
    }
}

fn ptr(b: &CudaBuf) -> Arg {
    Arg::Ptr(b.ptr())
}

fn long(n: usize) -> Arg {
    Arg::Long(n as i64)
}

/// Fails unless every named buffer has `dtype` (the kernels are instantiated per dtype family).
fn same_dtype(op: &str, dtype: super::DType, bufs: &[(&str, &CudaBuf)]) -> Result<()> {
    for (what, b) in bufs {
        if b.dtype != dtype {
            bail!(
                "{op}: `{what}` is {} but the CUDA kernel for this op takes {dtype} here (as its \
                 first operand); mixed dtypes are supported only where the model needs them",
                b.dtype
            );
        }
    }
    Ok(())
}

/// Fails if an output overlaps an input or another output (the CPU backend refuses these too).
fn no_overlap(op: &str, outputs: &[(&str, &CudaBuf)], inputs: &[(&str, &CudaBuf)]) -> Result<()> {
    for (i, (oname, o)) in outputs.iter().enumerate() {
        if o.is_empty() {
            continue;
        }
        let others = outputs[i + 1..].iter().chain(inputs.iter());
        for (name, b) in others {
            if !b.is_empty() && o.overlaps(b) {
                bail!("{op}: output `{oname}` overlaps `{name}`");
            }
        }
    }
    Ok(())
}

impl CudaBackend {
    /// A backend on `device` with a new stream of its own, and a comm lane on another.
    pub fn new(device: &Arc<CudaDevice>) -> Result<CudaBackend> {
        let stats = Arc::new(MemoryStats::default());
        let lane = CudaBackend::on_new_stream(device, &stats, None)?;
        CudaBackend::on_new_stream(device, &stats, Some(Box::new(lane)))
    }

    fn on_new_stream(
        device: &Arc<CudaDevice>,
        stats: &Arc<MemoryStats>,
        lane: Option<Box<CudaBackend>>,
    ) -> Result<CudaBackend> {
        Ok(CudaBackend {
            device: device.clone(),
            stream: device.driver.new_stream()?,
            blas: OnceLock::new(),
            scratch: Scratch::default(),
            stats: stats.clone(),
            profiler: OpProfiler::default(),
            segment_tables: optim::SegmentTables::default(),
            lane,
        })
    }

    fn blas(&self) -> Result<&Blas> {
        if let Some(b) = self.blas.get() {
            return Ok(b);
        }
        let made = Blas::new(&self.stream, &self.stats)?;
        Ok(self.blas.get_or_init(|| made))
    }

    /// Opens GPU `ordinal` and makes one backend on it (tests, the op check, single-rank tools).
    pub fn open(ordinal: usize) -> Result<CudaBackend> {
        CudaBackend::new(&CudaDevice::open(ordinal)?)
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.device
    }

    /// This backend's CUDA stream, for other CUDA libraries (NCCL) to issue work on; an error on
    /// the simulated GPU, which only this backend's own work can use.
    pub fn raw_stream(&self) -> Result<cudarc::driver::sys::CUstream> {
        self.stream
            .as_any()
            .downcast_ref::<driver::real::RealStream>()
            .map(|s| s.cu_stream())
            .ok_or_else(|| {
                anyhow!(
                    "{} is not a real GPU: CUDA libraries such as NCCL cannot use it (ranks on the \
                     simulated GPU are threads of one process)",
                    self.device.describe()
                )
            })
    }

    /// Makes the device current on this thread (before calling other CUDA libraries).
    pub fn bind_context(&self) -> Result<()> {
        self.device.driver.bind()
    }

    fn raw_alloc(&self, bytes: usize) -> Result<DeviceMemory> {
        DeviceMemory::new(&self.stream, &self.stats, bytes)
    }

    fn run(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        args: &[Arg],
    ) -> Result<()> {
        launch(self.stream.as_ref(), name, grid, block, args)
    }

    /// Launches `name` with `smem` bytes of dynamic shared memory, first allowing the kernel
    /// more than the default 48 KiB where it asks for more (a function attribute, cheap to set
    /// again, so it is set at each such launch rather than tracked per device).
    fn run_with_smem(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        args: &[Arg],
    ) -> Result<()> {
        if smem > DEFAULT_DYNAMIC_SMEM_LIMIT {
            self.device.driver.set_max_dynamic_smem(name, smem)?;
        }
        launch_with_smem(self.stream.as_ref(), name, grid, block, smem, args)
    }

    /// A grid-stride kernel over `n` elements (nothing to do when `n` is 0).
    fn run_1d(&self, name: &str, n: usize, args: &[Arg]) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.run(name, (grid_for(n), 1, 1), (BLOCK, 1, 1), args)
    }

    fn timed<R>(&self, op: &'static str, f: impl FnOnce() -> Result<R>) -> Result<R> {
        self.profiler.time(self.stream.as_ref(), op, f)
    }

    fn copy_host_to_device(&self, dst: u64, bytes: &[u8]) -> Result<()> {
        // SAFETY: `dst` is a live allocation of at least `bytes.len()` bytes (callers checked the
        // length); the host slice outlives the copy because we synchronize before returning.
        unsafe { self.stream.copy_htod(dst, bytes)? };
        self.synchronize()
    }
}
