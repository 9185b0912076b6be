//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test binary uses its own subset

pub mod cli;

use std::path::Path;
use std::process::{Command, Output};

use shardtrain::config::{Config, ShardStrategy};

/// Runs the `shardtrain` binary with `args` (quiet logs) and waits for it.
pub fn shardtrain(args: &[&str]) -> Output {
    shardtrain_in(Path::new("."), args)
}

/// [`shardtrain`] with `dir` as the working directory.
pub fn shardtrain_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shardtrain"))
        .current_dir(dir)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the shardtrain binary runs")
}

/// A TCP port free on the loopback interface right now (for a rendezvous).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A tiny job for multi-process ranks on the CPU (a 2-layer model of width 32, 8 sequences of 32
/// tokens a step, quiet), to which each test adds its `train.max_steps` and the like.
#[rustfmt::skip]
pub const RANKS_JOB: &[&str] = &[
    "--set", "model.n_layer=2",
    "--set", "model.d_model=32",
    "--set", "model.n_head=2",
    "--set", "model.seq_len=32",
    "--set", "train.micro_batch_size=4",
    "--set", "train.global_batch_size=8",
    "--set", "train.warmup_steps=2",
    "--set", "train.eval_every=0",
    "--set", "logging.progress=plain",
    "--set", "logging.every_steps=1000",
    "--set", "device=cpu",
];

/// A process's output as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A small job: 24 sequences of 16 tokens per step, divisible into micro-batches of 2 for every
/// world size 1..4.
pub fn small_config(world: usize, strategy: ShardStrategy, steps: u64) -> Config {
    let mut c = Config::default();
    c.model.n_layer = 2;
    c.model.n_head = 2;
    c.model.d_model = 16;
    c.model.block_size = 16;
    c.model.seq_len = 16;
    c.train.micro_batch_size = 2;
    c.train.global_batch_size = 24;
    c.train.max_steps = steps;
    c.train.warmup_steps = steps.min(2);
    c.train.eval_every = 0;
    c.parallel.world_size = world;
    c.parallel.strategy = strategy;
    c.parallel.shard_group_size =
        if strategy == ShardStrategy::HybridShard && world.is_multiple_of(2) {
            2
        } else {
            1
        };
    c.parallel.collective_timeout_s = 20.0;
    c.logging.progress = shardtrain::config::ProgressMode::Plain;
    c.logging.every_steps = 1000;
    c.validate().expect("the test config is valid");
    c
}

pub const STRATEGIES: [ShardStrategy; 4] = [
    ShardStrategy::FullShard,
    ShardStrategy::ShardGradOp,
    ShardStrategy::NoShard,
    ShardStrategy::HybridShard,
];
pub mod sim;
