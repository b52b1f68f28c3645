//! Training: configuration, the step (`step.rs`, top to bottom), the one training loop (`fit.rs`)
//! over a task (`trainer.rs`: classification, `lm.rs`: causal LM),
//! optimizer, checkpoints, memory accounting, metrics and SAFE reports.

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod fit;
pub mod frozen_cache;
pub mod importance;
pub mod lm;
pub mod lm_config;
pub mod memory;
pub mod metrics;
pub mod optim;
pub mod reports;
pub mod run;
pub mod step;
pub mod trainer;

/// Creates (or truncates) an output file, naming it in the error.
pub(crate) fn create_file(path: &std::path::Path) -> anyhow::Result<std::fs::File> {
    use anyhow::Context;
    std::fs::File::create(path).with_context(|| format!("{}: cannot create", path.display()))
}
