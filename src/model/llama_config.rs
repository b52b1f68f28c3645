//! A Hugging Face LLaMA-family `config.json` (transformers 4 and 5 layouts, rope scaling), checked
//! before anything is allocated from it.

use crate::io::IoError;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The fields of a Hugging Face LLaMA `config.json` (or of a GGUF file's `llama.*` metadata)
/// that the architecture needs. The same layout serves Mistral and Qwen2 (`model_type` `mistral`,
/// `qwen2`; Qwen2's q/k/v biases load when present).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width when the config states it (Llama 3.x, Mistral-Nemo); else
    /// `hidden_size / num_attention_heads`.
    #[serde(default, rename = "head_dim")]
    pub explicit_head_dim: Option<usize>,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Rotary frequency scaling: transformers 4's `rope_scaling`; [`LlamaConfig::from_file`] also
    /// reads transformers 5's `rope_parameters` (which carries `rope_theta` too) into it.
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default, deserialize_with = "one_token_id")]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence ids; Llama 3 instruct configs list several (generation stops at any).
    #[serde(default, deserialize_with = "token_ids")]
    pub eos_token_id: Vec<u32>,
}

/// The rotary scalings transformers applies to LLaMA-layout models (`rope_type`), with their
/// parameters. Others (`dynamic`, `yarn`, `longrope`) are refused by name when a config is read.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1's: low frequencies divided by `factor`, high ones kept, a smooth blend between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// One divisor per frequency: llama.cpp's `rope_freqs` tensor in a GGUF (Llama 3.1's scaling
    /// computed at conversion). Never read from a `config.json`.
    Factors {
        factors: Vec<f32>,
    },
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

/// A token id given as a number, a list of numbers, or null.
#[derive(Deserialize)]
#[serde(untagged)]
enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

fn token_ids<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<u32>, D::Error> {
    Ok(match Option::<TokenIds>::deserialize(d)? {
        None => Vec::new(),
        Some(TokenIds::One(id)) => vec![id],
        Some(TokenIds::Many(ids)) => ids,
    })
}

fn one_token_id<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<u32>, D::Error> {
    Ok(token_ids(d)?.first().copied())
}

/// Model types whose checkpoints have LLaMA's tensor names and computation.
const LLAMA_LAYOUT_TYPES: [&str; 3] = ["llama", "mistral", "qwen2"];

impl LlamaConfig {
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.explicit_head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Width of the query projection's output (and the output projection's input).
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim()
    }

    /// Rotary frequencies `inv_freq[i]`, one per pair of dimensions: `theta^(-2i/d)` (rounded to
    /// f32, as transformers keeps them), then the scaling.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim();
        let base: Vec<f32> = (0..d / 2)
            .map(|i| self.rope_theta.powf(-((2 * i) as f64) / d as f64) as f32)
            .collect();
        match &self.rope_scaling {
            None | Some(RopeScaling::Default) => base,
            Some(RopeScaling::Factors { factors }) => {
                base.iter().zip(factors).map(|(&f, &d)| f / d).collect()
            }
            Some(RopeScaling::Linear { factor }) => {
                base.iter().map(|&f| f / *factor as f32).collect()
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let (factor, low_freq_factor, high_freq_factor) =
                    (*factor, *low_freq_factor, *high_freq_factor);
                let old = *original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let f = f as f64;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        // transformers: `~(wavelen < high) * ~(wavelen > low)` (wavelengths are finite).
                        let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                        if medium {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            ((1.0 - smooth) * scaled / factor + smooth * scaled) as f32
                        } else {
                            scaled as f32
                        }
                    })
                    .collect()
            }
        }
    }

    /// Reads a Hugging Face `config.json` of a LLaMA-layout model, as transformers 4 or 5 writes it.
    pub fn from_file(path: &Path) -> std::result::Result<Self, IoError> {
        let text = std::fs::read_to_string(path).map_err(|_| IoError::Missing {
            path: path.into(),
            what: "Hugging Face model config".into(),
        })?;
        let bad = |message: String| IoError::Invalid {
            path: path.into(),
            message,
        };
        let mut v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("not a LLaMA config ({e})")))?;
        let obj = v
            .as_object_mut()
            .ok_or_else(|| bad("not a LLaMA config (not a JSON object)".into()))?;
        if let Some(t) = obj.get("model_type").and_then(|t| t.as_str()) {
            if !LLAMA_LAYOUT_TYPES.contains(&t) {
                return Err(bad(format!(
                    "model_type '{t}' is not supported (LLaMA layout: {}; or gpt2)",
                    LLAMA_LAYOUT_TYPES.join(", ")
                )));
            }
        }
        normalize_rope(obj).map_err(bad)?;
        let window = sliding_window(obj);
        let cfg: Self =
            serde_json::from_value(v).map_err(|e| bad(format!("not a LLaMA config ({e})")))?;
        cfg.validate(path)?;
        if let Some(w) = window.filter(|&w| w < cfg.max_position_embeddings) {
            return Err(bad(format!(
                "sliding-window attention ({w} tokens) is not supported; every position here attends \
                 to all earlier ones"
            )));
        }
        Ok(cfg)
    }

    /// Every checkpoint tensor's name and shape (no biases), for random models.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden_size;
        let mut shapes: Vec<(String, Vec<usize>)> = vec![
            ("model.embed_tokens.weight".into(), vec![self.vocab_size, h]),
            ("model.norm.weight".into(), vec![h]),
        ];
        if !self.tie_word_embeddings {
            shapes.push(("lm_head.weight".into(), vec![self.vocab_size, h]));
        }
        for i in 0..self.num_hidden_layers {
            let p = format!("model.layers.{i}");
            for s in super::llama::LlamaSite::ALL {
                let (o, inp) = s.shape(self);
                shapes.push((format!("{p}.{}.weight", s.path()), vec![o, inp]));
            }
            shapes.push((format!("{p}.input_layernorm.weight"), vec![h]));
            shapes.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        }
        shapes
    }

    /// Shape rules every loader checks, with the file named in the error.
    pub fn validate(&self, path: &Path) -> std::result::Result<(), IoError> {
        use super::limits;
        let bad = |message: String| IoError::Invalid {
            path: path.into(),
            message,
        };
        super::check_sizes(
            path,
            &[
                ("vocab_size", self.vocab_size, limits::VOCAB),
                ("hidden_size", self.hidden_size, limits::HIDDEN),
                (
                    "intermediate_size",
                    self.intermediate_size,
                    limits::INTERMEDIATE,
                ),
                ("num_hidden_layers", self.num_hidden_layers, limits::LAYERS),
                (
                    "num_attention_heads",
                    self.num_attention_heads,
                    limits::HEADS,
                ),
                ("num_key_value_heads", self.kv_heads(), limits::HEADS),
                (
                    "max_position_embeddings",
                    self.max_position_embeddings,
                    limits::POSITIONS,
                ),
            ],
        )?;
        if let Some(d) = self.explicit_head_dim {
            super::check_sizes(path, &[("head_dim", d, limits::HEAD_DIM)])?;
        }
        super::check_reals(path, &[("rms_norm_eps", self.rms_norm_eps)], false)?;
        let ids = self.bos_token_id.iter().map(|&id| ("bos_token_id", id));
        let ids = ids.chain(self.eos_token_id.iter().map(|&id| ("eos_token_id", id)));
        super::check_token_ids(path, ids, self.vocab_size)?;
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(bad(format!(
                "rope_theta = {} must be a finite number > 0",
                self.rope_theta
            )));
        }
        if self.num_attention_heads == 0
            || (self.explicit_head_dim.is_none()
                && !self.hidden_size.is_multiple_of(self.num_attention_heads))
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
        if self.head_dim() == 0 || !self.head_dim().is_multiple_of(2) {
            return Err(bad("rotary embeddings need an even head dimension".into()));
        }
        match self.rope_scaling {
            Some(RopeScaling::Linear { factor }) if factor <= 0.0 => {
                return Err(bad(format!(
                    "rope scaling factor {factor} must be positive"
                )))
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) if factor <= 0.0
                || low_freq_factor <= 0.0
                || high_freq_factor <= low_freq_factor
                || original_max_position_embeddings == 0 =>
            {
                return Err(bad(
                    "llama3 rope scaling needs factor > 0, 0 < low_freq_factor < high_freq_factor \
                     and original_max_position_embeddings > 0"
                        .into(),
                ))
            }
            _ => {}
        }
        Ok(())
    }
}

/// Puts the rotary settings in transformers 4's form: `rope_theta` at the top and `rope_scaling`
/// tagged by `rope_type`. Transformers 5 writes both inside `rope_parameters`; older files tag
/// the scaling `type`. A null or `default` scaling becomes none.
fn normalize_rope(
    obj: &mut serde_json::Map<String, serde_json::Value>,
) -> std::result::Result<(), String> {
    use serde_json::Value;
    let mut scaling = match obj.remove("rope_parameters") {
        Some(Value::Object(mut p)) => {
            if let Some(theta) = p.remove("rope_theta") {
                obj.insert("rope_theta".into(), theta);
            }
            Some(p)
        }
        Some(Value::Null) | None => None,
        Some(_) => return Err("rope_parameters is not an object".into()),
    };
    match obj.remove("rope_scaling") {
        Some(Value::Object(p)) if scaling.is_none() => scaling = Some(p),
        Some(Value::Object(_)) | Some(Value::Null) | None => {}
        Some(_) => return Err("rope_scaling is not an object".into()),
    }
    if let Some(mut p) = scaling {
        if !p.contains_key("rope_type") {
            if let Some(t) = p.remove("type") {
                p.insert("rope_type".into(), t);
            }
        }
        let kind = p.get("rope_type").and_then(|t| t.as_str()).unwrap_or("");
        match kind {
            "default" => {}
            "linear" | "llama3" => {
                obj.insert("rope_scaling".into(), Value::Object(p));
            }
            "" => return Err("rope scaling without a rope_type".into()),
            other => {
                return Err(format!(
                    "rope scaling '{other}' is not supported (default, linear, llama3)"
                ))
            }
        }
    }
    Ok(())
}

/// The attention window a config asks for: Mistral's `sliding_window`, Qwen2's when
/// `use_sliding_window` is on.
fn sliding_window(obj: &serde_json::Map<String, serde_json::Value>) -> Option<usize> {
    let w = obj.get("sliding_window")?.as_u64()? as usize;
    match obj.get("use_sliding_window") {
        Some(serde_json::Value::Bool(false)) => None,
        _ => Some(w),
    }
}
