//! AdamW over this rank's shards: f32 master weights and moments exist only for the shard, weight
//! decay only on matrices and embeddings (never norms or biases), updated tensor piece by piece.
//!
//! With f32 parameters the parameter shards are the master weights; with bf16 parameters the
//! master stays in f32 here and each update writes the bf16 shard in the same pass.

use anyhow::Result;

use crate::backend::{AdamWSegment, AdamWStep, Backend, Buffer, DType};
use crate::shard::flat::Segment;

/// Hyper-parameters that stay fixed during a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Global gradient-norm limit; 0 disables clipping.
    pub grad_clip: f32,
}

/// Optimizer state for this rank's shard of every unit.
pub struct AdamW<B: Backend> {
    cfg: AdamWConfig,
    /// Per unit, the tensor pieces in this rank's shard (padding is never updated).
    segments: Vec<Vec<AdamWSegment>>,
    /// f32 master weights, or `None` where the parameter shards already are f32.
    master: Option<Vec<B::Buf>>,
    m: Vec<B::Buf>,
    v: Vec<B::Buf>,
    step: u64,
}

impl<B: Backend> AdamW<B> {
    /// State for `params` (one shard per unit, the pieces of real tensors in `segments`).
    pub fn new(
        be: &B,
        params: &[B::Buf],
        segments: Vec<Vec<Segment>>,
        cfg: AdamWConfig,
    ) -> Result<Self> {
        let zeros = || -> Result<Vec<B::Buf>> {
            params
                .iter()
                .map(|p| be.alloc(p.len(), DType::F32))
                .collect()
        };
        let master = if params.iter().all(|p| p.dtype() == DType::F32) {
            None
        } else {
            Some(zeros()?)
        };
        Ok(AdamW {
            cfg,
            segments: segments
                .into_iter()
                .map(|unit| {
                    unit.into_iter()
                        .map(|s| AdamWSegment {
                            offset: s.offset,
                            len: s.len,
                            decay: s.decay,
                        })
                        .collect()
                })
                .collect(),
            master,
            m: zeros()?,
            v: zeros()?,
            step: 0,
        })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// The f32 master shards (the parameter shards themselves when those are f32).
    pub fn master<'a>(&'a self, params: &'a [B::Buf]) -> &'a [B::Buf] {
        self.master.as_deref().unwrap_or(params)
    }

    /// Loads master weights of `unit` (for example the initial values), keeping the compute
    /// parameter shard in sync (rounded to its dtype).
    pub fn set_master(&self, be: &B, unit: usize, values: &[f32], params: &[B::Buf]) -> Result<()> {
        be.upload(&params[unit], values)?;
        if let Some(master) = &self.master {
            be.upload(&master[unit], values)?;
        }
        Ok(())
    }

    /// Steps taken so far (bias correction continues from here).
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The first and second moments, one shard per unit.
    pub fn moments(&self) -> (&[B::Buf], &[B::Buf]) {
        (&self.m, &self.v)
    }

    /// Restores the state of `unit` from a checkpoint: master weights (and the compute parameter
    /// shard, rounded to its dtype) and both moments.
    pub fn restore_unit(
        &self,
        be: &B,
        unit: usize,
        state: &[Vec<f32>; 3],
        params: &[B::Buf],
    ) -> Result<()> {
        self.set_master(be, unit, &state[0], params)?;
        be.upload(&self.m[unit], &state[1])?;
        be.upload(&self.v[unit], &state[2])
    }

    /// Sets the step count of a resumed run.
    pub fn set_steps(&mut self, steps: u64) {
        self.step = steps;
    }

    /// One AdamW step with learning rate `lr` from the accumulated gradient shards, each gradient
    /// multiplied by `grad_scale` (clipping); updates `params`.
    pub fn step(
        &mut self,
        be: &B,
        params: &[B::Buf],
        grads: &[B::Buf],
        lr: f32,
        grad_scale: f32,
    ) -> Result<()> {
        self.step += 1;
        let hp = AdamWStep {
            lr,
            beta1: self.cfg.beta1,
            beta2: self.cfg.beta2,
            eps: self.cfg.eps,
            weight_decay: self.cfg.weight_decay,
            step: self.step,
            grad_scale,
        };
        // One update per unit: every tensor piece of its shard in one go.
        for (u, segments) in self.segments.iter().enumerate() {
            let (m, v) = (&self.m[u], &self.v[u]);
            match &self.master {
                Some(master) => {
                    be.adamw_segments(&master[u], &grads[u], m, v, Some(&params[u]), segments, &hp)?
                }
                None => be.adamw_segments(&params[u], &grads[u], m, v, None, segments, &hp)?,
            }
        }
        Ok(())
    }

    /// Bytes of f32 master weights kept here (zero when the parameter shards are the master).
    pub fn master_bytes(&self) -> usize {
        self.master
            .as_ref()
            .map_or(0, |m| m.iter().map(|b| b.len() * 4).sum())
    }

    /// Bytes of the AdamW moments.
    pub fn moment_bytes(&self) -> usize {
        let size = |bufs: &Vec<B::Buf>| bufs.iter().map(|b| b.len() * 4).sum::<usize>();
        size(&self.m) + size(&self.v)
    }
}

impl AdamWConfig {
    /// The factor that brings a gradient of norm `grad_norm` within the clipping limit.
    pub fn clip_scale(&self, grad_norm: f32) -> f32 {
        if self.grad_clip > 0.0 && grad_norm > self.grad_clip {
            self.grad_clip / (grad_norm + 1e-6)
        } else {
            1.0
        }
    }
}
