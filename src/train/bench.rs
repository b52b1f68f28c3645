//! `safetune bench`: training-step speed and memory of a random-weight model of a given shape
//! (a BERT classifier or a LLaMA-style decoder), with a given freezing pattern, on a given device
//! and dtype. One JSON line per run, comparable with `bench/peft_bench.py` (PyTorch + PEFT) on the
//! same shapes: the step time is the median of the timed steps (the device synchronized before the
//! clock is read), the peak memory the highest allocator-level peak of a timed step above what was
//! live before the first step (the weights), as PyTorch's `max_memory_allocated - base`.

use super::plan::{self, MemoryPlan, PlanDevice};
use super::step;
use crate::adapters::{Adapted, AdaptedStack, LoraConfig, ParamId};
use crate::data::batch::Batch;
use crate::data::Label;
use crate::device::DeviceArgs;
use crate::io::weights::Weights;
use crate::memory::{self, MemTracker};
use crate::model::bert::{BertConfig, BertForSequenceClassification};
use crate::model::llama::LlamaForCausalLM;
use crate::model::stack::Recompute;
use crate::model::{CausalLm, LlamaConfig, LmBatch};
use crate::nn::attention::mask_to_additive;
use crate::nn::linear::{QuantFormat, Weight};
use crate::nn::optim::{AdamW, AdamWConfig};
use crate::nn::{flops, Pass};
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// BERT for sequence classification (2 labels), LoRA on query/value by default.
    Bert,
    /// LLaMA-style decoder with an untied LM head, LoRA on q_proj/v_proj by default.
    Llama,
}

/// Shapes of the reference benchmarks (`bench/peft_bench.py`, `../shared/cuda/README.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// 6 x 384, 12 heads, FFN 1536; batch 16, seq 128.
    Minilm,
    /// 12 x 768, 12 heads, FFN 3072; batch 32, seq 128.
    BertBase,
    /// 24 x 1024, 16 heads, FFN 4096; batch 32, seq 128.
    BertLarge,
    /// 32 x 4096, 32 heads, FFN 11008, vocab 32000; batch 2, seq 512.
    #[value(name = "llama-7b")]
    Llama7b,
    /// 2 x 64, 4 heads, FFN 128, vocab 1000; batch 4, seq 16 (smoke tests).
    TinyBert,
    /// 2 x 64, 4 heads (2 kv heads), FFN 128, vocab 1000; batch 2, seq 16 (smoke tests).
    TinyLlama,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Shape {
    pub arch: Arch,
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub batch: usize,
    pub seq: usize,
}

impl Preset {
    pub fn shape(self) -> Shape {
        let bert = |layers, hidden, heads, ffn, batch| Shape {
            arch: Arch::Bert,
            layers,
            hidden,
            heads,
            kv_heads: heads,
            ffn,
            vocab: 30522,
            batch,
            seq: 128,
        };
        match self {
            Preset::Minilm => bert(6, 384, 12, 1536, 16),
            Preset::BertBase => bert(12, 768, 12, 3072, 32),
            Preset::BertLarge => bert(24, 1024, 16, 4096, 32),
            Preset::Llama7b => Shape {
                arch: Arch::Llama,
                layers: 32,
                hidden: 4096,
                heads: 32,
                kv_heads: 32,
                ffn: 11008,
                vocab: 32000,
                batch: 2,
                seq: 512,
            },
            Preset::TinyBert => Shape {
                vocab: 1000,
                batch: 4,
                seq: 16,
                ..bert(2, 64, 4, 128, 4)
            },
            Preset::TinyLlama => Shape {
                arch: Arch::Llama,
                layers: 2,
                hidden: 64,
                heads: 4,
                kv_heads: 2,
                ffn: 128,
                vocab: 1000,
                batch: 2,
                seq: 16,
            },
        }
    }
}

#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    /// Shape preset (default: bert-base, or llama-7b with --arch llama); the shape flags below
    /// override its fields.
    #[arg(long)]
    pub preset: Option<Preset>,
    /// bert | llama (default: the preset's).
    #[arg(long)]
    pub arch: Option<Arch>,
    #[arg(long)]
    pub layers: Option<usize>,
    #[arg(long)]
    pub hidden: Option<usize>,
    #[arg(long)]
    pub heads: Option<usize>,
    /// Key/value heads (grouped-query attention; LLaMA only).
    #[arg(long)]
    pub kv_heads: Option<usize>,
    #[arg(long)]
    pub ffn: Option<usize>,
    #[arg(long)]
    pub vocab: Option<usize>,
    /// Sequences per step (the preset's by default).
    #[arg(long, alias = "batch")]
    pub batch_size: Option<usize>,
    /// Tokens per sequence (the preset's by default).
    #[arg(long, alias = "seq")]
    pub max_length: Option<usize>,
    /// Freeze the adapters of the bottom K layers (as SAFE does once they are unimportant).
    #[arg(long, default_value_t = 0)]
    pub frozen_prefix: usize,
    #[arg(long, default_value_t = 4)]
    pub lora_r: usize,
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    /// LoRA target modules, comma-separated (default: query,value for BERT, q_proj,v_proj for
    /// LLaMA).
    #[arg(long, alias = "targets", value_delimiter = ',')]
    pub target_modules: Option<Vec<String>>,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Model dropout (hidden and attention); PEFT's reference benchmark uses 0.
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f64,
    /// Draw the LLaMA weights with the seeded host RNG (the same weights on every device, and what
    /// the CPU always does) instead of `randn` on the device. BERT weights always come from the host.
    #[arg(long)]
    pub host_init: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Gradient checkpointing of the trainable layers (see `model::stack`).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Move what these layers keep for backward (e.g. `0,4,8`) to host memory until their
    /// backward, on a copy stream beside the compute (`nn::offload`; CUDA). Spaced layers hide
    /// their copies best: each copy overlaps every layer up to the next offloaded one.
    #[arg(long, value_delimiter = ',', conflicts_with = "gradient_checkpointing")]
    pub offload_layers: Vec<usize>,
    /// The most a step may add to memory (e.g. 9GB): the layers' recomputation and offload come
    /// from `train`'s memory plan (`train/plan.rs`) for one pass of the whole batch.
    #[arg(long, value_name = "SIZE", conflicts_with_all = ["gradient_checkpointing", "offload_layers"])]
    pub memory_budget: Option<super::plan::ByteSize>,
    /// With --memory-budget: the plan may also offload (CUDA), as `train --budget-offload`.
    #[arg(long, requires = "memory_budget")]
    pub budget_offload: bool,
    /// LLaMA only: keep the frozen projection weights quantized in GGUF blocks (`q4_0`, `q4_1`,
    /// `q8_0`) and dequantize each for its matmul, as `train-lm --quantized-base` does with a GGUF
    /// model. The embeddings and the head stay dense.
    #[arg(long)]
    pub quantize: Option<QuantFormat>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Replaces every projection weight of `m` by its quantized blocks, one tensor at a time (host
/// init; on the device `llama_on_device` quantizes as it draws).
fn quantize_base(m: &mut LlamaForCausalLM, format: QuantFormat, dtype: DType) -> Result<()> {
    for layer in &mut m.layers {
        for lin in &mut layer.linears {
            let dense = lin.base.weight.dense()?.into_owned();
            let q = format.quantize(&dense, dense.device())?;
            lin.base.weight = Weight::Quantized {
                q: Arc::new(q),
                dtype,
            };
        }
    }
    Ok(())
}

impl BenchArgs {
    /// The preset's shape with the flags' overrides.
    pub fn shape(&self) -> Shape {
        let preset = self.preset.unwrap_or(match self.arch {
            Some(Arch::Llama) => Preset::Llama7b,
            _ => Preset::BertBase,
        });
        let mut s = preset.shape();
        let heads_given = self.heads.is_some();
        s.arch = self.arch.unwrap_or(s.arch);
        s.layers = self.layers.unwrap_or(s.layers);
        s.hidden = self.hidden.unwrap_or(s.hidden);
        s.heads = self.heads.unwrap_or(s.heads);
        s.kv_heads = match (s.arch, self.kv_heads) {
            (Arch::Bert, _) => s.heads,
            (_, Some(k)) => k,
            (_, None) if heads_given => s.heads,
            (_, None) => s.kv_heads,
        };
        s.ffn = self.ffn.unwrap_or(s.ffn);
        s.vocab = self.vocab.unwrap_or(s.vocab);
        s.batch = self.batch_size.unwrap_or(s.batch);
        s.seq = self.max_length.unwrap_or(s.seq);
        s
    }
}

#[derive(Serialize)]
pub struct BenchResult {
    pub framework: &'static str,
    #[serde(flatten)]
    pub shape: Shape,
    pub device: String,
    pub dtype: &'static str,
    pub lora_r: usize,
    pub targets: Vec<String>,
    pub frozen_prefix: usize,
    pub gradient_checkpointing: bool,
    /// Layers whose saved state went to host memory (`--offload-layers`, or the budget's plan).
    pub offload_layers: Vec<usize>,
    /// `--memory-budget`'s plan (`MemoryPlan::describe`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    /// The frozen projections' GGUF block format when kept quantized (`--quantize`).
    pub quantized: Option<QuantFormat>,
    /// `host` (seeded host RNG, the same on every device) or `device` (`randn` on the device).
    pub init: &'static str,
    pub warmup: usize,
    pub steps: usize,
    pub step_ms_median: f64,
    pub step_ms_min: f64,
    pub tokens_per_s: f64,
    /// `heap` (CPU) or `cuda-pool` (allocator level of candle's CUDA memory pool).
    pub memory_counter: &'static str,
    /// Highest peak of a timed step above what was live before the first step (the weights):
    /// activations, gradients, optimizer state, temporaries. PyTorch's `max_memory_allocated`
    /// minus the weights.
    pub peak_mem_mb: f64,
    /// Highest peak of a timed step above what was live just before it.
    pub step_peak_mem_mb: f64,
    /// The memory model's estimate of that step peak (`train/plan.rs::step_bytes`), to check it
    /// against the measurement.
    pub estimated_step_mem_mb: f64,
    /// Live before the first step: the weights (and adapters).
    pub weights_mb: f64,
    /// CUDA: device memory in use according to the driver after the steps (pool reserve, cuBLAS
    /// workspace and the CUDA context included), and the device's capacity.
    pub driver_used_mb: Option<f64>,
    pub driver_total_mb: Option<f64>,
    /// Peak resident set size of the whole process (weights, framework, activations).
    pub peak_rss_mb: Option<f64>,
    pub flops_per_step: u64,
    /// Matmul FLOPs per second of the median step.
    pub tflops_per_s: f64,
    pub loss_first: f32,
    pub loss_last: f32,
    /// Every step's loss, warm-up included (for comparing devices and dtypes).
    pub losses: Vec<f32>,
}

/// One model of either architecture, and its step.
enum Model {
    Bert(Box<BertForSequenceClassification>),
    Llama(Box<LlamaForCausalLM>),
}

enum Inputs {
    Bert(Batch),
    Llama(LmBatch),
}

impl Model {
    fn params(&mut self) -> &mut dyn Adapted {
        match self {
            Model::Bert(m) => m.as_mut(),
            Model::Llama(m) => m.as_mut(),
        }
    }

    /// The memory plan of one pass of `rows` rows under `budget` bytes (see `train::plan`).
    fn plan(
        &self,
        rows: usize,
        seq: usize,
        budget: usize,
        device: &PlanDevice,
    ) -> Result<MemoryPlan> {
        let budget = Some(budget);
        match self {
            Model::Bert(m) => {
                plan::plan(m.as_ref(), rows, 1, seq, false, &[], budget, device, false)
            }
            Model::Llama(m) => {
                plan::plan(m.as_ref(), rows, 1, seq, false, &[], budget, device, false)
            }
        }
    }

    /// The memory model's estimate of one step's peak above what is live before it.
    fn estimated_step_bytes(&self, rows: usize, seq: usize, recompute: &Recompute) -> usize {
        match self {
            Model::Bert(m) => plan::step_bytes(m.as_ref(), recompute, rows, seq),
            Model::Llama(m) => plan::step_bytes(m.as_ref(), recompute, rows, seq),
        }
    }

    /// Forward, loss and backward: `(loss, gradients by PEFT key)`.
    fn step(
        &self,
        inputs: &Inputs,
        pass: &mut Pass,
        recompute: &Recompute,
    ) -> Result<(f32, Vec<(ParamId, Tensor)>)> {
        Ok(match (self, inputs) {
            (Model::Bert(m), Inputs::Bert(b)) => {
                let out = step::forward_backward(
                    m,
                    b,
                    pass,
                    1.0,
                    step::FrozenBottom::Inference,
                    recompute,
                )?;
                (out.loss, out.grads)
            }
            (Model::Llama(m), Inputs::Llama(b)) => {
                let (loss, grads) = m.loss_and_grads(b, pass, 1.0, recompute, None)?;
                let mut named = Vec::with_capacity(2 * grads.len());
                for (id, g) in grads {
                    named.extend(crate::adapters::lora_grads(id, g));
                }
                ((loss.loss_sum / loss.tokens.max(1) as f64) as f32, named)
            }
            _ => unreachable!("inputs are built for the model's architecture"),
        })
    }
}

/// Random LLaMA weights drawn on the device (`randn` in f32, then cast one tensor at a time), so a
/// 7B model never exists on the host or in f32 as a whole. With `quantize`, each projection is
/// quantized as soon as it is drawn: the dense model never exists either, and the device's
/// memory holds what a `--quantized-base` GGUF load would.
fn llama_on_device(
    config: LlamaConfig,
    dtype: DType,
    device: &Device,
    quantize: Option<QuantFormat>,
) -> Result<LlamaForCausalLM> {
    let shapes = config.tensor_shapes();
    let mut tensors = HashMap::new();
    let mut quantized = HashMap::new();
    for (name, shape) in shapes {
        if name.ends_with("norm.weight") {
            tensors.insert(name, Tensor::ones(shape, dtype, device)?);
            continue;
        }
        let t = Tensor::randn(0f32, 0.02, shape, device)?;
        match quantize {
            Some(f) if name.ends_with("_proj.weight") => {
                quantized.insert(name, Arc::new(f.quantize(&t, device)?));
            }
            _ => {
                tensors.insert(name, t.to_dtype(dtype)?);
            }
        }
    }
    let weights = Weights::from_tensors(tensors, dtype, device).with_quantized(quantized);
    Ok(LlamaForCausalLM::from_weights(config, &weights)?)
}

fn build(
    a: &BenchArgs,
    s: &Shape,
    dtype: DType,
    device: &Device,
    rng: &mut StdRng,
) -> Result<(Model, Inputs, Vec<String>, &'static str)> {
    let ids: Vec<u32> = (0..s.batch * s.seq)
        .map(|_| rng.random_range(0..s.vocab as u32))
        .collect();
    let default_targets: &[&str] = match s.arch {
        Arch::Bert => &["query", "value"],
        Arch::Llama => &["q_proj", "v_proj"],
    };
    let targets = a
        .target_modules
        .clone()
        .unwrap_or_else(|| default_targets.iter().map(|t| t.to_string()).collect());
    let lora = LoraConfig {
        r: a.lora_r,
        alpha: a.lora_alpha,
        dropout: 0.0,
        target_modules: targets.clone(),
        use_rslora: false,
    };
    Ok(match s.arch {
        Arch::Bert => {
            let config = BertConfig::sized(
                s.vocab,
                s.hidden,
                s.layers,
                s.heads,
                s.ffn,
                s.seq.max(512),
                a.dropout,
            );
            anyhow::ensure!(
                a.quantize.is_none(),
                "--quantize keeps a LLaMA base quantized; BERT's is always dense"
            );
            let mut m = BertForSequenceClassification::random(config, 2, dtype, device, rng)?;
            let n = m.add_lora(&lora, None, rng)?;
            anyhow::ensure!(n > 0, "no BERT linear matches the targets {targets:?}");
            for (layer, site) in m.adapter_sites() {
                if layer < a.frozen_prefix {
                    m.adapter_mut(layer, site).expect("listed").trainable = false;
                }
            }
            let batch = Batch {
                labels: (0..s.batch)
                    .map(|i| Label::Class((ids[i * s.seq] % 2) as usize))
                    .collect(),
                input_ids: ids,
                token_type_ids: vec![0; s.batch * s.seq],
                attention_mask: vec![1; s.batch * s.seq],
                batch: s.batch,
                seq: s.seq,
            };
            (
                Model::Bert(Box::new(m)),
                Inputs::Bert(batch),
                targets,
                "host",
            )
        }
        Arch::Llama => {
            let config = LlamaConfig {
                vocab_size: s.vocab,
                hidden_size: s.hidden,
                intermediate_size: s.ffn,
                num_hidden_layers: s.layers,
                num_attention_heads: s.heads,
                num_key_value_heads: Some(s.kv_heads),
                explicit_head_dim: None,
                rms_norm_eps: 1e-6,
                rope_theta: 10000.0,
                rope_scaling: None,
                max_position_embeddings: s.seq.max(4096),
                tie_word_embeddings: false,
                bos_token_id: None,
                eos_token_id: Vec::new(),
            };
            let host = a.host_init || device.is_cpu();
            let mut m = if host {
                let mut m = LlamaForCausalLM::random(config, dtype, device, rng)?;
                if let Some(format) = a.quantize {
                    quantize_base(&mut m, format, dtype)?;
                }
                m
            } else {
                llama_on_device(config, dtype, device, a.quantize)?
            };
            let n = m.add_lora(&lora, None, rng)?;
            anyhow::ensure!(n > 0, "no LLaMA linear matches the targets {targets:?}");
            for (layer, site) in m.adapter_sites() {
                if layer < a.frozen_prefix {
                    m.adapter_mut(layer, site).expect("listed").trainable = false;
                }
            }
            // Labels = inputs, as transformers' causal-LM loss takes them: row i predicts token
            // i + 1 of its sequence; each sequence's last row predicts nothing.
            let mut targets_ids = Vec::with_capacity(ids.len());
            for row in ids.chunks(s.seq) {
                targets_ids.extend(row[1..].iter().map(|&t| t as i64));
                targets_ids.push(crate::nn::loss::IGNORE_INDEX);
            }
            let shape = (s.batch, s.seq);
            let mask = Tensor::ones(shape, DType::U32, device)?;
            let batch = LmBatch {
                input_ids: Tensor::from_vec(ids, shape, device)?,
                mask_add: mask_to_additive(&mask, DType::F32)?,
                targets: targets_ids,
                batch: s.batch,
                seq: s.seq,
            };
            (
                Model::Llama(Box::new(m)),
                Inputs::Llama(batch),
                targets,
                if host { "host" } else { "device" },
            )
        }
    })
}

pub fn run(a: &BenchArgs) -> Result<BenchResult> {
    anyhow::ensure!(a.steps > 0, "--steps must be at least 1");
    let s = a.shape();
    let device = a.device.open()?;
    let dtype = a.device.dtype_spec().dtype();
    if !device.is_cpu() {
        device.set_seed(a.seed)?;
    }
    let mut rng = StdRng::seed_from_u64(a.seed);
    let mem = MemTracker::new(&device);
    let live0 = mem.live();
    let (mut model, inputs, targets, init) = build(a, &s, dtype, &device, &mut rng)?;
    let mut opt = AdamW::new(AdamWConfig::default());
    let budget_plan = match a.memory_budget {
        Some(b) => {
            if a.budget_offload {
                super::config::ensure_offload_device("--budget-offload", device.is_cuda())?;
            }
            let plan_device = PlanDevice::of(&device, s.hidden, a.budget_offload);
            let p = model.plan(s.batch, s.seq, b.0, &plan_device)?;
            anyhow::ensure!(
                p.accum == 1,
                "--memory-budget {b}: the plan splits the batch into passes of {} rows; bench \
                 runs one pass a step (try --batch-size {})",
                p.micro,
                p.micro
            );
            Some(p)
        }
        None => None,
    };
    let recompute = match (&budget_plan, &a.offload_layers[..]) {
        (Some(p), _) => p.recompute(),
        (None, []) => Recompute::all_if(a.gradient_checkpointing),
        (None, layers) => {
            super::config::ensure_offload_device("--offload-layers", device.is_cuda())?;
            Recompute::offloading(layers.iter().copied())
        }
    };
    crate::device::synchronize(&device)?;
    let base = mem.live();
    let mut times = Vec::new();
    let mut losses = Vec::new();
    let (mut peak, mut step_peak, mut flops_step) = (0usize, 0usize, 0u64);
    for i in 0..a.warmup + a.steps {
        let before = mem.live(); // after synchronizing
        mem.reset_peak();
        let f0 = flops::total();
        let t = Instant::now();
        let mut pass = Pass::training(&mut rng);
        let (loss, grads) = model.step(&inputs, &mut pass, &recompute)?;
        super::run::adamw_step(model.params(), &mut opt, &grads, 1e-3, 1.0)?;
        drop(grads);
        crate::device::synchronize(&device)?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        losses.push(loss);
        if i >= a.warmup {
            let p = mem.peak();
            times.push(ms);
            peak = peak.max(p.saturating_sub(base));
            step_peak = step_peak.max(p.saturating_sub(before));
            flops_step = flops::total() - f0;
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let mb = |b: usize| b as f64 / (1 << 20) as f64;
    let driver = mem.driver();
    Ok(BenchResult {
        framework: "safetune",
        shape: s,
        device: a.device.device_spec().to_string(),
        dtype: a.device.dtype_spec().name(),
        lora_r: a.lora_r,
        targets,
        frozen_prefix: a.frozen_prefix,
        gradient_checkpointing: a.gradient_checkpointing,
        offload_layers: budget_plan
            .as_ref()
            .map_or_else(|| a.offload_layers.clone(), |p| p.offloaded.clone()),
        plan: budget_plan.as_ref().map(MemoryPlan::describe),
        quantized: a.quantize,
        init,
        warmup: a.warmup,
        steps: a.steps,
        step_ms_median: median,
        step_ms_min: times[0],
        tokens_per_s: (s.batch * s.seq) as f64 / (median / 1e3),
        memory_counter: mem.kind(),
        peak_mem_mb: mb(peak),
        step_peak_mem_mb: mb(step_peak),
        estimated_step_mem_mb: mb(model.estimated_step_bytes(s.batch, s.seq, &recompute)),
        weights_mb: mb(base.saturating_sub(live0)),
        driver_used_mb: driver.map(|d| mb(d.used)),
        driver_total_mb: driver.map(|d| mb(d.total)),
        peak_rss_mb: memory::peak_rss_bytes().map(mb),
        flops_per_step: flops_step,
        tflops_per_s: flops_step as f64 / (median / 1e3) / 1e12,
        loss_first: losses[0],
        loss_last: *losses.last().expect("at least one step"),
        losses,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn args(flags: &[&str]) -> BenchArgs {
        let mut v = vec!["bench"];
        v.extend_from_slice(flags);
        Cli::parse_from(v).bench
    }

    #[test]
    fn presets_and_overrides() {
        let s = args(&[]).shape();
        assert_eq!(
            (s.arch, s.layers, s.hidden, s.batch, s.seq),
            (Arch::Bert, 12, 768, 32, 128)
        );
        let s = args(&["--preset", "llama-7b", "--layers", "2"]).shape();
        assert_eq!(
            (s.arch, s.layers, s.hidden, s.ffn, s.vocab),
            (Arch::Llama, 2, 4096, 11008, 32000)
        );
        assert_eq!((s.batch, s.seq), (2, 512));
        let s = args(&["--arch", "llama", "--heads", "8", "--hidden", "64"]).shape();
        assert_eq!((s.heads, s.kv_heads), (8, 8));
        let s = args(&["--preset", "tiny-llama"]).shape();
        assert_eq!((s.heads, s.kv_heads), (4, 2));
        let s = args(&["--preset", "bert-large", "--kv-heads", "4"]).shape();
        assert_eq!((s.heads, s.kv_heads), (16, 16));
    }

    /// `--quantize q8_0` keeps every projection in 8-bit blocks (34 bytes per 32 weights), the
    /// loss follows the dense model's, and training still lowers it. BERT refuses the flag.
    #[test]
    fn quantized_llama_base_is_smaller_and_trains() {
        let dense = quick(&["--preset", "tiny-llama"]);
        let q8 = quick(&["--preset", "tiny-llama", "--quantize", "q8_0"]);
        assert_eq!(q8.quantized, Some(QuantFormat::Q8_0));
        // The heap counter is shared by the tests running beside this one: count the weights'
        // own bytes instead of `weights_mb`.
        let a = args(&["--preset", "tiny-llama", "--quantize", "q8_0"]);
        let mut rng = StdRng::seed_from_u64(0);
        let (model, ..) = build(&a, &a.shape(), DType::F32, &Device::Cpu, &mut rng).unwrap();
        let Model::Llama(m) = model else {
            panic!("tiny-llama builds a LLaMA")
        };
        let (mut kept, mut dense_bytes) = (0, 0);
        for lin in m.layers.iter().flat_map(|l| &l.linears) {
            assert!(
                lin.base.weight.as_dense().is_none(),
                "every projection quantized"
            );
            kept += lin.base.weight.storage_bytes();
            dense_bytes += lin.base.weight.dims().iter().product::<usize>() * 4;
        }
        // Q8_0: 34 bytes per 32 weights.
        assert_eq!(kept * 128, dense_bytes * 34);
        // The device path quantizes as it draws.
        let on_device = llama_on_device(m.config.clone(), DType::F32, &Device::Cpu, a.quantize);
        for lin in on_device.unwrap().layers.iter().flat_map(|l| &l.linears) {
            assert!(lin.base.weight.as_dense().is_none());
        }
        assert!((q8.losses[0] - dense.losses[0]).abs() < 0.01 * dense.losses[0]);
        assert!(q8.losses[3] < q8.losses[0], "{:?}", q8.losses);
        let e = run(&args(&["--preset", "tiny-bert", "--quantize", "q4_1"]));
        assert!(e.is_err());
    }

    /// `--memory-budget` runs the step as `train`'s plan says: at 70% of the plain step's estimate
    /// on the CPU it recomputes (offloading nothing there), with the same losses and the step's
    /// estimate under the budget. Where the plan would split the batch (a CPU splits before it
    /// recomputes) or nothing fits, a clear error.
    #[test]
    fn a_budget_runs_the_plan() {
        let one = [
            "--preset",
            "tiny-llama",
            "--layers",
            "8",
            "--batch-size",
            "1",
            "--max-length",
            "64",
        ];
        let plain = quick(&one);
        let budget = (plain.estimated_step_mem_mb * 0.7 * (1 << 20) as f64) as usize;
        let b = budget.to_string();
        let planned = quick(&[&one[..], &["--memory-budget", &b]].concat());
        let plan = planned.plan.as_deref().expect("a plan");
        assert!(!plan.ends_with("checkpointed: none"), "{plan}");
        assert!(planned.offload_layers.is_empty());
        assert!(planned.estimated_step_mem_mb * ((1 << 20) as f64) <= budget as f64);
        assert_eq!(planned.losses, plain.losses);
        let two = [&one[..4], &["--batch-size", "2", "--max-length", "64"]].concat();
        let split = run(&args(&[&two[..], &["--memory-budget", &b]].concat()));
        let msg = format!("{:#}", split.err().expect("split"));
        assert!(msg.contains("try --batch-size"), "{msg}");
        let e = run(&args(&[&one[..], &["--memory-budget", "1000"]].concat()));
        let msg = format!("{:#}", e.err().expect("too small"));
        assert!(msg.contains("too small"), "{msg}");
    }

    fn quick(flags: &[&str]) -> BenchResult {
        let mut f = vec!["--warmup", "1", "--steps", "3"];
        f.extend_from_slice(flags);
        run(&args(&f)).unwrap()
    }

    /// Training itself. The memory and FLOP figures come from process-wide counters that other
    /// test threads move, so `tests/cli.rs` (`bench_reports_memory_and_flops`) checks them in a
    /// process of their own.
    #[test]
    fn tiny_models_train_and_report() {
        for preset in ["tiny-bert", "tiny-llama"] {
            let r = quick(&["--preset", preset]);
            assert_eq!(r.losses.len(), 4);
            assert!(r.losses.iter().all(|l| l.is_finite()));
            assert!(r.losses[3] < r.losses[0], "{preset}: {:?}", r.losses);
            assert!(r.step_ms_median > 0.0);
            assert_eq!(r.memory_counter, "heap");
            assert!(r.driver_used_mb.is_none());
        }
    }

    #[test]
    fn bf16_follows_f32_on_tiny_models() {
        for preset in ["tiny-bert", "tiny-llama"] {
            let f = quick(&["--preset", preset]);
            let h = quick(&["--preset", preset, "--dtype", "bf16"]);
            assert_eq!(h.dtype, "bf16");
            for (a, b) in f.losses.iter().zip(&h.losses) {
                assert!(
                    (a - b).abs() < 2e-2 * a.abs().max(1.0),
                    "{preset}: {f:?} {h:?}",
                    f = f.losses,
                    h = h.losses
                );
            }
        }
    }
}
