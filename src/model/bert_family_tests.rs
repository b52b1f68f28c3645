//! Tests of `model::bert` across the encoder families: transformers' fixtures, config keys,
//! checkpoint heads, PEFT names and merged folders.

use super::tests::{batch, hf_fixture, reference_batch, token_rows};
use super::*;
use crate::nn::gradcheck::max_abs_diff;
use rand::rngs::StdRng;
use rand::SeedableRng;

/// `name`'s sequence classifier (written by transformers: 3 labels, its own head) through the
/// shared body gives transformers' float64 last hidden state on the tokens (to 1e-9) and its
/// logits through the inference forward, loading the checkpoint's head (to 1e-9 in f64, 1e-4 in
/// f32); and the fixture's tokenizer.json gives the reference ids of its texts.
fn classifier_matches_transformers(name: &str, family: EncoderFamily) {
    let (dir, r) = hf_fixture(name);
    let cpu = Device::Cpu;
    for (dtype, tol) in [(DType::F64, 1e-9), (DType::F32, 1e-4)] {
        let mut rng = StdRng::seed_from_u64(0);
        let m = BertForSequenceClassification::load(&dir, 3, dtype, &cpu, &mut rng).unwrap();
        assert_eq!(m.config.family(), family);
        let batch = reference_batch(&r, dtype);
        if dtype == DType::F64 {
            let h = m.forward_frozen_bottom(&batch, m.layers.len()).unwrap();
            let want = r["hidden"].reshape((batch.batch * batch.seq, ())).unwrap();
            let keep = token_rows(&r);
            let pick = |x: &Tensor| x.index_select(&keep, 0).unwrap();
            let d = max_abs_diff(&pick(&h), &pick(&want));
            assert!(d < 1e-9, "{name}: hidden states off by {d}");
        }
        let logits = Pass::inference(|p| m.forward_eval(&batch, p))
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let d = max_abs_diff(&logits, &r["logits"]);
        assert!(d < tol, "{name} {dtype:?}: logits off by {d}");
    }

    #[derive(serde::Deserialize)]
    struct Texts {
        texts: Vec<String>,
        max_length: usize,
    }
    let p = dir.join("reference.json");
    let t: Texts = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let encoder = crate::data::batch::TextEncoder::from_model_dir(&dir, t.max_length).unwrap();
    let examples: Vec<crate::data::Example> = t
        .texts
        .iter()
        .map(|text| crate::data::Example {
            text_a: text.clone(),
            text_b: None,
            label: crate::data::Label::Class(0),
        })
        .collect();
    let got = encoder.encode_all(&examples).unwrap();
    let vec2 = |k: &str| -> Vec<Vec<u32>> { r[k].to_dtype(DType::U32).unwrap().to_vec2().unwrap() };
    let (ids, mask) = (vec2("input_ids"), vec2("attention_mask"));
    for (row, e) in got.iter().enumerate() {
        let n = mask[row].iter().sum::<u32>() as usize;
        assert_eq!(e.ids, ids[row][..n], "{name}: row {row}'s token ids");
    }
}

/// RoBERTa (`roberta.` names, positions from the padding index, a one-row token type table,
/// byte-level BPE) against transformers' `RobertaForSequenceClassification`.
#[test]
fn transformers_roberta_gives_transformers_hidden_states_and_logits() {
    classifier_matches_transformers("roberta-padded", EncoderFamily::Roberta);
}

/// DistilBERT (its names and config keys, no token types, no attention-output dropout,
/// `pre_classifier` + ReLU) against transformers' `DistilBertForSequenceClassification`.
#[test]
fn transformers_distilbert_gives_transformers_hidden_states_and_logits() {
    classifier_matches_transformers("distilbert-padded", EncoderFamily::DistilBert);
}

// ------------------------------------------------------- family configs, names, heads, merge

/// A tiny `config.json` of `family` in its own keys (DistilBERT's differ), 2 layers, 8 wide.
fn family_config(family: EncoderFamily) -> serde_json::Value {
    match family {
        EncoderFamily::DistilBert => serde_json::json!({
            "model_type": "distilbert", "vocab_size": 40, "dim": 8, "n_layers": 2,
            "n_heads": 2, "hidden_dim": 16, "max_position_embeddings": 20,
            "dropout": 0.1, "attention_dropout": 0.05, "seq_classif_dropout": 0.3,
            "activation": "gelu", "sinusoidal_pos_embds": false, "pad_token_id": 0
        }),
        _ => serde_json::json!({
            "model_type": family.spec().model_type, "vocab_size": 40, "hidden_size": 8,
            "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 16,
            "max_position_embeddings": 20,
            "type_vocab_size": if family == EncoderFamily::Roberta { 1 } else { 2 },
            "pad_token_id": if family == EncoderFamily::Bert { 0 } else { 1 },
            "layer_norm_eps": 1e-5
        }),
    }
}

/// Writes `config` and a checkpoint of its family saved as transformers saves the sequence
/// classifier (base tensors under the family's prefix), seeded values, with the head's layers
/// `head` (`(module, rows)`) at the root.
fn write_checkpoint(dir: &Path, config: &serde_json::Value, head: &[(&str, usize)]) {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("config.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let c = BertConfig::from_file(&path).unwrap();
    let prefix = c.family().spec().prefix;
    let mut shapes: Vec<(String, Vec<usize>)> =
        BertForSequenceClassification::checkpoint_shapes(&c)
            .into_iter()
            .map(|(n, s)| (format!("{prefix}{n}"), s))
            .collect();
    for &(m, rows) in head {
        shapes.push((format!("{m}.weight"), vec![rows, c.hidden_size]));
        shapes.push((format!("{m}.bias"), vec![rows]));
    }
    let tensors: std::collections::HashMap<String, Tensor> = shapes
        .into_iter()
        .enumerate()
        .map(|(i, (n, s))| {
            let t = (crate::nn::gradcheck::randn(&s, 300 + i as u64) * 0.3).unwrap();
            let t = if n.contains("LayerNorm") || n.contains("layer_norm") {
                (t + 1.0).unwrap()
            } else {
                t
            };
            (n, t.to_dtype(DType::F32).unwrap())
        })
        .collect();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
}

fn write_config(dir: &Path, config: &serde_json::Value) -> std::path::PathBuf {
    let path = dir.join("config.json");
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

/// DistilBERT's keys are read into the shared config (its `seq_classif_dropout` as the head's
/// dropout, its fixed LayerNorm epsilon, no token types), and a bad value is named by
/// DistilBERT's key; sinusoidal positions and another activation are refused.
#[test]
fn distilbert_config_is_read_from_its_own_keys() {
    let dir = tempfile::tempdir().unwrap();
    let good = family_config(EncoderFamily::DistilBert);
    let c = BertConfig::from_file(&write_config(dir.path(), &good)).unwrap();
    assert_eq!(c.family(), EncoderFamily::DistilBert);
    assert_eq!(
        (
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.intermediate_size
        ),
        (8, 2, 2, 16)
    );
    assert_eq!(
        (
            c.hidden_dropout_prob,
            c.attention_probs_dropout_prob,
            c.head_dropout()
        ),
        (0.1, 0.05, 0.3)
    );
    assert_eq!((c.layer_norm_eps, c.max_tokens()), (1e-12, 20));
    for (key, value, needle) in [
        (
            "sinusoidal_pos_embds",
            serde_json::json!(true),
            "sinusoidal_pos_embds = true is not supported",
        ),
        (
            "activation",
            serde_json::json!("relu"),
            "activation 'relu' is not supported",
        ),
        (
            "n_heads",
            serde_json::json!(3),
            "dim (8) must be a multiple of n_heads (3)",
        ),
        ("dim", serde_json::json!(0), "dim = 0 is out of range"),
        (
            "seq_classif_dropout",
            serde_json::json!(1.5),
            "seq_classif_dropout = 1.5 must be in [0, 1)",
        ),
        (
            "n_layers",
            serde_json::Value::Null,
            "not a DistilBERT config",
        ),
    ] {
        let mut bad = good.clone();
        bad[key] = value;
        let path = write_config(dir.path(), &bad);
        let e = BertConfig::from_file(&path).unwrap_err().to_string();
        assert!(
            e.contains(&path.display().to_string()) && e.contains(needle),
            "{key}: {e}"
        );
    }
}

/// RoBERTa's positions count from its padding index: 514 rows hold 512 tokens, and a table with
/// no room for a token is refused; an unknown `model_type` is refused, naming the known ones.
#[test]
fn roberta_positions_and_unknown_model_types() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = family_config(EncoderFamily::Roberta);
    cfg["max_position_embeddings"] = 514.into();
    let c = BertConfig::from_file(&write_config(dir.path(), &cfg)).unwrap();
    assert_eq!((c.family(), c.max_tokens()), (EncoderFamily::Roberta, 512));
    for (key, value, needle) in [
        (
            "max_position_embeddings",
            serde_json::json!(2),
            "leaves no position for a token",
        ),
        (
            "model_type",
            serde_json::json!("xlnet"),
            "model_type 'xlnet' is not supported by the encoder (bert, roberta, mpnet, distilbert, vit)",
        ),
    ] {
        let mut bad = cfg.clone();
        bad[key] = value;
        let e = BertConfig::from_file(&write_config(dir.path(), &bad))
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{e}");
    }
}

/// Each family's names: its layers' module paths (PEFT's, under the task model's prefix), its
/// default LoRA targets, and its trained head tensors under PEFT's `modules_to_save` keys; an
/// adapter written with them reads back into a fresh model.
#[test]
fn family_names_and_peft_keys() {
    use crate::adapters::{Adapted, ParamId};
    let cases: [(EncoderFamily, &str, &[&str], &[&str]); 4] = [
        (
            EncoderFamily::Bert,
            "bert.encoder.layer.1.attention.self.value",
            &["classifier.weight", "classifier.bias"],
            &["classifier"],
        ),
        (
            EncoderFamily::Roberta,
            "roberta.encoder.layer.1.attention.self.value",
            &[
                "classifier.out_proj.weight",
                "classifier.out_proj.bias",
                "classifier.dense.weight",
                "classifier.dense.bias",
            ],
            &["classifier"],
        ),
        (
            EncoderFamily::MPNet,
            "mpnet.encoder.layer.1.attention.attn.v",
            &[
                "classifier.out_proj.weight",
                "classifier.out_proj.bias",
                "classifier.dense.weight",
                "classifier.dense.bias",
            ],
            &["classifier"],
        ),
        (
            EncoderFamily::DistilBert,
            "distilbert.transformer.layer.1.attention.v_lin",
            &[
                "classifier.weight",
                "classifier.bias",
                "pre_classifier.weight",
                "pre_classifier.bias",
            ],
            &["classifier", "pre_classifier"],
        ),
    ];
    for (family, last_value, head_keys, modules_to_save) in cases {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        write_checkpoint(&base, &family_config(family), &[]);
        let build = || {
            let mut rng = StdRng::seed_from_u64(4);
            let mut m =
                BertForSequenceClassification::load(&base, 3, DType::F32, &Device::Cpu, &mut rng)
                    .unwrap();
            let lora = LoraConfig {
                r: 2,
                target_modules: family.spec().default_targets.map(String::from).to_vec(),
                ..Default::default()
            };
            assert_eq!(m.add_lora(&lora, None, &mut rng).unwrap(), 4, "{family:?}");
            (m, lora)
        };
        let (m, lora) = build();
        let paths: Vec<String> = m.adapters().into_iter().map(|(p, _)| p).collect();
        assert_eq!(paths[3], last_value);
        let keys: Vec<String> = m
            .trainable_params()
            .into_iter()
            .filter(|(id, _)| matches!(id, ParamId::Head(_)))
            .map(|(id, _)| crate::io::peft::param_key(&m, id))
            .collect();
        assert_eq!(keys, head_keys, "{family:?}");
        let adapter = dir.path().join("adapter");
        crate::io::peft::save(&adapter, &m, &lora, "base").unwrap();
        let cfg = crate::io::peft::read_config(&adapter).unwrap();
        assert_eq!(cfg.modules_to_save.unwrap(), modules_to_save);
        let (mut fresh, _) = build();
        fresh.head.classifier.bias = fresh
            .head
            .classifier
            .bias
            .as_ref()
            .map(|b| (b + 1.0).unwrap());
        crate::io::peft::load(&adapter, &mut fresh).unwrap();
        for ((_, a), (_, b)) in m.head_params().iter().zip(fresh.head_params()) {
            assert_eq!(max_abs_diff(a, &b), 0.0, "{family:?}");
        }
    }
}

/// A checkpoint saved as the sequence classifier loads its own head when its number of labels
/// is asked for (RoBERTa's `classifier.dense` and `out_proj`, DistilBERT's `pre_classifier` and
/// `classifier`), and starts a new classifier, drawn as for a base model, for another number; a
/// BERT checkpoint without its pooler is refused, naming the tensor.
#[test]
fn checkpoint_heads_load_when_they_fit() {
    let head_of = |m: &BertForSequenceClassification| {
        let d = |l: &crate::nn::linear::Linear| l.weight.dense().unwrap().into_owned();
        (d(&m.head.classifier), d(&m.head.dense))
    };
    for (family, head) in [
        (
            EncoderFamily::Roberta,
            [("classifier.out_proj", 3), ("classifier.dense", 8)],
        ),
        (
            EncoderFamily::DistilBert,
            [("classifier", 3), ("pre_classifier", 8)],
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), &family_config(family), &head);
        let w = candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu)
            .unwrap();
        let bare = tempfile::tempdir().unwrap();
        write_checkpoint(bare.path(), &family_config(family), &[]);
        let load_from = |dir: &Path, labels: usize| {
            let mut rng = StdRng::seed_from_u64(9);
            let m = BertForSequenceClassification::load(
                dir,
                labels,
                DType::F32,
                &Device::Cpu,
                &mut rng,
            )
            .unwrap();
            (m, rand::Rng::random::<u64>(&mut rng))
        };
        let load = |labels: usize| load_from(dir.path(), labels);
        let (m, next) = load(3);
        // The random stream after loading is the same whatever the checkpoint holds.
        assert_eq!(next, load_from(bare.path(), 3).1, "{family:?}");
        let (classifier, dense) = head_of(&m);
        assert_eq!(
            max_abs_diff(&classifier, &w[&format!("{}.weight", head[0].0)]),
            0.0
        );
        assert_eq!(
            max_abs_diff(&dense, &w[&format!("{}.weight", head[1].0)]),
            0.0
        );
        let (other, _) = load(2);
        let (classifier, dense) = head_of(&other);
        assert_eq!(classifier.dims(), [2, 8]);
        assert!(
            classifier
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                < 0.2
        );
        assert_eq!(
            max_abs_diff(&dense, &w[&format!("{}.weight", head[1].0)]),
            0.0
        );
    }
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &family_config(EncoderFamily::Bert), &[]);
    let path = dir.path().join("model.safetensors");
    let mut w = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    w.remove("bert.pooler.dense.weight");
    candle_core::safetensors::save(&w, &path).unwrap();
    let mut rng = StdRng::seed_from_u64(9);
    let e = BertForSequenceClassification::load(dir.path(), 3, DType::F32, &Device::Cpu, &mut rng)
        .unwrap_err()
        .to_string();
    assert!(e.contains("pooler.dense.weight"), "{e}");
}

/// For every family, a LoRA adapter (every linear, nonzero B) and trained head merged into the
/// base checkpoint (`merge`, with the family's names) is a checkpoint of transformers'
/// sequence classifier: loaded back without adapters (its head from the file), it gives the
/// adapted model's logits; its config names the class and the labels.
#[test]
fn merged_encoders_give_the_adapted_logits() {
    use crate::adapters::Adapted;
    for family in EncoderFamily::TEXT {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        write_checkpoint(&base, &family_config(family), &[]);
        let mut rng = StdRng::seed_from_u64(2);
        let mut m =
            BertForSequenceClassification::load(&base, 3, DType::F32, &Device::Cpu, &mut rng)
                .unwrap();
        let lora = LoraConfig {
            r: 2,
            alpha: 4.0,
            target_modules: vec!["all-linear".into()],
            ..Default::default()
        };
        assert_eq!(m.add_lora(&lora, None, &mut rng).unwrap(), 12);
        for (i, (l, s)) in m.adapter_sites().into_iter().enumerate() {
            let ad = m.adapter_mut(l, s).unwrap();
            ad.b = (crate::nn::gradcheck::randn(ad.b.dims(), 40 + i as u64) * 0.5)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
        }
        let adapter = dir.path().join("adapter");
        crate::io::peft::save(&adapter, &m, &lora, "base").unwrap();
        let out = dir.path().join("merged");
        let config = BertConfig::from_file(&base.join("config.json")).unwrap();
        let naming = crate::merge::EncoderNaming::of(&config);
        let report = crate::merge::merge_adapter(&base, &adapter, &out, &naming).unwrap();
        assert_eq!(report.merged_modules, 12);
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["architectures"][0], family.spec().architecture);
        assert_eq!(
            (cfg["num_labels"].clone(), cfg["id2label"]["2"].clone()),
            (3.into(), "LABEL_2".into())
        );

        let mut rng = StdRng::seed_from_u64(77);
        let merged =
            BertForSequenceClassification::load(&out, 3, DType::F32, &Device::Cpu, &mut rng)
                .unwrap();
        assert!(merged.adapters().is_empty());
        let (mut b, _) = batch();
        b.mask_add = b.mask_add.to_dtype(DType::F32).unwrap();
        let logits =
            |x: &BertForSequenceClassification| Pass::inference(|p| x.forward_eval(&b, p)).unwrap();
        let want = logits(&m);
        let diff = max_abs_diff(&logits(&merged), &want);
        assert!(
            diff < 1e-5,
            "{family:?}: merged vs adapted logits differ by {diff}"
        );
        let mut plain = m.clone();
        for l in plain.layers.iter_mut() {
            for lin in l.linears.iter_mut() {
                lin.lora = None;
            }
        }
        assert!(
            max_abs_diff(&logits(&plain), &want) > 1e-3,
            "{family:?}: the adapter matters"
        );
    }
}
