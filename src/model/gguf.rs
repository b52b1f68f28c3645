//! LLaMA checkpoints from llama.cpp's GGUF files and from Hugging Face folders, both returned
//! under Hugging Face tensor names and row order, so one model implementation serves both.
//!
//! GGUF tensors are dequantized on load: training runs in float, and the adapters are what is
//! learned. llama.cpp's converter reorders the rows of the Q and K projections so that its rotary
//! kernel can rotate adjacent pairs; we undo that here, because the model rotates HF-style
//! (`rotate_half`, pairs `i` and `i + head_dim / 2`).

use crate::io::IoError;
use crate::model::llama::{LlamaConfig, RopeScaling};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

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

fn invalid(path: &Path, message: impl Into<String>) -> IoError {
    IoError::Invalid {
        path: path.into(),
        message: message.into(),
    }
}

/// Every tensor a LLaMA checkpoint must hold, with its shape, under Hugging Face names.
pub fn expected_shapes(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
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
struct Meta<'a> {
    path: &'a Path,
    md: &'a HashMap<String, Value>,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Result<&Value, IoError> {
        self.md
            .get(key)
            .ok_or_else(|| invalid(self.path, format!("GGUF metadata '{key}' is missing")))
    }

    fn wrong(&self, key: &str, want: &str, v: &Value) -> IoError {
        invalid(
            self.path,
            format!(
                "GGUF metadata '{key}' should be {want}, found {:?}",
                v.value_type()
            ),
        )
    }

    fn int(&self, key: &str, v: &Value) -> Result<i64, IoError> {
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

    fn usize(&self, key: &str) -> Result<usize, IoError> {
        let v = self.get(key)?;
        usize::try_from(self.int(key, v)?).map_err(|_| self.wrong(key, "non-negative", v))
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>, IoError> {
        self.md.get(key).map(|_| self.usize(key)).transpose()
    }

    /// f32 values are read back as their shortest decimal (1e-5, not 9.99999974e-6), which is
    /// the number the converter was given, so configs from GGUF and HF compare equal.
    fn f64(&self, key: &str) -> Result<f64, IoError> {
        match self.get(key)? {
            Value::F32(x) => Ok(x.to_string().parse().unwrap_or(*x as f64)),
            Value::F64(x) => Ok(*x),
            v => Err(self.wrong(key, "a float", v)),
        }
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>, IoError> {
        self.md.get(key).map(|_| self.f64(key)).transpose()
    }

    fn opt_str(&self, key: &str) -> Result<Option<&str>, IoError> {
        match self.md.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.wrong(key, "a string", v)),
        }
    }

    fn str(&self, key: &str) -> Result<&str, IoError> {
        self.opt_str(key)?
            .ok_or_else(|| invalid(self.path, format!("GGUF metadata '{key}' is missing")))
    }

    fn array(&self, key: &str) -> Result<&Vec<Value>, IoError> {
        match self.get(key)? {
            Value::Array(a) => Ok(a),
            v => Err(self.wrong(key, "an array", v)),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<&str>, IoError> {
        self.array(key)?
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                v => Err(self.wrong(key, "an array of strings", v)),
            })
            .collect()
    }

    fn ints(&self, key: &str) -> Result<Vec<i64>, IoError> {
        self.array(key)?.iter().map(|v| self.int(key, v)).collect()
    }
}

fn config_from_metadata(meta: &Meta, tied: bool) -> Result<LlamaConfig, IoError> {
    let arch = meta.str("general.architecture")?;
    if arch != "llama" {
        return Err(invalid(
            meta.path,
            format!("architecture '{arch}' is not supported (only 'llama')"),
        ));
    }
    // Features this loader does not implement: refuse rather than load a subtly wrong model.
    if meta.opt_usize("llama.expert_count")?.unwrap_or(0) > 0 {
        return Err(invalid(
            meta.path,
            "mixture-of-experts LLaMA is not supported",
        ));
    }
    if let Some(kind) = meta.opt_str("llama.rope.scaling.type")? {
        if kind != "none" {
            return Err(invalid(
                meta.path,
                format!("rope scaling '{kind}' is not supported"),
            ));
        }
    }
    let token_id = |key: &str| -> Result<Option<u32>, IoError> {
        meta.opt_usize(key)?
            .map(|id| u32::try_from(id).map_err(|_| invalid(meta.path, format!("{key} too large"))))
            .transpose()
    };
    let heads = meta.usize("llama.attention.head_count")?;
    let config = LlamaConfig {
        vocab_size: meta.array("tokenizer.ggml.tokens")?.len(),
        hidden_size: meta.usize("llama.embedding_length")?,
        intermediate_size: meta.usize("llama.feed_forward_length")?,
        num_hidden_layers: meta.usize("llama.block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: Some(
            meta.opt_usize("llama.attention.head_count_kv")?
                .unwrap_or(heads),
        ),
        explicit_head_dim: meta.opt_usize("llama.attention.key_length")?,
        rms_norm_eps: meta.f64("llama.attention.layer_norm_rms_epsilon")?,
        rope_theta: meta.opt_f64("llama.rope.freq_base")?.unwrap_or(10000.0),
        rope_scaling: match meta.opt_str("llama.rope.scaling.type")? {
            None | Some("none") => None,
            Some("linear") => Some(RopeScaling::Linear {
                factor: meta.f64("llama.rope.scaling.factor")?,
            }),
            Some(other) => {
                return Err(invalid(
                    meta.path,
                    format!("rope scaling '{other}' is not supported (none, linear)"),
                ))
            }
        },
        max_position_embeddings: meta.usize("llama.context_length")?,
        tie_word_embeddings: tied,
        bos_token_id: token_id("tokenizer.ggml.bos_token_id")?,
        eos_token_id: token_id("tokenizer.ggml.eos_token_id")?
            .into_iter()
            .collect(),
    };
    config.validate(meta.path)?;
    if let Some(rot) = meta.opt_usize("llama.rope.dimension_count")? {
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

/// The byte-level BPE tokenizer stored in a GGUF file's `tokenizer.ggml.*` metadata, rebuilt as
/// a Hugging Face tokenizer: vocab and merges as stored, the pre-tokenizer that llama.cpp uses
/// for `tokenizer.ggml.pre`, control tokens (type 3) as special tokens.
fn tokenizer_from_metadata(meta: &Meta) -> Result<Tokenizer, IoError> {
    let path = meta.path;
    let model = meta.str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(invalid(
            path,
            format!("tokenizer model '{model}' is not supported (only 'gpt2', byte-level BPE)"),
        ));
    }
    // llama.cpp (llama-vocab.cpp) splits these with "\p{N}" before the GPT-2 regex, i.e. every
    // digit is its own word; the gpt2 group uses the GPT-2 regex alone.
    let pre = meta.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");
    let split_digits = match pre {
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            true
        }
        "gpt2" | "mpt" | "olmo" | "jais" => false,
        other => {
            return Err(invalid(
                path,
                format!("tokenizer pre-tokenizer '{other}' is not supported"),
            ))
        }
    };
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let types = match meta.md.get("tokenizer.ggml.token_type") {
        Some(_) => meta.ints("tokenizer.ggml.token_type")?,
        None => vec![1; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(invalid(
            path,
            format!("{} token types for {} tokens", types.len(), tokens.len()),
        ));
    }
    let merges = meta
        .strings("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| invalid(path, format!("tokenizer merge '{m}' is not 'A B'")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| invalid(path, format!("tokenizer cannot be built ({e})")))?;
    let byte_level = ByteLevel::new(false, true, true);
    let pre_tokenizer: PreTokenizerWrapper = if split_digits {
        Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
    } else {
        byte_level.into()
    };
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_pre_tokenizer(Some(pre_tokenizer))
        .with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
    // 3 = control (<|im_start|>, <|endoftext|>): special, never split. 4 = user-defined: matched
    // whole before BPE, as llama.cpp does, but kept in decoded text.
    let added = |kind: i64, special: bool| -> Vec<AddedToken> {
        tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == kind)
            .map(|(tok, _)| AddedToken::from(tok.to_string(), special))
            .collect()
    };
    tokenizer.add_special_tokens(&added(3, true));
    tokenizer.add_tokens(&added(4, false));
    // llama.cpp prepends BOS when the file asks for it; so does `encode(text, true)` then.
    if let (Some(Value::Bool(true)), Some(bos)) = (
        meta.md.get("tokenizer.ggml.add_bos_token"),
        meta.opt_usize("tokenizer.ggml.bos_token_id")?,
    ) {
        let name = tokens
            .get(bos)
            .ok_or_else(|| invalid(path, format!("bos_token_id {bos} is not in the vocab")))?;
        let template = TemplateProcessing::builder()
            .try_single(format!("{name} $A"))
            .and_then(|b| b.try_pair(format!("{name} $A {name} $B")))
            .map_err(|e| invalid(path, format!("BOS template: {e}")))?
            .special_tokens(vec![(name.to_string(), bos as u32)])
            .build()
            .map_err(|e| invalid(path, format!("BOS template: {e}")))?;
        tokenizer.with_post_processor(Some(template));
    }
    Ok(tokenizer)
}

fn open_gguf(path: &Path) -> Result<(BufReader<File>, Content), IoError> {
    let file = File::open(path).map_err(|_| IoError::Missing {
        path: path.into(),
        what: "GGUF model file".into(),
    })?;
    let mut reader = BufReader::new(file);
    let content = Content::read(&mut reader)
        .map_err(|e| invalid(path, format!("not a readable GGUF file ({e})")))?;
    Ok((reader, content))
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
    let tied = !content.tensor_infos.contains_key("output.weight");
    let mut config = config_from_metadata(&meta, tied)?;
    if content.tensor_infos.contains_key(ROPE_FREQS) {
        config.rope_scaling = Some(rope_freq_factors(&content, &mut reader, &config, path)?);
    }
    let tokenizer = tokenizer_from_metadata(&meta)?;
    let chat_template = meta.opt_str("tokenizer.chat_template")?.map(String::from);

    // Check names and shapes of everything before reading any tensor data.
    let expected: HashMap<String, Vec<usize>> = expected_shapes(&config).into_iter().collect();
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
                        "tensor '{gguf}' is not part of a {}-layer LLaMA",
                        config.num_hidden_layers
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
    for (hf, _) in expected_shapes(&config) {
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
        if keep_quantized && is_projection && !is_float {
            let heads = if gguf.ends_with("attn_q.weight") {
                Some(config.num_attention_heads)
            } else if gguf.ends_with("attn_k.weight") {
                Some(config.kv_heads())
            } else {
                None
            };
            // Read on the CPU: kept as read there, copied to another device.
            let q = match heads {
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
        if gguf.ends_with("attn_q.weight") {
            t = unpermute_qk(&t, config.num_attention_heads).map_err(fail)?;
        } else if gguf.ends_with("attn_k.weight") {
            t = unpermute_qk(&t, config.kv_heads()).map_err(fail)?;
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
mod tests {
    use super::*;
    use crate::io::weights::Weights;
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::path::PathBuf;

    /// GPT-2's byte -> printable char table (as in every byte-level BPE vocab).
    fn byte_chars() -> Vec<char> {
        let mut bs: Vec<u32> = (b'!'..=b'~')
            .chain(0xA1..=0xAC)
            .chain(0xAE..=0xFF)
            .map(u32::from)
            .collect();
        let mut cs = bs.clone();
        let mut n = 0;
        for b in 0..256u32 {
            if !bs.contains(&b) {
                bs.push(b);
                cs.push(256 + n);
                n += 1;
            }
        }
        let mut table = vec![' '; 256];
        for (b, c) in bs.iter().zip(cs) {
            table[*b as usize] = char::from_u32(c).unwrap();
        }
        table
    }

    const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    const MERGES: [&str; 4] = ["Ġ t", "h e", "Ġt he", "i n"];

    /// Tokens and types of a tiny byte-level vocab: 3 control tokens, 256 bytes, 4 merges and
    /// one user-defined token.
    fn tiny_vocab() -> (Vec<String>, Vec<i32>) {
        let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
        let mut types = vec![3; 3];
        tokens.extend(byte_chars().into_iter().map(String::from));
        tokens.extend(MERGES.iter().map(|m| m.replace(' ', "")));
        tokens.push("<user_tok>".into());
        types.extend(std::iter::repeat_n(1, 256 + MERGES.len()));
        types.push(4);
        (tokens, types)
    }

    fn tiny_config(tied: bool) -> LlamaConfig {
        LlamaConfig {
            vocab_size: tiny_vocab().0.len(),
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            explicit_head_dim: None,
            rms_norm_eps: 1e-5,
            rope_theta: 100000.0,
            rope_scaling: None,
            max_position_embeddings: 256,
            tie_word_embeddings: tied,
            bos_token_id: Some(1),
            eos_token_id: vec![2],
        }
    }

    fn random_tensors(cfg: &LlamaConfig, seed: u64) -> HashMap<String, Tensor> {
        let mut rng = StdRng::seed_from_u64(seed);
        expected_shapes(cfg)
            .into_iter()
            .map(|(name, shape)| {
                let n = shape.iter().product();
                let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
                (name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap())
            })
            .collect()
    }

    /// llama.cpp's `permute` from convert_hf_to_gguf.py, written independently of `unpermute_qk`.
    fn llamacpp_permute(w: &Tensor, n_head: usize) -> Tensor {
        let (rows, cols) = w.dims2().unwrap();
        w.reshape((n_head, 2, rows / n_head / 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((rows, cols))
            .unwrap()
    }

    fn gguf_name_of(hf: &str) -> String {
        let top = [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("model.norm.weight", "output_norm.weight"),
            ("lm_head.weight", "output.weight"),
        ];
        if let Some((_, g)) = top.iter().find(|(h, _)| *h == hf) {
            return g.to_string();
        }
        let rest = hf.strip_prefix("model.layers.").unwrap();
        let (layer, module) = rest.split_once('.').unwrap();
        let g = match module {
            "self_attn.q_proj.weight" => "attn_q",
            "self_attn.k_proj.weight" => "attn_k",
            "self_attn.v_proj.weight" => "attn_v",
            "self_attn.o_proj.weight" => "attn_output",
            "mlp.gate_proj.weight" => "ffn_gate",
            "mlp.up_proj.weight" => "ffn_up",
            "mlp.down_proj.weight" => "ffn_down",
            "input_layernorm.weight" => "attn_norm",
            "post_attention_layernorm.weight" => "ffn_norm",
            other => panic!("{other}"),
        };
        format!("blk.{layer}.{g}.weight")
    }

    /// Writes HF-named tensors as llama.cpp would: GGUF names, Q/K rows permuted, metadata.
    /// `quant` picks the ggml type per GGUF name; `edit` may change metadata and tensors.
    fn write_gguf(
        path: &Path,
        cfg: &LlamaConfig,
        hf: &HashMap<String, Tensor>,
        quant: impl Fn(&str) -> GgmlDType,
        edit: impl FnOnce(&mut Vec<(String, Value)>, &mut Vec<(String, QTensor)>),
    ) {
        let (tokens, types) = tiny_vocab();
        let u32v = |x: usize| Value::U32(x as u32);
        let mut md: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String("llama".into())),
            ("llama.block_count".into(), u32v(cfg.num_hidden_layers)),
            (
                "llama.context_length".into(),
                u32v(cfg.max_position_embeddings),
            ),
            ("llama.embedding_length".into(), u32v(cfg.hidden_size)),
            (
                "llama.feed_forward_length".into(),
                u32v(cfg.intermediate_size),
            ),
            (
                "llama.attention.head_count".into(),
                u32v(cfg.num_attention_heads),
            ),
            ("llama.attention.head_count_kv".into(), u32v(cfg.kv_heads())),
            (
                "llama.rope.freq_base".into(),
                Value::F32(cfg.rope_theta as f32),
            ),
            (
                "llama.attention.layer_norm_rms_epsilon".into(),
                Value::F32(cfg.rms_norm_eps as f32),
            ),
            ("llama.rope.dimension_count".into(), u32v(cfg.head_dim())),
            ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
            ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
            (
                "tokenizer.ggml.tokens".into(),
                Value::Array(tokens.into_iter().map(Value::String).collect()),
            ),
            (
                "tokenizer.ggml.token_type".into(),
                Value::Array(types.into_iter().map(Value::I32).collect()),
            ),
            (
                "tokenizer.ggml.merges".into(),
                Value::Array(
                    MERGES
                        .iter()
                        .map(|m| Value::String(m.to_string()))
                        .collect(),
                ),
            ),
            ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
            ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
            (
                "tokenizer.chat_template".into(),
                Value::String("{{ x }}".into()),
            ),
        ];
        let mut names: Vec<&String> = hf.keys().collect();
        names.sort();
        let mut ts: Vec<(String, QTensor)> = names
            .into_iter()
            .map(|name| {
                let mut t = hf[name].clone();
                if name.ends_with("q_proj.weight") {
                    t = llamacpp_permute(&t, cfg.num_attention_heads);
                } else if name.ends_with("k_proj.weight") {
                    t = llamacpp_permute(&t, cfg.kv_heads());
                }
                let g = gguf_name_of(name);
                let q = QTensor::quantize(&t, quant(&g)).unwrap();
                (g, q)
            })
            .collect();
        edit(&mut md, &mut ts);
        let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = ts.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut f = File::create(path).unwrap();
        gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
    }

    fn f32s(_: &str) -> GgmlDType {
        GgmlDType::F32
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn unpermute_inverts_llamacpp_permute_and_differs_from_identity() {
        let t = Tensor::arange(0f32, 12.0 * 8.0, &Device::Cpu)
            .unwrap()
            .reshape((12, 8))
            .unwrap();
        for heads in [1, 3] {
            let p = llamacpp_permute(&t, heads);
            assert!(max_diff(&p, &t) > 0.0);
            assert_eq!(max_diff(&unpermute_qk(&p, heads).unwrap(), &t), 0.0);
        }
        // Head of 4 rows [a0 a1 | b0 b1] is stored interleaved as [a0 b0 a1 b1].
        let rows: Vec<f32> = llamacpp_permute(&t, 3)
            .narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(&rows[..4], &[0.0, 16.0, 8.0, 24.0]);
    }

    #[test]
    fn gguf_loads_under_hf_names_in_hf_order() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("tiny.gguf");
        let cfg = tiny_config(true);
        let hf = random_tensors(&cfg, 7);
        write_gguf(&path, &cfg, &hf, f32s, |_, _| {});
        let m = load_llama(&path, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(m.config, cfg);
        assert_eq!(m.chat_template.as_deref(), Some("{{ x }}"));
        assert_eq!(m.tensors.len(), hf.len());
        assert!(!m.tensors.contains_key("lm_head.weight"));
        for (name, t) in &hf {
            assert_eq!(max_diff(&m.tensors[name], t), 0.0, "{name}");
        }
        let bf16 = load_llama(&path, DType::BF16, &Device::Cpu).unwrap();
        assert_eq!(bf16.tensors["model.norm.weight"].dtype(), DType::BF16);
    }

    #[test]
    fn untied_and_quantized_gguf() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("q.gguf");
        let cfg = tiny_config(false);
        let hf = random_tensors(&cfg, 8);
        let quant = |g: &str| {
            if g.ends_with("norm.weight") {
                GgmlDType::F32
            } else if g.contains("attn_") || g == "output.weight" {
                GgmlDType::Q8_0
            } else {
                GgmlDType::Q4_1
            }
        };
        write_gguf(&path, &cfg, &hf, quant, |_, _| {});
        let m = load_llama(&path, DType::F32, &Device::Cpu).unwrap();
        assert!(!m.config.tie_word_embeddings);
        for (name, t) in &hf {
            // Values in [-1, 1): Q8_0 steps are 1/127, Q4_1 steps 2/15; error is half a step.
            let tol = match quant(&gguf_name_of(name)) {
                GgmlDType::F32 => 0.0,
                GgmlDType::Q8_0 => 0.5 / 127.0 + 1e-3,
                _ => 1.0 / 15.0 + 1e-3,
            };
            let d = max_diff(&m.tensors[name], t);
            assert!(d <= tol, "{name}: {d} > {tol}");
        }
    }

    /// Keeping the projections quantized changes where the weights live, not what the model
    /// computes: every logit equals the dequantize-on-load model's, Q/K rows included.
    #[test]
    fn quantized_base_computes_what_the_dequantized_model_computes() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("q.gguf");
        let cfg = tiny_config(true);
        let quant = |g: &str| {
            if g.ends_with("norm.weight") {
                GgmlDType::F32
            } else if g.contains("attn_v") {
                GgmlDType::F16 // a float projection stays dense
            } else if g.contains("attn_") {
                GgmlDType::Q8_0
            } else {
                GgmlDType::Q4_1
            }
        };
        write_gguf(&path, &cfg, &random_tensors(&cfg, 9), quant, |_, _| {});
        let build = |keep: bool| {
            let g = load_llama_opts(&path, DType::F32, &Device::Cpu, keep).unwrap();
            let n = g.quantized.len();
            let w = Weights::from_tensors(g.tensors, DType::F32, &Device::Cpu)
                .with_quantized(g.quantized);
            let m = crate::model::llama::LlamaForCausalLM::from_weights(g.config, &w).unwrap();
            (m, n)
        };
        let ((dense, n_dense), (quantized, n_quantized)) = (build(false), build(true));
        // q, k, o, gate, up, down in both layers; v is F16 in the file.
        assert_eq!((n_dense, n_quantized), (0, 6 * cfg.num_hidden_layers));
        let bytes = |m: &crate::model::llama::LlamaForCausalLM| -> usize {
            m.layers
                .iter()
                .flat_map(|l| l.linears.iter())
                .map(|l| l.base.weight.storage_bytes())
                .sum()
        };
        assert!(bytes(&quantized) * 3 < bytes(&dense));
        let ids = [3u32, 7, 1, 12, 5, 9];
        let a = crate::model::generate::next_logits(&dense, &ids).unwrap();
        let b = crate::model::generate::next_logits(&quantized, &ids).unwrap();
        assert_eq!(a, b);
        let e = load_llama_opts(
            &tmp.path().join("absent.gguf"),
            DType::F32,
            &Device::Cpu,
            true,
        );
        assert!(e.is_err());
    }

    #[test]
    fn gguf_tokenizer_matches_llamacpp_rules() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("tok.gguf");
        let cfg = tiny_config(true);
        write_gguf(&path, &cfg, &random_tensors(&cfg, 1), f32s, |_, _| {});
        let (tok, _) = load_tokenizer(&path).unwrap();
        let id = |t: &str| tok.token_to_id(t).unwrap();
        let enc = |s: &str| tok.encode(s, false).unwrap().get_ids().to_vec();
        assert_eq!(enc("the"), vec![id("t"), id("he")]);
        assert_eq!(enc(" the in"), vec![id("Ġthe"), id("Ġ"), id("in")]);
        // Control and user-defined tokens are single ids, even glued to text.
        assert_eq!(
            enc("<|im_start|>the<user_tok>"),
            vec![1, id("t"), id("he"), id("<user_tok>")]
        );
        // Digits are split one by one (the "smollm" pre-tokenizer), before the GPT-2 regex.
        let digit = |c: char| id(&c.to_string());
        assert_eq!(enc("2024"), "2024".chars().map(digit).collect::<Vec<_>>());
        for text in ["the <|im_end|> in", "Größe 東京 🙂\n\ttabs", "x1 22"] {
            let ids = enc(text);
            assert_eq!(tok.decode(&ids, false).unwrap(), text);
        }
        assert_eq!(tok.decode(&enc("a<|im_end|>"), true).unwrap(), "a");
        assert_eq!(tok.encode("the", true).unwrap().get_ids()[0], id("t"));

        // A file that asks for BOS gets it with add_special_tokens.
        write_gguf(&path, &cfg, &random_tensors(&cfg, 1), f32s, |md, _| {
            md.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)))
        });
        let (tok, _) = load_tokenizer(&path).unwrap();
        assert_eq!(
            tok.encode("the", true).unwrap().get_ids(),
            [1, id("t"), id("he")]
        );
        assert_eq!(
            tok.encode("the", false).unwrap().get_ids(),
            [id("t"), id("he")]
        );
    }

    type Edit<'a> = &'a dyn Fn(&mut Vec<(String, Value)>, &mut Vec<(String, QTensor)>);

    #[test]
    fn bad_metadata_and_shapes_are_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = tiny_config(true);
        let hf = random_tensors(&cfg, 2);
        let path = tmp.path().join("bad.gguf");
        let err_of = |edit: Edit| {
            write_gguf(&path, &cfg, &hf, f32s, edit);
            let e = load_llama(&path, DType::F32, &Device::Cpu).unwrap_err();
            assert!(e.to_string().contains("bad.gguf"), "{e}");
            e
        };
        let set = |md: &mut Vec<(String, Value)>, key: &str, v: Value| {
            md.iter_mut().find(|(k, _)| k == key).unwrap().1 = v;
        };

        let e = err_of(&|md, _| set(md, "llama.attention.head_count_kv", Value::U32(1)));
        match &e {
            IoError::WrongShape { name, expected, .. } => {
                // Sorted by name when written: blk.0.attn_k comes first among the wrong ones.
                assert!(name.starts_with("blk.0.attn_k.weight"), "{e}");
                assert_eq!(expected, &vec![8, 32]);
            }
            other => panic!("{other}"),
        }
        let e = err_of(&|_, ts| ts.retain(|(n, _)| n != "blk.1.ffn_up.weight"));
        assert!(matches!(e, IoError::MissingTensor { .. }), "{e}");
        assert!(
            e.to_string().contains("model.layers.1.mlp.up_proj.weight"),
            "{e}"
        );
        let e = err_of(&|_, ts| {
            let t = QTensor::quantize(
                &Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
                GgmlDType::F32,
            );
            ts.push(("rope_freqs.weight".into(), t.unwrap()));
        });
        assert!(e.to_string().contains("rope_freqs.weight"), "{e}");
        let e = err_of(&|md, _| set(md, "general.architecture", Value::String("qwen2".into())));
        assert!(e.to_string().contains("qwen2"), "{e}");
        let e = err_of(&|md, _| set(md, "tokenizer.ggml.pre", Value::String("falcon".into())));
        assert!(e.to_string().contains("falcon"), "{e}");
        let e = err_of(&|md, _| md.retain(|(k, _)| k != "llama.embedding_length"));
        assert!(e.to_string().contains("llama.embedding_length"), "{e}");
        let e = err_of(&|md, _| set(md, "llama.block_count", Value::String("2".into())));
        assert!(e.to_string().contains("llama.block_count"), "{e}");
    }

    #[test]
    fn truncated_or_garbage_files_are_invalid_not_panics() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = tiny_config(true);
        let full = tmp.path().join("full.gguf");
        write_gguf(&full, &cfg, &random_tensors(&cfg, 3), f32s, |_, _| {});
        let bytes = std::fs::read(&full).unwrap();
        let cut = tmp.path().join("cut.gguf");
        // Cut everywhere in the header, and at a spread of points in the tensor data.
        let mut points: Vec<usize> = (0..4096.min(bytes.len())).step_by(7).collect();
        points.extend((4096..bytes.len()).step_by(bytes.len() / 50));
        for n in points {
            std::fs::write(&cut, &bytes[..n]).unwrap();
            let err = load_llama(&cut, DType::F32, &Device::Cpu).unwrap_err();
            assert!(matches!(err, IoError::Invalid { .. }), "cut at {n}: {err}");
            assert!(err.to_string().contains("cut.gguf"), "{err}");
        }
        std::fs::write(&cut, b"definitely not a gguf file").unwrap();
        let err = load_llama(&cut, DType::F32, &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("not a readable GGUF"), "{err}");
        let err = load_llama(&tmp.path().join("absent.gguf"), DType::F32, &Device::Cpu);
        assert!(matches!(err, Err(IoError::Missing { .. })));
    }

    fn write_hf(dir: &Path, cfg: &LlamaConfig, hf: &HashMap<String, Tensor>, shards: usize) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("config.json"), serde_json::to_string(cfg).unwrap()).unwrap();
        let gguf = dir.join("tok.gguf");
        write_gguf(&gguf, cfg, hf, f32s, |_, _| {});
        let (tok, _) = load_tokenizer(&gguf).unwrap();
        tok.save(dir.join("tokenizer.json"), false).unwrap();
        std::fs::remove_file(&gguf).unwrap();
        let mut names: Vec<&String> = hf.keys().collect();
        names.sort();
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = names
            .iter()
            .map(|n| {
                let t = &hf[*n];
                let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                let b = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                (n.to_string(), t.dims().to_vec(), b)
            })
            .collect();
        let write = |file: &str, part: &[(String, Vec<usize>, Vec<u8>)]| {
            let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = part
                .iter()
                .map(|(n, s, b)| {
                    let v =
                        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b);
                    (n.clone(), v.unwrap())
                })
                .collect();
            safetensors::serialize_to_file(views, None, &dir.join(file)).unwrap();
        };
        if shards == 1 {
            write("model.safetensors", &bytes);
        } else {
            let per = bytes.len().div_ceil(shards);
            let mut map = serde_json::Map::new();
            for (i, part) in bytes.chunks(per).enumerate() {
                let file = format!("model-{:05}-of-{shards:05}.safetensors", i + 1);
                write(&file, part);
                for (n, _, _) in part {
                    map.insert(n.clone(), file.clone().into());
                }
            }
            let index = serde_json::json!({"metadata": {}, "weight_map": map});
            std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
        }
    }

    /// The same weights as a GGUF and as a Hugging Face folder (one file, or three shards with an
    /// index) give the same model: equal logits, and the folder's `tokenizer.json` encodes as the
    /// GGUF's tokenizer does.
    #[test]
    fn hf_folder_single_and_sharded_equal_the_gguf() {
        use crate::model::llama::LlamaForCausalLM;
        use crate::model::{CausalLm, LmBatch};
        let tmp = tempfile::tempdir().unwrap();
        let cfg = tiny_config(false);
        let hf = random_tensors(&cfg, 11);
        let gguf = tmp.path().join("m.gguf");
        write_gguf(&gguf, &cfg, &hf, f32s, |_, _| {});
        let g = load_llama(&gguf, DType::F32, &Device::Cpu).unwrap();
        let w = Weights::from_tensors(g.tensors, DType::F32, &Device::Cpu);
        let from_gguf = LlamaForCausalLM::from_weights(g.config.clone(), &w).unwrap();
        let ids = Tensor::new(&[[3u32, 9, 17, 4, 22, 8]], &Device::Cpu).unwrap();
        let b = LmBatch {
            input_ids: ids,
            mask_add: Tensor::zeros((1, 1, 1, 6), DType::F32, &Device::Cpu).unwrap(),
            targets: vec![-100; 6],
            batch: 1,
            seq: 6,
        };
        let want = CausalLm::logits(&from_gguf, &b).unwrap();
        for shards in [1, 3] {
            let dir = tmp.path().join(format!("hf{shards}"));
            write_hf(&dir, &cfg, &hf, shards);
            assert_eq!(dir.join("model.safetensors").exists(), shards == 1);
            let m = LlamaForCausalLM::load_hf(&dir, DType::F32, &Device::Cpu).unwrap();
            assert_eq!(m.config, g.config);
            assert_eq!(max_diff(&CausalLm::logits(&m, &b).unwrap(), &want), 0.0);
            let tok = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
            let text = "<|im_start|>the 42 Größe";
            assert_eq!(
                tok.encode(text, false).unwrap().get_ids(),
                g.tokenizer.encode(text, false).unwrap().get_ids()
            );
        }
        // A shape that disagrees with config.json is named.
        let dir = tmp.path().join("hf1");
        let mut bad = cfg.clone();
        bad.intermediate_size = 48;
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_string(&bad).unwrap(),
        )
        .unwrap();
        let e = LlamaForCausalLM::load_hf(&dir, DType::F32, &Device::Cpu).unwrap_err();
        assert!(matches!(e, IoError::WrongShape { .. }), "{e}");
        std::fs::remove_file(dir.join("model.safetensors")).unwrap();
        let e = LlamaForCausalLM::load_hf(&dir, DType::F32, &Device::Cpu).unwrap_err();
        assert!(matches!(e, IoError::Missing { .. }), "{e}");
    }

    /// A GGUF converted from a Llama 3.1-style model carries the rope scaling as llama.cpp's
    /// `rope_freqs` divisors: it computes what the same weights compute with the `llama3` config,
    /// and not what they compute unscaled. A tensor of the wrong length is named.
    #[test]
    fn rope_freqs_tensor_matches_the_llama3_config() {
        use crate::model::llama::LlamaForCausalLM;
        use crate::model::{CausalLm, LmBatch};
        let tmp = tempfile::tempdir().unwrap();
        let cfg = tiny_config(false);
        let hf = random_tensors(&cfg, 13);
        let (factor, low, high, old) = (8.0f64, 1.0f64, 4.0f64, 256usize);
        // As convert_hf_to_gguf.py writes them for rope_type llama3.
        let d = cfg.head_dim();
        let factors: Vec<f32> = (0..d / 2)
            .map(|i| {
                let freq = 1.0 / (cfg.rope_theta as f32).powf((2 * i) as f32 / d as f32);
                let wavelen = 2.0 * std::f64::consts::PI / freq as f64;
                let (low_wl, high_wl) = (old as f64 / low, old as f64 / high);
                if wavelen < high_wl {
                    1.0
                } else if wavelen > low_wl {
                    factor as f32
                } else {
                    let s = (old as f64 / wavelen - low) / (high - low);
                    (1.0 / ((1.0 - s) / factor + s)) as f32
                }
            })
            .collect();
        assert!(factors[0] == 1.0 && factors[3] == 8.0 && factors[1] > 1.0 && factors[1] < 8.0);
        let write = |path: &Path, f: Vec<f32>| {
            write_gguf(path, &cfg, &hf, f32s, |_, ts| {
                let t = Tensor::new(f.as_slice(), &Device::Cpu).unwrap();
                ts.push((
                    ROPE_FREQS.into(),
                    QTensor::quantize(&t, GgmlDType::F32).unwrap(),
                ));
            })
        };
        let path = tmp.path().join("l3.gguf");
        write(&path, factors.clone());
        let g = load_llama(&path, DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(
            g.config.rope_scaling,
            Some(RopeScaling::Factors { .. })
        ));
        let model = |rope: Option<RopeScaling>| {
            let mut c = g.config.clone();
            c.rope_scaling = rope;
            let w = Weights::from_tensors(g.tensors.clone(), DType::F32, &Device::Cpu);
            LlamaForCausalLM::from_weights(c, &w).unwrap()
        };
        let ids: Vec<u32> = (0..24).map(|i| (i * 7 + 3) % 40).collect();
        let b = LmBatch {
            input_ids: Tensor::from_vec(ids, (1, 24), &Device::Cpu).unwrap(),
            mask_add: Tensor::zeros((1, 1, 1, 24), DType::F32, &Device::Cpu).unwrap(),
            targets: vec![-100; 24],
            batch: 1,
            seq: 24,
        };
        let logits = |m: &LlamaForCausalLM| CausalLm::logits(m, &b).unwrap();
        let from_gguf = logits(&model(g.config.rope_scaling.clone()));
        let llama3 = logits(&model(Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_max_position_embeddings: old,
        })));
        let unscaled = logits(&model(None));
        assert!(
            max_diff(&from_gguf, &llama3) < 1e-5,
            "{}",
            max_diff(&from_gguf, &llama3)
        );
        assert!(max_diff(&from_gguf, &unscaled) > 1e-3);

        let bad = tmp.path().join("bad.gguf");
        write(&bad, vec![1.0; 3]);
        let e = load_llama(&bad, DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.gguf") && e.contains(ROPE_FREQS), "{e}");
    }

    // ------------------------------------------------------------ the real SmolLM2 asset

    /// The fetched SmolLM2 GGUF, or `None` (and a note) when it is not in the cache.
    fn smollm2() -> Option<PathBuf> {
        let cache = crate::io::fetch::default_cache_dir();
        match crate::io::fetch::smollm2_gguf(&cache) {
            Ok(p) => Some(p),
            // scripts/test.sh (CI) fetches the asset and sets SAFETUNE_REQUIRE_ASSETS: there a
            // missing file fails the test instead of skipping it.
            Err(e) if std::env::var_os("SAFETUNE_REQUIRE_ASSETS").is_some() => {
                panic!("SmolLM2 GGUF not available ({e})")
            }
            Err(e) => {
                eprintln!("skipping: SmolLM2 GGUF not available ({e}); run `safetune fetch`");
                None
            }
        }
    }

    /// The loaded model continues "The capital of France is" with " Paris" (greedy).
    #[test]
    fn smollm2_says_paris() {
        let Some(path) = smollm2() else { return };
        let g = load_llama(&path, DType::F32, &Device::Cpu).unwrap();
        let tok = g.tokenizer.clone();
        let w = crate::io::weights::Weights::from_tensors(g.tensors, DType::F32, &Device::Cpu);
        let m = crate::model::llama::LlamaForCausalLM::from_weights(g.config, &w).unwrap();
        let ids = tok.encode("The capital of France is", false).unwrap();
        let logits = crate::model::generate::next_logits(&m, ids.get_ids()).unwrap();
        let best = (0..logits.len())
            .max_by(|&i, &j| logits[i].total_cmp(&logits[j]))
            .unwrap();
        assert_eq!(tok.decode(&[best as u32], false).unwrap(), " Paris");
        // The same with the projections kept in Q4_1: the same logits, bit for bit.
        let g = load_llama_opts(&path, DType::F32, &Device::Cpu, true).unwrap();
        let w = crate::io::weights::Weights::from_tensors(g.tensors, DType::F32, &Device::Cpu)
            .with_quantized(g.quantized);
        let q = crate::model::llama::LlamaForCausalLM::from_weights(g.config, &w).unwrap();
        assert_eq!(
            crate::model::generate::next_logits(&q, ids.get_ids()).unwrap(),
            logits
        );
    }

    #[test]
    fn smollm2_tokenizer() {
        let Some(path) = smollm2() else { return };
        let (tok, template) = load_tokenizer(&path).unwrap();
        assert!(template.unwrap().contains("<|im_start|>"));
        assert_eq!(tok.get_vocab_size(true), 49152);
        let text = "The capital of France is";
        let enc = tok.encode(text, false).unwrap();
        eprintln!("{text:?} -> {:?} {:?}", enc.get_ids(), enc.get_tokens());
        assert_eq!(
            enc.get_tokens(),
            ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]
        );
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
        for (s, id) in [("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2)] {
            assert_eq!(tok.encode(s, false).unwrap().get_ids(), [id]);
        }
        let chat = "<|im_start|>user\nHi!<|im_end|>\n";
        let ids = tok.encode(chat, false).unwrap().get_ids().to_vec();
        assert_eq!((ids[0], ids[ids.len() - 2]), (1, 2));
        assert_eq!(tok.decode(&ids, false).unwrap(), chat);
        assert_eq!(tok.encode("12345", false).unwrap().len(), 5);
        for s in [
            "Größe und Maße",
            "東京は日本の首都です",
            "emoji 🙂🚀 done",
            "naïve café",
        ] {
            let ids = tok.encode(s, false).unwrap().get_ids().to_vec();
            assert_eq!(tok.decode(&ids, false).unwrap(), s);
        }
    }

    #[test]
    fn smollm2_loads_and_truncated_copy_is_invalid() {
        let Some(path) = smollm2() else { return };
        let m = load_llama(&path, DType::F32, &Device::Cpu).unwrap();
        let c = &m.config;
        assert_eq!(
            (c.hidden_size, c.intermediate_size, c.num_hidden_layers),
            (576, 1536, 30)
        );
        assert_eq!(
            (c.num_attention_heads, c.kv_heads(), c.vocab_size),
            (9, 3, 49152)
        );
        assert_eq!((c.rms_norm_eps, c.rope_theta), (1e-5, 100000.0));
        assert_eq!((c.bos_token_id, c.eos_token_id.clone()), (Some(1), vec![2]));
        assert!(c.tie_word_embeddings);
        assert_eq!(m.tensors.len(), 2 + 9 * 30);

        let tmp = tempfile::tempdir().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        for n in [100_000, bytes.len() / 2, bytes.len() - 1] {
            let cut = tmp.path().join("SmolLM2-truncated.gguf");
            std::fs::write(&cut, &bytes[..n]).unwrap();
            let err = load_llama(&cut, DType::F32, &Device::Cpu).unwrap_err();
            assert!(matches!(err, IoError::Invalid { .. }), "{err}");
            assert!(err.to_string().contains("SmolLM2-truncated.gguf"), "{err}");
        }
    }

    /// For the opt-in tests: a missing asset is a failure, not a silent pass.
    fn smollm2_required() -> PathBuf {
        smollm2().expect("these tests need the SmolLM2 asset (SAFETUNE_CACHE)")
    }

    fn reference(args: &[&str]) -> String {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/llama_reference.py");
        let out = std::process::Command::new("python3")
            .arg(script)
            .args(args)
            .output()
            .expect("python3 with numpy");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Every tensor of the Rust loader against the numpy reference's own parser, dequantizer and
    /// un-permutation: checksums for all 272 tensors, element by element for the first and last
    /// layers and the embedding.
    #[test]
    #[ignore = "needs the SmolLM2 asset and python3 + numpy (about a minute)"]
    fn smollm2_dequant_matches_numpy_reference() {
        let path = smollm2_required();
        let m = load_llama(&path, DType::F32, &Device::Cpu).unwrap();
        let p = path.to_str().unwrap();
        let mut checked = 0;
        for line in reference(&[p, "--dump-dequant", "all"]).lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let name = v["name"].as_str().unwrap();
            let x: Vec<f64> = m.tensors[name]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(f64::from)
                .collect();
            let sumsq: f64 = x.iter().map(|a| a * a).sum();
            let sum: f64 = x.iter().sum();
            let wsum: f64 = x
                .iter()
                .enumerate()
                .map(|(i, a)| a * ((i % 97) as f64 + 1.0))
                .sum();
            let scale = (sumsq * x.len() as f64).sqrt();
            for (key, mine) in [("sum", sum), ("sumsq", sumsq), ("wsum", wsum)] {
                let theirs = v[key].as_f64().unwrap();
                let tol = 1e-9 * scale.max(1.0) * if key == "wsum" { 97.0 } else { 1.0 };
                assert!(
                    (mine - theirs).abs() <= tol,
                    "{name} {key}: {mine} vs {theirs}"
                );
            }
            checked += 1;
        }
        assert_eq!(checked, m.tensors.len());

        let tmp = tempfile::tempdir().unwrap();
        let mut names = vec![
            "model.embed_tokens.weight".to_string(),
            "model.norm.weight".into(),
        ];
        names.extend(
            m.tensors
                .keys()
                .filter(|n| n.starts_with("model.layers.0.") || n.starts_with("model.layers.29."))
                .cloned(),
        );
        let dir = tmp.path().to_str().unwrap();
        reference(&[
            p,
            "--dump-dequant",
            &names.join(","),
            "--npy-dir",
            dir,
            "--count",
            "0",
        ]);
        for name in &names {
            let theirs = Tensor::read_npy(tmp.path().join(format!("{name}.npy"))).unwrap();
            let d = max_diff(&m.tensors[name], &theirs);
            eprintln!("{name}: max |rust - numpy| = {d}");
            assert_eq!(d, 0.0, "{name}");
        }
    }

    /// The reference's dequantizers for the types this file lacks, against candle's: a GGUF of
    /// one random tensor per ggml type, written by candle.
    #[test]
    #[ignore = "needs python3 + numpy"]
    fn reference_dequantizes_every_type_like_candle() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("types.gguf");
        let mut rng = StdRng::seed_from_u64(5);
        let v: Vec<f32> = (0..4 * 512).map(|_| rng.random_range(-2.0..2.0)).collect();
        let src = Tensor::from_vec(v, (4, 512), &Device::Cpu).unwrap();
        let types = [
            ("f32", GgmlDType::F32),
            ("f16", GgmlDType::F16),
            ("bf16", GgmlDType::BF16),
            ("q4_0", GgmlDType::Q4_0),
            ("q4_1", GgmlDType::Q4_1),
            ("q5_0", GgmlDType::Q5_0),
            ("q5_1", GgmlDType::Q5_1),
            ("q8_0", GgmlDType::Q8_0),
            ("q4_k", GgmlDType::Q4K),
            ("q5_k", GgmlDType::Q5K),
            ("q6_k", GgmlDType::Q6K),
        ];
        let qs: Vec<(&str, QTensor)> = types
            .iter()
            .map(|(n, t)| (*n, QTensor::quantize(&src, *t).unwrap()))
            .collect();
        let refs: Vec<(&str, &QTensor)> = qs.iter().map(|(n, q)| (*n, q)).collect();
        gguf_file::write(&mut File::create(&path).unwrap(), &[], &refs).unwrap();
        let names: Vec<&str> = types.iter().map(|t| t.0).collect();
        let dir = tmp.path().to_str().unwrap();
        let p = path.to_str().unwrap();
        reference(&[p, "--dump-dequant", &names.join(","), "--npy-dir", dir]);
        for (name, q) in &qs {
            let ours = q.dequantize(&Device::Cpu).unwrap();
            let theirs = Tensor::read_npy(tmp.path().join(format!("{name}.npy"))).unwrap();
            let d = max_diff(&ours, &theirs);
            eprintln!(
                "{name}: max |candle - numpy| = {d}, quantization error {}",
                max_diff(&ours, &src)
            );
            assert_eq!(d, 0.0, "{name}");
        }
    }

    /// The ids of the prompt, and the reference's next token for them.
    #[test]
    #[ignore = "needs the SmolLM2 asset and python3 + numpy (about 20 s)"]
    fn smollm2_reference_completes_the_capital_of_france() {
        let path = smollm2_required();
        let (tok, _) = load_tokenizer(&path).unwrap();
        let ids = tok
            .encode("The capital of France is", false)
            .unwrap()
            .get_ids()
            .to_vec();
        let ids = ids
            .iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let out = reference(&[path.to_str().unwrap(), "--ids", &ids, "--top", "5"]);
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        eprintln!("ids {ids}: {}", v["top"]);
        let best = v["top"][0]["id"].as_u64().unwrap() as u32;
        assert_eq!(tok.id_to_token(best).as_deref(), Some("ĠParis"));
    }
}
