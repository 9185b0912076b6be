//! AdamW over the model's units: f32 master weights and moments per unit, weight decay only on
//! matrices and embeddings (never norms or biases), global-norm clipping over every gradient.
//!
//! With f32 parameters the compute weights are the master weights; with bf16 parameters the master
//! stays in f32 here and each update writes the bf16 copy in the same pass.

use anyhow::Result;

use crate::backend::{AdamWStep, Backend, Buffer, DType};
use crate::model::ParamLayout;

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

/// Optimizer state for every unit.
pub struct AdamW<B: Backend> {
    cfg: AdamWConfig,
    /// f32 master weights, or `None` where the compute parameters already are f32.
    master: Option<Vec<B::Buf>>,
    m: Vec<B::Buf>,
    v: Vec<B::Buf>,
    /// One-element f32 accumulator for the squared gradient norm.
    norm_acc: B::Buf,
    step: u64,
}

/// What one optimizer step did, for logging.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    /// Factor applied to every gradient (1 when not clipped).
    pub clip_scale: f32,
}

impl<B: Backend> AdamW<B> {
    /// State for `params` (one buffer per unit). Master weights start as f32 copies of them.
    pub fn new(be: &B, layout: &ParamLayout, params: &[B::Buf], cfg: AdamWConfig) -> Result<Self> {
        let zeros = || -> Result<Vec<B::Buf>> {
            layout
                .units
                .iter()
                .map(|u| be.alloc(u.numel, DType::F32))
                .collect()
        };
        let master = if params.iter().all(|p| p.dtype() == DType::F32) {
            None
        } else {
            let master = zeros()?;
            for (dst, src) in master.iter().zip(params) {
                be.copy(dst, src)?;
            }
            Some(master)
        };
        Ok(AdamW {
            cfg,
            master,
            m: zeros()?,
            v: zeros()?,
            norm_acc: be.alloc(1, DType::F32)?,
            step: 0,
        })
    }

    /// Updates are counted from 1; this is the number of completed steps.
    pub fn steps_done(&self) -> u64 {
        self.step
    }

    /// Loads f32 master weights (for example after initialisation on the host), keeping the
    /// compute parameters in sync.
    pub fn set_master(&self, be: &B, unit: usize, values: &[f32], params: &[B::Buf]) -> Result<()> {
        be.upload(&params[unit], values)?;
        if let Some(master) = &self.master {
            be.upload(&master[unit], values)?;
        }
        Ok(())
    }

    /// Squared L2 norm of all gradients together.
    pub fn grad_norm(&self, be: &B, grads: &[B::Buf]) -> Result<f32> {
        be.fill(&self.norm_acc, 0.0)?;
        for g in grads {
            be.sum_squares(&self.norm_acc, g)?;
        }
        Ok(be.download(&self.norm_acc)?[0].sqrt())
    }

    /// One AdamW step with learning rate `lr` from the accumulated `grads`, updating `params`.
    pub fn step(
        &mut self,
        be: &B,
        layout: &ParamLayout,
        params: &[B::Buf],
        grads: &[B::Buf],
        lr: f32,
    ) -> Result<StepStats> {
        let grad_norm = self.grad_norm(be, grads)?;
        let clip_scale = if self.cfg.grad_clip > 0.0 && grad_norm > self.cfg.grad_clip {
            self.cfg.grad_clip / (grad_norm + 1e-6)
        } else {
            1.0
        };
        self.step += 1;
        for (u, unit) in layout.units.iter().enumerate() {
            for t in &unit.tensors {
                let view = |buf: &B::Buf| be.slice(buf, t.offset, t.numel());
                let hp = AdamWStep {
                    lr,
                    beta1: self.cfg.beta1,
                    beta2: self.cfg.beta2,
                    eps: self.cfg.eps,
                    weight_decay: if t.decay { self.cfg.weight_decay } else { 0.0 },
                    step: self.step,
                    grad_scale: clip_scale,
                };
                let param = view(&params[u])?;
                let (m, v, grad) = (view(&self.m[u])?, view(&self.v[u])?, view(&grads[u])?);
                match &self.master {
                    Some(master) => {
                        be.adamw(&view(&master[u])?, &grad, &m, &v, Some(&param), &hp)?
                    }
                    None => be.adamw(&param, &grad, &m, &v, None, &hp)?,
                }
            }
        }
        Ok(StepStats {
            grad_norm,
            clip_scale,
        })
    }

    /// Bytes of optimizer state (moments and, with bf16 parameters, master weights).
    pub fn bytes(&self) -> usize {
        let size = |bufs: &Vec<B::Buf>| bufs.iter().map(|b| b.len() * 4).sum::<usize>();
        size(&self.m) + size(&self.v) + self.master.as_ref().map_or(0, size)
    }
}
