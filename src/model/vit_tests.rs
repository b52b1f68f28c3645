//! Tests of `model::vit`: transformers' logits on its own checkpoint, and the pre-LN backward
//! against autograd and finite differences.

use super::*;
use crate::adapters::{AdaptedStack, LoraConfig};
use crate::model::bert::ModelGrads;
use crate::model::stack::Recompute;
use crate::nn::gradcheck::{max_abs_diff, randn, rel_err};
use candle_core::Var;
use rand::rngs::StdRng;
use rand::SeedableRng;

fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/vit")
}

fn image_batch(m: &ViTForImageClassification, pixels: Tensor) -> BatchTensors {
    m.image_batch(pixels).unwrap()
}

/// A tiny random ViT (8x8 RGB images, 4x4 patches, 3 layers) in f64 with LoRA on every linear,
/// every `B` nonzero.
fn tiny(dropout: f64) -> ViTForImageClassification {
    let cfg = BertConfig::tiny_of(EncoderFamily::ViT, dropout);
    let mut rng = StdRng::seed_from_u64(1);
    let mut m =
        ViTForImageClassification::random(cfg, 3, DType::F64, &Device::Cpu, &mut rng).unwrap();
    let lora = LoraConfig {
        r: 2,
        alpha: 4.0,
        dropout,
        target_modules: vec!["all-linear".into()],
        use_rslora: false,
    };
    m.add_lora(&lora, None, &mut rng).unwrap();
    for (i, (l, s)) in m.adapter_sites().into_iter().enumerate() {
        let ad = m.adapter_mut(l, s).unwrap();
        ad.b = randn(ad.b.dims(), 100 + i as u64);
    }
    m
}

fn pixels() -> Tensor {
    randn(&[2, 3, 8, 8], 9)
}

const LABELS: [u32; 2] = [2, 0];

fn loss_of(logits: &Tensor) -> (f32, Tensor) {
    crate::nn::loss::cross_entropy(logits, &LABELS).unwrap()
}

fn grads(m: &ViTForImageClassification, recompute: &Recompute) -> ModelGrads {
    let b = image_batch(m, pixels());
    let mut rng = StdRng::seed_from_u64(5);
    let mut pass = Pass::training(&mut rng);
    let (logits, saved) = m.forward_train(&b, &mut pass, recompute).unwrap();
    let (_, dlogits) = loss_of(&logits);
    m.backward(saved, &dlogits).unwrap()
}

/// The loss of the training forward (dropout on, the same seed as [`grads`]), in f64.
fn loss_f64(m: &ViTForImageClassification) -> f64 {
    let b = image_batch(m, pixels());
    let mut rng = StdRng::seed_from_u64(5);
    let mut pass = Pass::training(&mut rng);
    let (logits, _) = m.forward_train(&b, &mut pass, &Recompute::None).unwrap();
    let lse = logits.exp().unwrap().sum_keepdim(1).unwrap().log().unwrap();
    let logp: Vec<Vec<f64>> = logits.broadcast_sub(&lse).unwrap().to_vec2().unwrap();
    -(logp[0][LABELS[0] as usize] + logp[1][LABELS[1] as usize]) / 2.0
}

/// transformers' `ViTForImageClassification` (scripts/hf_fixtures.py: 28x28 RGB, 7x7 patches,
/// 2 pre-LN layers, 10 labels) on the processor's pixel values: the same last hidden state and
/// logits, to 1e-4 in f32 and 1e-6 in f64.
#[test]
fn transformers_vit_gives_transformers_logits() {
    let dir = fixture();
    let cpu = Device::Cpu;
    let r = candle_core::safetensors::load(dir.join("reference.safetensors"), &cpu).unwrap();
    // f64: 1e-6, not BERT's 1e-9: the pre-LN residual stream is not normalized, and candle's
    // erf (exact GELU) is ~1e-7 off at those larger activations.
    for (dtype, tol) in [(DType::F32, 1e-4), (DType::F64, 1e-6)] {
        let mut rng = StdRng::seed_from_u64(0);
        let m = ViTForImageClassification::load(&dir, 10, dtype, &cpu, &mut rng).unwrap();
        assert!(m.layers.iter().all(|l| l.pre_norm));
        let b = m.image_batch(r["pixel_values"].clone()).unwrap();
        let hidden = m.forward_frozen_bottom(&b, m.layers.len()).unwrap();
        let want_hidden = r["hidden"].reshape((2 * 17, 32)).unwrap();
        let dh = max_abs_diff(&hidden.to_dtype(DType::F64).unwrap(), &want_hidden);
        assert!(dh < tol, "{dtype:?}: hidden state off by {dh}");
        let logits = Pass::inference(|pass| m.forward_eval(&b, pass)).unwrap();
        let d = max_abs_diff(&logits.to_dtype(DType::F64).unwrap(), &r["logits"]);
        assert!(d < tol, "{dtype:?}: logits off by {d}");
    }
}

/// Every adapter's and the classifier's gradient equal candle's autograd through the same
/// forward (dropout on, same seed): the pre-LN layers, the patch embeddings below them and the
/// image head above them.
#[test]
fn whole_model_gradients_match_autograd() {
    let m = tiny(0.1);
    let ours = grads(&m, &Recompute::None);
    let mut taped = m.clone();
    let vars = crate::adapters::block::tape_adapters(&mut taped);
    let w = Var::from_tensor(taped.head.classifier.weight.as_dense().unwrap()).unwrap();
    taped.head.classifier.weight = crate::nn::linear::Weight::Dense(w.as_tensor().clone());
    let b = image_batch(&m, pixels());
    let mut rng = StdRng::seed_from_u64(5);
    let mut pass = Pass::training(&mut rng);
    let (logits, _) = taped
        .forward_train(&b, &mut pass, &Recompute::None)
        .unwrap();
    let lse = logits.exp().unwrap().sum_keepdim(1).unwrap().log().unwrap();
    let logp = logits.broadcast_sub(&lse).unwrap();
    let picked = logp
        .gather(
            &Tensor::from_vec(LABELS.to_vec(), (2, 1), &Device::Cpu).unwrap(),
            1,
        )
        .unwrap();
    let tape = picked
        .mean_all()
        .unwrap()
        .neg()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(ours.adapters.len(), 3 * 6);
    assert_eq!(ours.adapters.len(), vars.len());
    for ((l, s, g), (vl, vs, a, b)) in ours.adapters.iter().zip(&vars) {
        assert_eq!((*l, *s), (*vl, *vs));
        let da = rel_err(&g.a, tape.get(a).unwrap());
        let db = rel_err(&g.b, tape.get(b).unwrap());
        // candle's gelu_erf backward uses 6-digit constants (see gpt2_tests).
        assert!(
            da < 1e-5 && db < 1e-5,
            "layer {l} {s:?}: dA off by {da:e}, dB off by {db:e} (relative)"
        );
    }
    assert!(max_abs_diff(&ours.head.weight, tape.get(&w).unwrap()) < 1e-9);
    assert!(ours.head.dense.is_none());
}

/// Our gradients against central finite differences of the loss (same dropout masks), on a
/// sample of entries of every adapter's A and B and of the classifier: to 1e-7 (candle's GELU
/// forward and its erf, which the backward uses, agree to ~1e-8 here).
#[test]
fn whole_model_gradients_match_finite_differences() {
    let m = tiny(0.1);
    let ours = grads(&m, &Recompute::None);
    let h = 1e-5;
    let mut worst = 0f64;
    let fd = |m2: &dyn Fn(f64) -> ViTForImageClassification| {
        (loss_f64(&m2(h)) - loss_f64(&m2(-h))) / (2.0 * h)
    };
    for (k, (l, s, g)) in ours.adapters.iter().enumerate() {
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
                    m2
                };
                let f = fd(&shifted);
                let d = (f - want[e]).abs();
                worst = worst.max(d);
                assert!(
                    d < 1e-7,
                    "layer {l} {s:?} {which} entry {e}: {} vs fd {f}",
                    want[e]
                );
            }
        }
    }
    let want: Vec<f64> = ours.head.weight.flatten_all().unwrap().to_vec1().unwrap();
    for e in [0, 5, want.len() - 1] {
        let shifted = |delta: f64| {
            let mut m2 = m.clone();
            let t = m2.head.classifier.weight.as_dense_mut().unwrap();
            let mut v: Vec<f64> = t.flatten_all().unwrap().to_vec1().unwrap();
            v[e] += delta;
            *t = Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap();
            m2
        };
        let f = fd(&shifted);
        let d = (f - want[e]).abs();
        worst = worst.max(d);
        assert!(d < 1e-7, "classifier entry {e}: {} vs fd {f}", want[e]);
    }
    assert!(worst > 0.0);
}

/// Gradient checkpointing and a frozen bottom: the same gradients bit for bit with checkpointed
/// layers and with layers recomputing their feed-forward input (pre-LN: from `ln_out`'s `xhat`); with layers 0-1 frozen, only layer 2's adapters get gradients, equal to the unfrozen
/// run's (no dropout: the frozen bottom runs in inference mode).
#[test]
fn checkpointing_and_frozen_bottom_keep_the_gradients() {
    let m = tiny(0.1);
    let g = grads(&m, &Recompute::None);
    for r in crate::model::stack::test_recomputes() {
        let g_ck = grads(&m, &r);
        assert_eq!(g.adapters.len(), g_ck.adapters.len());
        for ((_, _, a), (_, _, b)) in g.adapters.iter().zip(&g_ck.adapters) {
            assert_eq!(max_abs_diff(&a.a, &b.a), 0.0, "{r:?}");
            assert_eq!(max_abs_diff(&a.b, &b.b), 0.0, "{r:?}");
        }
    }
    let mut m = tiny(0.0);
    let all = grads(&m, &Recompute::None);
    for (l, s) in m.adapter_sites() {
        m.adapter_mut(l, s).unwrap().trainable = l >= 2;
    }
    let top = grads(&m, &Recompute::None);
    assert!(!top.adapters.is_empty() && top.adapters.iter().all(|(l, _, _)| *l == 2));
    for (l, s, g) in &top.adapters {
        let (_, _, ga) = all
            .adapters
            .iter()
            .find(|(la, sa, _)| la == l && sa == s)
            .unwrap();
        assert!(max_abs_diff(&g.a, &ga.a) < 1e-12 && max_abs_diff(&g.b, &ga.b) < 1e-12);
    }
}

/// LoRA on ViT's default targets names PEFT's module paths, and the adapter has no task type
/// (PEFT has none for image classification) and saves the classifier.
#[test]
fn lora_targets_peft_module_paths() {
    let cfg = BertConfig::tiny_of(EncoderFamily::ViT, 0.0);
    let mut rng = StdRng::seed_from_u64(1);
    let mut m =
        ViTForImageClassification::random(cfg, 3, DType::F32, &Device::Cpu, &mut rng).unwrap();
    let targets = EncoderFamily::ViT.spec().default_targets;
    let lora = LoraConfig {
        target_modules: targets.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    };
    assert_eq!(m.add_lora(&lora, None, &mut rng).unwrap(), 2 * 3);
    let (l, s) = m.adapter_sites()[1];
    assert_eq!(
        m.adapter_path(l, s),
        "vit.encoder.layer.0.attention.attention.value"
    );
    use crate::adapters::Adapted;
    assert_eq!(m.peft_task_type(), None);
    let dir = tempfile::tempdir().unwrap();
    crate::io::peft::save(dir.path(), &m, &lora, "base").unwrap();
    let pc = crate::io::peft::read_config(dir.path()).unwrap();
    assert_eq!(pc.task_type, None);
    assert_eq!(pc.modules_to_save, Some(vec!["classifier".to_string()]));
    let mut back =
        ViTForImageClassification::random(m.config.clone(), 3, DType::F32, &Device::Cpu, &mut rng)
            .unwrap();
    back.add_lora(&lora, None, &mut rng).unwrap();
    crate::io::peft::load(dir.path(), &mut back).unwrap();
    let d = max_abs_diff(
        &back.head.classifier.weight.dense().unwrap(),
        &m.head.classifier.weight.dense().unwrap(),
    );
    assert_eq!(d, 0.0);
}

/// transformers 5 renames ViT's modules as it loads the checkpoint (its conversion mapping
/// `ViTModel`: `vit.layers.N.attention.q_proj` for `vit.encoder.layer.N.attention.attention.query`):
/// the adapter names its targets and weights in both namings (with all-linear too, each site
/// once), so PEFT finds them under transformers 4 and 5, and an adapter file written under the
/// new names alone loads.
#[test]
fn vit_adapters_name_their_targets_under_transformers_4_and_5() {
    use crate::adapters::Adapted;
    use crate::io::peft;
    let cfg = BertConfig::tiny_of(EncoderFamily::ViT, 0.0);
    let mut rng = StdRng::seed_from_u64(2);
    let new = |rng: &mut StdRng, targets: &[&str]| {
        let mut m =
            ViTForImageClassification::random(cfg.clone(), 3, DType::F32, &Device::Cpu, rng)
                .unwrap();
        let lora = LoraConfig {
            target_modules: targets.iter().map(|t| t.to_string()).collect(),
            ..Default::default()
        };
        m.add_lora(&lora, None, rng).unwrap();
        (m, lora)
    };
    let dir = tempfile::tempdir().unwrap();
    let (m, lora) = new(&mut rng, &["query", "value"]);
    peft::save(dir.path(), &m, &lora, "base").unwrap();
    let pc = peft::read_config(dir.path()).unwrap();
    assert_eq!(
        pc.target_modules,
        ["query", "value", "attention.q_proj", "attention.v_proj"]
    );
    let (all, all_lora) = new(&mut rng, &["all-linear"]);
    let all_dir = tempfile::tempdir().unwrap();
    peft::save(all_dir.path(), &all, &all_lora, "base").unwrap();
    let targets = peft::read_config(all_dir.path()).unwrap().target_modules;
    assert_eq!(targets.len(), 12, "{targets:?}");
    for t in [
        "attention.attention.key",
        "attention.k_proj",
        "mlp.fc1",
        "output.dense",
    ] {
        assert!(targets.contains(&t.to_string()), "{t} not in {targets:?}");
    }

    // The weights are under both names; a file with transformers 5's names alone (as PEFT may
    // write it there) loads into the same tensors.
    let file = dir.path().join(peft::WEIGHTS_FILE);
    let tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let old = "base_model.model.vit.encoder.layer.1.attention.attention.value.lora_B.weight";
    let new_key = "base_model.model.vit.layers.1.attention.v_proj.lora_B.weight";
    assert_eq!(max_abs_diff(&tensors[old], &tensors[new_key]), 0.0);
    assert_eq!(tensors.len(), 2 * 2 * 6 + 2, "{:?}", tensors.keys());
    let renamed: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .filter(|(k, _)| !k.contains("vit.encoder.layer."))
        .collect();
    assert_eq!(renamed.len(), 2 * 6 + 2);
    candle_core::safetensors::save(&renamed, &file).unwrap();
    let (mut back, _) = new(&mut rng, &["query", "value"]);
    peft::load(dir.path(), &mut back).unwrap();
    for ((p, a), (q, b)) in m.adapters().into_iter().zip(back.adapters()) {
        assert_eq!(p, q);
        assert_eq!(max_abs_diff(&a.a, &b.a), 0.0, "{p}");
        assert_eq!(max_abs_diff(&a.b, &b.b), 0.0, "{p}");
    }
}

/// A config's image geometry is checked at load, naming the file and the key.
#[test]
fn bad_vit_configs_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    let base = serde_json::json!({"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64, "image_size": 28, "patch_size": 7,
        "num_channels": 3});
    assert!(BertConfig::from_file(&{
        std::fs::write(&path, base.to_string()).unwrap();
        path.clone()
    })
    .is_ok());
    for (key, value, want) in [
        ("patch_size", serde_json::json!(5), "multiple of patch_size"),
        ("num_channels", serde_json::json!(0), "num_channels = 0"),
        ("image_size", serde_json::json!(1 << 20), "image_size"),
        (
            "num_attention_heads",
            serde_json::json!(5),
            "multiple of num_attention_heads",
        ),
        ("qkv_bias", serde_json::json!(false), "qkv_bias"),
        ("hidden_act", serde_json::json!("relu"), "hidden_act"),
    ] {
        let mut c = base.clone();
        c[key] = value;
        std::fs::write(&path, c.to_string()).unwrap();
        let e = BertConfig::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains(want), "{key}: {e}");
    }
}
