//! Multi-head scaled dot-product attention with a key padding mask and dropout on the probabilities.
//!
//! Memory: backward does not read saved `(batch, heads, seq, seq)` probabilities. It saves q, k, v and
//! the per-row log-sum-exp, and recomputes the probabilities (one extra `q k^T` matmul), the way
//! flash attention does. Only the dropout keep-mask of that shape is kept, as `u8`, when dropout is on.

use super::dropout::{self, Dropout, DropoutSaved};
use super::flops::matmul;
use super::{cpu, Pass};
use candle_core::{Result, Tensor, D};

#[derive(Clone, Copy, Debug)]
pub struct Attention {
    pub num_heads: usize,
    pub dropout: Dropout,
}

/// Shapes of one attention call: `batch * seq` rows of `hidden` features.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub batch: usize,
    pub seq: usize,
}

pub struct AttentionSaved {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lse: Tensor,
    mask_add: Tensor,
    dropout: Option<DropoutSaved>,
    shape: AttnShape,
    fused: bool,
}

impl Attention {
    fn split_heads(&self, x: &Tensor, s: AttnShape) -> Result<Tensor> {
        let c = x.dim(D::Minus1)?;
        x.reshape((s.batch, s.seq, self.num_heads, c / self.num_heads))?
            .transpose(1, 2)?
            .contiguous()
    }

    fn merge_heads(&self, x: &Tensor, s: AttnShape) -> Result<Tensor> {
        let c = x.dim(1)? * x.dim(3)?;
        x.transpose(1, 2)?.reshape((s.batch * s.seq, c))
    }

    /// Scaled scores plus the additive mask, `[batch, heads, seq, seq]`.
    fn scores(&self, q: &Tensor, k: &Tensor, mask_add: &Tensor) -> Result<Tensor> {
        let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
        matmul(q, &k.t()?)?
            .affine(scale, 0.0)?
            .broadcast_add(mask_add)
    }

    /// Softmax probabilities and per-row log-sum-exp (fused kernel on CPU, composition elsewhere).
    fn probs(
        &self,
        q: &Tensor,
        k: &Tensor,
        mask_add: &Tensor,
        fused: bool,
    ) -> Result<(Tensor, Tensor)> {
        let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
        if fused {
            let raw = matmul(q, &k.t()?)?;
            if let Some(out) = cpu::softmax_fwd(&raw, mask_add, scale)? {
                return Ok(out);
            }
        }
        let s = self.scores(q, k, mask_add)?;
        let max = s.max_keepdim(D::Minus1)?;
        let e = s.broadcast_sub(&max)?.exp()?;
        let sum = e.sum_keepdim(D::Minus1)?;
        Ok((e.broadcast_div(&sum)?, (max + sum.log()?)?))
    }

    /// `q`, `k`, `v` are `[batch*seq, hidden]`; `mask_add` is `[batch, 1, 1, seq]` (0 for tokens,
    /// a large negative number for padding). Returns the context `[batch*seq, hidden]`.
    pub fn forward(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        mask_add: &Tensor,
        shape: AttnShape,
        pass: &mut Pass,
        save: bool,
    ) -> Result<(Tensor, Option<AttentionSaved>)> {
        self.forward_impl((q, k, v), mask_add, shape, pass, save, true)
    }

    /// The candle composition throughout: reference for the fused kernels.
    pub fn forward_reference(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        mask_add: &Tensor,
        shape: AttnShape,
        pass: &mut Pass,
        save: bool,
    ) -> Result<(Tensor, Option<AttentionSaved>)> {
        self.forward_impl((q, k, v), mask_add, shape, pass, save, false)
    }

    fn forward_impl(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        mask_add: &Tensor,
        shape: AttnShape,
        pass: &mut Pass,
        save: bool,
        fused: bool,
    ) -> Result<(Tensor, Option<AttentionSaved>)> {
        let (q, k, v) = (
            self.split_heads(q, shape)?,
            self.split_heads(k, shape)?,
            self.split_heads(v, shape)?,
        );
        let (p, lse) = self.probs(&q, &k, mask_add, fused)?;
        let (p, drop) = self.dropout.forward(&p, pass, save)?;
        let ctx = self.merge_heads(&matmul(&p, &v)?, shape)?;
        let saved = save.then_some(AttentionSaved {
            q,
            k,
            v,
            lse,
            mask_add: mask_add.clone(),
            dropout: drop,
            shape,
            fused,
        });
        Ok((ctx, saved))
    }
}

impl AttentionSaved {
    /// Returns `(dq, dk, dv)`, each `[batch*seq, hidden]`.
    pub fn backward(&self, attn: &Attention, dctx: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let dctx = attn.split_heads(dctx, self.shape)?;
        let scale = 1.0 / (self.q.dim(D::Minus1)? as f64).sqrt();
        let raw = matmul(&self.q, &self.k.t()?)?;
        let fused_p = if self.fused {
            cpu::softmax_recompute(&raw, &self.mask_add, &self.lse, scale)?
        } else {
            None
        };
        let p = match fused_p {
            Some(p) => p,
            None => raw
                .affine(scale, 0.0)?
                .broadcast_add(&self.mask_add)?
                .broadcast_sub(&self.lse)?
                .exp()?,
        };
        let p_drop = match &self.dropout {
            Some(d) => d.backward(&p)?, // the same mask-and-scale as forward
            None => p.clone(),
        };
        let dv = matmul(&p_drop.t()?, &dctx)?;
        let dp = dropout::backward_opt(&self.dropout, matmul(&dctx, &self.v.t()?)?)?;
        let fused_ds = if self.fused {
            cpu::softmax_bwd(&p, &dp, scale)?
        } else {
            None
        };
        let ds = match fused_ds {
            Some(ds) => ds,
            None => {
                let row = (&dp * &p)?.sum_keepdim(D::Minus1)?;
                (p * dp.broadcast_sub(&row)?)?.affine(scale, 0.0)?
            }
        };
        let dq = matmul(&ds, &self.k)?;
        let dk = matmul(&ds.t()?, &self.q)?;
        Ok((
            attn.merge_heads(&dq, self.shape)?,
            attn.merge_heads(&dk, self.shape)?,
            attn.merge_heads(&dv, self.shape)?,
        ))
    }
}

/// Additive key mask `[batch, 1, 1, seq]` from a `[batch, seq]` 0/1 attention mask.
pub fn mask_to_additive(mask: &Tensor, dtype: candle_core::DType) -> Result<Tensor> {
    let (b, t) = mask.dims2()?;
    mask.to_dtype(dtype)?
        .affine(1e9, -1e9)?
        .reshape((b, 1, 1, t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{check, randn};
    use rand::SeedableRng;

    fn run(p: f64) {
        let (b, t, c, heads) = (2, 5, 8, 2);
        let attn = Attention {
            num_heads: heads,
            dropout: Dropout::new(p),
        };
        let shape = AttnShape { batch: b, seq: t };
        // Second sequence has two padding tokens.
        let mask = Tensor::from_vec(
            vec![1u32, 1, 1, 1, 1, 1, 1, 1, 0, 0],
            (b, t),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let mask_add = mask_to_additive(&mask, candle_core::DType::F64).unwrap();
        let (q, k, v) = (
            randn(&[b * t, c], 41),
            randn(&[b * t, c], 42),
            randn(&[b * t, c], 43),
        );
        let dy = randn(&[b * t, c], 44);
        let fwd = |q: &Tensor, k: &Tensor, v: &Tensor, save: bool| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(9);
            let mut pass = Pass {
                training: true,
                rng: &mut rng,
            };
            attn.forward((q, k, v), &mask_add, shape, &mut pass, save)
                .unwrap()
        };
        let (_, saved) = fwd(&q, &k, &v, true);
        let (dq, dk, dv) = saved.unwrap().backward(&attn, &dy).unwrap();
        check(
            &[q, k, v],
            &dy,
            &[dq, dk, dv],
            |x| Ok(fwd(&x[0], &x[1], &x[2], false).0),
            1e-10,
        );
    }

    #[test]
    fn backward_matches_autograd_and_finite_differences() {
        run(0.0);
    }

    #[test]
    fn fused_cpu_path_matches_the_composition() {
        let f32 = |t: Tensor| t.to_dtype(candle_core::DType::F32).unwrap();
        let (b, t, c) = (3, 6, 8);
        let attn = Attention {
            num_heads: 2,
            dropout: Dropout::new(0.2),
        };
        let shape = AttnShape { batch: b, seq: t };
        let mut m = vec![1u32; b * t];
        m[t - 1] = 0;
        m[2 * t - 2..2 * t].fill(0);
        let mask = Tensor::from_vec(m, (b, t), &candle_core::Device::Cpu).unwrap();
        let mask_add = mask_to_additive(&mask, candle_core::DType::F32).unwrap();
        let (q, k, v) = (
            f32(randn(&[b * t, c], 1)),
            f32(randn(&[b * t, c], 2)),
            f32(randn(&[b * t, c], 3)),
        );
        let dy = f32(randn(&[b * t, c], 4));
        let run = |fused: bool| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(9);
            let mut pass = Pass {
                training: true,
                rng: &mut rng,
            };
            let (y, s) = if fused {
                attn.forward((&q, &k, &v), &mask_add, shape, &mut pass, true)
                    .unwrap()
            } else {
                attn.forward_reference((&q, &k, &v), &mask_add, shape, &mut pass, true)
                    .unwrap()
            };
            let (dq, dk, dv) = s.unwrap().backward(&attn, &dy).unwrap();
            [y, dq, dk, dv]
        };
        for (a, r) in run(true).iter().zip(run(false).iter()) {
            assert!(crate::nn::gradcheck::max_abs_diff(a, r) < 1e-5);
        }
    }

    #[test]
    fn backward_with_dropout_matches() {
        run(0.3);
    }

    #[test]
    fn padding_keys_get_no_attention() {
        // Changing the value of a padded token must not change any output.
        let attn = Attention {
            num_heads: 1,
            dropout: Dropout::new(0.0),
        };
        let mask = Tensor::from_vec(vec![1u32, 1, 0], (1, 3), &candle_core::Device::Cpu).unwrap();
        let mask_add = mask_to_additive(&mask, candle_core::DType::F64).unwrap();
        let q = randn(&[3, 4], 1);
        let v1 = randn(&[3, 4], 2);
        let mut vals: Vec<f64> = v1.flatten_all().unwrap().to_vec1().unwrap();
        vals[8..].iter_mut().for_each(|x| *x += 100.0);
        let v2 = Tensor::from_vec(vals, (3, 4), &candle_core::Device::Cpu).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let mut pass = Pass {
            training: false,
            rng: &mut rng,
        };
        let s = AttnShape { batch: 1, seq: 3 };
        let a = attn
            .forward((&q, &q, &v1), &mask_add, s, &mut pass, false)
            .unwrap()
            .0;
        let b = attn
            .forward((&q, &q, &v2), &mask_add, s, &mut pass, false)
            .unwrap()
            .0;
        assert!(crate::nn::gradcheck::max_abs_diff(&a, &b) < 1e-12);
    }
}
