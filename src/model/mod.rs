//! The GPT model: parameter layout and initialisation, activations, and the forward pass with its
//! hand-written backward. Knows nothing of devices or ranks: it calls Backend ops and asks a
//! [`UnitAccess`] for each unit's weights.

pub mod activations;
pub mod gpt;
pub mod init;
pub mod layout;
pub mod units;

pub use gpt::Gpt;
pub use layout::{GptShape, ParamLayout};
pub use units::{ResidentParams, UnitAccess};
