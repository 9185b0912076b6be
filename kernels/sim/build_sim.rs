//! Part of build.rs: builds the simulated GPU, a shared library of the sim runtime
//! (`kernels/sim/*.cpp`) and every `kernels/*.cu` compiled for the host by the system C++ compiler
//! against `kernels/sim/cuda_sim.h`, with a generated registry of every kernel entry point and its
//! ptxas resource usage (when nvcc ran). Test builds also get AddressSanitizer and
//! ThreadSanitizer flavours of the library, for the sanitizer runs of the sim checks.
//!
//! Without a C++ compiler the build still succeeds (the sim is then unavailable, and says why),
//! unless SHARDTRAIN_REQUIRE_SIM=1, where it fails.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::KernelResources;

/// A build of the library: its file name and the compiler flags that make it.
struct Flavor {
    env: &'static str,
    file: &'static str,
    flags: &'static [&'static str],
}

const PLAIN: Flavor = Flavor {
    env: "SHARDTRAIN_SIM_LIB",
    file: "libshardtrain_sim.so",
    flags: &["-O2"],
};
const SANITIZED: [Flavor; 2] = [
    Flavor {
        env: "SHARDTRAIN_SIM_ASAN_LIB",
        file: "libshardtrain_sim_asan.so",
        flags: &["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"],
    },
    Flavor {
        env: "SHARDTRAIN_SIM_TSAN_LIB",
        file: "libshardtrain_sim_tsan.so",
        flags: &["-O1", "-g", "-fsanitize=thread"],
    },
];

const COMMON_FLAGS: &[&str] = &[
    "-std=c++17",
    "-fPIC",
    "-fvisibility=hidden",
    "-pthread",
    "-DSHARDTRAIN_SIM",
    "-Ikernels",
    "-Wall",
    "-Wno-unused-function",
    "-Wno-unknown-pragmas",
];

fn fail_or_warn(why: &str) {
    if std::env::var("SHARDTRAIN_REQUIRE_SIM").is_ok_and(|v| v == "1") {
        eprintln!("SHARDTRAIN_REQUIRE_SIM=1 but the simulated GPU cannot be built: {why}");
        std::process::exit(1);
    }
    println!("cargo:warning=simulated GPU not built: {why}");
    println!("cargo:rustc-env=SHARDTRAIN_SIM_MISSING={why}");
    for env in [PLAIN.env, SANITIZED[0].env, SANITIZED[1].env] {
        println!("cargo:rustc-env={env}=");
        println!("cargo:rustc-env={env}_FLAGS=");
    }
    println!("cargo:rustc-env=SHARDTRAIN_SIM_CXX=");
    println!("cargo:rustc-env=SHARDTRAIN_SIM_CFLAGS=");
}

/// The system C++ compiler (CXX, else what the cc crate finds), if it runs.
fn find_compiler() -> Option<PathBuf> {
    let compiler = cc::Build::new()
        .cpp(true)
        .cargo_metadata(false)
        .try_get_compiler()
        .ok()?;
    let path = compiler.path().to_path_buf();
    let works = Command::new(&path)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    works.then_some(path)
}

fn run(cmd: &mut Command, what: &str) -> Result<String, String> {
    match cmd.output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
        Ok(o) => Err(format!(
            "{what} failed (exit {}):\n{}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )),
        Err(e) => Err(format!("{what}: could not run the compiler: {e}")),
    }
}

/// The entry points of one kernel file: preprocessed in scan mode, where `__global__` becomes a
/// marker, every `extern "C"` kernel reads `SHARDTRAIN_SIM_ENTRY_MARKER void <name>(`.
fn entry_points(cxx: &Path, source: &Path) -> Result<Vec<String>, String> {
    let text = run(
        Command::new(cxx)
            .args([
                "-E",
                "-x",
                "c++",
                "-std=c++17",
                "-DSHARDTRAIN_SIM",
                "-DSHARDTRAIN_SIM_SCAN",
            ])
            .arg("-Ikernels")
            .arg(source),
        &format!("preprocessing {}", source.display()),
    )?;
    let mut names = Vec::new();
    for piece in text.split("SHARDTRAIN_SIM_ENTRY_MARKER").skip(1) {
        let rest = piece.trim_start();
        let Some(rest) = rest.strip_prefix("void") else {
            continue;
        };
        let name: String = rest
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            names.push(name);
        }
    }
    Ok(names)
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    // Rewriting an unchanged file would make every build recompile the library.
    if std::fs::read_to_string(path).is_ok_and(|old| old == text) {
        return Ok(());
    }
    std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Generates the wrapper TU of each kernel file and the registry TU; returns their paths.
fn generate_sources(
    cxx: &Path,
    dir: &Path,
    resources: &[KernelResources],
) -> Result<Vec<PathBuf>, String> {
    let mut modules = Vec::new();
    let mut generated = Vec::new();
    for source in super::kernel_sources() {
        let stem = source
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let entries = entry_points(cxx, &source)?;
        let mut tu = format!(
            "// Generated by build.rs: kernels/{stem}.cu for the simulated GPU.\n#include \"{stem}.cu\"\n\
             static const sim_kernel_entry ENTRIES[] = {{\n"
        );
        for e in &entries {
            let _ = writeln!(tu, "    SIM_KERNEL_ENTRY({e}),");
        }
        let _ = write!(
            tu,
            "}};\nextern \"C\" const sim_kernel_entry* shardtrain_sim_module_{stem}(int* count) {{\n    \
             *count = {};\n    return ENTRIES;\n}}\n",
            entries.len()
        );
        let path = dir.join(format!("{stem}.sim.cpp"));
        write(&path, &tu)?;
        generated.push(path);
        modules.push(stem);
    }
    let mut reg = String::from(
        "// Generated by build.rs: the simulated GPU's kernel modules and ptxas resource usage.\n\
         #include \"sim/registry.h\"\n",
    );
    for m in &modules {
        let _ = writeln!(
            reg,
            "extern \"C\" const sim_kernel_entry* shardtrain_sim_module_{m}(int* count);"
        );
    }
    reg.push_str("const sim_module SIM_MODULES[] = {\n");
    for m in &modules {
        let _ = writeln!(reg, "    {{\"{m}\", shardtrain_sim_module_{m}}},");
    }
    let _ = writeln!(reg, "}};\nconst int SIM_MODULE_COUNT = {};", modules.len());
    reg.push_str("const sim_kernel_resources SIM_RESOURCES[] = {\n");
    for k in resources {
        let _ = writeln!(
            reg,
            "    {{\"{}\", {}, {}, {}}},",
            k.name, k.registers, k.static_smem_bytes, k.spill_bytes
        );
    }
    if resources.is_empty() {
        reg.push_str("    {nullptr, 0, 0, 0},\n");
    }
    let _ = writeln!(
        reg,
        "}};\nconst int SIM_RESOURCE_COUNT = {};",
        resources.len()
    );
    let path = dir.join("registry.cpp");
    write(&path, &reg)?;
    generated.push(path);
    Ok(generated)
}

/// The sim runtime's own sources (not its self-tests).
fn runtime_sources() -> Vec<PathBuf> {
    super::files_with_extension("kernels/sim", "cpp")
}

/// Compiles every source with the flavor's flags (in parallel) and links the shared library.
fn build_flavor(
    cxx: &Path,
    dir: &Path,
    sources: &[PathBuf],
    flavor: &Flavor,
) -> Result<PathBuf, String> {
    let obj_dir = dir.join(flavor.file.trim_end_matches(".so"));
    std::fs::create_dir_all(&obj_dir).map_err(|e| format!("{}: {e}", obj_dir.display()))?;
    let objects: Vec<PathBuf> = sources
        .iter()
        .map(|s| {
            obj_dir.join(format!(
                "{}.o",
                s.file_name().unwrap_or_default().to_string_lossy()
            ))
        })
        .collect();
    std::thread::scope(|scope| {
        let jobs: Vec<_> = sources
            .iter()
            .zip(&objects)
            .map(|(src, obj)| {
                scope.spawn(move || {
                    run(
                        Command::new(cxx)
                            .args(COMMON_FLAGS)
                            .args(flavor.flags)
                            .arg("-c")
                            .arg(src)
                            .arg("-o")
                            .arg(obj),
                        &format!("compiling {} for the simulated GPU", src.display()),
                    )
                })
            })
            .collect();
        jobs.into_iter()
            .map(|j| {
                j.join()
                    .unwrap_or_else(|_| Err("a compiler thread panicked".into()))
            })
            .collect::<Result<Vec<_>, String>>()
    })?;
    let lib = dir.join(flavor.file);
    // Only the C interface is exported (libstdc++'s weak template instances would be too).
    let exports = dir.join("exports.map");
    write(&exports, "{ global: sim_*; local: *; };\n")?;
    run(
        Command::new(cxx)
            .args(["-shared", "-pthread"])
            .arg(format!("-Wl,--version-script={}", exports.display()))
            .args(flavor.flags)
            .args(&objects)
            .arg("-o")
            .arg(&lib),
        &format!("linking {}", lib.display()),
    )?;
    Ok(lib)
}

pub fn build_sim(resources: &[KernelResources]) {
    for var in ["CXX", "SHARDTRAIN_REQUIRE_SIM"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let Some(cxx) = find_compiler() else {
        fail_or_warn("no C++ compiler was found at build time (install g++, or set CXX)");
        return;
    };
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dir = out_dir.join("sim");
    if let Err(e) = std::fs::create_dir_all(&dir) {
        fail_or_warn(&format!("{}: {e}", dir.display()));
        return;
    }
    // How the library was built, for the tests that rebuild it with a planted bug.
    println!("cargo:rustc-env=SHARDTRAIN_SIM_CXX={}", cxx.display());
    println!(
        "cargo:rustc-env=SHARDTRAIN_SIM_CFLAGS={}",
        COMMON_FLAGS.join(" ")
    );
    for flavor in std::iter::once(&PLAIN).chain(&SANITIZED) {
        println!(
            "cargo:rustc-env={}_FLAGS={}",
            flavor.env,
            flavor.flags.join(" ")
        );
    }
    let result = generate_sources(&cxx, &dir, resources).and_then(|generated| {
        let mut sources = runtime_sources();
        sources.extend(generated);
        let lib = build_flavor(&cxx, &dir, &sources, &PLAIN)?;
        println!("cargo:rustc-env={}={}", PLAIN.env, lib.display());
        // The sanitizer flavours serve the test suite only: release builds skip them.
        let tests = std::env::var("PROFILE").is_ok_and(|p| p != "release");
        for flavor in &SANITIZED {
            let path = if tests {
                build_flavor(&cxx, &dir, &sources, flavor)?
                    .display()
                    .to_string()
            } else {
                String::new()
            };
            println!("cargo:rustc-env={}={path}", flavor.env);
        }
        Ok(())
    });
    if let Err(e) = result {
        // A compile error in the kernels or the runtime is a bug to fix, not a missing tool.
        eprintln!("{e}");
        std::process::exit(1);
    }
}
