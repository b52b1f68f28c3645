//! One training step, top to bottom:
//! forward the frozen bottom (inference, nothing saved) -> forward the top (saving) -> loss ->
//! backward down to the lowest trainable adapter -> gradients by parameter id.
//! The optimizer update and SAFE's bookkeeping follow in `trainer`.

use super::frozen_cache::{BatchRows, FrozenCache};
use crate::adapters::{lora_grads, AdaptedStack, HeadParam, ParamId};
use crate::data::batch::Batch;
use crate::data::Label;
use crate::model::bert::{BatchTensors, BertForSequenceClassification, BertWithHead, EncoderHead};
use crate::model::stack::Recompute;
use crate::nn::attention::mask_to_additive;
use crate::nn::{loss, Pass};
use candle_core::{DType, Device, Result, Tensor};

/// Uploads a host batch to the device.
pub fn to_tensors(b: &Batch, dtype: DType, device: &Device) -> Result<BatchTensors> {
    let shape = (b.batch, b.seq);
    let mask = Tensor::from_slice(&b.attention_mask, shape, device)?;
    Ok(BatchTensors {
        pixel_values: None,
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
    /// Gradients of every trainable parameter, in [`ParamId`] order.
    pub grads: Vec<(ParamId, Tensor)>,
}

/// How the layers below the lowest trainable adapter run. They save nothing in every mode.
pub enum FrozenBottom<'a> {
    /// Inference mode (no dropout), recomputed every step.
    Inference,
    /// Inference mode, its output read from the cache (the cache and the batch's example
    /// indices) when every example of the batch is there, and stored when computed.
    Cached(&'a mut FrozenCache, &'a [usize]),
    /// Training mode: dropout as in an unfrozen run (the paper's setting, where a frozen adapter
    /// only stops getting gradients), recomputed every step; it cannot be cached.
    Dropout,
}

impl<'a> FrozenBottom<'a> {
    /// A task's frozen bottom for the training `examples`: from `cache` when the run keeps one,
    /// else in training mode when `dropout` (`frozen_bottom_dropout`), else in inference mode.
    pub fn of(cache: Option<&'a mut FrozenCache>, dropout: bool, examples: &'a [usize]) -> Self {
        match cache {
            Some(c) => Self::Cached(c, examples),
            None if dropout => Self::Dropout,
            None => Self::Inference,
        }
    }
}

/// Forward, loss and backward for one micro-batch of a classifier (or regressor): the labels'
/// cross-entropy (or MSE), see [`forward_backward_with`].
pub fn forward_backward(
    model: &BertForSequenceClassification,
    batch: &Batch,
    pass: &mut Pass,
    loss_scale: f64,
    bottom: FrozenBottom,
    recompute: &Recompute,
) -> anyhow::Result<StepOutput> {
    let loss = |logits: &Tensor| loss_and_grad(logits, &batch.labels);
    forward_backward_with(model, batch, pass, loss_scale, bottom, recompute, loss)
}

/// Forward, loss and backward for one micro-batch of any head: `loss` gives the loss of the
/// head's output and its gradient. `loss_scale` divides the loss (and so the gradients) for
/// gradient accumulation; `recompute`: gradient checkpointing of the trainable layers (see
/// `model::stack`).
pub fn forward_backward_with<H: EncoderHead>(
    model: &BertWithHead<H>,
    batch: &Batch,
    pass: &mut Pass,
    loss_scale: f64,
    bottom: FrozenBottom,
    recompute: &Recompute,
    loss: impl FnOnce(&Tensor) -> Result<(f32, Tensor)>,
) -> anyhow::Result<StepOutput> {
    let dtype = model.head.trained()[0].1.weight.dtype();
    let tensors = to_tensors(batch, dtype, &model.device())?;
    let mask = &batch.attention_mask;
    forward_backward_on(
        model, &tensors, mask, pass, loss_scale, bottom, recompute, loss,
    )
}

/// [`forward_backward_with`] of a batch already on the device (token ids or pixel values);
/// `attention_mask` is its host mask `[batch * seq]` (1: a real position), which says how many
/// rows of each example the frozen-bottom cache keeps.
#[allow(clippy::too_many_arguments)]
pub fn forward_backward_on<H: EncoderHead>(
    model: &BertWithHead<H>,
    tensors: &BatchTensors,
    attention_mask: &[u32],
    pass: &mut Pass,
    loss_scale: f64,
    bottom: FrozenBottom,
    recompute: &Recompute,
    loss: impl FnOnce(&Tensor) -> Result<(f32, Tensor)>,
) -> anyhow::Result<StepOutput> {
    let device = model.device();
    pass.monitor_tokens(attention_mask);
    let first = model.lowest_trainable_layer().unwrap_or(model.layers.len());
    // Layers below the lowest trainable adapter run without saving (or come from the cache); the
    // rest save for backward.
    let layouts = crate::device::upload_cache(&device);
    let (logits, saved) = match bottom {
        FrozenBottom::Cached(c, examples) if first > 0 => {
            let h = frozen_bottom(model, tensors, attention_mask, first, c, examples)?;
            model.forward_train_from(tensors, h, first, pass, recompute)?
        }
        FrozenBottom::Dropout => {
            let h = model.forward_frozen_bottom_in(tensors, first, pass)?;
            model.forward_train_from(tensors, h, first, pass, recompute)?
        }
        _ => model.forward_train(tensors, pass, recompute)?,
    };
    drop(layouts);
    let (loss, dlogits) = loss(&logits)?;
    let dlogits = (dlogits * loss_scale)?;
    drop(logits);
    // Backward stops at the lowest trainable layer.
    let layouts = crate::device::upload_cache(&device);
    let g = model.backward(saved, &dlogits)?;
    drop(layouts);
    let mut grads = Vec::with_capacity(2 * g.adapters.len() + 2);
    for (layer, site, lg) in g.adapters {
        let id = BertWithHead::<H>::adapter_id(layer, site);
        grads.extend(lora_grads(id, lg));
    }
    let [w, b] = H::PARAMS;
    grads.push((ParamId::Head(w), g.head.weight));
    grads.push((ParamId::Head(b), g.head.bias));
    if let Some(d) = g.head.dense {
        grads.push((ParamId::Head(HeadParam::DenseWeight), d.weight));
        grads.push((ParamId::Head(HeadParam::DenseBias), d.bias));
    }
    Ok(StepOutput { loss, grads })
}

/// The output of layers `0..k` for the batch (its host `attention_mask`), through the
/// frozen-bottom cache (see [`FrozenCache::bottom`]).
pub(crate) fn frozen_bottom<H: EncoderHead>(
    model: &BertWithHead<H>,
    tensors: &BatchTensors,
    attention_mask: &[u32],
    k: usize,
    cache: &mut FrozenCache,
    examples: &[usize],
) -> anyhow::Result<Tensor> {
    let seq = tensors.seq;
    let rows = BatchRows {
        examples,
        lens: (0..tensors.batch)
            .map(|j| {
                let row = &attention_mask[j * seq..(j + 1) * seq];
                row.iter().filter(|&&m| m == 1).count()
            })
            .collect(),
        seq,
    };
    cache.bottom(
        &rows,
        k,
        model.config.hidden_size,
        model.embeddings.dtype(),
        &model.device(),
        |d| model.forward_frozen_bottom(tensors, d),
        |h, d| model.forward_frozen_layers(tensors, h, d, k),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::LoraConfig;
    use crate::model::BertConfig;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    /// A BERT classifier written by transformers 5.17 (`scripts/hf_fixtures.py`: padded second
    /// row, two token types, pooler, 3 labels) gives transformers' float64 logits through the
    /// trainer's own upload and inference forward; without the padding mask it would not.
    #[test]
    fn transformers_bert_gives_transformers_logits() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/bert-padded");
        let cpu = Device::Cpu;
        let r = candle_core::safetensors::load(dir.join("reference.safetensors"), &cpu).unwrap();
        let ids = |k: &str| -> Vec<u32> {
            r[k].to_dtype(DType::U32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let mut rng = StdRng::seed_from_u64(0);
        let m = BertForSequenceClassification::load(&dir, 3, DType::F64, &cpu, &mut rng).unwrap();
        // The loader takes the fixture's trained classifier (3 labels, as asked).
        let w = candle_core::safetensors::load(dir.join("model.safetensors"), &cpu).unwrap();
        let loaded = m.head.classifier.weight.dense().unwrap().into_owned();
        let stored = w["classifier.weight"].to_dtype(DType::F64).unwrap();
        assert_eq!(crate::nn::gradcheck::max_abs_diff(&loaded, &stored), 0.0);
        let want = &r["logits"];
        let logits = |mask: Vec<u32>| -> Tensor {
            let b = Batch {
                input_ids: ids("input_ids"),
                token_type_ids: ids("token_type_ids"),
                attention_mask: mask,
                batch: 2,
                seq: 16,
                labels: vec![],
            };
            let t = to_tensors(&b, DType::F64, &cpu).unwrap();
            Pass::inference(|pass| m.forward_eval(&t, pass))
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
        };
        let diff = |a: &Tensor| -> f64 {
            (a - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        let mask = ids("attention_mask");
        assert!(mask.contains(&0), "the fixture pads its second row");
        let err = diff(&logits(mask.clone()));
        assert!(err < 1e-9, "max |diff| {err}");
        let unmasked = diff(&logits(vec![1; mask.len()]));
        assert!(unmasked > 1e-3, "padding must matter: {unmasked}");
    }

    /// Reading the frozen bottom from the cache gives bit-identical gradients to computing it,
    /// and the frozen layers' adapters get no gradient.
    #[test]
    fn cached_frozen_bottom_gives_identical_gradients() {
        let cfg = BertConfig::tiny(0.1);
        let mut rng = StdRng::seed_from_u64(1);
        let mut m =
            BertForSequenceClassification::random(cfg, 3, DType::F32, &Device::Cpu, &mut rng)
                .unwrap();
        let lora = LoraConfig {
            target_modules: vec!["query".into(), "value".into()],
            ..Default::default()
        };
        m.add_lora(&lora, None, &mut rng).unwrap();
        for (l, s) in m.adapter_sites() {
            if l < 2 {
                m.adapter_mut(l, s).unwrap().trainable = false;
            }
        }
        let batch = Batch {
            input_ids: vec![2, 7, 9, 11, 3, 2, 13, 3, 0, 0],
            token_type_ids: vec![0; 10],
            attention_mask: vec![1, 1, 1, 1, 1, 1, 1, 1, 0, 0],
            labels: vec![Label::Class(2), Label::Class(0)],
            batch: 2,
            seq: 5,
        };
        let dir = tempfile::tempdir().unwrap();
        let mut cache = FrozenCache::create(dir.path()).unwrap();
        fn run(
            m: &BertForSequenceClassification,
            batch: &Batch,
            bottom: FrozenBottom,
        ) -> StepOutput {
            let mut rng = StdRng::seed_from_u64(9);
            let mut pass = Pass::training(&mut rng);
            forward_backward(m, batch, &mut pass, 1.0, bottom, &Recompute::None).unwrap()
        }
        let plain = run(&m, &batch, FrozenBottom::Inference);
        let stored = run(&m, &batch, FrozenBottom::Cached(&mut cache, &[4, 1]));
        assert_eq!((cache.hits, cache.misses), (0, 1));
        let read = run(&m, &batch, FrozenBottom::Cached(&mut cache, &[4, 1]));
        assert_eq!(cache.hits, 2, "both examples come from the cache");
        for out in [&stored, &read] {
            assert_eq!(out.loss.to_bits(), plain.loss.to_bits());
            assert_eq!(out.grads.len(), plain.grads.len());
            for ((n, g), (pn, pg)) in out.grads.iter().zip(&plain.grads) {
                assert_eq!(n, pn);
                let bits = |t: &Tensor| -> Vec<u32> {
                    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                    v.into_iter().map(f32::to_bits).collect()
                };
                assert_eq!(bits(g), bits(pg), "{n}");
            }
        }
        assert!(plain
            .grads
            .iter()
            .all(|(n, _)| !matches!(n, ParamId::Lora { adapter, .. } if adapter.layer < 2)));
        // A dropout bottom draws masks in the frozen layers (a different loss), and still gives
        // them no gradient.
        let dropped = run(&m, &batch, FrozenBottom::Dropout);
        assert_ne!(dropped.loss.to_bits(), plain.loss.to_bits());
        let names = |o: &StepOutput| o.grads.iter().map(|(n, _)| *n).collect::<Vec<_>>();
        assert_eq!(names(&dropped), names(&plain));
        // Layer 2 freezes too: the depth-2 rows keep serving, layer 2 runs from them.
        for (l, s) in m.adapter_sites() {
            m.adapter_mut(l, s).unwrap().trainable = false;
        }
        let plain = run(&m, &batch, FrozenBottom::Inference);
        let hits = cache.hits;
        let read = run(&m, &batch, FrozenBottom::Cached(&mut cache, &[4, 1]));
        assert_eq!((cache.hits, cache.depth()), (hits + 2, 2));
        assert_eq!(read.loss.to_bits(), plain.loss.to_bits());
        assert_eq!(read.grads.len(), 2, "only the classifier trains");
    }
}

#[cfg(test)]
mod dtype_tests {
    use super::*;
    use crate::adapters::{Adapted, LoraConfig, LoraMatrix};
    use crate::model::bert::{BertConfig, Site};
    use crate::nn::gradcheck::{randn, rel_err};
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn model(dtype: DType) -> BertForSequenceClassification {
        let cfg = BertConfig::sized(64, 32, 2, 4, 64, 16, 0.0);
        let mut rng = StdRng::seed_from_u64(3);
        let mut m =
            BertForSequenceClassification::random(cfg, 3, dtype, &Device::Cpu, &mut rng).unwrap();
        let lora = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: vec!["query".into(), "value".into(), "output.dense".into()],
            use_rslora: false,
        };
        m.add_lora(&lora, None, &mut rng).unwrap();
        for (i, (l, s)) in m.adapter_sites().into_iter().enumerate() {
            let ad = m.adapter_mut(l, s).unwrap();
            ad.b = randn(ad.b.dims(), 200 + i as u64)
                .affine(0.2, 0.0)
                .unwrap()
                .to_dtype(ad.a.dtype())
                .unwrap();
        }
        m
    }

    fn batch() -> Batch {
        let mut mask = vec![1u32; 16];
        mask[13..].fill(0);
        Batch {
            input_ids: (0..16).map(|i| (i * 7 % 60 + 1) as u32).collect(),
            token_type_ids: vec![0; 16],
            attention_mask: mask,
            batch: 2,
            seq: 8,
            labels: vec![Label::Class(2), Label::Class(0)],
        }
    }

    #[test]
    fn bf16_base_keeps_adapters_and_head_in_f32_and_follows_f32() {
        let (m32, m16) = (model(DType::F32), model(DType::BF16));
        let l0 = &m16.layers[0];
        assert_eq!(
            l0.linears[Site::Query as usize].base.weight.dtype(),
            DType::BF16
        );
        assert_eq!(m16.adapter(0, Site::Query).unwrap().a.dtype(), DType::F32);
        assert_eq!(m16.head.dense.weight.dtype(), DType::F32);
        assert_eq!(m16.head.classifier.weight.dtype(), DType::F32);
        let run = |m: &BertForSequenceClassification| {
            let mut rng = StdRng::seed_from_u64(9);
            let mut pass = Pass::training(&mut rng);
            forward_backward(
                m,
                &batch(),
                &mut pass,
                1.0,
                FrozenBottom::Inference,
                &Recompute::None,
            )
            .unwrap()
        };
        let (a, b) = (run(&m32), run(&m16));
        assert!(
            (a.loss - b.loss).abs() < 1e-2 * a.loss.abs().max(1.0),
            "loss f32 {} bf16 {}",
            a.loss,
            b.loss
        );
        assert_eq!(a.grads.len(), b.grads.len());
        for ((na, ga), (nb, gb)) in a.grads.iter().zip(&b.grads) {
            assert_eq!(na, nb);
            assert_eq!(gb.dtype(), DType::F32, "{nb}");
            let e = rel_err(gb, ga);
            assert!(e < 5e-2, "{na}: relative error {e}");
        }
        // The trainable parameters match their gradients' dtype: AdamW runs in f32.
        for (name, p) in m16.trainable_params() {
            assert_eq!(p.dtype(), DType::F32, "{name}");
        }
    }

    #[test]
    fn the_optimizer_step_leaves_each_adapter_its_next_bf16_copy() {
        let mut m = model(DType::BF16);
        let mut rng = StdRng::seed_from_u64(9);
        let mut pass = Pass::training(&mut rng);
        let out = forward_backward(
            &m,
            &batch(),
            &mut pass,
            1.0,
            FrozenBottom::Inference,
            &Recompute::None,
        )
        .unwrap();
        let mut opt = crate::nn::optim::AdamW::new(Default::default());
        crate::train::run::adamw_step(&mut m, &mut opt, &out.grads, 1e-2, 0.5).unwrap();
        for (name, ad) in m.adapters() {
            for (matrix, master) in [(LoraMatrix::A, &ad.a), (LoraMatrix::B, &ad.b)] {
                let copy = ad.low.copy_of(matrix, master).expect("the step's copy");
                let cast = master.to_dtype(DType::BF16).unwrap();
                // bf16 to f32 is exact: equal f32 values are equal bf16 bits.
                let f32s = |t: Tensor| {
                    let t = t.flatten_all().unwrap().to_dtype(DType::F32).unwrap();
                    t.to_vec1::<f32>().unwrap()
                };
                assert_eq!(f32s(copy), f32s(cast), "{name} {matrix:?}");
            }
        }
    }
}
