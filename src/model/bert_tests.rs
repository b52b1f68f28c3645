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

pub(super) fn batch() -> (BatchTensors, Vec<u32>) {
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
    loss_grads_with(m, &Recompute::None)
}

fn loss_grads_with(
    m: &BertForSequenceClassification,
    recompute: &Recompute,
) -> (ModelGrads, ForwardSaved<crate::nn::head::HeadSaved>) {
    let (b, labels) = batch();
    let mut rng = StdRng::seed_from_u64(5);
    let mut pass = Pass::training(&mut rng);
    let (logits, saved) = m.forward_train(&b, &mut pass, recompute).unwrap();
    let (_, dlogits) = crate::nn::loss::cross_entropy(&logits, &labels).unwrap();
    let (_, saved2) = {
        let mut rng = StdRng::seed_from_u64(5);
        let mut pass = Pass::training(&mut rng);
        m.forward_train(&b, &mut pass, recompute).unwrap()
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
        let ((g, _), (g_ck, saved_ck)) = (loss_grads(&m), loss_grads_with(&m, &Recompute::All));
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

/// Layers recomputing GELU's input (the intermediate linear run again on `ln_attn`'s output from
/// its kept `xhat`, its LoRA dropout replayed), alone or beside a checkpointed layer, every
/// dropout on: the same classifier and adapter gradients bit for bit (in f64 the norm's output
/// from `xhat` is the forward's own arithmetic), and with layer 0 frozen.
#[test]
fn recomputing_the_feed_forward_input_gives_the_same_gradients() {
    let mut m = tiny(0.1);
    for frozen_below in [0, 1] {
        for (l, s) in m.adapter_sites() {
            m.adapter_mut(l, s).unwrap().trainable = l >= frozen_below;
        }
        let (g, _) = loss_grads(&m);
        for r in crate::model::stack::test_recomputes() {
            let (g_r, _) = loss_grads_with(&m, &r);
            assert_eq!(max_abs_diff(&g.head.weight, &g_r.head.weight), 0.0);
            assert_eq!(g.adapters.len(), g_r.adapters.len());
            for ((l, s, a), (l_r, s_r, b)) in g.adapters.iter().zip(&g_r.adapters) {
                assert_eq!((l, *s as usize), (l_r, *s_r as usize));
                assert_eq!(max_abs_diff(&a.a, &b.a), 0.0, "{r:?} layer {l} {s:?}");
                assert_eq!(max_abs_diff(&a.b, &b.b), 0.0, "{r:?} layer {l} {s:?}");
            }
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
        let mut pass = Pass::training(&mut rng);
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

/// On a GPU a MiniLM layer (6 x 384, FFN 1536, 12 heads; LoRA on query and value) at 16 x 128
/// tokens is launch-bound (2,048 tokens, under 30e9 / (24 * 384^2) = 8,477): each product and
/// each of the attention's three steps costs the same, so recomputing the attention (q, k, v
/// and the three steps: 6 of 9) costs more per byte freed than checkpointing the layer whole
/// (measured on an H100: recomputing five layers' attention took longer than checkpointing
/// three whole layers). At 16 x 1024 tokens the layer is not launch-bound and FLOPs count again.
#[test]
fn a_launch_bound_gpu_layer_prices_its_attention_above_the_whole_layer_per_byte() {
    let cfg = BertConfig::sized(100, 384, 1, 12, 1536, 1024, 0.1);
    let mut rng = StdRng::seed_from_u64(1);
    let mut m =
        BertForSequenceClassification::random(cfg, 2, DType::F32, &Device::Cpu, &mut rng).unwrap();
    let lora = LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.1,
        target_modules: vec!["query".into(), "value".into()],
        use_rslora: false,
    };
    m.add_lora(&lora, None, &mut rng).unwrap();
    let gpu = |seq: usize| {
        let cpu = crate::model::memory::Acts::new(16, seq, DType::F32, &Device::Cpu);
        crate::model::memory::Acts {
            cpu_fused: false,
            matmul_floor: 132 * 128 * 256,
            on_gpu: true,
            ..cpu
        }
        .at_width(384)
    };
    let acts = gpu(128);
    assert!(acts.launch_bound);
    let lm = m.layers[0].memory(acts);
    // The intermediate: 1 of 9 -> 12%; q, k, v and the attention: 6 of 9 -> 67%.
    assert_eq!((lm.ffn_cost_pct, lm.attention_cost_pct), (12, 67));
    let whole = 100.0 / (lm.state - acts.of(384)) as f64;
    let attention = lm.attention_cost_pct as f64 / lm.attention_state as f64;
    let ffn = lm.ffn_cost_pct as f64 / lm.ffn_input as f64;
    assert!(
        ffn < whole && whole < attention,
        "{ffn} {whole} {attention}"
    );
    // 16 x 1024 tokens: FLOPs a token, q, k, v and the attention output 2 * 384 * 384 =
    // 294,912 each (their outputs fill the wave), the intermediate and the output 2 * 384 * 1536
    // = 1,179,648 each, the attention's products 4 * 1024 * 384 = 1,572,864; 5,111,808 in all.
    // The intermediate: 23.1% -> 24; q, k, v and the products: 2,457,600, 48.1% -> 49.
    let acts = gpu(1024);
    assert!(!acts.launch_bound);
    let lm = m.layers[0].memory(acts);
    assert_eq!((lm.ffn_cost_pct, lm.attention_cost_pct), (24, 49));
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
pub(super) fn hf_fixture(
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
pub(super) fn reference_batch(
    r: &std::collections::HashMap<String, Tensor>,
    dtype: DType,
) -> BatchTensors {
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
pub(super) fn token_rows(r: &std::collections::HashMap<String, Tensor>) -> Tensor {
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
        let mut pass = Pass::training(&mut rng);
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

/// Test configs (used across the crate's tests).
impl BertConfig {
    /// A 3-layer, 8-wide BERT (vocabulary 50) for tests.
    pub(crate) fn tiny(dropout: f64) -> Self {
        Self::sized(50, 8, 3, 2, 16, 16, dropout)
    }

    /// [`BertConfig::tiny`] as another family: RoBERTa's one-row type table and padding index
    /// 1, DistilBERT's absent token types.
    pub(crate) fn tiny_of(family: EncoderFamily, dropout: f64) -> Self {
        let mut c = Self::tiny(dropout);
        c.model_type = Some(family.spec().model_type.into());
        match family {
            EncoderFamily::Roberta => {
                c.type_vocab_size = 1;
                c.pad_token_id = 1;
                c.max_position_embeddings = 18;
            }
            EncoderFamily::MPNet => {
                c.pad_token_id = 1;
                c.max_position_embeddings = 18;
            }
            EncoderFamily::DistilBert => {
                c.type_vocab_size = 0;
                c.classifier_dropout = Some(2.0 * dropout);
                c.qa_dropout = Some(dropout);
            }
            EncoderFamily::ViT => {
                let g = crate::model::bert_config::ImageGeometry {
                    image_size: 8,
                    patch_size: 4,
                    num_channels: 3,
                };
                c.vocab_size = 1;
                c.type_vocab_size = 0;
                c.max_position_embeddings = g.num_patches() + 1;
                c.classifier_dropout = Some(0.0);
                c.image = Some(g);
            }
            EncoderFamily::Bert => {}
        }
        c
    }
}
