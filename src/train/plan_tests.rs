use super::*;
use crate::adapters::{Adapted, LoraConfig};
use crate::model::stack::Parts;
use crate::model::{BertConfig, BertForSequenceClassification};
use candle_core::{DType, Device};
use rand::SeedableRng;

const SEQ: usize = 64;
/// A GPU at this width: a pass is efficient from 8,192 tokens (launch-bound: splitting costs
/// time), and nothing is offloaded.
const GPU: &PlanDevice = &PlanDevice {
    efficient_tokens: 8192,
    offload: None,
};
/// ... and a CPU (compute-bound: splitting is nearly free).
const CPU: &PlanDevice = &PlanDevice {
    efficient_tokens: 256,
    offload: None,
};

/// Six layers, LoRA on query and value of each.
fn model() -> BertForSequenceClassification {
    model_of_width(32)
}

/// [`model`] at another width (4 heads, feed-forward 4x wide).
fn model_of_width(hidden: usize) -> BertForSequenceClassification {
    let cfg = BertConfig::sized(50, hidden, 6, 4, 4 * hidden, SEQ, 0.1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut m =
        BertForSequenceClassification::random(cfg, 2, DType::F32, &Device::Cpu, &mut rng).unwrap();
    let lora = LoraConfig {
        r: 4,
        target_modules: vec!["query".into(), "value".into()],
        ..Default::default()
    };
    m.add_lora(&lora, None, &mut rng).unwrap();
    m
}

fn freeze(m: &mut BertForSequenceClassification, layers: &[usize]) {
    for id in m.adapter_ids() {
        if layers.contains(&id.layer) {
            m.adapter_by_id_mut(id).unwrap().trainable = false;
        }
    }
}

/// In the steps where SAFE measures importance on the training forward, its temporaries sit
/// beside a layer's state: at width 256 and 8 tokens a pass (the Gram form) they outweigh the
/// layer's own temporaries, so a budget the plain step fits needs checkpoints once measuring,
/// and the measuring plan's estimate, with them, fits.
#[test]
fn a_measuring_step_keeps_room_for_the_measurement() {
    let (m, rows, seq) = (model_of_width(256), 2, 4);
    let measure = measure_bytes(&m, rows, seq);
    assert_eq!(measure, 8 * (6 * 8 * 256 + 4 * 8 * 8));
    let plain = step_bytes(&m, &Recompute::None, rows, seq);
    let measured = step_bytes_measured(&m, &Recompute::None, rows, seq, measure);
    assert!(
        measured > plain && measured <= plain + measure,
        "{plain} {measured}"
    );
    let budget = plain + plain / 11;
    let p = plan(&m, rows, 1, seq, false, &[], Some(budget), GPU, false).unwrap();
    assert_eq!(recomputed(&p), 0);
    let q = plan(&m, rows, 1, seq, false, &[], Some(budget), GPU, true).unwrap();
    assert!(recomputed(&q) > 0, "{q:?}");
    let m_q = measure_bytes(&m, q.micro, seq);
    let estimate = step_bytes_measured(&m, &q.recompute(), q.micro, seq, m_q);
    assert!(estimate <= budget - budget / BUDGET_MARGIN);
    // A run that measures keeps both: the measured steps checkpoint, the others need not.
    let make = |measuring| plan(&m, rows, 1, seq, false, &[], Some(budget), GPU, measuring);
    let plans = StepPlans::new(true, make).unwrap();
    assert_eq!((plans.step(false), plans.step(true)), (&p, &q));
    assert!(!p.measuring && q.measuring);
    let plain = StepPlans::new(false, make).unwrap();
    assert_eq!((plain.step(true), plain.all().count()), (&p, 1));
}

/// Layers a plan recomputes, whole or parts.
fn recomputed(p: &MemoryPlan) -> usize {
    p.checkpointed.len() + p.ffn_recomputed.len() + p.attention_recomputed.len()
}

/// A budget a little under the plain step is met by recomputing the feed-forward inputs of a
/// few layers (a quarter of a layer's forward each in this model), not by checkpointing a whole
/// layer; a tighter one adds attentions (44% of a layer's forward for 30% of its state: dearer
/// for what they free), and one under what every part frees adds whole layers.
#[test]
fn a_budget_recomputes_parts_before_whole_layers() {
    let m = model();
    let full = step_bytes(&m, &Recompute::None, 16, SEQ);
    let state = m.layer_memory(0, 16, SEQ);
    assert!(state.ffn_input > state.state / 4, "{state:?}");
    // 2hf / (8h^2 + 4hf + 4 seq h) = 8192 / 32768 at h = 32, f = 128, seq = 64.
    assert_eq!(state.ffn_cost_pct, 25, "{state:?}");
    let p = plan(&m, 16, 1, SEQ, false, &[], Some(full * 9 / 10), GPU, false).unwrap();
    assert_eq!(p.micro, 16);
    assert!(
        p.checkpointed.is_empty() && !p.ffn_recomputed.is_empty(),
        "{p:?}"
    );
    assert!(p.estimated_step_bytes <= full * 9 / 10);
    assert!(
        p.describe().contains("feed-forward input recomputed"),
        "{}",
        p.describe()
    );
    let state = m.layer_memory(0, 16, SEQ);
    // (6h^2 + 4 seq h) / (8h^2 + 4hf + 4 seq h): 14336 / 32768, rounded up.
    assert_eq!(state.attention_cost_pct, 44, "{state:?}");
    assert!(p.attention_recomputed.is_empty(), "{p:?}");
    let q = plan(&m, 16, 1, SEQ, false, &[], Some(full * 7 / 10), GPU, false).unwrap();
    assert!(q.checkpointed.is_empty(), "{q:?}");
    assert!(!q.attention_recomputed.is_empty(), "{q:?}");
    // The cheaper part per byte first: a layer recomputing its attention recomputes its
    // feed-forward input too.
    let ffn = &q.ffn_recomputed;
    assert!(
        q.attention_recomputed.iter().all(|l| ffn.contains(l)),
        "{q:?}"
    );
    let parts = Recompute::Layers {
        whole: Default::default(),
        ffn: (0..6).collect(),
        attention: (0..6).collect(),
        offload: Default::default(),
    };
    let tighter = step_bytes(&m, &parts, 16, SEQ) * 11 / 12 - 1;
    let q = plan(&m, 16, 1, SEQ, false, &[], Some(tighter), GPU, false).unwrap();
    assert!(!q.checkpointed.is_empty(), "{q:?}");
    assert!(q.checkpointed.iter().all(|l| !q.ffn_recomputed.contains(l)));
    assert!(q
        .checkpointed
        .iter()
        .all(|l| !q.attention_recomputed.contains(l)));
    // What the plan runs is what it estimated.
    assert_eq!(
        step_bytes(&m, &q.recompute(), 16, SEQ),
        q.estimated_step_bytes
    );
}

#[test]
fn without_a_budget_the_plan_is_the_flags() {
    let m = model();
    let p = plan(&m, 8, 2, SEQ, false, &[], None, GPU, false).unwrap();
    assert_eq!((p.micro, p.accum, p.checkpointed.len()), (8, 2, 0));
    let p = plan(&m, 8, 2, SEQ, true, &[], None, GPU, false).unwrap();
    assert_eq!(p.checkpointed, (0..6).collect::<Vec<_>>());
    assert!(p.estimated_step_bytes < step_bytes(&m, &Recompute::None, 8, SEQ));
}

/// A budget between the checkpointed and the plain step: the batch stays whole (splitting it
/// below efficient passes costs more than recomputing a few layers) and only as much as needed
/// is recomputed (parts, then whole layers); the estimate fits; a smaller budget recomputes more
/// and a much smaller one checkpoints whole layers.
#[test]
fn a_budget_checkpoints_as_few_layers_as_needed() {
    let m = model();
    let full = step_bytes(&m, &Recompute::None, 16, SEQ);
    let p = plan(
        &m,
        16,
        1,
        SEQ,
        false,
        &[],
        Some(full + full / 10),
        GPU,
        false,
    )
    .unwrap();
    assert_eq!((p.micro, p.checkpointed.len()), (16, 0));
    let p = plan(&m, 16, 1, SEQ, false, &[], Some(full * 8 / 10), GPU, false).unwrap();
    assert_eq!(p.micro, 16);
    assert!(recomputed(&p) > 0 && p.checkpointed.len() < 6, "{p:?}");
    assert!(p.estimated_step_bytes <= full * 8 / 10);
    let q = plan(&m, 16, 1, SEQ, false, &[], Some(full * 5 / 10), GPU, false).unwrap();
    assert!(recomputed(&q) > recomputed(&p) || q.micro < 16, "{q:?}");
    assert!(q.estimated_step_bytes <= full * 5 / 10);
    let r = plan(&m, 16, 1, SEQ, false, &[], Some(full * 4 / 10), GPU, false).unwrap();
    assert!(!r.checkpointed.is_empty() || r.micro < 16, "{r:?}");
    assert!(r.estimated_step_bytes <= full * 4 / 10);
    // The step's examples are unchanged: passes of `micro` rows, `accum` of them.
    assert_eq!((q.micro * q.accum, r.micro * r.accum), (16, 16));
}

/// On a CPU, splitting the batch is nearly free: a budget is met by smaller passes first.
#[test]
fn on_a_cpu_the_batch_is_split_before_layers_are_checkpointed() {
    let m = model();
    let full = step_bytes(&m, &Recompute::None, 16, SEQ);
    let p = plan(&m, 16, 1, SEQ, false, &[], Some(full * 8 / 10), CPU, false).unwrap();
    assert_eq!((p.micro, p.accum, p.checkpointed.len()), (8, 2, 0));
}

/// Below what checkpointing every layer allows, the batch is split into passes.
#[test]
fn a_tight_budget_splits_the_batch_and_too_small_a_budget_is_an_error() {
    let m = model();
    let all = Recompute::All;
    let tight = step_bytes(&m, &all, 4, SEQ);
    let p = plan(&m, 16, 1, SEQ, false, &[], Some(tight), GPU, false).unwrap();
    assert!(p.micro <= 4 && p.micro * p.accum == 16, "{p:?}");
    assert!(p.estimated_step_bytes <= tight);
    let one = step_bytes(&m, &all, 1, SEQ);
    let e = plan(&m, 16, 1, SEQ, false, &[], Some(one / 2), GPU, false).unwrap_err();
    assert!(e.to_string().contains("--memory-budget"), "{e}");
}

/// Layers whose adapters are all frozen above a trainable one only pass the gradient down:
/// they are recomputed first (their feed-forward input, or whole).
#[test]
fn pass_through_layers_are_checkpointed_first() {
    let mut m = model();
    freeze(&mut m, &[1, 2, 3]);
    let p = plan(&m, 16, 1, SEQ, false, &[], None, GPU, false).unwrap();
    assert_eq!(
        (p.first_trained_layer, p.pass_through.clone()),
        (0, vec![1, 2, 3])
    );
    // Without a budget the plan says what they hold: their saved state.
    let held =
        |ls: &[usize]| -> usize { ls.iter().map(|&l| m.layer_memory(l, 16, SEQ).state).sum() };
    assert!(held(&[1]) > 0);
    assert_eq!(p.pass_through_bytes, held(&[1, 2, 3]));
    assert!(
        p.describe().contains("pass-through: layers 1-3"),
        "{}",
        p.describe()
    );
    let full = step_bytes(&m, &Recompute::None, 16, SEQ);
    for budget in [full * 9 / 10, full * 6 / 10] {
        let p = plan(&m, 16, 1, SEQ, false, &[], Some(budget), GPU, false).unwrap();
        let through = |ls: &[usize]| ls.iter().all(|l| [1, 2, 3].contains(l));
        assert!(recomputed(&p) > 0, "{p:?}");
        // Layer 0 trains: it is recomputed only once all of layers 1-3 are.
        let all_through = |ls: &[usize]| [1, 2, 3].iter().all(|l| ls.contains(l));
        assert!(
            through(&p.checkpointed) || all_through(&p.checkpointed),
            "{p:?}"
        );
        let recomputed = [&p.ffn_recomputed[..], &p.attention_recomputed[..]].concat();
        assert!(
            !recomputed.contains(&0)
                || all_through(&[&recomputed[..], &p.checkpointed[..]].concat()),
            "{p:?}"
        );
        let kept: usize = [1, 2, 3]
            .into_iter()
            .filter(|l| !p.checkpointed.contains(l))
            .map(|l| m.layer_memory(l, 16, SEQ).kept(p.recompute().keep(l)))
            .sum();
        assert_eq!(p.pass_through_bytes, kept, "{p:?}");
    }
}

/// As SAFE freezes the bottom, the same budget needs less recomputation.
#[test]
fn freezing_relaxes_the_plan() {
    let mut m = model();
    let budget = step_bytes(&m, &Recompute::None, 16, SEQ) * 6 / 10;
    let before = plan(&m, 16, 1, SEQ, false, &[], Some(budget), GPU, false).unwrap();
    freeze(&mut m, &[0, 1, 2, 3]);
    let after = plan(&m, 16, 1, SEQ, false, &[], Some(budget), GPU, false).unwrap();
    assert_eq!(after.first_trained_layer, 4);
    assert!(
        recomputed(&after) < recomputed(&before),
        "{before:?} {after:?}"
    );
}

#[test]
fn sizes_parse_as_people_write_them() {
    assert_eq!(parse_bytes("6GB"), Ok(6_000_000_000));
    assert_eq!(parse_bytes("900MB"), Ok(900_000_000));
    assert_eq!(parse_bytes("1.5GiB"), Ok(1_610_612_736));
    assert_eq!(parse_bytes("4096"), Ok(4096));
    assert!(parse_bytes("lots").is_err());
    assert!(parse_bytes("5 parsecs").is_err());
    assert!(parse_bytes("0MB").is_err());
    let t: ByteSize =
        toml::from_str::<std::collections::HashMap<String, ByteSize>>("b = \"2GB\"").unwrap()["b"];
    assert_eq!(t, ByteSize(2_000_000_000));
}

/// The frozen bottom's cache: always on a CPU; on a GPU for passes where a layer is launch-bound
/// (MiniLM at 16 x 128 tokens, SmolLM2 at 4 x 128), not for LLaMA-7B's width at 4 x 128.
#[test]
fn the_frozen_cache_pays_on_a_cpu_and_for_launch_bound_gpu_passes() {
    assert!(frozen_cache_pays(false, 4096, 4 * 128));
    assert!(frozen_cache_pays(true, 384, 16 * 128));
    assert!(frozen_cache_pays(true, 576, 4 * 128));
    assert!(!frozen_cache_pays(true, 4096, 4 * 128));
}

/// The recomputation chosen is the cheapest that fits, against every combination of the six
/// layers' choices (keep all, less the feed-forward input, the attention or both, or checkpoint
/// whole), over budgets from 30% to 99% of the plain step, with and without pass-through layers
/// (then with their rule: a trained layer recomputes a part only once every pass-through layer
/// recomputes all it can, and is checkpointed only once every pass-through layer is). Measuring
/// steps included (SAFE's temporaries beside a layer's).
#[test]
fn the_recomputation_is_the_cheapest_that_fits() {
    for (frozen, measuring) in [(vec![], false), (vec![1, 2, 3], false), (vec![], true)] {
        let mut m = model();
        freeze(&mut m, &frozen);
        let through = pass_through(&m, 0);
        assert_eq!(through, frozen);
        let pass = PassMemory::of(&m, 16, SEQ);
        let measure = if measuring {
            measure_bytes(&m, 16, SEQ)
        } else {
            0
        };
        let options: Vec<Vec<(Keep, usize)>> = (0..6).map(|l| choices(&pass.layer(l))).collect();
        assert!(options.iter().all(|o| o.len() == 5));
        let every_part = Keep::State(Parts {
            ffn: true,
            attention: true,
        });
        let full = pass.peak(&Recompute::None, measure);
        let mut cheaper_than_all_parts = 0;
        for pct in 30..100 {
            let budget = full * pct / 100;
            let mut least: Option<usize> = None;
            for code in 0..5usize.pow(6) {
                let keeps: Vec<(Keep, usize)> = (0..6)
                    .map(|l| options[l][code / 5usize.pow(l as u32) % 5])
                    .collect();
                let trained_parts =
                    (0..6).any(|l| !through.contains(&l) && keeps[l].0 != Keep::ALL);
                let trained_whole = (0..6).any(|l| !through.contains(&l) && !keeps[l].0.saves());
                let through_all = through
                    .iter()
                    .all(|&l| [every_part, Keep::Nothing].contains(&keeps[l].0));
                let through_whole = through.iter().all(|&l| keeps[l].0 == Keep::Nothing);
                if (trained_parts && !through_all) || (trained_whole && !through_whole) {
                    continue;
                }
                let recompute = Recompute::from_keeps((0..6).zip(keeps.iter().map(|&(k, _)| k)));
                assert!((0..6).all(|l| recompute.keep(l) == keeps[l].0));
                let cost = keeps.iter().map(|&(_, c)| c).sum();
                if pass.peak(&recompute, measure) <= budget && least.is_none_or(|l| cost < l) {
                    least = Some(cost);
                }
            }
            let chosen = cheapest_recompute(&m, &through, 16, SEQ, measure, budget, None);
            assert_eq!(
                chosen.as_ref().map(|c| c.cost_pct),
                least,
                "{pct}% {frozen:?}"
            );
            let Some(c) = chosen else { continue };
            assert_eq!(c.estimate, pass.peak(&c.recompute, measure));
            assert!(c.estimate <= budget);
            let parts: usize = (0..6).map(|l| options[l][3].1).sum();
            cheaper_than_all_parts += usize::from(c.cost_pct < parts);
        }
        assert!(cheaper_than_all_parts > 10, "{cheaper_than_all_parts}");
    }
}

/// An offloaded layer's state counts only while it is the nearest offloaded layer below the
/// running one: offloading every layer leaves the peak of two neighbouring layers, offloading none
/// changes nothing, and the estimate follows that definition for other sets.
#[test]
fn the_nearest_offloaded_layer_below_counts() {
    let m = model();
    let pass = PassMemory::of(&m, 16, SEQ);
    let kept = |l: usize| pass.kept(&pass.layer(l), Keep::ALL);
    let at = |l: usize| pass.at_layer(&pass.layer(l), Keep::ALL, 0);
    // The peak by its definition: at each layer, what the layers below keep on the device (of
    // the offloaded ones only the nearest), beside the layer's own; then the head (`l` = 6),
    // with no offloaded layer's state.
    let peak = |offloaded: &[usize]| {
        let on_device = |j: usize, l: usize| {
            let nearest = offloaded.iter().filter(|&&o| o < l).max();
            !offloaded.contains(&j) || (nearest == Some(&j) && l < 6)
        };
        (0..6)
            .map(|l| (0..l).filter(|&j| on_device(j, l)).map(kept).sum::<usize>() + at(l))
            .chain([
                (0..6).filter(|&j| on_device(j, 6)).map(kept).sum::<usize>() + pass.x + pass.head,
                pass.below,
            ])
            .max()
            .unwrap()
    };
    let plain = peak(&[]);
    assert_eq!(pass.peak(&Recompute::None, 0), plain);
    assert_eq!(pass.peak(&Recompute::offloading([]), 0), plain);
    for offloaded in [
        vec![0, 1, 2, 3, 4, 5],
        vec![0, 1],
        vec![1, 3],
        vec![0, 4],
        vec![5],
    ] {
        let estimate = pass.peak(&Recompute::offloading(offloaded.clone()), 0);
        assert_eq!(estimate, peak(&offloaded), "{offloaded:?}");
    }
    let all = pass.peak(&Recompute::offloading(0..6), 0);
    assert!(all < plain * 2 / 3, "{all} of {plain}");
}

/// With offloading among the choices, the plan is still the cheapest that fits: against every
/// combination of the six layers' nine choices (five keeps, four of them offloaded too) whose
/// offloaded layers are spaced as their copies need (the next offloaded layer, or the end of the
/// forward, at least `spacing` layers above), over budgets from 20% to 99% of the plain step,
/// with copies that hide behind one, two and three layers; and a cheap enough offload replaces
/// recomputation.
#[test]
fn with_offload_the_plan_is_still_the_cheapest_that_fits() {
    let m = model();
    let pass = PassMemory::of(&m, 16, SEQ);
    let layer_bytes = pass.kept(&pass.layer(0), Keep::ALL);
    for gap in 1..=3 {
        let price = OffloadPrice {
            issue_pct: 7,
            // A whole layer's state takes `gap` forwards to copy; less state, fewer.
            bytes_per_forward: layer_bytes as f64 / gap as f64 + 1.0,
        };
        assert_eq!(price.spacing(layer_bytes), gap);
        let options: Vec<Vec<(Keep, usize, bool)>> = (0..6)
            .map(|l| {
                let m = pass.layer(l);
                choices(&m)
                    .into_iter()
                    .flat_map(|(k, c)| {
                        let moved = k.saves().then_some((k, c + price.issue_pct, true));
                        [(k, c, false)].into_iter().chain(moved)
                    })
                    .collect()
            })
            .collect();
        assert!(options.iter().all(|o| o.len() == 9));
        // Every combination's cost and estimated peak, where its offloaded layers are spaced.
        let mut all = Vec::with_capacity(9usize.pow(6));
        for code in 0..9usize.pow(6) {
            let picks: Vec<(Keep, usize, bool)> = (0..6)
                .map(|l| options[l][code / 9usize.pow(l as u32) % 9])
                .collect();
            let moved: Vec<usize> = (0..6).filter(|&l| picks[l].2).collect();
            let spaced = moved.iter().enumerate().all(|(i, &l)| {
                let above = moved.get(i + 1).map_or(6 - l - 1, |&next| next - l);
                above >= price.spacing(pass.kept(&pass.layer(l), picks[l].0))
            });
            if !spaced {
                continue;
            }
            let recompute = Recompute::from_keeps((0..6).zip(picks.iter().map(|p| p.0)))
                .with_offload(moved.iter().copied());
            let cost: usize = picks.iter().map(|p| p.1).sum();
            all.push((cost, pass.peak(&recompute, 0)));
        }
        let full = pass.peak(&Recompute::None, 0);
        let mut offloaded_plans = 0;
        for pct in (20..100).step_by(3) {
            let budget = full * pct / 100;
            let least = (all.iter())
                .filter(|(_, peak)| *peak <= budget)
                .map(|(c, _)| *c)
                .min();
            let chosen = cheapest_recompute(&m, &[], 16, SEQ, 0, budget, Some(&price));
            assert_eq!(
                chosen.as_ref().map(|c| c.cost_pct),
                least,
                "{pct}%, gap {gap}"
            );
            let Some(c) = chosen else { continue };
            assert_eq!(c.estimate, pass.peak(&c.recompute, 0));
            assert!(c.estimate <= budget);
            offloaded_plans += usize::from((0..6).any(|l| c.recompute.offloads(l)));
        }
        assert!(offloaded_plans > 5, "gap {gap}: {offloaded_plans}");
    }
    // Copies that need more forwards than the pass has layers (or than the search tracks) are
    // never offered, however cheap to issue.
    let slow = OffloadPrice {
        issue_pct: 0,
        bytes_per_forward: layer_bytes as f64 / 1000.0,
    };
    let full = pass.peak(&Recompute::None, 0);
    for pct in (20..100).step_by(7) {
        let c = cheapest_recompute(&m, &[], 16, SEQ, 0, full * pct / 100, Some(&slow));
        assert!(c.is_none_or(|c| (0..6).all(|l| !c.recompute.offloads(l))));
    }
}

/// The price of offloading on an H100 from its rates: none where a pass is launch-bound
/// (MiniLM's 16 x 128 tokens); at the LLaMA-7B shape's 4,096 tokens in bf16 a layer's 370 MB of
/// saved state copies in about three of its forwards, and the copies' issue is a few percent of
/// one.
#[test]
fn offload_is_priced_from_the_gpu_rates() {
    let rates = crate::device::GpuRates {
        half_flops_per_s: 500e12,
        f32_flops_per_s: 50e12,
        host_bytes_per_s: 40e9,
        offload_issue_s: 100e-6,
        layer_launch_s: 150e-6,
    };
    assert_eq!(OffloadPrice::of(&rates, 384, 16, 128, 4), None);
    let p = OffloadPrice::of(&rates, 4096, 1, 4096, 2).unwrap();
    // 4,096 x (24 x 4096^2 + 4 x 4096^2) FLOP at 500 TFLOP/s: 3.85 ms a forward.
    let forward_s: f64 = 4096.0 * 28.0 * 4096.0 * 4096.0 / 500e12;
    assert_eq!(p.issue_pct, (100.0 * 100e-6 / forward_s).ceil() as usize);
    assert_eq!(p.issue_pct, 3);
    assert_eq!(p.spacing(370_000_000), 3);
    assert_eq!(p.spacing(1), 1);
    // f32 runs at a tenth of the rate: its copies hide behind fewer forwards.
    let f32 = OffloadPrice::of(&rates, 4096, 1, 4096, 4).unwrap();
    assert_eq!(f32.spacing(370_000_000), 1);
}

/// Without a budget, `--offload-layers` is the plan: the layers listed from the lowest trainable
/// one up, with the estimate of that offload (the frozen layers below keep nothing to move).
#[test]
fn without_a_budget_offloaded_layers_are_the_flags() {
    let mut m = model();
    let p = plan(&m, 16, 1, SEQ, false, &[1, 3], None, GPU, false).unwrap();
    assert_eq!(p.offloaded, [1, 3]);
    assert!(p.recompute().offloads(3) && !p.recompute().offloads(2));
    let offloaded = Recompute::offloading([1, 3]);
    assert_eq!(p.estimated_step_bytes, step_bytes(&m, &offloaded, 16, SEQ));
    assert!(p.estimated_step_bytes < step_bytes(&m, &Recompute::None, 16, SEQ));
    assert!(
        p.describe().contains("offloaded: layers [1, 3]"),
        "{}",
        p.describe()
    );
    freeze(&mut m, &[0, 1]);
    let p = plan(&m, 16, 1, SEQ, false, &[1, 3], None, GPU, false).unwrap();
    assert_eq!(p.offloaded, [3]);
}
