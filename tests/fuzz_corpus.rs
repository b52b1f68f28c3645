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
    BertForSequenceClassification::checkpoint_shapes(c)
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

/// A column of a Parquet seed.
enum Column {
    Str(Vec<&'static str>),
    Int(Vec<i64>),
    Int32(Vec<i32>),
    Double(Vec<f64>),
}

/// A Parquet file as the `parquet` crate writes one (as `tests/formats.rs` does), its columns
/// in `schema`'s order; OPTIONAL columns are written without nulls (definition level 1).
fn parquet_bytes(
    schema: &str,
    columns: &[Column],
    props: parquet::file::properties::WriterProperties,
) -> Vec<u8> {
    use parquet::data_type::{ByteArray, ByteArrayType, DoubleType, Int32Type, Int64Type};
    use parquet::file::writer::SerializedFileWriter;
    let schema = std::sync::Arc::new(parquet::schema::parser::parse_message_type(schema).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.parquet");
    let file = std::fs::File::create(&path).unwrap();
    let mut w = SerializedFileWriter::new(file, schema.clone(), props.into()).unwrap();
    let mut rg = w.next_row_group().unwrap();
    for (field, values) in schema.get_fields().iter().zip(columns) {
        let optional = field.is_optional();
        let mut col = rg.next_column().unwrap().unwrap();
        let n = match values {
            Column::Str(v) => v.len(),
            Column::Int(v) => v.len(),
            Column::Int32(v) => v.len(),
            Column::Double(v) => v.len(),
        };
        let ones = vec![1i16; n];
        let def = optional.then_some(&ones[..]);
        match values {
            Column::Str(v) => {
                let v: Vec<ByteArray> = v.iter().map(|s| ByteArray::from(*s)).collect();
                col.typed::<ByteArrayType>().write_batch(&v, def, None)
            }
            Column::Int(v) => col.typed::<Int64Type>().write_batch(v, def, None),
            Column::Int32(v) => col.typed::<Int32Type>().write_batch(v, def, None),
            Column::Double(v) => col.typed::<DoubleType>().write_batch(v, def, None),
        }
        .unwrap();
        col.close().unwrap();
    }
    rg.close().unwrap();
    w.close().unwrap();
    std::fs::read(path).unwrap()
}

/// Small Parquet tables in the `parquet` target's layout (a byte choosing the columns, see
/// `check_parquet`, then the file): plain, Snappy and gzip pages, dictionary encoding on and
/// off, required and optional columns, string, integer and float labels, an unread column.
fn parquet_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use parquet::basic::{Compression, GzipLevel};
    use parquet::file::properties::WriterProperties;
    let with = |mode: u8, bytes: Vec<u8>| [vec![mode], bytes].concat();
    let texts = vec![
        "great film",
        "awful plot",
        "it was fine",
        "loved it",
        "boring",
        "ok I guess",
        "superb acting",
        "terrible",
        "average",
        "wonderful",
        "dull",
        "so-so",
    ];
    let sentiments = vec![
        "positive", "negative", "neutral", "positive", "negative", "neutral", "positive",
        "negative", "neutral", "positive", "negative", "neutral",
    ];
    let hypotheses = vec![
        "it is good",
        "it is bad",
        "it is ok",
        "it is good",
        "it is bad",
        "it is ok",
        "it is good",
        "it is bad",
        "it is ok",
        "it is good",
        "it is bad",
        "it is ok",
    ];
    let ints: Vec<i64> = (0..12).map(|i| i % 3).collect();
    let plain = || {
        WriterProperties::builder()
            .set_dictionary_enabled(false)
            .build()
    };
    let snappy = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let gzip = WriterProperties::builder()
        .set_compression(Compression::GZIP(GzipLevel::default()))
        .build();
    let sentiment = parquet_bytes(
        "message schema { REQUIRED BYTE_ARRAY text (UTF8); REQUIRED BYTE_ARRAY sentiment (UTF8); }",
        &[Column::Str(texts.clone()), Column::Str(sentiments.clone())],
        plain(),
    );
    vec![
        ("ok-sentiment-plain", with(0, sentiment.clone())),
        ("ok-sentiment-plain-names", with(4, sentiment)),
        (
            "ok-nli-int64-snappy",
            with(
                1,
                parquet_bytes(
                    "message schema { REQUIRED BYTE_ARRAY premise (UTF8); \
                     REQUIRED BYTE_ARRAY hypothesis (UTF8); REQUIRED INT64 label; }",
                    &[
                        Column::Str(texts.clone()),
                        Column::Str(hypotheses.clone()),
                        Column::Int(ints),
                    ],
                    snappy,
                ),
            ),
        ),
        (
            "ok-sentence-optional-int32",
            with(
                2,
                parquet_bytes(
                    "message schema { OPTIONAL BYTE_ARRAY idx (UTF8); \
                     OPTIONAL BYTE_ARRAY sentence (UTF8); OPTIONAL INT32 label; }",
                    &[
                        Column::Str(sentiments),
                        Column::Str(texts.clone()),
                        Column::Int32((0..12).map(|i| i % 2).collect()),
                    ],
                    plain(),
                ),
            ),
        ),
        (
            "ok-stsb-double-gzip",
            with(
                3,
                parquet_bytes(
                    "message schema { REQUIRED BYTE_ARRAY sentence1 (UTF8); \
                     REQUIRED BYTE_ARRAY sentence2 (UTF8); REQUIRED DOUBLE score; }",
                    &[
                        Column::Str(texts),
                        Column::Str(hypotheses),
                        Column::Double((0..12).map(|i| i as f64 * 0.4).collect()),
                    ],
                    gzip,
                ),
            ),
        ),
    ]
}

#[test]
fn parquet() {
    seeds_and_corpus("parquet", check_parquet, parquet_seeds());
}

/// The SQuAD fixtures in the `squad` target's layout (a byte choosing the window length,
/// stride and tokenizer, see `check_squad`, then the file), as compact JSON under the target's
/// 4096-byte inputs: v2.0 with unanswerable questions, the same questions as v1.1, the tricky
/// answers (accents, punctuation, answers at the context's ends).
fn squad_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use serde_json::{json, Value};
    let read = |name: &str| -> Value { serde_json::from_slice(&fixture(name)).unwrap() };
    let with = |mode: u8, v: &Value| [vec![mode], serde_json::to_vec(v).unwrap()].concat();
    let tiny = read("squad/tiny-v2.json");
    let articles =
        |keep: &[usize]| -> Vec<Value> { keep.iter().map(|&a| tiny["data"][a].clone()).collect() };
    let v2 = json!({"version": "v2.0", "data": articles(&[0, 2, 3, 4])});
    let mut v1_data = articles(&[0, 2, 3]);
    for article in &mut v1_data {
        for para in article["paragraphs"].as_array_mut().unwrap() {
            let qas = para["qas"].as_array_mut().unwrap();
            qas.retain(|q| q["is_impossible"] != Value::Bool(true));
            for q in qas {
                q.as_object_mut().unwrap().remove("is_impossible");
            }
        }
    }
    let v1 = json!({"version": "1.1", "data": v1_data});
    let tricky = read("squad/tricky-v2.json");
    let mode = |roberta: bool, max_length: usize, stride: usize| -> u8 {
        let m = ((max_length - 2) / 4) as u8;
        let s = QA_STRIDES.iter().position(|&x| x == stride).unwrap() as u8;
        let mode = (roberta as u8) << 7 | s << 4 | m;
        assert_eq!(qa_windows(mode), (max_length, stride));
        mode
    };
    vec![
        ("ok-tiny-v2-bert-50-8", with(mode(false, 50, 8), &v2)),
        ("ok-tiny-v1-roberta-62-16", with(mode(true, 62, 16), &v1)),
        ("ok-tricky-v2-bert-62-0", with(mode(false, 62, 0), &tricky)),
        (
            "ok-tricky-v2-roberta-26-4",
            with(mode(true, 26, 4), &tricky),
        ),
    ]
}

#[test]
fn squad() {
    seeds_and_corpus("squad", check_squad, squad_seeds());
}
