//! shardtrain: a sharded (FSDP / ZeRO-style) GPT trainer.
//!
//! Layers, top to bottom (each depends only on those below it):
//! `cli` (arguments, exit codes) -> `train` (the loop, metrics, run directory) ->
//! `model` (GPT parameters, forward and hand-written backward) -> `backend` (buffers and ops on one
//! device). `config` and `data` sit beside them, feeding the trainer.

pub mod backend;
pub mod bench;
pub mod bench_comm;
pub mod check;
pub mod checkpoint;
pub mod cli;
pub mod comm;
pub mod config;
pub mod data;
pub mod error;
pub mod generate;
pub mod launch;
pub mod model;
pub mod numbers;
pub mod plan;
pub mod shard;
pub mod train;
