//! GELU, erf form (BERT's `gelu`): `y = x * Phi(x)`; backward needs the input.

use candle_core::{Result, Tensor};

pub struct GeluSaved {
    x: Tensor,
}

pub fn forward(x: &Tensor, save: bool) -> Result<(Tensor, Option<GeluSaved>)> {
    let y = match super::cpu::gelu_fwd(x)? {
        Some(y) => y,
        None => x.gelu_erf()?,
    };
    Ok((y, save.then(|| GeluSaved { x: x.clone() })))
}

impl GeluSaved {
    /// `dy * (Phi(x) + x * phi(x))`, `phi` the standard normal density.
    pub fn backward(&self, dy: &Tensor) -> Result<Tensor> {
        if let Some(dx) = super::cpu::gelu_bwd(&self.x, dy)? {
            return Ok(dx);
        }
        self.backward_reference(dy)
    }

    /// The candle composition (other devices; reference for the fused kernel).
    pub fn backward_reference(&self, dy: &Tensor) -> Result<Tensor> {
        let x = &self.x;
        let cdf = (x / std::f64::consts::SQRT_2)?.erf()?.affine(0.5, 0.5)?;
        let pdf = x
            .sqr()?
            .affine(-0.5, 0.0)?
            .exp()?
            .affine(1.0 / (2.0 * std::f64::consts::PI).sqrt(), 0.0)?;
        dy * (cdf + (x * pdf)?)?
    }
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
        let d = crate::nn::gradcheck::max_abs_diff(
            &saved.backward(&dy).unwrap(),
            &saved.backward_reference(&dy).unwrap(),
        );
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
}
