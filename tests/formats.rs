//! A new user's data, end to end through the `safetune` binary: Parquet and JSON-array tables,
//! explicit split files, a model from the local Hugging Face cache, a BERT folder with only
//! `vocab.txt`, chat records through a chat template, and one `.txt` file for `train-lm`.
//!
//! Every command runs with `SAFETUNE_CACHE` pointed at an empty folder, so nothing is fetched.

mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `safetune ARGS` with `HF_HOME` (and nothing else of the hub's) set to `hf_home`.
fn run_with_hf_home(sb: &Sandbox, hf_home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_safetune"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("SAFETUNE_CACHE", sb.path("cache"))
        .env("HF_HOME", hf_home)
        .env_remove("HF_HUB_CACHE")
        .env_remove("RUST_LOG")
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run safetune")
}

fn tiny_bert(dir: &Path) -> PathBuf {
    write_model(dir, 1, |_, shape| shape);
    dir.to_path_buf()
}

/// Rows of a two-class sentiment set: `n` of each class, alternating.
fn rows(n: usize, tag: &str) -> Vec<(String, &'static str)> {
    (0..n)
        .flat_map(|i| {
            [
                (format!("a great {tag} film number {i}"), "pos"),
                (format!("a dull {tag} plot number {i}"), "neg"),
            ]
        })
        .collect()
}

/// A Parquet file with a UTF-8 `text` and a UTF-8 `label` column.
fn write_parquet(path: &Path, rows: &[(String, &str)]) {
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let schema = parquet::schema::parser::parse_message_type(
        "message schema { REQUIRED BYTE_ARRAY text (UTF8); REQUIRED BYTE_ARRAY label (UTF8); }",
    )
    .unwrap();
    let file = std::fs::File::create(path).unwrap();
    let props = WriterProperties::builder().build();
    let mut w = SerializedFileWriter::new(file, schema.into(), props.into()).unwrap();
    let mut rg = w.next_row_group().unwrap();
    let texts: Vec<ByteArray> = rows.iter().map(|r| ByteArray::from(r.0.as_str())).collect();
    let labels: Vec<ByteArray> = rows.iter().map(|r| ByteArray::from(r.1)).collect();
    for values in [texts, labels] {
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<ByteArrayType>()
            .write_batch(&values, None, None)
            .unwrap();
        col.close().unwrap();
    }
    rg.close().unwrap();
    w.close().unwrap();
}

fn write_json_array(path: &Path, rows: &[(String, &str)]) {
    let v: Vec<Value> = rows
        .iter()
        .map(|(t, l)| serde_json::json!({"text": t, "label": l}))
        .collect();
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn write_csv(path: &Path, rows: &[(String, &str)]) {
    let mut s = String::from("text,label\n");
    for (t, l) in rows {
        s += &format!("{t},{l}\n");
    }
    std::fs::write(path, s).unwrap();
}

const TRAIN_FLAGS: [&str; 9] = [
    "--batch-size",
    "4",
    "--max-length",
    "32",
    "--seed",
    "7",
    "--epochs",
    "1",
    "--quiet",
];

fn steps_in(out: &Path) -> usize {
    let text = std::fs::read_to_string(out.join("steps.jsonl")).unwrap();
    text.lines().filter(|l| !l.trim().is_empty()).count()
}

/// A Parquet train file with a JSON-array validation file and a CSV test file: every train row
/// trains (40 rows at batch 4: 10 steps); without the validation file 15% of train is carved
/// out for validation (34 rows: 9 steps); a single Parquet file is split 70/15/15 (28 rows: 7).
#[test]
fn train_on_parquet_and_explicit_split_files() {
    let sb = Sandbox::new();
    let model = tiny_bert(&sb.path("model"));
    let (train, val, test) = (
        sb.path("train.parquet"),
        sb.path("val.json"),
        sb.path("test.csv"),
    );
    write_parquet(&train, &rows(20, "train"));
    write_json_array(&val, &rows(3, "val"));
    write_csv(&test, &rows(2, "test"));
    let out = sb.path("out");
    let mut args = vec![
        "train",
        "--model",
        s(&model),
        "--train-file",
        s(&train),
        "--validation-file",
        s(&val),
        "--test-file",
        s(&test),
        "--output",
        s(&out),
    ];
    args.extend(TRAIN_FLAGS);
    sb.run_ok(&args);
    assert_eq!(steps_in(&out), 10);
    let labels = read_json(&out.join("safetune.json"));
    assert_eq!(labels["label_names"], serde_json::json!(["neg", "pos"]));
    assert!(read_json(&out.join("summary.json"))["value"].is_number());

    let out2 = sb.path("out2");
    let mut args = vec![
        "train",
        "--model",
        s(&model),
        "--train-file",
        s(&train),
        "--test-file",
        s(&test),
        "--output",
        s(&out2),
    ];
    args.extend(TRAIN_FLAGS);
    sb.run_ok(&args);
    assert_eq!(steps_in(&out2), 9);

    let out3 = sb.path("out3");
    let mut args = vec![
        "train",
        "--model",
        s(&model),
        "--data",
        s(&train),
        "--output",
        s(&out3),
    ];
    args.extend(TRAIN_FLAGS);
    sb.run_ok(&args);
    assert_eq!(steps_in(&out3), 7);
}

/// `--model ORG/NAME` finds the model in `$HF_HOME/hub` (the snapshot `refs/main` names) for
/// `train` and `eval`; its folder has only `vocab.txt` as tokenizer.
#[test]
fn a_model_id_from_the_hf_cache_with_only_vocab_txt() {
    let sb = Sandbox::new();
    let hf = sb.path("hf");
    let repo = hf.join("hub/models--acme--tiny-bert");
    let snapshot = repo.join("snapshots/0123abcd");
    tiny_bert(&snapshot);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    // vocab.txt in id order from the tokenizer.json, which is removed.
    let tok = read_json(&snapshot.join("tokenizer.json"));
    let mut vocab: Vec<(&String, u64)> = tok["model"]["vocab"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(t, id)| (t, id.as_u64().unwrap()))
        .collect();
    vocab.sort_by_key(|v| v.1);
    let lines: Vec<&str> = vocab.iter().map(|v| v.0.as_str()).collect();
    std::fs::write(snapshot.join("vocab.txt"), lines.join("\n")).unwrap();
    std::fs::remove_file(snapshot.join("tokenizer.json")).unwrap();

    let data = sb.path("data.csv");
    write_csv(&data, &rows(20, "x"));
    let out = sb.path("out");
    let mut args = vec![
        "train",
        "--model",
        "acme/tiny-bert",
        "--data",
        s(&data),
        "--output",
        s(&out),
    ];
    args.extend(TRAIN_FLAGS);
    let o = run_with_hf_home(&sb, &hf, &args);
    assert!(o.status.success(), "{}", text(&o));
    let eval = [
        "eval",
        "--model",
        "acme/tiny-bert",
        "--adapter",
        s(&out),
        "--data",
        s(&data),
        "--max-length",
        "32",
        "--split",
        "all",
    ];
    let o = run_with_hf_home(&sb, &hf, &eval);
    assert!(o.status.success(), "{}", text(&o));
    let scores: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(scores["metric"].as_f64().is_some(), "{scores}");
}

/// The repository's tiny LLaMA fixture with a word-level tokenizer (64 positions), and a chat
/// template in tokenizer_config.json when `template` is given.
fn tiny_llama(dir: &Path, template: Option<&str>) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/llama2-linear");
    for name in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(name), dir.join(name)).unwrap();
    }
    let words = [
        "<unk>",
        "<s>",
        "</s>",
        "the",
        "whale",
        "sea",
        "ship",
        "and",
        "user",
        "assistant",
    ];
    let vocab: serde_json::Map<String, Value> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), i.into()))
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    if let Some(t) = template {
        let cfg = serde_json::json!({"eos_token": "</s>", "chat_template": t});
        std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    }
    dir.to_path_buf()
}

pub const WORD_TEMPLATE: &str = "{% for m in messages %}{{ m.role }} {{ m.content }} {{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}assistant {% endif %}";

/// 20 `messages` records: 16 train (4 steps at batch 4), 2 validate, 2 test, all through the
/// model's template; ShareGPT `conversations` in a JSON array train the same way.
#[test]
fn train_lm_on_messages_through_the_chat_template() {
    let sb = Sandbox::new();
    let model = tiny_llama(&sb.path("llama"), Some(WORD_TEMPLATE));
    let data = sb.path("chat.jsonl");
    let mut lines = String::new();
    for i in 0..20 {
        let q = ["the whale", "the sea", "the ship"][i % 3];
        let a = ["and the sea", "the whale and the ship", "sea"][i % 3];
        lines += &serde_json::json!({"messages": [
            {"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        .to_string();
        lines.push('\n');
    }
    std::fs::write(&data, lines).unwrap();
    let out = sb.path("out");
    let args = [
        "train-lm",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--output",
        s(&out),
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--epochs",
        "1",
        "--quiet",
    ];
    sb.run_ok(&args);
    assert_eq!(steps_in(&out), 4);
    let summary = read_json(&out.join("summary.json"));
    assert!(
        summary["test_perplexity"].as_f64().unwrap().is_finite(),
        "{summary}"
    );

    let sharegpt = sb.path("sharegpt.json");
    let convs: Vec<Value> = (0..10)
        .map(|_| {
            serde_json::json!({"conversations": [
                {"from": "human", "value": "the ship"}, {"from": "gpt", "value": "the sea"}]})
        })
        .collect();
    std::fs::write(&sharegpt, Value::from(convs).to_string()).unwrap();
    let out2 = sb.path("out2");
    let mut args2 = args;
    args2[4] = s(&sharegpt);
    args2[6] = s(&out2);
    sb.run_ok(&args2);
    // 10 records: 8 train, at batch 4 two steps.
    assert_eq!(steps_in(&out2), 2);
}

/// One `.txt` file trains (it used to be "too few documents"): the text is split by position.
#[test]
fn train_lm_on_one_text_file() {
    let sb = Sandbox::new();
    let model = tiny_llama(&sb.path("llama"), None);
    let book = sb.path("book.txt");
    let paragraphs: Vec<String> = (0..60)
        .map(|i| ["the whale and the sea", "the ship and the whale"][i % 2].repeat(3))
        .collect();
    std::fs::write(&book, paragraphs.join("\n\n")).unwrap();
    let out = sb.path("out");
    sb.run_ok(&[
        "train-lm",
        "--model",
        s(&model),
        "--data",
        s(&book),
        "--output",
        s(&out),
        "--seq-len",
        "16",
        "--epochs",
        "1",
        "--quiet",
    ]);
    let summary = read_json(&out.join("summary.json"));
    assert!(
        summary["test_perplexity"].as_f64().unwrap().is_finite(),
        "{summary}"
    );
}

/// A chat template that does not compile (minijinja has no `{% generation %}` tag, which a few
/// templates use) stops only chat data: plain text trains on the model; a chat file is an error
/// naming the template's file.
#[test]
fn a_broken_chat_template_matters_only_to_chat_data() {
    let sb = Sandbox::new();
    let broken =
        "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}";
    let model = tiny_llama(&sb.path("llama"), Some(broken));
    let book = sb.path("book.txt");
    std::fs::write(&book, "the whale and the sea\n\n".repeat(60)).unwrap();
    let run = |data: &Path, out: &Path| {
        sb.run(&[
            "train-lm",
            "--model",
            s(&model),
            "--data",
            s(data),
            "--output",
            s(out),
            "--seq-len",
            "16",
            "--epochs",
            "1",
            "--quiet",
        ])
    };
    let o = run(&book, &sb.path("out"));
    assert!(o.status.success(), "{}", text(&o));
    let chat = sb.path("chat.jsonl");
    let line = r#"{"messages": [{"role": "user", "content": "the sea"}, {"role": "assistant", "content": "the whale"}]}"#;
    std::fs::write(&chat, format!("{line}\n").repeat(10)).unwrap();
    let out = sb.path("out2");
    assert_clean_error(
        &run(&chat, &out),
        &["tokenizer_config.json", "does not parse", "chat.jsonl"],
    );
    assert!(!out.exists());
}
