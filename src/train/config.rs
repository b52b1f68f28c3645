//! Training configuration: a TOML file (`--config`) whose every field can be overridden by a flag.
//! Defaults are the demo's: MiniLM-L6 + LoRA (r=8, alpha=16, query/value) on BBC News.

use super::fit::FitConfig;
use crate::adapters::LoraConfig;
use crate::safe::{SafeConfig, TauTarget};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Which adapters train, and how they freeze.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Method {
    /// Plain LoRA in every layer, nothing frozen (the baseline).
    Lora,
    /// LoRA in every layer with SAFE's importance-driven freezing.
    Safe,
    /// LoRA only in the upper half of the layers (the paper's "Zhang et al." baseline).
    Upper,
    /// LoRA everywhere, the bottom K layers' adapters frozen from the start (a control).
    FreezePrefix(usize),
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "lora" => Ok(Method::Lora),
            "safe" => Ok(Method::Safe),
            "upper" => Ok(Method::Upper),
            _ => s
                .strip_prefix("freeze-prefix:")
                .and_then(|k| k.parse().ok())
                .map(Method::FreezePrefix)
                .ok_or_else(|| {
                    format!("unknown method '{s}' (expected lora, safe, upper or freeze-prefix:K)")
                }),
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Method::Lora => write!(f, "lora"),
            Method::Safe => write!(f, "safe"),
            Method::Upper => write!(f, "upper"),
            Method::FreezePrefix(k) => write!(f, "freeze-prefix:{k}"),
        }
    }
}

impl From<Method> for String {
    fn from(m: Method) -> String {
        m.to_string()
    }
}

impl TryFrom<String> for Method {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

/// Where a run's scalars also go, besides its JSONL logs (`--report-to`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ReportTo {
    #[default]
    None,
    /// Event files in `OUTPUT/runs/` (train loss, learning rate, step memory, validation).
    Tensorboard,
}

/// Where the data comes from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DataKind {
    /// One folder per class of `.txt` files (BBC News layout).
    Folder,
    /// The SpamAssassin npm package layout.
    Spam,
    /// One CSV / TSV / JSONL / JSON / Parquet file, split into train/validation/test; or
    /// explicit split files (`train_file`, ...).
    Table,
    /// A GLUE-style folder: train.tsv, dev.tsv (and test.tsv).
    Glue,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// None: the BBC News asset (fetched if missing).
    pub path: Option<PathBuf>,
    /// Explicit split files (any table format) instead of `path`: the train file, and optionally
    /// validation and test files; a split without a file is carved out of the train file.
    pub train_file: Option<PathBuf>,
    pub validation_file: Option<PathBuf>,
    pub test_file: Option<PathBuf>,
    pub kind: DataKind,
    pub text_column: String,
    pub text_pair_column: Option<String>,
    pub label_column: String,
    pub task: crate::data::TaskKind,
    pub format: Option<crate::data::TableFormat>,
    pub validation_fraction: f64,
    pub test_fraction: f64,
    pub max_length: usize,
    /// Question answering: context tokens that consecutive windows of a long context share.
    pub doc_stride: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            path: None,
            train_file: None,
            validation_file: None,
            test_file: None,
            kind: DataKind::Folder,
            text_column: "text".into(),
            text_pair_column: None,
            label_column: "label".into(),
            task: crate::data::TaskKind::Classification,
            format: None,
            validation_fraction: 0.15,
            test_fraction: 0.15,
            max_length: 128,
            doc_stride: 128,
        }
    }
}

/// The training loop's settings, which `train` and `train-lm` share (each command's config
/// flattens them in: they stay top-level keys of its TOML file); the loop reads them as a
/// [`FitConfig`](super::fit::FitConfig).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct RunConfig {
    pub output: PathBuf,
    pub method: Method,
    pub epochs: usize,
    pub batch_size: usize,
    pub eval_batch_size: usize,
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
    /// Stop after this many optimizer steps per epoch (0 = the whole epoch). For quick runs.
    pub max_steps_per_epoch: usize,
    /// Stop the run after this many optimizer steps in all (0 = no limit): the epoch it falls in
    /// ends there, validated and checkpointed, and the run ends as usual.
    pub max_steps: usize,
    /// Stop after this epoch with its checkpoint written, to continue later with `--resume` (a
    /// run cut into time-limited jobs); the schedule stays that of `epochs`.
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
    /// Once the bottom layers freeze, keep their output per example on disk (in the output folder)
    /// and reuse it in later epochs instead of recomputing those layers (on a GPU only where that
    /// pays: `plan::frozen_cache_pays`).
    pub cache_frozen_bottom: bool,
    /// Keep only each trainable layer's input in the forward and run the layer again in backward:
    /// activation memory of one layer instead of all, for one more forward of the trainable layers.
    pub gradient_checkpointing: bool,
    /// These layers' saved state goes to pinned host memory until their backward (CUDA; e.g.
    /// `[0, 4, 8]`: spaced layers hide their copies best). Not with `memory_budget`, whose plan
    /// chooses the layers itself, nor with `gradient_checkpointing`.
    pub offload_layers: Vec<usize>,
    /// Whether `memory_budget`'s plan may also offload saved state to pinned host memory (CUDA)
    /// where its price (`plan::OffloadPrice`, from measured copy rates) is below recomputing it.
    /// Off by default until a whole run with it is measured on a GPU.
    pub budget_offload: bool,
    /// The most a training step may add to memory above the weights (`"6GB"`, `"900MB"` or
    /// bytes): the memory plan checkpoints layers and splits the batch into smaller passes to
    /// fit, and plans again as SAFE freezes adapters (see `train/plan.rs`).
    pub memory_budget: Option<super::plan::ByteSize>,
    /// cpu | cuda | cuda:N
    pub device: crate::device::DeviceSpec,
    /// f32 | bf16: precision of the frozen base weights and activations (adapters, their
    /// optimizer state and the losses stay f32).
    pub dtype: crate::device::DTypeSpec,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            output: PathBuf::from("runs/demo"),
            method: Method::Lora,
            epochs: 3,
            batch_size: 16,
            eval_batch_size: 32,
            grad_accum: 1,
            lr: 1e-3,
            lr_scheduler: Default::default(),
            warmup_ratio: 0.06,
            weight_decay: 0.0,
            grad_clip: 1.0,
            seed: 42,
            max_steps_per_epoch: 0,
            max_steps: 0,
            stop_after_epoch: None,
            eval_steps: 0,
            save_steps: 0,
            save_total_limit: 0,
            early_stopping_patience: 0,
            report_to: Default::default(),
            cache_frozen_bottom: true,
            gradient_checkpointing: false,
            offload_layers: Vec::new(),
            budget_offload: false,
            memory_budget: None,
            device: Default::default(),
            dtype: Default::default(),
        }
    }
}

/// `safetune train`'s configuration: a TOML file whose every field a flag can override; unknown
/// keys are refused by [`toml_over_defaults`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// Hugging Face model folder; None: the MiniLM-L6 asset (fetched if missing).
    pub model: Option<PathBuf>,
    /// The training loop's settings (at the top level of the TOML file).
    #[serde(flatten)]
    pub run: RunConfig,
    /// Start from this PEFT LoRA adapter folder (its adapters and classifier), e.g. one trained by
    /// PEFT or by an earlier run, instead of fresh adapters.
    pub init_adapter: Option<PathBuf>,
    /// Run the frozen bottom layers with dropout, as an unfrozen run would (and as the paper's
    /// PyTorch setting does), instead of in inference mode. Rules out the cache.
    pub frozen_bottom_dropout: bool,
    pub data: DataConfig,
    pub lora: LoraConfig,
    pub safe: SafeConfig,
}

impl TrainConfig {
    pub fn from_toml_file(path: &std::path::Path) -> anyhow::Result<Self> {
        toml_over_defaults(path, &Self::default())
    }

    /// Checks every setting's range once flags and the config file are merged: an error names the
    /// flag (and its config key) or the key, and what is allowed.
    pub fn validate(&self) -> anyhow::Result<()> {
        check_run_settings(&self.fit_config(false, false), &self.lora, &self.run.device)?;
        at_least(1, None, "eval_batch_size", self.run.eval_batch_size)?;
        let d = &self.data;
        at_least(2, Some("--max-length"), "data.max_length", d.max_length)?;
        for (key, v) in [
            ("data.validation_fraction", d.validation_fraction),
            ("data.test_fraction", d.test_fraction),
        ] {
            if !(0.0..1.0).contains(&v) {
                return Err(out_of_range(None, key, v, "in [0, 1)"));
            }
        }
        if d.train_file.is_none() {
            let other = [
                (
                    "--validation-file",
                    "data.validation_file",
                    &d.validation_file,
                ),
                ("--test-file", "data.test_file", &d.test_file),
            ];
            if let Some((flag, key, _)) = other.iter().find(|o| o.2.is_some()) {
                anyhow::bail!(
                    "{flag} (config key {key}) needs --train-file (data.train_file): the label \
                     order comes from the train file"
                );
            }
        } else if d.path.is_some() {
            anyhow::bail!(
                "--data (data.path) and --train-file (data.train_file) both given: use one"
            );
        }
        if d.task == crate::data::TaskKind::Qa && d.doc_stride >= d.max_length {
            return Err(out_of_range(
                Some("--doc-stride"),
                "data.doc_stride",
                d.doc_stride,
                &format!(
                    "below data.max_length ({}) for question answering",
                    d.max_length
                ),
            ));
        }
        let sum = d.validation_fraction + d.test_fraction;
        anyhow::ensure!(
            sum < 1.0,
            "config keys data.validation_fraction ({}) + data.test_fraction ({}) = {sum}: must \
             be below 1 (the rest of the data trains)",
            d.validation_fraction,
            d.test_fraction
        );
        Ok(())
    }
}

impl TrainConfig {
    /// The token limit against the model's position table: reads (and so validates) the
    /// `config.json` of `model_dir`.
    pub fn check_model(&self, model_dir: &std::path::Path) -> anyhow::Result<()> {
        let path = model_dir.join("config.json");
        let config = crate::model::BertConfig::from_file(&path)?;
        if self.data.task == crate::data::TaskKind::Qa {
            if let Err(e) = config.family().qa_support() {
                anyhow::bail!("{}: {e}", path.display());
            }
        }
        let images = self.data.task == crate::data::TaskKind::Image;
        match (images, config.family().spec().images) {
            // Images are the patches the model's config says; --max-length does not apply.
            (true, true) => return Ok(()),
            (true, false) => anyhow::bail!(
                "{}: image classification (--task image) needs a ViT model (model_type 'vit'), \
                 not '{}'",
                path.display(),
                config.family().spec().model_type
            ),
            (false, true) => anyhow::bail!(
                "{}: a ViT model classifies images: pass --task image",
                path.display()
            ),
            (false, false) => {}
        }
        let positions = config.max_tokens();
        if self.data.max_length > positions {
            let rows = config.max_position_embeddings;
            let rule = if rows == positions {
                format!(
                    "at most the model's max_position_embeddings, {positions} ({})",
                    path.display()
                )
            } else {
                format!(
                    "at most {positions}: the model's max_position_embeddings, {rows}, less the \
                     positions up to its pad_token_id, where they start ({})",
                    path.display()
                )
            };
            let v = self.data.max_length;
            return Err(out_of_range(
                Some("--max-length"),
                "data.max_length",
                v,
                &rule,
            ));
        }
        Ok(())
    }
}

/// A setting out of range: the flag that sets it with its config key, or the key alone.
pub(crate) fn out_of_range(
    flag: Option<&str>,
    key: &str,
    value: impl std::fmt::Display,
    rule: &str,
) -> anyhow::Error {
    match flag {
        Some(f) => anyhow::anyhow!("{f} {value} (config key {key}): must be {rule}"),
        None => anyhow::anyhow!("config key {key} = {value}: must be {rule}"),
    }
}

/// A count that must be at least `min`.
pub(crate) fn at_least(
    min: usize,
    flag: Option<&str>,
    key: &str,
    value: usize,
) -> anyhow::Result<()> {
    if value < min {
        return Err(out_of_range(flag, key, value, &format!("at least {min}")));
    }
    Ok(())
}

/// Offload (`nn::offload`) moves CUDA memory to the host: `what` (a flag) needs a CUDA device.
pub(crate) fn ensure_offload_device(what: &str, cuda: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        cuda,
        "{what} moves CUDA memory to the host: run it with --device cuda"
    );
    Ok(())
}

/// The rules of the settings every training run has (`RunArgs`' flags and their config keys), for
/// [`TrainConfig::validate`] and `LmTrainConfig::validate`.
pub(crate) fn check_run_settings(
    f: &FitConfig,
    lora: &LoraConfig,
    device: &crate::device::DeviceSpec,
) -> anyhow::Result<()> {
    at_least(1, Some("--epochs"), "epochs", f.epochs)?;
    at_least(1, Some("--batch-size"), "batch_size", f.batch_size)?;
    at_least(1, Some("--grad-accum"), "grad_accum", f.grad_accum)?;
    at_least(1, Some("--lora-r"), "lora.r", lora.r)?;
    // safe.rounds_per_epoch and safe.max_warmup_epochs: 0 chooses them from the run's length.
    if *f.method == Method::Safe {
        let n = f.safe.monitor_examples;
        at_least(
            1,
            Some("--safe-monitor-examples"),
            "safe.monitor_examples",
            n,
        )?;
    }
    if let Some(k) = f.stop_after_epoch {
        at_least(1, Some("--stop-after-epoch"), "stop_after_epoch", k)?;
    }
    if !f.offload_layers.is_empty() {
        let other = match (f.memory_budget.is_some(), f.gradient_checkpointing) {
            (true, _) => Some("--memory-budget (memory_budget), whose plan chooses the layers"),
            (_, true) => Some("--gradient-checkpointing (gradient_checkpointing)"),
            _ => None,
        };
        if let Some(other) = other {
            anyhow::bail!("--offload-layers (offload_layers) and {other}: use one");
        }
        ensure_offload_device("--offload-layers (offload_layers)", device.is_cuda())?;
    }
    if f.budget_offload {
        anyhow::ensure!(
            f.memory_budget.is_some(),
            "--budget-offload (budget_offload) lets --memory-budget's plan offload: give \
             --memory-budget (memory_budget) too"
        );
        ensure_offload_device("--budget-offload (budget_offload)", device.is_cuda())?;
    }
    if !(f.lr.is_finite() && f.lr >= 0.0) {
        return Err(out_of_range(
            Some("--lr"),
            "lr",
            f.lr,
            "a finite number >= 0",
        ));
    }
    if !(0.0..=1.0).contains(&f.warmup_ratio) {
        let v = f.warmup_ratio;
        let flag = Some("--warmup-ratio");
        return Err(out_of_range(flag, "warmup_ratio", v, "in [0, 1]"));
    }
    for (flag, key, v) in [
        (Some("--weight-decay"), "weight_decay", f.weight_decay),
        (None, "grad_clip", f.grad_clip),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            return Err(out_of_range(flag, key, v, "a finite number >= 0"));
        }
    }
    if !(0.0..1.0).contains(&lora.dropout) {
        let v = lora.dropout;
        return Err(out_of_range(
            Some("--lora-dropout"),
            "lora.dropout",
            v,
            "in [0, 1)",
        ));
    }
    if !lora.alpha.is_finite() {
        let v = lora.alpha;
        return Err(out_of_range(
            Some("--lora-alpha"),
            "lora.alpha",
            v,
            "finite",
        ));
    }
    anyhow::ensure!(
        !lora.target_modules.is_empty() && lora.target_modules.iter().all(|m| !m.is_empty()),
        "--target-modules (config key lora.target_modules): must name at least one module"
    );
    let (flag, key, v, ok) = match f.safe.tau_final {
        TauTarget::Absolute(t) => (Some("--safe-tau"), "safe.tau_final", t, t.is_finite()),
        TauTarget::RelativeToMax(r) => (None, "safe.tau_final", r, r.is_finite() && r > 0.0),
    };
    if !ok {
        return Err(out_of_range(
            flag,
            key,
            v,
            "a finite number (a relative one above 0)",
        ));
    }
    let frac = f.safe.final_epoch_fraction;
    if !(frac > 0.0 && frac <= 1.0) {
        let key = "safe.final_epoch_fraction";
        return Err(out_of_range(None, key, frac, "in (0, 1]"));
    }
    Ok(())
}

/// Reads a TOML config in which every key it leaves out, in nested tables too, keeps its value in
/// `defaults`: a `[lora]` table that sets only `dropout` keeps the command's own target modules
/// (plain serde defaults would take `LoraConfig::default()`'s for the whole table). Unknown keys
/// are still refused.
pub fn toml_over_defaults<T: Serialize + serde::de::DeserializeOwned>(
    path: &std::path::Path,
    defaults: &T,
) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("{}: cannot read config ({e})", path.display()))?;
    let invalid =
        |e: &dyn std::fmt::Display| anyhow::anyhow!("{}: invalid config: {e}", path.display());
    let given: toml::Table = toml::from_str(&text).map_err(|e| invalid(&e))?;
    // The top-level keys are the config's own and its flattened `RunConfig`'s, which serde
    // cannot refuse unknown keys beside; nested tables refuse theirs themselves.
    let known = serde_json::to_value(defaults).map_err(|e| invalid(&e))?;
    let known: Vec<&String> = known
        .as_object()
        .map(|o| o.keys().collect())
        .unwrap_or_default();
    if let Some(key) = given.keys().find(|k| !known.contains(k)) {
        let mut expected: Vec<&str> = known.iter().map(|k| k.as_str()).collect();
        expected.sort_unstable();
        let expected = expected.join(", ");
        return Err(invalid(&format!(
            "unknown key `{key}`, expected one of {expected}"
        )));
    }
    let mut merged = toml::Table::try_from(defaults).map_err(|e| invalid(&e))?;
    merge_tables(&mut merged, given);
    merged.try_into().map_err(|e| invalid(&e))
}

fn merge_tables(base: &mut toml::Table, given: toml::Table) {
    for (k, v) in given {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(g)) => merge_tables(b, g),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_parse_and_print() {
        for s in ["lora", "safe", "upper", "freeze-prefix:3"] {
            assert_eq!(s.parse::<Method>().unwrap().to_string(), s);
        }
        assert!("freeze-prefix:x".parse::<Method>().is_err());
        assert!("adapterdrop".parse::<Method>().is_err());
    }

    #[test]
    fn toml_overrides_defaults_and_rejects_typos() {
        let c: TrainConfig = toml::from_str(
            "method = \"safe\"\nepochs = 3\n[lora]\nr = 4\nalpha = 16.0\ndropout = 0.0\ntarget_modules = [\"query\"]\nuse_rslora = false\n[data]\nmax_length = 64\n",
        )
        .unwrap();
        assert_eq!(c.run.method, Method::Safe);
        assert_eq!((c.run.epochs, c.lora.r, c.data.max_length), (3, 4, 64));
        assert_eq!(c.run.batch_size, TrainConfig::default().run.batch_size);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("typo.toml");
        for typo in [
            "epoch = 3",
            "[lora]\nrr = 4",
            "[safe]\ntau = 0.1",
            "eval_batchsize = 3",
        ] {
            std::fs::write(&path, typo).unwrap();
            let e = TrainConfig::from_toml_file(&path).unwrap_err().to_string();
            let key = typo.rsplit('\n').next().unwrap().split(' ').next().unwrap();
            assert!(e.contains("typo.toml") && e.contains(key), "{typo}: {e}");
        }
        // Keys that default to nothing (`model`, `memory_budget`, ...) are known.
        std::fs::write(
            &path,
            "model = \"m\"\nmemory_budget = \"1GB\"\nstop_after_epoch = 1",
        )
        .unwrap();
        let c = TrainConfig::from_toml_file(&path).unwrap();
        assert_eq!(c.run.stop_after_epoch, Some(1));
        assert_eq!(c.run.memory_budget.map(|b| b.0), Some(1_000_000_000));
    }

    /// A table that sets one key keeps the command's defaults for the others (the LM trainer's
    /// LoRA targets and SAFE rounds are not the classifier's); typos are still refused.
    #[test]
    fn partial_tables_keep_the_commands_defaults() {
        use crate::train::lm_config::LmTrainConfig;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "epochs = 3\n[lora]\ndropout = 0.0\n[safe]\nwarmup_rel_tol = 0.1\n",
        )
        .unwrap();
        let c = LmTrainConfig::from_toml_file(&path).unwrap();
        let d = LmTrainConfig::default();
        assert_eq!(
            (c.run.epochs, c.lora.dropout, c.safe.warmup_rel_tol),
            (3, 0.0, 0.1)
        );
        assert_eq!(c.lora.target_modules, d.lora.target_modules);
        assert_eq!(c.lora.r, d.lora.r);
        assert_eq!(c.safe.rounds_per_epoch, d.safe.rounds_per_epoch);
        assert_eq!(c.safe.monitor_examples, d.safe.monitor_examples);
        let b = TrainConfig::from_toml_file(&path).unwrap();
        assert_eq!(
            b.lora.target_modules,
            TrainConfig::default().lora.target_modules
        );
        std::fs::write(&path, "[lora]\ndropuot = 0.0\n").unwrap();
        let e = LmTrainConfig::from_toml_file(&path)
            .unwrap_err()
            .to_string();
        assert!(e.contains("c.toml") && e.contains("dropuot"), "{e}");
    }

    /// Offloaded layers read from TOML, refused on the CPU and beside a memory budget or
    /// checkpointing (the budget's plan picks its own layers, with `budget_offload`; checkpointed
    /// layers keep only their input).
    #[test]
    fn offload_layers_come_from_toml_and_exclude_a_budget_and_checkpointing() {
        let c: TrainConfig =
            toml::from_str("offload_layers = [0, 3]\ndevice = \"cuda\"\n").unwrap();
        assert_eq!(c.run.offload_layers, [0, 3]);
        c.validate().unwrap();
        let mut on_cpu = c.clone();
        on_cpu.run.device = crate::device::DeviceSpec::Cpu;
        let e = on_cpu.validate().unwrap_err().to_string();
        assert!(
            e.contains("--offload-layers") && e.contains("--device cuda"),
            "{e}"
        );
        let mut budget = TrainConfig::default();
        budget.run.offload_layers = vec![1];
        budget.run.memory_budget = Some(super::super::plan::ByteSize(1 << 30));
        let e = budget.validate().unwrap_err().to_string();
        assert!(
            e.contains("--offload-layers") && e.contains("--memory-budget"),
            "{e}"
        );
        let mut checkpointing = TrainConfig::default();
        checkpointing.run.offload_layers = vec![1];
        checkpointing.run.gradient_checkpointing = true;
        let e = checkpointing.validate().unwrap_err().to_string();
        assert!(e.contains("--gradient-checkpointing"), "{e}");
    }

    /// `budget_offload` lets a budget's plan offload: it needs the budget and a CUDA device.
    #[test]
    fn budget_offload_needs_a_budget_on_cuda() {
        let c: TrainConfig =
            toml::from_str("budget_offload = true\nmemory_budget = \"2GB\"\ndevice = \"cuda\"\n")
                .unwrap();
        assert!(c.run.budget_offload);
        c.validate().unwrap();
        assert!(!TrainConfig::default().run.budget_offload);
        let mut no_budget = c.clone();
        no_budget.run.memory_budget = None;
        let e = no_budget.validate().unwrap_err().to_string();
        assert!(
            e.contains("--budget-offload") && e.contains("--memory-budget"),
            "{e}"
        );
        let mut on_cpu = c.clone();
        on_cpu.run.device = crate::device::DeviceSpec::Cpu;
        let e = on_cpu.validate().unwrap_err().to_string();
        assert!(
            e.contains("--budget-offload") && e.contains("--device cuda"),
            "{e}"
        );
    }
}
