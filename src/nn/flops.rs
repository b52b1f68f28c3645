//! Analytical FLOP accounting: every matmul the model runs goes through [`matmul`], which adds
//! `2 * batch * m * n * k` to a process-wide counter. The trainer reads it per epoch, so reported
//! training FLOPs are those of the matmuls actually executed (frozen layers' backward included or
//! not, exactly as run), not an estimate from the model shape.

use candle_core::{Result, Tensor};
use std::sync::atomic::{AtomicU64, Ordering};

static MATMUL_FLOPS: AtomicU64 = AtomicU64::new(0);

/// `a @ b` (candle's batched matmul) with FLOP accounting.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let out = if a.rank() >= 3 && a.dim(0)? >= 2 {
        super::cpu::batched_matmul(a, b)?
    } else {
        a.matmul(b)?
    };
    let dims = a.dims();
    let k = dims[dims.len() - 1] as u64;
    let mn = out.elem_count() as u64; // batch * m * n
    MATMUL_FLOPS.fetch_add(2 * mn * k, Ordering::Relaxed);
    Ok(out)
}

/// FLOPs counted since the process started.
pub fn total() -> u64 {
    MATMUL_FLOPS.load(Ordering::Relaxed)
}
