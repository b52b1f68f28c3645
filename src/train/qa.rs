//! Extractive question answering: SQuAD JSON -> windows (`data/squad.rs`) -> [`QaTask`] (steps
//! through `step::forward_backward_with` and the span loss, SAFE's importance, validation F1)
//! -> the training loop (`fit`) -> test of the best adapter -> `predictions.json` (the official
//! format: question id -> answer) and `summary.json`.

use super::config::TrainConfig;
use super::encoder::{
    add_adapters, micro_step, resolve_model_dir, train_encoder, with_family_targets, EncoderRun,
    Summary, TestOf,
};
use super::fit::{MicroStep, Task, Validation};
use super::squad_eval::{self, QaScores, SpanLogits};
use super::step;
use crate::data::batch::{pad_rows, Batch};
use crate::data::squad::{load_squad, QaEncoder, QaFeature, Squad, SquadExample};
use crate::model::bert::BertForQuestionAnswering;
use crate::model::stack::Recompute;
use crate::nn::{loss, Pass};
use anyhow::{Context, Result};
use candle_core::{DType, Device};
use rand::rngs::StdRng;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The file of the test split's answers in the output folder.
pub const PREDICTIONS_FILE: &str = "predictions.json";

/// One split's questions and their windows.
pub struct QaSplit {
    pub examples: Vec<SquadExample>,
    pub features: Vec<QaFeature>,
}

/// Everything a run needs, loaded once.
pub struct QaSetup {
    pub model_dir: PathBuf,
    /// SQuAD v2.0 data (unanswerable questions exist): the null answer is a candidate.
    pub v2: bool,
    pub train: QaSplit,
    pub validation: QaSplit,
    pub test: QaSplit,
}

/// The training, validation and test questions: one file (`data.path`, or `data.train_file`
/// alone) split by article with the configured fractions and seed, or explicit split files;
/// a split without a file is carved out of the train file.
pub fn load_splits(cfg: &TrainConfig) -> Result<[Squad; 3]> {
    let d = &cfg.data;
    let Some(main) = d.train_file.as_ref().or(d.path.as_ref()) else {
        anyhow::bail!("question answering needs SQuAD JSON: --data FILE or --train-file FILE");
    };
    let whole = load_squad(main)?;
    let vf = if d.validation_file.is_some() {
        0.0
    } else {
        d.validation_fraction
    };
    let tf = if d.test_file.is_some() {
        0.0
    } else {
        d.test_fraction
    };
    let [train, mut validation, mut test] = whole.split_articles(vf, tf, cfg.run.seed)?;
    if let Some(p) = &d.validation_file {
        validation = load_squad(p)?;
    }
    if let Some(p) = &d.test_file {
        test = load_squad(p)?;
    }
    Ok([train, validation, test])
}

/// Resolves the model folder, loads and splits the data and cuts it into windows.
pub fn prepare(cfg: &TrainConfig) -> Result<QaSetup> {
    let model_dir = resolve_model_dir(cfg)?;
    cfg.check_model(&model_dir)?;
    let [train, validation, test] = load_splits(cfg)?;
    let encoder = QaEncoder::from_model_dir(&model_dir, cfg.data.max_length, cfg.data.doc_stride)?;
    let split = |s: Squad| -> Result<QaSplit> {
        Ok(QaSplit {
            features: encoder.features(&s.examples)?,
            examples: s.examples,
        })
    };
    Ok(QaSetup {
        model_dir,
        v2: train.v2 || validation.v2 || test.v2,
        train: split(train)?,
        validation: split(validation)?,
        test: split(test)?,
    })
}

/// The QA model with the adapters the method asks for.
pub fn build_model(
    cfg: &TrainConfig,
    model_dir: &Path,
    device: &Device,
    rng: &mut StdRng,
) -> Result<BertForQuestionAnswering> {
    let model = BertForQuestionAnswering::load(model_dir, cfg.run.dtype.dtype(), device, rng)?;
    add_adapters(cfg, model, rng)
}

/// A batch of windows right-padded with `pad_id` (the model's: RoBERTa and MPNet count positions
/// from it), and their answers' start and end tokens.
fn collate(items: &[&QaFeature], pad_id: u32) -> (Batch, Vec<u32>, Vec<u32>) {
    let rows: Vec<(&[u32], &[u32])> = items
        .iter()
        .map(|f| (&f.ids[..], &f.type_ids[..]))
        .collect();
    let starts = items.iter().map(|f| f.start).collect();
    let ends = items.iter().map(|f| f.end).collect();
    (pad_rows(&rows, pad_id), starts, ends)
}

/// Each window's start and end logits (its own tokens, no padding), and the mean span loss
/// (inference: no dropout).
pub fn predict(
    model: &BertForQuestionAnswering,
    features: &[QaFeature],
    batch_size: usize,
) -> Result<(Vec<SpanLogits>, f64)> {
    let device = model.device();
    let mut out = Vec::with_capacity(features.len());
    let mut loss_sum = 0.0;
    for chunk in features.chunks(batch_size.max(1)) {
        let refs: Vec<&QaFeature> = chunk.iter().collect();
        let (b, starts, ends) = collate(&refs, model.config.pad_token_id);
        let t = step::to_tensors(&b, DType::F32, &device)?;
        let logits = Pass::inference(|pass| model.forward_eval(&t, pass))?;
        let (l, _) = loss::span_loss(&logits, &b.attention_mask, &starts, &ends, b.batch, b.seq)?;
        loss_sum += l as f64 * b.batch as f64;
        let rows: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
        for (i, f) in chunk.iter().enumerate() {
            let row = &rows[i * b.seq..i * b.seq + f.ids.len()];
            out.push((
                row.iter().map(|r| r[0]).collect(),
                row.iter().map(|r| r[1]).collect(),
            ));
        }
    }
    Ok((out, loss_sum / features.len().max(1) as f64))
}

/// The split's answers (question id -> text) and scores, and the mean span loss of its windows.
pub fn evaluate(
    model: &BertForQuestionAnswering,
    split: &QaSplit,
    v2: bool,
    batch_size: usize,
) -> Result<(BTreeMap<String, String>, QaScores, f64)> {
    let (logits, loss) = predict(model, &split.features, batch_size)?;
    let answers = squad_eval::predict_answers(&split.examples, &split.features, &logits, v2);
    let predictions: BTreeMap<String, String> = split
        .examples
        .iter()
        .map(|e| e.id.clone())
        .zip(answers)
        .collect();
    let scores = squad_eval::score(&split.examples, &predictions, v2);
    Ok((predictions, scores, loss))
}

/// Extractive question answering: a text encoder body (BERT, RoBERTa, MPNet, DistilBERT) with
/// `qa_outputs`.
pub struct QaTask<'a> {
    pub train: &'a [QaFeature],
    pub validation: &'a QaSplit,
    pub v2: bool,
    pub run: EncoderRun<'a>,
}

impl Task for QaTask<'_> {
    type Model = BertForQuestionAnswering;

    fn train_len(&self) -> usize {
        self.train.len()
    }

    fn max_tokens(&self) -> usize {
        self.train.iter().map(|f| f.ids.len()).max().unwrap_or(1)
    }

    fn metric(&self) -> (&'static str, bool) {
        ("f1", true)
    }

    fn step(
        &mut self,
        model: &Self::Model,
        examples: &[usize],
        pass: &mut Pass,
        loss_scale: f64,
        recompute: &Recompute,
    ) -> Result<MicroStep> {
        let refs: Vec<&QaFeature> = examples.iter().map(|&i| &self.train[i]).collect();
        let (batch, starts, ends) = collate(&refs, model.config.pad_token_id);
        let bottom = self.run.bottom(examples);
        let (mask, b, s) = (&batch.attention_mask, batch.batch, batch.seq);
        let span =
            |logits: &candle_core::Tensor| loss::span_loss(logits, mask, &starts, &ends, b, s);
        let out =
            step::forward_backward_with(model, &batch, pass, loss_scale, bottom, recompute, span)?;
        Ok(micro_step(out, &batch))
    }

    fn importance(&mut self, model: &Self::Model, monitor: &[usize]) -> Result<Vec<f64>> {
        let train = self.train;
        let batches = monitor
            .chunks(self.run.eval_batch_size.max(1))
            .map(|chunk| {
                let refs: Vec<&QaFeature> = chunk.iter().map(|&i| &train[i]).collect();
                (chunk.to_vec(), collate(&refs, model.config.pad_token_id).0)
            });
        self.run.importance_of(model, batches)
    }

    fn validate(&mut self, model: &Self::Model) -> Result<Validation> {
        let batch = self.run.eval_batch_size;
        let (_, scores, loss) = evaluate(model, self.validation, self.v2, batch)?;
        Ok(Validation {
            metric: scores.f1,
            loss,
        })
    }

    fn save_best(&self, model: &Self::Model, output: &Path) -> Result<()> {
        self.run.save(model, output, Vec::new())
    }
}

/// Writes `predictions` as the official scripts read them: `{"id": "answer", ...}`.
pub fn write_predictions(path: &Path, predictions: &BTreeMap<String, String>) -> Result<()> {
    crate::files::write_atomic(path, serde_json::to_string_pretty(predictions)?.as_bytes())
        .with_context(|| format!("{}: cannot write the predictions", path.display()))
}

/// Trains, tests the best adapter and writes all outputs (`predictions.json`: the test split's
/// answers, or the validation split's when there is no test split). `resume`: continue from
/// `output/checkpoint`. None when the run stopped early (`stop_after_epoch`), resumable.
pub fn train_qa(
    cfg: &TrainConfig,
    resume: bool,
    show_progress: bool,
) -> Result<Option<Summary<QaScores>>> {
    cfg.validate()?;
    let started = Instant::now();
    let setup = prepare(cfg)?;
    for (name, n) in [
        ("training", setup.train.examples.len()),
        ("validation", setup.validation.examples.len()),
    ] {
        anyhow::ensure!(
            n > 0,
            "the data has no {name} questions after the split by article: the best adapter is \
             chosen on the validation split"
        );
    }
    let cfg = &*with_family_targets(cfg, &setup.model_dir);
    let dir = &setup.model_dir;
    let build = |device: &Device, rng: &mut StdRng| build_model(cfg, dir, device, rng);
    // The best-validation adapter answers the test split (or the validation split).
    let test: TestOf<_, QaScores> = Box::new(|best| {
        let has_test = !setup.test.examples.is_empty();
        let split = if has_test {
            &setup.test
        } else {
            &setup.validation
        };
        let (predictions, scores, _) =
            evaluate(&best()?, split, setup.v2, cfg.run.eval_batch_size)?;
        write_predictions(&cfg.run.output.join(PREDICTIONS_FILE), &predictions)?;
        Ok(has_test.then_some(scores))
    });
    let qa = |run, _: &_| QaTask {
        train: &setup.train.features,
        validation: &setup.validation,
        v2: setup.v2,
        run,
    };
    let flags = (resume, show_progress);
    train_encoder(cfg, dir, flags, started, build, qa, test, |t| t.f1)
}
