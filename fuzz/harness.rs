//! What each fuzz target does with its input, shared by the targets (`fuzz_targets/*.rs`, nightly,
//! cargo-fuzz) and by `tests/fuzz_corpus.rs` (stable), which replays the kept corpora through the
//! same functions.
//!
//! Each `check_*` writes the bytes where safetune reads the file from (a model folder, an adapter
//! folder, a data file under `dir`), calls the same public entry points the commands use, and
//! returns whether the file was accepted. A refused file must come back as an error that names
//! it (a path under `dir`); a panic, an abort or an allocation the input's size does not justify
//! is the bug the fuzzer looks for.

#![allow(dead_code)] // each target uses one check

use candle_core::{DType, Device};
use rand::SeedableRng;
use safetune::adapters::Adapted;
use safetune::data::{TableFormat, TableSpec, TaskKind};
use safetune::model::CausalLm;
use safetune::model::{BertConfig, BertForSequenceClassification, Decoder, LlamaConfig};
use std::path::Path;

/// A tiny BERT `config.json` (the fixture `tests/fixtures/hf/bert-padded`, shrunk).
pub const BERT_CONFIG: &str = r#"{"model_type": "bert", "hidden_size": 4, "intermediate_size": 8,
 "num_attention_heads": 2, "num_hidden_layers": 1, "vocab_size": 8, "max_position_embeddings": 8,
 "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu"}"#;
/// A tiny LLaMA `config.json` (the fixture `tests/fixtures/hf/llama2-linear`, shrunk).
pub const LLAMA_CONFIG: &str = r#"{"model_type": "llama", "hidden_size": 4, "intermediate_size": 8,
 "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 1, "vocab_size": 8,
 "max_position_embeddings": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
 "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2}"#;
/// A tiny GPT-2 `config.json` (the fixture `tests/fixtures/hf/gpt2-sharded`, shrunk).
pub const GPT2_CONFIG: &str = r#"{"model_type": "gpt2", "n_embd": 4, "n_head": 2, "n_layer": 1,
 "n_positions": 8, "vocab_size": 8, "activation_function": "gelu_new",
 "layer_norm_epsilon": 1e-05, "bos_token_id": 1, "eos_token_id": 2}"#;

/// The model folders of the `weights` target, picked by the input's first byte (mod 3).
pub const WEIGHT_MODELS: [(&str, &str); 3] = [
    ("bert", BERT_CONFIG),
    ("llama", LLAMA_CONFIG),
    ("gpt2", GPT2_CONFIG),
];

/// Separates `adapter_config.json` from `adapter_model.safetensors` in a `peft` input (a NUL
/// byte cannot appear in JSON text).
pub const PEFT_SEPARATOR: u8 = 0;

/// Panics unless `r` is Ok, or an error whose message names a file under `dir`.
fn verdict<T, E: std::fmt::Display>(r: Result<T, E>, dir: &Path) -> bool {
    match r {
        Ok(_) => true,
        Err(e) => {
            let msg = format!("{e:#}");
            let dir = dir.display().to_string();
            assert!(
                msg.contains(&dir),
                "the error does not name the file (under {dir}): {msg}"
            );
            false
        }
    }
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().expect("a file in a folder")).expect("scratch folder");
    std::fs::write(path, bytes).expect("scratch file");
}

/// `model.safetensors` of a tiny model folder, loaded as `train` (BERT) or `train-lm` (LLaMA,
/// GPT-2) loads it: header, dtypes, names and shapes against the config, finite values.
/// Input: one byte choosing the model ([`WEIGHT_MODELS`]), then the file.
pub fn check_weights(dir: &Path, data: &[u8]) -> bool {
    let Some((&which, file)) = data.split_first() else {
        return false;
    };
    let (name, config) = WEIGHT_MODELS[which as usize % WEIGHT_MODELS.len()];
    let model = dir.join(name);
    write(&model.join("config.json"), config.as_bytes());
    write(&model.join("model.safetensors"), file);
    let (dtype, cpu) = (DType::F32, Device::Cpu);
    if name == "bert" {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        verdict(
            BertForSequenceClassification::load(&model, 2, dtype, &cpu, &mut rng),
            dir,
        )
    } else {
        verdict(Decoder::load_hf(&model, dtype, &cpu), dir)
    }
}

/// A GGUF file loaded as `--model FILE.gguf` loads it: metadata, config, tokenizer from the
/// metadata, tensor infos and data (projections kept quantized, then all dequantized). An
/// accepted file's tokenizer also encodes a line of text.
pub fn check_gguf(dir: &Path, data: &[u8]) -> bool {
    let path = dir.join("model.gguf");
    write(&path, data);
    let tok = safetune::model::gguf::load_tokenizer(&path);
    if let Ok((tok, _)) = &tok {
        let _ = tok.encode("Hello world, <|im_start|> 123 héllo", true);
    }
    verdict(tok, dir);
    let quantized = safetune::model::gguf::load_llama_opts(&path, DType::F32, &Device::Cpu, true);
    verdict(quantized, dir)
        && verdict(
            safetune::model::gguf::load_llama(&path, DType::F32, &Device::Cpu),
            dir,
        )
}

/// A tiny random model of the kind PEFT's `task_type` names: a LLaMA decoder for `CAUSAL_LM`
/// (`generate`, `perplexity`), else a BERT classifier with `num_labels` outputs (`eval`).
enum PeftBase {
    Decoder(Decoder),
    Bert(BertForSequenceClassification),
}

/// An adapter folder loaded as `eval` and `generate` load one: `adapter_config.json` (LoRA
/// settings), the classifier's label count, adapters added to a tiny model as the config says,
/// then `adapter_model.safetensors` loaded into them. Input: the config, [`PEFT_SEPARATOR`], the
/// weights file.
pub fn check_peft(dir: &Path, data: &[u8]) -> bool {
    let (config, weights) = match data.iter().position(|&b| b == PEFT_SEPARATOR) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let adapter = dir.join("adapter");
    write(&adapter.join(safetune::io::peft::CONFIG_FILE), config);
    write(&adapter.join(safetune::io::peft::WEIGHTS_FILE), weights);
    verdict(load_adapter(dir, &adapter), dir)
}

fn load_adapter(dir: &Path, adapter: &Path) -> anyhow::Result<()> {
    use safetune::io::peft;
    let pc = peft::read_config(adapter)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let (dtype, cpu) = (DType::F32, Device::Cpu);
    let mut base = if pc.task_type.as_deref() == Some("CAUSAL_LM") {
        let path = dir.join("llama.json");
        write(&path, LLAMA_CONFIG.as_bytes());
        let cfg = LlamaConfig::from_file(&path)?;
        PeftBase::Decoder(Decoder::Llama(
            safetune::model::llama::LlamaForCausalLM::random(cfg, dtype, &cpu, &mut rng)?,
        ))
    } else {
        let path = dir.join("bert.json");
        write(&path, BERT_CONFIG.as_bytes());
        let cfg = BertConfig::from_file(&path)?;
        let labels = peft::num_labels(adapter, cfg.family().spec().head.out)?;
        PeftBase::Bert(BertForSequenceClassification::random(
            cfg, labels, dtype, &cpu, &mut rng,
        )?)
    };
    let layers = pc.layers_to_transform.as_deref();
    match &mut base {
        PeftBase::Decoder(m) => {
            CausalLm::add_lora(m, &pc.lora(), layers, &mut rng)?;
            peft::load(adapter, m)?;
            let _ = m.adapters();
        }
        PeftBase::Bert(m) => {
            m.add_lora(&pc.lora(), layers, &mut rng)?;
            peft::load(adapter, m)?;
        }
    }
    Ok(())
}

/// The column layouts of the `table` target (the fixtures' own): text, pair text, label, task.
const TABLE_SPECS: [(&str, Option<&str>, &str, TaskKind); 4] = [
    ("text", None, "sentiment", TaskKind::Classification),
    (
        "premise",
        Some("hypothesis"),
        "label",
        TaskKind::Classification,
    ),
    ("sentence", None, "label", TaskKind::Classification),
    (
        "sentence1",
        Some("sentence2"),
        "score",
        TaskKind::Regression,
    ),
];

const TABLE_FORMATS: [TableFormat; 4] = [
    TableFormat::Csv,
    TableFormat::Tsv,
    TableFormat::Jsonl,
    TableFormat::Json,
];

/// A data table read as `--data FILE` reads it, then split as `train` splits it. Input: one byte
/// (bits 0-1 the format: CSV, TSV, JSONL, JSON; bits 2-3 the columns, [`TABLE_SPECS`]; bit 4:
/// label names given, as the train split gives them to the others), then the file.
pub fn check_table(dir: &Path, data: &[u8]) -> bool {
    let Some((&mode, file)) = data.split_first() else {
        return false;
    };
    let format = TABLE_FORMATS[(mode & 3) as usize];
    load_and_split(
        dir,
        format,
        ((mode >> 2) & 3) as usize,
        mode & 16 != 0,
        file,
    )
}

/// Writes `file` as `data.<format's extension>` under `dir`, reads it with the columns
/// `TABLE_SPECS[spec]` (and the given label names when `label_names`), and splits what it read:
/// the split must keep every example.
fn load_and_split(
    dir: &Path,
    format: TableFormat,
    spec: usize,
    label_names: bool,
    file: &[u8],
) -> bool {
    let (text, pair, label, task) = TABLE_SPECS[spec];
    let spec = TableSpec {
        format: Some(format),
        text_column: text.into(),
        text_pair_column: pair.map(String::from),
        label_column: label.into(),
        task,
        label_names: (label_names && task == TaskKind::Classification).then(|| {
            ["negative", "neutral", "positive", "0", "1", "2"]
                .map(String::from)
                .to_vec()
        }),
    };
    let path = dir.join(format!("data.{}", format.extension()));
    write(&path, file);
    let table = safetune::data::load_table(&path, &spec);
    if let Ok(ds) = &table {
        let s = safetune::data::stratified_split(ds, 0.1, 0.1, 7);
        assert_eq!(
            s.train.len() + s.validation.len() + s.test.len(),
            ds.len(),
            "the split loses or adds examples"
        );
    }
    verdict(table, dir)
}

/// Language-model data read as `train-lm --data FILE` reads it. Input: one byte (bit 0:
/// instruction records (JSONL or a JSON array) or plain text; bits 1-4: the split period, 3 to
/// 18), then the file. Text is split by position, as one file is.
pub fn check_lm(dir: &Path, data: &[u8]) -> bool {
    let Some((&mode, file)) = data.split_first() else {
        return false;
    };
    if mode & 1 == 0 {
        let path = dir.join("records.jsonl");
        write(&path, file);
        return verdict(safetune::data::lm::load_records(&path), dir);
    }
    let path = dir.join("text.txt");
    write(&path, file);
    let period = 3 + ((mode >> 1) & 15) as usize;
    let docs = safetune::data::lm::load_text(&path);
    if let Ok(docs) = &docs {
        for d in docs {
            if let Some(s) = safetune::data::lm::split_by_position(d, period) {
                let parts = [&s.train, &s.validation, &s.test];
                assert!(
                    parts.iter().all(|p| p.len() == 1 && !p[0].text.is_empty()),
                    "split_by_position returned an empty part"
                );
            }
        }
    }
    verdict(docs, dir)
}

/// A Parquet table read as `train --data FILE.parquet` reads it, then split as `train` splits
/// it. Input: one byte (bits 0-1 the columns, [`TABLE_SPECS`]; bit 2: label names given), then
/// the file.
pub fn check_parquet(dir: &Path, data: &[u8]) -> bool {
    let Some((&mode, file)) = data.split_first() else {
        return false;
    };
    load_and_split(
        dir,
        TableFormat::Parquet,
        (mode & 3) as usize,
        mode & 4 != 0,
        file,
    )
}

/// The tokenizers of the `squad` target: the QA fixtures' WordPiece (BERT) and byte-level BPE
/// (RoBERTa) `tokenizer.json`.
pub const QA_TOKENIZERS: [(&str, &str); 2] = [
    (
        "bert-qa",
        include_str!("../tests/fixtures/hf/bert-qa/tokenizer.json"),
    ),
    (
        "roberta-qa",
        include_str!("../tests/fixtures/hf/roberta-qa/tokenizer.json"),
    ),
];

/// The `doc_stride` values of the `squad` target: some at or past the window's length, or past
/// the room the question leaves for the context.
pub const QA_STRIDES: [usize; 8] = [0, 2, 4, 8, 16, 32, 64, 128];

/// The window length and stride of a `squad` input's mode byte (see [`check_squad`]).
pub fn qa_windows(mode: u8) -> (usize, usize) {
    (
        2 + 4 * (mode & 15) as usize,
        QA_STRIDES[((mode >> 4) & 7) as usize],
    )
}

/// A SQuAD v1.1 / v2.0 file read as `train --task qa --data FILE` reads it: `load_squad`, the
/// split by article, and every split cut into windows by `QaEncoder`. Input: one byte (bits 0-3:
/// the window length, 2 (the least `train` takes) to 62 tokens; bits 4-6: the stride, [`QA_STRIDES`]; bit 7: the
/// tokenizer, [`QA_TOKENIZERS`]), then the file. The tokenizer is written under `dir`, so its
/// errors name a file there too.
pub fn check_squad(dir: &Path, data: &[u8]) -> bool {
    let Some((&mode, file)) = data.split_first() else {
        return false;
    };
    let (max_length, doc_stride) = qa_windows(mode);
    let (name, tokenizer) = QA_TOKENIZERS[(mode >> 7) as usize];
    let model = dir.join(name);
    write(&model.join("tokenizer.json"), tokenizer.as_bytes());
    let path = dir.join("squad.json");
    write(&path, file);
    verdict(squad_windows(&path, &model, max_length, doc_stride), dir)
}

fn squad_windows(
    path: &Path,
    model: &Path,
    max_length: usize,
    doc_stride: usize,
) -> anyhow::Result<()> {
    use safetune::data::squad::{load_squad, QaEncoder};
    let whole = load_squad(path)?;
    let splits = whole.split_articles(0.1, 0.1, 7)?;
    assert_eq!(
        splits.iter().map(|s| s.examples.len()).sum::<usize>(),
        whole.examples.len(),
        "the split loses or adds questions"
    );
    let encoder = QaEncoder::from_model_dir(model, max_length, doc_stride)?;
    for split in &splits {
        let features = encoder.features(&split.examples)?;
        for f in &features {
            let n = f.ids.len();
            assert!(
                f.example < split.examples.len()
                    && f.type_ids.len() == n
                    && f.offsets.len() == n
                    && (f.start as usize) < n.max(1)
                    && (f.end as usize) < n.max(1),
                "a window out of bounds: {n} tokens, answer {}..{}",
                f.start,
                f.end
            );
        }
    }
    Ok(())
}
