//! One training step, top to bottom:
//! forward the frozen bottom (inference, nothing saved) -> forward the top (saving) -> loss ->
//! backward down to the lowest trainable adapter -> gradients by parameter name.
//! The optimizer update and SAFE's bookkeeping follow in `trainer`.

use crate::data::batch::Batch;
use crate::data::Label;
use crate::model::bert::{BatchTensors, BertForSequenceClassification, Site};
use crate::nn::attention::mask_to_additive;
use crate::nn::{loss, Pass};
use candle_core::{DType, Device, Result, Tensor};

/// PEFT's key stem for an adapter, e.g. `bert.encoder.layer.0.attention.self.query`.
pub fn adapter_path(layer: usize, site: Site) -> String {
    format!("bert.encoder.layer.{layer}.{}", site.path())
}

pub const CLASSIFIER_WEIGHT: &str = "classifier.weight";
pub const CLASSIFIER_BIAS: &str = "classifier.bias";

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

/// Mutable access to a trainable parameter by its key.
pub fn param_mut<'a>(
    model: &'a mut BertForSequenceClassification,
    key: &str,
) -> Option<&'a mut Tensor> {
    match key {
        CLASSIFIER_WEIGHT => return Some(&mut model.head.classifier.weight),
        CLASSIFIER_BIAS => return model.head.classifier.bias.as_mut(),
        _ => {}
    }
    let rest = key.strip_prefix("bert.encoder.layer.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (path, which) = rest.rsplit_once(".lora_")?;
    let site = Site::ALL.into_iter().find(|s| s.path() == path)?;
    let ad = model.adapter_mut(layer, site)?;
    match which {
        "A.weight" => Some(&mut ad.a),
        "B.weight" => Some(&mut ad.b),
        _ => None,
    }
}

/// Every trainable parameter's key and value (adapters that still train, and the classifier).
pub fn trainable_params(model: &BertForSequenceClassification) -> Vec<(String, Tensor)> {
    let mut v = Vec::new();
    for (layer, site) in model.adapter_sites() {
        let ad = model.adapter(layer, site).expect("listed adapter");
        if ad.trainable {
            let stem = adapter_path(layer, site);
            v.push((format!("{stem}.lora_A.weight"), ad.a.clone()));
            v.push((format!("{stem}.lora_B.weight"), ad.b.clone()));
        }
    }
    v.push((
        CLASSIFIER_WEIGHT.into(),
        model.head.classifier.weight.clone(),
    ));
    if let Some(b) = &model.head.classifier.bias {
        v.push((CLASSIFIER_BIAS.into(), b.clone()));
    }
    v
}
