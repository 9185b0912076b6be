//! Checkpoints that never lose a run: a stopped and resumed run equals the uninterrupted one
//! (bit for bit at the same world size), a crash in the middle of a save leaves the previous
//! checkpoint usable, a checkpoint of any world size and strategy continues on any other, old
//! checkpoints are pruned, and every kind of damaged checkpoint is an error naming its file.

mod common;

use std::path::{Path, PathBuf};

use common::{small_config, STRATEGIES};
use shardtrain::checkpoint::Checkpoint;
use shardtrain::config::{Config, ShardStrategy};
use shardtrain::model::ParamLayout;
use shardtrain::train::device::Device;
use shardtrain::train::{
    gpt_shape, start_of, train_on, weights, Faults, TrainSummary, WEIGHTS_FILE,
};

fn run(
    cfg: &Config,
    dir: &Path,
    resume: Option<Checkpoint>,
    faults: &Faults,
) -> anyhow::Result<TrainSummary> {
    let start = start_of(cfg, resume)?;
    train_on(&Device::Cpu, cfg, dir, &start, faults)
}

fn stop_at(step: u64) -> Faults {
    Faults {
        stop_at_step: Some(step),
        ..Faults::default()
    }
}

fn final_weights(cfg: &Config, dir: &Path) -> Vec<Vec<f32>> {
    let layout = ParamLayout::gpt(gpt_shape(cfg), cfg.model.init_std);
    weights::load(&dir.join(WEIGHTS_FILE), &layout).unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn a_stopped_and_resumed_run_equals_the_uninterrupted_run_bit_for_bit() {
    let cfg = small_config(2, ShardStrategy::FullShard, 30);
    let whole = tempfile::tempdir().unwrap();
    let full = run(&cfg, whole.path(), None, &Faults::default()).unwrap();

    let split = tempfile::tempdir().unwrap();
    let first = run(&cfg, split.path(), None, &stop_at(15)).unwrap();
    assert_eq!(first.stopped_at, Some(15));
    assert_eq!(first.steps, 15);
    let ckpt_dir = first
        .checkpoint
        .clone()
        .expect("a stop writes a checkpoint");
    assert!(
        ckpt_dir.ends_with("checkpoints/step-00000015"),
        "{}",
        ckpt_dir.display()
    );
    assert!(
        !split.path().join(WEIGHTS_FILE).exists(),
        "no final weights for a stopped run"
    );

    let ckpt = Checkpoint::resolve(split.path()).unwrap();
    assert_eq!(ckpt.meta.step, 15);
    let second = run(&cfg, split.path(), Some(ckpt), &Faults::default()).unwrap();
    assert_eq!(second.first_step, 16);
    let resumed: Vec<f32> = first.losses.iter().chain(&second.losses).copied().collect();
    assert_eq!(
        bits(&resumed),
        bits(&full.losses),
        "losses differ after resuming"
    );
    for (a, b) in final_weights(&cfg, whole.path())
        .iter()
        .zip(final_weights(&cfg, split.path()))
    {
        assert_eq!(bits(a), bits(&b), "final weights differ after resuming");
    }
    // The metrics file of the resumed run continues the first part: 30 lines, steps 1..=30.
    let metrics = std::fs::read_to_string(split.path().join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, (1..=30).collect::<Vec<_>>());
}

/// The staging directories (`.partial-*`) under the checkpoint root `root`.
fn staging_dirs(root: &Path) -> Vec<String> {
    std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".partial-"))
        .collect()
}

#[test]
fn a_crash_in_the_middle_of_a_save_leaves_the_previous_checkpoint_usable() {
    let mut cfg = small_config(2, ShardStrategy::FullShard, 12);
    cfg.checkpoint.every_steps = 4;
    let whole = tempfile::tempdir().unwrap();
    let full = run(&cfg, whole.path(), None, &Faults::default()).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let crash = Faults {
        fail_in_checkpoint_at_step: Some((1, 8)),
        ..Faults::default()
    };
    let err = run(&cfg, dir.path(), None, &crash).expect_err("rank 1 dies during the save");
    assert!(format!("{err:#}").contains("rank 1"), "{err:#}");
    let root = dir.path().join("checkpoints");
    assert_eq!(
        staging_dirs(&root),
        Vec::<String>::new(),
        "the failed save removed its staging directory"
    );
    assert!(!root.join("step-00000008").exists());
    let ckpt = Checkpoint::resolve(dir.path()).unwrap();
    assert_eq!(
        ckpt.meta.step, 4,
        "the newest finished checkpoint is the previous one"
    );
    ckpt.verify_all().unwrap();

    // Resuming in the same directory finishes the run exactly.
    let rest = run(&cfg, dir.path(), Some(ckpt), &Faults::default()).unwrap();
    assert_eq!(bits(&rest.losses), bits(&full.losses[4..]));
    assert_eq!(staging_dirs(&root), Vec::<String>::new());
    let kept: Vec<u64> = shardtrain::checkpoint::read::list_checkpoints(&root)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(kept, vec![8, 12], "keep_last 2 prunes the oldest");
}

#[test]
fn a_checkpoint_of_any_world_size_and_strategy_continues_on_any_other() {
    // The reference: one rank, 10 steps, no interruption.
    let reference = {
        let cfg = small_config(1, ShardStrategy::FullShard, 10);
        let dir = tempfile::tempdir().unwrap();
        run(&cfg, dir.path(), None, &Faults::default())
            .unwrap()
            .losses
    };
    let mut checked = 0;
    for save_world in 1..=4 {
        for (s, &save_strategy) in STRATEGIES.iter().enumerate() {
            let saved = tempfile::tempdir().unwrap();
            let cfg = small_config(save_world, save_strategy, 10);
            let first = run(&cfg, saved.path(), None, &stop_at(5)).unwrap();
            let ckpt_dir = first.checkpoint.unwrap();
            for load_world in (1..=4).filter(|&w| w != save_world) {
                let load_strategy = STRATEGIES[(s + load_world) % STRATEGIES.len()];
                let cfg = small_config(load_world, load_strategy, 10);
                let dir = tempfile::tempdir().unwrap();
                let ckpt = Checkpoint::open(&ckpt_dir).unwrap();
                let rest = run(&cfg, dir.path(), Some(ckpt), &Faults::default())
                    .unwrap_or_else(|e| panic!("{save_world} {save_strategy:?} -> {load_world} {load_strategy:?}: {e:#}"));
                for (i, (a, b)) in rest.losses.iter().zip(&reference[5..]).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 * b.abs(),
                        "saved at world {save_world} {save_strategy:?}, loaded at world {load_world} \
                         {load_strategy:?}: step {} loss {a} vs unsharded {b}",
                        i + 6
                    );
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 4 * 4 * 3);
}

#[test]
fn a_bf16_policy_checkpoint_reshards_too() {
    let with_bf16 = |world| {
        let mut cfg = small_config(world, ShardStrategy::FullShard, 8);
        cfg.parallel.mixed_precision.param_dtype = shardtrain::backend::DType::Bf16;
        cfg
    };
    let reference = {
        let dir = tempfile::tempdir().unwrap();
        run(&with_bf16(1), dir.path(), None, &Faults::default())
            .unwrap()
            .losses
    };
    let saved = tempfile::tempdir().unwrap();
    let first = run(&with_bf16(2), saved.path(), None, &stop_at(4)).unwrap();
    let ckpt = Checkpoint::open(&first.checkpoint.unwrap()).unwrap();
    assert_eq!(ckpt.meta.param_dtype, "bf16");
    let dir = tempfile::tempdir().unwrap();
    let rest = run(&with_bf16(3), dir.path(), Some(ckpt), &Faults::default()).unwrap();
    for (a, b) in rest.losses.iter().zip(&reference[4..]) {
        assert!((a - b).abs() <= 1e-3 * b.abs(), "{a} vs {b}");
    }
}

/// A finished two-rank checkpoint to damage, in its own directory.
fn a_checkpoint() -> (tempfile::TempDir, PathBuf, Config) {
    let cfg = small_config(2, ShardStrategy::FullShard, 6);
    let dir = tempfile::tempdir().unwrap();
    let s = run(&cfg, dir.path(), None, &stop_at(3)).unwrap();
    let ckpt = s.checkpoint.unwrap();
    (dir, ckpt, cfg)
}

fn open_err(dir: &Path) -> String {
    format!(
        "{:#}",
        Checkpoint::open(dir).expect_err("a damaged checkpoint is refused")
    )
}

#[test]
fn every_kind_of_damaged_checkpoint_is_an_error_naming_its_file() {
    // Truncated rank file.
    let (_keep, ckpt, cfg) = a_checkpoint();
    let file = ckpt.join("rank-00001.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let msg = open_err(&ckpt);
    assert!(
        msg.contains("rank-00001.safetensors") && msg.contains("truncated"),
        "{msg}"
    );

    // One flipped byte: same size; opening validates every file's checksum, and a reader that
    // skipped that (metadata taken as it is) still checks each file it reads.
    let (_keep, ckpt, _) = a_checkpoint();
    let file = ckpt.join("rank-00000.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();
    let msg = open_err(&ckpt);
    assert!(
        msg.contains("rank-00000.safetensors") && msg.contains("checksum"),
        "{msg}"
    );
    let opened = Checkpoint {
        dir: ckpt.clone(),
        meta: serde_json::from_str(&std::fs::read_to_string(ckpt.join("meta.json")).unwrap())
            .unwrap(),
    };
    let dir = tempfile::tempdir().unwrap();
    let msg = format!(
        "{:#}",
        run(&cfg, dir.path(), Some(opened), &Faults::default()).unwrap_err()
    );
    assert!(
        msg.contains("checksum"),
        "resuming from it fails too: {msg}"
    );

    // A missing rank file.
    let (_keep, ckpt, _) = a_checkpoint();
    std::fs::remove_file(ckpt.join("rank-00001.safetensors")).unwrap();
    let msg = open_err(&ckpt);
    assert!(
        msg.contains("rank-00001.safetensors") && msg.contains("missing"),
        "{msg}"
    );

    // A checkpoint of another model shape.
    let (_keep, ckpt, mut other) = a_checkpoint();
    other.model.d_model = 32;
    let layout = ParamLayout::gpt(gpt_shape(&other), other.model.init_std);
    let msg = format!(
        "{:#}",
        Checkpoint::open(&ckpt)
            .unwrap()
            .check_layout(&layout)
            .unwrap_err()
    );
    assert!(
        msg.contains("step-00000003") && msg.contains("model shape"),
        "{msg}"
    );

    // A foreign file in place of the metadata, and a metadata file of another format.
    let (_keep, ckpt, _) = a_checkpoint();
    std::fs::write(
        ckpt.join("meta.json"),
        br#"{"architectures": ["GPT2LMHeadModel"]}"#,
    )
    .unwrap();
    let msg = open_err(&ckpt);
    assert!(
        msg.contains("meta.json") && msg.contains("not a shardtrain checkpoint"),
        "{msg}"
    );
    let (_keep, ckpt, _) = a_checkpoint();
    let meta = std::fs::read_to_string(ckpt.join("meta.json")).unwrap();
    std::fs::write(
        ckpt.join("meta.json"),
        meta.replace("shardtrain-checkpoint-v1", "v0"),
    )
    .unwrap();
    assert!(open_err(&ckpt).contains("format `v0`"));

    // A foreign safetensors file in place of a rank file, with its size and checksum recorded:
    // opening finds that the tensors the metadata promises are not in it.
    let (_keep, ckpt, _) = a_checkpoint();
    let foreign = ckpt.join("rank-00000.safetensors");
    let st = safetensors::serialize(
        [(
            "x",
            safetensors::tensor::TensorView::new(
                safetensors::tensor::Dtype::F32,
                vec![1],
                &[0u8; 4],
            )
            .unwrap(),
        )],
        None,
    )
    .unwrap();
    std::fs::write(&foreign, &st).unwrap();
    let meta_path = ckpt.join("meta.json");
    let mut meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&meta_path).unwrap()).unwrap();
    meta["files"][0]["bytes"] = st.len().into();
    meta["files"][0]["crc32"] = crc32fast::hash(&st).into();
    std::fs::write(&meta_path, serde_json::to_string(&meta).unwrap()).unwrap();
    let msg = open_err(&ckpt);
    assert!(
        msg.contains("rank-00000.safetensors") && msg.contains("missing"),
        "{msg}"
    );

    // A directory without any finished checkpoint.
    let empty = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(empty.path().join("checkpoints/.partial-step-00000004")).unwrap();
    let msg = format!("{:#}", Checkpoint::resolve(empty.path()).unwrap_err());
    assert!(msg.contains("no finished checkpoint"), "{msg}");
}

#[test]
fn a_save_never_replaces_an_existing_checkpoint_of_the_same_step() {
    let mut cfg = small_config(1, ShardStrategy::FullShard, 4);
    cfg.checkpoint.every_steps = 2;
    let dir = tempfile::tempdir().unwrap();
    run(&cfg, dir.path(), None, &Faults::default()).unwrap();
    let ckpt = Checkpoint::resolve(dir.path()).unwrap();
    let before = std::fs::read(ckpt.dir.join("meta.json")).unwrap();
    // Resuming from step 2 would write step 4 again: refused, and step 4 is left as it was.
    let step2 = dir.path().join("checkpoints/step-00000002");
    let err = run(
        &cfg,
        dir.path(),
        Some(Checkpoint::open(&step2).unwrap()),
        &Faults::default(),
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("already exists"), "{err:#}");
    assert_eq!(std::fs::read(ckpt.dir.join("meta.json")).unwrap(), before);
}
