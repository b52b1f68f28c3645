//! BERT input embeddings: word + absolute position + token type, then LayerNorm and dropout.
//!
//! Forward only. The embedding tables are frozen and the inputs are integer ids, so nothing below the
//! lowest trainable adapter ever needs a gradient here: the trainer never calls backward on this.

use super::layer_norm::LayerNorm;
use super::{Dropout, Pass};
use candle_core::{Result, Tensor};

#[derive(Clone, Debug)]
pub struct Embeddings {
    pub word: Tensor,
    pub position: Tensor,
    pub token_type: Tensor,
    pub layer_norm: LayerNorm,
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
        let types = token_type_ids.flatten_all()?;
        let positions = Tensor::arange(0u32, t as u32, input_ids.device())?.repeat(b)?;
        let x = self
            .word
            .index_select(&ids, 0)?
            .add(&self.position.index_select(&positions, 0)?)?
            .add(&self.token_type.index_select(&types, 0)?)?;
        let (x, _) = self.layer_norm.forward(&x, false)?;
        let (x, _) = self.dropout.forward(&x, pass, false)?;
        Ok(x)
    }
}
