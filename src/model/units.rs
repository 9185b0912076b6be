//! How the model reaches its weights: through [`UnitAccess`], one unit at a time, in the order the
//! forward and backward passes need them. The model never owns parameters; the provider decides
//! where they live. [`ResidentParams`] keeps every unit in memory (one rank, no sharding); the
//! sharding layer implements the same trait with all-gathers before use and reduce-scatters after.
//!
//! Call order within one micro-batch (every provider may rely on it):
//! forward:  `params(0)`, then for each block `params(l)` .. `forward_done(l)`, then `forward_done(0)`
//!           after the head;
//! backward: `params(0)` + `grads(0)` for the head, then for each block in reverse `params(l)` +
//!           `grads(l)` .. `backward_done(l)`, then `backward_done(0)` after the embedding.

use anyhow::{ensure, Result};

use super::layout::{ParamLayout, UnitSpec};
use crate::backend::{Backend, Buffer, DType};

/// Source of a unit's full parameters (in the compute dtype) and sink of its gradients.
pub trait UnitAccess<B: Backend> {
    /// The unit's full parameter buffer, valid until the matching `*_done`.
    fn params(&mut self, be: &B, unit: usize) -> Result<B::Buf>;
    /// The unit's gradient buffer; backward ops accumulate into it.
    fn grads(&mut self, be: &B, unit: usize) -> Result<B::Buf>;
    /// The forward pass no longer needs this unit's parameters.
    fn forward_done(&mut self, be: &B, unit: usize) -> Result<()>;
    /// This unit's gradients for the current micro-batch are complete.
    fn backward_done(&mut self, be: &B, unit: usize) -> Result<()>;
}

/// Every unit's parameters and gradients resident on one device (world size 1).
pub struct ResidentParams<B: Backend> {
    pub params: Vec<B::Buf>,
    pub grads: Vec<B::Buf>,
}

impl<B: Backend> ResidentParams<B> {
    /// Zeroed parameter and gradient buffers for every unit of `layout`.
    pub fn alloc(be: &B, layout: &ParamLayout, dtype: DType) -> Result<Self> {
        let alloc_all = || -> Result<Vec<B::Buf>> {
            layout
                .units
                .iter()
                .map(|u| be.alloc(u.numel, dtype))
                .collect()
        };
        Ok(ResidentParams {
            params: alloc_all()?,
            grads: alloc_all()?,
        })
    }
}

impl<B: Backend> UnitAccess<B> for ResidentParams<B> {
    fn params(&mut self, _be: &B, unit: usize) -> Result<B::Buf> {
        Ok(self.params[unit].clone())
    }
    fn grads(&mut self, _be: &B, unit: usize) -> Result<B::Buf> {
        Ok(self.grads[unit].clone())
    }
    fn forward_done(&mut self, _be: &B, _unit: usize) -> Result<()> {
        Ok(())
    }
    fn backward_done(&mut self, _be: &B, _unit: usize) -> Result<()> {
        Ok(())
    }
}

/// Named views into the `embed_head` unit (parameters or gradients: same layout).
pub struct EmbedHeadViews<B: Backend> {
    pub wte: B::Buf,
    pub wpe: B::Buf,
    pub lnf_w: B::Buf,
    pub lnf_b: B::Buf,
}

/// Named views into one block unit (parameters or gradients), in the order of
/// [`super::layout::BLOCK_TENSORS`].
pub struct BlockViews<B: Backend> {
    pub ln1_w: B::Buf,
    pub ln1_b: B::Buf,
    pub qkv_w: B::Buf,
    pub qkv_b: B::Buf,
    pub proj_w: B::Buf,
    pub proj_b: B::Buf,
    pub ln2_w: B::Buf,
    pub ln2_b: B::Buf,
    pub fc_w: B::Buf,
    pub fc_b: B::Buf,
    pub fcproj_w: B::Buf,
    pub fcproj_b: B::Buf,
}

/// The tensors of `unit` as views of its flat buffer `buf`, in layout order.
fn tensor_views<B: Backend, const N: usize>(
    be: &B,
    unit: &UnitSpec,
    buf: &B::Buf,
) -> Result<[B::Buf; N]> {
    ensure!(
        unit.tensors.len() == N && buf.len() == unit.numel,
        "unit `{}`: a buffer of {} elements does not match its layout ({} elements, {} tensors)",
        unit.name,
        buf.len(),
        unit.numel,
        unit.tensors.len()
    );
    let views = unit
        .tensors
        .iter()
        .map(|t| be.slice(buf, t.offset, t.numel()))
        .collect::<Result<Vec<_>>>()?;
    Ok(views
        .try_into()
        .unwrap_or_else(|_| unreachable!("the length was checked above")))
}

impl<B: Backend> EmbedHeadViews<B> {
    pub fn new(be: &B, layout: &ParamLayout, buf: &B::Buf) -> Result<Self> {
        let unit = &layout.units[ParamLayout::EMBED_HEAD_UNIT];
        let [wte, wpe, lnf_w, lnf_b] = tensor_views(be, unit, buf)?;
        Ok(EmbedHeadViews {
            wte,
            wpe,
            lnf_w,
            lnf_b,
        })
    }
}

impl<B: Backend> BlockViews<B> {
    /// Views of block `l` (order: [`BLOCK_TENSORS`]).
    pub fn new(be: &B, layout: &ParamLayout, l: usize, buf: &B::Buf) -> Result<Self> {
        let unit = &layout.units[ParamLayout::block_unit(l)];
        let [ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, fcproj_w, fcproj_b] =
            tensor_views(be, unit, buf)?;
        Ok(BlockViews {
            ln1_w,
            ln1_b,
            qkv_w,
            qkv_b,
            proj_w,
            proj_b,
            ln2_w,
            ln2_b,
            fc_w,
            fc_b,
            fcproj_w,
            fcproj_b,
        })
    }
}
