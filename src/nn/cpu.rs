//! Fused CPU kernels for the elementwise and row-wise parts of a step (LayerNorm, RMSNorm, GELU,
//! SwiGLU, cross-entropy, rotary embeddings), one pass over memory
//! each, rows split across threads with rayon.
//!
//! Why: composed from candle ops, each of these is 5-10 passes with a fresh allocation per pass,
//! which measured as half of a MiniLM training step on 2 cores. Each kernel returns `None` when its
//! inputs are not contiguous f32 CPU tensors, and the caller falls back to the candle composition,
//! which stays the reference the kernels are tested against (and the path on other devices).

use super::dropout;
use super::gpu::NormOut;
use candle_core::{Result, Storage, Tensor};
use rayon::prelude::*;

/// Defines `[vis] fn $name(args) [-> ret]` whose body is compiled three times: for AVX-512F,
/// for AVX2 + FMA and for the build's baseline (SSE2 on x86-64), and picks the first the CPU has
/// at run time. The elementwise loops below then use the CPU's full vector width (the baseline
/// build vectorises them 4 lanes wide). Rust contracts no `a * b + c` into an FMA by itself, so
/// every variant computes the same bits.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn v4($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn v3($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has AVX2 and FMA.
                    return unsafe { v3($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

pub(super) use multiversion;

/// Runs `f` on the tensor's contiguous f32 host data, if it has such data.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    with_slice(t, f)
}

/// The elements of a contiguous CPU tensor of dtype `T`; None otherwise.
fn with_slice<T: candle_core::WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return None;
    };
    let data = cpu.as_slice::<T>().ok()?;
    let (start, end) = layout.contiguous_offsets()?;
    Some(f(&data[start..end]))
}

/// A contiguous f64 CPU matrix's elements and its row length; None otherwise.
fn with_f64_rows<R>(t: &Tensor, f: impl FnOnce(&[f64], usize) -> R) -> Option<R> {
    let &[_, c] = t.dims() else {
        return None;
    };
    if c == 0 {
        return None;
    }
    with_slice(t, |x| f(x, c))
}

/// `t.sqr()?.sum(1)?.sum_all()` of a contiguous f64 CPU matrix with its rows in parallel: the
/// same products and sums in the same order (each row from 0, then the rows in order), so the
/// same bits, where candle runs the squares and the sums on one thread. None elsewhere.
pub fn sum_sq_f64(t: &Tensor) -> Option<f64> {
    with_f64_rows(t, |x, c| {
        let rows: Vec<f64> = x
            .par_chunks(c)
            .map(|r| r.iter().fold(0f64, |a, &v| a + v * v))
            .collect();
        rows.iter().fold(0f64, |a, &v| a + v)
    })
}

/// `t.mean_keepdim(0)` of a contiguous f64 CPU matrix `[n, c]` with its columns in parallel: each
/// column summed from 0 down the rows, then scaled by `1 / n`, as candle does on one thread (so the
/// same bits). None elsewhere.
pub fn col_mean_f64(t: &Tensor) -> Result<Option<Tensor>> {
    let Some(mean) = with_f64_rows(t, |x, c| {
        let n = x.len() / c;
        let scale = 1f64 / n as f64;
        let mut mean = vec![0f64; c];
        const BLOCK: usize = 64;
        mean.par_chunks_mut(BLOCK).enumerate().for_each(|(b, out)| {
            for row in x.chunks(c) {
                for (o, &v) in out.iter_mut().zip(&row[b * BLOCK..]) {
                    *o += v;
                }
            }
            for o in out.iter_mut() {
                *o *= scale;
            }
        });
        mean
    }) else {
        return Ok(None);
    };
    let c = mean.len();
    Ok(Some(Tensor::from_vec(mean, (1, c), t.device())?))
}

fn tensor(v: Vec<f32>, like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(v, like.shape(), like.device())
}

/// All inputs as f32 host slices, or None.
macro_rules! slices {
    ($($t:ident),+ => $body:expr) => {
        with_all(&[$($t),+], |s| { let [$($t),+] = s else { unreachable!() }; $body })
    };
}

fn with_all<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Option<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(ts.len());
    for (storage, layout) in &guards {
        let Storage::Cpu(cpu) = &**storage else {
            return None;
        };
        let data = cpu.as_slice::<f32>().ok()?;
        let (a, b) = layout.contiguous_offsets()?;
        slices.push(&data[a..b]);
    }
    Some(f(&slices))
}

/// LayerNorm forward over rows of `c`: returns `(y, xhat, rstd)`, xhat only if `want_xhat`.
pub fn layer_norm_fwd(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    want_xhat: bool,
) -> Result<Option<NormOut>> {
    let c = x.dim(candle_core::D::Minus1)?;
    let out = slices!(x, gamma, beta => norm_rows(x, c, want_xhat, |x, y| {
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / c as f64;
        let rs = 1.0 / (var + eps).sqrt();
        for i in 0..c {
            y[i] = ((x[i] as f64 - mean) * rs) as f32;
        }
        rs as f32
    }, |y| {
        for i in 0..c {
            y[i] = y[i] * gamma[i] + beta[i];
        }
    }));
    norm_tensors(x, out)
}

/// RMSNorm forward over rows of `c`: returns `(y, xhat, rstd)` (xhat only if `want_xhat`),
/// `xhat = x * rstd`, `rstd = 1 / sqrt(mean(x^2) + eps)`, `y = xhat * weight`.
pub fn rms_norm_fwd(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    want_xhat: bool,
) -> Result<Option<NormOut>> {
    let c = x.dim(candle_core::D::Minus1)?;
    let out = slices!(x, weight => norm_rows(x, c, want_xhat, |x, y| {
        let ms = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / c as f64;
        let rs = 1.0 / (ms + eps).sqrt();
        for i in 0..c {
            y[i] = (x[i] as f64 * rs) as f32;
        }
        rs as f32
    }, |y| {
        for i in 0..c {
            y[i] *= weight[i];
        }
    }));
    norm_tensors(x, out)
}

/// A norm forward's `(y, xhat, rstd)` on the host, xhat where wanted.
type NormVecs = (Vec<f32>, Option<Vec<f32>>, Vec<f32>);

/// Both norms' forward loop over rows of `c` in parallel, one pass per row while it is in cache:
/// `normalize(x, row)` writes the row's xhat into `row` and returns its rstd, a copy goes to
/// xhat where wanted, then `scale(row)` turns it into y in place. Returns `(y, xhat, rstd)`.
fn norm_rows(
    x: &[f32],
    c: usize,
    want_xhat: bool,
    normalize: impl Fn(&[f32], &mut [f32]) -> f32 + Sync,
    scale: impl Fn(&mut [f32]) + Sync,
) -> NormVecs {
    let rows = x.len() / c;
    let mut y = vec![0f32; rows * c];
    let mut rstd = vec![0f32; rows];
    let mut xhat = want_xhat.then(|| vec![0f32; rows * c]);
    let row = |y: &mut [f32], x: &[f32], xh: Option<&mut [f32]>| {
        let rs = normalize(x, y);
        if let Some(xh) = xh {
            xh.copy_from_slice(y);
        }
        scale(y);
        rs
    };
    let each = y
        .par_chunks_mut(c)
        .zip(rstd.par_iter_mut())
        .zip(x.par_chunks(c));
    match xhat.as_mut() {
        Some(xhat) => each
            .zip(xhat.par_chunks_mut(c))
            .for_each(|(((y, r), x), xh)| *r = row(y, x, Some(xh))),
        None => each.for_each(|((y, r), x)| *r = row(y, x, None)),
    }
    (y, xhat, rstd)
}

/// `(y, xhat, rstd)` tensors shaped like `x` (rstd with a last dimension of 1) from
/// [`norm_rows`]' vectors; None where the kernel did not apply.
fn norm_tensors(x: &Tensor, out: Option<NormVecs>) -> Result<Option<NormOut>> {
    let Some((y, xhat, rstd)) = out else {
        return Ok(None);
    };
    let rows = rstd.len();
    let rs = Tensor::from_vec(rstd, rows, x.device())?;
    let mut rdims = x.dims().to_vec();
    *rdims.last_mut().expect("rank >= 1") = 1;
    let xhat = xhat.map(|v| tensor(v, x)).transpose()?;
    Ok(Some((tensor(y, x)?, xhat, rs.reshape(rdims)?)))
}

/// Both norms' backward: `dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`, `g = dy * gamma`,
/// for LayerNorm; RMSNorm (`center = false`) without the `mean(g)` term.
pub fn norm_bwd(
    dy: &Tensor,
    rows: &Tensor,
    rstd: &Tensor,
    gamma: &Tensor,
    center: bool,
    from_output: bool,
) -> Result<Option<Tensor>> {
    let c = dy.dim(candle_core::D::Minus1)?;
    let n = dy.elem_count() / c;
    let out = slices!(dy, rows, rstd, gamma => {
        let mut dx = vec![0f32; n * c];
        dx.par_chunks_mut(c)
            .zip(dy.par_chunks(c))
            .zip(rows.par_chunks(c))
            .zip(rstd.par_iter())
            .for_each(|(((dx, dy), xs), &rs)| {
                // `xs` is xhat, or the output y = xhat * gamma (`from_output`).
                let xhat = |i: usize| if from_output { xs[i] / gamma[i] } else { xs[i] };
                let (mut sg, mut sgx) = (0f64, 0f64);
                for i in 0..c {
                    let g = (dy[i] * gamma[i]) as f64;
                    sg += g;
                    sgx += if from_output {
                        (dy[i] * xs[i]) as f64
                    } else {
                        g * xs[i] as f64
                    };
                }
                let mg = if center { (sg / c as f64) as f32 } else { 0.0 };
                let mgx = (sgx / c as f64) as f32;
                for i in 0..c {
                    dx[i] = rs * (dy[i] * gamma[i] - mg - xhat(i) * mgx);
                }
            });
        dx
    });
    out.map(|dx| tensor(dx, dy)).transpose()
}

/// `exp(x)` in f32 within 2 ulp (Cephes' `expf`: `x = n ln2 + r`, a degree-7 polynomial in
/// `r`, `2^n` from the exponent bits), with no call into libm, so loops over it vectorise: the
/// libm `exp` was the largest cost of a CPU training step after the matmuls (GELU, softmax).
/// Below -87.3 it is 0 (as `exp` underflows to 0 there, up to denormals); NaN stays NaN; above
/// 88 it saturates at `exp(88)`, a case none of its callers reaches.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting it rounds to an integer
    let xc = x.clamp(-87.336_54, 88.0);
    let rounded = xc * std::f32::consts::LOG2_E + ROUND;
    let n = rounded - ROUND;
    let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4; // ln 2 in two parts: n * hi is exact
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n from the bits of `rounded` (ROUND + n: n sits in its low mantissa bits), in integer
    // operations: `n as i32` would be a saturating conversion that does not vectorise.
    let n_int = (rounded.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let scale = f32::from_bits((n_int.wrapping_add(127) << 23) as u32);
    if x < -87.336_54 {
        0.0
    } else {
        e * scale
    }
}

/// erf with |error| < 5e-7: Numerical Recipes' erfc Chebyshev fit (1.2e-7) evaluated in f32 with
/// [`exp_f32`] (within 3.3e-7 of the fit in f64), so GELU's loops vectorise.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t * exp_f32(
        -z * z - 1.265_512_2
            + t * (1.000_023_7
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_204
                                    + t * (1.488_515_9
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))),
    );
    let e = 1.0 - r;
    if x >= 0.0 {
        e
    } else {
        -e
    }
}

const CHUNK: usize = 4096;

/// GELU (erf form) forward.
pub fn gelu_fwd(x: &Tensor) -> Result<Option<Tensor>> {
    let out = with_f32(x, |x| {
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(y, x)| gelu_fwd_chunk(y, x));
        y
    });
    out.map(|y| tensor(y, x)).transpose()
}

multiversion! {
    fn gelu_fwd_chunk(y: &mut [f32], x: &[f32]) {
        for (y, &v) in y.iter_mut().zip(x) {
            *y = 0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2));
        }
    }
}

/// GELU backward in place: `x <- dy * (Phi(x) + x * phi(x))`; false where `x` and `dy` are not
/// contiguous f32 host tensors of one length.
pub fn gelu_bwd_in_place(x: &Tensor, dy: &Tensor) -> Result<bool> {
    in_place(x, &[dy], InPlace::Two(gelu_bwd_chunk))
}

multiversion! {
    fn gelu_bwd_chunk(x: &mut [f32], dy: &[f32]) {
        let inv_sqrt_2pi = 1.0 / (2.0 * std::f32::consts::PI).sqrt();
        for (x, &dy) in x.iter_mut().zip(dy) {
            let v = *x;
            let cdf = 0.5 * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2));
            let pdf = exp_f32(-0.5 * v * v) * inv_sqrt_2pi;
            *x = dy * (cdf + v * pdf);
        }
    }
}

/// `sqrt(2 / pi)` and the cubic coefficient of GELU's tanh approximation.
const GELU_TANH_C: f32 = 0.797_884_6;
const GELU_TANH_A: f32 = 0.044_715;

/// GELU (tanh approximation, GPT-2's `gelu_new`) forward.
pub fn gelu_tanh_fwd(x: &Tensor) -> Result<Option<Tensor>> {
    let out = with_f32(x, |x| {
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(y, x)| {
                for (y, &v) in y.iter_mut().zip(x) {
                    let u = GELU_TANH_C * (v + GELU_TANH_A * v * v * v);
                    *y = 0.5 * v * (1.0 + u.tanh());
                }
            });
        y
    });
    out.map(|y| tensor(y, x)).transpose()
}

/// GELU (tanh) backward in place: `x <- dy * (0.5 (1 + t) + 0.5 x (1 - t^2) u')`, `t = tanh(u)`;
/// false as for [`gelu_bwd_in_place`].
pub fn gelu_tanh_bwd_in_place(x: &Tensor, dy: &Tensor) -> Result<bool> {
    in_place(x, &[dy], InPlace::Two(gelu_tanh_bwd_chunk))
}

fn gelu_tanh_bwd_chunk(x: &mut [f32], dy: &[f32]) {
    for (x, &dy) in x.iter_mut().zip(dy) {
        let v = *x;
        let t = (GELU_TANH_C * (v + GELU_TANH_A * v * v * v)).tanh();
        let du = GELU_TANH_C * (1.0 + 3.0 * GELU_TANH_A * v * v);
        *x = dy * (0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * du);
    }
}

#[inline(always)]
fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-v))
}

/// SwiGLU forward: `silu(gate) * up`.
pub fn swiglu_fwd(gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
    let out = slices!(gate, up => {
        let mut y = vec![0f32; gate.len()];
        y.par_chunks_mut(CHUNK)
            .zip(gate.par_chunks(CHUNK))
            .zip(up.par_chunks(CHUNK))
            .for_each(|((y, g), u)| swiglu_fwd_chunk(y, g, u));
        y
    });
    out.map(|y| tensor(y, gate)).transpose()
}

/// SwiGLU backward in place, in two passes: `up <- dgate = dy * up * s (1 + g (1 - s))`, then
/// `gate <- dup = dy * g s` (`s = sigmoid(g)`), so that `up` holds the gate's gradient and `gate`
/// the up projection's; false where the three are not contiguous f32 host tensors of one length.
pub fn swiglu_bwd_in_place(gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<bool> {
    Ok(
        in_place(up, &[gate, dy], InPlace::Three(swiglu_dgate_chunk))?
            && in_place(gate, &[dy], InPlace::Two(swiglu_dup_chunk))?,
    )
}

multiversion! {
    fn swiglu_fwd_chunk(y: &mut [f32], g: &[f32], u: &[f32]) {
        for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
            *y = g * sigmoid(g) * u;
        }
    }
}

multiversion! {
    fn swiglu_dgate_chunk(u: &mut [f32], g: &[f32], dy: &[f32]) {
        for ((u, &g), &dy) in u.iter_mut().zip(g).zip(dy) {
            let s = sigmoid(g);
            *u = dy * *u * s * (1.0 + g * (1.0 - s));
        }
    }
}

multiversion! {
    fn swiglu_dup_chunk(g: &mut [f32], dy: &[f32]) {
        for (g, &dy) in g.iter_mut().zip(dy) {
            *g = dy * *g * sigmoid(*g);
        }
    }
}

/// `y += t` in place (the same sums as candle's `y + t`); false as for [`gelu_bwd_in_place`].
pub fn add_in_place(y: &Tensor, t: &Tensor) -> Result<bool> {
    in_place(y, &[t], InPlace::Two(add_chunk))
}

fn add_chunk(y: &mut [f32], t: &[f32]) {
    for (y, &t) in y.iter_mut().zip(t) {
        *y += t;
    }
}

/// An elementwise pass that overwrites its first operand, chunk by chunk over the threads.
#[derive(Clone, Copy)]
enum InPlace {
    Two(fn(&mut [f32], &[f32])),
    Three(fn(&mut [f32], &[f32], &[f32])),
}

impl InPlace {
    /// The pass over `dst` and its `N` source operands, chunk by chunk.
    fn run<const N: usize>(
        self,
        dst: &mut candle_core::CpuStorage,
        dst_l: &candle_core::Layout,
        srcs: [(&candle_core::CpuStorage, &candle_core::Layout); N],
    ) -> Result<()> {
        let (dst, srcs) = in_place_slices(dst, dst_l, srcs)?;
        let part = |i: usize, len: usize| srcs.map(|s| &s[i * CHUNK..i * CHUNK + len]);
        match (self, N) {
            (Self::Two(f), 1) => dst
                .par_chunks_mut(CHUNK)
                .enumerate()
                .for_each(|(i, d)| f(d, part(i, d.len())[0])),
            (Self::Three(f), 2) => dst.par_chunks_mut(CHUNK).enumerate().for_each(|(i, d)| {
                let s = part(i, d.len());
                f(d, s[0], s[1])
            }),
            _ => candle_core::bail!("cpu_in_place: {} operands for the pass", N + 1),
        }
        Ok(())
    }
}

impl candle_core::InplaceOp2 for InPlace {
    fn name(&self) -> &'static str {
        "cpu_in_place"
    }
    fn cpu_fwd(
        &self,
        dst: &mut candle_core::CpuStorage,
        dst_l: &candle_core::Layout,
        a: &candle_core::CpuStorage,
        a_l: &candle_core::Layout,
    ) -> Result<()> {
        self.run(dst, dst_l, [(a, a_l)])
    }
}

impl candle_core::InplaceOp3 for InPlace {
    fn name(&self) -> &'static str {
        "cpu_in_place"
    }
    fn cpu_fwd(
        &self,
        dst: &mut candle_core::CpuStorage,
        dst_l: &candle_core::Layout,
        a: &candle_core::CpuStorage,
        a_l: &candle_core::Layout,
        b: &candle_core::CpuStorage,
        b_l: &candle_core::Layout,
    ) -> Result<()> {
        self.run(dst, dst_l, [(a, a_l), (b, b_l)])
    }
}

/// The contiguous f32 slices of an in-place pass's operands (checked by [`in_place`] first).
fn in_place_slices<'a, const N: usize>(
    dst: &'a mut candle_core::CpuStorage,
    dst_l: &candle_core::Layout,
    srcs: [(&'a candle_core::CpuStorage, &candle_core::Layout); N],
) -> Result<(&'a mut [f32], [&'a [f32]; N])> {
    let range = |l: &candle_core::Layout| {
        l.contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("cpu_in_place: a strided operand".into()))
    };
    let (a, b) = range(dst_l)?;
    let dst = match dst {
        candle_core::CpuStorage::F32(v) => &mut v[a..b],
        _ => candle_core::bail!("cpu_in_place: not f32"),
    };
    let mut out = [&[][..]; N];
    for (o, (s, l)) in out.iter_mut().zip(srcs) {
        let (a, b) = range(l)?;
        *o = &s.as_slice::<f32>()?[a..b];
    }
    Ok((dst, out))
}

/// Runs `pass` over `dst` and `srcs` in place, where all are contiguous f32 host tensors of
/// `dst`'s length; false (nothing done) otherwise.
fn in_place(dst: &Tensor, srcs: &[&Tensor], pass: InPlace) -> Result<bool> {
    let fits = |t: &Tensor| {
        t.device().is_cpu()
            && t.dtype() == candle_core::DType::F32
            && t.is_contiguous()
            && t.elem_count() == dst.elem_count()
    };
    if !fits(dst) || !srcs.iter().all(|t| fits(t)) {
        return Ok(false);
    }
    // `InPlace::run` checks that the pass takes this many operands.
    match srcs {
        [a] => dst.inplace_op2(a, &pass)?,
        [a, b] => dst.inplace_op3(a, b, &pass)?,
        _ => candle_core::bail!("cpu_in_place: {} operands", srcs.len() + 1),
    }
    Ok(true)
}

/// Lanes of a SIMD register-wide reduction: `f` folded over `x` in 16 interleaved lanes (which
/// the compiler keeps in vector registers), to be folded once more by the caller.
#[inline(always)]
pub(super) fn lanes(x: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> [f32; 16] {
    let mut acc = [init; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for l in 0..16 {
            acc[l] = f(acc[l], c[l]);
        }
    }
    for (l, &v) in chunks.remainder().iter().enumerate() {
        acc[l] = f(acc[l], v);
    }
    acc
}

multiversion! {
    /// The largest element (NEG_INFINITY for an empty row), over 16 lanes.
    pub(super) fn row_max(z: &[f32]) -> f32 {
        lanes(z, f32::NEG_INFINITY, f32::max).into_iter().fold(f32::NEG_INFINITY, f32::max)
    }
}

multiversion! {
    /// `e = exp(z - max)`; returns the sum of `e` in f64 (16 lanes).
    fn exp_minus_into(e: &mut [f32], z: &[f32], max: f32) -> f64 {
        let mut acc = [0f64; 16];
        let mut ec = e.chunks_exact_mut(16);
        let mut zc = z.chunks_exact(16);
        for (e, z) in (&mut ec).zip(&mut zc) {
            for l in 0..16 {
                e[l] = exp_f32(z[l] - max);
                acc[l] += e[l] as f64;
            }
        }
        for (l, (e, &z)) in ec.into_remainder().iter_mut().zip(zc.remainder()).enumerate() {
            *e = exp_f32(z - max);
            acc[l] += *e as f64;
        }
        acc.iter().sum()
    }
}

multiversion! {
    /// The sum of `exp(z - max)` in f64 (16 lanes), without storing the terms.
    fn exp_minus_sum(z: &[f32], max: f32) -> f64 {
        let mut acc = [0f64; 16];
        let mut zc = z.chunks_exact(16);
        for z in &mut zc {
            for l in 0..16 {
                acc[l] += exp_f32(z[l] - max) as f64;
            }
        }
        for (l, &z) in zc.remainder().iter().enumerate() {
            acc[l] += exp_f32(z - max) as f64;
        }
        acc.iter().sum()
    }
}

multiversion! {
    /// `x *= s`.
    fn scale_row(x: &mut [f32], s: f32) {
        x.iter_mut().for_each(|v| *v *= s);
    }
}

/// Cross-entropy of each row of `logits [n, v]` against `targets` (all counted): returns the sum
/// of the row losses `lse - logit[target]` and, with `grad_scale`, `dlogits = (softmax - onehot) *
/// grad_scale`. Max-subtracted, the exponentials summed in f64 (vocabularies run to 10^5
/// entries), one vectorised [`exp_f32`] per logit (libm's scalar `exp`, twice per logit, was
/// about 3% of a SmolLM2 step on 2 cores).
pub fn cross_entropy_rows(
    logits: &Tensor,
    targets: &[u32],
    grad_scale: Option<f64>,
) -> Result<Option<(f64, Option<Tensor>)>> {
    let v = logits.dim(candle_core::D::Minus1)?;
    let out = with_f32(logits, |z| {
        let mut losses = vec![0f64; targets.len()];
        let mut d = vec![0f32; if grad_scale.is_some() { z.len() } else { 0 }];
        let row = |(loss, z, &t): (&mut f64, &[f32], &u32), d: Option<&mut [f32]>| {
            let max = row_max(z);
            let sum = match (d, grad_scale) {
                (Some(d), Some(g)) => {
                    // d = exp(z - max) * (g / sum): the softmax times g, from one exp each.
                    let sum = exp_minus_into(d, z, max);
                    scale_row(d, (g / sum) as f32);
                    d[t as usize] -= g as f32;
                    sum
                }
                _ => exp_minus_sum(z, max),
            };
            *loss = max as f64 + sum.ln() - z[t as usize] as f64;
        };
        let rows = losses
            .par_iter_mut()
            .zip(z.par_chunks(v))
            .zip(targets.par_iter());
        if grad_scale.is_some() {
            rows.zip(d.par_chunks_mut(v))
                .for_each(|(((l, z), t), d)| row((l, z, t), Some(d)));
        } else {
            rows.for_each(|((l, z), t)| row((l, z, t), None));
        }
        (losses.iter().sum::<f64>(), d)
    });
    let Some((loss, d)) = out else {
        return Ok(None);
    };
    let d = match grad_scale {
        Some(_) => Some(tensor(d, logits)?),
        None => None,
    };
    Ok(Some((loss, d)))
}

/// Rows of [`rope`] per rayon task: a row is one head of one token, too little work alone.
const ROPE_ROWS: usize = 64;

/// Rotary embedding (`nn::rope`) of `x` `[b, h, t, d]`, any strides with the last 1 (so the
/// layers' `[b*t, h*d]` projection seen per head needs no copy), into a new contiguous tensor:
/// heads-major `[b, h, t, d]`, or with `merged` `[b, t, h, d]` (the layers' layout). `cos` and
/// `sin` are `[t, d/2]`; `inverse` rotates by the negated angle (backward). One pass where the
/// composition makes a head-split copy, four products, two sums and a concatenation; the same
/// products and sums in its order, so its bits. None unless f32 on the CPU.
pub fn rope(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    inverse: bool,
    merged: bool,
) -> Result<Option<Tensor>> {
    let (b, h, t, d) = x.dims4()?;
    let half = d / 2;
    if half == 0 || cos.dims() != [t, half] || sin.dims() != [t, half] {
        return Ok(None);
    }
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    let (Ok(data), &[sb, sh, st, 1]) = (cpu.as_slice::<f32>(), layout.stride()) else {
        return Ok(None);
    };
    let data = &data[layout.start_offset()..];
    let y = slices!(cos, sin => {
        let mut y = vec![0f32; b * h * t * d];
        y.par_chunks_mut(d * ROPE_ROWS)
            .enumerate()
            .for_each(|(chunk, ys)| {
                for (i, yr) in ys.chunks_mut(d).enumerate() {
                    let r = chunk * ROPE_ROWS + i;
                    let (bi, hi, ti) = if merged {
                        (r / (t * h), r % h, r / h % t)
                    } else {
                        (r / (h * t), r / t % h, r % t)
                    };
                    let xr = &data[bi * sb + hi * sh + ti * st..][..d];
                    let at = ti * half..(ti + 1) * half;
                    rope_row(yr, xr, &cos[at.clone()], &sin[at], inverse);
                }
            });
        y
    });
    let Some(y) = y else {
        return Ok(None);
    };
    let shape = if merged { (b, t, h, d) } else { (b, h, t, d) };
    Ok(Some(Tensor::from_vec(y, shape, x.device())?))
}

multiversion! {
    /// `[x1 cos - x2 sin, x2 cos + x1 sin]` of one row `x = [x1, x2]`, `sin` negated if `inverse`.
    fn rope_row(y: &mut [f32], x: &[f32], cos: &[f32], sin: &[f32], inverse: bool) {
        let half = cos.len();
        let (x1, x2) = x.split_at(half);
        let (y1, y2) = y.split_at_mut(half);
        for i in 0..half {
            let s = if inverse { -sin[i] } else { sin[i] };
            y1[i] = x1[i] * cos[i] - x2[i] * s;
            y2[i] = x2[i] * cos[i] + x1[i] * s;
        }
    }
}

/// Dropout in one pass: `y = x * keep * scale`, the keep-mask drawn per
/// [`dropout::MASK_CHUNK`] elements from that chunk's seed (see [`dropout`]), as
/// `gpu::dropout_fwd` takes them. Backward is the same call on the output gradient.
pub fn dropout_fwd(
    x: &Tensor,
    seeds: &[u64],
    threshold: u32,
    scale: f32,
) -> Result<Option<Tensor>> {
    let n = x.elem_count();
    let out = with_f32(x, |x| {
        let mut y = vec![0f32; n];
        y.par_chunks_mut(dropout::MASK_CHUNK)
            .zip(x.par_chunks(dropout::MASK_CHUNK))
            .zip(seeds.par_iter())
            .for_each(|((y, x), &seed)| {
                let mut r = dropout::SplitMix64(seed);
                for i in 0..y.len() {
                    let kept = r.next_u32() < threshold;
                    y[i] = if kept { x[i] * scale } else { 0.0 };
                }
            });
        y
    });
    out.map(|y| tensor(y, x)).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parallel f64 sum of squares and column means give candle's one-thread results to the
    /// bit, at widths that are not multiples of the column blocks.
    #[test]
    fn f64_row_reductions_are_candles_to_the_bit() {
        for (n, c) in [(37, 200), (256, 576), (1, 3)] {
            let x = crate::nn::gradcheck::randn(&[n, c], 7)
                .affine(3.0, 0.25)
                .unwrap();
            let sq = x.sqr().unwrap().sum(1).unwrap().sum_all().unwrap();
            let sq = sq.to_scalar::<f64>().unwrap();
            assert_eq!(sum_sq_f64(&x).unwrap().to_bits(), sq.to_bits(), "{n} x {c}");
            let mean: Vec<f64> = x
                .mean_keepdim(0)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let ours = col_mean_f64(&x).unwrap().unwrap();
            assert_eq!(ours.dims(), [1, c]);
            let ours: Vec<f64> = ours.flatten_all().unwrap().to_vec1().unwrap();
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&ours), bits(&mean), "{n} x {c}");
        }
        // Not a contiguous f64 CPU matrix: the caller's composition runs.
        let t = crate::nn::gradcheck::randn(&[4, 6], 8);
        assert!(sum_sq_f64(&t.t().unwrap()).is_none());
        assert!(sum_sq_f64(&t.to_dtype(candle_core::DType::F32).unwrap()).is_none());
    }

    /// `exp_f32` against f64's `exp` over its whole range, and at its edges.
    #[test]
    fn exp_f32_is_within_2_ulp_of_exp() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.3 + 175.3 * i as f64 / 200_000.0;
            let x = x as f32;
            let want = (x as f64).exp();
            worst = worst.max(((exp_f32(x) as f64 - want) / want).abs());
        }
        assert!(worst < 2.4e-7, "max relative error {worst:e}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-88.0), 0.0);
        assert_eq!(exp_f32(-1e9), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    /// erf (f32) against the same fit in f64 and against tabulated values.
    #[test]
    fn erf_is_within_5e_7() {
        let erf64 = |x: f64| {
            let z = x.abs();
            let t = 1.0 / (1.0 + 0.5 * z);
            let c = [
                -1.26551223,
                1.00002368,
                0.37409196,
                0.09678418,
                -0.18628806,
                0.27886807,
                -1.13520398,
                1.48851587,
                -0.82215223,
                0.17087277,
            ];
            let poly = c.iter().rev().fold(0.0, |acc, &k| acc * t + k);
            let e = 1.0 - t * (-z * z + poly).exp();
            e.copysign(x)
        };
        let mut worst = 0f64;
        for i in 0..=100_000 {
            let x = (-6.0 + 12.0 * i as f64 / 100_000.0) as f32;
            worst = worst.max((erf(x) as f64 - erf64(x as f64)).abs());
        }
        assert!(worst < 3.5e-7, "max |error| {worst:e}");
        for (x, want) in [
            (0.5, 0.520_499_877_8),
            (1.0, 0.842_700_792_9),
            (2.0, 0.995_322_265),
        ] {
            assert!((erf(x as f32) as f64 - want).abs() < 5e-7, "erf({x})");
            assert!((erf(-x as f32) as f64 + want).abs() < 5e-7, "erf(-{x})");
        }
        assert_eq!(erf(1e30), 1.0);
        assert_eq!(erf(f32::INFINITY), 1.0);
    }
}
