//! Tests of the GGUF loader on files written here; `asset` has those on the real SmolLM2 file.

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
    crate::nn::gradcheck::max_abs_diff(a, b) as f32
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
        let w =
            Weights::from_tensors(g.tensors, DType::F32, &Device::Cpu).with_quantized(g.quantized);
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
    let e = err_of(&|md, _| set(md, "general.architecture", Value::String("gemma".into())));
    assert!(e.to_string().contains("architecture 'gemma'"), "{e}");
    // A qwen2 file reads its sizes under `qwen2.*` and needs the q/k/v biases.
    let e = err_of(&|md, _| set(md, "general.architecture", Value::String("qwen2".into())));
    assert!(e.to_string().contains("qwen2.attention.head_count"), "{e}");
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

/// Numbers in a GGUF header that candle's reader would divide by or multiply without a check
/// (an alignment of 0; a tensor whose dimensions overflow when multiplied) are refused with an
/// error naming the file, before candle reads the file.
#[test]
fn header_numbers_that_would_panic_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(true);
    let hf = random_tensors(&cfg, 5);
    let path = tmp.path().join("a.gguf");
    write_gguf(&path, &cfg, &hf, f32s, |md, _| {
        md.push(("general.alignment".into(), Value::U32(0)));
    });
    for f in [load_tokenizer_only, load_dequantized] {
        let e = f(&path);
        assert!(
            e.contains("a.gguf") && e.contains("general.alignment"),
            "{e}"
        );
    }
    // rope_freqs.weight is read before the shapes are checked: dimensions whose product
    // overflows.
    write_gguf(&path, &cfg, &hf, f32s, |_, ts| {
        let t = Tensor::new(&[1f32, 1.0, 1.0, 1.0], &Device::Cpu).unwrap();
        let t = t.reshape((2, 2)).unwrap();
        ts.push((
            ROPE_FREQS.into(),
            QTensor::quantize(&t, GgmlDType::F32).unwrap(),
        ));
    });
    let mut bytes = std::fs::read(&path).unwrap();
    let name = ROPE_FREQS.as_bytes();
    let at = bytes
        .windows(name.len())
        .rposition(|w| w == name)
        .expect("the tensor's name in the header")
        + name.len();
    // n_dims (u32) = 2, then the two dims (u64 each).
    assert_eq!(bytes[at..at + 4], 2u32.to_le_bytes());
    bytes[at + 4..at + 12].copy_from_slice(&(1u64 << 62).to_le_bytes());
    bytes[at + 12..at + 20].copy_from_slice(&16u64.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let e = load_dequantized(&path);
    assert!(
        e.contains("a.gguf") && e.contains(ROPE_FREQS) && e.contains("too large"),
        "{e}"
    );
}

fn load_tokenizer_only(path: &Path) -> String {
    load_tokenizer(path).map(|_| ()).unwrap_err().to_string()
}

fn load_dequantized(path: &Path) -> String {
    load_llama(path, DType::F32, &Device::Cpu)
        .map(|_| ())
        .unwrap_err()
        .to_string()
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
                let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b);
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

#[path = "gguf_asset_tests.rs"]
mod asset;
