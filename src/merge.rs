//! Merging a PEFT LoRA adapter into its base model: a full Hugging Face folder that transformers
//! loads without PEFT, an encoder's sequence classifier ([`merge_adapter`]: BERT, RoBERTa, MPNet,
//! DistilBERT) or a causal LM, LLaMA family or GPT-2 ([`merge_decoder_adapter`]).
//!
//! Each adapted linear becomes `W' = W + scaling * B @ A` (computed in f64, stored in `W`'s dtype);
//! the head comes from the adapter (PEFT's `modules_to_save`). Every other base tensor is
//! copied unchanged (byte for byte), renamed to the prefixed layout transformers expects
//! (`bert.`, `roberta.`, ...).

use crate::io::peft::{self, PeftConfig};
use crate::io::IoError;
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Tokenizer files copied from the base folder when present.
pub const TOKENIZER_FILES: [&str; 7] = [
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    // An image model's preprocessing (ViT).
    "preprocessor_config.json",
];
const PREFIX: &str = "base_model.model.";

/// What merging needs to know of an encoder family's names ([`EncoderNaming::of`] reads them
/// from the family's table).
#[derive(Clone, Debug)]
pub struct EncoderNaming {
    /// The base model's prefix in the task model (`bert.`).
    pub prefix: &'static str,
    /// The base model's top-level modules its sequence classifier has (`embeddings`, `encoder`):
    /// a base tensor under one of them is kept, with the prefix; any other that is not of the
    /// head (another task's head, a pooler the classifier has no use for) is left out.
    pub base_modules: &'static [&'static str],
    /// The head's trained layers at the task model's root, the output layer (`[num_labels,
    /// hidden]`) first: `classifier`; RoBERTa's `classifier.out_proj`, `classifier.dense`. Each
    /// comes from the adapter, else from the base checkpoint.
    pub head: Vec<&'static str>,
    /// transformers' class (`config.json`'s `architectures`).
    pub architecture: &'static str,
    /// transformers' question-answering class of the family; None for ViT.
    pub qa_architecture: Option<&'static str>,
    pub hidden_size: usize,
    pub family: crate::model::bert_config::EncoderFamily,
}

impl EncoderNaming {
    /// The names of `config`'s family: its prefix, base modules, trained head layers (the output
    /// layer first) and transformers' class.
    pub fn of(config: &crate::model::BertConfig) -> Self {
        let family = config.family();
        let spec = family.spec().head;
        let mut head = vec![spec.out];
        if spec.dense_trains {
            head.push(spec.dense);
        }
        Self {
            prefix: family.spec().prefix,
            base_modules: family.spec().base_modules,
            head,
            architecture: family.spec().architecture,
            qa_architecture: family.spec().qa_architecture,
            hidden_size: config.hidden_size,
            family,
        }
    }

    /// An adapter file's LoRA module path (without PEFT's prefix) as the checkpoint names it: a
    /// module in the family's second naming (transformers 5's ViT: `vit.layers.0.attention.q_proj`)
    /// becomes the checkpoint's (`vit.encoder.layer.0.attention.attention.query`).
    pub fn checkpoint_module(&self, module: &str) -> String {
        let own = |module: &str| -> Option<String> {
            let (layers, sites) = self.family.renamed_paths()?;
            let (layer, site) = module
                .strip_prefix(layers)?
                .strip_prefix('.')?
                .split_once('.')?;
            let i = sites.iter().position(|s| *s == site)?;
            let site = self.family.spec().site_paths[i];
            Some(format!("{}.{layer}.{site}", self.family.spec().layers_path))
        };
        own(module).unwrap_or_else(|| module.into())
    }

    /// The names of the family's `...ForQuestionAnswering`: `qa_outputs` as the head, the same
    /// base model; an error for a family without one.
    pub fn question_answering(&self) -> Result<Self, String> {
        let architecture = self.qa_architecture.ok_or_else(|| {
            format!(
                "a question-answering adapter (task_type QUESTION_ANS) needs a text encoder base, \
                 not this {} one",
                self.prefix.trim_end_matches('.')
            )
        })?;
        Ok(Self {
            head: vec![crate::nn::head::QaHead::PATH],
            architecture,
            ..self.clone()
        })
    }

    /// The name the task model uses for a base checkpoint tensor: a bare base-model name
    /// (`encoder.layer.0...`) gets the prefix, a head tensor keeps its own; None for a tensor the
    /// task model does not have.
    fn out_name(&self, name: &str) -> Option<String> {
        let under = |name: &str, module: &str| {
            name.strip_prefix(module)
                .is_some_and(|rest| rest.starts_with('.'))
        };
        if self.head.iter().any(|m| under(name, m)) {
            return Some(name.to_string());
        }
        let bare = name.strip_prefix(self.prefix).unwrap_or(name);
        self.base_modules
            .iter()
            .any(|m| under(bare, m))
            .then(|| format!("{}{bare}", self.prefix))
    }

    /// Every head tensor's name (`classifier.weight`, `classifier.bias`, ...).
    fn head_tensors(&self) -> Vec<String> {
        let mut v = Vec::new();
        for m in &self.head {
            v.push(format!("{m}.weight"));
            v.push(format!("{m}.bias"));
        }
        v
    }
}

#[derive(Debug, Clone)]
pub struct MergeReport {
    /// Number of linears that received a LoRA delta.
    pub merged_modules: usize,
    /// The written `model.safetensors`.
    pub out_file: PathBuf,
}

/// Writes a full Hugging Face model folder with the LoRA deltas merged into the base weights:
/// for each adapted linear, `W' = W + scaling * B @ A` (scaling = lora_alpha / r, or
/// lora_alpha / sqrt(r) with use_rslora), plus the head layers `naming` lists (from the adapter,
/// `base_model.model.classifier.weight` / `.bias` saved as `classifier.weight` /
/// `classifier.bias`; else the base's), so transformers' sequence classifier of the family
/// (`naming.architecture`, e.g. `BertForSequenceClassification`) loads it with
/// `from_pretrained(out)`. Copies config.json with that `architectures` and `num_labels` /
/// `id2label` / `label2id` set to the classifier's size, and the tokenizer files present among
/// [`TOKENIZER_FILES`]. A question-answering adapter (`task_type` `QUESTION_ANS`) gives the
/// family's `...ForQuestionAnswering` instead ([`EncoderNaming::question_answering`]): its
/// `qa_outputs` (`[2, hidden]`) in place of the classifier (BERT's pooler is kept; transformers'
/// QA model does not use it).
pub fn merge_adapter(
    base_dir: &Path,
    adapter_dir: &Path,
    out_dir: &Path,
    naming: &EncoderNaming,
) -> Result<MergeReport, IoError> {
    let base_file = base_dir.join(WEIGHTS_FILE);
    let base_config = base_dir.join("config.json");
    for (path, what) in [
        (&base_file, "base model weights"),
        (&base_config, "base model config"),
    ] {
        if !path.is_file() {
            return Err(IoError::Missing {
                path: path.clone(),
                what: what.into(),
            });
        }
    }
    let (cfg, adapter_file) = read_plain_adapter(adapter_dir)?;
    if cfg.fan_in_fan_out {
        return Err(invalid(
            &adapter_dir.join(peft::CONFIG_FILE),
            "fan_in_fan_out = true is not supported (encoder linears store W as [out, in])",
        ));
    }
    if same_dir(base_dir, out_dir) {
        return Err(invalid(
            out_dir,
            "the output folder is the base model folder; choose another",
        ));
    }

    // The head PEFT saved beside the adapters: a classifier, or extractive QA's `qa_outputs`.
    let qa = cfg.task_type.as_deref() == Some("QUESTION_ANS");
    let qa_naming;
    let naming = if qa {
        qa_naming = naming
            .question_answering()
            .map_err(|m| invalid(&adapter_dir.join(peft::CONFIG_FILE), &m))?;
        &qa_naming
    } else {
        naming
    };
    let base = load(&base_file)?;
    let adapter = load_adapter(&adapter_file)?;
    let mut config: serde_json::Value = read_json(&base_config)?;

    // Base tensors under their output names.
    let mut out: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut source: HashMap<String, String> = HashMap::new();
    for (name, t) in base {
        if name.ends_with("position_ids") {
            continue;
        }
        let Some(o) = naming.out_name(&name) else {
            continue;
        };
        if let Some(prev) = source.insert(o.clone(), name.clone()) {
            return Err(invalid(
                &base_file,
                &format!("tensors '{prev}' and '{name}' are both '{o}'"),
            ));
        }
        out.insert(o, t);
    }

    // The LoRA modules: `<module>.lora_A.weight` / `<module>.lora_A.default.weight`.
    let mut merged_modules = 0;
    let head = naming.head_tensors();
    let head_refs: Vec<&str> = head.iter().map(String::as_str).collect();
    // A module named in both of the family's namings (safetune writes ViT's so) merges once.
    let mut modules: BTreeMap<String, &str> = BTreeMap::new();
    for module in lora_modules(&adapter, &adapter_file, &cfg, &head_refs)? {
        modules
            .entry(naming.checkpoint_module(module))
            .or_insert(module);
    }
    for (checkpoint_module, module) in modules {
        let name = format!("{checkpoint_module}.weight");
        let target = naming.out_name(&name).unwrap_or(name.clone());
        let w = out.get(&target).ok_or_else(|| IoError::MissingTensor {
            path: base_file.clone(),
            name: name.clone(),
            tried: format!(
                "'{target}' and '{}' for LoRA module '{module}' of {}",
                target.strip_prefix(naming.prefix).unwrap_or(&target),
                adapter_file.display()
            ),
        })?;
        let merged = merged_weight(
            w,
            &target,
            &base_file,
            &adapter,
            &adapter_file,
            module,
            &cfg,
        )?;
        out.insert(target, merged);
        merged_modules += 1;
    }

    // The head: each tensor from the adapter, else the base's. The output layer's rows are the
    // labels; the other layers are hidden-wide.
    let h = naming.hidden_size;
    let mut num_labels = 0;
    for (i, module) in naming.head.iter().enumerate() {
        for bias in [false, true] {
            let name = format!("{module}.{}", if bias { "bias" } else { "weight" });
            let key = format!("{PREFIX}{name}");
            let (t, file, shown) = match (adapter.get(&key), out.get(&name)) {
                (Some(t), _) => (t.clone(), &adapter_file, key),
                (None, Some(t)) => (t.clone(), &base_file, name.clone()),
                (None, None) => {
                    return Err(IoError::MissingTensor {
                        path: adapter_file.clone(),
                        name: key,
                        tried: format!(
                            "the head PEFT saves as modules_to_save, and '{name}' in {}",
                            base_file.display()
                        ),
                    })
                }
            };
            if i == 0 && !bias {
                num_labels = t.dims().first().copied().unwrap_or(0);
            }
            let rows = if i == 0 { num_labels.max(1) } else { h };
            let want = if bias { vec![rows] } else { vec![rows, h] };
            if t.dims() != want.as_slice() {
                return Err(wrong_shape(file, &shown, &t, &want));
            }
            out.insert(name, t);
        }
    }
    if qa && num_labels != 2 {
        let name = format!("{PREFIX}{}.weight", naming.head[0]);
        let t = &out[&format!("{}.weight", naming.head[0])];
        return Err(wrong_shape(&adapter_file, &name, t, &[2, h]));
    }

    // Write: weights, config, tokenizer.
    std::fs::create_dir_all(out_dir).map_err(|e| invalid(out_dir, &e.to_string()))?;
    let out_file = out_dir.join(WEIGHTS_FILE);
    save(&out, &out_file)?;

    let obj = config
        .as_object_mut()
        .ok_or_else(|| invalid(&base_config, "not a JSON object"))?;
    if qa {
        obj.insert(
            "architectures".into(),
            serde_json::json!([naming.architecture]),
        );
        return finish(&config, base_dir, out_dir, merged_modules, out_file);
    }
    // The class names saved with the adapter, else transformers' LABEL_i.
    // (A regression adapter's file names no classes.)
    let saved = crate::io::labels::load(adapter_dir)?.filter(|l| !l.label_names.is_empty());
    let names: Vec<String> = match saved {
        Some(l) if l.label_names.len() == num_labels => l.label_names,
        Some(l) => {
            return Err(invalid(
                &adapter_dir.join(crate::io::labels::FILE),
                &format!(
                    "{} label names for a classifier of {num_labels} outputs",
                    l.label_names.len()
                ),
            ))
        }
        None => (0..num_labels).map(|i| format!("LABEL_{i}")).collect(),
    };
    let id2label: serde_json::Map<String, serde_json::Value> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (i.to_string(), n.clone().into()))
        .collect();
    let label2id: serde_json::Map<String, serde_json::Value> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.clone(), i.into()))
        .collect();
    obj.insert(
        "architectures".into(),
        serde_json::json!([naming.architecture]),
    );
    obj.insert("num_labels".into(), num_labels.into());
    obj.insert("id2label".into(), id2label.into());
    obj.insert("label2id".into(), label2id.into());
    finish(&config, base_dir, out_dir, merged_modules, out_file)
}

/// Writes a merged encoder's config.json and copies the base's tokenizer files.
fn finish(
    config: &serde_json::Value,
    base_dir: &Path,
    out_dir: &Path,
    merged_modules: usize,
    out_file: PathBuf,
) -> Result<MergeReport, IoError> {
    let text = serde_json::to_string_pretty(config).expect("JSON value serializes");
    let out_config = out_dir.join("config.json");
    std::fs::write(&out_config, text).map_err(|e| invalid(&out_config, &e.to_string()))?;

    copy_present(base_dir, out_dir, &TOKENIZER_FILES)?;
    Ok(MergeReport {
        merged_modules,
        out_file,
    })
}

/// Files copied beside a merged decoder's weights when the base folder has them: its config, its
/// generation settings and its tokenizer (fast, SentencePiece or GPT-2 BPE) with its chat template.
pub const DECODER_FILES: [&str; 9] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
];

/// Writes a full Hugging Face causal-LM folder (LLaMA family or GPT-2) with a PEFT LoRA adapter
/// merged in: each adapted linear becomes `W + scaling * B @ A`, transposed for GPT-2's Conv1D
/// (PEFT's `fan_in_fan_out`), computed in f64 and stored in `W`'s dtype. Every other tensor is
/// copied unchanged. The base's weight files are rewritten one at a time under their own names
/// (with its `model.safetensors.index.json`), so a 7B checkpoint is never in memory whole, and
/// `AutoModelForCausalLM.from_pretrained(out)` loads the result without PEFT. Nothing is written
/// until every adapted module is found in the base.
pub fn merge_decoder_adapter(
    base_dir: &Path,
    adapter_dir: &Path,
    out_dir: &Path,
) -> Result<MergeReport, IoError> {
    let (cfg, adapter_file) = read_plain_adapter(adapter_dir)?;
    if same_dir(base_dir, out_dir) {
        return Err(invalid(
            out_dir,
            "the output folder is the base model folder; choose another",
        ));
    }
    let index = base_dir.join(crate::io::weights::INDEX_FILE);
    let files = if index.is_file() {
        crate::io::weights::shard_files(&index)?
    } else {
        let single = base_dir.join(crate::io::weights::SINGLE_FILE);
        if !single.is_file() {
            return Err(IoError::Missing {
                path: single,
                what: format!(
                    "base model weights (a Hugging Face folder with {} or {}; a GGUF base \
                     cannot be merged)",
                    crate::io::weights::SINGLE_FILE,
                    crate::io::weights::INDEX_FILE
                ),
            });
        }
        vec![single]
    };
    let adapter = load_adapter(&adapter_file)?;
    let modules = lora_modules(&adapter, &adapter_file, &cfg, &[])?;

    // Where each module's weight is: its name in the base (PEFT's path, or without its first
    // part for checkpoints saved without `transformer.`/`model.`) and the file holding it.
    // SAFETY: as in `Weights::open_dir`: the files are only read, and not modified meanwhile.
    let names = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
        .map_err(|e| invalid(base_dir, &format!("cannot read the weights ({e})")))?;
    let names: std::collections::HashSet<String> =
        names.tensors().into_iter().map(|(n, _)| n).collect();
    let mut targets: HashMap<String, &str> = HashMap::new();
    for &module in &modules {
        let full = format!("{module}.weight");
        let bare = module.split_once('.').map(|(_, m)| format!("{m}.weight"));
        let name = [Some(full.clone()), bare.clone()]
            .into_iter()
            .flatten()
            .find(|n| names.contains(n))
            .ok_or_else(|| IoError::MissingTensor {
                path: base_dir.into(),
                name: full.clone(),
                tried: format!(
                    "'{full}'{} for LoRA module '{module}' of {}",
                    bare.map(|b| format!(" and '{b}'")).unwrap_or_default(),
                    adapter_file.display()
                ),
            })?;
        targets.insert(name, module);
    }

    std::fs::create_dir_all(out_dir).map_err(|e| invalid(out_dir, &e.to_string()))?;
    let mut merged_modules = 0;
    let mut out_file = out_dir.join(crate::io::weights::SINGLE_FILE);
    for file in &files {
        let mut tensors: BTreeMap<String, Tensor> = load(file)?.into_iter().collect();
        for (name, w) in tensors.iter_mut() {
            let Some(module) = targets.get(name) else {
                continue;
            };
            *w = merged_weight(w, name, file, &adapter, &adapter_file, module, &cfg)?;
            merged_modules += 1;
        }
        out_file = out_dir.join(file.file_name().expect("a weights file has a name"));
        save(&tensors, &out_file)?;
    }
    if index.is_file() {
        out_file = out_dir.join(crate::io::weights::INDEX_FILE);
        copy_file(&index, &out_file)?;
    }
    copy_present(base_dir, out_dir, &DECODER_FILES)?;
    Ok(MergeReport {
        merged_modules,
        out_file,
    })
}

/// The LoRA modules of an adapter file, sorted: from `<module>.lora_A.weight` /
/// `<module>.lora_B.weight` (or PEFT's `.default.` names). Any other tensor is refused unless it
/// is one of `also` (a classifier PEFT saves beside them).
fn lora_modules<'a>(
    adapter: &'a HashMap<String, Tensor>,
    adapter_file: &Path,
    cfg: &PeftConfig,
    also: &[&str],
) -> Result<Vec<&'a str>, IoError> {
    let mut modules: Vec<&str> = Vec::new();
    for key in adapter.keys() {
        let Some(rest) = key.strip_prefix(PREFIX) else {
            return Err(invalid(
                adapter_file,
                &format!("tensor '{key}' does not start with '{PREFIX}'"),
            ));
        };
        if let Some((module, which)) = rest.split_once(".lora_") {
            if !matches!(
                which,
                "A.weight" | "B.weight" | "A.default.weight" | "B.default.weight"
            ) {
                return Err(unsupported(adapter_file, key, cfg));
            }
            modules.push(module);
        } else if !also.contains(&rest) {
            return Err(unsupported(adapter_file, key, cfg));
        }
    }
    modules.sort();
    modules.dedup();
    Ok(modules)
}

/// The adapter folder's PEFT config and weights file, refused unless it is plain LoRA.
fn read_plain_adapter(adapter_dir: &Path) -> Result<(PeftConfig, PathBuf), IoError> {
    let cfg = peft::read_config(adapter_dir)?;
    let adapter_file = adapter_dir.join(peft::WEIGHTS_FILE);
    if !adapter_file.is_file() {
        return Err(IoError::Missing {
            path: adapter_file,
            what: "PEFT adapter weights".into(),
        });
    }
    check_plain_lora(&adapter_dir.join(peft::CONFIG_FILE))?;
    Ok((cfg, adapter_file))
}

/// `W + scaling * B @ A` for LoRA module `module` of `adapter`, in f64, stored in `W`'s dtype;
/// `W` (tensor `name` of `file`) is `[out, in]`, or `[in, out]` with `fan_in_fan_out` (GPT-2's
/// Conv1D), and A, B must be `[r, in]`, `[out, r]`.
fn merged_weight(
    w: &Tensor,
    name: &str,
    file: &Path,
    adapter: &HashMap<String, Tensor>,
    adapter_file: &Path,
    module: &str,
    cfg: &PeftConfig,
) -> Result<Tensor, IoError> {
    // An integer W would take the delta silently cast; a NaN one would stay NaN.
    crate::io::check_weight(file, name, w)?;
    let a = lora_tensor(adapter, adapter_file, module, "A")?;
    let b = lora_tensor(adapter, adapter_file, module, "B")?;
    let (out_f, in_f) = match (w.dims(), cfg.fan_in_fan_out) {
        ([i, o], true) => (*o, *i),
        ([o, i], false) => (*o, *i),
        (d, _) => {
            return Err(invalid(
                file,
                &format!("tensor '{name}' has shape {d:?}, expected a 2-D linear weight"),
            ))
        }
    };
    if a.dims() != [cfg.r, in_f] {
        let a_name = format!("{PREFIX}{module}.lora_A.weight");
        return Err(wrong_shape(adapter_file, &a_name, a, &[cfg.r, in_f]));
    }
    if b.dims() != [out_f, cfg.r] {
        let b_name = format!("{PREFIX}{module}.lora_B.weight");
        return Err(wrong_shape(adapter_file, &b_name, b, &[out_f, cfg.r]));
    }
    let scaling = cfg.lora().scaling();
    (|| -> candle_core::Result<Tensor> {
        let mut delta = b
            .to_dtype(DType::F64)?
            .matmul(&a.to_dtype(DType::F64)?)?
            .affine(scaling, 0.0)?;
        if cfg.fan_in_fan_out {
            delta = delta.t()?;
        }
        (w.to_dtype(DType::F64)? + delta)?.to_dtype(w.dtype())
    })()
    .map_err(|e| invalid(file, &format!("merging into '{name}': {e}")))
}

/// Copies each of `names` that `base_dir` has into `out_dir`.
fn copy_present(base_dir: &Path, out_dir: &Path, names: &[&str]) -> Result<(), IoError> {
    for name in names {
        let src = base_dir.join(name);
        if src.is_file() {
            copy_file(&src, &out_dir.join(name))?;
        }
    }
    Ok(())
}

fn copy_file(src: &Path, dst: &Path) -> Result<(), IoError> {
    std::fs::copy(src, dst)
        .map(|_| ())
        .map_err(|e| invalid(dst, &format!("cannot copy from {}: {e}", src.display())))
}

/// Refuses PEFT options that change what `W + scaling * B @ A` means (PEFT writes them all, with
/// neutral defaults): DoRA, a LoRA bias, per-module ranks or alphas.
fn check_plain_lora(path: &Path) -> Result<(), IoError> {
    let cfg = read_json(path)?;
    let on = |k: &str| cfg.get(k).and_then(|v| v.as_bool()) == Some(true);
    let nonempty = |k: &str| {
        cfg.get(k)
            .and_then(|v| v.as_object())
            .is_some_and(|m| !m.is_empty())
    };
    for (bad, what) in [
        (on("use_dora"), "use_dora = true"),
        (on("lora_bias"), "lora_bias = true"),
        (nonempty("rank_pattern"), "a non-empty rank_pattern"),
        (nonempty("alpha_pattern"), "a non-empty alpha_pattern"),
    ] {
        if bad {
            return Err(invalid(path, &format!("{what} is not supported by merge")));
        }
    }
    Ok(())
}

fn lora_tensor<'a>(
    adapter: &'a HashMap<String, Tensor>,
    file: &Path,
    module: &str,
    which: &str,
) -> Result<&'a Tensor, IoError> {
    let plain = format!("{PREFIX}{module}.lora_{which}.weight");
    let named = format!("{PREFIX}{module}.lora_{which}.default.weight");
    adapter
        .get(&plain)
        .or_else(|| adapter.get(&named))
        .ok_or_else(|| IoError::MissingTensor {
            path: file.into(),
            name: plain.clone(),
            tried: format!("'{plain}', '{named}'"),
        })
}

fn load(path: &Path) -> Result<HashMap<String, Tensor>, IoError> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| invalid(path, &format!("not a readable safetensors file ({e})")))
}

/// An adapter file's tensors, refused before anything is written if one is not a finite float
/// tensor (a diverged run's adapter would make every merged weight NaN).
fn load_adapter(path: &Path) -> Result<HashMap<String, Tensor>, IoError> {
    let tensors = load(path)?;
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        crate::io::check_weight(path, name, &tensors[name])?;
    }
    Ok(tensors)
}

fn read_json(path: &Path) -> Result<serde_json::Value, IoError> {
    let text = std::fs::read_to_string(path).map_err(|_| IoError::Missing {
        path: path.into(),
        what: "JSON file".into(),
    })?;
    serde_json::from_str(&text).map_err(|e| invalid(path, &format!("not valid JSON ({e})")))
}

/// Writes `tensors` with the `{"format": "pt"}` metadata transformers checks for (temp + rename).
fn save(tensors: &BTreeMap<String, Tensor>, path: &Path) -> Result<(), IoError> {
    let mut data: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let dtype = st_dtype(t.dtype()).ok_or_else(|| {
            invalid(
                path,
                &format!("tensor '{name}': dtype {:?} cannot be written", t.dtype()),
            )
        })?;
        let mut bytes = Vec::with_capacity(t.elem_count() * t.dtype().size_in_bytes());
        t.write_bytes(&mut bytes)
            .map_err(|e| invalid(path, &format!("tensor '{name}': {e}")))?;
        data.push((name.clone(), dtype, t.dims().to_vec(), bytes));
    }
    let views = data
        .iter()
        .map(|(n, d, s, b)| Ok((n.as_str(), TensorView::new(*d, s.clone(), b)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(|e| invalid(path, &e.to_string()))?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::tensor::serialize_to_file(views, Some(metadata), &tmp)
        .map_err(|e| invalid(&tmp, &e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| invalid(path, &e.to_string()))
}

fn st_dtype(d: DType) -> Option<Dtype> {
    Some(match d {
        DType::U8 => Dtype::U8,
        DType::U32 => Dtype::U32,
        DType::I16 => Dtype::I16,
        DType::I32 => Dtype::I32,
        DType::I64 => Dtype::I64,
        DType::BF16 => Dtype::BF16,
        DType::F16 => Dtype::F16,
        DType::F32 => Dtype::F32,
        DType::F64 => Dtype::F64,
        _ => return None,
    })
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn invalid(path: &Path, message: &str) -> IoError {
    IoError::Invalid {
        path: path.into(),
        message: message.into(),
    }
}

fn wrong_shape(path: &Path, name: &str, t: &Tensor, expected: &[usize]) -> IoError {
    IoError::WrongShape {
        path: path.into(),
        name: name.into(),
        actual: t.dims().to_vec(),
        expected: expected.to_vec(),
    }
}

fn unsupported(path: &Path, key: &str, cfg: &PeftConfig) -> IoError {
    invalid(
        path,
        &format!(
            "tensor '{key}' is not a LoRA A/B matrix or the classifier; only plain LoRA \
             (bias \"none\", no DoRA, no extra modules_to_save) can be merged (bias = \"{}\")",
            cfg.bias
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: usize = 4;
    const R: usize = 2;

    fn vals(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 + 1.0) * seed).sin()).collect()
    }

    fn t(shape: &[usize], seed: f32) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(vals(n, seed), shape, &Device::Cpu).unwrap()
    }

    fn peft_config(r: usize, use_rslora: bool) -> PeftConfig {
        PeftConfig {
            peft_type: "LORA".into(),
            task_type: Some("SEQ_CLS".into()),
            r,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: vec!["query".into(), "value".into()],
            base_model_name_or_path: None,
            bias: "none".into(),
            fan_in_fan_out: false,
            use_rslora,
            modules_to_save: Some(vec!["classifier".into()]),
            layers_to_transform: None,
            inference_mode: true,
            init_lora_weights: true,
        }
    }

    /// A base folder with bare (un-prefixed) names, as MiniLM's checkpoint has, and a position_ids
    /// buffer; and an adapter on query (plain keys) and value (`.default.` keys).
    fn fixture(dir: &Path, a_rank: usize, use_rslora: bool) -> (PathBuf, PathBuf) {
        let base = dir.join("base");
        let adapter = dir.join("adapter");
        std::fs::create_dir_all(&base).unwrap();
        std::fs::create_dir_all(&adapter).unwrap();
        let mut b: HashMap<String, Tensor> = HashMap::new();
        b.insert("embeddings.word_embeddings.weight".into(), t(&[10, H], 0.3));
        b.insert(
            "embeddings.position_ids".into(),
            Tensor::arange(0i64, 8, &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
        );
        for (i, m) in ["query", "key", "value"].iter().enumerate() {
            let p = format!("encoder.layer.0.attention.self.{m}");
            b.insert(format!("{p}.weight"), t(&[H, H], 0.7 + i as f32));
            b.insert(format!("{p}.bias"), t(&[H], 0.11 + i as f32));
        }
        b.insert("pooler.dense.weight".into(), t(&[H, H], 1.9));
        candle_core::safetensors::save(&b, base.join(WEIGHTS_FILE)).unwrap();
        let config = serde_json::json!({
            "architectures": ["BertModel"], "hidden_size": H, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 8, "vocab_size": 10,
            "max_position_embeddings": 8, "hidden_act": "gelu"
        });
        std::fs::write(base.join("config.json"), config.to_string()).unwrap();
        std::fs::write(base.join("tokenizer.json"), "{\"tok\": 1}").unwrap();

        let stem = "base_model.model.bert.encoder.layer.0.attention.self";
        let mut a: HashMap<String, Tensor> = HashMap::new();
        a.insert(format!("{stem}.query.lora_A.weight"), t(&[a_rank, H], 2.3));
        a.insert(format!("{stem}.query.lora_B.weight"), t(&[H, R], 3.1));
        a.insert(
            format!("{stem}.value.lora_A.default.weight"),
            t(&[R, H], 4.7),
        );
        a.insert(
            format!("{stem}.value.lora_B.default.weight"),
            t(&[H, R], 5.3),
        );
        a.insert("base_model.model.classifier.weight".into(), t(&[3, H], 6.1));
        a.insert("base_model.model.classifier.bias".into(), t(&[3], 6.9));
        candle_core::safetensors::save(&a, adapter.join(peft::WEIGHTS_FILE)).unwrap();
        let cfg = serde_json::to_string(&peft_config(R, use_rslora)).unwrap();
        std::fs::write(adapter.join(peft::CONFIG_FILE), cfg).unwrap();
        (base, adapter)
    }

    /// The fixture's family names (BERT), as `safetune merge` reads them from its config.
    fn naming(base: &Path) -> EncoderNaming {
        EncoderNaming::of(&crate::model::BertConfig::from_file(&base.join("config.json")).unwrap())
    }

    fn raw(path: &Path) -> (Vec<u8>, Option<HashMap<String, String>>) {
        let bytes = std::fs::read(path).unwrap();
        let meta = safetensors::SafeTensors::read_metadata(&bytes)
            .unwrap()
            .1
            .metadata()
            .clone();
        (bytes, meta)
    }

    fn data_of(bytes: &[u8], name: &str) -> (Dtype, Vec<usize>, Vec<u8>) {
        let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
        let v = st.tensor(name).unwrap();
        (v.dtype(), v.shape().to_vec(), v.data().to_vec())
    }

    /// `W + s * B @ A` by hand, in f64, for row-major `W [H,H]`, `B [H,R]`, `A [R,H]`.
    fn expected(w: &[f32], b: &[f32], a: &[f32], s: f64) -> Vec<f32> {
        let mut out = vec![0f32; H * H];
        for o in 0..H {
            for i in 0..H {
                let d: f64 = (0..R)
                    .map(|k| b[o * R + k] as f64 * a[k * H + i] as f64)
                    .sum();
                out[o * H + i] = (w[o * H + i] as f64 + s * d) as f32;
            }
        }
        out
    }

    fn floats(bytes: &[u8]) -> Vec<f32> {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn merges_deltas_and_keeps_everything_else() {
        let dir = tempfile::tempdir().unwrap();
        let (base, adapter) = fixture(dir.path(), R, false);
        let out = dir.path().join("merged");
        let report = merge_adapter(&base, &adapter, &out, &naming(&base)).unwrap();
        assert_eq!(report.merged_modules, 2);
        assert_eq!(report.out_file, out.join(WEIGHTS_FILE));

        let (merged, meta) = raw(&report.out_file);
        assert_eq!(meta.unwrap().get("format").map(String::as_str), Some("pt"));
        let (base_bytes, _) = raw(&base.join(WEIGHTS_FILE));
        let st = safetensors::SafeTensors::deserialize(&merged).unwrap();
        let mut names = st.names();
        names.sort();
        assert_eq!(
            names,
            [
                "bert.embeddings.word_embeddings.weight",
                "bert.encoder.layer.0.attention.self.key.bias",
                "bert.encoder.layer.0.attention.self.key.weight",
                "bert.encoder.layer.0.attention.self.query.bias",
                "bert.encoder.layer.0.attention.self.query.weight",
                "bert.encoder.layer.0.attention.self.value.bias",
                "bert.encoder.layer.0.attention.self.value.weight",
                "bert.pooler.dense.weight",
                "classifier.bias",
                "classifier.weight",
            ]
        );

        // W' = W + (alpha / r) B A for both modules (plain and `.default.` adapter keys).
        let s = 8.0 / R as f64;
        for (m, wseed, aseed, bseed) in [("query", 0.7, 2.3, 3.1), ("value", 2.7, 4.7, 5.3)] {
            let name = format!("bert.encoder.layer.0.attention.self.{m}.weight");
            let (dtype, shape, data) = data_of(&merged, &name);
            assert_eq!((dtype, shape), (Dtype::F32, vec![H, H]));
            let want = expected(
                &vals(H * H, wseed),
                &vals(H * R, bseed),
                &vals(R * H, aseed),
                s,
            );
            let got = floats(&data);
            let diff = got
                .iter()
                .zip(&want)
                .map(|(g, w)| (g - w).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-6, "{m}: off by {diff}");
            let orig = vals(H * H, wseed);
            assert!(got.iter().zip(&orig).any(|(g, o)| (g - o).abs() > 1e-3));
        }

        // Untouched tensors are byte-identical, only renamed.
        for (src, dst) in [
            (
                "embeddings.word_embeddings.weight",
                "bert.embeddings.word_embeddings.weight",
            ),
            (
                "encoder.layer.0.attention.self.key.weight",
                "bert.encoder.layer.0.attention.self.key.weight",
            ),
            (
                "encoder.layer.0.attention.self.query.bias",
                "bert.encoder.layer.0.attention.self.query.bias",
            ),
        ] {
            assert_eq!(data_of(&base_bytes, src), data_of(&merged, dst), "{src}");
        }
        let (adapter_bytes, _) = raw(&adapter.join(peft::WEIGHTS_FILE));
        assert_eq!(
            data_of(&adapter_bytes, "base_model.model.classifier.weight"),
            data_of(&merged, "classifier.weight")
        );

        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["architectures"][0], "BertForSequenceClassification");
        assert_eq!(cfg["num_labels"], 3);
        assert_eq!(cfg["id2label"]["2"], "LABEL_2");
        assert_eq!(cfg["label2id"]["LABEL_1"], 1);
        assert_eq!(cfg["hidden_size"], H);
        assert!(out.join("tokenizer.json").is_file());
        assert!(!out.join("vocab.txt").exists());

        // With the class names saved beside the adapter, config.json carries them; a list of
        // the wrong length is an error naming the file.
        let labels = |names: &[&str]| crate::io::labels::AdapterLabels {
            data: None,
            label_names: names.iter().map(|s| s.to_string()).collect(),
        };
        crate::io::labels::save(&adapter, &labels(&["sport", "tech", "politics"])).unwrap();
        let named = dir.path().join("merged-named");
        merge_adapter(&base, &adapter, &named, &naming(&base)).unwrap();
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(named.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["id2label"]["2"], "politics");
        assert_eq!(cfg["label2id"]["tech"], 1);
        crate::io::labels::save(&adapter, &labels(&["sport", "tech"])).unwrap();
        let e = merge_adapter(&base, &adapter, &dir.path().join("m3"), &naming(&base)).unwrap_err();
        assert!(e.to_string().contains(crate::io::labels::FILE), "{e}");
    }

    #[test]
    fn rslora_scales_by_sqrt_r() {
        let dir = tempfile::tempdir().unwrap();
        let (base, adapter) = fixture(dir.path(), R, true);
        let out = dir.path().join("merged");
        merge_adapter(&base, &adapter, &out, &naming(&base)).unwrap();
        let (merged, _) = raw(&out.join(WEIGHTS_FILE));
        let (_, _, data) = data_of(&merged, "bert.encoder.layer.0.attention.self.query.weight");
        let s = 8.0 / (R as f64).sqrt();
        let want = expected(&vals(H * H, 0.7), &vals(H * R, 3.1), &vals(R * H, 2.3), s);
        let got = floats(&data);
        assert!(got.iter().zip(&want).all(|(g, w)| (g - w).abs() < 1e-6));
    }

    #[test]
    fn rank_mismatch_names_file_and_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let (base, adapter) = fixture(dir.path(), R + 1, false);
        let err =
            merge_adapter(&base, &adapter, &dir.path().join("merged"), &naming(&base)).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, IoError::WrongShape { .. }), "{msg}");
        assert!(msg.contains("adapter_model.safetensors"), "{msg}");
        assert!(
            msg.contains("bert.encoder.layer.0.attention.self.query.lora_A.weight"),
            "{msg}"
        );
        assert!(msg.contains("[3, 4]") && msg.contains("[2, 4]"), "{msg}");
        assert!(!dir.path().join("merged").join(WEIGHTS_FILE).exists());
    }

    #[test]
    fn module_without_base_weight_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (base, adapter) = fixture(dir.path(), R, false);
        let path = adapter.join(peft::WEIGHTS_FILE);
        let mut a = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let stem = "base_model.model.bert.encoder.layer.7.attention.self.query";
        a.insert(format!("{stem}.lora_A.weight"), t(&[R, H], 1.0));
        a.insert(format!("{stem}.lora_B.weight"), t(&[H, R], 1.0));
        candle_core::safetensors::save(&a, &path).unwrap();
        let err =
            merge_adapter(&base, &adapter, &dir.path().join("m"), &naming(&base)).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, IoError::MissingTensor { .. }), "{msg}");
        assert!(
            msg.contains("model.safetensors") && msg.contains("layer.7"),
            "{msg}"
        );
    }

    /// A diverged adapter (a NaN in one LoRA matrix) or one stored as integers is refused, naming
    /// the file and tensor, and nothing is written.
    #[test]
    fn refuses_a_nan_or_integer_adapter() {
        let stem = "base_model.model.bert.encoder.layer.0.attention.self.query";
        let nan = Tensor::new(&[[f32::NAN; H]; R], &Device::Cpu).unwrap();
        let ints = Tensor::zeros((H, R), DType::I64, &Device::Cpu).unwrap();
        for (key, bad, needle) in [
            (format!("{stem}.lora_A.weight"), nan, "NaN"),
            (format!("{stem}.lora_B.weight"), ints, "I64"),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let (base, adapter) = fixture(dir.path(), R, false);
            let path = adapter.join(peft::WEIGHTS_FILE);
            let mut a = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
            a.insert(key.clone(), bad);
            candle_core::safetensors::save(&a, &path).unwrap();
            let out = dir.path().join("merged");
            let msg = merge_adapter(&base, &adapter, &out, &naming(&base))
                .unwrap_err()
                .to_string();
            assert!(
                msg.contains(peft::WEIGHTS_FILE) && msg.contains(&key) && msg.contains(needle),
                "{msg}"
            );
            assert!(!out.exists(), "a refused merge wrote {}", out.display());
        }
    }

    /// A base weight the adapter merges into that is stored as integers is refused, naming the
    /// base file and tensor, rather than getting the delta cast to integers.
    #[test]
    fn refuses_an_integer_base_weight() {
        let dir = tempfile::tempdir().unwrap();
        let (base, adapter) = fixture(dir.path(), R, false);
        let path = base.join(WEIGHTS_FILE);
        let mut b = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let name = "encoder.layer.0.attention.self.query.weight";
        b.insert(
            name.into(),
            Tensor::zeros((H, H), DType::I64, &Device::Cpu).unwrap(),
        );
        candle_core::safetensors::save(&b, &path).unwrap();
        let out = dir.path().join("merged");
        let msg = merge_adapter(&base, &adapter, &out, &naming(&base))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains(WEIGHTS_FILE) && msg.contains(name) && msg.contains("I64"),
            "{msg}"
        );
        assert!(!out.exists());
    }

    #[test]
    fn refuses_per_module_alpha() {
        let dir = tempfile::tempdir().unwrap();
        let (base, adapter) = fixture(dir.path(), R, false);
        let path = adapter.join(peft::CONFIG_FILE);
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        cfg["alpha_pattern"] = serde_json::json!({"query": 16});
        std::fs::write(&path, cfg.to_string()).unwrap();
        let err =
            merge_adapter(&base, &adapter, &dir.path().join("m"), &naming(&base)).unwrap_err();
        assert!(err.to_string().contains("alpha_pattern"), "{err}");
    }

    #[test]
    fn missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let (base, adapter) = fixture(dir.path(), R, false);
        std::fs::remove_file(adapter.join(peft::WEIGHTS_FILE)).unwrap();
        let err =
            merge_adapter(&base, &adapter, &dir.path().join("m"), &naming(&base)).unwrap_err();
        assert!(
            err.to_string().contains("adapter_model.safetensors"),
            "{err}"
        );
        let err = merge_adapter(
            &dir.path().join("nope"),
            &adapter,
            &dir.path().join("m"),
            &naming(&base),
        )
        .unwrap_err();
        assert!(matches!(err, IoError::Missing { .. }), "{err}");
    }

    /// Decoder adapters merged into transformers-written sharded checkpoints (LLaMA with grouped
    /// kv heads and an untied head; GPT-2, whose Conv1D weights are `[in, out]`, PEFT's
    /// `fan_in_fan_out`): loaded without adapters, the merged folder gives the adapted model's
    /// logits. It keeps the base's shard files and index, and tensors no adapter touches are
    /// copied exactly.
    #[test]
    fn merged_decoder_gives_the_adapted_logits() {
        use crate::adapters::{Adapted, LoraConfig};
        use crate::model::{CausalLm, Decoder, LmBatch};
        use rand::SeedableRng;
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf");
        let cases = [
            (
                "llama3-sharded",
                ["q_proj", "v_proj"],
                "model.embed_tokens.weight",
            ),
            (
                "gpt2-sharded",
                ["c_attn", "c_proj"],
                "transformer.wte.weight",
            ),
        ];
        for (name, targets, untouched) in cases {
            let base = root.join(name);
            let mut m = Decoder::load_hf(&base, DType::F32, &Device::Cpu).unwrap();
            let lora = LoraConfig {
                r: 2,
                alpha: 4.0,
                target_modules: targets.iter().map(|t| t.to_string()).collect(),
                ..LoraConfig::default()
            };
            let mut rng = rand::rngs::StdRng::seed_from_u64(5);
            let n = CausalLm::add_lora(&mut m, &lora, None, &mut rng).unwrap();
            let paths: Vec<String> = m.adapters().into_iter().map(|(p, _)| p).collect();
            for (k, p) in paths.iter().enumerate() {
                let a = m.adapter_by_path_mut(p).unwrap();
                a.b = (t(a.b.dims(), 0.3 + k as f32) * 0.2).unwrap();
            }
            let dir = tempfile::tempdir().unwrap();
            let adapter = dir.path().join("adapter");
            peft::save(&adapter, &m, &lora, name).unwrap();
            let out = dir.path().join("merged");
            let report = merge_decoder_adapter(&base, &adapter, &out).unwrap();
            assert_eq!(report.merged_modules, n, "{name}");

            let merged = Decoder::load_hf(&out, DType::F32, &Device::Cpu).unwrap();
            assert!(merged.adapters().is_empty());
            let plain = Decoder::load_hf(&base, DType::F32, &Device::Cpu).unwrap();
            let b = LmBatch {
                input_ids: Tensor::new(&[[3u32, 17, 5, 9, 30, 2]], &Device::Cpu).unwrap(),
                mask_add: Tensor::zeros((1, 1, 1, 6), DType::F32, &Device::Cpu).unwrap(),
                targets: vec![-100; 6],
                batch: 1,
                seq: 6,
            };
            let want = m.logits(&b).unwrap();
            let diff = crate::nn::gradcheck::max_abs_diff(&merged.logits(&b).unwrap(), &want);
            let effect = crate::nn::gradcheck::max_abs_diff(&plain.logits(&b).unwrap(), &want);
            assert!(
                diff < 1e-4,
                "{name}: merged vs adapted logits differ by {diff}"
            );
            assert!(effect > 1e-2, "{name}: the adapter must matter ({effect})");

            for f in std::fs::read_dir(&base).unwrap() {
                let f = f.unwrap().file_name().into_string().unwrap();
                if f.starts_with("model") {
                    assert!(out.join(&f).is_file(), "{name}: {f} not written");
                }
            }
            let (src, dst) = (load_all(&base), load_all(&out));
            assert_eq!(src.len(), dst.len());
            let same = |t: &Tensor, u: &Tensor| {
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                    == u.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            };
            assert!(same(&src[untouched], &dst[untouched]), "{name}");
        }
    }

    /// A question-answering adapter merges into the family's `...ForQuestionAnswering` folder
    /// (every text family): the base with the deltas merged and the adapter's `qa_outputs` gives
    /// the adapted model's start / end logits when loaded back, and its config names the QA
    /// architecture (no classifier, the base model's names under the family's prefix).
    #[test]
    fn merged_qa_model_gives_the_adapted_span_logits() {
        use crate::adapters::LoraConfig;
        use crate::model::BertForQuestionAnswering;
        use rand::SeedableRng;
        let cases = [
            (
                "bert-padded",
                "BertForQuestionAnswering",
                ["query", "value"],
                "bert.",
            ),
            (
                "mpnet-padded",
                "MPNetForQuestionAnswering",
                ["q", "v"],
                "mpnet.",
            ),
            (
                "roberta-padded",
                "RobertaForQuestionAnswering",
                ["query", "value"],
                "roberta.",
            ),
            (
                "distilbert-padded",
                "DistilBertForQuestionAnswering",
                ["q_lin", "v_lin"],
                "distilbert.",
            ),
        ];
        for (fixture, architecture, targets, prefix) in cases {
            let base = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/hf")
                .join(fixture);
            let cpu = Device::Cpu;
            let mut rng = rand::rngs::StdRng::seed_from_u64(3);
            let mut m = BertForQuestionAnswering::load(&base, DType::F32, &cpu, &mut rng).unwrap();
            let lora = LoraConfig {
                r: 2,
                alpha: 4.0,
                target_modules: targets.map(String::from).to_vec(),
                ..LoraConfig::default()
            };
            let n = m.add_lora(&lora, None, &mut rng).unwrap();
            assert!(n > 0, "{fixture}");
            for (k, (l, site)) in m.adapter_sites().into_iter().enumerate() {
                let a = m.adapter_mut(l, site).unwrap();
                a.b = (t(a.b.dims(), 0.3 + k as f32) * 0.2).unwrap();
            }
            let dir = tempfile::tempdir().unwrap();
            let adapter = dir.path().join("adapter");
            peft::save(&adapter, &m, &lora, fixture).unwrap();
            let out = dir.path().join("merged");
            let report = merge_adapter(&base, &adapter, &out, &naming(&base)).unwrap();
            assert_eq!(report.merged_modules, n);
            let cfg: serde_json::Value =
                serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
            assert_eq!(cfg["architectures"][0], architecture);
            let written = load(&out.join(WEIGHTS_FILE)).unwrap();
            assert!(!written.keys().any(|k| k.starts_with("classifier.")));
            assert!(written
                .keys()
                .all(|k| k.starts_with(prefix) || k.starts_with("qa_outputs.")));
            assert_eq!(written["qa_outputs.weight"].dims(), &[2, 32]);

            // The merged folder loads with its own qa_outputs.
            let merged = BertForQuestionAnswering::load(&out, DType::F32, &cpu, &mut rng).unwrap();
            let mut plain = merged.clone();
            plain.layers = BertForQuestionAnswering::load(&base, DType::F32, &cpu, &mut rng)
                .unwrap()
                .layers;
            let b = crate::data::batch::pad_rows(
                &[(&[2u32, 17, 5, 9, 30, 3][..], &[0u32, 0, 0, 1, 1, 1][..])],
                0,
            );
            let tensors = crate::train::step::to_tensors(&b, DType::F32, &cpu).unwrap();
            let logits = |x: &BertForQuestionAnswering| {
                crate::nn::Pass::inference(|pass| x.forward_eval(&tensors, pass)).unwrap()
            };
            let want = logits(&m);
            let diff = crate::nn::gradcheck::max_abs_diff(&logits(&merged), &want);
            let effect = crate::nn::gradcheck::max_abs_diff(&logits(&plain), &want);
            assert!(
                diff < 1e-4,
                "{fixture}: merged vs adapted span logits differ by {diff}"
            );
            assert!(
                effect > 1e-3,
                "{fixture}: the adapter must matter ({effect})"
            );
        }
    }

    fn load_all(dir: &Path) -> HashMap<String, Tensor> {
        let index = dir.join(crate::io::weights::INDEX_FILE);
        crate::io::weights::shard_files(&index)
            .unwrap()
            .iter()
            .flat_map(|f| load(f).unwrap())
            .collect()
    }

    /// A decoder adapter whose module the base lacks (a GPT-2 adapter on a LLaMA base) is refused
    /// with the base folder and the tensor named, before anything is written.
    #[test]
    fn decoder_merge_names_a_missing_module_and_writes_nothing() {
        use crate::adapters::LoraConfig;
        use crate::model::{CausalLm, Decoder};
        use rand::SeedableRng;
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf");
        let mut g = Decoder::load_hf(&root.join("gpt2-sharded"), DType::F32, &Device::Cpu).unwrap();
        let lora = LoraConfig {
            target_modules: vec!["c_attn".into()],
            ..LoraConfig::default()
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        CausalLm::add_lora(&mut g, &lora, None, &mut rng).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let adapter = dir.path().join("adapter");
        peft::save(&adapter, &g, &lora, "gpt2").unwrap();
        let out = dir.path().join("merged");
        let base = root.join("llama3-sharded");
        let e = merge_decoder_adapter(&base, &adapter, &out)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("llama3-sharded") && e.contains("transformer.h.0.attn.c_attn.weight"),
            "{e}"
        );
        assert!(!out.exists());
    }
}
