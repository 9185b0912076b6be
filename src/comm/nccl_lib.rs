//! Finding libnccl and calling it: a table of the NCCL entry points the `nccl` transport uses,
//! opened by full path. Only cudarc's NCCL types are used, never its loader.
//!
//! Why not cudarc's loader: with `dynamic-loading` it dlopens bare names only (libnccl.so,
//! libnccl64*.so, libnccl.so.{13,12,11,10,9,1}), never libnccl.so.2, the soname of every NCCL 2
//! and the only file pip's nvidia-nccl wheels ship; it takes no path and reads no variable. Nor can
//! it be fed: glibc matches a bare name only against a loaded object's name or soname, so after
//! opening .../libnccl.so.2 (soname libnccl.so.2), or a `libnccl.so` symlink by full path, a
//! dlopen("libnccl.so") still searches the loader path and fails; LD_LIBRARY_PATH is read once at
//! process start, so setting it here does nothing either (all three checked with glibc 2.36).

use std::ffi::{c_char, c_int, c_void, CStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use cudarc::nccl::sys;

/// The file names tried in each directory, the soname first.
pub const LIB_NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

/// ncclResult_t values (nccl.h), kept as plain ints: NCCL may return codes newer than the enum of
/// our bindings, and an unknown value in a Rust enum would be undefined behaviour.
pub const NCCL_SUCCESS: c_int = 0;
pub const NCCL_REMOTE_ERROR: c_int = 6;
pub const NCCL_IN_PROGRESS: c_int = 7;

type Comm = sys::ncclComm_t;
type Stream = sys::cudaStream_t;

/// The NCCL entry points the transport calls, resolved from one library opened by full path.
pub struct NcclLib {
    /// Where it was loaded from, for messages.
    pub path: PathBuf,
    /// ncclGetVersion's code, e.g. 22803 for 2.28.3.
    pub version: c_int,
    pub get_unique_id: unsafe extern "C" fn(*mut sys::ncclUniqueId) -> c_int,
    /// (comm, nranks, id, rank, config): with `config.blocking = 0` it returns at once and the
    /// init goes on in NCCL's background thread (see `nccl_init`).
    pub comm_init_rank_config: unsafe extern "C" fn(
        *mut Comm,
        c_int,
        sys::ncclUniqueId,
        c_int,
        *mut sys::ncclConfig_t,
    ) -> c_int,
    /// (comm, out state): ncclSuccess, ncclInProgress while a non-blocking call is under way, or
    /// the error that ended it.
    pub comm_get_async_error: unsafe extern "C" fn(Comm, *mut c_int) -> c_int,
    pub comm_abort: unsafe extern "C" fn(Comm) -> c_int,
    pub comm_destroy: unsafe extern "C" fn(Comm) -> c_int,
    pub get_error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    pub get_last_error: unsafe extern "C" fn(Comm) -> *const c_char,
    /// (send, recv, sendcount, datatype, comm, stream)
    pub all_gather:
        unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, Comm, Stream) -> c_int,
    /// (send, recv, recvcount, datatype, op, comm, stream)
    pub reduce_scatter: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        Comm,
        Stream,
    ) -> c_int,
    /// (send, recv, count, datatype, op, comm, stream)
    pub all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        Comm,
        Stream,
    ) -> c_int,
    /// (send, recv, count, datatype, root, comm, stream)
    pub broadcast: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        Comm,
        Stream,
    ) -> c_int,
    /// Keeps the entry points valid; never dropped for the process's NCCL (see [`get`]).
    _lib: libloading::os::unix::Library,
}

impl std::fmt::Debug for NcclLib {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NCCL {} ({})",
            version_name(self.version),
            self.path.display()
        )
    }
}

/// "2.28.3" from NCCL's version code (major * 10000 + minor * 100 + patch since 2.9).
pub fn version_name(code: c_int) -> String {
    format!("{}.{}.{}", code / 10000, code / 100 % 100, code % 100)
}

impl NcclLib {
    /// Opens the library at `path` and resolves every entry point; the error names the path and
    /// what failed.
    pub fn open(path: &Path) -> Result<NcclLib> {
        use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
        // SAFETY: loading NCCL runs its initialisers, as linking it would; RTLD_GLOBAL as if
        // linked, so NCCL's own plugins see it.
        let lib = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) }
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
        macro_rules! entry {
            ($name:literal) => {
                // SAFETY: the field's type is the function's C signature in nccl.h.
                *unsafe { lib.get(concat!($name, "\0").as_bytes()) }.map_err(|e| {
                    anyhow!(
                        "{} has no {} (NCCL 2.14 or newer is needed): {e}",
                        path.display(),
                        $name
                    )
                })?
            };
        }
        let get_version: unsafe extern "C" fn(*mut c_int) -> c_int = entry!("ncclGetVersion");
        let mut version = 0;
        // SAFETY: a valid out-pointer.
        let code = unsafe { get_version(&mut version) };
        if code != NCCL_SUCCESS {
            bail!("{}: ncclGetVersion returned {code}", path.display());
        }
        Ok(NcclLib {
            path: path.to_path_buf(),
            version,
            get_unique_id: entry!("ncclGetUniqueId"),
            comm_init_rank_config: entry!("ncclCommInitRankConfig"),
            comm_get_async_error: entry!("ncclCommGetAsyncError"),
            comm_abort: entry!("ncclCommAbort"),
            comm_destroy: entry!("ncclCommDestroy"),
            get_error_string: entry!("ncclGetErrorString"),
            get_last_error: entry!("ncclGetLastError"),
            all_gather: entry!("ncclAllGather"),
            reduce_scatter: entry!("ncclReduceScatter"),
            all_reduce: entry!("ncclAllReduce"),
            broadcast: entry!("ncclBroadcast"),
            _lib: lib,
        })
    }

    /// "ncclSystemError (unhandled system error ...)" for a result code.
    pub fn describe(&self, code: c_int) -> String {
        let name = match code {
            0 => "ncclSuccess",
            1 => "ncclUnhandledCudaError",
            2 => "ncclSystemError",
            3 => "ncclInternalError",
            4 => "ncclInvalidArgument",
            5 => "ncclInvalidUsage",
            6 => "ncclRemoteError",
            7 => "ncclInProgress",
            8 => "ncclTimeout",
            _ => "NCCL error",
        };
        // SAFETY: NCCL returns a static string (or null) for any code.
        let text = unsafe { c_text((self.get_error_string)(code)) };
        format!("{name} {code} ({text})")
    }

    /// NCCL's last error message (may describe an earlier call), or "".
    pub fn last_error(&self) -> String {
        // NCCL keeps one last message per thread; its comm argument is unused, so null is passed.
        // SAFETY: NCCL returns a string it owns (or null); it is copied at once.
        unsafe { c_text((self.get_last_error)(std::ptr::null_mut())) }
    }

    /// Ok for success; otherwise an error saying what was being done, with NCCL's code and its
    /// last message.
    pub fn check(&self, code: c_int, what: &str) -> Result<()> {
        if code == NCCL_SUCCESS {
            return Ok(());
        }
        let last = self.last_error();
        let last = if last.is_empty() {
            String::new()
        } else {
            format!(": {last}")
        };
        bail!("{what}: {}{last}", self.describe(code))
    }
}

/// Copies a C string NCCL returned; "" for null.
///
/// # Safety
/// `p` is null or a NUL-terminated string valid for the call.
unsafe fn c_text(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: as the caller promises.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// The process's NCCL, found and opened once; the error names every place looked in.
pub fn get() -> Result<&'static NcclLib> {
    static LIB: OnceLock<std::result::Result<NcclLib, String>> = OnceLock::new();
    LIB.get_or_init(|| find_and_open().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("{e}"))
}

fn find_and_open() -> Result<NcclLib> {
    let env = |k: &str| std::env::var_os(k);
    let mut dirs = search_dirs(&env, &[]);
    let mut failures = Vec::new();
    if let Some(lib) = open_first(&candidates(&dirs), &mut failures) {
        return Ok(lib);
    }
    // Asking python3 where its wheels are costs a process start: only when nothing else is there.
    let sites = python_site_dirs();
    let wheel_dirs: Vec<PathBuf> = search_dirs(&env, &sites)
        .into_iter()
        .filter(|d| !dirs.contains(d))
        .collect();
    if let Some(lib) = open_first(&candidates(&wheel_dirs), &mut failures) {
        return Ok(lib);
    }
    dirs.extend(wheel_dirs);
    // Last, by name: the loader's cache (ldconfig) and its default directories. A name that is
    // not there says only "dlopen failed": not worth listing.
    if let Some(lib) = open_first(&LIB_NAMES.map(PathBuf::from), &mut Vec::new()) {
        return Ok(lib);
    }
    bail!("{}", not_found_message(&dirs, &failures))
}

fn open_first(paths: &[PathBuf], failures: &mut Vec<String>) -> Option<NcclLib> {
    for path in paths {
        match NcclLib::open(path) {
            Ok(lib) => return Some(lib),
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    None
}

/// The directories searched, in order: NCCL_HOME/lib and lib64, each LD_LIBRARY_PATH entry, the
/// CUDA toolkit's lib64 (CUDA_HOME or CUDA_PATH, then /usr/local/cuda), the distribution's
/// multiarch directory, then the NCCL wheels (nvidia-nccl-cu12 / -cu13) under each of
/// `python_sites`.
pub fn search_dirs(
    env: &dyn Fn(&str) -> Option<OsString>,
    python_sites: &[PathBuf],
) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(home) = env("NCCL_HOME") {
        dirs.push(Path::new(&home).join("lib"));
        dirs.push(Path::new(&home).join("lib64"));
    }
    if let Some(paths) = env("LD_LIBRARY_PATH") {
        dirs.extend(std::env::split_paths(&paths).filter(|p| !p.as_os_str().is_empty()));
    }
    if let Some(home) = env("CUDA_HOME").or_else(|| env("CUDA_PATH")) {
        dirs.push(Path::new(&home).join("lib64"));
    }
    dirs.push(PathBuf::from("/usr/local/cuda/lib64"));
    dirs.push(PathBuf::from("/usr/lib/x86_64-linux-gnu"));
    for site in python_sites {
        dirs.push(site.join("nvidia/nccl/lib"));
    }
    let mut seen = Vec::new();
    dirs.retain(|d| {
        let new = !seen.contains(d);
        seen.push(d.clone());
        new
    });
    dirs
}

/// The NCCL files present in `dirs`, in search order (each directory's soname first).
pub fn candidates(dirs: &[PathBuf]) -> Vec<PathBuf> {
    dirs.iter()
        .flat_map(|d| LIB_NAMES.iter().map(move |n| d.join(n)))
        .filter(|p| p.is_file())
        .collect()
}

/// The error when no NCCL loads: what was looked for, where, what failed, and how to fix it.
pub fn not_found_message(dirs: &[PathBuf], failures: &[String]) -> String {
    let looked: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    let mut msg = format!(
        "NCCL could not be loaded: looked for {} in {}, then by name on the loader's path \
         (ldconfig)",
        LIB_NAMES.join(" and "),
        looked.join(", ")
    );
    for f in failures {
        msg.push_str(&format!("; {f}"));
    }
    msg.push_str(
        ". Install NCCL (`pip install nvidia-nccl-cu13`, or the distribution's libnccl2) or set \
         NCCL_HOME to the directory whose lib/ holds libnccl.so.2",
    );
    msg
}

/// The site-packages directories of the `python3` on PATH (none if it is absent or slow).
fn python_site_dirs() -> Vec<PathBuf> {
    let script =
        "import site\nfor d in site.getsitepackages() + [site.getusersitepackages()]: print(d)";
    let Ok(mut child) = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    else {
        return Vec::new();
    };
    // A few lines fit the pipe: waiting for the exit before reading cannot block on output.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Vec::new();
            }
        }
    }
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = std::io::Read::read_to_string(&mut stdout, &mut out);
    }
    out.lines().map(PathBuf::from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_search_finds_libnccl_so_2_in_a_wheel_layout() {
        let tmp = tempfile::tempdir().unwrap();
        let site = tmp.path().join("site-packages");
        let wheel = site.join("nvidia/nccl/lib");
        std::fs::create_dir_all(&wheel).unwrap();
        std::fs::write(wheel.join("libnccl.so.2"), b"not really a library").unwrap();
        let home = tmp.path().join("nccl-home");
        std::fs::create_dir_all(home.join("lib")).unwrap();
        let env = |k: &str| (k == "NCCL_HOME").then(|| home.clone().into_os_string());
        let dirs = search_dirs(&env, std::slice::from_ref(&site));
        assert_eq!(dirs[0], home.join("lib"), "NCCL_HOME comes first: {dirs:?}");
        assert!(dirs.contains(&PathBuf::from("/usr/local/cuda/lib64")));
        assert!(dirs.contains(&PathBuf::from("/usr/lib/x86_64-linux-gnu")));
        assert_eq!(dirs.last(), Some(&wheel));
        // Only the wheel's file, from a directory list of which the others hold no NCCL.
        let only_ours = [home.join("lib"), tmp.path().join("empty"), wheel.clone()];
        assert_eq!(candidates(&only_ours), vec![wheel.join("libnccl.so.2")]);
    }

    #[test]
    fn the_soname_is_tried_before_the_dev_link() {
        let tmp = tempfile::tempdir().unwrap();
        let so2 = tmp.path().join("libnccl.so.2");
        std::fs::write(&so2, b"x").unwrap();
        std::os::unix::fs::symlink(&so2, tmp.path().join("libnccl.so")).unwrap();
        let found = candidates(&[tmp.path().to_path_buf()]);
        assert_eq!(found, vec![so2, tmp.path().join("libnccl.so")]);
    }

    #[test]
    fn a_file_that_does_not_load_is_named_with_the_reason() {
        let tmp = tempfile::tempdir().unwrap();
        let fake = tmp.path().join("libnccl.so.2");
        std::fs::write(&fake, b"not an ELF file").unwrap();
        let e = NcclLib::open(&fake).unwrap_err().to_string();
        assert!(e.contains(&fake.display().to_string()), "{e}");
    }

    #[test]
    fn the_error_names_what_was_looked_for_and_where() {
        let dirs = [
            PathBuf::from("/opt/nccl/lib"),
            PathBuf::from("/venv/nvidia/nccl/lib"),
        ];
        let msg = not_found_message(&dirs, &["/opt/nccl/lib/libnccl.so.2: bad ELF".to_string()]);
        for needle in [
            "libnccl.so.2 and libnccl.so",
            "/opt/nccl/lib, /venv/nvidia/nccl/lib",
            "bad ELF",
            "pip install nvidia-nccl-cu13",
            "NCCL_HOME",
        ] {
            assert!(msg.contains(needle), "{needle:?} missing from {msg}");
        }
    }

    /// With a real NCCL (no GPU needed): `cargo test --lib -- --ignored real_nccl`, with
    /// NCCL_HOME set (then it must be found there) or with pip's nvidia-nccl-cu13 wheel in the
    /// site-packages of the python3 on PATH. The wheel's only file is libnccl.so.2, which cudarc's
    /// loader never finds.
    #[test]
    #[ignore = "needs a real libnccl.so.2"]
    fn real_nccl_loads_by_full_path_and_draws_an_id() {
        let lib = get().unwrap();
        if let Some(home) = std::env::var_os("NCCL_HOME") {
            assert!(lib.path.starts_with(&home), "{lib:?}");
        }
        assert!(lib.version >= 21400, "{lib:?}");
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        // SAFETY: a valid out-pointer.
        let code = unsafe { (lib.get_unique_id)(&mut id) };
        lib.check(code, "ncclGetUniqueId").unwrap();
        assert!(id.internal.iter().any(|&c| c != 0));
        eprintln!("{lib:?}");
    }

    #[test]
    fn version_codes_read_as_dotted_versions() {
        assert_eq!(version_name(22803), "2.28.3");
        assert_eq!(version_name(23000), "2.30.0");
    }
}
