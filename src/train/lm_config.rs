//! Causal-LM fine-tuning configuration (`safetune train-lm`): a TOML file whose every field a flag
//! can override. Defaults are a short CPU run: SmolLM2-135M-Instruct + LoRA (r=8, q_proj/v_proj)
//! on Moby Dick, chapters split 8:1:1.

use super::config::Method;
use crate::adapters::LoraConfig;
use crate::data::lm::PromptFormat;
use crate::safe::SafeConfig;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Where the text comes from.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LmDataKind {
    /// Moby Dick by chapter (the npm asset's layout).
    MobyDick,
    /// State of the Union addresses (the npm asset's layout).
    Sotu,
    /// A `.txt` file or a folder of them; documents split by position (fewer documents than
    /// `split_period`, one file say: the text split by position).
    Text,
    /// JSONL or a JSON array of records: `messages` / ShareGPT `conversations` (through the
    /// model's chat template), prompt/completion, prompt/response, instruction/output, or
    /// `text`; the loss counts the answers' tokens only.
    Instructions,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LmTrainConfig {
    /// GGUF file or Hugging Face LLaMA / GPT-2 folder; None: the SmolLM2 asset (fetched if missing).
    pub model: Option<PathBuf>,
    /// None: the asset of `data_kind` (Moby Dick or State of the Union), fetched if missing.
    pub data: Option<PathBuf>,
    pub data_kind: LmDataKind,
    pub prompt_format: PromptFormat,
    /// Tokens per training sequence.
    pub seq_len: usize,
    /// Of every `split_period` documents (or instructions), one validates and one tests.
    pub split_period: usize,
    pub output: PathBuf,
    pub method: Method,
    pub epochs: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    /// The peak learning rate.
    pub lr: f64,
    /// linear | cosine | constant: the learning rate after its linear warm-up.
    pub lr_scheduler: crate::nn::optim::LrScheduler,
    /// The share of the run's steps over which the learning rate warms up from 0.
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub seed: u64,
    /// Stop after this many optimizer steps per epoch (0 = whole epochs). 30 by default, so the
    /// default run is a short one on a CPU; the run says so when it cuts an epoch short.
    pub max_steps_per_epoch: usize,
    /// Stop the run after this many optimizer steps in all (0 = no limit).
    pub max_steps: usize,
    /// Stop after this epoch with its checkpoint written, to continue later with `--resume`.
    pub stop_after_epoch: Option<usize>,
    /// Validate every this many optimizer steps besides each epoch's end (0: epoch ends only);
    /// each validation can become the best adapter and counts for early stopping.
    pub eval_steps: usize,
    /// Write a resumable step checkpoint, `checkpoint-STEP/`, every this many optimizer steps
    /// (0: none); `--resume` continues from the newest checkpoint.
    pub save_steps: usize,
    /// Keep only the newest this many step checkpoints (0: all).
    pub save_total_limit: usize,
    /// End the run after this many validations in a row without a better validation metric
    /// (0: never); the best adapter is kept, summary.json says `stopped_early`.
    pub early_stopping_patience: usize,
    /// none | tensorboard: TensorBoard event files in `OUTPUT/runs/`.
    pub report_to: super::config::ReportTo,
    /// Evaluate perplexity on at most this many validation / test sequences (0 = all).
    pub max_eval_sequences: usize,
    pub eval_batch_size: usize,
    /// cpu | cuda | cuda:N
    pub device: crate::device::DeviceSpec,
    /// f32 | bf16: precision of the frozen base weights and activations (adapters, their
    /// optimizer state and the losses stay f32).
    pub dtype: crate::device::DTypeSpec,
    /// Keep the base's projection weights quantized in memory, dequantized per matmul: a GGUF
    /// base at its file size, a safetensors base quantized into `quantize_format` as it loads.
    pub quantized_base: bool,
    /// q4_0 | q4_1 | q8_0: the blocks a float (safetensors) base is quantized into (default q8_0);
    /// implies `quantized_base`.
    pub quantize_format: Option<crate::nn::linear::QuantFormat>,
    /// Keep only each trainable layer's input in the forward and run the layer again in backward:
    /// activation memory of one layer instead of all, for one more forward of the trainable layers.
    pub gradient_checkpointing: bool,
    /// The most a training step may add to memory above the weights (`"6GB"`, `"900MB"` or
    /// bytes): the memory plan checkpoints layers and splits the batch into smaller passes to
    /// fit, and plans again as SAFE freezes adapters (see `train/plan.rs`).
    pub memory_budget: Option<super::plan::ByteSize>,
    /// Once the bottom layers freeze, keep their output per sequence on disk (in the output
    /// folder) and reuse it instead of recomputing those layers.
    pub cache_frozen_bottom: bool,
    pub lora: LoraConfig,
    pub safe: SafeConfig,
}

impl Default for LmTrainConfig {
    fn default() -> Self {
        Self {
            model: None,
            data: None,
            data_kind: LmDataKind::MobyDick,
            prompt_format: PromptFormat::Chatml,
            seq_len: 128,
            split_period: 10,
            output: PathBuf::from("runs/lm"),
            method: Method::Lora,
            epochs: 2,
            batch_size: 4,
            grad_accum: 1,
            lr: 1e-3,
            lr_scheduler: Default::default(),
            warmup_ratio: 0.06,
            weight_decay: 0.0,
            grad_clip: 1.0,
            seed: 42,
            max_steps_per_epoch: 30,
            max_steps: 0,
            stop_after_epoch: None,
            eval_steps: 0,
            save_steps: 0,
            save_total_limit: 0,
            early_stopping_patience: 0,
            report_to: Default::default(),
            max_eval_sequences: 64,
            eval_batch_size: 8,
            device: Default::default(),
            dtype: Default::default(),
            quantized_base: false,
            quantize_format: None,
            gradient_checkpointing: false,
            memory_budget: None,
            cache_frozen_bottom: true,
            lora: LoraConfig {
                r: 8,
                alpha: 16.0,
                dropout: 0.05,
                target_modules: vec!["q_proj".into(), "v_proj".into()],
                use_rslora: false,
            },
            safe: SafeConfig {
                monitor_examples: 32,
                ..SafeConfig::default()
            },
        }
    }
}

impl LmTrainConfig {
    pub fn from_toml_file(path: &std::path::Path) -> anyhow::Result<Self> {
        super::config::toml_over_defaults(path, &Self::default())
    }

    /// Checks every setting's range once flags and the config file are merged: an error names the
    /// flag (and its config key) or the key, and what is allowed.
    pub fn validate(&self) -> anyhow::Result<()> {
        use super::config::at_least;
        super::config::check_run_settings(&self.fit_config(false, false), &self.lora)?;
        at_least(2, Some("--max-length"), "seq_len", self.seq_len)?;
        at_least(1, None, "eval_batch_size", self.eval_batch_size)?;
        // One document of every period validates and one tests.
        at_least(3, None, "split_period", self.split_period)?;
        Ok(())
    }

    /// The sequence length against the loaded model's positions (`source`: where it came from).
    pub fn check_model(
        &self,
        model: &crate::model::Decoder,
        source: &std::path::Path,
    ) -> anyhow::Result<()> {
        let positions = model.max_positions();
        if self.seq_len > positions {
            let rule = format!(
                "at most the model's {positions} positions (max_position_embeddings, or \
                 n_positions for GPT-2, of {})",
                source.display()
            );
            let out_of_range = super::config::out_of_range;
            return Err(out_of_range(
                Some("--max-length"),
                "seq_len",
                self.seq_len,
                &rule,
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Decoder, Gpt2Config, Gpt2LMHeadModel};
    use candle_core::{DType, Device};
    use rand::SeedableRng;

    /// A sequence longer than the model's position table is refused naming the flag and the
    /// model's limit (it used to fail inside the first forward pass, after the output folder was
    /// written).
    #[test]
    fn seq_len_must_fit_the_models_positions() {
        let cfg: Gpt2Config = serde_json::from_value(serde_json::json!({
            "vocab_size": 20, "n_positions": 8, "n_embd": 8, "n_layer": 1, "n_head": 2
        }))
        .unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let m = Gpt2LMHeadModel::random(cfg, DType::F32, &Device::Cpu, &mut rng).unwrap();
        let model = Decoder::from(m);
        let src = std::path::Path::new("models/tiny");
        let mut c = LmTrainConfig {
            seq_len: 8,
            ..Default::default()
        };
        c.check_model(&model, src).unwrap();
        c.seq_len = 9;
        let e = c.check_model(&model, src).unwrap_err().to_string();
        assert!(
            e.contains("--max-length 9") && e.contains("8 positions") && e.contains("models/tiny"),
            "{e}"
        );
    }
}
