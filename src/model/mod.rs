//! Model architectures, built from `nn` components and `adapters`.

pub mod bert;
pub mod bert_config;
pub mod bert_layer;
pub mod causal;
pub mod decoder;
pub mod encoder_head;
pub mod generate;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod gpt2;
pub mod llama;
pub mod llama_config;
pub mod memory;
pub mod stack;
pub mod vit;

pub use bert::{BertConfig, BertForQuestionAnswering, BertForSequenceClassification};
pub use decoder::Decoder;
pub use gpt2::{Gpt2Config, Gpt2LMHeadModel};
pub use llama::LlamaConfig;
pub use memory::{LayerMemory, StepMemory};

/// Upper bounds of a `config.json`'s sizes, each far above any released model's (Llama 3.1 405B:
/// 126 layers, hidden 16384, MLP 53248; Gemma: vocabulary 256000), so a corrupt or hostile
/// config is refused, naming the file and the key, before anything is allocated from its numbers.
pub(crate) mod limits {
    pub const LAYERS: usize = 1 << 10;
    pub const HIDDEN: usize = 1 << 16;
    pub const INTERMEDIATE: usize = 1 << 18;
    pub const VOCAB: usize = 1 << 22;
    pub const POSITIONS: usize = 1 << 22;
    pub const HEADS: usize = 1 << 10;
    pub const HEAD_DIM: usize = 1 << 12;
    pub const TYPE_VOCAB: usize = 1 << 10;
}

/// Random checkpoint tensors, f32 on the CPU, in `shapes`' order: each named tensor filled with
/// `constant(name)` where it gives one (norms 1 or 0, biases 0), else drawn from normal(0, 0.02)
/// (an architecture's `random` model, for benchmarks and tests).
pub(crate) fn random_tensors(
    shapes: Vec<(String, Vec<usize>)>,
    constant: impl Fn(&str) -> Option<f32>,
    rng: &mut impl rand::Rng,
) -> std::collections::HashMap<String, Tensor> {
    let normal = rand_distr::Normal::new(0.0f32, 0.02).expect("valid std");
    shapes
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = match constant(&name) {
                Some(c) => vec![c; n],
                None => (0..n)
                    .map(|_| rand_distr::Distribution::sample(&normal, rng))
                    .collect(),
            };
            let t = Tensor::from_vec(v, shape, &Device::Cpu).expect("shape fits the data");
            (name, t)
        })
        .collect()
}

/// Each `(key, value, max)` of a config file must be in `1..=max`.
pub(crate) fn check_sizes(
    path: &std::path::Path,
    sizes: &[(&str, usize, usize)],
) -> std::result::Result<(), crate::io::IoError> {
    for &(key, value, max) in sizes {
        if value == 0 || value > max {
            return Err(crate::io::IoError::Invalid {
                path: path.into(),
                message: format!("{key} = {value} is out of range (1 to {max})"),
            });
        }
    }
    Ok(())
}

/// Each `(key, value)` of a config file must be a finite number `>= 0`, or with `below_one` in
/// `[0, 1)` (a probability of dropping).
pub(crate) fn check_reals(
    path: &std::path::Path,
    values: &[(&str, f64)],
    below_one: bool,
) -> std::result::Result<(), crate::io::IoError> {
    for &(key, v) in values {
        let ok = v.is_finite() && v >= 0.0 && (!below_one || v < 1.0);
        if !ok {
            let rule = if below_one {
                "in [0, 1)"
            } else {
                "a finite number >= 0"
            };
            return Err(crate::io::IoError::Invalid {
                path: path.into(),
                message: format!("{key} = {v} must be {rule}"),
            });
        }
    }
    Ok(())
}

/// Each `(key, id)` of a config file must be a token of the model's vocabulary.
pub(crate) fn check_token_ids<'a>(
    path: &std::path::Path,
    ids: impl IntoIterator<Item = (&'a str, u32)>,
    vocab_size: usize,
) -> std::result::Result<(), crate::io::IoError> {
    for (key, id) in ids {
        if id as usize >= vocab_size {
            return Err(crate::io::IoError::Invalid {
                path: path.into(),
                message: format!("{key} = {id} is not below vocab_size ({vocab_size})"),
            });
        }
    }
    Ok(())
}

use crate::adapters::{Adapted, AdapterId, LoraConfig, LoraGrads};
use crate::nn::attention::KvCache;
use crate::nn::loss::LmLoss;
use crate::nn::Pass;
use candle_core::{Device, Result, Tensor};

/// One causal-LM batch on the model's device: `targets[i]` is the token row `i` must predict
/// (the next token), `-100` where nothing is predicted (padding, prompt tokens).
pub struct LmBatch {
    /// `[batch, seq]` u32.
    pub input_ids: Tensor,
    /// `[batch, 1, 1, seq]` additive key mask (right padding).
    pub mask_add: Tensor,
    pub targets: Vec<i64>,
    pub batch: usize,
    pub seq: usize,
}

/// A monitored layer's output and each of its adapters' `(module path, rows for CKA)` (SAFE).
pub type MonitoredLayer = (Tensor, Vec<(String, crate::adapters::CkaRows)>);

/// Adapter gradients by adapter, in `(layer, site)` order.
pub type AdapterGrads = Vec<(AdapterId, LoraGrads)>;

/// What the causal-LM trainer, evaluation and generation need from a decoder architecture.
pub trait CausalLm: Adapted {
    fn device(&self) -> Device;

    /// Puts fresh LoRA adapters on the linears `cfg.target_modules` names, in `layers` (all when
    /// None). Returns how many.
    fn add_lora(
        &mut self,
        cfg: &LoraConfig,
        layers: Option<&[usize]>,
        rng: &mut rand::rngs::StdRng,
    ) -> Result<usize>;

    /// Forward, mean next-token loss and backward down to the lowest trainable layer. With
    /// `checkpoint`, the trainable layers keep only their inputs and run again in backward
    /// (gradient checkpointing, see [`stack`]). The layers below the lowest trainable one run in
    /// inference mode, or not at all when `bottom` (their output, from the frozen-bottom cache)
    /// is given.
    fn loss_and_grads(
        &self,
        b: &LmBatch,
        pass: &mut Pass,
        loss_scale: f64,
        recompute: &stack::Recompute,
        bottom: Option<Tensor>,
    ) -> Result<(LmLoss, AdapterGrads)>;

    /// Inference loss (summed over counted tokens) without gradients.
    fn loss(&self, b: &LmBatch) -> Result<LmLoss>;

    /// Next-token logits `[batch*seq, vocab]` in f32, every position computed afresh (the
    /// reference that generation's cached path is tested against).
    fn logits(&self, b: &LmBatch) -> Result<Tensor>;

    /// Next-token logits `[vocab]` f32 after `new_ids`, which continue the one sequence whose
    /// keys and values `cache` holds (empty at the start); adds the new positions to `cache`.
    /// Generation's step: each new token costs one position's forward.
    fn next_logits_cached(&self, new_ids: &[u32], cache: &mut Vec<KvCache>) -> Result<Vec<f32>>;

    /// Width and dtype of the hidden states between layers.
    fn hidden_layout(&self) -> (usize, candle_core::DType);

    /// Layers `from..to` (inference) on `h`, the input of layer `from`.
    fn hidden_between(&self, b: &LmBatch, h: Tensor, from: usize, to: usize) -> Result<Tensor>;

    /// The input of layer `layer` (inference): the embeddings, then every layer below it.
    fn hidden_before(&self, b: &LmBatch, layer: usize) -> Result<Tensor>;

    /// SAFE's monitoring of layer `layer` (inference) on its input `h`: the layer's output and
    /// each of its adapters' `(module path, X, Y)` rows at `point`: the adapted linear's output
    /// against the base linear's (`[batch*seq, out]`), or the block's output with and without
    /// the adapter (`[batch*seq, hidden]`).
    fn monitor_layer(
        &self,
        layer: usize,
        b: &LmBatch,
        h: &Tensor,
        point: crate::safe::MonitorPoint,
    ) -> Result<MonitoredLayer>;
}
