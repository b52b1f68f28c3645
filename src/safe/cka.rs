//! Linear CKA (Kornblith et al., 2019) and the SAFE importance score (paper Eq. 2-3).
//!
//! Eq. 2 is written without centering; CKA as defined by Kornblith et al. (and as used by the
//! works the paper cites) centers each column first, which makes the score invariant to a bias
//! shift between the adapted and the original layer. We implement the centered form.
//!
//! With rows = tokens, the Gram form `<K, L>_F` needs n x n matrices; the feature-space form
//! `||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)` is identical and only needs the column sums
//! and the uncentered products `X^T X`, `Y^T Y`, `Y^T X`, which add up over mini-batches.
//! Centering afterwards (`Xc^T Xc = X^T X - n mean_x mean_x^T`) loses some precision when the
//! column means are large relative to the spread; in f64 that is harmless for activations, but
//! moments accumulated in f32 on a device should be converted to f64 before summing many batches.

/// A side counts as constant when its centered Frobenius norm is at most this fraction of the
/// uncentered one: that is where `X^T X - n m m^T` is pure rounding noise.
const ZERO_VARIANCE_RTOL: f64 = 1e-12;

/// The squared Frobenius norms linear CKA is made of, over `rows` rows: of the centered products
/// `Xc^T Xc` (`xx`), `Yc^T Yc` (`yy`), `Yc^T Xc` (`yx`), and of the uncentered `X^T X`, `Y^T Y`
/// (`xx_raw`, `yy_raw`: the zero-variance guard's scale). Centering is `M - a b^T / rows` with
/// `a`, `b` the column sums. Whoever holds the moments computes these five numbers (the trainer
/// does it on the model's device, `train::importance`) and [`cka_from_norms`] does the rest.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CkaNorms {
    pub rows: usize,
    pub xx: f64,
    pub xx_raw: f64,
    pub yy: f64,
    pub yy_raw: f64,
    pub yx: f64,
}

/// Linear CKA `yx / sqrt(xx * yy)` from its norms; `None` for fewer than 2 rows, a side with
/// (numerically) zero variance (centered norm exactly 0 or `<= 1e-12 *` its uncentered norm), or
/// non-finite values. The value is not clamped: it lies in `[0, 1]` up to rounding.
pub fn cka_from_norms(m: &CkaNorms) -> Option<f64> {
    if m.rows < 2 {
        return None;
    }
    let (nx, ny) = (m.xx.sqrt(), m.yy.sqrt());
    let degenerate = |c: f64, raw2: f64| c == 0.0 || c <= ZERO_VARIANCE_RTOL * raw2.sqrt();
    if degenerate(nx, m.xx_raw) || degenerate(ny, m.yy_raw) {
        return None;
    }
    let v = m.yx / (nx * ny);
    v.is_finite().then_some(v)
}

fn add_into(acc: &mut [f64], v: &[f64]) {
    for (a, &b) in acc.iter_mut().zip(v) {
        *a += b;
    }
}

/// Center the columns of a row-major `[n, d]` matrix.
fn center_columns(m: &[f64], n: usize, d: usize) -> Vec<f64> {
    let mut mean = vec![0.0; d];
    for r in m.chunks_exact(d) {
        add_into(&mut mean, r);
    }
    mean.iter_mut().for_each(|v| *v /= n as f64);
    m.chunks_exact(d)
        .flat_map(|r| r.iter().zip(&mean).map(|(v, mu)| v - mu))
        .collect()
}

/// Centered Gram matrix `Mc Mc^T` (`[n, n]`) of a centered `[n, d]` matrix.
fn gram(mc: &[f64], n: usize, d: usize) -> Vec<f64> {
    let mut k = vec![0.0; n * n];
    for (i, ri) in mc.chunks_exact(d).enumerate() {
        for (j, rj) in mc.chunks_exact(d).enumerate() {
            k[i * n + j] = ri.iter().zip(rj).map(|(a, b)| a * b).sum();
        }
    }
    k
}

/// Direct O(n^2) formula with centered Gram matrices `K = Xc Xc^T`, `L = Yc Yc^T`:
/// `CKA = <K, L>_F / (||K||_F ||L||_F)`. Independent of the moment form the trainer computes
/// (`train::importance`); tests use it as the oracle. Same `None` cases (guard relative to `||X||_F^2`, which bounds the uncentered Gram norm).
pub fn linear_cka_gram(x: &[f64], y: &[f64], n: usize, dx: usize, dy: usize) -> Option<f64> {
    assert!(dx > 0 && dy > 0, "linear_cka_gram needs dx, dy > 0");
    assert_eq!(x.len(), n * dx, "x must hold n * dx values");
    assert_eq!(y.len(), n * dy, "y must hold n * dy values");
    if n < 2 {
        return None;
    }
    let k = gram(&center_columns(x, n, dx), n, dx);
    let l = gram(&center_columns(y, n, dy), n, dy);
    let frob = |m: &[f64]| m.iter().map(|v| v * v).sum::<f64>().sqrt();
    let (nk, nl) = (frob(&k), frob(&l));
    let sq = |m: &[f64]| m.iter().map(|v| v * v).sum::<f64>();
    let degenerate = |c: f64, raw: f64| c == 0.0 || c <= ZERO_VARIANCE_RTOL * raw;
    if degenerate(nk, sq(x)) || degenerate(nl, sq(y)) {
        return None;
    }
    let kl: f64 = k.iter().zip(&l).map(|(a, b)| a * b).sum();
    let v = kl / (nk * nl);
    v.is_finite().then_some(v)
}

/// Eq. 3: `importance = 1 - CKA`. Small = the adapted layer still represents what the frozen
/// layer did, so the adapter contributes little and is a freezing candidate.
pub fn importance(cka: f64) -> f64 {
    1.0 - cka
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64* giving uniforms in [-1, 1); deterministic, no `rand` dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let u = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11;
            u as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        }
        fn mat(&mut self, len: usize) -> Vec<f64> {
            (0..len).map(|_| self.next()).collect()
        }
    }

    /// `[n, a] x [a, b]`, row-major.
    fn matmul(x: &[f64], w: &[f64], n: usize, a: usize, b: usize) -> Vec<f64> {
        let mut out = vec![0.0; n * b];
        for r in 0..n {
            for k in 0..a {
                for c in 0..b {
                    out[r * b + c] += x[r * a + k] * w[k * b + c];
                }
            }
        }
        out
    }

    /// Orthogonal `[d, d]` matrix: Gram-Schmidt on the rows of a random matrix.
    fn orthogonal(rng: &mut Rng, d: usize) -> Vec<f64> {
        let mut q: Vec<Vec<f64>> = Vec::new();
        while q.len() < d {
            let mut v = rng.mat(d);
            for u in &q {
                let p: f64 = v.iter().zip(u).map(|(a, b)| a * b).sum();
                v.iter_mut().zip(u).for_each(|(a, b)| *a -= p * b);
            }
            let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt();
            if norm > 1e-3 {
                q.push(v.into_iter().map(|a| a / norm).collect());
            }
        }
        q.concat()
    }

    /// CKA as the trainer measures it: `train::importance` on candle tensors (f64 moments on the
    /// device, here the CPU), over batches of the given sizes. Each batch gets two padding rows
    /// (one among its rows, one at the end) of large values that its attention mask leaves out.
    fn measured_in(x: &[f64], y: &[f64], dx: usize, dy: usize, sizes: &[usize]) -> Option<f64> {
        use crate::train::importance::{importance_by_layer, token_rows, MonitorBatch};
        use candle_core::{DType, Device, Tensor};
        let dev = Device::Cpu;
        let (mut batches, mut xs, mut ys) = (Vec::new(), Vec::new(), Vec::new());
        let mut start = 0;
        for (i, &b) in sizes.iter().enumerate() {
            let pad_at = b / 2;
            let padded = |m: &[f64], d: usize| -> Tensor {
                let rows = &m[start * d..(start + b) * d];
                let mut v = Vec::new();
                for (r, row) in rows.chunks_exact(d).enumerate() {
                    if r == pad_at {
                        v.extend((0..d).map(|c| 1e3 + c as f64));
                    }
                    v.extend_from_slice(row);
                }
                if pad_at == b {
                    v.extend((0..d).map(|c| 1e3 + c as f64));
                }
                v.extend((0..d).map(|c| -7e2 * c as f64));
                Tensor::from_vec(v, (b + 2, d), &dev).unwrap()
            };
            xs.push(padded(x, dx));
            ys.push(padded(y, dy));
            let mask: Vec<u32> = (0..b + 2)
                .map(|r| u32::from(r != pad_at && r != b + 1))
                .collect();
            batches.push(MonitorBatch {
                batch: i,
                rows: token_rows(&mask, &dev).unwrap(),
                hidden: Tensor::zeros(1, DType::F64, &dev).unwrap(),
            });
            start += b;
        }
        assert_eq!((start * dx, start * dy), (x.len(), y.len()));
        let scores = importance_by_layer(&[0usize], &mut batches, 0..1, |_, &i, h| {
            let rows = crate::adapters::CkaRows::Full {
                x: xs[i].clone(),
                y: ys[i].clone(),
            };
            Ok((h.clone(), vec![(0, rows)]))
        })
        .unwrap();
        let s = scores[0];
        (!s.is_nan()).then_some(1.0 - s)
    }

    /// [`measured_in`] with every row in one batch.
    fn streamed(x: &[f64], y: &[f64], n: usize, dx: usize, dy: usize) -> Option<f64> {
        measured_in(x, y, dx, dy, &[n])
    }

    /// Correlated pair: `Y = X W + 0.5 noise`, with dx != dy.
    fn pair(rng: &mut Rng, n: usize, dx: usize, dy: usize) -> (Vec<f64>, Vec<f64>) {
        let x = rng.mat(n * dx);
        let w = rng.mat(dx * dy);
        let mut y = matmul(&x, &w, n, dx, dy);
        y.iter_mut().for_each(|v| *v += 0.5 * rng.next());
        (x, y)
    }

    #[test]
    fn self_similarity_and_isotropic_scaling() {
        let mut rng = Rng(7);
        let (n, d) = (40, 6);
        let x = rng.mat(n * d);
        assert!((streamed(&x, &x, n, d, d).unwrap() - 1.0).abs() < 1e-12);
        assert!((linear_cka_gram(&x, &x, n, d, d).unwrap() - 1.0).abs() < 1e-12);
        for a in [-3.5, 0.01, 1e3] {
            let ax: Vec<f64> = x.iter().map(|v| a * v).collect();
            assert!(
                (streamed(&x, &ax, n, d, d).unwrap() - 1.0).abs() < 1e-12,
                "a={a}"
            );
        }
    }

    #[test]
    fn orthogonal_invariance() {
        let mut rng = Rng(11);
        let (n, dx, dy) = (30, 5, 3);
        let (x, y) = pair(&mut rng, n, dx, dy);
        let q = orthogonal(&mut rng, dx);
        // Q really is orthogonal: Q Q^T = I (so the test cannot pass with a bad Q by accident).
        let mut qt = vec![0.0; dx * dx];
        for i in 0..dx {
            for j in 0..dx {
                qt[j * dx + i] = q[i * dx + j];
            }
        }
        let qqt = matmul(&q, &qt, dx, dx, dx);
        for i in 0..dx {
            for j in 0..dx {
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((qqt[i * dx + j] - want).abs() < 1e-12);
            }
        }
        let xq = matmul(&x, &q, n, dx, dx);
        assert!((streamed(&x, &xq, n, dx, dx).unwrap() - 1.0).abs() < 1e-12);
        let base = streamed(&x, &y, n, dx, dy).unwrap();
        assert!(
            base < 0.999,
            "test data should not be trivially similar: {base}"
        );
        assert!((streamed(&xq, &y, n, dx, dy).unwrap() - base).abs() < 1e-12);
    }

    #[test]
    fn streaming_matches_gram_oracle() {
        let mut rng = Rng(3);
        let (dx, dy) = (5, 3);
        let batches = [1, 7, 3, 20, 2, 17];
        let n: usize = batches.iter().sum();
        let (x, y) = pair(&mut rng, n, dx, dy);
        let got = measured_in(&x, &y, dx, dy, &batches).unwrap();
        let want = linear_cka_gram(&x, &y, n, dx, dy).unwrap();
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        assert!(got > 0.0 && got < 1.0);
        // The same rows in one batch give the same score.
        assert!((streamed(&x, &y, n, dx, dy).unwrap() - got).abs() < 1e-12);
        // Independent data must score clearly lower than the correlated pair.
        let z = rng.mat(n * dy);
        assert!(streamed(&x, &z, n, dx, dy).unwrap() < got);
    }

    #[test]
    fn hand_computed_examples() {
        // One column each, so CKA = Pearson r^2.
        // x = [1,2,3,4]: mean 2.5, xc = [-1.5,-0.5,0.5,1.5], ||xc||^2 = 5.
        // y = [1,3,2,4]: mean 2.5, yc = [-1.5,0.5,-0.5,1.5], ||yc||^2 = 5.
        // yc.xc = 2.25 - 0.25 - 0.25 + 2.25 = 4  =>  CKA = 4^2 / (5 * 5) = 0.64.
        let (x, y) = ([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]);
        assert!((streamed(&x, &y, 4, 1, 1).unwrap() - 0.64).abs() < 1e-12);
        assert!((linear_cka_gram(&x, &y, 4, 1, 1).unwrap() - 0.64).abs() < 1e-12);
        assert!((importance(0.64) - 0.36).abs() < 1e-12);
        // X = [[1,0],[0,1],[-1,0],[0,-1]] (column means 0), y = [1,0,-1,0]^T (mean 0).
        // Xc^T Xc = diag(2,2) -> norm 2*sqrt(2); yc^T yc = 2 -> norm 2; yc^T Xc = [2, 0] -> ||.||^2 = 4.
        // CKA = 4 / (2*sqrt(2) * 2) = 1/sqrt(2).
        let x2 = [1.0, 0.0, 0.0, 1.0, -1.0, 0.0, 0.0, -1.0];
        let y2 = [1.0, 0.0, -1.0, 0.0];
        let want = std::f64::consts::FRAC_1_SQRT_2;
        assert!((streamed(&x2, &y2, 4, 2, 1).unwrap() - want).abs() < 1e-12);
        assert!((linear_cka_gram(&x2, &y2, 4, 2, 1).unwrap() - want).abs() < 1e-12);
    }

    #[test]
    fn degenerate_inputs_give_none() {
        let mut rng = Rng(13);
        let (n, d) = (10, 3);
        let y = rng.mat(n * d);
        // Every column constant (different constants per column).
        let c: Vec<f64> = (0..n).flat_map(|_| [3.7, -1.1, 0.3]).collect();
        assert_eq!(streamed(&c, &y, n, d, d), None);
        assert_eq!(streamed(&y, &c, n, d, d), None);
        assert_eq!(linear_cka_gram(&c, &y, n, d, d), None);
        assert_eq!(streamed(&vec![0.0; n * d], &y, n, d, d), None);
        // One constant column among varying ones is still a valid representation.
        let mut partly = y.clone();
        (0..n).for_each(|r| partly[r * d] = 2.0);
        assert!(streamed(&partly, &y, n, d, d).is_some());
        // Fewer than 2 rows.
        assert_eq!(streamed(&y[..d], &y[..d], 1, d, d), None);
        // Two rows over two batches of one are enough; a constant side across batches is not.
        assert!(measured_in(&y[..2 * d], &y[..2 * d], d, d, &[1, 1]).is_some());
        let c2: Vec<f64> = (0..2).flat_map(|_| [1.5, 2.5, -4.0]).collect();
        assert_eq!(measured_in(&c2, &y[..2 * d], d, d, &[1, 1]), None);
        assert_eq!(linear_cka_gram(&y[..d], &y[..d], 1, d, d), None);
        // Non-finite input.
        let mut bad = y.clone();
        bad[4] = f64::NAN;
        assert_eq!(streamed(&bad, &y, n, d, d), None);
    }

    #[test]
    fn translation_invariance() {
        let mut rng = Rng(17);
        let (n, dx, dy) = (50, 4, 3);
        let (x, y) = pair(&mut rng, n, dx, dy);
        let xs: Vec<f64> = x
            .iter()
            .enumerate()
            .map(|(i, v)| v + 10.0 * (i % dx) as f64 - 5.0)
            .collect();
        let ys: Vec<f64> = y
            .iter()
            .enumerate()
            .map(|(i, v)| v - 3.0 * (i % dy) as f64 + 40.0)
            .collect();
        let base = streamed(&x, &y, n, dx, dy).unwrap();
        assert!((streamed(&xs, &ys, n, dx, dy).unwrap() - base).abs() < 1e-9);
        assert!((linear_cka_gram(&xs, &ys, n, dx, dy).unwrap() - base).abs() < 1e-9);
    }
}
