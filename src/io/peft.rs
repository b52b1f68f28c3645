//! Hugging Face PEFT's LoRA adapter format: `adapter_config.json` + `adapter_model.safetensors` with
//! keys `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` and the head saved as
//! PEFT saves `modules_to_save` (`base_model.model.classifier.weight`/`.bias`; RoBERTa's
//! `classifier.dense.*` and `classifier.out_proj.*`; DistilBERT's `pre_classifier.*` too).

use super::IoError;
use crate::adapters::block::ALL_LINEAR;
use crate::adapters::{Adapted, AdapterId, HeadParam, LoraConfig, LoraMatrix, ParamId};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const PREFIX: &str = "base_model.model.";

/// The fields of PEFT's `LoraConfig` that safetune writes and reads.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeftConfig {
    pub peft_type: String,
    pub task_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: Vec<String>,
    pub base_model_name_or_path: Option<String>,
    pub bias: String,
    pub fan_in_fan_out: bool,
    pub use_rslora: bool,
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub layers_to_transform: Option<Vec<usize>>,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(default = "yes")]
    pub init_lora_weights: bool,
}

fn yes() -> bool {
    true
}

impl PeftConfig {
    pub fn lora(&self) -> LoraConfig {
        LoraConfig {
            r: self.r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            target_modules: self.target_modules.clone(),
            use_rslora: self.use_rslora,
        }
    }
}

/// A head tensor's key: its layer's module path (`classifier`, `classifier.out_proj`) and
/// `.weight` or `.bias`, as PEFT saves `modules_to_save`.
pub fn head_key(module: &str, h: HeadParam) -> String {
    let name = if h.is_bias() { "bias" } else { "weight" };
    format!("{module}.{name}")
}

/// The suffix of a LoRA matrix's key after its module path.
fn lora_suffix(m: LoraMatrix) -> &'static str {
    match m {
        LoraMatrix::A => ".lora_A.weight",
        LoraMatrix::B => ".lora_B.weight",
    }
}

/// The key of a trained tensor of `model` without PEFT's `base_model.model.` prefix, as
/// checkpoints name it: `<module path>.lora_A.weight` / `.lora_B.weight`, `classifier.weight` /
/// `classifier.bias` (or the model's other head layers, see [`Adapted::head_path`]). `id` must
/// be one the model lists or [`param_id`] returns: a site of its layers, a head tensor it trains.
pub fn param_key(model: &(impl Adapted + ?Sized), id: ParamId) -> String {
    match id {
        ParamId::Lora { adapter, matrix } => {
            let path = model
                .module_path(adapter)
                .expect("an adapter id of this model's sites");
            format!("{path}{}", lora_suffix(matrix))
        }
        ParamId::Head(h) => {
            let module = model.head_path(h).expect("a head tensor this model trains");
            head_key(module, h)
        }
    }
}

/// The trained tensor a key (without `base_model.model.`) names, the inverse of [`param_key`];
/// an error for a key that is neither a LoRA matrix of one of the model's layer sites nor a head
/// tensor. Whether the model has that tensor is `Adapted::param_mut`'s to say.
pub fn param_id(model: &(impl Adapted + ?Sized), key: &str) -> Result<ParamId, IoError> {
    let unknown = |message: String| IoError::UnknownParam {
        key: key.into(),
        message,
    };
    let heads = HeadParam::ALL
        .into_iter()
        .filter_map(|h| Some((h, head_key(model.head_path(h)?, h))));
    let heads: Vec<(HeadParam, String)> = heads.collect();
    if let Some((h, _)) = heads.iter().find(|(_, k)| k == key) {
        return Ok(ParamId::Head(*h));
    }
    let (path, matrix) = [LoraMatrix::A, LoraMatrix::B]
        .into_iter()
        .find_map(|m| Some((key.strip_suffix(lora_suffix(m))?, m)))
        .ok_or_else(|| {
            let heads: Vec<String> = heads.iter().map(|(_, k)| format!("'{k}'")).collect();
            unknown(format!(
                "expected '<module path>.lora_A.weight', '<module path>.lora_B.weight'{}{}",
                if heads.is_empty() { "" } else { " or " },
                heads.join(", ")
            ))
        })?;
    let adapter = model.module_id(path).ok_or_else(|| {
        unknown(format!(
            "'{path}' is not the module path of a linear in this model's layers"
        ))
    })?;
    Ok(ParamId::Lora { adapter, matrix })
}

/// The `target_modules` to write: as given, except that `all-linear` becomes the module paths
/// within a layer of the linears that carry adapters (PEFT's own `all-linear` would also take
/// linears outside the layers, BERT's `pooler.dense`, which have no adapter here). Where the
/// model's modules have a second naming (transformers 5's ViT), the adapted sites' paths in it
/// are added, so that PEFT finds its targets under either.
fn peft_targets(model: &impl Adapted, lora: &LoraConfig) -> Vec<String> {
    let all_linear = lora.target_modules.iter().any(|t| t == ALL_LINEAR);
    let mut out: Vec<String> = if all_linear {
        Vec::new()
    } else {
        lora.target_modules.clone()
    };
    // `{layers path}.{index}.{site path}`: the part after the layer index.
    let site = |path: &str| {
        let parts: Vec<&str> = path.split('.').collect();
        let i = parts.iter().position(|p| p.parse::<usize>().is_ok())?;
        Some(parts[i + 1..].join("."))
    };
    for (id, (path, _)) in model.adapter_ids().into_iter().zip(model.adapters()) {
        let own = all_linear.then(|| site(&path)).flatten();
        let renamed = model.renamed_module_path(id).and_then(|p| site(&p));
        for name in [own, renamed].into_iter().flatten() {
            if !out.contains(&name) {
                out.push(name);
            }
        }
    }
    out
}

/// Writes the model's adapters (and head, as PEFT's `modules_to_save`) in PEFT's layout, each
/// file via temp + rename.
pub fn save(
    dir: &Path,
    model: &impl Adapted,
    lora: &LoraConfig,
    base_model: &str,
) -> Result<(), IoError> {
    let err = |path: &Path, e: &dyn std::fmt::Display| IoError::Invalid {
        path: path.into(),
        message: e.to_string(),
    };
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut layers = Vec::new();
    for (id, (_, ad)) in model.adapter_ids().into_iter().zip(model.adapters()) {
        let [a, b] = ParamId::lora(id).map(|p| param_key(model, p));
        tensors.insert(format!("{PREFIX}{a}"), ad.a.clone());
        tensors.insert(format!("{PREFIX}{b}"), ad.b.clone());
        // Under the second naming too: PEFT on transformers 5 loads those keys (and leaves the
        // others as unexpected), PEFT on transformers 4 the first ones.
        if let Some(renamed) = model.renamed_module_path(id) {
            let own = model.module_path(id).expect("an adapter's path");
            tensors.insert(
                format!("{PREFIX}{}", a.replacen(&own, &renamed, 1)),
                ad.a.clone(),
            );
            tensors.insert(
                format!("{PREFIX}{}", b.replacen(&own, &renamed, 1)),
                ad.b.clone(),
            );
        }
        if !layers.contains(&id.layer) {
            layers.push(id.layer);
        }
    }
    // PEFT wraps a top-level module of the task model (RoBERTa's whole `classifier`, with its
    // `dense` and `out_proj`; DistilBERT's `pre_classifier` and `classifier`).
    let mut modules_to_save: Vec<String> = Vec::new();
    for (h, t) in model.head_params() {
        let key = param_key(model, ParamId::Head(h));
        let module = key.split('.').next().unwrap_or(&key).to_string();
        if !modules_to_save.contains(&module) {
            modules_to_save.push(module);
        }
        tensors.insert(format!("{PREFIX}{key}"), t);
    }
    let all_layers = layers.len() == model.num_layers();
    let cfg = PeftConfig {
        peft_type: "LORA".into(),
        task_type: model.peft_task_type().map(Into::into),
        r: lora.r,
        lora_alpha: lora.alpha,
        lora_dropout: lora.dropout,
        target_modules: peft_targets(model, lora),
        base_model_name_or_path: Some(base_model.into()),
        bias: "none".into(),
        fan_in_fan_out: model.peft_fan_in_fan_out(),
        use_rslora: lora.use_rslora,
        modules_to_save: (!modules_to_save.is_empty()).then_some(modules_to_save),
        layers_to_transform: (!all_layers).then_some(layers),
        inference_mode: true,
        init_lora_weights: true,
    };
    let weights = dir.join(WEIGHTS_FILE);
    // A diverged run must not replace a good adapter with NaNs.
    let mut keys: Vec<&String> = tensors.keys().collect();
    keys.sort();
    for key in keys {
        if let Some(problem) = super::weight_problem(&tensors[key]) {
            return Err(IoError::Invalid {
                path: weights,
                message: format!("not written: tensor '{key}' {problem}"),
            });
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| err(dir, &e))?;
    let tmp = dir.join(format!(".{WEIGHTS_FILE}.tmp"));
    candle_core::safetensors::save(&tensors, &tmp).map_err(|e| err(&tmp, &e))?;
    std::fs::rename(&tmp, &weights).map_err(|e| err(&weights, &e))?;
    let json = serde_json::to_string_pretty(&cfg).map_err(|e| err(dir, &e))?;
    crate::files::write_atomic(&dir.join(CONFIG_FILE), json.as_bytes())
        .map_err(|e| err(dir, &e))?;
    Ok(())
}

pub fn read_config(dir: &Path) -> Result<PeftConfig, IoError> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|_| IoError::Missing {
        path: path.clone(),
        what: "PEFT adapter config".into(),
    })?;
    let cfg: PeftConfig = serde_json::from_str(&text).map_err(|e| IoError::Invalid {
        path: path.clone(),
        message: format!("not a PEFT LoRA config ({e})"),
    })?;
    if cfg.peft_type != "LORA" {
        return Err(IoError::Invalid {
            path,
            message: format!("peft_type '{}' is not supported (only LORA)", cfg.peft_type),
        });
    }
    // Checked before a model allocates `r`-row adapters or divides by `r`.
    let problem = if cfg.r == 0 || cfg.r > MAX_RANK {
        Some(format!("r = {} is out of range (1 to {MAX_RANK})", cfg.r))
    } else if !(0.0..1.0).contains(&cfg.lora_dropout) {
        Some(format!(
            "lora_dropout = {} is out of range (0 to below 1)",
            cfg.lora_dropout
        ))
    } else {
        None
    };
    match problem {
        Some(message) => Err(IoError::Invalid { path, message }),
        None => Ok(cfg),
    }
}

/// The largest LoRA rank an adapter config may name (PEFT's ranks are 1 to a few hundred).
pub const MAX_RANK: usize = 1 << 14;

/// Loads a PEFT LoRA adapter folder into `model`, replacing its adapters and head. The model
/// must have adapters on exactly the modules the file has, with the same rank.
pub fn load(dir: &Path, model: &mut impl Adapted) -> Result<PeftConfig, IoError> {
    let cfg = read_config(dir)?;
    let path = dir.join(WEIGHTS_FILE);
    if !path.exists() {
        return Err(IoError::Missing {
            path,
            what: "PEFT adapter weights".into(),
        });
    }
    let tensors =
        candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| IoError::Invalid {
            path: path.clone(),
            message: format!("not a readable safetensors file ({e})"),
        })?;
    // A LoRA key in the model's second naming (transformers 5's ViT) is read as its own.
    let tensors: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(key, t)| {
            let own = key
                .strip_prefix(PREFIX)
                .filter(|k| k.contains(".lora_"))
                .and_then(|k| param_id(model, k).ok())
                .map(|id| format!("{PREFIX}{}", param_key(model, id)));
            (own.unwrap_or(key), t)
        })
        .collect();
    let get = |name: &str, like: &Tensor| -> Result<Tensor, IoError> {
        // PEFT writes `...lora_A.weight`; older versions used `...lora_A.default.weight`.
        let t = tensors
            .get(name)
            .or_else(|| tensors.get(&name.replace(".weight", ".default.weight")))
            .ok_or_else(|| IoError::MissingTensor {
                path: path.clone(),
                name: name.into(),
                tried: format!("'{name}'"),
            })?;
        if t.dims() != like.dims() {
            return Err(IoError::WrongShape {
                path: path.clone(),
                name: name.into(),
                actual: t.dims().to_vec(),
                expected: like.dims().to_vec(),
            });
        }
        super::check_weight(&path, name, t)?;
        t.to_dtype(like.dtype())
            .and_then(|t| t.to_device(like.device()))
            .map_err(|e| IoError::Invalid {
                path: path.clone(),
                message: e.to_string(),
            })
    };
    let in_file = tensors.keys().filter(|k| k.contains(".lora_A")).count();
    let expected: Vec<(AdapterId, Tensor, Tensor)> = model
        .adapter_ids()
        .into_iter()
        .zip(model.adapters())
        .map(|(id, (_, ad))| (id, ad.a.clone(), ad.b.clone()))
        .collect();
    if in_file != expected.len() {
        return Err(IoError::Invalid {
            path: path.clone(),
            message: format!(
                "adapter has {in_file} LoRA modules, the model expects {} (target modules {:?})",
                expected.len(),
                cfg.target_modules
            ),
        });
    }
    let scaling = cfg.lora().scaling();
    for (id, a, b) in expected {
        let [ka, kb] = ParamId::lora(id).map(|p| param_key(model, p));
        let a = get(&format!("{PREFIX}{ka}"), &a)?;
        let b = get(&format!("{PREFIX}{kb}"), &b)?;
        let ad = model.adapter_by_id_mut(id).expect("listed adapter");
        ad.a = a;
        ad.b = b;
        ad.scaling = scaling;
    }
    for (h, like) in model.head_params() {
        let t = get(
            &format!("{PREFIX}{}", param_key(model, ParamId::Head(h))),
            &like,
        )?;
        *model.head_param_mut(h).expect("listed head tensor") = t;
    }
    Ok(cfg)
}

/// Reads the classifier's number of labels from an adapter file (to build a matching model);
/// `classifier` is the output layer's module path (`classifier`, RoBERTa's
/// `classifier.out_proj`).
pub fn num_labels(dir: &Path, classifier: &str) -> Result<usize, IoError> {
    let path = dir.join(WEIGHTS_FILE);
    let t = candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| IoError::Invalid {
        path: path.clone(),
        message: format!("not a readable safetensors file ({e})"),
    })?;
    let name = format!(
        "{PREFIX}{}",
        head_key(classifier, HeadParam::ClassifierWeight)
    );
    let w = t.get(&name).ok_or_else(|| IoError::MissingTensor {
        path: path.clone(),
        name: name.clone(),
        tried: "the classifier saved as modules_to_save".into(),
    })?;
    match w.dims() {
        // A `[n, 0]` tensor holds no bytes, so its `n` would be a size the file does not back.
        &[labels, hidden] if labels > 0 && hidden > 0 => Ok(labels),
        dims => Err(IoError::Invalid {
            path,
            message: format!("tensor '{name}' has shape {dims:?}, expected [num_labels, hidden]"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llama::LlamaForCausalLM;
    use crate::model::{BertConfig, BertForSequenceClassification, Gpt2Config, Gpt2LMHeadModel};
    use crate::model::{CausalLm, Decoder, LlamaConfig};
    use candle_core::DType;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn lora(targets: &[&str]) -> LoraConfig {
        LoraConfig {
            r: 2,
            target_modules: targets.iter().map(|t| t.to_string()).collect(),
            ..Default::default()
        }
    }

    /// Every trained tensor's key, and each key read back to the same id.
    fn round_trip(model: &impl Adapted) -> Vec<String> {
        let ids: Vec<ParamId> = model
            .trainable_params()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert!(!ids.is_empty());
        ids.into_iter()
            .map(|id| {
                let key = param_key(model, id);
                assert_eq!(param_id(model, &key).unwrap(), id, "{key}");
                key
            })
            .collect()
    }

    /// `all-linear` puts an adapter on each of a layer's six linears, and the written config
    /// names them by their paths in the layer (so PEFT does not also adapt `pooler.dense`).
    #[test]
    fn all_linear_is_written_as_the_adapted_paths() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut bert = BertForSequenceClassification::random(
            BertConfig::tiny(0.0),
            2,
            DType::F32,
            &Device::Cpu,
            &mut rng,
        )
        .unwrap();
        let cfg = lora(&["all-linear"]);
        assert_eq!(bert.add_lora(&cfg, None, &mut rng).unwrap(), 3 * 6);
        let written = peft_targets(&bert, &cfg);
        let want: Vec<&str> = crate::model::bert::Site::ALL
            .iter()
            .map(|s| s.path())
            .collect();
        assert_eq!(written, want);
        assert!(!written
            .iter()
            .any(|t| crate::adapters::target_matches("pooler.dense", t)));
        assert_eq!(peft_targets(&bert, &lora(&["query"])), ["query"]);
    }

    /// BERT, LLaMA and GPT-2: a parameter's key is PEFT's name without `base_model.model.`, and
    /// reads back to the same parameter; an unknown key is an error naming it.
    #[test]
    fn param_ids_round_trip_through_their_keys() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut bert = BertForSequenceClassification::random(
            BertConfig::tiny(0.0),
            2,
            DType::F32,
            &Device::Cpu,
            &mut rng,
        )
        .unwrap();
        bert.add_lora(&lora(&["query", "value"]), None, &mut rng)
            .unwrap();
        let keys = round_trip(&bert);
        assert_eq!(
            keys[0],
            "bert.encoder.layer.0.attention.self.query.lora_A.weight"
        );
        assert_eq!(
            keys[1],
            "bert.encoder.layer.0.attention.self.query.lora_B.weight"
        );
        assert_eq!(
            keys[2],
            "bert.encoder.layer.0.attention.self.value.lora_A.weight"
        );
        assert_eq!(
            keys[keys.len() - 2..],
            ["classifier.weight", "classifier.bias"]
        );

        let cfg: LlamaConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 20, "hidden_size": 8, "intermediate_size": 12,
            "num_hidden_layers": 2, "num_attention_heads": 2
        }))
        .unwrap();
        let mut llama: Decoder = LlamaForCausalLM::random(cfg, DType::F32, &Device::Cpu, &mut rng)
            .unwrap()
            .into();
        CausalLm::add_lora(&mut llama, &lora(&["q_proj", "down_proj"]), None, &mut rng).unwrap();
        let keys = round_trip(&llama);
        assert_eq!(keys.len(), 8);
        assert_eq!(keys[0], "model.layers.0.self_attn.q_proj.lora_A.weight");
        assert_eq!(keys[7], "model.layers.1.mlp.down_proj.lora_B.weight");

        let cfg: Gpt2Config = serde_json::from_value(serde_json::json!({
            "vocab_size": 20, "n_positions": 8, "n_embd": 8, "n_layer": 2, "n_head": 2
        }))
        .unwrap();
        let mut gpt2: Decoder = Gpt2LMHeadModel::random(cfg, DType::F32, &Device::Cpu, &mut rng)
            .unwrap()
            .into();
        CausalLm::add_lora(&mut gpt2, &lora(&["c_proj"]), None, &mut rng).unwrap();
        let keys = round_trip(&gpt2);
        assert_eq!(
            keys[..4],
            [
                "transformer.h.0.attn.c_proj.lora_A.weight",
                "transformer.h.0.attn.c_proj.lora_B.weight",
                "transformer.h.0.mlp.c_proj.lora_A.weight",
                "transformer.h.0.mlp.c_proj.lora_B.weight",
            ]
        );

        for (model, key) in [
            (
                &llama as &dyn Adapted,
                "model.layers.0.self_attn.q_proj.lora_C.weight",
            ),
            (&llama, "model.layers.0.self_attn.q_proj.weight"),
            (&llama, "transformer.h.0.attn.c_proj.lora_A.weight"),
            (&llama, "model.layers.x.self_attn.q_proj.lora_A.weight"),
            (&gpt2, "transformer.h.0.attn.q_proj.lora_A.weight"),
            (&bert, "classifier.gamma"),
        ] {
            let e = param_id(model, key).unwrap_err().to_string();
            assert!(
                e.contains(&format!("tensor key '{key}' names no trained tensor")),
                "{e}"
            );
        }
    }

    fn write_classifier(dir: &Path, w: Tensor) {
        let t = HashMap::from([(format!("{PREFIX}classifier.weight"), w)]);
        candle_core::safetensors::save(&t, dir.join(WEIGHTS_FILE)).unwrap();
    }

    #[test]
    fn num_labels_reads_the_classifier_and_refuses_other_ranks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(WEIGHTS_FILE);
        write_classifier(
            dir.path(),
            Tensor::zeros((5, 8), DType::F32, &Device::Cpu).unwrap(),
        );
        assert_eq!(num_labels(dir.path(), "classifier").unwrap(), 5);
        for bad in [
            Tensor::new(1f32, &Device::Cpu).unwrap(),
            Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
            Tensor::zeros((1 << 40, 0), DType::F32, &Device::Cpu).unwrap(),
            Tensor::zeros((0, 8), DType::F32, &Device::Cpu).unwrap(),
        ] {
            let dims = bad.dims().to_vec();
            write_classifier(dir.path(), bad);
            let e = num_labels(dir.path(), "classifier")
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(&path.display().to_string()), "{e}");
            assert!(
                e.contains(&format!(
                    "tensor 'base_model.model.classifier.weight' has shape {dims:?}"
                )),
                "{e}"
            );
        }
    }

    /// Settings a model would allocate or divide by are range-checked when the config is read,
    /// and the error names the file and the key.
    #[test]
    fn config_numbers_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let write = |r: &str, alpha: &str, dropout: &str| {
            let text = format!(
                r#"{{"peft_type": "LORA", "task_type": null, "r": {r}, "lora_alpha": {alpha},
                "lora_dropout": {dropout}, "target_modules": ["query"],
                "base_model_name_or_path": null, "bias": "none", "fan_in_fan_out": false,
                "use_rslora": false, "modules_to_save": null}}"#
            );
            std::fs::write(dir.path().join(CONFIG_FILE), text).unwrap();
        };
        write("4", "8.0", "0.1");
        assert_eq!(read_config(dir.path()).unwrap().r, 4);
        for (r, alpha, dropout, expected) in [
            ("0", "8.0", "0.1", "r = 0 is out of range"),
            (
                "1099511627776",
                "8.0",
                "0.1",
                "r = 1099511627776 is out of range",
            ),
            ("4", "8.0", "1.0", "lora_dropout = 1 is out of range"),
            ("4", "8.0", "-0.5", "lora_dropout"),
        ] {
            write(r, alpha, dropout);
            let e = read_config(dir.path()).unwrap_err().to_string();
            assert!(
                e.starts_with(&dir.path().join(CONFIG_FILE).display().to_string())
                    && e.contains(expected),
                "{r} {alpha} {dropout}: {e}"
            );
        }
    }
}
