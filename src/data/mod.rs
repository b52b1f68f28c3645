//! Dataset loading and splitting, kept free of tensors so it can be tested on
//! plain files: the trainer tokenizes [`Example`]s itself.
//!
//! Loaders: [`load_table`] / [`load_glue_dir`] / [`load_split_files`] (CSV, GLUE-style TSV,
//! JSONL, JSON arrays, Parquet),
//! [`load_text_folder`] (BBC News, one folder per class),
//! [`load_spamassassin`] (raw emails) and [`stratified_split`].

pub mod batch;
pub mod bbc;
pub mod chat;
pub mod images;
pub mod lm;
mod parquet;
pub mod spam;
pub mod split;
pub mod squad;
pub mod table;

use std::path::{Path, PathBuf};

pub use bbc::load_text_folder;
pub use spam::load_spamassassin;
pub use split::stratified_split;
pub use table::{load_glue_dir, load_split_files, load_table, SplitFiles, TableFormat, TableSpec};

/// Gold label of one example: a class index into [`Dataset::label_names`] or a
/// regression target.
#[derive(Clone, Debug, PartialEq)]
pub enum Label {
    Class(usize),
    Value(f32),
}

/// One input: a text, or a text pair for sentence-pair tasks (MRPC, STS-B).
#[derive(Clone, Debug)]
pub struct Example {
    pub text_a: String,
    pub text_b: Option<String>,
    pub label: Label,
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    Classification,
    Regression,
    /// Extractive question answering on SQuAD JSON (see [`squad`]).
    Qa,
    /// Image classification with a ViT: IDX files or an image folder (see [`images`]).
    Image,
}

#[derive(Clone, Debug)]
pub struct Dataset {
    pub examples: Vec<Example>,
    /// Class names in index order; empty for regression.
    pub label_names: Vec<String>,
    pub task: TaskKind,
}

impl Dataset {
    /// Width of the model head: number of classes, or 1 for regression.
    pub fn num_labels(&self) -> usize {
        match self.task {
            TaskKind::Classification | TaskKind::Image => self.label_names.len(),
            TaskKind::Regression => 1,
            TaskKind::Qa => 2,
        }
    }

    pub fn len(&self) -> usize {
        self.examples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// Renumbers the classes as `names` (a model's output order): class `c` becomes `to[c]`.
    pub fn relabel(&mut self, to: &[usize], names: Vec<String>) {
        for e in &mut self.examples {
            if let Label::Class(c) = &mut e.label {
                *c = to[*c];
            }
        }
        self.label_names = names;
    }
}

/// Loading errors. Every message starts with the file (or folder) and, where it
/// applies, the 1-based line number, so a user can fix the data without a debugger.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// Content that does not match what the loader expects.
    #[error("{}: {msg}", path.display())]
    Format { path: PathBuf, msg: String },
}

impl DataError {
    pub(crate) fn format(path: &Path, msg: impl Into<String>) -> Self {
        DataError::Format {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }

    pub(crate) fn io(path: &Path, error: std::io::Error) -> Self {
        DataError::Io {
            path: path.to_path_buf(),
            error,
        }
    }
}

/// Train / validation / test partitions sharing one label order.
#[derive(Clone, Debug)]
pub struct Splits {
    pub train: Dataset,
    pub validation: Dataset,
    pub test: Dataset,
}

/// Sorted names of the sub-folders (or, with `dirs == false`, of the `.txt`
/// files) of `dir`; sorting makes loading order, and so seeded splits,
/// independent of the file system. Hidden entries are skipped.
pub(crate) fn sorted_entries(dir: &Path, dirs: bool) -> Result<Vec<String>, DataError> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_dir = entry.path().is_dir();
        let wanted = if dirs {
            is_dir
        } else {
            !is_dir && name.ends_with(".txt")
        };
        if wanted && !name.starts_with('.') {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Reads a file as text, replacing invalid UTF-8 (some corpora are Latin-1).
pub(crate) fn read_lossy(path: &Path) -> Result<String, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {

    /// Classes renumbered by name keep each example's class name.
    #[test]
    fn relabel_keeps_each_examples_class_name() {
        let ex = |c| Example {
            text_a: String::new(),
            text_b: None,
            label: Label::Class(c),
        };
        let mut ds = Dataset {
            examples: vec![ex(0), ex(1), ex(1)],
            label_names: vec!["neg".into(), "pos".into()],
            task: TaskKind::Classification,
        };
        let before: Vec<String> = ds
            .examples
            .iter()
            .map(|e| match e.label {
                Label::Class(c) => ds.label_names[c].clone(),
                Label::Value(_) => unreachable!(),
            })
            .collect();
        ds.relabel(&[2, 0], vec!["pos".into(), "mid".into(), "neg".into()]);
        let after: Vec<String> = ds
            .examples
            .iter()
            .map(|e| match e.label {
                Label::Class(c) => ds.label_names[c].clone(),
                Label::Value(_) => unreachable!(),
            })
            .collect();
        assert_eq!(before, after);
        assert_eq!(ds.num_labels(), 3);
    }

    use super::*;

    #[test]
    fn num_labels_and_error_messages() {
        let ds = Dataset {
            examples: vec![],
            label_names: vec![],
            task: TaskKind::Regression,
        };
        assert_eq!((ds.num_labels(), ds.len(), ds.is_empty()), (1, 0, true));
        let e = DataError::format(Path::new("data/train.csv"), "file is empty");
        assert_eq!(e.to_string(), "data/train.csv: file is empty");
        assert_eq!(
            serde_json::to_string(&TaskKind::Classification).unwrap(),
            "\"classification\""
        );
    }
}
