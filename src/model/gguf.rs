//! LLaMA-layout checkpoints (`llama`, `qwen2`) from llama.cpp's GGUF files, returned under
//! Hugging Face tensor names and row order, so one model implementation serves GGUF and
//! Hugging Face folders.
//!
//! GGUF tensors are dequantized on load (or kept in their blocks, see [`load_llama_opts`]):
//! training runs in float, and the adapters are what is learned. For `llama`, llama.cpp's
//! converter reorders the rows of the Q and K projections so that its rotary kernel can rotate
//! adjacent pairs; we undo that here, because the model rotates HF-style (`rotate_half`, pairs
//! `i` and `i + head_dim / 2`). `qwen2` files keep HF's order (llama.cpp rotates them NeoX-style).

use super::gguf_tokenizer::tokenizer_from_metadata;
use crate::io::IoError;
use crate::model::llama::{LlamaConfig, RopeScaling};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;
use tokenizers::Tokenizer;

/// A LLaMA checkpoint ready for the model: config, tensors under Hugging Face names (Q/K rows in
/// HF order; no `lm_head.weight` when the head is tied), tokenizer, chat template if the file
/// has one. Made by [`load_llama`] / [`load_llama_opts`]; a Hugging Face folder loads through
/// `LlamaForCausalLM::load_hf` instead.
pub struct GgufLlama {
    pub config: LlamaConfig,
    pub tensors: HashMap<String, Tensor>,
    /// Projection weights kept in their GGUF blocks (see [`load_llama_opts`]); not in `tensors`.
    pub quantized: HashMap<String, Arc<QTensor>>,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<String>,
}

impl std::fmt::Debug for GgufLlama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufLlama")
            .field("config", &self.config)
            .field("tensors", &self.tensors.len())
            .field("quantized", &self.quantized.len())
            .field("vocab", &self.tokenizer.get_vocab_size(true))
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

pub(crate) fn invalid(path: &Path, message: impl Into<String>) -> IoError {
    IoError::Invalid {
        path: path.into(),
        message: message.into(),
    }
}

/// The GGUF architectures that load as a LLaMA-layout model, with what differs between them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufArch {
    Llama,
    /// Qwen2 / Qwen2.5: biases on the q, k and v projections; rows in HF order.
    Qwen2,
}

impl GgufArch {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(GgufArch::Llama),
            "qwen2" => Some(GgufArch::Qwen2),
            _ => None,
        }
    }

    /// The prefix of the architecture's metadata keys (`qwen2.block_count`).
    fn key(self) -> &'static str {
        match self {
            GgufArch::Llama => "llama",
            GgufArch::Qwen2 => "qwen2",
        }
    }

    /// Whether llama.cpp's converter permuted the Q and K rows (see [`unpermute_qk`]).
    fn permuted_qk(self) -> bool {
        self == GgufArch::Llama
    }

    fn qkv_bias(self) -> bool {
        self == GgufArch::Qwen2
    }
}

/// Every tensor a LLaMA checkpoint must hold, with its shape, under Hugging Face names.
pub fn expected_shapes(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    expected_shapes_for(cfg, GgufArch::Llama)
}

/// [`expected_shapes`] of an architecture: Qwen2 adds the q/k/v biases.
pub fn expected_shapes_for(cfg: &LlamaConfig, arch: GgufArch) -> Vec<(String, Vec<usize>)> {
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let q = cfg.num_attention_heads * cfg.head_dim();
    let kv = cfg.kv_heads() * cfg.head_dim();
    let mut out = vec![
        ("model.embed_tokens.weight".to_string(), vec![v, h]),
        ("model.norm.weight".to_string(), vec![h]),
    ];
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".into(), vec![v, h]));
    }
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (name, shape) in [
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
            ("self_attn.q_proj.weight", vec![q, h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.o_proj.weight", vec![h, q]),
            ("mlp.gate_proj.weight", vec![i, h]),
            ("mlp.up_proj.weight", vec![i, h]),
            ("mlp.down_proj.weight", vec![h, i]),
        ] {
            out.push((format!("{p}.{name}"), shape));
        }
        if arch.qkv_bias() {
            for (name, n) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
                out.push((format!("{p}.self_attn.{name}.bias"), vec![n]));
            }
        }
    }
    out
}

/// llama.cpp tensor name -> Hugging Face name (`None` for tensors a LLaMA checkpoint lacks).
pub fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, module) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match module {
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "attn_q.bias" => "self_attn.q_proj.bias",
        "attn_k.bias" => "self_attn.k_proj.bias",
        "attn_v.bias" => "self_attn.v_proj.bias",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// Inverse of llama.cpp's `permute` (convert_hf_to_gguf.py): it maps the rows of each head from
/// `[half0 | half1]` to interleaved pairs via `reshape(n_head, 2, hd/2, in).swapaxes(1, 2)`;
/// swapping the other way restores HF order.
pub fn unpermute_qk(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hd = rows / n_head;
    w.reshape((n_head, hd / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

/// [`unpermute_qk`] on a quantized tensor: the same row order, moving whole rows of blocks, so
/// the values are untouched (quantization blocks never straddle rows).
pub fn unpermute_qk_quantized(
    q: &QTensor,
    n_head: usize,
    device: &Device,
) -> candle_core::Result<QTensor> {
    let (rows, _) = q.shape().dims2()?;
    let data = q.data()?;
    let row_bytes = data.len() / rows;
    let hd = rows / n_head;
    let mut out = Vec::with_capacity(data.len());
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..hd / 2 {
                let src = h * hd + 2 * i + j;
                out.extend_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    let storage = QStorage::from_data(std::borrow::Cow::Owned(out), device, q.dtype())?;
    QTensor::new(storage, q.shape().clone())
}

/// Typed access to GGUF metadata; every error names the file and the key.
pub(crate) struct Meta<'a> {
    pub path: &'a Path,
    pub md: &'a HashMap<String, Value>,
}

impl Meta<'_> {
    pub(crate) fn get(&self, key: &str) -> Result<&Value, IoError> {
        self.md
            .get(key)
            .ok_or_else(|| invalid(self.path, format!("GGUF metadata '{key}' is missing")))
    }

    pub(crate) fn wrong(&self, key: &str, want: &str, v: &Value) -> IoError {
        invalid(
            self.path,
            format!(
                "GGUF metadata '{key}' should be {want}, found {:?}",
                v.value_type()
            ),
        )
    }

    pub(crate) fn int(&self, key: &str, v: &Value) -> Result<i64, IoError> {
        Ok(match v {
            Value::U8(x) => *x as i64,
            Value::I8(x) => *x as i64,
            Value::U16(x) => *x as i64,
            Value::I16(x) => *x as i64,
            Value::U32(x) => *x as i64,
            Value::I32(x) => *x as i64,
            Value::U64(x) => i64::try_from(*x).map_err(|_| self.wrong(key, "an i64", v))?,
            Value::I64(x) => *x,
            _ => return Err(self.wrong(key, "an integer", v)),
        })
    }

    pub(crate) fn usize(&self, key: &str) -> Result<usize, IoError> {
        let v = self.get(key)?;
        usize::try_from(self.int(key, v)?).map_err(|_| self.wrong(key, "non-negative", v))
    }

    pub(crate) fn opt_usize(&self, key: &str) -> Result<Option<usize>, IoError> {
        self.md.get(key).map(|_| self.usize(key)).transpose()
    }

    /// f32 values are read back as their shortest decimal (1e-5, not 9.99999974e-6), which is
    /// the number the converter was given, so configs from GGUF and HF compare equal.
    pub(crate) fn f64(&self, key: &str) -> Result<f64, IoError> {
        match self.get(key)? {
            Value::F32(x) => Ok(x.to_string().parse().unwrap_or(*x as f64)),
            Value::F64(x) => Ok(*x),
            v => Err(self.wrong(key, "a float", v)),
        }
    }

    pub(crate) fn opt_f64(&self, key: &str) -> Result<Option<f64>, IoError> {
        self.md.get(key).map(|_| self.f64(key)).transpose()
    }

    pub(crate) fn opt_str(&self, key: &str) -> Result<Option<&str>, IoError> {
        match self.md.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.wrong(key, "a string", v)),
        }
    }

    pub(crate) fn str(&self, key: &str) -> Result<&str, IoError> {
        self.opt_str(key)?
            .ok_or_else(|| invalid(self.path, format!("GGUF metadata '{key}' is missing")))
    }

    pub(crate) fn array(&self, key: &str) -> Result<&Vec<Value>, IoError> {
        match self.get(key)? {
            Value::Array(a) => Ok(a),
            v => Err(self.wrong(key, "an array", v)),
        }
    }

    pub(crate) fn strings(&self, key: &str) -> Result<Vec<&str>, IoError> {
        self.array(key)?
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                v => Err(self.wrong(key, "an array of strings", v)),
            })
            .collect()
    }

    pub(crate) fn ints(&self, key: &str) -> Result<Vec<i64>, IoError> {
        self.array(key)?.iter().map(|v| self.int(key, v)).collect()
    }
}

/// The architecture a GGUF file declares, if it loads as a LLaMA-layout model.
fn arch_of(meta: &Meta) -> Result<GgufArch, IoError> {
    let arch = meta.str("general.architecture")?;
    GgufArch::parse(arch).ok_or_else(|| {
        invalid(
            meta.path,
            format!("architecture '{arch}' is not supported (llama, qwen2)"),
        )
    })
}

fn config_from_metadata(meta: &Meta, arch: GgufArch, tied: bool) -> Result<LlamaConfig, IoError> {
    let a = arch.key();
    let key = |k: &str| format!("{a}.{k}");
    // Features this loader does not implement: refuse rather than load a subtly wrong model.
    if meta.opt_usize(&key("expert_count"))?.unwrap_or(0) > 0 {
        return Err(invalid(
            meta.path,
            format!("mixture-of-experts {a} is not supported"),
        ));
    }
    let token_id = |key: &str| -> Result<Option<u32>, IoError> {
        meta.opt_usize(key)?
            .map(|id| u32::try_from(id).map_err(|_| invalid(meta.path, format!("{key} too large"))))
            .transpose()
    };
    let heads = meta.usize(&key("attention.head_count"))?;
    let config = LlamaConfig {
        vocab_size: meta.array("tokenizer.ggml.tokens")?.len(),
        hidden_size: meta.usize(&key("embedding_length"))?,
        intermediate_size: meta.usize(&key("feed_forward_length"))?,
        num_hidden_layers: meta.usize(&key("block_count"))?,
        num_attention_heads: heads,
        num_key_value_heads: Some(
            meta.opt_usize(&key("attention.head_count_kv"))?
                .unwrap_or(heads),
        ),
        explicit_head_dim: meta.opt_usize(&key("attention.key_length"))?,
        rms_norm_eps: meta.f64(&key("attention.layer_norm_rms_epsilon"))?,
        rope_theta: meta.opt_f64(&key("rope.freq_base"))?.unwrap_or(10000.0),
        rope_scaling: match meta.opt_str(&key("rope.scaling.type"))? {
            None | Some("none") => None,
            Some("linear") => Some(RopeScaling::Linear {
                factor: meta.f64(&key("rope.scaling.factor"))?,
            }),
            Some(other) => {
                return Err(invalid(
                    meta.path,
                    format!("rope scaling '{other}' is not supported (none, linear)"),
                ))
            }
        },
        max_position_embeddings: meta.usize(&key("context_length"))?,
        tie_word_embeddings: tied,
        bos_token_id: token_id("tokenizer.ggml.bos_token_id")?,
        eos_token_id: token_id("tokenizer.ggml.eos_token_id")?
            .into_iter()
            .collect(),
    };
    config.validate(meta.path)?;
    if let Some(rot) = meta.opt_usize(&key("rope.dimension_count"))? {
        if rot != config.head_dim() {
            return Err(invalid(
                meta.path,
                format!(
                    "partial rotary embeddings (rope.dimension_count {rot}, head dim {}) are not supported",
                    config.head_dim()
                ),
            ));
        }
    }
    Ok(config)
}

fn open_gguf(path: &Path) -> Result<(BufReader<File>, Content), IoError> {
    let file = File::open(path).map_err(|_| IoError::Missing {
        path: path.into(),
        what: "GGUF model file".into(),
    })?;
    let mut reader = BufReader::new(file);
    // candle's reader divides by the declared alignment: a 0 must not reach it.
    if declared_alignment(&mut reader) == Some(0) {
        return Err(invalid(
            path,
            "GGUF metadata 'general.alignment' is 0; it must be a positive number of bytes",
        ));
    }
    reader
        .seek(SeekFrom::Start(0))
        .map_err(|e| invalid(path, format!("cannot be read ({e})")))?;
    let content = Content::read(&mut reader)
        .map_err(|e| invalid(path, format!("not a readable GGUF file ({e})")))?;
    // candle multiplies a tensor's dimensions when it reads the tensor; their product, and its
    // size in bytes, must fit.
    for (name, info) in &content.tensor_infos {
        let dims = info.shape.dims();
        let bytes = dims
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .and_then(|n| {
                (n / info.ggml_dtype.block_size()).checked_mul(info.ggml_dtype.type_size())
            });
        if bytes.is_none() {
            return Err(invalid(
                path,
                format!("tensor '{name}' has dimensions {dims:?}, too large for any file"),
            ));
        }
    }
    Ok((reader, content))
}

/// The `general.alignment` a GGUF header declares, when it is one of the integer types candle's
/// reader takes it from; None when there is none, or the header cannot be walked to that key
/// (candle's reader then says what is wrong). Walks the metadata from the start of the
/// file, skipping values by their sizes; only lengths are read, nothing is allocated from them.
fn declared_alignment(r: &mut BufReader<File>) -> Option<u64> {
    alignment_walk(r).ok().flatten()
}

fn alignment_walk(r: &mut BufReader<File>) -> std::io::Result<Option<u64>> {
    const KEY: &[u8] = b"general.alignment";
    let magic = read_u32(r)?;
    if magic != 0x4655_4747 && magic != 0x4747_5546 {
        return Ok(None);
    }
    let v1 = match read_u32(r)? {
        1 => true,
        2 | 3 => false,
        _ => return Ok(None),
    };
    let _tensors = read_len(r, v1)?;
    let kvs = read_len(r, v1)?;
    for _ in 0..kvs {
        let len = read_len(r, v1)?;
        let mut is_key = false;
        if len == KEY.len() as u64 {
            let mut key = [0u8; KEY.len()];
            r.read_exact(&mut key)?;
            is_key = key == KEY;
        } else {
            skip(r, len)?;
        }
        let vtype = read_u32(r)?;
        if is_key {
            // u8, i8, u16, i16, u32, i32: the types candle reads the alignment from.
            let (size, signed) = match vtype {
                0..=5 => (1usize << (vtype / 2), vtype % 2 == 1),
                _ => return Ok(None),
            };
            let mut v = [0u8; 8];
            r.read_exact(&mut v[..size])?;
            let negative = signed && v[size - 1] & 0x80 != 0;
            return Ok((!negative).then(|| u64::from_le_bytes(v)));
        }
        if !skip_value(r, vtype, v1, 0)? {
            return Ok(None);
        }
    }
    Ok(None)
}

fn read_u32(r: &mut BufReader<File>) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

/// A string or array length: u32 in GGUF v1, u64 after.
fn read_len(r: &mut BufReader<File>, v1: bool) -> std::io::Result<u64> {
    if v1 {
        return read_u32(r).map(u64::from);
    }
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Moves `n` bytes on (past the end is found by the next read).
fn skip(r: &mut BufReader<File>, n: u64) -> std::io::Result<()> {
    let n =
        i64::try_from(n).map_err(|_| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
    r.seek_relative(n)
}

/// The size of one GGUF metadata value of a fixed-size type.
fn fixed_size(vtype: u32) -> Option<u64> {
    match vtype {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

/// Skips one GGUF metadata value of type `vtype`; false for a type or nesting GGUF does not
/// have. A loop over an array's elements reads at least 4 bytes per element, so it ends at the
/// end of the file.
fn skip_value(
    r: &mut BufReader<File>,
    vtype: u32,
    v1: bool,
    depth: usize,
) -> std::io::Result<bool> {
    match vtype {
        8 => {
            let n = read_len(r, v1)?;
            skip(r, n)?;
        }
        9 if depth < 64 => {
            let elem = read_u32(r)?;
            let n = read_len(r, v1)?;
            match fixed_size(elem) {
                Some(size) => skip(r, size.saturating_mul(n))?,
                None => {
                    for _ in 0..n {
                        if !skip_value(r, elem, v1, depth + 1)? {
                            return Ok(false);
                        }
                    }
                }
            }
        }
        t => match fixed_size(t) {
            Some(size) => skip(r, size)?,
            None => return Ok(false),
        },
    }
    Ok(true)
}

/// Only the tokenizer (and chat template) of a GGUF file, without reading any tensor data.
pub fn load_tokenizer(path: &Path) -> Result<(Tokenizer, Option<String>), IoError> {
    let (_, content) = open_gguf(path)?;
    let meta = Meta {
        path,
        md: &content.metadata,
    };
    let template = meta.opt_str("tokenizer.chat_template")?.map(String::from);
    Ok((tokenizer_from_metadata(&meta)?, template))
}

/// llama.cpp's tensor of per-frequency divisors (Llama 3.1's rope scaling, as
/// `convert_hf_to_gguf.py` writes it: `inv_freq[i] / factor[i]`).
const ROPE_FREQS: &str = "rope_freqs.weight";

fn rope_freq_factors(
    content: &Content,
    reader: &mut BufReader<File>,
    config: &LlamaConfig,
    path: &Path,
) -> Result<RopeScaling, IoError> {
    let t = content
        .tensor(reader, ROPE_FREQS, &Device::Cpu)
        .and_then(|q| q.dequantize(&Device::Cpu))
        .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
        .map_err(|e| invalid(path, format!("{ROPE_FREQS} cannot be read ({e})")))?;
    let half = config.head_dim() / 2;
    if t.len() != half || t.iter().any(|&f| !(f > 0.0 && f.is_finite())) {
        return Err(invalid(
            path,
            format!(
                "{ROPE_FREQS}: expected {half} positive factors, found {} values",
                t.len()
            ),
        ));
    }
    Ok(RopeScaling::Factors { factors: t })
}

/// Loads a llama.cpp GGUF LLaMA checkpoint: every tensor dequantized to `dtype` on `device`,
/// renamed to Hugging Face names, Q/K rows restored to HF order, shapes checked against the
/// config from the `llama.*` metadata.
pub fn load_llama(path: &Path, dtype: DType, device: &Device) -> Result<GgufLlama, IoError> {
    load_llama_opts(path, dtype, device, false)
}

/// [`load_llama`]; with `keep_quantized`, the seven projection weights of every layer that the
/// file holds in a block-quantized type stay quantized (in [`GgufLlama::quantized`]) and are
/// dequantized per matmul: the frozen base then costs its file size in memory, not `dtype`'s.
pub fn load_llama_opts(
    path: &Path,
    dtype: DType,
    device: &Device,
    keep_quantized: bool,
) -> Result<GgufLlama, IoError> {
    let (mut reader, content) = open_gguf(path)?;
    let meta = Meta {
        path,
        md: &content.metadata,
    };
    let arch = arch_of(&meta)?;
    let tied = !content.tensor_infos.contains_key("output.weight");
    let mut config = config_from_metadata(&meta, arch, tied)?;
    if content.tensor_infos.contains_key(ROPE_FREQS) {
        config.rope_scaling = Some(rope_freq_factors(&content, &mut reader, &config, path)?);
    }
    let tokenizer = tokenizer_from_metadata(&meta)?;
    let chat_template = meta.opt_str("tokenizer.chat_template")?.map(String::from);

    // Check names and shapes of everything before reading any tensor data.
    let expected: HashMap<String, Vec<usize>> =
        expected_shapes_for(&config, arch).into_iter().collect();
    // In file order, so reads are sequential and the first error reported is deterministic.
    let mut infos: Vec<_> = content.tensor_infos.iter().collect();
    infos.sort_by_key(|(_, info)| info.offset);
    let mut plan = Vec::with_capacity(infos.len());
    for (gguf, info) in infos {
        if gguf == ROPE_FREQS {
            continue; // read into the config above
        }
        let hf = hf_name(gguf)
            .filter(|hf| expected.contains_key(hf))
            .ok_or_else(|| {
                invalid(
                    path,
                    format!(
                        "tensor '{gguf}' is not part of a {}-layer {}",
                        config.num_hidden_layers,
                        arch.key()
                    ),
                )
            })?;
        let want = &expected[&hf];
        if info.shape.dims() != want.as_slice() {
            return Err(IoError::WrongShape {
                path: path.into(),
                name: format!("{gguf} ({hf})"),
                actual: info.shape.dims().to_vec(),
                expected: want.clone(),
            });
        }
        plan.push((gguf.as_str(), hf));
    }
    let present: std::collections::HashSet<&str> = plan.iter().map(|p| p.1.as_str()).collect();
    for (hf, _) in expected_shapes_for(&config, arch) {
        if !present.contains(hf.as_str()) {
            return Err(IoError::MissingTensor {
                path: path.into(),
                tried: format!("the GGUF name of '{hf}'"),
                name: hf,
            });
        }
    }

    let mut tensors = HashMap::with_capacity(plan.len());
    let mut quantized = HashMap::new();
    for (gguf, hf) in plan {
        let fail = |e: candle_core::Error| invalid(path, format!("tensor '{gguf}': {e}"));
        let q = content.tensor_infos[gguf]
            .read(&mut reader, content.tensor_data_offset, &Device::Cpu)
            .map_err(fail)?;
        let is_projection = hf.starts_with("model.layers.") && hf.ends_with("_proj.weight");
        let is_float = matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        // The head count of a Q or K weight whose rows llama.cpp permuted.
        let permuted_heads = match gguf {
            _ if !arch.permuted_qk() => None,
            g if g.ends_with("attn_q.weight") => Some(config.num_attention_heads),
            g if g.ends_with("attn_k.weight") => Some(config.kv_heads()),
            _ => None,
        };
        if keep_quantized && is_projection && !is_float {
            // Read on the CPU: kept as read there, copied to another device.
            let q = match permuted_heads {
                Some(n) => unpermute_qk_quantized(&q, n, device),
                None if device.is_cpu() => Ok(q),
                None => QStorage::from_data(q.data().map_err(fail)?, device, q.dtype())
                    .and_then(|s| QTensor::new(s, q.shape().clone())),
            }
            .map_err(fail)?;
            quantized.insert(hf, Arc::new(q));
            continue;
        }
        let mut t = q.dequantize(&Device::Cpu).map_err(fail)?;
        if let Some(heads) = permuted_heads {
            t = unpermute_qk(&t, heads).map_err(fail)?;
        }
        let t = t
            .to_dtype(dtype)
            .and_then(|t| t.to_device(device))
            .map_err(fail)?;
        tensors.insert(hf, t);
    }
    Ok(GgufLlama {
        config,
        tensors,
        quantized,
        tokenizer,
        chat_template,
    })
}

#[cfg(test)]
#[path = "gguf_tests.rs"]
mod tests;
