//! CPU matrix products through the `gemm` crate (multithreaded with rayon), plus the bias gradient.

use gemm::Parallelism;

use super::real::Real;
use crate::backend::MatmulSpec;

/// Below this many multiply-adds a single thread is faster than waking the pool.
const PARALLEL_MIN_FLOPS: usize = 1 << 18;

/// `out (+)= op(a) · op(b) (+ bias)` on row-major slices whose lengths the caller has checked.
pub fn matmul<T: Real>(out: &mut [T], a: &[T], b: &[T], bias: Option<&[T]>, s: MatmulSpec) {
    let (m, n, k) = (s.m, s.n, s.k);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !s.accumulate {
            out.fill(T::zero());
        }
    } else {
        // Strides in elements: (row stride, column stride) of each operand as the product sees it.
        let (a_rs, a_cs) = if s.trans_a { (1, m) } else { (k, 1) };
        let (b_rs, b_cs) = if s.trans_b { (1, k) } else { (n, 1) };
        let parallelism = if m * n * k >= PARALLEL_MIN_FLOPS {
            Parallelism::Rayon(0)
        } else {
            Parallelism::None
        };
        // SAFETY: the caller checked out.len() == m*n, a.len() == m*k, b.len() == k*n, so every
        // strided access below stays inside its slice; `out` does not alias `a` or `b` (&mut).
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                out.as_mut_ptr(),
                1,
                n as isize,
                s.accumulate,
                a.as_ptr(),
                a_cs as isize,
                a_rs as isize,
                b.as_ptr(),
                b_cs as isize,
                b_rs as isize,
                T::one(),
                T::one(),
                false,
                false,
                false,
                parallelism,
            );
        }
    }
    if let Some(bias) = bias {
        for row in out.chunks_exact_mut(n) {
            for (o, &b) in row.iter_mut().zip(bias) {
                *o += b;
            }
        }
    }
}

/// `dbias[c] += Σ_r dout[r, c]`.
pub fn bias_backward<T: Real>(dbias: &mut [T], dout: &[T], cols: usize) {
    if cols == 0 {
        return;
    }
    // Sum in a wider accumulator row so long batches do not lose low bits.
    let mut acc = vec![0f64; cols];
    for row in dout.chunks_exact(cols) {
        for (a, &d) in acc.iter_mut().zip(row) {
            *a += d.as_f64();
        }
    }
    for (d, a) in dbias.iter_mut().zip(acc) {
        *d += T::of_f64(a);
    }
}
