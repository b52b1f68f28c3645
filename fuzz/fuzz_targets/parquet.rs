//! `cargo +nightly fuzz run parquet`: see `check_parquet` in `fuzz/harness.rs`.
#![no_main]

#[path = "../harness.rs"]
mod harness;

use libfuzzer_sys::fuzz_target;

/// A scratch folder for the whole run: the file under test is rewritten there on every input.
static DIR: std::sync::LazyLock<tempfile::TempDir> =
    std::sync::LazyLock::new(|| tempfile::tempdir().expect("a scratch folder"));

fuzz_target!(|data: &[u8]| {
    harness::check_parquet(DIR.path(), data);
});
