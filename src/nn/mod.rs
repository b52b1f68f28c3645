//! Components with explicit forward and backward.
//!
//! Every component follows one contract: `forward` returns its output and, only when asked to save,
//! a small struct holding exactly what its `backward` needs; `backward` takes that struct and the
//! output gradient and returns the input gradient (plus gradients of trainable parameters, if the
//! component has any). Frozen weights never get a gradient. No candle autograd tape is involved:
//! tensors built here are plain values, so nothing is kept alive that the saved structs do not name.

pub mod attention;
pub mod cpu;
pub mod dropout;
pub mod embedding;
pub mod flops;
pub mod gelu;
pub mod head;
pub mod layer_norm;
pub mod linear;
pub mod loss;
pub mod rms_norm;
pub mod rope;
pub mod swiglu;

#[cfg(test)]
pub(crate) mod gradcheck;

pub use dropout::Dropout;
pub use flops::matmul;

/// Per-pass settings shared by every component: whether dropout is active and the seeded RNG it
/// draws masks from (candle's CPU RNG cannot be seeded, so masks are made on the host).
pub struct Pass<'a> {
    pub training: bool,
    pub rng: &'a mut rand::rngs::StdRng,
}
