//! The model's weights as one safetensors file, tensors named as in the parameter layout (f32).
//! Written at the end of a run so `shardtrain sample` can load them; sharded checkpoints with
//! optimizer state are a separate, later format.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::model::ParamLayout;

/// Writes each unit's f32 values (`units[u]` is unit `u`'s flat buffer) under the tensor names.
/// The file appears complete or not at all (written beside, then renamed).
pub fn save(path: &Path, layout: &ParamLayout, units: &[Vec<f32>]) -> Result<()> {
    let mut bytes: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (u, t) in layout.tensors() {
        let values = &units[u][t.offset..t.offset + t.numel()];
        bytes.push((
            t.name.clone(),
            t.shape.clone(),
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ));
    }
    let views = bytes
        .iter()
        .map(|(name, shape, data)| {
            Ok((
                name.clone(),
                TensorView::new(Dtype::F32, shape.clone(), data)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let tmp = path.with_extension("safetensors.partial");
    let metadata = HashMap::from([("format".to_string(), "shardtrain-gpt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), &tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// Reads a file written by [`save`] into per-unit flat buffers, checking every tensor's presence,
/// dtype and shape against `layout`.
pub fn load(path: &Path, layout: &ParamLayout) -> Result<Vec<Vec<f32>>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let file = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
    let mut units: Vec<Vec<f32>> = layout.units.iter().map(|u| vec![0.0; u.numel]).collect();
    for (u, t) in layout.tensors() {
        let view = file
            .tensor(&t.name)
            .with_context(|| format!("{}: tensor `{}` is missing", path.display(), t.name))?;
        if view.dtype() != Dtype::F32 || view.shape() != t.shape.as_slice() {
            bail!(
                "{}: tensor `{}` is {:?} {:?}, the model needs F32 {:?}",
                path.display(),
                t.name,
                view.dtype(),
                view.shape(),
                t.shape
            );
        }
        let dst = &mut units[u][t.offset..t.offset + t.numel()];
        for (d, chunk) in dst.iter_mut().zip(view.data().chunks_exact(4)) {
            *d = f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
    }
    Ok(units)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::GptShape;

    fn layout() -> ParamLayout {
        let shape = GptShape {
            n_layer: 1,
            n_head: 2,
            d_model: 4,
            vocab_size: 7,
            block_size: 3,
        };
        ParamLayout::gpt(shape, 0.02)
    }

    #[test]
    fn round_trips_and_rejects_another_shape() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let l = layout();
        let units: Vec<Vec<f32>> = l
            .units
            .iter()
            .map(|u| (0..u.numel).map(|i| i as f32 * 0.5 - 3.0).collect())
            .collect();
        save(&path, &l, &units).unwrap();
        assert_eq!(load(&path, &l).unwrap(), units);

        let mut other = l.shape;
        other.d_model = 8;
        let err = load(&path, &ParamLayout::gpt(other, 0.02)).unwrap_err();
        assert!(format!("{err:#}").contains("wte"), "{err:#}");
    }
}
