//! What the decoder architectures (LLaMA, GPT-2) share, written once over [`DecoderParts`]: the
//! training forward and backward, [`CausalLm`] (the step's loss and gradients, the inference
//! forward with SAFE's monitoring, loss, logits, generation's cached forward). Each architecture
//! supplies its embeddings, one layer's forward and backward, final norm and head.

use super::memory::{Acts, LayerMemory, StepMemory};
use super::stack::{self, Keep, Recompute, StackSaved};
use super::{AdapterGrads, CausalLm, LmBatch, MonitoredLayer};
use crate::adapters::block::Site;
use crate::adapters::lora::{LoraConfig, LoraGrads};
use crate::adapters::{Adapted, AdaptedStack, Monitored};
use crate::nn::attention::{AttnShape, KvCache};
use crate::nn::loss::{lm_head_loss, LmLoss};
use crate::nn::norm::{Norm, NormSaved};
use crate::nn::Pass;
use crate::safe::MonitorPoint;
use candle_core::{DType, Device, Result, Tensor};

/// Rows of the LM head computed at once: the `[rows, vocab]` f32 logits chunk is kept near 16 MiB
/// (two such buffers live at a time), between 16 and 256 rows: 85 rows for SmolLM2's 49152
/// tokens, 131 for LLaMA's 32000. With gradient checkpointing the chunk was most of a step's
/// memory at a fixed 256 rows.
pub fn lm_head_chunk_rows(vocab: usize) -> usize {
    ((16 << 20) / (4 * vocab.max(1))).clamp(16, 256)
}

/// The pieces of a decoder that its shared paths are built from: embeddings, one layer's
/// forward and backward, the final norm and the head. Everything else is written once below.
pub trait DecoderParts: AdaptedStack + Sized {
    /// What a layer on the gradient path keeps for backward.
    type LayerSaved: crate::nn::offload::SavedTensors;

    /// Input embeddings `[batch*seq, hidden]` of `ids` (`batch` sequences) at positions `start..`.
    fn embed_at(&self, ids: &Tensor, batch: usize, start: usize, pass: &mut Pass)
        -> Result<Tensor>;

    /// One layer's forward, keeping what `keep` says; with `monitor`, its adapted linears'
    /// `(site, X, Y)`.
    #[allow(clippy::too_many_arguments)]
    fn layer_train(
        &self,
        layer: &Self::Layer,
        x: &Tensor,
        mask_add: &Tensor,
        shape: AttnShape,
        pass: &mut Pass,
        keep: Keep,
        monitor: Option<&mut Monitored<Site<Self>>>,
    ) -> Result<(Tensor, Option<Self::LayerSaved>)>;

    /// A checkpointed layer's saved state, rebuilt in backward by its training forward (see
    /// `stack::backward`): by default [`DecoderParts::layer_train`], output and all.
    fn layer_state(
        &self,
        layer: &Self::Layer,
        x: &Tensor,
        mask_add: &Tensor,
        shape: AttnShape,
        pass: &mut Pass,
    ) -> Result<Self::LayerSaved> {
        match self
            .layer_train(layer, x, mask_add, shape, pass, Keep::ALL, None)?
            .1
        {
            Some(s) => Ok(s),
            None => candle_core::bail!("a layer run with save kept no state"),
        }
    }

    /// One layer's backward; `dx` only when `need_dx`.
    fn layer_backward(
        &self,
        layer: &Self::Layer,
        saved: Self::LayerSaved,
        dout: &Tensor,
        need_dx: bool,
    ) -> Result<(Option<Tensor>, LayerGrads<Site<Self>>)>;

    /// One layer's inference forward of new positions after those `cache` holds.
    fn layer_forward_cached(
        &self,
        layer: &Self::Layer,
        x: &Tensor,
        cache: &mut KvCache,
        pass: &mut Pass,
    ) -> Result<Tensor>;

    /// The norm between the last layer and the head.
    fn last_norm(&self) -> &Norm;

    /// The LM head `[vocab, hidden]` (the embeddings when tied).
    fn head_weight(&self) -> &Tensor;

    /// What one layer's training forward keeps and its temporaries, from shapes.
    fn layer_memory(&self, layer: &Self::Layer, acts: Acts) -> LayerMemory;

    /// One layer's inference forward; with `monitor`, its adapted linears' `(site, X, Y)`.
    fn layer_forward(
        &self,
        layer: &Self::Layer,
        x: &Tensor,
        b: &LmBatch,
        pass: &mut Pass,
        monitor: Option<&mut Monitored<Site<Self>>>,
    ) -> Result<Tensor> {
        let shape = attn_shape(b);
        Ok(self
            .layer_train(layer, x, &b.mask_add, shape, pass, Keep::Nothing, monitor)?
            .0)
    }

    fn final_norm(&self, h: &Tensor) -> Result<Tensor> {
        Ok(self.last_norm().forward(h, false)?.0)
    }

    /// Training forward to the final norm's output `[batch*seq, hidden]`. Layers below the
    /// lowest trainable adapter run in inference mode and keep nothing (or are skipped: `bottom`
    /// is their output when the frozen-bottom cache has it); layers from it up save, or with
    /// `checkpoint` keep only their inputs (see [`stack`]).
    fn forward_train(
        &self,
        b: &LmBatch,
        pass: &mut Pass,
        recompute: &Recompute,
        bottom: Option<Tensor>,
    ) -> Result<(Tensor, DecoderSaved<Self>)> {
        let first = self.lowest_trainable_layer().unwrap_or(self.layers().len());
        let shape = attn_shape(b);
        let h = match bottom {
            Some(h) => h,
            None if first == 0 => self.embed_at(&b.input_ids, b.batch, 0, pass)?,
            None => Pass::inference(|inference| hidden_before_with(self, b, first, inference))?,
        };
        let run = |l: &Self::Layer, x: &Tensor, pass: &mut Pass, keep| {
            self.layer_train(l, x, &b.mask_add, shape, pass, keep, None)
        };
        let trained = &self.layers()[first..];
        let (h, layers) = stack::forward(trained, first, h, pass, recompute, run)?;
        let (hn, norm) = self.last_norm().forward(&h, true)?;
        let norm = norm.expect("final norm saved");
        let mask_add = b.mask_add.clone();
        Ok((
            hn,
            DecoderSaved {
                first,
                layers,
                norm,
                mask_add,
                shape,
            },
        ))
    }

    /// Backward from the final norm's output gradient down to the lowest trainable layer.
    fn backward(
        &self,
        saved: DecoderSaved<Self>,
        dhidden: &Tensor,
    ) -> Result<SiteGrads<Site<Self>>> {
        let dh = saved.norm.backward(self.last_norm(), dhidden)?;
        let (mask_add, shape, first) = (&saved.mask_add, saved.shape, saved.first);
        let state = |l: &Self::Layer, x: &Tensor, pass: &mut Pass| {
            self.layer_state(l, x, mask_add, shape, pass)
        };
        let back =
            |l: &Self::Layer, st, dout: &Tensor, need| self.layer_backward(l, st, dout, need);
        let trained = &self.layers()[first..];
        let per_layer = stack::backward(trained, saved.layers, dh, state, back)?;
        Ok(stack::by_site(first, per_layer))
    }
}

/// What a decoder's training forward keeps: the layers from the lowest trainable one up (their
/// states, or checkpoints), the final norm's state, and the batch's mask and shape for
/// checkpointed layers' second forward.
pub struct DecoderSaved<M: DecoderParts> {
    /// The lowest trainable layer, where `layers` starts.
    pub first: usize,
    pub layers: StackSaved<M::LayerSaved>,
    norm: NormSaved,
    mask_add: Tensor,
    shape: AttnShape,
}

/// One layer's adapter gradients by site.
pub type LayerGrads<S> = Vec<(S, LoraGrads)>;

/// Adapter gradients by `(layer, site)`.
pub type SiteGrads<S> = Vec<(usize, S, LoraGrads)>;

/// One training step's forward, loss and backward: mean next-token cross-entropy over the
/// counted targets, and the adapters' gradients (scaled by `loss_scale`).
pub fn loss_and_site_grads<M: DecoderParts>(
    m: &M,
    b: &LmBatch,
    pass: &mut Pass,
    loss_scale: f64,
    recompute: &Recompute,
    bottom: Option<Tensor>,
) -> Result<(LmLoss, SiteGrads<Site<M>>)> {
    let device = m.head_weight().device();
    let layouts = crate::device::upload_cache(device);
    let (hn, saved) = m.forward_train(b, pass, recompute, bottom)?;
    drop(layouts);
    let mut loss = lm_head_loss(&hn, m.head_weight(), &b.targets, chunk_rows(m), true)?;
    drop(hn);
    let dh = loss.dhidden.take().expect("gradient requested");
    let dh = if loss_scale == 1.0 {
        dh
    } else {
        dh.affine(loss_scale, 0.0)?
    };
    let layouts = crate::device::upload_cache(device);
    let grads = m.backward(saved, &dh)?;
    drop(layouts);
    Ok((loss, grads))
}

/// Inference forward to the final norm's output `[batch*seq, hidden]`.
fn forward_hidden<M: DecoderParts>(m: &M, b: &LmBatch, pass: &mut Pass) -> Result<Tensor> {
    let h = hidden_before_with(m, b, m.layers().len(), pass)?;
    m.final_norm(&h)
}

fn hidden_before_with<M: DecoderParts>(
    m: &M,
    b: &LmBatch,
    layer: usize,
    pass: &mut Pass,
) -> Result<Tensor> {
    let h = m.embed_at(&b.input_ids, b.batch, 0, pass)?;
    layers_between(m, b, h, 0, layer, pass)
}

/// Layers `from..to` on `h`, the input of layer `from`, without saving.
fn layers_between<M: DecoderParts>(
    m: &M,
    b: &LmBatch,
    mut h: Tensor,
    from: usize,
    to: usize,
    pass: &mut Pass,
) -> Result<Tensor> {
    for l in &m.layers()[from..to] {
        h = m.layer_forward(l, &h, b, pass, None)?;
    }
    Ok(h)
}

impl<M: DecoderParts> StepMemory for M {
    fn layer_memory(&self, layer: usize, rows: usize, seq: usize) -> LayerMemory {
        let acts = Acts::like(rows, seq, self.head_weight()).at_width(self.hidden_size());
        DecoderParts::layer_memory(self, &self.layers()[layer], acts)
    }

    fn hidden_size(&self) -> usize {
        self.head_weight().dims()[1]
    }

    fn hidden_bytes(&self, rows: usize, seq: usize) -> usize {
        Acts::like(rows, seq, self.head_weight()).of(self.hidden_size())
    }

    /// The final norm's state, the hidden gradient, and two f32 logits chunks of the LM head.
    fn head_bytes(&self, rows: usize, seq: usize) -> usize {
        let (vocab, hidden) = self.head_weight().dims2().unwrap_or((0, 0));
        let acts = Acts::like(rows, seq, self.head_weight());
        let chunk = lm_head_chunk_rows(vocab).min(acts.tokens());
        acts.norm(hidden) + 2 * acts.of(hidden) + 2 * chunk * vocab * 4
    }
}

impl<M: DecoderParts> CausalLm for M {
    fn device(&self) -> Device {
        self.head_weight().device().clone()
    }

    fn add_lora(
        &mut self,
        cfg: &LoraConfig,
        layers: Option<&[usize]>,
        rng: &mut rand::rngs::StdRng,
    ) -> Result<usize> {
        crate::adapters::add_lora(self.layers_mut(), cfg, layers, rng)
    }

    /// [`loss_and_site_grads`] with the gradients by adapter id.
    fn loss_and_grads(
        &self,
        b: &LmBatch,
        pass: &mut Pass,
        loss_scale: f64,
        recompute: &Recompute,
        bottom: Option<Tensor>,
    ) -> Result<(LmLoss, AdapterGrads)> {
        let (loss, grads) = loss_and_site_grads(self, b, pass, loss_scale, recompute, bottom)?;
        let grads = grads
            .into_iter()
            .map(|(l, s, g)| (M::adapter_id(l, s), g))
            .collect();
        Ok((loss, grads))
    }

    /// Inference loss (summed over counted tokens), the head applied in chunks.
    fn loss(&self, b: &LmBatch) -> Result<LmLoss> {
        let hn = Pass::inference(|pass| forward_hidden(self, b, pass))?;
        lm_head_loss(&hn, self.head_weight(), &b.targets, chunk_rows(self), false)
    }

    /// Next-token logits `[batch*seq, vocab]` in f32 (materializes them whole: short prompts,
    /// and generation's reference).
    fn logits(&self, b: &LmBatch) -> Result<Tensor> {
        let hn = Pass::inference(|pass| forward_hidden(self, b, pass))?;
        head_logits(&hn, self.head_weight())
    }

    fn next_logits_cached(&self, new_ids: &[u32], cache: &mut Vec<KvCache>) -> Result<Vec<f32>> {
        if new_ids.is_empty() {
            candle_core::bail!("generation: no new token ids to run");
        }
        let head = self.head_weight();
        let hn = Pass::inference(|pass| -> Result<Tensor> {
            cache.resize_with(self.layers().len(), KvCache::default);
            let ids = Tensor::from_slice(new_ids, new_ids.len(), head.device())?;
            let mut h = self.embed_at(&ids, 1, cache[0].len(), pass)?;
            for (layer, c) in self.layers().iter().zip(cache.iter_mut()) {
                h = self.layer_forward_cached(layer, &h, c, pass)?;
            }
            self.final_norm(&h.narrow(0, new_ids.len() - 1, 1)?)
        })?;
        head_logits(&hn, head)?.squeeze(0)?.to_vec1()
    }

    fn hidden_layout(&self) -> (usize, DType) {
        let e = self.head_weight();
        (e.dims()[1], e.dtype())
    }

    fn hidden_between(&self, b: &LmBatch, h: Tensor, from: usize, to: usize) -> Result<Tensor> {
        Pass::inference(|pass| layers_between(self, b, h, from, to, pass))
    }

    fn hidden_before(&self, b: &LmBatch, layer: usize) -> Result<Tensor> {
        Pass::inference(|pass| hidden_before_with(self, b, layer, pass))
    }

    fn monitor_layer(
        &self,
        i: usize,
        b: &LmBatch,
        h: &Tensor,
        point: MonitorPoint,
    ) -> Result<MonitoredLayer> {
        let run = |l: &M::Layer, pass: &mut Pass, monitor: Option<&mut Monitored<Site<M>>>| {
            self.layer_forward(l, h, b, pass, monitor)
        };
        let (out, rows) = crate::adapters::monitor_layer(&self.layers()[i], point, run)?;
        let rows = rows
            .into_iter()
            .map(|(s, r)| (self.adapter_path(i, s), r))
            .collect();
        Ok((out, rows))
    }
}

/// Logits `[rows, vocab]` in f32 of final hidden states against the LM head.
fn head_logits(hn: &Tensor, head: &Tensor) -> Result<Tensor> {
    crate::nn::matmul(&hn.to_dtype(head.dtype())?, &head.t()?)?.to_dtype(DType::F32)
}

/// The shape of a batch, for attention.
pub fn attn_shape(b: &LmBatch) -> AttnShape {
    AttnShape {
        batch: b.batch,
        seq: b.seq,
    }
}

fn chunk_rows<M: DecoderParts>(m: &M) -> usize {
    lm_head_chunk_rows(m.head_weight().dim(0).unwrap_or(0))
}

/// The decoders' test batch: two sequences of 6 positions, the second padded after 3, masked
/// targets included.
#[cfg(test)]
pub(crate) fn test_batch(dtype: DType) -> LmBatch {
    let dev = Device::Cpu;
    let ids =
        Tensor::from_vec(vec![2u32, 7, 9, 11, 3, 5, 2, 13, 5, 0, 0, 0], (2, 6), &dev).unwrap();
    let mask = Tensor::from_vec(vec![1u32, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], (2, 6), &dev).unwrap();
    LmBatch {
        input_ids: ids,
        mask_add: crate::nn::attention::mask_to_additive(&mask, dtype).unwrap(),
        targets: vec![7, 9, 11, 3, 5, -100, 13, 5, -100, -100, -100, -100],
        batch: 2,
        seq: 6,
    }
}

/// A test step's loss and gradients on [`test_batch`] in f64, dropout drawn from seed 5.
#[cfg(test)]
pub(crate) fn test_grads<M: DecoderParts>(
    m: &M,
    recompute: &Recompute,
) -> (LmLoss, SiteGrads<Site<M>>) {
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(5);
    let mut pass = Pass::training(&mut rng);
    loss_and_site_grads(m, &test_batch(DType::F64), &mut pass, 1.0, recompute, None).unwrap()
}

/// Asserts that two [`test_grads`] results are the same bit for bit: the loss, and every
/// adapter's gradients by `(layer, site)`, of which there are some.
#[cfg(test)]
pub(crate) fn assert_same_grads<S: PartialEq + std::fmt::Debug>(
    (loss, g): &(LmLoss, SiteGrads<S>),
    (loss_b, g_b): &(LmLoss, SiteGrads<S>),
    what: &str,
) {
    use crate::nn::gradcheck::max_abs_diff;
    assert_eq!(loss.loss_sum, loss_b.loss_sum, "{what}");
    assert_eq!(g.len(), g_b.len(), "{what}");
    assert!(!g.is_empty(), "{what}");
    for ((l, s, a), (l_b, s_b, b)) in g.iter().zip(g_b) {
        assert_eq!((l, s), (l_b, s_b), "{what}");
        assert_eq!(max_abs_diff(&a.a, &b.a), 0.0, "{what}: layer {l} {s:?} A");
        assert_eq!(max_abs_diff(&a.b, &b.b), 0.0, "{what}: layer {l} {s:?} B");
    }
}

/// The oracle's loss for gradient tests: mean cross-entropy of the counted targets over
/// full logits, on candle's tape.
#[cfg(test)]
pub(crate) fn taped_mean_nll(hn: &Tensor, head: &Tensor, targets: &[i64]) -> Tensor {
    let logits = hn.matmul(&head.t().unwrap()).unwrap();
    let lse = logits.exp().unwrap().sum_keepdim(1).unwrap().log().unwrap();
    let logp = logits.broadcast_sub(&lse).unwrap();
    let rows: Vec<u32> = (0..targets.len() as u32)
        .filter(|&i| targets[i as usize] >= 0)
        .collect();
    let tgt: Vec<u32> = rows.iter().map(|&i| targets[i as usize] as u32).collect();
    let n = rows.len();
    let dev = hn.device();
    logp.index_select(&Tensor::from_vec(rows, n, dev).unwrap(), 0)
        .unwrap()
        .gather(&Tensor::from_vec(tgt, (n, 1), dev).unwrap(), 1)
        .unwrap()
        .mean_all()
        .unwrap()
        .neg()
        .unwrap()
}

#[cfg(test)]
mod tests {
    use super::lm_head_chunk_rows;

    /// The logits chunk stays near 16 MiB whatever the vocabulary, within 16..=256 rows.
    #[test]
    fn head_chunk_follows_the_vocabulary() {
        assert_eq!(lm_head_chunk_rows(49152), 85); // SmolLM2
        assert_eq!(lm_head_chunk_rows(32000), 131); // LLaMA 2
        assert_eq!(lm_head_chunk_rows(1000), 256);
        assert_eq!(lm_head_chunk_rows(256_000), 16);
        for vocab in [1000, 32000, 49152, 128_256] {
            assert!(lm_head_chunk_rows(vocab) * vocab * 4 <= 16 << 20);
        }
    }
}
