//! Per-op GPU timing: when switched on, each op is bracketed by two timing events on the rank's
//! stream, and the elapsed times are summed per op name when the events are collected. This is the
//! "where does the time go" table of the benchmark; it costs two event records per op, so it is off
//! unless asked for.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Result};

use super::driver::{Event, Stream};

use crate::backend::OpTime;

/// One timed op: its name and the events before and after it.
type Bracket = (&'static str, Arc<dyn Event>, Arc<dyn Event>);

#[derive(Default)]
pub(super) struct OpProfiler {
    on: AtomicBool,
    pending: Mutex<Vec<Bracket>>,
    totals: Mutex<BTreeMap<&'static str, (u64, f64)>>,
}

impl OpProfiler {
    pub(super) fn set(&self, on: bool) {
        self.on.store(on, Ordering::Relaxed);
    }

    /// Runs `op`, timing it on `stream` when profiling is on.
    pub(super) fn time<R>(
        &self,
        stream: &dyn Stream,
        name: &'static str,
        op: impl FnOnce() -> Result<R>,
    ) -> Result<R> {
        if !self.on.load(Ordering::Relaxed) {
            return op();
        }
        let start = stream.record(true)?;
        let r = op()?;
        let end = stream.record(true)?;
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
                .elapsed_ms_to(end.as_ref())
                .map_err(|e| anyhow!("reading a timing event: {e:#}"))?;
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
