//! Build script: records the commit the binary was built from (shown by `--version` and written
//! to each run's summary), so every benchmark figure can be traced to its code. CUDA kernel
//! compilation joins this script with the CUDA backend.

use std::process::Command;

fn main() {
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
