//! How one buffer of the subject is judged against the reference: the error metric, the
//! tolerances, and the poison that shows which elements an op never wrote.
//!
//! The metric is `max_i |s_i - r_i| / max(max_i |r_i|, tiny)`: the largest difference, scaled by the
//! largest reference magnitude of that output. A per-element relative error would be meaningless
//! here: outputs such as a LayerNorm's, a gradient's or a softmax's have elements at or near zero
//! whose relative error is huge for an absolute error far below rounding (an f32 sum of O(1) terms
//! that cancels to 1e-9 carries an absolute error of ~1e-7 from its terms). Scaling by the output's
//! own magnitude measures the error in units of "how big the values of this output are", which is
//! what rounding bounds: f32 arithmetic is off by ~1e-7 of that, bf16 storage by ~4e-3 (2^-8).

/// Tolerance of a case whose operands are all f32 (the subject computes in f32).
pub const F32_TOLERANCE: f64 = 1e-5;
/// Tolerance of a case with any bf16 operand (one rounding to bf16 is up to 2^-8 ≈ 3.9e-3).
pub const BF16_TOLERANCE: f64 = 1e-2;

/// What outputs an op overwrites hold on the subject before it runs: a quiet NaN with a payload, so
/// an element still holding it was (almost surely) never written, while a NaN the op computed has
/// the canonical payload. It stays a NaN when rounded to bf16 (the payload's top bits survive).
pub const POISON: f32 = f32::from_bits(0x7fe5_a5a5);

/// Denominator floor of the scaled error, for an output whose reference is all zeros.
const TINY: f64 = 1e-30;

/// How one output compares.
#[derive(Debug)]
pub(crate) struct Verdict {
    /// Scaled max error over the elements both sides have finite (see the module docs).
    pub max_err: f64,
    pub problem: Option<String>,
}

/// First index and count of the elements with one kind of problem.
#[derive(Default)]
struct Tally {
    first: Option<usize>,
    count: usize,
}

impl Tally {
    fn note(&mut self, i: usize) {
        self.first.get_or_insert(i);
        self.count += 1;
    }
}

/// Judges output `name`. `poison` is, for an output the op overwrites, the bits the subject reads
/// back from a poisoned element (usually [`POISON`], rounded to the buffer's dtype).
pub(crate) fn compare_output(
    name: &str,
    subject: &[f32],
    reference: &[f64],
    poison: Option<u32>,
) -> Verdict {
    if subject.len() != reference.len() {
        return Verdict {
            max_err: f64::NAN,
            problem: Some(format!(
                "`{name}` read back {} elements, not {}",
                subject.len(),
                reference.len()
            )),
        };
    }
    let (mut scale, mut max_diff) = (0f64, 0f64);
    let (mut unwritten, mut non_finite, mut bad_reference) =
        (Tally::default(), Tally::default(), Tally::default());
    for (i, (&s, &r)) in subject.iter().zip(reference).enumerate() {
        if !r.is_finite() {
            bad_reference.note(i);
        } else if s.is_finite() {
            scale = scale.max(r.abs());
            max_diff = max_diff.max((f64::from(s) - r).abs());
        } else {
            scale = scale.max(r.abs());
            if poison == Some(s.to_bits()) {
                unwritten.note(i);
            } else {
                non_finite.note(i);
            }
        }
    }
    let len = subject.len();
    let problem = if let Some(i) = bad_reference.first {
        Some(format!(
            "element {i} of `{name}` is {} in the reference: the case's inputs are out of range",
            reference[i]
        ))
    } else if let Some(i) = unwritten.first {
        Some(format!(
            "element {i} of `{name}` was not written ({} of {len} still hold the NaN poison)",
            unwritten.count
        ))
    } else {
        non_finite.first.map(|i| {
            format!(
                "element {i} of `{name}` is {} where the reference is {} ({} of {len} not finite)",
                subject[i], reference[i], non_finite.count
            )
        })
    };
    Verdict {
        max_err: max_diff / scale.max(TINY),
        problem,
    }
}

/// Checks that input `name` still holds what was uploaded (the reference's copy of the same host
/// values): an op must not write its inputs, and both backends must round uploads the same way.
pub(crate) fn compare_input(name: &str, subject: &[f32], reference: &[f64]) -> Option<String> {
    if subject.len() != reference.len() {
        return Some(format!(
            "input `{name}` read back {} elements, not {}",
            subject.len(),
            reference.len()
        ));
    }
    let changed = subject
        .iter()
        .zip(reference)
        .position(|(&s, &r)| f64::from(s).to_bits() != r.to_bits());
    changed.map(|i| {
        format!(
            "input `{name}` changed: element {i} is {}, {} was uploaded",
            subject[i], reference[i]
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaled_error_and_problems() {
        let v = compare_output("out", &[1.0, 0.0, -2.0], &[1.0, 1e-3, -2.0], None);
        assert!((v.max_err - 5e-4).abs() < 1e-9 && v.problem.is_none());

        let p = POISON.to_bits();
        let v = compare_output("out", &[1.0, POISON, POISON], &[1.0, 2.0, 3.0], Some(p));
        let problem = v.problem.unwrap();
        assert!(
            problem.contains("element 1 of `out` was not written (2 of 3"),
            "{problem}"
        );
        assert_eq!(v.max_err, 0.0);

        let v = compare_output("out", &[1.0, f32::NAN], &[1.0, 2.0], Some(p));
        assert!(v.problem.unwrap().contains("element 1 of `out` is NaN"));
        let v = compare_output("out", &[f32::INFINITY], &[2.0], None);
        assert!(v.problem.unwrap().contains("is inf"));

        assert!(compare_input("x", &[1.0, 2.0], &[1.0, 2.0]).is_none());
        assert!(compare_input("x", &[1.0, 2.5], &[1.0, 2.0])
            .unwrap()
            .contains("element 1"));
    }
}
