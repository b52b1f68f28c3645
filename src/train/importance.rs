//! SAFE's importance measurement, shared by both trainers: every adapter's `1 - CKA(X, Y)` over a
//! fixed set of monitoring batches, computed **layer by layer**. All batches pass one layer before
//! the next layer runs, so at any time only one layer's `(X, Y)` rows and CKA moments exist; the
//! batches' hidden states (a few MB) are what carries over. The moments of a layer stay on the
//! model's device in f64.
//!
//! Memory is therefore `O(d^2)` for one layer's adapters, not for the model's: 0.8 GB for a
//! LLaMA-7B layer's q/v adapters at width 4096, where holding every layer's would take 26 GB.
//! The centered norms CKA is made of are computed there too, so per adapter and round five numbers
//! reach the host, not three `d x d` matrices.

use crate::adapters::Adapted;
use crate::safe::{cka_from_norms, CkaNorms};
use candle_core::{DType, Device, Result, Tensor};
use std::ops::Range;

/// One monitoring batch: the model's batch, the indices of its real (non-padding) token rows, and
/// its hidden state at the layer the measurement has reached.
pub struct MonitorBatch<B> {
    pub batch: B,
    pub rows: Tensor,
    pub hidden: Tensor,
}

/// Indices of the real (non-padding) token rows of a `[batch, seq]` attention mask.
pub fn token_rows(attention_mask: &[u32], device: &Device) -> Result<Tensor> {
    let rows: Vec<u32> = (0..attention_mask.len() as u32)
        .filter(|&i| attention_mask[i as usize] == 1)
        .collect();
    let n = rows.len();
    Tensor::from_vec(rows, n, device)
}

/// The layers a round measures: from the lowest to the highest layer with a trainable adapter.
/// Below, frozen adapters need no more scores; above, nothing trains. None when nothing trains.
pub fn trainable_layers(model: &impl Adapted) -> Option<Range<usize>> {
    let trainable: Vec<usize> = model
        .adapters()
        .into_iter()
        .zip(model.adapter_layers())
        .filter(|((_, a), _)| a.trainable)
        .map(|(_, l)| l)
        .collect();
    Some(*trainable.iter().min()?..*trainable.iter().max()? + 1)
}

/// What one monitored layer gives for one batch: its output (the next layer's input) and, for
/// each of its adapters, `(adapter key, X, Y)` as `[batch*seq, d]` rows.
pub type LayerRows<K> = (Tensor, Vec<(K, Tensor, Tensor)>);

/// Importance of each of `adapters` (in that order): `layer(l, batch, hidden)` runs layer `l` on
/// every batch in turn, for each `l` in `layers`, naming its adapters by their keys; adapters
/// outside those layers get NaN ("not measured").
pub fn importance_by_layer<B, K: PartialEq>(
    adapters: &[K],
    batches: &mut [MonitorBatch<B>],
    layers: Range<usize>,
    mut layer: impl FnMut(usize, &B, &Tensor) -> Result<LayerRows<K>>,
) -> Result<Vec<f64>> {
    let mut scores = vec![f64::NAN; adapters.len()];
    for l in layers {
        let mut moments: Vec<(usize, DeviceMoments)> = Vec::new();
        for mb in batches.iter_mut() {
            let (out, rows) = layer(l, &mb.batch, &mb.hidden)?;
            for (key, x, y) in rows {
                let i = adapters
                    .iter()
                    .position(|a| *a == key)
                    .expect("monitored adapter is listed");
                let m = DeviceMoments::of(&x, &y, &mb.rows)?;
                match moments.iter_mut().find(|(j, _)| *j == i) {
                    Some((_, acc)) => acc.add(m)?,
                    None => moments.push((i, m)),
                }
            }
            mb.hidden = out;
        }
        for (i, m) in moments {
            scores[i] = m.importance()?;
        }
    }
    Ok(scores)
}

/// One adapter's CKA moments over the batches seen so far, on the model's device in f64: the
/// row count, column sums, and the uncentered `X^T X`, `Y^T Y`, `Y^T X`.
struct DeviceMoments {
    n: usize,
    sum_x: Tensor,
    sum_y: Tensor,
    xtx: Tensor,
    yty: Tensor,
    ytx: Tensor,
}

impl DeviceMoments {
    /// The moments of `X`, `Y` (`[batch*seq, d]`) over the token rows `rows`.
    fn of(x: &Tensor, y: &Tensor, rows: &Tensor) -> Result<Self> {
        let x = x.index_select(rows, 0)?.to_dtype(DType::F64)?;
        let y = y.index_select(rows, 0)?.to_dtype(DType::F64)?;
        Ok(Self {
            n: x.dim(0)?,
            sum_x: x.sum(0)?,
            sum_y: y.sum(0)?,
            // Counted as the model's matmuls are: SAFE's monitoring FLOPs include them.
            xtx: crate::nn::matmul(&x.t()?, &x)?,
            yty: crate::nn::matmul(&y.t()?, &y)?,
            ytx: crate::nn::matmul(&y.t()?, &x)?,
        })
    }

    fn add(&mut self, o: Self) -> Result<()> {
        self.n += o.n;
        self.sum_x = (&self.sum_x + o.sum_x)?;
        self.sum_y = (&self.sum_y + o.sum_y)?;
        self.xtx = (&self.xtx + o.xtx)?;
        self.yty = (&self.yty + o.yty)?;
        self.ytx = (&self.ytx + o.ytx)?;
        Ok(())
    }

    /// `1 - CKA` (NaN where CKA is undefined, see [`cka_from_norms`]). The centered products and
    /// their norms are computed where the moments are, so only five numbers reach the host.
    fn importance(self) -> Result<f64> {
        let n = self.n as f64;
        // Sum of squares, by rows first: candle's CUDA `sum_all` reduces in one thread block,
        // which took 4.9 of a 7B round's 5.7 s; `d` row sums spread over the device.
        let sum_sq = |t: &Tensor| -> Result<f64> { t.sqr()?.sum(1)?.sum_all()?.to_scalar() };
        // ||M - a b^T / n||_F^2.
        let centered = |m: &Tensor, a: &Tensor, b: &Tensor| -> Result<f64> {
            let outer = a.unsqueeze(1)?.broadcast_mul(&b.unsqueeze(0)?)?;
            sum_sq(&(m - (outer / n)?)?)
        };
        let norms = CkaNorms {
            rows: self.n,
            xx: centered(&self.xtx, &self.sum_x, &self.sum_x)?,
            xx_raw: sum_sq(&self.xtx)?,
            yy: centered(&self.yty, &self.sum_y, &self.sum_y)?,
            yy_raw: sum_sq(&self.yty)?,
            yx: centered(&self.ytx, &self.sum_y, &self.sum_x)?,
        };
        Ok(cka_from_norms(&norms)
            .map(crate::safe::importance)
            .unwrap_or(f64::NAN))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safe::linear_cka_gram;

    /// FLOPs of a monitoring pass: the layers' own matmuls plus, per adapter and batch, the
    /// moments `X^T X`, `Y^T Y`, `Y^T X` over the batch's `n` real rows: `2 n (dx^2 + dy^2 + dy dx)`.
    #[test]
    fn monitoring_flops_are_the_forward_and_the_moments() {
        let dev = Device::Cpu;
        let (seq, d_in, dx, dy) = (5, 3, 4, 2);
        let masks: [&[u32]; 2] = [&[1, 1, 1, 0, 0], &[1, 1, 1, 1, 1]];
        let mut batches: Vec<MonitorBatch<usize>> = masks
            .iter()
            .enumerate()
            .map(|(b, mask)| MonitorBatch {
                batch: b,
                rows: token_rows(mask, &dev).unwrap(),
                hidden: Tensor::randn(0f32, 1., (seq, d_in), &dev).unwrap(),
            })
            .collect();
        let wx = Tensor::randn(0f32, 1., (d_in, dx), &dev).unwrap();
        let wy = Tensor::randn(0f32, 1., (d_in, dy), &dev).unwrap();
        let before = crate::nn::flops::total();
        // Two layers, one adapter each; each layer's forward is two matmuls.
        importance_by_layer(&[0, 1], &mut batches, 0..2, |l, _, h| {
            let x = crate::nn::matmul(h, &wx)?;
            let y = crate::nn::matmul(h, &wy)?;
            Ok((h.clone(), vec![(l, x, y)]))
        })
        .unwrap();
        let counted = crate::nn::flops::total() - before;
        let (layers, per_batch_forward) = (2, 2 * seq * d_in * (dx + dy));
        let forward = layers * masks.len() * per_batch_forward;
        let moments: usize = masks
            .iter()
            .map(|m| {
                let n = m.iter().filter(|&&v| v == 1).count();
                layers * 2 * n * (dx * dx + dy * dy + dy * dx)
            })
            .sum();
        assert_eq!(counted, (forward + moments) as u64);
    }

    /// Two "layers" over three batches with padding: each adapter's score is the direct Gram-form
    /// CKA over all its real rows at once; adapters of unmeasured layers are NaN; the hidden state
    /// advances once per measured layer.
    #[test]
    fn scores_are_cka_over_every_real_row_of_every_batch() {
        let dev = Device::Cpu;
        let d = 3;
        // Batch b, row r, column c: a fixed, non-degenerate pattern.
        let value = |b: usize, r: usize, c: usize, k: f32| {
            ((b * 7 + r * 3 + c * 5) % 11) as f32 * 0.3 - 1.0 + k * ((r + c) % 4) as f32
        };
        let masks: [&[u32]; 3] = [&[1, 1, 1, 0], &[1, 1, 0, 0], &[1, 1, 1, 1]];
        let mut batches: Vec<MonitorBatch<usize>> = masks
            .iter()
            .enumerate()
            .map(|(b, mask)| MonitorBatch {
                batch: b,
                rows: token_rows(mask, &dev).unwrap(),
                hidden: Tensor::zeros(1, DType::F32, &dev).unwrap(),
            })
            .collect();
        let xy = |b: usize, k: f32| {
            let v: Vec<f32> = (0..4 * d).map(|i| value(b, i / d, i % d, k)).collect();
            Tensor::from_vec(v, (4, d), &dev).unwrap()
        };
        // Layer l holds adapter l; adapter 2 (layer 2) is outside the measured range.
        let scores = importance_by_layer(&[0, 1, 2], &mut batches, 0..2, |l, &b, h| {
            let k = 0.5 + l as f32;
            Ok(((h + 1.0)?, vec![(l, xy(b, k), xy(b, 0.0))]))
        })
        .unwrap();
        for l in 0..2 {
            let (mut xs, mut ys) = (Vec::new(), Vec::new());
            for (b, mask) in masks.iter().enumerate() {
                for r in (0..4).filter(|&r| mask[r] == 1) {
                    for c in 0..d {
                        xs.push(value(b, r, c, 0.5 + l as f32) as f64);
                        ys.push(value(b, r, c, 0.0) as f64);
                    }
                }
            }
            let expected = 1.0 - linear_cka_gram(&xs, &ys, xs.len() / d, d, d).unwrap();
            assert!(expected > 1e-3, "the test needs a non-trivial score");
            assert!(
                (scores[l] - expected).abs() < 1e-12,
                "{scores:?} {expected}"
            );
        }
        assert!(scores[2].is_nan());
        for mb in &batches {
            assert_eq!(mb.hidden.to_vec1::<f32>().unwrap(), vec![2.0]);
        }
    }
}
