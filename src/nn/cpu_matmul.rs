//! CPU matmuls through single-threaded `gemm` calls that safetune spreads over rayon's threads:
//! `x W^T` with the output's columns split across threads, and batched products (attention's
//! per-head matmuls) with the batch split across threads.
//!
//! candle hands a whole product to the `gemm` crate's own threads. When the right operand is the
//! transposed view of a row-major weight (every linear's forward, and CKA's Gram product), gemm
//! packs that weight, transposing it, inside each thread's share of the work, and its threads
//! split the rows: at 256 rows of SmolLM2's 576-wide projections on 2 cores a layer's forward
//! matmuls took 26.3 ms this way against 20.7 ms with each thread given its own column block of
//! the weight (22.6 against 19.6 ms at 512 rows). Each block is one single-threaded gemm call
//! over all rows; every output element is still one dot product over `k` in gemm's `k` blocks,
//! so the bits are candle's (the test checks them for both dtypes and several thread counts).

use candle_core::{DType, Device, Result, Storage, Tensor, WithDType};
use rayon::prelude::*;

/// Columns per block at the least: below it (or at 64 rows or fewer) gemm takes other paths
/// whose `k` blocking may differ, so candle's own call is kept.
const MIN_BLOCK: usize = 64;

/// `a b` for a contiguous `[m, k]` CPU matrix `a` and a `[k, n]` view `b` of a contiguous
/// `[n, k]` matrix (f32 or f64), `m > 64`, split into column blocks across the current rayon
/// pool's threads. `None` where the shapes, layouts or thread count do not qualify, or autograd
/// tracks an operand: the caller runs candle's matmul.
pub fn matmul_by_columns(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    let (Ok((m, k)), Ok((k2, n))) = (a.dims2(), b.dims2()) else {
        return Ok(None);
    };
    let threads = rayon::current_num_threads();
    let blocks = threads.min(n / MIN_BLOCK);
    let transposed_weight = b.stride() == [1, k];
    if k != k2 || k == 0 || m <= MIN_BLOCK || blocks < 2 || !transposed_weight {
        return Ok(None); // (gemm's k = 0 would leave the output unwritten)
    }
    if !a.is_contiguous() {
        return Ok(None);
    }
    let dev = a.device();
    match a.dtype() {
        DType::F32 => with_slices(a, b, |x, w| by_columns::<f32>(x, w, (m, k, n), blocks, dev)),
        DType::F64 => with_slices(a, b, |x, w| by_columns::<f64>(x, w, (m, k, n), blocks, dev)),
        _ => Ok(None),
    }
}

/// `f` on the elements of `a` and `b` from their layouts' starts, when both are CPU tensors of
/// `T` that autograd does not track (its graph, the tests' oracle, needs candle's own op);
/// otherwise `None`, for candle's matmul.
fn with_slices<T: WithDType>(
    a: &Tensor,
    b: &Tensor,
    f: impl FnOnce(&[T], &[T]) -> Result<Tensor>,
) -> Result<Option<Tensor>> {
    if a.track_op() || b.track_op() || a.dtype() != T::DTYPE || b.dtype() != T::DTYPE {
        return Ok(None);
    }
    let (a_storage, a_layout) = a.storage_and_layout();
    let (b_storage, b_layout) = b.storage_and_layout();
    let (Storage::Cpu(a_cpu), Storage::Cpu(b_cpu)) = (&*a_storage, &*b_storage) else {
        return Ok(None);
    };
    let x = &a_cpu.as_slice::<T>()?[a_layout.start_offset()..];
    let y = &b_cpu.as_slice::<T>()?[b_layout.start_offset()..];
    f(x, y).map(Some)
}

fn by_columns<T: WithDType>(
    x: &[T],
    w: &[T],
    (m, k, n): (usize, usize, usize),
    blocks: usize,
    device: &Device,
) -> Result<Tensor> {
    // Block edges on multiples of 16 columns (a SIMD register of f32): at least 48 wide.
    let edge = |j: usize| {
        if j == blocks {
            n
        } else {
            j * n / blocks / 16 * 16
        }
    };
    let mut out = Vec::<T>::with_capacity(m * n); // every element written below: no zeroing
    let dst = SendPtr(out.as_mut_ptr());
    let dst = &dst;
    (0..blocks).into_par_iter().for_each(|j| {
        let (j0, cols) = (edge(j), edge(j + 1) - edge(j));
        // SAFETY: x holds m rows of k and w n rows of k (the layouts checked by the caller);
        // block j0 writes only columns j0..j0 + cols of each of the m rows of `out`, which no
        // other block writes, and `out` outlives the loop.
        unsafe {
            gemm_overwrite(
                (m, cols, k),
                (dst.0.add(j0), n as isize),
                (x.as_ptr(), 1, k as isize),
                (w.as_ptr().add(j0 * k), k as isize, 1),
            )
        }
    });
    // SAFETY: the blocks' columns cover 0..n, so `gemm_overwrite` (k > 0) wrote all m * n.
    unsafe { out.set_len(m * n) };
    Tensor::from_vec(out, (m, n), device)
}

/// `a b` batched over the leading dims, for CPU f32 / f64 operands of rank 3 or more with the same
/// leading dims and any strides (transposed views included): each product is one single-threaded
/// gemm call, the products spread over the current rayon pool. candle loops over the batch on
/// the calling thread, handing each small product (128 x 32 x 128 per head in MiniLM's attention)
/// to gemm's own threads; on 2 cores that took 2.9 ms for MiniLM's `q k^T` against 1.6 ms this
/// way. The same gemm call per product, so the same bits. `None` where it does not apply, and
/// for tensors autograd tracks.
pub fn matmul_batched(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    let r = a.rank();
    if r < 3 || b.rank() != r || a.dims()[..r - 2] != b.dims()[..r - 2] {
        return Ok(None);
    }
    let (m, k, k2, p) = (a.dim(r - 2)?, a.dim(r - 1)?, b.dim(r - 2)?, b.dim(r - 1)?);
    if k != k2 || k == 0 || a.elem_count() == 0 || b.elem_count() == 0 {
        return Ok(None); // an empty output, or k = 0: nothing for gemm to write
    }
    match a.dtype() {
        DType::F32 => with_slices(a, b, |x, y| batched::<f32>(x, y, (a, b), (m, k, p))),
        DType::F64 => with_slices(a, b, |x, y| batched::<f64>(x, y, (a, b), (m, k, p))),
        _ => Ok(None),
    }
}

/// Offset of batch item `i` (row-major over `dims`) in a tensor of `strides`.
fn batch_offset(i: usize, dims: &[usize], strides: &[usize]) -> usize {
    let (mut i, mut off) = (i, 0);
    for (&d, &s) in dims.iter().zip(strides).rev() {
        off += (i % d) * s;
        i /= d;
    }
    off
}

/// [`matmul_batched`] on `a`'s elements `x` and `b`'s `y` (the tensors give shape and strides).
fn batched<T: WithDType>(
    x: &[T],
    y: &[T],
    (a, b): (&Tensor, &Tensor),
    (m, k, p): (usize, usize, usize),
) -> Result<Tensor> {
    let r = a.rank();
    let lead = &a.dims()[..r - 2];
    let (sa, sb) = (a.stride(), b.stride());
    let len = lead.iter().product::<usize>() * m * p;
    let mut out = Vec::<T>::with_capacity(len); // every element written below: no zeroing
    {
        let as_isize = |v: usize| v as isize;
        let (a_rows, a_cols) = (as_isize(sa[r - 2]), as_isize(sa[r - 1]));
        let (b_rows, b_cols) = (as_isize(sb[r - 2]), as_isize(sb[r - 1]));
        let spare = &mut out.spare_capacity_mut()[..len];
        spare.par_chunks_mut(m * p).enumerate().for_each(|(i, o)| {
            let (ai, bi) = (batch_offset(i, lead, sa), batch_offset(i, lead, sb));
            // SAFETY: the layouts describe `a` and `b` inside their storage (candle checked
            // them when it made the views), so item i's m x k and k x p elements lie in x and y
            // at these offsets and strides; `o` is item i's own m x p block of `out`, which
            // `gemm_overwrite` (k > 0) writes whole.
            unsafe {
                gemm_overwrite(
                    (m, p, k),
                    (o.as_mut_ptr().cast::<T>(), p as isize),
                    (x.as_ptr().add(ai), a_cols, a_rows),
                    (y.as_ptr().add(bi), b_cols, b_rows),
                )
            }
        });
    }
    // SAFETY: the chunks cover all `len` elements and gemm wrote each (above).
    unsafe { out.set_len(len) };
    let mut shape = lead.to_vec();
    shape.extend([m, p]);
    Tensor::from_vec(out, shape, a.device())
}

/// `dst = lhs rhs` for an `m x k` lhs and a `k x n` rhs, on the calling thread: one `gemm` call
/// that overwrites every element of `dst` (row stride `dst_rs`, unit column stride) without
/// reading it when `k > 0`. Operands are `(pointer, column stride, row stride)`, in elements.
///
/// # Safety
/// Every addressed element of the operands must be readable and of `dst` writable, and no other
/// thread may touch `dst`'s elements during the call.
unsafe fn gemm_overwrite<T: WithDType>(
    mnk: (usize, usize, usize),
    dst: (*mut T, isize),
    lhs: (*const T, isize, isize),
    rhs: (*const T, isize, isize),
) {
    // SAFETY: the caller's contract (above).
    unsafe { gemm_single(mnk, dst, lhs, rhs, false) }
}

/// [`gemm_overwrite`], or with `accumulate` `dst += lhs rhs` (reading `dst`).
///
/// # Safety
/// As [`gemm_overwrite`]; with `accumulate` every element of `dst` must also be initialised.
pub(super) unsafe fn gemm_single<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (*mut T, isize),
    (lhs, lhs_cs, lhs_rs): (*const T, isize, isize),
    (rhs, rhs_cs, rhs_rs): (*const T, isize, isize),
    accumulate: bool,
) {
    // SAFETY: the caller's contract (above).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs,
            accumulate, // read_dst: without it the output is overwritten (alpha is then ignored)
            lhs,
            lhs_cs,
            lhs_rs,
            rhs,
            rhs_cs,
            rhs_rs,
            T::one(),
            T::one(),
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// The output's base pointer, shared by blocks that write disjoint columns.
pub(super) struct SendPtr<T>(pub(super) *mut T);
// SAFETY: see `by_columns`: the blocks write disjoint elements.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The same bits as candle's matmul for f32 and f64, odd and even widths, several thread
    /// counts; `None` for shapes and layouts it leaves to candle.
    #[test]
    fn column_blocks_give_candles_bits() {
        let dev = Device::Cpu;
        for threads in [2, 3, 8] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for (m, k, n) in [
                (65, 576, 576),
                (256, 1536, 577),
                (300, 33, 200),
                (100, 7, 1000),
                (70, 5, 641),
            ] {
                for dtype in [DType::F32, DType::F64] {
                    let x = Tensor::randn(0f32, 1., (m, k), &dev).unwrap();
                    let w = Tensor::randn(0f32, 1., (n, k), &dev).unwrap();
                    let (x, w) = (x.to_dtype(dtype).unwrap(), w.to_dtype(dtype).unwrap());
                    let wt = w.t().unwrap();
                    let ours = pool.install(|| matmul_by_columns(&x, &wt)).unwrap();
                    let ours = ours.expect("qualifies");
                    let theirs = pool.install(|| x.matmul(&wt)).unwrap();
                    let (ours, theirs) = (
                        ours.to_dtype(DType::F64).unwrap().flatten_all().unwrap(),
                        theirs.to_dtype(DType::F64).unwrap().flatten_all().unwrap(),
                    );
                    assert_eq!(
                        ours.to_vec1::<f64>().unwrap(),
                        theirs.to_vec1::<f64>().unwrap(),
                        "{m}x{k}x{n} {dtype:?} on {threads} threads"
                    );
                }
            }
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let x = Tensor::randn(0f32, 1., (128, 64), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., (256, 64), &dev).unwrap();
        let none = |a: &Tensor, b: &Tensor| pool.install(|| matmul_by_columns(a, b)).unwrap();
        assert!(none(&x, &w.t().unwrap()).is_some());
        assert!(none(&x.narrow(0, 0, 64).unwrap(), &w.t().unwrap()).is_none()); // 64 rows
        assert!(none(&x, &w.narrow(0, 0, 127).unwrap().t().unwrap()).is_none()); // one block
        let wc = w.t().unwrap().contiguous().unwrap();
        assert!(none(&x, &wc).is_none()); // a row-major right operand
        assert!(none(&x.t().unwrap(), &x).is_none()); // a transposed left operand
    }

    /// The same bits as candle's batched matmul, for rank 3 and 4, transposed and strided views,
    /// f32 and f64, batches smaller and larger than the thread count.
    #[test]
    fn batched_products_give_candles_bits() {
        let dev = Device::Cpu;
        let r = |s: &[usize]| Tensor::randn(0f32, 1., s, &dev).unwrap();
        for threads in [1, 2, 3, 8] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for dtype in [DType::F32, DType::F64] {
                let d = |t: Tensor| t.to_dtype(dtype).unwrap();
                let q = d(r(&[2, 5, 130, 32]));
                let kt = d(r(&[2, 5, 130, 32])).transpose(2, 3).unwrap();
                let p = d(r(&[2, 5, 130, 130]));
                let heads_view = d(r(&[2, 130, 5, 32])).transpose(1, 2).unwrap();
                let cases = [
                    (q.clone(), kt),
                    (p.clone(), heads_view.clone()),
                    (p.transpose(2, 3).unwrap(), q),
                    (d(r(&[7, 4, 5])), d(r(&[7, 5, 2]))),
                    (d(r(&[1, 3, 9])), d(r(&[1, 9, 1]))),
                    (d(r(&[11, 64, 70])), d(r(&[11, 70, 300]))),
                ];
                for (a, b) in cases {
                    let ours = pool.install(|| matmul_batched(&a, &b)).unwrap();
                    // candle refuses some views (heads out of a `[b, t, h, d]` layout); it
                    // gets contiguous copies of those.
                    let theirs = pool
                        .install(|| a.matmul(&b))
                        .or_else(|_| a.contiguous()?.matmul(&b.contiguous()?))
                        .unwrap();
                    let ours = ours.expect("qualifies");
                    assert_eq!(ours.dims(), theirs.dims());
                    let bits = |t: Tensor| {
                        let t = t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
                        t.to_vec1::<f64>().unwrap()
                    };
                    assert_eq!(
                        bits(ours),
                        bits(theirs),
                        "{:?} x {:?} {dtype:?} on {threads} threads",
                        a.dims(),
                        b.dims()
                    );
                }
            }
        }
        let (a, b) = (r(&[2, 3, 4]), r(&[3, 4, 5]));
        assert!(matmul_batched(&a, &b).unwrap().is_none()); // different batches
        assert!(matmul_batched(&r(&[3, 4]), &r(&[4, 5])).unwrap().is_none()); // rank 2
        let a16 = a.to_dtype(DType::BF16).unwrap();
        let b16 = r(&[2, 4, 5]).to_dtype(DType::BF16).unwrap();
        assert!(matmul_batched(&a16, &b16).unwrap().is_none()); // bf16
        assert!(matmul_batched(&r(&[2, 3, 0]), &r(&[2, 0, 4]))
            .unwrap()
            .is_none()); // k = 0
        let tracked = candle_core::Var::from_tensor(&r(&[2, 4, 5])).unwrap();
        assert!(matmul_batched(&a.narrow(0, 0, 2).unwrap(), &tracked)
            .unwrap()
            .is_none());
        let (x, w) = (
            r(&[128, 64]),
            candle_core::Var::from_tensor(&r(&[256, 64])).unwrap(),
        );
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let wt = w.t().unwrap();
        assert!(pool
            .install(|| matmul_by_columns(&x, &wt))
            .unwrap()
            .is_none());
        let untracked = wt.detach();
        assert!(pool
            .install(|| matmul_by_columns(&x, &untracked))
            .unwrap()
            .is_some());
    }
}
