//! The machine a plan is for: GPU presets (memory, peak rates, links), the user's overrides, and
//! the memory budget left after the headroom. Every figure says where it comes from.

use serde::Serialize;

use super::comm::{Link, Topology};
use crate::backend::DType;
use crate::error::UsageError;

/// Share of a GPU's memory kept free for what the planner does not count: the CUDA context
/// (~0.5 GiB), cuBLAS(Lt) workspaces, NCCL's buffers and the allocator's fragmentation.
pub const MEMORY_HEADROOM: f64 = 0.10;

/// Bytes in a GiB (memory sizes are binary; bandwidths are decimal GB/s, as nccl-tests reports).
pub const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Latency of one ring step inside a node (NVLink / NVSwitch): NCCL's ring steps cost a few
/// microseconds each; 2 µs is the order nccl-tests shows for small messages on 8 GPUs.
pub const NVLINK_HOP_LATENCY_US: f64 = 2.0;

/// Latency of one ring step across nodes (InfiniBand with GPUDirect RDMA, through switches).
pub const IB_HOP_LATENCY_US: f64 = 5.0;

/// Which card a plan is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuKind {
    H100,
    H200,
    A100,
    /// Everything from the flags: `--memory-gib` and `--peak-tflops` are required.
    Custom,
}

/// Values the user gives on the command line; `None` keeps the preset's.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HardwareOverrides {
    pub memory_gib: Option<f64>,
    /// Dense peak of the compute dtype (the config's param_dtype), TFLOP/s.
    pub peak_tflops: Option<f64>,
    /// Bus bandwidth of a ring inside a node, GB/s.
    pub intra_bw_gb_s: Option<f64>,
    /// Bus bandwidth per GPU across nodes, GB/s.
    pub inter_bw_gb_s: Option<f64>,
    /// HBM bandwidth of one GPU, GB/s (the op-level prediction's memory roof).
    pub hbm_gb_s: Option<f64>,
}

/// One GPU model and the cluster around it, resolved for one compute dtype.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hardware {
    pub gpu: GpuKind,
    /// Human-readable name and where the figures come from.
    pub description: String,
    /// Memory one GPU has, as the driver reports it (bytes).
    pub memory_bytes: f64,
    /// Share kept free (see [`MEMORY_HEADROOM`]).
    pub headroom: f64,
    /// Dense peak FLOP/s of the compute dtype.
    pub peak_flops: f64,
    /// The dtype `peak_flops` is for.
    pub compute_dtype: DType,
    /// HBM bandwidth, bytes/s (`None` for a custom card without `--hbm-bw`).
    pub hbm_bytes_per_s: Option<f64>,
    /// Non-tensor-core f32 FLOP/s (what CUDA-core kernels such as today's attention run at).
    pub cuda_core_f32_flops: Option<f64>,
    /// Streaming multiprocessors: how many blocks a grid needs to occupy the whole card.
    pub sm_count: Option<usize>,
    pub topology: Topology,
}

impl Hardware {
    /// Bytes a rank may use: the memory less the headroom.
    pub fn budget_bytes(&self) -> f64 {
        self.memory_bytes * (1.0 - self.headroom)
    }
}

/// A preset's datasheet figures.
struct Preset {
    description: &'static str,
    memory_gib: f64,
    peak_bf16_tflops: f64,
    /// Non-tensor-core FP32: the engine's f32 path never uses TF32 (see README, "The CUDA backend").
    peak_f32_tflops: f64,
    intra_bw_gb_s: f64,
    inter_bw_gb_s: f64,
    /// HBM bandwidth, GB/s (decimal, as the datasheets give it).
    hbm_gb_s: f64,
    sm_count: usize,
}

/// Sources: NVIDIA's H100 / H200 / A100 datasheets (dense peaks, no sparsity); memory as
/// `nvidia-smi` reports it (H100 80 GB: 81559 MiB = 79.6 GiB; H200 141 GB: 143771 MiB = 140.4
/// GiB; A100 80 GB: 81920 MiB); NVLink bus bandwidth from nccl-tests: ~370 GB/s for
/// all_gather / reduce_scatter on 8x H100 (measured, /work/shared/FACTS.md; H200 has the same
/// NVLink 4), ~230 GB/s on 8x A100 (NVLink 3); across nodes one 400 Gb/s NDR InfiniBand NIC per
/// GPU (50 GB/s) on H100/H200 systems, 200 Gb/s HDR (25 GB/s) on DGX A100. HBM bandwidth from
/// the same datasheets: H100 SXM 3.35 TB/s (HBM3), H200 SXM 4.8 TB/s (HBM3e), A100 80 GB SXM
/// 2.039 TB/s (HBM2e); SMs from NVIDIA's Hopper and Ampere architecture whitepapers (H100 SXM5
/// and H200: 132, A100: 108).
fn preset(kind: GpuKind) -> Option<Preset> {
    match kind {
        GpuKind::H100 => Some(Preset {
            description: "NVIDIA H100 SXM 80 GB",
            memory_gib: 81559.0 / 1024.0,
            peak_bf16_tflops: 989.0,
            peak_f32_tflops: 67.0,
            intra_bw_gb_s: 370.0,
            inter_bw_gb_s: 50.0,
            hbm_gb_s: 3350.0,
            sm_count: 132,
        }),
        GpuKind::H200 => Some(Preset {
            description: "NVIDIA H200 SXM 141 GB",
            memory_gib: 143771.0 / 1024.0,
            peak_bf16_tflops: 989.0,
            peak_f32_tflops: 67.0,
            intra_bw_gb_s: 370.0,
            inter_bw_gb_s: 50.0,
            hbm_gb_s: 4800.0,
            sm_count: 132,
        }),
        GpuKind::A100 => Some(Preset {
            description: "NVIDIA A100 SXM 80 GB",
            memory_gib: 80.0,
            peak_bf16_tflops: 312.0,
            peak_f32_tflops: 19.5,
            intra_bw_gb_s: 230.0,
            inter_bw_gb_s: 25.0,
            hbm_gb_s: 2039.0,
            sm_count: 108,
        }),
        GpuKind::Custom => None,
    }
}

/// The custom card's defaults for what the flags leave out: H100-class links.
const CUSTOM_INTRA_BW_GB_S: f64 = 370.0;
const CUSTOM_INTER_BW_GB_S: f64 = 50.0;

/// `value` if it is a finite number > 0, else a usage error naming `flag`.
fn positive(flag: &str, value: f64) -> Result<f64, UsageError> {
    if value.is_finite() && value > 0.0 {
        Ok(value)
    } else {
        Err(UsageError(format!(
            "{flag}: must be a finite number > 0 (got {value})"
        )))
    }
}

/// `given` checked, or `default`; a custom card has no default (`None`), so the flag is required.
fn pick(flag: &str, given: Option<f64>, default: Option<f64>) -> Result<f64, UsageError> {
    match (given, default) {
        (Some(v), _) => positive(flag, v),
        (None, Some(d)) => Ok(d),
        (None, None) => Err(UsageError(format!("{flag} is required with --gpu custom"))),
    }
}

/// The hardware for `kind` computing in `dtype`, with the overrides applied.
pub fn resolve(
    kind: GpuKind,
    dtype: DType,
    gpus_per_node: usize,
    overrides: HardwareOverrides,
) -> Result<Hardware, UsageError> {
    if gpus_per_node == 0 {
        return Err(UsageError(
            "--gpus-per-node: must be at least 1 (got 0)".into(),
        ));
    }
    let preset = preset(kind);
    let peak_default = preset.as_ref().map(|p| match dtype {
        DType::Bf16 => p.peak_bf16_tflops,
        DType::F32 => p.peak_f32_tflops,
    });
    let memory_gib = pick(
        "--memory-gib",
        overrides.memory_gib,
        preset.as_ref().map(|p| p.memory_gib),
    )?;
    let peak_tflops = pick("--peak-tflops", overrides.peak_tflops, peak_default)?;
    let intra = pick(
        "--intra-bw",
        overrides.intra_bw_gb_s,
        Some(
            preset
                .as_ref()
                .map_or(CUSTOM_INTRA_BW_GB_S, |p| p.intra_bw_gb_s),
        ),
    )?;
    let inter = pick(
        "--inter-bw",
        overrides.inter_bw_gb_s,
        Some(
            preset
                .as_ref()
                .map_or(CUSTOM_INTER_BW_GB_S, |p| p.inter_bw_gb_s),
        ),
    )?;
    let hbm_gb_s = match (overrides.hbm_gb_s, preset.as_ref()) {
        (Some(v), _) => Some(positive("--hbm-bw", v)?),
        (None, p) => p.map(|p| p.hbm_gb_s),
    };
    let description = preset
        .as_ref()
        .map_or("custom GPU", |p| p.description)
        .to_string();
    Ok(Hardware {
        gpu: kind,
        description,
        memory_bytes: memory_gib * GIB,
        headroom: MEMORY_HEADROOM,
        peak_flops: peak_tflops * 1e12,
        compute_dtype: dtype,
        hbm_bytes_per_s: hbm_gb_s.map(|g| g * 1e9),
        cuda_core_f32_flops: preset.as_ref().map(|p| p.peak_f32_tflops * 1e12),
        sm_count: preset.as_ref().map(|p| p.sm_count),
        topology: Topology {
            gpus_per_node,
            intra: Link {
                bus_gb_per_s: intra,
                hop_latency_us: NVLINK_HOP_LATENCY_US,
            },
            inter: Link {
                bus_gb_per_s: inter,
                hop_latency_us: IB_HOP_LATENCY_US,
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_pick_the_peak_of_the_compute_dtype() {
        let h100 = resolve(GpuKind::H100, DType::Bf16, 8, HardwareOverrides::default()).unwrap();
        assert_eq!(h100.peak_flops, 989e12);
        assert!((h100.memory_bytes / GIB - 79.65).abs() < 0.01);
        assert!((h100.budget_bytes() / GIB - 71.68).abs() < 0.01);
        let f32_a100 = resolve(GpuKind::A100, DType::F32, 8, HardwareOverrides::default()).unwrap();
        assert_eq!(f32_a100.peak_flops, 19.5e12);
        assert_eq!(f32_a100.topology.intra.bus_gb_per_s, 230.0);
        // The op-level prediction's memory roof: the datasheets' HBM bandwidth.
        let h200 = resolve(GpuKind::H200, DType::Bf16, 8, HardwareOverrides::default()).unwrap();
        assert_eq!(h100.hbm_bytes_per_s, Some(3.35e12));
        assert_eq!(h200.hbm_bytes_per_s, Some(4.8e12));
        assert_eq!(
            (h200.sm_count, h200.cuda_core_f32_flops),
            (Some(132), Some(67e12))
        );
        let custom = resolve(
            GpuKind::Custom,
            DType::Bf16,
            8,
            HardwareOverrides {
                memory_gib: Some(40.0),
                peak_tflops: Some(100.0),
                hbm_gb_s: Some(1000.0),
                ..HardwareOverrides::default()
            },
        )
        .unwrap();
        assert_eq!(
            (custom.hbm_bytes_per_s, custom.sm_count),
            (Some(1e12), None)
        );
    }

    #[test]
    fn custom_needs_memory_and_peak_and_overrides_are_checked() {
        let err = resolve(
            GpuKind::Custom,
            DType::Bf16,
            8,
            HardwareOverrides::default(),
        );
        assert!(err.unwrap_err().0.contains("--memory-gib"));
        let only_memory = HardwareOverrides {
            memory_gib: Some(40.0),
            ..HardwareOverrides::default()
        };
        let err = resolve(GpuKind::Custom, DType::Bf16, 8, only_memory).unwrap_err();
        assert!(err.0.contains("--peak-tflops"), "{}", err.0);
        let bad = HardwareOverrides {
            inter_bw_gb_s: Some(-1.0),
            ..HardwareOverrides::default()
        };
        let err = resolve(GpuKind::H100, DType::Bf16, 8, bad).unwrap_err();
        assert!(err.0.contains("--inter-bw"), "{}", err.0);
        assert!(resolve(GpuKind::H100, DType::Bf16, 0, HardwareOverrides::default()).is_err());
    }
}
