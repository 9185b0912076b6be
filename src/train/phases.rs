//! Time per phase of a training step, read from the device's own clock (`shardtrain bench`).
//!
//! Host clocks around asynchronous work measure when work was *issued*, not when it ran, so the
//! phases are measured with marks on the rank's compute queue ([`Backend::timing_mark`]): on CUDA
//! a timed event on the rank's stream, read with cuEventElapsedTime; on the CPU the host clock,
//! which is exact there because every op has finished when it returns. The trainer marks phase
//! boundaries ([`PhaseTimer::switch`]), the sharding engine brackets every collective call with
//! two marks (`ShardedUnits::time_collectives`), the trainer brackets its own loss all-reduce, and
//! the backend reports how long its comm lane was busy ([`Backend::take_comm_busy_ms`]). After the
//! step's synchronize, [`PhaseTimer::finish_step`] reads every interval and [`account`] turns them
//! into phases, defined as follows (all in milliseconds of one step, rank 0's):
//!
//! - **comm exposed**: the sum, over collective calls, of the compute queue's time between the
//!   mark just before the call and the mark just after it: how long compute waited for
//!   communication. On CUDA that is a stream stalled on a collective's done event, or left idle
//!   while its host thread waited for peers at a rendezvous; when the collective finished while
//!   the stream was still busy with earlier kernels, the interval is ~0. On the CPU it is the
//!   whole wall time of the call, waiting for slower peers included: the calling thread does the
//!   copies itself. The calls bracketed: issuing a gather, waiting for a gather before a unit's
//!   first use, each gradient reduce-scatter and replica all-reduce, the gradient-norm
//!   all-reduce, and the loss all-reduce (with the upload and download of its two values).
//! - **comm total**: the sum of the durations of the collectives' work on the comm lane. On CUDA
//!   each op the lane runs (copies, reductions: the lane runs nothing else) is timed by events on
//!   the lane's stream recorded after the lane's waits for the ranks' inputs, so waiting is not
//!   counted. Where the comm lane is the compute queue itself (the CPU) nothing can overlap, and
//!   total = exposed.
//! - **comm overlapped**: total − exposed, at least 0: communication hidden behind compute.
//! - **forward**: per micro-batch, from after its token upload to the end of the model's forward
//!   (the loss included: the fused softmax + cross-entropy also writes the logits' gradient),
//!   minus the exposed communication inside, summed over the step's micro-batches.
//! - **backward**: per micro-batch, the backward pass (with the gradient reductions issued in it),
//!   minus the exposed communication inside, summed over micro-batches.
//! - **optimizer**: the gradient norm, the clipping factor and the sharded AdamW update, minus the
//!   exposed communication (the norm's all-reduce) inside.
//!
//! What no phase covers is the rest of the step's wall time: zeroing gradients, preparing and
//! uploading batches, the loss download, freeing gathered units, the final synchronize and host
//! overhead; on a GPU also kernel-launch gaps inside a phase when the host falls behind (those
//! stay in the phase: the stream's clock cannot tell them from slow kernels).
//!
//! With phase timing off (every `train` run) no timer exists and the engine records nothing: a
//! branch per collective and per phase boundary, and not one op more, so results are unchanged.

use anyhow::Result;
use serde::Serialize;

use crate::backend::{Backend, TimingMark};
use crate::shard::CommBracket;

/// A timed part of a training step (see the module docs for what each covers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Forward,
    Backward,
    Optimizer,
}

/// One step's times in milliseconds (see the module docs for the definitions).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct StepPhases {
    /// The step's wall time on the host, from its start to the synchronize that ends it.
    pub step_ms: f64,
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub optimizer_ms: f64,
    pub comm_exposed_ms: f64,
    pub comm_total_ms: f64,
}

impl StepPhases {
    /// Communication that ran beside compute.
    pub fn comm_overlapped_ms(&self) -> f64 {
        (self.comm_total_ms - self.comm_exposed_ms).max(0.0)
    }

    /// The step time that no phase and no exposed communication accounts for (at least 0).
    pub fn other_ms(&self) -> f64 {
        (self.step_ms
            - self.forward_ms
            - self.backward_ms
            - self.optimizer_ms
            - self.comm_exposed_ms)
            .max(0.0)
    }

    /// The mean of each field over `steps` (all zero when there are none).
    pub fn mean(steps: &[StepPhases]) -> StepPhases {
        let n = steps.len().max(1) as f64;
        let sum = |f: fn(&StepPhases) -> f64| steps.iter().map(f).sum::<f64>() / n;
        StepPhases {
            step_ms: sum(|s| s.step_ms),
            forward_ms: sum(|s| s.forward_ms),
            backward_ms: sum(|s| s.backward_ms),
            optimizer_ms: sum(|s| s.optimizer_ms),
            comm_exposed_ms: sum(|s| s.comm_exposed_ms),
            comm_total_ms: sum(|s| s.comm_total_ms),
        }
    }
}

type Mark<B> = TimingMark<<B as Backend>::Event>;

/// One rank's phase marks for the step in progress.
pub struct PhaseTimer<B: Backend> {
    /// The phase in progress and the mark it began at.
    open: Option<(Phase, Mark<B>)>,
    /// Closed phases of this step: (phase, begin, end).
    spans: Vec<(Phase, Mark<B>, Mark<B>)>,
    /// Collective brackets of this step, with the phase they fell in (`None`: between phases).
    comm: Vec<(Option<Phase>, CommBracket<B>)>,
}

impl<B: Backend> Default for PhaseTimer<B> {
    fn default() -> Self {
        PhaseTimer {
            open: None,
            spans: Vec::new(),
            comm: Vec::new(),
        }
    }
}

impl<B: Backend> PhaseTimer<B> {
    /// Ends the phase in progress (if any) and begins `next` (if any), at one mark.
    pub fn switch(&mut self, be: &B, next: Option<Phase>) -> Result<()> {
        if self.open.is_none() && next.is_none() {
            return Ok(());
        }
        let mark = be.timing_mark()?;
        if let Some((phase, begin)) = self.open.take() {
            self.spans.push((phase, begin, mark.clone()));
        }
        self.open = next.map(|p| (p, mark));
        Ok(())
    }

    /// Collective brackets recorded since the last call: they belong to the phase in progress.
    /// (Call it before every [`Self::switch`], so each bracket lands in the phase it ran in.)
    pub fn add_comm(&mut self, brackets: Vec<CommBracket<B>>) {
        let phase = self.open.as_ref().map(|(p, _)| *p);
        self.comm.extend(brackets.into_iter().map(|b| (phase, b)));
    }

    /// Reads the step's marks and the comm lane's busy time, and starts the next step. Call it
    /// after the step's [`Backend::synchronize`], with the step's host wall time.
    pub fn finish_step(&mut self, be: &B, step_ms: f64) -> Result<StepPhases> {
        // A phase left open (not expected) ends here.
        self.switch(be, None)?;
        let spans = self
            .spans
            .drain(..)
            .map(|(p, a, b)| Ok((p, be.elapsed_ms(&a, &b)?)))
            .collect::<Result<Vec<_>>>()?;
        let comm = self
            .comm
            .drain(..)
            .map(|(p, (a, b))| Ok((p, be.elapsed_ms(&a, &b)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(account(&spans, &comm, be.take_comm_busy_ms()?, step_ms))
    }
}

/// The phases of one step from its measured intervals: `spans` (each phase span's length),
/// `comm` (each collective bracket's length, with the phase it fell in), the comm lane's busy
/// time (`None` where the lane is the compute queue) and the step's wall time.
pub fn account(
    spans: &[(Phase, f64)],
    comm: &[(Option<Phase>, f64)],
    lane_busy_ms: Option<f64>,
    step_ms: f64,
) -> StepPhases {
    let compute = |phase: Phase| {
        let span: f64 = spans
            .iter()
            .filter(|(p, _)| *p == phase)
            .map(|(_, ms)| ms)
            .sum();
        let waited: f64 = comm
            .iter()
            .filter(|(p, _)| *p == Some(phase))
            .map(|(_, ms)| ms)
            .sum();
        // Marks are read to ~µs; a phase that is nothing but waiting must not go negative.
        (span - waited).max(0.0)
    };
    let exposed: f64 = comm.iter().map(|(_, ms)| ms).sum();
    StepPhases {
        step_ms,
        forward_ms: compute(Phase::Forward),
        backward_ms: compute(Phase::Backward),
        optimizer_ms: compute(Phase::Optimizer),
        comm_exposed_ms: exposed,
        comm_total_ms: lane_busy_ms.unwrap_or(exposed),
    }
}

#[cfg(test)]
mod tests {
    use std::thread::sleep;
    use std::time::Duration;

    use super::*;
    use crate::backend::cpu::CpuBackend;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn exposed_communication_is_taken_out_of_the_phase_it_fell_in() {
        use Phase::*;
        let spans = [
            (Forward, 10.0),
            (Backward, 4.0),
            (Backward, 6.0),
            (Optimizer, 5.0),
        ];
        let comm = [
            (Some(Forward), 2.0),
            (Some(Forward), 1.0),
            (Some(Backward), 2.0),
            (None, 0.5),
            (Some(Optimizer), 1.0),
        ];
        let p = account(&spans, &comm, Some(10.0), 30.0);
        assert!(close(p.forward_ms, 7.0), "{p:?}");
        assert!(close(p.backward_ms, 8.0), "{p:?}");
        assert!(close(p.optimizer_ms, 4.0), "{p:?}");
        assert!(close(p.comm_exposed_ms, 6.5), "{p:?}");
        assert!(close(p.comm_total_ms, 10.0), "{p:?}");
        assert!(close(p.comm_overlapped_ms(), 3.5), "{p:?}");
        assert!(close(p.other_ms(), 30.0 - 7.0 - 8.0 - 4.0 - 6.5), "{p:?}");
    }

    #[test]
    fn without_a_separate_comm_lane_everything_is_exposed() {
        let p = account(
            &[(Phase::Forward, 3.0)],
            &[(Some(Phase::Forward), 1.0)],
            None,
            4.0,
        );
        assert!(close(p.comm_total_ms, 1.0) && close(p.comm_overlapped_ms(), 0.0));
        // A lane busier for less time than compute waited (waiting for slow peers): nothing
        // overlapped, never a negative figure.
        let p = account(&[], &[(None, 2.0)], Some(0.5), 4.0);
        assert!(close(p.comm_overlapped_ms(), 0.0));
        // A phase that is all waiting is 0, not negative.
        let p = account(
            &[(Phase::Backward, 1.0)],
            &[(Some(Phase::Backward), 1.0 + 1e-7)],
            None,
            2.0,
        );
        assert_eq!(p.backward_ms, 0.0);
    }

    #[test]
    fn means_are_per_field() {
        let a = StepPhases {
            step_ms: 10.0,
            forward_ms: 2.0,
            ..StepPhases::default()
        };
        let b = StepPhases {
            step_ms: 20.0,
            forward_ms: 4.0,
            ..StepPhases::default()
        };
        let m = StepPhases::mean(&[a, b]);
        assert!(close(m.step_ms, 15.0) && close(m.forward_ms, 3.0));
        assert_eq!(StepPhases::mean(&[]), StepPhases::default());
    }

    #[test]
    fn cpu_marks_time_phases_and_brackets_on_the_host_clock() {
        let be = CpuBackend::<f32>::new();
        let mut t = PhaseTimer::<CpuBackend<f32>>::default();
        t.switch(&be, Some(Phase::Forward)).unwrap();
        sleep(Duration::from_millis(20));
        let begin = be.timing_mark().unwrap();
        sleep(Duration::from_millis(10));
        let end = be.timing_mark().unwrap();
        t.add_comm(vec![(begin, end)]);
        t.switch(&be, Some(Phase::Optimizer)).unwrap();
        sleep(Duration::from_millis(5));
        t.switch(&be, None).unwrap();
        let p = t.finish_step(&be, 40.0).unwrap();
        // Sleeps last at least as long as asked; allow generous slack above.
        assert!(p.forward_ms >= 19.0 && p.forward_ms < 200.0, "{p:?}");
        assert!(
            p.comm_exposed_ms >= 10.0 && p.comm_exposed_ms < 200.0,
            "{p:?}"
        );
        assert!(p.optimizer_ms >= 5.0 && p.optimizer_ms < 200.0, "{p:?}");
        assert_eq!(p.comm_total_ms, p.comm_exposed_ms);
        assert_eq!(p.backward_ms, 0.0);
        // The next step starts empty.
        let q = t.finish_step(&be, 1.0).unwrap();
        assert_eq!(q.forward_ms + q.comm_exposed_ms, 0.0);
    }
}
