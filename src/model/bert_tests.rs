//! Tests of `model::bert`.

use super::*;
use crate::model::stack::Recompute;
use crate::nn::attention::mask_to_additive;
use crate::nn::gradcheck::max_abs_diff;
use candle_core::Var;
use rand::rngs::StdRng;
use rand::SeedableRng;

fn tiny(dropout: f64) -> BertForSequenceClassification {
    let cfg = BertConfig::tiny(dropout);
    let mut rng = StdRng::seed_from_u64(1);
    let mut m =
        BertForSequenceClassification::random(cfg, 3, DType::F64, &Device::Cpu, &mut rng).unwrap();
    let lora = LoraConfig {
        r: 2,
        alpha: 4.0,
        dropout,
        target_modules: vec!["query".into(), "value".into(), "dense".into()],
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
        input_ids: ids,
        token_type_ids: Tensor::zeros((2, 6), DType::U32, &Device::Cpu).unwrap(),
        mask_add: mask_to_additive(&mask, DType::F64).unwrap(),
        batch: 2,
        seq: 6,
    };
    (b, vec![2, 0])
}

fn loss_grads(m: &BertForSequenceClassification) -> (ModelGrads, ForwardSaved) {
    loss_grads_with(m, false)
}

fn loss_grads_with(
    m: &BertForSequenceClassification,
    checkpoint: bool,
) -> (ModelGrads, ForwardSaved) {
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

/// Whole-model check: every adapter's and the classifier's gradients equal candle's autograd
/// through the same forward (dropout on, same seed), on a tiny random BERT in f64.
#[test]
fn whole_model_gradients_match_autograd() {
    let m = tiny(0.1);
    let (ours, _) = loss_grads(&m);
    let mut taped = m.clone();
    let vars = crate::adapters::block::tape_adapters(&mut taped);
    let w = Var::from_tensor(taped.head.classifier.weight.as_dense().unwrap()).unwrap();
    taped.head.classifier.weight = crate::nn::linear::Weight::Dense(w.as_tensor().clone());
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
        let da = max_abs_diff(&g.a, tape.get(a).unwrap());
        let db = max_abs_diff(&g.b, tape.get(b).unwrap());
        assert!(
            da < 1e-9 && db < 1e-9,
            "layer {l} {s:?}: dA off by {da}, dB off by {db}"
        );
    }
    assert!(max_abs_diff(&ours.head.weight, tape.get(&w).unwrap()) < 1e-9);
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
