//! Rotary position embeddings in Hugging Face's `rotate_half` convention: dimension `i` pairs with
//! `i + head_dim/2` (transformers permutes Meta's interleaved q/k weights into this layout).
//!
//! The rotation is orthogonal and has no parameters, so backward needs nothing saved: it is the
//! same rotation by the negated angle (the transpose).

use super::{cpu, gpu};
use candle_core::{bail, Device, Result, Tensor, D};

#[derive(Clone, Debug)]
pub struct Rope {
    /// `[max_positions, head_dim/2]` f32 tables of `cos` and `sin` of `pos * inv_freq[i]`.
    cos: Tensor,
    sin: Tensor,
    head_dim: usize,
}

impl Rope {
    /// Default (unscaled) frequencies `inv_freq[i] = theta^(-2i / head_dim)`.
    pub fn new(head_dim: usize, max_positions: usize, theta: f64, device: &Device) -> Result<Self> {
        if !head_dim.is_multiple_of(2) {
            bail!("rope: head_dim {head_dim} is odd");
        }
        let inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| theta.powf(-((2 * i) as f64) / head_dim as f64) as f32)
            .collect();
        Self::from_inv_freq(&inv_freq, max_positions, device)
    }

    /// Tables from given frequencies (one per pair), for scaled variants (e.g. Llama 3's).
    /// The angle `pos * inv_freq` is formed in f32, as transformers does, so that long positions
    /// round the same way as the model saw in training.
    pub fn from_inv_freq(inv_freq: &[f32], max_positions: usize, device: &Device) -> Result<Self> {
        let half = inv_freq.len();
        if half == 0 {
            bail!("rope: empty frequency list");
        }
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            for &f in inv_freq {
                let angle = (pos as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_positions, half), device)?,
            sin: Tensor::from_vec(sin, (max_positions, half), device)?,
            head_dim: 2 * half,
        })
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Rotates `x` `[batch, heads, seq, head_dim]`, row `s` at position `start_pos + s`, into a
    /// contiguous `[batch, heads, seq, head_dim]`. `x` may be any view with head_dim contiguous,
    /// such as a projection's `[batch*seq, heads*head_dim]` output viewed as heads: one pass
    /// splits the heads out and rotates, a fused kernel on the GPU, `cpu::rope` on the CPU;
    /// elsewhere the view is copied first.
    pub fn apply(&self, x: &Tensor, start_pos: usize) -> Result<Tensor> {
        self.rotate_view(x, start_pos, false, false)
    }

    /// Gradient of [`Rope::apply`]: the inverse (transposed) rotation applied to `dy`.
    pub fn apply_backward(&self, dy: &Tensor, start_pos: usize) -> Result<Tensor> {
        self.rotate_view(dy, start_pos, true, false)
    }

    /// [`Rope::apply_backward`] with the heads merged back into the layers' `[batch*seq,
    /// heads*head_dim]` layout (one pass on the GPU and on the CPU).
    pub fn apply_backward_merged(&self, dy: &Tensor, start_pos: usize) -> Result<Tensor> {
        self.rotate_view(dy, start_pos, true, true)
    }

    /// The rotation (by the negated angle when `inverse`) of a `[batch, heads, seq, head_dim]`
    /// view, heads-major or (`merged`) as `[batch*seq, heads*head_dim]`: the fused kernel on the
    /// GPU, `cpu::rope` on the CPU, else the composition on a contiguous copy.
    fn rotate_view(&self, x: &Tensor, start: usize, inverse: bool, merged: bool) -> Result<Tensor> {
        self.check(x, start)?;
        if let Some(y) = gpu::rope(x, &self.cos, &self.sin, start, inverse, merged)? {
            return Ok(y);
        }
        let (b, h, t, d) = x.dims4()?;
        let (cos, sin) = self.tables(x, start)?;
        let y = match cpu::rope(x, &cos, &sin, inverse, merged)? {
            Some(y) => y,
            None => {
                let sin = if inverse { sin.neg()? } else { sin };
                let y = rotate(&x.contiguous()?, &cos, &sin)?;
                if merged {
                    y.transpose(1, 2)?
                } else {
                    y
                }
            }
        };
        if merged {
            y.reshape((b * t, h * d))
        } else {
            Ok(y)
        }
    }

    fn check(&self, x: &Tensor, start_pos: usize) -> Result<()> {
        let (_, _, seq, d) = x.dims4()?;
        if d != self.head_dim {
            bail!("rope: head_dim {d}, tables built for {}", self.head_dim);
        }
        if start_pos + seq > self.max_positions() {
            bail!(
                "rope: positions up to {} exceed max_positions {}",
                start_pos + seq,
                self.max_positions()
            );
        }
        Ok(())
    }

    /// The `[seq, head_dim/2]` slices of the tables for `x`'s positions, in `x`'s dtype.
    fn tables(&self, x: &Tensor, start_pos: usize) -> Result<(Tensor, Tensor)> {
        let seq = x.dim(2)?;
        let cut = |t: &Tensor| t.narrow(0, start_pos, seq)?.to_dtype(x.dtype());
        Ok((cut(&self.cos)?, cut(&self.sin)?))
    }
}

/// `[x1 cos - x2 sin, x2 cos + x1 sin]` with `x = [x1, x2]` split at the middle of the last dim.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let y1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let y2 = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Tensor::cat(&[y1, y2], D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{check, max_abs_diff, randn};

    #[test]
    fn matches_the_rotate_half_formula() {
        let (b, h, t, d) = (2, 3, 5, 8);
        let theta = 10_000.0;
        let rope = Rope::new(d, 16, theta, &Device::Cpu).unwrap();
        let x = randn(&[b, h, t, d], 1);
        let start = 3;
        let y: Vec<f64> = rope
            .apply(&x, start)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let xs: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        for row in 0..b * h * t {
            let pos = (start + row % t) as f64;
            let (x, y) = (&xs[row * d..][..d], &y[row * d..][..d]);
            for i in 0..d / 2 {
                let a = pos * theta.powf(-2.0 * i as f64 / d as f64);
                let e1 = x[i] * a.cos() - x[i + d / 2] * a.sin();
                let e2 = x[i + d / 2] * a.cos() + x[i] * a.sin();
                assert!((y[i] - e1).abs() < 1e-6 && (y[i + d / 2] - e2).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn backward_matches_autograd_and_finite_differences() {
        let rope = Rope::new(6, 10, 500.0, &Device::Cpu).unwrap();
        let x = randn(&[2, 2, 4, 6], 2);
        let dy = randn(&[2, 2, 4, 6], 3);
        let dx = rope.apply_backward(&dy, 5).unwrap();
        check(&[x], &dy, &[dx], |t| rope.apply(&t[0], 5), 1e-10);
    }

    #[test]
    fn scores_depend_only_on_relative_position_and_f32_matches_f64() {
        let rope = Rope::new(8, 32, 10_000.0, &Device::Cpu).unwrap();
        let q = randn(&[1, 1, 6, 8], 4);
        let k = randn(&[1, 1, 6, 8], 5);
        let scores = |start: usize| {
            let q = rope.apply(&q, start).unwrap();
            let k = rope.apply(&k, start).unwrap();
            q.matmul(&k.t().unwrap()).unwrap()
        };
        assert!(max_abs_diff(&scores(0), &scores(20)) < 1e-4);
        let q32 = q.to_dtype(candle_core::DType::F32).unwrap();
        let y32 = rope
            .apply(&q32, 7)
            .unwrap()
            .to_dtype(candle_core::DType::F64)
            .unwrap();
        assert!(max_abs_diff(&y32, &rope.apply(&q, 7).unwrap()) < 1e-6);
    }

    /// On the CPU in f32 one pass (`cpu::rope`) gives the composition's bits: heads read from the
    /// layers' `[b*t, h*d]` layout, the gradient written back to it, and a table offset.
    #[test]
    fn one_pass_on_the_layers_layout_gives_the_compositions_bits() {
        use candle_core::DType::F32;
        let (b, h, t, d) = (2, 3, 5, 8);
        let rope = Rope::new(d, 16, 10_000.0, &Device::Cpu).unwrap();
        let bits = |x: Tensor| -> Vec<u32> {
            let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            v.into_iter().map(f32::to_bits).collect()
        };
        let heads = |x: &Tensor| x.reshape((b, t, h, d)).unwrap().transpose(1, 2).unwrap();
        let merge = |y: Tensor| y.transpose(1, 2).unwrap().reshape((b * t, h * d)).unwrap();
        let composition = |x: &Tensor, start: usize, inverse: bool| {
            let (cos, sin) = rope.tables(x, start).unwrap();
            let sin = if inverse { sin.neg().unwrap() } else { sin };
            rotate(&x.contiguous().unwrap(), &cos, &sin).unwrap()
        };
        let x = randn(&[b * t, h * d], 7).to_dtype(F32).unwrap();
        let (cos, sin) = rope.tables(&heads(&x), 0).unwrap();
        let one_pass = cpu::rope(&heads(&x), &cos, &sin, false, false).unwrap();
        assert!(
            one_pass.is_some(),
            "f32 on the CPU takes the one-pass kernel"
        );
        let theirs = composition(&heads(&x), 0, false);
        assert_eq!(bits(rope.apply(&heads(&x), 0).unwrap()), bits(theirs));

        let dy = randn(&[b, h, t, d], 8).to_dtype(F32).unwrap();
        for start in [0, 4] {
            let theirs = composition(&dy, start, true);
            assert_eq!(
                bits(rope.apply_backward(&dy, start).unwrap()),
                bits(theirs.clone())
            );
            let ours = rope.apply_backward_merged(&dy, start).unwrap();
            assert_eq!(bits(ours), bits(merge(theirs)));
        }
        // f64 takes the composition.
        let x64 = heads(&randn(&[b * t, h * d], 9));
        let theirs = composition(&x64, 0, false);
        assert_eq!(max_abs_diff(&rope.apply(&x64, 0).unwrap(), &theirs), 0.0);
    }

    #[test]
    fn rejects_positions_past_the_table() {
        let rope = Rope::new(4, 4, 10_000.0, &Device::Cpu).unwrap();
        assert!(rope.apply(&randn(&[1, 1, 3, 4], 6), 2).is_err());
    }
}
