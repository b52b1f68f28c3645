//! Adapters: trainable side paths beside frozen base layers (LoRA first).

pub mod lora;

pub use lora::{LoraAdapter, LoraConfig, LoraGrads, LoraLinear};
