//! LLaMA-family decoder (SmolLM2, LLaMA 2/3, Mistral layout): RMSNorm, rotary positions,
//! grouped-query causal attention, SwiGLU MLP, tied or untied LM head.

use crate::io::IoError;
use crate::nn::offload::SavedTensors;
use std::path::Path;

use super::causal::{self, DecoderParts};
pub use super::llama_config::{LlamaConfig, RopeScaling};
use super::memory::{Acts, LayerMemory};
use super::stack::{self, Keep, PartSaved};
use crate::adapters::lora::{LoraGrads, LoraLinear, LoraLinearSaved};
use crate::adapters::Block;
use crate::adapters::{self, AdaptedStack};
use crate::adapters::{SiteBackward, SiteForward, SiteStates};
use crate::io::weights::Weights;
use crate::nn::attention::{
    Attention, AttentionArgs, AttentionCall, AttentionSaved, AttnShape, KvCache,
};
use crate::nn::linear::{Linear, QuantFormat};
use crate::nn::norm::{Norm, NormSaved};
use crate::nn::rope::Rope;
use crate::nn::swiglu::{self, SwiGluSaved};
use crate::nn::{self, Dropout, Pass};
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
    pub input_norm: Norm,
    pub post_attention_norm: Norm,
}

crate::adapters::block::impl_block!(LlamaLayer, LlamaSite);

/// What a layer on the gradient path keeps for backward.
pub struct LlamaLayerSaved {
    lin: SiteStates<LlamaSite, LoraLinearSaved>,
    input_norm: NormSaved,
    attn: PartSaved<AttentionSaved, AttentionArgs>,
    post_norm: NormSaved,
    swiglu: PartSaved<SwiGluSaved>,
}

impl SavedTensors for LlamaLayerSaved {
    fn each_tensor(&mut self, f: &mut dyn FnMut(&mut Tensor)) {
        self.lin.each_tensor(f);
        self.input_norm.each_tensor(f);
        self.attn.each_tensor(f);
        self.post_norm.each_tensor(f);
        self.swiglu.each_tensor(f);
    }
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
        keep: Keep,
        monitor: Option<&mut LlamaMonitored>,
    ) -> Result<(Tensor, Option<LlamaLayerSaved>)> {
        let attn = (mask_add, shape, rope);
        let (out, saved) = self.forward_train(x, attn, pass, keep, monitor, true)?;
        Ok((out.expect("output asked for"), saved))
    }

    /// The layer's saved state from a training forward that stops where only its output would
    /// be computed: `down_proj` without an adapter keeps nothing, so its product, SwiGLU's
    /// output and the residual add are left out (about a fifth of the layer's matmul FLOPs at
    /// LLaMA's widths). For a checkpointed layer's second forward, in backward.
    pub fn state(
        &self,
        x: &Tensor,
        mask_add: &Tensor,
        shape: AttnShape,
        rope: &Rope,
        pass: &mut Pass,
    ) -> Result<LlamaLayerSaved> {
        let attn = (mask_add, shape, rope);
        match self.forward_train(x, attn, pass, Keep::ALL, None, false)?.1 {
            Some(s) => Ok(s),
            None => candle_core::bail!("a LLaMA layer run with save kept no state"),
        }
    }

    /// [`LlamaLayer::forward_with`] on a whole-sequence attention of `(mask_add, shape, rope)`.
    fn forward_train(
        &self,
        x: &Tensor,
        (mask_add, shape, rope): (&Tensor, AttnShape, &Rope),
        pass: &mut Pass,
        keep: Keep,
        monitor: Option<&mut LlamaMonitored>,
        output: bool,
    ) -> Result<(Option<Tensor>, Option<LlamaLayerSaved>)> {
        let call = AttentionCall::Forward {
            mask_add,
            shape,
            rope: Some(rope),
            save: keep.keeps_attention(),
        };
        self.forward_with(x, call, pass, keep, monitor, output)
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
        let rope = Some(rope);
        let call = AttentionCall::Cached { batch, rope, cache };
        Ok(self
            .forward_with(x, call, pass, Keep::Nothing, None, true)?
            .0
            .expect("output asked for"))
    }

    /// The layer around its attention, which runs as `call` says; its output only when
    /// `output` or when `down_proj` has an adapter (see [`LlamaLayer::state`]).
    fn forward_with(
        &self,
        x: &Tensor,
        call: AttentionCall,
        pass: &mut Pass,
        keep: Keep,
        monitor: Option<&mut LlamaMonitored>,
        output: bool,
    ) -> Result<(Option<Tensor>, Option<LlamaLayerSaved>)> {
        let save = keep.saves();
        let mut lin = SiteForward::new(self, save, monitor);
        let (xn, input_norm) = self.input_norm.forward(x, save)?;
        let attn_start = match stack::attention_start(keep, pass) {
            Some(rng) => Some((rng, AttentionArgs::of(&call)?)),
            None => None,
        };
        let q = lin.run(LlamaSite::Q, &xn, pass)?;
        let k = lin.run(LlamaSite::K, &xn, pass)?;
        let v = lin.run(LlamaSite::V, &xn, pass)?;
        drop(xn);
        let (ctx, attn) = self.attention.call(call, (&q, &k, &v), pass)?;
        drop((q, k, v));
        let h = nn::add(x, &lin.run(LlamaSite::O, &ctx, pass)?)?;
        drop(ctx);
        let (hn, post_norm) = self.post_attention_norm.forward(&h, save)?;
        let ffn = stack::ffn_start(keep, pass);
        let g = lin.run(LlamaSite::Gate, &hn, pass)?;
        let u = lin.run(LlamaSite::Up, &hn, pass)?;
        drop(hn);
        let (out, sw) = if !output && save && lin.skip_unadapted(LlamaSite::Down)? {
            (None, Some(swiglu::SwiGluSaved::of(g, u)))
        } else {
            let (a, sw) = swiglu::forward(&g, &u, save)?;
            drop((g, u));
            let down = lin.run_recomputed(LlamaSite::Down, &a, pass)?;
            (Some(nn::add(&h, &down)?), sw)
        };
        // Every part is Some when `save` is set.
        let saved = (|| {
            Some(LlamaLayerSaved {
                lin: lin.states,
                input_norm: input_norm?,
                attn: PartSaved::with(attn_start, attn)?,
                post_norm: post_norm?,
                swiglu: PartSaved::new(ffn, sw)?,
            })
        })();
        Ok((out, saved))
    }

    /// What [`LlamaLayer::forward`] keeps (its [`LlamaLayerSaved`]) and its temporaries, from
    /// shapes.
    pub fn memory(&self, acts: Acts) -> LayerMemory {
        use LlamaSite::*;
        let lin = |s: LlamaSite| Block::linear(self, s);
        let (h, f) = (lin(Q).base.in_features(), lin(Gate).base.out_features());
        let head_dim = lin(Q).base.out_features() / self.attention.num_heads;
        let state = acts.norm_then(&self.input_norm, &[lin(Q), lin(K), lin(V)])
            + acts.attention_then(&self.attention, head_dim, lin(O))
            + acts.norm_then(&self.post_attention_norm, &[lin(Gate), lin(Up)])
            + acts.lora_group_recomputed(&[lin(Down)])
            + 2 * acts.of(f);
        // Matmul FLOPs a token: q, k and v; o; gate and up; down.
        let mm = |l: &LoraLinear| acts.matmul(l.base.out_features(), l.base.in_features());
        let (qkv, o) = (mm(lin(Q)) + mm(lin(K)) + mm(lin(V)), mm(lin(O)));
        let (gate_up, down) = (mm(lin(Gate)) + mm(lin(Up)), mm(lin(Down)));
        LayerMemory {
            state,
            transient: acts.transient(&self.attention, head_dim, h, f)
                + acts.ffn_out_backward(lin(Down)),
            ffn_input: 2 * acts.of(f),
            ffn_cost_pct: acts.share_pct(gate_up, qkv + o + down, h),
            attention_state: acts.attention_alone(&self.attention, head_dim, lin(O)),
            attention_cost_pct: acts.attention_share_pct(qkv, o + gate_up + down, h),
            // Without a down_proj adapter the second forward stops before it (`state`).
            checkpoint_cost_pct: match lin(Down).lora {
                Some(_) => 100,
                None => 100 - acts.share_pct(down, qkv + o + gate_up, h),
            },
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
        let swiglu = saved.swiglu.get(|pass, ()| {
            let hn = saved.post_norm.output(&self.post_attention_norm)?;
            let g = self.replay(LlamaSite::Gate, &hn, pass)?;
            Ok(SwiGluSaved::of(g, self.replay(LlamaSite::Up, &hn, pass)?))
        })?;
        let da = lin.back_dx_recomputed(LlamaSite::Down, dout, || swiglu.output())?;
        let (dg, du) = swiglu.backward(&da)?;
        drop(da);
        let dhn = lin.back_onto(LlamaSite::Gate, &dg, None, true)?;
        let dhn = lin.back_onto(LlamaSite::Up, &du, dhn, true)?;
        let dhn = dhn.expect("dx requested");
        drop((dg, du));
        let dh = saved
            .post_norm
            .backward_adding(&self.post_attention_norm, &dhn, dout)?;
        drop(dhn);
        let dctx = lin.back_dx(LlamaSite::O, &dh)?;
        let attn = saved.attn.get(|pass, args| {
            let xn = saved.input_norm.output(&self.input_norm)?;
            let q = self.replay(LlamaSite::Q, &xn, pass)?;
            let k = self.replay(LlamaSite::K, &xn, pass)?;
            let v = self.replay(LlamaSite::V, &xn, pass)?;
            drop(xn);
            args.recompute(&self.attention, (&q, &k, &v), pass)
        })?;
        let (dq, dk, dv) = attn.backward(&self.attention, &dctx)?;
        drop(dctx);
        let mut dxn = None;
        for (s, d) in [(LlamaSite::Q, dq), (LlamaSite::K, dk), (LlamaSite::V, dv)] {
            dxn = lin.back_onto(s, &d, dxn, need_dx)?;
        }
        let dx = match dxn {
            Some(dxn) => Some(
                saved
                    .input_norm
                    .backward_adding(&self.input_norm, &dxn, &dh)?,
            ),
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
    pub norm: Norm,
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
                input_norm: Norm::rms(l.get("input_layernorm.weight", &[h])?, c.rms_norm_eps),
                post_attention_norm: Norm::rms(
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
            norm: Norm::rms(m.get("norm.weight", &[h])?, c.rms_norm_eps),
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
        let constant = |name: &str| name.ends_with("norm.weight").then_some(1.0);
        let tensors = super::random_tensors(config.tensor_shapes(), constant, rng);
        Self::from_weights(config, &Weights::from_tensors(tensors, dtype, device))
    }
}

impl AdaptedStack for LlamaForCausalLM {
    type Layer = LlamaLayer;
    fn layers_path(&self) -> &'static str {
        "model.layers"
    }
    const TASK_TYPE: Option<&'static str> = Some("CAUSAL_LM");

    fn layers(&self) -> &[LlamaLayer] {
        &self.layers
    }

    fn layers_mut(&mut self) -> &mut [LlamaLayer] {
        &mut self.layers
    }
}

impl DecoderParts for LlamaForCausalLM {
    type LayerSaved = LlamaLayerSaved;

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
        keep: Keep,
        monitor: Option<&mut LlamaMonitored>,
    ) -> Result<(Tensor, Option<LlamaLayerSaved>)> {
        layer.forward(x, mask_add, shape, &self.rope, pass, keep, monitor)
    }

    fn layer_state(
        &self,
        layer: &LlamaLayer,
        x: &Tensor,
        mask_add: &Tensor,
        shape: AttnShape,
        pass: &mut Pass,
    ) -> Result<LlamaLayerSaved> {
        layer.state(x, mask_add, shape, &self.rope, pass)
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

    fn last_norm(&self) -> &Norm {
        &self.norm
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
