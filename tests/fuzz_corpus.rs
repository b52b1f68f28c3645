//! The fuzz targets' kept inputs, replayed on stable: every file of `fuzz/seeds/TARGET/` and
//! `fuzz/corpus/TARGET/` goes through the same `check_*` function of `fuzz/harness.rs` that the
//! target runs (the real readers on the real bytes), and must be accepted or refused with an
//! error naming the file, never panic. The seeds are also made here, from tiny models, and each
//! must load: `SAFETUNE_WRITE_FUZZ_SEEDS=1 cargo test --test fuzz_corpus` rewrites
//! `fuzz/seeds/`.

#[path = "../fuzz/harness.rs"]
mod harness;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use harness::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetune::adapters::LoraConfig;
use safetune::model::CausalLm;
use safetune::model::{BertConfig, BertForSequenceClassification, Decoder, Gpt2Config};
use safetune::model::{Gpt2LMHeadModel, LlamaConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

type Check = fn(&Path, &[u8]) -> bool;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// Every file of `fuzz/seeds/{target}` and `fuzz/corpus/{target}` through `check`; a panic is
/// reported with the file that caused it. Returns (files, accepted).
fn replay(target: &str, check: Check) -> (usize, usize) {
    let (mut files, mut accepted) = (0, 0);
    for kind in ["seeds", "corpus"] {
        let dir = fuzz_dir().join(kind).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
        paths.sort();
        for path in paths {
            let bytes = std::fs::read(&path).unwrap();
            let scratch = tempfile::tempdir().unwrap();
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                check(scratch.path(), &bytes)
            }));
            match r {
                Ok(ok) => accepted += ok as usize,
                Err(e) => {
                    eprintln!("{target}: {} panicked", path.display());
                    std::panic::resume_unwind(e)
                }
            }
            files += 1;
        }
    }
    (files, accepted)
}

/// The seeds of a target must each be accepted (so the target reaches past every check), be
/// kept as files (rewritten when `SAFETUNE_WRITE_FUZZ_SEEDS` is set), and the kept inputs must
/// all replay without a panic, some of them accepted.
fn seeds_and_corpus(target: &str, check: Check, seeds: Vec<(&str, Vec<u8>)>) {
    let dir = fuzz_dir().join("seeds").join(target);
    if std::env::var_os("SAFETUNE_WRITE_FUZZ_SEEDS").is_some() {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in &seeds {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
    for (name, bytes) in &seeds {
        let scratch = tempfile::tempdir().unwrap();
        assert!(
            check(scratch.path(), bytes),
            "{target}: seed {name} is refused"
        );
        assert!(
            dir.join(name).is_file(),
            "{target}: seed {name} is not kept in {}",
            dir.display()
        );
    }
    let (files, accepted) = replay(target, check);
    assert!(
        files >= seeds.len() && accepted >= seeds.len(),
        "{target}: {files} files replayed, {accepted} accepted"
    );
}

fn random(shape: &[usize], rng: &mut StdRng) -> Tensor {
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-0.5f32..0.5)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn safetensors_bytes(tensors: &HashMap<String, Tensor>, dtype: DType) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.safetensors");
    let cast: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.to_dtype(dtype).unwrap()))
        .collect();
    candle_core::safetensors::save(&cast, &path).unwrap();
    std::fs::read(path).unwrap()
}

fn config_file<T>(text: &str, read: fn(&Path) -> Result<T, safetune::io::IoError>) -> T {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, text).unwrap();
    read(&path).unwrap()
}

fn bert_config() -> BertConfig {
    config_file(BERT_CONFIG, BertConfig::from_file)
}

fn llama_config() -> LlamaConfig {
    config_file(LLAMA_CONFIG, LlamaConfig::from_file)
}

/// A BERT checkpoint's tensors (as transformers names them, with the `bert.` prefix).
fn bert_tensors(c: &BertConfig, rng: &mut StdRng) -> HashMap<String, Tensor> {
    let (h, f) = (c.hidden_size, c.intermediate_size);
    let mut shapes = vec![
        (
            "embeddings.word_embeddings.weight".to_string(),
            vec![c.vocab_size, h],
        ),
        (
            "embeddings.position_embeddings.weight".into(),
            vec![c.max_position_embeddings, h],
        ),
        (
            "embeddings.token_type_embeddings.weight".into(),
            vec![c.type_vocab_size, h],
        ),
        ("embeddings.LayerNorm.weight".into(), vec![h]),
        ("embeddings.LayerNorm.bias".into(), vec![h]),
        ("pooler.dense.weight".into(), vec![h, h]),
        ("pooler.dense.bias".into(), vec![h]),
    ];
    for i in 0..c.num_hidden_layers {
        let p = format!("encoder.layer.{i}");
        for (m, o, inp) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", f, h),
            ("output.dense", h, f),
        ] {
            shapes.push((format!("{p}.{m}.weight"), vec![o, inp]));
            shapes.push((format!("{p}.{m}.bias"), vec![o]));
        }
        for ln in ["attention.output.LayerNorm", "output.LayerNorm"] {
            shapes.push((format!("{p}.{ln}.weight"), vec![h]));
            shapes.push((format!("{p}.{ln}.bias"), vec![h]));
        }
    }
    shapes
        .into_iter()
        .map(|(n, s)| (format!("bert.{n}"), random(&s, rng)))
        .collect()
}

fn weights_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut rng = StdRng::seed_from_u64(1);
    let bert = bert_tensors(&bert_config(), &mut rng);
    let llama: HashMap<String, Tensor> = llama_config()
        .tensor_shapes()
        .into_iter()
        .map(|(n, s)| (n, random(&s, &mut rng)))
        .collect();
    let gpt2 =
        Gpt2LMHeadModel::random_tensors(&config_file(GPT2_CONFIG, Gpt2Config::from_file), &mut rng);
    let with = |model: u8, tensors: &HashMap<String, Tensor>, dtype: DType| {
        let mut v = vec![model];
        v.extend(safetensors_bytes(tensors, dtype));
        v
    };
    vec![
        ("ok-bert-f32", with(0, &bert, DType::F32)),
        ("ok-bert-f16", with(0, &bert, DType::F16)),
        ("ok-llama-f32", with(1, &llama, DType::F32)),
        ("ok-llama-bf16", with(1, &llama, DType::BF16)),
        ("ok-gpt2-f32", with(2, &gpt2, DType::F32)),
    ]
}

#[test]
fn weights() {
    seeds_and_corpus("weights", check_weights, weights_seeds());
}

/// A tiny LLaMA-layout GGUF as llama.cpp lays one out (tensor names, metadata keys, a byte-level
/// BPE vocab with control tokens), its tensors in `dtype`.
fn gguf_bytes(arch: &str, pre: &str, hidden: usize, dtype: GgmlDType) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(2);
    let tokens = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "H",
        "e",
        "l",
        "o",
        "Ġ",
        "w",
        "r",
        "d",
        "He",
        "ll",
    ];
    let types = [3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1];
    let (heads, kv, inter, vocab) = (2, 1, hidden * 2, tokens.len());
    let head_dim = hidden / heads;
    let u = |x: usize| Value::U32(x as u32);
    let key = |k: &str| format!("{arch}.{k}");
    let md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (key("block_count"), u(1)),
        (key("context_length"), u(16)),
        (key("embedding_length"), u(hidden)),
        (key("feed_forward_length"), u(inter)),
        (key("attention.head_count"), u(heads)),
        (key("attention.head_count_kv"), u(kv)),
        (key("rope.freq_base"), Value::F32(10000.0)),
        (key("attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        (key("rope.dimension_count"), u(head_dim)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(
                tokens
                    .iter()
                    .map(|t| Value::String(t.to_string()))
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.iter().map(|&t| Value::I32(t)).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(vec![
                Value::String("H e".into()),
                Value::String("l l".into()),
            ]),
        ),
        ("tokenizer.ggml.bos_token_id".into(), u(1)),
        ("tokenizer.ggml.eos_token_id".into(), u(2)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
        (
            "tokenizer.chat_template".into(),
            Value::String("{% for m in messages %}{{ m.content }}{% endfor %}".into()),
        ),
    ];
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("token_embd.weight".into(), vec![vocab, hidden]),
        ("output_norm.weight".into(), vec![hidden]),
    ];
    let (q, k) = (heads * head_dim, kv * head_dim);
    for (m, s) in [
        ("attn_q.weight", vec![q, hidden]),
        ("attn_k.weight", vec![k, hidden]),
        ("attn_v.weight", vec![k, hidden]),
        ("attn_output.weight", vec![hidden, q]),
        ("ffn_gate.weight", vec![inter, hidden]),
        ("ffn_up.weight", vec![inter, hidden]),
        ("ffn_down.weight", vec![hidden, inter]),
        ("attn_norm.weight", vec![hidden]),
        ("ffn_norm.weight", vec![hidden]),
    ] {
        shapes.push((format!("blk.0.{m}"), s));
    }
    if arch == "qwen2" {
        for (m, n) in [("attn_q.bias", q), ("attn_k.bias", k), ("attn_v.bias", k)] {
            shapes.push((format!("blk.0.{m}"), vec![n]));
        }
    }
    let ts: Vec<(String, QTensor)> = shapes
        .into_iter()
        .map(|(name, shape)| {
            let quantize = shape.len() == 2 && name.starts_with("blk.");
            let t = random(&shape, &mut rng);
            let q = QTensor::quantize(&t, if quantize { dtype } else { GgmlDType::F32 }).unwrap();
            (name, q)
        })
        .collect();
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = ts.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &md_refs, &t_refs).unwrap();
    out.into_inner()
}

#[test]
fn gguf() {
    seeds_and_corpus(
        "gguf",
        check_gguf,
        vec![
            (
                "ok-llama-f32.gguf",
                gguf_bytes("llama", "smollm", 4, GgmlDType::F32),
            ),
            (
                "ok-qwen2-f16.gguf",
                gguf_bytes("qwen2", "qwen2", 4, GgmlDType::F16),
            ),
            (
                "ok-llama-q8_0.gguf",
                gguf_bytes("llama", "llama-bpe", 32, GgmlDType::Q8_0),
            ),
        ],
    );
}

/// An adapter folder as `save` writes it, in the `peft` target's input layout.
fn peft_input(dir: &Path) -> Vec<u8> {
    let mut v = std::fs::read(dir.join(safetune::io::peft::CONFIG_FILE)).unwrap();
    v.push(PEFT_SEPARATOR);
    v.extend(std::fs::read(dir.join(safetune::io::peft::WEIGHTS_FILE)).unwrap());
    v
}

fn peft_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut rng = StdRng::seed_from_u64(3);
    let dir = tempfile::tempdir().unwrap();
    let lora = |targets: &[&str], r| LoraConfig {
        r,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: targets.iter().map(|t| t.to_string()).collect(),
        use_rslora: false,
    };
    let (cpu, f32) = (Device::Cpu, DType::F32);
    let mut bert =
        BertForSequenceClassification::random(bert_config(), 3, f32, &cpu, &mut rng).unwrap();
    let cfg = lora(&["query", "value"], 2);
    bert.add_lora(&cfg, None, &mut rng).unwrap();
    let bert_dir = dir.path().join("bert");
    safetune::io::peft::save(&bert_dir, &bert, &cfg, "tiny-bert").unwrap();
    let mut llama = Decoder::Llama(
        safetune::model::llama::LlamaForCausalLM::random(llama_config(), f32, &cpu, &mut rng)
            .unwrap(),
    );
    let cfg = lora(&["all-linear"], 1);
    CausalLm::add_lora(&mut llama, &cfg, None, &mut rng).unwrap();
    let llama_dir = dir.path().join("llama");
    safetune::io::peft::save(&llama_dir, &llama, &cfg, "tiny-llama").unwrap();
    vec![
        ("ok-bert-seq-cls", peft_input(&bert_dir)),
        ("ok-llama-causal-lm", peft_input(&llama_dir)),
    ]
}

#[test]
fn peft() {
    seeds_and_corpus("peft", check_peft, peft_seeds());
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap()
}

/// The fixture tables with the mode byte of their format and columns (see `check_table`).
fn table_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let with = |mode: u8, bytes: Vec<u8>| [vec![mode], bytes].concat();
    let jsonl = fixture("small.jsonl");
    let array = format!(
        "[{}]",
        String::from_utf8(jsonl.clone())
            .unwrap()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect::<Vec<_>>()
            .join(",\n")
    );
    vec![
        ("ok-small-csv", with(0, fixture("small.csv"))),
        ("ok-small-csv-names", with(16, fixture("small.csv"))),
        ("ok-small-jsonl", with(2 | 4, jsonl)),
        ("ok-small-json-array", with(3 | 4, array.into_bytes())),
        ("ok-sst2-tsv", with(1 | 8, fixture("glue/sst2/train.tsv"))),
        ("ok-stsb-tsv", with(1 | 12, fixture("glue/stsb/train.tsv"))),
    ]
}

#[test]
fn table() {
    seeds_and_corpus("table", check_table, table_seeds());
}

fn lm_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let with = |mode: u8, text: &str| [vec![mode], text.as_bytes().to_vec()].concat();
    let records = [
        r#"{"prompt": "Say hi.", "response": "Hi!"}"#,
        r#"{"instruction": "Add", "input": "2 and 2", "output": "4"}"#,
        r#"{"prompt": "The sky is", "completion": " blue."}"#,
        r#"{"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]}"#,
        r#"{"conversations": [{"from": "human", "value": "Hey"}, {"from": "gpt", "value": "Yo"}]}"#,
        r#"{"text": "A plain document."}"#,
    ];
    let text = "Call me Ishmael. Some years ago, never mind how long precisely, having little \
                or no money in my purse.\n\nThere now is your insular city of the Manhattoes, \
                belted round by wharves.\nIt is a way I have of driving off the spleen, and \
                regulating the circulation. Whenever I find myself growing grim about the \
                mouth; whenever it is a damp, drizzly November in my soul.\n\nThe end, héllo.";
    vec![
        ("ok-records-jsonl", with(0, &records.join("\n"))),
        (
            "ok-records-array",
            with(0, &format!("[{}]", records.join(","))),
        ),
        ("ok-text-period-10", with(1 | (7 << 1), text)),
        ("ok-text-period-3", with(1, text)),
    ]
}

#[test]
fn lm() {
    seeds_and_corpus("lm", check_lm, lm_seeds());
}
