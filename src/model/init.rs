//! Deterministic initial weights: each tensor draws from its own ChaCha stream keyed by the seed
//! and the tensor's name, so a value depends on nothing but (seed, tensor, index): the same weights
//! come out whatever the world size, the unit grouping, or which rank materialises them.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::layout::{Init, TensorSpec};

/// FNV-1a of the tensor name: a stable per-tensor stream id.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The initial values of one tensor.
pub fn init_tensor(spec: &TensorSpec, seed: u64) -> Vec<f32> {
    let n = spec.numel();
    match spec.init {
        Init::Zeros => vec![0.0; n],
        Init::Ones => vec![1.0; n],
        Init::Normal { std } => {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ name_hash(&spec.name));
            (0..n).map(|_| std * standard_normal(&mut rng)).collect()
        }
    }
}

/// One N(0, 1) sample (Box–Muller; one of the pair is discarded to keep the stream simple).
fn standard_normal(rng: &mut ChaCha8Rng) -> f32 {
    // u1 in (0, 1] so the log is finite.
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, n: usize) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            shape: vec![n],
            offset: 0,
            decay: true,
            init: Init::Normal { std: 0.5 },
        }
    }

    #[test]
    fn normal_init_has_the_requested_spread_and_is_reproducible() {
        let v = init_tensor(&spec("w", 20_000), 3);
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / v.len() as f32;
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var.sqrt() - 0.5).abs() < 0.02, "std {}", var.sqrt());
        assert_eq!(v, init_tensor(&spec("w", 20_000), 3));
        assert_ne!(v, init_tensor(&spec("w", 20_000), 4));
        assert_ne!(v[..100], init_tensor(&spec("other", 100), 3)[..]);
    }
}
