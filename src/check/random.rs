//! Host values the cases draw: seeded, never zero, of magnitudes the ops see in training.

use rand::RngExt;
use rand_chacha::ChaCha8Rng;

/// `n` values of magnitude in `[0.01, 1) * scale` with random signs: never zero.
pub(crate) fn uniform(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| signed(rng, 0.01 * scale, scale)).collect()
}

/// One value of magnitude in `[lo, hi)` with a random sign.
pub(crate) fn signed(rng: &mut ChaCha8Rng, lo: f32, hi: f32) -> f32 {
    let x = rng.random_range(lo..hi);
    if rng.random::<bool>() {
        x
    } else {
        -x
    }
}

/// `n` values uniform in `[lo, hi)`.
pub(crate) fn between(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// `n` samples of N(0, std²) (Box–Muller).
pub(crate) fn normal(rng: &mut ChaCha8Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1: f64 = 1.0 - rng.random::<f64>(); // in (0, 1]: the log is finite
            let u2: f64 = rng.random::<f64>();
            let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            std * z as f32
        })
        .collect()
}

/// `n` ids below `bound`; when `n >= 2` the second repeats the first, so every case has a repeated
/// id (accumulation of several rows into one).
pub(crate) fn ids(rng: &mut ChaCha8Rng, n: usize, bound: usize) -> Vec<u32> {
    let bound = u32::try_from(bound).expect("vocabulary fits in u32");
    let mut ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..bound)).collect();
    if n >= 2 {
        ids[1] = ids[0];
    }
    ids
}
