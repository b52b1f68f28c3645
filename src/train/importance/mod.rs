//! SAFE's importance measurement, shared by both trainers: every adapter's `1 - CKA(X, Y)` over a
//! fixed set of monitoring batches, computed **layer by layer**. All batches pass one layer before
//! the next layer runs, so at any time only one layer's `(X, Y)` rows and CKA moments exist; the
//! batches' hidden states (a few MB) are what carries over. The moments of a layer stay on the
//! model's device in f64; at the linear they are kept in the adapter's low-rank form (see
//! [`DeviceMoments`]), one `d x d` product per batch instead of three.
//!
//! Memory is therefore `O(d^2)` for one layer's adapters, not for the model's: 0.27 GB for a
//! LLaMA-7B layer's q/v adapters at width 4096, where holding every layer's would take 8.6 GB.
//! The centered norms CKA is made of are computed there too, so per adapter and round five numbers
//! reach the host, not three `d x d` matrices. That is `measure = "passes"`; the default measures
//! on the training steps themselves ([`StepMonitor`], in `steps.rs`).

use crate::adapters::{Adapted, CkaRows};
use crate::nn::cka::{moment_norms, pick_rows, LowRankMoments};
use crate::safe::{cka_from_norms, CkaNorms};
use candle_core::{Device, Result, Tensor};
use std::ops::Range;

mod steps;
pub use steps::{MeasuredBatch, StepMonitor};

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
/// each of its adapters, `(adapter key, its X and Y rows)` over `[batch*seq]` rows.
pub type LayerRows<K> = (Tensor, Vec<(K, CkaRows)>);

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
            for (key, r) in rows {
                let i = adapters
                    .iter()
                    .position(|a| *a == key)
                    .expect("monitored adapter is listed");
                let m = DeviceMoments::of(&r, &mb.rows)?;
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
/// row count, column sums, and the uncentered `X^T X`, `Y^T Y`, `Y^T X`. At the linear, where
/// `X = Y + U B^T` with `U` of rank r, they are kept as `Y^T Y`, `Y^T U`, `U^T U` and `B`:
/// one `d x d` product over the rows instead of three (`X^T X` and `Y^T X` follow from them
/// in `O(d^2 r)` when the round's batches are done, [`LowRankMoments`]).
enum DeviceMoments {
    Full {
        n: usize,
        sum_x: Tensor,
        sum_y: Tensor,
        xtx: Tensor,
        yty: Tensor,
        ytx: Tensor,
    },
    LowRank(LowRankMoments),
}

impl DeviceMoments {
    /// The moments of one batch's rows over its token rows `rows`.
    fn of(r: &CkaRows, rows: &Tensor) -> Result<Self> {
        let pick = |t: &Tensor| pick_rows(t, rows);
        // Counted as the model's matmuls are: SAFE's monitoring FLOPs include them.
        let mm = |a: &Tensor, b: &Tensor| crate::nn::matmul(&a.t()?, b);
        Ok(match r {
            CkaRows::Full { x, y } => {
                let (x, y) = (pick(x)?, pick(y)?);
                Self::Full {
                    n: x.dim(0)?,
                    sum_x: x.sum(0)?,
                    sum_y: y.sum(0)?,
                    xtx: mm(&x, &x)?,
                    yty: mm(&y, &y)?,
                    ytx: mm(&y, &x)?,
                }
            }
            CkaRows::LowRank { y, u, b } => Self::LowRank(LowRankMoments::of_rows(y, u, b, rows)?),
        })
    }

    /// The row count and the five summed moments, in a fixed order per form (`b` is not a sum).
    fn sums_mut(&mut self) -> (&mut usize, [&mut Tensor; 5]) {
        match self {
            Self::Full {
                n,
                sum_x,
                sum_y,
                xtx,
                yty,
                ytx,
            } => (n, [sum_x, sum_y, xtx, yty, ytx]),
            Self::LowRank(m) => (
                &mut m.n,
                [
                    &mut m.sum_y,
                    &mut m.sum_u,
                    &mut m.yty,
                    &mut m.ytu,
                    &mut m.utu,
                ],
            ),
        }
    }

    fn add(&mut self, mut o: Self) -> Result<()> {
        if std::mem::discriminant(self) != std::mem::discriminant(&o) {
            candle_core::bail!("one adapter's CKA rows changed form between batches");
        }
        let (n, ours) = self.sums_mut();
        let (n2, theirs) = o.sums_mut();
        *n += *n2;
        for (a, b) in ours.into_iter().zip(theirs) {
            *a = (&*a + &*b)?;
        }
        Ok(())
    }

    /// `1 - CKA` (NaN where CKA is undefined, see [`cka_from_norms`]).
    fn importance(self) -> Result<f64> {
        let (rows, norms) = self.norms()?;
        Ok(importance_of(rows, &norms.to_vec1()?))
    }

    /// The row count and CKA's five norms as a `[5]` tensor on the moments' device (see
    /// [`NORMS`]): the centered products and their norms are computed where the moments are, so
    /// only five numbers reach the host.
    fn norms(self) -> Result<(usize, Tensor)> {
        match self {
            Self::Full {
                n,
                sum_x,
                sum_y,
                xtx,
                yty,
                ytx,
            } => Ok((n, moment_norms(n, &sum_x, &sum_y, &xtx, &yty, &ytx)?)),
            Self::LowRank(m) => Ok((m.n, m.norms()?)),
        }
    }
}

/// The order of the five norms in a `[5]` norms tensor, as [`CkaNorms`] names them.
const NORMS: [&str; 5] = ["xx", "xx_raw", "yy", "yy_raw", "yx"];

/// `1 - CKA` of `rows` rows from five norms in [`NORMS`] order (NaN where CKA is undefined).
fn importance_of(rows: usize, v: &[f64]) -> f64 {
    debug_assert_eq!(v.len(), NORMS.len());
    let norms = CkaNorms {
        rows,
        xx: v[0],
        xx_raw: v[1],
        yy: v[2],
        yy_raw: v[3],
        yx: v[4],
    };
    cka_from_norms(&norms)
        .map(crate::safe::importance)
        .unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safe::linear_cka_gram;
    use candle_core::DType;

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
            Ok((h.clone(), vec![(l, CkaRows::Full { x, y })]))
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

    /// At the linear, `X = Y + U B^T`: the low-rank moments give the score of the full ones
    /// (X materialized) over three padded batches with non-zero column means, and count
    /// `2 n (d^2 + d r + r^2)` per batch plus `4 d^2 r + 2 d r^2 + 2 d r` per round instead of
    /// the full form's `6 n d^2`.
    #[test]
    fn low_rank_moments_give_the_full_moments_score() {
        let dev = Device::Cpu;
        let (seq, d, r) = (6, 5, 2);
        let masks: [&[u32]; 3] = [
            &[1, 1, 1, 1, 0, 0],
            &[1, 1, 1, 1, 1, 1],
            &[1, 1, 0, 0, 0, 0],
        ];
        let made = |seed: u64, rows: usize, cols: usize, mean: f64| {
            let v: Vec<f64> = (0..rows * cols)
                .map(|i| ((i as u64 * 37 + seed * 11) % 17) as f64 * 0.25 - 2.0 + mean)
                .collect();
            Tensor::from_vec(v, (rows, cols), &dev).unwrap()
        };
        let b = made(9, d, r, 0.0);
        let per_batch: Vec<(Tensor, Tensor)> = (0..3)
            .map(|i| (made(i, seq, d, 1.5), made(i + 5, seq, r, 0.3)))
            .collect();
        let batches = || -> Vec<MonitorBatch<usize>> {
            masks
                .iter()
                .enumerate()
                .map(|(i, mask)| MonitorBatch {
                    batch: i,
                    rows: token_rows(mask, &dev).unwrap(),
                    hidden: Tensor::zeros(1, DType::F64, &dev).unwrap(),
                })
                .collect()
        };
        let score = |low_rank: bool| {
            let before = crate::nn::flops::total();
            let s = importance_by_layer(&[0usize], &mut batches(), 0..1, |_, &i, h| {
                let (y, u) = per_batch[i].clone();
                let rows = CkaRows::LowRank { y, u, b: b.clone() };
                let rows = if low_rank {
                    rows
                } else {
                    let (x, y) = rows.x_y()?;
                    CkaRows::Full { x, y }
                };
                Ok((h.clone(), vec![(0, rows)]))
            })
            .unwrap()[0];
            (s, crate::nn::flops::total() - before)
        };
        let ((full, full_flops), (low, low_flops)) = (score(false), score(true));
        assert!(full > 1e-3, "the test needs a non-trivial score: {full}");
        assert!((low - full).abs() < 1e-12 * full, "{low} vs {full}");
        let rows: Vec<usize> = masks
            .iter()
            .map(|m| m.iter().filter(|&&v| v == 1).count())
            .collect();
        // x_y's U B^T per batch is the full path's own cost of materializing X.
        let materialize = 3 * 2 * seq * r * d;
        let full_moments: usize = rows.iter().map(|n| 2 * n * 3 * d * d).sum();
        assert_eq!(full_flops, (materialize + full_moments) as u64);
        let low_moments: usize = rows.iter().map(|n| 2 * n * (d * d + d * r + r * r)).sum();
        let round = 4 * d * d * r + 2 * d * r * r + 2 * d * r;
        assert_eq!(low_flops, (low_moments + round) as u64);
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
            let rows = CkaRows::Full {
                x: xy(b, k),
                y: xy(b, 0.0),
            };
            Ok(((h + 1.0)?, vec![(l, rows)]))
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
