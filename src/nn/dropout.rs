//! Inverted dropout with masks drawn from the run's seeded host RNG.
//!
//! The host RNG gives one seed per [`MASK_CHUNK`] elements; within a chunk, element `k`'s bits are
//! the `k`-th output of SplitMix64 started at that seed. Every path computes exactly that: the
//! host in parallel over chunks (`cpu::dropout_fwd`, or [`host_mask`] for other dtypes), a CUDA
//! kernel in closed form (`gpu::dropout_fwd`), so the masks, and a run, are the same on any
//! device and thread count, and the host draws one number per 4096 elements, not one per element.
//!
//! Backward redraws the mask from the pass's seeds (one `u64` per 4096 elements) with the same
//! kernel, so dropout keeps no mask for backward.

use super::Pass;
use candle_core::{Result, Tensor};
use rand::RngCore;
use rayon::prelude::*;

/// Elements per seed.
pub const MASK_CHUNK: usize = 4096;

/// An element is kept when its 32 random bits fall below this.
pub fn keep_threshold(p: f64) -> u32 {
    ((1.0 - p) * u32::MAX as f64) as u32
}

/// SplitMix64: a tiny, fast generator, plenty for dropout masks; its `k`-th output has a closed
/// form (state `seed + k * gamma`), which the CUDA kernel uses.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The counter's increment per output.
    pub const STEP: u64 = 0x9E37_79B9_7F4A_7C15;

    #[inline]
    pub fn next_u32(&mut self) -> u32 {
        self.0 = self.0.wrapping_add(Self::STEP);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 32) as u32
    }
}

/// The seeds of an `n`-element mask: one per [`MASK_CHUNK`], drawn from the run's RNG.
pub fn mask_seeds(rng: &mut impl RngCore, n: usize) -> Vec<u64> {
    (0..n.div_ceil(MASK_CHUNK))
        .map(|_| rng.next_u64())
        .collect()
}

/// Dropout's keep decisions for elements `start..start + keep.len()` of the mask [`host_mask`]
/// draws, without drawing the elements before them: SplitMix64's state is a counter, so
/// element `i` of a chunk is the generator's `(i + 1)`-th output from the chunk's seed (as
/// `kernels.cu` draws it). The fused CPU attention redraws a row's mask in backward this way
/// instead of keeping a `[b, heads, t, t]` mask.
pub fn keep_range(seeds: &[u64], start: usize, threshold: u32, keep: &mut [bool]) {
    let mut done = 0;
    while done < keep.len() {
        let e = start + done;
        let (chunk, pos) = (e / MASK_CHUNK, e % MASK_CHUNK);
        let len = (MASK_CHUNK - pos).min(keep.len() - done);
        let mut r =
            SplitMix64(seeds[chunk].wrapping_add((pos as u64).wrapping_mul(SplitMix64::STEP)));
        for k in &mut keep[done..done + len] {
            *k = r.next_u32() < threshold;
        }
        done += len;
    }
}

/// The keep-mask of `n` elements for `seeds` (one per chunk), on the host.
pub fn host_mask(seeds: &[u64], n: usize, threshold: u32) -> Vec<u8> {
    let mut mask = vec![0u8; n];
    mask.par_chunks_mut(MASK_CHUNK)
        .zip(seeds.par_iter())
        .for_each(|(m, &seed)| {
            let mut r = SplitMix64(seed);
            for k in m.iter_mut() {
                *k = (r.next_u32() < threshold) as u8;
            }
        });
    mask
}

#[derive(Clone, Copy, Debug)]
pub struct Dropout {
    pub p: f64,
}

/// What backward needs: the pass's draw, from which it redraws the mask (no mask is stored).
pub struct DropoutSaved {
    draw: MaskDraw,
}

/// One pass's draw of an `n`-element mask: its seeds (see [`mask_seeds`]), the keep threshold
/// and the scale of a kept value.
pub struct MaskDraw {
    pub seeds: Vec<u64>,
    pub threshold: u32,
    pub scale: f64,
}

impl Dropout {
    pub fn new(p: f64) -> Self {
        Self { p }
    }

    /// The mask of `n` elements this pass draws from the run's RNG; None (and nothing drawn) in
    /// inference or when `p == 0`. The fused CPU attention keeps the draw and expands it where
    /// it needs it (see [`keep_range`]).
    pub fn draw(&self, pass: &mut Pass, n: usize) -> Option<MaskDraw> {
        (pass.training && self.p > 0.0).then(|| MaskDraw {
            seeds: mask_seeds(pass.rng, n),
            threshold: keep_threshold(self.p),
            scale: 1.0 / (1.0 - self.p),
        })
    }

    /// Returns `x` unchanged (and nothing saved) in inference or when `p == 0`.
    pub fn forward(
        &self,
        x: &Tensor,
        pass: &mut Pass,
        save: bool,
    ) -> Result<(Tensor, Option<DropoutSaved>)> {
        let Some(draw) = self.draw(pass, x.elem_count()) else {
            return Ok((x.clone(), None));
        };
        let y = draw.apply(x)?;
        Ok((y, save.then_some(DropoutSaved { draw })))
    }
}

impl MaskDraw {
    /// `x * keep * scale` with this draw's mask: the fused CPU or CUDA kernel, else the host's
    /// mask (other dtypes, non-contiguous tensors), the same mask either way.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (seeds, threshold, scale) = (&self.seeds, self.threshold, self.scale);
        if let Some(y) = super::cpu::dropout_fwd(x, seeds, threshold, scale as f32)? {
            return Ok(y);
        }
        if let Some(y) = super::gpu::dropout_fwd(x, seeds, threshold, scale as f32)? {
            return Ok(y);
        }
        let keep = host_mask(seeds, x.elem_count(), threshold);
        let keep = Tensor::from_vec(keep, x.shape(), x.device())?;
        (x * keep.to_dtype(x.dtype())?)?.affine(scale, 0.0)
    }
}

impl DropoutSaved {
    /// `dx = dy * keep * scale`, the mask redrawn from the forward's seeds.
    pub fn backward(&self, dy: &Tensor) -> Result<Tensor> {
        self.draw.apply(dy)
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
            let mut pass = Pass::training(&mut rng);
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

    /// Any range of the mask, redrawn from the seeds alone, is that range of the full mask:
    /// within a chunk, from a chunk's start, and across chunk edges.
    #[test]
    fn a_range_of_the_mask_redraws_the_same_values() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let n = 3 * MASK_CHUNK + 500;
        let seeds = mask_seeds(&mut rng, n);
        let threshold = keep_threshold(0.3);
        let full = host_mask(&seeds, n, threshold);
        assert!(full.contains(&0) && full.contains(&1));
        for (start, len) in [
            (0, 10),
            (4090, 20),
            (MASK_CHUNK, 1),
            (100, 2 * MASK_CHUNK + 7),
        ] {
            let mut keep = vec![false; len];
            keep_range(&seeds, start, threshold, &mut keep);
            let expected: Vec<bool> = full[start..start + len].iter().map(|&k| k == 1).collect();
            assert_eq!(keep, expected, "elements {start}..{}", start + len);
        }
    }

    /// The mask depends on the seed alone: the fused f32 path, the host path of other dtypes and
    /// a non-contiguous input give the same mask, and backward redraws it on each (the CUDA
    /// kernel is held to it by `self-test`).
    #[test]
    fn mask_is_the_same_on_every_path() {
        let x = randn(&[3, 5000], 7)
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        let mask = |x: &Tensor| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(9);
            let mut pass = Pass::training(&mut rng);
            let (y, s) = Dropout::new(0.3).forward(x, &mut pass, true).unwrap();
            let kept = |t: Tensor| -> Vec<u8> {
                let t = t.ne(0.0).unwrap();
                t.flatten_all().unwrap().to_vec1::<u8>().unwrap()
            };
            // Forward's mask (x has no zeros), and the one backward redraws from the seeds.
            let forward = kept(y);
            let redrawn = kept(s.unwrap().backward(&x.ones_like().unwrap()).unwrap());
            assert_eq!(forward, redrawn, "backward redraws forward's mask");
            forward
        };
        let f32_mask = mask(&x);
        assert_eq!(
            f32_mask,
            mask(&x.to_dtype(candle_core::DType::F64).unwrap())
        );
        assert_eq!(
            f32_mask,
            mask(&x.to_dtype(candle_core::DType::BF16).unwrap())
        );
        // A transposed view: the mask follows the logical (row-major) order.
        let xt = x.t().unwrap().contiguous().unwrap().t().unwrap();
        assert!(!xt.is_contiguous());
        assert_eq!(f32_mask, mask(&xt));
    }

    #[test]
    fn backward_matches_autograd() {
        let x = randn(&[10, 7], 61);
        let dy = randn(&[10, 7], 62);
        let d = Dropout::new(0.5);
        let fwd = |x: &Tensor, save| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(5);
            let mut pass = Pass::training(&mut rng);
            d.forward(x, &mut pass, save).unwrap()
        };
        let dx = fwd(&x, true).1.unwrap().backward(&dy).unwrap();
        check(&[x], &dy, &[dx], |t| Ok(fwd(&t[0], false).0), 1e-12);
    }
}
