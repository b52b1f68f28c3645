//! Tests of `model::llama`.

use super::*;
use crate::adapters::LoraConfig;
use crate::model::stack::Recompute;
use crate::model::{CausalLm, LmBatch};
use crate::nn::gradcheck::{max_abs_diff, randn};
use crate::nn::loss::LmLoss;
use rand::rngs::StdRng;
use rand::SeedableRng;

fn tiny(tied: bool) -> LlamaForCausalLM {
    tiny_with(tied, &["q_proj", "v_proj", "down_proj"])
}

fn tiny_with(tied: bool, targets: &[&str]) -> LlamaForCausalLM {
    let cfg = LlamaConfig {
        vocab_size: 40,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 3,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        explicit_head_dim: None,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position_embeddings: 32,
        tie_word_embeddings: tied,
        bos_token_id: None,
        eos_token_id: Vec::new(),
    };
    let mut rng = StdRng::seed_from_u64(3);
    let mut m = LlamaForCausalLM::random(cfg, DType::F64, &Device::Cpu, &mut rng).unwrap();
    // Larger weights than the 0.02 init, so every path moves the loss measurably.
    m.embed_tokens = randn(m.embed_tokens.dims(), 9);
    let lora = LoraConfig {
        r: 2,
        alpha: 4.0,
        dropout: 0.1,
        target_modules: targets.iter().map(|t| t.to_string()).collect(),
        use_rslora: false,
    };
    m.add_lora(&lora, None, &mut rng).unwrap();
    for (i, (l, s)) in m.adapter_sites().into_iter().enumerate() {
        let ad = m.adapter_mut(l, s).unwrap();
        ad.b = randn(ad.b.dims(), 100 + i as u64); // B = 0 (PEFT init) would zero every dA
    }
    m
}

fn batch() -> LmBatch {
    causal::test_batch(DType::F64)
}

fn grads(m: &LlamaForCausalLM) -> (LmLoss, SiteGrads) {
    causal::test_grads(m, &Recompute::None)
}

fn grads_with(m: &LlamaForCausalLM, checkpoint: bool) -> (LmLoss, SiteGrads) {
    causal::test_grads(m, &Recompute::all_if(checkpoint))
}

/// Gradient checkpointing changes what is kept, not what is computed: the same loss and
/// gradients bit for bit (the LoRA dropout masks replayed from the saved RNG state), with
/// only the trainable layers' inputs kept. Without a `down_proj` adapter the second forward
/// stops before `down_proj` (`LlamaLayer::state`), with the same result.
#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    for (targets, frozen_below) in [
        (&["q_proj", "v_proj", "down_proj"][..], 0),
        (&["q_proj", "v_proj", "down_proj"][..], 2),
        (&["q_proj", "v_proj"][..], 0),
        (&["q_proj", "v_proj"][..], 2),
    ] {
        let mut m = tiny_with(true, targets);
        for (l, s) in m.adapter_sites() {
            m.adapter_mut(l, s).unwrap().trainable = l >= frozen_below;
        }
        causal::assert_same_grads(
            &grads_with(&m, false),
            &grads_with(&m, true),
            "checkpointed",
        );
        let mut rng = StdRng::seed_from_u64(5);
        let mut pass = Pass::training(&mut rng);
        let (_, saved) = m
            .forward_train(&batch(), &mut pass, &Recompute::All, None)
            .unwrap();
        let kept = (saved.layers.states_kept(), saved.layers.checkpoints_kept());
        assert_eq!(kept, (0, 3 - frozen_below));
    }
}

/// A layer recomputing its feed-forward input (SwiGLU's gate and up from the kept post-attention
/// norm output, the `gate_proj` and `up_proj` adapters' dropout replayed), alone or beside a
/// checkpointed layer, with the bottom layer frozen or not: the same loss and gradients bit for
/// bit.
#[test]
fn recomputing_the_feed_forward_input_gives_the_same_gradients() {
    for (targets, frozen_below) in [
        (&["q_proj", "v_proj"][..], 0),
        (&["gate_proj", "up_proj", "down_proj"][..], 0),
        (&["gate_proj", "up_proj", "down_proj"][..], 1),
    ] {
        let mut m = tiny_with(false, targets);
        for (l, s) in m.adapter_sites() {
            m.adapter_mut(l, s).unwrap().trainable = l >= frozen_below;
        }
        let kept = grads(&m);
        for r in crate::model::stack::test_recomputes() {
            causal::assert_same_grads(&kept, &causal::test_grads(&m, &r), &format!("{r:?}"));
        }
    }
}

/// The plan's costs of a layer (`LayerMemory`): recomputing the feed-forward input is gate's
/// and up's share of the forward's matmul FLOPs, recomputing the attention q's, k's, v's and the
/// attention's products'; a checkpointed layer's second forward costs a whole forward with a
/// `down_proj` adapter and stops before `down_proj` without one; in a launch-bound GPU pass every
/// product and attention step counts the same.
#[test]
fn layer_costs_follow_the_forward() {
    let acts = crate::model::memory::Acts::new(2, 8, DType::F64, &Device::Cpu);
    // Per token at hidden 16, kv 8, FFN 24: q 512, k and v 256 each, o 512, gate and up 1536,
    // down 768, attention's products 4*8*16 = 512; 4,352 in all.
    for (targets, checkpoint) in [
        (&["q_proj"][..], 100 - 18), // down: 768 / 4352 = 17.6%, rounded up
        (&["q_proj", "down_proj"][..], 100),
    ] {
        let m = tiny_with(false, targets);
        let l = m.layers[0].memory(acts);
        assert_eq!(l.ffn_cost_pct, 36, "1536 / 4352 = 35.3%, rounded up");
        assert_eq!(l.attention_cost_pct, 36, "(1024 + 512) / 4352 = 35.3%");
        assert_eq!(l.checkpoint_cost_pct, checkpoint, "{targets:?}");
        assert_eq!(l.ffn_input, 2 * acts.of(24));
    }
    // On a GPU the 16 tokens are launch-bound (far under 30e9 / (24 * 16^2)): each product and
    // each of the attention's three steps costs the same, 10 in all. Gate and up: 2 (20%); q,
    // k, v and the three steps: 6 (60%); the second forward, stopping before down: 9 (90%).
    let gpu = crate::model::memory::Acts {
        on_gpu: true,
        ..acts
    }
    .at_width(16);
    assert!(gpu.launch_bound);
    let l = tiny_with(false, &["q_proj"]).layers[0].memory(gpu);
    let costs = (l.ffn_cost_pct, l.attention_cost_pct, l.checkpoint_cost_pct);
    assert_eq!(costs, (20, 60, 90));
}

/// On a GPU a product whose output is under one wave of tiles costs as much as that wave: with a
/// floor of 320 output elements over the 16 tokens (20 columns), q, k, v, o (16 and 8 wide) and
/// down (16) cost as if 20 wide, gate and up (24) their FLOPs, and the shares follow.
#[test]
fn a_gpu_product_under_one_wave_costs_the_wave() {
    let acts = crate::model::memory::Acts {
        matmul_floor: 320,
        ..crate::model::memory::Acts::new(2, 8, DType::F64, &Device::Cpu)
    };
    assert_eq!((acts.matmul(16, 16), acts.matmul(24, 16)), (640, 768));
    let l = tiny_with(false, &["q_proj"]).layers[0].memory(acts);
    // q, k, v 3 x 640, o 640, gate and up 1536, down 2*24*20 = 960, attention 512: 5,568.
    assert_eq!(l.ffn_cost_pct, 28, "1536 / 5568 = 27.6%");
    assert_eq!(l.attention_cost_pct, 44, "(1920 + 512) / 5568 = 43.7%");
    assert_eq!(l.checkpoint_cost_pct, 100 - 18, "down: 960 / 5568 = 17.2%");
}

/// Every adapter's gradient equals candle's autograd through the same forward (LoRA dropout
/// on, same seed) and a full-logits cross-entropy, on a tiny random GQA decoder in f64.
#[test]
fn whole_model_gradients_match_autograd() {
    for tied in [true, false] {
        let m = tiny(tied);
        let (loss, ours) = grads(&m);
        let mut taped = m.clone();
        let vars = crate::adapters::block::tape_adapters(&mut taped);
        let mut rng = StdRng::seed_from_u64(5);
        let mut pass = Pass::training(&mut rng);
        let b = batch();
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
            let da = max_abs_diff(&g.a, tape.get(a).unwrap());
            let db = max_abs_diff(&g.b, tape.get(b).unwrap());
            assert!(
                da < 1e-9 && db < 1e-9,
                "tied {tied} layer {l} {s:?}: dA off by {da}, dB off by {db}"
            );
        }
    }
}

/// Freezing the bottom layers' adapters: those layers save nothing, get no gradient, and the
/// top layer's gradients are unchanged.
#[test]
fn frozen_bottom_layers_save_nothing() {
    let mut m = tiny(true);
    // No dropout: a frozen bottom runs in inference mode, so only then are the two runs'
    // top-layer inputs the same.
    for (l, site) in m.adapter_sites() {
        m.adapter_mut(l, site).unwrap().dropout = crate::nn::dropout::Dropout::new(0.0);
    }
    let (_, all) = grads(&m);
    for (l, s) in m.adapter_sites() {
        if l < 2 {
            m.adapter_mut(l, s).unwrap().trainable = false;
        }
    }
    let mut rng = StdRng::seed_from_u64(5);
    let mut pass = Pass::training(&mut rng);
    let (_, saved) = m
        .forward_train(&batch(), &mut pass, &Recompute::None, None)
        .unwrap();
    assert_eq!((saved.first, saved.layers.states_kept()), (2, 1));
    let (_, top) = grads(&m);
    assert!(top.iter().all(|(l, _, _)| *l == 2));
    for (l, s, g) in &top {
        let (_, _, ga) = all.iter().find(|(la, sa, _)| la == l && sa == s).unwrap();
        assert!(max_abs_diff(&g.a, &ga.a) < 1e-12 && max_abs_diff(&g.b, &ga.b) < 1e-12);
    }
}
