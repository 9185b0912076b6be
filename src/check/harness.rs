//! Running one case on both backends: the same host values uploaded to each, outputs poisoned or
//! seeded, the op issued on each, then every output judged and every input checked unchanged.

use anyhow::{Context, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::compare::{compare_input, compare_output, BF16_TOLERANCE, F32_TOLERANCE, POISON};
use super::report::CaseResult;
use crate::backend::cpu::{CpuBackend, CpuBuf, CpuIds};
use crate::backend::{Backend, DType};

/// The backend every subject is compared with.
pub(crate) type Reference = CpuBackend<f64>;

/// One operand, on the subject (`s`) and on the reference (`r`).
pub(crate) struct Pair<S: Backend> {
    pub s: S::Buf,
    pub r: CpuBuf<f64>,
}

impl<S: Backend> Clone for Pair<S> {
    fn clone(&self) -> Self {
        Pair {
            s: self.s.clone(),
            r: self.r.clone(),
        }
    }
}

/// The same token ids on both backends.
pub(crate) struct IdsPair<S: Backend> {
    pub s: S::Ids,
    pub r: CpuIds,
}

enum Role {
    Input,
    /// Overwritten by the op; `poison` is what an unwritten element reads back as on the subject.
    Overwritten {
        poison: Option<u32>,
    },
    /// Read and written by the op (accumulated into, or updated in place).
    InPlace,
}

struct Operand<S: Backend> {
    name: &'static str,
    pair: Pair<S>,
    role: Role,
}

/// One case being set up and run: the operands it registered, and whether any of them is bf16.
pub(crate) struct Trial<'a, S: Backend> {
    subject: &'a S,
    reference: &'a Reference,
    operands: Vec<Operand<S>>,
    bf16: bool,
    /// Elements before each operand's first one in its allocation (see [`Trial::offset_views`]).
    view_offset: usize,
}

impl<'a, S: Backend> Trial<'a, S> {
    fn new(subject: &'a S, reference: &'a Reference) -> Self {
        Trial {
            subject,
            reference,
            operands: Vec::new(),
            bf16: false,
            view_offset: 0,
        }
    }

    /// Operands made after this call are views starting `elements` into their allocation, so a
    /// kernel sees addresses that are not 16-byte aligned (views may start at any element).
    pub(crate) fn offset_views(&mut self, elements: usize) {
        self.view_offset = elements;
    }

    /// A new `len`-element `dtype` buffer on each backend, at the current view offset.
    fn alloc_pair(&self, len: usize, dtype: DType) -> Result<(S::Buf, CpuBuf<f64>)> {
        let (off, total) = (self.view_offset, self.view_offset + len);
        let s = self.subject.alloc(total, dtype);
        let s = s.and_then(|s| self.subject.slice(&s, off, len))?;
        let r = self.reference.alloc(total, dtype)?;
        Ok((s, self.reference.slice(&r, off, len)?))
    }

    /// The reference backend, for computing inputs from its own outputs.
    pub(crate) fn reference(&self) -> &'a Reference {
        self.reference
    }

    /// `values` uploaded to a new `dtype` buffer on each backend.
    fn upload(&mut self, name: &'static str, values: &[f32], dtype: DType) -> Result<Pair<S>> {
        self.bf16 |= dtype == DType::Bf16;
        let pair = self.alloc_pair(values.len(), dtype);
        let (s, r) = pair.with_context(|| format!("allocating `{name}`"))?;
        let up = self.subject.upload(&s, values);
        up.with_context(|| format!("subject: uploading `{name}`"))?;
        self.reference.upload(&r, values)?;
        Ok(Pair { s, r })
    }

    fn register(&mut self, name: &'static str, pair: &Pair<S>, role: Role) {
        self.operands.push(Operand {
            name,
            pair: pair.clone(),
            role,
        });
    }

    /// An input holding `values` (rounded to `dtype`) on both backends.
    pub(crate) fn input(
        &mut self,
        name: &'static str,
        values: &[f32],
        dtype: DType,
    ) -> Result<Pair<S>> {
        let pair = self.upload(name, values, dtype)?;
        self.register(name, &pair, Role::Input);
        Ok(pair)
    }

    /// An output the op overwrites: NaN poison on the subject, zeros on the reference.
    pub(crate) fn overwritten(
        &mut self,
        name: &'static str,
        len: usize,
        dtype: DType,
    ) -> Result<Pair<S>> {
        self.bf16 |= dtype == DType::Bf16;
        let pair = self.alloc_pair(len, dtype);
        let (s, r) = pair.with_context(|| format!("allocating `{name}`"))?;
        let up = self.subject.upload(&s, &vec![POISON; len]);
        up.with_context(|| format!("subject: poisoning `{name}`"))?;
        // What a poisoned element reads back as (the payload may not survive every upload path).
        let back = self.subject.download(&s);
        let back = back.with_context(|| format!("subject: reading back poisoned `{name}`"))?;
        let poison = back.first().filter(|x| x.is_nan()).map(|x| x.to_bits());
        let pair = Pair { s, r };
        self.register(name, &pair, Role::Overwritten { poison });
        Ok(pair)
    }

    /// An output the op accumulates into or updates in place, starting from `values` on both.
    pub(crate) fn in_place(
        &mut self,
        name: &'static str,
        values: &[f32],
        dtype: DType,
    ) -> Result<Pair<S>> {
        let pair = self.upload(name, values, dtype)?;
        self.register(name, &pair, Role::InPlace);
        Ok(pair)
    }

    /// Token ids on both backends.
    pub(crate) fn ids(&self, ids: &[u32]) -> Result<IdsPair<S>> {
        Ok(IdsPair {
            s: self
                .subject
                .upload_ids(ids)
                .context("subject: uploading ids")?,
            r: self.reference.upload_ids(ids)?,
        })
    }

    /// Issues the op on both backends (`on_subject` and `on_reference` make the same call).
    pub(crate) fn run(
        &self,
        on_subject: impl FnOnce(&S) -> Result<()>,
        on_reference: impl FnOnce(&Reference) -> Result<()>,
    ) -> Result<()> {
        on_reference(self.reference).context("the reference failed")?;
        on_subject(self.subject).context("subject")?;
        self.subject.synchronize().context("subject: synchronize")
    }

    fn tolerance(&self) -> f64 {
        if self.bf16 {
            BF16_TOLERANCE
        } else {
            F32_TOLERANCE
        }
    }

    /// Reads every operand back from both backends and judges the case.
    fn judge(&self, op: &str, case: &str) -> Result<CaseResult> {
        let mut max_err = 0f64;
        let mut problems = Vec::new();
        for o in &self.operands {
            let s = self.subject.download(&o.pair.s);
            let s = s.with_context(|| format!("subject: downloading `{}`", o.name))?;
            let r = o.pair.r.to_vec();
            let poison = match o.role {
                Role::Input => {
                    problems.extend(compare_input(o.name, &s, &r));
                    continue;
                }
                Role::Overwritten { poison } => poison,
                Role::InPlace => None,
            };
            let verdict = compare_output(o.name, &s, &r, poison);
            // NaN (an output that could not be compared) wins over any number.
            max_err = if verdict.max_err.is_nan() {
                f64::NAN
            } else {
                max_err.max(verdict.max_err)
            };
            problems.extend(verdict.problem);
        }
        Ok(CaseResult {
            op: op.to_string(),
            case: case.to_string(),
            max_err,
            tolerance: self.tolerance(),
            problem: (!problems.is_empty()).then(|| problems.join("; ")),
        })
    }
}

/// The cases of one op being run: its random stream and the results so far.
pub(crate) struct Ctx<'a, S: Backend> {
    subject: &'a S,
    reference: &'a Reference,
    op: &'static str,
    rng: ChaCha8Rng,
    results: Vec<CaseResult>,
}

impl<'a, S: Backend> Ctx<'a, S> {
    pub(crate) fn new(
        subject: &'a S,
        reference: &'a Reference,
        op: &'static str,
        seed: u64,
    ) -> Self {
        Ctx {
            subject,
            reference,
            op,
            rng: ChaCha8Rng::seed_from_u64(seed ^ name_hash(op)),
            results: Vec::new(),
        }
    }

    /// The op's random stream, for values a case's description names (a scalar, for example).
    pub(crate) fn rng(&mut self) -> &mut ChaCha8Rng {
        &mut self.rng
    }

    /// Runs one case: `body` registers the operands and issues the op on both backends; then the
    /// operands are judged. An error anywhere (a subject op refusing the shapes, say) makes the case
    /// a failure whose problem is the error, and the next case runs.
    pub(crate) fn case(
        &mut self,
        case: String,
        body: impl FnOnce(&mut Trial<'a, S>, &mut ChaCha8Rng) -> Result<()>,
    ) {
        let mut trial = Trial::new(self.subject, self.reference);
        let outcome = body(&mut trial, &mut self.rng).and_then(|()| trial.judge(self.op, &case));
        self.results.push(outcome.unwrap_or_else(|e| CaseResult {
            op: self.op.to_string(),
            case,
            max_err: f64::NAN,
            tolerance: trial.tolerance(),
            problem: Some(format!("{e:#}")),
        }));
    }

    pub(crate) fn into_results(self) -> Vec<CaseResult> {
        self.results
    }
}

/// FNV-1a of the op name: each op's own random stream.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
