//! RMSNorm over the last dimension with a frozen weight (LLaMA): `y = x * rsqrt(mean(x^2) + eps) * w`.
//! Like LayerNorm without centring or bias, so backward reads back the same two things: the
//! normalised input and the per-row reciprocal RMS.

use crate::device::compute_dtype;
use candle_core::{Result, Tensor, D};

#[derive(Clone, Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

pub struct RmsNormSaved {
    xhat: Tensor,
    rstd: Tensor,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps }
    }

    /// `x` is `[rows, hidden]`.
    pub fn forward(&self, x: &Tensor, save: bool) -> Result<(Tensor, Option<RmsNormSaved>)> {
        if let Some((y, xhat, rstd)) = super::cpu::rms_norm_fwd(x, &self.weight, self.eps)? {
            return Ok((y, save.then_some(RmsNormSaved { xhat, rstd })));
        }
        if let Some((y, xhat, rstd)) = super::gpu::norm_fwd(x, &self.weight, None, self.eps)? {
            return Ok((y, save.then_some(RmsNormSaved { xhat, rstd })));
        }
        self.forward_reference(x, save)
    }

    /// The candle composition: the fallback, and the reference for the fused CPU and CUDA kernels.
    pub fn forward_reference(
        &self,
        x: &Tensor,
        save: bool,
    ) -> Result<(Tensor, Option<RmsNormSaved>)> {
        // Statistics in f32 for half-precision activations; xhat is kept in the activations' dtype.
        let cdt = compute_dtype(x.dtype());
        let xc = x.to_dtype(cdt)?;
        let ms = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let rstd = (ms + self.eps)?.sqrt()?.recip()?;
        let xhat = xc.broadcast_mul(&rstd)?;
        drop(xc);
        let y = xhat
            .broadcast_mul(&self.weight.to_dtype(cdt)?)?
            .to_dtype(x.dtype())?;
        let xhat = xhat.to_dtype(x.dtype())?;
        Ok((y, save.then_some(RmsNormSaved { xhat, rstd })))
    }
}

impl RmsNormSaved {
    /// Input gradient only (the weight is frozen): `dx = rstd * (g - xhat * mean(g * xhat))` with
    /// `g = dy * weight`.
    pub fn backward(&self, norm: &RmsNorm, dy: &Tensor) -> Result<Tensor> {
        if let Some(dx) = super::cpu::rms_norm_bwd(dy, &self.xhat, &self.rstd, &norm.weight)? {
            return Ok(dx);
        }
        if let Some(dx) = super::gpu::norm_bwd(dy, &self.xhat, &self.rstd, &norm.weight, false)? {
            return Ok(dx);
        }
        self.backward_reference(norm, dy)
    }

    pub fn backward_reference(&self, norm: &RmsNorm, dy: &Tensor) -> Result<Tensor> {
        let cdt = compute_dtype(dy.dtype());
        let xhat = self.xhat.to_dtype(cdt)?;
        let g = dy
            .to_dtype(cdt)?
            .broadcast_mul(&norm.weight.to_dtype(cdt)?)?;
        let gx_mean = (&g * &xhat)?.mean_keepdim(D::Minus1)?;
        g.sub(&xhat.broadcast_mul(&gx_mean)?)?
            .broadcast_mul(&self.rstd.to_dtype(cdt)?)?
            .to_dtype(dy.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{check, max_abs_diff, randn};
    use candle_core::DType;

    #[test]
    fn backward_matches_autograd_and_finite_differences() {
        let x = randn(&[5, 7], 1).affine(3.0, 0.5).unwrap();
        let norm = RmsNorm::new(randn(&[7], 2), 1e-6);
        let dy = randn(&[5, 7], 4);
        let (_, saved) = norm.forward(&x, true).unwrap();
        let dx = saved.unwrap().backward(&norm, &dy).unwrap();
        // Oracle written independently of forward_reference: x / sqrt(mean(x^2) + eps) * w.
        check(
            &[x],
            &dy,
            &[dx],
            |t| {
                let rms = (t[0].sqr()?.mean_keepdim(1)? + norm.eps)?.sqrt()?;
                t[0].broadcast_div(&rms)?.broadcast_mul(&norm.weight)
            },
            1e-10,
        );
    }

    #[test]
    fn fused_cpu_kernels_match_the_composition() {
        let f32 = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        let x = f32(randn(&[33, 40], 6).affine(2.0, 1.0).unwrap());
        let norm = RmsNorm::new(f32(randn(&[40], 7)), 1e-5);
        let dy = f32(randn(&[33, 40], 9));
        let (y1, s1) = norm.forward(&x, true).unwrap();
        let (y2, s2) = norm.forward_reference(&x, true).unwrap();
        assert!(max_abs_diff(&y1, &y2) < 1e-5);
        let d1 = s1.unwrap().backward(&norm, &dy).unwrap();
        let d2 = s2.unwrap().backward_reference(&norm, &dy).unwrap();
        assert!(max_abs_diff(&d1, &d2) < 1e-4);
    }

    #[test]
    fn forward_gives_unit_rms_rows() {
        let x = randn(&[3, 16], 5).affine(4.0, 2.0).unwrap();
        let ones = Tensor::ones(16, DType::F64, &candle_core::Device::Cpu).unwrap();
        let (y, _) = RmsNorm::new(ones, 0.0).forward(&x, false).unwrap();
        let ms: Vec<f64> = y
            .sqr()
            .unwrap()
            .mean_keepdim(1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for m in ms {
            assert!((m - 1.0).abs() < 1e-12, "mean square {m}");
        }
    }
}
