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
    SerializedFileReader::new(file)
        .map_err(|e| DataError::format(path, format!("not a readable Parquet file ({e})")))
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
