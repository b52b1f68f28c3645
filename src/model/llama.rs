//! LLaMA-family decoder (SmolLM2, LLaMA 2/3, Mistral layout): RMSNorm, rotary positions,
//! grouped-query causal attention, SwiGLU MLP, tied or untied LM head.

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
            for s in LlamaSite::ALL {
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

use super::causal::{self, DecoderParts};
use super::memory::{Acts, LayerMemory};
use crate::adapters::lora::{LoraGrads, LoraLinear, LoraLinearSaved};
use crate::adapters::{self, AdaptedStack};
use crate::adapters::{SiteBackward, SiteForward, SiteStates};
use crate::io::weights::Weights;
use crate::nn::attention::{Attention, AttentionSaved, AttnShape, KvCache};
use crate::nn::linear::{Linear, QuantFormat};
use crate::nn::rms_norm::{RmsNorm, RmsNormSaved};
use crate::nn::rope::Rope;
use crate::nn::swiglu::{self, SwiGluSaved};
use crate::nn::{Dropout, Pass};
use candle_core::{DType, Device, Result, Tensor};
use rand::Rng;

/// The seven linears of a LLaMA layer, named as Hugging Face (and PEFT's `target_modules`) name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LlamaSite {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LlamaSite {
    pub const ALL: [LlamaSite; 7] = [
        LlamaSite::Q,
        LlamaSite::K,
        LlamaSite::V,
        LlamaSite::O,
        LlamaSite::Gate,
        LlamaSite::Up,
        LlamaSite::Down,
    ];

    /// Path inside a layer, as in the checkpoint (and in PEFT's adapter keys).
    pub fn path(self) -> &'static str {
        match self {
            LlamaSite::Q => "self_attn.q_proj",
            LlamaSite::K => "self_attn.k_proj",
            LlamaSite::V => "self_attn.v_proj",
            LlamaSite::O => "self_attn.o_proj",
            LlamaSite::Gate => "mlp.gate_proj",
            LlamaSite::Up => "mlp.up_proj",
            LlamaSite::Down => "mlp.down_proj",
        }
    }

    /// `(out, in)` features of this linear.
    pub fn shape(self, c: &LlamaConfig) -> (usize, usize) {
        let (h, f, q, kv) = (
            c.hidden_size,
            c.intermediate_size,
            c.q_dim(),
            c.kv_heads() * c.head_dim(),
        );
        match self {
            LlamaSite::Q => (q, h),
            LlamaSite::O => (h, q),
            LlamaSite::K | LlamaSite::V => (kv, h),
            LlamaSite::Gate | LlamaSite::Up => (f, h),
            LlamaSite::Down => (h, f),
        }
    }
}

#[derive(Clone, Debug)]
pub struct LlamaLayer {
    /// Linears in `LlamaSite::ALL` order.
    pub linears: [LoraLinear; 7],
    pub attention: Attention,
    pub input_norm: RmsNorm,
    pub post_attention_norm: RmsNorm,
}

crate::adapters::block::impl_block!(LlamaLayer, LlamaSite);

/// What a layer on the gradient path keeps for backward.
pub struct LlamaLayerSaved {
    lin: SiteStates<LlamaSite, LoraLinearSaved>,
    input_norm: RmsNormSaved,
    attn: AttentionSaved,
    post_norm: RmsNormSaved,
    swiglu: SwiGluSaved,
}

/// Gradients of a layer's trainable adapters.
pub type LayerGrads = Vec<(LlamaSite, LoraGrads)>;

/// Gradients of every trainable adapter, by `(layer, site)`.
pub type SiteGrads = causal::SiteGrads<LlamaSite>;

/// Per-adapter monitoring output `(site, X adapted, Y base)`, as in BERT.
pub type LlamaMonitored = adapters::Monitored<LlamaSite>;

impl LlamaLayer {
    /// `x` is `[batch*seq, hidden]`; pre-norm residual blocks: `h = x + attn(norm(x))`,
    /// `out = h + mlp(norm(h))`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &Tensor,
        mask_add: &Tensor,
        shape: AttnShape,
        rope: &Rope,
        pass: &mut Pass,
        save: bool,
        monitor: Option<&mut LlamaMonitored>,
    ) -> Result<(Tensor, Option<LlamaLayerSaved>)> {
        let attend = |a: &Attention, qkv: (&Tensor, &Tensor, &Tensor), pass: &mut Pass| {
            a.forward(qkv, mask_add, shape, Some(rope), pass, save)
        };
        self.forward_with(x, attend, pass, save, monitor)
    }

    /// Inference forward of new positions of `batch` unpadded sequences whose earlier keys and
    /// values `cache` holds (generation).
    pub fn forward_cached(
        &self,
        x: &Tensor,
        batch: usize,
        rope: &Rope,
        cache: &mut KvCache,
        pass: &mut Pass,
    ) -> Result<Tensor> {
        let attend = |a: &Attention, qkv: (&Tensor, &Tensor, &Tensor), _: &mut Pass| {
            Ok((a.forward_cached(qkv, batch, Some(rope), cache)?, None))
        };
        Ok(self.forward_with(x, attend, pass, false, None)?.0)
    }

    /// The layer around its attention call, which `attend` makes.
    fn forward_with(
        &self,
        x: &Tensor,
        attend: impl FnOnce(
            &Attention,
            (&Tensor, &Tensor, &Tensor),
            &mut Pass,
        ) -> Result<(Tensor, Option<AttentionSaved>)>,
        pass: &mut Pass,
        save: bool,
        monitor: Option<&mut LlamaMonitored>,
    ) -> Result<(Tensor, Option<LlamaLayerSaved>)> {
        let mut lin = SiteForward::new(self, save, monitor);
        let (xn, input_norm) = self.input_norm.forward(x, save)?;
        let q = lin.run(LlamaSite::Q, &xn, pass)?;
        let k = lin.run(LlamaSite::K, &xn, pass)?;
        let v = lin.run(LlamaSite::V, &xn, pass)?;
        drop(xn);
        let (ctx, attn) = attend(&self.attention, (&q, &k, &v), pass)?;
        drop((q, k, v));
        let h = (x + lin.run(LlamaSite::O, &ctx, pass)?)?;
        drop(ctx);
        let (hn, post_norm) = self.post_attention_norm.forward(&h, save)?;
        let g = lin.run(LlamaSite::Gate, &hn, pass)?;
        let u = lin.run(LlamaSite::Up, &hn, pass)?;
        drop(hn);
        let (a, sw) = swiglu::forward(&g, &u, save)?;
        drop((g, u));
        let out = (&h + lin.run(LlamaSite::Down, &a, pass)?)?;
        // Every part is Some when `save` is set.
        let saved = (|| {
            Some(LlamaLayerSaved {
                lin: lin.states,
                input_norm: input_norm?,
                attn: attn?,
                post_norm: post_norm?,
                swiglu: sw?,
            })
        })();
        Ok((out, saved))
    }

    /// What [`LlamaLayer::forward`] keeps (its [`LlamaLayerSaved`]) and its temporaries, from
    /// shapes.
    pub fn memory(&self, acts: Acts) -> LayerMemory {
        use LlamaSite::*;
        let lin = |s: LlamaSite| crate::adapters::Block::linear(self, s);
        let (h, f) = (lin(Q).base.in_features(), lin(Gate).base.out_features());
        let head_dim = lin(Q).base.out_features() / self.attention.num_heads;
        let state = acts.lora_group(&[lin(Q), lin(K), lin(V)])
            + acts.lora_group(&[lin(O)])
            + acts.lora_group(&[lin(Gate), lin(Up)])
            + acts.lora_group(&[lin(Down)])
            + 2 * acts.norm(h)
            + acts.attention(&self.attention, head_dim)
            + 2 * acts.of(f);
        LayerMemory {
            state,
            transient: acts.transient(&self.attention, h, f),
        }
    }

    /// Backward through the layer; `dx` is computed only when a layer below still trains.
    pub fn backward(
        &self,
        saved: LlamaLayerSaved,
        dout: &Tensor,
        need_dx: bool,
    ) -> Result<(Option<Tensor>, LayerGrads)> {
        let mut lin = SiteBackward::new(self, saved.lin);
        let add = |acc: Option<Tensor>, d: Option<Tensor>| -> Result<Option<Tensor>> {
            Ok(match (acc, d) {
                (Some(a), Some(d)) => Some((a + d)?),
                (a, d) => a.or(d),
            })
        };
        let da = lin.back_dx(LlamaSite::Down, dout)?;
        let (dg, du) = saved.swiglu.backward(&da)?;
        drop(da);
        let dhn = add(
            lin.back(LlamaSite::Gate, &dg, true)?,
            lin.back(LlamaSite::Up, &du, true)?,
        )?
        .expect("dx requested");
        drop((dg, du));
        let dh = (dout + saved.post_norm.backward(&self.post_attention_norm, &dhn)?)?;
        drop(dhn);
        let dctx = lin.back_dx(LlamaSite::O, &dh)?;
        let (dq, dk, dv) = saved.attn.backward(&self.attention, &dctx)?;
        drop(dctx);
        let mut dxn = None;
        for (s, d) in [(LlamaSite::Q, dq), (LlamaSite::K, dk), (LlamaSite::V, dv)] {
            dxn = add(dxn, lin.back(s, &d, need_dx)?)?;
        }
        let dx = match dxn {
            Some(dxn) => Some((dh + saved.input_norm.backward(&self.input_norm, &dxn)?)?),
            None => None,
        };
        Ok((dx, lin.grads()))
    }
}

/// A LLaMA-family decoder with a causal-LM head (tied to the embeddings, or its own).
#[derive(Clone, Debug)]
pub struct LlamaForCausalLM {
    pub config: LlamaConfig,
    /// `[vocab, hidden]`.
    pub embed_tokens: Tensor,
    pub layers: Vec<LlamaLayer>,
    pub norm: RmsNorm,
    /// `[vocab, hidden]`; None when tied to `embed_tokens`.
    pub lm_head: Option<Tensor>,
    pub rope: Rope,
}

impl LlamaForCausalLM {
    /// Builds the model from weights named as in a Hugging Face LLaMA checkpoint.
    pub fn from_weights(config: LlamaConfig, w: &Weights) -> std::result::Result<Self, IoError> {
        let c = &config;
        config.validate(w.file())?;
        let h = c.hidden_size;
        let m = w.pp("model");
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let l = m.pp("layers").pp(i);
            let mut lins = Vec::with_capacity(7);
            for s in LlamaSite::ALL {
                let (o, inp) = s.shape(c);
                let p = l.pp(s.path());
                let bias = if p.contains("bias") {
                    Some(p.get("bias", &[o])?)
                } else {
                    None
                };
                lins.push(LoraLinear::new(Linear {
                    weight: p.linear_weight("weight", &[o, inp])?,
                    bias,
                }));
            }
            layers.push(LlamaLayer {
                linears: lins.try_into().expect("seven linears"),
                attention: Attention {
                    num_heads: c.num_attention_heads,
                    num_kv_heads: c.kv_heads(),
                    causal: true,
                    dropout: Dropout::new(0.0),
                },
                input_norm: RmsNorm::new(l.get("input_layernorm.weight", &[h])?, c.rms_norm_eps),
                post_attention_norm: RmsNorm::new(
                    l.get("post_attention_layernorm.weight", &[h])?,
                    c.rms_norm_eps,
                ),
            });
        }
        let embed_tokens = m.get("embed_tokens.weight", &[c.vocab_size, h])?;
        let lm_head = if !c.tie_word_embeddings && w.contains("lm_head.weight") {
            Some(w.get("lm_head.weight", &[c.vocab_size, h])?)
        } else {
            None
        };
        let rope = Rope::from_inv_freq(
            &c.rope_inv_freq(),
            c.max_position_embeddings,
            embed_tokens.device(),
        )
        .map_err(|e| IoError::Invalid {
            path: w.file().into(),
            message: e.to_string(),
        })?;
        Ok(Self {
            norm: RmsNorm::new(m.get("norm.weight", &[h])?, c.rms_norm_eps),
            config,
            embed_tokens,
            layers,
            lm_head,
            rope,
        })
    }

    /// Loads a Hugging Face LLaMA-layout folder: `config.json` and `model.safetensors` or the
    /// shards of `model.safetensors.index.json`.
    pub fn load_hf(
        dir: &Path,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, IoError> {
        Self::load_hf_quantized(dir, dtype, device, None)
    }

    /// [`LlamaForCausalLM::load_hf`], with every projection weight quantized into `quantize` as
    /// it loads, one tensor at a time: the frozen base never exists in full precision.
    pub fn load_hf_quantized(
        dir: &Path,
        dtype: DType,
        device: &Device,
        quantize: Option<QuantFormat>,
    ) -> std::result::Result<Self, IoError> {
        let config = LlamaConfig::from_file(&dir.join("config.json"))?;
        let mut w = Weights::open_dir(dir, &[""], dtype, device)?;
        if let Some(format) = quantize {
            w = w.quantize_on_load(format);
        }
        Self::from_weights(config, &w)
    }

    /// A model of the given shape with random weights (normal(0, 0.02), norms 1), for benchmarks
    /// and tests; built through the same loading path as a checkpoint.
    pub fn random(
        config: LlamaConfig,
        dtype: DType,
        device: &Device,
        rng: &mut impl Rng,
    ) -> std::result::Result<Self, IoError> {
        let shapes = config.tensor_shapes();
        let normal = rand_distr::Normal::new(0.0f32, 0.02).expect("valid std");
        let mut tensors = std::collections::HashMap::new();
        for (name, shape) in shapes {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else {
                (0..n)
                    .map(|_| rand_distr::Distribution::sample(&normal, rng))
                    .collect()
            };
            let t = Tensor::from_vec(v, shape, &Device::Cpu).map_err(|e| IoError::Invalid {
                path: "<memory>".into(),
                message: e.to_string(),
            })?;
            tensors.insert(name, t);
        }
        Self::from_weights(config, &Weights::from_tensors(tensors, dtype, device))
    }
}

impl AdaptedStack for LlamaForCausalLM {
    type Layer = LlamaLayer;
    const LAYERS_PATH: &'static str = "model.layers";
    const TASK_TYPE: &'static str = "CAUSAL_LM";

    fn layers(&self) -> &[LlamaLayer] {
        &self.layers
    }

    fn layers_mut(&mut self) -> &mut [LlamaLayer] {
        &mut self.layers
    }
}

impl DecoderParts for LlamaForCausalLM {
    type LayerSaved = LlamaLayerSaved;
    type NormSaved = RmsNormSaved;

    /// Token embeddings only: positions enter through rope, in attention.
    fn embed_at(&self, ids: &Tensor, _: usize, _: usize, _: &mut Pass) -> Result<Tensor> {
        self.embed_tokens.index_select(&ids.flatten_all()?, 0)
    }

    fn layer_train(
        &self,
        layer: &LlamaLayer,
        x: &Tensor,
        mask_add: &Tensor,
        shape: AttnShape,
        pass: &mut Pass,
        save: bool,
        monitor: Option<&mut LlamaMonitored>,
    ) -> Result<(Tensor, Option<LlamaLayerSaved>)> {
        layer.forward(x, mask_add, shape, &self.rope, pass, save, monitor)
    }

    fn layer_backward(
        &self,
        layer: &LlamaLayer,
        saved: LlamaLayerSaved,
        dout: &Tensor,
        need_dx: bool,
    ) -> Result<(Option<Tensor>, Vec<(LlamaSite, LoraGrads)>)> {
        layer.backward(saved, dout, need_dx)
    }

    fn layer_forward_cached(
        &self,
        layer: &LlamaLayer,
        x: &Tensor,
        cache: &mut KvCache,
        pass: &mut Pass,
    ) -> Result<Tensor> {
        layer.forward_cached(x, 1, &self.rope, cache, pass)
    }

    fn final_norm_train(&self, h: &Tensor, save: bool) -> Result<(Tensor, Option<RmsNormSaved>)> {
        self.norm.forward(h, save)
    }

    fn final_norm_backward(&self, saved: RmsNormSaved, d: &Tensor) -> Result<Tensor> {
        saved.backward(&self.norm, d)
    }

    /// The LM head's weight: its own, or the tied embeddings.
    fn layer_memory(&self, layer: &LlamaLayer, acts: Acts) -> LayerMemory {
        layer.memory(acts)
    }

    fn head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }
}

#[cfg(test)]
#[path = "llama_tests.rs"]
mod tests;
