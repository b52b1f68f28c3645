//! GPT-2 decoder (Hugging Face `GPT2LMHeadModel`): learned position embeddings, pre-LN blocks
//! with LayerNorm, fused q/k/v projection (`c_attn`), multi-head causal attention, a GELU (tanh
//! form, `gelu_new`) MLP, a final `ln_f` and an LM head tied to the token embeddings.
//!
//! GPT-2 checkpoints store their linears as `Conv1D`, weight `[in, out]` (`y = x W + b`); they are
//! transposed to `Linear`'s `[out, in]` at load. `c_attn` stays one linear of `3 * n_embd` outputs
//! (q, k, v side by side), so a LoRA adapter on it is one adapter over the fused output, as PEFT
//! puts it (PEFT's default GPT-2 target is `c_attn`, with `fan_in_fan_out: true`).

use super::causal::{self, DecoderParts};
use crate::adapters::lora::{LoraGrads, LoraLinear, LoraLinearSaved};
use crate::adapters::{self, AdaptedStack, Block};
use crate::adapters::{SiteBackward, SiteForward, SiteStates};
use crate::io::weights::Weights;
use crate::io::IoError;
use crate::nn::attention::{Attention, AttentionSaved, AttnShape, KvCache};
use crate::nn::dropout::{self, DropoutSaved};
use crate::nn::gelu::{self, GeluKind, GeluSaved};
use crate::nn::layer_norm::{LayerNorm, LayerNormSaved};
use crate::nn::linear::Linear;
use crate::nn::{Dropout, Pass};
use candle_core::{bail, DType, Device, Result, Tensor};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// The fields of a Hugging Face GPT-2 `config.json` that the architecture needs. Missing optional
/// fields take `GPT2Config`'s defaults.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    /// Rows of the position table: the longest sequence the model takes.
    #[serde(default = "default_n_positions")]
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// MLP width; None means `4 * n_embd`.
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "default_ln_eps")]
    pub layer_norm_epsilon: f64,
    /// `gelu_new` (GPT-2), `gelu_pytorch_tanh` or `gelu_fast` (the same tanh form), or `gelu` (erf).
    #[serde(default = "default_activation")]
    pub activation_function: String,
    /// Dropout rates of the checkpoint's training; a model loaded from a folder trains with them
    /// (as transformers' train mode), one built from weights without (`set_dropout` sets them).
    #[serde(default = "default_pdrop")]
    pub resid_pdrop: f64,
    #[serde(default = "default_pdrop")]
    pub embd_pdrop: f64,
    #[serde(default = "default_pdrop")]
    pub attn_pdrop: f64,
    #[serde(default = "yes")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
}

fn default_n_positions() -> usize {
    1024
}
fn default_ln_eps() -> f64 {
    1e-5
}
fn default_activation() -> String {
    "gelu_new".into()
}
fn default_pdrop() -> f64 {
    0.1
}
fn yes() -> bool {
    true
}

impl Gpt2Config {
    pub fn inner(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// The GELU form `activation_function` names, if it is one.
    pub fn gelu_kind(&self) -> Option<GeluKind> {
        match self.activation_function.as_str() {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(GeluKind::Tanh),
            "gelu" => Some(GeluKind::Erf),
            _ => None,
        }
    }

    pub fn from_file(path: &Path) -> std::result::Result<Self, IoError> {
        let text = std::fs::read_to_string(path).map_err(|_| IoError::Missing {
            path: path.into(),
            what: "Hugging Face model config".into(),
        })?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| IoError::Invalid {
            path: path.into(),
            message: format!("not a GPT-2 config ({e})"),
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Shape and option rules every loader checks, with the file named in the error.
    pub fn validate(&self, path: &Path) -> std::result::Result<(), IoError> {
        let bad = |message: String| {
            Err(IoError::Invalid {
                path: path.into(),
                message,
            })
        };
        if self.vocab_size == 0 || self.n_embd == 0 || self.n_positions == 0 {
            return bad("vocab_size, n_embd and n_positions must be positive".into());
        }
        if self.n_head == 0 || !self.n_embd.is_multiple_of(self.n_head) {
            return bad(format!(
                "n_embd ({}) must be a multiple of n_head ({})",
                self.n_embd, self.n_head
            ));
        }
        if self.n_inner == Some(0) {
            return bad("n_inner must be positive (or null for 4 * n_embd)".into());
        }
        if self.gelu_kind().is_none() {
            return bad(format!(
                "activation_function '{}' is not supported (gelu_new, gelu_pytorch_tanh, gelu_fast, gelu)",
                self.activation_function
            ));
        }
        if !self.scale_attn_weights || self.scale_attn_by_inverse_layer_idx {
            return bad(
                "only the standard attention scale 1/sqrt(head_dim) is supported (scale_attn_weights \
                 true, scale_attn_by_inverse_layer_idx false)"
                    .into(),
            );
        }
        if !self.tie_word_embeddings {
            return bad("an LM head untied from wte is not supported".into());
        }
        for (name, p) in [
            ("resid_pdrop", self.resid_pdrop),
            ("embd_pdrop", self.embd_pdrop),
            ("attn_pdrop", self.attn_pdrop),
        ] {
            if !(0.0..1.0).contains(&p) {
                return bad(format!("{name} must be in [0, 1), not {p}"));
            }
        }
        Ok(())
    }
}

/// The four linears of a GPT-2 block, named as Hugging Face (and PEFT's `target_modules`) name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Gpt2Site {
    /// Fused q/k/v projection, `n_embd -> 3 * n_embd`.
    CAttn,
    /// Attention output, `n_embd -> n_embd`.
    AttnCProj,
    /// MLP up, `n_embd -> n_inner`.
    CFc,
    /// MLP down, `n_inner -> n_embd`.
    MlpCProj,
}

impl Gpt2Site {
    /// In forward order (the order a block saves them in).
    pub const ALL: [Gpt2Site; 4] = [
        Gpt2Site::CAttn,
        Gpt2Site::AttnCProj,
        Gpt2Site::CFc,
        Gpt2Site::MlpCProj,
    ];

    /// Path inside a block, as in the checkpoint (and in PEFT's adapter keys).
    pub fn path(self) -> &'static str {
        match self {
            Gpt2Site::CAttn => "attn.c_attn",
            Gpt2Site::AttnCProj => "attn.c_proj",
            Gpt2Site::CFc => "mlp.c_fc",
            Gpt2Site::MlpCProj => "mlp.c_proj",
        }
    }

    /// `(out, in)` features of this linear.
    fn shape(self, c: &Gpt2Config) -> (usize, usize) {
        let (h, f) = (c.n_embd, c.inner());
        match self {
            Gpt2Site::CAttn => (3 * h, h),
            Gpt2Site::AttnCProj => (h, h),
            Gpt2Site::CFc => (f, h),
            Gpt2Site::MlpCProj => (h, f),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Gpt2Block {
    /// Linears in `Gpt2Site::ALL` order, in `Linear`'s `[out, in]` layout.
    pub linears: [LoraLinear; 4],
    pub attention: Attention,
    pub ln_1: LayerNorm,
    pub ln_2: LayerNorm,
    pub act: GeluKind,
    /// On each branch's output before the residual add (`resid_pdrop`).
    pub resid_dropout: Dropout,
}

impl Block for Gpt2Block {
    type Site = Gpt2Site;
    const SITES: &'static [Gpt2Site] = &Gpt2Site::ALL;

    fn site_path(site: Gpt2Site) -> &'static str {
        site.path()
    }

    fn linears(&self) -> &[LoraLinear] {
        &self.linears
    }

    fn linears_mut(&mut self) -> &mut [LoraLinear] {
        &mut self.linears
    }
}

/// What a block on the gradient path keeps for backward.
pub struct Gpt2BlockSaved {
    lin: SiteStates<Gpt2Site, LoraLinearSaved>,
    ln_1: LayerNormSaved,
    attn: AttentionSaved,
    drop_attn: Option<DropoutSaved>,
    ln_2: LayerNormSaved,
    gelu: GeluSaved,
    drop_mlp: Option<DropoutSaved>,
}

/// Gradients of a block's trainable adapters.
pub type BlockGrads = Vec<(Gpt2Site, LoraGrads)>;

/// Gradients of every trainable adapter, by `(layer, site)`.
pub type SiteGrads = causal::SiteGrads<Gpt2Site>;

/// Per-adapter monitoring output `(site, X adapted, Y base)`.
pub type Gpt2Monitored = adapters::Monitored<Gpt2Site>;

impl Gpt2Block {
    /// `x` is `[batch*seq, n_embd]`; pre-LN residual blocks: `h = x + c_proj(attn(ln_1(x)))`,
    /// `out = h + mlp.c_proj(gelu(c_fc(ln_2(h))))`.
    pub fn forward(
        &self,
        x: &Tensor,
        mask_add: &Tensor,
        shape: AttnShape,
        pass: &mut Pass,
        save: bool,
        monitor: Option<&mut Gpt2Monitored>,
    ) -> Result<(Tensor, Option<Gpt2BlockSaved>)> {
        let attend = |a: &Attention, qkv: (&Tensor, &Tensor, &Tensor), pass: &mut Pass| {
            a.forward(qkv, mask_add, shape, None, pass, save)
        };
        self.forward_with(x, attend, pass, save, monitor)
    }

    /// Inference forward of new positions of `batch` unpadded sequences whose earlier keys and
    /// values `cache` holds (generation).
    pub fn forward_cached(
        &self,
        x: &Tensor,
        batch: usize,
        cache: &mut KvCache,
        pass: &mut Pass,
    ) -> Result<Tensor> {
        let attend = |a: &Attention, qkv: (&Tensor, &Tensor, &Tensor), _: &mut Pass| {
            Ok((a.forward_cached(qkv, batch, None, cache)?, None))
        };
        Ok(self.forward_with(x, attend, pass, false, None)?.0)
    }

    /// The block around its attention call, which `attend` makes.
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
        monitor: Option<&mut Gpt2Monitored>,
    ) -> Result<(Tensor, Option<Gpt2BlockSaved>)> {
        let mut lin = SiteForward::new(self, save, monitor);
        let c = x.dim(1)?;
        let (xn, ln_1) = self.ln_1.forward(x, save)?;
        let qkv = lin.run(Gpt2Site::CAttn, &xn, pass)?;
        drop(xn);
        let (q, k, v) = (
            qkv.narrow(1, 0, c)?,
            qkv.narrow(1, c, c)?,
            qkv.narrow(1, 2 * c, c)?,
        );
        let (ctx, attn) = attend(&self.attention, (&q, &k, &v), pass)?;
        drop((q, k, v, qkv));
        let a = lin.run(Gpt2Site::AttnCProj, &ctx, pass)?;
        drop(ctx);
        let (a, drop_attn) = self.resid_dropout.forward(&a, pass, save)?;
        let h = (x + a)?;
        let (hn, ln_2) = self.ln_2.forward(&h, save)?;
        let f = lin.run(Gpt2Site::CFc, &hn, pass)?;
        drop(hn);
        let (g, gelu) = gelu::forward_kind(&f, self.act, save)?;
        drop(f);
        let m = lin.run(Gpt2Site::MlpCProj, &g, pass)?;
        drop(g);
        let (m, drop_mlp) = self.resid_dropout.forward(&m, pass, save)?;
        let out = (&h + m)?;
        let saved = match (ln_1, attn, ln_2, gelu) {
            (Some(ln_1), Some(attn), Some(ln_2), Some(gelu)) => Some(Gpt2BlockSaved {
                lin: lin.states,
                ln_1,
                attn,
                drop_attn,
                ln_2,
                gelu,
                drop_mlp,
            }),
            _ => None,
        };
        Ok((out, saved))
    }

    /// Backward through the block; `dx` is computed only when a block below still trains.
    pub fn backward(
        &self,
        saved: Gpt2BlockSaved,
        dout: &Tensor,
        need_dx: bool,
    ) -> Result<(Option<Tensor>, BlockGrads)> {
        let mut lin = SiteBackward::new(self, saved.lin);
        let dm = dropout::backward_opt(&saved.drop_mlp, dout.clone())?;
        let dg = lin.back_dx(Gpt2Site::MlpCProj, &dm)?;
        drop(dm);
        let df = saved.gelu.backward(&dg)?;
        drop(dg);
        let dhn = lin.back_dx(Gpt2Site::CFc, &df)?;
        drop(df);
        let dh = (dout + saved.ln_2.backward(&self.ln_2, &dhn)?)?;
        drop(dhn);
        let da = dropout::backward_opt(&saved.drop_attn, dh.clone())?;
        let dctx = lin.back_dx(Gpt2Site::AttnCProj, &da)?;
        drop(da);
        let dx = if need_dx || self.linear(Gpt2Site::CAttn).trains() {
            let (dq, dk, dv) = saved.attn.backward(&self.attention, &dctx)?;
            drop(dctx);
            let dqkv = Tensor::cat(&[&dq, &dk, &dv], 1)?;
            drop((dq, dk, dv));
            match lin.back(Gpt2Site::CAttn, &dqkv, need_dx)? {
                Some(dxn) => Some((dh + saved.ln_1.backward(&self.ln_1, &dxn)?)?),
                None => None,
            }
        } else {
            None // the lowest trainable block, and c_attn does not train: nothing below matters
        };
        Ok((dx, lin.grads()))
    }
}

/// GPT-2 with its causal-LM head (tied to `wte`).
#[derive(Clone, Debug)]
pub struct Gpt2LMHeadModel {
    pub config: Gpt2Config,
    /// `[vocab, n_embd]`; also the LM head.
    pub wte: Tensor,
    /// `[n_positions, n_embd]`.
    pub wpe: Tensor,
    pub layers: Vec<Gpt2Block>,
    pub ln_f: LayerNorm,
    /// On the summed embeddings (`embd_pdrop`).
    pub embd_dropout: Dropout,
}

/// The checkpoint names (without `transformer.`) and Conv1D shapes `[in, out]` of every tensor.
fn tensor_shapes(c: &Gpt2Config) -> Vec<(String, Vec<usize>)> {
    let h = c.n_embd;
    let mut v: Vec<(String, Vec<usize>)> = vec![
        ("wte.weight".into(), vec![c.vocab_size, h]),
        ("wpe.weight".into(), vec![c.n_positions, h]),
        ("ln_f.weight".into(), vec![h]),
        ("ln_f.bias".into(), vec![h]),
    ];
    for i in 0..c.n_layer {
        for ln in ["ln_1", "ln_2"] {
            v.push((format!("h.{i}.{ln}.weight"), vec![h]));
            v.push((format!("h.{i}.{ln}.bias"), vec![h]));
        }
        for s in Gpt2Site::ALL {
            let (o, inp) = s.shape(c);
            v.push((format!("h.{i}.{}.weight", s.path()), vec![inp, o]));
            v.push((format!("h.{i}.{}.bias", s.path()), vec![o]));
        }
    }
    v
}

impl Gpt2LMHeadModel {
    /// Builds the model from weights named as in a Hugging Face GPT-2 checkpoint (relative to
    /// `transformer.`; open the file with prefixes `["transformer.", ""]` to accept both layouts).
    /// Conv1D weights `[in, out]` are transposed to `[out, in]`.
    pub fn from_weights(config: Gpt2Config, w: &Weights) -> std::result::Result<Self, IoError> {
        config.validate(w.file())?;
        let c = &config;
        let h = c.n_embd;
        let invalid = |e: candle_core::Error| IoError::Invalid {
            path: w.file().into(),
            message: e.to_string(),
        };
        let ln = |p: &Weights| -> std::result::Result<LayerNorm, IoError> {
            Ok(LayerNorm::new(
                p.get("weight", &[h])?,
                p.get("bias", &[h])?,
                c.layer_norm_epsilon,
            ))
        };
        let act = c.gelu_kind().expect("validated");
        let mut layers = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let l = w.pp("h").pp(i);
            let mut lins = Vec::with_capacity(4);
            for s in Gpt2Site::ALL {
                let (o, inp) = s.shape(c);
                let p = l.pp(s.path());
                let conv = p.get("weight", &[inp, o])?;
                let weight = conv.t().and_then(|t| t.contiguous()).map_err(invalid)?;
                lins.push(LoraLinear::new(Linear::new(
                    weight,
                    Some(p.get("bias", &[o])?),
                )));
            }
            layers.push(Gpt2Block {
                linears: lins.try_into().expect("four linears"),
                attention: Attention {
                    num_heads: c.n_head,
                    num_kv_heads: c.n_head,
                    causal: true,
                    dropout: Dropout::new(0.0),
                },
                ln_1: ln(&l.pp("ln_1"))?,
                ln_2: ln(&l.pp("ln_2"))?,
                act,
                resid_dropout: Dropout::new(0.0),
            });
        }
        Ok(Self {
            wte: w.get("wte.weight", &[c.vocab_size, h])?,
            wpe: w.get("wpe.weight", &[c.n_positions, h])?,
            ln_f: ln(&w.pp("ln_f"))?,
            layers,
            embd_dropout: Dropout::new(0.0),
            config,
        })
    }

    /// Loads a Hugging Face GPT-2 folder (`config.json`, `model.safetensors`, names with or
    /// without the `transformer.` prefix), training with its config's dropout.
    pub fn load_hf(
        dir: &Path,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, IoError> {
        let config = Gpt2Config::from_file(&dir.join("config.json"))?;
        let w = Weights::open_dir(dir, &["transformer.", ""], dtype, device)?;
        let mut m = Self::from_weights(config, &w)?;
        m.use_config_dropout();
        Ok(m)
    }

    /// Random checkpoint tensors in Hugging Face's layout (Conv1D `[in, out]`, no `transformer.`
    /// prefix), f32 on the CPU: linears and embeddings normal(0, 0.02), biases 0, LayerNorms 1/0.
    pub fn random_tensors(config: &Gpt2Config, rng: &mut impl Rng) -> HashMap<String, Tensor> {
        let normal = rand_distr::Normal::new(0.0f32, 0.02).expect("valid std");
        let mut tensors = HashMap::new();
        for (name, shape) in tensor_shapes(config) {
            let n: usize = shape.iter().product();
            let is_ln = name.starts_with("ln_f") || name.contains(".ln_");
            let v: Vec<f32> = if name.ends_with(".bias") {
                vec![0.0; n]
            } else if is_ln {
                vec![1.0; n]
            } else {
                (0..n)
                    .map(|_| rand_distr::Distribution::sample(&normal, rng))
                    .collect()
            };
            let t = Tensor::from_vec(v, shape, &Device::Cpu).expect("shape fits the data");
            tensors.insert(name, t);
        }
        tensors
    }

    /// A model of the given shape with random weights ([`Self::random_tensors`]), for benchmarks
    /// and tests; built through the same loading path as a checkpoint.
    pub fn random(
        config: Gpt2Config,
        dtype: DType,
        device: &Device,
        rng: &mut impl Rng,
    ) -> std::result::Result<Self, IoError> {
        let tensors = Self::random_tensors(&config, rng);
        Self::from_weights(config, &Weights::from_tensors(tensors, dtype, device))
    }

    /// Dropout rates (embeddings, attention probabilities, residual branches); all 0 at load.
    pub fn set_dropout(&mut self, embd: f64, attn: f64, resid: f64) {
        self.embd_dropout = Dropout::new(embd);
        for l in &mut self.layers {
            l.attention.dropout = Dropout::new(attn);
            l.resid_dropout = Dropout::new(resid);
        }
    }

    /// The dropout rates of `config.json` (`embd_pdrop`, `attn_pdrop`, `resid_pdrop`), as
    /// Hugging Face trains.
    pub fn use_config_dropout(&mut self) {
        let c = &self.config;
        let (e, a, r) = (c.embd_pdrop, c.attn_pdrop, c.resid_pdrop);
        self.set_dropout(e, a, r);
    }
}

impl AdaptedStack for Gpt2LMHeadModel {
    type Layer = Gpt2Block;
    const LAYERS_PATH: &'static str = "transformer.h";
    const TASK_TYPE: &'static str = "CAUSAL_LM";
    /// Conv1D linears (`[in, out]`); the adapter tensors keep PEFT's shapes either way.
    const FAN_IN_FAN_OUT: bool = true;

    fn layers(&self) -> &[Gpt2Block] {
        &self.layers
    }

    fn layers_mut(&mut self) -> &mut [Gpt2Block] {
        &mut self.layers
    }
}

impl DecoderParts for Gpt2LMHeadModel {
    type LayerSaved = Gpt2BlockSaved;
    type NormSaved = LayerNormSaved;

    /// Token plus position embeddings, then embedding dropout.
    fn embed_at(
        &self,
        ids: &Tensor,
        batch: usize,
        start: usize,
        pass: &mut Pass,
    ) -> Result<Tensor> {
        let ids = ids.flatten_all()?;
        let end = start + ids.dim(0)? / batch;
        if end > self.config.n_positions {
            bail!(
                "GPT-2: sequence of {end} tokens is longer than the model's {} positions",
                self.config.n_positions
            );
        }
        let positions =
            Tensor::arange(start as u32, end as u32, self.wpe.device())?.repeat(batch)?;
        let x = self
            .wte
            .index_select(&ids, 0)?
            .add(&self.wpe.index_select(&positions, 0)?)?;
        // Nothing below the first block trains, so the mask is never needed for backward.
        Ok(self.embd_dropout.forward(&x, pass, false)?.0)
    }

    fn layer_train(
        &self,
        layer: &Gpt2Block,
        x: &Tensor,
        mask_add: &Tensor,
        shape: AttnShape,
        pass: &mut Pass,
        save: bool,
        monitor: Option<&mut Gpt2Monitored>,
    ) -> Result<(Tensor, Option<Gpt2BlockSaved>)> {
        layer.forward(x, mask_add, shape, pass, save, monitor)
    }

    fn layer_backward(
        &self,
        layer: &Gpt2Block,
        saved: Gpt2BlockSaved,
        dout: &Tensor,
        need_dx: bool,
    ) -> Result<(Option<Tensor>, Vec<(Gpt2Site, LoraGrads)>)> {
        layer.backward(saved, dout, need_dx)
    }

    fn layer_forward_cached(
        &self,
        block: &Gpt2Block,
        x: &Tensor,
        cache: &mut KvCache,
        pass: &mut Pass,
    ) -> Result<Tensor> {
        block.forward_cached(x, 1, cache, pass)
    }

    fn final_norm_train(&self, h: &Tensor, save: bool) -> Result<(Tensor, Option<LayerNormSaved>)> {
        self.ln_f.forward(h, save)
    }

    fn final_norm_backward(&self, saved: LayerNormSaved, d: &Tensor) -> Result<Tensor> {
        saved.backward(&self.ln_f, d)
    }

    /// The LM head's weight: the token embeddings.
    fn head_weight(&self) -> &Tensor {
        &self.wte
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::{Adapted, LoraConfig};
    use crate::model::{CausalLm, LmBatch};
    use crate::nn::gradcheck::{max_abs_diff, randn};
    use crate::nn::loss::LmLoss;
    use candle_core::Var;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn config() -> Gpt2Config {
        serde_json::from_value(serde_json::json!({
            "vocab_size": 40, "n_positions": 8, "n_embd": 16, "n_layer": 3, "n_head": 4,
            "n_inner": null, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "bos_token_id": 1, "eos_token_id": 1, "model_type": "gpt2"
        }))
        .unwrap()
    }

    /// Checkpoint tensors (Conv1D layout, no prefix) with every weight, bias and LayerNorm
    /// parameter nonzero and of order 0.1-1, so each one moves the output measurably.
    fn tensors(cfg: &Gpt2Config, seed: u64) -> HashMap<String, Tensor> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut t = Gpt2LMHeadModel::random_tensors(cfg, &mut rng);
        let mut names: Vec<String> = t.keys().cloned().collect();
        names.sort();
        for (i, name) in names.into_iter().enumerate() {
            let dims = t[&name].dims().to_vec();
            let r = randn(&dims, seed * 1000 + i as u64);
            let v = if name.contains("ln_") && name.ends_with(".weight") {
                r.affine(0.2, 1.0)
            } else if name.starts_with("wte") || name.starts_with("wpe") {
                Ok(r)
            } else {
                r.affine(0.4, 0.0)
            };
            t.insert(name, v.unwrap().to_dtype(DType::F32).unwrap());
        }
        t
    }

    fn model_from(cfg: &Gpt2Config, t: &HashMap<String, Tensor>, dtype: DType) -> Gpt2LMHeadModel {
        let w = Weights::from_tensors(t.clone(), dtype, &Device::Cpu);
        Gpt2LMHeadModel::from_weights(cfg.clone(), &w).unwrap()
    }

    /// A tiny random GPT-2 in f64, LoRA on all four sites (`c_proj` names both projections)
    /// with nonzero B, dropout everywhere.
    fn tiny() -> Gpt2LMHeadModel {
        let cfg = config();
        let mut m = model_from(&cfg, &tensors(&cfg, 3), DType::F64);
        m.set_dropout(0.1, 0.1, 0.1);
        let lora = LoraConfig {
            r: 2,
            alpha: 4.0,
            dropout: 0.1,
            target_modules: vec!["c_attn".into(), "c_fc".into(), "c_proj".into()],
            use_rslora: false,
        };
        let mut rng = StdRng::seed_from_u64(4);
        assert_eq!(m.add_lora(&lora, None, &mut rng).unwrap(), 12);
        for (i, (l, s)) in m.adapter_sites().into_iter().enumerate() {
            let ad = m.adapter_mut(l, s).unwrap();
            ad.b = randn(ad.b.dims(), 100 + i as u64); // B = 0 (PEFT init) would zero every dA
        }
        m
    }

    fn batch(dtype: DType) -> LmBatch {
        let dev = Device::Cpu;
        let ids =
            Tensor::from_vec(vec![2u32, 7, 9, 11, 3, 5, 2, 13, 5, 0, 0, 0], (2, 6), &dev).unwrap();
        let mask =
            Tensor::from_vec(vec![1u32, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], (2, 6), &dev).unwrap();
        LmBatch {
            input_ids: ids,
            mask_add: crate::nn::attention::mask_to_additive(&mask, dtype).unwrap(),
            targets: vec![7, 9, 11, 3, 5, -100, 13, 5, -100, -100, -100, -100],
            batch: 2,
            seq: 6,
        }
    }

    fn grads(m: &Gpt2LMHeadModel) -> (LmLoss, SiteGrads) {
        grads_with(m, false)
    }

    fn grads_with(m: &Gpt2LMHeadModel, checkpoint: bool) -> (LmLoss, SiteGrads) {
        let mut rng = StdRng::seed_from_u64(5);
        let mut pass = Pass {
            training: true,
            rng: &mut rng,
        };
        causal::loss_and_site_grads(m, &batch(DType::F64), &mut pass, 1.0, checkpoint).unwrap()
    }

    /// With every dropout on (embeddings, attention, residual, LoRA), gradient checkpointing
    /// replays each block's masks in its second forward: the same loss and gradients bit for bit.
    #[test]
    fn gradient_checkpointing_gives_the_same_gradients() {
        let mut m = tiny();
        for frozen_below in [0, 1] {
            for (l, s) in m.adapter_sites() {
                m.adapter_mut(l, s).unwrap().trainable = l >= frozen_below;
            }
            let ((loss, g), (loss_ck, g_ck)) = (grads_with(&m, false), grads_with(&m, true));
            assert_eq!(loss.loss_sum, loss_ck.loss_sum);
            assert_eq!(g.len(), g_ck.len());
            for ((l, s, a), (l_ck, s_ck, b)) in g.iter().zip(&g_ck) {
                assert_eq!((l, s), (l_ck, s_ck));
                assert_eq!(max_abs_diff(&a.a, &b.a), 0.0, "layer {l} {s:?} A");
                assert_eq!(max_abs_diff(&a.b, &b.b), 0.0, "layer {l} {s:?} B");
            }
        }
    }

    /// Every adapter's gradient equals candle's autograd through the same forward (all dropouts
    /// on, same seed) and a full-logits cross-entropy, on a tiny random GPT-2 in f64. The bound
    /// is 5e-6, not 1e-9: candle's backward of `gelu` and `gelu_erf` uses 6-digit constants
    /// (0.797885, 0.0356774, 0.398942), which puts the tape itself ~1e-7 off at these O(1)
    /// activations. The finite-difference test below pins our gradients to 1e-8.
    #[test]
    fn whole_model_gradients_match_autograd() {
        check_against_autograd(&tiny(), 5e-6);
    }

    /// Our gradients against central finite differences of the loss (same dropout masks), on a
    /// sample of entries of every adapter's A and B: exact to 1e-8, where the tape is ~1e-7 off.
    #[test]
    fn whole_model_gradients_match_finite_differences() {
        let m = tiny();
        let (_, ours) = grads(&m);
        let loss_of = |m: &Gpt2LMHeadModel| {
            let mut rng = StdRng::seed_from_u64(5);
            let mut pass = Pass {
                training: true,
                rng: &mut rng,
            };
            let b = batch(DType::F64);
            let (hn, _) = m.forward_train(&b, &mut pass, false).unwrap();
            let l =
                crate::nn::loss::lm_head_loss(&hn, m.head_weight(), &b.targets, 64, false).unwrap();
            l.loss_sum / l.tokens as f64
        };
        let h = 1e-5;
        let mut worst = 0f64;
        for (k, (l, s, g)) in ours.iter().enumerate() {
            for (which, grad) in [(0, &g.a), (1, &g.b)] {
                let n = grad.elem_count();
                let want: Vec<f64> = grad.flatten_all().unwrap().to_vec1().unwrap();
                for e in [k % n, (7 * k + 3) % n, n - 1] {
                    let shifted = |delta: f64| {
                        let mut m2 = m.clone();
                        let ad = m2.adapter_mut(*l, *s).unwrap();
                        let t = if which == 0 { &mut ad.a } else { &mut ad.b };
                        let mut v: Vec<f64> = t.flatten_all().unwrap().to_vec1().unwrap();
                        v[e] += delta;
                        *t = Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap();
                        loss_of(&m2)
                    };
                    let fd = (shifted(h) - shifted(-h)) / (2.0 * h);
                    let d = (fd - want[e]).abs();
                    worst = worst.max(d);
                    assert!(
                        d < 1e-8,
                        "layer {l} {s:?} {which} entry {e}: {} vs fd {fd}",
                        want[e]
                    );
                }
            }
        }
        assert!(worst > 0.0);
    }

    fn check_against_autograd(m: &Gpt2LMHeadModel, tol: f64) {
        let (loss, ours) = grads(m);
        let mut taped = m.clone();
        let mut vars = Vec::new();
        for (l, s) in taped.adapter_sites() {
            let ad = taped.adapter_mut(l, s).unwrap();
            let (a, b) = (
                Var::from_tensor(&ad.a).unwrap(),
                Var::from_tensor(&ad.b).unwrap(),
            );
            ad.a = a.as_tensor().clone();
            ad.b = b.as_tensor().clone();
            vars.push((l, s, a, b));
        }
        let mut rng = StdRng::seed_from_u64(5);
        let mut pass = Pass {
            training: true,
            rng: &mut rng,
        };
        let b = batch(DType::F64);
        let (hn, _) = taped.forward_train(&b, &mut pass, false).unwrap();
        let logits = hn.matmul(&taped.head_weight().t().unwrap()).unwrap();
        let lse = logits.exp().unwrap().sum_keepdim(1).unwrap().log().unwrap();
        let logp = logits.broadcast_sub(&lse).unwrap();
        let rows: Vec<u32> = (0..12u32).filter(|&i| b.targets[i as usize] >= 0).collect();
        let tgt: Vec<u32> = rows.iter().map(|&i| b.targets[i as usize] as u32).collect();
        let n = rows.len();
        let picked = logp
            .index_select(&Tensor::from_vec(rows, n, &Device::Cpu).unwrap(), 0)
            .unwrap()
            .gather(&Tensor::from_vec(tgt, (n, 1), &Device::Cpu).unwrap(), 1)
            .unwrap();
        let tape_loss = picked.mean_all().unwrap().neg().unwrap();
        let want = tape_loss.to_scalar::<f64>().unwrap();
        assert!((loss.loss_sum / loss.tokens as f64 - want).abs() < 1e-10);
        let tape = tape_loss.backward().unwrap();
        assert_eq!(ours.len(), vars.len());
        for ((l, s, g), (vl, vs, a, b)) in ours.iter().zip(&vars) {
            assert_eq!((*l, *s), (*vl, *vs));
            let ta = tape.get(a).unwrap();
            let da = max_abs_diff(&g.a, ta);
            let db = max_abs_diff(&g.b, tape.get(b).unwrap());
            assert!(
                da < tol && db < tol,
                "layer {l} {s:?}: dA off by {da}, dB off by {db}"
            );
            let scale = ta
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(scale > 1e-2, "layer {l} {s:?}: dA is ~0 ({scale})");
        }
    }

    /// Freezing the bottom layers' adapters: those layers save nothing, get no gradient, and the
    /// top layer's gradients are unchanged. With only c_fc training in the lowest trainable
    /// layer, its attention backward is skipped and the gradients still agree.
    #[test]
    fn frozen_bottom_layers_save_nothing() {
        let mut m = tiny();
        let (_, all) = grads(&m);
        for (l, s) in m.adapter_sites() {
            if l < 2 {
                m.adapter_mut(l, s).unwrap().trainable = false;
            }
        }
        let mut rng = StdRng::seed_from_u64(5);
        let mut pass = Pass {
            training: true,
            rng: &mut rng,
        };
        let (_, saved) = m
            .forward_train(&batch(DType::F64), &mut pass, false)
            .unwrap();
        assert_eq!((saved.layers.first, saved.layers.states_kept()), (2, 1));
        let (_, top) = grads(&m);
        assert_eq!(top.len(), 4);
        assert!(top.iter().all(|(l, _, _)| *l == 2));
        let same = |top: &SiteGrads| {
            for (l, s, g) in top {
                let (_, _, ga) = all.iter().find(|(la, sa, _)| la == l && sa == s).unwrap();
                assert!(max_abs_diff(&g.a, &ga.a) < 1e-12 && max_abs_diff(&g.b, &ga.b) < 1e-12);
            }
        };
        same(&top);
        m.adapter_mut(2, Gpt2Site::CAttn).unwrap().trainable = false;
        let (_, top) = grads(&m);
        assert_eq!(top.len(), 3);
        same(&top);
    }

    /// `target_modules` as PEFT matches them: against the end of the module path.
    #[test]
    fn target_names_match_the_end_of_the_path() {
        let on = |t: &str| -> Vec<Gpt2Site> {
            Gpt2Site::ALL
                .into_iter()
                .filter(|s| adapters::target_matches(s.path(), t))
                .collect()
        };
        assert_eq!(on("c_attn"), [Gpt2Site::CAttn]);
        assert_eq!(on("c_proj"), [Gpt2Site::AttnCProj, Gpt2Site::MlpCProj]);
        assert_eq!(on("attn.c_proj"), [Gpt2Site::AttnCProj]);
        assert_eq!(on("mlp.c_proj"), [Gpt2Site::MlpCProj]);
        assert!(on("q_proj").is_empty() && on("proj").is_empty());
    }

    /// GPT-2 straight from the checkpoint's Conv1D tensors (`y = x W + b`, no transposes), in
    /// plain candle ops, for one unpadded sequence: the oracle for the loader and the forward.
    fn reference_logits(t: &HashMap<String, Tensor>, c: &Gpt2Config, ids: &[u32]) -> Tensor {
        let g = |n: &str| t[n].to_dtype(DType::F64).unwrap();
        let conv = |x: &Tensor, p: &str| {
            x.matmul(&g(&format!("{p}.weight")))
                .unwrap()
                .broadcast_add(&g(&format!("{p}.bias")))
                .unwrap()
        };
        let ln = |x: &Tensor, p: &str| {
            let mean = x.mean_keepdim(1).unwrap();
            let xc = x.broadcast_sub(&mean).unwrap();
            let var = xc.sqr().unwrap().mean_keepdim(1).unwrap();
            let rstd = (var + c.layer_norm_epsilon)
                .unwrap()
                .sqrt()
                .unwrap()
                .recip()
                .unwrap();
            xc.broadcast_mul(&rstd)
                .unwrap()
                .broadcast_mul(&g(&format!("{p}.weight")))
                .unwrap()
                .broadcast_add(&g(&format!("{p}.bias")))
                .unwrap()
        };
        let n = ids.len();
        let (e, d) = (c.n_embd, c.head_dim());
        let ids_t = Tensor::from_slice(ids, n, &Device::Cpu).unwrap();
        let mut x = (g("wte.weight").index_select(&ids_t, 0).unwrap()
            + g("wpe.weight").narrow(0, 0, n).unwrap())
        .unwrap();
        let causal: Vec<f64> = (0..n)
            .flat_map(|i| (0..n).map(move |j| if j > i { f64::NEG_INFINITY } else { 0.0 }))
            .collect();
        let causal = Tensor::from_vec(causal, (n, n), &Device::Cpu).unwrap();
        for l in 0..c.n_layer {
            let p = format!("h.{l}");
            let qkv = conv(&ln(&x, &format!("{p}.ln_1")), &format!("{p}.attn.c_attn"));
            let mut heads = Vec::new();
            for h in 0..c.n_head {
                let part = |k: usize| qkv.narrow(1, k * e + h * d, d).unwrap();
                let s = (part(0).matmul(&part(1).t().unwrap()).unwrap() / (d as f64).sqrt())
                    .unwrap()
                    .broadcast_add(&causal)
                    .unwrap();
                let p = candle_core::D::Minus1;
                let ex = s
                    .broadcast_sub(&s.max_keepdim(p).unwrap())
                    .unwrap()
                    .exp()
                    .unwrap();
                let probs = ex.broadcast_div(&ex.sum_keepdim(p).unwrap()).unwrap();
                heads.push(probs.matmul(&part(2)).unwrap());
            }
            let ctx = Tensor::cat(&heads, 1).unwrap();
            x = (x + conv(&ctx, &format!("{p}.attn.c_proj"))).unwrap();
            let f = conv(&ln(&x, &format!("{p}.ln_2")), &format!("{p}.mlp.c_fc"));
            let k = (2.0 / std::f64::consts::PI).sqrt();
            let u =
                ((&f + f.powf(3.0).unwrap().affine(0.044715, 0.0).unwrap()).unwrap() * k).unwrap();
            let act = (&f * u.tanh().unwrap().affine(0.5, 0.5).unwrap()).unwrap();
            x = (x + conv(&act, &format!("{p}.mlp.c_proj"))).unwrap();
        }
        ln(&x, "ln_f")
            .matmul(&g("wte.weight").t().unwrap())
            .unwrap()
    }

    fn write_folder(dir: &Path, cfg: &Gpt2Config, t: &HashMap<String, Tensor>, prefix: &str) {
        std::fs::create_dir_all(dir).unwrap();
        let mut file: HashMap<String, Tensor> = t
            .iter()
            .map(|(k, v)| (format!("{prefix}{k}"), v.clone()))
            .collect();
        // Old checkpoints also hold the causal-mask buffer; it is not a parameter.
        let np = cfg.n_positions;
        let buffer = Tensor::ones((1, 1, np, np), DType::F32, &Device::Cpu).unwrap();
        file.insert(format!("{prefix}h.0.attn.bias"), buffer);
        candle_core::safetensors::save(&file, dir.join("model.safetensors")).unwrap();
        let mut json = serde_json::to_value(cfg).unwrap();
        json["model_type"] = "gpt2".into();
        json["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
        std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
    }

    /// A Hugging Face folder (Conv1D `[in, out]` weights, with or without `transformer.`) loads
    /// to the model `random`'s path builds from the same tensors, and both agree with a forward
    /// computed straight from the Conv1D tensors; one element of c_attn's output is checked by
    /// hand against `y = x W + b`.
    #[test]
    fn hf_folder_loads_conv1d_weights_transposed() {
        let cfg = config();
        let t = tensors(&cfg, 8);
        let ids = [3u32, 17, 1, 39, 0, 22, 8];
        let b = {
            let n = ids.len();
            let mask = Tensor::ones((1, n), DType::U32, &Device::Cpu).unwrap();
            LmBatch {
                input_ids: Tensor::from_slice(&ids, (1, n), &Device::Cpu).unwrap(),
                mask_add: crate::nn::attention::mask_to_additive(&mask, DType::F32).unwrap(),
                targets: vec![-100; n],
                batch: 1,
                seq: n,
            }
        };
        let want = reference_logits(&t, &cfg, &ids);
        let in_memory = CausalLm::logits(&model_from(&cfg, &t, DType::F32), &b).unwrap();
        let d = max_abs_diff(&in_memory.to_dtype(DType::F64).unwrap(), &want);
        assert!(d < 1e-4, "forward vs the Conv1D reference: {d}");
        let dir = tempfile::tempdir().unwrap();
        for prefix in ["transformer.", ""] {
            let folder = dir.path().join(format!("gpt2{prefix}"));
            write_folder(&folder, &cfg, &t, prefix);
            let m = Gpt2LMHeadModel::load_hf(&folder, DType::F32, &Device::Cpu).unwrap();
            assert_eq!(m.config, cfg);
            let got = CausalLm::logits(&m, &b).unwrap();
            assert_eq!(max_abs_diff(&got, &in_memory), 0.0, "prefix {prefix:?}");

            // c_attn of layer 1: column 37 (a key feature) of row 0, by hand.
            let x = randn(&[2, cfg.n_embd], 21).to_dtype(DType::F32).unwrap();
            let y = m.layers[1].linears[Gpt2Site::CAttn as usize]
                .base
                .forward(&x)
                .unwrap();
            assert_eq!(y.dims(), &[2, 3 * cfg.n_embd]);
            let w: Vec<Vec<f32>> = t["h.1.attn.c_attn.weight"].to_vec2().unwrap();
            let bias: Vec<f32> = t["h.1.attn.c_attn.bias"].to_vec1().unwrap();
            let xr: Vec<f32> = x.get(0).unwrap().to_vec1().unwrap();
            let j = 37;
            let by_hand: f64 = bias[j] as f64
                + (0..cfg.n_embd)
                    .map(|i| xr[i] as f64 * w[i][j] as f64)
                    .sum::<f64>();
            let ours: f32 = y.get(0).unwrap().get(j).unwrap().to_scalar().unwrap();
            assert!((ours as f64 - by_hand).abs() < 1e-5, "{ours} vs {by_hand}");
        }
    }

    /// A folder's GPT-2 trains with its config's dropout (embeddings, attention, residual), as
    /// transformers does in train mode: a training pass differs from one without dropout, and
    /// inference stays deterministic.
    #[test]
    fn hf_folder_trains_with_config_dropout() {
        let mut cfg = config();
        (cfg.embd_pdrop, cfg.attn_pdrop, cfg.resid_pdrop) = (0.1, 0.2, 0.3);
        let dir = tempfile::tempdir().unwrap();
        write_folder(dir.path(), &cfg, &tensors(&cfg, 8), "");
        let m = Gpt2LMHeadModel::load_hf(dir.path(), DType::F64, &Device::Cpu).unwrap();
        assert_eq!(m.embd_dropout.p, 0.1);
        for l in &m.layers {
            assert_eq!((l.attention.dropout.p, l.resid_dropout.p), (0.2, 0.3));
        }
        let mut plain = m.clone();
        plain.set_dropout(0.0, 0.0, 0.0);
        let b = batch(DType::F64);
        let train_loss = |m: &Gpt2LMHeadModel| {
            let mut rng = StdRng::seed_from_u64(5);
            let mut pass = Pass {
                training: true,
                rng: &mut rng,
            };
            let (hn, _) = m.forward_train(&b, &mut pass, false).unwrap();
            let l = crate::nn::loss::lm_head_loss(&hn, m.head_weight(), &b.targets, 64, false);
            l.unwrap().loss_sum
        };
        assert_ne!(train_loss(&m), train_loss(&plain));
        let eval = |m: &Gpt2LMHeadModel| CausalLm::loss(m, &b).unwrap().loss_sum;
        assert_eq!(eval(&m), eval(&plain));
    }

    /// The PEFT files of a GPT-2 adapter say `fan_in_fan_out: true`, keep PEFT's shapes and
    /// paths, and load back into a fresh model.
    #[test]
    fn peft_export_says_fan_in_fan_out() {
        let m = tiny();
        let lora = LoraConfig {
            r: 2,
            alpha: 4.0,
            dropout: 0.1,
            target_modules: vec!["c_attn".into(), "c_fc".into(), "c_proj".into()],
            use_rslora: false,
        };
        let dir = tempfile::tempdir().unwrap();
        crate::io::peft::save(dir.path(), &m, &lora, "tiny-gpt2").unwrap();
        let pc = crate::io::peft::read_config(dir.path()).unwrap();
        assert!(pc.fan_in_fan_out);
        assert_eq!(pc.task_type.as_deref(), Some("CAUSAL_LM"));
        assert_eq!(pc.layers_to_transform, None);
        let file = candle_core::safetensors::load(
            dir.path().join(crate::io::peft::WEIGHTS_FILE),
            &Device::Cpu,
        )
        .unwrap();
        let key = "base_model.model.transformer.h.0.attn.c_attn";
        assert_eq!(file[&format!("{key}.lora_A.weight")].dims(), &[2, 16]);
        assert_eq!(file[&format!("{key}.lora_B.weight")].dims(), &[48, 2]);
        let mut fresh = tiny();
        for (l, s) in fresh.adapter_sites() {
            let ad = fresh.adapter_mut(l, s).unwrap();
            ad.b = ad.b.zeros_like().unwrap();
        }
        crate::io::peft::load(dir.path(), &mut fresh).unwrap();
        for ((pa, a), (pb, b)) in m.adapters().into_iter().zip(fresh.adapters()) {
            assert_eq!(pa, pb);
            assert_eq!(max_abs_diff(&a.a, &b.a), 0.0);
            assert_eq!(max_abs_diff(&a.b, &b.b), 0.0);
        }
    }

    /// Bad configs fail naming the file and the field.
    #[test]
    fn bad_config_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let cases = [
            (serde_json::json!({"n_head": 5}), "n_head"),
            (serde_json::json!({"activation_function": "relu"}), "relu"),
            (
                serde_json::json!({"scale_attn_by_inverse_layer_idx": true}),
                "scale",
            ),
            (serde_json::json!({"attn_pdrop": 1.0}), "attn_pdrop"),
            (serde_json::json!({"n_embd": "wide"}), "not a GPT-2 config"),
        ];
        for (patch, needle) in cases {
            let mut json = serde_json::to_value(config()).unwrap();
            for (k, v) in patch.as_object().unwrap() {
                json[k] = v.clone();
            }
            std::fs::write(&path, json.to_string()).unwrap();
            let e = Gpt2Config::from_file(&path).unwrap_err().to_string();
            assert!(
                e.contains(&path.display().to_string()) && e.contains(needle),
                "{needle}: {e}"
            );
        }
        let e = Gpt2Config::from_file(&dir.path().join("nope.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope.json"), "{e}");
    }

    /// Positions past `n_positions` are refused, not read out of the table.
    #[test]
    fn too_long_sequences_are_refused() {
        let cfg = config();
        let m = model_from(&cfg, &tensors(&cfg, 3), DType::F32);
        let n = cfg.n_positions + 1;
        let mask = Tensor::ones((1, n), DType::U32, &Device::Cpu).unwrap();
        let b = LmBatch {
            input_ids: Tensor::zeros((1, n), DType::U32, &Device::Cpu).unwrap(),
            mask_add: crate::nn::attention::mask_to_additive(&mask, DType::F32).unwrap(),
            targets: vec![-100; n],
            batch: 1,
            seq: n,
        };
        let e = CausalLm::logits(&m, &b).unwrap_err().to_string();
        assert!(e.contains("positions"), "{e}");
    }
}
