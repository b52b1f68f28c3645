//! An encoder with a task head (an [`EncoderHead`]: transformers' `...ForSequenceClassification`
//! or `...ForQuestionAnswering`), with LoRA adapters on any of the six linears of each layer and
//! explicit layer-wise backprop. The same body serves BERT, RoBERTa, MPNet and DistilBERT (see
//! [`EncoderFamily`], the table of their differences): other tensor names, positions counted
//! from the padding index, no token types, MPNet's relative position bias added to the attention
//! scores, and each family's classification head.
//!
//! ViT (`model::vit`) is the same body with pre-LN layers, patch embeddings and its image head.
//!
//! Layer data flow (post-LN BERT), per layer, rows = `batch * seq` tokens:
//! ```text
//! q,k,v = query(h), key(h), value(h)        (LoraLinear)
//! a     = LN1(dropout(out(attn(q,k,v))) + h)
//! h'    = LN2(dropout(output(gelu(intermediate(a)))) + a)
//! ```
//! and pre-LN (ViT), the same components in another order:
//! ```text
//! x     = LN1(h);  q,k,v = query(x), key(x), value(x)
//! a     = dropout(out(attn(q,k,v))) + h
//! h'    = dropout(output(gelu(intermediate(LN2(a))))) + a
//! ```

use super::memory::{Acts, LayerMemory, StepMemory};
use super::stack::{self, Keep, Recompute, StackSaved};
use crate::adapters::lora::{LoraAdapter, LoraConfig, LoraGrads, LoraLinear};
use crate::adapters::{self, AdaptedStack, HeadParam};
use crate::io::weights::Weights;
use crate::io::IoError;
use crate::nn::attention::{Attention, AttnShape};
use crate::nn::embedding::Embeddings;
use crate::nn::head::{ClassificationHead, HeadGrads, QaHead};
use crate::nn::linear::Linear;
use crate::nn::norm::Norm;
use crate::nn::{Dropout, Pass};
use crate::safe::MonitorPoint;
use candle_core::{DType, Device, Result, Tensor};
use rand::Rng;
use std::path::Path;

pub use super::bert_config::{BertConfig, EncoderFamily};
pub use super::bert_layer::{BertLayer, BertLayerSaved, Monitored, Site, SiteGrads};
pub use super::encoder_head::EncoderHead;
use super::encoder_head::{new_head_linear, stored_head_linear, HeadOn};

/// Gradients of one training step, by trainable parameter.
pub struct ModelGrads {
    /// `(layer, site, grads)` of every adapter that trains.
    pub adapters: Vec<(usize, Site, LoraGrads)>,
    pub head: HeadGrads,
}

/// The encoder body (embeddings, layers, MPNet's relative position bias) and a head.
#[derive(Clone, Debug)]
pub struct BertWithHead<H> {
    pub config: BertConfig,
    pub embeddings: InputEmbeddings,
    pub layers: Vec<BertLayer>,
    pub head: H,
    /// MPNet's relative position bias, `[buckets, heads]`, shared by every layer.
    pub relative_bias: Option<Tensor>,
}

/// transformers' `BertForSequenceClassification` (and MPNet's).
pub type BertForSequenceClassification = BertWithHead<ClassificationHead>;

/// transformers' `BertForQuestionAnswering` (and MPNet's): a start/end logit per token.
pub type BertForQuestionAnswering = BertWithHead<QaHead>;

/// What turns a batch into the first layer's input: token embeddings (the text encoders) or
/// patch embeddings (ViT).
#[derive(Clone, Debug)]
pub enum InputEmbeddings {
    Tokens(Embeddings),
    Patches(super::vit::PatchEmbeddings),
}

impl InputEmbeddings {
    /// `[batch*seq, hidden]`: of the batch's token ids, or of its pixel values.
    pub fn forward(&self, b: &BatchTensors, pass: &mut Pass) -> Result<Tensor> {
        match self {
            InputEmbeddings::Tokens(e) => e.forward(&b.input_ids, &b.token_type_ids, pass),
            InputEmbeddings::Patches(p) => match &b.pixel_values {
                Some(x) => p.forward(x, pass),
                None => candle_core::bail!("a ViT batch needs pixel values"),
            },
        }
    }

    /// The layers' dtype (the embedding tables').
    pub fn dtype(&self) -> DType {
        match self {
            InputEmbeddings::Tokens(e) => e.word.dtype(),
            InputEmbeddings::Patches(p) => p.projection.dtype(),
        }
    }

    pub fn device(&self) -> Device {
        match self {
            InputEmbeddings::Tokens(e) => e.word.device().clone(),
            InputEmbeddings::Patches(p) => p.projection.device().clone(),
        }
    }
}

/// One batch on the model's device: token ids (text), or pixel values (images; the ids are then
/// empty `[batch, 0]` tensors and the mask all zeros).
pub struct BatchTensors {
    /// `[batch, channels, height, width]`, preprocessed; None for text.
    pub pixel_values: Option<Tensor>,
    pub input_ids: Tensor,
    pub token_type_ids: Tensor,
    /// `[batch, 1, 1, seq]` additive key mask.
    pub mask_add: Tensor,
    pub batch: usize,
    pub seq: usize,
}

/// What a training forward keeps: the saved layers above the lowest trainable one, and the head.
pub struct ForwardSaved<S> {
    pub first_saved_layer: usize,
    /// Layers `first_saved_layer..` (their states, or checkpoints; indices relative to it).
    pub layers: StackSaved<BertLayerSaved>,
    head: S,
    mask_add: Tensor,
    shape: AttnShape,
}

impl<H: EncoderHead> BertWithHead<H> {
    /// Activations of `rows` sequences of `seq` tokens in the layers' dtype, on their device.
    fn acts(&self, rows: usize, seq: usize) -> Acts {
        let device = self.embeddings.device();
        Acts::new(rows, seq, self.embeddings.dtype(), &device).at_width(self.config.hidden_size)
    }
}

impl<H: EncoderHead> StepMemory for BertWithHead<H> {
    fn layer_memory(&self, layer: usize, rows: usize, seq: usize) -> LayerMemory {
        self.layers[layer].memory(self.acts(rows, seq))
    }

    fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    fn hidden_bytes(&self, rows: usize, seq: usize) -> usize {
        self.acts(rows, seq).of(self.config.hidden_size)
    }

    /// The classification head's dense layer and classifier work on one row each, `qa_outputs`
    /// on every token; the input gradient of either is hidden-wide (and `qa_outputs` keeps its
    /// input).
    fn head_bytes(&self, rows: usize, seq: usize) -> usize {
        2 * self.hidden_bytes(rows, seq)
    }
}

impl BertForSequenceClassification {
    /// Loads a Hugging Face encoder folder (`config.json`, `model.safetensors`) of any
    /// [`EncoderFamily`], with a classifier of `num_labels` outputs: the checkpoint's when it has
    /// one of that size, else a new one initialised as transformers does (normal(0, 0.02), zero
    /// bias) from `rng` (see [`Self::from_weights`]).
    pub fn load(
        dir: &Path,
        num_labels: usize,
        dtype: DType,
        device: &Device,
        rng: &mut impl Rng,
    ) -> std::result::Result<Self, IoError> {
        let (config, w) = open_encoder_dir(dir, dtype, device)?;
        Self::from_weights(config, &w, num_labels, rng)
    }

    /// Builds the model from checkpoint tensors named as the config's family names them. The
    /// head's trained layers (the classifier, and RoBERTa's or DistilBERT's dense layer) are the
    /// checkpoint's when it has them in the right shape, else new; `rng` draws the new ones
    /// either way (the classifier, then the trained dense layer), so what it draws next does not
    /// depend on the checkpoint.
    pub fn from_weights(
        config: BertConfig,
        w: &Weights,
        num_labels: usize,
        rng: &mut impl Rng,
    ) -> std::result::Result<Self, IoError> {
        BertWithHead::build(config, w, |c, w, on| {
            Self::classification_head(c, w, num_labels, on, rng)
        })
    }

    /// The family's classification head (see [`Self::from_weights`]), in `on`'s dtype.
    fn classification_head(
        c: &BertConfig,
        w: &Weights,
        num_labels: usize,
        on: HeadOn,
        rng: &mut impl Rng,
    ) -> std::result::Result<ClassificationHead, IoError> {
        let family = c.family();
        let h = c.hidden_size;
        let spec = family.spec().head;
        let mut new_linear = |out: usize| new_head_linear(out, h, on, w, rng);
        let new_classifier = new_linear(num_labels)?;
        let new_dense = spec.dense_trains.then(|| new_linear(h)).transpose()?;
        // Another number of labels is a new classifier, as transformers'
        // `ignore_mismatched_sizes`.
        let stored =
            |path: &str, out: usize| stored_head_linear(w, path, out, h, on, path == spec.out);
        let classifier = stored(spec.out, num_labels)?.unwrap_or(new_classifier);
        // A frozen dense layer (BERT's pooler) must be in the checkpoint.
        let dense = match (stored(spec.dense, h)?, new_dense) {
            (Some(d), _) => d,
            (None, Some(d)) => d,
            (None, None) => {
                let p = w.pp(spec.dense);
                Linear::new(p.get("weight", &[h, h])?, Some(p.get("bias", &[h])?))
            }
        };
        let head_drop = Dropout::new(c.head_dropout());
        Ok(ClassificationHead {
            dense,
            activation: spec.activation,
            dense_trains: spec.dense_trains,
            dropout_first: spec.dropout_first.then_some(head_drop),
            dropout: head_drop,
            classifier,
        })
    }

    /// The tensors a checkpoint of `config`'s family has, without its prefix, and their shapes:
    /// the embeddings, the layers and MPNet's relative bias, and BERT's pooler (the other
    /// families' heads are new when absent).
    pub fn checkpoint_shapes(config: &BertConfig) -> Vec<(String, Vec<usize>)> {
        let c = config;
        let family = c.family();
        let (h, f) = (c.hidden_size, c.intermediate_size);
        let mut shapes: Vec<(String, Vec<usize>)> = match &c.image {
            Some(g) => super::vit::embedding_shapes(g, h),
            None => Self::token_embedding_shapes(c),
        };
        if !family.spec().head.dense_trains && !family.spec().images {
            let d = family.spec().head.dense;
            shapes.push((format!("{d}.weight"), vec![h, h]));
            shapes.push((format!("{d}.bias"), vec![h]));
        }
        if family == EncoderFamily::MPNet {
            shapes.push((
                "encoder.relative_attention_bias.weight".into(),
                vec![c.relative_attention_num_buckets, c.num_attention_heads],
            ));
        }
        for i in 0..c.num_hidden_layers {
            let p = format!("{}.{i}", family.spec().encoder_layers);
            for s in Site::ALL {
                let (o, inp) = s.shape(h, f);
                let path = family.spec().site_paths[s as usize];
                shapes.push((format!("{p}.{path}.weight"), vec![o, inp]));
                shapes.push((format!("{p}.{path}.bias"), vec![o]));
            }
            for ln in family.spec().layer_norm_paths {
                shapes.push((format!("{p}.{ln}.weight"), vec![h]));
                shapes.push((format!("{p}.{ln}.bias"), vec![h]));
            }
        }
        shapes
    }

    /// A text encoder's embedding tensors and their shapes.
    fn token_embedding_shapes(c: &BertConfig) -> Vec<(String, Vec<usize>)> {
        let h = c.hidden_size;
        let mut shapes: Vec<(String, Vec<usize>)> = vec![
            (
                "embeddings.word_embeddings.weight".into(),
                vec![c.vocab_size, h],
            ),
            (
                "embeddings.position_embeddings.weight".into(),
                vec![c.max_position_embeddings, h],
            ),
            ("embeddings.LayerNorm.weight".into(), vec![h]),
            ("embeddings.LayerNorm.bias".into(), vec![h]),
        ];
        if c.family().spec().token_types {
            shapes.push((
                "embeddings.token_type_embeddings.weight".into(),
                vec![c.type_vocab_size, h],
            ));
        }
        shapes
    }

    /// A model of the given shape with random weights (normal(0, 0.02), LayerNorm 1/0), for
    /// benchmarks and tests; built through the same loading path as a checkpoint.
    pub fn random(
        config: BertConfig,
        num_labels: usize,
        dtype: DType,
        device: &Device,
        rng: &mut impl Rng,
    ) -> std::result::Result<Self, IoError> {
        let w = random_weights(&config, dtype, device, rng);
        Self::from_weights(config, &w, num_labels, rng)
    }
}

/// Random checkpoint tensors of `config`'s shape (normal(0, 0.02), LayerNorm 1/0, zero biases),
/// see [`BertForSequenceClassification::checkpoint_shapes`].
pub(crate) fn random_weights(
    config: &BertConfig,
    dtype: DType,
    device: &Device,
    rng: &mut impl Rng,
) -> Weights {
    let shapes = BertForSequenceClassification::checkpoint_shapes(config);
    let constant = |name: &str| {
        let norm = ["LayerNorm", "layer_norm", "layernorm"]
            .iter()
            .any(|l| name.contains(l));
        if norm {
            Some(if name.ends_with("weight") { 1.0 } else { 0.0 })
        } else {
            name.ends_with("bias").then_some(0.0)
        }
    };
    let tensors = super::random_tensors(shapes, constant, rng);
    Weights::from_tensors(tensors, dtype, device)
}

/// A Hugging Face encoder folder's `config.json` and its tensors (`model.safetensors`, one file or
/// shards) under the names of the config's family.
pub(crate) fn open_encoder_dir(
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> std::result::Result<(BertConfig, Weights), IoError> {
    if !dir.is_dir() {
        return Err(IoError::Missing {
            path: dir.into(),
            what: "model folder with config.json and model.safetensors".into(),
        });
    }
    let config = BertConfig::from_file(&dir.join("config.json"))?;
    let w = Weights::open_dir(dir, &config.family().prefixes(), dtype, device)?;
    Ok((config, w))
}

impl<H: EncoderHead> BertWithHead<H> {
    /// Builds the encoder body from checkpoint tensors named as the config's family names them,
    /// and the head `head` builds from the config, the checkpoint and where the head lives.
    pub(crate) fn build(
        config: BertConfig,
        w: &Weights,
        head: impl FnOnce(&BertConfig, &Weights, HeadOn) -> std::result::Result<H, IoError>,
    ) -> std::result::Result<Self, IoError> {
        config.validate(w.file())?;
        let c = &config;
        let family = c.family();
        let (h, f) = (c.hidden_size, c.intermediate_size);
        let ln = |w: &Weights| -> std::result::Result<Norm, IoError> {
            // Old checkpoints name LayerNorm parameters gamma/beta.
            let (g, b) = if w.contains("gamma") {
                ("gamma", "beta")
            } else {
                ("weight", "bias")
            };
            Ok(Norm::layer(
                w.get(g, &[h])?,
                w.get(b, &[h])?,
                c.layer_norm_eps,
            ))
        };
        let linear =
            |w: &Weights, out: usize, inp: usize| -> std::result::Result<Linear, IoError> {
                Ok(Linear::new(
                    w.get("weight", &[out, inp])?,
                    Some(w.get("bias", &[out])?),
                ))
            };
        let hidden_drop = Dropout::new(c.hidden_dropout_prob);
        let e = w.pp("embeddings");
        let embeddings = match &c.image {
            Some(g) => {
                InputEmbeddings::Patches(super::vit::PatchEmbeddings::load(&e, *g, h, hidden_drop)?)
            }
            None => InputEmbeddings::Tokens(Self::token_embeddings(c, &e, ln, hidden_drop)?),
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        let paths = &family.spec().site_paths;
        let [ln_attn, ln_out] = family.spec().layer_norm_paths;
        for i in 0..c.num_hidden_layers {
            let l = w.pp(family.spec().encoder_layers).pp(i);
            let mut lins = Vec::with_capacity(6);
            for s in Site::ALL {
                let (o, inp) = s.shape(h, f);
                lins.push(LoraLinear::new(linear(&l.pp(paths[s as usize]), o, inp)?));
            }
            layers.push(BertLayer {
                linears: lins.try_into().expect("six linears"),
                attention: Attention {
                    num_heads: c.num_attention_heads,
                    num_kv_heads: c.num_attention_heads,
                    causal: false,
                    dropout: Dropout::new(c.attention_probs_dropout_prob),
                },
                ln_attn: ln(&l.pp(ln_attn))?,
                ln_out: ln(&l.pp(ln_out))?,
                dropout_attn: if family.spec().attention_output_dropout {
                    hidden_drop
                } else {
                    Dropout::new(0.0)
                },
                dropout: hidden_drop,
                paths,
                pre_norm: family.spec().pre_norm,
            });
        }
        // The head runs in f32 beside half-precision layers.
        let on = HeadOn {
            dtype: crate::device::compute_dtype(embeddings.dtype()),
            device: &embeddings.device(),
        };
        let relative_bias = if family == EncoderFamily::MPNet {
            let table = w.get(
                "encoder.relative_attention_bias.weight",
                &[c.relative_attention_num_buckets, c.num_attention_heads],
            )?;
            Some(tensor(table.to_dtype(on.dtype), w)?)
        } else {
            None
        };
        let head = head(c, w, on)?;
        Ok(Self {
            config,
            embeddings,
            layers,
            head,
            relative_bias,
        })
    }
}

impl<H: EncoderHead> BertWithHead<H> {
    /// A text encoder's token embeddings (word, position, token type, LayerNorm).
    fn token_embeddings(
        c: &BertConfig,
        e: &Weights,
        ln: impl Fn(&Weights) -> std::result::Result<Norm, IoError>,
        hidden_drop: Dropout,
    ) -> std::result::Result<Embeddings, IoError> {
        let family = c.family();
        let h = c.hidden_size;
        let token_type = if family.spec().token_types {
            Some(e.get("token_type_embeddings.weight", &[c.type_vocab_size, h])?)
        } else {
            None
        };
        Ok(Embeddings {
            word: e.get("word_embeddings.weight", &[c.vocab_size, h])?,
            position: e.get(
                "position_embeddings.weight",
                &[c.max_position_embeddings, h],
            )?,
            token_type,
            padding_idx: family
                .spec()
                .positions_from_padding
                .then_some(c.pad_token_id),
            layer_norm: ln(&e.pp("LayerNorm"))?,
            dropout: hidden_drop,
        })
    }
}

impl<H: EncoderHead> BertWithHead<H> {
    /// The device the model lives on.
    pub fn device(&self) -> Device {
        self.embeddings.device()
    }

    /// Puts a fresh LoRA adapter on every linear `cfg.target_modules` names, in `layers` (all
    /// when None). Returns how many.
    pub fn add_lora(
        &mut self,
        cfg: &LoraConfig,
        layers: Option<&[usize]>,
        rng: &mut impl Rng,
    ) -> Result<usize> {
        adapters::add_lora(&mut self.layers, cfg, layers, rng)
    }

    // [`AdaptedStack`]'s, here too so that callers need not import it.
    pub fn adapter_sites(&self) -> Vec<(usize, Site)> {
        AdaptedStack::adapter_sites(self)
    }

    pub fn adapter(&self, layer: usize, site: Site) -> Option<&LoraAdapter> {
        AdaptedStack::adapter(self, layer, site)
    }

    pub fn adapter_mut(&mut self, layer: usize, site: Site) -> Option<&mut LoraAdapter> {
        AdaptedStack::adapter_mut(self, layer, site)
    }

    /// The lowest layer with an adapter that still trains; None when only the head trains.
    pub fn lowest_trainable_layer(&self) -> Option<usize> {
        crate::adapters::Adapted::lowest_trainable_layer(self)
    }

    /// Training forward. When every adapter below layer `k` is frozen (`k` > 0), the embeddings
    /// and layers below `k` are a fixed feature extractor: they run in inference mode (no dropout,
    /// nothing saved, see [`Self::forward_frozen_bottom`]), so their output per example is a
    /// constant the trainer may cache. Layers from `k` up train and save what backward needs.
    pub fn forward_train(
        &self,
        b: &BatchTensors,
        pass: &mut Pass,
        recompute: &Recompute,
    ) -> Result<(Tensor, ForwardSaved<H::Saved>)> {
        let first = self.lowest_trainable_layer().unwrap_or(self.layers.len());
        let h = if first > 0 {
            self.forward_frozen_bottom(b, first)?
        } else {
            self.embeddings.forward(b, pass)?
        };
        self.forward_train_from(b, h, first, pass, recompute)
    }

    /// Embeddings and layers `0..k` in inference mode: `[batch*seq, hidden]`, deterministic.
    pub fn forward_frozen_bottom(&self, b: &BatchTensors, k: usize) -> Result<Tensor> {
        Pass::inference(|pass| self.forward_frozen_bottom_in(b, k, pass))
    }

    /// Embeddings and layers `0..k`, saving nothing, in `pass`'s mode (training: with dropout).
    pub fn forward_frozen_bottom_in(
        &self,
        b: &BatchTensors,
        k: usize,
        pass: &mut Pass,
    ) -> Result<Tensor> {
        let h = self.embeddings.forward(b, pass)?;
        self.forward_layers_unsaved(b, h, 0, k, pass)
    }

    /// Layers `from..to` in inference mode on `h`, the output of layer `from - 1`.
    pub fn forward_frozen_layers(
        &self,
        b: &BatchTensors,
        h: Tensor,
        from: usize,
        to: usize,
    ) -> Result<Tensor> {
        Pass::inference(|pass| self.forward_layers_unsaved(b, h, from, to, pass))
    }

    fn forward_layers_unsaved(
        &self,
        b: &BatchTensors,
        mut h: Tensor,
        from: usize,
        to: usize,
        pass: &mut Pass,
    ) -> Result<Tensor> {
        let shape = AttnShape {
            batch: b.batch,
            seq: b.seq,
        };
        let bias = self.attention_bias(b)?;
        for layer in &self.layers[from..to] {
            h = layer
                .forward(&h, &bias, shape, pass, Keep::Nothing, None)?
                .0;
        }
        Ok(h)
    }

    /// One layer's training forward, as [`stack`] runs it.
    fn layer_forward<'a>(
        mask_add: &'a Tensor,
        shape: AttnShape,
    ) -> impl FnMut(&BertLayer, &Tensor, &mut Pass, Keep) -> Result<(Tensor, Option<BertLayerSaved>)> + 'a
    {
        move |layer, x, pass, keep| layer.forward(x, mask_add, shape, pass, keep, None)
    }

    /// Layers `first..` and the head on `h` (the output of layer `first - 1`, or of the
    /// embeddings), saving for backward, or with `checkpoint` keeping only each layer's input
    /// (see [`stack`]).
    pub fn forward_train_from(
        &self,
        b: &BatchTensors,
        h: Tensor,
        first: usize,
        pass: &mut Pass,
        recompute: &Recompute,
    ) -> Result<(Tensor, ForwardSaved<H::Saved>)> {
        let shape = AttnShape {
            batch: b.batch,
            seq: b.seq,
        };
        let bias = self.attention_bias(b)?;
        let run = Self::layer_forward(&bias, shape);
        let (h, layers) = stack::forward(&self.layers[first..], first, h, pass, recompute, run)?;
        let (logits, head) = self.head.forward(&h, b.batch, b.seq, pass, true)?;
        let head = head.expect("head saved");
        Ok((
            logits,
            ForwardSaved {
                first_saved_layer: first,
                layers,
                head,
                mask_add: bias,
                shape,
            },
        ))
    }

    /// Backward from the logits' gradient down to the lowest trainable layer, and no further.
    pub fn backward(&self, saved: ForwardSaved<H::Saved>, dlogits: &Tensor) -> Result<ModelGrads> {
        let (dh, head) = self.head.backward(saved.head, dlogits)?;
        let first = saved.first_saved_layer;
        let mut run = Self::layer_forward(&saved.mask_add, saved.shape);
        let state = |l: &BertLayer, x: &Tensor, pass: &mut Pass| match run(l, x, pass, Keep::ALL)?.1
        {
            Some(s) => Ok(s),
            None => candle_core::bail!("a BERT layer run with save kept no state"),
        };
        let back = |l: &BertLayer, st, dout: &Tensor, need_dx| l.backward(st, dout, need_dx);
        let per_layer = stack::backward(&self.layers[first..], saved.layers, dh, state, back)?;
        let adapters = stack::by_site(first, per_layer);
        Ok(ModelGrads { adapters, head })
    }

    /// SAFE's monitoring of layer `i` (inference): its output on `h` (the output of layer
    /// `i - 1`, or of the embeddings) and each of its adapters' `(site, rows for CKA)` at `point` (see
    /// [`MonitorPoint`]).
    pub fn monitor_layer(
        &self,
        i: usize,
        b: &BatchTensors,
        h: &Tensor,
        point: MonitorPoint,
    ) -> Result<(Tensor, Monitored)> {
        let shape = AttnShape {
            batch: b.batch,
            seq: b.seq,
        };
        let bias = self.attention_bias(b)?;
        let run = |l: &BertLayer, pass: &mut Pass, monitor: Option<&mut Monitored>| {
            Ok(l.forward(h, &bias, shape, pass, Keep::Nothing, monitor)?.0)
        };
        adapters::monitor_layer(&self.layers[i], point, run)
    }

    /// What every layer adds to its attention scores: the batch's key padding mask
    /// `[batch, 1, 1, seq]`, plus for MPNet the relative position bias (`[batch, heads, seq,
    /// seq]`, made once per batch and shared by the layers).
    pub fn attention_bias(&self, b: &BatchTensors) -> Result<Tensor> {
        let Some(table) = &self.relative_bias else {
            return Ok(b.mask_add.clone());
        };
        let buckets = relative_buckets(b.seq, self.config.relative_attention_num_buckets);
        let idx = Tensor::from_vec(buckets, b.seq * b.seq, table.device())?;
        let heads = table.dim(1)?;
        let bias = table
            .index_select(&idx, 0)? // [t*t, heads]
            .t()?
            .reshape((1, heads, b.seq, b.seq))?
            .to_dtype(b.mask_add.dtype())?;
        bias.broadcast_add(&b.mask_add)
    }

    /// Inference forward returning logits.
    pub fn forward_eval(&self, b: &BatchTensors, pass: &mut Pass) -> Result<Tensor> {
        let shape = AttnShape {
            batch: b.batch,
            seq: b.seq,
        };
        let mut h = self.embeddings.forward(b, pass)?;
        let bias = self.attention_bias(b)?;
        for layer in &self.layers {
            h = layer
                .forward(&h, &bias, shape, pass, Keep::Nothing, None)?
                .0;
        }
        Ok(self.head.forward(&h, b.batch, b.seq, pass, false)?.0)
    }
}

impl<H: EncoderHead> AdaptedStack for BertWithHead<H> {
    type Layer = BertLayer;
    fn layers_path(&self) -> &'static str {
        self.config.family().spec().layers_path
    }
    const TASK_TYPE: Option<&'static str> = H::TASK_TYPE;

    fn layers(&self) -> &[BertLayer] {
        &self.layers
    }

    fn layers_mut(&mut self) -> &mut [BertLayer] {
        &mut self.layers
    }

    /// The head's output layer's weight and bias, then its trained dense layer's.
    fn head_tensors(&self) -> Vec<(HeadParam, Tensor)> {
        let mut v = Vec::new();
        for ([w, b], l) in self.head.trained() {
            if let Some(t) = l.weight.as_dense() {
                v.push((w, t.clone()));
            }
            if let Some(t) = &l.bias {
                v.push((b, t.clone()));
            }
        }
        v
    }

    fn head_tensor_mut(&mut self, key: HeadParam) -> Option<&mut Tensor> {
        let l = self.head.trained_mut(key)?;
        if key.is_bias() {
            l.bias.as_mut()
        } else {
            l.weight.as_dense_mut()
        }
    }

    fn head_tensor_path(&self, key: HeadParam) -> Option<&'static str> {
        self.head.trained_path(self.config.family(), key)
    }

    fn renamed_paths(&self) -> Option<(&'static str, &'static [&'static str])> {
        self.config.family().renamed_paths()
    }
}

/// MPNet's relative position buckets (transformers' `MPNetEncoder.relative_position_bucket`,
/// bidirectional, max distance 128) of every `(query i, key j)` pair, row-major: offsets under
/// a quarter of the buckets each have their own, larger ones share log-spaced buckets; keys
/// after the query use the upper half.
pub fn relative_buckets(seq: usize, num_buckets: usize) -> Vec<u32> {
    let half = num_buckets / 2;
    let max_exact = half / 2;
    let max_distance = 128.0f64;
    let mut out = Vec::with_capacity(seq * seq);
    for i in 0..seq as i64 {
        for j in 0..seq as i64 {
            let n = i - j; // -(memory - context)
            let mut bucket = if n < 0 { half } else { 0 };
            let n = n.unsigned_abs() as usize;
            bucket += if n < max_exact {
                n
            } else {
                let log = ((n as f64 / max_exact as f64).ln()
                    / (max_distance / max_exact as f64).ln()
                    * (half - max_exact) as f64) as usize;
                (max_exact + log).min(half - 1)
            };
            out.push(bucket as u32);
        }
    }
    out
}

pub(crate) fn tensor(t: Result<Tensor>, w: &Weights) -> std::result::Result<Tensor, IoError> {
    t.map_err(|e| IoError::Invalid {
        path: w.file().into(),
        message: e.to_string(),
    })
}

#[cfg(test)]
#[path = "bert_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "bert_family_tests.rs"]
mod family_tests;
