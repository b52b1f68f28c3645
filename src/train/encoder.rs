//! What the encoder tasks (classification and regression in `trainer.rs`, question answering in
//! `qa.rs`, images in `image.rs`) share: the model folder, the adapters, [`EncoderRun`] (the
//! frozen bottom, SAFE's monitoring, saving the best adapter), and [`train_encoder`], the run
//! around the loop: model, output folder, `fit`, the best adapter's test and `summary.json`.
//! A task supplies only its data, loss and metric.

use super::checkpoint::TrainerState;
use super::config::TrainConfig;
use super::fit::{fit, prepare_output, MicroStep, Task};
use super::frozen_cache::FrozenCache;
use super::importance::{self, MonitorBatch};
use super::run;
use super::step;
use crate::adapters::LoraConfig;
use crate::data::batch::Batch;
use crate::data::TaskKind;
use crate::io::fetch;
use crate::io::labels::TrainedOn;
use crate::memory;
use crate::model::bert::{BatchTensors, BertWithHead, EncoderHead};
use crate::model::memory::StepMemory;
use crate::safe::MonitorPoint;
use anyhow::{Context, Result};
use candle_core::{DType, Device};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The model folder: the configured one (a folder, or a model id in the local Hugging Face
/// cache, see [`crate::io::hub`]), or the MiniLM-L6 asset (fetched if missing).
pub fn resolve_model_dir(cfg: &TrainConfig) -> Result<PathBuf> {
    const WHAT: &str =
        "model folder with config.json, model.safetensors and tokenizer.json (or vocab.txt)";
    Ok(match &cfg.model {
        Some(p) => {
            let dir = crate::io::hub::resolve_model(p, WHAT)?;
            if !dir.is_dir() {
                return Err(crate::io::IoError::Missing {
                    path: dir,
                    what: WHAT.into(),
                }
                .into());
            }
            dir
        }
        None => {
            let cache = fetch::default_cache_dir();
            fetch::ensure(&fetch::MINILM, &cache)?;
            fetch::minilm_model_dir(&cache)
        }
    })
}

/// `cfg` with the default targets (`query`, `value`) said in the model family's names (MPNet's
/// `q`, `v`, DistilBERT's `q_lin`, `v_lin`) when they are other than BERT's; `cfg` as it is
/// otherwise (other targets are the user's and kept as given).
pub(crate) fn with_family_targets<'a>(
    cfg: &'a TrainConfig,
    model_dir: &Path,
) -> std::borrow::Cow<'a, TrainConfig> {
    use std::borrow::Cow;
    let default = TrainConfig::default().lora.target_modules;
    let Ok(config) = crate::model::BertConfig::from_file(&model_dir.join("config.json")) else {
        return Cow::Borrowed(cfg);
    };
    let targets = config
        .family()
        .spec()
        .default_targets
        .map(String::from)
        .to_vec();
    if cfg.lora.target_modules != default || targets == default {
        return Cow::Borrowed(cfg);
    }
    let mut c = cfg.clone();
    c.lora.target_modules = targets;
    Cow::Owned(c)
}

/// Puts the adapters the method asks for on a loaded model (any head), starting from
/// `cfg.init_adapter` when given.
pub fn add_adapters<H: EncoderHead>(
    cfg: &TrainConfig,
    mut model: BertWithHead<H>,
    rng: &mut StdRng,
) -> Result<BertWithHead<H>> {
    let layers = run::adapted_layers(&cfg.run.method, model.layers.len());
    let n = model.add_lora(&cfg.lora, layers.as_deref(), rng)?;
    anyhow::ensure!(
        n > 0,
        "no linear matches the LoRA target modules {:?} (this {:?} model has {}, or all-linear)",
        cfg.lora.target_modules,
        model.config.family(),
        crate::adapters::block::linear_names(&model.layers[0]).join(", ")
    );
    if let Some(dir) = &cfg.init_adapter {
        crate::io::peft::load(dir, &mut model)
            .with_context(|| format!("{}: adapter does not fit the model", dir.display()))?;
    }
    run::freeze_prefix(&mut model, &cfg.run.method);
    Ok(model)
}

/// What every encoder task holds besides its data: how the layers under the lowest trainable
/// adapter run, where SAFE measures, and what saving the best adapter needs.
pub struct EncoderRun<'a> {
    pub eval_batch_size: usize,
    /// The frozen bottom's outputs, cached on disk once layers freeze (SAFE, freeze-prefix):
    /// see [`step::FrozenBottom`].
    pub frozen_cache: Option<FrozenCache>,
    pub frozen_bottom_dropout: bool,
    pub monitor_point: MonitorPoint,
    /// The run's LoRA settings and the base model folder, written with the adapter.
    pub lora: &'a LoraConfig,
    pub model_dir: &'a Path,
    /// The run's data settings, saved beside the adapter for `eval`.
    pub trained_on: Option<TrainedOn>,
}

impl<'a> EncoderRun<'a> {
    /// The run settings of `cfg` on `model` (loaded from `model_dir`) on `device`, with the
    /// frozen-bottom cache in the output folder where [`run::frozen_cache`] makes one.
    pub fn of(
        cfg: &'a TrainConfig,
        model_dir: &'a Path,
        device: &Device,
        model: &impl StepMemory,
    ) -> Result<Self> {
        let cache = cfg.run.cache_frozen_bottom && !cfg.frozen_bottom_dropout;
        let tokens = cfg.run.batch_size * cfg.data.max_length;
        Ok(Self {
            eval_batch_size: cfg.run.eval_batch_size,
            frozen_cache: run::frozen_cache(
                cache,
                &cfg.run.method,
                &cfg.run.output,
                device,
                model,
                tokens,
            )?,
            frozen_bottom_dropout: cfg.frozen_bottom_dropout,
            monitor_point: cfg.safe.monitor,
            lora: &cfg.lora,
            model_dir,
            trained_on: Some(trained_on(cfg)),
        })
    }

    /// How the frozen bottom runs for the training `examples`.
    pub fn bottom<'b>(&'b mut self, examples: &'b [usize]) -> step::FrozenBottom<'b> {
        step::FrozenBottom::of(
            self.frozen_cache.as_mut(),
            self.frozen_bottom_dropout,
            examples,
        )
    }

    /// SAFE's importance of every adapter over monitoring batches on the host.
    pub fn importance_of<H: EncoderHead>(
        &mut self,
        model: &BertWithHead<H>,
        host_batches: impl Iterator<Item = (Vec<usize>, Batch)>,
    ) -> Result<Vec<f64>> {
        let (point, cache) = (self.monitor_point, self.frozen_cache.as_mut());
        adapter_importance_of(model, host_batches, point, cache)
    }

    /// SAFE's importance of every adapter over monitoring batches already on the device.
    pub fn importance_on<H: EncoderHead>(
        &mut self,
        model: &BertWithHead<H>,
        device_batches: impl Iterator<Item = Result<(Vec<usize>, BatchTensors, Vec<u32>)>>,
    ) -> Result<Vec<f64>> {
        let (point, cache) = (self.monitor_point, self.frozen_cache.as_mut());
        adapter_importance_on(model, device_batches, point, cache)
    }

    /// Writes the adapter and head to `output` in PEFT's format, and beside it `safetune.json`:
    /// the class names (`label_names`, in output order) and the run's data settings.
    pub fn save<H: EncoderHead>(
        &self,
        model: &BertWithHead<H>,
        output: &Path,
        label_names: Vec<String>,
    ) -> Result<()> {
        let base = self.model_dir.display().to_string();
        crate::io::peft::save(output, model, self.lora, &base)?;
        let labels = crate::io::labels::AdapterLabels {
            label_names,
            data: self.trained_on.clone(),
        };
        crate::io::labels::save(output, &labels)?;
        Ok(())
    }
}

/// The [`MicroStep`] of an encoder task's step on `batch` (its tokens: the attention mask's ones).
pub(crate) fn micro_step(out: step::StepOutput, batch: &Batch) -> MicroStep {
    MicroStep {
        loss: out.loss as f64,
        tokens: batch.attention_mask.iter().filter(|&&m| m == 1).count(),
        grads: out.grads,
    }
}

/// SAFE's importance `1 - CKA(X, Y)` of every adapter of any head's model over host batches,
/// each with its training example indices (the frozen-bottom cache's keys).
pub fn adapter_importance_of<H: EncoderHead>(
    model: &BertWithHead<H>,
    host_batches: impl Iterator<Item = (Vec<usize>, Batch)>,
    point: MonitorPoint,
    cache: Option<&mut FrozenCache>,
) -> Result<Vec<f64>> {
    let device = model.device();
    let batches = host_batches.map(|(examples, b)| -> Result<_> {
        let t = step::to_tensors(&b, DType::F32, &device)?;
        Ok((examples, t, b.attention_mask))
    });
    adapter_importance_on(model, batches, point, cache)
}

/// SAFE's importance `1 - CKA(X, Y)` of every adapter over batches already on the device (token
/// ids or pixel values), each with its training example indices and its host attention mask:
/// `X` the adapted output, `Y` the same without the adapter, token rows without padding, moments
/// in f64, layer by layer (see [`importance`]). Only the layers from the lowest to the highest
/// trainable one are measured; the others' adapters score NaN (no decision needs them).
pub fn adapter_importance_on<H: EncoderHead>(
    model: &BertWithHead<H>,
    device_batches: impl Iterator<Item = Result<(Vec<usize>, BatchTensors, Vec<u32>)>>,
    point: MonitorPoint,
    mut cache: Option<&mut FrozenCache>,
) -> Result<Vec<f64>> {
    let sites = model.adapter_sites();
    let device = model.device();
    let Some(layers) = importance::trainable_layers(model) else {
        return Ok(vec![f64::NAN; sites.len()]); // everything frozen: nothing left to decide
    };
    let first = layers.start;
    let mut batches = Vec::new();
    for item in device_batches {
        let (examples, t, mask) = item?;
        let rows = importance::token_rows(&mask, &device)?;
        // The frozen bottom comes from the training cache when it has these examples: a frozen
        // layer's adapters need no more scores.
        let hidden = match cache.as_deref_mut() {
            Some(c) if first > 0 => step::frozen_bottom(model, &t, &mask, first, c, &examples)?,
            _ => model.forward_frozen_bottom(&t, first)?,
        };
        batches.push(MonitorBatch {
            batch: t,
            rows,
            hidden,
        });
    }
    let scores = importance::importance_by_layer(&sites, &mut batches, layers, |layer, t, h| {
        let (out, rows) = model.monitor_layer(layer, t, h, point)?;
        let rows = rows.into_iter().map(|(s, r)| ((layer, s), r));
        Ok((out, rows.collect()))
    })?;
    Ok(scores)
}

/// The data settings of a run, as `safetune.json` keeps them for `eval`.
pub fn trained_on(cfg: &TrainConfig) -> TrainedOn {
    let d = &cfg.data;
    TrainedOn {
        task: format!("{:?}", d.task).to_lowercase(),
        max_length: d.max_length,
        text_column: d.text_column.clone(),
        text_pair_column: d.text_pair_column.clone(),
        label_column: d.label_column.clone(),
        seed: cfg.run.seed,
        validation_fraction: d.validation_fraction,
        test_fraction: d.test_fraction,
        doc_stride: (d.task == TaskKind::Qa).then_some(d.doc_stride),
    }
}

/// `summary.json`; `T` is the test split's scores (a classifier's `Scores`, or question
/// answering's `QaScores`).
#[derive(Clone, Debug, Serialize)]
pub struct Summary<T> {
    pub task: String,
    pub method: String,
    pub metric: String,
    /// Test-split metric of the best-validation checkpoint; None (null) when the test split is
    /// empty (`data.test_fraction = 0`).
    pub value: Option<f64>,
    pub test: Option<T>,
    #[serde(flatten)]
    pub run: run::RunOutcome,
    /// What the memory numbers count: `heap` (CPU) or `cuda-pool` (GPU).
    pub memory_counter: &'static str,
    /// On a GPU, the highest driver-reported device memory in use at an epoch's end.
    pub peak_driver_used_bytes: Option<usize>,
    /// Epoch 1's memory peak: in epoch 1 nothing is frozen by SAFE.
    pub unfrozen_peak_mem_bytes: usize,
    /// Adapter name -> epoch it froze (SAFE / freeze-prefix).
    pub frozen: std::collections::BTreeMap<String, usize>,
    pub seed: u64,
}

impl<T> Summary<T> {
    /// The summary of a finished encoder run of `cfg` that started at `started`: its `metric`,
    /// the test split's scores (None without a test split) and the metric's `value` in them; the
    /// rest from the run's final `state`.
    pub fn new(
        cfg: &TrainConfig,
        metric: &str,
        (test, value): (Option<T>, impl Fn(&T) -> f64),
        state: &TrainerState,
        mem: &memory::MemTracker,
        started: Instant,
    ) -> Self {
        let h = &state.history;
        Self {
            task: format!("{:?}", cfg.data.task).to_lowercase(),
            method: cfg.run.method.to_string(),
            metric: metric.into(),
            value: test.as_ref().map(value),
            test,
            run: run::RunOutcome::of(state, cfg.run.epochs, started),
            memory_counter: mem.kind(),
            peak_driver_used_bytes: h.iter().filter_map(|e| e.driver_used_bytes).max(),
            unfrozen_peak_mem_bytes: h.first().map(|e| e.peak_mem_bytes).unwrap_or(0),
            frozen: state.frozen_at.clone(),
            seed: cfg.run.seed,
        }
    }
}

/// The test of a finished encoder run: given a loader of the best-validation adapter's model,
/// the test split's scores (None without a test split).
pub type TestOf<'t, M, S> = Box<dyn FnOnce(&dyn Fn() -> Result<M>) -> Result<Option<S>> + 't>;

/// Runs an encoder task from the model to `summary.json`: builds the model (`build`, with a
/// fresh seeded rng), locks and prepares the output folder, trains with `fit` on the task that
/// `task` makes of the run's [`EncoderRun`] and the model, then `test` scores the best adapter, reloaded, and
/// the summary (the metric's value from `value`) is written. `cfg` already has the model
/// family's target names ([`with_family_targets`]). None when the run stopped early
/// (`stop_after_epoch`), resumable.
#[allow(clippy::too_many_arguments)]
pub fn train_encoder<'a, T: Task, S: Serialize>(
    cfg: &'a TrainConfig,
    model_dir: &'a Path,
    (resume, show_progress): (bool, bool),
    started: Instant,
    build: impl Fn(&Device, &mut StdRng) -> Result<T::Model>,
    task: impl FnOnce(EncoderRun<'a>, &T::Model) -> T,
    test: TestOf<'_, T::Model, S>,
    value: impl Fn(&S) -> f64,
) -> Result<Option<Summary<S>>> {
    let device = cfg.run.device.open()?;
    let mut model = build(&device, &mut StdRng::seed_from_u64(cfg.run.seed))?;
    // Heap counters on the CPU, the CUDA memory pool's on a GPU.
    let mem = memory::MemTracker::new(&device);
    let _lock = prepare_output(&cfg.run.output, cfg, resume)?;
    let mut task = task(EncoderRun::of(cfg, model_dir, &device, &model)?, &model);
    let fitted = fit(
        &mut task,
        &mut model,
        &cfg.fit_config(resume, show_progress),
        &mem,
    )?;
    if fitted.stopped {
        return Ok(None);
    }
    let metric = task.metric().0;
    drop(task);
    let best = || -> Result<T::Model> {
        let mut best = build(&device, &mut StdRng::seed_from_u64(cfg.run.seed))?;
        crate::io::peft::load(&cfg.run.output, &mut best)
            .with_context(|| format!("{}: the best adapter", cfg.run.output.display()))?;
        Ok(best)
    };
    let scores = test(&best)?;
    let summary = Summary::new(cfg, metric, (scores, value), &fitted.state, &mem, started);
    run::write_summary(&cfg.run.output, &summary)?;
    Ok(Some(summary))
}
