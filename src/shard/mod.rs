//! Sharding: how each unit's flat parameters are split across ranks (`flat`), what a strategy
//! means for one rank (`plan`), the engine that gathers, frees and reduces per unit (`engine`),
//! and memory accounting (`memory`). Independent of the backend and of the transport: the same code
//! runs ranks as CPU threads, as threads sharing one GPU, or as NCCL processes.

pub mod engine;
pub mod flat;
pub mod memory;
pub mod plan;

pub use engine::{CommBracket, Event, RankComms, ShardedUnits};
pub use plan::ShardPlan;
