//! Times what each recomputation level of the memory plan costs one LLaMA layer, against the
//! plan's cost model (`LayerMemory`'s costs, in percent of the layer's forward): the backward of
//! a layer that kept its whole state, and the extra time of one that recomputes its feed-forward
//! input, its attention, or both, or that was checkpointed whole (its second forward).
//!
//! `cargo run --release --example recompute_probe [--features cuda] -- [device hidden ffn heads
//! layers-of-lora batch seq]`; the default is the LLaMA-7B layer (4096, 11008, 32 heads) with LoRA
//! r 8 on q_proj and v_proj, 4 x 128 tokens, bf16 on `cuda` (f32 on `cpu`).
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use safetune::adapters::LoraConfig;
use safetune::model::llama::LlamaForCausalLM;
use safetune::model::stack::{Keep, Parts};
use safetune::model::{CausalLm, LlamaConfig, StepMemory};
use safetune::nn::attention::{mask_to_additive, AttnShape};
use safetune::nn::Pass;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, default: usize| args.get(i).map_or(default, |a| a.parse().unwrap());
    let device = match args.first().map(String::as_str).unwrap_or("cuda") {
        "cpu" => Device::Cpu,
        _ => Device::new_cuda(0).expect("a CUDA device"),
    };
    let dtype = if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    };
    let (hidden, ffn, heads) = (num(1, 4096), num(2, 11008), num(3, 32));
    let (batch, seq) = (num(4, 4), num(5, 128));
    let cfg = LlamaConfig {
        vocab_size: 256,
        hidden_size: hidden,
        intermediate_size: ffn,
        num_hidden_layers: 1,
        num_attention_heads: heads,
        num_key_value_heads: None,
        explicit_head_dim: None,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position_embeddings: seq.max(128),
        tie_word_embeddings: false,
        bos_token_id: None,
        eos_token_id: Vec::new(),
    };
    let mut rng = StdRng::seed_from_u64(1);
    let mut m = LlamaForCausalLM::random(cfg, dtype, &device, &mut rng).unwrap();
    let lora = LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.05,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        use_rslora: false,
    };
    CausalLm::add_lora(&mut m, &lora, None, &mut rng).unwrap();
    let layer = &m.layers[0];
    let shape = AttnShape { batch, seq };
    let ones = Tensor::ones((batch, seq), DType::U32, &device).unwrap();
    let mask = mask_to_additive(&ones, dtype).unwrap();
    let x = Tensor::randn(0f32, 1.0, (batch * seq, hidden), &device)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let dy = (Tensor::randn(0f32, 1.0, (batch * seq, hidden), &device).unwrap() * 0.01)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let sync = || safetune::device::synchronize(&device).unwrap();
    // The median of 15 timed runs of `f` after 3 untimed ones, in ms; `f` returns the time of
    // the part it times.
    let median = |f: &mut dyn FnMut() -> f64| {
        for _ in 0..3 {
            f();
        }
        let mut t: Vec<f64> = (0..15).map(|_| f()).collect();
        t.sort_by(f64::total_cmp);
        t[7]
    };
    let timed = |f: Box<dyn FnOnce() + '_>| {
        sync();
        let t = Instant::now();
        f();
        sync();
        t.elapsed().as_secs_f64() * 1e3
    };
    let forward = |keep: Keep| {
        let mut rng = StdRng::seed_from_u64(2);
        let mut pass = Pass::training(&mut rng);
        layer
            .forward(&x, &mask, shape, &m.rope, &mut pass, keep, None)
            .unwrap()
    };
    let parts = |ffn: bool, attention: bool| Keep::State(Parts { ffn, attention });
    let fwd = median(&mut || timed(Box::new(|| drop(forward(Keep::ALL)))));
    let back = |keep: Keep| {
        median(&mut || {
            let (_, saved) = forward(keep);
            let saved = saved.unwrap();
            timed(Box::new(|| drop(layer.backward(saved, &dy, true).unwrap())))
        })
    };
    let all = back(Keep::ALL);
    let ffn_only = back(parts(true, false));
    let attention = back(parts(false, true));
    let both = back(parts(true, true));
    let second = median(&mut || {
        timed(Box::new(|| {
            let mut rng = StdRng::seed_from_u64(2);
            let mut pass = Pass::training(&mut rng);
            drop(layer.state(&x, &mask, shape, &m.rope, &mut pass).unwrap());
        }))
    });
    let mem = StepMemory::layer_memory(&m, 0, batch, seq);
    let pct = |ms: f64| 100.0 * ms / fwd;
    println!(
        "{device:?} {dtype:?} hidden {hidden} ffn {ffn} heads {heads}, {batch} x {seq} tokens"
    );
    println!("forward {fwd:.3} ms, backward with its state kept {all:.3} ms");
    let mb = |b: usize| b as f64 / 1e6;
    let rows = [
        (
            "feed-forward input",
            ffn_only - all,
            mem.ffn_cost_pct,
            mem.ffn_input,
        ),
        (
            "attention",
            attention - all,
            mem.attention_cost_pct,
            mem.attention_state,
        ),
        (
            "both parts",
            both - all,
            mem.ffn_cost_pct + mem.attention_cost_pct,
            mem.ffn_input + mem.attention_state,
        ),
        (
            "whole layer",
            second,
            mem.checkpoint_cost_pct,
            mem.state - mem.state.min(batch * seq * hidden * dtype.size_in_bytes()),
        ),
    ];
    for (what, ms, model_pct, freed) in rows {
        println!(
            "{what}: {ms:.3} ms = {:.0}% of the forward (model {model_pct}%), frees {:.1} MB: {:.1} us per MB (model {:.1})",
            pct(ms),
            mb(freed),
            1e3 * ms / mb(freed),
            1e3 * fwd * model_pct as f64 / 100.0 / mb(freed)
        );
    }
}
