//! GELU, two forms: erf (BERT's `gelu`, `y = x * Phi(x)`) and the tanh approximation (GPT-2's
//! `gelu_new`). Checkpoints were trained with one or the other, so the model picks; backward
//! needs the input either way.

use candle_core::{Result, Tensor};

/// Which GELU a checkpoint uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GeluKind {
    /// `x * Phi(x)`, exact (BERT's `gelu`).
    #[default]
    Erf,
    /// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))` (GPT-2's `gelu_new`, `gelu_pytorch_tanh`).
    Tanh,
}

pub struct GeluSaved {
    x: Tensor,
    kind: GeluKind,
}

impl super::offload::SavedTensors for GeluSaved {
    fn each_tensor(&mut self, f: &mut dyn FnMut(&mut Tensor)) {
        f(&mut self.x)
    }
}

/// The erf form, as BERT uses.
pub fn forward(x: &Tensor, save: bool) -> Result<(Tensor, Option<GeluSaved>)> {
    forward_kind(x, GeluKind::Erf, save)
}

pub fn forward_kind(x: &Tensor, kind: GeluKind, save: bool) -> Result<(Tensor, Option<GeluSaved>)> {
    let fused = match kind {
        GeluKind::Erf => super::cpu::gelu_fwd(x)?,
        GeluKind::Tanh => super::cpu::gelu_tanh_fwd(x)?,
    };
    let fused = match fused {
        Some(y) => Some(y),
        None => super::gpu::gelu_fwd(x, kind == GeluKind::Tanh)?,
    };
    let y = match fused {
        Some(y) => y,
        None => forward_reference(x, kind)?,
    };
    Ok((y, save.then(|| GeluSaved { x: x.clone(), kind })))
}

/// The candle composition (candle's `gelu` is the tanh approximation).
pub fn forward_reference(x: &Tensor, kind: GeluKind) -> Result<Tensor> {
    match kind {
        GeluKind::Erf => x.gelu_erf(),
        GeluKind::Tanh => x.gelu(),
    }
}

impl GeluSaved {
    /// What [`forward_kind`] keeps for input `x`, without computing the output (an input
    /// recomputed in backward).
    pub fn of(x: Tensor, kind: GeluKind) -> Self {
        Self { x, kind }
    }

    /// The forward's output, recomputed from the saved input (for the linear that reads it, which
    /// keeps no copy).
    pub fn output(&self) -> Result<Tensor> {
        Ok(forward_kind(&self.x, self.kind, false)?.0)
    }

    /// Erf: `dy * (Phi(x) + x * phi(x))`, `phi` the standard normal density. Tanh: `dy * (0.5 (1 +
    /// t) + 0.5 x (1 - t^2) u')` with `u = sqrt(2/pi) (x + 0.044715 x^3)`, `t = tanh(u)`. The
    /// fused kernels write the gradient over the saved input, which backward consumes, so no
    /// second feed-forward-wide tensor is allocated.
    pub fn backward(self, dy: &Tensor) -> Result<Tensor> {
        let tanh = self.kind == GeluKind::Tanh;
        let fused = if tanh {
            super::cpu::gelu_tanh_bwd_in_place(&self.x, dy)?
        } else {
            super::cpu::gelu_bwd_in_place(&self.x, dy)?
        };
        if fused || super::gpu::gelu_bwd_in_place(&self.x, dy, tanh)? {
            return Ok(self.x);
        }
        self.backward_reference(dy)
    }

    /// The candle composition (other devices; reference for the fused kernel). Computed in f32
    /// for half-precision activations, by blocks of rows to bound its temporaries.
    pub fn backward_reference(&self, dy: &Tensor) -> Result<Tensor> {
        let kind = self.kind;
        super::map_row_blocks(&[&self.x, dy], super::ROW_BLOCK_ELEMS, |t| {
            let out = t[1].dtype();
            let cdt = crate::device::compute_dtype(out);
            let (x, dy) = (t[0].to_dtype(cdt)?, t[1].to_dtype(cdt)?);
            match kind {
                GeluKind::Erf => erf_backward(&x, &dy)?.to_dtype(out),
                GeluKind::Tanh => tanh_backward(&x, &dy)?.to_dtype(out),
            }
        })
    }
}

fn erf_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let mut cdf = (x / std::f64::consts::SQRT_2)?.erf()?;
    cdf = cdf.affine(0.5, 0.5)?;
    let mut pdf = x.sqr()?.affine(-0.5, 0.0)?;
    pdf = pdf.exp()?;
    pdf = (x * pdf)?.affine(1.0 / (2.0 * std::f64::consts::PI).sqrt(), 0.0)?;
    dy * (cdf + pdf)?
}

fn tanh_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let t = (x + x.powf(3.0)?.affine(0.044715, 0.0)?)?
        .affine(c, 0.0)?
        .tanh()?;
    let du = x.sqr()?.affine(3.0 * 0.044715 * c, c)?;
    let left = t.affine(0.5, 0.5)?;
    let right = ((x * t.sqr()?.affine(-0.5, 0.5)?)? * du)?;
    dy * (left + right)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{check, randn};

    #[test]
    fn fused_cpu_kernels_match_the_composition() {
        let x = randn(&[64, 50], 13)
            .affine(4.0, 0.0)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        let dy = randn(&[64, 50], 14)
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        let (y, saved) = forward(&x, true).unwrap();
        assert!(crate::nn::gradcheck::max_abs_diff(&y, &x.gelu_erf().unwrap()) < 1e-6);
        let saved = saved.unwrap();
        let reference = saved.backward_reference(&dy).unwrap();
        let d = crate::nn::gradcheck::max_abs_diff(&saved.backward(&dy).unwrap(), &reference);
        assert!(d < 1e-6, "{d}");
    }

    #[test]
    fn backward_matches_autograd_and_finite_differences() {
        let x = randn(&[4, 9], 11).affine(3.0, 0.0).unwrap();
        let dy = randn(&[4, 9], 12);
        let dx = forward(&x, true).unwrap().1.unwrap().backward(&dy).unwrap();
        // Oracle built from erf directly (not gelu_erf), an independent formula.
        check(
            &[x],
            &dy,
            &[dx],
            |t| {
                let cdf = (&t[0] / std::f64::consts::SQRT_2)?
                    .erf()?
                    .affine(0.5, 0.5)?;
                &t[0] * cdf
            },
            1e-10,
        );
    }

    /// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))` from candle's tanh, for the oracle.
    fn gelu_tanh_oracle(x: &Tensor) -> candle_core::Result<Tensor> {
        let c = (2.0 / std::f64::consts::PI).sqrt();
        let u = (x + (x * x.sqr()?)?.affine(0.044715, 0.0)?)?.affine(c, 0.0)?;
        x * u.tanh()?.affine(0.5, 0.5)?
    }

    #[test]
    fn tanh_backward_matches_autograd_and_finite_differences() {
        let x = randn(&[4, 9], 15).affine(3.0, 0.0).unwrap();
        let dy = randn(&[4, 9], 16);
        let (y, saved) = forward_kind(&x, GeluKind::Tanh, true).unwrap();
        assert!(crate::nn::gradcheck::max_abs_diff(&y, &gelu_tanh_oracle(&x).unwrap()) < 1e-12);
        let dx = saved.unwrap().backward(&dy).unwrap();
        check(&[x], &dy, &[dx], |t| gelu_tanh_oracle(&t[0]), 1e-10);
    }

    #[test]
    fn tanh_fused_cpu_kernels_match_the_composition() {
        let f32 = |t: Tensor| t.to_dtype(candle_core::DType::F32).unwrap();
        let x = f32(randn(&[64, 50], 17).affine(5.0, 0.0).unwrap());
        let dy = f32(randn(&[64, 50], 18));
        let (y, saved) = forward_kind(&x, GeluKind::Tanh, true).unwrap();
        let r = forward_reference(&x, GeluKind::Tanh).unwrap();
        assert!(crate::nn::gradcheck::max_abs_diff(&y, &r) < 1e-5);
        let saved = saved.unwrap();
        let reference = saved.backward_reference(&dy).unwrap();
        let d = crate::nn::gradcheck::max_abs_diff(&saved.backward(&dy).unwrap(), &reference);
        assert!(d < 1e-5, "{d}");
    }

    #[test]
    fn the_two_forms_differ_slightly() {
        // Guards against one form silently standing in for the other.
        let x = randn(&[1, 200], 19).affine(3.0, 0.0).unwrap();
        let erf = forward_kind(&x, GeluKind::Erf, false).unwrap().0;
        let tanh = forward_kind(&x, GeluKind::Tanh, false).unwrap().0;
        let d = crate::nn::gradcheck::max_abs_diff(&erf, &tanh);
        assert!(d > 1e-5 && d < 1e-2, "{d}");
    }
}
