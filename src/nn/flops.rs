//! Analytical FLOP accounting: every matmul the model runs goes through [`matmul`], which adds
//! `2 * batch * m * n * k` to a counter of the calling thread. The trainer reads it per epoch, so reported
//! training FLOPs are those of the matmuls actually executed (frozen layers' backward included or
//! not, exactly as run), not an estimate from the model shape.

use candle_core::{DType, Result, Tensor};
use std::cell::Cell;

thread_local! {
    /// Per thread: a trainer runs its step and its monitoring on one thread, and tests running in
    /// parallel each see only their own matmuls.
    static MATMUL_FLOPS: Cell<u64> = const { Cell::new(0) };
}

/// `a @ b` (candle's batched matmul) with FLOP accounting.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let out = if !a.device().is_cpu() {
        gpu_matmul(a, b)?
    } else if let Some(out) = super::cpu_matmul::matmul_by_columns(a, b)? {
        out
    } else if let Some(out) = super::cpu_matmul::matmul_batched(a, b)? {
        out
    } else {
        a.matmul(b)?
    };
    count(a, &out);
    Ok(out)
}

/// Adds the FLOPs of the product `out` of `a` with something: `2 * batch * m * n * k`.
fn count(a: &Tensor, out: &Tensor) {
    let k = a.dims()[a.rank() - 1] as u64;
    let mn = out.elem_count() as u64; // batch * m * n
    MATMUL_FLOPS.with(|f| f.set(f.get() + 2 * mn * k));
}

/// `alpha * (a @ b)` as a tensor of `out`, counted as [`matmul`]: on CUDA one cuBLAS product with
/// the scale and the output dtype folded in (`gpu::gemm`); elsewhere [`matmul`], the scale, the
/// cast.
pub fn matmul_scaled(a: &Tensor, b: &Tensor, alpha: f64, out: DType) -> Result<Tensor> {
    let Some(y) = super::gpu::gemm(a, b, alpha, out)? else {
        let y = matmul(a, b)?;
        let y = if alpha == 1.0 {
            y
        } else {
            y.affine(alpha, 0.0)?
        };
        return y.to_dtype(out);
    };
    count(a, &y);
    Ok(y)
}

/// cuBLAS takes each operand's last two dims either row-major or transposed, with evenly strided
/// batches; other views (a row slice of a wider tensor, say) are copied to a contiguous layout first.
fn gpu_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let ok = cublas_layout_ok;
    match (ok(a), ok(b)) {
        (true, true) => a.matmul(b),
        (ta, tb) => {
            let a = if ta { a.clone() } else { a.contiguous()? };
            let b = if tb { b.clone() } else { b.contiguous()? };
            a.matmul(&b)
        }
    }
}

/// How a `[rows, cols]` matrix with element strides `[sr, sc]` lies in memory, as cuBLAS takes an
/// operand: Some(false) row-major, Some(true) a transposed view of a row-major `[cols, rows]`
/// (column-major), None otherwise. A dimension of 1 fits either.
pub(crate) fn matrix_transposed([rows, cols]: [usize; 2], [sr, sc]: [usize; 2]) -> Option<bool> {
    if (sc == 1 || cols == 1) && (sr == cols || rows == 1) {
        Some(false)
    } else if (sr == 1 || rows == 1) && (sc == rows || cols == 1) {
        Some(true)
    } else {
        None
    }
}

/// Whether candle's CUDA matmul accepts this operand's layout as it is.
pub(crate) fn cublas_layout_ok(t: &Tensor) -> bool {
    let (d, s) = (t.dims(), t.stride());
    let n = d.len();
    if n < 2 {
        return t.is_contiguous();
    }
    let inner = matrix_transposed([d[n - 2], d[n - 1]], [s[n - 2], s[n - 1]]).is_some();
    // Batch dims (rank 4): the outer batch stride must step over whole inner batches.
    let batch_ok = (0..n.saturating_sub(3)).all(|i| d[i + 1] == 1 || s[i] == s[i + 1] * d[i + 1]);
    inner && batch_ok
}

/// FLOPs counted on this thread since it started.
/// Counts `flops` done outside [`matmul`] (the fused attention kernels: they add what the
/// composition's matmuls would have counted, so counted TFLOP/s compare across the two paths).
pub fn add(flops: u64) {
    MATMUL_FLOPS.with(|f| f.set(f.get() + flops));
}

pub fn total() -> u64 {
    MATMUL_FLOPS.with(Cell::get)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn cublas_layouts_are_recognised() {
        let t = Tensor::zeros((4, 6, 5), DType::F32, &Device::Cpu).unwrap();
        assert!(cublas_layout_ok(&t));
        assert!(cublas_layout_ok(&t.t().unwrap()));
        // A column slice and the first token of each sequence (rows strided by seq * hidden).
        assert!(!cublas_layout_ok(&t.narrow(2, 1, 3).unwrap()));
        let first = t.narrow(1, 0, 1).unwrap().squeeze(1).unwrap();
        assert!(!cublas_layout_ok(&first));
        assert!(cublas_layout_ok(&first.contiguous().unwrap()));
        let q = Tensor::zeros((2, 3, 4, 8), DType::F32, &Device::Cpu).unwrap();
        assert!(cublas_layout_ok(&q.t().unwrap()));
        assert!(!cublas_layout_ok(&q.transpose(1, 2).unwrap()));
        // The fallback gives candle's own result on the CPU.
        let a = Tensor::randn(0f32, 1., (3, 4), &Device::Cpu).unwrap();
        let w = Tensor::randn(0f32, 1., (5, 4), &Device::Cpu).unwrap();
        let d = (gpu_matmul(&a, &w.t().unwrap()).unwrap() - a.matmul(&w.t().unwrap()).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-6);
    }
}
