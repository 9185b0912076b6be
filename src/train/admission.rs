//! Memory admission: before a run allocates or writes anything, the planner's estimate of one
//! rank's peak bytes (`plan::memory`, the rules `shardtrain plan` uses, which on the CPU match what
//! a run measures), times the ranks that share this machine's memory, against the memory there
//! is: the host's (MemAvailable, under a cgroup limit if one is set) for the CPU backend, the GPU's
//! free memory for CUDA, both for the simulated GPU (its device memory lives in host memory). A job
//! that does not fit is a config error naming the keys that set its size (exit 2), instead of an
//! allocation failure part way through.

use anyhow::Result;

use super::device::Device;
use super::host_memory::host_memory;
use crate::config::sizes::human_bytes;
use crate::config::{Config, ConfigError};
use crate::plan::memory::{rank_memory, RankMemory};
use crate::plan::Workload;
use crate::shard::ShardPlan;

/// Share of the available memory a job may plan to use: the rest is for what the planner leaves
/// out (the allocator's slack, data loading, checkpoint buffers, the gather of the final weights)
/// and for the other processes on the machine.
pub const USABLE_SHARE: f64 = 0.9;

/// How many ranks of the job keep their memory in the same place as this one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sharing {
    /// Ranks whose buffers live in this process's device memory (a `local` GPU job's ranks all
    /// share GPU 0; a process of a multi-process GPU job has its own).
    pub device: usize,
    /// Ranks whose buffers live in this host's memory (CPU and simulated-GPU ranks: every rank of a
    /// `local` job, or every process of a multi-process job on this node).
    pub host: usize,
}

impl Sharing {
    /// Every rank of the job in this process (`train` without a launcher, `bench`).
    pub fn local(cfg: &Config) -> Sharing {
        let n = cfg.parallel.world_size.max(1);
        Sharing { device: n, host: n }
    }

    /// One rank per process, `local_world_size` processes on this node.
    pub fn one_per_process(local_world_size: usize) -> Sharing {
        Sharing {
            device: 1,
            host: local_world_size.max(1),
        }
    }
}

/// The planner's peak bytes of one rank of `cfg` (model state, transient gathers and gradients,
/// one micro-batch's activations). Validation bounds every size key, so no product overflows.
pub fn peak_per_rank(cfg: &Config) -> RankMemory {
    let plan = ShardPlan::new(&cfg.parallel);
    let accum = cfg.train.grad_accum_steps(plan.world_size);
    rank_memory(&plan, &Workload::from_config(cfg), accum)
}

/// Memory one rank's buffers can take: where, how much, from which figure.
struct Pool {
    what: String,
    available: u64,
    ranks: usize,
}

/// The memory pools `device` allocates from; a pool whose size cannot be read is left out.
fn pools(device: &Device, sharing: Sharing) -> Result<Vec<Pool>> {
    let host = || {
        host_memory().map(|h| Pool {
            what: format!("this machine's memory ({})", h.source),
            available: h.available,
            ranks: sharing.host,
        })
    };
    let gpu = |d: &crate::backend::cuda::CudaDevice| -> Result<Pool> {
        let (_, free) = d.memory_info()?;
        Ok(Pool {
            what: format!("the free memory of {}", d.name()),
            available: free as u64,
            ranks: sharing.device,
        })
    };
    Ok(match device {
        Device::Cpu => host().into_iter().collect(),
        Device::Cuda(d) if d.is_real() => vec![gpu(d)?],
        Device::Cuda(d) => {
            let mut both = vec![gpu(d)?];
            both.extend(host());
            both
        }
    })
}

/// Refuses `cfg` on `device` when its ranks' planned peak exceeds [`USABLE_SHARE`] of a memory
/// pool they share (a [`ConfigError`]: the fix is in the config). Allocates and writes nothing.
pub fn admit(cfg: &Config, device: &Device, sharing: Sharing) -> Result<()> {
    let peak = peak_per_rank(cfg);
    for pool in pools(device, sharing)? {
        let needed = peak.total() as f64 * pool.ranks as f64;
        if needed > pool.available as f64 * USABLE_SHARE {
            return Err(ConfigError::new(refusal(cfg, &peak, &pool)).into());
        }
    }
    Ok(())
}

/// The refusal: the figures, and the keys that set them, the larger part first.
fn refusal(cfg: &Config, peak: &RankMemory, pool: &Pool) -> String {
    let m = &cfg.model;
    let t = &cfg.train;
    let p = &cfg.parallel;
    let per_rank = peak.total() as f64;
    let ranks = if pool.ranks > 1 {
        format!(
            " x {} ranks sharing it = {}",
            pool.ranks,
            human_bytes(per_rank * pool.ranks as f64)
        )
    } else {
        String::new()
    };
    let model_keys = format!(
        "model.d_model {}, model.n_layer {}, model.vocab_size {}, model.block_size {}",
        m.d_model, m.n_layer, m.vocab_size, m.block_size
    );
    let batch_keys = format!(
        "train.micro_batch_size {} x model.seq_len {} tokens, each model.n_layer x model.d_model \
         values wide plus model.vocab_size logits",
        t.micro_batch_size, m.seq_len
    );
    let (first, second) = if peak.activations > peak.model_state() {
        (
            format!(
                "activations {} ({batch_keys})",
                human_bytes(peak.activations as f64)
            ),
            format!(
                "model state {} ({model_keys})",
                human_bytes(peak.model_state() as f64)
            ),
        )
    } else {
        (
            format!(
                "model state {} ({model_keys})",
                human_bytes(peak.model_state() as f64)
            ),
            format!(
                "activations {} ({batch_keys})",
                human_bytes(peak.activations as f64)
            ),
        )
    };
    format!(
        "the job does not fit in memory: it needs {} per rank{ranks} (planner's estimate: \
         {first}, {second}; parallel.world_size {}, parallel.strategy {}, \
         parallel.mixed_precision.param_dtype {}), and {} has {} available (at most {:.0}% of it \
         is planned on): make the model or the micro-batch smaller, or shard over more ranks",
        human_bytes(per_rank),
        p.world_size,
        crate::plan::strategy_name(p.strategy),
        p.mixed_precision.param_dtype,
        pool.what,
        human_bytes(pool.available as f64),
        USABLE_SHARE * 100.0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(available: u64, ranks: usize) -> Pool {
        Pool {
            what: "test memory".to_string(),
            available,
            ranks,
        }
    }

    #[test]
    fn the_refusal_names_the_figures_and_the_larger_parts_keys_first() {
        let mut cfg = Config::default();
        cfg.model.d_model = 4096;
        cfg.model.n_head = 32;
        let peak = peak_per_rank(&cfg);
        assert!(peak.model_state() > peak.activations);
        let text = refusal(&cfg, &peak, &pool(1 << 30, 2));
        assert!(text.contains("x 2 ranks sharing it"), "{text}");
        assert!(text.contains("test memory has 1.0 GiB available"), "{text}");
        let model = text.find("model.d_model 4096").expect("names d_model");
        let batch = text
            .find("train.micro_batch_size 8")
            .expect("names the batch");
        assert!(model < batch, "{text}");
    }

    #[test]
    fn the_tiny_job_fits_a_small_machine() {
        let cfg = Config::default();
        assert!(peak_per_rank(&cfg).total() < 64 << 20);
    }
}
