//! The memory model of `train::plan` against the allocator: this file is its own test process
//! (one test), so the process-wide heap counters see only its work.

#[global_allocator]
static ALLOC: safetune::memory::CountingAllocator = safetune::memory::CountingAllocator;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use safetune::adapters::{Adapted, LoraConfig};
use safetune::memory;
use safetune::model::bert::BatchTensors;
use safetune::model::llama::LlamaForCausalLM;
use safetune::model::stack::{Keep, Parts, Recompute};
use safetune::model::StepMemory;
use safetune::model::{BertConfig, BertForSequenceClassification, CausalLm, Gpt2Config};
use safetune::model::{Gpt2LMHeadModel, LlamaConfig, LmBatch};
use safetune::nn::attention::mask_to_additive;
use safetune::nn::Pass;
use safetune::train::plan::step_bytes;

const ROWS: usize = 4;
const SEQ: usize = 32;
/// The ways a layer on the gradient path keeps its state: all of it, less the feed-forward
/// input, less the attention's, less both.
const KEEPS: [Keep; 4] = [
    Keep::ALL,
    Keep::State(Parts {
        ffn: true,
        attention: false,
    }),
    Keep::State(Parts {
        ffn: false,
        attention: true,
    }),
    Keep::State(Parts {
        ffn: true,
        attention: true,
    }),
];

fn lora(targets: &[&str], dropout: f64) -> LoraConfig {
    LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout,
        target_modules: targets.iter().map(|s| s.to_string()).collect(),
        use_rslora: false,
    }
}

fn bert(dropout: f64) -> BertForSequenceClassification {
    let cfg = BertConfig::sized(100, 64, 4, 4, 256, 64, dropout);
    let mut rng = StdRng::seed_from_u64(1);
    let mut m =
        BertForSequenceClassification::random(cfg, 3, DType::F32, &Device::Cpu, &mut rng).unwrap();
    m.add_lora(&lora(&["query", "value", "dense"], dropout), None, &mut rng)
        .unwrap();
    m
}

fn llama() -> LlamaForCausalLM {
    let cfg = LlamaConfig {
        vocab_size: 200,
        hidden_size: 64,
        intermediate_size: 160,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        explicit_head_dim: None,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position_embeddings: 64,
        tie_word_embeddings: false,
        bos_token_id: None,
        eos_token_id: Vec::new(),
    };
    let mut rng = StdRng::seed_from_u64(2);
    let mut m = LlamaForCausalLM::random(cfg, DType::F32, &Device::Cpu, &mut rng).unwrap();
    let targets = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ];
    CausalLm::add_lora(&mut m, &lora(&targets, 0.05), None, &mut rng).unwrap();
    m
}

fn gpt2() -> Gpt2LMHeadModel {
    let cfg: Gpt2Config = serde_json::from_value(serde_json::json!({
        "vocab_size": 200, "n_positions": 64, "n_embd": 64, "n_layer": 4, "n_head": 4,
        "resid_pdrop": 0.1, "attn_pdrop": 0.1, "embd_pdrop": 0.1
    }))
    .unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    let mut m = Gpt2LMHeadModel::random(cfg, DType::F32, &Device::Cpu, &mut rng).unwrap();
    let targets = ["c_attn", "c_proj", "c_fc"];
    CausalLm::add_lora(&mut m, &lora(&targets, 0.1), None, &mut rng).unwrap();
    m
}

fn ids(vocab: u32) -> Tensor {
    let v: Vec<u32> = (0..(ROWS * SEQ) as u32)
        .map(|i| (i * 7 + 3) % vocab)
        .collect();
    Tensor::from_vec(v, (ROWS, SEQ), &Device::Cpu).unwrap()
}

fn mask_add() -> Tensor {
    let mask = Tensor::ones((ROWS, SEQ), DType::U32, &Device::Cpu).unwrap();
    mask_to_additive(&mask, DType::F32).unwrap()
}

fn bert_batch() -> (BatchTensors, Vec<u32>) {
    let b = BatchTensors {
        pixel_values: None,
        input_ids: ids(100),
        token_type_ids: Tensor::zeros((ROWS, SEQ), DType::U32, &Device::Cpu).unwrap(),
        mask_add: mask_add(),
        batch: ROWS,
        seq: SEQ,
    };
    (b, vec![0, 1, 2, 1])
}

fn lm_batch(vocab: u32) -> LmBatch {
    let input_ids = ids(vocab);
    let targets = input_ids
        .flatten_all()
        .unwrap()
        .to_vec1::<u32>()
        .unwrap()
        .iter()
        .map(|&t| ((t + 1) % vocab) as i64)
        .collect();
    LmBatch {
        input_ids,
        mask_add: mask_add(),
        targets,
        batch: ROWS,
        seq: SEQ,
    }
}

/// The heap peak of `f` over what was live before it, the least of two runs after a first one
/// (so that buffers the kernels allocate once per process or thread are not counted).
fn measured_peak(f: impl Fn()) -> usize {
    f();
    least_peak(2, || Box::new(&f))
}

/// The least heap peak, over `runs` runs, of the closure `prepare` returns, over what was live
/// before it (what `prepare` allocates is not counted).
fn least_peak<'a>(runs: usize, prepare: impl Fn() -> Box<dyn FnOnce() + 'a>) -> usize {
    (0..runs)
        .map(|_| {
            let f = prepare();
            let before = memory::live_bytes();
            memory::reset_peak();
            f();
            memory::peak_bytes().saturating_sub(before)
        })
        .min()
        .unwrap()
}

/// What one layer's forward keeps as `keep` says: live bytes after such a forward less after a
/// plain one (each the least of three, after both ran once: kernels and caches allocate once per
/// process).
fn measured_state<S>(keep: Keep, mut run: impl FnMut(Keep) -> (Tensor, Option<S>)) -> usize {
    drop(run(Keep::Nothing));
    drop(run(keep));
    let mut kept = |keep: Keep| {
        (0..3)
            .map(|_| {
                let before = memory::live_bytes() as isize;
                let out = run(keep);
                let after = memory::live_bytes() as isize;
                drop(out);
                after - before
            })
            .min()
            .unwrap()
    };
    let without = kept(Keep::Nothing);
    let with = kept(keep);
    (with - without).max(0) as usize
}

/// The state's tolerance: 2%, and 1% more for each recomputed part, where the same few KB of
/// tensor bookkeeping (5-6 KB a layer here) weigh on a state 20-60% smaller.
fn state_tolerance(keep: Keep) -> f64 {
    let parts = keep.recomputed();
    0.02 + 0.01 * (parts.ffn as u8 + parts.attention as u8) as f64
}

/// The memory model's state of layer 1 of `m` for `keep`.
fn estimated_state(m: &impl StepMemory, keep: Keep) -> usize {
    StepMemory::layer_memory(m, 1, ROWS, SEQ).kept(keep)
}

fn assert_close(what: &str, estimated: usize, measured: usize, tolerance: f64) {
    let err = (estimated as f64 - measured as f64) / measured as f64;
    eprintln!(
        "{what}: estimated {estimated} B, measured {measured} B ({:+.1}%)",
        100.0 * err
    );
    if std::env::var("PLAN_CALIBRATE").is_err() {
        assert!(
            err.abs() <= tolerance,
            "{what}: off by more than {tolerance}"
        );
    }
}

fn freeze(m: &mut impl Adapted, below: usize) {
    for id in m.adapter_ids() {
        if id.layer < below {
            m.adapter_by_id_mut(id).unwrap().trainable = false;
        }
    }
}

/// One test, so that nothing runs beside its measurements.
#[test]
fn memory_model_matches_the_allocator() {
    layer_state_matches_what_forward_keeps();
    step_estimate_is_within_ten_percent_of_the_measured_peak();
    activation_backward_writes_over_its_saved_input();
}

/// GELU's and SwiGLU's backward consume their saved inputs and write the gradients over them:
/// beyond what was live (the saved inputs and the incoming gradient) they allocate less than a
/// tenth of one input, where a backward allocating its outputs would take one or two inputs' size.
fn activation_backward_writes_over_its_saved_input() {
    use safetune::nn::{gelu, swiglu};
    let rand = |seed: u64| {
        let mut rng = StdRng::seed_from_u64(seed);
        let v: Vec<f32> = (0..512 * 256)
            .map(|_| rand::Rng::random_range(&mut rng, -3.0..3.0))
            .collect();
        Tensor::from_vec(v, (512, 256), &Device::Cpu).unwrap()
    };
    let input_bytes = 512 * 256 * 4;
    // The least extra peak of three backward passes, each on a fresh forward's saved state.
    let extra = |run: &dyn Fn() -> Box<dyn FnOnce()>| least_peak(3, run);
    let dy = rand(3);
    for kind in [gelu::GeluKind::Erf, gelu::GeluKind::Tanh] {
        let bytes = extra(&|| {
            let saved = gelu::forward_kind(&rand(1), kind, true).unwrap().1.unwrap();
            let dy = dy.clone();
            Box::new(move || drop(saved.backward(&dy).unwrap()))
        });
        eprintln!("gelu {kind:?} backward: {bytes} B beyond its inputs");
        assert!(bytes < input_bytes / 10, "gelu {kind:?}: {bytes} B");
    }
    let bytes = extra(&|| {
        let saved = swiglu::forward(&rand(1), &rand(2), true)
            .unwrap()
            .1
            .unwrap();
        let dy = dy.clone();
        Box::new(move || drop(saved.backward(&dy).unwrap()))
    });
    eprintln!("swiglu backward: {bytes} B beyond its inputs");
    assert!(bytes < input_bytes / 10, "swiglu: {bytes} B");
}

/// A layer's saved state as the memory model adds it up equals what its forward keeps, to within
/// tensor bookkeeping ([`state_tolerance`]), for BERT (dropout on and off), LLaMA (GQA, every
/// linear adapted) and GPT-2, with trainable and frozen adapters, whole and less the parts that
/// backward may recompute.
fn layer_state_matches_what_forward_keeps() {
    let x = Tensor::randn(0f32, 1.0, (ROWS * SEQ, 64), &Device::Cpu).unwrap();
    let shape = safetune::nn::attention::AttnShape {
        batch: ROWS,
        seq: SEQ,
    };
    let mask = mask_add();
    for dropout in [0.0, 0.1] {
        let mut m = bert(dropout);
        for (frozen, keep) in [false, true]
            .into_iter()
            .flat_map(|f| KEEPS.map(|k| (f, k)))
        {
            freeze(&mut m, if frozen { 4 } else { 0 });
            let layer = &m.layers[1];
            let got = measured_state(keep, |keep| {
                let mut rng = StdRng::seed_from_u64(4);
                let mut pass = Pass::training(&mut rng);
                layer
                    .forward(&x.copy().unwrap(), &mask, shape, &mut pass, keep, None)
                    .unwrap()
            });
            assert_close(
                &format!("bert dropout {dropout} frozen {frozen} {keep:?}"),
                estimated_state(&m, keep),
                got,
                state_tolerance(keep),
            );
        }
    }
    let decoders: Vec<(&str, safetune::model::Decoder)> =
        vec![("llama", llama().into()), ("gpt2", gpt2().into())];
    for ((name, m), keep) in decoders.iter().flat_map(|d| KEEPS.map(move |k| (d, k))) {
        let got = measured_state(keep, |keep| {
            let x = x.copy().unwrap();
            let mut rng = StdRng::seed_from_u64(4);
            let mut pass = Pass::training(&mut rng);
            match &m {
                safetune::model::Decoder::Llama(l) => {
                    let (out, s) = l.layers[1]
                        .forward(&x, &mask, shape, &l.rope, &mut pass, keep, None)
                        .unwrap();
                    (out, s.map(|s| Box::new(s) as Box<dyn std::any::Any>))
                }
                safetune::model::Decoder::Gpt2(g) => {
                    let (out, s) = g.layers[1]
                        .forward(&x, &mask, shape, &mut pass, keep, None)
                        .unwrap();
                    (out, s.map(|s| Box::new(s) as Box<dyn std::any::Any>))
                }
            }
        });
        assert_close(
            &format!("{name} {keep:?}"),
            estimated_state(m, keep),
            got,
            state_tolerance(keep),
        );
    }
}

/// The estimated step peak is within 10% of the heap peak measured over a whole training pass
/// (forward, loss, backward), with and without checkpointing (whole layers, and layers
/// recomputing their feed-forward input or attention) and with a frozen bottom.
fn step_estimate_is_within_ten_percent_of_the_measured_peak() {
    let recomputes = [
        Recompute::None,
        Recompute::All,
        Recompute::layers([2]),
        Recompute::Layers {
            whole: [1].into(),
            ffn: [0, 2, 3].into(),
            attention: [].into(),
            offload: [].into(),
        },
        Recompute::Layers {
            whole: [].into(),
            ffn: [0, 3].into(),
            attention: [0, 1, 2, 3].into(),
            offload: [].into(),
        },
    ];
    for dropout in [0.0, 0.1] {
        for frozen in [0, 2] {
            let mut m = bert(dropout);
            freeze(&mut m, frozen);
            let (b, labels) = bert_batch();
            for r in &recomputes {
                let got = measured_peak(|| {
                    let mut rng = StdRng::seed_from_u64(5);
                    let mut pass = Pass::training(&mut rng);
                    let (logits, saved) = m.forward_train(&b, &mut pass, r).unwrap();
                    let (_, d) = safetune::nn::loss::cross_entropy(&logits, &labels).unwrap();
                    drop(logits);
                    m.backward(saved, &d).unwrap();
                });
                let est = step_bytes(&m, r, ROWS, SEQ);
                assert_close(
                    &format!("bert p {dropout} frozen {frozen} {r:?}"),
                    est,
                    got,
                    0.10,
                );
            }
        }
    }
    let decoders: Vec<(&str, safetune::model::Decoder)> =
        vec![("llama", llama().into()), ("gpt2", gpt2().into())];
    for (name, mut m) in decoders {
        for frozen in [0, 2] {
            freeze(&mut m, frozen);
            let b = lm_batch(200);
            for r in &recomputes {
                let got = measured_peak(|| {
                    let mut rng = StdRng::seed_from_u64(5);
                    let mut pass = Pass::training(&mut rng);
                    m.loss_and_grads(&b, &mut pass, 1.0, r, None).unwrap();
                });
                let est = step_bytes(&m, r, ROWS, SEQ);
                assert_close(&format!("{name} frozen {frozen} {r:?}"), est, got, 0.10);
            }
        }
    }
}
