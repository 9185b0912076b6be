//! `shardtrain bench --predict`: the predicted op list against the ops a real training step calls
//! (the CPU backend under a counting wrapper, through the trainer itself), the FLOP totals
//! against the 6N + 12·L·d·T formula, bytes of memory-bound ops by hand, and the command line.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;

mod common;

use common::{small_config, text};
use shardtrain::backend::cpu::{CpuBackend, CpuBuf, CpuIds};
use shardtrain::backend::{AdamWSegment, AdamWStep, AttentionShape, Backend, DType, MatmulSpec};
use shardtrain::comm::local::{run_ranks, LocalWorld};
use shardtrain::config::{Config, DeviceKind, ShardStrategy};
use shardtrain::model::ParamLayout;
use shardtrain::plan::hardware::{resolve, GpuKind, HardwareOverrides};
use shardtrain::plan::ops::{causal_tile_pairs, step_calls, OpCall, OpClass};
use shardtrain::plan::roofline::{predict, CUDA_CORE, TENSOR_CORE};
use shardtrain::plan::{batch_split, Workload};
use shardtrain::shard::engine::RankComms;
use shardtrain::shard::ShardPlan;
use shardtrain::train::{self, train_rank, Faults};

// ------------------------------------------------------------ a backend that counts its ops

type Tally = Arc<Mutex<BTreeMap<&'static str, u64>>>;

/// The CPU backend, counting every op the CUDA backend's profiler times, by the same names; its
/// comm lane is a second counter, as the CUDA backend's lane has a profiler of its own.
struct Counting {
    cpu: CpuBackend<f32>,
    tally: Tally,
    lane: Option<Box<Counting>>,
}

impl Counting {
    fn new() -> Counting {
        let leaf = |lane| Counting {
            cpu: CpuBackend::new(),
            tally: Tally::default(),
            lane,
        };
        leaf(Some(Box::new(leaf(None))))
    }

    fn count(&self, op: &'static str) {
        *self.tally.lock().unwrap().entry(op).or_default() += 1;
    }
}

impl Backend for Counting {
    type Buf = CpuBuf<f32>;
    type Ids = CpuIds;
    type Event = ();

    fn name(&self) -> String {
        self.cpu.name()
    }
    fn alloc(&self, len: usize, dtype: DType) -> Result<Self::Buf> {
        self.cpu.alloc(len, dtype)
    }
    fn slice(&self, buf: &Self::Buf, offset: usize, len: usize) -> Result<Self::Buf> {
        self.cpu.slice(buf, offset, len)
    }
    fn upload(&self, dst: &Self::Buf, src: &[f32]) -> Result<()> {
        self.cpu.upload(dst, src)
    }
    fn download(&self, src: &Self::Buf) -> Result<Vec<f32>> {
        self.cpu.download(src)
    }
    fn upload_ids(&self, ids: &[u32]) -> Result<Self::Ids> {
        self.cpu.upload_ids(ids)
    }
    fn synchronize(&self) -> Result<()> {
        self.cpu.synchronize()
    }
    fn record_event(&self) -> Result<()> {
        self.cpu.record_event()
    }
    fn wait_event(&self, event: &()) -> Result<()> {
        self.cpu.wait_event(event)
    }
    fn comm_lane(&self) -> &Self {
        self.lane.as_deref().unwrap_or(self)
    }
    fn fill(&self, dst: &Self::Buf, value: f32) -> Result<()> {
        self.count("fill");
        self.cpu.fill(dst, value)
    }
    fn copy(&self, dst: &Self::Buf, src: &Self::Buf) -> Result<()> {
        self.count("copy");
        self.cpu.copy(dst, src)
    }
    fn scale(&self, dst: &Self::Buf, alpha: f32) -> Result<()> {
        self.count("scale");
        self.cpu.scale(dst, alpha)
    }
    fn add(&self, out: &Self::Buf, a: &Self::Buf, b: &Self::Buf) -> Result<()> {
        self.count("add");
        self.cpu.add(out, a, b)
    }
    fn accumulate(&self, dst: &Self::Buf, src: &Self::Buf) -> Result<()> {
        self.count("accumulate");
        self.cpu.accumulate(dst, src)
    }
    fn matmul(
        &self,
        out: &Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        bias: Option<&Self::Buf>,
        spec: MatmulSpec,
    ) -> Result<()> {
        self.count("matmul");
        self.cpu.matmul(out, a, b, bias, spec)
    }
    // The fused linear ops count as one call each, as CUDA profiles them (when the epilogue
    // applies), not as the plain ops the CPU composes them from.
    fn matmul_gelu(
        &self,
        out: &Self::Buf,
        pre: &Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        bias: Option<&Self::Buf>,
        spec: MatmulSpec,
    ) -> Result<()> {
        self.count("matmul_gelu");
        self.cpu.matmul_gelu(out, pre, a, b, bias, spec)
    }
    fn matmul_dgelu(
        &self,
        dpre: &Self::Buf,
        dbias: Option<&Self::Buf>,
        a: &Self::Buf,
        b: &Self::Buf,
        pre: &Self::Buf,
        spec: MatmulSpec,
    ) -> Result<()> {
        self.count("matmul_dgelu");
        self.cpu.matmul_dgelu(dpre, dbias, a, b, pre, spec)
    }
    fn matmul_bias_grad(
        &self,
        out: &Self::Buf,
        dbias: &Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        spec: MatmulSpec,
    ) -> Result<()> {
        self.count("matmul_bias_grad");
        self.cpu.matmul_bias_grad(out, dbias, a, b, spec)
    }
    fn matmul_residual(
        &self,
        out: &Self::Buf,
        residual: &Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        bias: Option<&Self::Buf>,
        spec: MatmulSpec,
    ) -> Result<()> {
        self.count("matmul_residual");
        self.cpu.matmul_residual(out, residual, a, b, bias, spec)
    }
    fn bias_backward(
        &self,
        db: &Self::Buf,
        dout: &Self::Buf,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        self.count("bias_backward");
        self.cpu.bias_backward(db, dout, rows, cols)
    }
    fn layernorm_forward(
        &self,
        out: &Self::Buf,
        mean: &Self::Buf,
        rstd: &Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        bias: &Self::Buf,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        self.count("layernorm_forward");
        self.cpu
            .layernorm_forward(out, mean, rstd, inp, weight, bias, rows, cols)
    }
    fn layernorm_backward(
        &self,
        dinp: &Self::Buf,
        dweight: &Self::Buf,
        dbias: &Self::Buf,
        dout: &Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        mean: &Self::Buf,
        rstd: &Self::Buf,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        self.count("layernorm_backward");
        self.cpu.layernorm_backward(
            dinp, dweight, dbias, dout, inp, weight, mean, rstd, rows, cols,
        )
    }
    fn gelu_forward(&self, out: &Self::Buf, inp: &Self::Buf) -> Result<()> {
        self.count("gelu_forward");
        self.cpu.gelu_forward(out, inp)
    }
    fn gelu_backward(&self, dinp: &Self::Buf, inp: &Self::Buf, dout: &Self::Buf) -> Result<()> {
        self.count("gelu_backward");
        self.cpu.gelu_backward(dinp, inp, dout)
    }
    fn attention_forward(
        &self,
        out: &Self::Buf,
        lse: &Self::Buf,
        qkv: &Self::Buf,
        shape: AttentionShape,
    ) -> Result<()> {
        self.count("attention_forward");
        self.cpu.attention_forward(out, lse, qkv, shape)
    }
    fn attention_backward(
        &self,
        dqkv: &Self::Buf,
        dout: &Self::Buf,
        qkv: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        shape: AttentionShape,
    ) -> Result<()> {
        self.count("attention_backward");
        self.cpu
            .attention_backward(dqkv, dout, qkv, out, lse, shape)
    }
    fn embedding_forward(
        &self,
        out: &Self::Buf,
        ids: &Self::Ids,
        wte: &Self::Buf,
        wpe: &Self::Buf,
        batch: usize,
        seq: usize,
        channels: usize,
    ) -> Result<()> {
        self.count("embedding_forward");
        self.cpu
            .embedding_forward(out, ids, wte, wpe, batch, seq, channels)
    }
    fn embedding_backward(
        &self,
        dwte: &Self::Buf,
        dwpe: &Self::Buf,
        dout: &Self::Buf,
        ids: &Self::Ids,
        batch: usize,
        seq: usize,
        channels: usize,
    ) -> Result<()> {
        self.count("embedding_backward");
        self.cpu
            .embedding_backward(dwte, dwpe, dout, ids, batch, seq, channels)
    }
    fn cross_entropy(
        &self,
        losses: &Self::Buf,
        logits: &Self::Buf,
        targets: &Self::Ids,
        rows: usize,
        vocab: usize,
        grad_scale: Option<f32>,
    ) -> Result<()> {
        self.count("cross_entropy");
        self.cpu
            .cross_entropy(losses, logits, targets, rows, vocab, grad_scale)
    }
    fn adamw(
        &self,
        param: &Self::Buf,
        grad: &Self::Buf,
        m: &Self::Buf,
        v: &Self::Buf,
        param_copy: Option<&Self::Buf>,
        hp: &AdamWStep,
    ) -> Result<()> {
        self.count("adamw");
        self.cpu.adamw(param, grad, m, v, param_copy, hp)
    }
    // Profiled under "adamw" on CUDA, one launch per call.
    fn adamw_segments(
        &self,
        param: &Self::Buf,
        grad: &Self::Buf,
        m: &Self::Buf,
        v: &Self::Buf,
        param_copy: Option<&Self::Buf>,
        segments: &[AdamWSegment],
        hp: &AdamWStep,
    ) -> Result<()> {
        self.count("adamw");
        self.cpu
            .adamw_segments(param, grad, m, v, param_copy, segments, hp)
    }
    fn sum_squares(&self, acc: &Self::Buf, x: &Self::Buf) -> Result<()> {
        self.count("sum_squares");
        self.cpu.sum_squares(acc, x)
    }
}

/// Rank 0's compute-queue op counts of a whole training run of `cfg` (all its ranks as threads).
fn counted_run(cfg: &Config) -> BTreeMap<&'static str, u64> {
    let plan = ShardPlan::new(&cfg.parallel);
    let n = plan.world_size;
    let world = LocalWorld::new(n, Duration::from_secs(30));
    // One communicator per rank and group, as the trainer's own rank_comms builds them.
    let mut comms: Vec<[Option<_>; 3]> = (0..n).map(|_| [None, None, None]).collect();
    for (slot, groups) in [
        vec![(0..n).collect::<Vec<_>>()],
        plan.all_shard_groups(),
        plan.all_replica_groups(),
    ]
    .into_iter()
    .enumerate()
    {
        for ranks in groups {
            for (r, comm) in ranks.iter().zip(world.group(&ranks)) {
                comms[*r][slot] = Some(comm);
            }
        }
    }
    let comms: Vec<Mutex<Option<RankComms<_>>>> = comms
        .into_iter()
        .map(|[w, s, r]| {
            Mutex::new(Some(RankComms {
                world: w.unwrap(),
                shard: s.unwrap(),
                replica: r.unwrap(),
            }))
        })
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let start = train::start_of(cfg, None).expect("start");
    let tallies = run_ranks(&world, |rank, _| {
        let be = Counting::new();
        let tally = be.tally.clone();
        let rc = comms[rank].lock().unwrap().take().expect("one per rank");
        train_rank(
            be,
            rank,
            cfg,
            dir.path(),
            &start,
            &Faults::default(),
            rc,
            "test",
        )?;
        let counted = tally.lock().unwrap().clone();
        Ok(counted)
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
    tallies.into_iter().next().expect("rank 0")
}

/// The ops of one optimizer step as rank 0 calls them: a 2-step run less a 1-step run (whatever
/// a run does once, before or after its steps, cancels).
fn counted_step(cfg: &Config) -> BTreeMap<&'static str, u64> {
    let mut one = cfg.clone();
    one.train.max_steps = 1;
    let mut two = cfg.clone();
    two.train.max_steps = 2;
    let (a, b) = (counted_run(&one), counted_run(&two));
    b.iter()
        .map(|(op, n)| (*op, n - a.get(op).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

fn predicted_step(cfg: &Config) -> BTreeMap<&'static str, u64> {
    let w = Workload::from_config(cfg);
    let plan = ShardPlan::new(&cfg.parallel);
    let accum = batch_split(&w, plan.world_size).accum;
    assert_eq!(accum, cfg.train.grad_accum_steps(plan.world_size));
    let mut by_op = BTreeMap::new();
    for k in [CUDA_CORE, TENSOR_CORE] {
        let mut calls = BTreeMap::new();
        for c in step_calls(&w, &plan, accum, &k) {
            *calls.entry(c.op).or_default() += c.calls;
        }
        if !by_op.is_empty() {
            assert_eq!(by_op, calls, "both kernel profiles call the same ops");
        }
        by_op = calls;
    }
    by_op
}

fn job(
    world: usize,
    strategy: ShardStrategy,
    param: DType,
    reduce: DType,
    global: usize,
) -> Config {
    let mut cfg = small_config(world, strategy, 2);
    cfg.device = DeviceKind::Cpu;
    cfg.checkpoint.save_final = false;
    cfg.train.global_batch_size = global;
    cfg.parallel.mixed_precision.param_dtype = param;
    cfg.parallel.mixed_precision.reduce_dtype = reduce;
    cfg.validate().expect("the test job is valid");
    cfg
}

#[test]
fn every_op_a_step_calls_is_predicted_with_its_call_count() {
    let cases = [
        // One rank, f32: gradients straight into the shards.
        job(1, ShardStrategy::FullShard, DType::F32, DType::F32, 2),
        // bf16 compute, bf16 reduce, 2 micro-batches: gradients added into the f32 shards after
        // each, AdamW writing the bf16 copy.
        job(1, ShardStrategy::FullShard, DType::Bf16, DType::Bf16, 4),
        // Two ranks sharding, 2 micro-batches: each reduces; rank 0's shard has its own segments.
        job(2, ShardStrategy::FullShard, DType::Bf16, DType::F32, 8),
        // shard_grad_op reduces once per step.
        job(2, ShardStrategy::ShardGradOp, DType::F32, DType::F32, 8),
    ];
    for cfg in &cases {
        let p = &cfg.parallel;
        let what = format!(
            "world {} {:?} {:?}",
            p.world_size, p.strategy, p.mixed_precision
        );
        assert_eq!(predicted_step(cfg), counted_step(cfg), "{what}");
    }
}

// ------------------------------------------------------------ FLOPs and bytes

fn gpt2() -> Config {
    let mut cfg = Config::load(Some(Path::new("configs/gpt2-124m.yaml")), &[]).unwrap();
    cfg.train.global_batch_size = cfg.train.micro_batch_size;
    cfg
}

fn calls_of(cfg: &Config) -> (Workload, Vec<OpCall>) {
    let w = Workload::from_config(cfg);
    let plan = ShardPlan::new(&cfg.parallel);
    let calls = step_calls(&w, &plan, 1, &CUDA_CORE);
    (w, calls)
}

fn total(calls: &[OpCall], op: &str, f: fn(&OpCall) -> f64) -> f64 {
    calls
        .iter()
        .filter(|c| c.op == op)
        .map(|c| c.calls as f64 * f(c))
        .sum()
}

/// Every op name under which a matmul is profiled.
const MATMUL_OPS: [&str; 5] = [
    "matmul",
    "matmul_gelu",
    "matmul_dgelu",
    "matmul_bias_grad",
    "matmul_residual",
];

#[test]
fn matmul_flops_are_six_n_per_token_less_the_parameters_no_matmul_uses() {
    let cfg = gpt2();
    let (w, calls) = calls_of(&cfg);
    let tokens = (w.micro_batch * w.seq_len) as f64;
    let layout = ParamLayout::gpt(w.shape, 0.02);
    // Parameters outside every matmul: the position table, LayerNorms and biases (wte is the
    // tied head's weight, so it is in one).
    let outside: usize = layout
        .tensors()
        .filter(|(_, t)| t.name == "wpe" || t.name.contains("ln") || t.name.ends_with(".bias"))
        .map(|(_, t)| t.numel())
        .sum();
    let (l, c, v, t) = (12.0, 768.0, 50304.0, 1024.0);
    assert_eq!(outside as f64, t * c + l * (4.0 * c + 9.0 * c) + 2.0 * c);
    let expected = 6.0 * tokens * (w.params() - outside) as f64;
    // The plain products and those with a cuBLASLt epilogue.
    let products =
        |f: fn(&OpCall) -> f64| -> f64 { MATMUL_OPS.iter().map(|op| total(&calls, op, f)).sum() };
    assert_eq!(products(|c| c.flops()), expected);
    assert_eq!(products(|c| c.model_flops()), expected);
    assert_eq!(expected, 6.0 * tokens * (l * 12.0 * c * c + v * c));
    // With attention's 12·L·d·T, the model FLOPs are the formula bench and plan use, less 6 x
    // the parameters outside matmuls.
    let model: f64 = calls.iter().map(|c| c.calls as f64 * c.model_flops()).sum();
    let formula = tokens * w.flops_per_token();
    assert!(
        (model - (formula - 6.0 * tokens * outside as f64)).abs() < 1.0,
        "{model} {formula}"
    );
}

#[test]
fn attention_flops_are_twelve_l_d_t_per_token_and_about_half_of_it_runs() {
    let cfg = gpt2();
    let (w, calls) = calls_of(&cfg);
    let tokens = (w.micro_batch * w.seq_len) as f64;
    let (l, d, t) = (12.0, 768.0, 1024.0);
    let fwd = total(&calls, "attention_forward", |c| c.model_flops());
    let bwd = total(&calls, "attention_backward", |c| c.model_flops());
    // The convention counts the full T x T scores (4 forward, 8 backward): no causal half.
    assert_eq!(fwd, 4.0 * l * d * t * tokens);
    assert!((bwd - 8.0 * l * d * t * tokens).abs() < 1.0);
    // The kernels skip the tiles above the diagonal: 16 x 17 / 2 of 256 64-row tiles visited.
    let causal = causal_tile_pairs(1024, 64) / (t * t);
    assert_eq!(causal, 136.0 / 256.0);
    assert_eq!(
        total(&calls, "attention_forward", |c| c.flops()),
        fwd * causal
    );
    // Today's backward computes 7 products per pair (of the 4 counted), FlashAttention-2's 5.
    let executed = |k| {
        let plan = ShardPlan::new(&cfg.parallel);
        let c = step_calls(&w, &plan, 1, k);
        let tensor_work = |c: &OpCall| {
            c.kernels
                .iter()
                .filter(|k| k.class == OpClass::Attention)
                .map(|k| k.flops)
                .sum()
        };
        total(&c, "attention_backward", tensor_work)
    };
    assert!((executed(&CUDA_CORE) - bwd * causal * 7.0 / 4.0).abs() < 1.0);
    assert!((executed(&TENSOR_CORE) - bwd * causal * 7.0 / 4.0).abs() < 1.0);
}

#[test]
fn bytes_of_memory_bound_ops_match_a_hand_count() {
    // small_config: L2, d16, h2, V256 (the default), T16, micro 2: 32 tokens.
    let cfg = job(1, ShardStrategy::FullShard, DType::Bf16, DType::F32, 2);
    let (w, calls) = calls_of(&cfg);
    assert_eq!((w.micro_batch * w.seq_len, w.shape.d_model), (32, 16));
    let one = |op: &str, what: &str| {
        calls
            .iter()
            .find(|c| c.op == op && c.what == what)
            .unwrap_or_else(|| panic!("no {op} {what}"))
            .bytes()
    };
    // LayerNorm forward: 32 x 16 bf16 read and written, 16 + 16 bf16 weight and bias read,
    // 32 + 32 f32 mean and rstd written.
    assert_eq!(
        one("layernorm_forward", "lnf"),
        (2 * 512 * 2 + 32 * 2 + 64 * 4) as f64
    );
    // fc + GELU (32 x 64 from 32 x 16 and 64 x 16, bf16): both operands and the bias read, the
    // GELU output and the kept pre-activation written.
    assert_eq!(
        one("matmul_gelu", "fc forward + gelu"),
        ((512 + 1024) * 2 + 64 * 2 + 2 * 2048 * 2) as f64
    );
    // The attention projection writing the residual stream: operands, bias, the residual read
    // (C) and the output (D), all 32 x 16 bf16 but the 16 x 16 weight.
    assert_eq!(
        one("matmul_residual", "attn proj forward"),
        ((512 + 256) * 2 + 16 * 2 + 512 * 2 + 512 * 2) as f64
    );
    // fc proj's weight gradient (16 x 64, f32, accumulated) with its bias gradient: dout^T and
    // the GELU output read in bf16, the gradient read and written, the bias vector written once
    // and read and written by its accumulation.
    assert_eq!(
        one("matmul_bias_grad", "fc proj dweight + dbias"),
        ((16 * 32 + 32 * 64) * 2 + 2 * 16 * 64 * 4 + 3 * 16 * 4) as f64
    );
    // AdamW on bf16 parameters: 7 f32 accesses and a bf16 copy per element, one launch for the
    // root unit's pieces: wte (256 x 16), wpe (block_size x 16), lnf weight and bias (16 each).
    let adamw = calls.iter().find(|c| c.op == "adamw").unwrap();
    let root = 4096 + w.shape.block_size * 16 + 32;
    assert_eq!(adamw.bytes(), (root * (7 * 4 + 2)) as f64);
    // The lm head's dweight GEMM accumulates into f32: dlogits (32 x 256) and lnf (32 x 16) in
    // bf16, the f32 gradient read and written.
    assert_eq!(
        one("matmul", "lm head dweight"),
        ((32 * 256 + 32 * 16) * 2 + 2 * 256 * 16 * 4) as f64
    );
}

#[test]
fn gpt2_on_an_h200_predicts_faster_tensor_core_kernels_and_compares_with_torch() {
    let cfg = gpt2();
    let w = Workload::from_config(&cfg);
    let plan = ShardPlan::new(&cfg.parallel);
    let hw = resolve(GpuKind::H200, DType::Bf16, 8, HardwareOverrides::default()).unwrap();
    let current = predict(&w, &plan, &hw, &CUDA_CORE).unwrap();
    let tensor = predict(&w, &plan, &hw, &TENSOR_CORE).unwrap();
    for p in [&current, &tensor] {
        let sum: f64 = p.rows.iter().map(|r| r.predicted_ms).sum();
        assert!((p.step_ms - sum).abs() < 1e-9, "one GPU: no communication");
        assert_eq!(p.tokens_per_step, 16 * 1024);
        let mfu = p.tokens_per_s * w.flops_per_token() / 989e12;
        assert!((p.mfu - mfu).abs() < 1e-12);
        // Every op is at least as slow as at the card's peaks.
        assert!(p.rows.iter().all(|r| r.predicted_ms >= r.at_peak_ms));
    }
    // Matmuls cost the same in both; attention is what the tensor cores change.
    let row = |p: &shardtrain::plan::roofline::Prediction, op: &str| {
        p.rows.iter().find(|r| r.op == op).unwrap().predicted_ms
    };
    assert_eq!(row(&current, "matmul"), row(&tensor, "matmul"));
    assert!(row(&current, "attention_backward") > 10.0 * row(&tensor, "attention_backward"));
    assert!(tensor.step_ms < current.step_ms);
}

// ------------------------------------------------------------ the command line

fn shardtrain(args: &[&str]) -> Output {
    common::shardtrain_in(Path::new(env!("CARGO_MANIFEST_DIR")), args)
}

fn usage_error(args: &[&str], expected: &str) {
    let out = shardtrain(args);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}\nstderr:\n{stderr}");
    assert!(
        stderr.contains(expected),
        "{args:?}: expected {expected:?} in\n{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line:\n{stderr}");
}

const GPT2: &str = "configs/gpt2-124m.yaml";

#[test]
fn predict_prints_every_profiled_op_and_the_torch_ratio() {
    let args = [
        "bench",
        "--predict",
        "--gpu",
        "h200",
        "--config",
        GPT2,
        "--set",
        "train.global_batch_size=16",
    ];
    let out = shardtrain(&args);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        stdout.contains("PREDICTION") && stdout.contains("no GPU has run"),
        "{stdout}"
    );
    for op in [
        "matmul",
        "attention_forward",
        "attention_backward",
        "layernorm_backward",
        "adamw",
        "cross_entropy",
    ] {
        assert!(stdout.contains(op), "{op} missing:\n{stdout}");
    }
    assert!(stdout.contains("kernels: cuda-core") && stdout.contains("kernels: tensor-core"));
    assert!(
        stdout.contains("torch.compile") && stdout.contains("32.6 ms"),
        "{stdout}"
    );
    let mut json_args = args.to_vec();
    json_args.extend(["--json", "--kernels", "tensor-core"]);
    let out = shardtrain(&json_args);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["schema"], "shardtrain.predict/1");
    assert_eq!(v["predictions"].as_array().unwrap().len(), 1);
    assert_eq!(v["predictions"][0]["profile"]["name"], "tensor-core");
    assert!(
        v["torch_reference"]["predicted_over_reference"]
            .as_f64()
            .unwrap()
            > 0.0
    );
}

#[test]
fn predict_sets_a_measured_table_beside_the_prediction() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = gpt2();
    cfg.logging.profile_ops_steps = 2;
    std::fs::write(dir.path().join("config.yaml"), cfg.to_yaml()).unwrap();
    let summary = dir.path().join("summary.json");
    let op_times = r#"[{"op": "matmul", "calls": 294, "total_ms": 40.0},
                       {"op": "copy", "calls": 2, "total_ms": 0.2}]"#;
    std::fs::write(
        &summary,
        format!(r#"{{"steps": 5, "op_times": {op_times}}}"#),
    )
    .unwrap();
    let s = summary.to_str().unwrap();
    let out = shardtrain(&[
        "bench",
        "--predict",
        "--config",
        GPT2,
        "--set",
        "train.global_batch_size=16",
        "--measured",
        s,
        "--kernels",
        "tensor-core",
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let line = |op: &str| {
        stdout
            .lines()
            .rfind(|l| l.starts_with(&format!("{op} ")))
            .unwrap_or_else(|| panic!("no {op} row:\n{stdout}"))
            .to_string()
    };
    // 294 calls over 2 timed steps: 147 a step, as predicted; 20 ms a step.
    let matmul = line("matmul");
    assert!(
        matmul.contains("147.0") && matmul.contains("20.000"),
        "{matmul}"
    );
    assert!(
        line("copy").contains(" - "),
        "only measured: {}",
        line("copy")
    );
    // Files that are not a run's summary.
    std::fs::write(&summary, r#"{"steps": 5, "op_times": []}"#).unwrap();
    usage_error(
        &["bench", "--predict", "--config", GPT2, "--measured", s],
        "--measured",
    );
}

#[test]
fn bad_predict_input_exits_2_naming_the_key() {
    usage_error(
        &[
            "bench",
            "--predict",
            "--config",
            GPT2,
            "--set",
            "model.n_head=16",
        ],
        "model.n_head",
    );
    usage_error(
        &["bench", "--predict", "--config", GPT2, "--world", "1,2"],
        "--world",
    );
    usage_error(
        &["bench", "--predict", "--config", GPT2, "--hbm-bw=0"],
        "--hbm-bw",
    );
    usage_error(
        &[
            "bench",
            "--predict",
            "--config",
            GPT2,
            "--measured",
            "/nonexistent/summary.json",
        ],
        "--measured",
    );
    usage_error(
        &[
            "bench",
            "--predict",
            "--config",
            GPT2,
            "--set",
            "train.micro_batch_size=0",
        ],
        "train.micro_batch_size",
    );
    let out = shardtrain(&["bench", "--predict", "--config", GPT2, "--plot", "x.svg"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}
