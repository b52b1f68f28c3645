//! Frozen linear layer `y = x W^T + b`, PyTorch layout (`W` is `[out, in]`).
//!
//! The weight is frozen, so backward needs no saved input: `dx = dy W`. That is why a frozen linear
//! costs no activation memory (only an adapter beside it that trains does, see `adapters::lora`).

use super::flops::matmul;
use candle_core::{Result, Tensor};

#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// `x` is `[n, in]`; returns `[n, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = matmul(x, &self.weight.t()?)?;
        match &self.bias {
            Some(b) => match super::gpu::bias_add(&y, b)? {
                Some(y) => Ok(y),
                None => y.broadcast_add(b),
            },
            None => Ok(y),
        }
    }

    /// Input gradient only: the weight and bias are frozen.
    pub fn backward_input(&self, dy: &Tensor) -> Result<Tensor> {
        matmul(dy, &self.weight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{check, randn};

    #[test]
    fn input_gradient_matches_autograd() {
        let x = randn(&[6, 5], 21);
        let lin = Linear::new(randn(&[3, 5], 22), Some(randn(&[3], 23)));
        let dy = randn(&[6, 3], 24);
        let dx = lin.backward_input(&dy).unwrap();
        check(&[x], &dy, &[dx], |t| lin.forward(&t[0]), 1e-12);
    }
}
