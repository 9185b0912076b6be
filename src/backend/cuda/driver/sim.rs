//! The sim driver: the simulated GPU of `kernels/sim/` (a C++ library built by build.rs with the
//! kernels compiled for the host), loaded at run time and called through its C interface
//! (`kernels/sim/sim_api.h`). Streams are host worker threads, events real synchronisation, memory
//! host heap blocks with guard bytes, kernels run block by block with the threads as fibers.
//!
//! The library is found at `SHARDTRAIN_SIM_LIB` when set (the sanitizer builds are run this way),
//! else where build.rs put it, else next to the executable.

use std::any::Any;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use anyhow::{anyhow, bail, Result};

use super::{Arg, Driver, Event, GemmCall, Geometry, MatrixLayout, Stream};
use crate::backend::DType;

/// The library's file name.
pub const SIM_LIBRARY: &str = "libshardtrain_sim.so";

#[repr(C)]
struct RawDevice(c_void);
#[repr(C)]
struct RawStream(c_void);
#[repr(C)]
struct RawEvent(c_void);

#[repr(C)]
#[derive(Clone, Copy)]
struct SimLayout {
    dtype: c_int,
    rows: u64,
    cols: u64,
    ld: u64,
}

#[repr(C)]
struct SimGemmDesc {
    trans_a: c_int,
    trans_b: c_int,
    a: SimLayout,
    b: SimLayout,
    c: SimLayout,
    d: SimLayout,
    alpha: f32,
    beta: f32,
    epilogue: c_int,
    bias_type: c_int,
    aux_ld: u64,
}

const SIM_OK: c_int = 0;
const SIM_NOT_READY: c_int = 1;

/// The library's entry points (sim_api.h), resolved once.
struct SimLib {
    _lib: libloading::Library,
    last_error: unsafe extern "C" fn() -> *const c_char,
    device_create: unsafe extern "C" fn(*mut *mut RawDevice, u64) -> c_int,
    device_destroy: unsafe extern "C" fn(*mut RawDevice) -> c_int,
    device_memory: unsafe extern "C" fn(*mut RawDevice, *mut u64, *mut u64) -> c_int,
    device_error: unsafe extern "C" fn(*mut RawDevice) -> c_int,
    stream_create: unsafe extern "C" fn(*mut RawDevice, *mut *mut RawStream) -> c_int,
    stream_destroy: unsafe extern "C" fn(*mut RawStream) -> c_int,
    stream_synchronize: unsafe extern "C" fn(*mut RawStream) -> c_int,
    stream_wait_event: unsafe extern "C" fn(*mut RawStream, *mut RawEvent) -> c_int,
    event_create: unsafe extern "C" fn(*mut RawDevice, *mut *mut RawEvent, c_int) -> c_int,
    event_destroy: unsafe extern "C" fn(*mut RawEvent) -> c_int,
    event_record: unsafe extern "C" fn(*mut RawEvent, *mut RawStream) -> c_int,
    event_query: unsafe extern "C" fn(*mut RawEvent) -> c_int,
    event_synchronize: unsafe extern "C" fn(*mut RawEvent) -> c_int,
    event_elapsed_ms: unsafe extern "C" fn(*mut f32, *mut RawEvent, *mut RawEvent) -> c_int,
    malloc_async: unsafe extern "C" fn(*mut RawStream, u64, *mut u64) -> c_int,
    free_async: unsafe extern "C" fn(*mut RawStream, u64) -> c_int,
    memcpy_htod: unsafe extern "C" fn(*mut RawStream, u64, *const c_void, u64) -> c_int,
    memcpy_dtoh: unsafe extern "C" fn(*mut RawStream, *mut c_void, u64, u64) -> c_int,
    memset_d8: unsafe extern "C" fn(*mut RawStream, u64, u8, u64) -> c_int,
    kernel_count: unsafe extern "C" fn() -> c_int,
    kernel_name: unsafe extern "C" fn(c_int) -> *const c_char,
    set_max_dynamic_smem: unsafe extern "C" fn(*mut RawDevice, *const c_char, u32) -> c_int,
    #[allow(clippy::type_complexity)]
    launch: unsafe extern "C" fn(
        *mut RawStream,
        *const c_char,
        *const u32,
        *const u32,
        u32,
        *const *mut c_void,
        *const u16,
        c_int,
    ) -> c_int,
    gemm: unsafe extern "C" fn(
        *mut RawStream,
        *const SimGemmDesc,
        u64,
        u64,
        u64,
        u64,
        u64,
        u64,
    ) -> c_int,
}

/// Where build.rs put the library, or why it did not build one.
fn built_library() -> std::result::Result<PathBuf, &'static str> {
    match option_env!("SHARDTRAIN_SIM_LIB") {
        Some(p) if !p.is_empty() => Ok(PathBuf::from(p)),
        _ => Err(option_env!("SHARDTRAIN_SIM_MISSING").unwrap_or("build.rs built no sim library")),
    }
}

/// The candidate paths of the library, in the order they are tried.
fn library_candidates() -> Vec<PathBuf> {
    let mut paths = Vec::new();
    if let Some(p) = std::env::var_os("SHARDTRAIN_SIM_LIB") {
        paths.push(PathBuf::from(p));
        return paths;
    }
    if let Ok(p) = built_library() {
        paths.push(p);
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(PathBuf::from))
    {
        paths.push(dir.join(SIM_LIBRARY));
    }
    paths
}

/// Why the simulated GPU cannot be used, if it cannot (no library built, or none found).
pub fn unavailable_reason() -> Option<String> {
    lib().err().map(|e| e.to_string())
}

fn lib() -> Result<&'static SimLib> {
    static LIB: OnceLock<std::result::Result<SimLib, String>> = OnceLock::new();
    LIB.get_or_init(load_library)
        .as_ref()
        .map_err(|e| anyhow!("the simulated GPU cannot start: {e}"))
}

fn load_library() -> std::result::Result<SimLib, String> {
    let candidates = library_candidates();
    let Some(path) = candidates.iter().find(|p| p.is_file()) else {
        let why = built_library()
            .err()
            .unwrap_or("it is not where build.rs put it");
        return Err(format!(
            "{SIM_LIBRARY} was not found (looked at {}; {why}); set SHARDTRAIN_SIM_LIB to its path",
            candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    };
    // SAFETY: loading our own library runs only its trivial static initialisers.
    let lib = unsafe { libloading::Library::new(path) }
        .map_err(|e| format!("loading {}: {e}", path.display()))?;
    macro_rules! sym {
        ($name:literal) => {
            // SAFETY: each symbol is declared in sim_api.h with exactly this signature.
            *unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                .map_err(|e| format!("{}: no `{}`: {e}", path.display(), $name))?
        };
    }
    Ok(SimLib {
        last_error: sym!("sim_last_error"),
        device_create: sym!("sim_device_create"),
        device_destroy: sym!("sim_device_destroy"),
        device_memory: sym!("sim_device_memory"),
        device_error: sym!("sim_device_error"),
        stream_create: sym!("sim_stream_create"),
        stream_destroy: sym!("sim_stream_destroy"),
        stream_synchronize: sym!("sim_stream_synchronize"),
        stream_wait_event: sym!("sim_stream_wait_event"),
        event_create: sym!("sim_event_create"),
        event_destroy: sym!("sim_event_destroy"),
        event_record: sym!("sim_event_record"),
        event_query: sym!("sim_event_query"),
        event_synchronize: sym!("sim_event_synchronize"),
        event_elapsed_ms: sym!("sim_event_elapsed_ms"),
        malloc_async: sym!("sim_malloc_async"),
        free_async: sym!("sim_free_async"),
        memcpy_htod: sym!("sim_memcpy_htod_async"),
        memcpy_dtoh: sym!("sim_memcpy_dtoh_async"),
        memset_d8: sym!("sim_memset_d8_async"),
        kernel_count: sym!("sim_kernel_count"),
        kernel_name: sym!("sim_kernel_name"),
        set_max_dynamic_smem: sym!("sim_kernel_set_max_dynamic_smem"),
        launch: sym!("sim_launch"),
        gemm: sym!("sim_gemm_async"),
        _lib: lib,
    })
}

impl SimLib {
    /// `Ok` for SIM_OK, else the library's message for the calling thread's last failure.
    fn check(&self, status: c_int, what: &str) -> Result<()> {
        if status == SIM_OK {
            return Ok(());
        }
        // SAFETY: sim_last_error returns a NUL-terminated string owned by the library.
        let msg = unsafe {
            let p = (self.last_error)();
            if p.is_null() {
                String::new()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        bail!("simulated GPU: {what}: {msg}")
    }
}

/// The names of every kernel compiled into the sim library.
pub fn kernel_names() -> Result<Vec<String>> {
    let lib = lib()?;
    // SAFETY: plain queries of the library's static registry.
    let n = unsafe { (lib.kernel_count)() };
    Ok((0..n)
        .map(|i| {
            unsafe { CStr::from_ptr((lib.kernel_name)(i)) }
                .to_string_lossy()
                .into_owned()
        })
        .collect())
}

/// One simulated device; destroyed when its driver and every stream and event are gone.
struct DeviceHandle {
    lib: &'static SimLib,
    raw: *mut RawDevice,
    /// A failure that could not be returned where it happened (a free in a drop).
    deferred: Mutex<Option<String>>,
}

// SAFETY: the sim library's calls are thread-safe on a device (its API is the CUDA driver's, which
// is); the handle is an opaque pointer.
unsafe impl Send for DeviceHandle {}
// SAFETY: as above.
unsafe impl Sync for DeviceHandle {}

impl Drop for DeviceHandle {
    fn drop(&mut self) {
        // SAFETY: created once in SimDriver::open; every stream and event holding it is gone.
        unsafe { (self.lib.device_destroy)(self.raw) };
    }
}

/// The simulated GPU.
pub struct SimDriver {
    dev: Arc<DeviceHandle>,
}

impl std::fmt::Debug for SimDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SimDriver")
    }
}

impl SimDriver {
    /// A new simulated device with its own memory (16 GiB as it reports it).
    pub fn open() -> Result<SimDriver> {
        let lib = lib()?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: a valid out-pointer.
        lib.check(
            unsafe { (lib.device_create)(&mut raw, 0) },
            "creating a device",
        )?;
        Ok(SimDriver {
            dev: Arc::new(DeviceHandle {
                lib,
                raw,
                deferred: Mutex::new(None),
            }),
        })
    }
}

impl Driver for SimDriver {
    fn describe(&self) -> String {
        "sim:0 (simulated GPU: kernels run on the CPU, sm_90 limits)".to_string()
    }

    fn name(&self) -> String {
        "shardtrain simulated GPU".to_string()
    }

    fn memory_info(&self) -> Result<(usize, usize)> {
        let (mut free, mut total) = (0u64, 0u64);
        let lib = self.dev.lib;
        // SAFETY: valid out-pointers on a live device.
        lib.check(
            unsafe { (lib.device_memory)(self.dev.raw, &mut free, &mut total) },
            "reading device memory",
        )?;
        Ok((total as usize, free as usize))
    }

    fn bind(&self) -> Result<()> {
        Ok(())
    }

    fn check_error(&self) -> Result<()> {
        if let Some(e) = self
            .dev
            .deferred
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            bail!("an earlier operation on the simulated GPU failed: {e}");
        }
        let lib = self.dev.lib;
        // SAFETY: a live device.
        lib.check(
            unsafe { (lib.device_error)(self.dev.raw) },
            "queued work failed",
        )
    }

    fn new_stream(&self) -> Result<Arc<dyn Stream>> {
        let lib = self.dev.lib;
        let mut raw = std::ptr::null_mut();
        // SAFETY: a valid out-pointer on a live device.
        lib.check(
            unsafe { (lib.stream_create)(self.dev.raw, &mut raw) },
            "creating a stream",
        )?;
        Ok(Arc::new(SimStream {
            dev: self.dev.clone(),
            raw,
        }))
    }

    fn set_max_dynamic_smem(&self, kernel: &str, bytes: u32) -> Result<()> {
        let lib = self.dev.lib;
        let name = CString::new(kernel)?;
        // SAFETY: a NUL-terminated name on a live device.
        lib.check(
            unsafe { (lib.set_max_dynamic_smem)(self.dev.raw, name.as_ptr(), bytes) },
            &format!("allowing `{kernel}` {bytes} bytes of dynamic shared memory"),
        )
    }

    fn is_real(&self) -> bool {
        false
    }
}

/// A stream of the simulated GPU: one host worker thread.
pub struct SimStream {
    dev: Arc<DeviceHandle>,
    raw: *mut RawStream,
}

// SAFETY: as DeviceHandle: the library's calls are thread-safe.
unsafe impl Send for SimStream {}
// SAFETY: as above.
unsafe impl Sync for SimStream {}

impl Drop for SimStream {
    fn drop(&mut self) {
        // SAFETY: created once; drains its queue before ending.
        unsafe { (self.dev.lib.stream_destroy)(self.raw) };
    }
}

/// An event of the simulated GPU.
pub struct SimEvent {
    dev: Arc<DeviceHandle>,
    raw: *mut RawEvent,
}

// SAFETY: as DeviceHandle.
unsafe impl Send for SimEvent {}
// SAFETY: as above.
unsafe impl Sync for SimEvent {}

impl Drop for SimEvent {
    fn drop(&mut self) {
        // SAFETY: created once; the library keeps it alive while queued work refers to it.
        unsafe { (self.dev.lib.event_destroy)(self.raw) };
    }
}

fn sim_event(e: &dyn Event) -> Result<&SimEvent> {
    e.as_any()
        .downcast_ref::<SimEvent>()
        .ok_or_else(|| anyhow!("an event of another driver used on the simulated GPU"))
}

impl Event for SimEvent {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn query(&self) -> Result<bool> {
        let lib = self.dev.lib;
        // SAFETY: a live event.
        match unsafe { (lib.event_query)(self.raw) } {
            SIM_NOT_READY => Ok(false),
            status => lib
                .check(status, "work before an event failed")
                .map(|_| true),
        }
    }

    fn synchronize(&self) -> Result<()> {
        let lib = self.dev.lib;
        // SAFETY: a live event.
        lib.check(
            unsafe { (lib.event_synchronize)(self.raw) },
            "waiting for an event",
        )
    }

    fn elapsed_ms_to(&self, end: &dyn Event) -> Result<f32> {
        let end = sim_event(end)?;
        self.synchronize()?;
        end.synchronize()?;
        let lib = self.dev.lib;
        let mut ms = 0.0f32;
        // SAFETY: live events and a valid out-pointer.
        lib.check(
            unsafe { (lib.event_elapsed_ms)(&mut ms, self.raw, end.raw) },
            "reading the time between two events",
        )?;
        Ok(ms)
    }
}

fn sim_layout(l: &MatrixLayout) -> SimLayout {
    SimLayout {
        dtype: match l.dtype {
            DType::F32 => 0,
            DType::Bf16 => 1,
        },
        rows: l.rows,
        cols: l.cols,
        ld: l.ld,
    }
}

impl Stream for SimStream {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn alloc(&self, bytes: usize) -> Result<u64> {
        let lib = self.dev.lib;
        let mut ptr = 0u64;
        // SAFETY: a valid out-pointer on a live stream.
        lib.check(
            unsafe { (lib.malloc_async)(self.raw, bytes as u64, &mut ptr) },
            &format!("allocating {bytes} bytes"),
        )?;
        Ok(ptr)
    }

    fn free(&self, ptr: u64) {
        if ptr == 0 {
            return;
        }
        let lib = self.dev.lib;
        // SAFETY: an address this stream's device allocated, freed once.
        if let Err(e) = lib.check(unsafe { (lib.free_async)(self.raw, ptr) }, "freeing memory") {
            let mut deferred = self
                .dev
                .deferred
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            deferred.get_or_insert_with(|| format!("{e:#}"));
        }
    }

    fn memset_d8(&self, dst: u64, value: u8, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        let lib = self.dev.lib;
        // SAFETY: the library checks the range against its live allocations.
        lib.check(
            unsafe { (lib.memset_d8)(self.raw, dst, value, bytes as u64) },
            "setting device memory",
        )
    }

    unsafe fn copy_htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        let lib = self.dev.lib;
        lib.check(
            (lib.memcpy_htod)(
                self.raw,
                dst,
                src.as_ptr() as *const c_void,
                src.len() as u64,
            ),
            "copying to the device",
        )
    }

    unsafe fn copy_dtoh(&self, dst: &mut [u8], src: u64) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        let lib = self.dev.lib;
        lib.check(
            (lib.memcpy_dtoh)(
                self.raw,
                dst.as_mut_ptr() as *mut c_void,
                src,
                dst.len() as u64,
            ),
            "copying from the device",
        )
    }

    unsafe fn launch(&self, name: &str, g: &Geometry, args: &[Arg]) -> Result<()> {
        let lib = self.dev.lib;
        let cname = CString::new(name)?;
        let mut values: Vec<Vec<u8>> = args.iter().map(Arg::bytes).collect();
        let sizes: Vec<u16> = values.iter().map(|v| v.len() as u16).collect();
        let params: Vec<*mut c_void> = values
            .iter_mut()
            .map(|v| v.as_mut_ptr() as *mut c_void)
            .collect();
        let grid = [g.grid.0, g.grid.1, g.grid.2];
        let block = [g.block.0, g.block.1, g.block.2];
        // The library copies the parameter values before it returns, as cuLaunchKernel does.
        lib.check(
            (lib.launch)(
                self.raw,
                cname.as_ptr(),
                grid.as_ptr(),
                block.as_ptr(),
                g.dynamic_smem_bytes,
                params.as_ptr(),
                sizes.as_ptr(),
                params.len() as c_int,
            ),
            &format!("launching kernel `{name}`"),
        )
    }

    fn record(&self, timing: bool) -> Result<Arc<dyn Event>> {
        let lib = self.dev.lib;
        let mut raw = std::ptr::null_mut();
        // SAFETY: a valid out-pointer; the event is recorded on this live stream.
        unsafe {
            lib.check(
                (lib.event_create)(self.dev.raw, &mut raw, c_int::from(timing)),
                "creating an event",
            )?;
        }
        let event = SimEvent {
            dev: self.dev.clone(),
            raw,
        };
        // SAFETY: both live.
        lib.check(
            unsafe { (lib.event_record)(event.raw, self.raw) },
            "recording an event",
        )?;
        Ok(Arc::new(event))
    }

    fn wait(&self, event: &dyn Event) -> Result<()> {
        let event = sim_event(event)?;
        let lib = self.dev.lib;
        // SAFETY: both live.
        lib.check(
            unsafe { (lib.stream_wait_event)(self.raw, event.raw) },
            "making a stream wait for an event",
        )
    }

    fn synchronize(&self) -> Result<()> {
        let lib = self.dev.lib;
        // SAFETY: a live stream.
        lib.check(
            unsafe { (lib.stream_synchronize)(self.raw) },
            "running queued work (a kernel fault surfaces at the next synchronize)",
        )
    }

    unsafe fn gemm(&self, call: &GemmCall) -> Result<()> {
        let d = &call.desc;
        let desc = SimGemmDesc {
            trans_a: c_int::from(d.trans_a),
            trans_b: c_int::from(d.trans_b),
            a: sim_layout(&d.a),
            b: sim_layout(&d.b),
            c: sim_layout(&d.d),
            d: sim_layout(&d.d),
            alpha: 1.0,
            beta: if d.accumulate { 1.0 } else { 0.0 },
            // cuBLASLt's own enum values (sim_api.h uses them too).
            epilogue: d.epilogue as c_int,
            bias_type: match d.bias {
                Some(DType::Bf16) => 1,
                _ => 0,
            },
            aux_ld: d.aux_ld,
        };
        let lib = self.dev.lib;
        lib.check(
            (lib.gemm)(
                self.raw, &desc, call.a, call.b, call.c, call.d, call.bias, call.aux,
            ),
            "matmul",
        )
    }
}
