//! Hugging Face PEFT's LoRA adapter format: `adapter_config.json` + `adapter_model.safetensors` with
//! keys `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` and the classifier saved as
//! PEFT saves `modules_to_save` (`base_model.model.classifier.weight`/`.bias`).

use super::IoError;
use crate::adapters::LoraConfig;
use crate::model::bert::{BertForSequenceClassification, Site};
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

fn key(layer: usize, site: Site, which: &str) -> String {
    format!(
        "{PREFIX}bert.encoder.layer.{layer}.{}.lora_{which}.weight",
        site.path()
    )
}

/// Writes the model's adapters and classifier in PEFT's layout (each file via temp + rename).
pub fn save(
    dir: &Path,
    model: &BertForSequenceClassification,
    lora: &LoraConfig,
    base_model: &str,
) -> Result<(), IoError> {
    let err = |path: &Path, e: &dyn std::fmt::Display| IoError::Invalid {
        path: path.into(),
        message: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|e| err(dir, &e))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut layers = Vec::new();
    for (layer, site) in model.adapter_sites() {
        let ad = model.adapter(layer, site).expect("listed adapter");
        tensors.insert(key(layer, site, "A"), ad.a.clone());
        tensors.insert(key(layer, site, "B"), ad.b.clone());
        if !layers.contains(&layer) {
            layers.push(layer);
        }
    }
    let head = &model.head.classifier;
    tensors.insert(format!("{PREFIX}classifier.weight"), head.weight.clone());
    if let Some(b) = &head.bias {
        tensors.insert(format!("{PREFIX}classifier.bias"), b.clone());
    }
    let all_layers = layers.len() == model.layers.len();
    let cfg = PeftConfig {
        peft_type: "LORA".into(),
        task_type: Some("SEQ_CLS".into()),
        r: lora.r,
        lora_alpha: lora.alpha,
        lora_dropout: lora.dropout,
        target_modules: lora.target_modules.clone(),
        base_model_name_or_path: Some(base_model.into()),
        bias: "none".into(),
        fan_in_fan_out: false,
        use_rslora: lora.use_rslora,
        modules_to_save: Some(vec!["classifier".into()]),
        layers_to_transform: (!all_layers).then_some(layers),
        inference_mode: true,
        init_lora_weights: true,
    };
    let weights = dir.join(WEIGHTS_FILE);
    let tmp = dir.join(format!(".{WEIGHTS_FILE}.tmp"));
    candle_core::safetensors::save(&tensors, &tmp).map_err(|e| err(&tmp, &e))?;
    std::fs::rename(&tmp, &weights).map_err(|e| err(&weights, &e))?;
    let json = serde_json::to_string_pretty(&cfg).map_err(|e| err(dir, &e))?;
    crate::train::checkpoint::write_atomic(&dir.join(CONFIG_FILE), json.as_bytes())
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
    Ok(cfg)
}

/// Loads a PEFT LoRA adapter folder into `model`, replacing its adapters and classifier. The model
/// must have adapters on exactly the modules the file has, with the same rank.
pub fn load(dir: &Path, model: &mut BertForSequenceClassification) -> Result<PeftConfig, IoError> {
    let cfg = read_config(dir)?;
    let path = dir.join(WEIGHTS_FILE);
    if !path.exists() {
        return Err(IoError::Missing {
            path,
            what: "PEFT adapter weights".into(),
        });
    }
    let dtype = model.head.classifier.weight.dtype();
    let tensors =
        candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| IoError::Invalid {
            path: path.clone(),
            message: format!("not a readable safetensors file ({e})"),
        })?;
    let get = |name: &str, shape: &[usize]| -> Result<Tensor, IoError> {
        // PEFT writes `...lora_A.weight`; older versions used `...lora_A.default.weight`.
        let t = tensors
            .get(name)
            .or_else(|| tensors.get(&name.replace(".weight", ".default.weight")))
            .ok_or_else(|| IoError::MissingTensor {
                path: path.clone(),
                name: name.into(),
                tried: format!("'{name}'"),
            })?;
        if t.dims() != shape {
            return Err(IoError::WrongShape {
                path: path.clone(),
                name: name.into(),
                actual: t.dims().to_vec(),
                expected: shape.to_vec(),
            });
        }
        t.to_dtype(dtype).map_err(|e| IoError::Invalid {
            path: path.clone(),
            message: e.to_string(),
        })
    };
    let in_file = tensors.keys().filter(|k| k.contains(".lora_A")).count();
    let sites = model.adapter_sites();
    if in_file != sites.len() {
        return Err(IoError::Invalid {
            path: path.clone(),
            message: format!(
                "adapter has {in_file} LoRA modules, the model expects {} (target modules {:?})",
                sites.len(),
                cfg.target_modules
            ),
        });
    }
    for (layer, site) in sites {
        let lin = &model.layers[layer].linears[site as usize];
        let (o, i) = (lin.base.out_features(), lin.base.in_features());
        let r = lin
            .lora
            .as_ref()
            .map(|l| l.a.dim(0).unwrap_or(0))
            .unwrap_or(0);
        let a = get(&key(layer, site, "A"), &[r, i])?;
        let b = get(&key(layer, site, "B"), &[o, r])?;
        let ad = model.adapter_mut(layer, site).expect("listed adapter");
        ad.a = a;
        ad.b = b;
        ad.scaling = cfg.lora().scaling();
    }
    let head = &mut model.head.classifier;
    let (k, h) = (head.out_features(), head.in_features());
    head.weight = get(&format!("{PREFIX}classifier.weight"), &[k, h])?;
    head.bias = Some(get(&format!("{PREFIX}classifier.bias"), &[k])?);
    Ok(cfg)
}

/// Reads the classifier's number of labels from an adapter file (to build a matching model).
pub fn num_labels(dir: &Path) -> Result<usize, IoError> {
    let path = dir.join(WEIGHTS_FILE);
    let t = candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| IoError::Invalid {
        path: path.clone(),
        message: format!("not a readable safetensors file ({e})"),
    })?;
    let w = t
        .get(&format!("{PREFIX}classifier.weight"))
        .ok_or_else(|| IoError::MissingTensor {
            path: path.clone(),
            name: format!("{PREFIX}classifier.weight"),
            tried: "the classifier saved as modules_to_save".into(),
        })?;
    Ok(w.dims()[0])
}
