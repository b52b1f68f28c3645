//! What the end-to-end tests share: a sandbox to run the `safetune` binary in, and checks of its
//! output.
#![allow(dead_code)] // each test file uses a part

use serde_json::Value;
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
