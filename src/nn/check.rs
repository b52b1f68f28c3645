//! Fused kernels against their candle compositions, on any device: what `safetune self-test`
//! runs (on a GPU it checks the CUDA kernels of `gpu.rs`, on the CPU those of `cpu.rs`; a unit test
//! runs it on the CPU). Each check returns the relative L2 error of the fused result against the
//! composition's.

use super::attention::{mask_to_additive, Attention, AttnShape};
use super::gelu::{self, GeluKind};
use super::linear::Weight;
use super::norm::Norm;
use super::rope::Rope;
use super::{dropout, swiglu, Dropout, Pass};
use crate::nn::optim::{AdamW, AdamWConfig};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub dtype: String,
    /// `||fused - composition|| / ||composition||`.
    pub rel_err: f64,
    pub tol: f64,
    pub ok: bool,
}

impl Check {
    /// A line for information (a timing or a size in `value`), which always passes.
    fn info(name: String, dtype: &str, value: f64) -> Self {
        Self {
            name,
            dtype: dtype.into(),
            rel_err: value,
            tol: 1e12,
            ok: true,
        }
    }
}

fn rel(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (a.to_dtype(DType::F64)?, b.to_dtype(DType::F64)?);
    let norm = |t: &Tensor| -> Result<f64> { Ok(t.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt()) };
    Ok(norm(&(&a - &b)?)? / norm(&b)?.max(1e-30))
}

/// Uniform(-1, 1) values from a seeded host RNG, scaled and shifted, on `device` in `dtype`.
fn rand(
    shape: &[usize],
    seed: u64,
    scale: f64,
    shift: f64,
    dtype: DType,
    dev: &Device,
) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| (rng.random_range(-1.0..1.0) * scale + shift) as f32)
        .collect();
    Tensor::from_vec(v, shape, dev)?.to_dtype(dtype)
}

/// One attention check: `batch` sequences of `seq` tokens, the second with its last `pad` keys
/// masked, and the inputs and output gradient the caller drew.
struct AttentionCase<'a> {
    attn: Attention,
    mask: Tensor,
    shape: AttnShape,
    rope: Option<&'a Rope>,
    qkv: [Tensor; 3],
    dy: Tensor,
}

impl AttentionCase<'_> {
    /// The attention and key mask of `heads` query and `kv` key/value heads.
    fn attention_and_mask(
        (batch, seq, heads, kv, causal): (usize, usize, usize, usize, bool),
        pad: usize,
        device: &Device,
    ) -> Result<(Attention, Tensor)> {
        let attn = Attention {
            num_heads: heads,
            num_kv_heads: kv,
            causal,
            dropout: Dropout::new(0.0),
        };
        let mut m = vec![1u32; batch * seq];
        m[2 * seq - pad..2 * seq].fill(0);
        let mask = mask_to_additive(&Tensor::from_vec(m, (batch, seq), device)?, DType::F32)?;
        Ok((attn, mask))
    }

    /// Output, dq, dk and dv through the fused path (`fused`) or the composition, the inputs in
    /// `dt`; and whether the flash kernels ran.
    fn run(&self, fused: bool, dt: DType) -> Result<([Tensor; 4], bool)> {
        let mut rng = StdRng::seed_from_u64(0);
        let mut pass = Pass::training(&mut rng);
        let c = |x: &Tensor| x.to_dtype(dt);
        let [q, k, v] = &self.qkv;
        let qkv = (&c(q)?, &c(k)?, &c(v)?);
        let (a, mask, shape, rope) = (&self.attn, &self.mask, self.shape, self.rope);
        let (y, s) = if fused {
            a.forward(qkv, mask, shape, rope, &mut pass, true)?
        } else {
            a.forward_reference(qkv, mask, shape, rope, &mut pass, true)?
        };
        let s = s.expect("saved");
        let flash = s.used_flash();
        let (dq, dk, dv) = s.backward(a, &c(&self.dy)?)?;
        Ok(([y, dq, dk, dv], flash))
    }
}

/// Runs every check on `device` with activations of `dtype` (f32 or bf16).
pub fn fused_against_reference(device: &Device, dtype: DType) -> Result<Vec<Check>> {
    let tol = if dtype == DType::F32 { 1e-4 } else { 2e-2 };
    let dname = format!("{dtype:?}").to_lowercase();
    let mut out = Vec::new();
    let mut push = |name: &str, e: f64| {
        out.push(Check {
            name: name.into(),
            dtype: dname.clone(),
            rel_err: e,
            tol,
            ok: e <= tol,
        })
    };
    let r = |shape: &[usize], seed, scale, shift| rand(shape, seed, scale, shift, dtype, device);

    // LayerNorm and RMSNorm, BERT-base and LLaMA widths, and one that is not a multiple of 8 (the
    // kernels' element-at-a-time path).
    for c in [768, 4096, 103] {
        let x = r(&[64, c], 1, 3.0, 0.5)?;
        let dy = r(&[64, c], 2, 1.0, 0.0)?;
        let ln = Norm::layer(r(&[c], 3, 1.0, 1.0)?, r(&[c], 4, 1.0, 0.0)?, 1e-12);
        let (yf, sf) = ln.forward(&x, true)?;
        let (yr, sr) = ln.forward_reference(&x, true)?;
        push(&format!("layer_norm forward c={c}"), rel(&yf, &yr)?);
        let (sf, sr) = (sf.expect("saved"), sr.expect("saved"));
        push(
            &format!("layer_norm backward c={c}"),
            rel(&sf.backward(&ln, &dy)?, &sr.backward_reference(&ln, &dy)?)?,
        );
        // With a residual branch's gradient joined in the kernel (`backward_adding`).
        let res = r(&[64, c], 9, 1.0, 0.0)?;
        let want = (&res + sr.backward_reference(&ln, &dy)?)?;
        push(
            &format!("layer_norm backward + residual c={c}"),
            rel(&sf.backward_adding(&ln, &dy, &res)?, &want)?,
        );
        let rms = Norm::rms(r(&[c], 5, 1.0, 1.0)?, 1e-6);
        let (yf, sf) = rms.forward(&x, true)?;
        let (yr, sr) = rms.forward_reference(&x, true)?;
        push(&format!("rms_norm forward c={c}"), rel(&yf, &yr)?);
        let (sf, sr) = (sf.expect("saved"), sr.expect("saved"));
        push(
            &format!("rms_norm backward c={c}"),
            rel(&sf.backward(&rms, &dy)?, &sr.backward_reference(&rms, &dy)?)?,
        );
        let want = (&res + sr.backward_reference(&rms, &dy)?)?;
        push(
            &format!("rms_norm backward + residual c={c}"),
            rel(&sf.backward_adding(&rms, &dy, &res)?, &want)?,
        );
    }

    // GELU (both forms) and SwiGLU, elementwise.
    let x = r(&[96, 3072], 6, 4.0, 0.0)?;
    let up = r(&[96, 3072], 7, 2.0, 0.0)?;
    let dy = r(&[96, 3072], 8, 1.0, 0.0)?;
    for (kind, name) in [(GeluKind::Erf, "erf"), (GeluKind::Tanh, "tanh")] {
        let (y, saved) = gelu::forward_kind(&x, kind, true)?;
        push(
            &format!("gelu {name} forward"),
            rel(&y, &gelu::forward_reference(&x, kind)?)?,
        );
        let saved = saved.expect("saved");
        let reference = saved.backward_reference(&dy)?;
        push(
            &format!("gelu {name} backward"),
            rel(&saved.backward(&dy)?, &reference)?,
        );
    }
    // The bias and residual adds (CUDA kernels only; elsewhere they are candle's ops).
    let bias = r(&[3072], 9, 1.0, 0.0)?;
    if let Some(y) = super::gpu::bias_add(&x, &bias)? {
        push("bias add", rel(&y, &x.broadcast_add(&bias)?)?);
    }
    if let Some(y) = super::gpu::add(&x, &up)? {
        push("add", rel(&y, &(&x + &up)?)?);
    }
    // SwiGLU, also at a width that is not a multiple of 8.
    for (x, up, dy, tag) in [
        (x.clone(), up.clone(), dy.clone(), ""),
        (
            r(&[7, 103], 61, 3.0, 0.5)?,
            r(&[7, 103], 62, 2.0, 0.0)?,
            r(&[7, 103], 63, 1.0, 0.0)?,
            " c=103",
        ),
    ] {
        let (y, saved) = swiglu::forward(&x, &up, true)?;
        push(
            &format!("swiglu forward{tag}"),
            rel(&y, &swiglu::forward_reference(&x, &up)?)?,
        );
        let saved = saved.expect("saved");
        let (dgr, dur) = saved.backward_reference(&dy)?;
        let (dg, du) = saved.backward(&dy)?;
        push(&format!("swiglu backward gate{tag}"), rel(&dg, &dgr)?);
        push(&format!("swiglu backward up{tag}"), rel(&du, &dur)?);
    }

    // A LoRA adapter's thin products (`flops::matmul_scaled`: on CUDA the thin-product kernels
    // at ranks 1-8, else one cuBLAS call, with the scale and the f32 output folded in) against
    // the product, the scale and the cast, in each of their four forms: `x A^T` (a transposed
    // view) and `dy B` in the activations' dtype, `dy^T U` and `dxa^T x` into f32. Ranks 12 and
    // 16 take cuBLAS.
    for rank in [1, 2, 4, 8, 12, 16] {
        let (x, a) = (r(&[300, 96], 65, 1.0, 0.0)?, r(&[rank, 96], 66, 1.0, 0.0)?);
        let (dy, b) = (r(&[300, 40], 67, 1.0, 0.0)?, r(&[40, rank], 70, 1.0, 0.0)?);
        let mut product = |name: &str, p: &Tensor, q: &Tensor, alpha: f64, out: DType| {
            let want = super::flops::matmul(p, q)?
                .affine(alpha, 0.0)?
                .to_dtype(out)?;
            let got = super::flops::matmul_scaled(p, q, alpha, out)?;
            push(&format!("lora {name} r{rank}"), rel(&got, &want)?);
            Ok::<_, candle_core::Error>(got)
        };
        let u = product("x A^T scaled", &x, &a.t()?, 2.5, dtype)?;
        let dxa = product("dy B scaled", &dy, &b, 2.5, dtype)?;
        product("dy^T U into f32", &dy.t()?, &u, 1.0, DType::F32)?;
        product("dxa^T x into f32", &dxa.t()?, &x, 1.0, DType::F32)?;
    }

    // The LM head's loss (`nn::loss::lm_head_loss`: the fused cross-entropy on CUDA and the CPU,
    // the ignored rows' gradient placed by runs) against the candle composition, with two
    // sequences' last rows ignored and chunks that split them.
    {
        let (rows, width, vocab) = (70, 64, 1000);
        let hidden = r(&[rows, width], 68, 1.0, 0.0)?;
        let head = r(&[vocab, width], 69, 0.5, 0.0)?;
        let targets: Vec<i64> = (0..rows)
            .map(|i| match i {
                34 | 69 => super::loss::IGNORE_INDEX,
                _ => (i as i64 * 37) % vocab as i64,
            })
            .collect();
        let fused = super::loss::lm_head_loss(&hidden, &head, &targets, 16, true)?;
        let reference = super::loss::lm_head_loss_reference(&hidden, &head, &targets, 16)?;
        push(
            "lm head loss",
            (fused.loss_sum - reference.loss_sum).abs() / reference.loss_sum.abs(),
        );
        let (dh, dh_ref) = (fused.dhidden, reference.dhidden);
        let (dh, dh_ref) = (dh.expect("asked"), dh_ref.expect("asked"));
        push("lm head loss gradient", rel(&dh, &dh_ref)?);
    }

    // Rotary embedding (one fused kernel on CUDA) against the composition on the CPU: a
    // projection's output viewed as heads and rotated from position 3, and the gradient merged
    // back into the projection's layout.
    let (b, t, h, d) = (2, 40, 4, 64);
    let cpu = Device::Cpu;
    let rope = Rope::new(d, 64, 10_000.0, device)?;
    let rope_cpu = Rope::new(d, 64, 10_000.0, &cpu)?;
    let heads = |x: &Tensor| x.reshape((b, t, h, d))?.transpose(1, 2);
    let (x, dy) = (
        r(&[b * t, h * d], 13, 1.0, 0.0)?,
        r(&[b, h, t, d], 14, 1.0, 0.0)?,
    );
    let (x_cpu, dy_cpu) = (x.to_device(&cpu)?, dy.to_device(&cpu)?);
    let y = rope.apply(&heads(&x)?, 3)?.to_device(&cpu)?;
    push(
        "rope forward",
        rel(&y, &rope_cpu.apply(&heads(&x_cpu)?, 3)?)?,
    );
    let dx = rope.apply_backward_merged(&dy, 3)?.to_device(&cpu)?;
    let dx_ref = rope_cpu.apply_backward_merged(&dy_cpu, 3)?;
    push("rope backward, heads merged", rel(&dx, &dx_ref)?);

    // Attention: BERT-like (padding) and LLaMA-like (causal, grouped-query, rope).
    let cases = [
        ("attention mha padded", 4, 64, 4, 4, false, 32),
        ("attention causal gqa rope", 2, 48, 8, 2, true, 32),
    ];
    for (name, b, t, heads, kv, causal, d) in cases {
        let (attn, mask) = AttentionCase::attention_and_mask((b, t, heads, kv, causal), 5, device)?;
        let rope = Rope::new(d, t, 10_000.0, device)?;
        let case = AttentionCase {
            attn,
            mask,
            shape: AttnShape { batch: b, seq: t },
            rope: causal.then_some(&rope),
            qkv: [
                r(&[b * t, heads * d], 9, 1.0, 0.0)?,
                r(&[b * t, kv * d], 10, 1.0, 0.0)?,
                r(&[b * t, kv * d], 11, 1.0, 0.0)?,
            ],
            dy: r(&[b * t, heads * d], 12, 1.0, 0.0)?,
        };
        let (f, c) = (case.run(true, dtype)?.0, case.run(false, dtype)?.0);
        for (i, part) in ["output", "dq", "dk", "dv"].iter().enumerate() {
            push(&format!("{name} {part}"), rel(&f[i], &c[i])?);
        }
    }

    // Flash attention (the fused kernels on CUDA in bf16; elsewhere, or in f32, the same paths as
    // above) against the bf16 composition and against the f32 composition of the same (bf16)
    // inputs, at BERT-, LLaMA- (grouped-query, rope) and GPT-2-like head shapes, sequence lengths
    // that are not multiples of the kernels' tiles, one sequence right-padded.
    let flash_cases = [
        ("bert-like padded 12h d64", 2, 200, 12, 12, false, 64),
        (
            "llama-like causal gqa 8/2 d128 rope",
            2,
            300,
            8,
            2,
            true,
            128,
        ),
        ("gpt2-like causal 12h d64", 2, 130, 12, 12, true, 64),
    ];
    for (name, b, t, heads, kv, causal, d) in flash_cases {
        let (attn, mask) =
            AttentionCase::attention_and_mask((b, t, heads, kv, causal), 37, device)?;
        let rope = Rope::new(d, t, 10_000.0, device)?;
        let case = AttentionCase {
            attn,
            mask,
            shape: AttnShape { batch: b, seq: t },
            rope: (kv < heads).then_some(&rope),
            qkv: [
                r(&[b * t, heads * d], 21, 2.0, 0.0)?,
                r(&[b * t, kv * d], 22, 2.0, 0.0)?,
                r(&[b * t, kv * d], 23, 1.0, 0.0)?,
            ],
            dy: r(&[b * t, heads * d], 24, 1.0, 0.0)?,
        };
        let (f, flash) = case.run(true, dtype)?;
        let (c, _) = case.run(false, dtype)?;
        let (c32, _) = case.run(false, DType::F32)?;
        let kind = if flash { "flash" } else { "fallback" };
        for (i, part) in ["output", "dq", "dk", "dv"].iter().enumerate() {
            push(
                &format!("attention {kind} {name} {part} vs composition"),
                rel(&f[i], &c[i])?,
            );
            push(
                &format!("attention {kind} {name} {part} vs f32 composition"),
                rel(&f[i], &c32[i])?,
            );
            push(
                &format!("  (composition {name} {part} vs f32 composition)"),
                rel(&c[i], &c32[i])?,
            );
        }
    }

    // A quantized base weight as the matmuls get it (`Weight::dense`: the CUDA kernel for these
    // formats) against the host's dequantization of the same blocks (candle quantizes on the host
    // for every device, so the blocks are identical).
    for fmt in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let w = rand(&[256, 512], 15, 0.05, 0.01, DType::F32, device)?;
        let q = std::sync::Arc::new(QTensor::quantize(&w, fmt)?);
        let used = Weight::Quantized { q, dtype }.dense()?.into_owned();
        let host = QTensor::quantize(&w.to_device(&Device::Cpu)?, fmt)?
            .dequantize(&Device::Cpu)?
            .to_dtype(dtype)?;
        push(
            &format!("dequantize {fmt:?}"),
            rel(&used.to_device(&Device::Cpu)?, &host)?,
        );
    }

    // Dropout: the mask the device draws against the host's from the same seeds (they must be
    // identical: a run is the same on any device), and its output against `x * keep * scale`.
    // Several seeds and a partial last chunk; the second length takes the kernels' 16-byte path.
    for n in [3 * 4096 + 123, 2 * 4096 + 64] {
        let x = r(&[n], 16, 1.0, 0.0)?;
        let mut rng = StdRng::seed_from_u64(17);
        let mut pass = Pass::training(&mut rng);
        let (y, saved) = Dropout::new(0.1).forward(&x, &mut pass, true)?;
        // The device's mask, as its backward redraws it: kept where the gradient of ones is not 0.
        let ones = x.ones_like()?;
        let keep = saved.expect("saved").backward(&ones)?.ne(0.0)?;
        let keep = keep.to_device(&Device::Cpu)?;
        let mut rng = StdRng::seed_from_u64(17);
        let seeds = dropout::mask_seeds(&mut rng, n);
        let host = dropout::host_mask(&seeds, n, dropout::keep_threshold(0.1));
        let differ = keep
            .to_vec1::<u8>()?
            .iter()
            .zip(&host)
            .filter(|(a, b)| a != b)
            .count();
        push(
            &format!("dropout mask n={n} (differing elements)"),
            differ as f64,
        );
        let want = (x.to_device(&Device::Cpu)?
            * Tensor::new(host, &Device::Cpu)?.to_dtype(dtype)?)?
        .affine(1.0 / 0.9, 0.0)?;
        push(
            &format!("dropout output n={n}"),
            rel(&y.to_device(&Device::Cpu)?, &want)?,
        );
    }

    // A linear's input gradient added onto another's (`Linear::backward_input_onto`: cuBLAS with
    // beta = 1 on CUDA; false elsewhere, where the caller adds) against the product and the add.
    {
        let (acc, dy) = (r(&[300, 96], 24, 1.0, 0.0)?, r(&[300, 40], 25, 1.0, 0.0)?);
        let linear = super::linear::Linear::new(r(&[40, 96], 26, 0.5, 0.0)?, None);
        let want = super::add(&acc, &linear.backward_input(&dy)?)?;
        let acc = acc.copy()?;
        if linear.backward_input_onto(&dy, &acc)? {
            push("linear dx onto an accumulator", rel(&acc, &want)?);
        }
    }

    // A rank-r update added into a fresh output (`add_low_rank`: in place on CUDA, by the
    // thin-update kernel at ranks 1-8, else cuBLAS with beta = 1) against the product and the
    // add, with `w` as `[out, r]` (a LoRA forward) and as `[r, out]` (its input gradient).
    for (w_t, rank) in [(true, 8), (false, 8), (true, 1), (false, 2), (true, 16)] {
        let y = r(&[256, 512], 21, 1.0, 0.0)?;
        let u = r(&[256, rank], 22, 1.0, 0.0)?;
        let w = if w_t {
            r(&[512, rank], 23, 0.5, 0.0)?
        } else {
            r(&[rank, 512], 23, 0.5, 0.0)?
        };
        let product = if w_t {
            u.matmul(&w.t()?)?
        } else {
            u.matmul(&w)?
        };
        let composed = super::add(&y, &product)?;
        let fused = super::add_low_rank(y.copy()?, &u, &w, w_t)?;
        let name = if w_t { "y + u w^T" } else { "y + u w" };
        push(
            &format!("add_low_rank {name} r{rank}"),
            rel(&fused, &composed)?,
        );
    }

    // SAFE's CKA terms in the Gram form (`cka::gram_terms`, fused on CUDA around a TF32 product)
    // against the candle composition on the same rows in f64, each block of terms to 2e-3 of its
    // scale, at a LLaMA-7B q/v adapter's width with padding rows left out and with every row, and
    // with rows far from centred; the FLOPs each counts must agree too.
    // An adapted linear's rows `y` `[tokens, d]` (mean `y_mean`) and `u` `[tokens, rank]`, its
    // `b` `[d, rank]` (f32) and `keep` token rows spread over the tokens, drawn from `seed` on.
    let cka_rows = |tokens: usize, keep: usize, d: usize, rank: usize, y_mean: f64, seed: u64| {
        let y = r(&[tokens, d], seed, 2.0, y_mean)?;
        let u = r(&[tokens, rank], seed + 1, 1.0, -0.2)?;
        let b = rand(&[d, rank], seed + 2, 0.05, 0.0, DType::F32, device)?;
        let rows: Vec<u32> = (0..keep as u32)
            .map(|i| i * tokens as u32 / keep as u32)
            .collect();
        Ok::<_, candle_core::Error>((y, u, b, Tensor::new(rows, device)?))
    };
    // Rows uniform over +-2 about 0.3, and about 5 (the mean 4.3 times the spread).
    for (tokens, keep, y_mean) in [(96, 80, 0.3), (512, 512, 0.3), (512, 512, 5.0)] {
        let (d, rank) = (4096, 8);
        let (y, u, b, rows) = cka_rows(tokens, keep, d, rank, y_mean, 18)?;
        let pick = |t: &Tensor| super::cka::pick_rows(t, &rows);
        let what = format!("cka gram terms {keep} of {tokens} rows, mean {y_mean}");
        out.extend(cka_checks(
            &format!("{what}, d {d}, r {rank}"),
            &format!("{what}: FLOPs counted, difference"),
            &dname,
            (|f: &Tensor, c: &Tensor| gram_terms_err(f, c, rank), 2e-3),
            || super::cka::gram_terms(&y, &u, &b, &rows),
            || super::cka::gram_terms_composed(&pick(&y)?, &pick(&u)?, &b.to_dtype(DType::F64)?),
        )?);
    }

    // Two adapters' Gram terms in one call (`cka::gram_terms_batch`, one set of the fused
    // kernels' launches on CUDA) against each alone: the same arithmetic, so the same bits, and
    // the same FLOPs counted.
    for (tokens, keep) in [(96, 80), (512, 512)] {
        let (d, rank) = (4096, 8);
        let first = cka_rows(tokens, keep, d, rank, 0.3, 18)?;
        let second = cka_rows(tokens, keep, d, rank, -1.0, 30)?;
        let rows = &first.3;
        let items = [
            (&first.0, &first.1, &first.2),
            (&second.0, &second.1, &second.2),
        ];
        out.extend(cka_checks(
            &format!("cka gram terms of 2 adapters in one call vs alone, {keep} of {tokens} rows"),
            &format!("cka gram terms of 2 adapters in one call, {keep} of {tokens} rows: FLOPs counted, difference"),
            &dname,
            (rel, 0.0),
            || Tensor::stack(&super::cka::gram_terms_batch(&items, rows)?, 0),
            || {
                let alone: Result<Vec<Tensor>> = items
                    .iter()
                    .map(|&(y, u, b)| super::cka::gram_terms(y, u, b, rows))
                    .collect();
                Tensor::stack(&alone?, 0)
            },
        )?);
    }

    // SAFE's CKA norms from the moment form's low-rank moments (`cka::LowRankMoments::norms`,
    // fused on CUDA) against their composition, at MiniLM's q/v adapter (d 384, r 8) over 2,048
    // rows, and at a wider, higher-rank one; the FLOPs each counts must agree too.
    for (n, d, rank) in [(2048, 384, 8), (700, 1000, 64)] {
        let f64s = |t: Tensor| t.to_dtype(DType::F64);
        let y = f64s(r(&[n, d], 24, 2.0, 0.3)?)?;
        let u = f64s(r(&[n, rank], 25, 1.0, -0.2)?)?;
        let b = f64s(rand(&[d, rank], 26, 0.05, 0.0, DType::F32, device)?)?;
        let mm = |a: &Tensor, b: &Tensor| a.t()?.matmul(b)?.contiguous();
        let m = super::cka::LowRankMoments {
            n,
            sum_y: y.sum(0)?,
            sum_u: u.sum(0)?,
            yty: mm(&y, &y)?,
            ytu: mm(&y, &u)?,
            utu: mm(&u, &u)?,
            b,
        };
        out.extend(cka_checks(
            &format!("cka moment norms {n} rows, d {d}, r {rank}"),
            &format!("cka moment norms d {d}, r {rank}: FLOPs counted, difference"),
            &dname,
            (rel, 1e-10),
            || m.norms(),
            || m.norms_composed(),
        )?);
    }

    // The moment form from the rows (`cka::low_rank_norms`: on CUDA one gather kernel, one
    // symmetric product for the three moments and the norm kernels) against the composition of
    // `LowRankMoments::of_rows` and its norms, at MiniLM's q/v adapter with padding rows left
    // out; the FLOPs each counts must agree too.
    {
        let (tokens, keep, d, rank) = (2100, 2048, 384, 8);
        let (y, u, b, rows) = cka_rows(tokens, keep, d, rank, 0.3, 27)?;
        out.extend(cka_checks(
            &format!("cka low-rank norms {keep} of {tokens} rows, d {d}, r {rank}"),
            &format!("cka low-rank norms {keep} of {tokens} rows: FLOPs counted, difference"),
            &dname,
            (rel, 1e-10),
            || super::cka::low_rank_norms(&y, &u, &b, &rows),
            || super::cka::LowRankMoments::of_rows(&y, &u, &b, &rows)?.norms_composed(),
        )?);
    }

    // AdamW: three updates of an f32 parameter (trained tensors are f32 whatever the dtype).
    let p0 = rand(&[64, 768], 13, 0.1, 0.0, DType::F32, device)?;
    let (mut pf, mut pr) = (p0.clone(), p0);
    let cfg = AdamWConfig {
        weight_decay: 0.01,
        ..Default::default()
    };
    let (mut of, mut or) = (AdamW::new(cfg.clone()), AdamW::new(cfg));
    for step in 0..3 {
        let g = rand(&[64, 768], 14 + step, 1e-2, 0.0, DType::F32, device)?;
        pf = of.update("w", &pf, &g, 1e-3)?;
        pr = or.update_reference("w", &pr, &g, 1e-3)?;
    }
    let e = rel(&pf, &pr)?;
    out.push(Check {
        name: "adamw 3 updates".into(),
        dtype: "f32".into(),
        rel_err: e,
        tol: 1e-6,
        ok: e <= 1e-6,
    });
    // AdamW on several parameters at once (`update_many`: one kernel on CUDA, which also writes
    // the bf16 copies asked for), gradients scaled as clipping does, against each parameter's
    // reference update of the scaled gradient; the copies against a cast of the new values.
    {
        let shapes: [&[usize]; 4] = [&[8, 384], &[384, 8], &[5, 37], &[1]];
        let cfg = AdamWConfig::default();
        let (mut om, mut or) = (AdamW::new(cfg.clone()), AdamW::new(cfg));
        let mut ps = Vec::new();
        for (i, sh) in shapes.iter().enumerate() {
            ps.push(rand(sh, 40 + i as u64, 0.1, 0.0, DType::F32, device)?);
        }
        let mut refs = ps.clone();
        let (mut e, mut e_low, mut lows) = (0f64, 0f64, 0);
        for step in 0..3u64 {
            let mut items = Vec::new();
            for (i, p) in ps.iter().enumerate() {
                let g = rand(
                    p.dims(),
                    50 + 10 * step + i as u64,
                    1e-2,
                    0.0,
                    DType::F32,
                    device,
                )?;
                refs[i] = or.update_reference(i, &refs[i], &(&g * 0.3)?, 1e-3)?;
                let low = (i % 2 == 0).then_some(DType::BF16);
                items.push(super::optim::ParamUpdate {
                    key: i,
                    param: p.clone(),
                    grad: g,
                    low,
                });
            }
            let new = om.update_many(items, 1e-3, 0.3)?;
            for (i, u) in new.into_iter().enumerate() {
                e = e.max(rel(&u.param, &refs[i])?);
                if let Some(low) = &u.low {
                    e_low = e_low.max(rel(low, &u.param.to_dtype(DType::BF16)?)?);
                    lows += 1;
                }
                ps[i] = u.param;
            }
        }
        // Clipping's global norm (on CUDA one kernel of f64 sums) against the f64 composition.
        let grads = ps
            .iter()
            .enumerate()
            .map(|(i, p)| Ok((i, (p * 3.0)?)))
            .collect::<Result<Vec<_>>>()?;
        let (norm, _) = super::optim::clip_factor(&grads, 0.0)?;
        let mut sq = 0f64;
        for (_, g) in &grads {
            sq += g
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
        let e_norm = (norm - sq.sqrt()).abs() / sq.sqrt();
        out.push(Check {
            name: "gradient clipping's global norm, 4 tensors".into(),
            dtype: "f32".into(),
            rel_err: e_norm,
            tol: 1e-6,
            ok: e_norm <= 1e-6,
        });
        out.push(Check {
            name: "adamw many: 4 parameters, 3 updates, scaled gradients".into(),
            dtype: "f32".into(),
            rel_err: e,
            tol: 1e-6,
            ok: e <= 1e-6,
        });
        // The even parameters' copies over the 3 steps (on CUDA written by the kernel).
        out.push(Check {
            name: format!("adamw many: bf16 copies written ({lows} of 6) against the cast"),
            dtype: "bf16".into(),
            rel_err: e_low,
            tol: 0.0,
            ok: e_low == 0.0 && lows == 6,
        });
    }
    // Activation offload: a state's tensors go to the host and come back bit for bit (f32, bf16
    // and a narrowed view among them); on CUDA the pool frees what moved once released.
    if dtype == DType::F32 {
        let (e, moved, freed, storages) = offload_round_trip(device)?;
        out.push(Check {
            name: "activation offload: tensors back bit for bit".into(),
            dtype: "f32+bf16".into(),
            rel_err: e,
            tol: 0.0,
            ok: e == 0.0,
        });
        if device.is_cuda() {
            let err = (freed as f64 - storages as f64).abs() / storages as f64;
            out.push(Check {
                name: format!(
                    "activation offload: {moved} bytes moved, the pool frees their {storages} \
                     bytes of storage"
                ),
                dtype: "f32+bf16".into(),
                rel_err: err,
                tol: 0.01,
                ok: err <= 0.01,
            });
        }
    }
    // The memory claim: at LLaMA-7B's attention shape (32 heads, d 128, causal) and 4096 tokens,
    // forward + backward through the flash kernels allocate far less than one `[heads, T, T]`
    // score tensor (1 GiB in bf16; the composition holds f32 ones). In MB above the inputs,
    // against a limit of a quarter of that tensor; the composition's figure beside it.
    if device.is_cuda() && dtype == DType::BF16 {
        let (flash_mb, used) = attention_peak_mb(device, true)?;
        if used {
            let (comp_mb, _) = attention_peak_mb(device, false)?;
            out.push(Check {
                name: "attention flash T=4096 32h d128 causal: peak MB above inputs".into(),
                dtype: dname.clone(),
                rel_err: flash_mb,
                tol: 256.0,
                ok: flash_mb <= 256.0,
            });
            out.push(Check::info(
                "  (the composition's peak MB, same call)".into(),
                &dname,
                comp_mb,
            ));
            // What the memory plan counts for SAFE's fused Gram terms against the pool, for
            // one adapter and for a call that measures two.
            for count in [1, 2] {
                let (peak, counted) = cka_gram_peak(device, count)?;
                let err = (peak as f64 - counted as f64).abs() / counted as f64;
                out.push(Check {
                    name: format!(
                        "cka gram terms of {count} adapter(s), 512 rows d 4096 r 8: pool peak vs \
                         gpu::cka_gram_bytes"
                    ),
                    dtype: dname.clone(),
                    rel_err: err,
                    tol: 0.1,
                    ok: err <= 0.1,
                });
            }
            // SAFE's measurement at a 7B q/v adapter over 512 token rows, ms a call (20 calls
            // queued back to back), for information: one adapter fused, two in one call, one
            // composed.
            for kind in [
                GramTiming::Fused,
                GramTiming::FusedPair,
                GramTiming::Composed,
            ] {
                out.push(Check::info(
                    format!("  (timing: cka gram terms 512 rows d 4096 r 8, {kind:?} ms)"),
                    &dname,
                    cka_gram_ms(device, kind)?,
                ));
            }
            // The moment form's norms at MiniLM's q/v adapter (d 384, r 8), ms a call.
            for (fused, kind) in [(true, "fused"), (false, "composition")] {
                out.push(Check::info(
                    format!("  (timing: cka moment norms d 384 r 8, {kind} ms)"),
                    &dname,
                    cka_moment_ms(device, fused)?,
                ));
            }
            // The moment form from a batch's rows at MiniLM's q/v adapter, ms a call: fused
            // from the rows, the moments composed then the fused norms, all composed.
            for kind in ["fused", "moments then fused norms", "composition"] {
                out.push(Check::info(
                    format!("  (timing: cka low-rank norms 2048 rows d 384 r 8, {kind} ms)"),
                    &dname,
                    cka_low_rank_ms(device, kind)?,
                ));
            }
            // A LoRA adapter's thin products at a LLaMA-7B q adapter (1,024 rows, width 4,096),
            // ms a call: the thin kernels, and cuBLAS's product alone.
            for (name, ms) in thin_ms(device)? {
                out.push(Check::info(
                    format!("  (timing: lora {name} 1024 x 4096 ms)"),
                    &dname,
                    ms,
                ));
            }
            // Timings, for information (ms of one forward / backward, median of 5).
            // The reference composition builds its causal mask on the host each call, so its
            // figure is not the fallback's (`SAFETUNE_FLASH=0`: the fused softmax kernels).
            for (fused, kind) in [(true, "flash"), (false, "reference composition")] {
                let (f, b) = attention_ms(device, fused)?;
                for (part, ms) in [("forward", f), ("backward", b)] {
                    out.push(Check::info(
                        format!("  (timing: {kind} T=4096 32h d128 causal {part} ms)"),
                        &dname,
                        ms,
                    ));
                }
            }
        }
    }
    Ok(out)
}

/// What [`cka_gram_ms`] times: one adapter's fused terms, two adapters' in one call, or one
/// adapter's composition.
#[derive(Clone, Copy, Debug)]
enum GramTiming {
    Fused,
    FusedPair,
    Composed,
}

/// Milliseconds a call of SAFE's Gram-form CKA terms takes at a LLaMA-7B q/v adapter (512 rows,
/// width 4096, rank 8, bf16 rows), 20 calls queued back to back after 3 to warm up.
fn cka_gram_ms(device: &Device, kind: GramTiming) -> Result<f64> {
    let y = rand(&[512, 4096], 41, 1.0, 0.0, DType::BF16, device)?;
    let u = rand(&[512, 8], 42, 1.0, 0.0, DType::BF16, device)?;
    let b = rand(&[4096, 8], 43, 0.05, 0.0, DType::F32, device)?;
    let y2 = rand(&[512, 4096], 47, 1.0, 0.0, DType::BF16, device)?;
    let rows = Tensor::arange(0u32, 512, device)?;
    let call = || -> Result<Tensor> {
        match kind {
            GramTiming::Fused => super::cka::gram_terms(&y, &u, &b, &rows),
            GramTiming::FusedPair => {
                let items = [(&y, &u, &b), (&y2, &u, &b)];
                Ok(super::cka::gram_terms_batch(&items, &rows)?.remove(0))
            }
            GramTiming::Composed => {
                let pick = |t: &Tensor| super::cka::pick_rows(t, &rows);
                super::cka::gram_terms_composed(&pick(&y)?, &pick(&u)?, &b.to_dtype(DType::F64)?)
            }
        }
    };
    queued_ms(device, call)
}

/// The pool's peak above its inputs over one call of SAFE's fused Gram terms of `count`
/// adapters at a LLaMA-7B q/v adapter's shape (512 of 2,048 token rows, width 4096, rank 8,
/// bf16 rows), and what `gpu::cka_gram_bytes` counts for them (the memory plan's figure).
fn cka_gram_peak(device: &Device, count: usize) -> Result<(usize, usize)> {
    let (n, d, r) = (512, 4096, 8);
    let mut inputs = Vec::new();
    for a in 0..count as u64 {
        inputs.push((
            rand(&[4 * n, d], 44 + 3 * a, 1.0, 0.0, DType::BF16, device)?,
            rand(&[4 * n, r], 45 + 3 * a, 1.0, 0.0, DType::BF16, device)?,
            rand(&[d, r], 46 + 3 * a, 0.05, 0.0, DType::F32, device)?,
        ));
    }
    let items: Vec<(&Tensor, &Tensor, &Tensor)> =
        inputs.iter().map(|(y, u, b)| (y, u, b)).collect();
    let picked: Vec<u32> = (0..n as u32).map(|i| 4 * i + 1).collect();
    let rows = Tensor::from_vec(picked, n, device)?;
    let (peak, _terms) = pool_peak_over(device, || super::cka::gram_terms_batch(&items, &rows))?;
    Ok((peak, count * super::gpu::cka_gram_bytes(n, d, r)))
}

/// Stashes a state of a wide f32 tensor, a bf16 one named twice and a narrowed view, releases
/// it, fetches it back and restores it: the largest relative difference from the originals, the
/// bytes moved, by how much the pool's live bytes fell at the release (0 on the CPU), and the
/// bytes of the storages moved (the view's whole storage goes: nothing else holds it).
fn offload_round_trip(device: &Device) -> Result<(f64, usize, usize, usize)> {
    use super::offload;
    let wide = rand(&[1024, 1024], 61, 1.0, 0.0, DType::F32, device)?;
    let low = rand(&[512, 256], 62, 1.0, 0.0, DType::BF16, device)?;
    let rows = rand(&[64, 2048], 63, 1.0, 0.0, DType::F32, device)?.narrow(0, 16, 32)?;
    let originals = [wide.copy()?, low.copy()?, low.copy()?, rows.copy()?];
    let state = (wide, ((low.clone(), low), Some(rows)));
    let tracker = crate::memory::MemTracker::new(device);
    device.synchronize()?;
    let mut stashed = offload::stash(state, device)?;
    let moved = stashed.bytes();
    device.synchronize()?;
    let before = tracker.live();
    stashed.release()?;
    device.synchronize()?;
    let freed = before.saturating_sub(tracker.live());
    stashed.fetch()?;
    let (a, ((b, c), d)) = stashed.restore()?;
    let back = [a, b, c, d.expect("restored")];
    let mut e = 0f64;
    for (x, y) in back.iter().zip(&originals) {
        e = e.max(rel(x, y)?);
    }
    Ok((
        e,
        moved,
        freed,
        (1024 * 1024 + 64 * 2048) * 4 + 512 * 256 * 2,
    ))
}

/// The device pool's high-water mark while `f` runs, above what was live before it, and what
/// `f` returned (dropped after the reading, so it counts).
fn pool_peak_over<T>(device: &Device, f: impl FnOnce() -> Result<T>) -> Result<(usize, T)> {
    let tracker = crate::memory::MemTracker::new(device);
    device.synchronize()?;
    let before = tracker.live();
    tracker.reset_peak();
    let out = f()?;
    device.synchronize()?;
    Ok((tracker.peak().saturating_sub(before), out))
}

/// Milliseconds a call of SAFE's moment-form CKA norms takes at MiniLM's q/v adapter (width
/// 384, rank 8), 20 calls queued back to back after 3 to warm up.
fn cka_moment_ms(device: &Device, fused: bool) -> Result<f64> {
    let (d, rank) = (384, 8);
    let f64s = |shape: &[usize], seed| rand(shape, seed, 1.0, 0.0, DType::F64, device);
    let m = super::cka::LowRankMoments {
        n: 2048,
        sum_y: f64s(&[d], 44)?,
        sum_u: f64s(&[rank], 45)?,
        yty: f64s(&[d, d], 46)?,
        ytu: f64s(&[d, rank], 47)?,
        utu: f64s(&[rank, rank], 48)?,
        b: f64s(&[d, rank], 49)?,
    };
    let call = || if fused { m.norms() } else { m.norms_composed() };
    queued_ms(device, call)
}

/// Milliseconds a call of SAFE's moment-form measurement of one batch takes at MiniLM's q/v
/// adapter (2,048 bf16 rows, width 384, rank 8), `kind` as in the self-test's timing names.
fn cka_low_rank_ms(device: &Device, kind: &str) -> Result<f64> {
    let y = rand(&[2048, 384], 50, 1.0, 0.0, DType::BF16, device)?;
    let u = rand(&[2048, 8], 51, 1.0, 0.0, DType::BF16, device)?;
    let b = rand(&[384, 8], 52, 0.05, 0.0, DType::F32, device)?;
    let rows = Tensor::arange(0u32, 2048, device)?;
    let moments = || super::cka::LowRankMoments::of_rows(&y, &u, &b, &rows);
    let call = || -> Result<Tensor> {
        match kind {
            "fused" => super::cka::low_rank_norms(&y, &u, &b, &rows),
            "moments then fused norms" => moments()?.norms(),
            _ => moments()?.norms_composed(),
        }
    };
    queued_ms(device, call)
}

/// A CKA kernel against its composition in f64: the relative difference (at most 1e-10) and the
/// difference of the FLOPs each counts (none), under the names `what` and `flops_what`.
fn cka_checks(
    what: &str,
    flops_what: &str,
    dname: &str,
    (err, tol): (impl FnOnce(&Tensor, &Tensor) -> Result<f64>, f64),
    fused: impl FnOnce() -> Result<Tensor>,
    composed: impl FnOnce() -> Result<Tensor>,
) -> Result<[Check; 2]> {
    let f0 = super::flops::total();
    let fused = fused()?;
    let f1 = super::flops::total();
    let composed = composed()?;
    let f2 = super::flops::total();
    let err = err(&fused, &composed)?;
    let flops_differ = (f1 - f0) as f64 - (f2 - f1) as f64;
    Ok([
        Check {
            name: what.into(),
            dtype: dname.into(),
            rel_err: err,
            tol,
            ok: err <= tol,
        },
        Check {
            name: flops_what.into(),
            dtype: dname.into(),
            rel_err: flops_differ.abs(),
            tol: 0.0,
            ok: flops_differ == 0.0,
        },
    ])
}

/// The largest error of the Gram form's terms (`cka::gram_terms_composed`'s layout, rank `r`),
/// each block of them against its own largest entry: the fused path's product runs in TF32, so
/// its terms carry about 1e-4 of their scale, which a whole-vector norm dominated by `||L||^2`
/// would hide. `<L Uc, P>` is measured against its Cauchy-Schwarz bound
/// `||L|| ||Uc|| ||P||`, since it may cancel to near zero.
fn gram_terms_err(fused: &Tensor, composed: &Tensor, r: usize) -> Result<f64> {
    let (f, c) = (fused.to_vec1::<f64>()?, composed.to_vec1::<f64>()?);
    if f.len() != c.len() || c.len() != 3 + 5 * r * r + 2 * r {
        return Ok(f64::INFINITY);
    }
    let z = &c[3..3 + 4 * r * r];
    let trace = |off: usize| (0..r).map(|i| z[(off + i) * 2 * r + off + i]).sum::<f64>();
    let lup_scale = (c[0] * trace(0) * trace(r)).sqrt();
    let block = |range: std::ops::Range<usize>, scale: Option<f64>| {
        let scale =
            scale.unwrap_or_else(|| c[range.clone()].iter().fold(0f64, |m, v| m.max(v.abs())));
        range.map(|i| (f[i] - c[i]).abs()).fold(0f64, f64::max) / scale.max(1e-300)
    };
    let starts = [
        0,
        1,
        2,
        3,
        3 + 4 * r * r,
        3 + 5 * r * r,
        3 + 5 * r * r + r,
        c.len(),
    ];
    Ok(starts
        .windows(2)
        .enumerate()
        .map(|(k, w)| block(w[0]..w[1], (k == 1).then_some(lup_scale)))
        .fold(0f64, f64::max))
}

/// Milliseconds a call of each of a LoRA adapter's thin products takes at 1,024 rows, width 4,096
/// and ranks 4 and 8 (bf16), through `matmul_scaled` (the thin kernels) and through cuBLAS's
/// product alone, and of the rank-r updates in place.
fn thin_ms(device: &Device) -> Result<Vec<(String, f64)>> {
    let r = |shape: &[usize], seed| rand(shape, seed, 1.0, 0.0, DType::BF16, device);
    let (x, dy) = (r(&[1024, 4096], 1)?, r(&[1024, 4096], 2)?);
    let mut out = Vec::new();
    for rank in [4, 8] {
        let (u, a, b) = (
            r(&[1024, rank], 3)?,
            r(&[rank, 4096], 4)?,
            r(&[4096, rank], 5)?,
        );
        let forms = [
            ("x A^T", x.clone(), a.t()?, DType::BF16),
            ("dy B", dy.clone(), b.clone(), DType::BF16),
            ("dy^T U into f32", dy.t()?, u.clone(), DType::F32),
            ("dxa^T x into f32", u.t()?, x.clone(), DType::F32),
        ];
        for (name, p, q, dt) in forms {
            let thin = queued_ms(device, || super::flops::matmul_scaled(&p, &q, 1.0, dt))?;
            let cublas = queued_ms(device, || super::flops::matmul(&p, &q))?;
            out.push((format!("{name} r{rank}, thin"), thin));
            out.push((format!("{name} r{rank}, cuBLAS"), cublas));
        }
        let y = dy.copy()?;
        for (name, w, w_t) in [("U B^T", &b, true), ("dxa A", &a, false)] {
            let ms = queued_ms(device, || super::add_low_rank(y.clone(), &u, w, w_t))?;
            out.push((format!("y += {name} in place r{rank}, thin"), ms));
        }
    }
    Ok(out)
}

/// Milliseconds a call of `call` takes, 20 calls queued back to back after 3 to warm up.
fn queued_ms(device: &Device, call: impl Fn() -> Result<Tensor>) -> Result<f64> {
    for _ in 0..3 {
        call()?;
    }
    device.synchronize()?;
    let t0 = std::time::Instant::now();
    for _ in 0..20 {
        call()?;
    }
    device.synchronize()?;
    Ok(t0.elapsed().as_secs_f64() * 1e3 / 20.0)
}

/// The attention timings' case: 1 x 4096 tokens, 32 heads of 128, causal, bf16: the attention,
/// `[q, k, v, dy]`, the additive mask and the shape.
type TimedAttention = (Attention, [Tensor; 4], Tensor, AttnShape);

fn timed_attention(device: &Device) -> Result<TimedAttention> {
    let (b, t, heads, d) = (1, 4096, 32, 128);
    let attn = Attention {
        num_heads: heads,
        num_kv_heads: heads,
        causal: true,
        dropout: Dropout::new(0.0),
    };
    let x = |seed| rand(&[b * t, heads * d], seed, 1.0, 0.0, DType::BF16, device);
    let qkvd = [x(31)?, x(32)?, x(33)?, x(34)?];
    let mask = Tensor::zeros((b, 1, 1, t), DType::F32, device)?;
    Ok((attn, qkvd, mask, AttnShape { batch: b, seq: t }))
}

/// Median milliseconds of one attention forward (saving) and one backward at the shape of
/// [`attention_peak_mb`].
fn attention_ms(device: &Device, fused: bool) -> Result<(f64, f64)> {
    let (attn, [q, k, v, dy], mask, shape) = timed_attention(device)?;
    let mut rng = StdRng::seed_from_u64(0);
    let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
    for _ in 0..7 {
        let mut pass = Pass::training(&mut rng);
        device.synchronize()?;
        let t0 = std::time::Instant::now();
        let (_y, s) = if fused {
            attn.forward((&q, &k, &v), &mask, shape, None, &mut pass, true)?
        } else {
            attn.forward_reference((&q, &k, &v), &mask, shape, None, &mut pass, true)?
        };
        device.synchronize()?;
        let t1 = std::time::Instant::now();
        let _g = s.expect("saved").backward(&attn, &dy)?;
        device.synchronize()?;
        fwd.push((t1 - t0).as_secs_f64() * 1e3);
        bwd.push(t1.elapsed().as_secs_f64() * 1e3);
    }
    let median = |mut v: Vec<f64>| {
        v.drain(..2); // warm-up
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok((median(fwd), median(bwd)))
}

/// Peak device memory (MB, the CUDA pool's high-water mark) of one attention forward + backward at
/// 1 x 4096 tokens, 32 heads of 128, causal, bf16, above what was allocated before it; and whether
/// the flash kernels ran.
fn attention_peak_mb(device: &Device, fused: bool) -> Result<(f64, bool)> {
    let (attn, [q, k, v, dy], mask, shape) = timed_attention(device)?;
    let mut rng = StdRng::seed_from_u64(0);
    let mut pass = Pass::training(&mut rng);
    let (peak, used) = pool_peak_over(device, || {
        let (_y, s) = if fused {
            attn.forward((&q, &k, &v), &mask, shape, None, &mut pass, true)?
        } else {
            attn.forward_reference((&q, &k, &v), &mask, shape, None, &mut pass, true)?
        };
        let s = s.expect("saved");
        let grads = s.backward(&attn, &dy)?;
        device.synchronize()?;
        drop(grads);
        Ok(s.used_flash())
    })?;
    Ok((peak as f64 / 1e6, used))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_fused_kernels_match_the_compositions() {
        for dtype in [DType::F32, DType::BF16] {
            for c in fused_against_reference(&Device::Cpu, dtype).unwrap() {
                assert!(c.ok, "{c:?}");
            }
        }
    }

    /// The Gram terms' check holds every block to its own scale: 1% of a block's largest entry
    /// added to any one entry fails it, even where that block is tiny beside `||L||^2`.
    #[test]
    fn the_gram_terms_check_sees_an_error_in_any_block() {
        let (n, d, r) = (24, 40, 3);
        let dev = &Device::Cpu;
        let y = rand(&[n, d], 1, 2.0, 0.3, DType::F64, dev).unwrap();
        let u = rand(&[n, r], 2, 1.0, -0.2, DType::F64, dev).unwrap();
        let b = rand(&[d, r], 3, 0.05, 0.0, DType::F64, dev).unwrap();
        let terms = crate::nn::cka::gram_terms_composed(&y, &u, &b).unwrap();
        assert_eq!(gram_terms_err(&terms, &terms, r).unwrap(), 0.0);
        let c = terms.to_vec1::<f64>().unwrap();
        let lup_bound = (c[0] * (0..r).map(|i| c[3 + i * 2 * r + i]).sum::<f64>()).sqrt()
            * (0..r)
                .map(|i| c[3 + (r + i) * 2 * r + r + i])
                .sum::<f64>()
                .sqrt();
        let starts = [
            0,
            1,
            2,
            3,
            3 + 4 * r * r,
            3 + 5 * r * r,
            3 + 5 * r * r + r,
            c.len(),
        ];
        for k in 0..starts.len() - 1 {
            let block = &c[starts[k]..starts[k + 1]];
            let scale = if k == 1 {
                lup_bound
            } else {
                block.iter().fold(0f64, |m, v| m.max(v.abs()))
            };
            let mut wrong = c.clone();
            wrong[starts[k + 1] - 1] += 0.01 * scale;
            let wrong = Tensor::new(wrong, dev).unwrap();
            let err = gram_terms_err(&wrong, &terms, r).unwrap();
            assert!((err - 0.01).abs() < 1e-9, "block {k}: {err}");
        }
    }
}
