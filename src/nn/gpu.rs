//! Fused CUDA kernels (`src/nn/kernels.cu`, compiled by `build.rs` under the `cuda` feature)
//! for the parts of a step that candle composes from many small ops, or runs slowly: LayerNorm /
//! RMSNorm forward and backward, GELU forward and backward, SwiGLU, the attention softmax
//! (forward with log-sum-exp, recomputation, backward), fused flash attention forward and
//! backward (bf16 tensor cores, no `seq x seq` tensor; see `attention.rs`), AdamW, the bias and residual adds
//! (candle's broadcast add indexes every element through its strides), and the dequantization of
//! a quantized base (GGUF blocks straight into the compute dtype; candle writes f32, then casts).
//!
//! Why: off the CPU each candle op is a kernel launch, an allocation and often a host-to-device
//! copy of its layout, about 20 us of host time; a BERT-base step ran about 3000 of them and was
//! bound by that, not by the GPU (BENCHMARKS.md). Like `cpu.rs`, each function returns `None`
//! when its inputs are not contiguous CUDA tensors of one dtype (f32 or bf16; per-row statistics
//! and the attention mask f32), or in a build without the feature, and the caller falls back to
//! the candle composition, which stays the reference (`safetune self-test --device cuda` compares
//! the two).

use candle_core::{DType, Tensor};

/// Hyper-parameters of an AdamW step, the same for every parameter (each parameter's bias
/// corrections follow its own step count: `AdamWItem`).
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// One parameter of [`adamw_many`]: its value, gradient and moments, its own bias corrections,
/// and the dtype of a copy of the new value to write beside it, if any.
pub struct AdamWItem<'a> {
    pub p: &'a Tensor,
    pub g: &'a Tensor,
    pub m: &'a Tensor,
    pub v: &'a Tensor,
    pub bc1: f64,
    pub bc2: f64,
    pub low: Option<DType>,
}

/// One parameter's result from [`adamw_many`]: new value, moments and the copy asked for.
pub struct AdamWOut {
    pub p: Tensor,
    pub m: Tensor,
    pub v: Tensor,
    pub low: Option<Tensor>,
}

/// Host-side preconditions of a fused kernel that reads its inputs as flat arrays: each kernel is
/// launched over one tensor's `elem_count()` elements, so an input shorter than that would be read
/// (and an output sized from it written) out of bounds on the device. Every tensor named here must
/// be contiguous (its elements are addressed from its first one) and hold exactly `len` elements.
/// The wrappers call these before taking any device pointer; they are plain host code, tested on
/// any build.
pub fn check_len(op: &str, name: &str, t: &Tensor, len: usize) -> candle_core::Result<()> {
    if !t.is_contiguous() {
        candle_core::bail!("{op}: '{name}' {:?} is not contiguous", t.dims());
    }
    if t.elem_count() != len {
        candle_core::bail!(
            "{op}: '{name}' {:?} has {} elements, the kernel reads {len}",
            t.dims(),
            t.elem_count()
        );
    }
    Ok(())
}

/// [`check_len`] for an elementwise kernel: every tensor contiguous, of the first one's dtype and
/// with its number of elements.
pub fn check_same_len(op: &str, ts: &[(&str, &Tensor)]) -> candle_core::Result<()> {
    let Some(&(first, t0)) = ts.first() else {
        return Ok(());
    };
    for &(name, t) in ts {
        if t.dtype() != t0.dtype() {
            candle_core::bail!(
                "{op}: '{name}' is {:?}, '{first}' {:?}",
                t.dtype(),
                t0.dtype()
            );
        }
        if t.elem_count() != t0.elem_count() {
            candle_core::bail!(
                "{op}: '{name}' {:?} has {} elements, '{first}' {:?} has {}",
                t.dims(),
                t.elem_count(),
                t0.dims(),
                t0.elem_count()
            );
        }
        check_len(op, name, t, t0.elem_count())?;
    }
    Ok(())
}

/// `(y, xhat, rstd)` of LayerNorm (`beta` given, centred) or RMSNorm (`beta` None); xhat only
/// where asked for.
pub type NormOut = (Tensor, Option<Tensor>, Tensor);

/// A bf16 tensor read by the flash attention kernels as `[batch, heads, rows, head_dim]` through
/// element strides `(batch, head, row)`, head_dim contiguous: the layers' `[batch*seq,
/// heads*head_dim]` layout (`strides = [seq*heads*d, d, heads*d]`) or `[batch, heads, seq, d]`
/// (`[heads*seq*d, seq*d, d]`), without a copy between them.
#[derive(Clone, Copy)]
pub struct Bhtd<'a> {
    pub t: &'a Tensor,
    pub strides: [i64; 3],
}

/// What a flash attention call is: `batch` sequences of `seq` positions (queries = keys), `heads`
/// query heads sharing `kv_heads` key/value heads, `head_dim` features, scores scaled by `scale`.
#[derive(Clone, Copy, Debug)]
pub struct FlashDims {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub causal: bool,
    pub scale: f64,
}

impl FlashDims {
    /// Strides of the layers' `[batch*seq, heads*head_dim]` layout.
    pub fn merged(&self, heads: usize) -> [i64; 3] {
        let (t, d) = (self.seq as i64, self.head_dim as i64);
        let h = heads as i64;
        [t * h * d, d, h * d]
    }

    /// FLOPs of one `[seq, seq] x head_dim` product over every head, as the composition's
    /// matmuls count it (full, causal or not).
    pub fn attention_product_flops(&self) -> u64 {
        let (b, t, h, d) = (self.batch, self.seq, self.heads, self.head_dim);
        2 * (b * h * t * t * d) as u64
    }

    /// Strides of a contiguous `[batch, heads, seq, head_dim]`.
    pub fn heads_major(&self, heads: usize) -> [i64; 3] {
        let (t, d) = (self.seq as i64, self.head_dim as i64);
        [heads as i64 * t * d, t * d, d]
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use super::{
        check_len, check_same_len, AdamWItem, AdamWOut, AdamWStep, Bhtd, FlashDims, NormOut,
    };
    use candle_core::cuda_backend::cudarc::driver::{
        CudaFunction, CudaModule, CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
    use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice, DeviceId, WrapErr};
    use candle_core::op::BackpropOp;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{bail, DType, Device, Result, Shape, Storage, Tensor, D};
    use std::sync::{Arc, Mutex, OnceLock};

    /// kernels.cu as machine code for the GPU it was built for, with its PTX (build.rs).
    const FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/safetune_kernels.fatbin"));

    /// Kernel `name` of safetune's module, the module loaded once per device. Loaded from the
    /// fat binary rather than through candle's custom-kernel cache, which takes PTX text that
    /// the driver must compile first (the whole module, 4.9 s in a fresh machine's first
    /// process).
    fn function(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
        type Modules = Mutex<Vec<(DeviceId, Arc<CudaModule>)>>;
        static MODULES: OnceLock<Modules> = OnceLock::new();
        let modules = MODULES.get_or_init(Default::default).lock();
        // A panic elsewhere while the list was held leaves it whole: it is only ever pushed to.
        let mut modules = modules.unwrap_or_else(|poisoned| poisoned.into_inner());
        let module = match modules.iter().find(|(id, _)| *id == dev.id()) {
            Some((_, m)) => m.clone(),
            None => {
                let image = Ptx::from_binary(FATBIN.to_vec());
                let m = dev.cuda_stream().context().load_module(image).w()?;
                modules.push((dev.id(), m.clone()));
                m
            }
        };
        drop(modules);
        module.load_function(name).w()
    }

    /// The kernels' dtype suffix when every tensor is a contiguous CUDA tensor of `dtype`.
    fn suffix(dtype: DType, ts: &[&Tensor]) -> Option<&'static str> {
        let ok = ts
            .iter()
            .all(|t| t.dtype() == dtype && t.is_contiguous() && t.device().is_cuda());
        match (ok, dtype) {
            (true, DType::F32) => Some("f32"),
            (true, DType::BF16) => Some("bf16"),
            _ => None,
        }
    }

    fn dtype_suffix(dtype: DType) -> Option<&'static str> {
        match dtype {
            DType::F32 => Some("f32"),
            DType::BF16 => Some("bf16"),
            _ => None,
        }
    }

    fn f32_on_cuda(ts: &[&Tensor]) -> bool {
        ts.iter()
            .all(|t| t.dtype() == DType::F32 && t.is_contiguous() && t.device().is_cuda())
    }

    fn device(t: &Tensor) -> Result<CudaDevice> {
        match t.device() {
            Device::Cuda(d) => Ok(d.clone()),
            _ => bail!("not a CUDA tensor"),
        }
    }

    /// Device address of the tensor's first element. The tensor must outlive the launch's
    /// scheduling; its memory outlives the kernel because frees are stream-ordered.
    fn ptr(t: &Tensor, dev: &CudaDevice) -> Result<u64> {
        let stream = dev.cuda_stream();
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(cs) = &*storage else {
            bail!("not a CUDA tensor")
        };
        let off = layout.start_offset() as u64;
        Ok(match &cs.slice {
            CudaStorageSlice::F32(s) => s.device_ptr(&stream).0 + 4 * off,
            CudaStorageSlice::BF16(s) => s.device_ptr(&stream).0 + 2 * off,
            CudaStorageSlice::F64(s) => s.device_ptr(&stream).0 + 8 * off,
            CudaStorageSlice::U32(s) => s.device_ptr(&stream).0 + 4 * off,
            _ => bail!("fused kernels take f32, bf16, f64 or u32 tensors"),
        })
    }

    /// `data` on the device, and its address: a per-call upload (dropout seeds, targets, a table
    /// of tensors) copied straight through the stream, not with `dev.clone_htod`, which inside
    /// `device::upload_cache` would keep every such upload (keyed by its bytes) for the life of
    /// the process. Drop the slice after the launches that read it: frees are stream-ordered.
    fn upload<T: DeviceRepr>(dev: &CudaDevice, data: &[T]) -> Result<(CudaSlice<T>, u64)> {
        let stream = dev.cuda_stream();
        let slice = stream.clone_htod(data).w()?;
        let p = slice.device_ptr(&stream).0;
        Ok((slice, p))
    }

    /// An uninitialised output of `shape` (every element is written by the kernel) and its address.
    fn output(dev: &CudaDevice, dtype: DType, shape: &Shape) -> Result<(Tensor, u64)> {
        let n = shape.elem_count();
        let stream = dev.cuda_stream();
        // SAFETY: the kernels write every element before anything reads it.
        let (storage, p) = match dtype {
            DType::F32 => {
                let s = unsafe { dev.alloc::<f32>(n)? };
                let p = s.device_ptr(&stream).0;
                (CudaStorage::wrap_cuda_slice(s, dev.clone()), p)
            }
            DType::BF16 => {
                let s = unsafe { dev.alloc::<half::bf16>(n)? };
                let p = s.device_ptr(&stream).0;
                (CudaStorage::wrap_cuda_slice(s, dev.clone()), p)
            }
            DType::F64 => {
                let s = unsafe { dev.alloc::<f64>(n)? };
                let p = s.device_ptr(&stream).0;
                (CudaStorage::wrap_cuda_slice(s, dev.clone()), p)
            }
            d => bail!("no fused kernel output of dtype {d:?}"),
        };
        let t = Tensor::from_storage(
            Storage::Cuda(storage),
            shape.clone(),
            BackpropOp::none(),
            false,
        );
        Ok((t, p))
    }

    /// Device address of a CUDA tensor's first element (activation offload's copies).
    pub(crate) fn address(t: &Tensor) -> Result<u64> {
        ptr(t, &device(t)?)
    }

    /// An uninitialised CUDA tensor of `shape` (activation offload's copies write every byte).
    pub(crate) fn uninit(dev: &CudaDevice, dtype: DType, shape: &Shape) -> Result<Tensor> {
        Ok(output(dev, dtype, shape)?.0)
    }

    /// Launches kernel `$name` of the safetune module with the given locals as arguments (their
    /// types must match the kernel's signature in kernels.cu).
    macro_rules! launch {
        ($dev:expr, $name:expr, $cfg:expr; $($arg:expr),* $(,)?) => {{
            let func = function(&$dev, &$name)?;
            let stream = $dev.cuda_stream();
            let mut b = stream.launch_builder(&func);
            $( b.arg(&$arg); )*
            // SAFETY: argument lists match the kernels' signatures in kernels.cu.
            unsafe { b.launch($cfg) }.w()?;
        }};
    }

    fn rows_cfg(rows: usize, c: usize) -> LaunchConfig {
        let threads = if c >= 1024 {
            512
        } else if c >= 256 {
            256
        } else {
            64
        };
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn elems_cfg(n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(256).clamp(1, 132 * 32);
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// One warp per row, 8 rows per block.
    fn warps_cfg(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows.div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    pub fn norm_fwd(
        x: &Tensor,
        weight: &Tensor,
        beta: Option<&Tensor>,
        eps: f64,
        want_xhat: bool,
    ) -> Result<Option<NormOut>> {
        let mut ts = vec![x, weight];
        ts.extend(beta);
        let Some(sfx) = suffix(x.dtype(), &ts) else {
            return Ok(None);
        };
        let c = x.dim(D::Minus1)?;
        check_len("norm_fwd", "weight", weight, c)?;
        if let Some(b) = beta {
            check_len("norm_fwd", "beta", b, c)?;
        }
        let rows = x.elem_count() / c;
        let dev = device(x)?;
        let (y, py) = output(&dev, x.dtype(), x.shape())?;
        let (xhat, ph) = match want_xhat {
            true => {
                let (t, p) = output(&dev, x.dtype(), x.shape())?;
                (Some(t), p)
            }
            false => (None, 0),
        };
        let mut rdims = x.dims().to_vec();
        *rdims.last_mut().expect("rank >= 1") = 1;
        let (rstd, pr) = output(&dev, DType::F32, &Shape::from(rdims))?;
        let (px, pw) = (ptr(x, &dev)?, ptr(weight, &dev)?);
        let pb = match beta {
            Some(b) => ptr(b, &dev)?,
            None => 0,
        };
        let (c32, eps32, center) = (c as i32, eps as f32, beta.is_some() as i32);
        launch!(dev, format!("st_norm_fwd_{sfx}"), rows_cfg(rows, c); px, pw, pb, py, ph, pr, c32, eps32, center);
        Ok(Some((y, xhat, rstd)))
    }

    /// The norm's input gradient, plus `residual` (a residual branch's gradient of the same
    /// shape) when given, in one kernel. `rows` is xhat, or the output where `from_output` (see
    /// `nn::norm::NormSaved`).
    pub fn norm_bwd(
        dy: &Tensor,
        rows: &Tensor,
        rstd: &Tensor,
        weight: &Tensor,
        center: bool,
        from_output: bool,
        residual: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        let mut ts = vec![dy, rows, weight];
        ts.extend(residual);
        let Some(sfx) = suffix(dy.dtype(), &ts) else {
            return Ok(None);
        };
        if !f32_on_cuda(&[rstd]) {
            return Ok(None);
        }
        let c = dy.dim(D::Minus1)?;
        let n = dy.elem_count() / c;
        check_same_len("norm_bwd", &[("dy", dy), ("rows", rows)])?;
        if let Some(r) = residual {
            check_same_len("norm_bwd", &[("dy", dy), ("residual", r)])?;
        }
        check_len("norm_bwd", "weight", weight, c)?;
        check_len("norm_bwd", "rstd", rstd, n)?;
        let dev = device(dy)?;
        let (dx, pdx) = output(&dev, dy.dtype(), dy.shape())?;
        let (pdy, ph, pr, pw) = (
            ptr(dy, &dev)?,
            ptr(rows, &dev)?,
            ptr(rstd, &dev)?,
            ptr(weight, &dev)?,
        );
        let pres = residual.map_or(Ok(0), |r| ptr(r, &dev))?;
        let (c32, center, from_output) = (c as i32, center as i32, from_output as i32);
        launch!(dev, format!("st_norm_bwd_{sfx}"), rows_cfg(n, c); pdy, ph, pr, pw, pres, pdx, c32, center, from_output);
        Ok(Some(dx))
    }

    /// GELU backward in place: the kernel overwrites `x` with the input gradient (each thread
    /// reads its element before writing it); false where `x` and `dy` are not CUDA tensors the
    /// kernels take.
    pub fn gelu_bwd_in_place(x: &Tensor, dy: &Tensor, tanh: bool) -> Result<bool> {
        let Some(sfx) = suffix(x.dtype(), &[x, dy]) else {
            return Ok(false);
        };
        check_same_len("gelu_bwd", &[("x", x), ("dy", dy)])?;
        let dev = device(x)?;
        let n = x.elem_count();
        let (px, pdy, n64) = (ptr(x, &dev)?, ptr(dy, &dev)?, n as u64);
        let kind = if tanh { "tanh" } else { "erf" };
        launch!(dev, format!("st_gelu_{kind}_bwd_{sfx}"), elems_cfg(n); px, pdy, px, n64);
        Ok(true)
    }

    pub fn gelu_fwd(x: &Tensor, tanh: bool) -> Result<Option<Tensor>> {
        let Some(sfx) = suffix(x.dtype(), &[x]) else {
            return Ok(None);
        };
        let dev = device(x)?;
        let n = x.elem_count();
        let (y, py) = output(&dev, x.dtype(), x.shape())?;
        let (px, n64, t32) = (ptr(x, &dev)?, n as u64, tanh as i32);
        launch!(dev, format!("st_gelu_fwd_{sfx}"), elems_cfg(n); px, py, n64, t32);
        Ok(Some(y))
    }

    /// `x [.., c] + b [c]`.
    pub fn bias_add(x: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
        let Some(sfx) = suffix(x.dtype(), &[x, b]) else {
            return Ok(None);
        };
        let c = x.dim(D::Minus1)?;
        if b.elem_count() != c {
            return Ok(None);
        }
        let dev = device(x)?;
        let n = x.elem_count();
        let (y, py) = output(&dev, x.dtype(), x.shape())?;
        let (px, pb, n64, c32) = (ptr(x, &dev)?, ptr(b, &dev)?, n as u64, c as i32);
        launch!(dev, format!("st_bias_add_{sfx}"), elems_cfg(n); px, pb, py, n64, c32);
        Ok(Some(y))
    }

    /// Inverted dropout `y = x * keep / (1 - p)`, the keep mask drawn on the device from one
    /// SplitMix64 seed per 4096 elements: the masks `cpu::dropout_fwd` draws from the same seeds.
    pub fn dropout_fwd(
        x: &Tensor,
        seeds: &[u64],
        threshold: u32,
        scale: f32,
    ) -> Result<Option<Tensor>> {
        let Some(sfx) = suffix(x.dtype(), &[x]) else {
            return Ok(None);
        };
        let dev = device(x)?;
        let n = x.elem_count();
        if seeds.len() != n.div_ceil(4096) {
            bail!("dropout: {} seeds for {n} elements", seeds.len());
        }
        let (seeds, ps) = upload(&dev, seeds)?;
        let (y, py) = output(&dev, x.dtype(), x.shape())?;
        let (px, n64) = (ptr(x, &dev)?, n as u64);
        launch!(dev, format!("st_dropout_fwd_{sfx}"), elems_cfg(n); px, ps, py, n64, threshold, scale);
        drop(seeds); // freed in stream order, after the kernel
        Ok(Some(y))
    }

    /// A Q4_0 / Q4_1 / Q8_0 weight dequantized straight into `dtype` (None: another format or
    /// device).
    pub fn dequantize(q: &QTensor, dtype: DType) -> Result<Option<Tensor>> {
        let fmt: i32 = match q.dtype() {
            GgmlDType::Q4_0 => 0,
            GgmlDType::Q4_1 => 1,
            GgmlDType::Q8_0 => 2,
            _ => return Ok(None),
        };
        let (Device::Cuda(dev), Some(sfx)) = (q.device(), dtype_suffix(dtype)) else {
            return Ok(None);
        };
        let n = q.shape().elem_count();
        let (y, py) = output(&dev, dtype, q.shape())?;
        let (pq, n64) = (q.device_ptr()? as u64, n as u64);
        launch!(dev, format!("st_dequant_{sfx}"), elems_cfg(n); pq, py, n64, fmt);
        Ok(Some(y))
    }

    /// `a + b`, same shape.
    pub fn add(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
        let Some(sfx) = suffix(a.dtype(), &[a, b]) else {
            return Ok(None);
        };
        if a.dims() != b.dims() {
            return Ok(None);
        }
        let dev = device(a)?;
        let n = a.elem_count();
        let (y, py) = output(&dev, a.dtype(), a.shape())?;
        let (pa, pb, n64) = (ptr(a, &dev)?, ptr(b, &dev)?, n as u64);
        launch!(dev, format!("st_add_{sfx}"), elems_cfg(n); pa, pb, py, n64);
        Ok(Some(y))
    }

    /// `y += u w^T` (`w_t`: `w` is `[out, r]`) or `y += u w` (`w` `[r, out]`), `u` `[n, r]`, `y`
    /// `[n, out]`, in place through cuBLAS with beta = 1 (f32 accumulation). False, and `y`
    /// untouched, unless all three are contiguous CUDA tensors of one dtype (f32 or bf16) that
    /// autograd does not track.
    pub fn add_product(y: &Tensor, u: &Tensor, w: &Tensor, w_t: bool) -> Result<bool> {
        let tracked = [y, u, w].iter().any(|t| t.track_op());
        if suffix(y.dtype(), &[y, u, w]).is_none() || tracked || y.rank() != 2 || u.rank() != 2 {
            return Ok(false);
        }
        let ((n, out), (n_u, r)) = (y.dims2()?, u.dims2()?);
        let w_dims = if w_t { (out, r) } else { (r, out) };
        if n_u != n || w.dims2()? != w_dims {
            bail!(
                "add_product: y {:?}, u {:?} and w {:?} (transposed: {w_t}) disagree",
                y.dims(),
                u.dims(),
                w.dims()
            );
        }
        if !thin_update(y, u, w, w_t)? {
            y.inplace_op3(u, w, &AddProduct { n, out, r, w_t })?;
        }
        Ok(true)
    }

    struct AddProduct {
        n: usize,
        out: usize,
        r: usize,
        w_t: bool,
    }

    impl candle_core::InplaceOp3 for AddProduct {
        fn name(&self) -> &'static str {
            "add_product"
        }

        fn cpu_fwd(
            &self,
            _: &mut candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> Result<()> {
            bail!("add_product runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            dst: &mut CudaStorage,
            dst_l: &candle_core::Layout,
            u: &CudaStorage,
            u_l: &candle_core::Layout,
            w: &CudaStorage,
            w_l: &candle_core::Layout,
        ) -> Result<()> {
            use candle_core::cuda_backend::cudarc::cublas::sys::cublasOperation_t as Op;
            use candle_core::cuda_backend::cudarc::cublas::{Gemm, GemmConfig};
            let blas = dst.device.cublas_handle();
            // Column-major: y^T [out, n] += op(w) [out, r] . u^T [r, n].
            let (out, n, r) = (self.out as i32, self.n as i32, self.r as i32);
            let (transa, lda) = if self.w_t {
                (Op::CUBLAS_OP_T, r)
            } else {
                (Op::CUBLAS_OP_N, out)
            };
            fn cfg<T>(one: T, transa: Op, lda: i32, (out, n, r): (i32, i32, i32)) -> GemmConfig<T>
            where
                T: Copy,
            {
                GemmConfig {
                    transa,
                    transb: Op::CUBLAS_OP_N,
                    m: out,
                    n,
                    k: r,
                    alpha: one,
                    lda,
                    ldb: r,
                    beta: one,
                    ldc: out,
                }
            }
            let dims = (out, n, r);
            let (yo, uo, wo) = (dst_l.start_offset(), u_l.start_offset(), w_l.start_offset());
            match (&mut dst.slice, &u.slice, &w.slice) {
                (
                    CudaStorageSlice::BF16(y),
                    CudaStorageSlice::BF16(u),
                    CudaStorageSlice::BF16(w),
                ) => {
                    let one = half::bf16::ONE;
                    // SAFETY: the shapes were checked against the configuration above.
                    unsafe {
                        blas.gemm(
                            cfg(one, transa, lda, dims),
                            &w.slice(wo..),
                            &u.slice(uo..),
                            &mut y.slice_mut(yo..),
                        )
                    }
                }
                (CudaStorageSlice::F32(y), CudaStorageSlice::F32(u), CudaStorageSlice::F32(w)) => {
                    // SAFETY: as above.
                    unsafe {
                        blas.gemm(
                            cfg(1f32, transa, lda, dims),
                            &w.slice(wo..),
                            &u.slice(uo..),
                            &mut y.slice_mut(yo..),
                        )
                    }
                }
                _ => bail!("add_product: y, u and w must be all bf16 or all f32"),
            }
            .w()?;
            crate::nn::flops::add(2 * (self.n * self.out * self.r) as u64);
            Ok(())
        }
    }

    /// How cuBLAS (column-major) reads a 2-d `[rows, cols]` tensor (`flops::matrix_transposed`):
    /// row-major is its transpose with leading dimension `cols` (op N of it gives the transpose),
    /// a transposed view is the matrix itself with leading dimension `rows` (op T). None for other
    /// layouts.
    fn column_major(
        t: &Tensor,
    ) -> Option<(
        candle_core::cuda_backend::cudarc::cublas::sys::cublasOperation_t,
        i32,
    )> {
        use candle_core::cuda_backend::cudarc::cublas::sys::cublasOperation_t as Op;
        let [r, c]: [usize; 2] = t.dims().try_into().ok()?;
        let strides: [usize; 2] = t.stride().try_into().ok()?;
        Some(
            match crate::nn::flops::matrix_transposed([r, c], strides)? {
                false => (Op::CUBLAS_OP_N, c.max(1) as i32),
                true => (Op::CUBLAS_OP_T, r.max(1) as i32),
            },
        )
    }

    /// `alpha * a b` for 2-d `a` `[m, k]` and `b` `[k, n]` of one dtype (f32 or bf16), each
    /// row-major or a transposed view, as a new `[m, n]` tensor of `out` (f32, or the inputs'
    /// dtype): one cuBLAS product accumulating in f32, its scale and its output's dtype part of
    /// it. A LoRA adapter's thin products use it so that neither the scaling nor the bf16
    /// gradient's cast to the f32 master weights is a kernel of its own. None where it does not
    /// apply (another device or dtype, other layouts, autograd tracking an input).
    pub fn gemm(a: &Tensor, b: &Tensor, alpha: f64, out: DType) -> Result<Option<Tensor>> {
        let on_cuda = a.device().is_cuda() && b.device().is_cuda();
        let dtypes = dtype_suffix(a.dtype()).is_some()
            && b.dtype() == a.dtype()
            && (out == a.dtype() || out == DType::F32);
        if !on_cuda || !dtypes || a.track_op() || b.track_op() || a.rank() != 2 || b.rank() != 2 {
            return Ok(None);
        }
        let ((m, k), (k_b, n)) = (a.dims2()?, b.dims2()?);
        if k != k_b {
            bail!("gemm: a {:?} and b {:?} do not chain", a.dims(), b.dims());
        }
        let (Some((op_a, lda)), Some((op_b, ldb))) = (column_major(a), column_major(b)) else {
            return Ok(None);
        };
        if m * n == 0 || k == 0 {
            return Ok(Some(Tensor::zeros((m, n), out, a.device())?));
        }
        if let Some(y) = thin_gemm(a, b, alpha, out)? {
            return Ok(Some(y));
        }
        let dev = device(a)?;
        let (y, py) = output(&dev, out, &Shape::from((m, n)))?;
        // beta = 0: `y` is only written.
        cublas_gemm(
            &dev,
            [(a, op_a, lda), (b, op_b, ldb)],
            (py, out),
            alpha,
            0.0,
        )?;
        Ok(Some(y))
    }

    /// `acc += a b` in place: 2-d `a` `[m, k]` and `b` `[k, n]` (each row-major or a transposed
    /// view) and a contiguous `acc` `[m, n]`, all of one dtype (f32 or bf16), in one cuBLAS
    /// product with beta = 1, so that an input gradient summed over several linears (q, k and v)
    /// needs no add kernel. False, and `acc` untouched, where it does not apply.
    pub fn matmul_acc(acc: &Tensor, a: &Tensor, b: &Tensor) -> Result<bool> {
        let ts = [acc, a, b];
        let usable = suffix(acc.dtype(), &[acc]).is_some()
            && ts.iter().all(|t| {
                t.rank() == 2 && t.dtype() == acc.dtype() && t.device().is_cuda() && !t.track_op()
            });
        if !usable {
            return Ok(false);
        }
        let ((m, k), (k_b, n)) = (a.dims2()?, b.dims2()?);
        if k != k_b || acc.dims2()? != (m, n) {
            bail!(
                "matmul_acc: acc {:?}, a {:?} and b {:?} disagree",
                acc.dims(),
                a.dims(),
                b.dims()
            );
        }
        let (Some((op_a, lda)), Some((op_b, ldb))) = (column_major(a), column_major(b)) else {
            return Ok(false);
        };
        if m * n * k == 0 {
            return Ok(true); // acc += 0
        }
        let dev = device(acc)?;
        let pc = ptr(acc, &dev)?;
        cublas_gemm(
            &dev,
            [(a, op_a, lda), (b, op_b, ldb)],
            (pc, acc.dtype()),
            1.0,
            1.0,
        )?;
        crate::nn::flops::add(2 * (m * n * k) as u64);
        Ok(true)
    }

    /// `c = alpha * a b + beta * c` through `cublasGemmEx` (f32 accumulation) for `a` `[m, k]`
    /// and `b` `[k, n]` given with their cuBLAS operations and leading dimensions
    /// ([`column_major`]), `c` a row-major `[m, n]` of its dtype at address `pc`.
    fn cublas_gemm(
        dev: &CudaDevice,
        [(a, op_a, lda), (b, op_b, ldb)]: [(
            &Tensor,
            candle_core::cuda_backend::cudarc::cublas::sys::cublasOperation_t,
            i32,
        ); 2],
        (pc, c_dtype): (u64, DType),
        alpha: f64,
        beta: f64,
    ) -> Result<()> {
        use candle_core::cuda_backend::cudarc::cublas::sys;
        let cuda_type = |d: DType| match d {
            DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
            _ => sys::cudaDataType_t::CUDA_R_32F,
        };
        let ((m, k), n) = (a.dims2()?, b.dim(1)?);
        let (pa, pb) = (ptr(a, dev)?, ptr(b, dev)?);
        let (alpha, beta) = (alpha as f32, beta as f32);
        let blas = dev.cublas_handle();
        // Column-major: c^T [n, m] = op(b) [n, k] . op(a) [k, m]. SAFETY: the operands hold the
        // elements their dims and leading dimensions address (the callers check), `c` holds
        // m * n of its dtype; the handle runs on the device's stream.
        let status = unsafe {
            sys::cublasGemmEx(
                *blas.handle(),
                op_b,
                op_a,
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const std::ffi::c_void,
                pb as *const std::ffi::c_void,
                cuda_type(b.dtype()),
                ldb,
                pa as *const std::ffi::c_void,
                cuda_type(a.dtype()),
                lda,
                &beta as *const f32 as *const std::ffi::c_void,
                pc as *mut std::ffi::c_void,
                cuda_type(c_dtype),
                n as i32,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        if status != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            bail!("cublasGemmEx: {status:?}");
        }
        Ok(())
    }

    /// The ranks the thin-product kernels are built for (`st_thin_*` in kernels.cu).
    const THIN_RANKS: [usize; 4] = [1, 2, 4, 8];

    /// The thin-product kernels are used unless the environment sets `SAFETUNE_THIN=0` (then
    /// cuBLAS runs every product, for comparison).
    fn thin_on() -> bool {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| std::env::var("SAFETUNE_THIN").map_or(true, |v| v.trim() != "0"))
    }

    /// Whether every tensor's first element is 16-byte aligned (contiguity is checked apart).
    fn aligned16(ts: &[&Tensor], dev: &CudaDevice) -> Result<bool> {
        for t in ts {
            if !ptr(t, dev)?.is_multiple_of(16) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Whether `t` is a transposed view of a row-major matrix.
    fn transposed(t: &Tensor) -> bool {
        t.t().is_ok_and(|t| t.is_contiguous())
    }

    /// [`gemm`] through the thin-product kernels where one side has a rank of [`THIN_RANKS`]
    /// columns (at 16 and more, cuBLAS's tensor cores beat them): `x W` (x `[n, d]` row-major,
    /// `W` `[d, R]` row-major or a transposed `[R, d]`) in x's dtype, as a LoRA forward's `U`
    /// and backward's `dxa`; `x^T v` and `v^T x` (x `[n, d]`, v `[n, R]`, both row-major) into
    /// f32, as `dB` and `dA`. One kernel a product instead of cuBLAS's split-K pair. None where
    /// they do not apply.
    fn thin_gemm(a: &Tensor, b: &Tensor, alpha: f64, out: DType) -> Result<Option<Tensor>> {
        let (Some(sfx), true) = (dtype_suffix(a.dtype()), thin_on()) else {
            return Ok(None);
        };
        let dev = device(a)?;
        let pack = 16 / a.dtype().size_in_bytes();
        let ((m, k), (_, n)) = (a.dims2()?, b.dims2()?);
        let fits = |d: usize, rows: usize| d.is_multiple_of(pack) && d < 1 << 30 && rows < 1 << 30;
        if THIN_RANKS.contains(&n) && out == a.dtype() && a.is_contiguous() && fits(k, m) {
            let (kind, w) = if b.is_contiguous() {
                ("b", b.clone())
            } else if transposed(b) {
                ("a", b.t()?)
            } else {
                return Ok(None);
            };
            if !aligned16(&[a, &w], &dev)? {
                return Ok(None);
            }
            let (y, py) = output(&dev, out, &Shape::from((m, n)))?;
            let rows_per_block = if n <= 4 { 8 } else { 4 };
            let cfg = LaunchConfig {
                grid_dim: (m.div_ceil(rows_per_block).min(65_535) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let (px, pw) = (ptr(a, &dev)?, ptr(&w, &dev)?);
            let (rows, d, alpha) = (m as i32, k as i32, alpha as f32);
            launch!(dev, format!("st_thin_rows_{kind}_r{n}_{sfx}"), cfg; px, pw, py, rows, d, alpha);
            return Ok(Some(y));
        }
        // x^T v ([d, R], from a = x^T) or v^T x ([R, d], from a = v^T), summed over k rows.
        if !transposed(a) {
            return Ok(None);
        }
        let (x, v, rank, d, oj, ok) = if THIN_RANKS.contains(&n) {
            (a.t()?, b.clone(), n, m, n, 1)
        } else if THIN_RANKS.contains(&m) {
            (b.clone(), a.t()?, m, n, 1, n)
        } else {
            return Ok(None);
        };
        let usable = out == DType::F32 && x.is_contiguous() && v.is_contiguous() && fits(d, k);
        if !usable || alpha != 1.0 || !aligned16(&[&x, &v], &dev)? {
            return Ok(None);
        }
        let y = Tensor::zeros((m, n), DType::F32, a.device())?;
        let cols = if pack * rank <= 32 { pack } else { 32 / rank };
        let col_blocks = d.div_ceil(32 * cols);
        let row_blocks = (264 / col_blocks).clamp(1, k.div_ceil(8));
        let rows_per_block = k.div_ceil(row_blocks);
        let cfg = LaunchConfig {
            grid_dim: (col_blocks as u32, k.div_ceil(rows_per_block) as u32, 1),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        let (px, pv, py) = (ptr(&x, &dev)?, ptr(&v, &dev)?, ptr(&y, &dev)?);
        let (rows, dd, rpb) = (k as i32, d as i32, rows_per_block as i32);
        let (oj, ok) = (oj as i64, ok as i64);
        launch!(dev, format!("st_thin_cols_r{rank}_{sfx}"), cfg; px, pv, py, rows, dd, rpb, oj, ok);
        Ok(Some(y))
    }

    /// `y += u w^T` (`w_t`, `w` `[out, R]`) or `y += u w` (`w` `[R, out]`) in place through the
    /// thin-update kernel; false where it does not apply (shapes already checked by the caller).
    fn thin_update(y: &Tensor, u: &Tensor, w: &Tensor, w_t: bool) -> Result<bool> {
        let (Some(sfx), true) = (suffix(y.dtype(), &[y, u, w]), thin_on()) else {
            return Ok(false);
        };
        let dev = device(y)?;
        let ((n, out), r) = (y.dims2()?, u.dim(1)?);
        let pack = 16 / y.dtype().size_in_bytes();
        let fits = out.is_multiple_of(pack) && out < 1 << 30 && n < 1 << 30;
        if !THIN_RANKS.contains(&r) || !fits || !aligned16(&[y, u, w], &dev)? {
            return Ok(false);
        }
        let kind = if w_t { "b" } else { "a" };
        let (py, pu, pw) = (ptr(y, &dev)?, ptr(u, &dev)?, ptr(w, &dev)?);
        // A thread a pack of columns, a block 128 packs and 8 rows (more past 65,535 blocks).
        let rows_per_block = n.div_ceil(65_535).max(8);
        let cfg = LaunchConfig {
            grid_dim: (
                (out / pack).div_ceil(128) as u32,
                n.div_ceil(rows_per_block) as u32,
                1,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let (rows, d, rpb) = (n as i32, out as i32, rows_per_block as i32);
        launch!(dev, format!("st_thin_update_{kind}_r{r}_{sfx}"), cfg; py, pu, pw, rows, d, rpb);
        crate::nn::flops::add(2 * (n * out * r) as u64);
        Ok(true)
    }

    /// Rotary embedding of `x`, a `[batch, heads, seq, head_dim]` view with head_dim contiguous
    /// (e.g. a projection's `[batch*seq, heads*head_dim]` output viewed as heads, without a copy),
    /// at positions `start..start+seq`, by the negated angle when `inverse`; `cos` and `sin` f32
    /// `[positions, head_dim/2]`. Written as a new contiguous `[batch, heads, seq, head_dim]`, or as
    /// `[batch*seq, heads*head_dim]` when `merged`. None where the kernel does not apply.
    pub fn rope(
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        start: usize,
        inverse: bool,
        merged: bool,
    ) -> Result<Option<Tensor>> {
        let (Some(sfx), true) = (dtype_suffix(x.dtype()), x.device().is_cuda()) else {
            return Ok(None);
        };
        let (b, h, t, d) = x.dims4()?;
        let [xsb, xsh, xsr, one] = <[usize; 4]>::try_from(x.layout().stride()).expect("4-d");
        if one != 1 || !d.is_multiple_of(2) {
            return Ok(None);
        }
        let half = d / 2;
        if !f32_on_cuda(&[cos, sin]) {
            return Ok(None);
        }
        for (name, tab) in [("cos", cos), ("sin", sin)] {
            if tab.rank() != 2 || tab.dim(1)? != half || start + t > tab.dim(0)? {
                bail!(
                    "rope: '{name}' {:?} does not hold positions {start}..{} of {half} pairs",
                    tab.dims(),
                    start + t
                );
            }
        }
        let dev = device(x)?;
        let (shape, [ysb, ysh, ysr]) = if merged {
            (Shape::from((b * t, h * d)), [t * h * d, d, h * d])
        } else {
            (Shape::from((b, h, t, d)), [h * t * d, t * d, d])
        };
        let (y, py) = output(&dev, x.dtype(), &shape)?;
        let (px, pc, ps) = (ptr(x, &dev)?, ptr(cos, &dev)?, ptr(sin, &dev)?);
        let (b32, h32, t32, half32, start32) =
            (b as i32, h as i32, t as i32, half as i32, start as i32);
        let [xsb, xsh, xsr, ysb, ysh, ysr] = [xsb, xsh, xsr, ysb, ysh, ysr].map(|v| v as i64);
        let sign: f32 = if inverse { -1.0 } else { 1.0 };
        launch!(dev, format!("st_rope_{sfx}"), elems_cfg(b * h * t * half); px, pc, ps, py, b32, h32, t32, half32, xsb, xsh, xsr, ysb, ysh, ysr, start32, sign);
        Ok(Some(y))
    }

    pub fn swiglu_fwd(gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
        let Some(sfx) = suffix(gate.dtype(), &[gate, up]) else {
            return Ok(None);
        };
        check_same_len("swiglu_fwd", &[("gate", gate), ("up", up)])?;
        let dev = device(gate)?;
        let n = gate.elem_count();
        let (y, py) = output(&dev, gate.dtype(), gate.shape())?;
        let (pg, pu, n64) = (ptr(gate, &dev)?, ptr(up, &dev)?, n as u64);
        launch!(dev, format!("st_swiglu_fwd_{sfx}"), elems_cfg(n); pg, pu, py, n64);
        Ok(Some(y))
    }

    /// SwiGLU backward in place: the kernel overwrites `gate` with its gradient and `up` with
    /// its own (each thread reads its elements before writing them); false where the three are
    /// not CUDA tensors the kernels take.
    pub fn swiglu_bwd_in_place(gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<bool> {
        let Some(sfx) = suffix(gate.dtype(), &[gate, up, dy]) else {
            return Ok(false);
        };
        check_same_len("swiglu_bwd", &[("gate", gate), ("up", up), ("dy", dy)])?;
        let dev = device(gate)?;
        let n = gate.elem_count();
        let (pg, pu, pdy, n64) = (ptr(gate, &dev)?, ptr(up, &dev)?, ptr(dy, &dev)?, n as u64);
        launch!(dev, format!("st_swiglu_bwd_{sfx}"), elems_cfg(n); pg, pu, pdy, pg, pu, n64);
        Ok(true)
    }

    /// Cross-entropy of each row of `logits` `[n, v]` (f32 or bf16) against `targets` (all
    /// counted, each below `v`): the row losses `lse - logit[target]` `[n]` in f32 and, with
    /// `grad_scale`, `dlogits = (softmax - onehot) * grad_scale` in the logits' dtype. One kernel
    /// per call (a block per row).
    pub fn cross_entropy_rows(
        logits: &Tensor,
        targets: &[u32],
        grad_scale: Option<f64>,
    ) -> Result<Option<(Tensor, Option<Tensor>)>> {
        let Some(sfx) = suffix(logits.dtype(), &[logits]) else {
            return Ok(None);
        };
        let (n, v) = logits.dims2()?;
        if targets.len() != n || n == 0 {
            bail!("cross_entropy: {} targets for {n} rows", targets.len());
        }
        if let Some(t) = targets.iter().find(|&&t| t as usize >= v) {
            bail!("cross_entropy: target {t} outside the {v} logits of a row");
        }
        let dev = device(logits)?;
        let (tg, pt) = upload(&dev, targets)?;
        let (loss, pl) = output(&dev, DType::F32, &Shape::from(n))?;
        let (d, pd) = match grad_scale {
            Some(_) => {
                let (d, p) = output(&dev, logits.dtype(), logits.shape())?;
                (Some(d), p)
            }
            None => (None, 0),
        };
        let (pz, v32, g) = (
            ptr(logits, &dev)?,
            v as i32,
            grad_scale.unwrap_or(0.0) as f32,
        );
        launch!(dev, format!("st_cross_entropy_{sfx}"), rows_cfg(n, v); pz, pt, pl, pd, v32, g);
        drop(tg); // freed in stream order, after the kernel
        Ok(Some((loss, d)))
    }

    /// Shape checks shared by the softmax kernels: `s` `[b, h, t, t2]`, mask `[b, 1, 1, t2]` f32.
    fn softmax_dims(s: &Tensor, mask_add: &Tensor) -> Result<Option<(usize, usize, usize, usize)>> {
        let (b, h, t, t2) = s.dims4()?;
        let mask_ok = f32_on_cuda(&[mask_add]) && mask_add.dims() == [b, 1, 1, t2];
        Ok(mask_ok.then_some((b, h, t, t2)))
    }

    pub fn softmax_fwd(
        s: &Tensor,
        mask_add: &Tensor,
        scale: f64,
        causal: bool,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let Some(sfx) = suffix(s.dtype(), &[s]) else {
            return Ok(None);
        };
        let Some((b, h, t, t2)) = softmax_dims(s, mask_add)? else {
            return Ok(None);
        };
        let dev = device(s)?;
        let rows = b * h * t;
        let (p, pp) = output(&dev, s.dtype(), s.shape())?;
        let (lse, pl) = output(&dev, DType::F32, &Shape::from((b, h, t, 1)))?;
        let (ps, pm) = (ptr(s, &dev)?, ptr(mask_add, &dev)?);
        let (r, h32, t32, t232) = (rows as i32, h as i32, t as i32, t2 as i32);
        let (sc, ca) = (scale as f32, causal as i32);
        launch!(dev, format!("st_softmax_fwd_{sfx}"), warps_cfg(rows); ps, pm, pp, pl, r, h32, t32, t232, sc, ca);
        Ok(Some((p, lse)))
    }

    pub fn softmax_recompute(
        s: &Tensor,
        mask_add: &Tensor,
        lse: &Tensor,
        scale: f64,
        causal: bool,
    ) -> Result<Option<Tensor>> {
        let Some(sfx) = suffix(s.dtype(), &[s]) else {
            return Ok(None);
        };
        let Some((b, h, t, t2)) = softmax_dims(s, mask_add)? else {
            return Ok(None);
        };
        if !f32_on_cuda(&[lse]) || lse.elem_count() != b * h * t {
            return Ok(None);
        }
        let dev = device(s)?;
        let rows = b * h * t;
        let (p, pp) = output(&dev, s.dtype(), s.shape())?;
        let (ps, pm, pl) = (ptr(s, &dev)?, ptr(mask_add, &dev)?, ptr(lse, &dev)?);
        let (r, h32, t32, t232) = (rows as i32, h as i32, t as i32, t2 as i32);
        let (sc, ca) = (scale as f32, causal as i32);
        launch!(dev, format!("st_softmax_recompute_{sfx}"), warps_cfg(rows); ps, pm, pl, pp, r, h32, t32, t232, sc, ca);
        Ok(Some(p))
    }

    pub fn softmax_bwd(p: &Tensor, dp: &Tensor, scale: f64) -> Result<Option<Tensor>> {
        let Some(sfx) = suffix(p.dtype(), &[p, dp]) else {
            return Ok(None);
        };
        if p.dims() != dp.dims() {
            return Ok(None);
        }
        let t2 = p.dim(D::Minus1)?;
        let rows = p.elem_count() / t2;
        let dev = device(p)?;
        let (ds, pds) = output(&dev, p.dtype(), p.shape())?;
        let (pp, pdp) = (ptr(p, &dev)?, ptr(dp, &dev)?);
        let (r, t232, sc) = (rows as i32, t2 as i32, scale as f32);
        launch!(dev, format!("st_softmax_bwd_{sfx}"), warps_cfg(rows); pp, pdp, pds, r, t232, sc);
        Ok(Some(ds))
    }

    /// Loads `name` and lets it use `smem` bytes of dynamic shared memory (above the 48 KiB
    /// default).
    fn big_smem(dev: &CudaDevice, name: &str, smem: usize) -> Result<()> {
        use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
        function(dev, name)?
            .set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .w()
    }

    /// Whether the flash kernels read `x`: a contiguous bf16 CUDA tensor whose first element and
    /// strides keep 16-byte vector loads aligned, and that holds every addressed element.
    fn flash_input(x: &Bhtd, dims: &FlashDims, heads: usize) -> bool {
        let t = x.t;
        if t.dtype() != DType::BF16 || !t.is_contiguous() || !t.device().is_cuda() {
            return false;
        }
        if !t.layout().start_offset().is_multiple_of(8) || x.strides.iter().any(|s| s % 8 != 0) {
            return false;
        }
        let [sb, sh, sr] = x.strides;
        let last = (dims.batch as i64 - 1) * sb
            + (heads as i64 - 1) * sh
            + (dims.seq as i64 - 1) * sr
            + dims.head_dim as i64;
        last <= t.elem_count() as i64
    }

    /// Whether the fused kernels cover `dims` (head_dim 64 or 128, whole kv groups), and their
    /// grids fit CUDA's limits (query or key blocks on y and the batch on z: at most 65,535 each).
    pub fn flash_supported(dims: &FlashDims) -> bool {
        const GRID_YZ: usize = 65_535;
        matches!(dims.head_dim, 64 | 128)
            && dims.kv_heads > 0
            && dims.heads.is_multiple_of(dims.kv_heads)
            && dims.seq > 0
            && dims.batch > 0
            && dims.seq.div_ceil(fwd_kernel(dims.head_dim).rows) <= GRID_YZ
            && dims.batch <= GRID_YZ
    }

    fn flash_mask(mask_add: &Tensor, dims: &FlashDims) -> Result<Option<Tensor>> {
        if mask_add.dims() != [dims.batch, 1, 1, dims.seq] || !mask_add.device().is_cuda() {
            return Ok(None);
        }
        Ok(Some(mask_add.to_dtype(DType::F32)?.contiguous()?))
    }

    /// A forward kernel of kernels.cu: its name, threads, query rows a block and dynamic shared
    /// memory.
    struct FwdKernel {
        name: String,
        threads: u32,
        rows: usize,
        smem: usize,
    }

    /// The forward for head_dim `d`. At 128 on Hopper `flash_fwd_wg` (warpgroup MMAs; 192 query
    /// rows, 64 keys a block, tiles unpadded), else `flash_fwd` (`mma.sync`; `MT` 16-row m-tiles
    /// a warp, `BC` keys a block, rows padded by 8). Shared memory: q, two buffers of k and v,
    /// two of the key mask.
    fn fwd_kernel(d: usize) -> FwdKernel {
        if d == 128 && hopper(false) {
            let (rows, keys) = (192, 64);
            return FwdKernel {
                name: "st_flash_fwd_wg_d128_bf16".into(),
                threads: 384,
                rows,
                smem: (rows + 4 * keys) * d * 2 + 2 * keys * 4,
            };
        }
        let (mt, keys) = if d == 128 { (1, 32) } else { (2, 64) };
        let rows = 64 * mt;
        FwdKernel {
            name: format!("st_flash_fwd_d{d}_m{mt}c{keys}_bf16"),
            threads: 128,
            rows,
            smem: (rows + 4 * keys) * (d + 8) * 2 + 2 * keys * 4,
        }
    }

    /// Whether the Hopper kernel (`flash_fwd_wg`, or `flash_bwd_wg` for `backward`) runs at
    /// head_dim 128: where the kernels were built for sm_90a (`CUDA_COMPUTE_CAP=90`, build.rs).
    /// `SAFETUNE_WGMMA=0` keeps the `mma.sync` kernels and `SAFETUNE_WGMMA=fwd` only the Hopper
    /// forward, to compare them in one binary.
    fn hopper(backward: bool) -> bool {
        static MODE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let mode = MODE.get_or_init(|| std::env::var("SAFETUNE_WGMMA").unwrap_or_default());
        cfg!(safetune_sm90a) && mode.trim() != "0" && !(backward && mode.trim() == "fwd")
    }

    /// Keys per backward block and query rows per step of its loop (`BC` and `BR` of
    /// `flash_bwd` and `flash_bwd_wg` in kernels.cu), and their threads (8 warps).
    const BWD_KEYS: usize = 128;
    const BWD_ROWS: usize = 64;
    const BWD_THREADS: u32 = 256;

    /// The backward for head_dim `d` and its dynamic shared memory: two buffers of lse and D
    /// (`BWD_ROWS` f32 each), k and v (`BWD_KEYS` rows), two buffers of q and do (`BWD_ROWS`
    /// rows); `flash_bwd` (rows padded by 8) also P and dS (`BWD_ROWS` x (`BWD_KEYS` + 8)),
    /// `flash_bwd_wg` (Hopper, head_dim 128, unpadded) dS^T (`BWD_KEYS` x `BWD_ROWS`).
    fn bwd_kernel(d: usize) -> (String, usize) {
        let (r, c) = (BWD_ROWS, BWD_KEYS);
        if d == 128 && hopper(true) {
            let smem = 4 * r * 4 + (2 * c * d + 4 * r * d + c * r) * 2;
            return ("st_flash_bwd_wg_d128_bf16".into(), smem);
        }
        let smem = 4 * r * 4 + (2 * c * (d + 8) + 4 * r * (d + 8) + 2 * r * (c + 8)) * 2;
        (format!("st_flash_bwd_d{d}_bf16"), smem)
    }

    /// Flash attention forward: the context `[batch*seq, heads*head_dim]` (bf16) and the per-row
    /// log-sum-exp `[batch, heads, seq]` (f32, natural log). None where the kernels do not apply.
    pub fn flash_fwd(
        q: Bhtd,
        k: Bhtd,
        v: Bhtd,
        mask_add: &Tensor,
        dims: &FlashDims,
    ) -> Result<Option<(Tensor, Tensor)>> {
        if !flash_supported(dims)
            || !flash_input(&q, dims, dims.heads)
            || !flash_input(&k, dims, dims.kv_heads)
            || !flash_input(&v, dims, dims.kv_heads)
        {
            return Ok(None);
        }
        let Some(mask) = flash_mask(mask_add, dims)? else {
            return Ok(None);
        };
        let dev = device(q.t)?;
        let (b, t, h, d) = (dims.batch, dims.seq, dims.heads, dims.head_dim);
        let (o, po) = output(&dev, DType::BF16, &Shape::from((b * t, h * d)))?;
        let (lse, pl) = output(&dev, DType::F32, &Shape::from((b, h, t)))?;
        let (pq, pk, pv, pm) = (
            ptr(q.t, &dev)?,
            ptr(k.t, &dev)?,
            ptr(v.t, &dev)?,
            ptr(&mask, &dev)?,
        );
        let kernel = fwd_kernel(d);
        big_smem(&dev, &kernel.name, kernel.smem)?;
        let cfg = LaunchConfig {
            grid_dim: (h as u32, t.div_ceil(kernel.rows) as u32, b as u32),
            block_dim: (kernel.threads, 1, 1),
            shared_mem_bytes: kernel.smem as u32,
        };
        let (t32, h32, kv32) = (t as i32, h as i32, dims.kv_heads as i32);
        let [qsb, qsh, qsr] = q.strides;
        let [ksb, ksh, ksr] = k.strides;
        let [vsb, vsh, vsr] = v.strides;
        let [osb, osh, osr] = dims.merged(h);
        let (sc, ca) = (dims.scale as f32, dims.causal as i32);
        launch!(dev, kernel.name, cfg; pq, pk, pv, pm, po, pl, t32, h32, kv32, qsb, qsh, qsr, ksb, ksh, ksr, vsb, vsh, vsr, osb, osh, osr, sc, ca);
        Ok(Some((o, lse)))
    }

    /// Flash attention backward: `(dq, dk, dv)`, bf16. dq and dk come as `[batch, heads, seq,
    /// head_dim]` when `heads_major` (for rope's backward), else in the layers' `[batch*seq,
    /// heads*head_dim]` layout as dv always does.
    #[allow(clippy::too_many_arguments)]
    pub fn flash_bwd(
        q: Bhtd,
        k: Bhtd,
        v: Bhtd,
        mask_add: &Tensor,
        o: Bhtd,
        dout: Bhtd,
        lse: &Tensor,
        dims: &FlashDims,
        heads_major: bool,
    ) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        let (b, t, h, kv, d) = (
            dims.batch,
            dims.seq,
            dims.heads,
            dims.kv_heads,
            dims.head_dim,
        );
        if !flash_supported(dims)
            || !flash_input(&q, dims, h)
            || !flash_input(&k, dims, kv)
            || !flash_input(&v, dims, kv)
            || !flash_input(&o, dims, h)
            || !flash_input(&dout, dims, h)
            || !f32_on_cuda(&[lse])
            || lse.elem_count() != b * h * t
        {
            return Ok(None);
        }
        let Some(mask) = flash_mask(mask_add, dims)? else {
            return Ok(None);
        };
        let dev = device(q.t)?;
        let (dvec, pdvec) = output(&dev, DType::F32, &Shape::from((b, h, t)))?;
        let dq_acc = Tensor::zeros((b, h, t, d), DType::F32, q.t.device())?;
        let (dq_shape, dk_shape, dq_strides, dk_strides) = if heads_major {
            (
                Shape::from((b, h, t, d)),
                Shape::from((b, kv, t, d)),
                dims.heads_major(h),
                dims.heads_major(kv),
            )
        } else {
            (
                Shape::from((b * t, h * d)),
                Shape::from((b * t, kv * d)),
                dims.merged(h),
                dims.merged(kv),
            )
        };
        let (dq, pdq) = output(&dev, DType::BF16, &dq_shape)?;
        let (dk, pdk) = output(&dev, DType::BF16, &dk_shape)?;
        let (dv, pdv) = output(&dev, DType::BF16, &Shape::from((b * t, kv * d)))?;
        let (t32, h32, kv32, b32, d32) = (t as i32, h as i32, kv as i32, b as i32, d as i32);
        let [osb, osh, osr] = o.strides;
        let [dsb, dsh, dsr] = dout.strides;
        let (po, pdo) = (ptr(o.t, &dev)?, ptr(dout.t, &dev)?);
        launch!(dev, "st_flash_bwd_pre_bf16", warps_cfg(b * h * t); po, pdo, pdvec, b32, t32, h32, d32, osb, osh, osr, dsb, dsh, dsr);
        let (pq, pk, pv, pm) = (
            ptr(q.t, &dev)?,
            ptr(k.t, &dev)?,
            ptr(v.t, &dev)?,
            ptr(&mask, &dev)?,
        );
        let (pl, pacc) = (ptr(lse, &dev)?, ptr(&dq_acc, &dev)?);
        let (name, smem) = bwd_kernel(d);
        big_smem(&dev, &name, smem)?;
        let cfg = LaunchConfig {
            grid_dim: (kv as u32, t.div_ceil(BWD_KEYS) as u32, b as u32),
            block_dim: (BWD_THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let [qsb, qsh, qsr] = q.strides;
        let [ksb, ksh, ksr] = k.strides;
        let [vsb, vsh, vsr] = v.strides;
        let [dksb, dksh, dksr] = dk_strides;
        let [dvsb, dvsh, dvsr] = dims.merged(kv);
        let (sc, ca) = (dims.scale as f32, dims.causal as i32);
        launch!(dev, name, cfg; pq, pk, pv, pm, pdo, pl, pdvec, pacc, pdk, pdv, t32, h32, kv32, qsb, qsh, qsr, ksb, ksh, ksr, vsb, vsh, vsr, dsb, dsh, dsr, dksb, dksh, dksr, dvsb, dvsh, dvsr, sc, ca);
        let [sb, sh, sr] = dq_strides;
        launch!(dev, "st_flash_dq_store_bf16", elems_cfg(b * h * t * d); pacc, pdq, b32, t32, h32, d32, sb, sh, sr);
        drop((dq_acc, dvec, mask)); // freed in stream order, after the kernels
        Ok(Some((dq, dk, dv)))
    }

    /// Each tensor's sum of squares in f64, `[n]`, in one launch (`st_sum_squares_many`, one
    /// block a tensor). None unless every tensor is contiguous f32 on one CUDA device.
    pub fn sum_squares_many(ts: &[&Tensor]) -> Result<Option<Tensor>> {
        if ts.is_empty() || ts.len() > 65535 || !f32_on_cuda(ts) {
            return Ok(None);
        }
        let here = ts[0].device();
        if ts.iter().any(|t| !t.device().same_device(here)) {
            bail!("sum of squares: tensors on more than one GPU");
        }
        let dev = device(ts[0])?;
        let mut table = Vec::with_capacity(2 * ts.len());
        for t in ts {
            table.extend([ptr(t, &dev)?, t.elem_count() as u64]);
        }
        let (table, pt) = upload(&dev, &table)?;
        let (out, pout) = output(&dev, DType::F64, &Shape::from(ts.len()))?;
        let cfg = LaunchConfig {
            grid_dim: (ts.len() as u32, 1, 1),
            block_dim: (512, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(dev, "st_sum_squares_many", cfg; pt, pout);
        drop(table); // freed in stream order, after the kernel
        Ok(Some(out))
    }

    /// Every item's AdamW update in one launch (`st_adamw_many`), each gradient times
    /// `grad_scale`: new values, moments and, where an item asks for bf16, its copy in bf16.
    /// None (the caller updates one by one) unless every tensor is contiguous f32 on CUDA and
    /// every copy bf16.
    pub fn adamw_many(
        items: &[AdamWItem],
        h: &AdamWStep,
        grad_scale: f64,
    ) -> Result<Option<Vec<AdamWOut>>> {
        let fits = |it: &AdamWItem| {
            f32_on_cuda(&[it.p, it.g, it.m, it.v]) && it.low.is_none_or(|d| d == DType::BF16)
        };
        if items.is_empty() || items.len() > 65535 || !items.iter().all(fits) {
            return Ok(None);
        }
        let dev = device(items[0].p)?;
        let mut table = Vec::with_capacity(10 * items.len());
        let mut out = Vec::with_capacity(items.len());
        let mut widest = 0;
        let here = items[0].p.device();
        for it in items {
            check_same_len(
                "adamw",
                &[("param", it.p), ("grad", it.g), ("m", it.m), ("v", it.v)],
            )?;
            if [it.p, it.g, it.m, it.v]
                .iter()
                .any(|t| !t.device().same_device(here))
            {
                bail!("adamw: parameters on more than one GPU");
            }
            let shape = it.p.shape();
            let (p2, pp2) = output(&dev, DType::F32, shape)?;
            let (m2, pm2) = output(&dev, DType::F32, shape)?;
            let (v2, pv2) = output(&dev, DType::F32, shape)?;
            let low = it.low.map(|d| output(&dev, d, shape)).transpose()?;
            let plow = low.as_ref().map_or(0, |(_, p)| *p);
            let n = it.p.elem_count();
            widest = widest.max(n);
            let bits = |x: f64| u64::from((x as f32).to_bits());
            table.extend([
                ptr(it.p, &dev)?,
                ptr(it.g, &dev)?,
                ptr(it.m, &dev)?,
                ptr(it.v, &dev)?,
                pp2,
                pm2,
                pv2,
                plow,
                n as u64,
                bits(it.bc1) | bits(it.bc2) << 32,
            ]);
            out.push(AdamWOut {
                p: p2,
                m: m2,
                v: v2,
                low: low.map(|(t, _)| t),
            });
        }
        let (table, pt) = upload(&dev, &table)?;
        let cfg = LaunchConfig {
            grid_dim: (widest.div_ceil(256).min(64) as u32, items.len() as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = |x: f64| x as f32;
        let (lr, b1, b2, eps, wd, gs) = (
            f(h.lr),
            f(h.beta1),
            f(h.beta2),
            f(h.eps),
            f(h.weight_decay),
            f(grad_scale),
        );
        launch!(dev, "st_adamw_many", cfg; pt, lr, b1, b2, eps, wd, gs);
        drop(table); // freed in stream order, after the kernel
        Ok(Some(out))
    }

    /// `(N, n, d, r)` of the CKA kernels' inputs, the rows `y` `[N, d]` and `u` `[N, r]` of an
    /// adapted linear, `b` `[d, r]` and `n` token rows `rows`: None unless `y` and `u` are
    /// contiguous CUDA tensors of a dtype the kernels take, `rows` contiguous u32 and the rank at
    /// most 256; an error naming `what` when the shapes disagree.
    fn cka_rows(
        what: &str,
        y: &Tensor,
        u: &Tensor,
        b: &Tensor,
        rows: &Tensor,
    ) -> Result<Option<(usize, usize, usize, usize)>> {
        let usable = |t: &Tensor| {
            t.device().is_cuda() && t.is_contiguous() && dtype_suffix(t.dtype()).is_some()
        };
        let r = b.dim(1)?;
        if !usable(y)
            || !usable(u)
            || r > super::CKA_MAX_RANK
            || rows.dtype() != DType::U32
            || !rows.is_contiguous()
        {
            return Ok(None);
        }
        let (big_n, d) = y.dims2()?;
        let n = rows.dim(0)?;
        if u.dims2()? != (big_n, r) || b.dims2()? != (d, r) || n > big_n {
            bail!(
                "{what}: y {:?}, u {:?}, b {:?} and {n} rows disagree",
                y.dims(),
                u.dims(),
                b.dims()
            );
        }
        Ok(Some((big_n, n, d, r)))
    }

    /// The Gram matrix of the columns of a contiguous f64 `e` `[m, k]`, `E^T E` `[k, k]`, by
    /// cuBLAS's symmetric rank-k update, half a general product's work. Only `M[i][j]` for
    /// `i >= j` (row-major) is written, the rest is left as allocated.
    fn syrk_f64(dev: &CudaDevice, e: &Tensor) -> Result<Tensor> {
        use candle_core::cuda_backend::cudarc::cublas::sys;
        let (m, k) = e.dims2()?;
        // Column-major, `e` is `A = E^T` `[k, m]` and `A A^T = E^T E` (op N). The column-major
        // upper triangle is the row-major lower one.
        let (size, depth, op) = (k, m, sys::cublasOperation_t::CUBLAS_OP_N);
        let (out, pout) = output(dev, DType::F64, &Shape::from((size, size)))?;
        let pe = ptr(e, dev)?;
        let blas = dev.cublas_handle();
        let (one, zero) = (1f64, 0f64);
        // SAFETY: `e` holds m * k f64 (leading dimension k) and `out` size * size; the handle
        // runs on the device's stream.
        let status = unsafe {
            sys::cublasDsyrk_v2(
                *blas.handle(),
                sys::cublasFillMode_t::CUBLAS_FILL_MODE_UPPER,
                op,
                size as i32,
                depth as i32,
                &one,
                pe as *const f64,
                k as i32,
                &zero,
                pout as *mut f64,
                size as i32,
            )
        };
        if status != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            bail!("cublasDsyrk: {status:?}");
        }
        Ok(out)
    }

    /// `E E^T` in f32 of each `E` `[m, k]` of a contiguous f32 `e` `[count, m, k]` on TF32
    /// tensor cores (its inputs carry bf16 activations' precision at best), with safetune's own
    /// kernel: the upper triangle's 64 x 64 tiles times [`super::cka_gram_splits`] column
    /// chunks side by side, the tiles copied with `cp.async` (so `k` a multiple of 4). Returns
    /// the chunks' partial products `[count, splits, m, m]`, which their readers add, and
    /// `splits`. cuBLAS's TF32 product is faster once running (a call of the terms took 50 us
    /// with it, 58 us with this kernel, at SAFE's 7B shape on an H100) but cost 55-82 ms at its
    /// first use in a process, which SAFE's first measured step paid; this kernel loads with
    /// safetune's module at the run's first step.
    fn gram_tf32(dev: &CudaDevice, e: &Tensor) -> Result<(Tensor, usize)> {
        let (count, m, k) = e.dims3()?;
        if e.dtype() != DType::F32 || !e.is_contiguous() || !k.is_multiple_of(4) {
            bail!(
                "gram_tf32: e {:?} {:?} must be contiguous f32 with a multiple of 4 columns",
                e.dims(),
                e.dtype()
            );
        }
        let (splits, kc) = super::cka_gram_splits(m, k);
        let (parts, pparts) = output(dev, DType::F32, &Shape::from((count, splits, m, m)))?;
        let pe = ptr(e, dev)?;
        let cfg = LaunchConfig {
            grid_dim: (
                super::gram_tile_pairs(m) as u32,
                splits as u32,
                count as u32,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let (m32, k32, kc32) = (m as i32, k as i32, kc as i32);
        launch!(dev, "st_gram_tf32", cfg; pe, m32, k32, kc32, pparts);
        Ok((parts, splits))
    }

    /// CKA's five norms `[5]` of `X = Y + U B^T` over the token rows `rows` in the moment form
    /// (`nn::cka::low_rank_norms`, whose composition this replaces and is checked against): one
    /// kernel gathers the rows of `y` and `u` side by side in f64 with their column sums, one
    /// cuBLAS symmetric product forms `[Y U]^T [Y U]` (`Y^T Y`, `Y^T U` and `U^T U` at once),
    /// and the moment kernels turn it into the norms. None unless `y` and `u` are contiguous
    /// CUDA tensors of one dtype the kernels take, `rows` contiguous u32 and the rank at most
    /// 256.
    pub fn cka_low_rank_norms(
        y: &Tensor,
        u: &Tensor,
        b: &Tensor,
        rows: &Tensor,
    ) -> Result<Option<Tensor>> {
        let Some((big_n, n, d, r)) = cka_rows("cka_low_rank_norms", y, u, b, rows)? else {
            return Ok(None);
        };
        let sfx = dtype_suffix(y.dtype()).expect("checked by cka_rows");
        if u.dtype() != y.dtype() {
            return Ok(None);
        }
        let dev = device(y)?;
        let c = d + r;
        let (e, pe) = output(&dev, DType::F64, &Shape::from((n, c)))?;
        // Chunks of 128 rows (`CKA_CHUNK` in kernels.cu), each block 32 columns of one chunk.
        let chunks = n.div_ceil(128);
        let (_partial_sums, ppartial_sums) = output(&dev, DType::F64, &Shape::from((chunks, c)))?;
        let (_sums, psums) = output(&dev, DType::F64, &Shape::from(c))?;
        // Every row in order needs no index (token rows are distinct and sorted).
        let prows = if n < big_n { ptr(rows, &dev)? } else { 0 };
        let (py, pu) = (ptr(y, &dev)?, ptr(u, &dev)?);
        let (n32, d32, r32, c32, chunks32) =
            (n as i32, d as i32, r as i32, c as i32, chunks as i32);
        let cfg = LaunchConfig {
            grid_dim: (c.div_ceil(32) as u32, chunks as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(dev, format!("st_cka_gather_{sfx}"), cfg; py, pu, prows, n32, d32, r32, pe, ppartial_sums);
        let cfg = LaunchConfig {
            grid_dim: (c.div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(dev, "st_cka_col_sums", cfg; ppartial_sums, chunks32, c32, psums);
        let m = syrk_f64(&dev, &e)?;
        drop(e);
        // What the composition's three products count (`Y^T Y`, `Y^T U`, `U^T U`).
        crate::nn::flops::add(2 * (n * d * d + n * d * r + n * r * r) as u64);
        let b = b.to_dtype(DType::F64)?.contiguous()?;
        let (_partial, ppartial) = output(&dev, DType::F64, &Shape::from((d, 5)))?;
        let (pm, pb, nf) = (ptr(&m, &dev)?, ptr(&b, &dev)?, n as f64);
        let per_row = LaunchConfig {
            grid_dim: (d as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(dev, "st_cka_moment_rows_packed", per_row; pm, pb, psums, d32, r32, nf, ppartial);
        Ok(Some(cka_moment_finish(&dev, ppartial, d, r)?))
    }

    /// Up to [`CKA_GRAM_BATCH`](super::CKA_GRAM_BATCH) adapters' rows for one launch set of
    /// the Gram kernels, passed by value (`CkaGramInputs` in kernels.cu).
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct CkaGramInputs {
        y: [u64; super::CKA_GRAM_BATCH],
        u: [u64; super::CKA_GRAM_BATCH],
        b: [u64; super::CKA_GRAM_BATCH],
    }
    // SAFETY: plain pointers, laid out as the kernels' struct.
    unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for CkaGramInputs {}

    /// The Gram form's CKA terms `[items, terms]` of each item's `X = Y + U B^T` (`(y, u, b)`)
    /// over the same token rows `rows` (see `nn::cka::gram_terms`, the composition this replaces
    /// and is checked against) in four launches for all of them: one centres `Y`'s and `U`'s
    /// rows and appends `B^T` to `Yc` (f32), a TF32 product `[Yc; B^T] [Yc; B^T]^T` (in slices
    /// over the width) holds `L = Yc Yc^T`, `Yc B` and `B^T B`, a kernel per row of `L` adds the
    /// slices and forms `Z`, and one assembles the terms (with `Z^T Z`), each sum in f64. Up to
    /// [`CKA_GRAM_BATCH`](super::CKA_GRAM_BATCH) adapters share the launches (at SAFE's 7B
    /// shape a pair takes about 1.86x one adapter's time); each adapter's terms are the same as
    /// alone. The product's terms agree with the f64 composition to TF32's precision
    /// (about 1e-4 of each term's scale), finer than the bf16 activations they measure. None
    /// unless there are 1 to `CKA_GRAM_BATCH` items of one shape, `y` and `u` contiguous CUDA
    /// tensors of one dtype, `b` of f32 or bf16 (the same for all), `rows` contiguous u32, the
    /// rank at most 256 and the width a multiple of 4 ([`super::cka_gram_fused`]).
    pub fn cka_gram_terms(
        items: &[(&Tensor, &Tensor, &Tensor)],
        rows: &Tensor,
    ) -> Result<Option<Tensor>> {
        let Some(&(y, u, b)) = items.first() else {
            return Ok(None);
        };
        if items.len() > super::CKA_GRAM_BATCH {
            return Ok(None);
        }
        let Some((big_n, n, d, r)) = cka_rows("cka_gram_terms", y, u, b, rows)? else {
            return Ok(None);
        };
        let (Some(ys), Some(bs)) = (dtype_suffix(y.dtype()), dtype_suffix(b.dtype())) else {
            return Ok(None);
        };
        if u.dtype() != y.dtype() || !super::cka_gram_fused(true, d, r) {
            return Ok(None);
        }
        let dev = device(y)?;
        let mut inputs = CkaGramInputs::default();
        // Each B made contiguous lives to the end, as the other wrappers' inputs do.
        let mut bs_kept = Vec::with_capacity(items.len());
        for (a, &(ya, ua, ba)) in items.iter().enumerate() {
            // The first item set the shapes and dtypes the others must have.
            let same = (ya.dtype(), ua.dtype(), ba.dtype()) == (y.dtype(), u.dtype(), b.dtype());
            if a > 0
                && (!same
                    || cka_rows("cka_gram_terms", ya, ua, ba, rows)? != Some((big_n, n, d, r)))
            {
                return Ok(None);
            }
            let ba = ba.contiguous()?;
            inputs.y[a] = ptr(ya, &dev)?;
            inputs.u[a] = ptr(ua, &dev)?;
            inputs.b[a] = ptr(&ba, &dev)?;
            bs_kept.push(ba);
        }
        let count = items.len();
        // Every row in order needs no index (token rows are distinct and sorted).
        let prows = if n < big_n { ptr(rows, &dev)? } else { 0 };
        // Per adapter, E = [Yc; B^T] (f32) and M = E E^T hold L = Yc Yc^T, Yc B and G = B^T B
        // (see the kernels).
        let f64s = |shape: Shape| output(&dev, DType::F64, &shape);
        let (e, pe) = output(&dev, DType::F32, &Shape::from((count, n + r, d)))?;
        let (_ymean, pymean) = f64s(Shape::from((count, d)))?;
        let (_colsq, pcolsq) = f64s(Shape::from((count, d)))?;
        let (_uc, puc) = f64s(Shape::from((count, n, r)))?;
        let (_umean, pumean) = f64s(Shape::from((count, r)))?;
        let (n32, r32, d32) = (n as i32, r as i32, d as i32);
        let blocks = |per_item: usize| LaunchConfig {
            grid_dim: (per_item as u32, count as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // 32 warps a block (`CKA_CENTER_WARPS` in kernels.cu).
        let centre = LaunchConfig {
            block_dim: (1024, 1, 1),
            ..blocks(d.div_ceil(32) + r.div_ceil(32))
        };
        launch!(dev, format!("st_cka_gram_center_{ys}_{bs}"), centre; inputs, prows, n32, d32, r32, pe, pymean, pcolsq, puc, pumean);
        // M's partial products over chunks of the width, which its readers add (`gram_at`).
        let (m, slices) = gram_tf32(&dev, &e)?;
        let slices = slices as i32;
        let per_item = |flops: usize| (count * flops) as u64;
        // What the composition's three products count (`Yc Yc^T`, `Yc B`, `B^T B`).
        crate::nn::flops::add(per_item(2 * (n * n * d + n * d * r + d * r * r)));
        let (_z, pz) = f64s(Shape::from((count, n, 2 * r)))?;
        let (_partial, ppartial) = f64s(Shape::from((count, n, 2)))?;
        let pm = ptr(&m, &dev)?;
        launch!(dev, "st_cka_gram_rows", blocks(n); pm, slices, puc, n32, r32, pz, ppartial);
        // The products the kernels did where the composition called `matmul`: `Uc G / 2`,
        // `L Uc`, `Z^T Z` and `mean(Y) B`.
        crate::nn::flops::add(per_item(
            2 * (n * r * r + n * n * r + 4 * r * r * n + d * r),
        ));
        let (out, pout) = f64s(Shape::from((count, 3 + 5 * r * r + 2 * r)))?;
        // Block 0 adds and copies; blocks 1 ..= r form mean(Y) B, the rest Z^T Z.
        let finish = blocks(1 + r + 4 * r * r);
        launch!(dev, "st_cka_gram_finish", finish; ppartial, n32, pcolsq, d32, pz, pm, slices, pumean, pymean, pe, r32, pout);
        Ok(Some(out))
    }

    /// CKA's five norms `[5]` from one batch's low-rank moments (`nn::cka::LowRankMoments`, whose
    /// composition this replaces and is checked against): a kernel per row of the `d x d`
    /// products, one that adds the rows. None unless every moment is a contiguous f64 CUDA
    /// tensor and the rank at most 256; an error when their shapes disagree.
    pub fn cka_moment_norms(m: &crate::nn::cka::LowRankMoments) -> Result<Option<Tensor>> {
        let all = [&m.yty, &m.ytu, &m.utu, &m.b, &m.sum_y, &m.sum_u];
        let usable = all
            .iter()
            .all(|t| t.device().is_cuda() && t.is_contiguous() && t.dtype() == DType::F64);
        let (d, r) = (
            m.yty.dims().first().copied().unwrap_or(0),
            m.sum_u.elem_count(),
        );
        if !usable || r > super::CKA_MAX_RANK {
            return Ok(None);
        }
        let fits = m.yty.dims() == [d, d]
            && m.ytu.dims() == [d, r]
            && m.utu.dims() == [r, r]
            && m.b.dims() == [d, r]
            && m.sum_y.dims() == [d]
            && m.sum_u.dims() == [r];
        if !fits {
            bail!(
                "cka_moment_norms: yty {:?}, ytu {:?}, utu {:?}, b {:?}, sum_y {:?} and sum_u {:?} \
                 disagree",
                m.yty.dims(),
                m.ytu.dims(),
                m.utu.dims(),
                m.b.dims(),
                m.sum_y.dims(),
                m.sum_u.dims()
            );
        }
        let dev = device(&m.yty)?;
        // Named so that it lives to the end of the function, as the other wrappers' scratch does.
        let (_partial, ppartial) = output(&dev, DType::F64, &Shape::from((d, 5)))?;
        let (pyty, pytu, putu, pb, psy, psu) = (
            ptr(&m.yty, &dev)?,
            ptr(&m.ytu, &dev)?,
            ptr(&m.utu, &dev)?,
            ptr(&m.b, &dev)?,
            ptr(&m.sum_y, &dev)?,
            ptr(&m.sum_u, &dev)?,
        );
        let (d32, r32, n) = (d as i32, r as i32, m.n as f64);
        let rows = LaunchConfig {
            grid_dim: (d as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(dev, "st_cka_moment_rows", rows; pyty, pytu, putu, pb, psy, psu, d32, r32, n, ppartial);
        Ok(Some(cka_moment_finish(&dev, ppartial, d, r)?))
    }

    /// The last step of both moment-norm paths: `st_cka_moment_finish` adds the `[d, 5]` per-row
    /// partial norms at `ppartial` (kept alive by the caller) into CKA's five norms `[5]`; the
    /// products the norms' composition counts (`C`, `B (U^T U) B^T` and `B sum_u`) are counted.
    fn cka_moment_finish(dev: &CudaDevice, ppartial: u64, d: usize, r: usize) -> Result<Tensor> {
        let (out, pout) = output(dev, DType::F64, &Shape::from(5))?;
        let one = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let d32 = d as i32;
        launch!(dev, "st_cka_moment_finish", one; ppartial, d32, pout);
        crate::nn::flops::add(2 * (d * d * r + d * r * r + d * d * r + d * r) as u64);
        Ok(out)
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::{AdamWItem, AdamWOut, AdamWStep, Bhtd, FlashDims, NormOut};
    use candle_core::{Result, Tensor};

    pub fn flash_supported(_: &FlashDims) -> bool {
        false
    }
    pub fn flash_fwd(
        _: Bhtd,
        _: Bhtd,
        _: Bhtd,
        _: &Tensor,
        _: &FlashDims,
    ) -> Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }
    #[allow(clippy::too_many_arguments)]
    pub fn flash_bwd(
        _: Bhtd,
        _: Bhtd,
        _: Bhtd,
        _: &Tensor,
        _: Bhtd,
        _: Bhtd,
        _: &Tensor,
        _: &FlashDims,
        _: bool,
    ) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        Ok(None)
    }

    pub fn sum_squares_many(_: &[&Tensor]) -> Result<Option<Tensor>> {
        Ok(None)
    }
    pub fn adamw_many(_: &[AdamWItem], _: &AdamWStep, _: f64) -> Result<Option<Vec<AdamWOut>>> {
        Ok(None)
    }

    pub fn norm_fwd(
        _: &Tensor,
        _: &Tensor,
        _: Option<&Tensor>,
        _: f64,
        _: bool,
    ) -> Result<Option<NormOut>> {
        Ok(None)
    }
    pub fn norm_bwd(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: bool,
        _: bool,
        _: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }
    pub fn gelu_bwd_in_place(_: &Tensor, _: &Tensor, _: bool) -> Result<bool> {
        Ok(false)
    }
    pub fn gelu_fwd(_: &Tensor, _: bool) -> Result<Option<Tensor>> {
        Ok(None)
    }
    pub fn bias_add(_: &Tensor, _: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
    pub fn dropout_fwd(_: &Tensor, _: &[u64], _: u32, _: f32) -> Result<Option<Tensor>> {
        Ok(None)
    }
    pub fn dequantize(
        _: &candle_core::quantized::QTensor,
        _: candle_core::DType,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }
    pub fn add(_: &Tensor, _: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
    pub fn add_product(_: &Tensor, _: &Tensor, _: &Tensor, _: bool) -> Result<bool> {
        Ok(false)
    }
    pub fn gemm(_: &Tensor, _: &Tensor, _: f64, _: candle_core::DType) -> Result<Option<Tensor>> {
        Ok(None)
    }
    pub fn matmul_acc(_: &Tensor, _: &Tensor, _: &Tensor) -> Result<bool> {
        Ok(false)
    }
    pub fn rope(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: usize,
        _: bool,
        _: bool,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }
    pub fn swiglu_fwd(_: &Tensor, _: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
    pub fn cross_entropy_rows(
        _: &Tensor,
        _: &[u32],
        _: Option<f64>,
    ) -> Result<Option<(Tensor, Option<Tensor>)>> {
        Ok(None)
    }
    pub fn swiglu_bwd_in_place(_: &Tensor, _: &Tensor, _: &Tensor) -> Result<bool> {
        Ok(false)
    }
    pub fn softmax_fwd(
        _: &Tensor,
        _: &Tensor,
        _: f64,
        _: bool,
    ) -> Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }
    pub fn softmax_recompute(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: f64,
        _: bool,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }
    pub fn softmax_bwd(_: &Tensor, _: &Tensor, _: f64) -> Result<Option<Tensor>> {
        Ok(None)
    }
    pub fn cka_gram_terms(_: &[(&Tensor, &Tensor, &Tensor)], _: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
    pub fn cka_moment_norms(_: &crate::nn::cka::LowRankMoments) -> Result<Option<Tensor>> {
        Ok(None)
    }
    pub fn cka_low_rank_norms(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

pub use imp::*;

/// Whether this build has the fused CUDA kernels.
pub const AVAILABLE: bool = cfg!(feature = "cuda");

/// The most adapters one call of [`cka_gram_terms`] measures (`CKA_GRAM_BATCH` in kernels.cu).
pub const CKA_GRAM_BATCH: usize = 2;

/// The largest adapter rank SAFE's CKA kernels take (`st_cka_*` in kernels.cu); above it the
/// candle composition runs.
pub const CKA_MAX_RANK: usize = 256;

/// Whether [`cka_gram_terms`] runs (rather than the composition) for an adapter of width `d`
/// and rank `r` whose tensors are on CUDA when `on_cuda`: its product copies 16-byte pieces of
/// rows, so the width is a multiple of 4.
pub fn cka_gram_fused(on_cuda: bool, d: usize, r: usize) -> bool {
    AVAILABLE && on_cuda && r <= CKA_MAX_RANK && d.is_multiple_of(4)
}

/// How the Gram form's product `E E^T` (`E` `[m, k]`) is split over `E`'s columns: (chunks,
/// columns a chunk). About two blocks a multiprocessor over the upper triangle's 64 x 64 tiles,
/// each chunk at least 256 columns wide and a multiple of 32 (the kernel's step), the last one
/// what is left.
pub fn cka_gram_splits(m: usize, k: usize) -> (usize, usize) {
    let wanted = 264usize.div_ceil(gram_tile_pairs(m));
    let splits = wanted.clamp(1, (k / 256).max(1));
    let chunk = k.div_ceil(splits).next_multiple_of(32);
    (k.div_ceil(chunk), chunk)
}

/// The upper triangle's tiles of `E E^T` for `m` rows of `E`: `st_gram_tf32`'s blocks over one
/// chunk of the width (its tiles are `GT_TILE` = 64 rows square).
fn gram_tile_pairs(m: usize) -> usize {
    let tiles = m.div_ceil(64);
    tiles * (tiles + 1) / 2
}

/// The bytes [`cka_gram_terms`] allocates for `n` token rows of width `d` and rank `r`:
/// `E = [Yc; B^T]` and `E E^T`'s split products in f32, and its f64 vectors (the column means
/// and squares, `Uc`, the mean of `U`, `Z`, the per-row partial sums and the terms).
pub fn cka_gram_bytes(n: usize, d: usize, r: usize) -> usize {
    let f32s = (n + r) * d + cka_gram_splits(n + r, d).0 * (n + r) * (n + r);
    let f64s = 2 * d + n * r + r + 2 * n * r + 2 * n + 3 + 5 * r * r + 2 * r;
    4 * f32s + 8 * f64s
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn zeros(dims: &[usize], dtype: DType) -> Tensor {
        Tensor::zeros(dims, dtype, &Device::Cpu).unwrap()
    }

    #[test]
    fn kernel_inputs_must_agree_in_length_dtype_and_layout() {
        let p = zeros(&[4, 3], DType::F32);
        let g = zeros(&[4, 3], DType::F32);
        let flat = zeros(&[12], DType::F32);
        let ok = [("param", &p), ("grad", &g), ("m", &flat), ("v", &flat)];
        check_same_len("adamw", &ok).unwrap();
        check_same_len("adamw", &[]).unwrap();
        // A moment one element short: named, with both lengths.
        let short = zeros(&[11], DType::F32);
        let e = check_same_len("adamw", &[("param", &p), ("grad", &g), ("m", &short)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("adamw") && e.contains("'m'"), "{e}");
        assert!(
            e.contains("11 elements") && e.contains("'param' [4, 3] has 12"),
            "{e}"
        );
        // A longer one is refused too (the output is sized from the first tensor).
        let long = zeros(&[5, 3], DType::F32);
        let e = check_same_len("gelu_bwd", &[("x", &p), ("dy", &long)]).unwrap_err();
        assert!(e.to_string().contains("'dy' [5, 3] has 15 elements"), "{e}");
        // Another dtype.
        let half = zeros(&[4, 3], DType::BF16);
        let e = check_same_len("swiglu_fwd", &[("gate", &p), ("up", &half)]).unwrap_err();
        assert!(e.to_string().contains("'up' is BF16"), "{e}");
        // Same length but a transposed view: the kernel would read it in the wrong order.
        let t = zeros(&[3, 4], DType::F32).t().unwrap();
        let e = check_same_len("swiglu_bwd", &[("gate", &p), ("up", &p), ("dy", &t)]).unwrap_err();
        assert!(
            e.to_string().contains("'dy' [4, 3] is not contiguous"),
            "{e}"
        );
    }

    #[test]
    fn flash_strides_address_both_layouts() {
        let d = FlashDims {
            batch: 2,
            seq: 5,
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
            causal: true,
            scale: 1.0,
        };
        // [b*t, h*d]: element (b, h, t, 0) at b*t*h*d + t*h*d + h*d.
        assert_eq!(d.merged(4), [5 * 4 * 8, 8, 4 * 8]);
        assert_eq!(d.merged(2), [5 * 2 * 8, 8, 2 * 8]);
        // [b, h, t, d] contiguous.
        assert_eq!(d.heads_major(4), [4 * 5 * 8, 5 * 8, 8]);
        // Both layouts of the same logical element agree with candle's own reshapes.
        let x = Tensor::arange(0f32, (2 * 5 * 4 * 8) as f32, &Device::Cpu)
            .unwrap()
            .reshape((2 * 5, 4 * 8))
            .unwrap();
        let bhtd = x
            .reshape((2, 5, 4, 8))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();
        let flat: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let head_major: Vec<f32> = bhtd.flatten_all().unwrap().to_vec1().unwrap();
        let at = |s: [i64; 3], b: i64, h: i64, t: i64, c: i64| {
            (b * s[0] + h * s[1] + t * s[2] + c) as usize
        };
        for (b, h, t, c) in [(0, 0, 0, 0), (1, 3, 4, 7), (1, 2, 0, 5), (0, 1, 3, 2)] {
            assert_eq!(
                flat[at(d.merged(4), b, h, t, c)],
                head_major[at(d.heads_major(4), b, h, t, c)]
            );
        }
        // One full [seq, seq] x head_dim product over every query head: 2 * b * h * t * t * d.
        assert_eq!(d.attention_product_flops(), 2 * 2 * 4 * 5 * 5 * 8);
    }

    #[test]
    fn per_row_inputs_must_have_the_kernels_length() {
        let w = zeros(&[8], DType::F32);
        check_len("norm_fwd", "weight", &w, 8).unwrap();
        let e = check_len("norm_bwd", "rstd", &w, 6)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("norm_bwd: 'rstd' [8] has 8 elements, the kernel reads 6"),
            "{e}"
        );
    }
}
