//! Parquet tables through the `parquet` crate's row API (no Arrow): only the text and label
//! columns are read (a projection), so wide files cost what the task uses.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use parquet::schema::types::Type;

use super::table::{Row, TableSpec};
use super::DataError;

fn open(path: &Path) -> Result<SerializedFileReader<File>, DataError> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let len = file.metadata().map_err(|e| DataError::io(path, e))?.len();
    let reader = SerializedFileReader::new(file)
        .map_err(|e| DataError::format(path, format!("not a readable Parquet file ({e})")))?;
    check_chunks(path, &reader, len)?;
    Ok(reader)
}

/// Refuses a column chunk whose offset or size is negative or past the file's end: the
/// `parquet` crate asserts on a negative one (`ColumnChunkMetaData::byte_range`, reached when
/// the rows are read), a panic the `parquet` fuzz target found.
fn check_chunks(
    path: &Path,
    reader: &SerializedFileReader<File>,
    len: u64,
) -> Result<(), DataError> {
    for (g, group) in reader.metadata().row_groups().iter().enumerate() {
        for (c, chunk) in group.columns().iter().enumerate() {
            let start = chunk
                .dictionary_page_offset()
                .unwrap_or(chunk.data_page_offset());
            let size = chunk.compressed_size();
            let end = u64::try_from(start)
                .ok()
                .zip(u64::try_from(size).ok())
                .and_then(|(s, n)| s.checked_add(n));
            if end.is_none_or(|end| end > len) {
                let msg = format!(
                    "not a readable Parquet file (row group {g}, column {c}: {size} bytes at \
                     offset {start}, outside the file's {len} bytes)"
                );
                return Err(DataError::format(path, msg));
            }
        }
    }
    Ok(())
}

/// The top-level column names of a Parquet file, in schema order.
pub(super) fn column_names(path: &Path) -> Result<Vec<String>, DataError> {
    let reader = open(path)?;
    let root = reader
        .metadata()
        .file_metadata()
        .schema_descr()
        .root_schema();
    Ok(root
        .get_fields()
        .iter()
        .map(|f| f.name().to_string())
        .collect())
}

/// The rows of `path`: texts from string columns, labels from string, integer, float or boolean
/// columns. A missing column, a null or a value of another type is an error naming the column
/// (and the 1-based row).
pub(super) fn rows(path: &Path, spec: &TableSpec) -> Result<Vec<Row>, DataError> {
    // A last resort: the `parquet` crate still asserts (panics) on some malformed files instead
    // of returning an error; the case the fuzz target found is checked in `open`, and any other
    // is caught here so that the file is refused by name rather than ending the command.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read_rows(path, spec))).unwrap_or_else(
        |_| {
            let msg = "not a readable Parquet file (the parquet reader panicked on it)";
            Err(DataError::format(path, msg))
        },
    )
}

fn read_rows(path: &Path, spec: &TableSpec) -> Result<Vec<Row>, DataError> {
    let reader = open(path)?;
    let root = reader
        .metadata()
        .file_metadata()
        .schema_descr()
        .root_schema();
    let fields = root.get_fields();
    let column = |name: &str, what: &str| {
        fields
            .iter()
            .find(|f| f.name() == name)
            .cloned()
            .ok_or_else(|| {
                let names: Vec<_> = fields.iter().map(|f| f.name()).collect();
                let msg = format!(
                    "{what} column '{name}' missing (columns: {})",
                    names.join(", ")
                );
                DataError::format(path, msg)
            })
    };
    let mut wanted = vec![column(&spec.text_column, "text")?];
    if let Some(pair) = &spec.text_pair_column {
        wanted.push(column(pair, "text pair")?);
    }
    wanted.push(column(&spec.label_column, "label")?);
    // A column named twice (text and label the same) is projected once.
    wanted.dedup_by(|a, b| a.name() == b.name());
    let projection = Type::group_type_builder(root.name())
        .with_fields(wanted.into_iter().collect::<Vec<Arc<Type>>>())
        .build()
        .map_err(|e| DataError::format(path, format!("cannot select the columns ({e})")))?;
    let iter = reader
        .get_row_iter(Some(projection))
        .map_err(|e| DataError::format(path, format!("cannot read rows ({e})")))?;
    let mut rows = Vec::new();
    for (i, row) in iter.enumerate() {
        let at = format!("row {}", i + 1);
        let row = row.map_err(|e| DataError::format(path, format!("{at}: {e}")))?;
        let get = |name: &str, what: &str, label: bool| -> Result<String, DataError> {
            let err = |msg: String| DataError::format(path, format!("{at}: {msg}"));
            let field = row
                .get_column_iter()
                .find(|(n, _)| n.as_str() == name)
                .map(|(_, f)| f);
            match field {
                Some(Field::Str(s)) => Ok(s.clone()),
                Some(Field::Null) | None => Err(err(format!("{what} column '{name}' is null"))),
                Some(f) if label => scalar(f).ok_or_else(|| {
                    err(format!(
                        "label column '{name}' must hold strings, integers, floats or booleans"
                    ))
                }),
                Some(_) => Err(err(format!("{what} column '{name}' must hold strings"))),
            }
        };
        rows.push(Row {
            text_a: get(&spec.text_column, "text", false)?,
            text_b: spec
                .text_pair_column
                .as_deref()
                .map(|c| get(c, "text pair", false))
                .transpose()?,
            label: get(&spec.label_column, "label", true)?,
            at,
        });
    }
    Ok(rows)
}

/// A label value as the text formats would spell it (`3`, `0.5`, `true`).
fn scalar(f: &Field) -> Option<String> {
    Some(match f {
        Field::Bool(v) => v.to_string(),
        Field::Byte(v) => v.to_string(),
        Field::Short(v) => v.to_string(),
        Field::Int(v) => v.to_string(),
        Field::Long(v) => v.to_string(),
        Field::UByte(v) => v.to_string(),
        Field::UShort(v) => v.to_string(),
        Field::UInt(v) => v.to_string(),
        Field::ULong(v) => v.to_string(),
        Field::Float(v) => v.to_string(),
        Field::Double(v) => v.to_string(),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{TableFormat, TaskKind};

    /// The error `rows` gives for `tests/fixtures/parquet/{name}` (a panic fails the test).
    fn refusal(name: &str, text: &str, pair: &str, label: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/parquet")
            .join(name);
        let spec = TableSpec {
            format: Some(TableFormat::Parquet),
            text_column: text.into(),
            text_pair_column: Some(pair.into()),
            label_column: label.into(),
            task: TaskKind::Classification,
            label_names: None,
        };
        let e = rows(&path, &spec).err().unwrap().to_string();
        assert!(e.contains(name), "{e}");
        e
    }

    /// A file the `parquet` fuzz target made from the NLI seed: a column chunk at a negative
    /// offset, on which the crate's row reader panicked (`column start and length should not be
    /// negative`). Refused by name, before any row is read.
    #[test]
    fn a_negative_column_chunk_offset_is_refused() {
        let e = refusal(
            "negative-chunk-offset.parquet",
            "premise",
            "hypothesis",
            "label",
        );
        assert!(e.contains("outside the file"), "{e}");
    }

    /// A file the `parquet` fuzz target made from the STS-B seed: a dictionary page whose value
    /// length runs past the page, on which the crate's plain decoder panicked (`assertion
    /// failed: size <= src.len()`, `util/bit_util.rs`). Refused by name through the last resort
    /// in `rows`.
    #[test]
    fn a_dictionary_value_past_its_page_is_refused() {
        let e = refusal(
            "dictionary-value-past-page.parquet",
            "sentence1",
            "sentence2",
            "score",
        );
        assert!(e.contains("panicked"), "{e}");
    }

    /// NOT FIXED: a file the `parquet` fuzz target made (from the sentiment seed) on which the
    /// crate's row reader does not return: it spins in the thrift skip of a page header
    /// (`parquet_thrift.rs`, `skip_till_depth`; it looks like a list of elements read as
    /// taking no bytes, with a huge count), over 90 s at 45 MB. Kept here to be fixed.
    #[test]
    #[ignore = "hangs in the parquet crate's page-header skip; not fixed yet"]
    fn a_page_header_whose_skip_does_not_end_is_refused() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/parquet/page-header-skip-hangs.parquet");
        let spec = TableSpec {
            format: Some(TableFormat::Parquet),
            text_column: "text".into(),
            text_pair_column: None,
            label_column: "sentiment".into(),
            task: TaskKind::Classification,
            label_names: None,
        };
        assert!(rows(&path, &spec).is_err());
    }
}
