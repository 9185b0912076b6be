//! Issue 7's path from the command line: `tokenize` text into shards, train on them with
//! evaluation, sample, and resume a stopped run on shards exactly (the sampler's position is in
//! the checkpoint).

use std::path::Path;

mod common;
use common::{shardtrain_in, text};

#[rustfmt::skip]
const SMALL: &[&str] = &[
    "--set", "model.n_layer=1",
    "--set", "model.d_model=32",
    "--set", "model.n_head=1",
    "--set", "model.seq_len=32",
    "--set", "train.micro_batch_size=4",
    "--set", "train.global_batch_size=8",
    "--set", "train.warmup_steps=2",
    "--set", "train.eval_every=5",
    "--set", "train.eval_tokens=256",
    "--set", "logging.progress=plain",
    "--set", "logging.every_steps=1000",
    "--set", "data.kind=shards",
    "--set", "data.train=data/my_train_*.bin",
    "--set", "data.val=data/my_val_*.bin",
];

fn losses(run: &Path) -> Vec<u32> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["loss"].as_f64().unwrap() as f32).to_bits()
        })
        .collect()
}

#[test]
fn tokenize_then_train_evaluate_sample_and_resume_on_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for d in 0..3 {
        let body: String = (0..400)
            .map(|i| format!("{}+{}={}\n", i * d, i, i * d + i))
            .collect();
        std::fs::write(dir.join(format!("doc{d}.txt")), body).unwrap();
    }
    let out = shardtrain_in(
        dir,
        &[
            "tokenize",
            "doc0.txt",
            "doc1.txt",
            "doc2.txt",
            "-o",
            "data/my",
            "--shard-tokens",
            "5000",
            "--tokenizer",
            "bytes",
        ],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("3 documents") && stdout.contains("data/my_train_000000.bin"),
        "{stdout}"
    );
    assert!(dir.join("data/my_val_000000.bin").is_file());

    let mut args = vec!["train", "--run-dir", "run", "--set", "train.max_steps=10"];
    args.extend_from_slice(SMALL);
    let out = shardtrain_in(dir, &args);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("done: 10 steps") && stdout.contains("val_loss"),
        "{stdout}"
    );

    let out = shardtrain_in(
        dir,
        &[
            "sample",
            "--run-dir",
            "run",
            "--prompt",
            "12+",
            "--max-tokens",
            "8",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("12+"));

    // Stop after 5 steps (checkpoint), resume to 10: the same losses as the uninterrupted run.
    let mut args = vec![
        "train",
        "--run-dir",
        "split",
        "--set",
        "train.max_steps=10",
        "--set",
        "checkpoint.every_steps=5",
    ];
    args.extend_from_slice(SMALL);
    let mut first = args.clone();
    first[4] = "train.max_steps=10";
    let out = shardtrain_in(dir, &first);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let full = losses(&dir.join("split"));
    let ckpt = dir.join("split/checkpoints/step-00000005");
    assert!(ckpt.join("meta.json").is_file());
    let meta = std::fs::read_to_string(ckpt.join("meta.json")).unwrap();
    assert!(
        meta.contains("\"kind\": \"shards\""),
        "the sampler position is saved"
    );
    let out = shardtrain_in(
        dir,
        &[
            "train",
            "--resume",
            ckpt.to_str().unwrap(),
            "--run-dir",
            "resumed",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(losses(&dir.join("resumed")), full[5..].to_vec());

    // `eval` of the last checkpoint gives the run's own final validation loss; `sample` reads a
    // checkpoint too.
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("split/summary.json")).unwrap())
            .unwrap();
    let final_val = summary["final_val_loss"].as_f64().unwrap();
    let out = shardtrain_in(dir, &["eval", "--checkpoint", "split"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(stdout.contains("step 10"), "{stdout}");
    assert!(
        stdout.contains(&format!("val_loss {final_val:.4}")),
        "{stdout} vs {final_val}"
    );
    let out = shardtrain_in(
        dir,
        &[
            "sample",
            "--checkpoint",
            "split",
            "--prompt",
            "7+",
            "--max-tokens",
            "5",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("7+"));

    // A shard that is not one is an error naming it.
    std::fs::write(dir.join("data/my_train_000009.bin"), b"not a shard").unwrap();
    let mut args = vec!["train", "--run-dir", "bad", "--set", "train.max_steps=2"];
    args.extend_from_slice(SMALL);
    let out = shardtrain_in(dir, &args);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("my_train_000009.bin") && stderr.contains("too short"),
        "{stderr}"
    );
}

/// Prose with GPT-2's tokenizer: `tokenize` (the default tokenizer is gpt2) into shards a run
/// trains and evaluates on, `sample` decodes with BPE, and `data.kind: text` tokenizes the same
/// text itself into a cache next to the run, once, for the same tokens.
#[test]
fn gpt2_tokens_from_shards_and_from_text_train_alike() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let prose: String = (0..300)
        .map(|i| {
            format!(
                "The {} quick brown foxes jumped over {} lazy dogs, and nobody minded.\n",
                i % 17,
                i % 5
            )
        })
        .collect();
    std::fs::write(dir.join("prose.txt"), &prose).unwrap();
    let out = shardtrain_in(dir, &["tokenize", "prose.txt", "-o", "data/g"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("gpt2 tokenizer"), "{stdout}");
    // "The" is 464 in GPT-2's vocabulary: the first token of the training shard.
    let shard = std::fs::read(dir.join("data/g_val_000000.bin")).unwrap();
    assert_eq!(u16::from_le_bytes([shard[1024], shard[1025]]), 464);

    #[rustfmt::skip]
    let gpt2: &[&str] = &[
        "--set", "model.n_layer=1", "--set", "model.d_model=16", "--set", "model.n_head=1",
        "--set", "model.seq_len=16", "--set", "model.block_size=16",
        "--set", "model.vocab_size=50304", "--set", "data.tokenizer=gpt2",
        "--set", "train.micro_batch_size=2", "--set", "train.global_batch_size=4",
        "--set", "train.max_steps=4", "--set", "train.warmup_steps=1",
        "--set", "train.eval_every=2", "--set", "train.eval_tokens=64",
        "--set", "logging.progress=plain",
    ];
    let mut args = vec![
        "train",
        "--run-dir",
        "runs/shards",
        "--set",
        "data.kind=shards",
        "--set",
        "data.train=data/g_train_*.bin",
        "--set",
        "data.val=data/g_val_*.bin",
    ];
    args.extend_from_slice(gpt2);
    let out = shardtrain_in(dir, &args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let from_shards = losses(&dir.join("runs/shards"));
    // `eval` of a run without checkpoints evaluates its final weights: the run's own number.
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("runs/shards/summary.json")).unwrap(),
    )
    .unwrap();
    let final_val = summary["final_val_loss"].as_f64().unwrap();
    let out = shardtrain_in(dir, &["eval", "--checkpoint", "runs/shards"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        stdout.contains(&format!("val_loss {final_val:.4}")) && stdout.contains("final weights"),
        "{stdout} vs {final_val}"
    );

    let out = shardtrain_in(
        dir,
        &[
            "sample",
            "--run-dir",
            "runs/shards",
            "--prompt",
            "The quick",
            "--max-tokens",
            "6",
            "--temperature",
            "0",
        ],
    );
    let sample = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(sample.starts_with("The quick"), "{sample}");

    // The same text as data.kind text: the same tokens, so the same losses; a second run finds
    // the cache instead of tokenizing again.
    for run in ["runs/text", "runs/text2"] {
        let mut args = vec![
            "train",
            "--run-dir",
            run,
            "--set",
            "data.kind=text",
            "--set",
            "data.train=prose.txt",
        ];
        args.extend_from_slice(gpt2);
        let out = shardtrain_in(dir, &args);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(losses(&dir.join(run)), from_shards, "{run}");
    }
    let caches: Vec<_> = std::fs::read_dir(dir.join("runs/.token-cache"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(caches.len(), 1, "{caches:?}");
    assert!(caches[0].starts_with("gpt2-"), "{caches:?}");
}
