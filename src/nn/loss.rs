//! Losses returning the value and the gradient of the logits in one go (mean over the batch).

use candle_core::{DType, Result, Tensor, D};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{check, randn};

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
}
