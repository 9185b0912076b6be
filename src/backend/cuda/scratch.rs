//! Device scratch owned by one backend and grown on demand: the partial sums a multi-pass kernel
//! sequence keeps between its passes (LayerNorm's per-chunk parameter gradients), so those ops do
//! not allocate per call. It holds no results: the ops that use it leave nothing in it.

use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Result};

use super::driver::Stream;
use super::memory::{DeviceMemory, MemoryStats};

/// Scratch memory for kernels queued on one stream.
#[derive(Default)]
pub(super) struct Scratch {
    mem: Mutex<Option<DeviceMemory>>,
}

impl Scratch {
    /// Runs `queue` with the address of at least `bytes` of scratch, growing it first if needed.
    ///
    /// The lock is held while `queue` issues its kernels: work queued on the stream afterwards
    /// runs after them, so the next user cannot overwrite the scratch before they have read it,
    /// and a growth's stream-ordered free of the old memory comes after the work that used it.
    pub(super) fn with<R>(
        &self,
        stream: &Arc<dyn Stream>,
        stats: &Arc<MemoryStats>,
        bytes: usize,
        queue: impl FnOnce(u64) -> Result<R>,
    ) -> Result<R> {
        let mut mem = self
            .mem
            .lock()
            .map_err(|_| anyhow!("scratch memory: a previous op panicked while holding it"))?;
        if mem.as_ref().is_none_or(|m| m.bytes() < bytes) {
            // Grow geometrically so a slowly growing size does not reallocate every call.
            let grown = mem.as_ref().map_or(0, |m| m.bytes() * 2).max(bytes);
            *mem = None; // frees the old memory (stream-ordered) before taking the new
            *mem = Some(DeviceMemory::new(stream, stats, grown)?);
        }
        let ptr = mem.as_ref().map_or(0, |m| m.ptr());
        queue(ptr)
    }
}
