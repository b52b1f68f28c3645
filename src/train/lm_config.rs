//! Causal-LM fine-tuning configuration (`safetune train-lm`): a TOML file whose every field a flag
//! can override. Defaults are a short CPU run: SmolLM2-135M-Instruct + LoRA (r=8, q_proj/v_proj)
//! on Moby Dick, chapters split 8:1:1.

use super::config::RunConfig;
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

/// `safetune train-lm`'s configuration; unknown keys are refused by
/// [`toml_over_defaults`](super::config::toml_over_defaults).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
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
    /// The training loop's settings (at the top level of the TOML file).
    #[serde(flatten)]
    pub run: RunConfig,
    /// Evaluate perplexity on at most this many validation / test sequences (0 = all).
    pub max_eval_sequences: usize,
    /// Keep the base's projection weights quantized in memory, dequantized per matmul: a GGUF
    /// base at its file size, a safetensors base quantized into `quantize_format` as it loads.
    pub quantized_base: bool,
    /// q4_0 | q4_1 | q8_0: the blocks a float (safetensors) base is quantized into (default q8_0);
    /// implies `quantized_base`.
    pub quantize_format: Option<crate::nn::linear::QuantFormat>,
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
            run: RunConfig {
                output: PathBuf::from("runs/lm"),
                epochs: 2,
                batch_size: 4,
                max_steps_per_epoch: 30,
                eval_batch_size: 8,
                ..RunConfig::default()
            },
            max_eval_sequences: 64,
            quantized_base: false,
            quantize_format: None,
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
        let fit = self.fit_config(false, false);
        super::config::check_run_settings(&fit, &self.lora, &self.run.device)?;
        at_least(2, Some("--max-length"), "seq_len", self.seq_len)?;
        at_least(1, None, "eval_batch_size", self.run.eval_batch_size)?;
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
