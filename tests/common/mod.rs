//! What the end-to-end tests share: a sandbox to run the `safetune` binary in, and checks of its
//! output.
#![allow(dead_code)] // each test file uses a part

use candle_core::{Device, Tensor};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tempfile::TempDir;

/// A temporary folder with an empty `cache/` that every command uses as `SAFETUNE_CACHE`.
pub struct Sandbox {
    dir: TempDir,
}

impl Sandbox {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("cache")).expect("cache dir");
        Self { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs `safetune ARGS` from the repository root (so fixture paths are relative to it).
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_safetune"))
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("SAFETUNE_CACHE", self.path("cache"))
            .env_remove("RUST_LOG")
            .env_remove("RUST_BACKTRACE")
            .output()
            .expect("run safetune")
    }

    /// Runs `safetune ARGS` and fails the test (showing stdout and stderr) unless it exits 0.
    pub fn run_ok(&self, args: &[&str]) -> Output {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "safetune {args:?} failed ({})\n{}",
            out.status,
            text(&out)
        );
        out
    }
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

pub fn text(out: &Output) -> String {
    format!(
        "--- stdout ---\n{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Exit status 1, no panic, and exactly one `error:` line on stderr that contains every needle.
/// Returns that line.
pub fn assert_clean_error(out: &Output, needles: &[&str]) -> String {
    let all = text(out);
    for panic_text in ["panicked", "RUST_BACKTRACE"] {
        assert!(!all.contains(panic_text), "{panic_text}:\n{all}");
    }
    assert_eq!(out.status.code(), Some(1), "exit status:\n{all}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "expected one `error:` line:\n{all}");
    for needle in needles {
        assert!(
            errors[0].contains(needle),
            "error line does not mention {needle:?}: {}",
            errors[0]
        );
    }
    errors[0].to_string()
}

pub fn read_json(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The tiny random BERT of the end-to-end tests ([`write_model`]).
pub const TINY_VOCAB: usize = 30522; // the real tokenizer's vocabulary
pub const TINY_HIDDEN: usize = 8;
pub const TINY_FFN: usize = 16;
pub const TINY_POSITIONS: usize = 32;

/// Writes a tiny random-weight BERT folder (config.json, model.safetensors, the repository's
/// tokenizer.json) at `dir`. `shape_of` may change a tensor's shape (to make a broken model).
pub fn write_model(dir: &Path, layers: usize, shape_of: impl Fn(&str, Vec<usize>) -> Vec<usize>) {
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": TINY_VOCAB,
        "hidden_size": TINY_HIDDEN,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "intermediate_size": TINY_FFN,
        "max_position_embeddings": TINY_POSITIONS,
        "type_vocab_size": 2,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(
        repo.join("interop/tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();

    // Deterministic pseudo-random values in [-0.05, 0.05) (xorshift64*); LayerNorm weight 1, bias 0.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let x = state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40; // 24 bits
        (x as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
    };
    // The tensors a BERT checkpoint of this config has, as the loader names them.
    let config = safetune::model::BertConfig::from_file(&dir.join("config.json")).unwrap();
    let shapes = safetune::model::BertForSequenceClassification::checkpoint_shapes(&config);
    let mut tensors = HashMap::new();
    for (name, shape) in shapes.into_iter().map(|(n, s)| (format!("bert.{n}"), s)) {
        let shape = shape_of(&name, shape);
        let n: usize = shape.iter().product();
        let values: Vec<f32> = if name.contains("LayerNorm.weight") {
            vec![1.0; n]
        } else if name.contains("LayerNorm.bias") {
            vec![0.0; n]
        } else {
            (0..n).map(|_| next()).collect()
        };
        let t = Tensor::from_vec(values, shape, &Device::Cpu).unwrap();
        tensors.insert(name, t);
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
}
