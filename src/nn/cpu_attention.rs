//! Fused attention on the CPU, forward and backward: one head's scores, softmax, dropout and
//! products for a block of query rows at a time, the scores kept in a buffer that stays in the
//! core's cache.
//!
//! Why: composed from batched matmuls and row kernels, attention wrote and read the
//! `[b, heads, t, t]` scores, probabilities and their gradients as whole tensors, and split and
//! merged the heads with copies. Here nothing of that size is allocated or kept: the forward
//! saves the per-row log-sum-exp, backward recomputes the probabilities from it and redraws
//! dropout's mask from its seeds (`dropout::keep_range`, the same mask the composition draws).
//! q, k, v and the output gradient are read in place as `[b, heads, t, d]` views (the layers'
//! `[b*t, heads*d]` layout seen per head, or rope's output), and the context and the gradients
//! are written straight into the layers' layout. Under a causal mask a block multiplies only
//! the keys its last row sees. The additive mask is a key mask `[b, 1, 1, keys]` or a per-head
//! bias over every row (`[b or 1, heads, queries, keys]`: MPNet's relative positions).
//!
//! Each product is one single-threaded `gemm` call. The forward spreads (batch, head) pairs over
//! rayon's threads; backward spreads (batch, kv head) pairs, whose query heads add into one
//! dk and dv (grouped-query attention without expanded copies).

use super::cpu::{exp_f32, lanes, multiversion, row_max};
use super::cpu_matmul::{gemm_single, SendPtr};
use super::dropout::{self, MaskDraw};
use candle_core::{Result, Storage, Tensor};
use rayon::prelude::*;

/// Shapes of one call: `queries` rows attend over `keys` positions (`keys >= queries`; the
/// queries are the last `queries` positions, as in `cpu`'s causal softmax).
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub queries: usize,
    pub keys: usize,
    pub head_dim: usize,
    pub causal: bool,
    /// Multiplies the scores before the mask is added (`1 / sqrt(head_dim)`).
    pub scale: f32,
}

/// Score elements of one block (64 KB of f32): a block of query rows over all keys stays in L2.
const BLOCK_ELEMS: usize = 16 * 1024;

impl Dims {
    /// Query rows per block: as many as fit [`BLOCK_ELEMS`], 16 to 128, at most all of them.
    fn block_rows(&self) -> usize {
        (BLOCK_ELEMS / self.keys.max(1))
            .clamp(16, 128)
            .min(self.queries)
    }

    /// Keys query row `i` sees.
    fn visible(&self, i: usize) -> usize {
        if self.causal {
            (i + self.keys - self.queries + 1).min(self.keys)
        } else {
            self.keys
        }
    }

    /// `(batch, heads, kv_heads, queries, keys, head_dim)`.
    fn sizes(&self) -> (usize, usize, usize, usize, usize, usize) {
        let d = self;
        (d.batch, d.heads, d.kv_heads, d.queries, d.keys, d.head_dim)
    }

    /// Whether an additive mask of `dims` reads here: a key mask `[batch, 1, 1, keys]`, or a
    /// bias per head and row `[batch or 1, heads, queries, keys]` (read through [`Heads::broadcast`]).
    pub fn mask_fits(&self, dims: &[usize]) -> bool {
        match *dims {
            [mb, mh, mt, mk] => {
                (mb == self.batch || mb == 1)
                    && mk == self.keys
                    && ((mh, mt) == (1, 1) || (mh, mt) == (self.heads, self.queries))
            }
            _ => false,
        }
    }

    fn valid(&self) -> bool {
        let d = self;
        d.batch > 0
            && d.queries > 0
            && d.keys >= d.queries
            && d.head_dim > 0
            && d.kv_heads > 0
            && d.heads.is_multiple_of(d.kv_heads)
    }
}

/// An f32 `[b, heads, t, d]` view with unit stride along `d`: its elements from the view's start
/// and the strides of b, heads and t.
#[derive(Clone, Copy)]
struct Heads<'a> {
    x: &'a [f32],
    sb: usize,
    sh: usize,
    st: usize,
}

impl<'a> Heads<'a> {
    /// A contiguous `[mb, mh, mt, d]` tensor's elements `x` seen as `[b, heads, t, d]`: a
    /// dimension of 1 is broadcast (stride 0), as the additive mask's are.
    fn broadcast(x: &'a [f32], [mb, mh, mt, d]: [usize; 4]) -> Self {
        let stride = |n: usize, s: usize| if n > 1 { s } else { 0 };
        Self {
            x,
            sb: stride(mb, mh * mt * d),
            sh: stride(mh, mt * d),
            st: stride(mt, d),
        }
    }

    /// Rows from `t` of head `h` of batch item `b`: the first one's start (bounds-checked) and
    /// the row stride.
    fn rows(&self, b: usize, h: usize, t: usize) -> Rows {
        (self.row(b, h, t, 0).as_ptr(), self.st)
    }

    /// The first `len` elements of row `t` of head `h` of batch item `b`.
    fn row(&self, b: usize, h: usize, t: usize, len: usize) -> &'a [f32] {
        &self.x[b * self.sb + h * self.sh + t * self.st..][..len]
    }
}

/// Strided rows: the first one's start and the row stride, in elements (unit column stride).
type Rows = (*const f32, usize);

/// `dst = a b^T` (`rows x n`, row-major) for `a` of `rows` rows and `b` of `n` rows, `d` wide.
///
/// # Safety
/// `a`'s and `b`'s rows must be readable.
unsafe fn mul_bt(
    dst: &mut [f32],
    (a, a_rs): Rows,
    (b, b_rs): Rows,
    (rows, n, d): (usize, usize, usize),
) {
    let dst = &mut dst[..rows * n];
    // SAFETY: the caller's contract; dst holds rows x n.
    unsafe {
        gemm_single(
            (rows, n, d),
            (dst.as_mut_ptr(), n as isize),
            (a, 1, a_rs as isize),
            (b, b_rs as isize, 1),
            false,
        )
    }
}

/// `dst = a b` for `a` `rows x n` (row-major) and `b` of `n` rows, `d` wide, into `rows` strided
/// rows `dst` (start, row stride).
///
/// # Safety
/// `b`'s rows must be readable, `dst`'s `rows x d` elements writable and touched by no other
/// thread during the call.
unsafe fn mul_into(
    (dst, dst_rs): (*mut f32, usize),
    a: &[f32],
    (b, b_rs): Rows,
    (rows, n, d): (usize, usize, usize),
) {
    let a = &a[..rows * n];
    // SAFETY: the caller's contract; a holds rows x n.
    unsafe {
        gemm_single(
            (rows, d, n),
            (dst, dst_rs as isize),
            (a.as_ptr(), 1, n as isize),
            (b, 1, b_rs as isize),
            false,
        )
    }
}

/// `acc[..n] += a^T b` for `a` `rows x n` (row-major), `b` of `rows` rows `d` wide, and `acc`
/// `n x d` (row-major) or more.
///
/// # Safety
/// `b`'s rows must be readable.
unsafe fn add_mul_at(
    acc: &mut [f32],
    a: &[f32],
    (b, b_rs): Rows,
    (rows, n, d): (usize, usize, usize),
) {
    let (acc, a) = (&mut acc[..n * d], &a[..rows * n]);
    // SAFETY: the caller's contract; acc holds n x d, initialised, a rows x n.
    unsafe {
        gemm_single(
            (n, d, rows),
            (acc.as_mut_ptr(), d as isize),
            (a.as_ptr(), n as isize, 1),
            (b, 1, b_rs as isize),
            true,
        )
    }
}

/// `f` on `ts` as [`Heads`] views of the given `[b, heads, t, d]` shapes and on the contiguous
/// additive mask `mask` (its shape checked by the caller, [`Dims::mask_fits`]) broadcast to
/// `[b, heads, t, keys]` ([`Heads::broadcast`]); None unless all are f32 CPU tensors of those shapes with unit stride along `d` that autograd
/// does not track (its graph is the tests' oracle).
fn with_views<R>(
    ts: &[(&Tensor, [usize; 4])],
    mask: &Tensor,
    f: impl FnOnce(&[Heads], Heads) -> R,
) -> Option<R> {
    let all: Vec<&Tensor> = ts.iter().map(|(t, _)| *t).chain([mask]).collect();
    if all.iter().any(|t| t.track_op()) {
        return None;
    }
    let guards: Vec<_> = all.iter().map(|t| t.storage_and_layout()).collect();
    let mut views = Vec::with_capacity(ts.len());
    for ((t, shape), (storage, layout)) in ts.iter().zip(&guards) {
        let Storage::Cpu(cpu) = &**storage else {
            return None;
        };
        let (Ok(x), &[sb, sh, st, 1]) = (cpu.as_slice::<f32>(), layout.stride()) else {
            return None;
        };
        if t.dims() != shape {
            return None;
        }
        let x = &x[layout.start_offset()..];
        views.push(Heads { x, sb, sh, st });
    }
    let (storage, layout) = guards.last()?;
    let Storage::Cpu(cpu) = &**storage else {
        return None;
    };
    let (a, b) = layout.contiguous_offsets()?;
    let dims: [usize; 4] = mask.dims().try_into().ok()?;
    Some(f(
        &views,
        Heads::broadcast(&cpu.as_slice::<f32>().ok()?[a..b], dims),
    ))
}

/// Forward: q `[b, heads, t, d]`, k and v `[b, kv_heads, keys, d]` (any strides with unit stride
/// along d), the additive mask (a key mask `[b, 1, 1, keys]` or a per-head bias, see
/// [`Dims::mask_fits`]). Returns the context in the layers' layout
/// `[b*t, heads*d]` and the log-sum-exp of each row's scaled, masked scores `[b, heads, t, 1]`.
/// None where the inputs do not qualify (see [`with_views`]).
pub fn forward(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    mask_add: &Tensor,
    dims: &Dims,
    drop: Option<&MaskDraw>,
) -> Result<Option<(Tensor, Tensor)>> {
    let dm = *dims;
    let (b, h, kv, t, t2, d) = dm.sizes();
    if !dm.valid() || !dm.mask_fits(mask_add.dims()) {
        return Ok(None);
    }
    let qb = dm.block_rows();
    let inputs = [(q, [b, h, t, d]), (k, [b, kv, t2, d]), (v, [b, kv, t2, d])];
    let out = with_views(&inputs, mask_add, |views, mask| {
        let &[q, k, v] = views else { unreachable!() };
        let mut ctx = Vec::<f32>::with_capacity(b * t * h * d);
        let mut lse = vec![0f32; b * h * t];
        let dst = SendPtr(ctx.as_mut_ptr());
        let dst = &dst;
        lse.par_chunks_mut(t).enumerate().for_each(|(bh, lse)| {
            let (bi, hi) = (bh / h, bh % h);
            let g = hi / (h / kv);
            let mut s = vec![0f32; qb * t2];
            let mut keep = vec![false; t2];
            for i0 in (0..t).step_by(qb) {
                let rows = qb.min(t - i0);
                let n = dm.visible(i0 + rows - 1);
                let s = &mut s[..rows * n];
                // SAFETY: q's rows i0.. and k's first n rows of this head lie in their views
                // (shapes checked by `with_views`).
                unsafe { mul_bt(s, q.rows(bi, hi, i0), k.rows(bi, g, 0), (rows, n, d)) }
                for (r, row) in s.chunks_mut(n).enumerate() {
                    let i = i0 + r;
                    let nv = dm.visible(i);
                    let m = mask.row(bi, hi, i, nv);
                    lse[i] = softmax_row(&mut row[..nv], m, dm.scale);
                    row[nv..].fill(0.0);
                    if let Some(dr) = drop {
                        let keep = &mut keep[..nv];
                        dropout::keep_range(&dr.seeds, (bh * t + i) * t2, dr.threshold, keep);
                        apply_keep(&mut row[..nv], keep, dr.scale as f32);
                    }
                }
                // SAFETY: rows i0..i0 + rows, columns hi*d.. of the [b*t, h*d] context: written
                // by this task only; v's first n rows of the head lie in its view.
                unsafe {
                    let out = (dst.0.add((bi * t + i0) * h * d + hi * d), h * d);
                    mul_into(out, s, v.rows(bi, g, 0), (rows, n, d))
                }
            }
        });
        // SAFETY: the tasks' blocks cover every row of every head: each element was written.
        unsafe { ctx.set_len(b * t * h * d) };
        (ctx, lse)
    });
    let Some((ctx, lse)) = out else {
        return Ok(None);
    };
    let dev = q.device();
    super::flops::add(2 * dm.product_flops());
    Ok(Some((
        Tensor::from_vec(ctx, (b * t, h * d), dev)?,
        Tensor::from_vec(lse, (b, h, t, 1), dev)?,
    )))
}

/// Backward of [`forward`] from the output gradient `dctx` (a `[b, heads, t, d]` view) and the
/// saved `lse` (`[b, heads, t, 1]`): returns dq `[b*t, heads*d]` and dk, dv
/// `[b*keys, kv_heads*d]`, in the layers' layout (with rope, the caller rotates dq and dk back).
pub fn backward(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    dctx: &Tensor,
    lse: &Tensor,
    mask_add: &Tensor,
    dims: &Dims,
    drop: Option<&MaskDraw>,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let dm = *dims;
    let (b, h, kv, t, t2, d) = dm.sizes();
    if !dm.valid() || !dm.mask_fits(mask_add.dims()) || lse.dims() != [b, h, t, 1] {
        return Ok(None);
    }
    let lse = lse.contiguous()?;
    let Ok(lse) = lse.flatten_all()?.to_vec1::<f32>() else {
        return Ok(None);
    };
    let (qb, group) = (dm.block_rows(), h / kv);
    let inputs = [
        (q, [b, h, t, d]),
        (k, [b, kv, t2, d]),
        (v, [b, kv, t2, d]),
        (dctx, [b, h, t, d]),
    ];
    let out = with_views(&inputs, mask_add, |views, mask| {
        let &[q, k, v, dout] = views else {
            unreachable!()
        };
        let mut dq = Vec::<f32>::with_capacity(b * t * h * d);
        let mut dk = Vec::<f32>::with_capacity(b * t2 * kv * d);
        let mut dv = Vec::<f32>::with_capacity(b * t2 * kv * d);
        let (dq_ptr, dk_ptr, dv_ptr) = (
            SendPtr(dq.as_mut_ptr()),
            SendPtr(dk.as_mut_ptr()),
            SendPtr(dv.as_mut_ptr()),
        );
        let (dq_ptr, dk_ptr, dv_ptr) = (&dq_ptr, &dk_ptr, &dv_ptr);
        (0..b * kv).into_par_iter().for_each(|bg| {
            let (bi, g) = (bg / kv, bg % kv);
            let (mut dk_acc, mut dv_acc) = (vec![0f32; t2 * d], vec![0f32; t2 * d]);
            let (mut p, mut ds) = (vec![0f32; qb * t2], vec![0f32; qb * t2]);
            let mut p_drop = vec![0f32; if drop.is_some() { qb * t2 } else { 0 }];
            let mut keep = vec![false; t2];
            for hi in g * group..(g + 1) * group {
                let lse = &lse[(bi * h + hi) * t..][..t];
                for i0 in (0..t).step_by(qb) {
                    let rows = qb.min(t - i0);
                    let n = dm.visible(i0 + rows - 1);
                    let (p, ds) = (&mut p[..rows * n], &mut ds[..rows * n]);
                    let (q_rows, k_rows) = (q.rows(bi, hi, i0), k.rows(bi, g, 0));
                    let (do_rows, v_rows) = (dout.rows(bi, hi, i0), v.rows(bi, g, 0));
                    // SAFETY (all products below): operand rows lie in their views (shapes
                    // checked by `with_views`); dk_acc and dv_acc are this task's own t2 x d.
                    unsafe {
                        // p = q k^T (raw scores, recomputed); ds = dO v^T (dP).
                        mul_bt(p, q_rows, k_rows, (rows, n, d));
                        mul_bt(ds, do_rows, v_rows, (rows, n, d));
                    }
                    for (r, (p_row, dp_row)) in p.chunks_mut(n).zip(ds.chunks_mut(n)).enumerate() {
                        let i = i0 + r;
                        let nv = dm.visible(i);
                        let m = mask.row(bi, hi, i, nv);
                        probs_row(&mut p_row[..nv], m, dm.scale, lse[i]);
                        p_row[nv..].fill(0.0);
                        if let Some(dr) = drop {
                            let keep = &mut keep[..nv];
                            let e = ((bi * h + hi) * t + i) * t2;
                            dropout::keep_range(&dr.seeds, e, dr.threshold, keep);
                            let pd = &mut p_drop[r * n..(r + 1) * n];
                            pd[..nv].copy_from_slice(&p_row[..nv]);
                            pd[nv..].fill(0.0);
                            apply_keep(&mut pd[..nv], keep, dr.scale as f32);
                            apply_keep(&mut dp_row[..nv], keep, dr.scale as f32);
                        }
                    }
                    let pv: &[f32] = if drop.is_some() {
                        &p_drop[..rows * n]
                    } else {
                        p
                    };
                    // SAFETY: see above.
                    unsafe { add_mul_at(&mut dv_acc, pv, do_rows, (rows, n, d)) } // dv += P^T dO
                    for (p_row, ds_row) in p.chunks(n).zip(ds.chunks_mut(n)) {
                        softmax_grad_row(ds_row, p_row, dm.scale);
                    }
                    // SAFETY: see above; dq's rows i0.., columns hi*d.. are this task's alone.
                    unsafe {
                        let dq_out = (dq_ptr.0.add((bi * t + i0) * h * d + hi * d), h * d);
                        mul_into(dq_out, ds, k_rows, (rows, n, d)); // dq = dS k
                        add_mul_at(&mut dk_acc, ds, q_rows, (rows, n, d)); // dk += dS^T q
                    }
                }
            }
            for j in 0..t2 {
                let at = (bi * t2 + j) * kv * d + g * d;
                // SAFETY: row j of kv head g of batch item bi: this task's alone, in bounds.
                unsafe {
                    std::ptr::copy_nonoverlapping(dk_acc[j * d..].as_ptr(), dk_ptr.0.add(at), d);
                    std::ptr::copy_nonoverlapping(dv_acc[j * d..].as_ptr(), dv_ptr.0.add(at), d);
                }
            }
        });
        // SAFETY: every (row, head) block of dq, and every row of every kv head of dk and dv,
        // was written by exactly one task above.
        unsafe {
            dq.set_len(b * t * h * d);
            dk.set_len(b * t2 * kv * d);
            dv.set_len(b * t2 * kv * d);
        }
        (dq, dk, dv)
    });
    let Some((dq, dk, dv)) = out else {
        return Ok(None);
    };
    // The composition's count: the recomputed scores and four gradient products.
    super::flops::add(5 * dm.product_flops());
    let dev = q.device();
    Ok(Some((
        Tensor::from_vec(dq, (b * t, h * d), dev)?,
        Tensor::from_vec(dk, (b * t2, kv * d), dev)?,
        Tensor::from_vec(dv, (b * t2, kv * d), dev)?,
    )))
}

/// The most the fused kernels hold beyond their inputs and outputs at `keys` keys: each rayon
/// thread's score blocks and, in backward, its kv head's dk and dv sums.
pub fn scratch_bytes(keys: usize, head_dim: usize) -> usize {
    let dims = Dims {
        batch: 1,
        heads: 1,
        kv_heads: 1,
        queries: keys,
        keys,
        head_dim,
        causal: false,
        scale: 1.0,
    };
    let per_thread = 3 * dims.block_rows() * keys + 2 * keys * head_dim;
    rayon::current_num_threads() * per_thread * 4
}

impl Dims {
    /// FLOPs of one `[t, keys] x head_dim` product over every head, as the composition's matmuls
    /// count it (full, causal or not).
    fn product_flops(&self) -> u64 {
        2 * (self.batch * self.heads * self.queries * self.keys * self.head_dim) as u64
    }
}

multiversion! {
    /// `p = softmax(p * scale + m)` in place over one row's visible keys; returns the
    /// log-sum-exp of the scaled, masked scores.
    fn softmax_row(p: &mut [f32], m: &[f32], scale: f32) -> f32 {
        for (p, &m) in p.iter_mut().zip(m) {
            *p = *p * scale + m;
        }
        let max = row_max(p);
        for p in p.iter_mut() {
            *p = exp_f32(*p - max);
        }
        let sum: f32 = lanes(p, 0.0, |a, x| a + x).iter().sum();
        let inv = 1.0 / sum;
        p.iter_mut().for_each(|v| *v *= inv);
        max + sum.ln()
    }
}

multiversion! {
    /// Recomputes probabilities from raw scores in place: `p = exp(p * scale + m - lse)`.
    fn probs_row(p: &mut [f32], m: &[f32], scale: f32, lse: f32) {
        for (p, &m) in p.iter_mut().zip(m) {
            *p = exp_f32(*p * scale + m - lse);
        }
    }
}

multiversion! {
    /// Softmax backward in place: `ds = scale * p * (dp - sum(dp * p))` (raw scores' gradient).
    fn softmax_grad_row(ds: &mut [f32], p: &[f32], scale: f32) {
        let mut acc = [0f32; 16];
        let (mut pc, mut dc) = (p.chunks_exact(16), ds.chunks_exact(16));
        for (p, d) in (&mut pc).zip(&mut dc) {
            for l in 0..16 {
                acc[l] += p[l] * d[l];
            }
        }
        for (l, (a, b)) in pc.remainder().iter().zip(dc.remainder()).enumerate() {
            acc[l] += a * b;
        }
        let dot: f32 = acc.iter().sum();
        for (ds, &p) in ds.iter_mut().zip(p) {
            *ds = scale * p * (*ds - dot);
        }
    }
}

multiversion! {
    /// Dropout on one row: kept values times `scale`, the rest 0.
    fn apply_keep(x: &mut [f32], keep: &[bool], scale: f32) {
        for (x, &k) in x.iter_mut().zip(keep) {
            *x = if k { *x * scale } else { 0.0 };
        }
    }
}
