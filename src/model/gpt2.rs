//! GPT-2 decoder (Hugging Face `GPT2LMHeadModel`): learned position embeddings, pre-LN blocks
//! with LayerNorm, fused q/k/v projection (`c_attn`), multi-head causal attention, a GELU (tanh
//! form, `gelu_new`) MLP, a final `ln_f` and an LM head tied to the token embeddings.
//!
//! GPT-2 checkpoints store their linears as `Conv1D`, weight `[in, out]` (`y = x W + b`); they are
//! transposed to `Linear`'s `[out, in]` at load. `c_attn` stays one linear of `3 * n_embd` outputs
//! (q, k, v side by side), so a LoRA adapter on it is one adapter over the fused output, as PEFT
//! puts it (PEFT's default GPT-2 target is `c_attn`, with `fan_in_fan_out: true`).

use super::causal::{self, DecoderParts};
use super::memory::{Acts, LayerMemory};
use super::stack::{self, Keep, PartSaved};
use crate::adapters::lora::{LoraGrads, LoraLinear, LoraLinearSaved};
use crate::adapters::{self, AdaptedStack, Block};
use crate::adapters::{SiteBackward, SiteForward, SiteStates};
use crate::io::weights::Weights;
use crate::io::IoError;
use crate::nn::attention::{
    Attention, AttentionArgs, AttentionCall, AttentionSaved, AttnShape, KvCache,
};
use crate::nn::dropout::{self, DropoutSaved};
use crate::nn::gelu::{self, GeluKind, GeluSaved};
use crate::nn::linear::Linear;
use crate::nn::norm::{Norm, NormSaved};
use crate::nn::offload::SavedTensors;
use crate::nn::{self, Dropout, Pass};
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
        use super::limits;
        super::check_sizes(
            path,
            &[
                ("vocab_size", self.vocab_size, limits::VOCAB),
                ("n_positions", self.n_positions, limits::POSITIONS),
                ("n_embd", self.n_embd, limits::HIDDEN),
                ("n_layer", self.n_layer, limits::LAYERS),
                ("n_head", self.n_head, limits::HEADS),
            ],
        )?;
        // After n_embd is bounded: `inner()` may be `4 * n_embd`.
        super::check_sizes(path, &[("n_inner", self.inner(), limits::INTERMEDIATE)])?;
        super::check_reals(
            path,
            &[("layer_norm_epsilon", self.layer_norm_epsilon)],
            false,
        )?;
        let ids = self.bos_token_id.map(|id| ("bos_token_id", id));
        let ids = ids
            .into_iter()
            .chain(self.eos_token_id.map(|id| ("eos_token_id", id)));
        super::check_token_ids(path, ids, self.vocab_size)?;
        if self.n_head == 0 || !self.n_embd.is_multiple_of(self.n_head) {
            return bad(format!(
                "n_embd ({}) must be a multiple of n_head ({})",
                self.n_embd, self.n_head
            ));
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
    pub ln_1: Norm,
    pub ln_2: Norm,
    pub act: GeluKind,
    /// On each branch's output before the residual add (`resid_pdrop`).
    pub resid_dropout: Dropout,
}

crate::adapters::block::impl_block!(Gpt2Block, Gpt2Site);

/// What a block on the gradient path keeps for backward.
pub struct Gpt2BlockSaved {
    lin: SiteStates<Gpt2Site, LoraLinearSaved>,
    ln_1: NormSaved,
    attn: PartSaved<AttentionSaved, AttentionArgs>,
    drop_attn: Option<DropoutSaved>,
    ln_2: NormSaved,
    gelu: PartSaved<GeluSaved>,
    drop_mlp: Option<DropoutSaved>,
}

impl SavedTensors for Gpt2BlockSaved {
    fn each_tensor(&mut self, f: &mut dyn FnMut(&mut Tensor)) {
        self.lin.each_tensor(f);
        self.ln_1.each_tensor(f);
        self.attn.each_tensor(f);
        self.ln_2.each_tensor(f);
        self.gelu.each_tensor(f);
    }
}

/// Gradients of a block's trainable adapters.
pub type BlockGrads = Vec<(Gpt2Site, LoraGrads)>;

/// Gradients of every trainable adapter, by `(layer, site)`.
pub type SiteGrads = causal::SiteGrads<Gpt2Site>;

/// Per-adapter monitoring output `(site, X adapted, Y base)`.
pub type Gpt2Monitored = adapters::Monitored<Gpt2Site>;

impl Gpt2Block {
    /// What [`Gpt2Block::forward`] keeps (its [`Gpt2BlockSaved`]) and its temporaries, from
    /// shapes.
    pub fn memory(&self, acts: Acts) -> LayerMemory {
        use Gpt2Site::*;
        let lin = |s: Gpt2Site| Block::linear(self, s);
        let (h, f) = (lin(CAttn).base.in_features(), lin(CFc).base.out_features());
        let head_dim = h / self.attention.num_heads;
        let state = acts.lora_group(&[lin(CAttn)])
            + acts.lora_group(&[lin(CFc)])
            + acts.lora_group_recomputed(&[lin(MlpCProj)])
            + 2 * acts.norm(h)
            + acts.attention_then(&self.attention, head_dim, lin(AttnCProj))
            + acts.of(f);
        // Matmul FLOPs a token of each linear.
        let mm = |s: Gpt2Site| acts.matmul(lin(s).base.out_features(), lin(s).base.in_features());
        let (c_attn, c_proj, fc, mlp_proj) = (mm(CAttn), mm(AttnCProj), mm(CFc), mm(MlpCProj));
        LayerMemory {
            state,
            transient: acts.transient(&self.attention, head_dim, h, f)
                + acts.ffn_out_backward(lin(MlpCProj)),
            ffn_input: acts.of(f),
            ffn_cost_pct: acts.share_pct(fc, c_attn + c_proj + mlp_proj, h),
            attention_state: acts.attention_alone(&self.attention, head_dim, lin(AttnCProj)),
            attention_cost_pct: acts.attention_share_pct(c_attn, c_proj + fc + mlp_proj, h),
            checkpoint_cost_pct: 100,
        }
    }

    /// `x` is `[batch*seq, n_embd]`; pre-LN residual blocks: `h = x + c_proj(attn(ln_1(x)))`,
    /// `out = h + mlp.c_proj(gelu(c_fc(ln_2(h))))`.
    pub fn forward(
        &self,
        x: &Tensor,
        mask_add: &Tensor,
        shape: AttnShape,
        pass: &mut Pass,
        keep: Keep,
        monitor: Option<&mut Gpt2Monitored>,
    ) -> Result<(Tensor, Option<Gpt2BlockSaved>)> {
        let call = AttentionCall::Forward {
            mask_add,
            shape,
            rope: None,
            save: keep.keeps_attention(),
        };
        self.forward_with(x, call, pass, keep, monitor)
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
        let call = AttentionCall::Cached {
            batch,
            rope: None,
            cache,
        };
        Ok(self.forward_with(x, call, pass, Keep::Nothing, None)?.0)
    }

    /// The block around its attention, which runs as `call` says.
    fn forward_with(
        &self,
        x: &Tensor,
        call: AttentionCall,
        pass: &mut Pass,
        keep: Keep,
        monitor: Option<&mut Gpt2Monitored>,
    ) -> Result<(Tensor, Option<Gpt2BlockSaved>)> {
        let save = keep.saves();
        let mut lin = SiteForward::new(self, save, monitor);
        let c = x.dim(1)?;
        let (xn, ln_1) = self.ln_1.forward(x, save)?;
        let attn_start = match stack::attention_start(keep, pass) {
            Some(rng) => Some((rng, AttentionArgs::of(&call)?)),
            None => None,
        };
        let qkv = lin.run(Gpt2Site::CAttn, &xn, pass)?;
        drop(xn);
        let (q, k, v) = (
            qkv.narrow(1, 0, c)?,
            qkv.narrow(1, c, c)?,
            qkv.narrow(1, 2 * c, c)?,
        );
        let (ctx, attn) = self.attention.call(call, (&q, &k, &v), pass)?;
        drop((q, k, v, qkv));
        let a = lin.run(Gpt2Site::AttnCProj, &ctx, pass)?;
        drop(ctx);
        let (a, drop_attn) = self.resid_dropout.forward(&a, pass, save)?;
        let h = nn::add(x, &a)?;
        let (hn, ln_2) = self.ln_2.forward(&h, save)?;
        let ffn = stack::ffn_start(keep, pass);
        let f = lin.run(Gpt2Site::CFc, &hn, pass)?;
        drop(hn);
        let (g, gelu) = gelu::forward_kind(&f, self.act, save)?;
        let gelu = PartSaved::new(ffn, gelu);
        drop(f);
        let m = lin.run_recomputed(Gpt2Site::MlpCProj, &g, pass)?;
        drop(g);
        let (m, drop_mlp) = self.resid_dropout.forward(&m, pass, save)?;
        let out = nn::add(&h, &m)?;
        // Every part is Some when `save` is set.
        let saved = (|| {
            Some(Gpt2BlockSaved {
                lin: lin.states,
                ln_1: ln_1?,
                attn: PartSaved::with(attn_start, attn)?,
                drop_attn,
                ln_2: ln_2?,
                gelu: gelu?,
                drop_mlp,
            })
        })();
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
        let gelu = saved.gelu.get(|pass, ()| {
            let hn = saved.ln_2.output(&self.ln_2)?;
            Ok(GeluSaved::of(
                self.replay(Gpt2Site::CFc, &hn, pass)?,
                self.act,
            ))
        })?;
        let dm = dropout::backward_opt(&saved.drop_mlp, dout.clone())?;
        let dg = lin.back_dx_recomputed(Gpt2Site::MlpCProj, &dm, || gelu.output())?;
        drop(dm);
        let df = gelu.backward(&dg)?;
        drop(dg);
        let dhn = lin.back_dx(Gpt2Site::CFc, &df)?;
        drop(df);
        let dh = saved.ln_2.backward_adding(&self.ln_2, &dhn, dout)?;
        drop(dhn);
        let da = dropout::backward_opt(&saved.drop_attn, dh.clone())?;
        let dctx = lin.back_dx(Gpt2Site::AttnCProj, &da)?;
        drop(da);
        let dx = if need_dx || self.linear(Gpt2Site::CAttn).trains() {
            let attn = saved.attn.get(|pass, args| {
                let xn = saved.ln_1.output(&self.ln_1)?;
                let qkv = self.replay(Gpt2Site::CAttn, &xn, pass)?;
                drop(xn);
                let c = qkv.dim(1)? / 3;
                let (q, k, v) = (
                    qkv.narrow(1, 0, c)?,
                    qkv.narrow(1, c, c)?,
                    qkv.narrow(1, 2 * c, c)?,
                );
                args.recompute(&self.attention, (&q, &k, &v), pass)
            })?;
            let (dq, dk, dv) = attn.backward(&self.attention, &dctx)?;
            drop(dctx);
            let dqkv = Tensor::cat(&[&dq, &dk, &dv], 1)?;
            drop((dq, dk, dv));
            match lin.back(Gpt2Site::CAttn, &dqkv, need_dx)? {
                Some(dxn) => Some(saved.ln_1.backward_adding(&self.ln_1, &dxn, &dh)?),
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
    pub ln_f: Norm,
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
        let ln = |p: &Weights| -> std::result::Result<Norm, IoError> {
            Ok(Norm::layer(
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
        let constant = |name: &str| {
            if name.ends_with(".bias") {
                Some(0.0)
            } else {
                (name.starts_with("ln_f") || name.contains(".ln_")).then_some(1.0)
            }
        };
        super::random_tensors(tensor_shapes(config), constant, rng)
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
    fn layers_path(&self) -> &'static str {
        "transformer.h"
    }
    const TASK_TYPE: Option<&'static str> = Some("CAUSAL_LM");
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
        keep: Keep,
        monitor: Option<&mut Gpt2Monitored>,
    ) -> Result<(Tensor, Option<Gpt2BlockSaved>)> {
        layer.forward(x, mask_add, shape, pass, keep, monitor)
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

    fn last_norm(&self) -> &Norm {
        &self.ln_f
    }

    /// The LM head's weight: the token embeddings.
    fn layer_memory(&self, layer: &Gpt2Block, acts: Acts) -> LayerMemory {
        layer.memory(acts)
    }

    fn head_weight(&self) -> &Tensor {
        &self.wte
    }
}

#[cfg(test)]
#[path = "gpt2_tests.rs"]
mod tests;
