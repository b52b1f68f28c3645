//! SAFE's importance measured on the training steps themselves (`safe.measure = "steps"`): the
//! `StepMonitor` the training forward hands each adapter's rows to, and the per-micro-batch CKA
//! it computes from them, in the moment or the Gram form.

use super::{importance_of, token_rows};
use crate::adapters::AdapterId;
use crate::nn::cka::{gram_form, gram_terms, gram_terms_batch, low_rank_norms, measured_together};
use crate::nn::gpu::CKA_GRAM_BATCH;
use crate::nn::{flops, RowSink};
use candle_core::{Device, Result, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ops::Range;

/// What a measured micro-batch keeps on the device until its round ends: the five norms (the
/// moment form computes them there), or the Gram form's raw terms, which the host turns into
/// the norms (see [`gram_terms`](crate::nn::cka::gram_terms)). Either way a few numbers, so nothing of size `n` or `d`
/// outlives the layer.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kept {
    Norms,
    GramTerms { rank: usize },
}

impl Kept {
    /// The five norms in [`NORMS`](super::NORMS) order of `rows` rows from what was kept.
    fn norms(self, rows: usize, v: &[f64]) -> [f64; 5] {
        match self {
            Self::Norms => [v[0], v[1], v[2], v[3], v[4]],
            Self::GramTerms { rank } => gram_norms(rows, rank, v),
        }
    }
}

/// CKA's five norms (in [`NORMS`](super::NORMS) order) of `n` rows from their Gram-form terms (see
/// [`gram_terms`]; `U` of rank `r`). With `S = P Uc^T`, `K = L + S + S^T`:
/// `<K, L> = ||L||^2 + 2 <L Uc, P>` and
/// `||K||^2 = ||L||^2 + 4 <L Uc, P> + 2 <P^T P, Uc^T Uc> + 2 tr((Uc^T P)^2)`. The zero-variance
/// guard's scales are `||X||_F^4` and `||Y||_F^4` (they bound `||X^T X||_F^2` and
/// `||Y^T Y||_F^2`), with `||X||^2 = ||Y||^2 + 2 <Y B, U> + <U^T U, G>`, where
/// `<Y B, U> = tr(Uc^T P) - <Uc^T Uc, G> / 2 + n mean(Y) B . mean(U)` and
/// `U^T U = Uc^T Uc + n mean(U)^T mean(U)`.
fn gram_norms(n: usize, r: usize, v: &[f64]) -> [f64; 5] {
    let (l2, lup, yy) = (v[0], v[1], v[2]);
    let z = &v[3..3 + 4 * r * r];
    let g = &v[3 + 4 * r * r..3 + 5 * r * r];
    let u_mean = &v[3 + 5 * r * r..3 + 5 * r * r + r];
    let yb_mean = &v[3 + 5 * r * r + r..3 + 5 * r * r + 2 * r];
    // Z^T Z's blocks: P^T P (top left), Uc^T P (bottom left), Uc^T Uc (bottom right).
    let ptp = |i: usize, j: usize| z[i * 2 * r + j];
    let utp = |i: usize, j: usize| z[(r + i) * 2 * r + j];
    let utu = |i: usize, j: usize| z[(r + i) * 2 * r + r + j];
    let (mut ptp_utu, mut utp_sq, mut utp_tr, mut utu_g, mut mean_g_mean, mut cross_mean) =
        (0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    for i in 0..r {
        utp_tr += utp(i, i);
        cross_mean += yb_mean[i] * u_mean[i];
        for j in 0..r {
            ptp_utu += ptp(i, j) * utu(i, j);
            utp_sq += utp(i, j) * utp(j, i);
            utu_g += utu(i, j) * g[i * r + j];
            mean_g_mean += u_mean[i] * g[i * r + j] * u_mean[j];
        }
    }
    let n = n as f64;
    let kk = l2 + 4.0 * lup + 2.0 * ptp_utu + 2.0 * utp_sq;
    let kl = l2 + 2.0 * lup;
    let cross = utp_tr - utu_g / 2.0 + n * cross_mean;
    let xx = yy + 2.0 * cross + utu_g + n * mean_g_mean;
    [kk, xx * xx, l2, yy * yy, kl]
}

/// What CKA needs of one batch's rows at the linear (`X = Y + U B^T`) over its token rows
/// `rows`, in whichever of the moment (`d^2 n`) and Gram (`n^2 d`) forms costs less.
fn batch_norms(y: &Tensor, u: &Tensor, b: &Tensor, rows: &Tensor) -> Result<(Kept, Tensor)> {
    if !gram_form(rows.dim(0)?, y.dim(1)?) {
        return Ok((Kept::Norms, low_rank_norms(y, u, b, rows)?));
    }
    let terms = gram_terms(y, u, b, rows)?;
    Ok((Kept::GramTerms { rank: b.dim(1)? }, terms))
}

/// One measured micro-batch on the device: its rows and what it kept.
type OnDevice = (usize, Kept, Tensor);

/// Measured micro-batches as `(rows, five norms)` on the host, in the order given: one transfer
/// for all the batches that kept the same form and size (usually all of them).
fn host_norms<'a>(
    batches: impl IntoIterator<Item = &'a OnDevice>,
) -> Result<Vec<(usize, [f64; 5])>> {
    let batches: Vec<&OnDevice> = batches.into_iter().collect();
    let mut out = vec![(0, [0.0; 5]); batches.len()];
    let mut left: Vec<usize> = (0..batches.len()).collect();
    while let Some(&i0) = left.first() {
        let (_, kept, t0) = batches[i0];
        let (group, rest): (Vec<usize>, Vec<usize>) = left
            .iter()
            .partition(|&&i| batches[i].1 == *kept && batches[i].2.dims() == t0.dims());
        let ts: Vec<&Tensor> = group.iter().map(|&i| &batches[i].2).collect();
        for (&i, v) in group.iter().zip(Tensor::stack(&ts, 0)?.to_vec2::<f64>()?) {
            let (n, k, _) = batches[i];
            out[i] = (*n, k.norms(*n, &v));
        }
        left = rest;
    }
    Ok(out)
}

/// SAFE's importance measured on the training steps themselves (`safe.measure = "steps"`): the
/// training forward hands each adapter's rows over (`nn::RowSink`) and each micro-batch's CKA is
/// computed from them at once, so no monitoring forward runs and no moments outlive the layer.
/// An adapter's score is `1 - CKA` averaged over the round's monitored micro-batches (batches
/// where CKA is undefined left out). Its matmul FLOPs are counted apart (`flops`), so the trainer
/// can move them from training to monitoring.
#[derive(Default)]
pub struct StepMonitor {
    layer: Option<usize>,
    mask: Vec<u32>,
    rows: Option<Tensor>,
    /// The adapters measured (None: all). After warm-up only the candidates not yet frozen
    /// can still change anything (see `SafeController::needs_scores`).
    only: Option<Vec<AdapterId>>,
    /// Each adapter's per-micro-batch `(rows, what is kept)`, on the device until the round
    /// ends.
    norms: BTreeMap<AdapterId, Vec<OnDevice>>,
    /// Rows taken and not yet measured (see [`measured_together`]): `(adapter, y, u, b)` of one
    /// shape, at most [`CKA_GRAM_BATCH`], measured together when the batch is full, another
    /// shape comes or the layer ends.
    pending: Vec<(AdapterId, Tensor, Tensor, Tensor)>,
    /// Matmul FLOPs of the measurement.
    pub flops: u64,
}

/// One measured micro-batch of one adapter, on the host: what a step checkpoint keeps of a
/// round's measurement so far, so that a run resumed inside it scores the round as an
/// uninterrupted run does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MeasuredBatch {
    pub adapter: AdapterId,
    pub rows: usize,
    /// CKA's five norms in [`NORMS`](super::NORMS) order.
    pub norms: [f64; 5],
}

impl StepMonitor {
    pub fn new() -> Self {
        Self::default()
    }

    /// Measures only `adapters` from now on.
    pub fn only(mut self, adapters: Vec<AdapterId>) -> Self {
        self.only = Some(adapters);
        self
    }

    /// The micro-batches measured so far, on the host.
    pub fn measured(&self) -> Result<Vec<MeasuredBatch>> {
        let batches: Vec<(AdapterId, &OnDevice)> = self
            .norms
            .iter()
            .flat_map(|(&id, batches)| batches.iter().map(move |b| (id, b)))
            .collect();
        let on_host = host_norms(batches.iter().map(|&(_, b)| b))?;
        Ok(batches
            .iter()
            .zip(on_host)
            .map(|(&(adapter, _), (rows, norms))| MeasuredBatch {
                adapter,
                rows,
                norms,
            })
            .collect())
    }

    /// A monitor that carries on from `measured` (a step checkpoint's), its norms on `device`.
    pub fn resumed(measured: &[MeasuredBatch], device: &Device) -> Result<Self> {
        let mut m = Self::new();
        for b in measured {
            let t = Tensor::new(&b.norms, device)?;
            m.norms
                .entry(b.adapter)
                .or_default()
                .push((b.rows, Kept::Norms, t));
        }
        Ok(m)
    }

    /// Micro-batches measured so far (of the adapter measured most often).
    pub fn batches(&self) -> usize {
        self.norms.values().map(Vec::len).max().unwrap_or(0)
    }

    /// Each of `adapters`' importance (in that order), NaN outside `layers` (see
    /// [`trainable_layers`]) or where no batch defined it.
    pub fn scores(self, adapters: &[AdapterId], layers: Option<Range<usize>>) -> Result<Vec<f64>> {
        let mut scores = vec![f64::NAN; adapters.len()];
        let Some(layers) = layers else {
            return Ok(scores);
        };
        // Every scored batch in one transfer, then each adapter's mean over its batches.
        let scored: Vec<(usize, &Vec<OnDevice>)> = adapters
            .iter()
            .enumerate()
            .filter(|(_, id)| layers.contains(&id.layer))
            .filter_map(|(i, id)| Some((i, self.norms.get(id)?)))
            .collect();
        let mut norms = host_norms(scored.iter().flat_map(|(_, b)| b.iter()))?.into_iter();
        for (i, batches) in scored {
            let values: Vec<f64> = norms
                .by_ref()
                .take(batches.len())
                .map(|(n, v)| importance_of(n, &v))
                .filter(|v| v.is_finite())
                .collect();
            if !values.is_empty() {
                scores[i] = values.iter().sum::<f64>() / values.len() as f64;
            }
        }
        Ok(scores)
    }

    /// Measures the pending adapters' rows in one call.
    fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        let f0 = flops::total();
        let rows = self.token_rows(pending[0].1.device(), pending[0].1.dim(0)?)?;
        let items: Vec<(&Tensor, &Tensor, &Tensor)> =
            pending.iter().map(|(_, y, u, b)| (y, u, b)).collect();
        let terms = gram_terms_batch(&items, &rows)?;
        for ((id, _, _, b), t) in pending.iter().zip(terms) {
            let kept = Kept::GramTerms { rank: b.dim(1)? };
            self.norms
                .entry(*id)
                .or_default()
                .push((rows.dim(0)?, kept, t));
        }
        self.flops += flops::total() - f0;
        Ok(())
    }

    /// Whether no adapter measured after `site` in `layer` is left (when the measured adapters
    /// are known; a block lists its sites in its forward's order): then rows waiting for one
    /// would only be held longer.
    fn last_in_layer(&self, layer: usize, site: usize) -> bool {
        self.only
            .as_ref()
            .is_some_and(|only| !only.iter().any(|id| id.layer == layer && id.site > site))
    }

    fn measures(&self, id: AdapterId) -> bool {
        self.only.as_ref().is_none_or(|only| only.contains(&id))
    }

    fn token_rows(&mut self, device: &Device, n: usize) -> Result<Tensor> {
        if self.mask.len() != n {
            candle_core::bail!(
                "SAFE's in-step importance: a layer gave {n} rows, the batch's attention mask \
                 has {} (was the mask given?)",
                self.mask.len()
            );
        }
        if self.rows.is_none() {
            self.rows = Some(token_rows(&self.mask, device)?);
        }
        Ok(self.rows.clone().expect("just set"))
    }
}

impl RowSink for StepMonitor {
    fn enter_layer(&mut self, layer: Option<usize>) -> Result<()> {
        self.flush()?;
        self.layer = layer;
        Ok(())
    }

    fn takes(&self, site: usize) -> bool {
        self.layer
            .is_some_and(|layer| self.measures(AdapterId { layer, site }))
    }

    fn tokens(&mut self, attention_mask: &[u32]) {
        self.mask = attention_mask.to_vec();
        self.rows = None;
    }

    fn take(&mut self, site: usize, y: &Tensor, u: &Tensor, b: &Tensor) -> Result<()> {
        let Some(layer) = self.layer else {
            return Ok(());
        };
        let id = AdapterId { layer, site };
        if !self.measures(id) {
            return Ok(());
        }
        let rows = self.token_rows(y.device(), y.dim(0)?)?;
        let (n, d, r) = (rows.dim(0)?, y.dim(1)?, b.dim(1)?);
        if measured_together(n, d, r, y.device().is_cuda()) > 1 {
            let same = |(_, py, pu, pb): &(AdapterId, Tensor, Tensor, Tensor)| {
                (py.dims(), pu.dims(), pb.dims()) == (y.dims(), u.dims(), b.dims())
                    && (py.dtype(), pb.dtype()) == (y.dtype(), b.dtype())
            };
            if !self.pending.iter().all(same) {
                self.flush()?;
            }
            self.pending.push((id, y.clone(), u.clone(), b.clone()));
            if self.pending.len() == CKA_GRAM_BATCH || self.last_in_layer(layer, site) {
                self.flush()?;
            }
            return Ok(());
        }
        let f0 = flops::total();
        let (kept, t) = batch_norms(y, u, b, &rows)?;
        self.norms.entry(id).or_default().push((n, kept, t));
        self.flops += flops::total() - f0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::CkaRows;
    use crate::nn::cka::{gram_terms_composed, pick_rows};
    use crate::train::importance::DeviceMoments;

    /// Rows are asked for only inside a layer and only for the adapters measured, so every other
    /// adapter keeps its fused forward on a measured step.
    #[test]
    fn the_monitor_takes_only_the_measured_adapters_rows() {
        let mut m = StepMonitor::new().only(vec![AdapterId { layer: 1, site: 0 }]);
        assert!(!m.takes(0), "no layer entered");
        m.enter_layer(Some(1)).unwrap();
        assert!(m.takes(0));
        assert!(!m.takes(1), "site 1 of layer 1 is not measured");
        m.enter_layer(Some(2)).unwrap();
        assert!(!m.takes(0), "layer 2's adapters are not measured");
        let mut all = StepMonitor::new();
        all.enter_layer(Some(2)).unwrap();
        assert!(all.takes(0) && all.takes(1));
        all.enter_layer(None).unwrap();
        assert!(!all.takes(0));
    }

    /// At the linear the Gram form (`||L||^2`, `<L Uc, P>` and rank-r terms on the device, the
    /// norms on the host, `||X||` without `X`) gives the moment form's five norms, for rows with
    /// non-zero column means and padding rows dropped, and `batch_norms` picks the form by rows
    /// against width.
    #[test]
    fn low_rank_gram_norms_are_the_moments_norms() {
        let dev = Device::Cpu;
        let (seq, d, r) = (7, 9, 3);
        let made = |seed: u64, rows: usize, cols: usize, mean: f64| {
            let v: Vec<f64> = (0..rows * cols)
                .map(|i| ((i as u64 * 29 + seed * 13) % 19) as f64 * 0.2 - 1.7 + mean)
                .collect();
            Tensor::from_vec(v, (rows, cols), &dev).unwrap()
        };
        let (y, u, b) = (
            made(1, seq, d, 0.8),
            made(2, seq, r, -0.4),
            made(3, d, r, 0.1),
        );
        let rows = token_rows(&[1, 1, 0, 1, 1, 1, 0], &dev).unwrap();
        let low_rank = CkaRows::LowRank {
            y: y.clone(),
            u: u.clone(),
            b: b.clone(),
        };
        let moments: Vec<f64> = DeviceMoments::of(&low_rank, &rows)
            .unwrap()
            .norms()
            .unwrap()
            .1
            .to_vec1()
            .unwrap();
        let pick = |t: &Tensor| pick_rows(t, &rows).unwrap();
        let terms: Vec<f64> = gram_terms_composed(&pick(&y), &pick(&u), &b)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(terms.len(), 3 + 5 * r * r + 2 * r);
        let gram = gram_norms(5, r, &terms).to_vec();
        // The centered norms agree; the guard's scales are `||X||_F^4` and `||Y||_F^4` here (the
        // moments' are `||X^T X||_F^2` and `||Y^T Y||_F^2`).
        for i in [0, 2, 4] {
            let (g, m) = (gram[i], moments[i]);
            assert!((g - m).abs() < 1e-10 * m.abs(), "{gram:?} {moments:?}");
        }
        let (x, _) = low_rank.x_y().unwrap();
        for (i, t) in [(1, pick(&x)), (3, pick(&y))] {
            let raw = t
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
                .powi(2);
            assert!((gram[i] - raw).abs() < 1e-10 * raw, "{gram:?} {raw}");
        }
        // 5 rows under width 9: the Gram form; the same terms either way.
        let (kept, picked) = batch_norms(&y, &u, &b, &rows).unwrap();
        assert_eq!(kept, Kept::GramTerms { rank: r });
        assert_eq!(picked.to_vec1::<f64>().unwrap(), terms);
        // Every row a token row: no gather, the same terms as the rows picked one by one.
        let all = token_rows(&[1; 7], &dev).unwrap();
        let (_, whole) = batch_norms(&y, &u, &b, &all).unwrap();
        let gathered = gram_terms_composed(&y.index_select(&all, 0).unwrap(), &u, &b).unwrap();
        assert_eq!(
            whole.to_vec1::<f64>().unwrap(),
            gathered.to_vec1::<f64>().unwrap()
        );
        let score = importance_of(5, &gram);
        assert!(score > 1e-3, "the test needs a non-trivial score: {score}");
    }
}
