//! Model architectures, built from `nn` components and `adapters`.

pub mod bert;

pub use bert::{BertConfig, BertForSequenceClassification};
