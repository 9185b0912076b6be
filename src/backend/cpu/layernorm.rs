//! CPU LayerNorm forward and backward over the last dimension (rows in parallel).

use rayon::prelude::*;

use super::real::Real;

/// Overwrites `out`, `mean`, `rstd` for each row of `inp`.
pub fn layernorm_forward<T: Real>(
    out: &mut [T],
    mean: &mut [T],
    rstd: &mut [T],
    inp: &[T],
    weight: &[T],
    bias: &[T],
    cols: usize,
    eps: f32,
) {
    let eps = T::of_f32(eps);
    let n = T::from(cols).unwrap();
    out.par_chunks_mut(cols)
        .zip(inp.par_chunks(cols))
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .for_each(|((o, x), (mu, rs))| {
            let m = x.iter().copied().sum::<T>() / n;
            let var = x.iter().map(|&v| (v - m) * (v - m)).sum::<T>() / n;
            let r = T::one() / (var + eps).sqrt();
            for i in 0..cols {
                o[i] = (x[i] - m) * r * weight[i] + bias[i];
            }
            *mu = m;
            *rs = r;
        });
}

/// Accumulates `dinp`, `dweight`, `dbias` from `dout` (see the Backend docs).
pub fn layernorm_backward<T: Real>(
    dinp: &mut [T],
    dweight: &mut [T],
    dbias: &mut [T],
    dout: &[T],
    inp: &[T],
    weight: &[T],
    mean: &[T],
    rstd: &[T],
    cols: usize,
) {
    let n = T::from(cols).unwrap();
    dinp.par_chunks_mut(cols)
        .zip(dout.par_chunks(cols).zip(inp.par_chunks(cols)))
        .zip(mean.par_iter().zip(rstd.par_iter()))
        .for_each(|((dx, (dy, x)), (&m, &r))| {
            // dnorm = dy * w; dx = r * (dnorm - mean(dnorm) - norm * mean(dnorm * norm))
            let mut dnorm_mean = T::zero();
            let mut dnorm_norm_mean = T::zero();
            for i in 0..cols {
                let norm = (x[i] - m) * r;
                let dnorm = dy[i] * weight[i];
                dnorm_mean += dnorm;
                dnorm_norm_mean += dnorm * norm;
            }
            dnorm_mean /= n;
            dnorm_norm_mean /= n;
            for i in 0..cols {
                let norm = (x[i] - m) * r;
                let dnorm = dy[i] * weight[i];
                dx[i] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * r;
            }
        });
    // Parameter gradients reduce over rows: one pass, rows in order, so results are deterministic.
    for ((dy, x), (&m, &r)) in dout
        .chunks_exact(cols)
        .zip(inp.chunks_exact(cols))
        .zip(mean.iter().zip(rstd))
    {
        for i in 0..cols {
            let norm = (x[i] - m) * r;
            dweight[i] += dy[i] * norm;
            dbias[i] += dy[i];
        }
    }
}
