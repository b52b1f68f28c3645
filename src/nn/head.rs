//! Heads on an encoder's last hidden state, each trained as PEFT's `modules_to_save`:
//! - [`ClassificationHead`], transformers' `BertForSequenceClassification`'s: the pretrained
//!   pooler (dense + tanh on the first token, frozen), dropout, then a trainable linear classifier;
//! - [`QaHead`], `BertForQuestionAnswering`'s: one trainable linear `qa_outputs` (hidden -> 2) on
//!   every token, giving each token's start and end logit (no pooler, no dropout).

use super::dropout::DropoutSaved;
use super::flops::matmul;
use super::linear::Linear;
use super::{Dropout, Pass};
use candle_core::{Result, Tensor};

#[derive(Clone, Debug)]
pub struct ClassificationHead {
    pub pooler: Linear,
    pub dropout: Dropout,
    /// Trainable: `[num_labels, hidden]` and `[num_labels]`.
    pub classifier: Linear,
}

pub struct HeadSaved {
    pooled: Tensor,
    dropout: Option<DropoutSaved>,
    features: Tensor,
    batch: usize,
    seq: usize,
    /// The hidden states' dtype (the head itself may run in a wider one).
    in_dtype: candle_core::DType,
}

pub struct HeadGrads {
    pub weight: Tensor,
    pub bias: Tensor,
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
        let hidden = h.dim(1)?;
        let first = h
            .reshape((batch, seq, hidden))?
            .narrow(1, 0, 1)?
            .squeeze(1)?
            .to_dtype(self.pooler.weight.dtype())?;
        let pooled = self.pooler.forward(&first)?.tanh()?;
        let (features, dropout) = self.dropout.forward(&pooled, pass, save)?;
        let logits = self.classifier.forward(&features)?;
        let saved = save.then_some(HeadSaved {
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
    /// token only) and the classifier's gradients.
    pub fn backward(
        &self,
        head: &ClassificationHead,
        dlogits: &Tensor,
    ) -> Result<(Tensor, HeadGrads)> {
        let grads = HeadGrads {
            weight: matmul(&dlogits.t()?, &self.features)?,
            bias: dlogits.sum(0)?,
        };
        let dfeat = head.classifier.backward_input(dlogits)?;
        let dpooled = super::dropout::backward_opt(&self.dropout, dfeat)?;
        let dz = (dpooled * self.pooled.sqr()?.affine(-1.0, 1.0)?)?;
        let dfirst = head.pooler.backward_input(&dz)?.to_dtype(self.in_dtype)?;
        let hidden = dfirst.dim(1)?;
        let rest = Tensor::zeros(
            (self.batch, self.seq - 1, hidden),
            dfirst.dtype(),
            dfirst.device(),
        )?;
        let dh = Tensor::cat(&[&dfirst.unsqueeze(1)?, &rest], 1)?;
        Ok((dh.reshape((self.batch * self.seq, hidden))?, grads))
    }
}

/// Extractive question answering's span head: `qa_outputs`, `[2, hidden]` and `[2]`.
#[derive(Clone, Debug)]
pub struct QaHead {
    pub qa_outputs: Linear,
}

/// What [`QaHead`]'s backward needs: its input (in the head's dtype) and the hidden states'
/// dtype.
pub struct QaHeadSaved {
    x: Tensor,
    in_dtype: candle_core::DType,
}

impl QaHead {
    /// `h` is the last hidden state `[batch*seq, hidden]`; returns `[batch*seq, 2]`: column 0 the
    /// start logits, column 1 the end logits.
    pub fn forward(&self, h: &Tensor, save: bool) -> Result<(Tensor, Option<QaHeadSaved>)> {
        let x = h.to_dtype(self.qa_outputs.weight.dtype())?;
        let logits = self.qa_outputs.forward(&x)?;
        let saved = save.then_some(QaHeadSaved {
            x,
            in_dtype: h.dtype(),
        });
        Ok((logits, saved))
    }
}

impl QaHeadSaved {
    /// Returns the gradient of the last hidden state `[batch*seq, hidden]` and `qa_outputs`'
    /// gradients.
    pub fn backward(&self, head: &QaHead, dlogits: &Tensor) -> Result<(Tensor, HeadGrads)> {
        let grads = HeadGrads {
            weight: matmul(&dlogits.t()?, &self.x)?,
            bias: dlogits.sum(0)?,
        };
        let dh = head
            .qa_outputs
            .backward_input(dlogits)?
            .to_dtype(self.in_dtype)?;
        Ok((dh, grads))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{check, randn};
    use rand::SeedableRng;

    #[test]
    fn backward_matches_autograd_and_finite_differences() {
        let (b, t, c, k) = (3, 4, 6, 5);
        let pooler = Linear::new(randn(&[c, c], 51), Some(randn(&[c], 52)));
        let h = randn(&[b * t, c], 53);
        let (w, bias) = (randn(&[k, c], 54), randn(&[k], 55));
        let dy = randn(&[b, k], 56);
        let head_with = |w: &Tensor, bias: &Tensor| ClassificationHead {
            pooler: pooler.clone(),
            dropout: Dropout::new(0.2),
            classifier: Linear::new(w.clone(), Some(bias.clone())),
        };
        let fwd = |x: &[Tensor], save: bool| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(3);
            let mut pass = Pass {
                training: true,
                rng: &mut rng,
            };
            head_with(&x[1], &x[2])
                .forward(&x[0], b, t, &mut pass, save)
                .unwrap()
        };
        let inputs = [h, w, bias];
        let saved = fwd(&inputs, true).1.unwrap();
        let (dh, g) = saved
            .backward(&head_with(&inputs[1], &inputs[2]), &dy)
            .unwrap();
        check(
            &inputs,
            &dy,
            &[dh, g.weight, g.bias],
            |x| Ok(fwd(x, false).0),
            1e-10,
        );
    }

    #[test]
    fn qa_backward_matches_autograd_and_finite_differences() {
        let (n, c) = (7, 6);
        let h = randn(&[n, c], 61);
        let (w, bias) = (randn(&[2, c], 62), randn(&[2], 63));
        let dy = randn(&[n, 2], 64);
        let head = |w: &Tensor, b: &Tensor| QaHead {
            qa_outputs: Linear::new(w.clone(), Some(b.clone())),
        };
        let inputs = [h, w, bias];
        let (logits, saved) = head(&inputs[1], &inputs[2])
            .forward(&inputs[0], true)
            .unwrap();
        assert_eq!(logits.dims(), &[n, 2]);
        let (dh, g) = saved
            .unwrap()
            .backward(&head(&inputs[1], &inputs[2]), &dy)
            .unwrap();
        check(
            &inputs,
            &dy,
            &[dh, g.weight, g.bias],
            |x| Ok(head(&x[1], &x[2]).forward(&x[0], false)?.0),
            1e-10,
        );
    }
}
