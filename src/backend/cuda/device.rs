//! Opening a device for the CUDA backend: a real GPU (the `real` driver: CUDA context and the
//! compiled kernels) or the simulated GPU (`device: sim`: every kernel compiled for the host and
//! run by the simulator in `kernels/sim/`). Either way the backend above sees one [`CudaDevice`].
//!
//! One [`CudaDevice`] is shared by every rank that runs on it (ranks sharing one GPU are threads);
//! each rank makes its own [`super::CudaBackend`] from it, with its own streams.

use std::sync::Arc;

use anyhow::Result;

use super::driver::real::RealDriver;
use super::driver::sim::SimDriver;
use super::driver::Driver;

pub use super::driver::real::{device_count, unavailable_reason};

/// A device opened for training: a GPU, or the simulated one.
pub struct CudaDevice {
    pub(super) driver: Arc<dyn Driver>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaDevice({})", self.describe())
    }
}

impl CudaDevice {
    /// Opens GPU `ordinal`: checks the libraries, creates the context, loads every kernel.
    pub fn open(ordinal: usize) -> Result<Arc<CudaDevice>> {
        Ok(Arc::new(CudaDevice {
            driver: Arc::new(RealDriver::open(ordinal)?),
        }))
    }

    /// Opens a new simulated GPU (its own memory, streams and sticky error).
    pub fn open_sim() -> Result<Arc<CudaDevice>> {
        Ok(Arc::new(CudaDevice {
            driver: Arc::new(SimDriver::open()?),
        }))
    }

    /// The device's name as its driver reports it ("NVIDIA H100 80GB HBM3").
    pub fn name(&self) -> String {
        self.driver.name()
    }

    /// "cuda:0 (NVIDIA H100 80GB HBM3, sm_90)", or "sim:0 (...)" for the simulated GPU.
    pub fn describe(&self) -> String {
        self.driver.describe()
    }

    /// Whether this is a real GPU (NCCL needs one); false for the simulated GPU.
    pub fn is_real(&self) -> bool {
        self.driver.is_real()
    }

    /// The driver below the backend (tests drive it directly to check the sim's own refusals).
    pub fn driver(&self) -> &Arc<dyn Driver> {
        &self.driver
    }

    /// Total and free device memory, in bytes.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.driver.memory_info()
    }
}
