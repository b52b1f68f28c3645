//! LLaMA-family decoder (SmolLM2, LLaMA 2/3, Mistral layout): RMSNorm, rotary positions,
//! grouped-query causal attention, SwiGLU MLP, tied or untied LM head.

use crate::io::IoError;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The fields of a Hugging Face LLaMA `config.json` (or of a GGUF file's `llama.*` metadata)
/// that the architecture needs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
}

fn default_rms_eps() -> f64 {
    1e-5
}
fn default_rope_theta() -> f64 {
    10000.0
}
fn default_max_pos() -> usize {
    2048
}

impl LlamaConfig {
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    pub fn from_file(path: &Path) -> std::result::Result<Self, IoError> {
        let text = std::fs::read_to_string(path).map_err(|_| IoError::Missing {
            path: path.into(),
            what: "Hugging Face model config".into(),
        })?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| IoError::Invalid {
            path: path.into(),
            message: format!("not a LLaMA config ({e})"),
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Shape rules every loader checks, with the file named in the error.
    pub fn validate(&self, path: &Path) -> std::result::Result<(), IoError> {
        let bad = |message: String| IoError::Invalid {
            path: path.into(),
            message,
        };
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(bad(
                "hidden_size must be a multiple of num_attention_heads".into()
            ));
        }
        if self.kv_heads() == 0 || !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return Err(bad(
                "num_attention_heads must be a multiple of num_key_value_heads".into(),
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(bad("rotary embeddings need an even head dimension".into()));
        }
        Ok(())
    }
}
