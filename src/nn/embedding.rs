//! Encoder input embeddings: word + absolute position (+ token type, for BERT and RoBERTa), then
//! LayerNorm and dropout.
//!
//! Forward only. The embedding tables are frozen and the inputs are integer ids, so nothing below the
//! lowest trainable adapter ever needs a gradient here: the trainer never calls backward on this.

use super::norm::Norm;
use super::{Dropout, Pass};
use candle_core::{DType, Result, Tensor, D};

#[derive(Clone, Debug)]
pub struct Embeddings {
    pub word: Tensor,
    pub position: Tensor,
    /// BERT's segment embeddings; None for models without token types (MPNet, DistilBERT). A
    /// one-row table (RoBERTa's) is added to every token, whatever its type id: such a model's
    /// only type is 0 (its tokenizer returns no type ids to transformers).
    pub token_type: Option<Tensor>,
    /// Positions as RoBERTa and MPNet count them (`create_position_ids_from_input_ids`): tokens
    /// at `pad + 1, pad + 2, ...`, padding at `pad`. None: `0, 1, ...` for every token (BERT).
    pub padding_idx: Option<u32>,
    pub layer_norm: Norm,
    pub dropout: Dropout,
}

impl Embeddings {
    /// `input_ids` and `token_type_ids` are `[batch, seq]` u32; returns `[batch*seq, hidden]`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        pass: &mut Pass,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let ids = input_ids.flatten_all()?;
        let positions = match self.padding_idx {
            None => Tensor::arange(0u32, t as u32, input_ids.device())?.repeat(b)?,
            Some(pad) => {
                // cumsum(is_token) * is_token + pad, as transformers computes it.
                let is_token = input_ids.ne(pad)?.to_dtype(DType::F32)?;
                let counted = (is_token.cumsum(D::Minus1)? * &is_token)?;
                (counted + pad as f64)?
                    .to_dtype(DType::U32)?
                    .flatten_all()?
            }
        };
        let mut x = self
            .word
            .index_select(&ids, 0)?
            .add(&self.position.index_select(&positions, 0)?)?;
        if let Some(table) = &self.token_type {
            x = if table.dim(0)? == 1 {
                x.broadcast_add(table)?
            } else {
                x.add(&table.index_select(&token_type_ids.flatten_all()?, 0)?)?
            };
        }
        let (x, _) = self.layer_norm.forward(&x, false)?;
        let (x, _) = self.dropout.forward(&x, pass, false)?;
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Padding-counted positions: tokens from `pad + 1` on, padding at `pad` (here 1): a row's
    /// output equals word + the position row picked by hand.
    #[test]
    fn positions_count_from_the_padding_index() {
        let dev = Device::Cpu;
        let word = Tensor::arange(0f32, 12.0, &dev)
            .unwrap()
            .reshape((6, 2))
            .unwrap();
        let position = (Tensor::arange(0f32, 16.0, &dev).unwrap() * 100.0)
            .unwrap()
            .reshape((8, 2))
            .unwrap();
        let ln = Norm::layer(
            Tensor::ones(2, DType::F32, &dev).unwrap(),
            Tensor::zeros(2, DType::F32, &dev).unwrap(),
            1e-5,
        );
        let e = Embeddings {
            word: word.clone(),
            position: position.clone(),
            token_type: None,
            padding_idx: Some(1),
            layer_norm: ln.clone(),
            dropout: Dropout::new(0.0),
        };
        let ids = Tensor::new(&[[3u32, 4, 1]], &dev).unwrap();
        let got = Pass::inference(|p| e.forward(&ids, &ids.zeros_like()?, p)).unwrap();
        let pick = |w: u32, p: u32| {
            let x = (word.get(w as usize)? + position.get(p as usize)?)?.unsqueeze(0)?;
            Ok::<_, candle_core::Error>(ln.forward(&x, false)?.0)
        };
        let want = Tensor::cat(
            &[
                pick(3, 2).unwrap(),
                pick(4, 3).unwrap(),
                pick(1, 1).unwrap(),
            ],
            0,
        )
        .unwrap();
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    }
}
