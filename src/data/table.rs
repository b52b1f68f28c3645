//! Tabular datasets: CSV, GLUE-style TSV, JSONL, JSON arrays and Parquet, described by a
//! [`TableSpec`].

use std::path::Path;

use serde_json::{Map, Value};

use super::{split::stratified_split, DataError, Dataset, Example, Label, Splits, TaskKind};

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum TableFormat {
    /// Comma-separated with standard quoting (RFC 4180).
    Csv,
    /// Tab-separated with quoting *disabled*: GLUE text (SST-2, MRPC) contains
    /// unbalanced `"` that a quoting reader would treat as a field spanning lines.
    Tsv,
    /// One JSON object per line.
    Jsonl,
    /// A top-level JSON array of objects (`[{"text": ..., "label": ...}, ...]`). A `.json` file
    /// that does not start with `[` is read as JSON lines, as `datasets`' `to_json` writes them.
    Json,
    /// Apache Parquet (pandas' / pyarrow's `to_parquet`, Hugging Face's parquet exports): string
    /// text columns; string, integer, float or boolean labels.
    Parquet,
}

impl TableFormat {
    /// The format implied by the extension: `.csv`, `.tsv`, `.jsonl`, `.json` or `.parquet`.
    pub fn from_path(path: &Path) -> Option<Self> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "csv" => Some(Self::Csv),
            "tsv" => Some(Self::Tsv),
            "jsonl" => Some(Self::Jsonl),
            "json" => Some(Self::Json),
            "parquet" | "pq" => Some(Self::Parquet),
            _ => None,
        }
    }

    /// The file extension of this format (GLUE-style folders name their splits with it).
    pub fn extension(self) -> &'static str {
        match self {
            Self::Csv => "csv",
            Self::Tsv => "tsv",
            Self::Jsonl => "jsonl",
            Self::Json => "json",
            Self::Parquet => "parquet",
        }
    }
}

/// Which columns (JSONL: keys) hold the text(s) and label, and how to read the label.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
pub struct TableSpec {
    /// `None`: from the extension, see [`TableFormat::from_path`].
    pub format: Option<TableFormat>,
    pub text_column: String,
    /// Second sentence of pair tasks (MRPC `#2 String`, STS-B `sentence2`).
    pub text_pair_column: Option<String>,
    pub label_column: String,
    pub task: TaskKind,
    /// Fixes the class order (e.g. taken from the train split so all splits
    /// agree). `None`: sorted unique labels, numerically if all are integers
    /// (so "2" < "10").
    pub label_names: Option<Vec<String>>,
}

/// A data row before its label is parsed; `at` says where it is in the file, for errors
/// (`line 3` in text formats, `record 3` in a JSON array, `row 3` in Parquet; 1-based).
pub(super) struct Row {
    pub(super) at: String,
    pub(super) text_a: String,
    pub(super) text_b: Option<String>,
    pub(super) label: String,
}

/// Loads one table. Texts are kept verbatim; labels are trimmed.
pub fn load_table(path: &Path, spec: &TableSpec) -> Result<Dataset, DataError> {
    let format = resolve_format(path, spec)?;
    if format == TableFormat::Parquet {
        let rows = super::parquet::rows(path, spec)?;
        if rows.is_empty() {
            return Err(DataError::format(path, "no data rows"));
        }
        return build(path, spec, rows);
    }
    let content = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    // Some GLUE files (MRPC) start with a byte-order mark that would corrupt the first header.
    let content = content.strip_prefix('\u{feff}').unwrap_or(&content);
    if content.trim().is_empty() {
        return Err(DataError::format(path, "file is empty"));
    }
    let rows = match format {
        TableFormat::Csv => delimited_rows(path, content, spec, b',', true)?,
        TableFormat::Tsv => delimited_rows(path, content, spec, b'\t', false)?,
        TableFormat::Jsonl => jsonl_rows(path, content, spec)?,
        TableFormat::Json if content.trim_start().starts_with('[') => {
            json_array_rows(path, content, spec)?
        }
        TableFormat::Json => jsonl_rows(path, content, spec)?,
        TableFormat::Parquet => unreachable!("read above"),
    };
    if rows.is_empty() {
        return Err(DataError::format(path, "no data rows (only a header)"));
    }
    build(path, spec, rows)
}

/// Loads a GLUE-style folder: `train.tsv`, `dev.tsv` and an optional `test.tsv`
/// (`.csv` / `.jsonl` names when `spec.format` says so).
///
/// Label names come from the train split and are applied to the others, so an
/// unseen label in dev/test is an error rather than a silent new class.
///
/// GLUE's public `test.tsv` files have no labels. So: if `test.tsv` exists and
/// has the label column, it is the test split and validation is all of dev;
/// otherwise dev is split with [`stratified_split`] (seeded by `seed`) into two
/// disjoint halves, validation and test, so that test scores are not measured
/// on the data used for model selection.
pub fn load_glue_dir(dir: &Path, spec: &TableSpec, seed: u64) -> Result<Splits, DataError> {
    let ext = spec.format.map_or("tsv", TableFormat::extension);
    let file = |name: &str| dir.join(format!("{name}.{ext}"));
    let train = load_table(&file("train"), spec)?;
    let mut fixed = spec.clone();
    if spec.task == TaskKind::Classification {
        fixed.label_names = Some(train.label_names.clone());
    }
    let validation = load_table(&file("dev"), &fixed)?;
    let test_path = file("test");
    if test_path.is_file() && has_column(&test_path, spec, &spec.label_column)? {
        let test = load_table(&test_path, &fixed)?;
        return Ok(Splits {
            train,
            validation,
            test,
        });
    }
    let halves = stratified_split(&validation, 0.0, 0.5, seed);
    Ok(Splits {
        train,
        validation: halves.train,
        test: halves.test,
    })
}

/// Explicit split files (`--train-file`, `--validation-file`, `--test-file`), each in any table
/// format (by its extension, or `spec.format`).
#[derive(Clone, Debug)]
pub struct SplitFiles<'a> {
    pub train: &'a Path,
    pub validation: Option<&'a Path>,
    pub test: Option<&'a Path>,
}

/// Loads explicit split files. The class order is the train file's, applied to the others, so a
/// label that train never has is an error naming the validation or test file, not a new class.
/// A split without a file is carved out of the train file as [`stratified_split`] does for one
/// file (`validation_frac` / `test_frac` of it, seeded), so a train + test pair still gets a
/// validation split to choose the best epoch on.
pub fn load_split_files(
    files: &SplitFiles,
    spec: &TableSpec,
    validation_frac: f64,
    test_frac: f64,
    seed: u64,
) -> Result<Splits, DataError> {
    let train = load_table(files.train, spec)?;
    let mut fixed = spec.clone();
    if spec.task == TaskKind::Classification {
        fixed.label_names = Some(train.label_names.clone());
    }
    let given = |p: Option<&Path>| p.map(|p| load_table(p, &fixed)).transpose();
    let (validation, test) = (given(files.validation)?, given(files.test)?);
    let carve_val = if validation.is_none() {
        validation_frac
    } else {
        0.0
    };
    let carve_test = if test.is_none() { test_frac } else { 0.0 };
    let carved = stratified_split(&train, carve_val, carve_test, seed);
    Ok(Splits {
        train: carved.train,
        validation: validation.unwrap_or(carved.validation),
        test: test.unwrap_or(carved.test),
    })
}

fn resolve_format(path: &Path, spec: &TableSpec) -> Result<TableFormat, DataError> {
    spec.format
        .or_else(|| TableFormat::from_path(path))
        .ok_or_else(|| {
            DataError::format(
                path,
                "cannot tell the table format from the extension \
                 (expected .csv, .tsv, .jsonl, .json or .parquet); set `format`",
            )
        })
}

/// Whether the header (JSONL: the first object; Parquet: the schema) of `path` has `column`.
fn has_column(path: &Path, spec: &TableSpec, column: &str) -> Result<bool, DataError> {
    let format = resolve_format(path, spec)?;
    if format == TableFormat::Parquet {
        return Ok(super::parquet::column_names(path)?
            .iter()
            .any(|c| c == column));
    }
    let content = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    let content = content.strip_prefix('\u{feff}').unwrap_or(&content);
    let first = content.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    Ok(match format {
        TableFormat::Tsv => first.split('\t').any(|h| h.trim() == column),
        TableFormat::Csv => csv::ReaderBuilder::new()
            .has_headers(false)
            .from_reader(first.as_bytes())
            .records()
            .next()
            .and_then(Result::ok)
            .is_some_and(|r| r.iter().any(|h| h.trim() == column)),
        TableFormat::Jsonl | TableFormat::Json if !content.trim_start().starts_with('[') => {
            serde_json::from_str::<Map<String, Value>>(first).is_ok_and(|o| o.contains_key(column))
        }
        TableFormat::Jsonl | TableFormat::Json => {
            serde_json::from_str::<Vec<Map<String, Value>>>(content)
                .is_ok_and(|v| v.first().is_some_and(|o| o.contains_key(column)))
        }
        TableFormat::Parquet => unreachable!("read above"),
    })
}

fn delimited_rows(
    path: &Path,
    content: &str,
    spec: &TableSpec,
    delimiter: u8,
    quoting: bool,
) -> Result<Vec<Row>, DataError> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .quoting(quoting)
        .from_reader(content.as_bytes());
    let headers = reader.headers().map_err(|e| csv_error(path, e))?.clone();
    let column = |name: &str, what: &str| {
        headers
            .iter()
            .position(|h| h.trim() == name)
            .ok_or_else(|| {
                let names: Vec<_> = headers.iter().collect();
                let msg = format!(
                    "{what} column '{name}' missing (columns: {})",
                    names.join(", ")
                );
                DataError::format(path, msg)
            })
    };
    let a = column(&spec.text_column, "text")?;
    let b = spec
        .text_pair_column
        .as_deref()
        .map(|c| column(c, "text pair"))
        .transpose()?;
    let l = column(&spec.label_column, "label")?;
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| csv_error(path, e))?;
        rows.push(Row {
            at: format!("line {}", record.position().map_or(0, |p| p.line())),
            text_a: record[a].to_string(),
            text_b: b.map(|b| record[b].to_string()),
            label: record[l].to_string(),
        });
    }
    Ok(rows)
}

/// Rewords the csv crate's column-count error in terms of the header; others
/// already carry a position.
fn csv_error(path: &Path, e: csv::Error) -> DataError {
    let msg = match e.kind() {
        csv::ErrorKind::UnequalLengths {
            pos,
            expected_len,
            len,
        } => format!(
            "line {}: {len} columns, expected {expected_len} as in the header",
            pos.as_ref().map_or(0, |p| p.line())
        ),
        _ => e.to_string(),
    };
    DataError::format(path, msg)
}

fn jsonl_rows(path: &Path, content: &str, spec: &TableSpec) -> Result<Vec<Row>, DataError> {
    let mut rows = Vec::new();
    for (i, text) in content.lines().enumerate() {
        if text.trim().is_empty() {
            continue;
        }
        let at = format!("line {}", i + 1);
        let obj: Map<String, Value> = serde_json::from_str(text)
            .map_err(|e| DataError::format(path, format!("{at}: not a valid JSON object ({e})")))?;
        rows.push(object_row(path, at, &obj, spec)?);
    }
    Ok(rows)
}

/// A top-level JSON array of objects; errors name the 1-based record.
fn json_array_rows(path: &Path, content: &str, spec: &TableSpec) -> Result<Vec<Row>, DataError> {
    let items: Vec<Value> = serde_json::from_str(content)
        .map_err(|e| DataError::format(path, format!("not a valid JSON array ({e})")))?;
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let at = format!("record {}", i + 1);
            match item {
                Value::Object(obj) => object_row(path, at, obj, spec),
                _ => Err(DataError::format(path, format!("{at}: not a JSON object"))),
            }
        })
        .collect()
}

/// The row of one JSON object. Texts must be strings; labels may also be numbers (0/1, 3.8).
fn object_row(
    path: &Path,
    at: String,
    obj: &Map<String, Value>,
    spec: &TableSpec,
) -> Result<Row, DataError> {
    let err = |msg: String| DataError::format(path, format!("{at}: {msg}"));
    let field = |name: &str, what: &str, label: bool| match obj.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) if label => Ok(n.to_string()),
        Some(_) => Err(err(format!(
            "{what} column '{name}' must be a {}",
            if label { "string or number" } else { "string" }
        ))),
        None => {
            let keys: Vec<_> = obj.keys().map(String::as_str).collect();
            Err(err(format!(
                "{what} column '{name}' missing (keys: {})",
                keys.join(", ")
            )))
        }
    };
    Ok(Row {
        text_a: field(&spec.text_column, "text", false)?,
        text_b: spec
            .text_pair_column
            .as_deref()
            .map(|c| field(c, "text pair", false))
            .transpose()?,
        label: field(&spec.label_column, "label", true)?,
        at,
    })
}

fn build(path: &Path, spec: &TableSpec, rows: Vec<Row>) -> Result<Dataset, DataError> {
    let label_names = match (spec.task, &spec.label_names) {
        (TaskKind::Qa, _) => {
            let msg = "question answering (task qa) reads SQuAD JSON, not a table of labels";
            return Err(DataError::format(path, msg));
        }
        (TaskKind::Image, _) => {
            let msg = "image classification (task image) reads IDX files or image folders, not \
                       a table";
            return Err(DataError::format(path, msg));
        }
        (TaskKind::Regression, _) => Vec::new(),
        (TaskKind::Classification, Some(names)) => names.clone(),
        (TaskKind::Classification, None) => infer_label_names(rows.iter().map(|r| r.label.trim())),
    };
    let examples = rows
        .into_iter()
        .map(|r| {
            let raw = r.label.trim();
            let err = |msg: String| DataError::format(path, format!("{}: {msg}", r.at));
            if raw.is_empty() {
                return Err(err(format!(
                    "empty label in column '{}'",
                    spec.label_column
                )));
            }
            let label = match spec.task {
                TaskKind::Classification | TaskKind::Image => {
                    let idx = label_names.iter().position(|n| n == raw).ok_or_else(|| {
                        err(format!(
                            "unknown label '{raw}' (known: {})",
                            label_names.join(", ")
                        ))
                    })?;
                    Label::Class(idx)
                }
                TaskKind::Regression | TaskKind::Qa => {
                    let v = raw.parse::<f32>().ok().filter(|v| v.is_finite());
                    Label::Value(v.ok_or_else(|| {
                        err(format!(
                            "label '{raw}' in column '{}' is not a number (task is regression)",
                            spec.label_column
                        ))
                    })?)
                }
            };
            Ok(Example {
                text_a: r.text_a,
                text_b: r.text_b,
                label,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Dataset {
        examples,
        label_names,
        task: spec.task,
    })
}

/// Sorted unique labels; numeric order when all are integers ("2" before "10").
fn infer_label_names<'a>(labels: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut names: Vec<String> = labels
        .filter(|l| !l.is_empty())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .map(String::from)
        .collect();
    if names.iter().all(|n| n.parse::<i64>().is_ok()) {
        names.sort_by_key(|n| n.parse::<i64>().unwrap_or(0));
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(rel)
    }

    fn spec(text: &str, pair: Option<&str>, label: &str, task: TaskKind) -> TableSpec {
        TableSpec {
            format: None,
            text_column: text.into(),
            text_pair_column: pair.map(Into::into),
            label_column: label.into(),
            task,
            label_names: None,
        }
    }

    fn sst2() -> TableSpec {
        spec("sentence", None, "label", TaskKind::Classification)
    }

    /// Writes `content` to a temp file named `name` and loads it with `spec`.
    fn load_str(name: &str, content: &str, spec: &TableSpec) -> Result<Dataset, DataError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        load_table(&path, spec)
    }

    fn err_msg(name: &str, content: &str, spec: &TableSpec) -> String {
        load_str(name, content, spec).unwrap_err().to_string()
    }

    #[test]
    fn sst2_tsv_keeps_unbalanced_quotes() {
        let ds = load_table(&fixture("glue/sst2/train.tsv"), &sst2()).unwrap();
        assert_eq!(ds.len(), 10);
        assert_eq!(ds.label_names, ["0", "1"]);
        assert_eq!(ds.num_labels(), 2);
        // Row 3 holds a lone `"`; with quoting on it would swallow the following rows.
        assert_eq!(ds.examples[2].text_a, "\" the best part is the popcorn ");
        assert_eq!(ds.examples[2].label, Label::Class(0));
        assert!(ds.examples.iter().all(|e| e.text_b.is_none()));
    }

    #[test]
    fn mrpc_pairs_with_bom_header() {
        let s = spec(
            "#1 String",
            Some("#2 String"),
            "Quality",
            TaskKind::Classification,
        );
        let ds = load_table(&fixture("glue/mrpc/train.tsv"), &s).unwrap();
        assert_eq!(ds.len(), 10);
        let e = &ds.examples[0];
        assert!(e.text_a.starts_with("The council approved"));
        assert!(e.text_b.as_deref().unwrap().starts_with("Officials said"));
        assert_eq!(e.label, Label::Class(1));
    }

    #[test]
    fn stsb_regression_pairs() {
        let s = spec(
            "sentence1",
            Some("sentence2"),
            "score",
            TaskKind::Regression,
        );
        let ds = load_table(&fixture("glue/stsb/train.tsv"), &s).unwrap();
        assert_eq!((ds.len(), ds.num_labels()), (10, 1));
        assert!(ds.label_names.is_empty());
        assert_eq!(ds.examples[0].label, Label::Value(5.0));
        assert_eq!(ds.examples[1].label, Label::Value(3.8));
        assert_eq!(
            ds.examples[1].text_b.as_deref(),
            Some("A man is playing a flute.")
        );
    }

    #[test]
    fn csv_with_quoting_and_string_labels() {
        let s = spec("text", None, "sentiment", TaskKind::Classification);
        let ds = load_table(&fixture("small.csv"), &s).unwrap();
        assert_eq!(ds.len(), 6);
        assert_eq!(ds.label_names, ["negative", "neutral", "positive"]);
        assert_eq!(
            ds.examples[1].text_a,
            "Great, \"really\" great\nsecond line"
        );
        assert_eq!(ds.examples[1].label, Label::Class(2));
    }

    #[test]
    fn jsonl_numeric_labels_pairs_and_blank_lines() {
        let s = spec(
            "premise",
            Some("hypothesis"),
            "label",
            TaskKind::Classification,
        );
        let ds = load_table(&fixture("small.jsonl"), &s).unwrap();
        assert_eq!(ds.len(), 5);
        // Integer labels sort numerically: 2 before 10.
        assert_eq!(ds.label_names, ["0", "2", "10"]);
        assert_eq!(
            ds.examples[0].text_b.as_deref(),
            Some("A person is outdoors.")
        );
        assert_eq!(ds.examples[4].label, Label::Class(2));
    }

    #[test]
    fn fixed_label_order_and_unknown_label() {
        let mut s = sst2();
        s.label_names = Some(vec!["1".into(), "0".into()]);
        let ds = load_table(&fixture("glue/sst2/train.tsv"), &s).unwrap();
        assert_eq!(ds.examples[2].label, Label::Class(1));
        s.label_names = Some(vec!["0".into()]);
        let msg = load_table(&fixture("glue/sst2/train.tsv"), &s)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("train.tsv: line 2: unknown label '1' (known: 0)"),
            "{msg}"
        );
    }

    #[test]
    fn error_missing_label_column() {
        let msg = err_msg(
            "train.csv",
            "text,y\nhello,1\n",
            &spec("text", None, "label", TaskKind::Classification),
        );
        assert!(
            msg.ends_with("train.csv: label column 'label' missing (columns: text, y)"),
            "{msg}"
        );
        let msg = err_msg(
            "t.jsonl",
            "{\"text\": \"a\", \"label\": 1}\n{\"text\": \"b\"}\n",
            &spec("text", None, "label", TaskKind::Classification),
        );
        assert!(
            msg.ends_with("t.jsonl: line 2: label column 'label' missing (keys: text)"),
            "{msg}"
        );
    }

    #[test]
    fn error_empty_and_header_only() {
        let msg = err_msg("train.tsv", "", &sst2());
        assert!(msg.ends_with("train.tsv: file is empty"), "{msg}");
        let msg = err_msg("train.jsonl", "\n  \n", &sst2());
        assert!(msg.ends_with("train.jsonl: file is empty"), "{msg}");
        let msg = err_msg("train.tsv", "sentence\tlabel\n", &sst2());
        assert!(
            msg.ends_with("train.tsv: no data rows (only a header)"),
            "{msg}"
        );
    }

    #[test]
    fn error_malformed_jsonl_line() {
        let msg = err_msg(
            "d.jsonl",
            "{\"sentence\": \"ok\", \"label\": 0}\n\n{\"sentence\": \"bad\",\n",
            &sst2(),
        );
        assert!(
            msg.contains("d.jsonl: line 3: not a valid JSON object"),
            "{msg}"
        );
        let msg = err_msg("d.jsonl", "{\"sentence\": 5, \"label\": 0}\n", &sst2());
        assert!(
            msg.ends_with("line 1: text column 'sentence' must be a string"),
            "{msg}"
        );
    }

    #[test]
    fn error_wrong_column_count() {
        let msg = err_msg(
            "dev.tsv",
            "sentence\tlabel\ngood\t1\nbad\textra\t0\n",
            &sst2(),
        );
        assert!(
            msg.ends_with("dev.tsv: line 3: 3 columns, expected 2 as in the header"),
            "{msg}"
        );
    }

    #[test]
    fn error_non_numeric_regression_label() {
        let s = spec("s", None, "score", TaskKind::Regression);
        let msg = err_msg("sts.tsv", "s\tscore\na\t1.5\nb\thigh\n", &s);
        assert!(msg.ends_with("sts.tsv: line 3: label 'high' in column 'score' is not a number (task is regression)"), "{msg}");
    }

    #[test]
    fn error_unknown_extension() {
        let msg = err_msg("data.txt", "x", &sst2());
        assert!(
            msg.contains("data.txt: cannot tell the table format"),
            "{msg}"
        );
        let mut s = sst2();
        s.format = Some(TableFormat::Tsv);
        assert_eq!(
            load_str("data.txt", "sentence\tlabel\nhi\t1\n", &s)
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn glue_dir_without_test_splits_dev_in_halves() {
        let splits = load_glue_dir(&fixture("glue/sst2"), &sst2(), 7).unwrap();
        assert_eq!(splits.train.len(), 10);
        // dev: 4 x "0", 4 x "1" -> 2 + 2 per half, disjoint.
        assert_eq!((splits.validation.len(), splits.test.len()), (4, 4));
        let mut all: Vec<_> = splits
            .validation
            .examples
            .iter()
            .chain(&splits.test.examples)
            .map(|e| e.text_a.clone())
            .collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 8);
        assert_eq!(splits.test.label_names, ["0", "1"]);
        let again = load_glue_dir(&fixture("glue/sst2"), &sst2(), 7).unwrap();
        assert_eq!(
            again.test.examples[0].text_a,
            splits.test.examples[0].text_a
        );

        let s = spec(
            "sentence1",
            Some("sentence2"),
            "score",
            TaskKind::Regression,
        );
        let splits = load_glue_dir(&fixture("glue/stsb"), &s, 1).unwrap();
        assert_eq!(
            (
                splits.train.len(),
                splits.validation.len() + splits.test.len()
            ),
            (10, 8)
        );
        let s = spec(
            "#1 String",
            Some("#2 String"),
            "Quality",
            TaskKind::Classification,
        );
        let splits = load_glue_dir(&fixture("glue/mrpc"), &s, 1).unwrap();
        assert_eq!(splits.validation.len() + splits.test.len(), 8);
    }

    #[test]
    fn glue_dir_uses_labelled_test_and_train_label_order() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, body: &str| std::fs::write(dir.path().join(name), body).unwrap();
        write("train.tsv", "sentence\tlabel\na\tpos\nb\tneg\n");
        write("dev.tsv", "sentence\tlabel\nc\tneg\n");
        // Unlabelled test (GLUE style): dev is split instead.
        write("test.tsv", "index\tsentence\n0\td\n");
        let splits = load_glue_dir(dir.path(), &sst2(), 0).unwrap();
        assert_eq!(splits.validation.len() + splits.test.len(), 1);
        write("test.tsv", "sentence\tlabel\nd\tpos\ne\tneg\n");
        let splits = load_glue_dir(dir.path(), &sst2(), 0).unwrap();
        assert_eq!((splits.validation.len(), splits.test.len()), (1, 2));
        assert_eq!(splits.test.examples[0].label, Label::Class(1));
        write("dev.tsv", "sentence\tlabel\nc\tmaybe\n");
        let msg = load_glue_dir(dir.path(), &sst2(), 0)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("dev.tsv: line 2: unknown label 'maybe' (known: neg, pos)"),
            "{msg}"
        );
    }

    #[test]
    fn json_array_records_and_json_lines_under_json() {
        let s = spec("text", None, "label", TaskKind::Classification);
        let array = r#"[{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"},
            {"text": "c", "label": "pos"}]"#;
        let ds = load_str("d.json", array, &s).unwrap();
        assert_eq!(ds.len(), 3);
        assert_eq!(ds.label_names, ["neg", "pos"]);
        assert_eq!(ds.examples[1].text_a, "b");
        assert_eq!(ds.examples[2].label, Label::Class(1));
        // `datasets`' to_json writes JSON lines under .json: read as such.
        let lines = "{\"text\": \"a\", \"label\": 1}\n{\"text\": \"b\", \"label\": 0}\n";
        assert_eq!(load_str("d.json", lines, &s).unwrap().len(), 2);
        // Errors name the record.
        let bad = r#"[{"text": "a", "label": 1}, {"text": 7, "label": 0}]"#;
        let msg = err_msg("d.json", bad, &s);
        assert!(
            msg.ends_with("d.json: record 2: text column 'text' must be a string"),
            "{msg}"
        );
        let msg = err_msg("d.json", r#"[{"text": "a", "label": 1}, 3]"#, &s);
        assert!(
            msg.ends_with("d.json: record 2: not a JSON object"),
            "{msg}"
        );
        let msg = err_msg("d.json", "[{\"text\": \"a\",", &s);
        assert!(msg.contains("d.json: not a valid JSON array"), "{msg}");
    }

    /// Writes a Parquet file: a UTF-8 `text` column, an INT64 `label` column and an optional
    /// DOUBLE `score` column (None: a null), Snappy-compressed as pandas writes by default.
    pub(crate) fn write_parquet(
        path: &Path,
        texts: &[&str],
        labels: &[i64],
        scores: &[Option<f64>],
    ) {
        use parquet::data_type::{ByteArray, ByteArrayType, DoubleType, Int64Type};
        use parquet::file::properties::WriterProperties;
        use parquet::file::writer::SerializedFileWriter;
        let schema = parquet::schema::parser::parse_message_type(
            "message schema { REQUIRED BYTE_ARRAY text (UTF8); REQUIRED INT64 label; \
             OPTIONAL DOUBLE score; }",
        )
        .unwrap();
        let props = WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .build();
        let file = std::fs::File::create(path).unwrap();
        let mut w =
            SerializedFileWriter::new(file, std::sync::Arc::new(schema), props.into()).unwrap();
        let mut rg = w.next_row_group().unwrap();
        let texts: Vec<ByteArray> = texts.iter().map(|t| ByteArray::from(*t)).collect();
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<ByteArrayType>()
            .write_batch(&texts, None, None)
            .unwrap();
        col.close().unwrap();
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<Int64Type>()
            .write_batch(labels, None, None)
            .unwrap();
        col.close().unwrap();
        let present: Vec<f64> = scores.iter().flatten().copied().collect();
        let def: Vec<i16> = scores.iter().map(|s| i16::from(s.is_some())).collect();
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<DoubleType>()
            .write_batch(&present, Some(&def), None)
            .unwrap();
        col.close().unwrap();
        rg.close().unwrap();
        w.close().unwrap();
    }

    #[test]
    fn parquet_string_int_and_float_columns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.parquet");
        let texts = ["good film", "bad film", "fine film", "dull film"];
        write_parquet(
            &path,
            &texts,
            &[1, 0, 10, 0],
            &[Some(4.5), Some(1.0), Some(3.25), None],
        );
        let s = spec("text", None, "label", TaskKind::Classification);
        let ds = load_table(&path, &s).unwrap();
        assert_eq!(ds.len(), 4);
        // Integer labels, numeric order as in the text formats.
        assert_eq!(ds.label_names, ["0", "1", "10"]);
        let got: Vec<(&str, Label)> = ds
            .examples
            .iter()
            .map(|e| (e.text_a.as_str(), e.label.clone()))
            .collect();
        assert_eq!(
            got,
            [
                ("good film", Label::Class(1)),
                ("bad film", Label::Class(0)),
                ("fine film", Label::Class(2)),
                ("dull film", Label::Class(0)),
            ]
        );
        // A float column as a regression target; its null in row 4 is an error naming it.
        let r = spec("text", None, "score", TaskKind::Regression);
        let msg = load_table(&path, &r).unwrap_err().to_string();
        assert!(
            msg.ends_with("d.parquet: row 4: label column 'score' is null"),
            "{msg}"
        );
        write_parquet(
            &path,
            &texts[..3],
            &[1, 0, 1],
            &[Some(4.5), Some(1.0), Some(3.25)],
        );
        let ds = load_table(&path, &r).unwrap();
        let values: Vec<Label> = ds.examples.iter().map(|e| e.label.clone()).collect();
        assert_eq!(
            values,
            [Label::Value(4.5), Label::Value(1.0), Label::Value(3.25)]
        );
        // A missing column lists the file's columns; an integer text column is refused.
        let msg = load_table(
            &path,
            &spec("sentence", None, "label", TaskKind::Classification),
        )
        .unwrap_err()
        .to_string();
        assert!(
            msg.ends_with(
                "d.parquet: text column 'sentence' missing (columns: text, label, score)"
            ),
            "{msg}"
        );
        let msg = load_table(
            &path,
            &spec("label", None, "label", TaskKind::Classification),
        )
        .unwrap_err()
        .to_string();
        assert!(
            msg.ends_with("row 1: text column 'label' must hold strings"),
            "{msg}"
        );
        // Not Parquet at all.
        std::fs::write(&path, "text,label\na,1\n").unwrap();
        let msg = load_table(&path, &s).unwrap_err().to_string();
        assert!(
            msg.contains("d.parquet: not a readable Parquet file"),
            "{msg}"
        );
    }

    #[test]
    fn split_files_share_the_train_label_order_and_carve_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, body: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, body).unwrap();
            p
        };
        let mut train_csv = String::from("text,label\n");
        for i in 0..20 {
            train_csv += &format!("good {i},pos\nbad {i},neg\n");
        }
        let train = write("train.csv", &train_csv);
        // Validation as JSONL with only "pos": the class keeps train's index (1), not 0.
        let val = write("val.jsonl", "{\"text\": \"v\", \"label\": \"pos\"}\n");
        let test = write(
            "test.json",
            r#"[{"text": "t1", "label": "neg"}, {"text": "t2", "label": "pos"}]"#,
        );
        let s = spec("text", None, "label", TaskKind::Classification);
        let files = SplitFiles {
            train: &train,
            validation: Some(&val),
            test: Some(&test),
        };
        let sp = load_split_files(&files, &s, 0.15, 0.15, 1).unwrap();
        assert_eq!(
            (sp.train.len(), sp.validation.len(), sp.test.len()),
            (40, 1, 2)
        );
        assert_eq!(sp.validation.label_names, ["neg", "pos"]);
        assert_eq!(sp.validation.examples[0].label, Label::Class(1));
        assert_eq!(sp.test.examples[1].label, Label::Class(1));
        // No validation file: 15% of train (3 per class) validates, test stays the file's.
        let files = SplitFiles {
            validation: None,
            ..files
        };
        let sp = load_split_files(&files, &s, 0.15, 0.15, 1).unwrap();
        assert_eq!(
            (sp.train.len(), sp.validation.len(), sp.test.len()),
            (34, 6, 2)
        );
        let texts = |d: &Dataset| {
            d.examples
                .iter()
                .map(|e| e.text_a.clone())
                .collect::<Vec<_>>()
        };
        assert!(texts(&sp.validation)
            .iter()
            .all(|t| !texts(&sp.train).contains(t)));
        // Neither: the train file is split as one file is.
        let only = SplitFiles {
            train: &train,
            validation: None,
            test: None,
        };
        let sp = load_split_files(&only, &s, 0.15, 0.15, 1).unwrap();
        assert_eq!(
            (sp.train.len(), sp.validation.len(), sp.test.len()),
            (28, 6, 6)
        );
        // A label train never has: an error naming the test file.
        let bad = write("bad.csv", "text,label\nx,maybe\n");
        let files = SplitFiles {
            train: &train,
            validation: None,
            test: Some(&bad),
        };
        let msg = load_split_files(&files, &s, 0.15, 0.15, 1)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("bad.csv: line 2: unknown label 'maybe' (known: neg, pos)"),
            "{msg}"
        );
    }

    #[test]
    fn spec_deserializes_from_json() {
        let s: TableSpec = serde_json::from_str(
            r#"{"format":"tsv","text_column":"sentence","text_pair_column":null,
                "label_column":"label","task":"classification","label_names":null}"#,
        )
        .unwrap();
        assert_eq!(
            (s.format, s.task),
            (Some(TableFormat::Tsv), TaskKind::Classification)
        );
    }
}
