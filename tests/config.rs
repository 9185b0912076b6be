// Tests of the config module: the shipped configs, the embedded default, YAML round trips,
// `--set` overrides, and that every kind of bad input is a ConfigError naming the file (or the
// `--set`), the dotted key and the line.

use shardtrain::config::{
    Config, ConfigError, DeviceKind, ProgressMode, ShardStrategy, EMBEDDED_DEFAULT, EMBEDDED_ORIGIN,
};
use std::path::{Path, PathBuf};

const ORIGIN: &str = "configs/bad.yaml";

fn shipped(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("configs")
        .join(name)
}

fn tiny_text() -> String {
    std::fs::read_to_string(shipped("tiny.yaml")).expect("configs/tiny.yaml is readable")
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The error message of loading `text` (named ORIGIN) with `overrides`; panics if it loads.
fn error_of(text: &str, overrides: &[&str]) -> String {
    match Config::from_yaml_str(text, ORIGIN, &strings(overrides)) {
        Ok(cfg) => panic!("expected an error, got {cfg:?}"),
        Err(ConfigError { message }) => message,
    }
}

/// configs/tiny.yaml with the line `leaf: ...` replaced by `leaf: value`, and that line's number.
/// `leaf` may be `section.leaf` where the leaf name occurs in several sections; `section` is the
/// innermost enclosing section or a dotted path ending in it (`synthetic`, `data.synthetic`).
fn tiny_with(leaf: &str, value: &str) -> (String, usize) {
    let text = tiny_text();
    let (section, leaf) = match leaf.rsplit_once('.') {
        Some((s, l)) => (Some(s), l),
        None => (None, leaf),
    };
    let mut found = None;
    // Enclosing sections of the current line, as (indent, name).
    let mut stack: Vec<(usize, String)> = Vec::new();
    let lines: Vec<String> = text
        .lines()
        .enumerate()
        .map(|(i, line)| {
            let body = line.trim_start();
            let indent = line.len() - body.len();
            if body.is_empty() || body.starts_with('#') {
                return line.to_string();
            }
            while stack.last().is_some_and(|(d, _)| *d >= indent) {
                stack.pop();
            }
            if body.ends_with(':') {
                stack.push((indent, body.trim_end_matches(':').to_string()));
                return line.to_string();
            }
            let path: Vec<&str> = stack.iter().map(|(_, n)| n.as_str()).collect();
            let path = path.join(".");
            let in_section = section.is_none_or(|s| path == s || path.ends_with(&format!(".{s}")));
            if in_section && body.starts_with(&format!("{leaf}:")) {
                assert!(found.is_none(), "{leaf} appears twice in tiny.yaml");
                found = Some(i + 1);
                format!("{}{leaf}: {value}", &line[..indent])
            } else {
                line.to_string()
            }
        })
        .collect();
    let line = found.unwrap_or_else(|| panic!("{leaf} is not in tiny.yaml"));
    (lines.join("\n") + "\n", line)
}

/// tiny.yaml with `extra` inserted after line `after` (1-based); the inserted line's number.
fn tiny_inserting(after: usize, extra: &str) -> (String, usize) {
    let text = tiny_text();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.insert(after, extra);
    (lines.join("\n") + "\n", after + 1)
}

fn line_of(leaf: &str) -> usize {
    tiny_with(leaf, "x").1
}

fn assert_contains(message: &str, expected: &str) {
    assert!(
        message.contains(expected),
        "expected {expected:?} in the message:\n{message}"
    );
}

// ---------------------------------------------------------------- shipped configs and defaults

#[test]
fn shipped_configs_load_and_validate() {
    let tiny = Config::load(Some(&shipped("tiny.yaml")), &[]).expect("tiny.yaml loads");
    assert_eq!(tiny.validate(), Ok(()));
    assert_eq!(tiny.model.head_dim(), 32);
    assert_eq!(tiny.train.grad_accum_steps(1), 4);
    assert_eq!(tiny.train.grad_accum_steps(4), 1);

    let gpt2 = Config::load(Some(&shipped("gpt2-124m.yaml")), &[]).expect("gpt2-124m.yaml loads");
    assert_eq!(gpt2.validate(), Ok(()));
    let m = &gpt2.model;
    assert_eq!(
        (
            m.n_layer,
            m.n_head,
            m.d_model,
            m.vocab_size,
            m.block_size,
            m.seq_len
        ),
        (12, 12, 768, 50304, 1024, 1024)
    );
    assert_eq!(m.head_dim(), 64);
    let t = &gpt2.train;
    assert_eq!((t.micro_batch_size, t.global_batch_size), (16, 512));
    assert_eq!((t.lr, t.min_lr), (6e-4, 6e-5));
    assert_eq!((t.warmup_steps, t.max_steps), (700, 19073));
    assert_eq!((t.weight_decay, t.grad_clip, t.beta2), (0.1, 1.0, 0.95));
    assert_eq!((t.eval_every, t.eval_tokens), (250, 1_048_576));
    assert_eq!(t.grad_accum_steps(1), 32);
    assert_eq!(gpt2.device, DeviceKind::Auto);
}

#[test]
fn embedded_default_is_tiny_yaml_and_default() {
    assert_eq!(EMBEDDED_DEFAULT, tiny_text());
    let embedded = Config::load(None, &[]).expect("embedded default loads");
    let file = Config::load(Some(&shipped("tiny.yaml")), &[]).expect("tiny.yaml loads");
    assert_eq!(embedded, file);
    assert_eq!(embedded, Config::default());
    let named = Config::from_yaml_str(EMBEDDED_DEFAULT, EMBEDDED_ORIGIN, &[]).expect("loads");
    assert_eq!(named, embedded);
}

#[test]
fn tiny_yaml_writes_every_key() {
    // The file must not rely on serde defaults: every key of the schema is written out.
    let written: serde_json::Value =
        serde_saphyr::from_str(&tiny_text()).expect("tiny.yaml parses as plain YAML");
    let schema = serde_json::to_value(Config::default()).expect("config serializes");
    fn same_keys(a: &serde_json::Value, b: &serde_json::Value, path: &str) {
        if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
            let ka: Vec<_> = a.keys().collect();
            let kb: Vec<_> = b.keys().collect();
            assert_eq!(ka, kb, "keys under {path:?}");
            for (k, v) in a {
                same_keys(v, &b[k], &format!("{path}.{k}"));
            }
        }
    }
    same_keys(&written, &schema, "");
}

#[test]
fn empty_file_means_all_defaults() {
    for text in ["", "\n", "# nothing but a comment\n"] {
        let cfg = Config::from_yaml_str(text, ORIGIN, &[]).expect("empty config loads");
        assert_eq!(cfg, Config::default(), "for {text:?}");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("empty.yaml");
    std::fs::write(&path, "").expect("write");
    assert_eq!(Config::load(Some(&path), &[]), Ok(Config::default()));
    // A partial file keeps the defaults of everything it does not mention.
    let cfg = Config::from_yaml_str("train:\n  max_steps: 500\n", ORIGIN, &[]).expect("loads");
    assert_eq!(cfg.train.max_steps, 500);
    assert_eq!(cfg.model, Config::default().model);
}

// ---------------------------------------------------------------- round trip

#[test]
fn to_yaml_round_trips() {
    for cfg in [
        Config::default(),
        Config::load(Some(&shipped("gpt2-124m.yaml")), &[]).expect("loads"),
    ] {
        let text = cfg.to_yaml();
        assert!(text.starts_with('#'), "leading comment:\n{text}");
        let back = Config::from_yaml_str(&text, "<to_yaml>", &[]).expect("to_yaml output loads");
        assert_eq!(back, cfg, "round trip of:\n{text}");
    }
}

#[test]
fn to_yaml_writes_every_key() {
    let cfg = Config::default();
    let written: serde_json::Value = serde_saphyr::from_str(&cfg.to_yaml()).expect("parses");
    assert_eq!(written["model"]["n_layer"], 4);
    assert_eq!(written["data"]["synthetic"]["max_operand"], 999);
    assert_eq!(written["checkpoint"]["save_final"], true);
    assert_eq!(written["logging"]["progress"], "auto");
    assert_eq!(written["device"], "auto");
    let schema = serde_json::to_value(&cfg).expect("serializes");
    let (a, b) = (
        written.as_object().expect("map"),
        schema.as_object().expect("map"),
    );
    assert_eq!(a.len(), b.len());
    for (section, value) in b {
        if let Some(fields) = value.as_object() {
            let got = a[section].as_object().expect("section is a map");
            assert_eq!(got.len(), fields.len(), "keys of {section}");
        }
    }
}

#[test]
fn to_yaml_round_trips_after_overrides() {
    let overrides = strings(&[
        "train.lr=1.2345e-3",
        "train.eps=1e-10",
        "train.beta2=0.999",
        "data.synthetic.val_fraction=0.2",
        "model.d_model=96",
        "model.n_head=3",
        "logging.progress=plain",
        "logging.metrics_file=run metrics.jsonl",
        "checkpoint.save_final=false",
        "device=cpu",
    ]);
    let cfg = Config::load(None, &overrides).expect("overrides apply");
    let back = Config::from_yaml_str(&cfg.to_yaml(), "<to_yaml>", &[]).expect("loads");
    assert_eq!(back, cfg);
}

// ---------------------------------------------------------------- overrides

#[test]
fn overrides_apply() {
    let cfg = Config::load(
        None,
        &strings(&[
            "train.lr=1e-3",
            "train.max_steps=50",
            "data.synthetic.val_fraction=0.25",
            "data.synthetic.max_operand=99",
            "logging.progress=bar",
            "logging.metrics_file=123",
            "checkpoint.save_final=false",
            "device=cpu",
            "train.seed=7",
            "train.seed=8",
        ]),
    )
    .expect("overrides apply");
    assert_eq!(cfg.train.lr, 1e-3);
    assert_eq!(cfg.train.max_steps, 50);
    assert_eq!(cfg.data.synthetic.val_fraction, 0.25);
    assert_eq!(cfg.data.synthetic.max_operand, 99);
    assert_eq!(cfg.logging.progress, ProgressMode::Bar);
    assert_eq!(cfg.logging.metrics_file, "123");
    assert!(!cfg.checkpoint.save_final);
    assert_eq!(cfg.device, DeviceKind::Cpu);
    assert_eq!(cfg.train.seed, 8, "the later override wins");
    // Untouched keys keep the file's values.
    assert_eq!(cfg.model, Config::default().model);
}

#[test]
fn overrides_apply_on_top_of_a_file() {
    let cfg = Config::load(
        Some(&shipped("gpt2-124m.yaml")),
        &strings(&["train.max_steps=10", "train.warmup_steps=2", "device=cpu"]),
    )
    .expect("loads");
    assert_eq!(cfg.train.max_steps, 10);
    assert_eq!(cfg.model.n_layer, 12);
    assert_eq!(cfg.device, DeviceKind::Cpu);
}

#[test]
fn an_override_can_fix_a_bad_file_value() {
    let (text, _) = tiny_with("world_size", "0");
    assert!(Config::from_yaml_str(&text, ORIGIN, &[]).is_err());
    let cfg = Config::from_yaml_str(&text, ORIGIN, &strings(&["parallel.world_size=2"]))
        .expect("the override wins over the file");
    assert_eq!(cfg.parallel.world_size, 2);
}

// ---------------------------------------------------------------- parse-level errors in the file

#[test]
fn unknown_top_level_key() {
    let (text, line) = tiny_inserting(5, "optimizer: adamw");
    let msg = error_of(&text, &[]);
    assert_contains(
        &msg,
        &format!("{ORIGIN}:{line}: optimizer: unknown field `optimizer`"),
    );
    // serde-saphyr's snippet follows, under the file's own name.
    assert_contains(&msg, &format!("--> {ORIGIN}:{line}:1"));
}

#[test]
fn unknown_nested_key() {
    let after = line_of("n_layer");
    let (text, line) = tiny_inserting(after, "  dropout: 0.1");
    let msg = error_of(&text, &[]);
    assert_contains(
        &msg,
        &format!("{ORIGIN}:{line}: model.dropout: unknown field `dropout`"),
    );

    let after = line_of("synthetic.val_fraction");
    let (text, line) = tiny_inserting(after, "    seed: 3");
    let msg = error_of(&text, &[]);
    assert_contains(
        &msg,
        &format!("{ORIGIN}:{line}: data.synthetic.seed: unknown field"),
    );
}

#[test]
fn wrong_types() {
    for (leaf, value, key) in [
        ("n_layer", "four", "model.n_layer"),
        ("n_layer", "-4", "model.n_layer"),
        ("n_layer", "2.5", "model.n_layer"),
        ("lr", "fast", "train.lr"),
        ("save_final", "maybe", "checkpoint.save_final"),
        ("device", "gpu", "device"),
        ("progress", "fancy", "logging.progress"),
        ("kind", "parquet", "data.kind"),
        ("max_operand", "[1, 2]", "data.synthetic.max_operand"),
    ] {
        let (text, line) = tiny_with(leaf, value);
        let msg = error_of(&text, &[]);
        assert_contains(&msg, &format!("{ORIGIN}:{line}: {key}: "));
    }
}

#[test]
fn a_section_that_is_not_a_mapping() {
    let msg = error_of("train: 3\n", &[]);
    assert_contains(&msg, &format!("{ORIGIN}:1: train: "));
}

#[test]
fn duplicate_key() {
    let after = line_of("lr");
    let (text, line) = tiny_inserting(after, "  lr: 0.1");
    let msg = error_of(&text, &[]);
    assert_contains(&msg, &format!("{ORIGIN}:{line}: train.lr: duplicate"));
}

#[test]
fn invalid_yaml_syntax() {
    let msg = error_of("model: {n_layer: 4\n", &[]);
    assert_contains(&msg, &format!("{ORIGIN}:1: "));
    assert_contains(&msg, "unclosed");

    let (text, line) = tiny_with("d_model", "[128");
    let msg = error_of(&text, &[]);
    assert_contains(&msg, ORIGIN);
    assert!(
        msg.contains(&format!("{ORIGIN}:{line}:"))
            || msg.contains(&format!("{ORIGIN}:{}:", line + 1)),
        "line near {line}:\n{msg}"
    );
}

#[test]
fn missing_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("missing.yaml");
    let msg = Config::load(Some(&path), &[])
        .expect_err("missing file")
        .message;
    assert_contains(&msg, &path.display().to_string());
    assert_contains(&msg, "os error");
}

#[test]
fn unreadable_file_is_a_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let msg = Config::load(Some(dir.path()), &[])
        .expect_err("a directory")
        .message;
    assert_contains(&msg, &dir.path().display().to_string());
}

#[test]
fn errors_from_a_real_file_name_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.yaml");
    let (text, line) = tiny_with("d_model", "130");
    std::fs::write(&path, text).expect("write");
    let msg = Config::load(Some(&path), &[]).expect_err("invalid").message;
    assert_contains(
        &msg,
        &format!(
            "{}:{line}: model.d_model: 130 is not divisible by model.n_head (4)",
            path.display()
        ),
    );
}

// ---------------------------------------------------------------- validation

/// (leaf in tiny.yaml, bad value, dotted key, expected part of the problem)
const RULES: &[(&str, &str, &str, &str)] = &[
    ("n_layer", "0", "model.n_layer", "must be at least 1"),
    ("n_head", "0", "model.n_head", "must be at least 1"),
    ("d_model", "0", "model.d_model", "must be at least 1"),
    (
        "vocab_size",
        "0",
        "model.vocab_size",
        "must be at least 256",
    ),
    ("block_size", "0", "model.block_size", "must be at least 1"),
    ("seq_len", "0", "model.seq_len", "must be at least 1"),
    (
        "d_model",
        "130",
        "model.d_model",
        "130 is not divisible by model.n_head (4)",
    ),
    (
        "seq_len",
        "65",
        "model.seq_len",
        "seq_len above the position table",
    ),
    (
        "block_size",
        "32",
        "model.seq_len",
        "seq_len above the position table",
    ),
    (
        "vocab_size",
        "255",
        "model.vocab_size",
        "at least 256 for the bytes tokenizer",
    ),
    (
        "init_std",
        "0",
        "model.init_std",
        "must be a finite number > 0",
    ),
    (
        "init_std",
        "-0.02",
        "model.init_std",
        "must be a finite number > 0",
    ),
    (
        "init_std",
        ".nan",
        "model.init_std",
        "must be a finite number > 0",
    ),
    (
        "micro_batch_size",
        "0",
        "train.micro_batch_size",
        "must be at least 1",
    ),
    (
        "global_batch_size",
        "36",
        "train.global_batch_size",
        "batch not divisible into micro-batches",
    ),
    (
        "global_batch_size",
        "0",
        "train.global_batch_size",
        "batch not divisible into micro-batches",
    ),
    ("lr", "0", "train.lr", "must be a finite number > 0"),
    ("lr", "-0.001", "train.lr", "must be a finite number > 0"),
    ("lr", ".inf", "train.lr", "must be a finite number > 0"),
    (
        "min_lr",
        "-0.0001",
        "train.min_lr",
        "must be between 0 and train.lr",
    ),
    (
        "min_lr",
        "0.01",
        "train.min_lr",
        "must be between 0 and train.lr",
    ),
    (
        "min_lr",
        ".nan",
        "train.min_lr",
        "must be between 0 and train.lr",
    ),
    ("max_steps", "0", "train.max_steps", "must be at least 1"),
    (
        "warmup_steps",
        "301",
        "train.warmup_steps",
        "must not exceed train.max_steps (300)",
    ),
    (
        "weight_decay",
        "-0.1",
        "train.weight_decay",
        "must be a finite number >= 0",
    ),
    (
        "weight_decay",
        ".inf",
        "train.weight_decay",
        "must be a finite number >= 0",
    ),
    (
        "grad_clip",
        "-1",
        "train.grad_clip",
        "must be a finite number >= 0",
    ),
    (
        "grad_clip",
        ".nan",
        "train.grad_clip",
        "must be a finite number >= 0",
    ),
    ("beta1", "1.0", "train.beta1", "must be in [0, 1)"),
    ("beta1", "-0.1", "train.beta1", "must be in [0, 1)"),
    ("beta2", "1", "train.beta2", "must be in [0, 1)"),
    ("beta2", ".nan", "train.beta2", "must be in [0, 1)"),
    ("eps", "0", "train.eps", "must be a finite number > 0"),
    ("eps", "-.inf", "train.eps", "must be a finite number > 0"),
    (
        "eval_tokens",
        "511",
        "train.eval_tokens",
        "must be at least train.micro_batch_size x model.seq_len (8 x 64 = 512)",
    ),
    (
        "max_operand",
        "0",
        "data.synthetic.max_operand",
        "must be at least 1",
    ),
    (
        "synthetic.val_fraction",
        "0",
        "data.synthetic.val_fraction",
        "strictly between 0 and 1",
    ),
    (
        "synthetic.val_fraction",
        "1",
        "data.synthetic.val_fraction",
        "strictly between 0 and 1",
    ),
    (
        "synthetic.val_fraction",
        ".nan",
        "data.synthetic.val_fraction",
        "strictly between 0 and 1",
    ),
    (
        "keep_last",
        "0",
        "checkpoint.keep_last",
        "must be at least 1",
    ),
    (
        "logging.every_steps",
        "0",
        "logging.every_steps",
        "must be at least 1",
    ),
    (
        "metrics_file",
        "''",
        "logging.metrics_file",
        "must not be empty",
    ),
    (
        "metrics_file",
        "logs/metrics.jsonl",
        "logging.metrics_file",
        "plain file name",
    ),
    (
        "metrics_file",
        "../metrics.jsonl",
        "logging.metrics_file",
        "plain file name",
    ),
    (
        "metrics_file",
        "..",
        "logging.metrics_file",
        "plain file name",
    ),
    ("world_size", "0", "parallel.world_size", "at least 1"),
    (
        "collective_timeout_s",
        "0",
        "parallel.collective_timeout_s",
        "finite number > 0",
    ),
    (
        "collective_timeout_s",
        ".inf",
        "parallel.collective_timeout_s",
        "finite number > 0",
    ),
];

#[test]
fn every_validation_rule_names_file_line_and_key() {
    for &(leaf, value, key, problem) in RULES {
        let (text, edited) = tiny_with(leaf, value);
        // A rule may blame another key than the edited one (block_size -> seq_len).
        let line = if key.ends_with(&format!(".{leaf}")) || key == leaf {
            edited
        } else {
            line_of(key.rsplit('.').next().unwrap_or(key))
        };
        let msg = error_of(&text, &[]);
        assert_contains(&msg, &format!("{ORIGIN}:{line}: {key}: "));
        assert!(
            msg.lines().any(|l| l.starts_with(&format!("{ORIGIN}:{line}: {key}: ")) && l.contains(problem)),
            "{leaf}: {value}: expected `{ORIGIN}:{line}: {key}: ...{problem}...` in:\n{msg}"
        );
    }
}

#[test]
fn every_validation_rule_through_validate() {
    for &(leaf, value, key, problem) in RULES {
        let (text, _) = tiny_with(leaf, value);
        // Load without validation: parse into the typed struct directly.
        let cfg: Config = serde_saphyr::from_str(&text).expect("typed parse");
        let problems = cfg.validate().expect_err("invalid");
        assert!(
            problems
                .iter()
                .any(|(k, p)| k == key && p.contains(problem)),
            "{leaf}: {value}: expected ({key}, ...{problem}...) in {problems:?}"
        );
    }
}

#[test]
fn zero_disables_grad_clip_and_eval() {
    let cfg = Config::load(
        None,
        &strings(&[
            "train.grad_clip=0",
            "train.eval_every=0",
            "train.eval_tokens=0",
        ]),
    )
    .expect("valid");
    assert_eq!(cfg.train.grad_clip, 0.0);
    assert_eq!(cfg.train.eval_every, 0);
    assert_eq!(cfg.train.eval_tokens, 0);
}

#[test]
fn all_problems_are_reported_at_once() {
    let (text, _) = tiny_with("n_layer", "0");
    let text = text.replace("  lr: 0.001\n", "  lr: -1\n");
    let msg = error_of(&text, &[]);
    // n_layer and lr (min_lr is only compared with a valid lr).
    assert_eq!(msg.lines().count(), 2, "{msg}");
    assert_contains(
        &msg,
        &format!(
            "{ORIGIN}:{}: model.n_layer: must be at least 1",
            line_of("n_layer")
        ),
    );
    assert_contains(
        &msg,
        &format!(
            "{ORIGIN}:{}: train.lr: must be a finite number > 0",
            line_of("lr")
        ),
    );
}

#[test]
fn validation_of_overridden_values_names_the_override() {
    let msg = error_of(&tiny_text(), &["model.d_model=130"]);
    assert_eq!(
        msg,
        "--set model.d_model=130: model.d_model: 130 is not divisible by model.n_head (4)"
    );
    // A default value that breaks a rule with a written one points at the written one.
    let msg = error_of("", &["model.n_head=3"]);
    assert_eq!(
        msg,
        "--set model.n_head=3: model.d_model: 128 is not divisible by model.n_head (3)"
    );
    // ... also when the other key is written in the file: the override is what broke it.
    let msg = Config::load(None, &strings(&["model.n_head=3"]))
        .expect_err("n_head 3")
        .message;
    assert_eq!(
        msg,
        "--set model.n_head=3: model.d_model: 128 is not divisible by model.n_head (3)"
    );
    let msg = Config::load(None, &strings(&["parallel.world_size=0"]))
        .expect_err("world 0")
        .message;
    assert_contains(
        &msg,
        "--set parallel.world_size=0: parallel.world_size: must be at least 1",
    );
}

#[test]
fn hybrid_shard_needs_a_group_size_dividing_the_world() {
    let base = ["parallel.strategy=hybrid_shard", "parallel.world_size=4"];
    for bad in ["0", "3"] {
        let set = format!("parallel.shard_group_size={bad}");
        let mut overrides = base.to_vec();
        overrides.push(&set);
        let msg = Config::load(None, &strings(&overrides))
            .expect_err("bad group size")
            .message;
        assert_contains(
            &msg,
            "parallel.shard_group_size: hybrid_shard needs a shard group size",
        );
    }
    let mut overrides = base.to_vec();
    overrides.push("parallel.shard_group_size=2");
    let cfg = Config::load(None, &strings(&overrides)).expect("group of 2 in a world of 4");
    assert_eq!(cfg.parallel.strategy, ShardStrategy::HybridShard);
}

#[test]
fn validation_of_a_default_value_names_the_file() {
    let msg = error_of("model:\n  n_head: 3\n", &[]);
    assert_eq!(
        msg,
        format!("{ORIGIN}:2: model.d_model: 128 is not divisible by model.n_head (3)")
    );
    let msg = error_of("train:\n  micro_batch_size: 64\n", &[]);
    assert_contains(
        &msg,
        &format!("{ORIGIN}:2: train.global_batch_size: batch not divisible into micro-batches"),
    );
}

#[test]
fn a_non_finite_file_value_is_rejected_with_overrides_too() {
    let (text, line) = tiny_with("lr", ".nan");
    let msg = error_of(&text, &["train.seed=1"]);
    assert_contains(
        &msg,
        &format!("{ORIGIN}:{line}: train.lr: not a finite number"),
    );
}

// ---------------------------------------------------------------- bad overrides

#[test]
fn bad_override_keys() {
    for (set, key, problem) in [
        ("train.lrr=0.1", "train.lrr", "unknown key"),
        ("optimizer.lr=0.1", "optimizer.lr", "unknown key"),
        ("lr=0.1", "lr", "unknown key"),
        (
            "data.synthetic.seed=1",
            "data.synthetic.seed",
            "unknown key",
        ),
        ("model.n_layer.x=1", "model.n_layer.x", "unknown key"),
        ("model=3", "model", "is a section"),
        ("data.synthetic=3", "data.synthetic", "is a section"),
    ] {
        let msg = Config::load(None, &strings(&[set])).expect_err(set).message;
        assert_contains(&msg, &format!("--set {set}: {key}: {problem}"));
    }
    let msg = Config::load(None, &strings(&["train.lr"]))
        .expect_err("no =")
        .message;
    assert_contains(&msg, "--set train.lr: expected section.key=value");
    let msg = Config::load(None, &strings(&["=3"]))
        .expect_err("no key")
        .message;
    assert_contains(&msg, "--set =3: ");
}

#[test]
fn bad_override_values() {
    for (set, key, problem) in [
        ("train.lr=abc", "train.lr", "invalid type"),
        ("model.n_layer=-1", "model.n_layer", "invalid"),
        ("model.n_layer=2.5", "model.n_layer", "invalid type"),
        ("model.n_layer=", "model.n_layer", "no value"),
        ("train.lr=.nan", "train.lr", "not a finite number"),
        ("train.lr=1e999", "train.lr", "not a finite number"),
        ("train.lr=[1, 2]", "train.lr", "single value"),
        (
            "checkpoint.save_final=maybe",
            "checkpoint.save_final",
            "invalid type",
        ),
        ("device=gpu", "device", "unknown variant `gpu`"),
        (
            "logging.progress=fancy",
            "logging.progress",
            "unknown variant",
        ),
        (
            "data.synthetic.max_operand=5000000000",
            "data.synthetic.max_operand",
            "invalid value",
        ),
    ] {
        let msg = Config::load(None, &strings(&[set])).expect_err(set).message;
        assert_contains(&msg, &format!("--set {set}: {key}: "));
        assert_contains(&msg, problem);
    }
}

#[test]
fn text_data_needs_files_and_a_validation_share() {
    let text = tiny_text();
    let msg = error_of(&text, &["data.kind=text"]);
    assert_contains(&msg, "data.train");
    assert_contains(&msg, "data.kind is text");
    let msg = error_of(
        &text,
        &[
            "data.kind=text",
            "data.train=c/*.txt",
            "data.val_fraction=1.5",
        ],
    );
    assert_contains(&msg, "data.val_fraction");
    let msg = error_of(
        &text,
        &[
            "data.kind=text",
            "data.train=c/*.txt",
            "data.val_fraction=0",
        ],
    );
    assert_contains(&msg, "no validation text");
    // With validation files, or without evaluation, no share is needed.
    for extra in ["data.val=v.txt", "train.eval_every=0"] {
        let overrides = strings(&[
            "data.kind=text",
            "data.train=c/*.txt",
            "data.val_fraction=0",
            extra,
        ]);
        Config::from_yaml_str(&text, ORIGIN, &overrides).unwrap();
    }
    // GPT-2's tokenizer needs room for its 50,257 tokens.
    let msg = error_of(&text, &["data.tokenizer=gpt2"]);
    assert_contains(&msg, "model.vocab_size");
    assert_contains(&msg, "50257");
}
