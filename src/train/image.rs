//! Image classification (`--task image`): IDX files or an image folder (`data/images.rs`) ->
//! [`ImageTask`] (each batch preprocessed as the model's image processor does, steps through
//! `step::forward_backward_on` and cross-entropy, SAFE's importance, validation accuracy) ->
//! the training loop (`fit`) -> test of the best adapter -> `summary.json` (with per-class
//! scores and the confusion matrix, as text classification's).

use super::config::TrainConfig;
use super::encoder::{
    add_adapters, resolve_model_dir, train_encoder, with_family_targets, EncoderRun, Summary,
    TestOf,
};
use super::fit::{MicroStep, Task, Validation};
use super::step;
use super::trainer::{self, Scores};
use crate::data::images::{self, ImageSet, Preprocessor};
use crate::model::stack::Recompute;
use crate::model::vit::ViTForImageClassification;
use crate::model::BertConfig;
use crate::nn::{loss, Pass};
use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Everything a run needs, loaded once.
pub struct ImageSetup {
    pub model_dir: PathBuf,
    pub preprocessor: Preprocessor,
    pub train: ImageSet,
    pub validation: ImageSet,
    pub test: ImageSet,
}

/// The train, validation and test images of `--data DIR`: an IDX folder's training file split
/// into train and validation (stratified, `data.validation_fraction`, seeded) and its `t10k`
/// files as the test set (without them, `data.test_fraction` of the training file); an image
/// folder split three ways as the tables are.
pub fn load_splits(cfg: &TrainConfig) -> Result<[ImageSet; 3]> {
    let d = &cfg.data;
    let Some(dir) = d.path.as_ref() else {
        anyhow::bail!(
            "image classification needs --data DIR: a folder of IDX files \
             (train-images-idx3-ubyte[.gz], ...) or of class folders of images"
        );
    };
    anyhow::ensure!(
        d.train_file.is_none() && d.validation_file.is_none() && d.test_file.is_none(),
        "image classification takes one --data DIR (split files are for tables)"
    );
    anyhow::ensure!(
        dir.is_dir(),
        "{}: --data for images must be a folder (IDX files or class folders)",
        dir.display()
    );
    let (all, test) = if images::is_idx_dir(dir) {
        images::load_idx_dir(dir)?
    } else {
        (images::load_image_folder(dir)?, None)
    };
    let test_frac = if test.is_some() { 0.0 } else { d.test_fraction };
    let [train, validation, held] = crate::data::split::stratified_indices(
        all.len(),
        Some(&all.labels),
        d.validation_fraction,
        test_frac,
        cfg.run.seed,
    );
    let mut sets = [
        all.subset(&train),
        all.subset(&validation),
        test.unwrap_or_else(|| all.subset(&held)),
    ];
    // The classes are the union of the files' (an IDX test file may name more).
    let names = sets
        .iter()
        .map(|s| s.label_names.clone())
        .max_by_key(|n| n.len())
        .unwrap_or_default();
    for s in &mut sets {
        s.label_names = names.clone();
    }
    Ok(sets)
}

/// The ViT's folder (`--model`; there is no default image model), its preprocessing, the data
/// and its splits.
pub fn prepare(cfg: &TrainConfig) -> Result<ImageSetup> {
    anyhow::ensure!(
        cfg.model.is_some(),
        "image classification needs --model: a ViT folder (config.json with model_type 'vit', \
         model.safetensors, optionally preprocessor_config.json)"
    );
    let model_dir = resolve_model_dir(cfg)?;
    cfg.check_model(&model_dir)?;
    let preprocessor = preprocessor_of(&model_dir)?;
    let [train, validation, test] = load_splits(cfg)?;
    Ok(ImageSetup {
        model_dir,
        preprocessor,
        train,
        validation,
        test,
    })
}

/// The model folder's preprocessing, for its channels and image size.
pub fn preprocessor_of(model_dir: &Path) -> Result<Preprocessor> {
    let path = model_dir.join("config.json");
    let config = BertConfig::from_file(&path)?;
    let Some(g) = config.image else {
        anyhow::bail!("{}: not a ViT config (no image_size)", path.display());
    };
    Ok(Preprocessor::from_model_dir(
        model_dir,
        g.num_channels,
        g.image_size,
    )?)
}

/// The ViT with the adapters the method asks for.
pub fn build_model(
    cfg: &TrainConfig,
    model_dir: &Path,
    num_labels: usize,
    device: &Device,
    rng: &mut StdRng,
) -> Result<ViTForImageClassification> {
    let model =
        ViTForImageClassification::load(model_dir, num_labels, cfg.run.dtype.dtype(), device, rng)?;
    add_adapters(cfg, model, rng)
}

/// `[n, channels, size, size]` pixel values of the images `idx` of `set`, on `device`.
pub fn pixels(
    pre: &Preprocessor,
    set: &ImageSet,
    idx: &[usize],
    device: &Device,
) -> Result<Tensor> {
    let mut v = Vec::with_capacity(idx.len() * pre.channels * pre.height * pre.width);
    for &i in idx {
        let what = || format!("image {i} of the data");
        v.extend(
            pre.pixel_values(&set.images[i], &what)
                .map_err(anyhow::Error::msg)?,
        );
    }
    Ok(Tensor::from_vec(
        v,
        (idx.len(), pre.channels, pre.height, pre.width),
        device,
    )?)
}

/// Logits of the images `idx` (inference), in order.
fn logits_of(
    model: &ViTForImageClassification,
    pre: &Preprocessor,
    set: &ImageSet,
    idx: &[usize],
) -> Result<Tensor> {
    let t = model.image_batch(pixels(pre, set, idx, &model.device())?)?;
    Ok(Pass::inference(|pass| model.forward_eval(&t, pass))?)
}

/// Each image's logits, in order (`eval --logits-out`).
pub fn predict_logits(
    model: &ViTForImageClassification,
    pre: &Preprocessor,
    set: &ImageSet,
    batch_size: usize,
) -> Result<Vec<Vec<f32>>> {
    let all: Vec<usize> = (0..set.len()).collect();
    let mut out = Vec::with_capacity(set.len());
    for chunk in all.chunks(batch_size.max(1)) {
        let logits = logits_of(model, pre, set, chunk)?;
        out.extend(logits.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?);
    }
    Ok(out)
}

/// Accuracy, loss, per-class scores and the confusion matrix of `set`.
pub fn evaluate(
    model: &ViTForImageClassification,
    pre: &Preprocessor,
    set: &ImageSet,
    batch_size: usize,
    num_labels: usize,
) -> Result<Scores> {
    let all: Vec<usize> = (0..set.len()).collect();
    let (mut pred, mut gold) = (Vec::new(), Vec::new());
    let mut loss_sum = 0.0;
    for chunk in all.chunks(batch_size.max(1)) {
        let logits = logits_of(model, pre, set, chunk)?;
        let labels: Vec<u32> = chunk.iter().map(|&i| set.labels[i] as u32).collect();
        let (l, _) = loss::cross_entropy(&logits, &labels)?;
        loss_sum += l as f64 * chunk.len() as f64;
        for row in logits.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()? {
            let arg = (0..row.len())
                .max_by(|&i, &j| row[i].total_cmp(&row[j]))
                .unwrap_or(0);
            pred.push(arg);
        }
        gold.extend(chunk.iter().map(|&i| set.labels[i]));
    }
    let loss = loss_sum / set.len().max(1) as f64;
    Ok(trainer::class_scores(
        &pred,
        &gold,
        loss,
        &set.label_names,
        num_labels,
    ))
}

/// Image classification: a ViT with LoRA and a new classifier.
pub struct ImageTask<'a> {
    pub train: &'a ImageSet,
    pub validation: &'a ImageSet,
    pub preprocessor: &'a Preprocessor,
    pub num_labels: usize,
    /// Patches per image plus `[CLS]`: every image is that many tokens.
    pub seq: usize,
    pub run: EncoderRun<'a>,
}

impl Task for ImageTask<'_> {
    type Model = ViTForImageClassification;

    fn train_len(&self) -> usize {
        self.train.len()
    }

    fn max_tokens(&self) -> usize {
        self.seq
    }

    fn metric(&self) -> (&'static str, bool) {
        ("accuracy", true)
    }

    fn step(
        &mut self,
        model: &Self::Model,
        examples: &[usize],
        pass: &mut Pass,
        loss_scale: f64,
        recompute: &Recompute,
    ) -> Result<MicroStep> {
        let x = pixels(self.preprocessor, self.train, examples, &model.device())?;
        let t = model.image_batch(x)?;
        let mask = vec![1u32; t.batch * t.seq];
        let labels: Vec<u32> = examples
            .iter()
            .map(|&i| self.train.labels[i] as u32)
            .collect();
        let bottom = self.run.bottom(examples);
        let ce = |logits: &Tensor| loss::cross_entropy(logits, &labels);
        let out =
            step::forward_backward_on(model, &t, &mask, pass, loss_scale, bottom, recompute, ce)?;
        Ok(MicroStep {
            loss: out.loss as f64,
            tokens: mask.len(),
            grads: out.grads,
        })
    }

    fn importance(&mut self, model: &Self::Model, monitor: &[usize]) -> Result<Vec<f64>> {
        let (pre, set, device) = (self.preprocessor, self.train, model.device());
        let batches = monitor
            .chunks(self.run.eval_batch_size.max(1))
            .map(|chunk| {
                let t = model.image_batch(pixels(pre, set, chunk, &device)?)?;
                let mask = vec![1u32; t.batch * t.seq];
                Ok((chunk.to_vec(), t, mask))
            });
        self.run.importance_on(model, batches)
    }

    fn validate(&mut self, model: &Self::Model) -> Result<Validation> {
        let s = evaluate(
            model,
            self.preprocessor,
            self.validation,
            self.run.eval_batch_size,
            self.num_labels,
        )?;
        Ok(Validation {
            metric: s.metric,
            loss: s.loss,
        })
    }

    fn save_best(&self, model: &Self::Model, output: &Path) -> Result<()> {
        self.run.save(model, output, self.train.label_names.clone())
    }
}

/// Trains, tests the best adapter and writes all outputs. None when the run stopped early
/// (`stop_after_epoch`), resumable.
pub fn train_image(
    cfg: &TrainConfig,
    resume: bool,
    show_progress: bool,
) -> Result<Option<Summary<Scores>>> {
    cfg.validate()?;
    let started = Instant::now();
    let setup = prepare(cfg)?;
    for (name, n) in [
        ("training", setup.train.len()),
        ("validation", setup.validation.len()),
    ] {
        anyhow::ensure!(
            n > 0,
            "the data has no {name} images after the split (data.validation_fraction {}): the \
             best adapter is chosen on the validation split",
            cfg.data.validation_fraction
        );
    }
    let num_labels = setup.train.label_names.len();
    anyhow::ensure!(
        num_labels >= 2,
        "image classification needs at least 2 classes, the data has {num_labels}"
    );
    let cfg = &*with_family_targets(cfg, &setup.model_dir);
    let dir = &setup.model_dir;
    let build = |device: &Device, rng: &mut StdRng| build_model(cfg, dir, num_labels, device, rng);
    let (pre, batch) = (&setup.preprocessor, cfg.run.eval_batch_size);
    let test: TestOf<_, Scores> = Box::new(|best| {
        let test = (!setup.test.is_empty()).then_some(&setup.test);
        test.map(|t| evaluate(&best()?, pre, t, batch, num_labels))
            .transpose()
    });
    let image = |run, model: &ViTForImageClassification| ImageTask {
        train: &setup.train,
        validation: &setup.validation,
        preprocessor: pre,
        num_labels,
        seq: model.geometry().num_patches() + 1,
        run,
    };
    let flags = (resume, show_progress);
    train_encoder(cfg, dir, flags, started, build, image, test, |t| t.metric)
}
