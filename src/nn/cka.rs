//! SAFE's CKA products on the device: the token rows in f64, their sums, the Gram form's terms of
//! an adapted linear's rows and the moment form's five norms (`train/importance` turns them into
//! CKA). On CUDA the Gram form runs as fused kernels around a TF32 tensor-core product of
//! safetune's own (`gpu::cka_gram_terms`) and the low-rank moments' norms as two kernels
//! (`gpu::cka_moment_norms`); the candle compositions here are the CPU path and the references
//! the self-test checks the kernels against.

use candle_core::{DType, Result, Tensor};

/// Whether one batch's measurement at an adapter takes the Gram form (`O(n^2 d)`, no more token
/// rows `n` than the adapter is wide `d`) rather than the moment form (`O(n d^2)`).
pub fn gram_form(n: usize, d: usize) -> bool {
    n <= d
}

/// The bytes one batch's measurement at an adapter (`n` token rows, width `d`, rank `r`,
/// activations of `act` bytes) holds, in the form [`gram_form`] picks. The Gram form on CUDA:
/// what `gpu::cka_gram_terms` allocates (`gpu::cka_gram_bytes`) and the base output `Y` the
/// forward keeps beside the adapted one for it (the kernels read its rows in place); composed,
/// in f64, the rows of `Y`, their centered copy and a squared temporary (`3 n d`) and `L` with
/// its temporaries (`3 n^2`), counted with room to spare as `6 n d + 4 n^2`. The moment form:
/// the rows of `Y` and `U` and eight `d x d` products and temporaries, in f64.
pub fn batch_bytes(n: usize, d: usize, r: usize, act: usize, on_cuda: bool) -> usize {
    match (gram_form(n, d), super::gpu::cka_gram_fused(on_cuda, d, r)) {
        (true, true) => super::gpu::cka_gram_bytes(n, d, r) + act * n * d,
        (true, false) => 8 * (6 * n * d + 4 * n * n),
        (false, _) => 8 * (n * (d + r) + 8 * d * d),
    }
}

/// How many adapters' measurements ([`batch_bytes`] each) SAFE's in-step monitor holds at once
/// for adapters of width `d`, rank `r` over `n` token rows: the Gram form's fused CUDA kernels
/// measure a layer's adapters [`CKA_GRAM_BATCH`](super::gpu::CKA_GRAM_BATCH) at a time
/// ([`gram_terms_batch`]), sharing the launches' fixed cost, their rows kept until then; every
/// other form and path measures each adapter as its rows come.
pub fn measured_together(n: usize, d: usize, r: usize, on_cuda: bool) -> usize {
    if gram_form(n, d) && super::gpu::cka_gram_fused(on_cuda, d, r) {
        super::gpu::CKA_GRAM_BATCH
    } else {
        1
    }
}

/// The Gram form's terms (see [`gram_terms_composed`]) of the token rows `rows` of `y` `[N, d]`
/// and `u` `[N, r]`, with `b` `[d, r]`.
pub fn gram_terms(y: &Tensor, u: &Tensor, b: &Tensor, rows: &Tensor) -> Result<Tensor> {
    if let Some(t) = super::gpu::cka_gram_terms(&[(y, u, b)], rows)? {
        return t.get(0);
    }
    gram_terms_composed(
        &pick_rows(y, rows)?,
        &pick_rows(u, rows)?,
        &b.to_dtype(DType::F64)?,
    )
}

/// [`gram_terms`] of several adapters' `(y, u, b)` over the same token rows, one tensor each:
/// on CUDA up to [`CKA_GRAM_BATCH`](super::gpu::CKA_GRAM_BATCH) of one shape share one set of
/// the fused kernels' launches (at SAFE's 7B shape a pair takes about 1.86x one adapter's
/// time), with each adapter's terms the same as alone; otherwise one by one.
pub fn gram_terms_batch(
    items: &[(&Tensor, &Tensor, &Tensor)],
    rows: &Tensor,
) -> Result<Vec<Tensor>> {
    if items.len() > 1 {
        if let Some(t) = super::gpu::cka_gram_terms(items, rows)? {
            return (0..items.len()).map(|i| t.get(i)).collect();
        }
    }
    items
        .iter()
        .map(|&(y, u, b)| gram_terms(y, u, b, rows))
        .collect()
}

/// The Gram form's terms of one batch's rows at the linear, `X = Y + U B^T` (`Y` `[n, d]`, `U`
/// `[n, r]`, `B` `[d, r]`, f64): `O(n^2 d)` instead of the moments' `O(n d^2)`, the cheaper
/// one when a batch has fewer token rows than the layer is wide. With `L = Yc Yc^T` (the one
/// `n x n x d` product), `G = B^T B` and `P = Yc B + Uc G / 2`, the centered Gram of `X` is
/// `K = L + P Uc^T + Uc P^T`, so CKA's norms need from the device only `||L||^2`,
/// `<L Uc, P>`, `||Y||^2` and `r`-sized terms: `Z^T Z` for `Z = [P Uc]`, `G`, the column
/// means of `U` and `mean(Y) B` (`train/importance`'s `gram_norms` does the rest on the host).
/// Each op here is a device kernel (about 40); the CUDA path does the same in four.
///
/// Layout: `[||L||^2, <L Uc, P>, ||Y||^2, Z^T Z (2r x 2r), G (r x r), mean(U) (r), mean(Y) B (r)]`.
pub fn gram_terms_composed(y: &Tensor, u: &Tensor, b: &Tensor) -> Result<Tensor> {
    let mm = super::matmul;
    let y_mean = col_mean(y)?;
    let u_mean = col_mean(u)?;
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

/// The moments of one batch's rows at the linear, `X = Y + U B^T` (`Y` `[n, d]`, `U` `[n, r]`,
/// `B` `[d, r]`, f64): the column sums of `Y` and `U`, `Y^T Y`, `Y^T U` and `U^T U`.
pub struct LowRankMoments {
    pub n: usize,
    pub sum_y: Tensor,
    pub sum_u: Tensor,
    pub yty: Tensor,
    pub ytu: Tensor,
    pub utu: Tensor,
    pub b: Tensor,
}

/// CKA's five norms `[5]` (see [`LowRankMoments::norms`]) of one batch's rows at the linear,
/// `X = Y + U B^T`, over its token rows `rows`, in the moment form: on CUDA one kernel gathers
/// the rows with their sums, one symmetric product forms the three moments and two kernels the
/// norms (`gpu::cka_low_rank_norms`); elsewhere [`LowRankMoments::of_rows`], then its norms.
pub fn low_rank_norms(y: &Tensor, u: &Tensor, b: &Tensor, rows: &Tensor) -> Result<Tensor> {
    if let Some(t) = super::gpu::cka_low_rank_norms(y, u, b, rows)? {
        return Ok(t);
    }
    LowRankMoments::of_rows(y, u, b, rows)?.norms()
}

impl LowRankMoments {
    /// The moments of the token rows `rows` of `y` `[N, d]` and `u` `[N, r]`, in f64, with `b`
    /// `[d, r]`; the products counted as the model's matmuls are (SAFE's monitoring FLOPs).
    pub fn of_rows(y: &Tensor, u: &Tensor, b: &Tensor, rows: &Tensor) -> Result<Self> {
        let (y, u) = (pick_rows(y, rows)?, pick_rows(u, rows)?);
        let mm = |a: &Tensor, b: &Tensor| super::matmul(&a.t()?, b);
        Ok(Self {
            n: y.dim(0)?,
            sum_y: y.sum(0)?,
            sum_u: u.sum(0)?,
            yty: mm(&y, &y)?,
            ytu: mm(&y, &u)?,
            utu: mm(&u, &u)?,
            b: b.to_dtype(DType::F64)?,
        })
    }

    /// CKA's five norms `[5]` (`||Xc^T Xc||^2`, `||X^T X||^2`, `||Yc^T Yc||^2`, `||Y^T Y||^2`,
    /// `||Yc^T Xc||^2`): two kernels on CUDA (`gpu::cka_moment_norms`), else
    /// [`LowRankMoments::norms_composed`].
    pub fn norms(&self) -> Result<Tensor> {
        if let Some(t) = super::gpu::cka_moment_norms(self)? {
            return Ok(t);
        }
        self.norms_composed()
    }

    /// The composition of [`LowRankMoments::norms`]: with `C = (Y^T U) B^T` (`= Y^T (X - Y)`),
    /// `Y^T X = Y^T Y + C`, `X^T X = Y^T Y + C + C^T + B (U^T U) B^T` and `sum_x = sum_y + B
    /// sum_u`, then [`moment_norms`]; about thirty kernels on a GPU.
    pub fn norms_composed(&self) -> Result<Tensor> {
        let mm = super::matmul;
        let b = &self.b;
        let c = mm(&self.ytu, &b.t()?)?;
        let ytx = (&self.yty + &c)?;
        let bub = mm(&mm(b, &self.utu)?, &b.t()?)?;
        let xtx = ((&ytx + c.t()?)? + bub)?;
        let sum_x = (&self.sum_y + mm(b, &self.sum_u.unsqueeze(1)?)?.squeeze(1)?)?;
        moment_norms(self.n, &sum_x, &self.sum_y, &xtx, &self.yty, &ytx)
    }
}

/// CKA's five norms `[5]` from `n` rows' column sums and uncentered products `X^T X`, `Y^T Y`,
/// `Y^T X` (f64; the order of [`LowRankMoments::norms`]): each centered product is
/// `M - a b^T / n`.
pub fn moment_norms(
    n: usize,
    sum_x: &Tensor,
    sum_y: &Tensor,
    xtx: &Tensor,
    yty: &Tensor,
    ytx: &Tensor,
) -> Result<Tensor> {
    let n = n as f64;
    // ||M - a b^T / n||_F^2.
    let centered = |m: &Tensor, a: &Tensor, b: &Tensor| -> Result<Tensor> {
        let outer = a.unsqueeze(1)?.broadcast_mul(&b.unsqueeze(0)?)?;
        sum_sq(&(m - (outer / n)?)?)
    };
    let norms = [
        centered(xtx, sum_x, sum_x)?,
        sum_sq(xtx)?,
        centered(yty, sum_y, sum_y)?,
        sum_sq(yty)?,
        centered(ytx, sum_y, sum_x)?,
    ];
    Tensor::stack(&norms, 0)
}

/// The token rows `rows` of `[n, d]` rows `t`, in f64 (CKA's norms cancel in lower precision).
pub fn pick_rows(t: &Tensor, rows: &Tensor) -> Result<Tensor> {
    // Token rows are distinct: as many as the tensor has rows means all of them, in order.
    if rows.dim(0)? == t.dim(0)? {
        return t.to_dtype(DType::F64);
    }
    t.index_select(rows, 0)?.to_dtype(DType::F64)
}

/// Sum of squares as a 0-d tensor, by rows first: candle's CUDA `sum_all` reduces in one thread
/// block, which took 4.9 of a 7B round's 5.7 s; `d` row sums spread over the device.
/// On the CPU, rows in parallel with the same bits (`nn::cpu::sum_sq_f64`).
pub fn sum_sq(t: &Tensor) -> Result<Tensor> {
    match super::cpu::sum_sq_f64(t) {
        Some(s) => Tensor::new(s, t.device()),
        None => t.sqr()?.sum(1)?.sum_all(),
    }
}

/// Column means `[1, c]` of `[n, c]` rows; on the CPU, columns in parallel with the same bits
/// (`nn::cpu::col_mean_f64`).
pub fn col_mean(t: &Tensor) -> Result<Tensor> {
    match super::cpu::col_mean_f64(t)? {
        Some(m) => Ok(m),
        None => t.mean_keepdim(0),
    }
}

#[cfg(test)]
mod tests {
    use super::{batch_bytes, measured_together};
    use crate::nn::gpu::{
        cka_gram_bytes, cka_gram_splits, AVAILABLE, CKA_GRAM_BATCH, CKA_MAX_RANK,
    };

    #[test]
    fn the_measurement_is_counted_in_the_form_and_path_that_run() {
        let composed = |n: usize, d: usize| 8 * (6 * n * d + 4 * n * n);
        // No more rows than the width: the Gram form, composed in f64 off CUDA.
        assert_eq!(batch_bytes(512, 4096, 8, 2, false), composed(512, 4096));
        assert_eq!(batch_bytes(4096, 4096, 8, 2, false), composed(4096, 4096));
        // One row more: the moment form's `d x d` products.
        assert_eq!(
            batch_bytes(4097, 4096, 8, 2, false),
            8 * (4097 * 4104 + 8 * 4096 * 4096)
        );
        // On CUDA the kernels' own buffers and the bf16 base output they read, where they run; a
        // rank they do not take is composed.
        let fused_bytes = cka_gram_bytes(512, 4096, 8) + 2 * 512 * 4096;
        assert_eq!(batch_bytes(512, 4096, 8, 2, true) == fused_bytes, AVAILABLE);
        let r = CKA_MAX_RANK + 1;
        assert_eq!(batch_bytes(512, 4096, r, 2, true), composed(512, 4096));
        // So is a width the product's 16-byte copies cannot take.
        assert_eq!(batch_bytes(512, 4098, 8, 2, true), composed(512, 4098));
        // The kernels hold E and E E^T in f32, a fraction of the composition's f64 rows.
        assert!(cka_gram_bytes(512, 4096, 8) < composed(512, 4096) / 5);
        // Where they run they measure a layer's adapters two at a time (the monitor keeps the
        // first one's rows until the second's come); every other form and path one at a time.
        let pairs = if AVAILABLE { CKA_GRAM_BATCH } else { 1 };
        assert_eq!(measured_together(512, 4096, 8, true), pairs);
        assert_eq!(measured_together(512, 4096, 8, false), 1);
        assert_eq!(measured_together(4097, 4096, 8, true), 1);
        assert_eq!(measured_together(512, 4098, 8, true), 1);
    }

    #[test]
    fn the_gram_product_is_split_into_aligned_chunks_that_cover_the_width() {
        for m in [8, 64, 65, 136, 264, 520, 1032] {
            for k in [24, 384, 768, 1000, 4096, 5120, 8192] {
                let (splits, chunk) = cka_gram_splits(m, k);
                // Chunks of whole kernel steps, none empty, together exactly the width.
                assert_eq!(chunk % 32, 0, "m {m} k {k}");
                assert!(
                    (splits - 1) * chunk < k && k <= splits * chunk,
                    "m {m} k {k}"
                );
                assert!(splits == 1 || chunk >= 256, "m {m} k {k}: chunk {chunk}");
            }
        }
        // SAFE's 7B shape (512 token rows and rank 8, width 4096): 45 tiles of the upper
        // triangle, six chunks of 704 columns (the last 576) to fill a GPU with 270 blocks.
        assert_eq!(cka_gram_splits(520, 4096), (6, 704));
        // One tile's worth of rows takes as many chunks as 256 columns allow.
        assert_eq!(cka_gram_splits(40, 4096), (16, 256));
        // Narrow layers are one chunk.
        assert_eq!(cka_gram_splits(392, 384), (1, 384));
    }
}
