//! The narrow boundary under the CUDA backend: what a GPU is asked to do (streams, events,
//! stream-ordered memory, kernel launches by name, one cuBLASLt-style matmul), with two drivers
//! below it: [`real`] (cudarc: the CUDA driver API and cuBLASLt) and [`sim`] (the simulated GPU of
//! `kernels/sim/`, which runs every kernel on the CPU).
//!
//! Everything that decides *what* runs stays above this line and is shared by both: launch
//! geometries, which kernel for which dtype, argument lists, the matmul descriptor's values, stream
//! and event ordering, memory accounting, timing marks. A driver only carries them out, so a bug in
//! the shared code shows on the sim exactly as it would on a GPU.

pub mod real;
mod real_blas;
pub mod sim;

use std::any::Any;
use std::fmt::Debug;
use std::sync::Arc;

use anyhow::Result;

use crate::backend::DType;

/// One opened device (a CUDA context, or a simulated device).
pub trait Driver: Send + Sync + Debug + 'static {
    /// "cuda:0 (NVIDIA H100 80GB HBM3, sm_90)" or "sim:0 (simulated GPU, sm_90)".
    fn describe(&self) -> String;
    /// The device's name as its driver reports it.
    fn name(&self) -> String;
    /// Total and free device memory, in bytes.
    fn memory_info(&self) -> Result<(usize, usize)>;
    /// Makes the device current on the calling thread (before calls into other CUDA libraries).
    fn bind(&self) -> Result<()>;
    /// The first error of asynchronous work (a kernel fault), if any: sticky, as on a GPU.
    fn check_error(&self) -> Result<()>;
    /// A new stream of this device.
    fn new_stream(&self) -> Result<Arc<dyn Stream>>;
    /// Lets `kernel` be launched with up to `bytes` of dynamic shared memory (the opt-in a GPU
    /// needs above 48 KiB).
    fn set_max_dynamic_smem(&self, kernel: &str, bytes: u32) -> Result<()>;
    /// Whether this is a real GPU (NCCL and other CUDA libraries need one).
    fn is_real(&self) -> bool;
}

/// One in-order queue of device work.
pub trait Stream: Send + Sync + 'static {
    fn as_any(&self) -> &dyn Any;
    /// `bytes` of uninitialised device memory, ordered on this stream (0 bytes: address 0).
    fn alloc(&self, bytes: usize) -> Result<u64>;
    /// Frees `ptr` when the stream reaches this point. A failure cannot be returned from where
    /// frees happen (drops): the driver records it for [`Driver::check_error`].
    fn free(&self, ptr: u64);
    fn memset_d8(&self, dst: u64, value: u8, bytes: usize) -> Result<()>;
    /// Queues a copy of `src` to device address `dst`.
    ///
    /// # Safety
    /// `dst` must cover `src.len()` bytes of a live allocation, and `src` must stay valid and
    /// unchanged until the stream has run the copy (callers synchronize before returning).
    unsafe fn copy_htod(&self, dst: u64, src: &[u8]) -> Result<()>;
    /// Queues a copy from device address `src` into `dst`.
    ///
    /// # Safety
    /// `src` must cover `dst.len()` bytes of a live allocation, and `dst` must stay valid and
    /// untouched until the stream has run the copy.
    unsafe fn copy_dtoh(&self, dst: &mut [u8], src: u64) -> Result<()>;
    /// Queues the kernel `name` with `args` (its parameters, in order).
    ///
    /// # Safety
    /// `args` must match the kernel's C signature, and every address among them must be live
    /// device memory of the extent the kernel touches, until the stream has run it.
    unsafe fn launch(&self, name: &str, geometry: &Geometry, args: &[Arg]) -> Result<()>;
    /// An event capturing the work queued so far; `timing` events can be compared with
    /// [`Event::elapsed_ms_to`] (they cost more to wait on).
    fn record(&self, timing: bool) -> Result<Arc<dyn Event>>;
    /// Work queued from now on starts after `event`'s captured work has finished.
    fn wait(&self, event: &dyn Event) -> Result<()>;
    /// Blocks until everything queued so far has run.
    fn synchronize(&self) -> Result<()>;
    /// Queues one matmul with the descriptor values of `call`.
    ///
    /// # Safety
    /// Every address in `call` must be live device memory covering its layout.
    unsafe fn gemm(&self, call: &GemmCall) -> Result<()>;
}

/// A point in a stream's queue.
pub trait Event: Send + Sync + 'static {
    fn as_any(&self) -> &dyn Any;
    /// `Ok(true)` when the captured work has finished, `Ok(false)` when not yet, and the device's
    /// error when it failed (never "not finished" for a failure).
    fn query(&self) -> Result<bool>;
    /// Blocks until the captured work has finished.
    fn synchronize(&self) -> Result<()>;
    /// Milliseconds from this timing event to `end` (both recorded with timing; waits for both).
    fn elapsed_ms_to(&self, end: &dyn Event) -> Result<f32>;
}

/// One kernel argument, as the kernel's C signature takes it.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    /// A device address (`T*`); 0 is `nullptr`.
    Ptr(u64),
    Int(i32),
    Long(i64),
    Float(f32),
}

impl Arg {
    /// The argument's bytes as the kernel reads them (little-endian, its C type's size).
    pub fn bytes(&self) -> Vec<u8> {
        match *self {
            Arg::Ptr(p) => p.to_le_bytes().to_vec(),
            Arg::Int(x) => x.to_le_bytes().to_vec(),
            Arg::Long(x) => x.to_le_bytes().to_vec(),
            Arg::Float(x) => x.to_le_bytes().to_vec(),
        }
    }
}

/// A launch's grid, block and dynamic shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub dynamic_smem_bytes: u32,
}

/// A matrix as `cublasLtMatrixLayoutCreate` describes it: column-major, `rows x cols`, leading
/// dimension `ld` (elements between consecutive columns).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MatrixLayout {
    pub dtype: DType,
    pub rows: u64,
    pub cols: u64,
    pub ld: u64,
}

/// The cuBLASLt epilogues the backend uses (`cublasLtEpilogue_t`, with its values). Column-major,
/// for `D` of `m x n` and `v = alpha * op(A) * op(B) + beta * C`:
/// - `Default`: `D = v`; `Bias`: `D = v + bias[i]` (`m` values);
/// - `GeluAux` / `GeluAuxBias`: `aux = v (+ bias[i])`, `D = gelu(aux)` (GELU of the unrounded sum);
/// - `DGelu` / `DGeluBGrad`: `D = v * gelu'(aux)`, and with BGRAD `bias[i] = Σ_j D[i, j]` (the
///   bias gradient, `m` values, written, not accumulated);
/// - `BGradB`: `D = v`, and `bias[j] = Σ_p op(B)[p, j]` (`n` values: the reduction over `k`).
///
/// `aux` is `m x n` with leading dimension [`GemmDesc::aux_ld`], of D's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Epilogue {
    Default = 1,
    Bias = 4,
    GeluAux = 160,
    GeluAuxBias = 164,
    DGelu = 192,
    DGeluBGrad = 208,
    BGradB = 512,
}

impl Epilogue {
    /// Whether the epilogue reads or writes the auxiliary matrix.
    pub fn has_aux(self) -> bool {
        matches!(
            self,
            Epilogue::GeluAux | Epilogue::GeluAuxBias | Epilogue::DGelu | Epilogue::DGeluBGrad
        )
    }
    /// Whether the epilogue reads a bias vector or writes a bias gradient vector.
    pub fn has_bias(self) -> bool {
        matches!(
            self,
            Epilogue::Bias | Epilogue::GeluAuxBias | Epilogue::DGeluBGrad | Epilogue::BGradB
        )
    }
}

/// The values the backend sets on a cuBLASLt matmul descriptor, its layouts and its preference
/// (compute type f32 and scale type f32 always: the f32 path must match the CPU, so never TF32).
/// Column-major: `D = alpha * op(A) * op(B) + beta * C`, then the epilogue; C and D share `d`'s
/// layout (C may be D, or a distinct matrix of the same layout).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmDesc {
    pub trans_a: bool,
    pub trans_b: bool,
    pub a: MatrixLayout,
    pub b: MatrixLayout,
    pub d: MatrixLayout,
    pub epilogue: Epilogue,
    /// dtype of the epilogue's bias or bias-gradient vector (`Some` exactly when it has one).
    pub bias: Option<DType>,
    /// Leading dimension of the auxiliary matrix (0 without one).
    pub aux_ld: u64,
    /// Minimum alignments in bytes of A, B, C/D and the bias (the heuristic's preference: the
    /// algorithm chosen must fit the pointers).
    pub align: [u32; 4],
    /// `beta` is 1 (add C) rather than 0; `alpha` is 1.
    pub accumulate: bool,
    /// C is a matrix distinct from D (the algorithm must support an out-of-place result).
    pub out_of_place: bool,
}

/// One matmul: its descriptor and the device addresses.
#[derive(Clone, Copy, Debug)]
pub struct GemmCall {
    pub desc: GemmDesc,
    pub a: u64,
    pub b: u64,
    /// C, read when `desc.accumulate`: D itself, or a distinct matrix of D's layout.
    pub c: u64,
    pub d: u64,
    /// The bias or bias-gradient vector; 0 without one.
    pub bias: u64,
    /// The auxiliary matrix; 0 without one.
    pub aux: u64,
    pub workspace: u64,
    pub workspace_bytes: usize,
}

/// What [`Stream::gemm`] fails with when the library has no algorithm for a descriptor (a real
/// GPU's heuristic can refuse an epilogue for a shape): the caller may fall back to unfused ops.
#[derive(Debug)]
pub struct NoAlgorithm(pub String);

impl std::fmt::Display for NoAlgorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no matmul algorithm: {}", self.0)
    }
}

impl std::error::Error for NoAlgorithm {}
