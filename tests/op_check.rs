//! The op-by-op check harness (`shardtrain::check`): the CPU backend passes every case of every
//! op; a backend with planted bugs (an op that writes half its output, an op off by a little) is
//! caught, op by op, while its correct ops still pass; the filter selects ops by name.

use std::collections::BTreeSet;

use anyhow::Result;
use shardtrain::backend::cpu::{CpuBackend, CpuBuf, CpuIds};
use shardtrain::backend::{AdamWStep, AttentionShape, Backend, Buffer, DType, MatmulSpec};
use shardtrain::check::{check_ops, CheckOptions, CheckReport};

const ALL_OPS: [&str; 23] = [
    "fill",
    "scale",
    "add",
    "accumulate",
    "copy",
    "matmul",
    "matmul_gelu",
    "matmul_dgelu",
    "matmul_bias_grad",
    "matmul_residual",
    "bias_backward",
    "layernorm_forward",
    "layernorm_backward",
    "gelu_forward",
    "gelu_backward",
    "attention_forward",
    "attention_backward",
    "embedding_forward",
    "embedding_backward",
    "cross_entropy",
    "adamw",
    "adamw_segments",
    "sum_squares",
];

fn op_names(report: &CheckReport) -> BTreeSet<&str> {
    report.cases.iter().map(|c| c.op.as_str()).collect()
}

fn options(filter: Option<&str>) -> CheckOptions {
    CheckOptions {
        seed: 7,
        filter: filter.map(str::to_string),
    }
}

#[test]
fn cpu_backend_passes_every_case_of_every_op() {
    let report = check_ops(&CpuBackend::<f32>::new(), &options(None)).unwrap();
    let text = report.render();
    println!("{text}");
    assert_eq!(report.failures(), 0, "{text}");
    assert!(report
        .cases
        .iter()
        .all(|c| c.passed() && c.max_err.is_finite()));
    assert_eq!(op_names(&report), BTreeSet::from(ALL_OPS));
    // Both precisions are exercised, and the f32 cases are held to f32 accuracy.
    assert!(report.cases.iter().any(|c| c.tolerance == 1e-5));
    assert!(report.cases.iter().any(|c| c.tolerance == 1e-2));
    let summary = text.lines().last().unwrap();
    assert_eq!(summary, format!("{} cases, 0 failed", report.cases.len()));
    assert!(text.lines().next().unwrap().contains(&report.subject));
}

#[test]
fn planted_bugs_are_caught_and_correct_ops_still_pass() {
    let report = check_ops(&Faulty::default(), &options(None)).unwrap();
    let text = report.render();
    println!("{text}");
    let gelu: Vec<_> = report
        .cases
        .iter()
        .filter(|c| c.op == "gelu_forward")
        .collect();
    let norm: Vec<_> = report
        .cases
        .iter()
        .filter(|c| c.op == "layernorm_forward")
        .collect();
    assert!(!gelu.is_empty() && !norm.is_empty());
    for c in &gelu {
        // Cases read `n=1000 f32`: the first unwritten element is n / 2.
        let n: usize = c.case.split_whitespace().next().unwrap()[2..]
            .parse()
            .unwrap();
        let problem = c.problem.as_deref().unwrap_or_default();
        let expected = format!("element {} of `out` was not written", n / 2);
        assert!(
            !c.passed() && problem.contains(&expected),
            "gelu_forward {}: {problem}",
            c.case
        );
    }
    for c in &norm {
        // Written everywhere, so no problem: just an error over the tolerance (in f32, the 1e-3
        // on one element is 100x over it).
        assert!(
            c.problem.is_none() && c.max_err > c.tolerance,
            "layernorm_forward {}: {:?} {}",
            c.case,
            c.problem,
            c.max_err
        );
    }
    // The fused `matmul_gelu` keeps the default (a matmul, then the planted GELU): it fails too,
    // with its output half unwritten.
    let fused: Vec<_> = report
        .cases
        .iter()
        .filter(|c| c.op == "matmul_gelu")
        .collect();
    assert!(!fused.is_empty());
    for c in &fused {
        let problem = c.problem.as_deref().unwrap_or_default();
        assert!(
            !c.passed() && problem.contains("of `out` was not written"),
            "matmul_gelu {}: {problem}",
            c.case
        );
    }
    for c in &report.cases {
        if !["gelu_forward", "layernorm_forward", "matmul_gelu"].contains(&c.op.as_str()) {
            assert!(c.passed(), "{} {} failed: {:?}", c.op, c.case, c.problem);
        }
    }
    assert_eq!(report.failures(), gelu.len() + norm.len() + fused.len());
    let summary = text.lines().last().unwrap();
    assert!(
        summary.ends_with(&format!("{} failed", report.failures())),
        "{summary}"
    );
    assert!(text.contains("FAIL"));
}

#[test]
fn filter_runs_only_matching_ops() {
    let report = check_ops(&CpuBackend::<f32>::new(), &options(Some("layernorm"))).unwrap();
    assert_eq!(
        op_names(&report),
        BTreeSet::from(["layernorm_forward", "layernorm_backward"])
    );
    assert_eq!(report.failures(), 0, "{}", report.render());

    // The same seed gives a filtered run the same values as a full one: the same errors.
    let norms = check_ops(&Faulty::default(), &options(Some("layernorm_forward"))).unwrap();
    assert_eq!(op_names(&norms), BTreeSet::from(["layernorm_forward"]));
    assert!(norms.cases.iter().all(|c| !c.passed()));

    let err = check_ops(&CpuBackend::<f32>::new(), &options(Some("no_such_op"))).unwrap_err();
    assert!(err.to_string().contains("no_such_op"), "{err}");
}

/// `CpuBackend<f32>` with two planted bugs: `gelu_forward` writes only the first half of `out`,
/// and `layernorm_forward` is off on `out[0]` (by 1e-3 in f32, by 5% of the largest value in bf16,
/// where 1e-3 would vanish in rounding). Every other op delegates unchanged.
#[derive(Default)]
struct Faulty {
    inner: CpuBackend<f32>,
}

type Buf = CpuBuf<f32>;

impl Backend for Faulty {
    type Buf = Buf;
    type Ids = CpuIds;
    type Event = ();

    fn name(&self) -> String {
        format!("faulty {}", self.inner.name())
    }

    fn alloc(&self, len: usize, dtype: DType) -> Result<Buf> {
        self.inner.alloc(len, dtype)
    }

    fn slice(&self, buf: &Buf, offset: usize, len: usize) -> Result<Buf> {
        self.inner.slice(buf, offset, len)
    }

    fn upload(&self, dst: &Buf, src: &[f32]) -> Result<()> {
        self.inner.upload(dst, src)
    }

    fn download(&self, src: &Buf) -> Result<Vec<f32>> {
        self.inner.download(src)
    }

    fn upload_ids(&self, ids: &[u32]) -> Result<CpuIds> {
        self.inner.upload_ids(ids)
    }

    fn synchronize(&self) -> Result<()> {
        self.inner.synchronize()
    }

    fn record_event(&self) -> Result<()> {
        Ok(())
    }

    fn wait_event(&self, _event: &()) -> Result<()> {
        Ok(())
    }

    fn comm_lane(&self) -> &Self {
        self
    }

    fn fill(&self, dst: &Buf, value: f32) -> Result<()> {
        self.inner.fill(dst, value)
    }

    fn copy(&self, dst: &Buf, src: &Buf) -> Result<()> {
        self.inner.copy(dst, src)
    }

    fn scale(&self, dst: &Buf, alpha: f32) -> Result<()> {
        self.inner.scale(dst, alpha)
    }

    fn add(&self, out: &Buf, a: &Buf, b: &Buf) -> Result<()> {
        self.inner.add(out, a, b)
    }

    fn accumulate(&self, dst: &Buf, src: &Buf) -> Result<()> {
        self.inner.accumulate(dst, src)
    }

    fn matmul(
        &self,
        out: &Buf,
        a: &Buf,
        b: &Buf,
        bias: Option<&Buf>,
        spec: MatmulSpec,
    ) -> Result<()> {
        self.inner.matmul(out, a, b, bias, spec)
    }

    fn bias_backward(&self, dbias: &Buf, dout: &Buf, rows: usize, cols: usize) -> Result<()> {
        self.inner.bias_backward(dbias, dout, rows, cols)
    }

    fn layernorm_forward(
        &self,
        out: &Buf,
        mean: &Buf,
        rstd: &Buf,
        inp: &Buf,
        weight: &Buf,
        bias: &Buf,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        self.inner
            .layernorm_forward(out, mean, rstd, inp, weight, bias, rows, cols)?;
        let mut values = self.inner.download(out)?;
        let delta = match out.dtype() {
            DType::F32 => 1e-3,
            DType::Bf16 => 0.05 * values.iter().fold(0f32, |m, x| m.max(x.abs())),
        };
        values[0] += delta;
        self.inner.upload(out, &values)
    }

    fn layernorm_backward(
        &self,
        dinp: &Buf,
        dweight: &Buf,
        dbias: &Buf,
        dout: &Buf,
        inp: &Buf,
        weight: &Buf,
        mean: &Buf,
        rstd: &Buf,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        self.inner.layernorm_backward(
            dinp, dweight, dbias, dout, inp, weight, mean, rstd, rows, cols,
        )
    }

    fn gelu_forward(&self, out: &Buf, inp: &Buf) -> Result<()> {
        let full = self.inner.alloc(out.len(), out.dtype())?;
        self.inner.gelu_forward(&full, inp)?;
        let half = out.len() / 2;
        self.inner.copy(
            &self.inner.slice(out, 0, half)?,
            &self.inner.slice(&full, 0, half)?,
        )
    }

    fn gelu_backward(&self, dinp: &Buf, inp: &Buf, dout: &Buf) -> Result<()> {
        self.inner.gelu_backward(dinp, inp, dout)
    }

    fn attention_forward(
        &self,
        out: &Buf,
        lse: &Buf,
        qkv: &Buf,
        shape: AttentionShape,
    ) -> Result<()> {
        self.inner.attention_forward(out, lse, qkv, shape)
    }

    fn attention_backward(
        &self,
        dqkv: &Buf,
        dout: &Buf,
        qkv: &Buf,
        out: &Buf,
        lse: &Buf,
        shape: AttentionShape,
    ) -> Result<()> {
        self.inner
            .attention_backward(dqkv, dout, qkv, out, lse, shape)
    }

    fn embedding_forward(
        &self,
        out: &Buf,
        ids: &CpuIds,
        wte: &Buf,
        wpe: &Buf,
        batch: usize,
        seq: usize,
        channels: usize,
    ) -> Result<()> {
        self.inner
            .embedding_forward(out, ids, wte, wpe, batch, seq, channels)
    }

    fn embedding_backward(
        &self,
        dwte: &Buf,
        dwpe: &Buf,
        dout: &Buf,
        ids: &CpuIds,
        batch: usize,
        seq: usize,
        channels: usize,
    ) -> Result<()> {
        self.inner
            .embedding_backward(dwte, dwpe, dout, ids, batch, seq, channels)
    }

    fn cross_entropy(
        &self,
        losses: &Buf,
        logits: &Buf,
        targets: &CpuIds,
        rows: usize,
        vocab: usize,
        grad_scale: Option<f32>,
    ) -> Result<()> {
        self.inner
            .cross_entropy(losses, logits, targets, rows, vocab, grad_scale)
    }

    fn adamw(
        &self,
        param: &Buf,
        grad: &Buf,
        m: &Buf,
        v: &Buf,
        param_copy: Option<&Buf>,
        hp: &AdamWStep,
    ) -> Result<()> {
        self.inner.adamw(param, grad, m, v, param_copy, hp)
    }

    fn sum_squares(&self, acc: &Buf, x: &Buf) -> Result<()> {
        self.inner.sum_squares(acc, x)
    }
}
