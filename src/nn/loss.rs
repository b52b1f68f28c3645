//! Losses returning the value and the gradient of the logits in one go (mean over the batch).

use super::flops::matmul;
use candle_core::{bail, DType, Result, Tensor, D};

/// Cross-entropy of `logits [batch, classes]` against class indices; returns `(loss, dlogits)`.
pub fn cross_entropy(logits: &Tensor, labels: &[u32]) -> Result<(f32, Tensor)> {
    let (b, k) = logits.dims2()?;
    let max = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp = shifted.broadcast_sub(&lse)?;
    let mut onehot = vec![0f32; b * k];
    for (i, &y) in labels.iter().enumerate() {
        onehot[i * k + y as usize] = 1.0;
    }
    let onehot = Tensor::from_vec(onehot, (b, k), logits.device())?.to_dtype(logits.dtype())?;
    let loss = (&logp * &onehot)?
        .sum_all()?
        .affine(-1.0 / b as f64, 0.0)?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    let dlogits = (logp.exp()? - onehot)?.affine(1.0 / b as f64, 0.0)?;
    Ok((loss, dlogits))
}

/// Extractive question answering's loss, as transformers' `BertForQuestionAnswering` computes
/// it: `(CE(start) + CE(end)) / 2`, each cross-entropy over a row's token positions and averaged
/// over the rows. `logits` is `[batch*seq, 2]` (start, end), `mask` the batch's 0/1 attention
/// mask (`[batch, seq]` row-major): padding positions get no probability and no gradient.
/// Returns `(loss, dlogits)`.
pub fn span_loss(
    logits: &Tensor,
    mask: &[u32],
    starts: &[u32],
    ends: &[u32],
    batch: usize,
    seq: usize,
) -> Result<(f32, Tensor)> {
    if mask.len() != batch * seq || starts.len() != batch || ends.len() != batch {
        bail!(
            "span_loss: mask of {} for {batch} x {seq}, {} starts, {} ends",
            mask.len(),
            starts.len(),
            ends.len()
        );
    }
    for (i, (&s, &e)) in starts.iter().zip(ends).enumerate() {
        let ok = |p: u32| (p as usize) < seq && mask[i * seq + p as usize] == 1;
        if !ok(s) || !ok(e) {
            bail!("span_loss: row {i}'s start {s} or end {e} is padding or past {seq} tokens");
        }
    }
    // A large negative rather than -inf: exp underflows to exactly 0 either way, and a row's max
    // (always a real token) keeps the shift finite.
    let add: Vec<f32> = mask
        .iter()
        .map(|&m| if m == 1 { 0.0 } else { -1e9 })
        .collect();
    let add = Tensor::from_vec(add, (batch, seq), logits.device())?.to_dtype(logits.dtype())?;
    let column = |c: usize, labels: &[u32]| -> Result<(f32, Tensor)> {
        let l = logits.narrow(1, c, 1)?.reshape((batch, seq))?;
        cross_entropy(&(l + &add)?, labels)
    };
    let (ls, gs) = column(0, starts)?;
    let (le, ge) = column(1, ends)?;
    let d = Tensor::stack(&[gs, ge], 2)?
        .reshape((batch * seq, 2))?
        .affine(0.5, 0.0)?;
    Ok(((ls + le) / 2.0, d))
}

/// Mean squared error of `pred [batch, 1]` against targets; returns `(loss, dpred)`.
pub fn mse(pred: &Tensor, targets: &[f32]) -> Result<(f32, Tensor)> {
    let b = targets.len();
    let t = Tensor::from_slice(targets, (b, 1), pred.device())?.to_dtype(pred.dtype())?;
    let diff = (pred - t)?;
    let loss = diff
        .sqr()?
        .sum_all()?
        .affine(1.0 / b as f64, 0.0)?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    Ok((loss, diff.affine(2.0 / b as f64, 0.0)?))
}

/// Target value of a row that is not scored (prompt, padding, a sequence's last token), as in
/// transformers.
pub const IGNORE_INDEX: i64 = -100;

/// Result of [`lm_head_loss`].
pub struct LmLoss {
    /// Sum of the per-token cross-entropies (nats) over counted tokens.
    pub loss_sum: f64,
    /// Rows whose target is not [`IGNORE_INDEX`].
    pub tokens: usize,
    /// Gradient of the mean loss `loss_sum / tokens` with respect to `hidden`, `[rows, hidden]`
    /// (zero rows where ignored; all zero when no token counts).
    pub dhidden: Option<Tensor>,
}

/// Causal-LM cross-entropy through a frozen LM head (tied or not), without ever holding the
/// `[rows, vocab]` logits: with a 32k-150k vocabulary those dwarf every activation of the model.
/// `hidden` is `[rows, hidden]`, row `i` predicting `targets[i]` ([`IGNORE_INDEX`] = skip);
/// `head_weight` is `[vocab, hidden]`. Only counted rows are scored, `chunk_rows` at a time:
/// logits chunk, log-softmax (max-subtracted), loss and `dlogits`, then `dlogits @ W` for those
/// rows of `dhidden`. Peak extra memory is two `[chunk_rows, vocab]` buffers.
pub fn lm_head_loss(
    hidden: &Tensor,
    head_weight: &Tensor,
    targets: &[i64],
    chunk_rows: usize,
    need_grad: bool,
) -> Result<LmLoss> {
    lm_head_loss_impl(hidden, head_weight, targets, chunk_rows, need_grad, true)
}

/// [`lm_head_loss`] through the candle composition only (no fused kernel): the reference of
/// `safetune self-test` and the tests.
pub fn lm_head_loss_reference(
    hidden: &Tensor,
    head_weight: &Tensor,
    targets: &[i64],
    chunk_rows: usize,
) -> Result<LmLoss> {
    lm_head_loss_impl(hidden, head_weight, targets, chunk_rows, true, false)
}

fn lm_head_loss_impl(
    hidden: &Tensor,
    head_weight: &Tensor,
    targets: &[i64],
    chunk_rows: usize,
    need_grad: bool,
    fused: bool,
) -> Result<LmLoss> {
    let (rows, h) = hidden.dims2()?;
    let (vocab, hw) = head_weight.dims2()?;
    if hw != h || targets.len() != rows || chunk_rows == 0 {
        bail!(
            "lm_head_loss: hidden [{rows}, {h}], head [{vocab}, {hw}], {} targets, chunk {chunk_rows}",
            targets.len()
        );
    }
    let mut counted = Vec::new();
    let mut labels = Vec::new();
    for (i, &t) in targets.iter().enumerate() {
        if t == IGNORE_INDEX {
            continue;
        }
        if t < 0 || t as usize >= vocab {
            bail!("lm_head_loss: target {t} at row {i} outside the vocabulary of {vocab}");
        }
        counted.push(i as u32);
        labels.push(t as u32);
    }
    let tokens = counted.len();
    let zeros = || Tensor::zeros((rows, h), hidden.dtype(), hidden.device());
    if tokens == 0 {
        let dhidden = need_grad.then(zeros).transpose()?;
        return Ok(LmLoss {
            loss_sum: 0.0,
            tokens,
            dhidden,
        });
    }
    // Gather the counted rows so that ignored ones cost no matmul: a view when they are one run
    // (a sequence's last row has no target).
    let runs = row_runs(&counted);
    let index = Tensor::from_vec(counted, tokens, hidden.device())?;
    let sel = match runs[..] {
        [(start, n)] => hidden.narrow(0, start, n)?,
        _ => hidden.index_select(&index, 0)?,
    };
    let grad_scale = need_grad.then_some(1.0 / tokens as f64);
    let w_t = head_weight.t()?;
    let mut loss = ChunkLoss::default();
    let mut dsel = Vec::new();
    for start in (0..tokens).step_by(chunk_rows) {
        let n = chunk_rows.min(tokens - start);
        let logits = matmul(&sel.narrow(0, start, n)?, &w_t)?;
        let dlogits = chunk_loss(
            &logits,
            &labels[start..start + n],
            grad_scale,
            fused,
            &mut loss,
        )?;
        drop(logits);
        if let Some(d) = dlogits {
            // The gradient flows back in the head's dtype (bf16 logits' gradient is bf16).
            dsel.push(matmul(&d.to_dtype(head_weight.dtype())?, head_weight)?);
        }
    }
    let loss_sum = loss.total()?;
    let dhidden = if need_grad {
        let dsel = Tensor::cat(&dsel, 0)?.to_dtype(hidden.dtype())?;
        Some(match runs[..] {
            [(0, n)] if n == rows => dsel,
            _ if runs.len() * 8 <= tokens => spread_runs(&dsel, &runs, rows)?,
            _ => zeros()?.index_add(&index, &dsel, 0)?,
        })
    } else {
        None
    };
    Ok(LmLoss {
        loss_sum,
        tokens,
        dhidden,
    })
}

/// The maximal runs `(start, len)` of consecutive values in `sorted` (ascending).
fn row_runs(sorted: &[u32]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for &i in sorted {
        match runs.last_mut() {
            Some((start, len)) if *start + *len == i as usize => *len += 1,
            _ => runs.push((i as usize, 1)),
        }
    }
    runs
}

/// `rows` rows, zero but where `runs` (as [`row_runs`] gives them) place the rows of `x` in order:
/// one copy per run and per gap, where `index_add` takes one atomic add per element.
fn spread_runs(x: &Tensor, runs: &[(usize, usize)], rows: usize) -> Result<Tensor> {
    let width = x.dim(1)?;
    let zeros = |n: usize| Tensor::zeros((n, width), x.dtype(), x.device());
    let (mut parts, mut at, mut taken) = (Vec::new(), 0, 0);
    for &(start, len) in runs {
        if start > at {
            parts.push(zeros(start - at)?);
        }
        parts.push(x.narrow(0, taken, len)?);
        (at, taken) = (start + len, taken + len);
    }
    if rows > at {
        parts.push(zeros(rows - at)?);
    }
    Tensor::cat(&parts, 0)
}

/// A loss summed over chunks: on the host, or as the device's row losses, added up once at the
/// end (one synchronisation a step instead of one a chunk).
#[derive(Default)]
struct ChunkLoss {
    host: f64,
    rows: Vec<Tensor>,
}

impl ChunkLoss {
    fn total(self) -> Result<f64> {
        if self.rows.is_empty() {
            return Ok(self.host);
        }
        let rows = Tensor::cat(&self.rows, 0)?.to_dtype(DType::F64)?;
        Ok(self.host + rows.sum_all()?.to_scalar::<f64>()?)
    }
}

/// Adds the summed cross-entropy of one chunk of logits to `loss`, and returns `dlogits *
/// grad_scale` if asked: the fused CPU or CUDA kernel, or the candle composition (other devices
/// and dtypes; the kernels' reference).
fn chunk_loss(
    logits: &Tensor,
    labels: &[u32],
    grad_scale: Option<f64>,
    fused: bool,
    loss: &mut ChunkLoss,
) -> Result<Option<Tensor>> {
    if fused {
        if let Some((sum, d)) = super::cpu::cross_entropy_rows(logits, labels, grad_scale)? {
            loss.host += sum;
            return Ok(d);
        }
        if let Some((rows, d)) = super::gpu::cross_entropy_rows(logits, labels, grad_scale)? {
            loss.rows.push(rows);
            return Ok(d);
        }
    }
    // In f32 for half-precision logits (a log-softmax over 10^4-10^5 entries).
    let logits = logits.to_dtype(crate::device::compute_dtype(logits.dtype()))?;
    let n = logits.dim(0)?;
    let logp = {
        let shifted = logits.broadcast_sub(&logits.max_keepdim(D::Minus1)?)?;
        let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
        shifted.broadcast_sub(&lse)?
    };
    drop(logits);
    let index = Tensor::from_slice(labels, (n, 1), logp.device())?;
    loss.host -= logp
        .gather(&index, 1)?
        .to_dtype(DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?;
    let dlogits = match grad_scale {
        Some(g) => {
            // softmax - onehot: 1 subtracted in place at each row's target, on the device.
            let d = logp.exp()?;
            drop(logp);
            let minus_one = Tensor::ones((n, 1), d.dtype(), d.device())?.neg()?;
            d.scatter_add_set(&index, &minus_one, 1)?;
            Some(d.affine(g, 0.0)?)
        }
        None => None,
    };
    Ok(dlogits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{check, max_abs_diff, randn};

    #[test]
    fn rows_spread_by_runs_are_index_add_into_zeros() {
        use candle_core::Device;
        let counted = [0u32, 1, 2, 5, 6, 9];
        let runs = row_runs(&counted);
        assert_eq!(runs, vec![(0, 3), (5, 2), (9, 1)]);
        let x = randn(&[6, 4], 90).to_dtype(DType::F32).unwrap();
        for rows in [10, 13] {
            let spread = spread_runs(&x, &runs, rows).unwrap();
            let index = Tensor::new(&counted[..], &Device::Cpu).unwrap();
            let added = Tensor::zeros((rows, 4), DType::F32, &Device::Cpu)
                .unwrap()
                .index_add(&index, &x, 0)
                .unwrap();
            assert_eq!(spread.dims(), [rows, 4]);
            assert_eq!(max_abs_diff(&spread, &added), 0.0);
        }
        assert_eq!(row_runs(&[]), vec![]);
        assert_eq!(row_runs(&[3]), vec![(3, 1)]);
    }

    #[test]
    fn cross_entropy_gradient_and_value() {
        let logits = randn(&[4, 3], 31).affine(2.0, 0.0).unwrap();
        let labels = [0u32, 2, 1, 2];
        let (loss, d) = cross_entropy(&logits, &labels).unwrap();
        // Value against a direct computation: -mean(log softmax at the label).
        let rows: Vec<Vec<f64>> = logits.to_vec2().unwrap();
        let expect: f64 = rows
            .iter()
            .zip(labels)
            .map(|(r, y)| r.iter().map(|v| v.exp()).sum::<f64>().ln() - r[y as usize])
            .sum::<f64>()
            / 4.0;
        assert!((loss as f64 - expect).abs() < 1e-6);
        // The gradient is d(loss)/d(logits): weight the oracle with dy = 1.
        let ones = Tensor::ones((4, 3), DType::F64, logits.device()).unwrap();
        let onehot = {
            let mut v = vec![0f64; 12];
            for (i, y) in labels.iter().enumerate() {
                v[i * 3 + *y as usize] = 1.0;
            }
            Tensor::from_vec(v, (4, 3), logits.device()).unwrap()
        };
        check(
            &[logits],
            &ones,
            &[d],
            |t| {
                // Per-element contribution whose total is the loss.
                let lse = t[0].exp()?.sum_keepdim(1)?.log()?;
                let logp = t[0].broadcast_sub(&lse)?;
                (logp * &onehot)?.affine(-1.0 / 4.0, 0.0)
            },
            1e-10,
        );
    }

    #[test]
    fn mse_gradient_and_value() {
        let pred = randn(&[5, 1], 33);
        let targets = [0.5f32, -1.0, 2.0, 0.0, 0.25];
        let (loss, d) = mse(&pred, &targets).unwrap();
        let p: Vec<f64> = pred.flatten_all().unwrap().to_vec1().unwrap();
        let expect: f64 = p
            .iter()
            .zip(targets)
            .map(|(a, b)| (a - b as f64).powi(2))
            .sum::<f64>()
            / 5.0;
        assert!((loss as f64 - expect).abs() < 1e-6);
        let t = Tensor::from_vec(
            targets.iter().map(|v| *v as f64).collect::<Vec<_>>(),
            (5, 1),
            pred.device(),
        )
        .unwrap();
        let ones = Tensor::ones((5, 1), DType::F64, pred.device()).unwrap();
        check(
            &[pred],
            &ones,
            &[d],
            |x| (&x[0] - &t)?.sqr()?.affine(0.2, 0.0),
            1e-10,
        );
    }

    /// `[rows, vocab]` per-element contributions whose sum is the mean loss: full logits, log-softmax,
    /// the target's entry weighted `-1/tokens` (ignored rows weigh nothing).
    fn lm_oracle(h: &Tensor, w: &Tensor, targets: &[i64]) -> candle_core::Result<Tensor> {
        let logits = h.matmul(&w.t()?)?;
        let (rows, v) = logits.dims2()?;
        let tokens = targets.iter().filter(|&&t| t != IGNORE_INDEX).count() as f64;
        let mut weights = vec![0f64; rows * v];
        for (i, &t) in targets.iter().enumerate() {
            if t != IGNORE_INDEX {
                weights[i * v + t as usize] = -1.0 / tokens;
            }
        }
        let weights = Tensor::from_vec(weights, (rows, v), h.device())?;
        let lse = logits.exp()?.sum_keepdim(1)?.log()?;
        logits.broadcast_sub(&lse)? * weights
    }

    const TARGETS: [i64; 7] = [3, -100, 0, 10, -100, 2, 7];

    #[test]
    fn lm_head_loss_gradient_and_value() {
        let h = randn(&[7, 5], 51).affine(2.0, 0.0).unwrap();
        let w = randn(&[11, 5], 52);
        let out = lm_head_loss(&h, &w, &TARGETS, 2, true).unwrap();
        assert_eq!(out.tokens, 5);
        let mean = lm_oracle(&h, &w, &TARGETS).unwrap().sum_all().unwrap();
        let mean = mean.to_scalar::<f64>().unwrap();
        assert!((out.loss_sum / 5.0 - mean).abs() < 1e-12);
        let ones = Tensor::ones((7, 11), DType::F64, h.device()).unwrap();
        let dh = out.dhidden.unwrap();
        check(
            &[h],
            &ones,
            &[dh],
            |t| lm_oracle(&t[0], &w, &TARGETS),
            1e-10,
        );
    }

    #[test]
    fn lm_head_loss_does_not_depend_on_the_chunk_size() {
        let h = randn(&[7, 5], 53);
        let w = randn(&[11, 5], 54);
        let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let (h32, w32) = (f32(&h), f32(&w));
        let base = lm_head_loss(&h, &w, &TARGETS, 7, true).unwrap();
        let base32 = lm_head_loss(&h32, &w32, &TARGETS, 7, true).unwrap();
        for chunk in [1, 2, 3, 4, 100] {
            let o = lm_head_loss(&h, &w, &TARGETS, chunk, true).unwrap();
            assert!((o.loss_sum - base.loss_sum).abs() < 1e-12, "chunk {chunk}");
            let d = max_abs_diff(o.dhidden.as_ref().unwrap(), base.dhidden.as_ref().unwrap());
            assert!(d < 1e-14, "chunk {chunk}: {d}");
            let o = lm_head_loss(&h32, &w32, &TARGETS, chunk, true).unwrap();
            assert!((o.loss_sum - base32.loss_sum).abs() < 1e-5, "chunk {chunk}");
            let d = max_abs_diff(
                o.dhidden.as_ref().unwrap(),
                base32.dhidden.as_ref().unwrap(),
            );
            assert!(d < 1e-6, "chunk {chunk}: {d}");
        }
    }

    #[test]
    fn lm_head_loss_fused_kernel_matches_the_composition() {
        let f32 = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        let (rows, hid, vocab) = (20, 16, 300);
        let w = f32(randn(&[vocab, hid], 56));
        let targets: Vec<i64> = (0..rows as i64)
            .map(|i| {
                if i % 5 == 4 {
                    IGNORE_INDEX
                } else {
                    (i * 37) % vocab as i64
                }
            })
            .collect();
        // Scale 1 is typical; scale 300 gives logits in the thousands (max-subtraction needed).
        for scale in [1.0, 300.0] {
            let h = f32(randn(&[rows, hid], 55).affine(scale, 0.0).unwrap());
            let a = lm_head_loss_impl(&h, &w, &targets, 6, true, true).unwrap();
            let b = lm_head_loss_impl(&h, &w, &targets, 6, true, false).unwrap();
            assert!(a.loss_sum.is_finite() && b.loss_sum.is_finite());
            assert!((a.loss_sum - b.loss_sum).abs() < 1e-5 * (1.0 + b.loss_sum.abs()));
            let (da, db) = (a.dhidden.unwrap(), b.dhidden.unwrap());
            assert!(max_abs_diff(&da, &db) < 1e-5, "scale {scale}");
            let c = lm_head_loss_impl(&h, &w, &targets, 6, false, true).unwrap();
            assert!(c.dhidden.is_none() && (c.loss_sum - a.loss_sum).abs() < 1e-9);
        }
    }

    #[test]
    fn lm_head_loss_edge_cases() {
        let h = randn(&[3, 4], 57);
        let w = randn(&[6, 4], 58);
        let none = lm_head_loss(&h, &w, &[-100, -100, -100], 2, true).unwrap();
        assert_eq!((none.tokens, none.loss_sum), (0, 0.0));
        let dh = none.dhidden.unwrap();
        assert_eq!(dh.dims2().unwrap(), (3, 4));
        assert_eq!(
            dh.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap(),
            0.0
        );
        assert!(lm_head_loss(&h, &w, &[0, 6, 1], 2, true).is_err());
        assert!(lm_head_loss(&h, &w, &[0, 1], 2, true).is_err());
        assert!(lm_head_loss(&h, &w, &[0, 1, 2], 0, true).is_err());
    }

    /// The span loss is the mean of the start and end cross-entropies over each row's real
    /// tokens (computed directly in f64 here); its gradient matches central finite differences
    /// of that direct value, is zero at padding, and padding logits do not change the loss.
    #[test]
    fn span_loss_value_gradient_and_padding() {
        let (b, t) = (3, 5);
        let logits = randn(&[b * t, 2], 41).affine(3.0, 0.0).unwrap();
        let mask: Vec<u32> = [5, 3, 4]
            .iter()
            .flat_map(|&n| (0..t).map(move |j| u32::from(j < n)))
            .collect();
        let (starts, ends) = ([0u32, 1, 2], [4u32, 2, 3]);
        let direct = |v: &[f64]| -> f64 {
            let mut sum = 0.0;
            for r in 0..b {
                for (c, gold) in [(0, starts[r]), (1, ends[r])] {
                    let xs: Vec<f64> = (0..t)
                        .filter(|&j| mask[r * t + j] == 1)
                        .map(|j| v[(r * t + j) * 2 + c])
                        .collect();
                    let lse = xs.iter().map(|x| x.exp()).sum::<f64>().ln();
                    sum += lse - v[(r * t + gold as usize) * 2 + c];
                }
            }
            sum / (2.0 * b as f64)
        };
        let flat: Vec<f64> = logits.flatten_all().unwrap().to_vec1().unwrap();
        let (loss, d) = span_loss(&logits, &mask, &starts, &ends, b, t).unwrap();
        assert!((loss as f64 - direct(&flat)).abs() < 1e-5, "{loss}");
        let d: Vec<f64> = d.flatten_all().unwrap().to_vec1().unwrap();
        for i in 0..flat.len() {
            let h = 1e-6;
            let (mut up, mut down) = (flat.clone(), flat.clone());
            up[i] += h;
            down[i] -= h;
            let fd = (direct(&up) - direct(&down)) / (2.0 * h);
            assert!((fd - d[i]).abs() < 1e-6, "logit {i}: fd {fd} vs {}", d[i]);
            if mask[i / 2] == 0 {
                assert_eq!(d[i], 0.0, "padding logit {i}");
            }
        }
        // Other values at the padding positions: the same loss.
        let moved: Vec<f64> = flat
            .iter()
            .enumerate()
            .map(|(i, &x)| if mask[i / 2] == 0 { x + 50.0 } else { x })
            .collect();
        let moved = Tensor::from_vec(moved, (b * t, 2), &candle_core::Device::Cpu).unwrap();
        let (again, _) = span_loss(&moved, &mask, &starts, &ends, b, t).unwrap();
        assert_eq!(again.to_bits(), loss.to_bits());
        // A label on padding is refused.
        assert!(span_loss(&logits, &mask, &[0, 4, 0], &ends, b, t).is_err());
    }
}
