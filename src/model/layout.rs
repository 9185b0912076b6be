//! Where every parameter lives: the model's weights grouped into units (the granularity at which
//! the sharding layer gathers and frees them), each unit one flat buffer of named tensors.
//!
//! Units, in forward order of first use:
//! - `embed_head`: `wte (V, C)`, `wpe (block_size, C)`, `lnf.weight (C)`, `lnf.bias (C)`; the LM head
//!   is tied to `wte`, so the embedding and the head share this unit;
//! - `h.{l}` for each block: twelve tensors, see [`BLOCK_TENSORS`].

use serde::Serialize;

/// How a tensor's initial values are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Init {
    Normal { std: f32 },
    Zeros,
    Ones,
}

/// One named tensor inside a unit's flat buffer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TensorSpec {
    /// Full name, e.g. `h.3.attn.qkv.weight`.
    pub name: String,
    pub shape: Vec<usize>,
    /// Element offset inside the unit's flat buffer.
    pub offset: usize,
    /// AdamW weight decay applies (matrices and embeddings; never norms or biases).
    pub decay: bool,
    pub init: Init,
}

impl TensorSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// One unit: its tensors packed back to back.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UnitSpec {
    pub name: String,
    pub tensors: Vec<TensorSpec>,
    /// Elements in the flat buffer (sum of the tensors' sizes).
    pub numel: usize,
}

/// The sizes that fix the parameter layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct GptShape {
    pub n_layer: usize,
    pub n_head: usize,
    pub d_model: usize,
    pub vocab_size: usize,
    /// Rows of the position table (the longest sequence the model accepts).
    pub block_size: usize,
}

/// Per-block tensors in buffer order: name suffix, shape in units of C, and whether it decays.
/// Shapes are `[out_features, in_features]` for linear weights (PyTorch's layout).
pub const BLOCK_TENSORS: [&str; 12] = [
    "ln1.weight",
    "ln1.bias",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "ln2.weight",
    "ln2.bias",
    "mlp.fc.weight",
    "mlp.fc.bias",
    "mlp.proj.weight",
    "mlp.proj.bias",
];

/// All units of the model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ParamLayout {
    pub shape: GptShape,
    pub units: Vec<UnitSpec>,
}

struct UnitBuilder {
    name: String,
    tensors: Vec<TensorSpec>,
    numel: usize,
}

impl UnitBuilder {
    fn new(name: String) -> Self {
        UnitBuilder {
            name,
            tensors: Vec::new(),
            numel: 0,
        }
    }

    fn push(&mut self, name: String, shape: Vec<usize>, init: Init) {
        // Matrices (2-D) decay; vectors (norm gains, biases) do not.
        let decay = shape.len() == 2;
        let t = TensorSpec {
            name,
            shape,
            offset: self.numel,
            decay,
            init,
        };
        self.numel += t.numel();
        self.tensors.push(t);
    }

    fn build(self) -> UnitSpec {
        UnitSpec {
            name: self.name,
            tensors: self.tensors,
            numel: self.numel,
        }
    }
}

impl ParamLayout {
    /// GPT-2's layout and initialisation: weights N(0, init_std), the two residual projections of
    /// each block scaled by 1/√(2·n_layer), biases zero, norm gains one.
    pub fn gpt(shape: GptShape, init_std: f32) -> ParamLayout {
        let GptShape {
            n_layer,
            d_model: c,
            vocab_size: v,
            block_size,
            ..
        } = shape;
        let weight = Init::Normal { std: init_std };
        let residual = Init::Normal {
            std: init_std / (2.0 * n_layer as f32).sqrt(),
        };
        let mut units = Vec::with_capacity(n_layer + 1);

        let mut root = UnitBuilder::new("embed_head".into());
        root.push("wte".into(), vec![v, c], weight);
        root.push("wpe".into(), vec![block_size, c], weight);
        root.push("lnf.weight".into(), vec![c], Init::Ones);
        root.push("lnf.bias".into(), vec![c], Init::Zeros);
        units.push(root.build());

        for l in 0..n_layer {
            let mut u = UnitBuilder::new(format!("h.{l}"));
            let shapes: [(Vec<usize>, Init); 12] = [
                (vec![c], Init::Ones),
                (vec![c], Init::Zeros),
                (vec![3 * c, c], weight),
                (vec![3 * c], Init::Zeros),
                (vec![c, c], residual),
                (vec![c], Init::Zeros),
                (vec![c], Init::Ones),
                (vec![c], Init::Zeros),
                (vec![4 * c, c], weight),
                (vec![4 * c], Init::Zeros),
                (vec![c, 4 * c], residual),
                (vec![c], Init::Zeros),
            ];
            for (suffix, (shape, init)) in BLOCK_TENSORS.iter().zip(shapes) {
                u.push(format!("h.{l}.{suffix}"), shape, init);
            }
            units.push(u.build());
        }
        ParamLayout { shape, units }
    }

    /// Total number of parameters.
    pub fn numel(&self) -> usize {
        self.units.iter().map(|u| u.numel).sum()
    }

    /// Index of the unit holding block `l`.
    pub fn block_unit(l: usize) -> usize {
        l + 1
    }

    /// Index of the embedding / final-norm / tied-head unit.
    pub const EMBED_HEAD_UNIT: usize = 0;

    /// Every tensor with its unit index, in layout order.
    pub fn tensors(&self) -> impl Iterator<Item = (usize, &TensorSpec)> {
        self.units
            .iter()
            .enumerate()
            .flat_map(|(u, unit)| unit.tensors.iter().map(move |t| (u, t)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_small_has_124m_parameters() {
        let layout = ParamLayout::gpt(
            GptShape {
                n_layer: 12,
                n_head: 12,
                d_model: 768,
                vocab_size: 50257,
                block_size: 1024,
            },
            0.02,
        );
        // The published GPT-2 small count (tied head).
        assert_eq!(layout.numel(), 124_439_808);
        assert_eq!(layout.units.len(), 13);
        let decayed: Vec<_> = layout.tensors().filter(|(_, t)| t.decay).collect();
        assert_eq!(decayed.len(), 2 + 12 * 4);
    }

    #[test]
    fn tensors_tile_each_unit() {
        let layout = ParamLayout::gpt(
            GptShape {
                n_layer: 2,
                n_head: 2,
                d_model: 8,
                vocab_size: 11,
                block_size: 5,
            },
            0.02,
        );
        for unit in &layout.units {
            let mut next = 0;
            for t in &unit.tensors {
                assert_eq!(t.offset, next);
                next += t.numel();
            }
            assert_eq!(next, unit.numel);
        }
    }
}
