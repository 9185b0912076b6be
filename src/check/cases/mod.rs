//! The cases of every op: for each `Backend` method, the shapes and dtypes it is checked at.
//!
//! Each op family has its own file; each op is a function issuing its cases through
//! [`Ctx::case`]. Shapes include sizes that are not multiples of 32 or 64 and sizes of 1 where
//! they mean something, and stay moderate so a whole check with the CPU backend as subject takes
//! seconds.

mod attention;
mod elementwise;
mod embedding;
mod gelu;
mod layernorm;
mod linear;
mod linear_fused;
mod loss;
mod optim;

use super::harness::Ctx;
use crate::backend::Backend;

/// Issues one op's cases.
pub(crate) type OpCases<S> = fn(&mut Ctx<'_, S>);

/// Every op of the `Backend` trait with its cases, in the trait's order.
pub(crate) fn all<S: Backend>() -> Vec<(&'static str, OpCases<S>)> {
    vec![
        ("fill", elementwise::fill::<S>),
        ("copy", elementwise::copy::<S>),
        ("scale", elementwise::scale::<S>),
        ("add", elementwise::add::<S>),
        ("accumulate", elementwise::accumulate::<S>),
        ("matmul", linear::matmul::<S>),
        ("bias_backward", linear::bias_backward::<S>),
        ("matmul_gelu", linear_fused::matmul_gelu::<S>),
        ("matmul_dgelu", linear_fused::matmul_dgelu::<S>),
        ("matmul_bias_grad", linear_fused::matmul_bias_grad::<S>),
        ("matmul_residual", linear_fused::matmul_residual::<S>),
        ("layernorm_forward", layernorm::forward::<S>),
        ("layernorm_backward", layernorm::backward::<S>),
        ("gelu_forward", gelu::forward::<S>),
        ("gelu_backward", gelu::backward::<S>),
        ("attention_forward", attention::forward::<S>),
        ("attention_backward", attention::backward::<S>),
        ("embedding_forward", embedding::forward::<S>),
        ("embedding_backward", embedding::backward::<S>),
        ("cross_entropy", loss::cross_entropy::<S>),
        ("adamw", optim::adamw::<S>),
        ("adamw_segments", optim::adamw_segments::<S>),
        ("sum_squares", optim::sum_squares::<S>),
    ]
}
