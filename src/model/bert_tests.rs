//! Tests of `model::bert`.

use super::*;
use crate::model::stack::Recompute;
use crate::nn::attention::mask_to_additive;
use crate::nn::gradcheck::{max_abs_diff, rel_err};
use candle_core::Var;
use rand::rngs::StdRng;
use rand::SeedableRng;

fn tiny(dropout: f64) -> BertForSequenceClassification {
    tiny_of(EncoderFamily::Bert, dropout)
}

/// A tiny random model of `family` in f64 with LoRA (BERT: on query, value and the three
/// `dense`; the others: on every linear), every `B` nonzero.
fn tiny_of(family: EncoderFamily, dropout: f64) -> BertForSequenceClassification {
    let cfg = BertConfig::tiny_of(family, dropout);
    let mut rng = StdRng::seed_from_u64(1);
    let mut m =
        BertForSequenceClassification::random(cfg, 3, DType::F64, &Device::Cpu, &mut rng).unwrap();
    let targets: &[&str] = match family {
        EncoderFamily::Bert => &["query", "value", "dense"],
        _ => &["all-linear"],
    };
    let lora = LoraConfig {
        r: 2,
        alpha: 4.0,
        dropout,
        target_modules: targets.iter().map(|t| t.to_string()).collect(),
        use_rslora: false,
    };
    m.add_lora(&lora, None, &mut rng).unwrap();
    // B starts at zero (PEFT init), which would make every dA zero: give B values.
    for (i, (l, s)) in m.adapter_sites().into_iter().enumerate() {
        let ad = m.adapter_mut(l, s).unwrap();
        ad.b = crate::nn::gradcheck::randn(ad.b.dims(), 100 + i as u64);
    }
    m
}

fn batch() -> (BatchTensors, Vec<u32>) {
    let ids = Tensor::from_vec(
        vec![2u32, 7, 9, 11, 3, 0, 2, 13, 5, 3, 0, 0],
        (2, 6),
        &Device::Cpu,
    )
    .unwrap();
    let mask = Tensor::from_vec(
        vec![1u32, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0, 0],
        (2, 6),
        &Device::Cpu,
    )
    .unwrap();
    let b = BatchTensors {
        pixel_values: None,
        input_ids: ids,
        token_type_ids: Tensor::zeros((2, 6), DType::U32, &Device::Cpu).unwrap(),
        mask_add: mask_to_additive(&mask, DType::F64).unwrap(),
        batch: 2,
        seq: 6,
    };
    (b, vec![2, 0])
}

fn loss_grads(
    m: &BertForSequenceClassification,
) -> (ModelGrads, ForwardSaved<crate::nn::head::HeadSaved>) {
    loss_grads_with(m, false)
}

fn loss_grads_with(
    m: &BertForSequenceClassification,
    checkpoint: bool,
) -> (ModelGrads, ForwardSaved<crate::nn::head::HeadSaved>) {
    let (b, labels) = batch();
    let mut rng = StdRng::seed_from_u64(5);
    let mut pass = Pass {
        training: true,
        rng: &mut rng,
    };
    let (logits, saved) = m
        .forward_train(
            &b,
            &mut pass,
            &crate::model::stack::Recompute::all_if(checkpoint),
        )
        .unwrap();
    let (_, dlogits) = crate::nn::loss::cross_entropy(&logits, &labels).unwrap();
    let (_, saved2) = {
        let mut rng = StdRng::seed_from_u64(5);
        let mut pass = Pass {
            training: true,
            rng: &mut rng,
        };
        m.forward_train(
            &b,
            &mut pass,
            &crate::model::stack::Recompute::all_if(checkpoint),
        )
        .unwrap()
    };
    (m.backward(saved, &dlogits).unwrap(), saved2)
}

/// Gradient checkpointing (every dropout on, LoRA's included): the same adapter and
/// classifier gradients bit for bit, with only the trainable layers' inputs kept.
#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    let mut m = tiny(0.1);
    for frozen_below in [0, 1] {
        for (l, s) in m.adapter_sites() {
            m.adapter_mut(l, s).unwrap().trainable = l >= frozen_below;
        }
        let ((g, _), (g_ck, saved_ck)) = (loss_grads(&m), loss_grads_with(&m, true));
        assert_eq!(
            (
                saved_ck.layers.states_kept(),
                saved_ck.layers.checkpoints_kept()
            ),
            (0, 3 - frozen_below)
        );
        assert_eq!(max_abs_diff(&g.head.weight, &g_ck.head.weight), 0.0);
        assert_eq!(g.adapters.len(), g_ck.adapters.len());
        for ((l, s, a), (l_ck, s_ck, b)) in g.adapters.iter().zip(&g_ck.adapters) {
            assert_eq!((l, *s as usize), (l_ck, *s_ck as usize));
            assert_eq!(max_abs_diff(&a.a, &b.a), 0.0);
            assert_eq!(max_abs_diff(&a.b, &b.b), 0.0);
        }
    }
}

/// Whole-model check, for every family: every adapter's and the head's trained gradients (the
/// classifier's, and RoBERTa's, MPNet's and DistilBERT's dense layer's) equal candle's autograd
/// through the same forward (dropout on, same seed), on a tiny random model in f64.
#[test]
fn whole_model_gradients_match_autograd() {
    for family in EncoderFamily::TEXT {
        let m = tiny_of(family, 0.1);
        let (ours, _) = loss_grads(&m);
        let mut taped = m.clone();
        let vars = crate::adapters::block::tape_adapters(&mut taped);
        let tape_linear = |l: &mut crate::nn::linear::Linear| {
            let w = Var::from_tensor(l.weight.as_dense().unwrap()).unwrap();
            l.weight = crate::nn::linear::Weight::Dense(w.as_tensor().clone());
            w
        };
        let w = tape_linear(&mut taped.head.classifier);
        let dense = m
            .head
            .dense_trains
            .then(|| tape_linear(&mut taped.head.dense));
        assert_eq!(dense.is_some(), family != EncoderFamily::Bert);
        let (b, labels) = batch();
        let mut rng = StdRng::seed_from_u64(5);
        let mut pass = Pass {
            training: true,
            rng: &mut rng,
        };
        let (logits, _) = taped
            .forward_train(&b, &mut pass, &Recompute::None)
            .unwrap();
        let lse = logits.exp().unwrap().sum_keepdim(1).unwrap().log().unwrap();
        let logp = logits.broadcast_sub(&lse).unwrap();
        let picked = logp
            .gather(&Tensor::from_vec(labels, (2, 1), &Device::Cpu).unwrap(), 1)
            .unwrap();
        let loss = picked.mean_all().unwrap().neg().unwrap();
        let tape = loss.backward().unwrap();
        assert_eq!(ours.adapters.len(), vars.len());
        for ((l, s, g), (vl, vs, a, b)) in ours.adapters.iter().zip(&vars) {
            assert_eq!((*l, *s), (*vl, *vs));
            // Relative: MPNet's relative bias makes some gradients larger than BERT's.
            let da = crate::nn::gradcheck::rel_err(&g.a, tape.get(a).unwrap());
            let db = crate::nn::gradcheck::rel_err(&g.b, tape.get(b).unwrap());
            assert!(
                da < 1e-5 && db < 1e-5,
                "{family:?} layer {l} {s:?}: dA off by {da:e}, dB off by {db:e} (relative)"
            );
        }
        assert!(max_abs_diff(&ours.head.weight, tape.get(&w).unwrap()) < 1e-9);
        match (&ours.head.dense, &dense) {
            (Some(g), Some(v)) => {
                let d = crate::nn::gradcheck::rel_err(&g.weight, tape.get(v).unwrap());
                assert!(
                    d < 1e-9,
                    "{family:?}: the dense layer's gradient is off by {d:e}"
                );
            }
            (None, None) => {}
            _ => panic!("{family:?}: dense gradients where the dense layer does not train"),
        }
    }
}

/// Freezing the bottom adapters changes what is computed: those layers save nothing, get no
/// gradient, and the backward stops above them.
#[test]
fn frozen_bottom_layers_save_nothing_and_get_no_gradient() {
    // No dropout: a frozen bottom runs in inference mode, so only then are the two runs'
    // top-layer inputs the same.
    let mut m = tiny(0.0);
    let (all, saved_all) = loss_grads(&m);
    assert_eq!(saved_all.first_saved_layer, 0);
    assert_eq!(saved_all.layers.states_kept(), 3);
    for (l, s) in m.adapter_sites() {
        if l < 2 {
            m.adapter_mut(l, s).unwrap().trainable = false;
        }
    }
    assert_eq!(m.lowest_trainable_layer(), Some(2));
    let (top, saved_top) = loss_grads(&m);
    assert_eq!(saved_top.first_saved_layer, 2);
    assert_eq!(
        saved_top.layers.states_kept(),
        1,
        "only the trainable top layer keeps state"
    );
    assert!(top.adapters.iter().all(|(l, _, _)| *l == 2));
    // The top layer's gradients are unchanged by freezing the layers below it.
    for (l, s, g) in &top.adapters {
        let (_, _, ga) = all
            .adapters
            .iter()
            .find(|(la, sa, _)| la == l && sa == s)
            .unwrap();
        assert!(max_abs_diff(&g.a, &ga.a) < 1e-12 && max_abs_diff(&g.b, &ga.b) < 1e-12);
    }
}

// ------------------------------------------------------------ MPNet on the real all-mpnet-base-v2

/// The fetched all-mpnet-base-v2 folder (`safetune fetch mpnet`), or `None` (and a note) when it
/// is not in the cache; required under `SAFETUNE_REQUIRE_ASSETS`.
fn mpnet_dir() -> Option<std::path::PathBuf> {
    let dir = crate::io::joined::mpnet_model_dir(&crate::io::fetch::default_cache_dir());
    if dir.join("model.safetensors").is_file() {
        return Some(dir);
    }
    let why = format!("{} is missing; run `safetune fetch mpnet`", dir.display());
    assert!(
        std::env::var_os("SAFETUNE_REQUIRE_ASSETS").is_none(),
        "{why}"
    );
    eprintln!("skipping: {why}");
    None
}

#[derive(serde::Deserialize)]
struct MpnetReference {
    input_ids: Vec<Vec<u32>>,
    lengths: Vec<usize>,
    feature_step: usize,
    hidden: Vec<Vec<Vec<f64>>>,
}

/// MPNet through the BERT body (its tensor names, positions from the padding index, no token
/// types, the relative position bias in every layer) gives the last hidden state of
/// scripts/mpnet_reference.py's float64 numpy forward, for a right-padded batch; and LoRA names
/// its adapters by MPNet's module paths.
#[test]
fn mpnet_matches_the_numpy_reference() {
    let Some(dir) = mpnet_dir() else { return };
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mpnet/reference.json");
    let r: MpnetReference = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let mut rng = StdRng::seed_from_u64(0);
    let mut m =
        BertForSequenceClassification::load(&dir, 2, DType::F32, &Device::Cpu, &mut rng).unwrap();
    assert_eq!(m.config.family(), EncoderFamily::MPNet);
    let (b, t) = (r.input_ids.len(), r.input_ids[0].len());
    let ids: Vec<u32> = r.input_ids.concat();
    let mask: Vec<u32> = r
        .lengths
        .iter()
        .flat_map(|&n| (0..t).map(move |j| u32::from(j < n)))
        .collect();
    let dev = Device::Cpu;
    let batch = BatchTensors {
        pixel_values: None,
        input_ids: Tensor::from_vec(ids, (b, t), &dev).unwrap(),
        token_type_ids: Tensor::zeros((b, t), DType::U32, &dev).unwrap(),
        mask_add: mask_to_additive(&Tensor::from_vec(mask, (b, t), &dev).unwrap(), DType::F32)
            .unwrap(),
        batch: b,
        seq: t,
    };
    let h = m.forward_frozen_bottom(&batch, m.layers.len()).unwrap();
    let h: Vec<Vec<f32>> = h.to_vec2().unwrap();
    let mut worst = 0f64;
    for (row, tokens) in r.hidden.iter().enumerate() {
        for (tok, want) in tokens.iter().enumerate() {
            let got = &h[row * t + tok];
            for (k, w) in want.iter().enumerate() {
                worst = worst.max((got[k * r.feature_step] as f64 - w).abs());
            }
        }
    }
    assert!(worst < 1e-4, "largest difference {worst}");
    let lora = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec!["q".into(), "v".into()],
        use_rslora: false,
    };
    assert_eq!(m.add_lora(&lora, None, &mut rng).unwrap(), 24);
    let names: Vec<String> = crate::adapters::Adapted::adapters(&m)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names[0], "mpnet.encoder.layer.0.attention.attn.q");
    assert_eq!(names[23], "mpnet.encoder.layer.11.attention.attn.v");
}

/// transformers' bucket table, computed by hand from its definition for a few offsets: exact
/// below 8, log-spaced to 15 beyond, keys after the query in the upper half.
#[test]
fn mpnet_relative_buckets() {
    let t = 200;
    let b = relative_buckets(t, 32);
    let at = |i: usize, j: usize| b[i * t + j];
    assert_eq!(at(0, 0), 0);
    assert_eq!(at(5, 0), 5); // key 5 before the query
    assert_eq!(at(0, 5), 16 + 5); // key 5 after
    assert_eq!(at(8, 0), 8); // 8 + floor(log(1)/log(16)*8)
    assert_eq!(at(16, 0), 10); // 8 + floor(log(2)/log(16)*8) = 8 + 2
    assert_eq!(at(0, 127), 16 + 15); // 8 + floor(log(127/8)/log(16)*8) = 15
    assert_eq!(at(199, 0), 15); // capped
}

// ------------------------------------------------ transformers-written fixtures (hf_fixtures.py)

/// A fixture folder of `tests/fixtures/hf` and its `reference.safetensors`.
fn hf_fixture(
    name: &str,
) -> (
    std::path::PathBuf,
    std::collections::HashMap<String, Tensor>,
) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name);
    let r = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    (dir, r)
}

/// The reference batch (`input_ids`, `attention_mask`; no token types), its mask in `dtype`.
fn reference_batch(r: &std::collections::HashMap<String, Tensor>, dtype: DType) -> BatchTensors {
    let (b, t) = r["input_ids"].dims2().unwrap();
    let u32s = |k: &str| r[k].to_dtype(DType::U32).unwrap();
    BatchTensors {
        pixel_values: None,
        input_ids: u32s("input_ids"),
        token_type_ids: Tensor::zeros((b, t), DType::U32, &Device::Cpu).unwrap(),
        mask_add: mask_to_additive(&u32s("attention_mask"), dtype).unwrap(),
        batch: b,
        seq: t,
    }
}

/// The rows of `[batch*seq, hidden]` that are tokens (padded rows' states are never read),
/// checking that the fixture pads.
fn token_rows(r: &std::collections::HashMap<String, Tensor>) -> Tensor {
    let mask: Vec<u32> = r["attention_mask"]
        .to_dtype(DType::U32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(mask.contains(&0), "the fixture pads a row");
    let keep: Vec<u32> = (0..mask.len() as u32)
        .filter(|&i| mask[i as usize] == 1)
        .collect();
    Tensor::new(keep.as_slice(), &Device::Cpu).unwrap()
}

/// A random MPNet written by transformers (`scripts/hf_fixtures.py`: two layers, a right-padded
/// second row) gives transformers' float64 last hidden state, and its pooler (not part of the
/// sequence classifier, so read from the file here) transformers' pooler output.
#[test]
fn transformers_mpnet_gives_transformers_hidden_states() {
    let (dir, r) = hf_fixture("mpnet-padded");
    let cpu = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(0);
    let m = BertForSequenceClassification::load(&dir, 2, DType::F64, &cpu, &mut rng).unwrap();
    assert_eq!(m.config.family(), EncoderFamily::MPNet);
    let batch = reference_batch(&r, DType::F64);
    let (b, t) = (batch.batch, batch.seq);
    let h = m.forward_frozen_bottom(&batch, m.layers.len()).unwrap();
    let want = r["hidden"].reshape((b * t, ())).unwrap();
    let keep = token_rows(&r);
    let pick = |x: &Tensor| x.index_select(&keep, 0).unwrap();
    assert!(max_abs_diff(&pick(&h), &pick(&want)) < 1e-9);
    let w = candle_core::safetensors::load(dir.join("model.safetensors"), &cpu).unwrap();
    let f64s = |k: &str| w[k].to_dtype(DType::F64).unwrap();
    let pooler = Linear::new(f64s("pooler.dense.weight"), Some(f64s("pooler.dense.bias")));
    let first = Tensor::new(&[0u32, t as u32], &cpu).unwrap();
    let pooled = pooler
        .forward(&h.index_select(&first, 0).unwrap())
        .unwrap()
        .tanh()
        .unwrap();
    assert!(max_abs_diff(&pooled, &r["pooled"]) < 1e-9);
}

/// `--task qa` builds the QA model of every text family: its PEFT keys name `qa_outputs` at the
/// root, `task_type` QUESTION_ANS, and no classifier; ViT has none.
#[test]
fn qa_model_families() {
    use crate::adapters::{Adapted, HeadParam, ParamId};
    for family in EncoderFamily::TEXT {
        let mut rng = StdRng::seed_from_u64(1);
        let cfg = BertConfig::tiny_of(family, 0.0);
        let m = BertForQuestionAnswering::random(cfg, DType::F32, &Device::Cpu, &mut rng).unwrap();
        let keys: Vec<String> = m
            .head_params()
            .into_iter()
            .map(|(h, _)| crate::io::peft::param_key(&m, ParamId::Head(h)))
            .collect();
        assert_eq!(keys, ["qa_outputs.weight", "qa_outputs.bias"], "{family:?}");
        assert_eq!(m.head_path(HeadParam::ClassifierWeight), None);
        assert_eq!(m.peft_task_type(), Some("QUESTION_ANS"));
    }
    let vit = EncoderFamily::ViT.qa_support().unwrap_err();
    assert!(vit.contains("--task qa") && vit.contains("'vit'"), "{vit}");
}

/// BERT, RoBERTa and DistilBERT question answering against transformers (`scripts/hf_fixtures.py`
/// `*-qa`: each family's `...ForQuestionAnswering` and its own tokenizer): the windows that
/// `QaEncoder` cuts equal what a `PreTrainedTokenizerFast` gives `run_qa.py` (ids, token types,
/// context offsets), and the checkpoint's `qa_outputs` gives transformers' float64 start and end
/// logits on the padded windows.
#[test]
fn transformers_qa_windows_and_span_logits() {
    use crate::data::squad::{QaEncoder, SquadExample};
    #[derive(serde::Deserialize)]
    struct Window {
        ids: Vec<u32>,
        type_ids: Option<Vec<u32>>,
        offsets: Vec<Option<(usize, usize)>>,
    }
    #[derive(serde::Deserialize)]
    struct Reference {
        question: String,
        context: String,
        max_length: usize,
        doc_stride: usize,
        windows: Vec<Window>,
    }
    for (name, family) in [
        ("bert-qa", EncoderFamily::Bert),
        ("roberta-qa", EncoderFamily::Roberta),
        ("distilbert-qa", EncoderFamily::DistilBert),
    ] {
        let (dir, r) = hf_fixture(name);
        let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
        let want: Reference = serde_json::from_str(&text).unwrap();
        let example = SquadExample {
            id: "q".into(),
            question: want.question.clone(),
            context: want.context.as_str().into(),
            answers: Vec::new(),
            article: 0,
        };
        let encoder = QaEncoder::from_model_dir(&dir, want.max_length, want.doc_stride).unwrap();
        let got = encoder.features(&[example]).unwrap();
        assert!(
            want.windows.len() >= 3,
            "{name}: the fixture has several windows"
        );
        assert_eq!(
            got.len(),
            want.windows.len(),
            "{name}: windows {:?}",
            got.iter().map(|g| g.ids.clone()).collect::<Vec<_>>()
        );
        for (i, (g, w)) in got.iter().zip(&want.windows).enumerate() {
            assert_eq!(g.ids, w.ids, "{name}: window {i}'s ids");
            assert_eq!(g.offsets, w.offsets, "{name}: window {i}'s context offsets");
            if let Some(types) = &w.type_ids {
                assert_eq!(&g.type_ids, types, "{name}: window {i}'s token types");
            }
        }

        let mut rng = StdRng::seed_from_u64(0);
        let m = BertForQuestionAnswering::load(&dir, DType::F64, &Device::Cpu, &mut rng).unwrap();
        assert_eq!(m.config.family(), family);
        let mut batch = reference_batch(&r, DType::F64);
        batch.token_type_ids = r["token_type_ids"].to_dtype(DType::U32).unwrap();
        let logits = Pass::inference(|pass| m.forward_eval(&batch, pass)).unwrap();
        let keep = token_rows(&r);
        let pick = |x: &Tensor| x.index_select(&keep, 0).unwrap();
        for (col, key) in [(0, "start_logits"), (1, "end_logits")] {
            let got = logits.narrow(1, col, 1).unwrap().flatten_all().unwrap();
            let want = r[key].flatten_all().unwrap();
            let d = max_abs_diff(&pick(&got), &pick(&want));
            assert!(d < 1e-9, "{name}: {key} off by {d}");
        }
    }
}

/// The QA model (`qa_outputs` on the same body): every adapter's and `qa_outputs`' gradients of
/// the masked span loss equal candle's autograd through the same forward (dropout on, same
/// seed), the loss computed on the tape from the start / end columns with padding masked. The
/// tolerance is relative (1e-6): these gradients are ~1e-4, and autograd and central finite
/// differences both agree with ours to ~1e-11 absolute.
#[test]
fn qa_model_gradients_match_autograd() {
    let c = tiny(0.1);
    let mut rng = StdRng::seed_from_u64(2);
    let mut m =
        BertForQuestionAnswering::random(c.config.clone(), DType::F64, &Device::Cpu, &mut rng)
            .unwrap();
    m.layers = c.layers.clone(); // the adapters of `tiny`, B nonzero
    let (b, _) = batch();
    let mask = [1u32, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0, 0];
    let (starts, ends) = ([1u32, 2], [3u32, 3]);
    let forward = |m: &BertForQuestionAnswering| {
        let mut rng = StdRng::seed_from_u64(5);
        let mut pass = Pass {
            training: true,
            rng: &mut rng,
        };
        m.forward_train(&b, &mut pass, &Recompute::None).unwrap()
    };
    let (logits, saved) = forward(&m);
    assert_eq!(logits.dims(), &[12, 2]);
    let (_, dlogits) = crate::nn::loss::span_loss(&logits, &mask, &starts, &ends, 2, 6).unwrap();
    let ours = m.backward(saved, &dlogits).unwrap();

    let mut taped = m.clone();
    let vars = crate::adapters::block::tape_adapters(&mut taped);
    let w = Var::from_tensor(taped.head.qa_outputs.weight.as_dense().unwrap()).unwrap();
    taped.head.qa_outputs.weight = crate::nn::linear::Weight::Dense(w.as_tensor().clone());
    let (logits, _) = forward(&taped);
    let add: Vec<f64> = mask
        .iter()
        .map(|&k| if k == 1 { 0.0 } else { -1e9 })
        .collect();
    let add = Tensor::from_vec(add, (2, 6), &Device::Cpu).unwrap();
    let ce = |col: usize, gold: &[u32]| {
        let l = (logits.narrow(1, col, 1).unwrap().reshape((2, 6)).unwrap() + &add).unwrap();
        let lse = l.exp().unwrap().sum_keepdim(1).unwrap().log().unwrap();
        let logp = l.broadcast_sub(&lse).unwrap();
        let idx = Tensor::from_vec(gold.to_vec(), (2, 1), &Device::Cpu).unwrap();
        logp.gather(&idx, 1)
            .unwrap()
            .mean_all()
            .unwrap()
            .neg()
            .unwrap()
    };
    let loss = ((ce(0, &starts) + ce(1, &ends)).unwrap() * 0.5).unwrap();
    let tape = loss.backward().unwrap();
    assert_eq!(ours.adapters.len(), vars.len());
    for ((l, s, g), (vl, vs, a, bv)) in ours.adapters.iter().zip(&vars) {
        assert_eq!((*l, *s), (*vl, *vs));
        let da = rel_err(&g.a, tape.get(a).unwrap());
        let db = rel_err(&g.b, tape.get(bv).unwrap());
        assert!(
            da < 1e-6 && db < 1e-6,
            "layer {l} {s:?}: dA off by {da}, dB off by {db}"
        );
    }
    let dw = rel_err(&ours.head.weight, tape.get(&w).unwrap());
    assert!(dw < 1e-6, "qa_outputs: off by {dw}");
    assert!(
        ours.head
            .weight
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            > 1e-6
    );
}

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
            "model_type": family.model_type(), "vocab_size": 40, "hidden_size": 8,
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
    let prefix = c.family().prefix();
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
                target_modules: family.default_targets().map(String::from).to_vec(),
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
/// base checkpoint (`io::merge`, with the family's names) is a checkpoint of transformers'
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
        let naming = BertConfig::from_file(&base.join("config.json"))
            .unwrap()
            .naming();
        let report = crate::io::merge::merge_adapter(&base, &adapter, &out, &naming).unwrap();
        assert_eq!(report.merged_modules, 12);
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["architectures"][0], family.architecture());
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
