//! The `shardtrain` binary: everything lives in the library; see `cli`.

fn main() -> std::process::ExitCode {
    shardtrain::cli::main()
}
