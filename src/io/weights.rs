//! Reading checkpoint tensors by walking Hugging Face names (as candle-nn's `VarBuilder` does):
//! `weights.pp("encoder").pp("layer").pp(0).get("attention.self.query.weight", shape)`.
//!
//! A checkpoint may store names with or without the model prefix (`bert.` for BERT): `Weights`
//! tries each accepted prefix, so both layouts load. Every failure names the file, the tensor and the
//! expected shape.

use super::IoError;
use crate::nn::linear::Weight;
use candle_core::quantized::QTensor;
use candle_core::{safetensors::MmapedSafetensors, DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where tensors come from: a memory-mapped file, or tensors made in memory (random-weight models
/// for benchmarks and tests).
enum Store {
    File(MmapedSafetensors),
    Memory(HashMap<String, Tensor>),
}

impl Store {
    fn has(&self, key: &str) -> bool {
        match self {
            Store::File(st) => st.get(key).is_ok(),
            Store::Memory(m) => m.contains_key(key),
        }
    }

    fn load(&self, key: &str, device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Store::File(st) => st.load(key, device),
            Store::Memory(m) => m[key].to_device(device),
        }
    }
}

#[derive(Clone)]
pub struct Weights {
    file: Arc<(PathBuf, Store)>,
    /// Weights kept quantized (GGUF), by full name; served by [`Weights::linear_weight`].
    quantized: Arc<HashMap<String, Arc<QTensor>>>,
    prefixes: Arc<Vec<String>>,
    path: String,
    dtype: DType,
    device: Device,
}

impl Weights {
    /// Opens (memory-maps) a safetensors file. `prefixes` are tried in order before each name,
    /// e.g. `["bert.", ""]`.
    pub fn open(
        path: &Path,
        prefixes: &[&str],
        dtype: DType,
        device: &Device,
    ) -> Result<Self, IoError> {
        if !path.exists() {
            return Err(IoError::Missing {
                path: path.into(),
                what: "model weights in safetensors format".into(),
            });
        }
        // SAFETY: the file is mapped read-only; we do not expect it to change while we train.
        let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| IoError::Invalid {
            path: path.into(),
            message: format!("not a readable safetensors file ({e})"),
        })?;
        Ok(Self {
            file: Arc::new((path.into(), Store::File(st))),
            quantized: Arc::default(),
            prefixes: Arc::new(prefixes.iter().map(|s| s.to_string()).collect()),
            path: String::new(),
            dtype,
            device: device.clone(),
        })
    }

    /// Weights held in memory under their checkpoint names (no prefix).
    pub fn from_tensors(tensors: HashMap<String, Tensor>, dtype: DType, device: &Device) -> Self {
        Self {
            file: Arc::new((PathBuf::from("<memory>"), Store::Memory(tensors))),
            quantized: Arc::default(),
            prefixes: Arc::new(vec![String::new()]),
            path: String::new(),
            dtype,
            device: device.clone(),
        }
    }

    /// Adds weights kept quantized, by full name (see [`Weights::linear_weight`]).
    pub fn with_quantized(mut self, quantized: HashMap<String, Arc<QTensor>>) -> Self {
        self.quantized = Arc::new(quantized);
        self
    }

    /// A linear layer's frozen weight: quantized if it was kept so, else loaded like [`get`](Self::get).
    pub fn linear_weight(&self, name: &str, shape: &[usize]) -> Result<Weight, IoError> {
        let full = self.full_name(name);
        for p in self.prefixes.iter() {
            let key = format!("{p}{full}");
            if let Some(q) = self.quantized.get(&key) {
                if q.shape().dims() != shape {
                    return Err(IoError::WrongShape {
                        path: self.file.0.clone(),
                        name: key,
                        actual: q.shape().dims().to_vec(),
                        expected: shape.to_vec(),
                    });
                }
                return Ok(Weight::Quantized {
                    q: q.clone(),
                    dtype: self.dtype,
                });
            }
        }
        self.get(name, shape).map(Weight::Dense)
    }

    /// A view one level down the name hierarchy.
    pub fn pp(&self, part: impl std::fmt::Display) -> Self {
        let mut w = self.clone();
        w.path = if self.path.is_empty() {
            part.to_string()
        } else {
            format!("{}.{part}", self.path)
        };
        w
    }

    pub fn file(&self) -> &Path {
        &self.file.0
    }

    fn full_name(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.path)
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        let full = self.full_name(name);
        self.prefixes
            .iter()
            .any(|p| self.file.1.has(&format!("{p}{full}")))
    }

    /// Loads a tensor, checks its shape, converts it to the model dtype and device.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor, IoError> {
        let full = self.full_name(name);
        let (path, st) = &*self.file;
        for p in self.prefixes.iter() {
            let key = format!("{p}{full}");
            if !st.has(&key) {
                continue;
            }
            let t = st.load(&key, &self.device).map_err(|e| IoError::Invalid {
                path: path.clone(),
                message: format!("tensor '{key}' cannot be read ({e})"),
            })?;
            if t.dims() != shape {
                return Err(IoError::WrongShape {
                    path: path.clone(),
                    name: key,
                    actual: t.dims().to_vec(),
                    expected: shape.to_vec(),
                });
            }
            return t.to_dtype(self.dtype).map_err(|e| IoError::Invalid {
                path: path.clone(),
                message: format!("tensor '{key}': {e}"),
            });
        }
        let tried = self
            .prefixes
            .iter()
            .map(|p| format!("'{p}{full}'"))
            .collect::<Vec<_>>()
            .join(", ");
        Err(IoError::MissingTensor {
            path: path.clone(),
            name: full,
            tried,
        })
    }
}
