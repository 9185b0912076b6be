//! Which backend a job runs on: `device: auto | cpu | cuda | sim` resolved once per job, before any rank
//! starts, so a missing GPU, driver or library is one clear error rather than one per rank.

use std::sync::Arc;

use anyhow::{bail, Result};

use crate::backend::cuda::{unavailable_reason, CudaDevice};
use crate::backend::kernels::missing_kernels_reason;
use crate::config::DeviceKind;

/// The device every rank of a `local` job uses.
#[derive(Debug, Clone)]
pub enum Device {
    Cpu,
    /// One GPU shared by every rank (ranks are threads with a stream each); also the simulated
    /// GPU, which runs the same CUDA backend.
    Cuda(Arc<CudaDevice>),
}

impl Device {
    /// Whether this is a real GPU (the NCCL transport needs one).
    pub fn is_real_gpu(&self) -> bool {
        matches!(self, Device::Cuda(d) if d.is_real())
    }
}

/// Resolves the config's device. `auto` takes GPU 0 when this build has kernels and a GPU with
/// its libraries is present, and the CPU otherwise (saying why at info level); `cuda` insists.
pub fn resolve(kind: DeviceKind) -> Result<Device> {
    resolve_on(kind, 0)
}

/// [`resolve`] for GPU `ordinal` (a process of a multi-process job takes its local rank's GPU).
pub fn resolve_on(kind: DeviceKind, ordinal: usize) -> Result<Device> {
    match kind {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Cuda => Ok(Device::Cuda(CudaDevice::open(ordinal)?)),
        DeviceKind::Sim => Ok(Device::Cuda(CudaDevice::open_sim()?)),
        DeviceKind::Auto => {
            let reason = missing_kernels_reason()
                .map(str::to_string)
                .or_else(unavailable_reason);
            match reason {
                Some(why) => {
                    tracing::info!("device auto: using the CPU ({why})");
                    Ok(Device::Cpu)
                }
                None => Ok(Device::Cuda(CudaDevice::open(ordinal)?)),
            }
        }
    }
}

/// The error `device: cuda` gives on a machine or build that cannot run it (for tests and docs).
pub fn require_cuda() -> Result<Arc<CudaDevice>> {
    match resolve(DeviceKind::Cuda)? {
        Device::Cuda(d) => Ok(d),
        Device::Cpu => bail!("device: cuda resolved to the CPU"),
    }
}
