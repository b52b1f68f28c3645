//! What a classifier adapter's outputs mean: `safetune.json` beside the PEFT files, holding the
//! class names in output order (PEFT's own files keep only tensor shapes). `eval` maps a data
//! set's labels by these names, whatever order the file lists them in; `merge` writes them as
//! `id2label` / `label2id`.

use super::IoError;
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const FILE: &str = "safetune.json";

/// The classes of an adapter's classifier, output `i` being `label_names[i]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdapterLabels {
    pub label_names: Vec<String>,
}

/// Writes `dir/safetune.json`.
pub fn save(dir: &Path, labels: &AdapterLabels) -> Result<(), IoError> {
    let path = dir.join(FILE);
    let text = serde_json::to_string_pretty(labels).expect("labels serialize");
    crate::files::write_atomic(&path, text.as_bytes()).map_err(|e| IoError::Invalid {
        path,
        message: e.to_string(),
    })
}

/// Reads `dir/safetune.json`; None for an adapter without one (written by PEFT, or before the
/// file existed).
pub fn load(dir: &Path) -> Result<Option<AdapterLabels>, IoError> {
    let path = dir.join(FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let invalid = |message: String| IoError::Invalid {
        path: path.clone(),
        message,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| invalid(e.to_string()))?;
    let labels: AdapterLabels = serde_json::from_str(&text)
        .map_err(|e| invalid(format!("not an adapter label file: {e}")))?;
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = labels.label_names.iter().find(|n| !seen.insert(*n)) {
        return Err(invalid(format!("label '{dup}' listed twice")));
    }
    Ok(Some(labels))
}

/// For each of a data set's class names, the adapter output that names it: an error naming the
/// first class the adapter does not know.
pub fn output_of_each(
    adapter_dir: &Path,
    adapter: &AdapterLabels,
    data_names: &[String],
) -> Result<Vec<usize>, IoError> {
    data_names
        .iter()
        .map(|n| {
            adapter
                .label_names
                .iter()
                .position(|a| a == n)
                .ok_or_else(|| IoError::Invalid {
                    path: adapter_dir.join(FILE),
                    message: format!(
                        "the data has label '{n}', which the adapter was not trained on (its \
                         labels: {})",
                        adapter.label_names.join(", ")
                    ),
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn labels_round_trip_and_map_by_name() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        let labels = AdapterLabels {
            label_names: names(&["ham", "spam"]),
        };
        save(dir.path(), &labels).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(labels.clone()));
        // The data lists the classes in another order: each maps to its adapter output.
        let map = output_of_each(dir.path(), &labels, &names(&["spam", "ham"])).unwrap();
        assert_eq!(map, vec![1, 0]);
        let e = output_of_each(dir.path(), &labels, &names(&["ham", "eggs"])).unwrap_err();
        assert!(
            e.to_string().contains("'eggs'") && e.to_string().contains(FILE),
            "{e}"
        );
        std::fs::write(dir.path().join(FILE), r#"{"label_names": ["a", "a"]}"#).unwrap();
        assert!(load(dir.path()).unwrap_err().to_string().contains("twice"));
    }
}
