//! Reading checkpoint tensors by walking Hugging Face names (as candle-nn's `VarBuilder` does):
//! `weights.pp("encoder").pp("layer").pp(0).get("attention.self.query.weight", shape)`.
//!
//! A checkpoint may store names with or without the model prefix (`bert.` for BERT): `Weights`
//! tries each accepted prefix, so both layouts load. Every failure names the file, the tensor and the
//! expected shape.

use super::IoError;
use crate::nn::linear::{QuantFormat, Weight};
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

/// A model folder's weights in one file.
pub const SINGLE_FILE: &str = "model.safetensors";
/// A sharded checkpoint's index: `{"weight_map": {tensor name: shard file name}}`.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Whether a folder holds Hugging Face safetensors weights, in one file or sharded.
pub fn has_weights(dir: &Path) -> bool {
    dir.join(SINGLE_FILE).exists() || dir.join(INDEX_FILE).exists()
}

/// The shard files a `model.safetensors.index.json` routes tensors to, each once, in name order;
/// every one must exist beside the index.
pub(crate) fn shard_files(index: &Path) -> Result<Vec<PathBuf>, IoError> {
    let bad = |message: String| IoError::Invalid {
        path: index.into(),
        message,
    };
    let text = std::fs::read_to_string(index).map_err(|e| bad(format!("cannot be read ({e})")))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not JSON ({e})")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no \"weight_map\" object (tensor name -> shard file)".into()))?;
    let mut names = std::collections::BTreeSet::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("weight_map entry '{tensor}' is not a file name")))?;
        // A shard lives beside the index: no paths.
        if file.is_empty() || file.contains('/') || file.contains('\\') || file == ".." {
            return Err(bad(format!(
                "weight_map entry '{tensor}' names '{file}', not a file in this folder"
            )));
        }
        names.insert(file.to_string());
    }
    if names.is_empty() {
        return Err(bad("weight_map is empty".into()));
    }
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut shards = Vec::with_capacity(names.len());
    for n in names {
        let p = dir.join(&n);
        if !p.exists() {
            return Err(IoError::Missing {
                path: p,
                what: format!("a weight shard listed in {}", index.display()),
            });
        }
        shards.push(p);
    }
    Ok(shards)
}

#[derive(Clone)]
pub struct Weights {
    file: Arc<(PathBuf, Store)>,
    /// Weights kept quantized (GGUF), by full name; served by [`Weights::linear_weight`].
    quantized: Arc<HashMap<String, Arc<QTensor>>>,
    /// Quantize float linear weights into this format as they load (a frozen base from a
    /// safetensors checkpoint that never needs a full-precision copy).
    quantize_on_load: Option<QuantFormat>,
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
        Ok(Self::new(
            path.into(),
            Store::File(st),
            prefixes,
            dtype,
            device,
        ))
    }

    /// Opens a Hugging Face model folder's weights: `model.safetensors`, or the shards that
    /// `model.safetensors.index.json` lists (what `save_pretrained` writes for models over its shard
    /// size, e.g. every 7B checkpoint). Shards are memory-mapped; a tensor is read from the one the
    /// index routes it to.
    pub fn open_dir(
        dir: &Path,
        prefixes: &[&str],
        dtype: DType,
        device: &Device,
    ) -> Result<Self, IoError> {
        let single = dir.join(SINGLE_FILE);
        let index = dir.join(INDEX_FILE);
        if !single.exists() && !index.exists() {
            return Err(IoError::Missing {
                path: single,
                what: format!("model weights: {SINGLE_FILE}, or {INDEX_FILE} and its shards"),
            });
        }
        if single.exists() {
            return Self::open(&single, prefixes, dtype, device);
        }
        let shards = shard_files(&index)?;
        // SAFETY: as in `open`, read-only maps of files we do not expect to change.
        let st = unsafe { MmapedSafetensors::multi(&shards) }.map_err(|e| IoError::Invalid {
            path: index.clone(),
            message: format!("a shard it lists is not a readable safetensors file ({e})"),
        })?;
        Ok(Self::new(index, Store::File(st), prefixes, dtype, device))
    }

    /// Weights held in memory under their checkpoint names (no prefix).
    pub fn from_tensors(tensors: HashMap<String, Tensor>, dtype: DType, device: &Device) -> Self {
        let store = Store::Memory(tensors);
        Self::new(PathBuf::from("<memory>"), store, &[""], dtype, device)
    }

    fn new(file: PathBuf, store: Store, prefixes: &[&str], dtype: DType, device: &Device) -> Self {
        Self {
            file: Arc::new((file, store)),
            quantized: Arc::default(),
            quantize_on_load: None,
            prefixes: Arc::new(prefixes.iter().map(|s| s.to_string()).collect()),
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

    /// Linear weights read after this are quantized into `format` as they load, one tensor at a
    /// time (see [`Weights::linear_weight`]).
    pub fn quantize_on_load(mut self, format: QuantFormat) -> Self {
        self.quantize_on_load = Some(format);
        self
    }

    /// A linear layer's frozen weight: quantized if it was kept so or is quantized on load, else
    /// loaded like [`get`](Self::get).
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
        let Some(format) = self.quantize_on_load else {
            return self.get(name, shape).map(Weight::Dense);
        };
        let fail = |message: String| IoError::Invalid {
            path: self.file.0.clone(),
            message: format!("tensor '{full}': cannot be quantized to {format:?} ({message})"),
        };
        // Quantized on the host from f32 (the dense copy lives only for this call), then the
        // blocks go to the device.
        let dense = self.get_as(name, shape, DType::F32, &Device::Cpu)?;
        let q = format
            .quantize(&dense, &self.device)
            .map_err(|e| fail(e.to_string()))?;
        Ok(Weight::Quantized {
            q: Arc::new(q),
            dtype: self.dtype,
        })
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
        self.get_as(name, shape, self.dtype, &self.device)
    }

    fn get_as(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor, IoError> {
        let full = self.full_name(name);
        let (path, st) = &*self.file;
        for p in self.prefixes.iter() {
            let key = format!("{p}{full}");
            if !st.has(&key) {
                continue;
            }
            let t = st.load(&key, device).map_err(|e| IoError::Invalid {
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
            super::check_weight(path, &key, &t)?;
            return t.to_dtype(dtype).map_err(|e| IoError::Invalid {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    /// A sharded folder serves each tensor from the shard its index names, under every accepted
    /// prefix, exactly as the same tensors in one file; one file wins over an index.
    #[test]
    fn sharded_folder_reads_like_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = t(&[1.0, 2.0, 3.0, 4.0], &[2, 2]);
        let b = t(&[5.0, 6.0], &[2]);
        let c = t(&[7.0, 8.0, 9.0], &[3]);
        let shard = |name: &str, ts: &[(&str, &Tensor)]| {
            let map: HashMap<String, Tensor> = ts
                .iter()
                .map(|(k, v)| (k.to_string(), (*v).clone()))
                .collect();
            candle_core::safetensors::save(&map, dir.path().join(name)).unwrap();
        };
        shard(
            "model-00001-of-00002.safetensors",
            &[("bert.x.a", &a), ("bert.x.b", &b)],
        );
        shard("model-00002-of-00002.safetensors", &[("y.c", &c)]);
        let index = serde_json::json!({"metadata": {"total_size": 36}, "weight_map": {
            "bert.x.a": "model-00001-of-00002.safetensors",
            "bert.x.b": "model-00001-of-00002.safetensors",
            "y.c": "model-00002-of-00002.safetensors"}});
        std::fs::write(dir.path().join(INDEX_FILE), index.to_string()).unwrap();
        assert!(has_weights(dir.path()));

        let w = Weights::open_dir(dir.path(), &["bert.", ""], DType::F32, &Device::Cpu).unwrap();
        let same = |x: &Tensor, y: &Tensor| {
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                == y.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        assert!(same(&w.pp("x").get("a", &[2, 2]).unwrap(), &a));
        assert!(same(&w.pp("x").get("b", &[2]).unwrap(), &b));
        assert!(same(&w.pp("y").get("c", &[3]).unwrap(), &c));
        assert!(w.file().ends_with(INDEX_FILE));
        let e = w.get("x.a", &[4]).unwrap_err().to_string();
        assert!(e.contains(INDEX_FILE) && e.contains("[2, 2]"), "{e}");

        // A single file beside the index is what loads (transformers' order too).
        shard(SINGLE_FILE, &[("y.c", &b)]);
        let w = Weights::open_dir(dir.path(), &[""], DType::F32, &Device::Cpu).unwrap();
        assert!(same(&w.get("y.c", &[2]).unwrap(), &b));
    }

    /// A broken index is reported against the index file, saying what is wrong.
    #[test]
    fn bad_index_is_named() {
        let cases = [
            ("{", "not JSON"),
            (r#"{"metadata": {}}"#, "weight_map"),
            (
                r#"{"weight_map": {"a": "../x.safetensors"}}"#,
                "not a file in this folder",
            ),
            (r#"{"weight_map": {}}"#, "weight_map is empty"),
        ];
        for (text, expected) in cases {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join(INDEX_FILE), text).unwrap();
            let e = match Weights::open_dir(dir.path(), &[""], DType::F32, &Device::Cpu) {
                Ok(_) => panic!("{text} loaded"),
                Err(e) => e.to_string(),
            };
            assert!(
                e.contains(INDEX_FILE) && e.contains(expected),
                "{text}: {e}"
            );
        }
        // Neither form: the single file is what is missing.
        let dir = tempfile::tempdir().unwrap();
        let e = match Weights::open_dir(dir.path(), &[""], DType::F32, &Device::Cpu) {
            Ok(_) => panic!("an empty folder loaded"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(SINGLE_FILE) && e.contains("not found"), "{e}");
    }
}
