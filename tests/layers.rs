//! The library's layers point one way (ARCHITECTURE.md, "Module map"): a source file names only
//! modules of lower layers (`crate::x`), besides its own module. Test code (`*_tests.rs` and
//! everything from a file's first `#[cfg(test)]`) is exempt: tests may build on anything.

use std::path::{Path, PathBuf};

/// Layers, lowest first: a file of layer `n` may use modules of layers `< n`. The readers (`io`:
/// weights, PEFT files, assets) sit under the models, `merge` (a merged model's checkpoint)
/// above them.
const LAYERS: &[(&str, u8)] = &[
    ("memory", 0),
    ("files", 0),
    ("device", 1),
    ("safe", 2),
    ("report", 2),
    ("data", 2),
    ("nn", 3),
    ("adapters", 4),
    ("io", 5),
    ("model", 6),
    ("merge", 7),
    ("train", 8),
    ("cli", 9),
];

/// The layer of a module path such as `io::weights` or `train` (the longest entry that prefixes it).
fn layer_of(module: &str) -> Option<u8> {
    LAYERS
        .iter()
        .filter(|(m, _)| module == *m || module.starts_with(&format!("{m}::")))
        .max_by_key(|(m, _)| m.len())
        .map(|&(_, l)| l)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The `crate::a::b` paths a file's non-test code names, as `a::b` (or `a` alone).
fn crate_paths(code: &str) -> Vec<String> {
    let mut paths = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        let segments: Vec<&str> = rest[..end].split("::").take(2).collect();
        paths.push(segments.join("::"));
    }
    paths
}

#[test]
fn no_source_file_imports_from_a_higher_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 50, "found only {} files", files.len());
    let mut upward = Vec::new();
    let mut checked = 0;
    for file in files {
        let rel = file.strip_prefix(&src).unwrap().with_extension("");
        let rel = rel.to_string_lossy().replace('/', "::");
        if rel.ends_with("_tests") || rel == "lib" || rel == "main" {
            continue;
        }
        let own = rel.trim_end_matches("::mod");
        let top = own.split("::").next().unwrap();
        let Some(mine) = layer_of(own) else {
            panic!("{}: no layer for module {own}", file.display())
        };
        let text = std::fs::read_to_string(&file).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap();
        for path in crate_paths(code) {
            let used = path.split("::").next().unwrap();
            if used == top {
                continue;
            }
            checked += 1;
            match layer_of(&path) {
                Some(theirs) if theirs < mine => {}
                _ => upward.push(format!("{own} (layer {mine}) uses crate::{path}")),
            }
        }
    }
    assert!(checked > 100, "only {checked} imports checked");
    assert!(upward.is_empty(), "upward imports:\n{}", upward.join("\n"));
}

#[test]
fn layers_rank_merge_above_the_models_and_readers_below() {
    assert_eq!(layer_of("io::weights"), Some(5));
    assert_eq!(layer_of("io"), Some(5));
    assert_eq!(layer_of("merge"), Some(7));
    assert_eq!(layer_of("model::bert"), Some(6));
    assert_eq!(layer_of("iox"), None);
    assert_eq!(
        crate_paths("use crate::io::weights::X; crate::nn::{a}; crate::train"),
        ["io::weights", "nn::", "train"]
    );
}
