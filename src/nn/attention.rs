//! Multi-head scaled dot-product attention with a key padding mask, an optional causal mask,
//! grouped-query attention, optional rotary embeddings, and dropout on the probabilities.
//!
//! Memory: backward does not read saved `(batch, heads, seq, seq)` probabilities. It saves q, k, v and
//! the per-row log-sum-exp, and recomputes the probabilities (one extra `q k^T` matmul), the way
//! flash attention does. Its dropout keeps the mask's seeds and redraws the mask in backward, so
//! the composition keeps nothing of that shape either.
//!
//! Fused (flash) attention on CUDA: for bf16 q, k and v with head_dim 64 or 128, a key mask
//! `[batch, 1, 1, seq]` and no dropout, [`Attention::forward`] runs the FlashAttention-2 style
//! kernels of `kernels.cu` (`gpu::flash_fwd` / `gpu::flash_bwd`): nothing of size `seq x seq` is
//! allocated, q, k and v are read in the layers' layout (or after rope, `[b, heads, t, d]`) without
//! head split / merge copies, and [`AttentionSaved`] keeps q, k, v, the output and the per-row
//! log-sum-exp.
//!
//! Fused attention on the CPU: for f32 q, k and v and a key mask `[batch, 1, 1, seq]` (dropout
//! included), the kernels of `cpu_attention.rs` work through one head's block of query rows at a
//! time, read and write the layers' layout, and allocate no `seq x seq` tensor (dropout's mask is
//! redrawn per block from its seeds). Everything else (CUDA in f32 or with dropout,
//! MPNet's per-head bias, other head sizes, `SAFETUNE_FLASH=0`, tensors autograd tracks) takes
//! the composition below, which stays the reference.
//!
//! Grouped-query attention without copies: query heads `g*G .. (g+1)*G` share kv head `g`
//! (transformers' `repeat_kv`), so viewing q `[b, heads, t, d]` as `[b, kv_heads, G*t, d]` (a free
//! reshape) turns every product into a batched matmul against the unexpanded k and v, and the sums
//! of dk and dv over each group come out of the backward matmuls themselves.

use super::dropout::{self, Dropout, DropoutSaved};
use super::flops::matmul;
use super::gpu::{Bhtd, FlashDims};
use super::rope::Rope;
use super::{cpu_attention, gpu, Pass};
use crate::device::compute_dtype;
use candle_core::{bail, DType, Result, Tensor, D};

#[derive(Clone, Copy, Debug)]
pub struct Attention {
    pub num_heads: usize,
    /// Key/value heads: `num_heads` for multi-head attention (BERT), fewer for grouped-query.
    pub num_kv_heads: usize,
    /// Position `i` attends only to positions `<= i` (decoders).
    pub causal: bool,
    pub dropout: Dropout,
}

/// Shapes of one attention call: `batch * seq` rows of `hidden` features.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub batch: usize,
    pub seq: usize,
}

pub struct AttentionSaved {
    /// `[b, heads, t, d]`, after rope (but see [`Path::Flash`]).
    q: Tensor,
    /// `[b, kv_heads, t, d]`, after rope; unexpanded.
    k: Tensor,
    v: Tensor,
    lse: Tensor,
    /// The mask, shape and rope its forward ran with.
    args: AttentionArgs,
    path: Path,
}

impl super::offload::SavedTensors for AttentionSaved {
    fn each_tensor(&mut self, f: &mut dyn FnMut(&mut Tensor)) {
        for t in [&mut self.q, &mut self.k, &mut self.v, &mut self.lse] {
            f(t);
        }
        if let Path::Flash(flash) = &mut self.path {
            f(&mut flash.o);
        }
    }
}

/// Which kernels ran forward, and so which backward runs, with what only that backward needs.
enum Path {
    /// The candle composition, with the fused softmax kernels on CUDA when `fused`; dropout
    /// keeps its seeds.
    Composition {
        fused: bool,
        dropout: Option<DropoutSaved>,
    },
    /// The fused flash kernels (CUDA, bf16): q, k and v are kept as the kernels read them (the
    /// layers' `[b*t, heads*d]` layout without rope, `[b, heads, t, d]` after it) and `lse` is
    /// `[b, heads, t]`.
    Flash(FlashSaved),
    /// The fused CPU kernels (f32): q, k and v are `[b, heads, t, d]` views, `lse` is
    /// `[b, heads, t, 1]`, and dropout's mask is redrawn from its seeds.
    Cpu(CpuSaved),
}

impl AttentionSaved {
    fn new(
        (q, k, v): (Tensor, Tensor, Tensor),
        lse: Tensor,
        mask_add: &Tensor,
        rope: Option<&Rope>,
        shape: AttnShape,
        path: Path,
    ) -> Self {
        Self {
            q,
            k,
            v,
            lse,
            args: AttentionArgs::new(mask_add, shape, rope),
            path,
        }
    }
}

/// What the fused CPU backward needs beyond q, k, v and the log-sum-exp.
struct CpuSaved {
    dims: cpu_attention::Dims,
    /// Dropout's draw of the probabilities' mask (redrawn from its seeds).
    dropout: Option<dropout::MaskDraw>,
}

struct FlashSaved {
    /// The context `[b*t, heads*d]` the forward returned (backward's `rowsum(dO * O)`).
    o: Tensor,
    dims: FlashDims,
    /// q and k are `[b, heads, t, d]` (rope ran), not the layers' layout.
    heads_major: bool,
}

/// Whether `Attention::forward` may take the fused flash kernels (CUDA, bf16, head_dim 64 / 128,
/// a key mask, no dropout): unless the environment sets `SAFETUNE_FLASH=0`, which keeps the
/// composition with the fused softmax kernels (for comparisons).
pub fn flash_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("SAFETUNE_FLASH").map_or(true, |v| v.trim() != "0"))
}

/// The additive value of a masked score, as in [`mask_to_additive`]: finite, so a row with every
/// key masked still gives a (uniform) softmax instead of NaN.
const MASKED: f64 = -1e9;

impl Attention {
    fn split_heads(&self, x: &Tensor, s: AttnShape, heads: usize) -> Result<Tensor> {
        self.heads_view(x, s, heads)?.contiguous()
    }

    /// `[batch*seq, heads*d]` viewed as `[batch, heads, seq, d]`, without a copy.
    fn heads_view(&self, x: &Tensor, s: AttnShape, heads: usize) -> Result<Tensor> {
        let c = x.dim(D::Minus1)?;
        x.reshape((s.batch, s.seq, heads, c / heads))?
            .transpose(1, 2)
    }

    fn merge_heads(&self, x: &Tensor, s: AttnShape) -> Result<Tensor> {
        let c = x.dim(1)? * x.dim(3)?;
        x.transpose(1, 2)?.reshape((s.batch * s.seq, c))
    }

    /// `[b, heads, t, n]` viewed as `[b, kv_heads, G*t, n]`: each kv head's query group stacked.
    fn group(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, t, n) = x.dims4()?;
        x.reshape((b, self.num_kv_heads, h / self.num_kv_heads * t, n))
    }

    /// The inverse of [`Attention::group`].
    fn ungroup(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _, gt, n) = x.dims4()?;
        let g = self.num_heads / self.num_kv_heads;
        x.reshape((b, self.num_heads, gt / g, n))
    }

    /// Unscaled scores `q k^T`, `[b, heads, t, t]`.
    fn raw_scores(&self, q: &Tensor, k: &Tensor) -> Result<Tensor> {
        self.ungroup(&matmul(&self.group(q)?, &k.t()?)?)
    }

    /// The additive mask of the composition: key padding `[b, 1, 1, t2]`, plus `MASKED` above the
    /// diagonal when causal (`[b, 1, t, t2]`; queries are the last `t` of `t2` positions).
    fn full_mask(&self, mask_add: &Tensor, t: usize, t2: usize) -> Result<Tensor> {
        if !self.causal {
            return Ok(mask_add.clone());
        }
        let causal: Vec<f32> = (0..t)
            .flat_map(|i| (0..t2).map(move |j| if j + t > i + t2 { MASKED as f32 } else { 0.0 }))
            .collect();
        let causal = Tensor::from_vec(causal, (t, t2), mask_add.device())?;
        mask_add.broadcast_add(&causal.to_dtype(mask_add.dtype())?)
    }

    /// Masked, scaled scores in the compute dtype (f32 for half-precision q and k), for the
    /// composition: `q` is scaled before the product (a `[b, h, t, d]` pass instead of a
    /// `[b, h, t, t]` one). Each step replaces the last, so at most two score-sized tensors live.
    fn scores(&self, q: &Tensor, k: &Tensor, mask_add: &Tensor) -> Result<Tensor> {
        let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
        let raw = self.raw_scores(&q.affine(scale, 0.0)?, k)?;
        let (_, _, t, t2) = raw.dims4()?;
        let cdt = compute_dtype(raw.dtype());
        let mut s = raw.to_dtype(cdt)?;
        drop(raw);
        s = s.broadcast_add(&self.full_mask(mask_add, t, t2)?.to_dtype(cdt)?)?;
        Ok(s)
    }

    /// Softmax probabilities and per-row log-sum-exp, in the compute dtype (fused kernel on CPU,
    /// composition elsewhere).
    fn probs(
        &self,
        q: &Tensor,
        k: &Tensor,
        mask_add: &Tensor,
        fused: bool,
    ) -> Result<(Tensor, Tensor)> {
        if fused {
            let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
            let raw = self.raw_scores(q, k)?;
            if let Some(out) = gpu::softmax_fwd(&raw, mask_add, scale, self.causal)? {
                return Ok(out);
            }
        }
        let mut e = self.scores(q, k, mask_add)?;
        let max = e.max_keepdim(D::Minus1)?;
        e = e.broadcast_sub(&max)?;
        e = e.exp()?;
        let sum = e.sum_keepdim(D::Minus1)?;
        e = e.broadcast_div(&sum)?;
        Ok((e, (max + sum.log()?)?))
    }

    /// `q` is `[batch*seq, num_heads*head_dim]`, `k` and `v` `[batch*seq, num_kv_heads*head_dim]`;
    /// `mask_add` is `[batch, 1, 1, seq]` (0 for tokens, a large negative number for padding, which
    /// is on the right), or any additive bias that broadcasts to `[batch, heads, seq, seq]`. `rope`, if given, rotates q and k at positions `0..seq`. Returns the context
    /// `[batch*seq, num_heads*head_dim]`.
    pub fn forward(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        mask_add: &Tensor,
        shape: AttnShape,
        rope: Option<&Rope>,
        pass: &mut Pass,
        save: bool,
    ) -> Result<(Tensor, Option<AttentionSaved>)> {
        self.forward_impl((q, k, v), mask_add, shape, rope, pass, save, true)
    }

    /// The candle composition throughout: reference for the fused kernels.
    pub fn forward_reference(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        mask_add: &Tensor,
        shape: AttnShape,
        rope: Option<&Rope>,
        pass: &mut Pass,
        save: bool,
    ) -> Result<(Tensor, Option<AttentionSaved>)> {
        self.forward_impl((q, k, v), mask_add, shape, rope, pass, save, false)
    }

    fn check_widths(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
        let (h, kv) = (self.num_heads, self.num_kv_heads);
        let (cq, ck, cv) = (q.dim(1)?, k.dim(1)?, v.dim(1)?);
        if kv == 0 || h % kv != 0 || cq % h != 0 || ck != cq / h * kv || cv != ck {
            bail!("attention: widths q {cq}, k {ck}, v {cv} do not fit {h} heads, {kv} kv heads");
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_impl(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        mask_add: &Tensor,
        shape: AttnShape,
        rope: Option<&Rope>,
        pass: &mut Pass,
        save: bool,
        fused: bool,
    ) -> Result<(Tensor, Option<AttentionSaved>)> {
        self.check_widths(q, k, v)?;
        if fused {
            if let Some(out) = self.flash_forward((q, k, v), mask_add, shape, rope, pass, save)? {
                return Ok(out);
            }
            if let Some(out) = self.cpu_forward((q, k, v), mask_add, shape, rope, pass, save)? {
                return Ok(out);
            }
        }
        // The fused softmax kernels (CUDA) read a key mask `[batch, 1, 1, keys]`; a per-head bias
        // (MPNet's relative positions, `[batch, heads, seq, seq]`) takes the composition there.
        let fused = fused && mask_add.dims() == [shape.batch, 1, 1, shape.seq];
        let (q, k) = match rope {
            Some(r) => (
                r.apply(&self.heads_view(q, shape, self.num_heads)?, 0)?,
                r.apply(&self.heads_view(k, shape, self.num_kv_heads)?, 0)?,
            ),
            None => (
                self.split_heads(q, shape, self.num_heads)?,
                self.split_heads(k, shape, self.num_kv_heads)?,
            ),
        };
        let v = self.split_heads(v, shape, self.num_kv_heads)?;
        let (ctx, lse, drop) = {
            let (p, lse) = self.probs(&q, &k, mask_add, fused)?;
            let (p, drop) = self.dropout.forward(&p, pass, save)?;
            let p = p.to_dtype(v.dtype())?;
            (self.ungroup(&matmul(&self.group(&p)?, &v)?)?, lse, drop)
        };
        let ctx = self.merge_heads(&ctx, shape)?;
        let path = Path::Composition {
            fused,
            dropout: drop,
        };
        let saved = save.then(|| AttentionSaved::new((q, k, v), lse, mask_add, rope, shape, path));
        Ok((ctx, saved))
    }

    /// The fused flash kernels' forward where they apply (see [`flash_enabled`]); None otherwise.
    fn flash_forward(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        mask_add: &Tensor,
        shape: AttnShape,
        rope: Option<&Rope>,
        pass: &Pass,
        save: bool,
    ) -> Result<Option<(Tensor, Option<AttentionSaved>)>> {
        let dropout_on = pass.training && self.dropout.p > 0.0;
        let all_bf16 = [q, k, v]
            .iter()
            .all(|t| t.dtype() == DType::BF16 && t.device().is_cuda());
        let (h, kv) = (self.num_heads, self.num_kv_heads);
        let dims = FlashDims {
            batch: shape.batch,
            seq: shape.seq,
            heads: h,
            kv_heads: kv,
            head_dim: q.dim(1)? / h,
            causal: self.causal,
            scale: 1.0 / ((q.dim(1)? / h) as f64).sqrt(),
        };
        if dropout_on
            || !all_bf16
            || !flash_enabled()
            || !gpu::flash_supported(&dims)
            || mask_add.dims() != [shape.batch, 1, 1, shape.seq]
        {
            return Ok(None);
        }
        let (q, k, qs, ks) = match rope {
            Some(r) => (
                r.apply(&self.heads_view(q, shape, h)?, 0)?.contiguous()?,
                r.apply(&self.heads_view(k, shape, kv)?, 0)?.contiguous()?,
                dims.heads_major(h),
                dims.heads_major(kv),
            ),
            None => (
                q.contiguous()?,
                k.contiguous()?,
                dims.merged(h),
                dims.merged(kv),
            ),
        };
        let v = v.contiguous()?;
        let Some((o, lse)) = gpu::flash_fwd(
            Bhtd { t: &q, strides: qs },
            Bhtd { t: &k, strides: ks },
            Bhtd {
                t: &v,
                strides: dims.merged(kv),
            },
            mask_add,
            &dims,
        )?
        else {
            return Ok(None);
        };
        super::flops::add(2 * dims.attention_product_flops());
        let path = Path::Flash(FlashSaved {
            o: o.clone(),
            dims,
            heads_major: rope.is_some(),
        });
        let saved = save.then(|| AttentionSaved::new((q, k, v), lse, mask_add, rope, shape, path));
        Ok(Some((o, saved)))
    }

    /// The fused CPU kernels' shapes for `shape.seq` queries over `keys` keys, where they apply:
    /// f32 CPU tensors autograd does not track and a contiguous additive mask the kernels read (a
    /// key mask, or MPNet's per-head bias: [`cpu_attention::Dims::mask_fits`]).
    fn cpu_dims(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        mask_add: &Tensor,
        shape: AttnShape,
        keys: usize,
        head_dim: usize,
    ) -> Option<cpu_attention::Dims> {
        let qualifies = [q, k, v, mask_add]
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && !t.track_op());
        let dims = cpu_attention::Dims {
            batch: shape.batch,
            heads: self.num_heads,
            kv_heads: self.num_kv_heads,
            queries: shape.seq,
            keys,
            head_dim,
            causal: self.causal,
            scale: (1.0 / (head_dim as f64).sqrt()) as f32,
        };
        (qualifies && mask_add.is_contiguous() && dims.mask_fits(mask_add.dims())).then_some(dims)
    }

    /// The fused CPU kernels' forward (`cpu_attention`) where they apply (see
    /// [`Attention::cpu_dims`]); None otherwise.
    fn cpu_forward(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        mask_add: &Tensor,
        shape: AttnShape,
        rope: Option<&Rope>,
        pass: &mut Pass,
        save: bool,
    ) -> Result<Option<(Tensor, Option<AttentionSaved>)>> {
        let (h, kv) = (self.num_heads, self.num_kv_heads);
        let Some(dims) = self.cpu_dims((q, k, v), mask_add, shape, shape.seq, q.dim(1)? / h) else {
            return Ok(None);
        };
        let (q, k) = match rope {
            Some(r) => (
                r.apply(&self.heads_view(q, shape, h)?, 0)?,
                r.apply(&self.heads_view(k, shape, kv)?, 0)?,
            ),
            None => (
                self.heads_view(q, shape, h)?,
                self.heads_view(k, shape, kv)?,
            ),
        };
        let v = self.heads_view(v, shape, kv)?;
        // The composition's draw, over the `[b, heads, t, t]` probabilities.
        let probs = shape.batch * h * shape.seq * shape.seq;
        let cpu = CpuSaved {
            dims,
            dropout: self.dropout.draw(pass, probs),
        };
        let Some((ctx, lse)) =
            cpu_attention::forward((&q, &k, &v), mask_add, &dims, cpu.dropout.as_ref())?
        else {
            bail!("attention: the fused CPU kernel refused inputs it qualified");
        };
        let path = Path::Cpu(cpu);
        let saved = save.then(|| AttentionSaved::new((q, k, v), lse, mask_add, rope, shape, path));
        Ok(Some((ctx, saved)))
    }
}

/// How a layer runs its attention on `(q, k, v)`: a training or evaluation forward (see
/// [`Attention::forward`]), or generation from a [`KvCache`] (see [`Attention::forward_cached`]).
/// The layer's body around the call is the same either way.
pub enum AttentionCall<'a> {
    Forward {
        mask_add: &'a Tensor,
        shape: AttnShape,
        rope: Option<&'a Rope>,
        save: bool,
    },
    Cached {
        batch: usize,
        rope: Option<&'a Rope>,
        cache: &'a mut KvCache,
    },
}

/// A whole-sequence attention's mask, shape and rope, owned: what its backward reads
/// ([`AttentionSaved`]), and what its forward needs to run again in backward, in a layer that
/// recomputes its attention's state (`stack::Parts::attention`).
#[derive(Clone)]
pub struct AttentionArgs {
    mask_add: Tensor,
    shape: AttnShape,
    rope: Option<Rope>,
}

/// Nothing to move: the mask and rope tables are shared by every layer.
impl super::offload::SavedTensors for AttentionArgs {
    fn each_tensor(&mut self, _: &mut dyn FnMut(&mut Tensor)) {}
}

impl AttentionArgs {
    pub fn new(mask_add: &Tensor, shape: AttnShape, rope: Option<&Rope>) -> Self {
        Self {
            mask_add: mask_add.clone(),
            shape,
            rope: rope.cloned(),
        }
    }

    /// The arguments of a whole-sequence `call`; an error for generation's cached calls, which
    /// keep nothing to recompute.
    pub fn of(call: &AttentionCall) -> Result<Self> {
        match call {
            AttentionCall::Forward {
                mask_add,
                shape,
                rope,
                ..
            } => Ok(Self::new(mask_add, *shape, *rope)),
            AttentionCall::Cached { .. } => {
                bail!("a cached attention call has nothing to recompute")
            }
        }
    }

    /// The whole-sequence call on these arguments.
    pub fn call(&self, save: bool) -> AttentionCall<'_> {
        AttentionCall::Forward {
            mask_add: &self.mask_add,
            shape: self.shape,
            rope: self.rope.as_ref(),
            save,
        }
    }

    /// What `attention`'s backward needs, from its forward on `qkv` again (the context it
    /// returns is dropped: the first forward gave it).
    pub fn recompute(
        &self,
        attention: &Attention,
        qkv: (&Tensor, &Tensor, &Tensor),
        pass: &mut Pass,
    ) -> Result<AttentionSaved> {
        match attention.call(self.call(true), qkv, pass)?.1 {
            Some(saved) => Ok(saved),
            None => bail!("an attention forward that saves kept no state"),
        }
    }
}

impl Attention {
    /// The context of `qkv` the way `call` says, and what backward needs when it saves.
    pub fn call(
        &self,
        call: AttentionCall,
        qkv: (&Tensor, &Tensor, &Tensor),
        pass: &mut Pass,
    ) -> Result<(Tensor, Option<AttentionSaved>)> {
        match call {
            AttentionCall::Forward {
                mask_add,
                shape,
                rope,
                save,
            } => self.forward(qkv, mask_add, shape, rope, pass, save),
            AttentionCall::Cached { batch, rope, cache } => {
                Ok((self.forward_cached(qkv, batch, rope, cache)?, None))
            }
        }
    }
}

/// The keys and values (after rope) of every position a sequence has seen, for generation: each
/// new token then costs one position's work instead of the whole prefix's. `[batch, kv_heads,
/// positions, head_dim]`; inference only.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
}

impl KvCache {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.k.as_ref().map_or(0, |k| k.dims()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends this call's keys and values; returns everything held.
    fn append(&mut self, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let cat = |old: &Option<Tensor>, new: Tensor| match old {
            Some(old) => Tensor::cat(&[old, &new], 2),
            None => Ok(new),
        };
        let (k, v) = (cat(&self.k, k)?, cat(&self.v, v)?);
        self.k = Some(k.clone());
        self.v = Some(v.clone());
        Ok((k, v))
    }
}

impl Attention {
    /// Inference attention for `batch` sequences (no padding) continuing the positions `cache`
    /// holds: q, k and v as in [`Attention::forward`] for the new positions only; rope rotates
    /// them at their absolute positions; every new query sees the cached keys and, causally, the
    /// new ones. Appends the new keys and values to `cache`.
    pub fn forward_cached(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        batch: usize,
        rope: Option<&Rope>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        self.check_widths(q, k, v)?;
        let shape = AttnShape {
            batch,
            seq: q.dim(0)? / batch,
        };
        let start = cache.len();
        let q = self.split_heads(q, shape, self.num_heads)?;
        let k = self.split_heads(k, shape, self.num_kv_heads)?;
        let v = self.split_heads(v, shape, self.num_kv_heads)?;
        let (q, k) = match rope {
            Some(r) => (r.apply(&q, start)?, r.apply(&k, start)?),
            None => (q, k),
        };
        let (k, v) = cache.append(k, v)?;
        let keys = start + shape.seq;
        let no_padding = Tensor::zeros((batch, 1, 1, keys), q.dtype(), q.device())?;
        let head_dim = q.dim(3)?;
        if let Some(dims) = self.cpu_dims((&q, &k, &v), &no_padding, shape, keys, head_dim) {
            if let Some((ctx, _)) = cpu_attention::forward((&q, &k, &v), &no_padding, &dims, None)?
            {
                return Ok(ctx);
            }
        }
        let (p, _) = self.probs(&q, &k, &no_padding, false)?;
        let ctx = self.ungroup(&matmul(&self.group(&p.to_dtype(v.dtype())?)?, &v)?)?;
        self.merge_heads(&ctx, shape)
    }
}

impl AttentionSaved {
    /// Returns `(dq, dk, dv)` in the input layouts: `[batch*seq, num_heads*head_dim]` for dq,
    /// `[batch*seq, num_kv_heads*head_dim]` for dk and dv.
    pub fn backward(&self, attn: &Attention, dctx: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (fused, dropout) = match &self.path {
            Path::Flash(f) => return self.flash_backward(f, dctx),
            Path::Cpu(c) => return self.cpu_backward(attn, c, dctx),
            Path::Composition { fused, dropout } => (*fused, dropout),
        };
        let dctx = attn.split_heads(dctx, self.args.shape, attn.num_heads)?;
        let scale = 1.0 / (self.q.dim(D::Minus1)? as f64).sqrt();
        let fused_p = if fused {
            let raw = attn.raw_scores(&self.q, &self.k)?;
            gpu::softmax_recompute(&raw, &self.args.mask_add, &self.lse, scale, attn.causal)?
        } else {
            None
        };
        let p = match fused_p {
            Some(p) => p,
            None => {
                let mut p = attn.scores(&self.q, &self.k, &self.args.mask_add)?;
                p = p.broadcast_sub(&self.lse.to_dtype(p.dtype())?)?;
                p.exp()?
            }
        };
        let adt = self.v.dtype();
        let gdctx = attn.group(&dctx)?;
        let dv = {
            let p_drop = match dropout {
                Some(d) => d.backward(&p)?, // the same mask-and-scale as forward
                None => p.clone(),
            };
            matmul(&attn.group(&p_drop.to_dtype(adt)?)?.t()?, &gdctx)?
        };
        let dp = attn.ungroup(&matmul(&gdctx, &self.v.t()?)?)?;
        let dp = dropout::backward_opt(dropout, dp)?;
        let fused_ds = if fused {
            gpu::softmax_bwd(&p, &dp, scale)?
        } else {
            None
        };
        // ds = scale * p * (dp - rowsum(dp * p)); the composition leaves the scale to dq and dk,
        // which are head-sized rather than score-sized.
        let (ds, ds_scale) = match fused_ds {
            Some(ds) => {
                std::mem::drop((dp, p));
                (ds, 1.0)
            }
            None => {
                let mut d = dp.to_dtype(p.dtype())?;
                std::mem::drop(dp);
                let row = (&d * &p)?.sum_keepdim(D::Minus1)?;
                d = d.broadcast_sub(&row)?;
                d = (d * p)?;
                (d.to_dtype(adt)?, scale)
            }
        };
        std::mem::drop(gdctx);
        let gds = attn.group(&ds)?;
        std::mem::drop(ds);
        let mut dq = attn.ungroup(&matmul(&gds, &self.k)?)?;
        let mut dk = matmul(&gds.t()?, &attn.group(&self.q)?)?;
        if ds_scale != 1.0 {
            dq = dq.affine(ds_scale, 0.0)?;
            dk = dk.affine(ds_scale, 0.0)?;
        }
        let (dq, dk) = match &self.args.rope {
            Some(r) => (
                r.apply_backward_merged(&dq, 0)?,
                r.apply_backward_merged(&dk, 0)?,
            ),
            None => (
                attn.merge_heads(&dq, self.args.shape)?,
                attn.merge_heads(&dk, self.args.shape)?,
            ),
        };
        Ok((dq, dk, attn.merge_heads(&dv, self.args.shape)?))
    }
}

impl AttentionSaved {
    /// Whether the forward ran the fused flash kernels (and backward will).
    pub fn used_flash(&self) -> bool {
        matches!(self.path, Path::Flash(_))
    }

    fn cpu_backward(
        &self,
        attn: &Attention,
        c: &CpuSaved,
        dctx: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (s, (h, kv)) = (self.args.shape, (attn.num_heads, attn.num_kv_heads));
        let dctx = attn.heads_view(&dctx.to_dtype(DType::F32)?, s, h)?;
        let qkv = (&self.q, &self.k, &self.v);
        let lse = &self.lse;
        let Some((dq, dk, dv)) = cpu_attention::backward(
            qkv,
            &dctx,
            lse,
            &self.args.mask_add,
            &c.dims,
            c.dropout.as_ref(),
        )?
        else {
            bail!("attention: the fused CPU backward refused inputs its forward took");
        };
        match &self.args.rope {
            Some(r) => Ok((
                r.apply_backward_merged(&attn.heads_view(&dq, s, h)?, 0)?,
                r.apply_backward_merged(&attn.heads_view(&dk, s, kv)?, 0)?,
                dv,
            )),
            None => Ok((dq, dk, dv)),
        }
    }

    fn flash_backward(&self, f: &FlashSaved, dctx: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let d = &f.dims;
        let (h, kv) = (d.heads, d.kv_heads);
        let (qs, ks) = if f.heads_major {
            (d.heads_major(h), d.heads_major(kv))
        } else {
            (d.merged(h), d.merged(kv))
        };
        let dctx = dctx.to_dtype(f.o.dtype())?.contiguous()?;
        let Some((dq, dk, dv)) = gpu::flash_bwd(
            Bhtd {
                t: &self.q,
                strides: qs,
            },
            Bhtd {
                t: &self.k,
                strides: ks,
            },
            Bhtd {
                t: &self.v,
                strides: d.merged(kv),
            },
            &self.args.mask_add,
            Bhtd {
                t: &f.o,
                strides: d.merged(h),
            },
            Bhtd {
                t: &dctx,
                strides: d.merged(h),
            },
            &self.lse,
            d,
            f.heads_major,
        )?
        else {
            bail!("attention: the flash backward kernel refused inputs its forward took");
        };
        // The composition's backward: the recomputed scores and four gradient products.
        super::flops::add(5 * d.attention_product_flops());
        match &self.args.rope {
            Some(r) if f.heads_major => Ok((
                r.apply_backward_merged(&dq, 0)?,
                r.apply_backward_merged(&dk, 0)?,
                dv,
            )),
            _ => Ok((dq, dk, dv)),
        }
    }
}

/// Additive key mask `[batch, 1, 1, seq]` from a `[batch, seq]` 0/1 attention mask.
pub fn mask_to_additive(mask: &Tensor, dtype: candle_core::DType) -> Result<Tensor> {
    let (b, t) = mask.dims2()?;
    mask.to_dtype(dtype)?
        .affine(1e9, -1e9)?
        .reshape((b, 1, 1, t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{check, max_abs_diff, randn};
    use candle_core::Device;
    use rand::SeedableRng;

    fn mha(heads: usize, p: f64) -> Attention {
        Attention {
            num_heads: heads,
            num_kv_heads: heads,
            causal: false,
            dropout: Dropout::new(p),
        }
    }

    /// 4 query heads sharing 2 kv heads, causal: a LLaMA-style decoder attention.
    fn decoder(p: f64) -> Attention {
        Attention {
            num_heads: 4,
            num_kv_heads: 2,
            causal: true,
            dropout: Dropout::new(p),
        }
    }

    /// Right padding: the second sequence ends two tokens early.
    fn mask(b: usize, t: usize, padded: bool, dtype: DType) -> Tensor {
        let mut m = vec![1u32; b * t];
        if padded {
            m[2 * t - 2..2 * t].fill(0);
        }
        let m = Tensor::from_vec(m, (b, t), &Device::Cpu).unwrap();
        mask_to_additive(&m, dtype).unwrap()
    }

    /// Gradcheck of all three inputs in f64 (the composition path), head_dim 4.
    fn gradcheck(attn: Attention, rope: Option<&Rope>, padded: bool) {
        let (b, t, d) = (2, 5, 4);
        let (cq, ckv) = (attn.num_heads * d, attn.num_kv_heads * d);
        let shape = AttnShape { batch: b, seq: t };
        let mask_add = mask(b, t, padded, DType::F64);
        let (q, k, v) = (
            randn(&[b * t, cq], 41),
            randn(&[b * t, ckv], 42),
            randn(&[b * t, ckv], 43),
        );
        let dy = randn(&[b * t, cq], 44);
        let fwd = |q: &Tensor, k: &Tensor, v: &Tensor, save: bool| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(9);
            let mut pass = Pass::training(&mut rng);
            attn.forward((q, k, v), &mask_add, shape, rope, &mut pass, save)
                .unwrap()
        };
        let (_, saved) = fwd(&q, &k, &v, true);
        let (dq, dk, dv) = saved.unwrap().backward(&attn, &dy).unwrap();
        assert_eq!(
            (dq.dims2().unwrap(), dk.dims2().unwrap()),
            ((b * t, cq), (b * t, ckv))
        );
        check(
            &[q, k, v],
            &dy,
            &[dq, dk, dv],
            |x| Ok(fwd(&x[0], &x[1], &x[2], false).0),
            1e-10,
        );
    }

    fn rope() -> Rope {
        Rope::new(4, 16, 10_000.0, &Device::Cpu).unwrap()
    }

    /// Generation's cached attention, fed 3 + 1 + 2 positions, gives the rows of one causal
    /// pass over all 6 (GQA with rope, and multi-head without).
    #[test]
    fn cached_attention_matches_the_full_causal_pass() {
        let rope = rope();
        let gpt = Attention {
            causal: true,
            ..mha(2, 0.0)
        };
        // f64: the compositions; f32: the fused CPU kernels, queries the last of the keys.
        let cases = [(DType::F64, 1e-12), (DType::F32, 1e-5)];
        for ((attn, rope), (dtype, tol)) in [(decoder(0.0), Some(&rope)), (gpt, None)]
            .into_iter()
            .flat_map(|a| cases.map(|c| (a, c)))
        {
            let (b, t, d) = (2, 6, 4);
            let (cq, ckv) = (attn.num_heads * d, attn.num_kv_heads * d);
            let x = |shape: &[usize], seed| randn(shape, seed).to_dtype(dtype).unwrap();
            let (q, k, v) = (
                x(&[b * t, cq], 51),
                x(&[b * t, ckv], 52),
                x(&[b * t, ckv], 53),
            );
            let shape = AttnShape { batch: b, seq: t };
            let mask_add = mask(b, t, false, dtype);
            let full = Pass::inference(|pass| {
                attn.forward((&q, &k, &v), &mask_add, shape, rope, pass, false)
            })
            .unwrap()
            .0;
            // Rows `start..start + len` of each sequence, batch-major as the layers lay them out.
            let rows = |x: &Tensor, start: usize, len: usize| {
                let c = x.dim(1).unwrap();
                x.reshape((b, t, c))
                    .unwrap()
                    .narrow(1, start, len)
                    .unwrap()
                    .reshape((b * len, c))
                    .unwrap()
            };
            let mut cache = KvCache::default();
            for (start, len) in [(0, 3), (3, 1), (4, 2)] {
                assert_eq!(cache.len(), start);
                let qkv = (
                    &rows(&q, start, len),
                    &rows(&k, start, len),
                    &rows(&v, start, len),
                );
                let got = attn.forward_cached(qkv, b, rope, &mut cache).unwrap();
                let want = rows(&full, start, len);
                assert!(
                    max_abs_diff(&got, &want) < tol,
                    "{dtype:?}: positions {start}..{}",
                    start + len
                );
            }
        }
    }

    #[test]
    fn backward_matches_autograd_and_finite_differences() {
        gradcheck(mha(2, 0.0), None, true);
    }

    #[test]
    fn backward_with_dropout_matches() {
        gradcheck(mha(2, 0.3), None, true);
    }

    #[test]
    fn causal_gqa_rope_backward_matches_with_and_without_padding() {
        let rope = rope();
        gradcheck(decoder(0.0), Some(&rope), false);
        gradcheck(decoder(0.0), Some(&rope), true);
        gradcheck(decoder(0.2), Some(&rope), true);
    }

    #[test]
    fn causal_gqa_without_rope_backward_matches() {
        gradcheck(decoder(0.0), None, true);
    }

    fn fused_matches_composition(attn: Attention, rope: Option<&Rope>) {
        fused_matches_composition_at(attn, rope, 6);
    }

    /// [`fused_matches_composition`] at `t` tokens: above 54 the fused CPU kernels take the
    /// query rows in several blocks (a causal block then multiplies only the keys it sees), and
    /// the rows' dropout masks cross the mask's 4096-element chunks.
    fn fused_matches_composition_at(attn: Attention, rope: Option<&Rope>, t: usize) {
        fused_matches_composition_with(attn, rope, t, None);
    }

    /// [`fused_matches_composition_at`] with, when `bias_batch` is given, a per-head bias
    /// `[bias_batch, heads, t, t]` (MPNet's relative positions) added to the key mask, or in its
    /// place for a bias of batch 1; the fused CPU kernels must take it too.
    fn fused_matches_composition_with(
        attn: Attention,
        rope: Option<&Rope>,
        t: usize,
        bias_batch: Option<usize>,
    ) {
        let f32 = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        let (b, d) = (3, 4);
        let (cq, ckv) = (attn.num_heads * d, attn.num_kv_heads * d);
        let shape = AttnShape { batch: b, seq: t };
        let mut m = vec![1u32; b * t];
        m[t - 1] = 0;
        m[2 * t - 2..2 * t].fill(0);
        let mask = Tensor::from_vec(m, (b, t), &Device::Cpu).unwrap();
        let mut mask_add = mask_to_additive(&mask, DType::F32).unwrap();
        match bias_batch {
            // One bias for the whole batch, no key padding: `[1, heads, t, t]`.
            Some(1) => mask_add = f32(randn(&[1, attn.num_heads, t, t], 5)),
            Some(bb) => {
                let bias = f32(randn(&[bb, attn.num_heads, t, t], 5));
                mask_add = bias.broadcast_add(&mask_add).unwrap();
            }
            None => {}
        }
        let (q, k, v) = (
            f32(randn(&[b * t, cq], 1)),
            f32(randn(&[b * t, ckv], 2)),
            f32(randn(&[b * t, ckv], 3)),
        );
        let dy = f32(randn(&[b * t, cq], 4));
        let run = |fused: bool| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(9);
            let mut pass = Pass::training(&mut rng);
            let qkv = (&q, &k, &v);
            let (y, s) = if fused {
                attn.forward(qkv, &mask_add, shape, rope, &mut pass, true)
            } else {
                attn.forward_reference(qkv, &mask_add, shape, rope, &mut pass, true)
            }
            .unwrap();
            let s = s.unwrap();
            assert_eq!(matches!(s.path, Path::Cpu(_)), fused, "the path taken");
            let (dq, dk, dv) = s.backward(&attn, &dy).unwrap();
            [y, dq, dk, dv]
        };
        for (a, r) in run(true).iter().zip(run(false).iter()) {
            assert!(max_abs_diff(a, r) < 1e-5);
        }
    }

    /// MPNet's relative position bias, per head and row (one for the batch, or one per item as
    /// `BertWithHead::attention_bias` makes it), with dropout, in one block of rows and several.
    #[test]
    fn fused_cpu_path_takes_a_per_head_bias() {
        for t in [6, 130] {
            fused_matches_composition_with(mha(2, 0.2), None, t, Some(1));
            fused_matches_composition_with(mha(3, 0.0), None, t, Some(3));
        }
    }

    #[test]
    fn fused_cpu_path_matches_the_composition() {
        fused_matches_composition(mha(2, 0.2), None);
    }

    #[test]
    fn fused_causal_gqa_rope_path_matches_the_composition() {
        fused_matches_composition(decoder(0.2), Some(&rope()));
        fused_matches_composition(decoder(0.0), Some(&rope()));
    }

    /// f32 on the CPU takes the fused kernels, for the layers' `[b*t, heads*d]` projections
    /// with and without rope, dropout on or off; f64 and tensors autograd tracks do not.
    #[test]
    fn f32_cpu_attention_takes_the_fused_kernels() {
        let (b, t, d) = (2, 5, 4);
        let shape = AttnShape { batch: b, seq: t };
        let run = |attn: Attention, rope: Option<&Rope>, dtype: DType, track: bool| {
            let (cq, ckv) = (attn.num_heads * d, attn.num_kv_heads * d);
            let x = |c, seed| {
                let x = randn(&[b * t, c], seed).to_dtype(dtype).unwrap();
                if track {
                    candle_core::Var::from_tensor(&x)
                        .unwrap()
                        .as_tensor()
                        .clone()
                } else {
                    x
                }
            };
            let (q, k, v) = (x(cq, 1), x(ckv, 2), x(ckv, 3));
            let mask_add = mask(b, t, true, dtype);
            let mut rng = rand::rngs::StdRng::seed_from_u64(4);
            let mut pass = Pass::training(&mut rng);
            let (_, saved) = attn
                .forward((&q, &k, &v), &mask_add, shape, rope, &mut pass, true)
                .unwrap();
            matches!(saved.unwrap().path, Path::Cpu(_))
        };
        let rope = rope();
        for (attn, rope) in [(mha(2, 0.1), None), (decoder(0.0), Some(&rope))] {
            assert!(run(attn, rope, DType::F32, false));
            assert!(!run(attn, rope, DType::F64, false));
            assert!(!run(attn, rope, DType::F32, true));
        }
    }

    #[test]
    fn fused_cpu_blocks_of_query_rows_match_the_composition() {
        let long_rope = Rope::new(4, 400, 10000.0, &Device::Cpu).unwrap();
        fused_matches_composition_at(decoder(0.2), Some(&long_rope), 300);
        fused_matches_composition_at(mha(2, 0.1), None, 300);
    }

    /// bf16 q, k, v and output gradient (the composition, as on a GPU) against f32.
    fn bf16_follows_f32(attn: Attention, rope: Option<&Rope>) {
        let (b, t, d) = (2, 7, 8);
        let (cq, ckv) = (attn.num_heads * d, attn.num_kv_heads * d);
        let shape = AttnShape { batch: b, seq: t };
        let mask_add = mask(b, t, true, DType::F32);
        let bf = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
        let (q, k, v, dy) = (
            bf(randn(&[b * t, cq], 61)),
            bf(randn(&[b * t, ckv], 62)),
            bf(randn(&[b * t, ckv], 63)),
            bf(randn(&[b * t, cq], 64)),
        );
        let run = |dtype: DType| {
            let c = |t: &Tensor| t.to_dtype(dtype).unwrap();
            let mut rng = rand::rngs::StdRng::seed_from_u64(9);
            let mut pass = Pass::training(&mut rng);
            let (y, s) = attn
                .forward(
                    (&c(&q), &c(&k), &c(&v)),
                    &mask_add,
                    shape,
                    rope,
                    &mut pass,
                    true,
                )
                .unwrap();
            let (dq, dk, dv) = s.unwrap().backward(&attn, &c(&dy)).unwrap();
            [y, dq, dk, dv]
        };
        for (h, f) in run(DType::BF16).iter().zip(run(DType::F32).iter()) {
            assert_eq!(h.dtype(), DType::BF16);
            assert!(crate::nn::gradcheck::rel_err(h, f) < 2e-2);
        }
    }

    #[test]
    fn bf16_composition_follows_f32() {
        bf16_follows_f32(mha(2, 0.0), None);
        bf16_follows_f32(
            decoder(0.0),
            Some(&Rope::new(8, 16, 10_000.0, &Device::Cpu).unwrap()),
        );
    }

    #[test]
    fn causal_outputs_do_not_depend_on_later_positions() {
        let attn = decoder(0.0);
        let rope = rope();
        let (b, t, d) = (2, 6, 4);
        let shape = AttnShape { batch: b, seq: t };
        let mask_add = mask(b, t, false, DType::F32);
        let x = |c: usize, seed| randn(&[b * t, c], seed).to_dtype(DType::F32).unwrap();
        let (q, k, v) = (x(4 * d, 1), x(2 * d, 2), x(2 * d, 3));
        // Adds 5 to every feature of rows at positions > j in each sequence.
        let bump = |x: &Tensor, j: usize| {
            let c = x.dim(1).unwrap();
            let mut vals: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            for (row, r) in vals.chunks_mut(c).enumerate() {
                if row % t > j {
                    r.iter_mut().for_each(|v| *v += 5.0);
                }
            }
            Tensor::from_vec(vals, x.shape(), x.device()).unwrap()
        };
        for fused in [true, false] {
            let out = |q: &Tensor, k: &Tensor, v: &Tensor| {
                let mut rng = rand::rngs::StdRng::seed_from_u64(0);
                let mut pass = Pass::evaluating(&mut rng);
                let r = if fused {
                    attn.forward((q, k, v), &mask_add, shape, Some(&rope), &mut pass, false)
                } else {
                    attn.forward_reference(
                        (q, k, v),
                        &mask_add,
                        shape,
                        Some(&rope),
                        &mut pass,
                        false,
                    )
                };
                r.unwrap().0.to_vec2::<f32>().unwrap()
            };
            let base = out(&q, &k, &v);
            for j in 0..t - 1 {
                let moved = out(&bump(&q, j), &bump(&k, j), &bump(&v, j));
                for row in 0..b * t {
                    let d = base[row]
                        .iter()
                        .zip(&moved[row])
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    if row % t <= j {
                        assert!(d < 1e-6, "fused {fused}: position {} moved by {d}", row % t);
                    } else {
                        assert!(d > 1e-3, "fused {fused}: position {} unchanged", row % t);
                    }
                }
            }
        }
    }

    #[test]
    fn rejects_widths_that_do_not_fit_the_heads() {
        let attn = decoder(0.0);
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let mut pass = Pass::evaluating(&mut rng);
        let q = randn(&[5, 16], 1);
        let mask_add = mask(1, 5, false, DType::F64);
        let s = AttnShape { batch: 1, seq: 5 };
        // k as wide as q: 4 kv heads given, 2 declared.
        assert!(attn
            .forward((&q, &q, &q), &mask_add, s, None, &mut pass, false)
            .is_err());
    }

    #[test]
    fn padding_keys_get_no_attention() {
        // Changing the value of a padded token must not change any output.
        let attn = mha(1, 0.0);
        let mask = Tensor::from_vec(vec![1u32, 1, 0], (1, 3), &Device::Cpu).unwrap();
        let mask_add = mask_to_additive(&mask, DType::F64).unwrap();
        let q = randn(&[3, 4], 1);
        let v1 = randn(&[3, 4], 2);
        let mut vals: Vec<f64> = v1.flatten_all().unwrap().to_vec1().unwrap();
        vals[8..].iter_mut().for_each(|x| *x += 100.0);
        let v2 = Tensor::from_vec(vals, (3, 4), &Device::Cpu).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let mut pass = Pass::evaluating(&mut rng);
        let s = AttnShape { batch: 1, seq: 3 };
        let a = attn
            .forward((&q, &q, &v1), &mask_add, s, None, &mut pass, false)
            .unwrap()
            .0;
        let b = attn
            .forward((&q, &q, &v2), &mask_add, s, None, &mut pass, false)
            .unwrap()
            .0;
        assert!(max_abs_diff(&a, &b) < 1e-12);
    }
}
