//! The multi-tensor AdamW launch: every tensor of a unit's shard updated by one kernel, which
//! reads the pieces (start, end, decays) from a small device table made once per distinct list
//! of pieces and kept for the backend's life (a unit's pieces never change during a run).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Result};

use super::launch::{grid_for, Arg, BLOCK};
use super::memory::DeviceMemory;
use super::{no_overlap, ptr, CudaBackend, CudaBuf};
use crate::backend::{shapes, AdamWSegment, AdamWStep, DType};

/// The device tables of segment lists already seen.
#[derive(Default)]
pub(super) struct SegmentTables(Mutex<HashMap<Vec<AdamWSegment>, Arc<DeviceMemory>>>);

/// The kernel arguments after the buffers shared by both AdamW kernels: learning rate, betas,
/// eps, weight decay, bias corrections (computed in f64 on the host, as the CPU reference does)
/// and the gradient scale.
pub(super) fn hyper_args(hp: &AdamWStep) -> [Arg; 8] {
    let step = hp.step.max(1) as i32;
    let bc1 = 1.0 - f64::from(hp.beta1).powi(step);
    let bc2 = 1.0 - f64::from(hp.beta2).powi(step);
    [
        Arg::Float(hp.lr),
        Arg::Float(hp.beta1),
        Arg::Float(hp.beta2),
        Arg::Float(hp.eps),
        Arg::Float(hp.weight_decay),
        Arg::Float(bc1 as f32),
        Arg::Float(bc2 as f32),
        Arg::Float(hp.grad_scale),
    ]
}

/// The outputs of an AdamW update, for the overlap check.
pub(super) fn adamw_outputs<'a>(
    param: &'a CudaBuf,
    m: &'a CudaBuf,
    v: &'a CudaBuf,
    param_copy: Option<&'a CudaBuf>,
) -> Vec<(&'static str, &'a CudaBuf)> {
    let mut outs = vec![("param", param), ("m", m), ("v", v)];
    outs.extend(param_copy.map(|c| ("param_copy", c)));
    outs
}

impl CudaBackend {
    /// [`crate::backend::Backend::adamw_segments`] in one launch.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn adamw_segments_launch(
        &self,
        param: &CudaBuf,
        grad: &CudaBuf,
        m: &CudaBuf,
        v: &CudaBuf,
        param_copy: Option<&CudaBuf>,
        segments: &[AdamWSegment],
        hp: &AdamWStep,
    ) -> Result<()> {
        let op = "adamw_segments";
        shapes::adamw_segments(param, grad, m, v, param_copy, segments)?;
        no_overlap(
            op,
            &adamw_outputs(param, m, v, param_copy),
            &[("grad", grad)],
        )?;
        let (Some(first), Some(last)) = (segments.first(), segments.last()) else {
            return Ok(());
        };
        let span = last.offset + last.len - first.offset;
        let count = i32::try_from(segments.len())
            .map_err(|_| anyhow!("{op}: {} segments do not fit an int", segments.len()))?;
        let table = self.segment_table(segments)?;
        let copy_dtype = param_copy.map_or(DType::F32, |c| c.dtype);
        let name = match (grad.dtype, copy_dtype) {
            (DType::F32, DType::F32) => "adamw_segments_f32_f32",
            (DType::F32, DType::Bf16) => "adamw_segments_f32_bf16",
            (DType::Bf16, DType::F32) => "adamw_segments_bf16_f32",
            (DType::Bf16, DType::Bf16) => "adamw_segments_bf16_bf16",
        };
        let mut args = vec![
            ptr(param),
            ptr(grad),
            ptr(m),
            ptr(v),
            Arg::Ptr(param_copy.map_or(0, |c| c.ptr())),
            Arg::Ptr(table.ptr()),
            Arg::Int(count),
        ];
        args.extend(hyper_args(hp));
        self.timed("adamw", || {
            self.run(name, (grid_for(span), 1, 1), (BLOCK, 1, 1), &args)
        })
    }

    /// The device table of `segments` (int64 start, end, decays per segment), made at first use.
    fn segment_table(&self, segments: &[AdamWSegment]) -> Result<Arc<DeviceMemory>> {
        let mut tables = self.segment_tables.0.lock().expect("segment tables lock");
        if let Some(t) = tables.get(segments) {
            return Ok(t.clone());
        }
        let mut words = Vec::with_capacity(3 * segments.len());
        for s in segments {
            words.extend([
                s.offset as i64,
                (s.offset + s.len) as i64,
                i64::from(u8::from(s.decay)),
            ]);
        }
        let bytes: &[u8] = bytemuck::cast_slice(&words);
        let mem = Arc::new(self.raw_alloc(bytes.len())?);
        self.copy_host_to_device(mem.ptr(), bytes)?;
        tables.insert(segments.to_vec(), mem.clone());
        Ok(mem)
    }
}
