//! The real driver: a CUDA context through cudarc, its streams and events, stream-ordered memory
//! from the device's pool, kernels loaded from the embedded modules, and cuBLASLt (`real_blas`).
//!
//! cudarc loads libcuda and libcublasLt lazily and panics when none of its candidate names loads, so
//! everything is probed here first and absence becomes one error that names the missing library and
//! where it was looked for. cuBLAS is often not in the loader cache (FACTS.md): it is opened by full
//! path from `CUDA_HOME/lib64` and `/usr/local/cuda/lib64` first; once loaded by path, cudarc finds
//! it by its soname.

use std::any::Any;
use std::collections::HashMap;
use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::sys::{CUevent_flags, CUfunction_attribute_enum};
use cudarc::driver::{sys as drv, CudaContext, CudaEvent, CudaFunction, CudaStream};
use cudarc::nvrtc::Ptx;

use super::{Arg, Driver, Event, GemmCall, Geometry, Stream};
use crate::backend::kernels::{missing_kernels_reason, EXPECTED_ENTRIES, KERNEL_MODULES};

/// A GPU opened through the CUDA driver: its context and every kernel, loaded once.
pub struct RealDriver {
    ctx: Arc<CudaContext>,
    kernels: Arc<HashMap<&'static str, CudaFunction>>,
    ordinal: usize,
    name: String,
    compute_capability: (i32, i32),
}

impl std::fmt::Debug for RealDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RealDriver({})", self.describe())
    }
}

/// Why no GPU can be used on this machine, if none can: the libraries and the driver's view,
/// without creating a context. `None` means a GPU is there (auto device selection uses this).
pub fn unavailable_reason() -> Option<String> {
    if let Err(e) = load_libraries() {
        return Some(e.to_string());
    }
    match device_count() {
        Ok(0) => Some("the CUDA driver sees no GPU".to_string()),
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    }
}

/// Number of GPUs the driver sees (after the libraries were found).
pub fn device_count() -> Result<usize> {
    load_libraries()?;
    cudarc::driver::result::init().map_err(|e| anyhow!("cuInit failed: {e:?}"))?;
    let n = CudaContext::device_count().map_err(|e| anyhow!("counting GPUs: {e:?}"))?;
    Ok(n.max(0) as usize)
}

impl RealDriver {
    /// Opens GPU `ordinal`: checks the libraries, creates the context, loads every kernel.
    pub fn open(ordinal: usize) -> Result<RealDriver> {
        if let Some(reason) = missing_kernels_reason() {
            bail!("{reason}");
        }
        let count = device_count()?;
        if count == 0 {
            bail!("the CUDA driver sees no GPU (device: cuda was asked for)");
        }
        if ordinal >= count {
            bail!("GPU {ordinal} was asked for, the driver sees {count} GPU(s)");
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| anyhow!("creating a CUDA context on GPU {ordinal}: {e:?}"))?;
        // Buffers are raw device allocations whose cross-stream ordering the backend manages with
        // its own events: cudarc's per-slice events would only add work.
        // SAFETY: no CudaSlice of this context relies on event tracking (we allocate raw).
        unsafe { ctx.disable_event_tracking() };
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".to_string());
        let compute_capability = ctx
            .compute_capability()
            .map_err(|e| anyhow!("reading GPU {ordinal}'s compute capability: {e:?}"))?;
        if compute_capability.0 < 8 {
            bail!(
                "GPU {ordinal} ({name}) has compute capability {}.{}; shardtrain's kernels need 8.0 \
                 (Ampere) or newer",
                compute_capability.0,
                compute_capability.1
            );
        }
        keep_pool_memory(&ctx, ordinal)?;
        let kernels = Arc::new(load_kernels(&ctx, compute_capability)?);
        Ok(RealDriver {
            ctx,
            kernels,
            ordinal,
            name,
            compute_capability,
        })
    }
}

impl Driver for RealDriver {
    fn describe(&self) -> String {
        format!(
            "cuda:{} ({}, sm_{}{})",
            self.ordinal, self.name, self.compute_capability.0, self.compute_capability.1
        )
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn memory_info(&self) -> Result<(usize, usize)> {
        self.bind()?;
        let (free, total) = cudarc::driver::result::mem_get_info()
            .map_err(|e| anyhow!("reading device memory: {e:?}"))?;
        Ok((total, free))
    }

    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| anyhow!("binding the CUDA context to this thread: {e:?}"))
    }

    fn check_error(&self) -> Result<()> {
        self.ctx
            .check_err()
            .map_err(|e| anyhow!("an earlier GPU operation failed: {e:?}"))
    }

    fn new_stream(&self) -> Result<Arc<dyn Stream>> {
        let stream = self
            .ctx
            .new_stream()
            .map_err(|e| anyhow!("creating a CUDA stream: {e:?}"))?;
        Ok(Arc::new(RealStream {
            stream,
            kernels: self.kernels.clone(),
            blas: super::real_blas::LtCache::default(),
        }))
    }

    fn set_max_dynamic_smem(&self, kernel: &str, bytes: u32) -> Result<()> {
        let f = self
            .kernels
            .get(kernel)
            .ok_or_else(|| anyhow!("kernel `{kernel}` is not among the loaded kernels"))?;
        f.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )
        .map_err(|e| anyhow!("allowing `{kernel}` {bytes} bytes of dynamic shared memory: {e:?}"))
    }

    fn is_real(&self) -> bool {
        true
    }
}

/// A CUDA stream with the device's kernels and its own cuBLASLt handle and plan cache.
pub struct RealStream {
    stream: Arc<CudaStream>,
    kernels: Arc<HashMap<&'static str, CudaFunction>>,
    blas: super::real_blas::LtCache,
}

impl RealStream {
    /// The raw stream, for other CUDA libraries (NCCL) to issue work on.
    pub fn cu_stream(&self) -> drv::CUstream {
        self.stream.cu_stream()
    }

    fn bind(&self) -> Result<()> {
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| anyhow!("binding the CUDA context: {e:?}"))
    }
}

/// A recorded CUDA event.
pub struct RealEvent(CudaEvent);

impl Event for RealEvent {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn query(&self) -> Result<bool> {
        self.0
            .try_is_complete()
            .map_err(|e| anyhow!("the GPU reported an error for work before an event: {e:?}"))
    }

    fn synchronize(&self) -> Result<()> {
        self.0
            .synchronize()
            .map_err(|e| anyhow!("waiting for a CUDA event: {e:?}"))
    }

    fn elapsed_ms_to(&self, end: &dyn Event) -> Result<f32> {
        let end = end
            .as_any()
            .downcast_ref::<RealEvent>()
            .ok_or_else(|| anyhow!("elapsed time between events of different drivers"))?;
        // cuEventElapsedTime (cudarc waits for both events first), about 0.5 us resolution.
        self.0
            .elapsed_ms(&end.0)
            .map_err(|e| anyhow!("reading the time between two CUDA events: {e:?}"))
    }
}

impl Stream for RealStream {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn alloc(&self, bytes: usize) -> Result<u64> {
        if bytes == 0 {
            return Ok(0);
        }
        self.bind()?;
        // SAFETY: a plain stream-ordered allocation on a live stream of the bound context.
        unsafe { cudarc::driver::result::malloc_async(self.stream.cu_stream(), bytes) }
            .map_err(|e| anyhow!("allocating {bytes} bytes on the GPU failed: {e:?}"))
    }

    fn free(&self, ptr: u64) {
        if ptr == 0 {
            return;
        }
        // A failure here cannot be returned; the context records it for the next check.
        let ctx = self.stream.context();
        ctx.record_err(ctx.bind_to_thread());
        // SAFETY: the pointer came from malloc_async on a stream of this context and is freed
        // once; work queued on the stream before this point still sees valid memory.
        ctx.record_err(unsafe { cudarc::driver::result::free_async(ptr, self.stream.cu_stream()) });
    }

    fn memset_d8(&self, dst: u64, value: u8, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: the caller passes a live allocation of at least `bytes` bytes.
        unsafe {
            cudarc::driver::result::memset_d8_async(dst, value, bytes, self.stream.cu_stream())
        }
        .map_err(|e| anyhow!("setting GPU memory: {e:?}"))
    }

    unsafe fn copy_htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        self.bind()?;
        cudarc::driver::result::memcpy_htod_async(dst, src, self.stream.cu_stream())
            .map_err(|e| anyhow!("copying to the GPU: {e:?}"))
    }

    unsafe fn copy_dtoh(&self, dst: &mut [u8], src: u64) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        self.bind()?;
        cudarc::driver::result::memcpy_dtoh_async(dst, src, self.stream.cu_stream())
            .map_err(|e| anyhow!("copying from the GPU: {e:?}"))
    }

    unsafe fn launch(&self, name: &str, g: &Geometry, args: &[Arg]) -> Result<()> {
        let f = self
            .kernels
            .get(name)
            .ok_or_else(|| anyhow!("kernel `{name}` is not among the loaded kernels"))?;
        self.bind()?;
        // cuLaunchKernel copies the values behind these pointers before it returns.
        let mut values: Vec<Vec<u8>> = args.iter().map(Arg::bytes).collect();
        let mut params: Vec<*mut c_void> = values
            .iter_mut()
            .map(|v| v.as_mut_ptr() as *mut c_void)
            .collect();
        cudarc::driver::result::launch_kernel(
            f.cu_function(),
            g.grid,
            g.block,
            g.dynamic_smem_bytes,
            self.stream.cu_stream(),
            &mut params,
        )
        .map_err(|e| anyhow!("launching kernel `{name}`: {e:?}"))
    }

    fn record(&self, timing: bool) -> Result<Arc<dyn Event>> {
        // Events without timing (CU_EVENT_DISABLE_TIMING, cudarc's default) are cheaper to wait on;
        // cuEventElapsedTime needs one made with timing.
        let flags = timing.then_some(CUevent_flags::CU_EVENT_DEFAULT);
        let event = self
            .stream
            .record_event(flags)
            .map_err(|e| anyhow!("recording a CUDA event: {e:?}"))?;
        Ok(Arc::new(RealEvent(event)))
    }

    fn wait(&self, event: &dyn Event) -> Result<()> {
        let event = event
            .as_any()
            .downcast_ref::<RealEvent>()
            .ok_or_else(|| anyhow!("a CUDA stream cannot wait for another driver's event"))?;
        self.stream
            .wait(&event.0)
            .map_err(|e| anyhow!("making a CUDA stream wait for an event: {e:?}"))
    }

    fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| {
            anyhow!(
                "the GPU reported an error while running queued work (a kernel fault surfaces at \
                 the next synchronize): {e:?}"
            )
        })
    }

    unsafe fn gemm(&self, call: &GemmCall) -> Result<()> {
        self.bind()?;
        self.blas.matmul(self.stream.cu_stream(), call)
    }
}

/// The stream-ordered allocator returns freed memory to the driver at every synchronization
/// unless told otherwise; a trainer frees and reallocates the same sizes every step, so the pool
/// keeps what it has (as PyTorch's caching allocator does).
fn keep_pool_memory(ctx: &CudaContext, ordinal: usize) -> Result<()> {
    ctx.bind_to_thread()
        .map_err(|e| anyhow!("binding the CUDA context: {e:?}"))?;
    let mut pool = std::mem::MaybeUninit::<drv::CUmemoryPool>::uninit();
    let mut threshold: u64 = u64::MAX;
    // SAFETY: plain driver calls with valid out-pointers; the device handle comes from the context.
    unsafe {
        drv::cuDeviceGetDefaultMemPool(pool.as_mut_ptr(), ctx.cu_device())
            .result()
            .map_err(|e| anyhow!("GPU {ordinal} has no default memory pool: {e:?}"))?;
        drv::cuMemPoolSetAttribute(
            pool.assume_init(),
            drv::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut c_void,
        )
        .result()
        .map_err(|e| anyhow!("configuring GPU {ordinal}'s memory pool: {e:?}"))?;
    }
    Ok(())
}

/// Loads every module (the sm_90 cubin on compute capability 9.0, the PTX elsewhere, which the
/// driver compiles for the GPU at hand) and every entry point the backend launches.
fn load_kernels(
    ctx: &Arc<CudaContext>,
    cc: (i32, i32),
) -> Result<HashMap<&'static str, CudaFunction>> {
    let mut kernels = HashMap::new();
    for (module_name, entries) in EXPECTED_ENTRIES {
        let module = KERNEL_MODULES
            .iter()
            .find(|m| m.name == *module_name)
            .ok_or_else(|| anyhow!("kernels/{module_name}.cu is missing from this build"))?;
        let image = if cc == (9, 0) {
            Ptx::from_binary(module.cubin_sm90.to_vec())
        } else {
            Ptx::from_src(module.ptx)
        };
        let loaded = ctx
            .load_module(image)
            .map_err(|e| anyhow!("loading kernels/{module_name}.cu onto the GPU: {e:?}"))?;
        for entry in *entries {
            let f = loaded
                .load_function(entry)
                .map_err(|e| anyhow!("kernel `{entry}` in kernels/{module_name}.cu: {e:?}"))?;
            kernels.insert(*entry, f);
        }
    }
    Ok(kernels)
}

/// Directories searched for CUDA libraries before the loader's own path.
fn cuda_lib_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(home) = std::env::var_os("CUDA_HOME").or_else(|| std::env::var_os("CUDA_PATH")) {
        dirs.push(PathBuf::from(&home).join("lib64"));
        dirs.push(PathBuf::from(&home).join("lib"));
    }
    dirs.push(PathBuf::from("/usr/local/cuda/lib64"));
    dirs
}

/// Opens `soname` by full path from the CUDA directories, if it is there, and keeps it loaded for
/// the life of the process so later opens by soname (cudarc's) find it.
fn preload(soname: &str) {
    for dir in cuda_lib_dirs() {
        let path = dir.join(soname);
        if !path.is_file() {
            continue;
        }
        // SAFETY: loading a CUDA library runs its initialisers, which is what cudarc would do too.
        let lib = unsafe {
            libloading::os::unix::Library::open(
                Some(&path),
                libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
            )
        };
        if let Ok(lib) = lib {
            // Never unloaded: cudarc keeps function pointers into it.
            std::mem::forget(lib);
            return;
        }
    }
}

/// Finds libcuda and libcublasLt once per process; the error names what is missing.
fn load_libraries() -> Result<()> {
    static LOADED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    LOADED
        .get_or_init(|| {
            // SAFETY: is_culib_present only tries to open the library.
            if !unsafe { drv::is_culib_present() } {
                return Err("no NVIDIA driver library (libcuda.so) could be loaded: \
                            is an NVIDIA driver installed?"
                    .to_string());
            }
            preload("libcublasLt.so.13");
            // SAFETY: as above.
            if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
                let looked: Vec<String> = cuda_lib_dirs()
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect();
                return Err(format!(
                    "cuBLASLt (libcublasLt.so.13, CUDA 13) could not be loaded: looked in {} and \
                     the loader path; set CUDA_HOME to the CUDA toolkit or add its lib64 to \
                     LD_LIBRARY_PATH",
                    looked.join(", ")
                ));
            }
            Ok(())
        })
        .clone()
        .map_err(|e| anyhow!(e))
        .context("the CUDA backend cannot start")
}
