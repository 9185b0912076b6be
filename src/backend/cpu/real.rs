//! The element type the CPU backend computes in: f32 for training, f64 for gradient checks.

use std::fmt::Debug;
use std::iter::Sum;

use num_traits::{Float, NumAssign};

/// A float the CPU kernels are generic over (implemented for f32 and f64 only: `gemm` dispatches
/// on exactly these).
pub trait Real: Float + NumAssign + Sum + Default + Debug + Send + Sync + 'static {
    fn of_f32(x: f32) -> Self;
    fn of_f64(x: f64) -> Self;
    fn as_f32(self) -> f32;
    fn as_f64(self) -> f64;
    /// Name for messages ("f32" / "f64").
    const NAME: &'static str;
}

impl Real for f32 {
    fn of_f32(x: f32) -> Self {
        x
    }
    fn of_f64(x: f64) -> Self {
        x as f32
    }
    fn as_f32(self) -> f32 {
        self
    }
    fn as_f64(self) -> f64 {
        self as f64
    }
    const NAME: &'static str = "f32";
}

impl Real for f64 {
    fn of_f32(x: f32) -> Self {
        x as f64
    }
    fn of_f64(x: f64) -> Self {
        x
    }
    fn as_f32(self) -> f32 {
        self as f32
    }
    fn as_f64(self) -> f64 {
        self
    }
    const NAME: &'static str = "f64";
}
