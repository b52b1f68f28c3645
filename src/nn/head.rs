//! Heads on an encoder's last hidden state, each trained as PEFT's `modules_to_save`:
//! - [`ClassificationHead`], transformers' encoder sequence classifiers', on the first token:
//!   `[dropout] -> dense -> tanh or ReLU -> dropout -> classifier`. BERT's dense layer is the
//!   pretrained pooler, frozen; RoBERTa's (`classifier.dense`, with the first dropout) and
//!   DistilBERT's (`pre_classifier`, ReLU) train with the classifier, as PEFT's
//!   `modules_to_save` trains them;
//! - [`QaHead`], `...ForQuestionAnswering`'s: `[dropout] -> qa_outputs`, one trainable linear
//!   (hidden -> 2) on every token, giving each token's start and end logit (no pooler; the
//!   dropout is DistilBERT's `qa_dropout`, none in the other families);
//! - [`ImageHead`], `ViTForImageClassification`'s: the final LayerNorm (frozen) and a trainable
//!   `classifier` on the `[CLS]` token (no dense layer, no dropout).

use super::dropout::DropoutSaved;
use super::flops::matmul;
use super::linear::Linear;
use super::norm::{Norm, NormSaved};
use super::{Dropout, Pass};
use candle_core::{Result, Tensor};

/// The dense layer's activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadActivation {
    Tanh,
    Relu,
}

#[derive(Clone, Debug)]
pub struct ClassificationHead {
    /// `[hidden, hidden]`: BERT's pooler, RoBERTa's `classifier.dense`, DistilBERT's
    /// `pre_classifier`.
    pub dense: Linear,
    pub activation: HeadActivation,
    /// Whether `dense` trains (its gradients are computed), or is frozen.
    pub dense_trains: bool,
    /// Dropout on the first token before `dense` (RoBERTa's head); None: none.
    pub dropout_first: Option<Dropout>,
    pub dropout: Dropout,
    /// Trainable: `[num_labels, hidden]` and `[num_labels]`.
    pub classifier: Linear,
}

pub struct HeadSaved {
    /// The dense layer's input, kept when it trains.
    dense_in: Option<Tensor>,
    dropout_first: Option<DropoutSaved>,
    /// The activation's output.
    pooled: Tensor,
    dropout: Option<DropoutSaved>,
    features: Tensor,
    batch: usize,
    seq: usize,
    /// The hidden states' dtype (the head itself may run in a wider one).
    in_dtype: candle_core::DType,
}

/// Gradients of a linear layer's weight and bias.
pub struct LinearGrads {
    pub weight: Tensor,
    pub bias: Tensor,
}

pub struct HeadGrads {
    /// The classifier's weight and bias.
    pub weight: Tensor,
    pub bias: Tensor,
    /// The dense layer's, when it trains.
    pub dense: Option<LinearGrads>,
}

fn linear_grads(dy: &Tensor, x: &Tensor) -> Result<LinearGrads> {
    Ok(LinearGrads {
        weight: matmul(&dy.t()?, x)?,
        bias: dy.sum(0)?,
    })
}

impl ClassificationHead {
    /// `h` is the last hidden state `[batch*seq, hidden]`; returns logits `[batch, num_labels]`.
    pub fn forward(
        &self,
        h: &Tensor,
        batch: usize,
        seq: usize,
        pass: &mut Pass,
        save: bool,
    ) -> Result<(Tensor, Option<HeadSaved>)> {
        let first = first_token(h, batch, seq, self.dense.weight.dtype())?;
        let (x, dropout_first) = match &self.dropout_first {
            Some(d) => d.forward(&first, pass, save)?,
            None => (first, None),
        };
        let z = self.dense.forward(&x)?;
        let pooled = match self.activation {
            HeadActivation::Tanh => z.tanh()?,
            HeadActivation::Relu => z.relu()?,
        };
        let (features, dropout) = self.dropout.forward(&pooled, pass, save)?;
        let logits = self.classifier.forward(&features)?;
        let saved = save.then_some(HeadSaved {
            dense_in: self.dense_trains.then_some(x),
            dropout_first,
            pooled,
            dropout,
            features,
            batch,
            seq,
            in_dtype: h.dtype(),
        });
        Ok((logits, saved))
    }
}

impl HeadSaved {
    /// Returns the gradient of the last hidden state `[batch*seq, hidden]` (non-zero on the first
    /// token only) and the trained layers' gradients.
    pub fn backward(
        &self,
        head: &ClassificationHead,
        dlogits: &Tensor,
    ) -> Result<(Tensor, HeadGrads)> {
        let out = linear_grads(dlogits, &self.features)?;
        let dfeat = head.classifier.backward_input(dlogits)?;
        let dpooled = super::dropout::backward_opt(&self.dropout, dfeat)?;
        let dz = match head.activation {
            HeadActivation::Tanh => (dpooled * self.pooled.sqr()?.affine(-1.0, 1.0)?)?,
            HeadActivation::Relu => {
                let on = self.pooled.gt(0.0)?.to_dtype(dpooled.dtype())?;
                (dpooled * on)?
            }
        };
        let dense = match &self.dense_in {
            Some(x) => Some(linear_grads(&dz, x)?),
            None => None,
        };
        let dx = head.dense.backward_input(&dz)?;
        let dfirst =
            super::dropout::backward_opt(&self.dropout_first, dx)?.to_dtype(self.in_dtype)?;
        let grads = HeadGrads {
            weight: out.weight,
            bias: out.bias,
            dense,
        };
        Ok((first_token_grad(&dfirst, self.batch, self.seq)?, grads))
    }
}

/// The first token of each row of the last hidden state `h` (`[batch*seq, hidden]`), in `dtype`:
/// `[batch, hidden]`.
fn first_token(h: &Tensor, batch: usize, seq: usize, dtype: candle_core::DType) -> Result<Tensor> {
    let hidden = h.dim(1)?;
    h.reshape((batch, seq, hidden))?
        .narrow(1, 0, 1)?
        .squeeze(1)?
        .to_dtype(dtype)
}

/// The gradient of the last hidden state `[batch*seq, hidden]` of a head that read the first
/// token only: `dfirst` there, zero elsewhere.
fn first_token_grad(dfirst: &Tensor, batch: usize, seq: usize) -> Result<Tensor> {
    let hidden = dfirst.dim(1)?;
    let rest = Tensor::zeros((batch, seq - 1, hidden), dfirst.dtype(), dfirst.device())?;
    Tensor::cat(&[&dfirst.unsqueeze(1)?, &rest], 1)?.reshape((batch * seq, hidden))
}

/// `ViTForImageClassification`'s head: `classifier(layernorm(h))` on the `[CLS]` token. The
/// LayerNorm (`vit.layernorm`) is the pretrained model's, frozen; the classifier trains.
#[derive(Clone, Debug)]
pub struct ImageHead {
    pub layernorm: Norm,
    /// Trainable: `[num_labels, hidden]` and `[num_labels]`.
    pub classifier: Linear,
}

/// What [`ImageHead`]'s backward needs.
pub struct ImageHeadSaved {
    ln: NormSaved,
    /// The classifier's input.
    features: Tensor,
    batch: usize,
    seq: usize,
    in_dtype: candle_core::DType,
}

impl ImageHead {
    /// `h` is the last hidden state `[batch*seq, hidden]`; returns logits `[batch, num_labels]`.
    pub fn forward(
        &self,
        h: &Tensor,
        batch: usize,
        seq: usize,
        save: bool,
    ) -> Result<(Tensor, Option<ImageHeadSaved>)> {
        let first = first_token(h, batch, seq, self.classifier.weight.dtype())?;
        let (features, ln) = self.layernorm.forward(&first, save)?;
        let logits = self.classifier.forward(&features)?;
        let saved = ln.map(|ln| ImageHeadSaved {
            ln,
            features,
            batch,
            seq,
            in_dtype: h.dtype(),
        });
        Ok((logits, saved))
    }
}

impl ImageHeadSaved {
    /// Returns the gradient of the last hidden state (non-zero on the `[CLS]` token only) and the
    /// classifier's gradients.
    pub fn backward(&self, head: &ImageHead, dlogits: &Tensor) -> Result<(Tensor, HeadGrads)> {
        let LinearGrads { weight, bias } = linear_grads(dlogits, &self.features)?;
        let dfeat = head.classifier.backward_input(dlogits)?;
        let dfirst = self
            .ln
            .backward(&head.layernorm, &dfeat)?
            .to_dtype(self.in_dtype)?;
        let grads = HeadGrads {
            weight,
            bias,
            dense: None,
        };
        Ok((first_token_grad(&dfirst, self.batch, self.seq)?, grads))
    }
}

/// Extractive question answering's span head: `qa_outputs`, `[2, hidden]` and `[2]`.
#[derive(Clone, Debug)]
pub struct QaHead {
    pub qa_outputs: Linear,
    pub dropout: Dropout,
}

/// What [`QaHead`]'s backward needs: its input (in the head's dtype) and the hidden states'
/// dtype.
pub struct QaHeadSaved {
    x: Tensor,
    dropout: Option<DropoutSaved>,
    in_dtype: candle_core::DType,
}

impl QaHead {
    /// Its module path in a task model (`...ForQuestionAnswering`'s `qa_outputs`, at the root).
    pub const PATH: &'static str = "qa_outputs";

    /// `h` is the last hidden state `[batch*seq, hidden]`; returns `[batch*seq, 2]`: column 0 the
    /// start logits, column 1 the end logits.
    pub fn forward(
        &self,
        h: &Tensor,
        pass: &mut Pass,
        save: bool,
    ) -> Result<(Tensor, Option<QaHeadSaved>)> {
        let x = h.to_dtype(self.qa_outputs.weight.dtype())?;
        let (x, dropout) = self.dropout.forward(&x, pass, save)?;
        let logits = self.qa_outputs.forward(&x)?;
        let saved = save.then_some(QaHeadSaved {
            x,
            dropout,
            in_dtype: h.dtype(),
        });
        Ok((logits, saved))
    }
}

impl QaHeadSaved {
    /// Returns the gradient of the last hidden state `[batch*seq, hidden]` and `qa_outputs`'
    /// gradients.
    pub fn backward(&self, head: &QaHead, dlogits: &Tensor) -> Result<(Tensor, HeadGrads)> {
        let LinearGrads { weight, bias } = linear_grads(dlogits, &self.x)?;
        let grads = HeadGrads {
            weight,
            bias,
            dense: None,
        };
        let dx = head.qa_outputs.backward_input(dlogits)?;
        let dh = super::dropout::backward_opt(&self.dropout, dx)?.to_dtype(self.in_dtype)?;
        Ok((dh, grads))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{check, randn};
    use rand::SeedableRng;

    /// Each head layout (BERT's frozen tanh pooler; RoBERTa's dropout, trained tanh dense;
    /// DistilBERT's trained ReLU dense): the hidden state's and every trained tensor's gradient
    /// equal autograd's and finite differences, dropout on.
    #[test]
    fn backward_matches_autograd_and_finite_differences() {
        let (b, t, c, k) = (3, 4, 6, 5);
        let h = randn(&[b * t, c], 53);
        let (w, bias) = (randn(&[k, c], 54), randn(&[k], 55));
        let (dw, db) = (randn(&[c, c], 51), randn(&[c], 52));
        let dy = randn(&[b, k], 56);
        let layouts = [
            (HeadActivation::Tanh, false, None),
            (HeadActivation::Tanh, true, Some(Dropout::new(0.3))),
            (HeadActivation::Relu, true, None),
        ];
        for (activation, dense_trains, dropout_first) in layouts {
            let head_with = |x: &[Tensor]| ClassificationHead {
                dense: Linear::new(x[3].clone(), Some(x[4].clone())),
                activation,
                dense_trains,
                dropout_first,
                dropout: Dropout::new(0.2),
                classifier: Linear::new(x[1].clone(), Some(x[2].clone())),
            };
            let fwd = |x: &[Tensor], save: bool| {
                let mut rng = rand::rngs::StdRng::seed_from_u64(3);
                let mut pass = Pass::training(&mut rng);
                head_with(x).forward(&x[0], b, t, &mut pass, save).unwrap()
            };
            let inputs = [h.clone(), w.clone(), bias.clone(), dw.clone(), db.clone()];
            let saved = fwd(&inputs, true).1.unwrap();
            let (dh, g) = saved.backward(&head_with(&inputs), &dy).unwrap();
            assert_eq!(g.dense.is_some(), dense_trains);
            let n = if dense_trains { 5 } else { 3 };
            let mut grads = vec![dh, g.weight, g.bias];
            if let Some(d) = g.dense {
                grads.extend([d.weight, d.bias]);
            }
            // The frozen dense layer's tensors are inputs of the forward, not checked.
            let fixed = inputs[3..].to_vec();
            check(
                &inputs[..n],
                &dy,
                &grads,
                |x| {
                    let mut all = x.to_vec();
                    all.extend(fixed[n - 3..].iter().cloned());
                    Ok(fwd(&all, false).0)
                },
                1e-10,
            );
        }
    }

    /// With and without DistilBERT's dropout before `qa_outputs` (the same seed in every
    /// forward, so the same mask).
    #[test]
    fn qa_backward_matches_autograd_and_finite_differences() {
        let (n, c) = (7, 6);
        let h = randn(&[n, c], 61);
        let (w, bias) = (randn(&[2, c], 62), randn(&[2], 63));
        let dy = randn(&[n, 2], 64);
        for p in [0.0, 0.3] {
            let head = |w: &Tensor, b: &Tensor| QaHead {
                qa_outputs: Linear::new(w.clone(), Some(b.clone())),
                dropout: Dropout::new(p),
            };
            let fwd = |x: &[Tensor], save: bool| {
                let mut rng = rand::rngs::StdRng::seed_from_u64(5);
                let mut pass = Pass::training(&mut rng);
                head(&x[1], &x[2]).forward(&x[0], &mut pass, save).unwrap()
            };
            let inputs = [h.clone(), w.clone(), bias.clone()];
            let (logits, saved) = fwd(&inputs, true);
            assert_eq!(logits.dims(), &[n, 2]);
            let saved = saved.unwrap();
            assert_eq!(saved.dropout.is_some(), p > 0.0);
            let (dh, g) = saved.backward(&head(&inputs[1], &inputs[2]), &dy).unwrap();
            check(
                &inputs,
                &dy,
                &[dh, g.weight, g.bias],
                |x| Ok(fwd(x, false).0),
                1e-10,
            );
        }
    }

    /// ViT's head: the hidden state's gradient (through the frozen LayerNorm, on the `[CLS]` rows
    /// only) and the classifier's equal autograd's and finite differences.
    #[test]
    fn image_head_backward_matches_autograd_and_finite_differences() {
        let (b, t, c, k) = (3, 4, 6, 5);
        let h = randn(&[b * t, c], 71);
        let (w, bias) = (randn(&[k, c], 72), randn(&[k], 73));
        let (gamma, beta) = (randn(&[c], 74), randn(&[c], 75));
        let dy = randn(&[b, k], 76);
        let head = |w: &Tensor, bias: &Tensor| ImageHead {
            layernorm: Norm::layer(gamma.clone(), beta.clone(), 1e-6),
            classifier: Linear::new(w.clone(), Some(bias.clone())),
        };
        let inputs = [h, w, bias];
        let (logits, saved) = head(&inputs[1], &inputs[2])
            .forward(&inputs[0], b, t, true)
            .unwrap();
        assert_eq!(logits.dims(), &[b, k]);
        let (dh, g) = saved
            .unwrap()
            .backward(&head(&inputs[1], &inputs[2]), &dy)
            .unwrap();
        // Only the first token of each row feeds the logits.
        let rows: Vec<f64> = dh.abs().unwrap().sum(1).unwrap().to_vec1().unwrap();
        for (i, r) in rows.iter().enumerate() {
            assert_eq!(*r > 0.0, i % t == 0, "row {i}: {r}");
        }
        check(
            &inputs,
            &dy,
            &[dh, g.weight, g.bias],
            |x| Ok(head(&x[1], &x[2]).forward(&x[0], b, t, false)?.0),
            1e-10,
        );
    }
}
