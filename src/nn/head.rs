//! The head of transformers' `BertForSequenceClassification`: the pretrained pooler (dense + tanh on
//! the first token, frozen), dropout, then a trainable linear classifier (PEFT's `modules_to_save`).

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
}
