//! The simulated GPU's library as build.rs made it, its sanitizer flavours, and rebuilds of it with
//! one kernel file changed (a planted bug), for the tests that show the sim's checks can fail.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// One build of the sim library.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    Plain,
    Asan,
    Tsan,
}

impl Flavor {
    /// The library build.rs made ("" when it made none).
    pub fn library(self) -> &'static str {
        match self {
            Flavor::Plain => env!("SHARDTRAIN_SIM_LIB"),
            Flavor::Asan => env!("SHARDTRAIN_SIM_ASAN_LIB"),
            Flavor::Tsan => env!("SHARDTRAIN_SIM_TSAN_LIB"),
        }
    }

    fn flags(self) -> &'static str {
        match self {
            Flavor::Plain => env!("SHARDTRAIN_SIM_LIB_FLAGS"),
            Flavor::Asan => env!("SHARDTRAIN_SIM_ASAN_LIB_FLAGS"),
            Flavor::Tsan => env!("SHARDTRAIN_SIM_TSAN_LIB_FLAGS"),
        }
    }

    /// Where build.rs left this flavour's objects.
    fn objects(self) -> PathBuf {
        let lib = Path::new(self.library());
        lib.with_extension("")
    }

    /// The sanitizer runtime to preload into the (uninstrumented) Rust process.
    fn runtime(self) -> Option<String> {
        let name = match self {
            Flavor::Plain => return None,
            Flavor::Asan => "libasan.so",
            Flavor::Tsan => "libtsan.so",
        };
        let out = Command::new(env!("SHARDTRAIN_SIM_CXX"))
            .arg(format!("-print-file-name={name}"))
            .output()
            .expect("the C++ compiler runs");
        let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
        // Without the runtime the compiler prints the bare name back.
        assert!(
            Path::new(&path).is_absolute(),
            "no {name} next to the compiler: {path}"
        );
        // The linker script libasan.so / libtsan.so names the real runtime; preload that.
        let real = std::fs::canonicalize(&path).unwrap_or_else(|_| PathBuf::from(&path));
        Some(real.display().to_string())
    }
}

/// Whether build.rs built the sim (a fresh clone without a C++ compiler has none; CI requires
/// it). Prints why not.
pub fn sim_built() -> bool {
    let built = !Flavor::Plain.library().is_empty();
    if !built {
        eprintln!("the simulated GPU was not built (no C++ compiler at build time): skipped");
    }
    built
}

/// Whether the sanitizer flavours were built (test builds make them).
pub fn sanitizers_built() -> bool {
    sim_built() && !Flavor::Tsan.library().is_empty() && !Flavor::Asan.library().is_empty()
}

/// Environment for a process running on the sim with `flavor`'s library at `lib`.
pub fn sim_env(flavor: Flavor, lib: &Path) -> Vec<(String, String)> {
    let mut env = vec![("SHARDTRAIN_SIM_LIB".to_string(), lib.display().to_string())];
    if let Some(runtime) = flavor.runtime() {
        env.push(("LD_PRELOAD".to_string(), runtime));
    }
    // Only the sim library is instrumented: the Rust process's own calls into intercepted
    // functions (memcpy from its copies) are not races the sanitizer can judge.
    env.push((
        "TSAN_OPTIONS".to_string(),
        "ignore_noninstrumented_modules=1 halt_on_error=1 exitcode=66 report_signal_unsafe=0"
            .to_string(),
    ));
    env.push((
        "ASAN_OPTIONS".to_string(),
        "detect_leaks=0 halt_on_error=1 exitcode=67".to_string(),
    ));
    env
}

/// Runs the shardtrain binary on the sim with `flavor`'s library at `lib`.
pub fn shardtrain_on(flavor: Flavor, lib: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shardtrain"))
        .args(args)
        .envs(sim_env(flavor, lib))
        .env("RUST_LOG", "warn")
        .output()
        .expect("the shardtrain binary runs")
}

/// Rebuilds `flavor`'s library into `tmp` with `kernels/<file>` replaced by `mutate` of it (a
/// planted bug; `mutate` must change the text). Only the wrapper of `kernels/<module>.cu` (the
/// file itself, or the module including the changed header) is recompiled.
pub fn rebuild_with(
    flavor: Flavor,
    file: &str,
    module: &str,
    mutate: impl Fn(&str) -> String,
    tmp: &Path,
) -> PathBuf {
    let kernels = tmp.join("kernels");
    copy_dir(Path::new("kernels"), &kernels);
    let original = std::fs::read_to_string(kernels.join(file)).expect("the kernel file exists");
    let planted = mutate(&original);
    assert_ne!(planted, original, "the mutation of {file} changed nothing");
    std::fs::write(kernels.join(file), planted).unwrap();
    let stem = module;
    let wrapper_obj = format!("{stem}.sim.cpp.o");
    let objects_dir = flavor.objects();
    let wrapper = Path::new(flavor.library())
        .parent()
        .expect("the library's directory")
        .join(format!("{stem}.sim.cpp"));
    let object = tmp.join(&wrapper_obj);
    let status = Command::new(env!("SHARDTRAIN_SIM_CXX"))
        .arg(format!("-I{}", kernels.display()))
        .args(env!("SHARDTRAIN_SIM_CFLAGS").split_whitespace())
        .args(flavor.flags().split_whitespace())
        .arg("-c")
        .arg(&wrapper)
        .arg("-o")
        .arg(&object)
        .status()
        .expect("the C++ compiler runs");
    assert!(status.success(), "compiling the planted {file}");
    let mut objects: Vec<PathBuf> = std::fs::read_dir(&objects_dir)
        .expect("build.rs's objects")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n != wrapper_obj.as_str()))
        .collect();
    // First on the link line: a header's inline functions are compiled into every module that
    // includes it (tensor_core.cuh into the tensor-core attention kernels too), and the linker
    // keeps the first copy it sees, which must be the planted one.
    objects.insert(0, object);
    let lib = tmp.join("libshardtrain_sim_planted.so");
    let status = Command::new(env!("SHARDTRAIN_SIM_CXX"))
        .args(["-shared", "-pthread"])
        .args(flavor.flags().split_whitespace())
        .args(&objects)
        .arg("-o")
        .arg(&lib)
        .status()
        .expect("the C++ compiler runs");
    assert!(status.success(), "linking the planted library");
    lib
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
