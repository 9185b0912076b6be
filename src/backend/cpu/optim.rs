//! CPU AdamW update and sum of squares (for global-norm clipping).

use super::real::Real;
use crate::backend::AdamWStep;

/// One AdamW step over the whole slice; `copy` receives the new weights when given.
pub fn adamw<T: Real>(
    param: &mut [T],
    grad: &[T],
    m: &mut [T],
    v: &mut [T],
    mut copy: Option<&mut [T]>,
    hp: &AdamWStep,
) {
    let b1 = T::of_f32(hp.beta1);
    let b2 = T::of_f32(hp.beta2);
    let lr = T::of_f32(hp.lr);
    let eps = T::of_f32(hp.eps);
    let wd = T::of_f32(hp.weight_decay);
    let gs = T::of_f32(hp.grad_scale);
    let step = hp.step.max(1) as i32;
    let bc1 = T::one() - b1.powi(step);
    let bc2 = T::one() - b2.powi(step);
    for i in 0..param.len() {
        let g = grad[i] * gs;
        m[i] = b1 * m[i] + (T::one() - b1) * g;
        v[i] = b2 * v[i] + (T::one() - b2) * g * g;
        let m_hat = m[i] / bc1;
        let v_hat = v[i] / bc2;
        // Decoupled weight decay (Loshchilov & Hutter): shrink the weight, then take the Adam step.
        param[i] -= lr * (m_hat / (v_hat.sqrt() + eps) + wd * param[i]);
        if let Some(c) = copy.as_deref_mut() {
            c[i] = param[i];
        }
    }
}

/// `Σ x²` accumulated in f64.
pub fn sum_squares<T: Real>(x: &[T]) -> f64 {
    x.iter().map(|&v| v.as_f64() * v.as_f64()).sum()
}
