//! Tests of `model::gpt2`.

use super::*;
use crate::adapters::{Adapted, LoraConfig};
use crate::model::stack::Recompute;
use crate::model::{CausalLm, LmBatch};
use crate::nn::gradcheck::{max_abs_diff, randn};
use crate::nn::loss::LmLoss;
use rand::rngs::StdRng;
use rand::SeedableRng;

fn config() -> Gpt2Config {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 40, "n_positions": 8, "n_embd": 16, "n_layer": 3, "n_head": 4,
        "n_inner": null, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "bos_token_id": 1, "eos_token_id": 1, "model_type": "gpt2"
    }))
    .unwrap()
}

/// Checkpoint tensors (Conv1D layout, no prefix) with every weight, bias and LayerNorm
/// parameter nonzero and of order 0.1-1, so each one moves the output measurably.
fn tensors(cfg: &Gpt2Config, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut t = Gpt2LMHeadModel::random_tensors(cfg, &mut rng);
    let mut names: Vec<String> = t.keys().cloned().collect();
    names.sort();
    for (i, name) in names.into_iter().enumerate() {
        let dims = t[&name].dims().to_vec();
        let r = randn(&dims, seed * 1000 + i as u64);
        let v = if name.contains("ln_") && name.ends_with(".weight") {
            r.affine(0.2, 1.0)
        } else if name.starts_with("wte") || name.starts_with("wpe") {
            Ok(r)
        } else {
            r.affine(0.4, 0.0)
        };
        t.insert(name, v.unwrap().to_dtype(DType::F32).unwrap());
    }
    t
}

fn model_from(cfg: &Gpt2Config, t: &HashMap<String, Tensor>, dtype: DType) -> Gpt2LMHeadModel {
    let w = Weights::from_tensors(t.clone(), dtype, &Device::Cpu);
    Gpt2LMHeadModel::from_weights(cfg.clone(), &w).unwrap()
}

/// A tiny random GPT-2 in f64, LoRA on all four sites (`c_proj` names both projections)
/// with nonzero B, dropout everywhere.
fn tiny() -> Gpt2LMHeadModel {
    let cfg = config();
    let mut m = model_from(&cfg, &tensors(&cfg, 3), DType::F64);
    m.set_dropout(0.1, 0.1, 0.1);
    let lora = LoraConfig {
        r: 2,
        alpha: 4.0,
        dropout: 0.1,
        target_modules: vec!["c_attn".into(), "c_fc".into(), "c_proj".into()],
        use_rslora: false,
    };
    let mut rng = StdRng::seed_from_u64(4);
    assert_eq!(m.add_lora(&lora, None, &mut rng).unwrap(), 12);
    for (i, (l, s)) in m.adapter_sites().into_iter().enumerate() {
        let ad = m.adapter_mut(l, s).unwrap();
        ad.b = randn(ad.b.dims(), 100 + i as u64); // B = 0 (PEFT init) would zero every dA
    }
    m
}

fn batch(dtype: DType) -> LmBatch {
    causal::test_batch(dtype)
}

fn grads(m: &Gpt2LMHeadModel) -> (LmLoss, SiteGrads) {
    causal::test_grads(m, &Recompute::None)
}

/// With every dropout on (embeddings, attention, residual, LoRA), gradient checkpointing
/// replays each block's masks in its second forward, and a block recomputing its feed-forward
/// input replays `c_fc`'s LoRA dropout: the same loss and gradients bit for bit.
#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    let mut m = tiny();
    let recomputes = crate::model::stack::test_recomputes();
    for (frozen_below, r) in [0, 1]
        .into_iter()
        .flat_map(|f| recomputes.iter().map(move |r| (f, r)))
    {
        for (l, s) in m.adapter_sites() {
            m.adapter_mut(l, s).unwrap().trainable = l >= frozen_below;
        }
        let what = format!("{r:?}, frozen below {frozen_below}");
        causal::assert_same_grads(&grads(&m), &causal::test_grads(&m, r), &what);
    }
}

/// Every adapter's gradient equals candle's autograd through the same forward (all dropouts
/// on, same seed) and a full-logits cross-entropy, on a tiny random GPT-2 in f64. The bound
/// is 5e-6, not 1e-9: candle's backward of `gelu` and `gelu_erf` uses 6-digit constants
/// (0.797885, 0.0356774, 0.398942), which puts the tape itself ~1e-7 off at these O(1)
/// activations. The finite-difference test below pins our gradients to 1e-8.
#[test]
fn whole_model_gradients_match_autograd() {
    check_against_autograd(&tiny(), 5e-6);
}

/// Our gradients against central finite differences of the loss (same dropout masks), on a
/// sample of entries of every adapter's A and B: exact to 1e-8, where the tape is ~1e-7 off.
#[test]
fn whole_model_gradients_match_finite_differences() {
    let m = tiny();
    let (_, ours) = grads(&m);
    let loss_of = |m: &Gpt2LMHeadModel| {
        let mut rng = StdRng::seed_from_u64(5);
        let mut pass = Pass::training(&mut rng);
        let b = batch(DType::F64);
        let (hn, _) = m
            .forward_train(&b, &mut pass, &Recompute::None, None)
            .unwrap();
        let l = crate::nn::loss::lm_head_loss(&hn, m.head_weight(), &b.targets, 64, false).unwrap();
        l.loss_sum / l.tokens as f64
    };
    let h = 1e-5;
    let mut worst = 0f64;
    for (k, (l, s, g)) in ours.iter().enumerate() {
        for (which, grad) in [(0, &g.a), (1, &g.b)] {
            let n = grad.elem_count();
            let want: Vec<f64> = grad.flatten_all().unwrap().to_vec1().unwrap();
            for e in [k % n, (7 * k + 3) % n, n - 1] {
                let shifted = |delta: f64| {
                    let mut m2 = m.clone();
                    let ad = m2.adapter_mut(*l, *s).unwrap();
                    let t = if which == 0 { &mut ad.a } else { &mut ad.b };
                    let mut v: Vec<f64> = t.flatten_all().unwrap().to_vec1().unwrap();
                    v[e] += delta;
                    *t = Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap();
                    loss_of(&m2)
                };
                let fd = (shifted(h) - shifted(-h)) / (2.0 * h);
                let d = (fd - want[e]).abs();
                worst = worst.max(d);
                assert!(
                    d < 1e-8,
                    "layer {l} {s:?} {which} entry {e}: {} vs fd {fd}",
                    want[e]
                );
            }
        }
    }
    assert!(worst > 0.0);
}

fn check_against_autograd(m: &Gpt2LMHeadModel, tol: f64) {
    let (loss, ours) = grads(m);
    let mut taped = m.clone();
    let vars = crate::adapters::block::tape_adapters(&mut taped);
    let mut rng = StdRng::seed_from_u64(5);
    let mut pass = Pass::training(&mut rng);
    let b = batch(DType::F64);
    let (hn, _) = taped
        .forward_train(&b, &mut pass, &Recompute::None, None)
        .unwrap();
    let tape_loss = super::causal::taped_mean_nll(&hn, taped.head_weight(), &b.targets);
    let want = tape_loss.to_scalar::<f64>().unwrap();
    assert!((loss.loss_sum / loss.tokens as f64 - want).abs() < 1e-10);
    let tape = tape_loss.backward().unwrap();
    assert_eq!(ours.len(), vars.len());
    for ((l, s, g), (vl, vs, a, b)) in ours.iter().zip(&vars) {
        assert_eq!((*l, *s), (*vl, *vs));
        let ta = tape.get(a).unwrap();
        let da = max_abs_diff(&g.a, ta);
        let db = max_abs_diff(&g.b, tape.get(b).unwrap());
        assert!(
            da < tol && db < tol,
            "layer {l} {s:?}: dA off by {da}, dB off by {db}"
        );
        let scale = ta
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(scale > 1e-2, "layer {l} {s:?}: dA is ~0 ({scale})");
    }
}

/// The plan's costs of a GPT-2 block, whose q, k and v come from one product (`c_attn`): by FLOPs
/// on the CPU, and on a GPU in a launch-bound pass by products, each of c_attn, c_proj, c_fc,
/// the MLP's c_proj and the attention's three steps counting the same (7 in all): c_fc 1 (15%),
/// c_attn and the three steps 4 (58%).
#[test]
fn layer_costs_follow_the_forward() {
    let m = tiny();
    let acts = crate::model::memory::Acts::new(2, 8, DType::F64, &Device::Cpu);
    // FLOPs a token at width 16, inner 64: c_attn 1,536, c_proj 512, c_fc and the MLP's c_proj
    // 2,048 each, the attention's products 4 * 8 * 16 = 512; 6,656 in all. c_fc: 30.8% -> 31;
    // c_attn and the products: 2,048, 30.8% -> 31.
    let l = m.layers[0].memory(acts);
    assert_eq!((l.ffn_cost_pct, l.attention_cost_pct), (31, 31));
    let gpu = crate::model::memory::Acts {
        on_gpu: true,
        ..acts
    }
    .at_width(16);
    let l = m.layers[0].memory(gpu);
    assert_eq!((l.ffn_cost_pct, l.attention_cost_pct), (15, 58));
}

/// Freezing the bottom layers' adapters: those layers save nothing, get no gradient, and the
/// top layer's gradients are unchanged. With only c_fc training in the lowest trainable
/// layer, its attention backward is skipped and the gradients still agree.
#[test]
fn frozen_bottom_layers_save_nothing() {
    let mut m = tiny();
    // No dropout: a frozen bottom runs in inference mode, so only then are the two runs'
    // top-layer inputs the same.
    for (l, site) in m.adapter_sites() {
        m.adapter_mut(l, site).unwrap().dropout = crate::nn::dropout::Dropout::new(0.0);
    }
    m.set_dropout(0.0, 0.0, 0.0);
    let (_, all) = grads(&m);
    for (l, s) in m.adapter_sites() {
        if l < 2 {
            m.adapter_mut(l, s).unwrap().trainable = false;
        }
    }
    let mut rng = StdRng::seed_from_u64(5);
    let mut pass = Pass::training(&mut rng);
    let (_, saved) = m
        .forward_train(&batch(DType::F64), &mut pass, &Recompute::None, None)
        .unwrap();
    assert_eq!((saved.first, saved.layers.states_kept()), (2, 1));
    let (_, top) = grads(&m);
    assert_eq!(top.len(), 4);
    assert!(top.iter().all(|(l, _, _)| *l == 2));
    let same = |top: &SiteGrads| {
        for (l, s, g) in top {
            let (_, _, ga) = all.iter().find(|(la, sa, _)| la == l && sa == s).unwrap();
            assert!(max_abs_diff(&g.a, &ga.a) < 1e-12 && max_abs_diff(&g.b, &ga.b) < 1e-12);
        }
    };
    same(&top);
    m.adapter_mut(2, Gpt2Site::CAttn).unwrap().trainable = false;
    let (_, top) = grads(&m);
    assert_eq!(top.len(), 3);
    same(&top);
}

/// `target_modules` as PEFT matches them: against the end of the module path.
#[test]
fn target_names_match_the_end_of_the_path() {
    let on = |t: &str| -> Vec<Gpt2Site> {
        Gpt2Site::ALL
            .into_iter()
            .filter(|s| adapters::target_matches(s.path(), t))
            .collect()
    };
    assert_eq!(on("c_attn"), [Gpt2Site::CAttn]);
    assert_eq!(on("c_proj"), [Gpt2Site::AttnCProj, Gpt2Site::MlpCProj]);
    assert_eq!(on("attn.c_proj"), [Gpt2Site::AttnCProj]);
    assert_eq!(on("mlp.c_proj"), [Gpt2Site::MlpCProj]);
    assert!(on("q_proj").is_empty() && on("proj").is_empty());
}

/// GPT-2 straight from the checkpoint's Conv1D tensors (`y = x W + b`, no transposes), in
/// plain candle ops, for one unpadded sequence: the oracle for the loader and the forward.
fn reference_logits(t: &HashMap<String, Tensor>, c: &Gpt2Config, ids: &[u32]) -> Tensor {
    let g = |n: &str| t[n].to_dtype(DType::F64).unwrap();
    let conv = |x: &Tensor, p: &str| {
        x.matmul(&g(&format!("{p}.weight")))
            .unwrap()
            .broadcast_add(&g(&format!("{p}.bias")))
            .unwrap()
    };
    let ln = |x: &Tensor, p: &str| {
        let mean = x.mean_keepdim(1).unwrap();
        let xc = x.broadcast_sub(&mean).unwrap();
        let var = xc.sqr().unwrap().mean_keepdim(1).unwrap();
        let rstd = (var + c.layer_norm_epsilon)
            .unwrap()
            .sqrt()
            .unwrap()
            .recip()
            .unwrap();
        xc.broadcast_mul(&rstd)
            .unwrap()
            .broadcast_mul(&g(&format!("{p}.weight")))
            .unwrap()
            .broadcast_add(&g(&format!("{p}.bias")))
            .unwrap()
    };
    let n = ids.len();
    let (e, d) = (c.n_embd, c.head_dim());
    let ids_t = Tensor::from_slice(ids, n, &Device::Cpu).unwrap();
    let mut x = (g("wte.weight").index_select(&ids_t, 0).unwrap()
        + g("wpe.weight").narrow(0, 0, n).unwrap())
    .unwrap();
    let causal: Vec<f64> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { f64::NEG_INFINITY } else { 0.0 }))
        .collect();
    let causal = Tensor::from_vec(causal, (n, n), &Device::Cpu).unwrap();
    for l in 0..c.n_layer {
        let p = format!("h.{l}");
        let qkv = conv(&ln(&x, &format!("{p}.ln_1")), &format!("{p}.attn.c_attn"));
        let mut heads = Vec::new();
        for h in 0..c.n_head {
            let part = |k: usize| qkv.narrow(1, k * e + h * d, d).unwrap();
            let s = (part(0).matmul(&part(1).t().unwrap()).unwrap() / (d as f64).sqrt())
                .unwrap()
                .broadcast_add(&causal)
                .unwrap();
            let p = candle_core::D::Minus1;
            let ex = s
                .broadcast_sub(&s.max_keepdim(p).unwrap())
                .unwrap()
                .exp()
                .unwrap();
            let probs = ex.broadcast_div(&ex.sum_keepdim(p).unwrap()).unwrap();
            heads.push(probs.matmul(&part(2)).unwrap());
        }
        let ctx = Tensor::cat(&heads, 1).unwrap();
        x = (x + conv(&ctx, &format!("{p}.attn.c_proj"))).unwrap();
        let f = conv(&ln(&x, &format!("{p}.ln_2")), &format!("{p}.mlp.c_fc"));
        let k = (2.0 / std::f64::consts::PI).sqrt();
        let u = ((&f + f.powf(3.0).unwrap().affine(0.044715, 0.0).unwrap()).unwrap() * k).unwrap();
        let act = (&f * u.tanh().unwrap().affine(0.5, 0.5).unwrap()).unwrap();
        x = (x + conv(&act, &format!("{p}.mlp.c_proj"))).unwrap();
    }
    ln(&x, "ln_f")
        .matmul(&g("wte.weight").t().unwrap())
        .unwrap()
}

fn write_folder(dir: &Path, cfg: &Gpt2Config, t: &HashMap<String, Tensor>, prefix: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let mut file: HashMap<String, Tensor> = t
        .iter()
        .map(|(k, v)| (format!("{prefix}{k}"), v.clone()))
        .collect();
    // Old checkpoints also hold the causal-mask buffer; it is not a parameter.
    let np = cfg.n_positions;
    let buffer = Tensor::ones((1, 1, np, np), DType::F32, &Device::Cpu).unwrap();
    file.insert(format!("{prefix}h.0.attn.bias"), buffer);
    candle_core::safetensors::save(&file, dir.join("model.safetensors")).unwrap();
    let mut json = serde_json::to_value(cfg).unwrap();
    json["model_type"] = "gpt2".into();
    json["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
}

/// A Hugging Face folder (Conv1D `[in, out]` weights, with or without `transformer.`) loads
/// to the model `random`'s path builds from the same tensors, and both agree with a forward
/// computed straight from the Conv1D tensors; one element of c_attn's output is checked by
/// hand against `y = x W + b`.
#[test]
fn hf_folder_loads_conv1d_weights_transposed() {
    let cfg = config();
    let t = tensors(&cfg, 8);
    let ids = [3u32, 17, 1, 39, 0, 22, 8];
    let b = {
        let n = ids.len();
        let mask = Tensor::ones((1, n), DType::U32, &Device::Cpu).unwrap();
        LmBatch {
            input_ids: Tensor::from_slice(&ids, (1, n), &Device::Cpu).unwrap(),
            mask_add: crate::nn::attention::mask_to_additive(&mask, DType::F32).unwrap(),
            targets: vec![-100; n],
            batch: 1,
            seq: n,
        }
    };
    let want = reference_logits(&t, &cfg, &ids);
    let in_memory = CausalLm::logits(&model_from(&cfg, &t, DType::F32), &b).unwrap();
    let d = max_abs_diff(&in_memory.to_dtype(DType::F64).unwrap(), &want);
    assert!(d < 1e-4, "forward vs the Conv1D reference: {d}");
    let dir = tempfile::tempdir().unwrap();
    for prefix in ["transformer.", ""] {
        let folder = dir.path().join(format!("gpt2{prefix}"));
        write_folder(&folder, &cfg, &t, prefix);
        let m = Gpt2LMHeadModel::load_hf(&folder, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(m.config, cfg);
        let got = CausalLm::logits(&m, &b).unwrap();
        assert_eq!(max_abs_diff(&got, &in_memory), 0.0, "prefix {prefix:?}");

        // c_attn of layer 1: column 37 (a key feature) of row 0, by hand.
        let x = randn(&[2, cfg.n_embd], 21).to_dtype(DType::F32).unwrap();
        let y = m.layers[1].linears[Gpt2Site::CAttn as usize]
            .base
            .forward(&x)
            .unwrap();
        assert_eq!(y.dims(), &[2, 3 * cfg.n_embd]);
        let w: Vec<Vec<f32>> = t["h.1.attn.c_attn.weight"].to_vec2().unwrap();
        let bias: Vec<f32> = t["h.1.attn.c_attn.bias"].to_vec1().unwrap();
        let xr: Vec<f32> = x.get(0).unwrap().to_vec1().unwrap();
        let j = 37;
        let by_hand: f64 = bias[j] as f64
            + (0..cfg.n_embd)
                .map(|i| xr[i] as f64 * w[i][j] as f64)
                .sum::<f64>();
        let ours: f32 = y.get(0).unwrap().get(j).unwrap().to_scalar().unwrap();
        assert!((ours as f64 - by_hand).abs() < 1e-5, "{ours} vs {by_hand}");
    }
}

/// A folder's GPT-2 trains with its config's dropout (embeddings, attention, residual), as
/// transformers does in train mode: a training pass differs from one without dropout, and
/// inference stays deterministic.
#[test]
fn hf_folder_trains_with_config_dropout() {
    let mut cfg = config();
    (cfg.embd_pdrop, cfg.attn_pdrop, cfg.resid_pdrop) = (0.1, 0.2, 0.3);
    let dir = tempfile::tempdir().unwrap();
    write_folder(dir.path(), &cfg, &tensors(&cfg, 8), "");
    let mut m = Gpt2LMHeadModel::load_hf(dir.path(), DType::F64, &Device::Cpu).unwrap();
    assert_eq!(m.embd_dropout.p, 0.1);
    // An adapter in layer 0 (without dropout of its own), so every layer runs in training mode.
    let lora = LoraConfig {
        r: 2,
        dropout: 0.0,
        target_modules: vec!["c_attn".into()],
        ..Default::default()
    };
    CausalLm::add_lora(&mut m, &lora, None, &mut StdRng::seed_from_u64(1)).unwrap();
    for l in &m.layers {
        assert_eq!((l.attention.dropout.p, l.resid_dropout.p), (0.2, 0.3));
    }
    let mut plain = m.clone();
    plain.set_dropout(0.0, 0.0, 0.0);
    let b = batch(DType::F64);
    let train_loss = |m: &Gpt2LMHeadModel| {
        let mut rng = StdRng::seed_from_u64(5);
        let mut pass = Pass::training(&mut rng);
        let (hn, _) = m
            .forward_train(&b, &mut pass, &Recompute::None, None)
            .unwrap();
        let l = crate::nn::loss::lm_head_loss(&hn, m.head_weight(), &b.targets, 64, false);
        l.unwrap().loss_sum
    };
    assert_ne!(train_loss(&m), train_loss(&plain));
    let eval = |m: &Gpt2LMHeadModel| CausalLm::loss(m, &b).unwrap().loss_sum;
    assert_eq!(eval(&m), eval(&plain));
}

/// The PEFT files of a GPT-2 adapter say `fan_in_fan_out: true`, keep PEFT's shapes and
/// paths, and load back into a fresh model.
#[test]
fn peft_export_says_fan_in_fan_out() {
    let m = tiny();
    let lora = LoraConfig {
        r: 2,
        alpha: 4.0,
        dropout: 0.1,
        target_modules: vec!["c_attn".into(), "c_fc".into(), "c_proj".into()],
        use_rslora: false,
    };
    let dir = tempfile::tempdir().unwrap();
    crate::io::peft::save(dir.path(), &m, &lora, "tiny-gpt2").unwrap();
    let pc = crate::io::peft::read_config(dir.path()).unwrap();
    assert!(pc.fan_in_fan_out);
    assert_eq!(pc.task_type.as_deref(), Some("CAUSAL_LM"));
    assert_eq!(pc.layers_to_transform, None);
    let file = candle_core::safetensors::load(
        dir.path().join(crate::io::peft::WEIGHTS_FILE),
        &Device::Cpu,
    )
    .unwrap();
    let key = "base_model.model.transformer.h.0.attn.c_attn";
    assert_eq!(file[&format!("{key}.lora_A.weight")].dims(), &[2, 16]);
    assert_eq!(file[&format!("{key}.lora_B.weight")].dims(), &[48, 2]);
    let mut fresh = tiny();
    for (l, s) in fresh.adapter_sites() {
        let ad = fresh.adapter_mut(l, s).unwrap();
        ad.b = ad.b.zeros_like().unwrap();
    }
    crate::io::peft::load(dir.path(), &mut fresh).unwrap();
    for ((pa, a), (pb, b)) in m.adapters().into_iter().zip(fresh.adapters()) {
        assert_eq!(pa, pb);
        assert_eq!(max_abs_diff(&a.a, &b.a), 0.0);
        assert_eq!(max_abs_diff(&a.b, &b.b), 0.0);
    }
}

/// Bad configs fail naming the file and the field.
#[test]
fn bad_config_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    let cases = [
        (serde_json::json!({"n_head": 5}), "n_head"),
        (serde_json::json!({"activation_function": "relu"}), "relu"),
        (
            serde_json::json!({"scale_attn_by_inverse_layer_idx": true}),
            "scale",
        ),
        (serde_json::json!({"attn_pdrop": 1.0}), "attn_pdrop"),
        (serde_json::json!({"n_embd": "wide"}), "not a GPT-2 config"),
    ];
    for (patch, needle) in cases {
        let mut json = serde_json::to_value(config()).unwrap();
        for (k, v) in patch.as_object().unwrap() {
            json[k] = v.clone();
        }
        std::fs::write(&path, json.to_string()).unwrap();
        let e = Gpt2Config::from_file(&path).unwrap_err().to_string();
        assert!(
            e.contains(&path.display().to_string()) && e.contains(needle),
            "{needle}: {e}"
        );
    }
    let e = Gpt2Config::from_file(&dir.path().join("nope.json"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.json"), "{e}");
}

/// Positions past `n_positions` are refused, not read out of the table.
#[test]
fn too_long_sequences_are_refused() {
    let cfg = config();
    let m = model_from(&cfg, &tensors(&cfg, 3), DType::F32);
    let n = cfg.n_positions + 1;
    let mask = Tensor::ones((1, n), DType::U32, &Device::Cpu).unwrap();
    let b = LmBatch {
        input_ids: Tensor::zeros((1, n), DType::U32, &Device::Cpu).unwrap(),
        mask_add: crate::nn::attention::mask_to_additive(&mask, DType::F32).unwrap(),
        targets: vec![-100; n],
        batch: 1,
        seq: n,
    };
    let e = CausalLm::logits(&m, &b).unwrap_err().to_string();
    assert!(e.contains("positions"), "{e}");
}
