//! Files in and out: checkpoint weights (safetensors, GGUF), asset fetching, PEFT adapter format.

pub mod fetch;
pub mod merge;
pub mod peft;
pub mod weights;

use std::path::PathBuf;

/// Errors reading or writing model files; each names the file and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("{path}: not found ({what})")]
    Missing { path: PathBuf, what: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: tensor '{name}' not found (tried {tried})")]
    MissingTensor {
        path: PathBuf,
        name: String,
        tried: String,
    },
    #[error("{path}: tensor '{name}' has shape {actual:?}, expected {expected:?}")]
    WrongShape {
        path: PathBuf,
        name: String,
        actual: Vec<usize>,
        expected: Vec<usize>,
    },
    /// A tensor key that names no trained tensor of the model (the caller names the file).
    #[error("tensor key '{key}' names no trained tensor of this model: {message}")]
    UnknownParam { key: String, message: String },
}
