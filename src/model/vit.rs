//! ViT (transformers' `ViTForImageClassification`): the encoder body of `model::bert` with
//! pre-LN layers ([`EncoderFamily::pre_norm`]), patch embeddings in place of token embeddings,
//! and [`ImageHead`] (the final LayerNorm and `classifier` on the `[CLS]` token). Everything
//! else (LoRA, the stack's forward and backward, SAFE, the memory plan, PEFT files) is the
//! encoder's.
//!
//! ```text
//! pixels [B, C, S, S] -> patches [B*N, C*P*P] (reshape; the Conv2d with kernel = stride = P is a
//!   linear over flattened patches) -> projection -> [CLS] + patches -> + positions -> dropout
//!   -> pre-LN layers -> layernorm([CLS]) -> classifier
//! ```

use super::bert::{tensor, BatchTensors, BertWithHead, EncoderHead};
use super::bert_config::{BertConfig, EncoderFamily, ImageGeometry};
use super::encoder_head::{new_head_linear, HeadOn};
use crate::adapters::HeadParam;
use crate::io::weights::Weights;
use crate::io::IoError;
use crate::nn::flops::matmul;
use crate::nn::head::{HeadGrads, ImageHead, ImageHeadSaved};
use crate::nn::linear::Linear;
use crate::nn::norm::Norm;
use crate::nn::{Dropout, Pass};
use candle_core::{DType, Device, Result, Tensor};
use rand::Rng;
use std::path::Path;

/// transformers' `ViTForImageClassification`.
pub type ViTForImageClassification = BertWithHead<ImageHead>;

/// `vit.embeddings`: patch projection, `[CLS]` token, position embeddings, dropout. Frozen.
#[derive(Clone, Debug)]
pub struct PatchEmbeddings {
    /// `[hidden, channels * patch * patch]`: the Conv2d kernel, flattened as its patches are.
    pub projection: Tensor,
    pub bias: Tensor,
    /// `[1, hidden]`.
    pub cls_token: Tensor,
    /// `[patches + 1, hidden]`.
    pub position: Tensor,
    pub geometry: ImageGeometry,
    pub dropout: Dropout,
}

impl PatchEmbeddings {
    /// `vit.embeddings.*` of a checkpoint (`e` is at `embeddings`).
    pub fn load(
        e: &Weights,
        geometry: ImageGeometry,
        hidden: usize,
        dropout: Dropout,
    ) -> std::result::Result<Self, IoError> {
        let g = geometry;
        let (p, c, n) = (g.patch_size, g.num_channels, g.num_patches());
        let kernel = e.get("patch_embeddings.projection.weight", &[hidden, c, p, p])?;
        Ok(Self {
            projection: tensor(kernel.reshape((hidden, g.patch_dim())), e)?,
            bias: e.get("patch_embeddings.projection.bias", &[hidden])?,
            cls_token: tensor(e.get("cls_token", &[1, 1, hidden])?.reshape((1, hidden)), e)?,
            position: tensor(
                e.get("position_embeddings", &[1, n + 1, hidden])?
                    .reshape((n + 1, hidden)),
                e,
            )?,
            geometry,
            dropout,
        })
    }

    /// `pixels` is `[batch, channels, size, size]`; returns `[batch * (patches + 1), hidden]`,
    /// each image's `[CLS]` row first.
    pub fn forward(&self, pixels: &Tensor, pass: &mut Pass) -> Result<Tensor> {
        let g = self.geometry;
        let (b, c, h, w) = pixels.dims4()?;
        if c != g.num_channels || h != g.image_size || w != g.image_size {
            candle_core::bail!(
                "pixel values [{b}, {c}, {h}, {w}] do not fit the model ({} channels, {}x{})",
                g.num_channels,
                g.image_size,
                g.image_size
            );
        }
        let (p, k) = (g.patch_size, g.image_size / g.patch_size);
        let hidden = self.projection.dim(0)?;
        // [B, C, k, P, k, P] -> [B, k, k, C, P, P]: patches row by row, each flattened as the
        // kernel is (channel, row, column).
        let patches = pixels
            .to_dtype(self.projection.dtype())?
            .reshape((b, c, k, p, k, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * k * k, g.patch_dim()))?;
        let x = matmul(&patches, &self.projection.t()?)?.broadcast_add(&self.bias)?;
        let cls = self.cls_token.unsqueeze(0)?.repeat((b, 1, 1))?;
        let x = Tensor::cat(&[&cls, &x.reshape((b, k * k, hidden))?], 1)?
            .broadcast_add(&self.position.unsqueeze(0)?)?
            .reshape((b * (k * k + 1), hidden))?;
        Ok(self.dropout.forward(&x, pass, false)?.0)
    }
}

/// ViT's image head trains its classifier (PEFT's `modules_to_save = ["classifier"]`); PEFT has
/// no task type for image classification, so the adapter's `task_type` is null.
impl EncoderHead for ImageHead {
    type Saved = ImageHeadSaved;
    const TASK_TYPE: Option<&'static str> = None;
    const PARAMS: [HeadParam; 2] = [HeadParam::ClassifierWeight, HeadParam::ClassifierBias];

    fn forward(
        &self,
        h: &Tensor,
        batch: usize,
        seq: usize,
        _pass: &mut Pass,
        save: bool,
    ) -> Result<(Tensor, Option<ImageHeadSaved>)> {
        ImageHead::forward(self, h, batch, seq, save)
    }

    fn backward(&self, saved: ImageHeadSaved, dout: &Tensor) -> Result<(Tensor, HeadGrads)> {
        saved.backward(self, dout)
    }

    fn trained(&self) -> Vec<([HeadParam; 2], &Linear)> {
        vec![(Self::PARAMS, &self.classifier)]
    }

    fn trained_mut(&mut self, key: HeadParam) -> Option<&mut Linear> {
        Self::PARAMS.contains(&key).then_some(&mut self.classifier)
    }

    fn trained_path(&self, family: EncoderFamily, key: HeadParam) -> Option<&'static str> {
        Self::PARAMS
            .contains(&key)
            .then_some(family.spec().head.out)
    }
}

impl ViTForImageClassification {
    /// Loads a Hugging Face ViT folder (`config.json` with `model_type` `vit`,
    /// `model.safetensors`) with a classifier of `num_labels` outputs: the checkpoint's when it
    /// has one of that size, else new (normal(0, 0.02), zero bias), drawn from `rng` either way.
    pub fn load(
        dir: &Path,
        num_labels: usize,
        dtype: DType,
        device: &Device,
        rng: &mut impl Rng,
    ) -> std::result::Result<Self, IoError> {
        if !dir.is_dir() {
            return Err(IoError::Missing {
                path: dir.into(),
                what: "model folder with config.json and model.safetensors".into(),
            });
        }
        let path = dir.join("config.json");
        let config = BertConfig::from_file(&path)?;
        if !config.family().spec().images {
            return Err(IoError::Invalid {
                path,
                message: format!(
                    "image classification needs a ViT model (model_type 'vit'), not '{}'",
                    config.family().spec().model_type
                ),
            });
        }
        let w = Weights::open_dir(dir, &config.family().prefixes(), dtype, device)?;
        Self::from_weights(config, &w, num_labels, rng)
    }

    /// Builds the model from checkpoint tensors (see [`Self::load`]).
    pub fn from_weights(
        config: BertConfig,
        w: &Weights,
        num_labels: usize,
        rng: &mut impl Rng,
    ) -> std::result::Result<Self, IoError> {
        BertWithHead::build(config, w, |c, w, on| image_head(c, w, num_labels, on, rng))
    }

    /// A random-weight ViT (normal(0, 0.02), LayerNorms 1/0), through the loading path.
    pub fn random(
        config: BertConfig,
        num_labels: usize,
        dtype: DType,
        device: &Device,
        rng: &mut impl Rng,
    ) -> std::result::Result<Self, IoError> {
        let w = super::bert::random_weights(&config, dtype, device, rng);
        Self::from_weights(config, &w, num_labels, rng)
    }

    /// The model's input: channels, image size, patch size.
    pub fn geometry(&self) -> ImageGeometry {
        self.config
            .image
            .expect("a ViT config has its image geometry")
    }

    /// A batch of preprocessed images `[batch, channels, size, size]` (on the model's device) as
    /// the encoder takes it: no token ids, and no padding (every patch attends to every other).
    pub fn image_batch(&self, pixels: Tensor) -> Result<BatchTensors> {
        let batch = pixels.dim(0)?;
        let seq = self.geometry().num_patches() + 1;
        let device = pixels.device().clone();
        let dtype = crate::device::compute_dtype(self.embeddings.dtype());
        let none = Tensor::zeros((batch, 0), DType::U32, &device)?;
        Ok(BatchTensors {
            pixel_values: Some(pixels),
            input_ids: none.clone(),
            token_type_ids: none,
            mask_add: Tensor::zeros((batch, 1, 1, seq), dtype, &device)?,
            batch,
            seq,
        })
    }
}

/// The final LayerNorm (`vit.layernorm`) and the classifier: the checkpoint's when it has one of
/// `num_labels` outputs, else new.
fn image_head(
    c: &BertConfig,
    w: &Weights,
    num_labels: usize,
    on: HeadOn,
    rng: &mut impl Rng,
) -> std::result::Result<ImageHead, IoError> {
    let h = c.hidden_size;
    let as_head = |t: Tensor| tensor(t.to_dtype(on.dtype), w);
    let new = new_head_linear(num_labels, h, on, w, rng)?;
    let p = w.pp("classifier");
    let stored = if p.contains("weight") {
        match p.get("weight", &[num_labels, h]) {
            Ok(t) => Some(Linear::new(
                as_head(t)?,
                Some(as_head(p.get("bias", &[num_labels])?)?),
            )),
            Err(IoError::WrongShape { .. }) => None,
            Err(e) => return Err(e),
        }
    } else {
        None
    };
    let ln = w.pp("layernorm");
    Ok(ImageHead {
        layernorm: Norm::layer(
            as_head(ln.get("weight", &[h])?)?,
            as_head(ln.get("bias", &[h])?)?,
            c.layer_norm_eps,
        ),
        classifier: stored.unwrap_or(new),
    })
}

/// The embedding tensors of a ViT checkpoint (without `vit.`) and their shapes, and its final
/// LayerNorm's.
pub fn embedding_shapes(g: &ImageGeometry, hidden: usize) -> Vec<(String, Vec<usize>)> {
    let (p, c, n) = (g.patch_size, g.num_channels, g.num_patches());
    vec![
        ("embeddings.cls_token".into(), vec![1, 1, hidden]),
        (
            "embeddings.position_embeddings".into(),
            vec![1, n + 1, hidden],
        ),
        (
            "embeddings.patch_embeddings.projection.weight".into(),
            vec![hidden, c, p, p],
        ),
        (
            "embeddings.patch_embeddings.projection.bias".into(),
            vec![hidden],
        ),
        ("layernorm.weight".into(), vec![hidden]),
        ("layernorm.bias".into(), vec![hidden]),
    ]
}

#[cfg(test)]
#[path = "vit_tests.rs"]
mod tests;
