//! Opening a GPU: finding the CUDA libraries, creating the context, loading the compiled kernels.
//!
//! cudarc loads libcuda and libcublasLt lazily and panics when none of its candidate names loads, so
//! everything is probed here first and absence becomes one error that names the missing library and
//! where it was looked for. cuBLAS is often not in the loader cache (FACTS.md): it is opened by full
//! path from `CUDA_HOME/lib64` and `/usr/local/cuda/lib64` first; once loaded by path, cudarc finds
//! it by its soname.
//!
//! One [`CudaDevice`] is shared by every rank that runs on the GPU (ranks sharing one GPU are
//! threads); each rank makes its own [`super::CudaBackend`] from it, with its own stream.

use std::collections::HashMap;
use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{sys as drv, CudaContext, CudaFunction};
use cudarc::nvrtc::Ptx;

use crate::backend::kernels::{missing_kernels_reason, EXPECTED_ENTRIES, KERNEL_MODULES};

/// A GPU opened for training: its context and every kernel, loaded once.
pub struct CudaDevice {
    pub(super) ctx: Arc<CudaContext>,
    pub(super) kernels: HashMap<&'static str, CudaFunction>,
    ordinal: usize,
    name: String,
    compute_capability: (i32, i32),
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaDevice({})", self.describe())
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

impl CudaDevice {
    /// Opens GPU `ordinal`: checks the libraries, creates the context, loads every kernel.
    pub fn open(ordinal: usize) -> Result<Arc<CudaDevice>> {
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
        // Buffers are raw device allocations whose cross-stream ordering the trainer manages
        // (the local communicator synchronizes before peers read): cudarc's per-slice events
        // would only add work.
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
        let kernels = load_kernels(&ctx, compute_capability)?;
        Ok(Arc::new(CudaDevice {
            ctx,
            kernels,
            ordinal,
            name,
            compute_capability,
        }))
    }

    /// The GPU's name as the driver reports it ("NVIDIA H100 80GB HBM3").
    pub fn name(&self) -> &str {
        &self.name
    }

    /// "cuda:0 (NVIDIA H100 80GB HBM3, sm_90)".
    pub fn describe(&self) -> String {
        format!(
            "cuda:{} ({}, sm_{}{})",
            self.ordinal, self.name, self.compute_capability.0, self.compute_capability.1
        )
    }

    /// Total and free device memory, in bytes.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| anyhow!("binding the CUDA context: {e:?}"))?;
        let (free, total) = cudarc::driver::result::mem_get_info()
            .map_err(|e| anyhow!("reading device memory: {e:?}"))?;
        Ok((total, free))
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
