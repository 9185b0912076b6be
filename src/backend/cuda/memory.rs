//! Device memory for the CUDA backend: stream-ordered allocations (cuMemAllocAsync from the
//! device's pool, so the per-step gathers and frees cost no driver round trip), the buffer handle
//! the Backend trait hands out, and the bytes each backend holds (current and peak).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{bail, Result};

use super::driver::Stream;
use crate::backend::{Buffer, DType};

/// Bytes held through one backend: now and at most.
#[derive(Debug, Default)]
pub struct MemoryStats {
    current: AtomicUsize,
    peak: AtomicUsize,
}

impl MemoryStats {
    fn add(&self, bytes: usize) {
        let now = self.current.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    fn sub(&self, bytes: usize) {
        self.current.fetch_sub(bytes, Ordering::Relaxed);
    }

    pub fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed)
    }

    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }
}

/// One allocation, freed (stream-ordered, after the work queued before it) when the last handle
/// to it goes.
pub(super) struct DeviceMemory {
    ptr: u64,
    bytes: usize,
    stream: Arc<dyn Stream>,
    stats: Arc<MemoryStats>,
}

impl DeviceMemory {
    /// `bytes` of uninitialised memory, ordered on `stream`. Zero bytes allocate nothing.
    pub(super) fn new(
        stream: &Arc<dyn Stream>,
        stats: &Arc<MemoryStats>,
        bytes: usize,
    ) -> Result<DeviceMemory> {
        let ptr = stream.alloc(bytes).map_err(|e| {
            e.context(format!(
                "allocating {bytes} bytes of device memory (out of memory? {} bytes are held by \
                 this rank)",
                stats.current()
            ))
        })?;
        stats.add(bytes);
        Ok(DeviceMemory {
            ptr,
            bytes,
            stream: stream.clone(),
            stats: stats.clone(),
        })
    }

    pub(super) fn ptr(&self) -> u64 {
        self.ptr
    }

    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for DeviceMemory {
    fn drop(&mut self) {
        // Work queued on the stream before this point still sees valid memory; a failure is
        // recorded by the driver for the next synchronize.
        self.stream.free(self.ptr);
        self.stats.sub(self.bytes);
    }
}

/// A CUDA buffer handle: a view of `len` elements of `dtype` at element `offset` of an allocation.
/// Cloning shares the memory, as the Backend contract says.
#[derive(Clone)]
pub struct CudaBuf {
    pub(super) mem: Arc<DeviceMemory>,
    pub(super) offset: usize,
    pub(super) len: usize,
    pub(super) dtype: DType,
}

impl std::fmt::Debug for CudaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaBuf({} x {} at {:#x})",
            self.len,
            self.dtype,
            self.ptr()
        )
    }
}

impl Buffer for CudaBuf {
    fn len(&self) -> usize {
        self.len
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}

impl CudaBuf {
    /// Device address of the first element (for other CUDA libraries, e.g. NCCL).
    pub fn device_address(&self) -> u64 {
        self.ptr()
    }

    /// Device address of the first element.
    pub(super) fn ptr(&self) -> u64 {
        self.mem.ptr() + (self.offset * self.dtype.size_bytes()) as u64
    }

    pub(super) fn bytes(&self) -> usize {
        self.len * self.dtype.size_bytes()
    }

    pub(super) fn view(&self, offset: usize, len: usize) -> Result<CudaBuf> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            bail!(
                "slice: elements {offset}..{} are outside a buffer of {}",
                offset.saturating_add(len),
                self.len
            );
        }
        Ok(CudaBuf {
            mem: self.mem.clone(),
            offset: self.offset + offset,
            len,
            dtype: self.dtype,
        })
    }

    /// Whether the two views share any byte (outputs must not overlap inputs).
    pub(super) fn overlaps(&self, other: &CudaBuf) -> bool {
        let (a0, a1) = (self.ptr(), self.ptr() + self.bytes() as u64);
        let (b0, b1) = (other.ptr(), other.ptr() + other.bytes() as u64);
        a0 < b1 && b0 < a1
    }
}

/// Token ids on the GPU, with a host copy for the range checks the contract asks for.
#[derive(Clone)]
pub struct CudaIds {
    pub(super) mem: Arc<DeviceMemory>,
    pub(super) host: Arc<Vec<u32>>,
}

impl std::fmt::Debug for CudaIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaIds({} ids)", self.host.len())
    }
}

impl CudaIds {
    pub(super) fn ptr(&self) -> u64 {
        self.mem.ptr()
    }
}
