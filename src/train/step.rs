//! One training step, top to bottom:
//! forward the frozen bottom (inference, nothing saved) -> forward the top (saving) -> loss ->
//! backward down to the lowest trainable adapter -> gradients by parameter name.
//! The optimizer update and SAFE's bookkeeping follow in `trainer`.

use crate::data::batch::Batch;
use crate::data::Label;
use crate::model::bert::{BatchTensors, BertForSequenceClassification};
use crate::nn::attention::mask_to_additive;
use crate::nn::{loss, Pass};
use candle_core::{DType, Device, Result, Tensor};

pub use crate::model::bert::{adapter_path, CLASSIFIER_BIAS, CLASSIFIER_WEIGHT};

/// Uploads a host batch to the device.
pub fn to_tensors(b: &Batch, dtype: DType, device: &Device) -> Result<BatchTensors> {
    let shape = (b.batch, b.seq);
    let mask = Tensor::from_slice(&b.attention_mask, shape, device)?;
    Ok(BatchTensors {
        input_ids: Tensor::from_slice(&b.input_ids, shape, device)?,
        token_type_ids: Tensor::from_slice(&b.token_type_ids, shape, device)?,
        mask_add: mask_to_additive(&mask, dtype)?,
        batch: b.batch,
        seq: b.seq,
    })
}

/// Loss of `logits` against the batch labels, and its gradient.
pub fn loss_and_grad(logits: &Tensor, labels: &[Label]) -> Result<(f32, Tensor)> {
    match labels.first() {
        Some(Label::Value(_)) => {
            let t: Vec<f32> = labels
                .iter()
                .map(|l| match l {
                    Label::Value(v) => *v,
                    Label::Class(c) => *c as f32,
                })
                .collect();
            loss::mse(logits, &t)
        }
        _ => {
            let t: Vec<u32> = labels
                .iter()
                .map(|l| match l {
                    Label::Class(c) => *c as u32,
                    Label::Value(v) => *v as u32,
                })
                .collect();
            loss::cross_entropy(logits, &t)
        }
    }
}

pub struct StepOutput {
    pub loss: f32,
    /// Gradients of every trainable parameter, by PEFT key (`...lora_A.weight`, `classifier.weight`).
    pub grads: Vec<(String, Tensor)>,
}

/// Forward, loss and backward for one micro-batch. `loss_scale` divides the loss (and so the
/// gradients) for gradient accumulation.
pub fn forward_backward(
    model: &BertForSequenceClassification,
    batch: &Batch,
    pass: &mut Pass,
    loss_scale: f64,
) -> Result<StepOutput> {
    let dtype = model.head.classifier.weight.dtype();
    let device = model.head.classifier.weight.device().clone();
    let tensors = to_tensors(batch, dtype, &device)?;
    // Layers below the lowest trainable adapter run without saving; the rest save for backward.
    let (logits, saved) = model.forward_train(&tensors, pass)?;
    let (loss, dlogits) = loss_and_grad(&logits, &batch.labels)?;
    let dlogits = (dlogits * loss_scale)?;
    drop(logits);
    // Backward stops at the lowest trainable layer.
    let g = model.backward(saved, &dlogits)?;
    let mut grads = Vec::with_capacity(2 * g.adapters.len() + 2);
    for (layer, site, lg) in g.adapters {
        let stem = adapter_path(layer, site);
        grads.push((format!("{stem}.lora_A.weight"), lg.a));
        grads.push((format!("{stem}.lora_B.weight"), lg.b));
    }
    grads.push((CLASSIFIER_WEIGHT.into(), g.head.weight));
    grads.push((CLASSIFIER_BIAS.into(), g.head.bias));
    Ok(StepOutput { loss, grads })
}
