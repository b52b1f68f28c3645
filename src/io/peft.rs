//! Hugging Face PEFT's LoRA adapter format: `adapter_config.json` + `adapter_model.safetensors` with
//! keys `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` and the classifier saved as
//! PEFT saves `modules_to_save` (`base_model.model.classifier.weight`/`.bias`).

use super::IoError;
use crate::adapters::Adapted;
use crate::adapters::LoraConfig;
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

/// The transformer layer an adapter's module path sits in (`...layer.3...`, `...layers.3...`).
fn layer_of(path: &str) -> Option<usize> {
    let parts: Vec<&str> = path.split('.').collect();
    parts
        .windows(2)
        .find(|w| w[0] == "layer" || w[0] == "layers" || w[0] == "h")
        .and_then(|w| w[1].parse().ok())
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
    std::fs::create_dir_all(dir).map_err(|e| err(dir, &e))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut layers = Vec::new();
    for (path, ad) in model.adapters() {
        tensors.insert(format!("{PREFIX}{path}.lora_A.weight"), ad.a.clone());
        tensors.insert(format!("{PREFIX}{path}.lora_B.weight"), ad.b.clone());
        if let Some(l) = layer_of(&path).filter(|l| !layers.contains(l)) {
            layers.push(l);
        }
    }
    let mut modules_to_save: Vec<String> = Vec::new();
    for (key, t) in model.head_params() {
        let module = key
            .rsplit_once('.')
            .map(|(m, _)| m)
            .unwrap_or(&key)
            .to_string();
        if !modules_to_save.contains(&module) {
            modules_to_save.push(module);
        }
        tensors.insert(format!("{PREFIX}{key}"), t);
    }
    let all_layers = layers.len() == model.num_layers();
    let cfg = PeftConfig {
        peft_type: "LORA".into(),
        task_type: Some(model.peft_task_type().into()),
        r: lora.r,
        lora_alpha: lora.alpha,
        lora_dropout: lora.dropout,
        target_modules: lora.target_modules.clone(),
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
    Ok(cfg)
}

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
        t.to_dtype(like.dtype())
            .and_then(|t| t.to_device(like.device()))
            .map_err(|e| IoError::Invalid {
                path: path.clone(),
                message: e.to_string(),
            })
    };
    let in_file = tensors.keys().filter(|k| k.contains(".lora_A")).count();
    let expected: Vec<(String, Tensor, Tensor)> = model
        .adapters()
        .into_iter()
        .map(|(p, ad)| (p, ad.a.clone(), ad.b.clone()))
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
    for (stem, a, b) in expected {
        let a = get(&format!("{PREFIX}{stem}.lora_A.weight"), &a)?;
        let b = get(&format!("{PREFIX}{stem}.lora_B.weight"), &b)?;
        let ad = model.adapter_by_path_mut(&stem).expect("listed adapter");
        ad.a = a;
        ad.b = b;
        ad.scaling = scaling;
    }
    for (key, like) in model.head_params() {
        let t = get(&format!("{PREFIX}{key}"), &like)?;
        *model.head_param_mut(&key).expect("listed head tensor") = t;
    }
    Ok(cfg)
}

/// Reads the classifier's number of labels from an adapter file (to build a matching model).
pub fn num_labels(dir: &Path) -> Result<usize, IoError> {
    let path = dir.join(WEIGHTS_FILE);
    let t = candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| IoError::Invalid {
        path: path.clone(),
        message: format!("not a readable safetensors file ({e})"),
    })?;
    let name = format!("{PREFIX}classifier.weight");
    let w = t.get(&name).ok_or_else(|| IoError::MissingTensor {
        path: path.clone(),
        name: name.clone(),
        tried: "the classifier saved as modules_to_save".into(),
    })?;
    match w.dims() {
        &[labels, _] => Ok(labels),
        dims => Err(IoError::Invalid {
            path,
            message: format!("tensor '{name}' has shape {dims:?}, expected [num_labels, hidden]"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

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
        assert_eq!(num_labels(dir.path()).unwrap(), 5);
        for bad in [
            Tensor::new(1f32, &Device::Cpu).unwrap(),
            Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
        ] {
            let dims = bad.dims().to_vec();
            write_classifier(dir.path(), bad);
            let e = num_labels(dir.path()).unwrap_err().to_string();
            assert!(e.starts_with(&path.display().to_string()), "{e}");
            assert!(
                e.contains(&format!(
                    "tensor 'base_model.model.classifier.weight' has shape {dims:?}"
                )),
                "{e}"
            );
        }
    }
}
