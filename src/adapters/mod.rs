//! Adapters: trainable side paths beside frozen base layers (LoRA first).

pub mod block;
pub mod lora;

pub use block::{
    add_lora, monitor_layer, target_matches, AdaptedStack, Block, Monitored, SiteBackward,
    SiteForward, SiteStates,
};
use candle_core::Tensor;
pub use lora::{CkaRows, LoraAdapter, LoraConfig, LoraGrads, LoraLinear};

/// One adapter: its transformer layer and its site, the index into the layer's
/// [`Block::SITES`]. Ordered by layer, then site: the order of [`Adapted::adapters`].
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct AdapterId {
    pub layer: usize,
    pub site: usize,
}

/// A LoRA adapter's two matrices: `A` (`[r, in]`) and `B` (`[out, r]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraMatrix {
    A,
    B,
}

/// A trained tensor beside the adapters: the classifier's, and the dense layer's before it
/// where that trains with it (RoBERTa's `classifier.dense`, DistilBERT's `pre_classifier`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HeadParam {
    ClassifierWeight,
    ClassifierBias,
    DenseWeight,
    DenseBias,
    /// Extractive QA's `qa_outputs` (start and end logits).
    QaOutputsWeight,
    QaOutputsBias,
}

impl HeadParam {
    pub const ALL: [HeadParam; 6] = [
        HeadParam::ClassifierWeight,
        HeadParam::ClassifierBias,
        HeadParam::DenseWeight,
        HeadParam::DenseBias,
        HeadParam::QaOutputsWeight,
        HeadParam::QaOutputsBias,
    ];

    /// A bias (else a weight).
    pub fn is_bias(self) -> bool {
        matches!(
            self,
            HeadParam::ClassifierBias | HeadParam::DenseBias | HeadParam::QaOutputsBias
        )
    }
}

/// A trained tensor: the key of gradients, optimizer state and checkpoints inside the program
/// (PEFT's key strings exist only in `io::peft`). Ordered as a step lists its gradients:
/// adapters by (layer, site), A then B, then the head's weight and bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ParamId {
    Lora {
        adapter: AdapterId,
        matrix: LoraMatrix,
    },
    Head(HeadParam),
}

impl ParamId {
    /// An adapter's A and B, in that order.
    pub fn lora(adapter: AdapterId) -> [ParamId; 2] {
        [LoraMatrix::A, LoraMatrix::B].map(|matrix| ParamId::Lora { adapter, matrix })
    }
}

impl std::fmt::Display for ParamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParamId::Lora { adapter, matrix } => write!(
                f,
                "lora_{matrix:?} of layer {} site {}",
                adapter.layer, adapter.site
            ),
            ParamId::Head(h) => write!(f, "{h:?}"),
        }
    }
}

/// An adapter's gradients keyed by parameter: A then B.
pub fn lora_grads(adapter: AdapterId, g: LoraGrads) -> [(ParamId, Tensor); 2] {
    let [a, b] = ParamId::lora(adapter);
    [(a, g.a), (b, g.b)]
}

/// What the optimizer, checkpoints and PEFT files need from a model that carries adapters: its
/// adapters by [`AdapterId`] and module path (PEFT's, e.g. `model.layers.0.self_attn.q_proj`),
/// and its trained tensors by [`ParamId`].
pub trait Adapted {
    /// Every adapter with its module path, in layer order (the index SAFE uses).
    fn adapters(&self) -> Vec<(String, &LoraAdapter)>;

    /// Every adapter's id, in [`Adapted::adapters`] order.
    fn adapter_ids(&self) -> Vec<AdapterId>;

    fn adapter_by_id_mut(&mut self, id: AdapterId) -> Option<&mut LoraAdapter>;

    /// The module path of a layer's site (whether or not an adapter sits there); None when the
    /// site is not one of the layer's.
    fn module_path(&self, id: AdapterId) -> Option<String>;

    /// The layer and site a module path names (the layer is not checked against the model's).
    fn module_id(&self, path: &str) -> Option<AdapterId>;

    /// The module path of a layer's site in the model's second naming, where it has one
    /// (transformers 5's ViT: `vit.layers.0.attention.q_proj`).
    fn renamed_module_path(&self, _id: AdapterId) -> Option<String> {
        None
    }

    fn adapter_by_path_mut(&mut self, path: &str) -> Option<&mut LoraAdapter> {
        let id = self.module_id(path)?;
        self.adapter_by_id_mut(id)
    }

    /// The transformer layer of each adapter, in [`Adapted::adapters`] order.
    fn adapter_layers(&self) -> Vec<usize> {
        self.adapter_ids().into_iter().map(|id| id.layer).collect()
    }

    /// Transformer layers in the model (PEFT's `layers_to_transform` is written when adapters
    /// sit in only some of them).
    fn num_layers(&self) -> usize;

    /// The lowest layer whose adapters still train: backward stops there, and nothing below it
    /// is saved. None when nothing trains.
    fn lowest_trainable_layer(&self) -> Option<usize>;

    /// PEFT's `task_type`: `SEQ_CLS`, `CAUSAL_LM`; None for an image classifier (PEFT has no
    /// task type for it).
    fn peft_task_type(&self) -> Option<&'static str>;

    /// PEFT's `fan_in_fan_out`: true when the base model stores its linears as `[in, out]`
    /// (GPT-2's Conv1D). The adapter tensors keep PEFT's shapes either way.
    fn peft_fan_in_fan_out(&self) -> bool {
        false
    }

    /// Trained tensors beside the adapters (a classifier); none for a causal LM.
    fn head_params(&self) -> Vec<(HeadParam, Tensor)> {
        Vec::new()
    }

    fn head_param_mut(&mut self, _key: HeadParam) -> Option<&mut Tensor> {
        None
    }

    /// The module path of a trained head tensor's layer in the task model (`classifier`,
    /// RoBERTa's `classifier.out_proj`); None when the model trains no such tensor.
    fn head_path(&self, _key: HeadParam) -> Option<&'static str> {
        None
    }

    /// Mutable access to any trained tensor; None when the model has no such tensor.
    fn param_mut(&mut self, id: ParamId) -> Option<&mut Tensor> {
        match id {
            ParamId::Lora { adapter, matrix } => {
                let ad = self.adapter_by_id_mut(adapter)?;
                Some(match matrix {
                    LoraMatrix::A => &mut ad.a,
                    LoraMatrix::B => &mut ad.b,
                })
            }
            ParamId::Head(h) => self.head_param_mut(h),
        }
    }

    /// Every tensor that still trains, in [`ParamId`] order: adapters not frozen, and the head.
    fn trainable_params(&self) -> Vec<(ParamId, Tensor)> {
        let mut v = Vec::new();
        for (id, (_, ad)) in self.adapter_ids().into_iter().zip(self.adapters()) {
            if ad.trainable {
                let [a, b] = ParamId::lora(id);
                v.push((a, ad.a.clone()));
                v.push((b, ad.b.clone()));
            }
        }
        v.extend(
            self.head_params()
                .into_iter()
                .map(|(h, t)| (ParamId::Head(h), t)),
        );
        v
    }
}
