//! Per-op GPU timing: when switched on, each op is bracketed by two CUDA events on the rank's
//! stream, and the elapsed times are summed per op name when the events are collected. This is the
//! "where does the time go" table of the benchmark; it costs two event records per op, so it is off
//! unless asked for.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Result};
use cudarc::driver::{sys::CUevent_flags, CudaEvent, CudaStream};

use crate::backend::OpTime;

#[derive(Default)]
pub(super) struct OpProfiler {
    on: AtomicBool,
    pending: Mutex<Vec<(&'static str, CudaEvent, CudaEvent)>>,
    totals: Mutex<BTreeMap<&'static str, (u64, f64)>>,
}

impl OpProfiler {
    pub(super) fn set(&self, on: bool) {
        self.on.store(on, Ordering::Relaxed);
    }

    /// Runs `op`, timing it on `stream` when profiling is on.
    pub(super) fn time<R>(
        &self,
        stream: &Arc<CudaStream>,
        name: &'static str,
        op: impl FnOnce() -> Result<R>,
    ) -> Result<R> {
        if !self.on.load(Ordering::Relaxed) {
            return op();
        }
        let ctx = stream.context();
        let event = || {
            ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| anyhow!("creating a timing event: {e:?}"))
        };
        let (start, end) = (event()?, event()?);
        start
            .record(stream)
            .map_err(|e| anyhow!("recording a timing event: {e:?}"))?;
        let r = op()?;
        end.record(stream)
            .map_err(|e| anyhow!("recording a timing event: {e:?}"))?;
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name, start, end));
        Ok(r)
    }

    /// Folds finished events into the totals (waits for the events: call after a synchronize).
    pub(super) fn collect(&self) -> Result<()> {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        let mut totals = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        for (name, start, end) in pending {
            let ms = start
                .elapsed_ms(&end)
                .map_err(|e| anyhow!("reading a timing event: {e:?}"))?;
            let t = totals.entry(name).or_default();
            t.0 += 1;
            t.1 += ms as f64;
        }
        Ok(())
    }

    /// The totals so far, largest first, and a reset.
    pub(super) fn take(&self) -> Result<Vec<OpTime>> {
        self.collect()?;
        let totals = std::mem::take(&mut *self.totals.lock().unwrap_or_else(|e| e.into_inner()));
        let mut times: Vec<OpTime> = totals
            .into_iter()
            .map(|(op, (calls, ms))| OpTime {
                op: op.to_string(),
                calls,
                total_ms: ms,
            })
            .collect();
        times.sort_by(|a, b| b.total_ms.total_cmp(&a.total_ms));
        Ok(times)
    }
}
