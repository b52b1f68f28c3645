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

use serde::{Deserialize, Serialize};

/// A side counts as constant when its centered Frobenius norm is at most this fraction of the
/// uncentered one: that is where `X^T X - n m m^T` is pure rounding noise.
const ZERO_VARIANCE_RTOL: f64 = 1e-12;

/// Streaming linear CKA between `X [n, dx]` and `Y [n, dy]` (rows = samples = tokens).
///
/// Keeps column sums and `X^T X`, `Y^T Y`, `Y^T X` (row-major), so memory is O(d^2), not O(n^2).
/// Serializable so that a partly accumulated epoch can be checkpointed if the trainer wants to.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CkaAccumulator {
    dx: usize,
    dy: usize,
    n: usize,
    sum_x: Vec<f64>,
    sum_y: Vec<f64>,
    /// `[dx, dx]`
    xtx: Vec<f64>,
    /// `[dy, dy]`
    yty: Vec<f64>,
    /// `[dy, dx]`
    ytx: Vec<f64>,
}

/// The squared Frobenius norms linear CKA is made of, over `rows` rows: of the centered products
/// `Xc^T Xc` (`xx`), `Yc^T Yc` (`yy`), `Yc^T Xc` (`yx`), and of the uncentered `X^T X`, `Y^T Y`
/// (`xx_raw`, `yy_raw`: the zero-variance guard's scale). Centering is `M - a b^T / rows` with
/// `a`, `b` the column sums. Whoever holds the moments computes these five numbers (the host from
/// a [`CkaAccumulator`], or a device from its own copies) and [`cka_from_norms`] does the rest.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CkaNorms {
    pub rows: usize,
    pub xx: f64,
    pub xx_raw: f64,
    pub yy: f64,
    pub yy_raw: f64,
    pub yx: f64,
}

/// Linear CKA `yx / sqrt(xx * yy)` from its norms, with [`CkaAccumulator::cka`]'s `None` cases:
/// fewer than 2 rows, a side with (numerically) zero variance, or non-finite values.
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

/// `m[i, j] += a[i] * b[j]` for a row-major `m` of shape `[a.len(), b.len()]`.
fn add_outer(m: &mut [f64], a: &[f64], b: &[f64]) {
    for (row, &ai) in m.chunks_exact_mut(b.len()).zip(a) {
        for (mij, &bj) in row.iter_mut().zip(b) {
            *mij += ai * bj;
        }
    }
}

fn add_into(acc: &mut [f64], v: &[f64]) {
    for (a, &b) in acc.iter_mut().zip(v) {
        *a += b;
    }
}

impl CkaAccumulator {
    /// Panics if `dx` or `dy` is 0 (CKA of an empty representation is meaningless).
    pub fn new(dx: usize, dy: usize) -> Self {
        assert!(dx > 0 && dy > 0, "CkaAccumulator needs dx, dy > 0");
        Self {
            dx,
            dy,
            n: 0,
            sum_x: vec![0.0; dx],
            sum_y: vec![0.0; dy],
            xtx: vec![0.0; dx * dx],
            yty: vec![0.0; dy * dy],
            ytx: vec![0.0; dy * dx],
        }
    }

    /// Add raw rows (row-major, `rows * dx` and `rows * dy` values). Panics on a length mismatch.
    pub fn add_rows(&mut self, x: &[f64], y: &[f64], rows: usize) {
        let (dx, dy) = (self.dx, self.dy);
        assert_eq!(x.len(), rows * dx, "x must hold rows * dx values");
        assert_eq!(y.len(), rows * dy, "y must hold rows * dy values");
        for (xr, yr) in x.chunks_exact(dx).zip(y.chunks_exact(dy)) {
            add_into(&mut self.sum_x, xr);
            add_into(&mut self.sum_y, yr);
            add_outer(&mut self.xtx, xr, xr);
            add_outer(&mut self.yty, yr, yr);
            add_outer(&mut self.ytx, yr, xr);
        }
        self.n += rows;
    }

    /// Add moments computed elsewhere (e.g. on a GPU): `rows`, column sums, and the three
    /// uncentered products, all row-major: `xtx [dx,dx]`, `yty [dy,dy]`, `ytx [dy,dx]`.
    /// Panics on a length mismatch.
    pub fn add_moments(
        &mut self,
        rows: usize,
        sum_x: &[f64],
        sum_y: &[f64],
        xtx: &[f64],
        yty: &[f64],
        ytx: &[f64],
    ) {
        let (dx, dy) = (self.dx, self.dy);
        assert_eq!(sum_x.len(), dx, "sum_x must hold dx values");
        assert_eq!(sum_y.len(), dy, "sum_y must hold dy values");
        assert_eq!(xtx.len(), dx * dx, "xtx must be [dx, dx]");
        assert_eq!(yty.len(), dy * dy, "yty must be [dy, dy]");
        assert_eq!(ytx.len(), dy * dx, "ytx must be [dy, dx]");
        add_into(&mut self.sum_x, sum_x);
        add_into(&mut self.sum_y, sum_y);
        add_into(&mut self.xtx, xtx);
        add_into(&mut self.yty, yty);
        add_into(&mut self.ytx, ytx);
        self.n += rows;
    }

    /// Number of rows accumulated so far.
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Linear CKA with column centering: `||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`.
    ///
    /// `None` when fewer than 2 rows were seen, when either side has (numerically) zero variance
    /// (centered norm exactly 0 or `<= 1e-12 *` its uncentered norm), or when the inputs held
    /// non-finite values. The value is not clamped: it lies in `[0, 1]` up to rounding.
    pub fn cka(&self) -> Option<f64> {
        let n = self.n as f64;
        // Returns (||M - a b^T / n||_F^2, ||M||_F^2).
        let centered = |m: &[f64], a: &[f64], b: &[f64]| {
            let (mut c2, mut raw2) = (0.0, 0.0);
            for (row, &ai) in m.chunks_exact(b.len()).zip(a) {
                for (&mij, &bj) in row.iter().zip(b) {
                    let c = mij - ai * bj / n;
                    c2 += c * c;
                    raw2 += mij * mij;
                }
            }
            (c2, raw2)
        };
        let (xx, xx_raw) = centered(&self.xtx, &self.sum_x, &self.sum_x);
        let (yy, yy_raw) = centered(&self.yty, &self.sum_y, &self.sum_y);
        let (yx, _) = centered(&self.ytx, &self.sum_y, &self.sum_x);
        cka_from_norms(&CkaNorms {
            rows: self.n,
            xx,
            xx_raw,
            yy,
            yy_raw,
            yx,
        })
    }

    /// Forget all rows (dimensions are kept), e.g. at the start of the next monitoring pass.
    pub fn reset(&mut self) {
        self.n = 0;
        for v in [
            &mut self.sum_x,
            &mut self.sum_y,
            &mut self.xtx,
            &mut self.yty,
            &mut self.ytx,
        ] {
            v.fill(0.0);
        }
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
/// `CKA = <K, L>_F / (||K||_F ||L||_F)`. Independent of [`CkaAccumulator`]; tests use it as the
/// oracle. Same `None` cases (guard relative to `||X||_F^2`, which bounds the uncentered Gram norm).
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

    fn streamed(x: &[f64], y: &[f64], n: usize, dx: usize, dy: usize) -> Option<f64> {
        let mut acc = CkaAccumulator::new(dx, dy);
        acc.add_rows(x, y, n);
        acc.cka()
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
        let mut acc = CkaAccumulator::new(dx, dy);
        let mut start = 0;
        for b in batches {
            acc.add_rows(
                &x[start * dx..(start + b) * dx],
                &y[start * dy..(start + b) * dy],
                b,
            );
            start += b;
        }
        assert_eq!(acc.rows(), n);
        let got = acc.cka().unwrap();
        let want = linear_cka_gram(&x, &y, n, dx, dy).unwrap();
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        assert!(got > 0.0 && got < 1.0);
        // Independent data must score clearly lower than the correlated pair.
        let z = rng.mat(n * dy);
        assert!(streamed(&x, &z, n, dx, dy).unwrap() < got);
    }

    #[test]
    fn add_moments_matches_add_rows() {
        let mut rng = Rng(5);
        let (n, dx, dy) = (25, 4, 2);
        let (x, y) = pair(&mut rng, n, dx, dy);
        // Moments of two batches computed with explicit index loops (independent of add_outer).
        let moments = |lo: usize, hi: usize| {
            let (mut sx, mut sy) = (vec![0.0; dx], vec![0.0; dy]);
            let (mut xx, mut yy, mut yx) =
                (vec![0.0; dx * dx], vec![0.0; dy * dy], vec![0.0; dy * dx]);
            for r in lo..hi {
                for i in 0..dx {
                    sx[i] += x[r * dx + i];
                    for j in 0..dx {
                        xx[i * dx + j] += x[r * dx + i] * x[r * dx + j];
                    }
                }
                for k in 0..dy {
                    sy[k] += y[r * dy + k];
                    for l in 0..dy {
                        yy[k * dy + l] += y[r * dy + k] * y[r * dy + l];
                    }
                    for i in 0..dx {
                        yx[k * dx + i] += y[r * dy + k] * x[r * dx + i];
                    }
                }
            }
            (hi - lo, sx, sy, xx, yy, yx)
        };
        let mut acc = CkaAccumulator::new(dx, dy);
        for (lo, hi) in [(0, 9), (9, 25)] {
            let (r, sx, sy, xx, yy, yx) = moments(lo, hi);
            acc.add_moments(r, &sx, &sy, &xx, &yy, &yx);
        }
        let want = streamed(&x, &y, n, dx, dy).unwrap();
        assert!((acc.cka().unwrap() - want).abs() < 1e-12);
        // Mixing both paths is fine too.
        let mut mixed = CkaAccumulator::new(dx, dy);
        let (r, sx, sy, xx, yy, yx) = moments(0, 9);
        mixed.add_moments(r, &sx, &sy, &xx, &yy, &yx);
        mixed.add_rows(&x[9 * dx..], &y[9 * dy..], n - 9);
        assert!((mixed.cka().unwrap() - want).abs() < 1e-12);
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
        assert_eq!(CkaAccumulator::new(d, d).cka(), None);
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

    #[test]
    fn reset_forgets_rows() {
        let mut rng = Rng(19);
        let (n, dx, dy) = (12, 2, 3);
        let (x, y) = pair(&mut rng, n, dx, dy);
        let mut acc = CkaAccumulator::new(dx, dy);
        let z = rng.mat(n * dy);
        acc.add_rows(&x, &z, n);
        acc.reset();
        assert_eq!((acc.rows(), acc.cka()), (0, None));
        acc.add_rows(&x, &y, n);
        assert_eq!(acc.cka(), streamed(&x, &y, n, dx, dy));
    }
}
