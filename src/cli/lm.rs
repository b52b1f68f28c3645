//! Command line for decoders: `safetune train-lm | perplexity | generate`.

use crate::adapters::Adapted;
use crate::data::lm::PromptFormat;
use crate::model::generate::{self, Sampling};
use crate::model::CausalLm;
use crate::train::lm::{self, LmSummary};
use crate::train::lm_config::{LmDataKind, LmTrainConfig};
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;

/// Flags of `train-lm`; each overrides the config file.
#[derive(Args, Clone, Default)]
pub struct LmTrainArgs {
    /// TOML config file (fields of `LmTrainConfig`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// GGUF file, or Hugging Face folder (LLaMA, Mistral, Qwen2 or GPT-2; one safetensors file or
    /// sharded), or a model id in the local Hugging Face cache. Default: SmolLM2-135M-Instruct
    /// (fetched).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Text file/folder or instruction JSONL. Default: the asset of --data-kind (Moby Dick).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// moby-dick | sotu | text | instructions
    #[arg(long)]
    pub data_kind: Option<LmDataKind>,
    /// How instructions are laid out: plain | chatml
    #[arg(long)]
    pub prompt_format: Option<PromptFormat>,
    /// Tokens per training sequence (config key seq_len).
    #[arg(long, alias = "seq-len")]
    pub max_length: Option<usize>,
    #[command(flatten)]
    pub run: super::RunArgs,
    /// Evaluate on at most this many validation/test sequences; 0 = all.
    #[arg(long)]
    pub max_eval_sequences: Option<usize>,
    /// Keep the frozen projection weights quantized in memory (dequantized per matmul) instead of
    /// a full-precision copy: a GGUF model's own blocks, a safetensors model's quantized as it
    /// loads (see --quantize-format).
    #[arg(long)]
    pub quantized_base: bool,
    /// Blocks a safetensors model's projections are quantized into (implies --quantized-base;
    /// default q8_0).
    #[arg(long, value_enum)]
    pub quantize_format: Option<crate::nn::linear::QuantFormat>,
}

impl LmTrainArgs {
    pub fn to_config(&self) -> Result<LmTrainConfig> {
        let mut c = match &self.config {
            Some(p) => LmTrainConfig::from_toml_file(p)?,
            None => LmTrainConfig::default(),
        };
        if self.model.is_some() {
            c.model = self.model.clone();
        }
        if let Some(p) = &self.data {
            c.data = Some(p.clone());
            if self.data_kind.is_none() {
                c.data_kind = if p.extension().is_some_and(|e| e == "jsonl" || e == "json") {
                    LmDataKind::Instructions
                } else {
                    LmDataKind::Text
                };
            }
        }
        set!(c.data_kind, self.data_kind);
        set!(c.prompt_format, self.prompt_format);
        set!(c.seq_len, self.max_length);
        self.run.apply(&mut c.run, &mut c.lora, &mut c.safe);
        set!(c.max_eval_sequences, self.max_eval_sequences);
        c.quantized_base |= self.quantized_base;
        c.quantize_format = self.quantize_format.or(c.quantize_format);
        c.validate()?;
        Ok(c)
    }
}

/// The decoder `perplexity` and `generate` load, and the adapter they put on it.
#[derive(Args)]
pub struct DecoderArgs {
    /// GGUF file, or Hugging Face folder (LLaMA, Mistral, Qwen2 or GPT-2; one safetensors file or
    /// sharded), or a model id in the local Hugging Face cache. Default: SmolLM2-135M-Instruct
    /// (fetched).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// PEFT adapter folder to apply (e.g. a train-lm output).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Keep the frozen projection weights quantized in memory (dequantized per matmul) instead of
    /// a full-precision copy: a GGUF model's own blocks, a safetensors model's quantized as it
    /// loads (see --quantize-format).
    #[arg(long)]
    pub quantized_base: bool,
    /// Blocks a safetensors model's projections are quantized into (implies --quantized-base;
    /// default q8_0).
    #[arg(long, value_enum)]
    pub quantize_format: Option<crate::nn::linear::QuantFormat>,
    #[command(flatten)]
    pub device: crate::device::DeviceArgs,
}

#[derive(Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub decoder: DecoderArgs,
    /// Text file/folder. Default: the Moby Dick asset's test chapters.
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long)]
    pub data_kind: Option<LmDataKind>,
    /// Tokens per sequence.
    #[arg(long, alias = "seq-len", default_value_t = 128)]
    pub max_length: usize,
    /// Which split of the documents: test | validation | train
    #[arg(long, default_value = "test")]
    pub split: String,
    /// At most this many sequences (evenly spaced); 0 = all.
    #[arg(long, default_value_t = 64)]
    pub max_sequences: usize,
}

#[derive(Args)]
pub struct GenerateArgs {
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    #[command(flatten)]
    pub decoder: DecoderArgs,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 50)]
    pub top_k: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Wrap the prompt in the model's chat template (ChatML when it has none).
    #[arg(long)]
    pub chat: bool,
    /// Also print the top next-token logits after the prompt (JSON), for checking against a reference.
    #[arg(long)]
    pub show_logits: Option<usize>,
    /// Write the prompt's ids and its full next-token logits to this JSON file.
    #[arg(long)]
    pub logits_out: Option<PathBuf>,
}

/// Loads the decoder and, when given, a PEFT adapter onto it.
fn load_with_adapter(a: &DecoderArgs) -> Result<lm::LoadedDecoder> {
    let dtype = a.device.dtype_spec().dtype();
    let device = a.device.open()?;
    let mut d = lm::load_decoder(
        a.model.as_deref(),
        dtype,
        &device,
        a.quantized_base,
        a.quantize_format,
    )?;
    if let Some(dir) = a.adapter.as_deref() {
        let pc = crate::io::peft::read_config(dir)?;
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
        CausalLm::add_lora(
            &mut d.model,
            &pc.lora(),
            pc.layers_to_transform.as_deref(),
            &mut rng,
        )?;
        crate::io::peft::load(dir, &mut d.model)
            .with_context(|| format!("{}: adapter does not fit the model", dir.display()))?;
        anyhow::ensure!(
            !d.model.adapters().is_empty(),
            "{}: no adapter module matches the model",
            dir.display()
        );
    }
    Ok(d)
}

pub fn train_lm(a: &LmTrainArgs) -> Result<()> {
    let cfg = a.to_config()?;
    super::check_output(&cfg.run.output, a.run.resume, a.run.overwrite)?;
    if let Some(s) = lm::train_lm(&cfg, a.run.resume, !a.run.quiet)? {
        print_lm_summary(&cfg, &s);
    }
    Ok(())
}

pub fn perplexity(a: &PerplexityArgs) -> Result<()> {
    crate::train::config::at_least(2, Some("--max-length"), "seq_len", a.max_length)?;
    let d = load_with_adapter(&a.decoder)?;
    let mut cfg = LmTrainConfig {
        data: a.data.clone(),
        seq_len: a.max_length,
        ..Default::default()
    };
    cfg.check_model(&d.model, &d.source)?;
    if a.data.is_some() {
        cfg.data_kind = LmDataKind::Text;
    }
    if let Some(k) = a.data_kind {
        cfg.data_kind = k;
    }
    let splits = lm::load_lm_data(&cfg, &d)?;
    let items = match a.split.as_str() {
        "test" => &splits.test,
        "validation" => &splits.validation,
        "train" => &splits.train,
        s => anyhow::bail!("unknown split '{s}' (expected test, validation or train)"),
    };
    let items = lm::evenly(items, a.max_sequences);
    let (loss, ppl) = lm::perplexity(&d.model, &items, 8)?;
    let tokens: usize = items.iter().map(|s| s.counted()).sum();
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "split": a.split, "sequences": items.len(), "tokens": tokens,
            "loss": loss, "perplexity": ppl,
        }))?
    );
    Ok(())
}

pub fn generate(a: &GenerateArgs) -> Result<()> {
    let d = load_with_adapter(&a.decoder)?;
    // The model's own chat template when it has one (as transformers' apply_chat_template with
    // add_generation_prompt), else ChatML.
    let template = match (&d.chat_template, a.chat) {
        (Err(e), true) => anyhow::bail!("{e} (needed for --chat)"),
        (t, _) => t.as_ref().ok().and_then(Option::as_ref),
    };
    let text = match (template, a.chat) {
        (_, false) => a.prompt.clone(),
        (Some(t), true) => {
            let user = crate::data::chat::Message {
                role: "user".into(),
                content: a.prompt.clone(),
            };
            t.render(&[user], true)
                .map_err(|e| anyhow::anyhow!("{}: chat template: {e}", t.origin.display()))?
        }
        (None, true) => PromptFormat::Chatml.prompt_text(&a.prompt),
    };
    let enc = d
        .tokenizer
        .encode(text.as_str(), false)
        .map_err(|e| anyhow::anyhow!("cannot tokenize the prompt ({e})"))?;
    let ids = enc.get_ids().to_vec();
    anyhow::ensure!(!ids.is_empty(), "the prompt is empty");
    if let Some(path) = &a.logits_out {
        let logits = generate::next_logits(&d.model, &ids)?;
        std::fs::write(
            path,
            serde_json::to_string(&serde_json::json!({ "ids": ids, "logits": logits }))?,
        )
        .with_context(|| format!("{}: cannot write logits", path.display()))?;
    }
    if let Some(k) = a.show_logits {
        let logits = generate::next_logits(&d.model, &ids)?;
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_by(|&i, &j| logits[j].total_cmp(&logits[i]));
        let top: Vec<_> = idx[..k.min(idx.len())]
            .iter()
            .map(|&i| {
                serde_json::json!({"id": i, "logit": logits[i],
                    "token": d.tokenizer.id_to_token(i as u32)})
            })
            .collect();
        eprintln!("{}", serde_json::json!({ "prompt_ids": ids, "top": top }));
    }
    let mut stop: Vec<u32> = d.eos.clone();
    stop.extend(d.tokenizer.token_to_id("<|im_end|>"));
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(a.seed);
    let s = Sampling {
        temperature: a.temperature,
        top_k: a.top_k,
    };
    let new = generate::generate(&d.model, &ids, a.max_new_tokens, &stop, s, &mut rng)?;
    let out = d
        .tokenizer
        .decode(&new, true)
        .map_err(|e| anyhow::anyhow!("cannot decode ({e})"))?;
    println!("{}{}", a.prompt, out);
    Ok(())
}

fn print_lm_summary(cfg: &LmTrainConfig, s: &LmSummary) {
    let mb = |b: f64| format!("{:.0} MB", b / 1e6);
    let rows = [
        ("method", s.method.clone()),
        (
            "test perplexity",
            format!(
                "{:.3} (base model {:.3})",
                s.test_perplexity, s.base_test_perplexity
            ),
        ),
        (
            "best epoch",
            format!("{} of {}", s.run.best_epoch, s.run.epochs),
        ),
        (
            "train time",
            format!(
                "{:.1} s (total {:.1} s)",
                s.run.totals.train_wall_s, s.run.wall_s
            ),
        ),
        ("peak memory (heap)", mb(s.run.totals.peak_mem_bytes as f64)),
        (
            "step memory (max / mean)",
            format!(
                "{} / {}",
                mb(s.run.totals.step_mem_bytes as f64),
                mb(s.run.totals.mean_step_mem_bytes)
            ),
        ),
        (
            "train FLOPs",
            format!(
                "{:.3e} (unfrozen: {:.3e})",
                s.run.totals.train_flops as f64, s.run.totals.unfrozen_train_flops_estimate as f64
            ),
        ),
        (
            "trainable params",
            s.run.totals.trainable_params.to_string(),
        ),
        (
            "memory plan (at the end)",
            s.run
                .totals
                .plan
                .as_ref()
                .map(|p| p.describe())
                .unwrap_or("n/a".into()),
        ),
        ("frozen adapters", s.frozen.len().to_string()),
        ("output", cfg.run.output.display().to_string()),
    ];
    println!();
    for (k, v) in rows {
        println!("  {k:<24} {v}");
    }
}
