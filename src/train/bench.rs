//! `safetune bench`: training-step speed and memory of a random-weight model of a given shape,
//! with a given freezing pattern. One JSON line per run, comparable with
//! `bench/peft_bench.py` (PyTorch + PEFT) on the same shapes.

use super::memory;
use super::optim::{AdamW, AdamWConfig};
use super::step;
use crate::adapters::Adapted;
use crate::adapters::LoraConfig;
use crate::data::batch::Batch;
use crate::data::Label;
use crate::model::bert::{BertConfig, BertForSequenceClassification};
use crate::nn::{flops, Pass};
use anyhow::Result;
use candle_core::DType;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::time::Instant;

#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    #[arg(long, default_value_t = 12)]
    pub layers: usize,
    #[arg(long, default_value_t = 768)]
    pub hidden: usize,
    #[arg(long, default_value_t = 12)]
    pub heads: usize,
    #[arg(long, default_value_t = 3072)]
    pub ffn: usize,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// Freeze the adapters of the bottom K layers (as SAFE does once they are unimportant).
    #[arg(long, default_value_t = 0)]
    pub frozen_prefix: usize,
    #[arg(long, default_value_t = 4)]
    pub lora_r: usize,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Model dropout (hidden and attention); PEFT's reference benchmark uses 0.
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f64,
    #[command(flatten)]
    pub device: crate::device::DeviceArgs,
}

#[derive(Serialize)]
pub struct BenchResult {
    pub framework: &'static str,
    pub arch: &'static str,
    pub device: String,
    pub layers: usize,
    pub hidden: usize,
    pub batch: usize,
    pub seq: usize,
    pub frozen_prefix: usize,
    pub dtype: &'static str,
    pub step_ms_median: f64,
    pub tokens_per_s: f64,
    /// Peak heap bytes above the resident weights during a step (activations, gradients, optimizer).
    pub peak_mem_mb: f64,
    pub weights_mb: f64,
    /// Peak resident set size of the whole process (weights, framework, activations).
    pub peak_rss_mb: Option<f64>,
    pub flops_per_step: u64,
    pub loss_first: f32,
    pub loss_last: f32,
}

pub fn run(a: &BenchArgs) -> Result<BenchResult> {
    let device = a.device.open()?;
    let mut rng = StdRng::seed_from_u64(0);
    let config = BertConfig {
        vocab_size: 30522,
        hidden_size: a.hidden,
        num_hidden_layers: a.layers,
        num_attention_heads: a.heads,
        intermediate_size: a.ffn,
        hidden_act: "gelu".into(),
        hidden_dropout_prob: a.dropout,
        attention_probs_dropout_prob: a.dropout,
        max_position_embeddings: a.seq.max(512),
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        pad_token_id: 0,
    };
    let live0 = memory::live_bytes();
    let mut model =
        BertForSequenceClassification::random(config, 2, DType::F32, &device, &mut rng)?;
    let lora = LoraConfig {
        r: a.lora_r,
        alpha: 16.0,
        dropout: 0.0,
        ..Default::default()
    };
    model.add_lora(&lora, None, &mut rng)?;
    for (layer, site) in model.adapter_sites() {
        if layer < a.frozen_prefix {
            model.adapter_mut(layer, site).expect("listed").trainable = false;
        }
    }
    let weights = memory::live_bytes() - live0;
    let ids: Vec<u32> = (0..a.batch * a.seq)
        .map(|_| rng.random_range(0..30522))
        .collect();
    let batch = Batch {
        labels: (0..a.batch)
            .map(|i| Label::Class((ids[i * a.seq] % 2) as usize))
            .collect(),
        input_ids: ids,
        token_type_ids: vec![0; a.batch * a.seq],
        attention_mask: vec![1; a.batch * a.seq],
        batch: a.batch,
        seq: a.seq,
    };
    let mut opt = AdamW::new(AdamWConfig::default());
    let mut times = Vec::new();
    let mut losses = Vec::new();
    let (mut peak, mut flops_step) = (0usize, 0u64);
    for s in 0..a.warmup + a.steps {
        let base = memory::live_bytes();
        memory::reset_peak();
        let f0 = flops::total();
        let t = Instant::now();
        let mut pass = Pass {
            training: true,
            rng: &mut rng,
        };
        let out = step::forward_backward(&model, &batch, &mut pass, 1.0, None)?;
        for (name, g) in &out.grads {
            let p = model.param_mut(name).expect("known parameter");
            *p = opt.update(name, p, g, 1e-3)?;
        }
        crate::device::synchronize(&device)?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        losses.push(out.loss);
        if s >= a.warmup {
            times.push(ms);
            peak = peak.max(memory::peak_bytes().saturating_sub(base));
            flops_step = flops::total() - f0;
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    Ok(BenchResult {
        framework: "safetune",
        arch: "bert",
        device: a.device.device_spec().to_string(),
        layers: a.layers,
        hidden: a.hidden,
        batch: a.batch,
        seq: a.seq,
        frozen_prefix: a.frozen_prefix,
        dtype: "f32",
        step_ms_median: median,
        tokens_per_s: (a.batch * a.seq) as f64 / (median / 1e3),
        peak_mem_mb: peak as f64 / (1 << 20) as f64,
        weights_mb: weights as f64 / (1 << 20) as f64,
        peak_rss_mb: memory::peak_rss_bytes().map(|b| b as f64 / (1 << 20) as f64),
        flops_per_step: flops_step,
        loss_first: losses[0],
        loss_last: *losses.last().expect("at least one step"),
    })
}
