//! safetune: memory-efficient adapter fine-tuning with SAFE (Selective Adapter FrEezing).
//!
//! Module map, bottom up (see ARCHITECTURE.md for the data flow of a training step):
//! - [`device`], [`memory`], [`files`]: infrastructure below everything else: devices and dtypes,
//!   memory accounting, atomic files.
//! - [`nn`]: components with explicit forward/backward (linear, norms, attention, ...), AdamW.
//! - [`adapters`]: LoRA beside frozen linears; a layer stack's adapters, `ParamId`.
//! - [`io`]: safetensors weights, PEFT files, merging, asset fetching.
//! - [`model`]: BERT, LLaMA family, GPT-2, assembled from `nn` and `adapters`.
//! - [`safe`]: SAFE's decisions, without tensors.
//! - [`train`]: the training loop over a task, checkpoints, SAFE's importance; [`cli`] on top.

pub mod adapters;
pub mod cli;
pub mod data;
pub mod device;
pub mod files;
pub mod io;
pub mod memory;
pub mod merge;
pub mod model;
pub mod nn;
pub mod report;
pub mod safe;
pub mod train;

/// The library's own tests read heap numbers, so they count allocations as the binary does.
#[cfg(test)]
#[global_allocator]
static TEST_ALLOCATOR: memory::CountingAllocator = memory::CountingAllocator;
