//! A Hugging Face BERT `config.json`: the fields the architecture reads, checked before anything
//! is allocated from them.

use crate::io::IoError;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The fields of a Hugging Face BERT `config.json` that the architecture needs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: u32,
    /// `bert` (also when absent) or `mpnet`: see [`EncoderFamily`].
    #[serde(default)]
    pub model_type: Option<String>,
    /// MPNet's relative position buckets.
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
}

/// The encoders that share BERT's layer body (post-LN attention, GELU MLP, six linears) and
/// differ in what is around it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncoderFamily {
    Bert,
    /// MPNet: its own tensor names, no token types, positions counted from `pad_token_id + 1`
    /// (as RoBERTa), and a relative position bias added to every layer's attention scores.
    MPNet,
}

impl EncoderFamily {
    /// The checkpoint prefixes its tensors may carry (a task model's, then the bare model's).
    pub fn prefixes(self) -> &'static [&'static str] {
        match self {
            EncoderFamily::Bert => &["bert.", ""],
            EncoderFamily::MPNet => &["mpnet.", ""],
        }
    }

    /// PEFT's path of the layer list in the task model (`...ForSequenceClassification`).
    pub fn layers_path(self) -> &'static str {
        match self {
            EncoderFamily::Bert => "bert.encoder.layer",
            EncoderFamily::MPNet => "mpnet.encoder.layer",
        }
    }

    /// Paths of the six linears in a layer, in `bert::Site::ALL` order.
    pub fn site_paths(self) -> &'static [&'static str; 6] {
        match self {
            EncoderFamily::Bert => &[
                "attention.self.query",
                "attention.self.key",
                "attention.self.value",
                "attention.output.dense",
                "intermediate.dense",
                "output.dense",
            ],
            EncoderFamily::MPNet => &[
                "attention.attn.q",
                "attention.attn.k",
                "attention.attn.v",
                "attention.attn.o",
                "intermediate.dense",
                "output.dense",
            ],
        }
    }

    /// The attention block's LayerNorm, then the layer output's.
    pub fn layer_norm_paths(self) -> [&'static str; 2] {
        match self {
            EncoderFamily::Bert => ["attention.output.LayerNorm", "output.LayerNorm"],
            EncoderFamily::MPNet => ["attention.LayerNorm", "output.LayerNorm"],
        }
    }
}

fn default_act() -> String {
    "gelu".into()
}
fn default_dropout() -> f64 {
    0.1
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_buckets() -> usize {
    32
}

impl BertConfig {
    pub fn from_file(path: &Path) -> std::result::Result<Self, IoError> {
        let text = std::fs::read_to_string(path).map_err(|_| IoError::Missing {
            path: path.into(),
            what: "Hugging Face model config".into(),
        })?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| IoError::Invalid {
            path: path.into(),
            message: format!("not a BERT config ({e})"),
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    pub fn family(&self) -> EncoderFamily {
        match self.model_type.as_deref() {
            Some("mpnet") => EncoderFamily::MPNet,
            _ => EncoderFamily::Bert,
        }
    }

    /// Every size in range and consistent, with the file named in the error: checked before any
    /// tensor is read or allocated from these numbers.
    pub fn validate(&self, path: &Path) -> std::result::Result<(), IoError> {
        use super::limits;
        let bad = |message: String| IoError::Invalid {
            path: path.into(),
            message,
        };
        match self.model_type.as_deref() {
            None | Some("bert") | Some("mpnet") => {}
            Some(other) => {
                return Err(bad(format!(
                    "model_type '{other}' is not supported by the encoder (bert, mpnet)"
                )))
            }
        }
        if self.hidden_act != "gelu" {
            return Err(bad(format!(
                "hidden_act '{}' is not supported (only 'gelu')",
                self.hidden_act
            )));
        }
        super::check_sizes(
            path,
            &[
                ("vocab_size", self.vocab_size, limits::VOCAB),
                ("hidden_size", self.hidden_size, limits::HIDDEN),
                ("num_hidden_layers", self.num_hidden_layers, limits::LAYERS),
                (
                    "num_attention_heads",
                    self.num_attention_heads,
                    limits::HEADS,
                ),
                (
                    "intermediate_size",
                    self.intermediate_size,
                    limits::INTERMEDIATE,
                ),
                (
                    "max_position_embeddings",
                    self.max_position_embeddings,
                    limits::POSITIONS,
                ),
                ("type_vocab_size", self.type_vocab_size, limits::TYPE_VOCAB),
                (
                    "relative_attention_num_buckets",
                    self.relative_attention_num_buckets,
                    limits::TYPE_VOCAB,
                ),
            ],
        )?;
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(bad(format!(
                "hidden_size ({}) must be a multiple of num_attention_heads ({})",
                self.hidden_size, self.num_attention_heads
            )));
        }
        super::check_reals(
            path,
            &[
                ("hidden_dropout_prob", self.hidden_dropout_prob),
                (
                    "attention_probs_dropout_prob",
                    self.attention_probs_dropout_prob,
                ),
            ],
            true,
        )?;
        super::check_reals(path, &[("layer_norm_eps", self.layer_norm_eps)], false)?;
        if self.pad_token_id as usize >= self.vocab_size {
            return Err(bad(format!(
                "pad_token_id ({}) must be below vocab_size ({})",
                self.pad_token_id, self.vocab_size
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
impl BertConfig {
    /// A 3-layer, 8-wide BERT (vocabulary 50) for tests.
    pub(crate) fn tiny(dropout: f64) -> Self {
        Self {
            vocab_size: 50,
            hidden_size: 8,
            num_hidden_layers: 3,
            num_attention_heads: 2,
            intermediate_size: 16,
            hidden_act: "gelu".into(),
            hidden_dropout_prob: dropout,
            attention_probs_dropout_prob: dropout,
            max_position_embeddings: 16,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
            model_type: None,
            relative_attention_num_buckets: 32,
        }
    }
}
