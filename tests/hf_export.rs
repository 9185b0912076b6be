//! Hugging Face GPT-2 export and import (`checkpoint::hf`): exact round trips, HF's names and
//! `Conv1D` orientation, an independent HF-convention forward pass agreeing with our model, and
//! every rejection import promises (vocab, positions, missing/extra/misshapen tensors, bad files).

use std::path::Path;

use half::{bf16, f16};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use shardtrain::backend::cpu::CpuBackend;
use shardtrain::backend::{Backend, DType};
use shardtrain::checkpoint::hf::{export_hf, import_hf};
use shardtrain::model::{Gpt, GptShape, ParamLayout, ResidentParams};
use shardtrain::train::initial_weights;

const SHAPE: GptShape = GptShape {
    n_layer: 2,
    n_head: 2,
    d_model: 16,
    vocab_size: 37,
    block_size: 12,
};

fn layout(shape: GptShape) -> ParamLayout {
    ParamLayout::gpt(shape, 0.02)
}

/// Every value random (biases and norm gains too, unlike the initial weights), so a tensor put in
/// the wrong place or orientation changes the logits.
fn random_weights(layout: &ParamLayout, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    layout
        .units
        .iter()
        .map(|u| {
            (0..u.numel)
                .map(|_| rng.random_range(-0.3f32..0.3))
                .collect()
        })
        .collect()
}

/// Our values of tensor `name`.
fn ours<'a>(layout: &ParamLayout, units: &'a [Vec<f32>], name: &str) -> &'a [f32] {
    let (u, t) = layout
        .tensors()
        .find(|(_, t)| t.name == name)
        .unwrap_or_else(|| panic!("no tensor {name}"));
    &units[u][t.offset..t.offset + t.numel()]
}

/// One tensor of a safetensors file, owned.
#[derive(Clone)]
struct Tensor {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl Tensor {
    fn f32s(&self) -> Vec<f32> {
        assert_eq!(self.dtype, Dtype::F32, "{}", self.name);
        self.data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
}

fn read_all(path: &Path) -> Vec<Tensor> {
    let bytes = std::fs::read(path).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<Tensor> = file
        .tensors()
        .into_iter()
        .map(|(name, v)| Tensor {
            name,
            dtype: v.dtype(),
            shape: v.shape().to_vec(),
            data: v.data().to_vec(),
        })
        .collect();
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    tensors
}

fn write_all(path: &Path, tensors: &[Tensor]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|t| {
            let view = TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap();
            (t.name.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn get<'a>(tensors: &'a [Tensor], name: &str) -> &'a Tensor {
    tensors
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no tensor {name}"))
}

/// Exports `units` into a fresh directory under `root`; returns the weights file.
fn export(root: &Path, sub: &str, layout: &ParamLayout, units: &[Vec<f32>]) -> std::path::PathBuf {
    let dir = root.join(sub);
    export_hf(&dir, layout, units).unwrap();
    dir.join("model.safetensors")
}

fn import_err(path: &Path, layout: &ParamLayout) -> String {
    format!("{:#}", import_hf(path, layout).unwrap_err())
}

/// Logits `[ids.len(), V]` of our model, computed as `shardtrain sample` does.
fn our_logits(layout: &ParamLayout, units: &[Vec<f32>], ids: &[u32]) -> Vec<f32> {
    let be = CpuBackend::<f32>::new();
    let mut params = ResidentParams::alloc(&be, layout, DType::F32).unwrap();
    for (buf, values) in params.params.iter().zip(units) {
        be.upload(buf, values).unwrap();
    }
    let mut model = Gpt::new(layout.clone(), DType::F32);
    let seq = ids.len();
    let ids_buf = be.upload_ids(ids).unwrap();
    model
        .forward(&be, &mut params, &ids_buf, None, None, 1, seq)
        .unwrap();
    let logits = &model.activations().unwrap().logits;
    be.download(&be.slice(logits, 0, seq * layout.shape.vocab_size).unwrap())
        .unwrap()
}

#[test]
fn round_trip_is_bit_identical_and_config_describes_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let l = layout(SHAPE);
    let units = initial_weights(&l, 7);
    // Nested and missing: export creates it.
    let path = export(dir.path(), "a/b", &l, &units);
    let back = import_hf(&path, &l).unwrap();
    assert_eq!(back.len(), units.len());
    for (a, b) in back.iter().zip(&units) {
        let (a, b): (Vec<u32>, Vec<u32>) = (
            a.iter().map(|v| v.to_bits()).collect(),
            b.iter().map(|v| v.to_bits()).collect(),
        );
        assert_eq!(a, b);
    }

    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("a/b/config.json")).unwrap())
            .unwrap();
    assert_eq!(config["n_embd"], 16);
    assert_eq!(config["n_layer"], 2);
    assert_eq!(config["n_head"], 2);
    assert_eq!(config["vocab_size"], 37);
    assert_eq!(config["n_positions"], 12);
    assert_eq!(config["n_ctx"], 12);
    assert_eq!(config["tie_word_embeddings"], true);
    assert_eq!(config["model_type"], "gpt2");
    assert_eq!(config["architectures"][0], "GPT2LMHeadModel");
    assert_eq!(config["activation_function"], "gelu_new");
    assert!(config["n_inner"].is_null());
    // A 37-token vocabulary is not GPT-2's: no <|endoftext|> id.
    assert!(config.get("eos_token_id").is_none());
    assert!(config.get("bos_token_id").is_none());
    // No partial files left behind.
    let mut names: Vec<String> = std::fs::read_dir(dir.path().join("a/b"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["config.json", "model.safetensors"]);
}

#[test]
fn gpt2_sized_vocab_gets_eos_and_bos() {
    let dir = tempfile::tempdir().unwrap();
    let shape = GptShape {
        n_layer: 1,
        n_head: 1,
        d_model: 4,
        vocab_size: 50304,
        block_size: 4,
    };
    let l = layout(shape);
    let units: Vec<Vec<f32>> = l.units.iter().map(|u| vec![0.0; u.numel]).collect();
    export_hf(dir.path(), &l, &units).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["eos_token_id"], 50256);
    assert_eq!(config["bos_token_id"], 50256);
    assert_eq!(config["vocab_size"], 50304);
}

#[test]
fn imported_weights_give_identical_logits() {
    let dir = tempfile::tempdir().unwrap();
    let l = layout(SHAPE);
    let units = random_weights(&l, 3);
    let path = export(dir.path(), "out", &l, &units);
    let back = import_hf(&path, &l).unwrap();
    let ids = [3, 36, 0, 17, 17, 5, 29];
    let a = our_logits(&l, &units, &ids);
    let b = our_logits(&l, &back, &ids);
    assert_eq!(a.len(), ids.len() * SHAPE.vocab_size);
    assert!(a.iter().all(|v| v.is_finite()));
    assert_eq!(a, b);
}

#[test]
fn export_uses_hf_names_and_conv1d_orientation() {
    let dir = tempfile::tempdir().unwrap();
    let l = layout(SHAPE);
    let units = random_weights(&l, 5);
    let path = export(dir.path(), "out", &l, &units);

    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let format = meta.metadata().as_ref().and_then(|m| m.get("format"));
    assert_eq!(format.map(String::as_str), Some("pt"));

    let tensors = read_all(&path);
    let c = SHAPE.d_model;
    let mut expected = vec![
        "transformer.wte.weight".to_string(),
        "transformer.wpe.weight".into(),
        "transformer.ln_f.weight".into(),
        "transformer.ln_f.bias".into(),
    ];
    for i in 0..SHAPE.n_layer {
        for s in [
            "ln_1.weight",
            "ln_1.bias",
            "attn.c_attn.weight",
            "attn.c_attn.bias",
            "attn.c_proj.weight",
            "attn.c_proj.bias",
            "ln_2.weight",
            "ln_2.bias",
            "mlp.c_fc.weight",
            "mlp.c_fc.bias",
            "mlp.c_proj.weight",
            "mlp.c_proj.bias",
        ] {
            expected.push(format!("transformer.h.{i}.{s}"));
        }
    }
    expected.sort();
    let names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names, expected,
        "exactly GPT-2's tensors: no lm_head.weight"
    );
    assert!(tensors.iter().all(|t| t.dtype == Dtype::F32));

    let wte = get(&tensors, "transformer.wte.weight");
    assert_eq!(wte.shape, [SHAPE.vocab_size, c]);
    assert_eq!(wte.f32s(), ours(&l, &units, "wte"));
    assert_eq!(
        get(&tensors, "transformer.wpe.weight").shape,
        [SHAPE.block_size, c]
    );

    // Conv1D weights are [in, out]: element [i][j] is our [out = j][in = i].
    for (theirs, our, (inp, out)) in [
        ("attn.c_attn.weight", "attn.qkv.weight", (c, 3 * c)),
        ("attn.c_proj.weight", "attn.proj.weight", (c, c)),
        ("mlp.c_fc.weight", "mlp.fc.weight", (c, 4 * c)),
        ("mlp.c_proj.weight", "mlp.proj.weight", (4 * c, c)),
    ] {
        let t = get(&tensors, &format!("transformer.h.1.{theirs}"));
        assert_eq!(t.shape, [inp, out], "{theirs}");
        let hf = t.f32s();
        let ours = ours(&l, &units, &format!("h.1.{our}"));
        for i in 0..inp {
            for j in 0..out {
                assert_eq!(hf[i * out + j], ours[j * inp + i], "{theirs}[{i}][{j}]");
            }
        }
    }
    let bias = get(&tensors, "transformer.h.0.attn.c_attn.bias");
    assert_eq!(bias.shape, [3 * c]);
    assert_eq!(bias.f32s(), ours(&l, &units, "h.0.attn.qkv.bias"));
}

/// GPT-2's forward pass written from Hugging Face's `modeling_gpt2.py`, reading the exported file
/// by HF names (`Conv1D`: `y = x · W + b` with `W [in, out]`; `c_attn` split into q, k, v of C
/// columns each, then into heads), in f64.
fn hf_reference_logits(path: &Path, shape: GptShape, ids: &[u32]) -> Vec<f64> {
    let tensors = read_all(path);
    let w = |name: &str| -> Vec<f64> {
        get(&tensors, &format!("transformer.{name}"))
            .f32s()
            .iter()
            .map(|&v| f64::from(v))
            .collect()
    };
    let (c, t_len, nh) = (shape.d_model, ids.len(), shape.n_head);
    let hd = c / nh;
    let conv1d = |x: &[f64], wt: &[f64], b: &[f64], inp: usize, out: usize| -> Vec<f64> {
        let mut y = vec![0.0; t_len * out];
        for t in 0..t_len {
            for j in 0..out {
                let mut acc = b[j];
                for i in 0..inp {
                    acc += x[t * inp + i] * wt[i * out + j];
                }
                y[t * out + j] = acc;
            }
        }
        y
    };
    let layernorm = |x: &[f64], g: &[f64], b: &[f64]| -> Vec<f64> {
        let mut y = vec![0.0; x.len()];
        for t in 0..t_len {
            let row = &x[t * c..(t + 1) * c];
            let mean = row.iter().sum::<f64>() / c as f64;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / c as f64;
            let rstd = 1.0 / (var + 1e-5).sqrt();
            for i in 0..c {
                y[t * c + i] = (row[i] - mean) * rstd * g[i] + b[i];
            }
        }
        y
    };
    let gelu_new = |x: f64| {
        0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
    };

    let (wte, wpe) = (w("wte.weight"), w("wpe.weight"));
    let mut h = vec![0.0; t_len * c];
    for (t, &id) in ids.iter().enumerate() {
        for i in 0..c {
            h[t * c + i] = wte[id as usize * c + i] + wpe[t * c + i];
        }
    }
    for l in 0..shape.n_layer {
        let p = |s: &str| w(&format!("h.{l}.{s}"));
        let a = layernorm(&h, &p("ln_1.weight"), &p("ln_1.bias"));
        let qkv = conv1d(
            &a,
            &p("attn.c_attn.weight"),
            &p("attn.c_attn.bias"),
            c,
            3 * c,
        );
        let mut merged = vec![0.0; t_len * c];
        for head in 0..nh {
            let q = |t: usize, d: usize| qkv[t * 3 * c + head * hd + d];
            let k = |t: usize, d: usize| qkv[t * 3 * c + c + head * hd + d];
            let v = |t: usize, d: usize| qkv[t * 3 * c + 2 * c + head * hd + d];
            for t in 0..t_len {
                let scores: Vec<f64> = (0..=t)
                    .map(|s| (0..hd).map(|d| q(t, d) * k(s, d)).sum::<f64>() / (hd as f64).sqrt())
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..hd {
                    merged[t * c + head * hd + d] =
                        (0..=t).map(|s| e[s] / z * v(s, d)).sum::<f64>();
                }
            }
        }
        let attn = conv1d(
            &merged,
            &p("attn.c_proj.weight"),
            &p("attn.c_proj.bias"),
            c,
            c,
        );
        h.iter_mut().zip(&attn).for_each(|(x, a)| *x += a);
        let m = layernorm(&h, &p("ln_2.weight"), &p("ln_2.bias"));
        let fc: Vec<f64> = conv1d(&m, &p("mlp.c_fc.weight"), &p("mlp.c_fc.bias"), c, 4 * c)
            .into_iter()
            .map(gelu_new)
            .collect();
        let mlp = conv1d(
            &fc,
            &p("mlp.c_proj.weight"),
            &p("mlp.c_proj.bias"),
            4 * c,
            c,
        );
        h.iter_mut().zip(&mlp).for_each(|(x, a)| *x += a);
    }
    let h = layernorm(&h, &w("ln_f.weight"), &w("ln_f.bias"));
    // The tied head: logits = h · wteᵀ.
    let v = shape.vocab_size;
    let mut logits = vec![0.0; t_len * v];
    for t in 0..t_len {
        for tok in 0..v {
            logits[t * v + tok] = (0..c).map(|i| h[t * c + i] * wte[tok * c + i]).sum();
        }
    }
    logits
}

#[test]
fn hf_convention_forward_on_the_export_matches_our_model() {
    let dir = tempfile::tempdir().unwrap();
    let l = layout(SHAPE);
    let units = random_weights(&l, 11);
    let path = export(dir.path(), "out", &l, &units);
    let ids = [1, 30, 4, 4, 22, 9, 36, 0, 13];
    let reference = hf_reference_logits(&path, SHAPE, &ids);
    let ours = our_logits(&l, &units, &ids);
    let scale = reference.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(scale > 0.5, "logits too small to tell anything: {scale}");
    let worst = reference
        .iter()
        .zip(&ours)
        .map(|(r, o)| (r - f64::from(*o)).abs())
        .fold(0.0, f64::max);
    assert!(
        worst < 1e-4 * scale.max(1.0),
        "max |diff| {worst} (scale {scale})"
    );
}

#[test]
fn import_pads_a_smaller_vocab_and_rejects_a_larger_one() {
    let dir = tempfile::tempdir().unwrap();
    let l = layout(SHAPE);
    let units = random_weights(&l, 2);
    let path = export(dir.path(), "out", &l, &units);

    let bigger = layout(GptShape {
        vocab_size: 40,
        ..SHAPE
    });
    let back = import_hf(&path, &bigger).unwrap();
    let wte = ours(&bigger, &back, "wte");
    let (v, c) = (SHAPE.vocab_size, SHAPE.d_model);
    assert_eq!(&wte[..v * c], ours(&l, &units, "wte"));
    assert!(wte[v * c..].iter().all(|&x| x == 0.0));
    assert_eq!(wte.len(), 40 * c);
    // Everything after wte in the unit is in its place.
    assert_eq!(ours(&bigger, &back, "wpe"), ours(&l, &units, "wpe"));
    assert_eq!(
        ours(&bigger, &back, "lnf.bias"),
        ours(&l, &units, "lnf.bias")
    );
    assert_eq!(back[1..], units[1..]);

    let smaller = layout(GptShape {
        vocab_size: 30,
        ..SHAPE
    });
    let err = import_err(&path, &smaller);
    assert!(
        err.contains("transformer.wte.weight") && err.contains("37 rows"),
        "{err}"
    );
    assert!(err.contains("vocab_size 30"), "{err}");
}

#[test]
fn import_takes_the_first_positions_and_rejects_too_few() {
    let dir = tempfile::tempdir().unwrap();
    let l = layout(SHAPE);
    let units = random_weights(&l, 4);
    let path = export(dir.path(), "out", &l, &units);

    let shorter = layout(GptShape {
        block_size: 8,
        ..SHAPE
    });
    let back = import_hf(&path, &shorter).unwrap();
    let c = SHAPE.d_model;
    assert_eq!(
        ours(&shorter, &back, "wpe"),
        &ours(&l, &units, "wpe")[..8 * c]
    );
    assert_eq!(
        ours(&shorter, &back, "lnf.weight"),
        ours(&l, &units, "lnf.weight")
    );

    let longer = layout(GptShape {
        block_size: 20,
        ..SHAPE
    });
    let err = import_err(&path, &longer);
    assert!(
        err.contains("transformer.wpe.weight") && err.contains("block_size 20"),
        "{err}"
    );
}

#[test]
fn import_rejects_missing_misshapen_and_extra_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let l = layout(SHAPE);
    let units = random_weights(&l, 6);
    let path = export(dir.path(), "out", &l, &units);
    let tensors = read_all(&path);
    let c = SHAPE.d_model;

    // Missing.
    let gone = "transformer.h.1.mlp.c_fc.bias";
    let missing: Vec<Tensor> = tensors.iter().filter(|t| t.name != gone).cloned().collect();
    let p = dir.path().join("missing.safetensors");
    write_all(&p, &missing);
    let err = import_err(&p, &l);
    assert!(err.contains(&format!("`{gone}` is missing")), "{err}");
    assert!(err.contains("missing.safetensors"), "{err}");

    // Our orientation [3C, C] where HF's [C, 3C] belongs.
    let name = "transformer.h.0.attn.c_attn.weight";
    let mut wrong = tensors.clone();
    wrong.iter_mut().find(|t| t.name == name).unwrap().shape = vec![3 * c, c];
    let p = dir.path().join("wrong.safetensors");
    write_all(&p, &wrong);
    let err = import_err(&p, &l);
    assert!(err.contains(name), "{err}");
    assert!(
        err.contains("[48, 16]") && err.contains("[C, 3C] = [16, 48]"),
        "{err}"
    );

    // A model with more layers than ours.
    let deeper = layout(GptShape {
        n_layer: 3,
        ..SHAPE
    });
    let deep_path = export(dir.path(), "deep", &deeper, &random_weights(&deeper, 1));
    let err = import_err(&deep_path, &l);
    assert!(
        err.contains("transformer.h.2.") && err.contains("not part of this model"),
        "{err}"
    );

    // A wider model: wte's columns do not match.
    let wider = layout(GptShape {
        d_model: 32,
        ..SHAPE
    });
    let err = import_err(&path, &wider);
    assert!(
        err.contains("transformer.wte.weight") && err.contains("[V, C]"),
        "{err}"
    );

    // An untied head.
    let mut untied = tensors.clone();
    let mut head = get(&tensors, "transformer.wte.weight").clone();
    head.name = "lm_head.weight".into();
    head.data[0] ^= 1;
    untied.push(head);
    let p = dir.path().join("untied.safetensors");
    write_all(&p, &untied);
    let err = import_err(&p, &l);
    assert!(
        err.contains("lm_head.weight") && err.contains("untied"),
        "{err}"
    );

    // An unsupported dtype.
    let mut ints = tensors.clone();
    ints.iter_mut()
        .find(|t| t.name == "transformer.ln_f.bias")
        .unwrap()
        .dtype = Dtype::I32;
    let p = dir.path().join("ints.safetensors");
    write_all(&p, &ints);
    let err = import_err(&p, &l);
    assert!(
        err.contains("transformer.ln_f.bias") && err.contains("I32"),
        "{err}"
    );
}

#[test]
fn import_rejects_a_file_that_is_not_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let l = layout(SHAPE);
    let p = dir.path().join("x.safetensors");
    std::fs::write(&p, b"not a safetensors file at all").unwrap();
    let err = import_err(&p, &l);
    assert!(
        err.contains("x.safetensors") && err.contains("not a safetensors file"),
        "{err}"
    );

    let err = import_err(&dir.path().join("absent.safetensors"), &l);
    assert!(err.contains("absent.safetensors"), "{err}");
}

#[test]
fn import_checks_n_head_in_a_config_beside_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let l = layout(SHAPE);
    let path = export(dir.path(), "out", &l, &random_weights(&l, 8));
    // Same tensor shapes, different heads: only config.json can tell.
    let four_heads = layout(GptShape { n_head: 4, ..SHAPE });
    let err = import_err(&path, &four_heads);
    assert!(
        err.contains("config.json") && err.contains("n_head is 2"),
        "{err}"
    );
}

/// The layout of the public `gpt2` checkpoint: no `transformer.` prefix, the attention-mask
/// buffers present, here in BF16 (and F16) with a tied `lm_head.weight`.
#[test]
fn import_accepts_half_precision_without_prefix_with_buffers_and_tied_head() {
    let dir = tempfile::tempdir().unwrap();
    let l = layout(SHAPE);
    let units = random_weights(&l, 9);
    let path = export(dir.path(), "out", &l, &units);
    let tensors = read_all(&path);

    for (dtype, round) in [
        (
            Dtype::BF16,
            (|x: f32| bf16::from_f32(x).to_f32()) as fn(f32) -> f32,
        ),
        (Dtype::F16, |x: f32| f16::from_f32(x).to_f32()),
    ] {
        let mut public: Vec<Tensor> = tensors
            .iter()
            .map(|t| {
                let data = t
                    .f32s()
                    .into_iter()
                    .flat_map(|x| match dtype {
                        Dtype::BF16 => bf16::from_f32(x).to_le_bytes(),
                        _ => f16::from_f32(x).to_le_bytes(),
                    })
                    .collect();
                Tensor {
                    name: t.name.strip_prefix("transformer.").unwrap().to_string(),
                    dtype,
                    shape: t.shape.clone(),
                    data,
                }
            })
            .collect();
        let mut head = get(&public, "wte.weight").clone();
        head.name = "lm_head.weight".into();
        public.push(head);
        for i in 0..SHAPE.n_layer {
            let b = SHAPE.block_size;
            public.push(Tensor {
                name: format!("h.{i}.attn.bias"),
                dtype: Dtype::F32,
                shape: vec![1, 1, b, b],
                data: vec![0; 4 * b * b],
            });
            public.push(Tensor {
                name: format!("h.{i}.attn.masked_bias"),
                dtype: Dtype::F32,
                shape: vec![],
                data: (-1e4f32).to_le_bytes().to_vec(),
            });
        }
        let p = dir.path().join(format!("public-{dtype:?}.safetensors"));
        write_all(&p, &public);
        let back = import_hf(&p, &l).unwrap();
        let expected: Vec<Vec<f32>> = units
            .iter()
            .map(|u| u.iter().map(|&x| round(x)).collect())
            .collect();
        assert_eq!(back, expected, "{dtype:?}");
    }
}

#[test]
fn export_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let l = layout(SHAPE);
    let path = export(dir.path(), "out", &l, &random_weights(&l, 1));
    let before = std::fs::read(&path).unwrap();
    let config_before = std::fs::read(dir.path().join("out/config.json")).unwrap();

    let err = export_hf(&dir.path().join("out"), &l, &random_weights(&l, 2)).unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains("model.safetensors") && err.contains("already exists"),
        "{err}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_eq!(
        std::fs::read(dir.path().join("out/config.json")).unwrap(),
        config_before
    );

    // Another model's config.json alone is kept too.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("config.json"), "{}").unwrap();
    let err = format!(
        "{:#}",
        export_hf(&other, &l, &random_weights(&l, 2)).unwrap_err()
    );
    assert!(
        err.contains("config.json") && err.contains("already exists"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(other.join("config.json")).unwrap(),
        "{}"
    );
    assert!(!other.join("model.safetensors").exists());

    // Wrongly sized weights are an error, not a panic.
    let mut short = random_weights(&l, 3);
    short[1].pop();
    let err = format!(
        "{:#}",
        export_hf(&dir.path().join("short"), &l, &short).unwrap_err()
    );
    assert!(err.contains("h.0"), "{err}");
}
