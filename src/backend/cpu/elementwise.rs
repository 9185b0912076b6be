//! CPU elementwise kernels: residual add and accumulate, scale, GELU (tanh form).

use rayon::prelude::*;

use super::real::Real;

/// Elements per parallel task: small enough to spread, large enough to amortise the task.
const CHUNK: usize = 1 << 14;

pub fn add<T: Real>(out: &mut [T], a: &[T], b: &[T]) {
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(o, (a, b))| {
            for i in 0..o.len() {
                o[i] = a[i] + b[i];
            }
        });
}

pub fn accumulate<T: Real>(dst: &mut [T], src: &[T]) {
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| {
            for i in 0..d.len() {
                d[i] += s[i];
            }
        });
}

pub fn scale<T: Real>(dst: &mut [T], alpha: T) {
    dst.par_chunks_mut(CHUNK).for_each(|d| {
        for x in d {
            *x *= alpha;
        }
    });
}

/// `(1 + tanh(u), sech²(u))` from one exponential of a non-positive argument (libm's tanh is several
/// times slower and dominated the CPU profile). Written in terms of `e = exp(-2|u|)` so neither part
/// suffers cancellation: `1 + tanh` is `2/(1+e)` for u >= 0 and `2e/(1+e)` for u < 0, and
/// `sech² = 4e/(1+e)²`; both are accurate to a few ulp even where GELU's gradient is tiny.
fn tanh_parts<T: Real>(u: T) -> (T, T) {
    let two = T::of_f32(2.0);
    let e = (-two * u.abs()).exp();
    let d = T::one() + e;
    let one_plus_tanh = if u >= T::zero() { two / d } else { two * e / d };
    (one_plus_tanh, two * two * e / (d * d))
}

fn gelu_coeffs<T: Real>() -> (T, T) {
    // sqrt(2/pi) and the cubic coefficient of the tanh approximation.
    (
        T::of_f64((2.0 / std::f64::consts::PI).sqrt()),
        T::of_f64(0.044715),
    )
}

pub fn gelu_forward<T: Real>(out: &mut [T], inp: &[T]) {
    let (s, c) = gelu_coeffs::<T>();
    let half = T::of_f32(0.5);
    out.par_chunks_mut(CHUNK)
        .zip(inp.par_chunks(CHUNK))
        .for_each(|(o, x)| {
            for i in 0..o.len() {
                let x = x[i];
                o[i] = half * x * tanh_parts(s * (x + c * x * x * x)).0;
            }
        });
}

/// `gelu'(x)`, the factor the GELU backward multiplies the output gradient by.
#[inline]
fn gelu_slope<T: Real>(x: T) -> T {
    let (s, c) = gelu_coeffs::<T>();
    let half = T::of_f32(0.5);
    let three = T::of_f32(3.0);
    let u = s * (x + c * x * x * x);
    let (one_plus_tanh, sech2) = tanh_parts(u);
    let du = s * (T::one() + three * c * x * x);
    half * one_plus_tanh + half * x * sech2 * du
}

pub fn gelu_backward<T: Real>(dinp: &mut [T], inp: &[T], dout: &[T]) {
    dinp.par_chunks_mut(CHUNK)
        .zip(inp.par_chunks(CHUNK).zip(dout.par_chunks(CHUNK)))
        .for_each(|(dx, (x, dy))| {
            for i in 0..dx.len() {
                dx[i] = gelu_slope(x[i]) * dy[i];
            }
        });
}

/// [`gelu_backward`] with `dout` read from `d` and the result written over it (the fused
/// matmul + GELU backward, which has the matmul's output in place): the same arithmetic.
pub fn gelu_backward_in_place<T: Real>(d: &mut [T], inp: &[T]) {
    d.par_chunks_mut(CHUNK)
        .zip(inp.par_chunks(CHUNK))
        .for_each(|(d, x)| {
            for i in 0..d.len() {
                d[i] = gelu_slope(x[i]) * d[i];
            }
        });
}
