//! Training: configuration, the step (`step.rs`, top to bottom), the one training loop (`fit.rs`)
//! over a task (`trainer.rs`: classification, `qa.rs`, `image.rs`, the three sharing
//! `encoder.rs`; `lm.rs`: causal LM), checkpoints, metrics and SAFE reports.

pub mod bench;
pub mod best;
pub mod checkpoint;
pub mod config;
pub mod encoder;
pub mod fit;
pub mod frozen_cache;
pub mod guard;
pub mod image;
pub mod importance;
pub mod lm;
pub mod lm_config;
pub mod metrics;
pub mod plan;
pub mod qa;
pub mod reports;
pub mod run;
pub mod squad_eval;
pub mod step;
pub mod step_log;
pub mod trainer;
