//! Build script: compiles every `kernels/*.cu` with nvcc into portable PTX (compute_80: Ampere and newer) and a
//! Hopper cubin (sm_90), embedded in the binary through a generated module index, with ptxas's
//! resource usage per kernel; builds the simulated GPU (`kernels/sim/`: the same kernels compiled
//! for the host by the system C++ compiler, in a shared library loaded by `device: sim`); and
//! records the commit the binary was built from (shown by `--version`, written to each run's
//! summary).
//!
//! nvcc is looked up in NVCC, CUDA_HOME/bin, /usr/local/cuda/bin, the project's `.venv-cuda`
//! (the PyPI CUDA compiler wheels `.ci/run` installs) and PATH. Without nvcc the build succeeds
//! CPU-only with a warning, unless SHARDTRAIN_REQUIRE_CUDA=1, where it fails. Any nvcc error fails
//! the build with nvcc's full message.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    record_commit();
    let resources = compile_kernels();
    sim_build::build_sim(&resources);
}

#[path = "kernels/sim/build_sim.rs"]
mod sim_build;

fn record_commit() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=SHARDTRAIN_COMMIT={commit}");
    // A commit moves HEAD's branch ref; a checkout moves HEAD itself.
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
}

/// The first nvcc found, in the documented order.
fn find_nvcc() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("NVCC") {
        candidates.push(PathBuf::from(p));
    }
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        candidates.push(Path::new(&home).join("bin/nvcc"));
    }
    candidates.push("/usr/local/cuda/bin/nvcc".into());
    if let Ok(venv_lib) = std::fs::read_dir(".venv-cuda/lib") {
        for entry in venv_lib.flatten() {
            candidates.push(entry.path().join("site-packages/nvidia/cu13/bin/nvcc"));
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|dir| dir.join("nvcc")));
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// The files of `dir` (not below it) whose extension is `ext`, sorted.
fn files_with_extension(dir: &str, ext: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == ext))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

fn kernel_sources() -> Vec<PathBuf> {
    files_with_extension("kernels", "cu")
}

/// Runs nvcc; returns what it printed on stderr (ptxas's resource report with `-Xptxas -v`).
fn run_nvcc(nvcc: &Path, args: &[&str], source: &Path) -> String {
    let output = Command::new(nvcc).args(args).arg(source).output();
    match output {
        Ok(o) if o.status.success() => {
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
        }
        Ok(o) => {
            eprintln!(
                "nvcc failed on {} (exit {}):\n{}{}",
                source.display(),
                o.status,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("could not run {}: {e}", nvcc.display());
            std::process::exit(1);
        }
    }
}

/// ptxas's resource usage of one kernel for sm_90.
#[derive(Clone, Debug, Default)]
pub struct KernelResources {
    pub name: String,
    pub registers: u32,
    pub static_smem_bytes: u32,
    /// Spill stores plus spill loads, in bytes.
    pub spill_bytes: u32,
}

/// Reads `ptxas -v`'s report: per entry function, registers, shared memory and spills.
fn parse_ptxas_report(report: &str) -> Vec<KernelResources> {
    let mut out: Vec<KernelResources> = Vec::new();
    for line in report.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("ptxas info    : Compiling entry function '") {
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            out.push(KernelResources {
                name,
                ..Default::default()
            });
            continue;
        }
        let Some(k) = out.last_mut() else { continue };
        let number_before = |text: &str, unit: &str| -> Option<u32> {
            let at = text.find(unit)?;
            text[..at]
                .trim_end()
                .rsplit([' ', ','])
                .next()?
                .parse()
                .ok()
        };
        if line.contains("bytes spill stores") {
            k.spill_bytes = number_before(line, "bytes spill stores").unwrap_or(0)
                + number_before(line, "bytes spill loads").unwrap_or(0);
        }
        if line.contains("Used ") && line.contains("registers") {
            k.registers = number_before(line, "registers").unwrap_or(0);
            k.static_smem_bytes = number_before(line, "bytes smem").unwrap_or(0);
        }
    }
    out
}

fn compile_kernels() -> Vec<KernelResources> {
    println!("cargo:rerun-if-changed=kernels");
    for var in ["NVCC", "CUDA_HOME", "SHARDTRAIN_REQUIRE_CUDA", "PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let required = std::env::var("SHARDTRAIN_REQUIRE_CUDA").is_ok_and(|v| v == "1");
    let sources = kernel_sources();
    let nvcc = find_nvcc();

    let mut index = String::from(
        "// Generated by build.rs: the CUDA kernel modules compiled from kernels/*.cu.\n",
    );
    let Some(nvcc) = nvcc else {
        if required {
            eprintln!(
                "SHARDTRAIN_REQUIRE_CUDA=1 but no nvcc was found (looked in NVCC, CUDA_HOME/bin, \
                 /usr/local/cuda/bin, .venv-cuda and PATH). Install a CUDA toolkit, or the compiler \
                 wheels as .ci/run does, or set NVCC to the nvcc binary."
            );
            std::process::exit(1);
        }
        println!(
            "cargo:warning=nvcc not found: building without CUDA kernels (CPU backend only). \
             Set NVCC or CUDA_HOME to build them."
        );
        index.push_str("pub const CUDA_COMPILED: bool = false;\n");
        index.push_str("pub const KERNEL_MODULES: &[KernelModule] = &[];\n");
        index.push_str("pub const KERNEL_RESOURCES: &[KernelResources] = &[];\n");
        write_index(&out_dir, &index);
        return Vec::new();
    };

    // Compile every file in parallel: two nvcc runs per file, each a few seconds.
    let include = format!("-I{}", Path::new("kernels").display());
    let resources: Vec<KernelResources> = std::thread::scope(|s| {
        let handles: Vec<_> = sources
            .iter()
            .map(|source| {
                let (nvcc, include, out_dir) = (&nvcc, &include, &out_dir);
                s.spawn(move || {
                    let stem = source.file_stem().expect("a .cu file").to_string_lossy();
                    let ptx = out_dir.join(format!("{stem}.ptx"));
                    let cubin = out_dir.join(format!("{stem}.sm_90.cubin"));
                    let common = ["-O3", "-std=c++17", "-lineinfo", include.as_str()];
                    let ptx_s = ptx.to_string_lossy();
                    let mut args: Vec<&str> = common.to_vec();
                    args.extend(["-arch=compute_80", "--ptx", "-o", &ptx_s]);
                    run_nvcc(nvcc, &args, source);
                    let cubin_s = cubin.to_string_lossy();
                    let mut args: Vec<&str> = common.to_vec();
                    args.extend(["-arch=sm_90", "--cubin", "-Xptxas", "-v", "-o", &cubin_s]);
                    parse_ptxas_report(&run_nvcc(nvcc, &args, source))
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("an nvcc thread"))
            .collect()
    });

    index.push_str("pub const CUDA_COMPILED: bool = true;\n");
    index.push_str("pub const KERNEL_MODULES: &[KernelModule] = &[\n");
    for source in &sources {
        let stem = source.file_stem().expect("a .cu file").to_string_lossy();
        let ptx = out_dir.join(format!("{stem}.ptx"));
        let cubin = out_dir.join(format!("{stem}.sm_90.cubin"));
        let _ = writeln!(
            index,
            "    KernelModule {{ name: {stem:?}, ptx: include_str!({:?}), cubin_sm90: include_bytes!({:?}) }},",
            ptx.display().to_string(),
            cubin.display().to_string()
        );
    }
    index.push_str("];\n");
    index.push_str("pub const KERNEL_RESOURCES: &[KernelResources] = &[\n");
    for k in &resources {
        let _ = writeln!(
            index,
            "    KernelResources {{ name: {:?}, registers: {}, static_smem_bytes: {}, spill_bytes: {} }},",
            k.name, k.registers, k.static_smem_bytes, k.spill_bytes
        );
    }
    index.push_str("];\n");
    write_index(&out_dir, &index);
    resources
}

fn write_index(out_dir: &Path, index: &str) {
    let path = out_dir.join("kernels.rs");
    if let Err(e) = std::fs::write(&path, index) {
        eprintln!("writing {}: {e}", path.display());
        std::process::exit(1);
    }
}
