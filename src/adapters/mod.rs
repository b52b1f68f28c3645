//! Adapters: trainable side paths beside frozen base layers (LoRA first).

pub mod block;
pub mod lora;

pub use block::{
    add_lora, outputs_without_each_adapter, target_matches, AdaptedStack, Block, Monitored,
    SiteBackward, SiteForward, SiteStates,
};
use candle_core::Tensor;
pub use lora::{LoraAdapter, LoraConfig, LoraGrads, LoraLinear};

/// What the optimizer, checkpoints and PEFT files need from a model that carries adapters: its
/// trained tensors by key. Keys are PEFT's without the `base_model.model.` prefix:
/// `<module path>.lora_A.weight` / `.lora_B.weight`, and head tensors such as `classifier.weight`.
pub trait Adapted {
    /// Every adapter with its module path, in layer order (the index SAFE uses).
    fn adapters(&self) -> Vec<(String, &LoraAdapter)>;

    fn adapter_by_path_mut(&mut self, path: &str) -> Option<&mut LoraAdapter>;

    /// The transformer layer of each adapter, in [`Adapted::adapters`] order.
    fn adapter_layers(&self) -> Vec<usize>;

    /// Transformer layers in the model (PEFT's `layers_to_transform` is written when adapters
    /// sit in only some of them).
    fn num_layers(&self) -> usize;

    /// The lowest layer whose adapters still train: backward stops there, and nothing below it
    /// is saved. None when nothing trains.
    fn lowest_trainable_layer(&self) -> Option<usize>;

    /// PEFT's `task_type`: `SEQ_CLS`, `CAUSAL_LM`.
    fn peft_task_type(&self) -> &'static str;

    /// PEFT's `fan_in_fan_out`: true when the base model stores its linears as `[in, out]`
    /// (GPT-2's Conv1D). The adapter tensors keep PEFT's shapes either way.
    fn peft_fan_in_fan_out(&self) -> bool {
        false
    }

    /// Trained tensors beside the adapters (a classifier), by key; none for a causal LM.
    fn head_params(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }

    fn head_param_mut(&mut self, _key: &str) -> Option<&mut Tensor> {
        None
    }

    /// Mutable access to any trained tensor by key.
    fn param_mut(&mut self, key: &str) -> Option<&mut Tensor> {
        match key.rsplit_once(".lora_") {
            Some((path, which)) => {
                let ad = self.adapter_by_path_mut(path)?;
                match which {
                    "A.weight" => Some(&mut ad.a),
                    "B.weight" => Some(&mut ad.b),
                    _ => None,
                }
            }
            None => self.head_param_mut(key),
        }
    }

    /// Every tensor that still trains: adapters not frozen, and the head.
    fn trainable_params(&self) -> Vec<(String, Tensor)> {
        let mut v = Vec::new();
        for (path, ad) in self.adapters() {
            if ad.trainable {
                v.push((format!("{path}.lora_A.weight"), ad.a.clone()));
                v.push((format!("{path}.lora_B.weight"), ad.b.clone()));
            }
        }
        v.extend(self.head_params());
        v
    }
}
