//! Inverted dropout with masks drawn from a seeded host RNG.
//!
//! The saved mask is a `u8` tensor (a quarter of an f32 activation), so dropout costs little memory
//! for backward, and runs are reproducible from the seed on any device.

use super::Pass;
use candle_core::{Result, Tensor};
use rand::RngCore;

#[derive(Clone, Copy, Debug)]
pub struct Dropout {
    pub p: f64,
}

/// What backward needs: the keep mask (1 = kept) and the scale `1 / (1 - p)`.
pub struct DropoutSaved {
    keep: Tensor,
    scale: f64,
}

impl Dropout {
    pub fn new(p: f64) -> Self {
        Self { p }
    }

    /// Returns `x` unchanged (and nothing saved) in inference or when `p == 0`.
    pub fn forward(
        &self,
        x: &Tensor,
        pass: &mut Pass,
        save: bool,
    ) -> Result<(Tensor, Option<DropoutSaved>)> {
        if !pass.training || self.p <= 0.0 {
            return Ok((x.clone(), None));
        }
        if let Some((y, keep)) = super::cpu::dropout_fwd(x, self.p, pass.rng)? {
            let scale = 1.0 / (1.0 - self.p);
            return Ok((y, save.then_some(DropoutSaved { keep, scale })));
        }
        let threshold = ((1.0 - self.p) * u32::MAX as f64) as u32;
        let n = x.elem_count();
        let mut mask = Vec::with_capacity(n);
        for _ in 0..n {
            mask.push((pass.rng.next_u32() < threshold) as u8);
        }
        let keep = Tensor::from_vec(mask, x.shape(), x.device())?;
        let scale = 1.0 / (1.0 - self.p);
        let y = (x * keep.to_dtype(x.dtype())?)?.affine(scale, 0.0)?;
        Ok((y, save.then_some(DropoutSaved { keep, scale })))
    }
}

impl DropoutSaved {
    pub fn backward(&self, dy: &Tensor) -> Result<Tensor> {
        if let Some(dx) = super::cpu::dropout_bwd(dy, &self.keep, self.scale)? {
            return Ok(dx);
        }
        (dy * self.keep.to_dtype(dy.dtype())?)?.affine(self.scale, 0.0)
    }
}

/// Backward through an optional dropout (None = it was the identity).
pub fn backward_opt(saved: &Option<DropoutSaved>, dy: Tensor) -> Result<Tensor> {
    match saved {
        Some(s) => s.backward(&dy),
        None => Ok(dy),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{check, randn};
    use rand::SeedableRng;

    #[test]
    fn same_seed_same_mask_and_rate_close_to_p() {
        let x = Tensor::ones(
            (200, 50),
            candle_core::DType::F64,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let d = Dropout::new(0.25);
        let run = |seed| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut pass = Pass {
                training: true,
                rng: &mut rng,
            };
            d.forward(&x, &mut pass, false).unwrap().0
        };
        let (a, b, c) = (run(1), run(1), run(2));
        assert_eq!(crate::nn::gradcheck::max_abs_diff(&a, &b), 0.0);
        assert!(crate::nn::gradcheck::max_abs_diff(&a, &c) > 0.0);
        let v: Vec<f64> = a.flatten_all().unwrap().to_vec1().unwrap();
        let dropped = v.iter().filter(|&&x| x == 0.0).count() as f64 / v.len() as f64;
        assert!((dropped - 0.25).abs() < 0.02, "dropped {dropped}");
        // Kept values are scaled so the expectation is unchanged.
        assert!(v
            .iter()
            .all(|&x| x == 0.0 || (x - 1.0 / 0.75).abs() < 1e-12));
    }

    #[test]
    fn backward_matches_autograd() {
        let x = randn(&[10, 7], 61);
        let dy = randn(&[10, 7], 62);
        let d = Dropout::new(0.5);
        let fwd = |x: &Tensor, save| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(5);
            let mut pass = Pass {
                training: true,
                rng: &mut rng,
            };
            d.forward(x, &mut pass, save).unwrap()
        };
        let dx = fwd(&x, true).1.unwrap().backward(&dy).unwrap();
        check(&[x], &dy, &[dx], |t| Ok(fwd(&t[0], false).0), 1e-12);
    }
}
