//! The sim checks under the sanitizers: every op case on the simulated GPU with the library built
//! with AddressSanitizer, and with ThreadSanitizer (the sanitizer runtime preloaded into the Rust
//! process; only the sim library, kernels and runtime, is instrumented). A report fails the test.
//! (tests/sim_planted.rs shows both sanitizers do report the bugs they are here to find.)

mod common;
use common::sim::{sanitizers_built, shardtrain_on, Flavor};
use common::text;

use std::path::Path;
use std::time::Instant;

fn check_under(flavor: Flavor) {
    if !sanitizers_built() {
        return;
    }
    let started = Instant::now();
    let out = shardtrain_on(
        flavor,
        Path::new(flavor.library()),
        &["check", "--device", "sim", "--seed", "3"],
    );
    let all = format!("{}\n{}", text(&out.stdout), text(&out.stderr));
    eprintln!(
        "check --device sim under {flavor:?}: {:.1}s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        out.status.success() && !all.contains("Sanitizer"),
        "{flavor:?}:\n{all}"
    );
}

#[test]
fn every_op_case_is_clean_under_address_sanitizer() {
    check_under(Flavor::Asan);
}

#[test]
fn every_op_case_is_clean_under_thread_sanitizer() {
    check_under(Flavor::Tsan);
}

/// Two ranks sharing the simulated GPU for two steps under ThreadSanitizer: every collective's
/// copies run on the comm lanes, ordered against compute only by events, so an ordering the
/// trainer forgot is a race report here.
#[test]
fn two_ranks_training_on_the_sim_are_race_free_under_thread_sanitizer() {
    if !sanitizers_built() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    #[rustfmt::skip]
    let args = [
        "train", "--run-dir", run.to_str().unwrap(), "--world", "2",
        "--set", "device=sim",
        "--set", "model.n_layer=1", "--set", "model.d_model=64", "--set", "model.n_head=2",
        "--set", "model.seq_len=32", "--set", "model.block_size=32",
        "--set", "train.micro_batch_size=2", "--set", "train.global_batch_size=8",
        "--set", "train.max_steps=2", "--set", "train.warmup_steps=1",
        "--set", "train.eval_every=0", "--set", "checkpoint.save_final=false",
        "--set", "logging.progress=plain",
    ];
    let started = Instant::now();
    let out = shardtrain_on(Flavor::Tsan, Path::new(Flavor::Tsan.library()), &args);
    let all = format!("{}\n{}", text(&out.stdout), text(&out.stderr));
    eprintln!(
        "world 2 on the sim under TSan: {:.1}s",
        started.elapsed().as_secs_f64()
    );
    assert!(out.status.success() && !all.contains("Sanitizer"), "{all}");
}
