//! CPU fused softmax + cross-entropy, writing the logits' gradient in place (rows in parallel).

use rayon::prelude::*;

use super::real::Real;

/// Overwrites `losses`; with `grad_scale`, overwrites `logits` with `s * (softmax - onehot)`.
pub fn cross_entropy<T: Real>(
    losses: &mut [T],
    logits: &mut [T],
    targets: &[u32],
    vocab: usize,
    grad_scale: Option<T>,
) {
    logits
        .par_chunks_mut(vocab)
        .zip(losses.par_iter_mut().zip(targets.par_iter()))
        .for_each(|(row, (loss, &target))| {
            let max = row.iter().copied().fold(T::neg_infinity(), T::max);
            let sum: T = row.iter().map(|&x| (x - max).exp()).sum();
            let lse = max + sum.ln();
            *loss = lse - row[target as usize];
            if let Some(s) = grad_scale {
                for (j, x) in row.iter_mut().enumerate() {
                    let p = (*x - lse).exp();
                    let onehot = if j == target as usize {
                        T::one()
                    } else {
                        T::zero()
                    };
                    *x = s * (p - onehot);
                }
            }
        });
}
