//! Inputs a user can get wrong, end to end through the `safetune` binary: each must end the
//! command with a non-zero exit status and one `error:` line naming the file or flag and the
//! problem, without a panic, and without writing or changing anything in the output folder.
//!
//! Every command runs with `SAFETUNE_CACHE` pointed at an empty folder, so nothing is fetched.

mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

const QUERY_W: &str = "bert.encoder.layer.0.attention.self.query.weight";
const ADAPTER_QUERY_A: &str =
    "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Every file under `dir` (relative path -> bytes); None when `dir` does not exist.
fn snapshot(dir: &Path) -> Option<BTreeMap<PathBuf, Vec<u8>>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_path_buf();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    if !dir.exists() {
        return None;
    }
    let mut files = BTreeMap::new();
    walk(dir, dir, &mut files);
    Some(files)
}

fn names(snap: &Option<BTreeMap<PathBuf, Vec<u8>>>) -> Vec<&Path> {
    snap.iter()
        .flat_map(|m| m.keys())
        .map(|p| p.as_path())
        .collect()
}

/// Runs `args`, expects a clean error with `needles`, and that the output folder `out` is
/// exactly as it was before (absent if it was absent).
fn refused_without_change(sb: &Sandbox, out: &Path, args: &[&str], needles: &[&str]) -> String {
    let before = snapshot(out);
    let line = assert_clean_error(&sb.run(args), needles);
    let after = snapshot(out);
    assert!(
        before == after,
        "{args:?} changed {}: {:?} -> {:?}",
        out.display(),
        names(&before),
        names(&after)
    );
    line
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// Replaces tensor `name` of a safetensors file.
fn replace_tensor(path: &Path, name: &str, t: Tensor) {
    let mut tensors = load(path);
    assert!(
        tensors.contains_key(name),
        "{name} not in {}",
        path.display()
    );
    tensors.insert(name.into(), t);
    candle_core::safetensors::save(&tensors, path).unwrap();
}

/// A copy of `t` with its first value NaN.
fn with_nan(t: &Tensor) -> Tensor {
    let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v[0] = f32::NAN;
    Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap()
}

/// A tiny random one-layer BERT folder (config.json, model.safetensors, the repository's
/// tokenizer.json; `common::write_model`) with `config` keys overridden by `patch`.
fn tiny_bert(dir: &Path, patch: Value) -> PathBuf {
    write_model(dir, 1, |_, shape| shape);
    let path = dir.join("config.json");
    let mut config = read_json(&path);
    for (k, v) in patch.as_object().unwrap() {
        config[k] = v.clone();
    }
    std::fs::write(&path, config.to_string()).unwrap();
    dir.to_path_buf()
}

/// A 40-row, two-class CSV (`text,label`).
fn tiny_csv(path: &Path) -> PathBuf {
    let good = ["great", "wonderful", "lovely", "superb", "charming"];
    let bad = ["awful", "boring", "dull", "terrible", "clumsy"];
    let mut csv = String::from("text,label\n");
    for i in 0..20 {
        csv += &format!(
            "a {} film and a {} ending,pos\n",
            good[i % 5],
            good[(i + 2) % 5]
        );
        csv += &format!(
            "the {} plot with {} acting,neg\n",
            bad[i % 5],
            bad[(i + 3) % 5]
        );
    }
    std::fs::write(path, csv).unwrap();
    path.to_path_buf()
}

/// `train` on the tiny model and data with `extra` flags, and the test defaults for the flags
/// `extra` does not give (a flag may be given once).
fn train_args<'a>(
    model: &'a Path,
    data: &'a Path,
    out: &'a Path,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "train",
        "--model",
        s(model),
        "--data",
        s(data),
        "--output",
        s(out),
        "--quiet",
    ];
    let given = |flag: &str| {
        extra
            .iter()
            .any(|a| *a == flag || a.starts_with(&format!("{flag}=")))
    };
    for [flag, value] in [
        ["--batch-size", "4"],
        ["--max-length", "32"],
        ["--seed", "7"],
    ] {
        if !given(flag) {
            args.extend_from_slice(&[flag, value]);
        }
    }
    args.extend_from_slice(extra);
    args
}

struct Fixture {
    sb: Sandbox,
    model: PathBuf,
    data: PathBuf,
    out: PathBuf,
}

fn fixture() -> Fixture {
    let sb = Sandbox::new();
    let model = tiny_bert(&sb.path("model"), serde_json::json!({}));
    let data = tiny_csv(&sb.path("data.csv"));
    let out = sb.path("out");
    Fixture {
        sb,
        model,
        data,
        out,
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Settings out of range: flags and the config file
// ---------------------------------------------------------------------------------------------

#[test]
fn run_flags_out_of_range_name_the_flag() {
    let f = fixture();
    let cases: [(&[&str], &[&str]); 10] = [
        (&["--batch-size", "0"], &["--batch-size", "at least 1"]),
        (&["--grad-accum", "0"], &["--grad-accum", "at least 1"]),
        (&["--epochs", "0"], &["--epochs", "at least 1"]),
        (&["--lora-r", "0"], &["--lora-r", "at least 1"]),
        (
            &["--lora-dropout", "1.5"],
            &["--lora-dropout", "1.5", "[0, 1)"],
        ),
        (&["--lr=-0.001"], &["--lr", "-0.001", ">= 0"]),
        (&["--lr", "NaN"], &["--lr", "NaN", "finite"]),
        (&["--lr", "inf"], &["--lr", "inf", "finite"]),
        (&["--max-length", "1"], &["--max-length", "at least 2"]),
        (
            &["--stop-after-epoch", "0"],
            &["--stop-after-epoch", "at least 1"],
        ),
    ];
    for (flags, needles) in cases {
        let args = train_args(&f.model, &f.data, &f.out, flags);
        refused_without_change(&f.sb, &f.out, &args, needles);
    }
}

#[test]
fn config_file_values_out_of_range_name_the_key() {
    let f = fixture();
    let cases = [
        ("warmup_ratio = 5\n", vec!["warmup_ratio", "5", "[0, 1]"]),
        ("grad_accum = 0\n", vec!["grad_accum", "at least 1"]),
        ("[lora]\ndropout = 1.5\n", vec!["lora.dropout", "[0, 1)"]),
        ("lr = -1.0\n", vec!["lr", ">= 0"]),
        (
            "[data]\nvalidation_fraction = 0.9\ntest_fraction = 0.5\n",
            vec!["data.validation_fraction", "data.test_fraction", "below 1"],
        ),
        (
            "[data]\ntest_fraction = -0.1\n",
            vec!["data.test_fraction", "-0.1", "[0, 1)"],
        ),
    ];
    let config = f.sb.path("c.toml");
    for (toml, needles) in cases {
        std::fs::write(&config, toml).unwrap();
        let args = train_args(&f.model, &f.data, &f.out, &["--config", s(&config)]);
        refused_without_change(&f.sb, &f.out, &args, &needles);
    }
}

#[test]
fn train_lm_flags_out_of_range_name_the_flag() {
    // Checked before the model is looked at: no model flag, nothing fetched.
    let sb = Sandbox::new();
    let out = sb.path("out");
    for (flag, value) in [
        ("--batch-size", "0"),
        ("--max-length", "1"),
        ("--lora-dropout", "1"),
    ] {
        let args = ["train-lm", "--output", s(&out), flag, value, "--quiet"];
        refused_without_change(&sb, &out, &args, &[flag]);
    }
}

#[test]
fn max_length_beyond_the_position_table_names_flag_and_model() {
    // Was "index-select invalid index 32" from inside the first forward pass.
    let f = fixture();
    let args = train_args(&f.model, &f.data, &f.out, &["--max-length", "64"]);
    refused_without_change(
        &f.sb,
        &f.out,
        &args,
        &[
            "--max-length",
            "64",
            "max_position_embeddings",
            "32",
            "config.json",
        ],
    );
}

/// The repository's tiny LLaMA fixture (64 positions, vocabulary 96) with a word-level
/// tokenizer, as a model folder `train-lm` and `perplexity` load.
fn tiny_llama(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/llama2-linear");
    for name in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(name), dir.join(name)).unwrap();
    }
    let words = ["<unk>", "<s>", "</s>", "the", "whale", "sea", "ship", "and"];
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
    dir.to_path_buf()
}

#[test]
fn seq_len_beyond_the_models_positions_names_flag_and_model() {
    // Used to fail in the first forward pass ("rope: positions up to 128 exceed max_positions
    // 64"), naming neither the flag nor the model.
    let sb = Sandbox::new();
    let model = tiny_llama(&sb.path("llama"));
    // Ten documents of 400 words: enough for a split and for 128-token sequences.
    let text = sb.path("texts");
    std::fs::create_dir_all(&text).unwrap();
    for d in 0..10 {
        let doc = "the whale and the sea and the ship ".repeat(50);
        std::fs::write(text.join(format!("doc{d}.txt")), doc).unwrap();
    }
    let out = sb.path("out");
    // --seq-len, the former name, is an alias of --max-length; errors name the current flag.
    let needles = ["--max-length", "128", "64 positions", "llama"];
    let train = [
        "train-lm",
        "--model",
        s(&model),
        "--data",
        s(&text),
        "--output",
        s(&out),
        "--seq-len",
        "128",
        "--quiet",
    ];
    refused_without_change(&sb, &out, &train, &needles);
    let ppl = [
        "perplexity",
        "--model",
        s(&model),
        "--data",
        s(&text),
        "--seq-len",
        "128",
    ];
    assert_clean_error(&sb.run(&ppl), &needles);
}

// ---------------------------------------------------------------------------------------------
// 2. Model config.json sizes, before anything is allocated from them
// ---------------------------------------------------------------------------------------------

#[test]
fn absurd_bert_config_sizes_name_config_json() {
    let sb = Sandbox::new();
    let data = tiny_csv(&sb.path("data.csv"));
    let out = sb.path("out");
    let huge = 1_000_000_000_000u64;
    let cases = [
        (
            serde_json::json!({"num_hidden_layers": huge}),
            "num_hidden_layers",
        ),
        (serde_json::json!({"hidden_size": huge}), "hidden_size"),
        (serde_json::json!({"vocab_size": huge}), "vocab_size"),
        (
            serde_json::json!({"intermediate_size": huge}),
            "intermediate_size",
        ),
        (
            serde_json::json!({"max_position_embeddings": huge}),
            "max_position_embeddings",
        ),
        (
            serde_json::json!({"num_attention_heads": 3}),
            "num_attention_heads",
        ),
        (
            serde_json::json!({"num_hidden_layers": 0}),
            "num_hidden_layers",
        ),
        (
            serde_json::json!({"hidden_dropout_prob": 2.0}),
            "hidden_dropout_prob",
        ),
    ];
    for (i, (patch, key)) in cases.into_iter().enumerate() {
        let model = tiny_bert(&sb.path(&format!("model{i}")), patch);
        let args = train_args(&model, &data, &out, &[]);
        refused_without_change(&sb, &out, &args, &["config.json", key]);
    }
}

/// A decoder folder with a `config.json` (and a one-tensor weights file, so that loading would
/// get past a missing file).
fn decoder_folder(dir: &Path, config: Value, tensor: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let t = Tensor::zeros((4, 8), DType::F32, &Device::Cpu).unwrap();
    let tensors = HashMap::from([(tensor.to_string(), t)]);
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    dir.to_path_buf()
}

#[test]
fn absurd_decoder_config_sizes_name_config_json() {
    let sb = Sandbox::new();
    let text = sb.path("text.txt");
    std::fs::write(&text, "some words to train on\n").unwrap();
    let out = sb.path("out");
    let huge = 1_000_000_000_000u64;
    let llama = |patch: Value| {
        let mut c = serde_json::json!({"model_type": "llama", "vocab_size": 4, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2});
        for (k, v) in patch.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let gpt2 = |patch: Value| {
        let mut c = serde_json::json!({"model_type": "gpt2", "vocab_size": 4, "n_positions": 8,
            "n_embd": 8, "n_layer": 1, "n_head": 2});
        for (k, v) in patch.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let cases = [
        (
            llama(serde_json::json!({"num_hidden_layers": huge})),
            "num_hidden_layers",
        ),
        (
            llama(serde_json::json!({"hidden_size": huge})),
            "hidden_size",
        ),
        (llama(serde_json::json!({"vocab_size": huge})), "vocab_size"),
        (
            llama(serde_json::json!({"intermediate_size": huge})),
            "intermediate_size",
        ),
        (
            llama(serde_json::json!({"max_position_embeddings": huge})),
            "max_position_embeddings",
        ),
        (
            llama(serde_json::json!({"num_attention_heads": 3})),
            "num_attention_heads",
        ),
        (gpt2(serde_json::json!({"n_layer": huge})), "n_layer"),
        (
            gpt2(serde_json::json!({"n_embd": huge, "n_head": 1})),
            "n_embd",
        ),
        (gpt2(serde_json::json!({"vocab_size": huge})), "vocab_size"),
        (gpt2(serde_json::json!({"n_inner": huge})), "n_inner"),
        (gpt2(serde_json::json!({"n_head": 3})), "n_head"),
        (
            llama(serde_json::json!({"eos_token_id": [2, 4]})),
            "eos_token_id",
        ),
        (gpt2(serde_json::json!({"bos_token_id": 9})), "bos_token_id"),
    ];
    for (i, (config, key)) in cases.into_iter().enumerate() {
        let tensor = if config["model_type"] == "gpt2" {
            "transformer.wte.weight"
        } else {
            "model.embed_tokens.weight"
        };
        let model = decoder_folder(&sb.path(&format!("m{i}")), config, tensor);
        let args = [
            "train-lm",
            "--model",
            s(&model),
            "--data",
            s(&text),
            "--output",
            s(&out),
            "--quiet",
        ];
        refused_without_change(&sb, &out, &args, &["config.json", key]);
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Weights and adapters: NaN, infinity, integers
// ---------------------------------------------------------------------------------------------

#[test]
fn nan_or_integer_model_weights_name_file_and_tensor() {
    let f = fixture();
    let weights = f.model.join("model.safetensors");
    let query = load(&weights)[QUERY_W].clone();
    replace_tensor(&weights, QUERY_W, with_nan(&query));
    let args = train_args(&f.model, &f.data, &f.out, &[]);
    refused_without_change(&f.sb, &f.out, &args, &["model.safetensors", QUERY_W, "NaN"]);

    let ints = Tensor::zeros(query.dims(), DType::I64, &Device::Cpu).unwrap();
    replace_tensor(&weights, QUERY_W, ints);
    refused_without_change(&f.sb, &f.out, &args, &["model.safetensors", QUERY_W, "I64"]);
}

#[test]
fn a_nan_adapter_is_refused_by_init_eval_and_merge() {
    let f = fixture();
    f.sb.run_ok(&train_args(&f.model, &f.data, &f.out, &["--epochs", "1"]));
    let adapter = f.sb.path("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    for name in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(f.out.join(name), adapter.join(name)).unwrap();
    }
    let file = adapter.join("adapter_model.safetensors");
    let a = load(&file)[ADAPTER_QUERY_A].clone();
    replace_tensor(&file, ADAPTER_QUERY_A, with_nan(&a));
    let needles = ["adapter_model.safetensors", ADAPTER_QUERY_A, "NaN"];

    let second = f.sb.path("second");
    let init = train_args(&f.model, &f.data, &second, &["--init-adapter", s(&adapter)]);
    refused_without_change(&f.sb, &second, &init, &needles);

    let eval = [
        "eval",
        "--model",
        s(&f.model),
        "--adapter",
        s(&adapter),
        "--data",
        s(&f.data),
        "--max-length",
        "32",
    ];
    assert_clean_error(&f.sb.run(&eval), &needles);

    let merged = f.sb.path("merged");
    let merge = [
        "merge",
        "--model",
        s(&f.model),
        "--adapter",
        s(&adapter),
        "--output",
        s(&merged),
    ];
    refused_without_change(&f.sb, &merged, &merge, &needles);
}

// ---------------------------------------------------------------------------------------------
// 4. Divergence
// ---------------------------------------------------------------------------------------------

#[test]
fn a_diverging_run_stops_and_keeps_the_last_good_files() {
    let f = fixture();
    // Epoch 1 at a sane learning rate, then the rest with lr 1e30: the weights overflow and the
    // loss stops being finite within a few steps.
    let first = ["--epochs", "2", "--stop-after-epoch", "1"];
    f.sb.run_ok(&train_args(&f.model, &f.data, &f.out, &first));
    let kept = [
        "adapter_model.safetensors",
        "adapter_config.json",
        "checkpoint/tensors.safetensors",
        "checkpoint/state.json",
    ];
    let before: Vec<Vec<u8>> = kept
        .iter()
        .map(|k| std::fs::read(f.out.join(k)).unwrap())
        .collect();
    let resume = ["--epochs", "2", "--resume", "--lr", "1e30"];
    let out = f.sb.run(&train_args(&f.model, &f.data, &f.out, &resume));
    assert_clean_error(&out, &["diverged", "epoch 2"]);
    for (k, b) in kept.iter().zip(&before) {
        assert!(
            std::fs::read(f.out.join(k)).unwrap() == *b,
            "{k} changed by the diverged run"
        );
    }
    assert!(!f.out.join("summary.json").exists());

    // A fresh run that diverges in epoch 1 writes no adapter at all. (From fresh adapters, lr
    // 1e30 only saturates this model: LayerNorm bounds the activations and the loss stays near
    // 1e30, finite; at 1e38 the classifier's logits overflow f32.)
    let fresh = f.sb.path("fresh");
    let out =
        f.sb.run(&train_args(&f.model, &f.data, &fresh, &["--lr", "1e38"]));
    if out.status.success() {
        let metrics = std::fs::read_to_string(fresh.join("metrics.jsonl")).unwrap_or_default();
        panic!("lr 1e30 did not diverge: {metrics}");
    }
    assert_clean_error(&out, &["diverged", "epoch 1"]);
    assert!(!fresh.join("adapter_model.safetensors").exists());
    assert!(!fresh.join("checkpoint").exists());
}

/// A resume whose newest checkpoint is a step checkpoint with an unreadable state is refused,
/// naming that file, and changes nothing: it neither falls back to an older checkpoint nor
/// starts the run over.
#[test]
fn a_resume_of_an_unreadable_step_checkpoint_changes_nothing() {
    let f = fixture();
    let first = [
        "--epochs",
        "2",
        "--stop-after-epoch",
        "1",
        "--save-steps",
        "2",
    ];
    f.sb.run_ok(&train_args(&f.model, &f.data, &f.out, &first));
    // As if the run was killed inside epoch 1: no epoch checkpoint yet.
    std::fs::remove_dir_all(f.out.join("checkpoint")).unwrap();
    let newest = std::fs::read_dir(&f.out)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            name.strip_prefix("checkpoint-")?.parse::<usize>().ok()
        })
        .max()
        .expect("step checkpoints");
    assert!(newest >= 4, "{newest}");
    let state = f.out.join(format!("checkpoint-{newest}/state.json"));
    std::fs::write(&state, "{ not json").unwrap();
    let resume = ["--epochs", "2", "--resume", "--save-steps", "2"];
    let args = train_args(&f.model, &f.data, &f.out, &resume);
    let dir = format!("checkpoint-{newest}");
    refused_without_change(&f.sb, &f.out, &args, &[&dir, "state.json"]);
}

// ---------------------------------------------------------------------------------------------
// 5. Output folders
// ---------------------------------------------------------------------------------------------

#[test]
fn a_non_empty_output_folder_needs_resume_or_overwrite() {
    let f = fixture();
    std::fs::create_dir_all(&f.out).unwrap();
    std::fs::write(f.out.join("notes.txt"), "mine").unwrap();
    let args = train_args(&f.model, &f.data, &f.out, &["--epochs", "1"]);
    refused_without_change(
        &f.sb,
        &f.out,
        &args,
        &["not empty", "notes.txt", "--overwrite"],
    );

    let args = train_args(&f.model, &f.data, &f.out, &["--epochs", "1", "--overwrite"]);
    f.sb.run_ok(&args);
    assert_eq!(
        std::fs::read_to_string(f.out.join("notes.txt")).unwrap(),
        "mine"
    );
    assert!(f.out.join("summary.json").is_file());

    // The finished run's folder: a plain rerun is refused and changes nothing.
    let args = train_args(&f.model, &f.data, &f.out, &["--epochs", "1"]);
    refused_without_change(&f.sb, &f.out, &args, &["not empty", "--resume"]);
}

#[test]
fn a_folder_in_use_by_another_run_is_refused() {
    let f = fixture();
    f.sb.run_ok(&train_args(&f.model, &f.data, &f.out, &["--epochs", "1"]));
    let lock = std::fs::File::open(f.out.join(".safetune.lock")).expect("the run's lock file");
    lock.try_lock().expect("nobody else holds it");
    for extra in [
        &["--epochs", "1", "--overwrite"][..],
        &["--epochs", "1", "--resume"],
    ] {
        let args = train_args(&f.model, &f.data, &f.out, extra);
        refused_without_change(&f.sb, &f.out, &args, &["in use", s(&f.out)]);
    }
    drop(lock);
    f.sb.run_ok(&train_args(
        &f.model,
        &f.data,
        &f.out,
        &["--epochs", "1", "--overwrite"],
    ));
}

#[test]
fn a_refused_resume_changes_nothing() {
    // train_config.json used to be rewritten before the checkpoint was looked at.
    let f = fixture();
    f.sb.run_ok(&train_args(&f.model, &f.data, &f.out, &["--epochs", "1"]));
    let args = train_args(&f.model, &f.data, &f.out, &["--epochs", "2", "--resume"]);
    refused_without_change(&f.sb, &f.out, &args, &["checkpoint", "--epochs 1"]);
    let more = [
        "--epochs",
        "1",
        "--resume",
        "--target-modules",
        "query,key,value",
    ];
    let args = train_args(&f.model, &f.data, &f.out, &more);
    refused_without_change(&f.sb, &f.out, &args, &["checkpoint"]);
    assert_eq!(read_json(&f.out.join("train_config.json"))["epochs"], 1);
}

// ---------------------------------------------------------------------------------------------
// 6. Empty splits
// ---------------------------------------------------------------------------------------------

#[test]
fn an_empty_test_split_is_reported_as_none() {
    let f = fixture();
    let config = f.sb.path("c.toml");
    std::fs::write(&config, "[data]\ntest_fraction = 0.0\n").unwrap();
    let out = f.sb.run_ok(&train_args(
        &f.model,
        &f.data,
        &f.out,
        &["--epochs", "1", "--config", s(&config)],
    ));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("0.0000"), "{stdout}");
    assert!(stdout.contains("test split is empty"), "{stdout}");
    let summary = read_json(&f.out.join("summary.json"));
    assert!(
        summary["value"].is_null() && summary["test"].is_null(),
        "{summary}"
    );
}

#[test]
fn evaluating_an_empty_split_is_an_error() {
    let f = fixture();
    f.sb.run_ok(&train_args(&f.model, &f.data, &f.out, &["--epochs", "1"]));
    // Two rows per class: round(0.15 * 2) = 0 rows of each class go to test.
    let small = f.sb.path("small.csv");
    std::fs::write(
        &small,
        "text,label\ngood film,pos\nfine plot,pos\nbad film,neg\ndull plot,neg\n",
    )
    .unwrap();
    let eval = [
        "eval",
        "--model",
        s(&f.model),
        "--adapter",
        s(&f.out),
        "--data",
        s(&small),
        "--max-length",
        "32",
    ];
    assert_clean_error(&f.sb.run(&eval), &["--split test", "no examples"]);
}

#[test]
fn an_empty_validation_split_is_an_error() {
    let f = fixture();
    let config = f.sb.path("c.toml");
    std::fs::write(&config, "[data]\nvalidation_fraction = 0.0\n").unwrap();
    let args = train_args(&f.model, &f.data, &f.out, &["--config", s(&config)]);
    refused_without_change(&f.sb, &f.out, &args, &["no validation examples"]);
}

// ---------------------------------------------------------------------------------------------
// 7. Data formats: Parquet, JSON arrays, split files, chat records, models by id
// ---------------------------------------------------------------------------------------------

#[test]
fn bad_table_files_name_the_file_and_the_problem() {
    let f = fixture();
    let not_parquet = f.sb.path("data.parquet");
    std::fs::write(&not_parquet, "text,label\na,pos\n").unwrap();
    let args = train_args(&f.model, &not_parquet, &f.out, &[]);
    refused_without_change(
        &f.sb,
        &f.out,
        &args,
        &["data.parquet", "not a readable Parquet file"],
    );
    let array = f.sb.path("data.json");
    std::fs::write(&array, r#"[{"text": "a", "label": "pos"}, {"text": "b"}]"#).unwrap();
    let args = train_args(&f.model, &array, &f.out, &[]);
    refused_without_change(
        &f.sb,
        &f.out,
        &args,
        &["data.json", "record 2", "label column 'label' missing"],
    );
}

#[test]
fn split_files_with_an_unknown_label_or_without_a_train_file() {
    let f = fixture();
    let val = f.sb.path("val.csv");
    std::fs::write(&val, "text,label\nfine film,pos\nodd film,meh\n").unwrap();
    let mut args = vec![
        "train",
        "--model",
        s(&f.model),
        "--train-file",
        s(&f.data),
        "--validation-file",
        s(&val),
        "--output",
        s(&f.out),
        "--max-length",
        "32",
        "--quiet",
    ];
    refused_without_change(
        &f.sb,
        &f.out,
        &args,
        &[
            "val.csv",
            "line 3",
            "unknown label 'meh'",
            "known: neg, pos",
        ],
    );
    // A validation file alone: which file's labels would count?
    args[3] = "--data";
    refused_without_change(&f.sb, &f.out, &args, &["--validation-file", "--train-file"]);
}

/// The tiny LLaMA of `tiny_llama`, with no chat template anywhere.
#[test]
fn a_chat_file_for_a_model_without_a_chat_template() {
    let sb = Sandbox::new();
    let model = tiny_llama(&sb.path("llama"));
    let data = sb.path("chat.jsonl");
    let line = r#"{"messages": [{"role": "user", "content": "the sea"}, {"role": "assistant", "content": "the whale"}]}"#;
    std::fs::write(&data, format!("{line}\n").repeat(10)).unwrap();
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
        "16",
        "--quiet",
    ];
    refused_without_change(
        &sb,
        &out,
        &args,
        &["chat.jsonl", "record 1", "chat template", "llama"],
    );
}

#[test]
fn a_model_id_not_in_the_hf_cache_lists_where_it_looked() {
    let sb = Sandbox::new();
    let hf = sb.path("hf");
    std::fs::create_dir_all(hf.join("hub")).unwrap();
    let data = tiny_csv(&sb.path("data.csv"));
    let text = sb.path("t.txt");
    std::fs::write(&text, "the whale and the sea\n").unwrap();
    let out = sb.path("out");
    let looked = hf.join("hub/models--acme--absent");
    for args in [
        vec!["train", "--model", "acme/absent", "--data", s(&data)],
        vec!["train-lm", "--model", "acme/absent", "--data", s(&text)],
    ] {
        let mut args = args;
        args.extend(["--output", s(&out), "--quiet"]);
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_safetune"))
            .args(&args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("SAFETUNE_CACHE", sb.path("cache"))
            .env("HF_HOME", &hf)
            .env_remove("HF_HUB_CACHE")
            .env_remove("RUST_BACKTRACE")
            .output()
            .unwrap();
        assert_clean_error(&o, &["acme/absent", "Hugging Face cache", s(&looked)]);
        assert!(!out.exists());
    }
}
