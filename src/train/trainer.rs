//! Sequence classification and regression: data -> tokenizer -> [`ClassifyTask`] (steps through
//! `step`, SAFE's importance, validation) -> the training loop (`fit`) -> test of the best adapter
//! -> `summary.json`.

use super::config::{DataKind, TrainConfig};
use super::encoder::{
    adapter_importance_of, add_adapters, micro_step, resolve_model_dir, train_encoder,
    with_family_targets, EncoderRun, Summary, TestOf,
};
use super::fit::{FitConfig, MicroStep, Task, Validation};
use super::frozen_cache::FrozenCache;
use super::metrics;
use super::step;
use crate::data::batch::{collate, Batch, Encoded, TextEncoder};
use crate::data::{self, Dataset, Label, Splits, TableSpec, TaskKind};
use crate::io::fetch;
use crate::model::bert::BertForSequenceClassification;
use crate::model::stack::Recompute;
use crate::nn::Pass;
use crate::safe::MonitorPoint;
use anyhow::Result;
use candle_core::{DType, Device};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Everything a run needs, loaded once.
pub struct Setup {
    pub model_dir: PathBuf,
    pub splits: Splits,
    pub train: Vec<Encoded>,
    pub validation: Vec<Encoded>,
    pub test: Vec<Encoded>,
}

/// Resolves the model folder and the data (fetching the default assets when none are given),
/// loads and splits the data, and tokenizes it.
pub fn prepare(cfg: &TrainConfig) -> Result<Setup> {
    let model_dir = resolve_model_dir(cfg)?;
    cfg.check_model(&model_dir)?;
    let splits = load_splits(cfg)?;
    let encoder = TextEncoder::from_model_dir(&model_dir, cfg.data.max_length)?;
    let train = encoder.encode_all(&splits.train.examples)?;
    let validation = encoder.encode_all(&splits.validation.examples)?;
    let test = encoder.encode_all(&splits.test.examples)?;
    Ok(Setup {
        model_dir,
        splits,
        train,
        validation,
        test,
    })
}

fn table_spec(cfg: &TrainConfig) -> TableSpec {
    let d = &cfg.data;
    TableSpec {
        format: d.format,
        text_column: d.text_column.clone(),
        text_pair_column: d.text_pair_column.clone(),
        label_column: d.label_column.clone(),
        task: d.task,
        label_names: None,
    }
}

/// The whole data set, unsplit (every kind but GLUE folders, which come split).
pub fn load_dataset(cfg: &TrainConfig) -> Result<Dataset> {
    if let (Some(train), None) = (&cfg.data.train_file, &cfg.data.path) {
        anyhow::bail!(
            "{}: the whole data is one file: pass the file to evaluate as --data",
            train.display()
        );
    }
    let cache = fetch::default_cache_dir();
    let ds = match (&cfg.data.kind, &cfg.data.path) {
        (DataKind::Folder, None) => {
            fetch::ensure(&fetch::BBC_NEWS, &cache)?;
            data::load_text_folder(&fetch::bbc_news_dir(&cache))?
        }
        (DataKind::Spam, None) => {
            fetch::ensure(&fetch::SPAM_ASSASSIN, &cache)?;
            data::load_spamassassin(&fetch::spam_assassin_dir(&cache))?
        }
        (DataKind::Folder, Some(p)) => data::load_text_folder(p)?,
        (DataKind::Spam, Some(p)) => data::load_spamassassin(p)?,
        (DataKind::Table, Some(p)) => data::load_table(p, &table_spec(cfg))?,
        (DataKind::Glue, _) => {
            anyhow::bail!("a GLUE folder comes split: evaluate its test or validation split")
        }
        (k, None) => anyhow::bail!("data kind {k:?} needs a path (--data FILE)"),
    };
    anyhow::ensure!(!ds.is_empty(), "the data set is empty");
    Ok(ds)
}

fn load_splits(cfg: &TrainConfig) -> Result<Splits> {
    let d = &cfg.data;
    if let Some(train) = &d.train_file {
        let files = data::SplitFiles {
            train,
            validation: d.validation_file.as_deref(),
            test: d.test_file.as_deref(),
        };
        let (v, t) = (d.validation_fraction, d.test_fraction);
        return Ok(data::load_split_files(
            &files,
            &table_spec(cfg),
            v,
            t,
            cfg.run.seed,
        )?);
    }
    if let (DataKind::Glue, Some(p)) = (&d.kind, &d.path) {
        return Ok(data::load_glue_dir(p, &table_spec(cfg), cfg.run.seed)?);
    }
    let ds = load_dataset(cfg)?;
    Ok(data::stratified_split(
        &ds,
        d.validation_fraction,
        d.test_fraction,
        cfg.run.seed,
    ))
}

/// Builds the model with the adapters the method asks for.
pub fn build_model(
    cfg: &TrainConfig,
    model_dir: &Path,
    num_labels: usize,
    device: &Device,
    rng: &mut StdRng,
) -> Result<BertForSequenceClassification> {
    let model = BertForSequenceClassification::load(
        model_dir,
        num_labels,
        cfg.run.dtype.dtype(),
        device,
        rng,
    )?;
    add_adapters(cfg, model, rng)
}

/// Evaluation scores of one split.
#[derive(Clone, Debug, Serialize)]
pub struct Scores {
    /// The task's main metric: accuracy for classification, Pearson for regression.
    pub metric: f64,
    pub metric_name: &'static str,
    pub macro_f1: Option<f64>,
    pub matthews: Option<f64>,
    pub spearman: Option<f64>,
    pub loss: f64,
    /// Classification: precision, recall, F1 and support of each class, in output order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_class: Option<Vec<metrics::ClassScores>>,
    /// Classification: `confusion[gold][predicted]` counts, classes in output order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confusion: Option<Vec<Vec<u64>>>,
}

/// A classifier's scores from its predicted and gold classes: accuracy, macro F1, MCC, the
/// per-class scores (`label_names` name the outputs) and the confusion matrix.
pub fn class_scores(
    pred: &[usize],
    gold: &[usize],
    loss: f64,
    label_names: &[String],
    num_labels: usize,
) -> Scores {
    Scores {
        metric: metrics::accuracy(pred, gold),
        metric_name: "accuracy",
        macro_f1: Some(metrics::macro_f1(pred, gold, num_labels)),
        matthews: Some(metrics::matthews_corrcoef(pred, gold, num_labels)),
        spearman: None,
        loss,
        per_class: Some(metrics::per_class(
            pred,
            gold,
            &label_names[..label_names.len().min(num_labels)],
        )),
        confusion: Some(metrics::confusion(pred, gold, num_labels)),
    }
}

/// Logits of every item, in order (inference: no dropout).
pub fn predict_logits(
    model: &BertForSequenceClassification,
    items: &[Encoded],
    batch_size: usize,
) -> Result<Vec<Vec<f32>>> {
    let device = model.head.classifier.weight.device();
    let mut rng = StdRng::seed_from_u64(0);
    let mut pass = Pass::evaluating(&mut rng);
    let mut out = Vec::with_capacity(items.len());
    for chunk in items.chunks(batch_size.max(1)) {
        let refs: Vec<&Encoded> = chunk.iter().collect();
        let b = collate(&refs, 0);
        let t = step::to_tensors(&b, DType::F32, &device)?;
        out.extend(model.forward_eval(&t, &mut pass)?.to_vec2::<f32>()?);
    }
    Ok(out)
}

/// Scores of `items` (classification: `label_names` name the outputs in the per-class scores).
pub fn evaluate(
    model: &BertForSequenceClassification,
    items: &[Encoded],
    batch_size: usize,
    task: TaskKind,
    label_names: &[String],
    num_labels: usize,
) -> Result<Scores> {
    let device = model.head.classifier.weight.device();
    let mut rng = StdRng::seed_from_u64(0);
    let mut pass = Pass::evaluating(&mut rng);
    let (mut pred_c, mut gold_c, mut pred_v, mut gold_v) = (vec![], vec![], vec![], vec![]);
    let mut loss_sum = 0.0;
    for chunk in items.chunks(batch_size.max(1)) {
        let refs: Vec<&Encoded> = chunk.iter().collect();
        let b = collate(&refs, 0);
        let t = step::to_tensors(&b, DType::F32, &device)?;
        let logits = model.forward_eval(&t, &mut pass)?;
        let (loss, _) = step::loss_and_grad(&logits, &b.labels)?;
        loss_sum += loss as f64 * b.batch as f64;
        let rows: Vec<Vec<f32>> = logits.to_vec2()?;
        for (row, label) in rows.iter().zip(&b.labels) {
            match label {
                Label::Class(c) => {
                    let arg = (0..row.len())
                        .max_by(|&i, &j| row[i].total_cmp(&row[j]))
                        .unwrap_or(0);
                    pred_c.push(arg);
                    gold_c.push(*c);
                }
                Label::Value(v) => {
                    pred_v.push(row[0] as f64);
                    gold_v.push(*v as f64);
                }
            }
        }
    }
    let loss = loss_sum / items.len().max(1) as f64;
    Ok(match task {
        TaskKind::Classification | TaskKind::Image => {
            class_scores(&pred_c, &gold_c, loss, label_names, num_labels)
        }
        TaskKind::Regression | TaskKind::Qa => Scores {
            metric: metrics::pearson(&pred_v, &gold_v),
            metric_name: "pearson",
            macro_f1: None,
            matthews: None,
            spearman: Some(metrics::spearman(&pred_v, &gold_v)),
            loss,
            per_class: None,
            confusion: None,
        },
    })
}

/// SAFE's importance `1 - CKA(X, Y)` of every adapter over the monitoring examples: `X` the adapted
/// linear's output, `Y` the base linear's output on the same input, token rows without padding,
/// moments in f64, layer by layer (see [`importance`]). Only the layers from the lowest to the
/// highest trainable one are measured; the others' adapters score NaN (no decision needs them).
pub fn adapter_importance(
    model: &BertForSequenceClassification,
    items: &[(usize, &Encoded)],
    batch_size: usize,
    point: MonitorPoint,
    cache: Option<&mut FrozenCache>,
) -> Result<Vec<f64>> {
    let batches = items.chunks(batch_size.max(1)).map(|chunk| {
        let encoded: Vec<&Encoded> = chunk.iter().map(|&(_, e)| e).collect();
        let examples: Vec<usize> = chunk.iter().map(|&(i, _)| i).collect();
        (examples, collate(&encoded, 0))
    });
    adapter_importance_of(model, batches, point, cache)
}

pub use super::fit::EpochLog;

/// Classification or regression of token sequences: a BERT model with a new head.
pub struct ClassifyTask<'a> {
    pub train: &'a [Encoded],
    pub validation: &'a [Encoded],
    pub task: TaskKind,
    pub num_labels: usize,
    /// Class names in classifier-output order, saved beside the adapter (`io::labels`).
    pub label_names: &'a [String],
    pub run: EncoderRun<'a>,
}

impl Task for ClassifyTask<'_> {
    type Model = BertForSequenceClassification;

    fn train_len(&self) -> usize {
        self.train.len()
    }

    fn max_tokens(&self) -> usize {
        self.train.iter().map(|e| e.ids.len()).max().unwrap_or(1)
    }

    fn metric(&self) -> (&'static str, bool) {
        match self.task {
            TaskKind::Classification | TaskKind::Image => ("accuracy", true),
            TaskKind::Regression | TaskKind::Qa => ("pearson", true),
        }
    }

    fn step(
        &mut self,
        model: &Self::Model,
        examples: &[usize],
        pass: &mut Pass,
        loss_scale: f64,
        recompute: &Recompute,
    ) -> Result<MicroStep> {
        let refs: Vec<&Encoded> = examples.iter().map(|&i| &self.train[i]).collect();
        let batch: Batch = collate(&refs, 0);
        let bottom = self.run.bottom(examples);
        let out = step::forward_backward(model, &batch, pass, loss_scale, bottom, recompute)?;
        Ok(micro_step(out, &batch))
    }

    fn importance(&mut self, model: &Self::Model, monitor: &[usize]) -> Result<Vec<f64>> {
        let items: Vec<(usize, &Encoded)> = monitor.iter().map(|&i| (i, &self.train[i])).collect();
        let run = &mut self.run;
        let (batch, point) = (run.eval_batch_size, run.monitor_point);
        adapter_importance(model, &items, batch, point, run.frozen_cache.as_mut())
    }

    fn validate(&mut self, model: &Self::Model) -> Result<Validation> {
        let s = evaluate(
            model,
            self.validation,
            self.run.eval_batch_size,
            self.task,
            self.label_names,
            self.num_labels,
        )?;
        Ok(Validation {
            metric: s.metric,
            loss: s.loss,
        })
    }

    fn save_best(&self, model: &Self::Model, output: &Path) -> Result<()> {
        let label_names = match self.task {
            TaskKind::Classification | TaskKind::Image => self.label_names.to_vec(),
            TaskKind::Regression | TaskKind::Qa => Vec::new(),
        };
        self.run.save(model, output, label_names)
    }
}

impl TrainConfig {
    /// The loop's settings of this run.
    pub fn fit_config(&self, resume: bool, show_progress: bool) -> FitConfig<'_> {
        FitConfig::of(&self.run, &self.safe, resume, show_progress)
    }
}

/// Trains, evaluates and writes all outputs. `resume`: continue from `output/checkpoint`. None
/// when the run stopped early (`stop_after_epoch`), resumable.
pub fn train(
    cfg: &TrainConfig,
    resume: bool,
    show_progress: bool,
) -> Result<Option<Summary<Scores>>> {
    cfg.validate()?;
    anyhow::ensure!(
        cfg.data.task != TaskKind::Qa,
        "question answering trains through train::qa::train_qa"
    );
    anyhow::ensure!(
        cfg.data.task != TaskKind::Image,
        "image classification trains through train::image::train_image"
    );
    let started = Instant::now();
    let setup = prepare(cfg)?;
    for (name, n) in [
        ("training", setup.train.len()),
        ("validation", setup.validation.len()),
    ] {
        anyhow::ensure!(
            n > 0,
            "the data has no {name} examples after the split (data.validation_fraction {}, \
             data.test_fraction {}): the best adapter is chosen on the validation split",
            cfg.data.validation_fraction,
            cfg.data.test_fraction
        );
    }
    let (task, labels) = (setup.splits.train.task, &setup.splits.train.label_names);
    let num_labels = setup.splits.train.num_labels();
    let cfg = &*with_family_targets(cfg, &setup.model_dir);
    let dir = &setup.model_dir;
    let build = |device: &Device, rng: &mut StdRng| build_model(cfg, dir, num_labels, device, rng);
    let test: TestOf<_, Scores> = Box::new(|best| {
        let batch = cfg.run.eval_batch_size;
        let test = (!setup.test.is_empty()).then_some(&setup.test);
        test.map(|t| evaluate(&best()?, t, batch, task, labels, num_labels))
            .transpose()
    });
    let classify = |run, _: &_| ClassifyTask {
        train: &setup.train,
        validation: &setup.validation,
        task,
        num_labels,
        label_names: labels,
        run,
    };
    let flags = (resume, show_progress);
    train_encoder(cfg, dir, flags, started, build, classify, test, |t| {
        t.metric
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::LoraConfig;
    use crate::memory;
    use crate::model::bert::BertLayer;
    use crate::model::BertConfig;
    use crate::train::config::RunConfig;
    use crate::train::fit::fit;
    use candle_core::Tensor;
    use rand::Rng;

    /// The logged training loss is the mean of the micro-batch losses, whatever the
    /// accumulation: with the learning rate at 0 (nothing moves) and no dropout, 2 steps of 4
    /// examples and 2 steps of 2 x 2 examples see the same examples and log the same loss (the
    /// trainer once multiplied it by `grad_accum`).
    #[test]
    fn logged_loss_does_not_depend_on_accumulation() {
        let items: Vec<Encoded> = (0..8u32)
            .map(|i| Encoded {
                ids: (0..4 + i % 3).map(|j| 2 + (5 * i + 3 * j) % 37).collect(),
                type_ids: vec![0; 4 + (i % 3) as usize],
                label: Label::Class(i as usize % 2),
            })
            .collect();
        let lora = LoraConfig {
            target_modules: vec!["query".into(), "value".into()],
            dropout: 0.0,
            ..Default::default()
        };
        let logged = |batch_size: usize, grad_accum: usize| -> f64 {
            let mut rng = StdRng::seed_from_u64(3);
            let mut m = BertForSequenceClassification::random(
                BertConfig::tiny(0.0),
                2,
                DType::F32,
                &Device::Cpu,
                &mut rng,
            )
            .unwrap();
            m.add_lora(&lora, None, &mut rng).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let cfg = TrainConfig {
                run: RunConfig {
                    output: dir.path().to_path_buf(),
                    epochs: 1,
                    batch_size,
                    grad_accum,
                    lr: 0.0,
                    ..Default::default()
                },
                ..Default::default()
            };
            let mut task = ClassifyTask {
                train: &items,
                validation: &items,
                task: TaskKind::Classification,
                num_labels: 2,
                label_names: &[],
                run: EncoderRun {
                    eval_batch_size: 8,
                    frozen_cache: None,
                    frozen_bottom_dropout: false,
                    monitor_point: MonitorPoint::Linear,
                    lora: &lora,
                    model_dir: dir.path(),
                    trained_on: None,
                },
            };
            let mem = memory::MemTracker::new(&Device::Cpu);
            let fitted = fit(&mut task, &mut m, &cfg.fit_config(false, false), &mem).unwrap();
            let h = &fitted.state.history;
            assert_eq!((h.len(), h[0].steps), (1, 2));
            h[0].train_loss
        };
        let (whole, accumulated) = (logged(4, 1), logged(2, 2));
        assert!(whole > 0.1, "{whole}");
        assert!(
            (whole - accumulated).abs() < 1e-5 * whole,
            "batch 4: {whole}, 2 x 2: {accumulated}"
        );
    }

    /// A 3-layer BERT with LoRA on query and value, every `B` nonzero (so every adapter changes
    /// its layer's output), and five monitoring examples of different lengths.
    fn tiny_with_items() -> (BertForSequenceClassification, Vec<Encoded>) {
        tiny_with_items_dropout(0.1)
    }

    /// [`tiny_with_items`] with dropout `p` in the model and its adapters.
    fn tiny_with_items_dropout(p: f64) -> (BertForSequenceClassification, Vec<Encoded>) {
        let cfg = BertConfig::tiny(p);
        let mut rng = StdRng::seed_from_u64(3);
        let mut m =
            BertForSequenceClassification::random(cfg, 2, DType::F32, &Device::Cpu, &mut rng)
                .unwrap();
        let lora = LoraConfig {
            target_modules: vec!["query".into(), "value".into()],
            dropout: p,
            ..Default::default()
        };
        m.add_lora(&lora, None, &mut rng).unwrap();
        // Nonzero B (seeded), so every adapter changes its layer's output.
        for (l, s) in m.adapter_sites() {
            let a = m.adapter_mut(l, s).unwrap();
            let v: Vec<f32> = (0..a.b.elem_count())
                .map(|_| rng.random_range(-1.0f32..1.0))
                .collect();
            a.b = Tensor::from_vec(v, a.b.shape(), &Device::Cpu).unwrap();
        }
        let items: Vec<Encoded> = (0..5u32)
            .map(|i| Encoded {
                ids: (0..3 + i).map(|j| 2 + (7 * i + 3 * j) % 37).collect(),
                type_ids: vec![0; 3 + i as usize],
                label: Label::Class(i as usize % 2),
            })
            .collect();
        (m, items)
    }

    /// Monitoring starts at the lowest trainable layer: frozen bottom adapters get no score
    /// (NaN), the others the same score as before they froze, whether the bottom is recomputed
    /// or read from the training cache.
    #[test]
    fn importance_skips_the_frozen_bottom() {
        let (mut m, items) = tiny_with_items();
        let monitor: Vec<(usize, &Encoded)> = items.iter().enumerate().collect();
        let all = adapter_importance(&m, &monitor, 2, MonitorPoint::Linear, None).unwrap();
        assert!(all.iter().all(|s| s.is_finite() && *s > 0.0), "{all:?}");

        for (l, s) in m.adapter_sites() {
            if l == 0 {
                m.adapter_mut(l, s).unwrap().trainable = false;
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let mut cache = FrozenCache::create(dir.path()).unwrap();
        let recomputed = adapter_importance(&m, &monitor, 2, MonitorPoint::Linear, None).unwrap();
        let stored =
            adapter_importance(&m, &monitor, 2, MonitorPoint::Linear, Some(&mut cache)).unwrap();
        let read =
            adapter_importance(&m, &monitor, 2, MonitorPoint::Linear, Some(&mut cache)).unwrap();
        assert_eq!((cache.misses, cache.hits), (3, 5));
        for scores in [&recomputed, &stored, &read] {
            for (i, (l, _)) in m.adapter_sites().into_iter().enumerate() {
                if l == 0 {
                    assert!(scores[i].is_nan());
                } else {
                    assert!((scores[i] - all[i]).abs() < 1e-9, "{scores:?} {all:?}");
                }
            }
        }
    }

    /// In-step importance (`safe.measure = "steps"`) takes each adapter's rows from the training
    /// forward: without dropout, one training step on a batch gives the scores the separate
    /// passes give on the same examples, in the moment form (25 token rows, width 8) and in the
    /// Gram form (one 3-token example); a checkpointed step (whose layers run twice) takes them
    /// once; frozen bottom adapters get no score.
    #[test]
    fn in_step_importance_is_the_passes_importance_of_the_same_batch() {
        use crate::adapters::Adapted;
        use crate::train::importance::{trainable_layers, StepMonitor};
        let (mut m, items) = tiny_with_items_dropout(0.0);
        let in_step = |m: &BertForSequenceClassification, examples: &[&Encoded], rc: &Recompute| {
            let mut monitor = StepMonitor::new();
            let mut rng = StdRng::seed_from_u64(5);
            let mut pass = Pass {
                training: true,
                rng: &mut rng,
                monitor: Some(&mut monitor),
            };
            let b = collate(examples, 0);
            let bottom = step::FrozenBottom::Inference;
            step::forward_backward(m, &b, &mut pass, 1.0, bottom, rc).unwrap();
            assert_eq!(monitor.batches(), 1);
            assert!(monitor.flops > 0);
            monitor
                .scores(&m.adapter_ids(), trainable_layers(m))
                .unwrap()
        };
        let check = |m: &BertForSequenceClassification, n: usize, frozen_bottom: bool| {
            let monitor: Vec<(usize, &Encoded)> = items.iter().take(n).enumerate().collect();
            let refs: Vec<&Encoded> = monitor.iter().map(|(_, e)| *e).collect();
            let passes = adapter_importance(m, &monitor, n, MonitorPoint::Linear, None).unwrap();
            for rc in [Recompute::None, Recompute::All] {
                let steps = in_step(m, &refs, &rc);
                for (i, id) in m.adapter_ids().into_iter().enumerate() {
                    if frozen_bottom && id.layer == 0 {
                        assert!(steps[i].is_nan() && passes[i].is_nan());
                        continue;
                    }
                    assert!(passes[i] > 1e-4, "{passes:?}");
                    // The training and inference forwards agree to f32 rounding.
                    let tol = 1e-5 * passes[i];
                    assert!((steps[i] - passes[i]).abs() < tol, "{steps:?} {passes:?}");
                }
            }
        };
        check(&m, 5, false);
        check(&m, 1, false);
        for (l, s) in m.adapter_sites() {
            if l == 0 {
                m.adapter_mut(l, s).unwrap().trainable = false;
            }
        }
        check(&m, 5, true);
    }

    /// At the block output, an adapter's score is `1 - CKA` between its layer's output and the
    /// same layer's output without it, over the monitoring tokens; an adapter whose `B` is zero
    /// changes nothing and scores 0.
    #[test]
    fn block_importance_is_cka_of_the_layer_with_and_without_the_adapter() {
        let (mut m, items) = tiny_with_items();
        let zero = m.adapter_sites()[3];
        let a = m.adapter_mut(zero.0, zero.1).unwrap();
        a.b = a.b.zeros_like().unwrap();
        let monitor: Vec<(usize, &Encoded)> = items.iter().enumerate().collect();
        let scores = adapter_importance(&m, &monitor, 5, MonitorPoint::Block, None).unwrap();

        // Direct: all five examples in one batch, each layer's output with and without each adapter.
        let refs: Vec<&Encoded> = items.iter().collect();
        let b = collate(&refs, 0);
        let t = step::to_tensors(&b, DType::F32, &Device::Cpu).unwrap();
        let keep: Vec<usize> = (0..b.batch * b.seq)
            .filter(|&i| b.attention_mask[i] == 1)
            .collect();
        let shape = crate::nn::attention::AttnShape {
            batch: b.batch,
            seq: b.seq,
        };
        let mut rng = StdRng::seed_from_u64(0);
        let mut pass = Pass::evaluating(&mut rng);
        let rows = |x: &Tensor| -> Vec<f64> {
            let v: Vec<Vec<f32>> = x.to_vec2().unwrap();
            keep.iter()
                .flat_map(|&i| v[i].iter().map(|&f| f as f64))
                .collect()
        };
        let sites = m.adapter_sites();
        let mut h = m.forward_frozen_bottom(&t, 0).unwrap();
        for (l, lay) in m.layers.iter().enumerate() {
            let run = |x: &BertLayer, pass: &mut Pass| {
                x.forward(
                    &h,
                    &t.mask_add,
                    shape,
                    pass,
                    crate::model::stack::Keep::Nothing,
                    None,
                )
                .unwrap()
                .0
            };
            let with = run(lay, &mut pass);
            for (i, &(layer, site)) in sites.iter().enumerate().filter(|(_, s)| s.0 == l) {
                let mut without = lay.clone();
                without.linears[site as usize].lora = None;
                let wo = run(&without, &mut pass);
                let d = with.dim(1).unwrap();
                let cka = crate::safe::linear_cka_gram(&rows(&with), &rows(&wo), keep.len(), d, d)
                    .unwrap();
                let expected = crate::safe::importance(cka);
                assert!(
                    (scores[i] - expected).abs() < 1e-9,
                    "{i}: {} vs {expected}",
                    scores[i]
                );
                if (layer, site) == zero {
                    assert!(scores[i].abs() < 1e-12, "{}", scores[i]);
                } else {
                    assert!(scores[i] > 1e-9, "{}", scores[i]);
                }
            }
            h = with;
        }
    }
}
