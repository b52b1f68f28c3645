//! `--model ORG/NAME`: a model already in the local Hugging Face cache, found the way
//! `huggingface_hub` lays it out (`models--ORG--NAME/refs/main` names the revision whose files are
//! in `snapshots/REV/`). Nothing is downloaded: a model that is not there is an error listing the
//! folders looked in.

use super::IoError;
use std::path::{Path, PathBuf};

/// The hub cache folders, in the order `huggingface_hub` prefers them: `$HF_HUB_CACHE`,
/// `$HF_HOME/hub`, `$XDG_CACHE_HOME/huggingface/hub`, `~/.cache/huggingface/hub`.
pub fn cache_dirs() -> Vec<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let mut dirs = Vec::new();
    dirs.extend(var("HF_HUB_CACHE"));
    dirs.extend(var("HF_HOME").map(|h| h.join("hub")));
    dirs.extend(var("XDG_CACHE_HOME").map(|c| c.join("huggingface/hub")));
    dirs.extend(var("HOME").map(|h| h.join(".cache/huggingface/hub")));
    dirs.dedup();
    dirs
}

/// Whether `arg` reads as a hub model id (`NAME` or `ORG/NAME`, no path syntax) rather than a
/// path.
fn is_model_id(arg: &str) -> bool {
    let ok = |part: &str| {
        !part.is_empty()
            && part != "."
            && part != ".."
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    let parts: Vec<&str> = arg.split('/').collect();
    parts.len() <= 2 && parts.iter().all(|p| ok(p))
}

/// What `--model` names: an existing file or folder as it is; otherwise a model id looked up in
/// the hub caches of [`cache_dirs`]. The snapshot folder is returned, or the one `.gguf` file in
/// it when it has no `config.json` (a GGUF repository). `what` describes the expected model in
/// the error.
pub fn resolve_model(arg: &Path, what: &str) -> Result<PathBuf, IoError> {
    resolve_in(arg, what, &cache_dirs())
}

fn resolve_in(arg: &Path, what: &str, caches: &[PathBuf]) -> Result<PathBuf, IoError> {
    if arg.exists() {
        return Ok(arg.to_path_buf());
    }
    let id = arg.to_str().filter(|s| is_model_id(s));
    let Some(id) = id else {
        return Err(IoError::Missing {
            path: arg.into(),
            what: what.into(),
        });
    };
    let repo = format!("models--{}", id.replace('/', "--"));
    for cache in caches {
        if let Some(snapshot) = snapshot(&cache.join(&repo)) {
            return Ok(model_in(snapshot));
        }
    }
    let looked: Vec<String> = caches
        .iter()
        .map(|c| c.join(&repo).display().to_string())
        .collect();
    Err(IoError::Missing {
        path: arg.into(),
        what: format!(
            "{what}; nor a model in the local Hugging Face cache (looked in {}; nothing is \
             downloaded: fetch it first, e.g. `huggingface-cli download {id}`)",
            if looked.is_empty() {
                "no cache folder: HOME, HF_HOME and HF_HUB_CACHE are unset".into()
            } else {
                looked.join(", ")
            }
        ),
    })
}

/// The snapshot `refs/main` names, or the only snapshot when there is no ref (a cache filled by
/// `snapshot_download(revision=...)` or copied by hand).
fn snapshot(repo: &Path) -> Option<PathBuf> {
    let snapshots = repo.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs/main")) {
        let dir = snapshots.join(rev.trim());
        if dir.is_dir() {
            return Some(dir);
        }
    }
    let mut all: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    (all.len() == 1).then(|| all.remove(0))
}

/// A snapshot folder, or its one GGUF file when it holds no Hugging Face `config.json`.
fn model_in(snapshot: PathBuf) -> PathBuf {
    if snapshot.join("config.json").is_file() {
        return snapshot;
    }
    let ggufs: Vec<PathBuf> = std::fs::read_dir(&snapshot)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    match ggufs.as_slice() {
        [one] => one.clone(),
        _ => snapshot,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache laid out as huggingface_hub writes it (the snapshot's files are links into
    /// `blobs/` there; plain files here).
    fn cached_repo(cache: &Path, repo: &str, rev: &str, files: &[&str], with_ref: bool) {
        let dir = cache.join(repo);
        std::fs::create_dir_all(dir.join("snapshots").join(rev)).unwrap();
        if with_ref {
            std::fs::create_dir_all(dir.join("refs")).unwrap();
            std::fs::write(dir.join("refs/main"), format!("{rev}\n")).unwrap();
        }
        for f in files {
            std::fs::write(dir.join("snapshots").join(rev).join(f), "{}").unwrap();
        }
    }

    #[test]
    fn a_model_id_resolves_to_its_main_snapshot() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        cached_repo(&b, "models--org--bert", "abc123", &["config.json"], true);
        // An older snapshot beside it is not the one refs/main names.
        std::fs::create_dir_all(b.join("models--org--bert/snapshots/old")).unwrap();
        let caches = [a.clone(), b.clone()];
        let got = resolve_in(Path::new("org/bert"), "model", &caches).unwrap();
        assert_eq!(got, b.join("models--org--bert/snapshots/abc123"));
        // A GGUF repository: its one .gguf file. No ref: the only snapshot.
        cached_repo(
            &a,
            "models--org--tiny-GGUF",
            "r1",
            &["tiny.Q4_1.gguf"],
            false,
        );
        let got = resolve_in(Path::new("org/tiny-GGUF"), "model", &caches).unwrap();
        assert_eq!(
            got,
            a.join("models--org--tiny-GGUF/snapshots/r1/tiny.Q4_1.gguf")
        );
        // An existing path wins, whatever it looks like.
        let local = tmp.path().join("org");
        std::fs::create_dir_all(local.join("bert")).unwrap();
        let p = local.join("bert");
        assert_eq!(resolve_in(&p, "model", &caches).unwrap(), p);
    }

    #[test]
    fn an_absent_model_lists_where_it_looked() {
        let tmp = tempfile::tempdir().unwrap();
        let caches = [tmp.path().join("hub1"), tmp.path().join("hub2")];
        let e = resolve_in(Path::new("org/none"), "model folder", &caches)
            .unwrap_err()
            .to_string();
        for c in &caches {
            let want = c.join("models--org--none").display().to_string();
            assert!(e.contains(&want), "{e}");
        }
        assert!(
            e.starts_with("org/none: not found (model folder; nor"),
            "{e}"
        );
        // Path syntax is not an id: the plain missing-path error.
        let e = resolve_in(Path::new("./models/x"), "model folder", &caches)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "./models/x: not found (model folder)");
        assert!(!is_model_id("/abs/path") && !is_model_id("a/b/c") && !is_model_id("../x"));
        assert!(is_model_id("HuggingFaceTB/SmolLM2-135M-Instruct") && is_model_id("gpt2"));
    }
}
