//! The heads an encoder trains beside its adapters (PEFT's `modules_to_save`): sequence
//! classification and question answering, how their tensors are read from a checkpoint or made
//! new, and the question-answering model's constructors.

use super::bert::{
    open_encoder_dir, random_weights, tensor, BertForQuestionAnswering, BertWithHead,
};
use super::bert_config::BertConfig;
use super::bert_config::EncoderFamily;
use crate::adapters::HeadParam;
use crate::io::weights::Weights;
use crate::io::IoError;
use crate::nn::head::{ClassificationHead, HeadGrads, HeadSaved, QaHead, QaHeadSaved};
use crate::nn::linear::Linear;
use crate::nn::{Dropout, Pass};
use candle_core::{DType, Device, Result, Tensor};
use rand::Rng;
use std::path::Path;

/// A head on the encoder's last hidden state, trained beside the adapters (PEFT's
/// `modules_to_save`).
pub trait EncoderHead: Clone + std::fmt::Debug {
    /// What the head's backward needs.
    type Saved;
    /// PEFT's `task_type` (None: PEFT has none for image classification).
    const TASK_TYPE: Option<&'static str>;
    /// The output layer's weight and bias ([`HeadGrads::weight`] and `bias`; a trained dense
    /// layer's are [`HeadParam::DenseWeight`] and `DenseBias`).
    const PARAMS: [HeadParam; 2];

    /// `h` is the last hidden state `[batch*seq, hidden]`; returns the head's output.
    fn forward(
        &self,
        h: &Tensor,
        batch: usize,
        seq: usize,
        pass: &mut Pass,
        save: bool,
    ) -> Result<(Tensor, Option<Self::Saved>)>;

    /// The gradient of the last hidden state and the trained layers' gradients.
    fn backward(&self, saved: Self::Saved, dout: &Tensor) -> Result<(Tensor, HeadGrads)>;

    /// The layers that train, each with its weight's and bias' ids, the output layer first.
    fn trained(&self) -> Vec<([HeadParam; 2], &Linear)>;

    /// The trained layer of a head tensor; None when this head trains no such tensor.
    fn trained_mut(&mut self, key: HeadParam) -> Option<&mut Linear>;

    /// The module path of a trained head tensor's layer in `family`'s task model.
    fn trained_path(&self, family: EncoderFamily, key: HeadParam) -> Option<&'static str>;
}

impl EncoderHead for ClassificationHead {
    type Saved = HeadSaved;
    const TASK_TYPE: Option<&'static str> = Some("SEQ_CLS");
    const PARAMS: [HeadParam; 2] = [HeadParam::ClassifierWeight, HeadParam::ClassifierBias];

    fn forward(
        &self,
        h: &Tensor,
        batch: usize,
        seq: usize,
        pass: &mut Pass,
        save: bool,
    ) -> Result<(Tensor, Option<HeadSaved>)> {
        ClassificationHead::forward(self, h, batch, seq, pass, save)
    }

    fn backward(&self, saved: HeadSaved, dout: &Tensor) -> Result<(Tensor, HeadGrads)> {
        saved.backward(self, dout)
    }

    /// The classifier, then the dense layer when it trains.
    fn trained(&self) -> Vec<([HeadParam; 2], &Linear)> {
        let mut v = vec![(Self::PARAMS, &self.classifier)];
        if self.dense_trains {
            v.push(([HeadParam::DenseWeight, HeadParam::DenseBias], &self.dense));
        }
        v
    }

    fn trained_mut(&mut self, key: HeadParam) -> Option<&mut Linear> {
        match key {
            HeadParam::ClassifierWeight | HeadParam::ClassifierBias => Some(&mut self.classifier),
            HeadParam::DenseWeight | HeadParam::DenseBias if self.dense_trains => {
                Some(&mut self.dense)
            }
            _ => None,
        }
    }

    fn trained_path(&self, family: EncoderFamily, key: HeadParam) -> Option<&'static str> {
        let spec = family.spec().head;
        match key {
            HeadParam::ClassifierWeight | HeadParam::ClassifierBias => Some(spec.out),
            HeadParam::DenseWeight | HeadParam::DenseBias => {
                self.dense_trains.then_some(spec.dense)
            }
            _ => None,
        }
    }
}

impl EncoderHead for QaHead {
    type Saved = QaHeadSaved;
    const TASK_TYPE: Option<&'static str> = Some("QUESTION_ANS");
    const PARAMS: [HeadParam; 2] = [HeadParam::QaOutputsWeight, HeadParam::QaOutputsBias];

    /// `[batch*seq, 2]`: each token's start and end logit.
    fn forward(
        &self,
        h: &Tensor,
        _batch: usize,
        _seq: usize,
        pass: &mut Pass,
        save: bool,
    ) -> Result<(Tensor, Option<QaHeadSaved>)> {
        QaHead::forward(self, h, pass, save)
    }

    fn backward(&self, saved: QaHeadSaved, dout: &Tensor) -> Result<(Tensor, HeadGrads)> {
        saved.backward(self, dout)
    }

    fn trained(&self) -> Vec<([HeadParam; 2], &Linear)> {
        vec![(Self::PARAMS, &self.qa_outputs)]
    }

    fn trained_mut(&mut self, key: HeadParam) -> Option<&mut Linear> {
        Self::PARAMS.contains(&key).then_some(&mut self.qa_outputs)
    }

    /// `qa_outputs` at the task model's root, in every family.
    fn trained_path(&self, _family: EncoderFamily, key: HeadParam) -> Option<&'static str> {
        Self::PARAMS.contains(&key).then_some(QaHead::PATH)
    }
}

/// Where a head's tensors live: the dtype it runs in (f32 beside half-precision layers) and the
/// device.
#[derive(Clone, Copy)]
pub(crate) struct HeadOn<'a> {
    pub dtype: DType,
    pub device: &'a Device,
}

/// The checkpoint's `[out, h]` head layer at `path` (weight and bias) in `on`'s dtype; None when
/// the checkpoint has none, or, when `other_shape_is_new`, has a weight of another shape (the
/// caller makes a new layer); otherwise a weight of another shape is an error.
pub(crate) fn stored_head_linear(
    w: &Weights,
    path: &str,
    out: usize,
    h: usize,
    on: HeadOn,
    other_shape_is_new: bool,
) -> std::result::Result<Option<Linear>, IoError> {
    let p = w.pp(path);
    if !p.contains("weight") {
        return Ok(None);
    }
    let weight = match p.get("weight", &[out, h]) {
        Ok(t) => t,
        Err(IoError::WrongShape { .. }) if other_shape_is_new => return Ok(None),
        Err(e) => return Err(e),
    };
    let bias = p.get("bias", &[out])?;
    let as_head = |t: Tensor| tensor(t.to_dtype(on.dtype), w);
    Ok(Some(Linear::new(as_head(weight)?, Some(as_head(bias)?))))
}

/// A new `[out, hidden]` linear, initialised as transformers does (normal(0, 0.02), zero bias).
pub(crate) fn new_head_linear(
    out: usize,
    h: usize,
    on: HeadOn,
    w: &Weights,
    rng: &mut impl Rng,
) -> std::result::Result<Linear, IoError> {
    let normal = rand_distr::Normal::new(0.0, 0.02).expect("valid std");
    let v: Vec<f32> = (0..out * h)
        .map(|_| rand_distr::Distribution::sample(&normal, rng))
        .collect();
    let weight = Tensor::from_vec(v, (out, h), on.device).and_then(|t| t.to_dtype(on.dtype));
    Ok(Linear::new(
        tensor(weight, w)?,
        Some(tensor(Tensor::zeros(out, on.dtype, on.device), w)?),
    ))
}

impl BertForQuestionAnswering {
    /// Loads a Hugging Face encoder folder with `qa_outputs` (`[2, hidden]`): the checkpoint's
    /// when it has one (a merged QA model), else new (normal(0, 0.02), zero bias, as transformers
    /// initialises it) from `rng`, drawn either way. The checkpoint's pooler or classifier is not
    /// used.
    pub fn load(
        dir: &Path,
        dtype: DType,
        device: &Device,
        rng: &mut impl Rng,
    ) -> std::result::Result<Self, IoError> {
        let (config, w) = open_encoder_dir(dir, dtype, device)?;
        Self::from_weights(config, &w, rng)
    }

    /// Builds the model from checkpoint tensors (see [`Self::load`]).
    pub fn from_weights(
        config: BertConfig,
        w: &Weights,
        rng: &mut impl Rng,
    ) -> std::result::Result<Self, IoError> {
        if let Err(message) = config.family().qa_support() {
            return Err(IoError::Invalid {
                path: w.file().into(),
                message,
            });
        }
        BertWithHead::build(config, w, |c, w, on| {
            let h = c.hidden_size;
            let new = new_head_linear(2, h, on, w, rng)?;
            let qa_outputs = stored_head_linear(w, QaHead::PATH, 2, h, on, false)?.unwrap_or(new);
            Ok(QaHead {
                qa_outputs,
                dropout: Dropout::new(c.qa_dropout.unwrap_or(0.0)),
            })
        })
    }

    /// A random-weight model (see [`BertForSequenceClassification::random`]).
    pub fn random(
        config: BertConfig,
        dtype: DType,
        device: &Device,
        rng: &mut impl Rng,
    ) -> std::result::Result<Self, IoError> {
        let w = random_weights(&config, dtype, device, rng);
        Self::from_weights(config, &w, rng)
    }
}
