//! Model architectures, built from `nn` components and `adapters`.

pub mod bert;
pub mod llama;

pub use bert::{BertConfig, BertForSequenceClassification};
pub use llama::LlamaConfig;
