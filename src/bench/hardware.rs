//! What the bench runs on: the device kind, the card's name (the CPU model from /proc/cpuinfo, or
//! the GPU's name from the driver) and the peak FLOP/s that MFU is measured against.

use crate::backend::DType;
use crate::train::device::Device;

/// H100 and H200 dense bf16 tensor-core peak (datasheet; the figure FACTS.md quotes).
const HOPPER_BF16_PEAK: f64 = 989e12;

pub(super) struct Hardware {
    /// "cpu" or "cuda".
    pub device: &'static str,
    pub card: String,
    pub peak_flops: Option<f64>,
    /// Where the peak comes from, for the report ("--peak-tflops", a datasheet, or why none).
    pub peak_source: String,
}

pub(super) fn describe(device: &Device, param_dtype: DType, peak_tflops: Option<f64>) -> Hardware {
    let (kind, card) = match device {
        Device::Cpu => ("cpu", cpu_model_name()),
        Device::Cuda(gpu) if !gpu.is_real() => ("sim", gpu.name()),
        Device::Cuda(gpu) => ("cuda", gpu.name()),
    };
    let (peak_flops, peak_source) = match (peak_tflops, device) {
        (Some(t), _) => (Some(t * 1e12), "--peak-tflops".to_string()),
        (None, Device::Cuda(_)) => match datasheet_peak(&card, param_dtype) {
            Some((peak, source)) => (Some(peak), source.to_string()),
            None => (
                None,
                format!(
                    "no figure known for {card} with {param_dtype} parameters: give --peak-tflops"
                ),
            ),
        },
        (None, Device::Cpu) => (None, "none for CPUs: give --peak-tflops".to_string()),
    };
    Hardware {
        device: kind,
        card,
        peak_flops,
        peak_source,
    }
}

/// The dense peak of a GPU by its name, for the compute dtype: H100 and H200 in bf16. For f32
/// parameters no figure is assumed (the project has measured none for f32 without TF32), so MFU
/// needs --peak-tflops there.
pub fn datasheet_peak(gpu_name: &str, dtype: DType) -> Option<(f64, &'static str)> {
    let hopper = gpu_name.contains("H100") || gpu_name.contains("H200");
    (hopper && dtype == DType::Bf16).then_some((
        HOPPER_BF16_PEAK,
        "H100/H200 dense bf16 datasheet peak (989 TFLOP/s)",
    ))
}

/// The CPU's model name (the first `model name` of /proc/cpuinfo), or the architecture.
fn cpu_model_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim() == "model name")
                .map(|(_, v)| v.split_whitespace().collect::<Vec<_>>().join(" "))
        })
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| format!("{} CPU", std::env::consts::ARCH))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hopper_bf16_has_a_peak_and_f32_has_none() {
        assert_eq!(
            datasheet_peak("NVIDIA H100 80GB HBM3", DType::Bf16).map(|p| p.0),
            Some(989e12)
        );
        assert!(datasheet_peak("NVIDIA H200", DType::Bf16).is_some());
        assert!(datasheet_peak("NVIDIA H100 80GB HBM3", DType::F32).is_none());
        assert!(datasheet_peak("NVIDIA A100-SXM4-80GB", DType::Bf16).is_none());
    }

    #[test]
    fn the_cpu_has_a_name_and_no_peak_unless_given() {
        let hw = describe(&Device::Cpu, DType::F32, None);
        assert_eq!(hw.device, "cpu");
        assert!(!hw.card.is_empty());
        assert!(hw.peak_flops.is_none());
        let hw = describe(&Device::Cpu, DType::F32, Some(1.5));
        assert_eq!(hw.peak_flops, Some(1.5e12));
    }
}
