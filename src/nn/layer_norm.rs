//! LayerNorm over the last dimension with frozen gamma/beta (as in llm.c's `layernorm_forward`,
//! backward reads back the normalised input and the per-row reciprocal std).

use crate::device::compute_dtype;
use candle_core::{Result, Tensor, D};

#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub gamma: Tensor,
    pub beta: Tensor,
    pub eps: f64,
}

pub struct LayerNormSaved {
    xhat: Tensor,
    rstd: Tensor,
}

impl LayerNorm {
    pub fn new(gamma: Tensor, beta: Tensor, eps: f64) -> Self {
        Self { gamma, beta, eps }
    }

    /// `x` is `[n, c]`.
    pub fn forward(&self, x: &Tensor, save: bool) -> Result<(Tensor, Option<LayerNormSaved>)> {
        if let Some((y, xhat, rstd)) =
            super::cpu::layer_norm_fwd(x, &self.gamma, &self.beta, self.eps)?
        {
            return Ok((y, save.then_some(LayerNormSaved { xhat, rstd })));
        }
        if let Some((y, xhat, rstd)) =
            super::gpu::norm_fwd(x, &self.gamma, Some(&self.beta), self.eps)?
        {
            return Ok((y, save.then_some(LayerNormSaved { xhat, rstd })));
        }
        self.forward_reference(x, save)
    }

    /// The candle composition: the fallback, and the reference for the fused CPU and CUDA kernels.
    pub fn forward_reference(
        &self,
        x: &Tensor,
        save: bool,
    ) -> Result<(Tensor, Option<LayerNormSaved>)> {
        // Statistics in f32 for half-precision activations; xhat is kept in the activations' dtype.
        let cdt = compute_dtype(x.dtype());
        let xc = {
            let x = x.to_dtype(cdt)?;
            x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?
        };
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let rstd = (var + self.eps)?.sqrt()?.recip()?;
        let xhat = xc.broadcast_mul(&rstd)?;
        drop(xc);
        let y = xhat
            .broadcast_mul(&self.gamma.to_dtype(cdt)?)?
            .broadcast_add(&self.beta.to_dtype(cdt)?)?
            .to_dtype(x.dtype())?;
        let xhat = xhat.to_dtype(x.dtype())?;
        Ok((y, save.then_some(LayerNormSaved { xhat, rstd })))
    }
}

impl LayerNormSaved {
    /// `dx = rstd * (g - mean(g) - xhat * mean(g * xhat))` with `g = dy * gamma`.
    pub fn backward(&self, ln: &LayerNorm, dy: &Tensor) -> Result<Tensor> {
        if let Some(dx) = super::cpu::layer_norm_bwd(dy, &self.xhat, &self.rstd, &ln.gamma)? {
            return Ok(dx);
        }
        if let Some(dx) = super::gpu::norm_bwd(dy, &self.xhat, &self.rstd, &ln.gamma, true)? {
            return Ok(dx);
        }
        self.backward_reference(ln, dy)
    }

    pub fn backward_reference(&self, ln: &LayerNorm, dy: &Tensor) -> Result<Tensor> {
        let cdt = compute_dtype(dy.dtype());
        let xhat = self.xhat.to_dtype(cdt)?;
        let g = dy.to_dtype(cdt)?.broadcast_mul(&ln.gamma.to_dtype(cdt)?)?;
        let g_mean = g.mean_keepdim(D::Minus1)?;
        let gx_mean = (&g * &xhat)?.mean_keepdim(D::Minus1)?;
        let dx = g
            .broadcast_sub(&g_mean)?
            .sub(&xhat.broadcast_mul(&gx_mean)?)?;
        dx.broadcast_mul(&self.rstd.to_dtype(cdt)?)?
            .to_dtype(dy.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{check, randn};
    use candle_core::DType;

    #[test]
    fn backward_matches_autograd_and_finite_differences() {
        let x = randn(&[5, 7], 1).affine(3.0, 0.5).unwrap();
        let gamma = randn(&[7], 2);
        let beta = randn(&[7], 3);
        let ln = LayerNorm::new(gamma.clone(), beta.clone(), 1e-5);
        let dy = randn(&[5, 7], 4);
        let (_, saved) = ln.forward(&x, true).unwrap();
        let dx = saved.unwrap().backward(&ln, &dy).unwrap();
        check(&[x], &dy, &[dx], |t| Ok(ln.forward(&t[0], false)?.0), 1e-10);
    }

    #[test]
    fn fused_cpu_kernels_match_the_composition() {
        let x = randn(&[33, 40], 6)
            .affine(2.0, 1.0)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let ln = LayerNorm::new(
            randn(&[40], 7).to_dtype(DType::F32).unwrap(),
            randn(&[40], 8).to_dtype(DType::F32).unwrap(),
            1e-12,
        );
        let dy = randn(&[33, 40], 9).to_dtype(DType::F32).unwrap();
        let (y1, s1) = ln.forward(&x, true).unwrap();
        let (y2, s2) = ln.forward_reference(&x, true).unwrap();
        assert!(crate::nn::gradcheck::max_abs_diff(&y1, &y2) < 1e-5);
        let d1 = s1.unwrap().backward(&ln, &dy).unwrap();
        let d2 = s2.unwrap().backward_reference(&ln, &dy).unwrap();
        assert!(crate::nn::gradcheck::max_abs_diff(&d1, &d2) < 1e-4);
    }

    #[test]
    fn forward_normalises_rows() {
        let x = randn(&[3, 16], 5).affine(4.0, 2.0).unwrap();
        let ones = Tensor::ones(16, DType::F64, &candle_core::Device::Cpu).unwrap();
        let zeros = Tensor::zeros(16, DType::F64, &candle_core::Device::Cpu).unwrap();
        let (y, _) = LayerNorm::new(ones, zeros, 0.0).forward(&x, false).unwrap();
        let mean: Vec<f64> = y
            .mean_keepdim(1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let var: Vec<f64> = y
            .sqr()
            .unwrap()
            .mean_keepdim(1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (m, v) in mean.iter().zip(&var) {
            assert!(
                m.abs() < 1e-12 && (v - 1.0).abs() < 1e-12,
                "mean {m} var {v}"
            );
        }
    }
}
