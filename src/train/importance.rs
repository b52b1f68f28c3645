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
//! reach the host, not three `d x d` matrices.

use crate::adapters::{Adapted, AdapterId, CkaRows};
use crate::nn::{flops, RowSink};
use crate::safe::{cka_from_norms, CkaNorms};
use candle_core::{DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
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
/// in `O(d^2 r)` when the round's batches are done).
enum DeviceMoments {
    Full {
        n: usize,
        sum_x: Tensor,
        sum_y: Tensor,
        xtx: Tensor,
        yty: Tensor,
        ytx: Tensor,
    },
    LowRank {
        n: usize,
        sum_y: Tensor,
        sum_u: Tensor,
        yty: Tensor,
        ytu: Tensor,
        utu: Tensor,
        b: Tensor,
    },
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
            CkaRows::LowRank { y, u, b } => {
                let (y, u) = (pick(y)?, pick(u)?);
                Self::LowRank {
                    n: y.dim(0)?,
                    sum_y: y.sum(0)?,
                    sum_u: u.sum(0)?,
                    yty: mm(&y, &y)?,
                    ytu: mm(&y, &u)?,
                    utu: mm(&u, &u)?,
                    b: b.to_dtype(DType::F64)?,
                }
            }
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
            Self::LowRank {
                n,
                sum_y,
                sum_u,
                yty,
                ytu,
                utu,
                ..
            } => (n, [sum_y, sum_u, yty, ytu, utu]),
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

    /// `(n, sum_x, sum_y, X^T X, Y^T Y, Y^T X)`. From the low-rank form, with `C = (Y^T U) B^T`
    /// (`= Y^T (X - Y)`): `Y^T X = Y^T Y + C`, `X^T X = Y^T Y + C + C^T + B (U^T U) B^T`, and
    /// `sum_x = sum_y + B sum_u`.
    #[allow(clippy::type_complexity)]
    fn full(self) -> Result<(usize, Tensor, Tensor, Tensor, Tensor, Tensor)> {
        match self {
            Self::Full {
                n,
                sum_x,
                sum_y,
                xtx,
                yty,
                ytx,
            } => Ok((n, sum_x, sum_y, xtx, yty, ytx)),
            Self::LowRank {
                n,
                sum_y,
                sum_u,
                yty,
                ytu,
                utu,
                b,
            } => {
                let mm = crate::nn::matmul;
                let c = mm(&ytu, &b.t()?)?;
                let ytx = (&yty + &c)?;
                let bub = mm(&mm(&b, &utu)?, &b.t()?)?;
                let xtx = ((&ytx + c.t()?)? + bub)?;
                let sum_x = (&sum_y + mm(&b, &sum_u.unsqueeze(1)?)?.squeeze(1)?)?;
                Ok((n, sum_x, sum_y, xtx, yty, ytx))
            }
        }
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
        let (rows, sum_x, sum_y, xtx, yty, ytx) = self.full()?;
        let n = rows as f64;
        // ||M - a b^T / n||_F^2.
        let centered = |m: &Tensor, a: &Tensor, b: &Tensor| -> Result<Tensor> {
            let outer = a.unsqueeze(1)?.broadcast_mul(&b.unsqueeze(0)?)?;
            sum_sq(&(m - (outer / n)?)?)
        };
        let norms = [
            centered(&xtx, &sum_x, &sum_x)?,
            sum_sq(&xtx)?,
            centered(&yty, &sum_y, &sum_y)?,
            sum_sq(&yty)?,
            centered(&ytx, &sum_y, &sum_x)?,
        ];
        Ok((rows, Tensor::stack(&norms, 0)?))
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

/// The token rows `rows` of `[n, d]` rows `t`, in f64 (CKA's norms cancel in lower precision).
fn pick_rows(t: &Tensor, rows: &Tensor) -> Result<Tensor> {
    // Token rows are distinct: as many as the tensor has rows means all of them, in order.
    if rows.dim(0)? == t.dim(0)? {
        return t.to_dtype(DType::F64);
    }
    t.index_select(rows, 0)?.to_dtype(DType::F64)
}

/// Sum of squares as a 0-d tensor, by rows first: candle's CUDA `sum_all` reduces in one thread
/// block, which took 4.9 of a 7B round's 5.7 s; `d` row sums spread over the device.
fn sum_sq(t: &Tensor) -> Result<Tensor> {
    t.sqr()?.sum(1)?.sum_all()
}

/// What a measured micro-batch keeps on the device until its round ends: the five norms (the
/// moment form computes them there), or the Gram form's raw terms, which the host turns into
/// the norms (see [`gram_terms`]). Either way a few numbers, so nothing of size `n` or `d`
/// outlives the layer.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kept {
    Norms,
    GramTerms { rank: usize },
}

impl Kept {
    /// The five norms in [`NORMS`] order of `rows` rows from what was kept.
    fn norms(self, rows: usize, v: &[f64]) -> [f64; 5] {
        match self {
            Self::Norms => [v[0], v[1], v[2], v[3], v[4]],
            Self::GramTerms { rank } => gram_norms(rows, rank, v),
        }
    }
}

/// The Gram form's terms of one batch's rows at the linear, `X = Y + U B^T` (`Y` `[n, d]`, `U`
/// `[n, r]`, `B` `[d, r]`, f64): `O(n^2 d)` instead of the moments' `O(n d^2)`, the cheaper
/// one when a batch has fewer token rows than the layer is wide. With `L = Yc Yc^T` (the one
/// `n x n x d` product), `G = B^T B` and `P = Yc B + Uc G / 2`, the centered Gram of `X` is
/// `K = L + P Uc^T + Uc P^T`, so CKA's norms need from the device only `||L||^2`,
/// `<L Uc, P>`, `||Y||^2` and `r`-sized terms: `Z^T Z` for `Z = [P Uc]`, `G`, the column
/// means of `U` and `mean(Y) B` ([`gram_norms`] does the rest on the host). Every step is a
/// device kernel, so fewer steps is what makes a measured step cheap on a GPU.
///
/// Layout: `[||L||^2, <L Uc, P>, ||Y||^2, Z^T Z (2r x 2r), G (r x r), mean(U) (r), mean(Y) B (r)]`.
fn gram_terms(y: &Tensor, u: &Tensor, b: &Tensor) -> Result<Tensor> {
    let mm = crate::nn::matmul;
    let y_mean = y.mean_keepdim(0)?;
    let u_mean = u.mean_keepdim(0)?;
    let yc = y.broadcast_sub(&y_mean)?;
    let uc = u.broadcast_sub(&u_mean)?;
    let l = mm(&yc, &yc.t()?)?;
    let g = mm(&b.t()?, b)?;
    let p = (mm(&yc, b)? + mm(&uc, &(&g * 0.5)?)?)?;
    let z = Tensor::cat(&[&p, &uc], 1)?;
    // Sums by rows first, as in `sum_sq`.
    let scalars = [
        sum_sq(&l)?,
        (mm(&l, &uc)? * &p)?.sum(1)?.sum_all()?,
        sum_sq(y)?,
    ];
    let flat = |t: Tensor| t.flatten_all();
    Tensor::cat(
        &[
            Tensor::stack(&scalars, 0)?,
            flat(mm(&z.t()?, &z)?)?,
            flat(g)?,
            flat(u_mean)?,
            flat(mm(&y_mean, b)?)?,
        ],
        0,
    )
}

/// CKA's five norms (in [`NORMS`] order) of `n` rows from their Gram-form terms (see
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
    if rows.dim(0)? > y.dim(1)? {
        let r = CkaRows::LowRank {
            y: y.clone(),
            u: u.clone(),
            b: b.clone(),
        };
        return Ok((Kept::Norms, DeviceMoments::of(&r, rows)?.norms()?.1));
    }
    let terms = gram_terms(
        &pick_rows(y, rows)?,
        &pick_rows(u, rows)?,
        &b.to_dtype(DType::F64)?,
    )?;
    Ok((Kept::GramTerms { rank: b.dim(1)? }, terms))
}

/// One adapter's measured micro-batches as `(rows, five norms)` on the host: one transfer when
/// every batch kept the same form (the usual case), one per batch otherwise.
fn host_norms(batches: &[(usize, Kept, Tensor)]) -> Result<Vec<(usize, [f64; 5])>> {
    let Some((_, first, t0)) = batches.first() else {
        return Ok(Vec::new());
    };
    let same = batches
        .iter()
        .all(|(_, k, t)| k == first && t.dims() == t0.dims());
    let values: Vec<Vec<f64>> = if same {
        let ts: Vec<&Tensor> = batches.iter().map(|(_, _, t)| t).collect();
        Tensor::stack(&ts, 0)?.to_vec2()?
    } else {
        batches
            .iter()
            .map(|(_, _, t)| t.to_vec1())
            .collect::<Result<_>>()?
    };
    Ok(batches
        .iter()
        .zip(values)
        .map(|((n, k, _), v)| (*n, k.norms(*n, &v)))
        .collect())
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
    norms: BTreeMap<AdapterId, Vec<(usize, Kept, Tensor)>>,
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
    /// CKA's five norms in [`NORMS`] order.
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
        let mut out = Vec::new();
        for (&adapter, batches) in &self.norms {
            for (rows, norms) in host_norms(batches)? {
                out.push(MeasuredBatch {
                    adapter,
                    rows,
                    norms,
                });
            }
        }
        Ok(out)
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
        for (score, id) in scores.iter_mut().zip(adapters) {
            let Some(batches) = self.norms.get(id).filter(|_| layers.contains(&id.layer)) else {
                continue;
            };
            let values: Vec<f64> = host_norms(batches)?
                .into_iter()
                .map(|(n, v)| importance_of(n, &v))
                .filter(|v| v.is_finite())
                .collect();
            if !values.is_empty() {
                *score = values.iter().sum::<f64>() / values.len() as f64;
            }
        }
        Ok(scores)
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
    fn enter_layer(&mut self, layer: Option<usize>) {
        self.layer = layer;
    }

    fn taking(&self) -> bool {
        self.layer.is_some()
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
        if self.only.as_ref().is_some_and(|only| !only.contains(&id)) {
            return Ok(());
        }
        let f0 = flops::total();
        let rows = self.token_rows(y.device(), y.dim(0)?)?;
        let (kept, t) = batch_norms(y, u, b, &rows)?;
        self.norms
            .entry(id)
            .or_default()
            .push((rows.dim(0)?, kept, t));
        self.flops += flops::total() - f0;
        Ok(())
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
        let terms: Vec<f64> = gram_terms(&pick(&y), &pick(&u), &b)
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
        let gathered = gram_terms(&y.index_select(&all, 0).unwrap(), &u, &b).unwrap();
        assert_eq!(
            whole.to_vec1::<f64>().unwrap(),
            gathered.to_vec1::<f64>().unwrap()
        );
        let score = importance_of(5, &gram);
        assert!(score > 1e-3, "the test needs a non-trivial score: {score}");
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
