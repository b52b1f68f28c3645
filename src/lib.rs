//! safetune: memory-efficient adapter fine-tuning with SAFE (Selective Adapter FrEezing).
//!
//! Module map (see ARCHITECTURE.md for the data flow of a training step):
//! - [`nn`]: components with explicit forward/backward (linear, layer norm, GELU, attention, ...).
//! - [`adapters`]: LoRA beside frozen linears.
//! - [`model`]: architectures (BERT) assembled from `nn` and `adapters`.
//! - [`io`]: safetensors weights, asset fetching.
//! - [`device`], [`memory`], [`files`]: infrastructure below everything else: devices and dtypes,
//!   memory accounting, atomic files.

pub mod adapters;
pub mod cli;
pub mod data;
pub mod device;
pub mod files;
pub mod io;
pub mod memory;
pub mod model;
pub mod nn;
pub mod report;
pub mod safe;
pub mod train;

/// The library's own tests read heap numbers, so they count allocations as the binary does.
#[cfg(test)]
#[global_allocator]
static TEST_ALLOCATOR: memory::CountingAllocator = memory::CountingAllocator;
