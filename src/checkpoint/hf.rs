//! Hugging Face GPT-2 interchange: [`export_hf`] writes a model's weights as a `GPT2LMHeadModel`
//! checkpoint (`model.safetensors` + `config.json`, loadable with
//! `transformers.GPT2LMHeadModel.from_pretrained(dir)`), and [`import_hf`] reads such a file (ours,
//! or a public GPT-2 checkpoint) back into the per-unit flat f32 buffers that `train::weights` and
//! the trainer use.
//!
//! The two layouts differ in three ways, all handled here:
//! - names: ours `h.{i}.attn.qkv.weight`, theirs `transformer.h.{i}.attn.c_attn.weight` (see
//!   [`hf_name`]); some public files omit the `transformer.` prefix, and import accepts both;
//! - orientation: HF's GPT-2 uses `Conv1D`, whose weight is `[in_features, out_features]`, the
//!   transpose of our PyTorch-`Linear` `[out_features, in_features]`; the four matrices of every
//!   block are transposed on the way out and back. The fused QKV needs nothing more: our qkv
//!   columns are all query heads, then all key heads, then all value heads (see
//!   [`crate::backend::AttentionShape`]), exactly HF's `c_attn(x).split(n_embd, dim=2)` followed by
//!   splitting each part into heads;
//! - the tied head: HF ties `lm_head.weight` to `transformer.wte.weight` through
//!   `tie_word_embeddings: true`, so export writes no `lm_head.weight` (safetensors cannot alias).
//!
//! The rest of the model already matches GPT-2: pre-LayerNorm blocks with eps 1e-5, tanh-approximated
//! GELU (`gelu_new`), attention scaled by `1/√head_dim`, learned positions.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::model::layout::{ParamLayout, TensorSpec};

/// File name of the weights inside an exported directory.
pub const HF_WEIGHTS_FILE: &str = "model.safetensors";
/// File name of the model config inside an exported directory.
pub const HF_CONFIG_FILE: &str = "config.json";
/// The prefix `GPT2LMHeadModel` puts before every tensor of its `GPT2Model`.
const PREFIX: &str = "transformer.";
/// GPT-2's `<|endoftext|>`, its BOS and EOS token.
const GPT2_EOT: usize = 50256;

/// Our name of a tensor -> its `GPT2Model` name (without the `transformer.` prefix) and whether the
/// values are stored transposed there (the `Conv1D` weights).
fn hf_name(ours: &str) -> Result<(String, bool)> {
    let root = match ours {
        "wte" => Some("wte.weight"),
        "wpe" => Some("wpe.weight"),
        "lnf.weight" => Some("ln_f.weight"),
        "lnf.bias" => Some("ln_f.bias"),
        _ => None,
    };
    if let Some(name) = root {
        return Ok((name.to_string(), false));
    }
    let block = ours
        .strip_prefix("h.")
        .and_then(|rest| rest.split_once('.'));
    let Some((index, suffix)) = block else {
        bail!("tensor `{ours}` has no Hugging Face GPT-2 name");
    };
    let (theirs, transposed) = match suffix {
        "ln1.weight" => ("ln_1.weight", false),
        "ln1.bias" => ("ln_1.bias", false),
        "attn.qkv.weight" => ("attn.c_attn.weight", true),
        "attn.qkv.bias" => ("attn.c_attn.bias", false),
        "attn.proj.weight" => ("attn.c_proj.weight", true),
        "attn.proj.bias" => ("attn.c_proj.bias", false),
        "ln2.weight" => ("ln_2.weight", false),
        "ln2.bias" => ("ln_2.bias", false),
        "mlp.fc.weight" => ("mlp.c_fc.weight", true),
        "mlp.fc.bias" => ("mlp.c_fc.bias", false),
        "mlp.proj.weight" => ("mlp.c_proj.weight", true),
        "mlp.proj.bias" => ("mlp.c_proj.bias", false),
        _ => bail!("tensor `{ours}` has no Hugging Face GPT-2 name"),
    };
    Ok((format!("h.{index}.{theirs}"), transposed))
}

/// A tensor's HF shape in symbols of the model's sizes, for error messages (`[C, 3C]`).
fn symbolic_shape(hf: &str) -> &'static str {
    let name = hf.strip_prefix(PREFIX).unwrap_or(hf);
    let suffix = match name
        .strip_prefix("h.")
        .and_then(|rest| rest.split_once('.'))
    {
        Some((_, suffix)) => suffix,
        None => name,
    };
    match suffix {
        "wte.weight" => "[V, C]",
        "wpe.weight" => "[block_size, C]",
        "attn.c_attn.weight" => "[C, 3C]",
        "attn.c_attn.bias" => "[3C]",
        "attn.c_proj.weight" => "[C, C]",
        "mlp.c_fc.weight" => "[C, 4C]",
        "mlp.c_fc.bias" => "[4C]",
        "mlp.c_proj.weight" => "[4C, C]",
        _ => "[C]",
    }
}

/// `values` (row-major `[rows, cols]`) transposed to `[cols, rows]`.
fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for (r, row) in values.chunks_exact(cols).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            out[c * rows + r] = v;
        }
    }
    out
}

/// The `config.json` of `GPT2LMHeadModel` for `layout`.
fn hf_config(layout: &ParamLayout) -> serde_json::Value {
    let s = layout.shape;
    let mut config = serde_json::json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": s.vocab_size,
        "n_positions": s.block_size,
        "n_ctx": s.block_size,
        "n_embd": s.d_model,
        "n_layer": s.n_layer,
        "n_head": s.n_head,
        "n_inner": null,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": true,
        "torch_dtype": "float32",
    });
    // Token 50256 is GPT-2's <|endoftext|> only when the vocabulary is GPT-2's (maybe padded);
    // a smaller vocabulary (the bytes tokenizer) has no such token.
    if s.vocab_size > GPT2_EOT {
        config["bos_token_id"] = GPT2_EOT.into();
        config["eos_token_id"] = GPT2_EOT.into();
    }
    config
}

/// Writes `dir/model.safetensors` (HF GPT-2 layout, F32) and `dir/config.json` for `layout` with
/// weights `units` (per-unit flat f32, as `train::weights` uses), creating `dir` if missing.
///
/// Never overwrites: fails, writing nothing, if `dir` already holds a `model.safetensors` or a
/// `config.json`. Each file is written beside its final name (`*.partial`) and then renamed,
/// `config.json` first, so an existing `model.safetensors` always belongs to a complete export.
pub fn export_hf(dir: &Path, layout: &ParamLayout, units: &[Vec<f32>]) -> Result<()> {
    ensure!(
        units.len() == layout.units.len(),
        "exporting: got {} weight units, the layout has {}",
        units.len(),
        layout.units.len()
    );
    for (values, spec) in units.iter().zip(&layout.units) {
        ensure!(
            values.len() == spec.numel,
            "exporting: unit `{}` has {} values, the layout needs {}",
            spec.name,
            values.len(),
            spec.numel
        );
    }
    let weights_path = dir.join(HF_WEIGHTS_FILE);
    let config_path = dir.join(HF_CONFIG_FILE);
    for path in [&weights_path, &config_path] {
        if path.exists() {
            bail!(
                "{} already exists: refusing to overwrite it (export into a new or empty directory)",
                path.display()
            );
        }
    }

    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (u, t) in layout.tensors() {
        let (name, transposed) = hf_name(&t.name)?;
        let values = &units[u][t.offset..t.offset + t.numel()];
        let (shape, bytes) = if transposed {
            let [rows, cols] = t.shape[..] else {
                bail!("tensor `{}` is not a matrix: {:?}", t.name, t.shape);
            };
            let values = transpose(values, rows, cols);
            (vec![cols, rows], le_bytes(&values))
        } else {
            (t.shape.clone(), le_bytes(values))
        };
        tensors.push((format!("{PREFIX}{name}"), shape, bytes));
    }
    let views = tensors
        .iter()
        .map(|(name, shape, data)| {
            Ok((
                name.as_str(),
                TensorView::new(Dtype::F32, shape.clone(), data)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;

    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let weights_tmp = dir.join(format!("{HF_WEIGHTS_FILE}.partial"));
    let config_tmp = dir.join(format!("{HF_CONFIG_FILE}.partial"));
    // transformers checks this key when it loads a safetensors file.
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), &weights_tmp)
        .with_context(|| format!("writing {}", weights_tmp.display()))?;
    let mut config = serde_json::to_string_pretty(&hf_config(layout))?;
    config.push('\n');
    std::fs::write(&config_tmp, config)
        .with_context(|| format!("writing {}", config_tmp.display()))?;
    for (tmp, path) in [(&config_tmp, &config_path), (&weights_tmp, &weights_path)] {
        std::fs::rename(tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    }
    Ok(())
}

fn le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A tensor's values as f32, from F32, F16 or BF16 (little-endian, as safetensors stores them).
fn to_f32(file: &Path, name: &str, view: &TensorView<'_>) -> Result<Vec<f32>> {
    let data = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => bail!(
            "{}: tensor `{name}` is {other:?}; only F32, F16 and BF16 can be imported",
            file.display()
        ),
    })
}

/// If a `config.json` sits beside the weights, checks what the tensor shapes cannot show: the
/// number of heads (any `n_head` dividing C gives the same shapes) and the activation.
fn check_config_beside(path: &Path, layout: &ParamLayout) -> Result<()> {
    let config_path = path.with_file_name(HF_CONFIG_FILE);
    if !config_path.is_file() {
        return Ok(());
    }
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let config: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
    if let Some(n_head) = config.get("n_head").and_then(|v| v.as_u64()) {
        ensure!(
            n_head as usize == layout.shape.n_head,
            "{}: n_head is {n_head}, this model has {} heads",
            config_path.display(),
            layout.shape.n_head
        );
    }
    if let Some(act) = config.get("activation_function").and_then(|v| v.as_str()) {
        // Both names are GELU's tanh approximation, which is what this model computes.
        ensure!(
            matches!(act, "gelu_new" | "gelu_pytorch_tanh"),
            "{}: activation_function is {act:?}, this model computes gelu_new (tanh approximation)",
            config_path.display()
        );
    }
    Ok(())
}

/// Reads an HF GPT-2 safetensors file (ours, or a public GPT-2 checkpoint in that layout) into
/// per-unit flat f32 buffers for `layout`.
///
/// - Tensor names may carry the `transformer.` prefix of `GPT2LMHeadModel` or not (`GPT2Model`
///   files, such as the public `gpt2` checkpoint, have none).
/// - F32, F16 and BF16 tensors are accepted and widened to f32.
/// - The attention-mask buffers `h.{i}.attn.bias` / `h.{i}.attn.masked_bias` are ignored (they are
///   constants, not weights). `lm_head.weight`, if present, must equal `wte` byte for byte: the head
///   is tied to `wte` here, so an untied head could not be represented.
/// - `wte` may have fewer rows than the model's `vocab_size` (public GPT-2: 50257; a padded table:
///   50304): the extra rows are zeros. They are never looked up as inputs, since GPT-2-tokenized
///   data has no such ids, but through the tied head each padded id gets the logit 0 exactly; a
///   caller that softmaxes over the whole padded vocabulary (loss, sampling) should mask ids beyond
///   the tokenizer's, as llm.c does, or import into a model whose `vocab_size` is the file's. More
///   rows than `vocab_size` is an error.
/// - `wpe` must have at least `block_size` rows; only the first `block_size` are used (a model
///   trained on longer contexts works unchanged on shorter ones).
/// - Every other tensor must be present with exactly its shape, and the file must hold no tensor
///   the model lacks (a deeper model, an untied or extra layer): errors name the file and tensor.
/// - If a `config.json` lies beside the file, its `n_head` and `activation_function` must match,
///   the two things the tensor shapes cannot check.
pub fn import_hf(path: &Path, layout: &ParamLayout) -> Result<Vec<Vec<f32>>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let file = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let file_name = path.display();
    let prefix = if file.tensor(&format!("{PREFIX}wte.weight")).is_ok() {
        PREFIX
    } else if file.tensor("wte.weight").is_ok() {
        ""
    } else {
        bail!(
            "{file_name}: tensor `{PREFIX}wte.weight` is missing (nor is there a `wte.weight`): \
             not a GPT-2 checkpoint"
        );
    };
    check_config_beside(path, layout)?;

    let s = layout.shape;
    let c = s.d_model;
    let mut units: Vec<Vec<f32>> = layout.units.iter().map(|u| vec![0.0; u.numel]).collect();
    let mut used: BTreeSet<String> = BTreeSet::new();
    for (u, t) in layout.tensors() {
        let (name, transposed) = hf_name(&t.name)?;
        let name = format!("{prefix}{name}");
        let view = file
            .tensor(&name)
            .map_err(|_| anyhow::anyhow!("{file_name}: tensor `{name}` is missing"))?;
        let values = read_tensor(path, &name, &view, t, transposed, s.vocab_size, c)?;
        units[u][t.offset..t.offset + values.len()].copy_from_slice(&values);
        used.insert(name);
    }

    let head = "lm_head.weight";
    if let Ok(lm_head) = file.tensor(head) {
        let wte = file.tensor(&format!("{prefix}wte.weight"))?;
        ensure!(
            lm_head.dtype() == wte.dtype()
                && lm_head.shape() == wte.shape()
                && lm_head.data() == wte.data(),
            "{file_name}: tensor `{head}` differs from `{prefix}wte.weight`: this model ties its \
             head to the token embedding and cannot import an untied head"
        );
    }
    let unknown: Vec<&str> = file
        .names()
        .into_iter()
        .filter(|n| !used.contains(*n) && *n != head)
        .filter(|n| !(n.ends_with(".attn.bias") || n.ends_with(".attn.masked_bias")))
        .collect();
    if let Some(first) = unknown.iter().min() {
        bail!(
            "{file_name}: tensor `{first}` is not part of this model (n_layer {}, d_model {c}){}",
            s.n_layer,
            if unknown.len() > 1 {
                format!(", nor are {} other tensors", unknown.len() - 1)
            } else {
                String::new()
            }
        );
    }
    Ok(units)
}

/// One tensor of `file`, shape-checked, converted to f32 and to our layout (transposed, `wte`
/// padded, `wpe` cut); returns `t.numel()` values.
fn read_tensor(
    file: &Path,
    name: &str,
    view: &TensorView<'_>,
    t: &TensorSpec,
    transposed: bool,
    vocab: usize,
    c: usize,
) -> Result<Vec<f32>> {
    let file_name = file.display();
    let got = view.shape();
    let symbolic = symbolic_shape(name);
    let wrong_shape = |want: &[usize]| {
        anyhow::anyhow!(
            "{file_name}: tensor `{name}` has shape {got:?}, this model needs {symbolic} = {want:?}"
        )
    };
    if t.name == "wte" || t.name == "wpe" {
        let rows = t.shape[0];
        let [file_rows, cols] = got[..] else {
            return Err(wrong_shape(&t.shape));
        };
        if cols != c {
            return Err(wrong_shape(&t.shape));
        }
        if t.name == "wte" {
            ensure!(
                file_rows <= vocab,
                "{file_name}: tensor `{name}` has {file_rows} rows (tokens), more than this \
                 model's vocab_size {vocab}"
            );
        } else {
            ensure!(
                file_rows >= rows,
                "{file_name}: tensor `{name}` has {file_rows} rows (positions), fewer than this \
                 model's block_size {rows}"
            );
        }
        let mut values = to_f32(file, name, view)?;
        // wte: zero rows up to vocab_size; wpe: the first block_size positions.
        values.resize(rows * c, 0.0);
        return Ok(values);
    }
    let want: Vec<usize> = if transposed {
        t.shape.iter().rev().copied().collect()
    } else {
        t.shape.clone()
    };
    if got != want.as_slice() {
        return Err(wrong_shape(&want));
    }
    let values = to_f32(file, name, view)?;
    Ok(if transposed {
        transpose(&values, want[0], want[1])
    } else {
        values
    })
}
