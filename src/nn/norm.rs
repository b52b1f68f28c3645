//! LayerNorm and RMSNorm over the last dimension with frozen parameters (as in llm.c's
//! `layernorm_forward`). RMSNorm (LLaMA) is LayerNorm without the centring and the bias: `y = x *
//! rsqrt(mean(x^2) + eps) * w`. Either way backward reads back the same two things, the
//! normalised input and the per-row reciprocal std (or RMS). An RMSNorm whose weight has no entry
//! near zero keeps its output instead of the normalised input (`xhat = y / w`): the adapted
//! projections after it keep that output for their gradients anyway, so a layer stores one
//! `[rows, c]` tensor where it stored two.

use crate::device::compute_dtype;
use candle_core::{DType, Result, Tensor, D};

/// LayerNorm (`bias` Some: centred, then scaled and shifted) or RMSNorm (`bias` None).
#[derive(Clone, Debug)]
pub struct Norm {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub eps: f64,
    /// RMSNorm with every `|w| >= 1e-6`, so that `y / w` gives back `xhat` to the activations'
    /// precision: backward may then read the output.
    invertible: bool,
}

pub struct NormSaved {
    /// `xhat`, or the output `y` where `from_output`.
    rows: Tensor,
    from_output: bool,
    rstd: Tensor,
}

impl super::offload::SavedTensors for NormSaved {
    fn each_tensor(&mut self, f: &mut dyn FnMut(&mut Tensor)) {
        f(&mut self.rows);
        f(&mut self.rstd);
    }
}

impl Norm {
    /// LayerNorm with weight (gamma) and bias (beta).
    pub fn layer(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self {
            weight,
            bias: Some(bias),
            eps,
            invertible: false,
        }
    }

    /// RMSNorm with its weight (read once here, to see whether backward may read the output).
    pub fn rms(weight: Tensor, eps: f64) -> Self {
        let smallest = weight
            .abs()
            .and_then(|w| w.min_all())
            .and_then(|m| m.to_dtype(DType::F32))
            .and_then(|m| m.to_scalar::<f32>());
        Self {
            weight,
            bias: None,
            eps,
            invertible: smallest.is_ok_and(|m| m >= 1e-6),
        }
    }

    /// Whether the rows are centred (LayerNorm).
    fn centred(&self) -> bool {
        self.bias.is_some()
    }

    /// Whether a forward on `dtype` activations keeps its output for backward, not `xhat` (f16's
    /// narrow range could flush small outputs to zero).
    pub fn keeps_output(&self, dtype: DType) -> bool {
        self.invertible && dtype != DType::F16
    }

    /// What a forward keeps for backward, from its output, `xhat` (where computed) and `rstd`.
    fn saved(&self, y: &Tensor, xhat: Option<Tensor>, rstd: Tensor) -> Result<NormSaved> {
        let from_output = self.keeps_output(y.dtype());
        let rows = match (from_output, xhat) {
            (true, _) => y.clone(),
            (false, Some(xhat)) => xhat,
            (false, None) => candle_core::bail!("norm forward kept no xhat"),
        };
        Ok(NormSaved {
            rows,
            from_output,
            rstd,
        })
    }

    /// `x` is `[rows, c]`.
    pub fn forward(&self, x: &Tensor, save: bool) -> Result<(Tensor, Option<NormSaved>)> {
        // The fused kernels write xhat only when backward will read it.
        let want_xhat = save && !self.keeps_output(x.dtype());
        let (w, eps) = (&self.weight, self.eps);
        let fused = match &self.bias {
            Some(b) => super::cpu::layer_norm_fwd(x, w, b, eps, want_xhat)?,
            None => super::cpu::rms_norm_fwd(x, w, eps, want_xhat)?,
        };
        let fused = match fused {
            Some(out) => Some(out),
            None => super::gpu::norm_fwd(x, w, self.bias.as_ref(), eps, want_xhat)?,
        };
        let Some((y, xhat, rstd)) = fused else {
            return self.forward_reference(x, save);
        };
        let saved = match save {
            true => Some(self.saved(&y, xhat, rstd)?),
            false => None,
        };
        Ok((y, saved))
    }

    /// The candle composition: the fallback, and the reference for the fused CPU and CUDA kernels.
    pub fn forward_reference(&self, x: &Tensor, save: bool) -> Result<(Tensor, Option<NormSaved>)> {
        // Statistics in f32 for half-precision activations; xhat is kept in the activations' dtype.
        let cdt = compute_dtype(x.dtype());
        let xc = {
            let x = x.to_dtype(cdt)?;
            if self.centred() {
                x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?
            } else {
                x
            }
        };
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let rstd = (var + self.eps)?.sqrt()?.recip()?;
        let xhat = xc.broadcast_mul(&rstd)?;
        drop(xc);
        let mut y = xhat.broadcast_mul(&self.weight.to_dtype(cdt)?)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&b.to_dtype(cdt)?)?;
        }
        let y = y.to_dtype(x.dtype())?;
        let xhat = xhat.to_dtype(x.dtype())?;
        let saved = match save {
            true => Some(self.saved(&y, Some(xhat), rstd)?),
            false => None,
        };
        Ok((y, saved))
    }
}

impl NormSaved {
    /// The forward's output: kept, or `xhat * weight (+ bias)` (in f32 on the kept rows, so in
    /// half precision it may differ from the forward's in the last bit).
    pub fn output(&self, norm: &Norm) -> Result<Tensor> {
        if self.from_output {
            return Ok(self.rows.clone());
        }
        let cdt = compute_dtype(self.rows.dtype());
        let mut y = self
            .rows
            .to_dtype(cdt)?
            .broadcast_mul(&norm.weight.to_dtype(cdt)?)?;
        if let Some(b) = &norm.bias {
            y = y.broadcast_add(&b.to_dtype(cdt)?)?;
        }
        y.to_dtype(self.rows.dtype())
    }

    /// Input gradient only (the parameters are frozen): `dx = rstd * (g - mean(g) - xhat *
    /// mean(g * xhat))` with `g = dy * weight`, without the `mean(g)` term for RMSNorm.
    pub fn backward(&self, norm: &Norm, dy: &Tensor) -> Result<Tensor> {
        let (x, r, w, c, o) = (
            &self.rows,
            &self.rstd,
            &norm.weight,
            norm.centred(),
            self.from_output,
        );
        if let Some(dx) = super::cpu::norm_bwd(dy, x, r, w, c, o)? {
            return Ok(dx);
        }
        if let Some(dx) = super::gpu::norm_bwd(dy, x, r, w, c, o, None)? {
            return Ok(dx);
        }
        self.backward_reference(norm, dy)
    }

    /// `residual + backward(dy)`: the norm's input gradient joined with a residual branch's (a
    /// pre-norm block's skip connection), on CUDA in the norm's own kernel.
    pub fn backward_adding(&self, norm: &Norm, dy: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let (x, r, w) = (&self.rows, &self.rstd, &norm.weight);
        let (c, o) = (norm.centred(), self.from_output);
        if let Some(dx) = super::gpu::norm_bwd(dy, x, r, w, c, o, Some(residual))? {
            return Ok(dx);
        }
        super::add(residual, &self.backward(norm, dy)?)
    }

    pub fn backward_reference(&self, norm: &Norm, dy: &Tensor) -> Result<Tensor> {
        let cdt = compute_dtype(dy.dtype());
        let w = norm.weight.to_dtype(cdt)?;
        let xhat = self.rows.to_dtype(cdt)?;
        let xhat = if self.from_output {
            xhat.broadcast_div(&w)?
        } else {
            xhat
        };
        let g = dy.to_dtype(cdt)?.broadcast_mul(&w)?;
        let gx_mean = (&g * &xhat)?.mean_keepdim(D::Minus1)?;
        let g = if norm.centred() {
            g.broadcast_sub(&g.mean_keepdim(D::Minus1)?)?
        } else {
            g
        };
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

    fn layer(c: usize, seed: u64) -> Norm {
        Norm::layer(randn(&[c], seed), randn(&[c], seed + 1), 1e-5)
    }

    #[test]
    fn layer_norm_backward_matches_autograd_and_finite_differences() {
        let x = randn(&[5, 7], 1).affine(3.0, 0.5).unwrap();
        let ln = layer(7, 2);
        let dy = randn(&[5, 7], 4);
        let (_, saved) = ln.forward(&x, true).unwrap();
        let dx = saved.unwrap().backward(&ln, &dy).unwrap();
        check(&[x], &dy, &[dx], |t| Ok(ln.forward(&t[0], false)?.0), 1e-10);
    }

    #[test]
    fn rms_norm_backward_matches_autograd_and_finite_differences() {
        let x = randn(&[5, 7], 1).affine(3.0, 0.5).unwrap();
        let norm = Norm::rms(randn(&[7], 2), 1e-6);
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
    fn rms_norm_keeps_its_output_only_where_the_weight_inverts() {
        let x = randn(&[5, 7], 1).affine(3.0, 0.5).unwrap();
        let dy = randn(&[5, 7], 4);
        let mut w: Vec<f64> = randn(&[7], 2).to_vec1().unwrap();
        let invertible = Norm::rms(Tensor::new(w.as_slice(), x.device()).unwrap(), 1e-6);
        w[3] = 0.0; // xhat[3] cannot come back from y[3] = 0
        let singular = Norm::rms(Tensor::new(w.as_slice(), x.device()).unwrap(), 1e-6);
        for (norm, keeps_output) in [(invertible, true), (singular, false)] {
            let (y, saved) = norm.forward(&x, true).unwrap();
            let saved = saved.unwrap();
            assert_eq!(saved.from_output, keeps_output);
            if keeps_output {
                assert_eq!(max_abs_diff(&saved.rows, &y), 0.0);
            }
            let dx = saved.backward(&norm, &dy).unwrap();
            let reference = saved.backward_reference(&norm, &dy).unwrap();
            assert!(max_abs_diff(&dx, &reference) < 1e-12);
            check(
                std::slice::from_ref(&x),
                &dy,
                &[dx],
                |t| Ok(norm.forward(&t[0], false)?.0),
                1e-10,
            );
        }
        let f16 = x.to_dtype(DType::F16).unwrap();
        let norm = Norm::rms(randn(&[7], 2).to_dtype(DType::F16).unwrap(), 1e-6);
        assert!(!norm.forward(&f16, true).unwrap().1.unwrap().from_output);
    }

    #[test]
    fn fused_cpu_kernels_match_the_composition() {
        let f32 = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        let x = f32(randn(&[33, 40], 6).affine(2.0, 1.0).unwrap());
        let dy = f32(randn(&[33, 40], 9));
        let layer = Norm::layer(f32(randn(&[40], 7)), f32(randn(&[40], 8)), 1e-12);
        let rms = Norm::rms(f32(randn(&[40], 7)), 1e-5);
        let w = f32(randn(&[40], 7)).to_vec1::<f32>().unwrap();
        let w: Vec<f32> = w
            .iter()
            .enumerate()
            .map(|(i, &v)| if i == 5 { 0.0 } else { v })
            .collect();
        let rms_singular = Norm::rms(Tensor::new(w.as_slice(), x.device()).unwrap(), 1e-5);
        assert!(rms.keeps_output(DType::F32) && !rms_singular.keeps_output(DType::F32));
        for norm in [layer, rms, rms_singular] {
            let (y1, s1) = norm.forward(&x, true).unwrap();
            let (y2, s2) = norm.forward_reference(&x, true).unwrap();
            assert!(max_abs_diff(&y1, &y2) < 1e-5);
            let d1 = s1.unwrap().backward(&norm, &dy).unwrap();
            let d2 = s2.unwrap().backward_reference(&norm, &dy).unwrap();
            assert!(max_abs_diff(&d1, &d2) < 1e-4);
        }
    }

    /// Per-row mean and mean square of `y`.
    fn row_moments(y: &Tensor) -> Vec<(f64, f64)> {
        let v = |t: Tensor| -> Vec<f64> { t.flatten_all().unwrap().to_vec1().unwrap() };
        let mean = v(y.mean_keepdim(1).unwrap());
        let ms = v(y.sqr().unwrap().mean_keepdim(1).unwrap());
        mean.into_iter().zip(ms).collect()
    }

    #[test]
    fn layer_norm_gives_zero_mean_unit_variance_rows() {
        let x = randn(&[3, 16], 5).affine(4.0, 2.0).unwrap();
        let ones = Tensor::ones(16, DType::F64, &candle_core::Device::Cpu).unwrap();
        let (y, _) = Norm::layer(ones.clone(), ones.zeros_like().unwrap(), 0.0)
            .forward(&x, false)
            .unwrap();
        for (m, v) in row_moments(&y) {
            assert!(
                m.abs() < 1e-12 && (v - 1.0).abs() < 1e-12,
                "mean {m} var {v}"
            );
        }
    }

    #[test]
    fn rms_norm_gives_unit_rms_rows() {
        let x = randn(&[3, 16], 5).affine(4.0, 2.0).unwrap();
        let ones = Tensor::ones(16, DType::F64, &candle_core::Device::Cpu).unwrap();
        let (y, _) = Norm::rms(ones, 0.0).forward(&x, false).unwrap();
        for (m, ms) in row_moments(&y) {
            // The rows are not centred: a nonzero mean, a mean square of 1.
            assert!(
                m.abs() > 1e-3 && (ms - 1.0).abs() < 1e-12,
                "mean {m} mean square {ms}"
            );
        }
    }
}
