//! What a classifier adapter's outputs mean and how its data was read: `safetune.json` beside the
//! PEFT files, holding the class names in output order (PEFT's own files keep only tensor shapes)
//! and the run's data settings (task, max length, columns, split). `eval` maps a data set's labels
//! by these names, whatever order the file lists them in, and reads data with these settings
//! unless flags say otherwise; `merge` writes the names as `id2label` / `label2id`.

use super::IoError;
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const FILE: &str = "safetune.json";

/// The classes of an adapter's classifier, output `i` being `label_names[i]` (none for
/// regression), and the data settings it was trained with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterLabels {
    pub label_names: Vec<String>,
    /// Absent in files written before the settings were kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<TrainedOn>,
}

/// How the training run read its data: what `eval` needs to read other data (or the run's own
/// split) the same way.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainedOn {
    /// `classification` or `regression`.
    pub task: String,
    pub max_length: usize,
    pub text_column: String,
    pub text_pair_column: Option<String>,
    pub label_column: String,
    /// The split's seed and fractions: `eval --split test` scores the run's own test split.
    pub seed: u64,
    pub validation_fraction: f64,
    pub test_fraction: f64,
    /// Question answering: the context tokens consecutive windows share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doc_stride: Option<usize>,
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
            data: Some(TrainedOn {
                task: "classification".into(),
                max_length: 64,
                text_column: "body".into(),
                text_pair_column: None,
                label_column: "kind".into(),
                seed: 3,
                validation_fraction: 0.1,
                test_fraction: 0.2,
                doc_stride: None,
            }),
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
        // A file written before the data settings were kept still loads.
        std::fs::write(dir.path().join(FILE), r#"{"label_names": ["a", "b"]}"#).unwrap();
        assert_eq!(load(dir.path()).unwrap().unwrap().data, None);
        std::fs::write(dir.path().join(FILE), r#"{"label_names": ["a", "a"]}"#).unwrap();
        assert!(load(dir.path()).unwrap_err().to_string().contains("twice"));
    }
}
