//! safetune: memory-efficient adapter fine-tuning with SAFE (Selective Adapter FrEezing).
//!
//! Module map (see ARCHITECTURE.md for the data flow of a training step):
//! - [`nn`]: components with explicit forward/backward (linear, layer norm, GELU, attention, ...).
//! - [`adapters`]: LoRA beside frozen linears.
//! - [`model`]: architectures (BERT) assembled from `nn` and `adapters`.
//! - [`io`]: safetensors weights, asset fetching.
//! - [`device`]: `--device cpu|cuda|cuda:N` and `--dtype f32|bf16`.

pub mod adapters;
pub mod cli;
pub mod data;
pub mod device;
pub mod io;
pub mod model;
pub mod nn;
pub mod report;
pub mod safe;
pub mod train;
